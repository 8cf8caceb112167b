//! The one narrow trait the agent's phase engine uses to choose what boots next, with its UEFI
//! implementation over efivarfs and its GRUB implementation over the environment block (for
//! legacy BIOS machines, where the firmware boots disk 1's GRUB and GRUB chooses). The fake
//! firmware for tests lives with the agent.

use crate::efi::{self, DevicePathNode, Guid, LoadOption};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::PathBuf;

/// Where a boot entry's loader lives: a GPT partition and a path on its FAT filesystem.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EspRef {
    /// GPT disk GUID (informational: UEFI matches the partition GUID).
    pub disk_guid: String,
    pub partition: u32,
    /// The partition's unique GUID, and extent in logical blocks (the hard-drive device path
    /// node needs all three).
    #[serde(default)]
    pub partition_guid: Option<String>,
    #[serde(default)]
    pub start_lba: u64,
    #[serde(default)]
    pub size_lba: u64,
    /// `\EFI\reinstall\grubx64.efi`
    pub loader: String,
    /// The partition's device node when known (`/dev/vdb1`): BIOS selectors read the ESP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{var}: {reason}")]
    Var { var: String, reason: String },
    #[error("{0}")]
    Other(String),
}

pub trait BootSelector: Send + Sync {
    /// Creates (or finds, by label and loader) an entry; returns its number.
    fn create_entry(&mut self, label: &str, esp: &EspRef) -> anyhow::Result<u16>;
    /// Boot `entry` once, at the next boot only (`BootNext`).
    fn set_next(&mut self, entry: u16) -> anyhow::Result<()>;
    /// Make `entry` the default (first in `BootOrder`), keeping the others after it.
    fn make_default(&mut self, entry: u16) -> anyhow::Result<()>;
    /// The entry this boot came from (`BootCurrent`).
    fn current(&self) -> anyhow::Result<Option<u16>>;
    /// The pending one-shot (`BootNext`); firmware clears it when it boots it.
    fn next(&self) -> anyhow::Result<Option<u16>>;
}

/// UEFI variables through efivarfs (`/sys/firmware/efi/efivars`), or a directory laid out
/// the same way (tests).
pub struct Efivarfs {
    pub dir: PathBuf,
}

nix::ioctl_read!(fs_get_flags, b'f', 1, libc_long);
nix::ioctl_write_ptr!(fs_set_flags, b'f', 2, libc_long);
#[allow(non_camel_case_types)]
type libc_long = std::ffi::c_long;
const FS_IMMUTABLE_FL: libc_long = 0x10;

impl Efivarfs {
    pub fn system() -> Efivarfs {
        Efivarfs {
            dir: PathBuf::from("/sys/firmware/efi/efivars"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-{}", efi::GLOBAL_VARIABLE))
    }

    pub fn read(&self, name: &str) -> Result<Option<(u32, Vec<u8>)>> {
        let p = self.path(name);
        match std::fs::read(&p) {
            Ok(b) => {
                let (a, d) = efi::efivarfs_decode(&b).map_err(|e| Error::Var {
                    var: name.into(),
                    reason: e.to_string(),
                })?;
                Ok(Some((a, d.to_vec())))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Var {
                var: p.display().to_string(),
                reason: e.to_string(),
            }),
        }
    }

    /// Writes a variable in one `write(2)` (efivarfs requires it), after clearing the
    /// immutable flag the kernel sets on existing variables.
    pub fn write(&self, name: &str, data: &[u8]) -> Result<()> {
        let p = self.path(name);
        let err = |reason: String| Error::Var {
            var: p.display().to_string(),
            reason,
        };
        if let Ok(f) = std::fs::File::open(&p) {
            clear_immutable(&f);
        }
        let bytes = efi::efivarfs_encode(efi::ATTR_BOOT_VARIABLE, data);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .map_err(|e| err(explain(&e)))?;
        let n = f.write(&bytes).map_err(|e| err(explain(&e)))?;
        if n != bytes.len() {
            return Err(err(format!("short write ({n} of {} bytes)", bytes.len())));
        }
        // A stand-in directory keeps whatever was longer before.
        let _ = f.set_len(bytes.len() as u64);
        Ok(())
    }

    /// Deletes a variable (clearing the immutable flag first); a missing one is fine.
    pub fn delete(&self, name: &str) -> Result<()> {
        let p = self.path(name);
        if let Ok(f) = std::fs::File::open(&p) {
            clear_immutable(&f);
        }
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::Var {
                var: p.display().to_string(),
                reason: explain(&e),
            }),
        }
    }

