//! Partitioning real (loop-device) disks of 512- and 4096-byte sectors, read back with a
//! stock tool (`sfdisk`), and every refusal that keeps the agent off the wrong disk.

use agent::disk::{self, Locked};
use integration_tests::*;
use std::path::Path;

/// A sparse file on a loop device, detached (with its partitions) on drop.
struct Loop {
    dev: String,
    _attached: LoopDev,
    _dir: tempfile::TempDir,
}

impl Loop {
    fn new(size: &str, sector: u32) -> Loop {
        let dir = scratch();
        let img = dir.path().join("disk.img");
        sh(&format!("truncate -s {size} {}", img.display()));
        let attached = attach(&img, sector);
        Loop {
            dev: attached.0.clone(),
            _attached: attached,
            _dir: dir,
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        // (Then the loop device is detached, with its partitions.)
        let _ = std::process::Command::new("umount")
            .arg(format!("{}p2", self.dev))
            .output();
    }
}

#[test]
fn a_rescue_layout_is_written_and_reads_back_with_sfdisk_on_512_and_4k_disks() {
    for sector in [512u32, 4096] {
        let l = Loop::new("3G", sector);
        let id = disk::identify(Path::new(&l.dev)).unwrap();
        assert_eq!((id.size_bytes, id.logical_sector), (3 << 30, sector as u64));
        disk::check_destructible(&id).unwrap();
        let layout =
            disk::rescue_layout(id.size_bytes, id.logical_sector, 1 << 30, 512 << 20).unwrap();
        let mut locked = Locked::open(&id).unwrap();
        let paths = locked.write_gpt(&layout).unwrap();
        drop(locked);
        assert_eq!(paths.len(), 3);
        for p in &paths {
            assert!(p.exists(), "{}", p.display());
        }
        let out = ok(std::process::Command::new("sfdisk").args(["--json", &l.dev]));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let pt = &v["partitiontable"];
        assert_eq!(pt["label"], "gpt");
        assert_eq!(pt["sectorsize"].as_u64(), Some(sector as u64));
        let parts = pt["partitions"].as_array().unwrap();
        for (want, got) in layout.parts.iter().zip(parts) {
            assert_eq!(
                got["start"].as_u64(),
                Some(want.first_lba),
                "{sector}: {got}"
            );
            assert_eq!(
                got["size"].as_u64(),
                Some(want.last_lba - want.first_lba + 1),
                "{sector}: {got}"
            );
            assert_eq!(
                got["type"].as_str().unwrap().to_lowercase(),
                want.kind.type_guid()
            );
            assert_eq!(got["name"], want.label.as_str());
        }
        ok(std::process::Command::new("sfdisk").args(["--verify", &l.dev]));
        // The protective MBR: one partition of type 0xEE.
        let mbr = sh(&format!(
            "dd if={} bs=1 skip=450 count=1 status=none | od -An -tx1",
            l.dev
        ));
        assert_eq!(mbr.trim(), "ee");
        // The new table's GUID is what identify() now reports.
        let again = disk::identify(Path::new(&l.dev)).unwrap();
        assert!(again.ptuuid.is_some());
        assert!(again.same_disk(&id));
    }
}

#[test]
fn busy_wrong_or_partial_disks_are_refused_with_the_reason() {
    let l = Loop::new("2G", 512);
    let id = disk::identify(Path::new(&l.dev)).unwrap();
    let layout = disk::rescue_layout(id.size_bytes, 512, 512 << 20, 256 << 20).unwrap();
    let parts = Locked::open(&id).unwrap().write_gpt(&layout).unwrap();
    disk::settle(Path::new(&l.dev), &parts).unwrap();
    // A partition is not a disk.
    let e = disk::identify(Path::new(&format!("{}p1", l.dev)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("is a partition"), "{e}");
    // A mounted partition makes the disk untouchable.
    sh(&format!(
        "mkfs.ext4 -q {d}p2 && mkdir -p /mnt/rt-{pid} && mount {d}p2 /mnt/rt-{pid}",
        d = l.dev,
        pid = std::process::id()
    ));
    let e = disk::check_destructible(&id).unwrap_err().to_string();
    assert!(e.contains("is mounted on"), "{e}");
    assert!(Locked::open(&id).is_err());
    sh(&format!(
        "umount /mnt/rt-{pid} && rmdir /mnt/rt-{pid}",
        pid = std::process::id()
    ));
    // A partition in use as swap.
    sh(&format!("mkswap -q {d}p3 && swapon {d}p3", d = l.dev));
    let e = disk::check_destructible(&id).unwrap_err().to_string();
    sh(&format!("swapoff {}p3", l.dev));
    assert!(e.contains("in use as swap"), "{e}");
    // An LVM physical volume label on a partition (written by hand: LABELONE, with LVM's CRC,
    // lib/label/label.c; this kernel has no device-mapper to run pvcreate against).
    let lvm_label = format!(
        r#"
import struct, zlib
s = bytearray(512)
s[0:8] = b"LABELONE"; struct.pack_into("<Q", s, 8, 1); struct.pack_into("<I", s, 20, 32)
s[24:32] = b"LVM2 001"; s[32:64] = b"abcdefghijklmnopqrstuvwxyzABCDEF"; struct.pack_into("<Q", s, 64, 1 << 26)
struct.pack_into("<I", s, 16, (~zlib.crc32(bytes(s[20:]), ~0xf597a6cf & 0xffffffff)) & 0xffffffff)
with open("{d}p3", "r+b") as f:
    f.seek(512); f.write(s)
"#,
        d = l.dev
    );
    ok(std::process::Command::new("python3")
        .arg("-c")
        .arg(&lvm_label));
    let e = disk::check_destructible(&id).unwrap_err().to_string();
    assert!(e.contains("LVM physical volume"), "{e}");
    sh(&format!("wipefs -a -q {}p3", l.dev));
    disk::check_destructible(&id).unwrap();
    // A disk that is not the one pinned in the plan (another size: another disk).
    let mut pinned = id.clone();
    pinned.size_bytes += 1 << 20;
    let e = Locked::open(&pinned).err().unwrap().to_string();
    assert!(e.contains("not the disk pinned"), "{e}");
    // Nothing that is not a block device.
    let e = disk::identify(Path::new("/etc/hostname"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a block device"), "{e}");
}

#[test]
fn plan_shows_both_disks_and_layouts_and_refuses_the_root_disk() {
    let l = Loop::new("4G", 4096);
    let out = ok(reinstall().args(["plan", "--json", "--disk2", &l.dev]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["disk2"]["path"], l.dev.as_str());
    assert_eq!(v["disk2"]["logical_sector"], 4096);
    assert_eq!(v["disk2_layout"]["parts"].as_array().unwrap().len(), 3);
    assert!(v["disk1_layout"]["parts"].as_array().unwrap().len() >= 2);
    assert!(!v["network"]["interfaces"].as_array().unwrap().is_empty());
    // Nothing was written.
    assert!(disk::identify(Path::new(&l.dev)).unwrap().ptuuid.is_none());
    // The running root disk is never disk 2.
    for root in disk::root_disks() {
        let err = fails(reinstall().args(["plan", "--disk2", &format!("/dev/{root}")]));
        assert!(err.contains("running root"), "{err}");
    }
    // Without --disk2, a machine whose only disk is its root disk has no disk 2.
    let physical = std::fs::read_dir("/sys/block")
        .unwrap()
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            !["loop", "ram", "zram", "sr", "dm-", "md", "nbd", "fd"]
                .iter()
                .any(|p| n.starts_with(p))
        })
        .count();
    if physical == 1 {
        let err = fails(reinstall().args(["plan"]));
        assert!(err.contains("no second disk"), "{err}");
    }
    // Too small for rescue + stash.
    let small = Loop::new("1G", 512);
    let err = fails(reinstall().args(["plan", "--disk2", &small.dev]));
    assert!(err.contains("too small"), "{err}");
}

#[test]
fn plan_sizes_disk_2_for_the_target_bundle_read_from_the_stager() {
    use integration_tests::stager::Stager;
    let w = scratch();
    let tree = w.path().join("target");
    std::fs::create_dir_all(&tree).unwrap();
    sh(&format!(
        "head -c 5000000 /dev/urandom > {}/blob",
        tree.display()
    ));
    let mut s = Stager::new(w.path(), &tree);
    s.start();
    let l = Loop::new("4G", 512);
    let out = ok(s
        .reinstall("alice")
        .args(["plan", "--json", "--disk2", &l.dev, "--target", "target"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["target"], "target@1");
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(s.home.join("bundles/target/1/manifest.json")).unwrap(),
    )
    .unwrap();
    let size = m["payload"]["size"].as_u64().unwrap();
    assert_eq!(v["stash_min_bytes"].as_u64(), Some(size + (64 << 20)));
    // A rescue bundle is not a target, and an agent identity cannot size for a bundle.
    let err = fails(
        s.reinstall("alice")
            .args(["plan", "--disk2", &l.dev, "--target", "rescue"]),
    );
    assert!(err.contains("not a target"), "{err}");
    let err = fails(
        s.reinstall("web1")
            .args(["plan", "--disk2", &l.dev, "--target", "target"]),
    );
    assert!(err.contains("operator identity"), "{err}");
}
