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
    let p = parse_rtp(&pkt).unwrap();
    assert_eq!((p.pt, p.seq, p.ts, p.marker, p.ssrc, p.payload.len()), (8, 0x1234, 160, true, 0xdeadbeef, 160));
    assert_eq!(p.to_bytes(), pkt);
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
}

impl Browser {
    fn new(addr: SocketAddr, now: Instant) -> Browser {
        let mut rtc = RtcConfig::new().set_rtp_mode(true).clear_codecs().enable_opus(true, false).enable_pcmu(true, false).enable_pcma(true, false).build(now);
        rtc.add_local_candidate(Candidate::host(addr, "udp").unwrap());
        Browser { rtc, addr, got_rtp: Vec::new(), connected: false }
    }

    /// Poll everything; datagrams for the bridge are returned.
    fn drain(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut out = Vec::new();
        while let Ok(o) = self.rtc.poll_output() {
            match o {
                Output::Timeout(_) => break,
                Output::Transmit(t) => out.push((t.destination, t.contents.to_vec())),
                Output::Event(Event::Connected) => self.connected = true,
                Output::Event(Event::RtpPacket(p)) => self.got_rtp.push((*p.header.payload_type, p.header.sequence_number, p.payload.to_vec())),
                Output::Event(_) => {}
            }
        }
        out
    }
}

/// Moves datagrams between the browser and the bridge's WebRTC side until quiet.
fn pump(bridge: &mut Bridge, web_side: Side, browser: &mut Browser, now: Instant, plain_out: &mut Vec<(SocketAddr, Vec<u8>)>) {
    for _ in 0..50 {
        let mut moved = false;
        for (dest, d) in browser.drain() {
            moved = true;
            bridge.handle_receive(web_side, browser.addr, &d, now);
            let _ = dest;
        }
        while let Some((side, dest, d)) = bridge.poll_transmit() {
            moved = true;
            if side == web_side {
                let input = Input::Receive(now, Receive { proto: Protocol::Udp, source: bridge_addr(web_side), destination: browser.addr, contents: d.as_slice().try_into().unwrap() });
                browser.rtc.handle_input(input).unwrap();
            } else {
                plain_out.push((dest, d));
            }
        }
        if !moved {
            break;
        }
    }
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
    for seq in 0..20u16 {
        now += Duration::from_millis(20);
        bridge.handle_receive(Side::A, carrier, &rtp(0, 1000 + seq), now);
        bridge.handle_timeout(now);
        browser.rtc.handle_input(Input::Timeout(now)).unwrap();
        pump(&mut bridge, Side::B, &mut browser, now, &mut plain_out);
    }
    assert!(browser.got_rtp.len() >= 15, "browser got {} packets", browser.got_rtp.len());
    assert!(browser.got_rtp.iter().all(|(pt, _, p)| *pt == 0 && p.len() == 160));

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
    assert!(to_carrier.iter().all(|(_, p)| parse_rtp(p).is_some_and(|r| r.pt == 0 && r.payload == vec![0x11; 160])));
    let st = bridge.stats();
    assert!(st.a_to_b_rtp.packets >= 15 && st.b_to_a_rtp.packets >= 15, "{st:?}");
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
