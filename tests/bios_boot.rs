//! GRUB for legacy BIOS as bootcfg installs it, booted for real: SeaBIOS (QEMU's default
//! firmware) loads boot.img from the MBR, which loads core.img from the BIOS boot partition,
//! which reads grub.cfg and grubenv from the ESP (FAT, written in userspace). The grub.cfg
//! prints what it found on the serial console and consumes the one-shot `next_entry`, as
//! the migration's does: the test sees both, from outside.

use integration_tests::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn seabios_boots_our_grub_which_reads_and_spends_the_one_shot_on_the_esp() {
    let w = scratch();
    let img = w.path().join("disk.img");
    sh(&format!(
        "truncate -s 64M {i} && printf 'label: gpt\\nstart=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649, name=bios-boot\\nsize=40M, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=esp\\n' | sfdisk -q {i}",
        i = img.display()
    ));
    let dev = sh(&format!("losetup --find --show {}", img.display()))
        .trim()
        .to_string();
    let esp = format!("{dev}p2");
    let result = (|| -> anyhow::Result<()> {
        ok(Command::new("partx").args(["-a", &dev]));
        agent::mount::mkfs_esp(Path::new(&esp), "ESP", 512)?;
        let cfg = "serial --unit=0 --speed=115200\nterminal_output serial\nload_env\n\
                   echo \"REINSTALL-BIOS-GRUB next=${next_entry} saved=${saved_entry}\"\n\
                   set next_entry=\nsave_env next_entry\necho REINSTALL-BIOS-GRUB-SAVED\nhalt\n";
        let mut env = std::collections::BTreeMap::new();
        env.insert("next_entry".to_string(), "target".to_string());
        env.insert("saved_entry".to_string(), "rescue".to_string());
        bootcfg::loader::write_esp(
            Path::new(&esp),
            &[
                ("EFI/BOOT/grub.cfg", cfg.as_bytes()),
                ("EFI/BOOT/grubenv", &bootcfg::grubenv::render(&env)?),
            ],
        )?;
        bootcfg::bios::install(Path::new(&dev), 2048, 2048, "(hd0,gpt2)/EFI/BOOT")?;
        Ok(())
    })();
    let _ = Command::new("partx").args(["-d", &dev]).output();
    let _ = Command::new("losetup").args(["-d", &dev]).output();
    result.unwrap();

    let serial = w.path().join("serial.log");
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
        .spawn()
        .unwrap();
    let t = Instant::now();
    let mut log = String::new();
    while t.elapsed() < Duration::from_secs(120) && !log.contains("REINSTALL-BIOS-GRUB-SAVED") {
        std::thread::sleep(Duration::from_millis(500));
        log = String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default()).into_owned();
        if qemu.try_wait().unwrap().is_some() {
            break;
        }
    }
    let _ = qemu.kill();
    let _ = qemu.wait();
    assert!(
        log.contains("REINSTALL-BIOS-GRUB next=target saved=rescue"),
        "GRUB did not read the ESP's grubenv (serial console):\n{log}"
    );
    assert!(log.contains("REINSTALL-BIOS-GRUB-SAVED"), "{log}");
    eprintln!(
        "SeaBIOS → boot.img → core.img → grub.cfg on the ESP in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    // The one-shot was spent on the disk, by GRUB itself.
    let dev = sh(&format!("losetup --find --show {}", img.display()))
        .trim()
        .to_string();
    ok(Command::new("partx").args(["-a", &dev]));
    let env = bootcfg::loader::read_esp(Path::new(&format!("{dev}p2")), "EFI/BOOT/grubenv");
    let _ = Command::new("partx").args(["-d", &dev]).output();
    let _ = Command::new("losetup").args(["-d", &dev]).output();
    let env = bootcfg::grubenv::parse("grubenv", &env.unwrap()).unwrap();
    assert_eq!(env.get("next_entry").map(String::as_str).unwrap_or(""), "");
    assert_eq!(env.get("saved_entry").map(String::as_str), Some("rescue"));
}
