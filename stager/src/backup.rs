//! `stager backup` and `stager restore`: the stager home in one file that only the operator's
//! age key opens.
//!
//! Why: every agent's certificate chains to this stager's CA, every bundle is signed by its
//! release key, and every host, job and certificate is a row of `state.db`. A stager whose disk
//! dies with no copy of them leaves a fleet that can only be enrolled again by hand, machine by
//! machine: the access this project exists to do without.
//!
//! The file is `age( zstd( tar ) )` of the home, encrypted to the operator's age recipients
//! (`age1…`, as `age -r`; the stager keeps nothing that opens it), so that stock
//! `age -d -i KEY FILE | zstd -d | tar -x` reads it too. It holds every file of the home as it
//! is (keys 0600), `state.db` as one consistent snapshot taken while `stager serve` runs
//! (SQLite's `VACUUM INTO`), the bundles, and their blobs unless `--no-blobs`; `BACKUP.json` at
//! its root says what it is. `tmp/` is left out. The tree is staged under `tmp/` with hard
//! links (no blob is copied), packed by the bundle packer into `OUT.partial`, flushed, and
//! renamed: a file under the name given is whole.
//!
//! `restore` unpacks into a new directory beside the one named with the bundle unpacker
//! (every path, mode and owner checked entry by entry), reads the age stream to its end (a
//! truncated or altered file fails there), and checks what it got before renaming it into
//! place: `BACKUP.json`, the database's integrity and schema, each CA key (two while the CA
//! is being replaced) against a certificate of `ca.pem`, the server key against its
//! certificate, the release key against
//! `release.pub`, every bundle's blob against its manifest. On any failure the partial
//! directory, which holds private keys, is removed.

use crate::config::Config;
use crate::store::Store;
use crate::{db, pki};
use anyhow::{bail, Context, Result};
use bundle::progress::Progress;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{self, BufReader, BufWriter};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The description at the root of a backup.
pub const ABOUT_FILE: &str = "BACKUP.json";
/// The version of the backup's layout this program writes and reads.
pub const FORMAT: u32 = 1;

/// `BACKUP.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct About {
    pub format: u32,
    /// The stager's name (stager.toml).
    pub stager: String,
    /// When the database snapshot was taken (RFC 3339, UTC).
    pub created: String,
    /// The database's schema version.
    pub schema: i64,
    /// Whether the blobs are in it (`--no-blobs`: they are not).
    pub blobs: bool,
    /// The program that wrote it.
    pub made_by: String,
}

/// A backup just written.
#[derive(Debug, Serialize)]
pub struct Made {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
    pub entries: u64,
    pub unpacked_size: u64,
    pub bundles: usize,
    pub about: About,
}

/// A home just restored.
#[derive(Debug, Serialize)]
pub struct Restored {
    /// Where it is (`None`: `restore --check`, removed again).
    pub dir: Option<PathBuf>,
    pub entries: u64,
    pub unpacked_size: u64,
    pub bundles: usize,
    /// Bundles whose blob is not in the backup (made with `--no-blobs`): they cannot be
    /// served until built or copied in again.
    pub missing_blobs: Vec<String>,
    pub certificates: usize,
    pub about: About,
}

/// An age recipient (`age1…`), as `age -r` takes it; `what` names it in errors.
pub fn parse_recipient(what: &str, text: &str) -> Result<age::x25519::Recipient> {
    age::x25519::Recipient::from_str(text.trim()).map_err(|e| {
        anyhow::anyhow!(
            "{what}: {:?} is not an age X25519 recipient (age1…): {e}",
            text.trim()
        )
    })
}

/// The recipients of a file as `age -R` reads it: one `age1…` per line, `#` comments.
pub fn recipients_file(path: &Path) -> Result<Vec<age::x25519::Recipient>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(parse_recipient(
            &format!("{} line {}", path.display(), i + 1),
            line,
        )?);
    }
    anyhow::ensure!(!out.is_empty(), "{}: no recipient in it", path.display());
    Ok(out)
}

/// What of the home's top level a backup leaves out: the work area, the live database (a
/// snapshot goes in instead), and the blobs when not wanted.
fn left_out(name: &std::ffi::OsStr, blobs: bool) -> bool {
    let n = name.to_string_lossy();
    n == "tmp" || n.starts_with(db::FILE) || (!blobs && n == "blobs")
}

