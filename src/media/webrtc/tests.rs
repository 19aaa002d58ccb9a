//! The bridge, driven without sockets: a str0m peer plays the browser, a
//! virtual clock moves time, datagrams are handed over in memory.

use super::*;
use std::time::Duration;

const BROWSER_OFFER_NO_G711: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=rtpmap:111 opus/48000/2\r\na=sendrecv\r\n";

#[test]
fn parses_plain_and_browser_audio() {
    let plain = "v=0\r\no=- 1 1 IN IP4 10.0.0.9\r\ns=-\r\nc=IN IP4 10.0.0.9\r\nt=0 0\r\nm=audio 4000 RTP/AVP 8 0 18 101\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=sendonly\r\n";
    let d = parse_audio(plain).unwrap();
    assert_eq!(d.addr, Some("10.0.0.9:4000".parse().unwrap()));
    assert_eq!(d.direction, Direction::SendOnly);
    let f: Vec<_> = d.codecs.iter().map(|c| (c.pt, c.format)).collect();
    assert_eq!(f, vec![(8, AudioFormat::Pcma), (0, AudioFormat::Pcmu), (101, AudioFormat::TelephoneEvent)]);
    assert_eq!(choose(&d.codecs).len(), 2);
    assert_eq!(choose(&d.codecs)[0].format, AudioFormat::Pcma);
    let e = parse_audio(BROWSER_OFFER_NO_G711).unwrap_err();
    assert!(e.contains("G.711"), "{e}");
    assert!(parse_audio("v=0\r\nm=video 9 RTP/AVP 96\r\n").is_err());
    // Telephone-event at 48 kHz is not ours (we bridge 8 kHz audio).
    let d = parse_audio("v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 5 RTP/AVP 0 110\r\na=rtpmap:110 telephone-event/48000\r\n").unwrap();
    assert_eq!(d.codecs.len(), 1);
}

#[test]
fn plain_sdp_round_trips() {
    let codecs = [AudioCodec { pt: 0, format: AudioFormat::Pcmu }, AudioCodec { pt: 126, format: AudioFormat::TelephoneEvent }];
    let sdp = plain_sdp("192.0.2.7:30000".parse().unwrap(), &codecs, Direction::RecvOnly, 3);
    let d = parse_audio(std::str::from_utf8(&sdp).unwrap()).unwrap();
    assert_eq!(d.codecs, codecs);
    assert_eq!(d.direction, Direction::RecvOnly);
    assert_eq!(d.addr, Some("192.0.2.7:30000".parse().unwrap()));
}

