//! SIP transactions (RFC 3261 §17), with the "Accepted" states of RFC 6026.
//!
//! Sans-IO: a [`ClientTx`] or [`ServerTx`] is a plain struct fed with
//! `handle_*` inputs that carry the current `now: Instant`, and drained with
//! `poll_transmit` / `poll_event` / `poll_timeout`. It never reads the clock,
//! never touches a socket and knows nothing about where its bytes go: the
//! owner (the Call actor) keeps the destination and arms one timer for
//! `poll_timeout()`, then calls `handle_timeout(now)` when it fires.
//!
//! Differences from the letter of RFC 3261, all deliberate:
//! - The INVITE state machines have the RFC 6026 "Accepted" state: a 2xx no
//!   longer ends the transaction, so retransmitted INVITEs (server side) and
//!   retransmitted 2xx (client side) are still recognised for 64*T1.
//! - On the server side the transaction also does the UAS core's job of
//!   retransmitting the 2xx until the ACK arrives (§13.3.1.4,
//!   [`Timer::Retransmit2xx`]) and reports [`ServerEvent::NoAck`] when it never
//!   does, so the B2BUA's Call actor has one place that owns response
//!   reliability. For the same reason an ACK for the 2xx (which carries a new
//!   branch) matches the transaction by dialog and CSeq while it is Accepted.
//! - No 100 Trying is sent on the TU's behalf (§17.2.1 allows the TU to do it);
//!   the Call actor answers INVITEs with 100 at once.
//! - The client INVITE transaction has no Timer C: a B2BUA's no-answer timeout
//!   is call policy and belongs to the Call actor.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use rand::Rng;
use rsipstack::sip::{
    CSeq, ContentLength, Header, Headers, MaxForwards, Method, Request, Response, StatusCode, Via,
};

use super::msg;

/// RFC 3261 §8.1.1.7: a branch starting with this was made by an RFC 3261
/// element and is unique per transaction, so it alone identifies the
/// transaction (§17.2.3). Anything else is an RFC 2543 client.
pub const MAGIC_COOKIE: &str = "z9hG4bK";

/// Timer D's floor for unreliable transports (§17.1.1.2: "at least 32
/// seconds"), independent of T1 because it covers the *peer's* Timer G/H.
const TIMER_D_MIN: Duration = Duration::from_secs(32);

/// Smallest retransmission interval we accept from configuration: a zero T1
/// would reschedule a timer at `now` forever.
const MIN_T1: Duration = Duration::from_millis(1);

/// Errors of the transaction layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    /// RFC 3261 §21 only defines status codes 100–699.
    #[error("status code {0} is outside 100-699 and cannot be sent")]
    InvalidStatus(u16),
    /// The server transaction is past the point where this response can be
    /// sent (e.g. a second final response, a 1xx after the final one, or any
    /// response once terminated).
    #[error("a {code} response cannot be sent in transaction state {state:?}")]
    WrongState {
        /// Status code the TU tried to send.
        code: u16,
        /// State the transaction was in.
        state: ServerState,
    },
}

/// RFC 3261 timer values (§17.1.1.1, table 4 of Appendix A). Passed in by the
/// owner, never global, so tests and tenants can shorten or stretch them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerConfig {
    /// RTT estimate: first retransmission interval.
    pub t1: Duration,
    /// Cap on the retransmission interval of non-INVITE requests and of
    /// INVITE responses.
    pub t2: Duration,
    /// How long a message can stay in the network: how long the transaction
    /// lingers to absorb retransmissions.
    pub t4: Duration,
}

impl Default for TimerConfig {
    fn default() -> Self {
        Self {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
        }
    }
}

impl TimerConfig {
    /// 64*T1: Timers B, F, H, J, L and M.
    pub fn timeout(&self) -> Duration {
        self.t1.saturating_mul(64)
    }

    /// Clamp values that would make the state machines loop (zero T1) or
    /// retransmit faster than they started (T2 < T1).
    fn sanitized(&self) -> Self {
        let t1 = self.t1.max(MIN_T1);
        Self {
            t1,
            t2: self.t2.max(t1),
            t4: self.t4,
        }
    }
}

/// The RFC timers, as data. A transaction keeps one `Option<Instant>` per
/// variant; `None` means not running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    /// §17.1.1.2: INVITE request retransmission (unreliable transport only),
    /// first after T1, then doubling.
    A,
    /// §17.1.1.2: INVITE client transaction timeout in Calling, 64*T1.
    B,
    /// §17.1.1.2: wait for retransmitted non-2xx finals in Completed, to
    /// re-ACK them: max(32 s, 64*T1) on unreliable transport, zero on reliable.
    D,
    /// §17.1.2.2: non-INVITE request retransmission (unreliable only), T1
    /// doubling up to T2; T2 once a provisional arrived.
    E,
    /// §17.1.2.2: non-INVITE client transaction timeout, 64*T1.
    F,
    /// §17.2.1: INVITE 3xx–6xx response retransmission (unreliable only), T1
    /// doubling up to T2.
    G,
    /// §17.2.1: wait for the ACK of a 3xx–6xx, 64*T1.
    H,
    /// §17.2.1: absorb ACK retransmissions in Confirmed, T4 (zero on reliable).
    I,
    /// §17.2.2: absorb non-INVITE request retransmissions in Completed, 64*T1
    /// (zero on reliable).
    J,
    /// §17.1.2.2: absorb non-INVITE response retransmissions in Completed, T4
    /// (zero on reliable).
    K,
    /// RFC 6026 (update to §17.2.1): server INVITE transaction in Accepted,
    /// 64*T1: absorbs INVITE retransmissions and waits for the 2xx's ACK.
    L,
    /// RFC 6026 (update to §17.1.1.2): client INVITE transaction in Accepted,
    /// 64*T1: keeps passing retransmitted or forked 2xx to the TU.
    M,
    /// §13.3.1.4: 2xx retransmission (unreliable only), T1 doubling up to T2,
    /// until the ACK arrives or Timer L fires. RFC 3261 gives this job to the
    /// UAS core; here the server transaction does it for the core.
    Retransmit2xx,
}

impl Timer {
    const COUNT: usize = 13;

    /// When several timers are due at the same instant, the ones that end a
    /// state fire first, so a transaction that times out does not send one
    /// more retransmission at the same instant.
    const FIRING_ORDER: [Timer; Timer::COUNT] = [
        Timer::B,
        Timer::D,
        Timer::F,
        Timer::H,
        Timer::I,
        Timer::J,
        Timer::K,
        Timer::L,
        Timer::M,
        Timer::A,
        Timer::E,
        Timer::G,
        Timer::Retransmit2xx,
    ];
}

/// One deadline per [`Timer`].
#[derive(Debug, Clone, Default)]
struct TimerTable([Option<Instant>; Timer::COUNT]);

impl TimerTable {
    fn get(&self, timer: Timer) -> Option<Instant> {
        self.0[timer as usize]
    }

    fn set(&mut self, timer: Timer, at: Option<Instant>) {
        self.0[timer as usize] = at;
    }

    /// Arm `timer` for `now + after`. An overflowing deadline is "never".
    fn start(&mut self, timer: Timer, now: Instant, after: Duration) {
        self.set(timer, now.checked_add(after));
    }

    fn stop(&mut self, timer: Timer) {
        self.set(timer, None);
    }

    fn stop_all(&mut self) {
        self.0 = [None; Timer::COUNT];
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.0.iter().flatten().min().copied()
    }

    /// The earliest timer due at `now`, stopped.
    fn pop_due(&mut self, now: Instant) -> Option<Timer> {
        let mut due: Option<(Instant, Timer)> = None;
        for timer in Timer::FIRING_ORDER {
            if let Some(at) = self.get(timer) {
                if at <= now && due.is_none_or(|(best, _)| at < best) {
                    due = Some((at, timer));
                }
            }
        }
        let (_, timer) = due?;
        self.stop(timer);
        Some(timer)
    }
}

/// Which of the two §17 state machines a transaction runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxKind {
    /// §17.1.1 / §17.2.1.
    Invite,
    /// §17.1.2 / §17.2.2: every other method (ACK never makes a transaction).
    NonInvite,
}

impl TxKind {
    pub fn of(method: &Method) -> Self {
        if *method == Method::Invite {
            TxKind::Invite
        } else {
            TxKind::NonInvite
        }
    }
}

fn status_class(code: u16) -> Option<Class> {
    match code {
        100..=199 => Some(Class::Provisional),
        200..=299 => Some(Class::Success),
        300..=699 => Some(Class::Failure),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Provisional,
    Success,
    Failure,
}

// ---------------------------------------------------------------------------
// Client transaction
// ---------------------------------------------------------------------------

/// States of a client transaction (§17.1.1.2 figure 5 and §17.1.2.2 figure 6,
/// with RFC 6026's Accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    /// INVITE sent, nothing heard yet.
    Calling,
    /// Non-INVITE sent, nothing heard yet.
    Trying,
    /// A provisional response arrived.
    Proceeding,
    /// A final response arrived (any final for non-INVITE, 3xx–6xx for
    /// INVITE); lingering to absorb retransmissions.
    Completed,
    /// INVITE got a 2xx (RFC 6026); further 2xx still go to the TU.
    Accepted,
    Terminated,
}

/// What a client transaction tells its TU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// A 1xx.
    Provisional(Response),
    /// The first final response; and for INVITE every 2xx received while
    /// Accepted (retransmissions and forked answers, RFC 6026): the TU must
    /// ACK each, since the 2xx's ACK is the TU's job (§13.2.2.4).
    Final(Response),
    /// Timer B or F fired without a final response: the TU acts as if it got
    /// a 408 (§8.1.3.1).
    Timeout,
}

/// A client transaction (§17.1). The request is complete when handed over:
/// top Via with a [`MAGIC_COOKIE`] branch, CSeq, and so on.
#[derive(Debug, Clone)]
pub struct ClientTx {
    request: Request,
    kind: TxKind,
    branch: String,
    reliable: bool,
    cfg: TimerConfig,
    state: ClientState,
    timers: TimerTable,
    /// Current Timer A / E interval.
    interval: Duration,
    request_bytes: Vec<u8>,
    /// The ACK for our 3xx–6xx, kept to answer retransmissions of that final.
    ack_bytes: Option<Vec<u8>>,
    transmits: VecDeque<Vec<u8>>,
    events: VecDeque<ClientEvent>,
}

impl ClientTx {
    /// Start the transaction: queues the first transmission and arms its
    /// timers. An ACK makes no transaction (§17.1.1.3): it is queued once and
    /// the returned value is already terminated.
    pub fn new(request: Request, reliable: bool, cfg: &TimerConfig, now: Instant) -> Self {
        let cfg = cfg.sanitized();
        let kind = TxKind::of(&request.method);
        let branch = top_via_branch(&request.headers).unwrap_or_default().to_string();
        let request_bytes = msg::request_bytes(&request);
        let is_ack = request.method == Method::Ack;
        let mut tx = Self {
            request,
            kind,
            branch,
            reliable,
            cfg,
            state: match kind {
                TxKind::Invite => ClientState::Calling,
                TxKind::NonInvite => ClientState::Trying,
            },
            timers: TimerTable::default(),
            interval: cfg.t1,
            transmits: VecDeque::from([request_bytes.clone()]),
            request_bytes,
            ack_bytes: None,
            events: VecDeque::new(),
        };
        if is_ack {
            tx.state = ClientState::Terminated;
            return tx;
        }
        let (retransmit, timeout) = match kind {
            TxKind::Invite => (Timer::A, Timer::B),
            TxKind::NonInvite => (Timer::E, Timer::F),
        };
        // Reliable transports do their own retransmission (§17.1.1.2).
        if !reliable {
            tx.timers.start(retransmit, now, cfg.t1);
        }
        tx.timers.start(timeout, now, cfg.timeout());
        tx
    }

