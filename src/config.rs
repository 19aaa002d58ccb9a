//! Node and tenant configuration.
//!
//! The node file (`config/crossbar.toml`) names the SIP listeners, the media
//! address and port range, the data directory and the carrier trunks; it points
//! at a directory of tenant files (`config/tenants/*.toml`), one per tenant,
//! which bootstrap the tenants on first start.
//!
//! Every error names the file, the field and what to do about it: a person
//! reading the message at start-up must be able to fix the file without
//! reading this code.

use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;
use crate::media::MediaIo;

/// A configuration error: which file, which field, what is wrong and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {field}: {problem}. Fix: {fix}")]
pub struct ConfigError {
    pub file: PathBuf,
    pub field: String,
    pub problem: String,
    pub fix: String,
}

impl ConfigError {
    pub(crate) fn new(file: &Path, field: impl Into<String>, problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Self { file: file.to_path_buf(), field: field.into(), problem: problem.into(), fix: fix.into() }
    }
}

/// The whole, validated configuration of one node.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub node: NodeSection,
    pub sip: SipSection,
    pub media: MediaSection,
    pub store: StoreSection,
    pub trunks: Vec<Trunk>,
    pub tenants: Vec<TenantConfig>,
    /// `[http]`: softphone page, login API, SIP over WebSocket (none: not served).
    pub http: Option<crate::console::HttpSection>,
}

/// Where tenant data lives.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// `embedded` (a redb file under data_dir; single node) or `redis` (cluster).
    #[serde(default = "default_backend")]
    pub backend: String,
    /// Redis URL for the redis backend, e.g. `redis://127.0.0.1:6379/0`.
    #[serde(default)]
    pub redis_url: Option<String>,
    /// The master key file (relative to data_dir) used when CROSSBAR_MASTER_KEY is not set.
    #[serde(default = "default_master_key_file")]
    pub master_key_file: PathBuf,
    /// The embedded store's page cache in MB. redb's own default is 1 GiB: with the
    /// records of 4,000 calls/s the node's RSS grew with the file (164 MB after 40 s,
    /// toward 1 GB); with 32 MB it stayed at 70 MB and used the same CPU per call.
    #[serde(default = "default_cache_mb")]
    pub cache_mb: usize,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection { backend: default_backend(), redis_url: None, master_key_file: default_master_key_file(), cache_mb: default_cache_mb() }
    }
}

fn default_cache_mb() -> usize {
    crate::store::embedded::DEFAULT_CACHE_MB
}

