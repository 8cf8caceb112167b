//! GRUB for legacy BIOS as bootcfg installs it, booted for real: SeaBIOS (QEMU's default
//! firmware) loads boot.img from the MBR, which loads core.img from the BIOS boot partition,
//! which reads grub.cfg and grubenv from the ESP (FAT, written in userspace). What GRUB did
//! is seen from outside: its serial console, and the grubenv it wrote back to the disk.

use bootcfg::select::{BootSelector, EspRef, GrubEnv};
use integration_tests::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A 64 MiB GPT disk image: BIOS boot partition at 1 MiB, an ESP holding `cfg` and `env` in
/// EFI/BOOT, GRUB i386-pc installed by bootcfg.
fn bios_disk(dir: &Path, cfg: &str, env: &BTreeMap<String, String>) -> PathBuf {
    esp_disk(&dir.join("disk.img"), cfg, env, true)
}

/// The same disk at `img`, with GRUB installed or not (`grub`: a second disk whose ESP GRUB
/// only reads). Returns `img`.
fn esp_disk(img: &Path, cfg: &str, env: &BTreeMap<String, String>, grub: bool) -> PathBuf {
    let img = img.to_path_buf();
    sh(&format!(
        "truncate -s 64M {i} && printf 'label: gpt\\nstart=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649, name=bios-boot\\nsize=40M, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=esp\\n' | sfdisk -q {i}",
        i = img.display()
    ));
    with_esp(&img, |dev, esp| {
        agent::mount::mkfs_esp(esp, "ESP", 512)?;
        bootcfg::loader::write_esp(
            esp,
            &[
                ("EFI/BOOT/grub.cfg", cfg.as_bytes()),
                ("EFI/BOOT/grubenv", &bootcfg::grubenv::render(env)?),
            ],
        )?;
        // The early config looks for an ESP that is not there first (disk 1's, while it is
        // being written), then this one.
        let uuid = bootcfg::bios::read_fat32_uuid(esp)?;
        let early = bootcfg::bios::early_config(&["0bad-0bad", &uuid], "EFI/BOOT");
        if grub {
            bootcfg::bios::install(dev, None, 2048, 2048, &early)?;
        }
        Ok(())
    });
    img
}

/// Runs `f` with the image on a loop device (the disk, its ESP node), then detaches it.
fn with_esp<T>(img: &Path, f: impl FnOnce(&Path, &Path) -> anyhow::Result<T>) -> T {
    let dev = sh(&format!("losetup --find --show {}", img.display()))
        .trim()
        .to_string();
    ok(Command::new("partx").args(["-a", &dev]));
    let r = f(Path::new(&dev), Path::new(&format!("{dev}p2")));
    let _ = Command::new("partx").args(["-d", &dev]).output();
    let _ = Command::new("losetup").args(["-d", &dev]).output();
    r.unwrap()
}

/// Boots the image under SeaBIOS until the serial console shows `until` (or 120 s).
fn boot_seabios(img: &Path, until: &str) -> (String, f64) {
    boot_seabios_with(img, &[], until)
}

/// The same with more disks after it (`more`).
fn boot_seabios_with(img: &Path, more: &[&Path], until: &str) -> (String, f64) {
    let serial = img.with_extension("serial.log");
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-m",
            "256",
            "-nodefaults",
        ])
        .args(["-display", "none", "-net", "none"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", img.display()))
        .args(more.iter().flat_map(|m| {
            [
                "-drive".to_string(),
                format!("file={},format=raw,if=virtio", m.display()),
            ]
        }))
        .spawn()
        .unwrap();
    let t = Instant::now();
    let mut log = String::new();
    while t.elapsed() < Duration::from_secs(120) && !log.contains(until) {
        std::thread::sleep(Duration::from_millis(300));
        log = String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default()).into_owned();
        if qemu.try_wait().unwrap().is_some() {
            break;
        }
    }
    let _ = qemu.kill();
    let _ = qemu.wait();
    (log, t.elapsed().as_secs_f64())
}

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A menu entry whose root does not exist here: GRUB records the entry, then fails to find
/// it ("no such device: UUID" on the serial console), which tells what it tried to boot.
fn entry(id: &str, uuid: &str) -> bootcfg::grubcfg::Entry {
    bootcfg::grubcfg::Entry {
        id: id.into(),
        title: format!("{id} OS"),
        root_uuid: uuid.into(),
        kernel: "/boot/vmlinuz".into(),
        initrd: None,
        args: "console=ttyS0".into(),
    }
}

