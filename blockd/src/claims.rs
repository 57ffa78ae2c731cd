//! Claims: who is using what, so that no request acts on something another
//! one is using.
//!
//! Every operation that one request checks and another can break (create,
//! delete, resize, freeze, back up, restore, mount, open a `disk.img`)
//! first takes the claims it needs, all at once and under one lock, and
//! only then acts. A claim that conflicts with one already held fails the
//! request with [`Busy`], which names the holder and says what to do. The
//! check and the action are thus one step: two requests that race can never
//! both pass, and nothing is acted on while something else holds it.
//!
//! The rules are the table in [`Resource`] and [`Mode`]: any number of
//! shared holders, or one exclusive holder. What each operation takes is
//! written once, in the `for_*` constructors of [`Want`], so the rules of
//! the whole daemon read in one place:
//!
//! | operation              | takes                                                        |
//! |------------------------|--------------------------------------------------------------|
//! | volume create          | volume X                                                      |
//! | volume delete / resize | volume X                                                      |
//! | snapshot create        | volume S, snapshot X (per member)                             |
//! | snapshot delete        | snapshot X, volume job X                                      |
//! | backup (per member)    | volume S, volume job X, snapshot X, location S                |
//! | restore into NEW       | volume X (NEW), volume job X, location S, cloud snapshot S    |
//! | cloud snapshot delete  | location S, cloud snapshot X                                  |
//! | credentials create / delete | location X                                               |
//! | catalog mount          | location S (for as long as it is mounted)                     |
//! | open `disk.img`        | cloud snapshot S (until the file is closed)                   |
//! | repo check             | location S (while it runs; no lock in the bucket)             |
//! | repo gc                | location S (while it runs; coordination in the bucket)        |
//!
//! A claim is released when its [`Claim`] is dropped: every path out of an
//! operation, failures included, gives back what it took.
//!
//! This module imports nothing of the daemon: every layer may use it.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Something a request can use.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Resource {
    /// A local volume (also a name about to be created).
    Volume(String),
    /// The one backup or restore a volume may have at a time.
    VolumeJob(String),
    /// A local snapshot `volume@name` (also a name about to be taken).
    Snapshot {
        /// Volume.
        volume: String,
        /// Snapshot name.
        name: String,
    },
    /// A location (pxctl "credentials").
    Location(String),
    /// A cloud snapshot `volume/name` in a location.
    CloudSnap {
        /// Location.
        location: String,
        /// `volume/name`.
        snapshot: String,
    },
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Volume(v) => write!(f, "volume {v:?}"),
            Self::VolumeJob(v) => write!(f, "volume {v:?}"),
            Self::Snapshot { volume, name } => write!(f, "snapshot {volume}@{name}"),
            Self::Location(l) => write!(f, "credentials {l:?}"),
            Self::CloudSnap { location, snapshot } => {
                write!(f, "cloud snapshot {snapshot} in location {location}")
            }
        }
    }
}

/// How a resource is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// With other shared holders (readers, users).
    Shared,
    /// Alone (writers: create, delete, resize, a task's own slot).
    Exclusive,
}

/// Who holds a claim, in words an operator understands, and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// What the holder is doing, as a predicate: "is being backed up by
    /// task 1a2b-…", "is mounted at /mnt/catalog".
    pub doing: String,
    /// What the operator can do about it.
    pub hint: String,
}

impl Holder {
    /// A holder with a predicate and a hint.
    pub fn new(doing: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            doing: doing.into(),
            hint: hint.into(),
        }
    }

    /// A backup or restore task.
    pub fn task(doing: &str, task: &str) -> Self {
        Self::new(
            format!("{doing} task {task}"),
            format!("wait for it or stop it first (`blockctl cloudsnap stop {task}`)"),
        )
    }

    /// A short request of the API (a create or resize).
    pub fn request(doing: &str) -> Self {
        Self::new(doing, "retry when it is done")
    }

    /// A delete under way (`doing`: "is being deleted", "are being
    /// deleted"): once it is done the thing is gone, so the hint is not to
    /// retry but where to see whether it went (`list`: the command).
    pub fn deletion(doing: &str, list: &str) -> Self {
        Self::new(
            doing,
            format!("once that is done it is gone (a delete that fails leaves it): see `{list}`"),
        )
    }
}

/// A claim that conflicts with one already held.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{resource} {}: {}", holder.doing, holder.hint)]
pub struct Busy {
    /// What was asked for.
    pub resource: Resource,
    /// Who holds it.
    pub holder: Holder,
}

