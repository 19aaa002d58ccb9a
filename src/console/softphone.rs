//! Softphone login: an agent's username and password (argon2) in exchange for
//! short-lived SIP credentials, so no reusable SIP secret is kept in the browser.
//!
//! Contract (`POST /api/v1/softphone/login`, JSON `{"username", "password"}`):
//! `200 {"sip_uri", "sip_username", "sip_password", "ws_url", "expires_at", "ice_servers": []}`,
//! `401 {"error": {"code": "invalid_credentials", "message"}}`,
//! `429 {"error": {"code": "rate_limited", "message"}}` after too many failures for the
//! account or the source address.
//!
//! The SIP credentials are stateless: the digest user name is `EXT~EXPIRY` (unix
//! seconds) and the password an HMAC of tenant, extension and expiry under the node's
//! secret ([`NonceSecret::sign`]). The tenant's digest check derives the password again
//! ([`ephemeral_password`]) and accepts it until it expires; nothing is stored.

use crate::sip::auth::NonceSecret;
use argon2::password_hash::{PasswordHash, PasswordVerifier};
use base64::Engine;
use serde::Deserialize;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// An agent of a tenant who may log in to the softphone (`[[agent]]` in a tenant file).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Login name, `name@tenant-domain` (e.g. `alice@acme.localhost`).
    pub username: String,
    /// argon2 PHC string (`$argon2id$v=19$...`); `cargo run --example hash_password` makes one.
    pub password_hash: String,
    /// The extension (a `[[user]]` of the tenant) the agent's softphone registers as.
    pub extension: String,
    #[serde(default)]
    pub display_name: Option<String>,
}

/// Separates these MACs from every other use of the node secret.
const PURPOSE: &str = "softphone-sip-password";

/// What a successful login hands the browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipGrant {
    pub sip_uri: String,
    pub sip_username: String,
    pub sip_password: String,
    /// Unix seconds.
    pub expires_at: u64,
    pub display_name: Option<String>,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn password_for(secret: &NonceSecret, tenant: &str, ext: &str, expires: u64) -> String {
    let mut msg = Vec::with_capacity(tenant.len() + ext.len() + 10);
    msg.extend_from_slice(tenant.as_bytes());
    msg.push(0);
    msg.extend_from_slice(ext.as_bytes());
    msg.push(0);
    msg.extend_from_slice(&expires.to_be_bytes());
    let mac = secret.sign(PURPOSE, &msg);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&mac[..18])
}

/// Short-lived SIP credentials for `ext` of `tenant`, valid for `ttl` from `now`.
pub fn grant(secret: &NonceSecret, tenant: &str, domain: &str, ext: &str, display_name: Option<String>, ttl: Duration, now: SystemTime) -> SipGrant {
    let expires_at = unix(now) + ttl.as_secs().max(1);
    SipGrant {
        sip_uri: format!("sip:{ext}@{domain}"),
        sip_username: format!("{ext}~{expires_at}"),
        sip_password: password_for(secret, tenant, ext, expires_at),
        expires_at,
        display_name,
    }
}

/// For a digest user name of the form `EXT~EXPIRY` that has not expired: the
/// extension it stands for and the password it must have been given.
pub fn ephemeral_password(secret: &NonceSecret, tenant: &str, digest_username: &str, now: SystemTime) -> Option<(String, String)> {
    let (ext, exp) = digest_username.rsplit_once('~')?;
    let expires: u64 = exp.parse().ok()?;
    if ext.is_empty() || expires <= unix(now) {
        return None;
    }
    Some((ext.to_string(), password_for(secret, tenant, ext, expires)))
}

/// Checks `password` against an argon2 PHC string (constant work whatever the outcome).
pub fn verify_password(phc: &str, password: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(h) => argon2::Argon2::default().verify_password(password.as_bytes(), &h).is_ok(),
        Err(_) => false,
    }
}

/// A valid hash of a random string, verified when the user name is unknown so that
/// an unknown account takes as long to refuse as a wrong password.
pub const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$1F7E5dQmQO3ieBsnFJA2Ff5gffiKUY8ybGGBs1bqpRM";

/// Failed-login limits: per account and per source address, in a sliding window.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub per_account: usize,
    pub per_source: usize,
    pub window: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { per_account: 5, per_source: 20, window: Duration::from_secs(300) }
    }
}

/// Counts failed logins (sans-IO: every call takes `now`).
#[derive(Debug, Default)]
pub struct LoginLimiter {
    limits: Limits,
    accounts: HashMap<String, Vec<Instant>>,
    sources: HashMap<IpAddr, Vec<Instant>>,
}

impl LoginLimiter {
    pub fn new(limits: Limits) -> Self {
        LoginLimiter { limits, ..Default::default() }
    }

