//! WebRTC legs: str0m terminates ICE (lite), DTLS and SRTP for a browser and
//! the bridge moves G.711 / telephone-event RTP between it and the call's other
//! leg (plain RTP to a carrier or SIP phone, or another WebRTC leg), without
//! transcoding: the codec towards both parties is the same, with the same
//! payload type numbers, so packets pass as they are (only SRTP is added or
//! removed).
//!
//! [`Bridge`] is sans-IO: datagrams and timeouts in (each with `now`),
//! datagrams out ([`Bridge::poll_transmit`]). SDP goes through it synchronously
//! from the B2BUA ([`BridgeSdp`], a [`SdpAdapter`]): an offer from one side
//! becomes the offer to the other side, an answer from one side the answer to
//! the other. A browser's offer is only accepted (str0m `accept_offer`) once the
//! other side has answered, so that str0m answers the browser with exactly the
//! G.711 codec the other side chose. A media thread (`super::engine`) drives it:
//! datagrams, timeouts, sends; media never passes through an actor.
//!
//! Offers crossbar makes to a browser are str0m's: `UDP/TLS/RTP/SAVPF`, BUNDLE,
//! rtcp-mux, one host candidate at the configured public media address.

use super::{FlowStats, RelayStats, Side};
use crate::sip::b2bua::SdpAdapter;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::{Codec, FormatParams};
use str0m::media::{Direction, Frequency, MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{RtpWrite, SeqNo};
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};

/// What a call leg's media is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegKind {
    /// Plain RTP/AVP (carriers, SIP phones): crossbar's own SDP and relay.
    Plain,
    /// A browser: ICE-lite, DTLS-SRTP, BUNDLE, rtcp-mux via str0m.
    WebRtc,
}

/// The audio formats crossbar bridges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudioFormat {
    Pcmu,
    Pcma,
    TelephoneEvent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioCodec {
    pub pt: u8,
    pub format: AudioFormat,
}

/// The audio section of an SDP, as far as the bridge cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudioDesc {
    /// G.711 and telephone-event/8000 only, in the SDP's order.
    pub codecs: Vec<AudioCodec>,
    pub direction: Direction,
    /// `c=` address and `m=` port (meaningful for plain RTP).
    pub addr: Option<SocketAddr>,
    pub mid: Option<String>,
}

/// Why SDP cannot be bridged; the B2BUA answers 488 with this text.
fn no_g711() -> String {
    "no G.711 (PCMU/PCMA) in the audio offer: browser legs are bridged without transcoding, enable PCMU or PCMA".into()
}

