//! The `/v1/` API: routing, authorization from the verified client certificate, handlers.
//!
//! Authorization rules (DESIGN.md §5): an agent certificate names one host and sees only that
//! host's unfinished job, that job's manifests, blobs and age identities; it cannot call
//! operator routes. An operator certificate can call operator routes and read manifests and
//! blobs, but never a bundle's age identity. A revoked certificate, or one this stager has no
//! record of, is refused on every route but `/healthz`.

use crate::db::Principal;
use crate::http::{self, ApiError, ResBody};
use crate::server::{Conn, State};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use proto::v1::{BundleRef, CreateJob, Event, RescueRequest, Work};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Longest long-poll an agent may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(300);

/// The route name used in metrics (path parameters elided).
pub fn route_name(method: &Method, path: &str) -> String {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let shape: Vec<&str> = segs
        .iter()
        .enumerate()
        .map(|(i, s)| match (segs.first(), i) {
            (Some(&"v1"), 2)
                if matches!(segs.get(1), Some(&"jobs") | Some(&"hosts") | Some(&"blobs")) =>
            {
                ":id"
            }
            (Some(&"v1"), 2 | 3) if segs.get(1) == Some(&"bundles") => ":name",
            _ => s,
        })
        .collect();
    format!("{method} /{}", shape.join("/"))
}

pub async fn handle(
    state: Arc<State>,
    conn: Arc<Conn>,
    req: Request<Incoming>,
) -> Response<ResBody> {
    match dispatch(&state, &conn, req).await {
        Ok(r) => r,
        Err(e) => http::error(&e),
    }
}

