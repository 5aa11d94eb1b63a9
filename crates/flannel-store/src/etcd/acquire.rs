//! Listing the leases and acquiring this host's one (docs/compatibility.md, "Lease
//! acquisition and renewal", with its deliberate differences:
//! reservations stay permanent, reuse-by-IP also compares the IPv6 address when IPv6
//! is enabled, and a lost creation race is retried with another subnet).

use std::time::Duration;

use etcd_client::KeyValue;
use flannel_core::{Lease, LeaseAttrs, LeaseKey, NetworkConfig, Window4, Window6};
use ipnet::{Ipv4Net, Ipv6Net};
use rand::Rng;

use super::keys::KeyLayout;
use super::ops::{Ops, REQUEST_TIMEOUT};
use crate::{AcquireRequest, StoreError};

/// How often a host that keeps losing creation races picks again before giving up.
pub const MAX_CREATE_ATTEMPTS: usize = 10;

/// A lease as listed from etcd.
#[derive(Debug, Clone)]
pub(crate) struct Listed {
    /// The etcd key exactly as stored (used to delete it).
    pub etcd_key: String,
    /// The etcd lease the key is attached to; 0 for a reservation.
    pub etcd_lease: i64,
    pub lease: Lease,
}

#[derive(Debug)]
pub(crate) struct Listing {
    pub leases: Vec<Listed>,
    /// Subnets whose key is a lease key but whose value is unusable: nobody may be
    /// handed them (creating them would fail anyway, the key exists).
    pub unusable: Vec<LeaseKey>,
    /// The store revision the listing reflects.
    pub revision: i64,
}

/// Decodes one key/value below the subnets prefix; the error names the key.
pub(crate) fn decode_kv(keys: &KeyLayout, kv: &KeyValue) -> Result<(LeaseKey, LeaseAttrs), String> {
    let key = keys.parse_lease_key(kv.key())?;
    let value = std::str::from_utf8(kv.value()).map_err(|_| {
        format!(
            "lease {}: value is not UTF-8",
            String::from_utf8_lossy(kv.key())
        )
    })?;
    let attrs = LeaseAttrs::decode(value)
        .map_err(|e| format!("lease {}: {e}", String::from_utf8_lossy(kv.key())))?;
    Ok((key, attrs))
}

/// All leases below `<prefix>/subnets/`, unusable entries skipped with a warning.
pub(crate) async fn list(ops: &Ops, keys: &KeyLayout) -> Result<Listing, StoreError> {
    let t = std::time::Instant::now();
    let resp = ops.get(&keys.subnets_prefix, true, REQUEST_TIMEOUT).await?;
    let fetched_us = t.elapsed().as_micros() as u64;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let mut decoded = Vec::with_capacity(resp.kvs().len());
    let mut unusable = Vec::new();
    for kv in resp.kvs() {
        match decode_kv(keys, kv) {
            Ok((key, attrs)) => decoded.push((kv, key, attrs)),
            Err(e) => {
                tracing::warn!("skipping an unusable entry in etcd: {e}");
                unusable.extend(keys.parse_lease_key(kv.key()).ok());
            }
        }
    }
    // No expiry lookups: a peer's expiry is not needed to program it, and this
    // host's own lease is rewritten (with a fresh expiry) when it is reused. One
    // TimeToLive round trip per lease was most of a 5000-node start.
    let leases = decoded
        .into_iter()
        .map(|(kv, key, attrs)| Listed {
            etcd_key: String::from_utf8_lossy(kv.key()).into_owned(),
            etcd_lease: kv.lease(),
            lease: Lease {
                key,
                attrs: attrs.into(),
                expiration: None,
            },
        })
        .collect::<Vec<_>>();
    tracing::debug!(
        leases = leases.len(),
        fetched_us,
        total_us = t.elapsed().as_micros() as u64,
        "leases listed"
    );
    Ok(Listing {
        leases,
        unusable,
        revision,
    })
}

/// The allocation windows of a config (IPv4 always; IPv6 when enabled).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Windows {
    pub v4: Window4,
    pub v6: Option<Window6>,
}

impl Windows {
    pub fn of(config: &NetworkConfig) -> Result<Self, StoreError> {
        if !config.enable_ipv4 {
            return Err(unsupported_ipv6_only());
        }
        let v4 = config.window_v4().ok_or_else(|| StoreError::Lease {
            key: "-".into(),
            reason: "the network config has no IPv4 allocation window (was it validated?)".into(),
        })?;
        let v6 = if config.enable_ipv6 {
            Some(config.window_v6().ok_or_else(|| StoreError::Lease {
                key: "-".into(),
                reason:
                    "the network config has no IPv6 allocation window (was it validated?)".into(),
            })?)
        } else {
            None
        };
        Ok(Windows { v4, v6 })
    }

