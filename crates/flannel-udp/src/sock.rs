//! The UDP side: sockets bound to `<iface addr>:<Port>`, batched sends
//! (sendmmsg, UDP GSO) and receives (recvmmsg, UDP GRO), with runtime probes.

use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tracing::warn;

use crate::counters::CounterValues;
use crate::tun::wait_fd;
use crate::tx::{Dgram, TxBatch};

/// Most segments in one GSO send (the kernel's UDP_MAX_SEGMENTS before 6.9).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// Largest UDP payload over IPv4.
pub const MAX_UDP_PAYLOAD: usize = 65535 - 20 - 8;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

pub fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data.
    let mut s: libc::sockaddr_in = unsafe { mem::zeroed() };
    s.sin_family = libc::AF_INET as libc::sa_family_t;
    s.sin_port = a.port().to_be();
    s.sin_addr.s_addr = u32::from(*a.ip()).to_be();
    s
}

pub fn sockaddr6(a: SocketAddrV6) -> libc::sockaddr_in6 {
    // SAFETY: sockaddr_in6 is plain old data.
    let mut s: libc::sockaddr_in6 = unsafe { mem::zeroed() };
    s.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    s.sin6_port = a.port().to_be();
    s.sin6_addr.s6_addr = a.ip().octets();
    s.sin6_flowinfo = a.flowinfo();
    s.sin6_scope_id = a.scope_id();
    s
}

/// A socket address in storage that fits either family, as `to` is written for a
/// socket of family AF_INET6 (`v6_socket`, where an IPv4 peer is IPv4-mapped) or
/// AF_INET. Returns the name length to pass with it.
pub fn name_of(to: SocketAddr, v6_socket: bool, out: &mut libc::sockaddr_in6) -> libc::socklen_t {
    match (to, v6_socket) {
        (SocketAddr::V4(a), false) => {
            let sa = sockaddr(a);
            // SAFETY: sockaddr_in (16 bytes) fits in sockaddr_in6 (28), whose
            // alignment is at least as strict.
            unsafe { std::ptr::write((out as *mut libc::sockaddr_in6).cast(), sa) };
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        (SocketAddr::V4(a), true) => {
            *out = sockaddr6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0));
            mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
        // On an AF_INET socket the kernel refuses this, and the send is counted
        // as failed.
        (SocketAddr::V6(a), _) => {
            *out = sockaddr6(a);
            mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// The sender a kernel name describes (IPv4-mapped IPv6 as IPv4, so a dual-stack
/// socket's IPv4 peers compare equal to their configured endpoints).
fn addr_of(sa: &libc::sockaddr_in6) -> Option<SocketAddr> {
    match libc::c_int::from(sa.sin6_family) {
        libc::AF_INET => {
            // SAFETY: an AF_INET name is a sockaddr_in at the start of the storage.
            let v4 = unsafe { &*(sa as *const libc::sockaddr_in6).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr)),
                u16::from_be(v4.sin_port),
            )))
        }
        libc::AF_INET6 => {
            let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
            let port = u16::from_be(sa.sin6_port);
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
                None => SocketAddr::V6(SocketAddrV6::new(
                    ip,
                    port,
                    sa.sin6_flowinfo,
                    sa.sin6_scope_id,
                )),
            })
        }
        _ => None,
    }
}

fn udp_socket(family: libc::c_int, reuseport: bool) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked and owned below.
    let fd = cvt(unsafe {
        libc::socket(
            family,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    })?;
    // SAFETY: fd is fresh and ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if reuseport {
        setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    }
    // Big buffers absorb bursts (and a restart's backlog); FORCE needs CAP_NET_ADMIN.
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        let size = 16 << 20;
        if setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, force, size).is_err() {
            let _ = setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, plain, size);
        }
    }
    Ok(fd)
}

/// A non-blocking UDP socket bound to `addr`; `reuseport` lets one socket per
/// worker share the address.
pub fn bind(addr: SocketAddrV4, reuseport: bool) -> io::Result<OwnedFd> {
    let fd = udp_socket(libc::AF_INET, reuseport)?;
    let sa = sockaddr(addr);
    // SAFETY: sa is a valid sockaddr_in of the stated size.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })?;
    Ok(fd)
}

