//! `least_conn`: fewest live sessions per weight, as nginx's `least_conn`.
//!
//! The pick is the up backend with the lowest `active / weight` (compared cross-multiplied, no
//! floats); ties among several are broken by smooth weighted round robin over the tied ones
//! only, so that with equal counts the picks still spread by weight. The fallbacks are the
//! remaining up backends by ascending load (lowest index on a tie).

use super::{cmp_load, smooth_pick, up_indexes, BackendView};
use std::cmp::Ordering;
use std::net::SocketAddr;

/// Least-connections state: the tie-breaking round robin's current weights.
#[derive(Debug, Clone)]
pub struct LeastConn {
    current: Vec<i64>,
}

impl LeastConn {
    /// A fresh balancer over `backends` (address, weight), in config order.
    pub fn new(backends: &[(SocketAddr, u32)]) -> LeastConn {
        LeastConn {
            current: vec![0; backends.len()],
        }
    }

    /// The least-loaded up backend (round robin among ties), then the other up backends by
    /// ascending load; at most `max` indexes.
    pub fn order(&mut self, backends: &[BackendView], max: usize) -> Vec<usize> {
        let mut up = up_indexes(backends);
        if max == 0 || up.is_empty() {
            return Vec::new();
        }
        self.current.resize(backends.len(), 0);
        // stable: equal loads keep ascending index order
        up.sort_by(|&a, &b| cmp_load(&backends[a], &backends[b]));
        let tied = up
            .iter()
            .take_while(|&&i| cmp_load(&backends[i], &backends[up[0]]) == Ordering::Equal)
            .count();
        let pick = if tied == 1 {
            up[0]
        } else {
            match smooth_pick(&mut self.current, backends, &up[..tied]) {
                Some(i) => i,
                None => return Vec::new(),
            }
        };
        let mut out = Vec::with_capacity(max.min(up.len()));
        out.push(pick);
        out.extend(up.into_iter().filter(|&i| i != pick).take(max - 1));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;
    use crate::config::Balance;

    #[test]
    fn equal_counts_spread_evenly() {
        let list = list(&[1, 1, 1]);
        let views = views(&list);
        assert_eq!(
            first_pick_counts(Balance::LeastConn, &views, 60),
            vec![20, 20, 20]
        );
    }

    #[test]
    fn equal_counts_spread_by_weight() {
        let list = list(&[2, 1]);
        let views = views(&list);
        assert_eq!(
            first_pick_counts(Balance::LeastConn, &views, 60),
            vec![40, 20]
        );
    }

    #[test]
    fn follows_the_counts() {
        let list = list(&[1, 1, 1]);
        let mut views = views(&list);
        views[0].active = 5;
        views[1].active = 2;
        views[2].active = 7;
        let mut lc = LeastConn::new(&list);
        assert_eq!(lc.order(&views, 3), vec![1, 0, 2]);
        assert_eq!(lc.order(&views, 1), vec![1]);
    }

    #[test]
    fn follows_the_weights() {
        // 4/2 = 2 beats 3/1 = 3; 6/3 = 2 ties with 4/2
        let list = list(&[2, 1, 3]);
        let mut views = views(&list);
        views[0].active = 4;
        views[1].active = 3;
        views[2].active = 6;
        let mut lc = LeastConn::new(&list);
        let mut firsts = Vec::new();
        for _ in 0..5 {
            let out = lc.order(&views, 3);
            assert_eq!(out[2], 1, "{out:?}");
            firsts.push(out[0]);
        }
        // the tie between 0 (weight 2) and 2 (weight 3) goes round robin 2:3
        assert_eq!(firsts.iter().filter(|&&i| i == 0).count(), 2, "{firsts:?}");
        assert_eq!(firsts.iter().filter(|&&i| i == 2).count(), 3, "{firsts:?}");
    }

    #[test]
    fn simulated_sessions_converge_to_the_weights() {
        // every pick opens a session that never closes: counts end proportional to weights
        let list = list(&[1, 2, 3]);
        let mut views = views(&list);
        let mut lc = LeastConn::new(&list);
        for _ in 0..600 {
            let i = lc.order(&views, 1)[0];
            views[i].active += 1;
        }
        let counts: Vec<usize> = views.iter().map(|v| v.active).collect();
        assert_eq!(counts, vec![100, 200, 300]);
    }

    #[test]
    fn down_backends_are_skipped_even_if_idle() {
        let list = list(&[1, 1, 1]);
        let mut views = views(&list);
        views[0].up = false;
        views[1].active = 9;
        views[2].active = 3;
        let mut lc = LeastConn::new(&list);
        assert_eq!(lc.order(&views, 3), vec![2, 1]);
    }

    #[test]
    fn max_is_respected() {
        let list = list(&[1, 2, 3, 4]);
        let mut views = views(&list);
        views[2].active = 1;
        let mut lc = LeastConn::new(&list);
        for max in 0..6 {
            let out = lc.order(&views, max);
            check_contract(&out, &views, max);
        }
    }
}
