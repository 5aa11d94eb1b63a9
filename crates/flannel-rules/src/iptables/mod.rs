//! iptables engine (docs/compatibility.md, "iptables rules"): chains `FLANNEL-POSTRTG`
//! (nat) and `FLANNEL-FWD` (filter)
//! with the jumps from POSTROUTING / FORWARD, written with `iptables-restore --noflush`.
//!
//! Names and comments are upstream's, so chains and rules left by Go flanneld (any
//! version) are recognised and taken over instead of duplicated. Each table changes in one
//! restore transaction: declaring `:FLANNEL-POSTRTG - [0:0]` under `--noflush` empties the
//! chain and the following `-A` lines refill it within the same commit, so no packet ever
//! sees the chain half-built or empty. A set that is already exactly in place, with its
//! jump first, is left alone (as upstream does), so a restart usually commits nothing.

mod batch;
mod saved;
mod view;

use batch::*;
pub(crate) use saved::Saved;
pub(crate) use view::artifacts_maybe_present;
use view::*;

use std::net::IpAddr;

use ipnet::IpNet;

use super::cmd::Runner;
use super::nfnl::{
    contains_bytes, is_plain_jump, CommitWatch, Fnv, NfNetlink, Scope, NFPROTO_IPV4, NFPROTO_IPV6,
};
use super::xtlegacy::XtLegacy;
use super::{EngineKind, EngineOptions, RuleEngine, RuleSet, RulesError};

pub(crate) const MASQ_CHAIN: &str = "FLANNEL-POSTRTG";
pub(crate) const FWD_CHAIN: &str = "FLANNEL-FWD";
const MASQ_COMMENT: &str = "flanneld masq";
const FWD_COMMENT: &str = "flanneld forward";

/// Which iptables binaries to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IptablesVariant {
    /// `iptables`, `iptables-restore`, … from PATH: whatever backend they use, as upstream.
    #[default]
    Default,
    /// `iptables-nft*`.
    Nft,
    /// `iptables-legacy*`.
    Legacy,
}

impl IptablesVariant {
    fn bin(self, v6: bool, tool: &str) -> String {
        let base = if v6 { "ip6tables" } else { "iptables" };
        let infix = match self {
            IptablesVariant::Default => "",
            IptablesVariant::Nft => "-nft",
            IptablesVariant::Legacy => "-legacy",
        };
        format!("{base}{infix}{tool}")
    }
}

/// Keeps the rules in flannel's iptables chains.
pub struct IptablesEngine {
    runner: Runner,
    variant: IptablesVariant,
    backend: Backend,
    /// How `check` sees changes, and `apply` the current state, without forking.
    probe: Probe,
    /// Tells when an `iptables-restore` batch is committed (nf_tables backend only).
    commits: Option<CommitWatch>,
    random_fully: bool,
    wait: bool,
    applied: Option<RuleSet>,
    baseline: Option<(u64, u32)>,
}

/// The cheap way to notice changes, by iptables backend.
enum Probe {
    /// `iptables v1.8.9 (nf_tables)`: the nf_tables generation, then a fingerprint of our
    /// chains over netlink.
    Nft(NfNetlink),
    /// Legacy x_tables: a fingerprint of the nat and filter tables via getsockopt.
    Legacy(XtLegacy),
    /// Neither could be opened: fork `iptables-save` every check, as upstream does.
    None,
}

/// One address family's wanted state.
#[derive(Clone, Copy)]
struct Fam {
    v6: bool,
    network: IpNet,
    subnet: IpNet,
    masq: bool,
    forward: bool,
}

/// The two rule sets, each a chain of ours plus one jump from a built-in chain.
#[derive(Clone, Copy)]
struct Set {
    table: &'static str,
    builtin: &'static str,
    chain: &'static str,
    comment: &'static str,
}

const MASQ_SET: Set = Set {
    table: "nat",
    builtin: "POSTROUTING",
    chain: MASQ_CHAIN,
    comment: MASQ_COMMENT,
};
const FWD_SET: Set = Set {
    table: "filter",
    builtin: "FORWARD",
    chain: FWD_CHAIN,
    comment: FWD_COMMENT,
};

/// The kernel side an `iptables` binary writes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    NfTables,
    Legacy,
}

