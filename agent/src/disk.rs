//! Disks: stable identity, the checks that keep the agent from writing the wrong disk, GPT
//! layouts (planned in memory, validated, then written in one step), and partition nodes.
//!
//! Wrong-disk wipes are the worst failure in this field. Before anything is written to a disk:
//! it is named by its canonical `/dev` path and must be a whole block device; it must not hold
//! the running root (directly or under device-mapper/md); none of its partitions may be
//! mounted, used as swap, held by another device (dm, md, LVM) or carry an md/LVM/ZFS member
//! signature; it is opened with `O_EXCL` (the kernel refuses if it is in use) and locked with
//! `flock(LOCK_EX)` (systemd's block-device locking convention, `docs/BLOCK_DEVICE_LOCKING.md`);
//! and its identity (serial/WWN, size, sector sizes) is compared with what was pinned when the
//! job was planned.
//!
//! GPT tables are written with `gptman` (with a protective MBR), after our own validation:
//! partitions aligned to 1 MiB, in order, not overlapping, inside the usable area.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

/// A disk as pinned in a plan: enough to recognize it again after a reboot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskId {
    /// Canonical device path when identified, `/dev/sdb`.
    pub path: String,
    pub name: String,
    /// `/dev/disk/by-id/...` links that point to it.
    pub by_id: Vec<String>,
    pub serial: Option<String>,
    pub wwn: Option<String>,
    pub model: Option<String>,
    pub size_bytes: u64,
    pub logical_sector: u64,
    pub physical_sector: u64,
    /// The GPT disk GUID, if it has a GPT.
    pub ptuuid: Option<String>,
}

fn sys(name: &str, rel: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/block/{name}/{rel}"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Identifies a whole disk by path.
pub fn identify(path: &Path) -> Result<DiskId> {
    let canon = std::fs::canonicalize(path)
        .with_context(|| format!("{}: no such device", path.display()))?;
    let md = std::fs::metadata(&canon).with_context(|| format!("reading {}", canon.display()))?;
    if !md.file_type().is_block_device() {
        bail!("{} is not a block device", canon.display());
    }
    let name = canon
        .file_name()
        .and_then(|n| n.to_str())
        .context("device name")?
        .to_string();
    if !Path::new(&format!("/sys/block/{name}")).exists() {
        bail!(
            "{} is a partition, not a whole disk; name the disk",
            canon.display()
        );
    }
    let num = |rel: &str| sys(&name, rel).and_then(|v| v.parse::<u64>().ok());
    let size_bytes = num("size").context("reading the disk size from sysfs")? * 512;
    let mut by_id = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/dev/disk/by-id") {
        for e in rd.flatten() {
            if std::fs::canonicalize(e.path()).ok().as_deref() == Some(canon.as_path()) {
                by_id.push(e.path().display().to_string());
            }
        }
    }
    by_id.sort();
    let logical_sector = num("queue/logical_block_size").unwrap_or(512);
    let ptuuid = File::open(&canon)
        .ok()
        .and_then(|mut f| gptman::GPT::read_from(&mut f, logical_sector).ok())
        .map(|g| bootcfg::efi::Guid(g.header.disk_guid).to_string());
    Ok(DiskId {
        path: canon.display().to_string(),
        serial: sys(&name, "device/serial").or_else(|| sys(&name, "serial")),
        wwn: sys(&name, "wwid").or_else(|| sys(&name, "device/wwid")),
        model: sys(&name, "device/model"),
        size_bytes,
        logical_sector,
        physical_sector: num("queue/physical_block_size").unwrap_or(logical_sector),
        ptuuid,
        by_id,
        name,
    })
}

impl DiskId {
    /// The same physical disk: serial/WWN (when known), size and sector sizes. The path may
    /// differ between boots; the partition table may have been rewritten by us.
    pub fn same_disk(&self, other: &DiskId) -> bool {
        self.serial == other.serial
            && self.wwn == other.wwn
            && self.size_bytes == other.size_bytes
            && self.logical_sector == other.logical_sector
            && self.physical_sector == other.physical_sector
    }

