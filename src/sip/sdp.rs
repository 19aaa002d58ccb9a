//! SDP (RFC 4566 / 8866) parsing and the rewrites crossbar applies when it anchors media.
//!
//! Hand-written and line-based on purpose: SDP is a list of `x=value` lines, and a B2BUA
//! must pass through every line it does not understand, unchanged and in order. The
//! parser keeps each line's raw bytes (values need not be UTF-8) and extracts only what
//! crossbar needs (o=, c=, m=, a=rtpmap, a=rtcp, direction attributes).
//!
//! It never panics on input: all indexing is checked and numbers are parsed with
//! `str::parse`.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Largest SDP accepted; far above any real offer, it bounds work on hostile input.
const MAX_SDP_LEN: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SdpError {
    // The messages are fixed text (never echo input) so they can go into a SIP Warning
    // header without quoting or header-injection concerns.
    #[error("SDP body is empty")]
    Empty,
    #[error("SDP body too large")]
    TooLarge,
    #[error("SDP syntax error on line {line}: {what}")]
    Syntax { line: usize, what: &'static str },
    #[error("SDP has no o= line")]
    MissingOrigin,
    #[error("SDP has no audio stream")]
    NoAudio,
    #[error("incompatible media: PCMU or PCMA required")]
    NoCommonCodec,
}

impl SdpError {
    /// The SIP status to reject an offer with: 488 for media we cannot accept, 400 for a
    /// malformed body.
    pub fn sip_status(&self) -> u16 {
        match self {
            SdpError::NoAudio | SdpError::NoCommonCodec => 488,
            _ => 400,
        }
    }
}

/// Media direction (RFC 4566 §6 / RFC 3264 §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    SendRecv,
    SendOnly,
    RecvOnly,
    Inactive,
}

impl Direction {
    fn from_attr(name: &[u8]) -> Option<Direction> {
        match name {
            b"sendrecv" => Some(Direction::SendRecv),
            b"sendonly" => Some(Direction::SendOnly),
            b"recvonly" => Some(Direction::RecvOnly),
            b"inactive" => Some(Direction::Inactive),
            _ => None,
        }
    }

    /// The direction once the party said it will not receive (c=0.0.0.0, RFC 2543 hold).
    fn without_recv(self) -> Direction {
        match self {
            Direction::SendRecv | Direction::SendOnly => Direction::SendOnly,
            Direction::RecvOnly | Direction::Inactive => Direction::Inactive,
        }
    }

    /// True when the party does not want to receive media (hold, one form or another).
    pub fn is_hold(self) -> bool {
        matches!(self, Direction::SendOnly | Direction::Inactive)
    }
}

/// One `x=value` line; `value` is the raw bytes after `=`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    kind: u8,
    value: Vec<u8>,
}

/// A c= line's address: None for a non-IP-literal (FQDN) address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Conn {
    addr: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct RtpMap {
    pt: String,
    encoding: String,
    clock: Option<u32>,
}

/// One m= section, starting at line `m_line` of `Sdp::lines` and running to the next m=.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Media {
    m_line: usize,
    kind: String,
    port: u16,
    proto: String,
    fmts: Vec<String>,
    conn: Option<Conn>,
    direction: Option<Direction>,
    /// a=rtcp: port and optional address.
    rtcp: Option<(u16, Option<IpAddr>)>,
    rtpmaps: Vec<RtpMap>,
}

impl Media {
    fn is_audio(&self) -> bool {
        self.kind.eq_ignore_ascii_case("audio")
    }

    fn rtpmap(&self, pt: &str) -> Option<&RtpMap> {
        self.rtpmaps.iter().find(|m| m.pt == pt)
    }

    /// Encoding name and clock rate of a payload type: a=rtpmap first, else the static
    /// assignments of RFC 3551 that matter here.
    fn encoding(&self, pt: &str) -> Option<(&str, Option<u32>)> {
        if let Some(m) = self.rtpmap(pt) {
            return Some((m.encoding.as_str(), m.clock));
        }
        match pt {
            "0" => Some(("PCMU", Some(8000))),
            "8" => Some(("PCMA", Some(8000))),
            _ => None,
        }
    }
}

/// A parsed session description that remembers every line, known or not, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sdp {
    lines: Vec<Line>,
    origin: usize,
    session_conn: Option<Conn>,
    session_direction: Option<Direction>,
    media: Vec<Media>,
}

impl Sdp {
    /// Parses an SDP body. Accepts `\r\n` or bare `\n` line ends; ignores empty lines.
    pub fn parse(body: &[u8]) -> Result<Sdp, SdpError> {
        if body.len() > MAX_SDP_LEN {
            return Err(SdpError::TooLarge);
        }
        let mut lines = Vec::new();
        for (n, raw) in body.split(|&b| b == b'\n').enumerate() {
            let lineno = n + 1;
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            if raw.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            let (kind, value) = match raw {
                [k, b'=', value @ ..] if k.is_ascii_lowercase() => (*k, value),
                _ => {
                    return Err(SdpError::Syntax {
                        line: lineno,
                        what: "expected <letter>=<value>",
                    })
                }
            };
            // A stray CR or other control byte would corrupt the CRLF framing of what we
            // write out; tab is tolerated.
            if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
                return Err(SdpError::Syntax {
                    line: lineno,
                    what: "control character in line",
                });
            }
            lines.push((
                lineno,
                Line {
                    kind,
                    value: value.to_vec(),
                },
            ));
        }
        if lines.is_empty() {
            return Err(SdpError::Empty);
        }
        match lines.first() {
            Some((_, l)) if l.kind == b'v' && l.value.as_slice() == b"0" => {}
            Some((lineno, _)) => {
                return Err(SdpError::Syntax {
                    line: *lineno,
                    what: "first line must be v=0",
                })
            }
            None => return Err(SdpError::Empty),
        }

