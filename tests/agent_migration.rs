//! The whole migration on two loop-device disks: a real stager on 127.0.0.1 over mTLS, the
//! real agent, fake firmware (a JSON file) and simulated reboots. The harness boots what the
//! fake firmware says (BootNext once, else the first of BootOrder), mounts that OS's root and
//! runs the agent in it. Before every boot and after every agent exit it checks the
//! invariant: what the firmware will boot next is a complete, verified OS.
//! Then the agent is killed at every failpoint in turn (as SIGKILL would; systemd restarts it)
//! and must still complete.

use agent::bootsel::{FakeEntry, FakeFirmware, FakeState};
use agent::disk::{self, Locked};
use bootcfg::grubcfg::{FELL_BACK_VAR, SAVED_TRIES, TRIES_VAR};
use integration_tests::stager::Stager;
use integration_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn loopdev(img: &Path, size: &str, sector: u32) -> LoopDev {
    sh(&format!("truncate -s {size} {}", img.display()));
    attach(img, sector)
}

/// The device node of the partition named `name` on `disk` (sfdisk's view).
fn part_named(disk: &str, name: &str) -> String {
    let out = run(Command::new("sfdisk").args(["--json", disk]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["partitiontable"]["partitions"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .and_then(|p| p["node"].as_str())
        .map(String::from)
        .unwrap_or_else(|| format!("{disk}-has-no-partition-named-{name}"))
}

struct Mount(PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        umount(&self.0);
    }
}

fn mount(dev: &str, at: &Path, ro: bool) -> Mount {
    std::fs::create_dir_all(at).unwrap();
    let mut c = Command::new("mount");
    if ro {
        c.args(["-o", "ro"]);
    }
    ok(c.arg(dev).arg(at));
    Mount(at.to_path_buf())
}

/// An NTFS volume (or image) mounted with ntfs-3g, unmounted when the guard drops (also when
/// an assertion fails first).
fn ntfs3g(dev: &str, at: &Path, ro: bool) -> Mount {
    std::fs::create_dir_all(at).unwrap();
    let mut c = Command::new("ntfs-3g");
    c.arg(dev).arg(at);
    if ro {
        c.args(["-o", "ro"]);
    }
    ok(&mut c);
    Mount(at.to_path_buf())
}

/// An OS tree the agent can be injected into: systemd-networkd present, a passwd.
fn os_tree(dir: &Path, marker: &str) {
    for d in ["etc", "lib/systemd/system", "usr/bin", "boot"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    // A kernel and initrd for the boot loader configuration to name (not bootable here).
    std::fs::write(dir.join("boot/vmlinuz-6.1.0-99-amd64"), marker).unwrap();
    std::fs::write(dir.join("boot/initrd.img-6.1.0-99-amd64"), marker).unwrap();
    std::fs::write(
        dir.join("lib/systemd/system/systemd-networkd.service"),
        "[Unit]\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0::/root:/bin/sh\nalice:x:1500:1500::/home/alice:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(dir.join("etc/os-marker"), marker).unwrap();
    sh(&format!(
        "head -c 2000000 /dev/urandom > {}/usr/bin/payload",
        dir.display()
    ));
}

/// What an [`Env`] is made of.
#[derive(Clone, Copy)]
struct Spec {
    /// Logical sector size of both disks.
    sector: u32,
    /// Sizes of the two loop disks (`truncate -s`).
    disk1: &'static str,
    disk2: &'static str,
    /// A sparse file of this many bytes in the target (zeros: cheap to pack, full size to
    /// unpack).
    target_extra: u64,
    /// Rescue and target trees that really boot (a Debian kernel, a small initramfs, an init
    /// that prints a marker), from `scripts/make-vm-rescue-tree`.
    bootable: bool,
    /// The target is Windows, built from synthetic media (`scripts/make-windows-media`, image
    /// "Test Server").
    windows: bool,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            sector: 512,
            disk1: "3G",
            disk2: "4G",
            target_extra: 0,
            bootable: false,
            windows: false,
        }
    }
}

struct Env {
    w: tempfile::TempDir,
    stager: Stager,
    disk1: LoopDev,
    disk2: LoopDev,
    fw: PathBuf,
    /// When set, the agent writes real UEFI variables (bootcfg's efivarfs implementation)
    /// into this stand-in directory instead of the fake firmware file.
    efivars: Option<PathBuf>,
}

impl Env {
    fn new() -> Env {
        Self::build(Spec::default())
    }

    fn build(spec: Spec) -> Env {
        let Spec {
            sector,
            disk1: disk1_size,
            disk2: disk2_size,
            target_extra,
            bootable,
            windows,
        } = spec;
        let w = scratch();
        let p = w.path();
        let (rescue, target) = (p.join("rescue-tree"), p.join("target-tree"));
        if windows {
            os_tree(&rescue, "rescue");
            // What a rescue OS needs to install Windows (the agent runs the host's here; it
            // checks the rescue tree has them).
            std::fs::create_dir_all(rescue.join("usr/sbin")).unwrap();
            for (tool, _) in agent::windows::RESCUE_TOOLS {
                std::fs::write(rescue.join("usr/bin").join(tool), "").unwrap();
            }
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-windows-media");
            ok(Command::new(&script).arg(&target));
        } else if bootable {
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-vm-rescue-tree");
            for (tree, marker) in [
                (&rescue, "REINSTALL-RESCUE-BOOTED"),
                (&target, "REINSTALL-TARGET-BOOTED"),
            ] {
                ok(Command::new(&script).arg(tree).arg(marker));
                std::fs::write(tree.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
                std::fs::write(tree.join("etc/os-marker"), marker).unwrap();
            }
        } else {
            os_tree(&rescue, "rescue");
            os_tree(&target, "target");
        }
        if target_extra > 0 {
            sh(&format!(
                "truncate -s {target_extra} {}/usr/bin/large",
                target.display()
            ));
        }
        // The target uses NetworkManager (it has systemd-networkd too, as Fedora does): its
        // network identity must be written as NetworkManager keyfiles.
        let mut stager = if windows {
            Stager::with_bundles(
                p,
                &rescue,
                &target,
                &["--os", "windows", "--image", "Test Server"],
            )
        } else {
            std::fs::create_dir_all(target.join("usr/sbin")).unwrap();
            std::fs::write(target.join("usr/sbin/NetworkManager"), "").unwrap();
            Stager::with_rescue(p, &rescue, &target)
        };
        stager.start();
        let disk1 = loopdev(&p.join("disk1.img"), disk1_size, sector);
        let disk2 = loopdev(&p.join("disk2.img"), disk2_size, sector);
        // The source OS on disk 1: ESP + root, with the identity to carry.
        let id1 = disk::identify(Path::new(&disk1.0)).unwrap();
        let layout = disk::linux_target_layout(id1.size_bytes, id1.logical_sector, false).unwrap();
        let parts = Locked::open(&id1).unwrap().write_gpt(&layout).unwrap();
        // As the agent does: udev re-reads the table when the writer closes the disk.
        disk::settle(Path::new(&disk1.0), &parts).unwrap();
        ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&parts[1]));
        let src = p.join("mnt-source");
        {
            let _m = mount(&parts[1].display().to_string(), &src, false);
            os_tree(&src, "source");
            sh(&format!(
                "cd {s} && mkdir -p etc/ssh root/.ssh home/alice/.ssh etc/reinstall &&
                 head -c 400 /dev/urandom > etc/ssh/ssh_host_ed25519_key && chmod 600 etc/ssh/ssh_host_ed25519_key &&
                 echo 'ssh-ed25519 AAAAhost' > etc/ssh/ssh_host_ed25519_key.pub &&
                 echo 'ssh-ed25519 AAAAroot ops' > root/.ssh/authorized_keys &&
                 echo 'ssh-ed25519 AAAAalice' > home/alice/.ssh/authorized_keys && chown -R 1500:1500 home/alice &&
                 echo web1 > etc/hostname && echo 0123456789abcdef0123456789abcdef > etc/machine-id &&
                 cp {id} etc/reinstall/identity.toml && chmod 600 etc/reinstall/identity.toml &&
                 mkdir -p {e} && cp -a --parents etc/ssh root/.ssh etc/reinstall etc/hostname {e}/",
                s = src.display(),
                id = stager.identity("web1").display(),
                e = p.join("carry-expect").display()
            ));
        }
        let fw = p.join("firmware.json");
        let state = FakeState {
            entries: vec![FakeEntry {
                number: 0,
                label: "source".into(),
                esp: None,
            }],
            boot_order: vec![0],
            boot_next: None,
            current: Some(0),
            log: vec![],
        };
        FakeFirmware::new(&fw).save(&state).unwrap();
        Env {
            w,
            stager,
            disk1,
            disk2,
            fw,
            efivars: None,
        }
    }

    /// Switches to UEFI variables in a stand-in efivarfs directory, holding one firmware
    /// entry for the source OS.
    fn use_efivars(&mut self) {
        use bootcfg::efi;
        let dir = self.w.path().join("efivars");
        std::fs::create_dir_all(&dir).unwrap();
        let v = bootcfg::select::Efivarfs { dir: dir.clone() };
        let src = efi::LoadOption {
            attributes: 1,
            description: "source".into(),
            path: vec![],
            optional_data: vec![],
        };
        v.write("Boot0000", &src.encode().unwrap()).unwrap();
        v.write("BootOrder", &efi::encode_u16_list(&[0])).unwrap();
        v.write("BootCurrent", &efi::encode_u16_list(&[0])).unwrap();
        self.efivars = Some(dir);
    }

    fn efi(&self) -> Option<bootcfg::select::Efivarfs> {
        self.efivars
            .clone()
            .map(|dir| bootcfg::select::Efivarfs { dir })
    }

    fn label_of(&self, n: u16) -> String {
        match self.efi() {
            Some(v) => {
                v.entries()
                    .unwrap()
                    .into_iter()
                    .find(|(e, _)| *e == n)
                    .unwrap()
                    .1
                    .description
            }
            None => {
                let s = FakeFirmware::new(&self.fw).load().unwrap();
                s.entries
                    .iter()
                    .find(|e| e.number == n)
                    .unwrap()
                    .label
                    .clone()
            }
        }
    }

    /// What the firmware boots next: BootNext, else the first of BootOrder.
    fn next_label(&self) -> String {
        let n = match self.efi() {
            Some(v) => {
                let next = v.u16_list("BootNext").unwrap().first().copied();
                next.or(v.u16_list("BootOrder").unwrap().first().copied())
            }
            None => {
                let s = FakeFirmware::new(&self.fw).load().unwrap();
                s.boot_next.or(s.boot_order.first().copied())
            }
        };
        self.label_of(n.unwrap())
    }

    /// The OS running now: the firmware's BootCurrent, except that disk 1's GRUB (the
    /// "reinstall-target" entry) may have chosen the rescue OS on disk 2 (see `grub_boot`).
    fn current_label(&self) -> String {
        let label = self.label_of(self.boot_current());
        match std::fs::read_to_string(self.grub_chose()).ok().as_deref() {
            Some("rescue") if label == "reinstall-target" => "reinstall-rescue".into(),
            _ => label,
        }
    }

    /// BootOrder in the stand-in efivarfs, as labels.
    fn boot_order_labels(&self) -> Vec<String> {
        let v = self.efi().expect("efivars in use");
        v.u16_list("BootOrder")
            .unwrap()
            .iter()
            .map(|n| self.label_of(*n))
            .collect()
    }

    fn boot_current(&self) -> u16 {
        match self.efi() {
            Some(v) => v.u16_list("BootCurrent").unwrap()[0],
            None => FakeFirmware::new(&self.fw).load().unwrap().current.unwrap(),
        }
    }

    fn grub_chose(&self) -> PathBuf {
        self.w.path().join("grub-chose")
    }

    /// What disk 1's GRUB does when the firmware starts it, as its grub.cfg says (bootcfg's
    /// grubcfg; real GRUB does it in `tests/bios_boot.rs`): a pending `next_entry` is booted
    /// and cleared in the grubenv, else `saved_entry` (counted when it is not the default),
    /// else the default written into grub.cfg. Returns the entry's id.
    fn grub_boot(&self) -> String {
        use bootcfg::{grubenv, loader};
        let esp = PathBuf::from(part_named(&self.disk1.0, "esp"));
        let env_path = "EFI/BOOT/grubenv";
        let mut env = grubenv::parse(env_path, &loader::read_esp(&esp, env_path).unwrap()).unwrap();
        let cfg = String::from_utf8(loader::read_esp(&esp, "EFI/BOOT/grub.cfg").unwrap()).unwrap();
        let default = cfg
            .lines()
            .filter_map(|l| l.trim().strip_prefix("set default=\""))
            .rfind(|d| !d.starts_with('$'))
            .and_then(|d| d.strip_suffix('"'))
            .expect("grub.cfg names a default")
            .to_string();
        let write = |env: &std::collections::BTreeMap<String, String>| {
            loader::write_esp(&esp, &[(env_path, &grubenv::render(env).unwrap())]).unwrap()
        };
        let saved = env.get("saved_entry").filter(|v| !v.is_empty()).cloned();
        let chosen = match env.get("next_entry").filter(|v| !v.is_empty()).cloned() {
            Some(next) => {
                env.remove("next_entry");
                write(&env);
                next
            }
            // A saved entry other than the default is counted, and given up on after
            // SAVED_TRIES boots its OS did not take back.
            None => match saved {
                Some(saved) if saved != default => {
                    let tries = env.remove(TRIES_VAR).unwrap_or_default();
                    let chosen = if tries == "x".repeat(SAVED_TRIES) {
                        env.insert(FELL_BACK_VAR.into(), saved);
                        default
                    } else {
                        env.insert(TRIES_VAR.into(), format!("{tries}x"));
                        saved
                    };
                    write(&env);
                    chosen
                }
                Some(saved) => saved,
                None => default,
            },
        };
        // An entry that cannot load (the target's kernel gone) falls through to the next:
        // the rescue OS (`fallback` in grub.cfg; real GRUB does it under OVMF in
        // `both_disks_boot_on_uefi_firmware_into_their_own_os`).
        if chosen == "target" {
            let at = self.w.path().join("mnt-grub");
            let _m = mount(&part_named(&self.disk1.0, "root"), &at, true);
            let kernel = std::fs::read_dir(at.join("boot")).is_ok_and(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz"))
            });
            if !kernel {
                return "rescue".into();
            }
        }
        chosen
    }

    /// A power cycle: the firmware consumes BootNext if set.
    fn power_cycle(&self) {
        match self.efi() {
            Some(v) => {
                let next = v.u16_list("BootNext").unwrap().first().copied();
                let n = next.unwrap_or_else(|| v.u16_list("BootOrder").unwrap()[0]);
                if next.is_some() {
                    let f = v
                        .dir
                        .join(format!("BootNext-{}", bootcfg::efi::GLOBAL_VARIABLE));
                    std::fs::remove_file(f).unwrap();
                }
                v.write("BootCurrent", &bootcfg::efi::encode_u16_list(&[n]))
                    .unwrap();
            }
            None => {
                FakeFirmware::new(&self.fw).power_cycle().unwrap();
            }
        }
        let _ = std::fs::remove_file(self.grub_chose());
        // What the agent keeps for one boot (a tmpfs on a machine) is gone.
        for f in agent::engine::PER_BOOT {
            let _ = std::fs::remove_file(self.w.path().join("work").join(f));
        }
        // (A Windows disk 1 has no GRUB: its firmware entry starts Windows's boot manager.)
        if self.label_of(self.boot_current()) == "reinstall-target"
            && Path::new(&part_named(&self.disk1.0, "root")).exists()
        {
            std::fs::write(self.grub_chose(), self.grub_boot()).unwrap();
        }
    }

    /// Disk 1's GRUB environment (`EFI/BOOT/grubenv` on its ESP), read past the block
    /// cache (QEMU may have written the image file behind the loop device).
    fn disk1_grubenv(&self) -> std::collections::BTreeMap<String, String> {
        let esp = part_named(&self.disk1.0, "esp");
        sh(&format!("blockdev --flushbufs {esp} {}", self.disk1.0));
        let p = "EFI/BOOT/grubenv";
        bootcfg::grubenv::parse(p, &bootcfg::loader::read_esp(Path::new(&esp), p).unwrap()).unwrap()
    }

    /// Changes the target's root on disk 1 while no OS runs (mounted read-write, `f` given
    /// its mount point), then flushes it for the next boot.
    fn change_target(&self, f: impl FnOnce(&Path)) {
        let at = self.w.path().join("mnt-change");
        {
            let _m = mount(&self.root_part("reinstall-target"), &at, false);
            f(&at);
        }
        sh("sync");
    }

    /// From the target after a done job: the operator asks for the rescue OS; the target's
    /// agent boots it once, and the rescue OS's agent runs. Returns its exit code and stderr.
    fn rescue_on_request(&self) -> (i32, String) {
        ok(self
            .stager
            .reinstall("alice")
            .args(["--host", "web1", "rescue"]));
        let (code, err) = self.boot_linux();
        assert_eq!(code, 100, "the target boots the rescue OS once: {err}");
        self.power_cycle();
        assert_eq!(self.current_label(), "reinstall-rescue");
        self.boot_linux()
    }

    /// The SHA-256 of the target payload in disk 2's stash, mounted read-only at `at`.
    fn stashed_sha(&self, at: &str) -> String {
        let s = self.w.path().join(at);
        let _c = mount(&format!("{}p3", self.disk2.0), &s, true);
        let h = sh(&format!(
            "sha256sum {}/target/payload.age | cut -d' ' -f1",
            s.display()
        ));
        h.trim().to_string()
    }

    fn root_part(&self, label: &str) -> String {
        match label {
            // The source and the target name their root partition "root" (the target's is
            // the third on legacy-BIOS machines, after the BIOS boot partition).
            "source" | "reinstall-target" => part_named(&self.disk1.0, "root"),
            "reinstall-rescue" => format!("{}p2", self.disk2.0),
            other => panic!("unknown boot entry {other}"),
        }
    }

    /// The invariant: the entry the firmware boots next holds a complete OS of its kind.
    fn check_next_boot(&self, when: &str) {
        let label = self.next_label();
        let dev = self.root_part(&label);
        assert!(
            Path::new(&dev).exists(),
            "{when}: next boot {label} has no root partition {dev}"
        );
        // Inspect it where it is mounted (the running OS), or mount it read-only.
        let mounted = std::fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .lines()
            .find_map(|l| {
                let mut f = l.split(' ');
                (f.next() == Some(dev.as_str())).then(|| PathBuf::from(f.next().unwrap()))
            });
        let (at, _m) = match mounted {
            Some(at) => (at, None),
            None => {
                let at = self.w.path().join("mnt-check");
                let m = mount(&dev, &at, true);
                (at, Some(m))
            }
        };
        assert!(
            !at.join(".reinstall-incomplete").exists(),
            "{when}: next boot {label} is half-written"
        );
        let world = std::fs::read_to_string(at.join("etc/reinstall/world")).unwrap_or_default();
        let want = match label.as_str() {
            "source" => "",
            "reinstall-rescue" => "rescue\n",
            _ => "target\n",
        };
        assert_eq!(world, want, "{when}: next boot {label} holds another OS");
        if label != "source" {
            assert!(
                at.join("var/lib/reinstall/journal.json").exists(),
                "{when}: {label} has no journal"
            );
        }
    }

    fn agent(&self, root: &Path, failpoint: Option<&str>) -> std::process::Output {
        self.agent_with(root, failpoint, &[])
    }

    /// As `agent`, with `extra` arguments for `reinstall agent`.
    fn agent_with(
        &self,
        root: &Path,
        failpoint: Option<&str>,
        extra: &[&str],
    ) -> std::process::Output {
        run(&mut self.agent_command(root, failpoint, extra))
    }

    /// The agent as [`Env::agent_with`] runs it, not started.
    fn agent_command(&self, root: &Path, failpoint: Option<&str>, extra: &[&str]) -> Command {
        let mut c = Command::new(bin("reinstall"));
        c.arg("agent")
            .arg("--root")
            .arg(root)
            .args(["--disk2", &self.disk2.0])
            .arg("--work")
            .arg(self.w.path().join("work"))
            .args(["--wait", "5", "--once"])
            .args(extra);
        match &self.efivars {
            Some(d) => c.arg("--efivars").arg(d),
            None => c.arg("--fake-firmware").arg(&self.fw),
        };
        if let Some(fp) = failpoint {
            c.env("REINSTALL_FAILPOINTS", fp);
        }
        c
    }

    /// Boots and runs agents until the job is over. Returns the firmware log and what
    /// happened. `failpoint` is `[in-WORLD:]NAME[@N]`: armed in every agent run (or only in
    /// that world's) until it fires once. After it fires, the agent is restarted in the same
    /// OS (as systemd would), or with `power_cut` the machine is power-cycled instead.
    /// Points the source's identity file (and the copy the carry is checked against) at
    /// `relay` instead of the stager, as `stager enroll --via` writes it: with the stager as
    /// its `fallback` when `fallback`.
    fn identity_via(&self, relay: &integration_tests::stager::Relay, fallback: bool) {
        self.identity_at(&relay.url(""), fallback);
    }

    /// Points the source's identity file (and the copy the carry is checked against) at
    /// `url` instead of the stager, with the stager as its fallback if `fallback`.
    fn identity_at(&self, url: &str, fallback: bool) {
        let src = self.w.path().join("mnt-source");
        let _m = mount(&self.root_part("source"), &src, false);
        for f in [
            src.join("etc/reinstall/identity.toml"),
            self.w
                .path()
                .join("carry-expect/etc/reinstall/identity.toml"),
        ] {
            let text = std::fs::read_to_string(&f).unwrap();
            let direct = format!("stager = \"{}\"", self.stager.url(""));
            assert!(text.contains(&direct), "{text}");
            let mut via = text.replace(&direct, &format!("stager = \"{url}\""));
            if fallback {
                via += &format!("fallback = [\"{}\"]\n", self.stager.url(""));
            }
            std::fs::write(&f, via).unwrap();
        }
    }

    fn migrate(&self, failpoint: Option<&str>, power_cut: bool) -> (Vec<String>, Vec<String>) {
        let (only_in, spec) = match failpoint.and_then(|f| f.split_once(':')) {
            Some((w, f)) => (w.strip_prefix("in-"), Some(f)),
            None => (None, failpoint),
        };
        let mut fp = spec;
        let mut notes = Vec::new();
        for boot in 0..8 {
            let label = self.current_label();
            let root = self.w.path().join(format!("mnt-{label}"));
            let _m = mount(&self.root_part(&label), &root, false);
            loop {
                let armed = fp.filter(|_| only_in.is_none_or(|w| label.ends_with(w)));
                let out = self.agent(&root, armed);
                let err = String::from_utf8_lossy(&out.stderr).into_owned();
                let killed = armed.is_some_and(|f| {
                    err.contains(&format!("failpoint {} hit", f.split('@').next().unwrap()))
                });
                if killed {
                    notes.push(format!(
                        "{} in {label}",
                        if power_cut { "power cut" } else { "killed" }
                    ));
                    fp = None; // restarted without the failpoint
                    self.check_next_boot(&format!("after the kill at {failpoint:?}"));
                    if power_cut {
                        break;
                    }
                    continue;
                }
                match out.status.code() {
                    Some(100) => break,
                    Some(0) => {
                        self.check_next_boot("at the end");
                        let log = FakeFirmware::new(&self.fw).load().unwrap().log;
                        return (log, notes);
                    }
                    other => panic!("agent in {label} (boot {boot}) exited {other:?}: {err}"),
                }
            }
            self.check_next_boot(&format!("before boot {}", boot + 1));
            drop(_m);
            self.power_cycle();
        }
        panic!("the migration did not finish in 8 boots");
    }

    /// Boots the Linux OS the firmware starts (source or rescue) and runs its agent until it
    /// asks for a reboot (exit 100) or is done (0). Returns the exit code and stderr.
    fn boot_linux(&self) -> (i32, String) {
        self.boot_linux_with(None)
    }

    /// As `boot_linux`, with `failpoint` armed (then the agent may die on it).
    fn boot_linux_with(&self, failpoint: Option<&str>) -> (i32, String) {
        self.boot_linux_args(failpoint, &[])
    }

    /// As `boot_linux_with`, with `extra` arguments for `reinstall agent`.
    fn boot_linux_args(&self, failpoint: Option<&str>, extra: &[&str]) -> (i32, String) {
        let label = self.current_label();
        let root = self.w.path().join(format!("mnt-{label}"));
        let _m = mount(&self.root_part(&label), &root, false);
        let out = self.agent_with(&root, failpoint, extra);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let code = out.status.code().unwrap_or(-1);
        assert!(
            code == 100 || code == 0 || code == 1 || failpoint.is_some(),
            "agent in {label}: {code}: {err}"
        );
        (code, err)
    }
}

