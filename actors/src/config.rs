//! `config.json`: the serde types with SPEC §2's defaults, loading with field-path errors,
//! and the semantic checks serde cannot express. Pure code: no I/O but [`Config::load`].

use serde::{de, Deserialize, Deserializer, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A config problem, always naming the field path (`pools.chat.backends[1].address`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "config error: {}", self.message)
        } else {
            write!(f, "config error: {}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listeners: Vec<ListenerConfig>,
    pub pools: BTreeMap<String, PoolConfig>,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub headers: HeadersConfig,
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    #[serde(default)]
    pub relay: RelayMode,
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// The folder relative paths in the file are resolved against (not part of the JSON).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(deserialize_with = "socket_addr")]
    pub bind: SocketAddr,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub proxy_protocol: bool,
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub path: String,
    pub pool: String,
    #[serde(default)]
    pub host: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastConn,
    IpHash,
    RandomTwo,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnBackendLoss {
    #[default]
    Close,
    Reconnect,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RelayMode {
    #[default]
    Message,
    Tunnel,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    #[serde(default)]
    pub balance: Balance,
    pub backends: Vec<BackendConfig>,
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    #[serde(default)]
    pub passive: PassiveConfig,
    #[serde(default = "default_connect_attempts")]
    pub connect_attempts: u32,
    #[serde(default)]
    pub on_backend_loss: OnBackendLoss,
    #[serde(default)]
    pub replay_first_messages: u32,
    #[serde(default)]
    pub http: bool,
    /// Overrides the top-level `relay` for this pool.
    #[serde(default)]
    pub relay: Option<RelayMode>,
}

fn default_connect_attempts() -> u32 {
    3
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    #[serde(deserialize_with = "socket_addr")]
    pub address: SocketAddr,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Dial the backend with `wss://`.
    #[serde(default)]
    pub tls: bool,
    /// PEM file of the CA that signs the backend's certificate (with `tls`).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// The name to verify the backend's certificate against (with `tls`; default: its IP).
    #[serde(default)]
    pub server_name: Option<String>,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum HealthKind {
    #[default]
    Tcp,
    Http,
    Websocket,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    pub kind: HealthKind,
    pub path: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub healthy_after: u32,
    pub unhealthy_after: u32,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            kind: HealthKind::Tcp,
            path: "/".into(),
            interval_ms: 2000,
            timeout_ms: 1000,
            healthy_after: 2,
            unhealthy_after: 2,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PassiveConfig {
    /// Failures within `fail_timeout_ms` that eject a backend; 0 turns passive checks off.
    pub max_fails: u32,
    pub fail_timeout_ms: u64,
}

impl Default for PassiveConfig {
    fn default() -> Self {
        PassiveConfig {
            max_fails: 1,
            fail_timeout_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    pub handshake_ms: u64,
    pub connect_ms: u64,
    pub idle_ms: u64,
    pub ping_interval_ms: u64,
    pub drain_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake_ms: 5000,
            connect_ms: 2000,
            idle_ms: 300_000,
            ping_interval_ms: 30_000,
            drain_ms: 10_000,
        }
    }
}

impl Timeouts {
    pub fn handshake(&self) -> Duration {
        Duration::from_millis(self.handshake_ms)
    }
    pub fn connect(&self) -> Duration {
        Duration::from_millis(self.connect_ms)
    }
    pub fn idle(&self) -> Duration {
        Duration::from_millis(self.idle_ms)
    }
    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.ping_interval_ms)
    }
    pub fn drain(&self) -> Duration {
        Duration::from_millis(self.drain_ms)
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_sessions: u64,
    /// 0 = no per-IP limit.
    pub max_sessions_per_ip: u64,
    pub max_message_bytes: usize,
    pub max_frame_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: 100_000,
            max_sessions_per_ip: 0,
            max_message_bytes: 16 << 20,
            max_frame_bytes: 16 << 20,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HeadersConfig {
    pub forwarded: bool,
    pub set: BTreeMap<String, String>,
}

impl Default for HeadersConfig {
    fn default() -> Self {
        HeadersConfig {
            forwarded: true,
            set: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(deserialize_with = "socket_addr")]
    pub bind: SocketAddr,
}

fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    s.parse()
        .map_err(|_| de::Error::custom(format!("invalid socket address {s:?}")))
}

impl Config {
    /// Parses JSON text, naming the field path of any error, then validates it.
    pub fn from_json(text: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let mut config: Config = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            // A syntax error has no meaningful field path ("listeners[0].?").
            let path = if path == "." || inner.is_syntax() || inner.is_eof() {
                String::new()
            } else {
                path
            };
            ConfigError::new(path, inner.to_string())
        })?;
        de.end().map_err(|e| ConfigError::new("", e.to_string()))?;
        config.base_dir = base_dir.to_path_buf();
        config.validate()?;
        Ok(config)
    }

    /// Reads and validates a config file; relative paths in it resolve against its folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new("", format!("cannot read {}: {e}", path.display())))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let config = Config::from_json(&text, &base)?;
        config.check_files()?;
        Ok(config)
    }

    /// Loads every certificate, key and CA file the config names (so `--check` reports them).
    pub fn check_files(&self) -> Result<(), ConfigError> {
        crate::shared::Shared::new(std::sync::Arc::new(self.clone()), Default::default())
            .map(|_| ())
    }

    /// A path from the file, resolved against the config file's folder.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// The checks serde cannot make. The first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listeners.is_empty() {
            return Err(ConfigError::new(
                "listeners",
                "at least one listener is required",
            ));
        }
        if self.pools.is_empty() {
            return Err(ConfigError::new("pools", "at least one pool is required"));
        }
        let mut names = HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let at = format!("listeners[{i}]");
            let clash = l.bind.port() != 0
                && self.listeners[..i].iter().any(|o| {
                    o.bind.port() == l.bind.port()
                        && (o.bind.ip() == l.bind.ip()
                            || o.bind.ip().is_unspecified()
                            || l.bind.ip().is_unspecified())
                });
            if clash {
                return Err(ConfigError::new(
                    format!("{at}.bind"),
                    format!("{} is bound by another listener", l.bind),
                ));
            }
            if let Some(admin) = &self.admin {
                if admin.bind == l.bind && l.bind.port() != 0 {
                    return Err(ConfigError::new(
                        format!("{at}.bind"),
                        format!("{} is also admin.bind", l.bind),
                    ));
                }
            }
            let name = self.listener_name(i);
            if !names.insert(name.clone()) {
                return Err(ConfigError::new(
                    format!("{at}.name"),
                    format!("duplicate listener name {name:?}"),
                ));
            }
            if l.routes.is_empty() {
                return Err(ConfigError::new(
                    format!("{at}.routes"),
                    "at least one route is required",
                ));
            }
            let mut seen = HashSet::new();
            for (j, r) in l.routes.iter().enumerate() {
                let at = format!("{at}.routes[{j}]");
                if !r.path.starts_with('/') {
                    return Err(ConfigError::new(
                        format!("{at}.path"),
                        format!("path {:?} must start with \"/\"", r.path),
                    ));
                }
                if !self.pools.contains_key(&r.pool) {
                    return Err(ConfigError::new(
                        format!("{at}.pool"),
                        format!("no pool named {:?}", r.pool),
                    ));
                }
                if let Some(h) = &r.host {
                    if crate::route::host_without_port(h) != h.as_str() {
                        return Err(ConfigError::new(
                            format!("{at}.host"),
                            format!("host {h:?} must not carry a port (matching ignores the port)"),
                        ));
                    }
                    if h.is_empty() || h.contains(['/', ' ', '[', ']']) {
                        return Err(ConfigError::new(
                            format!("{at}.host"),
                            format!("invalid host {h:?}"),
                        ));
                    }
                }
                let key = (
                    r.path.clone(),
                    r.host.as_ref().map(|h| h.to_ascii_lowercase()),
                );
                if !seen.insert(key) {
                    return Err(ConfigError::new(
                        format!("{at}.path"),
                        format!("duplicate route {:?} for the same host", r.path),
                    ));
                }
            }
        }
        for (name, p) in &self.pools {
            let at = format!("pools.{name}");
            if p.backends.is_empty() {
                return Err(ConfigError::new(
                    format!("{at}.backends"),
                    "at least one backend is required",
                ));
            }
            let mut addrs = HashSet::new();
            for (i, b) in p.backends.iter().enumerate() {
                if b.weight == 0 {
                    return Err(ConfigError::new(
                        format!("{at}.backends[{i}].weight"),
                        "weight must be at least 1",
                    ));
                }
                if !b.tls && (b.ca.is_some() || b.server_name.is_some()) {
                    return Err(ConfigError::new(
                        format!("{at}.backends[{i}].tls"),
                        "ca and server_name need \"tls\": true",
                    ));
                }
                if !addrs.insert(b.address) {
                    return Err(ConfigError::new(
                        format!("{at}.backends[{i}].address"),
                        format!("{} is listed twice", b.address),
                    ));
                }
            }
            if p.connect_attempts == 0 {
                return Err(ConfigError::new(
                    format!("{at}.connect_attempts"),
                    "must be at least 1",
                ));
            }
            if let Some(hc) = &p.health_check {
                let at = format!("{at}.health_check");
                if hc.interval_ms == 0 {
                    return Err(ConfigError::new(
                        format!("{at}.interval_ms"),
                        "must be at least 1",
                    ));
                }
                if hc.timeout_ms == 0 {
                    return Err(ConfigError::new(
                        format!("{at}.timeout_ms"),
                        "must be at least 1",
                    ));
                }
                if hc.healthy_after == 0 {
                    return Err(ConfigError::new(
                        format!("{at}.healthy_after"),
                        "must be at least 1",
                    ));
                }
                if hc.unhealthy_after == 0 {
                    return Err(ConfigError::new(
                        format!("{at}.unhealthy_after"),
                        "must be at least 1",
                    ));
                }
                if !hc.path.starts_with('/') {
                    return Err(ConfigError::new(
                        format!("{at}.path"),
                        "must start with \"/\"",
                    ));
                }
            }
        }
        let t = &self.timeouts;
        for (field, v) in [
            ("handshake_ms", t.handshake_ms),
            ("connect_ms", t.connect_ms),
            ("idle_ms", t.idle_ms),
            ("ping_interval_ms", t.ping_interval_ms),
        ] {
            if v == 0 {
                return Err(ConfigError::new(
                    format!("timeouts.{field}"),
                    "must be at least 1",
                ));
            }
        }
        if self.limits.max_frame_bytes == 0 {
            return Err(ConfigError::new(
                "limits.max_frame_bytes",
                "must be at least 1",
            ));
        }
        if self.limits.max_message_bytes == 0 {
            return Err(ConfigError::new(
                "limits.max_message_bytes",
                "must be at least 1",
            ));
        }
        for (k, v) in &self.headers.set {
            let at = format!("headers.set.{k}");
            if !is_token(k) {
                return Err(ConfigError::new(at, "not a valid header name"));
            }
            if v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                return Err(ConfigError::new(
                    at,
                    "header value must not contain CR, LF or NUL",
                ));
            }
            if crate::handshake::is_reserved_upstream_header(k) {
                return Err(ConfigError::new(
                    at,
                    "the gateway sets this header itself (hop-by-hop or WebSocket handshake header)",
                ));
            }
        }
        for (i, o) in self.allowed_origins.iter().enumerate() {
            let lower = o.to_ascii_lowercase();
            let rest = lower
                .strip_prefix("http://")
                .or_else(|| lower.strip_prefix("https://"));
            if rest.is_none_or(|r| r.is_empty() || r.contains('/')) {
                return Err(ConfigError::new(
                    format!("allowed_origins[{i}]"),
                    format!("{o:?} is not an origin (scheme://host[:port])"),
                ));
            }
        }
        Ok(())
    }

    /// The listener's configured name, or `listener-N`.
    pub fn listener_name(&self, i: usize) -> String {
        self.listeners[i]
            .name
            .clone()
            .unwrap_or_else(|| format!("listener-{i}"))
    }

    /// The relay mode a pool uses.
    pub fn relay_for(&self, pool: &str) -> RelayMode {
        self.pools
            .get(pool)
            .and_then(|p| p.relay)
            .unwrap_or(self.relay)
    }
}