    pub fn request(&self) -> &Request {
        &self.request
    }

    /// The branch of the request's top Via: the transaction id. Empty when the
    /// request had none (such a transaction matches no response).
    pub fn branch(&self) -> &str {
        &self.branch
    }

    pub fn kind(&self) -> TxKind {
        self.kind
    }

    pub fn state(&self) -> ClientState {
        self.state
    }

    /// Deadline of one timer, for diagnostics and tests.
    pub fn deadline(&self, timer: Timer) -> Option<Instant> {
        self.timers.get(timer)
    }

    /// §17.1.3: the response's top Via branch equals ours and its CSeq method
    /// is our request's (a CANCEL shares the INVITE's branch).
    pub fn matches(&self, resp: &Response) -> bool {
        !self.branch.is_empty()
            && top_via_branch(&resp.headers) == Some(self.branch.as_str())
            && cseq(&resp.headers).map(|(_, m)| m) == Some(self.request.method)
    }

    /// Feed a response. Responses that do not [`matches`](Self::matches) and
    /// status codes outside 100–699 are ignored.
    pub fn handle_response(&mut self, resp: Response, now: Instant) {
        if self.state == ClientState::Terminated || !self.matches(&resp) {
            return;
        }
        let Some(class) = status_class(resp.status_code.code()) else {
            return;
        };
        match self.kind {
            TxKind::Invite => self.invite_response(class, resp, now),
            TxKind::NonInvite => self.non_invite_response(class, resp, now),
        }
    }

    fn invite_response(&mut self, class: Class, resp: Response, now: Instant) {
        use ClientState::*;
        match (self.state, class) {
            (Calling | Proceeding, Class::Provisional) => {
                // §17.1.1.2: no more retransmissions, and Timer B only covers
                // Calling: how long to ring is the TU's decision.
                self.timers.stop(Timer::A);
                self.timers.stop(Timer::B);
                self.state = Proceeding;
                self.events.push_back(ClientEvent::Provisional(resp));
            }
            (Calling | Proceeding, Class::Success) => {
                self.timers.stop(Timer::A);
                self.timers.stop(Timer::B);
                self.state = Accepted;
                self.timers.start(Timer::M, now, self.cfg.timeout());
                self.events.push_back(ClientEvent::Final(resp));
            }
            (Accepted, Class::Success) => {
                self.events.push_back(ClientEvent::Final(resp));
            }
            (Calling | Proceeding, Class::Failure) => {
                self.timers.stop(Timer::A);
                self.timers.stop(Timer::B);
                let ack = msg::request_bytes(&build_ack(&self.request, &resp));
                self.transmits.push_back(ack.clone());
                self.ack_bytes = Some(ack);
                self.events.push_back(ClientEvent::Final(resp));
                if self.reliable {
                    self.terminate();
                } else {
                    self.state = Completed;
                    let wait = self.cfg.timeout().max(TIMER_D_MIN);
                    self.timers.start(Timer::D, now, wait);
                }
            }
            (Completed, Class::Failure) => {
                // A retransmitted final: our ACK was lost. Re-ACK, tell no one.
                if let Some(ack) = &self.ack_bytes {
                    self.transmits.push_back(ack.clone());
                }
            }
            _ => {}
        }
    }

    fn non_invite_response(&mut self, class: Class, resp: Response, now: Instant) {
        use ClientState::*;
        match (self.state, class) {
            (Trying | Proceeding, Class::Provisional) => {
                self.state = Proceeding;
                self.events.push_back(ClientEvent::Provisional(resp));
            }
            (Trying | Proceeding, Class::Success | Class::Failure) => {
                self.timers.stop(Timer::E);
                self.timers.stop(Timer::F);
                self.events.push_back(ClientEvent::Final(resp));
                if self.reliable {
                    self.terminate();
                } else {
                    self.state = Completed;
                    self.timers.start(Timer::K, now, self.cfg.t4);
                }
            }
            // Completed absorbs retransmitted finals (§17.1.2.2).
            _ => {}
        }
    }

    /// Fire every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(timer) = self.timers.pop_due(now) {
            self.on_timer(timer, now);
        }
    }

    fn on_timer(&mut self, timer: Timer, now: Instant) {
        use ClientState::*;
        match (timer, self.state) {
            (Timer::A, Calling) => {
                // §17.1.1.2: Timer A doubles without the T2 cap; Timer B ends it.
                self.transmits.push_back(self.request_bytes.clone());
                self.interval = self.interval.saturating_mul(2);
                self.timers.start(Timer::A, now, self.interval);
            }
            (Timer::E, Trying) => {
                self.transmits.push_back(self.request_bytes.clone());
                self.interval = self.interval.saturating_mul(2).min(self.cfg.t2);
                self.timers.start(Timer::E, now, self.interval);
            }
            (Timer::E, Proceeding) => {
                // §17.1.2.2: once the server is known to be alive, retransmit
                // only every T2.
                self.transmits.push_back(self.request_bytes.clone());
                self.timers.start(Timer::E, now, self.cfg.t2);
            }
            (Timer::B, Calling) | (Timer::F, Trying | Proceeding) => {
                self.events.push_back(ClientEvent::Timeout);
                self.terminate();
            }
            (Timer::D, Completed) | (Timer::K, Completed) | (Timer::M, Accepted) => {
                self.terminate();
            }
            _ => {}
        }
    }

    /// Next datagram/segment to send to the transaction's destination. Drain
    /// it even after [`is_terminated`](Self::is_terminated): the last ACK or
    /// the single send of an ACK can still be queued.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next_deadline()
    }

    pub fn is_terminated(&self) -> bool {
        self.state == ClientState::Terminated
    }

    fn terminate(&mut self) {
        self.state = ClientState::Terminated;
        self.timers.stop_all();
    }
}

/// §17.1.1.3: the ACK a client INVITE transaction sends for a 3xx–6xx. Same
/// Request-URI, Call-ID, From, CSeq number and Route set as the INVITE, the
/// To of the response (with its tag), and only the INVITE's top Via, so the
/// ACK carries the INVITE's branch and reaches the same server transaction.
fn build_ack(invite: &Request, resp: &Response) -> Request {
    let mut headers = Headers::default();
    if let Some(via) = top_via_value(&invite.headers) {
        headers.push(Header::Via(Via::new(via)));
    }
    for header in invite.headers.iter() {
        if matches!(header, Header::Route(_)) {
            headers.push(header.clone());
        }
    }
    headers.push(Header::MaxForwards(MaxForwards::from(70u32)));
    if let Some(from) = first(&invite.headers, |h| matches!(h, Header::From(_))) {
        headers.push(from.clone());
    }
    let to = first(&resp.headers, |h| matches!(h, Header::To(_)))
        .or_else(|| first(&invite.headers, |h| matches!(h, Header::To(_))));
    if let Some(to) = to {
        headers.push(to.clone());
    }
    if let Some(call_id) = first(&invite.headers, |h| matches!(h, Header::CallId(_))) {
        headers.push(call_id.clone());
    }
    let seq = cseq(&invite.headers).map_or(0, |(seq, _)| seq);
    headers.push(Header::CSeq(CSeq::new(format!("{seq} ACK"))));
    headers.push(Header::ContentLength(ContentLength::from(0u32)));
    Request {
        method: Method::Ack,
        uri: invite.uri.clone(),
        version: invite.version,
        headers,
        body: Vec::new(),
    }
}

// ---------------------------------------------------------------------------
// Server transaction
// ---------------------------------------------------------------------------

/// States of a server transaction (§17.2.1 figure 7 and §17.2.2 figure 8,
/// with RFC 6026's Accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerState {
    /// Non-INVITE received, no response yet.
    Trying,
    /// INVITE received (its initial state), or a 1xx sent.
    Proceeding,
    /// Final response sent (3xx–6xx for INVITE): retransmitting it (INVITE,
    /// unreliable) or absorbing request retransmissions.
    Completed,
    /// INVITE only: the 3xx–6xx was ACKed; absorbing ACK retransmissions.
    Confirmed,
    /// INVITE only: a 2xx was sent (RFC 6026); retransmitting it until the
    /// ACK, then absorbing INVITE retransmissions until Timer L.
    Accepted,
    Terminated,
}

impl ServerState {
    /// Whether the TU can still send a final response (or a 1xx).
    pub fn can_respond(&self) -> bool {
        matches!(self, ServerState::Trying | ServerState::Proceeding)
    }
}

/// What a server transaction tells its TU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// The 2xx was never ACKed within 64*T1 (§13.3.1.4): the dialog is
    /// confirmed but the session is dead; the TU should send BYE.
    NoAck,
    /// Timer H: the 3xx–6xx was never ACKed (§17.2.1); the TU treats it as a
    /// transaction failure.
    Timeout,
}

/// Where an ACK handed to [`ServerTx::handle_ack`] belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// It acknowledged our 3xx–6xx, or is a retransmission of an ACK already
    /// seen: hop-by-hop, it ends here (§17.2.1). Nothing to forward.
    Absorbed,
    /// The first ACK for our 2xx: it belongs to the dialog (§13.3.1.4), not
    /// to the transaction. The B2BUA confirms the dialog and forwards the ACK
    /// (and any SDP answer it carries) to the other leg.
    Dialog,
    /// No ACK was expected: no final response sent yet, or not an INVITE
    /// transaction. Drop it.
    Ignored,
}

/// A server transaction (§17.2), created for a new request.
#[derive(Debug, Clone)]
pub struct ServerTx {
    request: Request,
    kind: TxKind,
    reliable: bool,
    cfg: TimerConfig,
    state: ServerState,
    /// Top Via of the request, for §17.2.3 matching.
    via: Option<ViaKey>,
    timers: TimerTable,
    /// Current Timer G / 2xx retransmission interval.
    interval: Duration,
    last_response: Option<Response>,
    last_bytes: Option<Vec<u8>>,
    /// To tag of the final response, which the ACK must carry.
    final_to_tag: Option<String>,
    /// Accepted only: the 2xx's ACK arrived.
    acked: bool,
    transmits: VecDeque<Vec<u8>>,
    events: VecDeque<ServerEvent>,
}

