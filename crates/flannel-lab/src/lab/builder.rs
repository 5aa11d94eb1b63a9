//! Building a lab: the builder and what Lab::start does with it (namespaces, the
//! underlay, etcd, the hosts).

use super::*;

/// Builds a [`Lab`]; see [`Lab::builder`].
pub struct LabBuilder {
    hosts: usize,
    backend: String,
    network: String,
    config: Option<String>,
    nftables: bool,
    etcd_members: usize,
    prefix: Option<String>,
    start_agents: bool,
    ip_masq: bool,
    agent_args: Vec<String>,
    agent_env: Vec<(String, String)>,
    keepable: bool,
    timeout: Duration,
    progress: Option<Progress>,
    ipv6: bool,
    ipv6_network: Option<String>,
}

impl LabBuilder {
    /// Number of hosts (1..=253).
    pub fn hosts(mut self, n: usize) -> Self {
        self.hosts = n;
        self
    }
    /// Backend by type: `{"Type":"<ty>"}`.
    pub fn backend(mut self, ty: &str) -> Self {
        self.backend = json!({ "Type": ty }).to_string();
        self
    }
    /// The whole `Backend` object, e.g. `{"Type":"vxlan","DirectRouting":true}`.
    pub fn backend_json(mut self, json: &str) -> Self {
        self.backend = json.to_string();
        self
    }
    /// The pod network (`Network` of the config), default 10.244.0.0/16.
    pub fn network(mut self, cidr: &str) -> Self {
        self.network = cidr.to_string();
        self
    }
    /// `EnableNFTables` in the config built from `network` and `backend` (rules by
    /// the nftables engine instead of iptables).
    pub fn nftables(mut self, on: bool) -> Self {
        self.nftables = on;
        self
    }
    /// Number of etcd members (odd, 1..=7; default 1). With more than one, the lab
    /// runs a real etcd cluster and every agent gets all endpoints.
    pub fn etcd_members(mut self, n: usize) -> Self {
        self.etcd_members = n;
        self
    }
    /// The complete network config JSON, replacing `network`, `backend` and
    /// `nftables`.
    pub fn config_json(mut self, json: &str) -> Self {
        self.config = Some(json.to_string());
        self
    }
    /// A fixed prefix (`flab-<pid>-<n>`); default: this pid and a counter.
    pub fn prefix(mut self, prefix: &str) -> Self {
        self.prefix = Some(prefix.to_string());
        self
    }
    /// Whether `build` starts flanneld on every host (default true).
    pub fn start_agents(mut self, yes: bool) -> Self {
        self.start_agents = yes;
        self
    }
    /// flanneld's `--ip-masq` (default true, as in flannel's manifests; the CNI
    /// plugin then tells the bridge plugin not to masquerade).
    pub fn ip_masq(mut self, yes: bool) -> Self {
        self.ip_masq = yes;
        self
    }
    /// An extra flanneld argument.
    pub fn agent_arg(mut self, arg: &str) -> Self {
        self.agent_args.push(arg.to_string());
        self
    }
    /// An extra environment variable for flanneld.
    pub fn agent_env(mut self, key: &str, value: &str) -> Self {
        self.agent_env.push((key.to_string(), value.to_string()));
        self
    }
    /// Lets the lab outlive this process ([`Lab::into_kept`]): its processes do
    /// not get SIGKILL when the thread that started them exits.
    pub fn keepable(mut self, yes: bool) -> Self {
        self.keepable = yes;
        self
    }
    /// Deadline for every wait (etcd up, subnet.env written, agent exit...);
    /// default 60 s, generous for a loaded 2-core machine.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }
    /// An IPv6 underlay besides the IPv4 one: [`UNDERLAY_V6_GATEWAY`] on the bridge,
    /// host n at `<UNDERLAY_V6_PREFIX>::<n>` ([`Host::ip6`]), IPv6 forwarding on in
    /// every host. The network config is untouched (set `EnableIPv6` there).
    pub fn ipv6(mut self, on: bool) -> Self {
        self.ipv6 = on;
        self
    }
    /// A dual-stack cluster: the IPv6 underlay of [`ipv6`](Self::ipv6) and, in the
    /// generated network config, `EnableIPv6` with `IPv6Network` = `cidr` (the
    /// subnet length left at flannel's default, /64).
    pub fn dual_stack(mut self, cidr: &str) -> Self {
        self.ipv6 = true;
        self.ipv6_network = Some(cidr.to_string());
        self
    }
    /// Called with a line per build step.
    pub fn on_progress(mut self, f: impl FnMut(&str) + 'static) -> Self {
        self.progress = Some(Box::new(f));
        self
    }

