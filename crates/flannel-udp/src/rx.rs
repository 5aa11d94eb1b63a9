//! Decapsulation (peer → TUN), without I/O.
//!
//! A received datagram (with UDP GRO: several same-sized datagrams from one peer,
//! back to back) is checked packet by packet: the sender must be a current peer,
//! each packet well-formed IPv4 whose source lies in that peer's subnet. Accepted
//! packets get their TTL decremented in place. With a vnet-header TUN, consecutive
//! segments of one TCP flow are coalesced into one GSO super-packet written with a
//! single writev (the payloads are gathered where they lie; only the new headers
//! are built in a scratch arena).

use crate::counters::CounterValues;
use crate::csum;
use crate::packet::{self, be16, be32, put16, Malformed, PROTO_TCP};
use crate::peers::PeerTable;
use crate::vnet::{self, VnetHdr, VNET_HDR_LEN};

/// Flows coalesced at once within one datagram batch.
const SLOTS: usize = 8;
/// Most segments merged into one write.
const MAX_MERGE: usize = 64;
/// Largest IPv4 packet.
const MAX_IP_LEN: usize = 65535;

/// One write to the TUN: a vnet header (when enabled), header bytes from the
/// scratch arena, then `parts` (ranges of the receive buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunWrite {
    pub vnet: [u8; VNET_HDR_LEN],
    pub hdr_start: u32,
    pub hdr_len: u32,
    pub parts_start: u32,
    pub parts_len: u32,
    /// Inner packets carried (for counters).
    pub packets: u32,
    /// Inner bytes carried, as they were on the wire.
    pub bytes: u32,
}

/// The writes produced from one received datagram.
#[derive(Debug, Default)]
pub struct RxPlan {
    pub scratch: Vec<u8>,
    pub parts: Vec<(u32, u32)>,
    pub writes: Vec<TunWrite>,
}

impl RxPlan {
    pub fn with_capacity() -> Self {
        RxPlan {
            scratch: Vec::with_capacity(SLOTS * 128 + 256),
            parts: Vec::with_capacity(MAX_MERGE * 4),
            writes: Vec::with_capacity(MAX_MERGE),
        }
    }

    pub fn clear(&mut self) {
        self.scratch.clear();
        self.parts.clear();
        self.writes.clear();
    }

    /// Fills `iov` with write `w`'s pieces: its vnet header (when the TUN has
    /// one), its rewritten headers in `scratch` and its payload parts in `buf`.
    /// The iovecs point into `w`, `self` and `buf`; use them before any changes.
    pub fn iovecs(&self, w: &TunWrite, buf: &[u8], vnet: bool, iov: &mut Vec<libc::iovec>) {
        iov.clear();
        if vnet {
            iov.push(libc::iovec {
                iov_base: w.vnet.as_ptr() as *mut _,
                iov_len: VNET_HDR_LEN,
            });
        }
        if w.hdr_len > 0 {
            iov.push(libc::iovec {
                iov_base: self.scratch[w.hdr_start as usize..].as_ptr() as *mut _,
                iov_len: w.hdr_len as usize,
            });
        }
        for &(s, l) in &self.parts[w.parts_start as usize..(w.parts_start + w.parts_len) as usize] {
            iov.push(libc::iovec {
                iov_base: buf[s as usize..].as_ptr() as *mut _,
                iov_len: l as usize,
            });
        }
    }

    /// The bytes of write `w` after its vnet header (for tests and fuzzing).
    pub fn materialize(&self, w: &TunWrite, buf: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(
            &self.scratch[w.hdr_start as usize..(w.hdr_start + w.hdr_len) as usize],
        );
        for &(s, l) in &self.parts[w.parts_start as usize..(w.parts_start + w.parts_len) as usize] {
            v.extend_from_slice(&buf[s as usize..(s + l) as usize]);
        }
        v
    }
}

