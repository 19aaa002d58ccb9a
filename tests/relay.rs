//! Relay tests on loopback with real UDP sockets. Every test uses its own port range so
//! they can run in parallel; all waits are bounded.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use crossbar::media::{
    MediaConfig, MediaEngine, MediaError, MediaIo, MediaSession, Recording, RecordingOptions, Side,
};
use tokio::net::UdpSocket;
use tokio::time::{sleep, timeout, Instant};

const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const WAIT: Duration = Duration::from_secs(2);

fn engine(port_min: u16, port_max: u16) -> MediaEngine {
    engine_threads(port_min, port_max, 1)
}

/// An engine with `threads` media threads (the range is split between them).
fn engine_threads(port_min: u16, port_max: u16, threads: usize) -> MediaEngine {
    engine_io(MediaIo::Auto, port_min, port_max, threads)
}

/// An engine whose media threads do their I/O as `io` says.
fn engine_io(io: MediaIo, port_min: u16, port_max: u16, threads: usize) -> MediaEngine {
    let eng = MediaEngine::with_io(
        MediaConfig {
            bind_ip: LO,
            public_ip: LO,
            port_min,
            port_max,
        },
        threads,
        io,
    )
    .expect("valid config");
    if io != MediaIo::Auto {
        assert_eq!(eng.io(), io, "the engine does its I/O as asked");
    }
    eng
}

/// Whether this process may use io_uring; if not, the io_uring runs of the scenarios
/// below say so and pass (containers often block it).
fn no_uring() -> bool {
    match crossbar::media::uring_available() {
        Ok(()) => false,
        Err(e) => {
            eprintln!("io_uring unavailable here, io_uring path not tested: {e}");
            true
        }
    }
}

/// Runs a relay scenario `name(io, port_min)` once per I/O path of the media threads,
/// as tests `name::uring` and `name::syscalls`, each on its own ports (the system-call
/// run 1,000 above `port_min`).
macro_rules! on_both_io_paths {
    ($name:ident, $port_min:expr) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn uring() {
                if !no_uring() {
                    super::$name(MediaIo::Uring, $port_min).await;
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn syscalls() {
                super::$name(MediaIo::Syscalls, $port_min + 1000).await;
            }
        }
    };
}

async fn party() -> UdpSocket {
    UdpSocket::bind((LO, 0)).await.expect("bind party socket")
}

fn addr(s: &UdpSocket) -> SocketAddr {
    s.local_addr().expect("local addr")
}

async fn recv(s: &UdpSocket, wait: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = vec![0u8; 2048];
    match timeout(wait, s.recv_from(&mut buf)).await {
        Ok(Ok((n, from))) => {
            buf.truncate(n);
            Some((buf, from))
        }
        _ => None,
    }
}

/// Sends one packet and expects it at `to` from the relay's `via` address.
async fn hop(from: &UdpSocket, dest: SocketAddr, to: &UdpSocket, via: SocketAddr, payload: &[u8]) {
    from.send_to(payload, dest).await.expect("send");
    let (got, src) = recv(to, WAIT).await.expect("packet relayed");
    assert_eq!(got, payload);
    assert_eq!(
        src, via,
        "relayed packets come from the anchor's other-side socket"
    );
}

/// Polls `cond` until true or the wait runs out (stats are published once per wakeup,
/// just after the packets went out).
async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        sleep(Duration::from_millis(5)).await;
    }
    cond()
}

fn rtp_packet(seq: u16) -> Vec<u8> {
    let mut p = vec![0x80, 0x00];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend((0..168).map(|i| (i as u8) ^ (seq as u8)));
    p
}

