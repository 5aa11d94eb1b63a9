//! End-to-end: the container image of `scripts/image.sh`, proved without a container
//! runtime (crun needs cgroups this machine does not give it) by running its root
//! filesystem directly:
//!
//! * the image is built by the script (or a fresh archive reused), its one layer
//!   unpacked into a temporary directory;
//! * `deploy/kube-flannel.yml` agrees with it: every `image:` is the archive's tag,
//!   the agent's command is the image's entrypoint and an executable there, its flags
//!   are flags of that flanneld, the init containers' sources exist in the image and
//!   the hostPath volumes are where the kubelet looks (/opt/cni/bin, /etc/cni/net.d);
//! * the init containers, run from the image with the manifest's volume mounts (bind
//!   mounts of temporary directories standing in for the host paths, in a private
//!   mount namespace), leave the CNI plugin and the conflist there;
//! * `flanneld --version` from the image prints the tag's version;
//! * in a namespace lab, host 1 runs the image's flanneld (chroot into the root
//!   filesystem, /dev /proc /sys mounted inside `ip netns exec`'s private mount
//!   namespace) while host 2 runs the plain binary, once with iptables and once with
//!   nftables rules: lease in etcd, subnet.env written, masquerade rules in place as
//!   the image's own iptables-save / nft list them, and pods on the two hosts reach
//!   each other.
//!
//! The image is built from the binaries under test (those the lab finds, e.g. debug
//! ones under `scripts/test.sh`) into `<target>/image/e2e/`, and reused while it holds
//! exactly those binaries. `FLANNEL_IMAGE=<archive>` tests a given archive instead,
//! e.g. the release image: `FLANNEL_IMAGE=target/image/flanneld-<version>.oci.tar`.
//! Needs root, and to build: buildah, mmdebstrap and a Debian mirror.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime};

use flannel_lab::bins::{find_binary, find_tool};
use flannel_lab::e2e::{ready, Needs};
use flannel_lab::Lab;
use serde_json::Value;

const VERSION: &str = env!("CARGO_PKG_VERSION");
const MANIFEST: &str = "deploy/kube-flannel.yml";
/// Where the kubelet looks for CNI plugins and network configs.
const KUBELET_CNI_BIN: &str = "/opt/cni/bin";
const KUBELET_CNI_CONF: &str = "/etc/cni/net.d";
/// What flanneld execs (rules engines, cleanup): all of it must be in the image.
const AGENT_TOOLS: &[&str] = &[
    "iptables",
    "iptables-save",
    "iptables-restore",
    "ip6tables",
    "ip6tables-save",
    "ip6tables-restore",
    "iptables-nft",
    "iptables-nft-save",
    "iptables-nft-restore",
    "ip6tables-nft-save",
    "ip6tables-nft-restore",
    "iptables-legacy",
    "iptables-legacy-save",
    "iptables-legacy-restore",
    "ip6tables-legacy-save",
    "ip6tables-legacy-restore",
    "nft",
];

/// Mounts what a program in the root filesystem `$1` needs (the host's /dev, a proc
/// and a sysfs of the current namespaces), bind-mounts each further directory
/// argument up to `--` at the same path inside, then execs `chroot $1 <rest>`. Meant
/// for a private mount namespace (`ip netns exec` makes one; so does `unshare -m`):
/// the mounts vanish with its last process and never show in the root namespace.
const IN_ROOTFS: &str = r#"set -eu
r=$1; shift
mount --rbind /dev "$r/dev"
mount -t proc proc "$r/proc"
mount -t sysfs sysfs "$r/sys"
while [ "$1" != -- ]; do
  src=${1%%=*}; dst=${1#*=}
  mkdir -p "$r$dst"
  mount --bind "$src" "$r$dst"
  shift
done
shift
exec chroot "$r" "$@""#;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The target directory this test binary was built in (`<target>/<profile>/deps/`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors()
        .nth(3)
        .expect("test binary in <target>/<profile>/deps")
        .to_path_buf()
}

