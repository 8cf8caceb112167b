//! Windows targets, installed from the rescue OS onto disk 1: ESP, MSR and an NTFS volume
//! made with the partition's real start and a conventional geometry (`mkntfs`), the bundle's
//! pipable WIM applied onto the unmounted volume by wimlib straight from the bundle stream,
//! the media's WinPE copied onto the ESP (its stage script runs Windows's own `bcdboot` on
//! the first boot of disk 1), and the identity the machine keeps: `unattend.xml` (specialize
//! pass: computer name, static addresses, routes and DNS per NIC keyed by MAC, RDP with its
//! firewall group; OOBE skipped) and a first-boot script run by `SetupComplete.cmd` for what
//! unattend cannot say (on-link and IPv6 link-local gateways, OpenSSH Server with the carried
//! host keys and authorized keys, hibernation and fast start off).
//!
//! Windows calls home itself (target-up) from the first-boot script, with the host's identity
//! as PKCS#12; then it makes its boot manager the default.

use crate::netid::{Interface, NetIdentity, Route};
use anyhow::{ensure, Context, Result};
use bundle::tree::{Entry, EntryData, EntryKind, Sink};
use bundle::windows::{Meta, ESP_DIR, IMAGE, META, VOLUME_DIR};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const COMPONENT: &str = r#"processorArchitecture="amd64" publicKeyToken="31bf3856ad364e35" language="neutral" versionScope="nonSxS""#;

/// A NetBIOS-safe computer name from a host name: the first label, at most 15 characters of
/// `A-Z a-z 0-9 -`, not only digits.
pub fn computer_name(hostname: &str) -> Result<String> {
    let first = hostname.split('.').next().unwrap_or_default();
    let name: String = first
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(15)
        .collect();
    let name = name.trim_matches('-').to_string();
    ensure!(
        !name.is_empty() && !name.chars().all(|c| c.is_ascii_digit()),
        "host name {hostname:?} gives no usable Windows computer name (1-15 of A-Z, 0-9, '-', not only digits)"
    );
    Ok(name)
}

/// `52:54:00:12:34:56` as Windows writes it: `52-54-00-12-34-56`.
fn win_mac(mac: &str) -> String {
    mac.replace(':', "-").to_ascii_uppercase()
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// Whether unattend's TCPIP component can carry `r` (a gateway inside one of the NIC's
/// subnets, not on-link only, not link-local); the rest goes to the first-boot script.
fn unattend_route(iface: &Interface, r: &Route) -> bool {
    let Some(gw) = r.gateway else {
        return false;
    };
    if r.onlink {
        return false;
    }
    if let IpAddr::V6(v6) = gw {
        if v6.segments()[0] & 0xffc0 == 0xfe80 {
            return false;
        }
    }
    iface
        .addresses
        .iter()
        .any(|a| !a.dynamic && in_subnet(a.address, a.prefix, gw))
}

fn in_subnet(addr: IpAddr, prefix: u8, ip: IpAddr) -> bool {
    match (addr, ip) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            u32::from(a) & m == u32::from(b) & m
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            u128::from(a) & m == u128::from(b) & m
        }
        _ => false,
    }
}

fn prefix_of(r: &Route, gw: IpAddr) -> String {
    match r.destination {
        Some((d, p)) => format!("{d}/{p}"),
        None if gw.is_ipv4() => "0.0.0.0/0".into(),
        None => "::/0".into(),
    }
}

/// Refuses, naming the interface, an identity Windows' answer file cannot carry: bonds
/// (NIC teams are made with PowerShell after setup, not in unattend), bridges, VLANs and
/// dummy interfaces.
pub fn check_network(id: &NetIdentity) -> Result<()> {
    if let Some(i) = id.interfaces.iter().find(|i| !i.is_ethernet()) {
        anyhow::bail!(
            "interface {} is a {}: carrying bonds, bridges, VLANs and dummy interfaces into Windows is not supported (its answer file cannot make them); reinstall this machine with a Linux target, or move its address to a plain interface first",
            i.name,
            i.kind.label()
        );
    }
    if let Some(r) = id.rules.first() {
        anyhow::bail!(
            "routing policy rule {}: carrying policy routing into Windows is not supported; reinstall this machine with a Linux target, or remove the rule first",
            r.describe()
        );
    }
    Ok(())
}

