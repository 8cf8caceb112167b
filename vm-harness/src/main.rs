//! `vm-harness`: real two-disk, two-reboot migrations under QEMU (DESIGN.md §2, issue 6).
//!
//! Builds Debian images from the machine's own apt sources (cached by recipe), starts a real
//! stager on 127.0.0.1, boots a source VM with the agent installed and enrolled, and has an
//! operator run `reinstall --target ... --wait` against it; then watches, from outside the
//! VM only (SSH with the pinned host key, the stager's status), the machine move itself
//! source → rescue → target through real firmware reboots.

mod images;
mod scenario;
mod vm;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

/// Real two-disk, two-reboot migrations under QEMU (UEFI: OVMF), checked from outside.
///
/// Scenarios:
///   full        source → rescue → target; after each boot: SSH at the same address with the
///               same host key, the root on the expected disk, the stager's phase; at the end
///               the target's marker, the rescue and the stash intact, the boot order, the
///               entries as efibootmgr lists them; rescue on request and back; a target
///               that stops coming up (panics at boot; emergency mode on BIOS; hangs with
///               --hang) is given up on by disk 1's GRUB after two boots, the rescue
///               reports it, repaired from there; a second job. With --bond, every boot
///               also shows the source's bond of two NICs and its VLAN as they were (with
///               --arp, monitoring by ARP); with
///               --bridge, its bridge and the VLAN on it, its anycast dummy and that address's policy rule
///               and table (and only the source its Docker-style bridge).
///   bad-target  a target whose kernel panics: the machine comes back in rescue by itself and
///               the stager shows the failure; then a job with a good target is taken by the
///               rescue OS, which installs it from there (rescue kept) and boots it.
///   power-cut   SIGKILL QEMU at phase boundaries and inside long writes, power on again,
///               and check where the machine ends up (table: cut point, outcome, recovery).
///               --second-job: the cut falls in a second job, after a whole first one.
///   windows-layout  the rescue half of a Windows target (synthetic media, UEFI): disk 1 laid
///               out and written by the rescue OS, checked from the host; the stand-in WinPE
///               cannot start, so the machine must come back to rescue with the job failed.
///   all         full, bad-target, windows-layout (UEFI), power-cut.
///
/// --relay: every scenario through a site relay between the VM and the stager.
///
/// --bios: SeaBIOS instead of OVMF; the source disk boots through its own Debian GRUB for
/// BIOS. `full --bios` checks the migration, the default boot, the rescue on request and
/// back, the target that stops coming up, and a second job (not: efibootmgr, which has
/// nothing to show).
#[derive(Parser)]
#[command(name = "vm-harness", verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Boot through SeaBIOS instead of OVMF.
    #[arg(long, global = true)]
    bios: bool,
    /// Disk 2 as an NVMe drive instead of virtio.
    #[arg(long, global = true)]
    nvme: bool,
    /// Give the VM a hardware watchdog (i6300esb), and in `full` make the broken target hang
    /// (systemd frozen) instead of panicking or falling into emergency mode: the watchdog the
    /// agent has systemd arm must reset it. Not in CI (see the README).
    #[arg(long, global = true)]
    hang: bool,
    /// Put the VM's address on an active-backup bond of two NICs (the first primary; the
    /// second on a user network of its own), with VLAN 100 on the bond holding another
    /// address, as the source OS configures them (systemd-networkd). Every boot must show
    /// them as they were: the agent carries bonds and VLANs into the rescue and the target.
    #[arg(long, global = true)]
    bond: bool,
    /// With --bond: the bond monitors its links by ARP (every 500 ms, to the gateway,
    /// validating replies on the active link) instead of MII; every boot must show the same.
    #[arg(long, global = true, requires = "bond")]
    arp: bool,
    /// Put the VM's address on bridge br0 (STP on, forward delay 4 s) with the NIC as its
    /// port and VLAN 200 on it holding 198.51.100.9/24, and give the source a portless
    /// docker0 bridge holding 172.17.0.1/16, as the source OS configures them
    /// (systemd-networkd), beside dummy0 holding an anycast address (192.0.2.53/32) whose
    /// replies a policy rule routes through table 100. Every boot must show br0, its VLAN,
    /// dummy0, the rule and the table as they were; docker0 is left behind by the agent (it
    /// is Docker's to make), so only the source has it.
    #[arg(long, global = true, conflicts_with = "bond")]
    bridge: bool,
    /// The VM reaches the stager through a site relay (`stager relay serve` on 127.0.0.1,
    /// its certificate for the stager's address as the guest knows it): every request of the
    /// agent goes through it. A passed scenario also requires, from the relay's log, that
    /// each blob crossed from the stager to the relay at most once.
    #[arg(long, global = true)]
    relay: bool,
    /// Working directory (disk images, serial logs, the stager's home and log).
    #[arg(long, global = true, default_value = "/var/tmp/reinstall-vm")]
    work: PathBuf,
    /// Where built trees are cached between runs (rebuilt when their recipe changes).
    #[arg(
        long,
        global = true,
        env = "REINSTALL_VM_CACHE",
        default_value = "/var/tmp/reinstall-vm-cache"
    )]
    cache: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    Full,
    BadTarget,
    WindowsLayout,
    PowerCut {
        /// Cut points to run (default: all). See --list.
        #[arg(long, value_delimiter = ',')]
        points: Vec<String>,
        /// List the cut points and exit.
        #[arg(long)]
        list: bool,
        /// Cut in a second job: each run first takes the machine through a whole job, so the
        /// cut falls in a job that starts in an OS reinstall installed (on BIOS: through the
        /// GRUB of the first job, its rescue entry sent to the new rescue OS).
        #[arg(long)]
        second_job: bool,
    },
    All,
    /// Print the accelerator the VMs would use (KVM only if a probe boot works; else TCG) and,
    /// on a second line, the guest CPU model.
    Accel,
    /// (internal) guestfwd's per-connection relay to the stager.
    #[command(hide = true)]
    Relay {
        addr: String,
    },
}