    /// Partition device names, from sysfs (`sda1`, `nvme0n1p1`, `loop0p1`).
    pub fn partitions(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(format!("/sys/block/{}", self.name))
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().join("partition").exists())
                    .filter_map(|e| e.file_name().to_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn read_gpt(&self) -> Result<gptman::GPT> {
        let mut f = File::open(&self.path).with_context(|| format!("opening {}", self.path))?;
        gptman::GPT::read_from(&mut f, self.logical_sector)
            .with_context(|| format!("reading the GPT of {}", self.path))
    }

    /// The partitions of the disk's GPT as they are, as a [`Layout`] (what `reinstall plan`
    /// shows of a disk a job keeps); partitions of a type this agent does not write are left
    /// out.
    pub fn read_layout(&self) -> Result<Layout> {
        let gpt = self.read_gpt()?;
        let parts = gpt
            .iter()
            .filter(|(_, p)| p.is_used())
            .filter_map(|(n, p)| {
                let guid = bootcfg::efi::Guid(p.partition_type_guid).to_string();
                Some(Planned {
                    number: n,
                    label: p.partition_name.as_str().to_string(),
                    kind: PartKind::ALL
                        .into_iter()
                        .find(|k| k.type_guid().eq_ignore_ascii_case(&guid))?,
                    first_lba: p.starting_lba,
                    last_lba: p.ending_lba,
                })
            })
            .collect();
        Ok(Layout {
            sector: self.logical_sector,
            total_sectors: self.size_bytes / self.logical_sector,
            parts,
        })
    }

    /// The (first) partition of `kind`, read from the disk's GPT: its number, unique GUID,
    /// first LBA and size in LBAs (what a UEFI hard-drive device path names).
    pub fn find_partition(&self, kind: PartKind) -> Result<PartInfo> {
        let gpt = self.read_gpt()?;
        let want = bootcfg::efi::Guid::parse(kind.type_guid())
            .expect("constant")
            .0;
        let found = gpt
            .iter()
            .find(|(_, p)| p.is_used() && p.partition_type_guid == want)
            .map(|(n, p)| PartInfo {
                number: n,
                guid: bootcfg::efi::Guid(p.unique_partition_guid).to_string(),
                start_lba: p.starting_lba,
                size_lba: p.ending_lba - p.starting_lba + 1,
            });
        found.with_context(|| format!("{} has no {kind:?} partition", self.path))
    }

    pub fn partition_path(&self, n: u32) -> PathBuf {
        let sep = if self.name.ends_with(|c: char| c.is_ascii_digit()) {
            "p"
        } else {
            ""
        };
        PathBuf::from(format!("/dev/{}{sep}{n}", self.name))
    }
}

/// A partition as read back from a GPT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartInfo {
    pub number: u32,
    pub guid: String,
    pub start_lba: u64,
    pub size_lba: u64,
}

/// `MAJ:MIN` of a sysfs block entry (`sda` or `sda/sda1`).
fn devnum(rel: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/block/{rel}/dev"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Whole disks under a block device given as `MAJ:MIN`: the disk of a partition, and every
/// disk beneath device-mapper or md (`slaves`).
fn disks_under(devnum: &str) -> Vec<String> {
    let Ok(link) = std::fs::canonicalize(format!("/sys/dev/block/{devnum}")) else {
        return Vec::new();
    };
    let base = if link.join("partition").exists() {
        link.parent().map(Path::to_path_buf).unwrap_or(link)
    } else {
        link
    };
    let mut out = Vec::new();
    let slaves: Vec<PathBuf> = std::fs::read_dir(base.join("slaves"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    if slaves.is_empty() {
        if let Some(n) = base.file_name().and_then(|n| n.to_str()) {
            out.push(n.to_string());
        }
    }
    for s in slaves {
        if let Ok(d) = std::fs::read_to_string(s.join("dev")) {
            out.extend(disks_under(d.trim()));
        }
    }
    out
}

/// Mounted `MAJ:MIN`s and where, from /proc/self/mountinfo.
pub fn mounts() -> Vec<(String, String)> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Some((f.get(2)?.to_string(), f.get(4)?.to_string()))
        })
        .collect()
}

