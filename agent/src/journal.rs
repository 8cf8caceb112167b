//! The agent's journal: where a job stands, as one versioned JSON file that survives reboots
//! and power cuts (DESIGN.md §6).
//!
//! Written only through [`Locked::save`]: temp file, fsync, rename over the old one, fsync of
//! the directory (so a power cut leaves either the old or the new journal, never half of one),
//! while holding an exclusive `flock` on the journal's lock file (so two agents never
//! interleave). "Entering X" is recorded before a destructive step and "done X" after it, so
//! the next boot knows whether X must be redone.

use anyhow::{bail, Context, Result};
use proto::v1::BundleRef;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FORMAT: u32 = 1;
pub const FILE: &str = "journal.json";

/// The phases of DESIGN.md §6, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Plan,
    StageRescue,
    BootRescue,
    RescueUp,
    InstallTarget,
    BootTarget,
    TargetUp,
    Done,
    Failed,
}

/// Where a phase runs: the phase engine refuses to run a phase in the wrong OS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runs {
    SourceOs,
    Rescue,
    Target,
    Nowhere,
}

impl Phase {
    pub fn runs_in(self) -> Runs {
        match self {
            Phase::Plan | Phase::StageRescue | Phase::BootRescue => Runs::SourceOs,
            Phase::RescueUp | Phase::InstallTarget | Phase::BootTarget => Runs::Rescue,
            Phase::TargetUp => Runs::Target,
            Phase::Done | Phase::Failed => Runs::Nowhere,
        }
    }

