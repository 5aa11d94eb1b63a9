//! Masquerade and forward rules (nftables and iptables).
//!
//! Two engines keep the same rule set (docs/compatibility.md, "iptables rules" and
//! "nftables tables") in place:
//!
//! * [`NftEngine`] (`EnableNFTables: true`) owns the tables `ip flannel-ipv4` and
//!   `ip6 flannel-ipv6` and writes every change as one `nft -j -f -` transaction.
//! * [`IptablesEngine`] (default) owns the chains `FLANNEL-POSTRTG` (nat) and `FLANNEL-FWD`
//!   (filter) plus the jumps into them, written with `iptables-restore --noflush`; rules
//!   left by Go flanneld carry the same names and comments and are taken over.
//!
//! `apply` replaces everything the engine owns with the wanted set in one batch, so rules
//! for an old network/subnet (subnet.env "recycling") disappear in the same step that
//! installs the new ones, and packets never see a state without masquerade. (The iptables
//! engine leaves a set alone that is already exactly in place.)
//!
//! Startup forks only what must change the kernel: the current state, the tool version
//! and the other engine's leftovers are read in-process where possible (see
//! [`IptablesEngine::new`], [`remove_other_engine_artifacts`]), and a batch counts as done
//! once the kernel announces its commit (`cmd::Runner::run_commit`).
//!
//! `check` is meant to run every `--iptables-resync` seconds and costs (almost) nothing
//! while nothing changed: it asks the kernel for the nf_tables ruleset generation over a
//! netlink socket (two syscalls, no fork). Only when the generation moved does it dump
//! the engine's own tables/chains over the same socket and compare a fingerprint taken
//! right after the last apply. Only when that differs too (or with the legacy iptables
//! backend, which nf_tables does not see) does it fork `iptables-save` / re-apply.

mod cmd;
mod iptables;
mod nfnl;
mod nft;
mod resync;
mod xtlegacy;

#[cfg(test)]
mod tests;

use std::fmt;
use std::io;

use flannel_core::PreviousSubnets;
use ipnet::{Ipv4Net, Ipv6Net};

pub use iptables::{IptablesEngine, IptablesVariant};
pub use nft::NftEngine;
pub use resync::{spawn_resync, ResyncEvent, ResyncHandle};

/// Which implementation keeps the rules (`EnableNFTables` in the network config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    Iptables,
    Nftables,
}

impl EngineKind {
    /// The engine upstream picks for a network config's `EnableNFTables` value.
    pub fn from_enable_nftables(enable: bool) -> Self {
        if enable {
            EngineKind::Nftables
        } else {
            EngineKind::Iptables
        }
    }

    /// The engine whose artifacts must be removed at startup (docs/compatibility.md,
    /// "Startup order").
    pub fn other(self) -> Self {
        match self {
            EngineKind::Iptables => EngineKind::Nftables,
            EngineKind::Nftables => EngineKind::Iptables,
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineKind::Iptables => "iptables",
            EngineKind::Nftables => "nftables",
        })
    }
}

/// Settings that do not change while the agent runs.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Run every command and netlink request inside this named network namespace
    /// (`/run/netns/<name>`); `None` = the agent's own namespace. Tests use it.
    pub netns: Option<String>,
    /// Add `--random-fully` / `fully-random` to MASQUERADE when the tools and the
    /// kernel support it (`!--ip-masq-fully-random-disable`).
    pub fully_random: bool,
    /// Which `iptables*` binaries the iptables engine (and the nft engine's startup
    /// cleanup) runs.
    pub iptables_variant: IptablesVariant,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            netns: None,
            fully_random: true,
            iptables_variant: IptablesVariant::Default,
        }
    }
}

/// The networks of one address family: the cluster network `C` and this host's lease `S`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FamilyNets<N> {
    pub network: N,
    pub subnet: N,
}

/// The rules the agent wants in place.
///
/// A family that is `None` is not touched at all (upstream: an IPv4-only config leaves
/// ip6tables alone). For a family that is `Some`, the masquerade set exists iff `ip_masq`
/// and the forward set exists iff `forward`; a disabled set that an earlier run left
/// behind is removed (upstream leaves it, which keeps masquerading while subnet.env says
/// `FLANNEL_IPMASQ=false`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RuleSet {
    /// `--ip-masq`.
    pub ip_masq: bool,
    /// `--iptables-forward-rules`.
    pub forward: bool,
    pub ipv4: Option<FamilyNets<Ipv4Net>>,
    pub ipv6: Option<FamilyNets<Ipv6Net>>,
}

impl RuleSet {
    /// A rule set without families; add them with [`RuleSet::with_ipv4`] / [`RuleSet::with_ipv6`].
    pub fn new(ip_masq: bool, forward: bool) -> Self {
        RuleSet {
            ip_masq,
            forward,
            ipv4: None,
            ipv6: None,
        }
    }

    /// Networks are masked to their prefix (`10.244.1.1/24` → `10.244.1.0/24`).
    pub fn with_ipv4(mut self, network: Ipv4Net, subnet: Ipv4Net) -> Self {
        self.ipv4 = Some(FamilyNets {
            network: network.trunc(),
            subnet: subnet.trunc(),
        });
        self
    }

    /// Networks are masked to their prefix.
    pub fn with_ipv6(mut self, network: Ipv6Net, subnet: Ipv6Net) -> Self {
        self.ipv6 = Some(FamilyNets {
            network: network.trunc(),
            subnet: subnet.trunc(),
        });
        self
    }

