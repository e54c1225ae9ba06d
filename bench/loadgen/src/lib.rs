//! Shared pieces of the wsgate benchmark tools: client sockets bound to a chosen loopback
//! source address, WebSocket settings, verifiable payloads, /proc sampling and a tiny
//! argument parser.

use async_io::Async;
use async_tungstenite::tungstenite::protocol::WebSocketConfig;
use async_tungstenite::WebSocketStream;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

pub type Ws = WebSocketStream<Async<TcpStream>>;

/// tungstenite settings for both tools: buffers big enough that a 64 KiB message is read in
/// a few syscalls, small enough that 9,000 idle sessions stay cheap.
pub fn ws_config() -> WebSocketConfig {
    let mut c = WebSocketConfig::default();
    c.read_buffer_size = 64 * 1024;
    c.write_buffer_size = 64 * 1024;
    c.max_write_buffer_size = 8 << 20;
    c
}

/// Non-blocking connect from `src` (port chosen by the kernel) to `dst`, Nagle off.
pub async fn connect_tcp(src: Option<IpAddr>, dst: SocketAddr) -> io::Result<Async<TcpStream>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_nonblocking(true)?;
    sock.set_tcp_nodelay(true)?;
    if let Some(ip) = src {
        // SO_REUSEADDR lets the kernel hand out ports whose only other users are TIME_WAIT.
        sock.set_reuse_address(true)?;
        sock.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match sock.connect(&dst.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = Async::new_nonblocking(TcpStream::from(sock))?;
    stream.writable().await?;
    if let Some(e) = stream.get_ref().take_error()? {
        return Err(e);
    }
    Ok(stream)
}

/// TCP connect + WebSocket upgrade on `ws://dst/`, both within `timeout`.
pub async fn ws_connect(src: Option<IpAddr>, dst: SocketAddr, timeout: Duration) -> io::Result<Ws> {
    let fut = async {
        let tcp = connect_tcp(src, dst).await?;
        let url = format!("ws://{dst}/");
        let (ws, _) = async_tungstenite::client_async_with_config(url, tcp, Some(ws_config()))
            .await
            .map_err(|e| io::Error::other(format!("handshake: {e}")))?;
        Ok(ws)
    };
    match async_std::future::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "connect+upgrade timed out",
        )),
    }
}

/// Source address number `i` of `n`: 127.0.0.2, 127.0.0.3, ... (127.0.0.1 is left to the
/// proxies' own backend connections).
pub fn source_ip(i: usize, n: usize) -> IpAddr {
    let k = 2 + (i % n.max(1)) as u8;
    IpAddr::from([127, 0, 0, k])
}

/// Verifiable payloads: 8 bytes of sequence number, then a per-connection pseudo-random
/// pattern at an offset that moves with the sequence number. An echo is checked byte for
/// byte against the message that was sent.
pub struct Payloads {
    pattern: Vec<u8>,
    size: usize,
}

impl Payloads {
    pub fn new(conn: u64, size: usize) -> Payloads {
        assert!(size >= 8, "message size must be at least 8 bytes");
        let mut x = conn.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let pattern = (0..size + 256)
            .map(|_| {
                // xorshift64
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        Payloads { pattern, size }
    }

    fn tail(&self, seq: u64) -> &[u8] {
        let off = (seq % 251) as usize;
        &self.pattern[off..off + self.size - 8]
    }

    pub fn make(&self, seq: u64) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.size);
        v.extend_from_slice(&seq.to_le_bytes());
        v.extend_from_slice(self.tail(seq));
        v
    }

    /// The sequence number an echo carries, if it is byte-for-byte a message of this stream.
    pub fn check(&self, data: &[u8]) -> Option<u64> {
        if data.len() != self.size {
            return None;
        }
        let seq = u64::from_le_bytes(data[..8].try_into().ok()?);
        (data[8..] == *self.tail(seq)).then_some(seq)
    }
}

/// Process-tree sampling from /proc: a proxy's CPU time and resident memory summed over the
/// root process and all its descendants (nginx master + worker, and so on).
pub mod procs {
    use std::fs;

