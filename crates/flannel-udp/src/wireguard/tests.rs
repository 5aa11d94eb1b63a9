//! Two devices' sessions talking in memory: the handshake, data both ways, and every
//! drop reason a peer on the network can cause.

use super::*;

const A_ADDR: &str = "198.18.0.1:51820";
const B_ADDR: &str = "198.18.0.2:51820";

fn secret(seed: u8) -> StaticSecret {
    StaticSecret::from([seed; 32])
}

fn key_of(s: &StaticSecret) -> WgPublicKey {
    WgPublicKey(PublicKey::from(s).to_bytes())
}

fn spec(key: WgPublicKey, endpoint: &str, allowed: &str) -> PeerSpec {
    PeerSpec {
        public_key: key,
        endpoint: endpoint.parse().unwrap(),
        allowed_ips: vec![allowed.parse().unwrap()],
        psk: Some([9; 32]),
        keepalive: 0,
    }
}

/// A minimal IPv4 packet (20-byte header + payload) from `src` to `dst`.
fn ipv4(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    let len = (20 + payload.len()) as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p.extend_from_slice(payload);
    p
}

struct Pair {
    a: Sessions,
    b: Sessions,
}

/// A (10.244.1.0/24 behind it) and B (10.244.2.0/24), with a session established by
/// A's first packet; returns the pair and what B delivered.
fn established() -> (Pair, Vec<u8>) {
    let (sa, sb) = (secret(1), secret(2));
    let (ka, kb) = (key_of(&sa), key_of(&sb));
    let mut a = Sessions::new(sa);
    let mut b = Sessions::new(sb);
    a.set_peer(spec(kb, B_ADDR, "10.244.2.0/24"));
    b.set_peer(spec(ka, A_ADDR, "10.244.1.0/24"));
    let (from_a, from_b) = (A_ADDR.parse().unwrap(), B_ADDR.parse().unwrap());
    let mut buf = vec![0u8; 2048];
    let mut reply = vec![0u8; 2048];
    let inner = ipv4([10, 244, 1, 5], [10, 244, 2, 7], b"hello");
    // No session yet: the handshake initiation goes out, the packet is queued.
    let Action::Send { len, to } = a.encapsulate(&inner, &mut buf) else {
        panic!("no handshake initiation");
    };
    assert_eq!(to, from_b);
    let Action::Send { len: rlen, to } = b.decapsulate(from_a, &buf[..len], &mut reply) else {
        panic!("no handshake response");
    };
    assert_eq!(to, from_a);
    // A completes the handshake and sends what it queued.
    let mut sent = Vec::new();
    let act = a.decapsulate(from_b, &reply[..rlen], &mut buf);
    if let Action::Send { len, to } = act {
        sent.push((buf[..len].to_vec(), to));
    }
    a.flush(from_b, &mut buf, |d, to| sent.push((d.to_vec(), to)));
    let mut delivered = None;
    for (d, to) in &sent {
        assert_eq!(*to, from_b);
        if let Action::Deliver { len } = b.decapsulate(from_a, d, &mut reply) {
            delivered = Some(reply[..len].to_vec());
        }
    }
    (
        Pair { a, b },
        delivered.expect("B delivered the queued packet"),
    )
}

#[test]
fn handshake_then_data_both_ways() {
    let (mut p, first) = established();
    assert_eq!(first, ipv4([10, 244, 1, 5], [10, 244, 2, 7], b"hello"));
    let (from_a, from_b) = (A_ADDR.parse().unwrap(), B_ADDR.parse().unwrap());
    let mut buf = vec![0u8; 2048];
    let mut out = vec![0u8; 2048];
    let back = ipv4([10, 244, 2, 7], [10, 244, 1, 5], b"world");
    let Action::Send { len, to } = p.b.encapsulate(&back, &mut buf) else {
        panic!("B could not send");
    };
    assert_eq!(to, from_a);
    assert_eq!(
        p.a.decapsulate(from_b, &buf[..len], &mut out),
        Action::Deliver { len: back.len() }
    );
    assert_eq!(&out[..back.len()], &back[..]);
    let s = p.a.peer_stats(&p.b.public_key()).unwrap();
    assert!(
        s.since_handshake.is_some() && s.rx_bytes > 0 && s.tx_bytes > 0,
        "{s:?}"
    );
}

