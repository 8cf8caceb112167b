//! Replacing the stager's CA without cutting off a host: `stager ca rotate`, `switch`,
//! `retire`, `status`.
//!
//! Every agent, relay and operator trusts the CAs in its copy of `ca.pem` (the `ca` of an
//! identity file, a relay's `ca.pem`), and presents a certificate one of them issued. So the
//! CA is replaced in three steps, each taken only when the fleet has caught up with the last:
//!
//! 1. `rotate`: a new CA is made (`ca.next.key`); `ca.pem` holds both. Agents and relays are
//!    given the new bundle when they next ask for work (or, a relay, whether it is due), and
//!    say which bundle they hold; `status` shows who has not caught up.
//! 2. `switch` (refused while an agent or relay in use lacks the bundle): the new CA issues
//!    from now on (`ca.key`; the old key kept as `ca.old.key`), the server certificate is
//!    reissued by it, and every certificate the old CA issued is due for renewal: agents and
//!    relays renew at their next poll, as they do near a certificate's end.
//! 3. `retire` (refused while a certificate of the old CA is still some name's current
//!    one): `ca.pem` holds the new CA only; clients are given it as in 1; the old key is
//!    removed.
//!
//! Both CAs are trusted from 1 to 3, by the stager, relays and clients: nothing is refused
//! at any step. Operators' identity files are issued by hand (`stager operator`); one issued
//! after `rotate` holds both CAs.

use crate::certs::{Listed, Standing};
use crate::db::Db;
use crate::pki::{self, CA_CERT, CA_KEY};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::Path;

/// The new CA's key, from `rotate` to `switch`.
pub const NEXT_KEY: &str = "ca.next.key";
/// The old CA's key, from `switch` to `retire`.
pub const OLD_KEY: &str = "ca.old.key";
/// The settings key of the issuing CA's SHA-256 (see [`Db::cert_due`]).
pub const ISSUING: &str = "issuing_ca";

/// Where a replacement of the CA stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// One CA.
    One,
    /// `rotate` done: two CAs trusted, the old one issuing.
    Rotated,
    /// `switch` done: two CAs trusted, the new one issuing.
    Switched,
}

/// A CA of the bundle.
#[derive(Debug, Clone, Serialize)]
pub struct Ca {
    pub fingerprint: String,
    pub name: String,
    pub not_after: String,
    /// `issuing`, `next` (rotated, not yet issuing) or `old` (switched, no longer issuing).
    pub state: &'static str,
    #[serde(skip)]
    pub pem: String,
}

pub fn stage(dir: &Path) -> Stage {
    if dir.join(NEXT_KEY).exists() {
        Stage::Rotated
    } else if dir.join(OLD_KEY).exists() {
        Stage::Switched
    } else {
        Stage::One
    }
}

fn ca_of(pem: String, state: &'static str) -> Result<Ca> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())?;
    let info = pki::cert_info_der(&der)?;
    Ok(Ca {
        fingerprint: info.fingerprint,
        name: info.cn.unwrap_or_default(),
        not_after: pki::rfc3339(info.not_after),
        state,
        pem,
    })
}

/// The CAs of `ca.pem`, the issuing one first (a next or old key that no certificate of
/// `ca.pem` belongs to is a step cut short, which running the step again finishes).
pub fn list(dir: &Path) -> Result<Vec<Ca>> {
    let mut out = vec![ca_of(pki::ca_cert_of(dir, CA_KEY)?, "issuing")?];
    for (key, state) in [(NEXT_KEY, "next"), (OLD_KEY, "old")] {
        if let Ok(pem) = pki::ca_cert_of(dir, key) {
            out.push(ca_of(pem, state)?);
        }
    }
    Ok(out)
}

/// Whether the certificate `cert_pem` (the server's) chains to the CA `ca_pem`.
fn issued_by(cert_pem: &str, ca_pem: &str) -> Result<bool> {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())?;
    let Some(name) = pki::cert_info_der(&der)?.sans.into_iter().next() else {
        return Ok(false);
    };
    let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
        std::sync::Arc::new(crate::trust::roots_of(ca_pem)?),
        crate::server::provider(),
    )
    .build()?;
    let name = rustls::pki_types::ServerName::try_from(name)?;
    Ok(
        v.verify_server_cert(&der, &[], &name, &[], rustls::pki_types::UnixTime::now())
            .is_ok(),
    )
}

fn server_pem(dir: &Path) -> Result<String> {
    let p = dir.join(pki::SERVER_CERT);
    std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
}

