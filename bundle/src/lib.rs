//! The bundle format shared by the stager (which builds bundles) and the agent (which verifies
//! and unpacks them). See DESIGN.md §4.
//!
//! A bundle is a signed manifest plus one payload blob:
//!
//! ```text
//! manifest.json            versioned JSON (`manifest::Manifest`)
//! manifest.json.minisig    minisign signature of manifest.json by the release key
//! payload.age              age(X25519)( zstd|gzip( tar ) ), named by its SHA-256
//! identity.txt             the bundle's own age identity (released only to agents with a job)
//! ```
//!
//! Every layer is readable with stock tools:
//! `minisign -Vm manifest.json -p release.pub` and
//! `age -d -i identity.txt payload.age | zstd -d | tar -tv`.

pub mod error;
pub mod failpoint;
pub mod manifest;
pub mod name;
pub mod pack;
pub mod payload;
pub mod pipe;
pub mod progress;
pub mod release;
pub mod tree;
pub mod unpack;
pub mod verify;
pub mod windows;

pub use error::{Error, Result};
pub use manifest::{Compression, Kind, Manifest, Os};
pub use name::BundleName;

/// File names inside an exported bundle directory.
pub const MANIFEST_FILE: &str = "manifest.json";
pub const SIGNATURE_FILE: &str = "manifest.json.minisig";
pub const PAYLOAD_FILE: &str = "payload.age";
pub const IDENTITY_FILE: &str = "identity.txt";