    pub fn u16_list(&self, name: &str) -> Result<Vec<u16>> {
        match self.read(name)? {
            Some((_, d)) => efi::decode_u16_list(&d).map_err(|e| Error::Var {
                var: name.into(),
                reason: e.to_string(),
            }),
            None => Ok(Vec::new()),
        }
    }

    /// All `Boot####` entries, decoded.
    pub fn entries(&self) -> Result<Vec<(u16, LoadOption)>> {
        let mut v = Vec::new();
        let suffix = format!("-{}", efi::GLOBAL_VARIABLE);
        let rd = std::fs::read_dir(&self.dir)
            .map_err(|e| Error::Other(format!("{}: {e}", self.dir.display())))?;
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let Some(hex) = n.strip_prefix("Boot").and_then(|r| r.strip_suffix(&suffix)) else {
                continue;
            };
            let Ok(num) = u16::from_str_radix(hex, 16) else {
                continue;
            };
            if hex.len() != 4 {
                continue;
            }
            if let Some((_, d)) = self.read(&format!("Boot{hex}"))? {
                if let Ok(o) = LoadOption::decode(&d) {
                    v.push((num, o));
                }
            }
        }
        v.sort_by_key(|(n, _)| *n);
        Ok(v)
    }
}

fn clear_immutable(f: &std::fs::File) {
    use std::os::fd::AsRawFd;
    let mut flags: libc_long = 0;
    // SAFETY: FS_IOC_GETFLAGS/SETFLAGS read and write one long through the pointer given.
    unsafe {
        if fs_get_flags(f.as_raw_fd(), &mut flags).is_ok() && flags & FS_IMMUTABLE_FL != 0 {
            flags &= !FS_IMMUTABLE_FL;
            let _ = fs_set_flags(f.as_raw_fd(), &flags);
        }
    }
}

fn explain(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(30) => "efivarfs is read-only (remount /sys/firmware/efi/efivars read-write)".into(),
        Some(28) => "the firmware's variable store (NVRAM) is full".into(),
        Some(1) | Some(13) => format!("not permitted ({e}); is it immutable, or are we not root?"),
        _ => e.to_string(),
    }
}

fn load_option(label: &str, esp: &EspRef) -> Result<LoadOption> {
    let guid = esp
        .partition_guid
        .as_deref()
        .ok_or_else(|| {
            Error::Other(format!(
                "boot entry {label}: the ESP's partition GUID is unknown"
            ))
        })
        .and_then(|g| Guid::parse(g).map_err(|e| Error::Other(e.to_string())))?;
    Ok(LoadOption {
        attributes: efi::LOAD_OPTION_ACTIVE,
        description: label.to_string(),
        path: vec![
            DevicePathNode::HardDrive {
                partition_number: esp.partition,
                start_lba: esp.start_lba,
                size_lba: esp.size_lba,
                partition_guid: guid,
            },
            DevicePathNode::FilePath(esp.loader.clone()),
        ],
        optional_data: Vec::new(),
    })
}

