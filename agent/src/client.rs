//! The stager client: HTTPS with this machine's (or operator's) client certificate, trusting
//! only the CA named in the identity file, TLS 1.3 only. Blocking (`ureq`): the agent does one
//! thing at a time, and the operator CLI waits on the stager anyway.

// ureq's own error type is large; it is passed along once per request, not stored.
#![allow(clippy::result_large_err)]

use anyhow::{anyhow, Context, Result};
use proto::identity::IdentityFile;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;
use std::time::Duration;

/// The pause before retry number `attempt` (from 0): 0.5 s doubling to 30 s.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((500u64 << attempt.min(6)).min(30_000))
}

#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    pub identity: IdentityFile,
    /// Keep retrying an unreachable (or failing, 5xx) stager this long; `None` fails at once
    /// (the operator's commands).
    retry_for: Option<Duration>,
    /// Which of the identity's URLs (`stager`, then each `fallback`) requests go to, and
    /// since when: a fallback taken because the first could not be reached is kept for
    /// [`BACK_TO_FIRST`], then the first is tried again.
    using: Arc<std::sync::Mutex<(usize, std::time::Instant)>>,
}

/// A request that failed because the stager could not be reached, or failed (5xx): an
/// outage, which may pass, not a refusal. Its text is the error's.
#[derive(Debug)]
pub struct Outage(String);

impl std::fmt::Display for Outage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Outage {}

/// Whether `e` is an [`Outage`] (the stager unreachable or failing), not a refusal.
pub fn is_outage(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Outage>().is_some()
}

/// Whether a request's failure is an outage (unreachable, or a 5xx): what [`Client::call`]
/// retries and [`Client::failure`] reports as an [`Outage`].
fn outage(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::Transport(_) => true,
        ureq::Error::Status(code, _) => *code >= 500,
    }
}

/// How long requests stay on a fallback URL before the identity's `stager` is tried again.
pub const BACK_TO_FIRST: Duration = Duration::from_secs(300);

