//! Commands inside the lab's namespaces: ip, ping, iperf3, monitors.

use super::*;

impl Lab {
    /// `ip netns exec <ns> <args...>`; returns the output whatever the status.
    pub fn exec_in(&self, ns: &str, args: &[&str]) -> Result<std::process::Output> {
        let mut cmd = command("ip", &["netns", "exec", ns]);
        cmd.args(args);
        output_with_input(cmd, None)
    }

    /// `ip netns exec <ns> <args...>`, required to succeed; returns stdout.
    pub fn run_in(&self, ns: &str, args: &[&str]) -> Result<String> {
        let mut cmd = command("ip", &["netns", "exec", ns]);
        cmd.args(args);
        run(cmd)
    }

    /// `ip -n <ns> <args...>`, required to succeed; returns stdout.
    pub fn ip_in(&self, ns: &str, args: &[&str]) -> Result<String> {
        let mut v = vec!["-n", ns];
        v.extend_from_slice(args);
        ip(&v)
    }

    /// Starts a long-running command inside `ns` (killed when the returned
    /// [`Proc`] is dropped, and on teardown).
    pub fn spawn_in(&self, ns: &str, args: &[&str], out: ProcOutput) -> Result<Proc> {
        let mut cmd = command("ip", &["netns", "exec", ns]);
        cmd.args(args);
        Proc::spawn(
            cmd,
            &format!("{}@{ns}", args.first().copied().unwrap_or("?")),
            &self.prefix,
            out,
            self.die_with_parent,
        )
    }

