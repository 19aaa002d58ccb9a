//! Harness for the integration tests that run crossbar against real SIPp peers.
//!
//! Every test gets its own crossbar process, its own free ports and its own
//! temporary directory (config, SIPp logs), so tests run in parallel. Every
//! child process is killed when its guard is dropped and every wait is bounded,
//! so a broken server makes a test fail, never hang.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
/// The carrier's address: `[[trunk]] inbound_sources` and its `outbound` host.
pub const CARRIER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// The acme DID that rings extension 1001.
pub const ACME_DID: &str = "15550001000";

pub fn sipp_scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sipp").join(name)
}

pub fn test_data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

// ---------------------------------------------------------------------------
// Ports and directories

/// A port that is free for both UDP and TCP on `ip` right now. Another process
/// may take it before we use it; see [`take_ports`] for why that is unlikely.
pub fn free_port(ip: IpAddr) -> u16 {
    take_ports(1, |port| udp_free(ip, port) && TcpListener::bind((ip, port)).is_ok())
        .or_else(|| {
            (0..50).find_map(|_| {
                let udp = UdpSocket::bind((ip, 0)).expect("bind an ephemeral UDP port");
                let port = udp.local_addr().unwrap().port();
                TcpListener::bind((ip, port)).is_ok().then_some(port)
            })
        })
        .unwrap_or_else(|| panic!("no port free for both UDP and TCP on {ip}"))
}

/// An even port `p` with `p..p+4` free on `ip` (an RTP/RTCP pair, plus slack),
/// for a SIPp's media.
pub fn free_media_port(ip: IpAddr) -> u16 {
    take_ports(4, |p| (p..p + 4).all(|q| udp_free(ip, q)))
        .or_else(|| (0..200).map(|_| 30000 + (pseudo_random() % 14000) as u16 * 2).find(|&p| (p..p + 4).all(|q| udp_free(ip, q))))
        .unwrap_or_else(|| panic!("no free media port pair on {ip}"))
}

/// The first of `count` consecutive ports (even when `count` > 1) for which
/// `free` holds, or None when the kernel leaves no room below its ephemeral range.
///
/// Every port a test hands to SIPp or to a node comes from here, in turn within
/// the process, from 28000 up to the kernel's ephemeral range (above the RTP
/// ranges of [`free_rtp_range`]):
/// - a port from the ephemeral range can be handed to an outgoing connection (a
///   browser's, a test client's) between this check and the bind; that once
///   failed a CI run with "Address already in use";
/// - a port picked at random can be picked again by a test running at the same
///   time, or can cover a port that a test checked free and then released
///   (`registered_uas` registers from its port, then starts SIPp on it): once a
///   SIPp UAS's SIP port was taken that way, and the INVITE to it went
///   unanswered. Handing ports out in turn means none is handed out twice
///   while a test runs.
fn take_ports(count: u32, free: impl Fn(u16) -> bool) -> Option<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, high) = (28_000u32, ephemeral_start().saturating_sub(1).min(u16::MAX as u32));
    if high <= low + 1000 {
        return None;
    }
    let span = (high - low + 1) & !1;
    let _ = NEXT.compare_exchange(0, (2 + (pseudo_random() % span as u64) as u32) & !1, Ordering::Relaxed, Ordering::Relaxed);
    // A block of more than one port starts on an even port: take one more, so
    // that rounding the start up stays inside what was taken.
    let step = if count > 1 { count + 1 } else { 1 };
    for _ in 0..span / step {
        let mut first = NEXT.fetch_add(step, Ordering::Relaxed) % span;
        if count > 1 {
            first = (first + 1) & !1;
        }
        if first + count > span {
            continue;
        }
        let port = (low + first) as u16;
        if free(port) {
            return Some(port);
        }
    }
    None
}

/// The first port of the kernel's ephemeral range (32768 when it cannot be read).
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32_768)
}

fn udp_free(ip: IpAddr, port: u16) -> bool {
    UdpSocket::bind((ip, port)).is_ok()
}