    /// Whether a lease key fits the config: v4 subnet in the window with the right
    /// length; a v6 part exactly when IPv6 is enabled, in its window.
    pub fn fits(&self, key: &LeaseKey) -> bool {
        if !self.v4.contains(&key.v4) {
            return false;
        }
        match (self.v6, key.v6) {
            (None, None) => true,
            (Some(w), Some(n)) => w.contains(&n),
            _ => false,
        }
    }

    fn describe(&self) -> String {
        let mut s = format!(
            "{}/{} … {}/{}",
            self.v4.min, self.v4.len, self.v4.max, self.v4.len
        );
        if let Some(w) = self.v6 {
            s.push_str(&format!(" and {}/{} … {}/{}", w.min, w.len, w.max, w.len));
        }
        s
    }
}

pub(crate) fn unsupported_ipv6_only() -> StoreError {
    StoreError::Unsupported(
        "the network config disables IPv4 (IPv6-only); flannel's etcd layout cannot hold \
         IPv6-only leases, so IPv6-only clusters need the Kubernetes subnet manager \
         (--kube-subnet-mgr)"
            .into(),
    )
}

/// What acquisition decided from one listing.
#[derive(Debug)]
pub(crate) enum Plan {
    /// Keep this existing lease of ours.
    Reuse(Listed),
    /// Create a new key for these subnets.
    Create(LeaseKey),
}

/// Chooses this host's lease from a listing (pure: no etcd calls). Returns the keys
/// of our own leases that no longer fit the config (to delete) and the plan.
pub(crate) fn plan<R: rand::Rng + ?Sized>(
    listing: &[Listed],
    unusable: &[LeaseKey],
    windows: &Windows,
    req: &AcquireRequest,
    rng: &mut R,
) -> Result<(Vec<Listed>, Plan), StoreError> {
    let mut stale = Vec::new();
    for l in listing {
        let ours = l.lease.attrs.public_ip == req.attrs.public_ip
            && (windows.v6.is_none() || l.lease.attrs.public_ipv6 == req.attrs.public_ipv6);
        if !ours {
            continue;
        }
        if windows.fits(&l.lease.key) {
            return Ok((stale, Plan::Reuse(l.clone())));
        }
        stale.push(l.clone());
    }
    let live = || {
        listing
            .iter()
            .filter(|l| !stale.iter().any(|s| s.etcd_key == l.etcd_key))
    };
    let taken = || live().map(|l| &l.lease.key).chain(unusable);
    let taken4: Vec<Ipv4Net> = taken().map(|k| k.v4).collect();
    let taken6: Vec<Ipv6Net> = taken().filter_map(|k| k.v6).collect();

    if let Some(prev4) = req.previous.subnet {
        let prev = LeaseKey {
            v4: prev4,
            v6: windows.v6.and(req.previous.ipv6_subnet),
        };
        let free4 = !taken4.iter().any(|t| overlaps4(t, &prev4));
        let free6 = prev
            .v6
            .is_none_or(|p| !taken6.iter().any(|t| overlaps6(t, &p)));
        if windows.fits(&prev) && free4 && free6 {
            return Ok((stale, Plan::Create(prev)));
        }
    }

    let out = || StoreError::OutOfSubnets {
        window: windows.describe(),
    };
    let v4 = windows.v4.pick_free(&taken4, rng).ok_or_else(out)?;
    let v6 = match windows.v6 {
        Some(w) => Some(w.pick_free(&taken6, rng).ok_or_else(out)?),
        None => None,
    };
    Ok((stale, Plan::Create(LeaseKey { v4, v6 })))
}

fn overlaps4(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(b) || b.contains(a)
}

fn overlaps6(a: &Ipv6Net, b: &Ipv6Net) -> bool {
    a.contains(b) || b.contains(a)
}

