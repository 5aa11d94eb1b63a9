//! In-process fingerprint of legacy (x_tables) iptables tables, so the resync need not
//! fork `iptables-legacy-save` every interval: the same `IPT_SO_GET_INFO` /
//! `IPT_SO_GET_ENTRIES` getsockopt calls iptables-legacy-save itself makes, with the
//! per-rule packet/byte counters zeroed before hashing.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::nfnl::{contains_bytes, in_netns, Fnv};
use super::RulesError;

// include/uapi/linux/netfilter_ipv4/ip_tables.h and netfilter_ipv6/ip6_tables.h
const SO_GET_INFO: libc::c_int = 64;
const SO_GET_ENTRIES: libc::c_int = 65;
const TABLE_NAME_LEN: usize = 32;
/// `struct ipt_getinfo`: name, valid_hooks, hook_entry[5], underflow[5], num_entries, size.
const GETINFO_LEN: usize = TABLE_NAME_LEN + 4 + 20 + 20 + 4 + 4;
/// `sizeof(struct ipt_get_entries)`: name + size, padded to the 8-byte alignment of the
/// entries (they hold u64 counters). Same for ip6t.
const GET_ENTRIES_HDR: usize = 40;

/// Field offsets in one entry (`struct ipt_entry` / `struct ip6t_entry`).
#[derive(Clone, Copy)]
struct Layout {
    next_offset: usize,
    counters: usize,
}

/// `struct ipt_ip` is 84 bytes: nfcache @84, target_offset @88, next_offset @90,
/// comefrom @92, counters (2×u64) @96.
const IPV4: Layout = Layout {
    next_offset: 90,
    counters: 96,
};
/// `struct ip6t_ip6` is 136 bytes: nfcache @136, target_offset @140, next_offset @142,
/// comefrom @144, counters @152 (8-aligned).
const IPV6: Layout = Layout {
    next_offset: 142,
    counters: 152,
};

/// Raw sockets (one per family) in the engine's namespace, used only for getsockopt.
pub(crate) struct XtLegacy {
    netns: Option<String>,
    v4: OwnedFd,
    v6: Option<OwnedFd>,
}

impl XtLegacy {
    pub(crate) fn open(netns: Option<&str>) -> Result<Self, RulesError> {
        let (v4, v6) = in_netns(netns, || {
            let v4 = raw_socket(libc::AF_INET);
            // IPv6 may be disabled in the kernel: then there is nothing to fingerprint.
            let v6 = raw_socket(libc::AF_INET6).ok();
            (v4, v6)
        })?;
        Ok(XtLegacy {
            netns: netns.map(str::to_string),
            v4: v4.map_err(RulesError::Netlink)?,
            v6,
        })
    }

    /// Whether any of `needles` (chain names, comments) occurs in the table's entries:
    /// user chains are entries named after the chain, a comment is match data. A table
    /// this namespace has not instantiated (not listed in `/proc/net/ip{,6}_tables_names`)
    /// holds nothing and is not read, since reading it would create it.
    pub(crate) fn mentions(
        &self,
        v6: bool,
        table: &str,
        needles: &[&str],
    ) -> Result<bool, RulesError> {
        let names = if v6 {
            "ip6_tables_names"
        } else {
            "ip_tables_names"
        };
        let path = format!("/proc/thread-self/net/{names}");
        let listed = in_netns(self.netns.as_deref(), move || std::fs::read_to_string(path))?;
        let listed = match listed {
            Ok(text) => text.lines().any(|l| l.trim() == table),
            // No x_tables module loaded: no legacy table exists.
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(RulesError::Netlink(e)),
        };
        if !listed {
            return Ok(false);
        }
        let (fd, level) = if v6 {
            let Some(fd) = self.v6.as_ref() else {
                return Ok(false);
            };
            (fd, libc::SOL_IPV6)
        } else {
            (&self.v4, libc::SOL_IP)
        };
        match table_blob(fd, level, table) {
            Ok(blob) => Ok(needles.iter().any(|n| contains_bytes(&blob, n.as_bytes()))),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(RulesError::Netlink(e)),
        }
    }

