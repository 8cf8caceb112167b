//! The operator's commands: create a job (and follow it), show status, send hosts to rescue,
//! cancel a job.

use crate::cli::{CancelOpts, Global, JobOpts, RescueOpts};
use agent::client::Client;
use anyhow::{bail, Context, Result};
use bundle::progress::bytes;
use proto::identity::{IdentityFile, Role};
use proto::v1::{CreateJob, EventKind, Host, HostState, Job, JobState, RescueRequest};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

fn client(g: &Global) -> Result<Client> {
    let path = g
        .identity
        .clone()
        .unwrap_or_else(|| PathBuf::from(proto::identity::DEFAULT_AGENT_PATH));
    let id = IdentityFile::load(&path)?;
    if id.role != Role::Operator {
        bail!(
            "{} is the identity of {} {:?}; operator commands need an operator identity (stager operator NAME --out FILE)",
            path.display(),
            id.role.as_str(),
            id.name
        );
    }
    Client::new(id)
}

/// `--host` flags and `--hosts-file` lines, in order, without duplicates.
fn hosts(g: &Global) -> Result<Vec<String>> {
    let mut v = g.hosts.clone();
    if let Some(f) = &g.hosts_file {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        for line in text.lines() {
            let h = line.split('#').next().unwrap_or("").trim();
            if !h.is_empty() {
                v.push(h.to_string());
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    v.retain(|h| seen.insert(h.clone()));
    Ok(v)
}

pub fn create(g: &Global, o: &JobOpts) -> Result<ExitCode> {
    let hosts = hosts(g)?;
    if hosts.is_empty() {
        bail!("no hosts: name them with --host HOST or --hosts-file FILE");
    }
    let c = client(g)?;
    let target = o.target.clone().expect("checked by caller");
    let hosts = if o.skip_done {
        let (left, note) = skip_done(&c, &hosts, &target)?;
        if let Some(n) = note {
            eprintln!("{n}");
        }
        if left.is_empty() {
            if g.json {
                println!("null");
            } else {
                eprintln!("nothing to do: no host is left without {target} done or under way");
            }
            return Ok(ExitCode::SUCCESS);
        }
        left
    } else {
        hosts
    };
    let req = CreateJob {
        hosts,
        target,
        rescue: o.rescue.clone(),
        hold_in_rescue: o.hold_in_rescue,
        max_in_flight: o.max_in_flight,
        halt_after_failures: o.halt_after_failures,
        max_in_flight_per_site: o.max_in_flight_per_site,
        canary: o.canary,
        halt_at_failure_percent: o.halt_at_failure_percent,
    };
    let job: Job = c.post("/v1/jobs", &req)?;
    if !o.wait {
        if g.json {
            println!("{}", serde_json::to_string_pretty(&job)?);
        } else {
            println!(
                "job {} created: {} on {} host(s), rescue {}{}",
                job.id,
                ref_id(&job.target),
                job.hosts.len(),
                ref_id(&job.rescue),
                rollout(&job)
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !g.json {
        eprintln!(
            "job {} created; following it (Ctrl-C stops following, not the job)",
            job.id
        );
    }
    follow(&c, job.id, g.json, Duration::from_secs(o.wait_outage))
}

/// `--wait`'s exit status when the stager stayed out of reach for longer than
/// `--wait-outage`: the job goes on without anyone following it.
const EXIT_LOST: u8 = 3;

/// `hosts` without those whose latest job is for `target` (`NAME` is its newest version) and
/// is done or still under way, and a note naming what was left out.
fn skip_done(c: &Client, hosts: &[String], target: &str) -> Result<(Vec<String>, Option<String>)> {
    let bundle::Manifest { name, version, .. } = c.listed_bundle(target)?;
    let jobs: Vec<Job> = c.get("/v1/jobs")?;
    let (mut left, mut done, mut under_way) = (Vec::new(), Vec::new(), Vec::new());
    for h in hosts {
        // Job ids grow: the last job naming the host is its latest.
        let latest = jobs
            .iter()
            .filter_map(|j| j.hosts.iter().find(|x| &x.host == h).map(|x| (j, x.state)))
            .max_by_key(|(j, _)| j.id);
        match latest {
            Some((j, st)) if j.target.name == name && j.target.version == version => match st {
                HostState::Done => done.push(h.clone()),
                HostState::Pending | HostState::Running => under_way.push(h.clone()),
                _ => left.push(h.clone()),
            },
            _ => left.push(h.clone()),
        }
    }
    let mut skipped = Vec::new();
    for (what, v) in [("done", &done), ("under way", &under_way)] {
        if !v.is_empty() {
            let mut names = v[..v.len().min(20)].join(", ");
            if v.len() > 20 {
                names += &format!(" and {} more", v.len() - 20);
            }
            skipped.push(format!("{} {what} ({names})", v.len()));
        }
    }
    let note = (!skipped.is_empty())
        .then(|| format!("skipped, {name}@{version} already {}", skipped.join("; ")));
    Ok((left, note))
}

fn ref_id(b: &proto::v1::BundleRef) -> String {
    format!("{}@{}", b.name, b.version)
}

/// The job's rollout limits as words (`", at most 10 at a time, halt after 2 failures"`).
fn rollout(job: &Job) -> String {
    let mut s = String::new();
    if let Some(n) = job.canary {
        s += &format!(", {n} {} first", if n == 1 { "canary" } else { "canaries" });
    }
    if let Some(n) = job.max_in_flight {
        s += &format!(", at most {n} at a time");
    }
    if let Some(n) = job.max_in_flight_per_site {
        s += &format!(", at most {n} per site");
    }
    if let Some(k) = job.halt_after_failures {
        s += &format!(", halt after {k} failure{}", if k == 1 { "" } else { "s" });
    }
    if let Some(p) = job.halt_at_failure_percent {
        s += &format!(", halt at {p}% failed");
    }
    s
}

/// Polls the job until every host finished, showing each change.
fn follow(c: &Client, id: u64, json: bool, outage_for: Duration) -> Result<ExitCode> {
    let tty = std::io::stderr().is_terminal() && !json;
    let mut last_lines: Vec<String> = Vec::new();
    let mut drawn = 0usize;
    let mut halt_shown = false;
    // Since when the stager has been out of reach, and how many retries since.
    let mut outage: Option<(std::time::Instant, u32)> = None;
    loop {
        let job: Job = match c.get(&format!("/v1/jobs/{id}")) {
            Ok(job) => job,
            Err(e) if agent::client::is_outage(&e) => {
                let (since, n) = *outage.get_or_insert_with(|| {
                    eprintln!(
                        "job {id}: {e:#}; still following for up to {} s (the job goes on without the stager)",
                        outage_for.as_secs()
                    );
                    (std::time::Instant::now(), 0)
                });
                if since.elapsed() >= outage_for {
                    eprintln!(
                        "job {id}: the stager has not answered for {} s; no longer following (the job goes on: `reinstall status` shows it)",
                        since.elapsed().as_secs()
                    );
                    return Ok(ExitCode::from(EXIT_LOST));
                }
                // The message broke the block being redrawn: draw it afresh below.
                drawn = 0;
                std::thread::sleep(agent::client::backoff(n).min(outage_for));
                outage = Some((since, n + 1));
                continue;
            }
            Err(e) => return Err(e),
        };
        if let Some((since, _)) = outage.take() {
            eprintln!(
                "job {id}: the stager answers again, after {} s",
                since.elapsed().as_secs()
            );
            drawn = 0;
        }
        let mut lines: Vec<String> = job.hosts.iter().map(host_line).collect();
        if job.hosts.len() > 1 {
            // A fleet's progress in one line: the block's last, printed when it changes.
            lines.push(format!("job {id}: {}", tally(&job)));
        }
        if let Some(h) = job.halted.as_deref().filter(|_| !json && !halt_shown) {
            // Printed once, under the block; the block is drawn afresh below it.
            eprintln!("job {id} {h}");
            halt_shown = true;
            drawn = 0;
        }
        if !json {
            if tty {
                // Redraw the block of host lines in place.
                if drawn > 0 {
                    eprint!("\x1b[{drawn}A");
                }
                for l in &lines {
                    eprintln!("\r\x1b[K{l}");
                }
                drawn = lines.len();
            } else {
                for (i, l) in lines.iter().enumerate() {
                    let seen = match last_lines.get(i) {
                        Some(p) if i < job.hosts.len() => same_state(p, l),
                        Some(p) => p == l,
                        None => false,
                    };
                    if !seen {
                        eprintln!("{l}");
                    }
                }
            }
        }
        last_lines = lines;
        if job.state != JobState::Active {
            if json {
                println!("{}", serde_json::to_string_pretty(&job)?);
            } else {
                eprintln!("job {id}: {:?} ({})", job.state, tally(&job));
            }
            return Ok(if job.state == JobState::Done {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// How many of the job's hosts are in each state: `"1 done, 1 failed, 8 pending"`.
fn tally(job: &Job) -> String {
    let states = [
        HostState::Done,
        HostState::Failed,
        HostState::Running,
        HostState::Pending,
        HostState::Cancelled,
    ];
    states
        .iter()
        .map(|&st| (st, job.hosts.iter().filter(|h| h.state == st).count()))
        .filter(|&(_, n)| n > 0)
        .map(|(st, n)| format!("{n} {}", format!("{st:?}").to_lowercase()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Host lines differ in bytes all the time; on a non-terminal only changes of state or phase,
/// and a host falling silent, are printed.
fn same_state(a: &str, b: &str) -> bool {
    let key = |s: &str| {
        let mut k = s.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
        if s.contains(SILENT) {
            k += SILENT;
        }
        k
    };
    key(a) == key(b)
}

fn host_line(h: &proto::v1::HostJob) -> String {
    let state = format!("{:?}", h.state).to_lowercase();
    let mut s = format!(
        "{:<20} {:<9} {:<16}",
        h.host,
        state,
        h.phase.as_deref().unwrap_or("-")
    );
    if h.bytes_done > 0 || h.bytes_total.is_some() {
        s += &format!(" {}", bytes(h.bytes_done));
        if let Some(t) = h.bytes_total {
            s += &format!(" / {}", bytes(t));
        }
        if let Some(r) = h.rate.filter(|_| h.state == HostState::Running) {
            s += &format!("  {}/s", bytes(r as u64));
        }
    }
    if let Some(m) = h
        .last_event
        .as_ref()
        .and_then(|e| e.event.message.as_deref())
    {
        s += &format!("  {m}");
    }
    if let Some(q) = h.silent_s {
        s += &format!(
            "  {SILENT} for {}",
            humantime::format_duration(Duration::from_secs(q))
        );
    }
    s
}

/// How a host line says the host has not been heard from for a while.
const SILENT: &str = "SILENT";

pub fn status(g: &Global) -> Result<ExitCode> {
    let c = client(g)?;
    let want = hosts(g)?;
    let mut hosts: Vec<Host> = c.get("/v1/hosts")?;
    let mut jobs: Vec<Job> = c.get("/v1/jobs")?;
    if !want.is_empty() {
        for w in &want {
            if !hosts.iter().any(|h| &h.name == w) {
                bail!("host {w:?} is not enrolled on this stager");
            }
        }
        hosts.retain(|h| want.contains(&h.name));
        jobs.retain(|j| j.hosts.iter().any(|h| want.contains(&h.host)));
        for j in &mut jobs {
            j.hosts.retain(|h| want.contains(&h.host));
        }
    }
    if g.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"hosts": hosts, "jobs": jobs}))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<20} {:<16} {:<6} {:<16} {:<20} AGENT",
        "HOST", "PHASE", "JOB", "ADDRESS", "LAST SEEN"
    );
    for h in &hosts {
        println!(
            "{:<20} {:<16} {:<6} {:<16} {:<20} {}{}",
            h.name,
            h.phase.as_deref().unwrap_or("-"),
            h.job.map(|j| j.to_string()).unwrap_or("-".into()),
            h.address.as_deref().unwrap_or("-"),
            h.last_seen.as_deref().unwrap_or("never"),
            h.agent.as_deref().unwrap_or("-"),
            if h.rescue_requested.is_some() {
                "  (rescue requested)"
            } else {
                ""
            }
        );
    }
    // Hosts whose last plan (their agent's start in the source OS, `reinstall setup`, an
    // idle rescue OS) found that a reinstall would be refused: to fix before giving them a
    // job.
    for h in &hosts {
        if let Some(r) = h.ready.as_ref().filter(|r| !r.ok) {
            println!(
                "{}: a reinstall would be refused (planned{} at {}): {}",
                h.name,
                match r.os.as_deref() {
                    Some("rescue") => " in its rescue OS",
                    _ => "",
                },
                r.at.as_deref().unwrap_or("-"),
                r.why.as_deref().unwrap_or("-")
            );
        }
    }
    // A host whose last job finished but which reported a failure since (its rescue OS,
    // after the target stopped coming up): the job's outcome stands, the host needs a look.
    for h in &hosts {
        let Some(hj) = jobs
            .iter()
            .filter(|j| j.state != JobState::Active && Some(j.id) == h.job)
            .flat_map(|j| j.hosts.iter())
            .find(|hj| hj.host == h.name)
        else {
            continue;
        };
        let Some(ev) = hj
            .last_event
            .as_ref()
            .filter(|e| e.event.kind == EventKind::Failed && hj.state == HostState::Done)
        else {
            continue;
        };
        println!(
            "
{} (job {} done), at {}: {}",
            h.name,
            h.job.unwrap_or_default(),
            ev.time,
            ev.event.message.as_deref().unwrap_or("failed")
        );
    }
    for j in jobs.iter().filter(|j| j.state == JobState::Active) {
        println!(
            "\njob {} ({} by {}, {:?}{}): {}",
            j.id,
            ref_id(&j.target),
            j.created_by,
            j.state,
            rollout(j),
            tally(j)
        );
        if let Some(h) = &j.halted {
            println!("  {h}");
        }
        for h in &j.hosts {
            println!("  {}", host_line(h));
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn rescue(g: &Global, o: &RescueOpts) -> Result<ExitCode> {
    let hosts = hosts(g)?;
    if hosts.is_empty() {
        bail!("no hosts: name them with --host HOST or --hosts-file FILE");
    }
    let c = client(g)?;
    for h in &hosts {
        let _: serde_json::Value = c.post(
            &format!("/v1/hosts/{h}/rescue"),
            &RescueRequest {
                permanent: o.permanent,
            },
        )?;
        if !g.json {
            println!(
                "{h}: rescue requested{}",
                if o.permanent { " (permanent)" } else { "" }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn cancel(g: &Global, o: &CancelOpts) -> Result<ExitCode> {
    let c = client(g)?;
    let j: Job = c.post(
        &format!("/v1/jobs/{}/cancel", o.job),
        &serde_json::json!({}),
    )?;
    if g.json {
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("job {} cancelled", j.id);
    for h in &j.hosts {
        println!("  {}", host_line(h));
    }
    Ok(ExitCode::SUCCESS)
}
