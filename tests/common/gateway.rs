//! The real `wsgate` binary as a child process: config in a temp file, readiness from its
//! log lines, stderr collected in a background thread, killed on drop.

use super::notify::Notify;
use super::{within, RawConn, WAIT};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub fn wsgate_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_wsgate"))
}

/// `target/<profile>/examples/NAME` (cargo test builds the examples).
pub fn example_bin(name: &str) -> PathBuf {
    wsgate_bin().parent().unwrap().join("examples").join(name)
}

/// Log lines of a child process (stderr and stdout, in arrival order per stream).
#[derive(Default)]
pub struct Logs {
    lines: Mutex<Vec<String>>,
    open_streams: Mutex<usize>,
    pub notify: Notify,
}

impl Logs {
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
    pub fn len(&self) -> usize {
        self.lines.lock().unwrap().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn closed(&self) -> bool {
        *self.open_streams.lock().unwrap() == 0
    }
    pub fn dump(&self) -> String {
        self.lines().join("\n")
    }

    /// Collects the lines of `r` on a thread.
    pub fn collect(self: &Arc<Self>, r: impl Read + Send + 'static) {
        *self.open_streams.lock().unwrap() += 1;
        let logs = self.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(r);
            let mut line = Vec::new();
            loop {
                line.clear();
                match r.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let s = String::from_utf8_lossy(&line).trim_end().to_string();
                        logs.lines.lock().unwrap().push(s);
                        logs.notify.notify();
                    }
                }
            }
            *logs.open_streams.lock().unwrap() -= 1;
            logs.notify.notify();
        });
    }

    /// The first line at index ≥ `from` matching `pred`, waiting up to `d` for it.
    /// Panics (with all lines) on timeout or when the process's output ends first.
    pub async fn wait_line_from(
        &self,
        what: &str,
        from: usize,
        d: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> (usize, String) {
        let mut found = None;
        let mut ended = false;
        let r = async_std::future::timeout(
            d,
            self.notify
                .wait_until(what, d + Duration::from_secs(1), || {
                    let lines = self.lines.lock().unwrap();
                    if let Some((i, l)) = lines.iter().enumerate().skip(from).find(|(_, l)| pred(l))
                    {
                        found = Some((i, l.clone()));
                        return true;
                    }
                    ended = self.closed();
                    ended
                }),
        )
        .await;
        match (r, found) {
            (Ok(()), Some(f)) => f,
            (Ok(()), None) => panic!(
                "process output ended before a line for: {what}\n--- output ---\n{}",
                self.dump()
            ),
            (Err(_), _) => panic!(
                "timed out after {d:?} waiting for a log line: {what}\n--- output ---\n{}",
                self.dump()
            ),
        }
    }

    pub async fn wait_line(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.wait_line_from(what, 0, WAIT, pred).await.1
    }

    pub fn count(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| pred(l))
            .count()
    }

    /// Waits until at least `n` lines match.
    pub async fn wait_count(&self, what: &str, n: usize, pred: impl Fn(&str) -> bool) {
        self.notify
            .wait_until(what, WAIT, || self.count(&pred) >= n)
            .await
    }
}

/// The text after `marker` up to the next whitespace.
pub fn word_after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    let i = line.find(marker)? + marker.len();
    line[i..].split_whitespace().next()
}

