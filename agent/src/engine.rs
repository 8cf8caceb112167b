//! The phase engine (DESIGN.md §6): carries a job across both reboots, one idempotent phase
//! at a time, recording "entering X" in the journal before X's effects and "done X" after.
//! A run that is killed anywhere resumes from the journal and redoes the phase it was in.
//!
//! The invariant (DESIGN.md §2) in this code: the boot selector is only touched in
//! `boot-rescue` and `boot-target`, each entered only after the phase that wrote the disk it
//! points at is recorded done (written, flushed, verified); entries are one-shot (`BootNext`)
//! until the new OS has called home (`rescue-up`, `target-up`) and only then made default.

use crate::bootsel::{BootSelector, EspRef};
use crate::client::Client;
use crate::disk::{self, DiskId, Locked, PartKind};
use crate::journal::{self, Journal, Phase, Step};
use crate::mount::{self, Mounted};
use crate::netid::NetIdentity;
use crate::{preserve, transfer};
use anyhow::{bail, Context, Result};
use bundle::progress::Progress;
use bundle::release::ReleasePublicKey;
use proto::v1::{BundleRef, Event, EventKind, Work};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Which OS the agent runs in, from `ROOT/etc/reinstall/world` (absent: the source OS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum World {
    Source,
    Rescue,
    Target,
}

impl World {
    pub fn as_str(self) -> &'static str {
        match self {
            World::Source => "source",
            World::Rescue => "rescue",
            World::Target => "target",
        }
    }
}

pub const WORLD_FILE: &str = "etc/reinstall/world";
pub const JOURNAL_DIR: &str = "var/lib/reinstall";
pub const RESCUE_LOADER: &str = "\\EFI\\reinstall\\grubx64.efi";
pub const TARGET_LOADER: &str = "\\EFI\\BOOT\\BOOTX64.EFI";
/// Where disk 1's GRUB keeps its grubenv: the removable path (BIOS GRUB, and UEFI firmware
/// that boots it) and the target's own loader directory (its UEFI entry).
const DISK1_GRUB_DIRS: [&str; 2] = ["EFI/BOOT", "EFI/target"];
/// The journal note that the WinPE stage of a Windows target built the boot store.
const WINDOWS_STAGE_DONE: &str = "windows: the WinPE stage built the boot store";
const MIB: u64 = 1 << 20;
/// How many more times a one-shot boot into the rescue or the target is tried after it came
/// back without the new OS calling home (a power cut while it booted; a flaky first boot).
pub const BOOT_RETRIES: usize = 1;
/// How long a new OS's agent has, from its first start in that boot, to call home before it
/// reboots into the last good OS (see [`Agent::run`]).
pub const CALL_HOME_FOR: Duration = Duration::from_secs(600);
/// The files in the work directory that hold for one boot (it is a tmpfs on a machine; a
/// harness that simulates reboots removes them).
pub const PER_BOOT: [&str; 2] = [REQUESTED, FIRST_START];
const REQUESTED: &str = "rescue-requested";
const FIRST_START: &str = "first-start";
/// How often an idle agent plans again (read only) and tells the stager whether a reinstall
/// would go ahead, so that a machine fixed since (a disk added, a partition unmounted) or
/// broken since shows as it is in `reinstall status` without a restart.
pub const READY_EVERY: Duration = Duration::from_secs(3600);
/// What a new OS that gave up calling home notes in its journal.
const GAVE_UP: &str = "could not call home";

pub fn world_of(root: &Path) -> World {
    match std::fs::read_to_string(root.join(WORLD_FILE))
        .unwrap_or_default()
        .trim()
    {
        "rescue" => World::Rescue,
        "target" => World::Target,
        _ => World::Source,
    }
}

/// What a run ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No job for this host.
    Idle,
    /// A one-shot boot is set: reboot now.
    Reboot,
    /// The job is complete (or held in rescue, as asked).
    Done,
    /// (`idle`) A new job arrived for a machine whose job was finished: run again.
    NewJob,
}

pub struct Agent {
    pub root: PathBuf,
    pub world: World,
    /// Should be `Client::retrying`: phases rely on it to wait out stager outages.
    pub client: Client,
    pub boot: Box<dyn BootSelector>,
    /// Disk 2, when the machine has several candidates.
    pub disk2: Option<PathBuf>,
    /// Where the agent mounts what it writes (`/run/reinstall` on a machine).
    pub work: PathBuf,
    /// Boots are chosen by GRUB on disk 1 (a legacy BIOS machine, `BiosGrub`), not by
    /// firmware variables (real or stand-in).
    pub grub_chooses: bool,
    /// See [`CALL_HOME_FOR`].
    pub call_home_for: Duration,
    /// See [`READY_EVERY`].
    pub ready_every: Duration,
    /// When the agent last planned and told the stager (see [`Agent::say_ready`]).
    ready_said: Option<std::time::Instant>,
    /// The identity file the client's certificate came from: renewed certificates are
    /// written there (`None`: not renewed).
    pub identity_path: Option<PathBuf>,
    journal: journal::Locked,
}

impl Agent {
    pub fn new(
        root: &Path,
        client: Client,
        boot: Box<dyn BootSelector>,
        disk2: Option<PathBuf>,
        work: &Path,
    ) -> Result<Agent> {
        let journal = journal::Locked::open(&root.join(JOURNAL_DIR))?;
        let a = Agent {
            world: world_of(root),
            root: root.to_path_buf(),
            client,
            boot,
            disk2,
            work: work.to_path_buf(),
            grub_chooses: false,
            call_home_for: CALL_HOME_FOR,
            ready_every: READY_EVERY,
            ready_said: None,
            identity_path: None,
            journal,
        };
        a.clear_stale_mounts();
        Ok(a)
    }

    fn dir(&self) -> PathBuf {
        self.root.join(JOURNAL_DIR)
    }

    /// After a renewal outside the rescue OS (a target, or the source of a later job): the
    /// rescue OS kept on disk 2 gets the same identity file, or a rescue boot years from now
    /// would come up with a certificate that has expired, unable to reach the stager. Disk 2
    /// is the one in this machine's journal (the current job's, else the last archived), and
    /// its rescue root must hold an identity file of this same host. `None`: no rescue OS to
    /// update (no job yet, or this is the rescue OS, whose file is the one just renewed).
    fn give_rescue_identity(&self, path: &Path) -> Result<Option<PathBuf>> {
        if self.world == World::Rescue {
            return Ok(None);
        }
        let j = match self.journal.load()? {
            Some(j) => Some(j),
            None => self.journal.last_archived()?,
        };
        let Some(d2) = j.and_then(|j| j.disk2) else {
            return Ok(None);
        };
        let now = journal_disk_now(Some(&d2))?;
        let dev = now.partition_path(now.find_partition(PartKind::LinuxRoot)?.number);
        let m = Mounted::ext4(&dev, &self.work.join("rescue-identity"), false)?;
        let theirs = m.path.join(crate::setup::AGENT_IDENTITY);
        let old = proto::identity::IdentityFile::load(&theirs)?;
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let new = proto::identity::IdentityFile::parse(path, &text)?;
        anyhow::ensure!(
            old.name == new.name,
            "{} holds the identity of {:?}, not of this host ({:?}); left as it is",
            dev.display(),
            old.name,
            new.name
        );
        journal::replace_file(&theirs, text.as_bytes(), 0o600)?;
        drop(m);
        Ok(Some(dev))
    }

    /// Renews this host's certificate, as the stager asked. A failure changes nothing (the
    /// current certificate stays in use, still valid) and is only reported: the stager asks
    /// again at the next poll.
    fn renew_identity(&mut self) {
        let Some(path) = self.identity_path.clone() else {
            return;
        };
        match self.client.renew_identity(&path) {
            Ok((client, until)) => {
                self.client = client;
                eprintln!(
                    "reinstall: this host's certificate was renewed (valid until {until}); {} updated",
                    path.display()
                );
                self.share_identity(&path, "the renewed certificate", "its old certificate (it may expire before the rescue OS is next booted)");
            }
            Err(e) => eprintln!(
                "reinstall: renewing this host's certificate failed, the current one stays in use: {e:#}"
            ),
        }
    }

    /// Trusts the CA certificates the stager sent (its CA is being replaced: `stager ca`).
    /// A failure changes nothing and is reported; the stager sends them again at the next
    /// poll.
    fn take_trust(&mut self, given: &str, signature: Option<&str>) {
        let Some(path) = self.identity_path.clone() else {
            return;
        };
        match self.client.take_trust(&path, given, signature) {
            Ok(client) => {
                self.client = client;
                eprintln!(
                    "reinstall: this host trusts the stager's new CA certificates (sha256 {}); {} updated",
                    self.client.trust_sha256(),
                    path.display()
                );
                self.share_identity(&path, "them", "the CA certificates it had (it may not reach the stager once the old CA is retired)");
            }
            Err(e) => eprintln!("reinstall: keeping the CA certificates this host trusts: {e:#}"),
        }
    }

    /// After the identity file at `path` changed: the rescue OS on disk 2 gets it too
    /// ([`Self::give_rescue_identity`]), reported as having `what` or keeping `kept`.
    fn share_identity(&self, path: &Path, what: &str, kept: &str) {
        match self.give_rescue_identity(path) {
            Ok(Some(dev)) => eprintln!(
                "reinstall: the rescue OS on {} has {what} too",
                dev.display()
            ),
            Ok(None) => {}
            Err(e) => eprintln!("reinstall: the rescue OS on disk 2 keeps {kept}: {e:#}"),
        }
    }

