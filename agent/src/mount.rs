//! Filesystems the agent makes and mounts: ext4 through `mkfs.ext4`, the ESP (FAT32) in
//! userspace with `fatfs`, and mounts as guards that unmount when dropped.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Makes an ext4 filesystem with a UUID of ours, and returns it (boot configurations name
/// the root by it).
pub fn mkfs_ext4(dev: &Path, label: &str) -> Result<String> {
    let uuid = bootcfg::efi::Guid(crate::disk::random_guid()?).to_string();
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-F", "-q", "-L", label, "-U", &uuid])
        .arg(dev)
        .output()
        .context("running mkfs.ext4 (package e2fsprogs)")?;
    anyhow::ensure!(
        out.status.success(),
        "mkfs.ext4 {} failed: {}",
        dev.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(uuid)
}

/// Formats `dev` as FAT32 without mounting it (the running kernel may lack a FAT driver),
/// with FAT sectors the size of the device's logical sectors (firmware expects 4096-byte
/// FAT sectors on 4Kn disks).
pub fn mkfs_esp(dev: &Path, label: &str, sector: u64) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .with_context(|| format!("opening {}", dev.display()))?;
    let mut l = [b' '; 11];
    for (i, b) in label.bytes().take(11).enumerate() {
        l[i] = b.to_ascii_uppercase();
    }
    fatfs::format_volume(
        &mut f,
        fatfs::FormatVolumeOptions::new()
            .fat_type(fatfs::FatType::Fat32)
            .bytes_per_sector(sector as u16)
            // Its own id (fatfs would give every ESP the same): GRUB finds ESPs by it.
            .volume_id(u32::from_le_bytes(
                crate::disk::random_guid()?[..4].try_into()?,
            ))
            .volume_label(l),
    )
    .with_context(|| format!("formatting {} as FAT32", dev.display()))?;
    f.sync_all()?;
    Ok(())
}

/// A mounted filesystem; unmounted (and its directory removed) on drop.
pub struct Mounted {
    pub path: PathBuf,
}

impl Mounted {
    pub fn ext4(dev: &Path, at: &Path, read_only: bool) -> Result<Mounted> {
        std::fs::create_dir_all(at)?;
        let mut flags = nix::mount::MsFlags::empty();
        if read_only {
            flags |= nix::mount::MsFlags::MS_RDONLY;
        }
        nix::mount::mount(Some(dev), at, Some("ext4"), flags, None::<&str>)
            .with_context(|| format!("mounting {} on {}", dev.display(), at.display()))?;
        Ok(Mounted {
            path: at.to_path_buf(),
        })
    }
}

impl Mounted {
    /// An NTFS volume through ntfs-3g (FUSE): files it creates get Windows's inherited
    /// permissions. Unmounting waits for ntfs-3g to write everything back.
    pub fn ntfs3g(dev: &Path, at: &Path) -> Result<Mounted> {
        std::fs::create_dir_all(at)?;
        let out = std::process::Command::new("ntfs-3g")
            .arg(dev)
            .arg(at)
            .output()
            .context("running ntfs-3g (package ntfs-3g)")?;
        anyhow::ensure!(
            out.status.success(),
            "mounting {} on {} with ntfs-3g failed: {}",
            dev.display(),
            at.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(Mounted {
            path: at.to_path_buf(),
        })
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Ok(d) = std::fs::File::open(&self.path) {
            let _ = nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&d));
        }
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::empty());
        let _ = std::fs::remove_dir(&self.path);
    }
}
