//! Plumbing for the overlapped pipelines: bounded channels of byte chunks that look like
//! `Read`/`Write` to the stages on either side, so that hashing, decryption, decompression and
//! unpacking each run on their own thread (this matters on a 2-core machine: the unpacker is
//! bound by syscalls, the others by CPU).

use sha2::{Digest, Sha256};
use std::io::{self, BufRead, Read, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

/// Size of the chunks passed between stages.
pub const CHUNK: usize = 1 << 20;
/// Chunks in flight per channel: enough to ride out scheduling jitter, small enough to bound
/// memory to a few MiB.
const DEPTH: usize = 8;

pub type Chunk = io::Result<Vec<u8>>;

pub fn channel() -> (ChunkWriter, ChunkReader) {
    let (tx, rx) = sync_channel(DEPTH);
    // Spent chunks flow back to the producer for reuse: allocating and zeroing a fresh MiB per
    // chunk per stage cost several percent of an unpack (measured with perf).
    let (ret_tx, ret_rx) = sync_channel(DEPTH + 2);
    (
        ChunkWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
            spent: ret_rx,
        },
        ChunkReader {
            rx,
            cur: Vec::new(),
            pos: 0,
            done: false,
            spent: ret_tx,
        },
    )
}

/// The receiving end. An `Err` sent by the producer is returned by `read`, so a failure in an
/// earlier stage surfaces in the stage that consumes it.
pub struct ChunkReader {
    rx: Receiver<Chunk>,
    cur: Vec<u8>,
    pos: usize,
    done: bool,
    spent: SyncSender<Vec<u8>>,
}

impl BufRead for ChunkReader {
    /// Lends the current chunk itself: the decryptor and decompressor read straight from it,
    /// saving a copy per stage.
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.pos == self.cur.len() {
            if self.done {
                return Ok(&[]);
            }
            match self.rx.recv() {
                Ok(Ok(c)) => {
                    let old = std::mem::replace(&mut self.cur, c);
                    if old.capacity() >= CHUNK {
                        let _ = self.spent.try_send(old);
                    }
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                // The producer finished (dropped its sender) without error.
                Err(_) => {
                    self.done = true;
                    return Ok(&[]);
                }
            }
        }
        Ok(&self.cur[self.pos..])
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.cur.len());
    }
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = out.len().min(avail.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// The sending end: buffers writes into `CHUNK`-sized pieces. Dropping it without `finish`
/// still delivers what was buffered.
pub struct ChunkWriter {
    tx: SyncSender<Chunk>,
    buf: Vec<u8>,
    spent: Receiver<Vec<u8>>,
}

impl ChunkWriter {
    /// A `CHUNK`-long buffer to fill and [`send`](Self::send): a spent one if the consumer
    /// returned any, else a new one.
    pub fn buffer(&self) -> Vec<u8> {
        match self.spent.try_recv() {
            Ok(mut b) => {
                b.resize(CHUNK, 0);
                b
            }
            Err(_) => vec![0u8; CHUNK],
        }
    }

    /// Passes an error downstream (the consumer's next `read` returns it).
    pub fn fail(self, e: io::Error) {
        let _ = self.tx.send(Err(e));
    }

    /// Sends a whole chunk without copying it.
    pub fn send(&mut self, chunk: Vec<u8>) -> io::Result<()> {
        self.flush()?;
        self.tx.send(Ok(chunk)).map_err(|_| closed())
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the next pipeline stage stopped")
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let full = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
            self.tx.send(Ok(full)).map_err(|_| closed())?;
        }
        Ok(())
    }
}

impl Drop for ChunkWriter {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// Counts and hashes everything written through it.
pub struct HashWriter<W> {
    pub inner: W,
    hasher: Sha256,
    pub count: u64,
}

impl<W: Write> HashWriter<W> {
    pub fn new(inner: W) -> Self {
        HashWriter {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    pub fn finish(self) -> (W, String, u64) {
        (self.inner, hex(&self.hasher.finalize()), self.count)
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        self.hasher.update(&data[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Counts bytes read through it, and refuses to read past `limit`: the guard against a
/// decompression bomb sits right after the decompressor.
pub struct LimitReader<R> {
    pub inner: R,
    pub count: u64,
    pub limit: u64,
}

impl<R: Read> Read for LimitReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        self.count += n as u64;
        if self.count > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                LimitExceeded(format!(
                    "decompressed stream is over {} bytes, the manifest's contents.tar_size",
                    self.limit
                )),
            ));
        }
        Ok(n)
    }
}

/// Marker error carried through `io::Error` so that the caller can report a limit breach as
/// such rather than as a generic decompression failure.
#[derive(Debug)]
pub struct LimitExceeded(pub String);
impl std::fmt::Display for LimitExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for LimitExceeded {}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cross_threads_in_order_and_errors_propagate() {
        let (mut w, mut r) = channel();
        let t = std::thread::spawn(move || {
            for i in 0..3000u32 {
                w.write_all(&i.to_le_bytes()).unwrap();
            }
            w.flush().unwrap();
            w.fail(io::Error::other("boom"));
        });
        let mut got = vec![0u8; 12000];
        r.read_exact(&mut got).unwrap();
        assert_eq!(&got[4 * 2999..], &2999u32.to_le_bytes());
        assert_eq!(r.read(&mut [0u8; 4]).unwrap_err().to_string(), "boom");
        t.join().unwrap();
    }

    #[test]
    fn limit_reader_stops_at_the_first_byte_over() {
        let mut r = LimitReader {
            inner: &[0u8; 100][..],
            count: 0,
            limit: 99,
        };
        let e = io::copy(&mut r, &mut io::sink()).unwrap_err();
        assert!(e.to_string().contains("tar_size"));
    }
}
