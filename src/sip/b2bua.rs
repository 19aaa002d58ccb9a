//! The B2BUA call: two dialogs (leg A towards the caller, leg B towards the
//! callee) joined by crossbar, sans-IO.
//!
//! [`B2bua`] takes messages from either leg and timeouts, each with `now`, and
//! yields [`CallOutput`]s: bytes to send on a leg, media addresses learnt from
//! SDP, and the call's end. It owns its RFC 3261 transactions; the Call actor
//! (`actors::call`) is a thin driver that owns the sockets, the media relay and
//! one timer. Unit tests at the bottom drive it with a virtual clock.
//!
//! **Late offer** (RFC 3261 §13.2.1, RFC 3264): an INVITE without SDP goes on
//! to the callee without SDP; the callee's 2xx carries the offer, which goes
//! to the caller in its 200 (rewritten to crossbar's A-side address), and the
//! caller's ACK carries the answer, which goes to the callee in the ACK of its
//! 2xx (rewritten to crossbar's B-side address). The callee's ACK therefore
//! waits for the caller's: a 2xx the callee retransmits meanwhile is not
//! answered. When the exchange fails (no or unusable SDP in the callee's 2xx
//! or the caller's ACK, or no ACK at all), the callee's 2xx is still ACKed,
//! without a body because there is no answer to give, and a BYE follows at
//! once. SDP in a 18x is not passed to the caller of a late-offer call: it
//! would be the callee's offer in a provisional, which needs 100rel (RFC 3262),
//! and crossbar does not support that.
//!
//! With a WebRTC callee ([`SdpAdapter`]), crossbar makes its own offer to the
//! browser ([`SdpAdapter::late_offer`]); the browser's answer in its 2xx gives
//! the plain offer for the caller (the codec the browser chose), and the
//! caller's answer in its ACK completes the session
//! ([`SdpAdapter::late_answer`]). The browser's 2xx is ACKed at once: it
//! answered crossbar's offer, so its ACK carries nothing. A late-offer INVITE
//! from a browser is refused with 488 (browsers always send an offer).

use super::msg::{self, Incoming, Peer};
use super::sdp::Sdp;
use super::transaction::{new_branch, new_tag, ClientEvent, ClientTx, ServerEvent, ServerTx, TimerConfig};
use crate::media::Side;
use rsipstack::sip::{Method, Request, Response, SipMessage, Uri};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// SDP for calls with a WebRTC leg: the media session rewrites it (str0m for the
/// browser side), synchronously. Plain calls have none and keep the B2BUA's own
/// rewriting ([`Sdp::rewrite_offer`] / [`Sdp::rewrite_answer`]).
pub trait SdpAdapter: Send + Sync + std::fmt::Debug {
    /// `from` sent an offer: the offer to send to the other side (Err: 488 with the text).
    fn offer(&self, from: Side, sdp: &[u8]) -> Result<Vec<u8>, String>;
    /// `from` answered: the answer to send to the other side.
    fn answer(&self, from: Side, sdp: &[u8]) -> Result<Vec<u8>, String>;
    /// The other side's INVITE had no SDP (late offer): crossbar's own offer to
    /// `to`. `to`'s answer then goes to [`SdpAdapter::answer`], which gives the
    /// offer for the late offerer (in the 2xx), whose answer (in its ACK) goes
    /// to [`SdpAdapter::late_answer`]. Err: 488 with the text.
    fn late_offer(&self, to: Side) -> Result<Vec<u8>, String>;
    /// `from` answered, in its ACK, the offer crossbar put in the 2xx of a
    /// late-offer call: nothing goes on to the other side. Err: the call is hung up.
    fn late_answer(&self, from: Side, sdp: &[u8]) -> Result<(), String>;
}

/// Everything a call needs to start, decided by its tenant (routing, caller id).
#[derive(Debug, Clone)]
pub struct CallSetup {
    /// The caller's initial INVITE (validated).
    pub a_invite: Request,
    pub a_peer: Peer,
    /// Request-URI of the INVITE towards the callee.
    pub b_uri: String,
    pub b_peer: Peer,
    /// From and To header values (without tags) of the INVITE towards the callee.
    pub b_from: String,
    pub b_to: String,
    pub b_call_id: String,
    /// crossbar's own address in Via/Contact, per leg: `ip:port`.
    pub a_sent_by: String,
    pub b_sent_by: String,
    /// crossbar's RTP address towards each party.
    pub media_a: SocketAddr,
    pub media_b: SocketAddr,
    pub timers: TimerConfig,
    /// How long the callee may ring before the caller gets 408.
    pub ring_timeout: Duration,
    /// Host named in Warning headers.
    pub server_name: String,
    /// Set when a leg is WebRTC: all SDP goes through it.
    pub sdp_adapter: Option<std::sync::Arc<dyn SdpAdapter>>,
    /// Extra headers of the INVITE towards the callee (e.g. `P-Called-Party-ID`: the DID).
    pub b_extra_headers: Vec<(&'static str, String)>,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum CallOutput {
    Send { side: Side, bytes: Vec<u8> },
    /// A party's media address from its SDP.
    Media { side: Side, rtp: SocketAddr, rtcp: Option<SocketAddr> },
    /// The callee is ringing (first 180/183 passed to the caller).
    Ringing,
    /// The callee answered and the caller got the 2xx.
    Answered,
    /// The call is over as far as the parties are concerned (CDR time). Given once.
    Ended(EndInfo),
}

#[derive(Debug, Clone, PartialEq)]
pub struct EndInfo {
    pub disposition: Disposition,
    /// Final status the caller got (200 for answered calls).
    pub code: u16,
    /// Who hung up an answered call.
    pub hangup_side: Option<Side>,
    pub reason: String,
    pub answered: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Answered,
    Cancelled,
    Busy,
    NoAnswer,
    Failed,
}

impl Disposition {
    pub fn as_str(self) -> &'static str {
        match self {
            Disposition::Answered => "answered",
            Disposition::Cancelled => "cancelled",
            Disposition::Busy => "busy",
            Disposition::NoAnswer => "no-answer",
            Disposition::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// INVITE sent to B, no final yet.
    Calling,
    /// 2xx sent to A; waiting for its ACK.
    Answered,
    Confirmed,
    /// BYE sent or call refused; waiting for transactions to finish.
    Ending,
}

/// One dialog of the call, as crossbar (a UA) sees it.
#[derive(Debug, Clone)]
struct Leg {
    peer: Peer,
    call_id: String,
    /// Our From (B leg) / To (A leg) header value, with our tag.
    local: String,
    /// The other party's header value; gets its tag when known.
    remote: String,
    /// Parsed once when learned; `None` if it did not parse (no request can go to it).
    remote_target: Option<Uri>,
    route_set: Vec<String>,
    local_cseq: u32,
    sent_by: String,
    contact: String,
}

impl Leg {
    fn request(&mut self, method: Method, body: Option<Vec<u8>>, extra: Vec<(&str, String)>) -> Option<Request> {
        if method != Method::Ack && method != Method::Cancel {
            self.local_cseq += 1;
        }
        self.build(method, self.local_cseq, &new_branch(), body, extra)
    }

