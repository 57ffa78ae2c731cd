//! Kernel attach: a volume as `/dev/nbdN` on this host, through the
//! kernel's generic-netlink family "nbd" (no nbd-client, no TCP).
//!
//! For each of `--connections` a socket pair is made: blockd serves one
//! end in the NBD transmission phase directly (the kernel client does no
//! handshake; it gets the size and flags in NBD_CMD_CONNECT), and hands
//! the other end to the kernel, which takes its own reference. Detach is
//! NBD_CMD_DISCONNECT; the device is created with DESTROY_ON_DISCONNECT
//! so it goes away with it.
//!
//! Attachments are recorded in `attachments.json` and made again when
//! blockd starts: a device whose sockets died with the previous daemon is
//! given new ones with NBD_CMD_RECONFIGURE while its dead-connection
//! timeout runs (so the file system on it survives a daemon restart), or
//! connected afresh at the same index after. See kernel-notes/nbd.md for
//! timeouts, block size and what the kernel negotiates.

pub mod netlink;

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use blockd_api::{AttachRequest, Attachment};
use netlink_packet_generic::ctrl::GenlCtrl;
use netlink_packet_generic::GenlMessage;

use crate::nbd::NbdContext;
use crate::outcome::Outcome;

use netlink::{Connect, Genl, Nbd, Reply};

/// Why an attach or detach failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttachError {
    /// The running kernel has no nbd driver.
    #[error(
        "this kernel has no nbd driver (generic-netlink family \"nbd\" not found): load it \
         with `modprobe nbd`, or reach the volume as a block device through nbdfuse and \
         losetup as the README shows"
    )]
    NoModule,
    /// No such volume.
    #[error("no volume named {0:?}: list them with `blockctl volume list`")]
    NoVolume(String),
    /// The volume is not exported (a restore fills it, or left it
    /// incomplete).
    #[error("volume {volume} is not exported: {why}")]
    Unexported {
        /// Volume.
        volume: String,
        /// Why.
        why: String,
    },
    /// Already attached.
    #[error(
        "volume {volume} is already attached as {device}: `blockctl volume detach {volume}` first"
    )]
    Attached {
        /// Volume.
        volume: String,
        /// Its device.
        device: String,
    },
    /// Not attached.
    #[error("volume {0} is not attached")]
    NotAttached(String),
    /// A request whose values are wrong (a flag out of range, a device
    /// name that is not one).
    #[error("{0}")]
    Invalid(String),
    /// A request the kernel refuses as things stand.
    #[error("{0}")]
    Refused(String),
    /// The kernel refused.
    #[error("the kernel refused to {what} (errno {errno}: {})", std::io::Error::from_raw_os_error(*errno))]
    Kernel {
        /// What was asked.
        what: &'static str,
        /// errno.
        errno: i32,
    },
    /// The volume is being deleted (or otherwise claimed).
    #[error(transparent)]
    Busy(#[from] crate::claims::Busy),
    /// The device is mounted or held open exclusively.
    #[error(
        "{device} is in use (mounted, or held by device-mapper, md or another exclusive \
         user): unmount it first, or detach with --force, which fails every I/O still \
         in flight on it"
    )]
    InUse {
        /// The device.
        device: String,
    },
    /// Local failure.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl AttachError {
    /// What the error means to the caller.
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::Invalid(_) => Outcome::Invalid,
            Self::NoModule | Self::Refused(_) => Outcome::Refused,
            Self::NoVolume(_) | Self::NotAttached(_) => Outcome::NotFound,
            Self::Attached { .. }
            | Self::Busy(_)
            | Self::InUse { .. }
            | Self::Unexported { .. } => Outcome::Conflict,
            Self::Kernel { errno, .. } if *errno == libc::EBUSY => Outcome::Conflict,
            Self::Kernel { .. } | Self::Io(_) => Outcome::Failed,
        }
    }
}

/// Most connections one attachment may ask for.
pub const MAX_CONNECTIONS: u32 = 16;
/// Default request timeout, seconds.
pub const DEFAULT_TIMEOUT: u64 = 30;
/// How long a device waits for blockd to come back with new sockets.
pub const DEAD_CONN_TIMEOUT: u64 = 120;

