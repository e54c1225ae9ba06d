//! Harness for the failover tests: the real `wsgate` binary and the real example backends
//! (`chat_server`, `ticker_server`) as child processes, killed on drop; every output line is
//! kept with the instant the test read it, so detection times are measured from the test's
//! own clock (kill sent → log line read). All waits are bounded.
//!
//! Self-contained on purpose (it does not share `tests/common`): the failover tests need
//! timestamped log lines and backend processes that can be killed and restarted on a port.
#![allow(dead_code)]

pub use async_tungstenite::tungstenite::protocol::CloseFrame;
pub use async_tungstenite::tungstenite::Message;
pub use serde_json::{json, Value};

use async_std::net::TcpStream;
use async_std::task;
use async_tungstenite::tungstenite::client::IntoClientRequest;
use async_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use async_tungstenite::WebSocketStream;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use std::collections::BTreeMap;
use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// The default bound on one wait.
pub const WAIT: Duration = Duration::from_secs(10);

/// The timing-sensitive tests of one target run one at a time: detection-time bounds are
/// about the gateway, not about how many other gateways share the two cores.
pub static SERIAL: async_std::sync::Mutex<()> = async_std::sync::Mutex::new(());

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Awaits `f`, panicking with `what` if it takes longer than `d`.
pub async fn within<F: Future>(what: &str, d: Duration, f: F) -> F::Output {
    match async_std::future::timeout(d, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {d:?} waiting for: {what}"),
    }
}

pub fn wsgate_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_wsgate"))
}