    fn build(&self, method: Method, cseq: u32, branch: &str, body: Option<Vec<u8>>, extra: Vec<(&str, String)>) -> Option<Request> {
        let mut h: Vec<(&str, String)> = vec![
            ("Via", format!("SIP/2.0/{} {};branch={branch};rport", self.peer.proto.via_name(), self.sent_by)),
            ("Max-Forwards", "70".into()),
            ("From", self.local.clone()),
            ("To", self.remote.clone()),
            ("Call-ID", self.call_id.clone()),
            ("CSeq", format!("{cseq} {method}")),
        ];
        for r in &self.route_set {
            h.push(("Route", r.clone()));
        }
        if method != Method::Ack && method != Method::Cancel {
            h.push(("Contact", self.contact.clone()));
        }
        h.extend(extra);
        let ct = body.as_ref().map(|_| "application/sdp");
        Some(msg::build_request(method, self.remote_target.clone()?, h, ct, body.unwrap_or_default()))
    }

    /// Learns the remote tag, target and route set from a response to our INVITE (§12.1.2).
    fn learn_from_response(&mut self, resp: &Response) {
        if let Some(to) = msg::header(&resp.headers, "To") {
            if msg::param(to, "tag").is_some() {
                self.remote = to.to_string();
            }
        }
        if let Some(c) = msg::header(&resp.headers, "Contact") {
            let uri = msg::name_addr_uri(msg::split_list(c).first().copied().unwrap_or(c));
            if !uri.is_empty() {
                self.remote_target = Uri::try_from(uri).ok();
            }
        }
        let mut rr: Vec<String> = msg::header_values(&resp.headers, "Record-Route").into_iter().map(str::to_string).collect();
        if !rr.is_empty() {
            rr.reverse();
            self.route_set = rr;
        }
    }
}

/// What a client transaction we started is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Bye,
    Cancel,
    /// Forwarded in-dialog request; its response goes to the server tx with this id.
    Relay(u64),
}

struct Client {
    side: Side,
    tx: ClientTx,
    purpose: Purpose,
    done: bool,
}

struct Server {
    id: u64,
    side: Side,
    tx: ServerTx,
    /// A final response was given; kept only to absorb retransmissions until the tx ends.
    answered: bool,
}

pub struct B2bua {
    setup_server: String,
    timers: TimerConfig,
    state: State,
    a: Leg,
    b: Leg,
    a_invite: ServerTx,
    a_invite_final: bool,
    a_acked: bool,
    /// B's INVITE; its request is what a CANCEL and the 2xx's ACK copy from.
    b_invite: ClientTx,
    b_provisional: bool,
    b_answered: bool,
    /// B's INVITE got its final response (or we gave up waiting after a CANCEL).
    b_final: bool,
    /// RFC 3261 §9.1: after CANCEL, wait at most 64*T1 for the INVITE's final response.
    b_give_up_at: Option<Instant>,
    /// ACK sent for B's 2xx, re-sent when the 2xx is retransmitted. In a plain
    /// late-offer call it is built only when A's ACK brings the answer.
    b_ack: Option<Vec<u8>>,
    /// A's INVITE had no SDP: B's 2xx brings the offer, A's ACK the answer.
    late_offer: bool,
    /// Late offer: A got the offer in its 200 and its ACK must bring the answer.
    a_answer_due: bool,
    cancel_pending: bool,
    ringing_reported: bool,
    clients: Vec<Client>,
    servers: Vec<Server>,
    next_id: u64,
    media_a: SocketAddr,
    media_b: SocketAddr,
    ring_deadline: Option<Instant>,
    /// When A gets a 100 Trying if it has had no response by then (see [`TRYING_DELAY`]).
    trying_at: Option<Instant>,
    out: VecDeque<CallOutput>,
    ended: Option<EndInfo>,
    sdp_adapter: Option<std::sync::Arc<dyn SdpAdapter>>,
}

/// Why a call could not even start; the caller gets this status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: u16,
    pub reason: String,
}

/// A caller's INVITE is answered 100 Trying only when the callee has not rung or
/// answered within this time. RFC 3261 §17.2.1 requires the 100 when the TU will not
/// send a provisional within 200 ms, and leaves it out otherwise: most callees ring
/// within milliseconds, and their 180 stops the caller's retransmissions just the
/// same, so a call is spared a message each way. Well under 200 ms, so that a busy
/// node still sends it in time.
pub const TRYING_DELAY: Duration = Duration::from_millis(100);

