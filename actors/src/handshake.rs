//! The HTTP side of a session: reading the client's upgrade request head, checking it,
//! building the upstream request, and answering the client. Pure functions where possible.

/// What a header field's name is to the gateway, decided by one comparison (the candidates
/// are told apart by length first): most names in a head are none of these, and each is
/// asked about by every rule below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// Hop-by-hop (RFC 9110 §7.6.1): describes one connection, never forwarded (the
    /// body-framing fields are handled by whoever frames the body).
    HopByHop,
    /// `Transfer-Encoding`, `Content-Length`.
    Framing,
    Host,
    /// `Sec-WebSocket-Key`, `-Version` and `-Accept`.
    Handshake,
    Extensions,
    Protocol,
    ForwardedFor,
    /// `X-Forwarded-Proto`, `X-Forwarded-Host`, `X-Real-IP`.
    ForwardedOther,
    Other,
}

/// Classifies a header field name (ASCII case-insensitive).
pub fn field(name: &str) -> Field {
    let is = |known: &str| name.eq_ignore_ascii_case(known);
    match name.len() {
        2 if is("te") => Field::HopByHop,
        4 if is("host") => Field::Host,
        7 if is("upgrade") || is("trailer") => Field::HopByHop,
        9 if is("x-real-ip") => Field::ForwardedOther,
        10 if is("connection") || is("keep-alive") => Field::HopByHop,
        14 if is("content-length") => Field::Framing,
        15 if is("x-forwarded-for") => Field::ForwardedFor,
        16 if is("proxy-connection") => Field::HopByHop,
        16 if is("x-forwarded-host") => Field::ForwardedOther,
        17 if is("sec-websocket-key") => Field::Handshake,
        17 if is("transfer-encoding") => Field::Framing,
        17 if is("x-forwarded-proto") => Field::ForwardedOther,
        18 if is("proxy-authenticate") => Field::HopByHop,
        19 if is("proxy-authorization") => Field::HopByHop,
        20 if is("sec-websocket-accept") => Field::Handshake,
        21 if is("sec-websocket-version") => Field::Handshake,
        22 if is("sec-websocket-protocol") => Field::Protocol,
        24 if is("sec-websocket-extensions") => Field::Extensions,
        _ => Field::Other,
    }
}

impl Field {
    /// Hop-by-hop headers (RFC 9110 §7.6.1).
    pub fn is_hop_by_hop(self) -> bool {
        self == Field::HopByHop
    }

    /// Headers the gateway writes itself toward a backend: hop-by-hop headers, body framing,
    /// `Host`, and the WebSocket handshake's own. Never copied from the client or
    /// `headers.set`.
    pub fn is_reserved_upstream(self) -> bool {
        !matches!(
            self,
            Field::Other | Field::ForwardedFor | Field::ForwardedOther
        )
    }

    fn is_forwarded(self) -> bool {
        matches!(self, Field::ForwardedFor | Field::ForwardedOther)
    }
}

/// [`Field::is_hop_by_hop`] of a name.
pub fn is_hop_by_hop(name: &str) -> bool {
    field(name).is_hop_by_hop()
}

/// [`Field::is_reserved_upstream`] of a name.
pub fn is_reserved_upstream_header(name: &str) -> bool {
    field(name).is_reserved_upstream()
}

use crate::config::HeadersConfig;
use async_tungstenite::tungstenite::handshake::derive_accept_key;
use async_tungstenite::tungstenite::http;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use std::io;
use std::net::IpAddr;
use std::ops::Range;

/// The largest request head a client may send (nginx's large_client_header_buffers order).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

/// A parsed HTTP/1.1 request head. The method and target share the header fields' buffer.
#[derive(Debug, Clone)]
pub struct RequestHead {
    /// HTTP minor version (1 for HTTP/1.1).
    pub minor_version: u8,
    pub headers: Headers,
    /// Where the method ends (and the target starts) in the fields' buffer.
    method_end: u32,
}

impl RequestHead {
    /// A head from its parts (heads off the wire come from [`read_head`]).
    pub fn new<N: AsRef<str>, V: AsRef<[u8]>>(
        method: &str,
        target: &str,
        minor_version: u8,
        fields: impl IntoIterator<Item = (N, V)>,
    ) -> RequestHead {
        RequestHead {
            minor_version,
            headers: Headers::from_fields([method, target], fields),
            method_end: method.len() as u32,
        }
    }

    pub fn method(&self) -> &str {
        self.headers.prefix(0..self.method_end as usize)
    }

    /// Path and query, exactly as sent.
    pub fn target(&self) -> &str {
        self.headers
            .prefix(self.method_end as usize..self.headers.names_at as usize)
    }

    /// The first value of a header, if it is valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        header_in(&self.headers, name)
    }

    /// Whether a comma-separated header (any of its occurrences) lists `token`.
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        has_token(&self.headers, name, token)
    }

    pub fn is_upgrade(&self) -> bool {
        self.header_has_token("upgrade", "websocket")
            && self.header_has_token("connection", "upgrade")
    }
}

