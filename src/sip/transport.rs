//! SIP transports: UDP sockets and TCP connections (RFC 3261 §18).
//!
//! A thin driver: it reads datagrams and TCP frames, hands each message's bytes
//! to a [`Sink`] with the [`Peer`] it came from, and sends bytes to a peer.
//! Everything SIP-specific above framing lives elsewhere.

use super::msg::{Peer, Proto};
use dashmap::DashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

/// Largest SIP message accepted on a stream (bigger frames close the connection).
const MAX_STREAM_MESSAGE: usize = 64 * 1024;
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;
/// A receive timestamp older than this comes from a wall-clock step, not from a wait.
const MAX_STAMP_AGE: Duration = Duration::from_secs(10);

/// Receives every message (one datagram / one framed TCP message).
pub trait Sink: Send + Sync + 'static {
    fn on_message(&self, bytes: &[u8], peer: Peer) {
        self.on_message_at(bytes, peer, Instant::now());
    }
    /// A message that reached the host at `received` (the kernel's receive time on
    /// UDP, where a datagram can wait in the socket's buffer before it is read).
    fn on_message_at(&self, bytes: &[u8], peer: Peer, received: Instant);
    /// A connection-oriented peer is gone (WebSocket closed): its registrations go with it.
    fn on_closed(&self, _peer: Peer) {}
}

