//! The network identity rendered for whichever network stack the new OS uses, chosen by what
//! its tree contains: netplan (Ubuntu), NetworkManager (keyfiles), systemd-networkd, or
//! ifupdown (`/etc/network/interfaces`). Every rendering matches interfaces by MAC address;
//! ifupdown, which only knows names, gets a systemd `.link` file that names the interface
//! by its MAC first. Pure functions: files as (path inside the tree, contents, mode).

use crate::netid::{Interface, NetIdentity, Route};
use anyhow::{bail, Result};
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

pub fn render(stack: Stack, id: &NetIdentity) -> Vec<File> {
    match stack {
        Stack::Netplan => vec![netplan(id)],
        Stack::NetworkManager => id
            .interfaces
            .iter()
            .enumerate()
            .map(|(i, n)| nm_keyfile(id, i, n))
            .collect(),
        Stack::Networkd => crate::netid::render_networkd(id)
            .into_iter()
            .map(|(name, contents)| File {
                path: format!("etc/systemd/network/{name}"),
                contents,
                mode: 0o644,
            })
            .collect(),
        Stack::Ifupdown => ifupdown(id),
    }
}

fn nic(i: usize) -> String {
    format!("rnic{i}")
}

fn static_addrs(n: &Interface, v6: bool) -> Vec<String> {
    n.addresses
        .iter()
        .filter(|a| !a.dynamic && a.address.is_ipv6() == v6)
        .map(|a| format!("{}/{}", a.address, a.prefix))
        .collect()
}

fn is_v6(r: &Route) -> bool {
    match (r.destination, r.gateway) {
        (Some((d, _)), _) => d.is_ipv6(),
        (None, Some(g)) => g.is_ipv6(),
        (None, None) => false,
    }
}

fn dest(r: &Route) -> String {
    match r.destination {
        Some((d, p)) => format!("{d}/{p}"),
        None if is_v6(r) => "::/0".into(),
        None => "0.0.0.0/0".into(),
    }
}

fn netplan(id: &NetIdentity) -> File {
    let mut s = String::from("# Written by reinstall: the network identity of this machine.\nnetwork:\n  version: 2\n  ethernets:\n");
    for (i, n) in id.interfaces.iter().enumerate() {
        let _ = writeln!(
            s,
            "    {}:\n      match:\n        macaddress: \"{}\"",
            nic(i),
            n.mac
        );
        let _ = writeln!(s, "      mtu: {}", n.mtu);
        let _ = writeln!(
            s,
            "      dhcp4: {}\n      dhcp6: {}",
            n.has(true, false),
            n.has(true, true)
        );
        let _ = writeln!(s, "      accept-ra: {}", static_addrs(n, true).is_empty());
        let addrs: Vec<String> = [static_addrs(n, false), static_addrs(n, true)].concat();
        if !addrs.is_empty() {
            let _ = writeln!(
                s,
                "      addresses: [{}]",
                addrs
                    .iter()
                    .map(|a| format!("\"{a}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
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
            }
        }
        if i == 0 && (!id.dns.servers.is_empty() || !id.dns.search.is_empty()) {
            let _ = writeln!(s, "      nameservers:");
            let _ = writeln!(
                s,
                "        addresses: [{}]",
                id.dns
                    .servers
                    .iter()
                    .map(|d| format!("\"{d}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let _ = writeln!(
                s,
                "        search: [{}]",
                id.dns
                    .search
                    .iter()
                    .map(|d| format!("\"{d}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    File {
        path: "etc/netplan/60-reinstall.yaml".into(),
        contents: s,
        // netplan warns about (and newer versions refuse) world-readable configs.
        mode: 0o600,
    }
}

fn nm_keyfile(id: &NetIdentity, i: usize, n: &Interface) -> File {
    let mut s = String::new();
    let name = format!("reinstall-{}", nic(i));
    let _ = writeln!(
        s,
        "[connection]\nid={name}\ntype=ethernet\nautoconnect=true\n"
    );
    let _ = writeln!(
        s,
        "[ethernet]\nmac-address={}\nmtu={}\n",
        n.mac.to_uppercase(),
        n.mtu
    );
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
            if r.onlink {
                let _ = writeln!(s, "route{}_options=onlink=true", k + 1);
            }
        }
        if i == 0 {
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
    File {
        path: format!("etc/NetworkManager/system-connections/{name}.nmconnection"),
        contents: s,
        // NetworkManager ignores keyfiles readable by others.
        mode: 0o600,
    }
}

fn ifupdown(id: &NetIdentity) -> Vec<File> {
    let mut files = Vec::new();
    let mut s = String::from("# Written by reinstall: the network identity of this machine.\n");
    for (i, n) in id.interfaces.iter().enumerate() {
        let name = nic(i);
        // ifupdown knows interfaces by name only: name this one by its MAC first.
        files.push(File {
            path: format!("etc/systemd/network/10-reinstall-{name}.link"),
            contents: format!("[Match]\nMACAddress={}\n\n[Link]\nName={name}\n", n.mac),
            mode: 0o644,
        });
        let _ = writeln!(s, "\nauto {name}");
        for v6 in [false, true] {
            let fam = if v6 { "inet6" } else { "inet" };
            let addrs = static_addrs(n, v6);
            if addrs.is_empty() {
                if n.has(true, v6) {
                    let _ = writeln!(s, "iface {name} {fam} {}", if v6 { "auto" } else { "dhcp" });
                }
                continue;
            }
            let _ = writeln!(s, "iface {name} {fam} static");
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
                let _ = writeln!(s, "{cmd}");
            }
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
            .contains("MACAddress=52:54:00:aa:bb:01\n\n[Link]\nName=rnic")));
        let ifaces = &f
            .iter()
            .find(|f| f.path.ends_with("60-reinstall"))
            .unwrap()
            .contents;
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
