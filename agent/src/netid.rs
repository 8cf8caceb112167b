//! The machine's network identity: what it needs to be reachable at the same address after a
//! reinstall. Captured from `ip -d -j addr`, `ip -j route` (IPv4 and IPv6) and resolv.conf,
//! parsed once into validated types, and rendered for the next OS as systemd-networkd files
//! matched by MAC address (names like `eth0` may change between kernels; MACs do not).
//!
//! Carried: every Ethernet interface with a MAC, its MTU, every global IPv4/IPv6 address with
//! its prefix (/32 and /128 included), every route that is not the kernel's own (default
//! routes whose gateway lies outside the subnet keep `onlink`; IPv6 link-local gateways are
//! kept as such), DNS servers and search domains, the hostname.
//! Not carried: loopback, link-local IPv6 addresses (the kernel makes them from the MAC).
//! Refused, naming the interface: VLANs and bonds (`ip` shows them; rendering their netdevs
//! is not built yet, and a machine that comes back without its bond is unreachable), and
//! interfaces with addresses but no MAC.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::net::IpAddr;

pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetIdentity {
    pub format: u32,
    pub hostname: String,
    pub interfaces: Vec<Interface>,
    pub dns: Dns,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// Name on the machine it was captured from (informational; matching is by MAC).
    pub name: String,
    pub mac: String,
    pub mtu: u32,
    pub addresses: Vec<Address>,
    pub routes: Vec<Route>,
}

