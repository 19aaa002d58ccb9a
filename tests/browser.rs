//! The softphone in real headless Chromium (Debian's /usr/bin/chromium, driven
//! by playwright-core from web/node_modules), against a real crossbar and SIPp
//! as the carrier. Each test runs one script of tests/browser/ with node; the
//! script prints `STEP name ...` lines, this side starts SIPp at the right step
//! and checks what crossbar logged. Screenshots go to tests/output/screenshots/.
//!
//! Needs `make deps` (chromium, sipp, `npm ci` in web/) and `make web`.

mod common;

use common::{free_media_port, free_port, test_data, Crossbar, NodeConfig, Sipp, SippOutcome, TempDir, ACME_DID, CARRIER, LOCALHOST};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn screenshots() -> PathBuf {
    root().join("tests/output/screenshots")
}

/// A node script; killed on drop.
struct Script {
    child: Child,
    steps: mpsc::Receiver<String>,
    log: Arc<Mutex<Vec<String>>>,
    name: String,
}

impl Script {
    fn start(name: &str, args: serde_json::Value) -> Script {
        assert!(root().join("web/node_modules/playwright-core").exists(), "web/node_modules is missing: run `make deps` (npm ci in web/)");
        assert!(root().join("web/dist/phone.html").exists(), "web/dist is missing: run `make web`");
        let mut child = Command::new("node")
            .arg(root().join("tests/browser").join(name))
            .arg(args.to_string())
            .current_dir(root())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn node (is Node.js installed? `make deps`)");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l.lock().unwrap().push(line.clone());
                if let Some(s) = line.strip_prefix("STEP ") {
                    let _ = tx.send(s.to_string());
                }
            }
        });
        let err = child.stderr.take().unwrap();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                l.lock().unwrap().push(format!("stderr: {line}"));
            }
        });
        Script { child, steps: rx, log, name: name.into() }
    }

    fn output(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits for `STEP <name>`; returns the rest of the line.
    fn wait_step(&mut self, name: &str, timeout: Duration, cb: &Crossbar) -> String {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.steps.recv_timeout(Duration::from_millis(200)) {
                Ok(s) if s == name || s.starts_with(&format!("{name} ")) => return s[name.len()..].trim().to_string(),
                Ok(_) => {}
                Err(_) => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        std::thread::sleep(Duration::from_millis(200));
                        panic!("{} exited ({status}) before step {name}\n{}\n{}", self.name, self.output(), cb.report());
                    }
                }
            }
        }
        panic!("{}: no step {name} within {timeout:?}\n{}\n{}", self.name, self.output(), cb.report());
    }

    fn wait_success(mut self, timeout: Duration, cb: &Crossbar) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(200));
                assert!(status.success(), "{} failed ({status})\n{}\n{}", self.name, self.output(), cb.report());
                return;
            }
            if Instant::now() > deadline {
                panic!("{} did not finish within {timeout:?}\n{}\n{}", self.name, self.output(), cb.report());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn args(cb: &Crossbar, extra: serde_json::Value) -> serde_json::Value {
    let mut v = serde_json::json!({"httpPort": cb.config.http.port(), "screenshots": screenshots()});
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        for (k, val) in e {
            o.insert(k.clone(), val.clone());
        }
    }
    v
}

/// A SIPp carrier (`scenario`, with `extra` arguments) calls acme's DID; alice's page
/// registers, rings, answers and sees media both ways; the carrier hangs up after 9 s.
/// Returns SIPp's outcome (checked for success) once the page saw the call end.
fn carrier_calls_alice(name: &str, scenario: &str, extra: &[&str]) -> (Crossbar, SippOutcome) {
    let cb = Crossbar::start(NodeConfig::new());
    let dir = TempDir::new(name);
    let mut page = Script::start("incoming_from_carrier.mjs", args(&cb, serde_json::json!({"callerId": "15559990000", "did": ACME_DID})));
    page.wait_step("registered", Duration::from_secs(40), &cb);
    let mut sipp = Sipp::new(scenario, CARRIER, free_port(CARRIER))
        .remote(cb.sipp_target())
        .caller("15559990000", "carrier.example", "127.0.0.1", ACME_DID)
        .media(CARRIER, free_media_port(CARRIER));
    for a in extra.iter().chain(&["-d", "9000"]) {
        sipp = sipp.arg(a);
    }
    let sipp = sipp.timeout(Duration::from_secs(60)).spawn(&dir);
    page.wait_step("ringing", Duration::from_secs(20), &cb);
    page.wait_step("media", Duration::from_secs(30), &cb);
    let out = sipp.wait();
    assert!(out.success(), "carrier SIPp ({scenario})\n{}\n{}", out.report(), cb.report());
    page.wait_step("ended", Duration::from_secs(20), &cb);
    page.wait_success(Duration::from_secs(20), &cb);
    (cb, out)
}

/// The call's `call ended` line: answered, with more than 50 RTP packets each way.
fn assert_answered_with_media(cb: &Crossbar) {
    let calls = cb.wait_calls_ended(1, Duration::from_secs(10));
    let c = calls.last().unwrap_or_else(|| panic!("no call ended\n{}", cb.report()));
    assert_eq!(c.get("disposition"), Some("answered"), "{}", c.line);
    assert!(c.num("a_to_b_packets") > 50, "carrier → browser RTP: {}", c.line);
    assert!(c.num("b_to_a_packets") > 50, "browser → carrier RTP (SIPp received it): {}", c.line);
    assert!(c.num("own_srtp_packets") > 100, "the browser's SRTP ran on crossbar's own path, both ways: {}", c.line);
}

