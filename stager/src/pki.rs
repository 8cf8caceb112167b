//! The stager's own PKI: a CA, the server certificate, and client certificates for agents
//! (one per host) and operators.
//!
//! Who a client is comes from the certificate the TLS layer verified, and is looked up by the
//! certificate's SHA-256 fingerprint in the state database (`certs` table), which also records
//! revocation. So a revoked certificate is refused on its next request, without a restart, and
//! a certificate this stager never issued is refused even if it chains to the CA.
//!
//! Files in the stager home: `ca.key` (0600), `ca.pem`, `server.key` (0600), `server.pem`
//! (renewed by `stager server-cert --renew`, which keeps the old pair as `*.old`).
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

/// Days a CA certificate is valid.
pub const CA_DAYS: i64 = 3650;

/// A CA certificate's parameters; `cn` is its subject's one name.
fn ca_params(cn: &str) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(CA_DAYS);
    Ok(p)
}

/// A new CA named `cn`: its key and certificate (PEM).
pub fn new_ca(cn: &str) -> Result<(String, String)> {
    let key = KeyPair::generate()?.serialize_pem();
    let cert = ca_cert_for(&key, cn)?;
    Ok((key, cert))
}

/// A CA certificate named `cn` for the key `key_pem` (PEM).
pub fn ca_cert_for(key_pem: &str, cn: &str) -> Result<String> {
    let key = KeyPair::from_pem(key_pem).context("parsing the CA key")?;
    Ok(ca_params(cn)?.self_signed(&key)?.pem())
}

/// The certificate (PEM) in the bundle `ca.pem` of `dir` whose key is in `key_file`.
pub fn ca_cert_of(dir: &Path, key_file: &str) -> Result<String> {
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .with_context(|| format!("reading {}", dir.join(f).display()))
    };
    let key = read(key_file)?;
    bundle::release::pem_certificates(&read(CA_CERT)?)
        .into_iter()
        .find(|c| crate::certfiles::check_pair(c, &key).is_ok())
        .with_context(|| format!("{key_file} is the key of no certificate in {CA_CERT}"))
}

/// The issuing CA: the key in `ca.key`, and the certificate of `ca.pem` it belongs to (its
/// subject is all a signature chain needs; the authority key identifier comes from the key).
fn issuer(dir: &Path) -> Result<(rcgen::Certificate, KeyPair)> {
    use rustls::pki_types::pem::PemObject;
    let kp = std::fs::read_to_string(dir.join(CA_KEY))
        .with_context(|| format!("reading {}", dir.join(CA_KEY).display()))?;
    let key = KeyPair::from_pem(&kp).context("parsing the CA key")?;
    let pem = ca_cert_of(dir, CA_KEY)?;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())?;
    let cn = cert_info_der(&der)?
        .cn
        .context("the CA certificate has no CN")?;
    let cert = ca_params(&cn)?.self_signed(&key)?;
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
    let ca = ca_params(&format!("reinstall CA {stager_name}"))?.self_signed(&ca_key)?;
    write_private(&dir.join(CA_KEY), &ca_key.serialize_pem())?;
    write_public(&dir.join(CA_CERT), &ca.pem())?;

    let (key, cert) = server_cert(stager_name, sans, SERVER_DAYS, &ca, &ca_key)?;
    write_private(&dir.join(SERVER_KEY), &key)?;
    write_public(&dir.join(SERVER_CERT), &cert)?;
    Ok(())
}

/// Days the stager's server certificate is valid.
pub const SERVER_DAYS: i64 = 825;

/// A new server key and certificate (PEM) for `sans`, signed by the CA.
fn server_cert(
    stager_name: &str,
    sans: &[String],
    days: i64,
    ca: &rcgen::Certificate,
    ca_key: &KeyPair,
) -> Result<(String, String)> {
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
    p.not_after = now + Duration::days(days);
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, ca, ca_key)?;
    Ok((key.serialize_pem(), cert.pem()))
}

