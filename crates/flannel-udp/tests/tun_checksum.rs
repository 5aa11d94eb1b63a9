//! Kernel test: what the TUN does with the checksum state of the decrypted
//! packets the wireguard device writes (`rx::Decap` with `trust_checksums`).
//! A TUN in a lab namespace, a UDP socket on its address, and datagrams written
//! to the TUN the way the device writes them. Root only (skipped otherwise,
//! failed with FLANNEL_E2E=1).
//!
//! Each datagram under test is followed by a marker datagram with a good
//! checksum: reading up to the marker says whether the first was delivered, with
//! no timing involved.

#[allow(unused_imports)]
mod common;

use std::fs::File;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use common::*;
use flannel_udp::rx::{Decap, RxPlan};
use flannel_udp::tun::{self, QueueFlags};
use flannel_udp::vnet::{self, VnetHdr, VNET_HDR_LEN};
use flannel_udp::{csum, packet};

const DEV: &str = "fcsum0";
const PORT: u16 = 9999;

/// A UDP datagram from `src` to `dst` (both of one family) carrying `body`,
/// with a correct checksum.
fn datagram(src: SocketAddr, dst: SocketAddr, body: &[u8]) -> Vec<u8> {
    let ulen = 8 + body.len();
    let mut udp = Vec::new();
    udp.extend_from_slice(&src.port().to_be_bytes());
    udp.extend_from_slice(&dst.port().to_be_bytes());
    udp.extend_from_slice(&(ulen as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(body);
    let (mut p, addrs) = match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            let mut h = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
            h.extend_from_slice(&s.ip().octets());
            h.extend_from_slice(&d.ip().octets());
            packet::put16(&mut h, 2, (20 + ulen) as u16);
            let c = csum::ipv4_header(&h);
            packet::put16(&mut h, 10, c);
            (h, 12..20)
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            let mut h = vec![0x60, 0, 0, 0, 0, 0, 17, 64];
            packet::put16(&mut h, 4, ulen as u16);
            h.extend_from_slice(&s.ip().octets());
            h.extend_from_slice(&d.ip().octets());
            (h, 8..40)
        }
        _ => unreachable!("one family"),
    };
    let l4 = p.len();
    let sum = csum::add(csum::add(0, &p[addrs]) + 17 + ulen as u64, &udp);
    let c = csum::finish(sum);
    packet::put16(&mut udp, 6, if c == 0 { 0xffff } else { c });
    p.extend_from_slice(&udp);
    assert_eq!(p.len(), l4 + ulen);
    p
}

/// Writes `pkt` as one decrypted packet through `Decap::packets` (trusted or not),
/// the way the wireguard device does.
fn write_planned(tun: &OwnedFd, pkt: &[u8], trust: bool) -> VnetHdr {
    let mut d = Decap::new(true, true);
    d.trust_checksums = trust;
    let mut plan = RxPlan::with_capacity();
    d.packets(pkt, &[(0, pkt.len() as u32)], &mut plan);
    assert_eq!(plan.writes.len(), 1);
    let mut iov = Vec::new();
    plan.iovecs(&plan.writes[0], pkt, true, &mut iov);
    tun::writev(tun.as_raw_fd(), &iov).expect("TUN write");
    VnetHdr::decode(&plan.writes[0].vnet, true).expect("vnet header")
}

/// Writes `pkt` after a hand-made vnet header.
fn write_with(tun: &OwnedFd, pkt: &[u8], hdr: VnetHdr) {
    let mut v = [0u8; VNET_HDR_LEN];
    hdr.encode(&mut v, true);
    let iov = [
        libc::iovec {
            iov_base: v.as_ptr() as *mut _,
            iov_len: v.len(),
        },
        libc::iovec {
            iov_base: pkt.as_ptr() as *mut _,
            iov_len: pkt.len(),
        },
    ];
    tun::writev(tun.as_raw_fd(), &iov).expect("TUN write");
}