async fn dispatch(
    state: &Arc<State>,
    conn: &Arc<Conn>,
    req: Request<Incoming>,
) -> Result<Response<ResBody>, ApiError> {
    let (req, body) = req.into_parts();
    // Read every body first (bounded): refusing a request before reading it makes the server
    // reset the stream under a client still sending it, which the client sees as a network
    // error instead of the JSON refusal.
    let body = if req.method == Method::POST {
        http::read_body(body, state.body_timeout()).await?
    } else {
        bytes::Bytes::new()
    };
    let path = req.uri.path().to_string();
    let segs: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(str::to_string)
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let method = req.method.clone();
    if segs == ["healthz"] && method == Method::GET {
        return Ok(http::json(StatusCode::OK, &serde_json::json!({"ok": true})));
    }
    let mut who = principal(state, conn.fingerprint.clone(), conn.cert.as_deref()).await?;
    // A relay's own routes (renewing its certificate), which it calls for itself; or, through
    // the relays above it, as a client of theirs.
    let relays_own = segs.starts_with(&["v1", "relay"]);
    let relayed;
    let conn = if who.role == RELAY && (!relays_own || req.headers.contains_key(RELAYED_FOR)) {
        (who, relayed) = relayed_client(state, &who, &req.headers, conn, relays_own).await?;
        &relayed
    } else {
        conn
    };
    let get = method == Method::GET || method == Method::HEAD;
    match (segs.as_slice(), get, method == Method::POST) {
        (["metrics"], true, _) => {
            operator(&who)?;
            Ok(http::full(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                crate::metrics::render(state).await?,
            ))
        }
        (["v1", "jobs"], _, true) => {
            operator(&who)?;
            let body: CreateJob = http::parse_json(&body)?;
            create_job(state, &who, body).await
        }
        (["v1", "jobs"], true, _) => {
            operator(&who)?;
            let jobs = state.db(|db| db.jobs()).await?;
            Ok(http::json(StatusCode::OK, &jobs))
        }
        (["v1", "jobs", id], true, _) => {
            operator(&who)?;
            let id = job_id(id)?;
            match state.db(move |db| db.job(id)).await? {
                Some(j) => Ok(http::json(StatusCode::OK, &j)),
                None => Err(ApiError::not_found(format!("no job {id}"))),
            }
        }
        (["v1", "jobs", id, "cancel"], _, true) => {
            operator(&who)?;
            let id = job_id(id)?;
            let hosts = state.db(move |db| db.cancel(id)).await?;
            for h in &hosts {
                state.wake(h);
            }
            let j = state.db(move |db| db.job(id)).await?;
            Ok(http::json(StatusCode::OK, &j))
        }
        (["v1", "hosts"], true, _) => {
            operator(&who)?;
            let hosts = state.db(|db| db.hosts()).await?;
            Ok(http::json(StatusCode::OK, &hosts))
        }
        (["v1", "hosts", host, "rescue"], _, true) => {
            operator(&who)?;
            let body: RescueRequest = http::parse_json(&body)?;
            let h = host.to_string();
            state
                .db(move |db| db.request_rescue(&h, &body).map_err(ApiError::from))
                .await?;
            state.wake(host);
            Ok(http::json(
                StatusCode::ACCEPTED,
                &serde_json::json!({"host": host, "rescue": "requested"}),
            ))
        }
        (["v1", "agent", "work"], true, _) => {
            let host = agent(&who)?;
            let (wait, trust) = query(req.uri.query(), true)?;
            let build = req
                .headers
                .get(hyper::header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .and_then(agent_build);
            agent_work(state, conn, host, wait, trust, build).await
        }
        (["v1", "agent", "identity"], _, true) => {
            let host = agent(&who)?.to_string();
            let body: proto::v1::RenewIdentity = http::parse_json(&body)?;
            renew_identity(state, conn, host, "agent", body.public_key).await
        }
        (["v1", "relay", "identity"], true, _) => {
            relay(&who)?;
            let (_, trust) = query(req.uri.query(), false)?;
            let fp = conn.fingerprint.clone().unwrap_or_default();
            state.db(move |db| db.cert_used(&fp)).await?;
            let renew = renewal_due(state, conn, state.config.relay_cert_days).await?;
            let (trust, trust_signature) = trust_for(state, conn, trust).await?.unzip();
            Ok(http::json(
                StatusCode::OK,
                &proto::v1::RelayIdentity {
                    renew,
                    trust,
                    trust_signature,
                },
            ))
        }
        (["v1", "relay", "identity"], _, true) => {
            let name = relay(&who)?.to_string();
            let body: proto::v1::RenewIdentity = http::parse_json(&body)?;
            renew_identity(state, conn, name, RELAY, body.public_key).await
        }
        (["v1", "agent", "ready"], _, true) => {
            let host = agent(&who)?.to_string();
            let ready: proto::v1::Readiness = http::parse_json(&body)?;
            state.db(move |db| db.set_ready(&host, ready)).await?;
            Ok(http::json(StatusCode::OK, &serde_json::json!({"ok": true})))
        }
        (["v1", "agent", "events"], _, true) => {
            let host = agent(&who)?.to_string();
            let ev: Event = http::parse_json(&body)?;
            let addr = conn.addr.clone();
            let waiting = state
                .db(move |db| db.record_event(&host, &addr, &ev).map_err(ApiError::from))
                .await?;
            // A host finished: those waiting for a slot of its job may take it now.
            for h in &waiting {
                state.wake(h);
            }
            Ok(http::json(StatusCode::OK, &serde_json::json!({"ok": true})))
        }
        (["v1", "bundles", name], true, _) => {
            // Operators (and `reinstall plan --target`) size disks from these.
            operator(&who)?;
            let n = bundle::BundleName::parse("bundle name", name)
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            let all = state.store.list().map_err(ApiError::internal)?;
            let versions: Vec<&bundle::Manifest> = all
                .iter()
                .map(|s| &s.manifest)
                .filter(|m| m.name == n.as_str())
                .collect();
            if versions.is_empty() {
                return Err(ApiError::not_found(format!("no bundle named {n}")));
            }
            Ok(http::json(StatusCode::OK, &versions))
        }
        (["v1", "bundles", name, version, part], true, _) => {
            let part = *part;
            let file = match part {
                "manifest" => bundle::MANIFEST_FILE,
                "signature" => bundle::SIGNATURE_FILE,
                "identity" => bundle::IDENTITY_FILE,
                _ => return Err(ApiError::not_found(format!("no bundle part {part:?}"))),
            };
            let stored = find_bundle(state, name, version)?;
            let bref = bundle_ref(&stored);
            match who.role.as_str() {
                "agent" => {
                    agent_may_read(state, &who.name, |j| {
                        [&j.target, &j.rescue]
                            .iter()
                            .any(|b| b.name == bref.name && b.version == bref.version)
                    })
                    .await?
                }
                _ if part == "identity" => {
                    return Err(ApiError::forbidden(
                        "bundle identities are released only to agents whose job names the bundle",
                    ))
                }
                _ => {}
            }
            let bytes = tokio::fs::read(stored.dir.join(file)).await.map_err(|e| {
                ApiError::internal(format!("reading {}: {e}", stored.dir.join(file).display()))
            })?;
            Ok(http::full(
                StatusCode::OK,
                "application/octet-stream",
                bytes,
            ))
        }
        (["v1", "blobs", sha], true, _) => {
            if sha.len() != 64 || !sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return Err(ApiError::bad_request(format!(
                    "{sha:?} is not a SHA-256 (64 lower-case hex digits)"
                )));
            }
            if who.role == "agent" {
                let s = sha.to_string();
                agent_may_read(state, &who.name, move |j| {
                    j.target.sha256 == s || j.rescue.sha256 == s
                })
                .await?;
            }
            let path = state.store.dir.join("blobs/sha256").join(sha);
            if !path.exists() {
                return Err(ApiError::not_found(format!("no blob {sha}")));
            }
            http::serve_file(&req, &path, sha, state.metrics.bytes_served.clone()).await
        }
        _ => Err(ApiError::not_found(format!("no route {method} {path}"))),
    }
}

