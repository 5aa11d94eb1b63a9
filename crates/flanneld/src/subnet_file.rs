//! Writing subnet.env atomically: a reader (the CNI plugin) sees the old file or the
//! new one, never a half-written one.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use flannel_core::{PreviousSubnets, SubnetEnv};

/// Writes `env` to `path` via a temp file in the same directory and a rename. The
/// file is mode 0644 whatever the umask (as HEAD flanneld), its directory 0755.
pub fn write(path: &Path, env: &SubnetEnv) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".subnet.env.")
        .tempfile_in(dir)?;
    tmp.write_all(env.render().as_bytes())?;
    tmp.as_file().sync_all()?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(0o644))?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// The subnets a previous run wrote (empty when the file is missing or unreadable).
pub fn read_previous(path: &Path) -> PreviousSubnets {
    match fs::read_to_string(path) {
        Ok(text) => PreviousSubnets::parse(&text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => PreviousSubnets::default(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the previous subnet file; allocating afresh");
            PreviousSubnets::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn writes_atomically_with_mode_0644_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/flannel/subnet.env");
        let env = SubnetEnv {
            network: Some("10.244.0.0/16".parse().unwrap()),
            subnet: Some("10.244.7.0/24".parse().unwrap()),
            ipv6_network: None,
            ipv6_subnet: None,
            mtu: 1450,
            ip_masq: false,
        };
        write(&path, &env).unwrap();
        write(&path, &env).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), env.render());
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o644);
        assert_eq!(
            fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1,
            "no temp file left"
        );
        assert_eq!(read_previous(&path).subnet, env.subnet);
        assert_eq!(
            read_previous(&dir.path().join("missing")),
            PreviousSubnets::default()
        );
    }
}