#[derive(Debug, Default, Clone)]
struct Slot {
    active: bool,
    /// The first packet: (start, len) in the buffer; its headers head the merge.
    first: (u32, u32),
    hlen: u32,
    /// Payload size of the first segment: every segment but the last has it.
    gso: u32,
    next_seq: u32,
    total: u32,
    closed: bool,
    psh: bool,
    bytes: u32,
    /// Payload ranges.
    parts: Vec<(u32, u32)>,
}

/// Decapsulation state of one worker (reused across datagrams: no allocation after
/// warm-up).
pub struct Decap {
    /// Coalesce TCP segments (needs a vnet-header TUN).
    pub coalesce: bool,
    /// Whether writes carry a vnet header.
    pub vnet: bool,
    pub vnet_le: bool,
    slots: Vec<Slot>,
    next_victim: usize,
}

impl Decap {
    pub fn new(vnet: bool, vnet_le: bool) -> Self {
        Decap {
            coalesce: vnet,
            vnet,
            vnet_le,
            slots: (0..SLOTS)
                .map(|_| Slot {
                    parts: Vec::with_capacity(MAX_MERGE),
                    ..Default::default()
                })
                .collect(),
            next_victim: 0,
        }
    }

    /// Checks and plans one received datagram `buf` from `from` (outer source
    /// address, host order). `stride` is the GRO segment size (0: one packet).
    /// Never panics, whatever the bytes.
    pub fn datagram(
        &mut self,
        peers: &PeerTable,
        from: u32,
        buf: &mut [u8],
        stride: usize,
        plan: &mut RxPlan,
        tally: &mut CounterValues,
    ) {
        let n = buf.len();
        let stride = if stride == 0 || stride > n {
            n.max(1)
        } else {
            stride
        };
        let nseg = n.div_ceil(stride).max(1);
        let Some(subnets) = peers.subnets_of(from) else {
            tally.rx_drop_unknown_peer += nseg as u64;
            return;
        };
        let mut at = 0usize;
        while at < n || (n == 0 && at == 0) {
            let end = (at + stride).min(n);
            let seg = &mut buf[at..end];
            let start = at;
            at = end.max(at + 1);
            match packet::validate(seg) {
                Ok(_) => {}
                Err(Malformed::Short | Malformed::NotIpv4 | Malformed::BadHeaderLen)
                | Err(Malformed::BadTotalLen | Malformed::BadChecksum) => {
                    tally.rx_drop_malformed += 1;
                    continue;
                }
            }
            if !PeerTable::contains(subnets, be32(seg, 12)) {
                tally.rx_drop_spoofed_source += 1;
                continue;
            }
            if !packet::decrement_ttl(seg) {
                tally.rx_drop_ttl += 1;
                continue;
            }
            self.accept(buf, start as u32, (end - start) as u32, plan);
        }
        self.flush_all(buf, plan);
    }

    /// Plans packets the caller has already authenticated and checked (the
    /// wireguard device's decrypted inner packets, whose source passed cryptokey
    /// routing): `pkts` are (start, len) ranges of `buf`, each one whole IP packet.
    /// No peer or TTL checks (WireGuard carries packets unchanged); valid IPv4 TCP
    /// segments are coalesced as in [`Decap::datagram`], anything else is written
    /// as it is.
    pub fn packets(&mut self, buf: &[u8], pkts: &[(u32, u32)], plan: &mut RxPlan) {
        for &(start, len) in pkts {
            let Some(pkt) = buf.get(start as usize..(start as usize).saturating_add(len as usize))
            else {
                continue;
            };
            if packet::validate(pkt).is_ok() {
                self.accept(buf, start, len, plan);
            } else {
                self.single(start, len, plan);
            }
        }
        self.flush_all(buf, plan);
    }

    fn single(&self, start: u32, len: u32, plan: &mut RxPlan) {
        plan.parts.push((start, len));
        plan.writes.push(TunWrite {
            vnet: [0; VNET_HDR_LEN],
            hdr_start: plan.scratch.len() as u32,
            hdr_len: 0,
            parts_start: plan.parts.len() as u32 - 1,
            parts_len: 1,
            packets: 1,
            bytes: len,
        });
    }