/// A non-blocking AF_INET6 UDP socket bound to `addr`. With `v6_only` false it
/// also carries IPv4 (as IPv4-mapped addresses): one port for peers of both
/// families, as a kernel WireGuard device has.
pub fn bind6(addr: SocketAddrV6, v6_only: bool) -> io::Result<OwnedFd> {
    let fd = udp_socket(libc::AF_INET6, false)?;
    setsockopt_int(
        fd.as_raw_fd(),
        libc::IPPROTO_IPV6,
        libc::IPV6_V6ONLY,
        i32::from(v6_only),
    )?;
    let sa = sockaddr6(addr);
    // SAFETY: sa is a valid sockaddr_in6 of the stated size.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in6).cast(),
            mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    })?;
    Ok(fd)
}

/// The address a socket is bound to (for checking inherited sockets).
pub fn local_addr(fd: RawFd) -> io::Result<SocketAddrV4> {
    // SAFETY: zeroed storage for getsockname to fill.
    let mut sa: libc::sockaddr_in = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: sa/len describe a writable sockaddr_in.
    cvt(unsafe { libc::getsockname(fd, (&mut sa as *mut libc::sockaddr_in).cast(), &mut len) })?;
    if libc::c_int::from(sa.sin_family) != libc::AF_INET {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not an IPv4 socket",
        ));
    }
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
        u16::from_be(sa.sin_port),
    ))
}

/// Whether the kernel accepts UDP_SEGMENT (probed on a throwaway socket so the
/// real one keeps no default segment size).
pub fn probe_gso() -> Result<(), io::Error> {
    // SAFETY: plain socket(2), owned below.
    let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fresh fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    setsockopt_int(fd.as_raw_fd(), libc::SOL_UDP, libc::UDP_SEGMENT, 1400)
}

/// Turns on UDP GRO (coalesced receives with a segment-size cmsg).
pub fn enable_gro(fd: RawFd) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_UDP, libc::UDP_GRO, 1)
}

const CMSG_GSO_SPACE: usize =
    // SAFETY: CMSG_SPACE is a pure size computation; it touches no memory.
    unsafe { libc::CMSG_SPACE(mem::size_of::<u16>() as u32) } as usize;
const CMSG_RX_SPACE: usize = 64;

/// Batched sender: turns a [`TxBatch`] into sendmmsg calls, one message per run of
/// equal-sized datagrams to the same peer (a GSO send) or per datagram.
pub struct Sender {
    pub gso: bool,
    /// The socket is AF_INET6 (IPv4 destinations go IPv4-mapped).
    v6_socket: bool,
    iov: Vec<libc::iovec>,
    groups: Vec<Group>,
    names: Vec<(libc::sockaddr_in6, libc::socklen_t)>,
    cmsgs: Vec<[u8; CMSG_GSO_SPACE]>,
    msgs: Vec<libc::mmsghdr>,
    warned: bool,
}

#[derive(Clone, Copy)]
struct Group {
    dst: SocketAddr,
    iov_start: usize,
    iov_len: usize,
    seg: usize,
    count: usize,
    bytes: usize,
}

impl Sender {
    pub fn new(gso: bool) -> Self {
        Sender {
            gso,
            v6_socket: false,
            iov: Vec::with_capacity(1024),
            groups: Vec::with_capacity(256),
            names: Vec::with_capacity(256),
            cmsgs: Vec::with_capacity(256),
            msgs: Vec::with_capacity(256),
            warned: false,
        }
    }

    /// A sender for an AF_INET6 socket.
    pub fn new_v6(gso: bool) -> Self {
        Sender {
            v6_socket: true,
            ..Sender::new(gso)
        }
    }

    fn plan(&mut self, batch: &TxBatch, bufs: &[Box<[u8]>], gso: bool) {
        self.iov.clear();
        self.groups.clear();
        let push = |iov: &mut Vec<libc::iovec>, d: &Dgram| {
            if d.hdr_len > 0 {
                iov.push(libc::iovec {
                    iov_base: batch.scratch[d.hdr_start as usize..].as_ptr() as *mut _,
                    iov_len: d.hdr_len as usize,
                });
            }
            iov.push(libc::iovec {
                iov_base: bufs[d.buf as usize][d.body_start as usize..].as_ptr() as *mut _,
                iov_len: d.body_len as usize,
            });
        };
        for d in &batch.dgrams {
            let len = d.len();
            if gso {
                if let Some(g) = self.groups.last_mut() {
                    // Joins when same peer, not past a short (final) segment, and
                    // within the kernel's limits.
                    if g.dst == d.dst
                        && len <= g.seg
                        && g.bytes == g.seg * g.count
                        && g.count < GSO_MAX_SEGMENTS
                        && g.bytes + len <= MAX_UDP_PAYLOAD
                    {
                        push(&mut self.iov, d);
                        g.iov_len = self.iov.len() - g.iov_start;
                        g.count += 1;
                        g.bytes += len;
                        continue;
                    }
                }
            }
            let start = self.iov.len();
            push(&mut self.iov, d);
            self.groups.push(Group {
                dst: d.dst,
                iov_start: start,
                iov_len: self.iov.len() - start,
                seg: len,
                count: 1,
                bytes: len,
            });
        }
    }

