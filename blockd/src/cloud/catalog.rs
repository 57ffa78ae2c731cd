//! The catalog: what a location's bucket holds (`cloudsnap list`,
//! `catalog`, `delete`), read from the bucket alone.

use std::collections::{BTreeMap, HashMap, HashSet};

use blockd_api::{Catalog, CloudSnap, GroupState, Verified};

use crate::claims::Want;
use crate::repo::format::{Group, Manifest};
use crate::repo::{name, Repo, RepoError};

use super::{restore, Cloud, CloudError};

impl Cloud {
    pub(crate) fn to_cloudsnap(m: &Manifest, location: &str) -> CloudSnap {
        CloudSnap {
            id: format!("{}/{}", m.volume, m.name),
            volume: m.volume.clone(),
            location: location.to_string(),
            created: m.created.clone(),
            size: m.size,
            extent_size: m.extent_size,
            full: m.full,
            parent: m.parent.clone(),
            group: m.group.clone(),
            group_state: None,
            labels: m.labels.clone(),
            bytes_read: m.bytes_read,
            bytes_new: m.bytes_new,
            bytes_reused: m.bytes_reused,
            bytes_uploaded: m.bytes_uploaded,
            status: "Done".into(),
            host: m.host.clone(),
            schedule: m.schedule.clone(),
            expires: m.expires.clone(),
        }
    }