/// Parses the first `m=audio` section: G.711/telephone-event codecs, direction, address.
pub fn parse_audio(sdp: &str) -> Result<AudioDesc, String> {
    let mut session_c: Option<std::net::IpAddr> = None;
    let mut media_c: Option<std::net::IpAddr> = None;
    let mut in_audio = false;
    let mut seen_audio = false;
    let mut port = 0u16;
    let mut fmts: Vec<u8> = Vec::new();
    let mut rtpmap: Vec<(u8, String)> = Vec::new();
    let mut direction = Direction::SendRecv;
    let mut mid = None;
    for line in sdp.lines().map(str::trim) {
        if let Some(m) = line.strip_prefix("m=") {
            if seen_audio {
                in_audio = false;
                continue;
            }
            let parts: Vec<&str> = m.split_whitespace().collect();
            if parts.first() == Some(&"audio") {
                in_audio = true;
                seen_audio = true;
                port = parts.get(1).and_then(|p| p.split('/').next()?.parse().ok()).unwrap_or(0);
                fmts = parts.iter().skip(3).filter_map(|f| f.parse().ok()).collect();
            }
            continue;
        }
        if let Some(c) = line.strip_prefix("c=") {
            let ip = c.split_whitespace().nth(2).and_then(|a| a.split('/').next()?.parse().ok());
            if seen_audio && in_audio {
                media_c = ip;
            } else if !seen_audio {
                session_c = ip;
            }
            continue;
        }
        if !in_audio {
            continue;
        }
        if let Some(r) = line.strip_prefix("a=rtpmap:") {
            if let Some((pt, enc)) = r.split_once(' ') {
                if let Ok(pt) = pt.trim().parse() {
                    rtpmap.push((pt, enc.trim().to_ascii_lowercase()));
                }
            }
        } else if let Some(m) = line.strip_prefix("a=mid:") {
            mid = Some(m.trim().to_string());
        } else {
            match line {
                "a=sendrecv" => direction = Direction::SendRecv,
                "a=sendonly" => direction = Direction::SendOnly,
                "a=recvonly" => direction = Direction::RecvOnly,
                "a=inactive" => direction = Direction::Inactive,
                _ => {}
            }
        }
    }
    if !seen_audio {
        return Err("no audio stream in the SDP".into());
    }
    let mut codecs = Vec::new();
    for pt in fmts {
        let enc = rtpmap.iter().find(|(p, _)| *p == pt).map(|(_, e)| e.as_str());
        let format = match (pt, enc) {
            (_, Some("pcmu/8000")) | (_, Some("pcmu/8000/1")) | (0, None) => AudioFormat::Pcmu,
            (_, Some("pcma/8000")) | (_, Some("pcma/8000/1")) | (8, None) => AudioFormat::Pcma,
            (_, Some("telephone-event/8000")) => AudioFormat::TelephoneEvent,
            _ => continue,
        };
        codecs.push(AudioCodec { pt, format });
    }
    if !codecs.iter().any(|c| c.format != AudioFormat::TelephoneEvent) {
        return Err(no_g711());
    }
    let ip = media_c.or(session_c);
    Ok(AudioDesc { codecs, direction, addr: ip.map(|ip| SocketAddr::new(ip, port)), mid })
}

/// The first G.711 codec and the telephone-event codec, if any: what both sides get.
pub fn choose(codecs: &[AudioCodec]) -> Vec<AudioCodec> {
    let mut out: Vec<AudioCodec> = codecs.iter().filter(|c| c.format != AudioFormat::TelephoneEvent).take(1).copied().collect();
    out.extend(codecs.iter().find(|c| c.format == AudioFormat::TelephoneEvent).copied());
    out
}

fn dir_attr(d: Direction) -> &'static str {
    match d {
        Direction::SendRecv => "sendrecv",
        Direction::SendOnly => "sendonly",
        Direction::RecvOnly => "recvonly",
        Direction::Inactive => "inactive",
    }
}

/// Plain RTP/AVP SDP for a carrier or SIP phone.
pub fn plain_sdp(local: SocketAddr, codecs: &[AudioCodec], direction: Direction, version: u64) -> Vec<u8> {
    let (fam, ip) = match local.ip() {
        std::net::IpAddr::V4(v) => ("IP4", v.to_string()),
        std::net::IpAddr::V6(v) => ("IP6", v.to_string()),
    };
    let pts: Vec<String> = codecs.iter().map(|c| c.pt.to_string()).collect();
    let mut s = format!("v=0\r\no=crossbar 1 {version} IN {fam} {ip}\r\ns=crossbar\r\nc=IN {fam} {ip}\r\nt=0 0\r\nm=audio {} RTP/AVP {}\r\n", local.port(), pts.join(" "));
    for c in codecs {
        match c.format {
            AudioFormat::Pcmu => s.push_str(&format!("a=rtpmap:{} PCMU/8000\r\n", c.pt)),
            AudioFormat::Pcma => s.push_str(&format!("a=rtpmap:{} PCMA/8000\r\n", c.pt)),
            AudioFormat::TelephoneEvent => s.push_str(&format!("a=rtpmap:{pt} telephone-event/8000\r\na=fmtp:{pt} 0-16\r\n", pt = c.pt)),
        }
    }
    s.push_str(&format!("a=ptime:20\r\na={}\r\n", dir_attr(direction)));
    s.into_bytes()
}

/// Extends 16-bit RTP sequence numbers to str0m's 64-bit ones (rollover counted).
#[derive(Debug, Default)]
struct SeqExtender {
    last: Option<u64>,
}

