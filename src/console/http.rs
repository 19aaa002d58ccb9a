//! A small HTTP/1.1 server: the softphone page (`/phone` and its assets from
//! `web_root`), the login API (`POST /api/v1/softphone/login`) and SIP over
//! WebSocket (`GET /sip` with `Upgrade: websocket`, subprotocol `sip`).
//!
//! The tenant is taken from the Host header (`acme.localhost:8080` → the tenant
//! whose domain is `acme.localhost`, or whose id is the first label) and
//! confirmed at login: an agent of another tenant is refused there.
//!
//! Bounded everywhere: header section 16 KiB, body 16 KiB, 30 s to send a
//! request, 100 requests per connection.

use super::softphone::{self, LoginLimiter};
use crate::actors::node::Node;
use crate::config::TenantConfig;
use crate::sip::transport::{TlsSettings, TransportError};
use parking_lot::Mutex;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 16 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_REQUESTS_PER_CONNECTION: usize = 100;

/// Where the HTTP server listens, once started.
#[derive(Debug, Clone, Copy)]
pub struct HttpAddrs {
    pub http: SocketAddr,
    pub https: Option<SocketAddr>,
}

struct Server {
    node: Arc<Node>,
    web_root: PathBuf,
    ttl: Duration,
    limiter: Mutex<LoginLimiter>,
}

/// Binds `[http]` (when configured) and serves it until the process ends.
pub async fn start(node: Arc<Node>) -> Result<Option<HttpAddrs>, TransportError> {
    let Some(cfg) = node.config.http.clone() else { return Ok(None) };
    let listener = TcpListener::bind(cfg.listen).await.map_err(|source| TransportError::Bind { proto: "HTTP", addr: cfg.listen, source })?;
    let http = listener.local_addr().unwrap_or(cfg.listen);
    let mut https = None;
    let mut tls = None;
    if let (Some(addr), Some(cert), Some(key)) = (cfg.tls, &cfg.tls_cert, &cfg.tls_key) {
        let acceptor = crate::sip::transport::tls_acceptor(&TlsSettings { addr, cert: cert.clone(), key: key.clone() })?;
        let l = TcpListener::bind(addr).await.map_err(|source| TransportError::Bind { proto: "HTTPS", addr, source })?;
        https = Some(l.local_addr().unwrap_or(addr));
        tls = Some((l, acceptor));
    }
    node.transports.set_ws_ports(http.port(), https.map(|a| a.port()));
    let server = Arc::new(Server {
        node: node.clone(),
        web_root: cfg.web_root.clone(),
        ttl: Duration::from_secs(cfg.softphone_credential_ttl_s),
        limiter: Mutex::new(LoginLimiter::new(softphone::Limits::default())),
    });
    {
        let server = server.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, addr)) => {
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(server.clone().connection(stream, addr, false));
                    }
                    Err(e) => {
                        tracing::warn!("HTTP accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
    if let Some((l, acceptor)) = tls {
        tokio::spawn(async move {
            loop {
                let (stream, addr) = match l.accept().await {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!("HTTPS accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let (server, acceptor) = (server.clone(), acceptor.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => server.connection(tls, addr, true).await,
                        _ => tracing::debug!("HTTPS handshake with {addr} failed"),
                    }
                });
            }
        });
    }
    Ok(Some(HttpAddrs { http, https }))
}

/// One parsed request.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.header(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }

    /// Host without port, lower case.
    pub fn host(&self) -> Option<String> {
        let h = self.header("Host")?.trim();
        let host = if h.starts_with('[') { h.split(']').next().map(|s| format!("{s}]")).unwrap_or_default() } else { h.rsplit_once(':').map(|(a, _)| a).unwrap_or(h).to_string() };
        Some(host.to_ascii_lowercase())
    }
}