/// The grubenv in EFI/BOOT on the ESP of the disk image `img`.
fn grubenv_of(img: &Path) -> BTreeMap<String, String> {
    with_esp(img, |_, esp| {
        Ok(bootcfg::grubenv::parse(
            "grubenv",
            &bootcfg::loader::read_esp(esp, "EFI/BOOT/grubenv")?,
        )?)
    })
}

#[test]
fn seabios_boots_our_grub_which_reads_and_spends_the_one_shot_on_the_esp() {
    let w = scratch();
    let cfg = "serial --unit=0 --speed=115200\nterminal_output serial\nload_env\n\
               echo \"REINSTALL-BIOS-GRUB next=${next_entry} saved=${saved_entry}\"\n\
               set next_entry=\nsave_env next_entry\necho REINSTALL-BIOS-GRUB-SAVED\nhalt\n";
    let img = bios_disk(
        w.path(),
        cfg,
        &env(&[("next_entry", "target"), ("saved_entry", "rescue")]),
    );
    let (log, secs) = boot_seabios(&img, "REINSTALL-BIOS-GRUB-SAVED");
    assert!(
        log.contains("REINSTALL-BIOS-GRUB next=target saved=rescue"),
        "GRUB did not read the ESP's grubenv (serial console):\n{log}"
    );
    assert!(log.contains("REINSTALL-BIOS-GRUB-SAVED"), "{log}");
    eprintln!("SeaBIOS → boot.img → core.img → grub.cfg on the ESP in {secs:.1}s");
    // The one-shot was spent on the disk, by GRUB itself.
    let env = grubenv_of(&img);
    assert_eq!(env.get("next_entry").map(String::as_str).unwrap_or(""), "");
    assert_eq!(env.get("saved_entry").map(String::as_str), Some("rescue"));
}

/// The boot selector for BIOS machines against the real GRUB and the grub.cfg bootcfg
/// renders: the one-shot set through the trait is what GRUB boots (once), and what booted is
/// read back through the trait as the current entry.
#[test]
fn the_grub_boot_selector_one_shot_is_what_real_grub_boots_and_reports() {
    let w = scratch();
    let cfg = bootcfg::grubcfg::render(
        &[
            entry("target", "11111111-2222-3333-4444-555555555555"),
            entry("rescue", "66666666-7777-8888-9999-000000000000"),
        ],
        "rescue",
        0,
    );
    let img = bios_disk(w.path(), &cfg, &BTreeMap::new());
    let esp_ref = EspRef {
        partition: 2,
        ..Default::default()
    };
    let target = with_esp(&img, |_, esp| {
        let mut g = GrubEnv {
            esp: esp.to_path_buf(),
            dir: "EFI/BOOT".into(),
        };
        let t = g.create_entry("reinstall-target", &esp_ref)?;
        let r = g.create_entry("reinstall-rescue", &esp_ref)?;
        g.make_default(r)?;
        g.set_next(t)?;
        Ok(t)
    });
    let (log, _) = boot_seabios(&img, "11111111-2222-3333-4444-555555555555");
    assert!(
        log.contains("no such device: 11111111-2222-3333-4444-555555555555"),
        "GRUB did not try the one-shot entry (serial console):\n{log}"
    );
    let (current, next) = with_esp(&img, |_, esp| {
        let g = GrubEnv {
            esp: esp.to_path_buf(),
            dir: "EFI/BOOT".into(),
        };
        Ok((g.current()?, g.next()?))
    });
    assert_eq!(current, Some(target), "what GRUB booted, through the trait");
    assert_eq!(next, None, "GRUB spends the one-shot before trying it");
    // The next power cycle: the default.
    let (log, _) = boot_seabios(&img, "66666666-7777-8888-9999-000000000000");
    assert!(
        log.contains("no such device: 66666666-7777-8888-9999-000000000000"),
        "after the one-shot GRUB did not return to the default (serial console):\n{log}"
    );
}

