//! The runtime seam: every call into the async runtime goes through here, so moving from
//! async-std (deprecated upstream) to smol is a change to this file alone.
//!
//! Sockets are our own thin types over `async_io::Async` — the reactor async-std runs on and
//! smol is built on — so the gateway controls two things the async-std types hide: the
//! listen backlog, and how a read waits for the next readiness event (see
//! [`TcpStream`]'s `poll_read`). Plain TCP tunnels copy bulk bytes with `splice(2)` through
//! [`SpliceBuf`] (in `rt/splice.rs`), under the same readiness discipline.

use futures::io::{AsyncRead, AsyncWrite};
use std::future::Future;
use std::io::{self, Read};
use std::net::{self, Shutdown, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_io::Async;

pub use async_std::task::JoinHandle;

mod splice;
pub use splice::{SpliceBuf, SpliceError};

/// Connections a listener lets the kernel queue before accepting them (std's default is 128;
/// nginx uses 511): bursts of new sessions must not time out in the SYN queue.
const LISTEN_BACKLOG: i32 = 1024;

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

/// A listening TCP socket.
pub struct TcpListener(Async<net::TcpListener>);

impl TcpListener {
    /// Binds with `SO_REUSEADDR` and a backlog of [`LISTEN_BACKLOG`].
    pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        Ok(TcpListener(Async::new(net::TcpListener::from(socket))?))
    }

    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let (s, peer) = self.0.accept().await?;
        Ok((TcpStream(Arc::new(s), Drained::default()), peer))
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.get_ref().local_addr()
    }
}

/// A TCP connection. Cloning shares the socket (the tunnel's two copy loops use one each).
#[derive(Clone)]
pub struct TcpStream(Arc<Async<net::TcpStream>>, Drained);

/// Whether this handle's last read returned less than it asked for: a TCP socket's receive
/// queue was empty at that moment, so another read now would only return EAGAIN.
#[derive(Clone, Copy, Default)]
struct Drained(bool);

impl TcpStream {
    pub async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
        Ok(TcpStream(
            Arc::new(Async::<net::TcpStream>::connect(addr).await?),
            Drained::default(),
        ))
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.0.get_ref().set_nodelay(on)
    }

    /// Half-closes the connection (`Shutdown::Write` sends a FIN).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.0.get_ref().shutdown(how)
    }

    /// Waits for data and copies it without consuming it.
    pub async fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.peek(buf).await
    }
}

impl AsyncRead for TcpStream {
    /// One read attempt per readiness event, and none that is known to find nothing:
    /// - after a short read (the receive queue was emptied), the next call waits for the next
    ///   event instead of reading;
    /// - async-io reports each delivered event once: a `Ready` from `poll_readable` right
    ///   after a read is the event whose data was just read, so it registers again rather than
    ///   read again.
    ///
    /// Either way such a read would have returned EAGAIN: a `recvfrom` per message and
    /// direction saved. No data is missed: re-arming the one-shot epoll interest reports data
    /// that arrived in between at once.
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let io = &*this.0;
        if std::mem::take(&mut this.1 .0) {
            match wait_readable(io, cx) {
                Poll::Ready(Ok(())) => {}
                other => return other.map(|r| r.map(|()| 0)),
            }
        }
        loop {
            match io.get_ref().read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Ok(n) => {
                    this.1 .0 = n > 0 && n < buf.len();
                    return Poll::Ready(Ok(n));
                }
                res => return Poll::Ready(res),
            }
            match wait_readable(io, cx) {
                Poll::Ready(Ok(())) => continue, // a genuinely new event
                other => return other.map(|r| r.map(|()| 0)),
            }
        }
    }
}

/// Registers for the next readable event, skipping the one already consumed: `Pending` once
/// registered, `Ready` only for an event newer than the last read.
fn wait_readable(io: &Async<net::TcpStream>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    match io.poll_readable(cx) {
        Poll::Ready(Ok(())) => io.poll_readable(cx),
        other => other,
    }
}

impl AsyncWrite for TcpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut &*self.0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut &*self.0).poll_flush(cx)
    }

    /// Flushes only, like async-io's; use [`TcpStream::shutdown`] for a FIN.
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut &*self.0).poll_close(cx)
    }
}
