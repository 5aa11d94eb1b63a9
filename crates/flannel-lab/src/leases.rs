//! Lease values exactly as flanneld writes them, for peers a test or benchmark
//! makes up (no agent behind them: their routes only have to reach the kernel).

use std::net::Ipv4Addr;

use flannel_core::lease::{LeaseAttrs, MacAddr, VxlanData};
use flannel_core::{WgPublicKey, WireguardData};
use rand::Rng;

/// The lease value a `backend_type` agent on `public_ip` writes (vxlan: VNI 1 and a
/// random locally administered VTEP MAC; wireguard: a random public key on port
/// 51820).
pub fn peer_lease_value(backend_type: &str, public_ip: Ipv4Addr) -> String {
    let mut attrs = LeaseAttrs::new(public_ip);
    attrs.backend_type = backend_type.to_string();
    if backend_type == "vxlan" {
        attrs.backend_data = Some(
            VxlanData {
                vni: 1,
                vtep_mac: MacAddr::random_local(&mut rand::rng()),
            }
            .encode(),
        );
    }
    if backend_type == "wireguard" {
        attrs.backend_data = Some(
            WireguardData {
                public_key: WgPublicKey(rand::rng().random()),
                port: 51820,
            }
            .encode(),
        );
    }
    attrs.encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_decode_as_flannel_leases() {
        let v = peer_lease_value("vxlan", Ipv4Addr::new(198, 18, 0, 9));
        let a = LeaseAttrs::decode(&v).unwrap();
        assert_eq!(a.public_ip, Ipv4Addr::new(198, 18, 0, 9));
        assert_eq!(a.backend_type, "vxlan");
        let d = VxlanData::decode(a.backend_data.as_ref().unwrap()).unwrap();
        assert_eq!(d.vni, 1);
        let h =
            LeaseAttrs::decode(&peer_lease_value("host-gw", Ipv4Addr::new(198, 18, 0, 9))).unwrap();
        assert_eq!(h.backend_type, "host-gw");
        assert!(h.backend_data.is_none());
        let w = LeaseAttrs::decode(&peer_lease_value("wireguard", Ipv4Addr::new(198, 18, 0, 9)))
            .unwrap();
        let d = WireguardData::decode(w.backend_data.as_ref().unwrap()).unwrap();
        assert_eq!(d.port, 51820);
    }
}
