//! Describes a directory tree entry by entry (everything an OS tree depends on) and compares
//! two descriptions, so that "our unpack equals GNU tar's" is one assertion with a readable
//! list of differences.

use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Whole seconds: what a tar header carries.
    pub mtime: i64,
    pub size: u64,
    pub sha256: Option<String>,
    pub link: Option<Vec<u8>>,
    pub rdev: u64,
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// The first path (in sorted order) sharing this entry's inode, for hard links.
    pub inode_group: Vec<u8>,
}

impl fmt::Display for Info {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:o} {}:{} mtime={} size={} rdev={} link={:?} group={:?} xattrs={:?}",
            self.kind,
            self.mode,
            self.uid,
            self.gid,
            self.mtime,
            self.size,
            self.rdev,
            self.link
                .as_ref()
                .map(|l| String::from_utf8_lossy(l).into_owned()),
            String::from_utf8_lossy(&self.inode_group),
            self.xattrs
                .iter()
                .map(|(k, v)| format!("{k}={}", v.len()))
                .collect::<Vec<_>>()
        )?;
        if let Some(h) = &self.sha256 {
            write!(f, " sha256={}", &h[..12])?;
        }
        Ok(())
    }
}

pub type Tree = BTreeMap<Vec<u8>, Info>;

/// Walks `root` without following symlinks. Keys are paths relative to root (root is "").
pub fn describe(root: &Path) -> Tree {
    let mut out = Tree::new();
    let mut first_of_inode: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let mut paths = Vec::new();
    collect(root, Path::new(""), &mut paths);
    paths.sort_by(|a, b| a.as_os_str().as_bytes().cmp(b.as_os_str().as_bytes()));
    for rel in paths {
        let abs = root.join(&rel);
        let md = std::fs::symlink_metadata(&abs).unwrap();
        let ft = md.file_type();
        let key = rel.as_os_str().as_bytes().to_vec();
        let kind = if ft.is_dir() {
            'd'
        } else if ft.is_symlink() {
            'l'
        } else if ft.is_file() {
            'f'
        } else if ft.is_char_device() {
            'c'
        } else if ft.is_block_device() {
            'b'
        } else if ft.is_fifo() {
            'p'
        } else {
            's'
        };
        let group = if kind != 'd' {
            first_of_inode
                .entry((md.dev(), md.ino()))
                .or_insert_with(|| key.clone())
                .clone()
        } else {
            key.clone()
        };
        let sha256 = (kind == 'f').then(|| {
            let mut h = Sha256::new();
            let mut f = std::fs::File::open(&abs).unwrap();
            std::io::copy(&mut f, &mut h).unwrap();
            bundle::pipe::hex(&h.finalize())
        });
        let mut xattrs: Vec<(String, Vec<u8>)> = xattr::list(&abs)
            .map(|names| {
                names
                    .filter_map(|n| {
                        let v = xattr::get(&abs, &n).ok()??;
                        Some((n.to_string_lossy().into_owned(), v))
                    })
                    .collect()
            })
            .unwrap_or_default();
        xattrs.sort();
        out.insert(
            key,
            Info {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                mtime: md.mtime(),
                size: if kind == 'f' { md.len() } else { 0 },
                sha256,
                link: ft.is_symlink().then(|| {
                    std::fs::read_link(&abs)
                        .unwrap()
                        .as_os_str()
                        .as_bytes()
                        .to_vec()
                }),
                rdev: if kind == 'c' || kind == 'b' {
                    md.rdev()
                } else {
                    0
                },
                xattrs,
                inode_group: group,
            },
        );
    }
    out
}

fn collect(root: &Path, rel: &Path, out: &mut Vec<std::path::PathBuf>) {
    out.push(rel.to_path_buf());
    let abs = root.join(rel);
    if std::fs::symlink_metadata(&abs).unwrap().is_dir() {
        for e in std::fs::read_dir(&abs).unwrap() {
            collect(root, &rel.join(e.unwrap().file_name()), out);
        }
    }
}

/// Lists the differences between two trees (at most `max`), ignoring the root's own mtime and
/// the paths for which `ignore` returns true.
pub fn diff(a: &Tree, b: &Tree, max: usize, ignore: impl Fn(&[u8]) -> bool) -> Vec<String> {
    let mut out = Vec::new();
    let keys: std::collections::BTreeSet<&Vec<u8>> = a.keys().chain(b.keys()).collect();
    for k in keys {
        if ignore(k) {
            continue;
        }
        let name = String::from_utf8_lossy(k);
        match (a.get(k), b.get(k)) {
            (Some(x), Some(y)) if x == y => {}
            (Some(x), Some(y)) => out.push(format!("{name:?}:\n  left  {x}\n  right {y}")),
            (Some(_), None) => out.push(format!("{name:?}: only on the left")),
            (None, Some(_)) => out.push(format!("{name:?}: only on the right")),
            (None, None) => unreachable!(),
        }
        if out.len() >= max {
            break;
        }
    }
    out
}