fn pseudo_random() -> u64 {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mut x = t ^ ((std::process::id() as u64) << 32) ^ (SEQ.fetch_add(1, Ordering::Relaxed) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // xorshift to spread the bits
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// A random 100-port RTP range for crossbar (even start), checked free on a few
/// sample ports. Ranges are drawn from 10000..28000 so they never overlap the
/// SIPp media ports of [`free_media_port`].
pub fn free_rtp_range() -> (u16, u16) {
    for _ in 0..200 {
        let start = 10000 + (pseudo_random() % 180) as u16 * 100;
        if [0u16, 2, 50, 98].iter().all(|o| udp_free(LOCALHOST, start + o)) {
            return (start, start + 99);
        }
    }
    panic!("no free RTP range");
}

/// A temporary directory, removed on drop unless the test failed (then kept
/// and its path printed so the SIPp logs can be read).
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("crossbar-it-{prefix}-{}-{:x}", std::process::id(), pseudo_random() & 0xffff_ffff));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("(test files kept in {})", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

// ---------------------------------------------------------------------------
// crossbar configuration and process

/// Where one crossbar instance of a test listens and sends.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub sip_udp: SocketAddr,
    pub sip_tcp: SocketAddr,
    pub rtp: (u16, u16),
    /// The carrier trunk's outbound address (a SIPp UAS listens there in tests
    /// that call out).
    pub trunk_outbound: SocketAddr,
    pub log_level: String,
    /// Extra lines for the `[sip]` section (e.g. a TLS listener).
    pub sip_extra: String,
    /// Use the Redis store backend at this URL (embedded when None).
    pub redis_url: Option<String>,
    /// Extra top-level lines for each demo tenant's file (plan, limits).
    pub acme_extra: String,
    pub globex_extra: String,
    /// The `[http]` listener (softphone, login API, SIP over WebSocket).
    pub http: SocketAddr,
    /// Extra lines for the `[http]` section (e.g. the HTTPS/WSS listener).
    pub http_extra: String,
    /// Extra lines for the `[media]` section (e.g. `io = "syscalls"`).
    pub media_extra: String,
    /// Environment variables for the node process (fault-injection hooks).
    pub env: Vec<(String, String)>,
    /// `sip.overload_wait_ms`. 1000 in tests, not the default 100: a debug build on a
    /// loaded 2-core CI machine can keep a test's INVITE waiting 100 ms, and a test
    /// call refused as overload would fail for the machine, not for crossbar. The
    /// overload tests set their own.
    pub overload_wait_ms: u64,
}

impl NodeConfig {
    /// Fresh free ports for everything.
    pub fn new() -> NodeConfig {
        let sip = free_port(LOCALHOST);
        NodeConfig {
            sip_udp: SocketAddr::new(LOCALHOST, sip),
            sip_tcp: SocketAddr::new(LOCALHOST, sip),
            rtp: free_rtp_range(),
            trunk_outbound: SocketAddr::new(CARRIER, free_port(CARRIER)),
            log_level: "info".into(),
            sip_extra: String::new(),
            redis_url: None,
            acme_extra: String::new(),
            globex_extra: String::new(),
            http_extra: String::new(),
            media_extra: String::new(),
            env: Vec::new(),
            overload_wait_ms: 1000,
            http: SocketAddr::new(LOCALHOST, free_port(LOCALHOST)),
        }
    }

    /// Writes `crossbar.toml` and `tenants/{acme,globex}.toml` into `dir`
    /// and returns the node file's path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let node = format!(
            r#"# written by tests/common/mod.rs
[node]
name = "crossbar-test"
data_dir = "data"
log_level = "{log}"

[sip]
udp = ["{udp}"]
tcp = ["{tcp}"]
advertised_ip = "127.0.0.1"
overload_wait_ms = {overload_wait_ms}
{sip_extra}

{store}

[http]
listen = "{http}"
web_root = "{web_root}"
{http_extra}

[media]
bind_ip = "127.0.0.1"
public_ip = "127.0.0.1"
rtp_port_min = {rmin}
rtp_port_max = {rmax}
{media_extra}

[[trunk]]
name = "demo-carrier"
inbound_sources = ["127.0.0.2"]
outbound = "{out}"
"#,
            log = self.log_level,
            udp = self.sip_udp,
            tcp = self.sip_tcp,
            rmin = self.rtp.0,
            rmax = self.rtp.1,
            out = self.trunk_outbound,
            sip_extra = self.sip_extra,
            overload_wait_ms = self.overload_wait_ms,
            store = self.redis_url.as_ref().map(|u| format!("[store]\nbackend = \"redis\"\nredis_url = \"{u}\"")).unwrap_or_default(),
            http = self.http,
            http_extra = self.http_extra,
            media_extra = self.media_extra,
            web_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("web/dist").display(),
        );
        std::fs::create_dir_all(dir.join("tenants")).unwrap();
        std::fs::create_dir_all(dir.join("data")).unwrap();
        std::fs::write(dir.join("crossbar.toml"), node).unwrap();
        // Extras go first: top-level keys must precede the [[did]]/[[user]] tables.
        std::fs::write(dir.join("tenants/acme.toml"), with_extra(ACME_TOML, &self.acme_extra)).unwrap();
        std::fs::write(dir.join("tenants/globex.toml"), with_extra(GLOBEX_TOML, &self.globex_extra)).unwrap();
        dir.join("crossbar.toml")
    }
}