#[test]
fn rtp_header_parsing_and_seq_extension() {
    let mut pkt = vec![0x80, 0x80 | 8, 0x12, 0x34, 0, 0, 0, 160, 0xde, 0xad, 0xbe, 0xef];
    pkt.extend_from_slice(&[0xd5; 160]);
    let (h, payload) = parse_rtp(&pkt).unwrap();
    assert_eq!((h.pt, h.seq, h.ts, h.marker, h.ssrc, payload.len()), (8, 0x1234, 160, true, 0xdeadbeef, 160));
    let mut buf = [0u8; 2048];
    let n = write_plain_rtp(&mut buf, &h, payload).unwrap();
    assert_eq!(&buf[..n], &pkt[..]);
    assert_eq!(write_plain_rtp(&mut buf[..100], &h, payload), None, "does not fit");
    assert!(parse_rtp(&pkt[..11]).is_none());
    assert!(parse_rtp(&[0x80, 200, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_none(), "RTCP on the RTP port");
    let mut ext = SeqExtender::default();
    assert_eq!(ext.extend(65534), 65534);
    assert_eq!(ext.extend(65535), 65535);
    assert_eq!(ext.extend(1), 65537);
    assert_eq!(ext.extend(65535), 65535, "a late packet from before the wrap");
    assert_eq!(ext.extend(2), 65538);
}

/// A browser-like str0m peer (full ICE, controlling) against the bridge.
struct Browser {
    rtc: Rtc,
    addr: SocketAddr,
    got_rtp: Vec<(u8, u16, Vec<u8>)>,
    connected: bool,
    /// Its audio's mid, once str0m added the media.
    mid: Option<Mid>,
}

impl Browser {
    fn new(addr: SocketAddr, now: Instant) -> Browser {
        let mut rtc = RtcConfig::new().set_rtp_mode(true).clear_codecs().enable_opus(true, false).enable_pcmu(true, false).enable_pcma(true, false).build(now);
        rtc.add_local_candidate(Candidate::host(addr, "udp").unwrap());
        Browser { rtc, addr, got_rtp: Vec::new(), connected: false, mid: None }
    }

    /// Poll everything; datagrams for the bridge are returned.
    fn drain(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut out = Vec::new();
        while let Ok(o) = self.rtc.poll_output() {
            match o {
                Output::Timeout(_) => break,
                Output::Transmit(t) => out.push((t.destination, t.contents.to_vec())),
                Output::Event(Event::Connected) => self.connected = true,
                Output::Event(Event::MediaAdded(m)) => self.mid = Some(m.mid),
                Output::Event(Event::RtpPacket(p)) => self.got_rtp.push((*p.header.payload_type, p.header.sequence_number, p.payload.to_vec())),
                Output::Event(_) => {}
            }
        }
        out
    }
}

/// Moves datagrams between the browser and the bridge's WebRTC side until quiet.
fn pump(bridge: &mut Bridge, web_side: Side, browser: &mut Browser, now: Instant, plain_out: &mut Vec<(SocketAddr, Vec<u8>)>) {
    let mut browsers = [None, None];
    browsers[idx(web_side)] = Some(browser);
    pump_all(bridge, &mut browsers, now, plain_out);
}

/// Moves datagrams between the bridge and a browser on each WebRTC side until
/// quiet; what the bridge sends on a side without a browser goes to `plain_out`.
fn pump_all(bridge: &mut Bridge, browsers: &mut [Option<&mut Browser>; 2], now: Instant, plain_out: &mut Vec<(SocketAddr, Vec<u8>)>) {
    for _ in 0..50 {
        let mut moved = false;
        for side in [Side::A, Side::B] {
            let Some(browser) = browsers[idx(side)].as_mut() else { continue };
            for (_, d) in browser.drain() {
                moved = true;
                bridge.handle_receive(side, browser.addr, &d, now);
            }
        }
        let mut buf = [0u8; 2048];
        while let Some((side, dest, n)) = bridge.poll_transmit(&mut buf) {
            moved = true;
            let d = &buf[..n];
            match browsers[idx(side)].as_mut() {
                Some(browser) => {
                    assert_eq!(dest, browser.addr);
                    let input = Input::Receive(now, Receive { proto: Protocol::Udp, source: bridge_addr(side), destination: browser.addr, contents: d.try_into().unwrap() });
                    browser.rtc.handle_input(input).unwrap();
                }
                None => plain_out.push((dest, d.to_vec())),
            }
        }
        if !moved {
            break;
        }
    }
}

/// Runs the virtual clock in 10 ms steps until every browser and the bridge are connected.
fn connect(bridge: &mut Bridge, browsers: &mut [Option<&mut Browser>; 2], now: &mut Instant) {
    let mut plain_out = Vec::new();
    for _ in 0..200 {
        *now += Duration::from_millis(10);
        for b in browsers.iter_mut().flatten() {
            b.rtc.handle_input(Input::Timeout(*now)).unwrap();
        }
        bridge.handle_timeout(*now);
        pump_all(bridge, browsers, *now, &mut plain_out);
        let up = [Side::A, Side::B].iter().all(|s| browsers[idx(*s)].as_ref().is_none_or(|b| b.connected && bridge.is_connected(*s)));
        if up {
            return;
        }
    }
    panic!("ICE + DTLS did not come up");
}

/// The carrier's side (A) gets RTP from `from`, sequence numbers `seqs`, 20 ms
/// apart on the virtual clock; the browser on B takes what the bridge sends it.
fn carrier_rtp(bridge: &mut Bridge, browser: &mut Browser, from: SocketAddr, seqs: std::ops::Range<u16>, now: &mut Instant, plain_out: &mut Vec<(SocketAddr, Vec<u8>)>) {
    for seq in seqs {
        *now += Duration::from_millis(20);
        bridge.handle_receive(Side::A, from, &rtp(0, seq), *now);
        bridge.handle_timeout(*now);
        browser.rtc.handle_input(Input::Timeout(*now)).unwrap();
        pump(bridge, Side::B, browser, *now, plain_out);
    }
}

/// The browser's send stream (it writes RTP as a browser would).
fn send_from_browser(browser: &mut Browser, mid: Mid, seq: u64, now: Instant) {
    let mut api = browser.rtc.direct_api();
    let tx = api.stream_tx_by_mid(mid, None).expect("browser send stream");
    tx.write_rtp(RtpWrite::new(0.into(), SeqNo::from(seq), 160 * seq as u32, now, vec![0x11u8; 160]));
    browser.rtc.handle_input(Input::Timeout(now)).unwrap();
}

fn sdp_line<'a>(sdp: &'a str, prefix: &str) -> Option<&'a str> {
    sdp.lines().find(|l| l.starts_with(prefix))
}

fn bridge_addr(side: Side) -> SocketAddr {
    match side {
        Side::A => "127.0.0.1:30000".parse().unwrap(),
        Side::B => "127.0.0.1:30002".parse().unwrap(),
    }
}

fn rtp(pt: u8, seq: u16) -> Vec<u8> {
    let mut p = vec![0x80, pt, (seq >> 8) as u8, seq as u8, 0, 0, 0, 0, 0, 0, 0, 7];
    p.extend_from_slice(&[0x55; 160]);
    p
}