    /// A killed run can leave its work mounts behind (a reboot would not); they would make the
    /// disks look busy to the redo.
    fn clear_stale_mounts(&self) {
        let work = std::fs::canonicalize(&self.work).unwrap_or_else(|_| self.work.clone());
        let mut stale: Vec<String> = disk::mounts()
            .into_iter()
            .map(|(_, mp)| mp)
            .filter(|mp| Path::new(mp).starts_with(&work))
            .collect();
        stale.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in stale {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
    }

    /// Runs phases until the job needs a reboot, finishes, or there is none.
    ///
    /// In the first boot of a new OS (the one-shot into it is spent: a reboot lands in the
    /// last good OS) every call to the stager is bounded by what is left of
    /// [`Agent::call_home_for`] since the agent's first start in this boot; a run that fails
    /// past it (the stager not reached, or refusing this OS) notes why in this OS's journal
    /// and returns `Reboot` without a one-shot: the last good OS comes back, and boots this
    /// one once more or reports the failure. Before that, a failed run is retried by the
    /// agent's restart, as always.
    pub fn run(&mut self, wait: Duration) -> Result<Outcome> {
        let j = match self.journal.load()? {
            Some(j) => j,
            None => match self.new_job(wait)? {
                Some(j) => j,
                None => return Ok(Outcome::Idle),
            },
        };
        let Some(left) = self.first_boot_left(&j)? else {
            return self.carry_on(j);
        };
        let patient = self.client.clone();
        self.client = patient.clone().retrying(left);
        let r = self.carry_on(j.clone());
        self.client = patient;
        match r {
            Err(e) if self.first_boot_left(&j)?.is_some_and(|l| l.is_zero()) => {
                let mut j = self.journal.load()?.unwrap_or(j);
                let msg = format!(
                    "the {} OS {GAVE_UP} within {} s of its agent's first start in this boot ({e:#}); rebooting into the last good OS, which boots this one once more or reports it",
                    if self.world == World::Target { "target" } else { "rescue" },
                    self.call_home_for.as_secs()
                );
                j.record(j.phase, j.step, Some(msg.clone()));
                self.journal.save(&j)?;
                eprintln!("reinstall: {msg}");
                Ok(Outcome::Reboot)
            }
            r => r,
        }
    }

    /// Why the new OS of `expect` (the target on disk 1, the rescue OS on disk 2) gave up
    /// calling home, from the note its agent left in its own journal (see [`Agent::run`]),
    /// when it got that far: read from its root filesystem, mounted read-only. `None` when
    /// the note or the filesystem is not there (it panicked before its agent ran).
    fn new_os_says(&self, j: &Journal, expect: World) -> Option<String> {
        let (d, what) = match expect {
            World::Target if j.target_os != Some(bundle::Os::Windows) => (&j.disk1, "target"),
            World::Rescue => (&j.disk2, "rescue"),
            _ => return None,
        };
        let now = journal_disk_now(d.as_ref()).ok()?;
        let dev = now.partition_path(now.find_partition(PartKind::LinuxRoot).ok()?.number);
        let m = Mounted::ext4(&dev, &self.work.join(format!("{what}-journal")), true).ok()?;
        let p = m.path.join(JOURNAL_DIR).join(journal::FILE);
        let theirs = Journal::parse(&p, &std::fs::read(&p).ok()?).ok()?;
        (theirs.job == j.job).then_some(())?;
        theirs.history.iter().rev().find_map(|e| {
            e.note
                .as_deref()
                .filter(|n| n.contains(GAVE_UP))
                .map(String::from)
        })
    }

    /// In the first boot of a new OS (its call home pending: `rescue-up` in the rescue OS
    /// after `boot-rescue`, `target-up` in the target), what is left of the time to call
    /// home, counted from the agent's first start in this boot (recorded in the per-boot
    /// work directory). `None` in any other boot.
    fn first_boot_left(&self, j: &Journal) -> Result<Option<Duration>> {
        let first = match (j.pending(), self.world) {
            (Phase::TargetUp, World::Target) => true,
            // A job taken in the rescue OS reaches rescue-up without a reboot.
            (Phase::RescueUp, World::Rescue) => !j.from_rescue,
            _ => false,
        };
        if !first {
            return Ok(None);
        }
        // Time since boot (CLOCK_BOOTTIME), not the wall clock, which the new OS may set
        // hours forward or back as it comes up (NTP, an RTC kept in local time).
        let uptime = std::fs::read_to_string("/proc/uptime").context("reading /proc/uptime")?;
        let now = uptime
            .split_whitespace()
            .next()
            .and_then(|s| s.parse::<f64>().ok())
            .map(|s| (s * 1000.0) as u64)
            .with_context(|| format!("/proc/uptime says {uptime:?}"))?;
        let f = self.work.join(FIRST_START);
        let since = match std::fs::read_to_string(&f)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
        {
            Some(ms) => ms,
            None => {
                std::fs::create_dir_all(&self.work)?;
                std::fs::write(&f, format!("{now}\n"))
                    .with_context(|| format!("writing {}", f.display()))?;
                now
            }
        };
        let spent = Duration::from_millis(now.saturating_sub(since));
        Ok(Some(self.call_home_for.saturating_sub(spent)))
    }

    fn carry_on(&mut self, mut j: Journal) -> Result<Outcome> {
        loop {
            let todo = j.pending();
            if todo == Phase::Done || todo == Phase::Failed {
                return Ok(Outcome::Done);
            }
            let expect = match j.runs_in(todo) {
                journal::Runs::SourceOs => World::Source,
                journal::Runs::Rescue => World::Rescue,
                journal::Runs::Target => World::Target,
                journal::Runs::Nowhere => unreachable!(),
            };
            if expect != self.world && self.reboot_pending(&j, todo)? {
                // Restarted (a crash, systemd) after the one-shot was set, before the reboot:
                // the firmware still holds BootNext. Reboot as planned.
                return Ok(Outcome::Reboot);
            }
            if self.world == World::Rescue && self.requested_rescue(&j)? {
                // Booted into the rescue OS because an operator asked (`reinstall rescue`),
                // not because the target failed: stay, reachable, and do not fail the job.
                return Ok(Outcome::Done);
            }
            if self.world == World::Rescue && todo == Phase::TargetUp && self.target_was_up(&j) {
                // Not asked for, and not GRUB's count: disk 1's GRUB could not load the
                // target (its kernel or root filesystem gone) and fell through to this entry,
                // or the firmware skipped disk 1. Not a first boot to retry.
                self.target_gone(
                    &mut j,
                    "did not load (its kernel or root filesystem is gone, or disk 1 was skipped): the rescue OS came up without a request",
                )?;
                return Ok(Outcome::Done);
            }
            if expect != self.world && self.windows_stage(&mut j, todo)? {
                return Ok(Outcome::Reboot);
            }
            if expect != self.world && self.retry_boot(&mut j, todo)? {
                return Ok(Outcome::Reboot);
            }
            if expect != self.world {
                // The one-shot boot did not stick: the new OS did not come up or never called
                // home, and the firmware fell back to the last good one, where we are. Stay
                // here (reachable), and say so.
                // What the firmware booted this time (BootCurrent) tells a firmware that
                // ignored BootNext from a new OS that failed and fell back.
                let booted = match self.boot.current() {
                    Ok(Some(n)) => format!("; the firmware booted Boot{n:04X} this time"),
                    _ => String::new(),
                };
                let winpe = if expect == World::Target
                    && j.target_os == Some(bundle::Os::Windows)
                    && !j.history.iter().any(|e| {
                        e.note
                            .as_deref()
                            .is_some_and(|n| n.starts_with(WINDOWS_STAGE_DONE))
                    }) {
                    "; the WinPE stage left no log on the Windows volume (WinPE did not start, or did not find the volume)"
                } else {
                    ""
                };
                let says = self
                    .new_os_says(&j, expect)
                    .map(|n| format!("; its journal says: {n}"))
                    .unwrap_or_default();
                let msg = format!(
                    "{} did not come up after {} tries (expected the {expect:?} OS for phase {}); back in the {:?} OS, which stays the default{booted}{winpe}{says}",
                    if expect == World::Target { "the target" } else { "the rescue OS" },
                    BOOT_RETRIES + 1,
                    todo.as_str(),
                    self.world
                );
                j.record(Phase::Failed, Step::Done, Some(msg.clone()));
                self.journal.save(&j)?;
                self.report(&j, EventKind::Failed, Some(msg.clone()), None);
                eprintln!("reinstall: {msg}");
                return Ok(Outcome::Done);
            }
            if matches!(
                todo,
                Phase::Plan | Phase::StageRescue | Phase::RescueUp | Phase::InstallTarget
            ) && self.dropped(&j)?
            {
                return Ok(Outcome::Done);
            }
            j.record(todo, Step::Entering, None);
            self.journal.save(&j)?;
            self.report(&j, EventKind::PhaseEntered, None, None);
            bundle::failpoint::hit(&format!("enter-{}", todo.as_str()));
            let result = match todo {
                Phase::Plan if j.from_rescue => self.plan_in_rescue(&mut j),
                Phase::Plan => self.plan(&mut j),
                Phase::StageRescue if j.from_rescue => self.stash_only(&j),
                Phase::StageRescue => self.stage_rescue(&mut j),
                Phase::BootRescue => self.boot_entry(&j, false),
                Phase::RescueUp => self.called_home(&j, false),
                Phase::InstallTarget => self.install_target(&mut j),
                Phase::BootTarget => self.boot_entry(&j, true),
                Phase::TargetUp => self.called_home(&j, true),
                Phase::Done | Phase::Failed => unreachable!(),
            };
            if let Err(e) = result {
                self.report(
                    &j,
                    EventKind::Error,
                    Some(format!("{}: {e:#}", todo.as_str())),
                    None,
                );
                return Err(e.context(format!("phase {}", todo.as_str())));
            }
            // Everything the phase wrote reaches the disks before the journal says it is
            // done. Found by a power cut in the VM right after plan: network.json existed but
            // was empty (written, not flushed), and every retry of stage-rescue failed on it.
            nix::unistd::sync();
            j.record(todo, Step::Done, None);
            self.journal.save(&j)?;
            self.report(&j, EventKind::PhaseDone, None, None);
            bundle::failpoint::hit(&format!("done-{}", todo.as_str()));
            if j.after(j.phase) == Phase::Done {
                self.report(&j, EventKind::Done, Some("job complete".into()), None);
                // A target just up: whether the next reinstall would go ahead from it.
                self.say_ready(false);
                return Ok(Outcome::Done);
            }
            if matches!(todo, Phase::BootRescue | Phase::BootTarget) {
                return Ok(Outcome::Reboot);
            }
        }
    }

    /// Waits (long poll, `wait`) for work while no job runs here, and acts on a rescue request:
    /// from the source or target OS, boots the rescue OS once (or makes it the default, when
    /// permanent) and returns `Reboot`; in the rescue OS, acknowledges it. A new job for a
    /// machine whose job is finished is taken in any OS: from the source or target OS it
    /// runs the whole migration; in the rescue OS (after a failed job, a target that stopped
    /// coming up, a rescue on request) it installs the new target from there.
    pub fn idle(&mut self, wait: Duration) -> Result<Outcome> {
        let t = Instant::now();
        let w: Work = self.client.poll_work(wait)?;
        if let Some(given) = &w.trust {
            self.take_trust(given, w.trust_signature.as_deref());
        }
        if w.renew_identity {
            self.renew_identity();
        }
        let j = self.journal.load()?;
        if let (Some(job), Some(old), World::Rescue) = (&w.job, &j, self.world) {
            if job.id != old.job {
                // The stager gives a host a new job only when its last one is over (done,
                // failed, cancelled), also when this rescue OS's journal stopped before the
                // end (a rescue on request leaves it at target-up). The identity carried into
                // this OS (network.json, carry) stays: it is the machine's, for the new target.
                let to = self.archive(old)?;
                // This boot's answer to a rescue request is not the new job's.
                let _ = std::fs::remove_file(self.work.join(REQUESTED));
                eprintln!(
                    "reinstall: job {} received in the rescue OS; job {} is over (kept in {}); the new target is installed from here",
                    job.id,
                    old.job,
                    to.display()
                );
                return Ok(Outcome::NewJob);
            }
        }
        if let (Some(job), Some(old)) = (&w.job, &j) {
            if job.id != old.job && old.finished() && self.world != World::Rescue {
                // A new job for a machine that finished one: the running OS becomes the
                // source of the next migration. The old job's state goes to the archive;
                // `run` takes the new job.
                let to = self.archive(old)?;
                if self.world == World::Target {
                    std::fs::write(self.root.join(WORLD_FILE), "source\n")
                        .context("writing etc/reinstall/world")?;
                    self.world = World::Source;
                }
                eprintln!(
                    "reinstall: job {} received; job {} is finished (kept in {}); this OS is the source now",
                    job.id,
                    old.job,
                    to.display()
                );
                return Ok(Outcome::NewJob);
            }
        }
        match (w.rescue, j) {
            (Some(_), Some(j)) if self.world == World::Rescue => {
                self.requested_rescue(&j)?;
            }
            (Some(req), Some(j)) => {
                let n = self.rescue_entry(&j)?;
                if req.permanent {
                    self.boot.make_default(n)?;
                } else {
                    self.boot.set_next(n)?;
                }
                self.report(
                    &j,
                    EventKind::Network,
                    Some(format!(
                        "rescue requested: booting the rescue OS{}",
                        if req.permanent {
                            " (now the default)"
                        } else {
                            " once"
                        }
                    )),
                    None,
                );
                return Ok(Outcome::Reboot);
            }
            (Some(_), None) => {
                eprintln!("reinstall: a rescue boot was requested, but this machine has no rescue OS (no job ever ran here)");
            }
            (None, _) => {}
        }
        // The stager answers at once while it holds work this agent does not take: do not
        // ask again at once.
        if let Some(rest) = wait.checked_sub(t.elapsed()) {
            std::thread::sleep(rest);
        }
        Ok(Outcome::Idle)
    }

    /// Before a phase that runs in an OS the firmware boots by default, with no one-shot
    /// pending (`plan`, `stage-rescue`; in the rescue OS `rescue-up`, where the source is
    /// still the default and intact, and `install-target`, with the rescue the default): a
    /// job the stager no longer gives this host (an operator cancelled it: refused in plan,
    /// failing in install-target) is dropped here, its journal archived, and the agent waits
    /// for work again, in the OS it runs. A job is not dropped between a one-shot boot and
    /// the call home of the OS it boots (`boot-rescue`, `boot-target`, `target-up`). Returns
    /// whether it dropped the job.
    fn dropped(&mut self, j: &Journal) -> Result<bool> {
        let w: Work = self.client.poll_work(Duration::ZERO)?;
        if w.job.as_ref().is_some_and(|x| x.id == j.job) {
            return Ok(false);
        }
        let to = self.archive(j)?;
        eprintln!(
            "reinstall: job {} is no longer this host's work (cancelled) before {}: dropped, nothing that boots was changed (kept in {})",
            j.job,
            j.pending().as_str(),
            to.display()
        );
        Ok(true)
    }

    /// Moves job `j`'s journal to the archive (`archive/job-ID/`), with the identity it
    /// captured (`network.json`, `carry`) except in the rescue OS, where that identity is the
    /// machine's for the next job taken there; elsewhere the next job's plan captures it again.
    fn archive(&self, j: &Journal) -> Result<PathBuf> {
        let names: &[&str] = if self.world == World::Rescue {
            &[]
        } else {
            &["network.json", "carry"]
        };
        self.journal.archive(j.job, names)
    }

    /// In the rescue OS: whether this boot was asked for by an operator. The stager holds
    /// the request until the rescue OS acknowledges it (a `rescue` phase event, sent here);
    /// a file under the per-boot work directory remembers the answer for this boot.
    fn requested_rescue(&mut self, j: &Journal) -> Result<bool> {
        let marker = self.work.join(REQUESTED);
        if marker.exists() {
            return Ok(true);
        }
        let w: Work = self.client.poll_work(Duration::ZERO)?;
        if w.rescue.is_none() {
            return Ok(false);
        }
        std::fs::create_dir_all(&self.work)?;
        std::fs::write(&marker, b"")?;
        let ev = Event {
            job: j.job,
            kind: EventKind::PhaseEntered,
            phase: Some("rescue".into()),
            bytes_done: None,
            bytes_total: None,
            message: Some("rescue OS up, as requested".into()),
            network: None,
        };
        self.client
            .post::<_, serde_json::Value>("/v1/agent/events", &ev)
            .context("acknowledging the rescue request")?;
        eprintln!("reinstall: in the rescue OS, as requested");
        Ok(true)
    }

    /// The one-shot boot into the OS that runs `todo` was spent and that OS did not call home
    /// (it failed, or the power went while it came up): sets it once more, as many as
    /// [`BOOT_RETRIES`] times per OS, recorded in this OS's journal. Returns whether it did.
    fn retry_boot(&mut self, j: &mut Journal, todo: Phase) -> Result<bool> {
        let (boot, target) = match todo {
            Phase::RescueUp => (Phase::BootRescue, false),
            Phase::TargetUp => (Phase::BootTarget, true),
            _ => return Ok(false),
        };
        let mark = format!("retrying {}", boot.as_str());
        let tries = j
            .history
            .iter()
            .filter(|e| e.note.as_deref().is_some_and(|n| n.starts_with(&mark)))
            .count();
        if tries >= BOOT_RETRIES {
            return Ok(false);
        }
        let msg = format!(
            "{mark} ({}/{BOOT_RETRIES}): the {} OS did not call home; booting it once more",
            tries + 1,
            if target { "target" } else { "rescue" }
        );
        self.boot_entry(j, target)?;
        j.record(boot, Step::Done, Some(msg.clone()));
        self.journal.save(j)?;
        self.report(j, EventKind::Error, Some(msg.clone()), None);
        eprintln!("reinstall: {msg}");
        Ok(true)
    }

    /// A Windows target boots twice from the rescue OS: first the media's WinPE from disk 1's
    /// ESP, whose stage runs bcdboot and reboots (into the rescue OS, the default), then, when
    /// the stage left its log on the Windows volume, Windows itself, once. Returns whether it
    /// set that second boot; fails the job with the stage's log when the stage failed.
    fn windows_stage(&mut self, j: &mut Journal, todo: Phase) -> Result<bool> {
        const MARK: &str = WINDOWS_STAGE_DONE;
        if todo != Phase::TargetUp
            || self.world != World::Rescue
            || j.target_os != Some(bundle::Os::Windows)
            || j.history
                .iter()
                .any(|e| e.note.as_deref().is_some_and(|n| n.starts_with(MARK)))
        {
            return Ok(false);
        }
        let now = journal_disk_now(j.disk1.as_ref())?;
        let vol = now.partition_path(now.find_partition(PartKind::MsBasicData)?.number);
        match crate::windows::stage_result(&vol)? {
            crate::windows::Stage::NotRun => Ok(false),
            crate::windows::Stage::Done(_) => {
                let msg = format!("{MARK} (bcdboot); booting Windows once");
                self.boot_entry(j, true)?;
                j.record(Phase::BootTarget, Step::Done, Some(msg.clone()));
                self.journal.save(j)?;
                self.report(j, EventKind::PhaseDone, Some(msg.clone()), None);
                eprintln!("reinstall: {msg}");
                Ok(true)
            }
            crate::windows::Stage::Failed(log) => {
                let msg = format!(
                    "the WinPE stage failed (bcdboot did not build Windows's boot store): {log}; back in the rescue OS, which stays the default"
                );
                j.record(Phase::Failed, Step::Done, Some(msg.clone()));
                self.journal.save(j)?;
                self.report(j, EventKind::Failed, Some(msg.clone()), None);
                eprintln!("reinstall: {msg}");
                Err(anyhow::anyhow!(msg))
            }
        }
    }

    /// Whether the one-shot boot into the OS that runs `todo` is set and not yet used.
    fn reboot_pending(&mut self, j: &Journal, todo: Phase) -> Result<bool> {
        let entry = match todo {
            Phase::RescueUp => self.rescue_entry(j)?,
            Phase::TargetUp => {
                self.entry_of(j.disk1.as_ref(), "reinstall-target", TARGET_LOADER)?
            }
            _ => return Ok(false),
        };
        Ok(self.boot.next()? == Some(entry))
    }

    fn new_job(&mut self, wait: Duration) -> Result<Option<Journal>> {
        // In the rescue OS: the disks of the last job that ran through it.
        let last = match self.world {
            World::Source => None,
            World::Rescue => match self.journal.last_archived()? {
                Some(last) => Some(last),
                None => return Ok(None),
            },
            World::Target => return Ok(None),
        };
        let w: Work = self.client.poll_work(wait)?;
        let Some(job) = w.job else { return Ok(None) };
        let mut j = Journal {
            format: journal::FORMAT,
            job: job.id,
            host: job.host,
            target: job.target,
            rescue: job.rescue,
            hold_in_rescue: job.hold_in_rescue,
            phase: Phase::Plan,
            step: Step::Entering,
            disk1: None,
            disk2: None,
            target_os: None,
            from_rescue: false,
            updated: String::new(),
            history: Vec::new(),
        };
        let mut note = "job received".to_string();
        if let Some(last) = last {
            // The rescue OS runs from disk 2 and stays: the job's rescue bundle is not
            // installed, and the journal names the one that runs.
            if last.rescue != j.rescue {
                note = format!(
                    "job received in the rescue OS, which stays {}@{} (the job names {}@{}: a job taken in the rescue OS does not replace the OS it runs from)",
                    last.rescue.name, last.rescue.version, j.rescue.name, j.rescue.version
                );
                eprintln!("reinstall: {note}");
                j.rescue = last.rescue;
            } else {
                note = "job received in the rescue OS".into();
            }
            j.from_rescue = true;
            j.disk1 = last.disk1;
            j.disk2 = last.disk2;
        }
        j.record(Phase::Plan, Step::Entering, Some(note));
        self.journal.save(&j)?;
        Ok(Some(j))
    }

    /// Best effort: the stager being away must not stop a phase (call-home phases retry on
    /// their own).
    fn report(
        &self,
        j: &Journal,
        kind: EventKind,
        message: Option<String>,
        bytes: Option<(u64, u64)>,
    ) {
        let ev = Event {
            job: j.job,
            kind,
            phase: Some(j.phase.as_str().to_string()),
            bytes_done: bytes.map(|b| b.0),
            bytes_total: bytes.map(|b| b.1),
            message,
            network: None,
        };
        if let Err(e) = self
            .client
            .post::<_, serde_json::Value>("/v1/agent/events", &ev)
        {
            eprintln!("reinstall: reporting to the stager: {e:#}");
        }
    }

    fn release_key(&self) -> Result<ReleasePublicKey> {
        ReleasePublicKey::from_text(
            &self.client.identity.release_pub,
            Path::new("identity file release_pub"),
        )
        .map_err(Into::into)
    }

    /// A bundle's manifest, its signature checked against the pinned release key.
    fn manifest(&self, b: &BundleRef) -> Result<(bundle::Manifest, Vec<u8>, String)> {
        let base = format!("/v1/bundles/{}/{}", b.name, b.version);
        let bytes = self.client.get_bytes(&format!("{base}/manifest"))?;
        let sig = String::from_utf8(self.client.get_bytes(&format!("{base}/signature"))?)?;
        let what = PathBuf::from(format!("{}@{} manifest", b.name, b.version));
        let m = bundle::verify::check_manifest(&bytes, &sig, &self.release_key()?, &what)?;
        anyhow::ensure!(
            m.payload.sha256 == b.sha256 && m.payload.size == b.size,
            "bundle {}@{}: the signed manifest names another payload than the job",
            b.name,
            b.version
        );
        Ok((m, bytes, sig))
    }

    fn age_identity(&self, b: &BundleRef) -> Result<(bundle::payload::AgeIdentity, String)> {
        let text = String::from_utf8(
            self.client
                .get_bytes(&format!("/v1/bundles/{}/{}/identity", b.name, b.version))?,
        )?;
        let id = bundle::payload::parse_identity(&text)
            .map_err(|e| anyhow::anyhow!("bundle identity: {e}"))?;
        Ok((id, text))
    }

    fn plan(&mut self, j: &mut Journal) -> Result<()> {
        let (d1, d2, _) = select_disks(&self.root, self.disk2.as_deref())?;
        if self.disk1_grub_is_ours() {
            // A second job on BIOS: the rescue entry of disk 1's GRUB must be able to follow
            // the new rescue OS (see stage-rescue). A GRUB written before it could is refused
            // here, before disk 2 is touched.
            let esp = d1.partition_path(d1.find_partition(PartKind::Esp)?.number);
            let cfg =
                bootcfg::loader::read_esp(&esp, &format!("{}/grub.cfg", crate::bootsel::GRUB_DIR))?;
            anyhow::ensure!(
                bootcfg::grubcfg::can_redirect(&String::from_utf8_lossy(&cfg), "rescue"),
                "{}: disk 1's GRUB was written by an older version of reinstall, whose rescue entry cannot follow a new rescue OS on disk 2; a second job on this legacy BIOS machine is not supported; nothing was changed",
                esp.display()
            );
        }
        let (rm, _, _) = self.manifest(&j.rescue)?;
        let (tm, _, _) = self.manifest(&j.target)?;
        disk::rescue_layout(
            d2.size_bytes,
            d2.logical_sector,
            rescue_root_size(&rm),
            stash_size(&tm),
        )?;
        target_layout(&d1, Some(&tm), self.grub_chooses)?;
        j.target_os = Some(tm.os);
        let net = crate::netid::capture()?;
        if tm.os == bundle::Os::Windows {
            crate::windows::check_network(&net)?;
        }
        std::fs::write(
            self.dir().join("network.json"),
            serde_json::to_vec_pretty(&net)?,
        )?;
        preserve::capture(&self.root, &self.dir().join("carry"))?;
        j.disk1 = Some(d1);
        j.disk2 = Some(d2);
        Ok(())
    }

    /// Writes `layout` (and, for legacy BIOS, the GRUB built for it) to the pinned disk, records
    /// the disk as it is now (its new table's GUID) in the journal slot `slot` before anything
    /// else, then waits for the new partitions' device nodes and returns their paths. The
    /// journal is saved first so that a resumed job finds the disk it wrote, not the old GUID.
    fn repartition(
        &mut self,
        j: &mut Journal,
        slot: fn(&mut Journal) -> &mut Option<DiskId>,
        pinned: &DiskId,
        layout: &disk::Layout,
        bios: Option<&bootcfg::bios::Prepared>,
    ) -> Result<Vec<PathBuf>> {
        let mut locked = Locked::open_for(pinned, &self.root)?;
        let parts = locked.write_gpt_with(layout, bios)?;
        *slot(j) = Some(locked.id.clone());
        self.journal.save(j)?;
        drop(locked);
        disk::settle(Path::new(&pinned.path), &parts)?;
        Ok(parts)
    }

    fn stage_rescue(&mut self, j: &mut Journal) -> Result<()> {
        let pinned = j.disk2.clone().context("no disk 2 in the journal")?;
        let (rm, _, _) = self.manifest(&j.rescue)?;
        let (tm, _, _) = self.manifest(&j.target)?;
        let layout = disk::rescue_layout(
            pinned.size_bytes,
            pinned.logical_sector,
            rescue_root_size(&rm),
            stash_size(&tm),
        )?;
        let parts = self.repartition(j, |j| &mut j.disk2, &pinned, &layout, None)?;
        mount::mkfs_esp(&parts[0], "RESCUE-ESP", pinned.logical_sector)?;
        let rescue_uuid = mount::mkfs_ext4(&parts[1], "reinstall-rescue")?;
        mount::mkfs_ext4(&parts[2], "reinstall-stash")?;
        let rescue = Mounted::ext4(&parts[1], &self.work.join("rescue"), false)?;
        // The rescue OS, streamed from the stager into its partition.
        let (rid, _) = self.age_identity(&j.rescue)?;
        let src = transfer::Resuming::new(
            &self.client,
            &format!("/v1/blobs/{}", j.rescue.sha256),
            0,
            j.rescue.size,
        );
        let mut prog = Reporter::new(self, j, "stage-rescue");
        bundle::verify::unpack_stream(
            &rm,
            Box::new(src),
            Path::new(&j.rescue.sha256),
            rid,
            &rescue.path,
            &mut prog,
        )
        .context("unpacking the rescue bundle")?;
        if j.target_os == Some(bundle::Os::Windows) {
            // Found here, from the source OS, rather than in the rescue OS with disk 1 wiped.
            crate::windows::check_rescue_tools(&rescue.path)
                .with_context(|| format!("rescue bundle {}@{}", j.rescue.name, j.rescue.version))?;
        }
        // The packed target, beside it, verified.
        let stash = Mounted::ext4(&parts[2], &self.work.join("stash"), false)?;
        self.stash_target(j, &stash.path)?;
        // What the rescue OS needs to be this machine and carry on the job, and to boot.
        self.make_bootable_world(j, &rescue.path, &rescue_uuid, "rescue", Phase::BootRescue)?;
        // With the removable-media fallback too: firmware that lost its entries (or a machine
        // whose disk 1 is gone) still finds the rescue OS.
        let entry = loader_entry(&rescue.path, &rescue_uuid, "rescue", "reinstall rescue OS")?;
        install_loader(
            &parts[0],
            Some(&rescue.path),
            &[entry],
            "rescue",
            &[],
            "reinstall",
            true,
        )?;
        if self.disk1_grub_is_ours() {
            // A second job on BIOS: disk 1 boots this OS through our GRUB, whose rescue entry
            // names the rescue root just reformatted. Its grubenv now sends that entry to the
            // new rescue ESP (one in-place write of the environment block, as a one-shot is);
            // the default stays this OS until the rescue has called home.
            let uuid = bootcfg::bios::read_fat32_uuid(&parts[0])?;
            crate::bootsel::GrubEnv {
                esp: self.esp_of(j.disk1.as_ref())?,
                dir: crate::bootsel::GRUB_DIR.into(),
            }
            .set(&bootcfg::grubcfg::redirect_var("rescue"), &uuid)?;
        }
        Ok(())
    }

    /// Stores the job's target bundle, packed, in the stash filesystem mounted at `stash`
    /// (`target/`: manifest, signature, age identity, payload), and verifies it. A stash that
    /// holds another bundle (a job taken in the rescue OS) loses that payload first: a
    /// download is only ever resumed onto its own bytes.
    fn stash_target(&self, j: &Journal, stash: &Path) -> Result<()> {
        let (_, tbytes, tsig) = self.manifest(&j.target)?;
        let tdir = stash.join("target");
        std::fs::create_dir_all(&tdir)?;
        let manifest = tdir.join(bundle::MANIFEST_FILE);
        if std::fs::read(&manifest).ok().as_deref() != Some(&tbytes[..]) {
            match std::fs::remove_file(tdir.join(bundle::PAYLOAD_FILE)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).context("removing the stash's old payload")
                }
                _ => nix::unistd::sync(),
            }
            std::fs::write(&manifest, &tbytes)?;
        }
        std::fs::write(tdir.join(bundle::SIGNATURE_FILE), &tsig)?;
        let (_, tid_text) = self.age_identity(&j.target)?;
        write_private(&tdir.join(bundle::IDENTITY_FILE), &tid_text)?;
        let mut prog = Reporter::new(self, j, j.phase.as_str());
        transfer::fetch_to_file(
            &self.client,
            &j.target.sha256,
            j.target.size,
            &tdir.join(bundle::PAYLOAD_FILE),
            &mut |d, t| prog.update("stash", d, Some(t), 0),
        )?;
        prog.finish();
        let signed = bundle::verify::check_signed(&tdir, &self.release_key()?)?;
        bundle::verify::check_hash(&signed, &mut bundle::progress::Silent)?;
        Ok(())
    }

    /// `plan` of a job taken in the rescue OS: [`rescue_disks`] with the job's target, whose
    /// disks it pins. Refuses before anything is written.
    fn plan_in_rescue(&mut self, j: &mut Journal) -> Result<()> {
        let (tm, _, _) = self.manifest(&j.target)?;
        let (d1, d2, _) = rescue_disks(&self.root, j, Some(&tm), self.grub_chooses)?;
        j.target_os = Some(tm.os);
        j.disk1 = Some(d1);
        j.disk2 = Some(d2);
        Ok(())
    }

    /// `stage-rescue` of a job taken in the rescue OS: the running rescue OS stays; only
    /// the target is stashed (see [`Agent::stash_target`]).
    fn stash_only(&self, j: &Journal) -> Result<()> {
        let d2 = j.disk2.as_ref().context("no disk 2 in the journal")?;
        let stash = self.mount_stash(d2, false)?;
        self.stash_target(j, &stash.path)
    }

    /// Legacy BIOS, from an OS this agent installed: disk 1 boots through our GRUB (a second
    /// job), not the source's own.
    fn disk1_grub_is_ours(&self) -> bool {
        self.grub_chooses && self.root.join(WORLD_FILE).exists()
    }

    /// The rescue OS's boot entry. On BIOS disk 1's entry is named first: the selector learns
    /// from it where disk 1's GRUB reads its environment, when that GRUB is ours (after
    /// install-target, or from the start of a second job); a BIOS source's disk 1 may have
    /// no ESP at all, which is not an error here.
    fn rescue_entry(&mut self, j: &Journal) -> Result<u16> {
        if self.grub_chooses {
            let _ = self.entry_of(j.disk1.as_ref(), "reinstall-target", TARGET_LOADER);
        }
        self.entry_of(j.disk2.as_ref(), "reinstall-rescue", RESCUE_LOADER)
    }

    /// Injects identity, network, the agent and its journal into a freshly unpacked tree, and
    /// an fstab naming its root filesystem (`root_uuid`): the kernel mounts it read-only and
    /// systemd remounts it read-write from there.
    fn make_bootable_world(
        &self,
        j: &Journal,
        tree: &Path,
        root_uuid: &str,
        world: &str,
        booted_by: Phase,
    ) -> Result<()> {
        preserve::inject(&self.dir().join("carry"), tree)?;
        std::fs::create_dir_all(tree.join("etc"))?;
        std::fs::write(tree.join("etc/fstab"), root_fstab(root_uuid))
            .context("writing etc/fstab")?;
        let net: NetIdentity =
            serde_json::from_slice(&std::fs::read(self.dir().join("network.json"))?)
                .context("var/lib/reinstall/network.json (captured in plan) is damaged")?;
        preserve::inject_network(&net, tree)?;
        std::fs::create_dir_all(tree.join("etc/reinstall"))?;
        std::fs::write(tree.join(WORLD_FILE), format!("{world}\n"))?;
        crate::setup::install_binary(tree, &std::env::current_exe()?)?;
        crate::setup::install_unit(tree, AGENT_SERVICE, AGENT_UNIT, &["multi-user.target"])?;
        crate::setup::install_unit(
            tree,
            EMERGENCY_SERVICE,
            EMERGENCY_UNIT,
            &["emergency.target", "rescue.target"],
        )?;
        let wd = tree.join(WATCHDOG_CONF);
        std::fs::create_dir_all(wd.parent().unwrap())?;
        std::fs::write(&wd, WATCHDOG_DROPIN).with_context(|| format!("writing {WATCHDOG_CONF}"))?;
        // The journal as the next OS will see it: the boot that starts it has happened.
        let next = journal::Locked::open(&tree.join(JOURNAL_DIR))?;
        let mut j2 = j.clone();
        j2.record(
            booted_by,
            Step::Done,
            Some(format!("written into the {world} OS")),
        );
        next.save(&j2)?;
        // The carried identity goes along as it is (bytes, modes, owners), for the next OS to
        // inject into the one after it.
        preserve::capture(
            &self.dir().join("carry"),
            &tree.join(JOURNAL_DIR).join("carry"),
        )?;
        std::fs::copy(
            self.dir().join("network.json"),
            tree.join(JOURNAL_DIR).join("network.json"),
        )?;
        Ok(())
    }

    fn boot_entry(&mut self, j: &Journal, target: bool) -> Result<()> {
        let n = if target {
            // Disk 1's GRUB spends its `next_entry` when it boots the target: a retry (the
            // power went while the target came up) must arm it again, or the firmware's
            // one-shot lands in GRUB's default, the rescue, and the good target is failed.
            if j.target_os != Some(bundle::Os::Windows) {
                self.disk1_grubenv(j, ("next_entry", "target"))?;
            }
            self.entry_of(j.disk1.as_ref(), "reinstall-target", TARGET_LOADER)?
        } else {
            self.rescue_entry(j)?
        };
        self.boot.set_next(n)?;
        Ok(())
    }

    /// `rescue-up` / `target-up`: proves the new OS reached the stager from here (the agent's
    /// client waits out an unreachable stager), then makes it the default boot. The target
    /// goes first, the rescue stays second.
    fn called_home(&mut self, j: &Journal, target: bool) -> Result<()> {
        let ev = Event {
            job: j.job,
            kind: EventKind::Network,
            phase: Some(j.phase.as_str().into()),
            bytes_done: None,
            bytes_total: None,
            message: Some(format!(
                "{} OS is up",
                if target { "target" } else { "rescue" }
            )),
            network: std::fs::read(self.dir().join("network.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok()),
        };
        self.client
            .post::<_, serde_json::Value>("/v1/agent/events", &ev)
            .context("calling home")?;
        let rescue = self.rescue_entry(j)?;
        if target {
            let t = self.entry_of(j.disk1.as_ref(), "reinstall-target", TARGET_LOADER)?;
            self.boot.make_default(rescue)?;
            self.boot.make_default(t)?;
            // And disk 1's GRUB: the target from now on.
            self.disk1_grubenv(j, ("saved_entry", "target"))?;
        } else {
            self.boot.make_default(rescue)?;
        }
        Ok(())
    }

    /// Replaces the grubenv of disk 1's GRUB (both loaders: the removable path and
    /// `EFI/target`) with the one variable `var`.
    fn disk1_grubenv(&self, j: &Journal, var: (&str, &str)) -> Result<()> {
        let esp = self.esp_of(j.disk1.as_ref())?;
        let env = grub_env(&[var])?;
        let files: Vec<(String, &[u8])> = DISK1_GRUB_DIRS
            .iter()
            .map(|d| (format!("{d}/grubenv"), env.as_slice()))
            .collect();
        let refs: Vec<(&str, &[u8])> = files.iter().map(|(p, b)| (p.as_str(), *b)).collect();
        bootcfg::loader::write_esp(&esp, &refs)
    }

    /// Once per boot, before the agent talks to anyone: disk 1's GRUB counts the boots of a
    /// saved target that did not get this far, and boots the rescue OS after
    /// [`bootcfg::grubcfg::SAVED_TRIES`] of them (see `bootcfg::grubcfg::render`). In an OS
    /// this agent installed (the target; a target that is the source of a next job) this
    /// boot got far enough: the count is taken back. In the rescue OS: if GRUB gave up on the
    /// target, the target had called home (GRUB counts only a saved target), so the job's
    /// target is reported as no longer coming up (the stager keeps a done job done, with this
    /// as the host's last event) and the rescue OS stays up, reachable; the target stays the
    /// default, so a reboot tries it again. Best effort: what fails is said, not fatal.
    pub fn boot_checks(&mut self) {
        if let Err(e) = self.count_boot() {
            eprintln!("reinstall: disk 1's GRUB boot count: {e:#}");
        }
        self.say_up();
        self.say_ready(false);
    }

    /// In the source OS, or a target whose job is done (the source of the next one), with no
    /// job under way: plans (read only) and tells the stager whether a reinstall would go
    /// ahead here, and if not why, so that machines that are not ready are found fleet-wide
    /// before any job (`reinstall status`). Best effort.
    ///
    /// In the rescue OS only while `idle` (waiting for work: its job failed, or is over, or
    /// it runs on request), where the plan is that of a job taken there ([`rescue_disks`]).
    fn say_ready(&mut self, idle: bool) {
        let busy = if self.world == World::Rescue {
            !idle
        } else {
            self.journal
                .load()
                .ok()
                .flatten()
                .is_some_and(|j| !j.finished())
        };
        if busy {
            return;
        }
        let plan = plan_report(&self.root, self.disk2.as_deref(), None);
        let ready = crate::setup::readiness(&plan, self.world);
        crate::setup::report_readiness(&self.client, &ready);
        self.ready_said = Some(std::time::Instant::now());
    }

    /// Between long polls while idle: plans once [`Agent::ready_every`] has passed since the
    /// last time (see [`READY_EVERY`]), or at once if it has not yet this run (the rescue OS,
    /// whose job ended in this run; a job dropped as cancelled).
    pub fn refresh_ready(&mut self) {
        if self
            .ready_said
            .is_none_or(|t| t.elapsed() >= self.ready_every)
        {
            self.say_ready(true);
        }
    }

    /// In the target after its job is done (any later boot: a reboot, a return from the
    /// rescue OS): tells the stager this OS is up, so that the host's phase and last event
    /// are this boot's, not what the rescue OS said before it (`rescue` after a rescue on
    /// request, a report that the target had stopped coming up). Best effort.
    fn say_up(&mut self) {
        if self.world != World::Target {
            return;
        }
        if let Ok(Some(j)) = self.journal.load() {
            if j.finished() && j.phase != Phase::Failed {
                self.report(&j, EventKind::Network, Some("target OS up".into()), None);
            }
        }
    }

    fn count_boot(&mut self) -> Result<()> {
        use bootcfg::grubcfg::{FELL_BACK_VAR, SAVED_TRIES, TRIES_VAR};
        let ours = self.world == World::Rescue || self.root.join(WORLD_FILE).exists();
        let Some(mut j) = self.journal.load()? else {
            return Ok(());
        };
        // A Windows disk 1 has no GRUB; a job before plan has no disk 1 yet.
        let (true, Some(d1)) = (ours, j.disk1.clone()) else {
            return Ok(());
        };
        if j.target_os == Some(bundle::Os::Windows) {
            return Ok(());
        }
        // Disk 1 still the source's: a BIOS source may have no ESP.
        let Ok(esp) = self.esp_of(Some(&d1)) else {
            return Ok(());
        };
        // Disk 1 still the source's (a first job's rescue OS before install-target), or a
        // loader directory that is gone: nothing counted there.
        let envs: Vec<_> = DISK1_GRUB_DIRS
            .iter()
            .map(|d| crate::bootsel::GrubEnv {
                esp: esp.clone(),
                dir: d.to_string(),
            })
            .filter_map(|g| g.env().ok().map(|env| (g, env)))
            .collect();
        if self.world != World::Rescue {
            for (g, _) in &envs {
                for (k, v) in g.remove(&[TRIES_VAR, FELL_BACK_VAR])? {
                    eprintln!(
                        "reinstall: this boot is up: {k}={v:?} taken back from disk 1's {}/grubenv",
                        g.dir
                    );
                }
            }
            return Ok(());
        }
        let Some(entry) = envs
            .iter()
            .find_map(|(_, env)| env.get(FELL_BACK_VAR).filter(|v| !v.is_empty()).cloned())
        else {
            return Ok(());
        };
        if !(j.finished() || j.pending() == Phase::TargetUp) {
            // A second job's source (a target we installed) that stopped coming up before
            // this rescue OS called home: GRUB sent it here, and the job carries on from here.
            eprintln!("reinstall: disk 1's GRUB booted this rescue OS after the {entry} OS did not come up {SAVED_TRIES} boots in a row; the job carries on");
            for (g, _) in &envs {
                g.remove(&[FELL_BACK_VAR])?;
            }
            return Ok(());
        }
        self.target_gone(
            &mut j,
            &format!("did not come up {SAVED_TRIES} boots in a row (a panic, emergency mode or a hang before its agent started); disk 1's GRUB booted the rescue OS instead"),
        )?;
        for (g, _) in &envs {
            g.remove(&[FELL_BACK_VAR])?;
        }
        Ok(())
    }

    /// In the rescue OS, without an operator's request, after the job's target had called
    /// home: the target stopped coming up (`why`). Moves this rescue OS's journal (last
    /// written before the target's first boot) on, so the job is not taken for a target that
    /// never came up and retried, and tells the stager (which keeps a done job done, with
    /// this as the host's last event). The rescue OS stays up; the target stays the default.
    fn target_gone(&mut self, j: &mut Journal, why: &str) -> Result<()> {
        let msg = format!(
            "after job {}, the target OS {why}; the target stays the default: a reboot tries it again",
            j.job
        );
        eprintln!("reinstall: {msg}");
        // Reported first: a stager that cannot be reached now hears it from the next start of
        // this agent, which finds the same state.
        let ev = Event {
            job: j.job,
            kind: EventKind::Failed,
            phase: Some(Phase::TargetUp.as_str().into()),
            bytes_done: None,
            bytes_total: None,
            message: Some(msg),
            network: None,
        };
        self.client
            .post::<_, serde_json::Value>("/v1/agent/events", &ev)
            .context("reporting to the stager that the target stopped coming up")?;
        if !j.finished() {
            j.record(
                Phase::TargetUp,
                Step::Done,
                Some("the target had called home (it was disk 1's default)".into()),
            );
            self.journal.save(j)?;
        }
        Ok(())
    }

    /// Whether disk 1's GRUB has the target as its saved default: `target-up` saves it only
    /// after the target has called home.
    fn target_was_up(&self, j: &Journal) -> bool {
        self.esp_of(j.disk1.as_ref())
            .and_then(|esp| {
                crate::bootsel::GrubEnv {
                    esp,
                    dir: DISK1_GRUB_DIRS[0].into(),
                }
                .env()
            })
            .is_ok_and(|env| env.get("saved_entry").map(String::as_str) == Some("target"))
    }

    /// The stash on disk 2 (`d2`, checked to be the disk in the journal), mounted.
    fn mount_stash(&self, d2: &DiskId, read_only: bool) -> Result<Mounted> {
        let dev = disk::identify(Path::new(&d2.path))
            .ok()
            .filter(|now| now.same_disk(d2))
            .and_then(|now| {
                now.find_partition(PartKind::LinuxData)
                    .ok()
                    .map(|p| now.partition_path(p.number))
            })
            .context("disk 2 (the stash) is not where the journal says")?;
        Mounted::ext4(&dev, &self.work.join("stash"), read_only)
    }

    /// The ESP partition's device of disk `d`, checked to be the disk in the journal.
    fn esp_of(&self, d: Option<&DiskId>) -> Result<PathBuf> {
        let now = journal_disk_now(d)?;
        Ok(now.partition_path(now.find_partition(PartKind::Esp)?.number))
    }

    /// The UUID of the running OS's root filesystem, from the fstab written with it.
    fn own_root_uuid(&self) -> Result<String> {
        let fstab = self.root.join("etc/fstab");
        std::fs::read_to_string(&fstab)
            .ok()
            .and_then(|t| {
                t.lines().find_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    (f.len() > 1 && f[1] == "/")
                        .then(|| f[0].strip_prefix("UUID="))
                        .flatten()
                        .map(String::from)
                })
            })
            .with_context(|| format!("{}: no UUID= line for /", fstab.display()))
    }

    /// The boot entry for partition 1 (the ESP) of `d`, created if missing.
    fn entry_of(&mut self, d: Option<&DiskId>, label: &str, loader: &str) -> Result<u16> {
        let now = journal_disk_now(d)?;
        let esp = now.find_partition(PartKind::Esp)?;
        self.boot.create_entry(
            label,
            &EspRef {
                disk_guid: now.ptuuid.clone().context("no GPT GUID recorded")?,
                partition: esp.number,
                partition_guid: Some(esp.guid),
                start_lba: esp.start_lba,
                size_lba: esp.size_lba,
                loader: loader.into(),
                device: Some(now.partition_path(esp.number).display().to_string()),
            },
        )
    }

    fn install_target(&mut self, j: &mut Journal) -> Result<()> {
        if j.target_os == Some(bundle::Os::Windows) {
            return self.install_windows(j);
        }
        let pinned = j.disk1.clone().context("no disk 1 in the journal")?;
        let d2 = j.disk2.clone().context("no disk 2 in the journal")?;
        let layout =
            disk::linux_target_layout(pinned.size_bytes, pinned.logical_sector, self.grub_chooses)?;
        // Legacy BIOS: the firmware boots disk 1's MBR. GRUB is built first (a build that fails
        // leaves disk 1 as it is) and written with the new table, in the same flush: disk 1's
        // old boot code is never left replaced by none. It looks for disk 1's ESP under a uuid
        // that ESP gets only when it is complete, and until then for the rescue ESP on disk 2.
        let bios = match layout.parts.iter().find(|p| p.kind == PartKind::BiosBoot) {
            Some(p) => {
                anyhow::ensure!(
                    layout.sector == 512,
                    "{}: legacy BIOS boot from a disk with {}-byte sectors is not supported",
                    pinned.path,
                    layout.sector
                );
                let esp_id = u32::from_le_bytes(disk::random_guid()?[..4].try_into()?);
                let rescue_esp = self.esp_of(j.disk2.as_ref())?;
                let early = bootcfg::bios::early_config(
                    &[
                        &bootcfg::bios::fat_uuid(esp_id),
                        &bootcfg::bios::read_fat32_uuid(&rescue_esp)?,
                    ],
                    crate::bootsel::GRUB_DIR,
                );
                let grub = bootcfg::bios::prepare(
                    Path::new(&pinned.path),
                    None,
                    p.first_lba * layout.sector / 512,
                    p.bytes(layout.sector) / 512,
                    &early,
                )?;
                eprintln!(
                    "reinstall: GRUB for BIOS on {}: built with {}",
                    pinned.path, grub.from
                );
                Some((esp_id, grub))
            }
            None => None,
        };
        let grub = bios.as_ref().map(|b| &b.1);
        let parts = self.repartition(j, |j| &mut j.disk1, &pinned, &layout, grub)?;
        let bios = bios.map(|b| b.0);
        let (esp, root_dev) = (
            &parts[layout.index_of(PartKind::Esp)],
            &parts[layout.index_of(PartKind::LinuxRoot)],
        );
        mount::mkfs_esp(esp, "ESP", pinned.logical_sector)?;
        let root_uuid = mount::mkfs_ext4(root_dev, "root")?;
        let stash = self.mount_stash(&d2, true)?;
        let root = Mounted::ext4(root_dev, &self.work.join("target"), false)?;
        let tdir = stash.path.join("target");
        let signed = bundle::verify::check_signed(&tdir, &self.release_key()?)?;
        let id = bundle::payload::load_identity(&tdir.join(bundle::IDENTITY_FILE))?;
        let mut prog = Reporter::new(self, j, "install-target");
        bundle::verify::unpack_into(&signed, id, &root.path, &mut prog)
            .context("unpacking the target")?;
        self.make_bootable_world(j, &root.path, &root_uuid, "target", Phase::BootTarget)?;
        // Disk 1's GRUB boots the target once (`next_entry`, cleared by GRUB before it boots)
        // and otherwise the rescue OS on disk 2, until the target has called home: whatever
        // the firmware boots after a failed target (BootNext spent; firmware that reorders
        // BootOrder by its own disk order; the removable path), it comes back to the rescue.
        let target = loader_entry(&root.path, &root_uuid, "target", "target OS")?;
        let rescue = loader_entry(
            &self.root,
            &self.own_root_uuid()?,
            "rescue",
            "reinstall rescue OS",
        )?;
        install_loader(
            esp,
            Some(&root.path),
            &[target, rescue],
            "rescue",
            &[("next_entry", "target")],
            "target",
            true,
        )?;
        if let Some(id) = bios {
            // Complete: from now on disk 1's GRUB reads this ESP.
            bootcfg::bios::set_fat32_volume_id(esp, id)?;
        }
        Ok(())
    }
}

