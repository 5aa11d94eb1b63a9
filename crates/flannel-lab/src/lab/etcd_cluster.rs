//! The lab's etcd members: starting them, and stopping, restarting and finding the
//! leader among them (failover tests kill members while the agents run).

use super::*;

impl Lab {
    /// Number of etcd members.
    pub fn etcd_member_count(&self) -> usize {
        self.etcd_members.len()
    }

    /// Where member `i` (0-based) listens.
    pub fn etcd_member(&self, i: usize) -> Result<&EtcdMember> {
        self.etcd_members.get(i).ok_or_else(|| {
            LabError::Invalid(format!(
                "no etcd member {i} (lab has {})",
                self.etcd_members.len()
            ))
        })
    }

    fn etcd_log(&self, i: usize) -> PathBuf {
        self.run_dir.join(format!("etcd-{}.log", i + 1))
    }

    pub(super) fn etcd_logs(&self) -> Vec<PathBuf> {
        (0..self.etcd_members.len())
            .map(|i| self.etcd_log(i))
            .collect()
    }

    pub(super) fn spawn_etcd(&mut self) -> Result<()> {
        for i in 0..self.etcd_members.len() {
            self.spawn_etcd_member(i)?;
        }
        Ok(())
    }

    fn spawn_etcd_member(&mut self, i: usize) -> Result<()> {
        let me = self.etcd_member(i)?.clone();
        let data = self.run_dir.join(format!("etcd-{}", i + 1));
        let mut cmd = command("ip", &["netns", "exec", &self.under, ETCD_BIN]);
        cmd.args(etcd_args(&me, &self.etcd_members, &data));
        let p = Proc::spawn(
            cmd,
            &format!("etcd {}", me.name),
            &self.prefix,
            ProcOutput::File(self.etcd_log(i)),
            self.die_with_parent,
        )?;
        self.etcd_procs[i] = Some(p);
        Ok(())
    }

    /// Waits until every member answers its health check (which needs a leader, so
    /// all members must have been started).
    pub(super) fn wait_etcd(&mut self) -> Result<()> {
        for i in 0..self.etcd_members.len() {
            self.wait_etcd_member(i)?;
        }
        Ok(())
    }

    /// Waits until member `i` runs and reports itself healthy (it has a leader).
    pub fn wait_etcd_member(&mut self, i: usize) -> Result<()> {
        let log = self.etcd_log(i);
        let client = self.etcd.member(i)?;
        let timeout = self.timeout;
        let Some(p) = self.etcd_procs.get_mut(i).and_then(Option::as_mut) else {
            return Err(LabError::Invalid(format!("etcd member {i} is not running")));
        };
        poll_until(
            &format!("etcd member {} to be healthy", i + 1),
            timeout,
            Duration::from_millis(100),
            || {
                if let Some(st) = p.try_wait() {
                    return Err(LabError::Invalid(format!(
                        "etcd member {} exited ({}): {}",
                        i + 1,
                        status_text(&st),
                        tail(&log, 20)
                    )));
                }
                Ok(client.healthy())
            },
        )
    }

    /// Kills member `i` (SIGKILL, by PID), as a crashed machine; its data stays.
    pub fn stop_etcd_member(&mut self, i: usize) -> Result<()> {
        self.etcd_member(i)?;
        match self.etcd_procs[i].take() {
            Some(mut p) => p.kill().map(drop),
            None => Err(LabError::Invalid(format!(
                "etcd member {} is not running",
                i + 1
            ))),
        }
    }

    /// Starts member `i` again on its data directory, without waiting: alone, it
    /// is healthy only once it is back in a quorum ([`Lab::wait_etcd_member`]).
    pub fn restart_etcd_member(&mut self, i: usize) -> Result<()> {
        self.etcd_member(i)?;
        if self.etcd_procs[i].as_mut().is_some_and(|p| !p.exited()) {
            return Err(LabError::Invalid(format!(
                "etcd member {} is still running",
                i + 1
            )));
        }
        self.spawn_etcd_member(i)
    }

    /// Whether member `i` runs (was started and has not exited).
    pub fn etcd_member_running(&mut self, i: usize) -> bool {
        self.etcd_procs
            .get_mut(i)
            .and_then(Option::as_mut)
            .is_some_and(|p| !p.exited())
    }

    /// The index of the member that is leader now, as the running members see it
    /// (`None` while no running member knows of a leader, e.g. without quorum).
    pub fn etcd_leader(&mut self) -> Result<Option<usize>> {
        let mut ids = Vec::new();
        let mut leader = 0;
        for i in 0..self.etcd_members.len() {
            if !self.etcd_member_running(i) {
                ids.push(None);
                continue;
            }
            match self.etcd.member(i)?.status() {
                Ok((id, l)) => {
                    ids.push(Some(id));
                    if l != 0 {
                        leader = l;
                    }
                }
                Err(_) => ids.push(None),
            }
        }
        Ok(ids.iter().position(|id| leader != 0 && *id == Some(leader)))
    }

    /// Established TCP connections from `from` (a host's underlay address) to
    /// member `i`'s client port, as the underlay namespace sees them: which
    /// members an agent is talking to.
    pub fn etcd_connections_from(&self, i: usize, from: Ipv4Addr) -> Result<usize> {
        let port = self.etcd_member(i)?.client.port();
        let out = self.run_in(
            &self.under,
            &[
                "ss",
                "-Htn",
                "state",
                "established",
                "sport",
                "=",
                &format!(":{port}"),
            ],
        )?;
        // Columns: Recv-Q Send-Q Local:Port Peer:Port.
        Ok(out
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .nth(3)
                    .and_then(|peer| peer.rsplit_once(':'))
                    .is_some_and(|(ip, _)| ip == from.to_string())
            })
            .count())
    }
}
