//! Browser agents: the softphone login API, SIP over WebSocket (RFC 7118) and
//! WebRTC media, against a real crossbar process.
//!
//! The "browser" here is Rust: a WebSocket SIP client and (for media) a str0m
//! peer. The same flows in real headless Chromium are in `tests/browser.rs`.

mod common;

use common::{free_port, Crossbar, NodeConfig, TempDir, CARRIER, LOCALHOST};
use futures_util::{SinkExt, StreamExt};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------
// HTTP

/// One HTTP/1.1 request with `Connection: close`; returns (status, body).
pub fn http(addr: SocketAddr, method: &str, host: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to the HTTP port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

pub fn login(cb: &Crossbar, host: &str, user: &str, password: &str) -> (u16, serde_json::Value) {
    let body = serde_json::json!({"username": user, "password": password}).to_string();
    let host = format!("{host}:{}", cb.config.http.port());
    let (status, body) = http(cb.config.http, "POST", &host, "/api/v1/softphone/login", &body);
    (status, serde_json::from_str(&body).unwrap_or(serde_json::Value::Null))
}

// ---------------------------------------------------------------------------
// SIP over WebSocket

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

pub struct WsSip {
    ws: Ws,
    pub local: SocketAddr,
    /// A random `*.invalid` host, as JsSIP uses in Via and Contact.
    pub invalid_host: String,
}

impl WsSip {
    pub async fn connect(addr: SocketAddr, host: &str) -> WsSip {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect to the HTTP port");
        let local = tcp.local_addr().unwrap();
        let mut req = format!("ws://{host}/sip").into_client_request().unwrap();
        req.headers_mut().insert("Sec-WebSocket-Protocol", "sip".parse().unwrap());
        let (ws, resp) = tokio_tungstenite::client_async(req, tcp).await.expect("WebSocket upgrade");
        assert_eq!(resp.headers().get("Sec-WebSocket-Protocol").map(|v| v.to_str().unwrap()), Some("sip"));
        WsSip { ws, local, invalid_host: format!("{:08x}.invalid", rand_u32()) }
    }

    pub async fn send(&mut self, text: String) {
        self.ws.send(Message::text(text)).await.expect("send on the WebSocket");
    }

    /// The next text message within `wait` (None: timeout or closed).
    pub async fn recv(&mut self, wait: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => return Some(t.to_string()),
                Ok(Some(Ok(Message::Binary(b)))) => return Some(String::from_utf8_lossy(&b).to_string()),
                Ok(Some(Ok(_))) => continue,
                _ => return None,
            }
        }
    }

    /// The next message that is a request with this method (skipping others).
    pub async fn recv_request(&mut self, method: &str, wait: Duration) -> Option<String> {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            let m = self.recv(deadline - Instant::now()).await?;
            if m.starts_with(&format!("{method} ")) {
                return Some(m);
            }
        }
        None
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }

    /// REGISTERs `ext` of `domain` with digest `user`/`password`; returns the final status.
    pub async fn register(&mut self, ext: &str, domain: &str, user: &str, password: &str) -> u16 {
        let call_id = format!("reg-{:x}", rand_u32());
        let mut cseq = 1;
        let mut auth: Option<String> = None;
        for _ in 0..3 {
            let msg = format!(
                "REGISTER sip:{domain} SIP/2.0\r\nVia: SIP/2.0/WS {h};branch=z9hG4bK{b:x}\r\nMax-Forwards: 69\r\nTo: <sip:{ext}@{domain}>\r\nFrom: <sip:{ext}@{domain}>;tag=t{b:x}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} REGISTER\r\nContact: <sip:x{b:x}@{h};transport=ws>;+sip.ice;reg-id=1;+sip.instance=\"<urn:uuid:00000000-0000-4000-8000-000000000001>\";expires=600\r\nExpires: 600\r\n{a}Allow: INVITE,ACK,CANCEL,BYE,OPTIONS\r\nContent-Length: 0\r\n\r\n",
                h = self.invalid_host,
                b = rand_u32(),
                a = auth.as_ref().map(|v| format!("Authorization: {v}\r\n")).unwrap_or_default(),
            );
            self.send(msg).await;
            let resp = self.recv(Duration::from_secs(5)).await.expect("a response to REGISTER");
            let code = common::status_code(resp.as_bytes()).unwrap_or(0);
            if code == 401 && auth.is_none() {
                let ch = common::header(&resp, "WWW-Authenticate").expect("a challenge");
                auth = Some(crossbar::sip::auth::respond(ch, "REGISTER", &format!("sip:{domain}"), user, password).unwrap());
                cseq += 1;
                continue;
            }
            return code;
        }
        0
    }
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish() as u32
}

