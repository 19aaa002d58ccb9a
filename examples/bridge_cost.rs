//! CPU cost of one packet through the WebRTC ↔ plain RTP bridge, sans-IO.
//!
//! No sockets: a str0m `Rtc` plays the browser (full ICE, DTLS-SRTP), a loop
//! plays the carrier (plain RTP), both joined to one [`Bridge`] in memory on a
//! virtual clock. After ICE + DTLS, `SECONDS` of 20 ms G.711 packets flow both
//! ways (50 packets/s each way, as in a call). Time spent inside the bridge
//! (`handle_receive`, `handle_timeout`, `poll_transmit`) and inside the client
//! `Rtc` (the baseline: one str0m endpoint doing the same SRTP work) is summed
//! separately, then scaled by the thread's CPU time over wall time so that
//! time other processes took the core is not counted.
//!
//! usage: cargo run --release --example bridge_cost [SECONDS] [CALLS] (default 600 s, 1 call)
//! With CALLS > 1 the calls take turns each 20 ms tick, as on the media thread, so
//! each packet finds its call's state as cold as it is in a loaded node.
//! prints: `RESULT bridge_us_per_pkt=.. client_us_per_pkt=.. packets=.. ..`
//!
//! On the shared 2-core development machine (600 s call, 60 000 packets, five
//! alternating runs each, medians; other load on the machine, so ±30 %):
//! the bridge went from 2.2 µs/packet (a `Vec` per payload and per datagram,
//! a queue of owned datagrams, transport-cc feedback every ~60 ms each way)
//! to 1.9 µs with the bridge's own allocations and copies gone, and to
//! 1.25 µs with transport-cc no longer negotiated (RTCP datagrams per
//! direction: 10 080 → 120); the str0m client went from 2.1 to 1.4 µs.
//! What is left is str0m's: SRTP (AES-256-GCM, about a third) and its
//! poll/timeout machinery; the bridge's own code is under 3 % of it.
//! With 300 calls taking turns (2026-11-23, same session): 2.4–3.9 µs through
//! the bridge against 2.2–2.4 µs for one call: cold state costs up to ~1.8×.
//! Session 7, with the browser leg's RTP on crossbar's own SRTP after DTLS:
//! 0.43 µs/packet for one call (str0m client 2.7 µs), 1.43 µs with 300 calls
//! (str0m client 6.2–6.6 µs in the same, busier, run).

use crossbar::media::webrtc::{Bridge, LegKind};
use crossbar::media::Side;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use str0m::change::SdpOffer;
use str0m::net::{Protocol, Receive};
use str0m::rtp::{RtpWrite, SeqNo, Ssrc};
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const PLAIN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(127, 0, 0, 1), 30000));
const WEB: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(127, 0, 0, 1), 30002));
const CARRIER: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(127, 0, 0, 2), 40000));
const BROWSER: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(127, 0, 0, 1), 50000));

/// This thread's CPU time (ns), from the scheduler's accounting.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat").ok().and_then(|s| s.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

/// Time spent in the bridge and in the client, call by call. Each timed call
/// costs two clock reads; that overhead, measured at start, is subtracted.
#[derive(Default)]
struct Counters {
    bridge: Duration,
    client: Duration,
    bridge_calls: u64,
    client_calls: u64,
    to_carrier: u64,
    browser_got: u64,
    rtcp_to_browser: u64,
    rtcp_to_bridge: u64,
    datagrams_to_browser: u64,
    datagrams_to_bridge: u64,
}

/// Moves datagrams both ways until neither side has anything more to send.
/// Returns when the client wants its next timeout.
fn settle(rtc: &mut Rtc, bridge: &mut Bridge, now: Instant, c: &mut Counters, connected: &mut bool) -> Option<Instant> {
    loop {
        let (moved, next) = client_drain(rtc, bridge, now, c, connected);
        if moved + bridge_drain(rtc, bridge, now, c) == 0 {
            return next;
        }
    }
}

impl Counters {
    fn client_time(&mut self, since: Instant) {
        self.client += since.elapsed();
        self.client_calls += 1;
    }

    fn bridge_time(&mut self, since: Instant) {
        self.bridge += since.elapsed();
        self.bridge_calls += 1;
    }
}

/// What timing one call costs by itself (two clock reads), best of several tries.
fn clock_overhead() -> Duration {
    let mut best = Duration::MAX;
    for _ in 0..20 {
        let mut acc = Duration::ZERO;
        let start = Instant::now();
        for _ in 0..10_000 {
            let t = Instant::now();
            acc += std::hint::black_box(t).elapsed();
        }
        std::hint::black_box(acc);
        best = best.min(start.elapsed() / 10_000);
    }
    best
}

