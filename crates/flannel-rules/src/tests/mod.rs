//! Kernel tests for both rule engines, one module per subject. Every rule goes into a network namespace the test
//! creates (named `fl-<pid>-<n>-<tag>`, removed on drop, also on panic); nothing touches
//! the root namespace.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flannel_testkit::TestNetns;

use crate::resync::tick;

use super::*;

/// Whether the test can run: root and `tools` (flannel_testkit's gate).
fn require(tools: &[&str]) -> bool {
    flannel_testkit::require(&flannel_testkit::gate::this_test(), tools)
}

use flannel_testkit::tool_exists;

/// A throw-away network namespace (removed on drop, also on panic).
struct Ns {
    name: String,
    _netns: TestNetns,
}

impl Ns {
    fn new(tag: &str) -> Ns {
        let netns = TestNetns::new(tag).expect("create a test namespace");
        Ns {
            name: netns.name().to_string(),
            _netns: netns,
        }
    }

    /// Run a command line (split on whitespace; no quoting) inside the namespace.
    fn sh(&self, line: &str) -> String {
        let args: Vec<&str> = line.split_whitespace().collect();
        self.run(&args, None)
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> String {
        Runner::new(Some(self.name.clone()))
            .run(args[0], &args[1..], stdin)
            .unwrap_or_else(|e| panic!("in {}: {e}", self.name))
    }

    fn opts(&self) -> EngineOptions {
        EngineOptions {
            netns: Some(self.name.clone()),
            ..EngineOptions::default()
        }
    }

    fn ipt_opts(&self, variant: IptablesVariant) -> EngineOptions {
        EngineOptions {
            iptables_variant: variant,
            ..self.opts()
        }
    }
}

use crate::cmd::Runner;

fn rules_v4() -> RuleSet {
    RuleSet::new(true, true).with_ipv4(
        "10.244.0.0/16".parse().unwrap(),
        "10.244.1.0/24".parse().unwrap(),
    )
}

fn rules_dual() -> RuleSet {
    rules_v4().with_ipv6(
        "2001:cafe:42::/56".parse().unwrap(),
        "2001:cafe:42:1::/64".parse().unwrap(),
    )
}

/// Non-empty, trimmed lines.
fn lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

mod engines;
mod iptables;
mod masquerade;
mod measure;
mod nft;
mod startup;

// What more than one subject module uses.
use iptables::{ipt_expected_v4, save_rules};
use nft::{nft_table, NFT_V4};
