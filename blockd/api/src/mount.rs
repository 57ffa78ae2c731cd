//! Types of the catalog-mount API (`blockctl mount` / `umount`): a
//! read-only FUSE view of one location's cloud snapshots, served by the
//! daemon.

use serde::{Deserialize, Serialize};

/// Default size of a mount's local chunk cache: 2 GiB.
pub const DEFAULT_CACHE_SIZE: u64 = 2 << 30;

/// File-system name of a blockd catalog mount, as `/proc/self/mounts`
/// shows it in the source column (`blockd:<location>`), and its FUSE
/// subtype (the type column reads `fuse.blockd`).
pub const FUSE_NAME: &str = "blockd";

/// Body of `POST /v1/mounts`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountRequest {
    /// Absolute, canonical path of an existing directory.
    pub dir: String,
    /// Location (`--cred-id`); the only one when absent and just one exists.
    #[serde(default)]
    pub location: Option<String>,
    /// Bytes of the local chunk cache; [`DEFAULT_CACHE_SIZE`] when absent.
    #[serde(default)]
    pub cache_size: Option<u64>,
    /// Let users other than the daemon's own open the tree.
    #[serde(default)]
    pub allow_other: bool,
}

/// A mount as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountInfo {
    /// Mount point.
    pub dir: String,
    /// Location shown.
    pub location: String,
    /// Bytes of the local chunk cache.
    pub cache_size: u64,
    /// Other users may open the tree.
    pub allow_other: bool,
}

/// True when `mounts` (the text of `/proc/self/mounts`) lists a blockd
/// catalog mount at `dir`. Both the daemon (refusing to mount twice) and
/// `blockctl umount` (finding a stale mount after a daemon crash) use it.
pub fn is_catalog_mount(mounts: &str, dir: &str) -> bool {
    mounts.lines().any(|line| {
        let mut f = line.split(' ');
        let (Some(source), Some(point), Some(fstype)) = (f.next(), f.next(), f.next()) else {
            return false;
        };
        unescape_mount_field(point) == dir
            && (fstype == format!("fuse.{FUSE_NAME}")
                || (fstype.starts_with("fuse")
                    && (source == FUSE_NAME || source.starts_with(&format!("{FUSE_NAME}:")))))
    })
}

/// Undoes the octal escapes (`\040` for a space, ...) of a
/// `/proc/self/mounts` field.
fn unescape_mount_field(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                if let Ok(byte) = u8::try_from(v) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_catalog_mounts() {
        let m = "proc /proc proc rw 0 0\n\
                 blockd:local /mnt/cat fuse.blockd ro,nosuid,nodev 0 0\n\
                 blockd:s3 /mnt/with\\040space fuse ro 0 0\n\
                 nbdfuse /mnt/other fuse.nbdfuse rw 0 0\n";
        assert!(is_catalog_mount(m, "/mnt/cat"));
        assert!(is_catalog_mount(m, "/mnt/with space"));
        assert!(!is_catalog_mount(m, "/mnt/other"));
        assert!(!is_catalog_mount(m, "/proc"));
        assert!(!is_catalog_mount(m, "/mnt"));
    }
}
