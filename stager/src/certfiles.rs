//! A TLS certificate and its key, read from their files and read again when the files change:
//! `stager server-cert --renew`, and a relay renewing its own certificate, take effect on the
//! next handshake of a running `stager serve` or `stager relay serve`, without a restart.
//!
//! The pair is replaced by [`replace_pair`]: at every moment some pair of files on disk
//! matches, and [`load_pair`] finds it, so a crash mid-renewal leaves a server that starts.

use anyhow::{Context, Result};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// How often a handshake looks at the files again (at most).
const RECHECK: Duration = Duration::from_secs(2);

pub struct CertFiles {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    state: Mutex<Loaded>,
}

struct Loaded {
    current: Arc<CertifiedKey>,
    fingerprint: String,
    stamp: Stamp,
    checked: Instant,
}

/// What a change of either file changes: inode (a rename), modification time, length.
type Stamp = [Option<(u64, SystemTime, u64)>; 2];

fn stamp(cert: &Path, key: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    [cert, key].map(|p| {
        let m = std::fs::metadata(p).ok()?;
        Some((m.ino(), m.modified().ok()?, m.len()))
    })
}

impl std::fmt::Debug for CertFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CertFiles({})", self.cert.display())
    }
}

impl CertFiles {
    /// Reads the pair (see [`load_pair`]); an error names the files.
    pub fn open(cert: &Path, key: &Path, provider: Arc<CryptoProvider>) -> Result<Arc<CertFiles>> {
        let stamp = stamp(cert, key);
        let (current, fingerprint) = load_pair(cert, key, &provider)?;
        Ok(Arc::new(CertFiles {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            provider,
            state: Mutex::new(Loaded {
                current: Arc::new(current),
                fingerprint,
                stamp,
                checked: Instant::now(),
            }),
        }))
    }

    /// The pair to present now: the files' if they changed and read well, else the one in
    /// use (a pair that does not read is reported once per change, and the old one serves).
    pub fn current(&self) -> Arc<CertifiedKey> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.checked.elapsed() < RECHECK {
            return s.current.clone();
        }
        s.checked = Instant::now();
        let now = stamp(&self.cert, &self.key);
        if now == s.stamp {
            return s.current.clone();
        }
        s.stamp = now;
        match load_pair(&self.cert, &self.key, &self.provider) {
            Ok((_, fp)) if fp == s.fingerprint => {}
            Ok((k, fp)) => {
                let end = k
                    .end_entity_cert()
                    .ok()
                    .and_then(|d| crate::pki::cert_info_der(d).ok())
                    .map_or("?".into(), |i| crate::pki::rfc3339(i.not_after));
                println!(
                    "{}: now serving certificate sha256 {fp} (was {}), valid until {end}",
                    self.cert.display(),
                    s.fingerprint
                );
                s.current = Arc::new(k);
                s.fingerprint = fp;
            }
            Err(e) => eprintln!(
                "warning: {e:#}; still serving certificate sha256 {}",
                s.fingerprint
            ),
        }
        s.current.clone()
    }

    /// SHA-256 of the certificate in use.
    pub fn fingerprint(&self) -> String {
        self.current();
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.fingerprint.clone()
    }
}

impl rustls::server::ResolvesServerCert for CertFiles {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl rustls::client::ResolvesClientCert for CertFiles {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// `path` with `.suffix` added to its name.
pub fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".");
    s.push(suffix);
    PathBuf::from(s)
}

/// The certificate chain in `cert` and the key in `key`, checked to match; if they do not,
/// `cert.new` with `key` (what [`replace_pair`] leaves if stopped between its renames).
/// Returns the pair and the certificate's SHA-256.
pub fn load_pair(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<(CertifiedKey, String)> {
    let one = |cert: &Path| -> Result<(CertifiedKey, String)> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .with_context(|| format!("reading {}", cert.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("parsing {}", cert.display()))?;
        let der = PrivateKeyDer::from_pem_file(key)
            .with_context(|| format!("reading {}", key.display()))?;
        certified(chain, der, provider)
            .with_context(|| format!("{} with {}", cert.display(), key.display()))
    };
    match one(cert) {
        Ok(k) => Ok(k),
        Err(e) => {
            let new = beside(cert, "new");
            match new.exists().then(|| one(&new)) {
                Some(Ok(k)) => Ok(k),
                _ => Err(e),
            }
        }
    }
}

/// Whether the PEM certificate (chain) `cert_pem` is the certificate of the PEM key `key_pem`;
/// its SHA-256 if it is.
pub fn check_pair(cert_pem: &str, key_pem: &str) -> Result<String> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    certified(chain, key, &crate::server::provider()).map(|(_, fp)| fp)
}

