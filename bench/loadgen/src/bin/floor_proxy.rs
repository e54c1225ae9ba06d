//! The floor of wsgate's runtime: the least a WebSocket proxy built on it can do, measured by
//! `bench/profile.sh ... floor` against wsgate and nginx. The runtime is the gateway's own
//! (`wsgate_actors::rt`: async-std's executor, async-io's reactor, the edge-triggered epoll
//! TCP types); everything the gateway adds on top is left out: no actors, no config, no
//! routing, no health checks, no metrics, no logging on the data path, no timeouts.
//!
//! Per connection, one task: read the client's request head (parsed only to find its end),
//! connect to the backend, pass the head on unchanged (the client's `Sec-WebSocket-Key` goes
//! through, so the backend's accept key is right and no SHA-1 is computed here, as with
//! nginx's pass-through), pass the backend's response head back unchanged, then copy bytes
//! both ways, frames unparsed, half-closing a direction when its source ends. Whatever is
//! built on this runtime does at least this much per session and per message.
//!
//! With `--actors`, it adds the structure the design card fixes for the gateway, and only
//! that: each connection is an xactor actor (its `started` makes the control channel and
//! spawns the connection's task, which holds the actor's address and drops it at the end,
//! as wsgate's session does), the backend comes from a pool actor by a `call` (a mailbox
//! message and its reply, as wsgate's `PickBackends`), and the copy loops end early if a
//! control event arrives. What that costs per session is the design's, not wsgate's.
//!
//! `floor-proxy --listen 127.0.0.1:PORT --backend 127.0.0.1:PORT [--actors]` prints
//! `listening on ADDR` to stderr once bound. Run it with `ASYNC_STD_THREAD_COUNT=1`, as wsgate
//! in the benchmarks.

use futures::channel::mpsc;
use futures::future::{join, select};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;
use wsgate_actors::rt::{self, TcpListener, TcpStream};
use wsgate_loadgen::Args;
use xactor::{Actor, Addr, Context, Handler, Message};

/// Each direction's copy buffer (the size the gateway's tunnel starts with); the two together
/// hold the heads before the copy starts, so a head may have up to 2 KiB. Kept small because
/// safe Rust zeroes it once per session: with 4 KiB, calloc's memset was 30 % of the floor's
/// instructions per session (`profile.sh callgrind-handshake floor`).
const BUF: usize = 1024;
/// Headers a head may have (httparse needs room for them all).
const MAX_HEADERS: usize = 32;

