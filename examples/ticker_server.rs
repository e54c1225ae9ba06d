//! A small market-ticker backend for trying and testing wsgate (streams, reconnect + replay).
//!
//! ```text
//! cargo run --example ticker_server -- [--port 8012] [--name ticker-8012] [--interval-ms 1000] [--bind-ip 127.0.0.1]
//! ```
//!
//! * WebSocket upgrade on any path. The client sends `{"subscribe":["AAPL","MSFT"]}` (again to
//!   add symbols; a single string is accepted too). Every interval the server then sends one
//!   tick per subscribed symbol, in symbol order:
//!   `{"backend":NAME,"symbol":"AAPL","seq":N,"price":123.45}`, where `seq` counts that
//!   symbol's ticks on this connection from 1 (subscribing again keeps the count).
//!   Any other text message is acknowledged so tests can see what reached the backend:
//!   `{"backend":NAME,"ack":<the message parsed as JSON, or the raw string>}`.
//!   A malformed subscribe or a binary message gets `{"backend":NAME,"error":"..."}`.
//!   Subprotocol: `ticker` if the client offers it, else the first one offered.
//! * HTTP: `GET /health` → `ok`; `GET /` → a one-line description (so `http` health checks on
//!   the default path pass); anything else → 404. Responses carry `X-Backend: NAME`.
//!
//! On start it prints `ticker_server NAME listening on ADDR` to stdout.
//!
//! `demo.rs` includes this file as a module and calls [`serve`].

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_std::future::timeout;
use async_std::net::{Shutdown, TcpListener, TcpStream};
use async_std::task;
use async_tungstenite::tungstenite::handshake::derive_accept_key;
use async_tungstenite::tungstenite::protocol::Role;
use async_tungstenite::tungstenite::Message;
use async_tungstenite::WebSocketStream;
use futures::{AsyncReadExt, AsyncWriteExt, FutureExt, StreamExt};
use log::{debug, warn};
use serde_json::{json, Value};

const MAX_SYMBOLS: usize = 256;
const MAX_SYMBOL_LEN: usize = 32;

const USAGE: &str = "usage: ticker_server [--port P (8012)] [--name NAME (ticker-<port>)] [--interval-ms MS (1000)] [--bind-ip IP (127.0.0.1)]";

#[async_std::main]
async fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("ticker_server: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let addr = SocketAddr::new(args.bind_ip, args.port);
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ticker_server: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    let name = match args.name {
        Some(name) => name,
        None => format!(
            "ticker-{}",
            listener.local_addr().map_or(args.port, |a| a.port())
        ),
    };
    if let Err(e) = serve(listener, name, args.interval).await {
        eprintln!("ticker_server: {e}");
        std::process::exit(1);
    }
}

struct Args {
    port: u16,
    name: Option<String>,
    bind_ip: IpAddr,
    interval: Duration,
}

/// `Ok(None)` means `--help`.
fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut args = Args {
        port: 8012,
        name: None,
        bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        interval: Duration::from_millis(1000),
    };
    while let Some(arg) = it.next() {
        let (key, inline) = match arg.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_string(), Some(v.to_string())),
            _ => (arg, None),
        };
        if key == "-h" || key == "--help" {
            return Ok(None);
        }
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{key} needs a value"))
        };
        match key.as_str() {
            "--port" => {
                let v = value()?;
                args.port = v.parse().map_err(|_| format!("bad --port {v:?}"))?;
            }
            "--name" => args.name = Some(value()?),
            "--bind-ip" => {
                let v = value()?;
                args.bind_ip = v.parse().map_err(|_| format!("bad --bind-ip {v:?}"))?;
            }
            "--interval-ms" => {
                let v = value()?;
                match v.parse::<u64>() {
                    Ok(ms) if ms > 0 => args.interval = Duration::from_millis(ms),
                    _ => return Err(format!("bad --interval-ms {v:?} (a positive number)")),
                }
            }
            _ => return Err(format!("unknown argument {key:?}")),
        }
    }
    Ok(Some(args))
}

/// Runs the ticker server on `listener` until the process ends. Prints the readiness line first.
pub async fn serve(listener: TcpListener, name: String, interval: Duration) -> io::Result<()> {
    let local = listener.local_addr()?;
    println!("ticker_server {name} listening on {local}");
    // A zero interval would spin; clamp it.
    let interval = interval.max(Duration::from_millis(1));
    let mut conn_no: u64 = 0;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                conn_no += 1;
                let name = name.clone();
                let seed = conn_no;
                task::spawn(
                    async move { handle_connection(stream, peer, name, interval, seed).await },
                );
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning, keep serving.
                warn!("ticker_server {name}: accept failed: {e}");
                task::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    name: String,
    interval: Duration,
    seed: u64,
) {
    let _ = stream.set_nodelay(true);
    let head = match timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(head)) => head,
        Ok(Err(HeadError::TooLarge)) => {
            let _ = respond(
                &mut stream,
                &name,
                431,
                "text/plain",
                &[],
                b"request head too large\n",
                false,
            )
            .await;
            return finish(stream).await;
        }
        Ok(Err(HeadError::Bad(e))) => {
            debug!("{peer}: bad request: {e}");
            let _ = respond(
                &mut stream,
                &name,
                400,
                "text/plain",
                &[],
                b"bad request\n",
                false,
            )
            .await;
            return finish(stream).await;
        }
        Ok(Err(HeadError::Io(e))) => {
            debug!("{peer}: {e}");
            return;
        }
        Err(_) => {
            debug!("{peer}: request head timed out");
            return;
        }
    };
    if head.is_websocket_upgrade() {
        if accept_upgrade(&mut stream, &head, &name, "ticker")
            .await
            .is_none()
        {
            return finish(stream).await;
        }
        let ws =
            WebSocketStream::from_partially_read(stream, head.rest.clone(), Role::Server, None)
                .await;
        debug!("ticker {name}: session from {peer} on {}", head.path);
        ticker_session(ws, &name, interval, seed).await;
        debug!("ticker {name}: session from {peer} ended");
    } else {
        let path = head.path.split('?').next().unwrap_or("");
        let get = head.method == "GET" || head.method == "HEAD";
        let head_only = head.method == "HEAD";
        let about = format!("ticker_server {name}: WebSocket, send {{\"subscribe\":[\"AAPL\"]}}\n");
        let result = match path {
            "/health" if get => {
                respond(&mut stream, &name, 200, "text/plain", &[], b"ok", head_only).await
            }
            "/" if get => {
                respond(
                    &mut stream,
                    &name,
                    200,
                    "text/plain",
                    &[],
                    about.as_bytes(),
                    head_only,
                )
                .await
            }
            "/" | "/health" => {
                let extra = [("Allow", "GET, HEAD")];
                respond(
                    &mut stream,
                    &name,
                    405,
                    "text/plain",
                    &extra,
                    b"method not allowed\n",
                    false,
                )
                .await
            }
            _ => {
                respond(
                    &mut stream,
                    &name,
                    404,
                    "text/plain",
                    &[],
                    b"not found\n",
                    head_only,
                )
                .await
            }
        };
        if let Err(e) = result {
            debug!("{peer}: {e}");
        }
        finish(stream).await;
    }
}