impl BootSelector for Efivarfs {
    fn create_entry(&mut self, label: &str, esp: &EspRef) -> anyhow::Result<u16> {
        let want = load_option(label, esp)?;
        let entries = self.entries()?;
        if let Some((n, _)) = entries.iter().find(|(_, o)| *o == want) {
            return Ok(*n);
        }
        let n = (0..=0xffffu16)
            .find(|n| !entries.iter().any(|(e, _)| e == n))
            .ok_or_else(|| Error::Other("no free Boot#### number".into()))?;
        self.write(
            &format!("Boot{n:04X}"),
            &want.encode().map_err(|e| Error::Other(e.to_string()))?,
        )?;
        let mut order = self.u16_list("BootOrder")?;
        if !order.contains(&n) {
            order.push(n);
            self.write("BootOrder", &efi::encode_u16_list(&order))?;
        }
        // Entries of ours with this label that point elsewhere are stale (the disk was
        // rewritten, as in a second reinstall): keeping them would fill the NVRAM over a
        // machine's life. Out of BootOrder first, then deleted.
        let stale: Vec<u16> = entries
            .iter()
            .filter(|(e, o)| *e != n && o.description == label)
            .map(|(e, _)| *e)
            .collect();
        if !stale.is_empty() {
            let order: Vec<u16> = self
                .u16_list("BootOrder")?
                .into_iter()
                .filter(|e| !stale.contains(e))
                .collect();
            self.write("BootOrder", &efi::encode_u16_list(&order))?;
            for e in stale {
                self.delete(&format!("Boot{e:04X}"))?;
            }
        }
        Ok(n)
    }

    fn set_next(&mut self, entry: u16) -> anyhow::Result<()> {
        Ok(self.write("BootNext", &efi::encode_u16_list(&[entry]))?)
    }

    fn make_default(&mut self, entry: u16) -> anyhow::Result<()> {
        let mut order = self.u16_list("BootOrder")?;
        order.retain(|n| *n != entry);
        order.insert(0, entry);
        Ok(self.write("BootOrder", &efi::encode_u16_list(&order))?)
    }

    fn current(&self) -> anyhow::Result<Option<u16>> {
        Ok(self.u16_list("BootCurrent")?.first().copied())
    }

