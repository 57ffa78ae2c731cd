//! `blockctl mount DIR` / `blockctl umount DIR`: the read-only catalog
//! tree of a location, served by the daemon (which holds the credentials
//! and keys; this process only asks).

use crate::failure::Failure;
use std::path::{Path, PathBuf};

use blockd_api::mount::is_catalog_mount;
use blockd_api::{human_size, MountInfo, MountRequest};
use clap::Args;

use crate::client::Client;
use crate::output::{line, Output};
use crate::{encode, size_arg};

/// Arguments of `blockctl mount`.
#[derive(Debug, Args)]
pub struct MountArgs {
    /// Empty directory to mount the catalog at; it then holds
    /// VOLUME/SNAPSHOT/disk.img, VOLUME/latest and groups/GROUP
    dir: PathBuf,
    /// Credentials whose snapshots to show [default: the only ones, when just one exists]
    #[arg(long, alias = "cr", value_name = "NAME")]
    cred_id: Option<String>,
    /// Local chunk cache size, e.g. 2G (K, M, G, T, P are powers of 1024) [default: 2G]
    #[arg(long, value_name = "SIZE", value_parser = size_arg, allow_hyphen_values = true)]
    cache_size: Option<u64>,
    /// Let other users than the daemon's open the tree
    #[arg(long)]
    allow_other: bool,
}

/// Arguments of `blockctl umount`.
#[derive(Debug, Args)]
pub struct UmountArgs {
    /// The mount point given to `blockctl mount`
    dir: PathBuf,
}

fn mounts_table() -> String {
    std::fs::read_to_string("/proc/self/mounts").unwrap_or_default()
}

/// The absolute path of `dir`, symlinks resolved. A stale FUSE mount
/// cannot be resolved itself ("Transport endpoint is not connected"): its
/// parent is, and its name is kept.
fn absolute(dir: &Path) -> Result<PathBuf, String> {
    if let Ok(p) = std::fs::canonicalize(dir) {
        return Ok(p);
    }
    let abs = std::path::absolute(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .map(|p| p.join(name))
            .map_err(|e| format!("{}: {e}", parent.display())),
        _ => Ok(abs),
    }
}

/// `blockctl mount DIR`.
pub async fn mount(out: Output, client: &Client, args: &MountArgs) -> Result<(), Failure> {
    let shown = args.dir.display();
    let dir = match std::fs::canonicalize(&args.dir) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "{shown} does not exist: create the mount point first (mkdir -p {shown})"
            )
            .into())
        }
        Err(e) => {
            return Err(format!(
            "cannot use {shown}: {e}; if it is a stale blockd mount, run `blockctl umount {shown}`"
        )
            .into())
        }
    };
    let dir_s = dir.display().to_string();
    // First: a catalog mount whose daemon died cannot even be looked at.
    if is_catalog_mount(&mounts_table(), &dir_s) {
        return Err(format!(
            "{dir_s} is already a blockd catalog mount (or a stale one, left by a blockd that stopped): use it, or `blockctl umount {dir_s}` first"
        )
        .into());
    }
    match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(
                format!("{shown} is not a directory: give an empty directory to mount at").into(),
            )
        }
        Err(e) => {
            return Err(format!(
            "cannot use {shown}: {e}; if it is a stale mount, unmount it first (`umount {shown}`)"
        )
            .into())
        }
    }
    let req = MountRequest {
        dir: dir_s,
        location: args.cred_id.clone(),
        cache_size: args.cache_size,
        allow_other: args.allow_other,
    };
    let m: MountInfo = client.call("POST", "/v1/mounts", Some(&req)).await?;
    out.answer(&m, |m| {
        line(format_args!(
            "mounted location {} at {} (chunk cache {}{})",
            m.location,
            m.dir,
            human_size(m.cache_size),
            if m.allow_other {
                ", other users allowed"
            } else {
                ""
            }
        ));
    });
    Ok(())
}

/// `blockctl umount DIR`: through the daemon; a mount the daemon does not
/// know (left by a blockd that crashed) is detached here.
pub async fn umount(out: Output, client: &Client, args: &UmountArgs) -> Result<(), Failure> {
    let dir = absolute(&args.dir)?;
    let dir_s = dir.display().to_string();
    let known = match client
        .call::<(), Vec<MountInfo>>("GET", "/v1/mounts", None)
        .await
    {
        Ok(list) => Ok(list.iter().any(|m| m.dir == dir_s)),
        Err(e) => Err(e),
    };
    let stale = match known {
        Ok(true) => {
            client
                .call_empty("DELETE", &format!("/v1/mounts?dir={}", encode(&dir_s)))
                .await?;
            false
        }
        Ok(false) | Err(_) if is_catalog_mount(&mounts_table(), &dir_s) => {
            detach_stale(&dir)?;
            true
        }
        Ok(false) if !dir.is_dir() => {
            return Err(format!(
                "{dir_s} is not a directory, so nothing is mounted there: give the directory given to `blockctl mount`"
            )
            .into())
        }
        Ok(false) => {
            return Err(format!(
                "{dir_s} is not a blockd catalog mount (mount one with `blockctl mount {dir_s}`)"
            )
            .into())
        }
        Err(e) => return Err(e),
    };
    out.answer(
        &serde_json::json!({ "unmounted": dir_s, "stale": stale }),
        |_| {
            if stale {
                line(format_args!(
                    "{dir_s} was a stale blockd mount (the daemon that served it is gone): detached it with fusermount3 -u -z"
                ));
            } else {
                line(format_args!("unmounted {dir_s}"));
            }
        },
    );
    Ok(())
}

/// Lazily unmounts a stale mount: `fusermount3 -u -z`, else `umount -l`.
fn detach_stale(dir: &Path) -> Result<(), String> {
    let run = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .arg(dir)
            .output()
            .map_err(|e| format!("{cmd}: {e}"))
            .and_then(|o| {
                if o.status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "{cmd}: {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    ))
                }
            })
    };
    run("fusermount3", &["-u", "-z"]).or_else(|first| {
        run("umount", &["-l"]).map_err(|second| {
            format!(
                "cannot detach the stale mount at {}: {first}; {second}",
                dir.display()
            )
        })
    })
}
