//! The fd keeper: a small process that holds the open TUN queues and UDP sockets so
//! that they outlive the agent (even a `kill -9`). While no agent runs, packets
//! wait in the TUN queues and socket buffers instead of being dropped; the next
//! agent asks the keeper for the fds (SCM_RIGHTS over an abstract unix socket named
//! after the device, so it is per network namespace) and carries on.
//!
//! The keeper is the agent's own executable re-executed with an environment marker
//! (a fresh image: a few MB, not a copy of the agent's heap), so the binary must
//! call [`run_if_requested`] first thing in `main`. It exits when the device is
//! deleted, when asked to (`Q`), or on SIGTERM. Only root or the keeper's own user
//! may fetch the fds.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

const ENV: &str = "FLANNEL_UDP_KEEPER";
const MAX_FDS: usize = 128;
/// The first fd number the keeper finds its fds at.
const FIRST_FD: RawFd = 3;

static HOOK: AtomicBool = AtomicBool::new(false);

/// Call first thing in `main` of a binary that runs the udp data path with a
/// keeper. In a keeper process this never returns; otherwise it only records that
/// the hook is in place.
pub fn run_if_requested() {
    HOOK.store(true, Ordering::SeqCst);
    if let Ok(spec) = std::env::var(ENV) {
        std::process::exit(run(&spec));
    }
}

/// Whether this binary calls [`run_if_requested`] (so a keeper can be spawned).
pub fn hook_installed() -> bool {
    HOOK.load(Ordering::SeqCst)
}

/// The fds a keeper handed over.
pub struct Inherited {
    pub tun: Vec<OwnedFd>,
    pub socks: Vec<OwnedFd>,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn address(dev: &str) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: sockaddr_un is plain old data.
    let mut a: libc::sockaddr_un = unsafe { mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    // Abstract namespace: leading NUL, scoped to the network namespace.
    let name = format!("flannel-udp-keeper/{dev}");
    let n = name.len().min(a.sun_path.len() - 1);
    for (d, s) in a.sun_path[1..].iter_mut().zip(&name.as_bytes()[..n]) {
        *d = *s as libc::c_char;
    }
    let len = mem::size_of::<libc::sa_family_t>() + 1 + n;
    (a, len as libc::socklen_t)
}

fn unix_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2); result checked and owned.
    let fd =
        cvt(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn connect(dev: &str) -> io::Result<Option<OwnedFd>> {
    let s = unix_socket()?;
    let (a, len) = address(dev);
    // SAFETY: a/len describe a valid sockaddr_un.
    let r = unsafe { libc::connect(s.as_raw_fd(), (&a as *const libc::sockaddr_un).cast(), len) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ECONNREFUSED) | Some(libc::ENOENT) => Ok(None),
            _ => Err(e),
        };
    }
    let tv = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: passes a live timeval and its size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    Ok(Some(s))
}

/// The credentials of the process at the other end of a connected unix socket.
fn peer_cred(s: RawFd) -> io::Result<libc::ucred> {
    // SAFETY: ucred is plain old data; getsockopt fills it.
    let mut cred: libc::ucred = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred/len describe a writable ucred.
    cvt(unsafe {
        libc::getsockopt(
            s,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok(cred)
}

/// Whether the other end is root or runs as `me`. Both sides check: the keeper
/// hands fds only to its own kind, and the agent takes fds (and so a TUN device's
/// traffic) only from a keeper no other user could have started in its place on
/// the abstract socket name.
fn trusted_peer(s: RawFd, me: libc::uid_t) -> bool {
    peer_cred(s).is_ok_and(|c| c.uid == 0 || c.uid == me)
}

fn send_byte(s: RawFd, b: u8) -> io::Result<()> {
    // SAFETY: sends one byte from a live local.
    let r = unsafe { libc::send(s, (&b as *const u8).cast(), 1, libc::MSG_NOSIGNAL) };
    if r == 1 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether a keeper for `dev` answers in this network namespace.
pub fn fetch_probe(dev: &str) -> bool {
    matches!(connect(dev), Ok(Some(_)))
}

/// Asks the keeper of `dev` to exit. Ok(false) when there is none.
pub fn stop(dev: &str) -> io::Result<bool> {
    let Some(s) = connect(dev)? else {
        return Ok(false);
    };
    send_byte(s.as_raw_fd(), b'Q')?;
    // Wait for it to close the connection (it exits right after).
    let mut b = [0u8; 1];
    // SAFETY: reads into a live 1-byte buffer.
    unsafe { libc::recv(s.as_raw_fd(), b.as_mut_ptr().cast(), 1, 0) };
    Ok(true)
}

/// Fetches the fds the keeper of `dev` holds. Ok(None) when there is no keeper.
pub fn fetch(dev: &str) -> io::Result<Option<Inherited>> {
    let Some(s) = connect(dev)? else {
        return Ok(None);
    };
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !trusted_peer(s.as_raw_fd(), me) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("the process answering as the keeper of {dev} runs as another user"),
        ));
    }
    send_byte(s.as_raw_fd(), b'F')?;
    let mut data = [0u8; 2];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: CMSG_SPACE is a size computation.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * mem::size_of::<RawFd>()) as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: zeroed msghdr, then pointers to live buffers.
    let mut m: libc::msghdr = unsafe { mem::zeroed() };
    m.msg_iov = &mut iov;
    m.msg_iovlen = 1;
    m.msg_control = control.as_mut_ptr().cast();
    m.msg_controllen = space as _;
    // SAFETY: m points at live buffers of the stated sizes.
    let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut m, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let got = &data[..(n as usize).min(data.len())];
    // The kernel sets msg_controllen to the length of what it wrote.
    let control = &control[..(m.msg_controllen as usize).min(space)];
    let (raw, verdict) = wire::decode_reply(got, control, m.msg_flags & libc::MSG_CTRUNC != 0);
    // Owned before the verdict is looked at, so a rejected answer's fds get closed.
    let mut fds: Vec<OwnedFd> = raw
        .into_iter()
        // SAFETY: each fd came in an SCM_RIGHTS message: new in this process, ours.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    let ntun = verdict.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let socks = fds.split_off(ntun);
    Ok(Some(Inherited { tun: fds, socks }))
}

