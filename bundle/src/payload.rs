//! The payload blob: `age( compress( tar ) )`, and the overlapped pipelines that write and read
//! it.
//!
//! Reading runs three stages on three threads joined by bounded channels:
//! `file → SHA-256 + size` | `age decrypt → decompress → tar_size limit` | the consumer (tar walk).
//! Any stage's failure stops the others; [`PayloadReader::finish`] reports the root cause
//! (a decryption failure, not the tar error it provoked).

use crate::manifest::{Compression, Manifest};
use crate::pipe::{self, ChunkReader, HashWriter, LimitExceeded, LimitReader};
use crate::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::thread::JoinHandle;

/// A bundle's age identity (X25519).
pub use age::x25519::Identity as AgeIdentity;

/// Reads an age identity file (the `AGE-SECRET-KEY-1…` line; comments allowed).
pub fn load_identity(path: &Path) -> Result<age::x25519::Identity> {
    let text = std::fs::read_to_string(path).map_err(crate::error::io_err("reading", path))?;
    parse_identity(&text).map_err(|reason| Error::Key {
        path: path.to_path_buf(),
        reason,
    })
}

pub fn parse_identity(text: &str) -> std::result::Result<age::x25519::Identity, String> {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or("no AGE-SECRET-KEY line")?;
    age::x25519::Identity::from_str(line).map_err(|e| format!("not an age X25519 identity: {e}"))
}

/// Renders an identity file as `age-keygen` does, so stock `age -d -i` reads it.
pub fn identity_file_text(id: &age::x25519::Identity) -> String {
    use age::secrecy::ExposeSecret;
    format!(
        "# public key: {}\n{}\n",
        id.to_public(),
        id.to_string().expose_secret()
    )
}

/// The write side: everything written is compressed, encrypted, hashed and counted.
pub struct PayloadWriter<W: Write> {
    inner: Compressor<age::stream::StreamWriter<HashWriter<W>>>,
    tar_size: u64,
}

enum Compressor<W: Write> {
    Zstd(zstd::stream::write::Encoder<'static, W>),
    Gzip(flate2::write::GzEncoder<W>),
}

/// What was written: the blob's hash and size, and the size of the tar stream inside.
pub struct Written<W> {
    pub out: W,
    pub sha256: String,
    pub size: u64,
    pub tar_size: u64,
}

impl<W: Write> PayloadWriter<W> {
    pub fn new(
        out: W,
        recipients: &[age::x25519::Recipient],
        compression: Compression,
        level: Option<i32>,
    ) -> Result<Self> {
        // Any one of the recipients' identities opens it (age's own rule).
        let encryptor =
            age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
                .map_err(|e| Error::Invalid(format!("age: {e}")))?;
        let enc = encryptor
            .wrap_output(HashWriter::new(out))
            .map_err(|e| Error::Invalid(format!("age: {e}")))?;
        let inner = match compression {
            Compression::Zstd => {
                let mut z = zstd::stream::write::Encoder::new(enc, level.unwrap_or(3))
                    .map_err(|e| Error::Invalid(format!("zstd: {e}")))?;
                let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
                z.multithread(threads as u32)
                    .map_err(|e| Error::Invalid(format!("zstd: {e}")))?;
                Compressor::Zstd(z)
            }
            Compression::Gzip => {
                let lvl = level.unwrap_or(6).clamp(0, 9) as u32;
                Compressor::Gzip(flate2::write::GzEncoder::new(
                    enc,
                    flate2::Compression::new(lvl),
                ))
            }
        };
        Ok(PayloadWriter { inner, tar_size: 0 })
    }

    pub fn tar_size(&self) -> u64 {
        self.tar_size
    }

    pub fn finish(self) -> io::Result<Written<W>> {
        let enc = match self.inner {
            Compressor::Zstd(z) => z.finish()?,
            Compressor::Gzip(g) => g.finish()?,
        };
        let hw = enc.finish()?;
        let (out, sha256, size) = hw.finish();
        Ok(Written {
            out,
            sha256,
            size,
            tar_size: self.tar_size,
        })
    }
}

impl<W: Write> Write for PayloadWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = match &mut self.inner {
            Compressor::Zstd(z) => z.write(data)?,
            Compressor::Gzip(g) => g.write(data)?,
        };
        self.tar_size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            Compressor::Zstd(z) => z.flush(),
            Compressor::Gzip(g) => g.flush(),
        }
    }
}

