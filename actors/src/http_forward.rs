//! Plain HTTP/1.1 pass-through for pools with `"http": true`, so an app's page and its
//! socket share one origin. One request per client connection: the gateway asks the backend
//! for `Connection: close`, streams the response back until the backend closes, then closes.
//! Request bodies are framed by `Content-Length` or by chunked encoding, whose chunk-size
//! lines and trailers are parsed by httparse; bodies pass through unchanged.

use crate::handshake::{
    is_hop_by_hop, put_client_fields, put_field, read_response_head, ClientInfo, RequestHead,
};
use crate::transport::{BackendStream, ClientStream};
use futures::{AsyncReadExt, AsyncWriteExt};

const CHUNK: usize = 16 * 1024;
const MAX_LINE: usize = 8 * 1024;

/// How a request body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    None,
    Length(u64),
    Chunked,
}

/// The body framing of a request (RFC 9112 §6.3), or `Err` for an ambiguous or bad one.
pub fn body_of(head: &RequestHead) -> Result<Body, String> {
    let chunked = head.header_has_token("transfer-encoding", "chunked");
    let lengths: Vec<&str> = head
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .filter_map(|(_, v)| std::str::from_utf8(v).ok())
        .collect();
    match (chunked, lengths.as_slice()) {
        (true, []) => Ok(Body::Chunked),
        (true, _) => Err("both Transfer-Encoding and Content-Length".into()),
        (false, []) if head.header("transfer-encoding").is_some() => {
            Err("unsupported Transfer-Encoding".into())
        }
        (false, []) => Ok(Body::None),
        (false, [one]) => one
            .trim()
            .parse()
            .map(Body::Length)
            .map_err(|_| "bad Content-Length".into()),
        (false, _) => Err("several Content-Length headers".into()),
    }
}

/// The request head sent to the backend: method and target as the client sent them, its
/// end-to-end headers, `X-Forwarded-*` and `headers.set` as for an upgrade
/// ([`put_client_fields`]), and `Connection: close`.
pub fn request_head(
    head: &RequestHead,
    client: ClientInfo,
    cfg: &crate::config::HeadersConfig,
) -> Vec<u8> {
    let mut out = format!("{} {} HTTP/1.1\r\n", head.method(), head.target()).into_bytes();
    put_client_fields(&mut out, head, client, cfg, |_| false);
    put_field(&mut out, "Connection", b"close");
    out.extend_from_slice(b"\r\n");
    out
}

/// Forwards one request and streams the response back. `pending` holds body bytes the client
/// sent along with its head. Returns the backend's status code.
pub async fn forward(
    client: &mut ClientStream,
    backend: &mut BackendStream,
    head_bytes: &[u8],
    body: Body,
    pending: Vec<u8>,
) -> Result<u16, String> {
    backend
        .write_all(head_bytes)
        .await
        .map_err(|e| format!("backend: {e}"))?;
    match body {
        Body::None => {}
        Body::Length(n) => copy_exact(client, backend, pending, n).await?,
        Body::Chunked => copy_chunked(client, backend, pending).await?,
    }
    backend.flush().await.map_err(|e| format!("backend: {e}"))?;
    relay_response(backend, client).await
}

/// Copies exactly `n` body bytes: first those already read, then from the client.
async fn copy_exact(
    client: &mut ClientStream,
    backend: &mut BackendStream,
    pending: Vec<u8>,
    n: u64,
) -> Result<(), String> {
    let first = pending.len().min(n as usize);
    backend
        .write_all(&pending[..first])
        .await
        .map_err(|e| format!("backend: {e}"))?;
    let mut left = n - first as u64;
    let mut buf = vec![0u8; CHUNK];
    while left > 0 {
        let want = buf.len().min(left as usize);
        let got = client
            .read(&mut buf[..want])
            .await
            .map_err(|e| format!("client: {e}"))?;
        if got == 0 {
            return Err("client closed before the end of its body".into());
        }
        backend
            .write_all(&buf[..got])
            .await
            .map_err(|e| format!("backend: {e}"))?;
        left -= got as u64;
    }
    Ok(())
}

/// Copies a chunked body unchanged, using httparse to find each chunk-size line and the end
/// of the trailers.
async fn copy_chunked(
    client: &mut ClientStream,
    backend: &mut BackendStream,
    mut buf: Vec<u8>,
) -> Result<(), String> {
    let mut scratch = vec![0u8; CHUNK];
    loop {
        let (line, size) = loop {
            match httparse::parse_chunk_size(&buf) {
                Ok(httparse::Status::Complete(found)) => break found,
                Ok(httparse::Status::Partial) if buf.len() < MAX_LINE => {
                    fill(client, &mut buf, &mut scratch).await?;
                }
                _ => return Err("malformed chunk size".into()),
            }
        };
        backend
            .write_all(&buf[..line])
            .await
            .map_err(|e| format!("backend: {e}"))?;
        buf.drain(..line);
        if size == 0 {
            // Trailers (possibly none), ended by an empty line.
            loop {
                let mut headers = [httparse::EMPTY_HEADER; 32];
                match httparse::parse_headers(&buf, &mut headers) {
                    Ok(httparse::Status::Complete((n, _))) => {
                        backend
                            .write_all(&buf[..n])
                            .await
                            .map_err(|e| format!("backend: {e}"))?;
                        return Ok(());
                    }
                    Ok(httparse::Status::Partial) if buf.len() < MAX_LINE => {
                        fill(client, &mut buf, &mut scratch).await?;
                    }
                    _ => return Err("malformed trailers".into()),
                }
            }
        }
        // The chunk's data and its CRLF.
        let mut need = size.saturating_add(2);
        while need > 0 {
            if buf.is_empty() {
                fill(client, &mut buf, &mut scratch).await?;
            }
            let n = buf.len().min(usize::try_from(need).unwrap_or(usize::MAX));
            backend
                .write_all(&buf[..n])
                .await
                .map_err(|e| format!("backend: {e}"))?;
            buf.drain(..n);
            need -= n as u64;
        }
    }
}

