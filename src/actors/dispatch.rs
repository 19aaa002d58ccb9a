//! Where every received SIP message goes (runs on the transport tasks).
//!
//! 1. Unparseable or invalid → 400 with a Warning naming the problem.
//! 2. Known Call-ID → straight to that Call actor (never queued behind a tenant).
//! 3. New request → identified once at the edge: carrier source address + DID,
//!    or the SIP domain; then to that Tenant, which authenticates and admits it.

use super::call::CallMsg;
use super::node::Node;
use super::tenant::TenantMsg;
use crate::sip::msg::{self, Incoming, Peer};
use crate::sip::transport::Sink;
use rsipstack::sip::{Method, SipMessage};
use std::sync::atomic::Ordering;

impl Sink for Node {
    /// A WebSocket closed: every tenant drops the registrations made over it
    /// (RFC 7118 §5: a browser can only be reached on its own connection).
    fn on_closed(&self, peer: Peer) {
        if let Some((_, tenants)) = self.ws_tenants.remove(&peer.addr) {
            // By id, so a tenant restarted since the REGISTER is still told.
            let routing = self.routing.read();
            for id in tenants {
                if let Some(t) = routing.by_id.get(&id) {
                    let _ = t.actor.cast(TenantMsg::ConnectionClosed(peer));
                }
            }
        }
    }

    fn on_message_at(&self, bytes: &[u8], peer: Peer, received: std::time::Instant) {
        // Only refusals name the host: rendered when one is sent.
        let host = || self.advertised.clone();
        let incoming = match Incoming::parse(bytes, peer) {
            Ok(mut m) => {
                m.received = received;
                m
            }
            Err(e) => {
                tracing::debug!(from = %peer.addr, "refusing malformed message: {e}");
                if let Some(resp) = msg::error_response_raw(bytes, e.status(), &host(), &e.to_string()) {
                    self.send(peer, resp);
                }
                return;
            }
        };
        // Test-only: the receive loop is held up, as on a node short of CPU; what
        // arrives meanwhile waits in the socket's buffer.
        #[cfg(feature = "fault-injection")]
        if incoming.header("X-Crossbar-Fault").is_some_and(|v| v.trim() == "stall-transport") {
            std::thread::sleep(std::time::Duration::from_millis(600));
        }
        if let Some(call) = self.calls.get(&incoming.call_id) {
            let _ = call.cast(CallMsg::Sip(Box::new(incoming)));
            return;
        }
        let SipMessage::Request(req) = &incoming.msg else {
            return; // a response for a call that is gone: drop it (§18.1.2)
        };
        let refuse = |code: u16, why: &str| {
            let r = msg::refusal(req, code, Some(&stateless_tag(&incoming)), &host(), why);
            self.send(peer, msg::response_bytes(&r));
        };
        match req.method {
            Method::Ack => {}
            Method::Options if incoming.to_tag.is_none() => {
                let mut r = msg::response_to(req, 200, Some(&stateless_tag(&incoming)));
                msg::push(&mut r.headers, "Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, INFO, UPDATE");
                msg::push(&mut r.headers, "Accept", "application/sdp");
                self.send(peer, msg::response_bytes(&r));
            }
            Method::Register => {
                let domain = incoming.to_uri().map(host_of).unwrap_or_default();
                let tenant = self.routing.read().by_domain.get(&domain).cloned();
                match tenant {
                    Some(t) => {
                        if peer.proto.is_websocket() {
                            let mut owners = self.ws_tenants.entry(peer.addr).or_default();
                            if !owners.iter().any(|o| **o == *t.id) {
                                owners.push(t.id.to_string());
                            }
                        }
                        self.to_tenant(&t, incoming)
                    }
                    None => refuse(404, "no tenant serves this domain"),
                }
            }
            Method::Invite if incoming.to_tag.is_none() => {
                if self.active_calls.load(Ordering::Relaxed) >= self.config.node.max_calls {
                    let r = msg::unavailable(req, &stateless_tag(&incoming), &host(), "node call limit reached", "node call limit", 5);
                    self.send(peer, msg::response_bytes(&r));
                    return;
                }
                let tenant = if self.carrier_sources.contains(&peer.addr.ip()) {
                    let did = normalize_did(req.uri.user().unwrap_or(""));
                    match self.routing.read().by_did.get(&did).cloned() {
                        Some(t) => t,
                        None => return refuse(404, "unknown number (DID)"),
                    }
                } else {
                    let domain = incoming.from_uri().map(host_of).unwrap_or_default();
                    match self.routing.read().by_domain.get(&domain).cloned() {
                        Some(t) => t,
                        None => return refuse(403, "unknown domain: calls must come from a tenant's users or a carrier trunk"),
                    }
                };
                self.to_tenant(&tenant, incoming);
            }
            Method::Cancel => refuse(481, "no call matches this CANCEL"),
            _ => refuse(481, "no such call or transaction"),
        }
    }
}

impl Node {
    /// Hands a new request to its tenant unless too much is already waiting
    /// there: a flooded tenant's excess is refused here, at the edge, and
    /// cannot grow its mailbox without bound.
    fn to_tenant(&self, t: &super::node::TenantRoute, m: Incoming) {
        if t.pending.fetch_add(1, Ordering::Relaxed) >= super::node::TENANT_QUEUE_LIMIT {
            t.pending.fetch_sub(1, Ordering::Relaxed);
            if let Some(req) = m.request() {
                let r = msg::unavailable(req, &stateless_tag(&m), &self.advertised, "tenant overloaded", "tenant request queue full", 1);
                self.send(m.peer, msg::response_bytes(&r));
            }
            return;
        }
        if t.actor.cast(TenantMsg::Sip(Box::new(m))).is_err() {
            t.pending.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A To tag for responses crossbar sends without a transaction: the same for
/// retransmissions of a request, so the peer sees one consistent answer.
pub fn stateless_tag(m: &Incoming) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    m.call_id.hash(&mut h);
    m.from_tag.hash(&mut h);
    m.cseq.hash(&mut h);
    format!("cb{:x}", h.finish())
}

pub fn host_of(uri: &rsipstack::sip::Uri) -> String {
    match &uri.host_with_port.host {
        rsipstack::sip::Host::Domain(d) => d.to_string().to_ascii_lowercase(),
        rsipstack::sip::Host::IpAddr(ip) => ip.to_string(),
    }
}

/// A DID as dialled by the carrier: `+15550001000`, `15550001000` (and visual separators) → digits.
pub fn normalize_did(user: &str) -> String {
    let user = user.split(';').next().unwrap_or(user);
    user.chars().filter(|c| c.is_ascii_digit()).collect()
}