/// Resources an operation asks for, with the holder they are held for.
#[derive(Debug, Clone)]
pub struct Want {
    holder: Holder,
    items: Vec<(Resource, Mode)>,
    /// Resources held for a holder of their own (named in conflicts on them).
    extra: Vec<(Resource, Holder)>,
}

impl Want {
    /// Nothing yet, for `holder`.
    pub fn new(holder: Holder) -> Self {
        Self {
            holder,
            items: Vec::new(),
            extra: Vec::new(),
        }
    }

    /// Adds one resource.
    #[must_use]
    pub fn with(mut self, r: Resource, mode: Mode) -> Self {
        self.items.push((r, mode));
        self
    }

    /// Creating, deleting or resizing a volume.
    pub fn for_volume_change(volume: &str, doing: &str) -> Self {
        Self::new(Holder::request(doing)).with(Resource::Volume(volume.into()), Mode::Exclusive)
    }

    /// Deleting volume `volume`.
    pub fn for_volume_delete(volume: &str) -> Self {
        Self::new(Holder::deletion("is being deleted", "blockctl volume list"))
            .with(Resource::Volume(volume.into()), Mode::Exclusive)
    }

    /// Creating volume `volume`: a second create of the name can only
    /// find it taken once the first is done, so its hint says that.
    pub fn for_volume_create(volume: &str) -> Self {
        Self::new(Holder::new(
            "is being created by another request",
            "once that is done the name is taken: choose another, or use that volume \
             (`blockctl volume list`)",
        ))
        .with(Resource::Volume(volume.into()), Mode::Exclusive)
    }

    /// Attaching `volume` as a kernel device: it must not be deleted
    /// while the device is being set up (a delete checks the attachments
    /// under its exclusive claim, so the two are one step either way).
    pub fn for_attach(volume: &str) -> Self {
        Self::new(Holder::request("is being attached"))
            .with(Resource::Volume(volume.into()), Mode::Shared)
    }

    /// Creating a schedule that names `volumes`: none of them may be
    /// deleted between the check that it exists and the schedule's insert
    /// (a delete checks the schedules under its exclusive claim, so the
    /// two are one step either way).
    pub fn for_schedule_create(volumes: &[String]) -> Self {
        volumes.iter().fold(
            Self::new(Holder::request("is being named by a new schedule")),
            |w, v| w.with(Resource::Volume(v.clone()), Mode::Shared),
        )
    }

    /// Taking snapshot `name` of each of `volumes` (one freeze point).
    pub fn for_snapshot_create(volumes: &[String], name: &str) -> Self {
        let mut w = Self::new(Holder::request(&format!(
            "is being snapshotted (snapshot {name})"
        )));
        for v in volumes {
            w = w
                .with(Resource::Volume(v.clone()), Mode::Shared)
                .with_holder(
                    Holder::new(
                        "is being taken by another request",
                        "once that is done the name is taken: choose another \
                     (`blockctl snapshot list`)",
                    ),
                    Resource::Snapshot {
                        volume: v.clone(),
                        name: name.into(),
                    },
                    Mode::Exclusive,
                );
        }
        w
    }

    /// Deleting local snapshot `volume@name`.
    ///
    /// A backup reads the change sets of every local snapshot of its volume
    /// (those changes are not in the volume's map any more), so none of
    /// them may be deleted while a backup of the volume runs: the delete
    /// takes the volume's job slot too.
    pub fn for_snapshot_delete(volume: &str, name: &str) -> Self {
        Self::new(Holder::deletion(
            "is being deleted",
            "blockctl snapshot list",
        ))
        .with(
            Resource::Snapshot {
                volume: volume.into(),
                name: name.into(),
            },
            Mode::Exclusive,
        )
        .with_holder(
            Holder::request(&format!("has snapshot {volume}@{name} being deleted")),
            Resource::VolumeJob(volume.into()),
            Mode::Exclusive,
        )
    }

    /// Backup task `task` of `volume` from its new snapshot `snapshot` to
    /// `location`.
    pub fn for_backup(task: &str, volume: &str, snapshot: &str, location: &str) -> Self {
        Self::new(Holder::task("is being backed up by", task))
            .with(Resource::Volume(volume.into()), Mode::Shared)
            .with(Resource::VolumeJob(volume.into()), Mode::Exclusive)
            .with(
                Resource::Snapshot {
                    volume: volume.into(),
                    name: snapshot.into(),
                },
                Mode::Exclusive,
            )
            .with_holder(
                Holder::task("are used by backup", task),
                Resource::Location(location.into()),
                Mode::Shared,
            )
    }

