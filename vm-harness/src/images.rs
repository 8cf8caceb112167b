//! VM images from Debian's packages: trees built by the recipes (debootstrap) and cached
//! under the cache directory by a hash of the recipes, so a changed recipe rebuilds; and the
//! source disk, assembled per run (it carries that run's stager identity).

use crate::{run, sh};
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

const BASE: &str = include_str!("../recipes/base.sh");
const DERIVE: &str = include_str!("../recipes/derive.sh");

pub struct Cache {
    pub dir: PathBuf,
}

fn hash(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Cache {
    pub fn new(dir: &Path) -> Result<Cache> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Cache {
            dir: dir.to_path_buf(),
        })
    }

    fn script(&self, name: &str, text: &str) -> Result<PathBuf> {
        let p = self.dir.join(format!("{name}-{}.sh", hash(&[text])));
        if !p.exists() {
            std::fs::write(&p, text)?;
        }
        Ok(p)
    }

    /// The tree `kind` (`base`, `source`, `rescue`, `target`, `bad-target`), built if its
    /// recipe changed or it was never built. One build at a time (a lock file).
    pub fn tree(&self, kind: &str) -> Result<PathBuf> {
        let lock = std::fs::File::create(self.dir.join("lock"))?;
        let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow::anyhow!("locking the image cache: {e}"))?;
        self.tree_locked(kind)
    }

    fn tree_locked(&self, kind: &str) -> Result<PathBuf> {
        let (key, recipe) = if kind == "base" {
            (hash(&[BASE]), self.script("base", BASE)?)
        } else {
            (hash(&[BASE, DERIVE, kind]), self.script("derive", DERIVE)?)
        };
        let out = self.dir.join(format!("{kind}-{key}"));
        if out.join("etc").exists() {
            return Ok(out);
        }
        let t = std::time::Instant::now();
        if kind == "base" {
            eprintln!("vm-harness: building the base tree (debootstrap, 1-3 minutes)");
            run(Command::new("bash").arg(&recipe).arg(&out))?;
        } else {
            let base = self.tree_locked("base")?;
            eprintln!("vm-harness: deriving the {kind} tree");
            run(Command::new("bash")
                .arg(&recipe)
                .arg(kind)
                .arg(&base)
                .arg(&out))?;
        }
        eprintln!(
            "vm-harness: {kind} tree ready in {:.0}s: {}",
            t.elapsed().as_secs_f64(),
            out.display()
        );
        // Trees of the same kind from older recipes are not used again: they go (each is
        // hundreds of MB, and recipes change).
        let name = out.file_name().map(|n| n.to_string_lossy().into_owned());
        for e in std::fs::read_dir(&self.dir)?.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let stale = n.strip_prefix(&format!("{kind}-")).is_some_and(|rest| {
                rest.len() >= 16 && rest[..16].chars().all(|c| c.is_ascii_hexdigit())
            }) && Some(n.split('.').next().unwrap_or("").to_string()) != name;
            if stale {
                let p = e.path();
                let _ = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            }
        }
        Ok(out)
    }
}

/// What the source OS carries in from the harness.
pub struct SourceSpec<'a> {
    pub hostname: &'a str,
    pub mac: &'a str,
    /// `10.0.2.50/24`
    pub address: &'a str,
    pub gateway: &'a str,
    pub authorized_key: &'a str,
    pub agent_identity: &'a Path,
    pub agent_binary: &'a Path,
    /// The address on an active-backup bond of the NIC `mac` (primary) and a second NIC with
    /// this MAC, with VLAN 100 on the bond holding this address.
    pub bond: Option<(&'a str, &'a str)>,
    /// The bond monitors by ARP every this many ms, to the gateway, instead of MII.
    pub bond_arp: Option<u32>,
    /// The address on bridge br0 (STP on, forward delay 4 s) of the NIC, and a portless
    /// docker0 bridge with 172.17.0.1/16 and dummy0 with the anycast address beside it; the
    /// anycast address's replies routed by rule 1000 through table 100 (via the gateway).
    pub bridge: bool,
}