/// Replaces `ca.pem` with `text`, signed first by the release key (`ca.pem.minisig`): agents
/// and relays take a bundle only with the signature of the release key they pin, so a relay
/// between them and the stager cannot add a CA of its own.
fn write_bundle(dir: &Path, text: &str) -> Result<()> {
    let store = crate::store::Store::open(dir)?;
    let key = bundle::release::ReleaseKey::load(&store.release_key())?;
    let sig = key.sign(
        text.as_bytes(),
        &format!(
            "reinstall trust bundle sha256 {}",
            bundle::release::trust_sha256(text)
        ),
    )?;
    let at = dir.join(CA_CERT);
    crate::certfiles::replace_file(&crate::certfiles::beside(&at, "minisig"), &sig, 0o644)?;
    crate::certfiles::replace_file(&at, text, 0o644)
}

/// The text agents and relays are given to trust: `ca.pem`.
pub fn bundle(dir: &Path) -> Result<String> {
    std::fs::read_to_string(dir.join(CA_CERT))
        .with_context(|| format!("reading {}", dir.join(CA_CERT).display()))
}

/// Step 1: a new CA, trusted beside the current one. Returns it.
pub fn rotate(dir: &Path, stager_name: &str, db: &Db) -> Result<Ca> {
    // A rotate cut short between writing the key and the bundle is finished with that key.
    let mut cut_short = None;
    match stage(dir) {
        Stage::One => {}
        Stage::Rotated if pki::ca_cert_of(dir, NEXT_KEY).is_err() => {
            cut_short = Some(
                std::fs::read_to_string(dir.join(NEXT_KEY))
                    .with_context(|| format!("reading {}", dir.join(NEXT_KEY).display()))?,
            );
        }
        Stage::Rotated => bail!(
            "a new CA is already made ({NEXT_KEY}); next: `stager ca switch` once `stager ca status` shows every agent and relay holding it"
        ),
        Stage::Switched => bail!(
            "the last replacement is not finished: `stager ca retire` first ({OLD_KEY} is still trusted)"
        ),
    }
    let current = list(dir)?.remove(0);
    db.first_ca(&current.fingerprint)?;
    db.set_setting(ROTATED_AT, &pki::rfc3339(std::time::SystemTime::now()))?;
    let cn = format!(
        "reinstall CA {stager_name} {}",
        pki::rfc3339(std::time::SystemTime::now())
    );
    let cert = match cut_short {
        Some(key) => pki::ca_cert_for(&key, &cn)?,
        None => {
            let (key, cert) = pki::new_ca(&cn)?;
            // The key first (a crash before the bundle is finished by running it again).
            pki::write_private(&dir.join(NEXT_KEY), &key)?;
            cert
        }
    };
    write_bundle(dir, &format!("{}{}", current.pem, cert))?;
    ca_of(cert, "next")
}

/// Step 2: the new CA issues; the server certificate is reissued by it. Returns the new
/// issuing CA and the server certificate.
pub fn switch(dir: &Path, stager_name: &str, db: &Db) -> Result<(Ca, pki::CertInfo)> {
    match stage(dir) {
        Stage::Rotated => {
            pki::ca_cert_of(dir, NEXT_KEY)
                .context("`stager ca rotate` was cut short: run it again first")?;
            // The old key kept (a link), the new one renamed over it: at every moment
            // ca.key is a CA's key; a crash before the rename leaves `rotate`'s state.
            let (key, old, new) = (dir.join(CA_KEY), dir.join(OLD_KEY), dir.join(NEXT_KEY));
            let _ = std::fs::remove_file(&old);
            std::fs::hard_link(&key, &old)
                .with_context(|| format!("keeping {} as {}", key.display(), old.display()))?;
            std::fs::rename(&new, &key)
                .with_context(|| format!("renaming {} to {}", new.display(), key.display()))?;
            bundle::unpack::sync_dir(dir)?;
        }
        Stage::Switched => {
            // Run again after a switch cut short: finish what it did not get to.
            let issuing = list(dir)?.remove(0);
            if db.setting(ISSUING)?.as_deref() == Some(issuing.fingerprint.as_str())
                && issued_by(&server_pem(dir)?, &issuing.pem)?
            {
                bail!("already switched; next: `stager ca retire` (see `stager ca status`)");
            }
        }
        Stage::One => bail!("no new CA to switch to: `stager ca rotate` first"),
    }
    let next = list(dir)?.remove(0);
    // Certificates issued from here on are the new CA's; those of the old one are due.
    db.set_setting(ISSUING, &next.fingerprint)?;
    let server = pki::renew_server(dir, stager_name, &[], pki::SERVER_DAYS)?;
    Ok((next, server))
}

