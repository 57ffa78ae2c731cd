//! The shape of the catalog tree: what each inode is, and which names a
//! directory holds given the current listing of the bucket. Pure data, no
//! I/O: the file system in `mod.rs` fills the listing and answers the
//! kernel.
//!
//! ```text
//! /                         volumes that have snapshots, and `groups`
//! /<volume>/                one directory per snapshot, `latest` -> newest
//! /<volume>/<snap>/disk.img the volume at that snapshot (size = volume size)
//! /<volume>/<snap>/info.json the snapshot as `cloudsnap list -j` shows it
//! /groups/<group>/          `<volume>` -> ../../<volume>/<snap> per member,
//!                           and info.json (the group object)
//! ```
//! A volume named `groups` is hidden by the groups directory.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

/// Name of the directory of group backups.
pub const GROUPS: &str = "groups";
/// Name of a snapshot's image.
pub const DISK: &str = "disk.img";
/// Name of a snapshot's or group's description.
pub const INFO: &str = "info.json";
/// Name of a volume's newest snapshot link.
pub const LATEST: &str = "latest";

/// What an inode is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Node {
    /// The mount point.
    Root,
    /// `groups/`.
    Groups,
    /// `<volume>/`.
    Volume(String),
    /// `<volume>/latest`.
    Latest(String),
    /// `<volume>/<snap>/`.
    Snapshot(String, String),
    /// `<volume>/<snap>/disk.img`.
    Disk(String, String),
    /// `<volume>/<snap>/info.json`.
    Info(String, String),
    /// `groups/<group>/`.
    Group(String),
    /// `groups/<group>/info.json`.
    GroupInfo(String),
    /// `groups/<group>/<volume>`.
    Member(String, String),
}

/// The three kinds of node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A read-only regular file.
    File,
    /// A relative symbolic link.
    Link,
}

impl Node {
    /// Its kind.
    pub fn kind(&self) -> Kind {
        match self {
            Self::Root | Self::Groups | Self::Volume(_) | Self::Snapshot(..) | Self::Group(_) => {
                Kind::Dir
            }
            Self::Latest(_) | Self::Member(..) => Kind::Link,
            Self::Disk(..) | Self::Info(..) | Self::GroupInfo(_) => Kind::File,
        }
    }

    /// The snapshot id (`volume/name`) it belongs to, for log lines.
    pub fn snapshot(&self) -> Option<String> {
        match self {
            Self::Snapshot(v, n) | Self::Disk(v, n) | Self::Info(v, n) => Some(format!("{v}/{n}")),
            _ => None,
        }
    }
}

/// Inode numbers: stable for the life of the mount (a path keeps its
/// number), never reused. 1 is the root.
#[derive(Debug)]
pub struct Inodes {
    by_node: HashMap<Node, u64>,
    nodes: Vec<Node>,
}

impl Default for Inodes {
    fn default() -> Self {
        let mut me = Self {
            by_node: HashMap::new(),
            nodes: Vec::new(),
        };
        me.ino(Node::Root);
        me
    }
}

impl Inodes {
    /// The number of `node`, given one on first sight.
    pub fn ino(&mut self, node: Node) -> u64 {
        if let Some(i) = self.by_node.get(&node) {
            return *i;
        }
        self.nodes.push(node.clone());
        let ino = self.nodes.len() as u64;
        self.by_node.insert(node, ino);
        ino
    }

    /// The node numbered `ino`.
    pub fn node(&self, ino: u64) -> Option<&Node> {
        usize::try_from(ino.checked_sub(1)?)
            .ok()
            .and_then(|i| self.nodes.get(i))
    }
}

/// What the bucket holds, as last listed.
#[derive(Debug, Clone)]
pub struct Listing {
    /// Snapshot names per volume, oldest first (names sort by time).
    pub volumes: BTreeMap<String, Vec<String>>,
    /// Group ids.
    pub groups: Vec<String>,
    /// When it was listed.
    pub at: Instant,
    /// The repository's change count when it was listed
    /// ([`crate::repo::Repo::changes`]).
    pub changes: u64,
}