/// Days after a job, the target stops coming up (an update that panics on every boot): disk
/// 1's GRUB boots it SAVED_TRIES times, then the rescue OS, whose agent reports it (the stager
/// keeps the job done, with the report as the host's last event) and stays up instead of
/// taking it for a failed one-shot of the job; the target stays the default, a reboot from
/// the rescue tries it again, and a target that comes up takes GRUB's count back.
#[test]
fn a_target_that_stops_coming_up_after_the_job_falls_back_to_the_rescue_which_reports_it() {
    let env = Env::new();
    create_job(&env.stager);
    env.migrate(None, false);
    assert_eq!(job_state(&env.stager)["state"], "done");
    // The target panics on every boot from now on: its agent never runs.
    for n in 1..=SAVED_TRIES {
        env.power_cycle();
        assert_eq!(env.current_label(), "reinstall-target", "boot {n}");
    }
    env.power_cycle();
    assert_eq!(env.current_label(), "reinstall-rescue");
    let (code, err) = env.boot_linux();
    assert_eq!(
        code, 0,
        "the rescue OS stays up (no retry of the target): {err}"
    );
    let want = format!("after job 1, the target OS did not come up {SAVED_TRIES} boots in a row");
    assert!(err.contains(&want), "{err}");
    let out = ok(env
        .stager
        .reinstall("alice")
        .args(["status", "--host", "web1", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let host = &v["jobs"][0]["hosts"][0];
    assert_eq!(host["state"], "done", "{v}");
    let msg = host["last_event"]["event"]["message"]
        .as_str()
        .unwrap_or("");
    assert!(msg.contains(&want), "{v}");
    let e = env.disk1_grubenv();
    assert!(!e.contains_key(FELL_BACK_VAR), "reported once: {e:?}");
    assert_eq!(e["saved_entry"], "target", "the target stays the default");
    // The agent again in the same boot (systemd restarted it): nothing more to report.
    let (code, err) = env.boot_linux();
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("did not come up"), "{err}");
    // Repaired from the rescue OS, rebooted: the target comes up and takes the count back.
    env.power_cycle();
    assert_eq!(env.current_label(), "reinstall-target");
    assert_eq!(env.disk1_grubenv()[TRIES_VAR], "x");
    let (code, err) = env.boot_linux();
    assert_eq!(code, 0, "{err}");
    assert!(!env.disk1_grubenv().contains_key(TRIES_VAR), "{err}");
}

/// After a job, the target's kernel is gone (a botched update): disk 1's GRUB falls through to
/// the rescue OS at once (no count). The rescue's agent, with no request from an operator and
/// disk 1's GRUB still saving the target as its default (saved only once the target called
/// home), reports it and stays up, instead of taking it for a failed first boot and
/// retrying the target.
#[test]
fn a_target_whose_kernel_is_gone_after_the_job_boots_the_rescue_which_reports_it() {
    let env = Env::new();
    create_job(&env.stager);
    env.migrate(None, false);
    env.change_target(|at| {
        sh(&format!("rm -f {}/boot/vmlinuz*", at.display()));
    });
    env.power_cycle();
    assert_eq!(env.current_label(), "reinstall-rescue");
    let (code, err) = env.boot_linux();
    assert_eq!(
        code, 0,
        "the rescue OS stays up (no retry of the target): {err}"
    );
    let want = "after job 1, the target OS did not load";
    assert!(err.contains(want), "{err}");
    let v = job_state(&env.stager);
    assert_eq!(v["state"], "done", "{v}");
    let out = ok(env
        .stager
        .reinstall("alice")
        .args(["status", "--host", "web1"]));
    assert!(
        out.contains("web1 (job 1 done), at ") && out.contains(want),
        "{out}"
    );
    // Its journal moved on: the agent again (restarted) has nothing more to say.
    let (code, err) = env.boot_linux();
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains(want), "{err}");
}

/// A machine left in its rescue OS (here: the target's kernel gone after job 1) is
/// reinstalled from there: the operator's next job is taken by the rescue OS, which keeps
/// itself and disk 2's partitions, stashes the new target and installs it on disk 1 with the
/// identity it carries. A target too large for the stash is refused in plan with nothing
/// written, and the operator cancels that job; the rescue OS drops it and takes the next.
#[test]
fn a_machine_left_in_its_rescue_os_takes_the_next_job_there_and_installs_its_target() {
    let env = Env::new();
    create_job(&env.stager);
    env.migrate(None, false);
    let fails_over = fails(env.stager.reinstall("alice").args(["cancel", "1"]));
    assert!(fails_over.contains("job 1 is over"), "{fails_over}");
    env.change_target(|at| {
        sh(&format!("rm -f {}/boot/vmlinuz*", at.display()));
    });
    env.power_cycle();
    assert_eq!(env.current_label(), "reinstall-rescue");
    assert_eq!(env.boot_linux().0, 0);
    // Waiting for work, the rescue OS planned a job taken there and told the stager: a
    // reinstall would go ahead, said by the rescue OS, disk 2 being the one it runs from.
    let canon = |d: &str| std::fs::canonicalize(d).unwrap().display().to_string();
    let ready = || env.ready();
    let r = ready();
    assert_eq!(
        (&r["ok"], &r["os"], &r["disk2"]),
        (&true.into(), &"rescue".into(), &canon(&env.disk2.0).into()),
        "{r}"
    );
    // `reinstall plan` there shows that job: the last job's disk 1, disk 2 kept as it is
    // (its partitions read back, the stash's room), no new rescue entry.
    {
        let root = env.w.path().join("mnt-plan");
        let _m = mount(&env.root_part("reinstall-rescue"), &root, true);
        let plan = |json: bool| {
            let mut c = Command::new(bin("reinstall"));
            c.arg("plan").arg("--root").arg(&root);
            if json {
                c.arg("--json");
            }
            ok(&mut c)
        };
        let p: serde_json::Value = serde_json::from_str(&plan(true)).unwrap();
        assert_eq!(p["disk2_from"], "rescue-root", "{p}");
        assert_eq!(p["disk1"]["path"], canon(&env.disk1.0), "{p}");
        assert_eq!(p["disk2"]["path"], canon(&env.disk2.0), "{p}");
        let labels: Vec<&str> = p["disk2_layout"]["parts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["label"].as_str().unwrap())
            .collect();
        assert_eq!(
            labels,
            ["reinstall-esp", "reinstall-rescue", "reinstall-stash"],
            "{p}"
        );
        let stash = sh(&format!("blockdev --getsize64 {}p3", env.disk2.0));
        assert_eq!(p["stash_bytes"].to_string(), stash.trim(), "{p}");
        assert!(
            !p["boot_changes"].to_string().contains("reinstall-rescue"),
            "{p}"
        );
        let text = plan(false);
        assert!(
            text.contains("the running rescue OS's disk, kept as it is")
                && text.contains(&format!("  is {}p3: reinstall-stash", canon(&env.disk2.0))),
            "{text}"
        );
    }
    // Disk 1 mounted (a repair under way): the next plan (the agent's next start) says a
    // reinstall would be refused, and why, in `reinstall status`; unmounted, ready again.
    {
        let at = env.w.path().join("mnt-repair");
        let _m = mount(&env.root_part("reinstall-target"), &at, true);
        assert_eq!(env.boot_linux().0, 0);
        let r = ready();
        assert_eq!(
            (&r["ok"], &r["os"]),
            (&false.into(), &"rescue".into()),
            "{r}"
        );
        let why = r["why"].as_str().unwrap_or("");
        assert!(why.contains("is mounted on"), "{r}");
        let out = ok(env
            .stager
            .reinstall("alice")
            .args(["status", "--host", "web1"]));
        assert!(
            out.contains("web1: a reinstall would be refused (planned in its rescue OS at ")
                && out.contains(why),
            "{out}"
        );
    }
    assert_eq!(env.boot_linux().0, 0);
    assert_eq!(ready()["ok"], true);
    let uuid = |dev: &str| sh(&format!("blkid -s UUID -o value {dev}"));
    let rescue_fs = uuid(&env.root_part("reinstall-rescue"));
    // Too large for disk 1 (3 GiB): 4 GiB of zeros, tiny packed.
    env.add_target("2", "target-2", "truncate -s 4G usr/bin/large");
    ok(env
        .stager
        .reinstall("alice")
        .args(["--host", "web1", "--target", "target@2"]));
    let (code, err) = env.boot_linux();
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("job 2 received in the rescue OS") && err.contains("disk 1 is too small"),
        "{err}"
    );
    // Nothing was written: disk 1 holds job 1's target, the stash job 1's bundle.
    env.change_target(|at| {
        assert_eq!(
            std::fs::read_to_string(at.join("etc/os-marker")).unwrap(),
            "target"
        );
    });
    assert_eq!(
        env.stashed_sha("check-stash-1"),
        env.stager.sha_of("target")
    );
    let out = ok(env.stager.reinstall("alice").args(["cancel", "2"]));
    assert!(
        out.contains("job 2 cancelled") && out.contains("web1"),
        "{out}"
    );
    let (code, err) = env.boot_linux();
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("job 2 is no longer this host's work"), "{err}");
    // Job 3, a target that fits: installed from the rescue OS, booted, done.
    let sha3 = env.add_target("3", "target-3", "true");
    ok(env
        .stager
        .reinstall("alice")
        .args(["--host", "web1", "--target", "target@3"]));
    // The power goes while the rescue OS stashes the target: the firmware boots job 1's
    // target, which does not load, and the rescue OS resumes.
    let (log, notes) = env.migrate(Some("in-rescue:fetch-chunk@2"), true);
    assert_eq!(notes, ["power cut in reinstall-rescue"]);
    let job = job_state(&env.stager);
    assert_eq!(
        (job["id"].as_u64(), job["state"].as_str()),
        (Some(3), Some("done")),
        "{job}"
    );
    assert_eq!(
        log.iter()
            .filter(|l| *l == "create reinstall-rescue")
            .count(),
        1,
        "the rescue entry of job 1 serves job 3: {log:?}"
    );
    assert_eq!(
        uuid(&env.root_part("reinstall-rescue")),
        rescue_fs,
        "the rescue OS was kept"
    );
    let p = env.w.path();
    let t = p.join("check-target");
    let _a = mount(&env.root_part("reinstall-target"), &t, true);
    assert_eq!(
        std::fs::read_to_string(t.join("etc/os-marker")).unwrap(),
        "target-3"
    );
    env.assert_carried(&t);
    assert_eq!(
        env.stashed_sha("check-stash-3"),
        sha3,
        "the stash holds job 3's target"
    );
    let r = p.join("check-rescue");
    let _b = mount(&env.root_part("reinstall-rescue"), &r, true);
    for n in [1, 2] {
        assert!(
            r.join(format!("var/lib/reinstall/archive/job-{n}/journal.json"))
                .exists(),
            "job {n} archived in the rescue OS"
        );
    }
}

