//! The scenarios: a fresh machine and stager per run, driven and checked from outside.

use crate::images::{self, Cache};
use crate::vm::{self, Facts, Vm};
use crate::{run, sh};
use anyhow::{bail, ensure, Context, Result};
use proto::v1::{HostJob, HostState};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Opts {
    pub work: PathBuf,
    pub cache: PathBuf,
    pub nvme: bool,
    /// SeaBIOS instead of OVMF; the source disk boots through Debian's GRUB for BIOS.
    pub bios: bool,
    /// The VM has a hardware watchdog (i6300esb), and `full`'s broken target hangs.
    pub hang: bool,
    /// The VM's address is on a bond of two NICs, with a VLAN on it (see [`BOND_VLAN`]).
    pub bond: bool,
    /// The bond monitors by ARP (see [`ARP_INTERVAL_MS`]) instead of MII.
    pub arp: bool,
    /// The VM's address is on a bridge of its NIC, beside a dummy with [`ANYCAST`]; the
    /// source also has a portless docker0.
    pub bridge: bool,
    /// The VM reaches the stager through a site relay.
    pub relay: bool,
}

/// With `--bond`: VLAN 100 on bond0 holds this address (QEMU's user network carries no
/// tagged frames: the VLAN is checked by what the guest shows, the bond by SSH through it).
const BOND_VLAN: &str = "192.0.2.7/24";

/// With `--bond --arp`: the bond sends ARP requests to the gateway this often.
pub const ARP_INTERVAL_MS: u32 = 500;

/// With `--bridge`: VLAN 200 on br0 holds this address (checked by what the guest shows, as
/// the bond's VLAN is).
pub const BRIDGE_VLAN: &str = "198.51.100.9/24";

/// With `--bridge`: dummy0 holds this address (an anycast service address, as BGP hosts and
/// load balancers keep on a dummy).
pub const ANYCAST: &str = "192.0.2.53/32";

const HOST: &str = "vm1";
const TARGET: &str = "debian-vm";
const BAD_TARGET: &str = "bad-target";
const WINDOWS: &str = "windows";

/// A target bundle a scenario adds to the stager beside the Linux one.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Extra {
    None,
    /// A Linux target whose kernel panics.
    BadTarget,
    /// A Windows target from synthetic media (`scripts/make-windows-media`).
    Windows,
}
const DISK1_MIB: u64 = 3072;
const DISK2_MIB: u64 = 4096;
/// How long `full` unplugs the stager for, mid-download.
const OUTAGE: Duration = Duration::from_secs(20);
/// One boot plus what the agent does in it, under software emulation.
const BOOT_LIMIT: Duration = Duration::from_secs(25 * 60);

/// A stager on 127.0.0.1, the source machine's disks, and the VM (not started).
pub struct Env {
    pub dir: PathBuf,
    pub reinstall: PathBuf,
    pub op: PathBuf,
    pub release_pub: String,
    stager: Child,
    /// How the stager was started: its binary, home and port (to start it again).
    stager_serve: (PathBuf, PathBuf, u16),
    /// Cut the stager off for [`OUTAGE`] in the middle of the source's rescue download.
    pub outage: bool,
    /// The site relay between the VM and the stager, and its log (`--relay`).
    relay: Option<(Child, PathBuf)>,
    pub vm: Vm,
    t0: Instant,
    last: Instant,
    pub rows: Vec<(String, f64, f64)>,
    bridge: bool,
    /// The bond monitors by ARP (`--arp`).
    arp: bool,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.vm.kill();
        let _ = self.stager.kill();
        let _ = self.stager.wait();
        if let Some((relay, _)) = &mut self.relay {
            let _ = relay.kill();
            let _ = relay.wait();
        }
    }
}

/// Starts `bin ARGS` with its output in `log`, and waits until it listens on `port`.
fn listening(
    bin: &Path,
    args: &[&str],
    env: (&str, &Path),
    log: &Path,
    port: u16,
) -> Result<Child> {
    let out = std::fs::File::create(log)?;
    let child = Command::new(bin)
        .args(args)
        .env(env.0, env.1)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {} {}", bin.display(), args.join(" ")))?;
    let up = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        ensure!(
            up.elapsed() < Duration::from_secs(30),
            "{} {} did not listen on 127.0.0.1:{port}; see {}",
            bin.display(),
            args.join(" "),
            log.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(child)
}

/// From a relay's log ("relay: cached blob SHA (N bytes) from upstream"): how many blobs it
/// fetched from the stager and their bytes; an error if any was fetched twice, or none was.
fn relay_fills(log: &Path) -> Result<(usize, u64)> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let mut seen = std::collections::BTreeMap::new();
    for l in text.lines() {
        let Some(rest) = l.strip_prefix("relay: cached blob ") else {
            continue;
        };
        let mut w = rest.split_whitespace();
        let sha = w.next().unwrap_or_default().to_string();
        let bytes: u64 = w
            .next()
            .and_then(|b| b.strip_prefix('('))
            .and_then(|b| b.parse().ok())
            .with_context(|| format!("{}: unreadable line {l:?}", log.display()))?;
        ensure!(
            seen.insert(sha.clone(), bytes).is_none(),
            "the relay fetched blob {sha} from the stager twice; see {}",
            log.display()
        );
    }
    ensure!(
        !seen.is_empty(),
        "the relay fetched no blob: the VM did not go through it; see {}",
        log.display()
    );
    Ok((seen.len(), seen.values().sum()))
}