/// A tenant file with extra settings: they go before the first `[[did]]` (top-level
/// keys must precede the array tables), and an extra `plan = ...` replaces the default one.
fn with_extra(base: &str, extra: &str) -> String {
    if extra.is_empty() {
        return base.to_string();
    }
    let mut base = base.to_string();
    if extra.lines().any(|l| l.trim_start().starts_with("plan")) {
        base = base.lines().filter(|l| !l.trim_start().starts_with("plan")).collect::<Vec<_>>().join("\n") + "\n";
    }
    base.replacen("[[did]]", &format!("{extra}\n\n[[did]]"), 1)
}

const ACME_TOML: &str = r#"id = "acme"
name = "Acme Corp"
domain = "acme.localhost"
plan = "enterprise"

[[did]]
number = "15550001000"
extension = "1001"

[[user]]
extension = "1001"
password = "acme1001pw"

[[user]]
extension = "1002"
password = "acme1002pw"

[[agent]]
username = "alice@acme.localhost"   # demo password: alice-demo-pw
password_hash = "$argon2id$v=19$m=19456,t=2,p=1$SXWDMYgZBkL8xvV5WL4Zag$iTJpIJXsNnKLPVDetf0lr58JenWH9weluyrIUr4ZoG8"
extension = "1001"
display_name = "Alice (Acme)"

[[agent]]
username = "bob@acme.localhost"     # demo password: bob-demo-pw
password_hash = "$argon2id$v=19$m=19456,t=2,p=1$+wZzgMqgx7ayhm/VYsD7iQ$DMgNcPLQSCbYz5t7lKxsDUNZL+UTn5Agz54YDvqnAcY"
extension = "1002"
display_name = "Bob (Acme)"
"#;

const GLOBEX_TOML: &str = r#"id = "globex"
name = "Globex Inc"
domain = "globex.localhost"
plan = "enterprise"

[[did]]
number = "15550002000"
extension = "2001"

[[user]]
extension = "2001"
password = "globex2001pw"

[[agent]]
username = "carol@globex.localhost" # demo password: carol-demo-pw
password_hash = "$argon2id$v=19$m=19456,t=2,p=1$gWvsBqmNlmfU/n/+QPwVeQ$Px/Wuj7gxp1ZbzrjwHloP1Fr+3CQqTW4cwXUs730fi4"
extension = "2001"
display_name = "Carol (Globex)"
"#;

/// One line `call ended ... key=value ...` of crossbar's log.
#[derive(Debug, Clone)]
pub struct CallEnded {
    pub line: String,
    pub fields: HashMap<String, String>,
}

impl CallEnded {
    pub fn get(&self, k: &str) -> Option<&str> {
        self.fields.get(k).map(String::as_str)
    }
    pub fn num(&self, k: &str) -> u64 {
        self.get(k).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no numeric field {k} in {:?}", self.line))
    }
}

/// Strips ANSI colour escapes (tracing's fmt colours when it thinks it may).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn parse_fields(line: &str) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for tok in line.split_whitespace() {
        if let Some((k, v)) = tok.split_once('=') {
            let k = k.rsplit(':').next().unwrap_or(k); // "call{tenant=x}:" spans
            m.insert(k.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '_').to_string(), v.trim_matches(|c| c == '"' || c == ',' || c == '}' || c == ':').to_string());
        }
    }
    m
}

/// Polls `f` every 100 ms until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A running crossbar. Killed (and reaped) on drop.
pub struct Crossbar {
    child: Child,
    pub config: NodeConfig,
    pub dir: TempDir,
    stderr: Arc<Mutex<Vec<String>>>,
    /// SIPp callees registered with this node ([`registered_uas`]): their SIP
    /// messages and errors so far are part of [`Crossbar::report`], so a failed
    /// call shows what its callee saw.
    callees: Mutex<Vec<(String, PathBuf, PathBuf)>>,
}

impl Crossbar {
    pub fn start(config: NodeConfig) -> Crossbar {
        let dir = TempDir::new("node");
        config.write(&dir.path);
        let (child, stderr) = spawn_node(&dir.path.join("crossbar.toml"), &config.env);
        Crossbar { child, config, dir, stderr, callees: Mutex::new(Vec::new()) }
    }

    /// SIGKILL: the node gets no chance to write anything.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the node again on the same configuration and data directory.
    pub fn restart(&mut self) {
        self.kill9();
        let (child, stderr) = spawn_node(&self.dir.path.join("crossbar.toml"), &self.config.env);
        self.child = child;
        self.stderr = stderr;
    }

