//! The relay's cache on its own disk: how much it may hold, and which blobs go to make room
//! for a new one (the least recently served first).
//!
//! A blob is `cache/SHA` (complete) or `cache/SHA.part` (a download under way, or one an
//! earlier run left, which a later request resumes). A file's modification time is when it
//! was last written or served: the relay sets it on every blob it serves from the cache.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// What `relay.toml` allows the cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Most bytes the cache holds, downloads under way included (`cache_max_mib`).
    pub max_bytes: Option<u64>,
    /// Share of its filesystem the cache leaves free (`cache_keep_free_percent`).
    pub keep_free_percent: u8,
}

/// A file in the cache that may be deleted.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub path: PathBuf,
    pub bytes: u64,
    pub used: SystemTime,
}

/// The cache's filesystem: bytes available to the relay, and its size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Disk {
    pub free: u64,
    pub total: u64,
}

pub fn disk(dir: &Path) -> io::Result<Disk> {
    let s = nix::sys::statvfs::statvfs(dir).map_err(io::Error::from)?;
    let frag = s.fragment_size().max(1);
    Ok(Disk {
        free: s.blocks_available().saturating_mul(frag),
        total: s.blocks().saturating_mul(frag),
    })
}

/// The cache as it is now.
#[derive(Debug, Default)]
pub struct Scan {
    /// Files that may go: complete blobs, and `.part` files no download is writing.
    pub entries: Vec<Entry>,
    /// Files that stay, blob → bytes on disk: the `.part` files of `keep` (downloads under
    /// way, and the one about to start or resume).
    pub kept: HashMap<String, u64>,
}

impl Scan {
    pub fn bytes(&self) -> u64 {
        self.kept.values().sum::<u64>() + self.entries.iter().map(|e| e.bytes).sum::<u64>()
    }

    /// Bytes the downloads of `keep` (blob → length) still have to write.
    pub fn to_come(&self, keep: &HashMap<String, u64>) -> u64 {
        keep.iter()
            .map(|(sha, len)| len.saturating_sub(self.kept.get(sha).copied().unwrap_or(0)))
            .sum()
    }
}

/// Reads `dir`; the `.part` files of the blobs in `keep` are counted, never offered.
pub fn scan(dir: &Path, keep: &HashMap<String, u64>) -> io::Result<Scan> {
    let mut s = Scan::default();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let m = match e.metadata() {
            Ok(m) if m.is_file() => m,
            Ok(_) => continue,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err),
        };
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(sha) = name
            .strip_suffix(".part")
            .filter(|sha| keep.contains_key(*sha))
        {
            s.kept.insert(sha.to_string(), m.len());
            continue;
        }
        s.entries.push(Entry {
            path: e.path(),
            bytes: m.len(),
            used: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        });
    }
    Ok(s)
}

