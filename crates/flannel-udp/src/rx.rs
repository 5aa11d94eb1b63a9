//! Decapsulation (peer → TUN), without I/O.
//!
//! A received datagram (with UDP GRO: several same-sized datagrams from one peer,
//! back to back) is checked packet by packet: the sender must be a current peer,
//! each packet well-formed IPv4 whose source lies in that peer's subnet. Accepted
//! packets get their TTL decremented in place. With a vnet-header TUN, consecutive
//! segments of one TCP flow (IPv4 here; IPv6 too for the wireguard device's
//! decrypted packets) are coalesced into one GSO super-packet written with a
//! single writev (the payloads are gathered where they lie; only the new headers
//! are built in a scratch arena).

use crate::counters::CounterValues;
use crate::csum;
use crate::gso::IPV6_HDR;
use crate::packet::{self, be16, be32, put16, Malformed, PROTO_TCP, PROTO_UDP};
use crate::peers::PeerTable;
use crate::vnet::{self, VnetHdr, VNET_HDR_LEN};

/// Flows coalesced at once within one datagram batch.
const SLOTS: usize = 8;
/// Most segments merged into one write.
const MAX_MERGE: usize = 64;
/// Largest IPv4 packet.
const MAX_IP_LEN: usize = 65535;
const PROTO_ICMPV6: u8 = 58;

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
    /// IP header length: 20 (IPv4 without options) or 40 (IPv6).
    ihl: u32,
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
    /// The packets were authenticated end to end (WireGuard's AEAD): a lone
    /// TCP/UDP packet is written with its checksum left partial, so the kernel
    /// does not verify it again (kernel WireGuard marks decrypted packets
    /// CHECKSUM_UNNECESSARY for the same reason). Needs a vnet header.
    pub trust_checksums: bool,
    slots: Vec<Slot>,
    next_victim: usize,
}