    /// Runs `crossbar ARGS --config <this node's file>` (the admin commands) and
    /// returns (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_crossbar"))
            .args(args)
            .arg("--config")
            .arg(self.dir.path.join("crossbar.toml"))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .expect("run the crossbar command");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// `crossbar cdr list --tenant T --json`, parsed.
    pub fn cdrs(&self, tenant: &str) -> Vec<serde_json::Value> {
        let (ok, out, err) = self.cli(&["cdr", "list", "--tenant", tenant, "--json", "--limit", "10000"]);
        assert!(ok, "cdr list failed: {err}");
        serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap_or_else(|e| panic!("cdr list printed no JSON array ({e}): {out}"))
    }

    pub fn sip_addr(&self) -> SocketAddr {
        self.config.sip_udp
    }

    /// `ip:port` as SIPp's remote-host argument.
    pub fn sipp_target(&self) -> String {
        self.config.sip_udp.to_string()
    }

    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits (at most `timeout`) for a log line containing `text`, and returns
    /// it. The node prints "ready" on stdout, read by another thread than its
    /// log: a line logged before "ready" may not have been read yet.
    pub fn wait_log(&self, text: &str, timeout: Duration) -> Option<String> {
        wait_for(timeout, || self.stderr.lock().unwrap().iter().find(|l| l.contains(text)).cloned())
    }

    pub fn stderr_tail(&self, n: usize) -> String {
        let lines = self.stderr.lock().unwrap();
        let start = lines.len().saturating_sub(n);
        lines[start..].join("\n")
    }

    /// Every `call ended` line logged so far.
    pub fn calls_ended(&self) -> Vec<CallEnded> {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("call ended"))
            .map(|l| CallEnded { line: l.clone(), fields: parse_fields(l) })
            .collect()
    }

    /// Waits (bounded) until `n` calls have ended and returns them.
    pub fn wait_calls_ended(&self, n: usize, timeout: Duration) -> Vec<CallEnded> {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.calls_ended();
            if c.len() >= n || Instant::now() > deadline {
                return c;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends OPTIONS over UDP from a fresh socket and returns the status code.
    pub fn options_status(&self) -> Option<u16> {
        let sock = UdpSocket::bind((LOCALHOST, 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let me = sock.local_addr().unwrap();
        let msg = format!(
            "OPTIONS sip:{target} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-opt{r:x}\r\nMax-Forwards: 70\r\nFrom: <sip:probe@127.0.0.1>;tag=p{r:x}\r\nTo: <sip:{target}>\r\nCall-ID: opt-{r:x}@127.0.0.1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
            target = self.config.sip_udp,
            r = pseudo_random() & 0xffff_ffff,
        );
        for _ in 0..4 {
            sock.send_to(msg.as_bytes(), self.config.sip_udp).ok()?;
            let mut buf = [0u8; 65535];
            let deadline = Instant::now() + Duration::from_millis(500);
            while Instant::now() < deadline {
                match sock.recv_from(&mut buf) {
                    Ok((n, _)) => {
                        if let Some(code) = status_code(&buf[..n]) {
                            if code >= 200 {
                                return Some(code);
                            }
                        }
                    }
                    Err(_) => break,
                }
            }
        }
        None
    }

    /// Report for a failed assertion: crossbar's stderr tail.
    pub fn report(&self) -> String {
        let mut out = format!("--- crossbar stderr (tail) ---\n{}\n---", self.stderr_tail(80));
        for (name, messages, errors) in self.callees.lock().unwrap().iter() {
            let read = |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
            out += &format!("\n--- registered callee {name}: errors ---\n{}\n--- its SIP messages so far (tail) ---\n{}\n---", read(errors).trim(), tail(&read(messages), 60));
        }
        out
    }
}

/// Starts the binary on a config file and waits for `crossbar ready` (20 s).
fn spawn_node(file: &Path, env: &[(String, String)]) -> (Child, Arc<Mutex<Vec<String>>>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_crossbar"))
        .arg("run")
        .arg("--config")
        .arg(file)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("NO_COLOR", "1")
        .env_remove("CROSSBAR_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the crossbar binary");
    let stderr = Arc::new(Mutex::new(Vec::new()));
    {
        let buf = stderr.clone();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                buf.lock().unwrap().push(strip_ansi(&line));
            }
        });
    }
    let (tx, rx) = mpsc::channel();
    {
        let pipe = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("crossbar ready") {
                    let _ = tx.send(line);
                }
            }
        });
    }
    let tail = |stderr: &Arc<Mutex<Vec<String>>>| {
        let l = stderr.lock().unwrap();
        l[l.len().saturating_sub(60)..].join("\n")
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if rx.recv_timeout(Duration::from_millis(100)).is_ok() {
            return (child, stderr);
        }
        if let Ok(Some(status)) = child.try_wait() {
            std::thread::sleep(Duration::from_millis(100));
            panic!("crossbar exited before it was ready ({status}); stderr:\n{}", tail(&stderr));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("crossbar did not print `crossbar ready` within 20 s; stderr:\n{}", tail(&stderr));
        }
    }
}