fn default_backend() -> String {
    "embedded".into()
}
fn default_master_key_file() -> PathBuf {
    PathBuf::from("master.key")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// Name of this node (logs, cluster membership).
    #[serde(default = "default_node_name")]
    pub name: String,
    /// Where the node keeps its data (relative paths are relative to the config file).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// A tracing filter: `info`, `debug`, `crossbar=debug,info`, ...
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// Calls in progress on this node above which new calls get 503.
    #[serde(default = "default_max_calls")]
    pub max_calls: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SipSection {
    /// UDP listen addresses, e.g. `["0.0.0.0:5060"]`.
    #[serde(default)]
    pub udp: Vec<SocketAddr>,
    /// TCP listen addresses.
    #[serde(default)]
    pub tcp: Vec<SocketAddr>,
    /// TLS listen address (needs `tls_cert` and `tls_key`).
    #[serde(default)]
    pub tls: Option<SocketAddr>,
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// The address crossbar writes into Via, Contact and Record-Route: what peers
    /// can reach. Defaults to the first UDP listen address when that is not 0.0.0.0.
    #[serde(default)]
    pub advertised_ip: Option<IpAddr>,
    /// RFC 3261 timer T1 in milliseconds (RTT estimate).
    #[serde(default = "default_t1")]
    pub t1_ms: u64,
    /// RFC 3261 timer T2 in milliseconds (max retransmit interval for non-INVITE).
    #[serde(default = "default_t2")]
    pub t2_ms: u64,
    /// RFC 3261 timer T4 in milliseconds (max time a message stays in the network).
    #[serde(default = "default_t4")]
    pub t4_ms: u64,
    /// How long a call may ring before crossbar gives up (408 to the caller).
    #[serde(default = "default_ring_timeout")]
    pub ring_timeout_s: u64,
    /// A new call whose INVITE has already waited this long inside crossbar (the node
    /// is short of CPU) is refused at once with 503 and Retry-After, so that the calls
    /// already admitted keep their pace instead of all slowing into retransmissions.
    /// On UDP the wait counts from the datagram's kernel receive time, so time spent in
    /// the socket's buffer counts too. 0 turns it off. 100 rather than 250: at 8,000
    /// calls/s offered to a node that carries ~7,000, 250 left the socket buffer
    /// overflowing and the media ports running out (50,000 of 80,000 calls completed),
    /// 100 shed cleanly (65,000-68,000, no retransmission).
    #[serde(default = "default_overload_wait")]
    pub overload_wait_ms: u64,
    /// Registration expiry bounds in seconds.
    #[serde(default = "default_min_expires")]
    pub min_expires: u32,
    #[serde(default = "default_max_expires")]
    pub max_expires: u32,
    /// Offer the SHA-256 digest challenge before the MD5 one (RFC 8760 order of
    /// preference). Off by default: many deployed UAs (SIPp 3.6 among them) only
    /// read the first challenge and know only MD5. Both are always offered.
    #[serde(default)]
    pub digest_sha256_first: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MediaSection {
    /// Address RTP sockets bind to.
    pub bind_ip: IpAddr,
    /// Address written into SDP (what the parties send media to).
    pub public_ip: IpAddr,
    pub rtp_port_min: u16,
    pub rtp_port_max: u16,
    /// Media threads (epoll loops) relaying RTP; the port range is split between them.
    /// One relays ~1,000 plain calls on one core (README figures).
    #[serde(default = "default_media_threads")]
    pub threads: usize,
    /// How the media threads do their socket I/O: "auto" (the default: io_uring where
    /// the kernel allows it, else system calls), "uring" (or the node does not start),
    /// "syscalls".
    #[serde(default)]
    pub io: MediaIo,
}

fn default_media_threads() -> usize {
    1
}

/// A carrier trunk shared by the platform.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trunk {
    pub name: String,
    /// Source IP addresses from which inbound calls are accepted (IP authentication).
    #[serde(default)]
    pub inbound_sources: Vec<IpAddr>,
    /// Where outbound calls go, as `host:port` (UDP).
    #[serde(default)]
    pub outbound: Option<SocketAddr>,
}

/// One tenant's bootstrap configuration.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Stable identifier: lowercase letters, digits and '-'.
    pub id: String,
    #[serde(default)]
    pub name: String,
    /// SIP domain and digest realm of this tenant, e.g. `acme.localhost`.
    pub domain: String,
    #[serde(default, rename = "did")]
    pub dids: Vec<DidConfig>,
    #[serde(default, rename = "user")]
    pub users: Vec<UserConfig>,
    /// Plan: `starter`, `pro` or `enterprise` (see [`Plan`]).
    #[serde(default)]
    pub plan: Plan,
    /// Per-tenant overrides of the plan's limits.
    #[serde(default)]
    pub limits: LimitOverrides,
    /// Call recording policy: `none`, `all`, or `dids` (only DIDs with `record = true`).
    #[serde(default)]
    pub recording: RecordingPolicy,
    /// Softphone agents (login name, argon2 hash, extension).
    #[serde(default, rename = "agent")]
    pub agents: Vec<crate::console::softphone::AgentConfig>,
    #[serde(skip)]
    pub file: PathBuf,
}

/// A tenant's commercial plan; each gives default limits (overridable per tenant).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Plan {
    #[default]
    Starter,
    Pro,
    Enterprise,
}

/// Effective limits of a tenant.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Limits {
    /// Users (agents/extensions); `None` = no limit.
    pub max_agents: Option<usize>,
    /// Calls in progress.
    pub max_calls: usize,
    /// New calls per second (token bucket, burst = one second's worth).
    pub calls_per_second: f64,
    /// Whether the plan includes call recording.
    pub recording: bool,
    /// Recording storage, in MB.
    pub recording_storage_mb: u64,
}

