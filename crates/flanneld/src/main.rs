//! flanneld: the flannel-rs agent.

mod agent;
mod backends;
mod iface_select;
mod options;
mod stores;
mod subnet_file;

use std::process::ExitCode;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use options::Options;

fn main() -> ExitCode {
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

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
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
    let cancel = CancellationToken::new();
    watch_signals(cancel.clone())?;
    let store = stores::open(&opts).await?;
    agent::Agent::new(opts, store, cancel).run().await
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
