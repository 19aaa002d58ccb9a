//! WebRTC legs: str0m terminates ICE (lite) and DTLS for a browser, and
//! SRTP until DTLS is up; from then on crossbar's own SRTP (`srtp`) carries
//! the leg's RTP, and str0m only its STUN, DTLS and RTCP. The bridge
//! moves G.711 / telephone-event RTP between it and the call's other
//! leg (plain RTP to a carrier or SIP phone, or another WebRTC leg), without
//! transcoding: the codec towards both parties is the same, with the same
//! payload type numbers, so packets pass as they are (only SRTP is added or
//! removed; towards a browser, a carrier's new stream continues the sequence
//! numbers of the one before, so that no SRTP index is used twice).
//!
//! [`Bridge`] is sans-IO: datagrams and timeouts in (each with `now`),
//! datagrams out ([`Bridge::poll_transmit`], into the caller's buffer). Once
//! crossbar's SRTP runs, a packet allocates nothing (the bridge's outbox keeps
//! its capacity); before, str0m allocates its SRTP output and the payload it
//! is handed. SDP goes through it synchronously
//! from the B2BUA ([`BridgeSdp`], a [`SdpAdapter`]): an offer from one side
//! becomes the offer to the other side, an answer from one side the answer to
//! the other. A browser's offer is only accepted (str0m `accept_offer`) once the
//! other side has answered, so that str0m answers the browser with exactly the
//! G.711 codec the other side chose. A media thread (`super::engine`) drives it:
//! datagrams, timeouts, sends; media never passes through an actor.
//!
//! Offers crossbar makes to a browser are str0m's: `UDP/TLS/RTP/SAVPF`, BUNDLE,
//! rtcp-mux, one host candidate at the configured public media address.
//!
//! **Late offer** (a carrier's INVITE without SDP, to a browser): crossbar
//! offers the browser PCMU, PCMA and telephone-event itself
//! ([`Bridge::late_offer`]); the browser's answer ([`Bridge::answer`]) gives
//! the plain offer for the carrier: the G.711 codec the browser chose, and
//! telephone-event if the browser took it (without it DTMF events could not
//! reach the browser anyway). The carrier's answer, in its ACK, only sets
//! where its RTP goes ([`Bridge::late_answer`]); it must keep the offered
//! G.711 codec, since packets pass without transcoding. A browser's INVITE
//! always has an offer: a late offer from a WebRTC leg is refused.
//!
//! An offer that changes nothing (a carrier's session refresh, a re-INVITE
//! repeating its offer) is not an error: as RFC 3264 §8 has it, the plain
//! party gets the same SDP with the same `o=` version when it is the same
//! (a changed one gets the next version), and a browser gets an offer of the
//! current session (same ICE credentials and fingerprint, `actpass`), so
//! neither ICE nor DTLS restarts.
//!
//! **RTCP.** Each side's RTCP ends at crossbar; none is passed through.
//! str0m runs the browser leg's RTCP itself and takes the browser's reports.
//! Since RTP bypasses str0m once crossbar's SRTP runs, str0m's own sender and
//! receiver reports no longer count those packets (a browser's statistics of
//! the leg lack round-trip time and remote loss; its audio is unaffected).
//! The carrier's reports describe another hop and
//! other SSRCs (its own, and crossbar's on the plain side): a browser ignores
//! report blocks for SSRCs it does not know, and its round-trip and loss
//! figures would be wrong if it took them, so there is nothing worth handing
//! over, and str0m has no API to send foreign RTCP anyway. The same holds the
//! other way for the browser's reports. What is lost is end-to-end quality
//! reporting across the bridge; crossbar's own counters ([`Bridge::stats`])
//! cover each hop. RTCP a plain party multiplexes on its RTP port is counted
//! as dropped, not relayed; RTCP to and from the plain party's RTCP port is
//! the driver's business (the plain relay in `relay.rs` passes it as is when
//! both sides are plain).

mod srtp;

use super::{FlowStats, RelayStats, Side};
use crate::sip::b2bua::SdpAdapter;
use parking_lot::Mutex;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::{Codec, FormatParams};
use str0m::media::{Direction, Frequency, MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{Extension, RtpWrite, SeqNo, Ssrc};
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

/// What crossbar offers a browser when the other party sent no offer: the
/// static G.711 payload types and telephone-event at 101, as carriers use it.
const LATE_OFFER_CODECS: [AudioCodec; 3] = [
    AudioCodec { pt: 0, format: AudioFormat::Pcmu },
    AudioCodec { pt: 8, format: AudioFormat::Pcma },
    AudioCodec { pt: 101, format: AudioFormat::TelephoneEvent },
];

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
            Some(last) => nearest_index(last, seq),
        };
        if self.last.is_none_or(|l| v > l) {
            self.last = Some(v);
        }
        v
    }
}

/// The 64-bit extension of `seq` closest to `near` (wrapping either way).
fn nearest_index(near: u64, seq: u16) -> u64 {
    let cand = (near & !0xffff) | seq as u64;
    [cand.wrapping_sub(0x1_0000), cand, cand + 0x1_0000].into_iter().filter(|c| *c < u64::MAX / 2).min_by_key(|c| c.abs_diff(near)).unwrap_or(cand)
}

