//! Windows target bundles from installation media (`stager bundle build --os windows`).
//!
//! The source is the root of a Windows ISO (mounted, or copied out): `sources/install.wim`
//! (or `install.esd`), `sources/boot.wim`, `boot/boot.sdi` and the `efi/` boot manager with
//! its BCD. The bundle's tree ([`bundle::windows`]) holds the chosen image alone, exported as
//! a pipable WIM so that the agent applies it straight from the bundle stream, and the WinPE
//! files for disk 1's ESP, with a stage script added to WinPE: on the first boot of disk 1 it
//! runs Windows's own `bcdboot`, which builds the boot store, and reboots.
//!
//! Needs wimlib's `wimlib-imagex` (Debian: wimtools) on the stager.

use anyhow::{bail, ensure, Context, Result};
use bundle::windows::{
    Meta, ESP_BYTES, ESP_DIR, ESP_SPARE, IMAGE, META, META_FORMAT, STAGE_DONE, STAGE_FAILED,
    VOLUME_DIR,
};
use std::path::{Path, PathBuf};
use std::process::Command;

/// One image of a WIM, as `wimlib-imagex info` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WimImage {
    pub index: u32,
    pub name: String,
    pub edition: Option<String>,
    pub arch: Option<String>,
    pub total_bytes: u64,
}

