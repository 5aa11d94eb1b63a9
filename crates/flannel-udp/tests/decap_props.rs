//! Property tests of decapsulation over arbitrary bytes: it never panics, and
//! whatever it accepts is well-formed, from the sender's subnet, with the TTL
//! decremented exactly once.

use std::net::Ipv4Addr;

use flannel_udp::rx::{Decap, RxPlan};
use flannel_udp::vnet::{VnetHdr, GSO_TCPV4};
use flannel_udp::{csum, packet, CounterValues, Peer, PeerTable};
use proptest::prelude::*;

const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

fn table() -> PeerTable {
    PeerTable::new(
        [Peer {
            subnet: "10.244.1.0/24".parse().unwrap(),
            public_ip: PEER,
        }],
        8285,
    )
}

/// A valid inner TCP segment from 10.244.1.2, which mutations then damage.
fn segment(seq: u32, payload: usize, flags: u8) -> Vec<u8> {
    let mut p = vec![
        0x45, 0, 0, 0, 0, 1, 0x40, 0, 62, 6, 0, 0, 10, 244, 1, 2, 10, 244, 2, 2, 0x9c, 0x40, 0x14,
        0x51, 0, 0, 0, 0, 0, 0, 0, 9, 0x50, flags, 0x01, 0xf5, 0, 0, 0, 0,
    ];
    packet::put32(&mut p, 24, seq);
    p.extend((0..payload).map(|i| i as u8));
    let len = p.len() as u16;
    packet::put16(&mut p, 2, len);
    let c = csum::ipv4_header(&p[..20]);
    packet::put16(&mut p, 10, c);
    p
}

