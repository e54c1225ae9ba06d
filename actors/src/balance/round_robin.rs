//! `round_robin`: nginx's smooth weighted round robin.
//!
//! Every selection, each up backend's current weight grows by its weight, the largest wins
//! (lowest index on a tie) and loses the up backends' total weight. Over any window of
//! `total weight` consecutive picks with a stable set of up backends each backend is picked
//! exactly `weight` times, interleaved (2:1 gives a,b,a,a,b,a…, not a,a,…,b,b). Down backends
//! keep their current weight frozen and take no part until they are up again.

use super::{smooth_pick, up_indexes, weight_of, BackendView};
use std::net::SocketAddr;

/// Smooth weighted round robin state: one current weight per backend.
#[derive(Debug, Clone)]
pub struct RoundRobin {
    current: Vec<i64>,
}

impl RoundRobin {
    /// A fresh rotation over `backends` (address, weight), in config order.
    pub fn new(backends: &[(SocketAddr, u32)]) -> RoundRobin {
        RoundRobin {
            current: vec![0; backends.len()],
        }
    }

    /// The pick (advancing the rotation), then the other up backends in the order the next
    /// rotation step would rank them (descending current + weight, lowest index on a tie).
    /// At most `max` indexes; `max == 0` or no up backend leaves the rotation untouched.
    pub fn order(&mut self, backends: &[BackendView], max: usize) -> Vec<usize> {
        let up = up_indexes(backends);
        if max == 0 || up.is_empty() {
            return Vec::new();
        }
        // `backends` matches the list given to `new`; stay total if it does not.
        self.current.resize(backends.len(), 0);
        let Some(pick) = smooth_pick(&mut self.current, backends, &up) else {
            return Vec::new();
        };
        let mut rest: Vec<usize> = up.into_iter().filter(|&i| i != pick).collect();
        rest.sort_by_key(|&i| {
            let next = self.current[i].saturating_add(i64::from(weight_of(backends[i].weight)));
            (std::cmp::Reverse(next), i)
        });
        let mut out = Vec::with_capacity(max.min(rest.len() + 1));
        out.push(pick);
        out.extend(rest.into_iter().take(max - 1));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;
    use crate::config::Balance;

    fn picks(rr: &mut RoundRobin, views: &[BackendView], n: usize) -> Vec<usize> {
        (0..n).map(|_| rr.order(views, 1)[0]).collect()
    }

    #[test]
    fn equal_weights_split_sixty_picks_twenty_each() {
        let list = list(&[1, 1, 1]);
        let views = views(&list);
        assert_eq!(
            first_pick_counts(Balance::RoundRobin, &views, 60),
            vec![20, 20, 20]
        );
        let mut rr = RoundRobin::new(&list);
        assert_eq!(picks(&mut rr, &views, 6), vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn two_to_one_is_forty_twenty_and_smooth() {
        let list = list(&[2, 1]);
        let views = views(&list);
        assert_eq!(
            first_pick_counts(Balance::RoundRobin, &views, 60),
            vec![40, 20]
        );
        let mut rr = RoundRobin::new(&list);
        let seq = picks(&mut rr, &views, 60);
        assert_eq!(&seq[..6], &[0, 1, 0, 0, 1, 0]);
        // smooth: never more than two of `a` in a row, never two `b` in a row
        for w in seq.windows(3) {
            assert!(w != [0, 0, 0], "{seq:?}");
        }
        for w in seq.windows(2) {
            assert!(w != [1, 1], "{seq:?}");
        }
    }

    #[test]
    fn five_one_one_is_nginx_sequence() {
        // the example from nginx's commit introducing smooth weighted round robin
        let list = list(&[5, 1, 1]);
        let views = views(&list);
        let mut rr = RoundRobin::new(&list);
        assert_eq!(picks(&mut rr, &views, 7), vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn down_backends_are_skipped_and_the_rest_stay_even() {
        let list = list(&[1, 1, 1]);
        let mut views = views(&list);
        views[1].up = false;
        let counts = first_pick_counts(Balance::RoundRobin, &views, 60);
        assert_eq!(counts, vec![30, 0, 30]);
        let mut rr = RoundRobin::new(&list);
        for _ in 0..20 {
            let out = rr.order(&views, 3);
            check_contract(&out, &views, 3);
        }
    }

    #[test]
    fn fallbacks_are_the_other_up_backends_next_pick_first() {
        let list = list(&[1, 1, 1, 1]);
        let mut views = views(&list);
        views[3].up = false;
        let mut rr = RoundRobin::new(&list);
        // first pick 0; the next rotation step would pick 1, then 2
        assert_eq!(rr.order(&views, 10), vec![0, 1, 2]);
        assert_eq!(rr.order(&views, 10), vec![1, 2, 0]);
        assert_eq!(rr.order(&views, 2), vec![2, 0]);
    }

    #[test]
    fn max_is_respected() {
        let list = list(&[1, 2, 3, 4]);
        let views = views(&list);
        let mut rr = RoundRobin::new(&list);
        for max in 0..6 {
            let out = rr.order(&views, max);
            check_contract(&out, &views, max);
        }
    }

    #[test]
    fn a_backend_coming_back_rejoins_the_rotation() {
        let list = list(&[1, 1]);
        let mut views = views(&list);
        let mut rr = RoundRobin::new(&list);
        views[1].up = false;
        assert_eq!(picks(&mut rr, &views, 4), vec![0, 0, 0, 0]);
        views[1].up = true;
        let seq = picks(&mut rr, &views, 20);
        assert_eq!(seq.iter().filter(|&&i| i == 1).count(), 10, "{seq:?}");
    }

    #[test]
    fn a_mismatched_view_does_not_panic() {
        let mut rr = RoundRobin::new(&list(&[1]));
        let views = views(&list(&[1, 1, 1]));
        let out = rr.order(&views, 3);
        check_contract(&out, &views, 3);
    }
}