struct WebRtcLeg {
    rtc: Option<Rtc>,
    /// Our host candidate: public media IP and this leg's port.
    candidate: SocketAddr,
    mid: Option<Mid>,
    /// Our send stream once negotiated: one map lookup per packet instead of a
    /// search by mid.
    tx_ssrc: Option<Ssrc>,
    /// Our offer to the browser, waiting for its answer.
    pending: Option<SdpPendingOffer>,
    /// The browser's offer, waiting for the other side's answer.
    offer_in: Option<String>,
    last_answer: Option<Vec<u8>>,
    seq: SeqExtender,
    /// The codecs str0m's session was built with (it is never rebuilt: a re-offer
    /// must keep one of its voice codecs).
    codecs: Vec<AudioCodec>,
    connected: bool,
    /// Where str0m's DTLS leaves the SRTP keys, until crossbar's SRTP takes over.
    keys: Option<Arc<srtp::KeySlot>>,
    /// crossbar's SRTP for this leg's RTP, once DTLS is up.
    own: Option<Box<OwnSrtp>>,
    /// The browser's address: where str0m sends DTLS and SRTCP, then where
    /// authenticated SRTP comes from.
    peer: Option<SocketAddr>,
    /// When the browser (`peer`) was last heard, while it is not [`QUIET`]: its
    /// socket is then connected to it (see [`Bridge::latched`]).
    heard: Option<Instant>,
    /// When str0m next wants `Input::Timeout` (valid while `!dirty`).
    timeout: Option<Instant>,
    /// str0m had input since its output was last drained to `Output::Timeout`.
    dirty: bool,
}

impl WebRtcLeg {
    fn new(candidate: SocketAddr) -> WebRtcLeg {
        WebRtcLeg { rtc: None, candidate, mid: None, tx_ssrc: None, pending: None, offer_in: None, last_answer: None, seq: SeqExtender::default(), codecs: Vec::new(), connected: false, keys: None, own: None, peer: None, heard: None, timeout: None, dirty: false }
    }

    /// Hands one RTP packet from the other party to str0m (which adds SRTP).
    /// False when this leg cannot send yet (ICE/DTLS not up, nothing negotiated).
    fn send_rtp(&mut self, h: &RtpFields, payload: Arc<[u8]>, now: Instant) -> bool {
        let (Some(rtc), true) = (self.rtc.as_mut(), self.connected) else { return false };
        let seq = SeqNo::from(self.seq.extend(h.seq));
        let mut api = rtc.direct_api();
        let tx = match self.tx_ssrc {
            Some(ssrc) => api.stream_tx(&ssrc),
            None => {
                let Some(mid) = self.mid else { return false };
                let tx = api.stream_tx_by_mid(mid, None);
                self.tx_ssrc = tx.as_ref().map(|t| t.ssrc());
                tx
            }
        };
        let Some(tx) = tx else { return false };
        tx.write_rtp(RtpWrite::new(h.pt.into(), seq, h.ts, now, payload).marker(h.marker));
        // str0m releases written packets to its pacer on a timeout: without this
        // the packet would wait for the next datagram or timer of this leg.
        if let Err(e) = rtc.handle_input(Input::Timeout(now)) {
            tracing::debug!("WebRTC timeout refused: {e}");
        }
        self.dirty = true;
        true
    }

    /// Starts the leg's str0m session with `codecs` (G.711 and telephone-event).
    fn open(&mut self, codecs: &[AudioCodec], now: Instant) -> Result<(), String> {
        let mut cfg = rtc_config();
        for c in codecs {
            let codec = match c.format {
                AudioFormat::Pcmu => Codec::PCMU,
                AudioFormat::Pcma => Codec::PCMA,
                AudioFormat::TelephoneEvent => Codec::Tele,
            };
            let format = if c.format == AudioFormat::TelephoneEvent { FormatParams { telephone_event_max: Some(16), ..Default::default() } } else { FormatParams::default() };
            cfg.codec_config().add_config(c.pt.into(), None, codec, Frequency::EIGHT_KHZ, None, format);
        }
        let (mut rtc, keys) = srtp::build_rtc(cfg, now);
        let cand = Candidate::host(self.candidate, "udp").map_err(|e| format!("bad media address {}: {e}", self.candidate))?;
        rtc.add_local_candidate(cand);
        self.rtc = Some(rtc);
        self.keys = keys;
        self.codecs = codecs.to_vec();
        Ok(())
    }

    /// Takes over the leg's RTP from str0m once DTLS has exported its keys
    /// and the send stream exists (see `srtp`).
    fn arm_own_srtp(&mut self) {
        if self.own.is_some() || !self.connected {
            return;
        }
        let (Some(slot), Some(rtc), Some(mid)) = (self.keys.as_ref(), self.rtc.as_mut(), self.mid) else { return };
        let ssrc = match self.tx_ssrc {
            Some(s) => s,
            None => match rtc.direct_api().stream_tx_by_mid(mid, None).map(|t| t.ssrc()) {
                Some(s) => {
                    self.tx_ssrc = Some(s);
                    s
                }
                None => return,
            },
        };
        let Some(keys) = slot.take() else { return };
        // The mid header extension, as str0m writes it on every packet (BUNDLE demultiplexing).
        let mut ext = [0u8; 24];
        let mut ext_len = 0;
        let mid_id = rtc.media(mid).and_then(|m| m.remote_extmap().id_of(Extension::RtpMid));
        let mid_bytes = mid.as_bytes();
        if let (Some(id), 1..=16) = (mid_id, mid_bytes.len()) {
            let words = (1 + mid_bytes.len()).div_ceil(4);
            ext[..4].copy_from_slice(&[0xbe, 0xde, 0, words as u8]);
            ext[4] = (id << 4) | (mid_bytes.len() as u8 - 1);
            ext[5..5 + mid_bytes.len()].copy_from_slice(mid_bytes);
            ext_len = 4 + 4 * words;
        }
        tracing::debug!(profile = ?keys.profile(), "WebRTC leg's RTP now runs on crossbar's SRTP");
        self.keys = None;
        // Continue where str0m's sending stopped (it used the same sequence extension).
        let highest = self.seq.last;
        self.own = Some(Box::new(OwnSrtp { tx: keys.sender(), rx: keys.receiver(), ssrc: *ssrc, ext, ext_len, from_ssrc: None, seq_shift: 0, highest, sent: u64::from(highest.is_some()) }));
    }

