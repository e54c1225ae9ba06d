//! PROXY protocol v1 and v2 (HAProxy's spec) on listeners with `proxy_protocol: true`: an L4
//! balancer in front sends the real client address first. Parsing is the `ppp` crate's; this
//! file only reads exactly the header's bytes off the socket (peek, parse, consume), so what
//! follows it — a TLS ClientHello or the HTTP request — is left untouched.

use crate::rt::{self, TcpStream};
use futures::AsyncReadExt;
use ppp::{v1, v2, HeaderResult, PartialResult};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// v2's 16-byte prefix plus a generous address/TLV block; v1 is at most 107 bytes.
const MAX_HEADER: usize = 536;

/// Reads the PROXY header at the start of `stream`. `Ok(Some(addr))` is the client address it
/// carries; `Ok(None)` a LOCAL/UNKNOWN header (a health check of the balancer itself: the
/// connection's own peer stays the client). `Err` means no valid header: close the connection.
pub async fn read(stream: &mut TcpStream) -> Result<Option<SocketAddr>, String> {
    let mut buf = [0u8; MAX_HEADER];
    loop {
        let n = stream
            .peek(&mut buf)
            .await
            .map_err(|e| format!("PROXY header: {e}"))?;
        if n == 0 {
            return Err("PROXY header: connection closed".into());
        }
        let parsed = HeaderResult::parse(&buf[..n]);
        if parsed.is_incomplete() {
            if n == MAX_HEADER {
                return Err("PROXY header: too long".into());
            }
            // The rest of the header is still in flight: wait a moment for it (bounded by
            // the caller's handshake timeout) rather than spin on peek.
            rt::sleep(Duration::from_millis(2)).await;
            continue;
        }
        let (len, addr) = match parsed {
            HeaderResult::V1(Ok(h)) => (h.header.len(), v1_source(&h.addresses)),
            HeaderResult::V2(Ok(h)) => (h.len(), v2_source(&h)),
            HeaderResult::V1(Err(e)) => return Err(format!("PROXY header: {e}")),
            HeaderResult::V2(Err(e)) => return Err(format!("PROXY header: {e}")),
        };
        let mut consume = vec![0u8; len];
        stream
            .read_exact(&mut consume)
            .await
            .map_err(|e| format!("PROXY header: {e}"))?;
        return Ok(addr);
    }
}

fn v1_source(a: &v1::Addresses) -> Option<SocketAddr> {
    match a {
        v1::Addresses::Tcp4(ip) => Some(SocketAddr::new(
            IpAddr::V4(ip.source_address),
            ip.source_port,
        )),
        v1::Addresses::Tcp6(ip) => Some(SocketAddr::new(
            IpAddr::V6(ip.source_address),
            ip.source_port,
        )),
        v1::Addresses::Unknown => None,
    }
}

fn v2_source(h: &v2::Header<'_>) -> Option<SocketAddr> {
    if h.command == v2::Command::Local {
        return None;
    }
    match &h.addresses {
        v2::Addresses::IPv4(ip) => Some(SocketAddr::new(
            IpAddr::V4(ip.source_address),
            ip.source_port,
        )),
        v2::Addresses::IPv6(ip) => Some(SocketAddr::new(
            IpAddr::V6(ip.source_address),
            ip.source_port,
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::AsyncWriteExt;

    /// Sends `bytes` to a fresh loopback connection and reads the PROXY header off it.
    fn roundtrip(bytes: &'static [u8]) -> (Result<Option<SocketAddr>, String>, Vec<u8>) {
        rt::block_on(async move {
            let l = rt::TcpListener::bind("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap();
            let addr = l.local_addr().unwrap();
            let w = rt::spawn(async move {
                let mut c = TcpStream::connect(addr).await.unwrap();
                c.write_all(bytes).await.unwrap();
                c.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
                c
            });
            let (mut s, _) = l.accept().await.unwrap();
            let _keep = w.await;
            let r = read(&mut s).await;
            let mut rest = vec![0u8; 16];
            if r.is_ok() {
                s.read_exact(&mut rest).await.unwrap();
            }
            (r, rest)
        })
    }

    #[test]
    fn v1_tcp4() {
        let (r, rest) = roundtrip(b"PROXY TCP4 192.0.2.7 127.0.0.1 56324 8020\r\n");
        assert_eq!(r.unwrap(), Some("192.0.2.7:56324".parse().unwrap()));
        assert_eq!(
            rest, b"GET / HTTP/1.1\r\n",
            "bytes after the header are untouched"
        );
    }

    #[test]
    fn v2_tcp4() {
        const H: &[u8] = &[
            0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54,
            0x0A, // signature
            0x21, 0x11, 0x00, 0x0C, // v2 PROXY, TCP over IPv4, 12 bytes
            198, 51, 100, 9, 127, 0, 0, 1, 0xC3, 0x50, 0x1F,
            0x54, // 198.51.100.9:50000 -> :8020
        ];
        let (r, rest) = roundtrip(H);
        assert_eq!(r.unwrap(), Some("198.51.100.9:50000".parse().unwrap()));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");
    }

    #[test]
    fn missing_header_is_an_error() {
        let (r, _) = roundtrip(b"GET /chat HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(r.is_err());
    }

    #[test]
    fn v1_unknown_keeps_the_peer() {
        let (r, _) = roundtrip(b"PROXY UNKNOWN\r\n");
        assert_eq!(r.unwrap(), None);
    }
}