#[derive(Debug)]
pub enum HeadError {
    /// Not HTTP/1.x or malformed.
    Malformed,
    TooLarge,
    /// The peer closed before the head was complete.
    Eof,
    Io(io::Error),
}

/// Reads from `stream` into `buf` until `parse` recognizes a complete head, within
/// `MAX_HEAD_BYTES`. `parse` returns the head and its length, or `None` for "need more".
async fn read_parsed<S, T>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    mut parse: impl FnMut(&[u8]) -> Result<Option<(T, usize)>, HeadError>,
) -> Result<(T, usize), HeadError>
where
    S: AsyncRead + Unpin,
{
    // Reads land in `buf` itself: a chunk array here would sit in every session's handshake
    // state (and, with many handshakes at once, in the allocator's high-water mark).
    const STEP: usize = 1024;
    loop {
        if !buf.is_empty() {
            if let Some(done) = parse(buf)? {
                return Ok(done);
            }
        }
        if buf.len() >= MAX_HEAD_BYTES {
            return Err(HeadError::TooLarge);
        }
        let len = buf.len();
        buf.resize(len + STEP, 0);
        let n = match stream.read(&mut buf[len..]).await {
            Ok(n) => n,
            Err(e) => {
                buf.truncate(len);
                return Err(HeadError::Io(e));
            }
        };
        buf.truncate(len + n);
        if n == 0 {
            return Err(HeadError::Eof);
        }
    }
}

fn parse_error(e: httparse::Error) -> HeadError {
    match e {
        httparse::Error::TooManyHeaders => HeadError::TooLarge,
        _ => HeadError::Malformed,
    }
}

/// A head's header fields in one buffer: every name, then every value (two allocations per
/// head with the offsets, not two per field). The buffer is validated as UTF-8 once for the
/// whole head (a session reads a dozen values as text; each was a `from_utf8`); names are
/// tokens, so they are always text. Values are the bytes httparse accepted.
#[derive(Debug, Clone, Default)]
pub struct Headers {
    /// The head's line parts (a request's method and target, a response's reason), then
    /// every name, then every value.
    text: HeadText,
    /// Where the names start in `text` (the line parts' total length).
    names_at: u32,
    /// Where the values start in `text`.
    values_at: u32,
    /// Per field: where its name ends and where its value ends in `text` (each starts where
    /// the previous field's ends; the first value at `values_at`).
    ends: Vec<(u32, u32)>,
}

/// A head's names and values, in one buffer: text when all of it is UTF-8 (the usual case),
/// else the bytes as sent (obs-text in a value).
#[derive(Debug, Clone)]
enum HeadText {
    Text(String),
    Bytes(Vec<u8>),
}

impl Default for HeadText {
    fn default() -> HeadText {
        HeadText::Text(String::new())
    }
}

impl HeadText {
    fn new(bytes: Vec<u8>) -> HeadText {
        String::from_utf8(bytes).map_or_else(|e| HeadText::Bytes(e.into_bytes()), HeadText::Text)
    }

    fn bytes(&self) -> &[u8] {
        match self {
            HeadText::Text(s) => s.as_bytes(),
            HeadText::Bytes(b) => b,
        }
    }

    /// One name or value as text, if it is UTF-8.
    fn text(&self, r: Range<usize>) -> Option<&str> {
        match self {
            // A value that begins or ends inside a character is not UTF-8 by itself.
            HeadText::Text(s) => s.get(r),
            HeadText::Bytes(b) => std::str::from_utf8(&b[r]).ok(),
        }
    }
}

impl Headers {
    fn from_parsed<const N: usize>(line: [&str; N], parsed: &[httparse::Header<'_>]) -> Headers {
        Headers::build(line, parsed.iter().map(|f| (f.name, f.value)))
    }

    /// Headers from owned or borrowed (name, value) pairs, after the line parts `line`.
    fn from_fields<N: AsRef<str>, V: AsRef<[u8]>, const K: usize>(
        line: [&str; K],
        fields: impl IntoIterator<Item = (N, V)>,
    ) -> Headers {
        let fields: Vec<(N, V)> = fields.into_iter().collect();
        Headers::build(line, fields.iter().map(|(n, v)| (n.as_ref(), v.as_ref())))
    }

    /// `line`: the head's line parts, stored before the names (one allocation for the
    /// whole head's text, not one more per part). Heads are at most `MAX_HEAD_BYTES`, so
    /// the offsets fit in `u32`.
    fn build<'a, const N: usize>(
        line: [&str; N],
        each: impl Iterator<Item = (&'a str, &'a [u8])> + Clone,
    ) -> Headers {
        let names_at: usize = line.iter().map(|p| p.len()).sum();
        let (fields, len) = each.clone().fold((0, names_at), |(k, n), (name, value)| {
            (k + 1, n + name.len() + value.len())
        });
        let mut text = Vec::with_capacity(len);
        let mut ends = Vec::with_capacity(fields);
        for part in line {
            text.extend_from_slice(part.as_bytes());
        }
        for (name, _) in each.clone() {
            text.extend_from_slice(name.as_bytes());
            ends.push((text.len() as u32, 0));
        }
        let values_at = text.len() as u32;
        for ((_, value), end) in each.zip(ends.iter_mut()) {
            text.extend_from_slice(value);
            end.1 = text.len() as u32;
        }
        Headers {
            text: HeadText::new(text),
            names_at: names_at as u32,
            values_at,
            ends,
        }
    }