fn check(buf: &mut [u8], stride: usize, from: Ipv4Addr, vnet: bool) {
    let original = buf.to_vec();
    let t = table();
    let mut d = Decap::new(vnet, true);
    let mut plan = RxPlan::with_capacity();
    let mut tally = CounterValues::default();
    d.datagram(&t, u32::from(from), buf, stride, &mut plan, &mut tally);
    let mut accepted = 0u64;
    for w in &plan.writes {
        accepted += u64::from(w.packets);
        let out = plan.materialize(w, buf);
        // Every write is an IPv4 packet with a valid header, from the peer's subnet.
        assert_eq!(packet::validate(&out).map(|_| ()), Ok(()), "{out:?}");
        assert_eq!(&out[12..15], &[10, 244, 1]);
        if w.packets > 1 {
            let h = VnetHdr::decode(&w.vnet, true).unwrap();
            assert_eq!(h.gso_type, GSO_TCPV4);
            assert!(usize::from(h.gso_size) * (w.packets as usize - 1) < out.len());
        }
    }
    // Each input segment is either written or counted as exactly one drop.
    let n = buf.len();
    let s = if stride == 0 || stride > n {
        n.max(1)
    } else {
        stride
    };
    let segs = n.div_ceil(s).max(1) as u64;
    let dropped = tally.rx_drop_malformed
        + tally.rx_drop_spoofed_source
        + tally.rx_drop_unknown_peer
        + tally.rx_drop_ttl;
    assert_eq!(accepted + dropped, segs, "{tally:?}");
    if from != PEER {
        assert!(plan.writes.is_empty());
    }
    // Accepted packets had their TTL decremented once, nothing else changed.
    if plan.writes.len() == accepted as usize && !vnet {
        for w in &plan.writes {
            let out = plan.materialize(w, buf);
            let start = plan.parts[w.parts_start as usize].0 as usize;
            assert_eq!(original[start + 8], out[8] + 1);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(
        mut buf in proptest::collection::vec(any::<u8>(), 0..3000),
        stride in 0usize..1600,
        vnet in any::<bool>(),
        from_peer in any::<bool>(),
    ) {
        let from = if from_peer { PEER } else { Ipv4Addr::new(198, 18, 0, 9) };
        check(&mut buf, stride, from, vnet);
    }

    #[test]
    fn mutated_segment_batches_never_panic(
        n in 1usize..12,
        payload in 1usize..200,
        flags in prop_oneof![Just(0x10u8), Just(0x18u8), any::<u8>()],
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        cut in any::<usize>(),
        vnet in any::<bool>(),
    ) {
        let mut buf = Vec::new();
        for i in 0..n {
            buf.extend(segment(1000 + (i * payload) as u32, payload, flags));
        }
        let stride = 40 + payload;
        for (at, x) in flips {
            let len = buf.len();
            buf[at % len] ^= x;
        }
        let cut = cut % (buf.len() + 1);
        buf.truncate(cut.max(1));
        check(&mut buf, stride, PEER, vnet);
    }
}

fn encap_check(read: &mut [u8], vnet: bool) {
    use flannel_udp::tx::{Encap, TxBatch};
    let t = PeerTable::new(
        [Peer {
            subnet: "10.244.2.0/24".parse().unwrap(),
            public_ip: Ipv4Addr::new(198, 18, 0, 2),
        }],
        8285,
    );
    let e = Encap {
        peers: &t,
        tun_addr: Ipv4Addr::new(10, 244, 1, 0),
        vnet,
        vnet_le: true,
    };
    let mut b = TxBatch::default();
    let mut tally = CounterValues::default();
    e.packet(0, read, &mut b, &mut tally);
    for d in &b.dgrams {
        let bytes = b.materialize(d, &[read]);
        assert!(bytes.len() >= 20 && bytes.len() <= 65535);
        assert_eq!(bytes[0] >> 4, 4);
    }
    for (r, n) in &b.icmp {
        assert_eq!(packet::validate(&r[..*n]).map(|_| ()), Ok(()));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Whatever the TUN hands over (offload header included), encapsulation never
    /// panics and only emits IPv4 datagrams.
    #[test]
    fn random_tun_reads_never_panic(
        flags in any::<u8>(),
        gso_type in prop_oneof![Just(0u8), Just(1u8), Just(4u8), Just(5u8), Just(0x81u8), any::<u8>()],
        gso_size in prop_oneof![Just(0u16), 1u16..2000, any::<u16>()],
        csum_start in prop_oneof![Just(20u16), any::<u16>()],
        csum_offset in prop_oneof![Just(16u16), Just(6u16), any::<u16>()],
        ihl_byte in prop_oneof![Just(0x45u8), 0x40u8..0x50, any::<u8>()],
        proto in prop_oneof![Just(6u8), Just(17u8), Just(1u8), any::<u8>()],
        doff in any::<u8>(),
        body in proptest::collection::vec(any::<u8>(), 0..4000),
        vnet in any::<bool>(),
    ) {
        let mut read = Vec::new();
        if vnet {
            let mut h = [0u8; 10];
            VnetHdr { flags, gso_type, hdr_len: 0, gso_size, csum_start, csum_offset }
                .encode(&mut h, true);
            read.extend_from_slice(&h);
        }
        let mut ip = vec![ihl_byte, 0, 0, 0, 0, 1, 0x40, 0, 64, proto, 0, 0, 10, 244, 1, 2, 10, 244, 2, 2];
        let tot = (20 + body.len()) as u16;
        packet::put16(&mut ip, 2, tot);
        read.extend_from_slice(&ip);
        let mut body = body;
        if body.len() > 12 {
            body[12] = doff;
        }
        read.extend_from_slice(&body);
        encap_check(&mut read, vnet);
    }
}

/// A valid IPv6 TCP segment (checksum not filled: `packets` trusts its input's
/// checksums, the AEAD having authenticated it).
fn segment6(seq: u32, payload: usize, flags: u8) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 1, 0, 0, 6, 64];
    p.extend_from_slice(&[0xfd, 0, 0, 0x10, 2, 0x44, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2]);
    p.extend_from_slice(&[0xfd, 0, 0, 0x10, 2, 0x44, 0, 2, 0, 0, 0, 0, 0, 0, 0, 2]);
    p.extend_from_slice(&[
        0x9c, 0x40, 0x14, 0x51, 0, 0, 0, 0, 0, 0, 0, 9, 0x50, flags, 0x01, 0xf5, 0, 0, 0, 0,
    ]);
    packet::put32(&mut p, 44, seq);
    p.extend((0..payload).map(|i| i as u8));
    let plen = (p.len() - 40) as u16;
    packet::put16(&mut p, 4, plen);
    p
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Decrypted packets of both families, damaged at random: planning them never
    /// panics, every packet in range is written exactly once (merged or alone), and
    /// a merged write's header says its true length.
    #[test]
    fn mutated_trusted_packets_of_both_families_are_each_written_once(
        kinds in proptest::collection::vec(any::<bool>(), 1..16),
        payload in 1usize..200,
        flags in prop_oneof![Just(0x10u8), Just(0x18u8), any::<u8>()],
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        cuts in proptest::collection::vec(any::<usize>(), 0..3),
        vnet in any::<bool>(),
    ) {
        let mut pkts = Vec::new();
        let mut buf = Vec::new();
        for (i, v6) in kinds.iter().enumerate() {
            let seq = 1000 + (i * payload) as u32;
            let mut p = if *v6 { segment6(seq, payload, flags) } else { segment(seq, payload, flags) };
            if let Some(c) = cuts.get(i) {
                let l = p.len();
                p.truncate(c % (l + 1));
            }
            pkts.push((buf.len() as u32, p.len() as u32));
            buf.extend_from_slice(&p);
        }
        for (at, x) in flips {
            if !buf.is_empty() {
                let len = buf.len();
                buf[at % len] ^= x;
            }
        }
        // A range past the end is skipped, not written.
        pkts.push((buf.len() as u32, 40));
        let mut d = Decap::new(vnet, true);
        let mut plan = RxPlan::with_capacity();
        d.packets(&buf, &pkts, &mut plan);
        let written: u32 = plan.writes.iter().map(|w| w.packets).sum();
        prop_assert_eq!(written as usize, kinds.len());
        for w in &plan.writes {
            let out = plan.materialize(w, &buf);
            if w.packets > 1 {
                if out[0] >> 4 == 6 {
                    prop_assert_eq!(usize::from(packet::be16(&out, 4)) + 40, out.len());
                } else {
                    prop_assert_eq!(packet::validate(&out).map(|_| ()), Ok(()));
                }
            }
        }
    }
}
