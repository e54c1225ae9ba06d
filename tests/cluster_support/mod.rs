//! A whole wsgate fleet on loopback for the scale-out tests: a real `redis-server`, two
//! `chat_server --redis` backends, two `wsgate` instances with `proxy_protocol: true`, and a
//! real HAProxy in TCP mode with `send-proxy-v2` in front, its config made from
//! `deploy/haproxy.cfg.in` (the template `deploy/cluster.sh` uses). Every process is a child of
//! the test, killed by PID on drop; every wait is bounded; ports come from the OS (port 0 and
//! the readiness line) where the program allows it, else from a probe with retries.
//!
//! Chat clients connect from a chosen 127.0.0.N source address and collect what they receive
//! (with the instant) in an [`Inbox`] that outlives reconnections.
#![allow(dead_code)]

use crate::common::{example_bin, tcp_from, within, ChildGuard, Gateway, Notify, WAIT};
use async_std::net::TcpStream;
use async_std::task;
use async_tungstenite::tungstenite::client::IntoClientRequest;
use async_tungstenite::tungstenite::http::HeaderValue;
use async_tungstenite::tungstenite::Message;
use async_tungstenite::WebSocketStream;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The HAProxy config template shipped in deploy/.
pub const HAPROXY_TEMPLATE: &str = include_str!("../../deploy/haproxy.cfg.in");

