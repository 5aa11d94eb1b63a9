//! The TUN device: queues opened on /dev/net/tun, with or without a virtio-net
//! header, multi-queue, persistence and offloads. Raw ioctls (the `libc` constants
//! are per-architecture, so nothing here is amd64-specific).

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Flags a queue is opened with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFlags {
    pub vnet_hdr: bool,
    pub multi_queue: bool,
}

impl QueueFlags {
    fn bits(self) -> libc::c_short {
        let mut f = libc::IFF_TUN | libc::IFF_NO_PI;
        if self.vnet_hdr {
            f |= libc::IFF_VNET_HDR;
        }
        if self.multi_queue {
            f |= libc::IFF_MULTI_QUEUE;
        }
        f as libc::c_short
    }
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(r)
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Opens one queue of TUN device `name` (a name or a template such as
/// `flannel%d`), creating the device if it does not exist. Returns the queue and
/// the device's actual name.
pub fn open_queue(name: &str, flags: QueueFlags) -> io::Result<(OwnedFd, String)> {
    // SAFETY: a NUL-terminated path literal; the returned fd is checked.
    let fd = cvt(unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    })?;
    // SAFETY: fd was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut r = ifreq(name)?;
    r.ifr_ifru.ifru_flags = flags.bits();
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `r` is.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut r) })?;
    // SAFETY: the kernel NUL-terminates ifr_name.
    let actual = unsafe { CStr::from_ptr(r.ifr_name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    Ok((fd, actual))
}

/// The device name and flags of a queue (TUNGETIFF).
pub fn queue_info(fd: RawFd) -> io::Result<(String, QueueFlags)> {
    // SAFETY: zeroed ifreq is valid; TUNGETIFF fills it.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF writes a struct ifreq.
    cvt(unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut r) })?;
    // SAFETY: the kernel NUL-terminates ifr_name; the union holds flags here.
    let (name, bits) = unsafe {
        (
            CStr::from_ptr(r.ifr_name.as_ptr())
                .to_string_lossy()
                .into_owned(),
            libc::c_int::from(r.ifr_ifru.ifru_flags),
        )
    };
    if bits & libc::IFF_TUN == 0 || bits & libc::IFF_NO_PI == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{name} is not a TUN device without packet information"),
        ));
    }
    Ok((
        name,
        QueueFlags {
            vnet_hdr: bits & libc::IFF_VNET_HDR != 0,
            multi_queue: bits & libc::IFF_MULTI_QUEUE != 0,
        },
    ))
}

/// Whether the kernel's TUN driver supports these flags (TUNGETFEATURES).
pub fn supported_flags() -> io::Result<libc::c_int> {
    // SAFETY: as in open_queue.
    let fd = cvt(unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })?;
    // SAFETY: fd just opened, owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut features: libc::c_uint = 0;
    // SAFETY: TUNGETFEATURES writes an unsigned int.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETFEATURES, &mut features) })?;
    Ok(features as libc::c_int)
}

/// Sets the offloads the device advertises (TUNSETOFFLOAD, TUN_F_* bits).
pub fn set_offload(fd: RawFd, bits: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes the flags by value.
    cvt(unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, bits as libc::c_ulong) }).map(drop)
}

/// Asks for little-endian virtio-net header fields (TUNSETVNETLE). Returns whether
/// the fields are little-endian (on a little-endian host they always are).
pub fn set_vnet_le(fd: RawFd) -> bool {
    let one: libc::c_int = 1;
    // SAFETY: TUNSETVNETLE reads an int through the pointer.
    let ok = unsafe { libc::ioctl(fd, libc::TUNSETVNETLE, &one) } == 0;
    ok || cfg!(target_endian = "little")
}

/// Makes the device outlive its queues (TUNSETPERSIST).
pub fn set_persist(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: TUNSETPERSIST takes the flag by value.
    cvt(unsafe { libc::ioctl(fd, libc::TUNSETPERSIST, libc::c_ulong::from(on)) }).map(drop)
}

/// The offloads we ask for, best first: checksum + TSO (with ECN) + USO, then
/// without USO (kernels before 6.2), then checksum only. The kernel accepts USO
/// only for both families at once; IPv6 packets are dropped by the encapsulator
/// anyway (flannel's udp backend is IPv4 only).
pub const OFFLOAD_CHOICES: [(libc::c_uint, &str); 3] = [
    (
        libc::TUN_F_CSUM
            | libc::TUN_F_TSO4
            | libc::TUN_F_TSO_ECN
            | libc::TUN_F_USO4
            | libc::TUN_F_USO6,
        "csum+tso4+uso4",
    ),
    (
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO_ECN,
        "csum+tso4",
    ),
    (libc::TUN_F_CSUM, "csum"),
];

/// The wireguard device's choices: as [`OFFLOAD_CHOICES`] with TSO for IPv6 too,
/// since its splitter cuts super-packets of both families (TSO6 is as old as
/// TSO4, so no choice has one without the other).
pub const WG_OFFLOAD_CHOICES: [(libc::c_uint, &str); 3] = [
    (
        libc::TUN_F_CSUM
            | libc::TUN_F_TSO4
            | libc::TUN_F_TSO6
            | libc::TUN_F_TSO_ECN
            | libc::TUN_F_USO4
            | libc::TUN_F_USO6,
        "csum+tso4+tso6+uso4+uso6",
    ),
    (
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN,
        "csum+tso4+tso6",
    ),
    (libc::TUN_F_CSUM, "csum"),
];

/// Reads one packet; Ok(None) when nothing is queued.
#[inline]
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: buf is a valid writable region of buf.len() bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Ok(None),
            _ => return Err(e),
        }
    }
}

/// Writes one packet gathered from `iov`.
#[inline]
pub fn writev(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    loop {
        // SAFETY: every iovec points into a live buffer of the stated length.
        let n = unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as libc::c_int) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => {
                wait_fd(fd, libc::POLLOUT, -1, None)?;
                continue;
            }
            _ => return Err(e),
        }
    }
}

/// Waits until `fd` is ready for `events` or `stop` (an eventfd) is signalled or
/// the timeout (ms, -1 = none) passes. Returns false when stopped.
pub fn wait_fd(
    fd: RawFd,
    events: libc::c_short,
    timeout_ms: libc::c_int,
    stop: Option<RawFd>,
) -> io::Result<bool> {
    let mut p = [
        libc::pollfd {
            fd,
            events,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.unwrap_or(-1),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: p is a valid array of 2 pollfds (a negative fd is ignored).
        let r = unsafe { libc::poll(p.as_mut_ptr(), 2, timeout_ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        return Ok(p[1].revents == 0);
    }
}