/// Acquires this host's lease (docs/compatibility.md, "Lease acquisition and renewal").
/// Also returns the listing the decision was made from: the lease watch can start
/// from it instead of listing everything again.
pub(crate) async fn acquire(
    ops: &Ops,
    keys: &KeyLayout,
    config: &NetworkConfig,
    req: &AcquireRequest,
) -> Result<(Lease, Listing), StoreError> {
    let windows = Windows::of(config)?;
    let value = req.attrs.encode();
    let mut last_key = String::from("-");
    for attempt in 1..=MAX_CREATE_ATTEMPTS {
        let mut listing = list(ops, keys).await?;
        let (stale, plan) = plan(
            &listing.leases,
            &listing.unusable,
            &windows,
            req,
            &mut rand::rng(),
        )?;
        for s in stale {
            tracing::info!(
                "deleting this host's lease {} from etcd: it does not fit the network config any more",
                s.etcd_key
            );
            ops.delete(&s.etcd_key).await?;
            // Gone from etcd now: a watch starting from this listing must not see it.
            listing.leases.retain(|l| l.etcd_key != s.etcd_key);
        }
        match plan {
            Plan::Reuse(l) => {
                let lease = rewrite(ops, &l.etcd_key, l.lease.key, req, l.etcd_lease == 0).await?;
                tracing::info!("reusing lease {} (public IP matches)", l.etcd_key);
                return Ok((lease, listing));
            }
            Plan::Create(key) => {
                let etcd_key = keys.lease_key(&key);
                let (id, expiration) = ops.grant().await?;
                let created = match ops.create(&etcd_key, &value, id).await {
                    Ok(c) => c,
                    Err(e) => {
                        ops.revoke_quietly(id).await;
                        return Err(e);
                    }
                };
                // A dual-stack key names both subnets, so create-if-absent cannot
                // see another host that took the same IPv4 (or IPv6) subnet with a
                // different partner at the same time; upstream has this race. Both
                // hosts read after their create, and the later-created key backs off.
                let rival = match (created, windows.v6) {
                    (true, Some(_)) => earlier_rival(ops, keys, &key, &etcd_key).await?,
                    _ => None,
                };
                if let Some(other) = &rival {
                    tracing::warn!(
                        "lease {etcd_key} overlaps {other}, created just before it by another \
                         host; giving it up (attempt {attempt} of {MAX_CREATE_ATTEMPTS})"
                    );
                    ops.delete(&etcd_key).await?;
                }
                if created && rival.is_none() {
                    tracing::info!("acquired lease {etcd_key}");
                    let lease = Lease {
                        key,
                        attrs: req.attrs.clone().into(),
                        expiration: Some(expiration),
                    };
                    return Ok((lease, listing));
                }
                ops.revoke_quietly(id).await;
                tracing::info!(
                    "subnet {key} was taken by another host meanwhile (attempt {attempt} of \
                     {MAX_CREATE_ATTEMPTS}); picking again"
                );
                last_key = etcd_key;
                // Hosts that collided tend to relist and pick in lock step; a little
                // jitter spreads them out.
                let jitter = rand::rng().random_range(10..60u64);
                tokio::time::sleep(Duration::from_millis(jitter)).await;
            }
        }
    }
    Err(StoreError::Lease {
        key: last_key,
        reason: format!(
            "another host created the chosen subnet first {MAX_CREATE_ATTEMPTS} times in a row"
        ),
    })
}

/// The etcd key of a lease created before ours (`own_etcd_key`, holding `own`)
/// whose IPv4 or IPv6 subnet overlaps ours, if any.
async fn earlier_rival(
    ops: &Ops,
    keys: &KeyLayout,
    own: &LeaseKey,
    own_etcd_key: &str,
) -> Result<Option<String>, StoreError> {
    let resp = ops.get(&keys.subnets_prefix, true, REQUEST_TIMEOUT).await?;
    let entries: Vec<(String, i64, Option<LeaseKey>)> = resp
        .kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.create_revision(),
                keys.parse_lease_key(kv.key()).ok(),
            )
        })
        .collect();
    Ok(rival_of(&entries, own, own_etcd_key))
}

/// [`earlier_rival`] over a listing of (etcd key, create revision, lease key). Our
/// own key missing from the listing (deleted or expired already) counts as losing
/// to any overlapping key.
fn rival_of(
    entries: &[(String, i64, Option<LeaseKey>)],
    own: &LeaseKey,
    own_etcd_key: &str,
) -> Option<String> {
    let ours = entries
        .iter()
        .find(|(k, ..)| k == own_etcd_key)
        .map_or(i64::MAX, |e| e.1);
    entries
        .iter()
        .filter(|(k, rev, key)| {
            k != own_etcd_key
                && *rev < ours
                && key.is_some_and(|key| {
                    overlaps4(&key.v4, &own.v4)
                        || matches!((key.v6, own.v6), (Some(a), Some(b)) if overlaps6(&a, &b))
                })
        })
        .map(|(k, ..)| k.clone())
        .next()
}

