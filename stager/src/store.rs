//! The stager home directory (`--dir D`):
//!
//! ```text
//! D/release.key                      minisign secret key (0600), signs manifests
//! D/release.pub                      the public key agents pin
//! D/blobs/sha256/<hex>               payload blobs, named by their SHA-256, immutable
//! D/bundles/<name>/<version>/        one directory per bundle (0700):
//!     manifest.json                  the signed manifest
//!     manifest.json.minisig          its signature
//!     identity.txt                   the bundle's own age identity (0600)
//! D/tmp/                             work area; a build is moved into place only when done
//! ```
//!
//! Every write is atomic: a blob is written under `tmp/`, flushed, then renamed to its hash; a
//! bundle directory is assembled under `tmp/` and renamed into `bundles/` as a whole. A crash
//! leaves, at worst, a work directory in `tmp/` (safe to delete), never a half bundle.

use anyhow::{bail, Context, Result};
use bundle::manifest::{Contents, Payload, ENCRYPTION_AGE_X25519, MANIFEST_VERSION};
use bundle::pack::{self, Source};
use bundle::progress::Progress;
use bundle::release::{write_new, ReleaseKey};
use bundle::{BundleName, Compression, Kind, Manifest, Os};
use std::fs;
use std::io::BufWriter;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub struct Store {
    pub dir: PathBuf,
}

pub struct BuildRequest {
    pub name: BundleName,
    pub version: BundleName,
    pub kind: Kind,
    pub os: Os,
    pub arch: String,
    pub compression: Compression,
    pub level: Option<i32>,
    pub source: PathBuf,
    /// `--os windows`: the image of the media's install.wim (index or name).
    pub image: Option<String>,
}

/// A bundle as listed: its manifest and where its parts are.
pub struct Stored {
    pub manifest: Manifest,
    pub dir: PathBuf,
    pub blob: PathBuf,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store> {
        let s = Store {
            dir: dir.to_path_buf(),
        };
        if !s.release_key().exists() {
            bail!(
                "{} is not a stager home (no release.key); run `stager init --dir {}`",
                dir.display(),
                dir.display()
            );
        }
        Ok(s)
    }