    /// Whether the previous subnet.env names a different network or subnet than this set
    /// (upstream logs a "recycling" notice and deletes the old masquerade rules; here
    /// `apply` replaces them in the same batch, so this is only worth a log line).
    pub fn differs_from_previous(&self, prev: &PreviousSubnets) -> bool {
        let v4 = self.ipv4.is_some_and(|f| {
            prev.network.map(|n| n.trunc()) != Some(f.network)
                || prev.subnet.map(|n| n.trunc()) != Some(f.subnet)
        });
        let v6 = self.ipv6.is_some_and(|f| {
            prev.ipv6_network.map(|n| n.trunc()) != Some(f.network)
                || prev.ipv6_subnet.map(|n| n.trunc()) != Some(f.subnet)
        });
        v4 || v6
    }
}

/// Keeps a [`RuleSet`] in the kernel.
///
/// Methods block (they fork `nft`/`iptables-restore` and talk netlink); call them from a
/// blocking context (`spawn_blocking`, or the thread of [`spawn_resync`]).
pub trait RuleEngine: Send {
    fn kind(&self) -> EngineKind;

    /// Make the kernel hold exactly `rules` in everything this engine owns, in one batch
    /// per table. Idempotent: applying the same set N times leaves one copy.
    fn apply(&mut self, rules: &RuleSet) -> Result<(), RulesError>;

    /// Whether `rules` are still in place. Cheap when nothing changed since the last
    /// `apply`/`check` (one netlink round trip, no fork).
    fn check(&mut self, rules: &RuleSet) -> Result<bool, RulesError>;

    /// Remove every artifact of this engine kind (ours or left by Go flanneld), in both
    /// address families, and nothing else. Keeps going after an error and reports all.
    fn cleanup(&mut self) -> Result<(), RulesError>;

    /// `flanneld --cleanup`: [`cleanup`](Self::cleanup), plus whatever the engine's
    /// tools created only because our rules went in (so a host that had no tables
    /// before the agent has none after). Not for the switch between engines at
    /// startup, which must stay cheap.
    fn cleanup_host(&mut self) -> Result<(), RulesError> {
        self.cleanup()
    }

    /// Whether `check` runs without forking (false: legacy iptables backend).
    fn cheap_check(&self) -> bool;
}

/// Build the engine of `kind`.
pub fn new_engine(
    kind: EngineKind,
    opts: EngineOptions,
) -> Result<Box<dyn RuleEngine>, RulesError> {
    Ok(match kind {
        EngineKind::Iptables => Box::new(IptablesEngine::new(opts)?),
        EngineKind::Nftables => Box::new(NftEngine::new(opts)?),
    })
}

/// Delete the flannel artifacts of the engine *not* in use (docs/compatibility.md,
/// "Startup order" and "Cleanup looks where the rules live"): in nftables mode
/// the iptables chains `FLANNEL-POSTRTG` (nat) and `FLANNEL-FWD` (filter) with their
/// jumps, in iptables mode the nft tables `flannel-ipv4`/`flannel-ipv6`.
///
/// Looks in-process first (netlink, x_tables reads) and runs the other engine's tools
/// only when something of it is there, so a host without leftovers costs no fork. A
/// missing tool for the other engine is not an error (it cannot have made anything).
pub fn remove_other_engine_artifacts(
    in_use: EngineKind,
    opts: &EngineOptions,
) -> Result<(), RulesError> {
    let result = match in_use.other() {
        EngineKind::Iptables => {
            if !iptables::artifacts_maybe_present(opts.netns.as_deref()) {
                return Ok(());
            }
            IptablesEngine::new(opts.clone()).and_then(|mut e| {
                let r = e.cleanup();
                close_in_background(e);
                r
            })
        }
        EngineKind::Nftables => NftEngine::new(opts.clone()).and_then(|mut e| {
            let r = e.cleanup();
            close_in_background(e);
            r
        }),
    };
    match result {
        Err(e) if e.is_tool_missing() => {
            tracing::warn!(
                "flannel rules of the {} engine may be left over, but its tool is missing: {e}",
                in_use.other()
            );
            Ok(())
        }
        other => other,
    }
}

/// Drop a short-lived engine on a thread of its own: closing a netfilter netlink socket
/// right after a commit waits for an RCU grace period (the kernel flushes its deferred
/// destroy work first), several milliseconds nobody needs to wait for.
fn close_in_background<T: Send + 'static>(engine: T) {
    // If no thread can be started, the closure (and the engine) is dropped right here.
    let _ = std::thread::Builder::new()
        .name("rules-close".into())
        .spawn(move || drop(engine));
}

/// Errors of the rule engines; each variant's text is its message.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// A tool could not be started (not installed, not executable).
    #[error("cannot run {command}: {source}")]
    Spawn { command: String, source: io::Error },
    /// A tool ran and failed.
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    /// A tool printed something we cannot read.
    #[error("unexpected output from {command}: {detail}")]
    Output { command: String, detail: String },
    /// The nf_tables netlink socket failed.
    #[error("nf_tables netlink: {0}")]
    Netlink(#[source] io::Error),
    /// Entering the target network namespace failed.
    #[error(transparent)]
    Netns(#[from] flannel_net::netns::NetnsError),
    /// The resync thread could not be started.
    #[error("starting the rule resync thread: {0}")]
    Thread(#[source] io::Error),
    /// Several steps of a cleanup failed; all were attempted.
    #[error("{}", join_errors(.0))]
    Many(Vec<RulesError>),
}

impl RulesError {
    fn is_tool_missing(&self) -> bool {
        matches!(self, RulesError::Spawn { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }

    /// Collapse collected errors: none → Ok, one → itself, more → `Many`.
    fn collect(mut errs: Vec<RulesError>) -> Result<(), RulesError> {
        match errs.len() {
            0 => Ok(()),
            1 => Err(errs.remove(0)),
            _ => Err(RulesError::Many(errs)),
        }
    }
}

fn join_errors(errs: &[RulesError]) -> String {
    errs.iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}
