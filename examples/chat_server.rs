//! A small chat backend for trying and testing wsgate.
//!
//! ```text
//! cargo run --example chat_server -- [--port 8010] [--name chat-8010] [--bind-ip 127.0.0.1]
//!                                    [--redis redis://127.0.0.1:6379] [--redis-prefix wsgate-chat]
//!                                    [--history 1000]
//! ```
//!
//! One port serves both WebSocket and plain HTTP:
//!
//! * WebSocket upgrade on any path. Client → server text messages are JSON objects:
//!   `{"join":"lobby"}` (enter a room, leaving the previous one), `{"say":"hi"}` (broadcast to
//!   everyone in the room, the sender included), `{"echo":<any>}` (answered to the sender
//!   only), `{"whoami":true}` (the sender's upgrade request as the server saw it),
//!   `{"history":{"room":"lobby","since":ID}}` or `{"history":{"room":"lobby","last":N}}` (kept
//!   messages of a room, without joining it). Several keys in one object are handled in that
//!   order. Every server → client message is a JSON object carrying `"backend": NAME`:
//!   `{"backend":N,"joined":"lobby"}`,
//!   `{"backend":N,"id":7,"room":"lobby","from":"127.0.0.1:51234","text":"hi","origin":N2}`,
//!   `{"backend":N,"echo":<same>}`,
//!   `{"backend":N,"whoami":{"id":..,"peer":..,"path":..,"subprotocol":..,"headers":{..}}}`,
//!   `{"backend":N,"history":{"room":"lobby","messages":[{"id":..,"room":..,..},..]}}`,
//!   `{"backend":N,"error":"..."}`.
//!   Subprotocol: `chat` if the client offers it, else the first one offered.
//! * HTTP: `GET /` (also `/chat`, `/index.html`) → the chat page; `GET /health` → `ok`;
//!   any method on `/echo` → a JSON echo of the request (method, path, headers, body);
//!   anything else → 404. Responses carry `X-Backend: NAME` and close the connection.
//!
//! Room messages and history (docs/scale-out.md has the full protocol):
//!
//! * Every room message has an `id`: 1, 2, 3, … per room, with no holes, in the order the
//!   messages were published. A client that sees `id` jump by more than one missed messages;
//!   one that sees an `id` again got a duplicate. `origin` names the backend the message was
//!   said on; `backend` always names the backend that delivered it.
//! * The last `--history` messages of each room are kept. `{"join":"lobby","since":ID}` joins
//!   and first replays every kept message with an id above `ID` (flagged `"replay":true`),
//!   then goes on live with no hole and no repeat between the two: the way back in after a
//!   reconnect. `{"join":"lobby","history":N}` replays the last `N` kept messages instead
//!   (both given: the last `N` of those above `ID`).
//! * Without `--redis`, rooms, ids and history live in this process (ids restart with it).
//!   With `--redis URL`, a message is published through Redis and every backend on the same
//!   Redis (and `--redis-prefix`) delivers it to its own members of the room, so clients on
//!   different backends share rooms. One Lua script assigns the id (`INCR`), stores the
//!   message in the room's history (a sorted set trimmed to `--history`) and `PUBLISH`es it,
//!   atomically: ids are in publish order, and Redis delivers publishes to each subscriber
//!   in that order. Keys: `PREFIX:seq:ROOM`, `PREFIX:history:ROOM`; channel `PREFIX:room:ROOM`
//!   (every backend `PSUBSCRIBE`s `PREFIX:room:*`).
//!
//! On start it prints `chat_server NAME listening on ADDR` to stdout; with `--redis`, only once
//! it is subscribed (messages published from then on reach its clients).
//!
//! `demo.rs` includes this file as a module and calls [`serve`].

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_std::future::timeout;
use async_std::net::{Shutdown, TcpListener, TcpStream};
use async_std::task;
use async_tungstenite::tungstenite::handshake::derive_accept_key;
use async_tungstenite::tungstenite::protocol::Role;
use async_tungstenite::tungstenite::Message;
use async_tungstenite::WebSocketStream;
use futures::channel::{mpsc, oneshot};
use futures::{AsyncReadExt, AsyncWriteExt, SinkExt, StreamExt};
use log::{debug, info, warn};
use serde_json::{json, Map, Value};

