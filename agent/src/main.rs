//! `reinstall`: the operator's command (jobs, status, rescue) and bundle tools. The agent
//! daemon, planning and the phase engine arrive with issue 4.

mod cli;
mod operator;

use agent::netid;

use clap::{CommandFactory, Parser};
use std::process::ExitCode;

fn network(o: &cli::NetworkOpts, json: bool) -> anyhow::Result<ExitCode> {
    use agent::netstack::{render, Stack};
    use anyhow::Context as _;
    let id: netid::NetIdentity = match &o.from {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not JSON", p.display()))?;
            // Either an identity or `reinstall network --json`'s whole output.
            let v = v.get("identity").cloned().unwrap_or(v);
            serde_json::from_value(v)
                .with_context(|| format!("{}: not a network identity", p.display()))?
        }
        None => netid::capture()?,
    };
    let stack = match o.stack {
        cli::StackArg::Networkd => Stack::Networkd,
        cli::StackArg::Netplan => Stack::Netplan,
        cli::StackArg::Networkmanager => Stack::NetworkManager,
        cli::StackArg::Ifupdown => Stack::Ifupdown,
    };
    let files = render(stack, &id);
    if json {
        let v = serde_json::json!({
            "identity": id,
            "files": files.iter().map(|f| serde_json::json!({"path": f.path, "mode": f.mode, "contents": f.contents})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for l in &id.left_behind {
            println!("# not carried: {}: {}", l.name, l.why);
        }
        for f in files {
            println!("# /{} (mode {:o})\n{}", f.path, f.mode, f.contents);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn plan(
    o: &cli::PlanOpts,
    identity: Option<&std::path::Path>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let target = match &o.target {
        Some(spec) => Some(target_manifest(spec, identity)?),
        None => None,
    };
    let p = agent::engine::plan_report(&o.root, o.disk2.as_deref(), target.as_ref())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&p)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mib = |b: u64| b >> 20;
    let in_rescue = p.disk2_from == agent::engine::Disk2From::RescueRoot;
    let (what1, what2, will2) = if in_rescue {
        (
            "the last job's disk 1; the target goes here".to_string(),
            format!(
                "{}; the target is stashed in its stash of {} MiB",
                p.disk2_from,
                mib(p.stash_bytes.unwrap_or(0))
            ),
            "is",
        )
    } else {
        (
            "running root; the target goes here".to_string(),
            format!("{}; rescue OS and stash go here", p.disk2_from),
            "will be",
        )
    };
    for (n, d, l, what, will) in [
        (1, &p.disk1, &p.disk1_layout, &what1, "will be"),
        (2, &p.disk2, &p.disk2_layout, &what2, will2),
    ] {
        println!(
            "disk {n}: {} ({what})\n  {} MiB, sectors {}/{}, serial {}, wwn {}, GPT {}\n  by-id: {}",
            d.path,
            mib(d.size_bytes),
            d.logical_sector,
            d.physical_sector,
            d.serial.as_deref().unwrap_or("-"),
            d.wwn.as_deref().unwrap_or("-"),
            d.ptuuid.as_deref().unwrap_or("none"),
            if d.by_id.is_empty() { "-".into() } else { d.by_id.join(" ") }
        );
        for part in &l.parts {
            println!(
                "  {will} {}: {:<18} {:?}, {} MiB at sector {}",
                d.partition_path(part.number).display(),
                part.label,
                part.kind,
                mib(part.bytes(l.sector)),
                part.first_lba
            );
        }
    }
    println!(
        "boot mode: {}, firmware variables writable: {}",
        p.boot_mode, p.firmware_variables_writable
    );
    for c in &p.boot_changes {
        println!("boot: {c}");
    }
    println!("hostname {}; network:", p.network.hostname);
    for i in &p.network.interfaces {
        let addrs: Vec<String> = i
            .addresses
            .iter()
            .map(|a| format!("{}/{}", a.address, a.prefix))
            .collect();
        let what = match &i.kind {
            netid::Kind::Ethernet => match p.network.master_of(&i.name) {
                Some(m) => format!("in {}", m.name),
                None => "ethernet".into(),
            },
            netid::Kind::Bond(b) => {
                let monitor = match b.arp_interval_ms {
                    0 => format!("mii {} ms", b.miimon_ms),
                    ms => format!("arp {ms} ms to {}", b.arp_targets(",")),
                };
                format!("bond {} of {}, {monitor}", b.mode, b.members.join("+"))
            }
            netid::Kind::Vlan { id, parent } => format!("vlan {id} on {parent}"),
            netid::Kind::Dummy => "dummy".into(),
            netid::Kind::Bridge(b) => format!(
                "bridge of {}, stp {}",
                b.ports.join("+"),
                if b.stp { "on" } else { "off" }
            ),
        };
        println!(
            "  {} ({what}) {} mtu {}: {} ({} routes)",
            i.name,
            i.mac,
            i.mtu,
            addrs.join(" "),
            i.routes.len()
        );
    }
    for r in &p.network.rules {
        println!("  IPv{} rule {}", if r.v6 { 6 } else { 4 }, r.describe());
    }
    for l in &p.network.left_behind {
        println!("  {} not carried: {}", l.name, l.why);
    }
    println!(
        "security identity to carry: {}",
        p.security_identity
            .iter()
            .map(|f| format!("/{}", f.display()))
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(ExitCode::SUCCESS)
}

/// The signed manifest of target bundle `spec` (`NAME` or `NAME@VERSION`), from the stager,
/// with an operator identity; its signature is checked against the identity's release key.
fn target_manifest(
    spec: &str,
    identity: Option<&std::path::Path>,
) -> anyhow::Result<bundle::Manifest> {
    let path = identity
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|| proto::identity::DEFAULT_AGENT_PATH.into());
    let id = proto::identity::IdentityFile::load(&path)?;
    anyhow::ensure!(
        id.role == proto::identity::Role::Operator,
        "plan --target reads the bundle from the stager with an operator identity; {} is an agent's",
        path.display()
    );
    let key = bundle::release::ReleasePublicKey::from_text(&id.release_pub, &path)?;
    let client = agent::client::Client::new(id)?;
    let chosen = client.listed_bundle(spec)?;
    let base = format!("/v1/bundles/{}/{}", chosen.name, chosen.version);
    let bytes = client.get_bytes(&format!("{base}/manifest"))?;
    let sig = String::from_utf8(client.get_bytes(&format!("{base}/signature"))?)?;
    let m = bundle::verify::check_manifest(&bytes, &sig, &key, std::path::Path::new(&base))?;
    anyhow::ensure!(
        m.kind == bundle::Kind::Target,
        "{} is a {:?} bundle, not a target",
        m.id(),
        m.kind
    );
    Ok(m)
}

fn firmware(o: &cli::FirmwareOpts, json: bool) -> anyhow::Result<ExitCode> {
    let dir = o.efivars.clone().unwrap_or_else(|| FIRMWARE_EFIVARS.into());
    anyhow::ensure!(
        dir.is_dir(),
        "{}: no UEFI variables (a legacy BIOS machine, or efivarfs not mounted)",
        dir.display()
    );
    let v = bootcfg::select::Efivarfs { dir };
    let one =
        |name: &str| -> anyhow::Result<Option<u16>> { Ok(v.u16_list(name)?.first().copied()) };
    let (current, next, order) = (
        one("BootCurrent")?,
        one("BootNext")?,
        v.u16_list("BootOrder")?,
    );
    let entries = v.entries()?;
    if json {
        let e: Vec<serde_json::Value> = entries
            .iter()
            .map(|(n, o)| {
                serde_json::json!({
                    "number": format!("{n:04X}"),
                    "active": o.attributes & bootcfg::efi::LOAD_OPTION_ACTIVE != 0,
                    "description": o.description,
                    "path": bootcfg::efi::path_text(&o.path),
                })
            })
            .collect();
        let hex = |n: &u16| format!("{n:04X}");
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "boot_current": current.as_ref().map(hex),
                "boot_next": next.as_ref().map(hex),
                "boot_order": order.iter().map(hex).collect::<Vec<_>>(),
                "entries": e,
            }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let opt = |n: Option<u16>| n.map(|n| format!("{n:04X}")).unwrap_or_else(|| "-".into());
    println!("BootCurrent: {}", opt(current));
    println!("BootNext: {}", opt(next));
    println!(
        "BootOrder: {}",
        order
            .iter()
            .map(|n| format!("{n:04X}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    for (n, o) in &entries {
        println!(
            "Boot{n:04X}{} {}\t{}",
            if o.attributes & bootcfg::efi::LOAD_OPTION_ACTIVE != 0 {
                "*"
            } else {
                " "
            },
            o.description,
            bootcfg::efi::path_text(&o.path)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn setup(
    o: &cli::SetupOpts,
    identity: Option<&std::path::Path>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use agent::setup::Outcome;
    let binary = std::env::current_exe()?;
    let running_os = o.root == std::path::Path::new("/");
    let r = agent::setup::setup(&agent::setup::Options {
        root: &o.root,
        identity: o.identity_file.as_deref().or(identity),
        binary: &binary,
        check: !o.no_check,
        force: o.force,
        disk2: o.disk2.as_deref(),
        live: running_os,
    })?;
    // systemd is told only about this machine's own tree, and only when it runs.
    let live = running_os && std::path::Path::new("/run/systemd/system").exists();
    let changed = [r.binary.1, r.identity.1, r.unit.1]
        .into_iter()
        .chain(r.disk2.as_ref().map(|d| d.1))
        .any(|x| x == Outcome::Written);
    let started = if live && !o.no_start {
        let systemctl = |args: &[&str]| -> anyhow::Result<()> {
            let st = std::process::Command::new("systemctl")
                .args(args)
                .status()
                .map_err(|e| anyhow::anyhow!("running systemctl {}: {e}", args.join(" ")))?;
            anyhow::ensure!(
                st.success(),
                "systemctl {} failed ({st}); the files are in place: see `journalctl -u {}`",
                args.join(" "),
                agent::engine::AGENT_SERVICE
            );
            Ok(())
        };
        systemctl(&["daemon-reload"])?;
        let how = if changed { "restart" } else { "start" };
        systemctl(&[how, agent::engine::AGENT_SERVICE])?;
        Some(how)
    } else {
        None
    };
    if json {
        let mut v = serde_json::to_value(&r)?;
        v["started"] = serde_json::json!(started);
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(c) = &r.checked {
        println!(
            "host {}: the stager answered at {} in {} ms{}",
            r.host,
            c.url,
            c.millis,
            match c.job {
                Some(j) => format!(" (job {j} waits for it)"),
                None => String::new(),
            }
        );
    }
    let files = [
        Some(("agent", &r.binary)),
        Some(("identity", &r.identity)),
        Some(("unit", &r.unit)),
        r.disk2.as_ref().map(|d| ("disk2", d)),
    ];
    for (what, (path, outcome)) in files.into_iter().flatten() {
        let said = match outcome {
            Outcome::Written => "written",
            Outcome::Unchanged => "unchanged",
            Outcome::Kept => "kept (the agent may have renewed it; the file given was not used: --force replaces it)",
        };
        println!("{what:<9} {}: {said}", path.display());
    }
    match &r.ready {
        Some(proto::v1::Readiness {
            ok: true,
            disk2,
            boot_mode,
            ..
        }) => println!(
            "ready: a reinstall would use {} as disk 2 ({} boot; `reinstall plan` shows the rest)",
            disk2.as_deref().unwrap_or("-"),
            boot_mode.as_deref().unwrap_or("-")
        ),
        Some(proto::v1::Readiness { why, .. }) => eprintln!(
            "reinstall: warning: a reinstall of this machine would be refused now: {} (installed anyway; `reinstall plan` says more)",
            why.as_deref().unwrap_or("-")
        ),
        None => {}
    }
    match started {
        Some(how) => println!("{}: {how}ed", agent::engine::AGENT_SERVICE),
        None if live => println!("{}: not started (--no-start)", agent::engine::AGENT_SERVICE),
        None => println!(
            "{}: enabled in {}; not started (not this machine's running tree, or no systemd)",
            agent::engine::AGENT_SERVICE,
            o.root.display()
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// Exit status for "reboot now" when the reboot is simulated (--fake-firmware, --efivars).
const EXIT_REBOOT: u8 = 100;

const FIRMWARE_EFIVARS: &str = "/sys/firmware/efi/efivars";

fn run_agent(o: &cli::AgentOpts, identity: Option<&std::path::Path>) -> anyhow::Result<ExitCode> {
    use agent::engine::{Agent, Outcome};
    // Real firmware reboots the machine; the stand-ins (tests) exit EXIT_REBOOT instead.
    let (boot, real): (Box<dyn agent::bootsel::BootSelector>, bool) =
        match (&o.fake_firmware, &o.efivars) {
            (Some(fw), _) => (Box::new(agent::bootsel::FakeFirmware::new(fw)), false),
            (None, Some(dir)) => (
                Box::new(bootcfg::select::Efivarfs { dir: dir.clone() }),
                false,
            ),
            (None, None) if std::path::Path::new("/sys/firmware/efi").exists() => (
                Box::new(bootcfg::select::Efivarfs {
                    dir: FIRMWARE_EFIVARS.into(),
                }),
                true,
            ),
            // Legacy BIOS: GRUB on disk 1 chooses (the source's, then ours).
            (None, None) => (Box::new(agent::bootsel::BiosGrub::new(&o.root)), true),
        };
    let id_path = identity
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|| o.root.join(agent::setup::AGENT_IDENTITY));
    let id = proto::identity::IdentityFile::load(&id_path)?;
    // The agent waits out stager outages; the operator's commands do not.
    let client = agent::client::Client::new(id)?.retrying(agent::transfer::RETRY_FOR);
    let grub_chooses = real && !std::path::Path::new("/sys/firmware/efi").exists();
    let mut a = Agent::new(&o.root, client, boot, o.disk2.clone(), &o.work)?;
    a.grub_chooses = grub_chooses;
    a.call_home_for = std::time::Duration::from_secs(o.call_home_for);
    a.ready_every = std::time::Duration::from_secs(o.ready_every);
    a.identity_path = Some(id_path);
    a.boot_checks();
    loop {
        match a.run(std::time::Duration::from_secs(o.wait))? {
            Outcome::Reboot if real => {
                eprintln!("reinstall: one-shot boot set; rebooting");
                reboot()?;
                return Ok(ExitCode::SUCCESS);
            }
            Outcome::Reboot => {
                eprintln!("reinstall: one-shot boot set; reboot (simulated: exit {EXIT_REBOOT})");
                return Ok(ExitCode::from(EXIT_REBOOT));
            }
            // Nothing to carry on: wait for work (a rescue request, a new job) and act on it;
            // with --once, look once without waiting.
            Outcome::Done | Outcome::Idle | Outcome::NewJob => {
                let wait = if o.once { 0 } else { o.wait };
                a.refresh_ready();
                match a.idle(std::time::Duration::from_secs(wait))? {
                    Outcome::Reboot if real => {
                        eprintln!("reinstall: booting the rescue OS, as requested; rebooting");
                        reboot()?;
                        return Ok(ExitCode::SUCCESS);
                    }
                    Outcome::Reboot => {
                        eprintln!(
                            "reinstall: rescue boot set; reboot (simulated: exit {EXIT_REBOOT})"
                        );
                        return Ok(ExitCode::from(EXIT_REBOOT));
                    }
                    Outcome::NewJob => {}
                    _ if o.once => return Ok(ExitCode::SUCCESS),
                    _ => {}
                }
            }
        }
    }
}

/// Reboots: through systemd when it runs (units stop, filesystems unmount cleanly), else
/// straight through the kernel after a sync. A reboot that does not come is an error, and the
/// unit's restart runs the agent again (which sees the one-shot still pending and reboots).
fn reboot() -> anyhow::Result<()> {
    nix::unistd::sync();
    if std::path::Path::new("/run/systemd/system").exists() {
        let st = std::process::Command::new("systemctl")
            .arg("reboot")
            .status()
            .map_err(|e| anyhow::anyhow!("running systemctl reboot: {e}"))?;
        anyhow::ensure!(st.success(), "systemctl reboot failed: {st}");
        // systemd stops this unit as part of the reboot.
        std::thread::sleep(std::time::Duration::from_secs(600));
        anyhow::bail!("systemctl reboot was accepted but the machine did not reboot in 10 minutes");
    }
    nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT)
        .map_err(|e| anyhow::anyhow!("reboot(2): {e}"))?;
    unreachable!()
}

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let json = args.global.json;
    let j = &args.job;
    if args.command.is_some()
        && (j.target.is_some() || j.rescue.is_some() || j.hold_in_rescue || j.wait)
    {
        eprintln!("reinstall: error: --target, --rescue, --hold-in-rescue and --wait create a job; they do not go with a subcommand");
        return ExitCode::from(2);
    }
    let r = match args.command {
        Some(cli::Command::Bundle(cli::BundleCommand::Verify(o))) => {
            cli::verify(o, args.global.identity.as_deref(), json)
        }
        Some(cli::Command::Bundle(cli::BundleCommand::Unpack(o))) => {
            cli::unpack(o, args.global.identity.as_deref(), json)
        }
        Some(cli::Command::Status) => operator::status(&args.global),
        Some(cli::Command::Rescue(o)) => operator::rescue(&args.global, &o),
        Some(cli::Command::Cancel(o)) => operator::cancel(&args.global, &o),
        Some(cli::Command::Network(o)) => network(&o, json),
        Some(cli::Command::Firmware(ref o)) => firmware(o, json),
        Some(cli::Command::Agent(ref o)) => run_agent(o, args.global.identity.as_deref()),
        Some(cli::Command::Setup(ref o)) => setup(o, args.global.identity.as_deref(), json),
        Some(cli::Command::Plan(ref o)) => plan(o, args.global.identity.as_deref(), json),
        None if args.job.target.is_some() => operator::create(&args.global, &args.job),
        None => {
            let _ = cli::Cli::command().print_help();
            return ExitCode::from(2);
        }
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            // One line: the context chain, outermost first.
            // One line, whatever the libraries underneath put in their messages.
            eprintln!("reinstall: error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
