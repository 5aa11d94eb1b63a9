//! WireGuard sessions for the userspace data path: the cryptokey routing table and one
//! boringtun `Tunn` (handshake, timers, rekey, replay window, cookies) per peer. No
//! I/O: the caller reads the TUN and the UDP socket, and sends what this returns.
//!
//! * Outgoing: an inner packet goes to the peer whose allowed IPs hold its
//!   destination (longest prefix); none → dropped, counted.
//! * Incoming: every datagram first passes the device's rate limiter (mac1, and a
//!   cookie under load) before any Curve25519 work; a handshake names its sender's
//!   key, which must be a configured peer; data names the session index, which
//!   points at the peer. A decrypted inner packet whose source is outside the sending
//!   peer's allowed IPs is dropped (WireGuard's cryptokey routing). An authenticated
//!   datagram updates the peer's endpoint (roaming), as WireGuard does.
//!
//! Why boringtun and not gotatun: see docs/compatibility.md, "wireguard".

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{errors::WireGuardError, Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use flannel_core::WgPublicKey;
use ipnet::IpNet;

/// Handshakes per second above which the device answers with cookies first
/// (boringtun's own device uses the same figure).
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// New peers greeted with a handshake per tick: well under the peers' own
/// `HANDSHAKE_RATE_LIMIT` even when a node joins a large cluster.
const GREETINGS_PER_TICK: usize = 16;

/// One peer as the backend configures it.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub public_key: WgPublicKey,
    pub endpoint: SocketAddr,
    pub allowed_ips: Vec<IpNet>,
    pub psk: Option<[u8; 32]>,
    /// Seconds; 0 = off.
    pub keepalive: u16,
}

impl std::fmt::Debug for PeerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSpec")
            .field("public_key", &self.public_key)
            .field("endpoint", &self.endpoint)
            .field("allowed_ips", &self.allowed_ips)
            .field("psk", &self.psk.map(|_| ".."))
            .field("keepalive", &self.keepalive)
            .finish()
    }
}

/// Why a packet was dropped (the `reason` label of `flanneld_backend_drops_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// An inner packet for an address no peer's allowed IPs hold.
    NoPeer,
    /// A handshake from a key that is not a peer, or data for no session.
    UnknownKey,
    /// A datagram that failed authentication (mac or AEAD tag).
    AuthFailed,
    /// A data packet whose counter was seen before or is too old.
    Replay,
    /// Not a WireGuard message, or a broken one.
    Malformed,
    /// A decrypted packet whose source lies outside the sender's allowed IPs.
    SourceNotAllowed,
    /// Handshakes refused while under load without a valid cookie.
    UnderLoad,
    /// Anything else boringtun refused (expired session, wrong timestamp...).
    Other,
}

impl DropReason {
    pub fn label(self) -> &'static str {
        match self {
            DropReason::NoPeer => "no_peer",
            DropReason::UnknownKey => "unknown_key",
            DropReason::AuthFailed => "auth_failed",
            DropReason::Replay => "replay",
            DropReason::Malformed => "malformed",
            DropReason::SourceNotAllowed => "source_not_allowed",
            DropReason::UnderLoad => "under_load",
            DropReason::Other => "other",
        }
    }

    fn of(e: &WireGuardError) -> DropReason {
        use WireGuardError as E;
        match e {
            E::InvalidMac | E::InvalidAeadTag => DropReason::AuthFailed,
            E::InvalidCounter | E::DuplicateCounter => DropReason::Replay,
            E::WrongIndex | E::WrongKey | E::NoCurrentSession => DropReason::UnknownKey,
            E::IncorrectPacketLength
            | E::UnexpectedPacket
            | E::WrongPacketType
            | E::InvalidPacket
            | E::DestinationBufferTooSmall => DropReason::Malformed,
            E::UnderLoad => DropReason::UnderLoad,
            _ => DropReason::Other,
        }
    }
}