/// `reinstall/VERSION`, with ` (build NAME)` when built with `REINSTALL_BUILD=NAME` set (a
/// release script sets it to the commit or package version): what the stager records as each
/// host's agent (`reinstall status`).
pub fn user_agent() -> String {
    let v = concat!("reinstall/", env!("CARGO_PKG_VERSION"));
    match option_env!("REINSTALL_BUILD") {
        Some(b) if !b.is_empty() => format!("{v} (build {b})"),
        _ => v.to_string(),
    }
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
            // A stager (or a proxy or relay in front of it) that accepts the connection and then
            // says nothing must not hold the agent for long: no read waits more than a minute,
            // except a long poll's (`work`), which has its own deadline.
            .timeout_read(Duration::from_secs(60))
            .timeout_write(Duration::from_secs(60))
            // No kept-alive connections: ureq sets the read timeout when it connects and
            // clears it when a connection goes back to its pool, so a request on a reused
            // connection waited for its answer forever once the stager had gone silent (a
            // pulled cable, a partition: no FIN, no RST). Found in the VM; see
            // `tests/agent_migration.rs::a_stager_gone_silent_mid_job_...`. A new TLS
            // connection per request costs a handshake, at most one every second or two.
            .max_idle_connections(0)
            .user_agent(&user_agent())
            .build();
        Ok(Client {
            agent,
            identity,
            retry_for: None,
            using: Arc::new(std::sync::Mutex::new((0, std::time::Instant::now()))),
        })
    }

    /// This client without retries: for best-effort reports that must not hold the agent.
    pub fn once(&self) -> Client {
        let mut c = self.clone();
        c.retry_for = None;
        c
    }

    /// A client that waits out stager outages (the agent's), with backoff.
    pub fn retrying(mut self, for_: Duration) -> Client {
        self.retry_for = Some(for_);
        self
    }

    /// Makes a new key and has the stager certify it (`POST /v1/agent/identity`, when the
    /// stager said the current certificate is due; the private key never leaves this host),
    /// checks that they make a working client, writes them into the identity file at `path`
    /// (atomically, 0600), and returns that client and the new certificate's end. On any
    /// error the identity file is as it was.
    pub fn renew_identity(&self, path: &std::path::Path) -> Result<(Client, String)> {
        let key = rcgen::KeyPair::generate().context("making a new key")?;
        let r: proto::v1::RenewedIdentity = self.post(
            "/v1/agent/identity",
            &proto::v1::RenewIdentity {
                public_key: key.public_key_pem(),
            },
        )?;
        let mut id = self.identity.clone();
        id.cert = r.cert;
        id.key = key.serialize_pem();
        let next = self.replaced(id, path).context("the renewed certificate")?;
        Ok((next, r.not_after))
    }

    /// The SHA-256 of the CA certificates this client trusts (the identity's `ca`), as the
    /// stager compares it with its own.
    pub fn trust_sha256(&self) -> String {
        bundle::release::trust_sha256(&self.identity.ca)
    }

    /// Trusts the CA certificates `given` from now on (the stager's CA is being replaced):
    /// only if `signature` is the release key's (the identity's `release_pub`: a relay
    /// between this host and the stager cannot slip in a CA of its own), they keep one of
    /// the CAs trusted now, and make a working client; written into the identity file at
    /// `path` (atomically, 0600). On any error the identity file is as it was.
    pub fn take_trust(
        &self,
        path: &std::path::Path,
        given: &str,
        signature: Option<&str>,
    ) -> Result<Client> {
        let key = bundle::release::ReleasePublicKey::from_text(
            &self.identity.release_pub,
            std::path::Path::new("the identity file's release_pub"),
        )?;
        key.verify(
            given.as_bytes(),
            signature.context("the CA certificates the stager sent are not signed")?,
            std::path::Path::new("the CA certificates the stager sent"),
        )?;
        anyhow::ensure!(
            bundle::release::keeps_a_ca(&self.identity.ca, given),
            "the CA certificates the stager sent keep none of those trusted now"
        );
        let mut id = self.identity.clone();
        id.ca = given.to_string();
        self.replaced(id, path)
            .context("the CA certificates the stager sent")
    }

    /// A client for `id` that retries as this one does, after writing `id` to `path`.
    fn replaced(&self, id: IdentityFile, path: &std::path::Path) -> Result<Client> {
        let mut next = Client::new(id)?;
        next.retry_for = self.retry_for;
        next.using = self.using.clone();
        crate::journal::replace_file(path, next.identity.to_toml().as_bytes(), 0o600)?;
        Ok(next)
    }

    /// The URL requests go to now (the identity's `stager`, or the fallback taken while it
    /// could not be reached).
    pub fn url_in_use(&self) -> String {
        let i = self.using().0;
        let bases = self.bases();
        bases.get(i).unwrap_or(&bases[0]).to_string()
    }

    /// The identity's URLs: `stager`, then each `fallback`.
    fn bases(&self) -> Vec<&str> {
        self.identity.urls()
    }

    fn using(&self) -> std::sync::MutexGuard<'_, (usize, std::time::Instant)> {
        self.using.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a request against the URL in use (`f` gets it, without a trailing `/`), repeating
    /// it while the stager is unreachable or failing (5xx), for as long as this client
    /// retries. An unreachable URL passes the request to the identity's next one (once each
    /// even without retries).
    fn call(
        &self,
        mut f: impl FnMut(&str) -> Result<ureq::Response, ureq::Error>,
    ) -> Result<ureq::Response, ureq::Error> {
        let bases = self.bases();
        let start = std::time::Instant::now();
        let mut attempt = 0u32;
        let mut tried = 0usize;
        {
            let mut u = self.using();
            if u.0 != 0 && u.1.elapsed() >= BACK_TO_FIRST {
                *u = (0, std::time::Instant::now());
            }
        }
        loop {
            let i = self.using().0 % bases.len();
            let r = f(bases[i]);
            let unreachable = matches!(&r, Err(ureq::Error::Transport(_)));
            let retryable = r.as_ref().is_err_and(outage);
            if unreachable && bases.len() > 1 {
                let next = (i + 1) % bases.len();
                if attempt == 0 {
                    eprintln!(
                        "reinstall: the stager at {} is unreachable; trying {}",
                        bases[i], bases[next]
                    );
                }
                *self.using() = (next, std::time::Instant::now());
                tried += 1;
                if tried < bases.len() {
                    continue;
                }
            }
            match self.retry_for {
                Some(limit) if retryable && start.elapsed() < limit => {
                    if attempt == 0 {
                        eprintln!(
                            "reinstall: the stager at {} is unreachable; retrying",
                            bases[i]
                        );
                    }
                    std::thread::sleep(backoff(attempt));
                    attempt += 1;
                    tried = 0;
                }
                _ => return r,
            }
        }
    }

    /// The error for a request that failed: the stager's own reason for a refusal, or that
    /// it could not be reached (an [`Outage`], as is a 5xx).
    fn failure(&self, path: &str, e: ureq::Error) -> anyhow::Error {
        let is_outage = outage(&e);
        match e {
            ureq::Error::Status(code, resp) => {
                let msg = resp
                    .into_json::<proto::v1::ErrorBody>()
                    .map(|b| b.error)
                    .unwrap_or_else(|_| "(no error message)".into());
                let text = format!("stager refused {path} ({code}): {msg}");
                if is_outage {
                    Outage(text).into()
                } else {
                    anyhow!(text)
                }
            }
            e => Outage(format!(
                "cannot reach the stager at {}: {e}",
                self.bases().join(" or ")
            ))
            .into(),
        }
    }

    pub fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        let r = self.call(|base| self.agent.get(&format!("{base}{path}")).call());
        self.decode(path, r)
    }

    /// The stager's listing of bundle `spec` (`NAME@VERSION`, or `NAME`: its newest version,
    /// the last of `GET /v1/bundles/NAME`, which lists oldest first as the stager resolves a
    /// job's `NAME`). Unsigned: check the signed manifest before trusting its contents.
    pub fn listed_bundle(&self, spec: &str) -> Result<bundle::Manifest> {
        let (name, version) = bundle::name::parse_ref(spec)?;
        let versions: Vec<bundle::Manifest> = self.get(&format!("/v1/bundles/{name}"))?;
        match &version {
            Some(v) => versions.into_iter().find(|m| m.version == v.as_str()),
            None => versions.into_iter().last(),
        }
        .ok_or_else(|| anyhow!("no bundle {spec} on the stager"))
    }

    /// The agent's work (`GET /v1/agent/work`), long-polling up to `wait`; the request has a
    /// deadline of `wait` + 30 s instead of the 60 s read timeout.
    pub fn poll_work(&self, wait: Duration) -> Result<proto::v1::Work> {
        let path = format!(
            "/v1/agent/work?wait={}&trust={}",
            wait.as_secs(),
            self.trust_sha256()
        );
        let r = self.call(|base| {
            self.agent
                .get(&format!("{base}{path}"))
                .timeout(wait + Duration::from_secs(30))
                .call()
        });
        self.decode(&path, r)
    }

    pub fn post<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T> {
        let r = self.call(|base| self.agent.post(&format!("{base}{path}")).send_json(body));
        self.decode(path, r)
    }

    /// GET `path` from byte `offset` on (`Range`); the body as a stream.
    pub fn get_range(&self, path: &str, offset: u64) -> Result<Box<dyn std::io::Read + Send>> {
        let r = self.call(|base| {
            let mut req = self.agent.get(&format!("{base}{path}"));
            if offset > 0 {
                req = req.set("Range", &format!("bytes={offset}-"));
            }
            req.call()
        });
        match r {
            Ok(r) if offset == 0 || r.status() == 206 => Ok(Box::new(r.into_reader())),
            Ok(r) => Err(anyhow!(
                "stager answered {} to a range request for {path}",
                r.status()
            )),
            Err(e) => Err(self.failure(path, e)),
        }
    }

    /// GET `path` as bytes.
    pub fn get_bytes(&self, path: &str) -> Result<Vec<u8>> {
        let mut r = self.get_range(path, 0)?;
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
            Err(e) => Err(self.failure(path, e)),
        }
    }
}