    /// Hash of the tables `names` of one family (counters left out). A table that is not
    /// loaded hashes as absent.
    pub(crate) fn fingerprint(
        &self,
        v6: bool,
        names: &[&str],
        h: &mut Fnv,
    ) -> Result<(), RulesError> {
        let (fd, level, layout) = if v6 {
            let Some(fd) = self.v6.as_ref() else {
                h.write(b"no-ipv6");
                return Ok(());
            };
            (fd, libc::SOL_IPV6, IPV6)
        } else {
            (&self.v4, libc::SOL_IP, IPV4)
        };
        for name in names {
            h.write(name.as_bytes());
            match table_blob(fd, level, name) {
                Ok(mut blob) => {
                    zero_counters(&mut blob, layout);
                    h.write(&(blob.len() as u64).to_le_bytes());
                    h.write(&blob);
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => h.write(b"absent"),
                Err(e) => return Err(RulesError::Netlink(e)),
            }
        }
        Ok(())
    }
}

fn raw_socket(family: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn getsockopt(
    fd: &OwnedFd,
    level: libc::c_int,
    opt: libc::c_int,
    buf: &mut [u8],
) -> io::Result<usize> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: `buf` is valid and writable for `len` bytes; the kernel writes at most that.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(len as usize)
}

/// The entries blob of one table.
fn table_blob(fd: &OwnedFd, level: libc::c_int, name: &str) -> io::Result<Vec<u8>> {
    if name.len() >= TABLE_NAME_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "table name too long",
        ));
    }
    // The table can change between the two calls (size mismatch: EAGAIN); retry then.
    for _ in 0..5 {
        let mut info = [0u8; GETINFO_LEN];
        info[..name.len()].copy_from_slice(name.as_bytes());
        getsockopt(fd, level, SO_GET_INFO, &mut info)?;
        let size = u32::from_ne_bytes([info[80], info[81], info[82], info[83]]) as usize;
        let mut buf = vec![0u8; GET_ENTRIES_HDR + size];
        buf[..name.len()].copy_from_slice(name.as_bytes());
        buf[TABLE_NAME_LEN..TABLE_NAME_LEN + 4].copy_from_slice(&(size as u32).to_ne_bytes());
        match getsockopt(fd, level, SO_GET_ENTRIES, &mut buf) {
            Ok(_) => {
                buf.drain(..GET_ENTRIES_HDR);
                return Ok(buf);
            }
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::WouldBlock,
        "table kept changing",
    ))
}

/// Zero the packet/byte counters of every entry; stops at malformed data.
fn zero_counters(blob: &mut [u8], l: Layout) {
    let mut off = 0;
    while off + l.counters + 16 <= blob.len() {
        let next =
            u16::from_ne_bytes([blob[off + l.next_offset], blob[off + l.next_offset + 1]]) as usize;
        blob[off + l.counters..off + l.counters + 16].fill(0);
        if next == 0 {
            break;
        }
        off += next;
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn zero_counters_walks_entries_and_survives_garbage() {
        // Two fake IPv4 entries of 120 bytes each with counters set.
        let mut blob = vec![0u8; 240];
        for e in [0usize, 120] {
            blob[e + 90..e + 92].copy_from_slice(&120u16.to_ne_bytes());
            blob[e + 96..e + 112].fill(0xaa);
            blob[e + 112] = 7; // match data stays
        }
        zero_counters(&mut blob, IPV4);
        assert!(blob[96..112].iter().all(|b| *b == 0));
        assert!(blob[216..232].iter().all(|b| *b == 0));
        assert_eq!((blob[112], blob[232]), (7, 7));
        // next_offset 0 or past the end must not loop or panic.
        let mut bad = vec![0u8; 130];
        zero_counters(&mut bad, IPV4);
        let mut short = vec![0xffu8; 50];
        zero_counters(&mut short, IPV6);
    }
}
