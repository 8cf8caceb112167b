//! Typed errors. Each names the file, entry or field it is about, and says whether retrying
//! could help (it never does for a bad bundle: the bytes will not change).

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("signature of {path} does not verify with the release key: {reason}")]
    Signature { path: PathBuf, reason: String },
    #[error("manifest {path}: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error("payload {path}: size is {actual} bytes, the manifest says {expected}")]
    PayloadSize {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("payload {path}: SHA-256 is {actual}, the manifest says {expected}")]
    PayloadHash {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("payload {path}: cannot decrypt: {reason}")]
    Decrypt { path: PathBuf, reason: String },
    #[error("payload {path}: cannot decompress ({compression}): {reason}")]
    Decompress {
        path: PathBuf,
        compression: &'static str,
        reason: String,
    },
    #[error("payload: tar entry {entry:?}: {reason}")]
    Entry { entry: String, reason: String },
    #[error("payload: {0}")]
    Tar(String),
    #[error("payload exceeds the manifest: {0} (a decompression bomb, or a manifest that lies)")]
    Limit(String),
    #[error("payload does not match its manifest: {0}")]
    Mismatch(String),
    #[error("key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Whether trying the same thing again could succeed. Only I/O errors (a full disk, a
    /// flaky device) can; a bundle that fails verification fails the same way every time.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Io { .. })
    }
}

/// `.map_err(io_err("reading", path))`
pub fn io_err<'a>(
    op: &'static str,
    path: impl Into<PathBuf> + 'a,
) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |e| Error::io(op, path, e)
}