/// The browser: polls its `Rtc`, hands its datagrams to the bridge.
fn client_drain(rtc: &mut Rtc, bridge: &mut Bridge, now: Instant, c: &mut Counters, connected: &mut bool) -> (usize, Option<Instant>) {
    let mut moved = 0;
    loop {
        let t = Instant::now();
        let o = rtc.poll_output();
        c.client_time(t);
        if !matches!(o, Ok(Output::Timeout(_)) | Err(_)) {
            moved += 1;
        }
        match o {
            Ok(Output::Timeout(t)) => return (moved, Some(t)),
            Err(_) => return (moved, None),
            Ok(Output::Transmit(tx)) => {
                c.datagrams_to_bridge += 1;
                if is_rtcp(&tx.contents) {
                    c.rtcp_to_bridge += 1;
                }
                let t = Instant::now();
                bridge.handle_receive(Side::B, BROWSER, &tx.contents, now);
                c.bridge_time(t);
            }
            Ok(Output::Event(Event::Connected)) => *connected = true,
            Ok(Output::Event(Event::RtpPacket(_))) => c.browser_got += 1,
            Ok(Output::Event(e)) => if std::env::var_os("BRIDGE_COST_DEBUG").is_some() { eprintln!("browser event {e:?}") },
        }
    }
}

fn is_rtcp(d: &[u8]) -> bool {
    d.len() > 1 && d[0] >> 6 == 2 && (192..224).contains(&d[1])
}

/// Everything the bridge wants to send: to the browser's `Rtc`, or counted as sent to the carrier.
fn bridge_drain(rtc: &mut Rtc, bridge: &mut Bridge, now: Instant, c: &mut Counters) -> usize {
    let mut moved = 0;
    let mut buf = [0u8; 2048];
    loop {
        let t = Instant::now();
        let out = bridge.poll_transmit(&mut buf);
        c.bridge_time(t);
        let Some((side, dest, n)) = out else { return moved };
        moved += 1;
        let bytes = &buf[..n];
        if side == Side::A {
            assert_eq!(dest, CARRIER);
            c.to_carrier += 1;
            continue;
        }
        c.datagrams_to_browser += 1;
        if is_rtcp(bytes) {
            c.rtcp_to_browser += 1;
        }
        let t = Instant::now();
        let contents = bytes.try_into().expect("datagram size");
        rtc.handle_input(Input::Receive(now, Receive { proto: Protocol::Udp, source: WEB, destination: BROWSER, contents })).expect("browser input");
        c.client_time(t);
    }
}

fn rtp(seq: u16, ts: u32) -> Vec<u8> {
    let mut p = vec![0x80, 0, (seq >> 8) as u8, seq as u8];
    p.extend_from_slice(&ts.to_be_bytes());
    p.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    p.extend_from_slice(&[0xd5; 160]);
    p
}

/// One call: the browser's `Rtc`, crossbar's bridge, and their timers.
struct Call {
    rtc: Rtc,
    bridge: Bridge,
    ssrc: Ssrc,
    bridge_next: Option<Instant>,
    client_next: Option<Instant>,
}

/// Sets up one call (offer, answer, ICE + DTLS) on the virtual clock `now`.
fn call(now: &mut Instant, c: &mut Counters) -> Call {
    let mut bridge = Bridge::new([LegKind::Plain, LegKind::WebRtc], [PLAIN, WEB]);
    let carrier_offer = format!("v=0\r\no=- 1 1 IN IP4 127.0.0.2\r\ns=-\r\nc=IN IP4 127.0.0.2\r\nt=0 0\r\nm=audio {} RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n", CARRIER.port());
    let to_browser = String::from_utf8(bridge.offer(Side::A, carrier_offer.as_bytes(), *now).expect("offer")).expect("utf-8");
    let mut rtc = RtcConfig::new().set_rtp_mode(true).clear_codecs().enable_pcmu(true, false).build(*now);
    rtc.add_local_candidate(Candidate::host(BROWSER, "udp").expect("candidate"));
    let answer = rtc.sdp_api().accept_offer(SdpOffer::from_sdp_string(&to_browser).expect("offer parses")).expect("browser accepts");
    bridge.answer(Side::B, answer.to_sdp_string().as_bytes(), *now).expect("answer");
    let mut connected = false;
    for _ in 0..500 {
        *now += Duration::from_millis(10);
        rtc.handle_input(Input::Timeout(*now)).expect("timeout");
        bridge.handle_timeout(*now);
        settle(&mut rtc, &mut bridge, *now, c, &mut connected);
        if connected && bridge.is_connected(Side::B) {
            break;
        }
    }
    assert!(connected && bridge.is_connected(Side::B), "ICE + DTLS did not come up");
    let mid = str0m::media::Mid::from(answer.to_sdp_string().lines().find_map(|l| l.strip_prefix("a=mid:")).expect("mid").trim());
    let ssrc: Ssrc = rtc.direct_api().stream_tx_by_mid(mid, None).expect("browser send stream").ssrc();
    let bridge_next = bridge.poll_timeout();
    Call { rtc, bridge, ssrc, bridge_next, client_next: None }
}

