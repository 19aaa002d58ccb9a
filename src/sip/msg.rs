//! Validation of received messages and construction of the ones crossbar sends.
//!
//! Everything that arrives from the network goes through [`Incoming::parse`]
//! once: it parses with rsipstack and checks the headers RFC 3261 §8.1.1
//! requires, so later code can rely on them without unwraps. A malformed
//! request gets a 400 with a `Warning` saying what was wrong
//! ([`bad_request_raw`] even works on bytes rsipstack cannot parse).

use rsipstack::sip::headers::make_header;
use rsipstack::sip::{Header, Headers, Method, Request, Response, SipMessage, StatusCode, Uri, Version};
use std::io::Write as _;
use std::net::SocketAddr;

/// The transport a message came in on or must go out on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Udp,
    Tcp,
    Tls,
    /// SIP over WebSocket (RFC 7118), on the HTTP port.
    Ws,
    /// SIP over secure WebSocket.
    Wss,
}

impl Proto {
    pub fn via_name(self) -> &'static str {
        match self {
            Proto::Udp => "UDP",
            Proto::Tcp => "TCP",
            Proto::Tls => "TLS",
            Proto::Ws => "WS",
            Proto::Wss => "WSS",
        }
    }
    pub fn reliable(self) -> bool {
        !matches!(self, Proto::Udp)
    }
    /// A browser's transport: its media is WebRTC (ICE, DTLS-SRTP), never plain RTP.
    pub fn is_websocket(self) -> bool {
        matches!(self, Proto::Ws | Proto::Wss)
    }
    pub fn param(self) -> &'static str {
        match self {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
            Proto::Tls => "tls",
            Proto::Ws => "ws",
            Proto::Wss => "wss",
        }
    }
}

/// Where a message came from / goes to: a transport and a remote address
/// (for TCP the connection to that address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Peer {
    pub proto: Proto,
    pub addr: SocketAddr,
}

