//! flanneld: the flannel-rs agent.

#![forbid(unsafe_code)]

mod agent;
mod backends;
mod blackhole;
mod cleanup;
mod host_checks;
mod http;
mod iface_select;
mod metrics;
mod options;
mod stores;
mod subnet_file;
mod traffic_rules;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use options::Options;

fn main() -> ExitCode {
    // The udp backend's fd keeper is this binary re-executed; it must take over before
    // anything else runs (it returns at once in a normal start).
    flannel_backend::udp::keeper_entry();
    // Before the first large buffer: see flannel_net::mem::pin_mmap_threshold.
    flannel_net::mem::pin_mmap_threshold();
    let opts = match Options::parse_go_style(std::env::args_os()) {
        Ok(o) => o,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if opts.version {
        eprintln!("{}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    init_logging(opts.verbosity);
    info!(options = ?RedactedOptions(&opts), "flanneld {} starting", env!("CARGO_PKG_VERSION"));

    // One thread is plenty for the control plane (hot data paths run on their own
    // threads) and keeps the agent's memory small.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(opts)) {
        Ok(exit) => {
            info!(?exit, "exiting");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(opts: Options) -> anyhow::Result<agent::Exit> {
    if opts.cleanup {
        cleanup::run(&opts).await?;
        return Ok(agent::Exit::Signal);
    }
    let cancel = CancellationToken::new();
    watch_signals(cancel.clone())?;
    let store = stores::open(&opts).await?;
    let readiness = Arc::new(http::Readiness::new());
    let metrics = Arc::new(metrics::Metrics::new());
    let health = if opts.healthz_port > 0 {
        let addr = SocketAddr::new(opts.healthz_ip, opts.healthz_port);
        let (r, m, stop) = (readiness.clone(), metrics.clone(), cancel.clone());
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("healthz listener on {addr}: {e}"))?;
        info!(%addr, "serving /healthz, /readyz and /metrics");
        Some(tokio::spawn(async move {
            // Upstream gives the health server a short grace period at shutdown.
            let shutdown = async move {
                stop.cancelled().await;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            };
            if let Err(e) = http::serve_listener(listener, r, m, shutdown).await {
                error!(error = %e, "health server failed");
            }
        }))
    } else {
        None
    };
    let exit = agent::Agent {
        opts,
        store,
        cancel: cancel.clone(),
        readiness,
        metrics,
    }
    .run()
    .await;
    cancel.cancel();
    if let Some(h) = health {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), h).await;
    }
    exit
}

/// First SIGTERM/SIGINT: stop cleanly (exit 0, state left for a hitless restart).
/// A second one: exit at once.
fn watch_signals(cancel: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        for n in 0.. {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            if n == 0 {
                info!("signal received, shutting down (send another to exit at once)");
                cancel.cancel();
            } else {
                std::process::exit(0);
            }
        }
    });
    Ok(())
}

fn init_logging(verbosity: u8) {
    use tracing_subscriber::EnvFilter;
    let level = match verbosity {
        0..=3 => "info",
        4..=5 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

/// The options as logged at start, without the etcd password.
struct RedactedOptions<'a>(&'a Options);

impl std::fmt::Debug for RedactedOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let mut o = self.0.clone();
        if !o.etcd_password.is_empty() {
            o.etcd_password = "<redacted>".into();
        }
        write!(f, "{o:?}")
    }
}

/// Tells systemd (Type=notify) that we are up; a no-op without NOTIFY_SOCKET.
pub(crate) fn sd_notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|addr| sock.send_to_addr(b"READY=1", &addr))
    } else {
        sock.send_to(b"READY=1", std::path::Path::new(&path))
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}
