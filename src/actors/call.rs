//! The Call actor: a thin driver around the sans-IO [`B2bua`]. It feeds it
//! the messages of both legs (routed here by Call-ID, never through the
//! tenant), sends what it yields, steers the media relay, and arms one timer
//! for the next deadline. Media packets never pass through here.

use super::node::Node;
use crate::cdr::{self, Cdr, CdrState, Event};
use crate::media::{MediaSession, Side};
use crate::store::ScopedStore;
use crate::sip::b2bua::{B2bua, CallOutput, CallSetup, EndInfo};
use crate::sip::msg::{self, Incoming, Peer};
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
    /// The call logic; `None` until the call has its media (its first step).
    pub core: Option<B2bua>,
    pub media: Option<MediaSession>,
    pub a_call_id: String,
    pub b_call_id: String,
    pub a_peer: Peer,
    pub b_peer: Peer,
    pub tenant: String,
    pub started: Instant,
    pub end: Option<EndInfo>,
    /// Removed from the node's Call-ID map and counters already.
    pub released: bool,
    pub cdr: Cdr,
    pub store: ScopedStore,
    /// Set when this call is being recorded (tenant policy, plan, storage left).
    pub recording: Option<RecordingBudget>,
}

impl CallShared {
    /// A call admitted by its tenant, before it has media and call logic.
    pub fn new(a_call_id: String, b_call_id: String, a_peer: Peer, b_peer: Peer, cdr: Cdr, store: ScopedStore) -> Self {
        let tenant = cdr.tenant.clone();
        Self { core: None, media: None, a_call_id, b_call_id, a_peer, b_peer, tenant, started: Instant::now(), end: None, released: false, cdr, store, recording: None }
    }

    fn event(&self, node: &Node, kind: &str) {
        cdr::emit(&node.writer, &self.store, Event::new(kind, Some(&self.cdr.id), None));
    }

    fn peer(&self, side: Side) -> Peer {
        match side {
            Side::A => self.a_peer,
            Side::B => self.b_peer,
        }
    }