/// Where the test builds its image: not the release archive of `scripts/image.sh`,
/// since it holds the binaries under test (debug ones under `scripts/test.sh`).
fn test_archive() -> PathBuf {
    target_dir()
        .join("image/e2e")
        .join(format!("flanneld-{VERSION}.oci.tar"))
}

/// An archive to test instead of building one (`FLANNEL_IMAGE`).
fn given_archive() -> Option<PathBuf> {
    std::env::var_os("FLANNEL_IMAGE").map(PathBuf::from)
}

fn bins_dir() -> PathBuf {
    find_binary("flanneld")
        .expect("flanneld")
        .parent()
        .unwrap()
        .to_path_buf()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn run(mut cmd: impl std::borrow::BorrowMut<Command>) -> Output {
    let cmd = cmd.borrow_mut();
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(o.status.success(), "{cmd:?}: {}\n{}", o.status, text(&o));
    o
}

fn mtime(p: &Path) -> SystemTime {
    fs::metadata(p)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// The image to test: `FLANNEL_IMAGE`, else the test's archive if it is newer than
/// scripts/image.sh and holds exactly the binaries under test, else a new build.
fn image() -> (PathBuf, Image) {
    if let Some(a) = given_archive() {
        eprintln!("e2e_image: testing {}", a.display());
        let img = Image::unpack(&a);
        return (a, img);
    }
    let archive = test_archive();
    let bins = bins_dir();
    let script = workspace().join("scripts/image.sh");
    if archive.is_file() && mtime(&archive) > mtime(&script) {
        let img = Image::unpack(&archive);
        let same = |b: &str| {
            fs::read(img.file(&format!("/opt/bin/{b}"))).ok() == fs::read(bins.join(b)).ok()
        };
        if same("flanneld") && same("flannel") {
            eprintln!("e2e_image: reusing {}", archive.display());
            return (archive, img);
        }
        eprintln!(
            "e2e_image: {} holds other binaries: rebuilding",
            archive.display()
        );
    }
    let t0 = Instant::now();
    let o = run(Command::new(&script)
        .env("CARGO_TARGET_DIR", target_dir())
        .env("IMAGE_BIN_DIR", &bins)
        .env("IMAGE_OUT", &archive));
    eprintln!(
        "e2e_image: scripts/image.sh took {:.0} s:\n{}",
        t0.elapsed().as_secs_f64(),
        text(&o)
    );
    let img = Image::unpack(&archive);
    (archive, img)
}

/// A temporary directory removed on drop, after everything still mounted below it
/// (in this mount namespace) is unmounted; it is left alone if that fails.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "flannel-e2e-image-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    fn mounts_below(&self) -> Vec<String> {
        let dir = self.0.display().to_string();
        let mut v: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|m| m == &dir || m.starts_with(&format!("{dir}/")))
            .collect();
        v.sort();
        v.reverse();
        v
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        for m in self.mounts_below() {
            let _ = Command::new("umount").args(["-l", &m]).status();
        }
        let left = self.mounts_below();
        if !left.is_empty() {
            eprintln!(
                "e2e_image: not removing {}: still mounted: {left:?}",
                self.0.display()
            );
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("e2e_image: remove {}: {e}", self.0.display());
        }
    }
}

/// The unpacked image: its root filesystem, config and tag.
struct Image {
    _dir: TempDir,
    rootfs: PathBuf,
    config: Value,
    /// `org.opencontainers.image.ref.name` of the archive's index.
    tag: String,
    layers: usize,
}

