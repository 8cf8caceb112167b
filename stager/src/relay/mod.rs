//! A site relay (`stager relay serve`): a stager's stand-in at a site, so that a bundle
//! crosses the WAN once per site, not once per machine (DESIGN.md §1, §5).
//!
//! Agents of the site reach the relay (their identity file names it); it verifies their
//! certificates against the fleet's CA and forwards every request to the upstream stager
//! over its own mutual-TLS connection, naming the agent by its certificate's fingerprint
//! ([`crate::api::RELAYED_FOR`]). The upstream stager looks that agent up exactly as if it
//! had connected itself, so every rule (its own job only, revoked certificates refused, a
//! rollout's waiting hosts kept off their bundles) holds through the relay, which decides
//! nothing.
//!
//! Relays chain (a site's relay under a regional one): a relay whose client forwards an
//! agent's request ([`crate::api::RELAYED_FOR`] set: a relay below this one) passes the agent
//! on and adds its client to [`crate::api::RELAYED_VIA`]; the stager checks every relay of
//! the chain.
//!
//! Blobs are the exception: the relay asks upstream whether the agent may read the blob
//! (a one-byte `Range` request as the agent), and then serves it from its cache. The first
//! request for a blob starts one download from upstream into `cache/SHA.part` (resumed with
//! `Range` when the WAN cuts it); every agent asking meanwhile is served from that file as
//! it grows, so bytes flow at once and the blob crosses the WAN once. A complete download is
//! checked against its SHA-256 and renamed to `cache/SHA`; one that is not is deleted (the
//! agents check every byte themselves too: hash, age's authentication, the signed manifest).
//!
//! The cache is bounded ([`cache`]): before a download starts, the least recently served
//! blobs are deleted to keep it within `cache_max_mib` and to leave `cache_keep_free_percent`
//! of its disk free; a blob that cannot fit even so passes through uncached.
//!
//! Files in the relay's directory (written by `stager relay init` on the upstream stager):
//! `relay.toml`, `ca.pem` (the CAs it trusts, replaced when upstream gives a new bundle
//! signed by the key in `release.pub`: `stager ca`), `relay.pem` and `relay.key` (0600): one
//! certificate, for both the server agents reach and the client upstream verifies), `cache/`.

pub mod cache;

use crate::http::{self, ApiError, BlobHead, ResBody};
use crate::metrics::Metrics;
use crate::server::{Conn, Served};
use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

pub const CONFIG: &str = "relay.toml";
pub const CERT: &str = "relay.pem";
pub const KEY: &str = "relay.key";
pub const CACHE: &str = "cache";
/// The stager's release public key: what a new trust bundle must be signed with.
pub const RELEASE_PUB: &str = "release.pub";

/// Longest wait for upstream's answer to a forwarded request (a long poll is ≤ 300 s).
const UPSTREAM_ANSWER: Duration = Duration::from_secs(330);
/// Connecting to upstream, TCP and TLS.
const UPSTREAM_CONNECT: Duration = Duration::from_secs(10);
/// An agent's TLS handshake, and its request's headers and body, as the stager allows them.
const HANDSHAKE: Duration = Duration::from_secs(10);
const REQUEST: Duration = Duration::from_secs(30);
/// How often a running relay asks upstream whether its certificate is due for renewal, and
/// how soon again after the question or the renewal failed.
const RENEW_CHECK: Duration = Duration::from_secs(3600);
const RENEW_RETRY: Duration = Duration::from_secs(600);
/// A download from upstream cut this many times in a row is given up (the next agent's
/// request starts it again).
const FILL_ATTEMPTS: u32 = 8;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// The relay's name: its certificate's CN, recorded by the upstream stager.
    pub name: String,
    /// Where `stager relay serve` listens.
    pub listen: String,
    /// `https://HOST:PORT` of the upstream stager.
    pub upstream: String,
    /// Most agent connections served at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Most MiB the blob cache holds (downloads under way included); none: no cap but the
    /// disk's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_max_mib: Option<u64>,
    /// Share of the cache's filesystem the cache leaves free for everything else.
    #[serde(default = "default_keep_free")]
    pub cache_keep_free_percent: u8,
    /// A blob download from upstream that receives nothing for this long goes on from
    /// where it stopped on a new connection (an upstream gone silent: no FIN, no RST).
    #[serde(default = "default_upstream_stall")]
    pub upstream_stall_secs: u64,
}

fn default_upstream_stall() -> u64 {
    60
}

fn default_max_connections() -> usize {
    10_000
}

fn default_keep_free() -> u8 {
    10
}

