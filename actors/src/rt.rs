//! The runtime seam: every call into the async runtime goes through here, so moving from
//! async-std (deprecated upstream) to smol is a change to this file alone.
//!
//! Sockets are our own thin types, so the gateway controls what the async-std types hide:
//! the listen backlog, and how a socket waits for readiness. Listeners and connections are
//! registered once, edge-triggered, in an epoll set of our own whose descriptor is a source
//! in async-io's reactor (the one async-std runs on and smol is built on; `reactor`), and
//! a read waits for the next event only when the last one emptied the socket (see
//! [`TcpStream`]'s `poll_read`).
//! Plain TCP tunnels copy bulk bytes with `splice(2)` through [`SpliceBuf`] (in
//! `rt/splice.rs`), under the same readiness discipline. Timers and timeouts are a wheel of
//! coarse ticks of our own (`rt/timer.rs`), driven by one async-io timer.

use futures::io::{AsyncRead, AsyncWrite};
use std::future::Future;
use std::io;
use std::net::{self, Shutdown, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

mod reactor;

/// A spawned task's handle: awaiting it gives the task's output; dropping it detaches the
/// task (it runs on), as async-std's `JoinHandle` does.
pub struct JoinHandle<T>(Option<async_global_executor::Task<T>>);

impl<T> Future for JoinHandle<T> {
    type Output = T;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match self.0.as_mut() {
            Some(task) => Pin::new(task).poll(cx),
            None => Poll::Pending, // `None` only inside `drop`
        }
    }
}

impl<T> Drop for JoinHandle<T> {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.detach();
        }
    }
}

mod splice;
pub use splice::{SpliceBuf, SpliceError};

/// Connections a listener lets the kernel queue before accepting them (std's default is 128;
/// nginx uses 511): bursts of new sessions must not time out in the SYN queue.
const LISTEN_BACKLOG: i32 = 1024;

/// Runs a future to completion on the current thread (process entry points only).
pub fn block_on<F: Future>(f: F) -> F::Output {
    async_std::task::block_on(f)
}

/// Spawns a task on async-std's executor (its worker threads, `ASYNC_STD_THREAD_COUNT`),
/// without async-std's task-locals layer: that wrapper sets a thread-local around every
/// poll and moves the future through one more layer at spawn; nothing here reads task
/// locals. The executor is the one async-std configures, so it is set up first.
pub fn spawn<F>(f: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    static RUNTIME: std::sync::Once = std::sync::Once::new();
    // async-std configures the global executor (thread count, names) on its first use.
    RUNTIME.call_once(|| async_std::task::block_on(async {}));
    JoinHandle(Some(async_global_executor::spawn(f)))
}

/// Lets every other ready task run once before this one goes on.
pub async fn yield_now() {
    async_std::task::yield_now().await
}

pub async fn sleep(d: Duration) {
    Timer::after(d).await
}

/// `Err(Elapsed)` when `f` did not finish within `d` (a timer is armed only if `f` has to
/// wait).
pub fn timeout<F: Future>(d: Duration, f: F) -> timer::Timeout<F> {
    timer::timeout(d, f)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

impl std::fmt::Display for Elapsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("timed out")
    }
}

mod timer;
/// A one-shot timer that can be re-armed without allocating; polled in the relay loop
/// (`timer`: a coarse wheel, one async-io timer for the earliest deadline).
pub use timer::Timer;

/// A listening TCP socket, registered edge-triggered in `reactor` like the connections:
/// an accept that finds the queue empty waits for the next event without re-arming.
pub struct TcpListener(Arc<reactor::Source<net::TcpListener>>);

impl TcpListener {
    /// Binds with `SO_REUSEADDR` and a backlog of `LISTEN_BACKLOG`.
    pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), None)?;
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        Ok(TcpListener(reactor::Source::new(net::TcpListener::from(
            socket,
        ))?))
    }

    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        use rustix::net::{acceptfrom_with, SocketFlags};
        let src = &*self.0;
        // accept4 with SOCK_NONBLOCK: no fcntl/ioctl afterwards (one syscall per session).
        let (fd, peer) = std::future::poll_fn(|cx| {
            src.read.poll_io(cx, || loop {
                match acceptfrom_with(&src.io, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC) {
                    Ok((fd, Some(peer))) => match SocketAddr::try_from(peer) {
                        Ok(peer) => return Ok((fd, peer)),
                        Err(_) => drop(fd), // not an IP peer: cannot happen on a TCP listener
                    },
                    Ok((fd, None)) => drop(fd),
                    Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(io::Error::from(e)), // EAGAIN: WouldBlock
                }
            })
        })
        .await?;
        Ok((
            TcpStream::new(reactor::Source::new(net::TcpStream::from(fd))?, false),
            peer,
        ))
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.io.local_addr()
    }
}

