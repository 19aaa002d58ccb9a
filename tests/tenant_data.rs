//! Tenant data and isolation proofs (issue 4), against a real node with real
//! SIPp peers: CDRs survive kill -9, no tenant reads another's records, the
//! embedded file holds no plaintext, one tenant's flood does not slow another,
//! a tenant's crash does not touch another's calls, plan changes apply live.
//! Each test prints what it tried and what it measured.

mod common;

use common::*;
use std::collections::HashSet;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

const ACME: &str = "acme.localhost";
const GLOBEX: &str = "globex.localhost";
const GLOBEX_DID: &str = "15550002000";

fn carrier_call(cb: &Crossbar, scenario: &str, did: &str) -> Sipp {
    Sipp::new(scenario, CARRIER, free_port(CARRIER))
        .remote(cb.sipp_target())
        .caller("15551230000", "127.0.0.2", "127.0.0.1", did)
        .media(CARRIER, free_media_port(CARRIER))
}

fn state_of(c: &serde_json::Value) -> &str {
    c["state"].as_str().unwrap_or("")
}

// 4. Durability ----------------------------------------------------------------

/// The store backends a node-level proof runs against.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Backend {
    Embedded,
    Redis,
}

/// A node on `backend` (for Redis, with its own redis-server, returned to keep it up).
fn node_on(backend: Backend, mut cfg: NodeConfig) -> (Crossbar, Option<RedisServer>) {
    let redis = (backend == Backend::Redis).then(RedisServer::start);
    cfg.redis_url = redis.as_ref().map(|r| r.url());
    (Crossbar::start(cfg), redis)
}

#[test]
fn kill_9_with_calls_in_progress_loses_no_cdr_embedded() {
    kill_9_with_calls_in_progress_loses_no_cdr(Backend::Embedded);
}

#[test]
fn kill_9_with_calls_in_progress_loses_no_cdr_redis() {
    kill_9_with_calls_in_progress_loses_no_cdr(Backend::Redis);
}

fn kill_9_with_calls_in_progress_loses_no_cdr(backend: Backend) {
    println!("backend: {backend:?}");
    let (mut cb, _redis) = node_on(backend, NodeConfig::new());
    let dir = TempDir::new("durability");
    let uas = registered_uas(&cb, &dir, "uas_answer.xml", "1001", ACME, "acme1001pw", 10, &[]);

    // One call that completes normally.
    let done = carrier_call(&cb, "uac_call.xml", ACME_DID).arg("-d").arg(200).run(&dir);
    assert!(done.success(), "first call failed\n{}\n{}", done.report(), cb.report());
    let completed = wait_for(Duration::from_secs(5), || {
        let c = cb.cdrs("acme");
        (c.len() == 1 && state_of(&c[0]) == "completed").then_some(c)
    })
    .unwrap_or_else(|| panic!("the first call's CDR is not completed: {:?}", cb.cdrs("acme")));

    // Three calls held up, then the node is killed.
    let _held = carrier_call(&cb, "uac_call.xml", ACME_DID).arg("-d").arg(60_000).arg("-l").arg(3).calls(3).timeout(Duration::from_secs(90)).spawn(&dir);
    let in_progress = wait_for(Duration::from_secs(15), || {
        let c = cb.cdrs("acme");
        (c.iter().filter(|c| state_of(c) == "in-progress" && !c["answer"].is_null()).count() == 3).then_some(c)
    })
    .unwrap_or_else(|| panic!("three answered calls never showed up: {:?}\n{}", cb.cdrs("acme"), cb.report()));
    println!("before kill -9: {} CDRs ({} completed, 3 answered and in progress)", in_progress.len(), completed.len());
    cb.kill9();
    drop(uas);

    cb.restart();
    let after = cb.cdrs("acme");
    let ids: HashSet<&str> = after.iter().map(|c| c["id"].as_str().unwrap()).collect();
    let interrupted = after.iter().filter(|c| state_of(c) == "interrupted").count();
    let complete = after.iter().filter(|c| state_of(c) == "completed").count();
    println!("after restart: {} CDRs, {} unique ids, {interrupted} interrupted, {complete} completed", after.len(), ids.len());
    assert_eq!(after.len(), 4, "every call has exactly one CDR: {after:?}");
    assert_eq!(ids.len(), 4, "no duplicates: {after:?}");
    assert_eq!(interrupted, 3, "calls in progress are closed as interrupted: {after:?}");
    assert_eq!(complete, 1);
    for c in after.iter().filter(|c| state_of(c) == "interrupted") {
        assert_eq!(c["disposition"], "interrupted");
        assert!(c["end"].is_string() && c["answer"].is_string(), "{c}");
    }
    // Restarting again changes nothing (the markers are gone).
    cb.restart();
    assert_eq!(cb.cdrs("acme"), after, "a second restart must not touch closed CDRs");
}