/// Why a received message was refused.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("unparseable SIP message: {0}")]
    Parse(String),
    #[error("missing or invalid {0} header")]
    Header(&'static str),
    #[error("Max-Forwards exhausted")]
    TooManyHops,
    #[error("malformed request line: {0}")]
    RequestLine(&'static str),
    #[error("SIP version {0:?} is not supported (only SIP/2.0)")]
    Version(String),
    #[error("{0}")]
    Syntax(&'static str),
}

impl MessageError {
    /// The status a request with this problem gets.
    pub fn status(&self) -> u16 {
        match self {
            MessageError::TooManyHops => 483,
            MessageError::Version(_) => 505,
            _ => 400,
        }
    }
}

/// A parsed, validated message with the fields routing needs.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub msg: SipMessage,
    pub peer: Peer,
    /// When it reached the host (a UDP datagram's kernel receive time; else when it
    /// was parsed, just off the wire): how long it waits inside crossbar.
    pub received: std::time::Instant,
    pub call_id: String,
    pub cseq: u32,
    pub cseq_method: Method,
    pub from_tag: Option<String>,
    pub to_tag: Option<String>,
    /// Requests only: the From and To URIs, parsed (and so checked) at validation.
    /// Nothing routes on a response's, which is matched by Call-ID and tags.
    uris: Option<Box<(Uri, Uri)>>,
}

impl Incoming {
    pub fn parse(bytes: &[u8], peer: Peer) -> Result<Incoming, MessageError> {
        check_framing(bytes, peer.proto)?;
        let msg = rsipstack::sip::parser::parse_message(bytes).map_err(|e| MessageError::Parse(e.to_string()))?;
        Self::validate(msg, peer)
    }

    pub fn validate(msg: SipMessage, peer: Peer) -> Result<Incoming, MessageError> {
        let headers = headers_of(&msg);
        // One pass over the headers (the first of each, every Contact), not a scan per
        // header: this runs on every message. Checked below in the same order as ever,
        // so a message with several problems is refused for the same one.
        let (mut call_id, mut cseq, mut from, mut to, mut via, mut max_forwards) = (None, None, None, None, None, None);
        let mut contacts_ok = true;
        for h in headers.iter() {
            let name = h.name();
            let first = if name.eq_ignore_ascii_case("Via") {
                &mut via
            } else if name.eq_ignore_ascii_case("From") {
                &mut from
            } else if name.eq_ignore_ascii_case("To") {
                &mut to
            } else if name.eq_ignore_ascii_case("Call-ID") {
                &mut call_id
            } else if name.eq_ignore_ascii_case("CSeq") {
                &mut cseq
            } else if name.eq_ignore_ascii_case("Max-Forwards") {
                &mut max_forwards
            } else {
                if name.eq_ignore_ascii_case("Contact") {
                    contacts_ok &= list_items(h.value()).all(|c| c == "*" || name_addr_ok(c));
                }
                continue;
            };
            first.get_or_insert(h.value());
        }
        let call_id = call_id.map(str::trim).filter(|v| !v.is_empty()).ok_or(MessageError::Header("Call-ID"))?;
        let (cseq, cseq_method) = cseq.and_then(parse_cseq).ok_or(MessageError::Header("CSeq"))?;
        let from = from.filter(|v| name_addr_ok(v)).ok_or(MessageError::Header("From"))?;
        let to = to.filter(|v| name_addr_ok(v)).ok_or(MessageError::Header("To"))?;
        // A request that may start a dialog (no To tag) has its From and To parsed in
        // full (a malformed one gets a 400): they route it. Responses and in-dialog
        // requests only need their tags (their shape was checked above); they reach
        // their call by Call-ID and tags.
        fn tag(v: &str) -> Option<&str> {
            param(v, "tag").filter(|t| !t.is_empty())
        }
        let raw_to_tag = tag(to);
        let (from_tag, to_tag, uris) = if matches!(msg, SipMessage::Request(_)) && raw_to_tag.is_none() {
            let from = rsipstack::sip::typed::From::parse(from).map_err(|_| MessageError::Header("From"))?;
            let to = rsipstack::sip::typed::To::parse(to).map_err(|_| MessageError::Header("To"))?;
            (from.tag().map(|t| t.to_string()), to.tag().map(|t| t.to_string()), Some(Box::new((from.uri, to.uri))))
        } else {
            (tag(from).map(str::to_string), raw_to_tag.map(str::to_string), None)
        };
        if !contacts_ok {
            return Err(MessageError::Header("Contact"));
        }
        let via = via.ok_or(MessageError::Header("Via"))?;
        // A response's top Via is crossbar's own: the transaction it answers checks
        // it (a response that matches none is dropped), so it is not parsed here.
        if matches!(msg, SipMessage::Request(_)) && rsipstack::sip::typed::Via::parse(first_of_list(via)).is_err() {
            return Err(MessageError::Header("Via"));
        }
        if let SipMessage::Request(req) = &msg {
            if req.method != cseq_method && !(req.method == Method::Ack && cseq_method == Method::Invite) && req.method != Method::Cancel {
                return Err(MessageError::Header("CSeq"));
            }
            if let Some(mf) = max_forwards {
                match mf.trim().parse::<u32>() {
                    Ok(0) if req.method != Method::Options => return Err(MessageError::TooManyHops),
                    Ok(_) => {}
                    Err(_) => return Err(MessageError::Header("Max-Forwards")),
                }
            }
            if req.method == Method::Cancel && cseq_method != Method::Cancel {
                return Err(MessageError::Header("CSeq"));
            }
        }
        Ok(Incoming {
            call_id: call_id.to_string(),
            cseq,
            cseq_method,
            from_tag,
            to_tag,
            uris,
            peer,
            received: std::time::Instant::now(),
            msg,
        })
    }

    /// A request's From URI (None for a response).
    pub fn from_uri(&self) -> Option<&Uri> {
        self.uris.as_deref().map(|(from, _)| from)
    }

    /// A request's To URI (None for a response).
    pub fn to_uri(&self) -> Option<&Uri> {
        self.uris.as_deref().map(|(_, to)| to)
    }

    pub fn request(&self) -> Option<&Request> {
        match &self.msg {
            SipMessage::Request(r) => Some(r),
            SipMessage::Response(_) => None,
        }
    }

    pub fn response(&self) -> Option<&Response> {
        match &self.msg {
            SipMessage::Response(r) => Some(r),
            SipMessage::Request(_) => None,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        header(headers_of(&self.msg), name)
    }
}

pub fn headers_of(msg: &SipMessage) -> &Headers {
    match msg {
        SipMessage::Request(r) => &r.headers,
        SipMessage::Response(r) => &r.headers,
    }
}

/// Checks what rsipstack's lenient parser lets through but RFC 3261 §25 forbids
/// (the RFC 4475 §3.1.2 cases): the request line's shape and version, and a
/// Content-Length that does not fit the datagram.
fn check_framing(bytes: &[u8], proto: super::msg::Proto) -> Result<(), MessageError> {
    let line_end = memchr::memchr2(b'\r', b'\n', bytes).unwrap_or(bytes.len());
    let line = std::str::from_utf8(&bytes[..line_end]).map_err(|_| MessageError::RequestLine("not UTF-8"))?;
    if !line.starts_with("SIP/") {
        let mut parts = line.split(' ');
        let (Some(method), Some(uri), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(MessageError::RequestLine("expected `METHOD SP Request-URI SP SIP/2.0` with single spaces"));
        };
        if method.is_empty() || uri.is_empty() || version.is_empty() {
            return Err(MessageError::RequestLine("expected `METHOD SP Request-URI SP SIP/2.0` with single spaces"));
        }
        if !method.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b)) {
            return Err(MessageError::RequestLine("the method is not a token"));
        }
        if uri.contains(['<', '>', '"']) {
            return Err(MessageError::RequestLine("the Request-URI must not be enclosed in <> or contain quotes"));
        }
        if (uri.starts_with("sip:") || uri.starts_with("sips:")) && uri.contains('?') {
            return Err(MessageError::RequestLine("a SIP Request-URI must not carry headers (?...)"));
        }
        if !version.eq_ignore_ascii_case("SIP/2.0") {
            return Err(MessageError::Version(version.to_string()));
        }
    }
    // The searcher is built once for the node's life, not per message.
    static HEAD_END: std::sync::LazyLock<memchr::memmem::Finder<'static>> = std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\r\n\r\n"));
    if let Some(body_start) = HEAD_END.find(bytes).map(|p| p + 4) {
        // Over the header lines without copying the head: this runs on every message.
        let head = &bytes[..body_start];
        let mut start = 0;
        while start < head.len() {
            let end = memchr::memchr(b'\n', &head[start..]).map_or(head.len(), |i| start + i);
            let line = &head[start..end];
            start = end + 1;
            // Only a line whose name (trimmed) starts with c or l can be Content-Length.
            if !matches!(line.trim_ascii_start().first(), Some(b'c' | b'C' | b'l' | b'L')) {
                continue;
            }
            let Some(colon) = memchr::memchr(b':', line) else { continue };
            let name = line[..colon].trim_ascii();
            if !(name.eq_ignore_ascii_case(b"content-length") || name == b"l") {
                continue;
            }
            let value = std::str::from_utf8(line[colon + 1..].trim_ascii()).unwrap_or("-");
            let n: usize = value.parse().map_err(|_| MessageError::Syntax("Content-Length is not a non-negative number"))?;
            // On a datagram the body is what arrived (RFC 3261 §18.3): more declared than sent is an error.
            if proto == super::msg::Proto::Udp && n > bytes.len() - body_start {
                return Err(MessageError::Syntax("Content-Length is larger than the body received"));
            }
        }
    }
    Ok(())
}

