//! `/v1/` request and response bodies.

use serde::{Deserialize, Serialize};

pub const PREFIX: &str = "/v1";

/// Operator: `POST /v1/jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    pub hosts: Vec<String>,
    /// Target bundle: `NAME` (newest version) or `NAME@VERSION`.
    pub target: String,
    /// Rescue bundle; the stager's configured default if absent.
    #[serde(default)]
    pub rescue: Option<String>,
    /// Stop in the rescue OS after it called home; do not install the target.
    #[serde(default)]
    pub hold_in_rescue: bool,
    /// At most this many of the job's hosts between taking the job and finishing it; the
    /// others wait (pending) and take it as slots free up. Absent: all at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
    /// Halt the job once this many of its hosts failed: hosts that have not taken it yet
    /// are cancelled; hosts already in flight carry on (stopping them midway helps nobody).
    /// Absent: never halt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halt_after_failures: Option<u32>,
    /// At most this many of the job's hosts of one site (`stager enroll --site`) at a time,
    /// so that a point of presence never has all its machines down at once. Hosts enrolled
    /// without a site count as one site. Absent: no limit per site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight_per_site: Option<u32>,
    /// The first this many hosts to take the job run it alone: the others wait until every
    /// one of them is done, and a failure among them halts the job. Absent: no canaries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<u32>,
    /// Halt the job once this percentage (1-100) of its finished hosts failed, counted from
    /// when enough have finished for one failure to be at most that share (10%: from 10
    /// finished on). Absent: no rate; `halt_after_failures` may still apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halt_at_failure_percent: Option<u32>,
}

/// Operator: `POST /v1/hosts/{host}/rescue`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RescueRequest {
    /// Make rescue the default boot, not only the next one.
    #[serde(default)]
    pub permanent: bool,
}

/// A bundle as a job names it: enough for an agent to fetch and check it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleRef {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// At least one host has not finished.
    Active,
    /// Every host is done.
    Done,
    /// Every host finished, at least one failed.
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// The agent has not taken the job yet (or waits for a slot: `max_in_flight`).
    Pending,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl HostState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            HostState::Done | HostState::Failed | HostState::Cancelled
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: u64,
    pub created: String,
    pub created_by: String,
    pub target: BundleRef,
    pub rescue: BundleRef,
    pub hold_in_rescue: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halt_after_failures: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight_per_site: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halt_at_failure_percent: Option<u32>,
    /// Why the job was halted (its `halt_after_failures` was reached), when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halted: Option<String>,
    pub state: JobState,
    pub hosts: Vec<HostJob>,
}

/// One host's progress in a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostJob {
    pub host: String,
    pub state: HostState,
    pub phase: Option<String>,
    pub bytes_done: u64,
    pub bytes_total: Option<u64>,
    /// Bytes per second over the last progress events, if known.
    pub rate: Option<f64>,
    pub updated: Option<String>,
    pub last_event: Option<EventRecord>,
    /// Seconds without a word from the host (no event since it took the job or since its
    /// last event) while it runs the job, once that is the stager's `silent_after_secs` or
    /// more: a machine that may not be coming back. Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub silent_s: Option<u64>,
}

/// Operator: `GET /v1/hosts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Host {
    pub name: String,
    pub enrolled: String,
    pub last_seen: Option<String>,
    /// The address the stager last saw the agent's connection come from.
    pub address: Option<String>,
    pub phase: Option<String>,
    pub job: Option<u64>,
    pub rescue_requested: Option<RescueRequest>,
    /// The network identity the agent last reported (free-form JSON from the agent).
    pub network: Option<serde_json::Value>,
    /// Where the host is (`stager enroll --site`), for per-site rollout limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// The agent build the host last polled with (its User-Agent: `reinstall/VERSION`, and
    /// the build's name when it was built with `REINSTALL_BUILD` set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Whether a reinstall would go ahead on the host, as it last planned (read only, in its
    /// source OS or a target it finished a job in, at its agent's start, when that job was
    /// done, hourly while it waits for work, and at `reinstall setup`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<Readiness>,
}

/// Agent: `POST /v1/agent/ready`: whether a reinstall of this host would go ahead now
/// (`reinstall plan`'s checks, nothing written), and if not, why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Readiness {
    pub ok: bool,
    /// The disk a reinstall would use as disk 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk2: Option<String>,
    /// `uefi` or `bios`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_mode: Option<String>,
    /// What would stop a reinstall.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    /// When the stager received it (set by the stager).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// The OS that planned: `source`, `target` (a finished job's, the source of the next) or
    /// `rescue` (a job taken there keeps disk 2 as it is and installs only the target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
}

/// Agent: `GET /v1/agent/work?wait=SECONDS` (long poll).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Work {
    pub job: Option<AgentJob>,
    /// An operator asked this host to boot its rescue OS.
    pub rescue: Option<RescueRequest>,
    /// The certificate the host presented is in the last third of a certificate's lifetime:
    /// it should fetch a new one (`POST /v1/agent/identity`) while this one still works.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub renew_identity: bool,
    /// The CA certificates (PEM) the host is to trust from now on, when the host said
    /// (`trust=SHA256` in the request) it holds others: the stager's CA is being replaced
    /// (`stager ca`). The host keeps them as its identity file's `ca`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<String>,
    /// `trust`'s minisign signature by the release key the host pins (its identity file's
    /// `release_pub`): a relay between them cannot slip in a CA of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_signature: Option<String>,
}

