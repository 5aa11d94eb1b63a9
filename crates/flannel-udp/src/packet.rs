//! IPv4 header access and the per-packet operations of flannel's udp wire format:
//! validation, TTL decrement with upstream's incremental checksum fix, and the ICMP
//! net-unreachable reply.

use std::net::Ipv4Addr;

use crate::csum;

pub const IPV4_MIN_HDR: usize = 20;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Why a packet is not a well-formed IPv4 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Shorter than an IPv4 header.
    Short,
    /// Version field is not 4.
    NotIpv4,
    /// IHL below 5 or beyond the packet.
    BadHeaderLen,
    /// Total length field disagrees with the datagram length.
    BadTotalLen,
    /// Header checksum does not verify.
    BadChecksum,
}

#[inline]
pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline]
pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[inline]
pub fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

#[inline]
pub fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

#[inline]
pub fn src(pkt: &[u8]) -> Ipv4Addr {
    Ipv4Addr::from(be32(pkt, 12))
}

#[inline]
pub fn dst(pkt: &[u8]) -> Ipv4Addr {
    Ipv4Addr::from(be32(pkt, 16))
}

/// Header length in bytes, after checking version and that the header fits.
#[inline]
pub fn header_len(pkt: &[u8]) -> Result<usize, Malformed> {
    if pkt.len() < IPV4_MIN_HDR {
        return Err(Malformed::Short);
    }
    if pkt[0] >> 4 != 4 {
        return Err(Malformed::NotIpv4);
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    if ihl < IPV4_MIN_HDR || ihl > pkt.len() {
        return Err(Malformed::BadHeaderLen);
    }
    Ok(ihl)
}

/// Full validation of a packet received from a peer: an IPv4 header that fits,
/// a total length equal to the datagram length, and a valid header checksum.
/// Returns the header length.
#[inline]
pub fn validate(pkt: &[u8]) -> Result<usize, Malformed> {
    let ihl = header_len(pkt)?;
    if usize::from(be16(pkt, 2)) != pkt.len() {
        return Err(Malformed::BadTotalLen);
    }
    if csum::fold(csum::add(0, &pkt[..ihl])) != 0xffff {
        return Err(Malformed::BadChecksum);
    }
    Ok(ihl)
}

/// Whether this is a fragment other than the first.
#[inline]
pub fn is_later_fragment(pkt: &[u8]) -> bool {
    be16(pkt, 6) & 0x1fff != 0
}

/// Decrements the TTL and patches the header checksum exactly as upstream's proxy
/// does (its RFC 1624 update, as it behaves on the little-endian hosts upstream
/// supports), so forwarded packets are byte-identical to Go flanneld's.
/// Returns false when the packet must be dropped: the TTL reached 0. A TTL of 0 on
/// input is dropped too (upstream would wrap it to 255).
#[inline]
pub fn decrement_ttl(pkt: &mut [u8]) -> bool {
    if pkt[8] <= 1 {
        return false;
    }
    pkt[8] -= 1;
    // Upstream adds htons(0x100) to the checksum read as a host-order u16, with one
    // extra when that value is >= htons(0xfeff): on little-endian that is +1 (+2)
    // on the byte-swapped field, i.e. +0x0100 with end-around carry.
    let raw = u16::from_le_bytes([pkt[10], pkt[11]]);
    let new = if raw >= 0xfffe {
        raw.wrapping_add(2)
    } else {
        raw + 1
    };
    pkt[10..12].copy_from_slice(&new.to_le_bytes());
    true
}

/// Room for the largest net-unreachable reply (20 + 8 + 56 + 8).
pub const ICMP_REPLY_MAX: usize = 96;

/// Builds upstream's ICMP net-unreachable reply to `offender` (a packet read from
/// the TUN for which there is no peer), into `out`. Returns its length, or None when
/// upstream sends nothing: ICMP offenders, non-first fragments, header length >= 60,
/// and (our addition) offenders shorter than header + 8 bytes.
pub fn net_unreachable(
    offender: &[u8],
    tun_addr: Ipv4Addr,
    out: &mut [u8; ICMP_REPLY_MAX],
) -> Option<usize> {
    let ihl = header_len(offender).ok()?;
    if ihl >= IPV4_MIN_HDR + 40 || offender[9] == PROTO_ICMP || is_later_fragment(offender) {
        return None;
    }
    let quote = ihl + 8;
    if offender.len() < quote {
        return None;
    }
    let len = IPV4_MIN_HDR + 8 + quote;
    let (ip, rest) = out.split_at_mut(IPV4_MIN_HDR);
    ip.fill(0);
    ip[0] = 0x45;
    put16(ip, 2, len as u16);
    ip[8] = 8; // TTL
    ip[9] = PROTO_ICMP;
    ip[12..16].copy_from_slice(&tun_addr.octets());
    ip[16..20].copy_from_slice(&offender[12..16]);
    let c = csum::ipv4_header(ip);
    put16(ip, 10, c);
    let icmp = &mut rest[..8 + quote];
    icmp[..8].fill(0);
    icmp[0] = 3; // destination unreachable
    icmp[1] = 0; // net unreachable
    icmp[8..].copy_from_slice(&offender[..quote]);
    let c = csum::finish(csum::add(0, icmp));
    put16(icmp, 2, c);
    Some(len)
}

#[cfg(test)]
pub(crate) mod tests_support {
    /// Appendix A.3: the UDP payload of an encapsulated echo request as Go flanneld
    /// sent it (TTL already decremented to 62).
    pub const A3_INNER: [u8; 52] = [
        0x45, 0x00, 0x00, 0x34, 0xb4, 0x59, 0x40, 0x00, 0x3e, 0x01, 0x28, 0x72, 0x0a, 0xf4, 0x21,
        0x0b, 0x0a, 0xf4, 0x29, 0x0b, 0x08, 0x00, 0xaa, 0xf2, 0x34, 0x54, 0x00, 0x01, 0x4e, 0xfb,
        0x03, 0x6b, 0x00, 0x00, 0x00, 0x00, 0x6d, 0x01, 0x0d, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10,
        0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17,
    ];

    /// fd00:10:244:1::2 and fd00:10:244:2::2, a pod on each of two hosts.
    pub const V6_SRC: [u8; 16] = [0xfd, 0, 0, 0x10, 0x02, 0x44, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2];
    pub const V6_DST: [u8; 16] = [0xfd, 0, 0, 0x10, 0x02, 0x44, 0, 2, 0, 0, 0, 0, 0, 0, 0, 2];

    /// The TCP/UDP checksum of an IPv6 packet without extension headers,
    /// computed the slow way from RFC 8200 §8.1's pseudo header laid out as
    /// bytes (independent of `csum`): 0 when the packet's checksum is right
    /// (for UDP, also 0 for a packet that says "no checksum", which IPv6 forbids,
    /// so callers check the field is not 0).
    pub fn v6_l4_residue(pkt: &[u8]) -> u16 {
        let l4 = &pkt[40..];
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&pkt[8..40]);
        pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, pkt[6]]);
        pseudo.extend_from_slice(l4);
        reference_checksum(&pseudo)
    }

    /// The Internet checksum of `data` the slow, obvious way (16-bit words, end-around
    /// carry per word): the independent reference the optimised sums are tested against.
    pub fn reference_checksum(data: &[u8]) -> u16 {
        let mut s: u32 = 0;
        for c in data.chunks(2) {
            let w = if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from_be_bytes([c[0], 0])
            };
            s += u32::from(w);
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }

    /// Fills in the transport checksum of an IPv6 packet (field at `40 + at`)
    /// with the slow reference arithmetic.
    pub fn v6_fill_l4_csum(pkt: &mut [u8], at: usize) {
        pkt[40 + at] = 0;
        pkt[41 + at] = 0;
        // With the field zero, the residue is the checksum itself.
        let c = v6_l4_residue(pkt);
        let c = if c == 0 && pkt[6] == 17 { 0xffff } else { c };
        pkt[40 + at..42 + at].copy_from_slice(&c.to_be_bytes());
    }

    /// An IPv6 header (traffic class 0, `flow` label, `hop` limit) for `plen`
    /// payload bytes of protocol `next`.
    pub fn v6_header(next: u8, plen: usize, flow: u32, hop: u8) -> Vec<u8> {
        let mut h = vec![
            0x60,
            (flow >> 16) as u8 & 0x0f,
            (flow >> 8) as u8,
            flow as u8,
        ];
        h.extend_from_slice(&(plen.min(0xffff) as u16).to_be_bytes());
        h.extend_from_slice(&[next, hop]);
        h.extend_from_slice(&V6_SRC);
        h.extend_from_slice(&V6_DST);
        h
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::A3_INNER;
    use super::*;

    /// The same packet as the sender's TUN delivered it: TTL 63, checksum before
    /// the decrement (derived: the header checksum must verify).
    fn a3_from_tun() -> Vec<u8> {
        let mut p = A3_INNER.to_vec();
        p[8] = 0x3f;
        p[10] = 0;
        p[11] = 0;
        let c = csum::ipv4_header(&p[..20]);
        put16(&mut p, 10, c);
        p
    }

    #[test]
    fn a3_inner_packet_is_valid_ipv4() {
        assert_eq!(validate(&A3_INNER), Ok(20));
        assert_eq!(src(&A3_INNER), Ipv4Addr::new(10, 244, 33, 11));
        assert_eq!(dst(&A3_INNER), Ipv4Addr::new(10, 244, 41, 11));
    }

    #[test]
    fn ttl_decrement_reproduces_appendix_a3_bytes() {
        let mut p = a3_from_tun();
        assert_eq!(be16(&p, 10), 0x2772);
        assert!(decrement_ttl(&mut p));
        assert_eq!(p, A3_INNER.to_vec());
        // The receiver decrements once more: 61, still a valid header.
        assert!(decrement_ttl(&mut p));
        assert_eq!(p[8], 61);
        assert_eq!(validate(&p), Ok(20));
    }

    #[test]
    fn ttl_decrement_keeps_checksum_valid_for_every_checksum_value() {
        // Walk the identification field so the checksum takes every value,
        // including upstream's two wrap-around cases.
        let mut seen_wrap = 0;
        for id in 0..=0xffffu16 {
            let mut p = a3_from_tun();
            put16(&mut p, 4, id);
            p[10] = 0;
            p[11] = 0;
            let c = csum::ipv4_header(&p[..20]);
            put16(&mut p, 10, c);
            if u16::from_le_bytes([p[10], p[11]]) >= 0xfffe {
                seen_wrap += 1;
            }
            assert!(decrement_ttl(&mut p));
            assert_eq!(csum::fold(csum::add(0, &p[..20])), 0xffff, "id {id:#x}");
        }
        assert!(seen_wrap > 0);
    }

    #[test]
    fn ttl_edge_values() {
        let mut p = a3_from_tun();
        p[8] = 1;
        assert!(!decrement_ttl(&mut p), "1 -> 0 is dropped");
        p[8] = 0;
        assert!(!decrement_ttl(&mut p), "0 is dropped");
        p[8] = 2;
        assert!(decrement_ttl(&mut p));
        assert_eq!(p[8], 1);
    }

    #[test]
    fn validation_rejects_malformed() {
        assert_eq!(validate(&A3_INNER[..19]), Err(Malformed::Short));
        let mut p = A3_INNER.to_vec();
        p[0] = 0x65;
        assert_eq!(validate(&p), Err(Malformed::NotIpv4));
        p[0] = 0x44;
        assert_eq!(validate(&p), Err(Malformed::BadHeaderLen));
        p[0] = 0x4f;
        assert_eq!(validate(&p), Err(Malformed::BadHeaderLen));
        assert_eq!(validate(&A3_INNER[..40]), Err(Malformed::BadTotalLen));
        let mut p = A3_INNER.to_vec();
        p.push(0);
        assert_eq!(validate(&p), Err(Malformed::BadTotalLen));
        let mut p = A3_INNER.to_vec();
        p[15] ^= 1;
        assert_eq!(validate(&p), Err(Malformed::BadChecksum));
    }

    #[test]
    fn net_unreachable_matches_upstream_layout() {
        // A TCP SYN towards a subnet without a peer.
        let mut off = vec![
            0x45, 0x00, 0x00, 0x3c, 0x12, 0x34, 0x40, 0x00, 0x3f, 0x06, 0x00, 0x00, 10, 244, 33,
            11, 10, 244, 99, 7, 0x9c, 0x40, 0x00, 0x50, 1, 2, 3, 4, 0, 0, 0, 0, 0xa0, 0x02, 0xfa,
            0xf0, 0, 0, 0, 0,
        ];
        off.resize(60, 0);
        let c = csum::ipv4_header(&off[..20]);
        put16(&mut off, 10, c);
        let tun = Ipv4Addr::new(10, 244, 33, 0);
        let mut out = [0u8; ICMP_REPLY_MAX];
        let n = net_unreachable(&off, tun, &mut out).expect("reply");
        assert_eq!(n, 56);
        let r = &out[..n];
        let mut expect_ip = vec![
            0x45, 0x00, 0x00, 0x38, 0x00, 0x00, 0x00, 0x00, 0x08, 0x01, 0x00, 0x00, 10, 244, 33, 0,
            10, 244, 33, 11,
        ];
        let c = csum::ipv4_header(&expect_ip);
        put16(&mut expect_ip, 10, c);
        assert_eq!(&r[..20], &expect_ip[..]);
        assert_eq!(&r[20..24], &[3, 0, r[22], r[23]]);
        assert_eq!(&r[24..28], &[0, 0, 0, 0]);
        assert_eq!(&r[28..], &off[..28]);
        assert_eq!(csum::fold(csum::add(0, &r[20..])), 0xffff);
        assert_eq!(validate(r), Ok(20));
    }

    #[test]
    fn net_unreachable_is_not_sent_for_icmp_fragments_or_long_headers() {
        let tun = Ipv4Addr::new(10, 244, 33, 0);
        let mut out = [0u8; ICMP_REPLY_MAX];
        assert_eq!(net_unreachable(&A3_INNER, tun, &mut out), None, "ICMP");
        let mut p = A3_INNER.to_vec();
        p[9] = PROTO_UDP;
        assert!(net_unreachable(&p, tun, &mut out).is_some());
        p[7] = 0x10; // fragment offset 16
        assert_eq!(net_unreachable(&p, tun, &mut out), None, "later fragment");
        p[7] = 0;
        p[6] = 0x20; // MF on the first fragment: still answered
        assert!(net_unreachable(&p, tun, &mut out).is_some());
        let mut long = vec![0u8; 80];
        long[0] = 0x4f;
        long[9] = PROTO_TCP;
        assert_eq!(
            net_unreachable(&long, tun, &mut out),
            None,
            "60-byte header"
        );
        assert_eq!(
            net_unreachable(&p[..27], tun, &mut out),
            None,
            "too short to quote"
        );
    }
}