/// Step 3: the old CA is no longer trusted. Returns it (`None`: a retire cut short after
/// the bundle was written, finished now).
pub fn retire(dir: &Path) -> Result<Option<Ca>> {
    if stage(dir) != Stage::Switched {
        bail!("no old CA to retire: `stager ca rotate` and `stager ca switch` come first");
    }
    let issuing = list(dir)?.remove(0);
    // Never a bundle that the server's own certificate does not chain to.
    if !issued_by(&server_pem(dir)?, &issuing.pem)? {
        bail!("the server certificate is not the new CA's yet: run `stager ca switch` again to finish it");
    }
    let old = match pki::ca_cert_of(dir, OLD_KEY) {
        Ok(pem) => {
            let old = ca_of(pem, "old")?;
            write_bundle(dir, &issuing.pem)?;
            Some(old)
        }
        Err(_) => None,
    };
    std::fs::remove_file(dir.join(OLD_KEY))
        .with_context(|| format!("removing {}", dir.join(OLD_KEY).display()))?;
    bundle::unpack::sync_dir(dir)?;
    Ok(old)
}

/// The settings key of when `rotate` ran (RFC 3339).
pub const ROTATED_AT: &str = "ca_rotated_at";

/// The names whose current certificate's holder may not trust the new CA yet (what `switch`
/// waits for): agents and relays that have not said they hold the trust bundle `sha256`,
/// and operators whose identity file was issued before `rotated_at` or in its second (it
/// may hold the old CA only; operators do not poll: issue them a new one).
pub fn lacking_bundle<'a>(
    listed: &'a [Listed],
    sha256: &str,
    rotated_at: Option<&str>,
) -> Vec<&'a Listed> {
    listed
        .iter()
        .filter(|l| {
            l.standing == Standing::Current
                && match l.cert.role.as_str() {
                    "agent" | "relay" => l.cert.trust.as_deref() != Some(sha256),
                    "operator" => rotated_at.is_some_and(|r| l.cert.issued.as_str() <= r),
                    _ => false,
                }
        })
        .collect()
}