/// `<target>/<profile>/examples/NAME` (`cargo test` builds the examples).
pub fn example_bin(name: &str) -> PathBuf {
    let p = wsgate_bin().parent().unwrap().join("examples").join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --examples` (cargo test builds them)",
        p.display()
    );
    p
}

// ---------------------------------------------------------------------------------------------
// A "something changed" signal, so waits are woken by new output instead of sleeping.

#[derive(Default)]
pub struct Notify {
    generation: AtomicU64,
    wakers: Mutex<Vec<Waker>>,
}

impl Notify {
    pub fn notify(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        for w in std::mem::take(&mut *self.wakers.lock().unwrap()) {
            w.wake();
        }
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn changed(&self, seen: u64) -> Changed<'_> {
        Changed { notify: self, seen }
    }
}

struct Changed<'a> {
    notify: &'a Notify,
    seen: u64,
}

impl Future for Changed<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.notify.generation() != self.seen {
            return Poll::Ready(());
        }
        self.notify.wakers.lock().unwrap().push(cx.waker().clone());
        if self.notify.generation() != self.seen {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

// ---------------------------------------------------------------------------------------------
// Output of a child process, line by line, with the instant each line was read.

#[derive(Clone, Debug)]
pub struct Line {
    pub at: Instant,
    pub text: String,
}

#[derive(Default)]
pub struct Logs {
    lines: Mutex<Vec<Line>>,
    open: AtomicUsize,
    notify: Notify,
}

impl Logs {
    fn collect(self: &Arc<Self>, r: impl Read + Send + 'static) {
        self.open.fetch_add(1, Ordering::SeqCst);
        let logs = Arc::clone(self);
        std::thread::spawn(move || {
            let mut r = BufReader::new(r);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&buf).trim_end().to_string();
                        let at = Instant::now();
                        logs.lines.lock().unwrap().push(Line { at, text });
                        logs.notify.notify();
                    }
                }
            }
            logs.open.fetch_sub(1, Ordering::SeqCst);
            logs.notify.notify();
        });
    }

    pub fn lines(&self) -> Vec<Line> {
        self.lines.lock().unwrap().clone()
    }

    pub fn len(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dump(&self) -> String {
        let lines = self.lines.lock().unwrap();
        let mut out = String::new();
        for l in lines.iter() {
            out.push_str(&l.text);
            out.push('\n');
        }
        out
    }

    /// Lines at index ≥ `from` matching `pred`, with their indexes.
    pub fn matching(&self, from: usize, pred: impl Fn(&str) -> bool) -> Vec<(usize, Line)> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .enumerate()
            .skip(from)
            .filter(|(_, l)| pred(&l.text))
            .map(|(i, l)| (i, l.clone()))
            .collect()
    }

    pub fn count(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.matching(0, pred).len()
    }

    /// Waits (up to `d`) until `cond` holds on the lines; re-checked on every new line.
    /// Panics with the whole output on timeout or when the process's output ends first.
    pub async fn wait_until<T>(
        &self,
        what: &str,
        d: Duration,
        mut cond: impl FnMut(&[Line]) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + d;
        loop {
            let g = self.notify.generation();
            {
                let lines = self.lines.lock().unwrap();
                if let Some(v) = cond(&lines) {
                    return v;
                }
            }
            if self.open.load(Ordering::SeqCst) == 0 {
                panic!(
                    "process output ended before: {what}\n--- output ---\n{}",
                    self.dump()
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if async_std::future::timeout(left, self.notify.changed(g))
                .await
                .is_err()
            {
                panic!(
                    "timed out after {d:?} waiting for: {what}\n--- output ---\n{}",
                    self.dump()
                );
            }
        }
    }

    /// The first line at index ≥ `from` matching `pred`.
    pub async fn wait_line(
        &self,
        what: &str,
        from: usize,
        d: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> (usize, Line) {
        self.wait_until(what, d, |lines| {
            lines
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, l)| pred(&l.text))
                .map(|(i, l)| (i, l.clone()))
        })
        .await
    }

    /// Waits until at least `n` lines at index ≥ `from` match; returns them.
    pub async fn wait_count(
        &self,
        what: &str,
        from: usize,
        n: usize,
        d: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Vec<Line> {
        self.wait_until(what, d, |lines| {
            let found: Vec<Line> = lines
                .iter()
                .skip(from)
                .filter(|l| pred(&l.text))
                .cloned()
                .collect();
            (found.len() >= n).then_some(found)
        })
        .await
    }
}

/// The text after `marker` up to the next whitespace.
pub fn word_after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    let i = line.find(marker)? + marker.len();
    line[i..].split_whitespace().next()
}

/// `key=value` fields of a log line (an access line).
pub fn fields(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn is_access(l: &str) -> bool {
    l.contains("access session=")
}

pub fn is_down(l: &str, backend: SocketAddr) -> bool {
    l.contains(&format!("backend {backend} in pool ")) && l.contains(" is DOWN: ")
}

pub fn is_up(l: &str, backend: SocketAddr) -> bool {
    l.contains(&format!("backend {backend} in pool ")) && l.contains(" is UP: ")
}

// ---------------------------------------------------------------------------------------------
// Child processes.

/// A child process killed (SIGKILL) and reaped on drop, its stdout and stderr collected.
pub struct Proc {
    pub label: String,
    child: Option<Child>,
    pub logs: Arc<Logs>,
}

impl Proc {
    pub fn spawn(label: &str, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {label} {cmd:?}: {e}"));
        let logs = Arc::new(Logs::default());
        logs.collect(child.stderr.take().unwrap());
        logs.collect(child.stdout.take().unwrap());
        Proc {
            label: label.to_string(),
            child: Some(child),
            logs,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("process was killed").id()
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// SIGKILL, then reap: when this returns the process is gone and the kernel has closed
    /// its sockets. Returns the instant the signal was sent.
    pub fn kill(&mut self) -> Instant {
        let mut child = self.child.take().expect("process already killed");
        let at = Instant::now();
        child.kill().unwrap();
        child.wait().unwrap();
        at
    }

    /// Sends `-SIG` (e.g. `STOP`, `CONT`) to this process, our own child, by pid.
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(st.success(), "kill -{sig} {}", self.pid());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() && !self.label.starts_with("wsgate") {
            eprintln!("--- {} output ---\n{}", self.label, self.logs.dump());
        }
    }
}

/// Which example backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Ticker { interval_ms: u64 },
}

/// An example backend process (`chat_server` or `ticker_server`), restartable on its port.
pub struct ExampleBackend {
    pub name: String,
    pub kind: Kind,
    pub addr: SocketAddr,
    pub proc: Proc,
    /// Earlier incarnations (killed), kept for their output.
    pub past: Vec<Proc>,
}

impl ExampleBackend {
    pub async fn chat(name: &str) -> ExampleBackend {
        Self::start(name, Kind::Chat, 0).await
    }

    pub async fn ticker(name: &str, interval_ms: u64) -> ExampleBackend {
        Self::start(name, Kind::Ticker { interval_ms }, 0).await
    }

    /// Starts the process; on a port still taken (`cannot listen`), tries again a few times.
    async fn spawn(name: &str, kind: Kind, port: u16) -> (Proc, SocketAddr, Instant) {
        let mut tries = 0;
        loop {
            match Self::try_spawn(name, kind, port).await {
                Ok(ok) => return ok,
                Err(e) if tries < 20 => {
                    tries += 1;
                    eprintln!("{name}: {e}; trying again");
                    task::sleep(ms(50)).await;
                }
                Err(e) => panic!("{name}: {e}"),
            }
        }
    }

    async fn try_spawn(
        name: &str,
        kind: Kind,
        port: u16,
    ) -> Result<(Proc, SocketAddr, Instant), String> {
        let (bin, marker) = match kind {
            Kind::Chat => ("chat_server", format!("chat_server {name} listening on ")),
            Kind::Ticker { .. } => (
                "ticker_server",
                format!("ticker_server {name} listening on "),
            ),
        };
        let mut cmd = Command::new(example_bin(bin));
        cmd.arg("--port")
            .arg(port.to_string())
            .arg("--name")
            .arg(name)
            .env("RUST_LOG", "warn");
        if let Kind::Ticker { interval_ms } = kind {
            cmd.arg("--interval-ms").arg(interval_ms.to_string());
        }
        let proc = Proc::spawn(name, cmd);
        let line = proc
            .logs
            .wait_until(&format!("{name} ready"), WAIT, |lines| {
                lines.iter().find_map(|l| {
                    if l.text.contains(&marker) {
                        Some(Ok((l.text.clone(), l.at)))
                    } else if l.text.contains("cannot listen") {
                        Some(Err(l.text.clone()))
                    } else {
                        None
                    }
                })
            })
            .await?;
        let (line, ready) = line;
        let addr: SocketAddr = word_after(&line, &marker)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("bad readiness line {line:?}"));
        Ok((proc, addr, ready))
    }

    pub async fn start(name: &str, kind: Kind, port: u16) -> ExampleBackend {
        let (proc, addr, _) = Self::spawn(name, kind, port).await;
        ExampleBackend {
            name: name.to_string(),
            kind,
            addr,
            proc,
            past: Vec::new(),
        }
    }

    /// SIGKILL (see [`Proc::kill`]); returns the instant the signal was sent.
    pub fn kill(&mut self) -> Instant {
        self.proc.kill()
    }

    /// Starts the backend again on the same port; returns the instant it printed its
    /// readiness line (it accepts from then on).
    pub async fn restart(&mut self) -> Instant {
        let (proc, addr, ready) = Self::spawn(&self.name, self.kind, self.addr.port()).await;
        assert_eq!(addr, self.addr, "restarted on another address");
        let old = std::mem::replace(&mut self.proc, proc);
        self.past.push(old);
        ready
    }
}

// ---------------------------------------------------------------------------------------------
// The gateway.

pub struct Gateway {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    _dir: tempfile::TempDir,
}

impl Gateway {
    /// `wsgate --config <tmp>/config.json` with `RUST_LOG=info`; returns once its listener
    /// (and admin, when configured) logged their addresses.
    pub async fn start(config: Value) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
        let mut cmd = Command::new(wsgate_bin());
        cmd.arg("--config")
            .arg(&path)
            .current_dir(dir.path())
            .env("RUST_LOG", "info")
            .env_remove("RUST_LOG_STYLE");
        let proc = Proc::spawn("wsgate", cmd);
        let name = config["listeners"][0]["name"]
            .as_str()
            .expect("the tests name their listener")
            .to_string();
        let marker = format!("listener {name} listening on ");
        let (_, line) = proc
            .logs
            .wait_line("listener readiness", 0, WAIT, |l| l.contains(&marker))
            .await;
        let addr = parse_addr(&line.text, &marker);
        let admin = if config.get("admin").is_some() {
            let marker = "admin listening on ";
            let (_, line) = proc
                .logs
                .wait_line("admin readiness", 0, WAIT, |l| l.contains(marker))
                .await;
            Some(parse_addr(&line.text, marker))
        } else {
            None
        };
        Gateway {
            proc,
            addr,
            admin,
            _dir: dir,
        }
    }

    pub fn logs(&self) -> &Logs {
        &self.proc.logs
    }

    pub async fn http_get(&self, path: &str) -> String {
        let admin = self.admin.expect("admin is not configured");
        within(&format!("GET {path}"), WAIT, async {
            let mut s = TcpStream::connect(admin).await.unwrap();
            let req = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.unwrap();
            let text = String::from_utf8_lossy(&buf).into_owned();
            let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
            assert!(
                head.starts_with("HTTP/1.1 200"),
                "GET {path}: {head}\n{body}"
            );
            body.to_string()
        })
        .await
    }

    pub async fn metrics(&self) -> String {
        self.http_get("/metrics").await
    }

    pub async fn status(&self) -> Value {
        serde_json::from_str(&self.http_get("/status").await).expect("/status is JSON")
    }

    /// Polls `/metrics` until `cond` holds (bounded by `d`); returns the last text.
    pub async fn wait_metrics(
        &self,
        what: &str,
        d: Duration,
        cond: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + d;
        loop {
            let m = self.metrics().await;
            if cond(&m) {
                return m;
            }
            if Instant::now() >= deadline {
                panic!("timed out after {d:?} waiting for /metrics: {what}\n{m}");
            }
            async_std::task::sleep(ms(25)).await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("WSGATE_TEST_LOGS").is_some() {
            eprintln!("--- wsgate output ---\n{}", self.proc.logs.dump());
        }
    }
}

fn parse_addr(line: &str, marker: &str) -> SocketAddr {
    word_after(line, marker)
        .map(|a| a.trim_end_matches(','))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address after {marker:?} in {line:?}"))
}

/// Sum of the series of `name` whose labels include all of `labels`; None if absent.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, lbls) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name
            || !labels
                .iter()
                .all(|(k, v)| lbls.contains(&format!("{k}=\"{v}\"")))
        {
            continue;
        }
        if let Ok(v) = value.parse::<f64>() {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// WebSocket clients.

pub type Ws = WebSocketStream<TcpStream>;

pub struct Client {
    pub ws: Ws,
    /// The client's own address (the gateway logs it as `client=` in the access line).
    pub local: SocketAddr,
    /// TCP connect to `101` received.
    pub handshake: Duration,
}

/// A WebSocket handshake to `ws://addr{path}` with extra headers, bounded by `d`.
pub async fn try_connect(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    d: Duration,
) -> Result<Client, String> {
    let url = format!("ws://{addr}{path}");
    let mut req = url.as_str().into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().append(
            k.parse::<HeaderName>().unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let run = async move {
        let started = Instant::now();
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let local = tcp.local_addr().map_err(|e| e.to_string())?;
        let (ws, _) = async_tungstenite::client_async(req, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        Ok(Client {
            ws,
            local,
            handshake: started.elapsed(),
        })
    };
    match async_std::future::timeout(d, run).await {
        Ok(r) => r,
        Err(_) => Err(format!("handshake with {url} took over {d:?}")),
    }
}

pub async fn connect(addr: SocketAddr, path: &str) -> Client {
    try_connect(addr, path, &[], WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// What a client read next.
#[derive(Debug)]
pub enum Recv {
    Text(String),
    Close(Option<u16>),
    Ended(String),
}

impl Client {
    pub async fn send_text(&mut self, s: &str) {
        within(
            "client send",
            WAIT,
            self.ws.send(Message::text(s.to_string())),
        )
        .await
        .unwrap_or_else(|e| panic!("client send failed: {e}"));
    }

    /// The next text message, close, or end (pings and pongs skipped), bounded by `d`.
    pub async fn recv_for(&mut self, d: Duration) -> Option<Recv> {
        let next = async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Text(t))) => return Recv::Text(t.as_str().to_string()),
                    Some(Ok(Message::Close(f))) => {
                        return Recv::Close(f.map(|f| u16::from(f.code)))
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Recv::Ended(e.to_string()),
                    None => return Recv::Ended("stream ended".into()),
                }
            }
        };
        async_std::future::timeout(d, next).await.ok()
    }

    /// The next text message as JSON; panics on anything else.
    pub async fn recv_json(&mut self) -> Value {
        match self.recv_for(WAIT).await {
            Some(Recv::Text(t)) => serde_json::from_str(&t).unwrap_or_else(|_| json!(t)),
            other => panic!("expected a text message, got {other:?}"),
        }
    }

    /// `{"echo":x}` to a chat backend; returns the backend's name.
    pub async fn echo(&mut self, x: &str) -> String {
        self.send_text(&json!({ "echo": x }).to_string()).await;
        let v = self.recv_json().await;
        assert_eq!(v["echo"], json!(x), "echo reply {v}");
        v["backend"].as_str().unwrap().to_string()
    }

    /// A client-initiated close (1000), waiting for the gateway's close reply.
    pub async fn close(mut self) {
        within("client close handshake", WAIT, async {
            let frame = CloseFrame {
                code: 1000.into(),
                reason: "".into(),
            };
            self.ws.close(Some(frame)).await.ok();
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await
    }
}

// ---------------------------------------------------------------------------------------------
// A raw WebSocket client that sees close codes as sent on the wire (tungstenite 0.30 turns a
// received 1014 into 1002 "Protocol violation": `CloseCode::from(1014)` is `Bad(1014)`, not
// allowed), answers pings at once from its own reader task (so an idle session stays alive
// under `ping_interval_ms`), and timestamps everything it receives.

/// What a [`LiveClient`] received.
#[derive(Debug, Clone)]
pub enum Event {
    Text(String),
    /// A close frame: its code (None if it had no payload) and reason.
    Close(Option<u16>, String),
    /// The connection ended without a close frame, or failed.
    Ended(String),
}

enum Out {
    Text(String),
    Pong(Vec<u8>),
    Close(u16),
}

#[derive(Clone)]
pub struct Sender(futures::channel::mpsc::UnboundedSender<Out>);

impl Sender {
    pub fn send(&self, text: &str) {
        let _ = self.0.unbounded_send(Out::Text(text.to_string()));
    }
}

pub struct LiveClient {
    out: futures::channel::mpsc::UnboundedSender<Out>,
    events: futures::channel::mpsc::UnboundedReceiver<(Instant, Event)>,
    pub local: SocketAddr,
    /// TCP connect to `101` read.
    pub handshake: Duration,
}

fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x5a, 0x17, 0xc3, 0x8e];
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

struct FrameReader {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl FrameReader {
    async fn fill(&mut self, n: usize) -> std::io::Result<()> {
        let mut chunk = [0u8; 4096];
        while self.buf.len() < n {
            let k = self.stream.read(&mut chunk).await?;
            if k == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..k]);
        }
        Ok(())
    }

    /// One frame: (fin, opcode, payload).
    async fn frame(&mut self) -> std::io::Result<(bool, u8, Vec<u8>)> {
        self.fill(2).await?;
        let (b0, b1) = (self.buf[0], self.buf[1]);
        let masked = b1 & 0x80 != 0;
        let (mut len, mut at) = ((b1 & 0x7f) as usize, 2);
        if len == 126 {
            self.fill(4).await?;
            len = u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize;
            at = 4;
        } else if len == 127 {
            self.fill(10).await?;
            len = u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize;
            at = 10;
        }
        let key_len = if masked { 4 } else { 0 };
        self.fill(at + key_len + len).await?;
        let key: Vec<u8> = self.buf[at..at + key_len].to_vec();
        let mut payload: Vec<u8> = self.buf[at + key_len..at + key_len + len].to_vec();
        if masked {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= key[i % 4];
            }
        }
        self.buf.drain(..at + key_len + len);
        Ok((b0 & 0x80 != 0, b0 & 0x0f, payload))
    }
}

