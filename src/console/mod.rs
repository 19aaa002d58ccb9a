//! Administration and the node's HTTP side.
//!
//! - [`admin`]: the local admin socket (used by the `crossbar` commands).
//! - [`http`]: the HTTP/1.1 server (static pages, login, the WebSocket upgrade).
//! - [`softphone`]: agent login (argon2), rate limits, short-lived SIP credentials.

pub mod admin;
pub mod http;
pub mod softphone;

use crate::config::{Config, ConfigError};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// `[http]` in the node file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// Plain HTTP listen address: the softphone page, the login API and SIP over WS on `/sip`.
    pub listen: SocketAddr,
    /// Optional HTTPS/WSS listen address (needs `tls_cert` and `tls_key`).
    #[serde(default)]
    pub tls: Option<SocketAddr>,
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Directory of the built web pages (`web/dist`, made by `make web`).
    #[serde(default = "default_web_root")]
    pub web_root: PathBuf,
    /// Lifetime of the SIP credentials a softphone login hands out.
    #[serde(default = "default_credential_ttl")]
    pub softphone_credential_ttl_s: u64,
}

fn default_web_root() -> PathBuf {
    PathBuf::from("../web/dist")
}

fn default_credential_ttl() -> u64 {
    8 * 3600
}

impl HttpSection {
    /// Makes relative paths relative to the node file's directory.
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in [&mut self.tls_cert, &mut self.tls_key].into_iter().flatten() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if self.web_root.is_relative() {
            self.web_root = base.join(&self.web_root);
        }
    }
}

/// Checks `[http]` and every tenant's `[[agent]]`s.
pub fn validate(config: &Config) -> Result<(), ConfigError> {
    if let Some(h) = &config.http {
        if h.tls.is_some() && (h.tls_cert.is_none() || h.tls_key.is_none()) {
            return Err(ConfigError::new(&config.file, "http.tls", "HTTPS/WSS listener without certificate", "set http.tls_cert and http.tls_key, or remove http.tls"));
        }
        if h.softphone_credential_ttl_s < 60 {
            return Err(ConfigError::new(&config.file, "http.softphone_credential_ttl_s", "shorter than a minute", "use e.g. 28800 (a shift)"));
        }
    }
    for t in &config.tenants {
        let mut names = std::collections::HashSet::new();
        for (i, a) in t.agents.iter().enumerate() {
            let field = |f: &str| format!("agent[{i}].{f}");
            let Some((_, domain)) = a.username.rsplit_once('@') else {
                return Err(ConfigError::new(&t.file, field("username"), format!("{:?} has no @domain", a.username), format!("write it as name@{}", t.domain)));
            };
            if !domain.eq_ignore_ascii_case(&t.domain) {
                return Err(ConfigError::new(&t.file, field("username"), format!("{:?} is not in this tenant's domain", a.username), format!("write it as name@{}", t.domain)));
            }
            if !names.insert(a.username.to_ascii_lowercase()) {
                return Err(ConfigError::new(&t.file, field("username"), format!("{} appears twice", a.username), "remove the duplicate"));
            }
            if argon2::password_hash::PasswordHash::new(&a.password_hash).is_err() {
                return Err(ConfigError::new(&t.file, field("password_hash"), "not an argon2 PHC string", "make one with `cargo run --example hash_password -- PASSWORD`"));
            }
            if !t.users.iter().any(|u| u.extension == a.extension) {
                return Err(ConfigError::new(&t.file, field("extension"), format!("extension {} does not exist in this tenant", a.extension), "add a [[user]] with that extension or bind the agent to an existing one"));
            }
        }
    }
    Ok(())
}
