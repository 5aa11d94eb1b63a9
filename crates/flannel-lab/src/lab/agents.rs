//! Starting, stopping and restarting the agents on the hosts.

use super::*;

impl Lab {
    pub(super) fn flanneld(&self) -> Result<PathBuf> {
        match &self.flanneld {
            Some(p) => Ok(p.clone()),
            None => find_binary("flanneld"),
        }
    }

    /// From the next start on, host `h`'s flanneld runs as `<prefix...> <flanneld>
    /// <args...>` (after `ip netns exec <ns>`), e.g. prefix `["chroot", "<rootfs>"]`
    /// and flanneld `/opt/bin/flanneld`: the agent of an image's root filesystem.
    /// The prefix must exec flanneld in the end (the lab signals the process it
    /// started) and make the host's directory ([`Host::dir`]) visible at its path.
    pub fn set_agent_wrapper(&mut self, h: usize, prefix: &[&str], flanneld: &Path) -> Result<()> {
        self.host_mut(h)?.agent_wrapper = Some((
            prefix.iter().map(|s| s.to_string()).collect(),
            flanneld.to_path_buf(),
        ));
        Ok(())
    }

    /// From the next start on, host `h`'s flanneld chooses its interface by `args`
    /// (e.g. `["--iface-can-reach=fd77:2::9"]`) instead of the lab's
    /// `--iface=<underlay IPv4>`.
    pub fn set_agent_iface_args(&mut self, h: usize, args: &[&str]) -> Result<()> {
        self.host_mut(h)?.iface_args = Some(args.iter().map(|s| s.to_string()).collect());
        Ok(())
    }

    /// The flanneld command line used for host `h` (after `ip netns exec <ns>`;
    /// starts with the wrapper prefix if [`Lab::set_agent_wrapper`] set one).
    pub fn agent_command(&self, h: usize) -> Result<Vec<String>> {
        let host = self.host(h)?;
        let (mut v, flanneld) = match &host.agent_wrapper {
            Some((prefix, bin)) => (prefix.clone(), bin.clone()),
            None => (Vec::new(), self.flanneld()?),
        };
        v.extend([
            flanneld.display().to_string(),
            format!("--etcd-endpoints={}", self.etcd.endpoints()),
            format!("--etcd-prefix={ETCD_PREFIX}"),
        ]);
        match &host.iface_args {
            Some(args) => v.extend(args.iter().cloned()),
            None => v.push(format!("--iface={}", host.ip)),
        }
        v.extend([
            format!("--subnet-file={}", host.subnet_file().display()),
            format!("--ip-masq={}", self.ip_masq),
        ]);
        v.extend(self.agent_args.iter().cloned());
        Ok(v)
    }

    /// Appends `arg` to every host's flanneld command line from the next start on
    /// (as [`LabBuilder::agent_arg`] does before the lab exists, e.g. for a path in
    /// the run dir).
    pub fn add_agent_arg(&mut self, arg: &str) {
        self.agent_args.push(arg.to_string());
    }

