//! Certificates made by the repository's `scripts/pki.sh`, for tests of what a server or a
//! client refuses.

use std::path::{Path, PathBuf};

use crate::{repository, unique_id};

/// A certificate authority of a test's own, which no server of the tests trusts, made by
/// `scripts/pki.sh ca` in a temporary folder removed when this is dropped.
#[derive(Debug)]
pub struct OtherCa {
    dir: PathBuf,
}

impl OtherCa {
    /// # Panics
    /// When `scripts/pki.sh` fails.
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("other-ca-{}", unique_id(32)));
        pki(&dir, &["ca"]);
        Self { dir }
    }

    /// Its certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// A client certificate for `name` and its key, signed by this CA.
    ///
    /// # Panics
    /// When `scripts/pki.sh` fails.
    pub fn issue(&self, name: &str) -> (PathBuf, PathBuf) {
        issue(&self.dir, name)
    }
}

impl Default for OtherCa {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for OtherCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `scripts/pki.sh issue name` with the CA in `dir` (made there when missing): the certificate
/// for `name` and its key.
///
/// # Panics
/// When `scripts/pki.sh` fails.
pub fn issue(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    pki(dir, &["issue", name]);
    (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    )
}

/// `scripts/pki.sh renew name` with the CA in `dir`: a new key and certificate in place of
/// `name`'s.
///
/// # Panics
/// When `scripts/pki.sh` fails.
pub fn renew(dir: &Path, name: &str) {
    pki(dir, &["renew", name]);
}

fn pki(dir: &Path, args: &[&str]) {
    let output = std::process::Command::new(repository().join("scripts/pki.sh"))
        .args(args)
        .env("PKI_DIR", dir)
        .output()
        .expect("run scripts/pki.sh");
    assert!(
        output.status.success(),
        "pki.sh {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
