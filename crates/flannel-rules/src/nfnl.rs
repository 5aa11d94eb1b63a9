//! A minimal in-process nf_tables netlink client: read the ruleset generation
//! (NFT_MSG_GETGEN), fingerprint a few tables/chains, look at rules and see commits
//! happen, all without forking `nft` or `iptables-save`.
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
/// The nftables multicast group: every commit is announced on it (NEWGEN last).
const NFNLGRP_NFTABLES: libc::c_int = 7;
// attribute numbers
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_COUNTERS: u16 = 8;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_COMPAT: u16 = 5;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_MATCH_NAME: u16 = 1;
const NFTA_MATCH_INFO: u16 = 3;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
/// `enum nft_verdicts`: NFT_JUMP = -3.
const NFT_JUMP: i32 = -3;
/// libnftnl rule user data (type, length, value): the comment TLV.
const NFTNL_UDATA_RULE_COMMENT: u8 = 0;
const NFTA_GEN_ID: u16 = 1;
const NFTA_GEN_PROC_PID: u16 = 2;
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

    /// Whether the table `family name` exists.
    pub(crate) fn table_exists(&mut self, family: u8, table: &str) -> Result<bool, RulesError> {
        let mut req = Vec::new();
        put_str_attr(&mut req, NFTA_TABLE_NAME, table);
        exists(self.request(NFT_MSG_GETTABLE, family, 0, &req, |_, _| {}))
    }

    /// Whether the chain exists (false also when its table does not).
    pub(crate) fn chain_exists(
        &mut self,
        family: u8,
        table: &str,
        chain: &str,
    ) -> Result<bool, RulesError> {
        let mut req = Vec::new();
        put_str_attr(&mut req, NFTA_CHAIN_TABLE, table);
        put_str_attr(&mut req, NFTA_CHAIN_NAME, chain);
        exists(self.request(NFT_MSG_GETCHAIN, family, 0, &req, |_, _| {}))
    }

    /// Feed every rule of a table, chain by chain in rule order, to `each` (its chain
    /// name and its raw attributes) and keep what `each` returns. A missing table has no
    /// rules. A dump the kernel marks as interrupted by a concurrent change is retried.
    pub(crate) fn table_rules<T>(
        &mut self,
        family: u8,
        table: &str,
        mut each: impl FnMut(&[u8], &[u8]) -> Option<T>,
    ) -> Result<Vec<T>, RulesError> {
        let mut req = Vec::new();
        put_str_attr(&mut req, NFTA_RULE_TABLE, table);
        for _ in 0..5 {
            let mut got = Vec::new();
            let res = self.request(NFT_MSG_GETRULE, family, NLM_F_DUMP, &req, |ty, attrs| {
                if ty != NFT_MSG_NEWRULE {
                    return;
                }
                let chain = Attrs(attrs)
                    .find(|(t, _)| *t == NFTA_RULE_CHAIN)
                    .map(|(_, v)| v.strip_suffix(b"\0").unwrap_or(v))
                    .unwrap_or_default();
                if let Some(v) = each(chain, attrs) {
                    got.push(v);
                }
            });
            match res {
                Ok(()) => return Ok(got),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(Vec::new()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(RulesError::Netlink(e)),
            }
        }
        Err(RulesError::Netlink(io::Error::other(
            "rule dump kept being interrupted by changes (5 tries)",
        )))
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
        // Sequence 0 is what kernel notifications carry; never use it for a request.
        self.seq = self.seq.wrapping_add(1).max(1);
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

/// A GET reply means the object exists, ENOENT that it does not.
fn exists(res: io::Result<()>) -> Result<bool, RulesError> {
    match res {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(RulesError::Netlink(e)),
    }
}

/// Whether a rule (raw attributes from [`NfNetlink::table_rules`]) is exactly what
/// `iptables-nft -A <chain> -m comment --comment "<comment>" -j <target>` writes: the
/// comment (an xt `comment` match, or libnftnl's comment user data), a counter, and a
/// jump to `target`, nothing else. Anything unexpected answers false, so a caller that
/// needs certainty falls back to `iptables-save`.
pub(crate) fn is_plain_jump(attrs: &[u8], comment: &str, target: &str) -> bool {
    let mut comments = 0;
    let mut jump_last = false;
    let mut exprs_seen = false;
    for (t, v) in Attrs(attrs) {
        match t {
            NFTA_RULE_EXPRESSIONS => {
                exprs_seen = true;
                for (et, ev) in Attrs(v) {
                    if et != NFTA_LIST_ELEM || jump_last {
                        // Something after the verdict, or not an expression.
                        return false;
                    }
                    let mut name: &[u8] = &[];
                    let mut data: &[u8] = &[];
                    for (a, av) in Attrs(ev) {
                        match a {
                            NFTA_EXPR_NAME => name = av.strip_suffix(b"\0").unwrap_or(av),
                            NFTA_EXPR_DATA => data = av,
                            _ => {}
                        }
                    }
                    match name {
                        b"counter" => {}
                        b"match" if is_comment_match(data, comment) => comments += 1,
                        b"immediate" if is_jump_to(data, target) => jump_last = true,
                        _ => return false,
                    }
                }
            }
            NFTA_RULE_USERDATA => {
                let mut rest = v;
                while let [ty, len, tail @ ..] = rest {
                    let len = usize::from(*len);
                    let Some(value) = tail.get(..len) else {
                        return false;
                    };
                    if *ty != NFTNL_UDATA_RULE_COMMENT
                        || value.strip_suffix(b"\0").unwrap_or(value) != comment.as_bytes()
                    {
                        return false;
                    }
                    comments += 1;
                    rest = &tail[len..];
                }
            }
            // iptables-nft marks rules with an l4 protocol match this way.
            NFTA_RULE_COMPAT => return false,
            _ => {}
        }
    }
    exprs_seen && jump_last && comments == 1
}

/// An xt `comment` match whose text is exactly `comment` (xt_comment_info is a
/// NUL-padded 256-byte array).
fn is_comment_match(data: &[u8], comment: &str) -> bool {
    let mut name_ok = false;
    let mut info_ok = false;
    for (t, v) in Attrs(data) {
        match t {
            NFTA_MATCH_NAME => name_ok = v.strip_suffix(b"\0").unwrap_or(v) == b"comment",
            NFTA_MATCH_INFO => {
                info_ok = v.len() > comment.len()
                    && v.starts_with(comment.as_bytes())
                    && v[comment.len()..].iter().all(|b| *b == 0)
            }
            _ => {}
        }
    }
    name_ok && info_ok
}

/// An `immediate` expression holding the verdict "jump to `target`".
fn is_jump_to(data: &[u8], target: &str) -> bool {
    let Some((_, imm)) = Attrs(data).find(|(t, _)| *t == NFTA_IMMEDIATE_DATA) else {
        return false;
    };
    let Some((_, verdict)) = Attrs(imm).find(|(t, _)| *t == NFTA_DATA_VERDICT) else {
        return false;
    };
    let mut code = None;
    let mut chain = None;
    for (t, v) in Attrs(verdict) {
        match t {
            NFTA_VERDICT_CODE if v.len() == 4 => {
                code = Some(i32::from_be_bytes([v[0], v[1], v[2], v[3]]))
            }
            NFTA_VERDICT_CHAIN => chain = Some(v.strip_suffix(b"\0").unwrap_or(v)),
            _ => {}
        }
    }
    code == Some(NFT_JUMP) && chain == Some(target.as_bytes())
}

/// Whether `needle` occurs in `hay`.
pub(crate) fn contains_bytes(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Hears nf_tables commits as the kernel announces them (NEWGEN on the nftables
/// multicast group, with the committing process's pid), so a caller can tell that a
/// tool's batch is in place without waiting for the tool to exit: a tool closing its
/// netlink socket after a commit waits for an RCU grace period (the kernel flushes its
/// deferred destroy work), several milliseconds during which the batch is long active.
///
/// Subscribed only while a caller waits; idle, it receives nothing.
pub(crate) struct CommitWatch {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl CommitWatch {
    pub(crate) fn open(netns: Option<&str>) -> Result<Self, RulesError> {
        let fd = in_netns(netns, open_socket)?.map_err(RulesError::Netlink)?;
        Ok(CommitWatch {
            fd,
            buf: vec![0u8; 64 * 1024],
        })
    }

    pub(crate) fn fd(&self) -> libc::c_int {
        self.fd.as_raw_fd()
    }

    /// Join (`true`) or leave the nftables multicast group.
    pub(crate) fn subscribe(&self, on: bool) -> io::Result<()> {
        let opt = if on {
            libc::NETLINK_ADD_MEMBERSHIP
        } else {
            libc::NETLINK_DROP_MEMBERSHIP
        };
        let group: libc::c_int = NFNLGRP_NFTABLES;
        // SAFETY: `group` is a valid c_int and its size is passed along.
        let r = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_NETLINK,
                opt,
                (&group as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Read what is queued without blocking and call `f` with the committing pid of
    /// every NEWGEN. An error (e.g. ENOBUFS: notifications were lost) means the watch
    /// can no longer be trusted to have seen everything.
    pub(crate) fn read_commits(&mut self, mut f: impl FnMut(u32)) -> io::Result<()> {
        loop {
            // SAFETY: `self.buf` is a valid writable buffer of `self.buf.len()` bytes.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(()),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            let data = &self.buf[..n as usize];
            let mut off = 0;
            while off + NLMSG_HDRLEN <= data.len() {
                let len =
                    u32::from_ne_bytes(data[off..off + 4].try_into().unwrap_or_default()) as usize;
                let ty = u16::from_ne_bytes([data[off + 4], data[off + 5]]);
                if len < NLMSG_HDRLEN || off + len > data.len() {
                    break;
                }
                let body = &data[off + NLMSG_HDRLEN..off + len];
                off += align4(len);
                if ty == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN && body.len() >= 4 {
                    for (t, v) in Attrs(&body[4..]) {
                        if t == NFTA_GEN_PROC_PID && v.len() == 4 {
                            f(u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
                        }
                    }
                }
            }
        }
    }

    /// Leave the group and throw away whatever is still queued.
    pub(crate) fn stop(&mut self) {
        let _ = self.subscribe(false);
        let _ = self.read_commits(|_| {});
    }
}

/// Run `f` in `netns` (a name under /run/netns) on a short-lived thread, or right here
/// when `None`. Sockets created by `f` stay bound to that namespace.
pub(crate) fn in_netns<T: Send + 'static>(
    netns: Option<&str>,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, RulesError> {
    match netns {
        None => Ok(f()),
        Some(name) => Ok(flannel_net::netns::run_in_netns(
            &flannel_net::netns::netns_path(name),
            f,
        )?),
    }
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