/// The read side: a `Read` of the decompressed tar stream, fed by two worker threads.
pub struct PayloadReader {
    reader: Option<ChunkReader>,
    fetch: Option<JoinHandle<Result<Fetched>>>,
    /// The decrypted length, if the stream was read to its end.
    decrypt: Option<JoinHandle<Result<Option<u64>>>>,
    /// The decompressed length, if the stream was read to its end.
    decode: Option<JoinHandle<Result<Option<u64>>>>,
    path: PathBuf,
    manifest: Manifest,
}

impl PayloadReader {
    /// Starts reading the blob at `path`. Its size is checked against the manifest before any
    /// byte is decrypted; its hash when the stream ends ([`finish`](Self::finish)).
    pub fn open(path: &Path, manifest: &Manifest, identity: age::x25519::Identity) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(crate::error::io_err("opening", path))?;
        let len = file
            .metadata()
            .map_err(crate::error::io_err("reading metadata of", path))?
            .len();
        check_size(path, manifest, len)?;
        Self::from_reader(Box::new(file), path, manifest, identity)
    }

    /// As [`open`](Self::open) for a blob arriving from any reader (a download).
    pub fn from_reader(
        mut src: Box<dyn Read + Send>,
        path: &Path,
        manifest: &Manifest,
        identity: age::x25519::Identity,
    ) -> Result<Self> {
        let (mut w1, r1) = pipe::channel();
        let (w2, r2) = pipe::channel();
        let expected = manifest.payload.size;
        let p = path.to_path_buf();
        let fetch = std::thread::spawn(move || -> Result<Fetched> {
            let mut h = Sha256::new();
            let mut n = 0u64;
            loop {
                let mut buf = w1.buffer();
                let got = match read_full(&mut src, &mut buf) {
                    Ok(g) => g,
                    Err(e) => {
                        w1.fail(io::Error::new(e.kind(), e.to_string()));
                        return Err(Error::io("reading", p, e));
                    }
                };
                if got == 0 {
                    break;
                }
                n += got as u64;
                if n > expected {
                    w1.fail(io::Error::other("payload is longer than the manifest says"));
                    return Err(Error::PayloadSize {
                        path: p,
                        expected,
                        actual: n,
                    });
                }
                buf.truncate(got);
                h.update(&buf);
                if w1.send(buf).is_err() {
                    // The consumer stopped; it reports why.
                    return Ok(Fetched {
                        sha256: None,
                        size: n,
                    });
                }
            }
            Ok(Fetched {
                sha256: Some(pipe::hex(&h.finalize())),
                size: n,
            })
        });
        // Decryption and decompression get a thread each: on 2 cores one thread doing both
        // was the bottleneck (measured: scripts/bench-unpack).
        let (w_plain, r_plain) = pipe::channel();
        let p = path.to_path_buf();
        let decrypt = std::thread::spawn(move || -> Result<Option<u64>> {
            let fail = |w: pipe::ChunkWriter, e: Error| {
                w.fail(io::Error::other(e.to_string()));
                Err(e)
            };
            let decryptor = match age::Decryptor::new_buffered(r1) {
                Ok(d) => d,
                Err(e) => return fail(w_plain, decrypt_error(&p, e.to_string())),
            };
            let plain = match decryptor.decrypt(std::iter::once(&identity as &dyn age::Identity)) {
                Ok(r) => r,
                Err(e) => return fail(w_plain, decrypt_error(&p, e.to_string())),
            };
            let mut w = w_plain;
            pump(plain, &mut w).or_else(|e| fail(w, decrypt_error(&p, e.to_string())))
        });
        let compression = manifest.payload.compression;
        let tar_size = manifest.contents.tar_size;
        let p = path.to_path_buf();
        let decode = std::thread::spawn(move || -> Result<Option<u64>> {
            let fail = |w: pipe::ChunkWriter, e: Error| {
                w.fail(io::Error::other(e.to_string()));
                Err(e)
            };
            let decompressed: Box<dyn Read> = match compression {
                Compression::Zstd => match zstd::stream::read::Decoder::with_buffer(r_plain) {
                    Ok(d) => Box::new(d),
                    Err(e) => return fail(w2, decompress_error(&p, compression, e.to_string())),
                },
                Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(r_plain)),
            };
            let limited = LimitReader {
                inner: decompressed,
                count: 0,
                limit: tar_size,
            };
            let mut w = w2;
            pump(limited, &mut w).or_else(|e| {
                let err = match e.get_ref().and_then(|i| i.downcast_ref::<LimitExceeded>()) {
                    Some(l) => Error::Limit(l.0.clone()),
                    None => decompress_error(&p, compression, e.to_string()),
                };
                fail(w, err)
            })
        });
        Ok(PayloadReader {
            reader: Some(r2),
            fetch: Some(fetch),
            decrypt: Some(decrypt),
            decode: Some(decode),
            path: path.to_path_buf(),
            manifest: manifest.clone(),
        })
    }

    /// Reads the rest of the stream, waits for the workers, and checks size, hash and the
    /// decompressed length against the manifest. Only after this returns `Ok` may anything
    /// built from the stream be trusted.
    pub fn finish(mut self) -> Result<()> {
        if let Some(mut r) = self.reader.take() {
            // The tar end marker may be followed by padding; read it so the whole blob is
            // authenticated and hashed.
            let drained = io::copy(&mut r, &mut io::sink());
            drop(r);
            self.join_workers()?;
            drained.map_err(|e| Error::Tar(e.to_string()))?;
        }
        Ok(())
    }

    /// Stops the pipeline after the consumer failed with `consumer_err`, and returns the root
    /// cause: an earlier stage's error if there was one.
    pub fn abort(mut self, consumer_err: Error) -> Error {
        drop(self.reader.take());
        match self.join_workers() {
            Err(e) => e,
            Ok(()) => consumer_err,
        }
    }

    fn join_workers(&mut self) -> Result<()> {
        let decoded = self.decode.take().map(join);
        let decrypted = self.decrypt.take().map(join);
        let fetched = self.fetch.take().map(join);
        // Report the earliest stage's failure first: it caused the later ones. A blob that
        // does not match its signed manifest is the root cause of anything after it.
        let f = match fetched {
            Some(Ok(v)) => v,
            Some(Err(e)) => return Err(e),
            None => return Ok(()),
        };
        let m = &self.manifest;
        if let Some(sha) = f.sha256 {
            check_size(&self.path, m, f.size)?;
            if sha != m.payload.sha256 {
                return Err(Error::PayloadHash {
                    path: self.path.clone(),
                    expected: m.payload.sha256.clone(),
                    actual: sha,
                });
            }
        }
        decrypted.transpose()?;
        let tar_bytes = decoded.transpose()?.flatten();
        if let Some(tar_bytes) = tar_bytes.filter(|n| *n != m.contents.tar_size) {
            return Err(Error::Mismatch(format!(
                "decompressed stream is {tar_bytes} bytes, the manifest's contents.tar_size is {}",
                m.contents.tar_size
            )));
        }
        Ok(())
    }
}