/// A new OS that comes up but cannot reach the stager (its network is wrong, its identity
/// refused; here the stager is away) must not keep the machine: past its time to call home
/// the target reboots, without a one-shot, into the rescue OS (the default), which boots it
/// once more; the second time the rescue OS fails the job and stays, reachable. With the
/// stager back in between, the retried target would simply have called home.
#[test]
fn a_target_that_cannot_call_home_reboots_into_the_rescue_which_retries_then_fails_the_job() {
    let mut env = Env::new();
    create_job(&env.stager);
    assert_eq!(env.boot_linux().0, 100, "source: stage-rescue, boot-rescue");
    env.power_cycle();
    assert_eq!(
        env.boot_linux().0,
        100,
        "rescue: install-target, boot-target"
    );
    for round in 1..=2 {
        env.power_cycle();
        assert_eq!(env.current_label(), "reinstall-target", "round {round}");
        env.stager.kill();
        let t = std::time::Instant::now();
        let (code, err) = env.boot_linux_args(None, &["--call-home-for", "3"]);
        assert_eq!(code, 100, "round {round}: {err}");
        assert!(
            err.contains("could not call home within 3 s") && t.elapsed().as_secs() < 60,
            "round {round}: {err}"
        );
        env.check_next_boot("after the target gave up calling home");
        assert_eq!(env.next_label(), "reinstall-rescue");
        env.stager.start();
        env.power_cycle();
        assert_eq!(env.current_label(), "reinstall-rescue");
        let (code, err) = env.boot_linux();
        if round == 1 {
            assert_eq!(code, 100, "the rescue OS boots the target once more: {err}");
            assert!(err.contains("retrying boot-target"), "{err}");
        } else {
            assert_eq!(code, 0, "{err}");
            assert!(
                err.contains("the target did not come up after 2 tries")
                    && err
                        .contains("its journal says: the target OS could not call home within 3 s"),
                "{err}"
            );
        }
    }
    let job = job_state(&env.stager);
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(env.next_label(), "reinstall-rescue");
    // Why is in the target's own journal, for whoever repairs it from the rescue OS.
    env.change_target(|at| {
        let j = std::fs::read_to_string(at.join("var/lib/reinstall/journal.json")).unwrap();
        assert!(j.contains("could not call home"), "{j}");
    });
}

