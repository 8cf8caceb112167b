//! Building a payload: a directory tree (or an existing tarball) → tar → compress → age.
//!
//! The directory walker writes what an OS tree needs and what the `tar` crate's own
//! `append_dir_all` leaves out: numeric owners, setuid/setgid/sticky bits, hard links as links
//! (same inode after unpack), device nodes and FIFOs as such, extended attributes and POSIX
//! ACLs as PAX `SCHILY.xattr.*` records (the form GNU tar and libarchive read), long and
//! non-UTF-8 names (GNU long-name records), and every directory with its own mtime. Entries
//! are sorted by name so that the same tree gives the same tar stream. Sockets are skipped,
//! as GNU tar does; the walk does not descend into other mounted filesystems (their mount
//! point directory is kept), as `tar --one-file-system` does.
//!
//! An existing tarball is passed through byte for byte (so nothing a vendor put in it is
//! lost), while the same walker the agent uses reads it alongside and refuses, at build time,
//! anything the agent would refuse at install time.

use crate::error::io_err;
use crate::manifest::Compression;
use crate::payload::{PayloadWriter, Written};
use crate::progress::Progress;
use crate::tree::{self, Limits, NullSink, Stats};
use crate::{Error, Result};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// What to pack.
pub enum Source {
    Dir(PathBuf),
    Tar(PathBuf, Compression),
    PlainTar(PathBuf),
}

impl Source {
    /// A directory, or a `.tar`, `.tar.gz`/`.tgz`, `.tar.zst`/`.tzst` file.
    pub fn detect(path: &Path) -> Result<Source> {
        let md = std::fs::metadata(path).map_err(io_err("reading", path))?;
        if md.is_dir() {
            return Ok(Source::Dir(path.to_path_buf()));
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        let p = path.to_path_buf();
        if name.ends_with(".tar") {
            Ok(Source::PlainTar(p))
        } else if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
            Ok(Source::Tar(p, Compression::Gzip))
        } else if name.ends_with(".tar.zst") || name.ends_with(".tzst") {
            Ok(Source::Tar(p, Compression::Zstd))
        } else {
            Err(Error::Invalid(format!(
                "{}: not a directory, .tar, .tar.gz or .tar.zst",
                path.display()
            )))
        }
    }
}

pub struct Packed<W> {
    pub written: Written<W>,
    pub stats: Stats,
}

/// Packs `src` into `out` as an encrypted, compressed payload.
pub fn pack<W: Write>(
    src: &Source,
    out: W,
    recipients: &[age::x25519::Recipient],
    compression: Compression,
    level: Option<i32>,
    progress: &mut dyn Progress,
) -> Result<Packed<W>> {
    let mut pw = PayloadWriter::new(out, recipients, compression, level)?;
    let stats = match src {
        Source::Dir(root) => {
            let mut b = tar::Builder::new(&mut pw);
            let stats = TreeWriter::new(root)?.write(&mut b, progress)?;
            b.finish()
                .map_err(|e| Error::io("writing payload for", root, e))?;
            drop(b);
            stats
        }
        Source::Tar(p, c) => {
            let f = File::open(p).map_err(io_err("opening", p))?;
            let r: Box<dyn Read> = match c {
                Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(f))),
                Compression::Zstd => Box::new(
                    zstd::stream::read::Decoder::new(f).map_err(io_err("decompressing", p))?,
                ),
            };
            import(r, p, &mut pw, progress)?
        }
        Source::PlainTar(p) => {
            let f = File::open(p).map_err(io_err("opening", p))?;
            import(Box::new(f), p, &mut pw, progress)?
        }
    };
    let written = pw
        .finish()
        .map_err(|e| Error::Invalid(format!("finishing payload: {e}")))?;
    progress.finish();
    Ok(Packed { written, stats })
}

/// Copies a tar stream through unchanged while checking it with the agent's walker.
fn import<W: Write>(
    r: Box<dyn Read>,
    path: &Path,
    out: &mut PayloadWriter<W>,
    progress: &mut dyn Progress,
) -> Result<Stats> {
    // The tee writes every byte as it is read; bytes the BufReader holds but the walker never
    // consumed have been written already, so the rest is copied from the tee's own source.
    let mut br = BufReader::with_capacity(1 << 20, Tee { r, w: &mut *out });
    let stats = tree::walk(&mut br, Limits::NONE, &mut NullSink, &mut |s| {
        progress.update("import", s.unpacked_size, None, s.entries)
    })
    .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    // Whatever follows the end-of-archive marker (padding) is part of the stream too.
    let mut tee = br.into_inner();
    io::copy(&mut tee.r, tee.w).map_err(io_err("reading", path))?;
    Ok(stats)
}

struct Tee<'a, W: Write> {
    r: Box<dyn Read>,
    w: &'a mut W,
}

impl<W: Write> Read for Tee<'_, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.r.read(buf)?;
        self.w.write_all(&buf[..n])?;
        Ok(n)
    }
}

struct TreeWriter {
    root: PathBuf,
    root_dev: u64,
    /// (dev, inode) → first archived path, for hard links.
    links: HashMap<(u64, u64), PathBuf>,
    stats: Stats,
}