/// `stager relay serve --help`: the settings `relay.toml` takes.
pub const SETTINGS: &str = "relay.toml (in --dir; written by `stager relay init`):
  name = \"NAME\"                  the relay's name, its certificate's CN
  listen = \"ADDR:PORT\"           where agents reach it
  upstream = \"https://...\"       the stager it relays for
  max_connections = N            agent connections served at once (default 10000)
  cache_max_mib = N              most MiB its blob cache holds (default: no cap but the disk's)
  cache_keep_free_percent = P    share of the cache's disk left free (default 10)
  upstream_stall_secs = S        a blob download from upstream silent this long resumes on a
                                 new connection (default 60)
Before a blob is fetched, the least recently served blobs are deleted until both limits
hold; a blob that cannot fit even so passes through uncached.";

impl RelayConfig {
    pub fn new(name: String, listen: String, upstream: String) -> RelayConfig {
        RelayConfig {
            name,
            listen,
            upstream,
            max_connections: default_max_connections(),
            cache_max_mib: None,
            cache_keep_free_percent: default_keep_free(),
            upstream_stall_secs: default_upstream_stall(),
        }
    }

    pub fn load(dir: &Path) -> Result<RelayConfig> {
        let p = dir.join(CONFIG);
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        let c: RelayConfig =
            toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
        anyhow::ensure!(
            c.cache_keep_free_percent <= 90,
            "{}: cache_keep_free_percent = {} leaves the cache less than 10% of its disk (at most 90)",
            p.display(),
            c.cache_keep_free_percent
        );
        anyhow::ensure!(
            c.upstream_stall_secs > 0,
            "{}: upstream_stall_secs = 0 would give up on every download at once",
            p.display()
        );
        anyhow::ensure!(
            c.cache_max_mib != Some(0),
            "{}: cache_max_mib = 0 would cache nothing (leave it out for no cap)",
            p.display()
        );
        Ok(c)
    }

    /// The cache's limits in bytes.
    pub fn cache_limits(&self) -> cache::Limits {
        cache::Limits {
            max_bytes: self.cache_max_mib.map(|m| m.saturating_mul(1 << 20)),
            keep_free_percent: self.cache_keep_free_percent,
        }
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let p = dir.join(CONFIG);
        let text = format!(
            "# site relay configuration (see README: Site relays; `stager relay serve --help`)\n{}{}",
            toml::to_string(self).expect("config serializes"),
            if self.cache_max_mib.is_none() {
                "# cache_max_mib = 20480   # most MiB the blob cache holds (default: no cap but the disk's)\n"
            } else {
                ""
            }
        );
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
    }
}

/// How far a download from upstream has come.
#[derive(Debug, Clone, PartialEq)]
enum Filled {
    Running(u64),
    Done,
    Failed(String),
}

pub struct Relay {
    dir: PathBuf,
    config: RelayConfig,
    tls: tokio_rustls::TlsConnector,
    /// relay.pem and relay.key: both ends of the relay present them.
    files: Arc<crate::certfiles::CertFiles>,
    /// The CAs trusted (`ca.pem`), for agents' certificates and upstream's.
    trust: Arc<crate::trust::Trust>,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    /// Downloads under way: their progress and the blob's length.
    fills: Mutex<HashMap<String, (watch::Receiver<Filled>, u64)>>,
    metrics: Metrics,
    /// Blob bytes received from upstream (cache fills), shown by `/healthz`.
    bytes_from_upstream: AtomicU64,
    /// Blobs deleted from the cache to make room, and blobs passed through because they
    /// could not fit.
    evicted: AtomicU64,
    not_cached: AtomicU64,
    /// When and why the cache last failed on this machine's side (disk full, read-only):
    /// for [`PASS_THROUGH_FOR`] after it, blobs are passed through from upstream uncached.
    cache_broken: Mutex<Option<(Instant, String)>>,
}

/// How long blobs bypass a cache that failed on the relay's side before it is tried again.
const PASS_THROUGH_FOR: Duration = Duration::from_secs(600);

/// A failure of the relay's own cache (its disk), not of upstream: not retried, and it sends
/// blobs around the cache for a while.
#[derive(Debug)]
struct CacheDisk(String);

impl std::fmt::Display for CacheDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the relay's cache: {}", self.0)
    }
}

impl std::error::Error for CacheDisk {}

fn cache_disk(what: &str, path: &Path, e: io::Error) -> anyhow::Error {
    anyhow::Error::new(CacheDisk(format!("{what} {}: {e}", path.display())))
}

impl Relay {
    pub fn open(dir: &Path) -> Result<Relay> {
        let config = RelayConfig::load(dir)?;
        let uri: hyper::Uri = config
            .upstream
            .parse()
            .with_context(|| format!("{}: upstream {:?}", CONFIG, config.upstream))?;
        anyhow::ensure!(
            uri.scheme_str() == Some("https"),
            "{}: upstream {:?} is not an https:// URL",
            dir.join(CONFIG).display(),
            config.upstream
        );
        let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
        let port = uri.port_u16().unwrap_or(443);
        let server_name = ServerName::try_from(host.to_string())
            .with_context(|| format!("upstream host {host:?}"))?;
        let provider = crate::server::provider();
        let files =
            crate::certfiles::CertFiles::open(&dir.join(CERT), &dir.join(KEY), provider.clone())?;
        let trust = crate::trust::Trust::open(&dir.join(crate::pki::CA_CERT), provider.clone())?;
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(trust.clone())
            .with_client_cert_resolver(files.clone());
        // A resumed TLS session carries the client certificate of the session it resumes:
        // after a renewal the relay would go on presenting the replaced one. Each request to
        // upstream is a new connection with a full handshake (1 RTT, as a resumption).
        tls.resumption = rustls::client::Resumption::disabled();
        std::fs::create_dir_all(dir.join(CACHE))?;
        Ok(Relay {
            dir: dir.to_path_buf(),
            host: host.to_string(),
            port,
            server_name,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            files,
            trust,
            config,
            fills: Mutex::new(HashMap::new()),
            metrics: Metrics::default(),
            bytes_from_upstream: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            not_cached: AtomicU64::new(0),
            cache_broken: Mutex::new(None),
        })
    }

    /// `HOST:PORT` of upstream, an IPv6 address in brackets.
    fn authority(&self) -> String {
        match self.host.contains(':') {
            true => format!("[{}]:{}", self.host, self.port),
            false => format!("{}:{}", self.host, self.port),
        }
    }