impl Decap {
    pub fn new(vnet: bool, vnet_le: bool) -> Self {
        Decap {
            coalesce: vnet,
            vnet,
            vnet_le,
            trust_checksums: false,
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
    /// No peer or TTL checks (WireGuard carries packets unchanged); valid IPv4 and
    /// IPv6 TCP segments are coalesced as in [`Decap::datagram`], anything else is
    /// written as it is.
    pub fn packets(&mut self, buf: &[u8], pkts: &[(u32, u32)], plan: &mut RxPlan) {
        for &(start, len) in pkts {
            let Some(pkt) = buf.get(start as usize..(start as usize).saturating_add(len as usize))
            else {
                continue;
            };
            if packet::validate(pkt).is_ok() || ipv6_whole(pkt) {
                self.accept(buf, start, len, plan);
            } else {
                self.single(buf, start, len, plan);
            }
        }
        self.flush_all(buf, plan);
    }

    fn single(&self, buf: &[u8], start: u32, len: u32, plan: &mut RxPlan) {
        if self.trust_checksums && self.vnet && self.single_partial(buf, start, len, plan) {
            return;
        }
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

    /// Plans a lone TCP or UDP packet (IPv4 without a fragment offset, or IPv6
    /// without extension headers) with its checksum left partial: the header up
    /// to the checksum field is copied to the scratch arena with the pseudo-header
    /// sum in the field, and the write says F_NEEDS_CSUM. The kernel then takes the
    /// packet as CHECKSUM_PARTIAL, which the receiving stack (the pod behind a
    /// veth) does not verify; this kernel's TUN ignores F_DATA_VALID (the
    /// tun_checksum test shows both). False when the packet is anything else.
    fn single_partial(&self, buf: &[u8], start: u32, len: u32, plan: &mut RxPlan) -> bool {
        let Some(pkt) = buf.get(start as usize..(start + len) as usize) else {
            return false;
        };
        let (l4, proto) = match pkt.first().map(|b| b >> 4) {
            // Not a fragment at all: a first fragment's checksum covers more.
            Some(4) if packet::validate(pkt).is_ok() && be16(pkt, 6) & 0x3fff == 0 => {
                (usize::from(pkt[0] & 15) * 4, pkt[9])
            }
            Some(6) if ipv6_whole(pkt) => (IPV6_HDR, pkt[6]),
            _ => return false,
        };
        let (field, min) = match proto {
            PROTO_TCP => (16, 20),
            PROTO_UDP => (6, 8),
            _ => return false,
        };
        if pkt.len() < l4 + min {
            return false;
        }
        // An IPv4 UDP checksum of 0 means "none": there is nothing to verify.
        if proto == PROTO_UDP && l4 != IPV6_HDR && be16(pkt, l4 + 6) == 0 {
            return false;
        }
        let hdr = l4 + field + 2;
        let h0 = plan.scratch.len();
        plan.scratch.extend_from_slice(&pkt[..hdr]);
        let ps = pseudo_sum(&plan.scratch[h0..], l4, proto, (pkt.len() - l4) as u32);
        put16(&mut plan.scratch[h0..], l4 + field, csum::fold(ps));
        let mut v = [0u8; VNET_HDR_LEN];
        VnetHdr {
            flags: vnet::F_NEEDS_CSUM,
            gso_type: vnet::GSO_NONE,
            hdr_len: hdr as u16,
            gso_size: 0,
            csum_start: l4 as u16,
            csum_offset: field as u16,
        }
        .encode(&mut v, self.vnet_le);
        plan.parts.push((start + hdr as u32, len - hdr as u32));
        plan.writes.push(TunWrite {
            vnet: v,
            hdr_start: h0 as u32,
            hdr_len: hdr as u32,
            parts_start: plan.parts.len() as u32 - 1,
            parts_len: 1,
            packets: 1,
            bytes: len,
        });
        true
    }

    /// Plans an accepted (validated, TTL-decremented) packet.
    fn accept(&mut self, buf: &[u8], start: u32, len: u32, plan: &mut RxPlan) {
        let pkt = &buf[start as usize..(start + len) as usize];
        if !self.coalesce {
            return self.single(buf, start, len, plan);
        }
        let Some((ihl, hlen)) = tcp_candidate(pkt) else {
            // Keep per-flow order: anything else of a flow being merged goes after
            // it. An IPv6 packet whose transport hides behind extension headers may
            // belong to any IPv6 flow.
            let v6 = pkt[0] >> 4 == 6;
            let hidden = v6 && !matches!(pkt[6], PROTO_TCP | PROTO_UDP | PROTO_ICMPV6);
            let l4 = tcp_offset(pkt);
            for i in 0..SLOTS {
                let s = &self.slots[i];
                // An inactive slot's first packet lies in an earlier buffer.
                if !s.active {
                    continue;
                }
                let hit = match l4 {
                    Some(l4) => same_flow(buf, s, pkt, l4),
                    None => hidden && s.ihl as usize == IPV6_HDR,
                };
                if hit {
                    self.flush(i, buf, plan);
                }
            }
            return self.single(buf, start, len, plan);
        };
        let l4 = ihl as usize;
        let payload = len - hlen;
        for i in 0..SLOTS {
            if !self.slots[i].active || !same_flow(buf, &self.slots[i], pkt, l4) {
                continue;
            }
            if self.can_merge(i, buf, pkt, ihl, hlen, payload) {
                let s = &mut self.slots[i];
                s.parts.push((start + hlen, payload));
                s.next_seq = s.next_seq.wrapping_add(payload);
                s.total += payload;
                s.bytes += len;
                if payload < s.gso || pkt[l4 + 13] & 0x08 != 0 {
                    s.closed = true;
                    s.psh |= pkt[l4 + 13] & 0x08 != 0;
                }
                if s.parts.len() >= MAX_MERGE {
                    self.flush(i, buf, plan);
                }
                return;
            }
            self.flush(i, buf, plan);
            return self.open_slot(i, buf, start, len, ihl, hlen);
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
        self.open_slot(i, buf, start, len, ihl, hlen)
    }

    fn open_slot(&mut self, i: usize, buf: &[u8], start: u32, len: u32, ihl: u32, hlen: u32) {
        let pkt = &buf[start as usize..(start + len) as usize];
        let payload = len - hlen;
        let l4 = ihl as usize;
        let s = &mut self.slots[i];
        s.active = true;
        s.first = (start, len);
        s.ihl = ihl;
        s.hlen = hlen;
        s.gso = payload;
        s.next_seq = be32(pkt, l4 + 4).wrapping_add(payload);
        s.total = payload;
        s.bytes = len;
        s.psh = pkt[l4 + 13] & 0x08 != 0;
        s.closed = s.psh;
        s.parts.clear();
        s.parts.push((start + hlen, payload));
    }

    fn can_merge(
        &self,
        i: usize,
        buf: &[u8],
        pkt: &[u8],
        ihl: u32,
        hlen: u32,
        payload: u32,
    ) -> bool {
        let s = &self.slots[i];
        if s.closed || ihl != s.ihl || hlen != s.hlen || payload > s.gso {
            return false;
        }
        // Also for IPv6, whose payload length would allow 40 bytes more: the
        // kernel's TUN GSO takes at most 64 KiB per packet either way.
        if (s.hlen + s.total + payload) as usize > MAX_IP_LEN {
            return false;
        }
        let first = &buf[s.first.0 as usize..(s.first.0 + s.first.1) as usize];
        let (l4, h) = (ihl as usize, hlen as usize);
        // IPv4: TOS, DF and TTL alike. IPv6: traffic class, flow label and hop
        // limit alike. Either: TCP ack, window and options alike; in sequence.
        let ip_alike = if l4 == IPV6_HDR {
            first[..4] == pkt[..4] && first[7] == pkt[7]
        } else {
            first[1] == pkt[1] && first[6] == pkt[6] && first[8] == pkt[8]
        };
        ip_alike
            && be32(pkt, l4 + 4) == s.next_seq
            && first[l4 + 8..l4 + 12] == pkt[l4 + 8..l4 + 12]
            && first[l4 + 14..l4 + 16] == pkt[l4 + 14..l4 + 16]
            && first[l4 + 20..h] == pkt[l4 + 20..h]
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
            return self.single(buf, start, len, plan);
        }
        let first = &buf[s.first.0 as usize..(s.first.0 + s.first.1) as usize];
        let hlen = s.hlen as usize;
        let l4 = s.ihl as usize;
        let v6 = l4 == IPV6_HDR;
        let l4len = hlen as u32 - s.ihl + s.total;
        let h0 = plan.scratch.len();
        plan.scratch.extend_from_slice(&first[..hlen]);
        let h = &mut plan.scratch[h0..];
        if v6 {
            put16(h, 4, l4len as u16);
        } else {
            put16(h, 2, (hlen as u32 + s.total) as u16);
            put16(h, 10, 0);
            let c = csum::ipv4_header(&h[..20]);
            put16(h, 10, c);
        }
        if s.psh {
            h[l4 + 13] |= 0x08;
        }
        // CHECKSUM_PARTIAL: the field holds the pseudo-header sum; the kernel (or
        // the pod's stack) treats the payload as verified by the outer UDP checksum.
        let ps = pseudo_sum(h, l4, PROTO_TCP, l4len);
        put16(h, l4 + 16, csum::fold(ps));
        let mut v = [0u8; VNET_HDR_LEN];
        VnetHdr {
            flags: vnet::F_NEEDS_CSUM,
            gso_type: if v6 { vnet::GSO_TCPV6 } else { vnet::GSO_TCPV4 },
            hdr_len: hlen as u16,
            gso_size: s.gso as u16,
            csum_start: l4 as u16,
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

/// IP and IP + TCP header lengths when `pkt` (a validated IPv4 packet or a whole
/// IPv6 one) is a data segment that can be merged: a 20-byte IPv4 header and not
/// a fragment, or IPv6 with TCP as its next header (no extension headers); TCP
/// with only ACK (and PSH) set and some payload.
fn tcp_candidate(pkt: &[u8]) -> Option<(u32, u32)> {
    let ihl = match pkt[0] {
        0x45 if pkt[9] == PROTO_TCP && be16(pkt, 6) & 0x3fff == 0 => 20,
        v if v >> 4 == 6 && pkt.len() >= IPV6_HDR && pkt[6] == PROTO_TCP => IPV6_HDR,
        _ => return None,
    };
    if pkt.len() < ihl + 20 {
        return None;
    }
    let thl = usize::from(pkt[ihl + 12] >> 4) * 4;
    if thl < 20 || ihl + thl >= pkt.len() {
        return None;
    }
    if pkt[ihl + 13] & !0x08 != 0x10 {
        return None;
    }
    Some((ihl as u32, (ihl + thl) as u32))
}

/// Where the TCP header of `pkt` (a validated IPv4 packet or a whole IPv6 one)
/// starts, when it is TCP with at least its ports present.
fn tcp_offset(pkt: &[u8]) -> Option<usize> {
    let l4 = if pkt[0] >> 4 == 6 {
        (pkt[6] == PROTO_TCP).then_some(IPV6_HDR)?
    } else {
        (pkt[9] == PROTO_TCP).then_some(usize::from(pkt[0] & 15) * 4)?
    };
    (pkt.len() >= l4 + 4).then_some(l4)
}

/// Same IP version, addresses and ports as the slot's first packet; `l4` is
/// where `pkt`'s TCP header starts.
fn same_flow(buf: &[u8], s: &Slot, pkt: &[u8], l4: usize) -> bool {
    let first = &buf[s.first.0 as usize..(s.first.0 + s.first.1) as usize];
    let fl4 = s.ihl as usize;
    let addrs = if fl4 == IPV6_HDR {
        pkt[0] >> 4 == 6 && first[8..40] == pkt[8..40]
    } else {
        pkt[0] >> 4 == 4 && first[12..20] == pkt[12..20]
    };
    addrs && first[fl4..fl4 + 4] == pkt[l4..l4 + 4]
}

/// A whole IPv6 packet: its fixed header fits and its payload length matches.
fn ipv6_whole(pkt: &[u8]) -> bool {
    pkt.len() >= IPV6_HDR && pkt[0] >> 4 == 6 && IPV6_HDR + usize::from(be16(pkt, 4)) == pkt.len()
}

/// Unfolded TCP/UDP pseudo-header sum of the IPv4 or IPv6 packet `h` whose
/// transport header starts at `l4` (40 for IPv6), for `len` transport bytes.
fn pseudo_sum(h: &[u8], l4: usize, proto: u8, len: u32) -> u64 {
    if l4 == IPV6_HDR && h[0] >> 4 == 6 {
        csum::add(0, &h[8..40]) + u64::from(proto) + u64::from(len)
    } else {
        csum::pseudo(packet::src(h), packet::dst(h), proto, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::tests_support::{v6_fill_l4_csum, v6_header, v6_l4_residue, A3_INNER};
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

    /// One IPv6 TCP segment as a peer's splitter sent it (valid checksum, by the
    /// independent reference): timestamps option, ACK (and `flags`).
    #[derive(Clone, Copy)]
    struct Seg6 {
        seq: u32,
        ack: u32,
        len: usize,
        flags: u8,
        flow: u32,
        hop: u8,
        tsval: u8,
    }

    impl Seg6 {
        fn new(seq: u32, len: usize) -> Seg6 {
            Seg6 {
                seq,
                ack: 1,
                len,
                flags: 0x10,
                flow: 0x1_2345,
                hop: 64,
                tsval: 7,
            }
        }

        fn bytes(self) -> Vec<u8> {
            let mut p = v6_header(PROTO_TCP, 32 + self.len, self.flow, self.hop);
            p.extend_from_slice(&[
                0x9c, 0x40, 0x14, 0x51, 0, 0, 0, 0, 0, 0, 0, 0, 0x80, self.flags, 0x01, 0xf5, 0, 0,
                0, 0, 1, 1, 8, 10, 0, 0, 0, self.tsval, 0, 0, 0, 9,
            ]);
            crate::packet::put32(&mut p, 44, self.seq);
            crate::packet::put32(&mut p, 48, self.ack);
            p.extend((0..self.len).map(|k| (k as u32 ^ self.seq) as u8));
            v6_fill_l4_csum(&mut p, 16);
            p
        }
    }

    /// Plans `segs` through [`Decap::packets`]; returns the plan and the buffer.
    fn plan6(segs: &[Vec<u8>]) -> (RxPlan, Vec<u8>) {
        let mut buf = Vec::new();
        let mut pkts = Vec::new();
        for s in segs {
            pkts.push((buf.len() as u32, s.len() as u32));
            buf.extend_from_slice(s);
        }
        let mut d = Decap::new(true, true);
        let mut plan = RxPlan::with_capacity();
        d.packets(&buf, &pkts, &mut plan);
        (plan, buf)
    }

    #[test]
    fn ipv6_segments_of_one_flow_become_one_tso6_write() {
        let mss = 1348;
        let mut segs: Vec<Vec<u8>> = (0..4)
            .map(|i| Seg6::new(0xffff_fc00u32.wrapping_add(i * mss as u32), mss).bytes())
            .collect();
        let last = Seg6 {
            flags: 0x18,
            ..Seg6::new(0xffff_fc00u32.wrapping_add(4 * mss as u32), 300)
        };
        segs.push(last.bytes());
        let (plan, buf) = plan6(&segs);
        assert_eq!(plan.writes.len(), 1);
        let w = plan.writes[0];
        assert_eq!(w.packets, 5);
        assert_eq!(w.bytes as usize, segs.iter().map(Vec::len).sum::<usize>());
        let h = VnetHdr::decode(&w.vnet, true).unwrap();
        assert_eq!(h.gso_type, vnet::GSO_TCPV6);
        assert_eq!(h.flags, vnet::F_NEEDS_CSUM);
        assert_eq!(h.gso_size as usize, mss);
        assert_eq!((h.hdr_len, h.csum_start, h.csum_offset), (72, 40, 16));
        let out = plan.materialize(&w, &buf);
        assert_eq!(out.len(), 72 + 4 * mss + 300);
        assert_eq!(usize::from(be16(&out, 4)), out.len() - 40);
        assert_eq!(
            &out[..40],
            &{
                let mut h = segs[0][..40].to_vec();
                put16(&mut h, 4, (out.len() - 40) as u16);
                h
            }[..]
        );
        assert_eq!(be32(&out, 44), 0xffff_fc00);
        assert_eq!(out[53], 0x18, "PSH of the last segment kept");
        let data: Vec<u8> = segs.iter().flat_map(|s| s[72..].to_vec()).collect();
        assert_eq!(&out[72..], &data[..]);
        // Partial checksum: the pseudo-header sum; completing it over the TCP part
        // gives what the reference calls a valid segment.
        let mut full = out.clone();
        let c = csum::finish(csum::add(0, &full[40..]));
        put16(&mut full, 56, c);
        assert_eq!(v6_l4_residue(&full), 0);
    }

    #[test]
    fn ipv6_segments_that_differ_are_not_merged() {
        let base = Seg6::new(1000, 1000);
        let next = Seg6::new(2000, 1000);
        let cases: [(&str, Seg6); 8] = [
            ("sequence gap", Seg6 { seq: 2001, ..next }),
            ("other ack", Seg6 { ack: 2, ..next }),
            (
                "other flow label",
                Seg6 {
                    flow: 0x1_2346,
                    ..next
                },
            ),
            ("other hop limit", Seg6 { hop: 63, ..next }),
            ("other options", Seg6 { tsval: 8, ..next }),
            (
                "FIN",
                Seg6 {
                    flags: 0x11,
                    ..next
                },
            ),
            ("larger than the first", Seg6 { len: 1001, ..next }),
            ("no payload", Seg6 { len: 0, ..next }),
        ];
        for (what, s) in cases {
            let (plan, _) = plan6(&[base.bytes(), s.bytes()]);
            assert_eq!(plan.writes.len(), 2, "{what}");
            assert!(plan.writes.iter().all(|w| w.packets == 1), "{what}");
        }
        // The control: the same two segments, alike, merge.
        let (plan, _) = plan6(&[base.bytes(), next.bytes()]);
        assert_eq!(plan.writes.len(), 1);
        assert_eq!(plan.writes[0].packets, 2);
        // Another port is another flow: two slots, two writes (each of 2).
        let mut other = [base.bytes(), next.bytes()];
        for p in &mut other {
            p[41] ^= 1;
            v6_fill_l4_csum(p, 16);
        }
        let (plan, _) = plan6(&[
            base.bytes(),
            other[0].clone(),
            next.bytes(),
            other[1].clone(),
        ]);
        assert_eq!(plan.writes.len(), 2);
        assert!(plan.writes.iter().all(|w| w.packets == 2));
        // A payload length that disagrees with the packet: written alone, as it is.
        let mut bad = next.bytes();
        put16(&mut bad, 4, 500);
        let (plan, _) = plan6(&[base.bytes(), bad]);
        assert_eq!(plan.writes.len(), 2);
    }

    #[test]
    fn ipv6_extension_header_packet_keeps_its_place_after_the_merged_run() {
        let a = Seg6::new(1000, 1000).bytes();
        let b = Seg6::new(2000, 1000).bytes();
        // A TCP segment of the same flow behind a hop-by-hop header: its flow is not
        // read, so every IPv6 run is written before it.
        let mut hidden = v6_header(0, 8 + 32 + 10, 0x1_2345, 64);
        hidden.extend_from_slice(&[PROTO_TCP, 0, 1, 4, 0, 0, 0, 0]);
        hidden.extend_from_slice(&Seg6::new(3000, 10).bytes()[40..]);
        let c = Seg6::new(3010, 1000).bytes();
        let (plan, buf) = plan6(&[a.clone(), b, hidden.clone(), c.clone()]);
        assert_eq!(plan.writes.len(), 3);
        assert_eq!(plan.writes[0].packets, 2);
        assert_eq!(plan.materialize(&plan.writes[1], &buf), hidden);
        assert_eq!(plan.materialize(&plan.writes[2], &buf), c);
        // An IPv4 run is not held up by it, nor IPv6 by IPv4: both merge.
        let (v4, _) = segments(2, 1000, 1000, 100);
        let mut segs = vec![v4[..1052].to_vec(), a.clone()];
        segs.push(v4[1052..].to_vec());
        segs.push(Seg6::new(2000, 1000).bytes());
        let (plan, buf) = plan6(&segs);
        assert_eq!(plan.writes.len(), 2);
        let kinds: Vec<u8> = plan
            .writes
            .iter()
            .map(|w| VnetHdr::decode(&w.vnet, true).unwrap().gso_type)
            .collect();
        assert_eq!(kinds, [vnet::GSO_TCPV4, vnet::GSO_TCPV6]);
        assert_eq!(
            packet::validate(&plan.materialize(&plan.writes[0], &buf)),
            Ok(20)
        );
    }

    #[test]
    fn trusted_lone_tcp_and_udp_packets_are_written_with_a_partial_checksum() {
        // A lone IPv6 TCP segment, an IPv4 UDP datagram, and what stays plain: ICMP,
        // IPv4 UDP without a checksum, a first fragment.
        let tcp6 = Seg6::new(5, 100).bytes();
        let mut udp4 = vec![
            0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0, 10, 244, 33, 11, 10, 244, 41, 11, 0x1f,
            0x90, 0x23, 0x28, 0, 0, 0, 0,
        ];
        udp4.extend_from_slice(b"datagram payload!");
        let l = udp4.len();
        put16(&mut udp4, 2, l as u16);
        put16(&mut udp4, 24, (l - 20) as u16);
        let c = csum::ipv4_header(&udp4[..20]);
        put16(&mut udp4, 10, c);
        let s = csum::pseudo(packet::src(&udp4), packet::dst(&udp4), 17, (l - 20) as u32);
        let c = csum::finish(csum::add(s, &udp4[20..]));
        put16(&mut udp4, 26, c);
        let mut icmp = udp4.clone();
        icmp[9] = 1;
        let mut nocsum = udp4.clone();
        put16(&mut nocsum, 26, 0);
        let mut frag = udp4.clone();
        frag[6] = 0x20; // MF
        for p in [&mut icmp, &mut nocsum, &mut frag] {
            put16(p, 10, 0);
            let c = csum::ipv4_header(&p[..20]);
            put16(p, 10, c);
        }
        // The TCP segment last: it waits in a coalescing slot until the batch ends.
        let all = [udp4.clone(), icmp, nocsum, frag, tcp6.clone()];
        let mut buf = Vec::new();
        let mut pkts = Vec::new();
        for p in &all {
            pkts.push((buf.len() as u32, p.len() as u32));
            buf.extend_from_slice(p);
        }
        for trust in [true, false] {
            let mut d = Decap::new(true, true);
            d.trust_checksums = trust;
            let mut plan = RxPlan::with_capacity();
            d.packets(&buf, &pkts, &mut plan);
            assert_eq!(plan.writes.len(), 5);
            for (i, w) in plan.writes.iter().enumerate() {
                let out = plan.materialize(w, &buf);
                assert_eq!(out.len(), all[i].len(), "packet {i}");
                let h = VnetHdr::decode(&w.vnet, true).unwrap();
                assert_eq!(h.gso_type, vnet::GSO_NONE);
                if !trust || (1..=3).contains(&i) {
                    assert_eq!(out, all[i], "packet {i} written as it is");
                    assert_eq!(h, VnetHdr::default());
                    continue;
                }
                let (start, off) = if i == 4 { (40, 16) } else { (20, 6) };
                assert_eq!(h.flags, vnet::F_NEEDS_CSUM);
                assert_eq!((h.csum_start, h.csum_offset), (start, off));
                assert_eq!(h.hdr_len, start + off + 2);
                // What the kernel does with it: sum from csum_start, store at the
                // offset. That gives back the sender's (valid) packet.
                let mut full = out.clone();
                let at = usize::from(start + off);
                let c = csum::finish(csum::add(0, &full[usize::from(start)..]));
                put16(&mut full, at, c);
                assert_eq!(full, all[i], "packet {i}");
            }
        }
        assert_eq!(v6_l4_residue(&tcp6), 0);
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