impl SeqExtender {
    fn extend(&mut self, seq: u16) -> u64 {
        let v = match self.last {
            None => seq as u64,
            Some(last) => {
                let base = last & !0xffff;
                let cand = base | seq as u64;
                // Pick the candidate closest to the last one (wrap either way).
                [cand.wrapping_sub(0x1_0000), cand, cand + 0x1_0000]
                    .into_iter()
                    .filter(|c| *c < u64::MAX / 2)
                    .min_by_key(|c| c.abs_diff(last))
                    .unwrap_or(cand)
            }
        };
        if self.last.is_none_or(|l| v > l) {
            self.last = Some(v);
        }
        v
    }
}

struct WebRtcLeg {
    rtc: Option<Rtc>,
    /// Our host candidate: public media IP and this leg's port.
    candidate: SocketAddr,
    mid: Option<Mid>,
    /// Our offer to the browser, waiting for its answer.
    pending: Option<SdpPendingOffer>,
    /// The browser's offer, waiting for the other side's answer.
    offer_in: Option<String>,
    last_answer: Option<Vec<u8>>,
    seq: SeqExtender,
    connected: bool,
    /// When str0m next wants `Input::Timeout`.
    timeout: Option<Instant>,
}

struct PlainLeg {
    local: SocketAddr,
    sdp_remote: Option<SocketAddr>,
    latched: Option<SocketAddr>,
}

enum Leg {
    Plain(PlainLeg),
    WebRtc(Box<WebRtcLeg>),
}

/// The media of a call with at least one WebRTC leg (sans-IO).
pub struct Bridge {
    legs: [Leg; 2],
    version: u64,
    out: VecDeque<(Side, SocketAddr, Vec<u8>)>,
    stats: [FlowStats; 2],
}

fn idx(side: Side) -> usize {
    match side {
        Side::A => 0,
        Side::B => 1,
    }
}

impl Bridge {
    /// `local[i]` is the advertised address of side i's RTP socket.
    pub fn new(kinds: [LegKind; 2], local: [SocketAddr; 2]) -> Bridge {
        let mk = |k: LegKind, l: SocketAddr| match k {
            LegKind::Plain => Leg::Plain(PlainLeg { local: l, sdp_remote: None, latched: None }),
            LegKind::WebRtc => Leg::WebRtc(Box::new(WebRtcLeg {
                rtc: None,
                candidate: l,
                mid: None,
                pending: None,
                offer_in: None,
                last_answer: None,
                seq: SeqExtender::default(),
                connected: false,
                timeout: None,
            })),
        };
        Bridge { legs: [mk(kinds[0], local[0]), mk(kinds[1], local[1])], version: 1, out: VecDeque::new(), stats: Default::default() }
    }

    fn build_rtc(candidate: SocketAddr, codecs: &[AudioCodec], now: Instant) -> Result<Rtc, String> {
        let mut cfg = RtcConfig::new().set_ice_lite(true).set_rtp_mode(true).clear_codecs();
        for c in codecs {
            let codec = match c.format {
                AudioFormat::Pcmu => Codec::PCMU,
                AudioFormat::Pcma => Codec::PCMA,
                AudioFormat::TelephoneEvent => Codec::Tele,
            };
            let format = if c.format == AudioFormat::TelephoneEvent { FormatParams { telephone_event_max: Some(16), ..Default::default() } } else { FormatParams::default() };
            cfg.codec_config().add_config(c.pt.into(), None, codec, Frequency::EIGHT_KHZ, None, format);
        }
        let mut rtc = cfg.build(now);
        let cand = Candidate::host(candidate, "udp").map_err(|e| format!("bad media address {candidate}: {e}"))?;
        rtc.add_local_candidate(cand);
        Ok(rtc)
    }