impl Image {
    fn unpack(archive: &Path) -> Image {
        let dir = TempDir::new("rootfs");
        let oci = dir.path().join("oci");
        let rootfs = dir.path().join("rootfs");
        fs::create_dir_all(&oci).unwrap();
        fs::create_dir_all(&rootfs).unwrap();
        run(Command::new("tar")
            .arg("-xf")
            .arg(archive)
            .arg("-C")
            .arg(&oci));
        let blob = |digest: &str| {
            let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
            oci.join("blobs/sha256").join(hex)
        };
        let json = |p: &Path| -> Value {
            serde_json::from_slice(&fs::read(p).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        };
        let index = json(&oci.join("index.json"));
        let entries = index["manifests"].as_array().expect("index manifests");
        assert_eq!(entries.len(), 1, "one image in the archive: {index}");
        let tag = entries[0]["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .expect("ref.name annotation")
            .to_string();
        let manifest = json(&blob(entries[0]["digest"].as_str().unwrap()));
        let config = json(&blob(manifest["config"]["digest"].as_str().unwrap()));
        let layers = manifest["layers"].as_array().expect("layers");
        for l in layers {
            let media = l["mediaType"].as_str().unwrap_or("");
            let z = if media.ends_with("+gzip") {
                "-z"
            } else if media.ends_with(".tar") {
                "--no-auto-compress"
            } else {
                panic!("layer media type {media}")
            };
            run(Command::new("tar")
                .args(["-x", z, "--numeric-owner", "-p", "-f"])
                .arg(blob(l["digest"].as_str().unwrap()))
                .arg("-C")
                .arg(&rootfs));
        }
        Image {
            rootfs,
            config,
            tag,
            layers: layers.len(),
            _dir: dir,
        }
    }

    fn path_env(&self) -> String {
        self.config["config"]["Env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .find_map(|e| e.strip_prefix("PATH="))
            .expect("PATH in the image config")
            .to_string()
    }

    /// `chroot <rootfs> env -i PATH=<image PATH> <args>` (no mounts).
    fn chroot(&self, args: &[&str]) -> Command {
        let mut c = Command::new("chroot");
        c.arg(&self.rootfs)
            .args(["env", "-i", &format!("PATH={}", self.path_env())])
            .args(args);
        c
    }

    /// The argv prefix that runs a program from the image with /dev, /proc, /sys
    /// and the bind mounts `binds` (host dir, path inside), for a private mount
    /// namespace ([`IN_ROOTFS`]).
    fn in_rootfs(&self, binds: &[(&Path, &str)]) -> Vec<String> {
        let mut v = vec![
            "sh".to_string(),
            "-c".into(),
            IN_ROOTFS.into(),
            "in-rootfs".into(),
            self.rootfs.display().to_string(),
        ];
        for (src, dst) in binds {
            v.push(format!("{}={dst}", src.display()));
        }
        v.push("--".into());
        v.extend([
            "env".into(),
            "-i".into(),
            format!("PATH={}", self.path_env()),
        ]);
        v
    }

    fn file(&self, p: &str) -> PathBuf {
        self.rootfs.join(p.trim_start_matches('/'))
    }
}

/// The manifest's documents.
fn manifest_docs() -> Vec<Value> {
    let text = fs::read_to_string(workspace().join(MANIFEST)).unwrap();
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("manifest YAML");
    docs.into_iter().filter(|v| !v.is_null()).collect()
}

fn find_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {MANIFEST}"))
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|s| s.as_str().expect("string").to_string())
        .collect()
}

/// Docker's normalisation of an image reference: a registry is added if missing.
fn normalise(image: &str) -> String {
    let first = image.split('/').next().unwrap_or("");
    if image.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost") {
        image.to_string()
    } else if image.contains('/') {
        format!("docker.io/{image}")
    } else {
        format!("docker.io/library/{image}")
    }
}