    /// Restore task `task` of cloud snapshot `snapshot` (`volume/name`) in
    /// `location` into the new volume `volume`.
    pub fn for_restore(
        task: &str,
        volume: &str,
        location: &str,
        snapshot: &str,
        lazy: bool,
    ) -> Self {
        let doing = if lazy {
            "is being read by lazy restore"
        } else {
            "is being read by restore"
        };
        // Waiting does not free the name: the restore keeps its volume.
        let filling = Holder::new(
            format!("is being restored by task {task}"),
            format!("wait for the restore to end, or stop it (`blockctl cloudsnap stop {task}`), which deletes the volume"),
        );
        Self::new(filling)
            .with(Resource::Volume(volume.into()), Mode::Exclusive)
            .with(Resource::VolumeJob(volume.into()), Mode::Exclusive)
            .with_holder(
                Holder::task("are used by restore", task),
                Resource::Location(location.into()),
                Mode::Shared,
            )
            .with_holder(
                Holder::task(doing, task),
                Resource::CloudSnap {
                    location: location.into(),
                    snapshot: snapshot.into(),
                },
                Mode::Shared,
            )
    }

    /// Deleting cloud snapshot `snapshot` of `location`.
    pub fn for_cloudsnap_delete(location: &str, snapshot: &str) -> Self {
        Self::new(Holder::deletion(
            "is being deleted",
            "blockctl cloudsnap list",
        ))
        .with(Resource::Location(location.into()), Mode::Shared)
        .with(
            Resource::CloudSnap {
                location: location.into(),
                snapshot: snapshot.into(),
            },
            Mode::Exclusive,
        )
    }

    /// Creating or changing location `name`.
    pub fn for_location_change(name: &str, doing: &str) -> Self {
        Self::new(Holder::request(doing)).with(Resource::Location(name.into()), Mode::Exclusive)
    }

    /// Deleting location `name`.
    pub fn for_location_delete(name: &str) -> Self {
        Self::new(Holder::deletion(
            "are being deleted",
            "blockctl credentials list",
        ))
        .with(Resource::Location(name.into()), Mode::Exclusive)
    }

    /// A repository maintenance run (`doing`: "are being checked") on
    /// `location`: the credentials stay while it runs.
    pub fn for_location_use(location: &str, doing: &str, hint: &str) -> Self {
        Self::new(Holder::new(doing, hint)).with(Resource::Location(location.into()), Mode::Shared)
    }

    /// A catalog mount of `location` at `dir`.
    pub fn for_mount(location: &str, dir: &str) -> Self {
        Self::new(Holder::new(
            format!("are mounted at {dir}"),
            format!("unmount first (`blockctl umount {dir}`)"),
        ))
        .with(Resource::Location(location.into()), Mode::Shared)
    }

    /// `disk.img` of cloud snapshot `snapshot` open through the catalog
    /// mount at `dir`.
    pub fn for_open_image(location: &str, snapshot: &str, dir: &str) -> Self {
        Self::new(Holder::new(
            format!("is open through the catalog mount at {dir} ({dir}/{snapshot}/disk.img)"),
            "close it first (unmount the loop device or file system that uses it)",
        ))
        .with(
            Resource::CloudSnap {
                location: location.into(),
                snapshot: snapshot.into(),
            },
            Mode::Shared,
        )
    }

    /// Adds one resource held for another holder (named in conflicts on it).
    #[must_use]
    fn with_holder(mut self, holder: Holder, r: Resource, mode: Mode) -> Self {
        self.items.push((r.clone(), mode));
        self.extra.push((r, holder));
        self
    }
}

/// Holders of one resource.
#[derive(Debug, Default)]
struct Entry {
    exclusive: Option<(u64, Arc<Holder>)>,
    shared: Vec<(u64, Arc<Holder>)>,
}

impl Entry {
    /// The holder `mode` would conflict with, if any.
    fn conflict(&self, mode: Mode) -> Option<&Holder> {
        if let Some((_, h)) = &self.exclusive {
            return Some(h);
        }
        match mode {
            Mode::Shared => None,
            Mode::Exclusive => self.shared.first().map(|(_, h)| &**h),
        }
    }
}

/// The claims of this daemon.
#[derive(Debug, Default)]
pub struct Claims {
    table: Mutex<HashMap<Resource, Entry>>,
    next: AtomicU64,
}