/// A TCP connection, registered edge-triggered in `reactor` (no re-arm per wait). Cloning
/// shares the socket (the tunnel's two copy loops use one each).
#[derive(Clone)]
pub struct TcpStream {
    src: Arc<reactor::Source>,
    /// Whether this handle's last read returned less than it asked for, or nothing: the
    /// socket's receive queue was empty at that moment, so another read needs a new event
    /// first.
    drained: bool,
    /// Set by [`TcpStream::hold_for_fin`]: this handle's writes are sent with `MSG_MORE`.
    last: bool,
}

impl TcpStream {
    fn new(src: Arc<reactor::Source>, drained: bool) -> TcpStream {
        TcpStream {
            src,
            drained,
            last: false,
        }
    }

    /// Connects without blocking: a non-blocking `connect`, then the first writable event.
    pub async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), None)?;
        match socket.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INPROGRESS.raw_os_error()) => {}
            Err(e) => return Err(e),
        }
        let src = reactor::Source::new(net::TcpStream::from(socket))?;
        std::future::poll_fn(|cx| src.write.poll(cx)).await;
        if let Some(e) = src.io.take_error()? {
            return Err(e);
        }
        // Registered before it was even connected, so every byte the peer sends comes with a
        // read event: the first read waits for one (a read now would find nothing).
        Ok(TcpStream::new(src, true))
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.src.io.set_nodelay(on)
    }

    /// Half-closes the connection (`Shutdown::Write` sends a FIN, with whatever writes
    /// [`TcpStream::hold_for_fin`] kept back).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.src.io.shutdown(how)
    }

    /// Marks this handle's next writes as its last before a `shutdown(Write)` or a close:
    /// they are sent with `MSG_MORE`, so the kernel keeps a short last write back and sends
    /// it with the FIN, in one segment instead of two (a closing handshake's last frame; the
    /// peer is woken once). Any later write without it, the shutdown or the close, sends
    /// them.
    pub fn hold_for_fin(&mut self) {
        self.last = true;
    }

    /// Waits for data and copies it without consuming it.
    pub async fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        let src = &*self.src;
        std::future::poll_fn(|cx| src.read.poll_io(cx, || src.io.peek(buf))).await
    }
}

/// One `recv(2)` as a raw system call (rustix). std's `read` goes through glibc's wrapper,
/// a thread-cancellation point: enabling and disabling asynchronous cancellation around each
/// call was ~110 instructions of the relay's ~4,300 per echoed message (bench/profile.sh
/// callgrind), for threads that are never cancelled.
fn recv(s: &net::TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match rustix::net::recv(s, &mut *buf, rustix::net::RecvFlags::empty()) {
            Ok((n, _)) => return Ok(n),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// One `send(2)` as a raw system call, with `MSG_NOSIGNAL` as std's: a peer that has gone
/// away is an `EPIPE` error, not a `SIGPIPE`.
fn send(s: &net::TcpStream, buf: &[u8], more: bool) -> io::Result<usize> {
    use rustix::net::SendFlags;
    let flags = if more {
        SendFlags::NOSIGNAL | SendFlags::MORE
    } else {
        SendFlags::NOSIGNAL
    };
    loop {
        match rustix::net::send(s, buf, flags) {
            Ok(n) => return Ok(n),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

impl AsyncRead for TcpStream {
    /// One read attempt per readiness event, and none that is known to find nothing: after a
    /// short read or `EAGAIN` (the receive queue was emptied) the next attempt waits for the
    /// next event. The event flag is consumed before each attempt, so data that arrives
    /// during it raises the flag again and is not missed.
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let src = &*this.src;
        loop {
            let event = src.read.take();
            let wait = this.drained && !event && !src.hup.load(Ordering::Acquire);
            if wait && src.read.poll(cx).is_pending() {
                return Poll::Pending;
            }
            match recv(&src.io, buf) {
                Ok(n) => {
                    this.drained = n > 0 && n < buf.len();
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => this.drained = true,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for TcpStream {
    /// Writes at once; only after `EAGAIN` waits for the next writable event.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let (src, more) = (&*self.src, self.last);
        src.write.poll_io(cx, || send(&src.io, buf, more))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Flushes only (a socket has nothing to flush); use [`TcpStream::shutdown`] for a FIN.
    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