impl Agent {
    /// install-target for a Windows bundle (see [`crate::windows`]): the new table, the ESP
    /// and NTFS volume, the image applied from the stash, WinPE on the ESP, the identity.
    /// Disk 1 boots nothing until boot-target sets its one-shot: the rescue stays the default.
    fn install_windows(&mut self, j: &mut Journal) -> Result<()> {
        let pinned = j.disk1.clone().context("no disk 1 in the journal")?;
        let d2 = j.disk2.clone().context("no disk 2 in the journal")?;
        let layout = disk::windows_target_layout(pinned.size_bytes, pinned.logical_sector)?;
        let parts = self.repartition(j, |j| &mut j.disk1, &pinned, &layout, None)?;
        let esp = parts[layout.index_of(PartKind::Esp)].clone();
        let vol_i = layout.index_of(PartKind::MsBasicData);
        let vol = parts[vol_i].clone();
        mount::mkfs_esp(&esp, "SYSTEM", pinned.logical_sector)?;
        crate::windows::mkntfs(
            &vol,
            layout.parts[vol_i].first_lba,
            layout.sector,
            "Windows",
        )?;
        let stash = self.mount_stash(&d2, true)?;
        let tdir = stash.path.join("target");
        let signed = bundle::verify::check_signed(&tdir, &self.release_key()?)?;
        let id = bundle::payload::load_identity(&tdir.join(bundle::IDENTITY_FILE))?;
        let mut inst = crate::windows::Installer {
            esp: esp.clone(),
            ntfs: vol.clone(),
            meta: None,
            applied: false,
            removable: None,
        };
        let mut prog = Reporter::new(self, j, "install-target");
        bundle::verify::run(&signed, id, &mut inst, "install-target", &mut prog)
            .context("installing the Windows target")?;
        drop(stash);
        let meta = inst
            .meta
            .clone()
            .context("the Windows bundle has no windows.json")?;
        anyhow::ensure!(inst.applied, "the Windows bundle has no install.wim");
        let net: NetIdentity =
            serde_json::from_slice(&std::fs::read(self.dir().join("network.json"))?)
                .context("var/lib/reinstall/network.json (captured in plan) is damaged")?;
        let written = crate::windows::write_identity(
            &vol,
            &self.work.join("windows"),
            &net,
            &self.dir().join("carry"),
            &meta,
            &self.client.identity,
            j.job,
        )?;
        inst.finish()?;
        eprintln!(
            "reinstall: Windows image {:?} applied to {}; wrote {}",
            meta.image_name,
            vol.display(),
            written
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(())
    }
}

/// The names of [`AGENT_UNIT`] and [`EMERGENCY_UNIT`] under `/etc/systemd/system`.
pub const AGENT_SERVICE: &str = "reinstall-agent.service";
pub const EMERGENCY_SERVICE: &str = "reinstall-emergency-reboot.service";

/// Started with systemd's emergency or rescue mode (a bad fstab, a failed fsck) in every OS
/// the agent writes: on a machine nobody can reach such a boot is a dead end, so it reboots
/// after `DELAY` seconds; in the target disk 1's GRUB counts those boots and falls back to the
/// rescue OS (see `bootcfg::grubcfg`), and in a first boot the firmware's last good OS comes
/// back. A drop-in changes the delay; `systemctl stop` it to keep the shell.
pub const EMERGENCY_UNIT: &str = "[Unit]
Description=reinstall: emergency or rescue mode is a dead end on a machine nobody can reach: reboot
DefaultDependencies=no

[Service]
Type=simple
Environment=DELAY=120
ExecStart=/bin/sh -c 'echo \"reinstall: emergency or rescue mode, unreachable: rebooting in $DELAY s (systemctl stop reinstall-emergency-reboot to stay)\" >/dev/console; sleep $DELAY; exec systemctl reboot --force'
";

/// Where [`WATCHDOG_DROPIN`] goes in every OS the agent writes.
pub const WATCHDOG_CONF: &str = "etc/systemd/system.conf.d/50-reinstall-watchdog.conf";

/// Has systemd arm the machine's hardware watchdog (`/dev/watchdog0`: iTCO, IPMI, a VM's
/// i6300esb; opened when its driver loads) and ping it from PID 1: a boot whose kernel or
/// systemd hangs is reset, so it is counted and falls back like one that panicked. Without a
/// watchdog device systemd only notes that it has none.
pub const WATCHDOG_DROPIN: &str =
    "# Written by reinstall: a machine nobody can reach must not stay hung. A hardware watchdog
# resets it when the kernel or systemd stops pinging it for RuntimeWatchdogSec; disk 1's GRUB
# counts such boots and falls back to the rescue OS. A later drop-in (or removing this file)
# changes it.
[Manager]
RuntimeWatchdogSec=2min
";

/// The agent's systemd unit, installed into every OS it writes (and into the VM harness's
/// source image).
pub const AGENT_UNIT: &str = "[Unit]
Description=reinstall agent: carries a reinstall job across reboots
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart=/usr/local/sbin/reinstall agent
Restart=on-failure
RestartSec=10
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
";

/// Disk 1 (holding the running root `root`) and disk 2 (`hint`, else the last job's disk 2,
/// else the only candidate: see [`Disk2From`]), both identified, disk 2 checked
/// destructible. Touches nothing.
pub fn select_disks(root: &Path, hint: Option<&Path>) -> Result<(DiskId, DiskId, Disk2From)> {
    let d1 = running_root_disk(root)?;
    let (d2, from) = match hint {
        Some(p) => (disk::identify(p)?, Disk2From::Named),
        None => match last_disk2(root, &d1) {
            Some(d) => (d, Disk2From::LastJob),
            None => (pick_disk2(&d1.name)?, Disk2From::OnlyOther),
        },
    };
    anyhow::ensure!(
        d1.name != d2.name,
        "disk 2 {} is the disk of the running root",
        d2.path
    );
    disk::check_destructible_for(&d2, root)?;
    Ok((d1, d2, from))
}

/// How disk 2 was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Disk2From {
    /// `--disk2` (the agent's unit: `reinstall setup --disk2`).
    Named,
    /// The disk the last job on this machine used as disk 2, which holds its rescue OS:
    /// found again by its serial or WWN.
    LastJob,
    /// The one disk besides the running root's.
    OnlyOther,
    /// In the rescue OS: the disk it runs from, kept as it is (a job taken there installs
    /// only the target, through the stash it has).
    RescueRoot,
}