    /// Protects one RTP packet for the browser with crossbar's SRTP into `out`.
    ///
    /// The sequence number passes as it is, shifted only when the other
    /// party starts a new stream (a new SSRC, or the same one with numbers
    /// far from those sent, continues after the last number sent), and a
    /// packet index is never protected twice: a duplicate, or a packet older
    /// than the 64 last indices, is dropped. An SRTP index used twice would
    /// reuse an AES-GCM nonce.
    fn protect_own(&mut self, h: &RtpFields, payload: &[u8], out: &mut [u8]) -> OwnSend {
        if self.own.is_none() {
            self.arm_own_srtp();
        }
        let (Some(own), Some(dest)) = (self.own.as_mut(), self.peer) else { return OwnSend::NotReady };
        if own.from_ssrc != Some(h.ssrc) {
            if let (Some(_), Some(last)) = (own.from_ssrc, own.highest) {
                own.seq_shift = (last as u16).wrapping_add(1).wrapping_sub(h.seq);
            }
            own.from_ssrc = Some(h.ssrc);
        }
        let mut seq = h.seq.wrapping_add(own.seq_shift);
        let mut index = match own.highest {
            Some(top) => nearest_index(top, seq),
            None => self.seq.extend(seq),
        };
        match own.highest {
            Some(top) if index.abs_diff(top) > RESTART_AGE => {
                // Far from what was sent: a jump in the other party's numbering
                // (an SRTP receiver cannot follow 2^15 either way). Continue
                // after the last index sent.
                own.seq_shift = own.seq_shift.wrapping_add((top + 1).wrapping_sub(index) as u16);
                seq = h.seq.wrapping_add(own.seq_shift);
                index = top + 1;
                own.sent = (own.sent << 1) | 1;
                own.highest = Some(index);
            }
            Some(top) if index > top => {
                let shift = index - top;
                own.sent = if shift >= 64 { 1 } else { (own.sent << shift) | 1 };
                own.highest = Some(index);
            }
            Some(top) => {
                let age = top - index;
                if age >= 64 || own.sent & (1 << age) != 0 {
                    return OwnSend::Dropped;
                }
                own.sent |= 1 << age;
            }
            None => {
                own.highest = Some(index);
                own.sent = 1;
            }
        }
        let hlen = 12 + own.ext_len;
        let Some(head) = out.get_mut(..hlen) else { return OwnSend::Dropped };
        head[0] = if own.ext_len > 0 { 0x90 } else { 0x80 };
        head[1] = (h.pt & 0x7f) | if h.marker { 0x80 } else { 0 };
        head[2..4].copy_from_slice(&seq.to_be_bytes());
        head[4..8].copy_from_slice(&h.ts.to_be_bytes());
        head[8..12].copy_from_slice(&own.ssrc.to_be_bytes());
        head[12..].copy_from_slice(&own.ext[..own.ext_len]);
        match own.tx.protect(out, hlen, payload, own.ssrc, index) {
            Some(n) => OwnSend::Sent(dest, n),
            None => OwnSend::Dropped,
        }
    }

    /// Any change of str0m's state through the SDP API: its output must be drained.
    fn touched(&mut self) {
        self.dirty = true;
        self.tx_ssrc = None;
    }
}

/// crossbar's SRTP state of a browser leg.
struct OwnSrtp {
    tx: srtp::Sender,
    rx: srtp::Receiver,
    /// str0m's send stream SSRC, announced in its SDP.
    ssrc: u32,
    /// The RTP header extension written on each packet (the mid).
    ext: [u8; 24],
    ext_len: usize,
    /// The other party's current SSRC, and what is added to its sequence numbers.
    from_ssrc: Option<u32>,
    seq_shift: u16,
    /// Highest SRTP index sent; bit i of `sent`: index `highest - i` was sent.
    highest: Option<u64>,
    sent: u64,
}

/// A packet this far from the highest index sent to a browser, either way,
/// is taken for a jump in the other party's sequence numbers, not for a late
/// or lost-burst packet (20 s of 20 ms audio).
const RESTART_AGE: u64 = 1000;

/// How long a browser leg may go without a packet from its browser before its
/// socket is disconnected (see [`Bridge::latched`]). While connected, the kernel
/// refuses the browser's packets from any other address: this is how long media from
/// a browser whose NAT gave it a new port, or that changed networks, is lost before
/// its SRTP (or its ICE checks) from there get through. A talking browser sends every
/// 20 ms; a held one still sends RTCP and ICE consent checks every few seconds, so its
/// socket may come and go (two system calls each time), as it may on a pause in a
/// browser's sending longer than this: nothing is lost then.
const QUIET: Duration = Duration::from_millis(250);

/// What became of a packet for a browser leg.
enum OwnSend {
    /// Protected by crossbar: the datagram's destination and length.
    Sent(SocketAddr, usize),
    /// Not sent (a repeated or too old packet index, or no room).
    Dropped,
    /// The leg's RTP is still str0m's (DTLS not up, or no address yet).
    NotReady,
}

struct PlainLeg {
    local: SocketAddr,
    sdp_remote: Option<SocketAddr>,
    latched: Option<SocketAddr>,
    /// The last SDP sent to this party and its `o=` version: an SDP identical
    /// to it keeps that version (RFC 3264 §8), a changed one gets the next.
    sent: Option<(u64, Vec<u8>)>,
}

