//! The data plane of a `relay: "tunnel"` session: after the handshake, bytes are copied both
//! ways unchanged (as nginx does), so extensions such as permessage-deflate pass through.
//! Bytes are counted; frames are not parsed, so there are no message limits, keepalive or
//! failover in this mode.
//!
//! The upstream handshake is `handshake::raw_upgrade`, which keeps whatever the backend sends
//! right after its 101 (relayed first, as `pending_b2c`).

use crate::relay::{Control, Side};
use crate::rt;
use crate::transport::{Halves, WriteHalf};
use futures::channel::mpsc;
use futures::stream::FuturesUnordered;
use futures::{AsyncReadExt, StreamExt};

/// The copy buffer's largest size, and its first.
const BUF: usize = 16 * 1024;
const FIRST_BUF: usize = 1024;

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
    mut from: Box<dyn futures::AsyncRead + Unpin + Send>,
    mut to: WriteHalf,
    pending: &[u8],
    total: &mut u64,
    from_side: Side,
) -> (Side, Result<(), String>) {
    let r = copy(&mut from, &mut to, pending, total).await;
    (from_side, r)
}

async fn copy(
    from: &mut Box<dyn futures::AsyncRead + Unpin + Send>,
    to: &mut WriteHalf,
    pending: &[u8],
    total: &mut u64,
) -> Result<(), String> {
    if !pending.is_empty() {
        to.write_all(pending).await.map_err(|e| e.to_string())?;
        *total += pending.len() as u64;
    }
    // Small at first, doubled (up to BUF) whenever a read fills it: an idle or chatty session
    // holds a small buffer, a bulk one reaches BUF after a few reads.
    let mut buf = vec![0u8; FIRST_BUF];
    loop {
        let n = from.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            // Pass the end on: the other side reads end-of-stream (a FIN), as it would direct.
            to.shutdown().await;
            return Ok(());
        }
        to.write_all(&buf[..n]).await.map_err(|e| e.to_string())?;
        *total += n as u64;
        if n == buf.len() && buf.len() < BUF {
            buf.resize(buf.len() * 2, 0);
        }
    }
}
