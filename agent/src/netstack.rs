//! The network identity rendered for whichever network stack the new OS uses, chosen by what
//! its tree contains: netplan (Ubuntu), NetworkManager (keyfiles), systemd-networkd, or
//! ifupdown (`/etc/network/interfaces`). Every rendering matches interfaces by MAC address;
//! ifupdown, which only knows names, gets a systemd `.link` file that names the interface
//! by its MAC first. Pure functions: files as (path inside the tree, contents, mode).

use crate::netid::{Interface, NetIdentity, Route};
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stack {
    Netplan,
    NetworkManager,
    Networkd,
    Ifupdown,
}

/// A file to write into the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    pub path: String,
    pub contents: String,
    pub mode: u32,
}

/// Which stack the tree at `tree` uses (the first of netplan, NetworkManager,
/// systemd-networkd, ifupdown that it contains).
pub fn detect(tree: &Path) -> Result<Stack> {
    let has = |p: &str| tree.join(p).exists();
    if has("usr/sbin/netplan") || has("usr/share/netplan") {
        Ok(Stack::Netplan)
    } else if has("usr/sbin/NetworkManager") {
        Ok(Stack::NetworkManager)
    } else if has("lib/systemd/system/systemd-networkd.service")
        || has("usr/lib/systemd/system/systemd-networkd.service")
    {
        Ok(Stack::Networkd)
    } else if has("sbin/ifup") || has("usr/sbin/ifup") {
        Ok(Stack::Ifupdown)
    } else {
        bail!(
            "{}: no network stack found (netplan, NetworkManager, systemd-networkd or ifupdown): the machine would come back unreachable",
            tree.display()
        )
    }
}

/// The kernel drivers the identity needs beyond a NIC's own: `bonding` for a bond, `8021q`
/// for a VLAN, `bridge` for a bridge, `dummy` for a dummy, each with the interface that needs
/// it.
fn needed_drivers(id: &NetIdentity) -> Vec<(&'static str, &str)> {
    let mut need: Vec<(&'static str, &str)> = Vec::new();
    for i in &id.interfaces {
        let m = match i.kind {
            Kind::Ethernet => continue,
            Kind::Bond(_) => "bonding",
            Kind::Vlan { .. } => "8021q",
            Kind::Bridge(_) => "bridge",
            Kind::Dummy => "dummy",
        };
        if !need.iter().any(|(n, _)| *n == m) {
            need.push((m, &i.name));
        }
    }
    need
}

/// Refuses a tree whose kernel (the one its boot entry will load, see
/// [`bootcfg::grubcfg::find_kernel`]) cannot make the identity's bonds or VLANs: the driver
/// neither built in (`modules.builtin`) nor a module whose file and dependencies
/// (`modules.dep`) are all in the tree. Such an OS would boot without its address, and the
/// machine would not be reachable; refused before the tree is made bootable.
pub fn check_drivers(id: &NetIdentity, tree: &Path) -> Result<()> {
    let need = needed_drivers(id);
    if need.is_empty() {
        return Ok(());
    }
    // The kernel the boot entry loads: the tree's own `/vmlinuz` link when it has one (and
    // `/initrd.img` when there is an initrd), else the newest found in /boot (see
    // `bootcfg::grubcfg::render`).
    let (found, initrd) = bootcfg::grubcfg::find_kernel(tree)?;
    let own = tree.join(bootcfg::grubcfg::OWN_KERNEL.trim_start_matches('/'));
    let own_ok = own.exists()
        && (initrd.is_none()
            || tree
                .join(bootcfg::grubcfg::OWN_INITRD.trim_start_matches('/'))
                .exists());
    let kernel = if own_ok {
        std::fs::read_link(&own)
            .ok()
            .and_then(|t| t.file_name().and_then(|n| n.to_str()).map(String::from))
            .unwrap_or_else(|| "vmlinuz".into())
    } else {
        found.rsplit('/').next().unwrap_or_default().to_string()
    };
    let version = kernel.strip_prefix("vmlinuz-").with_context(|| {
        format!(
            "{}: cannot tell the version of the kernel it boots ({kernel}), so not whether it has {}",
            tree.display(),
            need.iter()
                .map(|(m, _)| *m)
                .collect::<Vec<_>>()
                .join(" and ")
        )
    })?;
    let dir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| tree.join(d).join(version))
        .find(|d| d.is_dir())
        .with_context(|| {
            format!(
                "{}: kernel {version} has no modules directory (lib/modules/{version})",
                tree.display()
            )
        })?;
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    let (builtin, deps) = (read("modules.builtin"), read("modules.dep"));
    // `kernel/drivers/net/bonding/bonding.ko.zst` is module `bonding`.
    let module_of = |path: &str| -> String {
        let base = path.rsplit('/').next().unwrap_or(path);
        base.split(".ko").next().unwrap_or(base).replace('-', "_")
    };
    for (m, iface) in need {
        if builtin.lines().any(|l| module_of(l.trim()) == m) {
            continue;
        }
        let Some((path, rest)) = deps
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(p, _)| module_of(p) == m)
        else {
            bail!(
                "{}: kernel {version} has no {m} driver, which {iface} needs: the OS would come back without its address, unreachable",
                tree.display()
            );
        };
        for f in std::iter::once(path).chain(rest.split_whitespace()) {
            anyhow::ensure!(
                dir.join(f).is_file(),
                "{}: kernel {version} lists {} for the {m} driver ({iface} needs it), but the tree lacks it: the OS would come back unreachable",
                tree.display(),
                dir.join(f).display()
            );
        }
    }
    Ok(())
}

pub fn render(stack: Stack, id: &NetIdentity) -> Vec<File> {
    match stack {
        // netplan before 0.107 (Debian 12, Ubuntu 22.04) has no `dummy-devices`: dummies go to
        // systemd-networkd, netplan's own back end (our YAML keeps its default renderer).
        Stack::Netplan => std::iter::once(netplan(id))
            .chain(
                (0..id.interfaces.len())
                    .filter(|&i| id.interfaces[i].kind == Kind::Dummy)
                    .flat_map(|i| networkd_files(crate::netid::render_networkd_iface(id, i))),
            )
            .collect(),
        Stack::NetworkManager => id
            .interfaces
            .iter()
            .enumerate()
            .flat_map(|(i, n)| nm_keyfile(id, i, n))
            .collect(),
        Stack::Networkd => networkd_files(crate::netid::render_networkd(id)),
        Stack::Ifupdown => ifupdown(id),
    }
}

fn networkd_files(files: Vec<(String, String)>) -> Vec<File> {
    files
        .into_iter()
        .map(|(name, contents)| File {
            path: format!("etc/systemd/network/{name}"),
            contents,
            mode: 0o644,
        })
        .collect()
}

use crate::netid::{nic_name as nic, Kind};

fn static_addrs(n: &Interface, v6: bool) -> Vec<String> {
    n.addresses
        .iter()
        .filter(|a| !a.dynamic && a.address.is_ipv6() == v6)
        .map(|a| format!("{}/{}", a.address, a.prefix))
        .collect()
}

use crate::netid::route_is_v6 as is_v6;

fn dest(r: &Route) -> String {
    match r.destination {
        Some((d, p)) => format!("{d}/{p}"),
        None if is_v6(r) => "::/0".into(),
        None => "0.0.0.0/0".into(),
    }
}

