//! `reinstall setup`: puts the agent on a machine's running OS (OS A) so that it can take
//! jobs: the binary, the host's identity file, the systemd unit, enabled and started.
//!
//! The same pieces the agent writes into every OS it installs ([`install_binary`],
//! [`install_unit`]), with what a machine in use needs on top: the identity is checked
//! against the stager before anything is written (a host that cannot call home is found now,
//! not at its first job), an identity already installed for another host or one the agent
//! has renewed since is not replaced unless asked, and the agent is not swapped in the middle
//! of a job.

use crate::engine::{AGENT_SERVICE, AGENT_UNIT, JOURNAL_DIR};
use anyhow::{bail, Context, Result};
use proto::identity::{IdentityFile, Role};
use proto::v1::Readiness;
use std::path::{Path, PathBuf};

/// Where the agent's binary goes in every OS tree (the unit's `ExecStart`).
pub const AGENT_BINARY: &str = "usr/local/sbin/reinstall";
/// Where the agent's identity goes in every OS tree.
pub const AGENT_IDENTITY: &str = "etc/reinstall/identity.toml";

/// What happened to one file: written, or already as it should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Written,
    Unchanged,
    /// An identity already installed for the same host, kept (see [`Options::force`]).
    Kept,
}

/// Copies the agent's binary `from` to `tree`/[`AGENT_BINARY`] (mode 0755) through a temp file
/// renamed over it, so that a running agent's binary is replaced, never written into.
pub fn install_binary(tree: &Path, from: &Path) -> Result<Outcome> {
    let to = tree.join(AGENT_BINARY);
    let new = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    if std::fs::read(&to).is_ok_and(|old| old == new) {
        return Ok(Outcome::Unchanged);
    }
    std::fs::create_dir_all(to.parent().expect("has a parent"))?;
    crate::journal::replace_file(&to, &new, 0o755)
        .with_context(|| format!("installing the agent as {}", to.display()))?;
    Ok(Outcome::Written)
}

/// Writes the systemd unit `name` (`text`) into `tree`'s `/etc/systemd/system` and enables it
/// for each of `wanted_by` (the symlink `systemctl enable` makes).
pub fn install_unit(tree: &Path, name: &str, text: &str, wanted_by: &[&str]) -> Result<Outcome> {
    let mut outcome = write_if_changed(&tree.join("etc/systemd/system").join(name), text)?;
    for target in wanted_by {
        let wants = tree.join(format!("etc/systemd/system/{target}.wants/{name}"));
        if std::fs::symlink_metadata(&wants).is_err() {
            std::fs::create_dir_all(wants.parent().expect("has a parent"))?;
            std::os::unix::fs::symlink(format!("/etc/systemd/system/{name}"), &wants)
                .with_context(|| format!("enabling {name}: {}", wants.display()))?;
            outcome = Outcome::Written;
        }
    }
    Ok(outcome)
}

/// The drop-in `reinstall setup --disk2` writes: the agent's command with `--disk2`.
pub const DISK2_DROPIN: &str = "etc/systemd/system/reinstall-agent.service.d/50-disk2.conf";

/// The drop-in that makes the agent use `disk2` (a machine with several candidates).
pub fn disk2_dropin(disk2: &Path) -> Result<String> {
    let p = disk2.to_str().unwrap_or_default();
    // No quoting, no systemd specifiers (%), no word splitting: the stable names udev makes.
    if !p.starts_with("/dev/")
        || !p
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._:+-@=,".contains(&b))
    {
        bail!(
            "--disk2 {}: give a disk's path under /dev (its /dev/disk/by-id/ name), of letters, digits and /._:+-@=, only",
            disk2.display()
        );
    }
    Ok(format!(
        "# Written by `reinstall setup --disk2`: the disk this machine's agent may use as disk 2\n\
         # (rescue OS and stash). Remove this file (and `systemctl daemon-reload`) to let the\n\
         # agent choose the only candidate.\n\
         [Service]\n\
         ExecStart=\n\
         ExecStart=/{AGENT_BINARY} agent --disk2 {p}\n"
    ))
}

