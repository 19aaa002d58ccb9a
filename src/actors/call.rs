//! The Call actor: a thin driver around the sans-IO [`B2bua`]. It feeds it
//! the messages of both legs (routed here by Call-ID, never through the
//! tenant), sends what it yields, steers the media relay, and arms one timer
//! for the next deadline. Media packets never pass through here.

use super::node::Node;
use crate::media::{MediaSession, Side};
use crate::sip::b2bua::{B2bua, CallOutput, EndInfo};
use crate::sip::msg::{Incoming, Peer};
use parking_lot::Mutex;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

pub enum CallMsg {
    Sip(Box<Incoming>),
    Timer,
    /// Hang up from outside (shutdown, admin).
    Hangup(String),
}

/// The call's state, shared with its tenant so that the tenant can still hang
/// the call up cleanly if the actor fails (a panic leaves the data in place).
pub struct CallShared {
    pub core: B2bua,
    pub media: Option<MediaSession>,
    pub a_peer: Peer,
    pub b_peer: Peer,
    pub tenant: String,
    pub started: Instant,
    pub answered_at: Option<Instant>,
    pub end: Option<EndInfo>,
    /// Removed from the node's Call-ID map and counters already.
    pub released: bool,
}

impl CallShared {
    pub fn new(core: B2bua, media: MediaSession, a_peer: Peer, b_peer: Peer, tenant: String) -> Self {
        Self { core, media: Some(media), a_peer, b_peer, tenant, started: Instant::now(), answered_at: None, end: None, released: false }
    }

    fn peer(&self, side: Side) -> Peer {
        match side {
            Side::A => self.a_peer,
            Side::B => self.b_peer,
        }
    }

    /// Sends and applies everything the core has produced.
    fn drain(&mut self, node: &Node) {
        while let Some(out) = self.core.poll_output() {
            match out {
                CallOutput::Send { side, bytes } => node.send(self.peer(side), bytes),
                CallOutput::Media { side, rtp, rtcp } => {
                    if let Some(m) = &self.media {
                        m.set_remote(side, rtp, rtcp);
                    }
                }
                CallOutput::Ended(info) => {
                    if info.answered && self.answered_at.is_none() {
                        self.answered_at = Some(Instant::now());
                    }
                    self.end = Some(info);
                }
            }
        }
    }

    /// Frees what the call holds on the node: Call-ID routes, the call count,
    /// media ports. Logs the call's end with its media counters.
    fn release(&mut self, node: &Node) {
        if self.released {
            return;
        }
        self.released = true;
        let (a, b) = self.core.call_ids();
        node.calls.remove(a);
        node.calls.remove(b);
        node.active_calls.fetch_sub(1, Ordering::Relaxed);
        let stats = self.media.as_ref().map(|m| m.stats()).unwrap_or_default();
        let end = self.end.clone();
        let (disp, code, reason, side) = match &end {
            Some(e) => (e.disposition.as_str(), e.code, e.reason.as_str(), e.hangup_side.map(|s| format!("{s:?}")).unwrap_or_else(|| "-".into())),
            None => ("failed", 500, "call ended without a final state", "-".into()),
        };
        tracing::info!(
            tenant = %self.tenant,
            call_id = %a,
            disposition = disp,
            code,
            hangup_side = %side,
            reason,
            duration_ms = self.started.elapsed().as_millis() as u64,
            a_to_b_packets = stats.a_to_b_rtp.packets,
            b_to_a_packets = stats.b_to_a_rtp.packets,
            dropped_packets = stats.dropped(),
            "call ended"
        );
        if let Some(m) = self.media.take() {
            m.close();
        }
    }
}

/// Called by the tenant when a Call actor failed: hang up both legs with what
/// the call knew, free its ports and routes.
pub fn clean_up_failed(node: &Node, shared: &Arc<Mutex<CallShared>>) {
    let mut s = shared.lock();
    let now = Instant::now();
    s.core.hangup("internal error in the call", now);
    s.drain(node);
    if s.end.is_none() {
        s.end = s.core.ended().cloned();
    }
    s.release(node);
}

pub struct Call;

pub struct CallArgs {
    pub node: Arc<Node>,
    pub shared: Arc<Mutex<CallShared>>,
}

pub struct CallState {
    node: Arc<Node>,
    shared: Arc<Mutex<CallShared>>,
    timer: Option<ractor::concurrency::JoinHandle<Result<(), ractor::MessagingErr<CallMsg>>>>,
    deadline: Option<Instant>,
}

impl Actor for Call {
    type Msg = CallMsg;
    type State = CallState;
    type Arguments = CallArgs;

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, args: CallArgs) -> Result<Self::State, ActorProcessingErr> {
        {
            let s = args.shared.lock();
            let (a, b) = s.core.call_ids();
            args.node.calls.insert(a.to_string(), myself.clone());
            args.node.calls.insert(b.to_string(), myself.clone());
        }
        args.node.active_calls.fetch_add(1, Ordering::Relaxed);
        let mut state = CallState { node: args.node, shared: args.shared, timer: None, deadline: None };
        state.after_input(&myself);
        Ok(state)
    }

    async fn handle(&self, myself: ActorRef<Self::Msg>, msg: Self::Msg, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        let now = Instant::now();
        {
            let mut s = state.shared.lock();
            match msg {
                CallMsg::Sip(m) => {
                    #[cfg(feature = "fault-injection")]
                    if m.header("X-Crossbar-Fault").is_some_and(|v| v.trim() == "panic") {
                        drop(s);
                        panic!("fault injection: call {} panics on purpose", m.call_id);
                    }
                    let side = if m.call_id == s.core.call_ids().0 { Side::A } else { Side::B };
                    s.core.handle_message(side, *m, now);
                }
                CallMsg::Timer => {
                    state.deadline = None;
                    s.core.handle_timeout(now);
                }
                CallMsg::Hangup(reason) => s.core.hangup(&reason, now),
            }
        }
        state.after_input(&myself);
        Ok(())
    }

    async fn post_stop(&self, _: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        if let Some(t) = state.timer.take() {
            t.abort();
        }
        state.shared.lock().release(&state.node);
        Ok(())
    }
}

impl CallState {
    fn after_input(&mut self, myself: &ActorRef<CallMsg>) {
        let (finished, next) = {
            let mut s = self.shared.lock();
            s.drain(&self.node);
            (s.core.is_finished(), s.core.poll_timeout())
        };
        if finished {
            myself.stop(None);
            return;
        }
        if next != self.deadline {
            if let Some(t) = self.timer.take() {
                t.abort();
            }
            self.deadline = next;
            if let Some(at) = next {
                let wait = at.saturating_duration_since(Instant::now());
                self.timer = Some(myself.send_after(wait, || CallMsg::Timer));
            }
        }
    }
}