const CHAT_HTML: &str = include_str!("chat.html");

/// Largest request body `/echo` accepts.
const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Messages queued toward one client. Broadcasts to a client whose queue is full are dropped
/// (a slow reader must not stall its room; it sees the hole in the ids); replies to a client's
/// own requests wait instead.
const QUEUE_LEN: usize = 1024;
const MAX_ROOM_NAME: usize = 128;
/// Default of `--history`: messages kept per room.
const DEFAULT_HISTORY: usize = 1000;
/// Default of `--redis-prefix`.
const DEFAULT_PREFIX: &str = "wsgate-chat";
/// Redis: connecting (and subscribing) at start, and any one command.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

const USAGE: &str = "usage: chat_server [--port P (8010)] [--name NAME (chat-<port>)] [--bind-ip IP (127.0.0.1)]
                   [--redis redis://HOST:PORT[/DB] (off: rooms in memory)] [--redis-prefix P (wsgate-chat)]
                   [--history N (1000 kept messages per room)]";

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
            eprintln!("chat_server: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let addr = SocketAddr::new(args.bind_ip, args.port);
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("chat_server: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    let name = match args.name {
        Some(name) => name,
        None => format!(
            "chat-{}",
            listener.local_addr().map_or(args.port, |a| a.port())
        ),
    };
    let hub = match &args.redis {
        None => Arc::new(Hub::new(name, Store::memory(args.history))),
        Some(url) => match start_redis(name, url, &args.prefix, args.history).await {
            Ok(hub) => hub,
            Err(e) => {
                eprintln!("chat_server: redis {url}: {e}");
                std::process::exit(1);
            }
        },
    };
    if let Err(e) = run(listener, hub).await {
        eprintln!("chat_server: {e}");
        std::process::exit(1);
    }
}

struct Args {
    port: u16,
    name: Option<String>,
    bind_ip: IpAddr,
    redis: Option<String>,
    prefix: String,
    history: usize,
}

/// `Ok(None)` means `--help`.
fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut args = Args {
        port: 8010,
        name: None,
        bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        redis: None,
        prefix: DEFAULT_PREFIX.to_string(),
        history: DEFAULT_HISTORY,
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
            "--redis" => {
                let v = value()?;
                redis::Client::open(v.as_str()).map_err(|e| format!("bad --redis {v:?}: {e}"))?;
                args.redis = Some(v);
            }
            "--redis-prefix" => {
                let v = value()?;
                if v.is_empty() {
                    return Err("--redis-prefix must not be empty".into());
                }
                args.prefix = v;
            }
            "--history" => {
                let v = value()?;
                args.history = v.parse().map_err(|_| format!("bad --history {v:?}"))?;
            }
            _ => return Err(format!("unknown argument {key:?}")),
        }
    }
    Ok(Some(args))
}

/// Runs the chat server (rooms in memory) on `listener` until the process ends. Prints the
/// readiness line first.
pub async fn serve(listener: TcpListener, name: String) -> io::Result<()> {
    run(
        listener,
        Arc::new(Hub::new(name, Store::memory(DEFAULT_HISTORY))),
    )
    .await
}

