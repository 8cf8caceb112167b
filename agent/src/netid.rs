//! The machine's network identity: what it needs to be reachable at the same address after a
//! reinstall. Captured from `ip -d -j addr`, `ip -j route` (IPv4 and IPv6) and resolv.conf,
//! parsed once into validated types, and rendered for the next OS as systemd-networkd files
//! matched by MAC address (names like `eth0` may change between kernels; MACs do not).
//!
//! Carried: every Ethernet interface with a MAC, its MTU, every global IPv4/IPv6 address with
//! its prefix (/32 and /128 included), every route that is not the kernel's own (default
//! routes whose gateway lies outside the subnet keep `onlink`; IPv6 link-local gateways are
//! kept as such), DNS servers and search domains, the hostname.
//! Bonds and 802.1Q VLANs (on an Ethernet interface or on a bond) are carried too: a bond
//! with its mode, its members (known by their permanent MACs, since enslaved NICs wear the
//! bond's), its primary, MII monitor, up/down delays, LACP rate and transmit hash policy, its
//! ARP monitor (interval, IPv4 targets, validation, all-targets rule), and the MAC it wears; a VLAN with its id, its parent (an Ethernet interface, a bond or a bridge) and its MAC; a bridge with its ports
//! (Ethernet interfaces, bonds or VLANs), its MAC, STP and forward delay. The interfaces they
//! sit on are carried even without addresses of their own. Dummy interfaces (the home of
//! anycast, service and BGP loopback addresses) are carried by name with their addresses and
//! routes: matched by MAC, as a NIC is, they would match nothing in the next OS (a dummy's MAC
//! is made up each boot) and their addresses would be silently lost.
//! Policy routing is carried: every `ip rule` made of `from`, `to`, an unmasked `fwmark` and
//! `lookup` of main or of a numbered table with a route through a carried interface, and the
//! routes of those tables ([`Route::table`]); other rules are left behind by name.
//! Not carried: loopback, link-local IPv6 addresses (the kernel makes them from the MAC).
//! Left behind and listed in [`NetIdentity::left_behind`] (the software that made them makes
//! them again in an OS that runs it): interfaces of containers, VMs and tunnels (tun/tap,
//! WireGuard, VXLAN, IP tunnels, a veth whose peer is in another namespace), mobile modems'
//! and PPP links (point-to-point, no MAC: dialled by a modem manager or pppd), and bridges with
//! no port out of the machine (Docker's `docker0`, libvirt's `virbr0`), unless the default
//! route goes through one: then the machine is refused, since it would come back without its
//! way out.
//! Refused, naming the interface: teams, macvlans and other virtual links, bonds that
//! monitor by IPv6 neighbour solicitations or by ARP without targets, 802.1ad (QinQ) VLANs,
//! VLANs on VLANs, VLAN-filtering bridges,
//! interfaces with addresses but no MAC, and any link with addresses of a kind not named here
//! (a VRF's members, Open vSwitch ports, MACsec, ...) or enslaved to something that is not a
//! bond or a bridge: carried as a NIC they would match nothing, and the machine could come back
//! without its address. Links of other kinds without addresses are not carried (nothing of the
//! machine's is on them).

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
    /// Interfaces with addresses, and routing policy rules, that are not carried, and why
    /// (see the module's text).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_behind: Vec<LeftBehind>,
    /// Routing policy rules (`ip rule`) beyond the kernel's three, whose tables' routes are
    /// carried (as [`Route::table`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
}

/// A routing policy rule: traffic it selects looks up `table` (by number: 254 is `main`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub priority: u32,
    pub v6: bool,
    /// Source prefix (`None`: from all).
    pub from: Option<(IpAddr, u8)>,
    /// Destination prefix (`None`: to all).
    pub to: Option<(IpAddr, u8)>,
    /// Firewall mark (without a mask: a masked mark is not carried).
    pub fwmark: Option<u32>,
    pub table: u32,
}

impl Rule {
    /// As `ip rule` writes it: `pref 1000 from 10.0.0.5/32 lookup 100`.
    pub fn describe(&self) -> String {
        self.words("pref", "lookup")
    }