// 1. Data isolation through the commands, and no plaintext at rest ---------------

#[test]
fn tenants_cannot_read_each_others_records_and_nothing_is_plaintext_at_rest_embedded() {
    tenants_cannot_read_each_others_records_and_nothing_is_plaintext_at_rest(Backend::Embedded);
}

#[test]
fn tenants_cannot_read_each_others_records_and_nothing_is_plaintext_at_rest_redis() {
    tenants_cannot_read_each_others_records_and_nothing_is_plaintext_at_rest(Backend::Redis);
}

fn tenants_cannot_read_each_others_records_and_nothing_is_plaintext_at_rest(backend: Backend) {
    println!("backend: {backend:?}");
    let mut cfg = NodeConfig::new();
    cfg.acme_extra = "recording = \"all\"".into();
    let (cb, redis) = node_on(backend, cfg);
    let dir = TempDir::new("isolation");
    let uas = registered_uas(&cb, &dir, "uas_answer.xml", "1001", ACME, "acme1001pw", 1, &[]);
    let call = carrier_call(&cb, "uac_call.xml", ACME_DID).arg("-d").arg(3000).run(&dir);
    assert!(call.success(), "{}\n{}", call.report(), cb.report());
    let _ = uas.wait();
    let acme = wait_for(Duration::from_secs(5), || {
        let c = cb.cdrs("acme");
        (c.len() == 1 && state_of(&c[0]) == "completed").then_some(c)
    })
    .expect("acme's CDR");
    let acme_id = acme[0]["id"].as_str().unwrap().to_string();
    assert_eq!(acme[0]["from"], "15551230000");
    assert_eq!(acme[0]["did"], ACME_DID);
    assert_eq!(acme[0]["recording"], acme_id.as_str(), "acme records all calls: {}", acme[0]);

    // Positive control: acme gets its own recording, a stereo 8 kHz WAV with the call's audio.
    let wav_path = dir.join("acme.wav");
    let (ok, out, err) = cb.cli(&["recording", "get", "--tenant", "acme", &acme_id, "--out", wav_path.to_str().unwrap()]);
    assert!(ok, "{out} {err}");
    let wav = std::fs::read(&wav_path).unwrap();
    assert!(wav.len() > 44 && &wav[..4] == b"RIFF" && &wav[8..12] == b"WAVE", "not a WAV: {} bytes", wav.len());
    assert_eq!(u16::from_le_bytes([wav[22], wav[23]]), 2, "two channels (caller, callee)");
    assert_eq!(u32::from_le_bytes([wav[24], wav[25], wav[26], wav[27]]), 8000);
    let samples: Vec<i16> = wav[44..].chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect();
    let loud = |ch: usize| samples.iter().skip(ch).step_by(2).filter(|s| s.unsigned_abs() > 200).count();
    println!("acme's recording: {} bytes, loud samples: caller {}, callee {}", wav.len(), loud(0), loud(1));
    assert!(loud(0) > 100 && loud(1) > 100, "both parties' audio is in the recording");

    let mut attempts = 0;
    let mut succeeded = Vec::new();
    // globex's views contain nothing of acme's.
    attempts += 1;
    let globex = cb.cdrs("globex");
    if globex.iter().any(|c| c["id"] == acme_id.as_str() || c["tenant"] == "acme") {
        succeeded.push("globex's CDR list shows acme's call");
    }
    attempts += 1;
    let (_, events, _) = cb.cli(&["events", "list", "--tenant", "globex", "--limit", "1000"]);
    if events.contains(&acme_id) {
        succeeded.push("globex's event stream shows acme's call");
    }
    // acme's record ids under globex's scope.
    for args in [
        vec!["recording", "get", "--tenant", "globex", acme_id.as_str(), "--out", "/tmp/crossbar-should-not-exist.wav"],
        vec!["recording", "get", "--tenant", "globex", "../acme/cdr/x", "--out", "/dev/null"],
        vec!["cdr", "list", "--tenant", "acme/../globex", "--json"],
        vec!["cdr", "list", "--tenant", "nosuchtenant", "--json"],
    ] {
        attempts += 1;
        let (ok, out, err) = cb.cli(&args);
        if ok && (out.contains(&acme_id) || args[0] == "recording") {
            succeeded.push("a command read acme's record through another scope");
        }
        assert!(!ok || !out.contains("15551230000"), "{args:?} → {out} {err}");
    }
    attempts += 1;
    let (_, recs, _) = cb.cli(&["recording", "list", "--tenant", "globex"]);
    if recs.contains(&acme_id) {
        succeeded.push("globex's recording list shows acme's recording");
    }
    let (_, own, _) = cb.cli(&["recording", "list", "--tenant", "acme"]);
    assert!(own.contains(&acme_id), "acme lists its own recording: {own}");
    // acme's events do have the call (the positive control).
    let (_, acme_events, _) = cb.cli(&["events", "list", "--tenant", "acme", "--limit", "1000"]);
    assert!(acme_events.contains("call.started") && acme_events.contains(&acme_id), "{acme_events}");
    println!("cross-tenant command attempts: {attempts}, succeeded: {}", succeeded.len());
    assert!(succeeded.is_empty(), "{succeeded:?}");

    // What the store holds (the embedded file, or everything in Redis) contains no
    // phone number, DID or SIP password of any tenant.
    let db = match &redis {
        None => std::fs::read(cb.dir.join("data/crossbar.redb")).expect("the embedded store file"),
        Some(r) => r.dump(),
    };
    let mut found = Vec::new();
    for needle in ["15550001000", "15550002000", "15551230000", "acme1001pw", "acme1002pw", "globex2001pw"] {
        if db.windows(needle.len()).any(|w| w == needle.as_bytes()) {
            found.push(needle);
        }
    }
    println!("searched {} bytes of the {backend:?} store for 6 secrets/numbers: found {found:?}", db.len());
    assert!(found.is_empty(), "plaintext at rest: {found:?}");
    // Control: the file does contain the (public) record id, so the search works.
    assert!(db.windows(acme_id.len()).any(|w| w == acme_id.as_bytes()), "control: the record id should be findable");
}

