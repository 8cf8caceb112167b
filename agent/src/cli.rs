//! Command-line options (one struct per command) and their handlers.
//!
//! `--json` output is a stable interface for scripts: fields are only ever added.

use anyhow::{Context, Result};
use bundle::progress::{self, Terminal};
use bundle::release::ReleasePublicKey;
use bundle::verify;
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Remote two-disk OS reinstaller: the operator's command and the agent.
///
/// Without a subcommand, creates a reinstall job on the stager:
///
///   reinstall --identity OP.toml --host web1 --target debian@12.8 --wait
#[derive(Parser)]
#[command(
    name = "reinstall",
    version,
    after_help = "The agent reboots UEFI machines through their firmware variables and legacy BIOS machines through GRUB on disk 1. Exit status: 0 ok, 1 failed, 2 usage, 3 --wait lost the stager for longer than --wait-outage (the job goes on)."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(flatten)]
    pub job: JobOpts,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Args)]
pub struct Global {
    /// Stager commands: the identity file from `stager operator` (default
    /// /etc/reinstall/identity.toml). Bundle commands: the bundle's age identity (default
    /// DIR/identity.txt).
    #[arg(long, global = true)]
    pub identity: Option<PathBuf>,
    /// A host to act on (repeatable).
    #[arg(long = "host", global = true)]
    pub hosts: Vec<String>,
    /// A file of hosts, one per line (# starts a comment).
    #[arg(long, global = true)]
    pub hosts_file: Option<PathBuf>,
    /// Print JSON on stdout (stable: fields are only ever added).
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Args)]
pub struct JobOpts {
    /// Target bundle: NAME (newest) or NAME@VERSION. Creates a job for the hosts; a host
    /// that sits in its rescue OS takes it there (its rescue OS stays as it is).
    #[arg(long)]
    pub target: Option<String>,
    /// Rescue bundle (default: the stager's default_rescue).
    #[arg(long)]
    pub rescue: Option<String>,
    /// Stop in the rescue OS; do not install the target.
    #[arg(long)]
    pub hold_in_rescue: bool,
    /// Roll out to at most N hosts at a time: the others wait (pending) and take the job,
    /// in the order they ask, as hosts finish. Default: every host at once.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: Option<u32>,
    /// Halt the job once K of its hosts failed: hosts that have not taken it yet are
    /// cancelled (create a new job for them once the cause is known); hosts already in flight
    /// carry on to their target or their rescue OS. Default: never halt.
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(1..))]
    pub halt_after_failures: Option<u32>,
    /// At most N hosts of one site (`stager enroll --site`) at a time, so that no point of
    /// presence has all its machines down at once; hosts without a site count as one site.
    /// Works with or without --max-in-flight.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight_per_site: Option<u32>,
    /// The first N hosts to take the job run it alone; the rest wait until all N are done.
    /// A failure among them halts the job (the waiting hosts are cancelled), whatever
    /// --halt-after-failures says.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub canary: Option<u32>,
    /// Halt the job once P percent of its finished hosts failed, counted from when one
    /// failure is at most that share (10: from 10 finished hosts on), as --halt-after-failures
    /// halts (either may). Default: no rate.
    #[arg(long, value_name = "P", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub halt_at_failure_percent: Option<u32>,
    /// Leave out the hosts whose latest job is for this same target version and is done or
    /// still under way, so that the same command run again (after a halt, a cancel, a
    /// failure fixed) gives a job to the rest only. With nothing left: says so, exits 0
    /// (`--json` prints `null`).
    #[arg(long)]
    pub skip_done: bool,
    /// Follow the job (phase, bytes, rate per host) until it is done or failed; exit 1 if it
    /// failed or was cancelled. A stager that cannot be reached (a restart, an upgrade) is
    /// waited out for --wait-outage seconds, saying so: the job goes on without it.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: how long to keep following through a stager outage before giving up
    /// with exit 3 (the job goes on; `reinstall status` shows it).
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    pub wait_outage: u64,
}