    /// Snapshots in a location's bucket; without a location, in every
    /// location's (each listed with its location).
    ///
    /// # Errors
    /// Unknown location, provider errors, a corrupt manifest (named).
    pub async fn list(
        &self,
        location: Option<&str>,
        src: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<CloudSnap>, CloudError> {
        let locations = match location {
            Some(l) => vec![self.locations.resolve(Some(l))?],
            None => self.locations.names()?,
        };
        let several = locations.len() > 1;
        let mut out = Vec::new();
        for location in locations {
            match self.list_in(location, src, labels).await {
                Ok(snaps) => out.extend(snaps),
                Err(e) if several => {
                    return Err(CloudError::ListingAll {
                        source: Box::new(e),
                    })
                }
                Err(e) => return Err(e),
            }
        }
        // Names start with the freeze time in milliseconds: id order is time order.
        out.sort_by(|a, b| a.id.cmp(&b.id).then_with(|| a.location.cmp(&b.location)));
        Ok(out)
    }

    /// The groups with a member still being backed up here, or whose group
    /// object waits to be written (a location refused it). Taken before
    /// the group objects are listed: a group that completes in between is
    /// then running, never incomplete.
    fn running_groups(&self) -> HashSet<String> {
        self.running_group_locations()
            .into_iter()
            .map(|(_, g)| g)
            .collect()
    }

    /// [`Cloud::running_groups`], each with its location.
    pub(super) fn running_group_locations(&self) -> HashSet<(String, String)> {
        let mut running: HashSet<(String, String)> = self
            .lock()
            .values()
            .filter_map(|r| {
                let r = r
                    .record
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let group = r.task.group.clone().filter(|_| {
                    !r.task.state.is_final() && r.task.kind == blockd_api::TaskKind::Backup
                })?;
                Some((r.task.location.clone(), group))
            })
            .collect();
        running.extend(self.pending_group_locations());
        running
    }

    /// Where group backup `group` stands: `written`, its group object
    /// as read (`None`: there is none) and whether each member is still
    /// there. The object is written once every member is committed, so
    /// without it the group is running (a member still runs here, or its
    /// object waits to be written: the location refused it) or
    /// incomplete; with it, complete while every member is there.
    fn group_state(
        group: &str,
        written: Option<&Group>,
        present: impl Fn(&str) -> bool,
        running: &HashSet<String>,
    ) -> GroupState {
        if let Some(g) = written {
            if g.members.iter().all(|m| present(m)) {
                GroupState::Complete
            } else {
                GroupState::Partial
            }
        } else if running.contains(group) {
            GroupState::Running
        } else {
            GroupState::Incomplete
        }
    }

    /// The state of the groups of the manifests listed that have no group
    /// object in the listing (`groups`) and no member running here
    /// (`running`): Running while another host marks them so
    /// ([`crate::repo::Repo::mark_group_running`]), Complete if their
    /// object was written since the listing, Incomplete otherwise. The
    /// marks are listed only when there is such a group, and before their
    /// objects are looked for again: a host writes the object before it
    /// removes the mark, so a group that completes meanwhile is never
    /// shown as incomplete.
    async fn running_elsewhere(
        &self,
        repo: &crate::repo::Repo,
        location: &str,
        of_manifests: impl Iterator<Item = &str>,
        groups: &HashSet<String>,
        running: &HashSet<String>,
    ) -> HashMap<String, GroupState> {
        let undecided: HashSet<&str> = of_manifests
            .filter(|g| !groups.contains(*g) && !running.contains(*g))
            .collect();
        let mut out = HashMap::new();
        if undecided.is_empty() {
            return out;
        }
        let marked = match repo.groups_marked_running(&self.host).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(%location, error = %e, "listing the group backups running on other hosts failed: they are listed as incomplete");
                HashSet::new()
            }
        };
        for g in undecided {
            let state = if marked.contains(g) {
                GroupState::Running
            } else {
                match repo.get_group(g).await {
                    Ok(_) => GroupState::Complete,
                    Err(_) => GroupState::Incomplete,
                }
            };
            out.insert(g.to_string(), state);
        }
        out
    }

    /// The location `--snap` names a snapshot in, when no `--cred-id` was
    /// given: the only location, or else the one whose bucket holds it. A
    /// new host's disaster recovery has `local` and the bucket just added,
    /// and `cloudsnap restore --snap app` finds `app` in the bucket.
    ///
    /// # Errors
    /// In no location, or in several; an unknown location.
    pub(super) async fn locate(
        &self,
        location: Option<&str>,
        snap: &str,
    ) -> Result<String, CloudError> {
        snapshot_ref(snap)?;
        let names = match location {
            Some(_) => return self.locations.resolve(location),
            None => self.locations.names()?,
        };
        if names.len() == 1 {
            return self.locations.resolve(None);
        }
        let mut found = Vec::new();
        let mut failed = None;
        for l in &names {
            let looked = match self.locations.repo(l).await {
                Ok(repo) => self.find(&repo, snap).await.map(|_| ()),
                Err(e) => Err(e),
            };
            match looked {
                Ok(()) => found.push(l.clone()),
                Err(CloudError::NoSnapshotOf { .. } | CloudError::SnapshotNotFound { .. }) => {}
                Err(
                    e @ (CloudError::GroupNotSnapshot { .. } | CloudError::NameOnTwoHosts { .. }),
                ) => return Err(e),
                Err(e) => {
                    tracing::warn!(location = %l, error = %e, "looking for a cloud snapshot failed there");
                    failed.get_or_insert(e);
                }
            }
        }
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err(failed.unwrap_or_else(|| CloudError::NoSnapshotAnywhere {
                snap: snap.to_string(),
                locations: names.join(", "),
            })),
            _ => Err(CloudError::SnapshotInSeveral {
                snap: snap.to_string(),
                locations: found.join(", "),
            }),
        }
    }

    /// [`Cloud::list`] of one location.
    async fn list_in(
        &self,
        location: String,
        src: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<CloudSnap>, CloudError> {
        let repo = self.locations.repo(&location).await?;
        let running = self.running_groups();
        let (names, groups) = tokio::try_join!(repo.list_snapshots(src), repo.list_groups())?;
        let groups: HashSet<String> = groups.into_iter().collect();
        let manifests: Vec<((String, String), Result<Manifest, RepoError>)> =
            futures::StreamExt::collect(futures::StreamExt::buffered(
                futures::stream::iter(names.into_iter().map(|(v, n)| {
                    let repo = repo.clone();
                    async move {
                        let r = if name::is_valid(&n) {
                            repo.get_manifest(&v, &n).await
                        } else {
                            Err(repo.foreign_manifest(&v, &n))
                        };
                        ((v, n), r)
                    }
                })),
                8,
            ))
            .await;
        // The group objects of the groups listed, read 8 at a time.
        let listed: HashSet<String> = manifests
            .iter()
            .filter_map(|(_, m)| m.as_ref().ok()?.group.clone())
            .filter(|g| groups.contains(g))
            .collect();
        let read: Vec<(String, Result<Group, RepoError>)> =
            futures::StreamExt::collect(futures::StreamExt::buffer_unordered(
                futures::stream::iter(listed.into_iter().map(|g| {
                    let repo = repo.clone();
                    async move {
                        let r = repo.get_group(&g).await;
                        (g, r)
                    }
                })),
                8,
            ))
            .await;
        let mut written: HashMap<String, Group> = HashMap::new();
        for (g, r) in read {
            match r {
                Ok(obj) => {
                    written.insert(g, obj);
                }
                Err(e) => {
                    tracing::warn!(group = %g, error = %e, "reading the group object failed: its members are not checked");
                }
            }
        }
        // Whether each member is still there. The listing answers for the
        // members it covers (all of them without --src); a member of
        // another volume is looked up by itself (a HEAD), not by listing
        // the whole bucket again.
        let seen: HashSet<String> = manifests
            .iter()
            .map(|((v, n), _)| format!("{v}/{n}"))
            .collect();
        let elsewhere: HashSet<String> = if src.is_none() {
            HashSet::new()
        } else {
            let unseen: HashSet<String> = written
                .values()
                .flat_map(|g| &g.members)
                .filter(|m| !seen.contains(*m))
                .cloned()
                .collect();
            let looked: Vec<(String, bool)> =
                futures::StreamExt::collect(futures::StreamExt::buffer_unordered(
                    futures::stream::iter(unseen.into_iter().map(|m| {
                        let repo = repo.clone();
                        async move {
                            let there = match name::split(&m) {
                                // Unknown (the location failing): taken as there.
                                Some((v, n)) => repo.has_manifest(v, n).await.unwrap_or(true),
                                None => true,
                            };
                            (m, there)
                        }
                    })),
                    8,
                ))
                .await;
            looked
                .into_iter()
                .filter_map(|(m, there)| there.then_some(m))
                .collect()
        };
        let present = |m: &str| seen.contains(m) || elsewhere.contains(m);
        let others = self
            .running_elsewhere(
                &repo,
                &location,
                manifests
                    .iter()
                    .filter_map(|(_, m)| m.as_ref().ok()?.group.as_deref()),
                &groups,
                &running,
            )
            .await;
        let mut out = Vec::new();
        for ((v, n), m) in manifests {
            match m {
                Ok(m) => {
                    if labels.iter().all(|(k, val)| m.labels.get(k) == Some(val)) {
                        let mut s = Self::to_cloudsnap(&m, &location);
                        s.group_state = m.group.as_deref().map(|g| match written.get(g) {
                            Some(obj) => Self::group_state(g, Some(obj), present, &running),
                            // An object listed but unreadable: written.
                            None if groups.contains(g) => GroupState::Complete,
                            None => others
                                .get(g)
                                .copied()
                                .unwrap_or_else(|| Self::group_state(g, None, |_| true, &running)),
                        });
                        out.push(s);
                    }
                }
                // Damaged or foreign objects are listed by name (so they can
                // be seen and deleted), never used.
                Err(RepoError::Corrupt { reason, object, .. }) if labels.is_empty() => {
                    tracing::warn!(%location, %object, %reason, "unusable object under snapshots/");
                    out.push(CloudSnap {
                        id: format!("{v}/{n}"),
                        volume: v,
                        location: location.clone(),
                        created: String::new(),
                        size: 0,
                        extent_size: 0,
                        full: false,
                        parent: None,
                        group: None,
                        group_state: None,
                        labels: BTreeMap::new(),
                        bytes_read: 0,
                        bytes_new: 0,
                        bytes_reused: 0,
                        bytes_uploaded: 0,
                        status: format!("Corrupt: {reason}"),
                        host: None,
                        schedule: None,
                        expires: None,
                    });
                }
                Err(RepoError::Corrupt { .. }) => {}
                // Deleted since it was listed.
                Err(RepoError::Missing { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    /// Resolves `--snap`: a snapshot id, or a volume name for its latest.
    ///
    /// Volume names belong to hosts, and hosts may share a bucket: a name
    /// whose newest snapshot another host took is refused when this host
    /// backs up a volume of that name itself (its last backup, in any
    /// location, is its own), as the newest is then no answer to "which
    /// one". A host with no volume of that name, or whose volume of that
    /// name was restored from another host's snapshot and not backed up
    /// since (a disaster recovery), takes the newest.
    pub(super) async fn find(&self, repo: &Repo, snap: &str) -> Result<Manifest, CloudError> {
        let m = self.find_named(repo, snap).await?;
        if name::split(snap).is_some() || m.host.as_deref().is_none_or(|h| h == self.host) {
            return Ok(m);
        }
        let Some((location, ours)) = self.db.backup_base(snap)? else {
            return Ok(m);
        };
        let Some((v, n)) = name::split(&ours) else {
            return Ok(m);
        };
        // The base is this host's own backup, not a restored snapshot.
        let base_host = match self.locations.repo(&location).await {
            Ok(r) => r.get_manifest(v, n).await.ok().and_then(|b| b.host),
            Err(_) => None,
        };
        if base_host.as_deref() != Some(self.host.as_str()) {
            return Ok(m);
        }
        Err(CloudError::NameOnTwoHosts {
            snap: snap.to_string(),
            newest: name::id(&m.volume, &m.name),
            host: m.host.clone().unwrap_or_default(),
            location: repo.location().to_string(),
            ours: format!("{ours} in location {location}"),
        })
    }

    async fn find_named(&self, repo: &Repo, snap: &str) -> Result<Manifest, CloudError> {
        let (v, n) = match name::split(snap) {
            Some((v, n)) => (v.to_string(), n.to_string()),
            None => {
                snapshot_ref(snap)?;
                let names = repo.list_snapshots(Some(snap)).await?;
                let Some(last) = names
                    .into_iter()
                    .filter(|(_, n)| name::is_valid(n))
                    .max_by(|a, b| a.1.cmp(&b.1))
                else {
                    // A group backup's id, given where one snapshot is meant.
                    if name::is_valid(snap) {
                        if let Ok(g) = repo.get_group(snap).await {
                            return Err(CloudError::GroupNotSnapshot {
                                group: snap.to_string(),
                                members: g.members.join(", "),
                            });
                        }
                    }
                    return Err(CloudError::NoSnapshotOf {
                        snap: snap.to_string(),
                        location: repo.location().to_string(),
                    });
                };
                last
            }
        };
        match repo.get_manifest(&v, &n).await {
            Err(RepoError::Missing { .. }) => Err(CloudError::SnapshotNotFound {
                snapshot: format!("{v}/{n}"),
                location: repo.location().to_string(),
            }),
            r => Ok(r?),
        }
    }

    /// A snapshot's manifest; with `verify`, every chunk is fetched and
    /// checked.
    ///
    /// # Errors
    /// Unknown snapshot; a missing or corrupt object, named with the snapshot.
    pub async fn catalog(
        &self,
        location: Option<&str>,
        snap: &str,
        verify: bool,
    ) -> Result<Catalog, CloudError> {
        let location = self.locate(location, snap).await?;
        let repo = self.locations.repo(&location).await?;
        let m = self.find(&repo, snap).await?;
        let id = format!("{}/{}", m.volume, m.name);
        let named = |source| CloudError::Damaged {
            snapshot: id.clone(),
            source,
        };
        let mut data_bytes = 0u64;
        let mut chunks = 0u64;
        let mut chunk_bytes = 0u64;
        for (b, ix) in &m.blocks {
            let entries = repo.get_index(*b, ix).await.map_err(named)?;
            data_bytes += entries.iter().map(|e| u64::from(e.len)).sum::<u64>();
            if verify {
                let (c, n) = restore::fill::verify(&repo, &entries)
                    .await
                    .map_err(|e| match e {
                        CloudError::Repo(r) => named(r),
                        e => e,
                    })?;
                chunks += c;
                chunk_bytes += n;
            }
        }
        let mut snap = Self::to_cloudsnap(&m, &location);
        if let Some(g) = m.group.as_deref() {
            let running = self.running_groups();
            snap.group_state = match repo.get_group(g).await {
                Ok(obj) => {
                    let mut present = HashSet::new();
                    for m in &obj.members {
                        let there = match name::split(m) {
                            Some((v, n)) => repo.has_manifest(v, n).await.unwrap_or(true),
                            None => true,
                        };
                        if there {
                            present.insert(m.clone());
                        }
                    }
                    Some(Self::group_state(
                        g,
                        Some(&obj),
                        |m| present.contains(m),
                        &running,
                    ))
                }
                Err(RepoError::Missing { .. }) if running.contains(g) => Some(GroupState::Running),
                // Marked running by another host? (Listed before the object
                // is looked for again: see `running_elsewhere`.)
                Err(RepoError::Missing { .. }) => {
                    Some(match repo.groups_marked_running(&self.host).await {
                        Ok(marked) if marked.contains(g) => GroupState::Running,
                        _ => match repo.get_group(g).await {
                            Ok(_) => GroupState::Complete,
                            Err(_) => GroupState::Incomplete,
                        },
                    })
                }
                // The snapshot's catalog stands without it.
                Err(e) => {
                    tracing::warn!(group = g, error = %e, "reading the group object failed: its state is not shown");
                    None
                }
            };
        }
        Ok(Catalog {
            snap,
            chunk_size: repo.config.chunk_size,
            index_span: repo.config.index_span,
            index_blocks: m.blocks.len() as u64,
            data_bytes,
            pause_us: m.pause_us,
            pre_exec: m.pre_exec.clone(),
            post_exec: m.post_exec.clone(),
            // Every entry's chunk was checked, or the verify failed.
            verified: verify.then_some(Verified {
                chunks,
                bytes: data_bytes,
                chunk_bytes,
            }),
        })
    }

    /// Deletes a snapshot's manifest; other snapshots stay restorable
    /// (their index blocks are complete maps; chunks are reclaimed by GC).
    ///
    /// # Errors
    /// Unknown snapshot, provider errors.
    pub async fn delete(&self, location: Option<&str>, snap: &str) -> Result<(), CloudError> {
        let (v, n) = name::split(snap).ok_or_else(|| CloudError::BadSnapshotId {
            snap: snap.to_string(),
        })?;
        let location = self.locate(location, snap).await?;
        self.locations
            .writable(&location, "delete cloud snapshots")?;
        let repo = self.locations.repo(&location).await?;
        let _claim = self
            .claims
            .acquire(Want::for_cloudsnap_delete(&location, &format!("{v}/{n}")))?;
        // One read finds the manifest and its group; a manifest that is
        // there but cannot be read is deleted all the same.
        let group = match repo.get_manifest(v, n).await {
            Ok(m) => m.group,
            Err(RepoError::Missing { .. }) => {
                return Err(CloudError::SnapshotNotFound {
                    snapshot: snap.to_string(),
                    location,
                })
            }
            Err(e @ RepoError::Gone { .. }) => return Err(e.into()),
            Err(e) => {
                if !repo.has_manifest(v, n).await? {
                    return Err(CloudError::SnapshotNotFound {
                        snapshot: snap.to_string(),
                        location,
                    });
                }
                tracing::warn!(snapshot = snap, error = %e, "deleting a manifest that cannot be read");
                None
            }
        };
        repo.delete_manifest(v, n).await?;
        tracing::info!(snapshot = snap, %location, "cloud snapshot deleted");
        if let Some(g) = group {
            drop_group_if_empty(&repo, &g, snap).await;
        }
        Ok(())
    }
}

/// Deletes group object `group` once none of its members is left (after
/// the delete of member `deleted`), so that the catalog shows no group of
/// deleted snapshots. Each deleter removes its own member before it looks
/// at the others, so of two deleting the last two members at once, the
/// one that looks last sees both gone. A group object is written only
/// after all its members, and a deleted manifest never comes back.
/// Failures are logged: the snapshot's delete stands either way.
async fn drop_group_if_empty(repo: &Repo, group: &str, deleted: &str) {
    let g = match repo.get_group(group).await {
        Ok(g) => g,
        Err(RepoError::Missing { .. }) => return,
        Err(e) => {
            tracing::warn!(group, error = %e, "reading the group object failed: it stays");
            return;
        }
    };
    for m in g.members.iter().filter(|m| *m != deleted) {
        let Some((v, n)) = name::split(m) else {
            continue;
        };
        match repo.has_manifest(v, n).await {
            Ok(false) => {}
            Ok(true) => return,
            Err(e) => {
                tracing::warn!(group, error = %e, "checking the group's members failed: it stays");
                return;
            }
        }
    }
    match repo.delete_group(group).await {
        Ok(()) => tracing::info!(group, "group object deleted: none of its members is left"),
        Err(e) => tracing::warn!(group, error = %e, "deleting the group object failed"),
    }
}

/// Refuses a `--snap` that is neither `VOLUME/SNAPSHOT` nor a volume name
/// (for its newest snapshot): an empty `--snap "$UNSET"` must not mean
/// "any volume's newest".
fn snapshot_ref(snap: &str) -> Result<(), CloudError> {
    if name::split(snap).is_some() || blockd_api::validate_name(snap).is_ok() {
        return Ok(());
    }
    Err(CloudError::BadSnapshotRef {
        snap: snap.to_string(),
    })
}