impl Read for PayloadReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.reader {
            Some(r) => r.read(buf),
            None => Ok(0),
        }
    }
}

impl io::BufRead for PayloadReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        match &mut self.reader {
            Some(r) => r.fill_buf(),
            None => Ok(&[]),
        }
    }
    fn consume(&mut self, n: usize) {
        if let Some(r) = &mut self.reader {
            r.consume(n)
        }
    }
}

impl Drop for PayloadReader {
    fn drop(&mut self) {
        drop(self.reader.take());
        let _ = self.join_workers();
    }
}

/// What the fetch stage saw: the hash only if it read the blob to its end.
struct Fetched {
    sha256: Option<String>,
    size: u64,
}

fn join<T>(h: JoinHandle<Result<T>>) -> Result<T> {
    h.join()
        .unwrap_or_else(|_| Err(Error::Invalid("a pipeline thread panicked".into())))
}

pub fn check_size(path: &Path, m: &Manifest, actual: u64) -> Result<()> {
    if actual != m.payload.size {
        return Err(Error::PayloadSize {
            path: path.to_path_buf(),
            expected: m.payload.size,
            actual,
        });
    }
    Ok(())
}

fn decrypt_error(path: &Path, reason: String) -> Error {
    Error::Decrypt {
        path: path.to_path_buf(),
        reason,
    }
}

fn decompress_error(path: &Path, c: Compression, reason: String) -> Error {
    Error::Decompress {
        path: path.to_path_buf(),
        compression: c.as_str(),
        reason,
    }
}

/// Moves a stream into the next stage in `CHUNK`s. Returns the byte count if the stream was
/// read to its end, `None` if the next stage stopped first (it reports why).
fn pump(mut r: impl Read, w: &mut pipe::ChunkWriter) -> io::Result<Option<u64>> {
    let mut count = 0u64;
    loop {
        let mut buf = w.buffer();
        let n = read_full(&mut r, &mut buf)?;
        if n == 0 {
            return Ok(Some(count));
        }
        count += n as u64;
        buf.truncate(n);
        if w.send(buf).is_err() {
            return Ok(None);
        }
    }
}

/// Fills `buf` unless the reader ends first; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
