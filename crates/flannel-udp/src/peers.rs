//! The remote-subnet table: which public IP serves which subnet.
//!
//! Lookups are O(1): all leases of a network share one prefix length, so the masked
//! destination is a hash key. (Mixed lengths, possible only across a config change,
//! cost one probe per distinct length, longest first.)

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use ipnet::Ipv4Net;

/// One other host: the subnet it leases and where to send its traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Peer {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
}

/// A multiplicative hasher for u32 keys: keys are subnets and addresses from the
/// lease store (trusted), so no DoS-resistant hash is needed on the hot path.
#[derive(Default, Clone, Copy)]
pub struct U32Hasher(u64);

impl Hasher for U32Hasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = (u64::from(n) ^ self.0).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 ^= self.0 >> 29;
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<U32Hasher>>;

/// An immutable snapshot of the peers; replaced whole on every change.
#[derive(Debug, Default)]
pub struct PeerTable {
    /// Distinct prefix lengths, longest first.
    lens: Vec<u8>,
    /// (masked network, prefix length) → public IP.
    by_subnet: FastMap<u64, u32>,
    /// public IP → the subnets it leases.
    by_public: FastMap<u32, Vec<Ipv4Net>>,
    port: u16,
}

fn key(net: u32, len: u8) -> u64 {
    (u64::from(net) << 8) | u64::from(len)
}

fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

impl PeerTable {
    /// Builds a table; `port` is the UDP port every peer listens on (flannel does not
    /// negotiate it). Peers with an unspecified public IP are skipped; when two
    /// entries claim the same subnet the last wins.
    pub fn new(peers: impl IntoIterator<Item = Peer>, port: u16) -> Self {
        let mut t = PeerTable {
            port,
            ..Default::default()
        };
        for p in peers {
            if p.public_ip.is_unspecified() {
                continue;
            }
            let net = p.subnet.trunc();
            let len = net.prefix_len();
            if !t.lens.contains(&len) {
                t.lens.push(len);
            }
            let k = key(u32::from(net.network()), len);
            if let Some(old) = t.by_subnet.insert(k, u32::from(p.public_ip)) {
                if let Some(v) = t.by_public.get_mut(&old) {
                    v.retain(|n| *n != net);
                }
            }
            t.by_public
                .entry(u32::from(p.public_ip))
                .or_default()
                .push(net);
        }
        t.by_public.retain(|_, v| !v.is_empty());
        t.lens.sort_unstable_by(|a, b| b.cmp(a));
        t
    }

    pub fn len(&self) -> usize {
        self.by_subnet.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_subnet.is_empty()
    }

    /// Where to send a packet for `dst`.
    #[inline]
    pub fn route(&self, dst: u32) -> Option<SocketAddrV4> {
        for &len in &self.lens {
            if let Some(&ip) = self.by_subnet.get(&key(dst & mask(len), len)) {
                return Some(SocketAddrV4::new(Ipv4Addr::from(ip), self.port));
            }
        }
        None
    }

    /// The subnets a datagram from `public_ip` may carry sources from; None when
    /// the address is not a current peer.
    #[inline]
    pub fn subnets_of(&self, public_ip: u32) -> Option<&[Ipv4Net]> {
        self.by_public.get(&public_ip).map(Vec::as_slice)
    }

    /// Whether `src` is inside one of `subnets`.
    #[inline]
    pub fn contains(subnets: &[Ipv4Net], src: u32) -> bool {
        subnets.iter().any(|n| {
            let l = n.prefix_len();
            src & mask(l) == u32::from(n.network())
        })
    }
}

/// The shared, swappable table. Workers keep their own `Arc` and compare a
/// generation number (one relaxed load per batch) to notice replacements.
#[derive(Debug, Default)]
pub struct SharedPeers {
    table: RwLock<Arc<PeerTable>>,
    generation: AtomicU64,
}

impl SharedPeers {
    pub fn new(table: PeerTable) -> Self {
        SharedPeers {
            table: RwLock::new(Arc::new(table)),
            generation: AtomicU64::new(1),
        }
    }

