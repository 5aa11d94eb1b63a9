//! The worker threads: per TUN queue one encapsulating (TUN → UDP) and one
//! decapsulating (UDP → TUN) thread, each on non-blocking fds, batching until the
//! kernel has nothing more and sleeping in poll() only then.

use std::net::Ipv4Addr;
use std::os::fd::RawFd;
use std::sync::Arc;

use tracing::{debug, warn};

use crate::counters::{CounterValues, Counters};
use crate::peers::{PeerView, SharedPeers};
use crate::rx::{Decap, RxPlan};
use crate::sock::{Receiver, Sender};
use crate::tun;
use crate::tx::{Encap, TxBatch};
use crate::vnet::VNET_HDR_LEN;

/// TUN reads gathered before one sendmmsg (small packets)...
const TX_READS: usize = 32;
/// ...or this many bytes (a GSO super-packet): sending while the data is still in
/// cache beats bigger batches.
const TX_FLUSH_BYTES: usize = 48 * 1024;
/// Datagrams (or GRO batches of up to 64 KiB) per recvmmsg.
const RX_BATCH: usize = 8;
/// A TUN read: a 64 KiB GSO packet plus its vnet header, with slack.
const READ_BUF: usize = 65536 + VNET_HDR_LEN + 256;

/// What one worker pair needs.
pub struct WorkerConfig {
    pub tun: RawFd,
    pub sock: RawFd,
    pub stop: RawFd,
    pub vnet: bool,
    pub vnet_le: bool,
    pub udp_gso: bool,
    pub udp_gro: bool,
    pub tun_addr: Ipv4Addr,
    pub peers: Arc<SharedPeers>,
    pub counters: Arc<Counters>,
}

/// TUN → UDP. Returns when `stop` is signalled or the TUN fails.
pub fn encap_loop(c: &WorkerConfig) {
    let read_size = if c.vnet { READ_BUF } else { 65536 };
    let mut bufs: Vec<Box<[u8]>> = (0..TX_READS)
        .map(|_| vec![0u8; read_size].into_boxed_slice())
        .collect();
    let mut batch = TxBatch::with_capacity(TX_READS);
    let mut sender = Sender::new(c.udp_gso);
    let mut view = PeerView::new(c.peers.clone());
    let mut zero_vnet = [0u8; VNET_HDR_LEN];
    loop {
        batch.clear();
        let mut tally = CounterValues::default();
        let mut reads = 0;
        let mut failed = false;
        {
            let table = view.get();
            let enc = Encap {
                peers: table,
                tun_addr: c.tun_addr,
                vnet: c.vnet,
                vnet_le: c.vnet_le,
            };
            let mut bytes = 0;
            while reads < TX_READS && bytes < TX_FLUSH_BYTES {
                match tun::read(c.tun, &mut bufs[reads]) {
                    Ok(Some(n)) => {
                        enc.packet(reads as u32, &mut bufs[reads][..n], &mut batch, &mut tally);
                        reads += 1;
                        bytes += n;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        // EBADFD: the device was deleted under us.
                        warn!(error = %e, "TUN read failed; encapsulation worker stops");
                        failed = true;
                        break;
                    }
                }
            }
        }
        sender.send(c.sock, &batch, &bufs, &mut tally);
        for (reply, n) in &batch.icmp {
            let mut iov = [
                libc::iovec {
                    iov_base: zero_vnet.as_mut_ptr().cast(),
                    iov_len: VNET_HDR_LEN,
                },
                libc::iovec {
                    iov_base: reply.as_ptr() as *mut _,
                    iov_len: *n,
                },
            ];
            let iov: &mut [libc::iovec] = if c.vnet { &mut iov } else { &mut iov[1..] };
            if tun::writev(c.tun, iov).is_ok() {
                tally.tx_icmp_unreachable += 1;
            }
        }
        if !tally.is_zero() {
            c.counters.add(&tally);
        }
        if failed {
            return;
        }
        if reads == 0 {
            match tun::wait_fd(c.tun, libc::POLLIN, -1, Some(c.stop)) {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    warn!(error = %e, "poll failed; encapsulation worker stops");
                    return;
                }
            }
        }
    }
}

/// UDP → TUN. Returns when `stop` is signalled or the TUN fails.
pub fn decap_loop(c: &WorkerConfig) {
    let buf_size = 65536 + 64;
    let mut rx = Receiver::new(RX_BATCH, buf_size);
    let mut plan = RxPlan::with_capacity();
    let mut decap = Decap::new(c.vnet, c.vnet_le);
    let mut view = PeerView::new(c.peers.clone());
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(80);
    let mut warned = false;
    loop {
        let n = match rx.recv(c.sock) {
            Ok(n) => n,
            Err(e) => {
                if !warned {
                    warn!(error = %e, "UDP receive failed (further failures logged at debug)");
                    warned = true;
                } else {
                    debug!(error = %e, "UDP receive failed");
                }
                // Do not spin on a persistent error.
                std::thread::sleep(std::time::Duration::from_millis(10));
                0
            }
        };
        if n == 0 {
            match tun::wait_fd(c.sock, libc::POLLIN, -1, Some(c.stop)) {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    warn!(error = %e, "poll failed; decapsulation worker stops");
                    return;
                }
            }
        }
        let mut tally = CounterValues::default();
        let table = view.get();
        for i in 0..n {
            let r = rx.got[i];
            if r.truncated {
                tally.rx_drop_malformed += 1;
                continue;
            }
            // The socket is AF_INET: an IPv6 sender cannot occur.
            let std::net::IpAddr::V4(from) = r.from else {
                tally.rx_drop_malformed += 1;
                continue;
            };
            let buf = &mut rx.bufs[i][..r.len];
            plan.clear();
            decap.datagram(table, u32::from(from), buf, r.stride, &mut plan, &mut tally);
            for w in &plan.writes {
                plan.iovecs(w, &buf[..], c.vnet, &mut iov);
                match tun::writev(c.tun, &iov) {
                    Ok(_) => {
                        tally.rx_packets += u64::from(w.packets);
                        tally.rx_bytes += u64::from(w.bytes);
                    }
                    Err(e) => {
                        debug!(error = %e, "TUN write failed");
                        tally.rx_drop_tun_error += u64::from(w.packets);
                        if e.raw_os_error() == Some(libc::EBADFD) {
                            c.counters.add(&tally);
                            warn!("TUN device is gone; decapsulation worker stops");
                            return;
                        }
                    }
                }
            }
        }
        if !tally.is_zero() {
            c.counters.add(&tally);
        }
    }
}
