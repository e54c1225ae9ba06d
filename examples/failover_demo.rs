//! Live failover, end to end: the real `wsgate` binary in front of two `ticker_server`
//! processes, N subscribed clients, one backend killed with SIGKILL, and what the clients saw.
//!
//! ```text
//! cargo build --examples --bins && cargo run --example failover_demo -- [--clients 50] [--interval-ms 100]
//! ```
//!
//! It runs `<target>/<profile>/wsgate` and `<target>/<profile>/examples/ticker_server` from the
//! same target folder as itself (build them first). The pool uses `ip_hash` with the clients
//! spread over source addresses 127.0.0.10… (Linux routes all of 127/8 to loopback), websocket
//! health checks every 500 ms, `on_backend_loss: reconnect` and `replay_first_messages: 1`:
//! each client's first message is its `{"subscribe":[SYMBOL]}`, replayed to the new backend.
//! Every client also sends a numbered message `{"n":K}` every 100 ms, which the ticker acks.
//!
//! Once every client has seen 3 ticks, the backend that holds most clients is killed. The
//! demo then waits until every client has seen 5 ticks from the surviving backend (bounded),
//! stops sending, collects the last acks, closes all sessions, and prints:
//!
//! * **detection time**: kill → the first `failed over` log line (a live session noticed the
//!   reset and moved) and kill → the `is DOWN` line (the health checks' verdict);
//! * **sessions re-homed**: clients of the killed backend now receiving ticks of their own
//!   symbol from the survivor without having subscribed again (and the failover log lines);
//! * **messages lost**: ticks — a gap in the `seq` numbers of one backend connection (the
//!   ticks the dead backend would have produced after its death were never produced and are
//!   not counted; a new connection must start at `seq` 1); client messages — numbered
//!   messages never acknowledged (SPEC allows losing only those the gateway had already
//!   written to the dead backend before it noticed);
//! * **max tick gap**: the longest time between two consecutive ticks at one client (for a
//!   re-homed client it spans the switch: last tick from the dead backend → first from the
//!   survivor, about one tick interval plus the failover).
//!
//! Bounded (60 s at most), kills its child processes on every exit path, exits 0 on success.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{exit, Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_std::net::TcpStream;
use async_std::task;
use async_tungstenite::tungstenite::Message;
use futures::StreamExt;
use serde_json::{json, Value};

const USAGE: &str = "usage: failover_demo [--clients N (50)] [--interval-ms MS (100)]";
/// The whole run, startup to cleanup.
const DEADLINE: Duration = Duration::from_secs(60);
/// Any single wait (a readiness line, warm-up, re-homing).
const WAIT: Duration = Duration::from_secs(10);

fn main() {
    let (clients, interval_ms) = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("failover_demo: {e}\n{USAGE}");
            exit(2);
        }
    };
    let bins = match find_binaries() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("failover_demo: {e}");
            exit(1);
        }
    };
    let mut children = Children::default();
    let outcome = task::block_on(async_std::future::timeout(
        DEADLINE,
        run(&bins, clients, interval_ms, &mut children),
    ));
    drop(children); // kills what is still running, removes the temp folder
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            eprintln!("failover_demo: {e}");
            exit(1);
        }
        Err(_) => {
            eprintln!("failover_demo: did not finish within {DEADLINE:?}");
            exit(1);
        }
    }
}

fn parse_args() -> Result<(usize, u64), String> {
    let (mut clients, mut interval) = (50usize, 100u64);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--clients" => {
                clients = value()?
                    .parse()
                    .ok()
                    .filter(|n| (1..=200).contains(n))
                    .ok_or("--clients: 1 to 200")?
            }
            "--interval-ms" => {
                interval = value()?
                    .parse()
                    .ok()
                    .filter(|n| (10..=1000).contains(n))
                    .ok_or("--interval-ms: 10 to 1000")?
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok((clients, interval))
}

struct Binaries {
    wsgate: PathBuf,
    ticker: PathBuf,
}

