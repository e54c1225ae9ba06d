//! `ip_hash`: consistent hashing of the client IP on a ketama-style ring.
//!
//! Each backend owns `POINTS_PER_WEIGHT × weight` points on a 64-bit ring; a point's position
//! is a stable hash (FNV-1a 64, then the splitmix64 finalizer) of a canonical byte encoding of
//! the backend's address and the point's number, and of nothing else. The ring therefore
//! depends only on the configured (address, weight) list — not on start order, process state
//! or the Rust version — so two gateways with the same config send a client to the same
//! backend. A client's key is the same hash of its IP's bytes; the pick is the owner of the
//! first point clockwise from the key whose backend is up, the fallbacks the next distinct up
//! owners along the ring.
//!
//! Consequences: the same IP reaches the same backend while it is up; when a backend goes
//! down only the clients on it move (each to the next backend along the ring, ≈ its share of
//! the ring, 1/N for equal weights) and they return when it comes back; removing a backend
//! from the list removes only its points, which moves only its clients as well.

use super::{weight_of, BackendView};
use std::net::{IpAddr, SocketAddr};

/// Ring points per unit of weight (ketama uses 160 per server). The share of the ring a
/// backend owns deviates from its weight share by about `1/sqrt(points)` relative, ≈ 8% here.
pub const POINTS_PER_WEIGHT: u32 = 160;

/// Weights above this count as this many for the ring (at most 160 × 256 = 40,960 points per
/// backend), so that a huge configured weight cannot allocate a huge ring. The cap depends on
/// the backend alone, so it keeps the ring a function of each backend's own entry.
pub const MAX_RING_WEIGHT: u32 = 256;

/// A consistent-hash ring built from a pool's backend list.
#[derive(Debug, Clone)]
pub struct IpHash {
    /// (position, backend index), sorted by position then index.
    ring: Vec<(u64, usize)>,
}

impl IpHash {
    /// Builds the ring from `backends` (address, weight), in config order; index `i` on the
    /// ring is `backends[i]`.
    pub fn new(backends: &[(SocketAddr, u32)]) -> IpHash {
        let mut ring = Vec::new();
        for (index, &(addr, weight)) in backends.iter().enumerate() {
            let key = addr_bytes(&addr);
            let points = POINTS_PER_WEIGHT.saturating_mul(weight_of(weight).min(MAX_RING_WEIGHT));
            ring.extend((0..points).map(|point| (point_hash(&key, point), index)));
        }
        ring.sort_unstable();
        IpHash { ring }
    }

    /// The owner of the first point clockwise from `client_ip`'s key that is up, then the
    /// next distinct up owners along the ring; at most `max` indexes. Only `up` is read from
    /// `backends` (positions come from the list given to `new`).
    pub fn order(&self, backends: &[BackendView], client_ip: IpAddr, max: usize) -> Vec<usize> {
        let up = backends.iter().filter(|b| b.up).count();
        let want = max.min(up);
        let mut out = Vec::with_capacity(want);
        if want == 0 || self.ring.is_empty() {
            return out;
        }
        let key = client_key(client_ip);
        let start = self.ring.partition_point(|&(pos, _)| pos < key);
        let (after, before) = self.ring.split_at(start);
        for &(_, index) in before.iter().chain(after) {
            if backends.get(index).is_some_and(|b| b.up) && !out.contains(&index) {
                out.push(index);
                if out.len() == want {
                    break;
                }
            }
        }
        out
    }
}

/// FNV-1a 64 of `bytes`, continuing from `state` (start with [`FNV_OFFSET`]).
fn fnv1a(mut state: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        state ^= u64::from(b);
        state = state.wrapping_mul(FNV_PRIME);
    }
    state
}

/// FNV-1a 64 offset basis.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64 prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The splitmix64 finalizer: spreads FNV's weak low-entropy output over all 64 bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The stable hash used everywhere on the ring.
fn stable_hash(bytes: &[u8]) -> u64 {
    mix(fnv1a(FNV_OFFSET, bytes))
}