/// The role of a site relay's certificate (`stager relay init`).
pub const RELAY: &str = "relay";
/// Headers a site relay sets on what it forwards: the SHA-256 fingerprint of the certificate
/// the agent presented to the relay, and the agent's address as the relay saw it. A relay
/// whose client is itself a relay (relays chained: a site's relay under a regional one)
/// passes both on and adds that relay's fingerprint to [`RELAYED_VIA`].
pub const RELAYED_FOR: &str = "x-reinstall-relayed-for";
/// The agent's certificate itself (base64 DER), passed on with [`RELAYED_FOR`]: the stager
/// checks it against its CA only when the fingerprint is not on record (a renewal made
/// after the backup it was restored from).
pub const RELAYED_CERT: &str = "x-reinstall-relayed-cert";
pub const RELAYED_ADDR: &str = "x-reinstall-relayed-addr";
/// The fingerprints of the relays a request came through before the one that connected,
/// comma-separated, the agent's own relay first.
pub const RELAYED_VIA: &str = "x-reinstall-relayed-via";
/// Their certificates (base64 DER, comma-separated, in the same order; empty where a relay
/// did not pass one on): checked against the CA, as [`RELAYED_CERT`] is, only for a relay
/// whose fingerprint is not on record (one that renewed after the backup the stager was
/// restored from).
pub const RELAYED_VIA_CERTS: &str = "x-reinstall-relayed-via-certs";
/// Most relays between an agent and the stager.
pub const MAX_RELAYS: usize = 4;

/// A comma-separated relay header (`RELAYED_VIA`, `RELAYED_VIA_CERTS`) as its items, the
/// agent's own relay first; empty when absent.
pub fn relayed_list<'a>(headers: &'a hyper::HeaderMap, name: &str) -> Vec<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(',').map(str::trim).collect())
        .unwrap_or_default()
}

