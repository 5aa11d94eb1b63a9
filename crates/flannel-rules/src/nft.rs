//! nftables engine: tables `ip flannel-ipv4` / `ip6 flannel-ipv6`, owned by the agent
//! (docs/compatibility.md, "nftables tables"), each change one `nft -j -f -` transaction.

use std::borrow::Cow;
use std::collections::HashSet;
use std::net::IpAddr;

use ipnet::IpNet;
use nftables::expr::{
    BinaryOperation, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix,
};
use nftables::schema::{Chain, FlushObject, NfCmd, NfListObject, NfObject, Nftables, Rule, Table};
use nftables::stmt::{Match, NATFlag, Operator, Statement, NAT};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde_json::Value;

use super::cmd::Runner;
use super::nfnl::{CommitWatch, NfNetlink, Scope, NFPROTO_IPV4, NFPROTO_IPV6};
use super::{EngineKind, EngineOptions, RuleEngine, RuleSet, RulesError};

pub(crate) const TABLE_V4: &str = "flannel-ipv4";
pub(crate) const TABLE_V6: &str = "flannel-ipv6";
const CHAIN_FORWARD: &str = "forward";
const CHAIN_POSTRTG: &str = "postrtg";
/// `priority filter` / `priority srcnat` as numbers (what nft lists them as in JSON).
const PRIO_FILTER: i32 = 0;
const PRIO_SRCNAT: i32 = 100;
/// Packets kube-proxy marks for masquerade carry this bit; they are left to kube-proxy.
const KUBE_MARK: u32 = 0x4000;

/// Keeps the rules in the agent-owned nftables tables.
pub struct NftEngine {
    runner: Runner,
    opts: EngineOptions,
    nl: NfNetlink,
    /// Tells when an `nft -f` batch is committed.
    commits: Option<CommitWatch>,
    /// Whether masquerade takes `fully-random`: learnt by the first batch that needs it.
    fully_random: Option<bool>,
    applied: Option<RuleSet>,
    baseline: Option<Baseline>,
}

#[derive(Clone, Copy, Debug)]
struct Baseline {
    fingerprint: u64,
    generation: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// Keep table and chains, flush the chains, refill them: no hook churn.
    Flush,
    /// Delete and recreate the table (in the same transaction); used when the existing
    /// chains cannot be updated in place, e.g. created with another hook or priority.
    Rebuild,
}

impl NftEngine {
    /// Opens the nf_tables netlink socket in the target namespace. `nft` itself first runs
    /// when something must change (a missing `nft` is reported then).
    pub fn new(opts: EngineOptions) -> Result<Self, RulesError> {
        let runner = Runner::new(opts.netns.clone());
        let nl = NfNetlink::open(runner.netns())?;
        let commits = CommitWatch::open(runner.netns()).ok();
        Ok(NftEngine {
            runner,
            opts,
            nl,
            commits,
            fully_random: None,
            applied: None,
            baseline: None,
        })
    }

    fn run_batch(&mut self, cmds: Vec<NfObject<'static>>) -> Result<(), RulesError> {
        if cmds.is_empty() {
            return Ok(());
        }
        let doc = Nftables {
            objects: Cow::Owned(cmds),
        };
        let mut json = serde_json::to_value(&doc).map_err(|e| RulesError::Output {
            command: "nft -j -f -".into(),
            detail: format!("serializing the batch: {e}"),
        })?;
        add_table_comments(&mut json);
        // One file is one transaction: one commit.
        self.runner.run_commit(
            "nft",
            &["-j", "-f", "-"],
            &json.to_string(),
            1,
            self.commits.as_mut(),
        )?;
        Ok(())
    }

