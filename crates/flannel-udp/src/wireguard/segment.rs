//! Turning one TUN read (virtio-net header + packet, possibly a TSO/USO
//! super-packet) into the inner packets WireGuard encrypts one by one, each
//! complete with its checksums, as the kernel would have put them on a wire.
//!
//! Unlike the udp backend's encapsulator, nothing here touches the TTL: the
//! kernel already decremented it when it routed the packet into the device, and
//! WireGuard carries packets unchanged.

use crate::csum;
use crate::gso::{GsoSplit, IPV6_HDR};
use crate::packet::{self, be16, put16};
use crate::vnet::{self, VnetHdr, VNET_HDR_LEN};

/// Largest number of segments one read may carry that we accept.
const MAX_SEGMENTS: usize = 2048;

/// Why a read produced no packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Malformed,
}

/// Splits `read` (the whole TUN read, vnet header first when `vnet`) into inner
/// packets and hands each to `emit`, in order. A super-packet is split in place
/// (`read` is overwritten); `seg` is scratch for its headers. Returns the number
/// of packets emitted.
pub fn split(
    read: &mut [u8],
    vnet: bool,
    vnet_le: bool,
    seg: &mut Vec<u8>,
    mut emit: impl FnMut(&[u8]),
) -> Result<usize, Refused> {
    let (hdr, off) = if vnet {
        (
            VnetHdr::decode(read, vnet_le).ok_or(Refused::Malformed)?,
            VNET_HDR_LEN,
        )
    } else {
        (VnetHdr::default(), 0)
    };
    let pkt = &mut read[off..];
    match hdr.gso_type & !vnet::GSO_ECN {
        vnet::GSO_NONE => {
            let len = ip_len(pkt).ok_or(Refused::Malformed)?;
            let pkt = &mut pkt[..len];
            if hdr.flags & vnet::F_NEEDS_CSUM != 0 && !finish_partial_csum(pkt, &hdr) {
                return Err(Refused::Malformed);
            }
            emit(pkt);
            Ok(1)
        }
        vnet::GSO_TCPV4 | vnet::GSO_TCPV6 | vnet::GSO_UDP_L4 => segment(pkt, &hdr, seg, emit),
        _ => Err(Refused::Malformed),
    }
}

/// The length of the IP packet at the start of `pkt` (v4 or v6), if it fits.
fn ip_len(pkt: &[u8]) -> Option<usize> {
    let len = match pkt.first()? >> 4 {
        4 => {
            let ihl = packet::header_len(pkt).ok()?;
            let tot = usize::from(be16(pkt, 2));
            if tot < ihl {
                return None;
            }
            tot
        }
        6 if pkt.len() >= 40 => 40 + usize::from(be16(pkt, 4)),
        _ => return None,
    };
    (len <= pkt.len()).then_some(len)
}

/// Completes a checksum the kernel left partial (VIRTIO_NET_HDR_F_NEEDS_CSUM): the
/// field holds the pseudo-header sum; the checksum covers `csum_start..`.
fn finish_partial_csum(pkt: &mut [u8], hdr: &VnetHdr) -> bool {
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    let ip_hdr = if pkt[0] >> 4 == 6 {
        IPV6_HDR
    } else {
        packet::IPV4_MIN_HDR
    };
    if at + 2 > pkt.len() || start < ip_hdr {
        return false;
    }
    let c = csum::finish(csum::add(0, &pkt[start..]));
    put16(pkt, at, if c == 0 { 0xffff } else { c });
    true
}

