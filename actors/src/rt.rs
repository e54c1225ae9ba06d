//! The runtime seam: every call into the async runtime goes through here, so moving from
//! async-std (deprecated upstream) to smol is a change to this file alone.

use std::future::Future;
use std::time::Duration;

pub use async_std::net::{TcpListener, TcpStream};
pub use async_std::task::JoinHandle;

/// Runs a future to completion on the current thread (process entry points only).
pub fn block_on<F: Future>(f: F) -> F::Output {
    async_std::task::block_on(f)
}

/// Spawns a detached task on the executor.
pub fn spawn<F>(f: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    async_std::task::spawn(f)
}

pub async fn sleep(d: Duration) {
    async_std::task::sleep(d).await
}

/// `Err(Elapsed)` when `f` did not finish within `d`.
pub async fn timeout<F: Future>(d: Duration, f: F) -> Result<F::Output, Elapsed> {
    async_std::future::timeout(d, f).await.map_err(|_| Elapsed)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

impl std::fmt::Display for Elapsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("timed out")
    }
}

/// A one-shot timer that can be re-armed without allocating; polled in the relay loop.
pub type Timer = async_io::Timer;