/// What to do with the result of one call.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send `out[..len]` to `to` over UDP.
    Send {
        len: usize,
        to: SocketAddr,
    },
    /// Write `out[..len]` (a decrypted inner packet) to the TUN.
    Deliver {
        len: usize,
    },
    /// Nothing to do (a keepalive, a queued packet, a handled cookie).
    Nothing,
    Dropped(DropReason),
}

struct PeerState {
    spec: PeerSpec,
    tunn: Tunn,
    /// Not greeted yet: a new peer gets a handshake initiation from us at the next
    /// tick, whether or not we have data for it. After an agent restart the peer
    /// still holds a session with our previous incarnation (whose keys died with
    /// it) and would keep sending on it until its own timers give up (15 s or
    /// more); our handshake replaces that session at once.
    greet: bool,
}

/// The device's peers and their sessions.
pub struct Sessions {
    private: StaticSecret,
    public: PublicKey,
    limiter: Arc<RateLimiter>,
    /// Slot i holds the peer whose session indices are `i << 8 | n`.
    peers: Vec<Option<PeerState>>,
    by_key: HashMap<WgPublicKey, usize>,
    /// (allowed prefix, slot), longest prefix first.
    routes: Vec<(IpNet, usize)>,
}

impl Sessions {
    pub fn new(private: StaticSecret) -> Self {
        let public = PublicKey::from(&private);
        Sessions {
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            private,
            public,
            peers: Vec::new(),
            by_key: HashMap::new(),
            routes: Vec::new(),
        }
    }

    pub fn public_key(&self) -> WgPublicKey {
        WgPublicKey(self.public.to_bytes())
    }

    pub fn peer_count(&self) -> usize {
        self.by_key.len()
    }

    /// Adds the peer or updates it in place (its session survives an endpoint or
    /// allowed-IPs change; a new PSK or keepalive starts a new session).
    pub fn set_peer(&mut self, spec: PeerSpec) {
        let slot = match self.by_key.get(&spec.public_key) {
            Some(&slot) => slot,
            None => {
                let slot = self
                    .peers
                    .iter()
                    .position(Option::is_none)
                    .unwrap_or_else(|| {
                        self.peers.push(None);
                        self.peers.len() - 1
                    });
                self.by_key.insert(spec.public_key, slot);
                slot
            }
        };
        let keep_session = self.peers[slot]
            .as_ref()
            .is_some_and(|p| p.spec.psk == spec.psk && p.spec.keepalive == spec.keepalive);
        match (&mut self.peers[slot], keep_session) {
            (Some(p), true) => p.spec = spec,
            (state, _) => {
                let tunn = Tunn::new(
                    self.private.clone(),
                    PublicKey::from(spec.public_key.0),
                    spec.psk,
                    (spec.keepalive > 0).then_some(spec.keepalive),
                    // boringtun puts the index in the upper 24 bits of its session ids.
                    slot as u32,
                    Some(self.limiter.clone()),
                );
                *state = Some(PeerState {
                    spec,
                    tunn,
                    greet: true,
                });
            }
        }
        self.rebuild_routes();
    }

    /// Removes the peer with this key (its sessions end); false if there was none.
    pub fn remove_peer(&mut self, key: &WgPublicKey) -> bool {
        let Some(slot) = self.by_key.remove(key) else {
            return false;
        };
        self.peers[slot] = None;
        self.rebuild_routes();
        true
    }

