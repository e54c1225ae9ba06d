//! Kernel-side copying for plain TCP tunnels: `splice(2)` socket → pipe → socket, so bulk
//! bytes never pass through user space (two copies per byte saved, per direction).
//!
//! A [`SpliceBuf`] is one direction's kernel buffer. It holds a pipe only while the pipe
//! holds data: the pipe is taken just before a splice into it (after the source reported
//! readable, so a session waiting for data holds none) and given back as soon as it is
//! empty again, to a small per-thread pool of empty pipes ([`POOL_CAP`]; excess pipes are
//! closed). File descriptors are scarce (thousands of idle sessions hold two sockets each);
//! pipes are held only by directions moving bytes at that moment, or pushed back by their
//! destination. A pipe that still holds data when its `SpliceBuf` is dropped is closed,
//! never pooled.
//!
//! Linux only; elsewhere [`SpliceBuf::poll_fill`] reports [`SpliceError::Unavailable`] and
//! the caller copies through user space.

use super::TcpStream;
use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering, Ordering::Relaxed};
use std::task::{ready, Context, Poll};

/// Empty pipes kept per thread for reuse (two fds each).
const POOL_CAP: usize = 64;

/// Pipe capacity asked for (`F_SETPIPE_SZ`; the default is 64 KiB). A 64 KiB WebSocket
/// message (65,550 bytes with its header) then fits one splice each way instead of a full
/// 64 KiB one plus a 14-byte tail: measured 1.15–1.45x the messages per proxy CPU-second of
/// 64 KiB pipes. The kernel caps the size (`pipe-max-size`, 1 MiB by default) and, past a
/// user's `pipe-user-pages-soft`, refuses it: the pipe then keeps its default size. Pipe
/// pages are only references to the socket buffers' pages while bytes pass through.
const PIPE_SIZE: usize = 256 * 1024;
const DEFAULT_PIPE_SIZE: usize = 64 * 1024;

/// Pipes open in the process, pooled or in use. Past this many a direction copies through
/// user space instead: directions pushed back by slow readers each keep a pipe, and their fds
/// must not starve the listener of sockets.
const MAX_PIPES: usize = 1024;
static OPEN_PIPES: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// A non-blocking, close-on-exec pipe and its capacity.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    cap: usize,
}

impl Pipe {
    /// An empty pipe: from this thread's pool, else a new one.
    fn take() -> io::Result<Pipe> {
        let pooled = POOL
            .try_with(|p| p.try_borrow_mut().ok().and_then(|mut p| p.pop()))
            .ok()
            .flatten();
        if let Some(p) = pooled {
            return Ok(p);
        }
        if OPEN_PIPES.fetch_add(1, Relaxed) >= MAX_PIPES {
            OPEN_PIPES.fetch_sub(1, Relaxed);
            return Err(io::Error::other("too many pipes open"));
        }
        let (r, w) = sys::pipe().inspect_err(|_| {
            OPEN_PIPES.fetch_sub(1, Relaxed);
        })?;
        // Counted from here on: Drop uncounts it.
        let cap = sys::resize(&r);
        Ok(Pipe { r, w, cap })
    }

    /// Pools an empty pipe, or closes it when the pool is full (or the thread is ending).
    fn give_back(self) {
        let _ = POOL.try_with(move |p| {
            if let Ok(mut p) = p.try_borrow_mut() {
                if p.len() < POOL_CAP {
                    p.push(self);
                }
            }
        });
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        OPEN_PIPES.fetch_sub(1, Relaxed);
    }
}

/// Why a splice into the pipe did not happen.
#[derive(Debug)]
pub enum SpliceError {
    /// No pipe could be had (e.g. the fd limit) or the socket cannot splice: nothing was
    /// moved, the bytes are still in the socket; copy through user space instead.
    Unavailable(io::Error),
    /// The socket failed, as a read would have.
    Io(io::Error),
}

/// One direction's kernel-side buffer: bytes spliced in from a socket, then out to another.
#[derive(Default)]
pub struct SpliceBuf {
    pipe: Option<Pipe>,
    /// Bytes in the pipe (exact: what splices in moved, less what splices out moved).
    len: usize,
}