/// Copies the cached source tree and makes it this run's machine: hostname, a static address
/// with systemd-networkd, fresh SSH host keys, the harness's SSH key for root, the agent
/// (stripped), its identity and its unit. Returns the tree.
pub fn source_tree(cache: &Cache, work: &Path, s: &SourceSpec) -> Result<PathBuf> {
    let tree = work.join("source-tree");
    if tree.exists() {
        sh(&format!("rm -rf {}", tree.display()))?;
    }
    run(Command::new("cp")
        .arg("-a")
        .arg(cache.tree("source")?)
        .arg(&tree))?;
    let w = |rel: &str, text: &str| -> Result<()> {
        let p = tree.join(rel);
        std::fs::create_dir_all(p.parent().unwrap())?;
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
    };
    w("etc/hostname", &format!("{}\n", s.hostname))?;
    w(
        "etc/hosts",
        &format!("127.0.0.1 localhost\n127.0.1.1 {}\n", s.hostname),
    )?;
    let ip = format!(
        "Address={}\nGateway={}\nDNS=10.0.2.3\n",
        s.address, s.gateway
    );
    match s.bond {
        None if s.bridge => {
            // As an operator (and Docker) would have it.
            w(
                "etc/systemd/network/10-br0.netdev",
                &format!(
                    "[NetDev]\nName=br0\nKind=bridge\nMACAddress={}\n\n[Bridge]\nSTP=yes\nForwardDelaySec=4\n",
                    s.mac
                ),
            )?;
            // Replies from the anycast address leave by their own table (source routing).
            w(
                "etc/systemd/network/10-br0.network",
                &format!(
                    "[Match]\nName=br0\n\n[Network]\n{ip}VLAN=br0.200\n\n[Route]\nGateway={}\nTable=100\n\n\
                     [RoutingPolicyRule]\nFrom={}\nTable=100\nPriority=1000\n",
                    s.gateway,
                    crate::scenario::ANYCAST
                ),
            )?;
            w(
                "etc/systemd/network/20-nic0.network",
                &format!(
                    "[Match]\nMACAddress={}\nType=ether\n\n[Network]\nBridge=br0\n",
                    s.mac
                ),
            )?;
            // A VLAN on the bridge (as a virtualization host's management VLAN).
            w(
                "etc/systemd/network/10-br0.200.netdev",
                "[NetDev]\nName=br0.200\nKind=vlan\n\n[VLAN]\nId=200\n",
            )?;
            w(
                "etc/systemd/network/10-br0.200.network",
                &format!(
                    "[Match]\nName=br0.200\n\n[Network]\nAddress={}\n",
                    crate::scenario::BRIDGE_VLAN
                ),
            )?;
            w(
                "etc/systemd/network/10-docker0.netdev",
                "[NetDev]\nName=docker0\nKind=bridge\n",
            )?;
            w(
                "etc/systemd/network/10-docker0.network",
                "[Match]\nName=docker0\n\n[Link]\nRequiredForOnline=no\n\n[Network]\nAddress=172.17.0.1/16\nConfigureWithoutCarrier=yes\n",
            )?;
            w(
                "etc/systemd/network/10-anycast.netdev",
                "[NetDev]\nName=dummy0\nKind=dummy\n",
            )?;
            w(
                "etc/systemd/network/10-anycast.network",
                &format!(
                    "[Match]\nName=dummy0\n\n[Network]\nAddress={}\n",
                    crate::scenario::ANYCAST
                ),
            )?;
        }
        None => w(
            "etc/systemd/network/10-static.network",
            &format!("[Match]\nMACAddress={}\n\n[Network]\n{ip}", s.mac),
        )?,
        Some((mac2, vlan_addr)) => {
            // As an operator would write it. Members by their permanent MACs: once enslaved
            // they wear the bond's.
            let monitor = match s.bond_arp {
                None => "MIIMonitorSec=100ms\n".to_string(),
                Some(ms) => format!(
                    "ARPIntervalSec={ms}ms\nARPIPTargets={}\nARPValidate=active\n",
                    s.gateway
                ),
            };
            w(
                "etc/systemd/network/10-bond0.netdev",
                &format!(
                    "[NetDev]\nName=bond0\nKind=bond\nMACAddress={}\n\n[Bond]\nMode=active-backup\n{monitor}",
                    s.mac
                ),
            )?;
            w(
                "etc/systemd/network/10-bond0.network",
                &format!("[Match]\nName=bond0\n\n[Network]\n{ip}VLAN=bond0.100\n"),
            )?;
            w(
                "etc/systemd/network/10-bond0.100.netdev",
                "[NetDev]\nName=bond0.100\nKind=vlan\n\n[VLAN]\nId=100\n",
            )?;
            w(
                "etc/systemd/network/10-bond0.100.network",
                &format!("[Match]\nName=bond0.100\n\n[Network]\nAddress={vlan_addr}\n"),
            )?;
            for (i, (mac, primary)) in [(s.mac, true), (mac2, false)].iter().enumerate() {
                w(
                    &format!("etc/systemd/network/20-nic{i}.network"),
                    &format!(
                        "[Match]\nPermanentMACAddress={mac}\n\n[Network]\nBond=bond0\n{}",
                        if *primary { "PrimarySlave=yes\n" } else { "" }
                    ),
                )?;
            }
        }
    }
    let mut id = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut id)?;
    w(
        "etc/machine-id",
        &format!(
            "{}\n",
            id.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
    )?;
    w(
        "root/.ssh/authorized_keys",
        &format!("{}\n", s.authorized_key),
    )?;
    // The agent as an operator installs it (`reinstall setup --root TREE --no-check`), then
    // stripped to keep the image small.
    agent::setup::setup(&agent::setup::Options {
        root: &tree,
        identity: Some(s.agent_identity),
        binary: s.agent_binary,
        check: false,
        force: false,
        disk2: None,
        live: false,
    })?;
    run(Command::new("strip").arg(tree.join(agent::setup::AGENT_BINARY)))?;
    run(Command::new("chroot").arg(&tree).args(["ssh-keygen", "-A"]))?;
    run(Command::new("chroot").arg(&tree).args([
        "systemctl",
        "enable",
        "-q",
        "systemd-networkd",
        "systemd-networkd-wait-online",
    ]))?;
    Ok(tree)
}