    /// The rule with the words chosen for its priority and its table: `ip rule add` takes
    /// either of iproute2's (`pref`/`priority`, `lookup`/`table`), NetworkManager's
    /// `routing-rule` `priority` and `table`.
    pub fn words(&self, pref: &str, lookup: &str) -> String {
        let mut s = format!("{pref} {}", self.priority);
        if let Some((a, p)) = self.from {
            let _ = write!(s, " from {a}/{p}");
        }
        if let Some((a, p)) = self.to {
            let _ = write!(s, " to {a}/{p}");
        }
        if let Some(m) = self.fwmark {
            let _ = write!(s, " fwmark {m:#x}");
        }
        let _ = write!(s, " {lookup} {}", self.table);
        s
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeftBehind {
    pub name: String,
    pub why: String,
}

impl NetIdentity {
    /// The bond `name` is enslaved to.
    pub fn bond_of(&self, name: &str) -> Option<(&Interface, &Bond)> {
        self.interfaces.iter().find_map(|i| match &i.kind {
            Kind::Bond(b) if b.members.iter().any(|m| m == name) => Some((i, b)),
            _ => None,
        })
    }

    /// The bridge `name` is a port of.
    pub fn bridge_of(&self, name: &str) -> Option<&Interface> {
        self.interfaces
            .iter()
            .find(|i| matches!(&i.kind, Kind::Bridge(b) if b.ports.iter().any(|p| p == name)))
    }

    /// The bond or bridge that enslaves `name`: such an interface has no addresses of its
    /// own, and an Ethernet one is named by its MAC so that its master can name it.
    pub fn master_of(&self, name: &str) -> Option<&Interface> {
        self.bond_of(name)
            .map(|(i, _)| i)
            .or_else(|| self.bridge_of(name))
    }

    /// The VLANs that sit on `name`.
    pub fn vlans_on<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Interface> + 'a {
        self.interfaces
            .iter()
            .filter(move |i| matches!(&i.kind, Kind::Vlan { parent, .. } if parent == name))
    }

    /// The index of the interface that carries the DNS settings: the first with an address
    /// (a bond member, a bridge port or a bare VLAN parent carries none).
    pub fn dns_index(&self) -> usize {
        self.interfaces
            .iter()
            .position(|i| !i.addresses.is_empty())
            .unwrap_or(0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// Name on the machine it was captured from (informational; matching is by MAC).
    pub name: String,
    pub mac: String,
    pub mtu: u32,
    /// What the interface is (absent in identities captured before bonds and VLANs were
    /// carried: Ethernet).
    #[serde(default)]
    pub kind: Kind,
    pub addresses: Vec<Address>,
    pub routes: Vec<Route>,
}

/// What an interface is. An Ethernet interface is matched by its (permanent) MAC; a bond,
/// VLAN or bridge is created by the next OS under its captured name, wearing its captured MAC.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Kind {
    #[default]
    Ethernet,
    Bond(Bond),
    Vlan {
        id: u16,
        /// The name (in this identity) of the interface it sits on.
        parent: String,
    },
    Bridge(Bridge),
    /// A dummy interface: created by the next OS under its captured name.
    Dummy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bridge {
    /// Names (in this identity) of its ports that lead out of the machine: Ethernet
    /// interfaces, bonds or VLANs (the ports of containers and VMs are not carried).
    pub ports: Vec<String>,
    /// Spanning tree on.
    pub stp: bool,
    /// Seconds a port listens and learns before it forwards (with STP; the kernel's default
    /// is 15).
    pub forward_delay_s: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bond {
    /// The kernel's name of the mode: `balance-rr`, `active-backup`, `balance-xor`,
    /// `broadcast`, `802.3ad`, `balance-tlb`, `balance-alb`.
    pub mode: String,
    /// Names (in this identity) of the Ethernet interfaces enslaved to it.
    pub members: Vec<String>,
    /// The member preferred while it is up.
    pub primary: Option<String>,
    pub miimon_ms: u32,
    pub updelay_ms: u32,
    pub downdelay_ms: u32,
    /// `slow` or `fast` (802.3ad only).
    pub lacp_rate: Option<String>,
    /// `layer2`, `layer3+4`, ... (the modes that hash).
    pub xmit_hash_policy: Option<String>,
    /// ARP monitoring, instead of MII: every `arp_interval_ms` the bond sends ARP requests
    /// to `arp_ip_targets` and counts a link up while answers (or, per `arp_validate`, the
    /// requests) come back through it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub arp_interval_ms: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arp_ip_targets: Vec<std::net::Ipv4Addr>,
    /// `active`, `backup`, `all`, `filter`, `filter_active`, `filter_backup` (unset: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arp_validate: Option<String>,
    /// `all`: a link is up only while every target answers (unset: any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arp_all_targets: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Bond {
    /// The options set away from the driver's defaults (0 or unset), under the bonding
    /// driver's own names, in one order: what `ip link add ... type bond` and
    /// NetworkManager's `[bond]` section both take.
    pub fn driver_options(&self) -> Vec<(&'static str, String)> {
        let mut o: Vec<(&'static str, String)> = [
            ("miimon", self.miimon_ms),
            ("updelay", self.updelay_ms),
            ("downdelay", self.downdelay_ms),
        ]
        .into_iter()
        .filter(|&(_, v)| v > 0)
        .map(|(k, v)| (k, v.to_string()))
        .collect();
        if let Some(r) = &self.lacp_rate {
            o.push(("lacp_rate", r.clone()));
        }
        if let Some(h) = &self.xmit_hash_policy {
            o.push(("xmit_hash_policy", h.clone()));
        }
        if self.arp_interval_ms > 0 {
            o.push(("arp_interval", self.arp_interval_ms.to_string()));
            o.push(("arp_ip_target", self.arp_targets(",")));
        }
        if let Some(v) = &self.arp_validate {
            o.push(("arp_validate", v.clone()));
        }
        if let Some(a) = &self.arp_all_targets {
            o.push(("arp_all_targets", a.clone()));
        }
        o
    }

    /// The ARP targets joined by `sep`.
    pub fn arp_targets(&self, sep: &str) -> String {
        let t: Vec<String> = self.arp_ip_targets.iter().map(|a| a.to_string()).collect();
        t.join(sep)
    }
}

impl Interface {
    pub fn is_ethernet(&self) -> bool {
        self.kind == Kind::Ethernet
    }

    /// The interfaces this one sits on (a bond's members, a VLAN's parent, a bridge's
    /// ports), and what each is to it.
    pub fn lowers(&self) -> (Vec<&String>, &'static str) {
        match &self.kind {
            Kind::Ethernet | Kind::Dummy => (Vec::new(), ""),
            Kind::Bond(b) => (b.members.iter().collect(), "member"),
            Kind::Vlan { parent, .. } => (vec![parent], "parent"),
            Kind::Bridge(b) => (b.ports.iter().collect(), "port"),
        }
    }

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
    /// The routing table (`None`: main), looked up by [`NetIdentity::rules`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
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
    /// The lower device of a VLAN (for a veth: its peer).
    #[serde(default)]
    link: Option<String>,
    /// Set when the peer (of a veth) or lower device is in another network namespace.
    #[serde(default)]
    link_netnsid: Option<serde_json::Value>,
    /// Set when the current MAC is not the permanent one.
    #[serde(default)]
    permaddr: Option<String>,
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
    #[serde(default)]
    info_data: Option<serde_json::Value>,
    #[serde(default)]
    info_slave_kind: Option<String>,
    #[serde(default)]
    info_slave_data: Option<serde_json::Value>,
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

/// One line of `ip -j -N rule show`; selectors and actions not named here land in `rest`.
#[derive(Deserialize)]
struct IpRule {
    priority: u32,
    #[serde(default)]
    src: Option<String>,
    #[serde(default)]
    srclen: Option<u8>,
    #[serde(default)]
    dst: Option<String>,
    #[serde(default)]
    dstlen: Option<u8>,
    #[serde(default)]
    fwmark: Option<String>,
    #[serde(default)]
    table: Option<String>,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

/// The kernel's own table numbers.
const TABLE_DEFAULT: u32 = 253;
const TABLE_MAIN: u32 = 254;
const TABLE_LOCAL: u32 = 255;

fn table_number(t: &str) -> Option<u32> {
    match t {
        "local" => Some(TABLE_LOCAL),
        "main" => Some(TABLE_MAIN),
        "default" => Some(TABLE_DEFAULT),
        _ => t.parse().ok(),
    }
}

/// A rule as captured: carried, given the tables whose routes are carried, or why not.
enum RuleOf {
    /// One of the kernel's three (local, main, default): made by every kernel.
    Kernels,
    Carried(Rule),
    NotCarried(String),
}

fn rule_of(r: &IpRule, v6: bool) -> Result<RuleOf> {
    let table = r.table.as_deref().and_then(table_number);
    let prefix = |a: &Option<String>, len: Option<u8>| -> Result<Option<(IpAddr, u8)>> {
        match a.as_deref() {
            None | Some("all") => Ok(None),
            Some(a) => {
                let ip: IpAddr = a
                    .parse()
                    .with_context(|| format!("rule {}: address {a:?}", r.priority))?;
                Ok(Some((
                    ip,
                    len.unwrap_or(if ip.is_ipv6() { 128 } else { 32 }),
                )))
            }
        }
    };
    let (from, to) = (prefix(&r.src, r.srclen)?, prefix(&r.dst, r.dstlen)?);
    let fwmark = match r.fwmark.as_deref() {
        None => None,
        Some(m) => Some(
            u32::from_str_radix(m.trim_start_matches("0x"), 16)
                .with_context(|| format!("rule {}: fwmark {m:?}", r.priority))?,
        ),
    };
    // Who made the rule (`proto static` for networkd's and NetworkManager's) changes nothing.
    let mut rest: Vec<&str> = r
        .rest
        .keys()
        .map(String::as_str)
        .filter(|k| *k != "protocol")
        .collect();
    let plain = from.is_none() && to.is_none() && fwmark.is_none() && rest.is_empty();
    if plain
        && matches!(
            (r.priority, table),
            (0, Some(TABLE_LOCAL)) | (32766, Some(TABLE_MAIN)) | (32767, Some(TABLE_DEFAULT))
        )
    {
        return Ok(RuleOf::Kernels);
    }
    if !rest.is_empty() {
        rest.sort();
        return Ok(RuleOf::NotCarried(format!(
            "a routing policy rule with {} (only from, to, an unmasked fwmark and lookup are carried)",
            rest.join(", ")
        )));
    }
    let Some(table) = table.filter(|&t| t != TABLE_LOCAL && t != TABLE_DEFAULT) else {
        return Ok(RuleOf::NotCarried(format!(
            "a routing policy rule that looks up table {} (only main and numbered tables are carried)",
            r.table.as_deref().unwrap_or("none")
        )));
    };
    Ok(RuleOf::Carried(Rule {
        priority: r.priority,
        v6,
        from,
        to,
        fwmark,
        table,
    }))
}

/// The numbered tables (not main, local or default) the rules in the text of `ip -j -N rule
/// show` look up: the tables whose routes `capture` reads.
pub fn rule_tables(rules_json: &str) -> Result<Vec<u32>> {
    let rules: Vec<IpRule> =
        serde_json::from_str(rules_json).context("parsing `ip -j -N rule` output")?;
    let mut t: Vec<u32> = rules
        .iter()
        .filter_map(|r| r.table.as_deref().and_then(table_number))
        .filter(|&t| t != TABLE_LOCAL && t != TABLE_MAIN && t != TABLE_DEFAULT)
        .collect();
    t.sort_unstable();
    t.dedup();
    Ok(t)
}

/// Routing policy as captured: the text of `ip -j -N -4 rule show` and of `-6`, and of
/// `ip -j -4|-6 route show table T` for each table in [`rule_tables`] (`(table, v6, text)`).
#[derive(Default)]
pub struct PolicyText<'a> {
    pub rules4: &'a str,
    pub rules6: &'a str,
    pub tables: Vec<(u32, bool, &'a str)>,
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
    parse_with_policy(
        addr_json,
        route4_json,
        route6_json,
        resolv,
        hostname,
        &PolicyText::default(),
    )
}

/// [`parse`], with the routing policy rules and the routes of the tables they look up.
pub fn parse_with_policy(
    addr_json: &str,
    route4_json: &str,
    route6_json: &str,
    resolv: &str,
    hostname: &str,
    policy: &PolicyText,
) -> Result<NetIdentity> {
    let links: Vec<IpLink> =
        serde_json::from_str(addr_json).context("parsing `ip -j addr` output")?;
    // (table, route): `None` for main.
    let mut routes: Vec<(Option<u32>, IpRoute)> = Vec::new();
    for (text, what) in [(route4_json, "-4"), (route6_json, "-6")] {
        let r: Vec<IpRoute> = serde_json::from_str(text)
            .with_context(|| format!("parsing `ip -j {what} route` output"))?;
        routes.extend(r.into_iter().map(|r| (None, r)));
    }
    for (t, v6, text) in &policy.tables {
        let r: Vec<IpRoute> = serde_json::from_str(text).with_context(|| {
            format!(
                "parsing `ip -j -{} route show table {t}` output",
                if *v6 { 6 } else { 4 }
            )
        })?;
        routes.extend(r.into_iter().map(|r| (Some(*t), r)));
    }
    // Every link that could be carried, with whether it has addresses or routes of its own.
    let mut found: Vec<(Interface, bool)> = Vec::new();
    let mut left_behind = Vec::new();
    for l in &links {
        if l.link_type == "loopback" {
            continue;
        }
        let globals: Vec<&IpAddrInfo> = l
            .addr_info
            .iter()
            .filter(|a| a.scope != "link" && a.scope != "host")
            .collect();
        let info = l.linkinfo.as_ref();
        let kind_name = info.and_then(|i| i.info_kind.as_deref());
        let made_by = made_by_software(l).or_else(|| {
            (kind_name == Some("bridge") && external_ports(l, &links).is_empty()).then_some(
                "a bridge with no port out of this machine (its ports, if any, are containers' or VMs')",
            )
        });
        if let Some(why) = made_by {
            if globals.is_empty() {
                continue; // nothing of the machine's own on it
            }
            anyhow::ensure!(
                !routes.iter().any(|(t, r)| t.is_none()
                    && r.dst == "default"
                    && r.dev.as_deref() == Some(l.ifname.as_str())),
                "interface {} is {why}, made by software whose configuration is not carried, and the default route goes \
                 through it: the machine would come back without its way out; move the default route to a physical \
                 interface first, or reinstall it by other means",
                l.ifname
            );
            left_behind.push(LeftBehind {
                name: l.ifname.clone(),
                why: format!(
                    "{why}; made again by the software that made it (Docker, libvirt, a VPN client, a modem manager, ...) if \
                     the new OS runs it and is configured to"
                ),
            });
            continue;
        }
        let kind = match kind_name {
            Some("bond") => Kind::Bond(bond_of_link(l, &links)?),
            Some("vlan") => vlan_of_link(l)?,
            Some("bridge") => Kind::Bridge(bridge_of_link(l, &links)?),
            Some("dummy") => {
                check_virtual_name(&l.ifname)?;
                Kind::Dummy
            }
            Some(k @ ("team" | "macvlan" | "macvtap" | "ipvlan")) => bail!(
                "interface {} is a {k}: carrying {k} interfaces is not supported (bonds, bridges, VLANs and dummies are), and the \
                 machine would come back unreachable without it; reinstall it by other means",
                l.ifname
            ),
            // No link information: a NIC. A veth whose peer is in this namespace counts as one
            // (one made for a container went to `made_by_software` above).
            None | Some("veth") => Kind::Ethernet,
            Some(k) => {
                if globals.is_empty() {
                    continue; // nothing of the machine's own on it
                }
                bail!(
                    "interface {} is a link of kind {k} with addresses: carrying {k} links is not supported (NICs, \
                     bonds, bridges, VLANs and dummies are), and the machine would come back without those \
                     addresses; move them to a carried interface first, or reinstall it by other means",
                    l.ifname
                )
            }
        };
        let slave_kind = info.and_then(|i| i.info_slave_kind.as_deref());
        let enslaved = matches!(slave_kind, Some("bond" | "bridge"));
        if let (Some(m), false) = (&l.master, enslaved) {
            if globals.is_empty() {
                continue; // a member of something refused above, or not carried
            }
            bail!(
                "interface {} has addresses and belongs to {m} (a {}), which is not carried (bonds and bridges are): \
                 its addresses and routes would come back without it; reinstall it by other means",
                l.ifname,
                slave_kind.unwrap_or("master of unknown kind")
            );
        }
        // An enslaved NIC wears its bond's MAC: match it by the one it was made with.
        let perm = info
            .and_then(|i| i.info_slave_data.as_ref())
            .and_then(|d| d.get("perm_hwaddr"))
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .or_else(|| l.permaddr.clone())
            .filter(|_| kind == Kind::Ethernet);
        let Some(mac) = perm
            .or_else(|| l.address.clone())
            .filter(|m| m.len() == 17 && m != "00:00:00:00:00:00")
        else {
            if globals.is_empty() && !enslaved {
                continue;
            }
            bail!(
                "interface {} has addresses or a master but no MAC address to match it by",
                l.ifname
            );
        };
        if enslaved && !globals.is_empty() {
            bail!(
                "interface {} is a port of {} {} but has addresses of its own; they cannot be carried",
                l.ifname,
                slave_kind.unwrap_or("?"),
                l.master.as_deref().unwrap_or("?")
            );
        }
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
        for (table, r) in routes
            .iter()
            .filter(|(_, r)| r.dev.as_deref() == Some(l.ifname.as_str()))
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
                table: *table,
            });
        }
        let own = !addresses.is_empty() || !rts.is_empty();
        found.push((
            Interface {
                name: l.ifname.clone(),
                mac: mac.to_lowercase(),
                mtu: l.mtu,
                kind,
                addresses,
                routes: rts,
            },
            own,
        ));
    }
    // Carried: what has addresses or routes, and everything it sits on.
    let mut keep: Vec<bool> = found.iter().map(|(_, own)| *own).collect();
    loop {
        let mut grew = false;
        for i in 0..found.len() {
            if !keep[i] {
                continue;
            }
            let iface = &found[i].0;
            let (lowers, what) = iface.lowers();
            for lower in lowers {
                let Some(j) = found.iter().position(|(f, _)| &f.name == lower) else {
                    bail!(
                        "interface {}: its {what} {lower} cannot be carried (not found, or without a MAC address)",
                        iface.name
                    );
                };
                let ok = matches!(
                    (&iface.kind, &found[j].0.kind),
                    (Kind::Bond(_), Kind::Ethernet)
                        | (
                            Kind::Vlan { .. },
                            Kind::Ethernet | Kind::Bond(_) | Kind::Bridge(_)
                        )
                        | (
                            Kind::Bridge(_),
                            Kind::Ethernet | Kind::Bond(_) | Kind::Vlan { .. }
                        )
                );
                anyhow::ensure!(
                    ok,
                    "interface {}: its {what} {lower} is a {}: carried are Ethernet interfaces in bonds; VLANs on Ethernet \
                     interfaces, bonds or bridges; Ethernet interfaces, bonds and VLANs in bridges",
                    iface.name,
                    found[j].0.kind.label()
                );
                if !keep[j] {
                    keep[j] = true;
                    grew = true;
                }
            }
        }
        if !grew {
            break;
        }
    }
    let mut interfaces: Vec<Interface> = found
        .into_iter()
        .zip(keep)
        .filter_map(|((i, _), k)| k.then_some(i))
        .collect();
    if interfaces.is_empty() {
        bail!(
            "no interface with an address to carry over: the machine would come back unreachable"
        );
    }
    interfaces
        .sort_by(|a, b| (a.kind.rank(), &a.mac, &a.name).cmp(&(b.kind.rank(), &b.mac, &b.name)));
    let mut interfaces = after_what_they_sit_on(interfaces)?;
    // Rules are carried when the table they look up is: main, or a numbered table with a
    // route through a carried interface.
    let mut rules = Vec::new();
    for (text, v6) in [(policy.rules4, false), (policy.rules6, true)] {
        if text.trim().is_empty() {
            continue;
        }
        let captured: Vec<IpRule> = serde_json::from_str(text).with_context(|| {
            format!("parsing `ip -j -N -{} rule` output", if v6 { 6 } else { 4 })
        })?;
        for r in &captured {
            let name = format!("IPv{} rule {}", if v6 { 6 } else { 4 }, r.priority);
            match rule_of(r, v6)? {
                RuleOf::Kernels => {}
                RuleOf::NotCarried(why) => left_behind.push(LeftBehind { name, why }),
                RuleOf::Carried(rule) => {
                    let routed = rule.table == TABLE_MAIN
                        || interfaces
                            .iter()
                            .flat_map(|i| &i.routes)
                            .any(|rt| rt.table == Some(rule.table) && route_is_v6(rt) == v6);
                    if routed {
                        rules.push(rule);
                    } else {
                        left_behind.push(LeftBehind {
                            name,
                            why: format!(
                                "a routing policy rule ({}) whose table has no route through a carried interface",
                                rule.describe()
                            ),
                        });
                    }
                }
            }
        }
    }
    // Routes of a table no carried rule looks up would be dead weight in the next OS.
    for i in &mut interfaces {
        i.routes
            .retain(|rt| rt.table.is_none_or(|t| rules.iter().any(|r| r.table == t)));
    }
    let hostname = hostname.trim().to_string();
    anyhow::ensure!(!hostname.is_empty(), "the hostname is empty");
    Ok(NetIdentity {
        format: FORMAT,
        hostname,
        interfaces,
        dns: parse_resolv(resolv),
        left_behind,
        rules,
    })
}

impl Kind {
    pub fn label(&self) -> &'static str {
        match self {
            Kind::Ethernet => "Ethernet interface",
            Kind::Bond(_) => "bond",
            Kind::Vlan { .. } => "VLAN",
            Kind::Bridge(_) => "bridge",
            Kind::Dummy => "dummy interface",
        }
    }

    /// Ethernet first, then bonds, then VLANs, then bridges (a VLAN on a bridge is moved
    /// after it: [`after_what_they_sit_on`]).
    pub fn rank(&self) -> u8 {
        match self {
            Kind::Ethernet => 0,
            Kind::Bond(_) => 1,
            Kind::Vlan { .. } => 2,
            Kind::Bridge(_) => 3,
            Kind::Dummy => 4,
        }
    }
}

/// `list` (in rank order) with each interface after those it sits on, rank order kept
/// otherwise: a VLAN on a bridge after the bridge, even when a VLAN is one of the bridge's
/// ports. Renderers that create interfaces in order (ifupdown) need it.
fn after_what_they_sit_on(list: Vec<Interface>) -> Result<Vec<Interface>> {
    let mut left = list;
    let mut out: Vec<Interface> = Vec::with_capacity(left.len());
    while !left.is_empty() {
        let ready = left.iter().position(|i| {
            i.lowers()
                .0
                .iter()
                .all(|l| out.iter().any(|o| &o.name == *l))
        });
        let Some(k) = ready else {
            let names: Vec<&str> = left.iter().map(|i| i.name.as_str()).collect();
            bail!(
                "interfaces {} sit on each other in a loop",
                names.join(", ")
            );
        };
        out.push(left.remove(k));
    }
    Ok(out)
}

/// A bond, VLAN, bridge or dummy keeps its name in the next OS, which writes it into configuration
/// files.
fn check_virtual_name(name: &str) -> Result<()> {
    anyhow::ensure!(
        !name.is_empty()
            && name.len() <= 15
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')),
        "interface name {name:?}: a bond, VLAN, bridge or dummy is carried under its name, which must be 1 to 15 letters, digits, '.', '_' or '-'"
    );
    Ok(())
}

fn info_data(l: &IpLink) -> serde_json::Value {
    l.linkinfo
        .as_ref()
        .and_then(|i| i.info_data.clone())
        .unwrap_or(serde_json::Value::Null)
}

fn bond_of_link(l: &IpLink, links: &[IpLink]) -> Result<Bond> {
    check_virtual_name(&l.ifname)?;
    let d = info_data(l);
    let text = |k: &str| d.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let ms = |k: &str| {
        d.get(k)
            .and_then(|v| v.as_u64())
            .unwrap_or(0)
            .min(u32::MAX as u64) as u32
    };
    let mode = text("mode").with_context(|| {
        format!(
            "bond {}: `ip -d` shows no mode (is the bonding driver loaded?)",
            l.ifname
        )
    })?;
    let arp_interval_ms = ms("arp_interval");
    let list = |k: &str| -> Vec<String> {
        d.get(k)
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let ns6 = list("ns_ip6_target");
    anyhow::ensure!(
        ns6.is_empty(),
        "bond {}: monitors its links by IPv6 neighbour solicitations (ns_ip6_target {}), which is not carried; monitor by ARP or MII, or reinstall it by other means",
        l.ifname,
        ns6.join(",")
    );
    let arp_ip_targets = list("arp_ip_target")
        .iter()
        .map(|t| {
            t.parse::<std::net::Ipv4Addr>().with_context(|| {
                format!("bond {}: ARP target {t:?} is not an IPv4 address", l.ifname)
            })
        })
        .collect::<Result<Vec<_>>>()?;
    anyhow::ensure!(
        arp_interval_ms == 0 || !arp_ip_targets.is_empty(),
        "bond {}: monitors by ARP (arp_interval {arp_interval_ms} ms) with no arp_ip_target: no link of it can be seen up, so the machine cannot be reached through it",
        l.ifname
    );
    // Only the driver's own words go into the files rendered from them.
    let one_of = |k: &str, allowed: &[&str], default: &str| -> Result<Option<String>> {
        match text(k) {
            None => Ok(None),
            Some(v) if v == default => Ok(None),
            Some(v) if allowed.contains(&v.as_str()) => Ok(Some(v)),
            Some(v) => bail!("bond {}: {k} {v:?} is not one this agent knows", l.ifname),
        }
    };
    let arp_validate = one_of(
        "arp_validate",
        &[
            "active",
            "backup",
            "all",
            "filter",
            "filter_active",
            "filter_backup",
        ],
        "none",
    )?;
    let arp_all_targets = one_of("arp_all_targets", &["all"], "any")?;
    let mut members: Vec<String> = links
        .iter()
        .filter(|m| m.master.as_deref() == Some(l.ifname.as_str()))
        .map(|m| m.ifname.clone())
        .collect();
    members.sort();
    anyhow::ensure!(
        !members.is_empty(),
        "bond {} has no member interfaces: the machine cannot be reached through it",
        l.ifname
    );
    let hashes = matches!(
        mode.as_str(),
        "balance-xor" | "802.3ad" | "balance-tlb" | "balance-alb"
    );
    Ok(Bond {
        lacp_rate: text("ad_lacp_rate").filter(|_| mode == "802.3ad"),
        xmit_hash_policy: text("xmit_hash_policy").filter(|_| hashes),
        primary: text("primary").filter(|p| members.contains(p)),
        mode,
        members,
        miimon_ms: ms("miimon"),
        updelay_ms: ms("updelay"),
        downdelay_ms: ms("downdelay"),
        arp_interval_ms,
        arp_ip_targets,
        arp_validate,
        arp_all_targets,
    })
}

/// What made `l`, when it is an interface that software makes at run time (see the module's
/// text); bridges are judged by their ports ([`external_ports`]).
fn made_by_software(l: &IpLink) -> Option<&'static str> {
    let kind = l.linkinfo.as_ref().and_then(|i| i.info_kind.as_deref());
    // A mobile modem in raw-IP mode (`qmi_wwan`, `cdc_mbim`) shows no kind and no MAC.
    if kind.is_none() && l.master.is_none() && matches!(l.link_type.as_str(), "none" | "ppp") {
        return Some("a point-to-point link without a MAC address (a mobile modem's)");
    }
    Some(match kind? {
        "ppp" => "a PPP link",
        "wwan" => "a mobile modem's link",
        "tun" => "a tun/tap device (a VPN's, or a VM's port)",
        "wireguard" => "a WireGuard tunnel",
        "vxlan" | "geneve" => "an overlay tunnel (VXLAN or Geneve, as container networks make)",
        "ipip" | "gre" | "gretap" | "ip6gre" | "ip6gretap" | "ip6tnl" | "sit" | "vti" | "vti6"
        | "erspan" | "xfrm" => "an IP tunnel",
        "veth" if l.link_netnsid.is_some() => {
            "a veth whose peer is in another network namespace (a container's)"
        }
        _ => return None,
    })
}

/// The ports of bridge `l` that lead out of the machine: all but those made by software.
fn external_ports<'a>(l: &IpLink, links: &'a [IpLink]) -> Vec<&'a IpLink> {
    links
        .iter()
        .filter(|p| p.master.as_deref() == Some(l.ifname.as_str()) && made_by_software(p).is_none())
        .collect()
}