impl IptablesEngine {
    /// Learns the iptables version and backend: they decide `--random-fully` / `--wait`
    /// support (iptables ≥ 1.6.2, as upstream) and how to look at rules in-process. When
    /// the binary resolves to one of iptables' multi-call binaries, its name says both;
    /// otherwise (e.g. a wrapper script) `iptables --version` is asked.
    pub fn new(opts: EngineOptions) -> Result<Self, RulesError> {
        let runner = Runner::new(opts.netns.clone());
        let variant = opts.iptables_variant;
        let bin = variant.bin(false, "");
        let (backend, modern) = match backend_from_binary(&bin) {
            Some(b) => (b, true),
            None => {
                let out = runner.run(&bin, &["--version"], None)?;
                let version = parse_version(&out).ok_or_else(|| RulesError::Output {
                    command: format!("{bin} --version"),
                    detail: out.trim().to_string(),
                })?;
                let backend = if out.contains("nf_tables") {
                    Backend::NfTables
                } else {
                    Backend::Legacy
                };
                (backend, version >= (1, 6, 2))
            }
        };
        let probe = match backend {
            Backend::NfTables => NfNetlink::open(runner.netns()).map(Probe::Nft),
            Backend::Legacy => XtLegacy::open(runner.netns()).map(Probe::Legacy),
        }
        .unwrap_or_else(|e| {
            tracing::warn!(
                "no in-process rule check, iptables resync will fork iptables-save: {e}"
            );
            Probe::None
        });
        let commits = match probe {
            Probe::Nft(_) => CommitWatch::open(runner.netns()).ok(),
            _ => None,
        };
        Ok(IptablesEngine {
            runner,
            variant,
            backend,
            probe,
            commits,
            random_fully: modern && opts.fully_random,
            wait: modern,
            applied: None,
            baseline: None,
        })
    }

    fn families(rules: &RuleSet) -> Vec<Fam> {
        let mut v = Vec::new();
        if let Some(f) = rules.ipv4 {
            v.push(Fam {
                v6: false,
                network: IpNet::V4(f.network),
                subnet: IpNet::V4(f.subnet),
                masq: rules.ip_masq,
                forward: rules.forward,
            });
        }
        if let Some(f) = rules.ipv6 {
            v.push(Fam {
                v6: true,
                network: IpNet::V6(f.network),
                subnet: IpNet::V6(f.subnet),
                masq: rules.ip_masq,
                forward: rules.forward,
            });
        }
        v
    }

    fn save(&self, v6: bool) -> Result<Saved, RulesError> {
        let out = self.runner.run(&self.variant.bin(v6, "-save"), &[], None)?;
        Ok(Saved::parse(&out))
    }

    /// Returns how many nf_tables commits the input makes (one per table section).
    fn restore(&mut self, v6: bool, input: &str) -> Result<usize, RulesError> {
        let bin = self.variant.bin(v6, "-restore");
        let mut args = vec!["--noflush"];
        if self.wait {
            args.push("--wait");
        }
        let commits = input.lines().filter(|l| *l == "COMMIT").count();
        self.runner
            .run_commit(&bin, &args, input, commits, self.commits.as_mut())?;
        Ok(commits)
    }

    /// What the kernel holds of one family's sets, for `set_batch`: read in-process when
    /// that is exact, else from `iptables-save`. With `text_if_ours`, anything of ours
    /// present is also read from `iptables-save`, whose text tells whether a set is
    /// already exactly in place (see `apply`).
    fn current(&mut self, v6: bool, text_if_ours: bool) -> Result<Saved, RulesError> {
        let view = match &mut self.probe {
            Probe::Nft(nl) => nft_view(nl, v6)?,
            Probe::Legacy(x) => {
                let mut any = false;
                for set in [MASQ_SET, FWD_SET] {
                    any |= x.mentions(v6, set.table, &[set.chain, set.comment])?;
                }
                // Nothing of ours at all: the empty state is exact. Otherwise only
                // iptables-save can give the text of the rules to delete.
                (!any).then(Saved::default)
            }
            Probe::None => None,
        };
        match view {
            Some(saved) if !(text_if_ours && holds_ours(&saved)) => Ok(saved),
            _ => self.save(v6),
        }
    }