    fn parse_stat(pid: u32) -> Option<(u32, u64)> {
        let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may contain spaces: fields start after the last ')'.
        let rest = &s[s.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // rest[0] is field 3 (state): ppid = field 4, utime = 14, stime = 15.
        let ppid = f.get(1)?.parse().ok()?;
        let utime: u64 = f.get(11)?.parse().ok()?;
        let stime: u64 = f.get(12)?.parse().ok()?;
        Some((ppid, utime + stime))
    }

    /// `root` and every live descendant.
    pub fn tree(root: u32) -> Vec<u32> {
        let mut parent = Vec::new();
        if let Ok(rd) = fs::read_dir("/proc") {
            for e in rd.flatten() {
                if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
                    if let Some((ppid, _)) = parse_stat(pid) {
                        parent.push((pid, ppid));
                    }
                }
            }
        }
        let mut out = vec![root];
        let mut i = 0;
        while i < out.len() {
            let p = out[i];
            out.extend(parent.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
            i += 1;
        }
        out
    }

    fn clk_tck() -> f64 {
        // SAFETY: sysconf has no preconditions.
        let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if t > 0 {
            t as f64
        } else {
            100.0
        }
    }

    /// utime + stime in seconds, summed over the tree of each root.
    pub fn cpu_seconds(roots: &[u32]) -> f64 {
        let ticks: u64 = roots
            .iter()
            .flat_map(|r| tree(*r))
            .filter_map(|p| parse_stat(p).map(|(_, t)| t))
            .sum();
        ticks as f64 / clk_tck()
    }

    /// VmRSS in KiB, summed over the tree of each root.
    pub fn rss_kib(roots: &[u32]) -> u64 {
        roots
            .iter()
            .flat_map(|r| tree(*r))
            .filter_map(|p| {
                let s = fs::read_to_string(format!("/proc/{p}/status")).ok()?;
                let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .sum()
    }

    /// CPU time the whole machine spent busy (all cores, everything but idle and iowait),
    /// in seconds, from /proc/stat.
    pub fn machine_busy_seconds() -> f64 {
        let Ok(s) = fs::read_to_string("/proc/stat") else {
            return f64::NAN;
        };
        let Some(line) = s.lines().find(|l| l.starts_with("cpu ")) else {
            return f64::NAN;
        };
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal ...
        let busy: u64 = f
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
            .map(|(_, v)| v)
            .sum();
        busy as f64 / clk_tck()
    }

    /// The 1-minute load average.
    pub fn loadavg() -> f64 {
        fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(f64::NAN)
    }

    /// Number of processes in the trees (for the record).
    pub fn count(roots: &[u32]) -> usize {
        roots.iter().map(|r| tree(*r).len()).sum()
    }
}

/// `--key value` and `--flag` arguments after a subcommand.
pub struct Args {
    map: HashMap<String, String>,
}

impl Args {
    pub fn parse(args: impl Iterator<Item = String>) -> Args {
        let args: Vec<String> = args.collect();
        let mut map = HashMap::new();
        let mut i = 0;
        while i < args.len() {
            let k = args[i].trim_start_matches("--").to_string();
            if i + 1 < args.len() && !args[i + 1].starts_with("--") {
                map.insert(k, args[i + 1].clone());
                i += 2;
            } else {
                map.insert(k, String::new());
                i += 1;
            }
        }
        Args { map }
    }

    pub fn str(&self, k: &str, default: &str) -> String {
        self.map
            .get(k)
            .cloned()
            .unwrap_or_else(|| default.to_string())
    }

    pub fn opt(&self, k: &str) -> Option<String> {
        self.map.get(k).cloned()
    }

    pub fn num<T: std::str::FromStr>(&self, k: &str, default: T) -> T {
        match self.map.get(k) {
            Some(v) => v
                .parse()
                .unwrap_or_else(|_| panic!("--{k}: cannot parse {v:?}")),
            None => default,
        }
    }

    pub fn addr(&self, k: &str) -> SocketAddr {
        let v = self
            .map
            .get(k)
            .unwrap_or_else(|| panic!("--{k} ADDR is required"));
        v.parse()
            .unwrap_or_else(|_| panic!("--{k}: bad address {v:?}"))
    }

    /// Comma-separated pids (empty = none).
    pub fn pids(&self, k: &str) -> Vec<u32> {
        self.str(k, "")
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap_or_else(|_| panic!("--{k}: bad pid {s:?}")))
            .collect()
    }
}
