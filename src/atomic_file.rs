//! Replacing a file whole or not at all: the state files the proxy writes (software key file,
//! IV-budget ledger, development certificates) are written to a fresh temporary file beside the
//! target, synced, and renamed over it, readable by the owner only.
//!
//! The temporary file has a random name and is created with `O_CREAT | O_EXCL | O_NOFOLLOW`: a
//! file or symlink left (or planted) beside the target is never opened, so it can neither lend
//! the result its mode nor redirect the write elsewhere. The mode is set on the open file before
//! anything is written, whatever the umask or the file system's defaults.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// How many fresh names to try before giving up (a clash of 64 random bits means someone is
/// creating names in the directory on purpose).
const ATTEMPTS: usize = 8;

/// Writes `contents` to `path` atomically with mode 0600, creating the parent directory.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        fs::create_dir_all(dir)?;
    }
    let (tmp, mut out) = create_temporary(path)?;
    let written = (|| {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            out.set_permissions(fs::Permissions::from_mode(0o600))?;
        }
        out.write_all(contents)?;
        out.sync_all()?;
        drop(out);
        fs::rename(&tmp, path)
    })();
    if let Err(error) = written {
        let _ = fs::remove_file(&tmp);
        return Err(error);
    }
    // The rename is durable once the directory is synced; some file systems cannot sync a
    // directory, and the file's own contents are already on disk, so a failure here is ignored.
    #[cfg(unix)]
    if let Ok(dir) = fs::File::open(dir.unwrap_or(Path::new("."))) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Creates a new, empty temporary file in `path`'s directory, never reusing an existing name.
fn create_temporary(path: &Path) -> std::io::Result<(PathBuf, fs::File)> {
    let name = path.file_name().unwrap_or_default();
    let mut last_error = None;
    for _ in 0..ATTEMPTS {
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.tmp", hex::encode(nonce)));
        let tmp = path.with_file_name(tmp_name);
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600).custom_flags(libc::O_NOFOLLOW);
        }
        match options.open(&tmp) {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last_error = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_error.unwrap_or_else(|| std::io::Error::other("no temporary file name was free")))
}

#[cfg(test)]
mod tests {
    #[cfg(unix)]
    use std::os::unix::fs::PermissionsExt;

    #[cfg(unix)]
    fn mode(path: &std::path::Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn replaces_the_file_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("state.json");
        super::write_private(&path, b"one").unwrap();
        super::write_private(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        #[cfg(unix)]
        assert_eq!(mode(&path), 0o600);
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }

    /// The old fixed temporary name (`<name>.tmp`), planted as a symlink to another file or left
    /// world-readable, is neither followed nor reused.
    #[cfg(unix)]
    #[test]
    fn a_planted_temporary_file_or_symlink_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"victim's contents").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
        let planted = dir.path().join("state.json.tmp");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();

        super::write_private(&path, b"secret").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
        assert_eq!(mode(&path), 0o600);
        assert!(!std::fs::symlink_metadata(&path).unwrap().is_symlink());
        assert_eq!(std::fs::read(&victim).unwrap(), b"victim's contents");
        assert_eq!(mode(&victim), 0o644);
        assert!(std::fs::symlink_metadata(&planted).unwrap().is_symlink());

        // A world-readable leftover at the old name: the result is still 0600, the leftover is
        // left as it was.
        std::fs::remove_file(&planted).unwrap();
        std::fs::write(&planted, b"leftover").unwrap();
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o666)).unwrap();
        super::write_private(&path, b"again").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"again");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::read(&planted).unwrap(), b"leftover");
        // Only the target, the victim and the leftover: no temporary file stays behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
    }

    /// A world-readable target is replaced by a file readable by the owner only.
    #[cfg(unix)]
    #[test]
    fn a_readable_target_becomes_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        super::write_private(&path, b"new").unwrap();
        assert_eq!(mode(&path), 0o600);
    }

    /// A write that cannot complete leaves no temporary file.
    #[test]
    fn a_failed_rename_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        // A non-empty directory at the target: rename fails.
        let path = dir.path().join("state.json");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("inside"), b"x").unwrap();
        assert!(super::write_private(&path, b"new").is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
