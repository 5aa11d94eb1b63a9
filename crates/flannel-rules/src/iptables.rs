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

use std::collections::BTreeMap;
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

/// The multi-call binary `name` (searched in PATH like the tools are run) resolves to.
/// `xtables-nft-multi` / `xtables-legacy-multi` exist since iptables 1.8.0, so either
/// also means `--wait` and `--random-fully` are supported. `None`: not known this way.
fn backend_from_binary(name: &str) -> Option<Backend> {
    let path = std::env::var_os("PATH")?;
    let found = std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())?;
    let real = std::fs::canonicalize(found).ok()?;
    match real.file_name()?.to_str()? {
        "xtables-nft-multi" => Some(Backend::NfTables),
        "xtables-legacy-multi" => Some(Backend::Legacy),
        _ => None,
    }
}

/// One rule of a table as `nft_view` sees it.
enum Seen {
    /// In the built-in chain, not ours (only the first one matters).
    Foreign,
    /// `-A <builtin> -m comment --comment "<comment>" -j <chain>`, exactly.
    Jump,
    /// Ours (mentions the chain or the comment), but not that plain jump.
    Other,
}

/// The state of one family's sets in iptables-nft's tables, read over netlink and written
/// as the `iptables-save` lines `set_batch` looks at: our chain when it exists, the first
/// rule of each built-in chain (a placeholder when it is not ours) and our jumps. `None`
/// when that would not be exact: a rule of ours that is not the plain jump (only
/// iptables-save can give its text for `-D`), or the ruleset kept changing.
fn nft_view(nl: &mut NfNetlink, v6: bool) -> Result<Option<Saved>, RulesError> {
    let family = if v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 };
    for _ in 0..5 {
        let gen = nl.generation()?;
        let mut saved = Saved::default();
        for set in [MASQ_SET, FWD_SET] {
            let chain_exists = nl.chain_exists(family, set.table, set.chain)?;
            let seen = nl.table_rules(family, set.table, |chain, attrs| {
                if chain == set.chain.as_bytes() {
                    return None;
                }
                let in_builtin = chain == set.builtin.as_bytes();
                let ours = contains_bytes(attrs, set.comment.as_bytes())
                    || contains_bytes(attrs, set.chain.as_bytes());
                match (ours, in_builtin) {
                    (false, false) => None,
                    (false, true) => Some(Seen::Foreign),
                    (true, true) if is_plain_jump(attrs, set.comment, set.chain) => {
                        Some(Seen::Jump)
                    }
                    (true, _) => Some(Seen::Other),
                }
            })?;
            let table = saved.tables.entry(set.table.to_string()).or_default();
            if chain_exists {
                table.chains.push(set.chain.to_string());
            }
            let mut first = true;
            for s in seen {
                match s {
                    Seen::Other => return Ok(None),
                    Seen::Foreign if first => table
                        .rules
                        .push((set.builtin.to_string(), format!("-A {} ?", set.builtin))),
                    Seen::Foreign => {}
                    Seen::Jump => table.rules.push((set.builtin.to_string(), jump_line(set))),
                }
                first = false;
            }
        }
        if nl.generation()? == gen {
            return Ok(Some(saved));
        }
    }
    Ok(None)
}

