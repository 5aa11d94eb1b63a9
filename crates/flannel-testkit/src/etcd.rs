//! A real etcd process on 127.0.0.1 for tests, and a TCP proxy that can cut it off.
//!
//! ```ignore
//! let Some(etcd) = EtcdServer::start_or_skip().await else { return };
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::gate::{require_file, skip_or_fail, this_test};

/// Environment variable naming the etcd binary (default `/usr/bin/etcd`).
pub const ETCD_BIN_ENV: &str = "FLANNEL_ETCD_BIN";

/// How long a freshly started etcd may take to report itself healthy.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The etcd binary to run, if there is one.
pub fn etcd_binary() -> Option<PathBuf> {
    let p = std::env::var_os(ETCD_BIN_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"));
    p.is_file().then_some(p)
}

/// Whether an etcd test can run (see [`skip_or_fail`] for what happens if not).
pub fn require_etcd() -> bool {
    etcd_binary().is_some()
        || skip_or_fail(
            &this_test(),
            format!(
                "etcd not found (looked at ${ETCD_BIN_ENV} or /usr/bin/etcd; \
                 Debian package etcd-server)"
            ),
        )
}

/// Client-side TLS files of a TLS test server (PEM).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA that signed the server's and the client's certificates.
    pub ca: PathBuf,
    /// A client certificate etcd accepts, and its key.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A single-member etcd on 127.0.0.1 with its own ports and data directory,
/// killed (by PID) when dropped.
pub struct EtcdServer {
    bin: PathBuf,
    /// `--name`, and the `--initial-cluster` it was started with (members of a
    /// [`EtcdCluster`] list each other; a single member lists itself).
    name: String,
    initial_cluster: Option<String>,
    dir: tempfile::TempDir,
    data_dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    /// Plain-HTTP `/health` and `/metrics`, also when clients must use TLS.
    metrics_port: u16,
    tls: Option<TlsFiles>,
    child: Option<Child>,
}

impl std::fmt::Debug for EtcdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdServer")
            .field("endpoint", &self.endpoint())
            .field("pid", &self.pid())
            .finish()
    }
}

/// Three ports that were free a moment ago (the kernel picks them).
fn free_ports() -> io::Result<[u16; 3]> {
    let a = std::net::TcpListener::bind("127.0.0.1:0")?;
    let b = std::net::TcpListener::bind("127.0.0.1:0")?;
    let c = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok([
        a.local_addr()?.port(),
        b.local_addr()?.port(),
        c.local_addr()?.port(),
    ])
}

fn openssl(dir: &Path, args: &[&str]) -> io::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// A throw-away CA with a server certificate for 127.0.0.1 and a client
/// certificate, made with the openssl command (EC P-256, valid one day).
fn make_certs(dir: &Path) -> io::Result<()> {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=flannel-test-ca",
    ]);
    openssl(dir, &ca)?;
    for (name, usage) in [
        ("server", "serverAuth,clientAuth"),
        ("client", "clientAuth"),
    ] {
        let mut req = vec!["req"];
        req.extend(ec);
        let (key, csr, crt, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        let subj = format!("/CN=flannel-test-{name}");
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &req)?;
        std::fs::write(
            dir.join(&ext),
            format!("subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n"),
        )?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "1",
                "-extfile",
                &ext,
            ],
        )?;
    }
    Ok(())
}

impl EtcdServer {
    /// Starts etcd and waits until it reports itself healthy.
    pub async fn start() -> io::Result<Self> {
        Self::start_with(false).await
    }

    /// Starts etcd serving clients over TLS only, requiring a client certificate
    /// signed by its CA ([`tls_files`](Self::tls_files)). Needs the openssl command.
    pub async fn start_tls() -> io::Result<Self> {
        Self::start_with(true).await
    }

