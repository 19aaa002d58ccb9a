//! The Tenant actor: one per tenant. It authenticates its users (digest in
//! its own realm), keeps their registrations, routes new calls (DID →
//! extension, extension → extension, extension → trunk), admits them against
//! its limits and supervises their Call actors.
//!
//! Nothing here can reach another tenant: lookups go through this tenant's
//! own users, DIDs and registrar, and no path names another tenant.

use super::call::{Call, CallArgs, CallShared};
use super::dispatch::stateless_tag;
use super::node::Node;
use crate::cdr::{self, Cdr, CdrState, Event};
use crate::config::{Limits, LimitOverrides, Plan, TenantConfig};
use crate::store::{RecordKind, ScopedStore};
use crate::sip::auth::{self, NonceCheck};
use crate::sip::b2bua::CallSetup;
use crate::sip::msg::{self, Incoming, Peer, Proto};
use crate::sip::registrar::{ExpiryLimits, Registrar};
use parking_lot::Mutex;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use rsipstack::sip::{Method, Request};
use ractor::RpcReplyPort;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// How long a digest nonce stays valid.
const NONCE_MAX_AGE: Duration = Duration::from_secs(300);

pub enum TenantMsg {
    /// A new request for this tenant (REGISTER, initial INVITE).
    Sip(Box<Incoming>),
    /// Periodic housekeeping (expired registrations).
    Tick,
    /// The one way to change a tenant at runtime: validated against its plan,
    /// stored, and in effect from the next call. Replies with the new limits.
    Update(TenantUpdate, RpcReplyPort<Result<Limits, String>>),
    /// A connection closed (SIP over WebSocket): its registrations go.
    ConnectionClosed(Peer),
    /// Test-only: make this tenant actor panic.
    #[cfg(feature = "fault-injection")]
    Panic,
}

/// A change to a tenant's settings.
#[derive(Debug, Clone)]
pub enum TenantUpdate {
    Plan { plan: Plan, limits: Option<LimitOverrides> },
}

/// What a tenant needs to (re)start; its configuration (as last changed) and
/// its registrations survive a restart.
#[derive(Clone)]
pub struct TenantArgs {
    pub config: Arc<Mutex<TenantConfig>>,
    pub store: ScopedStore,
    pub node: Arc<Node>,
    pub registrar: Arc<Mutex<Registrar>>,
    /// Requests cast to this tenant and not yet handled (bounded at the edge).
    pub pending: Arc<AtomicUsize>,
    /// Bytes of recordings stored (against the plan's recording storage).
    pub recording: super::call::RecordingBudget,
}

impl TenantArgs {
    pub fn new(config: TenantConfig, store: ScopedStore, node: Arc<Node>, recording_used: u64) -> Self {
        let recording = super::call::RecordingBudget { used: Arc::new(std::sync::atomic::AtomicU64::new(recording_used)) };
        Self { config: Arc::new(Mutex::new(config)), store, node, registrar: Arc::new(Mutex::new(Registrar::default())), pending: Arc::new(AtomicUsize::new(0)), recording }
    }
}

/// New-call rate limiting: a token bucket refilled at `calls_per_second`, one
/// second's worth of burst.
struct RateLimiter {
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    fn admit(&mut self, rate: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate).min(rate.max(1.0));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub struct Tenant;

pub struct TenantState {
    args: TenantArgs,
    /// This tenant's configuration (a snapshot of `args.config`).
    cfg: TenantConfig,
    limits: Limits,
    rate: RateLimiter,
    passwords: HashMap<String, String>,
    /// Call actors of this tenant → their shared state, for clean-up if one fails.
    calls: HashMap<ractor::ActorId, Arc<Mutex<CallShared>>>,
    tick: Option<ractor::concurrency::JoinHandle<()>>,
}

impl Actor for Tenant {
    type Msg = TenantMsg;
    type State = TenantState;
    type Arguments = TenantArgs;

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, args: TenantArgs) -> Result<Self::State, ActorProcessingErr> {
        let cfg = args.config.lock().clone();
        let passwords = cfg.users.iter().map(|u| (u.extension.clone(), u.password.clone())).collect();
        let tick = myself.send_interval(Duration::from_secs(30), || TenantMsg::Tick);
        let limits = cfg.limits();
        tracing::info!(tenant = %cfg.id, domain = %cfg.domain, plan = cfg.plan.as_str(), "tenant started");
        let rate = RateLimiter { tokens: limits.calls_per_second.max(1.0), last: Instant::now() };
        Ok(TenantState { args, cfg, limits, rate, passwords, calls: HashMap::new(), tick: Some(tick) })
    }