/// Writes a backup of the stager home `dir` to `out` (which must not exist), encrypted to
/// `recipients`.
pub fn backup(
    dir: &Path,
    out: &Path,
    recipients: &[age::x25519::Recipient],
    blobs: bool,
    progress: &mut dyn Progress,
) -> Result<Made> {
    anyhow::ensure!(!recipients.is_empty(), "no recipient: name at least one");
    let store = Store::open(dir)?;
    let config = Config::load(dir)?;
    if out.symlink_metadata().is_ok() {
        bail!(
            "{} exists; a backup is never written over (name a new file)",
            out.display()
        );
    }
    let out_dir = absolute_parent(out)?;
    if out_dir.starts_with(fs::canonicalize(dir)?) {
        bail!(
            "{} is inside the stager home {}: write the backup elsewhere (it would hold itself)",
            out.display(),
            dir.display()
        );
    }
    let work = dir.join("tmp");
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let stage = tempfile::Builder::new()
        .prefix("backup-")
        .tempdir_in(&work)
        .with_context(|| format!("creating a work directory in {}", work.display()))?;
    let root = stage.path().join("home");
    mkdir_like(dir, &root)?;

    // The database first: every bundle a job of the snapshot names is then in the files.
    let about = snapshot(dir, &root, &config, blobs)?;
    link_tree(dir, &root, Path::new(""), &|top| left_out(top, blobs))?;
    bundle::release::write_new(
        &root.join(ABOUT_FILE),
        &serde_json::to_vec_pretty(&about)?,
        0o600,
    )?;
    let bundles = store.list()?.len();

    let partial = crate::certfiles::beside(out, "partial");
    let _ = fs::remove_file(&partial); // a killed run's: ours, never whole
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .with_context(|| format!("creating {}", partial.display()))?;
    let written = (|| -> Result<_> {
        let packed = bundle::pack::pack(
            &bundle::pack::Source::Dir(root.clone()),
            BufWriter::with_capacity(1 << 20, file),
            recipients,
            bundle::Compression::Zstd,
            None,
            progress,
        )
        .with_context(|| format!("writing {}", partial.display()))?;
        let w = packed.written;
        let f = w
            .out
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("writing {}", partial.display()))?;
        f.sync_all()
            .with_context(|| format!("flushing {}", partial.display()))?;
        Ok((w.sha256, w.size, packed.stats))
    })();
    let (sha256, size, stats) = match written {
        Ok(w) => w,
        Err(e) => {
            let _ = fs::remove_file(&partial);
            return Err(e);
        }
    };
    fs::rename(&partial, out)
        .with_context(|| format!("renaming {} to {}", partial.display(), out.display()))?;
    bundle::unpack::sync_dir(&out_dir)?;
    Ok(Made {
        path: out.to_path_buf(),
        size,
        sha256,
        entries: stats.entries,
        unpacked_size: stats.unpacked_size,
        bundles,
        about,
    })
}

/// `VACUUM INTO` a consistent copy of the live database (WAL: readers never wait for the
/// server's writers), with its mode, checked whole. Returns the backup's description.
fn snapshot(dir: &Path, root: &Path, config: &Config, blobs: bool) -> Result<About> {
    use rusqlite::{Connection, OpenFlags};
    let live = dir.join(db::FILE);
    let copy = root.join(db::FILE);
    let mode = fs::metadata(&live)
        .with_context(|| format!("reading {}", live.display()))?
        .permissions()
        .mode()
        & 0o7777;
    let created = pki::rfc3339(std::time::SystemTime::now());
    let conn = Connection::open_with_flags(&live, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("opening {}", live.display()))?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    let schema: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    conn.execute("VACUUM INTO ?1", [copy.to_string_lossy().as_ref()])
        .with_context(|| format!("taking a snapshot of {}", live.display()))?;
    drop(conn);
    fs::set_permissions(&copy, fs::Permissions::from_mode(mode))?;
    check_database(&copy)?;
    let about = About {
        format: FORMAT,
        stager: config.name.clone(),
        created,
        schema,
        blobs,
        made_by: concat!("stager ", env!("CARGO_PKG_VERSION")).to_string(),
    };
    Ok(about)
}

/// SQLite's own check of a database file, read-only.
fn check_database(path: &Path) -> Result<()> {
    use rusqlite::{Connection, OpenFlags};
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("opening {}", path.display()))?;
    let verdict: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .with_context(|| format!("checking {}", path.display()))?;
    anyhow::ensure!(
        verdict == "ok",
        "{}: SQLite's integrity check says {verdict:?}",
        path.display()
    );
    Ok(())
}