/// Writes this host's lease again with our current attributes: with a fresh 24 h
/// etcd lease, or without any for a reservation (which stays permanent).
pub(crate) async fn rewrite(
    ops: &Ops,
    etcd_key: &str,
    key: LeaseKey,
    req: &AcquireRequest,
    reservation: bool,
) -> Result<Lease, StoreError> {
    let value = req.attrs.encode();
    let expiration = if reservation {
        ops.put(etcd_key, &value, 0).await?;
        None
    } else {
        let (id, expiration) = ops.grant().await?;
        ops.put(etcd_key, &value, id).await?;
        Some(expiration)
    };
    Ok(Lease {
        key,
        attrs: req.attrs.clone().into(),
        expiration,
    })
}

/// Renews a lease: same attributes, new 24 h etcd lease (reservations: rewritten
/// without one).
pub(crate) async fn renew(ops: &Ops, keys: &KeyLayout, lease: &Lease) -> Result<Lease, StoreError> {
    let req = AcquireRequest {
        attrs: LeaseAttrs::clone(&lease.attrs),
        previous: Default::default(),
    };
    rewrite(
        ops,
        &keys.lease_key(&lease.key),
        lease.key,
        &req,
        lease.expiration.is_none(),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use flannel_core::PreviousSubnets;

    /// The planner with a fixed seed, so a failing case replays exactly.
    fn plan(
        listing: &[Listed],
        unusable: &[LeaseKey],
        windows: &Windows,
        req: &AcquireRequest,
    ) -> Result<(Vec<Listed>, Plan), StoreError> {
        let mut rng: rand::rngs::StdRng = rand::SeedableRng::seed_from_u64(11);
        super::plan(listing, unusable, windows, req, &mut rng)
    }

    fn listed(key: &str, ip: &str) -> Listed {
        let k: LeaseKey = key.parse().unwrap();
        Listed {
            etcd_key: format!("/coreos.com/network/subnets/{key}"),
            etcd_lease: 1,
            lease: Lease {
                key: k,
                attrs: LeaseAttrs::new(ip.parse().unwrap()).into(),
                expiration: None,
            },
        }
    }

    fn windows() -> Windows {
        let c = NetworkConfig::parse_and_validate(r#"{"Network":"10.5.0.0/16"}"#).unwrap();
        Windows::of(&c).unwrap()
    }

    fn req(ip: &str, prev: Option<&str>) -> AcquireRequest {
        AcquireRequest {
            attrs: LeaseAttrs::new(ip.parse().unwrap()),
            previous: PreviousSubnets {
                subnet: prev.map(|p| p.parse().unwrap()),
                ..Default::default()
            },
        }
    }

    #[test]
    fn reuses_by_ip_and_deletes_misfits_first() {
        let l = vec![
            listed("10.6.0.0-24", "1.1.1.1"),
            listed("10.5.7.0-24", "1.1.1.1"),
            listed("10.5.8.0-24", "1.1.1.2"),
        ];
        let (stale, p) = plan(&l, &[], &windows(), &req("1.1.1.1", Some("10.5.9.0/24"))).unwrap();
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].lease.key.to_string(), "10.6.0.0-24");
        assert!(matches!(p, Plan::Reuse(r) if r.lease.key.to_string() == "10.5.7.0-24"));
    }

    #[test]
    fn previous_subnet_only_when_free_and_fitting() {
        let l = vec![listed("10.5.8.0-24", "1.1.1.2")];
        let w = windows();
        let (_, p) = plan(&l, &[], &w, &req("1.1.1.1", Some("10.5.9.0/24"))).unwrap();
        assert!(matches!(p, Plan::Create(k) if k.to_string() == "10.5.9.0-24"));
        // Held by someone else: fresh pick, never the held one.
        for _ in 0..50 {
            let (_, p) = plan(&l, &[], &w, &req("1.1.1.1", Some("10.5.8.0/24"))).unwrap();
            assert!(matches!(p, Plan::Create(k) if k.to_string() != "10.5.8.0-24"));
        }
        // Wrong length or outside the window: not used.
        for bad in ["10.5.9.0/25", "10.5.0.0/24", "10.9.1.0/24"] {
            let (_, p) = plan(&l, &[], &w, &req("1.1.1.1", Some(bad))).unwrap();
            assert!(
                matches!(p, Plan::Create(k) if k.v4.to_string() != bad),
                "{bad}"
            );
        }
    }

    #[test]
    fn unusable_entries_block_their_subnet() {
        let garbage: LeaseKey = "10.5.9.0-24".parse().unwrap();
        for _ in 0..50 {
            let (_, p) = plan(
                &[],
                &[garbage],
                &windows(),
                &req("1.1.1.1", Some("10.5.9.0/24")),
            )
            .unwrap();
            assert!(matches!(p, Plan::Create(k) if k != garbage));
        }
    }

    #[test]
    fn full_window_is_out_of_subnets() {
        let c = NetworkConfig::parse_and_validate(
            r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.2.0"}"#,
        )
        .unwrap();
        let w = Windows::of(&c).unwrap();
        let l = vec![
            listed("10.5.1.0-24", "1.1.1.2"),
            listed("10.5.2.0-24", "1.1.1.3"),
        ];
        let e = plan(&l, &[], &w, &req("1.1.1.1", None)).unwrap_err();
        assert!(matches!(e, StoreError::OutOfSubnets { .. }), "{e}");
        assert!(e.to_string().contains("10.5.1.0/24 … 10.5.2.0/24"), "{e}");
    }

    #[test]
    fn ipv6_only_is_refused() {
        let c = NetworkConfig::parse_and_validate(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/48"}"#,
        )
        .unwrap();
        let e = Windows::of(&c).unwrap_err();
        assert!(matches!(e, StoreError::Unsupported(_)));
        assert!(e.to_string().contains("Kubernetes subnet manager"));
    }

    #[test]
    fn dual_stack_race_the_later_created_key_backs_off() {
        let k = |v4: &str, v6: &str| LeaseKey {
            v4: v4.parse().unwrap(),
            v6: Some(v6.parse().unwrap()),
        };
        let ours = k("10.244.40.0/24", "fd10:244:0:d::/64");
        let e = |name: &str, rev: i64, key: Option<LeaseKey>| (name.to_string(), rev, key);
        // Same IPv4 subnet, another IPv6 one, created first: we give up.
        let entries = vec![
            e("a", 5, Some(k("10.244.40.0/24", "fd10:244:0:14::/64"))),
            e("ours", 6, Some(ours)),
            e("b", 4, Some(k("10.244.41.0/24", "fd10:244:0:15::/64"))),
        ];
        assert_eq!(rival_of(&entries, &ours, "ours").as_deref(), Some("a"));
        // Created after ours: the other host backs off, we keep ours.
        let entries = vec![
            e("ours", 6, Some(ours)),
            e("a", 7, Some(k("10.244.40.0/24", "fd10:244:0:14::/64"))),
        ];
        assert_eq!(rival_of(&entries, &ours, "ours"), None);
        // The IPv6 subnet alone overlapping counts too.
        let entries = vec![
            e("c", 2, Some(k("10.244.9.0/24", "fd10:244:0:d::/64"))),
            e("ours", 6, Some(ours)),
        ];
        assert_eq!(rival_of(&entries, &ours, "ours").as_deref(), Some("c"));
        // Unparsable keys and disjoint leases are no rivals; our key gone loses.
        let entries = vec![
            e("junk", 1, None),
            e("b", 3, Some(k("10.244.41.0/24", "fd10:244:0:15::/64"))),
        ];
        assert_eq!(rival_of(&entries, &ours, "ours"), None);
        let entries = vec![e("a", 9, Some(k("10.244.40.0/24", "fd10:244:0:14::/64")))];
        assert_eq!(rival_of(&entries, &ours, "ours").as_deref(), Some("a"));
    }

    #[test]
    fn dual_stack_fit_and_reuse_compare_both_addresses() {
        let c = NetworkConfig::parse_and_validate(
            r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:5::/48"}"#,
        )
        .unwrap();
        let w = Windows::of(&c).unwrap();
        assert!(!w.fits(&"10.5.1.0-24".parse().unwrap()), "v6 part required");
        assert!(w.fits(&"10.5.1.0-24&fd00:10:5:1::-64".parse().unwrap()));
        let mut mine = listed("10.5.1.0-24&fd00:10:5:1::-64", "1.1.1.1");
        std::sync::Arc::make_mut(&mut mine.lease.attrs).public_ipv6 =
            Some("fd01::1".parse().unwrap());
        let mut r = req("1.1.1.1", None);
        r.attrs.public_ipv6 = Some("fd01::2".parse().unwrap());
        let (_, p) = plan(std::slice::from_ref(&mine), &[], &w, &r).unwrap();
        match p {
            Plan::Create(k) => {
                assert_ne!(k.v4, mine.lease.key.v4);
                assert!(k.v6.is_some());
            }
            Plan::Reuse(_) => panic!("different IPv6 address must not reuse"),
        }
        r.attrs.public_ipv6 = Some("fd01::1".parse().unwrap());
        let (_, p) = plan(&[mine], &[], &w, &r).unwrap();
        assert!(matches!(p, Plan::Reuse(_)));
    }
}
