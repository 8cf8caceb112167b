//! One QEMU machine: q35 under TCG (or KVM when it really works), OVMF with a private
//! variable store or SeaBIOS, two disks, user networking with `restrict=on` (nothing leaves
//! QEMU), SSH forwarded from 127.0.0.1 and the stager reached through a per-connection
//! `guestfwd` command. Every start writes a new serial log.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const GUEST_IP: &str = "10.0.2.50";
pub const STAGER_IP: &str = "10.0.2.100";
pub const STAGER_PORT: u16 = 8443;
pub const MAC: &str = "52:54:00:12:34:56";
/// The second NIC of a machine with a bond (`--bond`).
pub const MAC2: &str = "52:54:00:12:34:57";

/// OVMF's code (read-only) and a private copy of its variable store, as pflash units 0 and 1.
fn ovmf<'a>(c: &'a mut Command, vars: &Path) -> &'a mut Command {
    c.args([
        "-drive",
        "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
    ])
    .arg("-drive")
    .arg(format!(
        "if=pflash,format=raw,unit=1,file={}",
        vars.display()
    ))
}

pub struct Vm {
    pub dir: PathBuf,
    pub disk1: PathBuf,
    pub disk2: PathBuf,
    /// Disk 2 as NVMe instead of virtio.
    pub nvme2: bool,
    /// A third disk (virtio, serial `VMDATA`), as a machine's data disk: no reinstall may
    /// touch it, and with it the agent cannot guess disk 2.
    pub data_disk: Option<PathBuf>,
    /// An i6300esb watchdog on the machine (`--hang`).
    pub watchdog: bool,
    /// A second NIC (`--bond`), on a user network of its own that forwards nothing.
    pub second_nic: bool,
    pub uefi: bool,
    pub ssh_port: u16,
    /// The host port the stager listens on.
    pub stager_port: u16,
    /// The harness's own binary, which relays guestfwd connections.
    pub relay: PathBuf,
    pub key: PathBuf,
    pub known_hosts: PathBuf,
    child: Option<Child>,
    pub starts: usize,
    /// Guest reboots after which the emulated firmware never started again (seen once under
    /// TCG: OVMF silent after "reboot: machine restart"); each was power-cycled.
    pub hung_resets: usize,
    watch: ResetWatch,
}

/// Notices a guest reboot that never came back: the serial log ends in the kernel's
/// "machine restart" and has not grown for a while.
struct ResetWatch {
    /// Serial log size and when it last changed.
    seen: (u64, Instant),
}

impl ResetWatch {
    fn new() -> ResetWatch {
        ResetWatch {
            seen: (0, Instant::now()),
        }
    }

    /// Why the guest will not come back by itself, if it will not: the boot stopped before
    /// the kernel, or the kernel reports a CPU stuck for [`STUCK`].
    fn hung(&mut self, log: &Path, after: Duration) -> Option<String> {
        let len = std::fs::metadata(log).map(|m| m.len()).unwrap_or(0);
        let grew = len != self.seen.0;
        if grew {
            self.seen = (len, Instant::now());
        }
        let silent = !grew && self.seen.1.elapsed() >= after;
        if !grew && !silent {
            return None;
        }
        let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
        // Where this boot began: the kernel's restart (or its panic's "Rebooting in 10
        // seconds..", after which the emulator once stopped before the firmware printed a
        // word), or the firmware or boot loader starting (a reset by the machine's watchdog
        // leaves no restart message).
        let since = [
            "reboot: machine restart",
            "reboot: Restarting system",
            "Rebooting in ",
            "BdsDxe: loading",
            "SeaBIOS (version",
            "Welcome to GRUB!",
        ]
        .iter()
        .filter_map(|m| text.rfind(m).map(|i| i + m.len()))
        .max()
        .unwrap_or(0);
        let boot = &text[since..];
        // Silent, and since the last reset (or power-on) no kernel has started: the firmware
        // or the boot loader stopped (seen under TCG: OVMF silent after a warm reset; GRUB
        // stopped after "Welcome to GRUB!" or after "Booting ..."). A started kernel may be
        // silent for long (the agent writing gigabytes logs nothing to the console).
        if silent && !boot.contains("Linux version") {
            return Some(format!(
                "the serial console has been silent for {}s and no kernel started since the last reset (firmware or boot loader stopped)",
                after.as_secs()
            ));
        }
        // A kernel that keeps reporting a CPU stuck for minutes (seen under TCG: a soft
        // lockup in udev's ata_id at boot, re-reported for half an hour while the log grew)
        // does not come back; a hardware watchdog would reset the machine.
        let stuck = boot
            .rfind("soft lockup - CPU#")
            .and_then(|i| boot[i..].split("stuck for ").nth(1))
            .and_then(|r| r.split('s').next())
            .and_then(|n| n.trim().parse::<u64>().ok())?;
        (stuck >= STUCK.as_secs())
            .then(|| format!("the guest kernel reports a CPU stuck for {stuck}s (a soft lockup)"))
    }
}