/// The tree under `src/rel` mirrored under `dst/rel`: directories made with their modes,
/// files hard-linked (nothing copied), symlinks made again. A file gone between the listing
/// and the link (the store replaces files by renaming) is skipped.
fn link_tree(
    src: &Path,
    dst: &Path,
    rel: &Path,
    skip_top: &dyn Fn(&std::ffi::OsStr) -> bool,
) -> Result<()> {
    let at = src.join(rel);
    for ent in fs::read_dir(&at).with_context(|| format!("listing {}", at.display()))? {
        let ent = ent.with_context(|| format!("listing {}", at.display()))?;
        if rel.as_os_str().is_empty() && skip_top(&ent.file_name()) {
            continue;
        }
        let r = rel.join(ent.file_name());
        let (from, to) = (src.join(&r), dst.join(&r));
        let ft = ent
            .file_type()
            .with_context(|| format!("reading {}", from.display()))?;
        let linked = if ft.is_dir() {
            mkdir_like(&from, &to)?;
            link_tree(src, dst, &r, skip_top)?;
            Ok(())
        } else if ft.is_file() {
            fs::hard_link(&from, &to)
        } else if ft.is_symlink() {
            fs::read_link(&from).and_then(|t| std::os::unix::fs::symlink(t, &to))
        } else {
            Ok(()) // sockets, FIFOs: nothing of the stager's
        };
        match linked {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            r => r.with_context(|| format!("staging {}", from.display()))?,
        }
    }
    Ok(())
}

