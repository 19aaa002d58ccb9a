//! crossbar against real SIPp peers: registration, carrier and extension calls
//! with anchored RTP, refusals, malformed input and a panicking Call actor.
//!
//! Each test starts its own crossbar on free ports (see tests/common/mod.rs)
//! and drives SIPp scenarios from tests/sipp/. The carrier is SIPp bound to
//! 127.0.0.2 (the trunk's `inbound_sources`); phones are SIPp on 127.0.0.1.

mod common;

use common::*;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

const ACME: &str = "acme.localhost";
const GLOBEX: &str = "globex.localhost";

/// The single `call ended` line of a finished call, once crossbar has logged it.
fn one_call_ended(cb: &Crossbar) -> CallEnded {
    let calls = cb.wait_calls_ended(1, Duration::from_secs(10));
    assert_eq!(calls.len(), 1, "expected one `call ended` line\n{}", cb.report());
    calls.into_iter().next().unwrap()
}

/// RTP went both ways through crossbar: the caller's pcap (~50 packets/s) reached
/// the callee, whose SIPp echoed every packet it received back through crossbar.
/// `b_to_a` can only be non-zero if SIPp's UAS received RTP from crossbar.
fn assert_rtp_both_ways(cb: &Crossbar, call: &CallEnded, min: u64) {
    let a_to_b = call.num("a_to_b_packets");
    let b_to_a = call.num("b_to_a_packets");
    assert!(a_to_b >= min, "caller -> callee: only {a_to_b} RTP packets relayed (expected >= {min}): {}\n{}", call.line, cb.report());
    assert!(b_to_a >= min, "callee -> caller: only {b_to_a} RTP packets relayed (expected >= {min}): {}\n{}", call.line, cb.report());
    // the echo returns what arrived: at most a few packets in flight at hang-up
    assert!(b_to_a + 10 >= a_to_b, "echo lost packets: a_to_b={a_to_b} b_to_a={b_to_a}: {}", call.line);
}

/// The Call-ID the callee's SIPp saw (logged by uas_*.xml).
fn callee_call_id(log: &str) -> String {
    log.lines().find_map(|l| l.split("call_id=").nth(1)).map(|s| s.split_whitespace().next().unwrap_or("").to_string()).unwrap_or_default()
}

fn carrier_caller(cb: &Crossbar, scenario: &str, dialled: &str) -> (Sipp, SocketAddr) {
    let media = SocketAddr::new(CARRIER, free_media_port(CARRIER));
    let s = Sipp::new(scenario, CARRIER, free_port(CARRIER))
        .remote(cb.sipp_target())
        .caller("15551230000", "127.0.0.2", "127.0.0.1", dialled)
        .media(media.ip(), media.port());
    (s, media)
}

// 1 -------------------------------------------------------------------------

#[test]
fn register_with_digest_reregister_and_unregister() {
    let cb = Crossbar::start(NodeConfig::new());
    let dir = TempDir::new("register");
    let out = Sipp::new("register_cycle.xml", LOCALHOST, free_port(LOCALHOST))
        .remote(cb.sipp_target())
        .credentials(&dir, "1001", ACME, "acme1001pw")
        .timeout(Duration::from_secs(15))
        .run(&dir);
    assert!(out.success(), "REGISTER / re-REGISTER / un-REGISTER failed\n{}\n{}", out.report(), cb.report());
    let registered = out.log.lines().filter(|l| l.contains("REGISTERED contact=")).count();
    assert_eq!(registered, 2, "two 200 OKs with Contact and expires expected\n{}", out.report());
    assert!(out.log.contains("UNREGISTERED"), "{}", out.report());
}

// 2, 3 -----------------------------------------------------------------------