    /// The public key of host `h`'s wireguard key file, as `wg pubkey`
    /// (wireguard-tools) derives it: an independent check of what the agent publishes.
    pub fn wireguard_public_key(&self, h: usize) -> Result<String> {
        let host = self.host(h)?;
        let key = fs::read(host.wireguard_key_file()).map_err(|e| {
            LabError::io(format!("read {}", host.wireguard_key_file().display()), e)
        })?;
        let cmd = command("wg", &["pubkey"]);
        let out = output_with_input(cmd, Some(&key))?;
        if !out.status.success() {
            return Err(LabError::Command {
                cmd: "wg pubkey".into(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Host `h`'s wireguard agent's answer to `get=1` on its UAPI socket (what
    /// `wg show` asks); empty while no agent serves it.
    pub fn wireguard_uapi_get(&self, h: usize) -> Result<String> {
        self.wireguard_uapi_get_of(h, "flannel-wg")
    }

    /// [`wireguard_uapi_get`](Self::wireguard_uapi_get) for device `device`
    /// (`flannel-wg-v6` in separate mode with IPv6).
    pub fn wireguard_uapi_get_of(&self, h: usize, device: &str) -> Result<String> {
        use std::io::{Read, Write};
        let path = self.host(h)?.wireguard_socket_of(device);
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(&path) else {
            return Ok(String::new());
        };
        let io = |e| LabError::io(format!("UAPI get on {}", path.display()), e);
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(io)?;
        s.write_all(b"get=1\n\n").map_err(io)?;
        let mut text = String::new();
        s.read_to_string(&mut text).map_err(io)?;
        Ok(text)
    }

    /// Starts flanneld on host `h` without waiting for it.
    pub fn spawn_agent(&mut self, h: usize) -> Result<()> {
        if self.agent_running(h) {
            return Err(LabError::Invalid(format!(
                "flanneld already runs on {}",
                self.hosts[h].ns
            )));
        }
        let argv = self.agent_command(h)?;
        let host = self.host(h)?;
        let log = host.log_file();
        let marker = format!("===== flannel-lab: starting {}\n", argv.join(" "));
        let _ = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| std::io::Write::write_all(&mut f, marker.as_bytes()));
        let mut cmd = command("ip", &["netns", "exec", &host.ns]);
        cmd.args(&argv);
        for (k, v) in host.own_files_env() {
            cmd.env(k, v);
        }
        for (k, v) in &self.agent_env {
            cmd.env(k, v);
        }
        let p = Proc::spawn(
            cmd,
            &format!("flanneld@{}", host.ns),
            &self.prefix,
            ProcOutput::File(log),
            self.die_with_parent,
        )?;
        self.host_mut(h)?.agent = Some(p);
        Ok(())
    }

    /// Starts flanneld on host `h` and waits until it (re)wrote its subnet file;
    /// returns the time from spawn to that.
    pub fn start_agent(&mut self, h: usize) -> Result<Duration> {
        let before = stamp(&self.host(h)?.subnet_file());
        let t0 = Instant::now();
        self.spawn_agent(h)?;
        self.wait_subnet_file(h, before)?;
        Ok(t0.elapsed())
    }

    /// Waits until host `h`'s subnet file differs from `before` and is complete.
    pub(super) fn wait_subnet_file(&mut self, h: usize, before: FileStamp) -> Result<SubnetFile> {
        let timeout = self.timeout;
        let path = self.host(h)?.subnet_file();
        let what = format!("{} to be written", path.display());
        let mut found = None;
        let start = Instant::now();
        loop {
            let now = stamp(&path);
            if now.is_some() && now != before {
                if let Some(s) = fs::read_to_string(&path)
                    .ok()
                    .as_deref()
                    .and_then(SubnetFile::parse)
                {
                    found = Some(s);
                }
            }
            if let Some(s) = found.take() {
                return Ok(s);
            }
            self.check_agent(h)?;
            if start.elapsed() >= timeout {
                return Err(LabError::Timeout {
                    what,
                    after: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// An error if host `h`'s flanneld was started and has exited since.
    pub fn check_agent(&mut self, h: usize) -> Result<()> {
        let host = self.host_mut(h)?;
        let Some(agent) = host.agent.as_mut() else {
            return Ok(());
        };
        match agent.try_wait() {
            None => Ok(()),
            Some(st) => {
                let log = host.log_file();
                Err(LabError::AgentExited {
                    host: host.ns.clone(),
                    status: status_text(&st),
                    log_tail: tail(&log, 30),
                    log_path: log,
                })
            }
        }
    }

    /// An error if any started flanneld has exited.
    pub fn check_agents(&mut self) -> Result<()> {
        for h in 0..self.hosts.len() {
            self.check_agent(h)?;
        }
        Ok(())
    }

    pub fn agent_running(&mut self, h: usize) -> bool {
        self.hosts
            .get_mut(h)
            .and_then(|host| host.agent.as_mut())
            .is_some_and(|a| !a.exited())
    }

    /// PID of host `h`'s flanneld while it runs.
    pub fn agent_pid(&mut self, h: usize) -> Option<u32> {
        if !self.agent_running(h) {
            return None;
        }
        self.hosts[h].agent.as_ref().map(Proc::pid)
    }

    /// The exit status of host `h`'s last flanneld, once it has exited.
    pub fn agent_exit_status(&mut self, h: usize) -> Option<ExitStatus> {
        self.hosts.get_mut(h)?.agent.as_mut()?.try_wait()
    }

    /// Waits (up to the lab's timeout) for host `h`'s flanneld to exit on its own,
    /// as it does after losing its lease or refusing a config, and returns its
    /// status. `what` names the reason in the timeout error.
    pub fn wait_agent_exit(&mut self, h: usize, what: &str) -> Result<ExitStatus> {
        let mut status = None;
        poll_until(
            &format!("flanneld on host {h} to exit ({what})"),
            self.timeout(),
            Duration::from_millis(50),
            || {
                status = self.agent_exit_status(h);
                Ok(status.is_some())
            },
        )?;
        status.ok_or_else(|| LabError::Invalid(format!("host {h} has no agent")))
    }

    /// SIGTERM to host `h`'s flanneld; waits for it to exit and returns its status.
    /// An error if it had to be killed because it did not exit in time.
    pub fn stop_agent(&mut self, h: usize) -> Result<ExitStatus> {
        let timeout = self.timeout;
        let (agent, ns) = self.started_agent(h)?;
        let (st, killed) = agent.terminate(timeout)?;
        if killed {
            return Err(LabError::Timeout {
                what: format!("flanneld on {ns} to exit after SIGTERM (killed)"),
                after: timeout,
            });
        }
        Ok(st)
    }

    /// SIGKILL to host `h`'s flanneld (and reap it).
    pub fn kill_agent(&mut self, h: usize) -> Result<()> {
        self.started_agent(h)?.0.kill()?;
        Ok(())
    }

    /// Host `h`'s flanneld process and the host's namespace name.
    fn started_agent(&mut self, h: usize) -> Result<(&mut Proc, String)> {
        let host = self.host_mut(h)?;
        let ns = host.ns.clone();
        match host.agent.as_mut() {
            Some(agent) => Ok((agent, ns)),
            None => Err(LabError::Invalid(format!(
                "no flanneld was started on {ns}"
            ))),
        }
    }

    /// VmRSS of host `h`'s flanneld in KiB.
    pub fn agent_rss_kib(&mut self, h: usize) -> Result<u64> {
        Ok(self.agent_rss(h)?.total_kib)
    }

    /// Host `h`'s flanneld's resident memory, total and its own (anonymous).
    pub fn agent_rss(&mut self, h: usize) -> Result<Rss> {
        let pid = self
            .agent_pid(h)
            .ok_or_else(|| LabError::Invalid(format!("flanneld does not run on host {h}")))?;
        rss(pid)
    }

    /// Everything host `h`'s flanneld processes have logged.
    pub fn agent_log(&self, h: usize) -> Result<String> {
        let p = self.host(h)?.log_file();
        fs::read_to_string(&p).map_err(|e| LabError::io(format!("read {}", p.display()), e))
    }

    /// Host `h`'s current subnet file, if there is a complete one.
    pub fn subnet_file(&self, h: usize) -> Result<Option<SubnetFile>> {
        let p = self.host(h)?.subnet_file();
        match fs::read_to_string(&p) {
            Ok(t) => Ok(SubnetFile::parse(&t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(LabError::io(format!("read {}", p.display()), e)),
        }
    }

    /// Waits until host `h`'s flanneld has written all of its subnet.env (the
    /// `FLANNEL_IPMASQ` line is the last one) and returns the text as it is; for
    /// IPv6-only networks, where [`subnet_file`](Self::subnet_file) finds no IPv4
    /// subnet.
    pub fn wait_subnet_env_text(&mut self, h: usize) -> Result<String> {
        let path = self.host(h)?.subnet_file();
        let mut text = String::new();
        poll_until(
            &format!("{} to be written", path.display()),
            self.timeout(),
            Duration::from_millis(20),
            || {
                self.check_agent(h)?;
                text = fs::read_to_string(&path).unwrap_or_default();
                Ok(text.contains("FLANNEL_IPMASQ="))
            },
        )?;
        Ok(text)
    }

    /// Host `h`'s lease subnet, from its subnet file.
    pub fn host_subnet(&self, h: usize) -> Result<Ipv4Net> {
        self.subnet_file(h)?
            .map(|s| s.subnet)
            .ok_or_else(|| LabError::Invalid(format!("host {h} has no subnet file (yet)")))
    }

    /// Writes a subnet file by hand (for hosts without flanneld).
    pub fn write_subnet_file(&self, h: usize, subnet: Ipv4Net, mtu: u32) -> Result<()> {
        let network: Ipv4Net = serde_json::from_str::<Value>(&self.config)
            .ok()
            .and_then(|v| v.get("Network").and_then(Value::as_str).map(str::to_string))
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| LabError::Invalid("config has no Network".into()))?;
        let env = SubnetEnv {
            network: Some(network.trunc()),
            subnet: Some(subnet.trunc()),
            ipv6_network: None,
            ipv6_subnet: None,
            mtu,
            ip_masq: self.ip_masq,
        };
        let p = self.host(h)?.subnet_file();
        fs::write(&p, env.render()).map_err(|e| LabError::io(format!("write {}", p.display()), e))
    }

    /// The etcd key of host `h`'s lease.
    pub fn lease_key(&self, h: usize) -> Result<String> {
        Ok(Self::lease_key_for(self.host_subnet(h)?))
    }

    /// Host `h`'s lease value in etcd, if present.
    pub fn get_lease(&self, h: usize) -> Result<Option<String>> {
        self.etcd.get(&self.lease_key(h)?)
    }

    /// Deletes host `h`'s lease from etcd; returns whether it was there.
    pub fn delete_lease(&self, h: usize) -> Result<bool> {
        self.etcd.delete(&self.lease_key(h)?)
    }
}