fn tail_lines(log: &Path, n: usize) -> String {
    let log = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).replace('\r', "");
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// How long the serial console may stay silent after the guest kernel's "machine restart"
/// before the harness, like a BMC, cuts the power and starts the machine again. OVMF under
/// TCG prints its first line within seconds of a reset.
const RESET_HANG: Duration = Duration::from_secs(120);
/// A soft lockup the guest kernel reports for this long is taken for a hung machine.
const STUCK: Duration = Duration::from_secs(120);
/// More hung resets than this in one run fail it: the emulator, not a flake.
const MAX_HUNG_RESETS: usize = 2;

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Vm {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dir: &Path,
        disk1: PathBuf,
        disk2: PathBuf,
        uefi: bool,
        nvme2: bool,
        stager_port: u16,
        key: PathBuf,
        known_hosts: PathBuf,
    ) -> Result<Vm> {
        if uefi {
            std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", dir.join("vars.fd"))
                .context("copying OVMF_VARS_4M.fd (package ovmf)")?;
        }
        Ok(Vm {
            dir: dir.to_path_buf(),
            disk1,
            disk2,
            nvme2,
            data_disk: None,
            watchdog: false,
            second_nic: false,
            uefi,
            ssh_port: free_port()?,
            stager_port,
            // A copy of this binary: a rebuild while the VM runs would leave QEMU running a
            // path that says "(deleted)".
            relay: {
                let r = dir.join("vm-harness-relay");
                std::fs::copy(std::env::current_exe()?, &r).context("copying the relay binary")?;
                r
            },
            key,
            known_hosts,
            child: None,
            starts: 0,
            hung_resets: 0,
            watch: ResetWatch::new(),
        })
    }

    pub fn serial_log(&self) -> PathBuf {
        self.dir.join(format!("serial-{}.log", self.starts))
    }

    /// Powers the machine on.
    pub fn start(&mut self) -> Result<()> {
        anyhow::ensure!(self.child.is_none(), "the VM is already running");
        self.starts += 1;
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-machine", "q35", "-m", "1024", "-smp", "2"])
            .args(["-accel", accel()])
            .args(["-cpu", cpu()])
            .args(["-display", "none", "-monitor", "none"])
            .arg("-serial")
            .arg(format!("file:{}", self.serial_log().display()));
        if self.uefi {
            ovmf(&mut c, &self.dir.join("vars.fd"));
        }
        c.arg("-drive")
            .arg(format!(
                "file={},format=raw,if=none,id=d1",
                self.disk1.display()
            ))
            .args([
                "-device",
                "virtio-blk-pci,drive=d1,serial=VMDISK1,bootindex=1",
            ])
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=none,id=d2",
                self.disk2.display()
            ))
            .arg("-device")
            .arg(if self.nvme2 {
                "nvme,drive=d2,serial=VMDISK2,bootindex=2"
            } else {
                "virtio-blk-pci,drive=d2,serial=VMDISK2,bootindex=2"
            });
        if let Some(d) = &self.data_disk {
            c.arg("-drive")
                .arg(format!("file={},format=raw,if=none,id=d3", d.display()))
                .args(["-device", "virtio-blk-pci,drive=d3,serial=VMDATA"]);
        }
        let relay = format!(
            "{} relay 127.0.0.1:{}",
            self.relay.display(),
            self.stager_port
        );
        c.arg("-netdev").arg(format!(
            "user,id=n0,restrict=on,net=10.0.2.0/24,hostfwd=tcp:127.0.0.1:{}-{GUEST_IP}:22,guestfwd=tcp:{STAGER_IP}:{STAGER_PORT}-cmd:{relay}",
            self.ssh_port
        ));
        c.args(["-device", &format!("virtio-net-pci,netdev=n0,mac={MAC}")]);
        if self.second_nic {
            c.args([
                "-netdev",
                "user,id=n1,restrict=on,net=10.0.3.0/24",
                "-device",
                &format!("virtio-net-pci,netdev=n1,mac={MAC2}"),
            ]);
        }
        if self.watchdog {
            // A hardware watchdog, as servers have (iTCO, IPMI): QEMU resets the machine when
            // it expires. The OSes the agent writes have systemd arm it.
            c.args(["-device", "i6300esb"]);
        }
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(
                self.dir.join(format!("qemu-{}.err", self.starts)),
            )?);
        self.child = Some(c.spawn().context("starting qemu-system-x86_64")?);
        self.watch = ResetWatch::new();
        Ok(())
    }

    /// Cuts the power: SIGKILL, no shutdown.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether QEMU still runs (it exits on its own only on error). Also the boot watchdog: a
    /// guest whose serial console stayed silent for `RESET_HANG` before any kernel started
    /// since its last reset (firmware or boot loader stopped) is power-cycled, as a BMC
    /// would (counted in `hung_resets`, at most `MAX_HUNG_RESETS`: a boot path that stops
    /// every time still fails the run).
    pub fn running(&mut self) -> Result<bool> {
        let why = match self.child {
            Some(_) => self.watch.hung(&self.serial_log(), RESET_HANG),
            None => None,
        };
        if let Some(why) = why {
            self.hung_resets += 1;
            eprintln!(
                "vm-harness: {why}; power-cycling ({} of at most {MAX_HUNG_RESETS})",
                self.hung_resets
            );
            anyhow::ensure!(
                self.hung_resets <= MAX_HUNG_RESETS,
                "the guest hung {} times ({why}); see {}",
                self.hung_resets,
                self.serial_log().display()
            );
            self.kill();
            self.start()?;
        }
        match &mut self.child {
            None => Ok(false),
            Some(c) => match c.try_wait()? {
                None => Ok(true),
                Some(st) => {
                    self.child = None;
                    let err =
                        std::fs::read_to_string(self.dir.join(format!("qemu-{}.err", self.starts)))
                            .unwrap_or_default();
                    bail!("qemu exited ({st}): {}", err.trim())
                }
            },
        }
    }

    /// How often `what` appears in the serial consoles of every start of this VM so far.
    pub fn serial_count(&self, what: &str) -> usize {
        (0..=self.starts)
            .filter_map(|n| std::fs::read(self.dir.join(format!("serial-{n}.log"))).ok())
            .map(|b| String::from_utf8_lossy(&b).matches(what).count())
            .sum()
    }

    pub fn serial_tail(&self, n: usize) -> String {
        tail_lines(&self.serial_log(), n)
    }

    /// `ssh` and its options to reach this machine (its destination: `root@127.0.0.1`).
    pub fn ssh_command(&self) -> Vec<String> {
        let mut c: Vec<String> = [
            "ssh",
            "-q",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "HostKeyAlgorithms=ssh-ed25519",
        ]
        .map(String::from)
        .into();
        c.push("-o".into());
        c.push(format!("UserKnownHostsFile={}", self.known_hosts.display()));
        c.push("-i".into());
        c.push(self.key.display().to_string());
        c.push("-p".into());
        c.push(self.ssh_port.to_string());
        c
    }

    /// Runs `cmd` as root over SSH, checking the host key against the known one (the
    /// source's): a changed host key fails like an unreachable machine, with the reason.
    pub fn ssh(&self, cmd: &str) -> Result<String> {
        let ssh = self.ssh_command();
        let out = Command::new(&ssh[0])
            .args(&ssh[1..])
            .args(["root@127.0.0.1", cmd])
            .stdin(Stdio::null())
            .output()
            .context("running ssh")?;
        if !out.status.success() {
            bail!(
                "ssh {cmd:?}: {} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until SSH answers and `check` accepts what the guest reports (world, root
    /// device, hostname), or fails after `limit` with the serial console's last lines.
    pub fn wait_for(
        &mut self,
        what: &str,
        limit: Duration,
        check: &dyn Fn(&Facts) -> bool,
    ) -> Result<Facts> {
        let t = Instant::now();
        let mut last = String::from("no answer yet");
        while t.elapsed() < limit {
            self.running()?;
            match self.ssh(FACTS_CMD).map(|o| Facts::parse(&o)) {
                Ok(f) if check(&f) => return Ok(f),
                Ok(f) => last = format!("answered as {f:?}"),
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_secs(3));
        }
        bail!(
            "waited {}s for {what}: {last}\nserial console (last lines):\n{}",
            limit.as_secs(),
            self.serial_tail(25)
        )
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `addr`: the first address on the interface the default route goes through (the one the
/// machine is reached at; a bridge beside it, as Docker's, may hold others).
const FACTS_CMD: &str = "echo world=$(cat /etc/reinstall/world 2>/dev/null || echo source); \
    echo root=$(findmnt -no SOURCE /); echo host=$(hostname); \
    echo boot=$(cat /proc/sys/kernel/random/boot_id); \
    echo addr=$(ip -4 -o addr show scope global dev \"$(ip -4 route show default | awk '{print $5; exit}')\" \
        | awk '{print $4}' | head -1)";

/// What the guest says about itself.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub world: String,
    pub root: String,
    pub host: String,
    pub boot_id: String,
    pub addr: String,
}

impl Facts {
    fn parse(out: &str) -> Facts {
        let mut f = Facts::default();
        for l in out.lines() {
            if let Some((k, v)) = l.split_once('=') {
                let v = v.trim().to_string();
                match k {
                    "world" => f.world = v,
                    "root" => f.root = v,
                    "host" => f.host = v,
                    "boot" => f.boot_id = v,
                    "addr" => f.addr = v,
                    _ => {}
                }
            }
        }
        f
    }
}

/// The accelerator: KVM only where it really runs a guest, else TCG. `/dev/kvm` is not
/// evidence (MACHINE-NOTES: here it exists, and guests die with "KVM internal error"): with
/// vmx/svm in /proc/cpuinfo (or REINSTALL_VM_ACCEL=probe), OVMF is started under KVM for up to
/// 20 s and must reach its boot manager. REINSTALL_VM_ACCEL=tcg|kvm decides without a probe.
pub fn accel() -> &'static str {
    static ACCEL: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    ACCEL.get_or_init(|| {
        const TCG: &str = "tcg,thread=multi";
        let forced = std::env::var("REINSTALL_VM_ACCEL").unwrap_or_default();
        let verdict = match forced.as_str() {
            "tcg" => return TCG,
            "kvm" => return "kvm",
            "probe" => probe_kvm(),
            _ if std::fs::read_to_string("/proc/cpuinfo")
                .unwrap_or_default()
                .split_whitespace()
                .any(|w| w == "vmx" || w == "svm") =>
            {
                probe_kvm()
            }
            _ => Err("no vmx/svm in /proc/cpuinfo".to_string()),
        };
        match verdict {
            Ok(()) => {
                eprintln!("vm-harness: KVM works here; using it");
                "kvm"
            }
            Err(why) => {
                eprintln!("vm-harness: using TCG (software emulation): KVM unusable: {why}");
                TCG
            }
        }
    })
}

/// The guest CPU. Under KVM the host's. Under TCG QEMU's default (qemu64) has no SSSE3,
/// AES-NI or PCLMULQDQ, which every server the agent runs on has: without them ring's
/// AES-GCM (the TLS to the stager) falls back to its slowest code, and the guest's downloads
/// run at a third of the speed (ring under qemu-user: 9.6 MB/s on qemu64, 26 MB/s with these;
/// the stash download in `full`: 1.9 MiB/s, 6.0 MiB/s), which tests the emulator, not us.
pub fn cpu() -> &'static str {
    if accel() == "kvm" {
        "host"
    } else {
        "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt,+aes,+pclmulqdq"
    }
}

fn probe_kvm() -> std::result::Result<(), String> {
    let dir = std::env::temp_dir().join(format!("vm-harness-kvm-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let vars = dir.join("vars.fd");
    let serial = dir.join("serial.log");
    let result = (|| {
        std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars).map_err(|e| e.to_string())?;
        let mut qemu = Command::new("qemu-system-x86_64");
        qemu.args([
            "-machine",
            "q35",
            "-accel",
            "kvm",
            "-m",
            "256",
            "-nodefaults",
        ])
        .args(["-display", "none", "-net", "none"]);
        let mut child = ovmf(&mut qemu, &vars)
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let t = Instant::now();
        let verdict = loop {
            let log = std::fs::read(&serial).unwrap_or_default();
            if String::from_utf8_lossy(&log).contains("BdsDxe") {
                break Ok(());
            }
            if let Ok(Some(st)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                break Err(format!("qemu -accel kvm exited ({st}): {}", err.trim()));
            }
            if t.elapsed() > Duration::from_secs(20) {
                break Err("OVMF did not reach its boot manager under KVM in 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let _ = child.kill();
        let _ = child.wait();
        verdict
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// `guestfwd` runs this per connection: stdin/stdout to a TCP connection to `addr`.
pub fn relay(addr: &str) -> Result<()> {
    let s = std::net::TcpStream::connect(addr).with_context(|| format!("connecting {addr}"))?;
    let mut r = s.try_clone()?;
    // The raw descriptor: Rust's stdout buffers by lines, which would hold binary TLS records.
    use std::os::fd::AsFd;
    let mut out = std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
    let t = std::thread::spawn(move || {
        let _ = std::io::copy(&mut r, &mut out);
    });
    let mut w = s.try_clone()?;
    let _ = std::io::copy(&mut std::io::stdin().lock(), &mut w);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let _ = t.join();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_watch_fires_only_on_a_boot_that_stopped_before_the_kernel() {
        let dir = std::env::temp_dir().join(format!("reset-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("serial.log");
        let quiet = Duration::from_millis(200);
        let mut w = ResetWatch::new();
        // A running guest that is merely quiet: never.
        std::fs::write(
            &log,
            "[    0.0] Linux version 6.1.0\r\n[   12.0] systemd[1]: Started ssh.service\r\n",
        )
        .unwrap();
        assert!(w.hung(&log, quiet).is_none());
        std::thread::sleep(quiet * 2);
        assert!(w.hung(&log, quiet).is_none());
        // A reboot: not before the log has been silent long enough.
        std::fs::write(
            &log,
            "[   40.9] reboot: Restarting system\r\n[   40.9] reboot: machine restart\r\n",
        )
        .unwrap();
        assert!(w.hung(&log, quiet).is_none());
        std::thread::sleep(quiet / 4);
        assert!(w.hung(&log, quiet).is_none());
        std::thread::sleep(quiet * 2);
        assert!(w.hung(&log, quiet).is_some());
        // The firmware and GRUB printed something after the reset, then stopped: hung too.
        std::fs::write(
            &log,
            "[   40.9] reboot: machine restart\r\nBdsDxe: loading Boot0005\r\nWelcome to GRUB!\r\n",
        )
        .unwrap();
        assert!(w.hung(&log, quiet).is_none());
        std::thread::sleep(quiet * 2);
        assert!(w.hung(&log, quiet).is_some());
        // A kernel started after the reset: a quiet guest, never hung.
        std::fs::write(
            &log,
            "[   40.9] reboot: machine restart\r\nBdsDxe: loading Boot0005\r\n[    0.0] Linux version 6.1.0\r\n",
        )
        .unwrap();
        assert!(w.hung(&log, quiet).is_none());
        std::thread::sleep(quiet * 2);
        assert!(w.hung(&log, quiet).is_none());
        // A started kernel that reports a CPU stuck for minutes, its log still growing.
        let lockup = |secs: u64| {
            format!(
                "[    0.0] Linux version 6.1.0\r\n[  {secs}.7] watchdog: BUG: soft lockup - CPU#0 stuck for {secs}s! [ata_id:242]\r\n"
            )
        };
        std::fs::write(&log, lockup(23)).unwrap();
        assert!(w.hung(&log, quiet).is_none(), "a short lockup passes");
        std::fs::write(&log, lockup(23) + &lockup(119)).unwrap();
        assert!(w.hung(&log, quiet).is_none());
        std::fs::write(&log, lockup(23) + &lockup(119) + &lockup(279)).unwrap();
        let why = w.hung(&log, quiet).expect("stuck for 279 s");
        assert!(why.contains("stuck for 279s"), "{why}");
        // After the reset, a new boot's log: the old lockup is not this boot's.
        std::fs::write(
            &log,
            lockup(279) + "[  300.0] reboot: machine restart\r\n[    0.0] Linux version 6.1.0\r\n",
        )
        .unwrap();
        assert!(w.hung(&log, quiet).is_none());
        // A kernel reset by the watchdog (no restart message), then the boot loader stopped.
        std::fs::write(
            &log,
            "[    0.0] Linux version 6.1.0\r\nvm-harness: freezing systemd\r\nBdsDxe: loading Boot0005\r\nWelcome to GRUB!\r\n  Booting `target OS'\r\n",
        )
        .unwrap();
        assert!(w.hung(&log, quiet).is_none());
        std::thread::sleep(quiet * 2);
        assert!(w.hung(&log, quiet).is_some());
        // A kernel panic's reboot after which nothing more came (seen with `full --bond`).
        std::fs::write(
            &log,
            "[    0.0] Linux version 6.1.0\r\n[   17.9] Kernel panic - not syncing: sysrq triggered crash\r\n[   17.9] Rebooting in 10 seconds..\r\n",
        )
        .unwrap();
        assert!(w.hung(&log, quiet).is_none());
        std::thread::sleep(quiet * 2);
        assert!(w.hung(&log, quiet).is_some());
        // ... and when the next boot's kernel started, a quiet guest again.
        std::fs::write(
            &log,
            "[   17.9] Rebooting in 10 seconds..\r\nBdsDxe: loading Boot0005\r\n[    0.0] Linux version 6.1.0\r\n",
        )
        .unwrap();
        assert!(w.hung(&log, quiet).is_none());
        std::thread::sleep(quiet * 2);
        assert!(w.hung(&log, quiet).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