/// `reinstall --host H rescue` after a job: the target boots the rescue OS once, which
/// acknowledges the request and stays up (the job stays done; the stager shows phase
/// `rescue`); a reboot returns to the target, whose agent tells the stager it is back.
#[test]
fn a_rescue_on_request_boots_the_rescue_once_and_the_target_says_when_it_is_back() {
    let env = Env::new();
    create_job(&env.stager);
    env.migrate(None, false);
    let phase = || {
        let out = ok(env
            .stager
            .reinstall("alice")
            .args(["status", "--host", "web1", "--json"]));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["hosts"][0]["phase"].as_str().unwrap_or("").to_string()
    };
    assert_eq!(phase(), "target-up");
    let (code, err) = env.rescue_on_request();
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("in the rescue OS, as requested"), "{err}");
    assert_eq!(phase(), "rescue");
    assert_eq!(job_state(&env.stager)["state"], "done");
    env.power_cycle();
    assert_eq!(env.current_label(), "reinstall-target");
    let (code, err) = env.boot_linux();
    assert_eq!(code, 0, "{err}");
    assert_eq!(phase(), "target-up", "the stager still shows the rescue OS");
    assert_eq!(job_state(&env.stager)["state"], "done");
}

/// The target renews its certificate (here every certificate of 825 days is due: the
/// stager's `agent_cert_days` is 3000) and gives the renewed identity file to the rescue OS
/// on disk 2, so that a rescue boot long after the migration does not come up with an
/// expired certificate: the rescue OS answers a rescue request with the renewed one.
#[test]
fn a_target_that_renews_its_certificate_gives_it_to_the_rescue_os_too() {
    let mut env = Env::new();
    env.stager.set_config("agent_cert_days", "3000");
    env.stager.kill();
    env.stager.start();
    create_job(&env.stager);
    env.migrate(None, false);
    assert_eq!(job_state(&env.stager)["state"], "done");
    let p = env.w.path();
    let (t, r) = (p.join("check-target"), p.join("check-rescue"));
    let read =
        |tree: &Path| std::fs::read_to_string(tree.join("etc/reinstall/identity.toml")).unwrap();
    let (target, rescue) = {
        let _a = mount(&part_named(&env.disk1.0, "root"), &t, true);
        let _b = mount(&format!("{}p2", env.disk2.0), &r, true);
        (read(&t), read(&r))
    };
    let original = std::fs::read_to_string(env.stager.identity("web1")).unwrap();
    assert_ne!(target, original, "the target did not renew its certificate");
    assert_eq!(
        rescue, target,
        "the rescue OS did not get the renewed identity"
    );
    let id = proto::identity::IdentityFile::parse(Path::new("rescue"), &rescue).unwrap();
    assert_eq!(id.name, "web1");
    // The rescue OS works with it: it answers a rescue request (reporting with the renewed
    // certificate, the only one it has).
    let (code, err) = env.rescue_on_request();
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("in the rescue OS, as requested"), "{err}");
}

/// A job taken in the rescue OS keeps disk 2's partitions as they are: a target whose payload
/// would not fit the stash there is refused in plan, before anything is written, and the
/// refusal says how to do it instead.
#[test]
fn a_job_in_the_rescue_os_whose_target_outgrows_the_stash_is_refused_before_anything_is_written() {
    // Disk 2 of 1700 MiB: ESP 256 MiB, rescue root 1280 MiB, a stash of ~160 MiB, room for
    // job 1's small target.
    let env = Env::build(Spec {
        disk2: "1700M",
        ..Spec::default()
    });
    create_job(&env.stager);
    env.migrate(None, false);
    assert_eq!(env.rescue_on_request().0, 0);
    let rescue_fs = || {
        sh(&format!(
            "blkid -s UUID -o value {}",
            env.root_part("reinstall-rescue")
        ))
    };
    let rescue_fs_before = rescue_fs();
    let table = |d: &str| sh(&format!("sfdisk --dump {d}"));
    let tables = (table(&env.disk1.0), table(&env.disk2.0));
    // 180 MiB that do not compress: the payload and its margin outgrow the stash.
    env.add_target("2", "target-2", "head -c 180M /dev/urandom > usr/bin/noise");
    ok(env
        .stager
        .reinstall("alice")
        .args(["--host", "web1", "--target", "target@2"]));
    let (code, err) = env.boot_linux();
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("job 2 received in the rescue OS")
            && err.contains("the stash on disk 2")
            && err.contains("run the job from the source or target OS instead")
            && err.contains("nothing was changed"),
        "{err}"
    );
    assert!(
        env.last_message().contains("the stash on disk 2"),
        "{}",
        env.last_message()
    );
    // Nothing was written: both partition tables, the rescue filesystem, job 1's target on
    // disk 1 and job 1's bundle in the stash are as they were.
    assert_eq!((table(&env.disk1.0), table(&env.disk2.0)), tables);
    assert_eq!(rescue_fs(), rescue_fs_before);
    env.change_target(|at| {
        assert_eq!(
            std::fs::read_to_string(at.join("etc/os-marker")).unwrap(),
            "target"
        );
    });
    assert_eq!(env.stashed_sha("check-stash"), env.stager.sha_of("target"));
}

fn create_job(s: &Stager) {
    ok(s.reinstall("alice")
        .args(["--host", "web1", "--target", "target"]));
}

fn job_state(s: &Stager) -> serde_json::Value {
    let (_, body) = s.curl(Some("alice"), &[], "/v1/jobs");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v.as_array().unwrap().last().unwrap().clone()
}

/// `want` appears in `log` in this order (other entries may be between).
fn in_order(log: &[String], want: &[&str]) -> bool {
    let mut it = log.iter();
    want.iter().all(|w| it.any(|l| l == w))
}