impl std::fmt::Display for Disk2From {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Disk2From::Named => "named with --disk2",
            Disk2From::LastJob => "the last job's disk 2, which holds its rescue OS",
            Disk2From::OnlyOther => "the only disk besides the root's",
            Disk2From::RescueRoot => "the running rescue OS's disk, kept as it is",
        })
    }
}

/// Disk 2 of the last job on this machine (see [`journal::last_with_disks`]), as it is now:
/// only a disk with a serial or WWN to be found by (a size alone could be another disk's),
/// still there, and not the running root's. A later job (from the target OS that job
/// installed) thus takes the disk its rescue OS is on, as the first job was told to, on a
/// machine with more disks than two, where nothing else would say which.
fn last_disk2(root: &Path, d1: &DiskId) -> Option<DiskId> {
    let last = journal::last_with_disks(&root.join(JOURNAL_DIR))?.disk2?;
    if last.serial.is_none() && last.wwn.is_none() {
        return None;
    }
    let now = disk::find_pinned(&last).ok()?;
    (now.name != d1.name).then_some(now)
}

/// A job taken in the rescue OS that runs from `root`, planned read only from `last`, the
/// journal of the last job through it: disk 2 is the running root's, which must be the last
/// job's disk 2; disk 1 is the last job's, found again by its stable ids (it may have been
/// left unmounted, or half written, by an operator's repair), and must be one a job may
/// write. The target (`target`'s sizes, else default ones) must fit disk 1, and its payload
/// the stash on disk 2 as it is: the rescue OS and disk 2's partitions stay. The identity
/// carried into this rescue OS (`network.json`, `carry`) is the machine's, for the new target
/// too, and must be there. Returns disk 1, disk 2 and the stash's room in bytes; refuses
/// before anything is written.
fn rescue_disks(
    root: &Path,
    last: &Journal,
    target: Option<&bundle::Manifest>,
    bios: bool,
) -> Result<(DiskId, DiskId, u64)> {
    let last1 = last
        .disk1
        .as_ref()
        .context("no disk 1 in the last job's journal")?;
    let last2 = last
        .disk2
        .as_ref()
        .context("no disk 2 in the last job's journal")?;
    let d2 = running_root_disk(root)?;
    anyhow::ensure!(
        d2.same_disk(last2),
        "the rescue OS runs from {}, which is not disk 2 of the last job ({}); nothing was changed",
        d2.path,
        last2.path
    );
    let d1 = disk::find_pinned(last1).context("disk 1 of the last job")?;
    disk::check_destructible_for(&d1, root)?;
    target_layout(&d1, target, bios)?;
    let stash = d2.find_partition(PartKind::LinuxData)?;
    let room = stash.size_lba * d2.logical_sector;
    if let Some(tm) = target {
        anyhow::ensure!(
            room >= stash_size(tm),
            "the stash on disk 2 ({}) holds {} MiB; target {} needs {} MiB; a job taken in the rescue OS does not repartition the disk it runs from: run the job from the source or target OS instead; nothing was changed",
            d2.partition_path(stash.number).display(),
            room / MIB,
            tm.id(),
            stash_size(tm).div_ceil(MIB)
        );
        if tm.os == bundle::Os::Windows {
            crate::windows::check_rescue_tools(root).context("this rescue OS")?;
        }
    }
    for carried in ["network.json", "carry"] {
        let p = root.join(JOURNAL_DIR).join(carried);
        anyhow::ensure!(
            p.exists(),
            "{}: the identity carried into this rescue OS is missing; nothing was changed",
            p.display()
        );
    }
    Ok((d1, d2, room))
}

