//! `iptables-save` output, parsed by table.

use std::collections::BTreeMap;

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
