//! The wsgate engine. Control plane in actors (supervisor, listener, session, pool, health
//! checker: one file each, their messages in `messages`), data plane in tight loops (`relay`).

pub mod balance;
pub mod config;
pub mod handshake;
pub mod rt;
