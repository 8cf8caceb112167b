//! Command-line options (one struct per command) and their handlers.
//!
//! `--json` output is a stable interface for scripts: fields are only ever added.

use crate::store::{BuildRequest, Store, Stored};
use anyhow::{Context, Result};
use bundle::progress::{self, Terminal};
use bundle::{BundleName, Compression, Kind, Os};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "stager",
    version,
    about = "Staging server for remote OS reinstalls: keys and bundles"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Create a stager home: the release signing key pair (minisign format) and the store.
    Init(InitOpts),
    /// Build, list and export bundles.
    #[command(subcommand)]
    Bundle(BundleCommand),
}

#[derive(Subcommand)]
pub enum BundleCommand {
    /// Pack an OS tree into a signed, encrypted bundle.
    Build(BuildOpts),
    /// List the bundles in the store.
    List(ListOpts),
    /// Write a bundle's four files (manifest, signature, payload, identity) into a directory.
    Export(ExportOpts),
}

#[derive(Args)]
pub struct HomeOpt {
    /// Stager home directory.
    #[arg(long, env = "STAGER_DIR", default_value = "/var/lib/stager")]
    pub dir: PathBuf,
}

#[derive(Args)]
pub struct InitOpts {
    #[command(flatten)]
    pub home: HomeOpt,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum KindArg {
    Rescue,
    Target,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OsArg {
    Linux,
    Windows,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum CompressionArg {
    Zstd,
    Gzip,
}

#[derive(Args)]
pub struct BuildOpts {
    #[command(flatten)]
    pub home: HomeOpt,
    /// Bundle name (A-Z a-z 0-9 . _ + -).
    #[arg(long)]
    pub name: String,
    /// Bundle version; NAME@VERSION is immutable once built.
    #[arg(long)]
    pub version: String,
    #[arg(long, value_enum)]
    pub kind: KindArg,
    #[arg(long, value_enum)]
    pub os: OsArg,
    /// Architecture of the tree, as `uname -m` prints it.
    #[arg(long, default_value = std::env::consts::ARCH)]
    pub arch: String,
    #[arg(long, value_enum, default_value = "zstd")]
    pub compression: CompressionArg,
    /// Compression level (zstd 1-19, default 3; gzip 1-9, default 6).
    #[arg(long)]
    pub level: Option<i32>,
    /// Print the manifest and store paths as JSON.
    #[arg(long)]
    pub json: bool,
    /// A directory, or a .tar, .tar.gz or .tar.zst file.
    pub src: PathBuf,
}

#[derive(Args)]
pub struct ListOpts {
    #[command(flatten)]
    pub home: HomeOpt,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ExportOpts {
    #[command(flatten)]
    pub home: HomeOpt,
    /// NAME or NAME@VERSION (NAME alone: the newest).
    pub bundle: String,
    /// Directory to write manifest.json, manifest.json.minisig, payload.age, identity.txt into.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn init(o: InitOpts) -> Result<()> {
    let s = Store::init(&o.home.dir)?;
    println!("initialized stager home {}", s.dir.display());
    println!(
        "release public key (agents pin this): {}",
        s.release_pub().display()
    );
    Ok(())
}

pub fn build(o: BuildOpts) -> Result<()> {
    let store = Store::open(&o.home.dir)?;
    let req = BuildRequest {
        name: BundleName::parse("--name", &o.name)?,
        version: BundleName::parse("--version", &o.version)?,
        kind: match o.kind {
            KindArg::Rescue => Kind::Rescue,
            KindArg::Target => Kind::Target,
        },
        os: match o.os {
            OsArg::Linux => Os::Linux,
            OsArg::Windows => Os::Windows,
        },
        arch: o.arch,
        compression: match o.compression {
            CompressionArg::Zstd => Compression::Zstd,
            CompressionArg::Gzip => Compression::Gzip,
        },
        level: o.level,
        source: o.src,
    };
    let start = std::time::Instant::now();
    let stored = store
        .build(&req, &mut *Terminal::stderr())
        .with_context(|| format!("building {}@{}", req.name, req.version))?;
    if o.json {
        println!("{}", serde_json::to_string_pretty(&json_of(&stored))?);
    } else {
        let m = &stored.manifest;
        println!(
            "built {} ({:?}, {:?}): {} entries, {} unpacked -> {} payload ({}) in {:.1}s",
            m.id(),
            m.kind,
            m.os,
            m.contents.entries,
            progress::bytes(m.contents.unpacked_size),
            progress::bytes(m.payload.size),
            m.payload.compression.as_str(),
            start.elapsed().as_secs_f64()
        );
        println!("payload sha256 {}", m.payload.sha256);
    }
    Ok(())
}

fn json_of(s: &Stored) -> serde_json::Value {
    serde_json::json!({
        "manifest": s.manifest,
        "bundle_dir": s.dir,
        "blob": s.blob,
    })
}

pub fn list(o: ListOpts) -> Result<()> {
    let store = Store::open(&o.home.dir)?;
    let all = store.list()?;
    if o.json {
        let v: Vec<_> = all.iter().map(json_of).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<32} {:<7} {:<8} {:>10} {:>10} {:>8}  CREATED",
        "BUNDLE", "KIND", "OS", "PAYLOAD", "UNPACKED", "ENTRIES"
    );
    for s in &all {
        let m = &s.manifest;
        println!(
            "{:<32} {:<7} {:<8} {:>10} {:>10} {:>8}  {}",
            m.id(),
            format!("{:?}", m.kind).to_lowercase(),
            format!("{:?}", m.os).to_lowercase(),
            progress::bytes(m.payload.size),
            progress::bytes(m.contents.unpacked_size),
            m.contents.entries,
            m.created
        );
    }
    Ok(())
}

pub fn export(o: ExportOpts) -> Result<()> {
    let store = Store::open(&o.home.dir)?;
    let (name, version) = bundle::name::parse_ref(&o.bundle)?;
    let s = store.find(&name, version.as_ref())?;
    store.export(&s, &o.out)?;
    println!("exported {} to {}", s.manifest.id(), o.out.display());
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