#[derive(Subcommand)]
pub enum Command {
    /// Show jobs and hosts (all, or those named with --host): every host's phase, job,
    /// address and last contact; the running jobs host by host; and any host whose last job
    /// is done but which reported a failure since (its rescue OS, after the target stopped
    /// coming up), with the report.
    Status,
    /// Send the hosts to their rescue OS (once, or for good with --permanent).
    Rescue(RescueOpts),
    /// Cancel a job: its hosts that have not finished stop taking it.
    ///
    /// An agent drops a cancelled job at its next step where the machine sits in an OS its
    /// firmware boots by default: before plan or stage-rescue in the source OS (nothing that
    /// boots was changed), and in the rescue OS before rescue-up or install-target (it stays
    /// there, reachable, and takes the host's next job there). A host between a one-shot
    /// boot and its new OS's call home (boot-rescue, boot-target, target-up) cannot report
    /// to a cancelled job; its firmware then falls back to the last good OS.
    Cancel(CancelOpts),
    /// Show what a reinstall of this machine would do, writing nothing: disk 1 (the running
    /// root) and disk 2 with their stable ids, the layouts for both, the boot mode, the
    /// network and security identity to carry, the boot entry changes. Refuses, with the
    /// reason, a machine it would not reinstall. In the rescue OS: the job it would take
    /// there, on the last job's disk 1, with disk 2 (the one it runs from) kept as it is.
    Plan(PlanOpts),
    /// Run the agent: take this host's job from the stager and carry it through its phases,
    /// resuming from the journal after a crash or a reboot.
    ///
    /// On a UEFI machine it writes the firmware's boot variables (efivarfs) and reboots
    /// itself. On a legacy BIOS machine GRUB on disk 1 chooses: the source's own GRUB gets a
    /// rescue entry (custom.cfg) and a one-shot (next_entry, as grub-reboot), and from
    /// install-target on disk 1 carries our GRUB i386-pc. With --fake-firmware or --efivars
    /// DIR (tests) it exits with status 100 where it would reboot.
    ///
    /// A job that arrives while the machine sits in its rescue OS (after a failed job, a
    /// target that stopped coming up, a rescue on request) is taken there: the rescue OS and
    /// disk 2's partitions stay, the new target is stashed, installed on disk 1 and booted.
    ///
    /// After a job, disk 1's GRUB counts the target's boots and the agent takes the count
    /// back when it starts there; after two boots that never got that far GRUB boots the
    /// rescue OS, whose agent reports it to the stager (the job stays done) and stays up.
    Agent(AgentOpts),
    /// Install the agent on this machine's running OS so that it takes jobs: this binary as
    /// /usr/local/sbin/reinstall, the host's identity file (from `stager enroll HOST`) as
    /// /etc/reinstall/identity.toml (0600), and reinstall-agent.service, enabled and
    /// (re)started.
    ///
    /// First it calls the stager with the identity (one poll, no wait): a host that cannot
    /// reach its stager, or whose identity is refused, is told now and nothing is written.
    /// Run again (with a newer binary, with or without the file), it replaces only what
    /// differs and restarts the agent. Refused without --force: an identity installed for
    /// another host; replacing the installed identity of the same host (the agent renews its
    /// certificate into it, so the enrolment file is older: the installed one is kept); a job
    /// under way on this machine (the agent is not swapped mid-job).
    ///
    /// On the running OS it also plans as a job would (read only) and says whether a
    /// reinstall would go ahead now (disk 2, boot mode) or what stops it.
    ///
    /// With --root other than /, writes into that tree, does not plan and does not touch
    /// systemd (an image being built).
    Setup(SetupOpts),
    /// Show the network identity this machine would carry into its next OS (addresses,
    /// routes, gateways, DNS, MTU, matched by MAC; bonds with their mode, members and
    /// options (MII or ARP monitoring); bridges with their ports and STP; 802.1Q VLANs on
    /// NICs, bonds or bridges; dummies by name; policy
    /// routing rules with their tables' routes) and the
    /// systemd-networkd files it becomes. Names what is left behind (tun/tap, WireGuard, VXLAN,
    /// IP tunnels, veths into other namespaces, mobile modems' and PPP links, bridges with no
    /// port out of the machine such as docker0). Refuses, naming the interface, what cannot be carried: teams,
    /// macvlans/ipvlans, bonds monitored by IPv6 neighbour solicitation or by ARP without
    /// targets, QinQ VLANs, VLANs on VLANs, VLAN-filtering bridges, addresses on links of other kinds or in a VRF (and bonds, bridges, VLANs or
    /// dummies at all when the target is Windows).
    Network(NetworkOpts),
    /// Show the firmware's boot variables: BootCurrent, BootNext, BootOrder and every
    /// Boot#### entry with its device path, in the text form `efibootmgr -v` prints.
    Firmware(FirmwareOpts),
    /// Check and unpack bundles (a directory as written by `stager bundle export`).
    #[command(subcommand)]
    Bundle(BundleCommand),
}