    /// Plans an accepted (validated, TTL-decremented) packet.
    fn accept(&mut self, buf: &[u8], start: u32, len: u32, plan: &mut RxPlan) {
        let pkt = &buf[start as usize..(start + len) as usize];
        if !self.coalesce {
            return self.single(start, len, plan);
        }
        let Some(hlen) = tcp_candidate(pkt) else {
            // Keep per-flow order: anything else of a flow being merged goes after it.
            if pkt[9] == PROTO_TCP && pkt.len() >= usize::from(pkt[0] & 15) * 4 + 4 {
                for i in 0..SLOTS {
                    if self.slots[i].active && same_flow(buf, &self.slots[i], pkt) {
                        self.flush(i, buf, plan);
                    }
                }
            }
            return self.single(start, len, plan);
        };
        let payload = len - hlen;
        for i in 0..SLOTS {
            if !self.slots[i].active || !same_flow(buf, &self.slots[i], pkt) {
                continue;
            }
            if self.can_merge(i, buf, pkt, hlen, payload) {
                let s = &mut self.slots[i];
                s.parts.push((start + hlen, payload));
                s.next_seq = s.next_seq.wrapping_add(payload);
                s.total += payload;
                s.bytes += len;
                if payload < s.gso || pkt[33] & 0x08 != 0 {
                    s.closed = true;
                    s.psh |= pkt[33] & 0x08 != 0;
                }
                if s.parts.len() >= MAX_MERGE {
                    self.flush(i, buf, plan);
                }
                return;
            }
            self.flush(i, buf, plan);
            return self.open_slot(i, buf, start, len, hlen, plan);
        }
        let i = match self.slots.iter().position(|s| !s.active) {
            Some(i) => i,
            None => {
                let v = self.next_victim;
                self.next_victim = (v + 1) % SLOTS;
                self.flush(v, buf, plan);
                v
            }
        };
        self.open_slot(i, buf, start, len, hlen, plan)
    }

    fn open_slot(
        &mut self,
        i: usize,
        buf: &[u8],
        start: u32,
        len: u32,
        hlen: u32,
        _plan: &mut RxPlan,
    ) {
        let pkt = &buf[start as usize..(start + len) as usize];
        let payload = len - hlen;
        let s = &mut self.slots[i];
        s.active = true;
        s.first = (start, len);
        s.hlen = hlen;
        s.gso = payload;
        s.next_seq = be32(pkt, 24).wrapping_add(payload);
        s.total = payload;
        s.bytes = len;
        s.psh = pkt[33] & 0x08 != 0;
        s.closed = s.psh;
        s.parts.clear();
        s.parts.push((start + hlen, payload));
    }

    fn can_merge(&self, i: usize, buf: &[u8], pkt: &[u8], hlen: u32, payload: u32) -> bool {
        let s = &self.slots[i];
        if s.closed || hlen != s.hlen || payload > s.gso {
            return false;
        }
        if (s.hlen + s.total + payload) as usize > MAX_IP_LEN {
            return false;
        }
        let first = &buf[s.first.0 as usize..(s.first.0 + s.first.1) as usize];
        let h = hlen as usize;
        // TOS, DF and TTL alike; TCP ack, window and options alike; in sequence.
        first[1] == pkt[1]
            && first[6] == pkt[6]
            && first[8] == pkt[8]
            && be32(pkt, 24) == s.next_seq
            && first[28..32] == pkt[28..32]
            && first[34..36] == pkt[34..36]
            && first[40..h] == pkt[40..h]
    }

    fn flush_all(&mut self, buf: &[u8], plan: &mut RxPlan) {
        for i in 0..SLOTS {
            if self.slots[i].active {
                self.flush(i, buf, plan);
            }
        }
        self.next_victim = 0;
    }