    /// `Some(wait)` when this account or address has failed too often: refuse
    /// without even checking the password.
    pub fn blocked(&mut self, account: &str, source: IpAddr, now: Instant) -> Option<Duration> {
        let w = self.limits.window;
        let a = wait(self.accounts.get_mut(account), self.limits.per_account, w, now);
        let s = wait(self.sources.get_mut(&source), self.limits.per_source, w, now);
        a.into_iter().chain(s).max()
    }

    pub fn failed(&mut self, account: &str, source: IpAddr, now: Instant) {
        self.accounts.entry(account.to_string()).or_default().push(now);
        self.sources.entry(source).or_default().push(now);
        // Bound memory against floods of made-up names.
        if self.accounts.len() > 100_000 || self.sources.len() > 100_000 {
            let w = self.limits.window;
            self.accounts.retain(|_, v| v.iter().any(|t| now.duration_since(*t) < w));
            self.sources.retain(|_, v| v.iter().any(|t| now.duration_since(*t) < w));
        }
    }

    /// A correct password clears the account's failures (not the address's).
    pub fn succeeded(&mut self, account: &str) {
        self.accounts.remove(account);
    }
}

fn wait(list: Option<&mut Vec<Instant>>, max: usize, window: Duration, now: Instant) -> Option<Duration> {
    let list = list?;
    list.retain(|t| now.saturating_duration_since(*t) < window);
    if list.len() >= max {
        let oldest = list.iter().min().copied()?;
        Some(window.saturating_sub(now.saturating_duration_since(oldest)).max(Duration::from_secs(1)))
    } else {
        None
    }
}

/// `2026-05-01T12:00:00Z` for unix seconds (RFC 3339, UTC).
pub fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn granted_credentials_verify_until_they_expire() {
        let secret = NonceSecret::from_bytes([3; 32]);
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let g = grant(&secret, "acme", "acme.localhost", "1001", None, Duration::from_secs(600), now);
        assert_eq!(g.sip_uri, "sip:1001@acme.localhost");
        assert_eq!(g.sip_username, "1001~1800000600");
        let (ext, pw) = ephemeral_password(&secret, "acme", &g.sip_username, now).unwrap();
        assert_eq!((ext.as_str(), pw.as_str()), ("1001", g.sip_password.as_str()));
        // Another tenant, another node secret, a later time: no.
        assert_ne!(ephemeral_password(&secret, "globex", &g.sip_username, now).unwrap().1, g.sip_password);
        assert_ne!(ephemeral_password(&NonceSecret::from_bytes([4; 32]), "acme", &g.sip_username, now).unwrap().1, g.sip_password);
        assert!(ephemeral_password(&secret, "acme", &g.sip_username, now + Duration::from_secs(600)).is_none());
        // Tampering with the expiry changes the password.
        assert_ne!(ephemeral_password(&secret, "acme", "1001~1800009999", now).unwrap().1, g.sip_password);
        assert!(ephemeral_password(&secret, "acme", "1001", now).is_none());
        assert!(ephemeral_password(&secret, "acme", "~1800009999", now).is_none());
    }

    #[test]
    fn argon2_verification() {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let phc = argon2::Argon2::default().hash_password(b"alice-demo-pw", &salt).unwrap().to_string();
        assert!(verify_password(&phc, "alice-demo-pw"));
        assert!(!verify_password(&phc, "alice-demo-pW"));
        assert!(!verify_password("not a hash", "x"));
        assert!(!verify_password(DUMMY_HASH, ""));
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());
    }

    #[test]
    fn failed_logins_are_limited_per_account_and_per_source() {
        let mut l = LoginLimiter::new(Limits { per_account: 3, per_source: 5, window: Duration::from_secs(60) });
        let t0 = Instant::now();
        let ip1: IpAddr = "10.0.0.1".parse().unwrap();
        let ip2: IpAddr = "10.0.0.2".parse().unwrap();
        for i in 0..3 {
            assert!(l.blocked("alice", ip1, t0).is_none());
            l.failed("alice", if i % 2 == 0 { ip1 } else { ip2 }, t0);
        }
        // The account is locked from any address; others are not.
        assert!(l.blocked("alice", ip2, t0 + Duration::from_secs(1)).is_some());
        assert!(l.blocked("bob", ip2, t0).is_none());
        // The window slides.
        assert!(l.blocked("alice", ip1, t0 + Duration::from_secs(61)).is_none());
        // Per source: many accounts from one address.
        for n in 0..5 {
            l.failed(&format!("user{n}"), ip1, t0 + Duration::from_secs(70));
        }
        assert!(l.blocked("carol", ip1, t0 + Duration::from_secs(71)).is_some());
        assert!(l.blocked("carol", ip2, t0 + Duration::from_secs(71)).is_none());
        l.failed("dave", ip2, t0 + Duration::from_secs(71));
        l.succeeded("dave");
        assert!(!l.accounts.contains_key("dave"));
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_800_000_000), "2027-01-15T08:00:00Z");
    }
}
