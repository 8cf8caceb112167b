//! `grub.cfg` for a rescue or Linux target tree: the root filesystem by UUID, the kernel and
//! initrd found in the tree, console options passed through, and the one-shot logic
//! (`next_entry` consumed once, `saved_entry` the default) that makes a failed boot fall back.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("no kernel in {0}: looked for boot/vmlinuz-* (and vmlinuz)")]
    NoKernel(String),
}

/// One menu entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The entry's id (what `next_entry`/`saved_entry` name) and title.
    pub id: String,
    pub title: String,
    pub root_uuid: String,
    /// Paths inside that filesystem: `/boot/vmlinuz-6.1.0-28-amd64`.
    pub kernel: String,
    pub initrd: Option<String>,
    /// Extra kernel arguments, e.g. `console=ttyS0,115200`.
    pub args: String,
}

/// The newest kernel (by version-aware name order) in `tree/boot`, and its initrd.
pub fn find_kernel(tree: &Path) -> Result<(String, Option<String>), Error> {
    let boot = tree.join("boot");
    let mut kernels: Vec<String> = std::fs::read_dir(&boot)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().map(String::from))
                .filter(|n| n.starts_with("vmlinuz-") || n == "vmlinuz")
                .collect()
        })
        .unwrap_or_default();
    kernels.sort_by(|a, b| version_cmp(a, b));
    let k = kernels
        .pop()
        .ok_or_else(|| Error::NoKernel(tree.display().to_string()))?;
    let suffix = k.strip_prefix("vmlinuz").unwrap_or("");
    let initrd = [
        format!("initrd.img{suffix}"),
        format!("initramfs{suffix}.img"),
    ]
    .into_iter()
    .find(|i| boot.join(i).exists())
    .map(|i| format!("/boot/{i}"));
    Ok((format!("/boot/{k}"), initrd))
}

/// Compares names with embedded numbers numerically: `vmlinuz-6.10` after `vmlinuz-6.9`.
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<(bool, String)> {
        let mut v: Vec<(bool, String)> = Vec::new();
        for c in s.chars() {
            let d = c.is_ascii_digit();
            match v.last_mut() {
                Some((ld, t)) if *ld == d => t.push(c),
                _ => v.push((d, c.to_string())),
            }
        }
        v
    }
    let (pa, pb) = (parts(a), parts(b));
    for (x, y) in pa.iter().zip(&pb) {
        let o = match (x.0, y.0) {
            (true, true) => {
                x.1.parse::<u64>()
                    .unwrap_or(0)
                    .cmp(&y.1.parse::<u64>().unwrap_or(0))
            }
            _ => x.1.cmp(&y.1),
        };
        if o != std::cmp::Ordering::Equal {
            return o;
        }
    }
    pa.len().cmp(&pb.len())
}