    /// Write `rules` in one transaction, flushing our chains in place, or, when the
    /// existing chains cannot be updated that way (e.g. created with another hook or
    /// priority), deleting and recreating the tables in the same transaction.
    ///
    /// Masquerade gets `fully-random` when wanted and supported. Support is learnt from
    /// the first batch that needs it instead of a separate probe commit: if the batch with
    /// the flag fails and the same batch without it succeeds, the kernel or `nft` rejects
    /// the flag. A batch commits whole or not at all, so a failed try changes nothing.
    fn write(&mut self, rules: &RuleSet) -> Result<(), RulesError> {
        let needs_flag = self.opts.fully_random
            && rules.ip_masq
            && (rules.ipv4.is_some() || rules.ipv6.is_some());
        let mut tries = vec![(Shape::Flush, needs_flag && self.fully_random != Some(false))];
        let learning = needs_flag && self.fully_random.is_none();
        if learning {
            tries.push((Shape::Flush, false));
        }
        tries.push((Shape::Rebuild, tries[0].1));
        if learning {
            tries.push((Shape::Rebuild, false));
        }
        let mut first_err = None;
        for (shape, fr) in tries {
            match self.run_batch(batch(rules, fr, shape)) {
                Ok(()) => {
                    if learning {
                        self.fully_random = Some(fr);
                        if !fr {
                            tracing::warn!(
                                "nftables masquerade fully-random not supported, using plain masquerade: {}",
                                first_err.as_ref().map(|e: &RulesError| e.to_string()).unwrap_or_default()
                            );
                        }
                    }
                    return Ok(());
                }
                Err(e) => {
                    tracing::debug!("nftables batch ({shape:?}, fully-random {fr}) failed: {e}");
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| RulesError::Output {
            command: "nft -j -f -".into(),
            detail: "no batch was tried".into(),
        }))
    }

    fn scopes(rules: &RuleSet) -> Vec<Scope> {
        let mut s = Vec::new();
        let chains = vec![CHAIN_FORWARD.to_string(), CHAIN_POSTRTG.to_string()];
        if rules.ipv4.is_some() {
            s.push(Scope::Table {
                family: NFPROTO_IPV4,
                table: TABLE_V4.into(),
                chains: chains.clone(),
            });
        }
        if rules.ipv6.is_some() {
            s.push(Scope::Table {
                family: NFPROTO_IPV6,
                table: TABLE_V6.into(),
                chains,
            });
        }
        s
    }
}

impl RuleEngine for NftEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Nftables
    }

    fn apply(&mut self, rules: &RuleSet) -> Result<(), RulesError> {
        self.baseline = None;
        self.applied = None;
        let scopes = Self::scopes(rules);
        let mut last = None;
        for _ in 0..3 {
            let before = self.nl.generation()?;
            self.write(rules)?;
            let (fingerprint, generation) = self.nl.fingerprint(&scopes)?;
            last = Some(Baseline {
                fingerprint,
                generation,
            });
            // Exactly one commit since `before` (ours): the fingerprint shows what we wrote.
            if generation == before.wrapping_add(1) {
                break;
            }
        }
        // Others kept committing in between; our tables are written only by us, so the
        // last fingerprint is still ours in all but the most contrived cases.
        self.baseline = last;
        self.applied = Some(rules.clone());
        Ok(())
    }

    fn check(&mut self, rules: &RuleSet) -> Result<bool, RulesError> {
        if self.applied.as_ref() != Some(rules) {
            return Ok(false);
        }
        let Some(base) = self.baseline else {
            return Ok(false);
        };
        if self.nl.generation()? == base.generation {
            return Ok(true);
        }
        let (fingerprint, generation) = self.nl.fingerprint(&Self::scopes(rules))?;
        if fingerprint != base.fingerprint {
            return Ok(false);
        }
        self.baseline = Some(Baseline {
            fingerprint,
            generation,
        });
        Ok(true)
    }

    fn cleanup(&mut self) -> Result<(), RulesError> {
        self.baseline = None;
        self.applied = None;
        // Only run `nft` when there is something to delete.
        let v4 = self.nl.table_exists(NFPROTO_IPV4, TABLE_V4)?;
        let v6 = self.nl.table_exists(NFPROTO_IPV6, TABLE_V6)?;
        if !v4 && !v6 {
            return Ok(());
        }
        let mut cmds = Vec::new();
        for (fam, name) in [(NfFamily::IP, TABLE_V4), (NfFamily::IP6, TABLE_V6)] {
            // add + delete in one transaction: removes the table whether or not it exists.
            cmds.push(add(NfListObject::Table(table_obj(fam, name))));
            cmds.push(NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(
                table_obj(fam, name),
            ))));
        }
        self.run_batch(cmds)
    }

    fn cheap_check(&self) -> bool {
        true
    }
}

/// The whole transaction for `rules` (both families).
fn batch(rules: &RuleSet, fully_random: bool, shape: Shape) -> Vec<NfObject<'static>> {
    let mut cmds = Vec::new();
    let families = [
        rules.ipv4.map(|f| {
            let (c, s) = (IpNet::V4(f.network), IpNet::V4(f.subnet));
            (NfFamily::IP, TABLE_V4, c, s)
        }),
        rules.ipv6.map(|f| {
            let (c, s) = (IpNet::V6(f.network), IpNet::V6(f.subnet));
            (NfFamily::IP6, TABLE_V6, c, s)
        }),
    ];
    for (fam, table, c, s) in families.into_iter().flatten() {
        family_cmds(&mut cmds, fam, table, c, s, rules, fully_random, shape);
    }
    cmds
}