/// Who a relay's request is for: the agent whose certificate the first relay verified,
/// looked up here exactly as if it had connected itself (unknown and revoked refused), so
/// that every authorization rule holds through relays. A relay acts for agents only, never
/// for an operator, and for a relay below it only on that relay's own routes (`relays_own`:
/// renewing its certificate); every relay of the chain must be a relay this stager issued,
/// not revoked, that serves the agent's site (or every site of the relay below).
async fn relayed_client(
    state: &Arc<State>,
    relay: &Principal,
    headers: &hyper::HeaderMap,
    conn: &Arc<Conn>,
    relays_own: bool,
) -> Result<(Principal, Arc<Conn>), ApiError> {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let Some(fp) = header(RELAYED_FOR) else {
        return Err(ApiError::forbidden(format!(
            "relay {:?} may only forward agents' requests ({RELAYED_FOR} missing)",
            relay.name
        )));
    };
    let der = |c: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.decode(c).ok()
    };
    let cert = header(RELAYED_CERT).and_then(der);
    let who = principal(state, Some(fp.to_string()), cert.as_deref()).await?;
    if who.role != "agent" && !(who.role == RELAY && relays_own) {
        return Err(ApiError::forbidden(format!(
            "relay {:?} may act for agents only, not for {} {:?}",
            relay.name, who.role, who.name
        )));
    }
    // The relays below the one that connected, each checked as that one is.
    let below = relayed_list(headers, RELAYED_VIA);
    let below_certs = relayed_list(headers, RELAYED_VIA_CERTS);
    if below.len() >= MAX_RELAYS {
        return Err(ApiError::forbidden(format!(
            "host {:?} came through more than {MAX_RELAYS} relays (a relay whose upstream leads back to itself?)",
            who.name
        )));
    }
    let mut chain = vec![(
        relay.name.clone(),
        conn.fingerprint.clone().unwrap_or_default(),
    )];
    for (i, fp) in below.into_iter().enumerate() {
        let cert = below_certs.get(i).and_then(|c| der(c));
        let r = principal(state, Some(fp.to_string()), cert.as_deref()).await?;
        if r.role != RELAY {
            return Err(ApiError::forbidden(format!(
                "relay {:?} forwarded host {:?} as if through relay {:?}, which is a {} certificate",
                relay.name, who.name, r.name, r.role
            )));
        }
        chain.push((r.name, fp.to_string()));
    }
    // A relay is trusted with its own sites' hosts (they reach the stager through it), not
    // with the fleet's; and with a relay below it (renewing its certificate) only if it
    // serves all of that relay's sites.
    for (name, relay_fp) in chain {
        let client = fp.to_string();
        if let Some((serves, of)) = state
            .db(move |db| db.relay_site_mismatch(&relay_fp, &client))
            .await?
        {
            let sites = |s: Option<String>| {
                s.map_or("no site".into(), |s| {
                    let list: Vec<String> = s.split(',').map(|x| format!("{x:?}")).collect();
                    format!("site {}", list.join(", "))
                })
            };
            let of = match who.role.as_str() {
                RELAY => format!("relay {:?} serves {}", who.name, sites(of)),
                _ => format!("host {:?} is in {}", who.name, sites(of)),
            };
            return Err(ApiError::forbidden(format!(
                "relay {name:?} serves {}; {of}",
                sites(serves)
            )));
        }
    }
    let addr = header(RELAYED_ADDR)
        .filter(|a| a.parse::<std::net::IpAddr>().is_ok())
        .map_or_else(|| conn.addr.clone(), str::to_string);
    let conn = Arc::new(Conn {
        fingerprint: Some(fp.to_string()),
        cert,
        addr,
    });
    Ok((who, conn))
}

/// Who the certificate `fingerprint` belongs to (`cert`: the certificate itself, when at hand,
/// for one this stager issued after the backup it was restored from: see [`adopt`]).
async fn principal(
    state: &Arc<State>,
    fingerprint: Option<String>,
    cert: Option<&[u8]>,
) -> Result<Principal, ApiError> {
    let Some(fp) = fingerprint else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "a client certificate is required",
        ));
    };
    let key = fp.clone();
    let mut p = state.db(move |db| db.principal(&key)).await?;
    if let (None, Some(cert)) = (&p, cert) {
        p = adopt(state, &fp, cert).await?;
    }
    match p {
        None => {
            state.metrics.unknown_certs.fetch_add(1, Ordering::Relaxed);
            Err(ApiError::forbidden(
                "this certificate was not issued by this stager",
            ))
        }
        Some(p) if p.revoked => {
            state
                .metrics
                .revoked_refused
                .fetch_add(1, Ordering::Relaxed);
            Err(ApiError::forbidden(format!(
                "the certificate of {} {:?} was revoked",
                p.role, p.name
            )))
        }
        Some(p) => Ok(p),
    }
}