/// The one disk that holds the running root `root`, identified.
fn running_root_disk(root: &Path) -> Result<DiskId> {
    let roots = disk::root_disks_of(root);
    let [disk] = roots.as_slice() else {
        bail!(
            "the running root is on {} disks ({:?}); exactly one is supported",
            roots.len(),
            roots
        );
    };
    disk::identify(Path::new(&format!("/dev/{disk}")))
}

/// What `reinstall plan` shows: everything the job would do, decided, nothing written.
#[derive(Debug, serde::Serialize)]
pub struct PlanReport {
    pub disk1: DiskId,
    pub disk2: DiskId,
    /// How disk 2 was chosen.
    pub disk2_from: Disk2From,
    pub disk2_layout: disk::Layout,
    pub disk1_layout: disk::Layout,
    pub boot_mode: &'static str,
    pub firmware_variables_writable: bool,
    pub network: NetIdentity,
    pub security_identity: Vec<PathBuf>,
    pub boot_changes: Vec<String>,
    /// The target bundle the disks were sized for (`NAME@VERSION`), if one was named.
    pub target: Option<String>,
    /// The least room the stash on disk 2 must have (in the rescue OS with no target named:
    /// 0, the stash it has decides which targets fit).
    pub stash_min_bytes: u64,
    /// In the rescue OS: the room of the stash on disk 2, which a job taken there does not
    /// resize (a target's payload and 64 MiB must fit in it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stash_bytes: Option<u64>,
}

