//! The text of our rule sets and the `iptables-restore` batches that put them in
//! place (or take them out) over what `iptables-save` shows.

use super::saved::SavedTable;
use super::*;

/// The lines of our chain, in `iptables-save` form, so they compare verbatim.
pub(super) fn chain_lines(set: Set, fam: &Fam, random_fully: bool) -> Vec<String> {
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

pub(super) fn jump_line(set: Set) -> String {
    format!(
        "-A {} -m comment --comment \"{}\" -j {}",
        set.builtin, set.comment, set.chain
    )
}

/// Whether a rule of another chain belongs to this set: it carries the set's comment (Go
/// flanneld before v0.15 put its rules straight into POSTROUTING) or jumps to our chain.
pub(super) fn is_ours(set: Set, line: &str) -> bool {
    line.contains(&format!("--comment \"{}\"", set.comment))
        || line.ends_with(&format!(" -j {}", set.chain))
        || line.contains(&format!(" -j {} ", set.chain))
        || line.ends_with(&format!(" -g {}", set.chain))
        || line.contains(&format!(" -g {} ", set.chain))
}

/// What the saved state holds of one set: its table, whether our chain is declared,
/// and the rules of other chains that belong to the set ([`is_ours`]), in order.
fn found(saved: &Saved, set: Set) -> (Option<&SavedTable>, bool, Vec<&str>) {
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
    (table, chain_exists, ours)
}

/// Restore input that turns the saved state of one set into `wanted` (`None`: removed).
/// Empty when nothing of the set exists and nothing is wanted.
pub(super) fn set_batch(saved: &Saved, set: Set, wanted: Option<&[String]>) -> String {
    let (table, chain_exists, ours) = found(saved, set);
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
pub(super) fn holds_ours(saved: &Saved) -> bool {
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
pub(super) fn jump_first(saved: &Saved, set: Set) -> bool {
    saved
        .tables
        .get(set.table)
        .and_then(|t| t.rules.iter().find(|(c, _)| c == set.builtin))
        .is_some_and(|(_, l)| *l == jump_line(set))
}

/// Whether the saved state shows the set as wanted: our chain holds exactly `wanted` and
/// one jump exists (its position is not checked: like upstream, a rule another agent puts
/// first does not start a fight; the next apply puts ours first again).
pub(super) fn set_in_place(saved: &Saved, set: Set, wanted: Option<&[String]>) -> bool {
    let (table, chain_exists, ours) = found(saved, set);
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