/// A certificate not on record, from a stager restored from a backup: one this stager issued
/// between the backup's snapshot and the restore (an agent's or relay's renewal) is recorded
/// as the renewal it was, the first time it is presented, and serves as such. It must chain
/// to this stager's CA (checked here: a relay passes it on), start within such a period,
/// and name a host, relay or operator of the same role on record. `None` otherwise.
async fn adopt(state: &Arc<State>, fp: &str, der: &[u8]) -> Result<Option<Principal>, ApiError> {
    let windows = state.db(|db| db.unrecorded()).await?;
    if windows.is_empty() || crate::pki::fingerprint(der) != fp {
        return Ok(None);
    }
    use rustls::server::danger::ClientCertVerifier;
    let chained = state.trust.verify_client_cert(
        &rustls::pki_types::CertificateDer::from(der.to_vec()),
        &[],
        rustls::pki_types::UnixTime::now(),
    );
    let Ok(info) = crate::pki::cert_info_der(der) else {
        return Ok(None);
    };
    let (name, role) = match chained
        .map_err(|e| format!("it does not chain to this stager's CA: {e}"))
        .and_then(|_| crate::certs::adoptable(&info, &windows))
    {
        Ok(who) => who,
        Err(why) => {
            eprintln!("stager: certificate {fp} is not on record and not taken: {why}");
            return Ok(None);
        }
    };
    let not_after = crate::pki::rfc3339(info.not_after);
    let (key, n, r) = (fp.to_string(), name.clone(), role.clone());
    let p = state
        .db(move |db| db.adopt_cert(&key, &n, &r, &not_after))
        .await?;
    match &p {
        Some(_) => {
            state.metrics.adopted_certs.fetch_add(1, Ordering::Relaxed);
            eprintln!("stager: certificate {fp} of {role} {name:?}, issued after the backup this stager was restored from, is now on record");
        }
        None => eprintln!("stager: certificate {fp} names {role} {name:?}, which has no certificate on record: not taken (enroll it again)"),
    }
    Ok(p)
}

fn operator(who: &Principal) -> Result<(), ApiError> {
    if who.role == "operator" {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "operator route; this certificate belongs to {} {:?}",
            who.role, who.name
        )))
    }
}

fn agent(who: &Principal) -> Result<&str, ApiError> {
    if who.role == "agent" {
        Ok(&who.name)
    } else {
        Err(ApiError::forbidden(format!(
            "agent route; this certificate belongs to {} {:?}",
            who.role, who.name
        )))
    }
}

fn relay(who: &Principal) -> Result<&str, ApiError> {
    if who.role == RELAY {
        Ok(&who.name)
    } else {
        Err(ApiError::forbidden(format!(
            "relay route; this certificate belongs to {} {:?}",
            who.role, who.name
        )))
    }
}

fn job_id(s: &str) -> Result<u64, ApiError> {
    s.parse()
        .map_err(|_| ApiError::bad_request(format!("job id {s:?} is not a number")))
}

/// A query's `wait` (seconds, a long poll; only where `wait_ok`) and `trust` (the SHA-256 of
/// the trust bundle the client holds).
fn query(q: Option<&str>, wait_ok: bool) -> Result<(Duration, Option<String>), ApiError> {
    let mut wait = Duration::ZERO;
    let mut trust = None;
    for kv in q.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
        match kv.split_once('=') {
            Some(("wait", v)) if wait_ok => {
                let secs: u64 = v.parse().map_err(|_| {
                    ApiError::bad_request(format!("wait={v:?} is not a number of seconds"))
                })?;
                wait = Duration::from_secs(secs).min(MAX_WAIT);
            }
            Some(("trust", v)) => {
                if v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(ApiError::bad_request(format!(
                        "trust={v:?} is not a SHA-256 (64 hex digits)"
                    )));
                }
                trust = Some(v.to_ascii_lowercase());
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {kv:?}"
                )))
            }
        }
    }
    Ok((wait, trust))
}

/// What a client that said it holds the trust bundle `held` (SHA-256) is to trust instead:
/// the stager's `ca.pem`, if it is another, and its signature. Recorded for `stager ca
/// status`.
async fn trust_for(
    state: &Arc<State>,
    conn: &Arc<Conn>,
    held: Option<String>,
) -> Result<Option<(String, String)>, ApiError> {
    let Some(held) = held else {
        return Ok(None); // a client that does not say cannot be told
    };
    let fp = conn.fingerprint.clone().unwrap_or_default();
    let h = held.clone();
    state.db(move |db| db.cert_trust(&fp, &h)).await?;
    let now = state.trust.current();
    // Clients take only a signed bundle; a home whose CA was never replaced has no signature
    // (and its clients hold its one bundle).
    let Some(signature) = now.signature.as_deref().filter(|_| now.sha256 != held) else {
        return Ok(None);
    };
    Ok(Some((now.text.to_string(), signature.clone())))
}

