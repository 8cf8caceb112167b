//! The bundle manifest: versioned JSON, signed by the release key.
//!
//! Compatibility rule: `manifest_version` changes whenever a field is added, removed or changes
//! meaning. Parsing is strict (unknown fields are refused) because a field this agent does not
//! understand might be one it must obey; a newer manifest gets a clear "upgrade the agent"
//! error instead of being half-understood. Older versions are upconverted in [`Manifest::parse`]
//! only, and each version is pinned by a fixture file under `bundle/tests/fixtures/`.

use crate::{BundleName, Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const MANIFEST_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Rescue,
    Target,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Os {
    Linux,
    Windows,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Zstd,
    Gzip,
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::Gzip => "gzip",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub manifest_version: u32,
    pub name: String,
    pub version: String,
    pub kind: Kind,
    pub os: Os,
    /// Machine architecture as the kernel names it (`uname -m`): `x86_64`, `aarch64`.
    pub arch: String,
    /// RFC 3339, UTC, seconds.
    pub created: String,
    pub payload: Payload,
    pub contents: Contents,
}

/// The blob as stored and transferred.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// Lower-case hex SHA-256 of the blob's bytes; also its name in the store.
    pub sha256: String,
    pub size: u64,
    pub compression: Compression,
    /// Always `age-x25519` in version 1.
    pub encryption: String,
}

/// What is inside the blob. The unpacker enforces these as hard limits, so a payload that
/// decompresses to more than it claims is stopped at the first byte over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contents {
    /// Bytes of the decompressed tar stream.
    pub tar_size: u64,
    /// Sum of the data sizes of all entries.
    pub unpacked_size: u64,
    /// Number of tar entries (PAX and GNU long-name headers are not counted).
    pub entries: u64,
}

pub const ENCRYPTION_AGE_X25519: &str = "age-x25519";

impl Manifest {
    /// Parses and validates manifest bytes. `path` is only used in error messages.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Manifest> {
        let bad = |reason: String| Error::Manifest {
            path: path.to_path_buf(),
            reason,
        };
        #[derive(Deserialize)]
        struct Probe {
            manifest_version: Option<u32>,
        }
        let probe: Probe =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        match probe.manifest_version {
            Some(MANIFEST_VERSION) => {}
            Some(v) if v > MANIFEST_VERSION => {
                return Err(bad(format!(
                    "manifest_version {v} is newer than this program understands ({MANIFEST_VERSION}); upgrade it"
                )))
            }
            Some(v) => return Err(bad(format!("manifest_version {v} is not supported"))),
            None => return Err(bad("manifest_version is missing".into())),
        }
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        m.validate().map_err(bad)?;
        Ok(m)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        BundleName::parse("name", &self.name).map_err(|e| e.to_string())?;
        BundleName::parse("version", &self.version).map_err(|e| e.to_string())?;
        let h = &self.payload.sha256;
        if h.len() != 64 || !h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(format!(
                "payload.sha256 {h:?} is not 64 lower-case hex digits"
            ));
        }
        if self.payload.encryption != ENCRYPTION_AGE_X25519 {
            return Err(format!(
                "payload.encryption {:?} is not supported (only {ENCRYPTION_AGE_X25519})",
                self.payload.encryption
            ));
        }
        if self.contents.unpacked_size > self.contents.tar_size {
            return Err("contents.unpacked_size is larger than contents.tar_size".into());
        }
        Ok(())
    }

    /// The canonical bytes that get signed and stored: pretty JSON with a final newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("manifest serializes");
        v.push(b'\n');
        v
    }

    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE_V1: &[u8] = include_bytes!("../tests/fixtures/manifest-v1.json");

    #[test]
    fn v1_fixture_parses_and_reserializes_byte_identical() {
        let m = Manifest::parse(Path::new("fixture"), FIXTURE_V1).unwrap();
        assert_eq!(m.name, "debian-rescue");
        assert_eq!(m.kind, Kind::Rescue);
        assert_eq!(m.payload.compression, Compression::Zstd);
        assert_eq!(m.to_bytes(), FIXTURE_V1);
    }

    #[test]
    fn newer_version_asks_for_an_upgrade() {
        let s = String::from_utf8(FIXTURE_V1.to_vec())
            .unwrap()
            .replace("\"manifest_version\": 1", "\"manifest_version\": 7");
        let e = Manifest::parse(Path::new("m.json"), s.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("upgrade"), "{e}");
    }

    #[test]
    fn unknown_fields_and_bad_hashes_are_refused() {
        let s = String::from_utf8(FIXTURE_V1.to_vec()).unwrap();
        let extra = s.replace("\"arch\"", "\"boot_hook\": \"x\",\n  \"arch\"");
        assert!(Manifest::parse(Path::new("m"), extra.as_bytes()).is_err());
        let m = Manifest::parse(Path::new("m"), FIXTURE_V1).unwrap();
        let upper = s.replace(&m.payload.sha256, &m.payload.sha256.to_uppercase());
        let e = Manifest::parse(Path::new("m"), upper.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("payload.sha256"), "{e}");
        let escape = s.replace("\"debian-rescue\"", "\"../x\"");
        assert!(Manifest::parse(Path::new("m"), escape.as_bytes()).is_err());
    }
}