/// name-addr / addr-spec syntax checks the parser does not make: balanced
/// quotes, no space inside `<>`, no unquoted comma in a display name, no
/// `?headers` outside `<>` (RFC 3261 §20.10).
fn name_addr_ok(v: &str) -> bool {
    let unescaped_quotes = if memchr::memchr2(b'"', b'\\', v.as_bytes()).is_none() {
        0
    } else {
        // Bytes: a multi-byte character never contains an ASCII byte.
        let (mut n, mut esc) = (0, false);
        for c in v.bytes() {
            match c {
                b'\\' if !esc => esc = true,
                b'"' if !esc => n += 1,
                _ => esc = false,
            }
        }
        n
    };
    if unescaped_quotes % 2 != 0 {
        return false;
    }
    match (memchr::memchr(b'<', v.as_bytes()), memchr::memrchr(b'>', v.as_bytes())) {
        (Some(a), Some(b)) if b > a => {
            let inner = &v[a + 1..b];
            if inner.starts_with(char::is_whitespace) || inner.ends_with(char::is_whitespace) {
                return false;
            }
            let display = v[..a].trim_ascii();
            display.is_empty() || (display.starts_with('"') && display.ends_with('"')) || !display.contains([',', ';', ':', '"', '<'])
        }
        (None, None) => !v.contains(['?', '"']),
        _ => false,
    }
}

/// The first value of a header, by name (case-insensitive; compact forms are
/// already mapped to full names by the parser).
pub fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers.iter().find(|h| h.name().eq_ignore_ascii_case(name)).map(|h| h.value())
}

/// All values of a header, comma-joined lists split (not inside quotes or <>).
pub fn header_values<'a>(headers: &'a Headers, name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|h| h.name().eq_ignore_ascii_case(name))
        .flat_map(|h| split_list(h.value()))
        .collect()
}

