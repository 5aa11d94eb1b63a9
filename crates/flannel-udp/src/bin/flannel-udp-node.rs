//! Standalone udp data-path node (see `flannel_udp::node`).

use clap::Parser;

fn main() -> anyhow::Result<()> {
    // Must come first: a keeper process is this binary re-executed.
    flannel_udp::keeper::run_if_requested();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    flannel_udp::node::run(flannel_udp::node::Args::parse())
}