    /// Sends everything in `batch` (datagram bodies live in `bufs`). Blocks while the
    /// socket buffer is full. Failed datagrams are counted, not retried.
    pub fn send(
        &mut self,
        fd: RawFd,
        batch: &TxBatch,
        bufs: &[Box<[u8]>],
        tally: &mut CounterValues,
    ) {
        if batch.dgrams.is_empty() {
            return;
        }
        self.plan(batch, bufs, self.gso);
        let n = self.groups.len();
        self.names.clear();
        self.cmsgs.clear();
        self.msgs.clear();
        for g in &self.groups {
            // SAFETY: sockaddr_in6 is plain old data; name_of fills it.
            let mut name: libc::sockaddr_in6 = unsafe { mem::zeroed() };
            let len = name_of(g.dst, self.v6_socket, &mut name);
            self.names.push((name, len));
            self.cmsgs.push([0u8; CMSG_GSO_SPACE]);
        }
        for i in 0..n {
            let g = self.groups[i];
            // SAFETY: mmsghdr is plain old data; zero is a valid starting point.
            let mut m: libc::mmsghdr = unsafe { mem::zeroed() };
            m.msg_hdr.msg_name = (&mut self.names[i].0 as *mut libc::sockaddr_in6).cast();
            m.msg_hdr.msg_namelen = self.names[i].1;
            m.msg_hdr.msg_iov = self.iov[g.iov_start..].as_mut_ptr();
            m.msg_hdr.msg_iovlen = g.iov_len as _;
            if g.count > 1 {
                let c = &mut self.cmsgs[i];
                m.msg_hdr.msg_control = c.as_mut_ptr().cast();
                m.msg_hdr.msg_controllen = CMSG_GSO_SPACE as _;
                // SAFETY: msg_control points at CMSG_GSO_SPACE zeroed bytes, enough
                // for one cmsg carrying a u16; CMSG_* compute offsets inside it.
                unsafe {
                    let cm = libc::CMSG_FIRSTHDR(&m.msg_hdr);
                    (*cm).cmsg_level = libc::SOL_UDP;
                    (*cm).cmsg_type = libc::UDP_SEGMENT;
                    (*cm).cmsg_len = libc::CMSG_LEN(mem::size_of::<u16>() as u32) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(cm).cast::<u16>(), g.seg as u16);
                }
            }
            self.msgs.push(m);
        }
        let mut done = 0;
        while done < n {
            // SAFETY: msgs[done..n] are initialised mmsghdrs whose pointers target
            // self.iov/names/cmsgs and the batch buffers, all alive and unmoved.
            let r =
                unsafe { libc::sendmmsg(fd, self.msgs[done..].as_mut_ptr(), (n - done) as u32, 0) };
            if r > 0 {
                done += r as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => {
                    let _ = wait_fd(fd, libc::POLLOUT, 1000, None);
                    continue;
                }
                Some(libc::EIO) | Some(libc::EINVAL) if self.groups[done].count > 1 => {
                    // The device cannot segment (no checksum offload) or refuses
                    // the size: stop using GSO and send this run one by one.
                    if !self.warned {
                        warn!(error = %e, "UDP GSO send failed; falling back to one datagram per send");
                        self.warned = true;
                    }
                    self.gso = false;
                    let g = self.groups[done];
                    self.send_each(fd, g, tally);
                    done += 1;
                }
                _ => {
                    tally.tx_drop_send_error += self.groups[done].count as u64;
                    done += 1;
                }
            }
        }
    }

    /// Sends a group's datagrams one per sendmsg (GSO fallback).
    fn send_each(&mut self, fd: RawFd, g: Group, tally: &mut CounterValues) {
        // SAFETY: sockaddr_in6 is plain old data; name_of fills it.
        let mut name: libc::sockaddr_in6 = unsafe { mem::zeroed() };
        let namelen = name_of(g.dst, self.v6_socket, &mut name);
        let mut at = g.iov_start;
        let end = g.iov_start + g.iov_len;
        while at < end {
            // Each datagram is (header, body) or (body): find its iovecs by length.
            let mut len = 0;
            let mut k = at;
            while k < end && len < g.seg {
                len += self.iov[k].iov_len;
                k += 1;
            }
            // SAFETY: zeroed msghdr, then pointers to live iovecs and the name.
            let mut m: libc::msghdr = unsafe { mem::zeroed() };
            m.msg_name = (&mut name as *mut libc::sockaddr_in6).cast();
            m.msg_namelen = namelen;
            m.msg_iov = self.iov[at..].as_mut_ptr();
            m.msg_iovlen = (k - at) as _;
            loop {
                // SAFETY: m describes live buffers as above.
                let r = unsafe { libc::sendmsg(fd, &m, 0) };
                if r >= 0 {
                    break;
                }
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => {
                        let _ = wait_fd(fd, libc::POLLOUT, 1000, None);
                        continue;
                    }
                    _ => {
                        tally.tx_drop_send_error += 1;
                        break;
                    }
                }
            }
            at = k;
        }
    }
}