/// Plans with the target bundle's sizes when given (`target`: its signed manifest), else
/// default sizes (stash at least 1 GiB); the rescue root gets 2 GiB. A job checks the real
/// sizes of its bundles again in its own `plan` phase. In the rescue OS, plans a job taken
/// there ([`rescue_disks`]): disk 2 stays as it is.
pub fn plan_report(
    root: &Path,
    hint: Option<&Path>,
    target: Option<&bundle::Manifest>,
) -> Result<PlanReport> {
    let uefi = Path::new("/sys/firmware/efi").exists();
    let in_rescue = world_of(root) == World::Rescue;
    let (d1, d2, disk2_from, l2, stash_bytes, stash) = if in_rescue {
        let last = journal::last_with_disks(&root.join(JOURNAL_DIR)).with_context(|| {
            format!(
                "{}: this rescue OS holds no journal of the job that installed it",
                root.join(JOURNAL_DIR).display()
            )
        })?;
        let (d1, d2, room) = rescue_disks(root, &last, target, !uefi)?;
        if let Some(given) = hint {
            anyhow::ensure!(
                disk::identify(given)?.same_disk(&d2),
                "--disk2 {}: in the rescue OS, disk 2 is the disk it runs from ({})",
                given.display(),
                d2.path
            );
        }
        let l2 = d2.read_layout()?;
        let stash = target.map(stash_size).unwrap_or(0);
        (d1, d2, Disk2From::RescueRoot, l2, Some(room), stash)
    } else {
        let (d1, d2, from) = select_disks(root, hint)?;
        let stash = target.map(stash_size).unwrap_or(1 << 30);
        let l2 = disk::rescue_layout(d2.size_bytes, d2.logical_sector, 2 << 30, stash)?;
        (d1, d2, from, l2, None, stash)
    };
    let l1 = target_layout(&d1, target, !uefi)?;
    let writable = uefi
        && std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .any(|l| {
                l.contains(" /sys/firmware/efi/efivars ")
                    && l.split(' ').nth(5).is_some_and(|o| o.starts_with("rw"))
            });
    // In the rescue OS, its own boot entry is there already.
    let boot_changes = match (uefi, in_rescue) {
        (true, false) => vec![
            format!(
                "create UEFI entry reinstall-rescue -> {} partition 1 {RESCUE_LOADER}",
                d2.path
            ),
            "boot it once (BootNext); make it first in BootOrder after it calls home".into(),
        ],
        (false, false) => vec![
            "add a rescue entry to the source's GRUB (custom.cfg; reads the rescue ESP)".into(),
            "boot it once (next_entry in the source's grubenv, as grub-reboot); make it the default after it calls home (a variable on the rescue ESP)".into(),
        ],
        (_, true) => Vec::new(),
    }
    .into_iter()
    .chain(if uefi {
        [
            format!(
                "create UEFI entry reinstall-target -> {} partition 1 {TARGET_LOADER}",
                d1.path
            ),
            "boot it once; make it first after it calls home, rescue kept second".into(),
        ]
    } else {
        [
            format!(
                "install-target: GRUB i386-pc on {} (MBR + BIOS boot partition), reading disk 1's ESP once complete, the rescue ESP until then",
                d1.path
            ),
            "boot the target once (next_entry); make it the default after it calls home, rescue kept".into(),
        ]
    })
    .collect();
    let network = crate::netid::capture()?;
    if target.is_some_and(|m| m.os == bundle::Os::Windows) {
        crate::windows::check_network(&network)?;
    }
    Ok(PlanReport {
        target: target.map(|m| m.id()),
        stash_min_bytes: stash,
        stash_bytes,
        boot_changes,
        disk1: d1,
        disk2: d2,
        disk2_from,
        disk2_layout: l2,
        disk1_layout: l1,
        boot_mode: if uefi { "uefi" } else { "bios" },
        firmware_variables_writable: writable,
        network,
        security_identity: preserve::identity_files(root),
    })
}

