//! The data plane of a `relay: "tunnel"` session: after the handshake, bytes are copied both
//! ways unchanged (as nginx does), so extensions such as permessage-deflate pass through.
//! Bytes are counted; frames are not parsed, so there are no message limits, keepalive or
//! failover in this mode.
//!
//! Between two plain TCP sockets, bulk bytes move with `splice(2)` (socket → pipe → socket,
//! never through user space), adaptively as HAProxy's `splice-auto`: a direction starts on
//! read/write and switches to splice when a read fills the largest buffer; after
//! `SMALL_RUN` splices in a row that moved less than `SMALL_SPLICE` it goes back
//! (chat-sized traffic gains nothing from the pipe's extra syscalls). TLS on either end keeps
//! the user-space copy.
//!
//! The upstream handshake is `handshake::raw_upgrade`, which keeps whatever the backend sends
//! right after its 101 (relayed first, as `pending_b2c`).

use crate::relay::{Control, Side};
use crate::rt;
use crate::transport::{Halves, ReadHalf, WriteHalf};
use futures::channel::mpsc;
use futures::future::poll_fn;
use futures::stream::FuturesUnordered;
use futures::{AsyncReadExt, StreamExt};

/// The copy buffer's largest size, and its first.
const BUF: usize = 16 * 1024;
const FIRST_BUF: usize = 1024;

/// A splice that moves less than this is small; [`SMALL_RUN`] small ones in a row send the
/// direction back to read/write.
const SMALL_SPLICE: usize = 4 * 1024;
const SMALL_RUN: u32 = 3;

/// Bytes copied each way.
#[derive(Debug, Default, Clone, Copy)]
pub struct TunnelCounts {
    pub c2b_bytes: u64,
    pub b2c_bytes: u64,
}

/// How a tunnel ended.
#[derive(Debug)]
pub enum TunnelEnd {
    ClientClosed,
    BackendClosed,
    Failed(String),
    Control(Control),
}

/// Copies bytes both ways until a side closes (the other direction then gets
/// `CLOSE_TIMEOUT` to finish, so a closing handshake passes through) or a control event
/// arrives. `pending_c2b` and `pending_b2c` are bytes already read past the handshake heads.
pub async fn copy_both(
    client: Halves,
    backend: Halves,
    pending_c2b: &[u8],
    pending_b2c: &[u8],
    control: &mut mpsc::UnboundedReceiver<Control>,
    counts: &mut TunnelCounts,
) -> TunnelEnd {
    use futures::future::{select, Either};
    let (mut c2b_total, mut b2c_total) = (0u64, 0u64);
    let end = {
        let ((client_r, client_w), (backend_r, backend_w)) = (client, backend);
        // In a FuturesUnordered each copy loop has its own waker, so a wakeup polls only the
        // loop whose socket is ready (a select would try a read on the other socket too).
        let mut copies = FuturesUnordered::new();
        copies.push(Box::pin(copy_one(
            client_r,
            backend_w,
            pending_c2b,
            &mut c2b_total,
            Side::Client,
        )));
        copies.push(Box::pin(copy_one(
            backend_r,
            client_w,
            pending_b2c,
            &mut b2c_total,
            Side::Backend,
        )));
        match select(copies.next(), control.next()).await {
            Either::Left((Some((side, r)), _)) => {
                // That side ended; the other gets CLOSE_TIMEOUT to finish passing its close.
                let _ = rt::timeout(crate::relay::CLOSE_TIMEOUT, copies.next()).await;
                match (side, r) {
                    (_, Err(e)) => TunnelEnd::Failed(e),
                    (Side::Client, Ok(())) => TunnelEnd::ClientClosed,
                    (Side::Backend, Ok(())) => TunnelEnd::BackendClosed,
                }
            }
            Either::Left((None, _)) => TunnelEnd::ClientClosed,
            Either::Right((c, _)) => TunnelEnd::Control(c.unwrap_or(Control::Close {
                within: crate::relay::CLOSE_TIMEOUT,
                code: 1011,
                reason: "internal error",
            })),
        }
    };
    counts.c2b_bytes += c2b_total;
    counts.b2c_bytes += b2c_total;
    end
}

/// Copies `from` → `to` until `from` ends, then half-closes `to`.
async fn copy_one(
    mut from: ReadHalf,
    mut to: WriteHalf,
    pending: &[u8],
    total: &mut u64,
    from_side: Side,
) -> (Side, Result<(), String>) {
    let r = copy(&mut from, &mut to, pending, total).await;
    (from_side, r)
}

async fn copy(
    from: &mut ReadHalf,
    to: &mut WriteHalf,
    pending: &[u8],
    total: &mut u64,
) -> Result<(), String> {
    if !pending.is_empty() {
        to.write_all(pending).await.map_err(|e| e.to_string())?;
        *total += pending.len() as u64;
    }
    let can_splice = from.plain().is_some() && to.plain().is_some();
    // Holds a pipe only while bytes are in it (see rt::SpliceBuf).
    let mut kernel_buf = rt::SpliceBuf::new();
    let (mut splicing, mut small_run) = (false, 0u32);
    // Small at first, doubled (up to BUF) whenever a read fills it: an idle or chatty session
    // holds a small buffer, a bulk one reaches BUF after a few reads.
    let mut buf = vec![0u8; FIRST_BUF];
    loop {
        if splicing {
            let step = match (from.plain(), to.plain()) {
                (Some(src), Some(dst)) => splice_once(&mut kernel_buf, src, dst).await?,
                _ => Splice::Unavailable,
            };
            match step {
                Splice::Moved(n) => {
                    *total += n as u64;
                    small_run = if n < SMALL_SPLICE { small_run + 1 } else { 0 };
                    splicing = small_run < SMALL_RUN;
                }
                Splice::End => {
                    to.shutdown().await;
                    return Ok(());
                }
                Splice::Unavailable => splicing = false,
            }
            continue;
        }
        let n = from.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            // Pass the end on: the other side reads end-of-stream (a FIN), as it would direct.
            to.shutdown().await;
            return Ok(());
        }
        to.write_all(&buf[..n]).await.map_err(|e| e.to_string())?;
        *total += n as u64;
        if n == buf.len() {
            if buf.len() < BUF {
                buf.resize(buf.len() * 2, 0);
            } else if can_splice {
                (splicing, small_run) = (true, 0);
            }
        }
    }
}

/// What one splice round did.
enum Splice {
    /// `n` bytes moved from source to destination.
    Moved(usize),
    /// The source ended (nothing left in the pipe).
    End,
    /// No pipe to be had, or the socket cannot splice: nothing moved; use read/write.
    Unavailable,
}

/// Splices what `src` holds (up to a pipe's capacity) into the pipe, then all of it to `dst`.
async fn splice_once(
    kernel_buf: &mut rt::SpliceBuf,
    src: &mut rt::TcpStream,
    dst: &rt::TcpStream,
) -> Result<Splice, String> {
    let n = match poll_fn(|cx| kernel_buf.poll_fill(cx, src)).await {
        Ok(0) => return Ok(Splice::End),
        Ok(n) => n,
        Err(rt::SpliceError::Unavailable(e)) => {
            log::debug!("tunnel: splice unavailable ({e}), copying through user space");
            return Ok(Splice::Unavailable);
        }
        Err(rt::SpliceError::Io(e)) => return Err(e.to_string()),
    };
    poll_fn(|cx| kernel_buf.poll_drain(cx, dst))
        .await
        .map_err(|e| e.to_string())?;
    Ok(Splice::Moved(n))
}