/// The whole disks holding the running root filesystem.
pub fn root_disks() -> Vec<String> {
    root_disks_of(Path::new("/"))
}

/// The whole disks holding the filesystem that contains `root` (the OS tree the agent runs
/// as: `/` on a real machine, a mounted tree in tests).
pub fn root_disks_of(root: &Path) -> Vec<String> {
    let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    let best = mounts()
        .into_iter()
        .filter(|(_, mp)| root.starts_with(mp))
        .max_by_key(|(_, mp)| mp.len());
    best.map(|(dev, _)| disks_under(&dev)).unwrap_or_default()
}

/// Refuses, with the reason, a disk that must not be partitioned.
pub fn check_destructible(id: &DiskId) -> Result<()> {
    check_destructible_for(id, Path::new("/"))
}

/// As [`check_destructible`], also refusing the disks under the agent's root tree `root`.
pub fn check_destructible_for(id: &DiskId, root: &Path) -> Result<()> {
    let d = &id.path;
    if root_disks().contains(&id.name) || root_disks_of(root).contains(&id.name) {
        bail!("{d} holds the running root filesystem");
    }
    let mut parts: Vec<String> = vec![id.name.clone()];
    parts.extend(
        id.partitions()
            .into_iter()
            .map(|p| format!("{}/{p}", id.name)),
    );
    let mounted = mounts();
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    for rel in &parts {
        let leaf = rel.rsplit('/').next().unwrap_or(rel);
        if let Some(num) = devnum(rel) {
            if let Some((_, mp)) = mounted.iter().find(|(dev, _)| *dev == num) {
                bail!("{d}: /dev/{leaf} is mounted on {mp}");
            }
        }
        if swaps
            .lines()
            .skip(1)
            .any(|l| l.split_whitespace().next() == Some(&format!("/dev/{leaf}")))
        {
            bail!("{d}: /dev/{leaf} is in use as swap");
        }
        let holders: Vec<String> = std::fs::read_dir(format!("/sys/block/{rel}/holders"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().to_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        if !holders.is_empty() {
            bail!(
                "{d}: /dev/{leaf} is held by {} (device-mapper, LVM, md or dm-crypt)",
                holders.join(", ")
            );
        }
        if let Some(t) = signature(&format!("/dev/{leaf}")) {
            let what = match t.as_str() {
                "linux_raid_member" => Some("an md RAID member"),
                "LVM2_member" => Some("an LVM physical volume"),
                "zfs_member" => Some("a ZFS pool member"),
                _ => None,
            };
            if let Some(w) = what {
                bail!("{d}: /dev/{leaf} is {w} ({t}); take it out of its set first");
            }
        }
    }
    Ok(())
}

/// The filesystem or RAID signature on a device, as `blkid` names it.
fn signature(dev: &str) -> Option<String> {
    let out = std::process::Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE", dev])
        .output()
        .ok()?;
    let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!t.is_empty()).then_some(t)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PartKind {
    Esp,
    BiosBoot,
    LinuxRoot,
    LinuxData,
    /// Microsoft reserved (MSR): Windows expects one after the ESP on GPT disks.
    MsReserved,
    /// Microsoft basic data: the Windows volume.
    MsBasicData,
}

impl PartKind {
    pub const ALL: [PartKind; 6] = [
        PartKind::Esp,
        PartKind::BiosBoot,
        PartKind::LinuxRoot,
        PartKind::LinuxData,
        PartKind::MsReserved,
        PartKind::MsBasicData,
    ];

    /// GPT partition type GUIDs (UEFI spec §5.3.3; Discoverable Partitions Specification).
    pub fn type_guid(self) -> &'static str {
        match self {
            PartKind::Esp => "c12a7328-f81f-11d2-ba4b-00a0c93ec93b",
            PartKind::BiosBoot => "21686148-6449-6e6f-744e-656564454649",
            PartKind::LinuxRoot => "4f68bce3-e8cd-4db1-96e7-fbcaf984b709",
            PartKind::LinuxData => "0fc63daf-8483-4772-8e79-3d69d8477de4",
            PartKind::MsReserved => "e3c9e316-0b5c-4db8-817d-f92df00215ae",
            PartKind::MsBasicData => "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7",
        }
    }
}

/// A wanted partition: `size` in bytes, or `None` for the rest of the disk (last only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartSpec {
    pub label: &'static str,
    pub kind: PartKind,
    pub size: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Planned {
    pub number: u32,
    pub label: String,
    pub kind: PartKind,
    pub first_lba: u64,
    pub last_lba: u64,
}

impl Planned {
    pub fn bytes(&self, sector: u64) -> u64 {
        (self.last_lba - self.first_lba + 1) * sector
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub sector: u64,
    pub total_sectors: u64,
    pub parts: Vec<Planned>,
}

impl Layout {
    /// Index (into `parts`, and the written partition paths) of the first partition of `kind`.
    pub fn index_of(&self, kind: PartKind) -> usize {
        self.parts
            .iter()
            .position(|p| p.kind == kind)
            .expect("layouts hold the partitions they are asked for")
    }
}

/// Sectors of a GPT partition entry array of 128 entries of 128 bytes.
fn entry_sectors(sector: u64) -> u64 {
    (128 * 128u64).div_ceil(sector)
}

/// The usable LBA range of a disk: after the primary header and entries, before the backup.
pub fn usable(total_sectors: u64, sector: u64) -> (u64, u64) {
    let e = entry_sectors(sector);
    (2 + e, total_sectors.saturating_sub(2 + e))
}

/// Lays the partitions out in order, each starting on a 1 MiB boundary. Does not touch the
/// disk.
pub fn plan(total_bytes: u64, sector: u64, specs: &[PartSpec]) -> Result<Layout> {
    anyhow::ensure!(
        matches!(sector, 512 | 4096),
        "sector size {sector} is not supported (512 or 4096)"
    );
    let total_sectors = total_bytes / sector;
    let align = MIB / sector;
    let (first_usable, last_usable) = usable(total_sectors, sector);
    let mut next = first_usable.div_ceil(align) * align;
    let mut parts = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let last = match s.size {
            Some(bytes) => next + bytes.div_ceil(sector) - 1,
            None => {
                anyhow::ensure!(
                    i + 1 == specs.len(),
                    "only the last partition may take the rest"
                );
                // End on an alignment boundary, so the disk's tail is not half a MiB.
                ((last_usable + 1) / align * align).saturating_sub(1)
            }
        };
        if last > last_usable || last < next {
            bail!(
                "the disk is too small: partition {} ({}) does not fit in {} MiB",
                i + 1,
                s.label,
                total_bytes / MIB
            );
        }
        parts.push(Planned {
            number: i as u32 + 1,
            label: s.label.to_string(),
            kind: s.kind,
            first_lba: next,
            last_lba: last,
        });
        next = (last + 1).div_ceil(align) * align;
    }
    let l = Layout {
        sector,
        total_sectors,
        parts,
    };
    validate(&l)?;
    Ok(l)
}

/// Checks a layout before it is written: the `gptman` crate would accept overlaps.
pub fn validate(l: &Layout) -> Result<()> {
    let (first, last) = usable(l.total_sectors, l.sector);
    let align = MIB / l.sector;
    let mut prev_end = 0u64;
    for p in &l.parts {
        let name = format!("partition {} ({})", p.number, p.label);
        anyhow::ensure!(p.first_lba <= p.last_lba, "{name} ends before it starts");
        anyhow::ensure!(
            p.first_lba >= first && p.last_lba <= last,
            "{name} is outside the usable area {first}-{last}"
        );
        anyhow::ensure!(p.first_lba % align == 0, "{name} is not aligned to 1 MiB");
        anyhow::ensure!(
            p.first_lba > prev_end || prev_end == 0,
            "{name} overlaps the partition before it"
        );
        anyhow::ensure!(
            p.label.len() <= 36,
            "{name}: label longer than 36 characters"
        );
        prev_end = p.last_lba;
    }
    Ok(())
}

/// Disk 2: the rescue ESP, the rescue root, and the stash for the packed target (the rest).
pub fn rescue_layout(
    size_bytes: u64,
    sector: u64,
    rescue_root: u64,
    stash_min: u64,
) -> Result<Layout> {
    let l = plan(
        size_bytes,
        sector,
        &[
            PartSpec {
                label: "reinstall-esp",
                kind: PartKind::Esp,
                size: Some(256 * MIB),
            },
            PartSpec {
                label: "reinstall-rescue",
                kind: PartKind::LinuxRoot,
                size: Some(rescue_root),
            },
            PartSpec {
                label: "reinstall-stash",
                kind: PartKind::LinuxData,
                size: None,
            },
        ],
    )?;
    let stash = l.parts[2].bytes(sector);
    anyhow::ensure!(
        stash >= stash_min,
        "disk 2 is too small: the stash would hold {} MiB, the target needs {} MiB",
        stash / MIB,
        stash_min.div_ceil(MIB)
    );
    Ok(l)
}

/// Whether this machine boots through legacy BIOS (no EFI runtime in the kernel).
pub fn legacy_bios() -> bool {
    !Path::new("/sys/firmware/efi").exists()
}

/// Disk 1 for a Linux target: [BIOS boot on legacy machines,] ESP, root (the rest).
pub fn linux_target_layout(size_bytes: u64, sector: u64, bios: bool) -> Result<Layout> {
    let mut specs = Vec::new();
    if bios {
        specs.push(PartSpec {
            label: "bios-boot",
            kind: PartKind::BiosBoot,
            size: Some(MIB),
        });
    }
    specs.push(PartSpec {
        label: "esp",
        kind: PartKind::Esp,
        size: Some(512 * MIB),
    });
    specs.push(PartSpec {
        label: "root",
        kind: PartKind::LinuxRoot,
        size: None,
    });
    plan(size_bytes, sector, &specs)
}

/// Disk 1 for a Windows target (UEFI only): ESP, MSR (16 MiB, as Windows Setup makes it),
/// the Windows volume (the rest).
pub fn windows_target_layout(size_bytes: u64, sector: u64) -> Result<Layout> {
    plan(
        size_bytes,
        sector,
        &[
            PartSpec {
                label: "EFI system partition",
                kind: PartKind::Esp,
                size: Some(bundle::windows::ESP_BYTES),
            },
            PartSpec {
                label: "Microsoft reserved partition",
                kind: PartKind::MsReserved,
                size: Some(16 * MIB),
            },
            PartSpec {
                label: "Basic data partition",
                kind: PartKind::MsBasicData,
                size: None,
            },
        ],
    )
}

/// A disk opened for writing: exclusive (`O_EXCL`: the kernel refuses while anything uses
/// it) and locked (`flock(LOCK_EX)`), re-identified and compared with the pinned identity.
pub struct Locked {
    file: nix::fcntl::Flock<File>,
    pub id: DiskId,
}

/// Finds a pinned disk again, as it is now: by its by-id links first (paths can change
/// between boots), and refuses another disk found there.
pub fn find_pinned(pinned: &DiskId) -> Result<DiskId> {
    let path = pinned
        .by_id
        .iter()
        .find(|p| Path::new(p).exists())
        .cloned()
        .unwrap_or_else(|| pinned.path.clone());
    let now = identify(Path::new(&path))?;
    if !now.same_disk(pinned) {
        bail!(
            "{path} is not the disk pinned in the plan (serial {:?}, {} bytes; now serial {:?}, {} bytes); refusing to write",
            pinned.serial,
            pinned.size_bytes,
            now.serial,
            now.size_bytes
        );
    }
    Ok(now)
}

impl Locked {
    pub fn open(pinned: &DiskId) -> Result<Locked> {
        Self::open_for(pinned, Path::new("/"))
    }

    /// Opens the pinned disk for writing by an agent whose root tree is `root`.
    pub fn open_for(pinned: &DiskId, root: &Path) -> Result<Locked> {
        let now = find_pinned(pinned)?;
        check_destructible_for(&now, root)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc_o_excl())
            .open(&now.path)
            .with_context(|| format!("opening {} exclusively (is it in use?)", now.path))?;
        let file = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| {
                anyhow::anyhow!("locking {}: {e} (another program holds it)", now.path)
            })?;
        Ok(Locked { file, id: now })
    }

    /// Writes `layout` as a new GPT with a protective MBR, after clearing the first and last
    /// MiB (old tables, RAID superblocks at the end), then makes the kernel see the new
    /// partitions and waits for their device nodes. Returns their paths.
    pub fn write_gpt(&mut self, layout: &Layout) -> Result<Vec<PathBuf>> {
        self.write_gpt_with(layout, None)
    }

    /// As [`write_gpt`](Self::write_gpt), and for a legacy-BIOS layout GRUB built beforehand
    /// (`bios`): core.img goes into the BIOS boot partition where its old contents are cleared,
    /// and boot.img into sector 0 with the protective MBR, so that the disk's old boot code is
    /// replaced in the same flush that replaces its table (before: a seconds-long window with
    /// a protective MBR and no boot code while GRUB was being built).
    pub fn write_gpt_with(
        &mut self,
        layout: &Layout,
        bios: Option<&bootcfg::bios::Prepared>,
    ) -> Result<Vec<PathBuf>> {
        validate(layout)?;
        let dev = self.id.path.clone();
        anyhow::ensure!(
            layout.sector == self.id.logical_sector
                && layout.total_sectors * layout.sector <= self.id.size_bytes,
            "the layout was planned for another disk geometry than {dev}"
        );
        let zero = vec![0u8; MIB as usize];
        let f: &mut File = &mut self.file;
        // Where each new partition starts, the old contents go first: an old filesystem whose
        // start happens to fall there (the old ESP at 1 MiB, typically) would otherwise look
        // like the new one to the firmware between the GPT write and the mkfs, and boot a
        // loader whose root is gone. With nothing there, the firmware moves on to the next
        // boot entry.
        let mut start = zero.clone();
        if let Some(b) = bios {
            let part = layout
                .parts
                .iter()
                .find(|p| p.kind == PartKind::BiosBoot && p.first_lba * layout.sector == b.lba * 512)
                .with_context(|| format!("{dev}: GRUB for BIOS was built for a BIOS boot partition at LBA {} that the layout does not have", b.lba))?;
            anyhow::ensure!(
                layout.sector == 512 && (b.core.len() as u64) <= part.bytes(512),
                "{dev}: core.img does not fit its BIOS boot partition"
            );
            start[..512].copy_from_slice(&b.mbr(&protective_mbr(layout.total_sectors))?);
        }
        for p in &layout.parts {
            let len = (p.bytes(layout.sector)).min(MIB) as usize;
            let mut data = zero[..len].to_vec();
            if let Some(b) = bios.filter(|_| p.kind == PartKind::BiosBoot) {
                data[..b.core.len().min(len)].copy_from_slice(&b.core[..b.core.len().min(len)]);
                if b.core.len() > len {
                    data.extend_from_slice(&b.core[len..]);
                }
            }
            f.seek(SeekFrom::Start(p.first_lba * layout.sector))?;
            f.write_all(&data).with_context(|| {
                format!("clearing where partition {} of {dev} starts", p.number)
            })?;
        }
        f.sync_all().with_context(|| format!("flushing {dev}"))?;
        f.seek(SeekFrom::Start(0))?;
        f.write_all(&start)
            .with_context(|| format!("clearing the start of {dev}"))?;
        f.seek(SeekFrom::Start(self.id.size_bytes - MIB))?;
        f.write_all(&zero)
            .with_context(|| format!("clearing the end of {dev}"))?;
        let mut gpt = gptman::GPT::new_from(f, layout.sector, random_guid()?)
            .with_context(|| format!("creating a GPT for {dev}"))?;
        for p in &layout.parts {
            gpt[p.number] = gptman::GPTPartitionEntry {
                partition_type_guid: bootcfg::efi::Guid::parse(p.kind.type_guid())
                    .expect("constant")
                    .0,
                unique_partition_guid: random_guid()?,
                starting_lba: p.first_lba,
                ending_lba: p.last_lba,
                attribute_bits: 0,
                partition_name: p.label.as_str().into(),
            };
        }
        gpt.write_into(f)
            .with_context(|| format!("writing the GPT of {dev}"))?;
        gptman::GPT::write_protective_mbr_into(f, layout.sector)
            .with_context(|| format!("writing the protective MBR of {dev}"))?;
        f.sync_all().with_context(|| format!("flushing {dev}"))?;
        self.id.ptuuid = Some(bootcfg::efi::Guid(gpt.header.disk_guid).to_string());
        reread_partitions(f, &dev)?;
        let paths: Vec<PathBuf> = layout
            .parts
            .iter()
            .map(|p| self.id.partition_path(p.number))
            .collect();
        wait_for(&paths)?;
        Ok(paths)
    }
}