/// Refuses unless the agent's unfinished job satisfies `names_it`.
async fn agent_may_read(
    state: &Arc<State>,
    host: &str,
    names_it: impl FnOnce(&proto::v1::AgentJob) -> bool,
) -> Result<(), ApiError> {
    let h = host.to_string();
    // Fetching a bundle of its job is taking the job, as asking for work is.
    let job = state.db(move |db| db.work_for(&h)).await?;
    match job {
        Some(j) if names_it(&j) => Ok(()),
        _ => Err(ApiError::forbidden(format!(
            "host {host:?} has no unfinished job naming this bundle"
        ))),
    }
}

fn find_bundle(state: &State, name: &str, version: &str) -> Result<crate::store::Stored, ApiError> {
    let n = bundle::BundleName::parse("bundle name", name)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let v = bundle::BundleName::parse("bundle version", version)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    state
        .store
        .find(&n, Some(&v))
        .map_err(|e| ApiError::not_found(e.to_string()))
}

fn bundle_ref(s: &crate::store::Stored) -> BundleRef {
    BundleRef {
        name: s.manifest.name.clone(),
        version: s.manifest.version.clone(),
        sha256: s.manifest.payload.sha256.clone(),
        size: s.manifest.payload.size,
    }
}

/// Resolves `NAME[@VERSION]` to a stored bundle of the expected kind.
fn resolve(
    state: &State,
    spec: &str,
    kind: bundle::Kind,
    field: &str,
) -> Result<BundleRef, ApiError> {
    let (n, v) = bundle::name::parse_ref(spec)
        .map_err(|e| ApiError::bad_request(format!("{field}: {e}")))?;
    let s = state
        .store
        .find(&n, v.as_ref())
        .map_err(|e| ApiError::not_found(format!("{field}: {e}")))?;
    if s.manifest.kind != kind {
        return Err(ApiError::bad_request(format!(
            "{field}: bundle {} is a {:?} bundle, not {kind:?}",
            s.manifest.id(),
            s.manifest.kind
        )));
    }
    Ok(bundle_ref(&s))
}

async fn create_job(
    state: &Arc<State>,
    who: &Principal,
    body: CreateJob,
) -> Result<Response<ResBody>, ApiError> {
    if body.hosts.is_empty() {
        return Err(ApiError::bad_request("hosts is empty"));
    }
    for (field, v) in [
        ("max_in_flight", body.max_in_flight),
        ("halt_after_failures", body.halt_after_failures),
        ("max_in_flight_per_site", body.max_in_flight_per_site),
        ("canary", body.canary),
        ("halt_at_failure_percent", body.halt_at_failure_percent),
    ] {
        if v == Some(0) {
            return Err(ApiError::bad_request(format!(
                "{field} is 0: it must be at least 1 (leave it out for no limit)"
            )));
        }
    }
    if let Some(p) = body.halt_at_failure_percent.filter(|&p| p > 100) {
        return Err(ApiError::bad_request(format!(
            "halt_at_failure_percent is {p}: a percentage is at most 100"
        )));
    }
    let mut hosts = body.hosts.clone();
    hosts.sort();
    hosts.dedup();
    let target = resolve(state, &body.target, bundle::Kind::Target, "target")?;
    let rescue_spec = body
        .rescue
        .clone()
        .or_else(|| state.config.default_rescue.clone())
        .ok_or_else(|| {
            ApiError::bad_request(
                "no rescue bundle: name one, or set default_rescue in stager.toml",
            )
        })?;
    let rescue = resolve(state, &rescue_spec, bundle::Kind::Rescue, "rescue")?;
    let creator = who.name.clone();
    let hs = hosts.clone();
    let id = state
        .db(move |db| {
            db.create_job(&creator, &hs, &target, &rescue, &body)
                .map_err(ApiError::from)
        })
        .await?;
    for h in &hosts {
        state.wake(h);
    }
    let job = state.db(move |db| db.job(id)).await?;
    Ok(http::json(StatusCode::CREATED, &job))
}

/// The agent build a User-Agent names (`reinstall/...`, at most 100 printable characters);
/// `None` for any other client.
fn agent_build(ua: &str) -> Option<String> {
    (ua.starts_with("reinstall/")
        && ua.len() <= 100
        && ua.bytes().all(|b| (b' '..=b'~').contains(&b)))
    .then(|| ua.to_string())
}

