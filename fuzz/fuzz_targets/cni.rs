//! The CNI plugin in process: stdin and CNI_COMMAND from the fuzzer, everything the
//! plugin may touch confined to a temporary directory, the delegate a script there
//! that reads its config and answers with a minimal result.
//!
//! Input: the first byte picks the command, the rest is stdin.
#![no_main]

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use flannel_core::gojson::FoldedObject;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const COMMANDS: &[&str] = &[
    "ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION", "BOGUS", "",
];

struct Sandbox {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

fn sandbox() -> &'static Sandbox {
    static SB: OnceLock<Sandbox> = OnceLock::new();
    SB.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        std::fs::write(
            root.join("subnet.env"),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        let bin = root.join("bin");
        std::fs::create_dir(&bin).unwrap();
        let p = bin.join("bridge");
        std::fs::write(
            &p,
            "#!/bin/sh\ncat >/dev/null\necho '{\"cniVersion\":\"1.0.0\"}'\n",
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        Sandbox { _dir: dir, root }
    })
}

/// The stdin to hand the plugin, with subnetFile and dataDir pointing into the
/// sandbox; `None` when the input could name a path of its own.
fn confine(root: &Path, stdin: &[u8]) -> Option<Vec<u8>> {
    match serde_json::from_slice::<Value>(stdin) {
        Ok(Value::Object(mut m)) => {
            m.retain(|k, _| !["subnetfile", "datadir"].contains(&k.to_ascii_lowercase().as_str()));
            m.insert(
                "subnetFile".into(),
                Value::String(root.join("subnet.env").display().to_string()),
            );
            m.insert(
                "dataDir".into(),
                Value::String(root.join("data").display().to_string()),
            );
            Some(Value::Object(m).to_string().into_bytes())
        }
        // Not an object to serde_json: passed as it is, unless the plugin's own
        // reader (Go-style folding) would still find a path in it.
        _ => {
            let text = std::str::from_utf8(stdin).ok()?;
            match FoldedObject::parse(text, &["subnetFile", "dataDir"]) {
                Ok(o) if o.raw("subnetFile").is_some() || o.raw("dataDir").is_some() => None,
                _ => Some(stdin.to_vec()),
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, stdin)) = data.split_first() else {
        return;
    };
    let cmd = COMMANDS[sel as usize % COMMANDS.len()];
    let sb = sandbox();
    let Some(stdin) = confine(&sb.root, stdin) else {
        return;
    };
    let data_dir = sb.root.join("data");
    let _ = std::fs::remove_dir_all(&data_dir);
    let env: HashMap<&str, String> = HashMap::from([
        ("CNI_COMMAND", cmd.to_string()),
        ("CNI_CONTAINERID", "fuzz1".to_string()),
        ("CNI_NETNS", "/proc/self/ns/net".to_string()),
        ("CNI_IFNAME", "eth0".to_string()),
        ("CNI_PATH", sb.root.join("bin").display().to_string()),
        (flannel_cni::plugin::SUBNET_FILE_WAIT_ENV, "0".to_string()),
    ]);
    let o = flannel_cni::run(&|k| env.get(k).cloned(), &mut stdin.as_slice());

    // Exit 0, or a CNI error object on stdout.
    if o.exit_code != 0 {
        let v: Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", o.stdout));
        assert!(v["code"].is_u64(), "no code in {v}");
        assert!(v["msg"].is_string(), "no msg in {v}");
        assert!(v["cniVersion"].is_string(), "no cniVersion in {v}");
    } else if cmd == "ADD" {
        // An accepted ADD saved a delegate config with flannel's own keys set.
        let saved: Value =
            serde_json::from_slice(&std::fs::read(data_dir.join("fuzz1")).unwrap()).unwrap();
        assert_eq!(saved["type"], "bridge");
        assert_eq!(saved["ipam"]["ranges"][0][0]["subnet"], "10.244.5.0/24");
    }
    // Nothing escapes the sandbox: the only entries are the ones made here.
    for e in std::fs::read_dir(&sb.root).unwrap() {
        let name = e.unwrap().file_name();
        assert!(
            ["subnet.env", "bin", "data"].contains(&name.to_str().unwrap()),
            "{name:?}"
        );
    }
});