/// What the stager reads back from a certificate of its own: its SHA-256, its start and end,
/// the DNS names and IP addresses it is for, and its subject's CN and OU (a client's name and
/// role, as [`issue_client`] writes them).
#[derive(Debug, Clone, PartialEq)]
pub struct CertInfo {
    pub fingerprint: String,
    pub not_before: std::time::SystemTime,
    pub not_after: std::time::SystemTime,
    pub sans: Vec<String>,
    pub cn: Option<String>,
    pub ou: Option<String>,
}

/// Reads the (first) certificate of the PEM file `path`.
pub fn cert_info(path: &Path) -> Result<CertInfo> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_file(path)
        .with_context(|| format!("reading {}", path.display()))?;
    cert_info_der(&der).with_context(|| path.display().to_string())
}

/// What a DER certificate is (see [`cert_info`]).
pub fn cert_info_der(der: &[u8]) -> Result<CertInfo> {
    let p = parse_cert(der)
        .map_err(|e| anyhow::anyhow!("not a certificate this stager can read: {e}"))?;
    Ok(CertInfo {
        fingerprint: fingerprint(der),
        not_before: p.not_before.into(),
        not_after: p.not_after.into(),
        sans: p.sans,
        cn: p.cn,
        ou: p.ou,
    })
}

/// The fields of a certificate [`CertInfo`] shows.
struct Parsed {
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    sans: Vec<String>,
    cn: Option<String>,
    ou: Option<String>,
}

/// The validity, the subject's CN and OU, and the subject alternative names (DNS names, IP
/// addresses) of a DER X.509 certificate (RFC 5280 §4.1), read with yasna.
fn parse_cert(der: &[u8]) -> yasna::ASN1Result<Parsed> {
    use yasna::{tags, Tag};
    fn time(r: yasna::BERReader) -> yasna::ASN1Result<OffsetDateTime> {
        if r.lookahead_tag()? == tags::TAG_UTCTIME {
            Ok(*r.read_utctime()?.datetime())
        } else {
            Ok(*r.read_generalized_time()?.datetime())
        }
    }
    fn general_names(der: &[u8]) -> yasna::ASN1Result<Vec<String>> {
        let names = yasna::parse_der(der, |r| {
            r.collect_sequence_of(|r| {
                let tag = r.lookahead_tag()?;
                if tag == Tag::context(2) {
                    return Ok(Some(r.read_tagged_implicit(tag, |r| r.read_ia5_string())?));
                }
                if tag == Tag::context(7) {
                    let b = r.read_tagged_implicit(tag, |r| r.read_bytes())?;
                    return Ok(match <[u8; 4]>::try_from(b.as_slice()) {
                        Ok(v4) => Some(std::net::IpAddr::from(v4).to_string()),
                        Err(_) => <[u8; 16]>::try_from(b.as_slice())
                            .ok()
                            .map(|v6| std::net::IpAddr::from(v6).to_string()),
                    });
                }
                r.read_der()?;
                Ok(None)
            })
        })?;
        Ok(names.into_iter().flatten().collect())
    }
    /// A Name's CN and OU (RFC 5280 §4.1.2.4): a sequence of sets of (OID, string).
    type Subject = (Option<String>, Option<String>);
    fn subject(r: yasna::BERReader) -> yasna::ASN1Result<Subject> {
        let mut out: Subject = (None, None);
        r.read_sequence_of(|r| {
            r.read_set_of(|r| {
                r.read_sequence(|r| {
                    let oid = r.next().read_oid()?;
                    let value = r.next();
                    let text = match value.lookahead_tag()? {
                        tags::TAG_UTF8STRING => Some(value.read_utf8string()?),
                        tags::TAG_PRINTABLESTRING => Some(value.read_printable_string()?),
                        _ => {
                            value.read_der()?;
                            None
                        }
                    };
                    match oid.components().as_slice() {
                        [2, 5, 4, 3] => out.0 = text,
                        [2, 5, 4, 11] => out.1 = text,
                        _ => {}
                    }
                    Ok(())
                })
            })
        })?;
        Ok(out)
    }
    yasna::parse_der(der, |r| {
        r.read_sequence(|r| {
            let tbs = r.next().read_sequence(|r| {
                r.read_optional(|r| r.read_tagged(Tag::context(0), |r| r.read_i64()))?;
                for _ in 0..3 {
                    r.next().read_der()?; // serial, signature algorithm, issuer
                }
                let (not_before, not_after) = r
                    .next()
                    .read_sequence(|r| Ok((time(r.next())?, time(r.next())?)))?;
                let (cn, ou) = subject(r.next())?;
                r.next().read_der()?; // public key
                let mut sans = Vec::new();
                r.read_optional(|r| {
                    r.read_tagged(Tag::context(3), |r| {
                        r.read_sequence_of(|r| {
                            r.read_sequence(|r| {
                                let oid = r.next().read_oid()?;
                                r.read_optional(|r| r.read_bool())?;
                                let value = r.next().read_bytes()?;
                                if oid.components().as_slice() == [2, 5, 29, 17] {
                                    sans = general_names(&value)?;
                                }
                                Ok(())
                            })
                        })
                    })
                })?;
                Ok(Parsed {
                    not_before,
                    not_after,
                    sans,
                    cn,
                    ou,
                })
            })?;
            r.next().read_der()?; // signature algorithm
            r.next().read_der()?; // signature
            Ok(tbs)
        })
    })
}

