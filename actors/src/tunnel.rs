//! The data plane of a `relay: "tunnel"` session: after the handshake, bytes are copied both
//! ways unchanged (as nginx does), so extensions such as permessage-deflate pass through.
//! Bytes are counted; frames are not parsed, so there are no message limits, keepalive or
//! failover in this mode.
//!
//! The upstream handshake is done on raw bytes here (request serialized, response head parsed
//! with httparse, accept key checked), so whatever the backend sends right after its 101 is
//! kept and relayed, never swallowed by a WebSocket library's buffer.

use crate::handshake::{is_reserved_upstream_header, read_response_head};
use crate::relay::{Control, Side};
use crate::rt;
use crate::transport::{Halves, WriteHalf};
use async_tungstenite::tungstenite::handshake::derive_accept_key;
use async_tungstenite::tungstenite::http;
use futures::channel::mpsc;
use futures::stream::FuturesUnordered;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use std::time::{Duration, Instant};

const BUF: usize = 16 * 1024;

/// The backend's answer to a raw upgrade: its response head, and bytes it sent after it.
pub struct RawUpgrade {
    pub response: http::Response<Option<Vec<u8>>>,
    pub leftover: Vec<u8>,
}

/// Sends `req` on `stream` and reads the response head within `timeout`. A 101 with the right
/// accept key is `Ok`; any other status comes back as `Err(Ok(response))` for the caller to
/// judge (4xx passed to the client, 5xx retried); transport problems as `Err(Err(reason))`.
pub async fn raw_upgrade<S: futures::AsyncRead + futures::AsyncWrite + Unpin>(
    stream: &mut S,
    req: &http::Request<()>,
    timeout: Duration,
) -> Result<RawUpgrade, Result<http::Response<Option<Vec<u8>>>, String>> {
    let started = Instant::now();
    let key = req
        .headers()
        .get("sec-websocket-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut head = format!("GET {pq} HTTP/1.1\r\n").into_bytes();
    for (k, v) in req.headers() {
        head.extend_from_slice(k.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(v.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    let io = async {
        stream
            .write_all(&head)
            .await
            .map_err(|e| Err(format!("upgrade: {e}")))?;
        let mut buf = Vec::with_capacity(1024);
        let (resp, len) = read_response_head(stream, &mut buf)
            .await
            .map_err(|e| Err(format!("upgrade: {e}")))?;
        let rest = buf.split_off(len);
        if resp.status != 101 {
            return Err(Ok(resp.to_http((!rest.is_empty()).then_some(rest))));
        }
        let response = resp.to_http(None);
        let accept = response
            .headers()
            .get("sec-websocket-accept")
            .and_then(|v| v.to_str().ok());
        if accept != Some(derive_accept_key(key.as_bytes()).as_str()) {
            return Err(Err("upgrade: wrong Sec-WebSocket-Accept".to_string()));
        }
        Ok(RawUpgrade {
            response,
            leftover: rest,
        })
    };
    match rt::timeout(timeout.saturating_sub(started.elapsed()), io).await {
        Ok(r) => r,
        Err(_) => Err(Err("upgrade timed out (connect_ms)".into())),
    }
}

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
    let mut buf = vec![0u8; BUF];
    loop {
        let n = from.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            // Pass the end on: the other side reads end-of-stream (a FIN), as it would direct.
            to.shutdown().await;
            return Ok(());
        }
        to.write_all(&buf[..n]).await.map_err(|e| e.to_string())?;
        *total += n as u64;
    }
}

/// Whether a header of the backend's 101 may be passed to the client in tunnel mode.
pub fn passes_in_101(name: &str) -> bool {
    name == "sec-websocket-extensions"
        || name == "sec-websocket-protocol"
        || !is_reserved_upstream_header(name)
}