#[test]
fn a_machine_migrates_through_rescue_into_the_target_keeping_its_identity() {
    let env = Env::new();
    create_job(&env.stager);
    let (log, _) = env.migrate(None, false);
    assert!(
        in_order(
            &log,
            &[
                "create reinstall-rescue",
                "next reinstall-rescue",
                "boot reinstall-rescue",
                "default reinstall-rescue",
                "create reinstall-target",
                "next reinstall-target",
                "boot reinstall-target",
                "default reinstall-target",
            ]
        ),
        "firmware log: {log:?}"
    );
    let fw = FakeFirmware::new(&env.fw).load().unwrap();
    let label = |n: u16| {
        fw.entries
            .iter()
            .find(|e| e.number == n)
            .unwrap()
            .label
            .clone()
    };
    assert_eq!(label(fw.boot_order[0]), "reinstall-target");
    assert_eq!(
        label(fw.boot_order[1]),
        "reinstall-rescue",
        "the rescue entry is kept"
    );
    let job = job_state(&env.stager);
    assert_eq!(job["state"], "done", "{job}");
    // The target, the source of any next job, planned one as soon as this one was done: a
    // reinstall would go ahead, with the same disk 2 (and at every start of its agent: the
    // record replaced, the next boot of the target reports again).
    let disk2 = std::fs::canonicalize(&env.disk2.0).unwrap();
    let ready = || env.ready();
    let r = ready();
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["disk2"], disk2.to_str().unwrap(), "{r}");
    let done_at = job["hosts"][0]["updated"].as_str().unwrap();
    assert!(
        r["at"].as_str().unwrap() >= done_at,
        "{r}, job done at {done_at}"
    );
    let (code, body) = env.stager.curl(
        Some("web1"),
        &[
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"ok":false,"why":"stale"}"#,
        ],
        "/v1/agent/ready",
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(ready()["why"], "stale");
    assert_eq!(env.boot_linux().0, 0);
    let r = ready();
    assert_eq!(
        (&r["ok"], &r["why"]),
        (&true.into(), &serde_json::Value::Null),
        "{r}"
    );
    // Both disks hold their OS with the carried identity, byte for byte.
    let p = env.w.path();
    let t = p.join("check-target");
    let r = p.join("check-rescue");
    let _a = mount(&part_named(&env.disk1.0, "root"), &t, true);
    let _b = mount(&format!("{}p2", env.disk2.0), &r, true);
    for tree in [&t, &r] {
        env.assert_carried(tree);
        for target in ["emergency.target", "rescue.target"] {
            let link = tree.join(format!(
                "etc/systemd/system/{target}.wants/reinstall-emergency-reboot.service"
            ));
            assert_eq!(
                std::fs::read_link(&link).unwrap(),
                Path::new("/etc/systemd/system/reinstall-emergency-reboot.service")
            );
        }
        assert_eq!(
            std::fs::read_to_string(
                tree.join("etc/systemd/system/reinstall-emergency-reboot.service")
            )
            .unwrap(),
            agent::engine::EMERGENCY_UNIT
        );
        assert_eq!(
            std::fs::read_to_string(tree.join(agent::engine::WATCHDOG_CONF)).unwrap(),
            agent::engine::WATCHDOG_DROPIN
        );
        let key = std::fs::metadata(tree.join("etc/ssh/ssh_host_ed25519_key")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&key.permissions()) & 0o777,
            0o600
        );
        let netdir = if tree == &t {
            "etc/NetworkManager/system-connections"
        } else {
            "etc/systemd/network"
        };
        let nets: Vec<_> = std::fs::read_dir(tree.join(netdir)).unwrap().collect();
        assert!(
            !nets.is_empty(),
            "no network files in {}/{netdir}",
            tree.display()
        );
        let a = std::fs::metadata(tree.join("home/alice/.ssh/authorized_keys")).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&a), 1500);
    }
    assert_eq!(
        std::fs::read_to_string(t.join("etc/os-marker")).unwrap(),
        "target"
    );
    assert_eq!(
        std::fs::read_to_string(r.join("etc/os-marker")).unwrap(),
        "rescue"
    );
    // The stash holds the verified target blob.
    let s = p.join("check-stash");
    let _c = mount(&format!("{}p3", env.disk2.0), &s, true);
    let h = sh(&format!(
        "sha256sum {}/target/payload.age | cut -d' ' -f1",
        s.display()
    ));
    assert_eq!(h.trim(), env.stager.sha_of("target"));
}

/// The same migration with bootcfg's real UEFI implementation writing Boot####, BootOrder and
/// BootNext into a stand-in efivarfs directory; the entries must name the ESPs exactly.
/// Fleets reinstall the same machine again: a second job, created after the first finished,
/// is taken by the target OS (the source of the second migration), which runs it through the
/// rescue into a new target; the first job's state is archived, and the firmware keeps one
/// entry per label (the stale ones pointed at partitions that were rewritten).
#[test]
fn a_finished_machine_takes_a_second_job_and_leaves_no_stale_boot_entries() {
    let mut env = Env::new();
    env.use_efivars();
    create_job(&env.stager);
    env.migrate(None, false);
    assert_eq!(job_state(&env.stager)["state"], "done");
    let first = env.efi().unwrap().entries().unwrap();
    create_job(&env.stager);
    let (_, _) = env.migrate(None, false);
    let job = job_state(&env.stager);
    assert_eq!(job["id"], 2, "{job}");
    assert_eq!(job["state"], "done", "{job}");
    let v = env.efi().unwrap();
    let entries = v.entries().unwrap();
    for label in ["reinstall-rescue", "reinstall-target"] {
        let ours: Vec<_> = entries
            .iter()
            .filter(|(_, o)| o.description == label)
            .collect();
        assert_eq!(ours.len(), 1, "{label}: {ours:?}");
        let before = first.iter().find(|(_, o)| o.description == label).unwrap();
        assert_ne!(
            ours[0].1.path, before.1.path,
            "{label} points at the rewritten disk"
        );
    }
    let order = env.boot_order_labels();
    assert_eq!(
        order[..2],
        ["reinstall-target", "reinstall-rescue"],
        "{order:?}"
    );
    // The second migration ran from the first target: its journal archived job 1 there, and
    // that disk is the new target now; the rescue OS on disk 2 is the second job's.
    let root = env.w.path().join("check");
    let _m = mount(&env.root_part("reinstall-rescue"), &root, false);
    let j: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root.join("var/lib/reinstall/journal.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(j["job"], 2);
}

#[test]
fn the_migration_through_uefi_variables_names_the_esps_exactly() {
    let mut env = Env::new();
    env.use_efivars();
    create_job(&env.stager);
    env.migrate(None, false);
    let job = job_state(&env.stager);
    assert_eq!(job["state"], "done", "{job}");
    let v = env.efi().unwrap();
    let entries = v.entries().unwrap();
    let order = env.boot_order_labels();
    assert_eq!(
        order[..2],
        ["reinstall-target", "reinstall-rescue"],
        "{order:?}"
    );
    assert!(v.u16_list("BootNext").unwrap().is_empty());
    for (label, disk) in [
        ("reinstall-rescue", &env.disk2.0),
        ("reinstall-target", &env.disk1.0),
    ] {
        let (_, opt) = entries
            .iter()
            .find(|(_, o)| o.description == label)
            .unwrap();
        let sf: serde_json::Value =
            serde_json::from_str(&ok(Command::new("sfdisk").args(["--json", disk]))).unwrap();
        let parts = sf["partitiontable"]["partitions"].as_array().unwrap();
        let esp_index = parts
            .iter()
            .position(|p| {
                p["type"]
                    .as_str()
                    .unwrap()
                    .eq_ignore_ascii_case("C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
            })
            .unwrap();
        let p1 = &parts[esp_index];
        match &opt.path[0] {
            bootcfg::efi::DevicePathNode::HardDrive {
                partition_number,
                start_lba,
                size_lba,
                partition_guid,
            } => {
                assert_eq!(*partition_number as usize, esp_index + 1);
                assert_eq!(Some(*start_lba), p1["start"].as_u64());
                assert_eq!(Some(*size_lba), p1["size"].as_u64());
                assert_eq!(
                    partition_guid.to_string(),
                    p1["uuid"].as_str().unwrap().to_lowercase()
                );
            }
            other => panic!("{label}: first node is {other:?}"),
        }
    }
}

#[test]
fn the_migration_works_on_4096_byte_sector_disks() {
    let env = Env::build(Spec {
        sector: 4096,
        ..Spec::default()
    });
    create_job(&env.stager);
    env.migrate(None, false);
    assert_eq!(job_state(&env.stager)["state"], "done");
    let out = ok(Command::new("sfdisk").args(["--json", &env.disk2.0]));
    assert!(out.contains("\"sectorsize\": 4096"), "{out}");
    // The ESP's FAT uses the disk's sector size.
    let bps = sh(&format!(
        "dd if={}p1 bs=1 skip=11 count=2 status=none | od -An -tu2",
        env.disk2.0
    ));
    assert_eq!(bps.trim(), "4096");
}

#[test]
fn the_agent_waits_out_a_stager_outage() {
    let mut env = Env::new();
    // The operator follows the job (`--wait`) through the outage too.
    let follower = env
        .stager
        .reinstall("alice")
        .args(["--host", "web1", "--target", "target", "--wait"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while env.stager.curl(Some("alice"), &[], "/v1/jobs").1.trim() == "[]" {
        assert!(t.elapsed().as_secs() < 30, "no job created");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    env.stager.kill();
    let root = env.w.path().join("mnt-source");
    let m = mount(&env.root_part("source"), &root, false);
    let child = {
        let mut c = Command::new(bin("reinstall"));
        c.arg("agent")
            .arg("--root")
            .arg(&root)
            .args(["--disk2", &env.disk2.0])
            .arg("--fake-firmware")
            .arg(&env.fw)
            .arg("--work")
            .arg(env.w.path().join("work"))
            .args(["--wait", "5", "--once"])
            .stderr(std::process::Stdio::piped());
        c.spawn().unwrap()
    };
    std::thread::sleep(std::time::Duration::from_secs(3));
    env.stager.start();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(100), "{err}");
    assert!(err.contains("unreachable; retrying"), "{err}");
    drop(m);
    env.power_cycle();
    env.migrate(None, false);
    assert_eq!(job_state(&env.stager)["state"], "done");
    let out = follower.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains("job 1: cannot reach the stager at ")
            && said.contains("still following for up to 3600 s")
            && said.contains("job 1: the stager answers again, after ")
            && said.contains("job 1: Done"),
        "{said}"
    );
}

/// The stager goes silent in the middle of the job, as a pulled cable or a network partition
/// makes it (no FIN, no RST: every connection open then just stops; new ones are closed at
/// once), and comes back 3 s later: what the agent was waiting for on those connections gives
/// up after the client's read timeout (60 s), it asks again on new connections, and the job
/// carries on. Found in the VM: a progress report sent on a kept-alive connection waited for
/// its answer forever, with no read timeout on a reused connection, and the job with it.
#[test]
fn a_stager_gone_silent_mid_job_is_waited_out_once_it_answers_again() {
    let env = Env::new();
    // Cut once 256 KiB have come from the stager: during the rescue's download.
    let link = integration_tests::stager::Partition::start(
        env.stager.port,
        256 << 10,
        std::time::Duration::from_secs(3),
    );
    env.identity_at(&format!("https://127.0.0.1:{}", link.port), false);
    create_job(&env.stager);
    let root = env.w.path().join("mnt-source");
    let m = mount(&env.root_part("source"), &root, false);
    let log = env.w.path().join("agent-silent.log");
    let mut child = env
        .agent_command(&root, None, &[])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > std::time::Duration::from_secs(240) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the agent still waits {:?} after the link went silent ({:?} in): {}",
                link.cut_at().map(|c| c.elapsed()),
                t.elapsed(),
                std::fs::read_to_string(&log).unwrap()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let err = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(100), "{err}");
    assert!(
        err.contains("failed (") && err.contains("asking for the rest from there"),
        "{err}"
    );
    let cut = link.cut_at().expect("the link never went silent");
    assert!(
        cut.elapsed() < t.elapsed(),
        "cut before the agent started: {err}"
    );
    drop(m);
    env.power_cycle();
    env.migrate(None, false);
    assert_eq!(job_state(&env.stager)["state"], "done");
}

/// The machine reaches its stager through a site relay (its identity names the relay, as
/// `stager enroll --via` writes it): the whole migration runs through the relay, and each
/// bundle's blob crosses from the stager to the relay once.
#[test]
fn a_machine_migrates_through_a_site_relay() {
    let env = Env::new();
    let mut relay = integration_tests::stager::Relay::init(&env.stager, "pop-a");
    relay.start();
    env.identity_via(&relay, false);
    create_job(&env.stager);
    env.migrate(None, false);
    let job = job_state(&env.stager);
    assert_eq!(job["state"], "done", "{job}");
    let (code, health) = env
        .stager
        .curl_at(&relay.url("/healthz"), Some("web1"), &[]);
    assert_eq!(code, 200, "{health}");
    let h: serde_json::Value = serde_json::from_str(&health).unwrap();
    let blob = |b: &str| {
        std::fs::metadata(
            env.stager
                .home
                .join("blobs/sha256")
                .join(env.stager.sha_of(b)),
        )
        .unwrap()
        .len()
    };
    assert_eq!(
        h["bytes_from_upstream"].as_u64(),
        Some(blob("rescue") + blob("target")),
        "{h}"
    );
}

/// Through a site relay that is down: the identity names the relay first and the stager as
/// its fallback (as `stager enroll --via` writes it); the agent goes to the stager directly
/// and the job completes.
#[test]
fn with_its_site_relay_down_the_agent_falls_back_to_the_stager() {
    let env = Env::new();
    // A relay that was set up but is not running: its port refuses connections.
    let relay = integration_tests::stager::Relay::init(&env.stager, "pop-a");
    env.identity_via(&relay, true);
    create_job(&env.stager);
    let root = env.w.path().join("mnt-source");
    let out = {
        let _m = mount(&env.root_part("source"), &root, false);
        env.agent(&root, None)
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "the stager at {} is unreachable; trying {}",
            relay.url(""),
            env.stager.url("")
        )),
        "{err}"
    );
    assert_eq!(out.status.code(), Some(100), "{err}");
    env.power_cycle();
    env.migrate(None, false);
    assert_eq!(job_state(&env.stager)["state"], "done");
}