    /// One request to upstream, on its own connection, for `who` (`None`: for the relay
    /// itself).
    async fn upstream(
        &self,
        who: Option<&Forwarded>,
        method: Method,
        path_and_query: &str,
        headers: &[(header::HeaderName, String)],
        body: Bytes,
    ) -> Result<Response<Incoming>, ApiError> {
        let bad = |what: &str, e: &dyn std::fmt::Display| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!(
                    "relay {:?}: {what} upstream stager {}: {e}",
                    self.config.name, self.config.upstream
                ),
            )
        };
        let connect = async {
            let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| bad("connecting to", &e))?;
            let _ = tcp.set_nodelay(true);
            self.tls
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| bad("TLS with", &e))
        };
        let tls = tokio::time::timeout(UPSTREAM_CONNECT, connect)
            .await
            .map_err(|_| bad("timed out connecting to", &"10 s"))??;
        let (mut send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| bad("HTTP with", &e))?;
        tokio::spawn(connection);
        let mut req = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(header::HOST, self.authority());
        if let Some(who) = who {
            req = req
                .header(crate::api::RELAYED_FOR, &who.agent)
                .header(crate::api::RELAYED_ADDR, &who.addr);
            if !who.via.is_empty() {
                req = req.header(crate::api::RELAYED_VIA, who.via.join(","));
                req = req.header(crate::api::RELAYED_VIA_CERTS, who.via_certs.join(","));
            }
            if let Some(c) = &who.cert {
                req = req.header(crate::api::RELAYED_CERT, c);
            }
        }
        for (n, v) in headers {
            req = req.header(n, v);
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| bad("building a request for", &e))?;
        tokio::time::timeout(UPSTREAM_ANSWER, send.send_request(req))
            .await
            .map_err(|_| bad("no answer in 330 s from", &"timeout"))?
            .map_err(|e| bad("request to", &e))
    }

    async fn handle_request(
        self: Arc<Self>,
        conn: Arc<Conn>,
        req: Request<Incoming>,
    ) -> Result<Response<ResBody>, ApiError> {
        let (parts, body) = req.into_parts();
        let body = if parts.method == Method::POST {
            http::read_body(body, REQUEST).await?
        } else {
            Bytes::new()
        };
        let path = parts.uri.path().to_string();
        if path == "/healthz" && parts.method == Method::GET {
            return Ok(http::json(
                StatusCode::OK,
                &serde_json::json!({
                    "ok": true,
                    "relay": self.config.name,
                    "bytes_from_upstream": self.bytes_from_upstream.load(Ordering::Relaxed),
                    "bytes_served": self.metrics.bytes_served.load(Ordering::Relaxed),
                    "cache_bytes": self.cache_bytes(),
                    "cache_evicted": self.evicted.load(Ordering::Relaxed),
                    "not_cached": self.not_cached.load(Ordering::Relaxed),
                    "cache_broken": self.cache_broken().map(|(_, m)| m),
                    "certificate": self.files.fingerprint(),
                }),
            ));
        }
        let Some(who) = Forwarded::of(&conn, &parts.headers)? else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "a client certificate is required",
            ));
        };
        let who = Arc::new(who);
        if path == "/metrics" && parts.method == Method::GET {
            // The relay's own counters, to any certificate of the fleet (no host's data).
            return Ok(http::full(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.render_metrics(),
            ));
        }
        let blob = path
            .strip_prefix("/v1/blobs/")
            .filter(|_| parts.method == Method::GET || parts.method == Method::HEAD)
            .map(str::to_string);
        if let Some(sha) = blob {
            return self.blob(&who, &parts, &sha).await;
        }
        let pq = parts
            .uri
            .path_and_query()
            .map_or(path.as_str(), |p| p.as_str())
            .to_string();
        let mut fwd = Vec::new();
        // The agent's User-Agent names its build, which the stager records.
        for n in [header::CONTENT_TYPE, header::ACCEPT, header::USER_AGENT] {
            if let Some(v) = parts.headers.get(&n).and_then(|v| v.to_str().ok()) {
                fwd.push((n, v.to_string()));
            }
        }
        let resp = self
            .upstream(Some(&who), parts.method.clone(), &pq, &fwd, body)
            .await?;
        Ok(passed_on(resp))
    }

    /// A blob: may this agent read it (upstream decides), then from the cache.
    async fn blob(
        self: &Arc<Self>,
        who: &Arc<Forwarded>,
        parts: &hyper::http::request::Parts,
        sha: &str,
    ) -> Result<Response<ResBody>, ApiError> {
        if sha.len() != 64 || !sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(ApiError::bad_request(format!(
                "{sha:?} is not a SHA-256 (64 lower-case hex digits)"
            )));
        }
        let probe = self
            .upstream(
                Some(who),
                Method::GET,
                &format!("/v1/blobs/{sha}"),
                &[(header::RANGE, "bytes=0-0".to_string())],
                Bytes::new(),
            )
            .await?;
        if !probe.status().is_success() {
            return Ok(passed_on(probe));
        }
        let len = blob_len(&probe).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("upstream gave blob {sha} without its length"),
            )
        })?;
        drop(probe);
        let done = self.dir.join(CACHE).join(sha);
        if done.exists() {
            // Its last use, which decides what goes first when room is needed.
            if let Ok(f) = std::fs::File::open(&done) {
                let _ = f.set_modified(std::time::SystemTime::now());
            }
            return http::serve_file(parts, &done, sha, self.metrics.bytes_served.clone()).await;
        }
        if self.cache_broken().is_none() {
            let progress = self.fill(who, sha, len);
            let failed = matches!(*progress.borrow(), Filled::Failed(_));
            if !failed {
                return self.serve_filling(parts, sha, len, progress);
            }
        }
        // The cache cannot take it: the blob as upstream sends it, `Range` and all.
        let mut fwd = Vec::new();
        for n in [header::RANGE, header::IF_RANGE] {
            if let Some(v) = parts.headers.get(&n).and_then(|v| v.to_str().ok()) {
                fwd.push((n, v.to_string()));
            }
        }
        let resp = self
            .upstream(
                Some(who),
                parts.method.clone(),
                &format!("/v1/blobs/{sha}"),
                &fwd,
                Bytes::new(),
            )
            .await?;
        Ok(passed_on(resp))
    }

    /// Asks upstream whether this relay's certificate is due for renewal (`GET
    /// /v1/relay/identity`); if it is, makes a new key, has the stager certify its public
    /// half (the private key never leaves the relay) and replaces relay.key and relay.pem,
    /// which both ends present from their next handshake on. Any failure leaves both files
    /// as they were. Returns the new certificate's SHA-256 and end, if it renewed.
    async fn renew_if_due(&self) -> Result<Option<(String, String)>> {
        async fn answer<T: serde::de::DeserializeOwned>(resp: Response<Incoming>) -> Result<T> {
            let status = resp.status();
            let body = http::read_body(resp.into_body(), REQUEST)
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            anyhow::ensure!(
                status.is_success(),
                "{status}: {}",
                String::from_utf8_lossy(&body).trim()
            );
            serde_json::from_slice(&body).context("reading upstream's answer")
        }
        let up = |e: ApiError| anyhow::anyhow!("{}", e.message);
        let path = "/v1/relay/identity";
        // Says which CAs it trusts (upstream records it for `stager ca status`) and is given
        // others when the stager's CA is being replaced; once taken, says so at once.
        let mut held = self.trust.current().sha256;
        let due = loop {
            let due: proto::v1::RelayIdentity = answer(
                self.upstream(
                    None,
                    Method::GET,
                    &format!("{path}?trust={held}"),
                    &[],
                    Bytes::new(),
                )
                .await
                .map_err(up)?,
            )
            .await?;
            let Some(given) = &due.trust else { break due };
            match self.take_trust(given, due.trust_signature.as_deref()) {
                Ok(n) => println!(
                    "relay {}: trusts {n} CA certificate(s) from now on, as upstream says (ca.pem replaced, the old one kept as ca.pem.old)",
                    self.config.name
                ),
                Err(e) => {
                    eprintln!(
                        "relay {}: keeps the CA certificates it trusts: {e:#}",
                        self.config.name
                    );
                    break due;
                }
            }
            held = bundle::release::trust_sha256(given);
        };
        if !due.renew {
            return Ok(None);
        }
        let key = rcgen::KeyPair::generate()?;
        let ask = serde_json::to_vec(&proto::v1::RenewIdentity {
            public_key: key.public_key_pem(),
        })?;
        let json = [(header::CONTENT_TYPE, "application/json".to_string())];
        let renewed: proto::v1::RenewedIdentity = answer(
            self.upstream(None, Method::POST, path, &json, ask.into())
                .await
                .map_err(up)?,
        )
        .await?;
        let key_pem = key.serialize_pem();
        let fingerprint = crate::certfiles::check_pair(&renewed.cert, &key_pem)
            .context("the certificate upstream sent")?;
        crate::certfiles::replace_pair(
            &self.dir.join(CERT),
            &self.dir.join(KEY),
            &renewed.cert,
            &key_pem,
        )?;
        Ok(Some((fingerprint, renewed.not_after)))
    }

    /// Replaces `ca.pem` with the bundle upstream gave (the stager's CA is being replaced),
    /// if it is one and keeps a CA trusted now. The server and client sides of the relay
    /// trust it from their next handshake. Returns how many CAs it holds.
    fn take_trust(&self, given: &str, signature: Option<&str>) -> Result<usize> {
        let public = self.dir.join(RELEASE_PUB);
        if public.exists() {
            bundle::release::ReleasePublicKey::load(&public)?.verify(
                given.as_bytes(),
                signature.context("upstream's CA certificates are not signed")?,
                Path::new("upstream's CA certificates"),
            )?;
        } else {
            eprintln!(
                "relay {}: no {} to check upstream's CA certificates with (copy the stager's in); taken on upstream's word",
                self.config.name,
                public.display()
            );
        }
        let path = self.dir.join(crate::pki::CA_CERT);
        let held = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let n = crate::trust::roots_of(given)
            .context("upstream's CA certificates")?
            .len();
        anyhow::ensure!(
            bundle::release::keeps_a_ca(&held, given),
            "upstream's CA certificates keep none of those trusted now"
        );
        crate::certfiles::replace_file(&path, given, 0o644)?;
        Ok(n)
    }

    /// Renews this relay's certificate when it is due, checking at start and then hourly.
    async fn keep_certificate(self: Arc<Self>) {
        loop {
            let next = match self.renew_if_due().await {
                Ok(None) => RENEW_CHECK,
                Ok(Some((fp, end))) => {
                    println!(
                        "relay {}: renewed its certificate (now sha256 {fp}, valid until {end})",
                        self.config.name
                    );
                    RENEW_CHECK
                }
                Err(e) => {
                    eprintln!(
                        "warning: relay {}: renewing its certificate: {e:#}; the one in use stays, trying again in {} min",
                        self.config.name,
                        RENEW_RETRY.as_secs() / 60
                    );
                    RENEW_RETRY
                }
            };
            tokio::time::sleep(next).await;
        }
    }

    /// `/metrics`: Prometheus text.
    fn render_metrics(&self) -> String {
        use crate::metrics::{counter, gauge};
        let mut s = String::new();
        crate::metrics::served(&mut s, "relay", &self.metrics);
        counter(
            &mut s,
            "relay_bytes_from_upstream_total",
            "Blob bytes fetched from the upstream stager into the cache.",
            self.bytes_from_upstream.load(Ordering::Relaxed),
        );
        let fills = self.fills.lock().unwrap_or_else(|p| p.into_inner()).len();
        gauge(
            &mut s,
            "relay_fills",
            "Blobs being fetched from upstream now.",
            fills as u64,
        );
        gauge(
            &mut s,
            "relay_cache_bytes",
            "Bytes in the blob cache, downloads under way included.",
            self.cache_bytes().unwrap_or(0),
        );
        counter(
            &mut s,
            "relay_cache_evicted_total",
            "Blobs deleted from the cache to make room (least recently served first).",
            self.evicted.load(Ordering::Relaxed),
        );
        counter(
            &mut s,
            "relay_not_cached_total",
            "Blob requests passed through uncached because the blob could not fit the cache's limits.",
            self.not_cached.load(Ordering::Relaxed),
        );
        gauge(
            &mut s,
            "relay_cache_broken",
            "1 while blobs bypass a cache that failed on the relay's side (disk full, read-only).",
            u64::from(self.cache_broken().is_some()),
        );
        s
    }

    /// The cache's trouble, if it had some less than [`PASS_THROUGH_FOR`] ago.
    fn cache_broken(&self) -> Option<(Instant, String)> {
        self.cache_broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|(at, _)| at.elapsed() < PASS_THROUGH_FOR)
    }

    fn cache_failed(&self, why: &str) {
        eprintln!(
            "relay: {why}; passing blobs through from upstream, uncached, for the next {} min",
            PASS_THROUGH_FOR.as_secs() / 60
        );
        *self.cache_broken.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), why.to_string()));
    }

    /// Serves blob `sha` from the cache file being filled (or filled since).
    fn serve_filling(
        &self,
        parts: &hyper::http::request::Parts,
        sha: &str,
        len: u64,
        progress: watch::Receiver<Filled>,
    ) -> Result<Response<ResBody>, ApiError> {
        let done = self.dir.join(CACHE).join(sha);
        let head = BlobHead::of(parts, len, sha)?;
        let (tx, rx) = mpsc::channel(4);
        let counter = self.metrics.bytes_served.clone();
        let part = self.dir.join(CACHE).join(format!("{sha}.part"));
        tokio::spawn(follow(
            part, done, head.start, head.count, progress, tx, counter,
        ));
        let left = head.count;
        Ok(head.respond(parts, ChannelBody { rx, left }.boxed()))
    }

    /// The download of blob `sha` into the cache: the one under way, or a new one (for
    /// `who`, whose right to read it upstream has just confirmed).
    fn fill(
        self: &Arc<Self>,
        who: &Arc<Forwarded>,
        sha: &str,
        len: u64,
    ) -> watch::Receiver<Filled> {
        let mut fills = self.fills.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((rx, _)) = fills.get(sha) {
            if !matches!(*rx.borrow(), Filled::Failed(_)) {
                return rx.clone();
            }
        }
        let (tx, rx) = watch::channel(Filled::Running(0));
        // Finished since the caller looked (its download just ended): nothing to fetch.
        if self.dir.join(CACHE).join(sha).exists() {
            let _ = tx.send(Filled::Done);
            return rx;
        }
        let part = self.dir.join(CACHE).join(format!("{sha}.part"));
        match self.make_room(sha, len, &running(&fills)) {
            Ok(()) => {}
            Err(e) if e.is::<CacheDisk>() => {
                let why = format!("{e:#}");
                self.cache_failed(&why);
                let _ = tx.send(Filled::Failed(why));
                return rx;
            }
            Err(e) => {
                self.not_cached.fetch_add(1, Ordering::Relaxed);
                println!("relay: blob {sha} passes through uncached: {e:#}");
                let _ = tx.send(Filled::Failed(format!("{e:#}")));
                return rx;
            }
        }
        // Created before anyone reads it. What an earlier download left (a relay stopped, or
        // upstream gone too long) is kept: the download goes on from its end.
        let opened = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&part);
        if let Err(e) = opened {
            let why = format!("{:#}", cache_disk("creating", &part, e));
            self.cache_failed(&why);
            let _ = tx.send(Filled::Failed(why));
            return rx;
        }
        fills.insert(sha.to_string(), (rx.clone(), len));
        let (relay, who, sha) = (self.clone(), who.clone(), sha.to_string());
        tokio::spawn(async move {
            let t = Instant::now();
            let end = match relay.download(&who, &sha, len, &part, &tx).await {
                Ok(()) => {
                    println!(
                        "relay: cached blob {sha} ({len} bytes) from upstream in {:.1} s",
                        t.elapsed().as_secs_f64()
                    );
                    Filled::Done
                }
                Err(e) => {
                    eprintln!("relay: blob {sha}: {e:#}");
                    if e.is::<CacheDisk>() {
                        // The space it holds is what the disk lacks.
                        let _ = std::fs::remove_file(&part);
                        relay.cache_failed(&format!("{e:#}"));
                    }
                    Filled::Failed(format!("{e:#}"))
                }
            };
            let _ = tx.send(end);
            relay
                .fills
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&sha);
        });
        rx
    }

    async fn download(
        &self,
        who: &Forwarded,
        sha: &str,
        len: u64,
        part: &Path,
        tx: &watch::Sender<Filled>,
    ) -> Result<()> {
        let mut file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(part)
            .await
            .map_err(|e| cache_disk("opening", part, e))?;
        let mut hash = Sha256::new();
        let mut have = self
            .resume(&mut file, part, len, &mut hash)
            .await
            .map_err(|e| cache_disk("reading", part, e))?;
        if have > 0 {
            println!(
                "relay: blob {sha}: going on from byte {have}, where an earlier download stopped"
            );
            tx.send_replace(Filled::Running(have.min(len.saturating_sub(1))));
        }
        let mut failures = 0u32;
        let (mut said, mut said_at) = (Instant::now(), have);
        while have < len {
            let range = [(header::RANGE, format!("bytes={have}-"))];
            let got = async {
                let resp = self
                    .upstream(
                        Some(who),
                        Method::GET,
                        &format!("/v1/blobs/{sha}"),
                        if have > 0 { &range } else { &[] },
                        Bytes::new(),
                    )
                    .await
                    .map_err(|e| anyhow::anyhow!("{}", e.message))?;
                let want = if have > 0 {
                    StatusCode::PARTIAL_CONTENT
                } else {
                    StatusCode::OK
                };
                anyhow::ensure!(
                    resp.status() == want,
                    "upstream answered {} for bytes {have}-",
                    resp.status()
                );
                let mut body = resp.into_body();
                // An upstream gone silent (a partition: no FIN, no RST) must not hold the
                // fill, and every agent waiting on it, for good.
                let stall = Duration::from_secs(self.config.upstream_stall_secs);
                while let Some(frame) =
                    tokio::time::timeout(stall, body.frame())
                        .await
                        .map_err(|_| {
                            anyhow::anyhow!("upstream sent nothing for {} s", stall.as_secs())
                        })?
                {
                    let Ok(data) = frame?.into_data() else {
                        continue;
                    };
                    anyhow::ensure!(
                        have + data.len() as u64 <= len,
                        "upstream sent more than the blob's {len} bytes"
                    );
                    // tokio's write returns once the data is handed to its blocking task;
                    // flush waits until it is in the file, where readers look.
                    let wrote = async {
                        file.write_all(&data).await?;
                        file.flush().await
                    };
                    wrote.await.map_err(|e| cache_disk("writing", part, e))?;
                    hash.update(&data);
                    have += data.len() as u64;
                    self.bytes_from_upstream
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    // The last byte waits for the hash: a blob that turns out wrong reaches
                    // its readers cut short, not whole.
                    tx.send_replace(Filled::Running(have.min(len.saturating_sub(1))));
                    failures = 0;
                    if said.elapsed() > Duration::from_secs(5) {
                        let rate = (have - said_at) as f64 / said.elapsed().as_secs_f64();
                        said = Instant::now();
                        said_at = have;
                        println!(
                            "relay: filling blob {sha}: {} of {} MiB, {:.1} MiB/s",
                            have >> 20,
                            len >> 20,
                            rate / f64::from(1 << 20)
                        );
                    }
                }
                Ok(())
            }
            .await;
            if let Err(e) = got {
                if e.is::<CacheDisk>() {
                    return Err(e);
                }
                failures += 1;
                if failures >= FILL_ATTEMPTS {
                    return Err(e.context(format!("gave up after {FILL_ATTEMPTS} attempts")));
                }
                eprintln!("relay: blob {sha} at byte {have}: {e:#}; resuming");
                tokio::time::sleep(Duration::from_millis(500 << failures.min(5))).await;
            }
        }
        file.sync_all()
            .await
            .map_err(|e| cache_disk("flushing", part, e))?;
        let got = bundle::pipe::hex(&hash.finalize());
        if got != sha {
            let _ = tokio::fs::remove_file(part).await;
            anyhow::bail!("arrived with SHA-256 {got}; deleted, the next request fetches it again");
        }
        let done = self.dir.join(CACHE).join(sha);
        tokio::fs::rename(part, &done)
            .await
            .map_err(|e| cache_disk("renaming to", &done, e))?;
        Ok(())
    }
}

