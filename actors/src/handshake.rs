//! The HTTP side of a session: reading the client's upgrade request head, checking it,
//! building the upstream request, and answering the client. Pure functions where possible.

/// Headers the gateway writes itself toward a backend: hop-by-hop headers (RFC 9110 §7.6.1)
/// and the WebSocket handshake's own. They are never copied from the client or `headers.set`.
pub fn is_reserved_upstream_header(name: &str) -> bool {
    const RESERVED: &[&str] = &[
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-accept",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
    ];
    RESERVED.iter().any(|r| r.eq_ignore_ascii_case(name))
}