fn main() {
    let args = Args::parse(std::env::args().skip(1));
    let listen = args.addr("listen");
    let backend = args.addr("backend");
    let actors = args.opt("actors").is_some();
    // The accept loop is a task on the executor, as wsgate's listener is; this thread waits.
    let accept = rt::spawn(async move {
        let pool = if actors {
            match (Pool { backend }).start().await {
                Ok(p) => Some(p),
                Err(e) => return eprintln!("floor-proxy: pool actor: {e}"),
            }
        } else {
            None
        };
        let listener = match TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => return eprintln!("floor-proxy: bind {listen}: {e}"),
        };
        match listener.local_addr() {
            Ok(a) => eprintln!("listening on {a}"),
            Err(e) => return eprintln!("floor-proxy: local_addr: {e}"),
        }
        loop {
            match listener.accept().await {
                Ok((client, _)) => match &pool {
                    None => drop(rt::spawn(session(client, backend))),
                    Some(pool) => {
                        let conn = Conn {
                            start: Some((client, pool.clone())),
                            control: None,
                        };
                        if let Err(e) = conn.start().await {
                            eprintln!("floor-proxy: connection actor: {e}");
                        }
                    }
                },
                Err(e) => {
                    eprintln!("floor-proxy: accept: {e}");
                    // EMFILE and the like: back off briefly instead of spinning.
                    rt::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    });
    rt::block_on(accept);
    std::process::exit(1);
}

/// One connection, start to end; any error just ends it (both sockets close on drop).
async fn session(client: TcpStream, backend: SocketAddr) {
    let _ = tunnel(client, backend).await;
}

/// `--actors`: the pool actor, which only names the backend.
struct Pool {
    backend: SocketAddr,
}

impl Actor for Pool {}

/// `--actors`: a connection's request for its backend (wsgate's `PickBackends`).
struct Pick;

impl Message for Pick {
    type Result = SocketAddr;
}

#[async_trait::async_trait]
impl Handler<Pick> for Pool {
    async fn handle(&mut self, _ctx: &mut Context<Self>, _msg: Pick) -> SocketAddr {
        self.backend
    }
}

/// `--actors`: one connection's actor. It hears nothing here; its control channel is there
/// because wsgate's session actor forwards its control events through one.
struct Conn {
    start: Option<(TcpStream, Addr<Pool>)>,
    control: Option<mpsc::UnboundedSender<()>>,
}

#[async_trait::async_trait]
impl Actor for Conn {
    async fn started(&mut self, ctx: &mut Context<Self>) -> xactor::Result<()> {
        let (tx, rx) = mpsc::unbounded();
        self.control = Some(tx);
        if let Some((client, pool)) = self.start.take() {
            let me = ctx.address();
            rt::spawn(async move {
                let _ = actor_tunnel(client, pool, rx).await;
                drop(me); // the actor's last address: it stops
            });
        }
        Ok(())
    }
}

/// `--actors`: the tunnel, with the backend from the pool actor and the copy loops raced
/// against the control channel.
async fn actor_tunnel(
    client: TcpStream,
    pool: Addr<Pool>,
    mut control: mpsc::UnboundedReceiver<()>,
) -> io::Result<()> {
    let backend = pool.call(Pick).await.map_err(io::Error::other)?;
    let t = tunnel(client, backend);
    select(Box::pin(t), control.next()).await;
    Ok(())
}

async fn tunnel(mut client: TcpStream, backend: SocketAddr) -> io::Result<()> {
    client.set_nodelay(true)?;
    // One allocation per session: both copy buffers, first used whole for the heads.
    let mut bufs = vec![0u8; 2 * BUF];
    let n = read_head(&mut client, &mut bufs, request_complete).await?;
    let mut server = TcpStream::connect(backend).await?;
    server.set_nodelay(true)?;
    // Everything read so far: the head, and any bytes the client sent after it.
    server.write_all(&bufs[..n]).await?;
    let n = read_head(&mut server, &mut bufs, response_complete).await?;
    client.write_all(&bufs[..n]).await?;
    let (c2b, b2c) = bufs.split_at_mut(BUF);
    // A join polls both loops on every wakeup; the one not woken returns Pending without a
    // syscall (its last read came back short). A FuturesUnordered, which polls only the woken
    // one, cost ~11 % more instructions per echo and per session here (boxes, its wakers).
    join(
        pipe(client.clone(), server.clone(), c2b),
        pipe(server, client, b2c),
    )
    .await;
    Ok(())
}

/// Reads until `buf` starts with a complete head; returns how many bytes were read (the head
/// and whatever followed it in the same reads).
async fn read_head(
    s: &mut TcpStream,
    buf: &mut [u8],
    complete: fn(&[u8]) -> io::Result<bool>,
) -> io::Result<usize> {
    let mut len = 0;
    loop {
        if len == buf.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too large"));
        }
        let n = s.read(&mut buf[len..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        len += n;
        if complete(&buf[..len])? {
            return Ok(len);
        }
    }
}

fn request_complete(b: &[u8]) -> io::Result<bool> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    httparse::Request::new(&mut headers)
        .parse(b)
        .map(|s| s.is_complete())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn response_complete(b: &[u8]) -> io::Result<bool> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    httparse::Response::new(&mut headers)
        .parse(b)
        .map(|s| s.is_complete())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Copies `from` → `to` until `from` ends (or either fails), then sends `to` a FIN.
async fn pipe(mut from: TcpStream, mut to: TcpStream, buf: &mut [u8]) {
    loop {
        match from.read(buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