/// The result of reading one request off a buffer (sans-IO).
#[derive(Debug)]
pub enum Parsed {
    Complete(Request, usize),
    Incomplete,
    Invalid(&'static str),
}

pub fn parse_request(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; 48];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return if buf.len() > MAX_HEAD { Parsed::Invalid("header section too large") } else { Parsed::Incomplete },
        Err(_) => return Parsed::Invalid("malformed HTTP request"),
    };
    let hs: Vec<(String, String)> = req.headers.iter().map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).trim().to_string())).collect();
    let len = match hs.iter().find(|(n, _)| n.eq_ignore_ascii_case("content-length")) {
        Some((_, v)) => match v.parse::<usize>() {
            Ok(n) if n <= MAX_BODY => n,
            Ok(_) => return Parsed::Invalid("body too large"),
            Err(_) => return Parsed::Invalid("invalid Content-Length"),
        },
        None => 0,
    };
    if hs.iter().any(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding")) {
        return Parsed::Invalid("chunked bodies are not accepted");
    }
    if buf.len() < head_len + len {
        return Parsed::Incomplete;
    }
    let path = req.path.unwrap_or("/").split('?').next().unwrap_or("/").to_string();
    Parsed::Complete(
        Request { method: req.method.unwrap_or("").to_string(), path, headers: hs, body: buf[head_len..head_len + len].to_vec() },
        head_len + len,
    )
}

/// A response to write.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    fn new(status: u16, content_type: &str, body: Vec<u8>) -> Response {
        Response { status, headers: vec![("Content-Type", content_type.to_string())], body }
    }

    pub fn json(status: u16, v: &serde_json::Value) -> Response {
        Response::new(status, "application/json", v.to_string().into_bytes())
    }

    pub fn error(status: u16, code: &str, message: &str) -> Response {
        Response::json(status, &serde_json::json!({"error": {"code": code, "message": message}}))
    }

    fn to_bytes(&self, keep_alive: bool) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        for (n, v) in &self.headers {
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        out.push_str("Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n");
        out.push_str(&format!("Content-Length: {}\r\nConnection: {}\r\n\r\n", self.body.len(), if keep_alive { "keep-alive" } else { "close" }));
        let mut b = out.into_bytes();
        b.extend_from_slice(&self.body);
        b
    }
}

fn reason(code: u16) -> &'static str {
    match code {
        101 => "Switching Protocols",
        200 => "OK",
        302 => "Found",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        415 => "Unsupported Media Type",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        _ => "Error",
    }
}

/// The tenant a Host names: its domain (`acme.localhost`), or its id as the first
/// label (`acme.example.com`).
pub fn tenant_for_host<'a>(tenants: &'a [TenantConfig], host: &str) -> Option<&'a TenantConfig> {
    let host = host.to_ascii_lowercase();
    tenants.iter().find(|t| t.domain.eq_ignore_ascii_case(&host)).or_else(|| {
        let label = host.split('.').next()?;
        tenants.iter().find(|t| t.id == label)
    })
}

impl Server {
    async fn connection<S>(self: Arc<Self>, mut stream: S, addr: SocketAddr, secure: bool)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut buf: Vec<u8> = Vec::with_capacity(4096);
        let mut chunk = [0u8; 4096];
        for _ in 0..MAX_REQUESTS_PER_CONNECTION {
            let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
            let req = loop {
                match parse_request(&buf) {
                    Parsed::Complete(req, used) => {
                        buf.drain(..used);
                        break req;
                    }
                    Parsed::Invalid(why) => {
                        let _ = stream.write_all(&Response::error(400, "bad_request", why).to_bytes(false)).await;
                        return;
                    }
                    Parsed::Incomplete => {}
                }
                match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                    Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            if req.path == "/sip" && req.has_token("Upgrade", "websocket") {
                match upgrade_response(&req) {
                    Ok(resp) => {
                        if stream.write_all(&resp).await.is_err() {
                            return;
                        }
                        crate::sip::websocket::run(stream, addr, secure, self.node.transports.clone()).await;
                    }
                    Err(resp) => {
                        let _ = stream.write_all(&resp.to_bytes(false)).await;
                    }
                }
                return;
            }
            let keep_alive = !req.has_token("Connection", "close");
            let resp = self.route(&req, addr.ip(), secure).await;
            if stream.write_all(&resp.to_bytes(keep_alive)).await.is_err() || !keep_alive {
                return;
            }
        }
    }