impl Plan {
    pub fn as_str(self) -> &'static str {
        match self {
            Plan::Starter => "starter",
            Plan::Pro => "pro",
            Plan::Enterprise => "enterprise",
        }
    }

    pub fn defaults(self) -> Limits {
        match self {
            Plan::Starter => Limits { max_agents: Some(10), max_calls: 20, calls_per_second: 5.0, recording: false, recording_storage_mb: 0 },
            Plan::Pro => Limits { max_agents: Some(50), max_calls: 200, calls_per_second: 20.0, recording: true, recording_storage_mb: 10_240 },
            Plan::Enterprise => Limits { max_agents: None, max_calls: 5_000, calls_per_second: 500.0, recording: true, recording_storage_mb: 512_000 },
        }
    }

    pub fn parse(s: &str) -> Option<Plan> {
        match s.to_ascii_lowercase().as_str() {
            "starter" => Some(Plan::Starter),
            "pro" => Some(Plan::Pro),
            "enterprise" => Some(Plan::Enterprise),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitOverrides {
    pub max_calls: Option<usize>,
    pub calls_per_second: Option<f64>,
    pub recording_storage_mb: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordingPolicy {
    #[default]
    None,
    All,
    Dids,
}

impl TenantConfig {
    /// The plan's limits with this tenant's overrides applied.
    pub fn limits(&self) -> Limits {
        let mut l = self.plan.defaults();
        if let Some(v) = self.limits.max_calls {
            l.max_calls = v;
        }
        if let Some(v) = self.limits.calls_per_second {
            l.calls_per_second = v;
        }
        if let Some(v) = self.limits.recording_storage_mb {
            l.recording_storage_mb = v;
        }
        l
    }

    /// Whether a call arriving on `did` (None: not a DID call) is recorded.
    pub fn records(&self, did: Option<&str>) -> bool {
        match self.recording {
            RecordingPolicy::None => false,
            RecordingPolicy::All => true,
            RecordingPolicy::Dids => did.is_some_and(|d| self.dids.iter().any(|x| x.number == d && x.record)),
        }
    }

    /// Plan rules a tenant configuration must satisfy (also for runtime changes).
    pub fn check_plan(&self) -> Result<(), (String, String, String)> {
        let l = self.limits();
        if let Some(max) = l.max_agents {
            if self.users.len() > max {
                return Err(("plan".into(), format!("{} users but plan {} allows {max} agents", self.users.len(), self.plan.as_str()), "upgrade the plan or remove users".into()));
            }
        }
        if self.recording != RecordingPolicy::None && !l.recording {
            return Err(("recording".into(), format!("plan {} does not include call recording", self.plan.as_str()), "set recording = \"none\" or upgrade to pro/enterprise".into()));
        }
        if l.calls_per_second.is_nan() || l.calls_per_second <= 0.0 || l.max_calls == 0 {
            return Err(("limits".into(), "calls_per_second and max_calls must be > 0".into(), "use positive limits".into()));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DidConfig {
    /// E.164 number without '+', e.g. `15550001000`.
    pub number: String,
    /// The extension the DID rings.
    pub extension: String,
    /// Record calls on this DID (with `recording = "dids"`).
    #[serde(default)]
    pub record: bool,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// SIP user name and extension number, e.g. `1001`.
    pub extension: String,
    /// SIP digest password.
    pub password: String,
    #[serde(default)]
    pub display_name: Option<String>,
}

fn default_node_name() -> String {
    "crossbar-1".into()
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}
fn default_log_level() -> String {
    "info".into()
}
fn default_max_calls() -> usize {
    20_000
}
fn default_t1() -> u64 {
    500
}
fn default_t2() -> u64 {
    4000
}
fn default_t4() -> u64 {
    5000
}
fn default_overload_wait() -> u64 {
    100
}

fn default_ring_timeout() -> u64 {
    120
}
fn default_min_expires() -> u32 {
    60
}
fn default_max_expires() -> u32 {
    3600
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    node: NodeSection,
    sip: SipSection,
    media: MediaSection,
    #[serde(default)]
    store: StoreSection,
    #[serde(default, rename = "trunk")]
    trunks: Vec<Trunk>,
    #[serde(default)]
    http: Option<crate::console::HttpSection>,
    /// Directory of tenant files, relative to the node file.
    #[serde(default = "default_tenants_dir")]
    tenants_dir: PathBuf,
}

fn default_tenants_dir() -> PathBuf {
    PathBuf::from("tenants")
}

impl Config {
    /// Reads and validates the node file and every `*.toml` in its tenants directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(path, "(file)", format!("cannot read it: {e}"), "pass an existing file with --config")
        })?;
        let parsed: NodeFile = parse_toml(path, &text)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let tenants_dir = base.join(&parsed.tenants_dir);
        let mut tenants = Vec::new();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&tenants_dir)
            .map_err(|e| {
                ConfigError::new(
                    path,
                    "tenants_dir",
                    format!("cannot read directory {}: {e}", tenants_dir.display()),
                    "create it or point tenants_dir at the directory of tenant files",
                )
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| ConfigError::new(&file, "(file)", format!("cannot read it: {e}"), "check its permissions"))?;
            let mut tenant: TenantConfig = parse_toml(&file, &text)?;
            tenant.file = file;
            tenants.push(tenant);
        }
        let mut node = parsed.node;
        if node.data_dir.is_relative() {
            node.data_dir = base.join(&node.data_dir);
        }
        let mut sip = parsed.sip;
        for p in [&mut sip.tls_cert, &mut sip.tls_key].into_iter().flatten() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        let mut store = parsed.store;
        if store.master_key_file.is_relative() {
            store.master_key_file = node.data_dir.join(&store.master_key_file);
        }
        let mut http = parsed.http;
        if let Some(h) = &mut http {
            h.resolve_paths(base);
        }
        let config = Config { file: path.to_path_buf(), node, store, sip, media: parsed.media, trunks: parsed.trunks, tenants, http };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let f = &self.file;
        if self.sip.udp.is_empty() && self.sip.tcp.is_empty() {
            return Err(ConfigError::new(f, "sip.udp", "no SIP listener is configured", "add e.g. udp = [\"0.0.0.0:5060\"]"));
        }
        if self.sip.tls.is_some() && (self.sip.tls_cert.is_none() || self.sip.tls_key.is_none()) {
            return Err(ConfigError::new(f, "sip.tls", "TLS listener without certificate", "set sip.tls_cert and sip.tls_key, or remove sip.tls"));
        }
        if self.advertised_ip().is_none() {
            return Err(ConfigError::new(
                f,
                "sip.advertised_ip",
                "cannot tell which address peers reach this node at (listeners bind 0.0.0.0)",
                "set sip.advertised_ip to this node's reachable address, e.g. \"127.0.0.1\"",
            ));
        }
        if self.sip.t1_ms == 0 || self.sip.t2_ms < self.sip.t1_ms {
            return Err(ConfigError::new(f, "sip.t1_ms", "T1 must be > 0 and T2 >= T1", "use the RFC 3261 defaults t1_ms = 500, t2_ms = 4000"));
        }
        if self.sip.overload_wait_ms > 60_000 {
            return Err(ConfigError::new(f, "sip.overload_wait_ms", format!("{} ms", self.sip.overload_wait_ms), "use a wait below T1 (e.g. the default 100), or 0 to turn the check off"));
        }
        if self.sip.min_expires == 0 || self.sip.max_expires < self.sip.min_expires {
            return Err(ConfigError::new(f, "sip.min_expires", "min_expires must be > 0 and <= max_expires", "e.g. min_expires = 60, max_expires = 3600"));
        }
        let m = &self.media;
        if m.public_ip.is_unspecified() {
            return Err(ConfigError::new(f, "media.public_ip", "0.0.0.0 cannot be advertised in SDP", "set the address the parties can send RTP to"));
        }
        if !m.rtp_port_min.is_multiple_of(2) || m.rtp_port_min < 1024 || m.rtp_port_max < m.rtp_port_min.saturating_add(3) {
            return Err(ConfigError::new(
                f,
                "media.rtp_port_min",
                format!("invalid RTP port range {}..{}", m.rtp_port_min, m.rtp_port_max),
                "use an even rtp_port_min >= 1024 and rtp_port_max at least 4 ports above it, e.g. 20000..40000",
            ));
        }
        if m.threads == 0 || m.threads > 64 {
            return Err(ConfigError::new(f, "media.threads", format!("{} media threads", m.threads), "use 1 (the default) up to the number of cores"));
        }
        if m.io == MediaIo::Uring {
            if let Err(e) = crate::media::uring_available() {
                return Err(ConfigError::new(
                    f,
                    "media.io",
                    format!("io_uring is not available to this process: {e}"),
                    "use io = \"auto\" (falls back to system calls), or allow io_uring (the container's seccomp profile, sysctl kernel.io_uring_disabled)",
                ));
            }
        }
        match self.store.backend.as_str() {
            "embedded" => {}
            "redis" if self.store.redis_url.is_some() => {}
            "redis" => return Err(ConfigError::new(f, "store.redis_url", "the redis backend needs a URL", "set redis_url = \"redis://host:6379/0\"")),
            other => return Err(ConfigError::new(f, "store.backend", format!("unknown backend {other:?}"), "use \"embedded\" or \"redis\"")),
        }
        if !(1..=65_536).contains(&self.store.cache_mb) {
            return Err(ConfigError::new(f, "store.cache_mb", format!("{} MB", self.store.cache_mb), "use a cache between 1 and 65536 MB (default 64)"));
        }
        let mut trunk_names = HashSet::new();
        for (i, t) in self.trunks.iter().enumerate() {
            if !trunk_names.insert(t.name.as_str()) {
                return Err(ConfigError::new(f, format!("trunk[{i}].name"), format!("duplicate trunk name {:?}", t.name), "give every trunk a unique name"));
            }
        }
        let mut ids = HashSet::new();
        let mut domains = HashSet::new();
        let mut dids: HashMap<&str, &str> = HashMap::new();
        for t in &self.tenants {
            let tf = &t.file;
            if t.id.is_empty() || t.id.len() > 63 || !t.id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
                return Err(ConfigError::new(tf, "id", format!("invalid tenant id {:?}", t.id), "use 1-63 lowercase letters, digits or '-'"));
            }
            if !ids.insert(t.id.as_str()) {
                return Err(ConfigError::new(tf, "id", format!("tenant id {:?} is used by another tenant file", t.id), "give every tenant a unique id"));
            }
            let domain = t.domain.to_ascii_lowercase();
            if domain.is_empty() || domain.contains(|c: char| c.is_whitespace() || c == '@' || c == ':') {
                return Err(ConfigError::new(tf, "domain", format!("invalid SIP domain {:?}", t.domain), "use a host name such as acme.example.com"));
            }
            if !domains.insert(domain) {
                return Err(ConfigError::new(tf, "domain", format!("domain {:?} is used by another tenant", t.domain), "every tenant needs its own domain"));
            }
            let mut exts = HashSet::new();
            for (i, u) in t.users.iter().enumerate() {
                if u.extension.is_empty() || !u.extension.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_') {
                    return Err(ConfigError::new(tf, format!("user[{i}].extension"), format!("invalid extension {:?}", u.extension), "use letters, digits, '.', '-' or '_'"));
                }
                if !exts.insert(u.extension.as_str()) {
                    return Err(ConfigError::new(tf, format!("user[{i}].extension"), format!("extension {} appears twice", u.extension), "remove the duplicate"));
                }
                if u.password.len() < 8 {
                    return Err(ConfigError::new(tf, format!("user[{i}].password"), "password shorter than 8 characters", "use a longer password"));
                }
            }
            if let Err((field, problem, fix)) = t.check_plan() {
                return Err(ConfigError::new(tf, field, problem, fix));
            }
            for (i, d) in t.dids.iter().enumerate() {
                if d.number.len() < 3 || d.number.len() > 15 || !d.number.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(ConfigError::new(tf, format!("did[{i}].number"), format!("{:?} is not an E.164 number", d.number), "write digits only, country code first, no '+', e.g. 15550001000"));
                }
                if let Some(other) = dids.insert(d.number.as_str(), t.id.as_str()) {
                    return Err(ConfigError::new(tf, format!("did[{i}].number"), format!("DID {} is already assigned to tenant {other}", d.number), "a DID belongs to one tenant only"));
                }
                if !exts.contains(d.extension.as_str()) {
                    return Err(ConfigError::new(tf, format!("did[{i}].extension"), format!("extension {} does not exist in this tenant", d.extension), "add a [[user]] with that extension or route the DID to an existing one"));
                }
            }
        }
        crate::console::validate(self)
    }

    /// The address crossbar puts into Via/Contact.
    pub fn advertised_ip(&self) -> Option<IpAddr> {
        self.sip.advertised_ip.or_else(|| {
            self.sip.udp.iter().chain(self.sip.tcp.iter()).map(|a| a.ip()).find(|ip| !ip.is_unspecified())
        })
    }

    pub fn timers(&self) -> (Duration, Duration, Duration) {
        (Duration::from_millis(self.sip.t1_ms), Duration::from_millis(self.sip.t2_ms), Duration::from_millis(self.sip.t4_ms))
    }
}

