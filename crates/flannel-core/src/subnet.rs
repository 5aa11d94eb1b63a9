//! Subnet arithmetic: the allocation window and the search for free subnets.
//!
//! Both address families share one implementation over `u128`, so IPv4 and IPv6
//! allocation cannot drift apart.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use rand::seq::IndexedRandom;

/// How many free subnets the fresh-allocation walk collects before picking one at
/// random (upstream's limit: spreading picks keeps simultaneous starters apart).
pub const FREE_SUBNET_SAMPLE: usize = 100;

/// The range of per-host subnets that may be leased: every `len`-long subnet whose
/// network address lies in `min..=max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window<A> {
    pub len: u8,
    pub min: A,
    pub max: A,
}

pub type Window4 = Window<Ipv4Addr>;
pub type Window6 = Window<Ipv6Addr>;

/// An address family's arithmetic, enough for the window walk.
pub trait Family: Copy + Ord {
    type Net: Copy;
    const BITS: u8;
    fn to_u128(self) -> u128;
    fn from_u128(v: u128) -> Self;
    fn net(addr: Self, len: u8) -> Self::Net;
    fn net_bounds(net: &Self::Net) -> (u128, u128);
}

impl Family for Ipv4Addr {
    type Net = Ipv4Net;
    const BITS: u8 = 32;
    fn to_u128(self) -> u128 {
        u32::from(self) as u128
    }
    fn from_u128(v: u128) -> Self {
        Ipv4Addr::from(v as u32)
    }
    fn net(addr: Self, len: u8) -> Ipv4Net {
        Ipv4Net::new(addr, len)
            .expect("prefix length checked by the window")
            .trunc()
    }
    fn net_bounds(net: &Ipv4Net) -> (u128, u128) {
        (net.network().to_u128(), net.broadcast().to_u128())
    }
}

impl Family for Ipv6Addr {
    type Net = Ipv6Net;
    const BITS: u8 = 128;
    fn to_u128(self) -> u128 {
        u128::from(self)
    }
    fn from_u128(v: u128) -> Self {
        Ipv6Addr::from(v)
    }
    fn net(addr: Self, len: u8) -> Ipv6Net {
        Ipv6Net::new(addr, len)
            .expect("prefix length checked by the window")
            .trunc()
    }
    fn net_bounds(net: &Ipv6Net) -> (u128, u128) {
        (net.network().to_u128(), net.broadcast().to_u128())
    }
}

impl<A: Family> Window<A> {
    fn step(&self) -> u128 {
        1u128 << (A::BITS - self.len)
    }

    /// Whether `net` is one of the subnets this window hands out.
    pub fn contains(&self, net: &A::Net) -> bool
    where
        A::Net: PrefixLen,
    {
        let (start, _) = A::net_bounds(net);
        net.prefix() == self.len
            && start >= self.min.to_u128()
            && start <= self.max.to_u128()
            && start % self.step() == 0
    }

    /// Up to `limit` subnets of the window, lowest first, that overlap none of `taken`.
    pub fn free_subnets<'a, I>(&self, taken: I, limit: usize) -> Vec<A::Net>
    where
        I: IntoIterator<Item = &'a A::Net>,
        A::Net: 'a,
    {
        let mut busy: Vec<(u128, u128)> = taken.into_iter().map(A::net_bounds).collect();
        busy.sort_unstable();
        let busy = merge(busy);
        let step = self.step();
        let (min, max) = (self.min.to_u128(), self.max.to_u128());
        let mut out = Vec::new();
        let mut next_busy = 0;
        let mut cand = min;
        while cand <= max && out.len() < limit {
            let cand_end = cand + (step - 1);
            while next_busy < busy.len() && busy[next_busy].1 < cand {
                next_busy += 1;
            }
            match busy.get(next_busy) {
                Some(&(b_start, b_end)) if b_start <= cand_end => {
                    // Jump past the busy range to the next aligned candidate.
                    let Some(after) = b_end.checked_add(1) else {
                        break;
                    };
                    let aligned = after.div_ceil(step).checked_mul(step);
                    match aligned {
                        Some(a) if a > cand => cand = a,
                        _ => break,
                    }
                }
                _ => {
                    out.push(A::net(A::from_u128(cand), self.len));
                    match cand.checked_add(step) {
                        Some(n) => cand = n,
                        None => break,
                    }
                }
            }
        }
        out
    }

    /// A free subnet picked uniformly among the first [`FREE_SUBNET_SAMPLE`] free ones.
    /// The caller owns the randomness (the agent passes the thread RNG; tests pass a
    /// seeded one, so an allocation can be replayed).
    pub fn pick_free<'a, I, R>(&self, taken: I, rng: &mut R) -> Option<A::Net>
    where
        I: IntoIterator<Item = &'a A::Net>,
        A::Net: 'a,
        R: rand::Rng + ?Sized,
    {
        self.free_subnets(taken, FREE_SUBNET_SAMPLE)
            .choose(rng)
            .copied()
    }
}