/// One received datagram (or GRO batch) in a [`Receiver`].
#[derive(Debug, Clone, Copy)]
pub struct Received {
    /// The sender's address (IPv4 also when it came IPv4-mapped on an AF_INET6
    /// socket); unspecified when the kernel named none.
    pub from: IpAddr,
    /// The sender's UDP port.
    pub port: u16,
    pub len: usize,
    /// GRO segment size; 0 when the datagram was not coalesced.
    pub stride: usize,
    pub truncated: bool,
}

/// Batched receiver over recvmmsg, with preallocated buffers.
pub struct Receiver {
    pub bufs: Vec<Box<[u8]>>,
    names: Vec<libc::sockaddr_in6>,
    cmsgs: Vec<[u8; CMSG_RX_SPACE]>,
    iov: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    pub got: Vec<Received>,
}

impl Receiver {
    pub fn new(batch: usize, buf_size: usize) -> Self {
        let mut r = Receiver {
            bufs: (0..batch)
                .map(|_| vec![0u8; buf_size].into_boxed_slice())
                .collect(),
            // SAFETY: sockaddr_in6 is plain old data.
            names: vec![unsafe { mem::zeroed() }; batch],
            cmsgs: vec![[0u8; CMSG_RX_SPACE]; batch],
            iov: Vec::with_capacity(batch),
            msgs: Vec::with_capacity(batch),
            got: Vec::with_capacity(batch),
        };
        for b in r.bufs.iter_mut() {
            r.iov.push(libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            });
        }
        for i in 0..batch {
            // SAFETY: mmsghdr is plain old data.
            let mut m: libc::mmsghdr = unsafe { mem::zeroed() };
            m.msg_hdr.msg_iov = &mut r.iov[i];
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_name = (&mut r.names[i] as *mut libc::sockaddr_in6).cast();
            m.msg_hdr.msg_control = r.cmsgs[i].as_mut_ptr().cast();
            r.msgs.push(m);
        }
        r
    }

    /// Receives what is queued (up to the batch size). Ok(0) when nothing is.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        for m in self.msgs.iter_mut() {
            m.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            m.msg_hdr.msg_controllen = CMSG_RX_SPACE as _;
            m.msg_hdr.msg_flags = 0;
            m.msg_len = 0;
        }
        self.got.clear();
        let n = loop {
            // SAFETY: every mmsghdr points at this receiver's own buffers, names
            // and control space, which live as long as self and never move
            // (boxed slices and vectors that are never resized after new()).
            let r = unsafe {
                libc::recvmmsg(
                    fd,
                    self.msgs.as_mut_ptr(),
                    self.msgs.len() as u32,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if r >= 0 {
                break r as usize;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(0),
                _ => return Err(e),
            }
        };
        for (m, name) in self.msgs[..n].iter().zip(&self.names) {
            let h = &m.msg_hdr;
            let (from, port) = match addr_of(name) {
                Some(a) => (a.ip(), a.port()),
                None => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            };
            let mut stride = 0usize;
            // SAFETY: the kernel filled msg_control/msg_controllen; CMSG_* walk it
            // within those bounds.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(h);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                        stride = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>())
                            .max(0) as usize;
                    }
                    c = libc::CMSG_NXTHDR(h, c);
                }
            }
            self.got.push(Received {
                from,
                port,
                len: m.msg_len as usize,
                stride,
                truncated: h.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0,
            });
        }
        Ok(n)
    }
}