/// 1 + 5: carrier → DID → alice's browser; answer; media both ways; the carrier hangs up.
#[test]
fn browser_answers_a_carrier_call_with_media_both_ways() {
    let (cb, _) = carrier_calls_alice("browser-in", "uac_call.xml", &[]);
    assert_answered_with_media(&cb);
    for shot in ["softphone-idle", "softphone-ringing", "softphone-in-call", "softphone-in-call-phone"] {
        assert!(screenshots().join(format!("{shot}.png")).exists(), "screenshot {shot} saved");
    }
}

/// 1 with a late offer: the carrier's INVITE has no SDP, so crossbar makes its
/// own DTLS/SAVPF offer to the browser, offers the carrier (in the 200) the
/// codec the browser chose, and takes the carrier's answer from its ACK. The
/// carrier echoes the browser's RTP back.
#[test]
fn browser_answers_a_carrier_late_offer_with_media_both_ways() {
    let (cb, out) = carrier_calls_alice("browser-late", "uac_late_offer_echo.xml", &["-rtp_echo"]);
    let offer = out.log.lines().find_map(|l| l.split("OFFER in 200 sdp=").nth(1)).unwrap_or_default().to_string();
    assert!(offer.starts_with("127.0.0.1:") && (offer.ends_with("pt=0") || offer.ends_with("pt=8")), "the carrier's offer is crossbar's plain G.711: {offer:?}\n{}", out.report());
    assert_answered_with_media(&cb);
}

/// 2: alice dials an external number; the carrier answers (RTP echo); alice hangs up.
/// This node's media threads use system calls (`media.io = "syscalls"`), the other
/// browser tests' io_uring where the machine allows it: the bridge is proven on both.
#[test]
fn browser_calls_out_through_the_carrier() {
    let mut cfg = NodeConfig::new();
    cfg.media_extra = "io = \"syscalls\"".into();
    let trunk = cfg.trunk_outbound;
    let cb = Crossbar::start(cfg);
    let started = cb.wait_log("media threads started", Duration::from_secs(5)).unwrap_or_default();
    assert!(started.contains("system calls"), "{started}\n{}", cb.report());
    let dir = TempDir::new("browser-out");
    let mut uas = Sipp::new("uas_answer.xml", trunk.ip(), trunk.port()).media(CARRIER, free_media_port(CARRIER)).arg("-rtp_echo").timeout(Duration::from_secs(60)).spawn(&dir);
    uas.wait_listening();
    let mut page = Script::start("outgoing_to_carrier.mjs", args(&cb, serde_json::json!({"number": "15551234567"})));
    page.wait_step("media", Duration::from_secs(60), &cb);
    page.wait_step("ended", Duration::from_secs(20), &cb);
    page.wait_success(Duration::from_secs(20), &cb);
    let out = uas.wait();
    assert!(out.success(), "carrier UAS\n{}\n{}", out.report(), cb.report());
    let calls = cb.wait_calls_ended(1, Duration::from_secs(10));
    let c = calls.last().unwrap_or_else(|| panic!("no call ended\n{}", cb.report()));
    assert_eq!(c.get("hangup_side"), Some("A"), "{}", c.line);
    assert!(c.num("a_to_b_packets") > 50 && c.num("b_to_a_packets") > 50, "{}", c.line);
    assert!(c.num("own_srtp_packets") > 100, "crossbar's own SRTP, both ways: {}", c.line);
    let _ = test_data("g711a.pcap");
}

/// 3: WebRTC ↔ WebRTC: alice calls 1002 on a second page.
#[test]
fn browser_to_browser_through_crossbar() {
    let cb = Crossbar::start(NodeConfig::new());
    let page = Script::start("agent_to_agent.mjs", args(&cb, serde_json::json!({})));
    page.wait_success(Duration::from_secs(120), &cb);
    let calls = cb.wait_calls_ended(1, Duration::from_secs(10));
    let c = calls.last().unwrap_or_else(|| panic!("no call ended\n{}", cb.report()));
    assert_eq!(c.get("disposition"), Some("answered"), "{}", c.line);
    assert!(c.num("a_to_b_packets") > 50 && c.num("b_to_a_packets") > 50, "{}", c.line);
    // Each packet is unprotected on one browser leg and protected on the other.
    assert!(c.num("own_srtp_packets") > 200, "crossbar's own SRTP on both browser legs: {}", c.line);
}

/// 4: carol refused on acme; wrong password 401; globex's DID never rings alice.
#[test]
fn browser_tenant_isolation() {
    let cb = Crossbar::start(NodeConfig::new());
    let dir = TempDir::new("browser-iso");
    let mut page = Script::start("tenant_isolation.mjs", args(&cb, serde_json::json!({"watchMs": 6000})));
    page.wait_step("refused", Duration::from_secs(40), &cb);
    page.wait_step("registered", Duration::from_secs(20), &cb);
    let out = Sipp::new("uac_refused.xml", CARRIER, free_port(CARRIER))
        .remote(cb.sipp_target())
        .caller("15559990000", "carrier.example", "127.0.0.1", "15550002000")
        .media(CARRIER, free_media_port(CARRIER))
        .timeout(Duration::from_secs(15))
        .run(&dir);
    assert!(out.success(), "globex's DID must be refused (carol is not registered)\n{}\n{}", out.report(), cb.report());
    page.wait_step("never-rang", Duration::from_secs(20), &cb);
    page.wait_success(Duration::from_secs(20), &cb);
    let _ = LOCALHOST;
}