/// `unattend.xml` for the specialize pass.
pub fn render_unattend(id: &NetIdentity, admin_password: &str) -> Result<String> {
    check_network(id)?;
    let name = computer_name(&id.hostname)?;
    let mut s = String::new();
    let _ = writeln!(s, r#"<?xml version="1.0" encoding="utf-8"?>"#);
    let _ = writeln!(
        s,
        "<!-- Written by reinstall: the identity of {}. -->",
        // "--" may not appear inside an XML comment.
        xml(&id.hostname).replace("--", "- -")
    );
    let _ = writeln!(
        s,
        r#"<unattend xmlns="urn:schemas-microsoft-com:unattend" xmlns:wcm="http://schemas.microsoft.com/WMIConfig/2002/State">"#
    );
    let _ = writeln!(s, r#"  <settings pass="specialize">"#);
    let _ = writeln!(
        s,
        r#"    <component name="Microsoft-Windows-Shell-Setup" {COMPONENT}>
      <ComputerName>{}</ComputerName>
    </component>"#,
        xml(&name)
    );
    let _ = writeln!(
        s,
        r#"    <component name="Microsoft-Windows-TCPIP" {COMPONENT}>"#
    );
    let _ = writeln!(s, "      <Interfaces>");
    for iface in &id.interfaces {
        let (v4_dhcp, v6_dhcp, v6_static) = (
            iface.has(true, false),
            iface.has(true, true),
            iface.has(false, true),
        );
        let _ = writeln!(s, r#"        <Interface wcm:action="add">"#);
        let _ = writeln!(
            s,
            "          <Identifier>{}</Identifier>",
            win_mac(&iface.mac)
        );
        let _ = writeln!(
            s,
            "          <Ipv4Settings>\n            <DhcpEnabled>{v4_dhcp}</DhcpEnabled>\n          </Ipv4Settings>"
        );
        let _ = writeln!(
            s,
            "          <Ipv6Settings>\n            <DhcpEnabled>{v6_dhcp}</DhcpEnabled>\n            <RouterDiscoveryEnabled>{}</RouterDiscoveryEnabled>\n          </Ipv6Settings>",
            !v6_static
        );
        let statics: Vec<_> = iface.addresses.iter().filter(|a| !a.dynamic).collect();
        if !statics.is_empty() {
            let _ = writeln!(s, "          <UnicastIpAddresses>");
            for (i, a) in statics.iter().enumerate() {
                let _ = writeln!(
                    s,
                    r#"            <IpAddress wcm:action="add" wcm:keyValue="{}">{}/{}</IpAddress>"#,
                    i + 1,
                    a.address,
                    a.prefix
                );
            }
            let _ = writeln!(s, "          </UnicastIpAddresses>");
        }
        let routes: Vec<&Route> = iface
            .routes
            .iter()
            .filter(|r| unattend_route(iface, r))
            .collect();
        if !routes.is_empty() {
            let _ = writeln!(s, "          <Routes>");
            for (i, r) in routes.iter().enumerate() {
                let gw = r.gateway.expect("filtered");
                let _ = writeln!(
                    s,
                    r#"            <Route wcm:action="add">
              <Identifier>{}</Identifier>
              <Prefix>{}</Prefix>
              <NextHopAddress>{gw}</NextHopAddress>
              <Metric>{}</Metric>
            </Route>"#,
                    i + 1,
                    prefix_of(r, gw),
                    r.metric.unwrap_or(10)
                );
            }
            let _ = writeln!(s, "          </Routes>");
        }
        let _ = writeln!(s, "        </Interface>");
    }
    let _ = writeln!(s, "      </Interfaces>\n    </component>");
    let _ = writeln!(
        s,
        r#"    <component name="Microsoft-Windows-DNS-Client" {COMPONENT}>"#
    );
    if !id.dns.search.is_empty() {
        let _ = writeln!(s, "      <DNSSuffixSearchOrder>");
        for (i, d) in id.dns.search.iter().enumerate() {
            let _ = writeln!(
                s,
                r#"        <DomainName wcm:action="add" wcm:keyValue="{}">{}</DomainName>"#,
                i + 1,
                xml(d)
            );
        }
        let _ = writeln!(s, "      </DNSSuffixSearchOrder>");
    }
    let _ = writeln!(s, "      <Interfaces>");
    for iface in &id.interfaces {
        let _ = writeln!(
            s,
            r#"        <Interface wcm:action="add">
          <Identifier>{}</Identifier>
          <DNSServerSearchOrder>"#,
            win_mac(&iface.mac)
        );
        for (i, d) in id.dns.servers.iter().enumerate() {
            let _ = writeln!(
                s,
                r#"            <IpAddress wcm:action="add" wcm:keyValue="{}">{d}</IpAddress>"#,
                i + 1
            );
        }
        let _ = writeln!(s, "          </DNSServerSearchOrder>\n        </Interface>");
    }
    let _ = writeln!(s, "      </Interfaces>\n    </component>");
    let _ = writeln!(
        s,
        r#"    <component name="Microsoft-Windows-TerminalServices-LocalSessionManager" {COMPONENT}>
      <fDenyTSConnections>false</fDenyTSConnections>
    </component>
    <component name="Networking-MPSSVC-Svc" {COMPONENT}>
      <FirewallGroups>
        <FirewallGroup wcm:action="add" wcm:keyValue="RemoteDesktop">
          <Active>true</Active>
          <Group>Remote Desktop</Group>
          <Profile>all</Profile>
        </FirewallGroup>
      </FirewallGroups>
    </component>"#
    );
    let _ = writeln!(s, "  </settings>");
    // The first boot runs without anyone at the console: OOBE asks nothing. The Administrator
    // password is random and written nowhere else (SetupComplete.cmd deletes this file): the
    // way in is SSH with the carried keys, which can set one for RDP.
    let _ = writeln!(
        s,
        r#"  <settings pass="oobeSystem">
    <component name="Microsoft-Windows-Shell-Setup" {COMPONENT}>
      <OOBE>
        <HideEULAPage>true</HideEULAPage>
        <HideLocalAccountScreen>true</HideLocalAccountScreen>
        <HideOEMRegistrationScreen>true</HideOEMRegistrationScreen>
        <HideOnlineAccountScreens>true</HideOnlineAccountScreens>
        <HideWirelessSetupInOOBE>true</HideWirelessSetupInOOBE>
        <ProtectYourPC>3</ProtectYourPC>
      </OOBE>
      <UserAccounts>
        <AdministratorPassword>
          <Value>{}</Value>
          <PlainText>true</PlainText>
        </AdministratorPassword>
      </UserAccounts>
    </component>
    <component name="Microsoft-Windows-International-Core" {COMPONENT}>
      <InputLocale>en-US</InputLocale>
      <SystemLocale>en-US</SystemLocale>
      <UserLocale>en-US</UserLocale>
    </component>
  </settings>
</unattend>"#,
        xml(admin_password)
    );
    Ok(s)
}

/// The first-boot script (PowerShell, run once as SYSTEM from SetupComplete.cmd): the routes
/// unattend cannot carry, each NIC found by MAC; OpenSSH Server on with its firewall rule;
/// hibernation and fast start off.
pub fn render_firstboot(id: &NetIdentity, call: Option<&CallHome>) -> String {
    let mut s = String::from(
        "# Written by reinstall: what unattend.xml cannot say. Runs once, as SYSTEM.\n$ErrorActionPreference = 'Continue'\n$r = Join-Path $env:SystemDrive 'reinstall'\n",
    );
    for iface in &id.interfaces {
        let extra: Vec<&Route> = iface
            .routes
            .iter()
            .filter(|r| r.gateway.is_some() && !unattend_route(iface, r))
            .collect();
        if extra.is_empty() {
            continue;
        }
        let _ = writeln!(
            s,
            "$if = (Get-NetAdapter | Where-Object {{ $_.MacAddress -eq '{}' }}).ifIndex",
            win_mac(&iface.mac)
        );
        for r in extra {
            let gw = r.gateway.expect("filtered");
            if r.onlink {
                // The gateway is on the link although outside every subnet: a host route to
                // it first, as Linux's `onlink` means.
                let host = if gw.is_ipv4() { 32 } else { 128 };
                let on_link = if gw.is_ipv4() { "0.0.0.0" } else { "::" };
                let _ = writeln!(
                    s,
                    "New-NetRoute -InterfaceIndex $if -DestinationPrefix '{gw}/{host}' -NextHop '{on_link}' -PolicyStore PersistentStore"
                );
            }
            let _ = writeln!(
                s,
                "New-NetRoute -InterfaceIndex $if -DestinationPrefix '{}' -NextHop '{gw}' -RouteMetric {} -PolicyStore PersistentStore",
                prefix_of(r, gw),
                r.metric.unwrap_or(10)
            );
        }
    }
    s.push_str(
        "Add-WindowsCapability -Online -Name OpenSSH.Server~~~~0.0.1.0\n\
         $ssh = Join-Path $env:ProgramData 'ssh'\n\
         New-Item -ItemType Directory -Force -Path $ssh | Out-Null\n\
         Get-ChildItem (Join-Path $r 'ssh') -File -ErrorAction SilentlyContinue | ForEach-Object {\n\
         \x20 Copy-Item $_.FullName (Join-Path $ssh $_.Name) -Force\n\
         \x20 icacls (Join-Path $ssh $_.Name) /inheritance:r /grant 'SYSTEM:F' /grant '*S-1-5-32-544:F' | Out-Null\n\
         }\n\
         Set-Service -Name sshd -StartupType Automatic\n\
         Start-Service sshd\n\
         if (-not (Get-NetFirewallRule -Name 'OpenSSH-Server-In-TCP' -ErrorAction SilentlyContinue)) {\n\
         \x20 New-NetFirewallRule -Name 'OpenSSH-Server-In-TCP' -DisplayName 'OpenSSH Server (sshd)' -Enabled True -Direction Inbound -Protocol TCP -Action Allow -LocalPort 22\n\
         }\n\
         powercfg /hibernate off\n\
         Set-ItemProperty -Path 'HKLM:\\SYSTEM\\CurrentControlSet\\Control\\Session Manager\\Power' -Name HiberbootEnabled -Value 0\n",
    );
    if let Some(c) = call {
        // target-up: the stager hears from Windows itself, over mutual TLS with the host's
        // identity; only then does Windows become the default boot (the rescue stays in the
        // order). Never reached: the next boot is the rescue OS, which reports the failure.
        // Each attempt tries the identity's URLs in order (a site relay, then the stager
        // itself), as the agent's client does.
        let urls: Vec<String> = c
            .urls
            .iter()
            .map(|u| ps_quote(&format!("{}/v1/agent/events", u.trim_end_matches('/'))))
            .collect();
        let _ = write!(
            s,
            "$urls = @({urls})\n\
             $up = $false\n\
             for ($i = 0; $i -lt {tries} -and -not $up; $i++) {{\n\
             \x20 foreach ($url in $urls) {{\n\
             \x20   & curl.exe --silent --show-error --fail --max-time 30 --cert-type P12 --cert (Join-Path $r '{P12}') --pass '{pw}' --cacert (Join-Path $r '{CA}') -H 'Content-Type: application/json' --data-binary ('@' + (Join-Path $r '{UP}')) $url\n\
             \x20   if ($LASTEXITCODE -eq 0) {{ $up = $true; \"reinstall: called home at $url\"; break }}\n\
             \x20 }}\n\
             \x20 if (-not $up) {{ Start-Sleep -Seconds 10 }}\n\
             }}\n\
             if ($up) {{\n\
             \x20 bcdedit /set '{{fwbootmgr}}' displayorder '{{bootmgr}}' /addfirst\n\
             \x20 Remove-Item -Force (Join-Path $r '{P12}')\n\
             \x20 'reinstall: Windows Boot Manager is the default boot now'\n\
             }} else {{\n\
             \x20 'reinstall: the stager did not answer: the next boot returns to the rescue OS'\n\
             }}\n",
            urls = urls.join(", "),
            tries = 60,
            pw = c.password,
        );
    }
    s
}

/// `s` as a PowerShell single-quoted string (a `'` inside is written twice).
fn ps_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Files under `reinstall\` on the Windows volume for the call home.
pub const P12: &str = "host.p12";
pub const CA: &str = "ca.pem";
pub const UP: &str = "target-up.json";

/// How Windows's first-boot script calls home: the stager's URLs, tried in order (the
/// identity's `stager`, then each `fallback`), and the password of the PKCS#12 file holding
/// the host's identity.
pub struct CallHome {
    pub urls: Vec<String>,
    pub password: String,
}

/// The host's TLS identity (certificate, key, CA) as PKCS#12, the form Windows's curl.exe
/// (Schannel) takes a client certificate in.
pub fn pkcs12(id: &proto::identity::IdentityFile, password: &str) -> Result<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
    let cert = CertificateDer::from_pem_slice(id.cert.as_bytes())
        .context("the identity's certificate is not PEM")?;
    let key = PrivatePkcs8KeyDer::from_pem_slice(id.key.as_bytes())
        .context("the identity's key is not PKCS#8 PEM")?;
    let ca =
        CertificateDer::from_pem_slice(id.ca.as_bytes()).context("the identity's CA is not PEM")?;
    let pfx = p12::PFX::new(&cert, key.secret_pkcs8_der(), Some(&ca), password, &id.name)
        .context("making the PKCS#12 file")?;
    Ok(pfx.to_der())
}

/// Runs `SetupComplete.cmd` (Windows runs it once, as SYSTEM, when Setup has finished):
/// the first-boot script, then the unattend file with its password goes.
pub const SETUP_COMPLETE: &str = "@echo off\r\nrem Written by reinstall: runs once, as SYSTEM, after Windows Setup.\r\npowershell -NoProfile -ExecutionPolicy Bypass -File %SystemDrive%\\reinstall\\firstboot.ps1 > %SystemDrive%\\reinstall\\firstboot.log 2>&1\r\ndel /q %WINDIR%\\Panther\\unattend.xml\r\n";

/// The programs the rescue OS runs to install Windows, and their Debian packages.
pub const RESCUE_TOOLS: &[(&str, &str)] = &[
    ("mkntfs", "ntfs-3g"),
    ("ntfs-3g", "ntfs-3g"),
    ("ntfscat", "ntfs-3g"),
    ("wimapply", "wimtools"),
];

/// Refuses a rescue tree (`root`) that lacks a program the Windows install needs.
pub fn check_rescue_tools(root: &Path) -> Result<()> {
    let missing: Vec<String> = RESCUE_TOOLS
        .iter()
        .filter(|(tool, _)| {
            !["usr/bin", "usr/sbin", "bin", "sbin"]
                .iter()
                .any(|d| root.join(d).join(tool).exists())
        })
        .map(|(tool, pkg)| format!("{tool} ({pkg})"))
        .collect();
    ensure!(
        missing.is_empty(),
        "the rescue OS cannot install a Windows target: it lacks {}; nothing on disk 1 was changed",
        missing.join(", ")
    );
    Ok(())
}

/// Makes the NTFS volume on `dev`, the partition starting at LBA `start` on a disk of
/// `sector`-byte sectors. mkntfs cannot learn the start and geometry from a loop device (or
/// some RAID and virtual disks), and Windows's boot code reads the volume by the "hidden
/// sectors" field: it must be the real start.
pub fn mkntfs(dev: &Path, start: u64, sector: u64, label: &str) -> Result<()> {
    let out = Command::new("mkntfs")
        .args(["--fast", "--quiet", "--force"])
        .args(["--partition-start", &start.to_string()])
        .args(["--heads", "255", "--sectors-per-track", "63"])
        .args(["--sector-size", &sector.to_string()])
        .args(["--label", label])
        .arg(dev)
        .output()
        .context("running mkntfs (package ntfs-3g)")?;
    ensure!(
        out.status.success(),
        "mkntfs {} failed: {}",
        dev.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The bundle's entries to where they go: `install.wim` into `wimapply` (reading it from
/// its standard input, applying onto the unmounted NTFS volume), `esp/...` onto the ESP,
/// `windows.json` kept. Anything else is refused.
pub struct Installer {
    pub esp: PathBuf,
    pub ntfs: PathBuf,
    pub meta: Option<Meta>,
    pub applied: bool,
    /// The media's `\EFI\BOOT\BOOTX64.EFI` (its path as the media spells it, its bytes),
    /// written onto the ESP only when the volume is complete ([`Installer::finish`]).
    pub removable: Option<(String, Vec<u8>)>,
}

/// The removable-media boot path (UEFI spec §3.5.1.1), relative to the ESP.
const REMOVABLE: &str = "EFI/BOOT/BOOTX64.EFI";

fn entry_err(e: &Entry, reason: impl std::fmt::Display) -> bundle::Error {
    bundle::Error::Entry {
        entry: e.path.as_path().display().to_string(),
        reason: reason.to_string(),
    }
}

impl Sink for Installer {
    fn entry(&mut self, e: &Entry, data: &mut EntryData<'_>) -> bundle::Result<()> {
        self.entry_inner(e, data)?;
        bundle::failpoint::hit("unpack-entry");
        Ok(())
    }
}

impl Installer {
    /// Writes the held-back removable-path loader: the last write of install-target, once
    /// the image and the identity are on the volume.
    pub fn finish(&self) -> Result<()> {
        if let Some((rel, data)) = &self.removable {
            bootcfg::loader::write_esp(&self.esp, &[(rel.as_str(), data)])?;
        }
        Ok(())
    }

    fn entry_inner(&mut self, e: &Entry, data: &mut EntryData<'_>) -> bundle::Result<()> {
        let p = e.path.as_path();
        let on_esp = p.strip_prefix(ESP_DIR).ok().map(Path::to_path_buf);
        match &e.kind {
            EntryKind::Dir if e.path.is_root() || on_esp.is_some() => Ok(()),
            EntryKind::File if p == Path::new(META) => {
                let mut v = Vec::new();
                data.for_each_chunk(|c| {
                    v.extend_from_slice(c);
                    Ok(())
                })?;
                let m: Meta = serde_json::from_slice(&v).map_err(|x| entry_err(e, x))?;
                self.meta = Some(m);
                Ok(())
            }
            EntryKind::File if p == Path::new(IMAGE) => {
                self.apply(data)
                    .map_err(|x| entry_err(e, format!("{x:#}")))?;
                self.applied = true;
                Ok(())
            }
            EntryKind::File if on_esp.as_ref().is_some_and(|r| !r.as_os_str().is_empty()) => {
                let rel = on_esp.expect("checked").display().to_string();
                if rel.eq_ignore_ascii_case(REMOVABLE) {
                    // Held back: the firmware's removable-media path may be booted ahead of
                    // the rescue entry, and must not start WinPE on a half-written volume.
                    let mut v = Vec::new();
                    data.for_each_chunk(|c| {
                        v.extend_from_slice(c);
                        Ok(())
                    })?;
                    self.removable = Some((rel, v));
                    return Ok(());
                }
                bootcfg::loader::write_esp_with(&self.esp, &rel, &mut |w| {
                    data.for_each_chunk(|c| {
                        w.write_all(c)
                            .map_err(|x| bundle::Error::Invalid(format!("{x} (is the ESP full?)")))
                    })
                    .map_err(anyhow::Error::from)
                })
                .map_err(|x| entry_err(e, format!("{x:#}")))
            }
            _ => Err(entry_err(
                e,
                "not part of a Windows target bundle (windows.json, install.wim, esp/...)",
            )),
        }
    }
}

impl Installer {
    /// Streams the WIM into `wimapply - 1 NTFS`, which applies it as it arrives (a pipable
    /// WIM), keeping security descriptors, alternate streams, reparse points and short names.
    fn apply(&self, data: &mut EntryData<'_>) -> Result<()> {
        let mut child: Child = Command::new("wimapply")
            .arg("-")
            .arg("1")
            .arg(&self.ntfs)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running wimapply (package wimtools)")?;
        let mut stderr = child.stderr.take().expect("piped");
        let errs = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = std::io::Read::read_to_end(&mut stderr, &mut v);
            v
        });
        let mut stdin = child.stdin.take().expect("piped");
        let fed = data.for_each_chunk(|c| {
            stdin
                .write_all(c)
                .map_err(|x| bundle::Error::Invalid(format!("feeding wimapply: {x}")))?;
            bundle::failpoint::hit("windows-apply");
            Ok(())
        });
        drop(stdin);
        let status = child.wait()?;
        let errs = errs.join().unwrap_or_default();
        let tail = String::from_utf8_lossy(&errs);
        let tail: Vec<&str> = tail
            .split(['\r', '\n'])
            .filter(|l| !l.trim().is_empty() && !l.contains("% done"))
            .collect();
        let tail = tail[tail.len().saturating_sub(4)..].join(" / ");
        ensure!(
            status.success(),
            "wimapply onto {} failed ({status}): {tail}",
            self.ntfs.display()
        );
        fed.with_context(|| format!("wimapply onto {}: {tail}", self.ntfs.display()))?;
        Ok(())
    }
}

/// A random Administrator password meeting Windows's complexity rules.
pub fn random_password() -> Result<String> {
    let b = crate::disk::random_guid()?;
    Ok(format!("Ri-{}z9", bundle::pipe::hex(&b)))
}

/// The identity of the machine onto the applied Windows volume `ntfs` (mounted with ntfs-3g
/// at `at` for this): `Windows/Panther/unattend.xml`, `Windows/Setup/Scripts/SetupComplete.cmd`,
/// and under `reinstall/` the first-boot script, the SSH host keys and the authorized keys
/// carried from the old OS (`carry`), and `windows.json` (how the WinPE stage finds the volume).
pub fn write_identity(
    ntfs: &Path,
    at: &Path,
    net: &NetIdentity,
    carry: &Path,
    meta: &Meta,
    host: &proto::identity::IdentityFile,
    job: u64,
) -> Result<Vec<PathBuf>> {
    let call = CallHome {
        urls: host.urls().into_iter().map(String::from).collect(),
        password: random_password()?,
    };
    let up = proto::v1::Event {
        job,
        kind: proto::v1::EventKind::Done,
        phase: Some("target-up".into()),
        bytes_done: None,
        bytes_total: None,
        message: Some("Windows is up: its first-boot script called home".into()),
        network: None,
    };
    // The computer name is the old OS's host name, as carried (/etc/hostname), as for Linux.
    let mut net = net.clone();
    if let Ok(h) = std::fs::read_to_string(carry.join("etc/hostname")) {
        if !h.trim().is_empty() {
            net.hostname = h.trim().to_string();
        }
    }
    let net = &net;
    let unattend = render_unattend(net, &random_password()?)?;
    let firstboot = render_firstboot(net, Some(&call));
    let m = crate::mount::Mounted::ntfs3g(ntfs, at)?;
    let mut files: Vec<(PathBuf, Vec<u8>)> = vec![
        (
            PathBuf::from("Windows/Panther/unattend.xml"),
            unattend.into_bytes(),
        ),
        (
            PathBuf::from("Windows/Setup/Scripts/SetupComplete.cmd"),
            SETUP_COMPLETE.as_bytes().to_vec(),
        ),
        (
            Path::new(VOLUME_DIR).join("firstboot.ps1"),
            firstboot.replace('\n', "\r\n").into_bytes(),
        ),
        (
            Path::new(VOLUME_DIR).join(META),
            serde_json::to_vec_pretty(meta)?,
        ),
        (
            Path::new(VOLUME_DIR).join(P12),
            pkcs12(host, &call.password)?,
        ),
        (Path::new(VOLUME_DIR).join(CA), host.ca.clone().into_bytes()),
        (Path::new(VOLUME_DIR).join(UP), serde_json::to_vec(&up)?),
    ];
    let mut keys = Vec::new();
    for rel in crate::preserve::identity_files(carry) {
        let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let data = std::fs::read(carry.join(&rel))?;
        if rel.starts_with("etc/ssh") && name.starts_with("ssh_host_") {
            files.push((Path::new(VOLUME_DIR).join("ssh").join(name), data));
        } else if rel == Path::new("root/.ssh/authorized_keys") {
            // root's keys become the Administrators' (Windows's sshd reads them from one
            // file). Other users' keys are not carried: those users do not exist in Windows,
            // and their keys must not become an administrator's.
            keys.extend_from_slice(&data);
            if !keys.ends_with(b"\n") {
                keys.push(b'\n');
            }
        }
    }
    if !keys.is_empty() {
        files.push((
            Path::new(VOLUME_DIR).join("ssh/administrators_authorized_keys"),
            keys,
        ));
    }
    let mut written = Vec::new();
    for (rel, data) in files {
        let p = m.path.join(&rel);
        std::fs::create_dir_all(p.parent().expect("relative paths have parents"))
            .with_context(|| format!("{}: creating {}", ntfs.display(), rel.display()))?;
        std::fs::write(&p, data)
            .with_context(|| format!("{}: writing {}", ntfs.display(), rel.display()))?;
        written.push(rel);
    }
    drop(m);
    Ok(written)
}

/// What the WinPE stage left on the Windows volume.
#[derive(Debug, PartialEq, Eq)]
pub enum Stage {
    /// No log: it did not run (or did not find the volume).
    NotRun,
    /// bcdboot built the boot store; its log.
    Done(String),
    /// A step failed; its log.
    Failed(String),
}

/// Reads the WinPE stage's log from the Windows volume `ntfs` without mounting it (`ntfscat`).
pub fn stage_result(ntfs: &Path) -> Result<Stage> {
    let cat = |name: &str| -> Result<Option<String>> {
        let out = Command::new("ntfscat")
            .arg(ntfs)
            .arg(format!("/{VOLUME_DIR}/{name}"))
            .output()
            .context("running ntfscat (package ntfs-3g)")?;
        Ok(out.status.success().then(|| {
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .replace("\r\n", " / ")
        }))
    };
    Ok(if let Some(log) = cat(bundle::windows::STAGE_FAILED)? {
        Stage::Failed(log)
    } else if let Some(log) = cat(bundle::windows::STAGE_DONE)? {
        Stage::Done(log)
    } else {
        Stage::NotRun
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parsed by Python's XML parser, from its standard input (tests run in parallel: no
    /// shared file).
    fn well_formed(text: &str) {
        use std::io::Write;
        let mut c = std::process::Command::new("python3")
            .args([
                "-c",
                "import sys, xml.dom.minidom; xml.dom.minidom.parseString(sys.stdin.buffer.read())",
            ])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "not well-formed: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The captured two-NIC fixture: veth0 203.0.113.10/32 with an on-link default gateway
    /// 198.51.100.1, MTU 9000; veth1 IPv6-only 2001:db8::10/128 with gateway fe80::1.
    #[test]
    fn unattend_carries_the_addresses_by_mac_and_the_script_the_onlink_and_link_local_routes() {
        let id = crate::netid::fixture("two-nics").unwrap();
        let x = render_unattend(&id, "Pw-1&<x>").unwrap();
        well_formed(&x);
        for iface in &id.interfaces {
            assert!(
                x.contains(&format!("<Identifier>{}</Identifier>", win_mac(&iface.mac))),
                "{x}"
            );
        }
        assert!(x.contains(">203.0.113.10/32</IpAddress>"), "{x}");
        assert!(x.contains(">2001:db8::10/128</IpAddress>"), "{x}");
        assert!(x.contains("<DhcpEnabled>false</DhcpEnabled>"));
        assert!(x.contains("<RouterDiscoveryEnabled>false</RouterDiscoveryEnabled>"));
        // Neither gateway is inside a subnet of its NIC: unattend holds no route ...
        assert!(!x.contains("<Routes>"), "{x}");
        assert!(x.contains("<fDenyTSConnections>false</fDenyTSConnections>"));
        // ... the script has both, the on-link one after a host route to the gateway.
        let ps = render_firstboot(&id, None);
        let host = ps
            .find("-DestinationPrefix '198.51.100.1/32' -NextHop '0.0.0.0'")
            .unwrap();
        let default = ps
            .find("-DestinationPrefix '0.0.0.0/0' -NextHop '198.51.100.1'")
            .unwrap();
        assert!(host < default, "{ps}");
        assert!(
            ps.contains("-DestinationPrefix '::/0' -NextHop 'fe80::1'"),
            "{ps}"
        );
        assert!(ps.contains("OpenSSH.Server") && ps.contains("powercfg /hibernate off"));
    }

    #[test]
    fn a_gateway_inside_the_subnet_goes_into_unattend_and_names_are_netbios_safe() {
        let mut id = crate::netid::fixture("two-nics").unwrap();
        let i = &mut id.interfaces[0];
        i.addresses[0].prefix = 24;
        i.addresses[0].address = "198.51.100.10".parse().unwrap();
        i.routes.iter_mut().for_each(|r| r.onlink = false);
        id.hostname = "web-01.<example>--x.com".into();
        let x = render_unattend(&id, "Pw-1&<x>").unwrap();
        well_formed(&x);
        assert!(
            x.contains("<Prefix>0.0.0.0/0</Prefix>")
                && x.contains("<NextHopAddress>198.51.100.1</NextHopAddress>"),
            "{x}"
        );
        assert!(x.contains("<ComputerName>web-01</ComputerName>"), "{x}");
        assert!(
            x.contains("&lt;example&gt;"),
            "the host name is escaped in the comment: {x}"
        );
        assert_eq!(
            computer_name("a-very-long-host-name-here").unwrap(),
            "a-very-long-hos"
        );
        assert!(computer_name("12345").is_err());
        assert!(computer_name("--").is_err());
    }

    /// Through a site relay the identity names the relay first and the stager as fallback:
    /// each attempt of Windows's call home tries both, in that order, and Windows becomes the
    /// default boot only after one of them answered.
    #[test]
    fn the_call_home_tries_each_url_of_the_identity_in_order() {
        let id = crate::netid::fixture("two-nics").unwrap();
        let call = CallHome {
            urls: vec![
                "https://relay.pop1:8443/".into(),
                "https://stager.example:8443/x'y".into(),
            ],
            password: "pw".into(),
        };
        let ps = render_firstboot(&id, Some(&call));
        assert!(
            ps.contains(
                "$urls = @('https://relay.pop1:8443/v1/agent/events', 'https://stager.example:8443/x''y/v1/agent/events')"
            ),
            "{ps}"
        );
        let each = ps.find("foreach ($url in $urls)").unwrap();
        let curl = ps.find("& curl.exe").unwrap();
        let default = ps.find("displayorder '{bootmgr}' /addfirst").unwrap();
        assert!(each < curl && curl < default, "{ps}");
        assert!(ps[curl..].starts_with("& curl.exe") && ps[curl..default].contains(" $url\n"));
    }

    #[test]
    fn bonds_and_vlans_are_refused_for_windows_naming_the_interface() {
        let id = crate::netid::fixture("vlan-bond").unwrap();
        let e = render_unattend(&id, "pw").unwrap_err().to_string();
        assert!(
            e.contains("bond0 is a bond") && e.contains("Windows"),
            "{e}"
        );
        assert!(check_network(&crate::netid::fixture("two-nics").unwrap()).is_ok());
        let e = check_network(&crate::netid::fixture("policy").unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rule pref 998 fwmark 0x20 lookup 200") && e.contains("Windows"),
            "{e}"
        );
    }
}
