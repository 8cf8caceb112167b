//! GRUB for legacy BIOS (i386-pc) on a GPT disk: `boot.img` in the MBR's code area and
//! `core.img` in the BIOS boot partition, patched the way `grub-bios-setup` does it (GRUB
//! 2.06, `util/setup.c`), which Debian does not ship on its own (it is inside `grub-install`,
//! and that wants a mounted boot directory; this ESP is never mounted, DESIGN.md §7).
//!
//! `core.img` is built with the host's `grub-mkimage` and i386-pc modules (package
//! `grub-pc-bin`) with a prefix naming the ESP by partition, so BIOS and UEFI machines read
//! the same `grub.cfg` and `grubenv` from the same place.
//!
//! The patches (offsets from GRUB's `include/grub/i386/pc/boot.h`):
//! - boot.img `kernel_sector` (0x5c, 8 bytes LE): the LBA of core.img's first sector;
//! - boot.img drive check (0x66, 2 bytes): replaced by two NOPs on hard disks, as
//!   grub-bios-setup does for BIOSes that pass a wrong boot drive;
//! - the MBR's BPB area (0x03..0x5a) and disk signature + partition table (0x1b8..0x1fe)
//!   are kept from the disk (the protective MBR), the rest is boot.img;
//! - core.img's first block list (the last 12 bytes of its first sector: start LBA u64,
//!   length u16, segment u16): start = core LBA + 1; grub-mkimage has filled length and
//!   segment, which are checked.

use anyhow::{bail, ensure, Context, Result};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

const KERNEL_SECTOR: usize = 0x5c;
const DRIVE_CHECK: usize = 0x66;
const BPB: std::ops::Range<usize> = 0x03..0x5a;
const TABLE: std::ops::Range<usize> = 0x1b8..0x1fe;
/// GRUB_BOOT_I386_PC_KERNEL_SEG + 512 / 16.
const CORE_SEGMENT: u16 = 0x800 + 0x20;

/// Modules core.img carries: it cannot load any (the ESP holds none for i386-pc): the BIOS
/// disk driver, the common ones, and the serial console (BIOS GRUB writes to VGA only).
pub fn modules() -> Vec<&'static str> {
    [
        &["biosdisk"],
        crate::loader::COMMON_MODULES,
        &["serial", "terminal"],
    ]
    .concat()
}

/// Builds core.img with `prefix` (for example `(hd0,gpt2)/EFI/BOOT`) and no early config,
/// with the host's GRUB.
pub fn core_image(prefix: &str) -> Result<Vec<u8>> {
    crate::loader::grub_mkimage("i386-pc", prefix, None, &modules())
}

/// GRUB's boot.img, from the tree's GRUB when it has one (as core.img), else the host's.
pub fn boot_image(tree: Option<&Path>) -> Result<Vec<u8>> {
    let p = tree
        .map(|t| t.join("usr/lib/grub/i386-pc/boot.img"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| Path::new("/usr/lib/grub/i386-pc/boot.img").to_path_buf());
    let b = std::fs::read(&p)
        .with_context(|| format!("reading {} (package grub-pc-bin)", p.display()))?;
    ensure!(
        b.len() == 512,
        "{}: {} bytes, not 512",
        p.display(),
        b.len()
    );
    Ok(b)
}

/// A FAT volume id as GRUB's `search --fs-uuid` names it: `1234-abcd`.
pub fn fat_uuid(volume_id: u32) -> String {
    format!("{:04x}-{:04x}", volume_id >> 16, volume_id & 0xffff)
}

/// The volume id of the FAT32 filesystem on `dev` (boot sector offset 0x43), as [`fat_uuid`].
pub fn read_fat32_uuid(dev: &Path) -> Result<String> {
    let mut f = std::fs::File::open(dev).with_context(|| format!("opening {}", dev.display()))?;
    let bs = fat32_boot_sector(&mut f, dev)?;
    Ok(fat_uuid(u32::from_le_bytes(
        bs[0x43..0x47].try_into().expect("4 bytes"),
    )))
}

/// The boot sector of the FAT32 filesystem open as `f` (on `dev`), checked to be one.
fn fat32_boot_sector(f: &mut std::fs::File, dev: &Path) -> Result<[u8; 512]> {
    let mut bs = [0u8; 512];
    f.read_exact(&mut bs)
        .with_context(|| format!("reading the boot sector of {}", dev.display()))?;
    ensure!(
        &bs[0x52..0x57] == b"FAT32" && bs[510..] == [0x55, 0xaa],
        "{} holds no FAT32 filesystem",
        dev.display()
    );
    Ok(bs)
}

/// core.img's early config: `$prefix` is `dir` on the first filesystem of `uuids` (FAT
/// uuids, in order of preference) that is present. Disk 1 lists its own ESP, then the rescue
/// ESP on disk 2: until disk 1's ESP carries its final uuid, it boots the rescue. (core.img
/// runs this with GRUB's minimal parser, without `if`: each `search` that finds its
/// filesystem overrides `root`, so the most preferred comes last.)
pub fn early_config(uuids: &[&str], dir: &str) -> String {
    let mut s = String::new();
    for uuid in uuids.iter().rev() {
        s.push_str(&format!("search.fs_uuid {uuid} root\n"));
    }
    s.push_str(&format!("set prefix=($root)/{dir}\n"));
    s
}

/// Sets the volume id of the FAT32 filesystem on `dev` (boot sector and its backup): one
/// sector write makes a finished ESP visible under the uuid core.img looks for.
pub fn set_fat32_volume_id(dev: &Path, volume_id: u32) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .with_context(|| format!("opening {}", dev.display()))?;
    let bs = fat32_boot_sector(&mut f, dev)?;
    let backup = u64::from(u16::from_le_bytes([bs[0x32], bs[0x33]]));
    let sector = u64::from(u16::from_le_bytes([bs[0x0b], bs[0x0c]]));
    for at in [0, backup * sector] {
        if at == 0 || backup != 0 {
            f.seek(SeekFrom::Start(at + 0x43))?;
            f.write_all(&volume_id.to_le_bytes())?;
        }
    }
    f.sync_all()
        .with_context(|| format!("flushing {}", dev.display()))
}

