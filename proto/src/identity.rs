//! The identity file: everything an agent (or an operator's CLI) needs to talk to its stager,
//! in one file: the stager's URL, the CA that signed the stager's certificate, this client's
//! certificate and key, and the release public key that bundles must be signed with.
//!
//! TOML, versioned by `format`. Written 0600 by `stager enroll` / `stager operator`.
//! An agent reads it from [`DEFAULT_AGENT_PATH`] unless told otherwise.

use serde::{Deserialize, Serialize};
use std::path::Path;

pub const FORMAT: u32 = 1;
pub const DEFAULT_AGENT_PATH: &str = "/etc/reinstall/identity.toml";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A machine's agent: sees its own host, its job, and that job's bundles and keys.
    Agent,
    /// A person or script that creates and watches jobs.
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Operator => "operator",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFile {
    pub format: u32,
    /// The host name (agents) or operator name the certificate was issued to.
    pub name: String,
    pub role: Role,
    /// `https://HOST:PORT` of the stager.
    pub stager: String,
    /// PEM: the CA that signed the stager's server certificate (and this client's).
    pub ca: String,
    /// PEM: this client's certificate.
    pub cert: String,
    /// PEM (PKCS#8): this client's private key.
    pub key: String,
    /// minisign public key that every bundle manifest must be signed with.
    pub release_pub: String,
    /// Other `https://` URLs of the same stager, tried in order while `stager` cannot be
    /// reached: a host enrolled through a site relay names the stager itself here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a valid identity file: {reason}")]
    Invalid { path: String, reason: String },
}

impl IdentityFile {
    pub fn parse(path: &Path, text: &str) -> Result<IdentityFile, Error> {
        let invalid = |reason: String| Error::Invalid {
            path: path.display().to_string(),
            reason,
        };
        let f: IdentityFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if f.format != FORMAT {
            return Err(invalid(format!(
                "format {} is not supported (this program reads format {FORMAT})",
                f.format
            )));
        }
        for (field, url) in
            std::iter::once(("stager", &f.stager)).chain(f.fallback.iter().map(|u| ("fallback", u)))
        {
            if !url.starts_with("https://") {
                return Err(invalid(format!("{field} {url:?} is not an https:// URL")));
            }
        }
        Ok(f)
    }

    /// The stager's URLs in the order to try them: `stager`, then each `fallback`, without a
    /// trailing `/`.
    pub fn urls(&self) -> Vec<&str> {
        std::iter::once(self.stager.as_str())
            .chain(self.fallback.iter().map(String::as_str))
            .map(|u| u.trim_end_matches('/'))
            .collect()
    }

    pub fn load(path: &Path) -> Result<IdentityFile, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn to_toml(&self) -> String {
        format!(
            "# reinstall identity: {} {} for stager {}\n# Keep it secret: it holds a private key.\n{}",
            self.role.as_str(),
            self.name,
            self.stager,
            toml::to_string(self).expect("identity serializes")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../tests/fixtures/identity-v1.toml");

    #[test]
    fn v1_fixture_parses_and_round_trips() {
        let f = IdentityFile::parse(Path::new("fixture"), FIXTURE).unwrap();
        assert_eq!((f.name.as_str(), f.role), ("web1", Role::Agent));
        let again = IdentityFile::parse(Path::new("again"), &f.to_toml()).unwrap();
        assert_eq!(again, f);
    }

    #[test]
    fn wrong_format_or_url_is_refused_with_the_path() {
        let newer = FIXTURE.replace("format = 1", "format = 2");
        let e = IdentityFile::parse(Path::new("/etc/x.toml"), &newer).unwrap_err();
        assert!(e.to_string().contains("/etc/x.toml") && e.to_string().contains("format 2"));
        let http = FIXTURE.replace("https://", "http://");
        assert!(IdentityFile::parse(Path::new("x"), &http).is_err());
        let fallback = format!("{FIXTURE}fallback = [\"http://stager:8443\"]\n");
        let e = IdentityFile::parse(Path::new("x"), &fallback).unwrap_err();
        assert!(e.to_string().contains("fallback"), "{e}");
    }

    /// An identity through a relay names the stager as its fallback, and keeps it.
    #[test]
    fn a_fallback_url_round_trips() {
        let mut f = IdentityFile::parse(Path::new("fixture"), FIXTURE).unwrap();
        assert!(f.fallback.is_empty());
        f.fallback = vec!["https://stager.example:8443".into()];
        let again = IdentityFile::parse(Path::new("again"), &f.to_toml()).unwrap();
        assert_eq!(again, f);
    }
}