/// The tests of tests/cluster.rs run one at a time: each runs seven processes and up to 40
/// clients, and the reconnect-time bound is about the fleet, not about the neighbours.
pub static SERIAL: async_std::sync::Mutex<()> = async_std::sync::Mutex::new(());

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// 127.0.0.N
pub fn lo(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// A port nothing listens on right now (the OS's pick for a socket bound and closed at once).
/// For programs that cannot bind port 0 and report it; callers retry when it was taken since.
pub fn probe_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls until `addr` accepts a TCP connection (bounded).
pub async fn wait_accepting(what: &str, addr: SocketAddr, d: Duration) {
    within(what, d, async {
        while TcpStream::connect(addr).await.is_err() {
            task::sleep(ms(20)).await;
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Redis

pub struct Redis {
    pub proc: ChildGuard,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Redis {
    /// `redis-server --port P --save '' --appendonly no --dir TMP` on a free port.
    pub async fn start() -> Redis {
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..5 {
            let port = probe_port();
            let mut cmd = Command::new("redis-server");
            cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--dir")
                .arg(dir.path());
            let proc = ChildGuard::spawn(cmd);
            let logs = proc.logs.clone();
            let mut ready = false;
            logs.notify
                .wait_until("redis-server ready (or failed)", WAIT, || {
                    let lines = logs.lines();
                    ready = lines
                        .iter()
                        .any(|l| l.contains("Ready to accept connections"));
                    ready
                        || lines
                            .iter()
                            .any(|l| l.contains("Could not create server TCP"))
                })
                .await;
            if ready {
                return Redis { proc, port, dir };
            }
            eprintln!("redis-server: port {port} taken; another one");
        }
        panic!("redis-server did not start on any of 5 ports");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A plain (blocking) connection for reading what the chat servers stored.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection_with_timeout(WAIT)
            .unwrap()
    }

    /// The kept history of a room, `(id, message)` oldest first.
    pub fn history(&self, room: &str) -> Vec<(u64, Value)> {
        let raw: Vec<String> = redis::cmd("ZRANGE")
            .arg(format!("wsgate-chat:history:{room}"))
            .arg(0)
            .arg(-1)
            .query(&mut self.conn())
            .unwrap();
        raw.iter()
            .map(|s| {
                let v: Value = serde_json::from_str(s).unwrap();
                (v["id"].as_u64().unwrap(), v)
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Chat backends

pub struct Chat {
    pub name: String,
    pub addr: SocketAddr,
    pub proc: ChildGuard,
}

impl Chat {
    /// `chat_server --port 0 --name NAME --redis URL`; ready once it printed its line (it
    /// prints it only once subscribed).
    pub async fn start(name: &str, redis_url: &str) -> Chat {
        let mut cmd = Command::new(example_bin("chat_server"));
        cmd.args(["--port", "0", "--name", name, "--redis", redis_url])
            .env("RUST_LOG", "warn");
        let proc = ChildGuard::spawn(cmd);
        let marker = format!("chat_server {name} listening on ");
        let line = proc
            .logs
            .wait_line(&format!("{name} ready"), |l| l.contains(&marker))
            .await;
        let addr = crate::common::word_after(&line, &marker)
            .unwrap()
            .parse()
            .unwrap();
        Chat {
            name: name.to_string(),
            addr,
            proc,
        }
    }

    /// SIGKILL (the child is ours; `Child::kill` signals its PID).
    pub fn kill(&mut self) {
        self.proc.child.kill().unwrap();
        self.proc.child.wait().unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// wsgate instances

/// A gateway config as deploy/cluster.sh writes it: one `proxy_protocol` listener, route `/`
/// to pool `chat` (ip_hash over the chat backends, websocket health checks, reconnect with the
/// join replayed), `X-Gateway: NAME` toward the backends, an admin endpoint.
pub fn gateway_config(
    name: &str,
    bind: SocketAddr,
    admin: SocketAddr,
    chats: &[SocketAddr],
) -> Value {
    let backends: Vec<Value> = chats
        .iter()
        .map(|a| json!({ "address": a.to_string() }))
        .collect();
    json!({
        "listeners": [ { "name": "public", "bind": bind.to_string(), "proxy_protocol": true,
                         "routes": [ { "path": "/", "pool": "chat" } ] } ],
        "pools": { "chat": {
            "balance": "ip_hash",
            "backends": backends,
            "health_check": { "kind": "websocket", "path": "/", "interval_ms": 200,
                              "timeout_ms": 1000, "healthy_after": 2, "unhealthy_after": 2 },
            "on_backend_loss": "reconnect",
            "replay_first_messages": 1,
            "http": true
        } },
        "timeouts": { "drain_ms": 5000 },
        "headers": { "forwarded": true, "set": { "X-Gateway": name } },
        "admin": { "bind": admin.to_string() }
    })
}

pub struct Instance {
    pub name: String,
    /// The backend list in this instance's config order.
    pub chats: Vec<SocketAddr>,
    pub gw: Option<Gateway>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

impl Instance {
    pub async fn start(name: &str, chats: Vec<SocketAddr>) -> Instance {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let gw = Gateway::start(gateway_config(name, any, any, &chats)).await;
        let (addr, admin) = (gw.listener("public"), gw.admin.unwrap());
        Instance {
            name: name.to_string(),
            chats,
            gw: Some(gw),
            addr,
            admin,
        }
    }

    pub fn gw(&self) -> &Gateway {
        self.gw.as_ref().expect("instance is stopped")
    }

    /// Starts the instance again with the same config (same ports).
    pub async fn restart(&mut self) {
        assert!(self.gw.is_none(), "restart of a running instance");
        let cfg = gateway_config(&self.name, self.addr, self.admin, &self.chats);
        self.gw = Some(Gateway::start(cfg).await);
    }
}

// ---------------------------------------------------------------------------------------------
// HAProxy

pub struct HaProxy {
    pub proc: ChildGuard,
    dir: tempfile::TempDir,
    /// The main frontend (leastconn over every instance), as in deploy/.
    pub all: SocketAddr,
    /// Test-only frontends, each to one instance only (same server line as in `all`).
    pub only: Vec<SocketAddr>,
}

/// `server NAME 127.0.0.1:P send-proxy-v2 check port ADMIN`
fn server_line(i: &Instance) -> String {
    format!(
        "    server {} {} send-proxy-v2 check port {}",
        i.name,
        i.addr,
        i.admin.port()
    )
}

impl HaProxy {
    /// HAProxy from the deploy/ template, plus one frontend per instance that reaches only
    /// it; in the foreground (`-db`); ready when every frontend accepts and every server is UP.
    pub async fn start(instances: &[Instance]) -> HaProxy {
        let servers: Vec<String> = instances.iter().map(server_line).collect();
        for attempt in 1..=5 {
            let dir = tempfile::tempdir().unwrap();
            let all: SocketAddr = format!("127.0.0.1:{}", probe_port()).parse().unwrap();
            let only: Vec<SocketAddr> = instances
                .iter()
                .map(|_| format!("127.0.0.1:{}", probe_port()).parse().unwrap())
                .collect();
            let stats = format!("127.0.0.1:{}", probe_port());
            // As deploy/cluster.sh fills it in: a line that is only `@SERVERS@` becomes the
            // server lines; the other placeholders are replaced wherever they are.
            let mut cfg = String::new();
            for line in HAPROXY_TEMPLATE.lines() {
                if line == "@SERVERS@" {
                    cfg.push_str(&servers.join("\n"));
                } else {
                    cfg.push_str(
                        &line
                            .replace("@STATE_DIR@", dir.path().to_str().unwrap())
                            .replace("@BIND@", &all.to_string())
                            .replace("@STATS_BIND@", &stats),
                    );
                }
                cfg.push('\n');
            }
            for (inst, addr) in instances.iter().zip(&only) {
                cfg.push_str(&format!(
                    "\nfrontend only_{n}\n    bind {addr}\n    default_backend only_{n}\n\n\
                     backend only_{n}\n    option httpchk\n    http-check send meth GET uri /status\n    \
                     http-check expect status 200\n{server}\n",
                    n = inst.name,
                    server = server_line(inst),
                ));
            }
            let path = dir.path().join("haproxy.cfg");
            std::fs::write(&path, &cfg).unwrap();
            let mut cmd = Command::new("haproxy");
            cmd.arg("-f").arg(&path).arg("-db");
            let mut proc = ChildGuard::spawn(cmd);
            let up = within("haproxy frontends accept (or haproxy exits)", WAIT, async {
                for a in std::iter::once(&all).chain(&only) {
                    while TcpStream::connect(a).await.is_err() {
                        if proc.child.try_wait().unwrap().is_some() {
                            return false;
                        }
                        task::sleep(ms(20)).await;
                    }
                }
                true
            })
            .await;
            if up {
                let hp = HaProxy {
                    proc,
                    dir,
                    all,
                    only,
                };
                for inst in instances {
                    hp.wait_server(&inst.name, "UP").await;
                }
                return hp;
            }
            eprintln!(
                "haproxy did not start (attempt {attempt}; a probed port taken since?):\n{}",
                proc.logs.dump()
            );
        }
        panic!("haproxy did not start in 5 attempts");
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("haproxy.sock")
    }

    /// `show stat` on the runtime API socket: (proxy, server) → status (`UP`, `DOWN`, ...).
    pub async fn servers(&self) -> BTreeMap<(String, String), String> {
        let csv = runtime_api(&self.socket(), "show stat").await;
        let mut out = BTreeMap::new();
        for line in csv.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            let f: Vec<&str> = line.split(',').collect();
            if f.len() > 17 && f[1] != "FRONTEND" && f[1] != "BACKEND" {
                out.insert((f[0].to_string(), f[1].to_string()), f[17].to_string());
            }
        }
        out
    }

    /// Waits (bounded) until server `name` of backend `wsgate` has `status` (`UP` / `DOWN`),
    /// as HAProxy's own runtime API reports it.
    pub async fn wait_server(&self, name: &str, status: &str) -> Instant {
        let key = ("wsgate".to_string(), name.to_string());
        within(&format!("haproxy sees {name} {status}"), WAIT, async {
            loop {
                if self.servers().await.get(&key).map(String::as_str) == Some(status) {
                    return Instant::now();
                }
                task::sleep(ms(20)).await;
            }
        })
        .await
    }
}

/// One command on HAProxy's runtime API (unix socket); the whole answer.
pub async fn runtime_api(sock: &Path, cmd: &str) -> String {
    within("haproxy runtime API", WAIT, async {
        let mut s = async_std::os::unix::net::UnixStream::connect(sock)
            .await
            .unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
        s.write_all(format!("{cmd}\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// The fleet

/// Dropped front to back (fields drop in order): HAProxy, the gateways, the backends, Redis.
pub struct Cluster {
    pub haproxy: HaProxy,
    pub gws: Vec<Instance>,
    pub chats: Vec<Chat>,
    pub redis: Redis,
}

impl Cluster {
    /// Redis, chat1 + chat2 on it, gw1 + gw2 (gw2 lists the backends in reverse order when
    /// `reverse_on_gw2`: the ip_hash ring must not depend on it), HAProxy in front.
    pub async fn start(reverse_on_gw2: bool) -> Cluster {
        let redis = Redis::start().await;
        let url = redis.url();
        let chats = vec![
            Chat::start("chat1", &url).await,
            Chat::start("chat2", &url).await,
        ];
        let list: Vec<SocketAddr> = chats.iter().map(|c| c.addr).collect();
        let mut rev = list.clone();
        if reverse_on_gw2 {
            rev.reverse();
        }
        let gws = vec![
            Instance::start("gw1", list).await,
            Instance::start("gw2", rev).await,
        ];
        let haproxy = HaProxy::start(&gws).await;
        Cluster {
            redis,
            chats,
            gws,
            haproxy,
        }
    }

    pub fn chat_name(&self, addr: SocketAddr) -> &str {
        &self.chats.iter().find(|c| c.addr == addr).unwrap().name
    }
}

// ---------------------------------------------------------------------------------------------
// Chat clients

/// What one participant received, over all its connections.
#[derive(Default)]
pub struct Inbox {
    state: Mutex<InboxState>,
    pub notify: Notify,
}

#[derive(Default, Clone)]
pub struct InboxState {
    /// (connection number, instant read, message).
    pub msgs: Vec<(usize, Instant, Value)>,
    /// (connection number, instant, close code) when a connection ended (code `None`: no close
    /// frame).
    pub closes: Vec<(usize, Instant, Option<u16>)>,
}

impl InboxState {
    /// Room messages (with an `id`), in arrival order.
    pub fn room_msgs(&self) -> impl Iterator<Item = &(usize, Instant, Value)> {
        self.msgs.iter().filter(|(_, _, v)| v["id"].is_u64())
    }

    pub fn ids(&self) -> Vec<u64> {
        self.room_msgs()
            .map(|(_, _, v)| v["id"].as_u64().unwrap())
            .collect()
    }

    pub fn last_id(&self) -> u64 {
        self.ids().into_iter().max().unwrap_or(0)
    }
}

impl Inbox {
    pub fn state(&self) -> MutexGuard<'_, InboxState> {
        self.state.lock().unwrap()
    }

    pub fn snapshot(&self) -> InboxState {
        self.state().clone()
    }

    /// Waits (bounded) until `f` returns `Some`, re-checked on every message or close.
    pub async fn wait<T>(
        &self,
        what: &str,
        d: Duration,
        mut f: impl FnMut(&InboxState) -> Option<T>,
    ) -> T {
        let mut out = None;
        self.notify
            .wait_until(what, d, || {
                out = f(&self.state());
                out.is_some()
            })
            .await;
        out.unwrap()
    }
}

pub type Ws = WebSocketStream<TcpStream>;

/// One connection of a participant: messages go to the participant's [`Inbox`].
pub struct ChatClient {
    pub src: IpAddr,
    /// The client socket's own address (as the gateway should see it through PROXY v2).
    pub local: SocketAddr,
    pub conn: usize,
    sink: async_tungstenite::WebSocketSender<TcpStream>,
    pub inbox: Arc<Inbox>,
}

impl ChatClient {
    /// Connects from `src` to `ws://addr/` (extra request headers allowed); connection number
    /// `conn` of `inbox`.
    pub async fn connect(
        src: IpAddr,
        addr: SocketAddr,
        inbox: Arc<Inbox>,
        conn: usize,
        headers: &[(&str, &str)],
    ) -> Result<ChatClient, String> {
        let mut req = format!("ws://{addr}/").into_client_request().unwrap();
        for (k, v) in headers {
            let name: async_tungstenite::tungstenite::http::HeaderName = k.parse().unwrap();
            req.headers_mut()
                .append(name, HeaderValue::from_str(v).unwrap());
        }
        let tcp = tcp_from(src, addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let local = tcp.local_addr().unwrap();
        let (ws, _resp) = async_tungstenite::client_async(req, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (sink, mut stream) = ws.split();
        let reader_inbox = inbox.clone();
        task::spawn(async move {
            let mut code = None;
            while let Some(item) = stream.next().await {
                match item {
                    Ok(Message::Text(t)) => {
                        let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                        reader_inbox.state().msgs.push((conn, Instant::now(), v));
                        reader_inbox.notify.notify();
                    }
                    Ok(Message::Close(f)) => code = f.map(|f| u16::from(f.code)),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            reader_inbox
                .state()
                .closes
                .push((conn, Instant::now(), code));
            reader_inbox.notify.notify();
        });
        Ok(ChatClient {
            src,
            local,
            conn,
            sink,
            inbox,
        })
    }

    pub async fn send(&mut self, v: Value) {
        within(
            "chat client send",
            WAIT,
            self.sink.send(Message::text(v.to_string())),
        )
        .await
        .unwrap_or_else(|e| panic!("send from {}: {e}", self.src));
    }

    /// The next message of this connection that has key `key`, after the messages seen so far.
    pub async fn request(&mut self, req: Value, key: &str) -> Value {
        let from = self.inbox.state().msgs.len();
        self.send(req).await;
        let conn = self.conn;
        self.inbox
            .wait(
                &format!("reply with {key:?} from {}", self.src),
                WAIT,
                |s| {
                    s.msgs[from..]
                        .iter()
                        .find(|(c, _, v)| *c == conn && v.get(key).is_some())
                        .map(|(_, _, v)| v.clone())
                },
            )
            .await
    }

    /// `{"whoami":true}` → (backend name, the request headers the backend saw).
    pub async fn whoami(&mut self) -> (String, Value) {
        let v = self.request(json!({ "whoami": true }), "whoami").await;
        (
            v["backend"].as_str().unwrap().to_string(),
            v["whoami"]["headers"].clone(),
        )
    }

    pub async fn close(mut self) {
        let _ = within("chat client close", WAIT, self.sink.close(None)).await;
    }
}

/// A participant: its source address, room, inbox, and current connection.
pub struct Participant {
    pub src: IpAddr,
    pub room: String,
    pub inbox: Arc<Inbox>,
    pub client: Option<ChatClient>,
    /// Gateway instance (`X-Gateway`) and chat backend of the current connection.
    pub gateway: String,
    pub backend: String,
}

impl Participant {
    /// Connects from `src` through `addr`, joins `room` (first message: the one the gateways
    /// replay after a backend loss), then asks `whoami`.
    pub async fn join(src: IpAddr, addr: SocketAddr, room: &str) -> Participant {
        let inbox = Arc::new(Inbox::default());
        let mut c = ChatClient::connect(src, addr, inbox.clone(), 0, &[])
            .await
            .unwrap_or_else(|e| panic!("{src} → {addr}: {e}"));
        // The join first: it is the message the gateways replay after a backend loss.
        c.request(json!({ "join": room }), "joined").await;
        let (backend, headers) = c.whoami().await;
        Participant {
            src,
            room: room.to_string(),
            inbox,
            gateway: headers["x-gateway"].as_str().unwrap().to_string(),
            backend,
            client: Some(c),
        }
    }

    pub fn conns(&self) -> usize {
        self.client.as_ref().map_or(0, |c| c.conn + 1)
    }
}
