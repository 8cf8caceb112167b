//! The stager client: HTTPS with this machine's (or operator's) client certificate, trusting
//! only the CA named in the identity file, TLS 1.3 only. Blocking (`ureq`): the agent does one
//! thing at a time, and the operator CLI waits on the stager anyway.

use anyhow::{anyhow, Context, Result};
use proto::identity::IdentityFile;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    pub identity: IdentityFile,
}

impl Client {
    pub fn new(identity: IdentityFile) -> Result<Client> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(identity.ca.as_bytes()) {
            roots.add(c.context("identity file: ca is not a PEM certificate")?)?;
        }
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(identity.cert.as_bytes())
                .collect::<Result<_, _>>()
                .context("identity file: cert is not a PEM certificate")?;
        let key = PrivateKeyDer::from_pem_slice(identity.key.as_bytes())
            .context("identity file: key is not a PEM private key")?;
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .context("identity file: cert and key do not match")?;
        let agent = ureq::AgentBuilder::new()
            .tls_config(Arc::new(tls))
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(Duration::from_secs(360))
            .user_agent(concat!("reinstall/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Client { agent, identity })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.identity.stager.trim_end_matches('/'))
    }

    pub fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        let r = self.agent.get(&self.url(path)).call();
        self.decode(path, r)
    }

    pub fn post<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T> {
        let r = self.agent.post(&self.url(path)).send_json(body);
        self.decode(path, r)
    }

    /// GET `path` from byte `offset` on (`Range`); the body as a stream.
    pub fn get_range(
        &self,
        path: &str,
        offset: u64,
    ) -> Result<Box<dyn std::io::Read + Send>, FetchError> {
        let mut req = self.agent.get(&self.url(path));
        if offset > 0 {
            req = req.set("Range", &format!("bytes={offset}-"));
        }
        match req.call() {
            Ok(r) if offset == 0 || r.status() == 206 => Ok(Box::new(r.into_reader())),
            Ok(r) => Err(FetchError {
                retryable: false,
                message: format!(
                    "stager answered {} to a range request for {path}",
                    r.status()
                ),
            }),
            Err(ureq::Error::Status(code, resp)) => Err(FetchError {
                retryable: code >= 500,
                message: format!(
                    "stager refused {path} ({code}): {}",
                    resp.into_json::<proto::v1::ErrorBody>()
                        .map(|b| b.error)
                        .unwrap_or_default()
                ),
            }),
            Err(e) => Err(FetchError {
                retryable: true,
                message: format!("cannot reach the stager at {}: {e}", self.identity.stager),
            }),
        }
    }

    /// GET `path` as bytes.
    pub fn get_bytes(&self, path: &str) -> Result<Vec<u8>> {
        let mut r = self
            .get_range(path, 0)
            .map_err(|e| anyhow!("{}", e.message))?;
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut r, &mut v).with_context(|| format!("reading {path}"))?;
        Ok(v)
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        r: Result<ureq::Response, ureq::Error>,
    ) -> Result<T> {
        match r {
            Ok(resp) => resp
                .into_json()
                .with_context(|| format!("reading the stager's answer to {path}")),
            Err(ureq::Error::Status(code, resp)) => {
                let msg = resp
                    .into_json::<proto::v1::ErrorBody>()
                    .map(|b| b.error)
                    .unwrap_or_else(|_| "(no error message)".into());
                Err(anyhow!("stager refused {path} ({code}): {msg}"))
            }
            Err(e) => Err(anyhow!(
                "cannot reach the stager at {}: {e}",
                self.identity.stager
            )),
        }
    }
}

/// A failed fetch, and whether trying again could help (the stager was unreachable or
/// failed, rather than refused).
#[derive(Debug)]
pub struct FetchError {
    pub retryable: bool,
    pub message: String,
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}
