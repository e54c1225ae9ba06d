//! wsgate load generator. Every subcommand prints one JSON object (a run record) on stdout;
//! `bench/compare.sh` collects them and `loadgen report` turns them into the table.
//!
//! ```text
//! loadgen closed    --addr A --conns 50 --size 64 --secs 10 [--msgs N] [--pid P] [--srcs 8]
//! loadgen open      --addr A --conns 50 --rate 5000 --size 64 --secs 10
//! loadgen idle      --addr A --sessions 9000 --procs 6 --hold 10 [--pid P]
//! loadgen handshake --addr A --conns 50 --secs 20 [--pid P]
//! loadgen wait-port --addr A [--timeout-ms 10000]
//! loadgen wait-quiet [--max-busy 0.5] [--timeout-ms 10000]
//! loadgen report    RESULTS.jsonl [--json OUT.json] [--note TEXT]
//! ```
//! Common: `--target NAME --rep N` are copied into the record; `--pid` is the proxy's root
//! process (its CPU time and RSS are summed over it and all its descendants).

mod report;

use async_tungstenite::tungstenite::Message;
use futures::stream::{self, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wsgate_loadgen::{procs, source_ip, ws_connect, Args, Payloads, Ws};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an echo may be outstanding past the end of a run before it counts as lost.
const GRACE: Duration = Duration::from_secs(3);

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("histogram bounds")
}

fn us(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return f64::NAN;
    }
    h.value_at_quantile(q) as f64 / 1000.0
}

fn latency_json(h: &Histogram<u64>) -> Value {
    let max = if h.is_empty() {
        f64::NAN
    } else {
        h.max() as f64 / 1000.0
    };
    json!({
        "p50_us": us(h, 0.50), "p90_us": us(h, 0.90), "p99_us": us(h, 0.99),
        "p999_us": us(h, 0.999), "max_us": max, "samples": h.len(),
    })
}

/// Error and loss counts, printed with every record.
#[derive(Default, Clone, Copy)]
struct Faults {
    connect_fail: u64,
    errors: u64,
    lost: u64,
    mismatch: u64,
}

impl Faults {
    fn add(&mut self, o: Faults) {
        self.connect_fail += o.connect_fail;
        self.errors += o.errors;
        self.lost += o.lost;
        self.mismatch += o.mismatch;
    }
    fn json(&self) -> Value {
        json!({"connect_fail": self.connect_fail, "errors": self.errors,
               "lost": self.lost, "mismatch": self.mismatch})
    }
}

struct Common {
    addr: std::net::SocketAddr,
    target: String,
    rep: u64,
    pids: Vec<u32>,
    /// The echo backend's pid, to tell the bench's own CPU use from other processes'.
    backend: Vec<u32>,
    srcs: usize,
}

/// CPU counters at one instant: the proxy's, the bench's own (load generator, its children,
/// backend, proxy) and the whole machine's.
struct Sample {
    proxy: f64,
    own: f64,
    machine: f64,
}

impl Sample {
    /// Proxy CPU-seconds between two samples (None without a proxy), and the CPU-seconds
    /// other processes on the machine used meanwhile.
    fn window(&self, end: &Sample, has_proxy: bool) -> (Option<f64>, f64) {
        let proxy = end.proxy - self.proxy;
        let foreign = (end.machine - self.machine) - (end.own - self.own);
        (has_proxy.then_some(proxy), foreign.max(0.0))
    }
}

impl Common {
    fn new(a: &Args) -> Common {
        Common {
            addr: a.addr("addr"),
            target: a.str("target", "?"),
            rep: a.num("rep", 0),
            pids: a.pids("pid"),
            backend: a.pids("backend-pid"),
            srcs: a.num("srcs", 8),
        }
    }
    fn sample(&self) -> Sample {
        let proxy = procs::cpu_seconds(&self.pids);
        let me = [std::process::id()];
        let own = proxy + procs::cpu_seconds(&self.backend) + procs::cpu_seconds(&me);
        Sample {
            proxy,
            own,
            machine: procs::machine_busy_seconds(),
        }
    }
    fn has_proxy(&self) -> bool {
        !self.pids.is_empty()
    }
    fn record(&self, test: &str, mut v: Value) -> Value {
        v["test"] = json!(test);
        v["target"] = json!(self.target);
        v["rep"] = json!(self.rep);
        v["proxy_processes"] = json!(procs::count(&self.pids));
        v["loadavg_end"] = json!(procs::loadavg());
        v
    }
}