    fn rebuild_routes(&mut self) {
        self.routes = self
            .peers
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (i, p)))
            .flat_map(|(i, p)| p.spec.allowed_ips.iter().map(move |n| (n.trunc(), i)))
            .collect();
        self.routes
            .sort_by_key(|r| std::cmp::Reverse(r.0.prefix_len()));
    }

    fn route(&self, dst: IpAddr) -> Option<usize> {
        self.routes
            .iter()
            .find(|(net, _)| net.contains(&dst))
            .map(|&(_, slot)| slot)
    }

    /// Encrypts one inner IP packet into `out` (at least `inner.len() + 32` bytes,
    /// and 148 for a handshake). Before a session exists this returns the handshake
    /// initiation and boringtun queues the packet: send it, and call
    /// [`Sessions::flush`] once the handshake completes.
    pub fn encapsulate(&mut self, inner: &[u8], out: &mut [u8]) -> Action {
        let Some(dst) = Tunn::dst_address(inner) else {
            return Action::Dropped(DropReason::Malformed);
        };
        let Some(slot) = self.route(dst) else {
            return Action::Dropped(DropReason::NoPeer);
        };
        let Some(p) = self.peers[slot].as_mut() else {
            return Action::Dropped(DropReason::NoPeer);
        };
        let to = p.spec.endpoint;
        match p.tunn.encapsulate(inner, out) {
            TunnResult::WriteToNetwork(b) => Action::Send { len: b.len(), to },
            TunnResult::Done => Action::Nothing,
            TunnResult::Err(e) => Action::Dropped(DropReason::of(&e)),
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                Action::Dropped(DropReason::Other)
            }
        }
    }

    /// Handles one datagram from `from`. After an [`Action::Send`] or
    /// [`Action::Nothing`], call [`Sessions::flush`]: a completed handshake
    /// releases the packets boringtun queued meanwhile.
    pub fn decapsulate(&mut self, from: SocketAddr, datagram: &[u8], out: &mut [u8]) -> Action {
        // An empty datagram is boringtun's "hand out what you queued" call, which
        // only `flush` may make: from the network it is just malformed.
        if datagram.is_empty() {
            return Action::Dropped(DropReason::Malformed);
        }
        self.decapsulate_or_dequeue(from, datagram, out)
    }

    fn decapsulate_or_dequeue(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Action {
        let slot = if datagram.is_empty() {
            match self
                .peers
                .iter()
                .position(|p| p.as_ref().is_some_and(|p| p.spec.endpoint == from))
            {
                Some(s) => s,
                None => return Action::Nothing,
            }
        } else {
            match self.peer_for(from, datagram, out) {
                Ok(slot) => slot,
                Err(a) => return a,
            }
        };
        let Some(p) = self.peers[slot].as_mut() else {
            return Action::Dropped(DropReason::UnknownKey);
        };
        match p.tunn.decapsulate(Some(from.ip()), datagram, out) {
            TunnResult::WriteToNetwork(b) => {
                let len = b.len();
                if !datagram.is_empty() {
                    p.spec.endpoint = from;
                }
                Action::Send {
                    len,
                    to: p.spec.endpoint,
                }
            }
            TunnResult::WriteToTunnelV4(b, src) => {
                let len = b.len();
                Self::admit(p, from, IpAddr::V4(src), len)
            }
            TunnResult::WriteToTunnelV6(b, src) => {
                let len = b.len();
                Self::admit(p, from, IpAddr::V6(src), len)
            }
            TunnResult::Done => {
                // A keepalive or a cookie: authenticated all the same.
                if !datagram.is_empty() {
                    p.spec.endpoint = from;
                }
                Action::Nothing
            }
            TunnResult::Err(e) => Action::Dropped(DropReason::of(&e)),
        }
    }

    fn admit(p: &mut PeerState, from: SocketAddr, src: IpAddr, len: usize) -> Action {
        if !p.spec.allowed_ips.iter().any(|n| n.contains(&src)) {
            return Action::Dropped(DropReason::SourceNotAllowed);
        }
        p.spec.endpoint = from;
        Action::Deliver { len }
    }

    /// Which peer a datagram is for, after the rate limiter's checks; `Err` is the
    /// action to take instead (a cookie to send, or a drop).
    fn peer_for(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Result<usize, Action> {
        let packet = match self.limiter.verify_packet(Some(from.ip()), datagram, out) {
            Ok(p) => p,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                return Err(Action::Send {
                    len: cookie.len(),
                    to: from,
                })
            }
            Err(TunnResult::Err(e)) => return Err(Action::Dropped(DropReason::of(&e))),
            Err(_) => return Err(Action::Dropped(DropReason::Other)),
        };
        let slot = match packet {
            Packet::HandshakeInit(ref init) => {
                let half = parse_handshake_anon(&self.private, &self.public, init)
                    .map_err(|e| Action::Dropped(DropReason::of(&e)))?;
                *self
                    .by_key
                    .get(&WgPublicKey(half.peer_static_public))
                    .ok_or(Action::Dropped(DropReason::UnknownKey))?
            }
            Packet::HandshakeResponse(ref r) => (r.receiver_idx >> 8) as usize,
            Packet::PacketCookieReply(ref r) => (r.receiver_idx >> 8) as usize,
            Packet::PacketData(ref d) => (d.receiver_idx >> 8) as usize,
        };
        match self.peers.get(slot) {
            Some(Some(_)) => Ok(slot),
            _ => Err(Action::Dropped(DropReason::UnknownKey)),
        }
    }

    /// Packets the peers' timers want sent now (handshake retries, rekeys,
    /// keepalives); call about every 250 ms. `send` gets each datagram.
    pub fn tick(&mut self, out: &mut [u8], mut send: impl FnMut(&[u8], SocketAddr)) {
        // The limiter counts handshakes per second only if someone starts each
        // second; without this it would soon demand cookies forever.
        self.limiter.reset_count();
        for p in self.peers.iter_mut().flatten() {
            if let TunnResult::WriteToNetwork(b) = p.tunn.update_timers(out) {
                send(b, p.spec.endpoint);
            }
        }
        self.greet(out, send);
    }

    /// Sends the handshake initiations new peers are owed (at most
    /// `GREETINGS_PER_TICK`; [`Sessions::tick`] sends the rest later). Called by
    /// `tick`, and by the owner right after it added peers, so that a restarted
    /// node does not wait for the next tick to replace its peers' dead sessions.
    pub fn greet(&mut self, out: &mut [u8], mut send: impl FnMut(&[u8], SocketAddr)) {
        for p in self
            .peers
            .iter_mut()
            .flatten()
            .filter(|p| p.greet)
            .take(GREETINGS_PER_TICK)
        {
            p.greet = false;
            // Done (nothing to send) when a handshake is already under way.
            if let TunnResult::WriteToNetwork(b) = p.tunn.format_handshake_initiation(out, false) {
                send(b, p.spec.endpoint);
            }
        }
    }

    /// Sends what the peer at `to` queued during its handshake (see
    /// [`Sessions::decapsulate`]).
    pub fn flush(
        &mut self,
        to: SocketAddr,
        out: &mut [u8],
        mut send: impl FnMut(&[u8], SocketAddr),
    ) {
        while let Action::Send { len, to: dst } = self.decapsulate_or_dequeue(to, &[], out) {
            send(&out[..len], dst);
        }
    }

    /// A peer's latest handshake age and transfer counters (for `wg show`).
    pub fn peer_stats(&self, key: &WgPublicKey) -> Option<PeerStats> {
        let p = self.peers[*self.by_key.get(key)?].as_ref()?;
        let (since_handshake, tx_bytes, rx_bytes, ..) = p.tunn.stats();
        Some(PeerStats {
            since_handshake,
            tx_bytes: tx_bytes as u64,
            rx_bytes: rx_bytes as u64,
            endpoint: p.spec.endpoint,
        })
    }
}

impl Sessions {
    /// Every peer with its counters, in slot order (for the UAPI `get`).
    pub fn peers(&self) -> Vec<(PeerSpec, PeerStats)> {
        self.peers
            .iter()
            .flatten()
            .filter_map(|p| Some((p.spec.clone(), self.peer_stats(&p.spec.public_key)?)))
            .collect()
    }

    /// The device's private key, for the UAPI `get` only (as wireguard-go serves it
    /// to root on the control socket).
    pub fn private_key_bytes(&self) -> [u8; 32] {
        self.private.to_bytes()
    }
}

/// What `wg show` reports per peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStats {
    pub since_handshake: Option<std::time::Duration>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub endpoint: SocketAddr,
}

pub mod device;
mod segment;
pub mod uapi;

#[cfg(test)]
mod tests;