impl Listing {
    /// Builds a listing from `(volume, name)` pairs that are snapshots.
    pub fn new(snapshots: Vec<(String, String)>, groups: Vec<String>) -> Self {
        let mut volumes: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (v, n) in snapshots {
            volumes.entry(v).or_default().push(n);
        }
        for names in volumes.values_mut() {
            names.sort();
        }
        Self {
            volumes,
            groups,
            at: Instant::now(),
            changes: 0,
        }
    }

    /// True when snapshot `volume/name` was listed.
    pub fn has(&self, volume: &str, name: &str) -> bool {
        self.volumes
            .get(volume)
            .is_some_and(|names| names.binary_search_by(|n| n.as_str().cmp(name)).is_ok())
    }

    /// The newest snapshot of `volume`.
    pub fn latest(&self, volume: &str) -> Option<&str> {
        self.volumes
            .get(volume)
            .and_then(|n| n.last())
            .map(String::as_str)
    }

    /// Children of a directory that need only the listing; `None` for
    /// nodes whose children depend on an object (a group's members) or
    /// that are not directories.
    pub fn children(&self, dir: &Node) -> Option<Vec<(String, Node)>> {
        Some(match dir {
            Node::Root => self
                .volumes
                .keys()
                .filter(|v| v.as_str() != GROUPS)
                .map(|v| (v.clone(), Node::Volume(v.clone())))
                .chain(std::iter::once((GROUPS.to_string(), Node::Groups)))
                .collect(),
            Node::Groups => self
                .groups
                .iter()
                .map(|g| (g.clone(), Node::Group(g.clone())))
                .collect(),
            Node::Volume(v) => {
                let names = self.volumes.get(v)?;
                names
                    .iter()
                    .map(|n| (n.clone(), Node::Snapshot(v.clone(), n.clone())))
                    .chain(std::iter::once((
                        LATEST.to_string(),
                        Node::Latest(v.clone()),
                    )))
                    .collect()
            }
            Node::Snapshot(v, n) => {
                if !self.has(v, n) {
                    return None;
                }
                vec![
                    (DISK.to_string(), Node::Disk(v.clone(), n.clone())),
                    (INFO.to_string(), Node::Info(v.clone(), n.clone())),
                ]
            }
            _ => return None,
        })
    }
}

/// Target of a group member's link.
pub fn member_target(volume: &str, name: &str) -> String {
    format!("../../{volume}/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_numbers_are_stable() {
        let mut i = Inodes::default();
        assert_eq!(i.ino(Node::Root), 1);
        let a = i.ino(Node::Volume("a".into()));
        let b = i.ino(Node::Disk("a".into(), "s".into()));
        assert_eq!(i.ino(Node::Volume("a".into())), a);
        assert_ne!(a, b);
        assert_eq!(i.node(b), Some(&Node::Disk("a".into(), "s".into())));
        assert_eq!(i.node(0), None);
        assert_eq!(i.node(99), None);
    }

    #[test]
    fn directories_follow_the_listing() {
        let l = Listing::new(
            vec![
                ("v".into(), "2".into()),
                ("v".into(), "1".into()),
                ("w".into(), "1".into()),
            ],
            vec!["g".into()],
        );
        assert_eq!(l.latest("v"), Some("2"));
        let names = |n: &Node| -> Vec<String> {
            l.children(n)
                .unwrap()
                .into_iter()
                .map(|(name, _)| name)
                .collect()
        };
        assert_eq!(names(&Node::Root), ["v", "w", "groups"]);
        assert_eq!(names(&Node::Volume("v".into())), ["1", "2", "latest"]);
        assert_eq!(
            names(&Node::Snapshot("v".into(), "1".into())),
            ["disk.img", "info.json"]
        );
        assert_eq!(names(&Node::Groups), ["g"]);
        assert!(l.children(&Node::Volume("x".into())).is_none());
        assert!(l
            .children(&Node::Snapshot("v".into(), "3".into()))
            .is_none());
    }
}