    /// IPv4 routes of the main table in host `h`'s namespace, one line each.
    pub fn routes(&self, h: usize) -> Result<Vec<String>> {
        let ns = &self.host(h)?.ns;
        Ok(self
            .ip_in(ns, &["-4", "route", "show"])?
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// Host `h`'s route for exactly `subnet`, if any.
    pub fn route_to(&self, h: usize, subnet: Ipv4Net) -> Result<Option<String>> {
        let ns = &self.host(h)?.ns;
        let out = self.ip_in(ns, &["-4", "route", "show", "exact", &subnet.to_string()])?;
        Ok(out.lines().next().map(|l| l.trim().to_string()))
    }

    /// Neighbour entries on `dev` in host `h` (`ip neigh show dev <dev>`); empty
    /// if the device does not exist.
    pub fn neighbours(&self, h: usize, dev: &str) -> Result<Vec<String>> {
        let ns = &self.host(h)?.ns;
        Ok(self
            .ip_in(ns, &["neigh", "show", "dev", dev])
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// FDB entries of `dev` in host `h` (`bridge fdb show dev <dev>`); empty if
    /// the device does not exist.
    pub fn fdb(&self, h: usize, dev: &str) -> Result<Vec<String>> {
        let ns = &self.host(h)?.ns;
        Ok(
            run(command("bridge", &["-n", ns, "fdb", "show", "dev", dev]))
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect(),
        )
    }

    /// `count` pings (0.2 s apart, 2 s reply timeout) from namespace `ns` to `to`.
    pub fn ping_from(&self, ns: &str, to: Ipv4Addr, count: u32) -> Result<PingStats> {
        self.ping_ip_from(ns, IpAddr::V4(to), count)
    }

    /// [`ping_from`](Self::ping_from) for either family.
    pub fn ping_ip_from(&self, ns: &str, to: IpAddr, count: u32) -> Result<PingStats> {
        let out = self.exec_in(
            ns,
            &[
                "ping",
                "-n",
                "-q",
                "-c",
                &count.to_string(),
                "-i",
                "0.2",
                "-W",
                "2",
                &to.to_string(),
            ],
        )?;
        parse_ping(&String::from_utf8_lossy(&out.stdout))
    }

    /// Starts `count` pings (0.2 s apart, 2 s reply timeout) from pod `from` to `to`
    /// in the background, e.g. to count what a failover costs the data plane.
    pub fn start_ping(&self, from: PodId, to: Ipv4Addr, count: u32) -> Result<BackgroundPing> {
        self.start_ping_ip(from, IpAddr::V4(to), count)
    }

    /// [`start_ping`](Self::start_ping) for either family.
    pub fn start_ping_ip(&self, from: PodId, to: IpAddr, count: u32) -> Result<BackgroundPing> {
        let pod = self.pod(from)?;
        static PINGS: AtomicU32 = AtomicU32::new(0);
        let n = PINGS.fetch_add(1, Ordering::Relaxed);
        let out = self.run_dir.join(format!("ping-{n}-{}-{to}.log", pod.ns));
        let count = count.to_string();
        let to = to.to_string();
        let args = [
            "ping", "-n", "-q", "-c", &count, "-i", "0.2", "-W", "2", &to,
        ];
        let proc_ = self.spawn_in(&pod.ns, &args, ProcOutput::File(out.clone()))?;
        Ok(BackgroundPing { proc_, out })
    }

    /// `count` pings from a pod to `to`.
    pub fn ping(&self, from: PodId, to: Ipv4Addr, count: u32) -> Result<PingStats> {
        self.ping_ip(from, IpAddr::V4(to), count)
    }

    /// [`ping`](Self::ping) for either family.
    pub fn ping_ip(&self, from: PodId, to: IpAddr, count: u32) -> Result<PingStats> {
        let ns = self.pod(from)?.ns.clone();
        self.ping_ip_from(&ns, to, count)
    }

    /// Waits until one ping from pod `from` to `to` gets its reply.
    pub fn wait_reachable(&self, from: PodId, to: Ipv4Addr) -> Result<()> {
        self.wait_reachable_ip(from, IpAddr::V4(to))
    }

    /// [`wait_reachable`](Self::wait_reachable) for either family.
    pub fn wait_reachable_ip(&self, from: PodId, to: IpAddr) -> Result<()> {
        let ns = self.pod(from)?.ns.clone();
        poll_until(
            &format!("{to} to answer pings from {ns}"),
            self.timeout,
            Duration::from_millis(200),
            || Ok(self.ping_ip_from(&ns, to, 1)?.all_replied()),
        )
    }

    /// Waits until every pod of `pods` answers every other one's pings, over each
    /// family both pods have (an IPv6-only pod's IPv4 address is unspecified).
    pub fn wait_all_pairs(&self, pods: &[PodId]) -> Result<()> {
        for &from in pods {
            let a = self.pod(from)?.clone();
            for &to in pods.iter().filter(|p| **p != from) {
                let b = self.pod(to)?.clone();
                if !a.ip.is_unspecified() && !b.ip.is_unspecified() {
                    self.wait_reachable(from, b.ip)?;
                }
                if let (Some(_), Some(ip6)) = (a.ip6, b.ip6) {
                    self.wait_reachable_ip(from, IpAddr::V6(ip6))?;
                }
            }
        }
        Ok(())
    }

    /// iperf3 from `client_ns` to a one-shot server on `server_ip` in `server_ns`;
    /// returns the receiver's throughput in Gbit/s.
    pub fn iperf(
        &self,
        server_ns: &str,
        server_ip: impl Into<IpAddr>,
        client_ns: &str,
        secs: u32,
        streams: u32,
    ) -> Result<f64> {
        let sip = server_ip.into().to_string();
        let mut server = self.spawn_in(
            server_ns,
            &["iperf3", "-s", "-1", "-B", &sip, "-p", "5201"],
            ProcOutput::Null,
        )?;
        let start = Instant::now();
        loop {
            let out = self.exec_in(
                client_ns,
                &[
                    "iperf3",
                    "-c",
                    &sip,
                    "-p",
                    "5201",
                    "-t",
                    &secs.to_string(),
                    "-P",
                    &streams.to_string(),
                    "-J",
                ],
            )?;
            let text = String::from_utf8_lossy(&out.stdout);
            match parse_iperf_bps(&text) {
                Ok(bps) => {
                    server.wait_timeout(Duration::from_secs(10));
                    return Ok(bps / 1e9);
                }
                // The server may not listen yet: retry until the deadline.
                Err(e) => {
                    if server.exited() || start.elapsed() >= self.timeout {
                        return Err(e);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// iperf3 between two pods (`from` sends to `to`), Gbit/s.
    pub fn iperf_pods(&self, from: PodId, to: PodId, secs: u32, streams: u32) -> Result<f64> {
        self.iperf_pods_over(Family::V4, from, to, secs, streams)
    }

    /// [`iperf_pods`](Self::iperf_pods) over `family`.
    pub fn iperf_pods_over(
        &self,
        family: Family,
        from: PodId,
        to: PodId,
        secs: u32,
        streams: u32,
    ) -> Result<f64> {
        let (a, b) = (self.pod(from)?.clone(), self.pod(to)?.clone());
        let ip = b.addr(family).ok_or_else(|| {
            LabError::Invalid(format!("pod {} has no {} address", b.ns, family.label()))
        })?;
        self.iperf(&b.ns, ip, &a.ns, secs, streams)
    }

    /// iperf3 between two hosts over the underlay, Gbit/s.
    pub fn iperf_hosts(&self, from: usize, to: usize, secs: u32, streams: u32) -> Result<f64> {
        self.iperf_hosts_over(Family::V4, from, to, secs, streams)
    }

    /// [`iperf_hosts`](Self::iperf_hosts) over `family`'s underlay.
    pub fn iperf_hosts_over(
        &self,
        family: Family,
        from: usize,
        to: usize,
        secs: u32,
        streams: u32,
    ) -> Result<f64> {
        let (a, b) = (self.host(from)?, self.host(to)?);
        let ip = b.addr(family).ok_or_else(|| {
            LabError::Invalid(format!("host {} has no {} address", b.ns, family.label()))
        })?;
        self.iperf(&b.ns, ip, &a.ns, secs, streams)
    }

    /// Starts `ip monitor <objects>` in `ns` and waits until it demonstrably
    /// receives events.
    pub fn monitor(&self, ns: &str, objects: &[&str]) -> Result<Monitor> {
        Monitor::start(ns, objects).map_err(|e| LabError::io(format!("ip monitor in {ns}"), e))
    }
}

/// A ping started by [`Lab::start_ping`].
pub struct BackgroundPing {
    proc_: Proc,
    out: PathBuf,
}

impl BackgroundPing {
    /// Waits (up to `timeout`) until every ping was sent and answered or timed out,
    /// and returns the counts. A ping still running then is killed and an error.
    pub fn finish(mut self, timeout: Duration) -> Result<PingStats> {
        if self.proc_.wait_timeout(timeout).is_none() {
            let _ = self.proc_.kill();
            return Err(LabError::Timeout {
                what: "the background ping to finish".into(),
                after: timeout,
            });
        }
        let text = fs::read_to_string(&self.out)
            .map_err(|e| LabError::io(format!("read {}", self.out.display()), e))?;
        parse_ping(&text)
    }
}
