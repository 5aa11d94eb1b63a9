//! A minimal in-process nf_tables netlink client for the periodic resync: read the ruleset
//! generation (NFT_MSG_GETGEN) and fingerprint a few tables/chains without forking `nft`.
//!
//! The kernel bumps the generation on every nf_tables commit in the namespace (our own,
//! kube-proxy's, iptables-nft's). While it stays put nothing can have changed; when it
//! moved, a fingerprint of just our objects says whether the change touched them.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::RulesError;

// include/uapi/linux/netlink.h
const NETLINK_NETFILTER: libc::c_int = 12;
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_DUMP_INTR: u16 = 0x10;
// include/uapi/linux/netfilter/nfnetlink.h
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNETLINK_V0: u8 = 0;
// include/uapi/linux/netfilter/nf_tables.h: enum nf_tables_msg_types
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
// attribute numbers
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_COUNTERS: u16 = 8;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_GEN_ID: u16 = 1;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// nf_tables protocol families (`NFPROTO_*`).
pub(crate) const NFPROTO_IPV4: u8 = 2;
pub(crate) const NFPROTO_IPV6: u8 = 10;

/// One thing to fingerprint.
#[derive(Clone, Debug)]
pub(crate) enum Scope {
    /// The table itself, the named chains in it and every rule in it.
    Table {
        family: u8,
        table: String,
        chains: Vec<String>,
    },
    /// One chain and its rules.
    Chain {
        family: u8,
        table: String,
        chain: String,
    },
}

/// A NETLINK_NETFILTER socket bound to one network namespace.
pub(crate) struct NfNetlink {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl NfNetlink {
    /// Open the socket in `netns` (a name under /run/netns) or in the current namespace.
    ///
    /// The socket stays bound to the namespace it was created in, so a short-lived thread
    /// enters the namespace, creates it and exits; no long-lived thread ever switches.
    pub(crate) fn open(netns: Option<&str>) -> Result<Self, RulesError> {
        let fd = in_netns(netns, open_socket)?.map_err(RulesError::Netlink)?;
        Ok(NfNetlink {
            fd,
            seq: 0,
            buf: vec![0u8; 64 * 1024],
        })
    }

    /// The current ruleset generation id.
    pub(crate) fn generation(&mut self) -> Result<u32, RulesError> {
        let mut gen = None;
        self.request(NFT_MSG_GETGEN, 0, 0, &[], |ty, attrs| {
            if ty == NFT_MSG_NEWGEN {
                for (t, v) in Attrs(attrs) {
                    if t == NFTA_GEN_ID && v.len() == 4 {
                        gen = Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
                    }
                }
            }
        })
        .map_err(RulesError::Netlink)?;
        gen.ok_or_else(|| {
            RulesError::Netlink(io::Error::other("NEWGEN reply without a generation id"))
        })
    }

    /// A hash over everything in `scopes` that a rule change can alter, leaving out
    /// packet/byte counters (iptables-nft rules all carry one). Absent objects hash as
    /// absent, so creating or deleting them changes the result too.
    ///
    /// Returns `(fingerprint, generation)`; the generation was read before and after the
    /// dumps and was the same, so the fingerprint shows one consistent ruleset.
    pub(crate) fn fingerprint(&mut self, scopes: &[Scope]) -> Result<(u64, u32), RulesError> {
        for _ in 0..5 {
            let before = self.generation()?;
            let mut h = Fnv::new();
            for (i, s) in scopes.iter().enumerate() {
                h.write(&(i as u32).to_le_bytes());
                self.hash_scope(s, &mut h).map_err(RulesError::Netlink)?;
            }
            if self.generation()? == before {
                return Ok((h.finish(), before));
            }
        }
        Err(RulesError::Netlink(io::Error::other(
            "ruleset kept changing while it was read (5 tries)",
        )))
    }

    fn hash_scope(&mut self, scope: &Scope, h: &mut Fnv) -> io::Result<()> {
        match scope {
            Scope::Table {
                family,
                table,
                chains,
            } => {
                let mut req = Vec::new();
                put_str_attr(&mut req, NFTA_TABLE_NAME, table);
                self.hash_reply(NFT_MSG_GETTABLE, *family, 0, &req, h)?;
                for c in chains {
                    self.hash_chain(*family, table, c, h)?;
                }
                let mut req = Vec::new();
                put_str_attr(&mut req, NFTA_RULE_TABLE, table);
                self.hash_reply(NFT_MSG_GETRULE, *family, NLM_F_DUMP, &req, h)
            }
            Scope::Chain {
                family,
                table,
                chain,
            } => {
                self.hash_chain(*family, table, chain, h)?;
                let mut req = Vec::new();
                put_str_attr(&mut req, NFTA_RULE_TABLE, table);
                put_str_attr(&mut req, NFTA_RULE_CHAIN, chain);
                self.hash_reply(NFT_MSG_GETRULE, *family, NLM_F_DUMP, &req, h)
            }
        }
    }