impl B2bua {
    /// Starts the call: sends the INVITE to B (A gets 100 Trying only if B has not
    /// rung or answered within [`TRYING_DELAY`]). The setup is only read: on a
    /// refusal its caller still has it to answer A.
    pub fn new(setup: &CallSetup, now: Instant) -> Result<B2bua, Refusal> {
        let a_req = &setup.a_invite;
        let late_offer = a_req.body.is_empty();
        let (offer_b, a_media) = match &setup.sdp_adapter {
            Some(adapter) if late_offer => {
                let offer = adapter.late_offer(Side::B).map_err(|e| Refusal { code: 488, reason: format!("late offer (INVITE without SDP) not possible on this call: {e}") })?;
                (Some(offer), None)
            }
            Some(adapter) => (Some(adapter.offer(Side::A, &a_req.body).map_err(|e| Refusal { code: 488, reason: format!("SDP offer not acceptable: {e}") })?), None),
            // Late offer: B's 2xx will carry the offer (RFC 3261 §13.2.1).
            None if late_offer => (None, None),
            None => {
                let sdp_a = Sdp::parse(&a_req.body).map_err(|e| Refusal { code: 488, reason: format!("invalid SDP offer: {e}") })?;
                let offer = sdp_a.rewrite_offer(setup.media_b).map_err(|e| Refusal { code: 488, reason: format!("SDP offer not acceptable: {e}") })?;
                (Some(offer), sdp_a.audio_rtp().map(|rtp| (rtp, sdp_a.audio_rtcp())))
            }
        };

        let hv = |n: &str| msg::header(&a_req.headers, n).unwrap_or("").to_string();
        let a_tag = new_tag();
        let a_contact_uri = msg::header(&a_req.headers, "Contact")
            .map(|c| msg::name_addr_uri(msg::split_list(c).first().copied().unwrap_or(c)).to_string())
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| msg::name_addr_uri(&hv("From")).to_string());
        let a = Leg {
            peer: setup.a_peer,
            call_id: hv("Call-ID").trim().to_string(),
            local: msg::with_tag(&hv("To"), &a_tag),
            remote: hv("From"),
            remote_target: Uri::try_from(a_contact_uri.as_str()).ok(),
            route_set: msg::header_values(&a_req.headers, "Record-Route").into_iter().map(str::to_string).collect(),
            local_cseq: 0,
            sent_by: setup.a_sent_by.clone(),
            contact: format!("<sip:crossbar@{};transport={}>", setup.a_sent_by, setup.a_peer.proto.param()),
        };
        let mut b = Leg {
            peer: setup.b_peer,
            call_id: setup.b_call_id.clone(),
            local: msg::with_tag(&setup.b_from, &new_tag()),
            remote: setup.b_to.clone(),
            remote_target: Uri::try_from(setup.b_uri.as_str()).ok(),
            route_set: Vec::new(),
            local_cseq: 0,
            sent_by: setup.b_sent_by.clone(),
            contact: format!("<sip:crossbar@{};transport={}>", setup.b_sent_by, setup.b_peer.proto.param()),
        };
        let max_fwd = msg::header(&a_req.headers, "Max-Forwards").and_then(|v| v.trim().parse::<u32>().ok()).unwrap_or(70).clamp(1, 71) - 1;
        let mut extra = vec![("Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE".to_string())];
        extra.extend(setup.b_extra_headers.iter().cloned());
        let mut b_req = b
            .request(Method::Invite, offer_b, extra)
            .ok_or_else(|| Refusal { code: 500, reason: format!("cannot build an INVITE for {}", setup.b_uri) })?;
        msg::replace(&mut b_req.headers, "Max-Forwards", max_fwd.to_string());

        let a_invite = ServerTx::new(a_req.clone(), setup.a_peer.proto.reliable(), &setup.timers, now);
        let b_invite = ClientTx::new(b_req, setup.b_peer.proto.reliable(), &setup.timers, now);