async fn fill(
    client: &mut ClientStream,
    buf: &mut Vec<u8>,
    scratch: &mut [u8],
) -> Result<(), String> {
    let n = client
        .read(scratch)
        .await
        .map_err(|e| format!("client: {e}"))?;
    if n == 0 {
        return Err("client closed inside its chunked body".into());
    }
    buf.extend_from_slice(&scratch[..n]);
    Ok(())
}

/// Reads the response head, rewrites its hop-by-hop headers (`Connection: close`), and
/// streams everything after it until the backend closes.
async fn relay_response(
    backend: &mut BackendStream,
    client: &mut ClientStream,
) -> Result<u16, String> {
    let mut buf = Vec::with_capacity(4096);
    let mut scratch = vec![0u8; CHUNK];
    let (resp, body_start) = read_response_head(backend, &mut buf)
        .await
        .map_err(|e| format!("backend response: {e}"))?;
    let status = resp.status;
    let mut head = format!("HTTP/1.1 {status} {}\r\n", resp.reason()).into_bytes();
    for (name, value) in resp.headers.iter().filter(|(n, _)| !is_hop_by_hop(n)) {
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"Connection: close\r\n\r\n");
    client
        .write_all(&head)
        .await
        .map_err(|e| format!("client: {e}"))?;
    client
        .write_all(&buf[body_start..])
        .await
        .map_err(|e| format!("client: {e}"))?;
    loop {
        let n = backend
            .read(&mut scratch)
            .await
            .map_err(|e| format!("backend: {e}"))?;
        if n == 0 {
            break;
        }
        client
            .write_all(&scratch[..n])
            .await
            .map_err(|e| format!("client: {e}"))?;
    }
    client.flush().await.map_err(|e| format!("client: {e}"))?;
    let _ = client.close().await;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::upstream_request;

    fn head(headers: &[(&str, &str)]) -> RequestHead {
        RequestHead::new("POST", "/echo?x=1", 1, headers.iter().copied())
    }

    #[test]
    fn body_framing() {
        assert_eq!(body_of(&head(&[])), Ok(Body::None));
        assert_eq!(
            body_of(&head(&[("Content-Length", "12")])),
            Ok(Body::Length(12))
        );
        assert_eq!(
            body_of(&head(&[("Transfer-Encoding", "gzip, chunked")])),
            Ok(Body::Chunked)
        );
        assert!(body_of(&head(&[
            ("Transfer-Encoding", "chunked"),
            ("Content-Length", "3")
        ]))
        .is_err());
        assert!(body_of(&head(&[("Content-Length", "3"), ("Content-Length", "4")])).is_err());
        assert!(body_of(&head(&[("Content-Length", "x")])).is_err());
    }

    #[test]
    fn request_head_rewrites_hop_by_hop() {
        let h = head(&[
            ("Host", "gw:8020"),
            ("Connection", "keep-alive, X-Private"),
            ("X-Private", "1"),
            ("Content-Length", "2"),
        ]);
        let client = ClientInfo {
            ip: "127.0.0.5".parse().unwrap(),
            tls: false,
        };
        let out = String::from_utf8(request_head(&h, client, &Default::default())).unwrap();
        assert!(out.starts_with("POST /echo?x=1 HTTP/1.1\r\n"));
        assert!(out.contains("Host: gw:8020\r\n") && out.contains("Content-Length: 2\r\n"));
        assert!(
            out.contains("X-Forwarded-For: 127.0.0.5\r\n")
                && out.contains("X-Forwarded-Host: gw:8020\r\n")
        );
        assert!(!out.contains("X-Private") && !out.contains("keep-alive"));
        assert!(out.ends_with("Connection: close\r\n\r\n"));
    }

    /// The same rules as the upgrade request (`handshake::put_client_fields`): every
    /// X-Forwarded-For the client sent, joined, and no X-Forwarded-Host without a Host.
    #[test]
    fn request_head_forwards_as_an_upgrade_does() {
        let h = head(&[
            ("X-Forwarded-For", "203.0.113.9"),
            ("X-Forwarded-For", " "),
            ("X-Forwarded-For", "10.0.0.1, 10.0.0.2"),
            ("X-Forwarded-Host", "spoofed"),
        ]);
        let client = ClientInfo {
            ip: "127.0.0.5".parse().unwrap(),
            tls: true,
        };
        let out = String::from_utf8(request_head(&h, client, &Default::default())).unwrap();
        let xff = "X-Forwarded-For: 203.0.113.9, 10.0.0.1, 10.0.0.2, 127.0.0.5\r\n";
        assert_eq!(out.matches("X-Forwarded-For").count(), 1, "{out}");
        assert!(out.contains(xff), "{out}");
        assert!(out.contains("X-Forwarded-Proto: https\r\n"), "{out}");
        assert!(!out.contains("X-Forwarded-Host"), "{out}");
        let mut ws = Vec::new();
        let to = ([127, 0, 0, 1], 9).into();
        upstream_request(&mut ws, &h, to, client, &Default::default(), false);
        let ws = String::from_utf8(ws).unwrap();
        assert!(ws.contains(xff) && !ws.contains("X-Forwarded-Host"), "{ws}");
    }
}