/// `no_uring`: the node runs as where a seccomp profile refuses io_uring (a
/// fault-injection hook), so its media threads must fall back to system calls.
fn carrier_call_to_registered_extension(callee_hangs_up: bool, no_uring: bool) {
    let mut cfg = NodeConfig::new();
    if no_uring {
        cfg.env.push(("CROSSBAR_FAULT_NO_URING".into(), "1".into()));
    }
    let cb = Crossbar::start(cfg);
    // Without the hook, io_uring is what this machine allows.
    let fallback = no_uring || crossbar::media::uring_available().is_err();
    let io = if fallback { "system calls" } else { "io_uring" };
    let started = cb.wait_log("media threads started", Duration::from_secs(5)).unwrap_or_default();
    assert!(started.contains(io), "media threads not on {io}: {started}\n{}", cb.report());
    assert_eq!(cb.stderr_lines().iter().any(|l| l.contains("io_uring unavailable, using system calls")), fallback, "{}", cb.report());
    let dir = TempDir::new("carrier");
    let uas_scenario = if callee_hangs_up { "uas_answer_hangup.xml" } else { "uas_answer.xml" };
    let uas = registered_uas(&cb, &dir, uas_scenario, "1001", ACME, "acme1001pw", 1, &["-d", "4000"]);
    let (caller, media) = carrier_caller(&cb, if callee_hangs_up { "uac_call_wait_bye.xml" } else { "uac_call.xml" }, &format!("+{ACME_DID}"));
    let probe = BacklogProbe::start(media);
    let uac = caller.arg("-d").arg(4000).credentials(&dir, "unused", "unused", "unused").run(&dir);
    let (rx_bytes, rx_drops) = probe.finish();
    let uas = uas.wait();
    assert!(uac.success(), "caller failed\n{}\n{}\n{}", uac.report(), uas.report(), cb.report());
    assert!(uas.success(), "callee failed\n{}\n{}", uas.report(), cb.report());
    assert!(uac.log.contains("BYE received") == callee_hangs_up && uas.log.contains("BYE received") != callee_hangs_up, "BYE went the wrong way\n{}\n{}", uac.report(), uas.report());

    // B2BUA: the callee's dialog is crossbar's, not the caller's
    let callee_cid = callee_call_id(&uas.log);
    assert!(!callee_cid.is_empty() && !callee_cid.ends_with("@127.0.0.2"), "callee saw the caller's Call-ID {callee_cid:?}\n{}", uas.report());

    let call = one_call_ended(&cb);
    assert_eq!(call.get("tenant"), Some("acme"), "{}", call.line);
    assert_eq!(call.get("disposition"), Some("answered"), "{}", call.line);
    // 4 s of 20 ms packets is ~200; leave room for call set-up on a loaded machine
    assert_rtp_both_ways(&cb, &call, 100);
    // and SIPp's caller socket really got RTP back (it never reads it: it queues)
    assert!(rx_bytes > 0 || rx_drops > 0, "no RTP reached the caller's socket {media} (rx_queue/drops stayed 0)");
}

#[test]
fn carrier_did_to_registered_extension_rtp_both_ways_caller_hangs_up() {
    carrier_call_to_registered_extension(false, false);
}

#[test]
fn carrier_did_to_registered_extension_callee_hangs_up() {
    carrier_call_to_registered_extension(true, false);
}

/// As above where io_uring is refused: `media.io = "auto"` falls back to system calls
/// (and says so once), and RTP still flows both ways.
#[test]
fn carrier_call_with_io_uring_refused_relays_on_system_calls() {
    carrier_call_to_registered_extension(false, true);
}

// 4 --------------------------------------------------------------------------

#[test]
fn cancel_before_answer_gives_487_and_cancels_the_callee() {
    let cb = Crossbar::start(NodeConfig::new());
    let dir = TempDir::new("cancel");
    let uas = registered_uas(&cb, &dir, "uas_cancel.xml", "1001", ACME, "acme1001pw", 1, &[]);
    let (caller, _) = carrier_caller(&cb, "uac_cancel.xml", ACME_DID);
    let uac = caller.timeout(Duration::from_secs(15)).run(&dir);
    let uas = uas.wait();
    assert!(uac.success() && uac.log.contains("487 received"), "caller did not get 487\n{}\n{}", uac.report(), cb.report());
    assert!(uas.success() && uas.log.contains("CANCEL received"), "callee did not get the CANCEL\n{}\n{}", uas.report(), cb.report());
    let call = one_call_ended(&cb);
    assert_eq!(call.get("disposition"), Some("cancelled"), "{}", call.line);
}

// 5 --------------------------------------------------------------------------