    /// Sends and applies everything the core has produced.
    fn drain(&mut self, node: &Node) {
        while let Some(out) = self.core.as_mut().and_then(|c| c.poll_output()) {
            match out {
                CallOutput::Send { side, bytes } => node.send(self.peer(side), bytes),
                CallOutput::Media { side, rtp, rtcp } => {
                    if let Some(m) = &self.media {
                        m.set_remote(side, rtp, rtcp);
                    }
                }
                CallOutput::Ringing => self.event(node, "call.ringing"),
                CallOutput::Answered => {
                    self.cdr.answer = Some(cdr::rfc3339(std::time::SystemTime::now()));
                    // The answer time is billing data: store it now, not only at the end.
                    match self.cdr.answer_ops(&self.store) {
                        Ok(ops) => node.writer.write_detached(ops),
                        Err(e) => tracing::error!(tenant = %self.tenant, "cannot seal the CDR of {}: {e}", self.cdr.id),
                    }
                }
                CallOutput::Ended(info) => self.end = Some(info),
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
        let a = self.a_call_id.clone();
        node.calls.remove(&a);
        node.calls.remove(&self.b_call_id);
        node.active_calls.fetch_sub(1, Ordering::Relaxed);
        let stats = self.media.as_ref().map(|m| m.stats()).unwrap_or_default();
        let end = self.end.clone();
        let (disp, code, reason, side) = match &end {
            Some(e) => (e.disposition.as_str(), e.code, e.reason.as_str(), e.hangup_side.map(|s| format!("{s:?}")).unwrap_or_else(|| "-".into())),
            None => ("failed", 500, "call ended without a final state", "-".into()),
        };
        self.cdr.disposition = if end.is_none() { "failed".into() } else { disp.to_string() };
        self.cdr.hangup_code = Some(code);
        self.cdr.hangup_reason = Some(reason.to_string());
        self.cdr.hangup_side = end.as_ref().map(|e| match e.hangup_side {
            Some(Side::A) => "caller".to_string(),
            Some(Side::B) => "callee".to_string(),
            None => "system".to_string(),
        });
        self.cdr.finish(std::time::SystemTime::now(), CdrState::Completed);
        let media = self.media.take();
        match (self.recording.take(), media) {
            (Some(rec), Some(media)) => {
                // The WAV is built off the media thread; the CDR is completed with it.
                let (mut cdr, store, writer, tenant) = (self.cdr.clone(), self.store.clone(), node.writer.clone(), self.tenant.clone());
                tokio::spawn(async move {
                    let wav = media.finish_recording().await;
                    media.close();
                    store_end(&mut cdr, wav, &rec, &store, &writer, &tenant);
                });
            }
            (_, media) => {
                if let Some(m) = media {
                    m.close();
                }
                store_end(&mut self.cdr, None, &RecordingBudget::default(), &self.store, &node.writer, &self.tenant);
            }
        }
        tracing::info!(
            tenant = %self.tenant,
            cdr = %self.cdr.id,
            call_id = %a,
            disposition = disp,
            code,
            hangup_side = %side,
            reason,
            duration_ms = self.started.elapsed().as_millis() as u64,
            a_to_b_packets = stats.a_to_b_rtp.packets,
            b_to_a_packets = stats.b_to_a_rtp.packets,
            dropped_packets = stats.dropped(),
            own_srtp_packets = stats.own_srtp_packets,
            "call ended"
        );
    }
}

/// Where a recorded call's audio is accounted (the tenant's storage budget).
#[derive(Default, Clone)]
pub struct RecordingBudget {
    pub used: Arc<std::sync::atomic::AtomicU64>,
}

/// Writes a call's final CDR (and its recording, if any) in one batch.
fn store_end(cdr: &mut Cdr, wav: Option<crate::media::Recording>, budget: &RecordingBudget, store: &ScopedStore, writer: &crate::store::writer::RecordWriter, tenant: &str) {
    let mut ops = Vec::new();
    if let Some(rec) = wav {
        let used = budget.used.fetch_add(rec.wav.len() as u64, Ordering::Relaxed) + rec.wav.len() as u64;
        cdr.recording = Some(cdr.id.clone());
        match store.sealed_put(crate::store::RecordKind::Recording, &cdr.id, &rec.wav).and_then(|r| Ok((r, store.sealed_put(crate::store::RecordKind::Config, "recording-usage", used.to_string().as_bytes())?))) {
            Ok((r, u)) => ops.extend([r, u]),
            Err(e) => tracing::error!(tenant, "cannot seal the recording of {}: {e}", cdr.id),
        }
        tracing::debug!(tenant, cdr = %cdr.id, bytes = rec.wav.len(), duration_ms = rec.duration_ms, truncated = rec.truncated, "recording stored");
    }
    match cdr.end_ops(store) {
        Ok(end) => ops.extend(end),
        Err(e) => tracing::error!(tenant, "cannot seal the CDR of {}: {e}", cdr.id),
    }
    writer.write_detached(ops);
}

/// Called by the tenant when a Call actor failed: hang up both legs with what
/// the call knew, free its ports and routes.
pub fn clean_up_failed(node: &Node, shared: &Arc<Mutex<CallShared>>) {
    let mut s = shared.lock();
    let now = Instant::now();
    if let Some(core) = s.core.as_mut() {
        core.hangup("internal error in the call", now);
    }
    s.drain(node);
    if s.end.is_none() {
        s.end = s.core.as_ref().and_then(|c| c.ended().cloned());
    }
    s.release(node);
}

pub struct Call;

/// What the tenant decided for a call; the call carries it out in its own task
/// (media ports, SDP, the CDR's durable start), so a tenant's actor only routes
/// and admits, and new calls of one tenant do not queue behind that work.
pub struct CallPlan {
    /// The B2BUA setup; its media addresses and SDP adapter are filled in once
    /// the media session is open.
    pub setup: CallSetup,
    pub kinds: [crate::media::webrtc::LegKind; 2],
    /// Record the call: the tenant's storage budget and the most this call may keep.
    pub recording: Option<(RecordingBudget, usize)>,
}

pub struct CallArgs {
    pub node: Arc<Node>,
    pub shared: Arc<Mutex<CallShared>>,
    pub plan: CallPlan,
}

pub struct CallState {
    node: Arc<Node>,
    shared: Arc<Mutex<CallShared>>,
    plan: Option<CallPlan>,
    timer: Option<ractor::concurrency::JoinHandle<Result<(), ractor::MessagingErr<CallMsg>>>>,
    deadline: Option<Instant>,
}

impl Actor for Call {
    type Msg = CallMsg;
    type State = CallState;
    type Arguments = CallArgs;

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, args: CallArgs) -> Result<Self::State, ActorProcessingErr> {
        // Only what must be in place before the tenant handles its next request:
        // retransmissions of this INVITE now reach this call.
        {
            let s = args.shared.lock();
            args.node.calls.insert(s.a_call_id.clone(), myself.clone());
            args.node.calls.insert(s.b_call_id.clone(), myself.clone());
        }
        args.node.active_calls.fetch_add(1, Ordering::Relaxed);
        Ok(CallState { node: args.node, shared: args.shared, plan: Some(args.plan), timer: None, deadline: None })
    }

    /// Opens the media, starts the B2BUA (INVITE to the callee) and makes the
    /// CDR durable; messages from the legs wait in the mailbox meanwhile, so
    /// the caller is never answered for an unrecorded call.
    async fn post_start(&self, myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        let Some(plan) = state.plan.take() else { return Ok(()) };
        let node = state.node.clone();
        let media = match node.media.open_session_with(plan.kinds).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(tenant = %state.shared.lock().tenant, "no media ports: {e}");
                state.refuse(&plan.setup, 503, "no media ports available");
                myself.stop(None);
                return Ok(());
            }
        };
        let mut setup = plan.setup;
        setup.media_a = media.local_rtp(Side::A);
        setup.media_b = media.local_rtp(Side::B);
        setup.sdp_adapter = media.sdp_adapter();
        let core = match B2bua::new(&setup, Instant::now()) {
            Ok(c) => c,
            Err(r) => {
                media.close();
                state.refuse(&setup, r.code, &r.reason);
                myself.stop(None);
                return Ok(());
            }
        };
        let ack = {
            let mut s = state.shared.lock();
            if let Some((budget, max_bytes)) = plan.recording {
                media.start_recording(crate::media::RecordingOptions { max_bytes });
                s.recording = Some(budget);
            }
            s.core = Some(core);
            s.media = Some(media);
            match s.cdr.start_ops(&s.store) {
                Ok(ops) => Some(node.writer.write(ops)),
                Err(e) => {
                    tracing::error!(tenant = %s.tenant, "cannot seal the CDR: {e}");
                    None
                }
            }
        };
        state.after_input(&myself);
        let result = match ack {
            None => Err("cannot seal the CDR".to_string()),
            Some(ack) => match tokio::time::timeout(std::time::Duration::from_secs(10), ack).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err("record writer gone".to_string()),
                Err(_) => Err("timed out".to_string()),
            },
        };
        if let Err(e) = result {
            {
                let mut s = state.shared.lock();
                tracing::error!(tenant = %s.tenant, "cannot store the call's CDR ({e}): hanging the call up");
                if let Some(core) = s.core.as_mut() {
                    core.hangup("cannot record the call", Instant::now());
                }
            }
            state.after_input(&myself);
        }
        Ok(())
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
                    let side = if m.call_id == s.a_call_id { Side::A } else { Side::B };
                    if let Some(core) = s.core.as_mut() {
                        core.handle_message(side, *m, now);
                    }
                }
                CallMsg::Timer => {
                    state.deadline = None;
                    if let Some(core) = s.core.as_mut() {
                        core.handle_timeout(now);
                    }
                }
                CallMsg::Hangup(reason) => {
                    if let Some(core) = s.core.as_mut() {
                        core.hangup(&reason, now);
                    }
                }
            }
        }
        state.after_input(&myself);
        Ok(())
    }

    async fn post_stop(&self, _: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        if let Some(t) = state.timer.take() {
            t.abort();
        }
        let mut s = state.shared.lock();
        if let Some(core) = s.core.as_mut().filter(|c| c.ended().is_none()) {
            // Stopped from outside (its tenant went down, shutdown): hang up both legs first.
            core.hangup("the call was stopped", Instant::now());
            s.drain(&state.node);
        }
        s.release(&state.node);
        Ok(())
    }
}