    async fn route(&self, req: &Request, source: IpAddr, secure: bool) -> Response {
        match (req.method.as_str(), req.path.as_str()) {
            ("POST", "/api/v1/softphone/login") => self.login(req, source, secure).await,
            (_, "/api/v1/softphone/login") => Response::error(405, "method_not_allowed", "use POST with a JSON body {\"username\", \"password\"}"),
            ("GET", "/") => Response { status: 302, headers: vec![("Location", "/phone".into())], body: Vec::new() },
            ("GET", "/healthz") => Response::new(200, "text/plain", b"ok\n".to_vec()),
            ("GET", "/phone") | ("GET", "/phone/") => self.file("phone.html"),
            ("GET", p) => match p.strip_prefix('/') {
                Some(name) if is_asset_name(name) => self.file(name),
                _ => Response::error(404, "not_found", "no such page"),
            },
            _ => Response::error(404, "not_found", "no such page"),
        }
    }

    fn file(&self, name: &str) -> Response {
        let path = self.web_root.join(name);
        match std::fs::read(&path) {
            Ok(body) => Response::new(200, content_type(&path), body),
            Err(_) => {
                if name == "phone.html" {
                    tracing::warn!(web_root = %self.web_root.display(), "softphone page missing: build it with `make web`");
                }
                Response::error(404, "not_found", "no such file (is the web build done? `make web`)")
            }
        }
    }

    async fn login(&self, req: &Request, source: IpAddr, secure: bool) -> Response {
        #[derive(serde::Deserialize)]
        struct Body {
            username: String,
            password: String,
        }
        let Some(host) = req.host() else { return Response::error(400, "bad_request", "the Host header is missing") };
        let Some(tenant) = tenant_for_host(&self.node.config.tenants, &host) else {
            return Response::error(404, "unknown_tenant", "no tenant is served at this address; open the softphone at your company's subdomain");
        };
        let Ok(body) = serde_json::from_slice::<Body>(&req.body) else {
            return Response::error(400, "bad_request", "expected a JSON body {\"username\": \"...\", \"password\": \"...\"}");
        };
        let account = format!("{}/{}", tenant.id, body.username.to_ascii_lowercase());
        let now = Instant::now();
        if let Some(wait) = self.limiter.lock().blocked(&account, source, now) {
            let mut r = Response::error(429, "rate_limited", &format!("too many failed logins for this account or address; try again in {} s", wait.as_secs().max(1)));
            r.headers.push(("Retry-After", wait.as_secs().max(1).to_string()));
            return r;
        }
        // The agent must belong to the tenant of this address: carol@globex is unknown on acme.
        let agent = tenant.agents.iter().find(|a| a.username.eq_ignore_ascii_case(body.username.trim())).cloned();
        let hash = agent.as_ref().map(|a| a.password_hash.clone()).unwrap_or_else(|| softphone::DUMMY_HASH.to_string());
        let password = body.password;
        let ok = tokio::task::spawn_blocking(move || softphone::verify_password(&hash, &password)).await.unwrap_or(false);
        let Some(agent) = agent.filter(|_| ok) else {
            self.limiter.lock().failed(&account, source, Instant::now());
            tracing::info!(tenant = %tenant.id, "softphone login refused");
            return Response::error(401, "invalid_credentials", "wrong username or password for this company");
        };
        self.limiter.lock().succeeded(&account);
        let grant = softphone::grant(&self.node.nonces, &tenant.id, &tenant.domain, &agent.extension, agent.display_name.clone(), self.ttl, SystemTime::now());
        let host_port = req.header("Host").unwrap_or(&host).trim().to_string();
        let ws_url = format!("{}://{host_port}/sip", if secure { "wss" } else { "ws" });
        tracing::info!(tenant = %tenant.id, extension = %agent.extension, "softphone login");
        Response::json(
            200,
            &serde_json::json!({
                "sip_uri": grant.sip_uri,
                "sip_username": grant.sip_username,
                "sip_password": grant.sip_password,
                "ws_url": ws_url,
                "expires_at": softphone::rfc3339(grant.expires_at),
                "ice_servers": [],
                "display_name": grant.display_name.unwrap_or_else(|| agent.username.clone()),
                "extension": agent.extension,
                "tenant": tenant.name.clone(),
            }),
        )
    }
}