/// A carrier (plain, side A) calls a browser (WebRTC, side B): crossbar offers
/// DTLS/SAVPF to the browser, and media flows both ways once ICE and DTLS are up.
#[test]
fn carrier_to_browser_offer_answer_and_media() {
    let t0 = Instant::now();
    let mut now = t0;
    let mut bridge = Bridge::new([LegKind::Plain, LegKind::WebRtc], [bridge_addr(Side::A), bridge_addr(Side::B)]);
    let carrier: SocketAddr = "127.0.0.2:40000".parse().unwrap();
    let carrier_offer = format!("v=0\r\no=- 1 1 IN IP4 127.0.0.2\r\ns=-\r\nc=IN IP4 127.0.0.2\r\nt=0 0\r\nm=audio {} RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n", carrier.port());
    let to_browser = String::from_utf8(bridge.offer(Side::A, carrier_offer.as_bytes(), now).unwrap()).unwrap();
    assert!(to_browser.contains("UDP/TLS/RTP/SAVPF"), "{to_browser}");
    assert!(to_browser.contains("a=group:BUNDLE") && to_browser.contains("a=rtcp-mux"), "{to_browser}");
    assert!(to_browser.contains("a=candidate:") && to_browser.contains("127.0.0.1 30002"), "{to_browser}");
    assert!(to_browser.contains("a=ice-lite"), "{to_browser}");
    assert!(to_browser.contains("telephone-event/8000"), "{to_browser}");

    let mut browser = Browser::new("127.0.0.1:50000".parse().unwrap(), now);
    let answer = browser.rtc.sdp_api().accept_offer(SdpOffer::from_sdp_string(&to_browser).unwrap()).unwrap();
    let to_carrier = String::from_utf8(bridge.answer(Side::B, answer.to_sdp_string().as_bytes(), now).unwrap()).unwrap();
    let d = parse_audio(&to_carrier).unwrap();
    assert_eq!(d.addr, Some(bridge_addr(Side::A)));
    assert_eq!(d.codecs[0].format, AudioFormat::Pcmu, "{to_carrier}");

    let mut plain_out = Vec::new();
    for _ in 0..200 {
        now += Duration::from_millis(10);
        browser.rtc.handle_input(Input::Timeout(now)).unwrap();
        bridge.handle_timeout(now);
        pump(&mut bridge, Side::B, &mut browser, now, &mut plain_out);
        if browser.connected && bridge.is_connected(Side::B) {
            break;
        }
    }
    assert!(browser.connected && bridge.is_connected(Side::B), "ICE + DTLS up");

    // Carrier → browser.
    carrier_rtp(&mut bridge, &mut browser, carrier, 1000..1020, &mut now, &mut plain_out);
    assert!(browser.got_rtp.len() >= 15, "browser got {} packets", browser.got_rtp.len());
    assert!(browser.got_rtp.iter().all(|(pt, _, p)| *pt == 0 && p.len() == 160));
    assert_eq!(bridge.latched(Side::A), Some(carrier));

    // A stranger's RTP on the carrier's port reaches nobody and moves no latch.
    let stranger: SocketAddr = "127.0.0.9:40000".parse().unwrap();
    let (got, dropped) = (browser.got_rtp.len(), bridge.stats().a_to_b_rtp.dropped);
    carrier_rtp(&mut bridge, &mut browser, stranger, 3000..3005, &mut now, &mut plain_out);
    assert_eq!(browser.got_rtp.len(), got, "a stranger's packet reached the browser");
    assert_eq!(bridge.stats().a_to_b_rtp.dropped, dropped + 5);
    assert_eq!(bridge.latched(Side::A), Some(carrier));

    // Browser → carrier (to the latched carrier address).
    let mid = browser.rtc.direct_api().stream_tx_by_mid(answer_mid(&answer.to_sdp_string()), None).map(|s| s.ssrc());
    assert!(mid.is_some(), "the browser has a send stream");
    let ssrc = mid.unwrap();
    plain_out.clear();
    for seq in 0..20u16 {
        now += Duration::from_millis(20);
        let mut api = browser.rtc.direct_api();
        api.stream_tx(&ssrc).unwrap().write_rtp(RtpWrite::new(0.into(), SeqNo::from(500 + seq as u64), 160 * seq as u32, now, vec![0x11u8; 160]));
        browser.rtc.handle_input(Input::Timeout(now)).unwrap();
        bridge.handle_timeout(now);
        pump(&mut bridge, Side::B, &mut browser, now, &mut plain_out);
    }
    let to_carrier: Vec<_> = plain_out.iter().filter(|(d, _)| *d == carrier).collect();
    assert!(to_carrier.len() >= 15, "carrier got {} packets", to_carrier.len());
    assert!(to_carrier.iter().all(|(_, p)| parse_rtp(p).is_some_and(|(h, payload)| h.pt == 0 && payload == [0x11; 160])));
    let st = bridge.stats();
    assert!(st.a_to_b_rtp.packets >= 15 && st.b_to_a_rtp.packets >= 15, "{st:?}");
    // Both directions ran on crossbar's own SRTP (str0m's browser decrypted
    // crossbar's packets, crossbar decrypted str0m's), not str0m's RTP path.
    assert_eq!(bridge.own_srtp_packets(Side::B), 40, "{st:?}");
    assert_eq!(bridge.own_srtp_packets(Side::A), 0);
}