/// The node's SIP sockets; cheap to share.
pub struct Transports {
    udp: Vec<Arc<UdpSocket>>,
    udp_local: Vec<SocketAddr>,
    tcp_listeners: parking_lot::Mutex<Vec<TcpListener>>,
    tcp_local: Vec<SocketAddr>,
    tls_listener: parking_lot::Mutex<Option<(TcpListener, tokio_rustls::TlsAcceptor)>>,
    tls_local: Option<SocketAddr>,
    conns: DashMap<SocketAddr, mpsc::UnboundedSender<Vec<u8>>>,
    /// Where received messages go; set once by [`Transports::start`].
    sink: std::sync::OnceLock<Arc<dyn Sink>>,
    /// The HTTP port (SIP over WS) and WSS port, once the HTTP server is up (Via/Contact).
    ws_ports: std::sync::OnceLock<(u16, Option<u16>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot bind SIP {proto} on {addr}: {source} (is another process using the port? change [sip] in the config)")]
    Bind { proto: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("cannot load TLS certificate/key {path}: {why} (set sip.tls_cert and sip.tls_key to PEM files)")]
    Tls { path: String, why: String },
}

/// TLS listener settings: address and PEM certificate chain and private key.
pub struct TlsSettings {
    pub addr: SocketAddr,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// Installs the process-wide rustls crypto provider (ring) once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub(crate) fn tls_acceptor(t: &TlsSettings) -> Result<tokio_rustls::TlsAcceptor, TransportError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let err = |path: &std::path::Path, why: String| TransportError::Tls { path: path.display().to_string(), why };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&t.cert)
        .map_err(|e| err(&t.cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(&t.cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(err(&t.cert, "no certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&t.key).map_err(|e| err(&t.key, e.to_string()))?;
    install_crypto_provider();
    let cfg = rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key).map_err(|e| err(&t.cert, e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

impl Transports {
    pub async fn bind(udp: &[SocketAddr], tcp: &[SocketAddr], tls: Option<&TlsSettings>) -> Result<Arc<Transports>, TransportError> {
        let mut sockets = Vec::new();
        let mut udp_local = Vec::new();
        for addr in udp {
            let s = bind_udp(*addr).map_err(|source| TransportError::Bind { proto: "UDP", addr: *addr, source })?;
            udp_local.push(s.local_addr().unwrap_or(*addr));
            sockets.push(Arc::new(s));
        }
        let mut listeners = Vec::new();
        let mut tcp_local = Vec::new();
        for addr in tcp {
            let l = TcpListener::bind(addr).await.map_err(|source| TransportError::Bind { proto: "TCP", addr: *addr, source })?;
            tcp_local.push(l.local_addr().unwrap_or(*addr));
            listeners.push(l);
        }
        let mut tls_listener = None;
        let mut tls_local = None;
        if let Some(t) = tls {
            let acceptor = tls_acceptor(t)?;
            let l = TcpListener::bind(t.addr).await.map_err(|source| TransportError::Bind { proto: "TLS", addr: t.addr, source })?;
            tls_local = Some(l.local_addr().unwrap_or(t.addr));
            tls_listener = Some((l, acceptor));
        }
        Ok(Arc::new(Transports {
            tls_listener: parking_lot::Mutex::new(tls_listener),
            tls_local,
            udp: sockets,
            udp_local,
            tcp_listeners: parking_lot::Mutex::new(listeners),
            tcp_local,
            conns: DashMap::new(),
            sink: std::sync::OnceLock::new(),
            ws_ports: std::sync::OnceLock::new(),
        }))
    }

    pub fn udp_port(&self) -> Option<u16> {
        self.udp_local.first().map(|a| a.port())
    }

    pub fn tcp_port(&self) -> Option<u16> {
        self.tcp_local.first().map(|a| a.port())
    }

    /// The port crossbar listens on for `proto` (for Via and Contact).
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_local.map(|a| a.port())
    }

    pub fn port(&self, proto: Proto) -> u16 {
        match proto {
            Proto::Udp => self.udp_port().or(self.tcp_port()),
            Proto::Tcp => self.tcp_port().or(self.udp_port()),
            Proto::Tls => self.tls_port().or(self.tcp_port()),
            Proto::Ws => self.ws_ports.get().map(|p| p.0),
            Proto::Wss => self.ws_ports.get().map(|p| p.1.unwrap_or(p.0)),
        }
        .unwrap_or(5060)
    }

    /// Whether a stream connection to `addr` is open.
    pub fn has_connection(&self, addr: SocketAddr) -> bool {
        self.conns.contains_key(&addr)
    }

    /// Records the ports SIP over WebSocket is served on (by the HTTP server).
    pub fn set_ws_ports(&self, ws: u16, wss: Option<u16>) {
        let _ = self.ws_ports.set((ws, wss));
    }

    /// A connection the HTTP server accepted (SIP over WebSocket): what is sent to
    /// `addr` goes down `tx` until [`Transports::detach`].
    pub fn attach(&self, addr: SocketAddr, tx: mpsc::UnboundedSender<Vec<u8>>) {
        self.conns.insert(addr, tx);
    }

    pub fn detach(&self, addr: SocketAddr, tx: &mpsc::UnboundedSender<Vec<u8>>) {
        self.conns.remove_if(&addr, |_, v| v.same_channel(tx));
    }

    /// The sink received messages go to (the node), for transports started elsewhere.
    pub fn message_sink(&self) -> Arc<dyn Sink> {
        self.sink()
    }

    /// Starts the receive loops; runs until the process ends.
    pub fn start(self: &Arc<Self>, sink: Arc<dyn Sink>) {
        let _ = self.sink.set(sink.clone());
        for sock in &self.udp {
            let sock = sock.clone();
            let sink = sink.clone();
            tokio::spawn(async move { udp_loop(sock, sink).await });
        }
        self.start_tls(sink.clone());
        for listener in self.tcp_listeners.lock().drain(..) {
            let me = self.clone();
            let sink = sink.clone();
            tokio::spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((stream, addr)) => {
                            let _ = stream.set_nodelay(true);
                            me.clone().run_connection(stream, addr, Proto::Tcp, sink.clone());
                        }
                        Err(e) => {
                            tracing::warn!("TCP accept failed: {e}");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                    }
                }
            });
        }
    }

    fn start_tls(self: &Arc<Self>, sink: Arc<dyn Sink>) {
        let Some((listener, acceptor)) = self.tls_listener.lock().take() else { return };
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let (stream, addr) = match listener.accept().await {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!("TLS accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let (me, sink, acceptor) = (me.clone(), sink.clone(), acceptor.clone());
                // The handshake runs in its own task so a slow client cannot stall the listener.
                tokio::spawn(async move {
                    match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            me.run_connection(tls, addr, Proto::Tls, sink);
                        }
                        Ok(Err(e)) => tracing::debug!("TLS handshake with {addr} failed: {e}"),
                        Err(_) => tracing::debug!("TLS handshake with {addr} timed out"),
                    }
                });
            }
        });
    }