/// The new MBR: boot.img's code with `core_lba` patched in, the disk's own BPB area,
/// signature and partition table kept. Pure.
pub fn patch_mbr(boot: &[u8], disk_mbr: &[u8], core_lba: u64) -> Result<[u8; 512]> {
    ensure!(
        boot.len() == 512 && disk_mbr.len() == 512,
        "an MBR is 512 bytes"
    );
    ensure!(
        disk_mbr[510..] == [0x55, 0xaa],
        "the disk has no MBR signature (no protective MBR?)"
    );
    let mut m = [0u8; 512];
    m.copy_from_slice(boot);
    m[BPB].copy_from_slice(&disk_mbr[BPB]);
    m[TABLE].copy_from_slice(&disk_mbr[TABLE]);
    m[510..].copy_from_slice(&[0x55, 0xaa]);
    m[KERNEL_SECTOR..KERNEL_SECTOR + 8].copy_from_slice(&core_lba.to_le_bytes());
    m[DRIVE_CHECK..DRIVE_CHECK + 2].copy_from_slice(&[0x90, 0x90]);
    Ok(m)
}

/// core.img with its first block list pointing at the sectors after `core_lba`. Pure.
pub fn patch_core(core: &[u8], core_lba: u64) -> Result<Vec<u8>> {
    ensure!(core.len() > 512, "core.img is too short");
    let mut c = core.to_vec();
    let sectors = c.len().div_ceil(512) as u64;
    let bl = 512 - 12;
    let len = u16::from_le_bytes([c[bl + 8], c[bl + 9]]);
    let seg = u16::from_le_bytes([c[bl + 10], c[bl + 11]]);
    if u64::from(len) != sectors - 1 || seg != CORE_SEGMENT {
        bail!(
            "core.img's block list says {len} sectors at segment {seg:#x}; expected {} at {CORE_SEGMENT:#x} (another GRUB version?)",
            sectors - 1
        );
    }
    c[bl..bl + 8].copy_from_slice(&(core_lba + 1).to_le_bytes());
    c.resize(sectors as usize * 512, 0);
    Ok(c)
}

/// GRUB for BIOS built and patched for its place on a disk, not yet written: built before
/// anything is written, so that a disk's old boot code is replaced by the new one in one
/// short burst of writes (no `grub-mkimage` run in between), and a build that fails leaves the
/// disk as it was.
pub struct Prepared {
    /// boot.img as GRUB ships it (patched into sector 0 by [`Prepared::mbr`]).
    pub boot: Vec<u8>,
    /// core.img, its block list pointing after `lba`, padded to whole sectors.
    pub core: Vec<u8>,
    /// The BIOS boot partition's first LBA (512-byte sectors).
    pub lba: u64,
    pub from: crate::loader::GrubFrom,
}

/// Builds GRUB for BIOS (core.img by the GRUB of `tree` when it has one, with `early` as its
/// embedded config) for a BIOS boot partition at `part_lba`, `part_sectors` long, on `dev`
/// (named in errors).
pub fn prepare(
    dev: &Path,
    tree: Option<&Path>,
    part_lba: u64,
    part_sectors: u64,
    early: &str,
) -> Result<Prepared> {
    let (core, from) =
        crate::loader::grub_mkimage_from(tree, "i386-pc", "/boot/grub", Some(early), &modules())?;
    let core = patch_core(&core, part_lba)?;
    ensure!(
        core.len() as u64 <= part_sectors * 512,
        "core.img ({} bytes) does not fit the BIOS boot partition of {} ({} bytes)",
        core.len(),
        dev.display(),
        part_sectors * 512
    );
    Ok(Prepared {
        boot: boot_image(tree)?,
        core,
        lba: part_lba,
        from,
    })
}

impl Prepared {
    /// Sector 0 for a disk whose sector 0 is (or will be) `disk_mbr`: boot.img pointing at
    /// core.img, the disk's BPB area, signature and partition table kept.
    pub fn mbr(&self, disk_mbr: &[u8]) -> Result<[u8; 512]> {
        patch_mbr(&self.boot, disk_mbr, self.lba)
    }