/// A carrier (plain, side A) calls a browser with a late offer (INVITE
/// without SDP): crossbar offers the browser PCMU, PCMA and telephone-event
/// itself, the carrier is offered what the browser chose, answers in its ACK,
/// and media flows both ways.
#[test]
fn carrier_late_offer_to_browser_media_both_ways() {
    let mut now = Instant::now();
    let mut bridge = Bridge::new([LegKind::Plain, LegKind::WebRtc], [bridge_addr(Side::A), bridge_addr(Side::B)]);
    let to_browser = String::from_utf8(bridge.late_offer(Side::B, now).unwrap()).unwrap();
    assert!(to_browser.contains("UDP/TLS/RTP/SAVPF") && to_browser.contains("a=group:BUNDLE") && to_browser.contains("a=rtcp-mux"), "{to_browser}");
    assert!(to_browser.contains("a=rtpmap:0 PCMU/8000") && to_browser.contains("a=rtpmap:8 PCMA/8000") && to_browser.contains("a=rtpmap:101 telephone-event/8000"), "{to_browser}");
    assert!(to_browser.contains("127.0.0.1 30002"), "{to_browser}");
    assert!(bridge.late_offer(Side::B, now).is_err(), "one session per browser leg");

    let mut browser = Browser::new("127.0.0.1:50004".parse().unwrap(), now);
    let answer = browser.rtc.sdp_api().accept_offer(SdpOffer::from_sdp_string(&to_browser).unwrap()).unwrap().to_sdp_string();
    let to_carrier = String::from_utf8(bridge.answer(Side::B, answer.as_bytes(), now).unwrap()).unwrap();
    let offered = parse_audio(&to_carrier).unwrap();
    assert_eq!(offered.addr, Some(bridge_addr(Side::A)));
    assert_eq!(offered.codecs[0], AudioCodec { pt: 0, format: AudioFormat::Pcmu }, "the browser's first choice: {to_carrier}");
    assert!(offered.codecs.iter().all(|c| c.format != AudioFormat::Pcma), "one G.711 codec only: {to_carrier}");

    let carrier: SocketAddr = CARRIER.parse().unwrap();
    let pcma_answer = "v=0\r\no=carrier 7 1 IN IP4 127.0.0.2\r\ns=-\r\nc=IN IP4 127.0.0.2\r\nt=0 0\r\nm=audio 40000 RTP/AVP 8\r\na=sendrecv\r\n";
    assert!(bridge.late_answer(Side::A, pcma_answer.as_bytes()).unwrap_err().contains("drops the offered codec"), "PCMA to a PCMU offer");
    let carrier_answer = "v=0\r\no=carrier 7 1 IN IP4 127.0.0.2\r\ns=-\r\nc=IN IP4 127.0.0.2\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\na=sendrecv\r\n";
    bridge.late_answer(Side::A, carrier_answer.as_bytes()).unwrap();

    connect(&mut bridge, &mut [None, Some(&mut browser)], &mut now);
    // Browser → carrier first: no packet from the carrier yet, so this goes to
    // the address of its answer (nothing latched).
    let mid = answer_mid(&answer);
    let mut plain_out = Vec::new();
    for seq in 0..20u64 {
        now += Duration::from_millis(20);
        send_from_browser(&mut browser, mid, 700 + seq, now);
        bridge.handle_timeout(now);
        pump(&mut bridge, Side::B, &mut browser, now, &mut plain_out);
    }
    let got: Vec<_> = plain_out.iter().filter(|(d, _)| *d == carrier).collect();
    assert!(got.len() >= 15, "carrier got {} packets", got.len());
    assert!(got.iter().all(|(_, p)| parse_rtp(p).is_some_and(|(h, payload)| h.pt == 0 && payload == [0x11; 160])));
    // Carrier → browser.
    carrier_rtp(&mut bridge, &mut browser, carrier, 2000..2020, &mut now, &mut plain_out);
    assert!(browser.got_rtp.len() >= 15, "browser got {} packets", browser.got_rtp.len());
    assert!(browser.got_rtp.iter().all(|(pt, _, p)| *pt == 0 && p.len() == 160));
}

#[test]
fn late_offer_from_a_browser_is_refused() {
    let mut bridge = Bridge::new([LegKind::WebRtc, LegKind::Plain], [bridge_addr(Side::A), bridge_addr(Side::B)]);
    assert!(bridge.late_offer(Side::B, Instant::now()).unwrap_err().contains("must send its SDP offer"));
}

fn answer_mid(sdp: &str) -> Mid {
    Mid::from(parse_audio(sdp).unwrap().mid.unwrap().as_str())
}