async fn run(listener: TcpListener, hub: Arc<Hub>) -> io::Result<()> {
    let local = listener.local_addr()?;
    println!("chat_server {} listening on {local}", hub.name);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let hub = hub.clone();
                task::spawn(async move { handle_connection(stream, peer, hub).await });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning, keep serving.
                warn!("chat_server {}: accept failed: {e}", hub.name);
                task::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rooms

/// A room member: its connection's outgoing queue; while its join is replaying history, the
/// live messages held back until the replay is out (so they follow it, in order); after it,
/// the last id the replay sent, for live messages that come later than the history read that
/// already had them (Redis: the subscription may lag behind another connection's read).
struct Member {
    tx: mpsc::Sender<Message>,
    held: Option<Vec<(u64, Message)>>,
    skip_through: u64,
}

type Rooms = HashMap<String, HashMap<u64, Member>>;

/// Rooms: room name → (connection id → member), and where room messages come from.
struct Hub {
    name: String,
    rooms: Mutex<Rooms>,
    next_id: AtomicU64,
    store: Store,
}

impl Hub {
    fn new(name: String, store: Store) -> Hub {
        Hub {
            name,
            rooms: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            store,
        }
    }

    fn rooms(&self) -> MutexGuard<'_, Rooms> {
        // Nothing panics while holding the lock, but never let poisoning take the server down.
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn leave(&self, room: &str, id: u64) {
        let mut rooms = self.rooms();
        if let Some(members) = rooms.get_mut(room) {
            members.remove(&id);
            if members.is_empty() {
                rooms.remove(room);
            }
        }
    }

    fn msg(&self, mut fields: Map<String, Value>) -> Message {
        fields.insert("backend".into(), Value::String(self.name.clone()));
        Message::text(Value::Object(fields).to_string())
    }

    fn error(&self, text: impl Into<String>) -> Message {
        self.msg(obj(json!({ "error": text.into() })))
    }

    /// Hands room message `id` to this backend's members of `room`, each in the order of the
    /// calls (callers call in id order: under the memory store's lock, or from the one Redis
    /// subscription). Never blocks: a full queue drops the message for that member.
    fn deliver(&self, room: &str, id: u64, fields: Map<String, Value>) {
        let msg = self.msg(fields);
        let mut rooms = self.rooms();
        for (member, m) in rooms.get_mut(room).into_iter().flatten() {
            let ok = match &mut m.held {
                Some(held) if held.len() < QUEUE_LEN => {
                    held.push((id, msg.clone()));
                    true
                }
                Some(_) => false,
                // Already sent by the replay.
                None if id <= m.skip_through => true,
                None => {
                    // Ids only grow from here (one ordered subscription): no more checks, so a
                    // Redis that lost its data and counts from 1 again is not filtered out.
                    m.skip_through = 0;
                    m.tx.try_send(msg.clone()).is_ok()
                }
            };
            if !ok {
                // Full (a client that does not read) or closing: drop, never block the room.
                debug!(
                    "chat {}: dropped message {id} for session {member}",
                    self.name
                );
            }
        }
    }

    /// Ends a join's replay: the held-back live messages newer than `replayed` (the last id
    /// the replay sent) go out, and the member is live from here on.
    fn release(&self, room: &str, session: u64, replayed: u64) {
        let mut rooms = self.rooms();
        let Some(m) = rooms.get_mut(room).and_then(|r| r.get_mut(&session)) else {
            return;
        };
        let mut last = replayed;
        for (id, msg) in m.held.take().unwrap_or_default() {
            if id <= last {
                continue;
            }
            last = id;
            if m.tx.try_send(msg).is_err() {
                debug!(
                    "chat {}: dropped message {id} for session {session}",
                    self.name
                );
            }
        }
        m.skip_through = last;
    }
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// A stored room message (`{"id":..,"room":..,"from":..,"text":..,"origin":..}`) → its id and
/// fields.
fn parse_stored(text: &str) -> Option<(u64, Map<String, Value>)> {
    let Ok(Value::Object(m)) = serde_json::from_str::<Value>(text) else {
        return None;
    };
    Some((m.get("id")?.as_u64()?, m))
}

// ---------------------------------------------------------------------------------------------
// Where room messages are numbered, kept and fanned out: this process, or Redis.

enum Store {
    Memory(MemoryStore),
    Redis(Box<RedisStore>),
}

struct MemoryStore {
    keep: usize,
    rooms: Mutex<HashMap<String, MemoryRoom>>,
}

/// A room's last id and its kept messages, oldest first.
type MemoryRoom = (u64, VecDeque<(u64, Map<String, Value>)>);

struct RedisStore {
    client: redis::Client,
    /// One multiplexed connection, opened again after it fails.
    conn: async_std::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
    prefix: String,
    keep: usize,
    publish: redis::Script,
}

/// KEYS[1] the room's id counter, KEYS[2] its history; ARGV[1] the channel, ARGV[2] the
/// message as a JSON object without `id`, ARGV[3] how many messages to keep. Atomic: ids are
/// handed out in the order the messages are published.
const PUBLISH_LUA: &str = r#"
local id = redis.call('INCR', KEYS[1])
local msg = '{"id":' .. string.format('%d', id) .. ',' .. string.sub(ARGV[2], 2)
local keep = tonumber(ARGV[3])
if keep > 0 then
  redis.call('ZADD', KEYS[2], id, msg)
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -keep - 1)
end
redis.call('PUBLISH', ARGV[1], msg)
return id
"#;

impl Store {
    fn memory(keep: usize) -> Store {
        Store::Memory(MemoryStore {
            keep,
            rooms: Mutex::new(HashMap::new()),
        })
    }

    /// Publishes a room message (`fields` without `id`). Memory: numbered and delivered here
    /// and now. Redis: numbered, kept and published by Redis; every backend's subscription
    /// (this one's too) delivers it.
    async fn publish(
        &self,
        hub: &Hub,
        room: &str,
        fields: Map<String, Value>,
    ) -> Result<u64, String> {
        match self {
            Store::Memory(m) => {
                let mut rooms = m.rooms.lock().unwrap_or_else(|p| p.into_inner());
                let (last, kept) = rooms.entry(room.to_string()).or_default();
                *last += 1;
                let id = *last;
                let mut fields = fields;
                fields.insert("id".into(), id.into());
                if m.keep > 0 {
                    kept.push_back((id, fields.clone()));
                    while kept.len() > m.keep {
                        kept.pop_front();
                    }
                }
                // Under the store's lock: members get ids in order.
                hub.deliver(room, id, fields);
                Ok(id)
            }
            Store::Redis(r) => {
                let body = Value::Object(fields).to_string();
                let mut inv = r.publish.prepare_invoke();
                inv.key(r.key("seq", room))
                    .key(r.key("history", room))
                    .arg(r.channel(room))
                    .arg(body)
                    .arg(r.keep);
                let mut con = r.conn().await?;
                let res = timeout(REDIS_TIMEOUT, inv.invoke_async::<u64>(&mut con)).await;
                r.checked(res).await
            }
        }
    }

    /// Kept messages of `room` with an id above `since` (all kept if `None`), the last `last`
    /// of them (all if `None`), oldest first.
    async fn history(
        &self,
        room: &str,
        since: Option<u64>,
        last: Option<usize>,
    ) -> Result<Vec<(u64, Map<String, Value>)>, String> {
        let since = since.unwrap_or(0);
        let mut out: Vec<(u64, Map<String, Value>)> = match self {
            Store::Memory(m) => {
                let rooms = m.rooms.lock().unwrap_or_else(|p| p.into_inner());
                rooms
                    .get(room)
                    .map(|(_, kept)| kept.iter().filter(|(id, _)| *id > since).cloned().collect())
                    .unwrap_or_default()
            }
            Store::Redis(r) => {
                if last == Some(0) {
                    return Ok(Vec::new());
                }
                let mut cmd = redis::cmd("ZRANGE");
                cmd.arg(r.key("history", room));
                match (since, last) {
                    // The last N: by rank, no need to fetch the whole set.
                    (0, Some(n)) => cmd.arg(-(n.min(r.keep.max(1)) as i64)).arg(-1),
                    _ => cmd.arg(format!("({since}")).arg("+inf").arg("BYSCORE"),
                };
                let mut con = r.conn().await?;
                let res = timeout(REDIS_TIMEOUT, cmd.query_async::<Vec<String>>(&mut con)).await;
                let raw = r.checked(res).await?;
                raw.iter().filter_map(|s| parse_stored(s)).collect()
            }
        };
        if let Some(n) = last {
            let drop = out.len().saturating_sub(n);
            out.drain(..drop);
        }
        Ok(out)
    }
}

impl RedisStore {
    fn key(&self, kind: &str, room: &str) -> String {
        format!("{}:{kind}:{room}", self.prefix)
    }

    fn channel(&self, room: &str) -> String {
        format!("{}:room:{room}", self.prefix)
    }

    fn pattern(&self) -> String {
        format!("{}:room:*", self.prefix)
    }

    async fn conn(&self) -> Result<redis::aio::MultiplexedConnection, String> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT));
        let c = timeout(
            REDIS_TIMEOUT,
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// A command's result; a broken connection is dropped so the next command reconnects.
    async fn checked<T>(
        &self,
        res: Result<redis::RedisResult<T>, async_std::future::TimeoutError>,
    ) -> Result<T, String> {
        let e = match res {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => {
                if !(e.is_io_error() || e.is_connection_dropped() || e.is_timeout()) {
                    return Err(e.to_string());
                }
                e.to_string()
            }
            Err(_) => "timed out".to_string(),
        };
        *self.conn.lock().await = None;
        Err(e)
    }
}