impl Relay {
    /// Bytes in the cache now, or `None` if it cannot be read.
    fn cache_bytes(&self) -> Option<u64> {
        let running = running(&self.fills.lock().unwrap_or_else(|p| p.into_inner()));
        cache::scan(&self.dir.join(CACHE), &running)
            .ok()
            .map(|s| s.bytes())
    }

    /// Deletes the least recently served blobs until blob `sha` (`len` bytes) fits the
    /// cache's limits next to the downloads in `running` (blob → length). A [`CacheDisk`]
    /// error if the cache cannot be read; another error, deleting nothing, if the blob
    /// cannot fit at all.
    fn make_room(&self, sha: &str, len: u64, running: &HashMap<String, u64>) -> Result<()> {
        let dir = self.dir.join(CACHE);
        let disk_err = |e| anyhow::Error::new(CacheDisk(format!("reading {}: {e}", dir.display())));
        // This blob's `.part` (what an earlier download left) stays too.
        let mut keep = running.clone();
        keep.insert(sha.to_string(), len);
        let scan = cache::scan(&dir, &keep).map_err(disk_err)?;
        let disk = cache::disk(&dir).map_err(disk_err)?;
        // Still to be written: the rest of each download under way, and of this one.
        let need = scan.to_come(&HashMap::from([(sha.to_string(), len)]));
        let pending = scan.to_come(&keep) - need;
        let gone = cache::make_room(&scan, pending, need, disk, self.config.cache_limits())
            .map_err(|why| anyhow::anyhow!(why))?;
        for i in gone {
            let e = &scan.entries[i];
            match std::fs::remove_file(&e.path) {
                Ok(()) => {
                    self.evicted.fetch_add(1, Ordering::Relaxed);
                    let ago = e.used.elapsed().unwrap_or_default().as_secs();
                    println!(
                        "relay: deleted {} ({} MiB, last served {ago} s ago) to make room for blob {sha}",
                        e.path.display(),
                        e.bytes >> 20
                    );
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(cache_disk("deleting", &e.path, err)),
            }
        }
        Ok(())
    }

    /// The bytes an earlier download left in `part`, hashed into `hash`; the file positioned
    /// after them. More than the blob's length: not this blob's, emptied.
    async fn resume(
        &self,
        file: &mut tokio::fs::File,
        part: &Path,
        len: u64,
        hash: &mut Sha256,
    ) -> io::Result<u64> {
        let mut have = file.metadata().await?.len();
        if have > len {
            eprintln!(
                "relay: {} is longer than its blob; starting over",
                part.display()
            );
            file.set_len(0).await?;
            have = 0;
        }
        let mut buf = vec![0u8; 1 << 20];
        let mut left = have;
        while left > 0 {
            let n = file.read(&mut buf[..left.min(1 << 20) as usize]).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "shrank while read",
                ));
            }
            hash.update(&buf[..n]);
            left -= n as u64;
        }
        file.seek(io::SeekFrom::Start(have)).await?;
        Ok(have)
    }
}