    /// A line part (pushed as `str`, so it always reads back as text).
    fn prefix(&self, r: Range<usize>) -> &str {
        self.text.text(r).unwrap_or_default()
    }

    /// Every field's name range and value range in `text`, in the order sent.
    fn spans(&self) -> impl Iterator<Item = (Range<usize>, Range<usize>)> + '_ {
        let mut start = (self.names_at as usize, self.values_at as usize);
        self.ends.iter().map(move |&(n, v)| {
            let (n, v) = (n as usize, v as usize);
            let (ns, vs) = std::mem::replace(&mut start, (n, v));
            (ns..n, vs..v)
        })
    }

    /// Every field as (name, value), in the order sent.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> + '_ {
        let bytes = self.text.bytes();
        self.spans().map(move |(n, v)| {
            // Names were pushed as `str`, so they always read back as text.
            (self.text.text(n).unwrap_or_default(), &bytes[v])
        })
    }

    /// The value ranges of every field named `name` (ASCII case-insensitive), in the order
    /// sent. A field whose name has another length is passed over on its offsets alone; the
    /// others are compared as bytes: a lookup decodes nothing and allocates nothing. (A
    /// session looks up a dozen fields in each of its two heads; slicing every name first
    /// was ~300 instructions a lookup, bench/profile.sh callgrind-handshake.)
    fn ranges<'s: 'n, 'n>(&'s self, name: &'n str) -> impl Iterator<Item = Range<usize>> + 'n {
        let bytes = self.text.bytes();
        self.spans().filter_map(move |(n, v)| {
            (n.len() == name.len() && bytes[n].eq_ignore_ascii_case(name.as_bytes())).then_some(v)
        })
    }

    /// The values of every field named `name` (ASCII case-insensitive), in the order sent.
    pub fn values<'s: 'n, 'n>(&'s self, name: &'n str) -> impl Iterator<Item = &'s [u8]> + 'n {
        let bytes = self.text.bytes();
        self.ranges(name).map(move |v| &bytes[v])
    }

    /// The first value of field `name`, trimmed, if it is UTF-8.
    fn first_text(&self, name: &str) -> Option<&str> {
        let v = self.ranges(name).next()?;
        self.text.text(v).map(str::trim)
    }
}

impl<N: AsRef<str>, V: AsRef<[u8]>> FromIterator<(N, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(fields: I) -> Headers {
        Headers::from_fields([], fields)
    }
}

/// Reads a request head into `buf`; returns the head and how many bytes of `buf` it used
/// (the rest is what the client sent after it: frames or a body).
pub async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Result<(RequestHead, usize), HeadError> {
    read_parsed(stream, buf, |bytes| {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(bytes).map_err(parse_error)? {
            httparse::Status::Partial => Ok(None),
            httparse::Status::Complete(len) => {
                let method = req.method.unwrap_or_default();
                let target = req.path.unwrap_or_default();
                let head = RequestHead {
                    minor_version: req.version.unwrap_or(0),
                    headers: Headers::from_parsed([method, target], req.headers),
                    method_end: method.len() as u32,
                };
                Ok(Some((head, len)))
            }
        }
    })
    .await
}

/// Reads a response head (a backend's answer, a health check's); returns it and how many
/// bytes of `buf` it used (the rest is what followed it: frames or body).
pub async fn read_response_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Result<(ResponseHead, usize), HeadError> {
    read_parsed(stream, buf, |bytes| {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(bytes).map_err(parse_error)? {
            httparse::Status::Partial => Ok(None),
            httparse::Status::Complete(len) => Ok(Some((
                ResponseHead {
                    status: resp.code.unwrap_or(0),
                    headers: Headers::from_parsed([resp.reason.unwrap_or_default()], resp.headers),
                },
                len,
            ))),
        }
    })
    .await
}

/// A parsed HTTP/1.1 response head.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub status: u16,
    /// The reason phrase is kept in the fields' buffer ([`ResponseHead::reason`]).
    pub headers: Headers,
}

impl ResponseHead {
    pub fn reason(&self) -> &str {
        self.headers.prefix(0..self.headers.names_at as usize)
    }

    /// The first value of a header, if it is valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        header_in(&self.headers, name)
    }

    /// Whether a comma-separated header (any of its occurrences) lists `token`.
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        has_token(&self.headers, name, token)
    }
}

/// The first value of header `name` in a parsed head, trimmed, if it is valid UTF-8.
fn header_in<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers.first_text(name)
}

/// Whether any occurrence of the comma-separated header `name` lists `token`.
fn has_token(headers: &Headers, name: &str, token: &str) -> bool {
    headers.values(name).any(|v| list_has(v, token.as_bytes()))
}