/// The fstab of a tree the agent writes: its ext4 root by UUID (read back by
/// `own_root_uuid`).
pub fn root_fstab(uuid: &str) -> String {
    format!("# written by reinstall\nUUID={uuid} / ext4 errors=remount-ro 0 1\n")
}

/// Disk `d` from the journal as it is now, refused if another disk sits at its path.
fn journal_disk_now(d: Option<&DiskId>) -> Result<DiskId> {
    let d = d.context("no disk in the journal")?;
    disk::identify(Path::new(&d.path))
        .ok()
        .filter(|now| now.same_disk(d))
        .with_context(|| format!("{} is not the disk in the journal", d.path))
}

/// The GRUB menu entry booting the kernel found in `tree` from the filesystem `uuid`.
/// Refuses a tree without a kernel.
pub fn loader_entry(
    tree: &Path,
    uuid: &str,
    id: &str,
    title: &str,
) -> Result<bootcfg::grubcfg::Entry> {
    let (kernel, initrd) = bootcfg::grubcfg::find_kernel(tree)?;
    Ok(bootcfg::grubcfg::Entry {
        id: id.to_string(),
        title: title.to_string(),
        root_uuid: uuid.to_string(),
        kernel,
        initrd,
        // panic=10: a kernel that panics reboots, and the firmware falls back to the last good
        // OS (the one-shot entry is spent), instead of hanging unreachable.
        args: "console=tty0 console=ttyS0,115200 panic=10".into(),
    })
}