impl PlainLeg {
    /// The party's SDP address; a new one ends the latch (the party moved its media).
    fn set_remote(&mut self, addr: Option<SocketAddr>) {
        let addr = addr.filter(|a| !a.ip().is_unspecified() && a.port() != 0);
        if addr != self.sdp_remote {
            self.sdp_remote = addr;
            self.latched = None;
        }
    }

    /// Where its RTP goes: where the party really sends from (symmetric RTP), else its SDP.
    fn dest(&self) -> Option<SocketAddr> {
        self.latched.or(self.sdp_remote)
    }

    /// crossbar's SDP for this party, versioned against the last one it got.
    fn sdp(&mut self, codecs: &[AudioCodec], direction: Direction) -> Vec<u8> {
        let version = self.sent.as_ref().map_or(1, |(v, _)| *v);
        let mut body = plain_sdp(self.local, codecs, direction, version);
        if self.sent.as_ref().is_some_and(|(_, last)| *last != body) {
            body = plain_sdp(self.local, codecs, direction, version + 1);
            self.sent = Some((version + 1, body.clone()));
        } else if self.sent.is_none() {
            self.sent = Some((version, body.clone()));
        }
        body
    }
}

enum Leg {
    Plain(PlainLeg),
    WebRtc(Box<WebRtcLeg>),
}

/// The media of a call with at least one WebRTC leg (sans-IO).
///
/// Contract (str0m's): after each `handle_*`, `offer` or `answer`, call
/// [`Bridge::poll_transmit`] until it returns `None`, then [`Bridge::poll_timeout`].
pub struct Bridge {
    legs: [Leg; 2],
    stats: [FlowStats; 2],
    /// Datagrams of crossbar's own SRTP path, until `poll_transmit`.
    outbox: Outbox,
    /// RTP packets per side that crossbar's SRTP protected or unprotected
    /// (the side of the browser leg), rather than str0m.
    own_srtp: [u64; 2],
}

/// Datagrams made while handling input, in order; the buffers keep their
/// capacity, so a steady flow allocates nothing.
#[derive(Default)]
struct Outbox {
    bytes: Vec<u8>,
    queue: Vec<(Side, SocketAddr, usize, usize)>,
    next: usize,
}

/// Room for one datagram in the outbox.
const DATAGRAM_ROOM: usize = 2048;

impl Outbox {
    /// A zeroed buffer of `len` bytes at the end: `(its start, the buffer)`.
    fn reserve(&mut self, len: usize) -> (usize, &mut [u8]) {
        let start = self.bytes.len();
        self.bytes.resize(start + len, 0);
        (start, &mut self.bytes[start..])
    }

    /// Keeps the first `n` bytes reserved at `start` as a datagram for `dest`.
    fn commit(&mut self, start: usize, n: usize, side: Side, dest: SocketAddr) {
        self.bytes.truncate(start + n);
        self.queue.push((side, dest, start, n));
    }

    fn abandon(&mut self, start: usize) {
        self.bytes.truncate(start);
    }

    /// The next datagram, copied into `buf`.
    fn pop(&mut self, buf: &mut [u8]) -> Option<(Side, SocketAddr, usize)> {
        while let Some(&(side, dest, start, n)) = self.queue.get(self.next) {
            self.next += 1;
            match buf.get_mut(..n) {
                Some(b) => {
                    b.copy_from_slice(&self.bytes[start..start + n]);
                    return Some((side, dest, n));
                }
                None => tracing::debug!(len = n, "transmit buffer too small, datagram dropped"),
            }
        }
        if !self.queue.is_empty() {
            self.queue.clear();
            self.bytes.clear();
            self.next = 0;
        }
        None
    }
}

/// Sends one RTP packet (header fields `h`, `payload`) to the `other` leg
/// (on side `to`): written into the outbox when crossbar makes the datagram,
/// handed to str0m when the leg's SRTP is still str0m's. False if it cannot
/// go anywhere yet.
fn forward(outbox: &mut Outbox, own_srtp: &mut [u64; 2], other: &mut Leg, to: Side, h: &RtpFields, payload: &[u8], now: Instant) -> bool {
    match other {
        Leg::Plain(pl) => {
            let Some(dest) = pl.dest() else { return false };
            let (start, buf) = outbox.reserve(12 + payload.len());
            match write_plain_rtp(buf, h, payload) {
                Some(n) => {
                    outbox.commit(start, n, to, dest);
                    true
                }
                None => {
                    outbox.abandon(start);
                    false
                }
            }
        }
        Leg::WebRtc(w) => {
            // Header with the mid extension, payload, the longest tag.
            let (start, buf) = outbox.reserve(12 + 24 + payload.len() + 16);
            match w.protect_own(h, payload, buf) {
                OwnSend::Sent(dest, n) => {
                    outbox.commit(start, n, to, dest);
                    own_srtp[idx(to)] += 1;
                    true
                }
                OwnSend::Dropped => {
                    outbox.abandon(start);
                    false
                }
                OwnSend::NotReady => {
                    outbox.abandon(start);
                    w.send_rtp(h, Arc::from(payload), now)
                }
            }
        }
    }
}

/// RTP rather than RTCP (RFC 5761 §4), STUN or DTLS (RFC 7983).
fn is_rtp(d: &[u8]) -> bool {
    d.len() >= 12 && (128..192).contains(&d[0]) && !(64..96).contains(&(d[1] & 0x7f))
}

fn idx(side: Side) -> usize {
    match side {
        Side::A => 0,
        Side::B => 1,
    }
}