impl LiveClient {
    /// Upgrade on `ws://addr{path}` with extra headers, bounded by `d`.
    pub async fn connect(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
        d: Duration,
    ) -> Result<LiveClient, String> {
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        let run = async {
            let started = Instant::now();
            let mut stream = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let _ = stream.set_nodelay(true);
            let local = stream.local_addr().map_err(|e| e.to_string())?;
            stream
                .write_all(req.as_bytes())
                .await
                .map_err(|e| format!("write: {e}"))?;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let end = loop {
                let k = stream
                    .read(&mut chunk)
                    .await
                    .map_err(|e| format!("read: {e}"))?;
                if k == 0 {
                    return Err(format!(
                        "connection closed during the handshake: {:?}",
                        String::from_utf8_lossy(&buf)
                    ));
                }
                buf.extend_from_slice(&chunk[..k]);
                if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break p + 4;
                }
            };
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            if !head.starts_with("HTTP/1.1 101") {
                return Err(format!("upgrade refused: {}", head.lines().next().unwrap()));
            }
            buf.drain(..end);
            Ok((stream, buf, local, started.elapsed()))
        };
        let (stream, leftover, local, handshake) = async_std::future::timeout(d, run)
            .await
            .map_err(|_| format!("handshake with {addr} took over {d:?}"))??;
        let (out_tx, mut out_rx) = futures::channel::mpsc::unbounded::<Out>();
        let (ev_tx, events) = futures::channel::mpsc::unbounded();
        let mut writer = stream.clone();
        task::spawn(async move {
            while let Some(o) = out_rx.next().await {
                let (bytes, last) = match o {
                    Out::Text(t) => (frame(0x1, t.as_bytes()), false),
                    Out::Pong(p) => (frame(0xA, &p), false),
                    Out::Close(code) => (frame(0x8, &code.to_be_bytes()), true),
                };
                if writer.write_all(&bytes).await.is_err() || last {
                    break;
                }
            }
            // Sender dropped or close sent: stop writing. The reader ends the connection.
            let _ = writer.shutdown(std::net::Shutdown::Write);
        });
        let pong = out_tx.clone();
        task::spawn(async move {
            let mut r = FrameReader {
                stream,
                buf: leftover,
            };
            let mut message: Vec<u8> = Vec::new();
            loop {
                let ev = match r.frame().await {
                    Err(e) => Event::Ended(e.to_string()),
                    Ok((_, 0x9, p)) => {
                        let _ = pong.unbounded_send(Out::Pong(p));
                        continue;
                    }
                    Ok((_, 0xA, _)) => continue,
                    Ok((_, 0x8, p)) => {
                        let code = (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]));
                        let reason =
                            String::from_utf8_lossy(p.get(2..).unwrap_or(&[])).into_owned();
                        // Answer a close we did not start (echo its code); ours is already sent.
                        let _ = pong.unbounded_send(Out::Close(code.unwrap_or(1000)));
                        Event::Close(code, reason)
                    }
                    Ok((fin, _, p)) => {
                        message.extend_from_slice(&p);
                        if !fin {
                            continue;
                        }
                        Event::Text(
                            String::from_utf8_lossy(&std::mem::take(&mut message)).into_owned(),
                        )
                    }
                };
                let end = !matches!(ev, Event::Text(_));
                let _ = ev_tx.unbounded_send((Instant::now(), ev));
                if end {
                    break;
                }
            }
            // The writer half-closes after its close frame; dropping both clones closes.
        });
        Ok(LiveClient {
            out: out_tx,
            events,
            local,
            handshake,
        })
    }

    pub fn send(&self, text: &str) {
        let _ = self.out.unbounded_send(Out::Text(text.to_string()));
    }

    /// A handle that sends text while another task reads this client's events.
    pub fn sender(&self) -> Sender {
        Sender(self.out.clone())
    }

    /// The next event, waiting up to `d`; None on timeout (and after the end).
    pub async fn next(&mut self, d: Duration) -> Option<(Instant, Event)> {
        async_std::future::timeout(d, self.events.next())
            .await
            .ok()
            .flatten()
    }

    /// The next text message as JSON; panics on anything else.
    pub async fn next_json(&mut self) -> Value {
        match self.next(WAIT).await {
            Some((_, Event::Text(t))) => serde_json::from_str(&t).unwrap_or_else(|_| json!(t)),
            other => panic!("{}: expected a text message, got {other:?}", self.local),
        }
    }

    /// `{"echo":x}` to a chat backend; returns the backend's name.
    pub async fn echo(&mut self, x: &str) -> String {
        self.send(&json!({ "echo": x }).to_string());
        let v = self.next_json().await;
        assert_eq!(v["echo"], json!(x), "echo reply {v}");
        v["backend"].as_str().unwrap().to_string()
    }

    /// The close frame's code (what the gateway sent), skipping text; panics on timeout or
    /// on an end without a close frame.
    pub async fn close_code(&mut self, d: Duration) -> (Instant, Option<u16>) {
        let deadline = Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Some((_, Event::Text(_))) => continue,
                Some((at, Event::Close(code, _))) => return (at, code),
                other => panic!("{}: expected a close frame, got {other:?}", self.local),
            }
        }
    }

    /// Client-initiated close 1000; returns the code of the gateway's reply.
    pub async fn close(mut self) -> Option<u16> {
        let _ = self.out.unbounded_send(Out::Close(1000));
        self.close_code(WAIT).await.1
    }
}