/// The current certificates (agents', relays', operators') a CA other than `issuing`
/// issued (what `retire` waits for).
pub fn issued_by_others<'a>(listed: &'a [Listed], issuing: &str) -> Vec<&'a Listed> {
    listed
        .iter()
        .filter(|l| {
            l.standing == Standing::Current
                && matches!(l.cert.role.as_str(), "agent" | "relay" | "operator")
                && l.cert.ca.as_deref() != Some(issuing)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;

    /// Through the three steps: certificates chain to the CA that issued them, the server's
    /// to the new one after the switch; each step refuses out of order; the bundle holds
    /// two CAs from rotate to retire and the new one after.
    #[test]
    fn the_ca_is_replaced_in_three_steps() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        crate::store::Store::init(dir).unwrap();
        pki::init(dir, "s1", &["localhost".into()]).unwrap();
        let db = Db::open(&dir.join(crate::db::FILE)).unwrap();
        let first = list(dir).unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].name, "reinstall CA s1");
        let verifies = |cert_pem: &str, ca_pem: &str| {
            let roots = std::sync::Arc::new(crate::trust::roots_of(ca_pem).unwrap());
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots,
                crate::server::provider(),
            )
            .build()
            .unwrap();
            let der =
                rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
            v.verify_client_cert(&der, &[], rustls::pki_types::UnixTime::now())
                .is_ok()
        };
        let a = pki::issue_client(dir, "web1", "agent", 10).unwrap();
        db.add_cert(
            &a.fingerprint,
            "web1",
            "agent",
            &a.not_after_text(),
            None,
            &[],
        )
        .unwrap();
        assert!(switch(dir, "s1", &db).is_err() && retire(dir).is_err());

        let next = rotate(dir, "s1", &db).unwrap();
        assert!(rotate(dir, "s1", &db)
            .unwrap_err()
            .to_string()
            .contains("switch"));
        assert_eq!(stage(dir), Stage::Rotated);
        let both = bundle(dir).unwrap();
        assert_eq!(bundle::release::pem_certificates(&both).len(), 2);
        // Signed by the release key, as agents check it.
        let sig = std::fs::read_to_string(dir.join("ca.pem.minisig")).unwrap();
        let public = bundle::release::ReleasePublicKey::load(&dir.join("release.pub")).unwrap();
        public
            .verify(both.as_bytes(), &sig, Path::new("ca.pem"))
            .unwrap();
        assert!(public
            .verify(first[0].pem.as_bytes(), &sig, Path::new("x"))
            .is_err());
        // Still issued by the first CA; recorded as such.
        let b = pki::issue_client(dir, "web2", "agent", 10).unwrap();
        db.add_cert(
            &b.fingerprint,
            "web2",
            "agent",
            &b.not_after_text(),
            None,
            &[],
        )
        .unwrap();
        assert!(verifies(&b.cert_pem, &first[0].pem) && !verifies(&b.cert_pem, &next.pem));
        let listed = crate::certs::standings(db.certs().unwrap(), std::time::SystemTime::now());
        assert!(listed
            .iter()
            .all(|l| l.cert.ca.as_deref() == Some(first[0].fingerprint.as_str())));
        let sha = bundle::release::trust_sha256(&both);
        assert_eq!(lacking_bundle(&listed, &sha, None).len(), 2);
        db.cert_trust(&a.fingerprint, &sha).unwrap();
        let listed = crate::certs::standings(db.certs().unwrap(), std::time::SystemTime::now());
        let lacking: Vec<&str> = lacking_bundle(&listed, &sha, None)
            .iter()
            .map(|l| l.cert.name.as_str())
            .collect();
        assert_eq!(lacking, ["web2"]);
        assert!(!db.cert_due(&b.fingerprint, "2000-01-01T00:00:00Z").unwrap());

        let (issuing, server) = switch(dir, "s1", &db).unwrap();
        assert_eq!(issuing.fingerprint, next.fingerprint);
        assert_eq!(stage(dir), Stage::Switched);
        let server_pem = std::fs::read_to_string(dir.join(pki::SERVER_CERT)).unwrap();
        assert_eq!(server.sans, ["localhost"]);
        let roots = crate::trust::roots_of(&next.pem).unwrap();
        let sv = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            crate::server::provider(),
        )
        .build()
        .unwrap();
        let der = rustls::pki_types::CertificateDer::from_pem_slice(server_pem.as_bytes()).unwrap();
        sv.verify_server_cert(
            &der,
            &[],
            &rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            &[],
            rustls::pki_types::UnixTime::now(),
        )
        .expect("the server certificate chains to the new CA");
        // The first CA's certificates are due; the new CA's are not.
        assert!(db.cert_due(&b.fingerprint, "2000-01-01T00:00:00Z").unwrap());
        let c = pki::issue_client(dir, "web2", "agent", 10).unwrap();
        db.add_cert(
            &c.fingerprint,
            "web2",
            "agent",
            &c.not_after_text(),
            None,
            &[],
        )
        .unwrap();
        assert!(verifies(&c.cert_pem, &next.pem) && !verifies(&c.cert_pem, &first[0].pem));
        assert!(!db.cert_due(&c.fingerprint, "2000-01-01T00:00:00Z").unwrap());
        let listed = crate::certs::standings(db.certs().unwrap(), std::time::SystemTime::now());
        let others: Vec<&str> = issued_by_others(&listed, &next.fingerprint)
            .iter()
            .map(|l| l.cert.name.as_str())
            .collect();
        assert_eq!(others, ["web1"]);

        // A switch cut short before the server certificate: `switch` again finishes it, and
        // `retire` refuses until then.
        let server_new = std::fs::read_to_string(dir.join(pki::SERVER_CERT)).unwrap();
        let old_pair = |f: &str| std::fs::read_to_string(dir.join(format!("{f}.old"))).unwrap();
        crate::certfiles::replace_pair(
            &dir.join(pki::SERVER_CERT),
            &dir.join(pki::SERVER_KEY),
            &old_pair(pki::SERVER_CERT),
            &old_pair(pki::SERVER_KEY),
        )
        .unwrap();
        assert!(retire(dir)
            .unwrap_err()
            .to_string()
            .contains("switch` again"));
        let (again, _) = switch(dir, "s1", &db).unwrap();
        assert_eq!(again.fingerprint, next.fingerprint);
        assert!(switch(dir, "s1", &db)
            .unwrap_err()
            .to_string()
            .contains("already"));
        assert_ne!(
            std::fs::read_to_string(dir.join(pki::SERVER_CERT)).unwrap(),
            server_new
        );

        let old = retire(dir).unwrap().unwrap();
        assert_eq!(old.fingerprint, first[0].fingerprint);
        assert_eq!(stage(dir), Stage::One);
        assert_eq!(bundle(dir).unwrap(), next.pem);
        assert!(!dir.join(OLD_KEY).exists());
        assert_eq!(list(dir).unwrap()[0].fingerprint, next.fingerprint);
        // And round again, with a rotate cut short after its key: run again, it finishes
        // with that key; a retire cut short after the bundle likewise.
        let (k, _) = pki::new_ca("x").unwrap();
        pki::write_private(&dir.join(NEXT_KEY), &k).unwrap();
        assert_eq!(list(dir).unwrap().len(), 1);
        let second = rotate(dir, "s1", &db).unwrap();
        assert_eq!(pki::ca_cert_of(dir, NEXT_KEY).unwrap(), second.pem);
        switch(dir, "s1", &db).unwrap();
        let issuing = list(dir).unwrap().remove(0);
        write_bundle(dir, &issuing.pem).unwrap();
        assert_eq!(stage(dir), Stage::Switched);
        assert_eq!(list(dir).unwrap().len(), 1);
        assert!(retire(dir).unwrap().is_none());
        assert_eq!(stage(dir), Stage::One);
    }
}