/// Whether flannel's iptables chains or rules may exist in either backend and family.
/// Answers from netlink and x_tables reads, without forking; false only when certainly
/// nothing is there (any doubt, e.g. a read failing, answers true).
pub(crate) fn artifacts_maybe_present(netns: Option<&str>) -> bool {
    let nft = || -> Result<bool, RulesError> {
        let mut nl = NfNetlink::open(netns)?;
        for family in [NFPROTO_IPV4, NFPROTO_IPV6] {
            for set in [MASQ_SET, FWD_SET] {
                if nl.chain_exists(family, set.table, set.chain)? {
                    return Ok(true);
                }
                let hits = nl.table_rules(family, set.table, |_, attrs| {
                    (contains_bytes(attrs, set.comment.as_bytes())
                        || contains_bytes(attrs, set.chain.as_bytes()))
                    .then_some(())
                })?;
                if !hits.is_empty() {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    };
    let legacy = || -> Result<bool, RulesError> {
        let x = XtLegacy::open(netns)?;
        for v6 in [false, true] {
            for set in [MASQ_SET, FWD_SET] {
                if x.mentions(v6, set.table, &[set.chain, set.comment])? {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    };
    match (nft(), legacy()) {
        (Ok(false), Ok(false)) => false,
        (a, b) => {
            for e in [a.err(), b.err()].into_iter().flatten() {
                tracing::debug!("cannot look for iptables rules in-process: {e}");
            }
            true
        }
    }
}

/// The lines of our chain, in `iptables-save` form, so they compare verbatim.
fn chain_lines(set: Set, fam: &Fam, random_fully: bool) -> Vec<String> {
    let c = fam.network;
    let s = fam.subnet;
    let ch = set.chain;
    let cm = format!("-m comment --comment \"{}\"", set.comment);
    if set.chain == FWD_CHAIN {
        return vec![
            format!("-A {ch} -s {c} {cm} -j ACCEPT"),
            format!("-A {ch} -d {c} {cm} -j ACCEPT"),
        ];
    }
    let mcast = match c.addr() {
        IpAddr::V4(_) => "224.0.0.0/4",
        IpAddr::V6(_) => "ff00::/8",
    };
    let rf = if random_fully { " --random-fully" } else { "" };
    vec![
        format!("-A {ch} -m mark --mark 0x4000/0x4000 {cm} -j RETURN"),
        format!("-A {ch} -s {s} -d {c} {cm} -j RETURN"),
        format!("-A {ch} -s {c} -d {s} {cm} -j RETURN"),
        format!("-A {ch} ! -s {c} -d {s} {cm} -j RETURN"),
        format!("-A {ch} -s {c} ! -d {mcast} {cm} -j MASQUERADE{rf}"),
        format!("-A {ch} ! -s {c} -d {c} {cm} -j MASQUERADE{rf}"),
    ]
}

fn jump_line(set: Set) -> String {
    format!(
        "-A {} -m comment --comment \"{}\" -j {}",
        set.builtin, set.comment, set.chain
    )
}

/// Whether a rule of another chain belongs to this set: it carries the set's comment (Go
/// flanneld before v0.15 put its rules straight into POSTROUTING) or jumps to our chain.
fn is_ours(set: Set, line: &str) -> bool {
    line.contains(&format!("--comment \"{}\"", set.comment))
        || line.ends_with(&format!(" -j {}", set.chain))
        || line.contains(&format!(" -j {} ", set.chain))
        || line.ends_with(&format!(" -g {}", set.chain))
        || line.contains(&format!(" -g {} ", set.chain))
}

/// Restore input that turns the saved state of one set into `wanted` (`None`: removed).
/// Empty when nothing of the set exists and nothing is wanted.
fn set_batch(saved: &Saved, set: Set, wanted: Option<&[String]>) -> String {
    let table = saved.tables.get(set.table);
    let chain_exists = table.is_some_and(|t| t.chains.iter().any(|c| c == set.chain));
    let ours: Vec<&str> = table
        .map(|t| {
            t.rules
                .iter()
                .filter(|(chain, line)| chain != set.chain && is_ours(set, line))
                .map(|(_, line)| line.as_str())
                .collect()
        })
        .unwrap_or_default();
    let mut out = String::new();
    match wanted {
        Some(lines) => {
            out.push_str(&format!("*{}\n:{} - [0:0]\n", set.table, set.chain));
            let jump = jump_line(set);
            let first_in_builtin =
                table.and_then(|t| t.rules.iter().find(|(c, _)| c == set.builtin));
            let jump_is_first_and_only = ours.len() == 1
                && ours[0] == jump
                && first_in_builtin.is_some_and(|(_, l)| *l == jump);
            if !jump_is_first_and_only {
                for l in &ours {
                    out.push_str(&format!("-D{}\n", &l[2..]));
                }
                out.push_str(&format!(
                    "-I {} 1{}\n",
                    set.builtin,
                    &jump[2 + set.builtin.len() + 1..]
                ));
            }
            for l in lines {
                out.push_str(l);
                out.push('\n');
            }
            out.push_str("COMMIT\n");
        }
        None => {
            if !chain_exists && ours.is_empty() {
                return out;
            }
            out.push_str(&format!("*{}\n", set.table));
            for l in &ours {
                out.push_str(&format!("-D{}\n", &l[2..]));
            }
            if chain_exists {
                out.push_str(&format!("-F {}\n-X {}\n", set.chain, set.chain));
            }
            out.push_str("COMMIT\n");
        }
    }
    out
}

/// Whether anything of either set is in `saved` (our chain, or a rule of ours elsewhere).
fn holds_ours(saved: &Saved) -> bool {
    [MASQ_SET, FWD_SET].into_iter().any(|set| {
        saved.tables.get(set.table).is_some_and(|t| {
            t.chains.iter().any(|c| c == set.chain)
                || t.rules
                    .iter()
                    .any(|(chain, line)| chain != set.chain && is_ours(set, line))
        })
    })
}

/// Whether the first rule of the set's built-in chain is our jump.
fn jump_first(saved: &Saved, set: Set) -> bool {
    saved
        .tables
        .get(set.table)
        .and_then(|t| t.rules.iter().find(|(c, _)| c == set.builtin))
        .is_some_and(|(_, l)| *l == jump_line(set))
}

/// Whether the saved state shows the set as wanted: our chain holds exactly `wanted` and
/// one jump exists (its position is not checked: like upstream, a rule another agent puts
/// first does not start a fight; the next apply puts ours first again).
fn set_in_place(saved: &Saved, set: Set, wanted: Option<&[String]>) -> bool {
    let table = saved.tables.get(set.table);
    let chain_exists = table.is_some_and(|t| t.chains.iter().any(|c| c == set.chain));
    let ours: Vec<&str> = table
        .map(|t| {
            t.rules
                .iter()
                .filter(|(chain, line)| chain != set.chain && is_ours(set, line))
                .map(|(_, l)| l.as_str())
                .collect()
        })
        .unwrap_or_default();
    match wanted {
        None => !chain_exists && ours.is_empty(),
        Some(lines) => {
            let have: Vec<&str> = table
                .map(|t| {
                    t.rules
                        .iter()
                        .filter(|(c, _)| c == set.chain)
                        .map(|(_, l)| l.as_str())
                        .collect()
                })
                .unwrap_or_default();
            chain_exists && have == lines && ours == [jump_line(set).as_str()]
        }
    }
}

/// `iptables-save` output, by table.
#[derive(Debug, Default)]
pub(crate) struct Saved {
    pub(crate) tables: BTreeMap<String, SavedTable>,
}

#[derive(Debug)]
pub(crate) struct SavedTable {
    /// Declared chains (built-in and user), in order.
    pub(crate) chains: Vec<String>,
    /// `(chain, full "-A chain …" line)`, in order.
    pub(crate) rules: Vec<(String, String)>,
    /// Only built-in chains, every policy ACCEPT, no rule: iptables-nft's scaffolding,
    /// a table that filters nothing.
    pub(crate) filters_nothing: bool,
}

impl Default for SavedTable {
    fn default() -> Self {
        SavedTable {
            chains: Vec::new(),
            rules: Vec::new(),
            filters_nothing: true,
        }
    }
}

impl Saved {
    pub(crate) fn parse(text: &str) -> Self {
        let mut saved = Saved::default();
        let mut current: Option<String> = None;
        for line in text.lines() {
            let line = line.trim_end();
            if let Some(name) = line.strip_prefix('*') {
                current = Some(name.to_string());
                saved.tables.entry(name.to_string()).or_default();
                continue;
            }
            let Some(t) = current.as_ref().and_then(|c| saved.tables.get_mut(c)) else {
                continue;
            };
            let trimmed = line.trim();
            // `:CHAIN POLICY [counters]`; user chains have the policy `-`.
            let accept_chain = trimmed
                .strip_prefix(':')
                .is_some_and(|c| c.split_whitespace().nth(1) == Some("ACCEPT"));
            if !(accept_chain
                || trimmed.is_empty()
                || trimmed.starts_with('#')
                || trimmed == "COMMIT")
            {
                t.filters_nothing = false;
            }
            if let Some(decl) = line.strip_prefix(':') {
                if let Some(name) = decl.split_whitespace().next() {
                    t.chains.push(name.to_string());
                }
            } else if let Some(rest) = line.strip_prefix("-A ") {
                if let Some(chain) = rest.split_whitespace().next() {
                    t.rules.push((chain.to_string(), line.to_string()));
                }
            } else if line == "COMMIT" {
                current = None;
            }
        }
        saved
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