impl ServerTx {
    /// Start a server transaction for a new request. An ACK never creates one
    /// (it belongs to an INVITE transaction or to a dialog): the result is
    /// already terminated.
    pub fn new(request: Request, reliable: bool, cfg: &TimerConfig, now: Instant) -> Self {
        // Nothing is armed at creation; `now` keeps the constructor uniform
        // with ClientTx and leaves room for a 100-Trying timer.
        let _ = now;
        let cfg = cfg.sanitized();
        let kind = TxKind::of(&request.method);
        let state = if request.method == Method::Ack {
            ServerState::Terminated
        } else {
            match kind {
                TxKind::Invite => ServerState::Proceeding,
                TxKind::NonInvite => ServerState::Trying,
            }
        };
        Self {
            via: top_via(&request.headers),
            request,
            kind,
            reliable,
            cfg,
            state,
            timers: TimerTable::default(),
            interval: cfg.t1,
            last_response: None,
            last_bytes: None,
            final_to_tag: None,
            acked: false,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    pub fn request(&self) -> &Request {
        &self.request
    }

    /// Branch of the request's top Via (empty when it had none).
    pub fn branch(&self) -> &str {
        self.via
            .as_ref()
            .and_then(|v| v.branch.as_deref())
            .unwrap_or("")
    }

    pub fn kind(&self) -> TxKind {
        self.kind
    }

    pub fn state(&self) -> ServerState {
        self.state
    }

    /// The last response the TU sent through this transaction.
    pub fn last_response(&self) -> Option<&Response> {
        self.last_response.as_ref()
    }

    /// Deadline of one timer, for diagnostics and tests.
    pub fn deadline(&self, timer: Timer) -> Option<Instant> {
        self.timers.get(timer)
    }

    /// §17.2.3: does `req` belong to this transaction? Same method, except
    /// that an ACK matches an INVITE transaction; a CANCEL never matches the
    /// transaction it cancels (see [`matches_cancel`](Self::matches_cancel)).
    ///
    /// With the magic cookie: branch and sent-by of the top Via. Without
    /// (RFC 2543 clients): Request-URI, To tag, From tag, Call-ID, CSeq and
    /// top Via; for an ACK the CSeq number only and the To tag of our
    /// response. While Accepted an ACK also matches by dialog (Call-ID, From
    /// tag, To tag of our 2xx, CSeq number), since the ACK for a 2xx carries
    /// a branch of its own (§13.2.2.4).
    pub fn matches(&self, req: &Request) -> bool {
        let is_ack_for_us = req.method == Method::Ack && self.kind == TxKind::Invite;
        if req.method != self.request.method && !is_ack_for_us {
            return false;
        }
        if is_ack_for_us && self.state == ServerState::Accepted && self.matches_2xx_ack(req) {
            return true;
        }
        let Some(via) = ViaRef::top(&req.headers) else {
            return false;
        };
        match via.branch() {
            Some(branch) if branch.starts_with(MAGIC_COOKIE) => self
                .via
                .as_ref()
                .is_some_and(|own| via.same_branch_and_sent_by(own, branch)),
            _ => self.matches_rfc2543(req, &via, is_ack_for_us),
        }
    }

    /// §9.2: is `cancel` a CANCEL for this transaction's request? Same
    /// matching as [`matches`](Self::matches) without the method.
    pub fn matches_cancel(&self, cancel: &Request) -> bool {
        if cancel.method != Method::Cancel
            || matches!(self.request.method, Method::Cancel | Method::Ack)
        {
            return false;
        }
        let Some(via) = ViaRef::top(&cancel.headers) else {
            return false;
        };
        match via.branch() {
            Some(branch) if branch.starts_with(MAGIC_COOKIE) => self
                .via
                .as_ref()
                .is_some_and(|own| via.same_branch_and_sent_by(own, branch)),
            _ => {
                let orig = &self.request;
                self.via.as_ref().is_some_and(|own| via.same_value(own))
                    && same_uri(&cancel.uri, &orig.uri)
                    && same_some(call_id(&cancel.headers), call_id(&orig.headers))
                    && from_tag(&cancel.headers) == from_tag(&orig.headers)
                    && to_tag(&cancel.headers) == to_tag(&orig.headers)
                    && same_some(
                        cseq(&cancel.headers).map(|(n, _)| n),
                        cseq(&orig.headers).map(|(n, _)| n),
                    )
            }
        }
    }

    fn matches_rfc2543(&self, req: &Request, via: &ViaRef<'_>, is_ack: bool) -> bool {
        let orig = &self.request;
        let common = self.via.as_ref().is_some_and(|own| via.same_value(own))
            && same_uri(&req.uri, &orig.uri)
            && same_some(call_id(&req.headers), call_id(&orig.headers))
            && from_tag(&req.headers) == from_tag(&orig.headers);
        if !common {
            return false;
        }
        if is_ack {
            let expected_to_tag = self.final_to_tag.as_deref().or_else(|| to_tag(&orig.headers));
            same_some(
                cseq(&req.headers).map(|(n, _)| n),
                cseq(&orig.headers).map(|(n, _)| n),
            ) && to_tag(&req.headers) == expected_to_tag
        } else {
            same_some(cseq(&req.headers), cseq(&orig.headers))
                && to_tag(&req.headers) == to_tag(&orig.headers)
        }
    }

    fn matches_2xx_ack(&self, ack: &Request) -> bool {
        let orig = &self.request;
        self.final_to_tag.is_some()
            && to_tag(&ack.headers) == self.final_to_tag.as_deref()
            && same_some(call_id(&ack.headers), call_id(&orig.headers))
            && from_tag(&ack.headers) == from_tag(&orig.headers)
            && same_some(
                cseq(&ack.headers).map(|(n, _)| n),
                cseq(&orig.headers).map(|(n, _)| n),
            )
    }

    /// The request arrived again: re-send the last response, if any (§17.2.1,
    /// §17.2.2). Absorbed silently when there is nothing to re-send, and once
    /// the 2xx has been ACKed.
    pub fn handle_retransmission(&mut self, now: Instant) {
        let _ = now;
        let resend = match self.state {
            ServerState::Proceeding | ServerState::Completed => true,
            ServerState::Accepted => !self.acked,
            ServerState::Trying | ServerState::Confirmed | ServerState::Terminated => false,
        };
        if resend {
            if let Some(bytes) = &self.last_bytes {
                self.transmits.push_back(bytes.clone());
            }
        }
    }

    /// Feed an ACK that [`matches`](Self::matches) this transaction.
    pub fn handle_ack(&mut self, now: Instant) -> AckOutcome {
        if self.kind != TxKind::Invite {
            return AckOutcome::Ignored;
        }
        match self.state {
            ServerState::Completed => {
                self.timers.stop(Timer::G);
                self.timers.stop(Timer::H);
                if self.reliable {
                    self.terminate();
                } else {
                    self.state = ServerState::Confirmed;
                    self.timers.start(Timer::I, now, self.cfg.t4);
                }
                AckOutcome::Absorbed
            }
            ServerState::Confirmed => AckOutcome::Absorbed,
            ServerState::Accepted if !self.acked => {
                // Stay Accepted until Timer L so that an INVITE retransmission
                // that crossed the 2xx is still absorbed instead of looking
                // like a new call (the reason for RFC 6026).
                self.acked = true;
                self.timers.stop(Timer::Retransmit2xx);
                AckOutcome::Dialog
            }
            ServerState::Accepted => AckOutcome::Absorbed,
            ServerState::Trying | ServerState::Proceeding | ServerState::Terminated => {
                AckOutcome::Ignored
            }
        }
    }

    /// The TU sends a response through the transaction; see
    /// [`try_respond`](Self::try_respond). A response the state does not allow
    /// is dropped: check [`state`](Self::state) first, or use `try_respond`.
    pub fn respond(&mut self, response: Response, now: Instant) {
        let _ = self.try_respond(response, now);
    }

    /// The TU sends a response: stored, queued for transmission, and the
    /// state moves on.
    ///
    /// INVITE: 1xx keeps Proceeding; 2xx goes to Accepted (retransmitted at
    /// T1, 2T1, … capped at T2 on unreliable transport until the ACK, Timer L
    /// at 64*T1 then [`ServerEvent::NoAck`] if no ACK came); another 2xx
    /// while Accepted is sent as is (RFC 6026); 3xx–6xx goes to Completed
    /// (Timer G retransmissions on unreliable transport, Timer H →
    /// [`ServerEvent::Timeout`]). Non-INVITE: 1xx → Proceeding, final →
    /// Completed with Timer J (terminated at once on reliable transport).
    pub fn try_respond(&mut self, response: Response, now: Instant) -> Result<(), TxError> {
        let code = response.status_code.code();
        let class = status_class(code).ok_or(TxError::InvalidStatus(code))?;
        let wrong_state = TxError::WrongState {
            code,
            state: self.state,
        };
        match (self.kind, self.state, class) {
            (TxKind::Invite, ServerState::Proceeding, Class::Provisional) => {
                self.send(response);
            }
            (TxKind::Invite, ServerState::Proceeding, Class::Success) => {
                self.final_to_tag = to_tag(&response.headers).map(str::to_string);
                self.send(response);
                self.state = ServerState::Accepted;
                self.timers.start(Timer::L, now, self.cfg.timeout());
                if !self.reliable {
                    self.interval = self.cfg.t1;
                    self.timers.start(Timer::Retransmit2xx, now, self.interval);
                }
            }
            (TxKind::Invite, ServerState::Accepted, Class::Success) => {
                self.send(response);
            }
            (TxKind::Invite, ServerState::Proceeding, Class::Failure) => {
                self.final_to_tag = to_tag(&response.headers).map(str::to_string);
                self.send(response);
                self.state = ServerState::Completed;
                self.timers.start(Timer::H, now, self.cfg.timeout());
                if !self.reliable {
                    self.interval = self.cfg.t1;
                    self.timers.start(Timer::G, now, self.interval);
                }
            }
            (
                TxKind::NonInvite,
                ServerState::Trying | ServerState::Proceeding,
                Class::Provisional,
            ) => {
                self.send(response);
                self.state = ServerState::Proceeding;
            }
            (TxKind::NonInvite, ServerState::Trying | ServerState::Proceeding, _) => {
                self.send(response);
                if self.reliable {
                    self.terminate();
                } else {
                    self.state = ServerState::Completed;
                    self.timers.start(Timer::J, now, self.cfg.timeout());
                }
            }
            _ => return Err(wrong_state),
        }
        Ok(())
    }

    fn send(&mut self, response: Response) {
        let bytes = msg::response_bytes(&response);
        self.transmits.push_back(bytes.clone());
        self.last_bytes = Some(bytes);
        self.last_response = Some(response);
    }

    /// Fire every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(timer) = self.timers.pop_due(now) {
            self.on_timer(timer, now);
        }
    }

    fn on_timer(&mut self, timer: Timer, now: Instant) {
        use ServerState::*;
        match (timer, self.state) {
            (Timer::G, Completed) => {
                self.retransmit_last();
                self.interval = self.interval.saturating_mul(2).min(self.cfg.t2);
                self.timers.start(Timer::G, now, self.interval);
            }
            (Timer::Retransmit2xx, Accepted) if !self.acked => {
                self.retransmit_last();
                self.interval = self.interval.saturating_mul(2).min(self.cfg.t2);
                self.timers.start(Timer::Retransmit2xx, now, self.interval);
            }
            (Timer::H, Completed) => {
                self.events.push_back(ServerEvent::Timeout);
                self.terminate();
            }
            (Timer::L, Accepted) => {
                if !self.acked {
                    self.events.push_back(ServerEvent::NoAck);
                }
                self.terminate();
            }
            (Timer::I, Confirmed) | (Timer::J, Completed) => self.terminate(),
            _ => {}
        }
    }

    fn retransmit_last(&mut self) {
        if let Some(bytes) = &self.last_bytes {
            self.transmits.push_back(bytes.clone());
        }
    }

    /// Next response to send back to where the request came from (§18.2.2).
    /// Drain it even after [`is_terminated`](Self::is_terminated): on reliable
    /// transports the final response is queued as the transaction ends.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next_deadline()
    }

    pub fn is_terminated(&self) -> bool {
        self.state == ServerState::Terminated
    }

    fn terminate(&mut self) {
        self.state = ServerState::Terminated;
        self.timers.stop_all();
    }
}

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

/// `len` random alphanumerics from the thread's CSPRNG: random bytes below 248
/// (4 x 62) mapped to the 62 characters, so each is uniform, drawn in blocks
/// (one generator call per token rather than one per character).
fn random_token(len: usize) -> String {
    random_token_after("", len)
}

