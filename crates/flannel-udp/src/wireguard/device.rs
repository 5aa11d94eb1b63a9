//! The first, simple WireGuard data path: one TUN queue and one UDP socket, a thread
//! each way and one for the timers, a packet per system call. It is correct and
//! interoperable, not fast: the batched path (TSO in, GSO/GRO, mmsg, multi-queue)
//! that the udp backend has is the next step (docs/compatibility.md, "wireguard").

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{Action, DropReason, Sessions};
use crate::tun::{self, QueueFlags};
use crate::UdpError;

/// Room for a full-size datagram plus WireGuard's header and tag.
const BUF: usize = 65_536 + 64;
/// How often boringtun's timers run (its own device ticks every 250 ms).
const TICK: Duration = Duration::from_millis(250);

/// Packets carried and dropped, by reason.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    drops: Mutex<HashMap<&'static str, u64>>,
}

impl DeviceCounters {
    fn drop(&self, r: DropReason) {
        if let Ok(mut d) = self.drops.lock() {
            *d.entry(r.label()).or_default() += 1;
        }
    }

    /// Drops so far, by reason label.
    pub fn drops(&self) -> Vec<(&'static str, u64)> {
        let mut v: Vec<_> = self
            .drops
            .lock()
            .map(|d| d.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// A running device: stops (threads joined) when dropped; the TUN device goes with
/// its last queue.
pub struct Device {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    counters: Arc<DeviceCounters>,
}

impl Device {
    /// Creates TUN `name` (or opens it) and starts carrying packets between it and
    /// a UDP socket bound to `listen`.
    pub fn start(
        name: &str,
        listen: SocketAddr,
        sessions: Arc<Mutex<Sessions>>,
    ) -> Result<Device, UdpError> {
        let (tun, _) = tun::open_queue(
            name,
            QueueFlags {
                vnet_hdr: false,
                multi_queue: false,
            },
        )
        .map_err(|e| UdpError::io(format!("open TUN {name}"), e))?;
        let sock =
            UdpSocket::bind(listen).map_err(|e| UdpError::io(format!("bind UDP {listen}"), e))?;
        sock.set_read_timeout(Some(TICK))
            .map_err(|e| UdpError::io("UDP read timeout", e))?;
        let tun = Arc::new(tun);
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(DeviceCounters::default());
        let sock = Arc::new(sock);
        let mut threads = Vec::new();
        {
            let (tun, sock, sessions, stop, c) = (
                tun.clone(),
                sock.clone(),
                sessions.clone(),
                stop.clone(),
                counters.clone(),
            );
            threads.push(spawn("wg-tx", move || {
                outbound(&tun, &sock, &sessions, &stop, &c)
            }));
        }
        {
            let (tun, sock, sessions, stop, c) = (
                tun.clone(),
                sock.clone(),
                sessions.clone(),
                stop.clone(),
                counters.clone(),
            );
            threads.push(spawn("wg-rx", move || {
                inbound(&tun, &sock, &sessions, &stop, &c)
            }));
        }
        {
            let (sock, stop) = (sock.clone(), stop.clone());
            threads.push(spawn("wg-timers", move || {
                let mut out = vec![0u8; BUF];
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    if let Ok(mut s) = sessions.lock() {
                        s.tick(&mut out, |d, to| {
                            let _ = sock.send_to(d, to);
                        });
                    }
                }
            }));
        }
        Ok(Device {
            stop,
            threads,
            counters,
        })
    }

    pub fn counters(&self) -> Arc<DeviceCounters> {
        self.counters.clone()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .expect("spawning a data path thread")
}

/// TUN → encrypt → UDP.
fn outbound(
    tun: &OwnedFd,
    sock: &UdpSocket,
    sessions: &Mutex<Sessions>,
    stop: &AtomicBool,
    c: &DeviceCounters,
) {
    let mut inner = vec![0u8; BUF];
    let mut out = vec![0u8; BUF];
    while !stop.load(Ordering::Relaxed) {
        match tun::wait_fd(tun.as_raw_fd(), libc::POLLIN, TICK.as_millis() as i32, None) {
            Ok(_) => {}
            Err(_) => continue,
        }
        while let Ok(Some(n)) = tun::read(tun.as_raw_fd(), &mut inner) {
            let Ok(mut s) = sessions.lock() else { return };
            match s.encapsulate(&inner[..n], &mut out) {
                Action::Send { len, to } => {
                    if sock.send_to(&out[..len], to).is_ok() {
                        c.tx_packets.fetch_add(1, Ordering::Relaxed);
                        c.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
                Action::Dropped(r) => c.drop(r),
                Action::Deliver { .. } | Action::Nothing => {}
            }
        }
    }
}

/// UDP → decrypt → TUN (and handshake answers back to UDP).
fn inbound(
    tun: &OwnedFd,
    sock: &UdpSocket,
    sessions: &Mutex<Sessions>,
    stop: &AtomicBool,
    c: &DeviceCounters,
) {
    let mut datagram = vec![0u8; BUF];
    let mut out = vec![0u8; BUF];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = sock.recv_from(&mut datagram) else {
            continue;
        };
        let Ok(mut s) = sessions.lock() else { return };
        match s.decapsulate(from, &datagram[..n], &mut out) {
            Action::Deliver { len } => {
                let iov = [libc::iovec {
                    iov_base: out.as_mut_ptr().cast(),
                    iov_len: len,
                }];
                if tun::writev(tun.as_raw_fd(), &iov).is_ok() {
                    c.rx_packets.fetch_add(1, Ordering::Relaxed);
                    c.rx_bytes.fetch_add(len as u64, Ordering::Relaxed);
                }
            }
            Action::Send { len, to } => {
                let _ = sock.send_to(&out[..len], to);
                // A completed handshake releases what was queued meanwhile.
                s.flush(from, &mut out, |d, to| {
                    let _ = sock.send_to(d, to);
                });
            }
            Action::Dropped(r) => c.drop(r),
            Action::Nothing => s.flush(from, &mut out, |d, to| {
                let _ = sock.send_to(d, to);
            }),
        }
    }
}