/// A browser (WebRTC, side A) calls out: its offer has Opus and G.711; the
/// carrier's offer gets only G.711; the browser's answer only what the carrier chose.
#[test]
fn browser_offer_is_answered_with_the_carriers_choice() {
    let now = Instant::now();
    let mut bridge = Bridge::new([LegKind::WebRtc, LegKind::Plain], [bridge_addr(Side::A), bridge_addr(Side::B)]);
    let mut browser = Browser::new("127.0.0.1:50002".parse().unwrap(), now);
    let mut api = browser.rtc.sdp_api();
    api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
    let (offer, pending) = api.apply().unwrap();
    let to_carrier = String::from_utf8(bridge.offer(Side::A, offer.to_sdp_string().as_bytes(), now).unwrap()).unwrap();
    let d = parse_audio(&to_carrier).unwrap();
    assert!(d.codecs.iter().all(|c| c.format != AudioFormat::TelephoneEvent || c.pt != 111));
    assert!(to_carrier.contains("RTP/AVP") && !to_carrier.to_lowercase().contains("opus"), "{to_carrier}");
    let carrier_answer = "v=0\r\no=- 1 1 IN IP4 127.0.0.2\r\ns=-\r\nc=IN IP4 127.0.0.2\r\nt=0 0\r\nm=audio 40002 RTP/AVP 8\r\na=sendrecv\r\n";
    let to_browser = String::from_utf8(bridge.answer(Side::B, carrier_answer.as_bytes(), now).unwrap()).unwrap();
    assert!(to_browser.contains("PCMA/8000") && !to_browser.contains("PCMU/8000") && !to_browser.to_lowercase().contains("opus"), "{to_browser}");
    browser.rtc.sdp_api().accept_answer(pending, SdpAnswer::from_sdp_string(&to_browser).unwrap()).unwrap();
    // The same answer again (183 then 200) gives the same SDP.
    assert_eq!(String::from_utf8(bridge.answer(Side::B, carrier_answer.as_bytes(), now).unwrap()).unwrap(), to_browser);
}

#[test]
fn browser_offer_without_g711_is_refused() {
    let mut bridge = Bridge::new([LegKind::WebRtc, LegKind::Plain], [bridge_addr(Side::A), bridge_addr(Side::B)]);
    let e = bridge.offer(Side::A, BROWSER_OFFER_NO_G711.as_bytes(), Instant::now()).unwrap_err();
    assert!(e.contains("G.711"));
}

const CARRIER: &str = "127.0.0.2:40000";

fn carrier_offer() -> String {
    "v=0\r\no=carrier 7 1 IN IP4 127.0.0.2\r\ns=-\r\nc=IN IP4 127.0.0.2\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n".to_string()
}

/// A carrier re-INVITE that changes nothing (a session refresh) is passed to
/// the browser as an offer of the current session (RFC 3264 §8), not refused
/// with 488; the carrier gets back exactly the answer it had, same `o=`
/// version; ICE and DTLS are not restarted and media goes on.
#[test]
fn carrier_refresh_reoffers_the_current_session_to_the_browser() {
    let mut now = Instant::now();
    let mut bridge = Bridge::new([LegKind::Plain, LegKind::WebRtc], [bridge_addr(Side::A), bridge_addr(Side::B)]);
    let carrier: SocketAddr = CARRIER.parse().unwrap();
    let first_offer = String::from_utf8(bridge.offer(Side::A, carrier_offer().as_bytes(), now).unwrap()).unwrap();
    let mut browser = Browser::new("127.0.0.1:50000".parse().unwrap(), now);
    let answer = browser.rtc.sdp_api().accept_offer(SdpOffer::from_sdp_string(&first_offer).unwrap()).unwrap().to_sdp_string();
    let first_answer = bridge.answer(Side::B, answer.as_bytes(), now).unwrap();
    connect(&mut bridge, &mut [None, Some(&mut browser)], &mut now);
    // The carrier's packets latch its address.
    let mut plain_out = Vec::new();
    bridge.handle_receive(Side::A, carrier, &rtp(0, 1), now);
    pump(&mut bridge, Side::B, &mut browser, now, &mut plain_out);

    // The same offer again, twice (a refresh, then a retransmitted-looking repeat).
    for round in 0..2 {
        now += Duration::from_secs(60);
        let reoffer = String::from_utf8(bridge.offer(Side::A, carrier_offer().as_bytes(), now).expect("an unchanged offer is not refused")).unwrap();
        for attr in ["a=ice-ufrag:", "a=ice-pwd:", "a=fingerprint:", "a=mid:", "a=ssrc:"] {
            assert_eq!(sdp_line(&reoffer, attr), sdp_line(&first_offer, attr), "round {round}: {attr} kept\n{reoffer}");
        }
        assert!(reoffer.contains("a=setup:actpass") && reoffer.contains("a=sendrecv"), "{reoffer}");
        let answer = browser.rtc.sdp_api().accept_offer(SdpOffer::from_sdp_string(&reoffer).unwrap()).unwrap().to_sdp_string();
        let to_carrier = bridge.answer(Side::B, answer.as_bytes(), now).unwrap();
        assert_eq!(to_carrier, first_answer, "round {round}: the carrier's previous answer, same o= version");
        pump(&mut bridge, Side::B, &mut browser, now, &mut plain_out);
    }
    assert!(bridge.is_connected(Side::B) && browser.connected);

    // Media both ways, to the still latched carrier address.
    browser.got_rtp.clear();
    plain_out.clear();
    let mid = answer_mid(&first_offer);
    for seq in 0..10u16 {
        now += Duration::from_millis(20);
        bridge.handle_receive(Side::A, carrier, &rtp(0, 100 + seq), now);
        send_from_browser(&mut browser, mid, 700 + seq as u64, now);
        pump(&mut bridge, Side::B, &mut browser, now, &mut plain_out);
    }
    assert_eq!(browser.got_rtp.len(), 10, "carrier → browser after the refreshes");
    assert_eq!(plain_out.iter().filter(|(d, p)| *d == carrier && parse_rtp(p).is_some()).count(), 10, "browser → carrier after the refreshes");
}

