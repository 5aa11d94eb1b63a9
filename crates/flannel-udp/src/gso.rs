//! Splitting a TSO (TCPv4, TCPv6) or USO (UDP over either) super-packet from the
//! TUN into the segments the kernel would have sent: shared by the udp
//! encapsulation (which copies each segment's header beside the payload; IPv4
//! only) and the wireguard device (which writes it in place before encrypting).
//!
//! An IPv6 super-packet must have TCP or UDP right after its fixed header: the
//! kernel's own TSO/USO packets from a pod's socket never carry extension headers,
//! and one that does (hop-by-hop, routing, fragment...) would need its headers
//! walked and partly repeated per segment, so it is refused as malformed instead.

use crate::csum;
use crate::packet::{self, be16, be32, put16, put32, PROTO_TCP, PROTO_UDP};
use crate::vnet::{self, VnetHdr};

/// The fixed IPv6 header.
pub(crate) const IPV6_HDR: usize = 40;

/// Why a super-packet cannot be split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unsplittable {
    /// Headers that do not match the vnet header, or an impossible geometry.
    Malformed,
    /// More segments than the caller allows (that many packets are lost).
    TooManySegments(usize),
}

/// The geometry of one super-packet and the header fields its segments derive from.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GsoSplit {
    /// IP header plus TCP/UDP header: what every segment repeats.
    pub hlen: usize,
    pub mss: usize,
    pub nseg: usize,
    payload: usize,
    ihl: usize,
    l4len: usize,
    tcp: bool,
    v6: bool,
    proto: u8,
    /// Unfolded sum of the source and destination addresses (the part of the
    /// pseudo header every segment shares).
    addr_sum: u64,
    id0: u16,
    seq0: u32,
    flags0: u8,
}

impl GsoSplit {
    /// Checks `pkt` (an IP header of `ihl` bytes first: an IPv4 header, or
    /// IPv6's 40) against its vnet header. The kernel's IP total (or payload)
    /// length of a super-packet may be 0 or stale: the read length is the truth.
    pub fn plan(
        pkt: &[u8],
        ihl: usize,
        hdr: &VnetHdr,
        max_segments: usize,
    ) -> Result<GsoSplit, Unsplittable> {
        let v6 = match pkt.first().map(|b| b >> 4) {
            Some(4) => false,
            Some(6) if ihl == IPV6_HDR => true,
            _ => return Err(Unsplittable::Malformed),
        };
        if pkt.len() < ihl {
            return Err(Unsplittable::Malformed);
        }
        let tcp = match hdr.gso_type & !vnet::GSO_ECN {
            vnet::GSO_TCPV4 if !v6 => true,
            vnet::GSO_TCPV6 if v6 => true,
            vnet::GSO_UDP_L4 => false,
            _ => return Err(Unsplittable::Malformed),
        };
        let proto = if tcp { PROTO_TCP } else { PROTO_UDP };
        let l4len = if tcp {
            if pkt.len() < ihl + 20 {
                return Err(Unsplittable::Malformed);
            }
            usize::from(pkt[ihl + 12] >> 4) * 4
        } else {
            8
        };
        let mss = usize::from(hdr.gso_size);
        let hlen = ihl + l4len;
        let min_l4 = if tcp { 20 } else { 8 };
        // IPv6: the next header must be the transport itself (see the module
        // note); IPv4: no later fragment (a first one has the L4 header).
        let (next, fragment) = if v6 {
            (pkt[6], false)
        } else {
            (pkt[9], packet::is_later_fragment(pkt))
        };
        if next != proto
            || fragment
            || l4len < min_l4
            || hlen > pkt.len()
            || mss == 0
            || hlen + mss > usize::from(u16::MAX)
        {
            return Err(Unsplittable::Malformed);
        }
        let payload = pkt.len() - hlen;
        let nseg = payload.div_ceil(mss).max(1);
        if nseg > max_segments {
            return Err(Unsplittable::TooManySegments(nseg));
        }
        Ok(GsoSplit {
            hlen,
            mss,
            nseg,
            payload,
            ihl,
            l4len,
            tcp,
            v6,
            proto,
            addr_sum: if v6 {
                csum::add(0, &pkt[8..40])
            } else {
                csum::add(0, &pkt[12..20])
            },
            id0: if v6 { 0 } else { be16(pkt, 4) },
            seq0: if tcp { be32(pkt, ihl + 4) } else { 0 },
            flags0: if tcp { pkt[ihl + 13] } else { 0 },
        })
    }

    /// Where segment `i`'s payload starts in the super-packet, and its length.
    pub fn payload_of(&self, i: usize) -> (usize, usize) {
        (
            self.hlen + i * self.mss,
            self.mss.min(self.payload - i * self.mss),
        )
    }

    /// Turns `h`, a copy of the super-packet's `hlen` header bytes (with any TTL
    /// change already made), into segment `i`'s header for payload `body`: lengths,
    /// IP id and checksum (IPv4) or payload length (IPv6), TCP sequence, flags
    /// and checksum or UDP checksum.
    pub fn write_header(&self, h: &mut [u8], body: &[u8], i: usize) {
        let seglen = body.len();
        let l4total = self.l4len + seglen;
        if self.v6 {
            put16(h, 4, l4total as u16);
        } else {
            put16(h, 2, (self.hlen + seglen) as u16);
            put16(h, 4, self.id0.wrapping_add(i as u16));
            put16(h, 10, 0);
            let c = csum::ipv4_header(&h[..self.ihl]);
            put16(h, 10, c);
        }
        let l4 = &mut h[self.ihl..self.hlen];
        // IPv6's pseudo header has a 32-bit length and a 24-bit zero pad before the
        // next header: for lengths below 2^16 its sum is the same as IPv4's.
        let mut sum = self.addr_sum + u64::from(self.proto) + l4total as u64;
        if self.tcp {
            put32(l4, 4, self.seq0.wrapping_add((i * self.mss) as u32));
            let mut f = self.flags0;
            if i + 1 < self.nseg {
                f &= !(0x01 | 0x08); // FIN, PSH only on the last segment
            }
            if i > 0 {
                f &= !0x80; // CWR only on the first
            }
            l4[13] = f;
            put16(l4, 16, 0);
            sum = csum::add(csum::add(sum, l4), body);
            put16(l4, 16, csum::finish(sum));
        } else {
            put16(l4, 4, (8 + seglen) as u16);
            put16(l4, 6, 0);
            sum = csum::add(csum::add(sum, l4), body);
            let c = csum::finish(sum);
            put16(l4, 6, if c == 0 { 0xffff } else { c });
        }
    }
}