    async fn start_with(tls: bool) -> io::Result<Self> {
        let bin = etcd_binary()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "etcd binary not found"))?;
        let dir = tempfile::Builder::new().prefix("flannel-etcd-").tempdir()?;
        let tls = if tls {
            let certs = dir.path().join("certs");
            std::fs::create_dir(&certs)?;
            make_certs(&certs)?;
            Some(TlsFiles {
                ca: certs.join("ca.crt"),
                cert: certs.join("client.crt"),
                key: certs.join("client.key"),
            })
        } else {
            None
        };
        let mut server = EtcdServer {
            bin,
            name: "flannel-test".into(),
            initial_cluster: None,
            data_dir: dir.path().join("data"),
            dir,
            client_port: 0,
            peer_port: 0,
            metrics_port: 0,
            tls,
            child: None,
        };
        // Another process may grab a probed port before etcd binds it: try again
        // with new ports (and a fresh data dir, which remembers its peer URL).
        let mut last = None;
        for attempt in 0..5 {
            [server.client_port, server.peer_port, server.metrics_port] = free_ports()?;
            server.data_dir = server.dir.path().join(format!("data-{attempt}"));
            match server.launch().await {
                Ok(()) => return Ok(server),
                Err(e) => {
                    server.stop();
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("etcd did not start")))
    }

    /// [`require_etcd`] then [`start`](Self::start): `None` means "skip this test".
    /// Panics when etcd exists but does not start.
    pub async fn start_or_skip() -> Option<Self> {
        if !require_etcd() {
            return None;
        }
        match Self::start().await {
            Ok(s) => Some(s),
            Err(e) => panic!("could not start etcd: {e}"),
        }
    }

    /// [`start_tls`](Self::start_tls) after checking for etcd and openssl.
    pub async fn start_tls_or_skip() -> Option<Self> {
        if !require_etcd() || !require_file("/usr/bin/openssl", "openssl") {
            return None;
        }
        match Self::start_tls().await {
            Ok(s) => Some(s),
            Err(e) => panic!("could not start etcd with TLS: {e}"),
        }
    }

    /// Client URL, e.g. `http://127.0.0.1:40123` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The client's TLS files of a [`start_tls`](Self::start_tls) server.
    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// The etcd process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Where etcd writes its log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn log_tail(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(self.log_path()) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(4000)));
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    fn spawn(&mut self) -> io::Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let name = &self.name;
        let initial = self
            .initial_cluster
            .clone()
            .unwrap_or_else(|| format!("{name}={}", self.peer_url()));
        let mut cmd = Command::new(&self.bin);
        // An ETCD_* variable in the test environment would silently change etcd's
        // configuration.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(k);
            }
        }
        cmd.arg("--name")
            .arg(name)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen-client-urls")
            .arg(self.endpoint())
            .arg("--advertise-client-urls")
            .arg(self.endpoint())
            .arg("--listen-peer-urls")
            .arg(self.peer_url())
            .arg("--initial-advertise-peer-urls")
            .arg(self.peer_url())
            .arg("--initial-cluster")
            .arg(initial)
            .arg("--listen-metrics-urls")
            .arg(format!("http://127.0.0.1:{}", self.metrics_port))
            .args(["--initial-cluster-state", "new"])
            // Tests write thousands of keys in one transaction.
            .args(["--max-txn-ops", "10000", "--snapshot-count", "10000"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        if let Some(tls) = &self.tls {
            let certs = tls.ca.parent().unwrap_or(Path::new("."));
            cmd.arg("--cert-file")
                .arg(certs.join("server.crt"))
                .arg("--key-file")
                .arg(certs.join("server.key"))
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        self.child = Some(cmd.spawn()?);
        Ok(())
    }

    async fn launch(&mut self) -> io::Result<()> {
        self.spawn()?;
        self.wait_healthy().await
    }

    /// Waits until the running member is healthy (it has a leader).
    async fn wait_healthy(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    return Err(io::Error::other(format!(
                        "etcd exited during start ({status}); log:\n{}",
                        self.log_tail()
                    )));
                }
            }
            if self.healthy().await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "etcd not healthy after {} s; log:\n{}",
                    START_TIMEOUT.as_secs(),
                    self.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether etcd answers `/health` with `"health":"true"` (it has a leader).
    pub async fn healthy(&self) -> bool {
        let probe = async {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).await?;
            s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                .await?;
            let mut body = Vec::new();
            s.read_to_end(&mut body).await?;
            io::Result::Ok(String::from_utf8_lossy(&body).contains("\"health\":\"true\""))
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(2), probe).await,
            Ok(Ok(true))
        )
    }

    /// Kills etcd (SIGKILL, by PID) and reaps it; the data directory stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data directory (after [`stop`](Self::stop)).
    pub async fn start_again(&mut self) -> io::Result<()> {
        self.stop();
        let mut last = None;
        // The old process's ports can take a moment to be bindable again.
        for _ in 0..10 {
            match self.launch().await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    self.stop();
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("etcd did not restart")))
    }

    /// A plain client for this server (to play "another writer" in tests).
    pub async fn client(&self) -> Result<etcd_client::Client, etcd_client::Error> {
        let opts = match &self.tls {
            None => None,
            Some(t) => {
                let read = |p: &Path| {
                    std::fs::read(p).map_err(|e| {
                        etcd_client::Error::InvalidArgs(format!("{}: {e}", p.display()))
                    })
                };
                let tls = etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(read(&t.ca)?))
                    .identity(etcd_client::Identity::from_pem(
                        read(&t.cert)?,
                        read(&t.key)?,
                    ));
                Some(etcd_client::ConnectOptions::new().with_tls(tls))
            }
        };
        etcd_client::Client::connect([self.endpoint()], opts).await
    }

    /// The store's current revision.
    pub async fn revision(&self) -> Result<i64, etcd_client::Error> {
        let resp = self.client().await?.get("/", None).await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    /// Compacts the history up to `revision` (physically, so watches from older
    /// revisions fail at once).
    pub async fn compact(&self, revision: i64) -> Result<(), etcd_client::Error> {
        let opts = etcd_client::CompactionOptions::new().with_physical();
        self.client().await?.compact(revision, Some(opts)).await?;
        Ok(())
    }

    /// The data directory of the running member.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
}

