//! Backend selection for a pool: one algorithm per file, each answering with an ordered list
//! of candidates (the pick first, then the fallbacks `connect_attempts` walks), in the shape
//! of pingora's `pingora-load-balancing`. Pure logic: no I/O, no async, no locks; the pool
//! actor owns the [`Balancer`] and feeds it a [`BackendView`] per backend at each selection.

pub mod ip_hash;
pub mod least_conn;
pub mod random_two;
pub mod round_robin;

use crate::config::Balance;
use std::cmp::Ordering;
use std::net::{IpAddr, SocketAddr};

/// What the balancer sees of one backend at selection time (position in the slice = backend
/// index, the same index as in the list given to [`Balancer::new`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendView {
    /// The backend's address.
    pub addr: SocketAddr,
    /// Its configured weight (at least 1 after config validation; 0 is treated as 1).
    pub weight: u32,
    /// Its live sessions.
    pub active: usize,
    /// Whether it may be selected (healthy and not passively ejected).
    pub up: bool,
}

/// A pool's balancer: one variant per algorithm of the `balance` setting.
#[derive(Debug, Clone)]
pub enum Balancer {
    /// Smooth weighted round robin (nginx).
    RoundRobin(round_robin::RoundRobin),
    /// Fewest live sessions per weight, ties by smooth weighted round robin (nginx).
    LeastConn(least_conn::LeastConn),
    /// Consistent hash of the client IP on a ketama-style ring.
    IpHash(ip_hash::IpHash),
    /// Power of two random choices on live sessions per weight.
    RandomTwo(random_two::RandomTwo),
}

impl Balancer {
    /// Builds the balancer for a pool's backend list (address, weight), in config order.
    pub fn new(kind: Balance, backends: &[(SocketAddr, u32)]) -> Balancer {
        match kind {
            Balance::RoundRobin => Balancer::RoundRobin(round_robin::RoundRobin::new(backends)),
            Balance::LeastConn => Balancer::LeastConn(least_conn::LeastConn::new(backends)),
            Balance::IpHash => Balancer::IpHash(ip_hash::IpHash::new(backends)),
            Balance::RandomTwo => Balancer::RandomTwo(random_two::RandomTwo::new(backends)),
        }
    }

    /// Indexes of backends to try, best first: only backends with `up == true`, each at most
    /// once, at most `max` of them (fewer if fewer are up; empty if none is up).
    /// `backends` has the same length and order as given to `new`.
    pub fn order(&mut self, backends: &[BackendView], client_ip: IpAddr, max: usize) -> Vec<usize> {
        match self {
            Balancer::RoundRobin(b) => b.order(backends, max),
            Balancer::LeastConn(b) => b.order(backends, max),
            Balancer::IpHash(b) => b.order(backends, client_ip, max),
            Balancer::RandomTwo(b) => b.order(backends, max),
        }
    }
}

/// A weight as used by the algorithms: config forbids 0, but never divide by or multiply with
/// it if it slips through.
pub(crate) fn weight_of(weight: u32) -> u32 {
    weight.max(1)
}

/// Compares the loads `active / weight` of two backends without floats or overflow
/// (`a.active * b.weight` vs `b.active * a.weight` in 128 bits).
pub(crate) fn cmp_load(a: &BackendView, b: &BackendView) -> Ordering {
    let left = a.active as u128 * u128::from(weight_of(b.weight));
    let right = b.active as u128 * u128::from(weight_of(a.weight));
    left.cmp(&right)
}

/// The up backends' indexes, ascending.
pub(crate) fn up_indexes(backends: &[BackendView]) -> Vec<usize> {
    backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.up)
        .map(|(i, _)| i)
        .collect()
}