/// An answer to `req` (a SIP request text) with `code`, echoing the dialog headers.
pub fn answer(req: &str, code: u16, reason: &str, to_tag: &str, contact: Option<&str>, sdp: Option<&str>) -> String {
    let mut out = format!("SIP/2.0 {code} {reason}\r\n");
    for line in req.split("\r\n").skip(1) {
        if line.is_empty() {
            break;
        }
        let name = line.split(':').next().unwrap_or("").trim().to_ascii_lowercase();
        match name.as_str() {
            "via" | "v" | "from" | "f" | "call-id" | "i" | "cseq" | "record-route" => out.push_str(&format!("{line}\r\n")),
            "to" | "t" => {
                if line.contains("tag=") {
                    out.push_str(&format!("{line}\r\n"));
                } else {
                    out.push_str(&format!("{line};tag={to_tag}\r\n"));
                }
            }
            _ => {}
        }
    }
    if let Some(c) = contact {
        out.push_str(&format!("Contact: {c}\r\n"));
    }
    match sdp {
        Some(s) => out.push_str(&format!("Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{s}", s.len())),
        None => out.push_str("Content-Length: 0\r\n\r\n"),
    }
    out
}

/// A carrier INVITE for `did` from 127.0.0.2 with a plain G.711 offer.
fn carrier_invite(cb: &Crossbar, sock: &UdpSocket, did: &str, rtp_port: u16) -> String {
    let me = sock.local_addr().unwrap();
    let sdp = format!("v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\nm=audio {rtp_port} RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n", ip = me.ip());
    format!(
        "INVITE sip:{did}@{to} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK{b:x};rport\r\nMax-Forwards: 70\r\nFrom: \"Carrier\" <sip:15559990000@{ip}>;tag=c{b:x}\r\nTo: <sip:{did}@{to}>\r\nCall-ID: carrier-{b:x}@{ip}\r\nCSeq: 1 INVITE\r\nContact: <sip:carrier@{me}>\r\nContent-Type: application/sdp\r\nContent-Length: {len}\r\n\r\n{sdp}",
        to = cb.sip_addr(),
        ip = me.ip(),
        b = rand_u32(),
        len = sdp.len(),
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

// ---------------------------------------------------------------------------
// Tests

#[test]
fn softphone_login_contract() {
    let cb = Crossbar::start(NodeConfig::new());
    let port = cb.config.http.port();

    let (status, v) = login(&cb, "acme.localhost", "alice@acme.localhost", "alice-demo-pw");
    assert_eq!(status, 200, "{v}\n{}", cb.report());
    assert_eq!(v["sip_uri"], "sip:1001@acme.localhost");
    assert_eq!(v["ws_url"], format!("ws://acme.localhost:{port}/sip"));
    assert_eq!(v["ice_servers"], serde_json::json!([]));
    let user = v["sip_username"].as_str().unwrap();
    assert!(user.starts_with("1001~"), "{v}");
    let pw = v["sip_password"].as_str().unwrap();
    assert!(pw.len() >= 20 && pw != "acme1001pw", "a fresh secret, not the extension's SIP password");
    let exp = v["expires_at"].as_str().unwrap();
    assert!(exp.len() == 20 && exp.ends_with('Z') && exp.as_bytes()[10] == b'T', "RFC 3339: {exp}");

    // carol is a globex agent: refused on acme's address; her own tenant accepts her.
    let (status, v) = login(&cb, "acme.localhost", "carol@globex.localhost", "carol-demo-pw");
    assert_eq!(status, 401, "{v}");
    assert_eq!(v["error"]["code"], "invalid_credentials");
    let (status, v) = login(&cb, "globex.localhost", "carol@globex.localhost", "carol-demo-pw");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["sip_uri"], "sip:2001@globex.localhost");

    // Wrong password.
    let (status, v) = login(&cb, "acme.localhost", "alice@acme.localhost", "wrong");
    assert_eq!(status, 401);
    assert_eq!(v["error"]["code"], "invalid_credentials");
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));

    // Unknown tenant address; method and body errors.
    let (status, v) = login(&cb, "nobody.localhost", "alice@acme.localhost", "alice-demo-pw");
    assert_eq!((status, v["error"]["code"].as_str()), (404, Some("unknown_tenant")));
    let (status, _) = http(cb.config.http, "GET", "acme.localhost", "/api/v1/softphone/login", "");
    assert_eq!(status, 405);
    let (status, _) = http(cb.config.http, "POST", "acme.localhost", "/api/v1/softphone/login", "{nope");
    assert_eq!(status, 400);

    // Failed logins are rate-limited per account: the right password no longer helps.
    for _ in 0..5 {
        let (status, _) = login(&cb, "acme.localhost", "bob@acme.localhost", "guess");
        assert_eq!(status, 401);
    }
    let (status, v) = login(&cb, "acme.localhost", "bob@acme.localhost", "bob-demo-pw");
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], "rate_limited");
    // ... and per source address: 20 failures from 127.0.0.1 over any accounts (7 so far).
    for i in 0..13 {
        let (status, _) = login(&cb, "acme.localhost", &format!("u{i}@acme.localhost"), "guess");
        assert_eq!(status, 401, "attempt {i}");
    }
    let (status, v) = login(&cb, "acme.localhost", "alice@acme.localhost", "alice-demo-pw");
    assert_eq!(status, 429, "{v}");
}