/// Prefix length of a network, for both families.
pub trait PrefixLen {
    fn prefix(&self) -> u8;
}
impl PrefixLen for Ipv4Net {
    fn prefix(&self) -> u8 {
        self.prefix_len()
    }
}
impl PrefixLen for Ipv6Net {
    fn prefix(&self) -> u8 {
        self.prefix_len()
    }
}

fn merge(sorted: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(sorted.len());
    for (s, e) in sorted {
        match out.last_mut() {
            Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// The first address after the network address (the gateway / bridge address that
/// subnet.env advertises, e.g. 10.244.3.1 for 10.244.3.0/24).
pub fn first_host_v4(net: &Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()).wrapping_add(1))
}

/// IPv6 counterpart of [`first_host_v4`].
pub fn first_host_v6(net: &Ipv6Net) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(net.network()).wrapping_add(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn w4(len: u8, min: &str, max: &str) -> Window4 {
        Window {
            len,
            min: min.parse().unwrap(),
            max: max.parse().unwrap(),
        }
    }

    #[test]
    fn walk_skips_taken_and_respects_limit() {
        let w = w4(24, "10.5.1.0", "10.5.5.0");
        let taken: Vec<Ipv4Net> = vec![
            "10.5.2.0/24".parse().unwrap(),
            "10.5.4.0/23".parse().unwrap(),
        ];
        let free = w.free_subnets(&taken, 100);
        let want: Vec<Ipv4Net> = vec![
            "10.5.1.0/24".parse().unwrap(),
            "10.5.3.0/24".parse().unwrap(),
        ];
        assert_eq!(free, want);
        assert_eq!(w.free_subnets(&[], 2).len(), 2);
    }

    #[test]
    fn window_at_top_of_address_space_does_not_overflow() {
        let w = w4(24, "255.255.254.0", "255.255.255.0");
        assert_eq!(w.free_subnets(&[], 10).len(), 2);
        let taken: Vec<Ipv4Net> = vec!["255.255.255.0/24".parse().unwrap()];
        assert_eq!(w.free_subnets(&taken, 10).len(), 1);
        let w6 = Window6 {
            len: 64,
            min: "ffff:ffff:ffff:fffe::".parse().unwrap(),
            max: "ffff:ffff:ffff:ffff::".parse().unwrap(),
        };
        assert_eq!(w6.free_subnets(&[], 10).len(), 2);
    }

    fn seeded() -> rand::rngs::StdRng {
        rand::SeedableRng::seed_from_u64(7)
    }

    #[test]
    fn the_same_seed_picks_the_same_subnet() {
        let w = w4(24, "10.5.1.0", "10.5.255.0");
        let taken: Vec<Ipv4Net> = vec!["10.5.3.0/24".parse().unwrap()];
        let picks = |seed| {
            let mut rng: rand::rngs::StdRng = rand::SeedableRng::seed_from_u64(seed);
            (0..20)
                .map(|_| w.pick_free(&taken, &mut rng).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(picks(1), picks(1));
        assert_ne!(picks(1), picks(2), "the seed decides the picks");
        assert!(picks(1).iter().all(|n| !taken.contains(n) && w.contains(n)));
    }

    #[test]
    fn full_window_has_nothing_free() {
        let w = w4(24, "10.5.1.0", "10.5.2.0");
        let taken: Vec<Ipv4Net> = vec!["10.5.0.0/16".parse().unwrap()];
        assert!(w.pick_free(&taken, &mut seeded()).is_none());
    }

    proptest! {
        #[test]
        fn allocation_never_overlaps_or_leaves_window(
            len in 20u8..=28,
            lo in 0u32..64, span in 0u32..64,
            taken in proptest::collection::vec((0u32..200, 18u8..=30), 0..40),
        ) {
            let base = u32::from(Ipv4Addr::new(10, 0, 0, 0));
            let step = 1u32 << (32 - len);
            let min = base + lo * step;
            let max = min + span * step;
            let w = Window4 { len, min: Ipv4Addr::from(min), max: Ipv4Addr::from(max) };
            let taken: Vec<Ipv4Net> = taken.iter()
                .map(|(i, l)| Ipv4Net::new(Ipv4Addr::from(base + i * 4096), *l).unwrap().trunc())
                .collect();
            let free = w.free_subnets(&taken, usize::MAX);
            let mut expected = 0;
            let mut a = min as u64;
            while a <= max as u64 {
                let n = Ipv4Net::new(Ipv4Addr::from(a as u32), len).unwrap();
                if !taken.iter().any(|t| t.contains(&n) || n.contains(t)) { expected += 1; }
                a += step as u64;
            }
            prop_assert_eq!(free.len(), expected);
            for n in &free {
                prop_assert!(w.contains(n));
                prop_assert!(!taken.iter().any(|t| t.contains(n) || n.contains(t)));
            }
            for pair in free.windows(2) { prop_assert!(pair[0].network() < pair[1].network()); }
            if let Some(p) = w.pick_free(&taken, &mut seeded()) {
                prop_assert!(free.iter().take(FREE_SUBNET_SAMPLE).any(|n| *n == p));
            }
        }
    }
}