/// On stderr, when the certificate in `path` ends within 30 days (or has ended): who loses
/// what then, and `fix`. Says nothing otherwise, or if the file cannot be read (serving it
/// has just worked).
pub fn warn_if_ending(path: &Path, loses: &str, fix: &str) {
    if let Ok(info) = cert_info(path) {
        if let Some(w) = ending_warning(path, &info, std::time::SystemTime::now(), 30, loses, fix) {
            eprintln!("{w}");
        }
    }
}

/// On stderr, when the issuing CA of the stager home `dir` ends within a year: replacing it
/// (`stager ca`) waits for every host to poll, twice.
pub fn warn_if_ca_ending(dir: &Path) {
    use rustls::pki_types::pem::PemObject;
    let info = ca_cert_of(dir, CA_KEY).ok().and_then(|pem| {
        let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
        cert_info_der(&der).ok()
    });
    if let Some(info) = info {
        let w = ending_warning(
            &dir.join(CA_CERT),
            &info,
            std::time::SystemTime::now(),
            365,
            "no agent, relay or operator can reach this stager after that",
            "replace it now: stager ca rotate, switch, retire (see stager ca --help)",
        );
        if let Some(w) = w {
            eprintln!("{w}");
        }
    }
}

fn ending_warning(
    path: &Path,
    info: &CertInfo,
    now: std::time::SystemTime,
    within_days: i64,
    loses: &str,
    fix: &str,
) -> Option<String> {
    let end = rfc3339(info.not_after);
    match crate::certs::days_left(info.not_after, now) {
        days if days < 0 => Some(format!(
            "warning: {} ended {end}: {loses}; {fix}",
            path.display()
        )),
        days if days < within_days => Some(format!(
            "warning: {} ends {end} ({days} days from now): {loses}; {fix}",
            path.display()
        )),
        _ => None,
    }
}