fn side_of(i: usize) -> Side {
    if i == 0 {
        Side::A
    } else {
        Side::B
    }
}

/// The two legs, the one at `i` first.
fn pair(legs: &mut [Leg; 2], i: usize) -> (&mut Leg, &mut Leg) {
    let [a, b] = legs;
    if i == 0 {
        (a, b)
    } else {
        (b, a)
    }
}

/// An offer for the session as it is, when the other party's offer changed
/// nothing (a session refresh, a repeated re-INVITE): RFC 3264 §8 re-offers
/// the current session. str0m only makes offers for changes, so the direction
/// goes away and back within one change set; the offer carries the current
/// direction, codecs, ICE credentials and fingerprint, and `a=setup:actpass`
/// (RFC 8842 §5.5). Going away first only to a direction that keeps sending
/// means str0m at most forgets its receive loss register (no NACK for G.711).
fn offer_unchanged(rtc: &mut Rtc, mid: Mid) -> Option<(SdpOffer, SdpPendingOffer)> {
    let current = rtc.media(mid)?.direction();
    let away = match current {
        Direction::SendRecv => Direction::SendOnly,
        _ => Direction::SendRecv,
    };
    let mut api = rtc.sdp_api();
    api.set_direction(mid, away);
    api.set_direction(mid, current);
    api.apply()
}

impl Bridge {
    /// `local[i]` is the advertised address of side i's RTP socket.
    pub fn new(kinds: [LegKind; 2], local: [SocketAddr; 2]) -> Bridge {
        let mk = |k: LegKind, l: SocketAddr| match k {
            LegKind::Plain => Leg::Plain(PlainLeg { local: l, sdp_remote: None, latched: None, sent: None }),
            LegKind::WebRtc => Leg::WebRtc(Box::new(WebRtcLeg::new(l))),
        };
        Bridge { legs: [mk(kinds[0], local[0]), mk(kinds[1], local[1])], stats: Default::default(), outbox: Outbox::default(), own_srtp: [0; 2] }
    }

    /// `from` sent an SDP offer: returns the offer for the other side.
    ///
    /// An offer that changes nothing (RFC 3264 §8: a session refresh, a repeated
    /// re-INVITE) still gets one: the plain party's SDP keeps its `o=` version
    /// when it is the same, a browser gets an offer of the current session.
    pub fn offer(&mut self, from: Side, sdp: &[u8], now: Instant) -> Result<Vec<u8>, String> {
        let text = std::str::from_utf8(sdp).map_err(|_| "SDP is not UTF-8".to_string())?;
        let desc = parse_audio(text)?;
        // Checked before anything changes: a refused re-offer leaves the call as it was.
        if let Leg::WebRtc(w) = &self.legs[idx(from.other())] {
            if w.rtc.is_some() && !shares_voice_codec(&desc.codecs, &w.codecs) {
                return Err(format!(
                    "the offer keeps none of the browser leg's codecs ({}): changing a browser leg's codec would need transcoding, which crossbar does not do",
                    codec_names(&w.codecs)
                ));
            }
        }
        match &mut self.legs[idx(from)] {
            Leg::Plain(p) => p.set_remote(desc.addr),
            Leg::WebRtc(w) => {
                SdpOffer::from_sdp_string(text).map_err(|e| format!("invalid WebRTC offer: {e}"))?;
                w.offer_in = Some(text.to_string());
            }
        }
        match &mut self.legs[idx(from.other())] {
            Leg::Plain(p) => Ok(p.sdp(&desc.codecs, desc.direction)),
            Leg::WebRtc(w) => {
                if w.rtc.is_none() {
                    w.open(&desc.codecs, now)?;
                }
                w.touched();
                let rtc = w.rtc.as_mut().expect("built above");
                let mut api = rtc.sdp_api();
                let (offer, pending) = match w.mid {
                    None => {
                        w.mid = Some(api.add_media(MediaKind::Audio, desc.direction, None, None, None));
                        api.apply().expect("adding media is a change")
                    }
                    Some(mid) => {
                        api.set_direction(mid, desc.direction);
                        match api.apply() {
                            Some(changed) => changed,
                            None => offer_unchanged(rtc, mid).ok_or_else(|| "the browser leg has no audio to offer".to_string())?,
                        }
                    }
                };
                w.pending = Some(pending);
                Ok(offer.to_sdp_string().into_bytes())
            }
        }
    }