/// Long poll: answers at once when there is work, else when work appears, else after `wait`.
async fn agent_work(
    state: &Arc<State>,
    conn: &Arc<Conn>,
    host: &str,
    wait: Duration,
    trust: Option<String>,
    build: Option<String>,
) -> Result<Response<ResBody>, ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    let notify = state.notifier(host);
    let (h, addr) = (host.to_string(), conn.addr.clone());
    let fp = conn.fingerprint.clone().unwrap_or_default();
    state
        .db(move |db| db.seen(&h, &addr, &fp, build.as_deref()))
        .await?;
    let renew_identity = renewal_due(state, conn, state.config.agent_cert_days).await?;
    let (trust, trust_signature) = trust_for(state, conn, trust).await?.unzip();
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (h, trust, trust_signature) =
            (host.to_string(), trust.clone(), trust_signature.clone());
        let work = state
            .db(move |db| -> Result<Work, ApiError> {
                Ok(Work {
                    job: db.work_for(&h)?,
                    rescue: db.rescue_request(&h)?,
                    renew_identity,
                    trust,
                    trust_signature,
                })
            })
            .await?;
        // A new trust bundle rides on the answer when it comes; it does not end the long
        // poll (an agent that refuses it would otherwise poll in a tight loop).
        if work.job.is_some() || work.rescue.is_some() || tokio::time::Instant::now() >= deadline {
            return Ok(http::json(StatusCode::OK, &work));
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// Whether the certificate of `conn` is due for renewal: less than a third of a new
/// certificate's lifetime (`days`: `agent_cert_days` or `relay_cert_days`) left, or issued
/// by a CA that no longer issues (`stager ca switch`).
async fn renewal_due(
    state: &Arc<State>,
    conn: &Arc<Conn>,
    days: std::num::NonZeroU32,
) -> Result<bool, ApiError> {
    let window = Duration::from_secs(u64::from(days.get()) * 86_400 / 3);
    let by = crate::pki::rfc3339(std::time::SystemTime::now() + window);
    let fp = conn.fingerprint.clone().unwrap_or_default();
    state.db(move |db| db.cert_due(&fp, &by)).await
}

/// `POST /v1/agent/identity` (`role` agent) and `POST /v1/relay/identity` (relay): a new
/// certificate for `name` and the public key it made, valid for `agent_cert_days` or
/// `relay_cert_days`, recorded as its own (a relay's with the sites and names recorded with
/// the one it asked with: names come from the record, never from the request); the one it
/// asked with stays valid until it expires (a client that fails to store the new one keeps
/// working, and asks again). Only for a certificate due for renewal: a key cannot mint
/// certificates at will (and `stager revoke NAME` revokes the renewed ones too).
async fn renew_identity(
    state: &Arc<State>,
    conn: &Arc<Conn>,
    name: String,
    role: &'static str,
    public_key: String,
) -> Result<Response<ResBody>, ApiError> {
    let (what, days) = match role {
        RELAY => ("relay", state.config.relay_cert_days),
        _ => ("host", state.config.agent_cert_days),
    };
    if !renewal_due(state, conn, days).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "the certificate of {what} {name:?} is not due for renewal (more than a third of {days} days left)"
            ),
        ));
    }
    let dir = state.dir.clone();
    let old = conn.fingerprint.clone().unwrap_or_default();
    let renewed = state
        .db(move |db| -> Result<proto::v1::RenewedIdentity, ApiError> {
            let (site, sans) = match role {
                RELAY => db.relay_record(&old)?.unwrap_or_default(),
                _ => (None, Vec::new()),
            };
            if role == RELAY && sans.is_empty() {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!(
                        "relay {name:?}: its certificate was issued before this stager recorded a relay's names; \
                         reissue it once by hand (stager relay init --name {name} --san ... --out NEWDIR)"
                    ),
                ));
            }
            let days = i64::from(days.get());
            let issued =
                crate::pki::issue_client_for(&dir, &name, role, &sans, days, &public_key)
                    .map_err(|e| ApiError::bad_request(format!("public_key: {e:#}")))?;
            let not_after = issued.not_after_text();
            db.add_cert(&issued.fingerprint, &name, role, &not_after, site.as_deref(), &sans)?;
            println!(
                "renewed the certificate of {what} {name:?} (was sha256 {old}, now {}, valid until {not_after})",
                issued.fingerprint
            );
            Ok(proto::v1::RenewedIdentity {
                cert: issued.cert_pem,
                not_after,
            })
        })
        .await?;
    Ok(http::json(StatusCode::OK, &renewed))
}
