//! A tenant's location service (RFC 3261 §10): REGISTER bindings per user.
//!
//! Plain data owned by the Tenant actor; digest authentication happens before
//! a REGISTER reaches [`Registrar::register`].

use super::msg::{self, Incoming, Peer};
use rsipstack::sip::Response;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// One registered contact of a user.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    /// The Contact URI as registered.
    pub contact: String,
    /// Where the REGISTER came from: requests to this contact go there (NAT-friendly, RFC 5626 flow).
    pub peer: Peer,
    /// The Contact's own address (IP literal), for stream transports whose
    /// connection has closed since the REGISTER.
    pub contact_addr: Option<std::net::SocketAddr>,
    pub expires_at: Instant,
    pub call_id: String,
    pub cseq: u32,
    pub registered_at: Instant,
}

#[derive(Debug, Default)]
pub struct Registrar {
    bindings: HashMap<String, Vec<Binding>>,
}

/// Expiry bounds from the node configuration.
#[derive(Debug, Clone, Copy)]
pub struct ExpiryLimits {
    pub min: u32,
    pub max: u32,
}

impl Registrar {
    /// Applies an authenticated REGISTER for `user`; returns the response to send
    /// (200 listing the current bindings, 423 when expiry is too short, 400 on bad Contact).
    #[allow(clippy::too_many_arguments)] // the request, its tenant context and the clock
    pub fn register(&mut self, req: &Incoming, r: &rsipstack::sip::Request, user: &str, limits: ExpiryLimits, to_tag: &str, host: &str, now: Instant) -> Response {
        let default_expires = msg::header(&r.headers, "Expires").and_then(|v| v.trim().parse::<u32>().ok()).unwrap_or(3600);
        let contacts = msg::header_values(&r.headers, "Contact");
        let list = self.bindings.entry(user.to_string()).or_default();
        list.retain(|b| b.expires_at > now);

        if contacts.iter().any(|c| c.trim() == "*") {
            // RFC 3261 §10.3 step 6: "*" only with Expires: 0 and alone.
            if contacts.len() != 1 || default_expires != 0 {
                return msg::refusal(r, 400, Some(to_tag), host, "Contact: * needs Expires: 0 and no other contact");
            }
            list.retain(|b| b.call_id == req.call_id && b.cseq >= req.cseq);
            list.clear();
            return self.ok(r, user, to_tag, now);
        }
        let mut parsed = Vec::new();
        for c in &contacts {
            let uri = msg::name_addr_uri(c);
            if rsipstack::sip::Uri::try_from(uri).is_err() {
                return msg::refusal(r, 400, Some(to_tag), host, &format!("unparseable Contact {c:?}"));
            }
            let expires = msg::param(c, "expires").and_then(|v| v.parse::<u32>().ok()).unwrap_or(default_expires);
            if expires != 0 && expires < limits.min {
                let mut resp = msg::refusal(r, 423, Some(to_tag), host, "registration interval too brief");
                msg::push(&mut resp.headers, "Min-Expires", limits.min.to_string());
                return resp;
            }
            parsed.push((uri.to_string(), expires.min(limits.max)));
        }
        for (uri, expires) in parsed {
            if let Some(existing) = list.iter().position(|b| same_contact(&b.contact, &uri)) {
                let b = &list[existing];
                // §10.3 step 7: an older CSeq from the same Call-ID is out of order.
                if b.call_id == req.call_id && b.cseq > req.cseq {
                    continue;
                }
                list.remove(existing);
            }
            if expires > 0 {
                list.push(Binding {
                    contact_addr: contact_socket_addr(&uri),
                    contact: uri,
                    peer: req.peer,
                    expires_at: now + Duration::from_secs(expires as u64),
                    call_id: req.call_id.clone(),
                    cseq: req.cseq,
                    registered_at: now,
                });
            }
        }
        self.ok(r, user, to_tag, now)
    }

    fn ok(&mut self, r: &rsipstack::sip::Request, user: &str, to_tag: &str, now: Instant) -> Response {
        let mut resp = msg::response_to(r, 200, Some(to_tag));
        if let Some(list) = self.bindings.get(user) {
            for b in list {
                let left = b.expires_at.saturating_duration_since(now).as_secs();
                msg::push(&mut resp.headers, "Contact", format!("<{}>;expires={left}", b.contact));
            }
        }
        if self.bindings.get(user).is_some_and(|l| l.is_empty()) {
            self.bindings.remove(user);
        }
        msg::push(&mut resp.headers, "Date", httpdate_now());
        resp
    }

    /// Live contacts of a user, most recent registration first.
    pub fn lookup(&self, user: &str, now: Instant) -> Vec<&Binding> {
        let mut v: Vec<&Binding> = self.bindings.get(user).map(|l| l.iter().filter(|b| b.expires_at > now).collect()).unwrap_or_default();
        v.sort_by_key(|b| std::cmp::Reverse(b.registered_at));
        v
    }