fn main() {
    if std::env::var_os("BRIDGE_COST_DEBUG").is_some() {
        tracing_subscriber::fmt().with_env_filter(std::env::var("BRIDGE_COST_DEBUG").unwrap_or_default()).with_writer(std::io::stderr).init();
    }
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(600);
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1).max(1);
    let t0 = Instant::now();
    let mut now = t0;
    let mut c = Counters::default();
    let mut calls: Vec<Call> = (0..n).map(|_| call(&mut now, &mut c)).collect();

    // Bring client stats to zero after the handshakes, then run the calls: each
    // 20 ms tick, every call gets one packet each way, as the media thread sees
    // them with `n` calls up (their state in turn, not one call's in cache).
    c = Counters::default();
    let mut connected = true;
    let cpu0 = thread_cpu_ns();
    let wall0 = Instant::now();
    let ticks = seconds * 50;
    for k in 0..ticks {
        now += Duration::from_millis(20);
        let seq = k as u16;
        let ts = (k as u32).wrapping_mul(160);
        let pkt = rtp(seq, ts);
        for call in &mut calls {
            let Call { rtc, bridge, ssrc, bridge_next, client_next } = call;
            // Timers first, as a driver would when they are due.
            if client_next.is_none_or(|t| t <= now) {
                let t = Instant::now();
                rtc.handle_input(Input::Timeout(now)).expect("timeout");
                c.client_time(t);
            }
            if bridge_next.is_some_and(|t| t <= now) {
                let t = Instant::now();
                bridge.handle_timeout(now);
                c.bridge_time(t);
            }
            // Carrier → bridge → browser.
            let t = Instant::now();
            bridge.handle_receive(Side::A, CARRIER, &pkt, now);
            c.bridge_time(t);
            settle(rtc, bridge, now, &mut c, &mut connected);
            // Browser → bridge → carrier.
            let t = Instant::now();
            if let Some(tx) = rtc.direct_api().stream_tx(ssrc) {
                tx.write_rtp(RtpWrite::new(0.into(), SeqNo::from(k), ts, now, vec![0x55u8; 160]));
            }
            c.client_time(t);
            *client_next = settle(rtc, bridge, now, &mut c, &mut connected);
            let t = Instant::now();
            *bridge_next = bridge.poll_timeout();
            c.bridge_time(t);
        }
    }
    let wall = wall0.elapsed();
    let counters = calls[0].bridge.stats();
    let cpu = Duration::from_nanos(thread_cpu_ns().saturating_sub(cpu0));
    // Other workloads on the machine preempt this thread inside timed calls
    // (wall > CPU): the thread's CPU time is shared out in proportion to the
    // wall time measured in each, less the clock reads' own cost.
    let overhead = clock_overhead();
    let scale = cpu.as_secs_f64() / wall.as_secs_f64();
    let bridge = c.bridge.saturating_sub(overhead * c.bridge_calls as u32).mul_f64(scale);
    let client = c.client.saturating_sub(overhead * c.client_calls as u32).mul_f64(scale);
    let packets = c.browser_got + c.to_carrier;
    let per = |d: Duration| d.as_secs_f64() * 1e6 / packets.max(1) as f64;
    println!("{n} call(s) of {seconds} s, 20 ms packets both ways: {} carrier→browser (browser got {}), {} browser→carrier", ticks * n as u64, c.browser_got, c.to_carrier);
    println!("first call's bridge counters: {counters:?}");
    println!("datagrams bridge→browser {} (RTCP {}), browser→bridge {} (RTCP {})", c.datagrams_to_browser, c.rtcp_to_browser, c.datagrams_to_bridge, c.rtcp_to_bridge);
    println!("timed calls: bridge {} client {}, {} ns each for the clock reads (subtracted)", c.bridge_calls, c.client_calls, overhead.as_nanos());
    println!("bridge: {:.2} µs/packet   client alone (baseline): {:.2} µs/packet   thread CPU {:.2} µs/packet (wall {:.2})", per(bridge), per(client), per(cpu), per(wall));
    println!(
        "RESULT calls={n} bridge_us_per_pkt={:.3} client_us_per_pkt={:.3} total_cpu_us_per_pkt={:.3} packets={packets} rtcp_to_browser={} rtcp_from_browser={}",
        per(bridge),
        per(client),
        per(cpu),
        c.rtcp_to_browser,
        c.rtcp_to_bridge
    );
}
