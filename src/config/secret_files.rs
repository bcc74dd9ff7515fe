//! Secret files open to others: `server.tls_key`, each `secret_access_key_file`, each
//! `pkcs11.pin_file` and each software `key_file` whose mode lets in others or a group other than
//! the proxy's own. Warned about at start-up and by `config check`; never a failure.

use std::fmt;
#[cfg(unix)]
use std::path::Path;

use super::{Config, NamedFile};
use crate::keystore::BackendSettings;

/// A file holding a secret that group or others may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadableSecret {
    pub file: NamedFile,
    /// The file's permission bits.
    pub mode: u32,
}

impl fmt::Display for ReadableSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} is open to group or others (mode {:04o}), though it holds a secret: chmod go= it",
            self.file.field,
            self.file.path.display(),
            self.mode
        )
    }
}

impl Config {
    /// The secret files this configuration names (`server.tls_key`, each
    /// `secret_access_key_file`, each `pkcs11.pin_file`, each software `key_file`) whose mode lets
    /// others in, or a group other than the proxy's own. A file that cannot be examined is left out:
    /// reading it fails with its own error.
    pub fn readable_secrets(&self) -> Vec<ReadableSecret> {
        let mut named = vec![NamedFile {
            field: "server.tls_key".into(),
            path: self.server.tls.key.clone(),
        }];
        for (i, keystore) in self.keystores.iter().enumerate() {
            let (field, path) = match &keystore.backend {
                BackendSettings::Software { key_file } => ("key_file", Some(key_file)),
                BackendSettings::Pkcs11(settings) => {
                    ("pkcs11.pin_file", settings.pin_file.as_ref())
                }
            };
            named.extend(path.map(|path| NamedFile {
                field: format!("keystore[{i}].{field}"),
                path: path.clone(),
            }));
        }
        named.extend(self.secret_files.iter().cloned());
        named
            .into_iter()
            .filter_map(|file| {
                let mode = group_or_other_accessible(&file.path)?;
                Some(ReadableSecret { file, mode })
            })
            .collect()
    }
}

/// The permission bits of `path` when others, or a group other than the proxy's own, have any
/// access to it. Group access for the proxy's own group is how Kubernetes hands a non-root process
/// its Secret volume (`defaultMode: 0440` with `fsGroup`), and it lets in no one else.
#[cfg(unix)]
fn group_or_other_accessible(path: &Path) -> Option<u32> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let metadata = std::fs::metadata(path).ok()?;
    let mode = metadata.permissions().mode() & 0o7777;
    let foreign_group = mode & 0o070 != 0 && !own_groups().contains(&metadata.gid());
    (mode & 0o007 != 0 || foreign_group).then_some(mode)
}

/// The process's effective and supplementary group ids (from `/proc/self/status`; none where it
/// cannot be read, so every group access then counts).
#[cfg(unix)]
fn own_groups() -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return Vec::new();
    };
    let mut groups = Vec::new();
    for line in status.lines() {
        if let Some(gids) = line.strip_prefix("Gid:") {
            // real, effective, saved, filesystem: the effective one.
            groups.extend(
                gids.split_whitespace()
                    .nth(1)
                    .and_then(|g| g.parse::<u32>().ok()),
            );
        } else if let Some(list) = line.strip_prefix("Groups:") {
            groups.extend(
                list.split_whitespace()
                    .filter_map(|g| g.parse::<u32>().ok()),
            );
        }
    }
    groups
}

#[cfg(not(unix))]
fn group_or_other_accessible(_path: &Path) -> Option<u32> {
    None
}
