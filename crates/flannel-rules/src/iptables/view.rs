//! Looking at the kernel's rules without forking: which backend the iptables
//! binaries write to, and our chains as nf_tables netlink shows them.

use super::*;

/// The multi-call binary `name` (searched in PATH like the tools are run) resolves to.
/// `xtables-nft-multi` / `xtables-legacy-multi` exist since iptables 1.8.0, so either
/// also means `--wait` and `--random-fully` are supported. `None`: not known this way.
pub(super) fn backend_from_binary(name: &str) -> Option<Backend> {
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
pub(super) enum Seen {
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
pub(super) fn nft_view(nl: &mut NfNetlink, v6: bool) -> Result<Option<Saved>, RulesError> {
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
