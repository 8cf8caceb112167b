//! Boot loaders on an ESP: a GRUB EFI image and its `grub.cfg`, written into the FAT
//! filesystem in userspace (`fatfs`: no mount, no dependence on the running kernel's FAT
//! driver).
//!
//! The image is built with the host's `grub-mkimage` and x86_64-efi modules (Debian package
//! `grub-efi-amd64-bin`), with only the modules a rescue or Linux boot needs, which also
//! keeps GRUB's start fast (MACHINE-NOTES: a lean image loads the kernel in seconds where a
//! full `grub-install` takes tens under emulation). The tree's own GRUB is preferred when it
//! has one ([`grub_mkimage_from`]). GRUB i386-pc for legacy BIOS is in [`crate::bios`]. Not
//! built: Secure Boot (shim).

use anyhow::{Context, Result};
use std::io::{Read, Write};
use std::path::Path;

/// Modules every GRUB image of ours carries, on either firmware: GPT, FAT (the ESP), ext4
/// (the root), finding it by UUID, reading the one-shot environment, loading Linux, and
/// `exit` back to the firmware (minicmd).
pub const COMMON_MODULES: &[&str] = &[
    "part_gpt",
    "fat",
    "ext2",
    "normal",
    "linux",
    "search",
    "search_fs_uuid",
    "configfile",
    "echo",
    "test",
    "loadenv",
    "gzio",
    "reboot",
    "halt",
    "minicmd",
];

/// The x86_64-efi image's modules: the common ones and the EFI video drivers.
pub fn efi_modules() -> Vec<&'static str> {
    [COMMON_MODULES, &["all_video"]].concat()
}

/// A GRUB EFI application that reads `prefix/grub.cfg` from its own ESP, built by the
/// host's GRUB.
pub fn grub_efi_image(prefix: &str) -> Result<Vec<u8>> {
    Ok(grub_efi_image_from(None, prefix)?.0)
}

/// The same, preferring the GRUB of the OS tree it is for (see [`grub_mkimage_from`]).
pub fn grub_efi_image_from(tree: Option<&Path>, prefix: &str) -> Result<(Vec<u8>, GrubFrom)> {
    let (image, from) = grub_mkimage_from(tree, "x86_64-efi", prefix, None, &efi_modules())?;
    anyhow::ensure!(
        image.starts_with(b"MZ"),
        "grub-mkimage ({from}) did not produce a PE image"
    );
    Ok((image, from))
}

/// Whose GRUB built an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrubFrom {
    /// The OS tree's own (`grub-mkimage --version` in it).
    Tree(String),
    /// The running system's (the tree had none, or it failed: the reason).
    Host(String),
}

impl std::fmt::Display for GrubFrom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GrubFrom::Tree(v) => write!(f, "the tree's own GRUB ({v})"),
            GrubFrom::Host(why) => write!(f, "the host's GRUB ({why})"),
        }
    }
}

/// Builds a GRUB image with the GRUB of the OS tree it is for, when the tree has one for
/// `format` (its `grub-mkimage` and every module), by running that `grub-mkimage` chrooted
/// into the tree: the loader then matches what the OS's own updates install. Falls back to
/// the host's GRUB, saying why. (grub-mkimage reads only files of the tree, so nothing is
/// bound into the chroot: a kill at any moment leaves no mounts behind.)
pub fn grub_mkimage_from(
    tree: Option<&Path>,
    format: &str,
    prefix: &str,
    config: Option<&str>,
    modules: &[&str],
) -> Result<(Vec<u8>, GrubFrom)> {
    let why = match tree {
        None => "no tree given".to_string(),
        Some(t) => match tree_grub(t, format, modules) {
            Err(why) => why,
            Ok(()) => match in_tree(t, format, prefix, config, modules) {
                Ok(r) => return Ok(r),
                Err(e) => format!("{}: its grub-mkimage failed: {e:#}", t.display()),
            },
        },
    };
    Ok((
        grub_mkimage(format, prefix, config, modules)?,
        GrubFrom::Host(why),
    ))
}