/// Writes GRUB into the ESP `esp`: `\EFI\<dir>\grubx64.efi`, its `grub.cfg` with `entries`
/// (`default` booted when no one-shot is pending and none was saved) and its environment
/// block `grubenv` holding `env`; with `fallback` the same under the removable-media path
/// `\EFI\BOOT\BOOTX64.EFI` (UEFI spec §3.5.1.1), which firmware boots when no entry does.
/// Installs GRUB into `esp` (`EFI/<dir>`, and the removable path `EFI/BOOT` with
/// `fallback`), built by the GRUB of `tree` (the OS it boots) when it has one, else the
/// host's; says which on stderr.
pub fn install_loader(
    esp: &Path,
    tree: Option<&Path>,
    entries: &[bootcfg::grubcfg::Entry],
    default: &str,
    env: &[(&str, &str)],
    dir: &str,
    fallback: bool,
) -> Result<()> {
    let cfg = bootcfg::grubcfg::render(entries, default, 1).into_bytes();
    let env = grub_env(env)?;
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let dirs: &[&str] = if fallback { &[dir, "BOOT"] } else { &[dir] };
    for d in dirs {
        let name = if *d == "BOOT" {
            "BOOTX64.EFI"
        } else {
            "grubx64.efi"
        };
        let (image, from) = bootcfg::loader::grub_efi_image_from(tree, &format!("/EFI/{d}"))?;
        eprintln!("reinstall: EFI/{d}/{name}: built with {from}");
        files.push((format!("EFI/{d}/{name}"), image));
        files.push((format!("EFI/{d}/grub.cfg"), cfg.clone()));
        files.push((format!("EFI/{d}/grubenv"), env.clone()));
    }
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, d)| (p.as_str(), d.as_slice()))
        .collect();
    bootcfg::loader::write_esp(esp, &refs)
}

fn grub_env(vars: &[(&str, &str)]) -> Result<Vec<u8>> {
    let m = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Ok(bootcfg::grubenv::render(&m)?)
}

/// Disk 1's layout for the target `m` (Linux when unknown), checked to hold it.
fn target_layout(d1: &DiskId, m: Option<&bundle::Manifest>, bios: bool) -> Result<disk::Layout> {
    anyhow::ensure!(
        !bios || d1.logical_sector == 512,
        "{}: legacy BIOS boot from a disk with {}-byte sectors is not supported; nothing was changed",
        d1.path,
        d1.logical_sector
    );
    let Some(m) = m else {
        return disk::linux_target_layout(d1.size_bytes, d1.logical_sector, bios);
    };
    let (l, expansion) = if m.os == bundle::Os::Windows {
        anyhow::ensure!(
            !bios,
            "{} is a Windows target: Windows targets are installed on UEFI machines only, this one boots through legacy BIOS; nothing was changed",
            m.id()
        );
        (
            disk::windows_target_layout(d1.size_bytes, d1.logical_sector)?,
            WIM_EXPANSION,
        )
    } else {
        (
            disk::linux_target_layout(d1.size_bytes, d1.logical_sector, bios)?,
            1,
        )
    };
    check_target_fits(&l, m, expansion)?;
    Ok(l)
}

/// A Windows image applies to about this many times its WIM's size (LZX compression and
/// single-instance storage; 2.5-3x measured on Windows Server media).
const WIM_EXPANSION: u64 = 3;

/// Refuses a target that would not fit disk 1's root partition (`expansion` times what the
/// bundle unpacks to, with 10% for filesystem overhead): better now, before anything is written, than a full disk in the rescue OS.
fn check_target_fits(l1: &disk::Layout, m: &bundle::Manifest, expansion: u64) -> Result<()> {
    let root_part = l1.parts.last().expect("a root partition");
    let need = m.contents.unpacked_size * expansion + m.contents.unpacked_size * expansion / 10;
    anyhow::ensure!(
        root_part.bytes(l1.sector) >= need,
        "disk 1 is too small for {}: its root partition would hold {} MiB, the target unpacks to {} MiB (+10%)",
        m.id(),
        root_part.bytes(l1.sector) >> 20,
        need >> 20
    );
    Ok(())
}

/// The one disk that is not the root disk, not a loop/ram/optical/virtual device.
fn pick_disk2(root: &str) -> Result<DiskId> {
    let mut c = Vec::new();
    for e in std::fs::read_dir("/sys/block")?.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n == root
            || ["loop", "ram", "zram", "sr", "dm-", "md", "nbd", "fd"]
                .iter()
                .any(|p| n.starts_with(p))
        {
            continue;
        }
        c.push(n);
    }
    match c.as_slice() {
        [one] => disk::identify(Path::new(&format!("/dev/{one}"))),
        [] => bail!("no second disk: this machine has only its root disk"),
        many => bail!(
            "several candidates for disk 2 ({}); name one with --disk2",
            many.join(", ")
        ),
    }
}

/// Room for the rescue tree: what it unpacks to, a third more, at least 1 GiB, in MiB.
fn rescue_root_size(m: &bundle::Manifest) -> u64 {
    ((m.contents.unpacked_size + m.contents.unpacked_size / 3).max(1 << 30) + 256 * MIB)
        .div_ceil(MIB)
        * MIB
}

fn stash_size(m: &bundle::Manifest) -> u64 {
    m.payload.size + 64 * MIB
}

fn write_private(p: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(p)
        .with_context(|| format!("writing {}", p.display()))?;
    std::io::Write::write_all(&mut f, text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// Progress to the terminal and, every few seconds, to the stager.
struct Reporter<'a> {
    agent: &'a Agent,
    job: &'a Journal,
    phase: &'static str,
    term: Box<dyn Progress>,
    last: Option<Instant>,
    /// The latest numbers, and whether the stager has seen them.
    latest: Option<(String, u64, u64, bool)>,
}

impl<'a> Reporter<'a> {
    fn new(agent: &'a Agent, job: &'a Journal, phase: &'static str) -> Self {
        Reporter {
            agent,
            job,
            phase,
            term: bundle::progress::Terminal::stderr(),
            last: None,
            latest: None,
        }
    }
}

impl Reporter<'_> {
    fn send(&mut self) {
        self.last = Some(Instant::now());
        if let Some((phase, done, total, sent)) = &mut self.latest {
            self.agent.report(
                self.job,
                EventKind::Progress,
                Some(format!("{}: {phase}", self.phase)),
                Some((*done, *total)),
            );
            *sent = true;
        }
    }
}

impl Progress for Reporter<'_> {
    fn update(&mut self, phase: &str, done: u64, total: Option<u64>, entries: u64) {
        self.term.update(phase, done, total, entries);
        self.latest = Some((phase.to_string(), done, total.unwrap_or(0), false));
        if self
            .last
            .is_some_and(|l| l.elapsed() < Duration::from_secs(2))
        {
            return;
        }
        self.send();
    }

    /// The last numbers always reach the stager, however soon after the previous ones.
    fn finish(&mut self) {
        self.term.finish();
        if self.latest.as_ref().is_some_and(|l| !l.3) {
            self.send();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(gib: u64) -> DiskId {
        DiskId {
            path: "/dev/sda".into(),
            name: "sda".into(),
            by_id: vec![],
            serial: None,
            wwn: None,
            model: None,
            size_bytes: gib << 30,
            logical_sector: 512,
            physical_sector: 512,
            ptuuid: None,
        }
    }

    fn manifest(os: bundle::Os, unpacked: u64) -> bundle::Manifest {
        bundle::Manifest {
            manifest_version: bundle::manifest::MANIFEST_VERSION,
            name: "t".into(),
            version: "1".into(),
            kind: bundle::Kind::Target,
            os,
            arch: "x86_64".into(),
            created: "2026-11-22T00:00:00Z".into(),
            payload: bundle::manifest::Payload {
                sha256: "0".repeat(64),
                size: unpacked,
                compression: bundle::Compression::Zstd,
                encryption: bundle::manifest::ENCRYPTION_AGE_X25519.into(),
            },
            contents: bundle::manifest::Contents {
                tar_size: unpacked,
                unpacked_size: unpacked,
                entries: 3,
            },
        }
    }

    #[test]
    fn a_windows_target_gets_esp_msr_and_ntfs_and_is_refused_on_bios_or_a_small_disk() {
        let w = manifest(bundle::Os::Windows, 4 << 30);
        let l = target_layout(&disk(64), Some(&w), false).unwrap();
        let kinds: Vec<PartKind> = l.parts.iter().map(|p| p.kind).collect();
        assert_eq!(
            kinds,
            [PartKind::Esp, PartKind::MsReserved, PartKind::MsBasicData]
        );
        assert_eq!(l.parts[1].bytes(512), 16 << 20);
        let e = target_layout(&disk(64), Some(&w), true).unwrap_err();
        assert!(format!("{e:#}").contains("UEFI machines only"), "{e:#}");
        // A 4 GiB WIM applies to about 12 GiB: a 10 GiB disk is refused before any write.
        let e = target_layout(&disk(10), Some(&w), false).unwrap_err();
        assert!(format!("{e:#}").contains("too small"), "{e:#}");
        // The same bytes as a Linux tree fit.
        let l = target_layout(
            &disk(10),
            Some(&manifest(bundle::Os::Linux, 4 << 30)),
            false,
        );
        assert!(l.is_ok());
    }
}