/// Whether the datagram whose payload is `body` arrives before the marker.
fn delivered(tun: &OwnedFd, sock: &UdpSocket, marker: &[u8], body: &[u8]) -> bool {
    write_planned(tun, marker, false);
    let mut buf = [0u8; 2048];
    let mut seen = false;
    loop {
        let n = sock
            .recv(&mut buf)
            .expect("the marker datagram must arrive");
        if &buf[..n] == b"marker" {
            return seen;
        }
        seen |= &buf[..n] == body;
    }
}

#[test]
fn decrypted_datagrams_with_a_partial_checksum_are_delivered_unverified() {
    if !prerequisites(&["ip"]) {
        return;
    }
    let lab = Lab::new();
    let ns = File::open(format!("/run/netns/{}", lab.a)).expect("lab namespace");
    let ns_name = lab.a.clone();
    // setns moves this thread only: the TUN and sockets are made inside the lab
    // namespace, the test's own thread stays where it was.
    let observed = std::thread::spawn(move || {
        // SAFETY: setns on a namespace fd we hold, for this thread.
        let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        let flags = QueueFlags {
            vnet_hdr: true,
            multi_queue: false,
        };
        let (fd, _) = tun::open_queue(DEV, flags).expect("open TUN");
        assert!(tun::set_vnet_le(fd.as_raw_fd()));
        tun::set_offload(fd.as_raw_fd(), libc::TUN_F_CSUM).expect("TUNSETOFFLOAD");
        // The TUN is non-blocking; writes do not wait on it.
        run(&[
            "ip",
            "-n",
            &ns_name,
            "addr",
            "add",
            "10.99.0.1/24",
            "dev",
            DEV,
        ]);
        run(&[
            "ip",
            "-n",
            &ns_name,
            "addr",
            "add",
            "fd00:99::1/64",
            "dev",
            DEV,
            "nodad",
        ]);
        run(&["ip", "-n", &ns_name, "link", "set", DEV, "up"]);
        let mut observed = Vec::new();
        for (local, peer) in [
            ("10.99.0.1:9999", "10.99.0.2:4000"),
            ("[fd00:99::1]:9999", "[fd00:99::2]:4000"),
        ] {
            let local: SocketAddr = local.parse().unwrap();
            let peer: SocketAddr = peer.parse().unwrap();
            assert_eq!(local.port(), PORT);
            let sock = UdpSocket::bind(local).expect("bind in the lab namespace");
            // Only a bound on a broken kernel: the marker always comes.
            sock.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let marker = datagram(peer, local, b"marker");

            // A good datagram, planned as the device plans a decrypted one: written
            // with a partial checksum, delivered intact.
            let good = datagram(peer, local, b"good");
            let h = write_planned(&fd, &good, true);
            assert_eq!(h.flags, vnet::F_NEEDS_CSUM, "{local}");
            assert!(delivered(&fd, &sock, &marker, b"good"), "{local}: good");

            // The same datagram damaged after its checksum was made.
            let mut bad = datagram(peer, local, b"bad!");
            let n = bad.len();
            bad[n - 1] ^= 0x5a;
            let bad_body = bad[n - 4..].to_vec();
            // Written plain, the kernel verifies it and drops it: the check the
            // partial checksum skips is real.
            let h = write_planned(&fd, &bad, false);
            assert_eq!(h, VnetHdr::default());
            assert!(
                !delivered(&fd, &sock, &marker, &bad_body),
                "{local}: a plain write with a bad checksum must be dropped"
            );
            // Written as the device writes it, the kernel does not verify it (the
            // AEAD did): this is the receiver's checksum pass saved.
            write_planned(&fd, &bad, true);
            assert!(
                delivered(&fd, &sock, &marker, &bad_body),
                "{local}: a partial-checksum write is taken as verified"
            );
            // F_DATA_VALID, which would say the same without touching the header:
            // observed, not relied upon.
            write_with(
                &fd,
                &bad,
                VnetHdr {
                    flags: vnet::F_DATA_VALID,
                    ..VnetHdr::default()
                },
            );
            let honoured = delivered(&fd, &sock, &marker, &bad_body);
            observed.push(format!("{local}: F_DATA_VALID honoured={honoured}"));
        }
        observed
    })
    .join()
    .expect("test thread");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    eprintln!("kernel {}: {}", kernel.trim(), observed.join("; "));
}