#[test]
fn every_bad_datagram_is_dropped_with_its_reason() {
    let (mut p, _) = established();
    let from_a: SocketAddr = A_ADDR.parse().unwrap();
    let mut buf = vec![0u8; 2048];
    let mut out = vec![0u8; 2048];

    // Cryptokey routing: A may only send from 10.244.1.0/24.
    let spoofed = ipv4([10, 244, 9, 9], [10, 244, 2, 7], b"x");
    let Action::Send { len, .. } = p.a.encapsulate(&spoofed, &mut buf) else {
        panic!()
    };
    let datagram = buf[..len].to_vec();
    assert_eq!(
        p.b.decapsulate(from_a, &datagram, &mut out),
        Action::Dropped(DropReason::SourceNotAllowed)
    );
    // The same datagram again is a replay.
    assert_eq!(
        p.b.decapsulate(from_a, &datagram, &mut out),
        Action::Dropped(DropReason::Replay)
    );
    // A flipped bit fails authentication.
    let good = ipv4([10, 244, 1, 5], [10, 244, 2, 7], b"y");
    let Action::Send { len, .. } = p.a.encapsulate(&good, &mut buf) else {
        panic!()
    };
    let mut tampered = buf[..len].to_vec();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert_eq!(
        p.b.decapsulate(from_a, &tampered, &mut out),
        Action::Dropped(DropReason::AuthFailed)
    );
    // Garbage is malformed; nothing panics on any prefix of a real datagram.
    assert_eq!(
        p.b.decapsulate(from_a, b"not wireguard at all", &mut out),
        Action::Dropped(DropReason::Malformed)
    );
    for n in 1..datagram.len() {
        assert!(matches!(
            p.b.decapsulate(from_a, &datagram[..n], &mut out),
            Action::Dropped(_)
        ));
    }
    // No peer for the destination.
    let nowhere = ipv4([10, 244, 1, 5], [10, 9, 9, 9], b"z");
    assert_eq!(
        p.a.encapsulate(&nowhere, &mut buf),
        Action::Dropped(DropReason::NoPeer)
    );
    // A stranger's handshake names a key B does not know.
    let sc = secret(3);
    let mut c = Sessions::new(sc);
    c.set_peer(spec(p.b.public_key(), B_ADDR, "10.244.2.0/24"));
    let Action::Send { len, .. } = c.encapsulate(&good, &mut buf) else {
        panic!()
    };
    assert_eq!(
        p.b.decapsulate("198.18.0.3:51820".parse().unwrap(), &buf[..len], &mut out),
        Action::Dropped(DropReason::UnknownKey)
    );
    // The session still works afterwards, and a removed peer's data is unknown.
    let Action::Send { len, .. } = p.a.encapsulate(&good, &mut buf) else {
        panic!()
    };
    assert_eq!(
        p.b.decapsulate(from_a, &buf[..len], &mut out),
        Action::Deliver { len: good.len() }
    );
    let Action::Send { len, .. } = p.a.encapsulate(&good, &mut buf) else {
        panic!()
    };
    assert!(p.b.remove_peer(&p.a.public_key()));
    assert_eq!(
        p.b.decapsulate(from_a, &buf[..len], &mut out),
        Action::Dropped(DropReason::UnknownKey)
    );
}

#[test]
fn roaming_and_updates_keep_the_session() {
    let (mut p, _) = established();
    let mut buf = vec![0u8; 2048];
    let mut out = vec![0u8; 2048];
    let moved: SocketAddr = "198.18.0.11:40000".parse().unwrap();
    let good = ipv4([10, 244, 1, 5], [10, 244, 2, 7], b"y");
    let Action::Send { len, .. } = p.a.encapsulate(&good, &mut buf) else {
        panic!()
    };
    assert!(matches!(
        p.b.decapsulate(moved, &buf[..len], &mut out),
        Action::Deliver { .. }
    ));
    // B now answers A at its new address.
    let back = ipv4([10, 244, 2, 7], [10, 244, 1, 5], b"w");
    assert_eq!(
        p.b.encapsulate(&back, &mut buf),
        Action::Send {
            len: back.len() + 32,
            to: moved
        }
    );
    // Changing allowed IPs keeps the session (no new handshake: data goes out at once).
    let ka = p.a.public_key();
    let mut s = spec(ka, A_ADDR, "10.244.1.0/24");
    s.allowed_ips.push("10.245.0.0/16".parse().unwrap());
    p.b.set_peer(s);
    let to_new = ipv4([10, 244, 2, 7], [10, 245, 0, 1], b"v");
    assert!(
        matches!(p.b.encapsulate(&to_new, &mut buf), Action::Send { len, .. } if len == to_new.len() + 32)
    );
    assert_eq!(p.b.peer_count(), 1);
}