    /// `from` sent an SDP offer: returns the offer for the other side.
    pub fn offer(&mut self, from: Side, sdp: &[u8], now: Instant) -> Result<Vec<u8>, String> {
        let text = std::str::from_utf8(sdp).map_err(|_| "SDP is not UTF-8".to_string())?;
        let desc = parse_audio(text)?;
        match &mut self.legs[idx(from)] {
            Leg::Plain(p) => {
                p.sdp_remote = desc.addr.filter(|a| !a.ip().is_unspecified() && a.port() != 0);
                p.latched = None;
            }
            Leg::WebRtc(w) => {
                SdpOffer::from_sdp_string(text).map_err(|e| format!("invalid WebRTC offer: {e}"))?;
                w.offer_in = Some(text.to_string());
            }
        }
        self.version += 1;
        let version = self.version;
        match &mut self.legs[idx(from.other())] {
            Leg::Plain(p) => Ok(plain_sdp(p.local, &desc.codecs, desc.direction, version)),
            Leg::WebRtc(w) => {
                if w.rtc.is_none() {
                    w.rtc = Some(Self::build_rtc(w.candidate, &desc.codecs, now)?);
                }
                let rtc = w.rtc.as_mut().expect("built above");
                let mut api = rtc.sdp_api();
                match w.mid {
                    None => w.mid = Some(api.add_media(MediaKind::Audio, desc.direction, None, None, None)),
                    Some(mid) => api.set_direction(mid, desc.direction),
                }
                let (offer, pending) = api.apply().ok_or_else(|| "nothing changed in the media offer".to_string())?;
                w.pending = Some(pending);
                Ok(offer.to_sdp_string().into_bytes())
            }
        }
    }

    /// `from` answered: returns the answer for the other side (the offerer).
    pub fn answer(&mut self, from: Side, sdp: &[u8], now: Instant) -> Result<Vec<u8>, String> {
        let text = std::str::from_utf8(sdp).map_err(|_| "SDP is not UTF-8".to_string())?;
        let desc = parse_audio(text)?;
        let chosen = choose(&desc.codecs);
        match &mut self.legs[idx(from)] {
            Leg::Plain(p) => {
                p.sdp_remote = desc.addr.filter(|a| !a.ip().is_unspecified() && a.port() != 0);
                p.latched = None;
            }
            Leg::WebRtc(w) => {
                if let (Some(pending), Some(rtc)) = (w.pending.take(), w.rtc.as_mut()) {
                    let ans = SdpAnswer::from_sdp_string(text).map_err(|e| format!("invalid WebRTC answer: {e}"))?;
                    rtc.sdp_api().accept_answer(pending, ans).map_err(|e| format!("WebRTC answer not acceptable: {e}"))?;
                }
            }
        }
        self.version += 1;
        let version = self.version;
        match &mut self.legs[idx(from.other())] {
            Leg::Plain(p) => Ok(plain_sdp(p.local, &chosen, desc.direction, version)),
            Leg::WebRtc(w) => {
                let Some(offer) = w.offer_in.take() else {
                    return w.last_answer.clone().ok_or_else(|| "no offer from the browser to answer".to_string());
                };
                if w.rtc.is_none() {
                    w.rtc = Some(Self::build_rtc(w.candidate, &chosen, now)?);
                }
                let rtc = w.rtc.as_mut().expect("built above");
                let offer = SdpOffer::from_sdp_string(&offer).map_err(|e| format!("invalid WebRTC offer: {e}"))?;
                let answer = rtc.sdp_api().accept_offer(offer).map_err(|e| format!("WebRTC offer not acceptable: {e}"))?;
                if w.mid.is_none() {
                    w.mid = parse_audio(&answer.to_sdp_string()).ok().and_then(|d| d.mid).map(|m| Mid::from(m.as_str()));
                }
                let bytes = answer.to_sdp_string().into_bytes();
                w.last_answer = Some(bytes.clone());
                Ok(bytes)
            }
        }
    }

    /// A datagram arrived on `side`'s socket from `from`.
    pub fn handle_receive(&mut self, side: Side, from: SocketAddr, data: &[u8], now: Instant) {
        match &mut self.legs[idx(side)] {
            Leg::Plain(p) => {
                let Some(pkt) = parse_rtp(data) else {
                    self.stats[idx(side)].dropped += 1;
                    return;
                };
                // Symmetric RTP: answer where the party really sends from.
                if p.latched != Some(from) {
                    p.latched = Some(from);
                }
                self.forward(side, pkt, now);
            }
            Leg::WebRtc(w) => {
                let Some(rtc) = w.rtc.as_mut() else { return };
                let Ok(contents) = data.try_into() else { return };
                let input = Input::Receive(now, Receive { proto: Protocol::Udp, source: from, destination: w.candidate, contents });
                if rtc.accepts(&input) {
                    if let Err(e) = rtc.handle_input(input) {
                        tracing::debug!(?side, "WebRTC input refused: {e}");
                    }
                }
                self.drain(side, now);
            }
        }
    }