/// A file name in the web root: no directories, no dot files.
fn is_asset_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
}

fn content_type(p: &Path) -> &'static str {
    match p.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "json" | "map" => "application/json",
        "ico" => "image/x-icon",
        _ => "application/octet-stream",
    }
}

/// `101 Switching Protocols` for a valid RFC 6455 + RFC 7118 upgrade, or the refusal.
pub fn upgrade_response(req: &Request) -> Result<Vec<u8>, Response> {
    if req.method != "GET" {
        return Err(Response::error(405, "method_not_allowed", "WebSocket upgrades use GET"));
    }
    let Some(key) = req.header("Sec-WebSocket-Key") else { return Err(Response::error(400, "bad_request", "Sec-WebSocket-Key is missing")) };
    if !req.has_token("Sec-WebSocket-Protocol", crate::sip::websocket::SUBPROTOCOL) {
        return Err(Response::error(426, "subprotocol_required", "SIP over WebSocket needs the `sip` subprotocol (RFC 7118)"));
    }
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.trim().as_bytes());
    Ok(format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: sip\r\n\r\n"
    )
    .into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests_in_pieces_and_bounds_them() {
        let raw = b"POST /api/v1/softphone/login?x=1 HTTP/1.1\r\nHost: Acme.localhost:8080\r\nContent-Length: 4\r\n\r\nabcdGET / HTTP/1.1\r\n\r\n";
        assert!(matches!(parse_request(&raw[..20]), Parsed::Incomplete));
        assert!(matches!(parse_request(&raw[..70]), Parsed::Incomplete));
        let Parsed::Complete(r, used) = parse_request(raw) else { panic!() };
        assert_eq!((r.method.as_str(), r.path.as_str(), r.body.as_slice()), ("POST", "/api/v1/softphone/login", &b"abcd"[..]));
        assert_eq!(r.host().as_deref(), Some("acme.localhost"));
        assert!(matches!(parse_request(&raw[used..]), Parsed::Complete(_, _)));
        assert!(matches!(parse_request(b"POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"), Parsed::Invalid(_)));
        assert!(matches!(parse_request(b"\x01\x02 nonsense\r\n\r\n"), Parsed::Invalid(_)));
        assert!(matches!(parse_request(&vec![b'a'; MAX_HEAD + 10]), Parsed::Invalid(_) | Parsed::Incomplete));
    }

    #[test]
    fn websocket_upgrade_needs_the_sip_subprotocol() {
        let ok = b"GET /sip HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: sip\r\n\r\n";
        let Parsed::Complete(r, _) = parse_request(ok) else { panic!() };
        let resp = String::from_utf8(upgrade_response(&r).unwrap()).unwrap();
        // RFC 6455 §1.3's example key and answer.
        assert!(resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{resp}");
        assert!(resp.contains("Sec-WebSocket-Protocol: sip"));
        let no_proto = String::from_utf8_lossy(ok).replace("Sec-WebSocket-Protocol: sip\r\n", "");
        let Parsed::Complete(r, _) = parse_request(no_proto.as_bytes()) else { panic!() };
        assert_eq!(upgrade_response(&r).unwrap_err().status, 426);
    }

    #[test]
    fn asset_names_cannot_escape_the_web_root() {
        assert!(is_asset_name("phone.js"));
        assert!(!is_asset_name("../secret"));
        assert!(!is_asset_name(".env"));
        assert!(!is_asset_name("a/b.js"));
        assert!(!is_asset_name(""));
    }
}