/// A GPT disk image. UEFI: partition 1 an ESP with GRUB (the same loader code the agent
/// writes, with the removable fallback path, so empty firmware variables boot it), partition
/// 2 an ext4 root made from `tree` (`mkfs.ext4 -d`, no mount). BIOS: partition 1 a BIOS boot
/// partition with the tree's own GRUB (Debian's grub-pc-bin, core.img finding /boot/grub by
/// the root's uuid), partition 2 the root, whose /boot/grub/grub.cfg has the parts of
/// Debian's generated one that matter here: the one-shot `next_entry` (00_header, which sets
/// `boot_once`) and `custom.cfg` sourced at the end (41_custom).
pub fn source_disk(tree: &Path, img: &Path, size_mib: u64, bios: bool) -> Result<()> {
    let first_mib = if bios { 1u64 } else { 64 };
    let root_mib = size_mib - first_mib - 2;
    let _ = std::fs::remove_file(img);
    run(Command::new("truncate")
        .arg("-s")
        .arg(format!("{size_mib}M"))
        .arg(img))?;
    let first = if bios {
        "type=21686148-6449-6E6F-744E-656564454649, name=bios-boot"
    } else {
        "type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=ESP"
    };
    let script = format!(
        "label: gpt\nstart=1MiB, size={first_mib}MiB, {first}\nsize={root_mib}MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root\n"
    );
    let mut c = Command::new("sfdisk");
    c.args(["-q", "--no-reread", "--no-tell-kernel"]).arg(img);
    crate::run_with_stdin(&mut c, &script)?;
    let uuid = bootcfg::efi::Guid(agent::disk::random_guid()?).to_string();
    std::fs::write(tree.join("etc/fstab"), agent::engine::root_fstab(&uuid))?;
    let entry = agent::engine::loader_entry(tree, &uuid, "source", "source OS")?;
    let dir = img.parent().unwrap();
    let esp = dir.join("esp.part");
    let root = dir.join("root.part");
    let _ = std::fs::remove_file(&esp);
    let _ = std::fs::remove_file(&root);
    let mut parts = vec![(root.clone(), 1 + first_mib)];
    if bios {
        let grub = tree.join("boot/grub");
        std::fs::create_dir_all(&grub)?;
        std::fs::write(grub.join("grub.cfg"), debian_bios_grub_cfg(&entry))?;
        std::fs::write(
            grub.join("grubenv"),
            bootcfg::grubenv::render(&Default::default())?,
        )?;
    } else {
        run(Command::new("truncate")
            .arg("-s")
            .arg(format!("{first_mib}M"))
            .arg(&esp))?;
        agent::mount::mkfs_esp(&esp, "ESP", 512)?;
        agent::engine::install_loader(&esp, Some(tree), &[entry], "source", &[], "debian", true)?;
        parts.push((esp.clone(), 1));
    }
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "source", "-U", &uuid, "-d"])
        .arg(tree)
        .arg(&root)
        .arg(format!("{root_mib}M")))?;
    for (part, start_mib) in &parts {
        run(Command::new("dd")
            .arg(format!("if={}", part.display()))
            .arg(format!("of={}", img.display()))
            .args(["bs=1M", "conv=notrunc,sparse", "status=none"])
            .arg(format!("seek={start_mib}")))?;
        std::fs::remove_file(part)?;
    }
    if bios {
        let from = bootcfg::bios::install(
            img,
            Some(tree),
            2048,
            2048,
            &bootcfg::bios::early_config(&[&uuid], "boot/grub"),
        )?;
        eprintln!("vm-harness: source disk: GRUB for BIOS built with {from}");
    }
    Ok(())
}

