//! `stager serve`: TLS 1.3 with a client certificate required, HTTP/1.1 and HTTP/2 (ALPN), one
//! task per connection, bounded by a connection cap and timeouts so that slow or idle clients
//! cannot exhaust it.

use crate::config::Config;
use crate::db::Db;
use crate::http::ApiError;
use crate::store::Store;
use anyhow::{Context, Result};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};

pub struct State {
    pub dir: PathBuf,
    pub config: Config,
    pub db: Arc<Db>,
    pub store: Store,
    waiters: Mutex<HashMap<String, Arc<Notify>>>,
    pub metrics: crate::metrics::Metrics,
    /// The CAs trusted (`ca.pem`): the TLS layer's check of client certificates (and of one
    /// a relay passed on), and the bundle agents are given.
    pub trust: Arc<crate::trust::Trust>,
}

/// What is known about a connection once its TLS handshake is done.
pub struct Conn {
    /// SHA-256 of the verified client certificate.
    pub fingerprint: Option<String>,
    /// That certificate (DER).
    pub cert: Option<Vec<u8>>,
    /// The peer's IP address as the stager sees it.
    pub addr: String,
}

impl State {
    pub fn open(dir: &Path) -> Result<State> {
        let config = Config::load(dir)?;
        let mut db = Db::open(&dir.join(crate::db::FILE))?;
        db.silent_after_ms = config.silent_after_secs.saturating_mul(1000) as i64;
        db.max_in_flight = config.max_in_flight.map(|n| n.get() as i64);
        db.max_in_flight_per_site = config.max_in_flight_per_site.map(|n| n.get() as i64);
        Ok(State {
            dir: dir.to_path_buf(),
            config,
            db: Arc::new(db),
            store: Store::open(dir)?,
            waiters: Mutex::new(HashMap::new()),
            metrics: Default::default(),
            trust: crate::trust::Trust::open(&dir.join(crate::pki::CA_CERT), provider())?,
        })
    }

    /// Runs a database call off the async threads (a commit waits for fsync).
    pub async fn db<T, E>(
        self: &Arc<Self>,
        f: impl FnOnce(&Db) -> Result<T, E> + Send + 'static,
    ) -> Result<T, ApiError>
    where
        T: Send + 'static,
        E: Into<ApiError> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db).map_err(Into::into))
            .await
            .map_err(ApiError::internal)?
    }

    pub fn notifier(&self, host: &str) -> Arc<Notify> {
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(host.to_string())
            .or_default()
            .clone()
    }

    pub fn body_timeout(&self) -> Duration {
        Duration::from_secs(self.config.request_timeout_secs)
    }

    /// Wakes the long polls of `host`.
    pub fn wake(&self, host: &str) {
        self.notifier(host).notify_waiters();
    }
}

/// The stager's server TLS configuration, from its home, trusting `trust`.
pub fn tls_config(dir: &Path, trust: Arc<crate::trust::Trust>) -> Result<rustls::ServerConfig> {
    let files = crate::certfiles::CertFiles::open(
        &dir.join(crate::pki::SERVER_CERT),
        &dir.join(crate::pki::SERVER_KEY),
        provider(),
    )?;
    server_tls(trust, files)
}

/// The one crypto back end (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.3, a client certificate from a CA of `trust` required, HTTP/2 and HTTP/1.1; the
/// server's certificate from `files`; both read again when their files change.
pub fn server_tls(
    trust: Arc<crate::trust::Trust>,
    files: Arc<crate::certfiles::CertFiles>,
) -> Result<rustls::ServerConfig> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(trust)
        .with_cert_resolver(files);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Thousands of agents long-poll at once: one descriptor each. Raise the soft limit to the
