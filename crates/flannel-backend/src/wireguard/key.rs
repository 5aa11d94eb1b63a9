//! The node's WireGuard key: `/run/flannel/wgkey` (or `$WIREGUARD_KEY_FILE`), base64
//! text, created mode 0400 when absent and reused after, so the public key in the
//! lease survives restarts. A key file that cannot be read as a key is an error:
//! replacing it silently would change the node's identity under its peers.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use flannel_core::wireguard::{decode_key, encode_key};
use flannel_core::WgPublicKey;
use rand::RngCore;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::BackendError;

/// Upstream's default key file.
pub const DEFAULT_KEY_FILE: &str = "/run/flannel/wgkey";
/// The environment variable that names another key file.
pub const KEY_FILE_ENV: &str = "WIREGUARD_KEY_FILE";

/// Where the key lives: `$WIREGUARD_KEY_FILE` if set (and not empty), else
/// [`DEFAULT_KEY_FILE`].
pub fn key_file_path() -> PathBuf {
    std::env::var_os(KEY_FILE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_KEY_FILE))
}

/// The node's private key. Its `Debug` never shows the key.
pub struct PrivateKey(StaticSecret);

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public {})", self.public_key())
    }
}

impl PrivateKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        PrivateKey(StaticSecret::from(bytes))
    }

    /// The key from its base64 text (as `wg genkey` prints it).
    pub fn from_base64(text: &str) -> Result<Self, flannel_core::wireguard::BadKey> {
        decode_key(text).map(|b| PrivateKey(StaticSecret::from(b)))
    }

    pub fn public_key(&self) -> WgPublicKey {
        WgPublicKey(PublicKey::from(&self.0).to_bytes())
    }

    /// The raw key, for the WireGuard implementation.
    pub fn secret(&self) -> &StaticSecret {
        &self.0
    }

    /// Reads the key file at `path`, or creates it (mode 0400, its directory 0755)
    /// with a new key if it does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, BackendError> {
        let cfg =
            |m: String| BackendError::Config(format!("wireguard key file {}: {m}", path.display()));
        match std::fs::read_to_string(path) {
            Ok(text) => Self::from_base64(&text).map_err(|e| {
                cfg(format!(
                    "{e}; it is left as it is (delete it to have a new key made, which \
                     changes this node's public key)"
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o755)
                        .create(dir)
                        .map_err(|e| cfg(format!("creating its directory: {e}")))?;
                }
                let key = Self::generate();
                // create_new: two agents racing cannot both write a key.
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o400)
                    .open(path)
                    .map_err(|e| cfg(format!("creating it: {e}")))?;
                f.write_all(encode_key(&key.0.to_bytes()).as_bytes())
                    .and_then(|()| f.sync_all())
                    .map_err(|e| cfg(format!("writing it: {e}")))?;
                Ok(key)
            }
            Err(e) => Err(cfg(e.to_string())),
        }
    }
}

/// The optional pre-shared key (`PSK` of the config). Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct PresharedKey(pub [u8; 32]);

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresharedKey(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A private key and the public key `wg pubkey` (wireguard-tools) derives from it.
    const PRIVATE: &str = "YJ9NRzvq2XQqAJcUiC4kBEoYUbsF0xl8ri2UbHjUyGM=";
    const PUBLIC: &str = "Og8JQbvnovUSPSdnlobNNGcXitiQFtiilR78R557IwE=";

    #[test]
    fn public_key_matches_wireguard_tools() {
        let k = PrivateKey::from_base64(PRIVATE).unwrap();
        assert_eq!(k.public_key().to_string(), PUBLIC);
        assert!(
            !format!("{k:?}").contains(PRIVATE),
            "Debug shows the secret"
        );
        assert!(format!("{:?}", PresharedKey([7; 32])).ends_with("(..)"));
    }

    #[test]
    fn key_file_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/flannel/wgkey");
        let a = PrivateKey::load_or_create(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o400);
        let dmeta = std::fs::metadata(path.parent().unwrap()).unwrap();
        assert_eq!(dmeta.permissions().mode() & 0o777, 0o755);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            PrivateKey::from_base64(&text).unwrap().public_key(),
            a.public_key()
        );
        let b = PrivateKey::load_or_create(&path).unwrap();
        assert_eq!(a.public_key(), b.public_key(), "a restart keeps the key");
        // A key written by `wg genkey` (with its newline) is read as well.
        let wg = dir.path().join("wg");
        std::fs::write(&wg, format!("{PRIVATE}\n")).unwrap();
        assert_eq!(
            PrivateKey::load_or_create(&wg)
                .unwrap()
                .public_key()
                .to_string(),
            PUBLIC
        );
    }

    #[test]
    fn a_malformed_key_file_is_an_error_and_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wgkey");
        for bad in ["", "not a key", "AAAA"] {
            std::fs::write(&path, bad).unwrap();
            let e = PrivateKey::load_or_create(&path).unwrap_err().to_string();
            assert!(e.contains("left as it is"), "{e}");
            assert_eq!(std::fs::read_to_string(&path).unwrap(), bad);
        }
    }
}