/// Everything the manifest says about the image, checked against it; returns the
/// DaemonSet's pod spec.
fn check_manifest_against_image(img: &Image, docs: &[Value]) -> Value {
    let ds = find_kind(docs, "DaemonSet");
    let spec = ds["spec"]["template"]["spec"].clone();
    let containers: Vec<&Value> = spec["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(spec["containers"].as_array().into_iter().flatten())
        .collect();
    assert!(containers.len() >= 3, "{containers:?}");
    for c in &containers {
        let image = c["image"].as_str().expect("image");
        assert_eq!(
            normalise(image),
            normalise(&img.tag),
            "{MANIFEST}: container {} runs {image}, the image is tagged {}",
            c["name"],
            img.tag
        );
        // Whatever the container runs must be in the image.
        let cmd = strs(&c["command"]);
        let prog = cmd.first().expect("every container names its command");
        let o = run(img.chroot(&["sh", "-c", "command -v \"$0\"", prog]));
        let resolved = String::from_utf8_lossy(&o.stdout).trim().to_string();
        let meta = fs::metadata(img.file(&resolved)).unwrap();
        assert!(meta.permissions().mode() & 0o111 != 0, "{resolved}");
    }
    assert!(img.tag.ends_with(&format!(":{VERSION}")), "{}", img.tag);

    // The agent: the image's entrypoint, flags its flanneld knows.
    let agent = spec["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "kube-flannel")
        .expect("kube-flannel container");
    let entry = strs(&img.config["config"]["Entrypoint"]);
    assert_eq!(
        strs(&agent["command"]),
        entry,
        "command vs image entrypoint"
    );
    assert_eq!(entry, ["/opt/bin/flanneld"]);
    let help = text(&run(img.chroot(&["/opt/bin/flanneld", "--help"])));
    for a in strs(&agent["args"]) {
        let flag = a.split('=').next().unwrap();
        let known = help.match_indices(flag).any(|(i, _)| {
            let next = help[i + flag.len()..].chars().next().unwrap_or(' ');
            !next.is_alphanumeric() && next != '-'
        });
        assert!(
            flag.starts_with("--") && known,
            "{MANIFEST}: flanneld arg {a} is not a flag of the image's flanneld:\n{help}"
        );
    }

    // Where the CNI files go on the host: the kubelet's directories.
    let host_path = |name: &str| -> String {
        spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .and_then(|v| v["hostPath"]["path"].as_str())
            .unwrap_or_else(|| panic!("hostPath volume {name}"))
            .to_string()
    };
    assert_eq!(host_path("cni-plugin"), KUBELET_CNI_BIN);
    assert_eq!(host_path("cni"), KUBELET_CNI_CONF);
    assert_eq!(host_path("run"), "/run/flannel");
    spec
}

/// Runs every init container from the image, each volume a temporary directory
/// (hostPath) or the config map's files (configMap); returns the stand-ins by
/// volume name.
fn run_init_containers(
    img: &Image,
    docs: &[Value],
    spec: &Value,
    tmp: &Path,
) -> Vec<(String, PathBuf)> {
    let cm = find_kind(docs, "ConfigMap");
    let mut volumes = Vec::new();
    for v in spec["volumes"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap().to_string();
        let dir = tmp.join(format!("vol-{name}"));
        fs::create_dir_all(&dir).unwrap();
        if v.get("configMap").is_some() {
            assert_eq!(v["configMap"]["name"], cm["metadata"]["name"]);
            for (k, data) in cm["data"].as_object().unwrap() {
                fs::write(dir.join(k), data.as_str().unwrap()).unwrap();
            }
        }
        volumes.push((name, dir));
    }
    for c in spec["initContainers"].as_array().unwrap() {
        let mut binds: Vec<(&Path, &str)> = Vec::new();
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let name = m["name"].as_str().unwrap();
            let (_, dir) = volumes
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("volume {name}"));
            binds.push((dir.as_path(), m["mountPath"].as_str().unwrap()));
        }
        let mut argv = img.in_rootfs(&binds);
        argv.extend(strs(&c["command"]));
        argv.extend(strs(&c["args"]));
        let o = run(Command::new("unshare")
            .args(["--mount", "--propagation", "private"])
            .args(&argv));
        eprintln!("e2e_image: init container {} ran: {}", c["name"], text(&o));
    }
    volumes
}