/// A second job on a BIOS machine: disk 1 still boots the old target through our GRUB, and its
/// rescue entry names the old rescue root, which stage-rescue has reformatted. The grubenv
/// sends that entry to the new rescue ESP on disk 2 by its FAT volume id: real GRUB follows it
/// for the one-shot (into that ESP's own grub.cfg and its rescue root), and the next power
/// cycle is the default again.
#[test]
fn a_rescue_entry_sent_to_the_new_rescue_esp_boots_through_it() {
    let w = scratch();
    const OLD_TARGET: &str = "11111111-2222-3333-4444-555555555555";
    const OLD_RESCUE: &str = "66666666-7777-8888-9999-000000000000";
    const NEW_RESCUE: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
    let disk2 = esp_disk(
        &w.path().join("disk2.img"),
        &bootcfg::grubcfg::render(&[entry("rescue", NEW_RESCUE)], "rescue", 0),
        &BTreeMap::new(),
        false,
    );
    let esp2 = with_esp(&disk2, |_, esp| bootcfg::bios::read_fat32_uuid(esp));
    let var = bootcfg::grubcfg::redirect_var("rescue");
    let cfg = bootcfg::grubcfg::render(
        &[entry("target", OLD_TARGET), entry("rescue", OLD_RESCUE)],
        "rescue",
        0,
    );
    let disk1 = bios_disk(
        w.path(),
        &cfg,
        &env(&[
            ("saved_entry", "target"),
            ("next_entry", "rescue"),
            (&var, &esp2),
        ]),
    );
    let (log, _) = boot_seabios_with(&disk1, &[&disk2], NEW_RESCUE);
    assert!(
        log.contains(&format!("no such device: {NEW_RESCUE}")),
        "GRUB did not follow the rescue entry to the new rescue ESP (serial console):\n{log}"
    );
    assert!(!log.contains(OLD_RESCUE), "{log}");
    let (env1, env2) = (grubenv_of(&disk1), grubenv_of(&disk2));
    let get = |e: &BTreeMap<String, String>, k: &str| e.get(k).cloned().unwrap_or_default();
    assert_eq!(get(&env1, "next_entry"), "", "the one-shot is spent");
    assert_eq!(
        get(&env1, &var),
        esp2,
        "the redirect stays for the next one-shot"
    );
    assert_eq!(get(&env1, "reinstall_booted"), "rescue");
    assert_eq!(get(&env2, "reinstall_booted"), "rescue", "{env2:?}");
    // The next power cycle: disk 1's default, the old target.
    let (log, _) = boot_seabios_with(&disk1, &[&disk2], OLD_TARGET);
    assert!(
        log.contains(&format!("no such device: {OLD_TARGET}")),
        "after the one-shot GRUB did not return to the default (serial console):\n{log}"
    );
}

