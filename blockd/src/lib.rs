//! blockd: a block-device gateway with a built-in snapshot engine.
//!
//! The daemon serves volumes over NBD ([`nbd`]), keeps them in a local
//! store ([`volume`]) with state in SQLite ([`state`]), and is driven
//! through an HTTP/JSON control API on a Unix socket ([`api`]).

pub mod api;
pub mod attach;
pub mod claims;
pub mod cloud;
pub mod config;
pub mod coordinator;
pub mod daemon;
pub mod durable;
pub mod fuse;
pub mod host;
pub mod magic;
pub mod metrics;
pub mod nbd;
pub mod outcome;
pub mod quiet;
pub mod repo;
pub mod snapshot;
pub mod state;
pub mod volume;