    async fn post_stop(&self, _: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        if let Some(t) = state.tick.take() {
            t.abort();
        }
        Ok(())
    }

    async fn handle(&self, myself: ActorRef<Self::Msg>, msg: Self::Msg, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match msg {
            TenantMsg::Sip(m) => {
                state.args.pending.fetch_sub(1, Ordering::Relaxed);
                let m = *m;
                #[cfg(feature = "fault-injection")]
                if m.header("X-Crossbar-Fault").is_some_and(|v| v.trim() == "panic-tenant") {
                    panic!("fault injection: tenant {} panics on purpose", state.cfg.id);
                }
                // Test-only: the tenant is held up, as on a node short of CPU.
                #[cfg(feature = "fault-injection")]
                if m.header("X-Crossbar-Fault").is_some_and(|v| v.trim() == "stall-tenant") {
                    tokio::time::sleep(Duration::from_millis(600)).await;
                }
                match m.request().map(|r| &r.method) {
                    Some(Method::Register) => {
                        if let Some(req) = m.request() {
                            state.on_register(&m, req);
                        }
                    }
                    Some(Method::Invite) => state.on_invite(&myself, m).await,
                    _ => {}
                }
            }
            TenantMsg::ConnectionClosed(peer) => {
                let n = state.args.registrar.lock().remove_peer(peer);
                if n > 0 {
                    tracing::info!(tenant = %state.cfg.id, "{n} registrations removed: their WebSocket closed");
                }
            }
            TenantMsg::Tick => {
                let n = state.args.registrar.lock().purge(Instant::now());
                if n > 0 {
                    tracing::debug!(tenant = %state.cfg.id, "{n} registrations expired");
                }
            }
            TenantMsg::Update(update, reply) => {
                let result = state.update(update).await;
                let _ = reply.send(result);
            }
            #[cfg(feature = "fault-injection")]
            TenantMsg::Panic => panic!("fault injection: tenant {} panics on purpose", state.cfg.id),
        }
        Ok(())
    }