    /// Writes core.img, then the MBR, into `dev` whose partition table is already written,
    /// each flushed. The MBR is written last: until then the disk's old boot code stays.
    pub fn write(&self, dev: &Path) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev)
            .with_context(|| format!("opening {}", dev.display()))?;
        f.seek(SeekFrom::Start(self.lba * 512))?;
        f.write_all(&self.core)
            .with_context(|| format!("writing core.img to {}", dev.display()))?;
        f.sync_all()?;
        let mut mbr = [0u8; 512];
        f.seek(SeekFrom::Start(0))?;
        f.read_exact(&mut mbr)
            .with_context(|| format!("reading the MBR of {}", dev.display()))?;
        let new = self
            .mbr(&mbr)
            .with_context(|| format!("{}", dev.display()))?;
        f.seek(SeekFrom::Start(0))?;
        f.write_all(&new)
            .with_context(|| format!("writing the MBR of {}", dev.display()))?;
        f.sync_all()
            .with_context(|| format!("flushing {}", dev.display()))?;
        Ok(())
    }
}

/// Installs GRUB for BIOS on the disk `dev` (512-byte sectors) whose table is written:
/// [`prepare`], then [`Prepared::write`].
pub fn install(
    dev: &Path,
    tree: Option<&Path>,
    part_lba: u64,
    part_sectors: u64,
    early: &str,
) -> Result<crate::loader::GrubFrom> {
    let p = prepare(dev, tree, part_lba, part_sectors, early)?;
    p.write(dev)?;
    Ok(p.from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mbr_keeps_the_partition_table_and_points_at_core() {
        let boot = boot_image(None).unwrap();
        let mut disk = [0u8; 512];
        disk[0x1b8..0x1bc].copy_from_slice(&[1, 2, 3, 4]);
        disk[0x1be..0x1ce].copy_from_slice(&[
            0, 0, 2, 0, 0xee, 0xff, 0xff, 0xff, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff,
        ]);
        disk[510] = 0x55;
        disk[511] = 0xaa;
        let m = patch_mbr(&boot, &disk, 2048).unwrap();
        assert_eq!(m[0x1b8..0x1fe], disk[0x1b8..0x1fe]);
        assert_eq!(u64::from_le_bytes(m[0x5c..0x64].try_into().unwrap()), 2048);
        assert_eq!(m[0x66..0x68], [0x90, 0x90]);
        assert_eq!(m[0x68..0x1b8], boot[0x68..0x1b8]);
        assert_eq!(m[510..], [0x55, 0xaa]);
        disk[511] = 0;
        assert!(patch_mbr(&boot, &disk, 2048).is_err());
    }

    #[test]
    fn core_img_block_list_points_after_its_first_sector() {
        let core = core_image("(hd0,gpt2)/EFI/BOOT").unwrap();
        let c = patch_core(&core, 34).unwrap();
        assert_eq!(c.len() % 512, 0);
        assert_eq!(u64::from_le_bytes(c[500..508].try_into().unwrap()), 35);
        assert_eq!(c[512..core.len()], core[512..]);
        let mut bad = core.clone();
        bad[508] ^= 1;
        assert!(patch_core(&bad, 34).is_err());
    }

    #[test]
    fn the_early_config_prefers_the_first_uuid_and_the_volume_id_flips_in_place() {
        assert_eq!(
            early_config(&["aaaa-0001", "bbbb-0002"], "EFI/BOOT"),
            "search.fs_uuid bbbb-0002 root\nsearch.fs_uuid aaaa-0001 root\nset prefix=($root)/EFI/BOOT\n"
        );
        let img = std::env::temp_dir().join(format!("volid-{}.img", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&img)
            .unwrap();
        f.set_len(40 << 20).unwrap();
        fatfs::format_volume(
            &mut f,
            fatfs::FormatVolumeOptions::new()
                .fat_type(fatfs::FatType::Fat32)
                .volume_id(0x1234_abcd),
        )
        .unwrap();
        drop(f);
        assert_eq!(read_fat32_uuid(&img).unwrap(), "1234-abcd");
        crate::loader::write_esp(&img, &[("EFI/BOOT/grub.cfg", b"x")]).unwrap();
        set_fat32_volume_id(&img, 0x0bad_f00d).unwrap();
        assert_eq!(read_fat32_uuid(&img).unwrap(), "0bad-f00d");
        // The backup boot sector too, and the files are untouched.
        let b = std::fs::read(&img).unwrap();
        assert_eq!(
            b[6 * 512 + 0x43..6 * 512 + 0x47],
            0x0bad_f00du32.to_le_bytes()
        );
        assert_eq!(
            crate::loader::read_esp(&img, "EFI/BOOT/grub.cfg").unwrap(),
            b"x"
        );
        std::fs::remove_file(&img).unwrap();
        assert!(read_fat32_uuid(Path::new("/dev/null")).is_err());
    }
}
