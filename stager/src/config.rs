//! `stager.toml` in the stager home: written by `stager init`, read by every command.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::num::NonZeroU32;
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Names this stager in certificates and identity files.
    pub name: String,
    /// Where `stager serve` listens unless `--listen` says otherwise.
    pub listen: String,
    /// The URL written into identity files: how agents reach this stager.
    pub url: String,
    /// Rescue bundle (`NAME` or `NAME@VERSION`) for jobs that do not name one.
    #[serde(default)]
    pub default_rescue: Option<String>,
    /// Most TLS connections served at once; more wait in the kernel's accept queue.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Seconds a client has to finish the TLS handshake.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_secs: u64,
    /// Seconds a client has to send a request's headers, and again its body.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: u64,
    /// Seconds without an event from a host running a job after which the job shows it as
    /// silent (`silent_s`) and `/metrics` counts it. Longer than the slowest reboot.
    #[serde(default = "default_silent_after")]
    pub silent_after_secs: u64,
    /// At most this many hosts of one site (`stager enroll --site`) run a job at once, across
    /// every job on this stager; hosts without a site count as one site. Unset: only each
    /// job's own limits apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight_per_site: Option<NonZeroU32>,
    /// At most this many hosts run a job at once, across every job and site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<NonZeroU32>,
    /// Days a host certificate renewed by its agent is valid. An agent presenting a
    /// certificate with less than a third of this left is told to renew it.
    #[serde(default = "default_cert_days")]
    pub agent_cert_days: NonZeroU32,
    /// The same for a site relay's certificate, which its relay renews.
    #[serde(default = "default_cert_days")]
    pub relay_cert_days: NonZeroU32,
}

fn default_cert_days() -> NonZeroU32 {
    NonZeroU32::new(825).expect("not zero")
}

fn default_max_connections() -> usize {
    10_000
}
fn default_handshake_timeout() -> u64 {
    10
}
fn default_request_timeout() -> u64 {
    30
}
pub(crate) fn default_silent_after() -> u64 {
    900
}

impl Config {
    /// A configuration with every limit at its default.
    pub fn new(
        name: String,
        listen: String,
        url: String,
        default_rescue: Option<String>,
    ) -> Config {
        Config {
            name,
            listen,
            url,
            default_rescue,
            max_connections: default_max_connections(),
            handshake_timeout_secs: default_handshake_timeout(),
            request_timeout_secs: default_request_timeout(),
            silent_after_secs: default_silent_after(),
            max_in_flight_per_site: None,
            max_in_flight: None,
            agent_cert_days: default_cert_days(),
            relay_cert_days: default_cert_days(),
        }
    }

    pub fn path(dir: &Path) -> std::path::PathBuf {
        dir.join("stager.toml")
    }

    pub fn load(dir: &Path) -> Result<Config> {
        let p = Self::path(dir);
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let p = Self::path(dir);
        let text = format!(
            "# stager configuration (see README: Stager)\n{}",
            toml::to_string(self).expect("config serializes")
        );
        let tmp = p.with_extension("toml.tmp");
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &p).with_context(|| format!("writing {}", p.display()))
    }
}