/// Sector 0 as gptman's `write_protective_mbr_into` writes it (one 0xEE partition from LBA 1
/// over the disk, at most 2^32-1 sectors; the signature), with no boot code. Pure.
pub fn protective_mbr(total_sectors: u64) -> [u8; 512] {
    let mut m = [0u8; 512];
    m[446..458].copy_from_slice(&[0x00, 0x00, 0x02, 0x00, 0xee, 0xff, 0xff, 0xff, 1, 0, 0, 0]);
    let size = (total_sectors - 1).min(u64::from(u32::MAX)) as u32;
    m[458..462].copy_from_slice(&size.to_le_bytes());
    m[510] = 0x55;
    m[511] = 0xaa;
    m
}

fn libc_o_excl() -> i32 {
    nix::fcntl::OFlag::O_EXCL.bits()
}

/// A random version-4 GUID, in GPT's (mixed-endian) byte order: its text form
/// (`bootcfg::efi::Guid`) is an ordinary RFC 4122 UUID.
pub fn random_guid() -> Result<[u8; 16]> {
    let mut b = [0u8; 16];
    std::io::Read::read_exact(&mut File::open("/dev/urandom")?, &mut b)?;
    // RFC 4122 version 4, variant 1 (in GPT's mixed-endian layout the version nibble sits in
    // byte 7).
    b[7] = (b[7] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    Ok(b)
}

nix::ioctl_none!(blkrrpart, 0x12, 95);

/// BLKRRPART; where the kernel does not scan partitions itself (loop devices without
/// partscan), `partx` adds them with BLKPG (MACHINE-NOTES: partition nodes).
fn reread_partitions(f: &File, dev: &str) -> Result<()> {
    // SAFETY: BLKRRPART takes no argument; the descriptor is an open block device.
    let rr = unsafe { blkrrpart(f.as_raw_fd()) };
    if rr.is_err() {
        partx_update(Path::new(dev))?;
    }
    Ok(())
}

/// Makes the kernel's partitions of `disk` those of its table with `partx`: `-u` updates
/// (and was seen to drop a partition whose size changed, leaving its node missing), then
/// `-a` adds what is missing (it fails for those present, which is not an error here).
fn partx_update(disk: &Path) -> Result<()> {
    for op in ["-u", "-a"] {
        std::process::Command::new("partx")
            .arg(op)
            .arg(disk)
            .output()
            .context("running partx")?;
    }
    Ok(())
}

/// After the disk's descriptor is closed: udev sees the close of a written whole disk and
/// re-reads its partition table (systemd-udevd's "watch"), which removes and re-adds every
/// partition node for a moment. Waits for udev to go quiet (twice: the close reaches it
/// through inotify, after a delay) and for the nodes to be there. Nodes that stay missing
/// (seen on loop devices without udev: gone a moment after the writer closed the disk) are
/// added again from the table on `disk` with `partx`, once.
pub fn settle(disk: &Path, paths: &[PathBuf]) -> Result<()> {
    for _ in 0..2 {
        let _ = std::process::Command::new("udevadm")
            .args(["settle", "--timeout=30"])
            .status();
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    if wait_for(paths).is_ok() {
        return Ok(());
    }
    partx_update(disk)?;
    wait_for(paths)
        .with_context(|| format!("after re-reading the partition table of {}", disk.display()))
}

fn wait_for(paths: &[PathBuf]) -> Result<()> {
    for _ in 0..100 {
        if paths.iter().all(|p| p.exists()) {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let missing: Vec<String> = paths
        .iter()
        .filter(|p| !p.exists())
        .map(|p| p.display().to_string())
        .collect();
    bail!("partition nodes did not appear: {}", missing.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_aligned_in_order_and_inside_the_usable_area_on_512_and_4k() {
        for sector in [512, 4096] {
            let l = rescue_layout(8 << 30, sector, 2 << 30, 1 << 30).unwrap();
            let align = MIB / sector;
            assert_eq!(l.parts.len(), 3);
            assert_eq!(
                l.parts[0].first_lba, align,
                "{sector}: the first partition starts at 1 MiB"
            );
            assert_eq!(l.parts[0].bytes(sector), 256 * MIB);
            assert!(l.parts.windows(2).all(|w| w[0].last_lba < w[1].first_lba));
            let (_, last) = usable(l.total_sectors, sector);
            assert!(l.parts[2].last_lba <= last);
            assert_eq!((l.parts[2].last_lba + 1) % align, 0);
        }
    }

    #[test]
    fn too_small_disks_and_bad_layouts_are_refused_with_the_reason() {
        let e = rescue_layout(1 << 30, 512, 2 << 30, 0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("too small") && e.contains("reinstall-rescue"),
            "{e}"
        );
        let e = rescue_layout(4 << 30, 512, 2 << 30, 3 << 30)
            .unwrap_err()
            .to_string();
        assert!(e.contains("stash"), "{e}");
        let mut l = linux_target_layout(4 << 30, 512, true).unwrap();
        assert_eq!(l.parts[0].kind, PartKind::BiosBoot);
        l.parts[1].first_lba = l.parts[0].last_lba; // overlap
        assert!(validate(&l).is_err());
        let mut l = linux_target_layout(4 << 30, 4096, false).unwrap();
        l.parts[0].first_lba += 1; // misaligned
        assert!(validate(&l).unwrap_err().to_string().contains("aligned"));
        assert!(plan(1 << 30, 1024, &[]).is_err());
    }

    #[test]
    fn the_running_root_disk_is_never_destructible() {
        for name in root_disks() {
            let id = identify(Path::new(&format!("/dev/{name}"))).unwrap();
            let e = check_destructible(&id).unwrap_err().to_string();
            assert!(e.contains("running root"), "{e}");
        }
    }
}