#[test]
fn killed_at_any_failpoint_the_agent_resumes_and_completes() {
    let points = [
        "enter-plan",
        "done-plan",
        "enter-stage-rescue",
        "unpack-entry@3",
        "fetch-chunk@1",
        "unpack-before-complete",
        "done-stage-rescue",
        "enter-boot-rescue",
        "done-boot-rescue",
        "enter-rescue-up",
        "done-rescue-up",
        "enter-install-target",
        "in-rescue:unpack-entry@3",
        "in-rescue:unpack-before-complete",
        "done-install-target",
        "enter-boot-target",
        "done-boot-target",
        "enter-target-up",
    ];
    let mut table = Vec::new();
    for fp in points {
        let env = Env::new();
        create_job(&env.stager);
        let t = std::time::Instant::now();
        let (_, notes) = env.migrate(Some(fp), false);
        let job = job_state(&env.stager);
        assert_eq!(job["state"], "done", "{fp}: {job}");
        table.push(format!(
            "{fp:<34} {:<30} done in {:.1}s",
            notes.join("; "),
            t.elapsed().as_secs_f64()
        ));
    }
    eprintln!(
        "failpoint                          kill                           outcome\n{}",
        table.join("\n")
    );
}

/// A power cut at each failpoint: the machine boots whatever the firmware says and the agent
/// carries on from that OS's journal. It ends in the target, or in a reachable OS (rescue or
/// source) that reported the failure; never in a half-written one (checked at every boot).
#[test]
fn a_power_cut_at_any_failpoint_never_leaves_an_unbootable_machine() {
    let points = [
        "unpack-entry@3",
        "fetch-chunk@1",
        "done-stage-rescue",
        "done-boot-rescue",
        "enter-rescue-up",
        "in-rescue:unpack-entry@3",
        "done-install-target",
        "done-boot-target",
        "enter-target-up",
    ];
    let mut table = Vec::new();
    for fp in points {
        let env = Env::new();
        create_job(&env.stager);
        let (log, notes) = env.migrate(Some(fp), true);
        let job = job_state(&env.stager);
        let state = job["state"].as_str().unwrap().to_string();
        let fw = FakeFirmware::new(&env.fw).load().unwrap();
        let default = fw
            .entries
            .iter()
            .find(|e| e.number == fw.boot_order[0])
            .unwrap()
            .label
            .clone();
        // One cut, a good target: the only right end is the target, as the default boot.
        // (Both the firmware and disk 1's GRUB are modelled: a retry that re-armed only the
        // firmware's one-shot ended in the rescue with the job failed.)
        assert_eq!(state, "done", "{fp}: job ended {state}: {job}\n{log:?}");
        assert_eq!(default, "reinstall-target", "{fp}: {log:?}");
        table.push(format!(
            "{fp:<34} {:<30} {state}, default boot {default}",
            notes.join("; ")
        ));
    }
    eprintln!(
        "power cut at                       where                          outcome\n{}",
        table.join("\n")
    );
}

impl Env {
    /// Runs the agent once in the OS the firmware says is current; returns (exit code, stderr).
    fn boot_once(&self) -> (Option<i32>, String) {
        let label = self.current_label();
        let root = self.w.path().join(format!("mnt-{label}"));
        let _m = mount(&self.root_part(&label), &root, false);
        let out = self.agent(&root, None);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The identity files in the OS tree `tree` are the source's, byte for byte.
    fn assert_carried(&self, tree: &Path) {
        for f in [
            "etc/ssh/ssh_host_ed25519_key",
            "root/.ssh/authorized_keys",
            "etc/reinstall/identity.toml",
            "etc/hostname",
        ] {
            assert_eq!(
                std::fs::read(tree.join(f)).unwrap(),
                std::fs::read(self.w.path().join("carry-expect").join(f)).unwrap(),
                "{f} in {} is not the source's",
                tree.display()
            );
        }
    }

    /// Builds bundle `target@VERSION` on the running stager: an OS tree with `marker` and a
    /// sparse file of `sparse` bytes. Returns its payload's SHA-256.
    /// Builds target bundle `target@VERSION` from a fresh tree marked `marker`, after running
    /// the shell command `extra` in the tree; returns its payload's SHA-256.
    fn add_target(&self, version: &str, marker: &str, extra: &str) -> String {
        let tree = self.w.path().join(format!("target-tree-{version}"));
        os_tree(&tree, marker);
        sh(&format!("cd {} && {extra}", tree.display()));
        ok(stager()
            .args(["bundle", "build", "--dir"])
            .arg(&self.stager.home)
            .args(["--name", "target", "--version", version, "--kind", "target"])
            .args(["--os", "linux"])
            .arg(&tree));
        let m: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                self.stager
                    .home
                    .join(format!("bundles/target/{version}/manifest.json")),
            )
            .unwrap(),
        )
        .unwrap();
        m["payload"]["sha256"].as_str().unwrap().to_string()
    }

    /// The host's readiness record on the stager (`POST /v1/agent/ready`), as `/v1/hosts`
    /// shows it.
    fn ready(&self) -> serde_json::Value {
        let (code, body) = self.stager.curl(Some("alice"), &[], "/v1/hosts");
        assert_eq!(code, 200, "{body}");
        let hosts: serde_json::Value = serde_json::from_str(&body).unwrap();
        hosts[0]["ready"].clone()
    }

    fn last_message(&self) -> String {
        let job = job_state(&self.stager);
        job["hosts"][0]["last_event"]["event"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

#[test]
fn a_tampered_target_blob_is_refused_before_anything_becomes_bootable() {
    let env = Env::new();
    create_job(&env.stager);
    // Someone (a cache, a disk) flips a byte of the target blob on the stager.
    let blob = env
        .stager
        .home
        .join("blobs/sha256")
        .join(env.stager.sha_of("target"));
    let mut b = std::fs::read(&blob).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x40;
    std::fs::write(&blob, b).unwrap();
    for _ in 0..2 {
        let (code, err) = env.boot_once();
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("SHA-256"), "{err}");
        assert_eq!(
            env.next_label(),
            "source",
            "a boot entry was set despite the bad blob"
        );
        env.check_next_boot("after the refusal");
    }
    assert!(
        env.last_message().contains("stage-rescue"),
        "{}",
        env.last_message()
    );
}

#[test]
fn a_different_disk_1_at_install_time_is_refused_and_the_machine_stays_in_rescue() {
    let env = Env::new();
    create_job(&env.stager);
    assert_eq!(env.boot_once().0, Some(100));
    env.power_cycle();
    assert_eq!(env.current_label(), "reinstall-rescue");
    // While the rescue OS boots, disk 1 is swapped for another disk at the same path: a
    // blank one of another size. The loop device keeps its number (detaching it let a test
    // running in parallel attach its own disk there, which this test then tore down).
    let img = env.w.path().join("disk1.img");
    sh(&format!(
        "partx -d {d} 2>/dev/null; truncate -s 0 {o}; truncate -s 5G {o};
         losetup --set-capacity {d}; blockdev --flushbufs {d}",
        d = env.disk1.0,
        o = img.display()
    ));
    let (code, err) = env.boot_once();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not the disk pinned"), "{err}");
    assert_eq!(
        env.next_label(),
        "reinstall-rescue",
        "the machine must stay in rescue"
    );
    assert!(
        env.last_message().contains("install-target"),
        "{}",
        env.last_message()
    );
    // The stranger disk was not written.
    let out = run(Command::new("sfdisk").args(["--json", &env.disk1.0]));
    assert!(!out.status.success() || !String::from_utf8_lossy(&out.stdout).contains("gpt"));
}

#[test]
fn a_target_larger_than_disk_1_is_refused_before_anything_is_written() {
    // Disk 1 of 1.2 GiB: its root partition would hold ~700 MiB; the target unpacks to 800.
    let env = Env::build(Spec {
        disk1: "1200M",
        target_extra: 800 << 20,
        ..Spec::default()
    });
    create_job(&env.stager);
    let (code, err) = env.boot_once();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("disk 1 is too small"), "{err}");
    assert_eq!(env.next_label(), "source");
    // Disk 2 was not touched: refused in plan, before stage-rescue.
    let out = run(Command::new("sfdisk").args(["--json", &env.disk2.0]));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("gpt"),
        "disk 2 was partitioned"
    );
}

