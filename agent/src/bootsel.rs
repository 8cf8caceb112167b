//! Boot selection, as the phase engine sees it: the narrow trait of `bootcfg::select`
//! (DESIGN.md §7), and the fake firmware that tests and simulated reboots use.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub use bootcfg::select::{BootSelector, EspRef, GrubEnv};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FakeEntry {
    pub number: u16,
    pub label: String,
    pub esp: Option<EspRef>,
}

/// Firmware state in a JSON file, with a log of every change, so that a test can replay what
/// the firmware would boot and check each step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct FakeState {
    pub entries: Vec<FakeEntry>,
    pub boot_order: Vec<u16>,
    pub boot_next: Option<u16>,
    pub current: Option<u16>,
    pub log: Vec<String>,
}

pub struct FakeFirmware {
    path: PathBuf,
}

impl FakeFirmware {
    pub fn new(path: &Path) -> FakeFirmware {
        FakeFirmware {
            path: path.to_path_buf(),
        }
    }

    pub fn load(&self) -> Result<FakeState> {
        let b = std::fs::read(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?;
        serde_json::from_slice(&b).with_context(|| format!("parsing {}", self.path.display()))
    }

    /// Written atomically: a power cut between two firmware variable writes is a real case,
    /// a half-written JSON file is not.
    pub fn save(&self, s: &FakeState) -> Result<()> {
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(s)?)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("writing {}", self.path.display()))
    }

    fn change(&mut self, what: String, f: impl FnOnce(&mut FakeState)) -> Result<()> {
        let mut s = self.load()?;
        f(&mut s);
        s.log.push(what);
        self.save(&s)
    }

    /// What a power cycle boots: `BootNext` once (then cleared), else the first of
    /// `BootOrder`. Used by the test harness.
    pub fn power_cycle(&mut self) -> Result<FakeEntry> {
        let mut s = self.load()?;
        let n = s
            .boot_next
            .take()
            .or_else(|| s.boot_order.first().copied())
            .context("nothing to boot")?;
        s.current = Some(n);
        let e = s
            .entries
            .iter()
            .find(|e| e.number == n)
            .cloned()
            .context("BootNext names no entry")?;
        s.log.push(format!("boot {}", e.label));
        self.save(&s)?;
        Ok(e)
    }
}

impl BootSelector for FakeFirmware {
    fn create_entry(&mut self, label: &str, esp: &EspRef) -> Result<u16> {
        let s = self.load()?;
        if let Some(e) = s
            .entries
            .iter()
            .find(|e| e.label == label && e.esp.as_ref() == Some(esp))
        {
            return Ok(e.number);
        }
        let n = s.entries.iter().map(|e| e.number + 1).max().unwrap_or(0);
        self.change(format!("create {label}"), |s| {
            s.entries.retain(|e| e.label != label);
            s.entries.push(FakeEntry {
                number: n,
                label: label.to_string(),
                esp: Some(esp.clone()),
            })
        })?;
        Ok(n)
    }

    fn set_next(&mut self, entry: u16) -> Result<()> {
        let label = self.label(entry)?;
        self.change(format!("next {label}"), |s| s.boot_next = Some(entry))
    }

    fn make_default(&mut self, entry: u16) -> Result<()> {
        let label = self.label(entry)?;
        self.change(format!("default {label}"), |s| {
            s.boot_order.retain(|n| *n != entry);
            s.boot_order.insert(0, entry);
        })
    }

    fn current(&self) -> Result<Option<u16>> {
        Ok(self.load()?.current)
    }

    fn next(&self) -> Result<Option<u16>> {
        Ok(self.load()?.boot_next)
    }
}

impl FakeFirmware {
    fn label(&self, entry: u16) -> Result<String> {
        self.load()?
            .entries
            .iter()
            .find(|e| e.number == entry)
            .map(|e| e.label.clone())
            .with_context(|| format!("no boot entry {entry:04X}"))
    }
}

/// Legacy BIOS machines: the firmware boots disk 1's MBR and GRUB chooses (DESIGN.md §7).
///
/// Until install-target, disk 1 holds the source's own GRUB, which is not ours to replace
/// while it is the way back: the rescue becomes an entry of its `custom.cfg` (which the
/// grub.cfg of Debian, Ubuntu and Fedora source at the end, 41_custom) that reads the rescue
/// ESP's grub.cfg; the one-shot is `next_entry` in its grubenv, as `grub-reboot` sets it
/// (their grub.cfg spends it and sets `boot_once`); "the rescue is the default" is
/// `reinstall_default=rescue` in the rescue ESP's grubenv, which that `custom.cfg` reads on
/// every boot that is not a one-shot (so the rescue OS can set it without touching disk 1).
/// From install-target on, disk 1 holds our GRUB reading disk 1's ESP: [`GrubEnv`].
///
/// Entries are numbered in the order they are created (from 1); the disk 1 ESP is learnt
/// from the `reinstall-target` entry.
pub struct BiosGrub {
    root: PathBuf,
    entries: Vec<(String, EspRef)>,
}