#[allow(clippy::too_many_arguments)]
fn family_cmds(
    cmds: &mut Vec<NfObject<'static>>,
    fam: NfFamily,
    table: &'static str,
    c: IpNet,
    s: IpNet,
    rules: &RuleSet,
    fully_random: bool,
    shape: Shape,
) {
    cmds.push(add(NfListObject::Table(table_obj(fam, table))));
    if shape == Shape::Rebuild {
        cmds.push(NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(
            table_obj(fam, table),
        ))));
        cmds.push(add(NfListObject::Table(table_obj(fam, table))));
    }
    let fwd_chain = base_chain(
        fam,
        table,
        CHAIN_FORWARD,
        NfChainType::Filter,
        NfHook::Forward,
        PRIO_FILTER,
    );
    let nat_chain = base_chain(
        fam,
        table,
        CHAIN_POSTRTG,
        NfChainType::NAT,
        NfHook::Postrouting,
        PRIO_SRCNAT,
    );

    let forward = rules.forward.then(|| forward_rules(c));
    chain_cmds(cmds, fam, table, CHAIN_FORWARD, fwd_chain, forward);
    let masq = rules.ip_masq.then(|| masq_rules(c, s, fully_random));
    chain_cmds(cmds, fam, table, CHAIN_POSTRTG, nat_chain, masq);
    if !rules.forward && !rules.ip_masq {
        cmds.push(NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(
            table_obj(fam, table),
        ))));
    }
}

/// Declares and flushes `chain` (`name` in `table`), then fills it with `fill`'s
/// rules, or deletes it when there is no `fill`.
fn chain_cmds(
    cmds: &mut Vec<NfObject<'static>>,
    fam: NfFamily,
    table: &'static str,
    name: &'static str,
    chain: Chain<'static>,
    fill: Option<Vec<Vec<Statement<'static>>>>,
) {
    cmds.push(add(NfListObject::Chain(chain.clone())));
    cmds.push(NfObject::CmdObject(NfCmd::Flush(FlushObject::Chain(
        chain.clone(),
    ))));
    match fill {
        Some(rules) => {
            for stmts in rules {
                cmds.push(add(NfListObject::Rule(rule(fam, table, name, stmts))));
            }
        }
        None => cmds.push(NfObject::CmdObject(NfCmd::Delete(NfListObject::Chain(
            chain,
        )))),
    }
}

fn forward_rules(c: IpNet) -> Vec<Vec<Statement<'static>>> {
    vec![
        vec![addr_match("saddr", c, true), Statement::Accept(None)],
        vec![addr_match("daddr", c, true), Statement::Accept(None)],
    ]
}

/// The masquerade chain, with the semantics of the iptables set, which upstream's nft
/// version does not have (docs/compatibility.md, "nftables masquerade uses the iptables
/// rule set"): upstream matches `meta mark 0x4000`
/// exactly (a packet with more mark bits set is masqueraded twice over: by kube-proxy and
/// here) and its rule 4 reads `saddr != S daddr C` instead of `saddr != C daddr S`, which
/// returns all non-cluster traffic to any pod and so makes rule 6 unreachable.
fn masq_rules(c: IpNet, s: IpNet, fully_random: bool) -> Vec<Vec<Statement<'static>>> {
    let multicast: IpNet = match c {
        IpNet::V4(_) => "224.0.0.0/4".parse().unwrap_or(c),
        IpNet::V6(_) => "ff00::/8".parse().unwrap_or(c),
    };
    vec![
        vec![mark_match(), Statement::Return(None)],
        vec![
            addr_match("saddr", s, true),
            addr_match("daddr", c, true),
            Statement::Return(None),
        ],
        vec![
            addr_match("saddr", c, true),
            addr_match("daddr", s, true),
            Statement::Return(None),
        ],
        vec![
            addr_match("saddr", c, false),
            addr_match("daddr", s, true),
            Statement::Return(None),
        ],
        vec![
            addr_match("saddr", c, true),
            addr_match("daddr", multicast, false),
            masquerade(fully_random),
        ],
        vec![
            addr_match("saddr", c, false),
            addr_match("daddr", c, true),
            masquerade(fully_random),
        ],
    ]
}