/// Which of `scan`'s entries to delete, least recently used first, so that `need` more
/// bytes fit, while the downloads under way still have `pending` bytes to write: the cache
/// stays within `max_bytes` and leaves `keep_free_percent` of its disk free. `Err` says
/// which limit a blob of `need` bytes cannot fit within even with every entry deleted (the
/// blob then passes through uncached, and nothing is deleted).
pub fn make_room(
    scan: &Scan,
    pending: u64,
    need: u64,
    disk: Disk,
    limits: Limits,
) -> Result<Vec<usize>, String> {
    let keep_free = disk.total / 100 * u64::from(limits.keep_free_percent);
    let fits = |freed: u64| {
        let held = scan.bytes() - freed + pending + need;
        let cap = limits.max_bytes.is_none_or(|max| held <= max);
        let room = disk.free + freed >= pending + need + keep_free;
        (cap, room)
    };
    let mut order: Vec<usize> = (0..scan.entries.len()).collect();
    order.sort_by_key(|&i| scan.entries[i].used);
    let mut freed = 0;
    let mut chosen = Vec::new();
    for i in order {
        if fits(freed) == (true, true) {
            break;
        }
        freed += scan.entries[i].bytes;
        chosen.push(i);
    }
    let mib = |b: u64| b.div_ceil(1 << 20);
    match fits(freed) {
        (true, true) => Ok(chosen),
        (false, _) => Err(format!(
            "{} MiB do not fit in the cache's cap of {} MiB (cache_max_mib){}",
            mib(need),
            mib(limits.max_bytes.unwrap_or_default()),
            if pending > 0 {
                format!(", with {} MiB of downloads under way", mib(pending))
            } else {
                String::new()
            }
        )),
        (true, false) => Err(format!(
            "{} MiB do not fit on the cache's disk: {} MiB free{} must keep {}% of its {} MiB free (cache_keep_free_percent)",
            mib(need),
            mib(disk.free + freed),
            if pending > 0 {
                format!(", {} MiB of it promised to downloads under way,", mib(pending))
            } else {
                String::new()
            },
            limits.keep_free_percent,
            mib(disk.total)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MIB: u64 = 1 << 20;

    fn entry(name: &str, mib: u64, age_s: u64) -> Entry {
        Entry {
            path: PathBuf::from(name),
            bytes: mib * MIB,
            used: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 - age_s),
        }
    }

    fn names(s: &Scan, picked: &[usize]) -> Vec<String> {
        picked
            .iter()
            .map(|&i| s.entries[i].path.display().to_string())
            .collect()
    }

    const BIG_DISK: Disk = Disk {
        free: 1000 * MIB,
        total: 2000 * MIB,
    };

    #[test]
    fn the_least_recently_used_go_first_and_only_as_many_as_needed() {
        let s = Scan {
            entries: vec![
                entry("new", 10, 1),
                entry("old", 10, 300),
                entry("middle", 10, 20),
            ],
            kept: HashMap::new(),
        };
        let cap = |max| Limits {
            max_bytes: Some(max * MIB),
            keep_free_percent: 10,
        };
        // 30 held + 10 needed within 40: nothing goes.
        assert_eq!(make_room(&s, 0, 10 * MIB, BIG_DISK, cap(40)), Ok(vec![]));
        assert_eq!(
            names(&s, &make_room(&s, 0, 10 * MIB, BIG_DISK, cap(30)).unwrap()),
            ["old"]
        );
        assert_eq!(
            names(&s, &make_room(&s, 0, 15 * MIB, BIG_DISK, cap(30)).unwrap()),
            ["old", "middle"]
        );
        // Downloads under way hold their room: 5 MiB still to come.
        assert_eq!(
            names(
                &s,
                &make_room(&s, 5 * MIB, 10 * MIB, BIG_DISK, cap(40)).unwrap()
            ),
            ["old"]
        );
        // Without a cap the disk's free share decides: 100 MiB must stay free of 1000.
        let disk = Disk {
            free: 115 * MIB,
            total: 1000 * MIB,
        };
        let free10 = Limits {
            max_bytes: None,
            keep_free_percent: 10,
        };
        assert_eq!(make_room(&s, 0, 15 * MIB, disk, free10), Ok(vec![]));
        assert_eq!(
            names(&s, &make_room(&s, 0, 16 * MIB, disk, free10).unwrap()),
            ["old"]
        );
    }

    #[test]
    fn a_blob_that_cannot_fit_deletes_nothing_and_says_which_limit() {
        let s = Scan {
            entries: vec![entry("a", 10, 5)],
            kept: HashMap::from([("x".to_string(), 4 * MIB)]),
        };
        let e = make_room(
            &s,
            0,
            40 * MIB,
            BIG_DISK,
            Limits {
                max_bytes: Some(32 * MIB),
                keep_free_percent: 0,
            },
        )
        .unwrap_err();
        assert!(e.contains("40 MiB") && e.contains("cap of 32 MiB"), "{e}");
        let e = make_room(
            &s,
            3 * MIB,
            40 * MIB,
            Disk {
                free: 30 * MIB,
                total: 100 * MIB,
            },
            Limits {
                max_bytes: None,
                keep_free_percent: 5,
            },
        )
        .unwrap_err();
        assert!(
            e.contains("40 MiB do not fit on the cache's disk: 40 MiB free")
                && e.contains("3 MiB of it promised")
                && e.contains("keep 5%"),
            "{e}"
        );
    }

    #[test]
    fn a_scan_offers_finished_blobs_and_stale_parts_but_counts_running_ones() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("aa"), vec![0; 100]).unwrap();
        std::fs::write(d.path().join("bb.part"), vec![0; 10]).unwrap();
        std::fs::write(d.path().join("cc.part"), vec![0; 7]).unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        let keep = HashMap::from([("cc".to_string(), 50)]);
        let s = scan(d.path(), &keep).unwrap();
        let mut got: Vec<_> = s
            .entries
            .iter()
            .map(|e| (e.path.file_name().unwrap().to_str().unwrap(), e.bytes))
            .collect();
        got.sort();
        assert_eq!(got, [("aa", 100), ("bb.part", 10)]);
        assert_eq!(s.kept, HashMap::from([("cc".to_string(), 7)]));
        assert_eq!(s.bytes(), 117);
        assert_eq!(s.to_come(&keep), 43);
        assert!(disk(d.path()).unwrap().total > 0);
    }
}