/// A carrier re-INVITE that switches to a codec the browser leg's session was not
/// built with is refused (488 upstream) before anything changes: no transcoding,
/// and no answer naming a codec the carrier did not offer. The call goes on.
#[test]
fn carrier_reoffer_with_another_codec_is_refused_and_media_goes_on() {
    let mut now = Instant::now();
    let mut bridge = Bridge::new([LegKind::Plain, LegKind::WebRtc], [bridge_addr(Side::A), bridge_addr(Side::B)]);
    let carrier: SocketAddr = CARRIER.parse().unwrap();
    // PCMU only at first.
    let pcmu = carrier_offer().replace("RTP/AVP 0 8 101", "RTP/AVP 0 101");
    let offer = String::from_utf8(bridge.offer(Side::A, pcmu.as_bytes(), now).unwrap()).unwrap();
    let mut browser = Browser::new("127.0.0.1:50000".parse().unwrap(), now);
    let answer = browser.rtc.sdp_api().accept_offer(SdpOffer::from_sdp_string(&offer).unwrap()).unwrap().to_sdp_string();
    bridge.answer(Side::B, answer.as_bytes(), now).unwrap();
    connect(&mut bridge, &mut [None, Some(&mut browser)], &mut now);

    // PCMA only, from another port: refused, and the old address is kept.
    let pcma = carrier_offer().replace("RTP/AVP 0 8 101", "RTP/AVP 8 101").replace("m=audio 40000", "m=audio 40100");
    let e = bridge.offer(Side::A, pcma.as_bytes(), now).unwrap_err();
    assert!(e.contains("transcoding") && e.contains("Pcmu/0"), "{e}");

    let mut plain_out = Vec::new();
    let mid = answer_mid(&offer);
    for seq in 0..5u16 {
        now += Duration::from_millis(20);
        send_from_browser(&mut browser, mid, 900 + seq as u64, now);
        pump(&mut bridge, Side::B, &mut browser, now, &mut plain_out);
    }
    let to_carrier: Vec<_> = plain_out.iter().filter(|(_, p)| parse_rtp(p).is_some()).collect();
    assert_eq!(to_carrier.len(), 5, "browser → carrier after the refused re-offer");
    assert!(to_carrier.iter().all(|(d, _)| *d == carrier), "still to the carrier's first address");

    // A re-offer keeping PCMU (and adding PCMA) is fine.
    let both = carrier_offer();
    assert!(bridge.offer(Side::A, both.as_bytes(), now).is_ok());
}

/// A browser re-INVITE repeating its offer: the carrier gets the same offer
/// again (same `o=` version), and the browser the same answer.
#[test]
fn browser_repeated_offer_gets_the_previous_answer() {
    let mut now = Instant::now();
    let mut bridge = Bridge::new([LegKind::WebRtc, LegKind::Plain], [bridge_addr(Side::A), bridge_addr(Side::B)]);
    let mut browser = Browser::new("127.0.0.1:50002".parse().unwrap(), now);
    let mut api = browser.rtc.sdp_api();
    let mid = api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
    let (offer, pending) = api.apply().unwrap();
    let offer = offer.to_sdp_string();
    let to_carrier = bridge.offer(Side::A, offer.as_bytes(), now).unwrap();
    let carrier_answer = "v=0\r\no=- 1 1 IN IP4 127.0.0.2\r\ns=-\r\nc=IN IP4 127.0.0.2\r\nt=0 0\r\nm=audio 40002 RTP/AVP 0\r\na=sendrecv\r\n";
    let to_browser = String::from_utf8(bridge.answer(Side::B, carrier_answer.as_bytes(), now).unwrap()).unwrap();
    browser.rtc.sdp_api().accept_answer(pending, SdpAnswer::from_sdp_string(&to_browser).unwrap()).unwrap();
    connect(&mut bridge, &mut [Some(&mut browser), None], &mut now);

    // A re-INVITE repeating the very first offer text: the carrier gets the
    // previous offer (same o= version), the browser the previous answer.
    assert_eq!(bridge.offer(Side::A, offer.as_bytes(), now).expect("an unchanged browser offer is not refused"), to_carrier);
    assert_eq!(String::from_utf8(bridge.answer(Side::B, carrier_answer.as_bytes(), now).unwrap()).unwrap(), to_browser);
    // The browser's offer of its current session (a session refresh): it
    // offers only the codec in use now, so the carrier's offer is a new
    // version the first time and the same SDP on the next refresh.
    let mut refreshed = Vec::new();
    for _ in 0..2 {
        let (reoffer, pending) = offer_unchanged(&mut browser.rtc, mid).expect("the browser has audio");
        refreshed.push(bridge.offer(Side::A, reoffer.to_sdp_string().as_bytes(), now).expect("an unchanged browser offer is not refused"));
        let answer = String::from_utf8(bridge.answer(Side::B, carrier_answer.as_bytes(), now).unwrap()).unwrap();
        assert_eq!(answer, to_browser, "the browser gets the previous answer");
        browser.rtc.sdp_api().accept_answer(pending, SdpAnswer::from_sdp_string(&answer).unwrap()).unwrap();
    }
    assert_eq!(refreshed[0], refreshed[1], "same SDP, same o= version");
    let to_carrier = refreshed.pop().unwrap();

    // A real change (hold) is a new version for the carrier.
    let hold = offer.replace("a=sendrecv", "a=sendonly");
    let to_carrier_hold = String::from_utf8(bridge.offer(Side::A, hold.as_bytes(), now).unwrap()).unwrap();
    let (o1, o2) = (sdp_line(std::str::from_utf8(&to_carrier).unwrap(), "o=").unwrap().to_string(), sdp_line(&to_carrier_hold, "o=").unwrap());
    assert_ne!(o1, o2, "a changed SDP gets the next o= version");
    assert!(to_carrier_hold.contains("a=sendonly"));

    // Media still flows from the browser to the carrier.
    let mut plain_out = Vec::new();
    for seq in 0..10u64 {
        now += Duration::from_millis(20);
        send_from_browser(&mut browser, mid, 900 + seq, now);
        pump(&mut bridge, Side::A, &mut browser, now, &mut plain_out);
    }
    assert_eq!(plain_out.iter().filter(|(d, _)| *d == "127.0.0.2:40002".parse().unwrap()).count(), 10);
}