#[test]
fn extension_to_extension_with_proxy_auth() {
    let cb = Crossbar::start(NodeConfig::new());
    let dir = TempDir::new("ext2ext");
    let uas = registered_uas(&cb, &dir, "uas_answer.xml", "1001", ACME, "acme1001pw", 1, &[]);
    let media = SocketAddr::new(LOCALHOST, free_media_port(LOCALHOST));
    let probe = BacklogProbe::start(media);
    let uac = Sipp::new("uac_call.xml", LOCALHOST, free_port(LOCALHOST))
        .remote(cb.sipp_target())
        .caller("1002", ACME, ACME, "1001")
        .media(media.ip(), media.port())
        .credentials(&dir, "1002", ACME, "acme1002pw")
        .arg("-d")
        .arg(3000)
        .run(&dir);
    let (rx_bytes, rx_drops) = probe.finish();
    let uas = uas.wait();
    assert!(uac.success(), "1002 -> 1001 failed\n{}\n{}\n{}", uac.report(), uas.report(), cb.report());
    assert!(uac.log.contains("challenged 407"), "the INVITE of 1002 was not challenged with 407\n{}", uac.report());
    assert!(uas.success(), "{}", uas.report());
    let call = one_call_ended(&cb);
    assert_eq!(call.get("tenant"), Some("acme"), "{}", call.line);
    assert_rtp_both_ways(&cb, &call, 75);
    assert!(rx_bytes > 0 || rx_drops > 0, "no RTP reached the caller's socket {media}");
}

// 6 --------------------------------------------------------------------------

#[test]
fn extension_to_outbound_trunk_with_tenant_did_as_caller_id() {
    let config = NodeConfig::new();
    let trunk = config.trunk_outbound;
    let cb = Crossbar::start(config);
    let dir = TempDir::new("outbound");
    let mut uas = Sipp::new("uas_answer.xml", trunk.ip(), trunk.port()).media(CARRIER, free_media_port(CARRIER)).arg("-rtp_echo").timeout(Duration::from_secs(30)).spawn(&dir);
    uas.wait_listening();
    let uac = Sipp::new("uac_call.xml", LOCALHOST, free_port(LOCALHOST))
        .remote(cb.sipp_target())
        .caller("1001", ACME, ACME, "15551234567")
        .media(LOCALHOST, free_media_port(LOCALHOST))
        .credentials(&dir, "1001", ACME, "acme1001pw")
        .arg("-d")
        .arg(2000)
        .run(&dir);
    let uas = uas.wait();
    assert!(uac.success(), "1001 -> 15551234567 failed\n{}\n{}\n{}", uac.report(), uas.report(), cb.report());
    assert!(uas.success(), "the trunk UAS failed\n{}", uas.report());
    let invite = uas.log.lines().find(|l| l.contains("INVITE from=")).unwrap_or_default().to_string();
    let from = invite.split("from=").nth(1).and_then(|s| s.split(" to=").next()).unwrap_or_default();
    assert!(from.contains("sip:15550001000@") || from.contains("sip:+15550001000@"), "trunk saw From {from:?}, expected acme's DID 15550001000\n{}", uas.report());
    let to = invite.split(" to=").nth(1).unwrap_or_default();
    assert!(to.contains("15551234567"), "trunk saw To {to:?}");
    let call = one_call_ended(&cb);
    assert_rtp_both_ways(&cb, &call, 50);
}

// 7 --------------------------------------------------------------------------

#[test]
fn unknown_did_from_carrier_is_404() {
    let cb = Crossbar::start(NodeConfig::new());
    let dir = TempDir::new("did404");
    let (caller, _) = carrier_caller(&cb, "uac_refused.xml", "15559999999");
    let out = caller.credentials(&dir, "unused", "unused", "unused").timeout(Duration::from_secs(10)).run(&dir);
    assert!(out.success(), "{}\n{}", out.report(), cb.report());
    assert!(out.log.contains("REFUSED challenged=0 code=404"), "expected an immediate 404\n{}", out.report());
}

// 8, 9 -----------------------------------------------------------------------

fn register_refused(user: &str, domain: &str, password: &str) -> (SippOutcome, Crossbar) {
    let cb = Crossbar::start(NodeConfig::new());
    let dir = TempDir::new("regrefused");
    let out = Sipp::new("register_refused.xml", LOCALHOST, free_port(LOCALHOST))
        .remote(cb.sipp_target())
        .credentials(&dir, user, domain, password)
        .timeout(Duration::from_secs(10))
        .run(&dir);
    assert!(out.success(), "REGISTER {user}@{domain} was not refused with 403/404\n{}\n{}", out.report(), cb.report());
    (out, cb)
}