impl Served for Relay {
    fn metrics(&self) -> &Metrics {
        &self.metrics
    }
    fn limits(&self) -> (usize, Duration, Duration) {
        (self.config.max_connections, HANDSHAKE, REQUEST)
    }
    fn handle(
        self: Arc<Self>,
        conn: Arc<Conn>,
        req: Request<Incoming>,
    ) -> Pin<Box<dyn Future<Output = Response<ResBody>> + Send>> {
        Box::pin(async move {
            match self.handle_request(conn, req).await {
                Ok(r) => r,
                Err(e) => http::error(&e),
            }
        })
    }
}

/// The downloads under way in `fills`: blob → length.
fn running(fills: &HashMap<String, (watch::Receiver<Filled>, u64)>) -> HashMap<String, u64> {
    fills
        .iter()
        .filter(|(_, (rx, _))| !matches!(*rx.borrow(), Filled::Failed(_)))
        .map(|(s, (_, len))| (s.clone(), *len))
        .collect()
}

/// Whom a request is forwarded for ([`crate::api::RELAYED_FOR`]): the agent's certificate
/// fingerprint and address, and the relays below this one that the request came through
/// (agent's own relay first). The upstream stager checks all of it; the relay only says it.
#[derive(Debug, PartialEq)]
struct Forwarded {
    agent: String,
    addr: String,
    via: Vec<String>,
    /// The certificates of `via`, base64 DER, one for each (empty where a relay below did
    /// not pass it on): [`crate::api::RELAYED_VIA_CERTS`].
    via_certs: Vec<String>,
    /// The agent's certificate, base64 DER ([`crate::api::RELAYED_CERT`]).
    cert: Option<String>,
}