/// Builds `reinstall` and `stager` (same profile as this binary) and returns their paths.
fn binaries() -> Result<(PathBuf, PathBuf)> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .context("no directory for the harness binary")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut c = Command::new(cargo);
    c.args(["build", "-q", "--bins", "-p", "agent", "-p", "stager"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    if dir.ends_with("release") {
        c.arg("--release");
    }
    let st = c.status().context("running cargo build")?;
    ensure!(st.success(), "cargo build of reinstall and stager failed");
    Ok((dir.join("reinstall"), dir.join("stager")))
}

impl Env {
    pub fn new(o: &Opts, name: &str, extra: Extra) -> Result<Env> {
        let t0 = Instant::now();
        let (reinstall, stager) = binaries()?;
        let dir = o.work.join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir)?;
        let cache = Cache::new(&o.cache)?;
        let rescue_tree = cache.tree("rescue")?;
        let target_tree = cache.tree("target")?;
        // The stager: its certificate names the address the guest reaches it at.
        let home = dir.join("stager");
        let port = vm::free_port()?;
        let st = |args: &[&str]| -> Result<String> {
            run(Command::new(&stager).args(args).env("STAGER_DIR", &home))
        };
        st(&[
            "init",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--san",
            vm::STAGER_IP,
            "--url",
            &format!("https://{}:{}", vm::STAGER_IP, vm::STAGER_PORT),
            "--default-rescue",
            "rescue",
        ])?;
        let linux: &[&str] = &["--os", "linux"];
        let mut bundles = vec![
            ("rescue", "rescue", rescue_tree, linux),
            (TARGET, "target", target_tree, linux),
        ];
        match extra {
            Extra::None => {}
            Extra::BadTarget => {
                bundles.push((BAD_TARGET, "target", cache.tree("bad-target")?, linux));
            }
            Extra::Windows => {
                let media = dir.join("windows-media");
                run(Command::new(
                    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join("../scripts/make-windows-media"),
                )
                .arg(&media))?;
                bundles.push((
                    WINDOWS,
                    "target",
                    media,
                    &["--os", "windows", "--image", "Test Server"],
                ));
            }
        }
        for (n, kind, tree, os) in &bundles {
            eprintln!("vm-harness: building bundle {n}");
            let mut args = vec![
                "bundle",
                "build",
                "--name",
                n,
                "--version",
                "1",
                "--kind",
                kind,
            ];
            args.extend_from_slice(os);
            let tree = tree.to_string_lossy();
            args.push(&tree);
            st(&args)?;
        }
        // Named as `stager enroll` names it, as scripts/install-agent looks for it.
        let agent_id = dir.join(format!("{HOST}.identity.toml"));
        st(&["enroll", HOST, "--out", &agent_id.to_string_lossy()])?;
        let op = dir.join("operator.toml");
        st(&["operator", "ops", "--out", &op.to_string_lossy()])?;
        // The operator reaches the stager from the host, not through the guest's address.
        let text = std::fs::read_to_string(&op)?;
        let from = format!("https://{}:{}", vm::STAGER_IP, vm::STAGER_PORT);
        ensure!(text.contains(&from), "operator identity without {from}");
        std::fs::write(
            &op,
            text.replace(&from, &format!("https://127.0.0.1:{port}")),
        )?;
        let stager_child = listening(
            &stager,
            &["serve"],
            ("STAGER_DIR", &home),
            &dir.join("stager.log"),
            port,
        )?;
        // With --relay the guest's stager address leads to the relay, whose certificate is
        // for that address; the relay reaches the stager on 127.0.0.1.
        let (relay, vm_port) = if o.relay {
            let relay_port = vm::free_port()?;
            let relay_dir = dir.join("relay");
            st(&[
                "relay",
                "init",
                "--name",
                "site-relay",
                "--san",
                vm::STAGER_IP,
                "--listen",
                &format!("127.0.0.1:{relay_port}"),
                "--upstream",
                &format!("https://127.0.0.1:{port}"),
                "--out",
                &relay_dir.to_string_lossy(),
            ])?;
            let log = dir.join("relay.log");
            let child = listening(
                &stager,
                &["relay", "serve", "--dir", &relay_dir.to_string_lossy()],
                ("STAGER_DIR", &home),
                &log,
                relay_port,
            )?;
            (Some((child, log)), relay_port)
        } else {
            (None, port)
        };
        // The machine: source disk from the source tree, an empty disk 2.
        let key = dir.join("id_ed25519");
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key))?;
        let pubkey = std::fs::read_to_string(key.with_extension("pub"))?;
        let tree = images::source_tree(
            &cache,
            &dir,
            &images::SourceSpec {
                hostname: HOST,
                mac: vm::MAC,
                address: &format!("{}/24", vm::GUEST_IP),
                gateway: "10.0.2.2",
                authorized_key: pubkey.trim(),
                agent_identity: &agent_id,
                agent_binary: &reinstall,
                bond: o.bond.then_some((vm::MAC2, BOND_VLAN)),
                bond_arp: o.arp.then_some(ARP_INTERVAL_MS),
                bridge: o.bridge,
            },
        )?;
        let host_key = std::fs::read_to_string(tree.join("etc/ssh/ssh_host_ed25519_key.pub"))?;
        let disk1 = dir.join("disk1.img");
        let disk2 = dir.join("disk2.img");
        eprintln!("vm-harness: making the source disk");
        images::source_disk(&tree, &disk1, DISK1_MIB, o.bios)?;
        sh(&format!("rm -rf {}", tree.display()))?;
        run(Command::new("truncate")
            .arg("-s")
            .arg(format!("{DISK2_MIB}M"))
            .arg(&disk2))?;
        let known = dir.join("known_hosts");
        let mut vm = Vm::new(
            &dir,
            disk1,
            disk2,
            !o.bios,
            o.nvme,
            vm_port,
            key,
            known.clone(),
        )?;
        vm.watchdog = o.hang;
        vm.second_nic = o.bond;
        let kh: Vec<&str> = host_key.split_whitespace().take(2).collect();
        std::fs::write(
            &known,
            format!("[127.0.0.1]:{} {}\n", vm.ssh_port, kh.join(" ")),
        )?;
        let release_pub = std::fs::read_to_string(home.join("release.pub"))?;
        eprintln!(
            "vm-harness: set up in {:.0}s (work: {})",
            t0.elapsed().as_secs_f64(),
            dir.display()
        );
        let now = Instant::now();
        Ok(Env {
            dir,
            reinstall,
            op,
            release_pub,
            stager: stager_child,
            stager_serve: (stager, home, port),
            outage: false,
            relay,
            vm,
            t0: now,
            last: now,
            rows: Vec::new(),
            bridge: o.bridge,
            arp: o.arp,
        })
    }

    pub fn row(&mut self, what: &str) {
        let now = Instant::now();
        let r = (
            what.to_string(),
            now.duration_since(self.t0).as_secs_f64(),
            now.duration_since(self.last).as_secs_f64(),
        );
        eprintln!("vm-harness: [{:>6.0}s] {what} (+{:.0}s)", r.1, r.2);
        self.rows.push(r);
        self.last = now;
    }

    /// A passed scenario: prints its table and removes its disk images (gigabytes each;
    /// a failed run keeps them, with the logs, for inspection).
    pub fn passed(&mut self, title: &str) -> Result<()> {
        if let Some((_, log)) = &self.relay {
            let (blobs, bytes) = relay_fills(log)?;
            self.row(&format!(
                "site relay: {blobs} blob(s), {} MiB, each crossed from the stager once",
                bytes >> 20
            ));
        }
        self.print_table(title);
        self.discard_disks();
        Ok(())
    }

    fn discard_disks(&mut self) {
        self.vm.kill();
        for d in [&self.vm.disk1, &self.vm.disk2]
            .into_iter()
            .chain(&self.vm.data_disk)
        {
            let _ = std::fs::remove_file(d);
        }
    }

    pub fn print_table(&self, title: &str) {
        println!(
            "\n{title}\n{:<84} {:>8} {:>8}",
            "step", "at (s)", "took (s)"
        );
        for (w, at, took) in &self.rows {
            println!("{w:<84} {at:>8.0} {took:>8.0}");
        }
        if self.vm.hung_resets > 0 {
            println!(
                "note: the emulator hung {} time(s) in a warm reset after the guest's own reboot; the harness power-cycled it",
                self.vm.hung_resets
            );
        }
    }

    pub fn operator(&self) -> Command {
        let mut c = Command::new(&self.reinstall);
        c.arg("--identity").arg(&self.op);
        c
    }

    /// The stager's view of this host in the newest job.
    pub fn stager_view(&self) -> Result<Option<HostJob>> {
        let out = run(self.operator().args(["status", "--host", HOST, "--json"]))?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let jobs: Vec<proto::v1::Job> = serde_json::from_value(v["jobs"].clone())?;
        Ok(jobs
            .into_iter()
            .max_by_key(|j| j.id)
            .and_then(|j| j.hosts.into_iter().find(|h| h.host == HOST)))
    }

    /// The host's readiness record on the stager (`POST /v1/agent/ready`), once it came after
    /// the host's last event in the newest job and says a reinstall would go ahead; else as
    /// it is after 60 s.
    pub fn ready_after_job(&self) -> Result<serde_json::Value> {
        let since = self
            .stager_view()?
            .context("no job")?
            .updated
            .unwrap_or_default();
        let t = Instant::now();
        loop {
            let v: serde_json::Value = serde_json::from_str(&run(self
                .operator()
                .args(["status", "--host", HOST, "--json"]))?)?;
            let r = v["hosts"][0]["ready"].clone();
            let fresh = r["at"].as_str() >= Some(since.as_str());
            if (fresh && r["ok"] == true) || t.elapsed() > Duration::from_secs(60) {
                return Ok(r);
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// Partition `n` of disk `d` (1 or 2) as the guest names it.
    pub fn part(&self, d: u8, n: u8) -> String {
        match (d, self.vm.nvme2) {
            (2, true) => format!("/dev/nvme0n1p{n}"),
            (2, false) => format!("/dev/vdb{n}"),
            _ => format!("/dev/vda{n}"),
        }
    }

    /// Checks what every boot must show: the same address and host name (the host key was
    /// checked by SSH itself), the root on partition `root` of disk `d`.
    pub fn check_boot(&self, f: &Facts, what: &str, d: u8, root: u8) -> Result<()> {
        ensure!(
            f.addr == format!("{}/24", vm::GUEST_IP),
            "{what}: address {:?}, expected {}/24",
            f.addr,
            vm::GUEST_IP
        );
        ensure!(
            f.host == HOST,
            "{what}: hostname {:?}, expected {HOST}",
            f.host
        );
        // On BIOS machines the target's disk 1 starts with a BIOS boot partition, then the
        // ESP: its root is the third.
        let root = if d == 1 && f.world == "target" && !self.vm.uefi {
            3
        } else {
            root
        };
        let want = self.part(d, root);
        ensure!(
            f.root == want,
            "{what}: root on {:?}, expected {want}",
            f.root
        );
        if self.vm.second_nic {
            self.check_bond(what)?;
        }
        if self.bridge {
            self.check_bridge(what, f.world == "source")?;
        }
        Ok(())
    }

    /// With `--bridge`: the address is on br0, a bridge with STP on and a forward delay of
    /// 4 s, wearing the NIC's MAC, with the NIC (known by its MAC) as its port; docker0 is
    /// there in the source only (the agent leaves it behind); dummy0 is a dummy holding
    /// [`ANYCAST`], whose replies rule 1000 sends through table 100's default route on br0. SSH answering at the address shows the bridge passes traffic.
    fn check_bridge(&self, what: &str, source: bool) -> Result<()> {
        let out = self.vm.ssh(
            "ip -d -j link show dev br0; echo ===; ip -j link show; echo ===; \
             ip -4 -o addr show dev br0; echo ===; ip -o link show dev docker0 2>/dev/null || echo none; \
             echo ===; ip -d -j addr show dev dummy0 2>&1; echo ===; ip -j -N -4 rule show; \
             echo ===; ip -j -4 route show table 100 2>&1; echo ===; ip -d -j addr show dev br0.200 2>&1",
        )?;
        let parts: Vec<&str> = out.split("===\n").collect();
        ensure!(parts.len() == 8, "{what}: br0 is missing:\n{out}");
        let vlan: serde_json::Value = serde_json::from_str(parts[7])
            .with_context(|| format!("{what}: br0.200 is missing: {:?}", parts[7]))?;
        let vlan = &vlan[0];
        let (vaddr, vprefix) = BRIDGE_VLAN.split_once('/').unwrap();
        let vprefix: u64 = vprefix.parse()?;
        ensure!(
            vlan["link"] == "br0"
                && vlan["linkinfo"]["info_data"]["id"] == 200
                && vlan["addr_info"].as_array().is_some_and(|a| a
                    .iter()
                    .any(|x| { x["local"] == vaddr && x["prefixlen"] == vprefix })),
            "{what}: br0.200 is not VLAN 200 on br0 holding {BRIDGE_VLAN}: {vlan}"
        );
        let rules: serde_json::Value = serde_json::from_str(parts[5])
            .with_context(|| format!("{what}: ip -j rule show: {:?}", parts[5]))?;
        let (addr, _) = ANYCAST.split_once('/').unwrap();
        ensure!(
            rules.as_array().is_some_and(|a| a
                .iter()
                .any(|r| r["priority"] == 1000 && r["src"] == addr && r["table"] == "100")),
            "{what}: no rule 1000 from {addr} lookup 100: {rules}"
        );
        let table: serde_json::Value = serde_json::from_str(parts[6])
            .with_context(|| format!("{what}: table 100 is missing: {:?}", parts[6]))?;
        ensure!(
            table.as_array().is_some_and(|a| a
                .iter()
                .any(|r| r["dst"] == "default" && r["dev"] == "br0" && r["gateway"].is_string())),
            "{what}: table 100 has no default route through br0: {table}"
        );
        let dummy: serde_json::Value = serde_json::from_str(parts[4])
            .with_context(|| format!("{what}: dummy0 is missing: {:?}", parts[4]))?;
        let dummy = &dummy[0];
        let prefix: u64 = ANYCAST.split_once('/').unwrap().1.parse()?;
        ensure!(
            dummy["linkinfo"]["info_kind"] == "dummy"
                && dummy["addr_info"].as_array().is_some_and(|a| a
                    .iter()
                    .any(|x| x["local"] == addr && x["prefixlen"] == prefix)),
            "{what}: dummy0 is not a dummy holding {ANYCAST}: {dummy}"
        );
        let br: serde_json::Value = serde_json::from_str(parts[0])
            .with_context(|| format!("{what}: ip -j link show br0: {:?}", parts[0]))?;
        let br = &br[0];
        let d = &br["linkinfo"]["info_data"];
        ensure!(
            br["linkinfo"]["info_kind"] == "bridge"
                && d["stp_state"] == 1
                && d["forward_delay"] == 400
                && br["address"] == vm::MAC,
            "{what}: br0 is not a bridge with STP on, forward delay 4 s, wearing {}: {br}",
            vm::MAC
        );
        let links: serde_json::Value = serde_json::from_str(parts[1])
            .with_context(|| format!("{what}: ip -j link show: {:?}", parts[1]))?;
        let ports: Vec<&serde_json::Value> = links
            .as_array()
            .map(|a| a.iter().filter(|l| l["master"] == "br0").collect())
            .unwrap_or_default();
        ensure!(
            ports.len() == 1 && ports[0]["address"] == vm::MAC,
            "{what}: br0's ports are {ports:?}, expected the NIC with {}",
            vm::MAC
        );
        ensure!(
            parts[2].contains(&format!(" {}/24 ", vm::GUEST_IP)),
            "{what}: br0 holds {:?}, expected {}/24",
            parts[2].trim(),
            vm::GUEST_IP
        );
        let docker = parts[3].trim() != "none";
        ensure!(
            docker == source,
            "{what}: docker0 {}, expected it {}",
            if docker { "is there" } else { "is not there" },
            if source {
                "in the source"
            } else {
                "left behind"
            }
        );
        Ok(())
    }

    /// With `--bond`: the address is on bond0 (active-backup, MII every 100 ms, or with
    /// `--arp` ARP every [`ARP_INTERVAL_MS`] to the gateway and MII off) of both NICs,
    /// known by their permanent MACs, the first one primary and active; bond0 wears the first
    /// NIC's MAC; VLAN 100 on bond0 holds [`BOND_VLAN`]. (SSH answering at the address shows
    /// the bond passes traffic.)
    fn check_bond(&self, what: &str) -> Result<()> {
        let out = self.vm.ssh(
            "cat /proc/net/bonding/bond0; echo ===; cat /sys/class/net/bond0/address; \
             echo ===; ip -d -j link show dev bond0.100; echo ===; \
             ip -4 -o addr show dev bond0; echo ===; ip -4 -o addr show dev bond0.100",
        )?;
        let parts: Vec<&str> = out.split("===\n").collect();
        ensure!(
            parts.len() == 5,
            "{what}: the bond or its VLAN is missing:\n{out}"
        );
        let bonding = parts[0];
        let field = |k: &str| {
            bonding
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let (mii, arp, targets) = match self.arp {
            // /proc/net/bonding shows the ARP lines only for a bond that monitors by ARP.
            false => ("100", String::new(), ""),
            true => ("0", ARP_INTERVAL_MS.to_string(), "10.0.2.2"),
        };
        ensure!(
            field("Bonding Mode:").contains("active-backup")
                && field("MII Polling Interval (ms):") == mii
                && field("ARP Polling Interval (ms):") == arp
                && field("ARP IP target/s (n.n.n.n form):") == targets,
            "{what}: bond0 is not active-backup with MII every {mii} ms and ARP every {arp} ms to {targets:?}:\n{bonding}"
        );
        let mut perm: Vec<(String, String)> = Vec::new();
        let mut name = String::new();
        for l in bonding.lines() {
            if let Some(n) = l.strip_prefix("Slave Interface:") {
                name = n.trim().to_string();
            } else if let Some(m) = l.strip_prefix("Permanent HW addr:") {
                perm.push((name.clone(), m.trim().to_string()));
            }
        }
        let mut macs: Vec<&str> = perm.iter().map(|(_, m)| m.as_str()).collect();
        macs.sort();
        ensure!(
            macs == [vm::MAC, vm::MAC2],
            "{what}: bond0's members are {perm:?}, expected the NICs {} and {}",
            vm::MAC,
            vm::MAC2
        );
        let primary = field("Primary Slave:");
        let active = field("Currently Active Slave:");
        let first = &perm.iter().find(|(_, m)| m == vm::MAC).expect("checked").0;
        ensure!(
            primary.split_whitespace().next() == Some(first.as_str()) && &active == first,
            "{what}: bond0's primary is {primary:?} and active {active:?}, expected {first} (the NIC with {})",
            vm::MAC
        );
        ensure!(
            parts[1].trim() == vm::MAC,
            "{what}: bond0 wears {:?}, expected {}",
            parts[1].trim(),
            vm::MAC
        );
        let v: serde_json::Value = serde_json::from_str(parts[2])
            .with_context(|| format!("{what}: ip -j link show bond0.100: {:?}", parts[2]))?;
        let v = &v[0];
        ensure!(
            v["link"] == "bond0" && v["linkinfo"]["info_data"]["id"] == 100,
            "{what}: bond0.100 is not VLAN 100 on bond0: {v}"
        );
        ensure!(
            parts[3].contains(&format!(" {}/24 ", vm::GUEST_IP))
                && parts[4].contains(&format!(" {BOND_VLAN} ")),
            "{what}: addresses: bond0 {:?}, bond0.100 {:?}; expected {}/24 and {BOND_VLAN}",
            parts[3].trim(),
            parts[4].trim(),
            vm::GUEST_IP
        );
        Ok(())
    }

    pub fn wait_world(&mut self, world: &str, not_boot: Option<&str>) -> Result<Facts> {
        let w = world.to_string();
        let nb = not_boot.map(String::from);
        self.vm.wait_for(
            &format!("the {world} OS to answer over SSH"),
            BOOT_LIMIT,
            &move |f: &Facts| f.world == w && nb.as_deref() != Some(f.boot_id.as_str()),
        )
    }

    /// The stager unplugged in the middle of the source's rescue download (streamed into the
    /// rescue partition as it comes): SIGKILL once the stager shows bytes of stage-rescue,
    /// started again after [`OUTAGE`]. The agent waits it out and asks for the rest of the
    /// blob from where it stopped (the bytes on the stager never go back), and the operator's
    /// `reinstall --wait` follows through.
    fn stager_outage(&mut self) -> Result<()> {
        let t = Instant::now();
        let (before, total) = loop {
            if let Some(v) = self.stager_view()? {
                if v.phase.as_deref() == Some("stage-rescue") && v.bytes_done > 0 {
                    break (v.bytes_done, v.bytes_total.unwrap_or(0));
                }
                ensure!(
                    !matches!(v.phase.as_deref(), Some("boot-rescue" | "rescue-up")),
                    "stage-rescue ended before the stager showed any of its bytes"
                );
            }
            ensure!(
                t.elapsed() < BOOT_LIMIT,
                "the stager never showed the source's rescue download"
            );
            std::thread::sleep(Duration::from_millis(300));
        };
        let _ = self.stager.kill();
        let _ = self.stager.wait();
        self.row(&format!(
            "stager killed (SIGKILL) at {} of {} MiB of stage-rescue",
            before >> 20,
            total >> 20
        ));
        std::thread::sleep(OUTAGE);
        let (bin, home, port) = self.stager_serve.clone();
        self.stager = listening(
            &bin,
            &["serve"],
            ("STAGER_DIR", &home),
            &self.dir.join("stager-after-outage.log"),
            port,
        )?;
        let t = Instant::now();
        let after = loop {
            let v = self.stager_view()?.context("the job is gone")?;
            if v.bytes_done != before || v.phase.as_deref() != Some("stage-rescue") {
                break v;
            }
            ensure!(
                t.elapsed() < Duration::from_secs(600),
                "no word from the agent 10 min after the stager came back"
            );
            std::thread::sleep(Duration::from_millis(300));
        };
        ensure!(
            after.phase.as_deref() != Some("stage-rescue") || after.bytes_done >= before,
            "after the outage the download went back to {} bytes (from {before}): not resumed",
            after.bytes_done
        );
        // What the agent said: its connection went silent (the guestfwd relay keeps the
        // guest's side open), so its read timed out and it asked for the rest; or, refused
        // while the stager was down, it retried.
        let log = self
            .vm
            .ssh("journalctl -u reinstall-agent -o cat --no-pager | grep -v '^\\(Started\\|Stopp\\)' | tail -n 20")?;
        let said = log
            .lines()
            .find(|l| {
                l.contains("asking for the rest from there") || l.contains("unreachable; retrying")
            })
            .with_context(|| {
                format!("the agent's log does not say it waited for the stager:\n{log}")
            })?
            .to_string();
        self.row(&format!(
            "stager back after {} s; progress went on from {} MiB (stager: {} at {} MiB), the agent having said \"{}\"",
            OUTAGE.as_secs(),
            before >> 20,
            after.phase.as_deref().unwrap_or("-"),
            after.bytes_done >> 20,
            said.trim()
        ));
        Ok(())
    }

    /// The operator's job for the VM, created as a fleet's would be: with every rollout
    /// limit (the one host is its own canary and takes the only slot, of the job and of its
    /// site), so that every scenario runs a real agent through them.
    pub fn create_job(&self, target: &str) -> Result<Child> {
        let log = std::fs::File::create(self.dir.join("operator.log"))?;
        self.operator()
            .args(["--host", HOST, "--target", target, "--wait"])
            .args(ROLLOUT)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("running reinstall --target")
    }

    /// Checks that the stager shows the job failed with a reason containing `why`, and
    /// records it as a row.
    pub fn stager_failed(&mut self, why: &str) -> Result<()> {
        let (state, msg) = self.stager_last()?;
        ensure!(
            state == HostState::Failed && msg.contains(why),
            "stager shows {state:?}: {msg:?}"
        );
        self.row(&format!("stager: failed: {msg}"));
        Ok(())
    }

    /// The host's state in the newest job and the message of its last event.
    pub fn stager_last(&self) -> Result<(HostState, String)> {
        let v = self.stager_view()?.context("no job")?;
        let msg = v
            .last_event
            .as_ref()
            .and_then(|ev| ev.event.message.clone())
            .unwrap_or_default();
        Ok((v.state, msg))
    }

    pub fn operator_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("operator.log")).unwrap_or_default()
    }
}

/// Waits for the operator's `reinstall --wait`, keeping an eye on the VM (its reset watchdog).
fn wait_child(vm: &mut Vm, c: &mut Child, limit: Duration) -> Result<std::process::ExitStatus> {
    let t = Instant::now();
    loop {
        vm.running()?;
        if let Some(st) = c.try_wait()? {
            return Ok(st);
        }
        if t.elapsed() > limit {
            let _ = c.kill();
            bail!("still running after {}s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// UEFI boot entries as `efibootmgr` in the guest shows them: (BootOrder labels, all labels).
fn boot_order(e: &Env) -> Result<(Vec<String>, String)> {
    let out = e.vm.ssh("efibootmgr")?;
    let mut labels = std::collections::HashMap::new();
    let mut order = Vec::new();
    for l in out.lines() {
        if let Some(o) = l.strip_prefix("BootOrder: ") {
            order = o.split(',').map(|s| s.trim().to_string()).collect();
        } else if let Some(rest) = l.strip_prefix("Boot") {
            if let Some((num, label)) = rest.split_once(' ') {
                labels.insert(
                    num.trim_end_matches('*').to_string(),
                    label.split('\t').next().unwrap_or("").trim().to_string(),
                );
            }
        }
    }
    Ok((
        order
            .iter()
            .map(|n| labels.get(n).cloned().unwrap_or_else(|| n.clone()))
            .collect(),
        out,
    ))
}

/// bootcfg against a real tool on real firmware variables: an entry made by `efibootmgr` is
/// read by `reinstall firmware`, and every entry (the agent's, OVMF's, efibootmgr's) is listed
/// the same by both: number, description, device path, BootOrder, BootCurrent. Returns how
/// many entries were compared.
fn interop(e: &Env) -> Result<usize> {
    let disk2 = if e.vm.nvme2 {
        "/dev/nvme0n1"
    } else {
        "/dev/vdb"
    };
    e.vm.ssh(&format!(
        "efibootmgr -q -C -d {disk2} -p 1 -L made-by-efibootmgr -l '\\EFI\\reinstall\\grubx64.efi'"
    ))?;
    let theirs = e.vm.ssh("efibootmgr -v")?;
    let ours: serde_json::Value = serde_json::from_str(&e.vm.ssh("reinstall firmware --json")?)?;
    let line = |prefix: &str| {
        theirs
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
    };
    let order = ours["boot_order"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    ensure!(
        line("BootOrder: ") == Some(order.as_str()),
        "BootOrder: efibootmgr {:?}, reinstall firmware {order:?}",
        line("BootOrder: ")
    );
    ensure!(
        line("BootCurrent: ") == ours["boot_current"].as_str(),
        "BootCurrent: efibootmgr {:?}, reinstall firmware {}",
        line("BootCurrent: "),
        ours["boot_current"]
    );
    let entries = ours["entries"].as_array().context("no entries")?;
    let mut made = None;
    for en in entries {
        let (num, desc, path) = (
            en["number"].as_str().unwrap_or(""),
            en["description"].as_str().unwrap_or(""),
            en["path"].as_str().unwrap_or(""),
        );
        let theirs_line = theirs
            .lines()
            .find(|l| l.starts_with(&format!("Boot{num}")))
            .with_context(|| format!("efibootmgr does not list Boot{num} ({desc}):\n{theirs}"))?;
        ensure!(
            theirs_line.contains(desc),
            "Boot{num}: efibootmgr {theirs_line:?}, reinstall firmware {desc:?}"
        );
        // The nodes bootcfg decodes (hard drive, file) must read the same as efivar's text.
        if path.starts_with("HD(") {
            ensure!(
                theirs_line.to_lowercase().contains(&path.to_lowercase()),
                "Boot{num} {desc}: efibootmgr {theirs_line:?}, reinstall firmware {path:?}"
            );
        }
        if desc == "made-by-efibootmgr" {
            ensure!(
                path.ends_with("/File(\\EFI\\reinstall\\grubx64.efi)")
                    && path.starts_with("HD(1,GPT,"),
                "the entry efibootmgr made reads as {path:?}"
            );
            made = Some(num.to_string());
        }
    }
    let made = made.context("reinstall firmware does not list the entry efibootmgr made")?;
    e.vm.ssh(&format!("efibootmgr -q -B -b {made}"))?;
    Ok(entries.len())
}

/// The first half every scenario shares: the VM started, the source OS up and checked, the
/// Rollout limits every job of the harness carries (see [`Env::create_job`]).
const ROLLOUT: [&str; 8] = [
    "--canary",
    "1",
    "--max-in-flight",
    "1",
    "--max-in-flight-per-site",
    "1",
    "--halt-after-failures",
    "1",
];

/// `scripts/install-agent` from this machine to the VM, `args` for its `reinstall setup`:
/// returns setup's JSON for the host, after checking the script's line for it.
fn install_agent(e: &Env, args: &str) -> Result<serde_json::Value> {
    let stripped = e.dir.join("reinstall-stripped");
    if !stripped.exists() {
        run(Command::new("strip")
            .arg("-o")
            .arg(&stripped)
            .arg(&e.reinstall))?;
    }
    let hosts = e.dir.join("hosts");
    std::fs::write(&hosts, format!("{HOST} root@127.0.0.1{args}\n"))?;
    let log = e.dir.join("install-agent");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/install-agent");
    let out = run(Command::new(script)
        .arg("--identities")
        .arg(&e.dir)
        .arg("--binary")
        .arg(&stripped)
        .arg("--ssh")
        .arg(e.vm.ssh_command().join(" "))
        .arg("--log")
        .arg(&log)
        .arg(&hosts))?;
    ensure!(
        out.lines()
            .any(|l| l.starts_with(&format!("{HOST} ok in ")))
            && out.contains("1 of 1 set up, 0 failed"),
        "scripts/install-agent: {out}"
    );
    let json = std::fs::read_to_string(log.join(format!("{HOST}.json")))?;
    serde_json::from_str(&json).with_context(|| format!("{HOST}.json of install-agent: {json}"))
}

/// operator's `reinstall --target TARGET --wait` started, and the rescue OS up and checked.
/// Returns the rescue's facts and the operator's process.
fn to_rescue(e: &mut Env, target: &str) -> Result<(Facts, Child)> {
    e.vm.start()?;
    let f = e.wait_world("source", None)?;
    e.check_boot(&f, "source OS", 1, 2)?;
    e.row("source OS up: SSH, same address and host key, root on disk 1");
    // The operator's fleet install over SSH (scripts/install-agent: the same binary, stripped
    // as in the image, and the host's identity file copied over, `reinstall setup` run with
    // them): it calls home with the identity, finds every file as it is, and has systemd start
    // the (running) agent.
    let mut v = install_agent(e, "")?;
    ensure!(
        v["checked"]["url"].is_string()
            && v["started"] == "start"
            && ["binary", "identity", "unit"]
                .iter()
                .all(|f| v[f][1] == "unchanged"),
        "reinstall setup on the source OS: {v}"
    );
    let mut named = String::new();
    if e.vm.data_disk.is_some() {
        // With a data disk too, the agent cannot tell which disk is for the rescue OS: it
        // says so (a reinstall would be refused), and the operator names disk 2 by its
        // stable name, which restarts the agent with it.
        let why = v["ready"]["why"].as_str().unwrap_or_default().to_string();
        ensure!(
            v["ready"]["ok"] == false && why.contains("several candidates for disk 2"),
            "reinstall setup with a data disk: {v}"
        );
        let by_id = e.vm.ssh("ls -d /dev/disk/by-id/*VMDISK2 | head -n1")?;
        v = install_agent(e, &format!(" --disk2 {}", by_id.trim()))?;
        ensure!(
            v["started"] == "restart" && v["disk2"][1] == "written",
            "reinstall setup --disk2 {}: {v}",
            by_id.trim()
        );
        named = format!(
            " (a data disk too: not ready, \"{why}\"; then --disk2 {})",
            by_id.trim()
        );
    }
    ensure!(
        v["ready"]["ok"] == true && v["ready"]["disk2"].is_string(),
        "reinstall setup on the source OS: {v}"
    );
    // Disk 1 offered as disk 2: refused, as a job's plan would refuse it, and nothing written
    // (no drop-in, or the one naming VMDISK2 as it was).
    let refused = e.vm.ssh(
        "reinstall setup --disk2 /dev/$(lsblk -no PKNAME $(findmnt -no SOURCE /)) 2>&1 && echo ACCEPTED; \
         cat /etc/systemd/system/reinstall-agent.service.d/* 2>&1 || true",
    )?;
    let dropin_as_was = if e.vm.data_disk.is_some() {
        refused.contains("--disk2 /dev/disk/by-id/") && refused.contains("VMDISK2")
    } else {
        refused.contains("No such file")
    };
    ensure!(
        refused.contains("running root") && !refused.contains("ACCEPTED") && dropin_as_was,
        "reinstall setup --disk2 with the root disk: {refused}"
    );
    e.row(&format!(
        "source OS: scripts/install-agent over SSH, reinstall setup called home at {} in {} ms, agent started, ready with disk 2 {}{named}; the root disk as --disk2 refused",
        v["checked"]["url"].as_str().unwrap_or("-"),
        v["checked"]["millis"],
        v["ready"]["disk2"].as_str().unwrap_or("-")
    ));
    let op = e.create_job(target)?;
    e.row(&format!(
        "operator: reinstall --target {target} --wait {}",
        ROLLOUT.join(" ")
    ));
    if e.outage {
        e.stager_outage()?;
    }
    let f = e.wait_world("rescue", None)?;
    e.check_boot(&f, "rescue OS", 2, 2)?;
    let v = e
        .stager_view()?
        .context("the stager shows no job for vm1")?;
    e.row(&format!(
        "rescue OS up: same address and host key, root on disk 2 (stager: {})",
        v.phase.as_deref().unwrap_or("-")
    ));
    Ok((f, op))
}

/// The migration from a booted source OS to the target, checked at every boot. Returns the
/// target's facts.
fn migrate(e: &mut Env) -> Result<Facts> {
    let (_, mut op) = to_rescue(e, TARGET)?;
    let f = target_done(e, &mut op, "target OS")?;
    e.row("target OS up: same address and host key, root on disk 1");
    let v = e.stager_view()?.context("no job")?;
    ensure!(v.state == HostState::Done, "stager shows {:?}", v.state);
    e.row("stager: job done; reinstall --wait exited 0");
    Ok(f)
}

/// Waits for the target OS to answer over SSH (checked as `what`: same address and host name,
/// root on disk 1) and for the operator's `reinstall --wait` to exit 0. Returns its facts.
fn target_done(e: &mut Env, op: &mut Child, what: &str) -> Result<Facts> {
    let f = e.wait_world("target", None)?;
    e.check_boot(&f, what, 1, 2)?;
    let st = wait_child(&mut e.vm, op, Duration::from_secs(600)).context("reinstall --wait")?;
    ensure!(
        st.success(),
        "{what}: reinstall --wait exited {st}:\n{}",
        e.operator_log()
    );
    Ok(f)
}

pub fn full(o: &Opts) -> Result<bool> {
    let mut e = Env::new(o, "full", Extra::None)?;
    // A data disk beside the two: never written, and disk 2 must be named.
    let data = e.dir.join("data.img");
    std::fs::write(&data, data_pattern())?;
    e.vm.data_disk = Some(data.clone());
    // Through a relay, the relay's cache would serve the download: the outage is the
    // stager's, on the direct path.
    e.outage = !o.relay;
    migrate(&mut e)?;
    if e.outage {
        let log = e.operator_log();
        ensure!(
            log.contains("still following") && log.contains("the stager answers again"),
            "reinstall --wait through the outage:\n{log}"
        );
    }
    // The target, the source of the next job, told the stager a reinstall would go ahead
    // from it: with the disk its rescue OS is on (no --disk2 in the target: the last job's
    // disk 2, found again by its serial).
    let plan: serde_json::Value = serde_json::from_str(&e.vm.ssh("reinstall plan --json")?)?;
    ensure!(
        plan["disk2_from"] == "last-job" && plan["disk2"]["serial"] == "VMDISK2",
        "reinstall plan in the target: disk 2 {} ({})",
        plan["disk2"],
        plan["disk2_from"]
    );
    let ready = e.ready_after_job()?;
    ensure!(
        ready["ok"] == true && ready["disk2"] == plan["disk2"]["path"] && ready["os"] == "target",
        "the target's readiness on the stager: {ready}"
    );
    e.row(&format!(
        "target: a next reinstall would go ahead, disk 2 {} (the last job's, by serial; stager: ready at {})",
        plan["disk2"]["path"].as_str().unwrap_or("-"),
        ready["at"].as_str().unwrap_or("-")
    ));
    // The target is the new OS, visibly.
    let marker =
        e.vm.ssh("cat /etc/reinstall-vm-target && dpkg-query -W -f '${Status}' less")?;
    ensure!(
        marker.contains("target tree built by") && marker.contains("install ok installed"),
        "the target's marker or package is missing: {marker:?}"
    );
    // The rescue OS and the stashed target bundle are intact on disk 2.
    let rescue = e.vm.ssh(&format!(
        "mkdir -p /mnt/r && mount -o ro {} /mnt/r && cat /mnt/r/etc/reinstall/world; umount /mnt/r",
        e.part(2, 2)
    ))?;
    ensure!(rescue.trim() == "rescue", "rescue partition: {rescue:?}");
    let verify = e.vm.ssh(&format!(
        "printf '%s' '{}' >/tmp/release.pub && mkdir -p /mnt/s && mount -o ro {} /mnt/s && \
         reinstall bundle verify --pubkey /tmp/release.pub /mnt/s/target; r=$?; umount /mnt/s; exit $r",
        e.release_pub,
        e.part(2, 3)
    ))?;
    e.row(&format!("rescue kept; stash: {}", verify.trim()));
    // UEFI: the firmware's variables as efibootmgr shows them (a BIOS machine has none: disk
    // 1's GRUB chooses, checked by the boots that follow).
    if !o.bios {
        let (order, raw) = boot_order(&e)?;
        ensure!(
            order.first().map(String::as_str) == Some("reinstall-target")
                && order.iter().any(|l| l == "reinstall-rescue"),
            "boot order {order:?}, expected reinstall-target first and reinstall-rescue kept:\n{raw}"
        );
        e.row(&format!("efibootmgr: BootOrder {}", order.join(", ")));
        let n = interop(&e)?;
        e.row(&format!(
            "efibootmgr -v and reinstall firmware agree on all {n} entries, one made by efibootmgr"
        ));
    }
    // One more power cycle: the target is the default now.
    let boot = e.vm.ssh("cat /proc/sys/kernel/random/boot_id")?;
    e.vm.ssh("systemctl reboot || true").ok();
    let f = e.wait_world("target", Some(boot.trim()))?;
    e.check_boot(&f, "target OS after a reboot", 1, 2)?;
    e.row("rebooted: target again (default boot)");
    // The operator sends the machine to its rescue OS, once; a reboot there returns to the
    // target.
    let said = run(e.operator().args(["--host", HOST, "rescue"]))?;
    e.row(&format!(
        "operator: reinstall --host vm1 rescue: {}",
        said.trim()
    ));
    let f = e.wait_world("rescue", None)?;
    e.check_boot(&f, "rescue OS on request", 2, 2)?;
    // Its agent tells the stager (after SSH answers, and its network is online: wait).
    let t = Instant::now();
    let h = loop {
        let hosts = run(e.operator().args(["status", "--host", HOST, "--json"]))?;
        let v: serde_json::Value = serde_json::from_str(&hosts)?;
        let h = v["hosts"][0].clone();
        let acked = h["phase"] == "rescue" && h["rescue_requested"].is_null();
        if acked || t.elapsed() > Duration::from_secs(120) {
            break h;
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    ensure!(
        h["phase"] == "rescue" && h["rescue_requested"].is_null(),
        "the stager does not show the rescue acknowledged 120 s after its SSH answered: {h}"
    );
    e.row("rescue OS up on request: same address and host key; stager: phase rescue");
    e.vm.ssh("systemctl reboot || true").ok();
    let f = e.wait_world("target", None)?;
    e.check_boot(&f, "target OS after leaving the rescue", 1, 2)?;
    // Its agent tells the stager it is back (after it started: wait for it).
    let t = Instant::now();
    let phase = loop {
        let v = e.stager_view()?.context("no job")?;
        let p = v.phase.unwrap_or_default();
        if p == "target-up" || t.elapsed() > Duration::from_secs(120) {
            break p;
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    ensure!(
        phase == "target-up",
        "the stager still shows phase {phase:?} with the target back"
    );
    e.row("rebooted in rescue: back in the target; stager: phase target-up");
    target_stops_coming_up(&mut e)?;
    // Fleets reinstall the same machine again: a second job goes from this target, through
    // the rescue, into a new target, and (UEFI) leaves one boot entry per label. On BIOS the
    // old target's GRUB on disk 1 is sent to the new rescue OS through its grubenv.
    let mut op = e.create_job(TARGET)?;
    e.row("operator: a second job for the same machine");
    let f = e.wait_world("rescue", None)?;
    e.check_boot(&f, "rescue OS (second job)", 2, 2)?;
    e.row("second job: rescue OS up");
    target_done(&mut e, &mut op, "target OS (second job)")?;
    if o.bios {
        e.row("second job done: target up through the new rescue OS");
        data_untouched(&mut e, &data)?;
        e.passed("scenario full (BIOS): passed")?;
        return Ok(true);
    }
    let (order, raw) = boot_order(&e)?;
    for label in ["reinstall-rescue", "reinstall-target"] {
        let n = raw
            .lines()
            .filter(|l| l.ends_with(&format!(" {label}")))
            .count();
        ensure!(
            n == 1,
            "{n} entries labelled {label} after the second job:\n{raw}"
        );
    }
    e.row(&format!(
        "second job done: target up, one entry per label (BootOrder {})",
        order.join(", ")
    ));
    data_untouched(&mut e, &data)?;
    e.passed("scenario full (UEFI): passed")?;
    Ok(true)
}

/// The data disk's contents: 64 MiB, every 4 KiB block naming itself.
fn data_pattern() -> Vec<u8> {
    (0..64 * 256)
        .flat_map(|b: u32| {
            let mut block = format!("vm-harness data disk, block {b}\n").into_bytes();
            block.resize(4096, b'.');
            block
        })
        .collect()
}

fn data_untouched(e: &mut Env, data: &Path) -> Result<()> {
    ensure!(
        std::fs::read(data)? == data_pattern(),
        "the data disk was written to"
    );
    e.row("data disk untouched by both jobs (64 MiB compared)");
    Ok(())
}

/// A unit that crashes the kernel early in every boot of the target (as a bad update might):
/// `panic=10` reboots it, long before the agent would start.
const PANIC_UNIT: &str = "[Unit]\nDescription=vm-harness: crash the kernel at boot\n\
    DefaultDependencies=no\nBefore=sysinit.target\n\n[Service]\nType=oneshot\n\
    ExecStart=/bin/sh -c 'echo c > /proc/sysrq-trigger'\n\n[Install]\nWantedBy=sysinit.target\n";
const PANIC_SAYS: &str = "Kernel panic - not syncing: sysrq triggered crash";
/// A unit that sends every boot of the target into systemd's emergency mode (as a bad fstab
/// or a failed fsck would), before the agent starts.
const EMERGENCY_BREAK_UNIT: &str = "[Unit]\nDescription=vm-harness: emergency mode at boot\n\
    DefaultDependencies=no\nAfter=local-fs.target\nBefore=sysinit.target\n\n[Service]\n\
    Type=oneshot\nExecStart=/bin/systemctl --no-block isolate emergency.target\n\n[Install]\n\
    WantedBy=sysinit.target\n";
/// A unit that freezes systemd (PID 1) in every boot of the target, before the agent starts,
/// once systemd has opened the watchdog (`i6300esb`'s driver loads with udev's coldplug): a
/// hung machine, which only the hardware watchdog the agent has systemd arm gets out of.
/// PID 1's crash handler freezes on SIGSEGV.
const HANG_UNIT: &str = "[Unit]\nDescription=vm-harness: hang at boot\n\
    Before=reinstall-agent.service network-online.target\n\n[Service]\nType=oneshot\n\
    ExecStart=/bin/sh -c 'until [ -e /dev/watchdog0 ]; do sleep 1; done; sleep 20; \
    echo vm-harness: freezing systemd >/dev/console; kill -SEGV 1'\n\n[Install]\n\
    WantedBy=multi-user.target\n";
const HANG_SAYS: &str = "vm-harness: freezing systemd";
/// The watchdog's period cut for the harness (the agent writes 2 minutes).
const WATCHDOG_VM: &str = "/etc/systemd/system.conf.d/90-vm-harness.conf";
/// What the agent's emergency-reboot unit says on the console.
const EMERGENCY_SAYS: &str = "reinstall: emergency or rescue mode, unreachable";

/// After a done job, the target stops coming up: disk 1's GRUB boots it
/// `bootcfg::grubcfg::SAVED_TRIES` times, then the rescue OS, whose agent tells the stager
/// (the job stays done, the report is the host's last event). Each boot is a kernel panic on
/// UEFI, and on BIOS systemd's emergency mode, left by the agent's emergency-reboot unit (its
/// delay cut to 5 s by a drop-in); with `--hang`, a hang (systemd frozen) that the hardware
/// watchdog the agent had systemd arm resets (its period cut to 30 s by a drop-in). Repaired
/// from the rescue OS (the unit and the drop-in removed from disk 1's root), a reboot is the
/// target again.
fn target_stops_coming_up(e: &mut Env) -> Result<()> {
    let tries = bootcfg::grubcfg::SAVED_TRIES;
    let (unit, says, did, how, setup) = if e.vm.watchdog {
        // The target the agent wrote has systemd ping the VM's watchdog, from the agent's
        // drop-in (the harness's own shorter period is added only below).
        let armed = e.vm.ssh(
            "systemctl show -p RuntimeWatchdogUSec --value; journalctl -b -o cat | grep -m1 'Using hardware watchdog' || true",
        )?;
        ensure!(
            armed.starts_with("2min\n") && armed.contains("/dev/watchdog0"),
            "the target does not use the hardware watchdog: {armed:?}"
        );
        e.row("the target's systemd pings the hardware watchdog (RuntimeWatchdogSec=2min)");
        (
            HANG_UNIT,
            HANG_SAYS,
            "hung and was reset by the watchdog",
            "systemd hangs",
            format!(
                "mkdir -p {d} && printf '[Manager]\\nRuntimeWatchdogSec=30s\\n' > {WATCHDOG_VM} && ",
                d = Path::new(WATCHDOG_VM).parent().unwrap().display()
            ),
        )
    } else if e.vm.uefi {
        (
            PANIC_UNIT,
            PANIC_SAYS,
            "panicked",
            "a kernel panic",
            String::new(),
        )
    } else {
        let d = format!("/etc/systemd/system/{}.d", agent::engine::EMERGENCY_SERVICE);
        (
            EMERGENCY_BREAK_UNIT,
            EMERGENCY_SAYS,
            "fell into emergency mode and rebooted",
            "systemd's emergency mode",
            format!(
                "mkdir -p {d} && printf '[Service]\\nEnvironment=DELAY=5\\n' > {d}/vm.conf && "
            ),
        )
    };
    let before = e.vm.serial_count(says);
    let resets_before = e.vm.hung_resets;
    e.vm.ssh(&format!(
        "{setup}printf '%s' \"{unit}\" > /etc/systemd/system/vm-break.service && systemctl enable -q vm-break.service && sync"
    ))?;
    e.vm.ssh("systemctl reboot || true").ok();
    e.row(&format!(
        "the target is broken early in every boot ({how}); rebooted"
    ));
    let f = e.wait_world("rescue", None)?;
    e.check_boot(&f, "rescue OS after the target stopped coming up", 2, 2)?;
    let times = e.vm.serial_count(says) - before;
    // A boot the harness power-cycled because the emulator stopped (see
    // `Vm::running`) may or may not have been counted by GRUB already: each such reset may
    // stand for one of the counted boots.
    let resets = e.vm.hung_resets - resets_before;
    ensure!(
        times <= tries && times + resets >= tries && times >= 1,
        "the target {did} {times} times before the rescue OS came up, expected {tries} \
         ({resets} stopped boots power-cycled by the harness meanwhile)"
    );
    e.row(&format!(
        "the target {did} {times} times; disk 1's GRUB booted the rescue OS: same address and host key"
    ));
    // The rescue's agent reports once it reaches the stager.
    let t = Instant::now();
    let (state, msg) = loop {
        let (state, msg) = e.stager_last()?;
        if msg.contains("boots in a row") || t.elapsed() > Duration::from_secs(300) {
            break (state, msg);
        }
        std::thread::sleep(Duration::from_secs(3));
    };
    ensure!(
        state == HostState::Done
            && msg.contains(&format!("did not come up {tries} boots in a row")),
        "stager shows {state:?}, last event {msg:?}"
    );
    e.row(&format!("stager: job still done; last event: {msg}"));
    let root = e.part(1, if e.vm.uefi { 2 } else { 3 });
    e.vm.ssh(&format!(
        "mkdir -p /mnt/t && mount {root} /mnt/t && rm -f /mnt/t/etc/systemd/system/vm-break.service /mnt/t{WATCHDOG_VM} \
         /mnt/t/etc/systemd/system/*.target.wants/vm-break.service && umount /mnt/t && sync"
    ))?;
    e.vm.ssh("systemctl reboot || true").ok();
    let f = e.wait_world("target", None)?;
    e.check_boot(&f, "target OS after the repair", 1, 2)?;
    e.row("repaired from the rescue OS, rebooted: the target again");
    Ok(())
}

pub fn bad_target(o: &Opts) -> Result<bool> {
    let mut e = Env::new(o, "bad-target", Extra::BadTarget)?;
    let (f, mut op) = to_rescue(&mut e, BAD_TARGET)?;
    // The rescue installs the bad target and boots it once; it panics, the machine resets,
    // and the firmware's default (the rescue) comes back.
    let f = e.wait_world("rescue", Some(&f.boot_id))?;
    e.check_boot(&f, "rescue OS after the bad target", 2, 2)?;
    e.row("back in rescue by itself after the target panicked");
    let st =
        wait_child(&mut e.vm, &mut op, Duration::from_secs(300)).context("reinstall --wait")?;
    ensure!(
        !st.success(),
        "reinstall --wait succeeded for a target that panics"
    );
    e.stager_failed("target did not come up")?;
    // Waiting for work there, the rescue OS tells the stager a job taken there would go
    // ahead: disk 1 the last job's, disk 2 its own, kept (`reinstall plan` there says so).
    let plan: serde_json::Value = serde_json::from_str(&e.vm.ssh("reinstall plan --json")?)?;
    ensure!(
        plan["disk2_from"] == "rescue-root"
            && plan["disk2"]["serial"] == "VMDISK2"
            && plan["disk1"]["path"] == "/dev/vda"
            && plan["stash_bytes"].as_u64() > Some(0),
        "reinstall plan in the rescue OS: disk 1 {}, disk 2 {} ({}), stash {}",
        plan["disk1"]["path"],
        plan["disk2"],
        plan["disk2_from"],
        plan["stash_bytes"]
    );
    let ready = e.ready_after_job()?;
    ensure!(
        ready["ok"] == true && ready["os"] == "rescue" && ready["disk2"] == plan["disk2"]["path"],
        "the rescue OS's readiness on the stager: {ready}"
    );
    e.row(&format!(
        "rescue OS: a job taken here would go ahead, disk 1 /dev/vda, disk 2 {} kept, stash {} MiB (stager: ready at {})",
        ready["disk2"].as_str().unwrap_or("-"),
        plan["stash_bytes"].as_u64().unwrap_or(0) >> 20,
        ready["at"].as_str().unwrap_or("-")
    ));
    if e.vm.uefi {
        // The firmware may have reordered BootOrder (OVMF puts QEMU's bootindex order first
        // on every boot, as some real firmware does): what brought the machine back is disk
        // 1's GRUB, whose default stays the rescue OS until a target calls home. The entries
        // are kept.
        let (order, raw) = boot_order(&e)?;
        ensure!(
            order.iter().any(|l| l == "reinstall-rescue"),
            "the rescue entry is gone: {raw}"
        );
        let current = raw
            .lines()
            .find_map(|l| l.strip_prefix("BootCurrent: "))
            .unwrap_or("?")
            .to_string();
        e.row(&format!(
            "efibootmgr: BootCurrent {current}, BootOrder {}",
            order.join(", ")
        ));
    }
    // The operator's answer to the failed job: a job with a good target, taken by the
    // rescue OS the machine sits in, which keeps itself and installs the target from there.
    let rescue_fs = |e: &Env| -> Result<String> {
        Ok(e.vm
            .ssh(&format!("blkid -s UUID -o value {}", e.part(2, 2)))?
            .trim()
            .to_string())
    };
    let before = rescue_fs(&e)?;
    let mut op = e.create_job(TARGET)?;
    e.row(&format!(
        "operator: reinstall --target {TARGET} --wait, taken by the rescue OS"
    ));
    target_done(&mut e, &mut op, "target OS installed from the rescue OS")?;
    let marker = e.vm.ssh("cat /etc/reinstall-vm-target")?;
    ensure!(
        rescue_fs(&e)? == before,
        "the rescue OS's filesystem was replaced"
    );
    e.row(&format!(
        "target OS up ({}), same address and host key; rescue OS kept; job 2 done",
        marker.trim()
    ));
    e.passed(if e.vm.uefi {
        "scenario bad-target (UEFI): passed"
    } else {
        "scenario bad-target (BIOS): passed"
    })?;
    Ok(true)
}

/// The rescue half of a Windows target on real firmware, with synthetic media: the rescue OS
/// lays out disk 1, applies the image, writes WinPE and the identity, and boots WinPE once.
/// The stand-in WinPE cannot start, so the firmware falls back to the rescue OS (the default),
/// which tries once more and then fails the job, reachable. Then disk 1 is checked from the
/// host: the table, the NTFS geometry, the applied image, unattend.xml with the guest's
/// address and MAC, the ESP's files.
pub fn windows_layout(o: &Opts) -> Result<bool> {
    ensure!(
        !o.bios,
        "windows-layout is UEFI only: a Windows target on a BIOS machine is refused in plan"
    );
    let mut e = Env::new(o, "windows-layout", Extra::Windows)?;
    let (_, mut op) = to_rescue(&mut e, WINDOWS)?;
    let st =
        wait_child(&mut e.vm, &mut op, Duration::from_secs(1800)).context("reinstall --wait")?;
    ensure!(
        !st.success(),
        "reinstall --wait succeeded, but the stand-in WinPE cannot boot"
    );
    e.stager_failed("WinPE stage left no log")?;
    // The job's failure (checked above) says the WinPE boots happened; the rescue OS may be
    // the very boot first seen above when they were quick, so any boot of it will do.
    let f = e.wait_world("rescue", None)?;
    e.check_boot(&f, "rescue OS after WinPE did not start", 2, 2)?;
    // (OVMF may move its own entries first: what counts is the rescue before the target.)
    let (order, raw) = boot_order(&e)?;
    let pos = |l: &str| order.iter().position(|o| o == l);
    ensure!(
        matches!((pos("reinstall-rescue"), pos("reinstall-target")), (Some(r), Some(t)) if r < t),
        "boot order: {raw}"
    );
    let entry =
        e.vm.ssh("efibootmgr -v")?
            .lines()
            .find(|l| l.contains("reinstall-target"))
            .unwrap_or_default()
            .to_string();
    ensure!(
        entry
            .to_ascii_uppercase()
            .contains("\\EFI\\BOOT\\BOOTX64.EFI"),
        "the target entry does not start disk 1's boot manager: {entry}"
    );
    e.row(&format!(
        "back in rescue, reachable; BootOrder {}",
        order.join(", ")
    ));
    e.vm.kill();
    check_windows_disk(&e)?;
    e.row("disk 1 from the host: ESP/MSR/NTFS, geometry, image, unattend.xml, ESP files");
    e.passed("scenario windows-layout (UEFI): passed")?;
    Ok(true)
}

/// Disk 1 of a windows-layout run, read on the host through a read-only loop device.
fn check_windows_disk(e: &Env) -> Result<()> {
    let img = e.dir.join("disk1.img");
    let dev = run(Command::new("losetup")
        .args(["--find", "--show", "--read-only"])
        .arg(&img))?
    .trim()
    .to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("partx").args(["-d", &self.0]).output();
            let _ = Command::new("losetup").args(["-d", &self.0]).output();
        }
    }
    let _d = Detach(dev.clone());
    let _ = Command::new("partx").args(["-a", &dev]).output();
    let t: serde_json::Value =
        serde_json::from_str(&run(Command::new("sfdisk").args(["--json", &dev]))?)?;
    let parts = t["partitiontable"]["partitions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let types: Vec<&str> = parts.iter().filter_map(|p| p["type"].as_str()).collect();
    ensure!(
        types
            == [
                "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
                "E3C9E316-0B5C-4DB8-817D-F92DF00215AE",
                "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"
            ],
        "disk 1's partition types: {types:?}"
    );
    let node = |i: usize| parts[i]["node"].as_str().unwrap_or_default().to_string();
    let mut bs = vec![0u8; 512];
    std::io::Read::read_exact(&mut std::fs::File::open(node(2))?, &mut bs)?;
    let start = u64::from(u32::from_le_bytes(bs[0x1c..0x20].try_into()?));
    ensure!(
        &bs[3..11] == b"NTFS    "
            && start == parts[2]["start"].as_u64().unwrap_or(0)
            && u16::from_le_bytes([bs[0x18], bs[0x19]]) == 63
            && u16::from_le_bytes([bs[0x1a], bs[0x1b]]) == 255,
        "the NTFS boot sector: hidden sectors {start}, partition start {}",
        parts[2]["start"]
    );
    let cat = |path: &str| -> Result<String> {
        run(Command::new("ntfscat").arg(node(2)).arg(path))
            .with_context(|| format!("reading {path} from the Windows volume"))
    };
    ensure!(
        cat("/Windows/System32/explorer.exe")?.contains("the desktop edition"),
        "not the chosen image"
    );
    let unattend = cat("/Windows/Panther/unattend.xml")?;
    for want in [
        format!(">{}/24</IpAddress>", vm::GUEST_IP),
        format!(
            "<Identifier>{}</Identifier>",
            vm::MAC.replace(':', "-").to_uppercase()
        ),
        format!("<ComputerName>{HOST}</ComputerName>"),
    ] {
        ensure!(unattend.contains(&want), "unattend.xml lacks {want}");
    }
    ensure!(
        cat("/reinstall/firstboot.ps1")?.contains("curl.exe"),
        "no call home in the first-boot script"
    );
    let esp = std::path::PathBuf::from(node(0));
    let loader = bootcfg::loader::read_esp(&esp, "EFI/BOOT/BOOTX64.EFI")?;
    ensure!(
        loader.starts_with(b"MZ stand-in"),
        "the ESP's boot manager is not the media's"
    );
    bootcfg::loader::read_esp(&esp, "sources/boot.wim")?;
    Ok(())
}

pub struct CutPoint {
    pub name: &'static str,
    pub what: &'static str,
    /// Cut when the stager shows the host in this phase ...
    phase: &'static str,
    /// ... inside this long write (the progress events' `PHASE: STEP`), at a random share
    /// of its bytes.
    during: Option<&'static str>,
}

pub const CUT_POINTS: &[CutPoint] = &[
    CutPoint {
        name: "plan",
        what: "the job just received (plan)",
        phase: "plan",
        during: None,
    },
    CutPoint {
        name: "stage-rescue",
        what: "entering stage-rescue (disk 2 about to be written)",
        phase: "stage-rescue",
        during: None,
    },
    CutPoint {
        name: "stage-rescue-unpack",
        what: "inside the rescue unpack onto disk 2 (random share)",
        phase: "stage-rescue",
        during: Some("unpack"),
    },
    CutPoint {
        name: "stage-rescue-stash",
        what: "inside the target's download into the stash (random share)",
        phase: "stage-rescue",
        during: Some("stash"),
    },
    CutPoint {
        name: "boot-rescue",
        what: "the one-shot to the rescue set, rebooting",
        phase: "boot-rescue",
        during: None,
    },
    CutPoint {
        name: "rescue-up",
        what: "the rescue OS calling home",
        phase: "rescue-up",
        during: None,
    },
    CutPoint {
        name: "install-target",
        what: "entering install-target (disk 1 about to be rewritten)",
        phase: "install-target",
        during: None,
    },
    CutPoint {
        name: "install-target-unpack",
        what: "inside the target unpack onto disk 1 (random share)",
        phase: "install-target",
        during: Some("unpack"),
    },
    CutPoint {
        name: "boot-target",
        what: "the one-shot to the target set, rebooting",
        phase: "boot-target",
        during: None,
    },
    CutPoint {
        name: "target-up",
        what: "the target calling home",
        phase: "target-up",
        during: None,
    },
];

/// A random share in [0.1, 0.9) from the clock (no RNG crate for one number).
fn random_share() -> f64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    0.1 + 0.8 * (n % 1000) as f64 / 1000.0
}

/// One cut: runs the migration until the stager shows the cut point, kills QEMU, powers on
/// again, and waits for the end: the target with the job done, or a reachable rescue (or
/// source) with the failure reported. Returns (outcome, seconds from power-on to the end).
fn cut_once(o: &Opts, p: &CutPoint, second_job: bool) -> Result<(String, String, f64)> {
    let name = match second_job {
        true => format!("power-cut-2-{}", p.name),
        false => format!("power-cut-{}", p.name),
    };
    let mut e = Env::new(o, &name, Extra::None)?;
    e.vm.start()?;
    e.wait_world("source", None)?;
    // Where the job starts: the source OS, or (second job) the first job's target.
    let start = if second_job {
        let mut first = e.create_job(TARGET)?;
        let st = wait_child(&mut e.vm, &mut first, BOOT_LIMIT).context("the first job")?;
        ensure!(st.success(), "the first job failed:\n{}", e.operator_log());
        e.wait_world("target", None)?;
        e.row("first job done: the cut falls in the second");
        "target"
    } else {
        "source"
    };
    let mut op = e.create_job(TARGET)?;
    let share = p.during.map(|_| random_share());
    let t = Instant::now();
    // The operator's command creates the job while this loop already looks: until the stager
    // shows it, the newest job may be the first one, final and past every cut point (seen:
    // a second-job cut at stage-rescue that fell after the first job instead).
    let mut created = !second_job;
    let cut_at = loop {
        ensure!(t.elapsed() < 3 * BOOT_LIMIT, "never reached the cut point");
        e.vm.running()?;
        if let Some(v) = e.stager_view()?.filter(|v| {
            created |= !v.state.is_final();
            created
        }) {
            // Short phases can pass between two looks: cut at the first look at or past the
            // cut point's phase (a share of bytes only counts inside that phase).
            let seen = v.phase.as_deref().map(phase_index).unwrap_or(0);
            let want = phase_index(p.phase);
            let step = v
                .last_event
                .as_ref()
                .and_then(|ev| ev.event.message.clone())
                .unwrap_or_default();
            let far_enough = seen > want
                || (seen == want
                    && match (p.during, share, v.bytes_total) {
                        (None, _, _) => true,
                        (Some(d), Some(s), Some(total)) if total > 0 => {
                            step.ends_with(&format!(": {d}"))
                                && v.bytes_done as f64 >= s * total as f64
                        }
                        _ => false,
                    });
            if far_enough {
                e.vm.kill();
                e.row(&format!(
                    "power cut in {}{}{}{}",
                    v.phase.as_deref().unwrap_or("-"),
                    if step.is_empty() {
                        String::new()
                    } else {
                        format!(" ({step})")
                    },
                    match (share, seen == want) {
                        (Some(_), true) => format!(
                            " at {} of {} bytes",
                            v.bytes_done,
                            v.bytes_total.unwrap_or(0)
                        ),
                        _ => String::new(),
                    },
                    if v.state.is_final() {
                        " (job already final)"
                    } else {
                        ""
                    }
                ));
                break format!(
                    "{}{}",
                    v.phase.as_deref().unwrap_or("-"),
                    match (share, seen == want, v.bytes_total) {
                        (Some(_), true, Some(t)) if t > 0 =>
                            format!(" {:.0}%", 100.0 * v.bytes_done as f64 / t as f64),
                        _ => String::new(),
                    }
                );
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let on = Instant::now();
    e.vm.start()?;
    // The end: the operator's --wait returns when the job is final.
    let st = wait_child(&mut e.vm, &mut op, BOOT_LIMIT).context("waiting for the job to end")?;
    let v = e.stager_view()?.context("no job")?;
    let facts =
        e.vm.wait_for("the machine to answer", BOOT_LIMIT, &|_| true)?;
    let outcome = match (v.state, facts.world.as_str()) {
        (HostState::Done, "target") => {
            e.check_boot(&facts, "target", 1, 2)?;
            "target, job done".to_string()
        }
        (HostState::Failed, w) if w == "rescue" || w == start => {
            let msg = v
                .last_event
                .and_then(|ev| ev.event.message)
                .unwrap_or_default();
            format!("{w} (reachable), failure reported: {msg}")
        }
        (s, w) => bail!("ended in {w} with the job {s:?} (operator exit {st})"),
    };
    e.discard_disks();
    Ok((cut_at, outcome, on.elapsed().as_secs_f64()))
}

pub fn power_cut(o: &Opts, only: &[String], second_job: bool) -> Result<bool> {
    for n in only {
        ensure!(
            CUT_POINTS.iter().any(|p| p.name == n),
            "unknown cut point {n:?} (see --list)"
        );
    }
    let mut rows = Vec::new();
    let mut ok = true;
    for p in CUT_POINTS
        .iter()
        .filter(|p| only.is_empty() || only.iter().any(|n| n == p.name))
    {
        let t = Instant::now();
        let row = match cut_once(o, p, second_job) {
            Ok((at, outcome, rec)) => (p.name, at, outcome, rec),
            Err(e) => {
                ok = false;
                (p.name, "-".into(), format!("FAILED: {e:#}"), 0.0)
            }
        };
        eprintln!(
            "vm-harness: cut {} ({:.0}s): {}",
            p.name,
            t.elapsed().as_secs_f64(),
            row.2
        );
        rows.push(row);
    }
    println!(
        "\nscenario power-cut ({}{})\n{:<20} {:<22} {:>10}  outcome",
        if o.bios { "BIOS" } else { "UEFI" },
        if second_job { ", second job" } else { "" },
        "cut point",
        "cut in",
        "recover s"
    );
    for (n, at, out, rec) in &rows {
        println!(
            "{n:<20} {at:<22} {rec:>10.0}  {}",
            out.lines().next().unwrap_or("")
        );
    }
    Ok(ok)
}

const PHASES: &[&str] = &[
    "plan",
    "stage-rescue",
    "boot-rescue",
    "rescue-up",
    "install-target",
    "boot-target",
    "target-up",
];

fn phase_index(p: &str) -> usize {
    PHASES
        .iter()
        .position(|x| *x == p)
        .map(|i| i + 1)
        .unwrap_or(0)
}

pub fn all(o: &Opts) -> Result<bool> {
    let mut ok = true;
    for (name, f) in [
        ("full", full as fn(&Opts) -> Result<bool>),
        ("bad-target", bad_target),
    ] {
        match f(o) {
            Ok(r) => ok &= r,
            Err(e) => {
                eprintln!("vm-harness: {name} FAILED: {e:#}");
                ok = false;
            }
        }
    }
    if !o.bios {
        match windows_layout(o) {
            Ok(r) => ok &= r,
            Err(e) => {
                eprintln!("vm-harness: windows-layout FAILED: {e:#}");
                ok = false;
            }
        }
    }
    ok &= power_cut(o, &[], false)?;
    Ok(ok)
}
