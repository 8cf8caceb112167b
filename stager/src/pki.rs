//! The stager's own PKI: a CA, the server certificate, and client certificates for agents
//! (one per host) and operators.
//!
//! Who a client is comes from the certificate the TLS layer verified, and is looked up by the
//! certificate's SHA-256 fingerprint in the state database (`certs` table), which also records
//! revocation. So a revoked certificate is refused on its next request, without a restart, and
//! a certificate this stager never issued is refused even if it chains to the CA.
//!
//! Files in the stager home: `ca.key` (0600), `ca.pem`, `server.key` (0600), `server.pem`.
//! Keys are ECDSA P-256.

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};
use std::path::Path;
use time::{Duration, OffsetDateTime};

pub const CA_KEY: &str = "ca.key";
pub const CA_CERT: &str = "ca.pem";
pub const SERVER_KEY: &str = "server.key";
pub const SERVER_CERT: &str = "server.pem";

/// A certificate just issued to a client.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub fingerprint: String,
    pub not_after: OffsetDateTime,
}

impl Issued {
    /// Its end as `state.db` records it (RFC 3339, seconds, UTC).
    pub fn not_after_text(&self) -> String {
        rfc3339(std::time::SystemTime::from(self.not_after))
    }
}

/// A time as `state.db` records certificates' ends: RFC 3339, seconds, UTC, so that the
/// text sorts as the time.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn ca_params(stager_name: &str) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("reinstall CA {stager_name}"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(3650);
    Ok(p)
}

/// The CA as an issuer: the same subject and key as the CA certificate on disk, which is all
/// a signature chain needs (the authority key identifier comes from the key).
fn issuer(dir: &Path, stager_name: &str) -> Result<(rcgen::Certificate, KeyPair)> {
    let kp = std::fs::read_to_string(dir.join(CA_KEY))
        .with_context(|| format!("reading {}", dir.join(CA_KEY).display()))?;
    let key = KeyPair::from_pem(&kp).context("parsing the CA key")?;
    let cert = ca_params(stager_name)?.self_signed(&key)?;
    Ok((cert, key))
}

fn serial() -> SerialNumber {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let mut h = Sha256::new();
    h.update(t.to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    let mut b = h.finalize()[..16].to_vec();
    b[0] &= 0x7f; // positive
    SerialNumber::from_slice(&b)
}

/// Creates the CA and the server certificate (SANs: DNS names and IP addresses).
pub fn init(dir: &Path, stager_name: &str, sans: &[String]) -> Result<()> {
    if dir.join(CA_KEY).exists() {
        bail!(
            "{} already exists; refusing to replace the CA",
            dir.join(CA_KEY).display()
        );
    }
    let ca_key = KeyPair::generate()?;
    let ca = ca_params(stager_name)?.self_signed(&ca_key)?;
    write_private(&dir.join(CA_KEY), &ca_key.serialize_pem())?;
    write_public(&dir.join(CA_CERT), &ca.pem())?;

    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.subject_alt_names = san_list(sans)?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("reinstall stager {stager_name}"),
    );
    p.distinguished_name = dn;
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.serial_number = Some(serial());
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(825);
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &ca, &ca_key)?;
    write_private(&dir.join(SERVER_KEY), &key.serialize_pem())?;
    write_public(&dir.join(SERVER_CERT), &cert.pem())?;
    Ok(())
}

/// DNS names and IP addresses as subject alternative names.
fn san_list(sans: &[String]) -> Result<Vec<SanType>> {
    sans.iter()
        .map(|s| {
            Ok(match s.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => {
                    SanType::DnsName(s.clone().try_into().with_context(|| format!("SAN {s:?}"))?)
                }
            })
        })
        .collect()
}

/// Issues a client certificate: CN = `name`, OU = `role`, client-auth only, valid from an hour
/// ago for `days` days (negative: already expired, for tests of expiry handling).
pub fn issue_client(
    dir: &Path,
    stager_name: &str,
    name: &str,
    role: &str,
    days: i64,
) -> Result<Issued> {
    issue(dir, stager_name, name, role, &[], days)
}

/// Issues a site relay's certificate: CN = `name`, OU = `relay`, for both ends of the relay
/// (the server agents reach, by `sans`; the client this stager verifies).
pub fn issue_relay(
    dir: &Path,
    stager_name: &str,
    name: &str,
    sans: &[String],
    days: i64,
) -> Result<Issued> {
    issue(dir, stager_name, name, "relay", sans, days)
}

fn issue(
    dir: &Path,
    stager_name: &str,
    name: &str,
    role: &str,
    sans: &[String],
    days: i64,
) -> Result<Issued> {
    let (ca, ca_key) = issuer(dir, stager_name)?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationalUnitName, role);
    p.distinguished_name = dn;
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if !sans.is_empty() {
        p.subject_alt_names = san_list(sans)?;
        p.extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.serial_number = Some(serial());
    let now = OffsetDateTime::now_utc();
    // An already-expired certificate (days < 0) must still start before it ends.
    p.not_before = now - Duration::hours(2) + Duration::days(days.min(0));
    p.not_after = now + Duration::days(days);
    let not_after = p.not_after;
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &ca, &ca_key)?;
    Ok(Issued {
        fingerprint: fingerprint(cert.der()),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after,
    })
}

/// Lower-case hex SHA-256 of a certificate's DER.
pub fn fingerprint(der: &[u8]) -> String {
    bundle::pipe::hex(&Sha256::digest(der))
}

pub fn write_private(p: &Path, text: &str) -> Result<()> {
    bundle::release::write_new(p, text.as_bytes(), 0o600).map_err(Into::into)
}

fn write_public(p: &Path, text: &str) -> Result<()> {
    bundle::release::write_new(p, text.as_bytes(), 0o644).map_err(Into::into)
}
