//! Data-path counters: plain atomics the daemon's metrics endpoint reads.
//!
//! Packet counts are inner IPv4 packets (a GSO/GRO batch counts each packet it
//! carries); byte counts are inner packet bytes. Workers add once per batch.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// All counters of one data path. Every field only grows.
#[derive(Debug, Default)]
pub struct Counters {
    /// Packets read from the TUN and sent to a peer.
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Packets received from peers and written to the TUN.
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Received datagrams whose outer source is not a current peer's public IP.
    pub rx_drop_unknown_peer: AtomicU64,
    /// Received packets whose inner source is outside the sending peer's subnet.
    pub rx_drop_spoofed_source: AtomicU64,
    /// Received datagrams that are not a well-formed IPv4 packet (short, not IPv4,
    /// bad header length, total length != datagram length, bad header checksum,
    /// truncated).
    pub rx_drop_malformed: AtomicU64,
    /// Received packets whose TTL ran out.
    pub rx_drop_ttl: AtomicU64,
    /// Packets that could not be written to the TUN.
    pub rx_drop_tun_error: AtomicU64,
    /// TUN packets for a destination no peer leases (ICMP net-unreachable sent back
    /// where upstream sends one).
    pub tx_drop_no_route: AtomicU64,
    /// TUN packets whose TTL ran out.
    pub tx_drop_ttl: AtomicU64,
    /// TUN packets that are not IPv4 or not parseable (e.g. IPv6 link-local chatter,
    /// an offload header we cannot segment).
    pub tx_drop_malformed: AtomicU64,
    /// Packets the UDP socket refused to send.
    pub tx_drop_send_error: AtomicU64,
    /// ICMP net-unreachable replies written to the TUN.
    pub tx_icmp_unreachable: AtomicU64,
}

/// A snapshot of [`Counters`], e.g. for tests and logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CounterValues {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_drop_unknown_peer: u64,
    pub rx_drop_spoofed_source: u64,
    pub rx_drop_malformed: u64,
    pub rx_drop_ttl: u64,
    pub rx_drop_tun_error: u64,
    pub tx_drop_no_route: u64,
    pub tx_drop_ttl: u64,
    pub tx_drop_malformed: u64,
    pub tx_drop_send_error: u64,
    pub tx_icmp_unreachable: u64,
}

impl Counters {
    pub fn values(&self) -> CounterValues {
        CounterValues {
            tx_packets: self.tx_packets.load(Relaxed),
            tx_bytes: self.tx_bytes.load(Relaxed),
            rx_packets: self.rx_packets.load(Relaxed),
            rx_bytes: self.rx_bytes.load(Relaxed),
            rx_drop_unknown_peer: self.rx_drop_unknown_peer.load(Relaxed),
            rx_drop_spoofed_source: self.rx_drop_spoofed_source.load(Relaxed),
            rx_drop_malformed: self.rx_drop_malformed.load(Relaxed),
            rx_drop_ttl: self.rx_drop_ttl.load(Relaxed),
            rx_drop_tun_error: self.rx_drop_tun_error.load(Relaxed),
            tx_drop_no_route: self.tx_drop_no_route.load(Relaxed),
            tx_drop_ttl: self.tx_drop_ttl.load(Relaxed),
            tx_drop_malformed: self.tx_drop_malformed.load(Relaxed),
            tx_drop_send_error: self.tx_drop_send_error.load(Relaxed),
            tx_icmp_unreachable: self.tx_icmp_unreachable.load(Relaxed),
        }
    }

    /// Adds a worker's batch-local tallies.
    pub(crate) fn add(&self, d: &CounterValues) {
        macro_rules! add {
            ($($f:ident),*) => {$(
                if d.$f != 0 {
                    self.$f.fetch_add(d.$f, Relaxed);
                }
            )*};
        }
        add!(
            tx_packets,
            tx_bytes,
            rx_packets,
            rx_bytes,
            rx_drop_unknown_peer,
            rx_drop_spoofed_source,
            rx_drop_malformed,
            rx_drop_ttl,
            rx_drop_tun_error,
            tx_drop_no_route,
            tx_drop_ttl,
            tx_drop_malformed,
            tx_drop_send_error,
            tx_icmp_unreachable
        );
    }
}

impl CounterValues {
    /// (name, value) pairs, names as a metrics exporter would use them.
    pub fn pairs(&self) -> [(&'static str, u64); 14] {
        [
            ("tx_packets", self.tx_packets),
            ("tx_bytes", self.tx_bytes),
            ("rx_packets", self.rx_packets),
            ("rx_bytes", self.rx_bytes),
            ("rx_drop_unknown_peer", self.rx_drop_unknown_peer),
            ("rx_drop_spoofed_source", self.rx_drop_spoofed_source),
            ("rx_drop_malformed", self.rx_drop_malformed),
            ("rx_drop_ttl", self.rx_drop_ttl),
            ("rx_drop_tun_error", self.rx_drop_tun_error),
            ("tx_drop_no_route", self.tx_drop_no_route),
            ("tx_drop_ttl", self.tx_drop_ttl),
            ("tx_drop_malformed", self.tx_drop_malformed),
            ("tx_drop_send_error", self.tx_drop_send_error),
            ("tx_icmp_unreachable", self.tx_icmp_unreachable),
        ]
    }

    pub(crate) fn is_zero(&self) -> bool {
        self.pairs().iter().all(|(_, v)| *v == 0)
    }
}