/// Runs the host's `grub-mkimage` for `format` with `prefix`, an embedded early `config`
/// and `modules`; returns the image.
pub fn grub_mkimage(
    format: &str,
    prefix: &str,
    config: Option<&str>,
    modules: &[&str],
) -> Result<Vec<u8>> {
    let out = std::env::temp_dir().join(unique_name());
    let cfg = out.with_extension("cfg");
    let mut c = std::process::Command::new("grub-mkimage");
    c.args(["-O", format, "-p", prefix, "-o"]).arg(&out);
    if let Some(text) = config {
        std::fs::write(&cfg, text)?;
        c.arg("-c").arg(&cfg);
    }
    let st = c.args(modules).output().with_context(|| {
        format!("running grub-mkimage -O {format} (packages grub-common and the {format} modules)")
    });
    let _ = std::fs::remove_file(&cfg);
    let st = st?;
    anyhow::ensure!(
        st.status.success(),
        "grub-mkimage -O {format} failed: {}",
        String::from_utf8_lossy(&st.stderr).trim()
    );
    let image = std::fs::read(&out)?;
    let _ = std::fs::remove_file(&out);
    Ok(image)
}

/// A file name no other image build in this process uses at the same time.
fn unique_name() -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    format!(
        ".reinstall-grub-{}-{}.img",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// Whether `tree` has a grub-mkimage and all `modules` for `format`; else why not.
fn tree_grub(tree: &Path, format: &str, modules: &[&str]) -> std::result::Result<(), String> {
    let bin = tree.join("usr/bin/grub-mkimage");
    if !bin.exists() {
        return Err(format!("{} has no usr/bin/grub-mkimage", tree.display()));
    }
    let dir = tree.join("usr/lib/grub").join(format);
    let missing: Vec<&str> = std::iter::once("kernel")
        .chain(modules.iter().copied())
        .filter(|m| {
            let ext = if *m == "kernel" { "img" } else { "mod" };
            !dir.join(format!("{m}.{ext}")).exists()
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} lacks {format} modules: {}",
            dir.display(),
            missing.join(", ")
        ))
    }
}

fn in_tree(
    tree: &Path,
    format: &str,
    prefix: &str,
    config: Option<&str>,
    modules: &[&str],
) -> Result<(Vec<u8>, GrubFrom)> {
    let name = unique_name();
    let cfg_name = format!("{name}.cfg");
    let chroot = |args: &[&str]| {
        std::process::Command::new("chroot")
            .arg(tree)
            .arg("/usr/bin/grub-mkimage")
            .args(args)
            .output()
            .context("running chroot")
    };
    let version = chroot(&["--version"])?;
    anyhow::ensure!(
        version.status.success(),
        "{}",
        String::from_utf8_lossy(&version.stderr).trim()
    );
    let out_arg = format!("/{name}");
    let cfg_arg = format!("/{cfg_name}");
    let mut args: Vec<&str> = vec!["-O", format, "-p", prefix, "-o", &out_arg];
    if let Some(text) = config {
        std::fs::write(tree.join(&cfg_name), text)?;
        args.extend(["-c", &cfg_arg]);
    }
    args.extend(modules);
    let out = chroot(&args);
    let _ = std::fs::remove_file(tree.join(&cfg_name));
    let image = std::fs::read(tree.join(&name));
    let _ = std::fs::remove_file(tree.join(&name));
    let out = out?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok((
        image?,
        GrubFrom::Tree(String::from_utf8_lossy(&version.stdout).trim().to_string()),
    ))
}

/// Writes `files` (paths with `/`, e.g. `EFI/reinstall/grub.cfg`) into the FAT filesystem on
/// `dev`, creating directories; existing files are replaced.
pub fn write_esp(dev: &Path, files: &[(&str, &[u8])]) -> Result<()> {
    with_esp_fs(dev, &mut |fs| {
        for (path, data) in files {
            create_with(fs, dev, path, &mut |w| {
                w.write_all(data).with_context(|| {
                    format!("{}: writing {path} (is the ESP full?)", dev.display())
                })
            })?;
        }
        Ok(())
    })
}

