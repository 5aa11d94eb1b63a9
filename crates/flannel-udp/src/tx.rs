//! Encapsulation (TUN → peer), without I/O.
//!
//! Each packet read from the TUN becomes one or more wire datagrams, each a bare
//! IPv4 packet exactly as upstream sends it. A GSO super-packet (TSO/USO from the
//! TUN's offloads) is segmented here once: the segment headers are built in a
//! scratch arena and the payloads stay where the TUN read put them, so the send
//! path gathers both with iovecs and copies nothing.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use crate::counters::CounterValues;
use crate::csum;
use crate::gso::{GsoSplit, Unsplittable};
use crate::packet::{self, be16, be32, put16};
use crate::peers::PeerTable;
use crate::vnet::{self, VnetHdr};

/// Largest number of segments one TUN read may carry that we accept.
pub const MAX_SEGMENTS_PER_READ: usize = 2048;

/// Segments per read the arenas are sized for up front (64 KiB at the usual MSS).
const TYPICAL_SEGMENTS_PER_READ: usize = 64;

/// One datagram to send: header bytes from the scratch arena (possibly empty)
/// followed by body bytes from read buffer `buf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dgram {
    pub dst: SocketAddr,
    pub buf: u32,
    pub hdr_start: u32,
    pub hdr_len: u32,
    pub body_start: u32,
    pub body_len: u32,
}

impl Dgram {
    #[inline]
    pub fn len(&self) -> usize {
        (self.hdr_len + self.body_len) as usize
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The datagrams and ICMP replies produced from a batch of TUN reads.
#[derive(Debug, Default)]
pub struct TxBatch {
    pub scratch: Vec<u8>,
    pub dgrams: Vec<Dgram>,
    /// ICMP net-unreachable replies to write back into the TUN.
    pub icmp: Vec<([u8; packet::ICMP_REPLY_MAX], usize)>,
}

impl TxBatch {
    pub fn with_capacity(reads: usize) -> Self {
        TxBatch {
            scratch: Vec::with_capacity(reads * TYPICAL_SEGMENTS_PER_READ * 120),
            dgrams: Vec::with_capacity(reads * TYPICAL_SEGMENTS_PER_READ),
            icmp: Vec::with_capacity(8),
        }
    }

    pub fn clear(&mut self) {
        self.scratch.clear();
        self.dgrams.clear();
        self.icmp.clear();
    }

    /// The bytes of `d` (for tests and the per-packet fallback).
    pub fn materialize(&self, d: &Dgram, bufs: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::with_capacity(d.len());
        v.extend_from_slice(
            &self.scratch[d.hdr_start as usize..(d.hdr_start + d.hdr_len) as usize],
        );
        v.extend_from_slice(
            &bufs[d.buf as usize][d.body_start as usize..(d.body_start + d.body_len) as usize],
        );
        v
    }
}

/// Encapsulation context shared by all reads of a worker.
pub struct Encap<'a> {
    pub peers: &'a PeerTable,
    pub tun_addr: Ipv4Addr,
    /// Whether reads start with a virtio-net header.
    pub vnet: bool,
    pub vnet_le: bool,
}

impl Encap<'_> {
    /// Processes one TUN read (`read` is the whole read, vnet header included when
    /// enabled), stored as buffer number `buf`. Appends datagrams to `out` and
    /// tallies drops.
    pub fn packet(&self, buf: u32, read: &mut [u8], out: &mut TxBatch, tally: &mut CounterValues) {
        let (hdr, off) = if self.vnet {
            match VnetHdr::decode(read, self.vnet_le) {
                Some(h) => (h, vnet::VNET_HDR_LEN),
                None => {
                    tally.tx_drop_malformed += 1;
                    return;
                }
            }
        } else {
            (VnetHdr::default(), 0)
        };
        let pkt = &mut read[off..];
        let ihl = match packet::header_len(pkt) {
            Ok(l) => l,
            Err(_) => {
                tally.tx_drop_malformed += 1;
                return;
            }
        };
        match hdr.gso_type & !vnet::GSO_ECN {
            vnet::GSO_NONE => self.single(buf, off, pkt, ihl, &hdr, out, tally),
            vnet::GSO_TCPV4 | vnet::GSO_UDP_L4 => {
                self.segment(buf, off, pkt, ihl, &hdr, out, tally)
            }
            _ => tally.tx_drop_malformed += 1,
        }
    }

    /// Destination of `pkt`, or None after handling the no-route case.
    fn route(
        &self,
        pkt: &[u8],
        count: u64,
        out: &mut TxBatch,
        tally: &mut CounterValues,
    ) -> Option<SocketAddrV4> {
        if let Some(d) = self.peers.route(be32(pkt, 16)) {
            return Some(d);
        }
        tally.tx_drop_no_route += count;
        let mut reply = [0u8; packet::ICMP_REPLY_MAX];
        if let Some(n) = packet::net_unreachable(pkt, self.tun_addr, &mut reply) {
            out.icmp.push((reply, n));
        }
        None
    }

