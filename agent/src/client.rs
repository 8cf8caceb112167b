//! The stager client: HTTPS with this machine's (or operator's) client certificate, trusting
//! only the CA named in the identity file, TLS 1.3 only. Blocking (`ureq`): the agent does one
//! thing at a time, and the operator CLI waits on the stager anyway.

use anyhow::{anyhow, Context, Result};
use proto::identity::IdentityFile;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;
use std::time::Duration;

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