/// Per-symbol state of one connection.
struct Quote {
    seq: u64,
    price: f64,
}

async fn ticker_session(ws: WebSocketStream<TcpStream>, name: &str, interval: Duration, seed: u64) {
    let (mut sink, mut source) = ws.split();
    let mut ticks = async_std::stream::interval(interval);
    let mut quotes: BTreeMap<String, Quote> = BTreeMap::new();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut rng = Rng(nanos ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    loop {
        let reply = futures::select! {
            item = source.next() => match item {
                Some(Ok(Message::Text(text))) => handle_text(name, &mut quotes, text.as_str()),
                Some(Ok(Message::Binary(b))) => Some(error(name, format!("binary messages are not supported ({} bytes ignored)", b.len()))),
                // Pings are answered and closes acknowledged by tungstenite; keep polling so
                // that the close reply is flushed and the stream ends.
                Some(Ok(_)) => None,
                Some(Err(e)) => {
                    debug!("ticker {name}: {e}");
                    break;
                }
                None => break,
            },
            _ = ticks.next().fuse() => {
                for (symbol, quote) in quotes.iter_mut() {
                    quote.seq += 1;
                    // A random walk of at most ±0.5 % per tick, in cents, never below 0.01.
                    let step = (rng.next_f64() - 0.5) * 0.01 * quote.price;
                    quote.price = ((quote.price + step) * 100.0).round().max(1.0) / 100.0;
                    let tick = json!({ "backend": name, "symbol": symbol, "seq": quote.seq, "price": quote.price });
                    if sink.send(Message::text(tick.to_string())).await.is_err() {
                        return;
                    }
                }
                None
            }
        };
        if let Some(reply) = reply {
            if sink.send(reply).await.is_err() {
                break;
            }
        }
    }
}

fn handle_text(name: &str, quotes: &mut BTreeMap<String, Quote>, text: &str) -> Option<Message> {
    let parsed: Option<Value> = serde_json::from_str(text).ok();
    let Some(subscribe) = parsed.as_ref().and_then(|v| v.get("subscribe")) else {
        let ack = parsed.unwrap_or_else(|| Value::String(text.to_string()));
        return Some(Message::text(
            json!({ "backend": name, "ack": ack }).to_string(),
        ));
    };
    let symbols: Vec<&str> = match subscribe {
        Value::String(s) => vec![s.as_str()],
        Value::Array(items) => match items.iter().map(Value::as_str).collect::<Option<Vec<_>>>() {
            Some(symbols) => symbols,
            None => return Some(error(name, "subscribe expects an array of symbol strings")),
        },
        _ => return Some(error(name, "subscribe expects an array of symbol strings")),
    };
    if let Some(bad) = symbols
        .iter()
        .find(|s| s.is_empty() || s.len() > MAX_SYMBOL_LEN)
    {
        return Some(error(
            name,
            format!("bad symbol {bad:?}: 1 to {MAX_SYMBOL_LEN} bytes"),
        ));
    }
    for symbol in symbols {
        if quotes.len() >= MAX_SYMBOLS && !quotes.contains_key(symbol) {
            return Some(error(
                name,
                format!("at most {MAX_SYMBOLS} symbols per connection"),
            ));
        }
        quotes.entry(symbol.to_string()).or_insert_with(|| Quote {
            seq: 0,
            price: start_price(symbol),
        });
    }
    None
}

fn error(name: &str, text: impl Into<String>) -> Message {
    Message::text(json!({ "backend": name, "error": text.into() }).to_string())
}

/// A stable, symbol-dependent start price between 20.00 and 520.00.
fn start_price(symbol: &str) -> f64 {
    let h = symbol.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    20.0 + (h % 50_000) as f64 / 100.0
}

/// xorshift64*: plenty for a fake market, no dependency.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 and the WebSocket handshake: the helpers shared with chat_server.rs.

// Each server is also its own binary; the demo includes both, hence the module twice.
#[allow(clippy::duplicate_mod)]
#[path = "support/http.rs"]
mod http;
use http::*;