    pub fn replace(&self, table: PeerTable) {
        let mut g = self.table.write().unwrap_or_else(|e| e.into_inner());
        *g = Arc::new(table);
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn snapshot(&self) -> (u64, Arc<PeerTable>) {
        let g = self.table.read().unwrap_or_else(|e| e.into_inner());
        (self.generation.load(Ordering::Acquire), g.clone())
    }
}

/// A worker's cached view of [`SharedPeers`].
pub struct PeerView {
    shared: Arc<SharedPeers>,
    generation: u64,
    table: Arc<PeerTable>,
}

impl PeerView {
    pub fn new(shared: Arc<SharedPeers>) -> Self {
        let (generation, table) = shared.snapshot();
        PeerView {
            shared,
            generation,
            table,
        }
    }

    /// The current table (refreshed if it was replaced since the last call).
    #[inline]
    pub fn get(&mut self) -> &PeerTable {
        if self.shared.generation() != self.generation {
            let (g, t) = self.shared.snapshot();
            self.generation = g;
            self.table = t;
        }
        &self.table
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(net: &str, ip: [u8; 4]) -> Peer {
        Peer {
            subnet: net.parse().unwrap(),
            public_ip: Ipv4Addr::from(ip),
        }
    }

    #[test]
    fn routes_by_masked_destination() {
        let t = PeerTable::new(
            [
                p("10.244.41.0/24", [10, 10, 0, 2]),
                p("10.244.42.0/24", [10, 10, 0, 3]),
            ],
            8285,
        );
        let d = |s: &str| u32::from(s.parse::<Ipv4Addr>().unwrap());
        assert_eq!(
            t.route(d("10.244.41.11")),
            Some("10.10.0.2:8285".parse().unwrap())
        );
        assert_eq!(
            t.route(d("10.244.42.255")),
            Some("10.10.0.3:8285".parse().unwrap())
        );
        assert_eq!(t.route(d("10.244.43.1")), None);
        assert_eq!(t.route(d("10.245.41.1")), None);
    }

    #[test]
    fn mixed_prefix_lengths_prefer_longest() {
        let t = PeerTable::new(
            [
                p("10.244.0.0/16", [10, 10, 0, 9]),
                p("10.244.41.0/24", [10, 10, 0, 2]),
            ],
            1,
        );
        let d = |s: &str| u32::from(s.parse::<Ipv4Addr>().unwrap());
        assert_eq!(t.route(d("10.244.41.1")).unwrap().ip().octets()[3], 2);
        assert_eq!(t.route(d("10.244.40.1")).unwrap().ip().octets()[3], 9);
    }

    #[test]
    fn source_checks_and_replacement() {
        let t = PeerTable::new(
            [
                p("10.244.41.0/24", [10, 10, 0, 2]),
                p("10.244.41.0/24", [10, 10, 0, 7]),
                p("10.244.50.0/24", [0, 0, 0, 0]),
            ],
            1,
        );
        assert_eq!(t.len(), 1);
        assert!(t
            .subnets_of(u32::from(Ipv4Addr::new(10, 10, 0, 2)))
            .is_none());
        let s = t
            .subnets_of(u32::from(Ipv4Addr::new(10, 10, 0, 7)))
            .unwrap();
        assert!(PeerTable::contains(
            s,
            u32::from(Ipv4Addr::new(10, 244, 41, 200))
        ));
        assert!(!PeerTable::contains(
            s,
            u32::from(Ipv4Addr::new(10, 244, 42, 1))
        ));
    }

    #[test]
    fn views_follow_replacement() {
        let shared = Arc::new(SharedPeers::new(PeerTable::new([], 1)));
        let mut v = PeerView::new(shared.clone());
        assert!(v.get().is_empty());
        shared.replace(PeerTable::new([p("10.1.0.0/24", [1, 1, 1, 1])], 1));
        assert_eq!(v.get().len(), 1);
    }
}