/// `prefix` followed by [`random_token`]`(len)`, in one allocation.
fn random_token_after(prefix: &str, len: usize) -> String {
    const ALPHANUMERIC: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    let mut buf = [0u8; 32];
    let end = prefix.len() + len;
    loop {
        let mut token = String::with_capacity(end);
        token.push_str(prefix);
        while token.len() < end {
            rng.fill(&mut buf[..]);
            for &b in buf.iter().filter(|&&b| b < 248).take(end - token.len()) {
                token.push(char::from(ALPHANUMERIC[usize::from(b % 62)]));
            }
        }
        if token_is_safe(&token[prefix.len()..]) {
            return token;
        }
    }
}

/// Whether a random token can go into a message without a naive parser taking
/// part of it for a header name. SIPp finds a response's CSeq method with
/// `strstr(msg, "CSeq")`: a To tag such as `y0CSeqyugvyc4zdJ` (one in about
/// 70,000 calls, counting every case) made it read the method from the tag and
/// abort the call ("while expecting '100', received '180 Ringing'"), twice in
/// this project's CPS runs. Such tokens are drawn again.
fn token_is_safe(token: &str) -> bool {
    !token.as_bytes().windows(4).any(|w| w.eq_ignore_ascii_case(b"cseq"))
}

/// A fresh Via branch: the magic cookie plus 24 random alphanumerics (~142
/// bits), unique across space and time as §8.1.1.7 requires.
pub fn new_branch() -> String {
    random_token_after(MAGIC_COOKIE, 24)
}

/// A fresh From/To tag: 16 random alphanumerics (~95 bits; §19.3 asks for at
/// least 32 bits of randomness).
pub fn new_tag() -> String {
    random_token(16)
}

/// A Call-ID for a leg crossbar starts: 12 hex digits of a node-wide counter,
/// 16 random alphanumerics (~95 bits: §8.1.1.4 recommends cryptographic
/// randomness, and the random part carries it) and `@host`.
///
/// The counter starts at a random value (the Call-ID does not tell how many calls
/// a node has made) and makes consecutive Call-IDs sort next to each other. A peer
/// that keeps its calls in an ordered map finds them on a few hot cache lines
/// instead of walking a random path per message: SIPp does (a `std::map` by
/// Call-ID), and behind crossbar its UAS spent 84 µs per call with fully random
/// Call-IDs against 67 µs called directly by SIPp's numbered ones, the
/// difference being that map's lookups (perf; `bench/cps.sh`'s calls, 2,000/s).
pub fn new_call_id(host: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    const COUNTER_MASK: u64 = (1 << 48) - 1;
    static NEXT: OnceLock<AtomicU64> = OnceLock::new();
    let n = NEXT.get_or_init(|| AtomicU64::new(rand::thread_rng().gen::<u64>() & COUNTER_MASK)).fetch_add(1, Ordering::Relaxed) & COUNTER_MASK;
    let mut id = String::with_capacity(12 + 16 + 1 + host.len());
    let _ = write!(id, "{n:012x}");
    id.push_str(&random_token(16));
    id.push('@');
    id.push_str(host);
    id
}

fn first(headers: &Headers, pred: impl Fn(&Header) -> bool) -> Option<&Header> {
    headers.iter().find(|h| pred(h))
}

/// The first value of the first Via header line (a line may hold several
/// comma-separated Via values), borrowed from the message.
fn top_via_value(headers: &Headers) -> Option<&str> {
    headers.iter().find_map(|h| match h {
        Header::Via(via) => first_via(via.value().trim_ascii()),
        _ => None,
    })
}

/// The first of the comma-separated values of one Via line.
fn first_via(value: &str) -> Option<&str> {
    // Without a quote (nearly always) the first comma ends the value.
    if memchr::memchr(b'"', value.as_bytes()).is_none() {
        return match memchr::memchr(b',', value.as_bytes()) {
            Some(idx) => Some(value[..idx].trim_ascii()).filter(|v| !v.is_empty()),
            None => (!value.is_empty()).then_some(value),
        };
    }
    let (mut in_quotes, mut escaped) = (false, false);
    // Bytes: a multi-byte character never contains an ASCII byte.
    for (idx, ch) in value.bytes().enumerate() {
        if escaped {
            escaped = false;
            continue;
        }
        match ch {
            b'\\' if in_quotes => escaped = true,
            b'"' => in_quotes = !in_quotes,
            b',' if !in_quotes => return Some(value[..idx].trim_ascii()).filter(|v| !v.is_empty()),
            _ => {}
        }
    }
    // An unclosed quote makes the header unusable, like a missing one.
    (!in_quotes && !value.is_empty()).then_some(value)
}

/// A top Via as received: the parts §17 compares, parsed leniently so that an
/// odd transport name or host does not make a message unmatchable.
#[derive(Debug, Clone, Copy)]
struct ViaRef<'a> {
    value: &'a str,
    /// `host[:port]` as written (LWS may surround the ':').
    sent_by: &'a str,
    params: &'a str,
}

impl<'a> ViaRef<'a> {
    fn top(headers: &'a Headers) -> Option<ViaRef<'a>> {
        let value = top_via_value(headers)?;
        // "SIP / 2.0 / UDP host : port ; params": LWS may surround '/', ':' and ';'.
        let (head, params) = msg::split_once_ascii(value, b';').unwrap_or((value, ""));
        let (_protocol, rest) = msg::split_once_ascii(head, b'/')?;
        let (_version, rest) = msg::split_once_ascii(rest, b'/')?;
        let transport_and_host = rest.trim_ascii_start();
        let host_start = transport_and_host.bytes().position(|b| b.is_ascii_whitespace())?;
        let sent_by = &transport_and_host[host_start..];
        if sent_by.trim_ascii().is_empty() {
            return None;
        }
        Some(ViaRef { value, sent_by, params })
    }

    fn branch(&self) -> Option<&'a str> {
        param_value(self.params, "branch")
    }

    /// Compares with an owned [`ViaKey`]: same branch and sent-by.
    fn same_branch_and_sent_by(&self, own: &ViaKey, branch: &str) -> bool {
        own.branch.as_deref() == Some(branch) && own.sent_by.chars().eq(squeezed(self.sent_by))
    }

    /// The RFC 2543 "top Via matches" comparison.
    fn same_value(&self, own: &ViaKey) -> bool {
        own.normalized.chars().eq(squeezed(self.value))
    }
}

/// Whitespace removed, lowercased: how Via parts are compared.
fn squeezed(s: &str) -> impl Iterator<Item = char> + '_ {
    s.chars().filter(|c| !c.is_whitespace()).map(|c| c.to_ascii_lowercase())
}

/// [`squeezed`], collected in one allocation.
fn squeezed_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    out.extend(squeezed(s));
    out
}

/// What §17.2.3 compares of a server transaction's own top Via.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ViaKey {
    /// `host[:port]`, lowercased, whitespace removed.
    sent_by: String,
    branch: Option<String>,
    /// The whole value without whitespace, lowercased: the RFC 2543 "top Via
    /// matches" comparison.
    normalized: String,
}

impl From<ViaRef<'_>> for ViaKey {
    fn from(via: ViaRef<'_>) -> ViaKey {
        ViaKey {
            sent_by: squeezed_string(via.sent_by),
            branch: via.branch().map(str::to_string),
            normalized: squeezed_string(via.value),
        }
    }
}

fn top_via(headers: &Headers) -> Option<ViaKey> {
    ViaRef::top(headers).map(ViaKey::from)
}

/// Value of `name` in a `;a=b;c=d` parameter list (name case-insensitive).
/// Empty values count as absent.
fn param_value<'a>(params: &'a str, name: &str) -> Option<&'a str> {
    msg::split_ascii(params, b';').find_map(|param| {
        let (key, value) = msg::split_once_ascii(param, b'=')?;
        let value = value.trim_ascii();
        (key.trim_ascii().eq_ignore_ascii_case(name) && !value.is_empty()).then_some(value)
    })
}

/// Branch of the top Via of a message: `top_via_branch(&req.headers)`.
pub fn top_via_branch(headers: &Headers) -> Option<&str> {
    ViaRef::top(headers)?.branch()
}

/// Sequence number and method of the CSeq header: `cseq(&resp.headers)`.
pub fn cseq(headers: &Headers) -> Option<(u32, Method)> {
    headers.iter().find_map(|h| match h {
        Header::CSeq(value) => {
            let mut parts = value.value().split_whitespace();
            let seq = parts.next()?.parse().ok()?;
            let method = parts.next()?.parse().ok()?;
            parts.next().is_none().then_some((seq, method))
        }
        _ => None,
    })
}

fn call_id(headers: &Headers) -> Option<&str> {
    headers.iter().find_map(|h| match h {
        Header::CallId(id) => Some(id.value().trim_ascii()),
        _ => None,
    })
}

/// Compares two optional values, treating "both missing" as a mismatch: a
/// request without Call-ID or CSeq matches nothing.
fn same_some<T: PartialEq>(a: Option<T>, b: Option<T>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if a == b)
}

fn same_uri(a: &rsipstack::sip::Uri, b: &rsipstack::sip::Uri) -> bool {
    a == b || a.to_string().eq_ignore_ascii_case(&b.to_string())
}

/// The header parameters of a From/To value: after the `>` of a name-addr,
/// or from the first `;` of a bare addr-spec (§20.10).
fn name_addr_params(value: &str) -> &str {
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in value.char_indices() {
        if in_quotes {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_quotes = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_quotes = true,
            '<' => {
                return match value[i..].find('>') {
                    Some(end) => &value[i + end + 1..],
                    None => "",
                };
            }
            ';' => return &value[i..],
            _ => {}
        }
    }
    ""
}

/// Tag of the From header: `from_tag(&req.headers)`.
pub fn from_tag(headers: &Headers) -> Option<&str> {
    headers.iter().find_map(|h| match h {
        Header::From(from) => Some(param_value(name_addr_params(from.value()), "tag")),
        _ => None,
    })?
}

/// Tag of the To header: `to_tag(&resp.headers)`.
pub fn to_tag(headers: &Headers) -> Option<&str> {
    headers.iter().find_map(|h| match h {
        Header::To(to) => Some(param_value(name_addr_params(to.value()), "tag")),
        _ => None,
    })?
}