pub const RESCUE_LABEL: &str = "reinstall-rescue";
pub const TARGET_LABEL: &str = "reinstall-target";
/// Where our grub.cfg and grubenv live on an ESP (BIOS core.img and the removable UEFI path).
pub const GRUB_DIR: &str = bootcfg::grubcfg::REDIRECT_DIR;

impl BiosGrub {
    pub fn new(root: &Path) -> BiosGrub {
        BiosGrub {
            root: root.to_path_buf(),
            entries: Vec::new(),
        }
    }

    fn esp(&self, label: &str) -> Option<&EspRef> {
        self.entries
            .iter()
            .find(|(l, _)| l == label)
            .map(|(_, e)| e)
    }

    fn device(esp: &EspRef) -> Result<PathBuf> {
        esp.device
            .as_deref()
            .map(PathBuf::from)
            .context("the boot entry names no ESP device")
    }

    /// Our GRUB on disk 1, once install-target has written it.
    fn ours(&self) -> Option<GrubEnv> {
        let dev = Self::device(self.esp(TARGET_LABEL)?).ok()?;
        let cfg = bootcfg::loader::read_esp(&dev, &format!("{GRUB_DIR}/grub.cfg")).ok()?;
        cfg.starts_with(b"# Written by reinstall").then(|| GrubEnv {
            esp: dev,
            dir: GRUB_DIR.into(),
        })
    }

    /// The source's GRUB directory, in the source OS only.
    fn source_grub(&self) -> Option<PathBuf> {
        if self.root.join("etc/reinstall/world").exists() {
            return None;
        }
        ["boot/grub", "boot/grub2"]
            .iter()
            .map(|d| self.root.join(d))
            .find(|d| d.join("grub.cfg").exists())
    }

    fn label(&self, entry: u16) -> Result<String> {
        entry
            .checked_sub(1)
            .and_then(|i| self.entries.get(i as usize))
            .map(|(l, _)| l.clone())
            .with_context(|| format!("no boot entry {entry}"))
    }

    fn number(&self, label: &str) -> Option<u16> {
        self.entries
            .iter()
            .position(|(l, _)| l == label)
            .map(|i| i as u16 + 1)
    }

    /// Our GRUB on disk 1 (once install-target has written it) and its number for `entry`.
    fn in_ours(&self, entry: u16) -> Result<Option<(GrubEnv, u16)>> {
        let Some(mut g) = self.ours() else {
            return Ok(None);
        };
        let label = self.label(entry)?;
        let esp = self.esp(&label).expect("recorded").clone();
        let n = g.create_entry(&label, &esp)?;
        Ok(Some((g, n)))
    }

    fn write_custom_cfg(&self, dir: &Path, rescue_esp: &EspRef) -> Result<()> {
        let cfg = dir.join("grub.cfg");
        let text =
            std::fs::read_to_string(&cfg).with_context(|| format!("reading {}", cfg.display()))?;
        anyhow::ensure!(
            text.contains("custom.cfg"),
            "{} does not read custom.cfg (no 41_custom section): the rescue entry cannot be added to this GRUB",
            cfg.display()
        );
        let uuid = bootcfg::bios::read_fat32_uuid(&Self::device(rescue_esp)?)?;
        let custom = format!(
            "# Written by reinstall: the rescue OS on disk 2 (its grub.cfg is on the rescue ESP).\n\
             menuentry 'reinstall rescue OS' --id '{RESCUE_LABEL}' {{\n\
             \x20 insmod part_gpt\n  insmod fat\n  insmod ext2\n  insmod search_fs_uuid\n  insmod loadenv\n\
             \x20 insmod linux\n  insmod gzio\n  insmod test\n  insmod configfile\n  insmod echo\n\
             \x20 search --no-floppy --fs-uuid --set=root {uuid}\n\
             \x20 set prefix=($root)/{GRUB_DIR}\n\
             \x20 configfile $prefix/grub.cfg\n}}\n\
             if [ -z \"${{boot_once}}\" ]; then\n\
             \x20 if search --no-floppy --fs-uuid --set=reinstall_esp {uuid}; then\n\
             \x20   load_env -f (${{reinstall_esp}})/{GRUB_DIR}/grubenv reinstall_default\n\
             \x20   if [ \"${{reinstall_default}}\" = \"rescue\" ]; then\n\
             \x20     set default=\"{RESCUE_LABEL}\"\n    fi\n  fi\nfi\n"
        );
        write_synced(&dir.join("custom.cfg"), custom.as_bytes())
    }