pub fn run(c: &mut Command) -> Result<String> {
    let out = c
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {c:?}"))?;
    checked(c, out)
}

pub fn run_with_stdin(c: &mut Command, input: &str) -> Result<String> {
    use std::io::Write;
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {c:?}"))?;
    child.stdin.take().unwrap().write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    checked(c, out)
}

/// The command's stdout, or an error with its status and stderr.
fn checked(c: &Command, out: std::process::Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{c:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn sh(script: &str) -> Result<String> {
    run(Command::new("sh").arg("-c").arg(script))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Relay { addr } = &cli.cmd {
        return match vm::relay(addr) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vm-harness relay: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Cmd::Accel = &cli.cmd {
        println!("{}\n{}", vm::accel(), vm::cpu());
        return ExitCode::SUCCESS;
    }
    if let Cmd::PowerCut { list: true, .. } = &cli.cmd {
        for p in scenario::CUT_POINTS {
            println!("{:<28} {}", p.name, p.what);
        }
        return ExitCode::SUCCESS;
    }
    let opts = scenario::Opts {
        work: cli.work.clone(),
        cache: cli.cache.clone(),
        nvme: cli.nvme,
        bios: cli.bios,
        hang: cli.hang,
        bond: cli.bond,
        arp: cli.arp,
        bridge: cli.bridge,
        relay: cli.relay,
    };
    let r = match &cli.cmd {
        Cmd::Full => scenario::full(&opts),
        Cmd::BadTarget => scenario::bad_target(&opts),
        Cmd::WindowsLayout => scenario::windows_layout(&opts),
        Cmd::PowerCut {
            points, second_job, ..
        } => scenario::power_cut(&opts, points, *second_job),
        Cmd::All => scenario::all(&opts),
        Cmd::Relay { .. } | Cmd::Accel => unreachable!(),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("vm-harness: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}