impl Claims {
    /// No claims.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Takes every resource of `want`, or none of them.
    ///
    /// # Errors
    /// [`Busy`] naming the first conflicting holder.
    pub fn acquire(self: &Arc<Self>, want: Want) -> Result<Claim, Busy> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let holder = Arc::new(want.holder);
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        for (i, (r, mode)) in want.items.iter().enumerate() {
            // The same resource twice in one want (a group naming one
            // volume twice is refused earlier) conflicts with itself only
            // when one of the two is exclusive.
            let earlier = want.items[..i].iter().find(|(e, _)| e == r);
            if let Some((_, m)) = earlier {
                if *m == Mode::Exclusive || *mode == Mode::Exclusive {
                    return Err(Busy {
                        resource: r.clone(),
                        holder: (*holder).clone(),
                    });
                }
            }
            if let Some(h) = table.get(r).and_then(|e| e.conflict(*mode)) {
                return Err(Busy {
                    resource: r.clone(),
                    holder: h.clone(),
                });
            }
        }
        for (r, mode) in &want.items {
            let h = want
                .extra
                .iter()
                .find(|(e, _)| e == r)
                .map_or_else(|| holder.clone(), |(_, h)| Arc::new(h.clone()));
            let e = table.entry(r.clone()).or_default();
            match mode {
                Mode::Shared => e.shared.push((id, h)),
                Mode::Exclusive => e.exclusive = Some((id, h)),
            }
        }
        Ok(Claim {
            claims: self.clone(),
            id,
            held: want.items.into_iter().map(|(r, _)| r).collect(),
        })
    }

    /// The holder of `r` an exclusive claim would conflict with, if any.
    pub fn holder(&self, r: &Resource) -> Option<Holder> {
        let table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        table
            .get(r)
            .and_then(|e| e.conflict(Mode::Exclusive))
            .cloned()
    }

    fn release(&self, id: u64, held: &[Resource]) {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        for r in held {
            let Some(e) = table.get_mut(r) else { continue };
            if e.exclusive.as_ref().is_some_and(|(i, _)| *i == id) {
                e.exclusive = None;
            }
            e.shared.retain(|(i, _)| *i != id);
            if e.exclusive.is_none() && e.shared.is_empty() {
                table.remove(r);
            }
        }
    }
}

/// Resources held until this is dropped.
#[derive(Debug)]
#[must_use = "a claim is released when dropped"]
pub struct Claim {
    claims: Arc<Claims>,
    id: u64,
    held: Vec<Resource>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.claims.release(self.id, &self.held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(v: &str) -> Resource {
        Resource::Volume(v.into())
    }

    #[test]
    fn shared_coexist_exclusive_excludes() {
        let c = Claims::new();
        let a = c.acquire(Want::for_backup("t1", "v", "s1", "loc")).unwrap();
        // A second backup of the volume: its job slot is taken.
        let e = c
            .acquire(Want::for_backup("t2", "v", "s2", "loc"))
            .unwrap_err();
        assert_eq!(e.resource, Resource::VolumeJob("v".into()));
        assert!(e.to_string().contains("cloudsnap stop t1"), "{e}");
        // A snapshot of the volume may be taken meanwhile (volume shared)...
        let s = c
            .acquire(Want::for_snapshot_create(&["v".into()], "x"))
            .unwrap();
        // ...but the volume cannot be deleted while either is held.
        let d = c
            .acquire(Want::for_volume_change("v", "is being deleted"))
            .unwrap_err();
        assert_eq!(d.resource, vol("v"));
        drop(a);
        assert!(c
            .acquire(Want::for_volume_change("v", "is being deleted"))
            .is_err());
        drop(s);
        let d = c
            .acquire(Want::for_volume_change("v", "is being deleted"))
            .unwrap();
        // While it is deleted, nothing else takes it.
        assert!(c.acquire(Want::for_backup("t3", "v", "s3", "loc")).is_err());
        drop(d);
        assert!(c.table.lock().unwrap().is_empty(), "all released");
    }

    #[test]
    fn all_or_nothing() {
        let c = Claims::new();
        let _hold = c.acquire(Want::for_snapshot_delete("b", "s")).unwrap();
        // A group snapshot whose second member conflicts takes nothing.
        let e = c
            .acquire(Want::for_snapshot_create(&["a".into(), "b".into()], "s"))
            .unwrap_err();
        assert!(
            e.to_string().contains("snapshot b@s is being deleted"),
            "{e}"
        );
        assert!(c.holder(&vol("a")).is_none());
        assert!(c
            .acquire(Want::for_volume_change("a", "is being deleted"))
            .is_ok());
    }

    #[test]
    fn no_snapshot_of_a_volume_is_deleted_while_it_is_backed_up() {
        let c = Claims::new();
        let b = c
            .acquire(Want::for_backup("t1", "v", "new", "loc"))
            .unwrap();
        // Its own freeze point...
        let e = c
            .acquire(Want::for_snapshot_delete("v", "new"))
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("snapshot v@new is being backed up by task t1"),
            "{e}"
        );
        // ...and any other snapshot whose change set it reads.
        let e = c
            .acquire(Want::for_snapshot_delete("v", "older"))
            .unwrap_err();
        assert!(e.to_string().contains("cloudsnap stop t1"), "{e}");
        // Other volumes are not concerned.
        assert!(c.acquire(Want::for_snapshot_delete("w", "older")).is_ok());
        drop(b);
        let d = c.acquire(Want::for_snapshot_delete("v", "older")).unwrap();
        let e = c
            .acquire(Want::for_backup("t2", "v", "n2", "loc"))
            .unwrap_err();
        assert!(
            e.to_string().contains("has snapshot v@older being deleted"),
            "{e}"
        );
        drop(d);
    }