        let mut origin = None;
        let mut session_conn = None;
        let mut session_direction = None;
        let mut media: Vec<Media> = Vec::new();
        for (idx, (lineno, line)) in lines.iter().enumerate() {
            let lineno = *lineno;
            let syntax = |what| SdpError::Syntax { line: lineno, what };
            match line.kind {
                b'o' if media.is_empty() => {
                    if origin.is_some() {
                        return Err(syntax("more than one o= line"));
                    }
                    if tokens(&line.value).count() != 6 {
                        return Err(syntax("o= needs 6 fields"));
                    }
                    origin = Some(idx);
                }
                b'c' => {
                    let conn =
                        parse_conn(&line.value).ok_or_else(|| syntax("malformed c= line"))?;
                    match media.last_mut() {
                        Some(m) => m.conn = Some(conn),
                        None => session_conn = Some(conn),
                    }
                }
                b'm' => {
                    let m =
                        parse_media(&line.value, idx).ok_or_else(|| syntax("malformed m= line"))?;
                    media.push(m);
                }
                b'a' => {
                    let (name, val) = split_attr(&line.value);
                    if let Some(d) = Direction::from_attr(name) {
                        match media.last_mut() {
                            Some(m) => m.direction = Some(d),
                            None => session_direction = Some(d),
                        }
                    } else if let Some(m) = media.last_mut() {
                        // Malformed rtpmap/rtcp values are kept as unknown lines rather
                        // than failing the call: the codec then just counts as unknown.
                        match (name, val) {
                            (b"rtpmap", Some(v)) => {
                                if let Some(map) = parse_rtpmap(v) {
                                    m.rtpmaps.push(map);
                                }
                            }
                            (b"rtcp", Some(v)) => m.rtcp = parse_rtcp(v),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        let origin = origin.ok_or(SdpError::MissingOrigin)?;
        Ok(Sdp {
            lines: lines.into_iter().map(|(_, l)| l).collect(),
            origin,
            session_conn,
            session_direction,
            media,
        })
    }

    /// The body again, every line as parsed, CRLF-terminated.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.lines.iter().map(|l| l.value.len() + 4).sum());
        for l in &self.lines {
            push_line(&mut out, l.kind, &l.value);
        }
        out
    }

    fn first_audio(&self) -> Option<&Media> {
        self.media.iter().find(|m| m.is_audio())
    }

    /// The address the first audio stream's connection (media-level c= else session c=).
    fn audio_conn_addr(&self, m: &Media) -> Option<IpAddr> {
        m.conn.or(self.session_conn).and_then(|c| c.addr)
    }

    /// Where the offerer/answerer receives audio RTP: first audio m= line's port and its
    /// connection address. None when the stream is disabled (port 0), the address is on
    /// hold (0.0.0.0 / ::) or not an IP literal: there is nowhere to send to.
    pub fn audio_rtp(&self) -> Option<SocketAddr> {
        let m = self.first_audio()?;
        let ip = self.audio_conn_addr(m)?;
        if m.port == 0 || ip.is_unspecified() {
            return None;
        }
        Some(SocketAddr::new(ip, m.port))
    }

    /// The audio stream's explicit RTCP address (a=rtcp:, RFC 3605); None when absent
    /// (RTCP then goes to RTP port + 1).
    pub fn audio_rtcp(&self) -> Option<SocketAddr> {
        let m = self.first_audio()?;
        let (port, addr) = m.rtcp?;
        let ip = addr.or_else(|| self.audio_conn_addr(m))?;
        if port == 0 || ip.is_unspecified() {
            return None;
        }
        Some(SocketAddr::new(ip, port))
    }

    /// Direction of the first audio stream: media-level attribute, else session-level,
    /// else sendrecv. A connection address of 0.0.0.0 (RFC 2543 hold) removes the receive
    /// half; a disabled stream (port 0) is inactive.
    pub fn direction(&self) -> Direction {
        let Some(m) = self.first_audio() else {
            return self.session_direction.unwrap_or(Direction::SendRecv);
        };
        if m.port == 0 {
            return Direction::Inactive;
        }
        let d = m
            .direction
            .or(self.session_direction)
            .unwrap_or(Direction::SendRecv);
        match self.audio_conn_addr(m) {
            Some(ip) if ip.is_unspecified() => d.without_recv(),
            _ => d,
        }
    }

    /// Payload types of the first audio m= line, in order (for logs and CDRs).
    pub fn audio_payload_types(&self) -> Vec<String> {
        self.first_audio()
            .map(|m| m.fmts.clone())
            .unwrap_or_default()
    }

    /// Rewrites an offer passing through crossbar so the receiving party sends media to
    /// `local`: o=/c= addresses and the audio port become ours, the audio codecs are cut
    /// down to PCMU, PCMA and telephone-event (offerer's order kept), other streams are
    /// rejected (port 0). Everything else is passed through.
    pub fn rewrite_offer(&self, local: SocketAddr) -> Result<Vec<u8>, SdpError> {
        let audio = self.first_audio().ok_or(SdpError::NoAudio)?;
        let keep: Vec<&str> = audio
            .fmts
            .iter()
            .map(String::as_str)
            .filter(|pt| match audio.encoding(pt) {
                Some((enc, clock)) => {
                    let at_8k = clock.is_none_or(|c| c == 8000);
                    (enc.eq_ignore_ascii_case("PCMU")
                        || enc.eq_ignore_ascii_case("PCMA")
                        // DTMF events at another clock rate are useless with G.711.
                        || enc.eq_ignore_ascii_case("telephone-event"))
                        && at_8k
                }
                None => false,
            })
            .collect();
        let has_voice = keep.iter().any(|pt| {
            audio.encoding(pt).is_some_and(|(enc, _)| {
                enc.eq_ignore_ascii_case("PCMU") || enc.eq_ignore_ascii_case("PCMA")
            })
        });
        if !has_voice {
            return Err(SdpError::NoCommonCodec);
        }
        Ok(self.rewrite(local, audio, Some(&keep)))
    }

    /// Rewrites an answer passing through crossbar: the same address rewrite as
    /// [`Sdp::rewrite_offer`], keeping the codecs the answerer chose.
    pub fn rewrite_answer(&self, local: SocketAddr) -> Result<Vec<u8>, SdpError> {
        let audio = self.first_audio().ok_or(SdpError::NoAudio)?;
        Ok(self.rewrite(local, audio, None))
    }

    /// `keep`: the audio payload types to keep (offer), or None to keep all (answer).
    fn rewrite(&self, local: SocketAddr, audio: &Media, keep: Option<&[&str]>) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.to_bytes_len() + 64);
        let addrtype = match local.ip() {
            IpAddr::V4(_) => "IP4",
            IpAddr::V6(_) => "IP6",
        };
        let unspecified = match local.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        // Without a session-level c= the audio section must get its own.
        let audio_needs_conn = self.session_conn.is_none() && audio.conn.is_none();
        // Reused for every rewritten line; values are written as bytes so non-UTF-8
        // fields (o= username) pass through unchanged.
        let mut buf: Vec<u8> = Vec::with_capacity(128);
        let mut next_media = 0;
        let mut section: Option<&Media> = None;
        let mut conn_pending = false;
        for (idx, line) in self.lines.iter().enumerate() {
            if let Some(m) = self.media.get(next_media).filter(|m| m.m_line == idx) {
                if conn_pending {
                    push_conn(&mut out, &mut buf, addrtype, local.ip());
                    conn_pending = false;
                }
                section = Some(m);
                next_media += 1;
            }
            let in_audio = section.is_some_and(|m| m.m_line == audio.m_line);
            // RFC 4566 order is m=, i=, c=: an inserted c= goes before the first line
            // of the audio section that is not m= or i=.
            if conn_pending && line.kind != b'i' {
                push_conn(&mut out, &mut buf, addrtype, local.ip());
                conn_pending = false;
            }
            match line.kind {
                b'o' if idx == self.origin => {
                    buf.clear();
                    for (i, t) in tokens(&line.value).take(4).enumerate() {
                        if i > 0 {
                            buf.push(b' ');
                        }
                        buf.extend_from_slice(t);
                    }
                    let _ = write!(buf, " {addrtype} {}", local.ip());
                    push_line(&mut out, b'o', &buf);
                }
                b'c' => {
                    // A hold address (0.0.0.0) stays a hold address: replacing it would
                    // take the hold away from the other party.
                    let held = parse_conn(&line.value)
                        .and_then(|c| c.addr)
                        .is_some_and(|a| a.is_unspecified());
                    let ip = if held { unspecified } else { local.ip() };
                    push_conn(&mut out, &mut buf, addrtype, ip);
                }
                b'm' => {
                    let Some(m) = section.filter(|m| m.m_line == idx) else {
                        push_line(&mut out, line.kind, &line.value);
                        continue;
                    };
                    buf.clear();
                    let _ = write!(buf, "{} ", m.kind);
                    if in_audio && m.port != 0 {
                        let _ = write!(buf, "{}", local.port());
                    } else {
                        // Disabled streams stay disabled; other streams are not anchored,
                        // so they are rejected.
                        buf.push(b'0');
                    }
                    let _ = write!(buf, " {}", m.proto);
                    let fmts: Vec<&str> = match keep {
                        Some(keep) if in_audio => keep.to_vec(),
                        _ => m.fmts.iter().map(String::as_str).collect(),
                    };
                    for f in fmts {
                        buf.push(b' ');
                        buf.extend_from_slice(f.as_bytes());
                    }
                    push_line(&mut out, b'm', &buf);
                    if in_audio && audio_needs_conn {
                        conn_pending = true;
                    }
                }
                b'a' => {
                    let (name, val) = split_attr(&line.value);
                    if in_audio {
                        if let (Some(keep), b"rtpmap" | b"fmtp" | b"rtcp-fb", Some(v)) =
                            (keep, name, val)
                        {
                            let pt = first_token(v);
                            // a=rtcp-fb:* applies to all payload types and stays.
                            if pt != b"*" && !keep.iter().any(|k| k.as_bytes() == pt) {
                                continue;
                            }
                        }
                    }
                    if name == b"rtcp" && val.is_some() {
                        // The party's RTCP address must not leak through; ours is RTP + 1.
                        buf.clear();
                        let _ = write!(
                            buf,
                            "rtcp:{} IN {addrtype} {}",
                            local.port().saturating_add(1),
                            local.ip()
                        );
                        push_line(&mut out, b'a', &buf);
                        continue;
                    }
                    push_line(&mut out, b'a', &line.value);
                }
                _ => push_line(&mut out, line.kind, &line.value),
            }
        }
        if conn_pending {
            push_conn(&mut out, &mut buf, addrtype, local.ip());
        }
        out
    }

    fn to_bytes_len(&self) -> usize {
        self.lines.iter().map(|l| l.value.len() + 4).sum()
    }
}

fn push_line(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    out.push(kind);
    out.push(b'=');
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn push_conn(out: &mut Vec<u8>, buf: &mut Vec<u8>, addrtype: &str, ip: IpAddr) {
    buf.clear();
    let _ = write!(buf, "IN {addrtype} {ip}");
    push_line(out, b'c', buf);
}

/// Space-separated fields (tabs and repeated spaces tolerated).
fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|b| *b == b' ' || *b == b'\t')
        .filter(|t| !t.is_empty())
}