    fn next(&self) -> anyhow::Result<Option<u16>> {
        Ok(self.u16_list("BootNext")?.first().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esp() -> EspRef {
        EspRef {
            disk_guid: "11111111-2222-3333-4444-555555555555".into(),
            partition: 1,
            partition_guid: Some("c12a7328-f81f-11d2-ba4b-00a0c93ec93b".into()),
            start_lba: 2048,
            size_lba: 524288,
            loader: "\\EFI\\rescue\\grubx64.efi".into(),
            device: None,
        }
    }

    /// The errors issue 5 names, from real file systems standing in for efivarfs (root:
    /// mounts): a read-only one, and one with no room left (what a full NVRAM returns).
    #[test]
    fn a_read_only_or_full_variable_store_is_named_in_the_error() {
        let base = std::env::temp_dir().join(format!("efivars-err-{}", std::process::id()));
        for (opts, want) in [
            ("ro,size=64k", "efivarfs is read-only"),
            ("size=4k", "variable store (NVRAM) is full"),
        ] {
            let d = base.join(opts.replace([',', '='], "-"));
            std::fs::create_dir_all(&d).unwrap();
            let st = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
                .arg(&d)
                .status()
                .unwrap();
            assert!(st.success(), "mount -o {opts} (needs root)");
            if !opts.starts_with("ro") {
                // Fill it: one page is all it has.
                let _ = std::fs::write(d.join("filler"), vec![0u8; 8192]);
            }
            let v = Efivarfs { dir: d.clone() };
            let e = v
                .write("BootNext", &[1, 0])
                .map(|_| ())
                .unwrap_err()
                .to_string();
            let _ = std::process::Command::new("umount").arg(&d).status();
            assert!(
                e.contains(&format!("BootNext-{}", efi::GLOBAL_VARIABLE)) && e.contains(want),
                "{opts}: {e}"
            );
        }
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn entries_boot_next_and_order_are_written_as_efivarfs_files() {
        let d = std::env::temp_dir().join(format!("efivars-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let mut v = Efivarfs { dir: d.clone() };
        // An existing firmware entry.
        v.write(
            "Boot0000",
            &LoadOption {
                attributes: 1,
                description: "UiApp".into(),
                path: vec![],
                optional_data: vec![],
            }
            .encode()
            .unwrap(),
        )
        .unwrap();
        v.write("BootOrder", &efi::encode_u16_list(&[0])).unwrap();
        let n = v.create_entry("rescue", &esp()).unwrap();
        assert_eq!(n, 1);
        assert_eq!(v.create_entry("rescue", &esp()).unwrap(), 1, "idempotent");
        let raw = std::fs::read(d.join(format!("Boot0001-{}", efi::GLOBAL_VARIABLE))).unwrap();
        assert_eq!(
            &raw[..4],
            &[7, 0, 0, 0],
            "non-volatile, boot service and runtime access"
        );
        assert_eq!(
            LoadOption::decode(&raw[4..]).unwrap(),
            load_option("rescue", &esp()).unwrap()
        );
        assert_eq!(v.u16_list("BootOrder").unwrap(), [0, 1]);
        v.set_next(1).unwrap();
        assert_eq!(v.next().unwrap(), Some(1));
        v.make_default(1).unwrap();
        assert_eq!(v.u16_list("BootOrder").unwrap(), [1, 0]);
        // The disk was rewritten (a new partition GUID): a new entry, the stale one gone.
        let mut moved = esp();
        moved.partition_guid = Some("0fc63daf-8483-4772-8e79-3d69d8477de4".into());
        let m = v.create_entry("rescue", &moved).unwrap();
        assert_eq!(m, 2);
        assert_eq!(v.u16_list("BootOrder").unwrap(), [0, 2]);
        assert!(!d
            .join(format!("Boot0001-{}", efi::GLOBAL_VARIABLE))
            .exists());
        assert_eq!(v.entries().unwrap().len(), 2);
        std::fs::remove_dir_all(&d).unwrap();
    }
}

/// GRUB as the boot selector (legacy BIOS: no boot variables): the entries are the menu
/// entries of `grub.cfg` in `dir` on the FAT filesystem `esp` (numbered in order), the
/// one-shot is `next_entry` and the default `saved_entry` in `dir/grubenv` (the grub.cfg
/// that [`crate::grubcfg::render`] writes spends the one-shot before trying it), and the
/// current boot is what that entry recorded in [`crate::grubcfg::BOOTED_VAR`]. Labels map
/// to ids by dropping a `reinstall-` prefix: `reinstall-target` is the entry `target`.
pub struct GrubEnv {
    pub esp: PathBuf,
    /// For example `EFI/BOOT`.
    pub dir: String,
}

impl GrubEnv {
    fn file(&self, name: &str) -> String {
        format!("{}/{name}", self.dir)
    }

    fn ids(&self) -> anyhow::Result<Vec<String>> {
        let p = self.file("grub.cfg");
        let cfg = crate::loader::read_esp(&self.esp, &p)?;
        let ids = crate::grubcfg::entry_ids(&String::from_utf8_lossy(&cfg));
        anyhow::ensure!(
            !ids.is_empty(),
            "{}: {p} has no menu entries with ids",
            self.esp.display()
        );
        Ok(ids)
    }

    pub fn env(&self) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
        let p = self.file("grubenv");
        let b = crate::loader::read_esp(&self.esp, &p)?;
        Ok(crate::grubenv::parse(
            &format!("{}: {p}", self.esp.display()),
            &b,
        )?)
    }

    /// Sets one variable in the grubenv, keeping the others.
    pub fn set(&self, var: &str, value: &str) -> anyhow::Result<()> {
        let mut env = self.env()?;
        env.insert(var.to_string(), value.to_string());
        self.write_env(&env)
    }

    fn write_env(&self, env: &std::collections::BTreeMap<String, String>) -> anyhow::Result<()> {
        let p = self.file("grubenv");
        crate::loader::write_esp(&self.esp, &[(&p, &crate::grubenv::render(env)?)])
    }

    /// Removes `vars` from the grubenv, writing it only when one was there. Returns the
    /// values removed (empty ones left out).
    pub fn remove(
        &self,
        vars: &[&str],
    ) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
        let mut env = self.env()?;
        let gone: std::collections::BTreeMap<String, String> = vars
            .iter()
            .filter_map(|v| env.remove(*v).map(|x| (v.to_string(), x)))
            .collect();
        if !gone.is_empty() {
            self.write_env(&env)?;
        }
        Ok(gone.into_iter().filter(|(_, x)| !x.is_empty()).collect())
    }

    fn id(&self, entry: u16) -> anyhow::Result<String> {
        self.ids()?.get(entry as usize).cloned().ok_or_else(|| {
            anyhow::anyhow!(
                "{}: grub.cfg has no entry number {entry}",
                self.esp.display()
            )
        })
    }

    fn number(&self, id: Option<&String>) -> anyhow::Result<Option<u16>> {
        let Some(id) = id.filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        Ok(self.ids()?.iter().position(|i| i == id).map(|n| n as u16))
    }
}

impl BootSelector for GrubEnv {
    fn create_entry(&mut self, label: &str, _esp: &EspRef) -> anyhow::Result<u16> {
        let id = label.strip_prefix("reinstall-").unwrap_or(label);
        let ids = self.ids()?;
        let n = ids.iter().position(|i| i == id).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: {} has no menu entry {id:?} (has: {})",
                self.esp.display(),
                self.file("grub.cfg"),
                ids.join(", ")
            )
        })?;
        Ok(n as u16)
    }