        let mut call = B2bua {
            setup_server: setup.server_name.clone(),
            timers: setup.timers,
            state: State::Calling,
            a,
            b,
            a_invite,
            a_invite_final: false,
            a_acked: false,
            b_invite,
            b_provisional: false,
            b_answered: false,
            b_final: false,
            b_give_up_at: None,
            b_ack: None,
            late_offer,
            a_answer_due: false,
            cancel_pending: false,
            ringing_reported: false,
            clients: Vec::new(),
            servers: Vec::new(),
            next_id: 0,
            media_a: setup.media_a,
            media_b: setup.media_b,
            ring_deadline: Some(now + setup.ring_timeout),
            trying_at: Some(now + TRYING_DELAY),
            out: VecDeque::new(),
            ended: None,
            sdp_adapter: setup.sdp_adapter.clone(),
        };
        if let Some((rtp, rtcp)) = a_media {
            call.out.push_back(CallOutput::Media { side: Side::A, rtp, rtcp });
        }
        call.pump(now);
        Ok(call)
    }

    /// A message from one of the legs (the driver tells which, by Call-ID).
    pub fn handle_message(&mut self, side: Side, m: Incoming, now: Instant) {
        match m.msg {
            SipMessage::Request(req) => self.on_request(side, req, now),
            SipMessage::Response(resp) => self.on_response(side, resp, now),
        }
        self.pump(now);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.a_invite.handle_timeout(now);
        self.b_invite.handle_timeout(now);
        for c in &mut self.clients {
            c.tx.handle_timeout(now);
        }
        for s in &mut self.servers {
            s.tx.handle_timeout(now);
        }
        if self.b_give_up_at.is_some_and(|d| d <= now) {
            self.b_give_up_at = None;
            self.b_final = true;
        }
        if self.trying_at.is_some_and(|d| d <= now) {
            self.trying_at = None;
            if self.a_invite.last_response().is_none() && !self.a_invite.is_terminated() {
                let trying = msg::response_to(self.a_invite.request(), 100, None);
                self.a_invite.respond(trying, now);
            }
        }
        if self.ring_deadline.is_some_and(|d| d <= now) {
            self.ring_deadline = None;
            if self.state == State::Calling && !self.a_invite_final {
                self.fail_a(408, "the callee did not answer in time", now);
                self.cancel_b(now);
                self.end(Disposition::NoAnswer, 408, None, "ring timeout");
            }
        }
        self.pump(now);
    }

    /// Ends the call from outside (shutdown, supervisor clean-up, admin): BYE to
    /// answered legs, error to an unanswered caller, CANCEL to a ringing callee.
    pub fn hangup(&mut self, reason: &str, now: Instant) {
        match self.state {
            State::Calling => {
                if !self.a_invite_final {
                    self.fail_a(503, reason, now);
                }
                self.cancel_b(now);
                self.end(Disposition::Failed, 503, None, reason);
            }
            State::Answered | State::Confirmed => {
                self.send_bye(Side::A, now);
                self.send_bye(Side::B, now);
                self.end(Disposition::Answered, 200, None, reason);
                self.state = State::Ending;
            }
            State::Ending => {}
        }
        self.pump(now);
    }

    pub fn poll_output(&mut self) -> Option<CallOutput> {
        self.out.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next = self.ring_deadline.filter(|_| self.state == State::Calling);
        if let Some(g) = self.b_give_up_at {
            next = Some(next.map_or(g, |n| n.min(g)));
        }
        if let Some(t) = self.trying_at.filter(|_| self.a_invite.last_response().is_none()) {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        let mut take = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n: Instant| n.min(t)));
            }
        };
        take(self.a_invite.poll_timeout());
        take(self.b_invite.poll_timeout());
        for c in &self.clients {
            take(c.tx.poll_timeout());
        }
        for s in &self.servers {
            take(s.tx.poll_timeout());
        }
        next
    }

    /// The call is over and nothing is left that needs an answer: the actor may stop.
    pub fn is_finished(&self) -> bool {
        self.ended.is_some()
            && self.state == State::Ending
            && self.clients.iter().all(|c| c.done)
            && (self.a_acked || self.a_invite.is_terminated() || !self.a_invite_final)
            && (self.b_final || self.b_invite.is_terminated())
    }

    pub fn ended(&self) -> Option<&EndInfo> {
        self.ended.as_ref()
    }

    pub fn call_ids(&self) -> (&str, &str) {
        (&self.a.call_id, &self.b.call_id)
    }

    fn leg(&mut self, side: Side) -> &mut Leg {
        match side {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        }
    }

    fn on_request(&mut self, side: Side, req: Request, now: Instant) {
        // The initial INVITE's transaction: retransmissions, ACK for non-2xx, ACK for 2xx.
        if side == Side::A {
            if req.method == Method::Invite && self.a_invite.matches(&req) {
                self.a_invite.handle_retransmission(now);
                return;
            }
            if req.method == Method::Ack {
                let cseq = msg::header(&req.headers, "CSeq").and_then(msg::parse_cseq).map(|c| c.0);
                let initial_cseq = msg::header(&self.a_invite.request().headers, "CSeq").and_then(msg::parse_cseq).map(|c| c.0);
                if self.a_invite.matches(&req) || cseq == initial_cseq {
                    self.a_invite.handle_ack(now);
                    self.a_acked = true;
                    if self.state == State::Answered {
                        self.state = State::Confirmed;
                    }
                    if self.a_answer_due {
                        self.a_answer_due = false;
                        self.on_late_answer(&req, now);
                    }
                    return;
                }
            }
            if req.method == Method::Cancel {
                self.on_cancel(req, now);
                return;
            }
        }
        // Retransmission of an in-dialog request we already have?
        if let Some(s) = self.servers.iter_mut().find(|s| s.side == side && s.tx.matches(&req)) {
            if req.method == Method::Ack {
                s.tx.handle_ack(now);
                // ACK for a relayed re-INVITE's 2xx: crossbar ACKed the other side itself.
            } else {
                s.tx.handle_retransmission(now);
            }
            return;
        }
        if req.method == Method::Ack {
            return; // stray ACK: nothing to do (RFC 3261 §17.2.3 — no response to ACK)
        }
        let in_dialog = matches!(self.state, State::Answered | State::Confirmed);
        let id = self.next_id;
        self.next_id += 1;
        let mut tx = ServerTx::new(req.clone(), self.leg(side).peer.proto.reliable(), &self.timers, now);
        match req.method {
            Method::Bye => {
                if !(in_dialog || (side == Side::B && self.b_answered)) {
                    let r = msg::refusal(&req, 481, None, &self.setup_server, "no such dialog (not answered yet)");
                    tx.respond(r, now);
                    self.servers.push(Server { id, side, tx, answered: true });
                    return;
                }
                tx.respond(msg::response_to(&req, 200, None), now);
                self.servers.push(Server { id, side, tx, answered: true });
                if side == Side::B {
                    // Late offer, A's answer not in yet: B's 2xx is still ACKed.
                    self.ack_b(None);
                }
                if self.state != State::Ending {
                    let other = other(side);
                    self.send_bye(other, now);
                    self.state = State::Ending;
                    self.end(Disposition::Answered, 200, Some(side), "BYE");
                }
            }
            _ if !in_dialog => {
                let r = msg::refusal(&req, if side == Side::B { 481 } else { 491 }, None, &self.setup_server, "the call is not established");
                tx.respond(r, now);
                self.servers.push(Server { id, side, tx, answered: true });
            }
            _ => {
                if self.state == State::Ending {
                    tx.respond(msg::refusal(&req, 481, None, &self.setup_server, "the call is ending"), now);
                    self.servers.push(Server { id, side, tx, answered: true });
                    return;
                }
                let pending_invite = self.servers.iter().any(|s| !s.answered && s.tx.request().method == Method::Invite);
                if req.method == Method::Invite && pending_invite {
                    // RFC 3261 §14.2: an INVITE while another is in progress gets 491.
                    tx.respond(msg::refusal(&req, 491, None, &self.setup_server, "another re-INVITE is in progress"), now);
                    self.servers.push(Server { id, side, tx, answered: true });
                    return;
                }
                self.relay_request(side, id, tx, req, now);
            }
        }
    }

    /// Forwards an in-dialog request (re-INVITE, UPDATE, INFO, ...) to the other leg.
    fn relay_request(&mut self, side: Side, id: u64, mut tx: ServerTx, req: Request, now: Instant) {
        let to = other(side);
        let mut body = None;
        if !req.body.is_empty() && is_sdp(&req) && self.sdp_adapter.is_some() {
            let adapter = self.sdp_adapter.clone().expect("checked");
            match adapter.offer(side, &req.body) {
                Ok(b) => body = Some(b),
                Err(e) => {
                    tx.respond(msg::refusal(&req, 488, None, &self.setup_server, &format!("SDP not acceptable: {e}")), now);
                    self.servers.push(Server { id, side, tx, answered: true });
                    return;
                }
            }
        } else if !req.body.is_empty() && is_sdp(&req) {
            match Sdp::parse(&req.body).and_then(|sdp| {
                let local = self.local_media(to);
                let rewritten = sdp.rewrite_offer(local)?;
                Ok((sdp, rewritten))
            }) {
                Ok((sdp, rewritten)) => {
                    if let Some(rtp) = sdp.audio_rtp() {
                        self.out.push_back(CallOutput::Media { side, rtp, rtcp: sdp.audio_rtcp() });
                    }
                    body = Some(rewritten);
                }
                Err(e) => {
                    tx.respond(msg::refusal(&req, 488, None, &self.setup_server, &format!("SDP not acceptable: {e}")), now);
                    self.servers.push(Server { id, side, tx, answered: true });
                    return;
                }
            }
        }
        let mut extra = Vec::new();
        let mut passthrough_body = None;
        if body.is_none() && !req.body.is_empty() {
            if let Some(ct) = msg::header(&req.headers, "Content-Type") {
                extra.push(("Content-Type", ct.to_string()));
            }
            passthrough_body = Some(req.body.clone());
        }
        for name in ["Event", "Subscription-State", "Info-Package", "Reason"] {
            if let Some(v) = msg::header(&req.headers, name) {
                extra.push((leak_name(name), v.to_string()));
            }
        }
        let method = req.method;
        let leg = self.leg(to);
        let out_req = match passthrough_body {
            Some(b) => leg.request(method, None, extra).map(|mut r| {
                let ct = msg::header(&req.headers, "Content-Type").map(str::to_string);
                msg::set_body(&mut r.headers, &mut r.body, ct.as_deref(), b);
                r
            }),
            None => leg.request(method, body, extra),
        };
        let Some(out_req) = out_req else {
            tx.respond(msg::refusal(&req, 500, None, &self.setup_server, "cannot build the forwarded request"), now);
            self.servers.push(Server { id, side, tx, answered: true });
            return;
        };
        let reliable = self.leg(to).peer.proto.reliable();
        let ctx = ClientTx::new(out_req, reliable, &self.timers, now);
        self.clients.push(Client { side: to, tx: ctx, purpose: Purpose::Relay(id), done: false });
        self.servers.push(Server { id, side, tx, answered: false });
    }

    fn on_cancel(&mut self, req: Request, now: Instant) {
        let id = self.next_id;
        self.next_id += 1;
        let mut tx = ServerTx::new(req.clone(), self.a.peer.proto.reliable(), &self.timers, now);
        if !self.a_invite.matches_cancel(&req) {
            tx.respond(msg::refusal(&req, 481, None, &self.setup_server, "no transaction matches this CANCEL"), now);
            self.servers.push(Server { id, side: Side::A, tx, answered: true });
            return;
        }
        tx.respond(msg::response_to(&req, 200, None), now);
        self.servers.push(Server { id, side: Side::A, tx, answered: true });
        if self.a_invite_final {
            return; // RFC 3261 §9.2: CANCEL after the final response has no effect.
        }
        self.fail_a(487, "cancelled by the caller", now);
        self.cancel_b(now);
        self.end(Disposition::Cancelled, 487, Some(Side::A), "CANCEL");
    }

    fn on_response(&mut self, side: Side, resp: Response, now: Instant) {
        if side == Side::B && self.b_invite.matches(&resp) {
            self.b_invite.handle_response(resp, now);
            return;
        }
        if let Some(c) = self.clients.iter_mut().find(|c| c.side == side && c.tx.matches(&resp)) {
            c.tx.handle_response(resp, now);
        }
    }

    /// Drains every transaction's output and events until nothing moves.
    fn pump(&mut self, now: Instant) {
        loop {
            let mut progressed = false;
            while let Some(bytes) = self.a_invite.poll_transmit() {
                self.out.push_back(CallOutput::Send { side: Side::A, bytes });
            }
            while let Some(ev) = self.a_invite.poll_event() {
                progressed = true;
                match ev {
                    ServerEvent::NoAck => {
                        // The caller never ACKed our 2xx: the dialog is dead (§13.3.1.4).
                        self.a_acked = true;
                        if self.state != State::Ending {
                            self.send_bye(Side::A, now);
                            self.send_bye(Side::B, now);
                            self.state = State::Ending;
                            self.end(Disposition::Answered, 200, None, "no ACK from the caller");
                        }
                    }
                    ServerEvent::Timeout => self.a_acked = true,
                }
            }
            while let Some(bytes) = self.b_invite.poll_transmit() {
                self.out.push_back(CallOutput::Send { side: Side::B, bytes });
            }
            let mut events = Vec::new();
            while let Some(ev) = self.b_invite.poll_event() {
                events.push(ev);
            }
            for ev in events {
                progressed = true;
                self.on_b_invite_event(ev, now);
            }
            let mut i = 0;
            while i < self.clients.len() {
                let side = self.clients[i].side;
                while let Some(bytes) = self.clients[i].tx.poll_transmit() {
                    self.out.push_back(CallOutput::Send { side, bytes });
                }
                let mut events = Vec::new();
                while let Some(ev) = self.clients[i].tx.poll_event() {
                    events.push(ev);
                }
                if self.clients[i].tx.is_terminated() {
                    self.clients[i].done = true;
                }
                for ev in events {
                    progressed = true;
                    self.on_client_event(i, ev, now);
                }
                i += 1;
            }
            for s in &mut self.servers {
                while let Some(bytes) = s.tx.poll_transmit() {
                    self.out.push_back(CallOutput::Send { side: s.side, bytes });
                }
                while s.tx.poll_event().is_some() {}
            }
            // Forget finished transactions so a long call does not grow.
            self.clients.retain(|c| !(c.done && c.tx.is_terminated()));
            self.servers.retain(|s| !s.tx.is_terminated());
            if !progressed {
                break;
            }
        }
    }

    fn on_b_invite_event(&mut self, ev: ClientEvent, now: Instant) {
        match ev {
            ClientEvent::Provisional(resp) => {
                let code = u16::from(resp.status_code.clone());
                if code == 100 {
                    return;
                }
                self.b_provisional = true;
                self.b.learn_from_response(&resp);
                if self.cancel_pending {
                    self.cancel_pending = false;
                    self.send_cancel_b(now);
                    return;
                }
                if self.a_invite_final {
                    return;
                }
                let mut r = self.response_for_a(code);
                // In a late-offer call this SDP would be B's offer in a provisional:
                // only reliable provisionals (100rel, RFC 3262) may carry it.
                if !self.late_offer && !resp.body.is_empty() && is_sdp_resp(&resp) {
                    match self.answer_sdp(&resp.body) {
                        Ok(body) => msg::set_body(&mut r.headers, &mut r.body, Some("application/sdp"), body),
                        Err(e) => tracing::debug!("dropping unusable early-media SDP: {e}"),
                    }
                }
                self.a_invite.respond(r, now);
                if !self.ringing_reported {
                    self.ringing_reported = true;
                    self.out.push_back(CallOutput::Ringing);
                }
            }
            ClientEvent::Final(resp) => {
                self.b_final = true;
                self.b_give_up_at = None;
                let code = u16::from(resp.status_code.clone());
                if (200..300).contains(&code) {
                    self.on_b_answer(resp, now);
                } else if !self.a_invite_final && self.ended.is_none() {
                    // Pass the callee's refusal on (3xx would need a redirect we do not follow: 480).
                    let (a_code, disp) = match code {
                        486 | 600 => (486, Disposition::Busy),
                        487 => (487, Disposition::Cancelled),
                        408 | 480 => (480, Disposition::NoAnswer),
                        300..=399 => (480, Disposition::Failed),
                        c => (c, Disposition::Failed),
                    };
                    let reason = resp.reason_phrase().unwrap_or("").to_string();
                    self.fail_a(a_code, &format!("callee answered {code} {reason}"), now);
                    self.end(disp, a_code, Some(Side::B), &format!("callee {code}"));
                }
            }
            ClientEvent::Timeout => {
                self.b_final = true;
                if !self.a_invite_final && self.ended.is_none() {
                    self.fail_a(408, "the callee did not respond", now);
                    self.end(Disposition::NoAnswer, 408, None, "INVITE timeout (Timer B)");
                }
            }
        }
    }

    fn on_b_answer(&mut self, resp: Response, now: Instant) {
        if self.b_answered {
            // Retransmitted 2xx: the same ACK again (none yet while a late
            // offer waits for A's answer).
            if let Some(ack) = &self.b_ack {
                self.out.push_back(CallOutput::Send { side: Side::B, bytes: ack.clone() });
            }
            return;
        }
        self.b_answered = true;
        self.b.learn_from_response(&resp);
        if self.a_invite_final || self.ended.is_some() {
            // CANCEL raced the answer (or the call was refused meanwhile): hang the callee up.
            self.send_bye(Side::B, now);
            self.state = State::Ending;
            return;
        }
        let mut r = self.response_for_a(200);
        if self.late_offer {
            match self.late_offer_for_a(&resp) {
                Ok(offer) => {
                    msg::set_body(&mut r.headers, &mut r.body, Some("application/sdp"), offer);
                    self.a_answer_due = true;
                    if self.sdp_adapter.is_some() {
                        // The browser answered crossbar's own offer: its ACK carries nothing.
                        self.ack_b(None);
                    }
                }
                Err(why) => {
                    self.fail_a(488, &why, now);
                    self.send_bye_because(Side::B, 488, &why, now);
                    self.state = State::Ending;
                    self.end(Disposition::Failed, 488, Some(Side::B), &why);
                    return;
                }
            }
        } else {
            self.ack_b(None);
            if !resp.body.is_empty() {
                match self.answer_sdp(&resp.body) {
                    Ok(body) => msg::set_body(&mut r.headers, &mut r.body, Some("application/sdp"), body),
                    Err(e) => {
                        let why = format!("callee answered with unusable SDP: {e}");
                        self.fail_a(488, &why, now);
                        self.send_bye(Side::B, now);
                        self.state = State::Ending;
                        self.end(Disposition::Failed, 488, Some(Side::B), &why);
                        return;
                    }
                }
            }
        }
        self.a_invite.respond(r, now);
        self.a_invite_final = true;
        self.state = State::Answered;
        self.out.push_back(CallOutput::Answered);
    }

    /// Late offer: B's 2xx → the offer for A's 200. Plain: B's offer rewritten
    /// to crossbar's A-side address. WebRTC: the browser's answer to crossbar's
    /// offer gives crossbar's plain offer to A.
    fn late_offer_for_a(&mut self, resp: &Response) -> Result<Vec<u8>, String> {
        if resp.body.is_empty() || !is_sdp_resp(resp) {
            return Err("late offer: the callee's 200 OK has no SDP offer".into());
        }
        if let Some(adapter) = &self.sdp_adapter {
            return adapter.answer(Side::B, &resp.body).map_err(|e| format!("late offer: the callee's SDP is not usable: {e}"));
        }
        let sdp = Sdp::parse(&resp.body).map_err(|e| format!("late offer: the callee's SDP offer is invalid: {e}"))?;
        let offer = sdp.rewrite_offer(self.media_a).map_err(|e| format!("late offer: the callee's SDP offer is not acceptable: {e}"))?;
        if let Some(rtp) = sdp.audio_rtp() {
            self.out.push_back(CallOutput::Media { side: Side::B, rtp, rtcp: sdp.audio_rtcp() });
        }
        Ok(offer)
    }

    /// Late offer: A's ACK to the 200 that carried the offer must bring the
    /// answer, which B gets in the ACK of its 2xx (plain calls). Without a
    /// usable answer both legs are hung up.
    fn on_late_answer(&mut self, ack: &Request, now: Instant) {
        if self.ended.is_some() {
            return;
        }
        let result = if ack.body.is_empty() || !has_sdp_type(&ack.headers) {
            Err("late offer: the caller's ACK has no SDP answer".to_string())
        } else if let Some(adapter) = &self.sdp_adapter {
            adapter.late_answer(Side::A, &ack.body).map(|()| None).map_err(|e| format!("late offer: the caller's SDP answer is not usable: {e}"))
        } else {
            Sdp::parse(&ack.body)
                .and_then(|sdp| Ok((sdp.rewrite_answer(self.media_b)?, sdp)))
                .map(|(answer, sdp)| {
                    if let Some(rtp) = sdp.audio_rtp() {
                        self.out.push_back(CallOutput::Media { side: Side::A, rtp, rtcp: sdp.audio_rtcp() });
                    }
                    Some(answer)
                })
                .map_err(|e| format!("late offer: the caller's SDP answer is not acceptable: {e}"))
        };
        match result {
            Ok(answer) => self.ack_b(answer),
            Err(why) => {
                tracing::debug!("{why}");
                self.send_bye_because(Side::A, 488, &why, now);
                self.send_bye_because(Side::B, 488, &why, now);
                self.end(Disposition::Failed, 200, None, &why);
            }
        }
    }

    /// ACKs B's 2xx (RFC 3261 §13.2.2.4) once, with `answer` as its body;
    /// retransmitted 2xx get the same ACK again. Nothing before the 2xx.
    fn ack_b(&mut self, answer: Option<Vec<u8>>) {
        if !self.b_answered || self.b_ack.is_some() {
            return;
        }
        let cseq = msg::header(&self.b_invite.request().headers, "CSeq").and_then(msg::parse_cseq).map(|c| c.0).unwrap_or(1);
        self.b_ack = self.b.build(Method::Ack, cseq, &new_branch(), answer, vec![]).map(|r| msg::request_bytes(&r));
        if let Some(ack) = &self.b_ack {
            self.out.push_back(CallOutput::Send { side: Side::B, bytes: ack.clone() });
        }
    }

    fn on_client_event(&mut self, i: usize, ev: ClientEvent, now: Instant) {
        let purpose = self.clients[i].purpose;
        let side = self.clients[i].side;
        let (resp, final_) = match ev {
            ClientEvent::Provisional(r) => (Some(r), false),
            ClientEvent::Final(r) => (Some(r), true),
            ClientEvent::Timeout => (None, true),
        };
        if final_ {
            self.clients[i].done = true;
        }
        let Purpose::Relay(id) = purpose else { return };
        let code = resp.as_ref().map(|r| u16::from(r.status_code.clone())).unwrap_or(408);
        if code == 100 {
            return;
        }
        let is_2xx = (200..300).contains(&code);
        if is_2xx && self.clients[i].tx.request().method == Method::Invite {
            // ACK the relayed re-INVITE's 2xx ourselves; the originator's ACK ends at us.
            if let Some(r) = &resp {
                let cseq = msg::header(&r.headers, "CSeq").and_then(msg::parse_cseq).map(|c| c.0).unwrap_or(0);
                if let Some(ack) = self.leg(side).build(Method::Ack, cseq, &new_branch(), None, vec![]) {
                    self.out.push_back(CallOutput::Send { side, bytes: msg::request_bytes(&ack) });
                }
            }
        }
        let Some(pos) = self.servers.iter().position(|s| s.id == id) else { return };
        if self.servers[pos].answered {
            return;
        }
        let orig_side = self.servers[pos].side;
        let req = self.servers[pos].tx.request().clone();
        let mut out = msg::response_to(&req, code, None);
        if let Some(r) = &resp {
            if !r.body.is_empty() && is_sdp_resp(r) && self.sdp_adapter.is_some() {
                let adapter = self.sdp_adapter.clone().expect("checked");
                match adapter.answer(side, &r.body) {
                    Ok(body) => msg::set_body(&mut out.headers, &mut out.body, Some("application/sdp"), body),
                    Err(e) => tracing::debug!("relayed response SDP unusable: {e}"),
                }
            } else if !r.body.is_empty() && is_sdp_resp(r) {
                match Sdp::parse(&r.body).and_then(|sdp| {
                    let local = self.local_media(orig_side);
                    Ok((sdp.rewrite_answer(local)?, sdp))
                }) {
                    Ok((body, sdp)) => {
                        if let Some(rtp) = sdp.audio_rtp() {
                            self.out.push_back(CallOutput::Media { side, rtp, rtcp: sdp.audio_rtcp() });
                        }
                        msg::set_body(&mut out.headers, &mut out.body, Some("application/sdp"), body);
                    }
                    Err(e) => tracing::debug!("relayed response SDP unusable: {e}"),
                }
            } else if !r.body.is_empty() {
                let ct = msg::header(&r.headers, "Content-Type").map(str::to_string);
                msg::set_body(&mut out.headers, &mut out.body, ct.as_deref(), r.body.clone());
            }
        }
        if req.method == Method::Invite || req.method == Method::Update {
            let contact = self.leg(orig_side).contact.clone();
            msg::push(&mut out.headers, "Contact", contact);
        }
        let s = &mut self.servers[pos];
        s.tx.respond(out, now);
        if code >= 200 {
            s.answered = true;
        }
    }

    /// The callee's SDP → media address for B, rewritten for A.
    fn answer_sdp(&mut self, body: &[u8]) -> Result<Vec<u8>, String> {
        if let Some(adapter) = &self.sdp_adapter {
            return adapter.answer(Side::B, body);
        }
        self.answer_sdp_plain(body).map_err(|e| e.to_string())
    }

    fn answer_sdp_plain(&mut self, body: &[u8]) -> Result<Vec<u8>, super::sdp::SdpError> {
        let sdp = Sdp::parse(body)?;
        let rewritten = sdp.rewrite_answer(self.media_a)?;
        if let Some(rtp) = sdp.audio_rtp() {
            self.out.push_back(CallOutput::Media { side: Side::B, rtp, rtcp: sdp.audio_rtcp() });
        }
        Ok(rewritten)
    }

    fn local_media(&self, towards: Side) -> SocketAddr {
        match towards {
            Side::A => self.media_a,
            Side::B => self.media_b,
        }
    }

    fn response_for_a(&self, code: u16) -> Response {
        let tag = msg::param(&self.a.local, "tag").unwrap_or("").to_string();
        let mut r = msg::response_to(self.a_invite.request(), code, Some(&tag));
        msg::push(&mut r.headers, "Contact", self.a.contact.clone());
        r
    }

    fn fail_a(&mut self, code: u16, why: &str, now: Instant) {
        if self.a_invite_final {
            return;
        }
        let tag = msg::param(&self.a.local, "tag").unwrap_or("").to_string();
        let r = msg::refusal(self.a_invite.request(), code, Some(&tag), &self.setup_server, why);
        self.a_invite.respond(r, now);
        self.a_invite_final = true;
        self.state = State::Ending;
    }

    /// CANCEL towards B: now if it sent a provisional, else when it does (§9.1).
    fn cancel_b(&mut self, now: Instant) {
        if self.b_answered {
            return;
        }
        if self.b_provisional {
            self.send_cancel_b(now);
        } else {
            self.cancel_pending = true;
            // A callee that never answers at all: its INVITE tx times out on its own (Timer B).
        }
    }

    fn send_cancel_b(&mut self, now: Instant) {
        let invite = self.b_invite.request();
        let branch = msg::header(&invite.headers, "Via").and_then(|v| msg::param(v, "branch")).unwrap_or("").to_string();
        let cseq = msg::header(&invite.headers, "CSeq").and_then(msg::parse_cseq).map(|c| c.0).unwrap_or(1);
        // CANCEL carries the INVITE's To (no tag), Via and CSeq number (§9.1).
        let mut leg = self.b.clone();
        leg.remote = msg::header(&invite.headers, "To").unwrap_or("").to_string();
        leg.remote_target = Some(invite.uri.clone());
        leg.route_set.clear();
        if let Some(req) = leg.build(Method::Cancel, cseq, &branch, None, vec![]) {
            self.b_give_up_at = Some(now + self.timers.timeout());
            let tx = ClientTx::new(req, self.b.peer.proto.reliable(), &self.timers, now);
            self.clients.push(Client { side: Side::B, tx, purpose: Purpose::Cancel, done: false });
        }
    }

    fn send_bye(&mut self, side: Side, now: Instant) {
        self.send_bye_with(side, vec![], now);
    }

    /// A BYE with a Reason (RFC 3326) saying why crossbar ends the call.
    fn send_bye_because(&mut self, side: Side, cause: u16, why: &str, now: Instant) {
        let text: String = why.chars().map(|c| if c == '"' || c == '\\' || c.is_control() { '\'' } else { c }).collect();
        self.send_bye_with(side, vec![("Reason", format!("SIP;cause={cause};text=\"{text}\""))], now);
    }

    fn send_bye_with(&mut self, side: Side, extra: Vec<(&'static str, String)>, now: Instant) {
        if side == Side::B {
            // A 2xx is always ACKed before the BYE, even when a late offer got no answer.
            self.ack_b(None);
        }
        let reliable = self.leg(side).peer.proto.reliable();
        if let Some(req) = self.leg(side).request(Method::Bye, None, extra) {
            let tx = ClientTx::new(req, reliable, &self.timers, now);
            self.clients.push(Client { side, tx, purpose: Purpose::Bye, done: false });
        }
    }

    fn end(&mut self, disposition: Disposition, code: u16, hangup_side: Option<Side>, reason: &str) {
        if self.ended.is_some() {
            return;
        }
        self.state = State::Ending;
        self.a_answer_due = false;
        let info = EndInfo { disposition, code, hangup_side, reason: reason.to_string(), answered: self.b_answered && disposition == Disposition::Answered };
        self.ended = Some(info.clone());
        self.out.push_back(CallOutput::Ended(info));
    }
}

fn other(side: Side) -> Side {
    match side {
        Side::A => Side::B,
        Side::B => Side::A,
    }
}

fn is_sdp(req: &Request) -> bool {
    msg::header(&req.headers, "Content-Type").is_some_and(|c| c.trim().to_ascii_lowercase().starts_with("application/sdp"))
}

fn is_sdp_resp(r: &Response) -> bool {
    has_sdp_type(&r.headers)
}

/// The body is SDP, or untyped (taken as SDP, as peers that omit Content-Type mean it).
fn has_sdp_type(headers: &rsipstack::sip::Headers) -> bool {
    msg::header(headers, "Content-Type").is_none_or(|c| c.trim().to_ascii_lowercase().starts_with("application/sdp"))
}

/// Header names we copy are from a fixed list; this keeps their `&'static str`.
fn leak_name(name: &str) -> &'static str {
    match name {
        "Event" => "Event",
        "Subscription-State" => "Subscription-State",
        "Info-Package" => "Info-Package",
        _ => "Reason",
    }
}

#[cfg(test)]
mod tests;