// 2. Load isolation ----------------------------------------------------------------

/// (answered, refused, mean setup ms) from a uac_probe.xml log.
fn probe_results(log: &str) -> (usize, usize, f64) {
    let mut t0 = std::collections::HashMap::new();
    let (mut answered, mut refused, mut setup) = (0, 0, Vec::new());
    for l in log.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.as_slice() {
            ["T0", call, t, ..] => {
                t0.insert(call.to_string(), t.parse::<f64>().unwrap_or(0.0));
            }
            ["ANSWERED", call, t, ..] => {
                answered += 1;
                if let Some(s) = t0.get(*call) {
                    setup.push(t.parse::<f64>().unwrap_or(0.0) - s);
                }
            }
            ["REFUSED", ..] => refused += 1,
            _ => {}
        }
    }
    let mean = if setup.is_empty() { f64::NAN } else { setup.iter().sum::<f64>() / setup.len() as f64 };
    (answered, refused, mean)
}

#[test]
fn a_flooded_tenant_does_not_slow_down_another() {
    let mut cfg = NodeConfig::new();
    cfg.log_level = "warn".into();
    cfg.acme_extra = "[limits]\ncalls_per_second = 10".into();
    cfg.globex_extra = "plan = \"starter\"".into();
    let cb = Crossbar::start(cfg);
    let dir = TempDir::new("load");
    let _acme_uas = registered_uas(&cb, &dir, "uas_answer.xml", "1001", ACME, "acme1001pw", 100_000, &["-l", "1000"]);
    let _globex_uas = registered_uas(&cb, &dir, "uas_answer.xml", "2001", GLOBEX, "globex2001pw", 100_000, &["-l", "1000"]);
    let steady = |cb: &Crossbar, dir: &TempDir| {
        carrier_call(cb, "uac_probe.xml", GLOBEX_DID).arg("-r").arg(4).arg("-l").arg(100).calls(40).timeout(Duration::from_secs(40)).spawn(dir)
    };

    // Baseline: globex alone.
    let base = steady(&cb, &dir).wait();
    let (b_ok, b_refused, b_setup) = probe_results(&base.log);
    println!("globex alone: {b_ok}/40 answered, {b_refused} refused, mean setup {b_setup:.1} ms");
    assert_eq!((b_ok, b_refused), (40, 0), "{}\n{}", base.report(), cb.report());

    // acme flooded at 10x its 10 calls/s limit while globex goes on.
    let flood = carrier_call(&cb, "uac_probe.xml", ACME_DID).arg("-r").arg(100).arg("-l").arg(2000).calls(1000).timeout(Duration::from_secs(60)).spawn(&dir);
    let during = steady(&cb, &dir).wait();
    let flood = flood.wait();
    let (g_ok, g_refused, g_setup) = probe_results(&during.log);
    let (a_ok, a_refused, _) = probe_results(&flood.log);
    println!("acme flood: 1000 calls at 100/s against a 10/s limit: {a_ok} answered, {a_refused} refused with 503");
    println!("globex during the flood: {g_ok}/40 answered, {g_refused} refused, mean setup {g_setup:.1} ms (alone: {b_setup:.1} ms)");
    assert_eq!((g_ok, g_refused), (40, 0), "globex must keep a 100% success rate\n{}\n{}", during.report(), cb.report());
    assert!(a_refused >= 700, "acme's excess must be refused: {a_refused} refused\n{}", flood.report());
    assert!((50..=250).contains(&a_ok), "acme still gets about its limit: {a_ok} answered in ~10 s");
    assert!(flood.log.contains("tenant call rate limit"), "the 503 names the limit in its Reason");
}