    fn hash_chain(&mut self, family: u8, table: &str, chain: &str, h: &mut Fnv) -> io::Result<()> {
        let mut req = Vec::new();
        put_str_attr(&mut req, NFTA_CHAIN_TABLE, table);
        put_str_attr(&mut req, NFTA_CHAIN_NAME, chain);
        self.hash_reply(NFT_MSG_GETCHAIN, family, 0, &req, h)
    }

    /// Send one request and hash its reply messages; "does not exist" hashes as a marker.
    fn hash_reply(
        &mut self,
        msg: u16,
        family: u8,
        flags: u16,
        attrs: &[u8],
        h: &mut Fnv,
    ) -> io::Result<()> {
        let mut count = 0u32;
        let res = self.request(msg, family, flags, attrs, |ty, payload| {
            count += 1;
            h.write(&ty.to_le_bytes());
            hash_object(ty, payload, h);
        });
        match res {
            Ok(()) => {
                h.write(&count.to_le_bytes());
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                h.write(b"absent");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Send a request and feed each reply's type and attributes (after the nfgenmsg
    /// header, whose res_id carries the generation) to `each`.
    fn request(
        &mut self,
        msg: u16,
        family: u8,
        flags: u16,
        attrs: &[u8],
        mut each: impl FnMut(u16, &[u8]),
    ) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let total = NLMSG_HDRLEN + 4 + attrs.len();
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(&(total as u32).to_ne_bytes());
        out.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | msg).to_ne_bytes());
        out.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&[family, NFNETLINK_V0, 0, 0]);
        out.extend_from_slice(attrs);
        // SAFETY: `out` is a valid buffer of `out.len()` bytes; the fd is an open netlink
        // socket owned by self. Sending to the kernel needs no address (bound at open).
        let n = unsafe { libc::send(self.fd.as_raw_fd(), out.as_ptr().cast(), out.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        loop {
            // SAFETY: `self.buf` is a valid writable buffer of `self.buf.len()` bytes.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let data = &self.buf[..n as usize];
            let mut off = 0;
            let mut finished = false;
            while off + NLMSG_HDRLEN <= data.len() {
                let len =
                    u32::from_ne_bytes(data[off..off + 4].try_into().unwrap_or_default()) as usize;
                let ty = u16::from_ne_bytes([data[off + 4], data[off + 5]]);
                let mflags = u16::from_ne_bytes([data[off + 6], data[off + 7]]);
                let mseq =
                    u32::from_ne_bytes(data[off + 8..off + 12].try_into().unwrap_or_default());
                if len < NLMSG_HDRLEN || off + len > data.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "truncated netlink message",
                    ));
                }
                let body = &data[off + NLMSG_HDRLEN..off + len];
                off += align4(len);
                if mseq != seq {
                    continue; // a late reply to an earlier request
                }
                if mflags & NLM_F_DUMP_INTR != 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::Interrupted,
                        "netlink dump interrupted",
                    ));
                }
                match ty {
                    NLMSG_ERROR => {
                        let code = body
                            .get(..4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .unwrap_or(-libc::EIO);
                        if code != 0 {
                            return Err(io::Error::from_raw_os_error(-code));
                        }
                        finished = true;
                    }
                    NLMSG_DONE => finished = true,
                    _ => {
                        if body.len() >= 4 {
                            each(ty & 0xff, &body[4..]);
                        }
                        if !dump {
                            finished = true;
                        }
                    }
                }
            }
            if finished {
                return Ok(());
            }
        }
    }
}

/// Run `f` in `netns` (a name under /run/netns) on a short-lived thread, or right here
/// when `None`. Sockets created by `f` stay bound to that namespace.
pub(crate) fn in_netns<T: Send + 'static>(
    netns: Option<&str>,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, RulesError> {
    let Some(name) = netns else {
        return Ok(f());
    };
    let name = name.to_string();
    let path = format!("/run/netns/{name}");
    std::thread::Builder::new()
        .name("rules-netns".into())
        .spawn(move || -> io::Result<T> {
            let ns = std::fs::File::open(&path)?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(io::Error::from)?;
            Ok(f())
        })
        .map_err(RulesError::Thread)?
        .join()
        .map_err(|_| RulesError::Netns {
            name: name.clone(),
            source: io::Error::other("namespace thread panicked"),
        })?
        .map_err(|source| RulesError::Netns { name, source })
}