    #[allow(clippy::too_many_arguments)]
    fn single(
        &self,
        buf: u32,
        off: usize,
        pkt: &mut [u8],
        ihl: usize,
        hdr: &VnetHdr,
        out: &mut TxBatch,
        tally: &mut CounterValues,
    ) {
        let tot = usize::from(be16(pkt, 2));
        if tot < ihl || tot > pkt.len() {
            tally.tx_drop_malformed += 1;
            return;
        }
        // Trailing bytes beyond the IP length are not part of the packet.
        let pkt = &mut pkt[..tot];
        let Some(dst) = self.route(pkt, 1, out, tally) else {
            return;
        };
        if hdr.flags & vnet::F_NEEDS_CSUM != 0 && !finish_partial_csum(pkt, hdr) {
            tally.tx_drop_malformed += 1;
            return;
        }
        if !packet::decrement_ttl(pkt) {
            tally.tx_drop_ttl += 1;
            return;
        }
        tally.tx_packets += 1;
        tally.tx_bytes += tot as u64;
        out.dgrams.push(Dgram {
            dst: SocketAddr::V4(dst),
            buf,
            hdr_start: out.scratch.len() as u32,
            hdr_len: 0,
            body_start: off as u32,
            body_len: tot as u32,
        });
    }

    /// Splits a TSO (TCPv4) or USO (UDPv4) super-packet into the packets the
    /// kernel would have put on the wire.
    #[allow(clippy::too_many_arguments)]
    fn segment(
        &self,
        buf: u32,
        off: usize,
        pkt: &mut [u8],
        ihl: usize,
        hdr: &VnetHdr,
        out: &mut TxBatch,
        tally: &mut CounterValues,
    ) {
        let split = match GsoSplit::plan(pkt, ihl, hdr, MAX_SEGMENTS_PER_READ) {
            Ok(s) => s,
            Err(Unsplittable::Malformed) => {
                tally.tx_drop_malformed += 1;
                return;
            }
            Err(Unsplittable::TooManySegments(n)) => {
                tally.tx_drop_malformed += n as u64;
                return;
            }
        };
        let (hlen, nseg) = (split.hlen, split.nseg);
        let Some(dst) = self.route(pkt, nseg as u64, out, tally) else {
            return;
        };
        if pkt[8] <= 1 {
            tally.tx_drop_ttl += nseg as u64;
            return;
        }
        for i in 0..nseg {
            let (start, seglen) = split.payload_of(i);
            let body = &pkt[start..start + seglen];
            let h0 = out.scratch.len();
            out.scratch.extend_from_slice(&pkt[..hlen]);
            let h = &mut out.scratch[h0..];
            h[8] -= 1;
            split.write_header(h, body, i);
            out.dgrams.push(Dgram {
                dst: SocketAddr::V4(dst),
                buf,
                hdr_start: h0 as u32,
                hdr_len: hlen as u32,
                body_start: (off + start) as u32,
                body_len: seglen as u32,
            });
            tally.tx_packets += 1;
            tally.tx_bytes += (hlen + seglen) as u64;
        }
    }
}

