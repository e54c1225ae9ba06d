//! Route matching (SPEC §2 "routes"): pure functions.

use crate::config::RouteConfig;

/// The index of the route for a request, or `None` (→ 404).
///
/// A route with `host` matches only that Host (port ignored, case-insensitive). Among the
/// matching routes the longest `path` prefix wins; at equal length a route with `host` beats
/// one without. Prefixes match whole path segments: `/chat` matches `/chat`, `/chat/x` and
/// `/chat?room=1`, not `/chatroom` (a route path ending in `/` matches anything under it).
pub fn match_route(routes: &[RouteConfig], host: Option<&str>, target: &str) -> Option<usize> {
    let path = target.split(['?', '#']).next().unwrap_or("");
    let host = host.map(host_without_port);
    let mut best: Option<(usize, usize, bool)> = None; // (index, path length, has host)
    for (i, r) in routes.iter().enumerate() {
        if let Some(rh) = &r.host {
            match host {
                Some(h) if h.eq_ignore_ascii_case(rh) => {}
                _ => continue,
            }
        }
        if !path_matches(&r.path, path) {
            continue;
        }
        let cand = (i, r.path.len(), r.host.is_some());
        best = match best {
            Some(b) if (b.1, b.2) >= (cand.1, cand.2) => Some(b),
            _ => Some(cand),
        };
    }
    best.map(|b| b.0)
}

fn path_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// `example.com:8020` → `example.com`, `[::1]:8020` → `::1`.
pub fn host_without_port(host: &str) -> &str {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(path: &str, host: Option<&str>) -> RouteConfig {
        RouteConfig {
            path: path.into(),
            pool: "p".into(),
            host: host.map(Into::into),
        }
    }

    #[test]
    fn longest_prefix_wins() {
        let routes = [r("/", None), r("/chat", None), r("/chat/admin", None)];
        assert_eq!(match_route(&routes, None, "/chat/admin/x"), Some(2));
        assert_eq!(match_route(&routes, None, "/chat?room=1"), Some(1));
        assert_eq!(match_route(&routes, None, "/chat/"), Some(1));
        assert_eq!(match_route(&routes, None, "/other"), Some(0));
    }

    #[test]
    fn segments_not_substrings() {
        let routes = [r("/chat", None)];
        assert_eq!(match_route(&routes, None, "/chatroom"), None);
        assert_eq!(match_route(&routes, None, "/"), None);
        let routes = [r("/static/", None)];
        assert_eq!(match_route(&routes, None, "/static/app.js"), Some(0));
    }

    #[test]
    fn host_routes() {
        let routes = [r("/ticker", None), r("/ticker", Some("localhost"))];
        assert_eq!(
            match_route(&routes, Some("LOCALHOST:8020"), "/ticker"),
            Some(1)
        );
        assert_eq!(
            match_route(&routes, Some("127.0.0.1:8020"), "/ticker"),
            Some(0)
        );
        assert_eq!(match_route(&routes, None, "/ticker"), Some(0));
        let only_host = [r("/a", Some("example.com"))];
        assert_eq!(match_route(&only_host, Some("other.com"), "/a"), None);
        // A longer generic prefix still beats a shorter host route.
        let routes = [r("/a", Some("h")), r("/a/b", None)];
        assert_eq!(match_route(&routes, Some("h"), "/a/b"), Some(1));
    }

    #[test]
    fn ports_and_ipv6() {
        assert_eq!(host_without_port("[::1]:8020"), "::1");
        assert_eq!(host_without_port("example.com"), "example.com");
        assert_eq!(host_without_port("example.com:80"), "example.com");
    }
}