impl Drop for Crossbar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- crossbar stderr (tail) ---\n{}\n---", self.stderr_tail(80));
        }
    }
}

/// The status code of a SIP response (`SIP/2.0 400 ...`), None for a request.
pub fn status_code(msg: &[u8]) -> Option<u16> {
    let line = msg.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    if parts.next()? != "SIP/2.0" {
        return None;
    }
    parts.next()?.parse().ok()
}

/// A header's value (first occurrence, case-insensitive name; compact forms not handled).
pub fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    msg.lines().skip(1).take_while(|l| !l.is_empty()).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

// ---------------------------------------------------------------------------
// SIPp

static SIPP_SEQ: AtomicU32 = AtomicU32::new(0);

/// What a finished SIPp run left behind.
#[derive(Debug)]
pub struct SippOutcome {
    pub name: String,
    /// None when the harness had to kill it (past its deadline).
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    /// `<log>` lines of the scenario (`-trace_logs`).
    pub log: String,
    /// SIPp's error log (`-trace_err`): unexpected messages, timeouts.
    pub errors: String,
    /// The final screen (`-trace_screen`).
    pub screen: String,
    /// Every SIP message sent and received (`-trace_msg`).
    pub messages: String,
}

impl SippOutcome {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
    /// Everything needed to understand a failure.
    pub fn report(&self) -> String {
        format!(
            "=== SIPp {} exit={:?}\n--- error log ---\n{}\n--- <log> ---\n{}\n--- stderr ---\n{}\n--- screen (tail) ---\n{}\n--- SIP messages (tail) ---\n{}\n===",
            self.name,
            self.status.map(|s| s.code()),
            self.errors.trim(),
            self.log.trim(),
            self.stderr.trim(),
            tail(&self.screen, 40),
            tail(&self.messages, 80)
        )
    }
    pub fn log_lines(&self) -> Vec<&str> {
        self.log.lines().collect()
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Arguments of one SIPp run.
#[derive(Debug, Clone)]
pub struct Sipp {
    pub scenario: String,
    pub local_ip: IpAddr,
    pub local_port: u16,
    pub remote: Option<String>,
    pub args: Vec<String>,
    pub calls: u32,
    pub timeout: Duration,
}

impl Sipp {
    /// `scenario` is a file name in tests/sipp/.
    pub fn new(scenario: &str, local_ip: IpAddr, local_port: u16) -> Sipp {
        Sipp { scenario: scenario.into(), local_ip, local_port, remote: None, args: Vec::new(), calls: 1, timeout: Duration::from_secs(30) }
    }
    pub fn remote(mut self, r: impl ToString) -> Self {
        self.remote = Some(r.to_string());
        self
    }
    pub fn arg(mut self, a: impl ToString) -> Self {
        self.args.push(a.to_string());
        self
    }
    pub fn key(self, k: &str, v: impl ToString) -> Self {
        self.arg("-key").arg(k).arg(v)
    }
    pub fn calls(mut self, n: u32) -> Self {
        self.calls = n;
        self
    }
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }
    /// RTP: media address/port for SDP (and the echo socket with `-rtp_echo`).
    pub fn media(self, ip: IpAddr, port: u16) -> Self {
        self.arg("-mi").arg(ip).arg("-mp").arg(port)
    }
    /// An injection file with one line `user;domain;password` (fields 0..2),
    /// and the same user/password for SIPp's `[authentication]` (`-au`/`-ap`:
    /// SIPp 3.6.1 garbles `[authentication username=[field0] ...]`).
    pub fn credentials(self, dir: &TempDir, user: &str, domain: &str, password: &str) -> Self {
        let file = dir.join(&format!("creds-{}.csv", SIPP_SEQ.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&file, format!("SEQUENTIAL\n{user};{domain};{password}\n")).unwrap();
        self.arg("-inf").arg(file.display()).arg("-au").arg(user).arg("-ap").arg(password)
    }
    /// Keys the caller scenarios (uac_*.xml) need.
    pub fn caller(self, from_user: &str, from_domain: &str, ruri_host: &str, dialled: &str) -> Self {
        self.key("from_user", from_user).key("from_domain", from_domain).key("ruri_host", ruri_host).key("pcap", test_data("g711a.pcap").display()).arg("-s").arg(dialled)
    }

    /// Starts SIPp in the background; its files go to `dir`.
    pub fn spawn(self, dir: &TempDir) -> SippProcess {
        let n = SIPP_SEQ.fetch_add(1, Ordering::Relaxed);
        let stem = format!("{}-{n}", self.scenario.trim_end_matches(".xml"));
        let log = dir.join(&format!("{stem}_logs.log"));
        let err = dir.join(&format!("{stem}_errors.log"));
        let screen = dir.join(&format!("{stem}_screen.log"));
        let messages = dir.join(&format!("{stem}_messages.log"));
        let mut cmd = Command::new("sipp");
        cmd.arg("-sf").arg(sipp_scenario(&self.scenario));
        if let Some(r) = &self.remote {
            cmd.arg(r);
        }
        let secs = self.timeout.as_secs().max(1);
        cmd.arg("-i")
            .arg(self.local_ip.to_string())
            .arg("-p")
            .arg(self.local_port.to_string())
            .arg("-m")
            .arg(self.calls.to_string())
            .arg("-timeout")
            .arg(format!("{secs}s"))
            .arg("-timeout_error")
            .arg("-trace_logs")
            .arg("-log_file")
            .arg(&log)
            .arg("-trace_err")
            .arg("-error_file")
            .arg(&err)
            .arg("-trace_screen")
            .arg("-screen_file")
            .arg(&screen)
            .arg("-trace_msg")
            .arg("-message_file")
            .arg(&messages)
            .args(&self.args)
            .current_dir(&dir.path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn sipp (is SIPp installed? `apt-get install sip-tester`)");
        let stdout = drain(child.stdout.take().unwrap());
        let stderr = drain(child.stderr.take().unwrap());
        SippProcess {
            name: stem,
            child: Some(child),
            deadline: Instant::now() + self.timeout + Duration::from_secs(5),
            stdout,
            stderr,
            log,
            err,
            screen,
            messages,
            local: SocketAddr::new(self.local_ip, self.local_port),
        }
    }

    /// Runs SIPp to its end (bounded by its timeout).
    pub fn run(self, dir: &TempDir) -> SippOutcome {
        self.spawn(dir).wait()
    }
}

fn drain(mut r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
    });
    rx
}

/// A SIPp process; killed on drop if still running.
pub struct SippProcess {
    pub name: String,
    child: Option<Child>,
    deadline: Instant,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    log: PathBuf,
    err: PathBuf,
    screen: PathBuf,
    messages: PathBuf,
    pub local: SocketAddr,
}

impl SippProcess {
    /// Waits until SIPp has bound its SIP port (UDP), at most 5 s, and panics
    /// when SIPp exited first or the port is held by another process (SIPp then
    /// failed to bind it, and whatever is sent to it goes elsewhere).
    pub fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if UdpSocket::bind(self.local).is_err() {
                // bound; give SIPp a moment to enter its event loop
                std::thread::sleep(Duration::from_millis(100));
                let pid = self.pid();
                if self.is_running() && !udp_socket_held_by(pid, self.local) {
                    panic!("{}: UDP {} is bound, but not by SIPp (pid {pid})", self.name, self.local);
                }
                break;
            }
            if !self.is_running() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !self.is_running() {
            let report = self.finish().report();
            panic!("{} exited before listening on {}\n{report}", self.name, self.local);
        }
    }

