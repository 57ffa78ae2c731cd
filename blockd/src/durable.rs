//! Local files that must survive a crash whole: written to a temporary
//! file beside the target, fsynced, renamed over it, and the directory
//! fsynced, so after a crash the target holds the old bytes or the new
//! ones, never a mix, and the rename itself is durable.
//!
//! This module imports nothing of the daemon: every layer may use it.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Replaces `path` with `bytes` atomically and durably (file mode 0644).
///
/// # Errors
/// I/O errors; the temporary file is removed, `path` is left as it was.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_mode(path, bytes, 0o644)
}

/// [`write_atomic`] with the new file's permission bits (`0o600` for
/// secrets: they are never readable by others, not even for a moment).
///
/// # Errors
/// I/O errors; the temporary file is removed, `path` is left as it was.
pub fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut tmp = PathBuf::from(path);
    tmp.as_mut_os_string().push(".tmp");
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// fsyncs a directory, making creations, renames and removals in it durable.
///
/// # Errors
/// I/O errors.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)?.sync_all()
}

/// This boot of the kernel (`/proc/sys/kernel/random/boot_id`): what the
/// page cache held survives a crash of the process, not of the host, so
/// records written without an fsync are trusted only within the boot that
/// wrote them. `BLOCKD_TEST_BOOT_ID` replaces it, so tests can play a
/// host crash by restarting the daemon "in another boot".
pub fn boot_id() -> &'static str {
    static BOOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        if let Some(b) = std::env::var_os("BLOCKD_TEST_BOOT_ID").filter(|b| !b.is_empty()) {
            return b.to_string_lossy().into_owned();
        }
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_whole_and_keeps_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one").unwrap();
        write_atomic_mode(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!dir.path().join("f.tmp").exists());
    }

    #[test]
    fn a_failed_write_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        // The target is a non-empty directory: the rename fails.
        let p = dir.path().join("d");
        std::fs::create_dir_all(p.join("x")).unwrap();
        assert!(write_atomic(&p, b"data").is_err());
        assert!(!dir.path().join("d.tmp").exists());
    }
}