impl CallState {
    /// The call could not start: the caller gets `code` (with a Warning saying why).
    fn refuse(&self, setup: &CallSetup, code: u16, why: &str) {
        let tag = crate::sip::transaction::new_tag();
        let r = crate::sip::msg::refusal(&setup.a_invite, code, Some(&tag), &setup.server_name, why);
        self.node.send(setup.a_peer, msg::response_bytes(&r));
        let mut s = self.shared.lock();
        s.end = Some(EndInfo { disposition: crate::sip::b2bua::Disposition::Failed, code, hangup_side: None, reason: why.to_string(), answered: false });
    }

    fn after_input(&mut self, myself: &ActorRef<CallMsg>) {
        let (finished, next) = {
            let mut s = self.shared.lock();
            s.drain(&self.node);
            match s.core.as_ref() {
                Some(core) => (core.is_finished(), core.poll_timeout()),
                None => (false, None),
            }
        };
        if finished {
            myself.stop(None);
            return;
        }
        // Re-arm only for an earlier deadline: a timer that fires early is
        // harmless (the core finds nothing due and names its next deadline), and
        // most changes push the deadline later, so this saves a task per message.
        if let Some(at) = next {
            if self.deadline.is_none_or(|armed| at < armed) {
                if let Some(t) = self.timer.take() {
                    t.abort();
                }
                self.deadline = Some(at);
                let wait = at.saturating_duration_since(Instant::now());
                self.timer = Some(myself.send_after(wait, || CallMsg::Timer));
            }
        }
    }
}