/// The source's /boot/grub/grub.cfg on BIOS, shaped like Debian's grub-mkconfig output.
fn debian_bios_grub_cfg(e: &bootcfg::grubcfg::Entry) -> String {
    format!(
        r#"### BEGIN /etc/grub.d/00_header ###
if [ -s $prefix/grubenv ]; then
  set have_grubenv=true
  load_env
fi
if [ "${{next_entry}}" ] ; then
   set default="${{next_entry}}"
   set next_entry=
   save_env next_entry
   set boot_once=true
else
   set default="0"
fi
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=1
### END /etc/grub.d/00_header ###

### BEGIN /etc/grub.d/10_linux ###
menuentry 'Debian GNU/Linux' --class debian --id 'gnulinux-simple-{uuid}' {{
	insmod gzio
	insmod part_gpt
	insmod ext2
	search --no-floppy --fs-uuid --set=root {uuid}
	linux	{kernel} root=UUID={uuid} ro {args}
	initrd	{initrd}
}}
### END /etc/grub.d/10_linux ###

### BEGIN /etc/grub.d/41_custom ###
if [ -f  ${{config_directory}}/custom.cfg ]; then
  source ${{config_directory}}/custom.cfg
elif [ -z "${{config_directory}}" -a -f  $prefix/custom.cfg ]; then
  source $prefix/custom.cfg
fi
### END /etc/grub.d/41_custom ###
"#,
        uuid = e.root_uuid,
        kernel = e.kernel,
        args = e.args,
        initrd = e.initrd.clone().unwrap_or_default(),
    )
}