/// Splits a TSO (TCPv4, TCPv6) or USO (UDP over either) super-packet.
fn segment(
    pkt: &mut [u8],
    hdr: &VnetHdr,
    seg: &mut Vec<u8>,
    mut emit: impl FnMut(&[u8]),
) -> Result<usize, Refused> {
    let ihl = match pkt.first().map(|b| b >> 4) {
        Some(6) => IPV6_HDR,
        _ => packet::header_len(pkt).map_err(|_| Refused::Malformed)?,
    };
    let split = GsoSplit::plan(pkt, ihl, hdr, MAX_SEGMENTS).map_err(|_| Refused::Malformed)?;
    let (hlen, nseg) = (split.hlen, split.nseg);
    // Each segment's header is written just before its payload, over the tail of
    // the previous segment, which `emit` has consumed by then: no payload is
    // copied. `seg` keeps the original headers.
    seg.clear();
    seg.extend_from_slice(&pkt[..hlen]);
    for i in 0..nseg {
        let (start, seglen) = split.payload_of(i);
        let whole = &mut pkt[start - hlen..start + seglen];
        whole[..hlen].copy_from_slice(&seg[..hlen]);
        let (h, body) = whole.split_at_mut(hlen);
        split.write_header(h, body, i);
        emit(whole);
    }
    Ok(nseg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::tests_support::{v6_header, v6_l4_residue};
    use crate::packet::{be32, PROTO_TCP, PROTO_UDP};

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

    /// A TSO super-packet as the TUN hands it over (vnet header first).
    fn tso(payload: usize, mss: u16) -> Vec<u8> {
        let mut p = vec![0u8; VNET_HDR_LEN];
        VnetHdr {
            flags: vnet::F_NEEDS_CSUM,
            gso_type: vnet::GSO_TCPV4,
            hdr_len: 52,
            gso_size: mss,
            csum_start: 20,
            csum_offset: 16,
        }
        .encode((&mut p[..]).try_into().unwrap(), true);
        let mut ip = vec![
            0x45, 0, 0, 0, 0x12, 0x00, 0x40, 0x00, 63, 6, 0, 0, 10, 244, 33, 11, 10, 244, 41, 11,
        ];
        put16(&mut ip, 2, (52 + payload).min(0xffff) as u16);
        p.extend_from_slice(&ip);
        p.extend_from_slice(&[
            0x9c, 0x40, 0x14, 0x51, 0x10, 0x20, 0x30, 0x40, 0, 0, 0, 1, 0x80, 0x19, 0x01, 0xf5,
            0xaa, 0xbb, 0, 0, 1, 1, 8, 10, 0, 0, 0, 7, 0, 0, 0, 9,
        ]);
        p.extend((0..payload).map(|n| (n * 31 + 7) as u8));
        p
    }

    #[test]
    fn tso_becomes_mss_sized_packets_with_valid_checksums_and_ttl_kept() {
        let mut read = tso(1368 * 3 + 100, 1368);
        let orig = read.clone();
        let mut out = Vec::new();
        let mut seg = Vec::new();
        let n = split(&mut read, true, true, &mut seg, |p| out.push(p.to_vec())).unwrap();
        assert_eq!(n, 4);
        let mut data = Vec::new();
        let mut seq = 0x1020_3040u32;
        for (i, p) in out.iter().enumerate() {
            assert_eq!(packet::validate(p), Ok(20), "segment {i}");
            assert_eq!(p[8], 63, "TTL untouched");
            assert!(tcp_csum_ok(p), "segment {i}");
            assert_eq!(be32(p, 24), seq);
            assert_eq!(p[33] & 0x09 != 0, i == 3, "FIN/PSH on the last only");
            seq = seq.wrapping_add((p.len() - 52) as u32);
            data.extend_from_slice(&p[52..]);
        }
        assert_eq!(out[0].len(), 1420);
        assert_eq!(&data[..], &orig[62..]);
    }

    #[test]
    fn plain_packet_gets_its_partial_checksum_finished() {
        let mut read = tso(300, 1368);
        read[1] = vnet::GSO_NONE;
        let pkt = &mut read[VNET_HDR_LEN..];
        put16(pkt, 10, 0);
        let c = csum::ipv4_header(&pkt[..20]);
        put16(pkt, 10, c);
        let ps = csum::fold(csum::pseudo(packet::src(pkt), packet::dst(pkt), 6, 332));
        put16(pkt, 36, ps);
        // Trailing bytes beyond the IP length are not part of the packet.
        read.extend_from_slice(&[0xee; 7]);
        let mut out = Vec::new();
        let mut seg = Vec::new();
        split(&mut read, true, true, &mut seg, |p| out.push(p.to_vec())).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), 352);
        assert!(tcp_csum_ok(&out[0]));
    }

    /// The vnet header the TUN puts before a TSO6/USO super-packet.
    fn vnet6(gso_type: u8, hdr_len: u16, mss: u16, csum_offset: u16) -> Vec<u8> {
        let mut p = vec![0u8; VNET_HDR_LEN];
        VnetHdr {
            flags: vnet::F_NEEDS_CSUM,
            gso_type,
            hdr_len,
            gso_size: mss,
            csum_start: 40,
            csum_offset,
        }
        .encode((&mut p[..]).try_into().unwrap(), true);
        p
    }

    /// A TSO6 super-packet: TCP with timestamps (32-byte header), FIN|PSH|ACK|CWR
    /// set, payload length left 0 as the kernel may, checksum field holding
    /// garbage (the splitter must not depend on it).
    fn tso6(payload: usize, mss: u16) -> Vec<u8> {
        let mut p = vnet6(vnet::GSO_TCPV6 | vnet::GSO_ECN, 72, mss, 16);
        p.extend(v6_header(PROTO_TCP, 0, 0x5_4321, 63));
        p.extend_from_slice(&[
            0x9c, 0x40, 0x14, 0x51, 0xff, 0xff, 0xfa, 0x00, 0, 0, 0, 1, 0x80, 0x99, 0x01, 0xf5,
            0xaa, 0xbb, 0, 0, 1, 1, 8, 10, 0, 0, 0, 7, 0, 0, 0, 9,
        ]);
        p.extend((0..payload).map(|n| (n * 31 + 7) as u8));
        p
    }

    #[test]
    fn tso6_becomes_mss_sized_packets_with_valid_checksums() {
        let mss = 1420 - 72;
        let mut read = tso6(mss * 3 + 100, mss as u16);
        let orig = read.clone();
        let mut out = Vec::new();
        let mut seg = Vec::new();
        let n = split(&mut read, true, true, &mut seg, |p| out.push(p.to_vec())).unwrap();
        assert_eq!(n, 4);
        assert_eq!(out.len(), 4);
        let lens: Vec<usize> = out.iter().map(Vec::len).collect();
        assert_eq!(lens, [1420, 1420, 1420, 172]);
        let mut data = Vec::new();
        // The sequence wraps past 2^32 between segments 1 and 2.
        let mut seq = 0xffff_fa00u32;
        for (i, p) in out.iter().enumerate() {
            assert_eq!(p[0], 0x60, "segment {i}");
            assert_eq!(
                &p[1..4],
                &orig[VNET_HDR_LEN + 1..VNET_HDR_LEN + 4],
                "flow label"
            );
            assert_eq!(usize::from(be16(p, 4)), p.len() - 40, "payload length");
            assert_eq!((p[6], p[7]), (PROTO_TCP, 63), "next header, hop limit");
            assert_eq!(&p[8..40], &orig[VNET_HDR_LEN + 8..VNET_HDR_LEN + 40]);
            assert_eq!(v6_l4_residue(p), 0, "segment {i} TCP checksum");
            assert_eq!(be32(p, 44), seq, "segment {i} sequence");
            assert_eq!(p[53] & 0x09 != 0, i == 3, "FIN/PSH on the last only");
            assert_eq!(p[53] & 0x80 != 0, i == 0, "CWR on the first only");
            assert_eq!(p[53] & 0x10, 0x10, "ACK on all");
            assert_eq!(
                &p[54..56],
                &orig[VNET_HDR_LEN + 54..VNET_HDR_LEN + 56],
                "window"
            );
            assert_eq!(
                &p[58..72],
                &orig[VNET_HDR_LEN + 58..VNET_HDR_LEN + 72],
                "options"
            );
            seq = seq.wrapping_add((p.len() - 72) as u32);
            data.extend_from_slice(&p[72..]);
        }
        assert_eq!(&data[..], &orig[VNET_HDR_LEN + 72..]);
    }

    #[test]
    fn uso6_becomes_datagrams_with_valid_checksums() {
        let mut read = vnet6(vnet::GSO_UDP_L4, 48, 1000, 6);
        read.extend(v6_header(PROTO_UDP, 0, 0, 64));
        read.extend_from_slice(&[0x1f, 0x90, 0x23, 0x28, 0, 0, 0x12, 0x34]);
        read.extend((0..2500usize).map(|n| (n * 13 + 1) as u8));
        let orig = read.clone();
        let mut out = Vec::new();
        let mut seg = Vec::new();
        let n = split(&mut read, true, true, &mut seg, |p| out.push(p.to_vec())).unwrap();
        assert_eq!(n, 3);
        let lens: Vec<usize> = out.iter().map(Vec::len).collect();
        assert_eq!(lens, [1048, 1048, 548]);
        let mut data = Vec::new();
        for (i, p) in out.iter().enumerate() {
            assert_eq!(usize::from(be16(p, 4)), p.len() - 40, "payload length");
            assert_eq!(usize::from(be16(p, 44)), p.len() - 40, "UDP length");
            assert_eq!(&p[40..44], &[0x1f, 0x90, 0x23, 0x28], "ports");
            assert_ne!(be16(p, 46), 0, "IPv6 UDP needs a checksum");
            assert_eq!(v6_l4_residue(p), 0, "segment {i} UDP checksum");
            data.extend_from_slice(&p[48..]);
        }
        assert_eq!(&data[..], &orig[VNET_HDR_LEN + 48..]);
    }

    #[test]
    fn ipv6_plain_packet_gets_its_partial_checksum_finished() {
        let mut read = vnet6(vnet::GSO_NONE, 0, 0, 6);
        let body = b"hello over wireguard";
        read.extend(v6_header(PROTO_UDP, 8 + body.len(), 0, 64));
        read.extend_from_slice(&[0x1f, 0x90, 0x23, 0x28, 0, 28, 0, 0]);
        read.extend_from_slice(body);
        // The field holds the pseudo-header sum, as the kernel leaves it.
        let pkt = &mut read[VNET_HDR_LEN..];
        let ps = csum::fold(csum::add(0, &pkt[8..40]) + 17 + 28);
        put16(pkt, 46, ps);
        let mut out = Vec::new();
        let mut seg = Vec::new();
        split(&mut read, true, true, &mut seg, |p| out.push(p.to_vec())).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), 68);
        assert_eq!(v6_l4_residue(&out[0]), 0);
    }

    #[test]
    fn ipv6_extension_headers_and_family_mismatches_are_malformed() {
        let mut seg = Vec::new();
        let mut emitted = 0;
        // A hop-by-hop header before TCP.
        let mut read = tso6(4000, 1348);
        read[VNET_HDR_LEN + 6] = 0;
        let r = split(&mut read, true, true, &mut seg, |_| emitted += 1);
        assert_eq!(r, Err(Refused::Malformed));
        // A fragment header before UDP.
        let mut read = vnet6(vnet::GSO_UDP_L4, 48, 1000, 6);
        read.extend(v6_header(44, 0, 0, 64));
        read.extend_from_slice(&[17, 0, 0, 1, 0, 0, 0, 7]);
        read.extend_from_slice(&[0u8; 3000]);
        let r = split(&mut read, true, true, &mut seg, |_| emitted += 1);
        assert_eq!(r, Err(Refused::Malformed));
        // TCPv6 offload on an IPv4 packet and TCPv4 offload on an IPv6 one.
        let mut read = tso(3000, 1368);
        read[1] = vnet::GSO_TCPV6;
        let r = split(&mut read, true, true, &mut seg, |_| emitted += 1);
        assert_eq!(r, Err(Refused::Malformed));
        let mut read = tso6(3000, 1348);
        read[1] = vnet::GSO_TCPV4;
        let r = split(&mut read, true, true, &mut seg, |_| emitted += 1);
        assert_eq!(r, Err(Refused::Malformed));
        // A header cut short.
        let mut read = tso6(0, 1348);
        read.truncate(VNET_HDR_LEN + 50);
        let r = split(&mut read, true, true, &mut seg, |_| emitted += 1);
        assert_eq!(r, Err(Refused::Malformed));
        assert_eq!(emitted, 0);
        // The same TSO6 packet, untouched, splits.
        let mut read = tso6(3000, 1348);
        assert_eq!(split(&mut read, true, true, &mut seg, |_| {}), Ok(3));
    }

    #[test]
    fn garbage_is_refused_never_a_panic() {
        let mut seg = Vec::new();
        for len in 0..80 {
            for fill in [0u8, 0x45, 0xff, 0x60] {
                for gso in [vnet::GSO_TCPV4, vnet::GSO_TCPV6, vnet::GSO_UDP_L4] {
                    let mut read = vec![fill; len];
                    if len > 1 {
                        read[1] = gso;
                    }
                    if len > VNET_HDR_LEN {
                        read[VNET_HDR_LEN] = fill & 0x0f | 0x60;
                    }
                    let _ = split(&mut read, true, true, &mut seg, |_| {});
                    let _ = split(&mut read, false, true, &mut seg, |_| {});
                }
            }
        }
        let mut read = tso(100, 0);
        assert_eq!(
            split(&mut read, true, true, &mut seg, |_| {}),
            Err(Refused::Malformed)
        );
    }
}