/// Parses TOML and turns serde's error into one that names the field and the line.
fn parse_toml<T: serde::de::DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
        // Where serde was (`media.io`; `.` at the top level, or inside the table of a
        // missing/unknown field), then the error itself.
        let path = e.path().to_string();
        let e = e.into_inner();
        let line = e.span().map(|s| text.as_bytes()[..s.start.min(text.len())].iter().filter(|b| **b == b'\n').count() + 1);
        let msg = e.message().to_string();
        // serde names a missing or unknown field in its message ("missing field `domain`").
        let named = msg.split('`').nth(1).map(str::to_string);
        let table = (path != ".").then_some(path);
        let field = if msg.contains("unknown field") || msg.contains("missing field") {
            match (table, named) {
                // An unknown field's path ends with it; a missing field's names its table.
                (Some(t), Some(n)) if t == n || t.ends_with(&format!(".{n}")) => t,
                (Some(t), Some(n)) => format!("{t}.{n}"),
                (None, Some(n)) => n,
                (t, None) => t.unwrap_or_else(|| "(syntax)".into()),
            }
        } else {
            table.or(named).unwrap_or_else(|| "(syntax)".into())
        };
        let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();
        let fix = if msg.contains("unknown field") {
            "remove or correct the misspelled field; see config/crossbar.toml for the accepted fields".to_string()
        } else if msg.contains("missing field") {
            "add the field; see config/crossbar.toml for an example".to_string()
        } else {
            "correct the value's syntax/type; see config/crossbar.toml for an example".to_string()
        };
        ConfigError::new(file, format!("{field}{at}"), msg, fix)
    })
}