/// Splits a comma-separated header list, respecting quotes and angle brackets.
pub fn split_list(v: &str) -> Vec<&str> {
    list_items(v).collect()
}

/// The items of a comma-separated header list, trimmed, empty ones skipped
/// (commas inside quotes or `<>` do not separate).
fn list_items(v: &str) -> impl Iterator<Item = &str> {
    let bytes = v.as_bytes();
    let (mut depth, mut quoted, mut start, mut i) = (0i32, false, 0usize, 0usize);
    std::iter::from_fn(move || {
        while start <= bytes.len() {
            let part_end = loop {
                if i >= bytes.len() {
                    break bytes.len();
                }
                match bytes[i] {
                    b'\\' if quoted => i += 1,
                    b'"' => quoted = !quoted,
                    b'<' if !quoted => depth += 1,
                    b'>' if !quoted => depth -= 1,
                    b',' if !quoted && depth <= 0 => break i,
                    _ => {}
                }
                i += 1;
            };
            let part = v.get(start..part_end).unwrap_or("").trim_ascii();
            start = part_end + 1;
            i = start;
            if !part.is_empty() {
                return Some(part);
            }
        }
        None
    })
}

/// The first item of a list, without collecting the rest.
fn first_of_list(v: &str) -> &str {
    list_items(v).next().unwrap_or(v)
}

pub fn parse_cseq(v: &str) -> Option<(u32, Method)> {
    let mut it = v.split_whitespace();
    let n = it.next()?.parse::<u32>().ok()?;
    let m = it.next()?;
    if it.next().is_some() {
        return None;
    }
    Some((n, Method::try_from(m).ok()?))
}

/// A `tag=` or other parameter of a name-addr header value.
pub fn param<'a>(value: &'a str, name: &str) -> Option<&'a str> {
    let gt = memchr::memrchr(b'>', value.as_bytes());
    let after = gt.map(|i| &value[i + 1..]).unwrap_or(value);
    split_ascii(after, b';').skip(if gt.is_some() { 0 } else { 1 }).find_map(|p| {
        let (k, v) = split_once_ascii(p, b'=').unwrap_or((p, ""));
        k.trim_ascii().eq_ignore_ascii_case(name).then(|| v.trim_ascii())
    })
}