/// The attachments of this daemon.
#[derive(Debug)]
pub struct Attachments {
    path: PathBuf,
    active: Mutex<BTreeMap<String, Attachment>>,
    /// One attach or detach at a time: the check and the action are one step.
    changing: tokio::sync::Mutex<()>,
    /// The live links of each attached volume (see [`Link`]).
    links: Mutex<BTreeMap<String, Arc<Link>>>,
}

/// What the connections of one attachment share. The kernel marks a
/// connection dead on any send or receive error (one seen: EAGAIN from an
/// allocation that failed under memory pressure) and shuts its socket
/// down; with blockd still running nothing else would give the device a
/// new one, and it would hold its I/O for the dead-connection timeout and
/// then fail it. So each connection's task, when its socket ends while the
/// link is live, hands the device a new socket with NBD_CMD_RECONFIGURE at
/// once, as nbd-client's persist mode does.
#[derive(Debug)]
struct Link {
    /// False once a detach has begun or the attach failed.
    live: AtomicBool,
    /// The device, once the kernel has named it.
    index: OnceLock<u32>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Attachments {
    /// The attachments recorded under `state_dir` (made again by
    /// [`Attachments::restore`]).
    pub fn new(state_dir: &std::path::Path) -> Self {
        Self {
            path: state_dir.join("attachments.json"),
            active: Mutex::new(BTreeMap::new()),
            changing: tokio::sync::Mutex::new(()),
            links: Mutex::new(BTreeMap::new()),
        }
    }

    /// The device of `volume`, if attached.
    pub fn device_of(&self, volume: &str) -> Option<String> {
        lock(&self.active).get(volume).map(|a| a.device.clone())
    }

    /// Every attachment.
    pub fn list(&self) -> Vec<Attachment> {
        lock(&self.active).values().cloned().collect()
    }

    /// Attaches `volume` as a kernel NBD device.
    ///
    /// # Errors
    /// No nbd driver (checked first, before anything is made), an unknown
    /// or attached volume, bad parameters, the kernel's refusal.
    pub async fn attach(
        &self,
        ctx: &NbdContext,
        volume: &str,
        req: &AttachRequest,
    ) -> Result<Attachment, AttachError> {
        let _one = self.changing.lock().await;
        let index = match req.device.as_deref() {
            None => None,
            Some(d) => Some(parse_device(d)?),
        };
        let connections = req.connections.unwrap_or(1);
        if !(1..=MAX_CONNECTIONS).contains(&connections) {
            return Err(AttachError::Invalid(format!(
                "--connections must be between 1 and {MAX_CONNECTIONS}"
            )));
        }
        let timeout = req.timeout.unwrap_or(DEFAULT_TIMEOUT);
        if timeout == 0 {
            return Err(AttachError::Invalid(
                "--timeout must be at least 1 second".into(),
            ));
        }
        // Attaching what is attached is a no-op (boot units and scripts
        // may ask again); another device is a conflict.
        if let Some(a) = lock(&self.active).get(volume).cloned() {
            if index.is_none_or(|i| i == a.index) {
                return Ok(a);
            }
            return Err(AttachError::Attached {
                volume: volume.into(),
                device: a.device,
            });
        }
        let a = self
            .connect(ctx, volume, index, connections, timeout, false)
            .await?;
        lock(&self.active).insert(volume.to_string(), a.clone());
        self.save()?;
        tracing::info!(volume, device = %a.device, connections, "volume attached");
        Ok(a)
    }

    /// Detaches `volume`. Unless `force`, a device that is mounted (or
    /// held open exclusively) is refused, and the exclusive open taken to
    /// check it is held until the kernel has disconnected the device, so
    /// nothing mounts it in between.
    ///
    /// # Errors
    /// Not attached; in use; the kernel's refusal.
    pub async fn detach(&self, volume: &str, force: bool) -> Result<(), AttachError> {
        let _one = self.changing.lock().await;
        let Some(a) = lock(&self.active).get(volume).cloned() else {
            return Err(AttachError::NotAttached(volume.into()));
        };
        let index = a.index;
        let device = a.device.clone();
        let link = lock(&self.links).get(volume).cloned();
        let ending = link.clone();
        let r = tokio::task::spawn_blocking(move || -> Result<(), AttachError> {
            let _held = if force {
                None
            } else {
                hold_exclusive(&device)?
            };
            // From here the sockets the disconnect closes stay closed.
            if let Some(l) = &ending {
                l.live.store(false, Ordering::SeqCst);
            }
            let replies = ask(on_device(netlink::CMD_DISCONNECT, index))?;
            check(&replies, "disconnect the device")
        })
        .await
        .map_err(|e| AttachError::Io(std::io::Error::other(e.to_string())))?;
        // A device already gone (the kernel dropped it) is detached too.
        match r {
            Ok(())
            | Err(AttachError::Kernel {
                errno: libc::EINVAL | libc::ENOENT,
                ..
            }) => {}
            Err(e) => {
                // Still attached: its connections are kept up again.
                if let Some(l) = &link {
                    l.live.store(true, Ordering::SeqCst);
                }
                return Err(e);
            }
        }
        lock(&self.links).remove(volume);
        lock(&self.active).remove(volume);
        self.save()?;
        tracing::info!(volume, device = %a.device, force, "volume detached");
        Ok(())
    }

    /// Whether the kernel reports `volume`'s device connected
    /// (NBD_CMD_STATUS); `None` when it is not attached or the kernel
    /// does not answer.
    pub async fn kernel_connected(&self, volume: &str) -> Option<bool> {
        let index = lock(&self.active).get(volume)?.index;
        tokio::task::spawn_blocking(move || status(index).ok())
            .await
            .ok()
            .flatten()
    }

    /// Makes the recorded attachments again (at start). Failures are
    /// logged and the record kept, to be retried at the next start.
    pub async fn restore(&self, ctx: &NbdContext) {
        let recorded: Vec<Attachment> = std::fs::read(&self.path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let _one = self.changing.lock().await;
        for a in recorded {
            let r = self
                .connect(
                    ctx,
                    &a.volume,
                    Some(a.index),
                    a.connections,
                    a.timeout,
                    true,
                )
                .await;
            match r {
                Ok(now) => {
                    tracing::info!(volume = %a.volume, device = %now.device, "attachment restored");
                    lock(&self.active).insert(a.volume.clone(), now);
                }
                Err(e) => {
                    tracing::warn!(volume = %a.volume, device = %a.device, error = %e, "attachment not restored; it is retried at the next start");
                    lock(&self.active).insert(a.volume.clone(), a);
                }
            }
        }
    }

    async fn connect(
        &self,
        ctx: &NbdContext,
        volume: &str,
        index: Option<u32>,
        connections: u32,
        timeout: u64,
        again: bool,
    ) -> Result<Attachment, AttachError> {
        // The driver first: on a kernel without it nothing is made.
        let (genl, family) = tokio::task::spawn_blocking(open_family)
            .await
            .map_err(|e| AttachError::Io(std::io::Error::other(e.to_string())))??;
        // Each connection is counted busy here, in the step that finds the
        // volume, so a delete racing this attach either wins first (and
        // the attach fails: no such volume) or is refused as busy.
        let mut guards = Vec::new();
        for _ in 0..connections {
            guards.push(
                ctx.store
                    .connect(volume)
                    .ok_or_else(|| AttachError::NoVolume(volume.into()))?,
            );
        }
        let v = guards[0].volume().clone();
        // A device is an export like any other.
        if let Some(why) = v.unexported() {
            return Err(AttachError::Unexported {
                volume: volume.into(),
                why,
            });
        }
        let c = Connect {
            index,
            size: v.size(),
            block_size: 4096.min(v.extent_size()).max(512),
            timeout,
            dead_conn_timeout: DEAD_CONN_TIMEOUT,
            server_flags: u64::from(crate::nbd::server::attached_flags(&v)),
            backend: format!("blockd:{volume}"),
        };
        let link = Arc::new(Link {
            live: AtomicBool::new(true),
            index: OnceLock::new(),
        });
        let mut kernel_ends = Vec::new();
        for guard in guards {
            let (ours, theirs) = socket_pair()?;
            tokio::spawn(keep_serving(
                ours,
                guard,
                ctx.clone(),
                link.clone(),
                c.clone(),
                volume.to_string(),
            ));
            kernel_ends.push(theirs);
        }
        let fds: Vec<i32> = kernel_ends.iter().map(AsRawFd::as_raw_fd).collect();
        let index = tokio::task::spawn_blocking(move || -> Result<u32, AttachError> {
            let mut genl = genl;
            // Sockets first to a device still waiting for them, else anew.
            if again {
                let replies = genl.exchange::<GenlMessage<Nbd>>(|seq| {
                    netlink::request(family, seq, netlink::connect(&c, &fds, true))
                })?;
                match check(&replies, "reconfigure the device") {
                    Ok(()) => {
                        return c
                            .index
                            .ok_or_else(|| AttachError::Refused("the kernel named no device".into()))
                    }
                    Err(e) => {
                        tracing::info!(device = ?c.index, error = %e, "device not waiting for new sockets; connecting it anew");
                    }
                }
            }
            // A device just detached is destroyed by the kernel a moment
            // after its disconnect (DESTROY_ON_DISCONNECT); until then a
            // connect naming its index is refused with EINVAL ("device at
            // index N is going down"), so it is asked again for a while. A
            // process holding the old device open keeps it going down until
            // it closes; past the wait the refusal says so.
            let asked = std::time::Instant::now();
            let replies = loop {
                let replies = genl.exchange::<GenlMessage<Nbd>>(|seq| {
                    netlink::request(family, seq, netlink::connect(&c, &fds, false))
                })?;
                match (check(&replies, "connect the device"), c.index) {
                    (
                        Err(AttachError::Kernel {
                            errno: libc::EINVAL,
                            ..
                        }),
                        Some(n),
                    ) => {
                        if asked.elapsed() >= GOING_DOWN_WAIT {
                            return Err(AttachError::Refused(format!(
                                "the kernel still refuses /dev/nbd{n} (EINVAL) after {} s: it is \
                                 most likely still going down from a detach while something \
                                 holds it open (see `fuser -v /dev/nbd{n}`); close that and \
                                 try again, or attach without --device",
                                GOING_DOWN_WAIT.as_secs()
                            )));
                        }
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    (r, _) => break r.map(|()| replies)?,
                }
            };
            replies
                .iter()
                .find_map(|r| match r {
                    Reply::Message(m) => m.payload.attrs.iter().find_map(|a| match a {
                        netlink::Attr::Index(i) => Some(*i),
                        _ => None,
                    }),
                    _ => None,
                })
                .or(c.index)
                .ok_or_else(|| AttachError::Refused("the kernel named no device".into()))
        })
        .await
        .map_err(|e| AttachError::Io(std::io::Error::other(e.to_string())))?;
        // The kernel holds its own references now (or the attach failed
        // and closing these ends our side's connections).
        drop(kernel_ends);
        let index = match index {
            Ok(i) => i,
            Err(e) => {
                link.live.store(false, Ordering::SeqCst);
                return Err(e);
            }
        };
        let _ = link.index.set(index);
        lock(&self.links).insert(volume.to_string(), link);
        Ok(Attachment {
            volume: volume.to_string(),
            device: format!("/dev/nbd{index}"),
            index,
            connections,
            timeout,
        })
    }

    fn save(&self) -> std::io::Result<()> {
        let list = self.list();
        let bytes = serde_json::to_vec_pretty(&list).map_err(std::io::Error::other)?;
        crate::durable::write_atomic(&self.path, &bytes)
    }
}

/// How long a connection's task waits before it gives the device a new
/// socket: long enough that a kernel refusing every socket is not spun on.
const RESOCKET_PAUSE: Duration = Duration::from_millis(100);

/// A socket pair: blockd's end for tokio, the kernel's end as it is.
fn socket_pair() -> std::io::Result<(tokio::net::UnixStream, std::os::unix::net::UnixStream)> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    ours.set_nonblocking(true)?;
    Ok((tokio::net::UnixStream::from_std(ours)?, theirs))
}

/// Serves one connection of an attachment and, each time the kernel drops
/// it while the link is live and blockd is not shutting down, gives the
/// device a new socket (see [`Link`]).
async fn keep_serving(
    mut stream: tokio::net::UnixStream,
    mut guard: crate::volume::ConnectionGuard,
    ctx: NbdContext,
    link: Arc<Link>,
    mut c: Connect,
    volume: String,
) {
    loop {
        crate::nbd::server::serve_attached(stream, ctx.clone(), guard).await;
        tokio::time::sleep(RESOCKET_PAUSE).await;
        let (Some(&index), true, false) = (
            link.index.get(),
            link.live.load(Ordering::SeqCst),
            ctx.shutdown.is_cancelled(),
        ) else {
            return;
        };
        let Some(g) = ctx.store.connect(&volume) else {
            return;
        };
        if g.volume().unexported().is_some() {
            return;
        }
        let (ours, theirs) = match socket_pair() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(volume, error = %e, "no socket for the device");
                return;
            }
        };
        c.index = Some(index);
        let request = c.clone();
        let r = tokio::task::spawn_blocking(move || -> Result<(), AttachError> {
            let replies = ask(netlink::connect(&request, &[theirs.as_raw_fd()], true))?;
            check(&replies, "give the device a new socket")
        })
        .await
        .map_err(|e| AttachError::Io(std::io::Error::other(e.to_string())))
        .and_then(|r| r);
        match r {
            Ok(()) => {
                tracing::warn!(
                    volume,
                    device = index,
                    "the kernel dropped a connection of the device; gave it a new socket"
                );
                stream = ours;
                guard = g;
            }
            Err(e) => {
                tracing::warn!(volume, device = index, error = %e, "the kernel dropped a connection of the device and refused a new socket");
                return;
            }
        }
    }
}