    /// The phase after this one; a job held in rescue stops after `rescue-up`.
    pub fn next(self, hold_in_rescue: bool) -> Phase {
        match self {
            Phase::Plan => Phase::StageRescue,
            Phase::StageRescue => Phase::BootRescue,
            Phase::BootRescue => Phase::RescueUp,
            Phase::RescueUp if hold_in_rescue => Phase::Done,
            Phase::RescueUp => Phase::InstallTarget,
            Phase::InstallTarget => Phase::BootTarget,
            Phase::BootTarget => Phase::TargetUp,
            Phase::TargetUp | Phase::Done => Phase::Done,
            Phase::Failed => Phase::Failed,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Plan => "plan",
            Phase::StageRescue => "stage-rescue",
            Phase::BootRescue => "boot-rescue",
            Phase::RescueUp => "rescue-up",
            Phase::InstallTarget => "install-target",
            Phase::BootTarget => "boot-target",
            Phase::TargetUp => "target-up",
            Phase::Done => "done",
            Phase::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    /// The phase was entered; its effects may be partly on disk and must be redone.
    Entering,
    /// The phase finished; its effects are complete and flushed.
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Journal {
    pub format: u32,
    pub job: u64,
    pub host: String,
    pub target: BundleRef,
    pub rescue: BundleRef,
    pub hold_in_rescue: bool,
    pub phase: Phase,
    pub step: Step,
    /// Disks pinned when the job was planned (stable ids), checked before every destructive
    /// step.
    #[serde(default)]
    pub disk1: Option<crate::disk::DiskId>,
    #[serde(default)]
    pub disk2: Option<crate::disk::DiskId>,
    /// The target's OS, from its signed manifest (set in plan).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_os: Option<bundle::Os>,
    /// The job was taken in the rescue OS (after an earlier job, from disk 2): `plan` and
    /// `stage-rescue` run there (the latter only stashes the target: the running rescue OS
    /// stays as it is), and `boot-rescue` is skipped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_rescue: bool,
    pub updated: String,
    pub history: Vec<Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub time: String,
    pub phase: Phase,
    pub step: Step,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Journal {
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Journal> {
        #[derive(Deserialize)]
        struct Probe {
            format: u32,
        }
        let p: Probe = serde_json::from_slice(bytes)
            .with_context(|| format!("{}: not a journal", path.display()))?;
        if p.format != FORMAT {
            // Older formats are upconverted here, in one place, when there are any.
            bail!(
                "{}: journal format {} is not supported by this agent (format {FORMAT}); upgrade the agent",
                path.display(),
                p.format
            );
        }
        serde_json::from_slice(bytes)
            .with_context(|| format!("{}: malformed journal", path.display()))
    }

    /// The phase to run next: the one entered and not done (redone), else the one after.
    pub fn pending(&self) -> Phase {
        match self.step {
            Step::Entering => self.phase,
            Step::Done => self.after(self.phase),
        }
    }

    /// The phase after `p` in this job: a job held in rescue stops after `rescue-up`, a job
    /// taken in the rescue OS has no `boot-rescue`.
    pub fn after(&self, p: Phase) -> Phase {
        match p.next(self.hold_in_rescue) {
            Phase::BootRescue if self.from_rescue => Phase::RescueUp,
            n => n,
        }
    }

    /// Where `p` runs in this job.
    pub fn runs_in(&self, p: Phase) -> Runs {
        match p {
            Phase::Plan | Phase::StageRescue if self.from_rescue => Runs::Rescue,
            p => p.runs_in(),
        }
    }

    /// Whether the job has ended here: done (the last phase for it is done) or failed.
    pub fn finished(&self) -> bool {
        self.phase == Phase::Failed
            || (self.step == Step::Done && self.after(self.phase) == Phase::Done)
    }

    /// Records a step in memory (does not touch the disk; see [`Locked::save`]).
    pub fn record(&mut self, phase: Phase, step: Step, note: Option<String>) {
        let time = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        self.phase = phase;
        self.step = step;
        self.updated = time.clone();
        self.history.push(Entry {
            time,
            phase,
            step,
            note,
        });
    }
}

/// The journal at `p`, if there is one.
fn read(p: &Path) -> Result<Option<Journal>> {
    match std::fs::read(p) {
        Ok(b) => Journal::parse(p, &b).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// Where job `job`'s state is archived in the journal directory `dir`.
fn archived(dir: &Path, job: u64) -> PathBuf {
    dir.join("archive").join(format!("job-{job}"))
}

/// The newest archived journal in the journal directory `dir` (the highest job number).
fn newest_archived(dir: &Path) -> Result<Option<Journal>> {
    let newest = std::fs::read_dir(dir.join("archive"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("job-")?
                .parse::<u64>()
                .ok()
        })
        .max();
    let Some(n) = newest else { return Ok(None) };
    read(&archived(dir, n).join(FILE))
}

/// The last job in the journal directory `dir` that has its disks (read only, no lock): the
/// job's own once its disks are pinned (its plan, or taken from the last job in the rescue
/// OS), else the newest archived job. Its disk 2 holds the rescue OS this machine keeps.
pub fn last_with_disks(dir: &Path) -> Option<Journal> {
    match read(&dir.join(FILE)).ok().flatten() {
        Some(j) if j.disk2.is_some() => Some(j),
        _ => newest_archived(dir).ok().flatten(),
    }
}

/// The journal directory, locked for this process.
pub struct Locked {
    dir: PathBuf,
    _lock: nix::fcntl::Flock<File>,
}

impl Locked {
    /// Takes the exclusive lock (waiting for no one: a second agent gets a clear error).
    pub fn open(dir: &Path) -> Result<Locked> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let lp = dir.join("journal.lock");
        let lock = File::create(&lp).with_context(|| format!("creating {}", lp.display()))?;
        let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| {
                anyhow::anyhow!(
                    "{} is locked by another agent ({e}); is one already running?",
                    lp.display()
                )
            })?;
        Ok(Locked {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    pub fn load(&self) -> Result<Option<Journal>> {
        read(&self.path())
    }

    /// Moves a finished job's state (`names`: what it left in the directory besides the
    /// journal) into `archive/job-ID/`, the journal last: a crash in between leaves the
    /// journal in place, and the next call moves what is left.
    pub fn archive(&self, job: u64, names: &[&str]) -> Result<PathBuf> {
        let to = archived(&self.dir, job);
        std::fs::create_dir_all(&to).with_context(|| format!("creating {}", to.display()))?;
        for n in names.iter().chain(std::iter::once(&FILE)) {
            let from = self.dir.join(n);
            if from.exists() || from.symlink_metadata().is_ok() {
                std::fs::rename(&from, to.join(n))
                    .with_context(|| format!("moving {} to {}", from.display(), to.display()))?;
            }
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("flushing {}", self.dir.display()))?;
        Ok(to)
    }

    /// The newest archived journal (the highest job number), if any.
    pub fn last_archived(&self) -> Result<Option<Journal>> {
        newest_archived(&self.dir)
    }

    /// Writes the journal atomically and durably.
    pub fn save(&self, j: &Journal) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(j).expect("journal serializes");
        bytes.push(b'\n');
        replace_file(&self.path(), &bytes, 0o644)?;
        bundle::failpoint::hit("journal-saved");
        Ok(())
    }
}

/// Replaces the file `p` with `bytes` (mode `mode`) atomically and durably: a temp file
/// beside it, fsync, rename over it, fsync of the directory. A crash leaves the old file or
/// the new one, never a part.
pub fn replace_file(p: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = p.parent().unwrap_or(Path::new("."));
    let name = p.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!("{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, p).with_context(|| format!("replacing {}", p.display()))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("flushing {}", dir.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &[u8] = include_bytes!("../tests/fixtures/journal-v1.json");

    #[test]
    fn v1_fixture_parses_and_round_trips() {
        let j = Journal::parse(Path::new("f"), FIXTURE).unwrap();
        assert_eq!((j.phase, j.step), (Phase::StageRescue, Step::Entering));
        let again: serde_json::Value = serde_json::to_value(&j).unwrap();
        assert_eq!(
            again,
            serde_json::from_slice::<serde_json::Value>(FIXTURE).unwrap()
        );
    }

    /// The last job's disk 2: the journal's own once pinned, else the newest archived job's
    /// (by job number, not by name order), else none.
    #[test]
    fn the_last_disk2_is_the_jobs_own_else_the_newest_archived_ones() {
        let dir = std::env::temp_dir().join(format!("journal-disk2-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let with = |job: u64, serial: Option<&str>| {
            let mut j = Journal::parse(Path::new("f"), FIXTURE).unwrap();
            j.job = job;
            j.disk2 = serial.map(|s| crate::disk::DiskId {
                path: format!("/dev/{s}"),
                name: s.into(),
                by_id: vec![],
                serial: Some(s.into()),
                wwn: None,
                model: None,
                size_bytes: 1 << 30,
                logical_sector: 512,
                physical_sector: 512,
                ptuuid: None,
            });
            serde_json::to_vec(&j).unwrap()
        };
        let last_disk2 = |dir: &Path| last_with_disks(dir).and_then(|j| j.disk2);
        let serial = |d: Option<crate::disk::DiskId>| d.and_then(|d| d.serial);
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(serial(last_disk2(&dir)), None);
        for (job, s) in [(3, "old"), (12, "newest"), (9, "older")] {
            let a = archived(&dir, job);
            std::fs::create_dir_all(&a).unwrap();
            std::fs::write(a.join(FILE), with(job, Some(s))).unwrap();
        }
        assert_eq!(serial(last_disk2(&dir)).as_deref(), Some("newest"));
        std::fs::write(dir.join(FILE), with(13, None)).unwrap();
        assert_eq!(serial(last_disk2(&dir)).as_deref(), Some("newest"));
        std::fs::write(dir.join(FILE), with(13, Some("own"))).unwrap();
        assert_eq!(serial(last_disk2(&dir)).as_deref(), Some("own"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn phases_follow_design_order_and_hold_in_rescue_stops_early() {
        let mut p = Phase::Plan;
        let mut seen = vec![p];
        while p != Phase::Done {
            p = p.next(false);
            seen.push(p);
        }
        assert_eq!(seen.len(), 8);
        assert!(seen.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(Phase::RescueUp.next(true), Phase::Done);
        assert_eq!(Phase::InstallTarget.runs_in(), Runs::Rescue);
        assert_eq!(Phase::StageRescue.runs_in(), Runs::SourceOs);
    }

    #[test]
    fn a_job_taken_in_the_rescue_os_plans_and_stashes_there_and_skips_boot_rescue() {
        let mut j = Journal::parse(Path::new("f"), FIXTURE).unwrap();
        j.from_rescue = true;
        let mut p = Phase::Plan;
        let mut seen = vec![];
        while p != Phase::Done {
            seen.push((p, j.runs_in(p)));
            p = j.after(p);
        }
        assert_eq!(
            seen,
            [
                (Phase::Plan, Runs::Rescue),
                (Phase::StageRescue, Runs::Rescue),
                (Phase::RescueUp, Runs::Rescue),
                (Phase::InstallTarget, Runs::Rescue),
                (Phase::BootTarget, Runs::Rescue),
                (Phase::TargetUp, Runs::Target),
            ]
        );
        j.record(Phase::StageRescue, Step::Done, None);
        assert_eq!(j.pending(), Phase::RescueUp);
        j.hold_in_rescue = true;
        j.record(Phase::RescueUp, Step::Done, None);
        assert!(j.finished());
        // Written only when set: older agents read the journals of ordinary jobs.
        j.from_rescue = false;
        assert!(!serde_json::to_string(&j).unwrap().contains("from_rescue"));
    }

    #[test]
    fn saves_atomically_and_a_second_agent_is_locked_out() {
        let d = std::env::temp_dir().join(format!("journal-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let l = Locked::open(&d).unwrap();
        assert!(l.load().unwrap().is_none());
        let mut j = Journal::parse(Path::new("f"), FIXTURE).unwrap();
        j.record(
            Phase::StageRescue,
            Step::Done,
            Some("rescue written".into()),
        );
        l.save(&j).unwrap();
        assert_eq!(l.load().unwrap().unwrap(), j);
        assert!(!d.join("journal.json.tmp").exists());
        let e = Locked::open(&d)
            .err()
            .expect("second lock must fail")
            .to_string();
        assert!(e.contains("another agent"), "{e}");
        drop(l);
        Locked::open(&d).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_newer_journal_asks_for_an_upgrade() {
        let s = String::from_utf8(FIXTURE.to_vec())
            .unwrap()
            .replace("\"format\": 1", "\"format\": 2");
        let e =
            Journal::parse(Path::new("/var/lib/reinstall/journal.json"), s.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("upgrade the agent"));
    }
}