/// install-target on a BIOS machine writes GRUB with the new table (`write_gpt_with`), GRUB
/// built beforehand: right after that one call, with nothing else written, the disk boots
/// into GRUB's core (its early config speaks on the serial console). Its sector 0 holds
/// boot.img's code and the same protective MBR gptman writes without it.
#[test]
fn the_new_table_and_grub_land_together_and_boot_at_once() {
    use agent::disk::{self, Locked};
    let w = scratch();
    let img = w.path().join("disk.img");
    // The old disk: a DOS table and boot code that are not GRUB's.
    sh(&format!(
        "truncate -s 1G {i} && printf 'label: dos\\nstart=2048, type=83\\n' | sfdisk -q {i} && printf 'OLD-BOOT-CODE' | dd of={i} conv=notrunc status=none",
        i = img.display()
    ));
    let d = attach(&img, 512);
    let dev = d.0.clone();
    let id = disk::identify(Path::new(&dev)).unwrap();
    let layout = disk::linux_target_layout(id.size_bytes, 512, true).unwrap();
    let bios = &layout.parts[0];
    let early = "serial --unit=0 --speed=115200\nterminal_output serial\necho REINSTALL-CORE-UP\nsearch.fs_uuid 0bad-0bad root\n";
    let grub = bootcfg::bios::prepare(
        Path::new(&dev),
        None,
        bios.first_lba,
        bios.bytes(512) / 512,
        early,
    )
    .unwrap();
    Locked::open(&id)
        .unwrap()
        .write_gpt_with(&layout, Some(&grub))
        .unwrap();
    drop(d);
    let mut s0 = vec![0u8; 512];
    std::io::Read::read_exact(&mut std::fs::File::open(&img).unwrap(), &mut s0).unwrap();
    assert_eq!(
        s0[446..],
        disk::protective_mbr(layout.total_sectors)[446..],
        "the protective MBR as gptman writes it"
    );
    assert_eq!(s0[0x68..0x1b8], grub.boot[0x68..0x1b8], "boot.img's code");
    let (log, secs) = boot_seabios(&img, "REINSTALL-CORE-UP");
    assert!(
        log.contains("REINSTALL-CORE-UP"),
        "GRUB's core did not start from the disk as write_gpt_with left it:\n{log}"
    );
    eprintln!("SeaBIOS → GRUB core from the new table's write alone in {secs:.1}s");
}

/// After a job, disk 1's GRUB boots the target as its saved default, counting each boot in
/// the grubenv until the target's agent takes the count back. A target that never gets that
/// far (a kernel that panics on every boot) is booted `SAVED_TRIES` times; the next boot is the
/// rescue OS (the config's default), with the target named for it to report, and the count
/// starts again. Real GRUB, the grub.cfg bootcfg renders, the entries' roots absent (what
/// GRUB tried is on its serial console).
#[test]
fn grub_gives_up_on_a_saved_target_that_never_comes_up_and_boots_the_rescue() {
    use bootcfg::grubcfg::{FELL_BACK_VAR, SAVED_TRIES, TRIES_VAR};
    let w = scratch();
    const TARGET: &str = "11111111-2222-3333-4444-555555555555";
    const RESCUE: &str = "66666666-7777-8888-9999-000000000000";
    let cfg = bootcfg::grubcfg::render(
        &[entry("target", TARGET), entry("rescue", RESCUE)],
        "rescue",
        0,
    );
    let img = bios_disk(w.path(), &cfg, &env(&[("saved_entry", "target")]));
    let get = |k: &str| grubenv_of(&img).get(k).cloned().unwrap_or_default();
    let boots = |want: &str, not: &str, when: &str| {
        let (log, _) = boot_seabios(&img, &format!("no such device: {want}"));
        assert!(
            log.contains(&format!("no such device: {want}")) && !log.contains(not),
            "{when}: GRUB did not boot {want} first (serial console):\n{log}"
        );
    };
    for n in 1..=SAVED_TRIES {
        boots(TARGET, RESCUE, &format!("boot {n}"));
        assert_eq!(get(TRIES_VAR), "x".repeat(n), "boot {n} is counted");
    }
    boots(RESCUE, TARGET, "after the tries");
    assert_eq!(get(FELL_BACK_VAR), "target", "the rescue OS is told why");
    assert_eq!(get(TRIES_VAR), "", "the count starts again");
    assert_eq!(get("saved_entry"), "target", "the target stays the default");
    // A reboot from the rescue tries the target again; once up, its agent takes the count
    // back (what `Agent::boot_checks` does in the target), and the next boot is counted
    // from nothing.
    boots(TARGET, RESCUE, "a reboot from the rescue");
    assert_eq!(get(TRIES_VAR), "x");
    with_esp(&img, |_, esp| {
        GrubEnv {
            esp: esp.to_path_buf(),
            dir: "EFI/BOOT".into(),
        }
        .remove(&[TRIES_VAR, FELL_BACK_VAR])
    });
    boots(TARGET, RESCUE, "after the target came up");
    assert_eq!(get(TRIES_VAR), "x", "a boot that came up is not counted");
}