/// Browser ↔ browser: an unchanged re-offer from one browser becomes an offer
/// of the current session to the other (it was "nothing changed", 488).
#[test]
fn browser_to_browser_unchanged_reoffer() {
    let mut now = Instant::now();
    let mut bridge = Bridge::new([LegKind::WebRtc, LegKind::WebRtc], [bridge_addr(Side::A), bridge_addr(Side::B)]);
    let mut alice = Browser::new("127.0.0.1:50004".parse().unwrap(), now);
    let mut bob = Browser::new("127.0.0.1:50006".parse().unwrap(), now);
    let mut api = alice.rtc.sdp_api();
    let alice_mid = api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
    let (offer, pending) = api.apply().unwrap();
    let to_bob = bridge.offer(Side::A, offer.to_sdp_string().as_bytes(), now).unwrap();
    let bob_answer = bob.rtc.sdp_api().accept_offer(SdpOffer::from_sdp_string(std::str::from_utf8(&to_bob).unwrap()).unwrap()).unwrap();
    let to_alice = bridge.answer(Side::B, bob_answer.to_sdp_string().as_bytes(), now).unwrap();
    alice.rtc.sdp_api().accept_answer(pending, SdpAnswer::from_sdp_string(std::str::from_utf8(&to_alice).unwrap()).unwrap()).unwrap();
    connect(&mut bridge, &mut [Some(&mut alice), Some(&mut bob)], &mut now);

    for round in 0..2 {
        let (reoffer, pending) = offer_unchanged(&mut alice.rtc, alice_mid).unwrap();
        let to_bob = bridge.offer(Side::A, reoffer.to_sdp_string().as_bytes(), now).unwrap_or_else(|e| panic!("round {round}: {e}"));
        let answer = bob.rtc.sdp_api().accept_offer(SdpOffer::from_sdp_string(std::str::from_utf8(&to_bob).unwrap()).unwrap()).unwrap();
        let to_alice = bridge.answer(Side::B, answer.to_sdp_string().as_bytes(), now).unwrap();
        alice.rtc.sdp_api().accept_answer(pending, SdpAnswer::from_sdp_string(std::str::from_utf8(&to_alice).unwrap()).unwrap()).unwrap();
    }
    let mut plain_out = Vec::new();
    for seq in 0..10u64 {
        now += Duration::from_millis(20);
        send_from_browser(&mut alice, alice_mid, 40 + seq, now);
        pump_all(&mut bridge, &mut [Some(&mut alice), Some(&mut bob)], now, &mut plain_out);
    }
    assert!(plain_out.is_empty());
    assert_eq!(bob.got_rtp.len(), 10, "alice → bob after the re-offers");
    assert!(bob.got_rtp.iter().all(|(pt, _, p)| *pt == 0 && *p == [0x11; 160]));
    // Unprotected on alice's leg and protected again on bob's, both by crossbar.
    assert!(bridge.own_srtp_packets(Side::A) >= 10 && bridge.own_srtp_packets(Side::B) >= 10, "{} {}", bridge.own_srtp_packets(Side::A), bridge.own_srtp_packets(Side::B));
}

/// A carrier (side A) called a browser (side B, on `port`), which answered;
/// ICE and DTLS are up.
fn carrier_calls_browser(port: u16) -> (Bridge, Browser, Instant) {
    let mut now = Instant::now();
    let mut bridge = Bridge::new([LegKind::Plain, LegKind::WebRtc], [bridge_addr(Side::A), bridge_addr(Side::B)]);
    let to_browser = String::from_utf8(bridge.offer(Side::A, carrier_offer().as_bytes(), now).unwrap()).unwrap();
    let mut browser = Browser::new(SocketAddr::from(([127, 0, 0, 1], port)), now);
    let answer = browser.rtc.sdp_api().accept_offer(SdpOffer::from_sdp_string(&to_browser).unwrap()).unwrap();
    bridge.answer(Side::B, answer.to_sdp_string().as_bytes(), now).unwrap();
    connect(&mut bridge, &mut [None, Some(&mut browser)], &mut now);
    (bridge, browser, now)
}