/// Whether the comma-separated list `list` has `token` (ASCII case-insensitive, trimmed).
fn list_has(list: &[u8], token: &[u8]) -> bool {
    let list = list.trim_ascii();
    // A list no longer than the token can hold it only as its whole self (the usual
    // `Upgrade` / `websocket`): no split.
    if list.len() <= token.len() {
        return list.eq_ignore_ascii_case(token);
    }
    list.split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

impl std::fmt::Display for HeadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeadError::Malformed => f.write_str("malformed HTTP head"),
            HeadError::TooLarge => f.write_str("HTTP head too large"),
            HeadError::Eof => f.write_str("connection closed before the HTTP head was complete"),
            HeadError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// What is wrong with an upgrade request that routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeProblem {
    /// No `Upgrade: websocket` + `Connection: upgrade` (→ 426, or plain HTTP pass-through).
    NotUpgrade,
    /// Wrong method, missing key, or version ≠ 13 (→ 400).
    Malformed,
}

/// Checks the WebSocket parts of a request head (RFC 6455 §4.2.1).
pub fn check_upgrade(head: &RequestHead) -> Result<(), UpgradeProblem> {
    if !head.is_upgrade() {
        return Err(UpgradeProblem::NotUpgrade);
    }
    let key_ok = head
        .header("sec-websocket-key")
        .is_some_and(|k| k.len() == 24);
    if head.method() != "GET"
        || head.minor_version != 1
        || !key_ok
        || head.header("sec-websocket-version") != Some("13")
    {
        return Err(UpgradeProblem::Malformed);
    }
    Ok(())
}

/// Origin check (SPEC §2 `allowed_origins`): an empty list or an absent `Origin` passes.
pub fn origin_allowed(allowed: &[String], origin: Option<&str>) -> bool {
    match origin {
        _ if allowed.is_empty() => true,
        None => true,
        Some(o) => allowed.iter().any(|a| a.eq_ignore_ascii_case(o)),
    }
}

/// Context the upstream request needs about the client connection.
#[derive(Debug, Clone, Copy)]
pub struct ClientInfo {
    pub ip: IpAddr,
    /// Whether the client reached us over TLS (`X-Forwarded-Proto: https`).
    pub tls: bool,
}

/// The gateway's upgrade request toward a backend, written as bytes: the client's path and
/// query unchanged, its `Sec-WebSocket-Key` (as nginx and HAProxy pass it: the backend's
/// accept key is then the one the client expects, so one SHA-1 serves both handshakes), its
/// end-to-end headers (never hop-by-hop ones), the subprotocol offer, `X-Forwarded-*` /
/// `X-Real-IP` when `headers.forwarded`, then `headers.set`. `pass_extensions` forwards
/// `Sec-WebSocket-Extensions` (tunnel relay only). Header values are the client's as
/// httparse accepted them, and `headers.set` is validated at load: no CR/LF can get in.
/// Appended to `out`.
pub fn upstream_request(
    out: &mut Vec<u8>,
    head: &RequestHead,
    backend: std::net::SocketAddr,
    client: ClientInfo,
    cfg: &HeadersConfig,
    pass_extensions: bool,
) {
    // A request without Host (HTTP/1.0) gets the backend's address.
    let host: std::borrow::Cow<'_, str> = match head.header("host") {
        Some(h) => h.into(),
        None => backend.to_string().into(),
    };
    let key = head.header("sec-websocket-key").unwrap_or_default();
    put_line(out, head.target());
    put_field(out, "Host", host.as_bytes());
    put_field(out, "Connection", b"Upgrade");
    put_field(out, "Upgrade", b"websocket");
    put_field(out, "Sec-WebSocket-Version", b"13");
    put_field(out, "Sec-WebSocket-Key", key.as_bytes());
    put_client_fields(out, head, client, cfg, |f| {
        gateway_writes(f, pass_extensions)
    });
    out.extend_from_slice(b"\r\n");
}

/// Whether a handshake field is the gateway's to write, never copied from one side's head to
/// the other: a reserved one ([`is_reserved_upstream_header`]) other than the subprotocol
/// (passed both ways) and, with `pass_extensions` (tunnel relay), the extensions.
fn gateway_writes(field: Field, pass_extensions: bool) -> bool {
    match field {
        Field::Protocol => false,
        Field::Extensions => !pass_extensions,
        f => f.is_reserved_upstream(),
    }
}