/// The pair, checked to match, and the certificate's SHA-256.
fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    provider: &CryptoProvider,
) -> Result<(CertifiedKey, String)> {
    anyhow::ensure!(!chain.is_empty(), "no certificate in it");
    let signer = provider
        .key_provider
        .load_private_key(key)
        .context("not a key this server can use")?;
    let k = CertifiedKey::new(chain, signer);
    k.keys_match()
        .map_err(|_| anyhow::anyhow!("the certificate is not the key's"))?;
    let fp = crate::pki::fingerprint(k.cert[0].as_ref());
    Ok((k, fp))
}

/// Replaces a key and its certificate: the old pair kept as `.old`, both new files written
/// and flushed as `.new`, then the key renamed into place, then the certificate. Before the
/// first rename the old pair matches, between them `cert.new` and the new key (which
/// [`load_pair`] tries), after the second the new pair.
pub fn replace_pair(cert: &Path, key: &Path, cert_pem: &str, key_pem: &str) -> Result<()> {
    for (at, text, mode) in [(key, key_pem, 0o600), (cert, cert_pem, 0o644)] {
        stage(at, text, mode)?;
    }
    for at in [key, cert] {
        std::fs::rename(beside(at, "new"), at)
            .with_context(|| format!("replacing {}", at.display()))?;
    }
    sync_parent(cert)
}

/// Replaces one file as [`replace_pair`] does each of its two: the old one kept as `.old`,
/// the new one written and flushed as `.new`, then renamed into place.
pub fn replace_file(at: &Path, text: &str, mode: u32) -> Result<()> {
    stage(at, text, mode)?;
    std::fs::rename(beside(at, "new"), at)
        .with_context(|| format!("replacing {}", at.display()))?;
    sync_parent(at)
}

/// `at` (if there is one) copied to `at.old`, `text` written and flushed as `at.new`.
fn stage(at: &Path, text: &str, mode: u32) -> Result<()> {
    let (old, new) = (beside(at, "old"), beside(at, "new"));
    match std::fs::copy(at, &old) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        r => {
            r.with_context(|| format!("keeping {} as {}", at.display(), old.display()))?;
        }
    }
    let _ = std::fs::remove_file(&new);
    bundle::release::write_new(&new, text.as_bytes(), mode)?;
    Ok(())
}

fn sync_parent(at: &Path) -> Result<()> {
    let dir = at.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("flushing {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// A replaced pair is served from the next check on; every state a crash between
    /// `replace_pair`'s steps can leave loads a matching pair; a pair that does not match
    /// is refused naming both files, and the one in use stays.
    #[test]
    fn a_replaced_pair_is_picked_up_and_every_crash_state_loads() {
        let d = tempfile::tempdir().unwrap();
        let (cert, key) = (d.path().join("c.pem"), d.path().join("c.key"));
        let (c1, k1) = pair("one.example");
        std::fs::write(&cert, &c1).unwrap();
        std::fs::write(&key, &k1).unwrap();
        let files = CertFiles::open(&cert, &key, provider()).unwrap();
        let fp1 = files.fingerprint();

        let (c2, k2) = pair("two.example");
        replace_pair(&cert, &key, &c2, &k2).unwrap();
        assert_eq!(std::fs::read_to_string(beside(&key, "old")).unwrap(), k1);
        assert_eq!(
            files.fingerprint(),
            fp1,
            "checked again only after {RECHECK:?}"
        );
        files.state.lock().unwrap().checked -= RECHECK;
        let fp2 = files.fingerprint();
        assert_ne!(fp2, fp1);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // Stopped between the renames: the new key, the old certificate, cert.new.
        std::fs::write(beside(&cert, "new"), &c2).unwrap();
        std::fs::write(&cert, &c1).unwrap();
        let (_, fp) = load_pair(&cert, &key, &provider()).unwrap();
        assert_eq!(fp, fp2);

        // A pair that matches nothing: refused by name, the one in use stays.
        std::fs::remove_file(beside(&cert, "new")).unwrap();
        let err = format!("{:#}", load_pair(&cert, &key, &provider()).unwrap_err());
        assert!(
            err.contains("c.pem with") && err.contains("c.key: the certificate is not the key's"),
            "{err}"
        );
        assert_eq!(check_pair(&c2, &k2).unwrap(), fp2);
        assert!(check_pair(&c1, &k2).is_err());
        files.state.lock().unwrap().checked -= RECHECK;
        assert_eq!(files.fingerprint(), fp2);
    }
}