// ---------------------------------------------------------------------------------------------
// An in-test WebSocket backend whose upgrade answer is slow, except on one path.

/// Answers upgrades on `fast_path` at once (the health checks use it) and every other
/// upgrade after `delay`; then echoes text messages unchanged, prefixed with nothing.
/// A text `close:CODE` makes it send a close frame with that code.
pub struct SlowBackend {
    pub addr: SocketAddr,
    /// Upgrades answered on paths other than `fast_path`.
    pub sessions: Arc<AtomicUsize>,
    task: Option<task::JoinHandle<()>>,
}

impl SlowBackend {
    pub async fn start(delay: Duration, fast_path: &'static str) -> SlowBackend {
        let l = async_std::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap();
        let addr = l.local_addr().unwrap();
        let sessions = Arc::new(AtomicUsize::new(0));
        let n = Arc::clone(&sessions);
        let task = task::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let n = Arc::clone(&n);
                task::spawn(async move {
                    let _ = slow_session(s, delay, fast_path, n).await;
                });
            }
        });
        SlowBackend {
            addr,
            sessions,
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        if let Some(t) = self.task.take() {
            t.cancel().await;
        }
    }
}

async fn slow_session(
    mut s: TcpStream,
    delay: Duration,
    fast_path: &str,
    sessions: Arc<AtomicUsize>,
) -> std::io::Result<()> {
    use async_tungstenite::tungstenite::handshake::derive_accept_key;
    use async_tungstenite::tungstenite::protocol::Role;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    let end = loop {
        let k = s.read(&mut chunk).await?;
        if k == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..k]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(&buf[..end]).map_err(std::io::Error::other)?;
    let path = req.path.unwrap_or("").to_string();
    let key = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-key"))
        .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
        .unwrap_or_default();
    if path != fast_path {
        task::sleep(delay).await;
        sessions.fetch_add(1, Ordering::SeqCst);
    }
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    );
    s.write_all(resp.as_bytes()).await?;
    let rest = buf[end..].to_vec();
    let mut ws = WebSocketStream::from_partially_read(s, rest, Role::Server, None).await;
    while let Some(Ok(m)) = ws.next().await {
        if let Message::Text(t) = m {
            if let Some(code) = t.as_str().strip_prefix("close:") {
                let frame = CloseFrame {
                    code: code.parse::<u16>().unwrap().into(),
                    reason: "as asked".into(),
                };
                let _ = ws.close(Some(frame)).await;
                continue;
            }
            if ws.send(Message::Text(t)).await.is_err() {
                break;
            }
        }
    }
    Ok(())
}