    pub(super) fn config_text(&self) -> Result<String> {
        if let Some(c) = &self.config {
            serde_json::from_str::<Value>(c)
                .map_err(|e| LabError::Invalid(format!("config JSON: {e}")))?;
            return Ok(c.clone());
        }
        let backend: Value = serde_json::from_str(&self.backend)
            .map_err(|e| LabError::Invalid(format!("backend JSON: {e}")))?;
        if !backend.is_object() {
            return Err(LabError::Invalid(format!(
                "backend JSON must be an object, got {backend}"
            )));
        }
        let mut config = json!({"Network": self.network, "Backend": backend});
        if self.nftables {
            config["EnableNFTables"] = json!(true);
        }
        if let Some(net) = &self.ipv6_network {
            config["EnableIPv6"] = json!(true);
            config["IPv6Network"] = json!(net);
        }
        Ok(config.to_string())
    }

    /// Creates everything; on any failure what was created is removed again.
    pub fn build(mut self) -> Result<Lab> {
        if !(1..=253).contains(&self.hosts) {
            return Err(LabError::Invalid(format!(
                "hosts must be 1..=253, got {}",
                self.hosts
            )));
        }
        if !(1..=7).contains(&self.etcd_members) || self.etcd_members.is_multiple_of(2) {
            return Err(LabError::Invalid(format!(
                "etcd members must be 1, 3, 5 or 7 (a quorum needs an odd count), got {}",
                self.etcd_members
            )));
        }
        let config = self.config_text()?;
        install_signal_teardown()?;
        for tool in ["ip", ETCD_BIN] {
            find_tool(tool)?;
        }
        let flanneld = if self.start_agents {
            Some(find_binary("flanneld")?)
        } else {
            find_binary("flanneld").ok()
        };
        let pid = std::process::id();
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = self
            .prefix
            .clone()
            .unwrap_or_else(|| format!("{NAME_PREFIX}{pid}-{n}"));
        let (lp, ppid) = lab_prefix_of(&prefix).ok_or_else(|| {
            LabError::Invalid(format!("prefix {prefix:?} is not {NAME_PREFIX}<pid>-<n>"))
        })?;
        if lp != prefix {
            return Err(LabError::Invalid(format!(
                "prefix {prefix:?} is not {NAME_PREFIX}<pid>-<n>"
            )));
        }
        let pn: u32 = prefix
            .rsplit('-')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(n);
        // Link names are created inside namespaces only, but still carry the run's
        // identity (and stay within 15 characters).
        let tag = format!("f{}x{}", base36(ppid), base36(pn));
        let run_dir = runs_root().join(&prefix);
        if run_dir.exists() {
            return Err(LabError::Invalid(format!(
                "{} exists: leftovers of an earlier run? `flannel-lab down {prefix}`",
                run_dir.display()
            )));
        }
        fs::create_dir_all(&run_dir)
            .map_err(|e| LabError::io(format!("create {}", run_dir.display()), e))?;
        register_lab(&prefix, &run_dir)?;
        let under = format!("{prefix}-u");
        let etcd_members: Vec<EtcdMember> = (0..self.etcd_members)
            .map(|i| EtcdMember::nth(UNDERLAY_GATEWAY, i))
            .collect();
        let clients: Vec<SocketAddrV4> = etcd_members.iter().map(|m| m.client).collect();
        let mut lab = Lab {
            etcd: Etcd::cluster(&under, &clients),
            etcd_procs: etcd_members.iter().map(|_| None).collect(),
            etcd_members,
            under,
            prefix,
            tag,
            run_dir,
            config,
            hosts: Vec::new(),
            pods: Vec::new(),
            flanneld,
            cni: None,
            ipv6: self.ipv6,
            ip_masq: self.ip_masq,
            agent_args: std::mem::take(&mut self.agent_args),
            agent_env: std::mem::take(&mut self.agent_env),
            die_with_parent: !self.keepable,
            timeout: self.timeout,
            torn_down: false,
            kept: false,
        };
        let mut progress = self.progress.take();
        let mut say = |s: &str| {
            if let Some(p) = progress.as_mut() {
                p(s)
            }
        };
        say(&format!(
            "underlay namespace {} with bridge {}br ({}/{})",
            lab.under, lab.tag, UNDERLAY_GATEWAY, UNDERLAY_PREFIX_LEN
        ));
        lab.create_underlay()?;
        say(&format!(
            "etcd ({} member{}) on {} (inside {})",
            lab.etcd_members.len(),
            if lab.etcd_members.len() == 1 { "" } else { "s" },
            lab.etcd.endpoints(),
            lab.under
        ));
        lab.spawn_etcd()?;
        for i in 0..self.hosts {
            lab.create_host(i)?;
            let h = &lab.hosts[i];
            match h.ip6 {
                Some(a) => say(&format!("host {} at {} and {a} ({})", h.ns, h.ip, h.link)),
                None => say(&format!("host {} at {} ({})", h.ns, h.ip, h.link)),
            }
        }
        lab.wait_etcd()?;
        say(&format!(
            "network config {}/config = {}",
            ETCD_PREFIX, lab.config
        ));
        lab.etcd.put(&lab.config_key(), &lab.config)?;
        if self.start_agents {
            say(&format!("starting flanneld on {} hosts", lab.hosts.len()));
            let stamps: Vec<FileStamp> =
                lab.hosts.iter().map(|h| stamp(&h.subnet_file())).collect();
            for i in 0..lab.hosts.len() {
                lab.spawn_agent(i)?;
            }
            for (i, st) in stamps.into_iter().enumerate() {
                let sub = lab.wait_subnet_file(i, st)?;
                say(&format!(
                    "{}: lease {} (MTU {})",
                    lab.hosts[i].ns, sub.subnet, sub.mtu
                ));
            }
        }
        Ok(lab)
    }
}