    fn flush(&mut self, i: usize, buf: &[u8], plan: &mut RxPlan) {
        let s = &mut self.slots[i];
        s.active = false;
        if s.parts.len() == 1 {
            let (start, len) = s.first;
            return self.single(start, len, plan);
        }
        let first = &buf[s.first.0 as usize..(s.first.0 + s.first.1) as usize];
        let hlen = s.hlen as usize;
        let h0 = plan.scratch.len();
        plan.scratch.extend_from_slice(&first[..hlen]);
        let h = &mut plan.scratch[h0..];
        put16(h, 2, (hlen as u32 + s.total) as u16);
        put16(h, 10, 0);
        let c = csum::ipv4_header(&h[..20]);
        put16(h, 10, c);
        if s.psh {
            h[33] |= 0x08;
        }
        // CHECKSUM_PARTIAL: the field holds the pseudo-header sum; the kernel (or
        // the pod's stack) treats the payload as verified by the outer UDP checksum.
        let ps = csum::pseudo(
            packet::src(h),
            packet::dst(h),
            PROTO_TCP,
            hlen as u32 - 20 + s.total,
        );
        put16(h, 36, csum::fold(ps));
        let mut v = [0u8; VNET_HDR_LEN];
        VnetHdr {
            flags: vnet::F_NEEDS_CSUM,
            gso_type: vnet::GSO_TCPV4,
            hdr_len: hlen as u16,
            gso_size: s.gso as u16,
            csum_start: 20,
            csum_offset: 16,
        }
        .encode(&mut v, self.vnet_le);
        let p0 = plan.parts.len();
        plan.parts.extend_from_slice(&s.parts);
        plan.writes.push(TunWrite {
            vnet: v,
            hdr_start: h0 as u32,
            hdr_len: hlen as u32,
            parts_start: p0 as u32,
            parts_len: s.parts.len() as u32,
            packets: s.parts.len() as u32,
            bytes: s.bytes,
        });
    }
}

/// Header length (IP + TCP) when `pkt` (validated) is a data segment that can be
/// merged: 20-byte IP header, not a fragment, TCP with only ACK (and PSH) set.
fn tcp_candidate(pkt: &[u8]) -> Option<u32> {
    if pkt[0] != 0x45 || pkt[9] != PROTO_TCP || be16(pkt, 6) & 0x3fff != 0 {
        return None;
    }
    if pkt.len() < 40 {
        return None;
    }
    let thl = usize::from(pkt[32] >> 4) * 4;
    if thl < 20 || 20 + thl >= pkt.len() {
        return None;
    }
    if pkt[33] & !0x08 != 0x10 {
        return None;
    }
    Some((20 + thl) as u32)
}