/// Rule `r` in the words `ip rule add` and NetworkManager's `routing-rule` both take:
/// `priority 1000 from 10.0.0.5/32 table 100`.
fn ip_rule_args(r: &crate::netid::Rule) -> String {
    r.words("priority", "table")
}

/// An interface that only carries VLANs: no addresses, no routes, no leases.
fn bare(n: &Interface) -> bool {
    n.addresses.is_empty() && n.routes.is_empty()
}

/// How renderers that refer to interfaces by name call the one at `i`: bonds and VLANs by
/// their captured names, Ethernet interfaces by their `rnicN` key.
fn ref_name(id: &NetIdentity, i: usize) -> String {
    let n = &id.interfaces[i];
    match n.kind {
        Kind::Ethernet => nic(i),
        _ => n.name.clone(),
    }
}

/// The index of the interface captured as `name`.
fn index_of(id: &NetIdentity, name: &str) -> usize {
    id.interfaces
        .iter()
        .position(|i| i.name == name)
        .expect("the identity's references were checked when it was captured")
}

fn quoted_list<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(|d| format!("\"{d}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The address, route and DNS part of a netplan interface at six spaces of indent.
fn netplan_ip(s: &mut String, id: &NetIdentity, i: usize, n: &Interface) {
    let _ = writeln!(s, "      mtu: {}", n.mtu);
    let _ = writeln!(
        s,
        "      dhcp4: {}\n      dhcp6: {}",
        n.has(true, false),
        n.has(true, true)
    );
    if bare(n) {
        let _ = writeln!(s, "      accept-ra: false\n      link-local: []");
        return;
    }
    let _ = writeln!(s, "      accept-ra: {}", static_addrs(n, true).is_empty());
    let addrs: Vec<String> = [static_addrs(n, false), static_addrs(n, true)].concat();
    if !addrs.is_empty() {
        let _ = writeln!(s, "      addresses: [{}]", quoted_list(&addrs));
    }
    if !n.routes.is_empty() {
        let _ = writeln!(s, "      routes:");
        for r in &n.routes {
            let to = if r.destination.is_none() {
                "default".to_string()
            } else {
                dest(r)
            };
            let _ = writeln!(s, "        - to: \"{to}\"");
            match r.gateway {
                Some(g) => {
                    let _ = writeln!(s, "          via: \"{g}\"");
                }
                None => {
                    let _ = writeln!(s, "          scope: link");
                }
            }
            if r.onlink {
                let _ = writeln!(s, "          on-link: true");
            }
            if let Some(m) = r.metric {
                let _ = writeln!(s, "          metric: {m}");
            }
            if let Some(t) = r.table {
                let _ = writeln!(s, "          table: {t}");
            }
        }
    }
    if i == id.dns_index() && !id.rules.is_empty() {
        let _ = writeln!(s, "      routing-policy:");
        for r in &id.rules {
            // netplan wants a `from` or a `to` in every rule: to all, when neither.
            let all = if r.v6 { "::/0" } else { "0.0.0.0/0" };
            let mut first = "-";
            if let Some((a, p)) = r.from {
                let _ = writeln!(s, "        {first} from: \"{a}/{p}\"");
                first = " ";
            }
            match r.to {
                Some((a, p)) => {
                    let _ = writeln!(s, "        {first} to: \"{a}/{p}\"");
                }
                None if r.from.is_none() => {
                    let _ = writeln!(s, "        {first} to: \"{all}\"");
                }
                None => {}
            }
            if let Some(m) = r.fwmark {
                let _ = writeln!(s, "          mark: {m}");
            }
            let _ = writeln!(
                s,
                "          table: {}\n          priority: {}",
                r.table, r.priority
            );
        }
    }
    if i == id.dns_index() && (!id.dns.servers.is_empty() || !id.dns.search.is_empty()) {
        let _ = writeln!(s, "      nameservers:");
        let _ = writeln!(s, "        addresses: [{}]", quoted_list(&id.dns.servers));
        let _ = writeln!(s, "        search: [{}]", quoted_list(&id.dns.search));
    }
}

fn netplan(id: &NetIdentity) -> File {
    let mut s = String::from(
        "# Written by reinstall: the network identity of this machine.\nnetwork:\n  version: 2\n",
    );
    let mut section = "";
    // One mapping per kind (netplan orders what sits on what itself): a VLAN on a bridge
    // comes after the bridge in the identity, but goes under `vlans:`.
    let mut order: Vec<usize> = (0..id.interfaces.len()).collect();
    order.sort_by_key(|&i| id.interfaces[i].kind.rank());
    for i in order {
        let n = &id.interfaces[i];
        let want = match n.kind {
            Kind::Ethernet => "ethernets",
            Kind::Bond(_) => "bonds",
            Kind::Vlan { .. } => "vlans",
            Kind::Bridge(_) => "bridges",
            Kind::Dummy => continue, // see `render`
        };
        if want != section {
            let _ = writeln!(s, "  {want}:");
            section = want;
        }
        let _ = writeln!(s, "    {}:", ref_name(id, i));
        match &n.kind {
            Kind::Ethernet => {
                let _ = writeln!(s, "      match:\n        macaddress: \"{}\"", n.mac);
                if id.master_of(&n.name).is_some() {
                    // Named, so that its bond or bridge can name it; no addresses of its own.
                    let _ = writeln!(
                        s,
                        "      set-name: {}\n      dhcp4: false\n      dhcp6: false\n      accept-ra: false\n      link-local: []",
                        nic(i)
                    );
                    continue;
                }
            }
            Kind::Bond(b) => {
                let members: Vec<String> = b.members.iter().map(|m| nic(index_of(id, m))).collect();
                let _ = writeln!(s, "      interfaces: [{}]", members.join(", "));
                let _ = writeln!(s, "      macaddress: \"{}\"", n.mac);
                let _ = writeln!(s, "      parameters:\n        mode: {}", b.mode);
                if b.miimon_ms > 0 {
                    let _ = writeln!(s, "        mii-monitor-interval: {}", b.miimon_ms);
                }
                if b.updelay_ms > 0 {
                    let _ = writeln!(s, "        up-delay: {}", b.updelay_ms);
                }
                if b.downdelay_ms > 0 {
                    let _ = writeln!(s, "        down-delay: {}", b.downdelay_ms);
                }
                if let Some(r) = &b.lacp_rate {
                    let _ = writeln!(s, "        lacp-rate: {r}");
                }
                if let Some(h) = &b.xmit_hash_policy {
                    let _ = writeln!(s, "        transmit-hash-policy: {h}");
                }
                if b.arp_interval_ms > 0 {
                    let _ = writeln!(
                        s,
                        "        arp-interval: {}\n        arp-ip-targets: [{}]",
                        b.arp_interval_ms,
                        b.arp_targets(", ")
                    );
                }
                if let Some(v) = &b.arp_validate {
                    let _ = writeln!(s, "        arp-validate: {v}");
                }
                if let Some(a) = &b.arp_all_targets {
                    let _ = writeln!(s, "        arp-all-targets: {a}");
                }
                if let Some(p) = &b.primary {
                    let _ = writeln!(s, "        primary: {}", nic(index_of(id, p)));
                }
            }
            Kind::Vlan { id: vid, parent } => {
                let _ = writeln!(
                    s,
                    "      id: {vid}\n      link: {}\n      macaddress: \"{}\"",
                    ref_name(id, index_of(id, parent)),
                    n.mac
                );
            }
            Kind::Bridge(b) => {
                let ports: Vec<String> = b
                    .ports
                    .iter()
                    .map(|p| ref_name(id, index_of(id, p)))
                    .collect();
                let _ = writeln!(s, "      interfaces: [{}]", ports.join(", "));
                let _ = writeln!(s, "      macaddress: \"{}\"", n.mac);
                let _ = writeln!(
                    s,
                    "      parameters:\n        stp: {}\n        forward-delay: {}",
                    b.stp, b.forward_delay_s
                );
            }
            Kind::Dummy => unreachable!("dummies are skipped above"),
        }
        netplan_ip(&mut s, id, i, n);
    }
    File {
        path: "etc/netplan/60-reinstall.yaml".into(),
        contents: s,
        // netplan warns about (and newer versions refuse) world-readable configs.
        mode: 0o600,
    }
}

/// A stable UUID for the NetworkManager connection `name` (VLANs name their parent by it:
/// an Ethernet interface's kernel name in the next OS is not known).
fn nm_uuid(name: &str) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(format!("reinstall NetworkManager connection {name}"));
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let x: String = b.iter().map(|v| format!("{v:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &x[0..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

fn nm_keyfile(id: &NetIdentity, i: usize, n: &Interface) -> Vec<File> {
    let mut files = Vec::new();
    let mut s = String::new();
    let name = format!("reinstall-{}", ref_name(id, i));
    let master = id.master_of(&n.name);
    let _ = writeln!(s, "[connection]\nid={name}\nuuid={}", nm_uuid(&name));
    match &n.kind {
        Kind::Ethernet => {
            let _ = writeln!(s, "type=ethernet\nautoconnect=true");
            if let Some(m) = master {
                // Named by a .link file, so that the bond can name its primary.
                files.push(File {
                    path: format!("etc/systemd/network/10-reinstall-{}.link", nic(i)),
                    contents: crate::netid::naming_link(n, &nic(i)),
                    mode: 0o644,
                });
                let _ = writeln!(
                    s,
                    "interface-name={}\n{}\n[ethernet]\nmac-address={}\n",
                    nic(i),
                    nm_enslave(m),
                    n.mac.to_uppercase()
                );
                files.push(nm_file(&name, s));
                return files;
            }
            let _ = writeln!(
                s,
                "\n[ethernet]\nmac-address={}\nmtu={}\n",
                n.mac.to_uppercase(),
                n.mtu
            );
        }
        Kind::Bond(b) => {
            let _ = writeln!(
                s,
                "type=bond\ninterface-name={}\nautoconnect=true\n{}\n[ethernet]\ncloned-mac-address={}\nmtu={}\n\n[bond]\nmode={}",
                n.name,
                master.map(nm_enslave).unwrap_or_default(),
                n.mac.to_uppercase(),
                n.mtu,
                b.mode
            );
            // NetworkManager turns MII monitoring on (100 ms) when miimon is not given.
            if b.miimon_ms == 0 {
                s.push_str("miimon=0\n");
            }
            for (k, v) in b.driver_options() {
                let _ = writeln!(s, "{k}={v}");
            }
            if let Some(p) = &b.primary {
                let _ = writeln!(s, "primary={}", nic(index_of(id, p)));
            }
            s.push('\n');
        }
        Kind::Vlan { id: vid, parent } => {
            let parent = format!("reinstall-{}", ref_name(id, index_of(id, parent)));
            let _ = writeln!(
                s,
                "type=vlan\ninterface-name={}\nautoconnect=true\n{}\n[ethernet]\ncloned-mac-address={}\nmtu={}\n\n[vlan]\nid={vid}\nparent={}\n",
                n.name,
                master.map(nm_enslave).unwrap_or_default(),
                n.mac.to_uppercase(),
                n.mtu,
                nm_uuid(&parent)
            );
        }
        Kind::Bridge(b) => {
            let _ = writeln!(
                s,
                "type=bridge\ninterface-name={}\nautoconnect=true\n\n[ethernet]\ncloned-mac-address={}\nmtu={}\n\n[bridge]\nstp={}\nforward-delay={}\n",
                n.name,
                n.mac.to_uppercase(),
                n.mtu,
                b.stp,
                b.forward_delay_s
            );
        }
        Kind::Dummy => {
            // No [ethernet] section: a dummy's MAC and MTU are its own business (nothing
            // answers on it but the machine).
            let _ = writeln!(
                s,
                "type=dummy\ninterface-name={}\nautoconnect=true\n",
                n.name
            );
        }
    }
    if master.is_some() {
        // A port: its addresses are its master's.
        files.push(nm_file(&name, s));
        return files;
    }
    for v6 in [false, true] {
        let _ = writeln!(s, "[{}]", if v6 { "ipv6" } else { "ipv4" });
        let addrs = static_addrs(n, v6);
        let method = if !addrs.is_empty() {
            "manual"
        } else if n.has(true, v6) {
            "auto"
        } else if v6 {
            "ignore"
        } else {
            "disabled"
        };
        let _ = writeln!(s, "method={method}");
        for (k, a) in addrs.iter().enumerate() {
            let _ = writeln!(s, "address{}={a}", k + 1);
        }
        for (k, r) in n.routes.iter().filter(|r| is_v6(r) == v6).enumerate() {
            match r.gateway {
                Some(g) => {
                    let _ = writeln!(
                        s,
                        "route{}={},{g}{}",
                        k + 1,
                        dest(r),
                        r.metric.map(|m| format!(",{m}")).unwrap_or_default()
                    );
                }
                None => {
                    let _ = writeln!(s, "route{}={}", k + 1, dest(r));
                }
            }
            let mut opts = Vec::new();
            if r.onlink {
                opts.push("onlink=true".to_string());
            }
            if let Some(t) = r.table {
                opts.push(format!("table={t}"));
            }
            if !opts.is_empty() {
                let _ = writeln!(s, "route{}_options={}", k + 1, opts.join(","));
            }
        }
        if i == id.dns_index() {
            for (k, r) in id.rules.iter().filter(|r| r.v6 == v6).enumerate() {
                let _ = writeln!(s, "routing-rule{}={}", k + 1, ip_rule_args(r));
            }
        }
        if i == id.dns_index() {
            let dns: Vec<String> = id
                .dns
                .servers
                .iter()
                .filter(|d| d.is_ipv6() == v6)
                .map(IpAddr::to_string)
                .collect();
            if !dns.is_empty() {
                let _ = writeln!(s, "dns={};", dns.join(";"));
            }
            if !v6 && !id.dns.search.is_empty() {
                let _ = writeln!(s, "dns-search={};", id.dns.search.join(";"));
            }
        }
        s.push('\n');
    }
    files.push(nm_file(&name, s));
    files
}

/// The `[connection]` lines (each ending in a newline) that make a connection a port of bond
/// or bridge `master`.
fn nm_enslave(master: &Interface) -> String {
    let kind = match master.kind {
        Kind::Bond(_) => "bond",
        _ => "bridge",
    };
    format!("master={}\nslave-type={kind}\n", master.name)
}

fn nm_file(name: &str, contents: String) -> File {
    File {
        path: format!("etc/NetworkManager/system-connections/{name}.nmconnection"),
        contents,
        // NetworkManager ignores keyfiles readable by others.
        mode: 0o600,
    }
}

/// The commands that create bond, VLAN, bridge or dummy `n` before ifupdown configures it (plain ifupdown
/// and iproute2: neither ifenslave nor the vlan package is needed; when one of them made the
/// link already, it is left as it is).
fn ifupdown_create(id: &NetIdentity, n: &Interface) -> Vec<String> {
    let mut pre = Vec::new();
    match &n.kind {
        Kind::Ethernet => {}
        Kind::Bond(b) => {
            let mut opts = format!("mode {}", b.mode);
            for (k, v) in b.driver_options() {
                let _ = write!(opts, " {k} {v}");
            }
            pre.push(format!(
                "ip link show dev {0} >/dev/null 2>&1 || ip link add {0} address {1} mtu {2} type bond {opts}",
                n.name, n.mac, n.mtu
            ));
            for m in &b.members {
                pre.push(format!(
                    "ip link set dev {0} down && ip link set dev {0} master {1} && ip link set dev {0} up",
                    nic(index_of(id, m)),
                    n.name
                ));
            }
            if let Some(p) = &b.primary {
                pre.push(format!(
                    "ip link set dev {} type bond primary {}",
                    n.name,
                    nic(index_of(id, p))
                ));
            }
        }
        Kind::Vlan { id: vid, parent } => {
            let parent = ref_name(id, index_of(id, parent));
            pre.push(format!("ip link set dev {parent} up"));
            pre.push(format!(
                "ip link show dev {0} >/dev/null 2>&1 || ip link add link {parent} name {0} address {1} mtu {2} type vlan id {vid}",
                n.name, n.mac, n.mtu
            ));
        }
        Kind::Dummy => pre.push(format!(
            "ip link show dev {0} >/dev/null 2>&1 || ip link add {0} address {1} mtu {2} type dummy",
            n.name, n.mac, n.mtu
        )),
        Kind::Bridge(b) => {
            pre.push(format!(
                "ip link show dev {0} >/dev/null 2>&1 || ip link add {0} address {1} mtu {2} type bridge stp_state {3} forward_delay {4}",
                n.name,
                n.mac,
                n.mtu,
                u8::from(b.stp),
                b.forward_delay_s * 100
            ));
            for p in &b.ports {
                pre.push(format!(
                    "ip link set dev {0} master {1} && ip link set dev {0} up",
                    ref_name(id, index_of(id, p)),
                    n.name
                ));
            }
        }
    }
    pre
}

fn ifupdown(id: &NetIdentity) -> Vec<File> {
    let mut files = Vec::new();
    let mut s = String::from("# Written by reinstall: the network identity of this machine.\n");
    for (i, n) in id.interfaces.iter().enumerate() {
        let name = ref_name(id, i);
        if n.is_ethernet() {
            // ifupdown knows interfaces by name only: name this one by its MAC first.
            files.push(File {
                path: format!("etc/systemd/network/10-reinstall-{name}.link"),
                contents: crate::netid::naming_link(n, &name),
                mode: 0o644,
            });
            if id.master_of(&n.name).is_some() || bare(n) {
                continue; // brought up by its bond, bridge or VLANs
            }
        }
        let mut pre = ifupdown_create(id, n);
        let _ = writeln!(s, "\nauto {name}");
        let mut stanzas = 0;
        for v6 in [false, true] {
            let fam = if v6 { "inet6" } else { "inet" };
            let addrs = static_addrs(n, v6);
            if addrs.is_empty() {
                if n.has(true, v6) {
                    let _ = writeln!(s, "iface {name} {fam} {}", if v6 { "auto" } else { "dhcp" });
                    stanzas += 1;
                    for p in pre.drain(..) {
                        let _ = writeln!(s, "    pre-up {p}");
                    }
                }
                continue;
            }
            let _ = writeln!(s, "iface {name} {fam} static");
            stanzas += 1;
            for p in pre.drain(..) {
                let _ = writeln!(s, "    pre-up {p}");
            }
            let _ = writeln!(s, "    address {}", addrs[0]);
            if !v6 {
                let _ = writeln!(s, "    mtu {}", n.mtu);
            } else {
                let _ = writeln!(s, "    accept_ra 0");
            }
            for a in &addrs[1..] {
                let _ = writeln!(
                    s,
                    "    up ip -{} addr add {a} dev {name}",
                    if v6 { 6 } else { 4 }
                );
            }
            // Routes by hand: `gateway` cannot say onlink, and order matters (the host route
            // to an onlink gateway first).
            let mut routes: Vec<&Route> = n.routes.iter().filter(|r| is_v6(r) == v6).collect();
            routes.sort_by_key(|r| r.destination.is_none());
            for r in routes {
                let mut cmd = format!(
                    "    up ip -{} route add {}",
                    if v6 { 6 } else { 4 },
                    if r.destination.is_none() {
                        "default".into()
                    } else {
                        dest(r)
                    }
                );
                match r.gateway {
                    Some(g) => cmd += &format!(" via {g}"),
                    None => cmd += " scope link",
                }
                cmd += &format!(" dev {name}");
                if r.onlink {
                    cmd += " onlink";
                }
                if let Some(m) = r.metric {
                    cmd += &format!(" metric {m}");
                }
                if let Some(t) = r.table {
                    cmd += &format!(" table {t}");
                }
                let _ = writeln!(s, "{cmd}");
            }
        }
        if stanzas == 0 {
            // A bond that only carries VLANs: created and brought up, nothing else.
            let _ = writeln!(s, "iface {name} inet manual");
            for p in pre.drain(..) {
                let _ = writeln!(s, "    pre-up {p}");
            }
            let _ = writeln!(s, "    up ip link set dev {name} up");
        }
        if i == id.dns_index() {
            // In the interface's last stanza: rules belong to no family's address. Unlike
            // routes they outlive the interface going down: removed first, so that bringing
            // it up again does not fail on "File exists".
            for r in &id.rules {
                let (f, a) = (if r.v6 { 6 } else { 4 }, ip_rule_args(r));
                let _ = writeln!(
                    s,
                    "    up ip -{f} rule del {a} 2>/dev/null; ip -{f} rule add {a}"
                );
            }
        }
        if !n.is_ethernet() {
            let _ = writeln!(s, "    post-down ip link del dev {name}");
        }
    }
    files.push(File {
        path: "etc/network/interfaces.d/60-reinstall".into(),
        contents: s,
        mode: 0o644,
    });
    let mut r = String::from("# Written by reinstall.\n");
    for d in &id.dns.servers {
        let _ = writeln!(r, "nameserver {d}");
    }
    if !id.dns.search.is_empty() {
        let _ = writeln!(r, "search {}", id.dns.search.join(" "));
    }
    files.push(File {
        path: "etc/resolv.conf".into(),
        contents: r,
        mode: 0o644,
    });
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> NetIdentity {
        crate::netid::fixture("two-nics").unwrap()
    }

    fn all(files: &[File]) -> String {
        files
            .iter()
            .map(|f| f.contents.clone())
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn netplan_matches_by_mac_and_keeps_onlink_and_link_local_gateways() {
        let f = render(Stack::Netplan, &id());
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].mode, 0o600);
        let s = &f[0].contents;
        for want in [
            "macaddress: \"52:54:00:aa:bb:01\"",
            "mtu: 9000",
            "addresses: [\"203.0.113.10/32\"]",
            "- to: \"default\"\n          via: \"198.51.100.1\"\n          on-link: true",
            "- to: \"198.51.100.1/32\"\n          scope: link",
            "addresses: [\"2001:db8::10/128\"]",
            "via: \"fe80::1\"",
            "accept-ra: false",
            "search: [\"example.net\", \"corp.example\"]",
        ] {
            assert!(s.contains(want), "{want:?} missing from:\n{s}");
        }
    }

    #[test]
    fn networkmanager_keyfiles_are_private_and_carry_onlink_routes() {
        let f = render(Stack::NetworkManager, &id());
        assert_eq!(f.len(), 2);
        assert!(f
            .iter()
            .all(|f| f.mode == 0o600 && f.path.ends_with(".nmconnection")));
        let s = all(&f);
        for want in [
            "mac-address=52:54:00:AA:BB:01",
            "address1=203.0.113.10/32",
            "route1=0.0.0.0/0,198.51.100.1\nroute1_options=onlink=true",
            "address1=2001:db8::10/128",
            "route1=::/0,fe80::1",
            "dns=192.0.2.53;",
            "dns-search=example.net;corp.example;",
        ] {
            assert!(s.contains(want), "{want:?} missing from:\n{s}");
        }
    }

    #[test]
    fn ifupdown_names_interfaces_by_mac_and_adds_the_gateway_host_route_first() {
        let f = render(Stack::Ifupdown, &id());
        let links: Vec<&File> = f.iter().filter(|f| f.path.ends_with(".link")).collect();
        assert_eq!(links.len(), 2);
        assert!(links.iter().any(|l| l
            .contents
            .contains("MACAddress=52:54:00:aa:bb:01\nType=ether\n\n[Link]\nName=rnic")));
        let ifaces = ending(&f, "60-reinstall");
        let host = ifaces
            .find("route add 198.51.100.1/32 scope link")
            .expect(ifaces);
        let default = ifaces
            .find("route add default via 198.51.100.1 dev")
            .expect(ifaces);
        assert!(host < default, "{ifaces}");
        assert!(ifaces.contains("onlink"));
        assert!(ifaces.contains("address 2001:db8::10/128"));
        assert!(all(&f).contains("nameserver 192.0.2.53"));
    }

    /// The contents of the file among `files` whose path ends with `end`.
    fn ending<'a>(files: &'a [File], end: &str) -> &'a str {
        &files
            .iter()
            .find(|f| f.path.ends_with(end))
            .unwrap_or_else(|| panic!("{end}: {files:?}"))
            .contents
    }

    /// The keyfile of NetworkManager connection `reinstall-NAME` among `files`.
    fn nm_conn<'a>(files: &'a [File], name: &str) -> &'a str {
        ending(files, &format!("/reinstall-{name}.nmconnection"))
    }

    fn bonded() -> NetIdentity {
        crate::netid::fixture("vlan-bond").unwrap()
    }

    /// bond0 = eth0 (rnic0, primary) + eth1 (rnic1); VLAN 100 on bond0; VLAN 200 on eth2
    /// (rnic2, no address of its own). See the fixture's capture test in netid.
    #[test]
    fn netplan_declares_members_bonds_and_vlans_by_their_keys() {
        let s = &render(Stack::Netplan, &bonded())[0].contents;
        for want in [
            "  ethernets:\n    rnic0:\n      match:\n        macaddress: \"52:54:00:00:00:01\"\n      set-name: rnic0\n      dhcp4: false",
            "    rnic2:\n      match:\n        macaddress: \"52:54:00:00:00:03\"\n      mtu: 1500\n      dhcp4: false\n      dhcp6: false\n      accept-ra: false\n      link-local: []",
            "  bonds:\n    bond0:\n      interfaces: [rnic0, rnic1]\n      macaddress: \"52:54:00:00:00:01\"\n      parameters:\n        mode: active-backup\n        mii-monitor-interval: 100\n        up-delay: 200\n        primary: rnic0\n      mtu: 9000",
            "addresses: [\"192.0.2.10/24\"]",
            "  vlans:\n    bond0.100:\n      id: 100\n      link: bond0\n",
            "    eth2.200:\n      id: 200\n      link: rnic2\n",
            "addresses: [\"2001:db8:200::7/64\"]",
        ] {
            assert!(s.contains(want), "{want:?} missing from:\n{s}");
        }
        assert_eq!(s.matches("nameservers:").count(), 1, "{s}");
        assert!(s.find("nameservers:") > s.find("bond0:"), "{s}");
    }

    #[test]
    fn networkmanager_enslaves_members_and_names_vlan_parents_by_connection_uuid() {
        let f = render(Stack::NetworkManager, &bonded());
        let conn = |n: &str| nm_conn(&f, n);
        assert!(f
            .iter()
            .any(|f| f.path == "etc/systemd/network/10-reinstall-rnic1.link"
                && f.contents
                    .contains("MACAddress=52:54:00:00:00:02\nType=ether")));
        let m = conn("rnic1");
        assert!(
            m.contains("interface-name=rnic1\nmaster=bond0\nslave-type=bond")
                && !m.contains("[ipv4]"),
            "{m}"
        );
        let b = conn("bond0");
        for want in [
            "type=bond\ninterface-name=bond0",
            "cloned-mac-address=52:54:00:00:00:01\nmtu=9000",
            "[bond]\nmode=active-backup\nmiimon=100\nupdelay=200\nprimary=rnic0\n",
            "address1=192.0.2.10/24",
            "dns=192.0.2.53;",
        ] {
            assert!(b.contains(want), "{want:?} missing from:\n{b}");
        }
        let uuid_of = |text: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix("uuid="))
                .unwrap()
                .to_string()
        };
        let v = conn("eth2.200");
        assert!(
            v.contains(&format!(
                "[vlan]\nid=200\nparent={}\n",
                uuid_of(conn("rnic2"))
            )),
            "{v}"
        );
        let v = conn("bond0.100");
        assert!(v.contains(&format!("parent={}\n", uuid_of(b))), "{v}");
        assert!(conn("rnic2").contains("[ipv4]\nmethod=disabled"));
        let uuids: std::collections::BTreeSet<String> = f
            .iter()
            .filter(|f| f.path.ends_with(".nmconnection"))
            .map(|f| uuid_of(&f.contents))
            .collect();
        assert_eq!(uuids.len(), 6, "one distinct uuid per connection");
        assert_eq!(render(Stack::NetworkManager, &bonded()), f, "and stable");
    }

    /// An LACP bond without MII monitoring: NetworkManager and ifupdown get the same driver
    /// options; NetworkManager an explicit miimon=0 (it would turn on 100 ms by itself).
    #[test]
    fn lacp_options_and_monitoring_off_reach_networkmanager_and_ifupdown() {
        let mut id = bonded();
        for n in &mut id.interfaces {
            if let Kind::Bond(b) = &mut n.kind {
                b.mode = "802.3ad".into();
                b.miimon_ms = 0;
                b.updelay_ms = 0;
                b.primary = None;
                b.lacp_rate = Some("fast".into());
                b.xmit_hash_policy = Some("layer3+4".into());
            }
        }
        let nm = render(Stack::NetworkManager, &id);
        let b = ending(&nm, "bond0.nmconnection");
        assert!(
            b.contains(
                "[bond]\nmode=802.3ad\nmiimon=0\nlacp_rate=fast\nxmit_hash_policy=layer3+4\n\n"
            ),
            "{b}"
        );
        let ifu = render(Stack::Ifupdown, &id);
        let s = ending(&ifu, "60-reinstall");
        assert!(
            s.contains("type bond mode 802.3ad lacp_rate fast xmit_hash_policy layer3+4\n"),
            "{s}"
        );
    }

    /// An ARP-monitored bond (the vlan-bond capture with bond0 switched from MII to ARP
    /// monitoring: every 500 ms, targets 192.0.2.1 and 192.0.2.254, validating on the
    /// active link, up only while all targets answer): every stack gets the interval, the
    /// targets, the validation and the all-targets rule, under its own words, and no MII.
    #[test]
    fn an_arp_monitored_bond_reaches_every_stack() {
        let id = crate::netid::fixture("arp-bond").unwrap();
        let file = |stack, end: &str| ending(&render(stack, &id), end).to_string();
        let wants: [(Stack, &str, &str); 4] = [
            (
                Stack::Netplan,
                ".yaml",
                "      parameters:\n        mode: active-backup\n        arp-interval: 500\n        arp-ip-targets: [192.0.2.1, 192.0.2.254]\n        arp-validate: active\n        arp-all-targets: all\n        primary: rnic0\n",
            ),
            (
                Stack::NetworkManager,
                "bond0.nmconnection",
                "[bond]\nmode=active-backup\nmiimon=0\narp_interval=500\narp_ip_target=192.0.2.1,192.0.2.254\narp_validate=active\narp_all_targets=all\nprimary=rnic0\n",
            ),
            (
                Stack::Networkd,
                "bond0.netdev",
                "[Bond]\nMode=active-backup\nARPIntervalSec=500ms\nARPIPTargets=192.0.2.1 192.0.2.254\nARPValidate=active\nARPAllTargets=all\n",
            ),
            (
                Stack::Ifupdown,
                "60-reinstall",
                "type bond mode active-backup arp_interval 500 arp_ip_target 192.0.2.1,192.0.2.254 arp_validate active arp_all_targets all\n",
            ),
        ];
        for (stack, end, want) in wants {
            let s = file(stack, end);
            assert!(s.contains(want), "{stack:?}: {want:?} missing from:\n{s}");
            assert!(
                !s.to_lowercase().contains("mii-monitor") && !s.contains("MIIMonitor"),
                "{stack:?}: {s}"
            );
        }
    }

    /// VLAN 100 on bridge br0 (the bridge capture plus the VLAN; see its test in netid):
    /// netplan lists it under `vlans:` linked to br0; networkd has br0 create it;
    /// NetworkManager names br0's connection as its parent; ifupdown creates it after br0.
    #[test]
    fn a_vlan_on_a_bridge_reaches_every_stack() {
        let id = crate::netid::fixture("bridge-vlan").unwrap();
        let one = |stack, end: &str| ending(&render(stack, &id), end).to_string();
        let np = one(Stack::Netplan, ".yaml");
        assert!(
            np.contains("  vlans:\n    br0.100:\n      id: 100\n      link: br0\n"),
            "{np}"
        );
        assert_eq!(np.matches("  vlans:").count(), 1, "{np}");
        let nd = all(&render(Stack::Networkd, &id));
        assert!(
            nd.contains("[Match]\nName=br0\n") && nd.contains("VLAN=br0.100\n"),
            "{nd}"
        );
        let nm = render(Stack::NetworkManager, &id);
        let uuid = |c: &str| {
            nm_conn(&nm, c)
                .lines()
                .find_map(|l| l.strip_prefix("uuid="))
                .unwrap()
                .to_string()
        };
        let v = nm_conn(&nm, "br0.100");
        assert!(
            v.contains(&format!("[vlan]\nid=100\nparent={}\n", uuid("br0"))),
            "{v}"
        );
        let ifu = one(Stack::Ifupdown, "60-reinstall");
        let br = ifu.find("auto br0\n").expect(&ifu);
        let vlan = ifu.find("auto br0.100\n").expect(&ifu);
        assert!(br < vlan, "{ifu}");
        assert!(
            ifu.contains("ip link add link br0 name br0.100 address 52:54:00:00:01:01 mtu 1500 type vlan id 100"),
            "{ifu}"
        );
        assert!(
            ifu.contains("up ip -4 route add 203.0.113.0/24 via 198.51.100.1 dev br0.100"),
            "{ifu}"
        );
    }

    #[test]
    fn ifupdown_creates_bonds_and_vlans_with_iproute2_after_what_they_sit_on() {
        let f = render(Stack::Ifupdown, &bonded());
        let s = ending(&f, "60-reinstall");
        assert!(
            !s.contains("auto rnic"),
            "members and bare parents come up with what sits on them:\n{s}"
        );
        let bond = s.find("auto bond0\niface bond0 inet static\n    pre-up ip link show dev bond0 >/dev/null 2>&1 || ip link add bond0 address 52:54:00:00:00:01 mtu 9000 type bond mode active-backup miimon 100 updelay 200\n    pre-up ip link set dev rnic0 down && ip link set dev rnic0 master bond0 && ip link set dev rnic0 up\n    pre-up ip link set dev rnic1 down && ip link set dev rnic1 master bond0 && ip link set dev rnic1 up\n    pre-up ip link set dev bond0 type bond primary rnic0\n    address 192.0.2.10/24").expect(s);
        let v100 = s.find("auto bond0.100\niface bond0.100 inet static\n    pre-up ip link set dev bond0 up\n    pre-up ip link show dev bond0.100 >/dev/null 2>&1 || ip link add link bond0 name bond0.100 address 52:54:00:00:00:01 mtu 1500 type vlan id 100\n").expect(s);
        assert!(bond < v100, "{s}");
        assert!(s.contains("iface eth2.200 inet6 static\n    pre-up ip link set dev rnic2 up\n    pre-up ip link show dev eth2.200"), "{s}");
        assert!(s.contains("    post-down ip link del dev bond0\n"), "{s}");
        assert!(
            s.contains("up ip -4 route add 203.0.113.0/24 via 198.51.100.1 dev bond0.100"),
            "{s}"
        );
        let links = f.iter().filter(|f| f.path.ends_with(".link")).count();
        assert_eq!(links, 3, "every Ethernet interface is named by its MAC");
    }

    /// br0 (STP on, forward delay 4 s) with eth0 (rnic0) as its port holds the addresses and
    /// the default route; docker0 and tun0 are left behind (see the capture test in netid).
    #[test]
    fn every_stack_makes_the_bridge_with_its_port_named_by_mac() {
        let id = crate::netid::fixture("bridge").unwrap();
        let netplan = &render(Stack::Netplan, &id)[0].contents;
        for want in [
            "  ethernets:\n    rnic0:\n      match:\n        macaddress: \"52:54:00:00:01:01\"\n      set-name: rnic0\n      dhcp4: false",
            "  bridges:\n    br0:\n      interfaces: [rnic0]\n      macaddress: \"52:54:00:00:01:01\"\n      parameters:\n        stp: true\n        forward-delay: 4\n      mtu: 1500",
            "addresses: [\"192.0.2.10/24\", \"2001:db8::10/64\"]",
            "- to: \"default\"\n          via: \"192.0.2.1\"",
        ] {
            assert!(netplan.contains(want), "{want:?} missing from:\n{netplan}");
        }
        let nm = render(Stack::NetworkManager, &id);
        let conn = |n: &str| nm_conn(&nm, n);
        let port = conn("rnic0");
        assert!(
            port.contains("interface-name=rnic0\nmaster=br0\nslave-type=bridge\n\n[ethernet]\nmac-address=52:54:00:00:01:01")
                && !port.contains("[ipv4]"),
            "{port}"
        );
        let br = conn("br0");
        for want in [
            "type=bridge\ninterface-name=br0\nautoconnect=true\n\n[ethernet]\ncloned-mac-address=52:54:00:00:01:01\nmtu=1500\n\n[bridge]\nstp=true\nforward-delay=4\n",
            "[ipv4]\nmethod=manual\naddress1=192.0.2.10/24\nroute1=0.0.0.0/0,192.0.2.1",
            "dns=192.0.2.53;",
        ] {
            assert!(br.contains(want), "{want:?} missing from:\n{br}");
        }
        assert!(nm
            .iter()
            .any(|f| f.path == "etc/systemd/network/10-reinstall-rnic0.link"));
        let ifu = render(Stack::Ifupdown, &id);
        let s = ending(&ifu, "60-reinstall");
        assert!(
            !s.contains("auto rnic0"),
            "the port comes up with its bridge:\n{s}"
        );
        assert!(s.contains("auto br0\niface br0 inet static\n    pre-up ip link show dev br0 >/dev/null 2>&1 || ip link add br0 address 52:54:00:00:01:01 mtu 1500 type bridge stp_state 1 forward_delay 400\n    pre-up ip link set dev rnic0 master br0 && ip link set dev rnic0 up\n    address 192.0.2.10/24\n"), "{s}");
        assert!(s.contains("    post-down ip link del dev br0\n"), "{s}");
        assert!(
            !all(&ifu).contains("docker0")
                && !netplan.contains("docker0")
                && !all(&nm).contains("tun0"),
            "left behind"
        );
        let nd = all(&render(Stack::Networkd, &id));
        for want in [
            "[Match]\nMACAddress=52:54:00:00:01:01\nType=ether\n\n[Link]\nName=rnic0\n",
            "[Match]\nName=rnic0\n\n[Network]\nBridge=br0\n",
            "[NetDev]\nName=br0\nKind=bridge\nMACAddress=52:54:00:00:01:01\nMTUBytes=1500\n\n[Bridge]\nSTP=yes\nForwardDelaySec=4\n",
            "[Match]\nName=br0\n\n[Network]\nDHCP=no\nIPv6AcceptRA=no\nAddress=192.0.2.10/24\n",
        ] {
            assert!(nd.contains(want), "{want:?} missing from:\n{nd}");
        }
        assert_eq!(needed_drivers(&id), [("bridge", "br0")]);
    }

    /// dummy0 (192.0.2.53/32 and 2001:db8:53::53/128, an anycast address) beside the two
    /// NICs of `two-nics`: every stack creates it by name with its addresses; DNS stays with
    /// the first NIC.
    #[test]
    fn every_stack_creates_the_dummy_by_name_with_its_addresses() {
        let id = crate::netid::fixture("dummy").unwrap();
        let nd = render(Stack::Networkd, &id);
        let want_netdev =
            "[NetDev]\nName=dummy0\nKind=dummy\nMACAddress=d6:1e:3a:9c:05:53\nMTUBytes=1500\n";
        let want_network = "[Match]\nName=dummy0\n\n[Network]\nDHCP=no\nIPv6AcceptRA=no\nAddress=192.0.2.53/32\nAddress=2001:db8:53::53/128\n";
        let file = |files: &[File], path: &str| {
            files
                .iter()
                .find(|f| f.path == path)
                .unwrap_or_else(|| panic!("{path} missing from {files:?}"))
                .contents
                .clone()
        };
        let netdev = "etc/systemd/network/05-reinstall-dummy0.netdev";
        let network = "etc/systemd/network/05-reinstall-dummy0.network";
        assert!(file(&nd, netdev).contains(want_netdev), "{nd:?}");
        let n = file(&nd, network);
        assert!(n.contains(want_network) && !n.contains("DNS="), "{n}");
        // netplan 0.106 knows no dummy-devices: the YAML leaves it to networkd's files.
        let np = render(Stack::Netplan, &id);
        assert!(!np[0].contents.contains("dummy0"), "{}", np[0].contents);
        assert!(
            np[0].contents.contains("nameservers:"),
            "{}",
            np[0].contents
        );
        assert_eq!(file(&np, netdev), file(&nd, netdev));
        assert_eq!(file(&np, network), file(&nd, network));
        assert_eq!(np.len(), 3, "{np:?}");
        let nm = render(Stack::NetworkManager, &id);
        let d = nm_conn(&nm, "dummy0");
        for want in [
            "type=dummy\ninterface-name=dummy0\nautoconnect=true\n\n[ipv4]\nmethod=manual\naddress1=192.0.2.53/32\n",
            "[ipv6]\nmethod=manual\naddress1=2001:db8:53::53/128\n",
        ] {
            assert!(d.contains(want), "{want:?} missing from:\n{d}");
        }
        assert!(!d.contains("dns="), "{d}");
        let ifu = all(&render(Stack::Ifupdown, &id));
        assert!(ifu.contains("auto dummy0\niface dummy0 inet static\n    pre-up ip link show dev dummy0 >/dev/null 2>&1 || ip link add dummy0 address d6:1e:3a:9c:05:53 mtu 1500 type dummy\n    address 192.0.2.53/32\n"), "{ifu}");
        assert!(
            ifu.contains("iface dummy0 inet6 static\n    address 2001:db8:53::53/128\n"),
            "{ifu}"
        );
        assert!(
            ifu.contains("    post-down ip link del dev dummy0\n"),
            "{ifu}"
        );
        assert!(
            !ifu.contains("ifb0") && !all(&nd).contains("ifb0"),
            "no addresses: not carried"
        );
        assert_eq!(needed_drivers(&id), [("dummy", "dummy0")]);
    }

    /// The policy fixture (see netid's test): every stack puts the tables' routes in their
    /// tables and the rules, once, with the addressed interface.
    #[test]
    fn every_stack_carries_the_rules_and_the_routes_of_their_tables() {
        let id = crate::netid::fixture("policy").unwrap();
        let nd = all(&render(Stack::Networkd, &id));
        for want in [
            "[Route]\nGateway=10.9.1.1\nTable=100\n",
            "[Route]\nDestination=10.50.0.0/16\nGateway=10.9.0.1\nMetric=5\nTable=200\n",
            "[Route]\nGateway=fe80::1\nMetric=1024\nTable=400\n",
            "[RoutingPolicyRule]\nFirewallMark=32\nTable=200\nPriority=998\nFamily=ipv4\n",
            "[RoutingPolicyRule]\nTo=10.50.0.0/16\nFirewallMark=16\nTable=200\nPriority=999\n",
            "[RoutingPolicyRule]\nFrom=10.9.1.2/32\nTable=100\nPriority=1000\n",
            "[RoutingPolicyRule]\nFrom=10.9.3.0/24\nTable=254\nPriority=1200\n",
            "[RoutingPolicyRule]\nFrom=2001:db8:1::/64\nTable=400\nPriority=1000\n",
        ] {
            assert!(nd.contains(want), "{want:?} missing from:\n{nd}");
        }
        assert_eq!(nd.matches("[RoutingPolicyRule]").count(), 6, "{nd}");
        let np = &render(Stack::Netplan, &id)[0].contents;
        for want in [
            "        - to: \"default\"\n          via: \"10.9.1.1\"\n          table: 100\n",
            "      routing-policy:\n        - to: \"0.0.0.0/0\"\n          mark: 32\n          table: 200\n          priority: 998\n",
            "        - to: \"10.50.0.0/16\"\n          mark: 16\n          table: 200\n          priority: 999\n",
            "        - from: \"10.9.1.2/32\"\n          table: 100\n          priority: 1000\n",
            "        - from: \"2001:db8:1::/64\"\n          table: 400\n          priority: 1000\n",
        ] {
            assert!(np.contains(want), "{want:?} missing from:\n{np}");
        }
        let nm = render(Stack::NetworkManager, &id);
        let c = nm_conn(&nm, "rnic0");
        for want in [
            "route2=0.0.0.0/0,10.9.1.1\nroute2_options=table=100\n",
            "route3=10.50.0.0/16,10.9.0.1,5\nroute3_options=table=200\n",
            "routing-rule1=priority 998 fwmark 0x20 table 200\n",
            "routing-rule2=priority 999 to 10.50.0.0/16 fwmark 0x10 table 200\n",
            "routing-rule3=priority 1000 from 10.9.1.2/32 table 100\n",
            "routing-rule4=priority 1200 from 10.9.3.0/24 table 254\n",
            "[ipv6]\nmethod=manual\naddress1=2001:db8:1::2/64\nroute1=::/0,fe80::1,1024\nroute1_options=table=400\nrouting-rule1=priority 1000 from 2001:db8:1::/64 table 400\n",
        ] {
            assert!(c.contains(want), "{want:?} missing from:\n{c}");
        }
        let ifu = all(&render(Stack::Ifupdown, &id));
        for want in [
            "    up ip -4 route add default via 10.9.1.1 dev rnic0 table 100\n",
            "    up ip -4 route add 10.50.0.0/16 via 10.9.0.1 dev rnic0 metric 5 table 200\n",
            "    up ip -6 route add default via fe80::1 dev rnic0 metric 1024 table 400\n",
            "    up ip -4 rule del priority 1000 from 10.9.1.2/32 table 100 2>/dev/null; ip -4 rule add priority 1000 from 10.9.1.2/32 table 100\n",
            "    up ip -6 rule del priority 1000 from 2001:db8:1::/64 table 400 2>/dev/null; ip -6 rule add priority 1000 from 2001:db8:1::/64 table 400\n",
        ] {
            assert!(ifu.contains(want), "{want:?} missing from:\n{ifu}");
        }
        assert_eq!(ifu.matches(" rule add ").count(), 6, "{ifu}");
    }

    /// A tree whose kernel lacks bonding, or has it without a module it depends on (as a
    /// trimmed rescue image once did: `bonding: Unknown symbol tls_validate_xmit_skb`), is
    /// refused naming the driver and the file; built in or complete, it passes.
    #[test]
    fn a_tree_whose_kernel_cannot_make_the_bond_or_vlan_is_refused() {
        let d = std::env::temp_dir().join(format!("netstack-drivers-{}", std::process::id()));
        let t = d.as_path();
        let w = |p: &str, text: &str| {
            std::fs::create_dir_all(t.join(p).parent().unwrap()).unwrap();
            std::fs::write(t.join(p), text).unwrap();
        };
        let m = "usr/lib/modules/6.1.0-50-amd64";
        w("boot/vmlinuz-6.1.0-50-amd64", "");
        w(&format!("{m}/modules.dep"), "kernel/drivers/net/bonding/bonding.ko.zst: kernel/net/tls/tls.ko.zst\nkernel/net/tls/tls.ko.zst:\n");
        w(
            &format!("{m}/modules.builtin"),
            "kernel/net/8021q/8021q.ko\n",
        );
        let b = bonded();
        let e = check_drivers(&b, t).unwrap_err().to_string();
        assert!(
            e.contains("kernel/drivers/net/bonding/bonding.ko.zst") && e.contains("bond0"),
            "{e}"
        );
        w(
            &format!("{m}/kernel/drivers/net/bonding/bonding.ko.zst"),
            "",
        );
        let e = check_drivers(&b, t).unwrap_err().to_string();
        assert!(
            e.contains("kernel/net/tls/tls.ko.zst") && e.contains("bonding"),
            "{e}"
        );
        w(&format!("{m}/kernel/net/tls/tls.ko.zst"), "");
        check_drivers(&b, t).unwrap();
        // The tree's own /vmlinuz link names the kernel that boots, even an older one (whose
        // modules are not in the tree here).
        w("boot/vmlinuz-6.1.0-40-amd64", "");
        std::os::unix::fs::symlink("boot/vmlinuz-6.1.0-40-amd64", t.join("vmlinuz")).unwrap();
        let e = check_drivers(&b, t).unwrap_err().to_string();
        assert!(
            e.contains("kernel 6.1.0-40-amd64 has no modules directory"),
            "{e}"
        );
        std::fs::remove_file(t.join("vmlinuz")).unwrap();
        w(&format!("{m}/modules.builtin"), "");
        let e = check_drivers(&b, t).unwrap_err().to_string();
        assert!(
            e.contains("no 8021q driver") && e.contains("bond0.100"),
            "{e}"
        );
        std::fs::remove_dir_all(&d).unwrap();
        // Without bonds or VLANs nothing is asked of the kernel.
        check_drivers(&id(), Path::new("/nonexistent")).unwrap();
    }

    #[test]
    fn the_stack_is_chosen_by_what_the_tree_contains() {
        let d = std::env::temp_dir().join(format!("netstack-{}", std::process::id()));
        let mk = |p: &str| {
            std::fs::create_dir_all(d.join(p).parent().unwrap()).unwrap();
            std::fs::write(d.join(p), "").unwrap();
        };
        assert!(detect(&d).is_err());
        mk("usr/sbin/ifup");
        assert_eq!(detect(&d).unwrap(), Stack::Ifupdown);
        mk("lib/systemd/system/systemd-networkd.service");
        assert_eq!(detect(&d).unwrap(), Stack::Networkd);
        mk("usr/sbin/NetworkManager");
        assert_eq!(detect(&d).unwrap(), Stack::NetworkManager);
        mk("usr/sbin/netplan");
        assert_eq!(detect(&d).unwrap(), Stack::Netplan);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