    /// The full, forking check: does `iptables-save` show every wanted set exactly once?
    fn full_check(&self, rules: &RuleSet) -> Result<bool, RulesError> {
        for fam in Self::families(rules) {
            let saved = self.save(fam.v6)?;
            for (set, want) in [(MASQ_SET, fam.masq), (FWD_SET, fam.forward)] {
                let wanted = want.then(|| chain_lines(set, &fam, self.random_fully));
                if !set_in_place(&saved, set, wanted.as_deref()) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    fn scopes(rules: &RuleSet) -> Vec<Scope> {
        let mut s = Vec::new();
        for fam in Self::families(rules) {
            let family = if fam.v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 };
            for set in [MASQ_SET, FWD_SET] {
                for chain in [set.builtin, set.chain] {
                    s.push(Scope::Chain {
                        family,
                        table: set.table.into(),
                        chain: chain.into(),
                    });
                }
            }
        }
        s
    }

    /// A cheap snapshot `(fingerprint, generation)` of everything our sets live in.
    fn snapshot(&mut self, rules: &RuleSet) -> Result<Option<(u64, u32)>, RulesError> {
        match &mut self.probe {
            Probe::Nft(nl) => nl.fingerprint(&Self::scopes(rules)).map(Some),
            Probe::Legacy(x) => {
                let mut h = Fnv::new();
                for fam in Self::families(rules) {
                    x.fingerprint(fam.v6, &[MASQ_SET.table, FWD_SET.table], &mut h)?;
                }
                Ok(Some((h.finish(), 0)))
            }
            Probe::None => Ok(None),
        }
    }

    /// If nothing changed since `snap` was taken: the snapshot as of now (for nf_tables
    /// with the generation the fingerprint was verified at).
    fn unchanged_since(
        &mut self,
        rules: &RuleSet,
        snap: (u64, u32),
    ) -> Result<Option<(u64, u32)>, RulesError> {
        if let Probe::Nft(nl) = &mut self.probe {
            if nl.generation()? == snap.1 {
                return Ok(Some(snap));
            }
        }
        Ok(self.snapshot(rules)?.filter(|now| now.0 == snap.0))
    }

    /// Record what the kernel holds now as the known-good state, if `iptables-save`
    /// confirms it and nothing changed while both were read.
    fn take_baseline(&mut self, rules: &RuleSet) -> Result<bool, RulesError> {
        self.baseline = None;
        let snap = self.snapshot(rules)?;
        let ok = self.full_check(rules)?;
        if let (true, Some(snap)) = (ok, snap) {
            if let Probe::Nft(nl) = &mut self.probe {
                if nl.generation()? == snap.1 {
                    self.baseline = Some(snap);
                }
            } else if self.snapshot(rules)? == Some(snap) {
                self.baseline = Some(snap);
            }
        }
        Ok(ok)
    }

    /// Remove both sets of one family; a family whose tools cannot list anything (e.g.
    /// IPv6 disabled in the kernel) holds nothing to remove.
    fn cleanup_family(&mut self, v6: bool) -> Result<(), RulesError> {
        let saved = match self.current(v6, false) {
            Ok(s) => s,
            Err(e) if v6 => {
                tracing::debug!("ip6tables unusable, nothing to clean up there: {e}");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let mut input = String::new();
        for set in [MASQ_SET, FWD_SET] {
            input.push_str(&set_batch(&saved, set, None));
        }
        if input.is_empty() {
            return Ok(());
        }
        self.restore(v6, &input).map(|_| ())
    }

    /// With the nf_tables backend: the tables that hold a `FLANNEL-` chain now.
    fn tables_holding_our_chains(&self, v6: bool) -> Result<Vec<String>, RulesError> {
        if self.backend != Backend::NfTables {
            return Ok(Vec::new());
        }
        let saved = self.save(v6)?;
        Ok(saved
            .tables
            .into_iter()
            .filter(|(_, t)| t.chains.iter().any(|c| c.starts_with("FLANNEL-")))
            .map(|(name, _)| name)
            .collect())
    }

    /// iptables-nft creates a table with all its built-in chains the first time a rule
    /// goes in. A table that held our chains and is only that scaffolding now is
    /// deleted, so a host that had no iptables tables before the agent has none after
    /// the cleanup. (Legacy tables belong to the kernel modules: nothing to delete.)
    fn remove_emptied_tables(&self, v6: bool, held_ours: &[String]) -> Result<(), RulesError> {
        if held_ours.is_empty() {
            return Ok(());
        }
        let family = if v6 { "ip6" } else { "ip" };
        let saved = self.save(v6)?;
        let errs = saved
            .tables
            .iter()
            .filter(|(name, t)| t.filters_nothing && held_ours.contains(name))
            .filter_map(|(name, _)| {
                let r = self.runner.run("nft", &["delete", "table", family, name], None);
                if r.is_ok() {
                    tracing::info!(%family, table = %name, "deleted the table our chains left empty");
                }
                r.err()
            })
            .collect();
        RulesError::collect(errs)
    }
}

impl RuleEngine for IptablesEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Iptables
    }

    fn apply(&mut self, rules: &RuleSet) -> Result<(), RulesError> {
        self.applied = None;
        self.baseline = None;
        let gen_before = match &mut self.probe {
            Probe::Nft(nl) => Some(nl.generation()?),
            _ => None,
        };
        let mut commits = 0usize;
        for fam in Self::families(rules) {
            let saved = self.current(fam.v6, true)?;
            let mut input = String::new();
            for (set, want) in [(MASQ_SET, fam.masq), (FWD_SET, fam.forward)] {
                let wanted = want.then(|| chain_lines(set, &fam, self.random_fully));
                // Already exactly in place with our jump first (typically a restart):
                // left alone, as upstream does. Rewriting would change nothing but the
                // counters, and its deletions would make the next batch holding xt
                // matches wait for an RCU grace period (nft_compat waits for pending
                // destroy work before initialising a match).
                if wanted
                    .as_deref()
                    .is_some_and(|w| set_in_place(&saved, set, Some(w)) && jump_first(&saved, set))
                {
                    continue;
                }
                input.push_str(&set_batch(&saved, set, wanted.as_deref()));
            }
            if !input.is_empty() {
                commits += self.restore(fam.v6, &input)?;
            }
        }
        // nf_tables: if the generation moved by exactly our commits, nobody else changed
        // anything in between, so the kernel holds what the batches say and the
        // fingerprint taken now is the known-good state; no iptables-save needed.
        if let (Some(g0), Probe::Nft(nl)) = (gen_before, &mut self.probe) {
            let snap = nl.fingerprint(&Self::scopes(rules))?;
            if snap.1 == g0.wrapping_add(commits as u32) {
                self.baseline = Some(snap);
                self.applied = Some(rules.clone());
                return Ok(());
            }
        }
        if !self.take_baseline(rules)? {
            return Err(RulesError::Output {
                command: self.variant.bin(false, "-save"),
                detail: "the rules just applied are not listed as expected".into(),
            });
        }
        self.applied = Some(rules.clone());
        Ok(())
    }

    fn check(&mut self, rules: &RuleSet) -> Result<bool, RulesError> {
        if self.applied.as_ref() != Some(rules) {
            return Ok(false);
        }
        if let Some(base) = self.baseline {
            if let Some(now) = self.unchanged_since(rules, base)? {
                // The newest verified generation, so the next check takes the shortcut.
                self.baseline = Some(now);
                return Ok(true);
            }
        }
        // Something in our chains or the built-in chains changed (e.g. another agent
        // added a rule to POSTROUTING), or there is no cheap way to tell: ask iptables.
        self.take_baseline(rules)
    }

    fn cleanup(&mut self) -> Result<(), RulesError> {
        self.applied = None;
        self.baseline = None;
        let errs: Vec<RulesError> = [false, true]
            .into_iter()
            .filter_map(|v6| self.cleanup_family(v6).err())
            .collect();
        RulesError::collect(errs)
    }

    fn cleanup_host(&mut self) -> Result<(), RulesError> {
        // A family whose tools cannot list anything holds no table of ours.
        let held: Vec<(bool, Vec<String>)> = [false, true]
            .into_iter()
            .map(|v6| (v6, self.tables_holding_our_chains(v6).unwrap_or_default()))
            .collect();
        let mut errs: Vec<RulesError> = self.cleanup().err().into_iter().collect();
        for (v6, tables) in held {
            errs.extend(self.remove_emptied_tables(v6, &tables).err());
        }
        RulesError::collect(errs)
    }

    fn cheap_check(&self) -> bool {
        !matches!(self.probe, Probe::None)
    }
}

/// `iptables v1.8.9 (nf_tables)` → (1, 8, 9).
fn parse_version(out: &str) -> Option<(u32, u32, u32)> {
    let v = out.split_whitespace().find_map(|w| w.strip_prefix('v'))?;
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((it.next()??, it.next()??, it.next().flatten().unwrap_or(0)))
}

/// Appendix A.4: what Go flanneld v0.20.2 leaves behind.
#[cfg(test)]
pub(crate) const GO_FLANNELD_SAVE: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:FLANNEL-FWD - [0:0]
-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD
-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:FLANNEL-POSTRTG - [0:0]
-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.48.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
COMMIT
"#;

#[cfg(test)]
mod unit {
    use super::*;

    fn fam() -> Fam {
        Fam {
            v6: false,
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.48.0/24".parse().unwrap(),
            masq: true,
            forward: true,
        }
    }

    #[test]
    fn saved_tables_know_when_they_filter_nothing() {
        let save = "# Generated by iptables-nft-save v1.8.9
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [10:600]
:OUTPUT ACCEPT [0:0]
COMMIT
*security
:FLANNEL-FWD - [0:0]
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -d 192.0.2.0/24 -j RETURN
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:OWN - [0:0]
COMMIT
*raw
:PREROUTING DROP [0:0]
COMMIT
";
        let saved = Saved::parse(save);
        let empty: Vec<(&str, bool)> = saved
            .tables
            .iter()
            .map(|(n, t)| (n.as_str(), t.filters_nothing))
            .collect();
        assert_eq!(
            empty,
            vec![
                ("filter", true),
                ("mangle", false),
                ("nat", false),
                ("raw", false),
                ("security", false),
            ]
        );
        assert!(Saved::parse("").tables.is_empty());
    }

    #[test]
    fn parses_version_strings() {
        assert_eq!(
            parse_version("iptables v1.8.9 (nf_tables)\n"),
            Some((1, 8, 9))
        );
        assert_eq!(parse_version("iptables v1.6"), Some((1, 6, 0)));
        assert_eq!(parse_version("garbage"), None);
        assert_eq!(parse_version("iptables vX.Y"), None);
    }

    #[test]
    fn go_flanneld_forward_set_is_already_in_place() {
        let saved = Saved::parse(GO_FLANNELD_SAVE);
        let want = chain_lines(FWD_SET, &fam(), true);
        assert!(set_in_place(&saved, FWD_SET, Some(&want)));
        // v0.20.2's masquerade order differs from HEAD's: not in place, gets replaced.
        let want = chain_lines(MASQ_SET, &fam(), true);
        assert!(!set_in_place(&saved, MASQ_SET, Some(&want)));
        let batch = set_batch(&saved, MASQ_SET, Some(&want));
        // The jump is already first and unique: no delete/insert, only the refill.
        assert!(!batch.contains("-D "), "{batch}");
        assert!(
            batch.starts_with("*nat\n:FLANNEL-POSTRTG - [0:0]\n"),
            "{batch}"
        );
        assert_eq!(batch.matches("-A FLANNEL-POSTRTG").count(), 6, "{batch}");
    }

    #[test]
    fn stray_and_duplicate_jumps_are_deleted_and_one_inserted_first() {
        let text = "*nat\n:POSTROUTING ACCEPT [0:0]\n:FLANNEL-POSTRTG - [0:0]\n\
            -A POSTROUTING -s 10.0.0.0/8 -j ACCEPT\n\
            -A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n\
            -A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n\
            -A POSTROUTING -s 10.1.0.0/16 -d 10.1.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN\n\
            COMMIT\n";
        let saved = Saved::parse(text);
        let want = chain_lines(MASQ_SET, &fam(), false);
        let batch = set_batch(&saved, MASQ_SET, Some(&want));
        assert_eq!(batch.matches("-D POSTROUTING").count(), 3, "{batch}");
        assert!(!batch.contains("-D POSTROUTING -s 10.0.0.0/8"), "{batch}");
        assert!(
            batch.contains(
                "-I POSTROUTING 1 -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n"
            ),
            "{batch}"
        );
        assert!(!batch.contains("random-fully"));
    }

    #[test]
    fn removal_deletes_jumps_then_the_chain() {
        let saved = Saved::parse(GO_FLANNELD_SAVE);
        let batch = set_batch(&saved, MASQ_SET, None);
        assert_eq!(
            batch,
            "*nat\n-D POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n\
             -F FLANNEL-POSTRTG\n-X FLANNEL-POSTRTG\nCOMMIT\n"
        );
        assert_eq!(set_batch(&Saved::default(), MASQ_SET, None), "");
    }
}