/// A real etcd cluster of `n` members on 127.0.0.1, each an [`EtcdServer`] that a
/// test can stop and start again; all are killed when dropped.
pub struct EtcdCluster {
    members: Vec<EtcdServer>,
}

impl EtcdCluster {
    /// Starts `n` members that form one cluster and waits until all are healthy.
    pub async fn start(n: usize) -> io::Result<Self> {
        let bin = etcd_binary()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "etcd binary not found"))?;
        let mut last = None;
        // As for one member: a probed port may be taken before etcd binds it.
        for attempt in 0..5 {
            let mut members = Vec::with_capacity(n);
            for i in 0..n {
                let dir = tempfile::Builder::new().prefix("flannel-etcd-").tempdir()?;
                let [client_port, peer_port, metrics_port] = free_ports()?;
                members.push(EtcdServer {
                    bin: bin.clone(),
                    name: format!("m{}", i + 1),
                    initial_cluster: None,
                    data_dir: dir.path().join(format!("data-{attempt}")),
                    dir,
                    client_port,
                    peer_port,
                    metrics_port,
                    tls: None,
                    child: None,
                });
            }
            let initial: Vec<String> = members
                .iter()
                .map(|m| format!("{}={}", m.name, m.peer_url()))
                .collect();
            let mut cluster = EtcdCluster { members };
            let started = async {
                for m in &mut cluster.members {
                    m.initial_cluster = Some(initial.join(","));
                    m.spawn()?;
                }
                // Health needs a leader, so only once every member runs.
                for m in &mut cluster.members {
                    m.wait_healthy().await?;
                }
                io::Result::Ok(())
            };
            match started.await {
                Ok(()) => return Ok(cluster),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("etcd cluster did not start")))
    }

    /// [`require_etcd`] then [`start`](Self::start): `None` means "skip this test".
    pub async fn start_or_skip(n: usize) -> Option<Self> {
        if !require_etcd() {
            return None;
        }
        match Self::start(n).await {
            Ok(c) => Some(c),
            Err(e) => panic!("could not start an etcd cluster of {n}: {e}"),
        }
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdServer::endpoint).collect()
    }

    pub fn member(&self, i: usize) -> &EtcdServer {
        &self.members[i]
    }

    /// A member to stop ([`EtcdServer::stop`]) and start again
    /// ([`EtcdServer::start_again`]: it rejoins from its data directory).
    pub fn member_mut(&mut self, i: usize) -> &mut EtcdServer {
        &mut self.members[i]
    }

    /// A client for all members (to play "another writer").
    pub async fn client(&self) -> Result<etcd_client::Client, etcd_client::Error> {
        etcd_client::Client::connect(self.endpoints(), None).await
    }

    /// The index of the leader, as the first running member that knows one says.
    pub async fn leader(&self) -> Option<usize> {
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            let Ok(mut c) = m.client().await else {
                continue;
            };
            let Ok(status) = c.status().await else {
                continue;
            };
            let leader = status.leader();
            if leader == 0 {
                continue;
            }
            for (i, other) in self.members.iter().enumerate() {
                let Ok(mut oc) = other.client().await else {
                    continue;
                };
                if let Ok(s) = oc.status().await {
                    if s.header().map(|h| h.member_id()) == Some(leader) {
                        return Some(i);
                    }
                }
            }
        }
        None
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP forwarder on 127.0.0.1 that a test can cut: while blocked it drops every
/// open connection and every new one, like an etcd that became unreachable while
/// its data lives on (to break watches without stopping etcd).
pub struct TcpProxy {
    port: u16,
    blocked: Arc<tokio::sync::watch::Sender<bool>>,
    accept: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Forwards a fresh 127.0.0.1 port to `target` (e.g. an [`EtcdServer`]'s port).
    pub async fn start(target: std::net::SocketAddr) -> io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let blocked = Arc::new(tokio::sync::watch::channel(false).0);
        let flag = blocked.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if *flag.borrow() {
                    continue;
                }
                let mut cut = flag.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.wait_for(|b| *b) => {}
                    }
                });
            }
        });
        Ok(TcpProxy {
            port,
            blocked,
            accept,
        })
    }

    /// A proxy in front of `etcd`'s client port.
    pub async fn for_etcd(etcd: &EtcdServer) -> io::Result<Self> {
        Self::start(([127, 0, 0, 1], etcd.client_port).into()).await
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Cuts every connection and refuses new ones until [`unblock`](Self::unblock).
    pub fn block(&self) {
        self.blocked.send_replace(true);
    }

    pub fn unblock(&self) {
        self.blocked.send_replace(false);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.blocked.send_replace(true);
        self.accept.abort();
    }
}
