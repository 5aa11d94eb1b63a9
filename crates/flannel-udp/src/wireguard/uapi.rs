//! The cross-platform WireGuard userspace API (what wireguard-go serves) on
//! `/var/run/wireguard/<device>.sock`, so `wg show <device>` lists our peers,
//! endpoints, allowed IPs, latest handshakes and transfer counters.
//!
//! Only `get=1` is served: the peers are the cluster's leases, owned by the agent,
//! so `set=1` is refused (`errno=1`) instead of being silently undone by the next
//! lease event. The socket is mode 0600 (root), like the device itself.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use super::{PeerSpec, PeerStats, Sessions};

/// Where wireguard-tools looks for a userspace device's socket.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

pub fn socket_path(device: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{device}.sock"))
}

fn hex(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The answer to `get=1` (ending with `errno=0` and the blank line).
pub fn format_get(
    private_key: &[u8; 32],
    listen_port: u16,
    peers: &[(PeerSpec, PeerStats)],
    now: SystemTime,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "private_key={}", hex(private_key));
    let _ = writeln!(s, "listen_port={listen_port}");
    for (spec, stats) in peers {
        let _ = writeln!(s, "public_key={}", hex(&spec.public_key.0));
        if let Some(psk) = &spec.psk {
            let _ = writeln!(s, "preshared_key={}", hex(psk));
        }
        let _ = writeln!(s, "protocol_version=1");
        let _ = writeln!(s, "endpoint={}", stats.endpoint);
        let _ = writeln!(s, "persistent_keepalive_interval={}", spec.keepalive);
        let last = stats
            .since_handshake
            .and_then(|ago| now.checked_sub(ago))
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or(Duration::ZERO);
        let _ = writeln!(s, "last_handshake_time_sec={}", last.as_secs());
        let _ = writeln!(s, "last_handshake_time_nsec={}", last.subsec_nanos());
        let _ = writeln!(s, "rx_bytes={}", stats.rx_bytes);
        let _ = writeln!(s, "tx_bytes={}", stats.tx_bytes);
        for ip in &spec.allowed_ips {
            let _ = writeln!(s, "allowed_ip={ip}");
        }
    }
    s.push_str("errno=0\n\n");
    s
}

/// Serves the socket for `device` until the returned task is aborted (it removes
/// a stale socket of an earlier run first).
pub fn serve(
    device: &str,
    listen_port: u16,
    sessions: Arc<Mutex<Sessions>>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    serve_at(&socket_path(device), listen_port, sessions)
}

/// [`serve`] at an explicit path.
pub fn serve_at(
    path: &Path,
    listen_port: u16,
    sessions: Arc<Mutex<Sessions>>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let sessions = sessions.clone();
            tokio::spawn(async move {
                let (rd, mut wr) = conn.into_split();
                let mut lines = BufReader::new(rd).lines();
                let Ok(Some(op)) = lines.next_line().await else {
                    return;
                };
                // The request ends with a blank line; its other lines matter only to set.
                while let Ok(Some(l)) = lines.next_line().await {
                    if l.is_empty() {
                        break;
                    }
                }
                let answer = match op.as_str() {
                    "get=1" => {
                        let (key, peers) = match sessions.lock() {
                            Ok(s) => (s.private_key_bytes(), s.peers()),
                            Err(_) => return,
                        };
                        format_get(&key, listen_port, &peers, SystemTime::now())
                    }
                    _ => "errno=1\n\n".to_string(),
                };
                let _ = wr.write_all(answer.as_bytes()).await;
            });
        }
    }))
}
