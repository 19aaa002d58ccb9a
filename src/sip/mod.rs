//! SIP: transports, sans-IO transactions, digest auth, registrar, SDP and the
//! B2BUA call logic. rsipstack's `sip` module parses and prints messages.

pub mod auth;
pub mod b2bua;
pub mod msg;
pub mod registrar;
pub mod sdp;
pub mod transaction;
pub mod transport;
pub mod websocket;