#[test]
fn wrong_password_is_403_after_the_challenge() {
    let (out, _cb) = register_refused("1001", ACME, "not-the-password");
    assert!(out.log.contains("REFUSED challenged=1 code=403"), "expected 401 then 403\n{}", out.report());
}

#[test]
fn acme_user_cannot_register_into_globex() {
    let (out, _cb) = register_refused("1001", GLOBEX, "acme1001pw");
    assert!(out.log.contains("REFUSED"), "{}", out.report());
}

// 10 -------------------------------------------------------------------------

#[test]
fn unauthenticated_invite_from_non_carrier_is_challenged_and_never_rings() {
    let cb = Crossbar::start(NodeConfig::new());
    let dir = TempDir::new("noauth");
    // a registered 1001 that would ring if crossbar let the call through
    let uas = registered_uas(&cb, &dir, "uas_answer.xml", "1001", ACME, "acme1001pw", 1, &[]);
    let out = Sipp::new("uac_challenged.xml", LOCALHOST, free_port(LOCALHOST))
        .remote(cb.sipp_target())
        .caller("1002", ACME, "127.0.0.1", ACME_DID)
        .media(LOCALHOST, free_media_port(LOCALHOST))
        .credentials(&dir, "unused", "unused", "unused")
        .timeout(Duration::from_secs(10))
        .run(&dir);
    assert!(out.success(), "an INVITE from 127.0.0.1 without credentials was not answered 407 only\n{}\n{}", out.report(), cb.report());
    assert!(out.log.contains("CHALLENGED") && out.log.contains("acme.localhost"), "407 without the acme realm\n{}", out.report());
    let ringing = uas.log_so_far();
    assert!(!ringing.contains("INVITE"), "the callee was rung by an unauthenticated call:\n{ringing}");
    drop(uas);
}

#[test]
fn globex_credentials_cannot_call_as_acme() {
    let cb = Crossbar::start(NodeConfig::new());
    let dir = TempDir::new("crossauth");
    let out = Sipp::new("uac_refused.xml", LOCALHOST, free_port(LOCALHOST))
        .remote(cb.sipp_target())
        .caller("2001", ACME, ACME, "1001")
        .media(LOCALHOST, free_media_port(LOCALHOST))
        .credentials(&dir, "2001", ACME, "globex2001pw")
        .timeout(Duration::from_secs(10))
        .run(&dir);
    assert!(out.success(), "{}\n{}", out.report(), cb.report());
    assert!(out.log.contains("REFUSED challenged=1 code=403") || out.log.contains("REFUSED challenged=0 code=403"), "expected 403\n{}", out.report());
}

// 11 -------------------------------------------------------------------------

/// RFC 4475 §3.1.2 requests that must get exactly 400 (with a Warning 399).
const MUST_400: &[&str] = &["ncl", "scalar02", "quotbal", "ltgtruri", "lwsruri", "lwsstart", "trws", "escruri", "badaspec", "baddn", "regbadct", "mismatch01"];
/// §3.1.2 requests where the RFC allows another refusal (505, 501) or none
/// (no usable Via, a Date a UA may ignore), and the two malformed responses.
const MAY_REFUSE: &[&str] = &["badinv01", "baddate", "badvers", "mismatch02", "clerr"];
const RESPONSES: &[&str] = &["scalarlg", "bigcode"];