/// Smooth weighted round robin (nginx's `ngx_http_upstream_get_peer`) over the backends in
/// `among`: every candidate's `current` grows by its weight, the largest (lowest index on a
/// tie) is chosen and loses the candidates' total. `current` is indexed like `backends` and
/// must be at least as long. Returns `None` when `among` is empty.
pub(crate) fn smooth_pick(
    current: &mut [i64],
    backends: &[BackendView],
    among: &[usize],
) -> Option<usize> {
    let mut total: i64 = 0;
    let mut best: Option<usize> = None;
    for &i in among {
        let w = i64::from(weight_of(backends[i].weight));
        current[i] = current[i].saturating_add(w);
        total = total.saturating_add(w);
        if best.is_none_or(|b| current[i] > current[b]) {
            best = Some(i);
        }
    }
    let chosen = best?;
    current[chosen] = current[chosen].saturating_sub(total);
    Some(chosen)
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Helpers shared by the algorithms' tests.

    use super::{BackendView, Balancer};
    use crate::config::Balance;
    use std::collections::HashSet;
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    /// Address of test backend `i`.
    pub fn addr(i: usize) -> SocketAddr {
        SocketAddr::from(([10, 0, (i / 256) as u8, (i % 256) as u8], 8000 + i as u16))
    }

    /// (address, weight) list for `new`.
    pub fn list(weights: &[u32]) -> Vec<(SocketAddr, u32)> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| (addr(i), w))
            .collect()
    }

    /// Views of the list, all up, no sessions.
    pub fn views(list: &[(SocketAddr, u32)]) -> Vec<BackendView> {
        list.iter()
            .map(|&(addr, weight)| BackendView {
                addr,
                weight,
                active: 0,
                up: true,
            })
            .collect()
    }

    /// Some client IP.
    pub fn ip() -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))
    }

    /// Asserts the `order` contract: indexes in range, up, distinct, at most `max`, and exactly
    /// `min(max, up count)` of them.
    pub fn check_contract(out: &[usize], views: &[BackendView], max: usize) {
        let up = views.iter().filter(|v| v.up).count();
        assert_eq!(
            out.len(),
            max.min(up),
            "length: {out:?}, max {max}, {up} up"
        );
        let mut seen = HashSet::new();
        for &i in out {
            assert!(i < views.len(), "index {i} out of range");
            assert!(views[i].up, "index {i} is down");
            assert!(seen.insert(i), "index {i} twice in {out:?}");
        }
    }

    /// All four algorithms, in `Balance` order.
    pub const ALL: [Balance; 4] = [
        Balance::RoundRobin,
        Balance::LeastConn,
        Balance::IpHash,
        Balance::RandomTwo,
    ];

    /// Runs `picks` selections through a fresh balancer and counts the first picks per index.
    pub fn first_pick_counts(kind: Balance, views: &[BackendView], picks: usize) -> Vec<usize> {
        let list: Vec<_> = views.iter().map(|v| (v.addr, v.weight)).collect();
        let mut b = Balancer::new(kind, &list);
        let mut counts = vec![0; views.len()];
        for _ in 0..picks {
            let out = b.order(views, ip(), 1);
            counts[out[0]] += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cmp_load_is_cross_multiplied() {
        let v = |active, weight| BackendView {
            addr: addr(0),
            weight,
            active,
            up: true,
        };
        assert_eq!(cmp_load(&v(2, 2), &v(1, 1)), Ordering::Equal);
        assert_eq!(cmp_load(&v(3, 2), &v(1, 1)), Ordering::Greater);
        assert_eq!(cmp_load(&v(1, 2), &v(1, 1)), Ordering::Less);
        assert_eq!(
            cmp_load(&v(usize::MAX, u32::MAX), &v(usize::MAX, u32::MAX)),
            Ordering::Equal
        );
        // weight 0 counts as 1 rather than making every load equal
        assert_eq!(cmp_load(&v(1, 0), &v(2, 0)), Ordering::Less);
    }

    #[test]
    fn every_algorithm_is_empty_when_none_is_up() {
        let list = list(&[1, 2, 3]);
        let mut views = views(&list);
        for v in &mut views {
            v.up = false;
        }
        for kind in ALL {
            let mut b = Balancer::new(kind, &list);
            assert!(b.order(&views, ip(), 3).is_empty(), "{kind:?}");
        }
    }

    #[test]
    fn every_algorithm_is_empty_with_max_zero_or_no_backends() {
        let list = list(&[1, 1]);
        let views = views(&list);
        for kind in ALL {
            let mut b = Balancer::new(kind, &list);
            assert!(b.order(&views, ip(), 0).is_empty(), "{kind:?}");
            let mut empty = Balancer::new(kind, &[]);
            assert!(empty.order(&[], ip(), 3).is_empty(), "{kind:?}");
        }
    }

    #[test]
    fn a_lone_up_backend_is_returned_alone() {
        let list = list(&[1, 1, 1]);
        let mut views = views(&list);
        views[0].up = false;
        views[2].up = false;
        for kind in ALL {
            let mut b = Balancer::new(kind, &list);
            for _ in 0..10 {
                assert_eq!(b.order(&views, ip(), 3), vec![1], "{kind:?}");
            }
        }
    }

    fn view_strategy() -> impl Strategy<Value = Vec<(u32, usize, bool)>> {
        prop::collection::vec((1u32..=5, 0usize..20, any::<bool>()), 0..10)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// (d): whatever the views, every algorithm returns up, distinct, in-range indexes,
        /// exactly min(max, up) of them, across repeated (stateful) calls.
        #[test]
        fn every_returned_index_is_up_and_distinct(
            spec in view_strategy(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), 0usize..5), 0..8),
            ips in prop::collection::vec(any::<u32>(), 1..8),
            max in 0usize..12,
        ) {
            let list: Vec<_> = spec.iter().enumerate().map(|(i, &(w, _, _))| (addr(i), w)).collect();
            let start: Vec<BackendView> = spec
                .iter()
                .enumerate()
                .map(|(i, &(weight, active, up))| BackendView { addr: addr(i), weight, active, up })
                .collect();
            for kind in ALL {
                let mut views = start.clone();
                let mut b = Balancer::new(kind, &list);
                for (round, &raw) in ips.iter().enumerate() {
                    let client = IpAddr::from(raw.to_be_bytes());
                    let out = b.order(&views, client, max);
                    check_contract(&out, &views, max);
                    // change the view between calls: flip health and bump a count
                    if let Some(&(idx, bump)) = flips.get(round) {
                        if !views.is_empty() {
                            let i = idx.index(views.len());
                            views[i].up = !views[i].up;
                            views[i].active += bump;
                        }
                    }
                }
            }
        }
    }
}