// SAFETY: the raw pointers inside point only into the Receiver's/Sender's own heap
// allocations (or are rebuilt before use), so moving them to another thread is
// sound.
unsafe impl Send for Receiver {}
// SAFETY: as above; Sender's mmsghdrs are rebuilt on every send.
unsafe impl Send for Sender {}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent_to(fd: RawFd, dgram: &[u8], to: SocketAddr, v6_socket: bool) -> io::Result<()> {
        // SAFETY: sockaddr_in6 is plain old data; name_of fills it.
        let mut sa: libc::sockaddr_in6 = unsafe { mem::zeroed() };
        let len = name_of(to, v6_socket, &mut sa);
        // SAFETY: dgram and sa are live for the call.
        cvt(unsafe {
            libc::sendto(
                fd,
                dgram.as_ptr().cast(),
                dgram.len(),
                0,
                (&sa as *const libc::sockaddr_in6).cast(),
                len,
            ) as libc::c_int
        })
        .map(drop)
    }

    fn recv_one(fd: RawFd) -> Received {
        let mut rx = Receiver::new(2, 256);
        for _ in 0..200 {
            if rx.recv(fd).unwrap() > 0 {
                return rx.got[0];
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        panic!("nothing received");
    }

    /// A dual-stack socket (bound IPv4-mapped to stay on 127.0.0.1) talks to a
    /// plain IPv4 one both ways, and names its IPv4 peer as IPv4, so the peer's
    /// endpoint compares equal to what a lease configured.
    #[test]
    fn dual_stack_socket_names_ipv4_peers_as_ipv4() {
        let v4 = bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), false).unwrap();
        let v4_addr = local_addr(v4.as_raw_fd()).unwrap();
        let lo_mapped = Ipv4Addr::LOCALHOST.to_ipv6_mapped();
        let v6 = bind6(SocketAddrV6::new(lo_mapped, 0, 0, 0), false).unwrap();
        let v6_port = std::net::UdpSocket::from(v6.try_clone().unwrap())
            .local_addr()
            .unwrap()
            .port();

        sent_to(
            v4.as_raw_fd(),
            b"to the dual-stack socket",
            SocketAddr::from((Ipv4Addr::LOCALHOST, v6_port)),
            false,
        )
        .unwrap();
        let got = recv_one(v6.as_raw_fd());
        assert_eq!(
            (got.from, got.port, got.len),
            (IpAddr::V4(Ipv4Addr::LOCALHOST), v4_addr.port(), 24)
        );

        sent_to(v6.as_raw_fd(), b"back", SocketAddr::V4(v4_addr), true).unwrap();
        let got = recv_one(v4.as_raw_fd());
        assert_eq!(
            (got.from, got.port, got.len),
            (IpAddr::V4(Ipv4Addr::LOCALHOST), v6_port, 4)
        );

        // An IPv6 destination on an AF_INET socket is the kernel's error, not ours.
        let e = sent_to(v4.as_raw_fd(), b"x", "[fd00::1]:9".parse().unwrap(), false);
        assert!(e.is_err());
    }

    #[test]
    fn name_of_writes_each_family_as_the_socket_needs() {
        // SAFETY: plain old data.
        let mut sa: libc::sockaddr_in6 = unsafe { mem::zeroed() };
        let a: SocketAddr = "10.1.2.3:51820".parse().unwrap();
        assert_eq!(
            name_of(a, false, &mut sa) as usize,
            mem::size_of::<libc::sockaddr_in>()
        );
        assert_eq!(addr_of(&sa), Some(a));
        assert_eq!(
            name_of(a, true, &mut sa) as usize,
            mem::size_of::<libc::sockaddr_in6>()
        );
        assert_eq!(libc::c_int::from(sa.sin6_family), libc::AF_INET6);
        assert_eq!(addr_of(&sa), Some(a), "IPv4-mapped reads back as IPv4");
        let b: SocketAddr = "[fd18:198:18::2]:51821".parse().unwrap();
        name_of(b, true, &mut sa);
        assert_eq!(addr_of(&sa), Some(b));
        sa.sin6_family = 0;
        assert_eq!(addr_of(&sa), None);
    }
}