/// `<target>/<profile>/examples/failover_demo` → `<target>/<profile>/wsgate` and
/// `<target>/<profile>/examples/ticker_server`.
fn find_binaries() -> Result<Binaries, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate myself: {e}"))?;
    let examples = exe.parent().ok_or("no parent folder")?;
    let profile = examples.parent().ok_or("no profile folder")?;
    let b = Binaries {
        wsgate: profile.join(format!("wsgate{}", std::env::consts::EXE_SUFFIX)),
        ticker: examples.join(format!("ticker_server{}", std::env::consts::EXE_SUFFIX)),
    };
    for p in [&b.wsgate, &b.ticker] {
        if !p.exists() {
            return Err(format!(
                "{} not found: build it first with `cargo build --examples --bins` (same \
                 profile as this demo)",
                p.display()
            ));
        }
    }
    Ok(b)
}

// ---------------------------------------------------------------------------------------------
// Child processes and their output.

/// Output lines of a child, with the instant each was read.
#[derive(Default)]
struct Output {
    lines: Mutex<Vec<(Instant, String)>>,
}

impl Output {
    fn collect(self: &Arc<Self>, r: impl Read + Send + 'static) {
        let out = Arc::clone(self);
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines() {
                let Ok(line) = line else { break };
                out.lines.lock().unwrap().push((Instant::now(), line));
            }
        });
    }

    fn find(&self, from: usize, pred: impl Fn(&str) -> bool) -> Option<(Instant, String)> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .skip(from)
            .find(|(_, l)| pred(l))
            .cloned()
    }

    fn count(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, l)| pred(l))
            .count()
    }

    fn len(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    async fn wait(
        &self,
        what: &str,
        from: usize,
        d: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(Instant, String), String> {
        let deadline = Instant::now() + d;
        loop {
            if let Some(found) = self.find(from, &pred) {
                return Ok(found);
            }
            if Instant::now() > deadline {
                return Err(format!("no {what} within {d:?}"));
            }
            task::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Every child process of the demo: killed (SIGKILL) and reaped on drop; the temp folder goes too.
#[derive(Default)]
struct Children {
    procs: Vec<(String, Child)>,
    temp: Option<PathBuf>,
}

impl Children {
    fn spawn(&mut self, label: &str, mut cmd: Command) -> Result<Arc<Output>, String> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {label}: {e}"))?;
        let out = Arc::new(Output::default());
        out.collect(child.stdout.take().unwrap());
        out.collect(child.stderr.take().unwrap());
        self.procs.push((label.to_string(), child));
        Ok(out)
    }

    /// SIGKILL `label` and reap it; returns the instant the signal was sent.
    fn kill(&mut self, label: &str) -> Instant {
        let i = self.procs.iter().position(|(l, _)| l == label).unwrap();
        let (_, mut child) = self.procs.remove(i);
        let at = Instant::now();
        let _ = child.kill();
        let _ = child.wait();
        at
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, c) in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(t) = self.temp.take() {
            let _ = std::fs::remove_dir_all(t);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients.

/// What one client saw.
#[derive(Default)]
struct Seen {
    /// (arrival, backend, seq) of every tick of the client's symbol.
    ticks: Vec<(Instant, String, u64)>,
    /// Numbered messages sent, and the acks received (n).
    sent: u64,
    acked: Vec<u64>,
    /// Anything wrong: another symbol, a close, an end.
    trouble: Vec<String>,
}

struct Shared {
    seen: Vec<Mutex<Seen>>,
    stop_sending: AtomicBool,
    done: AtomicUsize,
}

/// A TCP connection from `src` (any 127/8 address) to `dst`.
async fn tcp_from(src: IpAddr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    task::spawn_blocking(move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.bind(&SocketAddr::new(src, 0).into())?;
        s.connect_timeout(&dst.into(), Duration::from_secs(5))?;
        let s: std::net::TcpStream = s.into();
        s.set_nodelay(true)?;
        Ok(TcpStream::from(s))
    })
    .await
}

async fn client(i: usize, gateway: SocketAddr, shared: Arc<Shared>) -> Result<(), String> {
    let src = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + (i % 200) as u8));
    let tcp = tcp_from(src, gateway)
        .await
        .map_err(|e| format!("client {i}: connect: {e}"))?;
    let (ws, _) = async_tungstenite::client_async(format!("ws://{gateway}/"), tcp)
        .await
        .map_err(|e| format!("client {i}: handshake: {e}"))?;
    let (mut sink, mut stream) = ws.split();
    let symbol = format!("SYM{i:03}");
    sink.send(Message::text(json!({ "subscribe": [symbol] }).to_string()))
        .await
        .map_err(|e| format!("client {i}: {e}"))?;
    let me = &shared.seen[i];
    let send = async {
        let mut n = 0u64;
        while !shared.stop_sending.load(Ordering::SeqCst) {
            task::sleep(Duration::from_millis(100)).await;
            n += 1;
            if sink
                .send(Message::text(json!({ "n": n }).to_string()))
                .await
                .is_err()
            {
                break;
            }
            me.lock().unwrap().sent = n;
        }
        sink
    };
    let recv = async {
        while let Some(m) = stream.next().await {
            let text = match m {
                Ok(Message::Text(t)) => t,
                Ok(Message::Close(f)) => {
                    me.lock().unwrap().trouble.push(format!("closed: {f:?}"));
                    break;
                }
                Ok(_) => continue,
                Err(e) => {
                    me.lock().unwrap().trouble.push(format!("ended: {e}"));
                    break;
                }
            };
            let at = Instant::now();
            let v: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
            let backend = v["backend"].as_str().unwrap_or("?").to_string();
            let mut s = me.lock().unwrap();
            if let Some(n) = v["ack"]["n"].as_u64() {
                s.acked.push(n);
                // Everything sent is acknowledged: done.
                if shared.stop_sending.load(Ordering::SeqCst) && n == s.sent {
                    break;
                }
            } else if v["symbol"] == json!(symbol) {
                let seq = v["seq"].as_u64().unwrap_or(0);
                s.ticks.push((at, backend, seq));
            } else {
                s.trouble.push(format!("unexpected: {v}"));
            }
        }
        stream
    };
    let (sink, stream) = futures::join!(send, recv);
    shared.done.fetch_add(1, Ordering::SeqCst);
    if let Ok(mut ws) = async_tungstenite::WebSocketStream::reunite(sink, stream) {
        let _ = async_std::future::timeout(Duration::from_secs(2), async {
            let _ = ws.close(None).await;
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------

async fn start_ticker(
    children: &mut Children,
    bin: &Path,
    name: &str,
    interval_ms: u64,
) -> Result<SocketAddr, String> {
    let mut cmd = Command::new(bin);
    cmd.args(["--port", "0", "--name", name, "--interval-ms"])
        .arg(interval_ms.to_string())
        .env("RUST_LOG", "warn");
    let out = children.spawn(name, cmd)?;
    let marker = format!("ticker_server {name} listening on ");
    let (_, line) = out
        .wait(&format!("{name} readiness"), 0, WAIT, |l| {
            l.contains(&marker)
        })
        .await?;
    line.split_once(&marker)
        .and_then(|(_, a)| a.trim().parse().ok())
        .ok_or(format!("bad readiness line {line:?}"))
}

async fn run(
    bins: &Binaries,
    n_clients: usize,
    interval_ms: u64,
    children: &mut Children,
) -> Result<(), String> {
    let names = ["ticker-a", "ticker-b"];
    let mut addrs = Vec::new();
    for name in names {
        addrs.push(start_ticker(children, &bins.ticker, name, interval_ms).await?);
    }
    let dir = std::env::temp_dir().join(format!("wsgate-failover-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    children.temp = Some(dir.clone());
    let config = json!({
        "listeners": [ { "name": "demo", "bind": "127.0.0.1:0",
                         "routes": [ { "path": "/", "pool": "ticker" } ] } ],
        "pools": { "ticker": {
            "balance": "ip_hash",
            "backends": addrs.iter().map(|a| json!({ "address": a.to_string() })).collect::<Vec<_>>(),
            "health_check": { "kind": "websocket", "interval_ms": 500, "timeout_ms": 500,
                              "healthy_after": 2, "unhealthy_after": 2 },
            "on_backend_loss": "reconnect",
            "replay_first_messages": 1
        } },
        "admin": { "bind": "127.0.0.1:0" }
    });
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, serde_json::to_string_pretty(&config).unwrap())
        .map_err(|e| format!("{}: {e}", config_path.display()))?;
    let mut cmd = Command::new(&bins.wsgate);
    cmd.arg("--config")
        .arg(&config_path)
        .env("RUST_LOG", "info");
    let gw = children.spawn("wsgate", cmd)?;
    let marker = "listener demo listening on ";
    let (_, line) = gw
        .wait("wsgate readiness", 0, WAIT, |l| l.contains(marker))
        .await?;
    let gateway: SocketAddr = line
        .split_once(marker)
        .and_then(|(_, a)| a.split_whitespace().next())
        .and_then(|a| a.trim_end_matches(',').parse().ok())
        .ok_or(format!("bad readiness line {line:?}"))?;
    println!(
        "wsgate on {gateway}; {} on {}, {} on {} (ticks every {interval_ms} ms)",
        names[0], addrs[0], names[1], addrs[1]
    );

    let shared = Arc::new(Shared {
        seen: (0..n_clients)
            .map(|_| Mutex::new(Seen::default()))
            .collect(),
        stop_sending: AtomicBool::new(false),
        done: AtomicUsize::new(0),
    });
    let tasks: Vec<_> = (0..n_clients)
        .map(|i| task::spawn(client(i, gateway, Arc::clone(&shared))))
        .collect();

    // Warm-up: every client has 3 ticks.
    let warm = Instant::now();
    loop {
        let ready = shared
            .seen
            .iter()
            .filter(|s| s.lock().unwrap().ticks.len() >= 3)
            .count();
        if ready == n_clients {
            break;
        }
        if warm.elapsed() > WAIT {
            return Err(format!("only {ready}/{n_clients} clients got 3 ticks"));
        }
        task::sleep(Duration::from_millis(10)).await;
    }
    let home = |s: &Seen| s.ticks.last().map(|t| t.1.clone()).unwrap_or_default();
    let homes: Vec<String> = shared
        .seen
        .iter()
        .map(|s| home(&s.lock().unwrap()))
        .collect();
    let on = |name: &str| homes.iter().filter(|h| *h == name).count();
    println!(
        "{n_clients} clients subscribed (one symbol each): {} on {}, {} on {}",
        on(names[0]),
        names[0],
        on(names[1]),
        names[1]
    );
    let (victim, survivor) = if on(names[0]) >= on(names[1]) {
        (names[0], names[1])
    } else {
        (names[1], names[0])
    };
    let victim_addr = addrs[if victim == names[0] { 0 } else { 1 }];
    let moved: Vec<usize> = (0..n_clients).filter(|&i| homes[i] == victim).collect();
    let stayed: Vec<usize> = (0..n_clients).filter(|&i| homes[i] != victim).collect();
    println!("killing {victim} ({} clients) with SIGKILL", moved.len());
    let from = gw.len();
    let killed = children.kill(victim);

    // Re-homing: every moved client has 5 ticks from the survivor (bounded).
    let rehomed = |i: &usize| {
        shared.seen[*i]
            .lock()
            .unwrap()
            .ticks
            .iter()
            .filter(|t| t.0 > killed && t.1 == survivor)
            .count()
            >= 5
    };
    while moved.iter().any(|i| !rehomed(i)) && killed.elapsed() < WAIT {
        task::sleep(Duration::from_millis(10)).await;
    }
    let down = gw
        .wait("DOWN line", from, Duration::from_secs(3), |l| {
            l.contains(&format!("backend {victim_addr} in pool ticker is DOWN"))
        })
        .await
        .ok();
    shared.stop_sending.store(true, Ordering::SeqCst);
    let stop_at = Instant::now();
    while shared.done.load(Ordering::SeqCst) < n_clients
        && stop_at.elapsed() < Duration::from_secs(3)
    {
        task::sleep(Duration::from_millis(10)).await;
    }
    for t in tasks {
        if let Ok(Err(e)) = async_std::future::timeout(Duration::from_secs(3), t).await {
            println!("  {e}");
        }
    }

    // Report.
    let first_failover = gw.find(from, |l| l.contains(" failed over from "));
    let failover_lines = gw.count(|l| l.contains(" failed over from "));
    let replayed_one =
        gw.count(|l| l.contains(" failed over from ") && l.contains("(replayed 1 messages)"));
    let failed = gw.count(|l| l.contains("failover failed"));
    println!("--- results ---");
    match &first_failover {
        Some((at, _)) => print!(
            "detection: first failover logged {} ms after the kill",
            at.duration_since(killed).as_millis()
        ),
        None => print!("detection: no failover line"),
    }
    match &down {
        Some((at, l)) => println!(
            "; {victim} DOWN logged {} ms after the kill ({})",
            at.duration_since(killed).as_millis(),
            l.split_once(" is DOWN: ").map_or("", |x| x.1)
        ),
        None => println!("; no DOWN line within 3 s"),
    }
    let rehomed_ok = moved.iter().filter(|i| rehomed(i)).count();
    // Untouched: only ticks from the survivor, seq 1, 2, 3… without a gap or a restart.
    let untouched = stayed
        .iter()
        .filter(|&&i| {
            let s = shared.seen[i].lock().unwrap();
            s.ticks.iter().all(|t| t.1 == survivor)
                && s.ticks.iter().enumerate().all(|(k, t)| t.2 == k as u64 + 1)
        })
        .count();
    println!(
        "sessions re-homed: {rehomed_ok}/{} now get their own symbol from {survivor} without \
         subscribing again ({failover_lines} failover lines, {replayed_one} replayed the \
         subscribe, {failed} failovers failed); clients on {survivor}: {untouched}/{} untouched \
         (one connection, seq without a gap)",
        moved.len(),
        stayed.len()
    );
    let (mut tick_gaps, mut bad_restart, mut sent, mut lost_msgs, mut max_gap) =
        (0u64, 0usize, 0u64, 0u64, Duration::ZERO);
    let mut gap_of_moved = Vec::new();
    let mut trouble = Vec::new();
    for (i, s) in shared.seen.iter().enumerate() {
        let s = s.lock().unwrap();
        let mut per_backend: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for t in &s.ticks {
            per_backend.entry(&t.1).or_default().push(t.2);
        }
        for seqs in per_backend.values() {
            // seq counts this connection's ticks from 1: a jump is a lost tick.
            if seqs.first() != Some(&1) {
                bad_restart += 1;
            }
            for w in seqs.windows(2) {
                tick_gaps += w[1].saturating_sub(w[0] + 1);
            }
        }
        let gap = s
            .ticks
            .windows(2)
            .map(|w| w[1].0.duration_since(w[0].0))
            .max()
            .unwrap_or_default();
        max_gap = max_gap.max(gap);
        if moved.contains(&i) {
            gap_of_moved.push(gap);
        }
        sent += s.sent;
        let acked: std::collections::BTreeSet<u64> = s.acked.iter().copied().collect();
        lost_msgs += (1..=s.sent).filter(|n| !acked.contains(n)).count() as u64;
        trouble.extend(s.trouble.iter().map(|t| format!("client {i}: {t}")));
    }
    gap_of_moved.sort();
    println!(
        "messages lost: {tick_gaps} ticks (gaps in a connection's seq; {bad_restart} connections \
         not starting at seq 1), {lost_msgs} of {sent} numbered client messages never acked"
    );
    println!(
        "max gap between two ticks at one client: {} ms (ticks every {interval_ms} ms; median \
         over re-homed clients {} ms)",
        max_gap.as_millis(),
        gap_of_moved
            .get(gap_of_moved.len() / 2)
            .map_or(0, |d| d.as_millis())
    );
    for t in trouble.iter().take(10) {
        println!("  {t}");
    }
    if rehomed_ok != moved.len() || untouched != stayed.len() || !trouble.is_empty() {
        return Err(format!(
            "{} of {} sessions were not re-homed, {} of {} others were disturbed, {} client \
             troubles",
            moved.len() - rehomed_ok,
            moved.len(),
            stayed.len() - untouched,
            stayed.len(),
            trouble.len()
        ));
    }
    Ok(())
}