impl Forwarded {
    /// For the client `conn`: itself (an agent), or, if it forwards an agent's request (it
    /// sent [`crate::api::RELAYED_FOR`]: a relay below this one), that agent, with the
    /// client added to the relays it came through. `None` without a client certificate.
    fn of(conn: &Conn, headers: &hyper::HeaderMap) -> Result<Option<Forwarded>, ApiError> {
        let Some(fp) = conn.fingerprint.clone() else {
            return Ok(None);
        };
        let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
        use base64::Engine;
        let own_cert = || {
            conn.cert
                .as_ref()
                .map(|c| base64::engine::general_purpose::STANDARD.encode(c))
        };
        let Some(agent) = header(crate::api::RELAYED_FOR) else {
            return Ok(Some(Forwarded {
                agent: fp,
                addr: conn.addr.clone(),
                via: Vec::new(),
                via_certs: Vec::new(),
                cert: own_cert(),
            }));
        };
        let list = |n: &str| -> Vec<String> {
            crate::api::relayed_list(headers, n)
                .into_iter()
                .map(str::to_string)
                .collect()
        };
        let mut via = list(crate::api::RELAYED_VIA);
        let mut via_certs = list(crate::api::RELAYED_VIA_CERTS);
        via_certs.resize(via.len(), String::new());
        via.push(fp);
        via_certs.push(own_cert().unwrap_or_default());
        if via.len() >= crate::api::MAX_RELAYS {
            return Err(ApiError::new(
                StatusCode::LOOP_DETECTED,
                format!(
                    "this request came through {} relays already (at most {}): does a relay's upstream lead back to itself?",
                    via.len(),
                    crate::api::MAX_RELAYS
                ),
            ));
        }
        Ok(Some(Forwarded {
            agent: agent.to_string(),
            addr: header(crate::api::RELAYED_ADDR)
                .map_or_else(|| conn.addr.clone(), str::to_string),
            via,
            via_certs,
            cert: header(crate::api::RELAYED_CERT).map(str::to_string),
        }))
    }
}

