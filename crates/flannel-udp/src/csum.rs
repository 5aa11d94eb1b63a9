//! Internet checksum (RFC 1071) arithmetic.
//!
//! Sums are carried unfolded in a `u64` so that a header, a pseudo header and a
//! payload can be summed separately and added; `fold` reduces to 16 bits at the end.

use std::net::Ipv4Addr;

/// Adds `data` (big-endian 16-bit words; an odd last byte is padded with zero) to
/// `acc`. `data` must start at an even offset of the checksummed region.
#[inline]
pub fn add(acc: u64, data: &[u8]) -> u64 {
    // Native-endian 32-bit words into four independent u64 lanes: no carry
    // handling (2^32 words would be needed to overflow) and room for the CPU to
    // add in parallel. A one's complement sum is byte-order independent up to a
    // final byte swap.
    let (mut a0, mut a1, mut a2, mut a3) = (0u64, 0u64, 0u64, 0u64);
    let word =
        |c: &[u8], i: usize| u64::from(u32::from_ne_bytes([c[i], c[i + 1], c[i + 2], c[i + 3]]));
    let mut chunks = data.chunks_exact(16);
    for c in &mut chunks {
        a0 += word(c, 0);
        a1 += word(c, 4);
        a2 += word(c, 8);
        a3 += word(c, 12);
    }
    let rest = chunks.remainder();
    let mut tail = [0u8; 16];
    tail[..rest.len()].copy_from_slice(rest);
    a0 += word(&tail, 0) + word(&tail, 4);
    a1 += word(&tail, 8) + word(&tail, 12);
    let v = fold(a0 + a1 + a2 + a3);
    let be = if cfg!(target_endian = "little") {
        v.swap_bytes()
    } else {
        v
    };
    acc + u64::from(be)
}

/// Reduces an unfolded sum to 16 bits (one's complement, not inverted).
#[inline]
pub fn fold(acc: u64) -> u16 {
    let mut s = (acc & 0xffff_ffff) + (acc >> 32);
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// The checksum field value for data whose unfolded sum is `acc`.
#[inline]
pub fn finish(acc: u64) -> u16 {
    !fold(acc)
}

/// Unfolded sum of the TCP/UDP pseudo header.
#[inline]
pub fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: u32) -> u64 {
    u64::from(u32::from(src)) + u64::from(u32::from(dst)) + u64::from(proto) + u64::from(len)
}

/// The IPv4 header checksum of `hdr` (whose checksum field must be zero).
#[inline]
pub fn ipv4_header(hdr: &[u8]) -> u16 {
    finish(add(0, hdr))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::packet::tests_support::reference_checksum as reference;

    #[test]
    fn matches_word_by_word_reference() {
        let mut data = Vec::new();
        for n in 0..300u32 {
            data.push((n.wrapping_mul(2654435761) >> 13) as u8);
            assert_eq!(
                finish(add(0, &data)),
                reference(&data),
                "len {}",
                data.len()
            );
        }
        let ff = vec![0xffu8; 4096];
        assert_eq!(finish(add(0, &ff)), reference(&ff));
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
        let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(add(0, &d)), 0xddf2);
    }

    #[test]
    fn split_sums_add_up() {
        let d: Vec<u8> = (0..1000u32).map(|n| (n * 7 + 3) as u8).collect();
        let whole = fold(add(0, &d));
        let parts = fold(add(add(0, &d[..40]), &d[40..]));
        assert_eq!(whole, parts);
    }
}