impl Lab {
    pub fn builder() -> LabBuilder {
        LabBuilder {
            hosts: 2,
            backend: json!({"Type": "vxlan"}).to_string(),
            network: DEFAULT_NETWORK.to_string(),
            config: None,
            nftables: false,
            etcd_members: 1,
            prefix: None,
            start_agents: true,
            ip_masq: true,
            agent_args: Vec::new(),
            agent_env: Vec::new(),
            keepable: false,
            timeout: Duration::from_secs(60),
            progress: None,
            ipv6: false,
            ipv6_network: None,
        }
    }

    pub(super) fn add_namespace(&self, name: &str) -> Result<()> {
        while_alive(|| ip(&["netns", "add", name]).map(drop))?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    pub(super) fn create_underlay(&mut self) -> Result<()> {
        let u = self.under.clone();
        let br = format!("{}br", self.tag);
        self.add_namespace(&u)?;
        ip(&["-n", &u, "link", "add", &br, "type", "bridge"])?;
        let addr = format!("{UNDERLAY_GATEWAY}/{UNDERLAY_PREFIX_LEN}");
        ip(&["-n", &u, "addr", "add", &addr, "dev", &br])?;
        if self.ipv6 {
            // nodad: usable at once, no wait for duplicate detection on a bridge
            // that only this lab's hosts join.
            let addr6 = format!("{UNDERLAY_V6_GATEWAY}/{UNDERLAY_V6_PREFIX_LEN}");
            ip(&["-n", &u, "addr", "add", &addr6, "dev", &br, "nodad"])?;
        }
        ip(&["-n", &u, "link", "set", &br, "up"])?;
        Ok(())
    }

    pub(super) fn create_host(&mut self, i: usize) -> Result<()> {
        let number = i + 1;
        let ns = format!("{}-h{number}", self.prefix);
        let link = format!("{}h{number}", self.tag);
        let peer = format!("{}u{number}", self.tag);
        let br = format!("{}br", self.tag);
        let ip4 = Ipv4Addr::new(198, 18, 0, number as u8);
        let ip6 = self.ipv6.then(|| underlay_v6(number));
        let dir = self.run_dir.join(format!("h{number}"));
        fs::create_dir_all(&dir)
            .map_err(|e| LabError::io(format!("create {}", dir.display()), e))?;
        self.add_namespace(&ns)?;
        self.hosts.push(Host {
            ns: ns.clone(),
            number,
            ip: ip4,
            ip6,
            link: link.clone(),
            dir,
            agent: None,
            agent_wrapper: None,
            iface_args: None,
            next_pod: 1,
        });
        // Created from inside the host namespace with the peer placed directly in
        // the underlay: no end of the pair ever exists in the root namespace.
        ip(&[
            "-n",
            &ns,
            "link",
            "add",
            &link,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            &self.under,
        ])?;
        ip(&["-n", &self.under, "link", "set", &peer, "master", &br, "up"])?;
        let cidr = format!("{ip4}/{UNDERLAY_PREFIX_LEN}");
        ip(&["-n", &ns, "addr", "add", &cidr, "dev", &link])?;
        if let Some(a) = ip6 {
            let cidr6 = format!("{a}/{UNDERLAY_V6_PREFIX_LEN}");
            ip(&["-n", &ns, "addr", "add", &cidr6, "dev", &link, "nodad"])?;
        }
        ip(&["-n", &ns, "link", "set", &link, "up"])?;
        // flanneld sets no sysctl; a host needs forwarding for its pods. This is
        // per network namespace.
        self.run_in(&ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        if ip6.is_some() {
            self.run_in(&ns, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
        }
        Ok(())
    }
}