    /// Time passed (or SDP changed a leg): feeds due timeouts to the WebRTC legs.
    pub fn handle_timeout(&mut self, now: Instant) {
        for side in [Side::A, Side::B] {
            if let Leg::WebRtc(w) = &mut self.legs[idx(side)] {
                if let Some(rtc) = w.rtc.as_mut() {
                    if w.timeout.is_none_or(|t| t <= now) {
                        let _ = rtc.handle_input(Input::Timeout(now));
                    }
                }
                self.drain(side, now);
            }
        }
    }

    /// Drains one WebRTC leg's output: datagrams to send, RTP to forward.
    fn drain(&mut self, side: Side, now: Instant) {
        let mut forward: Vec<RtpOut> = Vec::new();
        {
            let Leg::WebRtc(w) = &mut self.legs[idx(side)] else { return };
            let Some(rtc) = w.rtc.as_mut() else { return };
            loop {
                match rtc.poll_output() {
                    Ok(Output::Timeout(t)) => {
                        w.timeout = Some(t);
                        break;
                    }
                    Ok(Output::Transmit(t)) => self.out.push_back((side, t.destination, t.contents.to_vec())),
                    Ok(Output::Event(e)) => match e {
                        Event::RtpPacket(p) => forward.push(RtpOut {
                            pt: *p.header.payload_type,
                            seq: *p.seq_no as u16,
                            ts: p.header.timestamp,
                            marker: p.header.marker,
                            ssrc: *p.header.ssrc,
                            payload: p.payload.to_vec(),
                        }),
                        Event::Connected => {
                            w.connected = true;
                            tracing::debug!(?side, "WebRTC leg connected (ICE + DTLS)");
                        }
                        Event::IceConnectionStateChange(s) => tracing::debug!(?side, ?s, "WebRTC ICE state"),
                        Event::MediaAdded(m) if w.mid.is_none() => w.mid = Some(m.mid),
                        _ => {}
                    },
                    Err(e) => {
                        tracing::debug!(?side, "WebRTC leg error: {e}");
                        break;
                    }
                }
            }
        }
        for p in forward {
            self.forward(side, p, now);
        }
    }

    /// RTP received from `from`'s party → the other party.
    fn forward(&mut self, from: Side, p: RtpOut, now: Instant) {
        let to = from.other();
        let len = p.payload.len() as u64 + 12;
        let ok = match &mut self.legs[idx(to)] {
            Leg::Plain(pl) => match pl.latched.or(pl.sdp_remote) {
                Some(dest) => {
                    self.out.push_back((to, dest, p.to_bytes()));
                    true
                }
                None => false,
            },
            Leg::WebRtc(w) => {
                let seq = w.seq.extend(p.seq);
                match (w.rtc.as_mut(), w.mid) {
                    (Some(rtc), Some(mid)) if w.connected => match rtc.direct_api().stream_tx_by_mid(mid, None) {
                        Some(tx) => {
                            tx.write_rtp(RtpWrite::new(p.pt.into(), SeqNo::from(seq), p.ts, now, p.payload).marker(p.marker));
                            true
                        }
                        None => false,
                    },
                    _ => false,
                }
            }
        };
        let s = &mut self.stats[idx(from)];
        if ok {
            s.packets += 1;
            s.bytes += len;
        } else {
            s.dropped += 1;
        }
        if ok && matches!(self.legs[idx(to)], Leg::WebRtc(_)) {
            self.drain(to, now);
        }
    }

    pub fn poll_transmit(&mut self) -> Option<(Side, SocketAddr, Vec<u8>)> {
        self.out.pop_front()
    }