fn check_install_cni(img: &Image, docs: &[Value], spec: &Value) {
    let tmp = TempDir::new("cni");
    let volumes = run_init_containers(img, docs, spec, tmp.path());
    let vol = |n: &str| volumes.iter().find(|(v, _)| v == n).unwrap().1.clone();
    // /opt/cni/bin/flannel: the image's plugin, executable.
    let plugin = vol("cni-plugin").join("flannel");
    assert_eq!(
        fs::read(&plugin).expect("plugin installed"),
        fs::read(img.file("/opt/bin/flannel")).unwrap()
    );
    assert!(fs::metadata(&plugin).unwrap().permissions().mode() & 0o111 != 0);
    // /etc/cni/net.d/10-flannel.conflist: the config map's conflist, naming that plugin.
    let conflist = fs::read_to_string(vol("cni").join("10-flannel.conflist")).unwrap();
    let cm = find_kind(docs, "ConfigMap");
    assert_eq!(conflist, cm["data"]["cni-conf.json"].as_str().unwrap());
    let conf: Value = serde_json::from_str(&conflist).unwrap();
    assert_eq!(conf["plugins"][0]["type"], "flannel");
    // And the plugin runs: VERSION needs no network.
    let o = run(Command::new(&plugin)
        .env("CNI_COMMAND", "VERSION")
        .stdin(fs::File::open(vol("cni").join("10-flannel.conflist")).unwrap()));
    assert!(text(&o).contains("supportedVersions"), "{}", text(&o));
}

