//! Tearing the lab down (also after a crash), or keeping it.

use super::*;

impl Lab {
    /// Leaves the lab running after this process exits; returns its prefix and run
    /// directory. Needs a lab built with [`LabBuilder::keepable`].
    pub fn into_kept(mut self) -> Result<(String, PathBuf)> {
        if self.die_with_parent {
            return Err(LabError::Invalid(
                "this lab's processes die with their parent: build it keepable".into(),
            ));
        }
        for h in &mut self.hosts {
            if let Some(a) = h.agent.take() {
                std::mem::forget(a);
            }
        }
        for e in self.etcd_procs.iter_mut().filter_map(Option::take) {
            std::mem::forget(e);
        }
        self.kept = true;
        unregister_lab(&self.prefix);
        Ok((self.prefix.clone(), self.run_dir.clone()))
    }

    /// Tears everything down now: pods (CNI DEL), processes, namespaces, run
    /// directory. Every step runs even if an earlier one failed; the errors are
    /// returned together.
    pub fn teardown(mut self) -> Result<()> {
        let errors = self.teardown_inner();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(LabError::Invalid(format!(
                "teardown of {}: {}",
                self.prefix,
                errors.join("; ")
            )))
        }
    }

    pub(super) fn teardown_inner(&mut self) -> Vec<String> {
        if self.torn_down || self.kept {
            return Vec::new();
        }
        self.torn_down = true;
        let mut errors = Vec::new();
        if std::thread::panicking() {
            self.dump_logs();
        }
        let ids: Vec<PodId> = self.pods().map(|p| p.id).collect();
        for id in ids {
            if let Err(e) = self.remove_pod(id) {
                // Only the CNI state in the run dir is left behind; it goes below.
                if !matches!(e, LabError::MissingBinary { .. }) {
                    errors.push(e.to_string());
                }
            }
        }
        for h in &mut self.hosts {
            if let Some(mut a) = h.agent.take() {
                if let Err(e) = a.kill() {
                    errors.push(e.to_string());
                }
            }
        }
        for mut e in self.etcd_procs.iter_mut().filter_map(Option::take) {
            if let Err(e) = e.kill() {
                errors.push(e.to_string());
            }
        }
        errors.extend(
            delete_namespaces(&self.prefix)
                .into_iter()
                .map(|e| e.to_string()),
        );
        if std::env::var_os("FLANNEL_LAB_KEEP_RUN_DIR").is_none() {
            if let Err(e) = fs::remove_dir_all(&self.run_dir) {
                errors.push(format!("remove {}: {e}", self.run_dir.display()));
            }
        }
        unregister_lab(&self.prefix);
        errors
    }

    /// Prints the end of every log to stderr (used when a test panics).
    pub fn dump_logs(&self) {
        eprintln!(
            "===== flannel-lab {}: logs ({})",
            self.prefix,
            self.run_dir.display()
        );
        for h in &self.hosts {
            eprintln!(
                "----- {} flanneld.log (end)\n{}",
                h.ns,
                tail(&h.log_file(), 40)
            );
            if let Ok(s) = fs::read_to_string(h.subnet_file()) {
                eprintln!("----- {} subnet.env\n{s}", h.ns);
            }
        }
        for log in self.etcd_logs() {
            eprintln!(
                "----- {} (end)\n{}",
                log.file_name().unwrap_or_default().to_string_lossy(),
                tail(&log, 10)
            );
        }
    }
}