    /// The earliest time a WebRTC leg needs [`Bridge::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.legs
            .iter()
            .filter_map(|l| match l {
                Leg::WebRtc(w) if w.rtc.is_some() => w.timeout,
                _ => None,
            })
            .min()
    }

    pub fn is_connected(&self, side: Side) -> bool {
        matches!(&self.legs[idx(side)], Leg::WebRtc(w) if w.connected)
    }

    pub fn stats(&self) -> RelayStats {
        RelayStats { a_to_b_rtp: self.stats[0], b_to_a_rtp: self.stats[1], ..Default::default() }
    }
}

struct RtpOut {
    pt: u8,
    seq: u16,
    ts: u32,
    marker: bool,
    ssrc: u32,
    payload: Vec<u8>,
}

impl RtpOut {
    fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(12 + self.payload.len());
        b.push(0x80);
        b.push((self.pt & 0x7f) | if self.marker { 0x80 } else { 0 });
        b.extend_from_slice(&self.seq.to_be_bytes());
        b.extend_from_slice(&self.ts.to_be_bytes());
        b.extend_from_slice(&self.ssrc.to_be_bytes());
        b.extend_from_slice(&self.payload);
        b
    }
}

/// A plain RTP packet's header fields and payload (CSRCs, extension and padding skipped).
fn parse_rtp(d: &[u8]) -> Option<RtpOut> {
    if d.len() < 12 || d[0] >> 6 != 2 {
        return None;
    }
    let pt = d[1] & 0x7f;
    if (64..96).contains(&pt) {
        return None; // RTCP (RFC 5761 §4) on the RTP port
    }
    let cc = (d[0] & 0x0f) as usize;
    let mut off = 12 + 4 * cc;
    if d[0] & 0x10 != 0 {
        let ext = d.get(off + 2..off + 4)?;
        off += 4 + 4 * u16::from_be_bytes([ext[0], ext[1]]) as usize;
    }
    let mut end = d.len();
    if d[0] & 0x20 != 0 {
        end = end.checked_sub(*d.last()? as usize)?;
    }
    if off > end {
        return None;
    }
    Some(RtpOut {
        pt,
        seq: u16::from_be_bytes([d[2], d[3]]),
        ts: u32::from_be_bytes([d[4], d[5], d[6], d[7]]),
        marker: d[1] & 0x80 != 0,
        ssrc: u32::from_be_bytes([d[8], d[9], d[10], d[11]]),
        payload: d[off..end].to_vec(),
    })
}

/// What the media thread and the call's signalling share.
pub struct BridgeShared {
    pub(crate) bridge: Mutex<Bridge>,
    /// The media thread serving the session and the session's key there.
    shard: Arc<super::engine::Shard>,
    key: u16,
}

impl BridgeShared {
    pub(crate) fn new(bridge: Bridge, shard: Arc<super::engine::Shard>, key: u16) -> Arc<BridgeShared> {
        Arc::new(BridgeShared { bridge: Mutex::new(bridge), shard, key })
    }

    pub fn stats(&self) -> RelayStats {
        self.bridge.lock().stats()
    }

    /// SDP changed the bridge: the media thread runs it at once (ICE, DTLS, timers).
    fn kick(&self) {
        self.shard.send(super::engine::Cmd::Kick { key: self.key });
    }
}

/// The B2BUA's view of a bridge: SDP in, SDP out, synchronously.
pub struct BridgeSdp(pub Arc<BridgeShared>);

impl std::fmt::Debug for BridgeSdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BridgeSdp")
    }
}

impl SdpAdapter for BridgeSdp {
    fn offer(&self, from: Side, sdp: &[u8]) -> Result<Vec<u8>, String> {
        let r = self.0.bridge.lock().offer(from, sdp, Instant::now());
        self.0.kick();
        r
    }

    fn answer(&self, from: Side, sdp: &[u8]) -> Result<Vec<u8>, String> {
        let r = self.0.bridge.lock().answer(from, sdp, Instant::now());
        self.0.kick();
        r
    }
}

#[cfg(test)]
mod tests;