/// What a plan of this machine (`reinstall plan`'s checks, read only) says of a reinstall:
/// it would go ahead (with which disk 2), or why not. Reported to the stager
/// (`POST /v1/agent/ready`) by `setup` and by the agent at its start in the source OS.
pub fn readiness(plan: &Result<crate::engine::PlanReport>, os: crate::engine::World) -> Readiness {
    let os = Some(os.as_str().to_string());
    match plan {
        Ok(p) => Readiness {
            ok: true,
            disk2: Some(p.disk2.path.clone()),
            boot_mode: Some(p.boot_mode.to_string()),
            why: None,
            at: None,
            os,
        },
        Err(e) => Readiness {
            ok: false,
            disk2: None,
            boot_mode: None,
            why: Some(format!("{e:#}")),
            at: None,
            os,
        },
    }
}

/// Tells the stager `r`, once, without retries (it must not hold the agent); says on stderr
/// when it could not.
pub fn report_readiness(client: &crate::client::Client, r: &Readiness) {
    if let Err(e) = client
        .once()
        .post::<_, serde_json::Value>("/v1/agent/ready", r)
    {
        eprintln!("reinstall: telling the stager whether a reinstall would go ahead here: {e:#}");
    }
}

/// Writes `text` to `p` (0644, atomically) unless it already holds it.
fn write_if_changed(p: &Path, text: &str) -> Result<Outcome> {
    if std::fs::read_to_string(p).ok().as_deref() == Some(text) {
        return Ok(Outcome::Unchanged);
    }
    std::fs::create_dir_all(p.parent().expect("has a parent"))?;
    crate::journal::replace_file(p, text.as_bytes(), 0o644)
        .with_context(|| format!("writing {}", p.display()))?;
    Ok(Outcome::Written)
}

/// What `reinstall setup` is asked to do.
pub struct Options<'a> {
    /// The OS tree to install into (`/`: this machine, whose systemd is then told).
    pub root: &'a Path,
    /// The host's identity file from `stager enroll`; `None`: the one already installed.
    pub identity: Option<&'a Path>,
    /// The binary to install (this program).
    pub binary: &'a Path,
    /// Ask the stager with the identity first (one poll, no wait).
    pub check: bool,
    /// Replace an identity installed for another host, or one that differs for the same
    /// host (which may be the agent's own renewal); install in the middle of a job.
    pub force: bool,
    /// The disk the agent is to use as disk 2 ([`DISK2_DROPIN`]).
    pub disk2: Option<&'a Path>,
    /// `root` is the running OS: plan (read only) as a job would, and refuse a `disk2` that a
    /// job would refuse, or that is named by a kernel name while it has stable ones.
    pub live: bool,
}

/// What `reinstall setup` did (`--json`: fields are only ever added).
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub host: String,
    pub stager: String,
    /// The stager answered this identity (one poll): the URL and how long it took.
    pub checked: Option<Checked>,
    pub binary: (PathBuf, Outcome),
    pub identity: (PathBuf, Outcome),
    pub unit: (PathBuf, Outcome),
    /// The `--disk2` drop-in, when one was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk2: Option<(PathBuf, Outcome)>,
    /// On the running OS: whether a reinstall would go ahead now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready: Option<Readiness>,
}

#[derive(Debug, serde::Serialize)]
pub struct Checked {
    pub url: String,
    pub millis: u64,
    /// The job the stager has for this host, waiting (the agent takes it once started).
    pub job: Option<u64>,
}