/// `/dev/nbdN` or `N`.
fn parse_device(d: &str) -> Result<u32, AttachError> {
    d.strip_prefix("/dev/nbd")
        .unwrap_or(d)
        .parse()
        .map_err(|_| AttachError::Invalid(format!("{d:?} is not an NBD device: give /dev/nbdN")))
}

/// Opens a generic-netlink socket and looks the nbd family up.
fn open_family() -> Result<(Genl, u16), AttachError> {
    let mut genl = Genl::open()?;
    let replies = genl.exchange::<GenlMessage<GenlCtrl>>(netlink::family_request)?;
    match netlink::family_id(&replies) {
        Some(id) => Ok((genl, id)),
        None => Err(AttachError::NoModule),
    }
}

/// An exclusive open of `device`, which the kernel refuses with EBUSY
/// while a file system is mounted on it or device-mapper, md or another
/// `O_EXCL` user holds it. `None` when the node is gone or cannot be
/// opened for another reason (a device without sockets): there is
/// nothing left to protect.
fn hold_exclusive(device: &str) -> Result<Option<std::fs::File>, AttachError> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(device)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(AttachError::InUse {
            device: device.into(),
        }),
        Err(e) => {
            tracing::debug!(device, error = %e, "no exclusive open before detach");
            Ok(None)
        }
    }
}

