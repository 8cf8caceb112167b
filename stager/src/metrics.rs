//! `/metrics` in the Prometheus text exposition format (version 0.0.4).

use crate::http::ApiError;
use crate::server::State;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct Metrics {
    pub bytes_served: Arc<AtomicU64>,
    pub handshakes_refused: AtomicU64,
    pub revoked_refused: AtomicU64,
    pub unknown_certs: AtomicU64,
    pub adopted_certs: AtomicU64,
    pub connections: AtomicU64,
    requests: Mutex<BTreeMap<(String, u16), u64>>,
}

impl Metrics {
    pub fn request(&self, route: &str, status: u16) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((route.to_string(), status))
            .or_default() += 1;
    }
}

pub fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A counter, with its help line.
pub fn counter(s: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
}

/// A gauge, with its help line.
pub fn gauge(s: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
}

/// What every server here counts (the stager's API, a site relay), named `PREFIX_...`:
/// blob bytes sent, refused handshakes, open connections, requests by route and status.
pub fn served(s: &mut String, prefix: &str, m: &Metrics) {
    counter(
        s,
        &format!("{prefix}_bytes_served_total"),
        "Blob bytes sent to clients.",
        m.bytes_served.load(Ordering::Relaxed),
    );
    counter(
        s,
        &format!("{prefix}_handshakes_refused_total"),
        "TLS handshakes that failed: no client certificate, another CA, expired, or a timeout.",
        m.handshakes_refused.load(Ordering::Relaxed),
    );
    gauge(
        s,
        &format!("{prefix}_connections"),
        "Open client connections.",
        m.connections.load(Ordering::Relaxed),
    );
    let _ = writeln!(
        s,
        "# HELP {prefix}_requests_total Requests by route and status.\n# TYPE {prefix}_requests_total counter"
    );
    for ((route, status), n) in m.requests.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let _ = writeln!(
            s,
            "{prefix}_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
            esc(route)
        );
    }
}

pub async fn render(state: &Arc<State>) -> Result<String, ApiError> {
    let m = &state.metrics;
    let counts = state.db(|db| db.phase_counts()).await?;
    let halted = state.db(|db| db.halted_jobs()).await?;
    let silent = state.db(|db| db.silent_hosts()).await?;
    let by_site = state.db(|db| db.in_flight_by_site()).await?;
    let by_agent = state.db(|db| db.hosts_by_agent()).await?;
    let not_ready = state.db(|db| db.hosts_not_ready()).await?;
    let mut s = String::new();
    served(&mut s, "stager", m);
    counter(
        &mut s,
        "stager_revoked_refused_total",
        "Requests refused because the client certificate was revoked.",
        m.revoked_refused.load(Ordering::Relaxed),
    );
    counter(
        &mut s,
        "stager_unknown_certificates_total",
        "Requests with a certificate this stager has no record of.",
        m.unknown_certs.load(Ordering::Relaxed),
    );
    counter(
        &mut s,
        "stager_adopted_certificates_total",
        "Certificates issued after the backup this stager was restored from, put on record when first presented.",
        m.adopted_certs.load(Ordering::Relaxed),
    );
    gauge(
        &mut s,
        "stager_jobs_halted",
        "Jobs halted by a rollout limit (canaries, halt_after_failures, halt_at_failure_percent).",
        halted,
    );
    gauge(
        &mut s,
        "stager_hosts_not_ready",
        "Hosts whose last plan (at their agent's start in the source OS, or reinstall setup) found that a reinstall would be refused.",
        not_ready,
    );
    gauge(
        &mut s,
        "stager_host_jobs_silent",
        "Hosts running a job with no event for silent_after_secs.",
        silent,
    );
    let (dir, name) = (state.dir.clone(), state.config.name.clone());
    let certs = state
        .db(move |db| crate::certs::all(&dir, &name, db).map_err(ApiError::internal))
        .await?;
    let listed = crate::certs::standings(certs, std::time::SystemTime::now());
    let _ = writeln!(
        s,
        "# HELP stager_identities_expiring Names (hosts, operators, relays, the stager's server certificate, its CAs) whose current certificate ends within 30 days, or whose certificates have all expired, by role.\n# TYPE stager_identities_expiring gauge"
    );
    let mut by_role: std::collections::BTreeMap<&str, u64> =
        ["agent", "ca", "operator", "relay", "server"]
            .iter()
            .map(|r| (*r, 0))
            .collect();
    for l in crate::certs::expiring(&listed, 30) {
        *by_role.entry(l.cert.role.as_str()).or_default() += 1;
    }
    for (role, n) in by_role {
        let _ = writeln!(s, "stager_identities_expiring{{role=\"{role}\"}} {n}");
    }
    let _ = writeln!(
        s,
        "# HELP stager_hosts_in_flight Hosts running a job, by site (\"\" for hosts without one).\n# TYPE stager_hosts_in_flight gauge"
    );
    for (site, n) in &by_site {
        let _ = writeln!(s, "stager_hosts_in_flight{{site=\"{}\"}} {n}", esc(site));
    }
    let _ = writeln!(
        s,
        "# HELP stager_hosts_by_agent Enrolled hosts by the agent build they last polled with (\"\" for none yet).\n# TYPE stager_hosts_by_agent gauge"
    );
    for (agent, n) in &by_agent {
        let _ = writeln!(s, "stager_hosts_by_agent{{agent=\"{}\"}} {n}", esc(agent));
    }
    let _ = writeln!(
        s,
        "# HELP stager_host_jobs Hosts in jobs, by state and phase.\n# TYPE stager_host_jobs gauge"
    );
    for (state, phase, n) in counts {
        let _ = writeln!(
            s,
            "stager_host_jobs{{state=\"{}\",phase=\"{}\"}} {n}",
            esc(&state),
            esc(&phase)
        );
    }
    Ok(s)
}