#[derive(Subcommand)]
pub enum BundleCommand {
    /// Verify a bundle: the manifest's signature, the payload's size and SHA-256, and, when an
    /// age identity is at hand, every layer and entry inside (without writing anything).
    Verify(VerifyOpts),
    /// Verify and unpack a bundle into an empty directory.
    ///
    /// The target holds `.reinstall-incomplete` from the first byte written until every check
    /// has passed and the data is flushed; a target that still holds it is not usable.
    Unpack(UnpackOpts),
}

#[derive(Args)]
pub struct PlanOpts {
    /// The running OS tree.
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// Size the disks for this target bundle (NAME, newest, or NAME@VERSION), read from the
    /// stager with an operator identity (--identity). Without it, default sizes are used.
    #[arg(long)]
    pub target: Option<String>,
    /// Disk 2, when the machine has several candidates. Without it: the disk the last job on
    /// this machine used as disk 2 (found again by its serial or WWN), else the one disk
    /// besides the root's.
    #[arg(long)]
    pub disk2: Option<PathBuf>,
}

#[derive(Args)]
pub struct AgentOpts {
    /// The running OS tree (its /etc, its journal under var/lib/reinstall).
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// Disk 2, when the machine has several candidates. Without it: the disk the last job on
    /// this machine used as disk 2 (found again by its serial or WWN), else the one disk
    /// besides the root's.
    #[arg(long)]
    pub disk2: Option<PathBuf>,
    /// A fake firmware state file (JSON) instead of real boot variables: for tests.
    #[arg(long, conflicts_with = "efivars")]
    pub fake_firmware: Option<PathBuf>,
    /// Write real UEFI boot variables (Boot####, BootOrder, BootNext) into this directory,
    /// laid out as efivarfs, and do not reboot: for tests of the UEFI implementation. Without
    /// this or --fake-firmware, the machine's own /sys/firmware/efi/efivars is used.
    #[arg(long)]
    pub efivars: Option<PathBuf>,
    /// Where the agent mounts the filesystems it writes, and keeps what holds for one boot
    /// only (a tmpfs on a machine).
    #[arg(long, default_value = "/run/reinstall")]
    pub work: PathBuf,
    /// In the first boot of a new OS (the rescue OS before rescue-up, the target before
    /// target-up): seconds from the agent's first start in this boot within which it must
    /// have called home. Past them, a failure to reach the stager (its network does not work,
    /// its identity is refused, the stager is away) reboots the machine into the last good
    /// OS, which boots the new one once more and then reports the failure: a new OS that is
    /// up but cannot be reached never keeps the machine.
    #[arg(long, default_value_t = agent::engine::CALL_HOME_FOR.as_secs())]
    pub call_home_for: u64,
    /// Seconds between the agent's read-only plans while it waits for work (in the source
    /// OS, or a target whose job is done): each tells the stager whether a reinstall would go
    /// ahead here, as `reinstall status` shows. It also plans at every start.
    #[arg(long, default_value_t = agent::engine::READY_EVERY.as_secs())]
    pub ready_every: u64,
    /// Seconds to long-poll the stager for a job.
    #[arg(long, default_value_t = 60)]
    pub wait: u64,
    /// Poll once: exit 0 if there is no job instead of polling again.
    #[arg(long)]
    pub once: bool,
}

#[derive(Args)]
pub struct SetupOpts {
    /// The host's identity file from `stager enroll HOST`. Without it, the one installed is
    /// used (to install a newer binary).
    pub identity_file: Option<PathBuf>,
    /// The OS tree to install into.
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// Do not call the stager first (an image built where the stager cannot be reached).
    #[arg(long)]
    pub no_check: bool,
    /// Write the files but do not start (or restart) the agent.
    #[arg(long)]
    pub no_start: bool,
    /// Replace an identity installed for another host or the installed one of this host, and
    /// install in the middle of a job.
    #[arg(long)]
    pub force: bool,
    /// The disk the agent is to use as disk 2, on a machine with several candidates: its
    /// /dev/disk/by-id/ name (a kernel name such as /dev/sdb is refused when the disk has a
    /// stable one). Checked as a job's plan would check it; written as a drop-in of the unit.
    #[arg(long)]
    pub disk2: Option<PathBuf>,
}

