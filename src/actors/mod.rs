//! The supervision tree (ractor): node → tenant supervisor → tenants → calls.

pub mod call;
pub mod dispatch;
pub mod node;
pub mod tenant;
