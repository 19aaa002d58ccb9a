//! The WebRTC bridge on the media threads, with real UDP sockets on loopback: a str0m
//! peer plays the browser (full ICE, DTLS-SRTP), plain sockets play the carrier. All
//! waits are bounded.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbar::media::webrtc::LegKind;
use crossbar::sip::b2bua::SdpAdapter;
use crossbar::media::{MediaConfig, MediaEngine, MediaIo, MediaSession, Side};
use str0m::media::Mid;
use str0m::net::{Protocol, Receive};
use str0m::rtp::{RtpWrite, SeqNo};
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};

const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn engine(io: MediaIo, port_min: u16) -> Option<MediaEngine> {
    if io == MediaIo::Uring {
        if let Err(e) = crossbar::media::uring_available() {
            eprintln!("io_uring unavailable here, io_uring path not tested: {e}");
            return None;
        }
    }
    let cfg = MediaConfig { bind_ip: LO, public_ip: LO, port_min, port_max: port_min + 99 };
    Some(MediaEngine::with_io(cfg, 1, io).expect("valid config"))
}

/// A session of a plain party (A) bridged to a browser (B) on a media engine of its
/// own, with the runtime that opened it (both live as long as the test's session).
fn bridged_session(io: MediaIo, port_min: u16) -> Option<(MediaEngine, tokio::runtime::Runtime, MediaSession)> {
    let engine = engine(io, port_min)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let session = rt.block_on(engine.open_session_with([LegKind::Plain, LegKind::WebRtc])).expect("ports");
    Some((engine, rt, session))
}

/// Runs a test function `fn(MediaIo, port_min)` on both I/O paths of the media
/// threads (ports from `port_min`, and 100 above it for system calls).
macro_rules! on_both_io_paths {
    ($name:ident, $port_min:expr) => {
        mod $name {
            use super::*;

            #[test]
            fn uring() {
                super::$name(MediaIo::Uring, $port_min);
            }

            #[test]
            fn syscalls() {
                super::$name(MediaIo::Syscalls, $port_min + 100);
            }
        }
    };
}

fn carrier_sdp(port: u16, version: u32) -> String {
    format!("v=0\r\no=carrier 1 {version} IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {port} RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n")
}

/// A 20 ms PCMU packet whose payload is `fill` bytes; the SSRC is the fill byte's too
/// (a carrier that moves its media usually starts a new stream).
fn rtp(seq: u16, fill: u8) -> Vec<u8> {
    let mut p = vec![0x80, 0, (seq >> 8) as u8, seq as u8, 0, 0, 0, 0, 0x0c, 0xa7, 0x1e, fill];
    p.extend_from_slice(&[fill; 160]);
    p
}

/// A socket for the browser, read with a short timeout (see [`Browser::run`]).
fn browser_socket() -> UdpSocket {
    let sock = UdpSocket::bind((LO, 0)).expect("bind browser socket");
    sock.set_read_timeout(Some(Duration::from_millis(2))).unwrap();
    sock
}

/// A browser: str0m over a real socket, driven by hand.
struct Browser {
    rtc: Rtc,
    sock: UdpSocket,
    local: SocketAddr,
    /// Sockets of networks it left: held open, never read again (what arrives
    /// there is lost, as on a network that went away).
    left: Vec<UdpSocket>,
    connected: bool,
    /// First payload byte of each RTP packet received.
    got: Vec<u8>,
    mid: Option<Mid>,
    seq: u64,
}

impl Browser {
    fn new() -> Browser {
        let sock = browser_socket();
        let local = sock.local_addr().unwrap();
        let mut rtc = RtcConfig::new().set_rtp_mode(true).clear_codecs().enable_pcmu(true, false).build(Instant::now());
        rtc.add_local_candidate(Candidate::host(local, "udp").unwrap());
        Browser { rtc, sock, local, left: Vec::new(), connected: false, got: Vec::new(), mid: None, seq: 0 }
    }

    /// Answers crossbar's offer.
    fn answer(&mut self, offer: &[u8]) -> Vec<u8> {
        let offer = str0m::change::SdpOffer::from_sdp_string(std::str::from_utf8(offer).unwrap()).expect("crossbar's offer parses");
        let answer = self.rtc.sdp_api().accept_offer(offer).expect("the browser accepts crossbar's offer");
        answer.to_sdp_string().into_bytes()
    }