#[derive(Args)]
pub struct NetworkOpts {
    /// Render this saved identity (the JSON `reinstall network --json` prints under
    /// "identity", or a job's `network.json` in the agent's state directory) instead of
    /// capturing this machine's.
    #[arg(long, value_name = "FILE")]
    pub from: Option<PathBuf>,
    /// The network stack to render for, as a target tree using it would get it.
    #[arg(long, value_enum, default_value = "networkd")]
    pub stack: StackArg,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum StackArg {
    Networkd,
    Netplan,
    Networkmanager,
    Ifupdown,
}

#[derive(Args)]
pub struct FirmwareOpts {
    /// Read the variables from this directory (laid out as efivarfs) instead of
    /// /sys/firmware/efi/efivars.
    #[arg(long)]
    pub efivars: Option<PathBuf>,
}

#[derive(Args)]
pub struct CancelOpts {
    /// The job's number (as `status` shows it).
    pub job: u64,
}

#[derive(Args)]
pub struct RescueOpts {
    /// Make rescue the default boot, not only the next one.
    #[arg(long)]
    pub permanent: bool,
}

#[derive(Args)]
pub struct KeyOpts {
    /// The release public key (minisign format) that must have signed the manifest.
    #[arg(long)]
    pub pubkey: PathBuf,
}

#[derive(Args)]
pub struct VerifyOpts {
    #[command(flatten)]
    pub keys: KeyOpts,
    /// Only check signature, size and hash, even if an identity is available.
    #[arg(long)]
    pub shallow: bool,
    /// Bundle directory.
    pub dir: PathBuf,
}

#[derive(Args)]
pub struct UnpackOpts {
    #[command(flatten)]
    pub keys: KeyOpts,
    /// Bundle directory.
    pub dir: PathBuf,
    /// Directory to unpack into: created if missing; must be empty (a fresh filesystem's
    /// lost+found and the marker of an earlier failed attempt are allowed).
    #[arg(long)]
    pub into: PathBuf,
}

fn identity(
    given: Option<&Path>,
    dir: &Path,
    required: bool,
) -> Result<Option<bundle::payload::AgeIdentity>> {
    let path = match given {
        Some(p) => p.to_path_buf(),
        None => {
            let p = dir.join(bundle::IDENTITY_FILE);
            if !required && !p.exists() {
                return Ok(None);
            }
            p
        }
    };
    Ok(Some(bundle::payload::load_identity(&path)?))
}

pub fn verify(o: VerifyOpts, id_path: Option<&Path>, json: bool) -> Result<ExitCode> {
    let key = ReleasePublicKey::load(&o.keys.pubkey)?;
    let signed = verify::check_signed(&o.dir, &key)
        .with_context(|| format!("bundle {} failed verification", o.dir.display()))?;
    let id = if o.shallow {
        None
    } else {
        identity(id_path, &o.dir, false)?
    };
    let mut p = Terminal::stderr();
    let deep = id.is_some();
    match id {
        Some(id) => {
            verify::check_contents(&signed, id, &mut *p)
                .with_context(|| format!("bundle {} failed verification", o.dir.display()))?;
        }
        None => verify::check_hash(&signed, &mut *p)
            .with_context(|| format!("bundle {} failed verification", o.dir.display()))?,
    }
    let m = &signed.manifest;
    if json {
        let v = serde_json::json!({
            "ok": true,
            "bundle": m.id(),
            "checked": if deep { "signature,size,sha256,contents" } else { "signature,size,sha256" },
            "manifest": m,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "ok: {} signature, size, sha256{} verified",
            m.id(),
            if deep {
                ", contents"
            } else {
                " (contents not checked: no identity)"
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn unpack(o: UnpackOpts, id_path: Option<&Path>, json: bool) -> Result<ExitCode> {
    let key = ReleasePublicKey::load(&o.keys.pubkey)?;
    let signed = verify::check_signed(&o.dir, &key)
        .with_context(|| format!("bundle {} failed verification", o.dir.display()))?;
    let id = identity(id_path, &o.dir, true)?.expect("required");
    let start = std::time::Instant::now();
    let stats =
        verify::unpack_into(&signed, id, &o.into, &mut *Terminal::stderr()).with_context(|| {
            format!(
                "unpacking {} into {} (left marked unusable: {}/{})",
                o.dir.display(),
                o.into.display(),
                o.into.display(),
                bundle::tree::INCOMPLETE_MARKER
            )
        })?;
    let secs = start.elapsed().as_secs_f64();
    let m = &signed.manifest;
    if json {
        let v = serde_json::json!({
            "ok": true,
            "bundle": m.id(),
            "target": o.into,
            "entries": stats.entries,
            "unpacked_size": stats.unpacked_size,
            "seconds": secs,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "unpacked {} into {}: {} entries, {} in {:.1}s ({}/s)",
            m.id(),
            o.into.display(),
            stats.entries,
            progress::bytes(stats.unpacked_size),
            secs,
            progress::bytes((stats.unpacked_size as f64 / secs.max(0.001)) as u64)
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