/// The images of `wimlib-imagex info` output, and the WIM's boot index (0: none).
pub fn parse_info(text: &str) -> (Vec<WimImage>, u32) {
    let mut images: Vec<WimImage> = Vec::new();
    let mut boot = 0;
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        match k {
            "Boot Index" => boot = v.parse().unwrap_or(0),
            "Index" => images.push(WimImage {
                index: v.parse().unwrap_or(0),
                name: String::new(),
                edition: None,
                arch: None,
                total_bytes: 0,
            }),
            _ => {
                let Some(img) = images.last_mut() else {
                    continue;
                };
                let v = v.to_string();
                match k {
                    "Name" => img.name = v,
                    "Edition ID" => img.edition = Some(v),
                    "Architecture" => img.arch = Some(v),
                    "Total Bytes" => img.total_bytes = v.parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
    }
    (images, boot)
}

fn wimlib(args: &[&std::ffi::OsStr], what: &str) -> Result<String> {
    let out = Command::new("wimlib-imagex")
        .args(args)
        .output()
        .with_context(|| {
            format!("{what}: running wimlib-imagex (Debian: apt-get install wimtools)")
        })?;
    ensure!(
        out.status.success(),
        "{what}: wimlib-imagex {}: {}",
        args.first()
            .map(|a| a.to_string_lossy())
            .unwrap_or_default(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn images(wim: &Path) -> Result<(Vec<WimImage>, u32)> {
    let text = wimlib(
        &["info".as_ref(), wim.as_os_str()],
        &wim.display().to_string(),
    )?;
    Ok(parse_info(&text))
}

/// `sel` (an index or a name) among `images`; with none, the only image.
pub fn select<'a>(wim: &Path, images: &'a [WimImage], sel: Option<&str>) -> Result<&'a WimImage> {
    let list = || {
        images
            .iter()
            .map(|i| format!("  {}: {}", i.index, i.name))
            .collect::<Vec<_>>()
            .join("\n")
    };
    match sel {
        None if images.len() == 1 => Ok(&images[0]),
        None => bail!(
            "{} holds {} images: choose one with --image INDEX|NAME:\n{}",
            wim.display(),
            images.len(),
            list()
        ),
        Some(s) => images
            .iter()
            .find(|i| i.index.to_string() == s || i.name == s)
            .with_context(|| format!("{}: no image {s:?}; it holds:\n{}", wim.display(), list())),
    }
}

/// `rel` under `root`, each component matched without regard to case (ISO 9660 and UDF
/// media show up upper- or lower-case depending on how they were mounted or copied).
pub fn find_ci(root: &Path, rel: &str) -> Option<PathBuf> {
    let mut cur = root.to_path_buf();
    for part in rel.split('/') {
        let exact = cur.join(part);
        if exact.exists() {
            cur = exact;
            continue;
        }
        let found = std::fs::read_dir(&cur).ok()?.flatten().find(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.eq_ignore_ascii_case(part))
        })?;
        cur = found.path();
    }
    Some(cur)
}

fn need(root: &Path, rel: &str) -> Result<PathBuf> {
    find_ci(root, rel).with_context(|| {
        format!(
            "{}: no {rel}: give the root of a Windows installation ISO (mounted or copied), which has sources/install.wim (or .esd), sources/boot.wim, boot/boot.sdi and efi/",
            root.display()
        )
    })
}

/// WinPE's shell runs this instead of Setup (`winpeshl.ini`).
const WINPESHL_INI: &str = "[LaunchApps]\r\n%SYSTEMDRIVE%\\Windows\\System32\\cmd.exe, /c %SYSTEMDRIVE%\\reinstall\\stage.cmd\r\n";

/// The one-shot WinPE stage: Windows's own bcdboot builds the boot store on the ESP this
/// WinPE booted from (the Windows Boot Manager firmware entry goes last: the rescue stays
/// the default), the log goes onto the Windows volume for the rescue OS to read, and the
/// machine reboots into the rescue OS, which boots Windows once.
fn stage_cmd() -> String {
    let text = format!(
        r#"@echo off
rem Written by reinstall (stager bundle build --os windows). Runs once, from WinPE.
setlocal
set LOG=X:\{VOLUME_DIR}.log
echo reinstall: WinPE stage >> %LOG%
wpeinit >> %LOG% 2>&1
mountvol S: /S >> %LOG% 2>&1
set WIN=
for %%d in (C D E F G H I J K L M N O P Q R T U V W Y Z) do if exist %%d:\{VOLUME_DIR}\{META} set WIN=%%d:
if "%WIN%"=="" (
  echo reinstall: no volume holds \{VOLUME_DIR}\{META} >> %LOG%
  goto failed
)
echo reinstall: Windows volume %WIN% >> %LOG%
bcdboot %WIN%\Windows /s S: /f UEFI /addlast >> %LOG% 2>&1
if errorlevel 1 goto failed
copy /y %LOG% %WIN%\{VOLUME_DIR}\{STAGE_DONE}
wpeutil reboot
exit /b 0
:failed
if not "%WIN%"=="" copy /y %LOG% %WIN%\{VOLUME_DIR}\{STAGE_FAILED}
rem Off the removable-media path: firmware that boots it first falls through to the rescue.
del /f S:\EFI\BOOT\BOOTX64.EFI
wpeutil reboot
"#
    );
    text.replace('\n', "\r\n")
}

/// Makes the bundle tree for image `sel` of the media at `src` in `out` (created), printing
/// wimlib's progress. Returns the tree's metadata.
pub fn prepare(src: &Path, sel: Option<&str>, out: &Path) -> Result<Meta> {
    let md = std::fs::metadata(src).with_context(|| format!("reading {}", src.display()))?;
    ensure!(
        md.is_dir(),
        "{}: a Windows target is built from the root directory of an installation ISO (mount it: mount -o loop,ro win.iso /mnt)",
        src.display()
    );
    let wim = find_ci(src, "sources/install.wim")
        .or_else(|| find_ci(src, "sources/install.esd"))
        .with_context(|| {
            format!(
                "{}: no sources/install.wim or sources/install.esd",
                src.display()
            )
        })?;
    let boot_wim = need(src, "sources/boot.wim")?;
    let sdi = need(src, "boot/boot.sdi")?;
    let efi = need(src, "efi")?;
    need(src, "efi/boot/bootx64.efi")?;
    need(src, "efi/microsoft/boot/bcd")?;

    let (imgs, _) = images(&wim)?;
    let img = select(&wim, &imgs, sel)?.clone();
    if let Some(a) = &img.arch {
        ensure!(
            a == "x86_64" || a == "amd64",
            "{} image {} ({}) is for {a}: only x86_64 is supported",
            wim.display(),
            img.index,
            img.name
        );
    }
    std::fs::create_dir_all(out)?;
    eprintln!(
        "stager: exporting image {} ({}) of {} as a pipable WIM",
        img.index,
        img.name,
        wim.display()
    );
    let st = Command::new("wimlib-imagex")
        .arg("export")
        .arg(&wim)
        .arg(img.index.to_string())
        .arg(out.join(IMAGE))
        .arg("--pipable")
        // LZX chunks, as install.wim has them (copied, not recompressed); an install.esd's
        // solid LZMS is recompressed, since a pipable WIM cannot hold solid resources.
        .arg("--compress=LZX")
        .status()
        .context("running wimlib-imagex export")?;
    ensure!(
        st.success(),
        "{}: wimlib-imagex export failed",
        wim.display()
    );

    // The ESP's files: the media's boot manager, BCD and boot.sdi as they are; boot.wim with
    // the stage script.
    let esp = out.join(ESP_DIR);
    copy_tree(&efi, &esp.join("EFI"))?;
    std::fs::create_dir_all(esp.join("boot"))?;
    std::fs::copy(&sdi, esp.join("boot/boot.sdi"))
        .with_context(|| format!("copying {}", sdi.display()))?;
    std::fs::create_dir_all(esp.join("sources"))?;
    let pe = esp.join("sources/boot.wim");
    std::fs::copy(&boot_wim, &pe).with_context(|| format!("copying {}", boot_wim.display()))?;
    let esp_files = tree_bytes(&esp)?;
    ensure!(
        esp_files + ESP_SPARE <= ESP_BYTES,
        "{}: the ESP files (efi/, boot/boot.sdi, sources/boot.wim) take {} MiB; disk 1's ESP holds {} MiB with {} MiB kept for bcdboot",
        src.display(),
        esp_files >> 20,
        ESP_BYTES >> 20,
        ESP_SPARE >> 20
    );
    let (pe_imgs, boot) = images(&pe)?;
    let winpe_index = if boot > 0 {
        boot
    } else {
        pe_imgs
            .last()
            .map(|i| i.index)
            .context("boot.wim holds no image")?
    };
    let add = out.join("winpe-add");
    std::fs::create_dir_all(&add)?;
    std::fs::write(add.join("stage.cmd"), stage_cmd())?;
    std::fs::write(add.join("winpeshl.ini"), WINPESHL_INI)?;
    let commands = format!(
        "add '{}' /{VOLUME_DIR}/stage.cmd\nadd '{}' /Windows/System32/winpeshl.ini\n",
        add.join("stage.cmd").display(),
        add.join("winpeshl.ini").display()
    );
    let mut child = Command::new("wimlib-imagex")
        .arg("update")
        .arg(&pe)
        .arg(winpe_index.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("running wimlib-imagex update")?;
    std::io::Write::write_all(child.stdin.as_mut().expect("piped"), commands.as_bytes())?;
    drop(child.stdin.take());
    ensure!(
        child.wait()?.success(),
        "{}: adding the stage script to WinPE (image {winpe_index}) failed",
        boot_wim.display()
    );
    if boot == 0 {
        wimlib(
            &[
                "info".as_ref(),
                pe.as_os_str(),
                winpe_index.to_string().as_ref(),
                "--boot".as_ref(),
            ],
            "marking WinPE bootable",
        )?;
    }
    std::fs::remove_dir_all(&add)?;
    let meta = Meta {
        format: META_FORMAT,
        image_name: img.name.clone(),
        source_index: img.index,
        edition: img.edition.clone(),
        arch: img.arch.clone(),
        image_bytes: img.total_bytes,
        winpe_index,
    };
    std::fs::write(out.join(META), serde_json::to_vec_pretty(&meta)?)?;
    Ok(meta)
}

fn tree_bytes(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        n += if e.file_type()?.is_dir() {
            tree_bytes(&e.path())?
        } else {
            e.metadata()?.len()
        };
    }
    Ok(n)
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if e.file_type()?.is_dir() {
            copy_tree(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wimlib_info_is_parsed_into_images_and_the_boot_index() {
        let text = "WIM Information:\n----------------\nPath:           x.wim\nImage Count:    2\nBoot Index:     2\n\nAvailable Images:\n-----------------\nIndex:                  1\nName:                   Windows Server 2022 SERVERSTANDARDCORE\nTotal Bytes:            9186701126\nArchitecture:           x86_64\nEdition ID:             ServerStandard\n\nIndex:                  2\nName:                   Windows Server 2022 SERVERSTANDARD\nTotal Bytes:            14000000000\nArchitecture:           x86_64\n";
        let (imgs, boot) = parse_info(text);
        assert_eq!(boot, 2);
        assert_eq!(imgs.len(), 2);
        assert_eq!(imgs[1].name, "Windows Server 2022 SERVERSTANDARD");
        assert_eq!(imgs[0].edition.as_deref(), Some("ServerStandard"));
        assert_eq!(imgs[1].total_bytes, 14_000_000_000);
        let p = Path::new("install.wim");
        assert_eq!(select(p, &imgs, Some("2")).unwrap().index, 2);
        assert_eq!(
            select(p, &imgs, Some("Windows Server 2022 SERVERSTANDARDCORE"))
                .unwrap()
                .index,
            1
        );
        let e = select(p, &imgs, None).unwrap_err().to_string();
        assert!(
            e.contains("--image") && e.contains("2: Windows Server 2022 SERVERSTANDARD"),
            "{e}"
        );
        assert!(select(p, &imgs, Some("3")).is_err());
    }

    #[test]
    fn the_stage_script_has_dos_line_ends_and_names_the_marker_files() {
        let s = stage_cmd();
        assert!(!s.replace("\r\n", "").contains('\n'));
        assert!(s.contains("/addlast") && s.contains(STAGE_DONE) && s.contains(STAGE_FAILED));
        let failed = &s[s.find(":failed").unwrap()..];
        assert!(failed.contains("del /f S:\\EFI\\BOOT\\BOOTX64.EFI"), "{s}");
    }
}
