//! Catalog mounts made where the caller lives: in its mount namespace.
//!
//! A hardened service runs in a mount namespace of its own: systemd's
//! ProtectSystem=, ProtectHome=, PrivateTmp= and ReadWritePaths= each give
//! the service a copy of the host's mount tree whose new mounts do not
//! propagate back (it is a slave of the host's). A FUSE catalog mounted by
//! the daemon there would be invisible to the admin who asked for it. So
//! when the caller of `POST /v1/mounts` is in another mount namespace than
//! the daemon, the mount is made in the caller's: a child process enters
//! that namespace (setns, possible in a single-threaded child only) and
//! runs `fusermount3`, which mounts `/dev/fuse` at the directory and hands
//! the open device back over a socket pair (libfuse's `_FUSE_COMMFD`
//! protocol). The daemon then serves the FUSE session on that descriptor,
//! and keeps the namespace open to unmount it there later.
//!
//! This needs CAP_SYS_ADMIN and CAP_SYS_CHROOT (entering a mount namespace)
//! and the right to open `/proc/PID/ns/mnt` of the caller, which a root
//! daemon has for root callers; for callers of other users the kernel also
//! asks for CAP_SYS_PTRACE, which the shipped unit does not grant, and
//! such a caller is told to mount as root (or through blockd-mount@).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

/// The mount namespace of a caller that is not the daemon's.
#[derive(Debug)]
pub struct CallerNs {
    ns: OwnedFd,
    pid: i32,
}

impl CallerNs {
    /// The mount namespace of process `pid`, when it differs from the
    /// daemon's; `None` when it is the same (or the caller is unknown).
    ///
    /// # Errors
    /// The namespace differs but cannot be opened, with what to do.
    pub fn of(pid: Option<i32>) -> Result<Option<Self>, String> {
        use std::os::unix::fs::MetadataExt;
        let Some(pid) = pid else {
            return Ok(None);
        };
        let path = format!("/proc/{pid}/ns/mnt");
        let ours = std::fs::metadata("/proc/self/ns/mnt").map(|m| (m.dev(), m.ino()));
        let theirs = std::fs::metadata(&path).map(|m| (m.dev(), m.ino()));
        match (ours, theirs) {
            (Ok(a), Ok(b)) if a == b => return Ok(None),
            (Ok(_), Ok(_)) => {}
            // Unknowable: mount where the daemon is, as without namespaces.
            (Err(_), _) => return Ok(None),
            (Ok(_), Err(e)) => return Err(refusal(&e)),
        }
        let ns = std::fs::File::open(&path).map_err(|e| refusal(&e))?;
        Ok(Some(Self { ns: ns.into(), pid }))
    }

    /// `dir` as the caller sees it, from the daemon.
    pub fn view(&self, dir: &Path) -> PathBuf {
        let rel = dir.strip_prefix("/").unwrap_or(dir);
        PathBuf::from(format!("/proc/{}/root", self.pid)).join(rel)
    }

    /// The caller's mount table (`/proc/PID/mounts`).
    pub fn mounts_table(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/mounts", self.pid)).unwrap_or_default()
    }

    /// Mounts `/dev/fuse` at `dir` in the caller's namespace with
    /// `options` (comma-separated) and returns the open device.
    ///
    /// # Errors
    /// fusermount3 missing or failing (its message), or no descriptor back.
    pub fn mount_fuse(&self, dir: &Path, options: &str) -> io::Result<OwnedFd> {
        let (ours, theirs) = UnixStream::pair()?;
        let mut cmd = std::process::Command::new("fusermount3");
        cmd.arg("-o")
            .arg(options)
            .arg("--")
            .arg(dir)
            .env("_FUSE_COMMFD", theirs.as_raw_fd().to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        self.enter_before_exec(&mut cmd, Some(theirs.as_raw_fd()));
        let child = cmd.spawn().map_err(|e| spawn_error("fusermount3", &e))?;
        drop(theirs);
        let out = child.wait_with_output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "fusermount3 in the caller's mount namespace: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        receive_fd(&ours)
    }

    /// Unmounts `dir` in the caller's namespace (`lazy`: detach now).
    ///
    /// # Errors
    /// fusermount3's message (EBUSY when in use).
    pub fn unmount(&self, dir: &Path, lazy: bool) -> io::Result<()> {
        let mut cmd = std::process::Command::new("fusermount3");
        cmd.arg("-u");
        if lazy {
            cmd.arg("-z");
        }
        cmd.arg("--").arg(dir);
        self.enter_before_exec(&mut cmd, None);
        let out = cmd.output().map_err(|e| spawn_error("fusermount3", &e))?;
        if out.status.success() {
            return Ok(());
        }
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if msg.contains("busy") {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        Err(io::Error::other(msg))
    }

    /// Makes `cmd` enter the namespace between fork and exec, and keeps
    /// `inherit` open across the exec.
    #[allow(unsafe_code)]
    fn enter_before_exec(&self, cmd: &mut std::process::Command, inherit: Option<i32>) {
        let ns = self.ns.as_raw_fd();
        // SAFETY: between fork and exec only async-signal-safe calls are
        // made (setns and fcntl), on descriptors the parent keeps open
        // until the child has been spawned.
        unsafe {
            cmd.pre_exec(move || {
                let ns = BorrowedFd::borrow_raw(ns);
                rustix::thread::move_into_link_name_space(
                    ns,
                    Some(rustix::thread::LinkNameSpaceType::Mount),
                )?;
                if let Some(fd) = inherit {
                    rustix::io::fcntl_setfd(
                        BorrowedFd::borrow_raw(fd),
                        rustix::io::FdFlags::empty(),
                    )?;
                }
                Ok(())
            });
        }
    }
}

fn refusal(e: &io::Error) -> String {
    format!(
        "blockd runs in its own mount namespace and cannot enter the caller's to mount there \
         ({e}): run `blockctl mount` as root, or through blockd-mount@.service"
    )
}

fn spawn_error(what: &str, e: &io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::NotFound {
        io::Error::other(format!("{what} not found: install fuse3"))
    } else {
        io::Error::other(format!("running {what}: {e}"))
    }
}

/// The descriptor fusermount3 sends with one byte of data.
fn receive_fd(sock: &UnixStream) -> io::Result<OwnedFd> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut ancillary = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    rustix::net::recvmsg(
        sock.as_fd(),
        &mut [io::IoSliceMut::new(&mut byte)],
        &mut ancillary,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    for msg in ancillary.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = msg {
            if let Some(fd) = fds.next() {
                return Ok(fd);
            }
        }
    }
    Err(io::Error::other(
        "fusermount3 mounted but sent no /dev/fuse descriptor",
    ))
}
