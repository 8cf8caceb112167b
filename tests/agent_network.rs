//! `reinstall network` captures a real network configuration (built in a network namespace
//! this test creates: veth pairs, since this kernel has no dummy links) and renders it.

use integration_tests::*;

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
    let files: Vec<&str> = v["networkd"]
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
