//! Getting blobs from the stager: resumable (HTTP `Range`), with progress reported as bytes.
//! Waiting out an unreachable stager is the client's job (`Client::retrying`); this module
//! adds what only a download needs: asking again from the byte a cut body stopped at.

use crate::client::{backoff, Client};
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

/// How long the agent keeps retrying an unreachable stager before giving up on a transfer.
pub const RETRY_FOR: Duration = Duration::from_secs(600);

/// A reader over a blob that survives cut connections: when a body ends early or fails, it
/// asks again from the byte it stopped at (`Range: bytes=N-`), with backoff, for up to
/// [`RETRY_FOR`]. (Each request itself waits out an unreachable stager in the client.)
pub struct Resuming {
    client: Client,
    path: String,
    pub offset: u64,
    total: u64,
    inner: Option<Box<dyn Read + Send>>,
}

impl Resuming {
    pub fn new(client: &Client, path: &str, offset: u64, total: u64) -> Self {
        Resuming {
            client: client.clone(),
            path: path.to_string(),
            offset,
            total,
            inner: None,
        }
    }

    fn say(&self, what: &str) {
        eprintln!(
            "reinstall: {} {what} at byte {} of {}; asking for the rest from there",
            self.path, self.offset, self.total
        );
    }
}

impl Read for Resuming {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.offset >= self.total {
            return Ok(0);
        }
        let start = std::time::Instant::now();
        let mut attempt = 0;
        loop {
            if self.inner.is_none() {
                let r = self
                    .client
                    .get_range(&self.path, self.offset)
                    .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
                self.inner = Some(r);
            }
            match self.inner.as_mut().expect("set above").read(buf) {
                Ok(0) => {
                    // The server ended early: ask for the rest.
                    if attempt == 0 {
                        self.say("ended early");
                    }
                    self.inner = None;
                    if start.elapsed() >= RETRY_FOR {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "blob cut short",
                        ));
                    }
                    std::thread::sleep(backoff(attempt));
                    attempt += 1;
                }
                Ok(n) => {
                    let n = n.min((self.total - self.offset) as usize);
                    self.offset += n as u64;
                    return Ok(n);
                }
                Err(e) if start.elapsed() < RETRY_FOR => {
                    if attempt == 0 {
                        self.say(&format!("failed ({e})"));
                    }
                    self.inner = None;
                    std::thread::sleep(backoff(attempt));
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Downloads a blob into `dest`, resuming a partial file, and checks its SHA-256. A complete
/// file with the right hash is left alone (idempotent).
pub fn fetch_to_file(
    client: &Client,
    sha256: &str,
    size: u64,
    dest: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let have = std::fs::metadata(dest).map(|m| m.len()).unwrap_or(0);
    if have > size {
        std::fs::remove_file(dest)?;
        return fetch_to_file(client, sha256, size, dest, progress);
    }
    // Hash what is already there, then continue from its end.
    let mut h = Sha256::new();
    if have > 0 {
        let mut f = std::fs::File::open(dest)?;
        std::io::copy(&mut f, &mut h)?;
    }
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dest)
        .with_context(|| format!("opening {}", dest.display()))?;
    let mut r = Resuming::new(client, &format!("/v1/blobs/{sha256}"), have, size);
    let mut buf = vec![0u8; 1 << 20];
    let mut done = have;
    loop {
        let n = r
            .read(&mut buf)
            .with_context(|| format!("downloading blob {sha256}"))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])
            .with_context(|| format!("writing {}", dest.display()))?;
        h.update(&buf[..n]);
        done += n as u64;
        progress(done, size);
        bundle::failpoint::hit("fetch-chunk");
    }
    out.sync_all()?;
    let got = bundle::pipe::hex(&h.finalize());
    if got != sha256 {
        std::fs::remove_file(dest)?;
        bail!("blob {sha256} arrived with SHA-256 {got}; removed, it will be fetched again");
    }
    Ok(())
}