/// Installs the agent into `o.root`: checks, then writes (see the module's doc).
pub fn setup(o: &Options) -> Result<Report> {
    let installed_path = o.root.join(AGENT_IDENTITY);
    let installed = match std::fs::read_to_string(&installed_path) {
        Ok(text) => Some(IdentityFile::parse(&installed_path, &text)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", installed_path.display())),
    };
    let given = o.identity.map(IdentityFile::load).transpose()?;
    let (id, identity_outcome) = match (&given, &installed) {
        (None, None) => bail!(
            "no identity file given and none installed at {}: give the host's file from `stager enroll HOST`",
            installed_path.display()
        ),
        (None, Some(i)) => (i.clone(), Outcome::Unchanged),
        (Some(g), Some(i)) if g == i => (i.clone(), Outcome::Unchanged),
        (Some(g), Some(i)) if !o.force && g.name != i.name => bail!(
            "{} is host {:?}'s identity; {} is {:?}'s: this machine is enrolled as another host (--force replaces it)",
            installed_path.display(),
            i.name,
            o.identity.expect("given").display(),
            g.name
        ),
        // The agent renews its certificate into the installed file: the enrolment file
        // given again is older, and may have been revoked by the renewal.
        (Some(g), Some(i)) if !o.force && g.stager == i.stager => (i.clone(), Outcome::Kept),
        (Some(g), _) => (g.clone(), Outcome::Written),
    };
    // The file the identity in use comes from.
    let source = match (identity_outcome, o.identity) {
        (Outcome::Written, Some(given)) => given,
        _ => installed_path.as_path(),
    }
    .display()
    .to_string();
    if id.role != Role::Agent {
        bail!(
            "{source} is an {} identity ({:?}), not a host's: give the file from `stager enroll HOST`",
            id.role.as_str(),
            id.name
        );
    }
    if !o.force {
        let journal = o.root.join(JOURNAL_DIR).join(crate::journal::FILE);
        if let Ok(bytes) = std::fs::read(&journal) {
            let j = crate::journal::Journal::parse(&journal, &bytes)?;
            if !j.finished() {
                bail!(
                    "job {} is under way on this machine ({}, phase {}): the agent is not replaced in the middle of a job; wait for it, or cancel it (--force installs anyway)",
                    j.job,
                    journal.display(),
                    j.pending().as_str()
                );
            }
        }
    }
    let dropin = o.disk2.map(disk2_dropin).transpose()?;
    let ready = o.live.then(|| plan_now(o.disk2)).transpose()?;
    let client = crate::client::Client::new(id.clone()).with_context(|| source.clone())?;
    let checked = if o.check {
        let start = std::time::Instant::now();
        let work = client
            .poll_work(std::time::Duration::ZERO)
            .with_context(|| {
                format!(
                    "host {:?} could not call home with {source}{} (stager {}); nothing was installed (--no-check installs anyway)",
                    id.name,
                    if identity_outcome == Outcome::Kept {
                        ", the identity installed (the file given was not used: --force installs it instead)"
                    } else {
                        ""
                    },
                    id.stager
                )
            })?;
        if let Some(r) = &ready {
            report_readiness(&client, r);
        }
        Some(Checked {
            url: client.url_in_use(),
            millis: start.elapsed().as_millis() as u64,
            job: work.job.map(|j| j.id),
        })
    } else {
        None
    };
    let binary = install_binary(o.root, o.binary)?;
    if identity_outcome == Outcome::Written {
        std::fs::create_dir_all(installed_path.parent().expect("has a parent"))?;
        crate::journal::replace_file(&installed_path, id.to_toml().as_bytes(), 0o600)?;
    }
    let unit = install_unit(o.root, AGENT_SERVICE, AGENT_UNIT, &["multi-user.target"])?;
    let disk2 = match dropin {
        Some(text) => {
            let p = o.root.join(DISK2_DROPIN);
            let outcome = write_if_changed(&p, &text)?;
            Some((p, outcome))
        }
        None => None,
    };
    Ok(Report {
        host: id.name.clone(),
        stager: id.stager.clone(),
        checked,
        binary: (o.root.join(AGENT_BINARY), binary),
        identity: (installed_path, identity_outcome),
        unit: (o.root.join("etc/systemd/system").join(AGENT_SERVICE), unit),
        disk2,
        ready,
    })
}

/// This machine planned as a job would plan it (nothing written). A disk named with
/// `--disk2` must pass, by a stable name when it has one; without it, what stops a
/// reinstall is reported, not refused (a second disk may be added later).
fn plan_now(disk2: Option<&Path>) -> Result<Readiness> {
    let plan = crate::engine::plan_report(Path::new("/"), disk2, None);
    if let Some(given) = disk2 {
        match &plan {
            Ok(p) if !given.starts_with("/dev/disk/") && !p.disk2.by_id.is_empty() => bail!(
                "--disk2 {}: a kernel name, which can name another disk after a reboot; use one of its stable names: {}",
                given.display(),
                p.disk2.by_id.join(", ")
            ),
            Ok(_) => {}
            Err(e) => bail!(
                "--disk2 {}: a reinstall would refuse this disk: {e:#}; nothing was installed",
                given.display()
            ),
        }
    }
    Ok(readiness(&plan, crate::engine::world_of(Path::new("/"))))
}