// 3. Faults ----------------------------------------------------------------------

/// Sends a REGISTER without credentials and returns the status, if any.
fn register_probe(cb: &Crossbar, domain: &str, fault: bool, seq: u32) -> Option<u16> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let local = sock.local_addr().unwrap();
    let extra = if fault { "X-Crossbar-Fault: panic-tenant\r\n" } else { "" };
    let msg = format!(
        "REGISTER sip:{domain} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bKprobe{seq}\r\nMax-Forwards: 70\r\nFrom: <sip:1001@{domain}>;tag=p{seq}\r\nTo: <sip:1001@{domain}>\r\nCall-ID: probe-{seq}-{}\r\nCSeq: 1 REGISTER\r\nContact: <sip:1001@{local}>\r\n{extra}Content-Length: 0\r\n\r\n",
        std::process::id()
    );
    sock.send_to(msg.as_bytes(), cb.sip_addr()).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).ok()?;
    status_code(&buf[..n])
}

#[test]
fn a_crashing_tenant_is_restarted_and_other_tenants_calls_survive() {
    let cb = Crossbar::start(NodeConfig::new());
    let dir = TempDir::new("faults");
    let globex_uas = registered_uas(&cb, &dir, "uas_answer.xml", "2001", GLOBEX, "globex2001pw", 1, &[]);
    let acme_uas = registered_uas(&cb, &dir, "uas_answer.xml", "1001", ACME, "acme1001pw", 10, &[]);
    // A globex call with RTP, held 6 s.
    let globex_call = carrier_call(&cb, "uac_call.xml", GLOBEX_DID).arg("-d").arg(6000).spawn(&dir);
    std::thread::sleep(Duration::from_millis(1500));

    // Panic in acme's Tenant actor.
    let crashed_at = Instant::now();
    register_probe(&cb, ACME, true, 1);
    // acme answers again: first any response from its tenant actor, then a whole call.
    let back = wait_for(Duration::from_secs(5), || register_probe(&cb, ACME, false, 2).filter(|c| *c == 401).map(|_| crashed_at.elapsed()));
    let back = back.unwrap_or_else(|| panic!("acme did not come back\n{}", cb.report()));
    let call = carrier_call(&cb, "uac_probe.xml", ACME_DID).run(&dir);
    let (answered, _, _) = probe_results(&call.log);
    let call_ok_after = crashed_at.elapsed();
    println!("acme's tenant actor panicked: answering again after {} ms, a full call answered {} ms after the panic", back.as_millis(), call_ok_after.as_millis());
    assert!(cb.report().contains("tenant actor failed"), "the supervisor saw the failure\n{}", cb.report());
    assert_eq!(answered, 1, "acme accepts calls again (registrations survive the restart)\n{}\n{}", call.report(), cb.report());
    assert!(back < Duration::from_secs(1), "acme must accept again within 1 s, took {back:?}");

    // And a panic in one of acme's calls: that call is hung up (BYE to its caller), nothing else moves.
    let victim = carrier_call(&cb, "uac_fault.xml", ACME_DID).arg("-d").arg(1000).credentials(&dir, "unused", "unused", "unused").run(&dir);
    assert!(victim.success() && victim.log.contains("BYE received after fault"), "the panicked call's caller got no BYE\n{}\n{}", victim.report(), cb.report());
    println!("a panic in an acme call: its caller got a BYE ({} ms after acme's tenant panic)", crashed_at.elapsed().as_millis());

    // The globex call went on with media flowing, and ended normally.
    let globex_call = globex_call.wait();
    assert!(globex_call.success(), "globex's call did not survive\n{}\n{}", globex_call.report(), cb.report());
    let ended = cb.wait_calls_ended(3, Duration::from_secs(10));
    let g = ended.iter().find(|c| c.get("tenant") == Some("globex")).unwrap_or_else(|| panic!("no globex call ended\n{}", cb.report()));
    println!("globex call across acme's crash: {}", g.line);
    assert_eq!(g.get("disposition"), Some("answered"));
    assert!(g.num("a_to_b_packets") >= 150 && g.num("b_to_a_packets") >= 150, "media kept flowing: {}", g.line);
    drop((globex_uas, acme_uas));
}