impl TreeWriter {
    fn new(root: &Path) -> Result<Self> {
        let md = std::fs::symlink_metadata(root).map_err(io_err("reading", root))?;
        Ok(TreeWriter {
            root: root.to_path_buf(),
            root_dev: md.dev(),
            links: HashMap::new(),
            stats: Stats::default(),
        })
    }

    fn write<W: Write>(
        mut self,
        b: &mut tar::Builder<W>,
        progress: &mut dyn Progress,
    ) -> Result<Stats> {
        // Depth-first, sorted; the stack holds relative paths still to visit.
        let mut stack = vec![PathBuf::new()];
        let mut bytes = 0u64;
        while let Some(rel) = stack.pop() {
            let abs = self.root.join(&rel);
            let md = std::fs::symlink_metadata(&abs).map_err(io_err("reading", &abs))?;
            let descend = self.append(b, &rel, &abs, &md)?;
            bytes += md.len();
            progress.update("pack", bytes, None, self.stats.entries);
            if descend {
                let mut names: Vec<_> = std::fs::read_dir(&abs)
                    .map_err(io_err("listing", &abs))?
                    .map(|e| e.map(|e| e.file_name()))
                    .collect::<io::Result<_>>()
                    .map_err(io_err("listing", &abs))?;
                names.sort_by(|a, b| b.as_bytes().cmp(a.as_bytes()));
                stack.extend(names.into_iter().map(|n| rel.join(n)));
            }
        }
        Ok(self.stats)
    }

    /// Appends one entry; returns whether to descend into it.
    fn append<W: Write>(
        &mut self,
        b: &mut tar::Builder<W>,
        rel: &Path,
        abs: &Path,
        md: &std::fs::Metadata,
    ) -> Result<bool> {
        let ft = md.file_type();
        if ft.is_socket() {
            return Ok(false);
        }
        let werr = |e| Error::io("archiving", abs, e);
        let xattrs = read_xattrs(abs)?;
        if !xattrs.is_empty() {
            let records: Vec<(String, &[u8])> = xattrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
                .collect();
            b.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v)))
                .map_err(werr)?;
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(md.mode() & 0o7777);
        h.set_uid(md.uid() as u64);
        h.set_gid(md.gid() as u64);
        h.set_mtime(md.mtime().max(0) as u64);
        h.set_size(0);
        // The root is written as `./`, as `tar -C DIR .` does.
        let name: &Path = if rel.as_os_str().is_empty() {
            Path::new("./")
        } else {
            rel
        };
        self.stats.entries += 1;
        if ft.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            b.append_data(&mut h, name, io::empty()).map_err(werr)?;
            return Ok(md.dev() == self.root_dev || rel.as_os_str().is_empty());
        }
        if md.nlink() > 1 {
            if let Some(first) = self.links.get(&(md.dev(), md.ino())) {
                h.set_entry_type(tar::EntryType::Link);
                b.append_link(&mut h, name, first).map_err(werr)?;
                return Ok(false);
            }
            self.links.insert((md.dev(), md.ino()), rel.to_path_buf());
        }
        if ft.is_file() {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(md.len());
            let f = File::open(abs).map_err(io_err("opening", abs))?;
            let exact = Exact {
                inner: f,
                left: md.len(),
                path: abs,
            };
            b.append_data(&mut h, name, exact).map_err(werr)?;
            self.stats.unpacked_size += md.len();
        } else if ft.is_symlink() {
            h.set_entry_type(tar::EntryType::Symlink);
            let target = std::fs::read_link(abs).map_err(io_err("reading link", abs))?;
            b.append_link(&mut h, name, target).map_err(werr)?;
        } else {
            let et = if ft.is_char_device() {
                tar::EntryType::Char
            } else if ft.is_block_device() {
                tar::EntryType::Block
            } else {
                tar::EntryType::Fifo
            };
            h.set_entry_type(et);
            if et != tar::EntryType::Fifo {
                let rdev = md.rdev();
                h.set_device_major(libc::major(rdev)).map_err(werr)?;
                h.set_device_minor(libc::minor(rdev)).map_err(werr)?;
            }
            b.append_data(&mut h, name, io::empty()).map_err(werr)?;
        }
        Ok(false)
    }
}

/// Yields exactly `left` bytes, or fails: a file that shrinks while it is archived must not
/// produce an archive whose header lies about its size.
struct Exact<'a> {
    inner: File,
    left: u64,
    path: &'a Path,
}

impl Read for Exact<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let max = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} shrank while it was being archived", self.path.display()),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// All extended attributes of `path` itself (not following a symlink), sorted by name.
pub fn read_xattrs(path: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("listing extended attributes of", path, e)),
    };
    let mut out = Vec::new();
    for n in names {
        let Some(name) = n.to_str() else {
            return Err(Error::Invalid(format!(
                "{}: extended attribute name {:?} is not UTF-8",
                path.display(),
                n
            )));
        };
        if let Some(v) =
            xattr::get(path, &n).map_err(io_err("reading extended attribute of", path))?
        {
            out.push((name.to_string(), v));
        }
    }
    out.sort();
    Ok(out)
}