    fn set_next(&mut self, entry: u16) -> anyhow::Result<()> {
        let id = self.id(entry)?;
        self.set("next_entry", &id)
    }

    fn make_default(&mut self, entry: u16) -> anyhow::Result<()> {
        let id = self.id(entry)?;
        self.set("saved_entry", &id)
    }

    fn current(&self) -> anyhow::Result<Option<u16>> {
        self.number(self.env()?.get(crate::grubcfg::BOOTED_VAR))
    }

    fn next(&self) -> anyhow::Result<Option<u16>> {
        self.number(self.env()?.get("next_entry"))
    }
}

#[cfg(test)]
mod grubenv_tests {
    use super::*;
    use crate::grubcfg::{render, Entry};

    #[test]
    fn grub_entries_one_shot_and_default_live_in_the_esp_grubenv() {
        let img = std::env::temp_dir().join(format!("grubenv-sel-{}.img", std::process::id()));
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(40 << 20).unwrap();
        fatfs::format_volume(&f, fatfs::FormatVolumeOptions::new()).unwrap();
        drop(f);
        let entry = |id: &str| Entry {
            id: id.into(),
            title: format!("{id} OS"),
            root_uuid: "0c1a5c1e-1111-2222-3333-444455556666".into(),
            kernel: "/boot/vmlinuz".into(),
            initrd: None,
            args: String::new(),
        };
        let cfg = render(&[entry("target"), entry("rescue")], "rescue", 1);
        let env = crate::grubenv::render(&Default::default()).unwrap();
        crate::loader::write_esp(
            &img,
            &[
                ("EFI/BOOT/grub.cfg", cfg.as_bytes()),
                ("EFI/BOOT/grubenv", &env),
            ],
        )
        .unwrap();
        let mut g = GrubEnv {
            esp: img.clone(),
            dir: "EFI/BOOT".into(),
        };
        let esp = EspRef {
            partition: 2,
            ..Default::default()
        };
        let t = g.create_entry("reinstall-target", &esp).unwrap();
        let r = g.create_entry("reinstall-rescue", &esp).unwrap();
        assert_eq!((t, r), (0, 1));
        let e = g
            .create_entry("reinstall-windows", &esp)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no menu entry \"windows\"") && e.contains("target, rescue, firmware"),
            "{e}"
        );
        assert_eq!(g.next().unwrap(), None);
        assert_eq!(g.current().unwrap(), None);
        g.set_next(t).unwrap();
        g.make_default(r).unwrap();
        assert_eq!(g.next().unwrap(), Some(t));
        let env = g.env().unwrap();
        assert_eq!(env["next_entry"], "target");
        assert_eq!(env["saved_entry"], "rescue");
        assert!(g.set_next(9).is_err());
        g.set("reinstall_tries", "xx").unwrap();
        g.set("reinstall_fell_back", "").unwrap();
        let gone = g.remove(&["reinstall_tries", "reinstall_fell_back", "absent"]);
        assert_eq!(
            gone.unwrap(),
            [("reinstall_tries".into(), "xx".into())].into()
        );
        assert!(g.remove(&["reinstall_tries"]).unwrap().is_empty());
        let env = g.env().unwrap();
        assert!(!env.contains_key("reinstall_tries") && !env.contains_key("reinstall_fell_back"));
        assert_eq!(env["saved_entry"], "rescue", "the others are kept");
        std::fs::remove_file(&img).unwrap();
    }
}