/// Connects `n` sessions concurrently (at most `conc` handshakes at a time).
async fn connect_many(c: &Common, n: usize, conc: usize, first: usize) -> Vec<Option<Ws>> {
    let (addr, srcs) = (c.addr, c.srcs);
    stream::iter(0..n)
        .map(|i| async move {
            match ws_connect(Some(source_ip(first + i, srcs)), addr, CONNECT_TIMEOUT).await {
                Ok(ws) => Some(ws),
                Err(e) => {
                    if i < 3 {
                        eprintln!("loadgen: connect {addr}: {e}");
                    }
                    None
                }
            }
        })
        .buffered(conc)
        .collect()
        .await
}

/// Sends close and waits (bounded) for the peer's close and the end of the stream.
async fn close_ws(mut ws: Ws) {
    let _ = async_std::future::timeout(Duration::from_secs(2), async {
        if ws.close(None).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
    // Let the server side close TCP first (so TIME_WAIT lands there, not on our ports).
    let mut tcp = ws.into_inner();
    let _ = async_std::future::timeout(Duration::from_secs(1), async {
        let mut buf = [0u8; 512];
        loop {
            match futures::AsyncReadExt::read(&mut tcp, &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

async fn close_all(wss: Vec<Ws>) {
    stream::iter(wss).for_each_concurrent(500, close_ws).await;
}

enum Echo {
    Ok,
    Mismatch,
    Failed,
}

/// Waits for the next data message and checks it is the echo of `seq`.
async fn recv_echo(ws: &mut Ws, p: &Payloads, seq: u64) -> Echo {
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => {
                return if p.check(&b) == Some(seq) {
                    Echo::Ok
                } else {
                    Echo::Mismatch
                }
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(_)) => return Echo::Mismatch,
            Some(Err(_)) | None => return Echo::Failed,
        }
    }
}

// ---------------------------------------------------------------- closed loop

async fn closed(a: &Args) -> Value {
    let c = Common::new(a);
    let conns: usize = a.num("conns", 50);
    let size: usize = a.num("size", 64);
    let secs: f64 = a.num("secs", 10.0);
    // A fixed amount of work (for profiles): at most this many messages per connection.
    let max_msgs: u64 = a.num("msgs", u64::MAX);
    let mut faults = Faults::default();
    let wss = connect_many(&c, conns, conns, 0).await;
    faults.connect_fail = wss.iter().filter(|w| w.is_none()).count() as u64;
    let cpu0 = c.sample();
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = wss
        .into_iter()
        .enumerate()
        .filter_map(|(i, w)| w.map(|w| (i, w)))
        .map(|(i, mut ws)| {
            async_std::task::spawn(async move {
                let p = Payloads::new(i as u64, size);
                let mut h = hist();
                let mut f = Faults::default();
                let mut ok = 0u64;
                // One timer for the whole run (not one per message): an echo still missing
                // GRACE after the deadline is lost.
                let body = async {
                    let mut seq = 0u64;
                    while seq < max_msgs && Instant::now() < deadline {
                        let s = Instant::now();
                        if ws.send(Message::Binary(p.make(seq).into())).await.is_err() {
                            f.errors += 1;
                            return false;
                        }
                        match recv_echo(&mut ws, &p, seq).await {
                            Echo::Ok => {
                                h.record(s.elapsed().as_nanos() as u64).ok();
                                ok += 1;
                            }
                            Echo::Mismatch => {
                                f.mismatch += 1;
                                return false;
                            }
                            Echo::Failed => {
                                f.errors += 1;
                                return false;
                            }
                        }
                        seq += 1;
                    }
                    true
                };
                let left = (deadline + GRACE).saturating_duration_since(Instant::now());
                let alive = match async_std::future::timeout(left, body).await {
                    Ok(alive) => alive,
                    Err(_) => {
                        f.lost += 1;
                        false
                    }
                };
                (h, f, ok, alive.then_some(ws))
            })
        })
        .collect();
    let mut h = hist();
    let mut ok = 0;
    let mut live = Vec::new();
    for t in tasks {
        let (th, tf, tok, ws) = t.await;
        h.add(th).ok();
        faults.add(tf);
        ok += tok;
        live.extend(ws);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let (cpu, foreign) = cpu0.window(&c.sample(), c.has_proxy());
    close_all(live).await;
    c.record(
        "closed",
        json!({
            "size": size, "conns": conns, "secs": elapsed, "msgs": ok,
            "rate": ok as f64 / elapsed,
            "latency": latency_json(&h),
            "proxy_cpu_s": cpu, "foreign_cpu_s": foreign,
            "foreign_cores": foreign / elapsed,
            "msgs_per_cpu_s": cpu.map(|c| if c > 0.0 { ok as f64 / c } else { f64::NAN }),
            "faults": faults.json(),
        }),
    )
}

// ---------------------------------------------------------------- open loop

async fn open(a: &Args) -> Value {
    let c = Common::new(a);
    let conns: usize = a.num("conns", 50);
    let size: usize = a.num("size", 64);
    let secs: f64 = a.num("secs", 10.0);
    let rate: f64 = a.num("rate", 5000.0);
    let mut faults = Faults::default();
    let wss = connect_many(&c, conns, conns, 0).await;
    faults.connect_fail = wss.iter().filter(|w| w.is_none()).count() as u64;
    // Each connection sends every `interval`, phase-shifted so the total is evenly spread.
    let interval = Duration::from_secs_f64(conns as f64 / rate);
    let dur = Duration::from_secs_f64(secs);
    let start = Instant::now() + Duration::from_millis(20);
    let cpu0 = c.sample();
    let tasks: Vec<_> = wss
        .into_iter()
        .enumerate()
        .filter_map(|(i, w)| w.map(|w| (i, w)))
        .map(|(i, ws)| {
            let offset = interval.mul_f64(i as f64 / conns as f64);
            // Sends at start + offset + k * interval for every such time before start + dur.
            let expected = ((dur.as_secs_f64() - offset.as_secs_f64()) / interval.as_secs_f64())
                .ceil()
                .max(0.0) as u64;
            async_std::task::spawn(async move {
                let p = Payloads::new(i as u64, size);
                let (mut tx, mut rx) = ws.split();
                let (qtx, mut qrx) = futures::channel::mpsc::unbounded::<(u64, Instant)>();
                let p = &p;
                let sender = async move {
                    let mut failed = false;
                    for k in 0..expected {
                        let at = start + offset + interval.mul_f64(k as f64);
                        async_io::Timer::at(at).await;
                        let _ = qtx.unbounded_send((k, at));
                        if tx.send(Message::Binary(p.make(k).into())).await.is_err() {
                            failed = true;
                            break;
                        }
                    }
                    (tx, failed)
                };
                let receiver = async {
                    let mut h = hist();
                    let mut f = Faults::default();
                    let mut got = 0u64;
                    let body = async {
                        while got < expected {
                            match rx.next().await {
                                Some(Ok(Message::Binary(b))) => {
                                    let now = Instant::now();
                                    let Ok((k, at)) = qrx.try_recv() else {
                                        f.mismatch += 1;
                                        return false;
                                    };
                                    got += 1;
                                    if p.check(&b) != Some(k) {
                                        f.mismatch += 1;
                                        return false;
                                    }
                                    h.record(now.duration_since(at).as_nanos() as u64).ok();
                                }
                                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                                Some(Ok(_)) => {
                                    f.mismatch += 1;
                                    return false;
                                }
                                Some(Err(_)) | None => {
                                    f.errors += 1;
                                    return false;
                                }
                            }
                        }
                        true
                    };
                    let left = (start + dur + GRACE).saturating_duration_since(Instant::now());
                    let clean = matches!(async_std::future::timeout(left, body).await, Ok(true));
                    f.lost += expected - got;
                    (h, f, got, rx, clean)
                };
                let ((tx, send_failed), (h, mut f, got, rx, clean)) =
                    futures::join!(sender, receiver);
                if send_failed {
                    f.errors += 1;
                }
                let ws = Ws::reunite(tx, rx).ok().filter(|_| clean && !send_failed);
                (h, f, got, expected, ws)
            })
        })
        .collect();
    let mut h = hist();
    let (mut got, mut expected) = (0, 0);
    let mut live = Vec::new();
    for t in tasks {
        let (th, tf, tg, te, ws) = t.await;
        h.add(th).ok();
        faults.add(tf);
        got += tg;
        expected += te;
        live.extend(ws);
    }
    let (cpu, foreign) = cpu0.window(&c.sample(), c.has_proxy());
    close_all(live).await;
    c.record(
        "open",
        json!({
            "size": size, "conns": conns, "secs": secs, "rate_target": rate,
            "sent": expected, "received": got,
            "latency": latency_json(&h), "proxy_cpu_s": cpu, "foreign_cpu_s": foreign,
            "foreign_cores": foreign / secs,
            "faults": faults.json(),
        }),
    )
}

// ---------------------------------------------------------------- idle sessions

/// One echo of `seq` on every session; returns (ok, failed-or-mismatched).
async fn echo_all(wss: &mut [Ws], first: usize, seq: u64) -> (u64, u64) {
    let ok = AtomicU64::new(0);
    let bad = AtomicU64::new(0);
    stream::iter(wss.iter_mut().enumerate())
        .for_each_concurrent(500, |(i, ws)| {
            let (ok, bad) = (&ok, &bad);
            async move {
                let p = Payloads::new((first + i) as u64, 64);
                let r = async_std::future::timeout(GRACE, async {
                    if ws.send(Message::Binary(p.make(seq).into())).await.is_err() {
                        return Echo::Failed;
                    }
                    recv_echo(ws, &p, seq).await
                })
                .await;
                match r {
                    Ok(Echo::Ok) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => bad.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
        .await;
    (ok.into_inner(), bad.into_inner())
}

/// A child of `idle`: holds `--sessions` sessions from one source address, driven by lines
/// on stdin (`check`, `close`), answering with one JSON line each.
async fn idle_child(a: &Args) {
    let c = Common::new(a);
    let n: usize = a.num("sessions", 1000);
    let first: usize = a.num("first", 0);
    let src: std::net::IpAddr = a.str("src", "127.0.0.2").parse().expect("--src");
    let addr = c.addr;
    let t0 = Instant::now();
    let wss: Vec<Option<Ws>> = stream::iter(0..n)
        .map(|_| async move {
            // Generous: thousands of handshakes queue up behind a one-thread proxy.
            match ws_connect(Some(src), addr, 2 * CONNECT_TIMEOUT).await {
                Ok(ws) => Some(ws),
                Err(e) => {
                    eprintln!("loadgen idle-child {src}: {e}");
                    None
                }
            }
        })
        .buffered(200)
        .collect()
        .await;
    let connect_fail = wss.iter().filter(|w| w.is_none()).count();
    let mut wss: Vec<Ws> = wss.into_iter().flatten().collect();
    let (ok, bad) = echo_all(&mut wss, first, 0).await;
    let setup = t0.elapsed().as_secs_f64();
    let out = |v: Value| {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{v}");
        let _ = o.flush();
    };
    out(
        json!({"established": wss.len(), "connect_fail": connect_fail,
               "echo_ok": ok, "echo_fail": bad, "setup_s": setup}),
    );
    let stdin = async_std::io::stdin();
    let mut line = String::new();
    loop {
        line.clear();
        let n = stdin.read_line(&mut line).await.unwrap_or(0);
        match line.trim() {
            "check" => {
                let (ok, bad) = echo_all(&mut wss, first, 1).await;
                out(json!({"echo_ok": ok, "echo_fail": bad}));
            }
            _ => {
                let t = Instant::now();
                close_all(std::mem::take(&mut wss)).await;
                out(json!({"closed_s": t.elapsed().as_secs_f64()}));
                let _ = n;
                return;
            }
        }
    }
}

fn idle(a: &Args) -> Value {
    let c = Common::new(a);
    let sessions: usize = a.num("sessions", 9000);
    let nprocs: usize = a.num("procs", 6).max(1);
    let hold: f64 = a.num("hold", 10.0);
    let rss0 = procs::rss_kib(&c.pids);
    let t0 = Instant::now();
    let exe = std::env::current_exe().expect("current_exe");
    let mut kids = Vec::new();
    let mut first = 0;
    for j in 0..nprocs {
        let n = sessions / nprocs + usize::from(j < sessions % nprocs);
        let child = Command::new(&exe)
            .args(["idle-child", "--addr", &c.addr.to_string()])
            .args(["--sessions", &n.to_string(), "--first", &first.to_string()])
            .args(["--src", &source_ip(j, nprocs.max(c.srcs)).to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn idle-child");
        first += n;
        kids.push(child);
    }
    let mut readers: Vec<_> = kids
        .iter_mut()
        .map(|k| BufReader::new(k.stdout.take().expect("stdout")))
        .collect();
    let read = |r: &mut BufReader<std::process::ChildStdout>| -> Value {
        let mut l = String::new();
        let _ = r.read_line(&mut l);
        serde_json::from_str(&l).unwrap_or(Value::Null)
    };
    let sum = |vs: &[Value], k: &str| vs.iter().map(|v| v[k].as_f64().unwrap_or(0.0)).sum::<f64>();
    let ready: Vec<Value> = readers.iter_mut().map(read).collect();
    let setup_s = t0.elapsed().as_secs_f64();
    let established = sum(&ready, "established");
    let rss_ready = procs::rss_kib(&c.pids);
    let cpu_ready = c.sample();
    std::thread::sleep(Duration::from_secs_f64(hold));
    let rss_held = procs::rss_kib(&c.pids);
    let (idle_cpu, foreign) = cpu_ready.window(&c.sample(), c.has_proxy());
    for k in kids.iter_mut() {
        let _ = writeln!(k.stdin.as_mut().expect("stdin"), "check");
    }
    let checked: Vec<Value> = readers.iter_mut().map(read).collect();
    for k in kids.iter_mut() {
        let _ = writeln!(k.stdin.as_mut().expect("stdin"), "close");
    }
    let closed: Vec<Value> = readers.iter_mut().map(read).collect();
    for k in kids.iter_mut() {
        let _ = k.wait();
    }
    let per = if established > 0.0 {
        (rss_held as f64 - rss0 as f64) * 1024.0 / established
    } else {
        f64::NAN
    };
    let faults = Faults {
        connect_fail: sum(&ready, "connect_fail") as u64,
        errors: (sum(&ready, "echo_fail") + sum(&checked, "echo_fail")) as u64,
        lost: 0,
        mismatch: 0,
    };
    c.record(
        "idle",
        json!({
            "sessions": sessions, "procs": nprocs, "hold_s": hold,
            "established": established, "setup_s": setup_s,
            "echo_ok_setup": sum(&ready, "echo_ok"), "echo_ok_after_hold": sum(&checked, "echo_ok"),
            "rss_before_kib": rss0, "rss_ready_kib": rss_ready, "rss_held_kib": rss_held,
            "rss_bytes_per_session": per,
            "idle_cpu_s": idle_cpu, "foreign_cpu_s": foreign, "foreign_cores": foreign / hold,
            "close_s": closed.iter().map(|v| v["closed_s"].as_f64().unwrap_or(0.0)).fold(0.0, f64::max),
            "faults": faults.json(),
        }),
    )
}

// ---------------------------------------------------------------- handshake rate

async fn handshake(a: &Args) -> Value {
    let c = Arc::new(Common::new(a));
    let conns: usize = a.num("conns", 50);
    let secs: f64 = a.num("secs", 20.0);
    let counter = Arc::new(AtomicU64::new(0));
    let cpu0 = c.sample();
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let (c, counter) = (c.clone(), counter.clone());
            async_std::task::spawn(async move {
                let mut h = hist();
                let mut f = Faults::default();
                let mut ok = 0u64;
                while Instant::now() < deadline {
                    let i = counter.fetch_add(1, Ordering::Relaxed);
                    let s = Instant::now();
                    let mut ws = match ws_connect(
                        Some(source_ip(i as usize, c.srcs)),
                        c.addr,
                        CONNECT_TIMEOUT,
                    )
                    .await
                    {
                        Ok(ws) => ws,
                        Err(e) => {
                            if f.connect_fail < 2 {
                                eprintln!("loadgen: handshake connect: {e}");
                            }
                            f.connect_fail += 1;
                            continue;
                        }
                    };
                    let p = Payloads::new(i, 64);
                    let r = async_std::future::timeout(GRACE, async {
                        if ws.send(Message::Binary(p.make(i).into())).await.is_err() {
                            return Echo::Failed;
                        }
                        recv_echo(&mut ws, &p, i).await
                    })
                    .await;
                    match r {
                        Ok(Echo::Ok) => {
                            close_ws(ws).await;
                            ok += 1;
                            h.record(s.elapsed().as_nanos() as u64).ok();
                        }
                        Ok(Echo::Mismatch) => f.mismatch += 1,
                        Ok(Echo::Failed) => f.errors += 1,
                        Err(_) => f.lost += 1,
                    }
                }
                (h, f, ok)
            })
        })
        .collect();
    let mut h = hist();
    let mut faults = Faults::default();
    let mut ok = 0;
    for t in tasks {
        let (th, tf, tok) = t.await;
        h.add(th).ok();
        faults.add(tf);
        ok += tok;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let (cpu, foreign) = cpu0.window(&c.sample(), c.has_proxy());
    c.record(
        "handshake",
        json!({
            "conns": conns, "secs": elapsed, "sessions": ok, "rate": ok as f64 / elapsed,
            "latency": latency_json(&h), "proxy_cpu_s": cpu, "foreign_cpu_s": foreign,
            "foreign_cores": foreign / elapsed,
            "sessions_per_cpu_s": cpu.map(|c| if c > 0.0 { ok as f64 / c } else { f64::NAN }),
            "faults": faults.json(),
        }),
    )
}

// ---------------------------------------------------------------- readiness

fn wait_port(a: &Args) -> bool {
    let addr = a.addr("addr");
    let deadline = Instant::now() + Duration::from_millis(a.num("timeout-ms", 10_000));
    while Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// Waits until the machine is quiet: less than `--max-busy` cores busy over a 250 ms window
/// (other users' builds and tests share this machine). Gives up after `--timeout-ms`; prints
/// the seconds waited and the last busy figure.
fn wait_quiet(a: &Args) {
    let max: f64 = a.num("max-busy", 0.5);
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_millis(a.num("timeout-ms", 10_000));
    let window = Duration::from_millis(250);
    let mut busy;
    loop {
        let b0 = procs::machine_busy_seconds();
        std::thread::sleep(window);
        busy = (procs::machine_busy_seconds() - b0) / window.as_secs_f64();
        if busy < max || Instant::now() >= deadline {
            break;
        }
    }
    println!("{:.1} {:.2}", t0.elapsed().as_secs_f64(), busy);
}

fn main() {
    let mut argv = std::env::args().skip(1);
    let cmd = argv.next().unwrap_or_default();
    if cmd == "report" {
        std::process::exit(report::main(argv.collect()));
    }
    let a = Args::parse(argv);
    let rec = match cmd.as_str() {
        "closed" => async_std::task::block_on(closed(&a)),
        "open" => async_std::task::block_on(open(&a)),
        "handshake" => async_std::task::block_on(handshake(&a)),
        "idle" => idle(&a),
        "idle-child" => {
            async_std::task::block_on(idle_child(&a));
            return;
        }
        "wait-quiet" => {
            wait_quiet(&a);
            return;
        }
        "wait-port" => std::process::exit(if wait_port(&a) { 0 } else { 1 }),
        _ => {
            eprintln!(
                "usage: loadgen closed|open|idle|handshake|wait-port|report ... (see src/main.rs)"
            );
            std::process::exit(2);
        }
    };
    println!("{rec}");
}