    /// Creates the home and the release key pair. Refuses to touch an existing key.
    pub fn init(dir: &Path) -> Result<Store> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let s = Store {
            dir: dir.to_path_buf(),
        };
        if s.release_key().exists() {
            bail!(
                "{} already exists; refusing to replace the release key (agents pin its public half)",
                s.release_key().display()
            );
        }
        for sub in ["blobs/sha256", "bundles", "tmp"] {
            mkdir_private(&dir.join(sub))?;
        }
        ReleaseKey::generate(&s.release_key(), &s.release_pub())?;
        Ok(s)
    }

    pub fn release_key(&self) -> PathBuf {
        self.dir.join("release.key")
    }
    pub fn release_pub(&self) -> PathBuf {
        self.dir.join("release.pub")
    }
    fn blob(&self, sha: &str) -> PathBuf {
        self.dir.join("blobs/sha256").join(sha)
    }
    fn bundle_dir(&self, name: &str, version: &str) -> PathBuf {
        self.dir.join("bundles").join(name).join(version)
    }

    pub fn build(&self, req: &BuildRequest, progress: &mut dyn Progress) -> Result<Stored> {
        let key = ReleaseKey::load(&self.release_key())?;
        let final_dir = self.bundle_dir(req.name.as_str(), req.version.as_str());
        if final_dir.exists() {
            bail!(
                "bundle {}@{} already exists in {}; bundles are immutable, pick a new version",
                req.name,
                req.version,
                final_dir.display()
            );
        }
        let tmp = self.dir.join("tmp");
        mkdir_private(&tmp)?;
        let work = tempfile::Builder::new()
            .prefix("build-")
            .tempdir_in(&tmp)
            .with_context(|| format!("creating a work directory in {}", tmp.display()))?;
        let source = match req.os {
            Os::Windows => {
                anyhow::ensure!(
                    req.kind == Kind::Target,
                    "--os windows is for targets: the rescue OS is Linux"
                );
                let tree = work.path().join("windows");
                crate::windows::prepare(&req.source, req.image.as_deref(), &tree)?;
                Source::Dir(tree)
            }
            Os::Linux => {
                anyhow::ensure!(
                    req.image.is_none(),
                    "--image chooses an image of Windows media (--os windows)"
                );
                Source::detect(&req.source)?
            }
        };
        self.build_in(work.path(), &final_dir, req, &source, &key, progress)
    }

    fn build_in(
        &self,
        work: &Path,
        final_dir: &Path,
        req: &BuildRequest,
        source: &Source,
        key: &ReleaseKey,
        progress: &mut dyn Progress,
    ) -> Result<Stored> {
        let identity = age::x25519::Identity::generate();
        let blob_tmp = work.join("payload.age");
        let out = fs::File::create(&blob_tmp)
            .with_context(|| format!("creating {}", blob_tmp.display()))?;
        let packed = pack::pack(
            source,
            BufWriter::with_capacity(1 << 20, out),
            &[identity.to_public()],
            req.compression,
            req.level,
            progress,
        )
        .with_context(|| format!("packing {}", req.source.display()))?;
        let w = packed.written;
        let file = w
            .out
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("writing {}", blob_tmp.display()))?;
        file.sync_all()
            .with_context(|| format!("flushing {}", blob_tmp.display()))?;
        let manifest = Manifest {
            manifest_version: MANIFEST_VERSION,
            name: req.name.to_string(),
            version: req.version.to_string(),
            kind: req.kind,
            os: req.os,
            arch: req.arch.clone(),
            created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            payload: Payload {
                sha256: w.sha256.clone(),
                size: w.size,
                compression: req.compression,
                encryption: ENCRYPTION_AGE_X25519.into(),
            },
            contents: Contents {
                tar_size: w.tar_size,
                unpacked_size: packed.stats.unpacked_size,
                entries: packed.stats.entries,
            },
        };
        let bytes = manifest.to_bytes();
        let comment = format!(
            "bundle {} payload sha256 {}",
            manifest.id(),
            manifest.payload.sha256
        );
        let sig = key.sign(&bytes, &comment)?;
        let staged = work.join("bundle");
        mkdir_private(&staged)?;
        write_new(&staged.join(bundle::MANIFEST_FILE), &bytes, 0o644)?;
        write_new(&staged.join(bundle::SIGNATURE_FILE), sig.as_bytes(), 0o644)?;
        write_new(
            &staged.join(bundle::IDENTITY_FILE),
            bundle::payload::identity_file_text(&identity).as_bytes(),
            0o600,
        )?;
        // The blob first: a bundle directory never names a blob that is not in place.
        let blob = self.blob(&w.sha256);
        fs::rename(&blob_tmp, &blob)
            .with_context(|| format!("moving the payload to {}", blob.display()))?;
        sync_dir(blob.parent().unwrap())?;
        let parent = final_dir.parent().unwrap();
        mkdir_private(parent)?;
        fs::rename(&staged, final_dir)
            .with_context(|| format!("moving the bundle into place at {}", final_dir.display()))?;
        sync_dir(parent)?;
        Ok(Stored {
            manifest,
            dir: final_dir.to_path_buf(),
            blob,
        })
    }

    /// All bundles, sorted by name then creation time.
    pub fn list(&self) -> Result<Vec<Stored>> {
        let root = self.dir.join("bundles");
        let mut out = Vec::new();
        for name in read_dir_sorted(&root)? {
            for version in read_dir_sorted(&name)? {
                out.push(self.load(version)?);
            }
        }
        out.sort_by(|a, b| {
            (&a.manifest.name, &a.manifest.created, &a.manifest.version).cmp(&(
                &b.manifest.name,
                &b.manifest.created,
                &b.manifest.version,
            ))
        });
        Ok(out)
    }

    /// `NAME@VERSION`, or the newest `NAME`.
    /// The bundle stored in `dir`.
    fn load(&self, dir: PathBuf) -> Result<Stored> {
        let mpath = dir.join(bundle::MANIFEST_FILE);
        let bytes = fs::read(&mpath).with_context(|| format!("reading {}", mpath.display()))?;
        let manifest = Manifest::parse(&mpath, &bytes)?;
        let blob = self.blob(&manifest.payload.sha256);
        Ok(Stored {
            manifest,
            dir,
            blob,
        })
    }

    pub fn find(&self, name: &BundleName, version: Option<&BundleName>) -> Result<Stored> {
        // NAME@VERSION is one directory: no need to read every manifest (the API serves
        // manifests and blobs by exact version on every agent request).
        if let Some(v) = version {
            let dir = self.bundle_dir(name.as_str(), v.as_str());
            if !dir.join(bundle::MANIFEST_FILE).exists() {
                bail!("no bundle {name}@{v} in {}", self.dir.display());
            }
            return self.load(dir);
        }
        let all = self.list()?;
        let found = all.into_iter().rev().find(|s| {
            s.manifest.name == name.as_str()
                && version.is_none_or(|v| s.manifest.version == v.as_str())
        });
        match (found, version) {
            (Some(s), _) => Ok(s),
            (None, Some(v)) => bail!("no bundle {name}@{v} in {}", self.dir.display()),
            (None, None) => bail!("no bundle named {name} in {}", self.dir.display()),
        }
    }

    /// Writes the four files of an exported bundle into `out` (created if missing, must not
    /// already hold a bundle).
    pub fn export(&self, s: &Stored, out: &Path) -> Result<()> {
        fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        for f in [
            bundle::MANIFEST_FILE,
            bundle::SIGNATURE_FILE,
            bundle::PAYLOAD_FILE,
            bundle::IDENTITY_FILE,
        ] {
            if out.join(f).exists() {
                bail!(
                    "{} already exists; export into an empty directory",
                    out.join(f).display()
                );
            }
        }
        for f in [
            bundle::MANIFEST_FILE,
            bundle::SIGNATURE_FILE,
            bundle::IDENTITY_FILE,
        ] {
            let (from, to) = (s.dir.join(f), out.join(f));
            fs::copy(&from, &to)
                .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
        let to = out.join(bundle::PAYLOAD_FILE);
        // A hard link costs nothing and the blob is immutable; copy across filesystems.
        if fs::hard_link(&s.blob, &to).is_err() {
            fs::copy(&s.blob, &to)
                .with_context(|| format!("copying {} to {}", s.blob.display(), to.display()))?;
        }
        fs::set_permissions(
            out.join(bundle::IDENTITY_FILE),
            fs::Permissions::from_mode(0o600),
        )?;
        Ok(())
    }
}

fn mkdir_private(p: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
        .with_context(|| format!("creating {}", p.display()))
}

fn sync_dir(p: &Path) -> Result<()> {
    bundle::unpack::sync_dir(p).map_err(Into::into)
}

fn read_dir_sorted(p: &Path) -> Result<Vec<PathBuf>> {
    if !p.exists() {
        return Ok(Vec::new());
    }
    let mut v: Vec<PathBuf> = fs::read_dir(p)
        .with_context(|| format!("listing {}", p.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    v.sort();
    Ok(v)
}
