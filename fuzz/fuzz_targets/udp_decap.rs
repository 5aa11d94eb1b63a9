//! The udp backend's packet path without I/O: encapsulation of TUN reads (random
//! virtio-net headers: GSO segmentation, checksum offload) and decapsulation of
//! received datagrams (GRO strides, coalescing).
//!
//! Input: byte 0 holds flags (bit 0: vnet header, bit 1: little-endian vnet, bit 2:
//! the rest is a received datagram instead of a TUN read, bit 3: from an unknown
//! peer), bytes 1-2 the GRO stride, the rest the buffer.
#![no_main]

use std::net::Ipv4Addr;

use flannel_udp::counters::CounterValues;
use flannel_udp::packet;
use flannel_udp::peers::{Peer, PeerTable};
use flannel_udp::rx::{Decap, RxPlan};
use flannel_udp::tx::{Encap, TxBatch};
use flannel_udp::vnet::{VnetHdr, VNET_HDR_LEN};
use libfuzzer_sys::fuzz_target;

const US: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);
const PEER: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);

fn table(port: u16) -> PeerTable {
    PeerTable::new(
        [
            Peer {
                subnet: "10.244.33.0/24".parse().unwrap(),
                public_ip: US,
            },
            Peer {
                subnet: "10.244.41.0/24".parse().unwrap(),
                public_ip: PEER,
            },
        ],
        port,
    )
}

/// Decapsulates `buf` and checks every planned TUN write.
fn decap(d: &mut Decap, peers: &PeerTable, from: Ipv4Addr, buf: &mut [u8], stride: usize) {
    let mut plan = RxPlan::with_capacity();
    let mut tally = CounterValues::default();
    d.datagram(peers, u32::from(from), buf, stride, &mut plan, &mut tally);
    if peers.subnets_of(u32::from(from)).is_none() {
        assert!(plan.writes.is_empty());
    }
    for w in &plan.writes {
        let pkt = plan.materialize(w, buf);
        assert!(VnetHdr::decode(&w.vnet, d.vnet_le).is_some());
        if w.packets <= 1 {
            // One packet goes to the TUN as a valid IPv4 packet from the sender's
            // subnet (a coalesced one carries a GSO header for the kernel instead).
            assert!(packet::validate(&pkt).is_ok(), "{w:?} {pkt:?}");
            let subnets = peers.subnets_of(u32::from(from)).unwrap();
            assert!(PeerTable::contains(subnets, packet::be32(&pkt, 12)));
        }
        assert!(pkt.len() <= 65535 + VNET_HDR_LEN, "{w:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let flags = data[0];
    let (vnet, le, rx, unknown) = (
        flags & 1 != 0,
        flags & 2 != 0,
        flags & 4 != 0,
        flags & 8 != 0,
    );
    let stride = usize::from(u16::from_le_bytes([data[1], data[2]]));
    let mut buf = data[3..].to_vec();
    let peers = table(8285);

    if rx {
        let mut d = Decap::new(vnet, le);
        let from = if unknown {
            Ipv4Addr::new(10, 10, 0, 9)
        } else {
            PEER
        };
        decap(&mut d, &peers, from, &mut buf, stride);
        return;
    }

    let e = Encap {
        peers: &peers,
        tun_addr: Ipv4Addr::new(10, 244, 33, 0),
        vnet,
        vnet_le: le,
    };
    let mut out = TxBatch::default();
    let mut tally = CounterValues::default();
    e.packet(0, &mut buf, &mut out, &mut tally);
    for (_, len) in &out.icmp {
        assert!(*len <= packet::ICMP_REPLY_MAX);
    }
    // What we send, the peer receives: each datagram goes through its decapsulation.
    let mut d = Decap::new(vnet, le);
    for dg in &out.dgrams {
        assert_eq!(dg.dst.port(), 8285);
        let mut wire = out.materialize(dg, &[&buf]);
        assert!(wire.len() <= 65535, "{dg:?}");
        decap(&mut d, &peers, US, &mut wire, 0);
    }
});
