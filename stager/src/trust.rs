//! The CAs a stager or a relay trusts: `ca.pem`, one CA certificate, or two while the CA is
//! being replaced (`stager ca`). Read again when the file changes (looked at, at most every
//! 2 s, when a handshake needs it), as [`crate::certfiles::CertFiles`] does for a key pair:
//! a CA added or retired takes effect in a running `stager serve` or `stager relay serve`
//! without a restart, for the client certificates it accepts and, on a relay, for the
//! server certificate it accepts upstream.
//!
//! The file's text is also what agents and relays are given to trust ([`Trust::bundle`]):
//! they report the SHA-256 of the text they hold, and get the text when it differs.

use anyhow::{Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

const RECHECK: Duration = Duration::from_secs(2);

pub struct Trust {
    path: PathBuf,
    provider: Arc<CryptoProvider>,
    state: Mutex<Loaded>,
}

/// One reading of the file.
#[derive(Clone)]
pub struct Loaded {
    /// The file's text, as agents are given it.
    pub text: Arc<String>,
    /// Lower-case hex SHA-256 of `text`.
    pub sha256: String,
    /// `text`'s minisign signature by the release key (`ca.pem.minisig`), if there is one.
    pub signature: Option<Arc<String>>,
    client: Arc<dyn ClientCertVerifier>,
    server: Arc<dyn ServerCertVerifier>,
    stamp: Option<(u64, SystemTime, u64)>,
    checked: Instant,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Trust({})", self.path.display())
    }
}

fn stamp(p: &Path) -> Option<(u64, SystemTime, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).ok()?;
    Some((m.ino(), m.modified().ok()?, m.len()))
}

fn load(path: &Path, provider: &Arc<CryptoProvider>) -> Result<Loaded> {
    let stamp = stamp(path);
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let roots = Arc::new(roots_of(&text).with_context(|| path.display().to_string())?);
    let client = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .context("building the client certificate verifier")?;
    let server =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .context("building the server certificate verifier")?;
    let signature = std::fs::read_to_string(crate::certfiles::beside(path, "minisig"))
        .ok()
        .map(Arc::new);
    Ok(Loaded {
        sha256: bundle::release::trust_sha256(&text),
        signature,
        text: Arc::new(text),
        client,
        server,
        stamp,
        checked: Instant::now(),
    })
}

/// The certificates of a PEM text, as trust roots (at least one).
pub fn roots_of(text: &str) -> Result<rustls::RootCertStore> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(text.as_bytes()) {
        roots.add(c.context("not a PEM certificate")?)?;
    }
    anyhow::ensure!(!roots.is_empty(), "no certificate in it");
    Ok(roots)
}

impl Trust {
    pub fn open(path: &Path, provider: Arc<CryptoProvider>) -> Result<Arc<Trust>> {
        let loaded = load(path, &provider)?;
        Ok(Arc::new(Trust {
            path: path.to_path_buf(),
            provider,
            state: Mutex::new(loaded),
        }))
    }

    /// What is trusted now: the file's, if it changed and reads well; else what was (a file
    /// that does not read is reported once per change).
    pub fn current(&self) -> Loaded {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.checked.elapsed() < RECHECK {
            return s.clone();
        }
        s.checked = Instant::now();
        let now = stamp(&self.path);
        if now == s.stamp {
            return s.clone();
        }
        match load(&self.path, &self.provider) {
            Ok(l) => {
                if l.sha256 != s.sha256 {
                    println!(
                        "{}: now trusting {} CA certificate(s) (bundle sha256 {}, was {})",
                        self.path.display(),
                        roots_of(&l.text).map_or(0, |r| r.len()),
                        l.sha256,
                        s.sha256
                    );
                }
                *s = l;
            }
            Err(e) => {
                s.stamp = now;
                eprintln!(
                    "warning: {e:#}; still trusting the CA bundle sha256 {}",
                    s.sha256
                )
            }
        }
        s.clone()
    }
}

impl Trust {
    /// A handshake signature, checked as the WebPki verifiers of both sides check it (the
    /// trusted CAs play no part in it).
    fn signature(
        &self,
        tls: u8,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        match tls {
            12 => rustls::crypto::verify_tls12_signature(message, cert, dss, algs),
            _ => rustls::crypto::verify_tls13_signature(message, cert, dss, algs),
        }
    }
}

impl ClientCertVerifier for Trust {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: every client of ours holds one certificate.
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current()
            .client
            .verify_client_cert(end_entity, intermediates, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(12, message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(13, message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ServerCertVerifier for Trust {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.current().server.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(12, message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(13, message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