/// Agent: `POST /v1/agent/identity`: a new certificate for a key the host made itself (its
/// private key never leaves the host: not through a relay, not to the stager).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewIdentity {
    /// PEM SubjectPublicKeyInfo of a new ECDSA P-256 key.
    pub public_key: String,
}

/// The answer to [`RenewIdentity`]. The certificate the host asked with stays valid until
/// it expires.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RenewedIdentity {
    /// PEM.
    pub cert: String,
    /// RFC 3339.
    pub not_after: String,
}

/// Relay: `GET /v1/relay/identity`: whether the certificate the relay presented is in the last
/// third of a relay certificate's lifetime; if so it renews it as an agent does, with
/// `POST /v1/relay/identity` ([`RenewIdentity`] → [`RenewedIdentity`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayIdentity {
    pub renew: bool,
    /// As [`Work::trust`], for the relay's `ca.pem` (asked with `?trust=SHA256`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<String>,
    /// As [`Work::trust_signature`] (checked with the relay's `release.pub`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_signature: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentJob {
    pub id: u64,
    pub host: String,
    pub target: BundleRef,
    pub rescue: BundleRef,
    pub hold_in_rescue: bool,
    pub cancelled: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    PhaseEntered,
    PhaseDone,
    Progress,
    /// A recoverable error (the agent retries).
    Error,
    /// The network identity the agent sees (`network` is set).
    Network,
    /// The job is complete on this host.
    Done,
    /// The job failed on this host and the agent gave up.
    Failed,
}

/// Agent: `POST /v1/agent/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub job: u64,
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_done: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_total: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<serde_json::Value>,
}

/// An event as stored, with when and from where it arrived.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    pub time: String,
    pub address: Option<String>,
    pub event: Event,
}

/// Every 4xx/5xx response body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each fixture parses, and serializing it again gives the same JSON value.
    fn pinned<T: serde::de::DeserializeOwned + Serialize>(name: &str, text: &str) -> T {
        let v: T = serde_json::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        let again: serde_json::Value = serde_json::to_value(&v).unwrap();
        let orig: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(again, orig, "{name} does not round-trip");
        v
    }

    #[test]
    fn v1_fixtures_round_trip() {
        let c: CreateJob = pinned(
            "create_job",
            include_str!("../tests/fixtures/v1/create_job.json"),
        );
        assert_eq!(c.hosts, ["web1", "web2"]);
        let j: Job = pinned("job", include_str!("../tests/fixtures/v1/job.json"));
        assert_eq!(j.hosts[0].state, HostState::Running);
        assert_eq!((j.max_in_flight, j.halted.as_deref()), (None, None));
        let c: CreateJob = pinned(
            "create_job_rollout",
            include_str!("../tests/fixtures/v1/create_job_rollout.json"),
        );
        assert_eq!(
            (
                c.max_in_flight,
                c.halt_after_failures,
                c.max_in_flight_per_site,
                c.canary,
                c.halt_at_failure_percent
            ),
            (Some(1), Some(1), Some(1), Some(1), Some(10))
        );
        let j: Job = pinned(
            "job_halted",
            include_str!("../tests/fixtures/v1/job_halted.json"),
        );
        assert_eq!(j.hosts[1].state, HostState::Cancelled);
        assert!(j.halted.unwrap().contains("halt after 1"));
        let w: Work = pinned("work", include_str!("../tests/fixtures/v1/work.json"));
        assert!(w.job.is_some() && !w.renew_identity);
        let w: Work = pinned(
            "work_renew",
            include_str!("../tests/fixtures/v1/work_renew.json"),
        );
        assert!(w.job.is_none() && w.renew_identity);
        let r: RenewedIdentity = pinned(
            "renewed_identity",
            include_str!("../tests/fixtures/v1/renewed_identity.json"),
        );
        assert_eq!(r.not_after, "2029-02-26T09:46:35Z");
        let r: RenewIdentity = pinned(
            "renew_identity",
            include_str!("../tests/fixtures/v1/renew_identity.json"),
        );
        assert!(r.public_key.contains("PUBLIC KEY"));
        let r: RelayIdentity = pinned(
            "relay_identity",
            include_str!("../tests/fixtures/v1/relay_identity.json"),
        );
        assert!(r.renew);
        let e: Event = pinned("event", include_str!("../tests/fixtures/v1/event.json"));
        assert_eq!(e.kind, EventKind::Progress);
        let h: Vec<Host> = pinned("hosts", include_str!("../tests/fixtures/v1/hosts.json"));
        assert_eq!(h[0].name, "web1");
        assert_eq!(
            (h[0].site.as_deref(), h[1].site.as_deref()),
            (None, Some("pop-fra1"))
        );
    }

    #[test]
    fn requests_refuse_unknown_fields() {
        let e = serde_json::from_str::<CreateJob>(r#"{"hosts":["a"],"target":"t","force":true}"#)
            .unwrap_err();
        assert!(e.to_string().contains("unknown field `force`"), "{e}");
        assert!(serde_json::from_str::<Event>(r#"{"job":1,"kind":"progress","x":1}"#).is_err());
    }
}
