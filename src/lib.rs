//! crossbar — a multi-tenant, actor-based softswitch.
//!
//! # Layout
//!
//! - [`config`]: node and tenant configuration (TOML), validated at start-up.
//! - [`sip`]: SIP transports, sans-IO transactions, digest auth, SDP.
//! - [`media`]: RTP port pool and the anchored RTP/RTCP relay.
//! - [`actors`]: the ractor supervision tree: node, tenants, calls; `dispatch` routes received SIP.
#![forbid(unsafe_code)]

pub mod actors;
pub mod config;
pub mod media;
pub mod sip;