/// Same addresses and ports as the slot's first packet.
fn same_flow(buf: &[u8], s: &Slot, pkt: &[u8]) -> bool {
    let first = &buf[s.first.0 as usize..(s.first.0 + s.first.1) as usize];
    let ihl = usize::from(pkt[0] & 15) * 4;
    pkt[0] == 0x45 && first[12..20] == pkt[12..20] && first[20..24] == pkt[ihl..ihl + 4]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::tests_support::A3_INNER;
    use crate::peers::Peer;
    use std::net::Ipv4Addr;

    const PEER: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);

    fn table() -> PeerTable {
        PeerTable::new(
            [Peer {
                subnet: "10.244.33.0/24".parse().unwrap(),
                public_ip: PEER,
            }],
            8285,
        )
    }

    fn run(
        d: &mut Decap,
        from: Ipv4Addr,
        buf: &mut [u8],
        stride: usize,
    ) -> (RxPlan, CounterValues) {
        let mut plan = RxPlan::with_capacity();
        let mut tally = CounterValues::default();
        d.datagram(
            &table(),
            u32::from(from),
            buf,
            stride,
            &mut plan,
            &mut tally,
        );
        (plan, tally)
    }

    #[test]
    fn appendix_a3_datagram_is_written_with_ttl_61() {
        for vnet in [false, true] {
            let mut d = Decap::new(vnet, true);
            let mut buf = A3_INNER.to_vec();
            let (plan, tally) = run(&mut d, PEER, &mut buf, 0);
            assert_eq!(plan.writes.len(), 1);
            let w = plan.writes[0];
            assert_eq!(w.vnet, [0; VNET_HDR_LEN]);
            let out = plan.materialize(&w, &buf);
            assert_eq!(out[8], 61);
            assert_eq!(packet::validate(&out), Ok(20));
            assert_eq!(&out[12..], &A3_INNER[12..]);
            assert!(tally.is_zero());
        }
    }

    #[test]
    fn drops_are_counted_by_reason() {
        let mut d = Decap::new(false, true);
        let mut buf = A3_INNER.to_vec();
        let (p, t) = run(&mut d, Ipv4Addr::new(10, 10, 0, 9), &mut buf, 0);
        assert!(p.writes.is_empty());
        assert_eq!(t.rx_drop_unknown_peer, 1);

        // Inner source outside the peer's subnet.
        let mut buf = A3_INNER.to_vec();
        buf[14] = 34;
        put16(&mut buf, 10, 0);
        let c = csum::ipv4_header(&buf[..20]);
        put16(&mut buf, 10, c);
        let (p, t) = run(&mut d, PEER, &mut buf, 0);
        assert!(p.writes.is_empty());
        assert_eq!(t.rx_drop_spoofed_source, 1);

        for junk in [&b"hello"[..], &A3_INNER[..30], &[0x60; 60][..]] {
            let mut buf = junk.to_vec();
            let (p, t) = run(&mut d, PEER, &mut buf, 0);
            assert!(p.writes.is_empty());
            assert_eq!(t.rx_drop_malformed, 1);
        }

        let mut buf = A3_INNER.to_vec();
        buf[8] = 1;
        put16(&mut buf, 10, 0);
        let c = csum::ipv4_header(&buf[..20]);
        put16(&mut buf, 10, c);
        let (p, t) = run(&mut d, PEER, &mut buf, 0);
        assert!(p.writes.is_empty());
        assert_eq!(t.rx_drop_ttl, 1);
    }

    /// Segments of one flow, as a peer's TSO split (TTL 62 on the wire).
    fn segments(n: usize, mss: usize, last: usize, seq0: u32) -> (Vec<u8>, Vec<u8>) {
        let mut buf = Vec::new();
        let mut data = Vec::new();
        for i in 0..n {
            let len = if i + 1 == n { last } else { mss };
            let mut p = vec![
                0x45, 0, 0, 0, 0, i as u8, 0x40, 0, 62, 6, 0, 0, 10, 244, 33, 11, 10, 244, 41, 11,
                0x9c, 0x40, 0x14, 0x51, 0, 0, 0, 0, 0, 0, 0, 1, 0x80, 0x10, 0x01, 0xf5, 0, 0, 0, 0,
                1, 1, 8, 10, 0, 0, 0, 7, 0, 0, 0, 9,
            ];
            p[28..32].copy_from_slice(&[0, 0, 0, 1]);
            crate::packet::put32(&mut p, 24, seq0.wrapping_add((i * mss) as u32));
            if i + 1 == n {
                p[33] = 0x18;
            }
            let body: Vec<u8> = (0..len).map(|k| (k + i * 7) as u8).collect();
            data.extend_from_slice(&body);
            p.extend_from_slice(&body);
            let plen = p.len() as u16;
            put16(&mut p, 2, plen);
            let c = csum::ipv4_header(&p[..20]);
            put16(&mut p, 10, c);
            let s = csum::pseudo(packet::src(&p), packet::dst(&p), 6, (p.len() - 20) as u32);
            let c = csum::finish(csum::add(s, &p[20..]));
            put16(&mut p, 36, c);
            buf.extend_from_slice(&p);
        }
        (buf, data)
    }

    #[test]
    fn gro_batch_of_one_flow_becomes_one_tso_write() {
        let mut d = Decap::new(true, true);
        let (mut buf, data) = segments(5, 1400, 700, 0xffff_f000);
        let (plan, tally) = run(&mut d, PEER, &mut buf, 1452);
        assert!(tally.is_zero(), "{tally:?}");
        assert_eq!(plan.writes.len(), 1);
        let w = plan.writes[0];
        assert_eq!(w.packets, 5);
        let h = VnetHdr::decode(&w.vnet, true).unwrap();
        assert_eq!(h.gso_type, vnet::GSO_TCPV4);
        assert_eq!(h.gso_size, 1400);
        assert_eq!(h.flags, vnet::F_NEEDS_CSUM);
        assert_eq!((h.hdr_len, h.csum_start, h.csum_offset), (52, 20, 16));
        let out = plan.materialize(&w, &buf);
        assert_eq!(packet::validate(&out), Ok(20));
        assert_eq!(out[8], 61);
        assert_eq!(out[33], 0x18, "PSH of the last segment kept");
        assert_eq!(be32(&out, 24), 0xffff_f000);
        assert_eq!(&out[52..], &data[..]);
        // Partial checksum: pseudo header only; completing it gives a valid segment.
        let mut full = out.clone();
        let c = csum::finish(csum::add(0, &full[20..]));
        put16(&mut full, 36, c);
        let s = csum::pseudo(
            packet::src(&full),
            packet::dst(&full),
            6,
            (full.len() - 20) as u32,
        );
        assert_eq!(csum::fold(csum::add(s, &full[20..])), 0xffff);
    }

    #[test]
    fn trusted_packets_are_coalesced_with_ttl_kept_and_others_written_as_they_are() {
        let mut d = Decap::new(true, true);
        let (mut buf, data) = segments(3, 1368, 500, 7);
        let mut pkts = vec![(0, 1420), (1420, 1420), (2840, 552)];
        // An IPv6 packet (not coalesced, not checked as IPv4) and a range past the
        // end (ignored).
        let v6 = [0x60u8; 48];
        pkts.push((buf.len() as u32, 48));
        buf.extend_from_slice(&v6);
        pkts.push((buf.len() as u32, 10));
        let mut plan = RxPlan::with_capacity();
        d.packets(&buf, &pkts, &mut plan);
        // The other flow's packet goes out at once; the merged flow when flushed.
        assert_eq!(plan.writes.len(), 2);
        assert_eq!(plan.materialize(&plan.writes[0], &buf), v6.to_vec());
        assert_eq!(plan.writes[0].vnet, [0; VNET_HDR_LEN]);
        let w = plan.writes[1];
        assert_eq!(w.packets, 3);
        let out = plan.materialize(&w, &buf);
        assert_eq!(out[8], 62, "TTL untouched");
        assert_eq!(&out[52..], &data[..]);
    }

    #[test]
    fn out_of_order_and_other_flows_are_not_merged() {
        let mut d = Decap::new(true, true);
        let (a, _) = segments(2, 1000, 1000, 100);
        let (b, _) = segments(1, 1000, 1000, 5000);
        let mut buf = [&a[..], &b[..]].concat();
        let (plan, _) = run(&mut d, PEER, &mut buf, 1052);
        // The first two merge (PSH on #2 closes the run), the third is alone.
        assert_eq!(plan.writes.len(), 2);
        assert_eq!(plan.writes[0].packets + plan.writes[1].packets, 3);

        let mut d = Decap::new(false, true);
        let (mut buf, _) = segments(3, 1000, 1000, 100);
        let (plan, _) = run(&mut d, PEER, &mut buf, 1052);
        assert_eq!(plan.writes.len(), 3, "plain mode writes packet by packet");
        for w in &plan.writes {
            assert_eq!(w.hdr_len, 0);
            assert_eq!(packet::validate(&plan.materialize(w, &buf)), Ok(20));
        }
    }

    #[test]
    fn bad_segment_in_a_batch_is_dropped_alone() {
        let mut d = Decap::new(true, true);
        let (mut buf, _) = segments(4, 1000, 1000, 100);
        buf[1052 + 15] ^= 0xff; // corrupt segment 2's header
        let (plan, tally) = run(&mut d, PEER, &mut buf, 1052);
        assert_eq!(tally.rx_drop_malformed, 1);
        let total: u32 = plan.writes.iter().map(|w| w.packets).sum();
        assert_eq!(total, 3);
    }
}