/// A carrier packet leaves for the browser in the same poll, without waiting
/// for the leg's next timer or datagram.
#[test]
fn carrier_packet_is_sent_at_once() {
    let (mut bridge, browser, now) = carrier_calls_browser(50008);
    let mut buf = [0u8; 2048];
    while bridge.poll_transmit(&mut buf).is_some() {}
    bridge.handle_receive(Side::A, CARRIER.parse().unwrap(), &rtp(0, 5), now);
    let (side, dest, n) = bridge.poll_transmit(&mut buf).expect("the SRTP packet, now");
    assert_eq!((side, dest), (Side::B, browser.addr));
    assert!(n >= 12 + 160 + 10, "SRTP of 160 bytes of G.711: {n}");
    assert_eq!(bridge.stats().a_to_b_rtp.packets, 1);
}

/// The carrier restarts its stream (new SSRC, new sequence numbers),
/// repeats a packet, and jumps its numbering: the browser gets one stream with sequence numbers that
/// go on where they were, every packet once, and str0m's SRTP accepts them
/// all (a repeated SRTP index would reuse an AES-GCM nonce, so crossbar never
/// protects one twice).
#[test]
fn carrier_stream_restart_and_repeats_reach_the_browser_once_in_sequence() {
    let (mut bridge, mut browser, mut now) = carrier_calls_browser(50010);
    let carrier: SocketAddr = CARRIER.parse().unwrap();
    let with_ssrc = |seq: u16, ssrc: u8| {
        let mut p = rtp(0, seq);
        p[11] = ssrc;
        p
    };
    let mut plain_out = Vec::new();
    let mut send = |bridge: &mut Bridge, browser: &mut Browser, pkt: Vec<u8>, now: &mut Instant| {
        *now += Duration::from_millis(20);
        bridge.handle_receive(Side::A, carrier, &pkt, *now);
        browser.rtc.handle_input(Input::Timeout(*now)).unwrap();
        pump(bridge, Side::B, browser, *now, &mut plain_out);
    };
    for seq in 100..110u16 {
        send(&mut bridge, &mut browser, with_ssrc(seq, 7), &mut now);
    }
    send(&mut bridge, &mut browser, with_ssrc(109, 7), &mut now);
    for seq in 5000..5010u16 {
        send(&mut bridge, &mut browser, with_ssrc(seq, 8), &mut now);
    }
    // The same SSRC jumps 40 000 numbers ahead: more than an SRTP receiver can
    // follow (2^15), so they continue after the last number sent too.
    for seq in 45000..45005u16 {
        send(&mut bridge, &mut browser, with_ssrc(seq, 8), &mut now);
    }
    let seqs: Vec<u16> = browser.got_rtp.iter().map(|(_, s, _)| *s).collect();
    let expected: Vec<u16> = (100..125).collect();
    assert_eq!(seqs, expected, "one stream, in sequence, the repeat dropped");
    assert_eq!(bridge.own_srtp_packets(Side::B), 25);
    assert_eq!(bridge.stats().a_to_b_rtp.packets, 25);
}

/// A browser's leg is latched to its ICE-selected address while the browser is
/// heard (the media thread connects the socket to it), and no longer once it has
/// been [`QUIET`] (the socket hears anyone again, so that checks from a
/// browser's new network get through); its next packet latches it again.
#[test]
fn browser_leg_is_latched_while_heard() {
    let (mut bridge, mut browser, mut now) = carrier_calls_browser(50012);
    let mid = browser.mid.expect("the browser has its audio");
    let mut plain_out = Vec::new();
    let latched_after = |bridge: &mut Bridge, browser: &mut Browser, seq: u64, now: &mut Instant, plain_out: &mut Vec<_>| {
        *now += Duration::from_millis(20);
        send_from_browser(browser, mid, seq, *now);
        bridge.handle_timeout(*now);
        pump(bridge, Side::B, browser, *now, plain_out);
        bridge.latched(Side::B)
    };
    assert_eq!(latched_after(&mut bridge, &mut browser, 1, &mut now, &mut plain_out), Some(browser.addr));
    let heard = now;
    assert!(bridge.poll_timeout().is_some_and(|t| t <= heard + QUIET), "a timer ends the latch");
    // Quiet for just under `QUIET`: still latched; at `QUIET`, not.
    bridge.handle_timeout(heard + QUIET - Duration::from_millis(1));
    assert_eq!(bridge.latched(Side::B), Some(browser.addr));
    bridge.handle_timeout(heard + QUIET);
    assert_eq!(bridge.latched(Side::B), None, "a quiet browser's socket hears anyone");
    now = heard + QUIET;
    assert_eq!(latched_after(&mut bridge, &mut browser, 2, &mut now, &mut plain_out), Some(browser.addr), "heard again");
    assert_eq!(bridge.own_srtp_packets(Side::B), 2);
}