/// `key=value` fields of a log line (e.g. an access line).
pub fn fields(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub struct Gateway {
    child: Child,
    pub logs: Arc<Logs>,
    /// Listener name → the address it bound.
    pub listeners: BTreeMap<String, SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub config_path: PathBuf,
    dir: tempfile::TempDir,
}

impl Gateway {
    /// Starts `wsgate --config <tmp>/config.json` with `RUST_LOG=info`.
    pub async fn start(config: Value) -> Gateway {
        Gateway::start_with_env(config, &[]).await
    }

    pub async fn start_with_env(config: Value, env: &[(&str, &str)]) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("config.json");
        std::fs::write(&config_path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
        let mut cmd = Command::new(wsgate_bin());
        cmd.arg("--config")
            .arg(&config_path)
            .current_dir(dir.path())
            .env("RUST_LOG", "info")
            .env_remove("RUST_LOG_STYLE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", wsgate_bin()));
        let logs = Arc::new(Logs::default());
        logs.collect(child.stderr.take().unwrap());
        logs.collect(child.stdout.take().unwrap());
        let mut gw = Gateway {
            child,
            logs,
            listeners: BTreeMap::new(),
            admin: None,
            config_path,
            dir,
        };
        let names: Vec<String> = config["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, l)| match l["name"].as_str() {
                Some(n) => n.to_string(),
                None => format!("listener-{i}"),
            })
            .collect();
        for name in names {
            let marker = format!("listener {name} listening on ");
            let line = gw
                .logs
                .wait_line(&format!("readiness of listener {name}"), |l| {
                    l.contains(&marker)
                })
                .await;
            let addr = word_after(&line, &marker).unwrap().trim_end_matches(',');
            let addr: SocketAddr = addr
                .parse()
                .unwrap_or_else(|_| panic!("bad address in {line:?}"));
            gw.listeners.insert(name, addr);
        }
        if config.get("admin").is_some_and(|a| !a.is_null()) {
            let marker = "admin listening on ";
            let line = gw
                .logs
                .wait_line("readiness of admin", |l| {
                    l.contains(marker) && !l.contains("listener ")
                })
                .await;
            let addr = word_after(&line, marker).unwrap().trim_end_matches(',');
            gw.admin = Some(
                addr.parse()
                    .unwrap_or_else(|_| panic!("bad address in {line:?}")),
            );
        }
        gw
    }

    /// The address of the only (or first) listener.
    pub fn addr(&self) -> SocketAddr {
        *self.listeners.values().next().unwrap()
    }

    pub fn listener(&self, name: &str) -> SocketAddr {
        self.listeners[name]
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn wait_log(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.logs.wait_line(what, pred).await
    }

    /// `n` access lines (one per finished session) have been logged; returns them all.
    pub async fn wait_access_lines(&self, n: usize) -> Vec<String> {
        self.logs
            .wait_count(&format!("{n} access lines"), n, is_access_line)
            .await;
        self.logs
            .lines()
            .into_iter()
            .filter(|l| is_access_line(l))
            .collect()
    }

    /// The process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Sends a signal (`TERM`, `INT`, `HUP`) to the gateway process (our own child, by pid).
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(st.success(), "kill -{sig} {}", self.child.id());
    }

    /// Waits (bounded) for the process to exit (its output streams close first) and
    /// returns its exit code.
    pub async fn wait_exit(&mut self, d: Duration) -> Option<i32> {
        let logs = self.logs.clone();
        logs.notify
            .wait_until("wsgate exits", d, || logs.closed())
            .await;
        let st = within("wsgate exit status", d, async {
            loop {
                if let Some(st) = self.child.try_wait().unwrap() {
                    return st;
                }
                async_std::task::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        st.code()
    }

    /// `GET /metrics` from the admin listener (body text).
    pub async fn metrics(&self) -> String {
        let admin = self.admin.expect("admin is not configured");
        let mut c = RawConn::open(admin).await;
        c.write(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            .await;
        let head = c.read_head().await;
        assert_eq!(head.status, 200, "GET /metrics status");
        String::from_utf8_lossy(&c.read_body(&head).await).into_owned()
    }

    /// Sum of all series of a metric (any labels); None if the metric is absent.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        metric_sum(&self.metrics().await, name, &[])
    }

    /// Polls a metric (the sum of its series) until it is `want`, for at most 10 s.
    pub async fn wait_metric(&self, name: &str, want: f64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let now = self.metric(name).await;
            if now == Some(want) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name} stayed {now:?}, not {want}"
            );
            async_std::task::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() || std::env::var_os("WSGATE_TEST_LOGS").is_some() {
            eprintln!(
                "--- wsgate output (pid {}) ---\n{}",
                self.child.id(),
                self.logs.dump()
            );
        }
    }
}

pub fn is_access_line(l: &str) -> bool {
    l.contains("access session=")
}

/// Sum of the values of the series of `name` whose labels include all of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (n, lbls) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        if !labels
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

/// A child process (example servers) killed on drop, with its output collected.
pub struct ChildGuard {
    pub child: Child,
    pub logs: Arc<Logs>,
}

impl ChildGuard {
    pub fn spawn(mut cmd: Command) -> ChildGuard {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let logs = Arc::new(Logs::default());
        logs.collect(child.stderr.take().unwrap());
        logs.collect(child.stdout.take().unwrap());
        ChildGuard { child, logs }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- child {} output ---\n{}",
                self.child.id(),
                self.logs.dump()
            );
        }
    }
}

/// Runs `wsgate ARGS` to completion (bounded) and returns (exit code, stdout, stderr).
pub fn run_wsgate(args: &[&str], dir: &Path) -> (i32, String, String) {
    let mut cmd = Command::new(wsgate_bin());
    cmd.args(args)
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(WAIT) {
        Ok(out) => {
            let out = out.unwrap();
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
        Err(_) => {
            // Best effort: the process is ours (we spawned it and know its pid).
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("wsgate {args:?} did not exit within {WAIT:?}");
        }
    }
}