    #[test]
    fn snapshot_names_are_unique() {
        let c = Claims::new();
        let first = c
            .acquire(Want::for_snapshot_create(&["v".into()], "same"))
            .unwrap();
        let e = c
            .acquire(Want::for_snapshot_create(&["v".into()], "same"))
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("snapshot v@same is being taken by another request"),
            "{e}"
        );
        drop(first);
        assert!(c
            .acquire(Want::for_snapshot_create(&["v".into()], "same"))
            .is_ok());
    }

    #[test]
    fn a_request_losing_to_a_delete_is_not_told_to_retry() {
        let c = Claims::new();
        let _snap = c.acquire(Want::for_cloudsnap_delete("loc", "v/s")).unwrap();
        let e = c
            .acquire(Want::for_restore("t1", "new", "loc", "v/s", false))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("v/s in location loc is being deleted")
                && e.contains("it is gone")
                && e.contains("blockctl cloudsnap list")
                && !e.contains("retry"),
            "{e}"
        );
        let _vol = c.acquire(Want::for_volume_delete("v")).unwrap();
        let e = c.acquire(Want::for_attach("v")).unwrap_err().to_string();
        assert!(
            e.contains("blockctl volume list") && !e.contains("retry"),
            "{e}"
        );
    }

    #[test]
    fn readers_of_a_cloud_snapshot_block_its_delete() {
        let c = Claims::new();
        let r = c
            .acquire(Want::for_restore("t9", "new", "loc", "v/s", true))
            .unwrap();
        let e = c
            .acquire(Want::for_cloudsnap_delete("loc", "v/s"))
            .unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("cloud snapshot v/s in location loc is being read by lazy restore task t9"),
            "{m}"
        );
        drop(r);
        let img = c
            .acquire(Want::for_open_image("loc", "v/s", "/mnt/c"))
            .unwrap();
        let img2 = c
            .acquire(Want::for_open_image("loc", "v/s", "/mnt/c"))
            .unwrap();
        let e = c
            .acquire(Want::for_cloudsnap_delete("loc", "v/s"))
            .unwrap_err();
        assert!(e
            .to_string()
            .contains("open through the catalog mount at /mnt/c"));
        drop((img, img2));
        assert!(c.acquire(Want::for_cloudsnap_delete("loc", "v/s")).is_ok());
    }

    #[test]
    fn mounted_locations_cannot_be_deleted() {
        let c = Claims::new();
        let m = c.acquire(Want::for_mount("vault", "/mnt/x")).unwrap();
        let e = c
            .acquire(Want::for_location_change("vault", "is being deleted"))
            .unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("mounted at /mnt/x") && s.contains("blockctl umount /mnt/x"),
            "{s}"
        );
        drop(m);
        assert!(c
            .acquire(Want::for_location_change("vault", "is being deleted"))
            .is_ok());
    }

    #[test]
    fn concurrent_acquires_one_winner() {
        let c = Claims::new();
        let wins = std::sync::atomic::AtomicUsize::new(0);
        let held = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..16 {
                s.spawn(|| {
                    if let Ok(cl) = c.acquire(Want::for_snapshot_create(&["v".into()], "n")) {
                        wins.fetch_add(1, Ordering::SeqCst);
                        held.lock().unwrap().push(cl);
                    }
                });
            }
        });
        assert_eq!(wins.load(Ordering::SeqCst), 1);
    }
}