/// The client's end-to-end header fields as a proxy passes them on, then the gateway's own:
/// with `cfg.forwarded`, `X-Forwarded-For` (every one the client sent, joined, then the
/// client's IP), `X-Forwarded-Proto`, `X-Forwarded-Host` (the client's `Host`, when it sent
/// one) and `X-Real-IP`; then `cfg.set`. Never passed on: hop-by-hop fields, those the
/// client's `Connection` field names (RFC 9110 §7.6.1), the `X-Forwarded-*` the gateway
/// writes, those `cfg.set` replaces, and those `own` says the caller writes itself. The
/// upgrade request and the HTTP pass-through's request both end with these.
pub fn put_client_fields(
    out: &mut Vec<u8>,
    head: &RequestHead,
    client: ClientInfo,
    cfg: &HeadersConfig,
    own: impl Fn(Field) -> bool,
) {
    // The client's Connection values: almost always one field, so the rest is usually
    // empty (an empty collect allocates nothing).
    let mut connection = head.headers.values("connection");
    let first_connection = connection.next();
    let more_connection: Vec<&[u8]> = connection.collect();
    let listed = |name: &str| {
        first_connection
            .into_iter()
            .chain(more_connection.iter().copied())
            .any(|v| list_has(v, name.as_bytes()))
    };
    let mut chain: Vec<&[u8]> = Vec::new(); // the client's X-Forwarded-For values
    for (name, value) in head.headers.iter() {
        let f = field(name);
        if f.is_hop_by_hop() || own(f) || listed(name) {
            continue;
        }
        if cfg.forwarded && f.is_forwarded() {
            if f == Field::ForwardedFor && !value.trim_ascii().is_empty() {
                chain.push(value.trim_ascii());
            }
            continue;
        }
        if cfg.set.keys().any(|k| name.eq_ignore_ascii_case(k)) {
            continue;
        }
        put_field(out, name, value);
    }
    if cfg.forwarded {
        let mut ip = [0u8; 64];
        let ip = put_ip(&mut ip, client.ip);
        out.extend_from_slice(b"X-Forwarded-For: ");
        for v in &chain {
            out.extend_from_slice(v);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(ip);
        out.extend_from_slice(b"\r\n");
        let proto: &[u8] = if client.tls { b"https" } else { b"http" };
        put_field(out, "X-Forwarded-Proto", proto);
        if let Some(host) = head.header("host") {
            put_field(out, "X-Forwarded-Host", host.as_bytes());
        }
        put_field(out, "X-Real-IP", ip);
    }
    for (k, v) in &cfg.set {
        put_field(out, k, v.as_bytes());
    }
}

/// `ip` in its text form, written into `buf` (std's `Display` for an address costs about
/// a thousand instructions, most of a handshake's header work; IPv4 is written here).
fn put_ip(buf: &mut [u8; 64], ip: IpAddr) -> &[u8] {
    let mut n = 0;
    match ip {
        IpAddr::V4(v4) => {
            for (k, octet) in v4.octets().into_iter().enumerate() {
                if k > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                if octet >= 100 {
                    buf[n] = b'0' + octet / 100;
                    n += 1;
                }
                if octet >= 10 {
                    buf[n] = b'0' + octet / 10 % 10;
                    n += 1;
                }
                buf[n] = b'0' + octet % 10;
                n += 1;
            }
        }
        IpAddr::V6(_) => {
            use std::io::Write as _;
            let mut w: &mut [u8] = buf;
            let _ = write!(w, "{ip}"); // at most 45 bytes
            n = 64 - w.len();
        }
    }
    &buf[..n]
}

/// One header field line.
pub fn put_field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn put_line(out: &mut Vec<u8>, target: &str) {
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
}

/// A backend's answer to the upgrade: its response head, and bytes it sent after it (frames
/// for a 101, body for a refusal).
pub struct Upgraded {
    pub response: ResponseHead,
    pub rest: Vec<u8>,
}

/// Sends an upgrade request (`buf`'s bytes) and reads the answer into `buf` (one buffer for
/// a session's heads: the caller's, reused; the caller bounds it in time): `Ok` for a
/// 101 that checks out (`accept`, the accept key the request's key calls for,
/// `Upgrade`/`Connection`, a subprotocol the client offered); `Err(Ok(..))` for any other
/// status, for the caller to judge (4xx passed to the client, 5xx retried);
/// `Err(Err(reason))` for transport and protocol problems. Whatever the backend sent after
/// its head is kept, so nothing is swallowed by a library's buffer.
pub async fn raw_upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    accept: &str,
    offered: Option<&str>,
) -> Result<Upgraded, Result<Upgraded, String>> {
    stream
        .write_all(buf)
        .await
        .map_err(|e| Err(format!("upgrade: {e}")))?;
    buf.clear();
    let (response, len) = read_response_head(stream, buf)
        .await
        .map_err(|e| Err(format!("upgrade: {e}")))?;
    let rest = buf.split_off(len);
    let up = Upgraded { response, rest };
    if up.response.status != 101 {
        return Err(Ok(up));
    }
    let r = &up.response;
    if r.header("sec-websocket-accept") != Some(accept) {
        return Err(Err("upgrade: wrong Sec-WebSocket-Accept".to_string()));
    }
    if !r.header_has_token("upgrade", "websocket") || !r.header_has_token("connection", "upgrade") {
        return Err(Err("upgrade: 101 without Upgrade: websocket".to_string()));
    }
    if let Some(chosen) = r.header("sec-websocket-protocol") {
        let was_offered = offered.is_some_and(|o| o.split(',').any(|p| p.trim() == chosen));
        if !was_offered {
            return Err(Err(format!(
                "upgrade: backend chose subprotocol {chosen:?}, not offered"
            )));
        }
    }
    Ok(up)
}