#[test]
fn sip_over_websocket_register_call_and_close() {
    let cb = Crossbar::start(NodeConfig::new());
    let rt = runtime();
    rt.block_on(async {
        let (status, creds) = login(&cb, "acme.localhost", "alice@acme.localhost", "alice-demo-pw");
        assert_eq!(status, 200);
        let (user, pw) = (creds["sip_username"].as_str().unwrap(), creds["sip_password"].as_str().unwrap());
        let host = format!("acme.localhost:{}", cb.config.http.port());
        let mut ws = WsSip::connect(cb.config.http, &host).await;

        // CRLF keep-alive gets a CRLF.
        ws.send("\r\n\r\n".into()).await;
        assert_eq!(ws.recv(Duration::from_secs(3)).await.as_deref(), Some("\r\n"));

        // Wrong short-lived password, another tenant's realm: refused. The granted one: 200.
        assert_eq!(ws.register("1001", "acme.localhost", user, "not-the-password").await, 403);
        assert_eq!(ws.register("1001", "acme.localhost", "1001~1", pw).await, 403, "expired credentials");
        assert_eq!(ws.register("1002", "acme.localhost", user, pw).await, 403, "credentials of 1001 do not register 1002");
        assert_eq!(ws.register("1001", "acme.localhost", user, pw).await, 200, "{}", cb.report());

        // A carrier call to the DID goes down this WebSocket, to the .invalid contact.
        let carrier = UdpSocket::bind((CARRIER, 0)).unwrap();
        carrier.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let invite = carrier_invite(&cb, &carrier, common::ACME_DID, 40000);
        carrier.send_to(invite.as_bytes(), cb.sip_addr()).unwrap();
        let inv = ws.recv_request("INVITE", Duration::from_secs(5)).await.unwrap_or_else(|| panic!("INVITE over WS\n{}", cb.report()));
        assert!(inv.starts_with("INVITE sip:x") && inv.to_ascii_lowercase().contains(".invalid;transport=ws"), "{inv}");
        assert!(inv.contains("Via: SIP/2.0/WS "), "{inv}");
        ws.send(answer(&inv, 486, "Busy Here", "b1", None, None)).await;
        let resp = common::collect_final(&carrier, Duration::from_secs(5));
        assert_eq!(resp.and_then(|r| common::status_code(&r)), Some(486));

        // Closing the WebSocket removes the registration: the DID gets 480 now.
        ws.close().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let invite = carrier_invite(&cb, &carrier, common::ACME_DID, 40000);
        let resp = common::udp_exchange(&carrier, cb.sip_addr(), invite.as_bytes(), Duration::from_secs(3));
        assert_eq!(resp.and_then(|r| common::status_code(&r)), Some(480), "{}", cb.report());
    });
    let _ = LOCALHOST;
}

// ---------------------------------------------------------------------------
// SIP over secure WebSocket (WSS): a rustls client, a certificate from config

#[test]
fn sip_over_secure_websocket_is_served_with_the_configured_certificate() {
    let dir = TempDir::new("wss");
    let ck = rcgen::generate_simple_self_signed(vec!["acme.localhost".to_string()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let wss = SocketAddr::new(LOCALHOST, free_port(LOCALHOST));
    let mut cfg = NodeConfig::new();
    cfg.http_extra = format!("tls = \"{wss}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"", cert.display(), key.display());
    let cb = Crossbar::start(cfg);
    runtime().block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(rustls_pki_types::CertificateDer::from(ck.cert.der().to_vec())).unwrap();
        let tls_cfg = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(wss).await.expect("connect to the WSS port");
        let name = rustls_pki_types::ServerName::try_from("acme.localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls_cfg)).connect(name, tcp).await.expect("TLS handshake with the configured certificate");
        let mut req = "wss://acme.localhost/sip".into_client_request().unwrap();
        req.headers_mut().insert("Sec-WebSocket-Protocol", "sip".parse().unwrap());
        let (mut ws, resp) = tokio_tungstenite::client_async(req, tls).await.expect("WebSocket upgrade over TLS");
        assert_eq!(resp.headers().get("Sec-WebSocket-Protocol").map(|v| v.to_str().unwrap()), Some("sip"));
        let register = "REGISTER sip:acme.localhost SIP/2.0\r\nVia: SIP/2.0/WSS wss1.invalid;branch=z9hG4bKwss1\r\nMax-Forwards: 69\r\nTo: <sip:1001@acme.localhost>\r\nFrom: <sip:1001@acme.localhost>;tag=w1\r\nCall-ID: wss-1\r\nCSeq: 1 REGISTER\r\nContact: <sip:w1@wss1.invalid;transport=ws>\r\nExpires: 600\r\nContent-Length: 0\r\n\r\n";
        ws.send(Message::text(register)).await.unwrap();
        let answer = loop {
            match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => break t.to_string(),
                Ok(Some(Ok(_))) => continue,
                other => panic!("no SIP answer over WSS: {other:?}\n{}", cb.report()),
            }
        };
        assert!(answer.starts_with("SIP/2.0 401") && answer.contains("realm=\"acme.localhost\""), "{answer}");
    });
}
