//! Minimal HTTP/1.1 and WebSocket-handshake helpers shared by the example backends
//! (`chat_server`, `ticker_server`): read a request head, answer plain HTTP, or accept the
//! upgrade with `derive_accept_key` and `from_partially_read`.
#![allow(dead_code)]

use super::*;
use serde_json::{Map, Value};

/// The largest request head accepted.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// How long a client may take to send its head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Head {
    pub method: String,
    /// Request target as sent: path and query.
    pub path: String,
    /// Lower-cased names, in order.
    pub headers: Vec<(String, String)>,
    /// Bytes read past the head (body start, or early WebSocket frames).
    pub rest: Vec<u8>,
}

pub enum HeadError {
    TooLarge,
    Bad(String),
    Io(io::Error),
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Comma-separated tokens of every `name` header, trimmed.
    pub fn tokens(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect()
    }

    pub fn is_websocket_upgrade(&self) -> bool {
        self.tokens("upgrade")
            .iter()
            .any(|t| t.eq_ignore_ascii_case("websocket"))
    }

    pub fn headers_json(&self) -> Value {
        let mut map = Map::new();
        for (n, v) in &self.headers {
            match map.get_mut(n) {
                Some(Value::String(prev)) => {
                    prev.push_str(", ");
                    prev.push_str(v);
                }
                _ => {
                    map.insert(n.clone(), Value::String(v.clone()));
                }
            }
        }
        Value::Object(map)
    }
}

pub async fn read_head(stream: &mut TcpStream) -> Result<Head, HeadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let end = loop {
        let n = stream.read(&mut chunk).await.map_err(HeadError::Io)?;
        if n == 0 {
            return Err(HeadError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        let scan_from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf[scan_from..].windows(4).position(|w| w == b"\r\n\r\n") {
            break scan_from + pos + 4;
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(HeadError::TooLarge);
        }
    };
    if end > MAX_HEAD_BYTES {
        return Err(HeadError::TooLarge);
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&buf[..end]) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HeadError::Bad("incomplete head".into())),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(e) => return Err(HeadError::Bad(e.to_string())),
    }
    Ok(Head {
        method: req.method.unwrap_or_default().to_string(),
        path: req.path.unwrap_or_default().to_string(),
        headers: req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect(),
        rest: buf[end..].to_vec(),
    })
}

/// Validates the upgrade request and writes `101 Switching Protocols`, choosing `preferred`
/// among the offered subprotocols, else the first one offered. On a bad request it writes the
/// error response and returns `None`.
pub async fn accept_upgrade(
    stream: &mut TcpStream,
    head: &Head,
    name: &str,
    preferred: &str,
) -> Option<Option<String>> {
    let fail = if head.method != "GET" {
        Some((405, "WebSocket upgrade needs GET\n"))
    } else if head.header("sec-websocket-version").map(str::trim) != Some("13") {
        Some((426, "Sec-WebSocket-Version 13 required\n"))
    } else if head
        .header("sec-websocket-key")
        .is_none_or(|k| k.trim().is_empty())
    {
        Some((400, "missing Sec-WebSocket-Key\n"))
    } else {
        None
    };
    if let Some((status, why)) = fail {
        let extra = [("Sec-WebSocket-Version", "13")];
        let _ = respond(
            stream,
            name,
            status,
            "text/plain",
            &extra,
            why.as_bytes(),
            false,
        )
        .await;
        return None;
    }
    let key = head.header("sec-websocket-key").unwrap_or_default().trim();
    let offered = head.tokens("sec-websocket-protocol");
    let protocol = offered
        .iter()
        .find(|p| **p == preferred)
        .or(offered.first())
        .map(|p| p.to_string());
    let mut resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\nX-Backend: {name}\r\n",
        derive_accept_key(key.as_bytes())
    );
    if let Some(p) = &protocol {
        resp.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
    }
    resp.push_str("\r\n");
    stream.write_all(resp.as_bytes()).await.ok()?;
    Some(protocol)
}

#[allow(clippy::too_many_arguments)]
pub async fn respond(
    stream: &mut TcpStream,
    name: &str,
    status: u16,
    content_type: &str,
    extra: &[(&str, &str)],
    body: &[u8],
    head_only: bool,
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        _ => "",
    };
    let mut resp = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\nX-Backend: {name}\r\n",
        body.len()
    );
    for (k, v) in extra {
        resp.push_str(&format!("{k}: {v}\r\n"));
    }
    resp.push_str("\r\n");
    let mut bytes = resp.into_bytes();
    if !head_only {
        bytes.extend_from_slice(body);
    }
    stream.write_all(&bytes).await?;
    stream.flush().await
}

/// Ends an HTTP exchange politely: half-close, then drain what the client still sends (briefly),
/// so that unread request bytes do not turn the close into a reset that eats the response.
pub async fn finish(mut stream: TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let mut sink = [0u8; 4096];
    let drain = async {
        let mut total = 0;
        while let Ok(n) = stream.read(&mut sink).await {
            total += n;
            if n == 0 || total > 1024 * 1024 {
                break;
            }
        }
    };
    let _ = timeout(Duration::from_secs(1), drain).await;
}