/// Upstream's answer, passed on: status, the headers a client reads, the body streamed.
fn passed_on(resp: Response<Incoming>) -> Response<ResBody> {
    let (parts, body) = resp.into_parts();
    let mut b = Response::builder().status(parts.status);
    for n in [
        header::CONTENT_TYPE,
        header::CONTENT_LENGTH,
        header::CACHE_CONTROL,
        header::ETAG,
        header::CONTENT_RANGE,
        header::ACCEPT_RANGES,
    ] {
        if let Some(v) = parts.headers.get(&n) {
            b = b.header(n, v);
        }
    }
    b.body(body.map_err(io::Error::other).boxed())
        .expect("valid response")
}

/// The blob's length from the answer to `Range: bytes=0-0` (`Content-Range: bytes 0-0/LEN`),
/// or from `Content-Length` if upstream sent it whole.
fn blob_len(resp: &Response<Incoming>) -> Option<u64> {
    let h = |n| resp.headers().get(n).and_then(|v| v.to_str().ok());
    match resp.status() {
        StatusCode::PARTIAL_CONTENT => h(header::CONTENT_RANGE)?.rsplit('/').next()?.parse().ok(),
        _ => h(header::CONTENT_LENGTH)?.parse().ok(),
    }
}

/// Sends `count` bytes from `start` of a blob being filled (or filled since), waiting for
/// the download as it catches up; stops with an error if the download fails.
async fn follow(
    part: PathBuf,
    done: PathBuf,
    start: u64,
    count: u64,
    mut progress: watch::Receiver<Filled>,
    tx: mpsc::Sender<io::Result<Bytes>>,
    counter: Arc<AtomicU64>,
) {
    let fail = |m: String| io::Error::other(m);
    // Open before the rename (an open file survives it); after it, the finished file.
    let file = match tokio::fs::File::open(&part).await {
        Ok(f) => Ok(f),
        Err(_) => tokio::fs::File::open(&done).await,
    };
    let mut file = match file {
        Ok(f) => f,
        Err(e) => {
            let _ = tx
                .send(Err(fail(format!("opening the cached blob: {e}"))))
                .await;
            return;
        }
    };
    if let Err(e) = file.seek(io::SeekFrom::Start(start)).await {
        let _ = tx.send(Err(e)).await;
        return;
    }
    let (mut pos, end) = (start, start + count);
    while pos < end {
        let now = progress.borrow_and_update().clone();
        let avail = match now {
            Filled::Running(n) => n,
            Filled::Done => end,
            Filled::Failed(m) => {
                let _ = tx
                    .send(Err(fail(format!("relay's download failed: {m}"))))
                    .await;
                return;
            }
        };
        if avail <= pos {
            let gone = progress.changed().await.is_err();
            if gone && !matches!(*progress.borrow(), Filled::Done) {
                let _ = tx
                    .send(Err(fail("relay's download stopped".to_string())))
                    .await;
                return;
            }
            continue;
        }
        let n = (avail.min(end) - pos).min(256 * 1024) as usize;
        let mut buf = vec![0u8; n];
        if let Err(e) = file.read_exact(&mut buf).await {
            let _ = tx.send(Err(e)).await;
            return;
        }
        pos += n as u64;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        if tx.send(Ok(Bytes::from(buf))).await.is_err() {
            return; // the agent went away
        }
    }
}

