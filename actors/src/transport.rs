//! Transports: what a client or backend connection runs over (ranch's transport behaviour).
//! Plain TCP today; TLS slots in here as more variants without touching sessions.

use crate::rt::TcpStream;
use std::net::SocketAddr;
use std::time::Duration;

/// A client connection as the session sees it.
pub type ClientStream = TcpStream;
/// A backend connection as the session sees it.
pub type BackendStream = TcpStream;

/// Dials a backend within `timeout`, with Nagle off (WebSocket frames are latency-bound).
pub async fn dial(addr: SocketAddr, timeout: Duration) -> std::io::Result<BackendStream> {
    let s = crate::rt::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    Ok(s)
}