    async fn handle_supervisor_evt(&self, _: ActorRef<Self::Msg>, evt: SupervisionEvent, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                state.calls.remove(&cell.get_id());
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                // A failed call is cleaned up here and never stops its tenant.
                tracing::error!(tenant = %state.cfg.id, actor = ?cell.get_id(), "call failed: {err}; hanging it up");
                if let Some(shared) = state.calls.remove(&cell.get_id()) {
                    super::call::clean_up_failed(&state.args.node, &shared);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

enum Auth {
    User(String),
    /// Send this challenge (401/407).
    Challenge { stale: bool },
    Refused(&'static str),
}

impl TenantState {
    fn node(&self) -> &Arc<Node> {
        &self.args.node
    }

    async fn update(&mut self, update: TenantUpdate) -> Result<Limits, String> {
        let mut next = self.cfg.clone();
        match update {
            TenantUpdate::Plan { plan, limits } => {
                next.plan = plan;
                if let Some(l) = limits {
                    next.limits = l;
                }
            }
        }
        next.check_plan().map_err(|(field, problem, fix)| format!("{field}: {problem}. Fix: {fix}"))?;
        self.args.store.put_json(RecordKind::Config, "tenant", &next).await.map_err(|e| e.to_string())?;
        let limits = next.limits();
        tracing::info!(tenant = %next.id, plan = next.plan.as_str(), ?limits, "tenant settings changed");
        cdr::emit(&self.node().writer, &self.args.store, Event::new("tenant.updated", None, Some(format!("plan {}", next.plan.as_str()))));
        *self.args.config.lock() = next.clone();
        self.cfg = next;
        self.limits = limits;
        Ok(limits)
    }

    /// A new INVITE that already waited `sip.overload_wait_ms` inside the node (its
    /// queues grow: the node is short of CPU) is refused here, before it costs a call:
    /// 503 with Retry-After, and no store write (a warning every 1,000th time).
    /// Returns whether it was refused.
    fn overloaded(&self, m: &Incoming, req: &Request) -> bool {
        let node = self.node();
        let limit = node.config.sip.overload_wait_ms;
        let waited = m.received.elapsed();
        if limit == 0 || waited < Duration::from_millis(limit) {
            return false;
        }
        let n = node.overload_refused.fetch_add(1, Ordering::Relaxed);
        if n.is_multiple_of(1000) {
            tracing::warn!(tenant = %self.cfg.id, waited_ms = waited.as_millis() as u64, refused = n + 1, "node overloaded: new calls refused with 503 (sip.overload_wait_ms = {limit})");
        }
        let r = msg::unavailable(req, &stateless_tag(m), &self.host(), "node overloaded", "node overloaded", 1);
        node.send(m.peer, msg::response_bytes(&r));
        true
    }

    /// Refuses a new call over a limit: 503 with a Reason naming the limit, and an event.
    fn refuse_limit(&self, m: &Incoming, req: &Request, what: &str) {
        let r = msg::unavailable(req, &stateless_tag(m), &self.host(), what, what, 1);
        self.node().send(m.peer, msg::response_bytes(&r));
        cdr::emit(&self.node().writer, &self.args.store, Event::new("limit.refused", None, Some(what.to_string())));
    }

    fn host(&self) -> String {
        self.node().advertised.clone()
    }

    fn respond(&self, m: &Incoming, req: &Request, code: u16, why: &str) {
        let r = msg::refusal(req, code, Some(&stateless_tag(m)), &self.host(), why);
        self.node().send(m.peer, msg::response_bytes(&r));
    }

    /// Digest authentication in this tenant's realm (RFC 8760: SHA-256 and MD5 offered).
    fn authenticate(&self, m: &Incoming, req: &Request, header: &str) -> Auth {
        let realm = &self.cfg.domain;
        let Some(value) = msg::header(&req.headers, header) else { return Auth::Challenge { stale: false } };
        let Ok(creds) = auth::parse_credentials(value) else { return Auth::Refused("malformed credentials") };
        if !creds.realm.eq_ignore_ascii_case(realm) {
            return Auth::Refused("credentials are for another realm");
        }
        match self.node().nonces.check_nonce(&creds.nonce, realm, SystemTime::now(), NONCE_MAX_AGE) {
            NonceCheck::Valid => {}
            NonceCheck::Stale => return Auth::Challenge { stale: true },
            NonceCheck::Invalid => return Auth::Challenge { stale: false },
        }
        // A configured SIP password, or short-lived softphone credentials (`EXT~EXPIRY`).
        let (user, password) = match self.passwords.get(&creds.username) {
            Some(p) => (creds.username.clone(), p.clone()),
            None => match crate::console::softphone::ephemeral_password(&self.node().nonces, &self.cfg.id, &creds.username, SystemTime::now()) {
                Some((ext, p)) if self.passwords.contains_key(&ext) => (ext, p),
                _ => return Auth::Refused("wrong user name or password"),
            },
        };
        if !auth::verify(&creds, req.method.to_string().as_str(), &password) {
            return Auth::Refused("wrong user name or password");
        }
        let _ = m;
        Auth::User(user)
    }

    fn challenge(&self, m: &Incoming, req: &Request, code: u16, stale: bool) {
        let realm = &self.cfg.domain;
        let nonce = self.node().nonces.nonce(realm, SystemTime::now());
        let mut r = msg::response_to(req, code, Some(&stateless_tag(m)));
        let name = if code == 407 { "Proxy-Authenticate" } else { "WWW-Authenticate" };
        let mut challenges = auth::challenges(realm, &nonce, stale);
        if !self.node().config.sip.digest_sha256_first {
            challenges.reverse();
        }
        if m.peer.proto.is_websocket() {
            // JsSIP 3.10 (the softphone) folds several WWW-Authenticate headers into one
            // and keeps the last; it only knows MD5. Browsers get the MD5 challenge alone.
            challenges.retain(|c| c.contains("algorithm=MD5"));
        }
        for c in challenges {
            msg::push(&mut r.headers, name, c);
        }
        self.node().send(m.peer, msg::response_bytes(&r));
    }

    fn on_register(&mut self, m: &Incoming, req: &Request) {
        let user = m.to_uri().and_then(|u| u.user()).unwrap_or("").to_string();
        match self.authenticate(m, req, "Authorization") {
            Auth::Challenge { stale } => self.challenge(m, req, 401, stale),
            Auth::Refused(why) => self.respond(m, req, 403, why),
            Auth::User(u) if u != user => self.respond(m, req, 403, "credentials do not match the registered address (To)"),
            Auth::User(u) => {
                let limits = ExpiryLimits { min: self.node().config.sip.min_expires, max: self.node().config.sip.max_expires };
                let (resp, before, after) = {
                    let mut reg = self.args.registrar.lock();
                    let now = Instant::now();
                    let before = reg.lookup(&u, now).len();
                    let resp = reg.register(m, req, &u, limits, &stateless_tag(m), &self.host(), now);
                    (resp, before, reg.lookup(&u, now).len())
                };
                let code = u16::from(resp.status_code.clone());
                tracing::info!(tenant = %self.cfg.id, user = %u, code, "REGISTER");
                self.node().send(m.peer, msg::response_bytes(&resp));
                if before != after {
                    let kind = if after > before { "registration.added" } else { "registration.removed" };
                    cdr::emit(&self.node().writer, &self.args.store, Event::new(kind, None, Some(format!("{u}: {after} contact(s)"))));
                }
            }
        }
    }

    async fn on_invite(&mut self, myself: &ActorRef<TenantMsg>, m: Incoming) {
        // A retransmission that raced the Call's creation: hand it over.
        if let Some(call) = self.node().calls.get(&m.call_id) {
            let _ = call.cast(super::call::CallMsg::Sip(Box::new(m)));
            return;
        }
        let Some(req) = m.request() else { return };
        let node = self.node().clone();
        if self.overloaded(&m, req) {
            return;
        }
        let cfg = &self.cfg;
        let from_carrier = node.carrier_sources.contains(&m.peer.addr.ip());
        let now = Instant::now();
        // Route: (callee URI, where to send, From towards the callee, To towards the callee).
        let caller = m.from_uri().and_then(|u| u.user()).unwrap_or("anonymous").to_string();
        let dialled = req.uri.user().unwrap_or("").to_string();
        let mut did_used: Option<String> = None;
        let mut direction = cdr::Direction::Internal;
        let trunk_name = node.config.trunks.first().map(|t| t.name.clone());
        let route = if from_carrier {
            direction = cdr::Direction::Inbound;
            let did = super::dispatch::normalize_did(&dialled);
            let Some(ext) = cfg.dids.iter().find(|d| d.number == did).map(|d| d.extension.clone()) else {
                return self.respond(&m, req, 404, "unknown number (DID)");
            };
            did_used = Some(did);
            let from = format!("<sip:{caller}@{}>", node.advertised);
            self.route_to_extension(&m, req, &ext, from, now)
        } else {
            let user = match self.authenticate(&m, req, "Proxy-Authorization") {
                Auth::Challenge { stale } => return self.challenge(&m, req, 407, stale),
                Auth::Refused(why) => return self.respond(&m, req, 403, why),
                Auth::User(u) => u,
            };
            if m.from_uri().and_then(|u| u.user()) != Some(user.as_str()) {
                return self.respond(&m, req, 403, "From does not match the authenticated user");
            }
            let target = req.uri.user().unwrap_or("").to_string();
            if self.passwords.contains_key(&target) {
                let from = format!("<sip:{user}@{}>", cfg.domain);
                self.route_to_extension(&m, req, &target, from, now)
            } else if is_external_number(&target) {
                let Some(trunk) = node.trunk_outbound else {
                    return self.respond(&m, req, 403, "outbound calls are not configured (no trunk)");
                };
                let number = target.trim_start_matches('+').to_string();
                let Some(cli) = cfg.dids.first().map(|d| d.number.clone()) else {
                    return self.respond(&m, req, 403, "this tenant has no DID to present as caller id");
                };
                direction = cdr::Direction::Outbound;
                did_used = Some(cli.clone());
                Some((format!("sip:{number}@{trunk}"), Peer { proto: Proto::Udp, addr: trunk }, format!("<sip:{cli}@{}>", node.advertised), format!("<sip:{number}@{trunk}>")))
            } else {
                return self.respond(&m, req, 404, "no such extension or number in this tenant");
            }
        };
        let Some((b_uri, b_peer, b_from, b_to)) = route else { return };

        // Admission against the plan's limits.
        if self.calls.len() >= self.limits.max_calls {
            let what = format!("tenant concurrent call limit ({})", self.limits.max_calls);
            return self.refuse_limit(&m, req, &what);
        }
        if !self.rate.admit(self.limits.calls_per_second, now) {
            let what = format!("tenant call rate limit ({} calls/s)", self.limits.calls_per_second);
            return self.refuse_limit(&m, req, &what);
        }
        // A browser leg (SIP over WebSocket) gets WebRTC media (str0m), any other plain RTP.
        let kind = |p: Peer| if p.proto.is_websocket() { crate::media::webrtc::LegKind::WebRtc } else { crate::media::webrtc::LegKind::Plain };
        let unset: std::net::SocketAddr = ([0, 0, 0, 0], 0).into();
        let b_call_id = crate::sip::transaction::new_call_id(&node.advertised);
        // The INVITE goes to the call as it is, not copied.
        let Incoming { msg, peer: a_peer, call_id: a_call_id, .. } = m;
        let rsipstack::sip::SipMessage::Request(a_invite) = msg else { return };
        let setup = CallSetup {
            a_invite,
            a_peer,
            b_uri,
            b_peer,
            b_from,
            b_to,
            b_call_id: b_call_id.clone(),
            a_sent_by: node.sent_by(a_peer.proto),
            b_sent_by: node.sent_by(b_peer.proto),
            // Filled in by the call once its media session is open.
            media_a: unset,
            media_b: unset,
            timers: node.timers,
            ring_timeout: Duration::from_secs(node.config.sip.ring_timeout_s),
            server_name: node.advertised.clone(),
            sdp_adapter: None,
            // RFC 3455: the number the carrier called, so the agent sees which DID rang.
            b_extra_headers: match (&did_used, from_carrier) {
                (Some(did), true) => vec![("P-Called-Party-ID", format!("<sip:{did}@{}>", cfg.domain))],
                _ => Vec::new(),
            },
        };
        let started = SystemTime::now();
        let cdr = Cdr {
            id: cdr::new_id(started, &a_call_id),
            tenant: cfg.id.clone(),
            call_id: a_call_id.clone(),
            direction,
            from: caller,
            to: dialled,
            trunk: if direction == cdr::Direction::Internal { None } else { trunk_name },
            did: did_used.clone(),
            start: cdr::rfc3339(started),
            answer: None,
            end: None,
            duration_s: None,
            billable_s: None,
            disposition: "in-progress".into(),
            hangup_code: None,
            hangup_reason: None,
            hangup_side: None,
            agent: None,
            queue: None,
            state: CdrState::InProgress,
            recording: None,
            node: node.config.node.name.clone(),
        };
        let mut recording = None;
        if self.limits.recording && cfg.records(did_used.as_deref().filter(|_| direction == cdr::Direction::Inbound)) {
            let cap = self.limits.recording_storage_mb.saturating_mul(1 << 20);
            let left = cap.saturating_sub(self.args.recording.used.load(Ordering::Relaxed));
            if left == 0 {
                cdr::emit(&node.writer, &self.args.store, Event::new("limit.refused", Some(&cdr.id), Some("recording storage full: call not recorded".into())));
            } else {
                // One call keeps at most 256 MB of audio in memory (about 4.5 hours of G.711 stereo).
                recording = Some((self.args.recording.clone(), left.min(256 << 20) as usize));
            }
        }
        let shared = Arc::new(Mutex::new(CallShared::new(a_call_id, b_call_id, a_peer, b_peer, cdr, self.args.store.clone())));
        let plan = super::call::CallPlan { setup, kinds: [kind(a_peer), kind(b_peer)], recording };
        let args = CallArgs { node: node.clone(), shared: shared.clone(), plan };
        match Actor::spawn_linked(None, Call, args, myself.get_cell()).await {
            Ok((call, _)) => {
                self.calls.insert(call.get_id(), shared);
            }
            Err(e) => {
                // Only if the call's pre_start failed, and it cannot (it inserts the
                // call's routes). The INVITE went with the actor's arguments, so no
                // 500 can be built here: the caller's transaction times out.
                tracing::error!(tenant = %cfg.id, "cannot start a call actor: {e}");
            }
        }
    }

    /// The registered contact of one of this tenant's extensions.
    fn route_to_extension(&self, m: &Incoming, req: &Request, ext: &str, from: String, now: Instant) -> Option<(String, Peer, String, String)> {
        let registrar = self.args.registrar.lock();
        let Some(b) = registrar.lookup(ext, now).first().map(|b| (*b).clone()) else {
            drop(registrar);
            self.respond(m, req, 480, "the extension is not registered");
            return None;
        };
        let to = format!("<sip:{ext}@{}>", self.cfg.domain);
        // Over a stream transport, reuse the registration's connection; if it has
        // closed, open one to the Contact's address (the REGISTER's source port was ephemeral).
        let mut peer = b.peer;
        if peer.proto != Proto::Udp && !self.node().transports.has_connection(peer.addr) {
            if let Some(addr) = b.contact_addr {
                peer.addr = addr;
            }
        }
        Some((b.contact, peer, from, to))
    }
}

/// A number to send out through the carrier: digits (optionally '+'), at least 5.
fn is_external_number(s: &str) -> bool {
    let d = s.strip_prefix('+').unwrap_or(s);
    d.len() >= 5 && d.len() <= 15 && d.bytes().all(|b| b.is_ascii_digit())
}