// Plans -----------------------------------------------------------------------------

#[test]
fn plan_change_applies_to_the_next_call_without_restart() {
    let mut cfg = NodeConfig::new();
    cfg.acme_extra = "plan = \"starter\"\n[limits]\nmax_calls = 1".into();
    let cb = Crossbar::start(cfg);
    let dir = TempDir::new("plan");
    let _uas = registered_uas(&cb, &dir, "uas_answer.xml", "1001", ACME, "acme1001pw", 10, &[]);
    // One call held: the second is over the limit of 1.
    let _held = carrier_call(&cb, "uac_call.xml", ACME_DID).arg("-d").arg(8000).timeout(Duration::from_secs(30)).spawn(&dir);
    wait_for(Duration::from_secs(10), || cb.cdrs("acme").iter().any(|c| !c["answer"].is_null()).then_some(())).expect("first call answered");
    let second = carrier_call(&cb, "uac_probe.xml", ACME_DID).run(&dir);
    let (ok, refused, _) = probe_results(&second.log);
    println!("starter with max_calls = 1, one call up: second call answered={ok} refused={refused}");
    assert_eq!((ok, refused), (0, 1), "{}", second.report());
    assert!(second.log.contains("concurrent call limit"), "{}", second.log);

    // Upgrade to pro (its own defaults, no override): next call goes through.
    let (ok_cli, out, err) = cb.cli(&["tenant", "set-plan", "--tenant", "acme", "pro"]);
    assert!(ok_cli, "set-plan failed: {out} {err}");
    assert!(out.contains("\"max_calls\": 200"), "{out}");
    let third = carrier_call(&cb, "uac_probe.xml", ACME_DID).run(&dir);
    let (ok, refused, _) = probe_results(&third.log);
    println!("after set-plan pro: third call answered={ok} refused={refused}");
    assert_eq!((ok, refused), (1, 0), "{}\n{}", third.report(), cb.report());

    // A plan that lacks a feature the tenant uses is refused with a stable code.
    let (ok_cli, _, err) = cb.cli(&["tenant", "set-plan", "--tenant", "acme", "gold"]);
    assert!(!ok_cli && err.contains("invalid_plan"), "{err}");
}

