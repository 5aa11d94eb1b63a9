//! Turning one TUN read (virtio-net header + packet, possibly a TSO/USO
//! super-packet) into the inner packets WireGuard encrypts one by one, each
//! complete with its checksums, as the kernel would have put them on a wire.
//!
//! Unlike the udp backend's encapsulator, nothing here touches the TTL: the
//! kernel already decremented it when it routed the packet into the device, and
//! WireGuard carries packets unchanged.

use crate::csum;
use crate::gso::GsoSplit;
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
        vnet::GSO_TCPV4 | vnet::GSO_UDP_L4 => segment(pkt, &hdr, seg, emit),
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
    if at + 2 > pkt.len() || start < packet::IPV4_MIN_HDR {
        return false;
    }
    let c = csum::finish(csum::add(0, &pkt[start..]));
    put16(pkt, at, if c == 0 { 0xffff } else { c });
    true
}

/// Splits a TSO (TCPv4) or USO (UDPv4) super-packet.
fn segment(
    pkt: &mut [u8],
    hdr: &VnetHdr,
    seg: &mut Vec<u8>,
    mut emit: impl FnMut(&[u8]),
) -> Result<usize, Refused> {
    let ihl = packet::header_len(pkt).map_err(|_| Refused::Malformed)?;
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
    use crate::packet::{be32, PROTO_TCP};

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

    #[test]
    fn garbage_is_refused_never_a_panic() {
        let mut seg = Vec::new();
        for len in 0..80 {
            for fill in [0u8, 0x45, 0xff, 0x60] {
                let mut read = vec![fill; len];
                if len > 1 {
                    read[1] = vnet::GSO_TCPV4;
                }
                let _ = split(&mut read, true, true, &mut seg, |_| {});
                let _ = split(&mut read, false, true, &mut seg, |_| {});
            }
        }
        let mut read = tso(100, 0);
        assert_eq!(
            split(&mut read, true, true, &mut seg, |_| {}),
            Err(Refused::Malformed)
        );
    }
}