async fn both_ways(io: MediaIo, threads: usize, port_min: u16) {
    let eng = engine_io(io, port_min, port_min + 19, threads);
    let s = eng.open_session().await.unwrap();
    let (pa, pb) = (party().await, party().await);
    s.set_remote(Side::A, addr(&pa), None);
    s.set_remote(Side::B, addr(&pb), None);
    for seq in 0..50u16 {
        let p = rtp_packet(seq);
        hop(&pa, s.local_rtp(Side::A), &pb, s.local_rtp(Side::B), &p).await;
        hop(&pb, s.local_rtp(Side::B), &pa, s.local_rtp(Side::A), &p).await;
    }
    let st = s.stats();
    assert!(
        eventually(|| s.stats().b_to_a_rtp.packets == 50).await,
        "{st:?}"
    );
    let st = s.stats();
    assert_eq!(st.a_to_b_rtp.packets, 50);
    assert_eq!(st.a_to_b_rtp.bytes, 50 * 172);
    assert_eq!(st.b_to_a_rtp.bytes, 50 * 172);
    assert_eq!(st.dropped(), 0);
    assert_eq!(eng.ports_in_use(), 4);
    s.close();
    assert_eq!(eng.ports_in_use(), 0);
}

#[tokio::test]
async fn relays_both_ways_one_media_thread() {
    both_ways(MediaIo::Auto, 1, 23000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_both_ways_two_media_threads() {
    both_ways(MediaIo::Auto, 2, 23020).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_both_ways_one_media_thread_multi_thread_runtime() {
    both_ways(MediaIo::Auto, 1, 23040).await;
}

async fn relays_both_ways(io: MediaIo, port_min: u16) {
    both_ways(io, 1, port_min).await;
}
on_both_io_paths!(relays_both_ways, 23060);

async fn relays_both_ways_two_threads(io: MediaIo, port_min: u16) {
    both_ways(io, 2, port_min).await;
}
on_both_io_paths!(relays_both_ways_two_threads, 23080);

async fn latching_follows_actual_source(io: MediaIo, port_min: u16) {
    let eng = engine_io(io, port_min, port_min + 19, 1);
    let s = eng.open_session().await.unwrap();
    // A's SDP names `sdp_a`, but A really sends from `pa` (NAT).
    let (pa, sdp_a, pb) = (party().await, party().await, party().await);
    s.set_remote(Side::A, addr(&sdp_a), None);
    s.set_remote(Side::B, addr(&pb), None);
    assert_eq!(s.remote_rtp(Side::A), Some(addr(&sdp_a)));

    hop(
        &pa,
        s.local_rtp(Side::A),
        &pb,
        s.local_rtp(Side::B),
        b"from A",
    )
    .await;
    assert_eq!(
        s.remote_rtp(Side::A),
        Some(addr(&pa)),
        "A latched to its real source"
    );
    hop(
        &pb,
        s.local_rtp(Side::B),
        &pa,
        s.local_rtp(Side::A),
        b"to A",
    )
    .await;
    assert!(recv(&sdp_a, Duration::from_millis(100)).await.is_none());

    // re-INVITE: A's new SDP re-arms latching; until A sends, B's media goes to the SDP address.
    s.set_remote(Side::A, addr(&sdp_a), None);
    hop(
        &pb,
        s.local_rtp(Side::B),
        &sdp_a,
        s.local_rtp(Side::A),
        b"to new sdp",
    )
    .await;
    // A sends again (still from pa) and is latched again.
    hop(
        &pa,
        s.local_rtp(Side::A),
        &pb,
        s.local_rtp(Side::B),
        b"A again",
    )
    .await;
    hop(
        &pb,
        s.local_rtp(Side::B),
        &pa,
        s.local_rtp(Side::A),
        b"back to pa",
    )
    .await;

    // Only the first packet after (re)arming latches, and a latched port hears only its
    // party: a stranger's packet is not relayed (no audio injected into the call) and
    // does not steal A's media.
    let stranger = party().await;
    let dropped = s.stats().a_to_b_rtp.dropped;
    stranger.send_to(b"stray", s.local_rtp(Side::A)).await.expect("send");
    assert!(recv(&pb, Duration::from_millis(300)).await.is_none(), "a stranger's packet reached B");
    assert_eq!(s.stats().a_to_b_rtp.dropped, dropped, "dropped by the kernel: the port is connected to A");
    hop(
        &pb,
        s.local_rtp(Side::B),
        &pa,
        s.local_rtp(Side::A),
        b"still pa",
    )
    .await;
}
on_both_io_paths!(latching_follows_actual_source, 23100);

async fn latched_port_ignores_strangers_before_anything_was_sent_to_it(io: MediaIo, port_min: u16) {
    let eng = engine_io(io, port_min, port_min + 19, 1);
    let s = eng.open_session().await.unwrap();
    let (pa, pb, stranger) = (party().await, party().await, party().await);
    s.set_remote(Side::A, addr(&pa), None);
    s.set_remote(Side::B, addr(&pb), None);
    // A latches; nothing has gone to A yet, so A's port is not connected: the relay itself
    // must refuse the stranger.
    hop(&pa, s.local_rtp(Side::A), &pb, s.local_rtp(Side::B), b"from A").await;
    stranger.send_to(b"stray", s.local_rtp(Side::A)).await.expect("send");
    assert!(eventually(|| s.stats().a_to_b_rtp.dropped == 1).await, "{:?}", s.stats());
    assert!(recv(&pb, Duration::from_millis(200)).await.is_none(), "a stranger's packet reached B");
    assert_eq!(s.remote_rtp(Side::A), Some(addr(&pa)), "the stranger did not steal A's media");
    hop(&pa, s.local_rtp(Side::A), &pb, s.local_rtp(Side::B), b"A again").await;
    // Counted when the media thread publishes, which may come just after B got it.
    assert!(eventually(|| s.stats().a_to_b_rtp.packets == 2).await, "{:?}", s.stats());
}
on_both_io_paths!(latched_port_ignores_strangers_before_anything_was_sent_to_it, 23160);

async fn no_destination_drops_and_counts_until_party_sends(io: MediaIo, port_min: u16) {
    let eng = engine_io(io, port_min, port_min + 19, 1);
    let s = eng.open_session().await.unwrap();
    let (pa, pb) = (party().await, party().await);
    // Only B is known (the caller's SDP has not been applied yet, or never will be).
    s.set_remote(Side::B, addr(&pb), None);
    for _ in 0..3 {
        pb.send_to(b"nowhere", s.local_rtp(Side::B)).await.unwrap();
    }
    assert!(
        eventually(|| s.stats().b_to_a_rtp.dropped == 3).await,
        "{:?}",
        s.stats()
    );
    assert_eq!(s.stats().b_to_a_rtp.packets, 0);
    // A's first packet latches it, and B's media now reaches A.
    hop(
        &pa,
        s.local_rtp(Side::A),
        &pb,
        s.local_rtp(Side::B),
        b"hello",
    )
    .await;
    hop(&pb, s.local_rtp(Side::B), &pa, s.local_rtp(Side::A), b"hi").await;
    assert!(eventually(|| s.stats().b_to_a_rtp.packets == 1).await);
    assert_eq!(s.stats().dropped(), 3);
}
on_both_io_paths!(no_destination_drops_and_counts_until_party_sends, 23120);

async fn rtcp_relayed_on_port_plus_one(io: MediaIo, port_min: u16) {
    let eng = engine_io(io, port_min, port_min + 19, 1);
    let s = eng.open_session().await.unwrap();
    assert_eq!(
        s.local_rtcp(Side::A).port(),
        s.local_rtp(Side::A).port() + 1
    );
    assert_eq!(s.local_rtp(Side::A).port() % 2, 0);
    let (pa, pa_rtcp, pb, pb_rtcp) = (party().await, party().await, party().await, party().await);
    s.set_remote(Side::A, addr(&pa), Some(addr(&pa_rtcp)));
    s.set_remote(Side::B, addr(&pb), None);
    // Without a=rtcp, RTCP goes to RTP port + 1.
    let pb_port1 = SocketAddr::new(LO, addr(&pb).port() + 1);
    assert_eq!(s.remote_rtcp(Side::B), Some(pb_port1));
    assert_eq!(s.remote_rtcp(Side::A), Some(addr(&pa_rtcp)));

    // A's RTCP reaches B's RTCP port (+1, as SDP implies) -- here latched from B's real
    // RTCP socket first, since B's "port + 1" is not a socket of ours.
    hop(
        &pb_rtcp,
        s.local_rtcp(Side::B),
        &pa_rtcp,
        s.local_rtcp(Side::A),
        b"RR from B",
    )
    .await;
    assert_eq!(s.remote_rtcp(Side::B), Some(addr(&pb_rtcp)));
    hop(
        &pa_rtcp,
        s.local_rtcp(Side::A),
        &pb_rtcp,
        s.local_rtcp(Side::B),
        b"SR from A",
    )
    .await;
    // RTP is unaffected by RTCP latching.
    hop(&pa, s.local_rtp(Side::A), &pb, s.local_rtp(Side::B), b"rtp").await;
    // The RTP packet went last: once it is counted, everything before it is.
    assert!(eventually(|| s.stats().a_to_b_rtp.packets == 1).await, "{:?}", s.stats());
    let st = s.stats();
    assert_eq!(st.a_to_b_rtcp.packets, 1);
    assert_eq!(st.a_to_b_rtcp.bytes, 9);
    assert_eq!(st.b_to_a_rtcp.packets, 1);
    assert_eq!(st.a_to_b_rtp.packets, 1);
    assert_eq!(st.b_to_a_rtp.packets, 0);
    assert_eq!(st.relayed_packets(), 3);
}
on_both_io_paths!(rtcp_relayed_on_port_plus_one, 23140);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_frees_ports_over_1000_cycles() {
    // 5 sessions' worth of pairs: every port is reused ~200 times.
    let eng = engine(23200, 23219);
    for i in 0..1000 {
        let s = eng
            .open_session()
            .await
            .unwrap_or_else(|e| panic!("cycle {i}: {e}"));
        assert_eq!(eng.ports_in_use(), 4);
        if i % 2 == 0 {
            s.close();
        } else {
            drop(s);
        }
        assert_eq!(eng.ports_in_use(), 0);
    }
    // Still relays after all that reuse.
    let s = eng.open_session().await.unwrap();
    let (pa, pb) = (party().await, party().await);
    s.set_remote(Side::A, addr(&pa), None);
    s.set_remote(Side::B, addr(&pb), None);
    hop(&pa, s.local_rtp(Side::A), &pb, s.local_rtp(Side::B), b"x").await;
    drop(s);
    assert_eq!(eng.ports_in_use(), 0);
}

async fn close_with_traffic_in_flight_frees_ports(io: MediaIo, port_min: u16) {
    let eng = engine_io(io, port_min, port_min + 19, 2);
    let (pa, pb) = (party().await, party().await);
    for _ in 0..50 {
        let s = eng.open_session().await.unwrap();
        s.set_remote(Side::A, addr(&pa), None);
        s.set_remote(Side::B, addr(&pb), None);
        for _ in 0..5 {
            pa.send_to(b"x", s.local_rtp(Side::A)).await.unwrap();
            pb.send_to(b"y", s.local_rtp(Side::B)).await.unwrap();
        }
        tokio::task::yield_now().await;
        s.close();
    }
    assert_eq!(eng.ports_in_use(), 0);
}
on_both_io_paths!(close_with_traffic_in_flight_frees_ports, 23220);

#[tokio::test]
async fn round_robin_does_not_reuse_just_freed_ports() {
    let eng = engine(23240, 23259); // 10 pairs
    let first = eng.open_session().await.unwrap();
    let a0 = first.local_rtp(Side::A);
    first.close();
    let next = eng.open_session().await.unwrap();
    assert_ne!(next.local_rtp(Side::A), a0);
    assert_ne!(next.local_rtp(Side::B), a0);
}

#[tokio::test]
async fn ports_exhausted_when_range_full() {
    let eng = engine(23300, 23307); // 4 pairs = 2 sessions
    let s1 = eng.open_session().await.unwrap();
    let s2 = eng.open_session().await.unwrap();
    assert_eq!(eng.ports_in_use(), 8);
    assert!(matches!(
        eng.open_session().await,
        Err(MediaError::PortsExhausted)
    ));
    assert_eq!(eng.ports_in_use(), 8, "a failed open leaks nothing");
    s1.close();
    let s3 = eng.open_session().await.unwrap();
    assert!(matches!(
        eng.open_session().await,
        Err(MediaError::PortsExhausted)
    ));
    drop((s2, s3));
    assert_eq!(eng.ports_in_use(), 0);
}

#[tokio::test]
async fn ports_exhausted_with_one_pair_left() {
    let eng = engine(23310, 23315); // 3 pairs: the second session gets only one
    let _s1 = eng.open_session().await.unwrap();
    assert!(matches!(
        eng.open_session().await,
        Err(MediaError::PortsExhausted)
    ));
    assert_eq!(eng.ports_in_use(), 4, "the half-allocated pair went back");
}

#[tokio::test]
async fn taken_ports_are_skipped() {
    // Another process holds 23400 (an RTP port) and 23407 (the RTCP port of 23406).
    let _rtp_squatter = std::net::UdpSocket::bind((LO, 23400)).unwrap();
    let _rtcp_squatter = std::net::UdpSocket::bind((LO, 23407)).unwrap();
    let eng = engine(23400, 23411); // pairs 23400..=23410
    let s1 = eng.open_session().await.unwrap();
    assert_eq!(s1.local_rtp(Side::A).port(), 23402);
    assert_eq!(s1.local_rtp(Side::B).port(), 23404);
    let s2 = eng.open_session().await.unwrap();
    assert_eq!(s2.local_rtp(Side::A).port(), 23408);
    assert_eq!(s2.local_rtp(Side::B).port(), 23410);
    assert_eq!(eng.ports_in_use(), 8);
    // Only the two squatted pairs are left, and neither binds.
    assert!(matches!(
        eng.open_session().await,
        Err(MediaError::PortsExhausted)
    ));
    assert_eq!(eng.ports_in_use(), 8);
}

#[tokio::test]
async fn our_ports_are_exclusive() {
    let eng = engine(23420, 23439);
    let s = eng.open_session().await.unwrap();
    // No SO_REUSEADDR: nobody else can bind our RTP or RTCP port, even with it set.
    for p in [
        s.local_rtp(Side::A),
        s.local_rtcp(Side::A),
        s.local_rtp(Side::B),
    ] {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        sock.set_reuse_address(true).unwrap();
        assert!(sock.bind(&p.into()).is_err(), "{p} must be exclusive");
    }
}

async fn ipv6_relay(io: MediaIo, port_min: u16) {
    let lo6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
    if std::net::UdpSocket::bind((lo6, 0)).is_err() {
        eprintln!("no IPv6 loopback here; skipped");
        return;
    }
    let eng = MediaEngine::with_io(
        MediaConfig {
            bind_ip: lo6,
            public_ip: lo6,
            port_min,
            port_max: port_min + 19,
        },
        1,
        io,
    )
    .unwrap();
    let s = eng.open_session().await.unwrap();
    assert!(s.local_rtp(Side::A).is_ipv6());
    let pa = UdpSocket::bind((lo6, 0)).await.unwrap();
    let pb = UdpSocket::bind((lo6, 0)).await.unwrap();
    s.set_remote(Side::A, addr(&pa), None);
    s.set_remote(Side::B, addr(&pb), None);
    hop(
        &pa,
        s.local_rtp(Side::A),
        &pb,
        s.local_rtp(Side::B),
        b"v6 a",
    )
    .await;
    hop(
        &pb,
        s.local_rtp(Side::B),
        &pa,
        s.local_rtp(Side::A),
        b"v6 b",
    )
    .await;
}
on_both_io_paths!(ipv6_relay, 23500);

async fn hold_or_own_address_gives_no_destination(io: MediaIo, port_min: u16) {
    let eng = engine_io(io, port_min, port_min + 19, 1);
    let s: MediaSession = eng.open_session().await.unwrap();
    s.set_remote(Side::A, "0.0.0.0:4000".parse().unwrap(), None);
    assert_eq!(s.remote_rtp(Side::A), None);
    assert_eq!(s.remote_rtcp(Side::A), None);
    // Pointing a side at the session's own sockets would loop packets forever.
    s.set_remote(Side::B, s.local_rtp(Side::A), None);
    assert_eq!(s.remote_rtp(Side::B), None);
    s.set_remote(
        Side::B,
        "127.0.0.1:5000".parse().unwrap(),
        Some(s.local_rtcp(Side::B)),
    );
    assert_eq!(
        s.remote_rtp(Side::B),
        Some("127.0.0.1:5000".parse().unwrap())
    );
    assert_eq!(s.remote_rtcp(Side::B), None);
}
on_both_io_paths!(hold_or_own_address_gives_no_destination, 23540);

#[test]
fn config_is_validated() {
    let cfg = |min, max, public: IpAddr| MediaConfig {
        bind_ip: LO,
        public_ip: public,
        port_min: min,
        port_max: max,
    };
    let bad = [
        cfg(10001, 10100, LO),
        cfg(0, 100, LO),
        cfg(10000, 10002, LO),
        cfg(10000, 9000, LO),
        cfg(10000, 10100, IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        cfg(10000, 10100, IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ];
    for c in bad {
        assert!(
            matches!(MediaEngine::new(c.clone()), Err(MediaError::Config(_))),
            "{c:?}"
        );
    }
    let ok = MediaEngine::new(cfg(10000, 10003, LO)).unwrap();
    assert_eq!(ok.ports_total(), 4);
    assert_eq!(ok.ports_in_use(), 0);
}

// ---- Recording ----

const PCMU: u8 = 0;
const PCMA: u8 = 8;
/// µ-law codes of +7932 / -7932, A-law codes of +4032 / -4032 (ITU-T G.711).
const MU_TONE: (u8, u8, i16) = (0xa0, 0x20, 7932);
const A_TONE: (u8, u8, i16) = (0x9a, 0x1a, 4032);

/// A 20 ms G.711 packet holding a 1 kHz square wave (4 samples up, 4 down).
fn tone_packet(pt: u8, seq: u16, ts: u32, ssrc: u32, (hi, lo, _): (u8, u8, i16)) -> Vec<u8> {
    let mut p = vec![0x80, pt];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&ts.to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend((0..160).map(|i| if i % 8 < 4 { hi } else { lo }));
    p
}

/// What `tone_packet` decodes to at sample `i`.
fn tone_sample(i: usize, (_, _, level): (u8, u8, i16)) -> i16 {
    if i % 8 < 4 {
        level
    } else {
        -level
    }
}

/// The WAV's spec checked, and its (left, right) channels.
fn channels(rec: &Recording) -> (Vec<i16>, Vec<i16>) {
    let mut r = hound::WavReader::new(std::io::Cursor::new(&rec.wav)).expect("valid WAV");
    let spec = r.spec();
    assert_eq!(
        (spec.channels, spec.sample_rate, spec.bits_per_sample),
        (2, 8000, 16)
    );
    assert_eq!(u64::from(r.duration()) / 8, rec.duration_ms);
    let all: Vec<i16> = r.samples::<i16>().map(|s| s.expect("sample")).collect();
    let left = all.iter().step_by(2).copied().collect();
    let right = all.iter().skip(1).step_by(2).copied().collect();
    (left, right)
}

async fn records_both_directions(io: MediaIo, threads: usize, port_min: u16) {
    let eng = engine_io(io, port_min, port_min + 19, threads);
    let s = eng.open_session().await.unwrap();
    let (pa, pb) = (party().await, party().await);
    s.set_remote(Side::A, addr(&pa), None);
    s.set_remote(Side::B, addr(&pb), None);
    let (to_a, to_b) = (s.local_rtp(Side::A), s.local_rtp(Side::B));
    // Before the start: relayed, not recorded.
    hop(
        &pa,
        to_a,
        &pb,
        to_b,
        &tone_packet(PCMU, 999, 4840, 0xa, MU_TONE),
    )
    .await;
    s.start_recording(RecordingOptions { max_bytes: 1 << 20 });

    // A talks for 500 ms (PCMU); B answers 200 ms later for 800 ms (PCMA), with a
    // DTMF event in the middle that is relayed but not recorded.
    let t_a = Instant::now();
    for k in 0..25u16 {
        let p = tone_packet(PCMU, 1000 + k, 5000 + 160 * u32::from(k), 0xa, MU_TONE);
        hop(&pa, to_a, &pb, to_b, &p).await;
    }
    sleep(Duration::from_millis(200)).await;
    let t_b = Instant::now();
    for k in 0..40u16 {
        let ts = 90_000 + 160 * u32::from(k);
        hop(
            &pb,
            to_b,
            &pa,
            to_a,
            &tone_packet(PCMA, 7 + k, ts, 0xb, A_TONE),
        )
        .await;
        if k == 20 {
            let mut dtmf = tone_packet(101, 0, ts, 0xb, A_TONE);
            dtmf.truncate(12);
            dtmf.extend_from_slice(&[5, 0x0a, 0, 160]);
            hop(&pb, to_b, &pa, to_a, &dtmf).await;
        }
    }
    // Right after the last packet came through.
    let rec = s.finish_recording().await.expect("audio was captured");
    assert!(!rec.truncated);

    let b_lead_ms = (t_b - t_a).as_millis() as u64;
    let expected_ms = (b_lead_ms + 800).max(500);
    assert!(
        rec.duration_ms.abs_diff(expected_ms) <= 40,
        "{rec:?}, expected {expected_ms} ms"
    );
    let (left, right) = channels(&rec);
    // Left: A's tone, sample-exact, for 500 ms, then silence.
    assert!((0..4000).all(|i| left[i] == tone_sample(i, MU_TONE)));
    assert!(left[4000..].iter().all(|&s| s == 0));
    // Right: silence until B's first packet, then B's tone for 800 ms, uninterrupted by
    // the DTMF event.
    let lead = right
        .iter()
        .position(|&s| s != 0)
        .expect("B is in the right channel");
    assert!(
        (lead as u64 / 8).abs_diff(b_lead_ms) <= 40,
        "B starts at {} ms, sent {b_lead_ms} ms after A",
        lead / 8
    );
    assert!((0..6400).all(|i| right[lead + i] == tone_sample(i, A_TONE)));
    assert!(right[lead + 6400..].iter().all(|&s| s == 0));

    assert_eq!(s.finish_recording().await, None, "finished already");
    assert!(eventually(|| s.stats().b_to_a_rtp.packets == 41).await);
    assert_eq!(s.stats().a_to_b_rtp.packets, 26);
}

#[tokio::test]
async fn records_both_directions_one_media_thread() {
    records_both_directions(MediaIo::Auto, 1, 23600).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_both_directions_two_media_threads() {
    records_both_directions(MediaIo::Auto, 2, 23620).await;
}

async fn records_both_directions_both_paths(io: MediaIo, port_min: u16) {
    records_both_directions(io, 1, port_min).await;
}
on_both_io_paths!(records_both_directions_both_paths, 23680);

async fn recording_truncates_at_max_bytes_and_relaying_goes_on(io: MediaIo, port_min: u16) {
    let eng = engine_io(io, port_min, port_min + 19, 1);
    let s = eng.open_session().await.unwrap();
    let (pa, pb) = (party().await, party().await);
    s.set_remote(Side::A, addr(&pa), None);
    s.set_remote(Side::B, addr(&pb), None);
    let (to_a, to_b) = (s.local_rtp(Side::A), s.local_rtp(Side::B));
    // Ten 20 ms packets' worth.
    s.start_recording(RecordingOptions { max_bytes: 1600 });
    for k in 0..30u16 {
        let p = tone_packet(PCMU, k, 160 * u32::from(k), 1, MU_TONE);
        hop(&pa, to_a, &pb, to_b, &p).await;
    }
    for k in 0..5u16 {
        let p = tone_packet(PCMA, k, 160 * u32::from(k), 2, A_TONE);
        hop(&pb, to_b, &pa, to_a, &p).await;
    }
    let rec = s.finish_recording().await.expect("audio was captured");
    assert!(rec.truncated);
    assert_eq!(rec.duration_ms, 200);
    let (left, right) = channels(&rec);
    assert!((0..1600).all(|i| left[i] == tone_sample(i, MU_TONE)));
    assert!(
        right.iter().all(|&s| s == 0),
        "the cap covers both directions"
    );
    assert!(eventually(|| s.stats().b_to_a_rtp.packets == 5).await);
    let st = s.stats();
    assert_eq!(st.a_to_b_rtp.packets, 30);
    assert_eq!(st.dropped(), 0);
}
on_both_io_paths!(recording_truncates_at_max_bytes_and_relaying_goes_on, 23640);

async fn recording_off_finish_is_none_at_once_and_restart_works(io: MediaIo, port_min: u16) {
    let eng = engine_io(io, port_min, port_min + 19, 1);
    let s = eng.open_session().await.unwrap();
    let (pa, pb) = (party().await, party().await);
    s.set_remote(Side::A, addr(&pa), None);
    s.set_remote(Side::B, addr(&pb), None);
    let (to_a, to_b) = (s.local_rtp(Side::A), s.local_rtp(Side::B));
    let send_a = |k: u16| tone_packet(PCMU, k, 160 * u32::from(k), 1, MU_TONE);
    for k in 0..5 {
        hop(&pa, to_a, &pb, to_b, &send_a(k)).await;
    }
    // Never started: answered on the first poll, without asking the relay.
    let finished = timeout(Duration::ZERO, s.finish_recording()).await;
    assert_eq!(finished, Ok(None));

    // Started, but nothing relayed since.
    s.start_recording(RecordingOptions { max_bytes: 1 << 20 });
    assert_eq!(s.finish_recording().await, None);

    // Starting twice keeps the first options (the second would truncate at once).
    s.start_recording(RecordingOptions { max_bytes: 1 << 20 });
    s.start_recording(RecordingOptions { max_bytes: 10 });
    for k in 5..10 {
        hop(&pa, to_a, &pb, to_b, &send_a(k)).await;
    }
    let rec = s.finish_recording().await.expect("audio was captured");
    assert!(!rec.truncated);
    assert_eq!(rec.duration_ms, 100);

    // Stopped: packets now go unrecorded; a new recording holds only what follows it.
    for k in 10..15 {
        hop(&pa, to_a, &pb, to_b, &send_a(k)).await;
    }
    s.start_recording(RecordingOptions { max_bytes: 1 << 20 });
    for k in 15..18 {
        hop(&pa, to_a, &pb, to_b, &send_a(k)).await;
    }
    let rec = s.finish_recording().await.expect("audio was captured");
    assert_eq!(rec.duration_ms, 60);
    assert!(eventually(|| s.stats().a_to_b_rtp.packets == 18).await);
    s.close();
    assert_eq!(eng.ports_in_use(), 0);
}
on_both_io_paths!(recording_off_finish_is_none_at_once_and_restart_works, 23660);