    /// Sends bytes to a peer. UDP is fire-and-forget; TCP reuses the peer's
    /// connection or opens one.
    pub fn send(self: &Arc<Self>, peer: Peer, bytes: Vec<u8>) {
        match peer.proto {
            Proto::Udp => {
                let Some(sock) = self.udp_for(peer.addr) else {
                    tracing::warn!("no UDP socket to send to {}", peer.addr);
                    return;
                };
                match sock.try_send_to(&bytes, peer.addr) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        tokio::spawn(async move {
                            let _ = sock.send_to(&bytes, peer.addr).await;
                        });
                    }
                    Err(e) => tracing::debug!("UDP send to {} failed: {e}", peer.addr),
                }
            }
            Proto::Tcp | Proto::Tls | Proto::Ws | Proto::Wss => {
                if let Some(tx) = self.conns.get(&peer.addr) {
                    if tx.send(bytes).is_ok() {
                        return;
                    }
                    drop(tx);
                    self.conns.remove(&peer.addr);
                    tracing::debug!("TCP connection to {} is gone", peer.addr);
                    return;
                }
                if peer.proto != Proto::Tcp {
                    // crossbar only uses TLS and WebSocket connections peers opened (a
                    // browser cannot be connected to; no outbound TLS yet).
                    tracing::debug!("no {} connection to {}", peer.proto.via_name(), peer.addr);
                    return;
                }
                let me = self.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(std::time::Duration::from_secs(5), TcpStream::connect(peer.addr)).await {
                        Ok(Ok(stream)) => {
                            let _ = stream.set_nodelay(true);
                            let tx = me.clone().run_connection(stream, peer.addr, Proto::Tcp, me.sink());
                            let _ = tx.send(bytes);
                        }
                        _ => tracing::debug!("TCP connect to {} failed", peer.addr),
                    }
                });
            }
        }
    }

    fn sink(&self) -> Arc<dyn Sink> {
        self.sink.get().cloned().unwrap_or_else(|| Arc::new(NullSink))
    }

    fn udp_for(&self, dest: SocketAddr) -> Option<Arc<UdpSocket>> {
        self.udp
            .iter()
            .zip(&self.udp_local)
            .find(|(_, l)| l.is_ipv4() == dest.is_ipv4())
            .map(|(s, _)| s.clone())
            .or_else(|| self.udp.first().cloned())
    }

    fn run_connection<S>(self: Arc<Self>, stream: S, addr: SocketAddr, proto: Proto, sink: Arc<dyn Sink>) -> mpsc::UnboundedSender<Vec<u8>>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        self.conns.insert(addr, tx.clone());
        tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                if wr.write_all(&b).await.is_err() {
                    break;
                }
            }
        });
        let me = self.clone();
        let tx2 = tx.clone();
        tokio::spawn(async move {
            let peer = Peer { proto, addr };
            let mut buf: Vec<u8> = Vec::with_capacity(8192);
            let mut chunk = vec![0u8; 16 * 1024];
            'conn: loop {
                // Frame what is buffered before reading more (pipelined messages).
                loop {
                    match next_frame(&buf) {
                        Frame::Message(len) => {
                            let msg: Vec<u8> = buf.drain(..len).collect();
                            sink.on_message(&msg, peer);
                        }
                        Frame::KeepAlive(len) => {
                            // RFC 5626 §3.5.1: a double-CRLF ping gets a single-CRLF pong.
                            buf.drain(..len);
                            if len >= 4 {
                                let _ = tx2.send(b"\r\n".to_vec());
                            }
                        }
                        Frame::Incomplete => break,
                        Frame::Invalid(why) => {
                            tracing::debug!("closing TCP connection from {addr}: {why}");
                            if let Some(resp) = super::msg::bad_request_raw(&buf, "crossbar", why) {
                                let _ = tx2.send(resp);
                            }
                            break 'conn;
                        }
                    }
                }
                if buf.len() > MAX_STREAM_MESSAGE {
                    break;
                }
                match rd.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            me.conns.remove_if(&addr, |_, v| v.same_channel(&tx2));
        });
        tx
    }
}

struct NullSink;
impl Sink for NullSink {
    fn on_message_at(&self, _: &[u8], _: Peer, _: Instant) {}
}

enum Frame {
    Message(usize),
    KeepAlive(usize),
    Incomplete,
    Invalid(&'static str),
}

/// Stream framing (RFC 3261 §18.3): headers end at CRLFCRLF, Content-Length
/// is mandatory and gives the body size.
fn next_frame(buf: &[u8]) -> Frame {
    let crlfs = buf.iter().take_while(|b| **b == b'\r' || **b == b'\n').count();
    if crlfs > 0 {
        return Frame::KeepAlive(crlfs);
    }
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_STREAM_MESSAGE { Frame::Invalid("header section too large") } else { Frame::Incomplete };
    };
    let head = &buf[..end];
    let mut length: Option<usize> = None;
    for line in head.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|b| *b == b':') else { continue };
        let name = String::from_utf8_lossy(&line[..colon]);
        let name = name.trim();
        if name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("l") {
            let v = String::from_utf8_lossy(&line[colon + 1..]);
            match v.trim().parse::<usize>() {
                Ok(n) if n <= MAX_STREAM_MESSAGE => length = Some(n),
                _ => return Frame::Invalid("invalid Content-Length"),
            }
        }
    }
    let Some(len) = length else { return Frame::Invalid("Content-Length is required on stream transports") };
    let total = end + 4 + len;
    if buf.len() >= total {
        Frame::Message(total)
    } else {
        Frame::Incomplete
    }
}

fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let domain = if addr.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    s.set_nonblocking(true)?;
    // Each datagram carries the time it reached the host (read with it in `udp_loop`).
    if let Err(e) = nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::ReceiveTimestampns, &true) {
        tracing::warn!("no receive timestamps on the SIP socket {addr} ({e}): waiting in its buffer goes unmeasured");
    }
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// Reads one datagram with its kernel receive time (`SO_TIMESTAMPNS`), turned into
/// an [`Instant`]; `None` when the kernel gave none.
fn recv_stamped(fd: std::os::fd::RawFd, buf: &mut [u8], cmsg: &mut [u8]) -> std::io::Result<(usize, SocketAddr, Option<Instant>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrStorage};
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let m = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(cmsg), MsgFlags::empty()).map_err(std::io::Error::from)?;
    let from = m
        .address
        .and_then(|a| a.as_sockaddr_in().map(|v| SocketAddr::V4((*v).into())).or_else(|| a.as_sockaddr_in6().map(|v| SocketAddr::V6((*v).into()))))
        .ok_or_else(|| std::io::Error::other("datagram without a source address"))?;
    let stamp = m.cmsgs().ok().and_then(|mut c| {
        c.find_map(|c| match c {
            ControlMessageOwned::ScmTimestampns(ts) => Some(Duration::new(ts.tv_sec() as u64, ts.tv_nsec() as u32)),
            _ => None,
        })
    });
    // The stamp is wall-clock time: its age, taken from now, on the monotonic clock.
    // An age beyond any socket buffer's (the wall clock was stepped) is not trusted.
    let received = stamp.and_then(|at| {
        let age = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().saturating_sub(at);
        (age < MAX_STAMP_AGE).then(|| Instant::now().checked_sub(age)).flatten()
    });
    Ok((m.bytes, from, received))
}

async fn udp_loop(sock: Arc<UdpSocket>, sink: Arc<dyn Sink>) {
    let mut buf = vec![0u8; 65536];
    let mut cmsg = nix::cmsg_space!(nix::sys::time::TimeSpec);
    loop {
        let received = sock.async_io(Interest::READABLE, || recv_stamped(sock.as_raw_fd(), &mut buf, &mut cmsg)).await;
        let (n, from, at) = match received {
            Ok(v) => v,
            Err(e) => {
                // ICMP errors (ECONNREFUSED) surface here on Linux; they are not fatal.
                tracing::trace!("UDP receive error: {e}");
                continue;
            }
        };
        let data = &buf[..n];
        if data.iter().all(|b| b.is_ascii_whitespace()) {
            continue; // keep-alive
        }
        sink.on_message_at(data, Peer { proto: Proto::Udp, addr: from }, at.unwrap_or_else(Instant::now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_pipelined_messages() {
        let m = b"OPTIONS sip:a SIP/2.0\r\nContent-Length: 3\r\n\r\nabcOPTIONS sip:b SIP/2.0\r\nl: 0\r\n\r\n";
        let Frame::Message(n) = next_frame(m) else { panic!() };
        assert_eq!(&m[n - 3..n], b"abc");
        assert!(matches!(next_frame(&m[n..]), Frame::Message(x) if x == m.len() - n));
        assert!(matches!(next_frame(b"\r\n\r\nOPT"), Frame::KeepAlive(4)));
        assert!(matches!(next_frame(b"OPTIONS sip:a SIP/2.0\r\nContent-Length: 10\r\n\r\nabc"), Frame::Incomplete));
        assert!(matches!(next_frame(b"OPTIONS sip:a SIP/2.0\r\n\r\n"), Frame::Invalid(_)));
        assert!(matches!(next_frame(b"OPTIONS sip:a SIP/2.0\r\nContent-Length: -1\r\n\r\n"), Frame::Invalid(_)));
    }
}