fn open_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_nl is plain old data; all-zero is a valid value (pid 0 = kernel
    // assigns, no groups).
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `sa` is a valid sockaddr_nl and its size is passed along.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // Never hang the resync thread on a kernel that does not answer.
    let tv = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: `tv` is a valid timeval and its size is passed along.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Hash one object's attributes, leaving out values that traffic changes.
fn hash_object(ty: u16, attrs: &[u8], h: &mut Fnv) {
    for (t, v) in Attrs(attrs) {
        match (ty, t) {
            (NFT_MSG_NEWCHAIN, NFTA_CHAIN_COUNTERS) => {}
            (NFT_MSG_NEWRULE, NFTA_RULE_EXPRESSIONS) => {
                h.write(&t.to_le_bytes());
                for (et, ev) in Attrs(v) {
                    if et != NFTA_LIST_ELEM {
                        continue;
                    }
                    let name = Attrs(ev)
                        .find(|(a, _)| *a == NFTA_EXPR_NAME)
                        .map(|(_, n)| n);
                    match name {
                        // The counter's data is its packet/byte count: only note it exists.
                        Some(n) if n.strip_suffix(b"\0").unwrap_or(n) == b"counter" => {
                            h.write(b"counter")
                        }
                        _ => h.write(ev),
                    }
                }
            }
            _ => {
                h.write(&t.to_le_bytes());
                h.write(&(v.len() as u32).to_le_bytes());
                h.write(v);
            }
        }
    }
}

/// Iterator over netlink attributes `(type without flags, value)`; stops at malformed data.
struct Attrs<'a>(&'a [u8]);

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        if self.0.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([self.0[0], self.0[1]]) as usize;
        let ty = u16::from_ne_bytes([self.0[2], self.0[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > self.0.len() {
            self.0 = &[];
            return None;
        }
        let val = &self.0[4..len];
        self.0 = self.0.get(align4(len)..).unwrap_or(&[]);
        Some((ty, val))
    }
}

fn put_str_attr(buf: &mut Vec<u8>, ty: u16, s: &str) {
    let len = 4 + s.len() + 1;
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(s.as_bytes());
    buf.push(0);
    buf.resize(buf.len() + (align4(len) - len), 0);
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// FNV-1a, 64 bit: deterministic across runs, no dependency.
pub(crate) struct Fnv(u64);

impl Fnv {
    pub(crate) fn new() -> Self {
        Fnv(0xcbf29ce484222325)
    }
    pub(crate) fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x100000001b3);
        }
    }
    pub(crate) fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn attrs_roundtrip_and_malformed_input() {
        let mut b = Vec::new();
        put_str_attr(&mut b, 1, "nat");
        put_str_attr(&mut b, 2, "POSTROUTING");
        let got: Vec<_> = Attrs(&b).collect();
        assert_eq!(got, vec![(1, &b"nat\0"[..]), (2, &b"POSTROUTING\0"[..])]);
        // A length running past the end stops iteration instead of panicking.
        let bad = [200u8, 0, 1, 0, b'x'];
        assert_eq!(Attrs(&bad).count(), 0);
        assert_eq!(Attrs(&[1, 0]).count(), 0);
    }

    #[test]
    fn counter_values_do_not_change_the_hash() {
        fn rule(counter_val: u8) -> Vec<u8> {
            let mut counter = Vec::new();
            put_str_attr(&mut counter, NFTA_EXPR_NAME, "counter");
            counter.extend_from_slice(&[8, 0, 2, 0, counter_val, 0, 0, 0]);
            let mut masq = Vec::new();
            put_str_attr(&mut masq, NFTA_EXPR_NAME, "masq");
            let mut list = Vec::new();
            for e in [&counter, &masq] {
                list.extend_from_slice(&((e.len() + 4) as u16).to_ne_bytes());
                list.extend_from_slice(&NFTA_LIST_ELEM.to_ne_bytes());
                list.extend_from_slice(e);
            }
            let mut r = Vec::new();
            r.extend_from_slice(&((list.len() + 4) as u16).to_ne_bytes());
            r.extend_from_slice(&NFTA_RULE_EXPRESSIONS.to_ne_bytes());
            r.extend_from_slice(&list);
            r
        }
        let hash = |r: &[u8]| {
            let mut h = Fnv::new();
            hash_object(NFT_MSG_NEWRULE, r, &mut h);
            h.finish()
        };
        assert_eq!(hash(&rule(1)), hash(&rule(9)));
        let mut other = rule(1);
        let at = other.len() - 8; // the 'm' of "masq"
        other[at] ^= 0x20;
        assert_ne!(hash(&rule(1)), hash(&other));
    }
}