/// Boots what the agent wrote on real UEFI firmware (OVMF under QEMU, software emulation):
/// each disk alone, through its ESP's GRUB and grub.cfg, to its own root filesystem, where an
/// init prints a marker with the carried hostname. Proves the ESP (FAT written in userspace),
/// the GRUB image, the root-by-UUID config and the unpacked tree boot; the boot entries
/// themselves live in the fake firmware (the VM harness, issue 6, will drive OVMF's).
#[test]
fn both_disks_boot_on_uefi_firmware_into_their_own_os() {
    let env = Env::build(Spec {
        bootable: true,
        ..Spec::default()
    });
    create_job(&env.stager);
    env.migrate(None, false);
    assert_eq!(job_state(&env.stager)["state"], "done");
    sh("sync");
    // `keep`: the disks keep what the boot wrote (GRUB's grubenv), else a snapshot is booted.
    let boot_with = |disks: &[&str], marker: &str, what: &str, keep: bool| {
        let vars = env.w.path().join("vars.fd");
        std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars).unwrap();
        let serial = env.w.path().join(format!("{what}.serial"));
        let t = std::time::Instant::now();
        let mut qemu = Command::new("timeout");
        qemu.args([
            "180",
            "qemu-system-x86_64",
            "-machine",
            "q35",
            "-accel",
            "tcg,thread=multi",
            "-smp",
            "2",
            "-m",
            "1024",
        ])
        .args([
            "-drive",
            "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
        ])
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,unit=1,file={}",
            vars.display()
        ));
        for (i, img) in disks.iter().enumerate() {
            qemu.arg("-drive")
                .arg(format!(
                    "file={},format=raw,if=none,id=d{i},snapshot={}",
                    env.w.path().join(img).display(),
                    if keep { "off" } else { "on" }
                ))
                .arg("-device")
                .arg(format!("virtio-blk-pci,drive=d{i},bootindex={}", i + 1));
        }
        let out = run(qemu
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .args(["-display", "none", "-no-reboot", "-net", "none"]));
        let log = String::from_utf8_lossy(&std::fs::read(&serial).unwrap()).replace('\r', "");
        if !log.contains(marker) {
            let keep = std::env::temp_dir().join("reinstall-uefi-boot-failed.serial");
            let _ = std::fs::write(&keep, &log);
            panic!(
                "{what} did not boot to {marker:?} (qemu {:?}); whole log in {}; tail:\n{}",
                out.status,
                keep.display(),
                log.lines().rev().take(15).collect::<Vec<_>>().join("\n")
            );
        }
        eprintln!(
            "{what}: booted to {marker:?} on OVMF in {:.1}s",
            t.elapsed().as_secs_f64()
        );
        log
    };
    let boot = |disks: &[&str], marker: &str, what: &str| boot_with(disks, marker, what, false);
    boot(
        &["disk2.img"],
        "REINSTALL-RESCUE-BOOTED host=web1 world=rescue",
        "disk 2 alone",
    );
    boot(
        &["disk1.img"],
        "REINSTALL-TARGET-BOOTED host=web1 world=target",
        "disk 1 alone",
    );
    // A kernel update in the target: the kernel grub.cfg was written with is gone, a newer
    // one is installed, and the OS's own symlinks name it (as Debian's linux-update-symlinks
    // keeps them). Disk 1's GRUB boots the newer one, with no change on the ESP.
    env.change_target(|at| {
        sh(&format!(
            "cd {} && k=$(ls boot/vmlinuz-*) && i=$(ls boot/initrd.img-*) && \
             mv $k $k.update && mv $i $i.update && ln -s $k.update vmlinuz && ln -s $i.update initrd.img",
            at.display()
        ));
    });
    boot(
        &["disk1.img"],
        "REINSTALL-TARGET-BOOTED host=web1 world=target",
        "disk 1 alone, after a kernel update in the target",
    );
    // Later the target panics on every boot (its init dies; `panic=10` reboots, which ends
    // QEMU here): disk 1's GRUB boots it SAVED_TRIES times, counting in its grubenv, and
    // then the rescue OS, naming the target for the rescue's agent to report.
    env.change_target(|at| {
        std::fs::write(at.join("sbin/init"), "#!/bin/busybox sh\nexit 1\n").unwrap();
    });
    for n in 1..=SAVED_TRIES {
        let log = boot_with(
            &["disk1.img", "disk2.img"],
            "Kernel panic - not syncing: Attempted to kill init",
            &format!("both disks, the target's init dies (boot {n})"),
            true,
        );
        assert!(
            log.contains("Booting `target OS'") && !log.contains("REINSTALL-RESCUE-BOOTED"),
            "boot {n}: GRUB did not boot the target, or the rescue came up:\n{log}"
        );
    }
    let log = boot_with(
        &["disk1.img", "disk2.img"],
        "REINSTALL-RESCUE-BOOTED host=web1 world=rescue",
        "both disks, after the target died twice",
        true,
    );
    assert!(!log.contains("Kernel panic"), "{log}");
    let genv = env.disk1_grubenv();
    assert_eq!(
        genv.get(FELL_BACK_VAR).map(String::as_str),
        Some("target"),
        "{genv:?}"
    );
    assert_eq!(genv["saved_entry"], "target", "{genv:?}");
    // The target's kernel is gone: disk 1's GRUB cannot boot its default entry and falls
    // back to its next one, the rescue OS on disk 2, instead of waiting at a GRUB prompt.
    env.change_target(|at| {
        sh(&format!("rm -f {}/boot/vmlinuz*", at.display()));
    });
    let log = boot(
        &["disk1.img", "disk2.img"],
        "REINSTALL-RESCUE-BOOTED host=web1 world=rescue",
        "both disks, disk 1's kernel gone",
    );
    assert!(
        log.contains("Falling back to `reinstall rescue OS'"),
        "disk 1's GRUB did not fall back to the rescue entry:\n{log}"
    );
}