    /// Runs str0m for `d`: sends what it sends, feeds it what arrives.
    fn run(&mut self, d: Duration) {
        let end = Instant::now() + d;
        let mut buf = [0u8; 2048];
        while Instant::now() < end {
            loop {
                match self.rtc.poll_output().expect("str0m runs") {
                    Output::Timeout(_) => break,
                    Output::Transmit(t) => {
                        if t.source == self.local {
                            let _ = self.sock.send_to(&t.contents, t.destination);
                        }
                    }
                    Output::Event(Event::Connected) => self.connected = true,
                    Output::Event(Event::MediaAdded(m)) => self.mid = Some(m.mid),
                    Output::Event(Event::RtpPacket(p)) => self.got.push(p.payload.first().copied().unwrap_or(0)),
                    Output::Event(_) => {}
                }
            }
            match self.sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    if let Ok(contents) = buf[..n].try_into() {
                        let input = Input::Receive(Instant::now(), Receive { proto: Protocol::Udp, source: from, destination: self.local, contents });
                        let _ = self.rtc.handle_input(input);
                    }
                }
                Err(_) => {
                    let _ = self.rtc.handle_input(Input::Timeout(Instant::now()));
                }
            }
        }
    }

    /// Moves to another network: a new socket and host candidate; the old
    /// candidate is given up (str0m then checks and nominates a pair from the new one).
    fn move_network(&mut self) {
        let sock = browser_socket();
        let old = Candidate::host(self.local, "udp").unwrap();
        self.local = sock.local_addr().unwrap();
        self.rtc.add_local_candidate(Candidate::host(self.local, "udp").unwrap());
        assert!(self.rtc.direct_api().invalidate_candidate(&old), "the old candidate was known");
        self.left.push(std::mem::replace(&mut self.sock, sock));
    }

    /// Its NAT gives it a new port: the same local address for str0m, another
    /// socket on the wire (the old one is left unread).
    fn rebind_nat(&mut self) {
        let sock = browser_socket();
        self.left.push(std::mem::replace(&mut self.sock, sock));
    }

    /// Sends one 20 ms PCMU packet of `fill` bytes.
    fn send(&mut self, fill: u8) {
        let mid = self.mid.expect("the browser has its media");
        self.seq += 1;
        let now = Instant::now();
        let mut api = self.rtc.direct_api();
        let tx = api.stream_tx_by_mid(mid, None).expect("the browser has a send stream");
        tx.write_rtp(RtpWrite::new(0.into(), SeqNo::from(self.seq), (self.seq * 160) as u32, now, vec![fill; 160]));
        let _ = self.rtc.handle_input(Input::Timeout(now));
    }
}

/// Plays the carrier's RTP to the bridge (sequence numbers from `first_seq`) and, if
/// `browser_sends`, the browser's back, 20 ms apart, for `packets` packets; returns
/// what the carrier socket got from the bridge.
fn exchange(browser: &mut Browser, carrier: &UdpSocket, bridge_a: SocketAddr, first_seq: u16, packets: u16, fill: u8, browser_sends: bool) -> Vec<(SocketAddr, u8)> {
    carrier.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    for seq in first_seq..first_seq + packets {
        carrier.send_to(&rtp(seq, fill), bridge_a).unwrap();
        if browser_sends {
            browser.send(fill);
        }
        browser.run(Duration::from_millis(20));
        while let Ok((n, from)) = carrier.recv_from(&mut buf) {
            if n > 12 {
                got.push((from, buf[12]));
            }
        }
    }
    got
}

/// A carrier bridged to a browser moves its media (re-INVITE with a new address): the
/// bridge hears it at the new address and sends there, although the carrier's socket
/// was connected to the old one while it was latched there.
/// Media both ways for `packets` packets (see [`exchange`]): how many of the carrier's
/// the browser heard, and how many of the browser's reached the carrier from the bridge.
fn heard_both_ways(browser: &mut Browser, carrier: &UdpSocket, bridge_a: SocketAddr, first_seq: u16, packets: u16, fill: u8) -> (usize, usize) {
    browser.got.clear();
    let to_carrier = exchange(browser, carrier, bridge_a, first_seq, packets, fill, true);
    let heard = browser.got.iter().filter(|&&b| b == fill).count();
    (heard, to_carrier.iter().filter(|(from, b)| *from == bridge_a && *b == fill).count())
}

/// A carrier (socket `carrier`) called a browser through the bridge of `session`;
/// the browser answered, ICE and DTLS came up and media flowed both ways.
fn carrier_calls_browser(session: &MediaSession, carrier: &UdpSocket) -> (Arc<dyn SdpAdapter>, Browser) {
    let sdp = session.sdp_adapter().expect("a bridged session adapts SDP");
    let bridge_a = session.local_rtp(Side::A);
    let to_browser = sdp.offer(Side::A, carrier_sdp(carrier.local_addr().unwrap().port(), 1).as_bytes()).expect("carrier offer");
    let mut browser = Browser::new();
    let answer = browser.answer(&to_browser);
    sdp.answer(Side::B, &answer).expect("browser answer");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !browser.connected && Instant::now() < deadline {
        browser.run(Duration::from_millis(20));
    }
    assert!(browser.connected, "ICE and DTLS came up");

    let (heard, got) = heard_both_ways(&mut browser, carrier, bridge_a, 0, 25, 0xaa);
    assert!(heard >= 20 && got >= 20, "media both ways: the browser heard {heard}, the carrier {got} of 25 packets");
    (sdp, browser)
}