    /// The `<log>` lines written so far (while it runs).
    pub fn log_so_far(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn wait(mut self) -> SippOutcome {
        self.finish()
    }

    fn finish(&mut self) -> SippOutcome {
        let mut child = self.child.take().unwrap();
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() > self.deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(_) => break None,
            }
        };
        let read = |p: &Path| std::fs::read_to_string(p).map(|s| s.to_string()).unwrap_or_else(|_| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned());
        SippOutcome {
            name: self.name.clone(),
            status,
            stdout: self.stdout.recv_timeout(Duration::from_secs(2)).unwrap_or_default(),
            stderr: self.stderr.recv_timeout(Duration::from_secs(2)).unwrap_or_default(),
            log: read(&self.log),
            errors: read(&self.err),
            screen: read(&self.screen),
            messages: read(&self.messages),
        }
    }
}

impl Drop for SippProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Registers `user@domain` from `ip:port` (the address a SIPp UAS will then
/// listen on: crossbar sends INVITEs to where the REGISTER came from).
pub fn register_from(cb: &Crossbar, dir: &TempDir, ip: IpAddr, port: u16, user: &str, domain: &str, password: &str) -> SippOutcome {
    let out = Sipp::new("register_once.xml", ip, port).remote(cb.sipp_target()).credentials(dir, user, domain, password).timeout(Duration::from_secs(10)).run(dir);
    assert!(out.success(), "REGISTER {user}@{domain} failed\n{}\n{}", out.report(), cb.report());
    out
}

/// Registers extension `user` of `domain` and starts the SIPp UAS `scenario`
/// on the registered address with an RTP echo on its own media port.
#[allow(clippy::too_many_arguments)]
pub fn registered_uas(cb: &Crossbar, dir: &TempDir, scenario: &str, user: &str, domain: &str, password: &str, calls: u32, extra: &[&str]) -> SippProcess {
    let port = free_port(LOCALHOST);
    register_from(cb, dir, LOCALHOST, port, user, domain, password);
    let mut s = Sipp::new(scenario, LOCALHOST, port).media(LOCALHOST, free_media_port(LOCALHOST)).arg("-rtp_echo").calls(calls).timeout(Duration::from_secs(40));
    for a in extra {
        s = s.arg(a);
    }
    let mut p = s.spawn(dir);
    p.wait_listening();
    cb.callees.lock().unwrap().push((format!("{user}@{domain} ({})", p.name), p.messages.clone(), p.err.clone()));
    p
}

// ---------------------------------------------------------------------------
// Kernel view of a UDP socket

/// (rx_queue bytes, drops) of the UDP socket bound to `addr`, from
/// /proc/net/udp. SIPp's caller never reads its RTP socket (it only plays a
/// pcap), so what crossbar relays back to it piles up there: rx_queue > 0 or
/// drops > 0 proves that RTP reached SIPp's socket.
pub fn udp_socket_backlog(addr: SocketAddr) -> Option<(u64, u64)> {
    let IpAddr::V4(ip) = addr.ip() else { return None };
    let want = format!("{:08X}:{:04X}", u32::from_le_bytes(ip.octets()), addr.port());
    let text = std::fs::read_to_string("/proc/net/udp").ok()?;
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() > 12 && cols[1] == want {
            let rx = cols[4].split(':').nth(1).and_then(|h| u64::from_str_radix(h, 16).ok())?;
            let drops = cols.last()?.parse().ok()?;
            return Some((rx, drops));
        }
    }
    None
}