    /// The party on the other side of `to` sent an INVITE without SDP:
    /// crossbar's own offer to `to`, a browser (PCMU, PCMA, telephone-event).
    /// The browser's answer goes to [`Bridge::answer`] as usual.
    pub fn late_offer(&mut self, to: Side, now: Instant) -> Result<Vec<u8>, String> {
        if matches!(self.legs[idx(to.other())], Leg::WebRtc(_)) {
            return Err("a WebRTC leg must send its SDP offer in the INVITE".into());
        }
        let Leg::WebRtc(w) = &mut self.legs[idx(to)] else {
            return Err("no WebRTC leg to make an offer to".into());
        };
        if w.rtc.is_some() {
            return Err("the browser leg already has a session".into());
        }
        w.open(&LATE_OFFER_CODECS, now)?;
        w.touched();
        let rtc = w.rtc.as_mut().expect("built above");
        let mut api = rtc.sdp_api();
        w.mid = Some(api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None));
        let (offer, pending) = api.apply().expect("adding media is a change");
        w.pending = Some(pending);
        Ok(offer.to_sdp_string().into_bytes())
    }

    /// `from`, a plain party that sent an INVITE without SDP, answered in its
    /// ACK the offer [`Bridge::answer`] made for it: its address is learnt;
    /// the answer must keep the offered G.711 codec (no transcoding).
    pub fn late_answer(&mut self, from: Side, sdp: &[u8]) -> Result<(), String> {
        let text = std::str::from_utf8(sdp).map_err(|_| "SDP is not UTF-8".to_string())?;
        let desc = parse_audio(text)?;
        let Leg::Plain(p) = &mut self.legs[idx(from)] else {
            return Err("a WebRTC leg must send its SDP offer in the INVITE".into());
        };
        let offered = p.sent.as_ref().and_then(|(_, body)| std::str::from_utf8(body).ok()).and_then(|t| parse_audio(t).ok());
        let Some(offered) = offered else {
            return Err("no offer was made to answer".into());
        };
        let voice = offered.codecs.iter().find(|c| c.format != AudioFormat::TelephoneEvent).copied().expect("parse_audio requires a G.711 codec");
        if !desc.codecs.contains(&voice) {
            return Err(format!("the answer drops the offered codec ({:?}, payload type {}): browser legs are bridged without transcoding", voice.format, voice.pt));
        }
        p.set_remote(desc.addr);
        Ok(())
    }

    /// `from` answered: returns the answer for the other side (the offerer).
    pub fn answer(&mut self, from: Side, sdp: &[u8], now: Instant) -> Result<Vec<u8>, String> {
        let text = std::str::from_utf8(sdp).map_err(|_| "SDP is not UTF-8".to_string())?;
        let desc = parse_audio(text)?;
        let chosen = choose(&desc.codecs);
        match &mut self.legs[idx(from)] {
            Leg::Plain(p) => p.set_remote(desc.addr),
            Leg::WebRtc(w) => {
                if let (Some(pending), Some(rtc)) = (w.pending.take(), w.rtc.as_mut()) {
                    let ans = SdpAnswer::from_sdp_string(text).map_err(|e| format!("invalid WebRTC answer: {e}"))?;
                    rtc.sdp_api().accept_answer(pending, ans).map_err(|e| format!("WebRTC answer not acceptable: {e}"))?;
                    w.touched();
                }
            }
        }
        match &mut self.legs[idx(from.other())] {
            Leg::Plain(p) => Ok(p.sdp(&chosen, desc.direction)),
            Leg::WebRtc(w) => {
                let Some(offer) = w.offer_in.take() else {
                    return w.last_answer.clone().ok_or_else(|| "no offer from the browser to answer".to_string());
                };
                if w.rtc.is_none() {
                    w.open(&chosen, now)?;
                }
                w.touched();
                let rtc = w.rtc.as_mut().expect("built above");
                let offer = SdpOffer::from_sdp_string(&offer).map_err(|e| format!("invalid WebRTC offer: {e}"))?;
                let answer = rtc.sdp_api().accept_offer(offer).map_err(|e| format!("WebRTC offer not acceptable: {e}"))?;
                let bytes = answer.to_sdp_string().into_bytes();
                if w.mid.is_none() {
                    w.mid = std::str::from_utf8(&bytes).ok().and_then(|s| parse_audio(s).ok()).and_then(|d| d.mid).map(|m| Mid::from(m.as_str()));
                }
                w.last_answer = Some(bytes.clone());
                Ok(bytes)
            }
        }
    }

    /// A datagram arrived on `side`'s socket from `from`.
    pub fn handle_receive(&mut self, side: Side, from: SocketAddr, data: &[u8], now: Instant) {
        let i = idx(side);
        let (this, other) = pair(&mut self.legs, i);
        match this {
            Leg::Plain(p) => {
                let Some((h, payload)) = parse_rtp(data) else {
                    self.stats[i].dropped += 1;
                    return;
                };
                // Symmetric RTP: answer where the party really sends from. The first
                // source wins until the party's SDP moves it, as in a plain relay: a
                // stranger's packets are dropped (the media thread then connects the
                // socket to the party, and the kernel drops them).
                match p.latched {
                    None => p.latched = Some(from),
                    Some(l) if l != from => {
                        self.stats[i].dropped += 1;
                        return;
                    }
                    Some(_) => {}
                }
                let sent = match other {
                    Leg::WebRtc(_) => forward(&mut self.outbox, &mut self.own_srtp, other, side.other(), &h, payload, now),
                    Leg::Plain(_) => false,
                };
                self.stats[i].count(sent, data.len());
            }
            Leg::WebRtc(w) if w.own.is_some() && is_rtp(data) => {
                let own = w.own.as_mut().expect("checked by the guard");
                // Decrypted straight into the outbox, where a plain packet for the other side is made in place.
                let (start, buf) = self.outbox.reserve(data.len());
                let n = match own.rx.unprotect(data, buf) {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::trace!(?side, ?e, "SRTP packet refused");
                        self.outbox.abandon(start);
                        self.stats[i].dropped += 1;
                        return;
                    }
                };
                // Authenticated: this is where the browser is now.
                w.peer = Some(from);
                w.heard = Some(now);
                self.own_srtp[i] += 1;
                let Some((h, payload)) = parse_rtp(&buf[..n]) else {
                    self.outbox.abandon(start);
                    self.stats[i].dropped += 1;
                    return;
                };
                let len = payload.len();
                let sent = match other {
                    Leg::Plain(pl) => match pl.dest() {
                        Some(dest) => {
                            let off = payload.as_ptr() as usize - buf.as_ptr() as usize;
                            buf.copy_within(off..off + len, 12);
                            write_plain_header(&mut buf[..12], &h);
                            self.outbox.commit(start, 12 + len, side.other(), dest);
                            true
                        }
                        None => {
                            self.outbox.abandon(start);
                            false
                        }
                    },
                    Leg::WebRtc(_) => {
                        // Browser to browser: the payload moves out of the outbox first.
                        let mut copy = [0u8; DATAGRAM_ROOM];
                        let kept = copy.get_mut(..len).map(|c| c.copy_from_slice(payload)).is_some();
                        self.outbox.abandon(start);
                        kept && forward(&mut self.outbox, &mut self.own_srtp, other, side.other(), &h, &copy[..len], now)
                    }
                };
                self.stats[i].count(sent, 12 + len);
            }
            Leg::WebRtc(w) => {
                let Some(rtc) = w.rtc.as_mut() else { return };
                let Ok(contents) = data.try_into() else { return };
                if w.own.is_some() && w.peer == Some(from) {
                    w.heard = Some(now);
                }
                let input = Input::Receive(now, Receive { proto: Protocol::Udp, source: from, destination: w.candidate, contents });
                if rtc.accepts(&input) {
                    if let Err(e) = rtc.handle_input(input) {
                        tracing::debug!(?side, "WebRTC input refused: {e}");
                    }
                    w.dirty = true;
                }
            }
        }
    }

    /// Time passed: feeds due timeouts to the WebRTC legs, and ends the latch of a
    /// browser that has gone [`QUIET`].
    pub fn handle_timeout(&mut self, now: Instant) {
        for leg in &mut self.legs {
            if let Leg::WebRtc(w) = leg {
                if w.heard.is_some_and(|h| h + QUIET <= now) {
                    w.heard = None;
                }
                if let Some(rtc) = w.rtc.as_mut() {
                    if w.timeout.is_none_or(|t| t <= now) {
                        let _ = rtc.handle_input(Input::Timeout(now));
                        w.dirty = true;
                    }
                }
            }
        }
    }

    /// The next datagram to send, written into `buf` (2048 bytes are always
    /// enough: str0m's MTU and any RTP a plain party can send over UDP):
    /// `(side whose socket sends it, destination, length)`. `None` once both
    /// legs are drained; call it until then after every input.
    pub fn poll_transmit(&mut self, buf: &mut [u8]) -> Option<(Side, SocketAddr, usize)> {
        if let Some(d) = self.outbox.pop(buf) {
            return Some(d);
        }
        loop {
            let i = self.legs.iter().position(|l| matches!(l, Leg::WebRtc(w) if w.dirty))?;
            let (this, other) = pair(&mut self.legs, i);
            let Leg::WebRtc(w) = this else { return None };
            let Some(rtc) = w.rtc.as_mut() else {
                w.dirty = false;
                continue;
            };
            match rtc.poll_output() {
                Ok(Output::Timeout(t)) => {
                    w.timeout = Some(t);
                    w.dirty = false;
                }
                Ok(Output::Transmit(t)) => match buf.get_mut(..t.contents.len()) {
                    Some(out) => {
                        // STUN answers go wherever a check came from. DTLS and SRTCP go to
                        // str0m's selected pair, unless the browser's SRTP was heard from
                        // elsewhere lately: the browser moved there (new network), and
                        // str0m keeps its old pair, if that has the higher priority,
                        // until that pair times out.
                        let mut dest = t.destination;
                        if t.contents.first().is_some_and(|b| *b >= 20) {
                            match (w.heard, w.peer) {
                                (Some(_), Some(peer)) => dest = peer,
                                _ => w.peer = Some(dest),
                            }
                        }
                        out.copy_from_slice(&t.contents);
                        return Some((side_of(i), dest, t.contents.len()));
                    }
                    None => tracing::debug!(len = t.contents.len(), "transmit buffer too small, datagram dropped"),
                },
                Ok(Output::Event(Event::RtpPacket(p))) => {
                    let h = RtpFields { pt: *p.header.payload_type, seq: p.header.sequence_number, ts: p.header.timestamp, marker: p.header.marker, ssrc: *p.header.ssrc };
                    let len = 12 + p.payload.len();
                    match other {
                        Leg::Plain(pl) => {
                            let dest = pl.dest();
                            let n = dest.and_then(|_| write_plain_rtp(buf, &h, &p.payload));
                            self.stats[i].count(n.is_some(), len);
                            if let (Some(dest), Some(n)) = (dest, n) {
                                return Some((side_of(i).other(), dest, n));
                            }
                        }
                        Leg::WebRtc(o) => {
                            // The packet's arrival time is this work's `now`.
                            let sent = o.send_rtp(&h, p.payload, p.timestamp);
                            self.stats[i].count(sent, len);
                        }
                    }
                }
                Ok(Output::Event(e)) => match e {
                    Event::Connected => {
                        w.connected = true;
                        w.arm_own_srtp();
                        tracing::debug!(side = ?side_of(i), "WebRTC leg connected (ICE + DTLS)");
                    }
                    Event::IceConnectionStateChange(s) => tracing::debug!(side = ?side_of(i), ?s, "WebRTC ICE state"),
                    Event::MediaAdded(m) if w.mid.is_none() => w.mid = Some(m.mid),
                    _ => {}
                },
                Err(e) => {
                    tracing::debug!(side = ?side_of(i), "WebRTC leg error: {e}");
                    w.dirty = false;
                }
            }
        }
    }

    /// The address the party on `side` is latched to; the media thread connects that
    /// leg's socket to it (no route lookup per send, no stranger heard). A plain
    /// party: where its RTP really comes from, and where it goes, from its first
    /// packet until its SDP moves it. A browser: its ICE-selected address once its
    /// SRTP is up, while it is heard; after [`QUIET`] without a packet from it, None
    /// (the socket hears anyone again), so that a browser whose network changed can
    /// complete ICE checks from its new address and move the call there.
    pub fn latched(&self, side: Side) -> Option<SocketAddr> {
        match &self.legs[idx(side)] {
            Leg::Plain(p) => p.latched,
            Leg::WebRtc(w) => w.heard.and(w.peer),
        }
    }

    /// The earliest time a WebRTC leg needs [`Bridge::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.legs
            .iter()
            .filter_map(|l| match l {
                Leg::WebRtc(w) if w.rtc.is_some() => match (w.timeout, w.heard) {
                    (Some(t), Some(h)) => Some(t.min(h + QUIET)),
                    (t, h) => t.or(h.map(|h| h + QUIET)),
                },
                _ => None,
            })
            .min()
    }

    /// RTP packets of `side`'s browser leg that crossbar's own SRTP carried
    /// (both directions), rather than str0m.
    pub fn own_srtp_packets(&self, side: Side) -> u64 {
        self.own_srtp[idx(side)]
    }

    pub fn is_connected(&self, side: Side) -> bool {
        matches!(&self.legs[idx(side)], Leg::WebRtc(w) if w.connected)
    }

    pub fn stats(&self) -> RelayStats {
        RelayStats { a_to_b_rtp: self.stats[0], b_to_a_rtp: self.stats[1], own_srtp_packets: self.own_srtp[0] + self.own_srtp[1], ..Default::default() }
    }
}