/// Renders grub.cfg. `default` is the entry booted when no one-shot is pending and no entry
/// was saved.
pub fn render(entries: &[Entry], default: &str, timeout_secs: u32) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Written by reinstall (bootcfg). One-shot boots: grub-editenv - set next_entry=ID"
    );
    let _ = writeln!(s, "set timeout={timeout_secs}");
    let _ = writeln!(s, "insmod part_gpt\ninsmod ext2\ninsmod search_fs_uuid");
    // BIOS GRUB writes to the VGA console only; UEFI firmware mirrors its console already.
    let _ = writeln!(
        s,
        "if [ \"${{grub_platform}}\" = \"pc\" ]; then\n  serial --unit=0 --speed=115200\n  terminal_input serial console\n  terminal_output serial console\nfi"
    );
    // An entry that cannot boot (its root or kernel gone) falls back to the other entries in
    // order, the firmware last (UEFI: `exit`; OVMF then shows its boot manager, other
    // firmware moves on to the next boot option), instead of waiting in GRUB's menu where
    // nobody sees it. On disk 1 that is: the target fails, the rescue on disk 2 boots.
    // (GRUB 2.06 takes `fallback` as entry numbers only.)
    let fallback: Vec<String> = (0..=entries.len()).map(|n| n.to_string()).collect();
    let _ = writeln!(s, "set fallback=\"{}\"", fallback.join(" "));
    let _ = writeln!(s, "if [ -s $prefix/grubenv ]; then\n  load_env\nfi");
    // A pending one-shot is cleared before it is tried: if that boot fails, the next one
    // falls back to the saved (last good) entry.
    // A saved entry other than `default` (disk 1's target, made default once it called
    // home) is counted: each boot of it adds a try, and the OS it boots takes them back once
    // it is up ([`TRIES_VAR`], cleared by the agent). After [`SAVED_TRIES`] boots that never
    // got that far (a kernel that panics on every boot, an init that does not start), the next
    // boot is `default` (the rescue OS), with the entry that failed in [`FELL_BACK_VAR`] for
    // it to report, and the count starts again: a reboot from there tries the saved entry.
    // GRUB has no arithmetic: the count is a string of `x`s.
    let full = "x".repeat(SAVED_TRIES);
    let _ = writeln!(
        s,
        "if [ \"${{next_entry}}\" ]; then\n  set default=\"${{next_entry}}\"\n  set next_entry=\n  save_env next_entry\nelif [ \"${{saved_entry}}\" ]; then\n  set default=\"${{saved_entry}}\"\n  if [ \"${{saved_entry}}\" != \"{default}\" ]; then\n    if [ \"${{{TRIES_VAR}}}\" = \"{full}\" ]; then\n      set {FELL_BACK_VAR}=\"${{saved_entry}}\"\n      set {TRIES_VAR}=\n      save_env {FELL_BACK_VAR} {TRIES_VAR}\n      set default=\"{default}\"\n    else\n      set {TRIES_VAR}=\"${{{TRIES_VAR}}}x\"\n      save_env {TRIES_VAR}\n    fi\n  fi\nelse\n  set default=\"{default}\"\nfi"
    );
    for e in entries {
        let _ = writeln!(
            s,
            "\nmenuentry '{}' --id '{}' {{",
            e.title.replace('\'', ""),
            e.id
        );
        // What booted, for the boot selector on machines without BootCurrent (BIOS).
        let _ = writeln!(
            s,
            "  set {BOOTED_VAR}=\"{}\"\n  save_env {BOOTED_VAR}",
            e.id
        );
        // Sent elsewhere: an entry whose OS was rewritten since this file was (a second job's
        // new rescue OS on disk 2, while disk 1 still boots the old target through this GRUB)
        // boots through that OS's own ESP and grub.cfg instead, named by its FAT volume id in
        // the grubenv. Cleared first, so that config's own entry does not come back here.
        let var = redirect_var(&e.id);
        let _ = writeln!(
            s,
            "  if [ \"${{{var}}}\" ]; then\n    set reinstall_esp=\"${{{var}}}\"\n    set {var}=\n    if search --no-floppy --fs-uuid --set=root ${{reinstall_esp}}; then\n      set prefix=($root)/{REDIRECT_DIR}\n      configfile $prefix/grub.cfg\n    fi\n  fi"
        );
        let _ = writeln!(
            s,
            "  search --no-floppy --fs-uuid --set=root {}",
            e.root_uuid
        );
        // The kernel the OS itself names as its newest (`/vmlinuz` and `/initrd.img`, the
        // symlinks Debian and Ubuntu keep pointing at the kernel installed last): a kernel
        // update in the OS is booted without this file being rewritten, and the kernel that
        // was found when it was written can be removed. Without them, that kernel.
        let linux = |k: &str| format!("linux {k} root=UUID={} ro {}", e.root_uuid, e.args);
        let (test, own, found) = match &e.initrd {
            Some(i) => (
                format!("[ -f {OWN_KERNEL} -a -f {OWN_INITRD} ]"),
                format!("{}\n    initrd {OWN_INITRD}", linux(OWN_KERNEL)),
                format!("{}\n    initrd {i}", linux(&e.kernel)),
            ),
            None => (
                format!("[ -f {OWN_KERNEL} ]"),
                linux(OWN_KERNEL),
                linux(&e.kernel),
            ),
        };
        let _ = writeln!(
            s,
            "  if {test}; then\n    {own}\n  else\n    {found}\n  fi\n}}"
        );
    }
    let _ = writeln!(
        s,
        "\nmenuentry 'firmware' --id '{FIRMWARE_ID}' {{\n  exit\n}}"
    );
    s
}

/// The grubenv variable that sends entry `id` to another ESP's grub.cfg (its FAT volume id,
/// `XXXX-XXXX`); see [`render`].
pub fn redirect_var(id: &str) -> String {
    format!(
        "reinstall_esp_{}",
        id.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    )
}

/// Whether `cfg` (a grub.cfg) lets entry `id` be sent elsewhere by [`redirect_var`]: what
/// [`render`] writes now; a file written before it could, cannot.
pub fn can_redirect(cfg: &str, id: &str) -> bool {
    cfg.contains(&format!("${{{}}}", redirect_var(id)))
}

/// Where the grub.cfg of an ESP an entry is sent to lives (the removable path's directory,
/// which every ESP of ours has, and where BIOS GRUB reads its config).
pub const REDIRECT_DIR: &str = "EFI/BOOT";

/// The symlinks to the newest kernel and initrd that Debian-family OSes keep in their root
/// (`linux-update-symlinks`); an entry boots them when both are there.
pub const OWN_KERNEL: &str = "/vmlinuz";
pub const OWN_INITRD: &str = "/initrd.img";