fn mark_match() -> Statement<'static> {
    Statement::Match(Match {
        left: Expression::BinaryOperation(Box::new(BinaryOperation::AND(
            Expression::Named(NamedExpression::Meta(Meta { key: MetaKey::Mark })),
            Expression::Number(KUBE_MARK),
        ))),
        right: Expression::Number(KUBE_MARK),
        op: Operator::EQ,
    })
}

fn addr_match(field: &'static str, net: IpNet, equal: bool) -> Statement<'static> {
    let (proto, addr) = match net.addr() {
        IpAddr::V4(a) => ("ip", a.to_string()),
        IpAddr::V6(a) => ("ip6", a.to_string()),
    };
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::Payload(Payload::PayloadField(
            PayloadField {
                protocol: proto.into(),
                field: field.into(),
            },
        ))),
        right: Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(Expression::String(addr.into())),
            len: u32::from(net.prefix_len()),
        })),
        op: if equal { Operator::EQ } else { Operator::NEQ },
    })
}

fn masquerade(fully_random: bool) -> Statement<'static> {
    Statement::Masquerade(fully_random.then(|| NAT {
        addr: None,
        family: None,
        port: None,
        flags: Some(HashSet::from([NATFlag::FullyRandom])),
    }))
}

fn add(o: NfListObject<'static>) -> NfObject<'static> {
    NfObject::CmdObject(NfCmd::Add(o))
}

fn table_obj(family: NfFamily, name: &'static str) -> Table<'static> {
    Table {
        family,
        name: name.into(),
        handle: None,
    }
}

fn base_chain(
    family: NfFamily,
    table: &'static str,
    name: &'static str,
    ty: NfChainType,
    hook: NfHook,
    prio: i32,
) -> Chain<'static> {
    Chain {
        family,
        table: table.into(),
        name: name.into(),
        _type: Some(ty),
        hook: Some(hook),
        prio: Some(prio),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    }
}

fn rule(
    family: NfFamily,
    table: &'static str,
    chain: &'static str,
    expr: Vec<Statement<'static>>,
) -> Rule<'static> {
    Rule {
        family,
        table: table.into(),
        chain: chain.into(),
        expr: Cow::Owned(expr),
        handle: None,
        index: None,
        comment: None,
    }
}

/// Upstream's tables carry the comment `rules for <name>`; the nftables crate's `Table`
/// has no comment field, so it is added to the JSON (nft versions without table comments
/// in JSON ignore the key).
fn add_table_comments(doc: &mut Value) {
    let Some(items) = doc.get_mut("nftables").and_then(Value::as_array_mut) else {
        return;
    };
    for item in items {
        let Some(t) = item.get_mut("add").and_then(|a| a.get_mut("table")) else {
            continue;
        };
        let Some(obj) = t.as_object_mut() else {
            continue;
        };
        if let Some(name) = obj.get("name").and_then(Value::as_str).map(str::to_string) {
            obj.insert("comment".into(), Value::String(format!("rules for {name}")));
        }
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn batch_json_has_the_expected_shape() {
        let rs = RuleSet::new(true, true).with_ipv4(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.1.0/24".parse().unwrap(),
        );
        let doc = Nftables {
            objects: Cow::Owned(batch(&rs, true, Shape::Flush)),
        };
        let mut v = serde_json::to_value(&doc).unwrap();
        add_table_comments(&mut v);
        let s = v.to_string();
        assert!(s.contains(r#""comment":"rules for flannel-ipv4""#), "{s}");
        assert!(
            s.contains(r#"{"&":[{"meta":{"key":"mark"}},16384]}"#),
            "{s}"
        );
        assert!(s.contains(r#""flags":["fully-random"]"#), "{s}");
        // No IPv6 table is touched for an IPv4-only set.
        assert!(!s.contains("flannel-ipv6"), "{s}");
        let rules: Vec<_> = v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|o| o.get("add").and_then(|a| a.get("rule")).is_some())
            .collect();
        assert_eq!(rules.len(), 8);
    }

    #[test]
    fn disabled_sets_delete_their_chains() {
        let rs = RuleSet::new(false, true).with_ipv4(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.1.0/24".parse().unwrap(),
        );
        let v = serde_json::to_value(Nftables {
            objects: Cow::Owned(batch(&rs, true, Shape::Flush)),
        })
        .unwrap();
        let s = v.to_string();
        assert!(
            s.contains(
                r#"{"delete":{"chain":{"family":"ip","table":"flannel-ipv4","name":"postrtg""#
            ),
            "{s}"
        );
        assert!(!s.contains("masquerade"), "{s}");
    }
}