/// Whether `offered` keeps one of `session`'s voice codecs (format and payload type).
fn shares_voice_codec(offered: &[AudioCodec], session: &[AudioCodec]) -> bool {
    offered.iter().any(|c| c.format != AudioFormat::TelephoneEvent && session.contains(c))
}

fn codec_names(codecs: &[AudioCodec]) -> String {
    let names: Vec<String> = codecs.iter().filter(|c| c.format != AudioFormat::TelephoneEvent).map(|c| format!("{:?}/{}", c.format, c.pt)).collect();
    names.join(", ")
}

/// str0m's configuration for a browser leg: what a G.711 relay needs and no more.
///
/// RTP mode: packets pass as they are, no depacketising. Of the RTP header
/// extensions only `mid` (BUNDLE demultiplexing): str0m's default map also
/// negotiates transport-wide congestion control, whose feedback (an RTCP
/// packet every ~60 ms each way, str0m's heaviest per-packet work in
/// `examples/bridge_cost.rs`) feeds a bandwidth estimate a fixed-rate G.711
/// relay never uses; abs-send-time and audio-level would be written on every
/// packet for nobody. Stats events stay off (str0m's default), and G.711 is
/// configured without RTX/NACK.
fn rtc_config() -> RtcConfig {
    RtcConfig::new().set_ice_lite(true).set_rtp_mode(true).clear_codecs().clear_extension_map().set_extension(4, Extension::RtpMid)
}

