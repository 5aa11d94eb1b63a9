//! `flannel-kube-fake`: the fake Kubernetes API server as a standalone process, for
//! tests that run flanneld as a separate program (e.g. in a network namespace).

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use flannel_kube_fake::{FakeApiServer, FakeOptions};

/// A fake Kubernetes API server (nodes, pods) for flannel tests.
#[derive(Parser, Debug)]
#[command(name = "flannel-kube-fake", version)]
struct Args {
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// JSON file `{"nodes":[...],"pods":[...]}` loaded at start and saved after each write.
    #[arg(long)]
    state: Option<PathBuf>,
    /// Seconds between watch bookmarks.
    #[arg(long, default_value_t = 60)]
    bookmark_interval: u64,
    /// Watch events kept for resuming watches.
    #[arg(long, default_value_t = 1000)]
    history: usize,
    /// Start with this many nodes of a flannel cluster (realistic Node objects, pod
    /// CIDRs 10.1.0.0/24..., annotated as flanneld annotates them), for scale tests.
    #[arg(long, default_value_t = 0)]
    nodes: usize,
    /// Name prefix of the `--nodes` nodes (numbered 00000...).
    #[arg(long, default_value = "node-")]
    node_prefix: String,
    /// Annotation prefix of the `--nodes` nodes' flannel annotations.
    #[arg(long, default_value = "flannel.alpha.coreos.com")]
    annotation_prefix: String,
    /// Rewrite every node's status (kubelet heartbeats) once per this many seconds,
    /// spread evenly; 0 = never.
    #[arg(long, default_value_t = 0)]
    status_churn_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let opts = FakeOptions {
        bookmark_interval: Duration::from_secs(args.bookmark_interval.max(1)),
        history: args.history,
        state_file: args.state,
        ..FakeOptions::default()
    };
    let server = FakeApiServer::start(args.listen, opts)
        .await
        .context("starting the fake API server")?;
    server
        .populate(args.nodes, &args.node_prefix, &args.annotation_prefix)
        .context("creating the --nodes nodes")?;
    let _churn = (args.status_churn_secs > 0)
        .then(|| server.start_status_churn(Duration::from_secs(args.status_churn_secs)));
    // The first stdout line is the URL; tests read it to learn the port.
    println!("{}", server.url());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    server.shutdown().await;
    Ok(())
}
