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
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/tests/fixtures/net/vlan-bond");
    let r = |f: &str| std::fs::read_to_string(fx.join(f)).unwrap();
    let id = agent::netid::parse(
        &r("addr.json"),
        &r("route4.json"),
        &r("route6.json"),
        &r("resolv.conf"),
        &r("hostname"),
    )
    .unwrap();
    let dir = scratch();
    let saved = dir.path().join("network.json");
    std::fs::write(&saved, serde_json::to_vec_pretty(&id).unwrap()).unwrap();
    let root = dir.path().join("root");
    render_into(&saved, "netplan", &root);
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
    for (file, section, line) in want {
        let text = std::fs::read_to_string(gen.join(file))
            .unwrap_or_else(|_| panic!("netplan wrote no {file}; it wrote:\n{all}"));
        let body = text
            .split(&format!("[{section}]\n"))
            .nth(1)
            .map(|b| b.split("\n[").next().unwrap())
            .unwrap_or_else(|| panic!("{file} has no [{section}]:\n{text}"));
        assert!(
            body.lines().any(|l| l == line),
            "{file} [{section}] lacks {line}:\n{text}"
        );
    }
    assert!(
        !names
            .iter()
            .any(|n| n.contains("eth0") || n.contains("eth1")),
        "members are named by the renderer, not by the old kernel: {names:?}"
    );
}