fn carrier_moving_its_media_is_heard_at_the_new_address(io: MediaIo, port_min: u16) {
    let Some((_engine, _rt, session)) = bridged_session(io, port_min) else { return };
    let bridge_a = session.local_rtp(Side::A);
    let old = UdpSocket::bind((LO, 0)).unwrap();
    let (sdp, mut browser) = carrier_calls_browser(&session, &old);

    // The carrier moves its media; the browser gets the resulting offer and answers.
    let new = UdpSocket::bind((LO, 0)).unwrap();
    let re_offer = sdp.offer(Side::A, carrier_sdp(new.local_addr().unwrap().port(), 2).as_bytes()).expect("carrier re-offer");
    let answer = browser.answer(&re_offer);
    sdp.answer(Side::B, &answer).expect("browser answer to the re-offer");
    browser.run(Duration::from_millis(50));
    // The carrier speaks first (the browser is silent, so nothing is sent to the
    // carrier that could move the socket's association): it is heard at once.
    browser.got.clear();
    exchange(&mut browser, &new, bridge_a, 0, 10, 0xbb, false);
    assert!(browser.got.iter().filter(|&&b| b == 0xbb).count() >= 8, "the browser heard the carrier's new address before sending: {} packets", browser.got.len());
    let (heard, got) = heard_both_ways(&mut browser, &new, bridge_a, 10, 25, 0xbb);
    assert!(heard >= 20 && got >= 20, "media both ways with the carrier's new address: the browser heard {heard}, the carrier {got} of 25 packets");
    // And a packet from the old address is a stranger's now.
    browser.got.clear();
    old.send_to(&rtp(100, 0xcc), bridge_a).unwrap();
    browser.run(Duration::from_millis(100));
    assert!(!browser.got.contains(&0xcc), "a stranger's packet reached the browser");
    session.close();
}
on_both_io_paths!(carrier_moving_its_media_is_heard_at_the_new_address, 47000);

/// A browser bridged to a carrier changes networks (new address; its old one goes
/// silent). While it was heard, the kernel refused strangers on its leg's socket
/// (connected to it); once it has been quiet for a moment the socket hears anyone
/// again, the browser's ICE checks from its new address get through, it nominates
/// the new pair, and media flows both ways again from there.
fn browser_moving_its_network_is_heard_at_the_new_address(io: MediaIo, port_min: u16) {
    let Some((_engine, _rt, session)) = bridged_session(io, port_min) else { return };
    let (bridge_a, bridge_b) = (session.local_rtp(Side::A), session.local_rtp(Side::B));
    let carrier = UdpSocket::bind((LO, 0)).unwrap();
    let (_sdp, mut browser) = carrier_calls_browser(&session, &carrier);

    // The browser's leg is connected to it: the kernel answers a stranger with
    // "port unreachable" (the stranger's next receive is refused).
    let stranger = UdpSocket::bind((LO, 0)).unwrap();
    stranger.connect(bridge_b).unwrap();
    stranger.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    stranger.send(b"not from the browser").unwrap();
    let refused = stranger.recv(&mut [0u8; 64]);
    assert!(matches!(&refused, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused), "a stranger was not refused: {refused:?}");

    browser.move_network();
    media_resumes(&mut browser, &carrier, bridge_a);
    session.close();
}
on_both_io_paths!(browser_moving_its_network_is_heard_at_the_new_address, 47400);

/// After the browser moved (new network, or a NAT that gave it a new port), media
/// flows both ways again within a bounded wait, and then stays: at least 140 of 150
/// packets each way over 3 s (str0m's own pair may still point at the old address).
fn media_resumes(browser: &mut Browser, carrier: &UdpSocket, bridge_a: SocketAddr) {
    let (mut heard, mut got, mut seq) = (0, 0, 1000);
    let deadline = Instant::now() + Duration::from_secs(15);
    while (heard < 20 || got < 20) && Instant::now() < deadline {
        (heard, got) = heard_both_ways(browser, carrier, bridge_a, seq, 25, 0xdd);
        seq += 25;
    }
    let at = browser.sock.local_addr().unwrap();
    assert!(heard >= 20 && got >= 20, "media both ways with the browser at {at}: it heard {heard}, the carrier {got} of 25 packets");
    let (heard, got) = heard_both_ways(browser, carrier, bridge_a, seq, 150, 0xee);
    assert!(heard >= 140 && got >= 140, "media went on with the browser at {at} for 3 s: it heard {heard}, the carrier {got} of 150 packets");
}

/// A browser behind a NAT that gives it a new port mid-call (no ICE restart, no new
/// candidate: its SRTP simply comes from elsewhere) is heard there again once its old
/// port has been quiet for a moment, and media flows both ways from the new port.
fn browser_behind_a_rebinding_nat_is_heard_at_its_new_port(io: MediaIo, port_min: u16) {
    let Some((_engine, _rt, session)) = bridged_session(io, port_min) else { return };
    let bridge_a = session.local_rtp(Side::A);
    let carrier = UdpSocket::bind((LO, 0)).unwrap();
    let (_sdp, mut browser) = carrier_calls_browser(&session, &carrier);
    browser.rebind_nat();
    media_resumes(&mut browser, &carrier, bridge_a);
    session.close();
}
on_both_io_paths!(browser_behind_a_rebinding_nat_is_heard_at_its_new_port, 47800);
