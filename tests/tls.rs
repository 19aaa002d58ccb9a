//! SIP over TLS (RFC 3261 §26.2, "sips"-less TLS transport): a real rustls
//! client talks to a crossbar node listening with a certificate from config.

mod common;

use common::{free_port, Crossbar, NodeConfig, TempDir};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

fn tls_client(addr: SocketAddr, ca_der: Vec<u8>) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls_pki_types::CertificateDer::from(ca_der)).unwrap();
    let cfg = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let sock = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    rustls::StreamOwned::new(conn, sock)
}

/// Reads one SIP message (headers + Content-Length body) from the stream.
fn read_message(s: &mut impl Read) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).expect("response before timeout"), 1, "connection closed early");
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let len: usize = common::header(&head, "Content-Length").and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    head + &String::from_utf8_lossy(&body)
}

#[test]
fn options_and_register_challenge_over_tls() {
    let dir = TempDir::new("tls");
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    let tls_addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), free_port(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    let mut cfg = NodeConfig::new();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    cfg.sip_extra = format!("tls = \"{tls_addr}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"", cert.display(), key.display());
    let cb = Crossbar::start(cfg);

    let mut s = tls_client(tls_addr, ck.cert.der().to_vec());
    let local = s.sock.local_addr().unwrap();
    let options = format!(
        "OPTIONS sip:acme.localhost SIP/2.0\r\nVia: SIP/2.0/TLS {local};branch=z9hG4bKtls1\r\nMax-Forwards: 70\r\nFrom: <sip:probe@acme.localhost>;tag=t1\r\nTo: <sip:acme.localhost>\r\nCall-ID: tls-options\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    );
    s.write_all(options.as_bytes()).unwrap();
    let resp = read_message(&mut s);
    assert!(resp.starts_with("SIP/2.0 200"), "OPTIONS over TLS: {resp}\n{}", cb.report());
    assert!(resp.contains("Via: SIP/2.0/TLS"), "the response comes back on the TLS connection: {resp}");

    // A REGISTER over the same connection is challenged in the tenant's realm.
    let register = format!(
        "REGISTER sip:acme.localhost SIP/2.0\r\nVia: SIP/2.0/TLS {local};branch=z9hG4bKtls2\r\nMax-Forwards: 70\r\nFrom: <sip:1001@acme.localhost>;tag=t2\r\nTo: <sip:1001@acme.localhost>\r\nCall-ID: tls-reg\r\nCSeq: 1 REGISTER\r\nContact: <sip:1001@{local};transport=tls>\r\nContent-Length: 0\r\n\r\n"
    );
    s.write_all(register.as_bytes()).unwrap();
    let resp = read_message(&mut s);
    assert!(resp.starts_with("SIP/2.0 401"), "{resp}");
    assert!(resp.contains("realm=\"acme.localhost\"") && resp.contains("algorithm=SHA-256"), "{resp}");

    // A plain-TCP client on the TLS port gets nothing SIP back and the node stays up.
    let mut plain = TcpStream::connect(tls_addr).unwrap();
    plain.write_all(options.as_bytes()).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut junk = [0u8; 64];
    let n = plain.read(&mut junk).unwrap_or(0);
    assert!(!String::from_utf8_lossy(&junk[..n]).contains("SIP/2.0 200"));
    assert_eq!(cb.options_status(), Some(200), "node still answers after a failed handshake");
}