/// As [`write_esp`] for one file whose contents `write` produces (a stream too large to
/// hold in memory).
pub fn write_esp_with(
    dev: &Path,
    path: &str,
    write: &mut dyn FnMut(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    with_esp_fs(dev, &mut |fs| create_with(fs, dev, path, write))
}

/// Opens the FAT filesystem on `dev` for `f`, then unmounts it and flushes the device.
fn with_esp_fs(
    dev: &Path,
    f: &mut dyn FnMut(&fatfs::FileSystem<&std::fs::File>) -> Result<()>,
) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .with_context(|| format!("opening {}", dev.display()))?;
    let fs = fatfs::FileSystem::new(&file, fatfs::FsOptions::new())
        .with_context(|| format!("{} is not a FAT filesystem", dev.display()))?;
    f(&fs)?;
    fs.unmount()
        .with_context(|| format!("flushing {}", dev.display()))?;
    // On the device, not only in its page cache: a power cut must not take back a loader
    // (or a grubenv) that a phase recorded as written.
    file.sync_all()
        .with_context(|| format!("flushing {}", dev.display()))?;
    Ok(())
}

/// Creates (or replaces) `path` in `fs` with its directories, its contents from `write`.
fn create_with<IO: fatfs::ReadWriteSeek>(
    fs: &fatfs::FileSystem<IO>,
    dev: &Path,
    path: &str,
    write: &mut dyn FnMut(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    let root = fs.root_dir();
    let (dirs, _) = path.rsplit_once('/').unwrap_or(("", path));
    let mut cur = String::new();
    for d in dirs.split('/').filter(|d| !d.is_empty()) {
        cur = if cur.is_empty() {
            d.to_string()
        } else {
            format!("{cur}/{d}")
        };
        if root.open_dir(&cur).is_err() {
            root.create_dir(&cur)
                .with_context(|| format!("{}: creating {cur}", dev.display()))?;
        }
    }
    let mut file = root
        .create_file(path)
        .with_context(|| format!("{}: creating {path}", dev.display()))?;
    file.truncate()?;
    write(&mut file)?;
    file.flush()
        .with_context(|| format!("{}: writing {path} (is the ESP full?)", dev.display()))?;
    Ok(())
}

/// Reads a file from the FAT filesystem on `dev`.
pub fn read_esp(dev: &Path, path: &str) -> Result<Vec<u8>> {
    let f = std::fs::File::open(dev).with_context(|| format!("opening {}", dev.display()))?;
    let fs = fatfs::FileSystem::new(f, fatfs::FsOptions::new())
        .with_context(|| format!("{} is not a FAT filesystem", dev.display()))?;
    let mut v = Vec::new();
    fs.root_dir()
        .open_file(path)
        .with_context(|| format!("{}: no {path}", dev.display()))?
        .read_to_end(&mut v)?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_written_into_a_fat_image_and_replaced_in_place() {
        let img = std::env::temp_dir().join(format!("esp-{}.img", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&img)
            .unwrap();
        f.set_len(64 << 20).unwrap();
        fatfs::format_volume(
            &mut f,
            fatfs::FormatVolumeOptions::new().fat_type(fatfs::FatType::Fat32),
        )
        .unwrap();
        drop(f);
        write_esp(
            &img,
            &[
                ("EFI/reinstall/grub.cfg", b"first version, long"),
                ("EFI/BOOT/x", b"x"),
            ],
        )
        .unwrap();
        write_esp(&img, &[("EFI/reinstall/grub.cfg", b"second")]).unwrap();
        assert_eq!(read_esp(&img, "EFI/reinstall/grub.cfg").unwrap(), b"second");
        assert_eq!(read_esp(&img, "EFI/BOOT/x").unwrap(), b"x");
        assert!(read_esp(&img, "EFI/none").is_err());
        std::fs::remove_file(&img).unwrap();
    }

    #[test]
    fn grub_mkimage_builds_a_pe_image() {
        let image = grub_efi_image("/EFI/reinstall").unwrap();
        assert!(image.starts_with(b"MZ"));
        assert!(image.len() > 100_000);
    }
}
