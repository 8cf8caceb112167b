//! Operations on an exported bundle directory (`manifest.json`, `manifest.json.minisig`,
//! `payload.age`, `identity.txt`): verify it, and unpack it.
//!
//! Order of trust: the signature is checked first and nothing else is believed until it
//! passes; then the payload's size (before reading a byte of it); then, while streaming, its
//! hash, the age authentication of every 64 KiB chunk, the decompressed length and each tar
//! entry. An unpack writes [`INCOMPLETE_MARKER`](crate::tree::INCOMPLETE_MARKER) into the target
//! first and removes it only after every check passed and the filesystem was flushed.

use crate::error::io_err;
use crate::failpoint;
use crate::payload::{check_size, PayloadReader};
use crate::progress::Progress;
use crate::release::ReleasePublicKey;
use crate::tree::{self, Limits, NullSink, Sink, Stats};
use crate::unpack::{self, FsSink};
use crate::{Error, Manifest, Result, MANIFEST_FILE, PAYLOAD_FILE, SIGNATURE_FILE};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// A bundle directory whose manifest signature and payload size have been checked.
pub struct Signed {
    pub manifest: Manifest,
    pub payload: PathBuf,
}

/// Checks the signature (with the pinned release key), parses the manifest, and compares the
/// payload's size with it. Reads no payload bytes.
pub fn check_signed(dir: &Path, key: &ReleasePublicKey) -> Result<Signed> {
    let mpath = dir.join(MANIFEST_FILE);
    let spath = dir.join(SIGNATURE_FILE);
    let bytes = std::fs::read(&mpath).map_err(io_err("reading", &mpath))?;
    let sig = std::fs::read_to_string(&spath).map_err(io_err("reading", &spath))?;
    key.verify(&bytes, &sig, &mpath)?;
    let manifest = Manifest::parse(&mpath, &bytes)?;
    let payload = dir.join(PAYLOAD_FILE);
    let len = std::fs::metadata(&payload)
        .map_err(io_err("reading", &payload))?
        .len();
    check_size(&payload, &manifest, len)?;
    Ok(Signed { manifest, payload })
}

/// Checks a manifest's signature and parses it (for bundles arriving over the network; the
/// payload is checked while it streams). `what` names the manifest in errors.
pub fn check_manifest(
    bytes: &[u8],
    signature: &str,
    key: &ReleasePublicKey,
    what: &Path,
) -> Result<Manifest> {
    key.verify(bytes, signature, what)?;
    Manifest::parse(what, bytes)
}

/// Unpacks a payload arriving from `src` (a download) into `target`, with the same marker
/// protocol as [`unpack_into`]; the hash and size are checked as it streams.
pub fn unpack_stream(
    manifest: &Manifest,
    src: Box<dyn Read + Send>,
    what: &Path,
    identity: age::x25519::Identity,
    target: &Path,
    progress: &mut dyn Progress,
) -> Result<Stats> {
    unpack_marked(manifest, target, progress, || {
        PayloadReader::from_reader(src, what, manifest, identity)
    })
}

/// Hashes the payload and compares with the manifest (no key needed).
pub fn check_hash(s: &Signed, progress: &mut dyn Progress) -> Result<()> {
    let mut f = std::fs::File::open(&s.payload).map_err(io_err("opening", &s.payload))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io_err("reading", &s.payload))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        done += n as u64;
        progress.update("hash", done, Some(s.manifest.payload.size), 0);
    }
    progress.finish();
    let actual = crate::pipe::hex(&h.finalize());
    if actual != s.manifest.payload.sha256 {
        return Err(Error::PayloadHash {
            path: s.payload.clone(),
            expected: s.manifest.payload.sha256.clone(),
            actual,
        });
    }
    Ok(())
}

/// Hashes the payload, then decrypts and reads it whole without writing anything: age
/// authentication, decompressed length, every entry's path and link, entry count and sizes
/// against the manifest. Two passes, so that a tampered blob is always reported as such.
pub fn check_contents(
    s: &Signed,
    identity: age::x25519::Identity,
    progress: &mut dyn Progress,
) -> Result<Stats> {
    check_hash(s, progress)?;
    run(s, identity, &mut NullSink, "check", progress)
}

/// Unpacks a verified bundle into `target` (see the module docs for the marker protocol).
pub fn unpack_into(
    s: &Signed,
    identity: age::x25519::Identity,
    target: &Path,
    progress: &mut dyn Progress,
) -> Result<Stats> {
    unpack_marked(&s.manifest, target, progress, || {
        PayloadReader::open(&s.payload, &s.manifest, identity)
    })
}

/// The marker protocol around one unpack: mark, stream, finish directories, flush, unmark.
fn unpack_marked(
    m: &Manifest,
    target: &Path,
    progress: &mut dyn Progress,
    open: impl FnOnce() -> Result<PayloadReader>,
) -> Result<Stats> {
    unpack::prepare_target(target)?;
    unpack::mark_incomplete(target, &m.id())?;
    failpoint::hit("unpack-marked");
    let result = FsSink::new(target).and_then(|mut sink| {
        let stats = walk_payload(m, open()?, &mut sink, "unpack", progress)?;
        sink.finish_dirs()?;
        failpoint::hit("unpack-before-complete");
        sink.sync()?;
        unpack::mark_complete(target)?;
        sink.finish_root()?;
        unpack::sync_dir(target)?;
        Ok(stats)
    });
    if let Err(e) = &result {
        unpack::note_failure(target, &e.to_string());
    }
    result
}

/// Streams a verified bundle's entries, each checked, into `sink` (an installer that is not
/// a directory tree: a Windows target). The caller trusts what the sink built only after
/// this returns `Ok`: the hash and lengths are checked at the end of the stream.
pub fn run(
    s: &Signed,
    identity: age::x25519::Identity,
    sink: &mut dyn Sink,
    phase: &str,
    progress: &mut dyn Progress,
) -> Result<Stats> {
    let m = &s.manifest;
    let reader = PayloadReader::open(&s.payload, m, identity)?;
    walk_payload(m, reader, sink, phase, progress)
}

fn walk_payload(
    m: &Manifest,
    mut reader: PayloadReader,
    sink: &mut dyn Sink,
    phase: &str,
    progress: &mut dyn Progress,
) -> Result<Stats> {
    let limits = Limits {
        entries: m.contents.entries,
        unpacked_size: m.contents.unpacked_size,
    };
    let total = Some(m.contents.unpacked_size);
    let walked = tree::walk(&mut reader, limits, sink, &mut |st| {
        progress.update(phase, st.unpacked_size, total, st.entries)
    });
    let stats = match walked {
        Ok(st) => st,
        Err(e) => return Err(reader.abort(e)),
    };
    reader.finish()?;
    progress.finish();
    if stats.entries != m.contents.entries || stats.unpacked_size != m.contents.unpacked_size {
        return Err(Error::Mismatch(format!(
            "it holds {} entries and {} bytes, the manifest says {} and {}",
            stats.entries, stats.unpacked_size, m.contents.entries, m.contents.unpacked_size
        )));
    }
    Ok(stats)
}