fn garbage() -> Vec<(String, Vec<u8>)> {
    let mut g: Vec<(String, Vec<u8>)> = vec![
        ("empty-lines".into(), b"\r\n\r\n".to_vec()),
        ("binary".into(), (0..512u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect()),
        ("nul-bytes".into(), vec![0u8; 300]),
        ("half-request-line".into(), b"INVITE sip:".to_vec()),
        ("no-headers".into(), b"INVITE sip:1001@acme.localhost SIP/2.0\r\n\r\n".to_vec()),
        ("no-via".into(), b"OPTIONS sip:x@127.0.0.1 SIP/2.0\r\nCSeq: 1 OPTIONS\r\nCall-ID: x\r\n\r\n".to_vec()),
    ];
    let mut huge = b"OPTIONS sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKhuge\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 60_000));
    huge.extend_from_slice(b"\r\n\r\n");
    g.push(("huge-header".into(), huge));
    g
}

fn check_400(name: &str, resp: Option<Vec<u8>>, transport: &str, problems: &mut Vec<String>) {
    match resp {
        None => problems.push(format!("{name} over {transport}: no answer")),
        Some(r) => {
            let text = String::from_utf8_lossy(&r).into_owned();
            let code = status_code(&r);
            if code != Some(400) {
                problems.push(format!("{name} over {transport}: answered {:?} instead of 400: {}", code, text.lines().next().unwrap_or("")));
            } else if !header(&text, "Warning").is_some_and(|w| w.starts_with("399")) {
                problems.push(format!("{name} over {transport}: 400 without `Warning: 399 host \"reason\"`"));
            }
        }
    }
}

#[test]
fn malformed_burst_is_answered_400_while_a_call_continues() {
    let mut cb = Crossbar::start(NodeConfig::new());
    let dir = TempDir::new("torture");
    let uas = registered_uas(&cb, &dir, "uas_answer.xml", "1001", ACME, "acme1001pw", 1, &[]);
    let (caller, _) = carrier_caller(&cb, "uac_call.xml", ACME_DID);
    let uac = caller.arg("-d").arg(8000).credentials(&dir, "unused", "unused", "unused").spawn(&dir);
    // let the call get established before the burst
    std::thread::sleep(Duration::from_millis(1500));

    let messages: std::collections::HashMap<String, Vec<u8>> = torture_messages().into_iter().collect();
    let sock = UdpSocket::bind((LOCALHOST, 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let me = sock.local_addr().unwrap();
    let target = cb.sip_addr();
    let tcp = cb.config.sip_tcp;
    let mut problems = Vec::new();
    let wait = Duration::from_millis(1500);
    for name in MUST_400 {
        let msg = &messages[*name];
        check_400(name, udp_exchange(&sock, target, &rewrite_top_via(msg, me, "UDP"), wait), "UDP", &mut problems);
        check_400(name, tcp_exchange(tcp, msg, wait), "TCP", &mut problems);
    }
    // Content-Length larger than the datagram: only UDP can tell (TCP waits for more)
    check_400("clerr", udp_exchange(&sock, target, &rewrite_top_via(&messages["clerr"], me, "UDP"), wait), "UDP", &mut problems);
    for name in MAY_REFUSE.iter().chain(RESPONSES) {
        let msg = &messages[*name];
        let r = udp_exchange(&sock, target, &rewrite_top_via(msg, me, "UDP"), Duration::from_millis(300));
        if let Some(code) = r.as_deref().and_then(status_code) {
            if code < 400 {
                problems.push(format!("{name} over UDP: accepted with {code}"));
            }
        }
        let _ = tcp_exchange(tcp, msg, Duration::from_millis(300));
    }
    for (name, msg) in garbage() {
        let _ = sock.send_to(&msg, target);
        let _ = tcp_exchange(tcp, &msg, Duration::from_millis(200));
        if !cb.is_alive() {
            problems.push(format!("crossbar died after {name}"));
            break;
        }
    }
    assert!(cb.is_alive(), "crossbar died during the malformed burst\n{}", cb.report());
    let uac = uac.wait();
    let uas = uas.wait();
    assert!(uac.success() && uas.success(), "the call in progress did not complete normally\n{}\n{}\n{}", uac.report(), uas.report(), cb.report());
    assert_eq!(cb.options_status(), Some(200), "OPTIONS after the burst\n{}", cb.report());
    assert!(problems.is_empty(), "malformed requests not answered as expected:\n  {}\n{}", problems.join("\n  "), cb.report());
    let call = one_call_ended(&cb);
    assert_rtp_both_ways(&cb, &call, 100);
}

#[test]
fn every_torture_message_over_udp_and_tcp_leaves_the_node_up() {
    let mut cb = Crossbar::start(NodeConfig::new());
    let sock = UdpSocket::bind((LOCALHOST, 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let me = sock.local_addr().unwrap();
    let all = torture_messages();
    assert_eq!(all.len(), 49, "tests/data/torture should hold the 49 RFC 4475 messages");
    for (name, msg) in &all {
        let _ = udp_exchange(&sock, cb.sip_addr(), &rewrite_top_via(msg, me, "UDP"), Duration::from_millis(200));
        let _ = tcp_exchange(cb.config.sip_tcp, msg, Duration::from_millis(200));
        assert!(cb.is_alive(), "crossbar died on torture message {name}\n{}", cb.report());
    }
    // the unmodified messages too (answers go to the hosts in their Via, nowhere)
    for (name, msg) in &all {
        let _ = sock.send_to(msg, cb.sip_addr());
        assert!(cb.is_alive(), "crossbar died on torture message {name} (raw)\n{}", cb.report());
    }
    assert_eq!(cb.options_status(), Some(200), "OPTIONS after the torture messages\n{}", cb.report());
    let panics: Vec<String> = cb.stderr_lines().into_iter().filter(|l| l.contains("panicked")).collect();
    assert!(panics.is_empty(), "crossbar panicked:\n{}", panics.join("\n"));
}

// 12 -------------------------------------------------------------------------

#[cfg(feature = "fault-injection")]
#[test]
fn panic_in_one_call_ends_it_and_leaves_the_other_up() {
    let cb = Crossbar::start(NodeConfig::new());
    let dir = TempDir::new("fault");
    // one registered 1001 answers both calls
    let uas = registered_uas(&cb, &dir, "uas_answer.xml", "1001", ACME, "acme1001pw", 2, &[]);
    let (survivor, _) = carrier_caller(&cb, "uac_call.xml", ACME_DID);
    let survivor = survivor.arg("-d").arg(6000).credentials(&dir, "unused", "unused", "unused").spawn(&dir);
    std::thread::sleep(Duration::from_millis(500));
    let (victim, _) = carrier_caller(&cb, "uac_fault.xml", ACME_DID);
    let victim = victim.arg("-d").arg(1500).credentials(&dir, "unused", "unused", "unused").run(&dir);
    assert!(victim.success() && victim.log.contains("BYE received after fault"), "the faulted call's caller got no BYE\n{}\n{}", victim.report(), cb.report());
    let survivor = survivor.wait();
    let uas = uas.wait();
    assert!(survivor.success(), "the other call did not end normally\n{}\n{}", survivor.report(), cb.report());
    assert!(uas.success(), "the callee did not see both calls end with a BYE\n{}\n{}", uas.report(), cb.report());
    assert_eq!(uas.log.matches("BYE received").count(), 2, "{}", uas.report());
    let calls = cb.wait_calls_ended(2, Duration::from_secs(10));
    assert!(calls.iter().any(|c| c.get("disposition") == Some("answered")), "{}", cb.report());
    assert_eq!(cb.options_status(), Some(200), "{}", cb.report());
}

// TCP -------------------------------------------------------------------------

/// A phone registered over TCP: its REGISTER's connection is gone when the call
/// comes (SIPp registers from a separate process), so crossbar connects to the
/// Contact's address over TCP; the carrier leg stays UDP.
#[test]
fn carrier_call_to_an_extension_registered_over_tcp() {
    let cb = Crossbar::start(NodeConfig::new());
    let dir = TempDir::new("tcp");
    let port = free_port(LOCALHOST);
    let reg = Sipp::new("register_once.xml", LOCALHOST, port)
        .remote(cb.sipp_target())
        .arg("-t")
        .arg("t1")
        .credentials(&dir, "1001", ACME, "acme1001pw")
        .timeout(Duration::from_secs(10))
        .run(&dir);
    assert!(reg.success(), "REGISTER over TCP failed\n{}\n{}", reg.report(), cb.report());
    let mut uas = Sipp::new("uas_answer.xml", LOCALHOST, port).arg("-t").arg("t1").media(LOCALHOST, free_media_port(LOCALHOST)).arg("-rtp_echo").calls(1).timeout(Duration::from_secs(30)).spawn(&dir);
    std::thread::sleep(Duration::from_millis(300));
    uas.wait_listening();
    let (caller, _) = carrier_caller(&cb, "uac_call.xml", ACME_DID);
    let uac = caller.arg("-d").arg(2000).run(&dir);
    let uas = uas.wait();
    assert!(uac.success(), "caller failed\n{}\n{}\n{}", uac.report(), uas.report(), cb.report());
    assert!(uas.success(), "TCP callee failed\n{}\n{}", uas.report(), cb.report());
    let call = one_call_ended(&cb);
    assert_eq!(call.get("disposition"), Some("answered"), "{}", call.line);
    assert_rtp_both_ways(&cb, &call, 50);
}

// Late offer --------------------------------------------------------------------

/// A carrier's INVITE without SDP (RFC 3261 §13.2.1): the callee gets an INVITE
/// without SDP too, its 200 carries the offer (through crossbar to the carrier),
/// the carrier's ACK carries the answer (through crossbar to the callee's ACK),
/// and RTP flows both ways through crossbar.
#[test]
fn carrier_late_offer_to_registered_extension_rtp_both_ways() {
    let cb = Crossbar::start(NodeConfig::new());
    let dir = TempDir::new("lateoffer");
    let uas = registered_uas(&cb, &dir, "uas_answer_offer.xml", "1001", ACME, "acme1001pw", 1, &[]);
    let (caller, media) = carrier_caller(&cb, "uac_late_offer.xml", ACME_DID);
    let probe = BacklogProbe::start(media);
    let uac = caller.arg("-d").arg(3000).run(&dir);
    let (rx_bytes, rx_drops) = probe.finish();
    let uas = uas.wait();
    assert!(uac.success(), "caller failed (no SDP offer in the 200?)\n{}\n{}\n{}", uac.report(), uas.report(), cb.report());
    assert!(uas.success(), "callee failed (SDP in the INVITE, or no answer in the ACK?)\n{}\n{}", uas.report(), cb.report());
    assert!(uas.log.contains("INVITE without SDP call_id="), "{}", uas.report());
    assert!(uas.log.contains("BYE received"), "{}", uas.report());

    // Both SDPs point at crossbar (127.0.0.1), never at the other party.
    let sdp_addr = |log: &str, marker: &str| log.lines().find_map(|l| l.split(marker).nth(1)).map(|s| s.trim().to_string()).unwrap_or_default();
    let offer = sdp_addr(&uac.log, "OFFER in 200 sdp=");
    let answer = sdp_addr(&uas.log, "ACK answer sdp=");
    assert!(offer.starts_with("127.0.0.1:"), "the caller's offer does not point at crossbar: {offer:?}\n{}", uac.report());
    assert!(answer.starts_with("127.0.0.1:"), "the callee's answer does not point at crossbar: {answer:?}\n{}", uas.report());
    assert_ne!(answer, media.to_string(), "the caller's media address leaked to the callee");
    assert_ne!(offer, answer, "crossbar has one media address per leg");

    let call = one_call_ended(&cb);
    assert_eq!(call.get("tenant"), Some("acme"), "{}", call.line);
    assert_eq!(call.get("disposition"), Some("answered"), "{}", call.line);
    // 3 s of 20 ms packets is ~150
    assert_rtp_both_ways(&cb, &call, 75);
    assert!(rx_bytes > 0 || rx_drops > 0, "no RTP reached the caller's socket {media}");
}

// Overload -------------------------------------------------------------------

/// A carrier INVITE for acme's DID from `sock` (bound on the carrier address).
#[cfg(feature = "fault-injection")]
fn carrier_invite(sock: &UdpSocket, cb: &Crossbar, call_id: &str, fault: Option<&str>) -> Vec<u8> {
    let me = sock.local_addr().unwrap();
    let fault = fault.map(|f| format!("X-Crossbar-Fault: {f}\r\n")).unwrap_or_default();
    format!(
        "INVITE sip:{ACME_DID}@{target} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-{call_id}\r\nMax-Forwards: 70\r\n\
         From: <sip:15550009999@{ip}>;tag=t-{call_id}\r\nTo: <sip:{ACME_DID}@{target}>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\n\
         Contact: <sip:carrier@{me}>\r\n{fault}Content-Length: 0\r\n\r\n",
        target = cb.sip_addr(),
        ip = me.ip(),
    )
    .into_bytes()
}

/// A node that refuses new calls that waited 250 ms, and three carrier sockets.
#[cfg(feature = "fault-injection")]
fn overload_node() -> (Crossbar, [UdpSocket; 3]) {
    let cb = Crossbar::start(NodeConfig { overload_wait_ms: 250, ..NodeConfig::new() });
    let bind = || {
        let s = UdpSocket::bind((CARRIER, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        s
    };
    (cb, [bind(), bind(), bind()])
}

/// The INVITE sent from `sock` got 503 "node overloaded" with Retry-After; returns it.
#[cfg(feature = "fault-injection")]
fn assert_refused_as_overloaded(cb: &Crossbar, sock: &UdpSocket, name: &str) -> String {
    let resp = collect_final(sock, Duration::from_secs(5)).map(|m| String::from_utf8_lossy(&m).into_owned());
    let resp = resp.unwrap_or_else(|| panic!("no final response to the {name} INVITE\n{}", cb.report()));
    assert_eq!(status_code(resp.as_bytes()), Some(503), "{name}: {resp}\n{}", cb.report());
    assert!(header(&resp, "Reason").is_some_and(|r| r.contains("node overloaded")), "{name}: {resp}");
    assert_eq!(header(&resp, "Retry-After"), Some("1"), "{name}: {resp}");
    resp
}

/// A new call whose INVITE waited `sip.overload_wait_ms` (250 here) inside the node is
/// refused with 503 before it costs a call; once the node keeps up, calls are
/// handled again. The wait is made with a test-only hook that holds the tenant
/// actor up for 600 ms, as a node short of CPU would.
#[cfg(feature = "fault-injection")]
#[test]
fn new_calls_that_waited_too_long_in_an_overloaded_node_get_503() {
    let (cb, [stalled, queued, later]) = overload_node();
    stalled.send_to(&carrier_invite(&stalled, &cb, "ovl-1", Some("stall-tenant")), cb.sip_addr()).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    queued.send_to(&carrier_invite(&queued, &cb, "ovl-2", None), cb.sip_addr()).unwrap();
    for (name, sock) in [("stalled", &stalled), ("queued", &queued)] {
        assert_refused_as_overloaded(&cb, sock, name);
    }
    // The node keeps up again: the next call is routed (1001 is not registered: 480).
    let resp = udp_exchange(&later, cb.sip_addr(), &carrier_invite(&later, &cb, "ovl-3", None), Duration::from_secs(5));
    assert_eq!(resp.as_deref().and_then(status_code), Some(480), "{}", cb.report());
    assert!(cb.wait_log("node overloaded: new calls refused with 503", Duration::from_secs(5)).is_some(), "{}", cb.report());
}

/// The wait counts from when the datagram reached the host, not from when crossbar
/// read it: an INVITE that sat in the SIP socket's buffer while the receive loop was
/// held up (a test-only hook stalls it for 600 ms, as a node short of CPU would) is
/// refused with 503 "node overloaded", though crossbar handles it the moment it reads
/// it. Measured from the read (as before), it would have been routed (480).
#[cfg(feature = "fault-injection")]
#[test]
fn time_in_the_socket_buffer_counts_as_waiting() {
    let (cb, [stall, queued, later]) = overload_node();
    // Any request holds the loop up; an OPTIONS gets its 200 once the stall is over.
    let options = format!(
        "OPTIONS sip:{target} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-stall\r\nMax-Forwards: 70\r\n\
         From: <sip:probe@{ip}>;tag=stall\r\nTo: <sip:{target}>\r\nCall-ID: stall-transport\r\nCSeq: 1 OPTIONS\r\n\
         X-Crossbar-Fault: stall-transport\r\nContent-Length: 0\r\n\r\n",
        target = cb.sip_addr(),
        me = stall.local_addr().unwrap(),
        ip = CARRIER,
    );
    stall.send_to(options.as_bytes(), cb.sip_addr()).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    let sent = Instant::now();
    queued.send_to(&carrier_invite(&queued, &cb, "sockwait-1", None), cb.sip_addr()).unwrap();
    let resp = assert_refused_as_overloaded(&cb, &queued, "queued");
    assert!(sent.elapsed() >= Duration::from_millis(400), "the INVITE was answered before the stall ended: {resp}\n{}", cb.report());
    // The OPTIONS itself was answered, late; and the next call is routed again
    // (1001 is not registered: 480).
    let ok = collect_final(&stall, Duration::from_secs(5)).map(|m| String::from_utf8_lossy(&m).into_owned());
    assert_eq!(ok.as_deref().map(str::as_bytes).and_then(status_code), Some(200), "{ok:?}\n{}", cb.report());
    let resp = udp_exchange(&later, cb.sip_addr(), &carrier_invite(&later, &cb, "sockwait-2", None), Duration::from_secs(5));
    assert_eq!(resp.as_deref().and_then(status_code), Some(480), "{}", cb.report());
}