/// Connects to Redis, subscribes, and returns the hub once messages published from now on
/// reach it; the subscription reconnects by itself if Redis goes away.
async fn start_redis(
    name: String,
    url: &str,
    prefix: &str,
    keep: usize,
) -> Result<Arc<Hub>, String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let store = RedisStore {
        client: client.clone(),
        conn: async_std::sync::Mutex::new(None),
        prefix: prefix.to_string(),
        keep,
        publish: redis::Script::new(PUBLISH_LUA),
    };
    // Fail at start, not at the first message.
    store.conn().await?;
    let hub = Arc::new(Hub::new(name, Store::Redis(Box::new(store))));
    let (ready_tx, ready_rx) = oneshot::channel();
    task::spawn(subscription(hub.clone(), client, ready_tx));
    match timeout(REDIS_TIMEOUT * 2, ready_rx).await {
        Ok(Ok(Ok(()))) => Ok(hub),
        Ok(Ok(Err(e))) => Err(e),
        Ok(Err(_)) => Err("subscription task ended".into()),
        Err(_) => Err("subscribing timed out".into()),
    }
}

/// The backend's one Redis subscription (`PSUBSCRIBE PREFIX:room:*`): every published room
/// message, in publish order, handed to this backend's members of the room. Reconnects with
/// back-off when Redis goes away (messages published meanwhile are not delivered live; they
/// stay in the history, and clients see the hole in the ids).
async fn subscription(
    hub: Arc<Hub>,
    client: redis::Client,
    ready: oneshot::Sender<Result<(), String>>,
) {
    let Store::Redis(store) = &hub.store else {
        return;
    };
    let pattern = store.pattern();
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(100);
    loop {
        let subscribed = timeout(REDIS_TIMEOUT, async {
            let mut ps = client.get_async_pubsub().await?;
            ps.psubscribe(&pattern).await?;
            Ok::<_, redis::RedisError>(ps)
        })
        .await
        .map_err(|_| "timed out".to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        let ps = match subscribed {
            Ok(ps) => ps,
            Err(e) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(format!("subscribe: {e}")));
                    return;
                }
                warn!(
                    "chat {}: redis subscribe failed: {e}; retrying in {backoff:?}",
                    hub.name
                );
                task::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        match ready.take() {
            Some(ready) => {
                let _ = ready.send(Ok(()));
            }
            None => info!("chat {}: redis subscription back", hub.name),
        }
        backoff = Duration::from_millis(100);
        let mut stream = ps.into_on_message();
        while let Some(msg) = stream.next().await {
            let payload: String = match msg.get_payload() {
                Ok(p) => p,
                Err(e) => {
                    warn!("chat {}: bad pub/sub payload: {e}", hub.name);
                    continue;
                }
            };
            let Some((id, fields)) = parse_stored(&payload) else {
                warn!("chat {}: ignored pub/sub message {payload:?}", hub.name);
                continue;
            };
            let Some(room) = fields
                .get("room")
                .and_then(Value::as_str)
                .map(str::to_string)
            else {
                continue;
            };
            hub.deliver(&room, id, fields);
        }
        warn!("chat {}: redis subscription lost; reconnecting", hub.name);
        task::sleep(backoff).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Connections

async fn handle_connection(mut stream: TcpStream, peer: SocketAddr, hub: Arc<Hub>) {
    let _ = stream.set_nodelay(true);
    let head = match timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(head)) => head,
        Ok(Err(HeadError::TooLarge)) => {
            let _ = respond(
                &mut stream,
                &hub.name,
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
                &hub.name,
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
        let Some(protocol) = accept_upgrade(&mut stream, &head, &hub.name, "chat").await else {
            return finish(stream).await;
        };
        let ws =
            WebSocketStream::from_partially_read(stream, head.rest.clone(), Role::Server, None)
                .await;
        chat_session(ws, peer, head, protocol, hub).await;
    } else {
        if let Err(e) = serve_http(&mut stream, &head, &hub.name).await {
            debug!("{peer}: {e}");
        }
        finish(stream).await;
    }
}

async fn serve_http(stream: &mut TcpStream, head: &Head, name: &str) -> io::Result<()> {
    let path = head.path.split('?').next().unwrap_or("");
    let get = head.method == "GET" || head.method == "HEAD";
    let head_only = head.method == "HEAD";
    match path {
        "/echo" => {
            let body = match read_body(stream, head).await {
                Ok(body) => body,
                Err((status, why)) => {
                    return respond(
                        stream,
                        name,
                        status,
                        "text/plain",
                        &[],
                        why.as_bytes(),
                        false,
                    )
                    .await
                }
            };
            let reply = json!({
                "backend": name,
                "method": head.method,
                "path": head.path,
                "headers": head.headers_json(),
                "body": String::from_utf8_lossy(&body),
            });
            let body = reply.to_string();
            respond(
                stream,
                name,
                200,
                "application/json",
                &[],
                body.as_bytes(),
                head_only,
            )
            .await
        }
        "/" | "/chat" | "/chat/" | "/index.html" if get => {
            let extra = [("Cache-Control", "no-store")];
            respond(
                stream,
                name,
                200,
                "text/html; charset=utf-8",
                &extra,
                CHAT_HTML.as_bytes(),
                head_only,
            )
            .await
        }
        "/health" if get => respond(stream, name, 200, "text/plain", &[], b"ok", head_only).await,
        "/" | "/chat" | "/chat/" | "/index.html" | "/health" => {
            let extra = [("Allow", "GET, HEAD")];
            respond(
                stream,
                name,
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
                stream,
                name,
                404,
                "text/plain",
                &[],
                b"not found\n",
                head_only,
            )
            .await
        }
    }
}

/// One WebSocket client: a reader loop here, a writer task draining the client's queue.
async fn chat_session(
    ws: WebSocketStream<TcpStream>,
    peer: SocketAddr,
    head: Head,
    protocol: Option<String>,
    hub: Arc<Hub>,
) {
    let id = hub.next_id.fetch_add(1, Ordering::Relaxed);
    let from = peer.to_string();
    debug!(
        "chat {}: session {id} from {from} on {}",
        hub.name, head.path
    );
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(QUEUE_LEN);
    let mut writer = task::spawn(async move {
        while let Some(msg) = rx.next().await {
            if sink.send(msg).await.is_err() {
                break;
            }
        }
    });

    let mut session = Session {
        id,
        from,
        head,
        protocol,
        room: None,
        tx,
        hub,
    };
    while let Some(item) = source.next().await {
        let msg = match item {
            Ok(msg) => msg,
            Err(e) => {
                debug!("chat {}: session {id}: {e}", session.hub.name);
                break;
            }
        };
        let r = match msg {
            Message::Text(text) => session.handle_text(text.as_str()).await,
            Message::Binary(b) => {
                let e = session.hub.error(format!(
                    "binary messages are not supported ({} bytes ignored)",
                    b.len()
                ));
                session.reply(e).await
            }
            // Pings are answered and closes acknowledged by tungstenite; keep polling so that
            // the close reply is flushed and the stream ends.
            _ => Ok(()),
        };
        if r.is_err() {
            break;
        }
    }

    if let Some(room) = session.room.take() {
        session.hub.leave(&room, id);
    }
    let Session { hub, from, tx, .. } = session;
    drop(tx);
    if timeout(Duration::from_secs(5), &mut writer).await.is_err() {
        writer.cancel().await;
    }
    debug!("chat {}: session {id} from {from} ended", hub.name);
}

struct Session {
    id: u64,
    /// The peer address as this server sees it.
    from: String,
    head: Head,
    protocol: Option<String>,
    room: Option<String>,
    tx: mpsc::Sender<Message>,
    hub: Arc<Hub>,
}

/// The client is gone (its queue closed).
struct Gone;

const UNKNOWN: &str = "unknown message: expected {\"join\":ROOM}, {\"say\":TEXT}, {\"echo\":ANY}, {\"whoami\":true} or {\"history\":{\"room\":ROOM,\"since\":ID}}";

impl Session {
    /// A reply to the client's own request: waits for queue room (no drop; only this client's
    /// own pace slows down).
    async fn reply(&mut self, msg: Message) -> Result<(), Gone> {
        self.tx.send(msg).await.map_err(|_| Gone)
    }

    async fn error(&mut self, text: impl Into<String>) -> Result<(), Gone> {
        let e = self.hub.error(text);
        self.reply(e).await
    }

    /// Handles one text message; replies go out in the order of the keys handled.
    async fn handle_text(&mut self, text: &str) -> Result<(), Gone> {
        let value: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => return self.error(format!("invalid JSON: {e}")).await,
        };
        let Value::Object(req) = value else {
            return self
                .error(format!("expected a JSON object; {UNKNOWN}"))
                .await;
        };
        let mut known = false;
        if let Some(join) = req.get("join") {
            known = true;
            self.join(join, &req).await?;
        }
        if let Some(say) = req.get("say") {
            known = true;
            self.say(say).await?;
        }
        if let Some(echo) = req.get("echo") {
            known = true;
            let m = self.hub.msg(obj(json!({ "echo": echo })));
            self.reply(m).await?;
        }
        if req.contains_key("whoami") {
            known = true;
            let whoami = json!({
                "id": self.from,
                "peer": self.from,
                "path": self.head.path,
                "subprotocol": self.protocol,
                "headers": self.head.headers_json(),
            });
            let m = self.hub.msg(obj(json!({ "whoami": whoami })));
            self.reply(m).await?;
        }
        if !req.contains_key("join") {
            if let Some(q) = req.get("history") {
                known = true;
                self.history(q).await?;
            }
        }
        if !known {
            self.error(UNKNOWN).await?;
        }
        Ok(())
    }

    /// `{"join":ROOM}`, optionally with `"since":ID` and/or `"history":N`: joined reply, the
    /// replay, then live messages, with no hole and no repeat between replay and live.
    async fn join(&mut self, join: &Value, req: &Map<String, Value>) -> Result<(), Gone> {
        let name = match join.as_str() {
            Some(name) if !name.is_empty() && name.len() <= MAX_ROOM_NAME => name.to_string(),
            _ => {
                return self
                    .error(format!(
                    "join expects a room name: a non-empty string of at most {MAX_ROOM_NAME} bytes"
                ))
                    .await
            }
        };
        let since = match req.get("since") {
            None => None,
            Some(v) => match v.as_u64() {
                Some(n) => Some(n),
                None => {
                    return self
                        .error("since expects a message id (an integer ≥ 0)")
                        .await
                }
            },
        };
        let last = match req.get("history") {
            None => None,
            Some(v) => match v.as_u64() {
                Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
                None => {
                    return self
                        .error("history (with join) expects a message count (an integer ≥ 0)")
                        .await
                }
            },
        };
        if let Some(old) = self.room.take() {
            self.hub.leave(&old, self.id);
        }
        // Member from now on, live messages held back until the joined reply and the replay
        // are out.
        self.hub.rooms().entry(name.clone()).or_default().insert(
            self.id,
            Member {
                tx: self.tx.clone(),
                held: Some(Vec::new()),
                skip_through: 0,
            },
        );
        self.room = Some(name.clone());
        let joined = self.hub.msg(obj(json!({ "joined": name })));
        let sent = self.reply(joined).await;
        let mut replayed = since.unwrap_or(0);
        if sent.is_ok() && (since.is_some() || last.is_some()) {
            match self.hub.store.history(&name, since, last).await {
                Ok(kept) => {
                    for (id, mut fields) in kept {
                        fields.insert("replay".into(), Value::Bool(true));
                        let m = self.hub.msg(fields);
                        if self.reply(m).await.is_err() {
                            break;
                        }
                        replayed = replayed.max(id);
                    }
                }
                Err(e) => {
                    let _ = self.error(format!("history unavailable: {e}")).await;
                }
            }
        }
        self.hub.release(&name, self.id, replayed);
        sent
    }

    async fn say(&mut self, say: &Value) -> Result<(), Gone> {
        let (Some(text), Some(room)) = (say.as_str(), self.room.clone()) else {
            let why = if say.is_string() {
                "join a room first: {\"join\":\"lobby\"}"
            } else {
                "say expects a string"
            };
            return self.error(why).await;
        };
        let fields = obj(json!({
            "room": room, "from": self.from, "text": text, "origin": self.hub.name,
        }));
        // The sender's own copy comes back like everyone's: numbered, in order.
        match self.hub.store.publish(&self.hub, &room, fields).await {
            Ok(_) => Ok(()),
            Err(e) => self.error(format!("message not sent: {e}")).await,
        }
    }

    /// `{"history":{"room":ROOM,"since":ID}}` / `{"history":{"room":ROOM,"last":N}}`.
    async fn history(&mut self, q: &Value) -> Result<(), Gone> {
        const USE: &str = "history expects {\"room\":ROOM} with \"since\":ID and/or \"last\":N";
        let Some(room) = q.get("room").and_then(Value::as_str) else {
            return self.error(USE).await;
        };
        let since = q.get("since").map(Value::as_u64);
        let last = q.get("last").map(Value::as_u64);
        if since == Some(None) || last == Some(None) {
            return self.error(USE).await;
        }
        let last = last
            .flatten()
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
        match self.hub.store.history(room, since.flatten(), last).await {
            Ok(kept) => {
                let messages: Vec<Value> =
                    kept.into_iter().map(|(_, m)| Value::Object(m)).collect();
                let m = self.hub.msg(obj(
                    json!({ "history": { "room": room, "messages": messages } }),
                ));
                self.reply(m).await
            }
            Err(e) => self.error(format!("history unavailable: {e}")).await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 and the WebSocket handshake: the helpers shared with ticker_server.rs.

// Each server is also its own binary; the demo includes both, hence the module twice.
#[allow(clippy::duplicate_mod)]
#[path = "support/http.rs"]
mod http;
use http::*;

/// Reads a `Content-Length` body (chunked bodies are refused).
async fn read_body(stream: &mut TcpStream, head: &Head) -> Result<Vec<u8>, (u16, String)> {
    if head.header("transfer-encoding").is_some() {
        return Err((411, "send the body with Content-Length\n".into()));
    }
    let len: usize = match head.header("content-length") {
        None => 0,
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| (400, "bad Content-Length\n".to_string()))?,
    };
    if len > MAX_BODY_BYTES {
        return Err((413, format!("body over {MAX_BODY_BYTES} bytes\n")));
    }
    let mut body = head.rest.clone();
    body.truncate(len);
    if body.len() < len {
        let start = body.len();
        body.resize(len, 0);
        match timeout(HEAD_TIMEOUT, stream.read_exact(&mut body[start..])).await {
            Ok(Ok(())) => {}
            _ => return Err((400, "incomplete body\n".into())),
        }
    }
    Ok(body)
}
