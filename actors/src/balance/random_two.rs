//! `random_two`: the power of two random choices on live sessions.
//!
//! Two distinct up backends are sampled by weight (the second among the rest); the pick is the
//! one with the lower `active / weight`, the first sampled on a tie. The fallbacks are the
//! remaining up backends by ascending load, ties in random order so that retries spread too.
//! With a single up backend it is returned alone.

use super::{cmp_load, up_indexes, weight_of, BackendView};
use std::cmp::Ordering;
use std::net::SocketAddr;

/// Power-of-two-choices state: its own random generator.
#[derive(Debug, Clone)]
pub struct RandomTwo {
    rng: fastrand::Rng,
}

impl RandomTwo {
    /// A balancer over `backends` (address, weight), in config order, seeded from the
    /// thread's generator.
    pub fn new(_backends: &[(SocketAddr, u32)]) -> RandomTwo {
        RandomTwo {
            rng: fastrand::Rng::new(),
        }
    }

    /// A balancer with a fixed seed, for reproducible runs.
    pub fn with_seed(seed: u64) -> RandomTwo {
        RandomTwo {
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    /// The less loaded of two up backends sampled by weight, then the other up backends by
    /// ascending load; at most `max` indexes.
    pub fn order(&mut self, backends: &[BackendView], max: usize) -> Vec<usize> {
        let mut up = up_indexes(backends);
        if max == 0 || up.is_empty() {
            return Vec::new();
        }
        let pick = if up.len() == 1 {
            up[0]
        } else {
            let first = self.sample(backends, &up);
            let rest: Vec<usize> = up.iter().copied().filter(|&i| i != first).collect();
            let second = self.sample(backends, &rest);
            match cmp_load(&backends[second], &backends[first]) {
                Ordering::Less => second,
                _ => first,
            }
        };
        up.retain(|&i| i != pick);
        self.rng.shuffle(&mut up);
        up.sort_by(|&a, &b| cmp_load(&backends[a], &backends[b]));
        let mut out = Vec::with_capacity(max.min(up.len() + 1));
        out.push(pick);
        out.extend(up.into_iter().take(max - 1));
        out
    }

    /// One index of `among` (not empty), with probability proportional to its weight.
    fn sample(&mut self, backends: &[BackendView], among: &[usize]) -> usize {
        let total: u64 = among
            .iter()
            .map(|&i| u64::from(weight_of(backends[i].weight)))
            .sum();
        let mut point = self.rng.u64(0..total.max(1));
        for &i in among {
            let w = u64::from(weight_of(backends[i].weight));
            if point < w {
                return i;
            }
            point -= w;
        }
        // unreachable with a non-empty `among`; stay total anyway
        among.last().copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn prefers_the_less_loaded() {
        let list = list(&[1, 1]);
        let mut views = views(&list);
        views[0].active = 10;
        views[1].active = 3;
        let mut r = RandomTwo::with_seed(7);
        // with two up backends both are always sampled, so the idle one always wins
        for _ in 0..100 {
            assert_eq!(r.order(&views, 2), vec![1, 0]);
        }
    }

    #[test]
    fn the_most_loaded_of_many_is_never_the_pick() {
        // the pick beats another sampled backend, so the strictly busiest can never win
        let list = list(&[1, 1, 1, 1, 1]);
        let mut views = views(&list);
        views[3].active = 50;
        let mut r = RandomTwo::with_seed(11);
        let mut counts = [0usize; 5];
        for _ in 0..1000 {
            let out = r.order(&views, 5);
            check_contract(&out, &views, 5);
            assert_eq!(
                out[4], 3,
                "busiest backend must be the last fallback: {out:?}"
            );
            counts[out[0]] += 1;
        }
        assert_eq!(counts[3], 0);
        for (i, &c) in counts.iter().enumerate() {
            if i != 3 {
                assert!((200..=300).contains(&c), "{counts:?}");
            }
        }
    }

    #[test]
    fn simulated_sessions_stay_balanced() {
        let list = list(&[1, 1, 1, 1]);
        let mut views = views(&list);
        let mut r = RandomTwo::with_seed(3);
        for _ in 0..4000 {
            let i = r.order(&views, 1)[0];
            views[i].active += 1;
        }
        for v in &views {
            assert!((900..=1100).contains(&v.active), "{views:?}");
        }
    }

    #[test]
    fn weights_bias_the_sampling() {
        let list = list(&[3, 1]);
        let mut views = views(&list);
        let mut r = RandomTwo::with_seed(5);
        for _ in 0..4000 {
            let i = r.order(&views, 1)[0];
            views[i].active += 1;
        }
        // load per weight is kept level: ~3000 / ~1000
        assert!((2800..=3200).contains(&views[0].active), "{views:?}");
    }

    #[test]
    fn down_backends_are_skipped_and_max_is_respected() {
        let list = list(&[1, 2, 3, 4]);
        let mut views = views(&list);
        views[1].up = false;
        views[2].active = 4;
        let mut r = RandomTwo::with_seed(1);
        for max in 0..6 {
            for _ in 0..20 {
                let out = r.order(&views, max);
                check_contract(&out, &views, max);
            }
        }
        views[0].up = false;
        views[3].up = false;
        assert_eq!(r.order(&views, 3), vec![2]);
    }

    #[test]
    fn fallbacks_ascend_by_load() {
        let list = list(&[1, 1, 1, 1]);
        let mut views = views(&list);
        for (i, v) in views.iter_mut().enumerate() {
            v.active = 10 * i;
        }
        let mut r = RandomTwo::with_seed(9);
        for _ in 0..50 {
            let out = r.order(&views, 4);
            let rest: Vec<usize> = out[1..].to_vec();
            let mut sorted = rest.clone();
            sorted.sort_unstable();
            assert_eq!(rest, sorted, "{out:?}");
        }
    }
}
