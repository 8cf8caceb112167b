//! Command-line options (one struct per command) and their handlers.
//!
//! `--json` output is a stable interface for scripts: fields are only ever added.

use anyhow::{Context, Result};
use bundle::progress::{self, Terminal};
use bundle::release::ReleasePublicKey;
use bundle::verify;
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "reinstall",
    version,
    about = "Remote two-disk OS reinstaller: operator command and agent"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Check and unpack bundles (a directory as written by `stager bundle export`).
    #[command(subcommand)]
    Bundle(BundleCommand),
}

#[derive(Subcommand)]
pub enum BundleCommand {
    /// Verify a bundle: the manifest's signature, the payload's size and SHA-256, and, when an
    /// age identity is at hand, every layer and entry inside (without writing anything).
    Verify(VerifyOpts),
    /// Verify and unpack a bundle into an empty directory.
    ///
    /// The target holds `.reinstall-incomplete` from the first byte written until every check
    /// has passed and the data is flushed; a target that still holds it is not usable.
    Unpack(UnpackOpts),
}

#[derive(Args)]
pub struct KeyOpts {
    /// The release public key (minisign format) that must have signed the manifest.
    #[arg(long)]
    pub pubkey: PathBuf,
    /// The bundle's age identity. `verify` defaults to DIR/identity.txt if present.
    #[arg(long)]
    pub identity: Option<PathBuf>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct VerifyOpts {
    #[command(flatten)]
    pub keys: KeyOpts,
    /// Only check signature, size and hash, even if an identity is available.
    #[arg(long)]
    pub shallow: bool,
    /// Bundle directory.
    pub dir: PathBuf,
}

#[derive(Args)]
pub struct UnpackOpts {
    #[command(flatten)]
    pub keys: KeyOpts,
    /// Bundle directory.
    pub dir: PathBuf,
    /// Directory to unpack into: created if missing; must be empty (a fresh filesystem's
    /// lost+found and the marker of an earlier failed attempt are allowed).
    #[arg(long)]
    pub into: PathBuf,
}

fn identity(
    keys: &KeyOpts,
    dir: &Path,
    required: bool,
) -> Result<Option<bundle::payload::AgeIdentity>> {
    let path = match &keys.identity {
        Some(p) => p.clone(),
        None => {
            let p = dir.join(bundle::IDENTITY_FILE);
            if !required && !p.exists() {
                return Ok(None);
            }
            p
        }
    };
    Ok(Some(bundle::payload::load_identity(&path)?))
}

pub fn verify(o: VerifyOpts) -> Result<()> {
    let key = ReleasePublicKey::load(&o.keys.pubkey)?;
    let signed = verify::check_signed(&o.dir, &key)
        .with_context(|| format!("bundle {} failed verification", o.dir.display()))?;
    let id = if o.shallow {
        None
    } else {
        identity(&o.keys, &o.dir, false)?
    };
    let mut p = Terminal::stderr();
    let deep = id.is_some();
    match id {
        Some(id) => {
            verify::check_contents(&signed, id, &mut *p)
                .with_context(|| format!("bundle {} failed verification", o.dir.display()))?;
        }
        None => verify::check_hash(&signed, &mut *p)
            .with_context(|| format!("bundle {} failed verification", o.dir.display()))?,
    }
    let m = &signed.manifest;
    if o.keys.json {
        let v = serde_json::json!({
            "ok": true,
            "bundle": m.id(),
            "checked": if deep { "signature,size,sha256,contents" } else { "signature,size,sha256" },
            "manifest": m,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "ok: {} signature, size, sha256{} verified",
            m.id(),
            if deep {
                ", contents"
            } else {
                " (contents not checked: no identity)"
            }
        );
    }
    Ok(())
}

pub fn unpack(o: UnpackOpts) -> Result<()> {
    let key = ReleasePublicKey::load(&o.keys.pubkey)?;
    let signed = verify::check_signed(&o.dir, &key)
        .with_context(|| format!("bundle {} failed verification", o.dir.display()))?;
    let id = identity(&o.keys, &o.dir, true)?.expect("required");
    let start = std::time::Instant::now();
    let stats =
        verify::unpack_into(&signed, id, &o.into, &mut *Terminal::stderr()).with_context(|| {
            format!(
                "unpacking {} into {} (left marked unusable: {}/{})",
                o.dir.display(),
                o.into.display(),
                o.into.display(),
                bundle::tree::INCOMPLETE_MARKER
            )
        })?;
    let secs = start.elapsed().as_secs_f64();
    let m = &signed.manifest;
    if o.keys.json {
        let v = serde_json::json!({
            "ok": true,
            "bundle": m.id(),
            "target": o.into,
            "entries": stats.entries,
            "unpacked_size": stats.unpacked_size,
            "seconds": secs,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "unpacked {} into {}: {} entries, {} in {:.1}s ({}/s)",
            m.id(),
            o.into.display(),
            stats.entries,
            progress::bytes(stats.unpacked_size),
            secs,
            progress::bytes((stats.unpacked_size as f64 / secs.max(0.001)) as u64)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