    fn set_source_env(dir: &Path, var: &str, value: &str) -> Result<()> {
        let p = dir.join("grubenv");
        let mut env = match std::fs::read(&p) {
            Ok(b) => bootcfg::grubenv::parse(&p.display().to_string(), &b)?,
            Err(_) => Default::default(),
        };
        env.insert(var.to_string(), value.to_string());
        write_synced(&p, &bootcfg::grubenv::render(&env)?)
    }
}

/// Written to a temporary file, flushed, renamed over `p`, directory flushed.
fn write_synced(p: &Path, data: &[u8]) -> Result<()> {
    let tmp = p.with_extension("reinstall-tmp");
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, p).with_context(|| format!("writing {}", p.display()))?;
    if let Some(d) = p.parent() {
        std::fs::File::open(d)?.sync_all()?;
    }
    Ok(())
}

impl BootSelector for BiosGrub {
    fn create_entry(&mut self, label: &str, esp: &EspRef) -> Result<u16> {
        if label == RESCUE_LABEL {
            if let Some(dir) = self.source_grub() {
                self.write_custom_cfg(&dir, esp)?;
            }
        }
        match self.entries.iter_mut().find(|(l, _)| l == label) {
            Some((_, e)) => *e = esp.clone(),
            None => self.entries.push((label.to_string(), esp.clone())),
        }
        Ok(self.number(label).expect("just recorded"))
    }

    fn set_next(&mut self, entry: u16) -> Result<()> {
        if let Some((mut g, n)) = self.in_ours(entry)? {
            return g.set_next(n);
        }
        let label = self.label(entry)?;
        match (label.as_str(), self.source_grub()) {
            (RESCUE_LABEL, Some(dir)) => Self::set_source_env(&dir, "next_entry", RESCUE_LABEL),
            _ => anyhow::bail!(
                "cannot boot {label} once: disk 1 has neither the source's GRUB (this is not the source OS) nor ours"
            ),
        }
    }

    fn make_default(&mut self, entry: u16) -> Result<()> {
        if let Some((mut g, n)) = self.in_ours(entry)? {
            return g.make_default(n);
        }
        let label = self.label(entry)?;
        anyhow::ensure!(
            label == RESCUE_LABEL,
            "cannot make {label} the default: disk 1 has no GRUB of ours yet"
        );
        let rescue = GrubEnv {
            esp: Self::device(self.esp(RESCUE_LABEL).expect("recorded"))?,
            dir: GRUB_DIR.into(),
        };
        rescue.set("reinstall_default", "rescue")
    }

    fn current(&self) -> Result<Option<u16>> {
        let Some(g) = self.ours() else {
            return Ok(None);
        };
        let booted = g.env()?.get(bootcfg::grubcfg::BOOTED_VAR).cloned();
        Ok(booted.and_then(|id| self.number(&format!("reinstall-{id}"))))
    }