/// Completes a checksum the kernel left partial (VIRTIO_NET_HDR_F_NEEDS_CSUM): the
/// field holds the pseudo-header sum; the checksum covers `csum_start..`.
fn finish_partial_csum(pkt: &mut [u8], hdr: &VnetHdr) -> bool {
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    if at + 2 > pkt.len() || start < packet::IPV4_MIN_HDR {
        return false;
    }
    let c = csum::finish(csum::add(0, &pkt[start..]));
    // A computed 0 goes out as 0xffff (RFC 768; the kernel's skb_checksum_help does
    // the same), which is equivalent for TCP.
    put16(pkt, at, if c == 0 { 0xffff } else { c });
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{PROTO_TCP, PROTO_UDP};
    use crate::peers::Peer;

    fn table() -> PeerTable {
        PeerTable::new(
            [Peer {
                subnet: "10.244.41.0/24".parse().unwrap(),
                public_ip: Ipv4Addr::new(10, 10, 0, 2),
            }],
            8285,
        )
    }

    fn enc(peers: &PeerTable, vnet: bool) -> Encap<'_> {
        Encap {
            peers,
            tun_addr: Ipv4Addr::new(10, 244, 33, 0),
            vnet,
            vnet_le: true,
        }
    }

    /// Appendix A.3's packet as the sender's TUN hands it over (TTL 63).
    fn a3_from_tun() -> Vec<u8> {
        let mut p = crate::packet::tests_support::A3_INNER.to_vec();
        p[8] = 0x3f;
        put16(&mut p, 10, 0);
        let c = csum::ipv4_header(&p[..20]);
        put16(&mut p, 10, c);
        p
    }

    #[test]
    fn plain_packet_becomes_appendix_a3_payload() {
        let t = table();
        let e = enc(&t, false);
        let mut b = TxBatch::default();
        let mut tally = CounterValues::default();
        let mut read = a3_from_tun();
        e.packet(0, &mut read, &mut b, &mut tally);
        assert_eq!(b.dgrams.len(), 1);
        let d = b.dgrams[0];
        assert_eq!(d.dst, "10.10.0.2:8285".parse().unwrap());
        assert_eq!(
            b.materialize(&d, &[&read]),
            crate::packet::tests_support::A3_INNER.to_vec()
        );
        assert_eq!(tally.tx_packets, 1);
        assert_eq!(tally.tx_bytes, 52);
    }

    #[test]
    fn vnet_header_is_stripped_for_plain_packets() {
        let t = table();
        let e = enc(&t, true);
        let mut read = vec![0u8; vnet::VNET_HDR_LEN];
        read.extend_from_slice(&a3_from_tun());
        let mut b = TxBatch::default();
        let mut tally = CounterValues::default();
        e.packet(3, &mut read, &mut b, &mut tally);
        let d = b.dgrams[0];
        assert_eq!(d.buf, 3);
        assert_eq!(
            b.materialize(&d, &[&[], &[], &[], &read]),
            crate::packet::tests_support::A3_INNER.to_vec()
        );
    }

    #[test]
    fn no_route_answers_net_unreachable_and_counts() {
        let t = table();
        let e = enc(&t, false);
        let mut read = a3_from_tun();
        read[9] = PROTO_UDP; // ICMP offenders get no reply
        read[18] = 99;
        put16(&mut read, 10, 0);
        let c = csum::ipv4_header(&read[..20]);
        put16(&mut read, 10, c);
        let mut b = TxBatch::default();
        let mut tally = CounterValues::default();
        e.packet(0, &mut read, &mut b, &mut tally);
        assert!(b.dgrams.is_empty());
        assert_eq!(tally.tx_drop_no_route, 1);
        assert_eq!(b.icmp.len(), 1);
        let (r, n) = &b.icmp[0];
        assert_eq!(&r[12..16], &[10, 244, 33, 0]);
        assert_eq!(&r[16..20], &[10, 244, 33, 11]);
        assert_eq!(&r[28..*n], &read[..28]);
    }

    #[test]
    fn ttl_one_is_dropped_after_route_lookup() {
        let t = table();
        let e = enc(&t, false);
        let mut read = a3_from_tun();
        read[8] = 1;
        let mut b = TxBatch::default();
        let mut tally = CounterValues::default();
        e.packet(0, &mut read, &mut b, &mut tally);
        assert!(b.dgrams.is_empty());
        assert_eq!(tally.tx_drop_ttl, 1);
    }

    #[test]
    fn non_ipv4_is_dropped() {
        let t = table();
        let e = enc(&t, false);
        let mut read = vec![0x60u8; 48];
        let mut b = TxBatch::default();
        let mut tally = CounterValues::default();
        e.packet(0, &mut read, &mut b, &mut tally);
        assert_eq!(tally.tx_drop_malformed, 1);
    }

    /// A TSO super-packet: 10.244.33.11:40000 → 10.244.41.11:5201, with timestamps.
    pub(crate) fn tso_packet(payload: usize, mss: u16, flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; vnet::VNET_HDR_LEN];
        VnetHdr {
            flags: vnet::F_NEEDS_CSUM,
            gso_type: vnet::GSO_TCPV4,
            hdr_len: 52,
            gso_size: mss,
            csum_start: 20,
            csum_offset: 16,
        }
        .encode((&mut p[..]).try_into().unwrap(), true);
        let tot = 52 + payload;
        let mut ip = vec![
            0x45, 0, 0, 0, 0x12, 0x00, 0x40, 0x00, 63, 6, 0, 0, 10, 244, 33, 11, 10, 244, 41, 11,
        ];
        put16(&mut ip, 2, tot.min(0xffff) as u16);
        p.extend_from_slice(&ip);
        let tcp = [
            0x9c, 0x40, 0x14, 0x51, 0x10, 0x20, 0x30, 0x40, 0, 0, 0, 1, 0x80, flags, 0x01, 0xf5,
            0xaa, 0xbb, 0, 0, 1, 1, 8, 10, 0, 0, 0, 7, 0, 0, 0, 9,
        ];
        p.extend_from_slice(&tcp);
        p.extend((0..payload).map(|n| (n * 31 + 7) as u8));
        p
    }

    fn tcp_csum_ok(seg: &[u8]) -> bool {
        let ihl = usize::from(seg[0] & 15) * 4;
        let s = csum::pseudo(
            packet::src(seg),
            packet::dst(seg),
            PROTO_TCP,
            (seg.len() - ihl) as u32,
        );
        csum::fold(csum::add(s, &seg[ihl..])) == 0xffff
    }

    #[test]
    fn tso_is_segmented_into_valid_wire_packets() {
        let t = table();
        let e = enc(&t, true);
        let payload = 1400 * 3 + 500;
        let mut read = tso_packet(payload, 1400, 0x18 | 0x01 | 0x80);
        let orig = read.clone();
        let mut b = TxBatch::default();
        let mut tally = CounterValues::default();
        e.packet(0, &mut read, &mut b, &mut tally);
        assert_eq!(b.dgrams.len(), 4);
        assert_eq!(tally.tx_packets, 4);
        let mut seq = 0x1020_3040u32;
        let mut data = Vec::new();
        for (i, d) in b.dgrams.iter().enumerate() {
            let seg = b.materialize(d, &[&read]);
            assert_eq!(packet::validate(&seg), Ok(20), "segment {i}");
            assert_eq!(seg[8], 62, "TTL decremented once");
            assert_eq!(be16(&seg, 4), 0x1200 + i as u16);
            assert!(tcp_csum_ok(&seg), "segment {i} TCP checksum");
            assert_eq!(be32(&seg, 24), seq);
            let flags = seg[33];
            let last = i == 3;
            assert_eq!(flags & 0x09 != 0, last, "FIN/PSH on last only");
            assert_eq!(flags & 0x80 != 0, i == 0, "CWR on first only");
            assert_eq!(&seg[40..52], &orig[50..62], "options kept");
            let body = &seg[52..];
            assert_eq!(body.len(), if last { 500 } else { 1400 });
            seq = seq.wrapping_add(body.len() as u32);
            data.extend_from_slice(body);
        }
        assert_eq!(&data[..], &orig[62..]);
    }

    #[test]
    fn uso_is_segmented_with_udp_checksums() {
        let t = table();
        let e = enc(&t, true);
        let mut read = vec![0u8; vnet::VNET_HDR_LEN];
        VnetHdr {
            flags: vnet::F_NEEDS_CSUM,
            gso_type: vnet::GSO_UDP_L4,
            hdr_len: 28,
            gso_size: 1000,
            csum_start: 20,
            csum_offset: 6,
        }
        .encode((&mut read[..]).try_into().unwrap(), true);
        let mut ip = vec![
            0x45, 0, 0x0b, 0xd4, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 244, 33, 11, 10, 244, 41, 12,
        ];
        put16(&mut ip, 2, 28 + 2500);
        read.extend_from_slice(&ip);
        read.extend_from_slice(&[0x13, 0x88, 0x13, 0x89, 0, 0, 0, 0]);
        read.extend((0..2500u32).map(|n| (n * 13) as u8));
        let mut b = TxBatch::default();
        let mut tally = CounterValues::default();
        e.packet(0, &mut read, &mut b, &mut tally);
        assert_eq!(b.dgrams.len(), 3);
        for d in &b.dgrams {
            let seg = b.materialize(d, &[&read]);
            assert_eq!(packet::validate(&seg), Ok(20));
            assert_eq!(usize::from(be16(&seg, 24)), seg.len() - 20);
            let s = csum::pseudo(
                packet::src(&seg),
                packet::dst(&seg),
                PROTO_UDP,
                (seg.len() - 20) as u32,
            );
            assert_eq!(csum::fold(csum::add(s, &seg[20..])), 0xffff);
        }
    }

    #[test]
    fn partial_checksum_is_completed() {
        let t = table();
        let e = enc(&t, true);
        // One TCP segment with the pseudo-header sum in its checksum field.
        let mut read = tso_packet(300, 1400, 0x18);
        read[1] = vnet::GSO_NONE;
        let pkt = &mut read[vnet::VNET_HDR_LEN..];
        put16(pkt, 2, 352);
        put16(pkt, 10, 0);
        let c = csum::ipv4_header(&pkt[..20]);
        put16(pkt, 10, c);
        let ps = csum::fold(csum::pseudo(packet::src(pkt), packet::dst(pkt), 6, 332));
        put16(pkt, 36, ps);
        let mut b = TxBatch::default();
        let mut tally = CounterValues::default();
        e.packet(0, &mut read, &mut b, &mut tally);
        assert_eq!(b.dgrams.len(), 1);
        let seg = b.materialize(&b.dgrams[0], &[&read]);
        assert_eq!(packet::validate(&seg), Ok(20));
        assert!(tcp_csum_ok(&seg));
    }
}