/// Replaces the stager's server key and certificate with new ones for the same names (and
/// `more_sans`), valid for `days`, signed by the CA; the old ones stay beside them as
/// `server.key.old` and `server.pem.old`. Returns what the new certificate is. A running
/// `stager serve` presents it from its next handshake on (see [`crate::certfiles`]).
pub fn renew_server(
    dir: &Path,
    stager_name: &str,
    more_sans: &[String],
    days: i64,
) -> Result<CertInfo> {
    let old = cert_info(&dir.join(SERVER_CERT))?;
    let mut sans = old.sans.clone();
    for s in more_sans {
        if !sans.contains(s) {
            sans.push(s.clone());
        }
    }
    let (ca, ca_key) = issuer(dir)?;
    let (key, cert) = server_cert(stager_name, &sans, days, &ca, &ca_key)?;
    crate::certfiles::replace_pair(&dir.join(SERVER_CERT), &dir.join(SERVER_KEY), &cert, &key)?;
    cert_info(&dir.join(SERVER_CERT))
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

/// Issues a client certificate: CN = `name`, OU = `role`, client-auth only, valid from
/// [`CLIENT_BACKDATE_SECS`] ago for `days` days (negative: already expired, for tests of
/// expiry handling).
pub fn issue_client(dir: &Path, name: &str, role: &str, days: i64) -> Result<Issued> {
    issue(dir, name, role, &[], days)
}

/// Issues a site relay's certificate: CN = `name`, OU = `relay`, for both ends of the relay
/// (the server agents reach, by `sans`; the client this stager verifies).
pub fn issue_relay(dir: &Path, name: &str, sans: &[String], days: i64) -> Result<Issued> {
    issue(dir, name, "relay", sans, days)
}

fn issue(dir: &Path, name: &str, role: &str, sans: &[String], days: i64) -> Result<Issued> {
    let key = KeyPair::generate()?;
    let (cert, not_after) = sign_client(dir, name, role, sans, days, &key)?;
    Ok(Issued {
        fingerprint: fingerprint(cert.der()),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after,
    })
}

/// How long before its issue a client certificate starts (clocks of hosts run behind).
pub const CLIENT_BACKDATE_SECS: i64 = 2 * 3600;

/// A client certificate for `key` (see [`issue_client`]), and its end.
fn sign_client(
    dir: &Path,
    name: &str,
    role: &str,
    sans: &[String],
    days: i64,
    key: &impl rcgen::PublicKeyData,
) -> Result<(rcgen::Certificate, OffsetDateTime)> {
    let (ca, ca_key) = issuer(dir)?;
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
    p.not_before = now - Duration::seconds(CLIENT_BACKDATE_SECS) + Duration::days(days.min(0));
    p.not_after = now + Duration::days(days);
    let not_after = p.not_after;
    Ok((p.signed_by(key, &ca, &ca_key)?, not_after))
}

/// An ECDSA P-256 public key as a client sent it (SubjectPublicKeyInfo).
struct P256Public(Vec<u8>);

impl rcgen::PublicKeyData for P256Public {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// The SubjectPublicKeyInfo of an ECDSA P-256 key (RFC 5480), read with yasna: the point,
/// or why it is not one.
fn p256_public(pem: &str) -> Result<P256Public> {
    use rustls::pki_types::pem::PemObject;
    // AlgorithmIdentifier { id-ecPublicKey, prime256v1 }.
    const ALG: &[u8] = &[
        0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86,
        0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
    ];
    let der = rustls::pki_types::SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes())
        .context("not a PEM public key (SubjectPublicKeyInfo)")?;
    let (alg, (point, bits)) = yasna::parse_der(der.as_ref(), |r| {
        r.read_sequence(|r| Ok((r.next().read_der()?, r.next().read_bitvec_bytes()?)))
    })
    .map_err(|e| anyhow::anyhow!("not a public key: {e}"))?;
    anyhow::ensure!(
        alg == ALG && bits == 65 * 8 && point.first() == Some(&4),
        "not an uncompressed ECDSA P-256 public key (the only kind this stager issues for)"
    );
    Ok(P256Public(point))
}

/// Issues a client certificate (as [`issue_client`]; with `sans`, a relay's, as
/// [`issue_relay`]) for a public key the client made itself (PEM SubjectPublicKeyInfo, ECDSA
/// P-256): its private key never leaves it. The returned [`Issued`] has no `key_pem`.
pub fn issue_client_for(
    dir: &Path,
    name: &str,
    role: &str,
    sans: &[String],
    days: i64,
    public_pem: &str,
) -> Result<Issued> {
    let key = p256_public(public_pem)?;
    let (cert, not_after) = sign_client(dir, name, role, sans, days, &key)?;
    Ok(Issued {
        fingerprint: fingerprint(cert.der()),
        cert_pem: cert.pem(),
        key_pem: String::new(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn days_from_now(t: SystemTime) -> f64 {
        t.duration_since(SystemTime::now()).unwrap().as_secs_f64() / 86_400.0
    }

    /// The server certificate reads back with its end and its names (DNS and IP, v4 and
    /// v6); a renewal keeps those names, adds new ones, ends when asked, keeps the old pair
    /// as `.old`, and its key matches its certificate.
    #[test]
    fn the_server_certificate_reads_back_and_renews_with_its_names() {
        let d = tempfile::tempdir().unwrap();
        let sans = ["stager.example".to_string(), "2001:db8::5".to_string()];
        init(
            d.path(),
            "s1",
            &[
                &["localhost".to_string(), "127.0.0.1".to_string()][..],
                &sans,
            ]
            .concat(),
        )
        .unwrap();
        let before = cert_info(&d.path().join(SERVER_CERT)).unwrap();
        assert_eq!(
            before.sans,
            ["localhost", "127.0.0.1", "stager.example", "2001:db8::5"]
        );
        let left = days_from_now(before.not_after);
        assert!((824.9..825.1).contains(&left), "{left}");
        let after = renew_server(
            d.path(),
            "s1",
            &["stager2.example".into(), "localhost".into()],
            20,
        )
        .unwrap();
        assert_eq!(
            after.sans,
            [
                "localhost",
                "127.0.0.1",
                "stager.example",
                "2001:db8::5",
                "stager2.example"
            ]
        );
        let left = days_from_now(after.not_after);
        assert!((19.9..20.1).contains(&left), "{left}");
        assert_ne!(after.fingerprint, before.fingerprint);
        assert_eq!(cert_info(&d.path().join("server.pem.old")).unwrap(), before);
        let trust =
            crate::trust::Trust::open(&d.path().join(CA_CERT), crate::server::provider()).unwrap();
        crate::server::tls_config(d.path(), trust)
            .expect("the renewed key and certificate make a server");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.path().join(SERVER_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(cert_info(&d.path().join(CA_KEY)).is_err());
        // Serving it warns: 20 days left is within 30; 825 is not; past its end, ended.
        let p = d.path().join(SERVER_CERT);
        let now = SystemTime::now();
        let w = ending_warning(&p, &after, now, 30, "agents lose it", "renew it").unwrap();
        assert!(
            w.contains("days from now): agents lose it; renew it"),
            "{w}"
        );
        assert_eq!(ending_warning(&p, &before, now, 30, "x", "y"), None);
        let later = now + std::time::Duration::from_secs(21 * 86_400);
        let w = ending_warning(&p, &after, later, 30, "x", "y").unwrap();
        assert!(w.contains("ended "), "{w}");
        // The CA is warned of a year ahead: replacing it waits for every host.
        use rustls::pki_types::pem::PemObject;
        let ca_pem = ca_cert_of(d.path(), CA_KEY).unwrap();
        let ca_der = rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap();
        let ca = cert_info_der(&ca_der).unwrap();
        assert_eq!(ending_warning(&p, &ca, now, 365, "x", "y"), None);
        let nine_years = now + std::time::Duration::from_secs(9 * 365 * 86_400 + 200 * 86_400);
        let w = ending_warning(&p, &ca, nine_years, 365, "x", "y").unwrap();
        assert!(w.contains("days from now"), "{w}");
        assert_eq!(after.cn.as_deref(), Some("reinstall stager s1"));
        // A client's name and role read back from its subject, and when it starts.
        let c = issue_client(d.path(), "web-1.example", "agent", 3).unwrap();
        let der = rustls::pki_types::CertificateDer::from_pem_slice(c.cert_pem.as_bytes()).unwrap();
        let info = cert_info_der(&der).unwrap();
        assert_eq!(
            (info.cn.as_deref(), info.ou.as_deref()),
            (Some("web-1.example"), Some("agent"))
        );
        let started = SystemTime::now().duration_since(info.not_before).unwrap();
        assert!(
            (CLIENT_BACKDATE_SECS as u64 - 5..CLIENT_BACKDATE_SECS as u64 + 5)
                .contains(&started.as_secs()),
            "{started:?}"
        );
    }
}