/// How many boots of a saved (non-default) entry may end before its OS takes them back, the
/// next boot being the default entry; see [`render`].
pub const SAVED_TRIES: usize = 2;
/// The grubenv variable counting boots of the saved entry that its OS has not taken back
/// (`x`, `xx`): the OS clears it once it is up.
pub const TRIES_VAR: &str = "reinstall_tries";
/// The grubenv variable GRUB sets to the saved entry it gave up on, booting the default.
pub const FELL_BACK_VAR: &str = "reinstall_fell_back";

/// The grubenv variable each entry sets (and saves) to the id of the entry it boots.
pub const BOOTED_VAR: &str = "reinstall_booted";
/// The id of the last entry: back to the firmware (UEFI: the next boot option).
pub const FIRMWARE_ID: &str = "firmware";

/// The menu entry ids of a grub.cfg, in order (`menuentry '...' --id 'ID'`).
pub fn entry_ids(cfg: &str) -> Vec<String> {
    cfg.lines()
        .filter(|l| l.trim_start().starts_with("menuentry "))
        .filter_map(|l| l.split_once("--id '").map(|(_, r)| r))
        .filter_map(|r| r.split_once('\'').map(|(id, _)| id.to_string()))
        .collect()
}

/// Where grub.cfg goes inside an ESP or /boot/grub.
pub fn config_path(root: &Path) -> PathBuf {
    root.join("boot/grub/grub.cfg")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_newest_kernel_and_its_initrd() {
        let d = std::env::temp_dir().join(format!("grubcfg-{}", std::process::id()));
        std::fs::create_dir_all(d.join("boot")).unwrap();
        for f in [
            "vmlinuz-6.9.0-1-amd64",
            "vmlinuz-6.10.0-1-amd64",
            "initrd.img-6.10.0-1-amd64",
            "config-6.10.0-1-amd64",
        ] {
            std::fs::write(d.join("boot").join(f), "").unwrap();
        }
        let (k, i) = find_kernel(&d).unwrap();
        assert_eq!(k, "/boot/vmlinuz-6.10.0-1-amd64");
        assert_eq!(i.as_deref(), Some("/boot/initrd.img-6.10.0-1-amd64"));
        std::fs::remove_dir_all(&d).unwrap();
        let e = find_kernel(Path::new("/nonexistent-tree")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent-tree"));
    }

    #[test]
    fn renders_entries_by_uuid_with_the_one_shot_fallback() {
        let e = Entry {
            id: "rescue".into(),
            title: "reinstall rescue".into(),
            root_uuid: "0c1a5c1e-1111-2222-3333-444455556666".into(),
            kernel: "/boot/vmlinuz-6.1.0-28-amd64".into(),
            initrd: Some("/boot/initrd.img-6.1.0-28-amd64".into()),
            args: "console=ttyS0,115200".into(),
        };
        let cfg = render(&[e], "rescue", 1);
        for want in [
            "search --no-floppy --fs-uuid --set=root 0c1a5c1e-1111-2222-3333-444455556666",
            "  if [ -f /vmlinuz -a -f /initrd.img ]; then\n    linux /vmlinuz root=UUID=0c1a5c1e-1111-2222-3333-444455556666 ro console=ttyS0,115200\n    initrd /initrd.img\n  else",
            "    linux /boot/vmlinuz-6.1.0-28-amd64 root=UUID=0c1a5c1e-1111-2222-3333-444455556666 ro console=ttyS0,115200\n    initrd /boot/initrd.img-6.1.0-28-amd64\n  fi",
            "set next_entry=\n  save_env next_entry",
            "menuentry 'reinstall rescue' --id 'rescue'",
            "set reinstall_booted=\"rescue\"\n  save_env reinstall_booted",
            "set fallback=\"0 1\"",
            "terminal_output serial console",
            "  if [ \"${reinstall_esp_rescue}\" ]; then",
            "configfile $prefix/grub.cfg",
            // A saved entry other than the default is counted, and given up on.
            "  if [ \"${saved_entry}\" != \"rescue\" ]; then",
            "    if [ \"${reinstall_tries}\" = \"xx\" ]; then",
            "      save_env reinstall_fell_back reinstall_tries\n      set default=\"rescue\"",
            "      set reinstall_tries=\"${reinstall_tries}x\"\n      save_env reinstall_tries",
        ] {
            assert!(cfg.contains(want), "{want:?} missing from:\n{cfg}");
        }
        assert_eq!(entry_ids(&cfg), ["rescue", "firmware"]);
        assert!(can_redirect(&cfg, "rescue") && !can_redirect(&cfg, "target"));
    }
}
