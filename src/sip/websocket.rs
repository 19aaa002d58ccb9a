//! SIP over WebSocket (RFC 7118): one SIP message per WebSocket message.
//!
//! The HTTP server (`console::http`) does the upgrade on `/sip` with the `sip`
//! subprotocol and hands the stream here. From then on the connection is a
//! transport like a TCP one: received messages go to the node's [`Sink`] with a
//! [`Peer`] of proto `Ws`/`Wss`, and whatever the node sends to that peer goes
//! down this connection ([`Transports::attach`]). Browsers cannot be connected
//! to, so requests for a WebSocket-registered user (its Contact host is
//! `*.invalid`, RFC 7118 §5.2) can only travel on the connection it registered
//! on: the registrar keeps that connection as the binding's peer, and when the
//! connection closes the node drops its registrations ([`Sink::on_closed`]).

use super::msg::{Peer, Proto};
use super::transport::Transports;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::{Message, Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

/// The WebSocket subprotocol of RFC 7118 §4.
pub const SUBPROTOCOL: &str = "sip";

/// Largest SIP message accepted in one WebSocket message.
const MAX_MESSAGE: usize = 64 * 1024;

/// A connection that sends nothing (not even a CRLF keep-alive or a WebSocket
/// ping) for this long is closed; JsSIP re-REGISTERs every few minutes.
const IDLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// What one received WebSocket message is, for the SIP layer.
#[derive(Debug, PartialEq, Eq)]
pub enum Received<'a> {
    /// A SIP message (RFC 7118 §5: exactly one per WebSocket message).
    Sip(&'a [u8]),
    /// A CRLF keep-alive (RFC 5626 §3.5.1 over WebSocket): answered with one CRLF.
    KeepAlive,
    /// Nothing for SIP (WebSocket control frames, empty messages).
    Ignore,
}

/// Classifies a WebSocket message (sans-IO: the connection loop acts on it).
pub fn classify(msg: &Message) -> Received<'_> {
    let data: &[u8] = match msg {
        Message::Text(t) => t.as_bytes(),
        Message::Binary(b) => b,
        _ => return Received::Ignore,
    };
    if data.is_empty() {
        Received::Ignore
    } else if data.iter().all(|b| *b == b'\r' || *b == b'\n') {
        if data.len() >= 4 {
            Received::KeepAlive
        } else {
            Received::Ignore
        }
    } else {
        Received::Sip(data)
    }
}

/// The WebSocket configuration for SIP connections (message size bounds).
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().max_message_size(Some(MAX_MESSAGE)).max_frame_size(Some(MAX_MESSAGE))
}

/// Runs one upgraded connection until it closes. `stream` is the raw socket
/// (TCP or TLS) right after the `101 Switching Protocols` was written.
pub async fn run<S>(stream: S, addr: SocketAddr, secure: bool, transports: Arc<Transports>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ws = WebSocketStream::from_raw_socket(stream, Role::Server, Some(ws_config())).await;
    let proto = if secure { Proto::Wss } else { Proto::Ws };
    let peer = Peer { proto, addr };
    let sink = transports.message_sink();
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    transports.attach(addr, tx.clone());
    tracing::debug!(from = %addr, "SIP WebSocket connection open");
    let (mut wr, mut rd) = ws.split();
    let writer = tokio::spawn(async move {
        while let Some(bytes) = rx.recv().await {
            // SIP is text; a non-UTF-8 body (never sent by crossbar today) goes as binary.
            let msg = match String::from_utf8(bytes) {
                Ok(s) => Message::text(s),
                Err(e) => Message::binary(e.into_bytes()),
            };
            if wr.send(msg).await.is_err() {
                break;
            }
        }
        let _ = wr.close().await;
    });
    loop {
        let next = match tokio::time::timeout(IDLE_TIMEOUT, rd.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => {
                tracing::debug!(from = %addr, "SIP WebSocket error: {e}");
                break;
            }
            Ok(None) => break,
            Err(_) => {
                tracing::debug!(from = %addr, "SIP WebSocket idle for too long; closing it");
                break;
            }
        };
        if matches!(next, Message::Close(_)) {
            break;
        }
        match classify(&next) {
            Received::Sip(bytes) => sink.on_message(bytes, peer),
            Received::KeepAlive => {
                let _ = tx.send(b"\r\n".to_vec());
            }
            Received::Ignore => {}
        }
    }
    transports.detach(addr, &tx);
    drop(tx);
    writer.abort();
    tracing::debug!(from = %addr, "SIP WebSocket connection closed");
    sink.on_closed(peer);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_sip_keepalive_and_control_frames() {
        let m = Message::text("REGISTER sip:acme.localhost SIP/2.0\r\n\r\n");
        assert!(matches!(classify(&m), Received::Sip(b) if b.starts_with(b"REGISTER")));
        assert_eq!(classify(&Message::text("\r\n\r\n")), Received::KeepAlive);
        assert_eq!(classify(&Message::binary(b"\r\n\r\n".to_vec())), Received::KeepAlive);
        assert_eq!(classify(&Message::text("\r\n")), Received::Ignore);
        assert_eq!(classify(&Message::Ping(vec![1].into())), Received::Ignore);
        assert_eq!(classify(&Message::text("")), Received::Ignore);
    }
}