fn first_token(v: &[u8]) -> &[u8] {
    tokens(v).next().unwrap_or_default()
}

fn ascii(t: &[u8]) -> Option<&str> {
    std::str::from_utf8(t).ok().filter(|s| s.is_ascii())
}

/// `a=name:value` → (name, Some(value)); `a=flag` → (flag, None).
fn split_attr(v: &[u8]) -> (&[u8], Option<&[u8]>) {
    match v.iter().position(|&b| b == b':') {
        Some(i) => (&v[..i], Some(&v[i + 1..])),
        None => (v, None),
    }
}

/// `IN IP4 <addr>[/ttl[/n]]` or `IN IP6 <addr>[/n]`.
fn parse_conn(v: &[u8]) -> Option<Conn> {
    let mut t = tokens(v);
    let (nettype, addrtype, addr) = (t.next()?, t.next()?, t.next()?);
    if nettype != b"IN" || t.next().is_some() {
        return None;
    }
    let addr = ascii(addr)?;
    let host = addr.split('/').next().unwrap_or(addr);
    let ip: Option<IpAddr> = match addrtype {
        b"IP4" => host.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
        b"IP6" => host.parse::<Ipv6Addr>().ok().map(IpAddr::V6),
        _ => return None,
    };
    // An FQDN is legal SDP but useless for media; it parses, with no address.
    Some(Conn { addr: ip })
}