fn mkdir_like(from: &Path, to: &Path) -> Result<()> {
    let mode = fs::metadata(from)
        .with_context(|| format!("reading {}", from.display()))?
        .permissions()
        .mode()
        & 0o7777;
    fs::DirBuilder::new()
        .mode(0o700)
        .create(to)
        .with_context(|| format!("creating {}", to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", to.display()))
}

fn absolute_parent(path: &Path) -> Result<PathBuf> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::canonicalize(parent).with_context(|| format!("{}: no such directory", parent.display()))
}

/// Restores the backup `file` into `dir` (new, or an empty directory).
pub fn restore(
    file: &Path,
    identity: &age::x25519::Identity,
    dir: &Path,
    progress: &mut dyn Progress,
) -> Result<Restored> {
    match fs::symlink_metadata(dir) {
        Ok(md) if md.is_dir() => {
            if let Some(e) = fs::read_dir(dir)
                .with_context(|| format!("listing {}", dir.display()))?
                .next()
            {
                bail!(
                    "{} is not empty (it holds {:?}); restore only into a new or empty directory",
                    dir.display(),
                    e?.file_name()
                );
            }
        }
        Ok(_) => bail!("{} exists and is not a directory", dir.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    }
    let parent = absolute_parent(dir)?;
    let name = dir
        .file_name()
        .with_context(|| format!("{}: name a directory", dir.display()))?;
    let work = parent.join(format!(
        ".{}.restoring-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    if work.symlink_metadata().is_ok() {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&work)
        .with_context(|| format!("creating {}", work.display()))?;
    let result = unpack(file, identity, &work, progress).and_then(|stats| {
        let r = check_restored(&work, progress)?;
        Ok((stats, r))
    });
    let (stats, (about, bundles, missing_blobs, certificates)) = match result {
        Ok(r) => r,
        Err(e) => {
            // It holds private keys: nothing half-restored stays behind.
            let _ = fs::remove_dir_all(&work);
            return Err(e);
        }
    };
    if dir.exists() {
        fs::remove_dir(dir).with_context(|| format!("replacing the empty {}", dir.display()))?;
    }
    if let Err(e) = fs::rename(&work, dir) {
        let _ = fs::remove_dir_all(&work);
        return Err(e).with_context(|| format!("renaming {} to {}", work.display(), dir.display()));
    }
    bundle::unpack::sync_dir(&parent)?;
    Ok(Restored {
        dir: Some(dir.to_path_buf()),
        entries: stats.entries,
        unpacked_size: stats.unpacked_size,
        bundles,
        missing_blobs,
        certificates,
        about,
    })
}

/// Decrypts, decompresses and unpacks `file` into `work`, entry by entry through the bundle
/// unpacker, and reads the stream to its end so that all of it is authenticated.
fn unpack(
    file: &Path,
    identity: &age::x25519::Identity,
    work: &Path,
    progress: &mut dyn Progress,
) -> Result<bundle::tree::Stats> {
    let what = file.display();
    let f = fs::File::open(file).with_context(|| format!("opening {what}"))?;
    let dec = age::Decryptor::new_buffered(BufReader::with_capacity(1 << 20, f))
        .map_err(|e| anyhow::anyhow!("{what}: not an age-encrypted backup: {e}"))?;
    let plain = dec
        .decrypt(std::iter::once(identity as &dyn age::Identity))
        .map_err(|e| anyhow::anyhow!("{what}: this identity does not open it: {e}"))?;
    let z = zstd::stream::read::Decoder::new(plain)
        .with_context(|| format!("{what}: decompressing"))?;
    let mut r = BufReader::with_capacity(1 << 20, z);
    let mut sink = bundle::unpack::FsSink::new(work)?;
    let stats = bundle::tree::walk(&mut r, bundle::tree::Limits::NONE, &mut sink, &mut |s| {
        progress.update("restore", s.unpacked_size, None, s.entries)
    })
    .with_context(|| format!("{what}: unpacking"))?;
    io::copy(&mut r, &mut io::sink())
        .with_context(|| format!("{what}: reading to its end (truncated or altered?)"))?;
    progress.finish();
    sink.finish_dirs()?;
    sink.sync()?;
    sink.finish_root()?;
    // The home itself stays private whatever the archive's root said.
    fs::set_permissions(work, fs::Permissions::from_mode(0o700))?;
    Ok(stats)
}

/// Everything a stager needs to serve, checked in the restored tree `home`: its description,
/// configuration, database, key pairs, and blobs. Returns the description, the number of
/// bundles, those whose blob is missing, and the number of certificates on record.
fn check_restored(
    home: &Path,
    progress: &mut dyn Progress,
) -> Result<(About, usize, Vec<String>, usize)> {
    let about_path = home.join(ABOUT_FILE);
    let about: About = serde_json::from_slice(
        &fs::read(&about_path).context("no BACKUP.json in it: not a stager backup")?,
    )
    .context("BACKUP.json is not a stager backup's description")?;
    anyhow::ensure!(
        about.format <= FORMAT,
        "BACKUP.json: format {} is newer than this stager reads ({FORMAT}); restore with a newer stager",
        about.format
    );
    Config::load(home)?;
    let store = Store::open(home)?;
    let dbp = home.join(db::FILE);
    check_database(&dbp)?;
    // Its schema (a newer one is refused by name); and the period it holds no record of,
    // from the snapshot to now, whose renewals the server takes when first presented.
    let db = db::Db::open(&dbp)?;
    db.record_restore(&about.created)?;
    let certificates = db.certs()?.len();
    // The CA keys (two while the CA is being replaced: `stager ca`) each belong to a
    // certificate of ca.pem; the server key to server.pem.
    for key in [pki::CA_KEY, crate::ca::NEXT_KEY, crate::ca::OLD_KEY] {
        if key == pki::CA_KEY || home.join(key).exists() {
            pki::ca_cert_of(home, key).context("the CA")?;
        }
    }
    let read = |f: &str| {
        fs::read_to_string(home.join(f)).with_context(|| format!("the server: no {f} in it"))
    };
    crate::certfiles::check_pair(&read(pki::SERVER_CERT)?, &read(pki::SERVER_KEY)?).with_context(
        || {
            format!(
                "the server: {} and {} do not belong together",
                pki::SERVER_KEY,
                pki::SERVER_CERT
            )
        },
    )?;
    let release = bundle::release::ReleaseKey::load(&store.release_key())?;
    let public = bundle::release::ReleasePublicKey::load(&store.release_pub())?;
    let probe = b"stager restore";
    public
        .verify(
            probe,
            &release.sign(probe, "restore check")?,
            &store.release_pub(),
        )
        .context("release.key does not sign for release.pub")?;
    let mut missing = Vec::new();
    let list = store.list()?;
    for s in &list {
        let id = s.manifest.id();
        if !about.blobs && matches!(s.blob.try_exists(), Ok(false)) {
            missing.push(id);
            continue;
        }
        // As `reinstall bundle verify` hashes a payload: the blob against its manifest.
        let signed = bundle::verify::Signed {
            manifest: s.manifest.clone(),
            payload: s.blob.clone(),
        };
        bundle::verify::check_hash(&signed, progress).with_context(|| format!("bundle {id}"))?;
    }
    fs::remove_file(&about_path).ok();
    Ok((about, list.len(), missing, certificates))
}

/// Written by restore's caller: what a backup cannot hold.
pub fn after_restore_note(about: &About) -> String {
    format!(
        "not in this backup, made {}: certificates renewed since then are taken when first presented (they chain to this CA and name a host, relay or operator on record); hosts, relays and operators enrolled since then must be enrolled again; revocations since then must be made again",
        about.created
    )
}