/// Whether process `pid` holds the UDP socket bound to `addr` (its inode, from
/// /proc/net/udp, is among the process's open files).
pub fn udp_socket_held_by(pid: u32, addr: SocketAddr) -> bool {
    let IpAddr::V4(ip) = addr.ip() else { return true };
    let want = format!("{:08X}:{:04X}", u32::from_le_bytes(ip.octets()), addr.port());
    let Ok(text) = std::fs::read_to_string("/proc/net/udp") else { return true };
    let inodes: Vec<String> = text.lines().skip(1).filter_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        (cols.len() > 9 && cols[1] == want).then(|| format!("socket:[{}]", cols[9]))
    }).collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return true };
    fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| inodes.iter().any(|i| l.to_str() == Some(i.as_str()))))
}

/// Polls [`udp_socket_backlog`] in a thread until `stop` and returns the maxima.
pub struct BacklogProbe {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<(u64, u64)>>,
}

impl BacklogProbe {
    pub fn start(addr: SocketAddr) -> BacklogProbe {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut rx, mut drops) = (0, 0);
            let deadline = Instant::now() + Duration::from_secs(120);
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Some((r, d)) = udp_socket_backlog(addr) {
                    rx = rx.max(r);
                    drops = drops.max(d);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (rx, drops)
        });
        BacklogProbe { stop, handle: Some(handle) }
    }
    pub fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap_or((0, 0))
    }
}

impl Drop for BacklogProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------
// Raw SIP over UDP/TCP (malformed input)