impl FlowStats {
    fn count(&mut self, relayed: bool, len: usize) {
        if relayed {
            self.packets += 1;
            self.bytes += len as u64;
        } else {
            self.dropped += 1;
        }
    }
}

/// The RTP header fields the bridge carries from one leg to the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RtpFields {
    pt: u8,
    seq: u16,
    ts: u32,
    marker: bool,
    ssrc: u32,
}

/// Writes a plain RTP packet (12-byte header, no CSRC or extension) into `buf`:
/// its length, or `None` if it does not fit.
fn write_plain_rtp(buf: &mut [u8], h: &RtpFields, payload: &[u8]) -> Option<usize> {
    let n = 12 + payload.len();
    let out = buf.get_mut(..n)?;
    write_plain_header(&mut out[..12], h);
    out[12..].copy_from_slice(payload);
    Some(n)
}

/// The 12-byte header of a plain RTP packet.
fn write_plain_header(out: &mut [u8], h: &RtpFields) {
    out[0] = 0x80;
    out[1] = (h.pt & 0x7f) | if h.marker { 0x80 } else { 0 };
    out[2..4].copy_from_slice(&h.seq.to_be_bytes());
    out[4..8].copy_from_slice(&h.ts.to_be_bytes());
    out[8..12].copy_from_slice(&h.ssrc.to_be_bytes());
}

/// A plain RTP packet's header fields and payload (CSRCs, extension and padding skipped).
fn parse_rtp(d: &[u8]) -> Option<(RtpFields, &[u8])> {
    if d.len() < 12 || d[0] >> 6 != 2 {
        return None;
    }
    let pt = d[1] & 0x7f;
    if (64..96).contains(&pt) {
        return None; // RTCP (RFC 5761 §4) on the RTP port
    }
    let off = srtp::rtp_header_len(d)?;
    let mut end = d.len();
    if d[0] & 0x20 != 0 {
        end = end.checked_sub(*d.last()? as usize)?;
    }
    if off > end {
        return None;
    }
    let h = RtpFields {
        pt,
        seq: u16::from_be_bytes([d[2], d[3]]),
        ts: u32::from_be_bytes([d[4], d[5], d[6], d[7]]),
        marker: d[1] & 0x80 != 0,
        ssrc: u32::from_be_bytes([d[8], d[9], d[10], d[11]]),
    };
    Some((h, &d[off..end]))
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

    fn late_offer(&self, to: Side) -> Result<Vec<u8>, String> {
        let r = self.0.bridge.lock().late_offer(to, Instant::now());
        self.0.kick();
        r
    }

    fn late_answer(&self, from: Side, sdp: &[u8]) -> Result<(), String> {
        let r = self.0.bridge.lock().late_answer(from, sdp);
        self.0.kick();
        r
    }
}

#[cfg(test)]
mod tests;