/// `s` split at every `sep` (an ASCII byte), as `str::split` would: these header
/// parts are short, and a byte scan costs less than a char searcher's set-up.
pub(crate) fn split_ascii(s: &str, sep: u8) -> impl Iterator<Item = &str> {
    debug_assert!(sep.is_ascii());
    let mut rest = Some(s);
    std::iter::from_fn(move || {
        let r = rest?;
        match r.bytes().position(|b| b == sep) {
            Some(i) => {
                rest = Some(&r[i + 1..]);
                Some(&r[..i])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

/// `str::split_once` at an ASCII byte.
pub(crate) fn split_once_ascii(s: &str, sep: u8) -> Option<(&str, &str)> {
    debug_assert!(sep.is_ascii());
    let i = s.bytes().position(|b| b == sep)?;
    Some((&s[..i], &s[i + 1..]))
}

/// The URI inside a name-addr (`"Bob" <sip:bob@x>;tag=1` → `sip:bob@x`) or an addr-spec.
pub fn name_addr_uri(value: &str) -> &str {
    match (value.find('<'), value.find('>')) {
        (Some(a), Some(b)) if b > a => &value[a + 1..b],
        _ => split_ascii(value, b';').next().unwrap_or(value).trim_ascii(),
    }
}

/// Adds `;tag=` to a From/To value that has none.
pub fn with_tag(value: &str, tag: &str) -> String {
    if param(value, "tag").is_some() {
        value.to_string()
    } else if value.contains('<') {
        let mut out = String::with_capacity(value.len() + 5 + tag.len());
        out.push_str(value);
        out.push_str(";tag=");
        out.push_str(tag);
        out
    } else {
        // addr-spec form: parameters after it would belong to the URI; wrap it.
        let (uri, rest) = value.split_once(';').unwrap_or((value, ""));
        if rest.is_empty() {
            format!("<{}>;tag={tag}", uri.trim())
        } else {
            format!("<{}>;{rest};tag={tag}", uri.trim())
        }
    }
}

pub fn push(headers: &mut Headers, name: &str, value: impl Into<String>) {
    headers.push(make_header(name, value.into()));
}

pub fn remove(headers: &mut Headers, name: &str) {
    headers.retain(|h| !h.name().eq_ignore_ascii_case(name));
}

/// Replaces the body, its Content-Type and Content-Length.
pub fn set_body(headers: &mut Headers, body: &mut Vec<u8>, content_type: Option<&str>, new_body: Vec<u8>) {
    remove(headers, "Content-Type");
    remove(headers, "Content-Length");
    if let Some(ct) = content_type {
        if !new_body.is_empty() {
            push(headers, "Content-Type", ct);
        }
    }
    push(headers, "Content-Length", new_body.len().to_string());
    *body = new_body;
}

/// A request as it goes on the wire: the same bytes as rsipstack's
/// `Request::to_bytes`, with the headers copied in rather than formatted one
/// `String` at a time.
pub fn request_bytes(req: &Request) -> Vec<u8> {
    let mut out = Vec::with_capacity(wire_len(&req.headers, &req.body));
    let _ = write!(out, "{} {} {}\r\n", req.method, req.uri, req.version);
    write_headers_and_body(&mut out, &req.headers, &req.body);
    out
}

/// A response as it goes on the wire: the same bytes as rsipstack's `Response::to_bytes`.
pub fn response_bytes(resp: &Response) -> Vec<u8> {
    let mut out = Vec::with_capacity(wire_len(&resp.headers, &resp.body));
    let _ = write!(out, "{} {} {}\r\n", resp.version, resp.status_code.code(), resp.status_code.text());
    write_headers_and_body(&mut out, &resp.headers, &resp.body);
    out
}

/// Room for a message: headers, body and a generous start line.
fn wire_len(headers: &Headers, body: &[u8]) -> usize {
    128 + body.len() + headers.iter().map(|h| h.name().len() + h.value().len() + 4).sum::<usize>()
}

fn write_headers_and_body(out: &mut Vec<u8>, headers: &Headers, body: &[u8]) {
    for h in headers.iter() {
        out.extend_from_slice(h.name().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// A request built from parts; the header values must already be valid.
pub fn build_request(method: Method, uri: Uri, headers: Vec<(&str, String)>, content_type: Option<&str>, body: Vec<u8>) -> Request {
    let mut h = Headers::default();
    for (n, v) in headers {
        h.push(make_header(n, v));
    }
    let mut req = Request { method, uri, version: Version::V2, headers: h, body: Vec::new() };
    set_body(&mut req.headers, &mut req.body, content_type, body);
    req
}

/// A response to `req` (RFC 3261 §8.2.6): see [`super::transaction::make_response`].
/// A 100 Trying never carries a To tag.
pub fn response_to(req: &Request, code: u16, to_tag: Option<&str>) -> Response {
    super::transaction::make_response(req, StatusCode::from(code), if code == 100 { None } else { to_tag })
}

/// A response with a `Warning: 399` (or `Reason`) saying why, for refusals a person must understand.
pub fn refusal(req: &Request, code: u16, to_tag: Option<&str>, host: &str, why: &str) -> Response {
    let mut r = response_to(req, code, to_tag);
    let why = why.replace('"', "'");
    push(&mut r.headers, "Warning", format!("399 {host} \"{why}\""));
    r
}

/// A 503 for a request refused for want of capacity or over a limit: the Warning
/// says why, the Reason (RFC 3326) names it for machines, and Retry-After says
/// when to try again.
pub fn unavailable(req: &Request, to_tag: &str, host: &str, why: &str, reason: &str, retry_after_s: u32) -> Response {
    let mut r = refusal(req, 503, Some(to_tag), host, why);
    push(&mut r.headers, "Retry-After", retry_after_s.to_string());
    push(&mut r.headers, "Reason", format!("SIP;cause=503;text=\"{}\"", reason.replace('"', "'")));
    r
}

/// A 400 for bytes that rsipstack could not parse (or that failed validation),
/// built from their raw header lines so that even a broken request gets an
/// answer saying what is wrong. `None` for responses and for garbage without
/// the headers a response needs.
pub fn bad_request_raw(bytes: &[u8], host: &str, why: &str) -> Option<Vec<u8>> {
    error_response_raw(bytes, 400, host, why)
}

/// Like [`bad_request_raw`] with another status (483, 505).
pub fn error_response_raw(bytes: &[u8], code: u16, host: &str, why: &str) -> Option<Vec<u8>> {
    let head_end = find_subslice(bytes, b"\r\n\r\n").or_else(|| find_subslice(bytes, b"\n\n")).unwrap_or(bytes.len());
    let head = String::from_utf8_lossy(&bytes[..head_end]);
    let mut lines = head.lines();
    let first = lines.next()?.trim();
    // Responses and ACKs are never answered (RFC 3261 §17.1.1.1, §18.1.2).
    if first.starts_with("SIP/") || first.starts_with("ACK ") || first.split_whitespace().count() < 3 {
        return None;
    }
    let phrase = match code {
        483 => "Too Many Hops",
        505 => "Version Not Supported",
        _ => "Bad Request",
    };
    let mut out = format!("SIP/2.0 {code} {phrase}\r\n");
    let (mut via, mut from, mut to, mut cid, mut cseq) = (false, false, false, false, false);
    let mut current: Option<&str> = None;
    let mut collected: Vec<(String, String)> = Vec::new();
    for line in lines {
        if line.starts_with(' ') || line.starts_with('\t') {
            if let (Some(_), Some(last)) = (current, collected.last_mut()) {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
            continue;
        }
        current = None;
        let Some((name, value)) = line.split_once(':') else { continue };
        let canon = match name.trim().to_ascii_lowercase().as_str() {
            "via" | "v" => "Via",
            "from" | "f" => "From",
            "to" | "t" => "To",
            "call-id" | "i" => "Call-ID",
            "cseq" => "CSeq",
            _ => continue,
        };
        current = Some(canon);
        collected.push((canon.to_string(), value.trim().to_string()));
    }
    for (name, value) in &collected {
        // Header values go back as received, minus control characters that would break framing.
        let value: String = value.chars().filter(|c| !c.is_control()).collect();
        match name.as_str() {
            "Via" => via = true,
            "From" => from = true,
            "To" => to = true,
            "Call-ID" => cid = true,
            _ => cseq = true,
        }
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    if !via {
        return None;
    }
    let _ = (from, to, cid, cseq);
    let why: String = why.chars().filter(|c| !c.is_control() && *c != '"').take(200).collect();
    out.push_str(&format!("Warning: 399 {host} \"{why}\"\r\nContent-Length: 0\r\n\r\n"));
    Some(out.into_bytes())
}

fn find_subslice(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// Replaces the `Header` enum's value for the first header of that name.
pub fn replace(headers: &mut Headers, name: &str, value: impl Into<String>) {
    let value = value.into();
    let mut done = false;
    for h in headers.iter_mut() {
        if !done && h.name().eq_ignore_ascii_case(name) {
            *h = make_header(name, value.clone());
            done = true;
        }
    }
    if !done {
        headers.push(make_header(name, value));
    }
}

pub fn is_header(h: &Header, name: &str) -> bool {
    h.name().eq_ignore_ascii_case(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_splits_match_str_split() {
        for s in ["", ";", "a", "a;b", ";a;;b;", "tag=1;x", "k=v=w", "é;ü=ö;", "  a ; b = c "] {
            assert_eq!(split_ascii(s, b';').collect::<Vec<_>>(), s.split(';').collect::<Vec<_>>(), "{s:?}");
            assert_eq!(split_once_ascii(s, b'='), s.split_once('='), "{s:?}");
        }
        assert_eq!(param("<sip:a@b>;tag=x1;lr", "TAG"), Some("x1"));
        assert_eq!(param("sip:a@b;tag=x1", "tag"), Some("x1"), "an addr-spec's parameters are the header's (RFC 3261 §20.10)");
        assert_eq!(param("sip:a@b ; x=1; tag = y2", "tag"), Some("y2"));
        assert_eq!(name_addr_uri("sip:a@b;tag=1"), "sip:a@b");
    }

    fn peer() -> Peer {
        Peer { proto: Proto::Udp, addr: "127.0.0.1:5070".parse().unwrap() }
    }

    const INVITE: &str = "INVITE sip:1001@acme.localhost SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\r\nMax-Forwards: 70\r\nFrom: \"A\" <sip:a@x>;tag=abc\r\nTo: <sip:1001@acme.localhost>\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";

    #[test]
    fn wire_bytes_are_rsipstacks() {
        let m = Incoming::parse(INVITE.as_bytes(), peer()).unwrap();
        let req = m.request().unwrap();
        assert_eq!(request_bytes(req), req.to_bytes());
        let mut with_body = req.clone();
        // Every header name crossbar writes, and a binary body.
        for name in ["Accept", "Allow", "Contact", "Content-Type", "Event", "Info-Package", "P-Called-Party-ID", "Proxy-Authenticate", "Reason", "Record-Route", "Retry-After", "Route", "Subscription-State", "User-Agent", "Warning", "WWW-Authenticate", "X-Other"] {
            push(&mut with_body.headers, name, "v; x=\"y, z\"");
        }
        set_body(&mut with_body.headers, &mut with_body.body, Some("application/octet-stream"), vec![0, 159, 146, 150, 255]);
        assert_eq!(request_bytes(&with_body), with_body.to_bytes());
        for resp in [response_to(req, 100, None), response_to(req, 200, Some("t1")), refusal(&with_body, 488, Some("t"), "h", "no \"codec\"")] {
            assert_eq!(response_bytes(&resp), resp.to_bytes());
        }
        let no_headers = Request { headers: Headers::default(), ..req.clone() };
        assert_eq!(request_bytes(&no_headers), no_headers.to_bytes());
    }

    #[test]
    fn validates_and_extracts() {
        let m = Incoming::parse(INVITE.as_bytes(), peer()).unwrap();
        assert_eq!(m.call_id, "c1");
        assert_eq!(m.cseq, 1);
        assert_eq!(m.from_tag.as_deref(), Some("abc"));
        assert_eq!(m.to_tag, None);
        assert_eq!(m.to_uri().and_then(|u| u.user()), Some("1001"));
        assert_eq!(m.from_uri().and_then(|u| u.user()), Some("a"), "{INVITE}");
        // A response: tags only, in either header form, and no URIs.
        let resp = "SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: \"A; b\" <sip:a@x;tag=uri-param>;tag=f1\r\nTo: sip:b@y;tag=t2\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";
        let r = Incoming::parse(resp.as_bytes(), peer()).unwrap();
        assert_eq!((r.from_tag.as_deref(), r.to_tag.as_deref()), (Some("f1"), Some("t2")));
        assert!(r.from_uri().is_none() && r.to_uri().is_none());
        let untagged = resp.replace(";tag=t2", "");
        assert_eq!(Incoming::parse(untagged.as_bytes(), peer()).unwrap().to_tag, None);
        // A response's From or To that is no name-addr is still refused.
        let bad = resp.replace("To: sip:b@y;tag=t2", "To: <sip:b@y");
        assert!(matches!(Incoming::parse(bad.as_bytes(), peer()), Err(MessageError::Header("To"))));
        // An in-dialog request (To has a tag): tags only, like a response.
        let bye = INVITE.replace("INVITE sip:", "BYE sip:").replace("CSeq: 1 INVITE", "CSeq: 2 BYE").replace("<sip:1001@acme.localhost>", "<sip:1001@acme.localhost>;tag=t9");
        let b = Incoming::parse(bye.as_bytes(), peer()).unwrap();
        assert_eq!((b.from_tag.as_deref(), b.to_tag.as_deref()), (Some("abc"), Some("t9")), "{bye}");
        assert!(b.from_uri().is_none());
        // A request that may start a dialog still has its URIs parsed: a bad one is refused.
        let bad_uri = INVITE.replace("<sip:1001@acme.localhost>", "<sip:1001@>");
        assert!(matches!(Incoming::parse(bad_uri.as_bytes(), peer()), Err(MessageError::Header("To"))), "{bad_uri}");
    }

    #[test]
    fn missing_headers_are_named() {
        let bad = INVITE.replace("Call-ID: c1\r\n", "");
        let e = Incoming::parse(bad.as_bytes(), peer()).unwrap_err();
        assert!(e.to_string().contains("Call-ID"), "{e}");
        let bad = INVITE.replace("CSeq: 1 INVITE", "CSeq: 1 BYE");
        assert!(Incoming::parse(bad.as_bytes(), peer()).is_err());
    }

    #[test]
    fn raw_400_echoes_headers_and_reason() {
        let r = bad_request_raw(INVITE.as_bytes(), "127.0.0.1", "bad \"thing\"").unwrap();
        let s = String::from_utf8(r).unwrap();
        assert!(s.starts_with("SIP/2.0 400"));
        assert!(s.contains("Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\r\n"));
        assert!(s.contains("Warning: 399 127.0.0.1 \"bad thing\""));
        assert!(bad_request_raw(b"SIP/2.0 200 OK\r\n\r\n", "h", "x").is_none());
        assert!(bad_request_raw(b"\x00\xff garbage", "h", "x").is_none());
        assert!(bad_request_raw(b"ACK sip:a SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\r\n", "h", "x").is_none(), "an ACK gets no response");
    }

    #[test]
    fn tags_and_params() {
        assert_eq!(param("<sip:a@b>;tag=1;x=2", "tag"), Some("1"));
        assert_eq!(param("sip:a@b;tag=1", "tag"), Some("1"));
        assert_eq!(param("<sip:a@b;tag=no>", "tag"), None);
        assert_eq!(with_tag("<sip:a@b>", "t"), "<sip:a@b>;tag=t");
        assert_eq!(with_tag("sip:a@b", "t"), "<sip:a@b>;tag=t");
        assert_eq!(name_addr_uri("\"x, y\" <sip:a@b;lr>;q=1"), "sip:a@b;lr");
        assert_eq!(split_list("<sip:a,b>, \"c,d\" <sip:c>"), vec!["<sip:a,b>", "\"c,d\" <sip:c>"]);
    }
}

#[cfg(test)]
mod fuzz {
    //! Random and mutated input through the whole receive path's parsing and
    //! validation: never a panic, and every request that is refused can still
    //! be answered (or is dropped because it has no Via to answer to).
    use super::*;

    /// A small deterministic generator (no dependency, reproducible failures).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    const SEEDS: &[&str] = &[
        "INVITE sip:1001@acme.localhost SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1;rport\r\nMax-Forwards: 70\r\nFrom: \"A, B\" <sip:a@x>;tag=abc\r\nTo: <sip:1001@acme.localhost>\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\nContact: <sip:a@127.0.0.1:5070>\r\nContent-Type: application/sdp\r\nContent-Length: 4\r\n\r\nv=0\n",
        "SIP/2.0 200 OK\r\nv: SIP/2.0/UDP h;branch=z9hG4bK2\r\nf: <sip:a@x>;tag=1\r\nt: <sip:b@y>;tag=2\r\ni: c2\r\nCSeq: 2 BYE\r\nl: 0\r\n\r\n",
        "REGISTER sip:acme.localhost SIP/2.0\r\nVia: SIP/2.0/TCP [::1]:5070;branch=z9hG4bK3\r\nFrom: <sip:1001@acme.localhost>;tag=r\r\nTo: <sip:1001@acme.localhost>\r\nCall-ID: r\r\nCSeq: 9 REGISTER\r\nContact: <sip:1001@[::1]:5070;transport=tcp>;expires=60, *\r\nAuthorization: Digest username=\"1001\", realm=\"acme.localhost\", nonce=\"x\", uri=\"sip:acme.localhost\", response=\"0\"\r\nContent-Length: 0\r\n\r\n",
    ];

    #[test]
    fn mutated_and_random_messages_never_panic() {
        let mut rng = Rng(0x5eed_c0ff_ee00_0001);
        let peer = Peer { proto: Proto::Udp, addr: "127.0.0.1:5070".parse().unwrap() };
        let (mut parsed, mut refused) = (0usize, 0usize);
        for i in 0..30_000 {
            let mut m = SEEDS[i % SEEDS.len()].as_bytes().to_vec();
            match i % 4 {
                0 => {
                    // Flip, insert or delete a few bytes.
                    for _ in 0..1 + rng.below(6) {
                        let at = rng.below(m.len());
                        match rng.below(3) {
                            0 => m[at] = rng.next() as u8,
                            1 => {
                                const NASTY: &[u8] = b":;<>\",@ \r\n\t\0\xff";
                                m.insert(at, NASTY[rng.below(NASTY.len())]);
                            }
                            _ => {
                                m.remove(at);
                            }
                        }
                    }
                }
                1 => m.truncate(rng.below(m.len())),
                2 => {
                    // Splice a line of one seed into another.
                    let other = SEEDS[rng.below(SEEDS.len())];
                    let line = other.split("\r\n").nth(1 + rng.below(6)).unwrap_or("");
                    let at = m.windows(2).position(|w| w == b"\r\n").unwrap_or(0) + 2;
                    let ins = format!("{line}\r\n");
                    m.splice(at..at, ins.bytes());
                }
                _ => m = (0..rng.below(600)).map(|_| rng.next() as u8).collect(),
            }
            match Incoming::parse(&m, peer) {
                Ok(inc) => {
                    parsed += 1;
                    // Responses built from what was accepted must serialize.
                    if let Some(req) = inc.request() {
                        let _ = refusal(req, 400, Some("t"), "h", "x").to_bytes();
                    }
                }
                Err(e) => {
                    refused += 1;
                    let _ = error_response_raw(&m, e.status(), "h", &e.to_string());
                }
            }
        }
        assert!(parsed > 1000 && refused > 1000, "the mutations exercise both paths: {parsed} parsed, {refused} refused");
    }
}