/// Rewrites the first Via's sent-by to `to` (and its transport to `transport`)
/// so a UDP answer comes back to the test's socket. Leaves the message alone if
/// it has no recognisable Via.
pub fn rewrite_top_via(msg: &[u8], to: SocketAddr, transport: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + 32);
    let mut done = false;
    let mut rest = msg;
    while !rest.is_empty() {
        let end = rest.iter().position(|&b| b == b'\n').map(|i| i + 1).unwrap_or(rest.len());
        let line = &rest[..end];
        rest = &rest[end..];
        if !done {
            let lower: Vec<u8> = line.iter().map(|b| b.to_ascii_lowercase()).collect();
            let is_via = lower.starts_with(b"via") || lower.starts_with(b"v:") || lower.starts_with(b"v ");
            if is_via {
                if let Some(p) = find(&lower, b"sip/2.0/") {
                    // "SIP/2.0/UDP  host:port;params" -> "SIP/2.0/<T> <to>;params"
                    let after = p + 8;
                    let mut i = after;
                    while i < line.len() && line[i].is_ascii_alphabetic() {
                        i += 1;
                    }
                    while i < line.len() && (line[i] == b' ' || line[i] == b'\t') {
                        i += 1;
                    }
                    let mut j = i;
                    while j < line.len() && !b";, \t\r\n".contains(&line[j]) {
                        j += 1;
                    }
                    if j > i {
                        out.extend_from_slice(&line[..p]);
                        out.extend_from_slice(format!("SIP/2.0/{transport} {to}").as_bytes());
                        out.extend_from_slice(&line[j..]);
                        done = true;
                        continue;
                    }
                }
            }
        }
        out.extend_from_slice(line);
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Sends `msg` over UDP from `sock` and collects responses for `wait`; returns
/// the first final response (>= 200) or the last provisional one seen.
pub fn udp_exchange(sock: &UdpSocket, to: SocketAddr, msg: &[u8], wait: Duration) -> Option<Vec<u8>> {
    sock.send_to(msg, to).ok()?;
    collect_response(|buf| sock.recv(buf), wait)
}

/// Reads responses on `sock` until a final one (>= 200) or `wait` passes.
pub fn collect_final(sock: &UdpSocket, wait: Duration) -> Option<Vec<u8>> {
    collect_response(|buf| sock.recv(buf), wait).filter(|m| status_code(m).is_some_and(|c| c >= 200))
}

fn collect_response(mut recv: impl FnMut(&mut [u8]) -> std::io::Result<usize>, wait: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + wait;
    let mut last = None;
    let mut buf = vec![0u8; 65535];
    while Instant::now() < deadline {
        match recv(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let m = buf[..n].to_vec();
                if status_code(&m).is_some_and(|c| c >= 200) {
                    return Some(m);
                }
                last = Some(m);
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    last
}

/// Sends `msg` on a fresh TCP connection and returns the first final response
/// (or the last provisional one) read within `wait`.
pub fn tcp_exchange(to: SocketAddr, msg: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(100))).ok()?;
    s.write_all(msg).ok()?;
    let mut acc: Vec<u8> = Vec::new();
    let deadline = Instant::now() + wait;
    let mut last = None;
    let mut buf = [0u8; 65535];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                acc.extend_from_slice(&buf[..n]);
                // split complete messages (headers; bodies of responses here are empty or small)
                while let Some(p) = find(&acc, b"\r\n\r\n") {
                    let head = acc[..p + 4].to_vec();
                    let clen = std::str::from_utf8(&head)
                        .ok()
                        .and_then(|h| header(h, "Content-Length").or_else(|| header(h, "l")))
                        .and_then(|v| v.parse::<usize>().ok())
                        .unwrap_or(0);
                    if acc.len() < p + 4 + clen {
                        break;
                    }
                    let msg: Vec<u8> = acc.drain(..p + 4 + clen).collect();
                    if status_code(&msg).is_some_and(|c| c >= 200) {
                        return Some(msg);
                    }
                    last = Some(msg);
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    last
}

/// The torture messages shipped in tests/data/torture (name, bytes), sorted.
pub fn torture_messages() -> Vec<(String, Vec<u8>)> {
    let dir = test_data("torture");
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .expect("tests/data/torture")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "dat"))
        .map(|e| (e.path().file_stem().unwrap().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------
// A real redis-server for the Redis store backend

/// A `redis-server` on a free port of 127.0.0.1, persistence off (an explicit
/// SAVE writes `dump.rdb`, uncompressed, into its directory); killed on drop.
pub struct RedisServer {
    child: Child,
    pub port: u16,
    pub dir: TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let dir = TempDir::new("redis");
        let port = free_port(LOCALHOST);
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--rdbcompression", "no"])
            .arg("--dir")
            .arg(&dir.path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is not installed: `make test` installs it (apt-get install redis-server)");
        let server = RedisServer { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.command("PING").as_deref() != Some("+PONG") {
            assert!(Instant::now() < deadline, "redis-server did not answer PING within 10 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// One inline command; the first line of the reply.
    pub fn command(&self, cmd: &str) -> Option<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(format!("{cmd}\r\n").as_bytes()).ok()?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).ok()?;
        Some(line.trim_end().to_string())
    }

    /// Everything the server holds, as its RDB file's bytes (SAVE, uncompressed).
    pub fn dump(&self) -> Vec<u8> {
        assert_eq!(self.command("SAVE").as_deref(), Some("+OK"), "redis SAVE failed");
        std::fs::read(self.dir.join("dump.rdb")).expect("dump.rdb after SAVE")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