/// RFC 9110 token characters (header names).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"{"listeners":[{"bind":"127.0.0.1:8020","routes":[{"path":"/chat","pool":"chat"}]}],
        "pools":{"chat":{"backends":[{"address":"127.0.0.1:8010"}]}}}"#;

    fn err(json: &str) -> String {
        match Config::from_json(json, Path::new(".")) {
            Ok(_) => panic!("accepted: {json}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_follow_the_spec() {
        let c = Config::from_json(MINIMAL, Path::new(".")).unwrap();
        let p = &c.pools["chat"];
        assert_eq!(p.balance, Balance::RoundRobin);
        assert_eq!(
            (
                p.connect_attempts,
                p.passive.max_fails,
                p.passive.fail_timeout_ms
            ),
            (3, 1, 10_000)
        );
        assert_eq!(p.backends[0].weight, 1);
        assert_eq!(c.timeouts, Timeouts::default());
        assert_eq!(c.timeouts.idle_ms, 300_000);
        assert_eq!(c.limits.max_message_bytes, 16 << 20);
        assert!(c.headers.forwarded);
        assert_eq!(c.relay, RelayMode::Message);
        assert_eq!(c.listener_name(0), "listener-0");
    }

    #[test]
    fn errors_name_the_field() {
        let bad_addr = MINIMAL.replace("127.0.0.1:8010", "127.0.0.1:80x0");
        assert!(err(&bad_addr).starts_with(
            "config error: pools.chat.backends[0].address: invalid socket address \"127.0.0.1:80x0\""
        ));
        assert!(
            err(&MINIMAL.replace("\"pool\":\"chat\"", "\"pool\":\"nope\""))
                .starts_with("config error: listeners[0].routes[0].pool: no pool named \"nope\"")
        );
        assert!(err(&MINIMAL.replace(
            "\"backends\":[{\"address\":\"127.0.0.1:8010\"}]",
            "\"backends\":[]"
        ))
        .starts_with("config error: pools.chat.backends: at least one backend"));
        assert!(err(&MINIMAL.replace("8010\"}", "8010\",\"weight\":0}"))
            .starts_with("config error: pools.chat.backends[0].weight:"));
        assert!(
            err(&MINIMAL.replace("\"backends\"", "\"balance\":\"fastest\",\"backends\""))
                .starts_with("config error: pools.chat.balance: unknown variant `fastest`")
        );
        assert!(
            err(&MINIMAL.replace("\"backends\"", "\"balanse\":\"ip_hash\",\"backends\""))
                .contains("unknown field `balanse`")
        );
        assert!(err(&format!("{MINIMAL} x")).starts_with("config error: trailing characters"));
    }

    #[test]
    fn duplicate_binds() {
        let two = r#"{"listeners":[{"bind":"0.0.0.0:8020","routes":[{"path":"/","pool":"p"}]},
            {"bind":"127.0.0.1:8020","routes":[{"path":"/","pool":"p"}]}],
            "pools":{"p":{"backends":[{"address":"127.0.0.1:1"}]}}}"#;
        assert!(err(two).starts_with("config error: listeners[1].bind:"));
        let zeros = two.replace(":8020", ":0");
        assert!(Config::from_json(&zeros, Path::new(".")).is_ok());
    }

    #[test]
    fn routes_and_origins() {
        let host_port = MINIMAL.replace(
            "\"pool\":\"chat\"",
            "\"pool\":\"chat\",\"host\":\"localhost:8020\"",
        );
        assert!(err(&host_port).starts_with("config error: listeners[0].routes[0].host:"));
        let origin = MINIMAL.replace(
            "\"pools\"",
            "\"allowed_origins\":[\"HTTP://Localhost:8020\"],\"pools\"",
        );
        assert!(Config::from_json(&origin, Path::new(".")).is_ok());
        let origin = MINIMAL.replace(
            "\"pools\"",
            "\"allowed_origins\":[\"http://h/path\"],\"pools\"",
        );
        assert!(err(&origin).starts_with("config error: allowed_origins[0]:"));
    }
}