fn bridge_of_link(l: &IpLink, links: &[IpLink]) -> Result<Bridge> {
    check_virtual_name(&l.ifname)?;
    let d = info_data(l);
    let num = |k: &str| d.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    anyhow::ensure!(
        num("vlan_filtering") == 0,
        "bridge {}: filters VLANs per port (vlan_filtering), which is not carried; reinstall it by other means",
        l.ifname
    );
    let mut ports: Vec<String> = external_ports(l, links)
        .iter()
        .map(|p| p.ifname.clone())
        .collect();
    ports.sort();
    Ok(Bridge {
        ports,
        stp: num("stp_state") != 0,
        // `ip -d` shows it in hundredths of a second.
        forward_delay_s: d
            .get("forward_delay")
            .and_then(|v| v.as_u64())
            .map_or(15, |cs| (cs / 100).min(u32::MAX as u64) as u32),
    })
}

fn vlan_of_link(l: &IpLink) -> Result<Kind> {
    check_virtual_name(&l.ifname)?;
    let d = info_data(l);
    let protocol = d.get("protocol").and_then(|v| v.as_str()).unwrap_or("");
    anyhow::ensure!(
        protocol == "802.1Q",
        "VLAN {}: protocol {protocol:?} is not carried (802.1Q VLANs are); reinstall it by other means",
        l.ifname
    );
    let id = d
        .get("id")
        .and_then(|v| v.as_u64())
        .filter(|id| (1..4095).contains(id))
        .with_context(|| format!("VLAN {}: `ip -d` shows no VLAN id from 1 to 4094", l.ifname))?;
    let parent = l
        .link
        .clone()
        .with_context(|| format!("VLAN {}: `ip` shows no parent interface", l.ifname))?;
    Ok(Kind::Vlan {
        id: id as u16,
        parent,
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
    // `empty_if_missing`: a table that does not exist (a rule may name one no route was ever
    // added to) has no routes.
    let ip_or = |args: &[&str], empty_if_missing: bool| -> Result<String> {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .with_context(|| format!("running ip {}", args.join(" ")))?;
        let err = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && empty_if_missing && err.contains("does not exist") {
            return Ok("[]".into());
        }
        // An iproute2 too old for the capture refuses an option (`-j`, `-N`), or takes `-j`
        // but prints text for an object it has no JSON for (rules, before about 2018).
        const OLD: &str = "this machine's iproute2 is too old to capture its network (the capture reads `ip -j` JSON, with tables by number: `-N`)";
        anyhow::ensure!(
            out.status.success(),
            "ip {} failed: {}{}",
            args.join(" "),
            err.trim(),
            if err.contains("is unknown") {
                format!(": {OLD}")
            } else {
                String::new()
            }
        );
        let text = String::from_utf8(out.stdout)?;
        let first = text.trim_start().lines().next().unwrap_or("");
        anyhow::ensure!(
            first.is_empty() || first.starts_with('[') || first.starts_with('{'),
            "ip {} printed text, not JSON ({first:?}): {OLD}",
            args.join(" ")
        );
        Ok(text)
    };
    let ip = |args: &[&str]| ip_or(args, false);
    let resolv = ["/run/systemd/resolve/resolv.conf", "/etc/resolv.conf"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    let hostname = std::fs::read_to_string("/etc/hostname")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(kernel_hostname)
        .unwrap_or_default();
    // Tables by number (`-N`): names come from rt_tables files, which the next OS may lack.
    let rules4 = ip(&["-j", "-N", "-4", "rule", "show"])?;
    let rules6 = ip(&["-j", "-N", "-6", "rule", "show"])?;
    let mut tables = Vec::new();
    for (text, v6) in [(&rules4, false), (&rules6, true)] {
        for t in rule_tables(text)? {
            let family = if v6 { "-6" } else { "-4" };
            let routes = ip_or(
                &["-j", family, "route", "show", "table", &t.to_string()],
                true,
            )?;
            tables.push((t, v6, routes));
        }
    }
    parse_with_policy(
        &ip(&["-d", "-j", "addr", "show"])?,
        &ip(&["-j", "-4", "route", "show", "table", "main"])?,
        &ip(&["-j", "-6", "route", "show", "table", "main"])?,
        &resolv,
        &hostname,
        &PolicyText {
            rules4: &rules4,
            rules6: &rules6,
            tables: tables
                .iter()
                .map(|(t, v6, s)| (*t, *v6, s.as_str()))
                .collect(),
        },
    )
}

/// Whether route `r` is an IPv6 one.
pub fn route_is_v6(r: &Route) -> bool {
    match (r.destination, r.gateway) {
        (Some((d, _)), _) => d.is_ipv6(),
        (None, Some(g)) => g.is_ipv6(),
        (None, None) => false,
    }
}

fn kernel_hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname").ok()
}

/// The name a renderer gives the interface at `index` where it must name it (a bond member,
/// or any interface under ifupdown, which knows interfaces by name only).
pub fn nic_name(index: usize) -> String {
    format!("rnic{index}")
}

/// A systemd `.link` file that names the Ethernet interface `iface` `name` by its MAC when
/// it appears (before anything enslaves it). `Type=ether` keeps it off the bonds and VLANs
/// that later wear the same MAC.
pub fn naming_link(iface: &Interface, name: &str) -> String {
    format!(
        "# Written by reinstall: {} is named by its MAC.\n[Match]\nMACAddress={}\nType=ether\n\n[Link]\nName={name}\n",
        iface.name, iface.mac
    )
}

/// systemd-networkd files for the next OS: `(file name, contents)`. An Ethernet interface
/// gets a `.network` matched by its MAC (names like `eth0` may change between kernels; MACs
/// do not); a bond member or bridge port a `.link` that names it by its MAC and a `.network`
/// that enslaves it; a bond, VLAN, bridge or dummy a `.netdev` that creates it under its
/// captured name and MAC, and a `.network` matched by that name. Those sort first (`05-`): a
/// VLAN wears its parent's MAC, and the first matching `.network` wins.
pub fn render_networkd(id: &NetIdentity) -> Vec<(String, String)> {
    (0..id.interfaces.len())
        .flat_map(|i| render_networkd_iface(id, i))
        .collect()
}

/// The systemd-networkd files of the interface at `i` (see [`render_networkd`]).
pub fn render_networkd_iface(id: &NetIdentity, i: usize) -> Vec<(String, String)> {
    let mut files = Vec::new();
    let iface = &id.interfaces[i];
    {
        let mut s = format!(
            "# Written by reinstall: the network identity of {} ({}).\n",
            id.hostname, iface.name
        );
        let master = id.master_of(&iface.name);
        if let (Some(m), Kind::Ethernet) = (master, &iface.kind) {
            let name = nic_name(i);
            files.push((
                format!("10-reinstall-{name}.link"),
                naming_link(iface, &name),
            ));
            let _ = writeln!(s, "[Match]\nName={name}\n\n[Network]\n{}", enslave_line(m));
            if matches!(&m.kind, Kind::Bond(b) if b.primary.as_deref() == Some(iface.name.as_str()))
            {
                let _ = writeln!(s, "PrimarySlave=yes");
            }
            files.push((format!("10-reinstall-{name}.network"), s));
            return files;
        }
        let file = match &iface.kind {
            Kind::Ethernet => {
                let _ = writeln!(s, "[Match]\nMACAddress={}\n", iface.mac);
                let _ = writeln!(s, "[Link]\nMTUBytes={}\n", iface.mtu);
                format!("10-reinstall-{}.network", iface.mac.replace(':', ""))
            }
            Kind::Bond(_) | Kind::Vlan { .. } | Kind::Bridge(_) | Kind::Dummy => {
                files.push((
                    format!("05-reinstall-{}.netdev", iface.name),
                    networkd_netdev(id, iface),
                ));
                let _ = writeln!(s, "[Match]\nName={}\n", iface.name);
                format!("05-reinstall-{}.network", iface.name)
            }
        };
        let _ = writeln!(s, "[Network]");
        if iface.addresses.is_empty() && iface.routes.is_empty() {
            // Only carries VLANs, or is a bridge's port.
            let _ = writeln!(s, "DHCP=no\nLinkLocalAddressing=no\nIPv6AcceptRA=no");
            if let Some(m) = master {
                let _ = writeln!(s, "{}", enslave_line(m));
            }
        } else {
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
        }
        for a in iface.addresses.iter().filter(|a| !a.dynamic) {
            let _ = writeln!(s, "Address={}/{}", a.address, a.prefix);
        }
        if i == id.dns_index() {
            for d in &id.dns.servers {
                let _ = writeln!(s, "DNS={d}");
            }
            if !id.dns.search.is_empty() {
                let _ = writeln!(s, "Domains={}", id.dns.search.join(" "));
            }
        }
        for v in id.vlans_on(&iface.name) {
            let _ = writeln!(s, "VLAN={}", v.name);
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
            if let Some(t) = r.table {
                let _ = writeln!(s, "Table={t}");
            }
        }
        if i == id.dns_index() {
            // Rules belong to no interface; networkd keeps them with the first addressed one.
            for r in &id.rules {
                let _ = writeln!(s, "\n[RoutingPolicyRule]");
                if let Some((a, p)) = r.from {
                    let _ = writeln!(s, "From={a}/{p}");
                }
                if let Some((a, p)) = r.to {
                    let _ = writeln!(s, "To={a}/{p}");
                }
                if let Some(m) = r.fwmark {
                    let _ = writeln!(s, "FirewallMark={m}");
                }
                let _ = writeln!(s, "Table={}\nPriority={}", r.table, r.priority);
                if r.from.is_none() && r.to.is_none() {
                    let _ = writeln!(s, "Family={}", if r.v6 { "ipv6" } else { "ipv4" });
                }
            }
        }
        files.push((file, s));
    }
    files
}

/// The networkd `[Network]` line that makes an interface a port of bond or bridge `master`.
fn enslave_line(master: &Interface) -> String {
    match master.kind {
        Kind::Bond(_) => format!("Bond={}", master.name),
        _ => format!("Bridge={}", master.name),
    }
}

/// The `.netdev` that creates bond, VLAN or bridge `iface`, wearing its captured MAC (networkd would
/// otherwise make one up from the machine id, and DHCP reservations and neighbours' caches
/// would no longer know the machine).
fn networkd_netdev(id: &NetIdentity, iface: &Interface) -> String {
    let mut s = format!(
        "# Written by reinstall: the network identity of {} ({}).\n[NetDev]\nName={}\n",
        id.hostname, iface.name, iface.name
    );
    match &iface.kind {
        Kind::Ethernet => unreachable!("Ethernet interfaces are not created"),
        Kind::Bond(b) => {
            let _ = writeln!(
                s,
                "Kind=bond\nMACAddress={}\nMTUBytes={}\n\n[Bond]\nMode={}",
                iface.mac, iface.mtu, b.mode
            );
            if b.miimon_ms > 0 {
                let _ = writeln!(s, "MIIMonitorSec={}ms", b.miimon_ms);
            }
            if b.updelay_ms > 0 {
                let _ = writeln!(s, "UpDelaySec={}ms", b.updelay_ms);
            }
            if b.downdelay_ms > 0 {
                let _ = writeln!(s, "DownDelaySec={}ms", b.downdelay_ms);
            }
            if let Some(r) = &b.lacp_rate {
                let _ = writeln!(s, "LACPTransmitRate={r}");
            }
            if let Some(h) = &b.xmit_hash_policy {
                let _ = writeln!(s, "TransmitHashPolicy={h}");
            }
            if b.arp_interval_ms > 0 {
                let _ = writeln!(
                    s,
                    "ARPIntervalSec={}ms\nARPIPTargets={}",
                    b.arp_interval_ms,
                    b.arp_targets(" ")
                );
            }
            if let Some(v) = &b.arp_validate {
                let _ = writeln!(s, "ARPValidate={v}");
            }
            if let Some(a) = &b.arp_all_targets {
                let _ = writeln!(s, "ARPAllTargets={a}");
            }
        }
        Kind::Vlan { id: vid, .. } => {
            let _ = writeln!(
                s,
                "Kind=vlan\nMACAddress={}\nMTUBytes={}\n\n[VLAN]\nId={vid}",
                iface.mac, iface.mtu
            );
        }
        Kind::Bridge(b) => {
            let _ = writeln!(
                s,
                "Kind=bridge\nMACAddress={}\nMTUBytes={}\n\n[Bridge]\nSTP={}\nForwardDelaySec={}",
                iface.mac,
                iface.mtu,
                if b.stp { "yes" } else { "no" },
                b.forward_delay_s
            );
        }
        Kind::Dummy => {
            let _ = writeln!(
                s,
                "Kind=dummy\nMACAddress={}\nMTUBytes={}",
                iface.mac, iface.mtu
            );
        }
    }
    s
}

/// Parses the captured fixture `agent/tests/fixtures/net/NAME` (for this module's and the
/// renderers' tests).
#[cfg(test)]
pub(crate) fn fixture(name: &str) -> Result<NetIdentity> {
    let d = format!("{}/tests/fixtures/net/{name}", env!("CARGO_MANIFEST_DIR"));
    let r = |f: &str| std::fs::read_to_string(format!("{d}/{f}")).unwrap_or_default();
    // `table-<N>-<4|6>.json`: the routes of table N, as `capture` reads them.
    let mut tables: Vec<(u32, bool, String)> = std::fs::read_dir(&d)
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().into_string().unwrap();
            let (t, fam) = n
                .strip_prefix("table-")?
                .strip_suffix(".json")?
                .split_once('-')?;
            Some((t.parse().unwrap(), fam == "6", r(&n)))
        })
        .collect();
    tables.sort();
    let (rules4, rules6) = (r("rule4.json"), r("rule6.json"));
    parse_with_policy(
        &r("addr.json"),
        &r("route4.json"),
        &r("route6.json"),
        &r("resolv.conf"),
        &r("hostname"),
        &PolicyText {
            rules4: &rules4,
            rules6: &rules6,
            tables: tables
                .iter()
                .map(|(t, v6, s)| (*t, *v6, s.as_str()))
                .collect(),
        },
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

    /// A machine with eth0 and eth1 in bond0 (active-backup, eth0 primary, MII every 100 ms,
    /// up delay 200 ms; eth1 wears eth0's MAC as members do), VLAN 100 on the bond, VLAN 200 on
    /// eth2 (which has no address of its own), and eth3 with nothing (not carried).
    #[test]
    fn bonds_and_vlans_are_captured_with_what_they_sit_on() {
        let id = fixture("vlan-bond").unwrap();
        let names: Vec<&str> = id.interfaces.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(
            names,
            ["eth0", "eth1", "eth2", "bond0", "bond0.100", "eth2.200"],
            "Ethernet first, then bonds, then VLANs; eth3 has nothing to carry"
        );
        let by = |n: &str| id.interfaces.iter().find(|i| i.name == n).unwrap();
        assert_eq!(by("eth1").mac, "52:54:00:00:00:02", "the permanent MAC");
        assert!(by("eth1").addresses.is_empty() && by("eth2").addresses.is_empty());
        let Kind::Bond(b) = &by("bond0").kind else {
            panic!("{:?}", by("bond0").kind)
        };
        assert_eq!(
            b,
            &Bond {
                mode: "active-backup".into(),
                members: vec!["eth0".into(), "eth1".into()],
                primary: Some("eth0".into()),
                miimon_ms: 100,
                updelay_ms: 200,
                downdelay_ms: 0,
                lacp_rate: None,
                xmit_hash_policy: None,
                arp_interval_ms: 0,
                arp_ip_targets: vec![],
                arp_validate: None,
                arp_all_targets: None,
            }
        );
        assert_eq!(by("bond0").mac, "52:54:00:00:00:01");
        assert_eq!(by("bond0").mtu, 9000);
        assert_eq!(
            by("bond0").routes[0].gateway,
            Some("192.0.2.1".parse().unwrap())
        );
        assert_eq!(
            by("bond0.100").kind,
            Kind::Vlan {
                id: 100,
                parent: "bond0".into()
            }
        );
        assert_eq!(
            by("bond0.100").routes.len(),
            1,
            "{:?}",
            by("bond0.100").routes
        );
        assert_eq!(
            by("eth2.200").kind,
            Kind::Vlan {
                id: 200,
                parent: "eth2".into()
            }
        );
        assert_eq!(id.bond_of("eth1").unwrap().0.name, "bond0");
        assert!(id.bond_of("eth2").is_none());
        assert_eq!(
            id.dns_index(),
            3,
            "DNS goes with the first interface with an address"
        );
        // An identity stored before bonds were carried has no `kind`: Ethernet.
        let mut v = serde_json::to_value(fixture("two-nics").unwrap()).unwrap();
        v["interfaces"][0].as_object_mut().unwrap().remove("kind");
        let old: NetIdentity = serde_json::from_value(v).unwrap();
        assert!(old.interfaces[0].is_ethernet());
    }

    #[test]
    fn networkd_creates_bonds_and_vlans_with_their_macs_and_enslaves_members_by_name() {
        let id = fixture("vlan-bond").unwrap();
        let files = render_networkd(&id);
        let file = |n: &str| {
            &files
                .iter()
                .find(|(f, _)| f == n)
                .unwrap_or_else(|| panic!("{n} missing from {files:?}"))
                .1
        };
        let netdev = file("05-reinstall-bond0.netdev");
        for want in [
            "Name=bond0\nKind=bond\nMACAddress=52:54:00:00:00:01\nMTUBytes=9000",
            "Mode=active-backup\nMIIMonitorSec=100ms\nUpDelaySec=200ms\n",
        ] {
            assert!(netdev.contains(want), "{want:?} missing from:\n{netdev}");
        }
        assert!(
            !netdev.contains("LACP") && !netdev.contains("DownDelay"),
            "{netdev}"
        );
        assert!(file("10-reinstall-rnic0.link")
            .contains("MACAddress=52:54:00:00:00:01\nType=ether\n\n[Link]\nName=rnic0"));
        assert!(file("10-reinstall-rnic1.link").contains("MACAddress=52:54:00:00:00:02\n"));
        assert_eq!(
            file("10-reinstall-rnic0.network")
                .split_once("[Match]")
                .unwrap()
                .1,
            "\nName=rnic0\n\n[Network]\nBond=bond0\nPrimarySlave=yes\n"
        );
        assert!(!file("10-reinstall-rnic1.network").contains("Primary"));
        let bond = file("05-reinstall-bond0.network");
        for want in [
            "[Match]\nName=bond0\n",
            "Address=192.0.2.10/24",
            "DNS=192.0.2.53",
            "VLAN=bond0.100",
            "Gateway=192.0.2.1",
        ] {
            assert!(bond.contains(want), "{want:?} missing from:\n{bond}");
        }
        let v100 = file("05-reinstall-bond0.100.netdev");
        assert!(
            v100.contains(
                "Kind=vlan\nMACAddress=52:54:00:00:00:01\nMTUBytes=1500\n\n[VLAN]\nId=100"
            ),
            "{v100}"
        );
        let v100 = file("05-reinstall-bond0.100.network");
        for want in [
            "Address=198.51.100.7/24",
            "Destination=203.0.113.0/24\nGateway=198.51.100.1",
        ] {
            assert!(v100.contains(want), "{want:?} missing from:\n{v100}");
        }
        let eth2 = file("10-reinstall-525400000003.network");
        assert!(
            eth2.contains("MACAddress=52:54:00:00:00:03")
                && eth2.contains("DHCP=no\nLinkLocalAddressing=no\nIPv6AcceptRA=no\nVLAN=eth2.200"),
            "{eth2}"
        );
        assert!(file("05-reinstall-eth2.200.network").contains("Address=2001:db8:200::7/64"));
        assert_eq!(
            files.len(),
            11,
            "{:?}",
            files.iter().map(|f| &f.0).collect::<Vec<_>>()
        );
    }

    /// The vlan-bond capture with bond0 monitoring by ARP instead of MII (`ip -d -j` prints
    /// `arp_ip_target` as a list, `arp_validate` null for none): carried with its interval,
    /// targets, validation and all-targets rule, and MII off.
    #[test]
    fn an_arp_monitored_bond_is_carried() {
        let id = fixture("arp-bond").unwrap();
        let b = id
            .interfaces
            .iter()
            .find_map(|i| match &i.kind {
                Kind::Bond(b) => Some(b),
                _ => None,
            })
            .unwrap();
        assert_eq!(
            (b.miimon_ms, b.arp_interval_ms, b.arp_targets(" ")),
            (0, 500, "192.0.2.1 192.0.2.254".to_string())
        );
        assert_eq!(
            (b.arp_validate.as_deref(), b.arp_all_targets.as_deref()),
            (Some("active"), Some("all"))
        );
        // Saved and read back by the next OS's agent as it was.
        let again: NetIdentity =
            serde_json::from_str(&serde_json::to_string(&id).unwrap()).unwrap();
        assert_eq!(again, id);
        // MII-monitored bonds are saved as before (no ARP keys).
        let mii = serde_json::to_string(&fixture("vlan-bond").unwrap()).unwrap();
        assert!(!mii.contains("arp"), "{mii}");
    }

    /// The bridge capture with VLAN 100 on br0 holding 198.51.100.7/24 and a route through
    /// it (this kernel has no 802.1q driver: the VLAN's `ip -d -j` entry is written by hand in
    /// the shape of the vlan-bond capture's). Carried after the bridge; and a bridge whose
    /// port is a VLAN, with a VLAN on top, comes out VLAN, bridge, VLAN.
    #[test]
    fn a_vlan_on_a_bridge_is_carried_after_the_bridge() {
        let id = fixture("bridge-vlan").unwrap();
        let names: Vec<&str> = id.interfaces.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["eth0", "br0", "br0.100"]);
        let v = &id.interfaces[2];
        assert_eq!(
            v.kind,
            Kind::Vlan {
                id: 100,
                parent: "br0".into()
            }
        );
        assert_eq!(v.mac, id.interfaces[1].mac);
        assert_eq!(v.routes[0].gateway, Some("198.51.100.1".parse().unwrap()));
        let files = render_networkd(&id);
        let br = &files
            .iter()
            .find(|(f, _)| f == "05-reinstall-br0.network")
            .unwrap()
            .1;
        assert!(br.contains("VLAN=br0.100\n"), "{br}");
        assert!(files
            .iter()
            .any(|(f, t)| f == "05-reinstall-br0.100.netdev" && t.contains("Kind=vlan")));

        // VLAN 7 on eth0 as br0's port instead of eth0 itself: eth0, eth0.7, br0, br0.100.
        let d = format!(
            "{}/tests/fixtures/net/bridge-vlan",
            env!("CARGO_MANIFEST_DIR")
        );
        let r = |f: &str| std::fs::read_to_string(format!("{d}/{f}")).unwrap();
        let mut links: Vec<serde_json::Value> = serde_json::from_str(&r("addr.json")).unwrap();
        let eth0 = links.iter().position(|l| l["ifname"] == "eth0").unwrap();
        let mut port = links[eth0].clone();
        links[eth0].as_object_mut().unwrap().remove("master");
        port["ifname"] = "eth0.7".into();
        port["ifindex"] = 9.into();
        port["link"] = "eth0".into();
        port["linkinfo"] = serde_json::json!({"info_kind": "vlan", "info_data": {"protocol": "802.1Q", "id": 7}, "info_slave_kind": "bridge"});
        port["addr_info"] = serde_json::json!([]);
        links.push(port);
        let id = parse(
            &serde_json::to_string(&links).unwrap(),
            &r("route4.json"),
            &r("route6.json"),
            &r("resolv.conf"),
            "h",
        )
        .unwrap();
        let names: Vec<&str> = id.interfaces.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["eth0", "eth0.7", "br0", "br0.100"]);
    }

    /// Each refusal names the interface and what is not carried.
    #[test]
    fn teams_unmonitorable_bonds_qinq_and_vlans_on_vlans_are_refused_by_name() {
        let d = format!(
            "{}/tests/fixtures/net/vlan-bond",
            env!("CARGO_MANIFEST_DIR")
        );
        let addr = std::fs::read_to_string(format!("{d}/addr.json")).unwrap();
        let try_with = |from: &str, to: &str| {
            assert!(addr.contains(from), "{from}");
            parse(&addr.replacen(from, to, 1), "[]", "[]", "", "h")
                .unwrap_err()
                .to_string()
        };
        let e = try_with("\"info_kind\":\"bond\"", "\"info_kind\":\"team\"");
        assert!(e.contains("bond0 is a team"), "{e}");

        let e = try_with("\"arp_interval\":0", "\"arp_interval\":500");
        assert!(
            e.contains("bond bond0") && e.contains("no arp_ip_target"),
            "{e}"
        );
        let e = try_with(
            "\"arp_interval\":0",
            "\"arp_interval\":0,\"ns_ip6_target\":[\"2001:db8::1\"]",
        );
        assert!(e.contains("bond bond0") && e.contains("2001:db8::1"), "{e}");
        let e = try_with("\"arp_validate\":null", "\"arp_validate\":\"x; rm -rf\"");
        assert!(e.contains("arp_validate \"x; rm -rf\""), "{e}");
        let e = try_with(
            "\"protocol\":\"802.1Q\",\"id\":200",
            "\"protocol\":\"802.1ad\",\"id\":200",
        );
        assert!(e.contains("VLAN eth2.200") && e.contains("802.1ad"), "{e}");
        let e = try_with("\"link\":\"eth2\"", "\"link\":\"bond0.100\"");
        assert!(
            e.contains("eth2.200") && e.contains("bond0.100 is a VLAN"),
            "{e}"
        );
    }

    /// Captured with `ip` from a network namespace: br0 (STP on, forward delay 4 s, wearing
    /// its port's MAC) holds 192.0.2.10/24, 2001:db8::10/64 and the default route, with
    /// eth0 as its port (a veth whose peer, wire0, stays in the same namespace, standing in
    /// for a NIC; wire0 has no address); docker0 holds 172.17.0.1/16 with one port, a veth
    /// whose peer is in another namespace (a container's); tun0 holds 10.8.0.2/24.
    #[test]
    fn bridges_are_carried_with_their_ports_and_containers_links_left_behind() {
        let id = fixture("bridge").unwrap();
        let names: Vec<&str> = id.interfaces.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["eth0", "br0"]);
        let br = &id.interfaces[1];
        assert_eq!(
            br.kind,
            Kind::Bridge(Bridge {
                ports: vec!["eth0".into()],
                stp: true,
                forward_delay_s: 4,
            })
        );
        assert_eq!(br.mac, "52:54:00:00:01:01");
        assert_eq!(br.addresses.len(), 2);
        assert_eq!(br.routes[0].gateway, Some("192.0.2.1".parse().unwrap()));
        assert!(id.interfaces[0].addresses.is_empty());
        assert_eq!(id.bridge_of("eth0").unwrap().name, "br0");
        assert_eq!(id.master_of("eth0").unwrap().name, "br0");
        assert_eq!(id.dns_index(), 1, "DNS goes with the bridge's addresses");
        let left: Vec<(&str, &str)> = id
            .left_behind
            .iter()
            .map(|l| (l.name.as_str(), l.why.as_str()))
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(
            left[0].0 == "docker0"
                && left[0]
                    .1
                    .contains("a bridge with no port out of this machine"),
            "{left:?}"
        );
        assert!(
            left[1].0 == "tun0" && left[1].1.contains("tun/tap"),
            "{left:?}"
        );
    }

    /// A default route through what would be left behind, a VLAN-filtering bridge and a port
    /// with addresses of its own are refused, naming the interface.
    #[test]
    fn what_a_bridge_or_left_behind_link_cannot_carry_is_refused_by_name() {
        let d = format!("{}/tests/fixtures/net/bridge", env!("CARGO_MANIFEST_DIR"));
        let r = |f: &str| std::fs::read_to_string(format!("{d}/{f}")).unwrap();
        let (addr, route4) = (r("addr.json"), r("route4.json"));
        let try_with =
            |addr: &str, route4: &str| parse(addr, route4, "[]", "", "h").unwrap_err().to_string();
        let via_tun = route4.replacen("\"dev\":\"br0\"", "\"dev\":\"tun0\"", 1);
        let e = try_with(&addr, &via_tun);
        assert!(e.contains("tun0") && e.contains("default route"), "{e}");
        let via_docker = route4.replacen("\"dev\":\"br0\"", "\"dev\":\"docker0\"", 1);
        let e = try_with(&addr, &via_docker);
        assert!(e.contains("docker0 is a bridge with no port"), "{e}");
        let filtering = addr.replacen("\"vlan_filtering\":0", "\"vlan_filtering\":1", 1);
        assert_ne!(filtering, addr);
        let e = try_with(&filtering, &route4);
        assert!(
            e.contains("bridge br0") && e.contains("vlan_filtering"),
            "{e}"
        );
        // eth0 (the first link after lo) given an address of its own.
        let i = addr.find("\"ifname\":\"eth0\"").unwrap();
        let j = i + addr[i..].find("\"addr_info\":[").unwrap() + "\"addr_info\":[".len();
        let own = format!(
            "{}{{\"family\":\"inet\",\"local\":\"198.51.100.9\",\"prefixlen\":24,\"scope\":\"global\"}},{}",
            &addr[..j],
            &addr[j..]
        );
        let e = try_with(&own, &route4);
        assert!(e.contains("eth0 is a port of bridge br0"), "{e}");
    }

    /// `two-nics` with dummy0 (192.0.2.53/32 and 2001:db8:53::53/128, as an anycast
    /// service address) and an unaddressed ifb0 beside them. Written by hand in the form
    /// `ip -d -j addr` prints (this machine's kernel has no dummy driver); the VM harness's
    /// `full --bridge` carries a real one.
    #[test]
    fn a_dummy_is_carried_by_name_and_links_of_other_kinds_without_addresses_are_not() {
        let id = fixture("dummy").unwrap();
        let names: Vec<&str> = id.interfaces.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["veth0", "veth1", "dummy0"]);
        let d = &id.interfaces[2];
        assert_eq!(d.kind, Kind::Dummy);
        let addrs: Vec<String> = d
            .addresses
            .iter()
            .map(|a| format!("{}/{}", a.address, a.prefix))
            .collect();
        assert_eq!(addrs, ["192.0.2.53/32", "2001:db8:53::53/128"]);
        assert_ne!(id.dns_index(), 2, "DNS goes with a NIC, not the dummy");
        assert!(id.left_behind.is_empty(), "{:?}", id.left_behind);
    }

    /// Addresses on a link of a kind not carried, or on a member of a master that is not a
    /// bond or a bridge (a VRF, Open vSwitch), are refused naming the link: carried as a NIC
    /// they would match nothing in the next OS.
    #[test]
    fn addresses_on_links_of_other_kinds_or_under_other_masters_are_refused_by_name() {
        let d = format!("{}/tests/fixtures/net/dummy", env!("CARGO_MANIFEST_DIR"));
        let addr = std::fs::read_to_string(format!("{d}/addr.json")).unwrap();
        let try_with = |from: &str, to: &str| {
            assert!(addr.contains(from), "{from}");
            parse(&addr.replacen(from, to, 1), "[]", "[]", "", "h")
                .unwrap_err()
                .to_string()
        };
        let e = try_with("\"info_kind\":\"dummy\"", "\"info_kind\":\"openvswitch\"");
        assert!(
            e.contains("dummy0 is a link of kind openvswitch with addresses"),
            "{e}"
        );
        let e = try_with(
            "\"ifname\":\"veth0\",",
            "\"ifname\":\"veth0\",\"master\":\"mgmt\",",
        );
        assert!(e.contains("veth0 has addresses and belongs to mgmt"), "{e}");
        let mut links: serde_json::Value = serde_json::from_str(&addr).unwrap();
        let veth0 = links
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|l| l["ifname"] == "veth0")
            .unwrap();
        veth0["master"] = "mgmt".into();
        veth0["linkinfo"]["info_slave_kind"] = "vrf".into();
        let e = parse(&links.to_string(), "[]", "[]", "", "h")
            .unwrap_err()
            .to_string();
        assert!(e.contains("belongs to mgmt (a vrf)"), "{e}");
        let e = try_with("\"ifname\":\"dummy0\"", "\"ifname\":\"dummy 0\"");
        assert!(e.contains("\"dummy 0\"") && e.contains("dummy"), "{e}");
    }

    /// An edge machine's mobile modem (raw IP: no kind, no MAC, `link/none`) or PPP link with
    /// an address is left behind by name, as a VPN's tunnel is: it was refused for having no
    /// MAC. The default route through it is still refused.
    #[test]
    fn a_modem_or_ppp_link_is_left_behind_unless_the_default_route_uses_it() {
        let d = format!("{}/tests/fixtures/net/dummy", env!("CARGO_MANIFEST_DIR"));
        let mut links: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(format!("{d}/addr.json")).unwrap())
                .unwrap();
        let l = links
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|l| l["ifname"] == "dummy0")
            .unwrap();
        l["ifname"] = "wwan0".into();
        l["link_type"] = "none".into();
        l["flags"] = serde_json::json!(["POINTOPOINT", "NOARP", "UP", "LOWER_UP"]);
        let o = l.as_object_mut().unwrap();
        o.remove("linkinfo");
        o.remove("address");
        o.remove("broadcast");
        let modem = links.to_string();
        let id = parse(&modem, "[]", "[]", "", "h").unwrap();
        assert_eq!(id.left_behind.len(), 1, "{:?}", id.left_behind);
        assert_eq!(id.left_behind[0].name, "wwan0");
        assert!(
            id.left_behind[0].why.contains("mobile modem"),
            "{:?}",
            id.left_behind
        );
        assert!(id.interfaces.iter().all(|i| i.name != "wwan0"));
        let e = parse(
            &modem,
            r#"[{"dst":"default","dev":"wwan0","scope":"link"}]"#,
            "[]",
            "",
            "h",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("wwan0") && e.contains("default route"), "{e}");
        let ppp = modem.replacen(
            "\"ifname\":\"wwan0\"",
            "\"ifname\":\"ppp0\",\"linkinfo\":{\"info_kind\":\"ppp\"}",
            1,
        );
        let id = parse(&ppp, "[]", "[]", "", "h").unwrap();
        assert!(
            id.left_behind[0].name == "ppp0" && id.left_behind[0].why.contains("a PPP link"),
            "{:?}",
            id.left_behind
        );
    }

    /// Captured with `ip` from a network namespace (`-N` for the rules, as `capture` runs it):
    /// veth0 holds 10.9.0.2/24 (default route via 10.9.0.1), 10.9.1.2/24 and
    /// 2001:db8:1::2/64; source routing for 10.9.1.2 (table 100: default via 10.9.1.1) and
    /// 2001:db8:1::/64 (table 400: default via fe80::1); fwmark rules into table 200 (one
    /// with a destination); a source rule into main; and what is not carried: wg-quick's pair
    /// (`not fwmark`, `suppress_prefixlength`), a masked fwmark, and a rule into table 300,
    /// which has no routes (the table does not even exist). Rule 1300 was made `proto static`,
    /// as networkd makes its rules.
    #[test]
    fn policy_rules_and_their_tables_are_carried_and_the_rest_named() {
        let id = fixture("policy").unwrap();
        let rules: Vec<String> = id
            .rules
            .iter()
            .map(|r| format!("{} {}", if r.v6 { 6 } else { 4 }, r.describe()))
            .collect();
        assert_eq!(
            rules,
            [
                "4 pref 998 fwmark 0x20 lookup 200",
                "4 pref 999 to 10.50.0.0/16 fwmark 0x10 lookup 200",
                "4 pref 1000 from 10.9.1.2/32 lookup 100",
                "4 pref 1200 from 10.9.3.0/24 lookup 254",
                "4 pref 1300 from 10.9.4.0/24 lookup 100",
                "6 pref 1000 from 2001:db8:1::/64 lookup 400",
            ]
        );
        let left: Vec<(&str, &str)> = id
            .left_behind
            .iter()
            .map(|l| (l.name.as_str(), l.why.as_str()))
            .collect();
        let names: Vec<&str> = left.iter().map(|l| l.0).collect();
        assert_eq!(
            names,
            [
                "IPv4 rule 899",
                "IPv4 rule 900",
                "IPv4 rule 901",
                "IPv4 rule 1100"
            ],
            "{left:?}"
        );
        assert!(left[0].1.contains("with not"), "{left:?}");
        assert!(left[1].1.contains("suppress_prefixlen"), "{left:?}");
        assert!(left[2].1.contains("fwmask"), "{left:?}");
        assert!(
            left[3].1.contains("lookup 300) whose table has no route"),
            "{left:?}"
        );
        assert_eq!(id.interfaces.len(), 1);
        let routes: Vec<String> = id.interfaces[0]
            .routes
            .iter()
            .map(|r| {
                format!(
                    "{:?} via {:?} metric {:?} table {:?}",
                    r.destination,
                    r.gateway.map(|g| g.to_string()),
                    r.metric,
                    r.table
                )
            })
            .collect();
        assert_eq!(
            routes,
            [
                "None via Some(\"10.9.0.1\") metric None table None",
                "None via Some(\"10.9.1.1\") metric None table Some(100)",
                "Some((10.50.0.0, 16)) via Some(\"10.9.0.1\") metric Some(5) table Some(200)",
                "None via Some(\"fe80::1\") metric Some(1024) table Some(400)",
            ]
        );
        // A saved identity from before rules were carried still reads.
        let mut v = serde_json::to_value(&id).unwrap();
        v.as_object_mut().unwrap().remove("rules");
        for r in v["interfaces"][0]["routes"].as_array_mut().unwrap() {
            r.as_object_mut().unwrap().remove("table");
        }
        let old: NetIdentity = serde_json::from_value(v).unwrap();
        assert!(old.rules.is_empty() && old.interfaces[0].routes[1].table.is_none());
    }

    #[test]
    fn the_tables_a_capture_reads_are_the_numbered_ones_its_rules_name() {
        let d = format!("{}/tests/fixtures/net/policy", env!("CARGO_MANIFEST_DIR"));
        let rules4 = std::fs::read_to_string(format!("{d}/rule4.json")).unwrap();
        assert_eq!(rule_tables(&rules4).unwrap(), [100, 200, 300, 51820]);
        let named = r#"[{"priority":5,"src":"all","table":"main"},{"priority":6,"src":"all","table":"vpn"}]"#;
        assert!(rule_tables(named).unwrap().is_empty());
        // A table known only by name (captured without -N) is named, not guessed.
        let id = parse_with_policy(
            &std::fs::read_to_string(format!("{d}/addr.json")).unwrap(),
            "[]",
            "[]",
            "",
            "h",
            &PolicyText {
                rules4: named,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(id.rules.len(), 1, "{:?}", id.rules);
        assert!(
            id.left_behind[0].name == "IPv4 rule 6" && id.left_behind[0].why.contains("table vpn"),
            "{:?}",
            id.left_behind
        );
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