/// Starts a keeper for `dev` holding `tuns` and `socks` (in the calling thread's
/// network namespace). Returns its pid.
pub fn spawn(dev: &str, tuns: &[RawFd], socks: &[RawFd]) -> io::Result<u32> {
    if !hook_installed() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this binary does not call flannel_udp::keeper::run_if_requested()",
        ));
    }
    if tuns.is_empty()
        || tuns.len() + socks.len() > MAX_FDS
        || tuns.len() > 255
        || socks.len() > 255
    {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad fd count"));
    }
    let listener = unix_socket()?;
    let (a, len) = address(dev);
    // SAFETY: a/len describe a valid sockaddr_un.
    cvt(unsafe {
        libc::bind(
            listener.as_raw_fd(),
            (&a as *const libc::sockaddr_un).cast(),
            len,
        )
    })?;
    // SAFETY: listen(2) on our socket.
    cvt(unsafe { libc::listen(listener.as_raw_fd(), 8) })?;
    // Move everything above the range the child will use, so the dup2s in the
    // child cannot clobber a source.
    let all: Vec<RawFd> = std::iter::once(listener.as_raw_fd())
        .chain(tuns.iter().copied())
        .chain(socks.iter().copied())
        .collect();
    let mut high: Vec<OwnedFd> = Vec::with_capacity(all.len());
    for fd in &all {
        // SAFETY: F_DUPFD_CLOEXEC duplicates a valid fd; the result is owned.
        let d = cvt(unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 1024) })?;
        // SAFETY: fresh fd.
        high.push(unsafe { OwnedFd::from_raw_fd(d) });
    }
    let srcs: Vec<RawFd> = high.iter().map(|f| f.as_raw_fd()).collect();
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0("flannel-udp-keeper")
        .env(ENV, wire::format_spec(tuns.len(), socks.len(), dev))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: the closure only calls async-signal-safe functions (dup2, setsid) on
    // fds that are open in the child, as pre_exec requires.
    unsafe {
        cmd.pre_exec(move || {
            for (i, s) in srcs.iter().enumerate() {
                if libc::dup2(*s, FIRST_FD + i as RawFd) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(high);
    drop(listener);
    Ok(child.id())
}

/// The keeper's main loop. Returns the exit status.
fn run(spec: &str) -> i32 {
    let Some((nt, ns)) = wire::parse_spec(spec) else {
        return 2;
    };
    let listener = FIRST_FD;
    let fds: Vec<RawFd> = (0..(nt + ns) as RawFd).map(|i| FIRST_FD + 1 + i).collect();
    for fd in std::iter::once(listener).chain(fds.iter().copied()) {
        // SAFETY: sets FD_CLOEXEC on an fd we inherited.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // SAFETY: plain getters.
    let me = unsafe { libc::geteuid() };
    let tun0 = fds[0];
    loop {
        let mut p = [
            libc::pollfd {
                fd: listener,
                events: libc::POLLIN,
                revents: 0,
            },
            // No events requested: poll still reports POLLERR/POLLHUP, which the
            // TUN raises when its device is deleted.
            libc::pollfd {
                fd: tun0,
                events: 0,
                revents: 0,
            },
        ];
        // SAFETY: valid array of two pollfds.
        let r = unsafe { libc::poll(p.as_mut_ptr(), 2, 10_000) };
        if r < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return 1;
        }
        if p[1].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
            || crate::tun::queue_info(tun0).is_err()
        {
            return 0;
        }
        if p[0].revents & libc::POLLIN == 0 {
            continue;
        }
        // SAFETY: accept4 on our listener; result checked and owned.
        let c = unsafe {
            libc::accept4(
                listener,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if c < 0 {
            continue;
        }
        // SAFETY: fresh fd.
        let conn = unsafe { OwnedFd::from_raw_fd(c) };
        if serve(conn.as_raw_fd(), me, &fds, nt, ns) {
            return 0;
        }
    }
}

/// Serves one request; true when asked to quit.
fn serve(c: RawFd, me: libc::uid_t, fds: &[RawFd], nt: usize, ns: usize) -> bool {
    if !trusted_peer(c, me) {
        return false;
    }
    let tv = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: passes a live timeval and its size.
    unsafe {
        libc::setsockopt(
            c,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    let mut b = [0u8; 1];
    // SAFETY: reads into a live 1-byte buffer.
    if unsafe { libc::recv(c, b.as_mut_ptr().cast(), 1, 0) } != 1 {
        return false;
    }
    match b[0] {
        b'Q' => true,
        b'F' => {
            let mut data = [nt as u8, ns as u8];
            let mut iov = libc::iovec {
                iov_base: data.as_mut_ptr().cast(),
                iov_len: 2,
            };
            let mut control = wire::reply_control(fds);
            // SAFETY: zeroed msghdr pointing at live buffers of the stated sizes.
            unsafe {
                let mut m: libc::msghdr = mem::zeroed();
                m.msg_iov = &mut iov;
                m.msg_iovlen = 1;
                m.msg_control = control.as_mut_ptr().cast();
                m.msg_controllen = control.len() as _;
                libc::sendmsg(c, &m, libc::MSG_NOSIGNAL);
            }
            false
        }
        _ => false,
    }
}

/// The keeper's messages as bytes, apart from the sockets that carry them, so the
/// fuzz target (`fuzz/fuzz_targets/keeper.rs`) can feed them anything.
mod wire {
    use std::mem;
    use std::os::fd::RawFd;

    use super::MAX_FDS;

    /// The spec a keeper gets in its environment: `<tun fds>:<socket fds>:<device>`.
    pub fn format_spec(tuns: usize, socks: usize, dev: &str) -> String {
        format!("{tuns}:{socks}:{dev}")
    }

    /// The fd counts of a spec; None unless there is at least one TUN queue and at
    /// most [`MAX_FDS`] fds in all. The device part is only for `ps` readers.
    pub fn parse_spec(spec: &str) -> Option<(usize, usize)> {
        let mut it = spec.splitn(3, ':');
        let nt = it.next()?.parse::<usize>().ok()?;
        let ns = it.next()?.parse::<usize>().ok()?;
        // checked_add: counts near usize::MAX must not wrap past the limit.
        (nt > 0 && nt.checked_add(ns)? <= MAX_FDS).then_some((nt, ns))
    }

    fn cmsg_header_len() -> usize {
        // SAFETY: CMSG_LEN is a size computation.
        unsafe { libc::CMSG_LEN(0) as usize }
    }

    fn cmsg_space(payload: usize) -> Option<usize> {
        let p = u32::try_from(payload).ok()?;
        // SAFETY: CMSG_SPACE is a size computation.
        Some(unsafe { libc::CMSG_SPACE(p) } as usize)
    }

    /// The ancillary data of the keeper's answer to `F`: one SCM_RIGHTS message
    /// carrying `fds`.
    pub fn reply_control(fds: &[RawFd]) -> Vec<u8> {
        let payload = mem::size_of_val(fds);
        let at = cmsg_header_len();
        let mut control = vec![0u8; cmsg_space(payload).expect("at most MAX_FDS fds")];
        // SAFETY: cmsghdr is plain old data.
        let mut h: libc::cmsghdr = unsafe { mem::zeroed() };
        h.cmsg_level = libc::SOL_SOCKET;
        h.cmsg_type = libc::SCM_RIGHTS;
        h.cmsg_len = (at + payload) as _;
        // SAFETY: `control` holds at least a header; unaligned write into bytes.
        unsafe { std::ptr::write_unaligned(control.as_mut_ptr().cast::<libc::cmsghdr>(), h) };
        for (d, fd) in control[at..].chunks_exact_mut(4).zip(fds) {
            d.copy_from_slice(&fd.to_ne_bytes());
        }
        control
    }

    /// Decodes the keeper's answer to `F`: `data` the bytes received (TUN and socket
    /// fd counts), `control` the ancillary data the kernel wrote, `ctrunc` whether
    /// it truncated it. Returns every fd of the SCM_RIGHTS messages, so the caller
    /// owns (and closes) them even when the answer is rejected, and the number of
    /// TUN fds among them or why the answer is malformed.
    pub fn decode_reply(
        data: &[u8],
        control: &[u8],
        ctrunc: bool,
    ) -> (Vec<RawFd>, Result<usize, String>) {
        let hdr = mem::size_of::<libc::cmsghdr>();
        let at = cmsg_header_len();
        let mut fds = Vec::new();
        let mut bad_control = false;
        let mut off = 0;
        // Like CMSG_NXTHDR, a tail shorter than a header ends the walk; unlike the
        // macros (which trust the kernel), every length is checked against the buffer.
        while control.len() - off >= hdr {
            // SAFETY: a whole header lies at `off`; unaligned read of plain data.
            let h: libc::cmsghdr =
                unsafe { std::ptr::read_unaligned(control[off..].as_ptr().cast()) };
            let len = h.cmsg_len as usize;
            let next = len
                .checked_sub(at)
                .and_then(cmsg_space)
                .map(|space| off.saturating_add(space));
            if len < at || len > control.len() - off || next.is_none() {
                bad_control = true;
                break;
            }
            if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_RIGHTS {
                for b in control[off + at..off + len].chunks_exact(4) {
                    fds.push(RawFd::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                }
            }
            match next {
                Some(n) if n <= control.len() => off = n,
                _ => break,
            }
        }
        let verdict = if data.len() != 2 || ctrunc || bad_control {
            Err("keeper answered with a malformed message".to_string())
        } else {
            let (ntun, nsock) = (usize::from(data[0]), usize::from(data[1]));
            if fds.len() == ntun + nsock {
                Ok(ntun)
            } else {
                Err(format!(
                    "keeper announced {} fds, sent {}",
                    ntun + nsock,
                    fds.len()
                ))
            }
        };
        (fds, verdict)
    }
}

/// The keeper's message codecs, for the fuzz targets in `fuzz/` only.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    pub use super::wire::{decode_reply, format_spec, parse_spec, reply_control};
    pub const MAX_FDS: usize = super::MAX_FDS;
}

#[cfg(test)]
mod tests {
    use super::wire::*;
    use super::MAX_FDS;

    #[test]
    fn spec_round_trip_and_limits() {
        assert_eq!(parse_spec(&format_spec(2, 2, "flannel0")), Some((2, 2)));
        // The device name may itself contain the separator.
        assert_eq!(parse_spec("1:0:a:b"), Some((1, 0)));
        assert_eq!(parse_spec("0:1:flannel0"), None);
        assert_eq!(parse_spec(&format_spec(MAX_FDS, 1, "x")), None);
        assert_eq!(parse_spec("1"), None);
        assert_eq!(parse_spec("x:1:flannel0"), None);
    }

    /// Before the codec was factored out for fuzzing, a count near usize::MAX
    /// wrapped the sum past the fd limit and the keeper indexed an empty fd list.
    #[test]
    fn spec_counts_do_not_wrap() {
        assert_eq!(parse_spec(&format!("{}:1:flannel0", usize::MAX)), None);
        assert_eq!(parse_spec(&format!("1:{}:flannel0", usize::MAX)), None);
    }

    #[test]
    fn reply_round_trip() {
        let fds = [7, 8, 9];
        let (got, verdict) = decode_reply(&[2, 1], &reply_control(&fds), false);
        assert_eq!(got, fds);
        assert_eq!(verdict, Ok(2));
    }

    #[test]
    fn malformed_replies_are_errors() {
        let control = reply_control(&[7, 8]);
        // Fewer fds than announced, a short or truncated message.
        assert!(decode_reply(&[2, 1], &control, false).1.is_err());
        assert!(decode_reply(&[2], &control, false).1.is_err());
        assert!(decode_reply(&[1, 1], &control, true).1.is_err());
        // A header claiming more bytes than the buffer holds.
        let mut long = control.clone();
        long[0] = 200;
        let (fds, verdict) = decode_reply(&[1, 1], &long, false);
        assert!(fds.is_empty() && verdict.is_err());
        // A header shorter than itself.
        let mut short = control;
        short[..8].copy_from_slice(&1usize.to_ne_bytes());
        assert!(decode_reply(&[0, 0], &short, false).1.is_err());
    }
}