impl Interface {
    /// Whether the interface has an address of this family (`v6`) that was leased
    /// (`dynamic`) or configured: what decides DHCP and router advertisements in every
    /// renderer.
    pub fn has(&self, dynamic: bool, v6: bool) -> bool {
        self.addresses
            .iter()
            .any(|a| a.dynamic == dynamic && a.address.is_ipv6() == v6)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    pub address: IpAddr,
    pub prefix: u8,
    /// Leased by DHCP/SLAAC rather than configured.
    pub dynamic: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// `None`: the default route.
    pub destination: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    /// The gateway is reachable on the link although it is outside every subnet.
    pub onlink: bool,
    pub metric: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    pub servers: Vec<IpAddr>,
    pub search: Vec<String>,
}

// The parts of `ip -j` output we read; everything else is ignored.
#[derive(Deserialize)]
struct IpLink {
    ifname: String,
    #[serde(default)]
    mtu: u32,
    #[serde(default)]
    link_type: String,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    linkinfo: Option<LinkInfo>,
    #[serde(default)]
    master: Option<String>,
    #[serde(default)]
    addr_info: Vec<IpAddrInfo>,
}

#[derive(Deserialize)]
struct LinkInfo {
    #[serde(default)]
    info_kind: Option<String>,
}

#[derive(Deserialize)]
struct IpAddrInfo {
    family: String,
    local: IpAddr,
    prefixlen: u8,
    #[serde(default)]
    scope: String,
    #[serde(default)]
    dynamic: bool,
}

#[derive(Deserialize)]
struct IpRoute {
    dst: String,
    #[serde(default)]
    gateway: Option<IpAddr>,
    #[serde(default)]
    dev: Option<String>,
    #[serde(default)]
    flags: Vec<String>,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    metric: Option<u32>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

/// Builds the identity from the text of `ip -d -j addr show`, `ip -j -4 route show table
/// main`, `ip -j -6 route show table main`, resolv.conf and the hostname.
pub fn parse(
    addr_json: &str,
    route4_json: &str,
    route6_json: &str,
    resolv: &str,
    hostname: &str,
) -> Result<NetIdentity> {
    let links: Vec<IpLink> =
        serde_json::from_str(addr_json).context("parsing `ip -j addr` output")?;
    let mut routes: Vec<IpRoute> =
        serde_json::from_str(route4_json).context("parsing `ip -j -4 route` output")?;
    routes.extend(
        serde_json::from_str::<Vec<IpRoute>>(route6_json)
            .context("parsing `ip -j -6 route` output")?,
    );
    let mut interfaces = Vec::new();
    for l in &links {
        if l.link_type == "loopback" {
            continue;
        }
        let globals: Vec<&IpAddrInfo> = l
            .addr_info
            .iter()
            .filter(|a| a.scope != "link" && a.scope != "host")
            .collect();
        let kind = l.linkinfo.as_ref().and_then(|i| i.info_kind.as_deref());
        if let Some(k @ ("vlan" | "bond" | "bridge" | "team" | "macvlan")) = kind {
            bail!(
                "interface {} is a {k}: carrying {k} interfaces is not supported yet, and the machine would \
                 come back unreachable without it; reinstall it by other means",
                l.ifname
            );
        }
        if l.master.is_some() && globals.is_empty() {
            continue; // a member of something refused above
        }
        let Some(mac) = l
            .address
            .clone()
            .filter(|m| m.len() == 17 && m != "00:00:00:00:00:00")
        else {
            if globals.is_empty() {
                continue;
            }
            bail!(
                "interface {} has addresses but no MAC address to match it by",
                l.ifname
            );
        };
        let addresses = globals
            .iter()
            .map(|a| {
                let ok = matches!(
                    (a.family.as_str(), a.local),
                    ("inet", IpAddr::V4(_)) | ("inet6", IpAddr::V6(_))
                );
                anyhow::ensure!(
                    ok,
                    "interface {}: address {} is not of family {}",
                    l.ifname,
                    a.local,
                    a.family
                );
                Ok(Address {
                    address: a.local,
                    prefix: a.prefixlen,
                    dynamic: a.dynamic,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut rts = Vec::new();
        for r in routes
            .iter()
            .filter(|r| r.dev.as_deref() == Some(l.ifname.as_str()))
        {
            // The kernel's own routes (subnet and link-local prefixes) come back by themselves;
            // RA-learned ones come back with IPv6AcceptRA.
            if matches!(r.protocol.as_deref(), Some("kernel" | "ra")) {
                continue;
            }
            if r.kind.as_deref().is_some_and(|k| k != "unicast") {
                continue;
            }
            rts.push(Route {
                destination: parse_dst(&r.dst)
                    .with_context(|| format!("interface {}: route {:?}", l.ifname, r.dst))?,
                gateway: r.gateway,
                onlink: r.flags.iter().any(|f| f == "onlink"),
                metric: r.metric,
            });
        }
        if addresses.is_empty() && rts.is_empty() {
            continue;
        }
        interfaces.push(Interface {
            name: l.ifname.clone(),
            mac: mac.to_lowercase(),
            mtu: l.mtu,
            addresses,
            routes: rts,
        });
    }
    if interfaces.is_empty() {
        bail!(
            "no interface with an address to carry over: the machine would come back unreachable"
        );
    }
    interfaces.sort_by(|a, b| a.mac.cmp(&b.mac));
    let hostname = hostname.trim().to_string();
    anyhow::ensure!(!hostname.is_empty(), "the hostname is empty");
    Ok(NetIdentity {
        format: FORMAT,
        hostname,
        interfaces,
        dns: parse_resolv(resolv),
    })
}

fn parse_dst(dst: &str) -> Result<Option<(IpAddr, u8)>> {
    if dst == "default" {
        return Ok(None);
    }
    let (a, p) = match dst.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (dst, None),
    };
    let addr: IpAddr = a.parse().context("not an address")?;
    let prefix = match p {
        Some(p) => p.parse().context("bad prefix length")?,
        None if addr.is_ipv4() => 32,
        None => 128,
    };
    Ok(Some((addr, prefix)))
}

/// `nameserver` and `search`/`domain` lines. The local stub of systemd-resolved (127.0.0.53)
/// is not an upstream: callers pass `/run/systemd/resolve/resolv.conf` when it exists.
pub fn parse_resolv(text: &str) -> Dns {
    let mut dns = Dns::default();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        match w.next() {
            Some("nameserver") => {
                if let Some(Ok(ip)) = w.next().map(str::parse::<IpAddr>) {
                    if !ip.is_loopback() && !dns.servers.contains(&ip) {
                        dns.servers.push(ip);
                    }
                }
            }
            Some("search") | Some("domain") => {
                for d in w {
                    if !dns.search.iter().any(|s| s == d) {
                        dns.search.push(d.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    dns
}

/// Captures the running system's identity (runs `ip`).
pub fn capture() -> Result<NetIdentity> {
    let ip = |args: &[&str]| -> Result<String> {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .with_context(|| format!("running ip {}", args.join(" ")))?;
        anyhow::ensure!(
            out.status.success(),
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    };
    let resolv = ["/run/systemd/resolve/resolv.conf", "/etc/resolv.conf"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    let hostname = std::fs::read_to_string("/etc/hostname")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(kernel_hostname)
        .unwrap_or_default();
    parse(
        &ip(&["-d", "-j", "addr", "show"])?,
        &ip(&["-j", "-4", "route", "show", "table", "main"])?,
        &ip(&["-j", "-6", "route", "show", "table", "main"])?,
        &resolv,
        &hostname,
    )
}

fn kernel_hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname").ok()
}

/// systemd-networkd files for the next OS: `(file name, contents)`, one `.network` per
/// interface, matched by MAC.
pub fn render_networkd(id: &NetIdentity) -> Vec<(String, String)> {
    id.interfaces
        .iter()
        .enumerate()
        .map(|(i, iface)| {
            let mut s = String::new();
            let _ = writeln!(
                s,
                "# Written by reinstall: the network identity of {} ({}).",
                id.hostname, iface.name
            );
            let _ = writeln!(s, "[Match]\nMACAddress={}\n", iface.mac);
            let _ = writeln!(s, "[Link]\nMTUBytes={}\n", iface.mtu);
            let _ = writeln!(s, "[Network]");
            let v6_static = iface.has(false, true);
            let dhcp = match (iface.has(true, false), iface.has(true, true)) {
                (true, true) => "yes",
                (true, false) => "ipv4",
                (false, true) => "ipv6",
                (false, false) => "no",
            };
            let _ = writeln!(s, "DHCP={dhcp}");
            // A static IPv6 address means the operator configured it: do not let router
            // advertisements add or change addresses and routes.
            let _ = writeln!(s, "IPv6AcceptRA={}", if v6_static { "no" } else { "yes" });
            for a in iface.addresses.iter().filter(|a| !a.dynamic) {
                let _ = writeln!(s, "Address={}/{}", a.address, a.prefix);
            }
            if i == 0 {
                for d in &id.dns.servers {
                    let _ = writeln!(s, "DNS={d}");
                }
                if !id.dns.search.is_empty() {
                    let _ = writeln!(s, "Domains={}", id.dns.search.join(" "));
                }
            }
            for r in &iface.routes {
                let _ = writeln!(s, "\n[Route]");
                if let Some((d, p)) = r.destination {
                    let _ = writeln!(s, "Destination={d}/{p}");
                }
                match r.gateway {
                    Some(g) => {
                        let _ = writeln!(s, "Gateway={g}");
                    }
                    None => {
                        let _ = writeln!(s, "Scope=link");
                    }
                }
                if r.onlink {
                    let _ = writeln!(s, "GatewayOnLink=yes");
                }
                if let Some(m) = r.metric {
                    let _ = writeln!(s, "Metric={m}");
                }
            }
            (
                format!("10-reinstall-{}.network", iface.mac.replace(':', "")),
                s,
            )
        })
        .collect()
}

/// Parses the captured fixture `agent/tests/fixtures/net/NAME` (for this module's and the
/// renderers' tests).
#[cfg(test)]
pub(crate) fn fixture(name: &str) -> Result<NetIdentity> {
    let d = format!("{}/tests/fixtures/net/{name}", env!("CARGO_MANIFEST_DIR"));
    let r = |f: &str| std::fs::read_to_string(format!("{d}/{f}")).unwrap();
    parse(
        &r("addr.json"),
        &r("route4.json"),
        &r("route6.json"),
        &r("resolv.conf"),
        &r("hostname"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured with `ip` from a network namespace: veth0 holds 203.0.113.10/32 with a default
    /// route via 198.51.100.1 `onlink` and MTU 9000; veth1 is IPv6-only, 2001:db8::10/128 with
    /// a link-local default gateway fe80::1.
    #[test]
    fn a_32_with_onlink_gateway_and_an_ipv6_only_nic_are_captured() {
        let id = fixture("two-nics").unwrap();
        assert_eq!(id.hostname, "web1");
        assert_eq!(id.interfaces.len(), 2);
        let v4 = id.interfaces.iter().find(|i| i.name == "veth0").unwrap();
        assert_eq!(v4.mac, "52:54:00:aa:bb:01");
        assert_eq!(v4.mtu, 9000);
        assert_eq!(
            v4.addresses,
            [Address {
                address: "203.0.113.10".parse().unwrap(),
                prefix: 32,
                dynamic: false
            }]
        );
        let default = v4.routes.iter().find(|r| r.destination.is_none()).unwrap();
        assert_eq!(default.gateway, Some("198.51.100.1".parse().unwrap()));
        assert!(default.onlink);
        assert!(v4.routes.iter().any(|r| r.destination
            == Some(("198.51.100.1".parse().unwrap(), 32))
            && r.gateway.is_none()));
        let v6 = id.interfaces.iter().find(|i| i.name == "veth1").unwrap();
        assert_eq!(
            v6.addresses.len(),
            1,
            "link-local addresses are not carried"
        );
        assert_eq!(v6.addresses[0].prefix, 128);
        let gw6 = v6.routes.iter().find(|r| r.destination.is_none()).unwrap();
        assert_eq!(gw6.gateway, Some("fe80::1".parse().unwrap()));
        assert!(
            v6.routes.iter().all(|r| r.destination.is_none()),
            "kernel routes are not carried: {:?}",
            v6.routes
        );
        assert_eq!(id.dns.servers.len(), 2);
        assert_eq!(id.dns.search, ["example.net", "corp.example"]);
    }

    #[test]
    fn networkd_files_match_by_mac_and_keep_onlink_and_link_local_gateways() {
        let id = fixture("two-nics").unwrap();
        let files = render_networkd(&id);
        assert_eq!(files.len(), 2);
        let v4 = &files
            .iter()
            .find(|(n, _)| n.contains("525400aabb01"))
            .unwrap()
            .1;
        for want in [
            "MACAddress=52:54:00:aa:bb:01",
            "MTUBytes=9000",
            "Address=203.0.113.10/32",
            "Gateway=198.51.100.1\nGatewayOnLink=yes",
            "Destination=198.51.100.1/32\nScope=link",
            "DHCP=no",
        ] {
            assert!(v4.contains(want), "{want:?} missing from:\n{v4}");
        }
        let v6 = &files
            .iter()
            .find(|(n, _)| n.contains("525400aabb02"))
            .unwrap()
            .1;
        for want in [
            "Address=2001:db8::10/128",
            "Gateway=fe80::1",
            "IPv6AcceptRA=no",
        ] {
            assert!(v6.contains(want), "{want:?} missing from:\n{v6}");
        }
    }

    /// Leased addresses (DHCP, SLAAC) are not written as static ones: each renderer turns on
    /// the leasing for that family only. veth0 leases IPv4, veth1 leases IPv6.
    #[test]
    fn leased_addresses_turn_on_dhcp_for_their_family_in_every_renderer() {
        use crate::netstack::{render, Stack};
        let mut id = fixture("two-nics").unwrap();
        for i in &mut id.interfaces {
            i.addresses.iter_mut().for_each(|a| a.dynamic = true);
        }
        let (v4, v6) = (
            id.interfaces
                .iter()
                .position(|i| i.name == "veth0")
                .unwrap(),
            id.interfaces
                .iter()
                .position(|i| i.name == "veth1")
                .unwrap(),
        );
        assert!(id.interfaces[v4].has(true, false) && !id.interfaces[v4].has(true, true));
        assert!(id.interfaces[v6].has(true, true) && !id.interfaces[v6].has(false, true));
        let networkd = render_networkd(&id);
        let file = |mac: &str| &networkd.iter().find(|(n, _)| n.contains(mac)).unwrap().1;
        let (a, b) = (file("525400aabb01"), file("525400aabb02"));
        assert!(a.contains("DHCP=ipv4\nIPv6AcceptRA=yes"), "{a}");
        assert!(b.contains("DHCP=ipv6\nIPv6AcceptRA=yes"), "{b}");
        assert!(
            !a.contains("\nAddress=") && !b.contains("\nAddress="),
            "{a}{b}"
        );
        let text = |s: Stack| {
            render(s, &id)
                .into_iter()
                .map(|f| f.contents)
                .collect::<Vec<_>>()
                .join("\n")
        };
        let netplan = text(Stack::Netplan);
        for want in [
            format!("rnic{v4}:\n      match:\n        macaddress: \"52:54:00:aa:bb:01\"\n      mtu: 9000\n      dhcp4: true\n      dhcp6: false"),
            format!("rnic{v6}:"),
            "dhcp4: false\n      dhcp6: true\n      accept-ra: true".into(),
        ] {
            assert!(netplan.contains(&want), "{want:?} missing from:\n{netplan}");
        }
        assert!(
            !netplan.contains("203.0.113.10") && !netplan.contains("2001:db8::10/"),
            "{netplan}"
        );
        let nm = text(Stack::NetworkManager);
        assert!(
            nm.contains("[ipv4]\nmethod=auto") && nm.contains("[ipv6]\nmethod=auto"),
            "{nm}"
        );
        assert!(!nm.contains("method=manual"), "{nm}");
        let ifupdown = text(Stack::Ifupdown);
        for want in [
            format!("iface rnic{v4} inet dhcp"),
            format!("iface rnic{v6} inet6 auto"),
        ] {
            assert!(
                ifupdown.contains(&want),
                "{want:?} missing from:\n{ifupdown}"
            );
        }
        assert!(!ifupdown.contains(" static"), "{ifupdown}");
        let x = crate::windows::render_unattend(&id, "pw").unwrap();
        for (mac, dhcp4, dhcp6) in [
            ("52-54-00-AA-BB-01", true, false),
            ("52-54-00-AA-BB-02", false, true),
        ] {
            let want = format!("<Identifier>{mac}</Identifier>\n          <Ipv4Settings>\n            <DhcpEnabled>{dhcp4}</DhcpEnabled>\n          </Ipv4Settings>\n          <Ipv6Settings>\n            <DhcpEnabled>{dhcp6}</DhcpEnabled>\n            <RouterDiscoveryEnabled>true</RouterDiscoveryEnabled>");
            assert!(x.contains(&want), "{want:?} missing from:\n{x}");
        }
        assert!(
            !x.contains("203.0.113.10") && !x.contains("2001:db8::10/"),
            "{x}"
        );
    }

    #[test]
    fn vlans_and_bonds_are_refused_by_name() {
        let e = fixture("vlan-bond").unwrap_err().to_string();
        assert!(e.contains("bond0") && e.contains("bond"), "{e}");
    }

    #[test]
    fn resolv_conf_skips_the_local_stub_and_duplicates() {
        let d = parse_resolv("nameserver 127.0.0.53\nnameserver 10.0.0.1\nnameserver 10.0.0.1\nsearch a b\ndomain a\n");
        assert_eq!(d.servers, ["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(d.search, ["a", "b"]);
    }

    #[test]
    fn a_machine_without_addresses_is_refused() {
        let e = parse("[]", "[]", "[]", "", "h").unwrap_err();
        assert!(e.to_string().contains("unreachable"));
    }
}