/// hard one (the default soft limit of 1024 would refuse the 1025th agent).
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// Serves until the process is stopped. Prints the address once it is listening.
pub async fn serve(dir: &Path, listen: Option<String>) -> Result<()> {
    raise_fd_limit();
    let state = Arc::new(State::open(dir)?);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config(dir, state.trust.clone())?));
    let addr = listen.unwrap_or_else(|| state.config.listen.clone());
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    // One line (scripts read the first): where, and the stager's own caps across jobs.
    let caps: String = [
        (state.config.max_in_flight, "in all"),
        (state.config.max_in_flight_per_site, "per site"),
    ]
    .iter()
    .filter_map(|(n, what)| {
        n.map(|n| format!("; at most {n} host(s) in flight {what} across jobs"))
    })
    .collect();
    println!(
        "stager: listening on https://{}{caps}",
        listener.local_addr()?
    );
    crate::pki::warn_if_ending(
        &dir.join(crate::pki::SERVER_CERT),
        "agents cannot reach this stager after that",
        "renew it: stager server-cert --renew (serve presents the new one within seconds)",
    );
    crate::pki::warn_if_ca_ending(dir);
    accept_loop(state, listener, acceptor).await
}

/// What the accept loop serves: the stager's API, or a site relay.
pub trait Served: Send + Sync + 'static {
    fn metrics(&self) -> &crate::metrics::Metrics;
    /// Most connections at once, the TLS handshake's timeout, a request header's timeout.
    fn limits(&self) -> (usize, Duration, Duration);
    fn handle(
        self: Arc<Self>,
        conn: Arc<Conn>,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Pin<Box<dyn Future<Output = hyper::Response<crate::http::ResBody>> + Send>>;
}

impl Served for State {
    fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }
    fn limits(&self) -> (usize, Duration, Duration) {
        (
            self.config.max_connections,
            Duration::from_secs(self.config.handshake_timeout_secs),
            Duration::from_secs(self.config.request_timeout_secs),
        )
    }
    fn handle(
        self: Arc<Self>,
        conn: Arc<Conn>,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Pin<Box<dyn Future<Output = hyper::Response<crate::http::ResBody>> + Send>> {
        Box::pin(crate::api::handle(self, conn, req))
    }
}

/// Accepts TLS connections for ever, one task each, at most `limits().0` at once; counts
/// connections, refused handshakes and requests by route in `metrics()`.
pub async fn accept_loop<S: Served>(
    state: Arc<S>,
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
) -> Result<()> {
    let (max_connections, handshake, request_timeout) = state.limits();
    let cap = Arc::new(Semaphore::new(max_connections));
    loop {
        let permit = cap.clone().acquire_owned().await.expect("semaphore open");
        let (tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                eprintln!("stager: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let state = state.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _permit = permit;
            state.metrics().connections.fetch_add(1, Ordering::Relaxed);
            let tls = match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => Some(s),
                _ => None,
            };
            if let Some(tls) = tls {
                let cert = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.to_vec());
                let conn = Arc::new(Conn {
                    fingerprint: cert.as_deref().map(crate::pki::fingerprint),
                    cert,
                    addr: peer.ip().to_string(),
                });
                let st = state.clone();
                let svc = hyper::service::service_fn(move |req| {
                    let (st, conn) = (st.clone(), conn.clone());
                    async move {
                        let route = crate::api::route_name(req.method(), req.uri().path());
                        let resp = st.clone().handle(conn, req).await;
                        st.metrics().request(&route, resp.status().as_u16());
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                b.http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(request_timeout);
                b.http2()
                    .timer(TokioTimer::new())
                    .max_concurrent_streams(64)
                    .keep_alive_interval(Some(Duration::from_secs(60)));
                let _ = b.serve_connection(TokioIo::new(tls), svc).await;
            } else {
                state
                    .metrics()
                    .handshakes_refused
                    .fetch_add(1, Ordering::Relaxed);
            }
            state.metrics().connections.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

pub fn counter() -> Arc<AtomicU64> {
    Arc::new(AtomicU64::new(0))
}