/// `wg show` (wireguard-tools, an independent client of the UAPI) reads our socket.
#[tokio::test]
async fn wg_show_lists_peers_endpoints_and_transfer() {
    if !flannel_testkit::require("wg_show_lists_peers_endpoints_and_transfer", &["wg"]) {
        return;
    }
    let (p, _) = established();
    let a_pub = p.a.public_key().to_string();
    let b = std::sync::Arc::new(std::sync::Mutex::new(p.b));
    // A unique device name: the socket lives in the shared /var/run/wireguard.
    let dev = format!("flt{}", std::process::id() % 1_000_000);
    let path = uapi::socket_path(&dev);
    let server = uapi::serve(&dev, 51820, b.clone()).unwrap();
    let out = tokio::process::Command::new("wg")
        .args(["show", &dev, "dump"])
        .output()
        .await
        .unwrap();
    // set is refused: the peers are the cluster's.
    let set = tokio::process::Command::new("wg")
        .args(["set", &dev, "listen-port", "1"])
        .output()
        .await
        .unwrap();
    server.abort();
    let _ = std::fs::remove_file(&path);
    assert!(!set.status.success(), "wg set was accepted");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "wg show: {}{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split('\t').collect()).collect();
    // Interface line: private key, public key, listen port, fwmark.
    assert_eq!(lines[0][1], key_of(&secret(2)).to_string());
    assert_eq!(lines[0][2], "51820");
    // Peer line: public key, psk, endpoint, allowed ips, handshake, rx, tx, keepalive.
    assert_eq!(lines.len(), 2, "{text}");
    let peer = &lines[1];
    assert_eq!(peer[0], a_pub);
    assert_ne!(peer[1], "(none)", "the PSK is configured");
    assert_eq!(peer[2], A_ADDR);
    assert_eq!(peer[3], "10.244.1.0/24");
    assert_ne!(peer[4], "0", "a handshake happened");
    assert!(peer[5].parse::<u64>().unwrap() > 0, "rx bytes: {text}");
}

/// Three devices, each with two peers: every pair completes a handshake and
/// carries data, whichever slot its peer landed in.
#[test]
fn three_devices_each_with_two_peers() {
    let secrets = [secret(11), secret(12), secret(13)];
    let addrs: Vec<SocketAddr> = (1..=3)
        .map(|i| format!("198.18.0.{i}:51820").parse().unwrap())
        .collect();
    let nets = ["10.244.1.0/24", "10.244.2.0/24", "10.244.3.0/24"];
    let mut devs: Vec<Sessions> = secrets.iter().map(|s| Sessions::new(s.clone())).collect();
    for (i, d) in devs.iter_mut().enumerate() {
        for j in 0..3 {
            if i != j {
                d.set_peer(spec(key_of(&secrets[j]), &addrs[j].to_string(), nets[j]));
            }
        }
    }
    let mut buf = vec![0u8; 2048];
    for i in 0..3 {
        for j in 0..3 {
            if i == j {
                continue;
            }
            let inner = ipv4([10, 244, i as u8 + 1, 5], [10, 244, j as u8 + 1, 5], b"hi");
            // Deliver everything in flight until the packet arrives or nothing moves.
            let mut queue: Vec<(usize, SocketAddr, Vec<u8>)> = Vec::new();
            if let Action::Send { len, to } = devs[i].encapsulate(&inner, &mut buf) {
                queue.push((i, to, buf[..len].to_vec()));
            }
            let mut delivered = false;
            let mut rounds = 0;
            while let Some((src, to, d)) = queue.pop() {
                rounds += 1;
                assert!(rounds < 50, "{i}->{j}: no end");
                let dst = addrs.iter().position(|a| *a == to).unwrap();
                match devs[dst].decapsulate(addrs[src], &d, &mut buf) {
                    Action::Send { len, to } => {
                        queue.push((dst, to, buf[..len].to_vec()));
                        let from = addrs[src];
                        let dev = &mut devs[dst];
                        let mut more = Vec::new();
                        dev.flush(from, &mut buf, |d, to| more.push((dst, to, d.to_vec())));
                        queue.extend(more);
                    }
                    Action::Deliver { len } => {
                        assert_eq!(&buf[..len], &inner[..]);
                        delivered = true;
                    }
                    Action::Nothing => {
                        let from = addrs[src];
                        let mut more = Vec::new();
                        devs[dst].flush(from, &mut buf, |d, to| more.push((dst, to, d.to_vec())));
                        queue.extend(more);
                    }
                    Action::Dropped(r) => panic!("{i}->{j}: dropped at {dst}: {r:?}"),
                }
                if delivered {
                    break;
                }
            }
            assert!(delivered, "{i}->{j} never arrived");
        }
    }
}
