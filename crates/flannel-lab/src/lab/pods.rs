//! Pods: network namespaces attached through the CNI plugin.

use super::*;

impl Lab {
    pub(super) fn cni_plugin(&mut self) -> Result<PathBuf> {
        if let Some(p) = &self.cni {
            return Ok(p.clone());
        }
        let p = find_binary("flannel")?;
        self.cni = Some(p.clone());
        Ok(p)
    }

    /// The netconf the lab hands the CNI plugin on host `h`.
    pub fn cni_netconf(&self, h: usize) -> Result<String> {
        let host = self.host(h)?;
        Ok(json!({
            "cniVersion": "1.0.0",
            "name": "cbr0",
            "type": "flannel",
            "subnetFile": host.subnet_file(),
            "dataDir": host.dir.join("cni-flannel"),
            "delegate": {"hairpinMode": true, "isDefaultGateway": true},
            "ipam": {"dataDir": host.dir.join("cni-ipam")},
        })
        .to_string())
    }

    pub(super) fn cni(&mut self, h: usize, pod_ns: &str, op: &str) -> Result<String> {
        let plugin = self.cni_plugin()?;
        let conf = self.cni_netconf(h)?;
        let host = self.host(h)?;
        let mut cmd = command("ip", &["netns", "exec", &host.ns]);
        cmd.arg(&plugin)
            .env("CNI_COMMAND", op)
            .env("CNI_CONTAINERID", pod_ns)
            .env("CNI_NETNS", format!("/run/netns/{pod_ns}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", CNI_PATH);
        let out = output_with_input(cmd, Some(conf.as_bytes()))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(LabError::Cni {
                command: op.to_string(),
                pod: pod_ns.to_string(),
                host: host.ns.clone(),
                msg: format!(
                    "{}: {} {}",
                    status_text(&out.status),
                    stdout.trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(stdout)
    }

    /// Creates a pod on host `h` through the CNI plugin; returns its id.
    pub fn add_pod(&mut self, h: usize) -> Result<PodId> {
        self.add_pod_family(h, false)
    }

    /// Creates a pod of an IPv6-only network on host `h`: the CNI result must hold an
    /// IPv6 address and no IPv4 one; the pod's [`Pod::ip`] is `0.0.0.0`.
    pub fn add_pod_ipv6_only(&mut self, h: usize) -> Result<PodId> {
        self.add_pod_family(h, true)
    }

    fn add_pod_family(&mut self, h: usize, ipv6_only: bool) -> Result<PodId> {
        let host = self.host_mut(h)?;
        let ns = format!("{}p{}", host.ns, host.next_pod);
        host.next_pod += 1;
        self.add_namespace(&ns)?;
        let result = self.cni(h, &ns, "ADD").and_then(|out| {
            let bad = |msg: &str| LabError::Cni {
                command: "ADD".into(),
                pod: ns.clone(),
                host: self.hosts[h].ns.clone(),
                msg: format!("{msg} in result {}", out.trim()),
            };
            let ip6 = parse_cni_ipv6(&out);
            if ipv6_only {
                if parse_cni_ipv4(&out).is_some() {
                    return Err(bad("an IPv4 address in an IPv6-only network"));
                }
                let ip6 = ip6.ok_or_else(|| bad("no IPv6 address"))?;
                return Ok((Ipv4Addr::UNSPECIFIED, Some(ip6)));
            }
            let ip4 = parse_cni_ipv4(&out).ok_or_else(|| bad("no IPv4 address"))?;
            Ok((ip4, ip6))
        });
        let (ip4, ip6) = match result {
            Ok(a) => a,
            Err(e) => {
                let _ = self.cni(h, &ns, "DEL");
                let _ = ip(&["netns", "del", &ns]);
                return Err(e);
            }
        };
        let id = PodId(self.pods.len());
        self.pods.push(Some(Pod {
            id,
            ns,
            host: h,
            ip: ip4,
            ip6,
        }));
        Ok(id)
    }

    /// CNI DEL of a pod, then its namespace is deleted.
    pub fn remove_pod(&mut self, id: PodId) -> Result<()> {
        let pod = self
            .pods
            .get_mut(id.0)
            .and_then(Option::take)
            .ok_or_else(|| LabError::Invalid(format!("no pod {}", id.0)))?;
        let del = self.cni(pod.host, &pod.ns, "DEL");
        let rm = ip(&["netns", "del", &pod.ns]);
        del?;
        rm?;
        Ok(())
    }
}