/// The 101 answer to the client: the accept key for its `Sec-WebSocket-Key` ([`accept_key`]),
/// and the backend's chosen subprotocol and end-to-end headers (e.g. `Set-Cookie`); with
/// `pass_extensions`, its extensions too. Appended to `out`.
pub fn switching_protocols(
    out: &mut Vec<u8>,
    accept: &str,
    backend: &ResponseHead,
    pass_extensions: bool,
) {
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    out.extend_from_slice(accept.as_bytes());
    out.extend_from_slice(b"\r\n");
    let is = |name: &str, other: &str| name.eq_ignore_ascii_case(other);
    for (name, value) in backend.headers.iter() {
        if gateway_writes(field(name), pass_extensions) || is(name, "date") || is(name, "server") {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// `Sec-WebSocket-Accept` for the request's `Sec-WebSocket-Key` (RFC 6455 §4.2.2): computed
/// once per handshake, it checks the backend's 101 and answers the client.
pub fn accept_key(head: &RequestHead) -> String {
    derive_accept_key(
        head.header("sec-websocket-key")
            .unwrap_or_default()
            .as_bytes(),
    )
}

/// A complete short HTTP/1.1 response that closes the connection.
pub fn simple_response(status: u16, extra_headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown");
    let mut out = format!("HTTP/1.1 {status} {reason}\r\n").into_bytes();
    for (k, v) in extra_headers {
        out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    out.extend_from_slice(
        format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(body);
    out
}

/// The response for a gateway-made refusal (SPEC §3).
pub fn refusal(status: u16) -> Vec<u8> {
    let (extra, body): (&[(&str, &str)], &str) = match status {
        400 => (
            &[
                ("Sec-WebSocket-Version", "13"),
                ("Content-Type", "text/plain"),
            ],
            "bad websocket upgrade request\n",
        ),
        403 => (&[("Content-Type", "text/plain")], "origin not allowed\n"),
        404 => (&[("Content-Type", "text/plain")], "no route\n"),
        426 => (
            &[("Upgrade", "websocket"), ("Content-Type", "text/plain")],
            "websocket upgrade required\n",
        ),
        431 => (
            &[("Content-Type", "text/plain")],
            "request head too large\n",
        ),
        502 => (&[("Content-Type", "text/plain")], "no backend available\n"),
        503 => (
            &[("Content-Type", "text/plain"), ("Retry-After", "1")],
            "over session limit\n",
        ),
        _ => (&[("Content-Type", "text/plain")], "internal error\n"),
    };
    simple_response(status, extra, body.as_bytes())
}

/// A backend's refusal of the upgrade (e.g. 401), passed to the client with its end-to-end
/// headers and the body bytes that came with it.
pub fn passthrough_response(resp: &ResponseHead, body: &[u8]) -> Vec<u8> {
    let mut headers: Vec<(&str, &str)> = Vec::new();
    for (name, value) in resp.headers.iter() {
        let n = name.to_ascii_lowercase();
        if is_reserved_upstream_header(&n) || n == "date" {
            continue;
        }
        if let Ok(v) = std::str::from_utf8(value) {
            headers.push((name, v));
        }
    }
    simple_response(resp.status, &headers, body)
}

/// Writes a response and flushes; errors are the client's loss only.
pub async fn write_all<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn head(headers: &[(&str, &str)]) -> RequestHead {
        RequestHead::new("GET", "/chat?room=1", 1, headers.iter().copied())
    }

    const UPGRADE: [(&str, &str); 4] = [
        ("Host", "gw.example:8020"),
        ("Upgrade", "websocket"),
        ("Connection", "keep-alive, Upgrade"),
        ("Sec-WebSocket-Version", "13"),
    ];

    /// The names `field` knows, by the class it must give them: the lists as RFC 9110 and
    /// RFC 6455 give them, the reference for the length-first classifier.
    const KNOWN: [(&str, Field); 20] = [
        ("connection", Field::HopByHop),
        ("keep-alive", Field::HopByHop),
        ("proxy-connection", Field::HopByHop),
        ("proxy-authenticate", Field::HopByHop),
        ("proxy-authorization", Field::HopByHop),
        ("te", Field::HopByHop),
        ("trailer", Field::HopByHop),
        ("upgrade", Field::HopByHop),
        ("transfer-encoding", Field::Framing),
        ("content-length", Field::Framing),
        ("host", Field::Host),
        ("sec-websocket-key", Field::Handshake),
        ("sec-websocket-version", Field::Handshake),
        ("sec-websocket-accept", Field::Handshake),
        ("sec-websocket-extensions", Field::Extensions),
        ("sec-websocket-protocol", Field::Protocol),
        ("x-forwarded-for", Field::ForwardedFor),
        ("x-forwarded-proto", Field::ForwardedOther),
        ("x-forwarded-host", Field::ForwardedOther),
        ("x-real-ip", Field::ForwardedOther),
    ];

    fn reference_field(name: &str) -> Field {
        KNOWN
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map_or(Field::Other, |&(_, f)| f)
    }

    #[test]
    fn field_classes_the_known_names_in_any_case() {
        for (name, want) in KNOWN {
            assert_eq!(field(name), want, "{name}");
            assert_eq!(field(&name.to_ascii_uppercase()), want, "{name}");
            // One byte off, same length: not that field.
            let mut near = name.as_bytes().to_vec();
            near[0] ^= 0x01;
            let near = String::from_utf8(near).unwrap_or_default();
            assert_eq!(field(&near), reference_field(&near), "{near}");
        }
        assert_eq!(field(""), Field::Other);
        assert_eq!(field("cookie"), Field::Other);
        assert!(is_reserved_upstream_header("Sec-WebSocket-Extensions"));
        assert!(!is_reserved_upstream_header("X-Forwarded-For"));
        assert!(is_hop_by_hop("TE") && !is_hop_by_hop("Host"));
    }

    #[test]
    fn a_value_is_text_only_by_itself() {
        // Joined, the two values are "é" and the head is text; neither is UTF-8 alone.
        let h: Headers = [("a", &[0xC3][..]), ("b", &[0xA9, b'x'][..]), ("c", b" ok ")]
            .into_iter()
            .collect();
        assert_eq!(
            (h.first_text("a"), h.first_text("b"), h.first_text("c")),
            (None, None, Some("ok"))
        );
        // obs-text in one value: the others still read as text, and every byte is kept.
        let h: Headers = [("a", &[0xFF, b'y'][..]), ("c", b"ok")]
            .into_iter()
            .collect();
        assert_eq!((h.first_text("a"), h.first_text("c")), (None, Some("ok")));
        assert_eq!(h.values("a").next(), Some(&[0xFF, b'y'][..]));
    }

    #[test]
    fn put_ip_writes_each_octet_width() {
        for (ip, want) in [
            ([0, 0, 0, 0], "0.0.0.0"),
            ([127, 0, 0, 1], "127.0.0.1"),
            ([9, 10, 99, 100], "9.10.99.100"),
            ([255, 200, 109, 90], "255.200.109.90"),
        ] {
            let mut buf = [0u8; 64];
            assert_eq!(put_ip(&mut buf, IpAddr::from(ip)), want.as_bytes());
        }
    }

    proptest::proptest! {
        /// Any name, including the known ones with their case scrambled, gets the class the
        /// lists give it.
        #[test]
        fn field_agrees_with_the_lists(
            pick in 0usize..40,
            flips in proptest::collection::vec(proptest::bool::ANY, 24),
            other in "[a-zA-Z-]{0,25}",
        ) {
            let name: String = match KNOWN.get(pick) {
                Some((k, _)) => k
                    .chars()
                    .zip(&flips)
                    .map(|(c, &up)| if up { c.to_ascii_uppercase() } else { c })
                    .collect(),
                None => other,
            };
            proptest::prop_assert_eq!(field(&name), reference_field(&name));
        }
    }

    proptest::proptest! {
        #[test]
        fn put_ip_writes_what_display_writes(
            v4 in proptest::num::u32::ANY,
            v6 in proptest::num::u128::ANY,
        ) {
            for ip in [IpAddr::from(v4.to_be_bytes()), IpAddr::from(v6.to_be_bytes())] {
                let mut buf = [0u8; 64];
                let want = ip.to_string();
                proptest::prop_assert_eq!(put_ip(&mut buf, ip), want.as_bytes());
            }
        }
    }

    #[test]
    fn upgrade_checks() {
        let mut h = UPGRADE.to_vec();
        assert_eq!(check_upgrade(&head(&h)), Err(UpgradeProblem::Malformed));
        h.push(("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="));
        assert_eq!(check_upgrade(&head(&h)), Ok(()));
        h[3] = ("Sec-WebSocket-Version", "8");
        assert_eq!(check_upgrade(&head(&h)), Err(UpgradeProblem::Malformed));
        assert_eq!(
            check_upgrade(&head(&[("Host", "x")])),
            Err(UpgradeProblem::NotUpgrade)
        );
    }

    #[test]
    fn origins() {
        let allowed = vec!["http://localhost:8020".to_string()];
        assert!(origin_allowed(&allowed, Some("HTTP://LOCALHOST:8020")));
        assert!(!origin_allowed(&allowed, Some("http://evil.example")));
        assert!(origin_allowed(&allowed, None));
        assert!(origin_allowed(&[], Some("http://evil.example")));
    }

    #[test]
    fn upstream_headers() {
        let mut h = UPGRADE.to_vec();
        h.extend([
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Protocol", "chat, superchat"),
            ("Sec-WebSocket-Extensions", "permessage-deflate"),
            ("Cookie", "a=b"),
            ("X-Forwarded-For", "10.0.0.1"),
            ("Keep-Alive", "timeout=5"),
            ("X-Drop", "1"),
            ("Connection", "X-Drop"),
            ("X-Gateway", "client-value"),
        ]);
        let cfg = HeadersConfig {
            forwarded: true,
            set: BTreeMap::from([("X-Gateway".to_string(), "wsgate".to_string())]),
        };
        let client = ClientInfo {
            ip: "127.0.0.9".parse().unwrap(),
            tls: false,
        };
        // Written as bytes: parse them back with the same reader clients go through.
        let parse = |bytes: Vec<u8>| {
            let mut buf = Vec::new();
            async_std::task::block_on(read_head(&mut &bytes[..], &mut buf))
                .unwrap()
                .0
        };
        let mut bytes = Vec::new();
        upstream_request(
            &mut bytes,
            &head(&h),
            ([127, 0, 0, 1], 8010).into(),
            client,
            &cfg,
            false,
        );
        let req = parse(bytes);
        let hv = |n: &str| {
            req.headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| String::from_utf8(v.to_vec()).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!((req.method(), req.target()), ("GET", "/chat?room=1"));
        assert_eq!(hv("host"), ["gw.example:8020"]);
        assert_eq!(hv("x-forwarded-for"), ["10.0.0.1, 127.0.0.9"]);
        assert_eq!(hv("x-forwarded-proto"), ["http"]);
        assert_eq!(hv("x-forwarded-host"), ["gw.example:8020"]);
        assert_eq!(hv("x-real-ip"), ["127.0.0.9"]);
        assert_eq!(hv("sec-websocket-protocol"), ["chat, superchat"]);
        assert_eq!(hv("cookie"), ["a=b"]);
        assert_eq!(hv("x-gateway"), ["wsgate"]);
        assert!(hv("sec-websocket-extensions").is_empty());
        assert!(hv("keep-alive").is_empty());
        assert!(hv("x-drop").is_empty());
        assert_eq!(hv("connection"), ["Upgrade"]);
        assert_eq!(hv("sec-websocket-key"), ["dGhlIHNhbXBsZSBub25jZQ=="]);
        let mut tunnel = Vec::new();
        let to = ([127, 0, 0, 1], 8011).into();
        upstream_request(&mut tunnel, &head(&h), to, client, &cfg, true);
        assert_eq!(
            parse(tunnel).header("sec-websocket-extensions"),
            Some("permessage-deflate")
        );
    }

    proptest::proptest! {
        /// A value is read as text exactly when it is UTF-8 by itself, whatever the other
        /// values are (obs-text elsewhere, or bytes that join into a character across two
        /// values).
        #[test]
        fn first_text_is_the_value_when_it_is_utf8(
            fields in proptest::collection::vec(
                ("[ab]", proptest::collection::vec(
                    proptest::sample::select(vec![b'x', b' ', 0xC3, 0xA9, 0xFF, b'e']), 0..4)),
                0..6,
            ),
            name in "[ab]",
        ) {
            let h: Headers = fields.iter().map(|(n, v)| (n, v)).collect();
            let want = h.values(&name).next().and_then(|v| std::str::from_utf8(v).ok());
            proptest::prop_assert_eq!(h.first_text(&name), want.map(str::trim));
            let bytes: Vec<(&str, &[u8])> =
                fields.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect();
            proptest::prop_assert_eq!(h.iter().collect::<Vec<_>>(), bytes);
        }

        /// `list_has`'s shortcut for short lists agrees with splitting every list.
        #[test]
        fn list_has_agrees_with_a_split(list in "[aAb, ]{0,8}", token in "[aAb]{0,3}") {
            let split = list
                .split(',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(&token));
            proptest::prop_assert_eq!(list_has(list.as_bytes(), token.as_bytes()), split);
        }

        /// `values` skips on offsets; it must find what comparing every name finds.
        #[test]
        fn values_finds_what_a_scan_of_every_name_finds(
            fields in proptest::collection::vec(("[a-cA-C-]{0,4}", "[ -~]{0,6}"), 0..10),
            name in "[a-cA-C-]{0,4}",
        ) {
            let h: Headers = fields.iter().map(|(n, v)| (n, v)).collect();
            let want: Vec<&[u8]> = fields
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(&name))
                .map(|(_, v)| v.as_bytes())
                .collect();
            proptest::prop_assert_eq!(h.values(&name).collect::<Vec<_>>(), want);
        }
    }

    /// RFC 6455 §1.3's example; the 101 carries exactly this value.
    #[test]
    fn accept_key_answers_the_client() {
        let accept = accept_key(&head(&[("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")]));
        assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let backend = ResponseHead {
            status: 101,
            headers: [
                ("Sec-WebSocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
                ("Set-Cookie", "a=b"),
                ("Server", "x"),
            ]
            .into_iter()
            .collect(),
        };
        let mut answer = Vec::new();
        switching_protocols(&mut answer, &accept, &backend, false);
        let answer = String::from_utf8(answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert_eq!(
            answer
                .matches("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n")
                .count(),
            1
        );
        assert!(answer.contains("\r\nSet-Cookie: a=b\r\n"));
        assert!(!answer.contains("Server:"));
        assert!(answer.ends_with("\r\n\r\n"));
    }

    #[test]
    fn parses_head_and_leftover() {
        let raw = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n\x81\x00";
        let mut buf = Vec::new();
        let (h, len) = async_std::task::block_on(read_head(&mut &raw[..], &mut buf)).unwrap();
        assert_eq!(h.target(), "/x");
        assert_eq!(&buf[len..], b"\x81\x00");
        let mut buf = Vec::new();
        assert!(matches!(
            async_std::task::block_on(read_head(&mut &b"GET /x HT"[..], &mut buf)),
            Err(HeadError::Eof)
        ));
    }
}