/// NBD_CMD_STATUS for device `index`: whether it is connected.
fn status(index: u32) -> Result<bool, AttachError> {
    let replies = ask(on_device(netlink::CMD_STATUS, index))?;
    check(&replies, "report the device's status")?;
    Ok(netlink::connected(&replies, index).unwrap_or(false))
}

/// Sends `msg` to the nbd family and returns the kernel's answer.
fn ask(msg: Nbd) -> Result<Vec<Reply<GenlMessage<Nbd>>>, AttachError> {
    let (mut genl, family) = open_family()?;
    Ok(genl.exchange::<GenlMessage<Nbd>>(|seq| netlink::request(family, seq, msg))?)
}

/// A command that names only device `index`.
fn on_device(cmd: u8, index: u32) -> Nbd {
    Nbd {
        cmd,
        attrs: vec![netlink::Attr::Index(index)],
    }
}

/// How long a connect to a device named by index waits for the kernel to
/// finish destroying the device it had at that index (see
/// the retry in `Attachments::connect`).
const GOING_DOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn check(replies: &[Reply<GenlMessage<Nbd>>], what: &'static str) -> Result<(), AttachError> {
    match replies.iter().find_map(|r| match r {
        Reply::Error(e) => Some(*e),
        _ => None,
    }) {
        Some(errno) => Err(AttachError::Kernel { what, errno }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse() {
        assert_eq!(parse_device("/dev/nbd3").unwrap(), 3);
        assert_eq!(parse_device("12").unwrap(), 12);
        assert!(parse_device("/dev/sda").is_err());
    }
}