    /// Drops every binding reached through `peer` (its WebSocket closed); returns how many.
    pub fn remove_peer(&mut self, peer: Peer) -> usize {
        let mut n = 0;
        self.bindings.retain(|_, l| {
            let before = l.len();
            l.retain(|b| b.peer != peer);
            n += before - l.len();
            !l.is_empty()
        });
        n
    }

    /// Drops expired bindings (called periodically).
    pub fn purge(&mut self, now: Instant) -> usize {
        let mut n = 0;
        self.bindings.retain(|_, l| {
            let before = l.len();
            l.retain(|b| b.expires_at > now);
            n += before - l.len();
            !l.is_empty()
        });
        n
    }

    pub fn count(&self) -> usize {
        self.bindings.values().map(Vec::len).sum()
    }
}

/// `sip:user@192.0.2.1:5070;transport=tcp` → 192.0.2.1:5070 (5060 by default); None for host names.
fn contact_socket_addr(uri: &str) -> Option<std::net::SocketAddr> {
    let u = rsipstack::sip::Uri::try_from(uri).ok()?;
    let rsipstack::sip::Host::IpAddr(ip) = u.host_with_port.host else { return None };
    let port = u.host_with_port.port.map(u16::from).unwrap_or(5060);
    Some(std::net::SocketAddr::new(ip, port))
}

/// RFC 3261 §19.1.4 URI comparison, simplified: scheme, user, host, port.
fn same_contact(a: &str, b: &str) -> bool {
    let strip = |s: &str| s.split(';').next().unwrap_or(s).to_ascii_lowercase();
    strip(a) == strip(b)
}

fn httpdate_now() -> String {
    httpdate::fmt_http_date(std::time::SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::msg::Proto;

    fn reg(contact: &str, expires: Option<u32>, cseq: u32) -> Incoming {
        let exp = expires.map(|e| format!("Expires: {e}\r\n")).unwrap_or_default();
        let text = format!(
            "REGISTER sip:acme.localhost SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK{cseq}\r\nMax-Forwards: 70\r\nFrom: <sip:1001@acme.localhost>;tag=a\r\nTo: <sip:1001@acme.localhost>\r\nCall-ID: reg1\r\nCSeq: {cseq} REGISTER\r\nContact: {contact}\r\n{exp}Content-Length: 0\r\n\r\n"
        );
        Incoming::parse(text.as_bytes(), Peer { proto: Proto::Udp, addr: "127.0.0.1:5070".parse().unwrap() }).unwrap()
    }

    impl Registrar {
        fn register_t(&mut self, inc: &Incoming, user: &str, l: ExpiryLimits, tag: &str, host: &str, now: Instant) -> Response {
            let req = inc.request().unwrap().clone();
            self.register(inc, &req, user, l, tag, host, now)
        }
    }

    const LIM: ExpiryLimits = ExpiryLimits { min: 60, max: 3600 };

    #[test]
    fn register_lookup_expire_unregister() {
        let mut r = Registrar::default();
        let t0 = Instant::now();
        let resp = r.register_t(&reg("<sip:1001@127.0.0.1:5070>", Some(120), 1), "1001", LIM, "t", "h", t0);
        assert_eq!(u16::from(resp.status_code.clone()), 200);
        assert!(msg::header(&resp.headers, "Contact").unwrap().contains("expires=120"));
        assert_eq!(r.lookup("1001", t0).len(), 1);
        // Two contacts, then one removed with expires=0.
        r.register_t(&reg("<sip:1001@127.0.0.1:5071>;expires=300", None, 2), "1001", LIM, "t", "h", t0);
        assert_eq!(r.lookup("1001", t0).len(), 2);
        r.register_t(&reg("<sip:1001@127.0.0.1:5070>", Some(0), 3), "1001", LIM, "t", "h", t0);
        assert_eq!(r.lookup("1001", t0).len(), 1);
        // Expiry.
        assert_eq!(r.lookup("1001", t0 + Duration::from_secs(301)).len(), 0);
        assert_eq!(r.purge(t0 + Duration::from_secs(301)), 1);
        // Too brief → 423 with Min-Expires.
        let resp = r.register_t(&reg("<sip:1001@127.0.0.1:5070>", Some(10), 4), "1001", LIM, "t", "h", t0);
        assert_eq!(u16::from(resp.status_code.clone()), 423);
        assert_eq!(msg::header(&resp.headers, "Min-Expires"), Some("60"));
        // Wildcard removal.
        r.register_t(&reg("<sip:1001@127.0.0.1:5070>", Some(100), 5), "1001", LIM, "t", "h", t0);
        let resp = r.register_t(&reg("*", Some(0), 6), "1001", LIM, "t", "h", t0);
        assert_eq!(u16::from(resp.status_code.clone()), 200);
        assert_eq!(r.count(), 0);
    }

    #[test]
    fn date_format() {
        let d = httpdate_now();
        assert!(d.ends_with(" GMT") && d.len() == 29, "{d}");
    }
}