/// A response body fed by a task through a channel.
struct ChannelBody {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    left: u64,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "relay stopped sending the blob",
            )))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(b))) => {
                self.left = self.left.saturating_sub(b.len() as u64);
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}

/// `stager relay serve`: serves the site's agents until stopped.
pub async fn serve(dir: &Path, listen: Option<String>) -> Result<()> {
    crate::server::raise_fd_limit();
    let relay = Arc::new(Relay::open(dir)?);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(crate::server::server_tls(
        relay.trust.clone(),
        relay.files.clone(),
    )?));
    let addr = listen.unwrap_or_else(|| relay.config.listen.clone());
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    let cap = relay
        .config
        .cache_max_mib
        .map_or("no cap".to_string(), |m| format!("at most {m} MiB"));
    println!(
        "relay {}: listening on https://{}; upstream {}; cache {} MiB, {cap}, keeping {}% of its disk free",
        relay.config.name,
        listener.local_addr()?,
        relay.config.upstream,
        relay.cache_bytes().unwrap_or(0) >> 20,
        relay.config.cache_keep_free_percent
    );
    crate::pki::warn_if_ending(
        &dir.join(CERT),
        "the site's agents cannot reach it, nor it the stager, after that",
        "it renews itself from a third of the stager's relay_cert_days before its end (see the warnings above or below); \
         else reissue it on the stager: stager relay init --name SAME --out NEWDIR, and copy relay.pem and relay.key here",
    );
    tokio::spawn(relay.clone().keep_certificate());
    crate::server::accept_loop(relay, listener, acceptor).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// relay.toml as `relay init` writes it reads back with the cache's defaults; limits
    /// that cannot work are refused naming the file and the key.
    #[test]
    fn relay_toml_round_trips_and_refuses_cache_limits_that_cannot_work() {
        let d = tempfile::tempdir().unwrap();
        let c = RelayConfig::new(
            "pop-a".into(),
            "0.0.0.0:8443".into(),
            "https://s:8443".into(),
        );
        c.save(d.path()).unwrap();
        let text = std::fs::read_to_string(d.path().join(CONFIG)).unwrap();
        assert!(text.contains("# cache_max_mib = "), "{text}");
        let back = RelayConfig::load(d.path()).unwrap();
        assert_eq!(
            back.cache_limits(),
            cache::Limits {
                max_bytes: None,
                keep_free_percent: 10
            }
        );
        for (line, want) in [
            ("cache_max_mib = 0", "cache_max_mib = 0 would cache nothing"),
            (
                "cache_keep_free_percent = 95",
                "cache_keep_free_percent = 95",
            ),
        ] {
            std::fs::write(d.path().join(CONFIG), format!("{text}{line}\n")).unwrap();
            let e = format!("{:#}", RelayConfig::load(d.path()).unwrap_err());
            assert!(e.contains(want) && e.contains(CONFIG), "{e}");
        }
        std::fs::write(d.path().join(CONFIG), format!("{text}cache_max_mib = 3\n")).unwrap();
        assert_eq!(
            RelayConfig::load(d.path())
                .unwrap()
                .cache_limits()
                .max_bytes,
            Some(3 << 20)
        );
    }
}