/// A response to `req` per §8.2.6: the Via lines in order, From, To (with
/// `to_tag` added when given and the To has none yet), Call-ID, CSeq, and for
/// 101–299 the Record-Route lines (§12.1.1, needed by dialog-creating
/// responses), with `Content-Length: 0`.
///
/// Further headers are pushed onto `headers`. Known names have a typed
/// variant ([`Header::Warning`], [`Header::Reason`], …); anything else is
/// [`Header::Other`]. `rsipstack::sip::headers::make_header(name, value)`
/// picks the right one from a name. A body must come with its
/// Content-Length, which this function sets to 0.
///
/// ```
/// use crossbar::sip::transaction::{make_response, new_tag};
/// use rsipstack::sip::{headers::make_header, Header, Request, StatusCode};
///
/// let req = Request::try_from(
///     "OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:x@y>;tag=1\r\n\
///      To: <sip:a@b>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
/// )
/// .unwrap();
/// let mut resp = make_response(&req, StatusCode::ServiceUnavailable, Some(&new_tag()));
/// resp.headers.push(make_header("Retry-After", "30".into()));
/// resp.headers.push(Header::Other("X-Tenant".into(), "acme".into()));
/// let text = String::from_utf8(resp.to_bytes()).unwrap();
/// assert!(text.starts_with("SIP/2.0 503") && text.contains("Retry-After: 30") && text.contains("X-Tenant: acme"));
/// ```
pub fn make_response(req: &Request, code: StatusCode, to_tag: Option<&str>) -> Response {
    let mut headers = Headers::default();
    for header in req.headers.iter() {
        if matches!(header, Header::Via(_)) {
            headers.push(header.clone());
        }
    }
    if (101..=299).contains(&code.code()) {
        for header in req.headers.iter() {
            if matches!(header, Header::RecordRoute(_)) {
                headers.push(header.clone());
            }
        }
    }
    for header in req.headers.iter() {
        if matches!(header, Header::From(_)) {
            headers.push(header.clone());
            break;
        }
    }
    for header in req.headers.iter() {
        if let Header::To(to) = header {
            let has_tag = param_value(name_addr_params(to.value()), "tag").is_some();
            let base = to.value().trim_end();
            let mut value = String::with_capacity(base.len() + 5 + to_tag.map_or(0, str::len));
            value.push_str(base);
            if let (Some(tag), false) = (to_tag, has_tag) {
                value.push_str(";tag=");
                value.push_str(tag);
            }
            headers.push(Header::To(rsipstack::sip::To::new(value)));
            break;
        }
    }
    for header in req.headers.iter() {
        if matches!(header, Header::CallId(_)) {
            headers.push(header.clone());
            break;
        }
    }
    for header in req.headers.iter() {
        if matches!(header, Header::CSeq(_)) {
            headers.push(header.clone());
            break;
        }
    }
    headers.push(Header::ContentLength(ContentLength::from(0u32)));
    Response {
        status_code: code,
        wire_reason: None,
        version: req.version,
        headers,
        body: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsipstack::sip::{Reason, SipMessage, Warning};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn parse_request(text: &str) -> Request {
        Request::try_from(text.replace('\n', "\r\n").as_str()).expect("test request parses")
    }

    fn parse_response(bytes: &[u8]) -> Response {
        Response::try_from(bytes).expect("transmitted response parses")
    }

    fn request(method: &str, branch: &str, cseq: u32) -> Request {
        parse_request(&format!(
            "{method} sip:bob@biloxi.example.com SIP/2.0
Via: SIP/2.0/UDP pc33.atlanta.example.com:5060;branch={branch}
Via: SIP/2.0/UDP proxy.atlanta.example.com;branch=z9hG4bKproxy
Record-Route: <sip:proxy.atlanta.example.com;lr>
Route: <sip:ss1.biloxi.example.com;lr>
Max-Forwards: 70
From: Alice <sip:alice@atlanta.example.com>;tag=9fxced76sl
To: Bob <sip:bob@biloxi.example.com>
Call-ID: 3848276298220188511@atlanta.example.com
CSeq: {cseq} {method}
Contact: <sip:alice@pc33.atlanta.example.com>
Content-Length: 0

"
        ))
    }

    fn invite() -> Request {
        request("INVITE", "z9hG4bKnashds8", 1)
    }

    fn drain(tx_out: impl FnMut() -> Option<Vec<u8>>) -> Vec<Vec<u8>> {
        std::iter::from_fn(tx_out).collect()
    }

    /// Run `handle_timeout` at every deadline up to `until`, recording at
    /// which offset from `t0` each transmission happened.
    fn run_client(tx: &mut ClientTx, t0: Instant, until: Duration) -> Vec<Duration> {
        let mut sent = Vec::new();
        while let Some(at) = tx.poll_timeout() {
            if at > t0 + until {
                break;
            }
            tx.handle_timeout(at);
            for _ in drain(|| tx.poll_transmit()) {
                sent.push(at - t0);
            }
        }
        sent
    }

    fn run_server(tx: &mut ServerTx, t0: Instant, until: Duration) -> Vec<Duration> {
        let mut sent = Vec::new();
        while let Some(at) = tx.poll_timeout() {
            if at > t0 + until {
                break;
            }
            tx.handle_timeout(at);
            for _ in drain(|| tx.poll_transmit()) {
                sent.push(at - t0);
            }
        }
        sent
    }

    // --- INVITE client -----------------------------------------------------

    #[test]
    fn invite_client_retransmits_on_timer_a_then_times_out_on_b() {
        let t0 = Instant::now();
        let cfg = TimerConfig::default();
        let mut tx = ClientTx::new(invite(), false, &cfg, t0);
        assert_eq!(tx.state(), ClientState::Calling);
        assert_eq!(drain(|| tx.poll_transmit()).len(), 1, "first transmission");
        assert_eq!(tx.poll_timeout(), Some(t0 + ms(500)));
        assert_eq!(tx.deadline(Timer::B), Some(t0 + ms(32_000)));

        tx.handle_timeout(t0 + ms(499));
        assert!(tx.poll_transmit().is_none(), "nothing before T1");

        // A fires at T1, then the interval doubles: 2T1, 4T1, ... (no T2 cap).
        let sent = run_client(&mut tx, t0, ms(31_999));
        assert_eq!(
            sent,
            [500, 1_500, 3_500, 7_500, 15_500, 31_500].map(ms).to_vec()
        );
        assert!(tx.poll_event().is_none());

        tx.handle_timeout(t0 + ms(32_000));
        assert_eq!(tx.poll_event(), Some(ClientEvent::Timeout));
        assert!(tx.poll_transmit().is_none());
        assert!(tx.is_terminated());
        assert_eq!(tx.poll_timeout(), None);
    }

    #[test]
    fn invite_client_on_reliable_transport_never_retransmits() {
        let t0 = Instant::now();
        let mut tx = ClientTx::new(invite(), true, &TimerConfig::default(), t0);
        assert_eq!(drain(|| tx.poll_transmit()).len(), 1);
        assert_eq!(tx.deadline(Timer::A), None);
        assert_eq!(tx.poll_timeout(), Some(t0 + ms(32_000)));
        let sent = run_client(&mut tx, t0, ms(40_000));
        assert!(sent.is_empty());
        assert_eq!(tx.poll_event(), Some(ClientEvent::Timeout));
        assert!(tx.is_terminated());
    }

    #[test]
    fn invite_client_provisional_stops_retransmissions_and_timer_b() {
        let t0 = Instant::now();
        let mut tx = ClientTx::new(invite(), false, &TimerConfig::default(), t0);
        drain(|| tx.poll_transmit());
        let trying = make_response(tx.request(), StatusCode::Trying, None);
        tx.handle_response(trying, t0 + ms(100));
        assert!(
            matches!(tx.poll_event(), Some(ClientEvent::Provisional(r)) if r.status_code == StatusCode::Trying)
        );
        assert_eq!(tx.state(), ClientState::Proceeding);
        assert_eq!(tx.poll_timeout(), None);
        tx.handle_timeout(t0 + ms(60_000));
        assert!(tx.poll_transmit().is_none());
        assert!(tx.poll_event().is_none());

        // Later provisionals still reach the TU.
        let ringing = make_response(tx.request(), StatusCode::Ringing, Some("b1"));
        tx.handle_response(ringing, t0 + ms(61_000));
        assert!(matches!(tx.poll_event(), Some(ClientEvent::Provisional(_))));
    }

    #[test]
    fn lost_invite_retransmission_answered_final_passed_once_and_acked() {
        let t0 = Instant::now();
        let mut tx = ClientTx::new(invite(), false, &TimerConfig::default(), t0);
        let _lost = tx.poll_transmit();
        tx.handle_timeout(t0 + ms(500));
        let retransmitted = tx.poll_transmit().expect("Timer A retransmission");
        assert_eq!(retransmitted, invite().to_bytes());

        let busy = make_response(&invite(), StatusCode::BusyHere, Some("b1"));
        tx.handle_response(busy.clone(), t0 + ms(600));
        assert!(
            matches!(tx.poll_event(), Some(ClientEvent::Final(r)) if r.status_code == StatusCode::BusyHere)
        );
        assert!(tx.poll_event().is_none());
        assert_eq!(tx.state(), ClientState::Completed);

        // §17.1.1.3 ACK.
        let ack_bytes = tx.poll_transmit().expect("ACK for the 486");
        assert!(tx.poll_transmit().is_none());
        let ack = Request::try_from(ack_bytes.as_slice()).unwrap();
        assert_eq!(ack.method, Method::Ack);
        assert_eq!(ack.uri, invite().uri);
        assert_eq!(
            top_via_branch(&ack.headers),
            Some("z9hG4bKnashds8")
        );
        assert_eq!(
            ack.headers
                .iter()
                .filter(|h| matches!(h, Header::Via(_)))
                .count(),
            1
        );
        assert_eq!(cseq(&ack.headers), Some((1, Method::Ack)));
        assert_eq!(to_tag(&ack.headers), Some("b1"));
        assert_eq!(from_tag(&ack.headers), Some("9fxced76sl"));
        assert_eq!(
            call_id(&ack.headers),
            Some("3848276298220188511@atlanta.example.com")
        );
        assert!(ack
            .headers
            .iter()
            .any(|h| matches!(h, Header::Route(r) if r.value().contains("ss1.biloxi"))));
        assert!(!ack
            .headers
            .iter()
            .any(|h| matches!(h, Header::RecordRoute(_) | Header::Contact(_))));

        // The 486 again (our ACK was lost): re-ACK, nothing for the TU.
        tx.handle_response(busy.clone(), t0 + ms(1_100));
        assert_eq!(tx.poll_transmit(), Some(ack_bytes.clone()));
        assert!(tx.poll_event().is_none());

        // No more INVITE retransmissions; Timer D ends it.
        assert_eq!(tx.poll_timeout(), Some(t0 + ms(600) + ms(32_000)));
        let sent = run_client(&mut tx, t0, ms(40_000));
        assert!(sent.is_empty());
        assert!(tx.is_terminated());
        assert!(tx.poll_event().is_none());
    }

    #[test]
    fn invite_client_reliable_non2xx_acks_and_terminates() {
        let t0 = Instant::now();
        let mut tx = ClientTx::new(invite(), true, &TimerConfig::default(), t0);
        drain(|| tx.poll_transmit());
        let busy = make_response(&invite(), StatusCode::BusyHere, Some("b1"));
        tx.handle_response(busy, t0 + ms(10));
        assert!(matches!(tx.poll_event(), Some(ClientEvent::Final(_))));
        let ack = tx.poll_transmit().expect("ACK is sent on TCP too");
        assert!(ack.starts_with(b"ACK "));
        assert!(tx.is_terminated(), "Timer D is zero on reliable transport");
    }

    #[test]
    fn invite_client_2xx_goes_accepted_and_passes_every_2xx() {
        let t0 = Instant::now();
        let mut tx = ClientTx::new(invite(), false, &TimerConfig::default(), t0);
        drain(|| tx.poll_transmit());
        let ok = make_response(&invite(), StatusCode::OK, Some("b1"));
        tx.handle_response(ok.clone(), t0 + ms(200));
        assert!(matches!(tx.poll_event(), Some(ClientEvent::Final(_))));
        assert_eq!(tx.state(), ClientState::Accepted);
        assert!(tx.poll_transmit().is_none(), "the 2xx's ACK is the TU's");

        // RFC 6026: retransmitted 2xx and forked 2xx go to the TU (to re-ACK).
        tx.handle_response(ok, t0 + ms(700));
        assert!(matches!(tx.poll_event(), Some(ClientEvent::Final(_))));
        let forked = make_response(&invite(), StatusCode::OK, Some("b2"));
        tx.handle_response(forked, t0 + ms(800));
        assert!(
            matches!(tx.poll_event(), Some(ClientEvent::Final(r)) if to_tag(&r.headers) == Some("b2"))
        );
        // A late failure is not a final any more.
        tx.handle_response(
            make_response(&invite(), StatusCode::BusyHere, Some("b3")),
            t0 + ms(900),
        );
        assert!(tx.poll_event().is_none());
        assert!(tx.poll_transmit().is_none());

        assert_eq!(
            tx.poll_timeout(),
            Some(t0 + ms(200) + ms(32_000)),
            "Timer M"
        );
        tx.handle_timeout(t0 + ms(32_200));
        assert!(tx.is_terminated());
        assert!(tx.poll_event().is_none());
    }

    #[test]
    fn client_matches_branch_and_cseq_method() {
        let t0 = Instant::now();
        let tx = ClientTx::new(invite(), false, &TimerConfig::default(), t0);
        assert_eq!(tx.branch(), "z9hG4bKnashds8");
        assert!(tx.matches(&make_response(&invite(), StatusCode::Ringing, None)));
        // The CANCEL's 200 shares the branch but not the CSeq method.
        let cancel = request("CANCEL", "z9hG4bKnashds8", 1);
        assert!(!tx.matches(&make_response(&cancel, StatusCode::OK, None)));
        let other = request("INVITE", "z9hG4bKother", 1);
        assert!(!tx.matches(&make_response(&other, StatusCode::OK, None)));
        // Responses that don't match are ignored.
        let mut tx = tx;
        tx.handle_response(make_response(&other, StatusCode::OK, Some("x")), t0);
        assert!(tx.poll_event().is_none());
        assert_eq!(tx.state(), ClientState::Calling);
    }

    #[test]
    fn client_ack_request_is_sent_once_without_transaction() {
        let t0 = Instant::now();
        let mut tx = ClientTx::new(
            request("ACK", "z9hG4bKack2xx", 1),
            false,
            &TimerConfig::default(),
            t0,
        );
        assert!(tx.is_terminated());
        assert_eq!(drain(|| tx.poll_transmit()).len(), 1);
        assert_eq!(tx.poll_timeout(), None);
    }

    // --- non-INVITE client -------------------------------------------------

    #[test]
    fn non_invite_client_timer_e_caps_at_t2_and_f_times_out() {
        let t0 = Instant::now();
        let mut tx = ClientTx::new(
            request("OPTIONS", "z9hG4bKopt", 7),
            false,
            &TimerConfig::default(),
            t0,
        );
        assert_eq!(tx.state(), ClientState::Trying);
        drain(|| tx.poll_transmit());
        let sent = run_client(&mut tx, t0, ms(31_999));
        let expected: Vec<Duration> = [
            500, 1_500, 3_500, 7_500, 11_500, 15_500, 19_500, 23_500, 27_500, 31_500,
        ]
        .map(ms)
        .to_vec();
        assert_eq!(sent, expected, "T1, 2T1, 4T1, then every T2");
        tx.handle_timeout(t0 + ms(32_000));
        assert_eq!(tx.poll_event(), Some(ClientEvent::Timeout));
        assert!(tx.is_terminated());
    }

    #[test]
    fn non_invite_client_proceeding_retransmits_every_t2_then_timer_k() {
        let t0 = Instant::now();
        let bye = request("BYE", "z9hG4bKbye", 2);
        let mut tx = ClientTx::new(bye.clone(), false, &TimerConfig::default(), t0);
        drain(|| tx.poll_transmit());
        tx.handle_timeout(t0 + ms(500)); // E → 1 s interval, next at 1.5 s
        assert_eq!(drain(|| tx.poll_transmit()).len(), 1);
        tx.handle_response(make_response(&bye, StatusCode::Trying, None), t0 + ms(600));
        assert!(matches!(tx.poll_event(), Some(ClientEvent::Provisional(_))));
        assert_eq!(tx.state(), ClientState::Proceeding);
        // The pending E still fires at 1.5 s, then every T2.
        let sent = run_client(&mut tx, t0, ms(10_000));
        assert_eq!(sent, [1_500, 5_500, 9_500].map(ms).to_vec());

        let ok = make_response(&bye, StatusCode::OK, Some("b1"));
        tx.handle_response(ok.clone(), t0 + ms(10_000));
        assert!(matches!(tx.poll_event(), Some(ClientEvent::Final(_))));
        assert_eq!(tx.state(), ClientState::Completed);
        tx.handle_response(ok, t0 + ms(10_500));
        assert!(
            tx.poll_event().is_none(),
            "Completed absorbs retransmitted finals"
        );
        assert!(
            tx.poll_transmit().is_none(),
            "non-INVITE finals are not ACKed"
        );
        assert_eq!(tx.poll_timeout(), Some(t0 + ms(15_000)), "Timer K = T4");
        tx.handle_timeout(t0 + ms(15_000));
        assert!(tx.is_terminated());
    }

    #[test]
    fn non_invite_client_reliable_has_no_timer_e_and_zero_k() {
        let t0 = Instant::now();
        let reg = request("REGISTER", "z9hG4bKreg", 1);
        let mut tx = ClientTx::new(reg.clone(), true, &TimerConfig::default(), t0);
        drain(|| tx.poll_transmit());
        assert_eq!(tx.deadline(Timer::E), None);
        assert_eq!(tx.poll_timeout(), Some(t0 + ms(32_000)));
        tx.handle_response(make_response(&reg, StatusCode::OK, Some("r")), t0 + ms(5));
        assert!(matches!(tx.poll_event(), Some(ClientEvent::Final(_))));
        assert!(tx.is_terminated());
    }

    #[test]
    fn late_handle_timeout_fires_everything_due_in_order() {
        let t0 = Instant::now();
        let mut tx = ClientTx::new(invite(), false, &TimerConfig::default(), t0);
        drain(|| tx.poll_transmit());
        // The actor was stalled: A (0.5 s) fires once, then B ends it.
        tx.handle_timeout(t0 + ms(100_000));
        assert_eq!(drain(|| tx.poll_transmit()).len(), 1);
        assert_eq!(tx.poll_event(), Some(ClientEvent::Timeout));
        assert!(tx.is_terminated());
    }

    #[test]
    fn zero_t1_does_not_loop() {
        let t0 = Instant::now();
        let cfg = TimerConfig {
            t1: Duration::ZERO,
            t2: Duration::ZERO,
            t4: Duration::ZERO,
        };
        let mut tx = ClientTx::new(request("OPTIONS", "z9hG4bKz", 1), false, &cfg, t0);
        // T1 is clamped to 1 ms: each call fires each timer at most once.
        tx.handle_timeout(t0 + ms(10));
        assert_eq!(drain(|| tx.poll_transmit()).len(), 2, "first send + one E");
        assert!(tx.poll_event().is_none());
        tx.handle_timeout(t0 + ms(64));
        assert_eq!(tx.poll_event(), Some(ClientEvent::Timeout));
    }

    // --- INVITE server -----------------------------------------------------

    #[test]
    fn server_invite_2xx_retransmitted_until_ack() {
        let t0 = Instant::now();
        let mut tx = ServerTx::new(invite(), false, &TimerConfig::default(), t0);
        assert_eq!(tx.state(), ServerState::Proceeding);
        assert!(tx.state().can_respond());
        tx.respond(
            make_response(&invite(), StatusCode::Ringing, Some("b1")),
            t0,
        );
        assert_eq!(drain(|| tx.poll_transmit()).len(), 1);
        assert_eq!(tx.poll_timeout(), None, "no timer while ringing");

        let ok = make_response(&invite(), StatusCode::OK, Some("b1"));
        tx.respond(ok.clone(), t0);
        assert_eq!(tx.state(), ServerState::Accepted);
        assert!(!tx.state().can_respond());
        let first = tx.poll_transmit().expect("2xx sent");
        assert_eq!(parse_response(&first).status_code, StatusCode::OK);

        let sent = run_server(&mut tx, t0, ms(16_000));
        assert_eq!(
            sent,
            [500, 1_500, 3_500, 7_500, 11_500, 15_500].map(ms).to_vec(),
            "T1, 2T1, 4T1, then capped at T2"
        );

        // The ACK for a 2xx has its own branch: it matches by dialog.
        let mut ack = request("ACK", "z9hG4bKack2xx", 1);
        ack.headers.retain(|h| !matches!(h, Header::To(_)));
        ack.headers.push(Header::To(rsipstack::sip::To::new(
            "Bob <sip:bob@biloxi.example.com>;tag=b1",
        )));
        assert!(tx.matches(&ack));
        assert_eq!(tx.handle_ack(t0 + ms(16_000)), AckOutcome::Dialog);
        assert_eq!(tx.handle_ack(t0 + ms(16_100)), AckOutcome::Absorbed);

        // No more 2xx, even for a crossing INVITE retransmission, which is
        // still absorbed until Timer L.
        tx.handle_retransmission(t0 + ms(16_200));
        assert!(tx.matches(&invite()));
        let sent = run_server(&mut tx, t0, ms(40_000));
        assert!(sent.is_empty());
        assert!(tx.is_terminated(), "Timer L");
        assert!(tx.poll_event().is_none(), "ACKed: no NoAck");
    }

    #[test]
    fn server_invite_2xx_never_acked_gives_no_ack() {
        let t0 = Instant::now();
        let mut tx = ServerTx::new(invite(), false, &TimerConfig::default(), t0);
        tx.respond(make_response(&invite(), StatusCode::OK, Some("b1")), t0);
        drain(|| tx.poll_transmit());
        let sent = run_server(&mut tx, t0, ms(31_999));
        assert_eq!(sent.len(), 10, "0.5, 1.5, 3.5, 7.5, 11.5 … 31.5 s");
        assert_eq!(sent.last(), Some(&ms(31_500)));
        assert!(tx.poll_event().is_none());
        tx.handle_timeout(t0 + ms(32_000));
        assert_eq!(tx.poll_event(), Some(ServerEvent::NoAck));
        assert!(tx.is_terminated());
        assert!(tx.poll_transmit().is_none());
    }

    #[test]
    fn server_invite_2xx_on_reliable_transport_is_not_retransmitted() {
        let t0 = Instant::now();
        let mut tx = ServerTx::new(invite(), true, &TimerConfig::default(), t0);
        tx.respond(make_response(&invite(), StatusCode::OK, Some("b1")), t0);
        assert_eq!(drain(|| tx.poll_transmit()).len(), 1);
        assert_eq!(tx.poll_timeout(), Some(t0 + ms(32_000)), "only Timer L");
        tx.handle_timeout(t0 + ms(32_000));
        assert_eq!(tx.poll_event(), Some(ServerEvent::NoAck));
    }

    #[test]
    fn server_invite_non2xx_timer_g_until_ack_then_timer_i() {
        let t0 = Instant::now();
        let mut tx = ServerTx::new(invite(), false, &TimerConfig::default(), t0);
        tx.respond(
            make_response(&invite(), StatusCode::BusyHere, Some("b1")),
            t0,
        );
        assert_eq!(tx.state(), ServerState::Completed);
        assert_eq!(drain(|| tx.poll_transmit()).len(), 1);
        let sent = run_server(&mut tx, t0, ms(8_000));
        assert_eq!(sent, [500, 1_500, 3_500, 7_500].map(ms).to_vec());

        // The non-2xx ACK reuses the INVITE's branch (§17.1.1.3).
        let ack = request("ACK", "z9hG4bKnashds8", 1);
        assert!(tx.matches(&ack));
        assert_eq!(tx.handle_ack(t0 + ms(8_000)), AckOutcome::Absorbed);
        assert_eq!(tx.state(), ServerState::Confirmed);
        assert_eq!(tx.handle_ack(t0 + ms(8_100)), AckOutcome::Absorbed);
        assert_eq!(tx.poll_timeout(), Some(t0 + ms(13_000)), "Timer I = T4");
        let sent = run_server(&mut tx, t0, ms(60_000));
        assert!(sent.is_empty(), "G stopped by the ACK");
        assert!(tx.is_terminated());
        assert!(tx.poll_event().is_none());
    }

    #[test]
    fn server_invite_non2xx_timer_h_times_out_with_g_capped_at_t2() {
        let t0 = Instant::now();
        let mut tx = ServerTx::new(invite(), false, &TimerConfig::default(), t0);
        tx.respond(
            make_response(&invite(), StatusCode::Decline, Some("b1")),
            t0,
        );
        drain(|| tx.poll_transmit());
        let sent = run_server(&mut tx, t0, ms(31_999));
        assert_eq!(
            sent,
            [500, 1_500, 3_500, 7_500, 11_500, 15_500, 19_500, 23_500, 27_500, 31_500]
                .map(ms)
                .to_vec()
        );
        tx.handle_timeout(t0 + ms(32_000));
        assert_eq!(tx.poll_event(), Some(ServerEvent::Timeout));
        assert!(tx.is_terminated());
    }

    #[test]
    fn server_reliable_non2xx_ack_terminates_at_once() {
        let t0 = Instant::now();
        let mut tx = ServerTx::new(invite(), true, &TimerConfig::default(), t0);
        tx.respond(
            make_response(&invite(), StatusCode::BusyHere, Some("b1")),
            t0,
        );
        assert_eq!(tx.deadline(Timer::G), None);
        assert_eq!(tx.deadline(Timer::H), Some(t0 + ms(32_000)));
        assert_eq!(tx.handle_ack(t0 + ms(50)), AckOutcome::Absorbed);
        assert!(tx.is_terminated());
    }

    #[test]
    fn server_request_retransmission_resends_last_response() {
        let t0 = Instant::now();
        let mut tx = ServerTx::new(invite(), false, &TimerConfig::default(), t0);
        tx.handle_retransmission(t0);
        assert!(tx.poll_transmit().is_none(), "nothing sent yet");

        tx.respond(make_response(&invite(), StatusCode::Trying, None), t0);
        let trying = tx.poll_transmit().unwrap();
        tx.handle_retransmission(t0 + ms(500));
        assert_eq!(tx.poll_transmit(), Some(trying));

        tx.respond(
            make_response(&invite(), StatusCode::Ringing, Some("b1")),
            t0 + ms(600),
        );
        let ringing = tx.poll_transmit().unwrap();
        tx.handle_retransmission(t0 + ms(1_500));
        assert_eq!(tx.poll_transmit(), Some(ringing));

        tx.respond(
            make_response(&invite(), StatusCode::BusyHere, Some("b1")),
            t0 + ms(2_000),
        );
        let busy = tx.poll_transmit().unwrap();
        tx.handle_retransmission(t0 + ms(2_100));
        assert_eq!(tx.poll_transmit(), Some(busy));
        assert_eq!(tx.last_response().map(|r| r.status_code.code()), Some(486));
    }

    #[test]
    fn server_rejects_responses_its_state_does_not_allow() {
        let t0 = Instant::now();
        let mut tx = ServerTx::new(invite(), false, &TimerConfig::default(), t0);
        let mut odd = make_response(&invite(), StatusCode::OK, Some("b1"));
        odd.status_code = StatusCode::Other(700, "Bogus".into());
        assert_eq!(tx.try_respond(odd, t0), Err(TxError::InvalidStatus(700)));
        tx.respond(
            make_response(&invite(), StatusCode::BusyHere, Some("b1")),
            t0,
        );
        drain(|| tx.poll_transmit());
        let err = tx.try_respond(make_response(&invite(), StatusCode::OK, Some("b1")), t0);
        assert_eq!(
            err,
            Err(TxError::WrongState {
                code: 200,
                state: ServerState::Completed
            })
        );
        assert!(tx.poll_transmit().is_none());
        // A non-INVITE transaction ignores ACKs.
        let mut opt = ServerTx::new(
            request("OPTIONS", "z9hG4bKo", 1),
            false,
            &TimerConfig::default(),
            t0,
        );
        assert_eq!(opt.handle_ack(t0), AckOutcome::Ignored);
    }

    // --- non-INVITE server -------------------------------------------------

    #[test]
    fn non_invite_server_timer_j_absorbs_retransmissions() {
        let t0 = Instant::now();
        let reg = request("REGISTER", "z9hG4bKreg", 3);
        let mut tx = ServerTx::new(reg.clone(), false, &TimerConfig::default(), t0);
        assert_eq!(tx.state(), ServerState::Trying);
        tx.handle_retransmission(t0 + ms(500));
        assert!(tx.poll_transmit().is_none(), "Trying absorbs");

        tx.respond(make_response(&reg, StatusCode::Trying, None), t0 + ms(600));
        assert_eq!(tx.state(), ServerState::Proceeding);
        drain(|| tx.poll_transmit());

        tx.respond(
            make_response(&reg, StatusCode::OK, Some("r1")),
            t0 + ms(1_000),
        );
        assert_eq!(tx.state(), ServerState::Completed);
        let ok = tx.poll_transmit().unwrap();
        assert_eq!(tx.poll_timeout(), Some(t0 + ms(33_000)), "Timer J = 64*T1");
        assert!(
            run_server(&mut tx, t0, ms(32_999)).is_empty(),
            "non-INVITE finals are not retransmitted by timer"
        );

        tx.handle_retransmission(t0 + ms(20_000));
        assert_eq!(tx.poll_transmit(), Some(ok));
        tx.handle_timeout(t0 + ms(33_000));
        assert!(tx.is_terminated());
        assert!(tx.poll_event().is_none());
    }

    #[test]
    fn non_invite_server_reliable_terminates_with_the_final() {
        let t0 = Instant::now();
        let bye = request("BYE", "z9hG4bKbye", 2);
        let mut tx = ServerTx::new(bye.clone(), true, &TimerConfig::default(), t0);
        tx.respond(make_response(&bye, StatusCode::OK, Some("t")), t0);
        assert!(tx.is_terminated());
        assert!(tx.poll_transmit().is_some(), "the final is still queued");
    }

    // --- matching ----------------------------------------------------------

    #[test]
    fn server_matches_ack_invite_cancel_and_branches() {
        let t0 = Instant::now();
        let tx = ServerTx::new(invite(), false, &TimerConfig::default(), t0);
        assert_eq!(tx.branch(), "z9hG4bKnashds8");
        assert!(tx.matches(&invite()), "retransmission");
        assert!(tx.matches(&request("ACK", "z9hG4bKnashds8", 1)));
        let cancel = request("CANCEL", "z9hG4bKnashds8", 1);
        assert!(!tx.matches(&cancel), "CANCEL is its own transaction");
        assert!(tx.matches_cancel(&cancel));
        assert!(!tx.matches_cancel(&request("CANCEL", "z9hG4bKother", 1)));
        assert!(!tx.matches_cancel(&invite()));
        assert!(!tx.matches(&request("INVITE", "z9hG4bKother", 1)));
        assert!(!tx.matches(&request("BYE", "z9hG4bKnashds8", 2)));
        // Same branch from another host: a different transaction.
        let mut elsewhere = invite();
        elsewhere.headers.retain(|h| !matches!(h, Header::Via(_)));
        elsewhere.headers.push_front(Header::Via(Via::new(
            "SIP/2.0/UDP other.example.com:5060;branch=z9hG4bKnashds8",
        )));
        assert!(!tx.matches(&elsewhere));
        // LWS and case in sent-by do not matter.
        let mut spaced = invite();
        spaced.headers.retain(|h| !matches!(h, Header::Via(_)));
        spaced.headers.push_front(Header::Via(Via::new(
            "SIP / 2.0 / UDP PC33.Atlanta.Example.com : 5060 ; branch=z9hG4bKnashds8",
        )));
        assert!(tx.matches(&spaced));

        // A CANCEL transaction matches its own retransmissions.
        let cancel_tx = ServerTx::new(cancel.clone(), false, &TimerConfig::default(), t0);
        assert!(cancel_tx.matches(&cancel));
        assert!(!cancel_tx.matches(&invite()));
        assert!(!cancel_tx.matches_cancel(&cancel));
    }

    #[test]
    fn server_2xx_ack_by_dialog_needs_the_right_to_tag() {
        let t0 = Instant::now();
        let mut tx = ServerTx::new(invite(), false, &TimerConfig::default(), t0);
        let ack = |tag: &str| {
            let mut ack = request("ACK", "z9hG4bKnewbranch", 1);
            ack.headers.retain(|h| !matches!(h, Header::To(_)));
            ack.headers.push(Header::To(rsipstack::sip::To::new(format!(
                "<sip:bob@biloxi.example.com>;tag={tag}"
            ))));
            ack
        };
        assert!(!tx.matches(&ack("b1")), "nothing answered yet");
        tx.respond(make_response(&invite(), StatusCode::OK, Some("b1")), t0);
        assert!(tx.matches(&ack("b1")));
        assert!(!tx.matches(&ack("zz")));
        let mut other_call = ack("b1");
        other_call
            .headers
            .retain(|h| !matches!(h, Header::CallId(_)));
        other_call
            .headers
            .push(Header::CallId(rsipstack::sip::CallId::new("other@x")));
        assert!(!tx.matches(&other_call));
    }

    #[test]
    fn server_matches_rfc2543_requests_without_magic_cookie() {
        let t0 = Instant::now();
        let old = request("INVITE", "1234", 1);
        let mut tx = ServerTx::new(old.clone(), false, &TimerConfig::default(), t0);
        assert!(tx.matches(&old));
        assert!(!tx.matches(&request("INVITE", "1234", 2)), "CSeq differs");
        let mut other_from = old.clone();
        other_from.headers.retain(|h| !matches!(h, Header::From(_)));
        other_from
            .headers
            .push(Header::From(rsipstack::sip::From::new(
                "<sip:alice@atlanta.example.com>;tag=other",
            )));
        assert!(!tx.matches(&other_from));
        assert!(tx.matches_cancel(&request("CANCEL", "1234", 1)));

        tx.respond(make_response(&old, StatusCode::BusyHere, Some("t486")), t0);
        let mut ack = request("ACK", "1234", 1);
        assert!(
            !tx.matches(&ack),
            "ACK must carry the To tag of our response"
        );
        ack.headers.retain(|h| !matches!(h, Header::To(_)));
        ack.headers.push(Header::To(rsipstack::sip::To::new(
            "Bob <sip:bob@biloxi.example.com>;tag=t486",
        )));
        assert!(tx.matches(&ack));
    }

    #[test]
    fn garbage_requests_match_nothing_and_do_not_panic() {
        let t0 = Instant::now();
        let bare = parse_request("OPTIONS sip:x@y SIP/2.0\nContent-Length: 0\n\n");
        let mut tx = ServerTx::new(bare.clone(), false, &TimerConfig::default(), t0);
        assert!(!tx.matches(&bare));
        assert!(!tx.matches_cancel(&bare));
        assert_eq!(tx.branch(), "");
        tx.respond(make_response(&bare, StatusCode::BadRequest, None), t0);
        assert!(tx.poll_transmit().is_some());

        let mut ctx = ClientTx::new(bare.clone(), false, &TimerConfig::default(), t0);
        assert!(!ctx.matches(&make_response(&bare, StatusCode::OK, None)));
        ctx.handle_response(make_response(&bare, StatusCode::OK, None), t0);
        assert!(ctx.poll_event().is_none());

        let weird_via = parse_request(
            "OPTIONS sip:x@y SIP/2.0\nVia: garbage;;;branch\nVia: ,,\nCSeq: abc\nFrom: <sip:a@b;tag=1\nTo: \"unterminated\nContent-Length: 0\n\n",
        );
        assert_eq!(top_via_branch(&weird_via.headers), None);
        assert_eq!(cseq(&weird_via.headers), None);
        assert_eq!(from_tag(&weird_via.headers), None);
        assert_eq!(to_tag(&weird_via.headers), None);
        let tx = ServerTx::new(weird_via.clone(), false, &TimerConfig::default(), t0);
        assert!(!tx.matches(&weird_via));
        let _ = make_response(&weird_via, StatusCode::BadRequest, Some("t"));
    }

    #[test]
    fn ack_never_creates_a_server_transaction() {
        let t0 = Instant::now();
        let tx = ServerTx::new(
            request("ACK", "z9hG4bKa", 1),
            false,
            &TimerConfig::default(),
            t0,
        );
        assert!(tx.is_terminated());
    }

    // --- helpers -----------------------------------------------------------

    #[test]
    fn make_response_copies_headers_per_8_2_6() {
        let req = invite();
        let resp = make_response(&req, StatusCode::Ringing, Some("abc"));
        let vias: Vec<&str> = resp
            .headers
            .iter()
            .filter_map(|h| match h {
                Header::Via(v) => Some(v.value()),
                _ => None,
            })
            .collect();
        assert_eq!(
            vias,
            [
                "SIP/2.0/UDP pc33.atlanta.example.com:5060;branch=z9hG4bKnashds8",
                "SIP/2.0/UDP proxy.atlanta.example.com;branch=z9hG4bKproxy"
            ]
        );
        assert_eq!(to_tag(&resp.headers), Some("abc"));
        assert_eq!(from_tag(&resp.headers), Some("9fxced76sl"));
        assert_eq!(cseq(&resp.headers), Some((1, Method::Invite)));
        assert_eq!(
            call_id(&resp.headers),
            Some("3848276298220188511@atlanta.example.com")
        );
        assert!(resp
            .headers
            .iter()
            .any(|h| matches!(h, Header::RecordRoute(_))));
        assert!(!resp.headers.iter().any(|h| matches!(
            h,
            Header::Route(_) | Header::Contact(_) | Header::MaxForwards(_)
        )));
        assert!(resp
            .headers
            .iter()
            .any(|h| matches!(h, Header::ContentLength(l) if l.value() == "0")));

        // An existing To tag is kept; 100 and failures carry no Record-Route.
        let mut in_dialog = req.clone();
        in_dialog.headers.retain(|h| !matches!(h, Header::To(_)));
        in_dialog.headers.push(Header::To(rsipstack::sip::To::new(
            "<sip:bob@biloxi.example.com>;tag=keep",
        )));
        let resp = make_response(&in_dialog, StatusCode::BusyHere, Some("new"));
        assert_eq!(to_tag(&resp.headers), Some("keep"));
        assert!(!resp
            .headers
            .iter()
            .any(|h| matches!(h, Header::RecordRoute(_))));
        let trying = make_response(&req, StatusCode::Trying, None);
        assert_eq!(to_tag(&trying.headers), None);
        assert!(!trying
            .headers
            .iter()
            .any(|h| matches!(h, Header::RecordRoute(_))));
    }

    #[test]
    fn custom_headers_survive_the_wire() {
        let mut resp = make_response(&invite(), StatusCode::ServiceUnavailable, Some(&new_tag()));
        resp.headers.push(Header::Warning(Warning::new(
            r#"399 crossbar "trunk down""#,
        )));
        resp.headers.push(Header::Reason(Reason::new(
            r#"Q.850;cause=34;text="No circuit""#,
        )));
        resp.headers
            .push(Header::Other("X-Tenant".into(), "acme".into()));
        resp.headers.push(rsipstack::sip::headers::make_header(
            "Retry-After",
            "30".into(),
        ));
        let parsed = match rsipstack::sip::parser::parse_message(&resp.to_bytes()).unwrap() {
            SipMessage::Response(r) => r,
            SipMessage::Request(_) => panic!("expected a response"),
        };
        assert_eq!(parsed.status_code.code(), 503);
        assert!(parsed
            .headers
            .iter()
            .any(|h| matches!(h, Header::Warning(w) if w.value().contains("trunk down"))));
        assert!(parsed
            .headers
            .iter()
            .any(|h| matches!(h, Header::Reason(r) if r.value().contains("cause=34"))));
        assert!(parsed
            .headers
            .iter()
            .any(|h| h.name() == "X-Tenant" && h.value() == "acme"));
        assert!(parsed
            .headers
            .iter()
            .any(|h| matches!(h, Header::RetryAfter(_))));
    }

    #[test]
    fn branches_and_tags_are_fresh() {
        let a = new_branch();
        let b = new_branch();
        assert!(a.starts_with(MAGIC_COOKIE));
        assert_ne!(a, b);
        assert!(a.len() > MAGIC_COOKIE.len() + 16);
        let t = new_tag();
        assert!(t.len() >= 8 && t.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(t, new_tag());
    }

    #[test]
    fn random_tokens_use_all_62_alphanumerics_evenly() {
        let mut counts = std::collections::HashMap::new();
        for _ in 0..2_000 {
            let t = random_token(31);
            assert_eq!(t.len(), 31);
            for c in t.chars() {
                assert!(c.is_ascii_alphanumeric(), "{t}");
                *counts.entry(c).or_insert(0u32) += 1;
            }
        }
        // 62,000 characters: 1,000 expected each; a biased mapping (bytes taken modulo 62
        // without rejection) would give the first 8 characters ~1,230.
        assert_eq!(counts.len(), 62);
        assert!(counts.values().all(|&n| (830..1170).contains(&n)), "{counts:?}");
        let b = new_branch();
        assert_eq!(b.len(), MAGIC_COOKIE.len() + 24);
        assert!(b[MAGIC_COOKIE.len()..].chars().all(|c| c.is_ascii_alphanumeric()));
    }

    #[test]
    fn tokens_that_look_like_a_cseq_header_are_drawn_again() {
        // The To tags of the two calls SIPp aborted in bench/cps.sh runs.
        assert!(!token_is_safe("y0CSeqyugvyc4zdJ"));
        assert!(!token_is_safe("9CSeqyljF8PlmrOM"));
        assert!(!token_is_safe("abcseq"));
        assert!(!token_is_safe("CSEQ"));
        assert!(token_is_safe("TwNaIu7xk0wGQZQ8"));
        assert!(token_is_safe("CSe"));
    }

    #[test]
    fn call_ids_sort_in_creation_order_and_keep_their_randomness() {
        let ids: Vec<String> = (0..200).map(|_| new_call_id("192.0.2.1")).collect();
        for id in &ids {
            let (local, host) = id.split_once('@').expect("Call-ID has an @host");
            assert_eq!(host, "192.0.2.1");
            assert_eq!(local.len(), 28, "{id}");
            assert!(local[..12].chars().all(|c| c.is_ascii_hexdigit()), "{id}");
            assert!(local[12..].chars().all(|c| c.is_ascii_alphanumeric()), "{id}");
        }
        // Consecutive ids of this thread follow each other (other tests may take
        // numbers in between); the 48-bit counter may wrap once, nowhere else.
        let wraps = ids.windows(2).filter(|w| w[1] < w[0]).count();
        assert!(wraps <= 1, "out of order: {ids:?}");
        let randoms: std::collections::HashSet<&str> = ids.iter().map(|id| &id[12..28]).collect();
        assert_eq!(randoms.len(), ids.len(), "the random parts repeat");
    }

    #[test]
    fn tag_parsing_handles_quotes_and_addr_spec() {
        let h = |to: &str| Headers::from(vec![Header::To(rsipstack::sip::To::new(to))]);
        assert_eq!(
            to_tag(&h(r#""a;tag=no <x>" <sip:b@c;tag=uri>;tag=yes"#)),
            Some("yes")
        );
        assert_eq!(to_tag(&h("sip:b@c;TAG=bare")), Some("bare"));
        assert_eq!(to_tag(&h("<sip:b@c;tag=uri-param>")), None);
        assert_eq!(to_tag(&h("<sip:b@c>;tag=")), None);
    }

    // --- two UAs over a lossy network ----------------------------------------

    /// INVITE lost once, 200 lost once: the UAC's retransmission reaches the
    /// UAS, whose 2xx retransmission reaches the UAC, whose ACK stops it.
    #[test]
    fn two_uas_recover_from_lost_invite_and_lost_200() {
        let t0 = Instant::now();
        let cfg = TimerConfig::default();
        let mut uac = ClientTx::new(invite(), false, &cfg, t0);
        let mut uas: Option<ServerTx> = None;
        let mut drop_next_invite = true;
        let mut drop_next_200 = true;
        let mut finals = 0;
        let mut dialog_acks = 0;
        let mut now = t0;
        for _ in 0..100 {
            // UAC → UAS
            while let Some(bytes) = uac.poll_transmit() {
                let req = Request::try_from(bytes.as_slice()).unwrap();
                if std::mem::take(&mut drop_next_invite) {
                    continue;
                }
                match uas.as_mut() {
                    Some(tx) if tx.matches(&req) && req.method == Method::Ack => {
                        if tx.handle_ack(now) == AckOutcome::Dialog {
                            dialog_acks += 1;
                        }
                    }
                    Some(tx) if tx.matches(&req) => tx.handle_retransmission(now),
                    Some(_) => panic!("unmatched request"),
                    None => {
                        let mut tx = ServerTx::new(req.clone(), false, &cfg, now);
                        tx.respond(make_response(&req, StatusCode::OK, Some("b1")), now);
                        uas = Some(tx);
                    }
                }
            }
            // UAS → UAC
            if let Some(tx) = uas.as_mut() {
                while let Some(bytes) = tx.poll_transmit() {
                    if std::mem::take(&mut drop_next_200) {
                        continue;
                    }
                    uac.handle_response(parse_response(&bytes), now);
                }
            }
            while let Some(event) = uac.poll_event() {
                if let ClientEvent::Final(resp) = event {
                    finals += 1;
                    // The TU's ACK for the 2xx: new branch, sent outside the tx.
                    let mut ack = build_ack(uac.request(), &resp);
                    ack.headers.retain(|h| !matches!(h, Header::Via(_)));
                    ack.headers.push_front(Header::Via(Via::new(format!(
                        "SIP/2.0/UDP pc33.atlanta.example.com:5060;branch={}",
                        new_branch()
                    ))));
                    let mut ack_tx = ClientTx::new(ack, false, &cfg, now);
                    while let Some(bytes) = ack_tx.poll_transmit() {
                        let req = Request::try_from(bytes.as_slice()).unwrap();
                        if let Some(tx) = uas.as_mut().filter(|tx| tx.matches(&req)) {
                            if tx.handle_ack(now) == AckOutcome::Dialog {
                                dialog_acks += 1;
                            }
                        }
                    }
                }
            }
            let next = [
                uac.poll_timeout(),
                uas.as_ref().and_then(|tx| tx.poll_timeout()),
            ]
            .into_iter()
            .flatten()
            .min();
            let Some(next) = next else { break };
            now = next;
            uac.handle_timeout(now);
            if let Some(tx) = uas.as_mut() {
                tx.handle_timeout(now);
            }
        }
        assert_eq!(finals, 1, "the 200 reached the TU once");
        assert_eq!(dialog_acks, 1);
        assert!(uac.is_terminated());
        let uas = uas.expect("UAS transaction created");
        assert!(uas.is_terminated());
        assert!(
            now - t0 >= ms(32_000) && now - t0 < ms(34_000),
            "ended by Timers L and M"
        );
    }
}
