//! A standalone udp data-path node: the agent's udp backend without the lease
//! store, peers given on the command line. Used by the kernel tests (restart with
//! `kill -9`) and the benchmark, and handy for debugging a data path by hand.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use ipnet::Ipv4Net;

use crate::{netconf, Config, DataPath, Mode, Peer};

#[derive(Parser, Debug)]
#[command(
    name = "flannel-udp-node",
    about = "Run flannel's udp data path with static peers"
)]
pub struct Args {
    /// TUN device name.
    #[arg(long, default_value = "flannel0")]
    pub tun: String,
    /// Local address and port: `<iface addr>:<Port>`.
    #[arg(long)]
    pub bind: Option<SocketAddrV4>,
    /// The device address (own subnet IP).
    #[arg(long)]
    pub addr: Option<Ipv4Addr>,
    /// The whole flannel network (routed to the device).
    #[arg(long, default_value = "10.244.0.0/16")]
    pub network: Ipv4Net,
    #[arg(long, default_value_t = 1472)]
    pub mtu: u32,
    /// offload | plain
    #[arg(long, default_value = "offload")]
    pub mode: String,
    /// TUN queues (0 = one per CPU).
    #[arg(long, default_value_t = 0)]
    pub queues: usize,
    /// Keep the device across restarts.
    #[arg(long)]
    pub persist: bool,
    /// Hand the fds to a keeper process (implies --persist).
    #[arg(long)]
    pub keeper: bool,
    /// A peer: `<subnet>=<public ip>`, repeatable.
    #[arg(long = "peer")]
    pub peers: Vec<String>,
    /// Write the counters (name value lines) to this file every 100 ms.
    #[arg(long)]
    pub stats: Option<PathBuf>,
    /// Remove the device and its keeper, then exit.
    #[arg(long)]
    pub cleanup: bool,
}

fn parse_peer(s: &str) -> anyhow::Result<Peer> {
    let (net, ip) = s
        .split_once('=')
        .with_context(|| format!("peer {s:?}: want <subnet>=<public ip>"))?;
    Ok(Peer {
        subnet: net
            .parse()
            .with_context(|| format!("peer subnet {net:?}"))?,
        public_ip: ip.parse().with_context(|| format!("peer address {ip:?}"))?,
    })
}

/// Runs the node until SIGTERM/SIGINT.
pub fn run(args: Args) -> anyhow::Result<()> {
    if args.cleanup {
        let removed = crate::remove_device(&args.tun)?;
        println!(
            "cleanup {}: {}",
            args.tun,
            if removed { "removed" } else { "nothing" }
        );
        return Ok(());
    }
    let (Some(bind), Some(addr)) = (args.bind, args.addr) else {
        bail!("--bind and --addr are required");
    };
    let mode = match args.mode.as_str() {
        "offload" => Mode::Offload,
        "plain" => Mode::Plain,
        m => bail!("unknown mode {m:?}"),
    };
    let peers = args
        .peers
        .iter()
        .map(|p| parse_peer(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cfg = Config {
        tun_name: args.tun.clone(),
        bind,
        tun_addr: addr,
        mode,
        queues: args.queues,
        persist: args.persist || args.keeper,
        keeper: args.keeper,
    };
    let mut dp = DataPath::open(&cfg)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let nl = flannel_net::Netlink::connect().await?;
        netconf::configure(
            &nl,
            dp.name(),
            addr,
            args.mtu,
            args.network,
            flannel_net::netlink::RTPROT_BOOT,
        )
        .await?;
        anyhow::Ok(())
    })?;
    dp.set_peers(peers);
    dp.start()?;
    let f = dp.features();
    println!(
        "ready pid={} device={} queues={} vnet_hdr={} tun_offload={:#x} udp_gso={} udp_gro={} inherited={} keeper={}",
        std::process::id(),
        dp.name(),
        f.queues,
        f.vnet_hdr,
        f.tun_offload,
        f.udp_gso,
        f.udp_gro,
        f.inherited,
        f.keeper_pid.unwrap_or(0)
    );
    let counters = dp.counters();
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
                _ = tick.tick() => {
                    if let Some(p) = &args.stats {
                        let text: String = counters
                            .values()
                            .pairs()
                            .iter()
                            .map(|(k, v)| format!("{k} {v}\n"))
                            .collect();
                        let tmp = p.with_extension("tmp");
                        if std::fs::write(&tmp, text).is_ok() {
                            let _ = std::fs::rename(&tmp, p);
                        }
                    }
                }
            }
        }
        anyhow::Ok(())
    })?;
    dp.stop();
    Ok(())
}
