//! Reading a tar stream as untrusted input: every entry is parsed into a validated
//! [`Entry`] (a [`SafePath`] that cannot leave the root, a known type, metadata) and checked
//! against the stream so far and the manifest's [`Limits`] before a [`Sink`] sees it.
//!
//! One walker serves three callers: the unpacker (a sink that writes files), `verify`
//! (a sink that writes nothing), and the bundle builder importing a vendor tarball (which must
//! refuse the same things the agent would refuse, at build time rather than on a server).

use crate::{Error, Result};
use std::collections::HashSet;
use std::io::{BufRead, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Created in the unpack target before the first entry and removed after the last step has
/// been verified and flushed. A target that contains it is not usable. Entries with this name
/// are refused so that a payload cannot fake completion.
pub const INCOMPLETE_MARKER: &str = ".reinstall-incomplete";

/// A relative path with no `..`, no root, no empty or `.` components. The empty path is the
/// root of the tree itself (the tar entry `./`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SafePath(PathBuf);

impl SafePath {
    pub fn parse(raw: &[u8]) -> std::result::Result<SafePath, String> {
        if raw.contains(&0) {
            return Err("path contains a NUL byte".into());
        }
        if raw.first() == Some(&b'/') {
            return Err("absolute path".into());
        }
        let mut out = PathBuf::new();
        for comp in raw.split(|b| *b == b'/') {
            match comp {
                b"" | b"." => continue,
                b".." => return Err("path contains a `..` component".into()),
                c => out.push(std::ffi::OsStr::from_bytes(c)),
            }
        }
        Ok(SafePath(out))
    }

    pub fn as_path(&self) -> &Path {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0.as_os_str().is_empty()
    }

    /// Proper ancestors, outermost first, excluding the root.
    pub fn ancestors(&self) -> impl Iterator<Item = &Path> {
        let mut v: Vec<&Path> = self
            .0
            .ancestors()
            .skip(1)
            .filter(|p| !p.as_os_str().is_empty())
            .collect();
        v.reverse();
        v.into_iter()
    }

    pub fn display(&self) -> String {
        if self.is_root() {
            "./".into()
        } else {
            self.0.to_string_lossy().into_owned()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File,
    Symlink(Vec<u8>),
    /// A hard link to an earlier entry of the same stream.
    Hardlink(SafePath),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits including setuid/setgid/sticky (`& 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    /// Extended attributes (including `security.capability` and the POSIX ACLs
    /// `system.posix_acl_access`/`_default`), carried as PAX `SCHILY.xattr.NAME` records.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

pub struct Entry {
    pub path: SafePath,
    pub kind: EntryKind,
    pub meta: Meta,
    pub size: u64,
}

/// Hard ceilings for one stream. The unpacker uses the manifest's exact numbers: a payload that
/// holds more than its signed manifest says is refused at the first entry or byte over.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub entries: u64,
    pub unpacked_size: u64,
}

impl Limits {
    pub const NONE: Limits = Limits {
        entries: u64::MAX,
        unpacked_size: u64::MAX,
    };
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub entries: u64,
    pub unpacked_size: u64,
}

/// Where validated entries go. `data` holds exactly `entry.size` bytes; what the sink does
/// not read is skipped.
pub trait Sink {
    fn entry(&mut self, entry: &Entry, data: &mut EntryData<'_>) -> Result<()>;
}

/// Writes nothing (the walker skips the data, which still flows through every check).
pub struct NullSink;
impl Sink for NullSink {
    fn entry(&mut self, _: &Entry, _: &mut EntryData<'_>) -> Result<()> {
        Ok(())
    }
}

/// Reads the whole tar stream, validating each entry before handing it to `sink`.
///
/// The blocks are read here, with `tar::Header` decoding each header's fields, rather than
/// through `tar::Archive`, for two reasons: its PAX parser splits records at newlines, which
/// breaks binary values such as POSIX ACLs or capabilities holding a 0x0a byte (PAX records are
/// length-prefixed, POSIX.1-2008 "pax Extended Header Records"; [`parse_pax`] reads them so);
/// and its entries can only be `read` into a caller's buffer, one more copy of every byte than
/// writing straight from the decompressor's chunks ([`EntryData::for_each_chunk`]).
pub fn walk(
    mut reader: impl BufRead,
    limits: Limits,
    sink: &mut dyn Sink,
    progress: &mut dyn FnMut(&Stats),
) -> Result<Stats> {
    let mut stats = Stats::default();
    let mut checker = Checker::default();
    let mut pending = Pending::default();
    let mut block = [0u8; 512];
    loop {
        if !read_block(&mut reader, &mut block)? {
            return Err(Error::Tar(
                "the archive ends without an end-of-archive block (truncated?)".into(),
            ));
        }
        if block.iter().all(|b| *b == 0) {
            // End of archive. What follows (a second zero block, padding) is read by the
            // payload reader's `finish`, so that it is authenticated and hashed too.
            return Ok(stats);
        }
        let h = tar::Header::from_byte_slice(&block).clone();
        check_checksum(&h)?;
        let size = h
            .entry_size()
            .map_err(|e| Error::Tar(format!("bad size field: {e}")))?;
        let padded = size.div_ceil(512) * 512;
        let meta = |r: &mut dyn BufRead, what: &str| -> Result<Vec<u8>> {
            const MAX: u64 = 1 << 20;
            if size > MAX {
                return Err(Error::Tar(format!("{what} of {size} bytes (limit {MAX})")));
            }
            let mut v = vec![0u8; padded as usize];
            r.read_exact(&mut v)
                .map_err(|e| Error::Tar(format!("reading {what}: {e}")))?;
            v.truncate(size as usize);
            Ok(v)
        };
        match h.entry_type() {
            tar::EntryType::GNULongName => {
                pending.name = Some(meta(&mut reader, "GNU long name")?);
                continue;
            }
            tar::EntryType::GNULongLink => {
                pending.link = Some(meta(&mut reader, "GNU long link")?);
                continue;
            }
            tar::EntryType::XHeader => {
                let data = meta(&mut reader, "PAX header")?;
                pending.pax =
                    parse_pax(&data).map_err(|r| Error::Tar(format!("PAX header: {r}")))?;
                continue;
            }
            // A global PAX header carries defaults we do not use (comments, charset).
            tar::EntryType::XGlobalHeader => {
                meta(&mut reader, "global PAX header")?;
                continue;
            }
            _ => {}
        }
        stats.entries += 1;
        if stats.entries > limits.entries {
            return Err(Error::Limit(format!(
                "more than {} entries",
                limits.entries
            )));
        }
        stats.unpacked_size = stats.unpacked_size.saturating_add(size);
        if stats.unpacked_size > limits.unpacked_size {
            return Err(Error::Limit(format!(
                "entries hold more than {} bytes",
                limits.unpacked_size
            )));
        }
        let entry = parse_entry(&h, size, std::mem::take(&mut pending))?;
        checker.check(&entry)?;
        let mut data = EntryData {
            r: &mut reader,
            left: size,
        };
        sink.entry(&entry, &mut data)?;
        // Whatever the sink did not read, and the padding to the next block.
        let rest = data.left + (padded - size);
        skip(&mut reader, rest)
            .map_err(|e| Error::Tar(format!("reading {:?}: {e}", entry.path.display())))?;
        progress(&stats);
    }
}

/// The data of one entry, straight from the stream.
pub struct EntryData<'a> {
    r: &'a mut dyn BufRead,
    left: u64,
}

impl EntryData<'_> {
    /// Hands the data to `f` in the pieces the stream holds them in, without copying.
    pub fn for_each_chunk(&mut self, mut f: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
        while self.left > 0 {
            let buf = self
                .r
                .fill_buf()
                .map_err(|e| Error::Tar(format!("reading entry data: {e}")))?;
            if buf.is_empty() {
                return Err(Error::Tar("the archive ends inside an entry".into()));
            }
            let n = buf.len().min(self.left as usize);
            f(&buf[..n])?;
            self.r.consume(n);
            self.left -= n as u64;
        }
        Ok(())
    }
}

impl Read for EntryData<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let max = out.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.r.read(&mut out[..max])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// Reads one 512-byte block; `false` at a clean end of stream.
fn read_block(r: &mut dyn BufRead, block: &mut [u8; 512]) -> Result<bool> {
    let mut got = 0;
    while got < 512 {
        let n = r
            .read(&mut block[got..])
            .map_err(|e| Error::Tar(format!("reading tar header: {e}")))?;
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(Error::Tar("the archive ends inside a header".into()));
        }
        got += n;
    }
    Ok(true)
}

fn skip(r: &mut dyn BufRead, mut n: u64) -> std::io::Result<()> {
    while n > 0 {
        let avail = r.fill_buf()?.len();
        if avail == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the archive ends inside an entry",
            ));
        }
        let k = avail.min(n as usize);
        r.consume(k);
        n -= k as u64;
    }
    Ok(())
}

/// The header checksum (POSIX ustar): the sum of all header bytes with the checksum field
/// counted as spaces.
fn check_checksum(h: &tar::Header) -> Result<()> {
    let stored = h
        .cksum()
        .map_err(|e| Error::Tar(format!("bad checksum field: {e}")))?;
    let b = h.as_bytes();
    let sum: u32 = b[..148]
        .iter()
        .chain(&b[156..])
        .map(|x| *x as u32)
        .sum::<u32>()
        + 8 * 32;
    if sum != stored {
        return Err(Error::Tar(format!(
            "header checksum mismatch (stored {stored}, computed {sum}): not a tar stream, or corrupt"
        )));
    }
    Ok(())
}

/// Long-name and PAX records that apply to the next entry.
#[derive(Default)]
struct Pending {
    name: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    pax: Vec<PaxRecord>,
}

/// One PAX record: key and raw value.
pub type PaxRecord = (Vec<u8>, Vec<u8>);

/// Parses PAX extended header records: `"<len> <key>=<value>\n"`, where `len` counts the whole
/// record and the value may hold any bytes, newlines included.
pub fn parse_pax(mut data: &[u8]) -> std::result::Result<Vec<PaxRecord>, String> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let sp = data
            .iter()
            .position(|b| *b == b' ')
            .ok_or("record without a length")?;
        let len: usize = std::str::from_utf8(&data[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("record length is not a number")?;
        if len <= sp + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err(format!("record length {len} does not fit the data"));
        }
        let kv = &data[sp + 1..len - 1];
        let eq = kv
            .iter()
            .position(|b| *b == b'=')
            .ok_or("record without `=`")?;
        out.push((kv[..eq].to_vec(), kv[eq + 1..].to_vec()));
        data = &data[len..];
    }
    Ok(out)
}

/// The stream-level rules: nothing is written through a symlink the stream made, and a hard
/// link points at an earlier non-directory entry.
#[derive(Default)]
struct Checker {
    symlinks: HashSet<PathBuf>,
    nondirs: HashSet<PathBuf>,
}

impl Checker {
    fn check(&mut self, e: &Entry) -> Result<()> {
        let bad = |reason: String| Error::Entry {
            entry: e.path.display(),
            reason,
        };
        if e.path.as_path() == Path::new(INCOMPLETE_MARKER) {
            return Err(bad("this name is reserved for the unpacker's marker".into()));
        }
        let through_link = |p: &SafePath| {
            p.ancestors()
                .find(|a| self.symlinks.contains(*a))
                .map(Path::to_path_buf)
        };
        if let Some(link) = through_link(&e.path) {
            return Err(bad(format!(
                "would be written through the symlink {}, which could lead outside the target",
                link.display()
            )));
        }
        if let EntryKind::Hardlink(t) = &e.kind {
            if through_link(t).is_some() || !self.nondirs.contains(t.as_path()) {
                return Err(bad(format!(
                    "hard link to {}, which is not an earlier file of this archive",
                    t.display()
                )));
            }
        }
        let p = e.path.as_path().to_path_buf();
        self.symlinks.remove(&p);
        match e.kind {
            EntryKind::Dir => {
                self.nondirs.remove(&p);
            }
            EntryKind::Symlink(_) => {
                self.symlinks.insert(p.clone());
                self.nondirs.insert(p);
            }
            _ => {
                self.nondirs.insert(p);
            }
        }
        Ok(())
    }
}

fn parse_entry(h: &tar::Header, size: u64, pending: Pending) -> Result<Entry> {
    let mut raw_path = pending
        .name
        .map(strip_nul)
        .unwrap_or_else(|| h.path_bytes().into_owned());
    let mut raw_link = pending
        .link
        .map(strip_nul)
        .or_else(|| h.link_name_bytes().map(|l| l.into_owned()));
    let mut xattrs = Vec::new();
    let mut overrides: Vec<(&[u8], &[u8])> = Vec::new();
    for (k, v) in &pending.pax {
        match k.as_slice() {
            b"path" => raw_path = v.clone(),
            b"linkpath" => raw_link = Some(v.clone()),
            k if k.starts_with(b"SCHILY.xattr.") => xattrs.push((k[13..].to_vec(), v.clone())),
            k if k.starts_with(b"GNU.sparse.") || k == b"size" => overrides.push((k, v)),
            b"uid" | b"gid" | b"mtime" => overrides.push((k, v)),
            _ => {}
        }
    }
    let name = String::from_utf8_lossy(&raw_path).into_owned();
    let bad = |reason: String| Error::Entry {
        entry: name.clone(),
        reason,
    };
    let path = SafePath::parse(&raw_path).map_err(bad)?;
    let num = |r: std::io::Result<u64>, field: &str| {
        r.map_err(|e| bad(format!("bad {field} field: {e}")))
    };
    let dev = |r: std::io::Result<Option<u32>>| {
        r.map_err(|e| bad(format!("bad device number: {e}")))
            .map(|v| v.unwrap_or(0))
    };
    let mut meta = Meta {
        mode: h.mode().map_err(|e| bad(format!("bad mode field: {e}")))? & 0o7777,
        uid: num(h.uid(), "uid")? as u32,
        gid: num(h.gid(), "gid")? as u32,
        mtime: num(h.mtime(), "mtime")? as i64,
        xattrs,
    };
    for (k, v) in overrides {
        let int = || {
            std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.split('.').next()?.parse::<i64>().ok())
                .ok_or_else(|| {
                    bad(format!(
                        "PAX {} is not a number",
                        String::from_utf8_lossy(k)
                    ))
                })
        };
        match k {
            b"uid" => meta.uid = int()? as u32,
            b"gid" => meta.gid = int()? as u32,
            b"mtime" => meta.mtime = int()?,
            b"size" if int()? as u64 == size => {}
            _ => {
                return Err(bad(format!(
                    "PAX record {} (sparse files or PAX sizes) is not supported; re-create the tarball without --sparse",
                    String::from_utf8_lossy(k)
                )))
            }
        }
    }
    let link = |what: &str| {
        raw_link
            .clone()
            .filter(|l| !l.is_empty())
            .ok_or_else(|| bad(format!("{what} without a target")))
    };
    let kind = match h.entry_type() {
        tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File,
        tar::EntryType::Directory => EntryKind::Dir,
        tar::EntryType::Symlink => EntryKind::Symlink(link("symlink")?),
        tar::EntryType::Link => EntryKind::Hardlink(
            SafePath::parse(&link("hard link")?)
                .map_err(|r| bad(format!("hard link target: {r}")))?,
        ),
        tar::EntryType::Char => EntryKind::Char(dev(h.device_major())?, dev(h.device_minor())?),
        tar::EntryType::Block => EntryKind::Block(dev(h.device_major())?, dev(h.device_minor())?),
        tar::EntryType::Fifo => EntryKind::Fifo,
        tar::EntryType::GNUSparse => {
            return Err(bad(
                "GNU sparse entries are not supported; re-create the tarball without --sparse"
                    .into(),
            ))
        }
        other => {
            return Err(bad(format!(
                "unsupported tar entry type {:?}",
                other.as_byte() as char
            )))
        }
    };
    if path.is_root() && kind != EntryKind::Dir {
        return Err(bad("the archive root is not a directory".into()));
    }
    Ok(Entry {
        path,
        kind,
        meta,
        size,
    })
}

fn strip_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_tar() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_data(&mut h, "a/file", &b"hello"[..]).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn walker_reads_a_tar_and_skips_unread_data() {
        let stats = walk(&small_tar()[..], Limits::NONE, &mut NullSink, &mut |_| {}).unwrap();
        assert_eq!(
            stats,
            Stats {
                entries: 1,
                unpacked_size: 5
            }
        );
    }

    #[test]
    fn walker_refuses_corrupt_headers_and_truncated_archives() {
        let mut t = small_tar();
        t[3] ^= 0x20; // in the name field
        let e = walk(&t[..], Limits::NONE, &mut NullSink, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        let t = small_tar();
        let e = walk(&t[..600], Limits::NONE, &mut NullSink, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("ends inside"), "{e}");
        let e = walk(&t[..1024], Limits::NONE, &mut NullSink, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
    }

    #[test]
    fn pax_values_may_hold_newlines_and_any_byte() {
        let mut data = Vec::new();
        for (k, v) in [
            (&b"path"[..], &b"a/b"[..]),
            (b"SCHILY.xattr.user.x", b"1\n2 3=\0\xff"),
        ] {
            let body = [k, b"=", v, b"\n"].concat();
            let mut len = body.len() + 2;
            if format!("{len} ").len() + body.len() != len {
                len += 1;
            }
            data.extend_from_slice(format!("{len} ").as_bytes());
            data.extend_from_slice(&body);
        }
        let recs = parse_pax(&data).unwrap();
        assert_eq!(recs[1].1, b"1\n2 3=\0\xff");
        assert!(parse_pax(b"99 path=x\n").is_err());
        assert!(parse_pax(b"9 pathx\n").is_err());
    }

    #[test]
    fn safe_path_refuses_escapes_and_normalizes() {
        for bad in [&b"/etc/passwd"[..], b"../x", b"a/../../x", b"a/..", b"a\0b"] {
            assert!(
                SafePath::parse(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            SafePath::parse(b"./a//b/./c").unwrap().as_path(),
            Path::new("a/b/c")
        );
        assert!(SafePath::parse(b"./").unwrap().is_root());
        assert!(SafePath::parse(b"a..b/..c").is_ok());
        let p = SafePath::parse(b"a/b/c").unwrap();
        let anc: Vec<_> = p.ancestors().collect();
        assert_eq!(anc, [Path::new("a"), Path::new("a/b")]);
    }

    fn entry(path: &str, kind: EntryKind) -> Entry {
        Entry {
            path: SafePath::parse(path.as_bytes()).unwrap(),
            kind,
            meta: Meta::default(),
            size: 0,
        }
    }

    #[test]
    fn checker_refuses_writes_through_symlinks_and_dangling_hardlinks() {
        let mut c = Checker::default();
        c.check(&entry("etc", EntryKind::Symlink(b"/etc".to_vec())))
            .unwrap();
        let e = c.check(&entry("etc/passwd", EntryKind::File)).unwrap_err();
        assert!(e.to_string().contains("symlink etc"), "{e}");
        let hl = EntryKind::Hardlink(SafePath::parse(b"nothing").unwrap());
        assert!(c.check(&entry("x", hl)).is_err());
        c.check(&entry("f", EntryKind::File)).unwrap();
        let hl = EntryKind::Hardlink(SafePath::parse(b"f").unwrap());
        c.check(&entry("g", hl)).unwrap();
        // Replacing the symlink by a real directory makes the path usable again.
        c.check(&entry("etc", EntryKind::Dir)).unwrap();
        c.check(&entry("etc/passwd", EntryKind::File)).unwrap();
        assert!(c.check(&entry(INCOMPLETE_MARKER, EntryKind::File)).is_err());
    }
}