/// Host 1 runs the image's flanneld, host 2 the plain binary.
fn lab_with_image_agent(img: &Image, nft: bool) {
    let mut lab = Lab::builder()
        .hosts(2)
        .nftables(nft)
        .ip_masq(true)
        .start_agents(false)
        .timeout(Duration::from_secs(90))
        .build()
        .expect("lab");
    let ns = lab.hosts()[0].ns.clone();
    let host_dir = lab.hosts()[0].dir.clone();
    let hd = host_dir.display().to_string();
    let prefix = img.in_rootfs(&[(host_dir.as_path(), hd.as_str())]);
    let prefix: Vec<&str> = prefix.iter().map(String::as_str).collect();
    lab.set_agent_wrapper(0, &prefix, Path::new("/opt/bin/flanneld"))
        .unwrap();
    lab.start_agent(0).expect("image flanneld on host 1");
    lab.start_agent(1).expect("plain flanneld on host 2");
    // Host 1's agent is the image's binary, rooted in the image.
    let pid = lab.agent_pid(0).expect("image flanneld runs");
    let root = fs::read_link(format!("/proc/{pid}/root")).unwrap();
    assert_eq!(
        root, img.rootfs,
        "host 1's flanneld is not chrooted into the image"
    );
    let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe, img.file("/opt/bin/flanneld"));

    // Lease and subnet.env.
    let sub = lab.subnet_file(0).unwrap().expect("subnet.env on host 1");
    assert!(sub.ip_masq, "{}", sub.text);
    let lease = lab.get_lease(0).unwrap().expect("host 1's lease in etcd");
    assert!(lease.contains("198.18.0.1"), "{lease}");

    // The masquerade rules, as the image's own tools see them.
    let in_image = |args: &[&str]| -> String {
        let mut argv: Vec<&str> = prefix.clone();
        argv.extend_from_slice(args);
        let out = lab.exec_in(&ns, &argv).unwrap();
        assert!(out.status.success(), "{argv:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let t0 = Instant::now();
    loop {
        let ok = if nft {
            let t = in_image(&["nft", "list", "table", "ip", "flannel-ipv4"]);
            t.matches("masquerade").count() == 2 && t.contains("hook postrouting")
        } else {
            let t = in_image(&["iptables-save", "-t", "nat"]);
            t.lines()
                .filter(|l| l.starts_with("-A FLANNEL-POSTRTG") && l.contains("-j MASQUERADE"))
                .count()
                == 2
                && t.lines()
                    .any(|l| l.starts_with("-A POSTROUTING") && l.ends_with("-j FLANNEL-POSTRTG"))
        };
        if ok {
            break;
        }
        assert!(
            t0.elapsed() < lab.timeout(),
            "no masquerade rules on host 1 (nft={nft}):\n{}\n{}",
            in_image(&["iptables-save"]),
            in_image(&["nft", "list", "ruleset"])
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "e2e_image: nft={nft}: host 1 (image flanneld pid {pid}): lease {} MTU {}, rules:\n{}",
        sub.subnet,
        sub.mtu,
        if nft {
            in_image(&["nft", "list", "table", "ip", "flannel-ipv4"])
        } else {
            in_image(&["iptables-save", "-t", "nat"])
        }
    );
    if !nft {
        // The image's iptables is the nf_tables variant (Debian's default).
        let v = in_image(&["iptables", "--version"]);
        assert!(v.contains("nf_tables"), "{v}");
    }

    // A pod on the image's host and one on the plain host reach each other.
    let a = lab.add_pod(0).unwrap();
    let b = lab.add_pod(1).unwrap();
    let (ia, ib) = (lab.pod(a).unwrap().ip, lab.pod(b).unwrap().ip);
    assert!(sub.subnet.contains(&ia), "{ia} not in {}", sub.subnet);
    lab.wait_reachable(a, ib).unwrap();
    lab.wait_reachable(b, ia).unwrap();
    let s = lab.ping(a, ib, 5).unwrap();
    assert!(s.all_replied(), "{s:?}");
    lab.check_agents().unwrap();
    lab.stop_agent(0).expect("image flanneld exits on SIGTERM");
    lab.teardown().unwrap();
}

fn tools_ready(what: &str) -> bool {
    if !ready(what, Needs::Agents) {
        return false;
    }
    let mut need = vec!["tar", "chroot", "unshare", "mount", "umount"];
    if given_archive().is_none() {
        need.extend(["buildah", "mmdebstrap"]);
    }
    for tool in need {
        if let Err(e) = find_tool(tool) {
            if std::env::var("FLANNEL_E2E").as_deref() == Ok("1") {
                panic!("{what}: FLANNEL_E2E=1 but {e} (scripts/prereqs.sh installs it)");
            }
            eprintln!("skipping {what}: {e} (set FLANNEL_E2E=1 to make this a failure)");
            return false;
        }
    }
    true
}

#[test]
fn image_runs_as_the_manifest_says() {
    if !tools_ready("e2e_image") {
        return;
    }
    let (archive, img) = image();
    let size = fs::metadata(&archive).unwrap().len();
    eprintln!(
        "e2e_image: {} ({:.1} MiB), tag {}, {} layer(s)",
        archive.display(),
        size as f64 / 1048576.0,
        img.tag,
        img.layers
    );
    assert_eq!(img.layers, 1, "image.sh squashes into one layer");
    assert_eq!(img.config["os"], "linux");

    // The version the tag says.
    let o = run(img.chroot(&["/opt/bin/flanneld", "--version"]));
    assert_eq!(text(&o).trim(), VERSION);
    assert_eq!(img.tag.rsplit(':').next(), Some(VERSION));
    assert_eq!(
        img.config["config"]["Labels"]["org.opencontainers.image.version"],
        VERSION
    );

    // What the agent execs is there.
    let mut script = String::from("for t in");
    for t in AGENT_TOOLS {
        script.push(' ');
        script.push_str(t);
    }
    script.push_str("; do command -v $t >/dev/null || { echo missing $t; exit 1; }; done");
    run(img.chroot(&["sh", "-c", &script]));

    let docs = manifest_docs();
    let spec = check_manifest_against_image(&img, &docs);
    check_install_cni(&img, &docs, &spec);

    lab_with_image_agent(&img, false);
    lab_with_image_agent(&img, true);
}

#[test]
fn image_references_normalise_like_docker() {
    assert_eq!(
        normalise("flannel-rs/flanneld:0.1.0"),
        "docker.io/flannel-rs/flanneld:0.1.0"
    );
    assert_eq!(
        normalise("docker.io/flannel-rs/flanneld:0.1.0"),
        "docker.io/flannel-rs/flanneld:0.1.0"
    );
    assert_eq!(normalise("ghcr.io/a/b:1"), "ghcr.io/a/b:1");
    assert_eq!(normalise("busybox:1"), "docker.io/library/busybox:1");
}