impl fmt::Display for TenantConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.id, self.domain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::create_dir_all(dir.join(name).parent().unwrap()).unwrap();
        std::fs::write(dir.join(name), text).unwrap();
    }

    const NODE: &str = r#"
[node]
[sip]
udp = ["127.0.0.1:5060"]
[media]
bind_ip = "127.0.0.1"
public_ip = "127.0.0.1"
rtp_port_min = 20000
rtp_port_max = 20100
"#;

    #[test]
    fn shipped_demo_config_is_valid() {
        let c = Config::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config/crossbar.toml"))).unwrap();
        assert_eq!(c.tenants.len(), 2);
        assert!(c.tenants.iter().any(|t| t.domain == "acme.localhost"));
        assert_eq!(c.trunks[0].name, "demo-carrier");
    }

    #[test]
    fn errors_name_file_field_and_fix() {
        let dir = std::env::temp_dir().join(format!("cb-cfg-{}", std::process::id()));
        write(&dir, "node.toml", NODE);
        write(&dir, "tenants/a.toml", "id = \"acme\"\ndomain = \"a.test\"\n[[did]]\nnumber = \"1555\"\nextension = \"1001\"\n");
        let e = Config::load(&dir.join("node.toml")).unwrap_err();
        assert!(e.file.ends_with("tenants/a.toml"), "{e}");
        assert_eq!(e.field, "did[0].extension");
        assert!(e.to_string().contains("Fix:"));

        write(&dir, "tenants/a.toml", "id = \"acme\"\ndomian = \"a.test\"\n");
        let e = Config::load(&dir.join("node.toml")).unwrap_err();
        assert!(e.field.starts_with("domian (line 2)"), "{e}");

        write(&dir, "tenants/a.toml", "id = \"acme\"\ndomain = \"a.test\"\n");
        write(&dir, "tenants/b.toml", "id = \"globex\"\ndomain = \"A.test\"\n");
        let e = Config::load(&dir.join("node.toml")).unwrap_err();
        assert_eq!(e.field, "domain");
        assert!(e.file.ends_with("tenants/b.toml"));

        write(&dir, "node.toml", &NODE.replace("20000", "20001"));
        std::fs::remove_file(dir.join("tenants/b.toml")).unwrap();
        let e = Config::load(&dir.join("node.toml")).unwrap_err();
        assert_eq!(e.field, "media.rtp_port_min");

        write(&dir, "node.toml", NODE);
        assert_eq!(Config::load(&dir.join("node.toml")).unwrap().sip.overload_wait_ms, 100);
        write(&dir, "node.toml", &NODE.replace("[media]", "overload_wait_ms = 90000\n[media]"));
        let e = Config::load(&dir.join("node.toml")).unwrap_err();
        assert_eq!(e.field, "sip.overload_wait_ms");
        write(&dir, "node.toml", &NODE.replace("[media]", "overload_wait_ms = 0\n[media]"));
        assert_eq!(Config::load(&dir.join("node.toml")).unwrap().sip.overload_wait_ms, 0);

        write(&dir, "node.toml", NODE);
        assert_eq!(Config::load(&dir.join("node.toml")).unwrap().store.cache_mb, 64);
        write(&dir, "node.toml", &format!("{NODE}[store]\ncache_mb = 0\n"));
        let e = Config::load(&dir.join("node.toml")).unwrap_err();
        assert_eq!(e.field, "store.cache_mb");
        assert!(e.to_string().contains("between 1 and 65536"), "{e}");
        write(&dir, "node.toml", &format!("{NODE}[store]\ncache_mb = 16\n"));
        assert_eq!(Config::load(&dir.join("node.toml")).unwrap().store.cache_mb, 16);

        write(&dir, "node.toml", &format!("{NODE}threads = 0\n"));
        let e = Config::load(&dir.join("node.toml")).unwrap_err();
        assert_eq!(e.field, "media.threads");
        assert!(e.to_string().contains("Fix:"));
        write(&dir, "node.toml", &format!("{NODE}threads = 2\n"));
        assert_eq!(Config::load(&dir.join("node.toml")).unwrap().media.threads, 2);

        assert_eq!(Config::load(&dir.join("node.toml")).unwrap().media.io, MediaIo::Auto);
        write(&dir, "node.toml", &format!("{NODE}io = \"syscalls\"\n"));
        assert_eq!(Config::load(&dir.join("node.toml")).unwrap().media.io, MediaIo::Syscalls);
        write(&dir, "node.toml", &format!("{NODE}io = \"epoll\"\n"));
        let e = Config::load(&dir.join("node.toml")).unwrap_err();
        assert!(e.field.starts_with("media.io (line "), "{e}");
        assert!(e.to_string().contains("expected one of `auto`, `uring`, `syscalls`"), "{e}");
        write(&dir, "node.toml", &NODE.replace("[media]", "[media]\nthreads = \"two\""));
        let e = Config::load(&dir.join("node.toml")).unwrap_err();
        assert!(e.field.starts_with("media.threads (line "), "{e}");
        write(&dir, "node.toml", &format!("{NODE}io = \"uring\"\n"));
        match crate::media::uring_available() {
            Ok(()) => assert_eq!(Config::load(&dir.join("node.toml")).unwrap().media.io, MediaIo::Uring),
            Err(_) => {
                let e = Config::load(&dir.join("node.toml")).unwrap_err();
                assert_eq!(e.field, "media.io");
                assert!(e.to_string().contains("Fix:"));
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