/// `<media> <port>[/<count>] <proto> <fmt> ...`
fn parse_media(v: &[u8], m_line: usize) -> Option<Media> {
    let mut t = tokens(v);
    let kind = ascii(t.next()?)?.to_owned();
    let port_field = ascii(t.next()?)?;
    let port = port_field
        .split('/')
        .next()
        .unwrap_or(port_field)
        .parse::<u16>()
        .ok()?;
    let proto = ascii(t.next()?)?.to_owned();
    let fmts = t
        .map(|f| ascii(f).map(str::to_owned))
        .collect::<Option<Vec<_>>>()?;
    Some(Media {
        m_line,
        kind,
        port,
        proto,
        fmts,
        conn: None,
        direction: None,
        rtcp: None,
        rtpmaps: Vec::new(),
    })
}

/// `<pt> <encoding>/<clock>[/<channels>]`
fn parse_rtpmap(v: &[u8]) -> Option<RtpMap> {
    let mut t = tokens(v);
    let pt = ascii(t.next()?)?.to_owned();
    let enc = ascii(t.next()?)?;
    let mut parts = enc.split('/');
    let encoding = parts.next()?.to_owned();
    let clock = parts.next().and_then(|c| c.parse::<u32>().ok());
    Some(RtpMap {
        pt,
        encoding,
        clock,
    })
}