    fn next(&self) -> Result<Option<u16>> {
        if let Some(g) = self.ours() {
            let next = g.env()?.get("next_entry").cloned().unwrap_or_default();
            return Ok(self.number(&format!("reinstall-{next}")));
        }
        let Some(dir) = self.source_grub() else {
            return Ok(None);
        };
        let env = match std::fs::read(dir.join("grubenv")) {
            Ok(b) => bootcfg::grubenv::parse("grubenv", &b)?,
            Err(_) => return Ok(None),
        };
        Ok(env
            .get("next_entry")
            .filter(|v| v.as_str() == RESCUE_LABEL)
            .and_then(|_| self.number(RESCUE_LABEL)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esp_image(path: &Path, files: &[(&str, &[u8])]) -> EspRef {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap();
        f.set_len(40 << 20).unwrap();
        drop(f);
        crate::mount::mkfs_esp(path, "ESP", 512).unwrap();
        bootcfg::loader::write_esp(path, files).unwrap();
        EspRef {
            partition: 1,
            start_lba: 2048,
            device: Some(path.display().to_string()),
            ..Default::default()
        }
    }

    fn env_of(esp: &Path) -> std::collections::BTreeMap<String, String> {
        GrubEnv {
            esp: esp.into(),
            dir: GRUB_DIR.into(),
        }
        .env()
        .unwrap()
    }

    /// The BIOS selector through a migration's calls: the source's GRUB gets the rescue
    /// entry and the one-shot, the rescue OS makes itself the default on its own ESP, and
    /// once disk 1 carries our GRUB everything goes there.
    #[test]
    fn bios_grub_uses_the_source_grub_then_ours() {
        let d = std::env::temp_dir().join(format!("biosgrub-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let root = d.join("root");
        std::fs::create_dir_all(root.join("boot/grub")).unwrap();
        let empty = bootcfg::grubenv::render(&Default::default()).unwrap();
        let rescue = esp_image(
            &d.join("rescue-esp.img"),
            &[
                ("EFI/BOOT/grub.cfg", b"# Written by reinstall\n"),
                ("EFI/BOOT/grubenv", &empty),
            ],
        );
        let rescue_dev = PathBuf::from(rescue.device.clone().unwrap());
        let uuid = bootcfg::bios::read_fat32_uuid(&rescue_dev).unwrap();

        // Source OS, whose grub.cfg does not read custom.cfg: refused, naming the file.
        std::fs::write(root.join("boot/grub/grub.cfg"), "menuentry 'Debian' {}\n").unwrap();
        let mut g = BiosGrub::new(&root);
        let e = g
            .create_entry(RESCUE_LABEL, &rescue)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("boot/grub/grub.cfg does not read custom.cfg"),
            "{e}"
        );
        std::fs::write(
            root.join("boot/grub/grub.cfg"),
            "menuentry 'Debian' {}\nsource ${config_directory}/custom.cfg\n",
        )
        .unwrap();
        let r = g.create_entry(RESCUE_LABEL, &rescue).unwrap();
        let custom = std::fs::read_to_string(root.join("boot/grub/custom.cfg")).unwrap();
        assert!(custom.contains(&format!("search --no-floppy --fs-uuid --set=root {uuid}")));
        assert!(custom.contains("--id 'reinstall-rescue'") && custom.contains("reinstall_default"));
        assert_eq!(g.next().unwrap(), None);
        g.set_next(r).unwrap();
        assert_eq!(g.next().unwrap(), Some(r));
        let env = std::fs::read(root.join("boot/grub/grubenv")).unwrap();
        assert_eq!(
            bootcfg::grubenv::parse("grubenv", &env).unwrap()["next_entry"],
            RESCUE_LABEL
        );
        assert!(
            g.make_default(r).is_ok(),
            "rescue as default: on the rescue ESP"
        );
        assert_eq!(env_of(&rescue_dev)["reinstall_default"], "rescue");

        // Rescue OS: no source GRUB to write; a target entry before disk 1 has our GRUB
        // cannot be booted.
        std::fs::create_dir_all(root.join("etc/reinstall")).unwrap();
        std::fs::write(root.join("etc/reinstall/world"), "rescue\n").unwrap();
        let mut g = BiosGrub::new(&root);
        let r = g.create_entry(RESCUE_LABEL, &rescue).unwrap();
        let target = esp_image(&d.join("disk1-esp.img"), &[("EFI/BOOT/x", b"")]);
        let t = g.create_entry(TARGET_LABEL, &target).unwrap();
        assert!(g.set_next(t).is_err());
        assert_eq!(g.current().unwrap(), None);

        // Disk 1 with our GRUB: the one-shot, the default and the current boot are there.
        let target_dev = PathBuf::from(target.device.clone().unwrap());
        let entry = |id: &str| bootcfg::grubcfg::Entry {
            id: id.into(),
            title: id.into(),
            root_uuid: "0c1a5c1e-1111-2222-3333-444455556666".into(),
            kernel: "/boot/vmlinuz".into(),
            initrd: None,
            args: String::new(),
        };
        let cfg = bootcfg::grubcfg::render(&[entry("target"), entry("rescue")], "rescue", 1);
        bootcfg::loader::write_esp(
            &target_dev,
            &[
                ("EFI/BOOT/grub.cfg", cfg.as_bytes()),
                ("EFI/BOOT/grubenv", &empty),
            ],
        )
        .unwrap();
        g.set_next(t).unwrap();
        assert_eq!(g.next().unwrap(), Some(t));
        g.make_default(r).unwrap();
        g.make_default(t).unwrap();
        let env = env_of(&target_dev);
        assert_eq!(
            (env["next_entry"].as_str(), env["saved_entry"].as_str()),
            ("target", "target")
        );
        GrubEnv {
            esp: target_dev.clone(),
            dir: GRUB_DIR.into(),
        }
        .set(bootcfg::grubcfg::BOOTED_VAR, "rescue")
        .unwrap();
        assert_eq!(g.current().unwrap(), Some(r));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