impl SpliceBuf {
    pub const fn new() -> SpliceBuf {
        SpliceBuf { pipe: None, len: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Splices what `from`'s receive queue holds, up to the pipe's capacity, into the
    /// (empty) pipe: `Ok(n)`, `Ok(0)` at end of stream. The same readiness discipline as
    /// [`TcpStream`]'s `poll_read`, and sharing its state: the event flag is consumed before
    /// each attempt, and after a splice that moved less than asked (the receive queue was
    /// emptied) or found nothing, the next attempt waits for the next readable event. While
    /// it waits, no pipe is held.
    pub fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut TcpStream,
    ) -> Poll<Result<usize, SpliceError>> {
        debug_assert!(self.is_empty(), "fill into a pipe that holds data");
        let src = &*from.src;
        loop {
            let event = src.read.take();
            if from.drained && !event && !src.hup.load(Ordering::Acquire) {
                ready!(src.read.poll(cx));
            }
            let pipe = match &mut self.pipe {
                Some(p) => p,
                None => self
                    .pipe
                    .insert(Pipe::take().map_err(SpliceError::Unavailable)?),
            };
            match sys::splice(src.io.as_fd(), pipe.w.as_fd(), pipe.cap) {
                Ok(n) => {
                    from.drained = n > 0 && n < pipe.cap;
                    self.len = n;
                    if n == 0 {
                        self.release();
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Nothing to move: give the pipe back before waiting.
                    self.release();
                    from.drained = true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(sys::EINVAL) => {
                    self.release();
                    return Poll::Ready(Err(SpliceError::Unavailable(e)));
                }
                Err(e) => {
                    self.release();
                    return Poll::Ready(Err(SpliceError::Io(e)));
                }
            }
        }
    }

    /// Splices the pipe's bytes out to `to` until the pipe is empty (waiting for writable
    /// when `to`'s send queue is full), then gives the pipe back.
    pub fn poll_drain(&mut self, cx: &mut Context<'_>, to: &TcpStream) -> Poll<io::Result<()>> {
        let dst = &*to.src;
        while self.len > 0 {
            let Some(pipe) = &self.pipe else {
                self.len = 0; // unreachable: bytes are only ever in a held pipe
                break;
            };
            dst.write.take();
            match sys::splice(pipe.r.as_fd(), dst.io.as_fd(), self.len) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.len = self.len.saturating_sub(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready!(dst.write.poll(cx)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        self.release();
        Poll::Ready(Ok(()))
    }

    /// Gives an empty pipe back to the pool; a pipe with data is closed.
    fn release(&mut self) {
        if let Some(p) = self.pipe.take() {
            if self.len == 0 {
                p.give_back();
            }
        }
        self.len = 0;
    }
}

impl Drop for SpliceBuf {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(target_os = "linux")]
mod sys {
    use rustix::pipe::{self, PipeFlags, SpliceFlags};
    use std::io;
    use std::os::fd::{BorrowedFd, OwnedFd};

    pub const EINVAL: i32 = rustix::io::Errno::INVAL.raw_os_error();

    /// A non-blocking, close-on-exec pipe: (read end, write end).
    pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
        Ok(pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?)
    }

    /// Asks for [`super::PIPE_SIZE`]; the capacity the pipe has.
    pub fn resize(r: &OwnedFd) -> usize {
        pipe::fcntl_setpipe_size(r, super::PIPE_SIZE)
            .or_else(|_| pipe::fcntl_getpipe_size(r))
            .unwrap_or(super::DEFAULT_PIPE_SIZE)
    }

    /// One non-blocking `splice` of up to `len` bytes (one end is a pipe).
    pub fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
        Ok(pipe::splice(from, None, to, None, len, flags)?)
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    use std::io;
    use std::os::fd::{BorrowedFd, OwnedFd};

    pub const EINVAL: i32 = -1;

    pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
        Err(io::ErrorKind::Unsupported.into())
    }

    pub fn resize(_: &OwnedFd) -> usize {
        super::DEFAULT_PIPE_SIZE
    }

    pub fn splice(_: BorrowedFd<'_>, _: BorrowedFd<'_>, _: usize) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use crate::rt::{self, TcpListener};
    use futures::future::poll_fn;
    use futures::AsyncReadExt;
    use std::io::Write;

    /// 1 MiB spliced from one socket to another, whole and in order; the end of stream is
    /// `Ok(0)`; the emptied pipe goes back to the pool.
    #[test]
    fn splices_a_stream_whole_then_pools_the_pipe() {
        let data: Vec<u8> = (0..1usize << 20).map(|i| (i * 31 % 251) as u8).collect();
        let got = rt::block_on(async {
            let any = "127.0.0.1:0".parse().unwrap();
            let l1 = TcpListener::bind(any).await.unwrap();
            let mut peer_in = std::net::TcpStream::connect(l1.local_addr().unwrap()).unwrap();
            let (mut src, _) = l1.accept().await.unwrap();
            let l2 = TcpListener::bind(any).await.unwrap();
            let dst = rt::TcpStream::connect(l2.local_addr().unwrap())
                .await
                .unwrap();
            let (mut peer_out, _) = l2.accept().await.unwrap();
            let sent = data.clone();
            let writer = std::thread::spawn(move || {
                peer_in.write_all(&sent).unwrap();
                peer_in.shutdown(std::net::Shutdown::Write).unwrap();
            });
            let reader = rt::spawn(async move {
                let mut v = Vec::new();
                peer_out.read_to_end(&mut v).await.unwrap();
                v
            });
            let mut buf = SpliceBuf::new();
            let mut total = 0;
            loop {
                let n = match poll_fn(|cx| buf.poll_fill(cx, &mut src)).await {
                    Ok(n) => n,
                    Err(e) => panic!("fill: {e:?}"),
                };
                if n == 0 {
                    break;
                }
                poll_fn(|cx| buf.poll_drain(cx, &dst)).await.unwrap();
                assert!(
                    buf.is_empty() && buf.pipe.is_none(),
                    "pipe held while empty"
                );
                total += n;
            }
            assert_eq!(total, data.len());
            assert!(
                POOL.with(|p| p.borrow().len()) >= 1,
                "the empty pipe was pooled"
            );
            assert!(OPEN_PIPES.load(Relaxed) >= 1);
            dst.shutdown(std::net::Shutdown::Write).unwrap();
            writer.join().unwrap();
            reader.await
        });
        assert!(got == data, "spliced bytes differ");
    }
}