/// `<port> [IN IP4|IP6 <addr>]` (RFC 3605).
fn parse_rtcp(v: &[u8]) -> Option<(u16, Option<IpAddr>)> {
    let mut t = tokens(v);
    let port = ascii(t.next()?)?.parse::<u16>().ok()?;
    let rest: Vec<&[u8]> = t.collect();
    if rest.is_empty() {
        return Some((port, None));
    }
    let joined = rest.join(&b' ');
    let conn = parse_conn(&joined)?;
    Some((port, conn.addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn crlf(s: &str) -> Vec<u8> {
        s.lines()
            .map(str::trim_start)
            .filter(|l| !l.is_empty())
            .flat_map(|l| l.bytes().chain(*b"\r\n"))
            .collect()
    }

    fn text(b: &[u8]) -> String {
        String::from_utf8(b.to_vec()).expect("test output is UTF-8")
    }

    fn local4() -> SocketAddr {
        "198.51.100.7:40000".parse().unwrap()
    }

    const SIPP_OFFER: &str = "v=0
        o=user1 53655765 2353687637 IN IP4 127.0.1.1
        s=-
        c=IN IP4 127.0.1.1
        t=0 0
        m=audio 6000 RTP/AVP 0
        a=rtpmap:0 PCMU/8000
    ";

    const CARRIER_OFFER: &str = "v=0
        o=- 1234567 1 IN IP4 203.0.113.5
        s=SBC call
        c=IN IP4 203.0.113.5
        t=0 0
        m=audio 20000 RTP/AVP 0 8 18 101
        a=rtpmap:0 PCMU/8000
        a=rtpmap:8 PCMA/8000
        a=rtpmap:18 G729/8000
        a=fmtp:18 annexb=no
        a=rtpmap:101 telephone-event/8000
        a=fmtp:101 0-16
        a=x-carrier-thing:keep me
        a=ptime:20
        a=sendrecv
    ";

    #[test]
    fn sipp_offer() {
        let sdp = Sdp::parse(&crlf(SIPP_OFFER)).unwrap();
        assert_eq!(sdp.audio_rtp(), Some("127.0.1.1:6000".parse().unwrap()));
        assert_eq!(sdp.audio_rtcp(), None);
        assert_eq!(sdp.direction(), Direction::SendRecv);
        let out = text(&sdp.rewrite_offer(local4()).unwrap());
        assert_eq!(
            out,
            "v=0\r\no=user1 53655765 2353687637 IN IP4 198.51.100.7\r\ns=-\r\n\
             c=IN IP4 198.51.100.7\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n\
             a=rtpmap:0 PCMU/8000\r\n"
        );
        let again = Sdp::parse(out.as_bytes()).unwrap();
        assert_eq!(again.audio_rtp(), Some(local4()));
    }

    #[test]
    fn round_trip_is_faithful() {
        let body = crlf(CARRIER_OFFER);
        assert_eq!(Sdp::parse(&body).unwrap().to_bytes(), body);
        // Bare LF in, CRLF out.
        let lf = CARRIER_OFFER
            .lines()
            .map(str::trim_start)
            .filter(|l| !l.is_empty())
            .map(|l| format!("{l}\n"))
            .collect::<String>();
        assert_eq!(Sdp::parse(lf.as_bytes()).unwrap().to_bytes(), body);
    }

    #[test]
    fn carrier_offer_drops_g729_keeps_rest_in_order() {
        let sdp = Sdp::parse(&crlf(CARRIER_OFFER)).unwrap();
        assert_eq!(sdp.audio_payload_types(), ["0", "8", "18", "101"]);
        let out = text(&sdp.rewrite_offer(local4()).unwrap());
        let expect = "v=0
            o=- 1234567 1 IN IP4 198.51.100.7
            s=SBC call
            c=IN IP4 198.51.100.7
            t=0 0
            m=audio 40000 RTP/AVP 0 8 101
            a=rtpmap:0 PCMU/8000
            a=rtpmap:8 PCMA/8000
            a=rtpmap:101 telephone-event/8000
            a=fmtp:101 0-16
            a=x-carrier-thing:keep me
            a=ptime:20
            a=sendrecv
        ";
        assert_eq!(out, text(&crlf(expect)));
    }

    #[test]
    fn offerer_order_kept_pcma_first() {
        let body = crlf(
            "v=0
            o=- 1 1 IN IP4 10.0.0.1
            s=-
            c=IN IP4 10.0.0.1
            t=0 0
            m=audio 5004 RTP/AVP 9 8 97 0 96
            a=rtpmap:9 G722/8000
            a=rtpmap:97 telephone-event/48000
            a=rtpmap:96 telephone-event/8000
            a=rtcp-fb:* nack
            a=rtcp-fb:9 nack
        ",
        );
        let out = text(&Sdp::parse(&body).unwrap().rewrite_offer(local4()).unwrap());
        assert!(out.contains("m=audio 40000 RTP/AVP 8 0 96\r\n"), "{out}");
        assert!(!out.contains("G722"));
        assert!(!out.contains("telephone-event/48000"));
        assert!(out.contains("a=rtpmap:96 telephone-event/8000\r\n"));
        assert!(out.contains("a=rtcp-fb:* nack\r\n"));
        assert!(!out.contains("a=rtcp-fb:9"));
    }

    #[test]
    fn opus_only_is_no_common_codec() {
        let body = crlf(
            "v=0
            o=- 1 1 IN IP4 10.0.0.1
            s=-
            c=IN IP4 10.0.0.1
            t=0 0
            m=audio 5004 RTP/AVP 111 101
            a=rtpmap:111 opus/48000/2
            a=rtpmap:101 telephone-event/8000
        ",
        );
        let err = Sdp::parse(&body)
            .unwrap()
            .rewrite_offer(local4())
            .unwrap_err();
        assert_eq!(err, SdpError::NoCommonCodec);
        assert_eq!(err.sip_status(), 488);
    }

    #[test]
    fn no_audio_is_rejected_offer() {
        let body = crlf(
            "v=0
            o=- 1 1 IN IP4 10.0.0.1
            s=-
            c=IN IP4 10.0.0.1
            t=0 0
            m=video 5006 RTP/AVP 96
        ",
        );
        let sdp = Sdp::parse(&body).unwrap();
        assert_eq!(sdp.audio_rtp(), None);
        assert_eq!(sdp.rewrite_offer(local4()).unwrap_err(), SdpError::NoAudio);
        assert_eq!(sdp.rewrite_answer(local4()).unwrap_err(), SdpError::NoAudio);
    }

    #[test]
    fn video_and_second_audio_rejected() {
        let body = crlf(
            "v=0
            o=- 1 1 IN IP4 10.0.0.1
            s=-
            c=IN IP4 10.0.0.1
            t=0 0
            m=audio 5004 RTP/AVP 0
            m=video 5006/2 RTP/AVP 96
            a=rtpmap:96 H264/90000
            b=AS:512
            m=audio 5008 RTP/AVP 8
        ",
        );
        let out = text(&Sdp::parse(&body).unwrap().rewrite_offer(local4()).unwrap());
        assert!(out.contains("m=audio 40000 RTP/AVP 0\r\n"), "{out}");
        assert!(out.contains("m=video 0 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\nb=AS:512\r\n"));
        assert!(out.contains("m=audio 0 RTP/AVP 8\r\n"));
    }

    #[test]
    fn answer_keeps_chosen_codecs() {
        let body = crlf(
            "v=0
            o=callee 99 2 IN IP4 192.0.2.20
            s=-
            c=IN IP4 192.0.2.20
            t=0 0
            m=audio 30000 RTP/AVP 8 101
            a=rtpmap:8 PCMA/8000
            a=rtpmap:101 telephone-event/8000
            a=fmtp:101 0-15
            m=video 0 RTP/AVP 96
        ",
        );
        let sdp = Sdp::parse(&body).unwrap();
        assert_eq!(sdp.audio_rtp(), Some("192.0.2.20:30000".parse().unwrap()));
        let out = text(&sdp.rewrite_answer(local4()).unwrap());
        let expect = "v=0
            o=callee 99 2 IN IP4 198.51.100.7
            s=-
            c=IN IP4 198.51.100.7
            t=0 0
            m=audio 40000 RTP/AVP 8 101
            a=rtpmap:8 PCMA/8000
            a=rtpmap:101 telephone-event/8000
            a=fmtp:101 0-15
            m=video 0 RTP/AVP 96
        ";
        assert_eq!(out, text(&crlf(expect)));
    }

    #[test]
    fn direction_and_hold() {
        let with = |extra: &str, conn: &str| {
            let body = format!(
                "v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 {conn}\r\nt=0 0\r\n\
                 m=audio 5004 RTP/AVP 0\r\n{extra}"
            );
            Sdp::parse(body.as_bytes()).unwrap()
        };
        assert_eq!(with("", "10.0.0.1").direction(), Direction::SendRecv);
        assert_eq!(
            with("a=sendonly\r\n", "10.0.0.1").direction(),
            Direction::SendOnly
        );
        assert_eq!(
            with("a=recvonly\r\n", "10.0.0.1").direction(),
            Direction::RecvOnly
        );
        assert_eq!(
            with("a=inactive\r\n", "10.0.0.1").direction(),
            Direction::Inactive
        );
        assert!(with("a=inactive\r\n", "10.0.0.1").direction().is_hold());
        // RFC 2543 hold.
        let held = with("", "0.0.0.0");
        assert_eq!(held.direction(), Direction::SendOnly);
        assert!(held.direction().is_hold());
        assert_eq!(held.audio_rtp(), None);
        assert_eq!(
            with("a=recvonly\r\n", "0.0.0.0").direction(),
            Direction::Inactive
        );
        // The hold address survives the rewrite so the far end still sees a hold.
        let out = text(&held.rewrite_offer(local4()).unwrap());
        assert!(out.contains("c=IN IP4 0.0.0.0\r\n"), "{out}");
        assert!(out.contains("m=audio 40000 RTP/AVP 0\r\n"));

        // Session-level attribute, overridden at media level.
        let body = "v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\n\
                    a=sendonly\r\nm=audio 5004 RTP/AVP 0\r\n";
        assert_eq!(
            Sdp::parse(body.as_bytes()).unwrap().direction(),
            Direction::SendOnly
        );
        let body = format!("{body}a=sendrecv\r\n");
        assert_eq!(
            Sdp::parse(body.as_bytes()).unwrap().direction(),
            Direction::SendRecv
        );
        // Disabled stream.
        let body = "v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\n\
                    m=audio 0 RTP/AVP 0\r\n";
        let sdp = Sdp::parse(body.as_bytes()).unwrap();
        assert_eq!(sdp.direction(), Direction::Inactive);
        assert_eq!(sdp.audio_rtp(), None);
        let out = text(&sdp.rewrite_offer(local4()).unwrap());
        assert!(out.contains("m=audio 0 RTP/AVP 0\r\n"), "{out}");
    }

    #[test]
    fn ipv6() {
        let body = crlf(
            "v=0
            o=- 1 1 IN IP6 2001:db8::1
            s=-
            c=IN IP6 2001:db8::1
            t=0 0
            m=audio 5004 RTP/AVP 0 8
            a=rtcp:6000 IN IP6 2001:db8::2
        ",
        );
        let sdp = Sdp::parse(&body).unwrap();
        assert_eq!(sdp.audio_rtp(), Some("[2001:db8::1]:5004".parse().unwrap()));
        assert_eq!(
            sdp.audio_rtcp(),
            Some("[2001:db8::2]:6000".parse().unwrap())
        );
        let local6: SocketAddr = "[2001:db8:ffff::10]:40002".parse().unwrap();
        let out = text(&sdp.rewrite_offer(local6).unwrap());
        let expect = "v=0
            o=- 1 1 IN IP6 2001:db8:ffff::10
            s=-
            c=IN IP6 2001:db8:ffff::10
            t=0 0
            m=audio 40002 RTP/AVP 0 8
            a=rtcp:40003 IN IP6 2001:db8:ffff::10
        ";
        assert_eq!(out, text(&crlf(expect)));
        // An IPv6 party bridged to an IPv4 anchor address, and back.
        let out = text(&sdp.rewrite_offer(local4()).unwrap());
        assert!(out.contains("c=IN IP4 198.51.100.7\r\n"));
        let v4 = Sdp::parse(&crlf(SIPP_OFFER)).unwrap();
        let out = text(&v4.rewrite_offer(local6).unwrap());
        assert!(out.contains("o=user1 53655765 2353687637 IN IP6 2001:db8:ffff::10\r\n"));
        assert!(out.contains("c=IN IP6 2001:db8:ffff::10\r\n"));
    }

    #[test]
    fn rtcp_attribute_without_address() {
        let body = crlf(
            "v=0
            o=- 1 1 IN IP4 10.0.0.1
            s=-
            c=IN IP4 10.0.0.1
            t=0 0
            m=audio 5004 RTP/AVP 0
            a=rtcp:5005
        ",
        );
        let sdp = Sdp::parse(&body).unwrap();
        assert_eq!(sdp.audio_rtcp(), Some("10.0.0.1:5005".parse().unwrap()));
        let out = text(&sdp.rewrite_answer(local4()).unwrap());
        assert!(
            out.contains("a=rtcp:40001 IN IP4 198.51.100.7\r\n"),
            "{out}"
        );
    }

    #[test]
    fn media_level_connection() {
        // Only media-level c=: it is used, and rewritten.
        let body = crlf(
            "v=0
            o=- 1 1 IN IP4 10.0.0.1
            s=-
            t=0 0
            m=audio 5004 RTP/AVP 0
            c=IN IP4 10.0.0.9
        ",
        );
        let sdp = Sdp::parse(&body).unwrap();
        assert_eq!(sdp.audio_rtp(), Some("10.0.0.9:5004".parse().unwrap()));
        let out = text(&sdp.rewrite_offer(local4()).unwrap());
        assert!(
            out.ends_with("m=audio 40000 RTP/AVP 0\r\nc=IN IP4 198.51.100.7\r\n"),
            "{out}"
        );
        // Both levels: media-level wins.
        let body = crlf(
            "v=0
            o=- 1 1 IN IP4 10.0.0.1
            s=-
            c=IN IP4 10.0.0.1
            t=0 0
            m=audio 5004 RTP/AVP 0
            c=IN IP4 10.0.0.9
        ",
        );
        assert_eq!(
            Sdp::parse(&body).unwrap().audio_rtp(),
            Some("10.0.0.9:5004".parse().unwrap())
        );
        // No c= anywhere (invalid but seen): ours is inserted after m= and i=.
        let body = crlf(
            "v=0
            o=- 1 1 IN IP4 10.0.0.1
            s=-
            t=0 0
            m=audio 5004 RTP/AVP 0
            i=voice
            a=sendrecv
            m=video 5006 RTP/AVP 96
        ",
        );
        let sdp = Sdp::parse(&body).unwrap();
        assert_eq!(sdp.audio_rtp(), None);
        let out = text(&sdp.rewrite_offer(local4()).unwrap());
        assert!(
            out.contains("m=audio 40000 RTP/AVP 0\r\ni=voice\r\nc=IN IP4 198.51.100.7\r\na=sendrecv\r\nm=video 0"),
            "{out}"
        );
        let again = Sdp::parse(out.as_bytes()).unwrap();
        assert_eq!(again.audio_rtp(), Some(local4()));
    }

    #[test]
    fn unknown_and_non_utf8_lines_pass_through() {
        let mut body = b"v=0\r\no=\xe9t\xe9 1 1 IN IP4 10.0.0.1\r\ns=\xff\xfe\r\n".to_vec();
        body.extend_from_slice(b"c=IN IP4 10.0.0.1\r\nt=0 0\r\nz=whatever\r\nk=prompt\r\n");
        body.extend_from_slice(b"m=audio 5004 RTP/AVP 0\r\nx=odd\r\n");
        let sdp = Sdp::parse(&body).unwrap();
        assert_eq!(sdp.to_bytes(), body);
        let out = sdp.rewrite_offer(local4()).unwrap();
        let mut expect = b"v=0\r\no=\xe9t\xe9 1 1 IN IP4 198.51.100.7\r\ns=\xff\xfe\r\n".to_vec();
        expect.extend_from_slice(b"c=IN IP4 198.51.100.7\r\nt=0 0\r\nz=whatever\r\nk=prompt\r\n");
        expect.extend_from_slice(b"m=audio 40000 RTP/AVP 0\r\nx=odd\r\n");
        assert_eq!(out, expect);
    }

    #[test]
    fn fqdn_connection_parses_without_address() {
        let body = crlf(
            "v=0
            o=- 1 1 IN IP4 host.example.com
            s=-
            c=IN IP4 host.example.com
            t=0 0
            m=audio 5004 RTP/AVP 0
        ",
        );
        let sdp = Sdp::parse(&body).unwrap();
        assert_eq!(sdp.audio_rtp(), None);
        assert!(sdp.rewrite_offer(local4()).is_ok());
    }

    #[test]
    fn garbage_is_an_error() {
        let cases: &[&[u8]] = &[
            b"",
            b"\r\n\r\n",
            b"hello world",
            b"\x00\x01\x02\xff",
            b"v=1\r\no=- 1 1 IN IP4 1.2.3.4\r\n",
            b"v=0\r\ns=-\r\n",                                // no o=
            b"v=0\r\no=- 1 1 IN IP4\r\n",                     // short o=
            b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4\r\n", // short c=
            b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=XX IP4 1.2.3.4\r\n",
            b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio abc RTP/AVP 0\r\n",
            b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 70000 RTP/AVP 0\r\n",
            b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio\r\n",
            b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=a\rb\r\n", // bare CR inside a line
            b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nno equals sign\r\n",
            b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nA=upper\r\n",
        ];
        for c in cases {
            let err = Sdp::parse(c).expect_err(&String::from_utf8_lossy(c));
            assert_eq!(err.sip_status(), 400);
            // Warning-header safe: printable ASCII, no quotes.
            let msg = err.to_string();
            assert!(
                msg.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"'),
                "{msg}"
            );
        }
        assert_eq!(
            Sdp::parse(&vec![b'a'; MAX_SDP_LEN + 1]),
            Err(SdpError::TooLarge)
        );
        assert_eq!(
            Sdp::parse(b"v=0\r\nbad\r\n"),
            Err(SdpError::Syntax {
                line: 2,
                what: "expected <letter>=<value>"
            })
        );
    }

    /// Everything a caller may do with a parsed body; must never panic.
    fn exercise(sdp: &Sdp) {
        let _ = sdp.audio_rtp();
        let _ = sdp.audio_rtcp();
        let _ = sdp.direction();
        let _ = sdp.audio_payload_types();
        let _ = sdp.to_bytes();
        for local in [local4(), "[2001:db8::5]:65534".parse().unwrap()] {
            for out in [sdp.rewrite_offer(local), sdp.rewrite_answer(local)]
                .into_iter()
                .flatten()
            {
                // Whatever we emit must itself be valid SDP pointing at us.
                let again = Sdp::parse(&out).expect("rewritten SDP parses");
                if let Some(rtp) = again.audio_rtp() {
                    assert_eq!(rtp, local);
                }
            }
        }
    }

    #[test]
    fn fuzz_no_panic() {
        let mut rng = StdRng::seed_from_u64(0x5d9_c0de);
        let seeds: Vec<Vec<u8>> = [SIPP_OFFER, CARRIER_OFFER]
            .iter()
            .map(|s| crlf(s))
            .chain([crlf(
                "v=0
                o=- 1 1 IN IP6 2001:db8::1
                s=-
                t=0 0
                m=audio 5004/2 RTP/AVP 0 101
                c=IN IP6 ::
                a=rtcp:5005 IN IP6 2001:db8::2
                a=rtpmap:101 telephone-event/8000
                m=video 5006 RTP/AVP 96
                a=rtcp:9
            ",
            )])
            .collect();
        // Every truncation of valid bodies.
        for s in &seeds {
            for n in 0..=s.len() {
                if let Ok(sdp) = Sdp::parse(&s[..n]) {
                    exercise(&sdp);
                }
            }
        }
        // Random bytes, with and without a valid-looking start.
        for i in 0..3000 {
            let len = rng.gen_range(0..300);
            let mut b: Vec<u8> = if i % 2 == 0 {
                b"v=0\r\n".to_vec()
            } else {
                Vec::new()
            };
            b.extend((0..len).map(|_| rng.gen::<u8>()));
            if let Ok(sdp) = Sdp::parse(&b) {
                exercise(&sdp);
            }
        }
        // Random mutations of valid bodies, biased to SDP-ish bytes.
        const ALPHABET: &[u8] = b"0123456789 =:/.\r\nvocmatIPN46abcdef";
        let mut parsed = 0;
        for _ in 0..20000 {
            let mut b = seeds[rng.gen_range(0..seeds.len())].clone();
            for _ in 0..rng.gen_range(1..6) {
                let pos = rng.gen_range(0..b.len());
                match rng.gen_range(0..3) {
                    0 => b[pos] = ALPHABET[rng.gen_range(0..ALPHABET.len())],
                    1 => b.insert(pos, ALPHABET[rng.gen_range(0..ALPHABET.len())]),
                    _ => {
                        b.remove(pos);
                    }
                }
            }
            if let Ok(sdp) = Sdp::parse(&b) {
                parsed += 1;
                exercise(&sdp);
            }
        }
        // The mutation loop must actually reach the rewrite code.
        assert!(parsed > 1000, "only {parsed} mutated bodies parsed");
    }
}