/// A Windows target (synthetic media: NTFS security descriptors, an alternate stream, a short
/// name): the rescue OS lays out disk 1 as Windows Setup does (ESP, MSR, NTFS with the real
/// partition start and a geometry), applies the image from the stash, puts the media's WinPE
/// with the stage script on the ESP and the identity on the volume, and boots WinPE once.
/// When the stage (run by Windows, simulated here) has left its log, the rescue OS boots
/// Windows once; when it failed, the job fails with the stage's log, in the rescue OS.
#[test]
fn a_windows_target_is_applied_from_the_stash_and_boots_through_its_winpe_stage() {
    for stage_ok in [true, false] {
        let env = Env::build(Spec {
            windows: true,
            ..Spec::default()
        });
        let p = env.w.path();
        create_job(&env.stager);
        // source: plan, stage the rescue; rescue: install-target, boot-target.
        for want in ["source", "reinstall-rescue"] {
            assert_eq!(env.current_label(), want);
            let (code, err) = env.boot_linux();
            assert_eq!(code, 100, "{want}: {err}");
            env.power_cycle();
        }
        assert_eq!(env.current_label(), "reinstall-target", "WinPE boots once");
        let fw = FakeFirmware::new(&env.fw).load().unwrap();
        let first = fw.entries.iter().find(|e| e.number == fw.boot_order[0]);
        assert_eq!(
            first.unwrap().label,
            "reinstall-rescue",
            "the rescue stays the default"
        );

        // Disk 1 as Windows wants it.
        let out = run(Command::new("sfdisk").args(["--json", &env.disk1.0]));
        let t: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let parts = t["partitiontable"]["partitions"]
            .as_array()
            .unwrap()
            .clone();
        let types: Vec<&str> = parts.iter().map(|p| p["type"].as_str().unwrap()).collect();
        assert_eq!(
            types,
            [
                "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
                "E3C9E316-0B5C-4DB8-817D-F92DF00215AE",
                "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"
            ]
        );
        let vol = parts[2]["node"].as_str().unwrap().to_string();
        let esp = PathBuf::from(parts[0]["node"].as_str().unwrap());
        // The NTFS boot sector: 512-byte sectors, the partition's real start in "hidden
        // sectors", a geometry (mkntfs finds none on a loop device).
        let mut bs = vec![0u8; 512];
        std::io::Read::read_exact(&mut std::fs::File::open(&vol).unwrap(), &mut bs).unwrap();
        assert_eq!(&bs[3..11], b"NTFS    ");
        assert_eq!(u16::from_le_bytes([bs[11], bs[12]]), 512);
        assert_eq!(u16::from_le_bytes([bs[0x18], bs[0x19]]), 63);
        assert_eq!(u16::from_le_bytes([bs[0x1a], bs[0x1b]]), 255);
        assert_eq!(
            u64::from(u32::from_le_bytes(bs[0x1c..0x20].try_into().unwrap())),
            parts[2]["start"].as_u64().unwrap()
        );
        // The applied tree, compared with the NTFS volume the image was captured from:
        // contents, security descriptors, the alternate stream, the short name.
        let media = p.join("target-tree");
        let src = p.join("mnt-win-src");
        let dst = p.join("mnt-win-dst");
        let mounted = [
            ntfs3g(&format!("{}.src.ntfs", media.display()), &src, true),
            ntfs3g(&vol, &dst, true),
        ];
        let attrs = |root: &Path, rel: &str| -> String {
            let f = root.join(rel);
            let mut s = format!("{:?}", std::fs::read(&f).ok());
            for a in [
                "system.ntfs_acl",
                "system.ntfs_dos_name",
                "user.Zone.Identifier",
            ] {
                let o = Command::new("getfattr")
                    .args(["--only-values", "-e", "hex", "-n", a])
                    .arg(&f)
                    .output()
                    .unwrap();
                s += &format!(" {a}={}", String::from_utf8_lossy(&o.stdout));
            }
            s
        };
        for rel in [
            "Windows/System32/ntoskrnl.exe",
            "Windows/System32/large.dll",
            "Windows/System32/explorer.exe",
            "Windows/System32/config",
            "Users/Public/Long File Name.txt",
        ] {
            assert_eq!(attrs(&src, rel), attrs(&dst, rel), "{rel}");
        }
        // The junction (a reparse point), read with ntfsinfo (ntfs-3g cannot follow a
        // junction to C:; --force: the volumes are mounted read-only): same tag and length.
        let reparse = |dev: &str| -> String {
            let o = sh(&format!(
                "ntfsinfo --force -F '/Documents and Settings' {dev}"
            ));
            o.lines()
                .filter(|l| l.contains("Reparse tag") || l.contains("Data length"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let r = reparse(&vol);
        assert!(r.contains("0xa0000003") && r.contains("(0x34)"), "{r}");
        assert_eq!(r, reparse(&format!("{}.src.ntfs", media.display())));
        // (And the comparison compares something: the attributes are there.)
        let long = attrs(&dst, "Users/Public/Long File Name.txt");
        assert!(long.contains("system.ntfs_dos_name=LONGFI~1.TXT"), "{long}");
        assert!(
            long.contains("user.Zone.Identifier=[ZoneTransfer]"),
            "{long}"
        );
        assert!(!long.contains("system.ntfs_acl= "), "{long}");
        // The identity: unattend.xml well-formed and carrying the captured addresses, by MAC;
        // the first-boot script; the carried keys.
        let unattend = std::fs::read_to_string(dst.join("Windows/Panther/unattend.xml")).unwrap();
        ok(Command::new("python3")
            .args([
                "-c",
                "import sys, xml.dom.minidom; xml.dom.minidom.parse(sys.argv[1])",
            ])
            .arg(dst.join("Windows/Panther/unattend.xml")));
        let rescue_root = p.join("mnt-rescue-check");
        {
            let _r = mount(&format!("{}p2", env.disk2.0), &rescue_root, true);
            let net: serde_json::Value = serde_json::from_slice(
                &std::fs::read(rescue_root.join("var/lib/reinstall/network.json")).unwrap(),
            )
            .unwrap();
            for i in net["interfaces"].as_array().unwrap() {
                let mac = i["mac"].as_str().unwrap().replace(':', "-").to_uppercase();
                assert!(
                    unattend.contains(&format!("<Identifier>{mac}</Identifier>")),
                    "{mac}"
                );
                for a in i["addresses"].as_array().unwrap() {
                    if a["dynamic"] == false {
                        let want = format!(
                            ">{}/{}</IpAddress>",
                            a["address"].as_str().unwrap(),
                            a["prefix"]
                        );
                        assert!(unattend.contains(&want), "{want} not in unattend.xml");
                    }
                }
            }
        }
        assert!(
            unattend.contains("<ComputerName>web1</ComputerName>"),
            "{unattend}"
        );
        assert!(dst.join("Windows/Setup/Scripts/SetupComplete.cmd").exists());
        assert!(std::fs::read_to_string(dst.join("reinstall/firstboot.ps1"))
            .unwrap()
            .contains("OpenSSH.Server"));
        assert_eq!(
            std::fs::read(dst.join("reinstall/ssh/administrators_authorized_keys")).unwrap(),
            std::fs::read(p.join("carry-expect/root/.ssh/authorized_keys")).unwrap()
        );
        assert_eq!(
            std::fs::read(dst.join("reinstall/ssh/ssh_host_ed25519_key")).unwrap(),
            std::fs::read(p.join("carry-expect/etc/ssh/ssh_host_ed25519_key")).unwrap()
        );
        // The call home Windows's first-boot script makes (curl.exe, Schannel), made here with
        // curl and OpenSSL from the same files: the PKCS#12 identity (3DES/RC2, what Windows
        // reads: OpenSSL 3 needs -legacy), its password and the stager's URL in the script,
        // the event. Kept for after WinPE's stage.
        let script = std::fs::read_to_string(dst.join("reinstall/firstboot.ps1")).unwrap();
        let pass = script
            .split("--pass '")
            .nth(1)
            .unwrap()
            .split('\'')
            .next()
            .unwrap();
        let url = script
            .split("'https://")
            .nth(1)
            .map(|u| format!("https://{}", u.split('\'').next().unwrap()))
            .unwrap();
        assert!(url.ends_with("/v1/agent/events"), "{url}");
        assert!(
            script.find("curl.exe").unwrap()
                < script.find("displayorder '{bootmgr}' /addfirst").unwrap(),
            "Windows becomes the default only after calling home"
        );
        let pem = p.join("host-from-p12.pem");
        ok(Command::new("openssl")
            .args(["pkcs12", "-legacy", "-nodes", "-in"])
            .arg(dst.join("reinstall/host.p12"))
            .args(["-passin", &format!("pass:{pass}"), "-out"])
            .arg(&pem));
        let up = p.join("target-up.json");
        std::fs::copy(dst.join("reinstall/target-up.json"), &up).unwrap();
        let ca = p.join("ca-from-windows.pem");
        std::fs::copy(dst.join("reinstall/ca.pem"), &ca).unwrap();
        drop(mounted);
        // The ESP: the media's boot manager and BCD as they are, WinPE with the stage script.
        use bootcfg::loader::read_esp;
        assert_eq!(
            read_esp(&esp, "EFI/BOOT/BOOTX64.EFI").unwrap(),
            std::fs::read(media.join("efi/boot/bootx64.efi")).unwrap()
        );
        assert!(read_esp(&esp, "EFI/Microsoft/Boot/BCD").is_ok());
        assert_eq!(
            read_esp(&esp, "boot/boot.sdi").unwrap(),
            std::fs::read(media.join("boot/boot.sdi")).unwrap()
        );
        let pe = p.join("boot.wim");
        std::fs::write(&pe, read_esp(&esp, "sources/boot.wim").unwrap()).unwrap();
        let listing = sh(&format!("wimlib-imagex dir {} 1", pe.display()));
        assert!(
            listing.contains("/reinstall/stage.cmd")
                && listing.contains("/Windows/System32/winpeshl.ini"),
            "{listing}"
        );

        // WinPE runs its stage (simulated: Windows's bcdboot cannot run here) and reboots;
        // BootNext is spent, the rescue OS comes up.
        let log = if stage_ok {
            "stage-done.log"
        } else {
            "stage-failed.log"
        };
        {
            let _m = ntfs3g(&vol, &dst, false);
            std::fs::write(
                dst.join("reinstall").join(log),
                "bcdboot: Boot files successfully created.\r\n",
            )
            .unwrap();
        }
        env.power_cycle();
        env.power_cycle();
        assert_eq!(env.current_label(), "reinstall-rescue");
        let (code, err) = env.boot_linux();
        if stage_ok {
            assert_eq!(code, 100, "{err}");
            assert!(
                err.contains("the WinPE stage built the boot store"),
                "{err}"
            );
            assert_eq!(env.next_label(), "reinstall-target", "Windows boots once");
            // Windows comes up and its first-boot script calls home: the job is done.
            assert_ne!(job_state(&env.stager)["state"], "done");
            let out = ok(Command::new("curl")
                .args(["-sS", "--fail", "--max-time", "30", "--cert"])
                .arg(&pem)
                .arg("--cacert")
                .arg(&ca)
                .args(["-H", "Content-Type: application/json", "--data-binary"])
                .arg(format!("@{}", up.display()))
                .arg(&url));
            let job = job_state(&env.stager);
            assert_eq!(job["state"], "done", "{out} {job}");
        } else {
            assert_ne!(code, 100, "{err}");
            let job = job_state(&env.stager);
            assert!(
                job.to_string().contains("bcdboot: Boot files"),
                "the stage's log reaches the stager: {job}"
            );
            assert_eq!(env.next_label(), "reinstall-rescue");
        }
    }
}

/// Power cuts while the rescue OS installs a Windows target: at the phase's start, inside the
/// image being applied, after an ESP file, after the image, at the phase's end, entering
/// boot-target. Each time the firmware's next boot is the rescue OS (disk 1 boots nothing until
/// boot-target), and the rescue OS, booted again, installs Windows from the start and boots
/// WinPE once.
#[test]
fn a_power_cut_anywhere_in_a_windows_install_comes_back_to_rescue_and_resumes() {
    for fp in [
        "enter-install-target",
        "windows-apply",
        "unpack-entry@5",
        "unpack-entry@13",
        "done-install-target",
        "enter-boot-target",
    ] {
        let env = Env::build(Spec {
            windows: true,
            ..Spec::default()
        });
        create_job(&env.stager);
        let (code, err) = env.boot_linux();
        assert_eq!(code, 100, "source: {err}");
        env.power_cycle();
        assert_eq!(env.current_label(), "reinstall-rescue");
        let (_, err) = env.boot_linux_with(Some(fp));
        let name = fp.split('@').next().unwrap();
        assert!(
            err.contains(&format!("failpoint {name} hit")),
            "{fp} did not fire: {err}"
        );
        assert_eq!(
            env.next_label(),
            "reinstall-rescue",
            "after a cut at {fp} the next boot must be the rescue OS"
        );
        if fp.starts_with("windows-apply") || fp.starts_with("unpack-entry") {
            // Nor may firmware that boots disk 1's removable-media path first find a loader
            // there: the media's WinPE arrives on the ESP only when the volume is complete.
            let esp = PathBuf::from(part_named(&env.disk1.0, "EFI system partition"));
            assert!(
                bootcfg::loader::read_esp(&esp, "EFI/BOOT/BOOTX64.EFI").is_err(),
                "after a cut at {fp}, disk 1's removable path boots WinPE on a half-written volume"
            );
        }
        env.power_cycle();
        assert_eq!(env.current_label(), "reinstall-rescue", "{fp}");
        let (code, err) = env.boot_linux();
        assert_eq!(code, 100, "after {fp}: {err}");
        assert_eq!(
            env.next_label(),
            "reinstall-target",
            "after {fp}: WinPE once"
        );
        let vol = part_named(&env.disk1.0, "Basic data partition");
        let unattend = sh(&format!("ntfscat {vol} /Windows/Panther/unattend.xml"));
        assert!(
            unattend.contains("<ComputerName>web1</ComputerName>"),
            "after {fp}"
        );
        assert!(
            sh(&format!(
                "ntfscat {vol} /Windows/System32/large.dll | wc -c"
            ))
            .trim()
                == "300000",
            "after {fp}: the image is whole"
        );
    }
}

/// A rescue OS that could not install Windows (no wimtools/ntfs-3g in the rescue bundle) is
/// found in stage-rescue, on the source OS, before the machine boots away from it: the job
/// stops with the missing programs named, and the next boot is still the source OS.
#[test]
fn a_windows_job_with_a_rescue_that_lacks_the_windows_tools_stops_on_the_source() {
    let env = Env::build(Spec {
        windows: true,
        ..Spec::default()
    });
    let bare = env.w.path().join("bare-rescue");
    os_tree(&bare, "rescue");
    ok(integration_tests::stager()
        .args(["bundle", "build", "--dir"])
        .arg(&env.stager.home)
        .args([
            "--name",
            "bare-rescue",
            "--version",
            "1",
            "--kind",
            "rescue",
            "--os",
            "linux",
        ])
        .arg(&bare));
    ok(env.stager.reinstall("alice").args([
        "--host",
        "web1",
        "--target",
        "target",
        "--rescue",
        "bare-rescue",
    ]));
    let (code, err) = env.boot_linux();
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cannot install a Windows target")
            && err.contains("wimapply (wimtools)")
            && err.contains("mkntfs (ntfs-3g)"),
        "{err}"
    );
    assert_eq!(
        env.next_label(),
        "source",
        "the machine stays in the source OS"
    );
    env.check_next_boot("after the refusal");
}