// Keys ------------------------------------------------------------------------------

#[test]
fn key_rotation_rewrap_and_tenant_deletion_through_the_commands() {
    let mut cb = Crossbar::start(NodeConfig::new());
    let dir = TempDir::new("keys");
    let _uas = registered_uas(&cb, &dir, "uas_answer.xml", "1001", ACME, "acme1001pw", 10, &[]);
    let call = |cb: &Crossbar| {
        let out = carrier_call(cb, "uac_probe.xml", ACME_DID).run(&dir);
        assert_eq!(probe_results(&out.log).0, 1, "{}\n{}", out.report(), cb.report());
    };
    call(&cb);
    let (ok, out, err) = cb.cli(&["keys", "rotate", "--tenant", "acme"]);
    assert!(ok && out.contains("\"current_key_id\""), "{out} {err}");
    call(&cb);
    let before = wait_for(Duration::from_secs(5), || {
        let c = cb.cdrs("acme");
        (c.len() == 2 && c.iter().all(|c| state_of(c) == "completed")).then_some(c)
    })
    .expect("two completed CDRs, one under each data key");

    // New master key: the node is stopped, every tenant key re-wrapped, the file swapped.
    let key_file = cb.dir.join("data/master.key");
    let old_key = std::fs::read(&key_file).unwrap();
    cb.kill9();
    let (ok, out, err) = cb.cli(&["keys", "rewrap"]);
    println!("keys rewrap: {out}{err}");
    assert!(ok, "{out} {err}");
    assert_ne!(std::fs::read(&key_file).unwrap(), old_key, "the master key file holds the new key");
    cb.restart();
    assert_eq!(cb.cdrs("acme"), before, "every record opens under the new master key");
    assert!(!cb.cdrs("globex").iter().any(|c| c["tenant"] == "acme"));

    // Deleting a tenant destroys its keys: its records are gone for good.
    cb.kill9();
    let (ok, out, err) = cb.cli(&["tenant", "delete", "--tenant", "acme"]);
    println!("tenant delete: {out}{err}");
    assert!(ok && out.contains("\"keys_destroyed\": 2"), "{out} {err}");
    let (ok, _, err) = cb.cli(&["cdr", "list", "--tenant", "acme", "--json"]);
    assert!(!ok && err.contains("unknown_tenant"), "acme's records are unreadable after deletion: {err}");
}

// Resources -------------------------------------------------------------------------

#[test]
fn ports_and_call_routes_return_to_zero_after_many_calls() {
    let mut cfg = NodeConfig::new();
    cfg.log_level = "warn".into();
    let cb = Crossbar::start(cfg);
    let dir = TempDir::new("leak");
    let _uas = registered_uas(&cb, &dir, "uas_answer.xml", "1001", ACME, "acme1001pw", 100_000, &["-l", "1000"]);
    let calls = 600;
    let out = carrier_call(&cb, "uac_probe.xml", ACME_DID).arg("-r").arg(100).arg("-l").arg(200).calls(calls).timeout(Duration::from_secs(60)).run(&dir);
    let (answered, refused, setup) = probe_results(&out.log);
    assert_eq!((answered, refused), (calls as usize, 0), "{}\n{}", out.report(), cb.report());
    let status = wait_for(Duration::from_secs(10), || {
        let (ok, s, _) = cb.cli(&["status"]);
        let v: serde_json::Value = serde_json::from_str(&s).ok()?;
        (ok && v["calls_in_progress"] == 0 && v["media_ports_in_use"] == 0 && v["call_routes"] == 0).then_some(v)
    });
    println!("{calls} calls at 100/s, mean setup {setup:.1} ms; afterwards: {status:?}");
    assert!(status.is_some(), "ports or call routes leaked: {}", cb.cli(&["status"]).1);
}
