//! Administration: the local admin socket (the console over WebSocket comes later).

pub mod admin;
