//! `reinstall network` captures a real network configuration (built in a network namespace
//! this test creates: veth pairs, since this kernel has no dummy links) and renders it.

use integration_tests::*;
use std::path::Path;

struct Netns(String);
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

#[test]
fn a_32_with_onlink_gateway_and_ipv6_only_nic_survive_capture_and_rendering() {
    let ns = Netns(format!("rt-{}", std::process::id()));
    let n = &ns.0;
    sh(&format!(
        "ip netns add {n}
         ip -n {n} link add veth0 address 52:54:00:aa:bb:01 type veth peer name veth1 address 52:54:00:aa:bb:02
         ip -n {n} link set lo up; ip -n {n} link set veth0 up mtu 9000; ip -n {n} link set veth1 up
         ip -n {n} addr add 203.0.113.10/32 dev veth0
         ip -n {n} route add 198.51.100.1 dev veth0 scope link
         ip -n {n} route add default via 198.51.100.1 dev veth0 onlink
         ip -n {n} addr add 2001:db8::10/128 dev veth1 nodad
         ip -n {n} -6 route add default via fe80::1 dev veth1"
    ));
    let out = ok(std::process::Command::new("ip")
        .args(["netns", "exec", n])
        .arg(bin("reinstall"))
        .args(["network", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ifaces = v["identity"]["interfaces"].as_array().unwrap();
    assert_eq!(ifaces.len(), 2, "{out}");
    let files: Vec<&str> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["contents"].as_str().unwrap())
        .collect();
    let all = files.join("\n");
    for want in [
        "MACAddress=52:54:00:aa:bb:01",
        "MTUBytes=9000",
        "Address=203.0.113.10/32",
        "Gateway=198.51.100.1\nGatewayOnLink=yes",
        "MACAddress=52:54:00:aa:bb:02",
        "Address=2001:db8::10/128",
        "Gateway=fe80::1",
    ] {
        assert!(all.contains(want), "{want:?} missing from:\n{all}");
    }
}

/// A hypervisor-shaped machine, built in network namespaces: its address and default route
/// on bridge br0 (STP on, forward delay 4 s) of eth0 (a veth whose peer stays in the
/// namespace, standing in for a NIC), with a tap on br0 as a VM's port; Docker's docker0
/// with a veth into a second namespace (a container); a VPN's tun0. `reinstall network`
/// carries br0 with eth0 only and names docker0 and tun0 as left behind; moving the default
/// route onto tun0 makes it refuse, naming tun0.
#[test]
fn a_bridge_is_carried_and_container_and_vpn_links_are_left_behind_by_name() {
    let ns = Netns(format!("rt-br-{}", std::process::id()));
    let ctr = Netns(format!("rt-ctr-{}", std::process::id()));
    let (n, c) = (&ns.0, &ctr.0);
    sh(&format!(
        "ip netns add {n}; ip netns add {c}
         ip -n {n} link add eth0 address 52:54:00:00:01:01 type veth peer name wire0
         ip -n {n} link add br0 address 52:54:00:00:01:01 type bridge stp_state 1 forward_delay 400
         ip -n {n} link set eth0 master br0
         ip -n {n} tuntap add vnet0 mode tap; ip -n {n} link set vnet0 master br0
         ip -n {n} link add docker0 type bridge
         ip -n {n} link add veth1234 type veth peer name eth0 netns {c}
         ip -n {n} link set veth1234 master docker0
         ip -n {n} tuntap add tun0 mode tun
         for l in lo eth0 wire0 br0 vnet0 docker0 veth1234 tun0; do ip -n {n} link set $l up; done
         ip -n {n} addr add 192.0.2.10/24 dev br0
         ip -n {n} route add default via 192.0.2.1 dev br0
         ip -n {n} addr add 172.17.0.1/16 dev docker0
         ip -n {n} addr add 10.8.0.2/24 dev tun0"
    ));
    let network = |json: bool| {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", n]).arg(bin("reinstall"));
        cmd.arg("network");
        if json {
            cmd.arg("--json");
        }
        cmd
    };
    let out = ok(&mut network(true));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = &v["identity"];
    let names: Vec<&str> = id["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["eth0", "br0"], "{out}");
    assert_eq!(
        id["interfaces"][1]["kind"],
        serde_json::json!({"type": "bridge", "ports": ["eth0"], "stp": true, "forward_delay_s": 4}),
        "{out}"
    );
    assert_eq!(left_behind(id), ["docker0", "tun0"], "{out}");
    let text = ok(&mut network(false));
    for want in [
        "# not carried: docker0: a bridge with no port out of this machine",
        "# not carried: tun0: a tun/tap device",
        "Kind=bridge\nMACAddress=52:54:00:00:01:01",
        "[Network]\nBridge=br0\n",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
    assert!(
        !text.contains("vnet0") && !text.contains("172.17.0.1"),
        "{text}"
    );
    sh(&format!(
        "ip -n {n} route del default; ip -n {n} route add default dev tun0"
    ));
    let e = fails(&mut network(false));
    assert!(
        e.contains("tun0") && e.contains("default route goes through it"),
        "{e}"
    );
}

/// The files `reinstall network --from ID --stack S --json` renders, written into `root` as
/// the agent writes them into a target tree.
fn render_into(id: &Path, stack: &str, root: &Path) {
    let out = ok(reinstall()
        .args(["network", "--json", "--stack", stack, "--from"])
        .arg(id));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for f in v["files"].as_array().unwrap() {
        let p = root.join(f["path"].as_str().unwrap());
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, f["contents"].as_str().unwrap()).unwrap();
        let mode = f["mode"].as_u64().unwrap() as u32;
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    }
}

/// A bond (eth0 primary + eth1, active-backup) with VLAN 100 on it and VLAN 200 on a third
/// NIC without addresses (the agent's capture fixture, parsed by the agent's own parser and
/// saved as a job saves it) is rendered for netplan, and netplan's own generator reads it:
/// the systemd-networkd files it writes carry the same bond, members, VLANs and addresses.
/// (This kernel has no bonding or 802.1q driver, so the capture itself is tested from `ip`'s
/// saved output, and the rendering for networkd by `vm-harness full --bond`.)
#[test]
fn netplan_itself_reads_the_bond_and_vlans_rendered_for_it() {
    let dir = scratch();
    let gen = netplan_generate("vlan-bond", dir.path());
    // (file, section, line): what the bond and VLANs must become.
    let want = [
        ("10-netplan-bond0.netdev", "NetDev", "Kind=bond"),
        (
            "10-netplan-bond0.netdev",
            "NetDev",
            "MACAddress=52:54:00:00:00:01",
        ),
        ("10-netplan-bond0.netdev", "NetDev", "MTUBytes=9000"),
        ("10-netplan-bond0.netdev", "Bond", "Mode=active-backup"),
        ("10-netplan-bond0.netdev", "Bond", "MIIMonitorSec=100ms"),
        ("10-netplan-bond0.netdev", "Bond", "UpDelaySec=200ms"),
        (
            "10-netplan-bond0.network",
            "Network",
            "Address=192.0.2.10/24",
        ),
        ("10-netplan-bond0.network", "Network", "VLAN=bond0.100"),
        ("10-netplan-bond0.network", "Network", "DNS=192.0.2.53"),
        ("10-netplan-bond0.network", "Route", "Gateway=192.0.2.1"),
        (
            "10-netplan-rnic0.link",
            "Match",
            "PermanentMACAddress=52:54:00:00:00:01",
        ),
        ("10-netplan-rnic0.link", "Link", "Name=rnic0"),
        ("10-netplan-rnic0.network", "Network", "Bond=bond0"),
        ("10-netplan-rnic0.network", "Network", "PrimarySlave=true"),
        (
            "10-netplan-rnic1.link",
            "Match",
            "PermanentMACAddress=52:54:00:00:00:02",
        ),
        ("10-netplan-rnic1.network", "Network", "Bond=bond0"),
        ("10-netplan-bond0.100.netdev", "NetDev", "Kind=vlan"),
        ("10-netplan-bond0.100.netdev", "VLAN", "Id=100"),
        (
            "10-netplan-bond0.100.network",
            "Network",
            "Address=198.51.100.7/24",
        ),
        (
            "10-netplan-bond0.100.network",
            "Route",
            "Destination=203.0.113.0/24",
        ),
        (
            "10-netplan-bond0.100.network",
            "Route",
            "Gateway=198.51.100.1",
        ),
        (
            "10-netplan-rnic2.network",
            "Match",
            "PermanentMACAddress=52:54:00:00:00:03",
        ),
        ("10-netplan-rnic2.network", "Network", "VLAN=eth2.200"),
        (
            "10-netplan-eth2.200.netdev",
            "NetDev",
            "MACAddress=52:54:00:00:00:03",
        ),
        ("10-netplan-eth2.200.netdev", "VLAN", "Id=200"),
        (
            "10-netplan-eth2.200.network",
            "Network",
            "Address=2001:db8:200::7/64",
        ),
    ];
    gen.assert_has(&want);
    assert!(
        !gen.names
            .iter()
            .any(|n| n.contains("eth0") || n.contains("eth1")),
        "members are named by the renderer, not by the old kernel: {:?}",
        gen.names
    );
}

/// An ARP-monitored bond (the vlan-bond capture monitoring by ARP: every 500 ms, two
/// targets, validating on the active link, all targets required), rendered for netplan:
/// netplan's own generator turns it into the same ARP monitoring for systemd-networkd.
#[test]
fn netplan_itself_reads_the_arp_monitored_bond_rendered_for_it() {
    let dir = scratch();
    let gen = netplan_generate("arp-bond", dir.path());
    let f = "10-netplan-bond0.netdev";
    gen.assert_has(&[
        (f, "Bond", "Mode=active-backup"),
        (f, "Bond", "ARPIntervalSec=500ms"),
        (f, "Bond", "ARPIPTargets=192.0.2.1 192.0.2.254"),
        (f, "Bond", "ARPValidate=active"),
        (f, "Bond", "ARPAllTargets=all"),
        ("10-netplan-rnic0.network", "Network", "Bond=bond0"),
        (
            "10-netplan-bond0.network",
            "Network",
            "Address=192.0.2.10/24",
        ),
    ]);
    assert!(!gen.all.contains("MIIMonitorSec"), "{}", gen.all);
}

/// VLAN 100 on bridge br0 (the bridge fixture plus the VLAN, with its own address and a
/// route through it), rendered for netplan: netplan's generator has br0 create the VLAN.
#[test]
fn netplan_itself_reads_a_vlan_on_a_bridge_rendered_for_it() {
    let dir = scratch();
    let gen = netplan_generate("bridge-vlan", dir.path());
    let v = "10-netplan-br0.100";
    gen.assert_has(&[
        ("10-netplan-br0.netdev", "NetDev", "Kind=bridge"),
        ("10-netplan-br0.network", "Network", "VLAN=br0.100"),
        (&format!("{v}.netdev"), "NetDev", "Kind=vlan"),
        (&format!("{v}.netdev"), "VLAN", "Id=100"),
        (
            &format!("{v}.network"),
            "Network",
            "Address=198.51.100.7/24",
        ),
        (
            &format!("{v}.network"),
            "Route",
            "Destination=203.0.113.0/24",
        ),
        (&format!("{v}.network"), "Route", "Gateway=198.51.100.1"),
    ]);
}

/// The bridge fixture (br0 of eth0, STP on, forward delay 4 s; docker0 and tun0 left
/// behind), rendered for netplan and read by netplan's own generator.
#[test]
fn netplan_itself_reads_the_bridge_rendered_for_it() {
    let dir = scratch();
    let gen = netplan_generate("bridge", dir.path());
    gen.assert_has(&[
        ("10-netplan-br0.netdev", "NetDev", "Kind=bridge"),
        (
            "10-netplan-br0.netdev",
            "NetDev",
            "MACAddress=52:54:00:00:01:01",
        ),
        ("10-netplan-br0.netdev", "Bridge", "STP=true"),
        ("10-netplan-br0.netdev", "Bridge", "ForwardDelaySec=4"),
        ("10-netplan-br0.network", "Network", "Address=192.0.2.10/24"),
        (
            "10-netplan-br0.network",
            "Network",
            "Address=2001:db8::10/64",
        ),
        ("10-netplan-br0.network", "Network", "DNS=192.0.2.53"),
        ("10-netplan-br0.network", "Route", "Gateway=192.0.2.1"),
        (
            "10-netplan-rnic0.link",
            "Match",
            "PermanentMACAddress=52:54:00:00:01:01",
        ),
        ("10-netplan-rnic0.link", "Link", "Name=rnic0"),
        ("10-netplan-rnic0.network", "Network", "Bridge=br0"),
    ]);
    assert!(
        !gen.all.contains("docker0") && !gen.all.contains("tun0"),
        "{}",
        gen.all
    );
}

/// The dummy fixture (two NICs and dummy0 with an anycast address): netplan 0.106 has no
/// `dummy-devices`, so the YAML leaves dummy0 out, netplan's generator still reads it, and
/// dummy0 is created by networkd files written beside it.
#[test]
fn netplan_reads_the_nics_rendered_beside_a_dummy_left_to_networkd() {
    let dir = scratch();
    let gen = netplan_generate("dummy", dir.path());
    gen.assert_has(&[
        (
            "10-netplan-rnic0.network",
            "Network",
            "Address=203.0.113.10/32",
        ),
        ("10-netplan-rnic0.network", "Network", "DNS=192.0.2.53"),
    ]);
    assert!(!gen.all.contains("dummy0"), "{}", gen.all);
    let nd = dir.path().join("root/etc/systemd/network");
    let netdev = std::fs::read_to_string(nd.join("05-reinstall-dummy0.netdev")).unwrap();
    assert!(netdev.contains("Name=dummy0\nKind=dummy\n"), "{netdev}");
    let network = std::fs::read_to_string(nd.join("05-reinstall-dummy0.network")).unwrap();
    assert!(
        network.contains("[Match]\nName=dummy0\n")
            && network.contains("Address=192.0.2.53/32\n")
            && network.contains("Address=2001:db8:53::53/128\n"),
        "{network}"
    );
}

/// A multi-homed machine's policy routing, built in a network namespace: replies from its
/// second address leave through that address's own gateway (table 100), marked traffic to
/// 10.50.0.0/16 takes table 200, IPv6 from its prefix table 400; beside them wg-quick's pair
/// of rules (`not fwmark`, `suppress_prefixlength`). `reinstall network` carries the first
/// three with their tables' routes, names wg-quick's as left behind, and netplan's own
/// generator reads what is rendered for it.
#[test]
fn policy_routing_is_captured_live_and_netplan_reads_what_it_becomes() {
    let ns = Netns(format!("rt-pol-{}", std::process::id()));
    let n = &ns.0;
    sh(&format!(
        "ip netns add {n}
         ip -n {n} link add eth0 address 52:54:00:aa:dd:01 type veth peer name wire0
         for l in lo eth0 wire0; do ip -n {n} link set $l up; done
         ip -n {n} addr add 10.9.0.2/24 dev eth0
         ip -n {n} addr add 10.9.1.2/24 dev eth0
         ip -n {n} addr add 2001:db8:1::2/64 dev eth0 nodad
         ip -n {n} route add default via 10.9.0.1 dev eth0
         ip -n {n} rule add from 10.9.1.2 lookup 100 pref 1000
         ip -n {n} route add default via 10.9.1.1 dev eth0 table 100
         ip -n {n} rule add to 10.50.0.0/16 fwmark 0x10 lookup 200 pref 999
         ip -n {n} route add 10.50.0.0/16 via 10.9.0.1 dev eth0 table 200
         ip -n {n} -6 rule add from 2001:db8:1::/64 lookup 400 pref 1000
         ip -n {n} -6 route add default via fe80::1 dev eth0 table 400
         ip -n {n} rule add not fwmark 0xca6c lookup 51820 pref 899
         ip -n {n} rule add lookup main suppress_prefixlength 0 pref 900"
    ));
    let out = ok(std::process::Command::new("ip")
        .args(["netns", "exec", n])
        .arg(bin("reinstall"))
        .args(["network", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = &v["identity"];
    let rules: Vec<(u64, bool, u64)> = id["rules"]
        .as_array()
        .unwrap_or_else(|| panic!("no rules: {out}"))
        .iter()
        .map(|r| {
            (
                r["priority"].as_u64().unwrap(),
                r["v6"].as_bool().unwrap(),
                r["table"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rules,
        [(999, false, 200), (1000, false, 100), (1000, true, 400)],
        "{out}"
    );
    assert_eq!(left_behind(id), ["IPv4 rule 899", "IPv4 rule 900"], "{out}");
    let dir = scratch();
    let saved = dir.path().join("network.json");
    std::fs::write(&saved, serde_json::to_vec_pretty(id).unwrap()).unwrap();
    let gen = netplan_generate_saved(&saved, dir.path());
    gen.assert_has(&[
        ("10-netplan-rnic0.network", "Route", "Table=100"),
        (
            "10-netplan-rnic0.network",
            "RoutingPolicyRule",
            "From=10.9.1.2/32",
        ),
        (
            "10-netplan-rnic0.network",
            "RoutingPolicyRule",
            "Priority=1000",
        ),
        (
            "10-netplan-rnic0.network",
            "RoutingPolicyRule",
            "To=10.50.0.0/16",
        ),
        (
            "10-netplan-rnic0.network",
            "RoutingPolicyRule",
            "FirewallMark=16",
        ),
        (
            "10-netplan-rnic0.network",
            "RoutingPolicyRule",
            "From=2001:db8:1::/64",
        ),
    ]);
    for (want, n) in [
        ("[RoutingPolicyRule]", 3),
        ("Table=100", 2),
        ("Table=200", 2),
        ("Table=400", 2),
    ] {
        assert_eq!(gen.all.matches(want).count(), n, "{want}:\n{}", gen.all);
    }
}

/// The names in a captured identity's `left_behind`.
fn left_behind(id: &serde_json::Value) -> Vec<&str> {
    id["left_behind"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect()
}

/// What netplan's generator wrote for a rendered identity.
struct Generated {
    dir: std::path::PathBuf,
    names: Vec<String>,
    all: String,
}

impl Generated {
    /// Each `(file, section, line)` is a line of a section of that name (of one of them,
    /// where the file has several) of that file.
    fn assert_has(&self, want: &[(&str, &str, &str)]) {
        for (file, section, line) in want {
            let text = std::fs::read_to_string(self.dir.join(file))
                .unwrap_or_else(|_| panic!("netplan wrote no {file}; it wrote:\n{}", self.all));
            let bodies: Vec<&str> = text
                .split(&format!("[{section}]\n"))
                .skip(1)
                .map(|b| b.split("\n[").next().unwrap())
                .collect();
            assert!(!bodies.is_empty(), "{file} has no [{section}]:\n{text}");
            assert!(
                bodies.iter().any(|b| b.lines().any(|l| l == *line)),
                "{file} [{section}] lacks {line}:\n{text}"
            );
        }
    }
}

/// Parses the agent's capture fixture `name` with the agent's own parser, saves it as a job
/// saves it, renders it for netplan into `dir/root` and runs `netplan generate` there.
fn netplan_generate(name: &str, dir: &Path) -> Generated {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../agent/tests/fixtures/net")
        .join(name);
    let r = |f: &str| std::fs::read_to_string(fx.join(f)).unwrap();
    let id = agent::netid::parse(
        &r("addr.json"),
        &r("route4.json"),
        &r("route6.json"),
        &r("resolv.conf"),
        &r("hostname"),
    )
    .unwrap();
    let saved = dir.join("network.json");
    std::fs::write(&saved, serde_json::to_vec_pretty(&id).unwrap()).unwrap();
    netplan_generate_saved(&saved, dir)
}

/// Renders the saved identity `saved` for netplan into `dir/root` and runs `netplan
/// generate` there.
fn netplan_generate_saved(saved: &Path, dir: &Path) -> Generated {
    let root = dir.join("root");
    render_into(saved, "netplan", &root);
    ok(std::process::Command::new("netplan")
        .args(["generate", "--root-dir"])
        .arg(&root));
    let gen = root.join("run/systemd/network");
    let mut all = String::new();
    let mut names: Vec<String> = std::fs::read_dir(&gen)
        .unwrap_or_else(|e| panic!("{}: {e}", gen.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for n in &names {
        all += &format!("# {n}\n{}\n", std::fs::read_to_string(gen.join(n)).unwrap());
    }
    Generated {
        dir: gen,
        names,
        all,
    }
}

/// On a machine whose `ip` is too old (it refuses `-N`, or prints rules as text despite
/// `-j`), `reinstall network` and so `plan` stop with the command and the reason, before
/// anything is written. The old `ip` is a wrapper first in PATH around this machine's own.
#[test]
fn an_iproute2_too_old_for_the_capture_is_named_as_the_reason() {
    let w = scratch();
    let real = sh("command -v ip");
    for (name, rule) in [
        (
            "no-numeric",
            "echo 'Option \"-N\" is unknown, try \"ip -help\".' >&2; exit 255",
        ),
        (
            "text-rules",
            "printf '0:\\tfrom all lookup local\\n32766:\\tfrom all lookup main\\n'; exit 0",
        ),
    ] {
        let dir = w.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let script = format!(
            "#!/bin/sh\ncase \" $* \" in *' rule '*) {rule};; esac\nexec {} \"$@\"\n",
            real.trim()
        );
        let ip = dir.join("ip");
        std::fs::write(&ip, script).unwrap();
        sh(&format!("chmod +x {}", ip.display()));
        let path = format!("{}:{}", dir.display(), std::env::var("PATH").unwrap());
        let err = fails(
            std::process::Command::new(bin("reinstall"))
                .arg("network")
                .env("PATH", path),
        );
        assert!(
            err.contains("ip -j -N -4 rule show")
                && err.contains("this machine's iproute2 is too old to capture its network"),
            "{name}: {err}"
        );
        let detail = if name == "no-numeric" {
            "Option \"-N\" is unknown"
        } else {
            "printed text, not JSON (\"0:\\tfrom all lookup local\")"
        };
        assert!(err.contains(detail), "{name}: {err}");
    }
}