/// A canonical byte encoding of a backend address: family tag, IP octets, port (big-endian)
/// and, for IPv6, the scope id. Independent of `Display` formatting, which has changed across
/// Rust versions for some IPv6 forms.
fn addr_bytes(addr: &SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(24);
    match addr {
        SocketAddr::V4(a) => {
            out.push(4);
            out.extend_from_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            out.push(6);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.scope_id().to_be_bytes());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
    out
}

/// Position of point number `point` of the backend whose address encodes to `addr`.
fn point_hash(addr: &[u8], point: u32) -> u64 {
    let mut bytes = Vec::with_capacity(addr.len() + 5);
    bytes.extend_from_slice(addr);
    bytes.push(b'#');
    bytes.extend_from_slice(&point.to_be_bytes());
    stable_hash(&bytes)
}

/// A client's key on the ring: the stable hash of its IP's octets, IPv4-mapped IPv6 addresses
/// (`::ffff:a.b.c.d`, as a dual-stack listener reports IPv4 peers) counting as the IPv4 one.
fn client_key(ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let mut bytes = [0u8; 5];
            bytes[0] = 4;
            bytes[1..].copy_from_slice(&v4.octets());
            stable_hash(&bytes)
        }
        IpAddr::V6(v6) => {
            let mut bytes = [0u8; 17];
            bytes[0] = 6;
            bytes[1..].copy_from_slice(&v6.octets());
            stable_hash(&bytes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::Balancer;
    use super::*;
    use crate::config::Balance;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// Clients per property case.
    const CLIENTS: usize = 2000;

    /// Allowed moved fraction when one of `n` equal-weight backends goes down or is removed:
    /// 1.5 × the expected 1/N plus 0.05. The moved clients are exactly those whose ring arc
    /// belongs to that backend; with P = 160 points the arc share is ≈ Gamma(P)/(N·P), i.e.
    /// 1/N with relative standard deviation 1/sqrt(160) ≈ 0.079, so ×1.5 is ≥ 6σ of ring
    /// imbalance. Sampling 2,000 clients adds a standard deviation of at most
    /// sqrt(0.25/2000) ≈ 0.011, so +0.05 is ≥ 4.5σ of sampling noise. Both are fixed by the
    /// inputs (no randomness at run time), so the bound holds with a wide margin rather than
    /// by luck; the measured worst case is well under it.
    fn tolerance(n: usize) -> f64 {
        1.5 / n as f64 + 0.05
    }

    fn ring_list(raw: &[(u32, u16)]) -> Vec<(SocketAddr, u32)> {
        raw.iter()
            .map(|&(ip, port)| (SocketAddr::from((ip.to_be_bytes(), port)), 1))
            .collect()
    }

    fn first_picks(ring: &IpHash, views: &[BackendView], clients: &[IpAddr]) -> Vec<Option<usize>> {
        clients
            .iter()
            .map(|&c| ring.order(views, c, 1).first().copied())
            .collect()
    }

    fn distinct_addrs(
        n: std::ops::RangeInclusive<usize>,
    ) -> impl Strategy<Value = Vec<(u32, u16)>> {
        prop::collection::hash_set((any::<u32>(), any::<u16>()), n)
            .prop_map(|s| s.into_iter().collect())
    }

    fn clients() -> impl Strategy<Value = Vec<IpAddr>> {
        prop::collection::vec(any::<u32>(), CLIENTS).prop_map(|v| {
            v.into_iter()
                .map(|x| IpAddr::from(x.to_be_bytes()))
                .collect()
        })
    }

    #[test]
    fn hash_primitives_match_published_vectors() {
        // FNV-1a 64 test vectors
        assert_eq!(fnv1a(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(FNV_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
        // splitmix64 seeded with 0: the first output is mix(golden gamma)
        assert_eq!(mix(0x9e37_79b9_7f4a_7c15), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn the_ring_is_pinned_across_processes_and_versions() {
        // Golden values, cross-checked with an independent Python implementation of the same
        // encoding: if these change, two gateways of different builds disagree.
        let list = list(&[1, 1, 1, 1]);
        let views = views(&list);
        let ring = IpHash::new(&list);
        let picks: Vec<usize> = (0u8..16)
            .map(|i| ring.order(&views, IpAddr::V4(Ipv4Addr::new(198, 51, 100, i)), 1)[0])
            .collect();
        assert_eq!(picks, GOLDEN_PICKS);
        assert_eq!(
            client_key(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7))),
            GOLDEN_KEY
        );
    }

    const GOLDEN_PICKS: [usize; 16] = [1, 2, 3, 1, 1, 3, 1, 2, 2, 3, 1, 2, 3, 1, 0, 2];
    const GOLDEN_KEY: u64 = 0x39e0_4575_e58d_2959;

    #[test]
    fn weights_set_the_ring_shares() {
        let list = list(&[1, 3]);
        let views = views(&list);
        let ring = IpHash::new(&list);
        assert_eq!(ring.ring.len(), 4 * POINTS_PER_WEIGHT as usize);
        let mut on_heavy = 0;
        for i in 0..20_000u32 {
            if ring.order(
                &views,
                IpAddr::from(i.wrapping_mul(2_654_435_761).to_be_bytes()),
                1,
            )[0] == 1
            {
                on_heavy += 1;
            }
        }
        let share = f64::from(on_heavy) / 20_000.0;
        assert!((share - 0.75).abs() < 0.06, "heavy share {share}");
    }

    #[test]
    fn huge_weights_are_capped() {
        let ring = IpHash::new(&[(addr(0), u32::MAX), (addr(1), 0)]);
        assert_eq!(
            ring.ring.len(),
            ((MAX_RING_WEIGHT + 1) * POINTS_PER_WEIGHT) as usize
        );
    }

    #[test]
    fn ipv4_mapped_clients_hash_as_ipv4() {
        let v4 = Ipv4Addr::new(203, 0, 113, 9);
        assert_eq!(
            client_key(IpAddr::V4(v4)),
            client_key(IpAddr::V6(v4.to_ipv6_mapped()))
        );
        assert_ne!(
            client_key(IpAddr::V4(v4)),
            client_key(IpAddr::V6(Ipv6Addr::LOCALHOST))
        );
    }

    #[test]
    fn fallbacks_walk_the_ring_skipping_down_backends() {
        let list = list(&[1, 1, 1, 1, 1]);
        let mut views = views(&list);
        let ring = IpHash::new(&list);
        let client = ip();
        let full = ring.order(&views, client, 5);
        check_contract(&full, &views, 5);
        // taking the pick down promotes the first fallback, and the rest keep their order
        views[full[0]].up = false;
        assert_eq!(ring.order(&views, client, 5), full[1..].to_vec());
        views[full[2]].up = false;
        let expect: Vec<usize> = full
            .iter()
            .copied()
            .filter(|&i| i != full[0] && i != full[2])
            .collect();
        assert_eq!(ring.order(&views, client, 5), expect);
        assert_eq!(ring.order(&views, client, 1), vec![full[1]]);
        for v in &mut views {
            v.up = false;
        }
        assert!(ring.order(&views, client, 5).is_empty());
    }

    #[test]
    fn ignores_load_and_is_sticky_through_the_enum() {
        let list = list(&[1, 1, 1]);
        let mut views = views(&list);
        let mut b = Balancer::new(Balance::IpHash, &list);
        let first = b.order(&views, ip(), 3);
        views[first[0]].active = 1000;
        for _ in 0..10 {
            assert_eq!(b.order(&views, ip(), 3), first);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// (a) The same IP gets the same pick (and the same fallbacks) with the same view,
        /// however many times it asks and whatever others ask in between.
        #[test]
        fn same_ip_same_pick(
            raw in distinct_addrs(1..=8),
            downs in prop::collection::vec(any::<bool>(), 8),
            ips in prop::collection::vec(any::<u32>(), 1..32),
        ) {
            let list = ring_list(&raw);
            let mut views = views(&list);
            for (v, &down) in views.iter_mut().zip(&downs) {
                v.up = !down;
            }
            let mut b = Balancer::new(Balance::IpHash, &list);
            let clients: Vec<IpAddr> = ips.iter().map(|x| IpAddr::from(x.to_be_bytes())).collect();
            let first: Vec<Vec<usize>> = clients.iter().map(|&c| b.order(&views, c, 8)).collect();
            for (&c, expect) in clients.iter().zip(&first).rev() {
                prop_assert_eq!(&b.order(&views, c, 8), expect);
                prop_assert_eq!(b.order(&views, c, 1).first().copied(), expect.first().copied());
            }
        }

        /// (b) Marking one of N backends down moves only the clients that were on it, no more
        /// than 1/N + tolerance of them, and bringing it back restores every assignment.
        #[test]
        fn one_down_moves_only_its_clients(
            raw in distinct_addrs(2..=8),
            victim in any::<prop::sample::Index>(),
            clients in clients(),
        ) {
            let n = raw.len();
            let list = ring_list(&raw);
            let ring = IpHash::new(&list);
            let mut views = views(&list);
            let before = first_picks(&ring, &views, &clients);
            let k = victim.index(n);
            views[k].up = false;
            let after = first_picks(&ring, &views, &clients);
            let mut moved = 0usize;
            for (b, a) in before.iter().zip(&after) {
                prop_assert!(a.is_some() && *a != Some(k));
                if b != a {
                    prop_assert_eq!(*b, Some(k), "a client not on the downed backend moved");
                    moved += 1;
                }
            }
            let fraction = moved as f64 / CLIENTS as f64;
            prop_assert!(fraction <= tolerance(n), "moved {} with n = {}", fraction, n);
            views[k].up = true;
            prop_assert_eq!(first_picks(&ring, &views, &clients), before);
        }

        /// Removing one backend from the list moves only its clients (compared by address,
        /// since the indexes after it shift), no more than 1/N + tolerance of them.
        #[test]
        fn removal_from_the_list_moves_only_its_clients(
            raw in distinct_addrs(2..=8),
            victim in any::<prop::sample::Index>(),
            clients in clients(),
        ) {
            let n = raw.len();
            let full = ring_list(&raw);
            let k = victim.index(n);
            let mut reduced = full.clone();
            let gone = reduced.remove(k).0;
            let addr_of = |list: &[(SocketAddr, u32)], pick: Option<usize>| pick.map(|i| list[i].0);
            let before = first_picks(&IpHash::new(&full), &views(&full), &clients);
            let after = first_picks(&IpHash::new(&reduced), &views(&reduced), &clients);
            let mut moved = 0usize;
            for (b, a) in before.iter().zip(&after) {
                let (b, a) = (addr_of(&full, *b), addr_of(&reduced, *a));
                if b != a {
                    prop_assert_eq!(b, Some(gone), "a client not on the removed backend moved");
                    moved += 1;
                }
            }
            let fraction = moved as f64 / CLIENTS as f64;
            prop_assert!(fraction <= tolerance(n), "moved {} with n = {}", fraction, n);
        }

        /// (c) Two rings built independently from the same list give identical picks, and
        /// the ring does not depend on anything but each backend's own (address, weight):
        /// building it from a permuted list gives the same backend by address.
        #[test]
        fn independent_rings_agree(
            raw in distinct_addrs(1..=8),
            weights in prop::collection::vec(1u32..=4, 8),
            ips in prop::collection::vec(any::<u32>(), 64),
            seed in any::<u64>(),
        ) {
            let list: Vec<(SocketAddr, u32)> = ring_list(&raw)
                .into_iter()
                .zip(&weights)
                .map(|((a, _), &w)| (a, w))
                .collect();
            let copy: Vec<(SocketAddr, u32)> = list.iter().map(|&(a, w)| (a.to_string().parse().unwrap(), w)).collect();
            let one = IpHash::new(&list);
            let two = IpHash::new(&copy);
            prop_assert_eq!(&one.ring, &two.ring);
            let mut permuted = list.clone();
            fastrand::Rng::with_seed(seed).shuffle(&mut permuted);
            let three = IpHash::new(&permuted);
            let clients: Vec<IpAddr> = ips.iter().map(|x| IpAddr::from(x.to_be_bytes())).collect();
            for &c in &clients {
                let a = one.order(&views(&list), c, 8);
                prop_assert_eq!(&a, &two.order(&views(&copy), c, 8));
                let p: Vec<SocketAddr> = three.order(&views(&permuted), c, 8).iter().map(|&i| permuted[i].0).collect();
                let a: Vec<SocketAddr> = a.iter().map(|&i| list[i].0).collect();
                prop_assert_eq!(a, p);
            }
        }
    }
}
