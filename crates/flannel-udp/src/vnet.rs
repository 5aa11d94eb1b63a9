//! The virtio-net header the TUN prepends to (and expects before) every packet when
//! opened with IFF_VNET_HDR. It carries the offload state: a GSO super-packet's
//! segment size and a checksum left for us to finish.

pub const VNET_HDR_LEN: usize = 10;

pub const F_NEEDS_CSUM: u8 = 1;
pub const F_DATA_VALID: u8 = 2;

pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
pub const GSO_ECN: u8 = 0x80;

/// `struct virtio_net_hdr`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Decodes the first [`VNET_HDR_LEN`] bytes; `le` says whether the device uses
    /// little-endian fields (TUNSETVNETLE, or a little-endian host).
    pub fn decode(b: &[u8], le: bool) -> Option<VnetHdr> {
        if b.len() < VNET_HDR_LEN {
            return None;
        }
        let r = |at: usize| {
            let v = [b[at], b[at + 1]];
            if le {
                u16::from_le_bytes(v)
            } else {
                u16::from_be_bytes(v)
            }
        };
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: r(2),
            gso_size: r(4),
            csum_start: r(6),
            csum_offset: r(8),
        })
    }

    pub fn encode(&self, out: &mut [u8; VNET_HDR_LEN], le: bool) {
        let w = |v: u16| if le { v.to_le_bytes() } else { v.to_be_bytes() };
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&w(self.hdr_len));
        out[4..6].copy_from_slice(&w(self.gso_size));
        out[6..8].copy_from_slice(&w(self.csum_start));
        out[8..10].copy_from_slice(&w(self.csum_offset));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_both_orders() {
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 52,
            gso_size: 1420,
            csum_start: 20,
            csum_offset: 16,
        };
        for le in [true, false] {
            let mut b = [0u8; VNET_HDR_LEN];
            h.encode(&mut b, le);
            assert_eq!(VnetHdr::decode(&b, le), Some(h));
        }
        let mut b = [0u8; VNET_HDR_LEN];
        h.encode(&mut b, true);
        assert_eq!(b, [1, 1, 52, 0, 0x8c, 0x05, 20, 0, 16, 0]);
        assert_eq!(VnetHdr::decode(&b[..9], true), None);
    }
}
