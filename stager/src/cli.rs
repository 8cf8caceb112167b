//! Command-line options (one struct per command) and their handlers.
//!
//! `--json` output is a stable interface for scripts: fields are only ever added.

use anyhow::{Context, Result};
use bundle::progress::{self, Terminal};
use bundle::{BundleName, Compression, Kind, Os};
use clap::{Args, Parser, Subcommand, ValueEnum};
use proto::identity::{IdentityFile, Role};
use stager::config::Config;
use stager::db::Db;
use stager::pki;
use stager::store::{BuildRequest, Store, Stored};
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
    /// Create a stager home: release signing key (minisign), CA and server certificate,
    /// stager.toml, the state database and the bundle store.
    Init(InitOpts),
    /// Issue an agent identity for HOST: one file, which `reinstall setup FILE` installs on
    /// the host (as /etc/reinstall/identity.toml, with the agent and its unit).
    Enroll(EnrollOpts),
    /// Issue an operator identity for NAME.
    Operator(OperatorOpts),
    /// Revoke every certificate issued to NAME (host, operator or relay), or with --replaced
    /// those a renewal replaced; a running server refuses them from their next request on.
    Revoke(RevokeOpts),
    /// List the certificates this stager issued (hosts, operators, relays): the one each
    /// name uses now, those a renewal replaced, expired and revoked ones, and days left.
    /// Agents and relays renew their own certificates (see `agent_cert_days` and
    /// `relay_cert_days` in `stager serve --help`); operators' are reissued by hand.
    Certs(CertsOpts),
    /// Show the stager's own server certificate (its names, its end), or with --renew
    /// replace it: a new key and certificate for the same names (and any --san), signed by
    /// the CA, the old pair kept as server.key.old / server.pem.old. Agents trust the CA, so
    /// nothing changes for them; a running `stager serve` serves it within seconds.
    ServerCert(ServerCertOpts),
    /// Serve the API over HTTPS with client certificates required (TLS 1.3, HTTP/1.1 and 2).
    #[command(
        after_help = "Settings in DIR/stager.toml, read at start (restart to change):
  listen, url, default_rescue     as `stager init` wrote them
  max_connections = 10000         TLS connections served at once
  handshake_timeout_secs = 10     to finish the TLS handshake
  request_timeout_secs = 30       to send a request's headers, and again its body
  silent_after_secs = 900         a running host with no event for this long is shown SILENT
  max_in_flight_per_site = N      at most N hosts of one site run a job at once, across
                                  every job (unset: only each job's own limits)
  max_in_flight = N               at most N hosts run a job at once, across every job
  agent_cert_days = 825           days a certificate an agent renews is valid; an agent
                                  whose certificate has less than a third of it left is
                                  told to renew it (and renews it itself)
  relay_cert_days = 825           the same for site relays' certificates, which a running
                                  `stager relay serve` renews itself"
    )]
    Serve(ServeOpts),
    /// Write the whole stager home (CA, server and release keys, stager.toml, a consistent
    /// snapshot of the state database, the bundles and their blobs) into one file encrypted
    /// to the operators' age keys; safe while `stager serve` runs. Keep it off this machine:
    /// without it, a lost stager means enrolling every host again by hand.
    #[command(after_help = "Read it with the stock tools too:
  age -d -i KEY.txt FILE | zstd -d | tar -tv
Restore with `stager restore` (`--check` for a drill). What a backup cannot hold: hosts,
relays and operators enrolled, revocations, jobs and events after it was made (run it daily;
--no-blobs keeps it small). Certificates agents and relays renewed after it are taken by the
restored stager the first time they are presented.")]
    Backup(BackupOpts),
    /// Restore a `stager backup` file into a new directory, checked before it is put in
    /// place: the database's integrity, the CA, server and release key pairs, every blob
    /// against its manifest. Then `stager serve --dir DIR` on a machine that answers at the
    /// stager's URL (stager.toml `url`; the identities of agents and relays name it).
    /// Certificates the backup has no record of, renewed by agents and relays after it, are
    /// taken when first presented if they chain to the CA and name a client on record.
    Restore(RestoreOpts),
    /// Replace the CA every agent, relay and operator trusts, in three steps that never cut
    /// one off: rotate (a new CA, trusted beside the old one; agents and relays are given
    /// both), switch (the new CA issues; everyone renews onto it), retire (the old CA is no
    /// longer trusted). `status` shows who has not caught up with the last step.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Build, list and export bundles.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Site relays: a stand-in for this stager at a site, so that a bundle crosses the WAN
    /// once per site, not once per machine.
    #[command(subcommand)]
    Relay(RelayCommand),
}

#[derive(Subcommand)]
pub enum CaCommand {
    /// The CAs trusted and which one issues; who holds the current trust bundle; whose
    /// certificate a CA that no longer issues issued; the next step.
    Status(CaOpts),
    /// Step 1: make a new CA (ca.next.key), trusted beside the current one (ca.pem holds
    /// both). Agents and relays are given both at their next poll (a relay's: at its start
    /// and hourly); identity files issued from now on hold both. Then issue operators new
    /// identity files (they do not poll).
    Rotate(CaOpts),
    /// Step 2: the new CA issues from now on; the server certificate is reissued by it (a
    /// running `stager serve` serves it within seconds); every certificate of the old CA is
    /// due for renewal, which agents and relays do by themselves at their next poll.
    /// Refused while an agent or relay in use has not said it holds both CAs, or an operator's
    /// identity file predates the rotation (`stager ca status` names them; `--force` cuts
    /// them off: they will not trust the new server certificate).
    Switch(CaForceOpts),
    /// Step 3: the old CA is no longer trusted (ca.pem holds the new one; ca.old.key is
    /// removed); agents and relays are given the new bundle. Refused while some name's
    /// current certificate is the old CA's (`--force` cuts them off).
    Retire(CaForceOpts),
}

#[derive(Args)]
pub struct CaOpts {
    #[command(flatten)]
    pub home: HomeOpt,
    /// Print the state as JSON: stage, cas, bundle_sha256, lacking_bundle,
    /// old_ca_certificates, next (and what was done).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct CaForceOpts {
    #[command(flatten)]
    pub home: HomeOpt,
    /// Take the step although the names `stager ca status` lists would be cut off.
    #[arg(long)]
    pub force: bool,
    /// As `stager ca status --json`, after the step.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum RelayCommand {
    /// On this (upstream) stager: issue a relay's certificate and write its directory (copy
    /// it to the relay machine). Then enroll the site's hosts with `--via`.
    Init(RelayInitOpts),
    /// On the relay machine: verify the site's agents, forward their requests upstream, and
    /// serve blobs from its cache (each fetched from upstream once). It renews its own
    /// certificate when upstream says it is due (asked at start and hourly; see
    /// `relay_cert_days` in `stager serve --help`), without a restart.
    #[command(after_help = stager::relay::SETTINGS)]
    Serve(RelayServeOpts),
}

#[derive(Args)]
pub struct RelayInitOpts {
    #[command(flatten)]
    pub home: HomeOpt,
    /// The relay's name (its certificate's CN; `stager revoke NAME` revokes it).
    #[arg(long)]
    pub name: String,
    /// DNS name or IP address agents reach the relay by (repeatable; at least one).
    #[arg(long = "san", required = true)]
    pub sans: Vec<String>,
    /// Address `stager relay serve` listens on.
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub listen: String,
    /// Directory to create for the relay (relay.toml, ca.pem, release.pub, relay.pem, relay.key).
    #[arg(long)]
    pub out: PathBuf,
    /// How the relay reaches this stager (default: `url` in stager.toml, as agents do), or
    /// a regional relay's URL to sit under it (relays chain).
    #[arg(long, value_name = "URL")]
    pub upstream: Option<String>,
    /// A site whose hosts the relay serves (`stager enroll --site`): it may act for those
    /// hosts only. Repeatable: a regional relay, upstream of several sites' relays, serves
    /// each of their sites. Without it: hosts enrolled without a site.
    #[arg(long = "site", value_name = "SITE")]
    pub sites: Vec<String>,
    /// Days the relay's certificate is valid.
    #[arg(long, default_value_t = 825)]
    pub days: i64,
}

#[derive(Args)]
pub struct RelayServeOpts {
    /// The relay's directory (written by `stager relay init`).
    #[arg(long)]
    pub dir: PathBuf,
    /// Address to listen on (default: `listen` in relay.toml).
    #[arg(long)]
    pub listen: Option<String>,
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
    /// Name of this stager (in certificates and identity files).
    #[arg(long, default_value = "stager")]
    pub name: String,
    /// Extra DNS name or IP address for the server certificate (repeatable); localhost and
    /// 127.0.0.1 are always included.
    #[arg(long = "san")]
    pub sans: Vec<String>,
    /// Address `stager serve` listens on.
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: String,
    /// URL agents use to reach this stager (default: https://LISTEN).
    #[arg(long)]
    pub url: Option<String>,
    /// Rescue bundle for jobs that name none (NAME or NAME@VERSION).
    #[arg(long)]
    pub default_rescue: Option<String>,
}

#[derive(Args)]
pub struct EnrollOpts {
    #[command(flatten)]
    pub home: HomeOpt,
    /// Host name, as jobs will name it.
    pub host: String,
    /// Where to write the identity file (default: HOST.identity.toml).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = 825, allow_negative_numbers = true)]
    pub days: i64,
    /// The host's site (a point of presence, a rack): jobs with --max-in-flight-per-site
    /// take at most that many of a site's hosts at a time. Enrolling a host again with
    /// another --site moves it.
    #[arg(long)]
    pub site: Option<String>,
    /// The URL of the site relay this host reaches the stager through (`stager relay init`),
    /// written into the identity file instead of this stager's own URL, which the agent
    /// falls back to while the relay cannot be reached.
    #[arg(long, value_name = "URL")]
    pub via: Option<String>,
}

#[derive(Args)]
pub struct OperatorOpts {
    #[command(flatten)]
    pub home: HomeOpt,
    pub name: String,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 365, allow_negative_numbers = true)]
    pub days: i64,
}

#[derive(Args)]
pub struct RevokeOpts {
    #[command(flatten)]
    pub home: HomeOpt,
    pub name: String,
    /// Only the certificates of NAME that a renewal replaced (all but its current one, which
    /// keeps working): once NAME uses its renewed one (`stager certs`), its old key is worth
    /// nothing to whoever copies it.
    #[arg(long)]
    pub replaced: bool,
    /// With --replaced: revoke even those NAME presented later than its current one
    /// (refused without it: NAME may not have stored its renewal and would be cut off).
    #[arg(long, requires = "replaced")]
    pub force: bool,
}

#[derive(Args)]
pub struct ServerCertOpts {
    #[command(flatten)]
    pub home: HomeOpt,
    /// Replace the server key and certificate.
    #[arg(long)]
    pub renew: bool,
    /// With --renew: days the new certificate is valid.
    #[arg(long, default_value_t = stager::pki::SERVER_DAYS, requires = "renew")]
    pub days: i64,
    /// With --renew: a DNS name or IP address to add to the certificate's (repeatable).
    #[arg(long = "san", requires = "renew")]
    pub sans: Vec<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct CertsOpts {
    #[command(flatten)]
    pub home: HomeOpt,
    /// Only names that run out within DAYS: their current certificate ends by then, or all
    /// of theirs have expired (for a daily check: non-empty output means act).
    #[arg(long, value_name = "DAYS")]
    pub expiring_within: Option<i64>,
    /// One JSON array, for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct BackupOpts {
    #[command(flatten)]
    pub home: HomeOpt,
    /// The file to write (must not exist; written as FILE.partial, then renamed).
    #[arg(long)]
    pub out: PathBuf,
    /// An age recipient (`age1…`, from `age-keygen`) who can open the backup; repeatable,
    /// any one of them opens it.
    #[arg(long = "recipient", short = 'r', value_name = "AGE1…")]
    pub recipients: Vec<String>,
    /// A file of recipients, one `age1…` per line (as `age -R`); repeatable.
    #[arg(long = "recipients-file", short = 'R', value_name = "FILE")]
    pub recipients_files: Vec<PathBuf>,
    /// Leave the bundles' blobs out (keys, database and manifests only: small enough to
    /// make daily; the blobs can be built again).
    #[arg(long)]
    pub no_blobs: bool,
    /// Print what was written as JSON (path, size, sha256, entries, the description).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct RestoreOpts {
    /// The directory to restore into (new, or empty).
    #[arg(long, required_unless_present = "check")]
    pub dir: Option<PathBuf>,
    /// Only check the backup: restore it into a temporary directory (in $TMPDIR, default
    /// /var/tmp) with every check, then remove it. For a drill: a backup nobody has restored
    /// is not known to be one.
    #[arg(long, conflicts_with = "dir")]
    pub check: bool,
    /// The age identity file (`AGE-SECRET-KEY-1…`) of one of the backup's recipients.
    #[arg(long, short = 'i')]
    pub identity: PathBuf,
    /// The backup file.
    pub file: PathBuf,
    /// Print what was restored as JSON (entries, bundles, missing_blobs, certificates, the
    /// backup's description).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ServeOpts {
    #[command(flatten)]
    pub home: HomeOpt,
    /// Address to listen on (default: `listen` in stager.toml).
    #[arg(long)]
    pub listen: Option<String>,
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
    /// With --os windows: the image of the media's sources/install.wim to install, by index
    /// or name (`wimlib-imagex info` lists them); needed when it holds more than one.
    #[arg(long)]
    pub image: Option<String>,
    /// A directory, or a .tar, .tar.gz or .tar.zst file. With --os windows: the root of a
    /// Windows installation ISO (mounted or copied), see the README.
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
    let dir = &o.home.dir;
    validate_name("--name", &o.name)?;
    let s = Store::init(dir)?;
    let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    for x in o.sans {
        if !sans.contains(&x) {
            sans.push(x);
        }
    }
    pki::init(dir, &o.name, &sans)?;
    let url = o.url.unwrap_or_else(|| format!("https://{}", o.listen));
    let config = Config::new(o.name, o.listen, url, o.default_rescue);
    config.save(dir)?;
    Db::open(&dir.join(stager::db::FILE))?;
    println!("initialized stager home {}", s.dir.display());
    println!(
        "release public key (agents pin this): {}",
        s.release_pub().display()
    );
    println!("CA certificate: {}", dir.join(pki::CA_CERT).display());
    println!(
        "server certificate for {}; agents will reach {}",
        sans.join(", "),
        config.url
    );
    Ok(())
}

fn https_url(flag: &str, u: &str) -> Result<()> {
    let ok = u
        .strip_prefix("https://")
        .is_some_and(|rest| !rest.is_empty() && u.parse::<hyper::Uri>().is_ok());
    anyhow::ensure!(ok, "{flag} {u:?} is not an https://HOST[:PORT] URL");
    Ok(())
}

/// Host and operator names: 1-253 of A-Z a-z 0-9 . _ -, not starting with . or -.
fn validate_name(field: &str, n: &str) -> Result<()> {
    let ok = !n.is_empty()
        && n.len() <= 253
        && !n.starts_with(['.', '-'])
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    anyhow::ensure!(ok, "{field} {n:?} is not a valid name (A-Z a-z 0-9 . _ -)");
    Ok(())
}

fn issue(
    dir: &std::path::Path,
    name: &str,
    role: Role,
    days: i64,
    out: &std::path::Path,
    via: Option<&str>,
) -> Result<()> {
    validate_name(if role == Role::Agent { "HOST" } else { "NAME" }, name)?;
    let config = Config::load(dir)?;
    Store::open(dir)?;
    if out.exists() {
        anyhow::bail!(
            "{} already exists; not overwriting an identity",
            out.display()
        );
    }
    let db = Db::open(&dir.join(stager::db::FILE))?;
    name_is_free(&db, name, role.as_str())?;
    let issued = pki::issue_client(dir, name, role.as_str(), days)?;
    let not_after = issued.not_after_text();
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .with_context(|| format!("reading {}", dir.join(f).display()))
    };
    let file = IdentityFile {
        format: proto::identity::FORMAT,
        name: name.to_string(),
        role,
        stager: via.unwrap_or(&config.url).to_string(),
        // Through a relay: the stager itself while the relay cannot be reached.
        fallback: via.map(|_| config.url.clone()).into_iter().collect(),
        ca: read(pki::CA_CERT)?,
        cert: issued.cert_pem,
        key: issued.key_pem,
        release_pub: read("release.pub")?,
    };
    db.add_cert(
        &issued.fingerprint,
        name,
        role.as_str(),
        &not_after,
        None,
        &[],
    )?;
    pki::write_private(out, &file.to_toml())?;
    println!(
        "issued {} identity for {name:?} to {} (certificate sha256 {}, valid until {not_after})",
        role.as_str(),
        out.display(),
        issued.fingerprint
    );
    if role == proto::identity::Role::Agent {
        println!(
            "on {name}, as root, with the reinstall binary and this file copied there: reinstall setup {} (many hosts over SSH: scripts/install-agent)",
            out.file_name().map_or_else(|| out.display().to_string(), |f| f.to_string_lossy().into_owned())
        );
    }
    Ok(())
}

/// Refuses `name` for a certificate of `role` when it already holds another role's:
/// `stager revoke NAME` acts on every certificate of a name.
fn name_is_free(db: &Db, name: &str, role: &str) -> Result<()> {
    if let Some(other) = db.role_of(name)?.filter(|r| r != role) {
        anyhow::bail!(
            "{name:?} already holds {other} certificates; pick another name (revoke acts on names)"
        );
    }
    Ok(())
}

pub fn enroll(o: EnrollOpts) -> Result<()> {
    let out = o
        .out
        .unwrap_or_else(|| PathBuf::from(format!("{}.identity.toml", o.host)));
    if let Some(s) = &o.site {
        validate_name("--site", s)?;
    }
    if let Some(v) = &o.via {
        https_url("--via", v)?;
    }
    issue(
        &o.home.dir,
        &o.host,
        Role::Agent,
        o.days,
        &out,
        o.via.as_deref(),
    )?;
    if let Some(s) = &o.site {
        Db::open(&o.home.dir.join(stager::db::FILE))?.set_site(&o.host, Some(s))?;
        println!("{:?} is in site {s:?}", o.host);
    }
    Ok(())
}

pub fn operator(o: OperatorOpts) -> Result<()> {
    issue(&o.home.dir, &o.name, Role::Operator, o.days, &o.out, None)
}

pub fn server_cert(o: ServerCertOpts) -> Result<()> {
    let dir = &o.home.dir;
    let config = Config::load(dir)?;
    anyhow::ensure!(
        o.days > 0,
        "--days {}: a certificate must be valid for at least a day",
        o.days
    );
    let info = if o.renew {
        pki::renew_server(dir, &config.name, &o.sans, o.days)?
    } else {
        pki::cert_info(&dir.join(pki::SERVER_CERT))?
    };
    let not_after = pki::rfc3339(info.not_after);
    let days_left = stager::certs::days_left(info.not_after, std::time::SystemTime::now());
    if o.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "fingerprint": info.fingerprint,
                "not_after": not_after,
                "days_left": days_left,
                "sans": info.sans,
                "renewed": o.renew,
            }))?
        );
    } else {
        println!(
            "{} {} (sha256 {}): for {}; valid until {not_after} ({days_left} days left)",
            dir.join(pki::SERVER_CERT).display(),
            if o.renew { "renewed" } else { "is" },
            info.fingerprint,
            info.sans.join(", ")
        );
        if o.renew {
            println!("a running `stager serve` serves it within seconds; the old pair is kept as server.key.old and server.pem.old");
        }
    }
    Ok(())
}

pub fn certs(o: CertsOpts) -> Result<()> {
    use stager::certs::{expiring, standings, Listed, Standing};
    Store::open(&o.home.dir)?;
    let db = Db::open(&o.home.dir.join(stager::db::FILE))?;
    let config = Config::load(&o.home.dir)?;
    let all = standings(
        stager::certs::all(&o.home.dir, &config.name, &db)?,
        std::time::SystemTime::now(),
    );
    let shown: Vec<&Listed> = match o.expiring_within {
        Some(d) => expiring(&all, d),
        None => all.iter().collect(),
    };
    if o.json {
        println!("{}", serde_json::to_string_pretty(&shown)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<8} {:<9} {:>9}  {:<20}  {:<20}  {:<16}  SITES",
        "NAME", "ROLE", "STANDING", "DAYS LEFT", "NOT AFTER", "LAST USED", "SHA256"
    );
    for l in &shown {
        let standing = match l.standing {
            Standing::Current => "current",
            Standing::Replaced => "replaced",
            Standing::Expired => "expired",
            Standing::Revoked => "revoked",
        };
        println!(
            "{:<24} {:<8} {:<9} {:>9}  {:<20}  {:<20}  {:<16}  {}",
            l.cert.name,
            l.cert.role,
            standing,
            l.days_left,
            l.cert.not_after,
            l.cert.last_used.as_deref().unwrap_or("-"),
            &l.cert.fingerprint[..16.min(l.cert.fingerprint.len())],
            l.cert.sites.as_deref().unwrap_or("-")
        );
    }
    if let Some(d) = o.expiring_within {
        eprintln!(
            "{} name(s) run out of certificates within {d} days",
            shown.len()
        );
    }
    Ok(())
}

pub fn revoke(o: RevokeOpts) -> Result<()> {
    Store::open(&o.home.dir)?;
    let db = Db::open(&o.home.dir.join(stager::db::FILE))?;
    if !o.replaced {
        let n = db.revoke(&o.name)?;
        anyhow::ensure!(n > 0, "no unrevoked certificate issued to {:?}", o.name);
        println!("revoked {n} certificate(s) of {:?}", o.name);
        return Ok(());
    }
    let all = stager::certs::standings(db.certs()?, std::time::SystemTime::now());
    let (replaced, in_use) = stager::certs::replaced(&all, &o.name);
    anyhow::ensure!(
        !replaced.is_empty(),
        "no replaced certificate of {:?} to revoke (`stager certs` lists its certificates)",
        o.name
    );
    if let (Some(l), false) = (in_use.first(), o.force) {
        anyhow::bail!(
            "{:?} presented a replaced certificate (sha256 {}) at {}, later than its current one: \
             it may not have stored its renewal (or a clone of it holds the old one), and revoking would \
             cut it off; wait until `stager certs` shows the current one used since, or pass --force",
            o.name,
            l.cert.fingerprint,
            l.cert.last_used.as_deref().unwrap_or("?")
        );
    }
    let fps: Vec<String> = replaced
        .iter()
        .map(|l| l.cert.fingerprint.clone())
        .collect();
    let n = db.revoke_fingerprints(&fps)?;
    println!("revoked {n} replaced certificate(s) of {:?}", o.name);
    Ok(())
}

pub fn relay_init(o: RelayInitOpts) -> Result<()> {
    let dir = &o.home.dir;
    validate_name("--name", &o.name)?;
    for s in &o.sites {
        validate_name("--site", s)?;
    }
    let mut sites = o.sites.clone();
    sites.sort();
    sites.dedup();
    let config = Config::load(dir)?;
    Store::open(dir)?;
    if o.out.exists() {
        anyhow::bail!(
            "{} already exists; not overwriting a relay",
            o.out.display()
        );
    }
    if let Some(u) = &o.upstream {
        https_url("--upstream", u)?;
    }
    let db = Db::open(&dir.join(stager::db::FILE))?;
    name_is_free(&db, &o.name, stager::api::RELAY)?;
    let issued = pki::issue_relay(dir, &o.name, &o.sans, o.days)?;
    std::fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
    for f in [pki::CA_CERT, stager::relay::RELEASE_PUB] {
        std::fs::copy(dir.join(f), o.out.join(f)).with_context(|| format!("copying {f}"))?;
    }
    pki::write_private(&o.out.join(stager::relay::KEY), &issued.key_pem)?;
    std::fs::write(o.out.join(stager::relay::CERT), &issued.cert_pem)?;
    let upstream = o.upstream.unwrap_or(config.url);
    stager::relay::RelayConfig::new(o.name.clone(), o.listen.clone(), upstream).save(&o.out)?;
    let not_after = issued.not_after_text();
    db.add_cert(
        &issued.fingerprint,
        &o.name,
        stager::api::RELAY,
        &not_after,
        (!sites.is_empty()).then(|| sites.join(",")).as_deref(),
        &o.sans,
    )?;
    let serves = match sites.as_slice() {
        [] => "hosts enrolled without a site".to_string(),
        [s] => format!("site {s:?}"),
        many => format!(
            "sites {}",
            many.iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let port = o.listen.rsplit(':').next().unwrap_or("PORT");
    println!(
        "relay {:?} for {serves} written to {} (certificate sha256 {}, for {}, valid until {not_after}); \
         copy it to the relay, run `stager relay serve --dir DIR` there, and enroll its \
         site's hosts with --via https://{}:{port}",
        o.name,
        o.out.display(),
        issued.fingerprint,
        o.sans.join(", "),
        o.sans[0]
    );
    Ok(())
}

pub fn relay_serve(o: RelayServeOpts) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(stager::relay::serve(&o.dir, o.listen))
}

/// What `stager ca status` shows, and the steps check.
struct CaState {
    stage: stager::ca::Stage,
    cas: Vec<stager::ca::Ca>,
    bundle_sha256: String,
    /// Names that may not trust the new CA (see [`stager::ca::lacking_bundle`]).
    lacking: Vec<stager::certs::Listed>,
    /// Names whose current certificate a CA that no longer issues issued.
    old_issued: Vec<stager::certs::Listed>,
}

fn ca_state(dir: &std::path::Path, db: &Db) -> Result<CaState> {
    let config = Config::load(dir)?;
    let listed = stager::certs::standings(
        stager::certs::all(dir, &config.name, db)?,
        std::time::SystemTime::now(),
    );
    let cas = stager::ca::list(dir)?;
    let bundle_sha256 = bundle::release::trust_sha256(&stager::ca::bundle(dir)?);
    let stage = stager::ca::stage(dir);
    let rotated_at = db.setting(stager::ca::ROTATED_AT)?;
    let lacking = match stage {
        stager::ca::Stage::One => Vec::new(),
        _ => stager::ca::lacking_bundle(&listed, &bundle_sha256, rotated_at.as_deref())
            .into_iter()
            .cloned()
            .collect(),
    };
    let old_issued = match db.setting(stager::ca::ISSUING)? {
        Some(issuing) => stager::ca::issued_by_others(&listed, &issuing)
            .into_iter()
            .cloned()
            .collect(),
        None => Vec::new(),
    };
    Ok(CaState {
        stage,
        cas,
        bundle_sha256,
        lacking,
        old_issued,
    })
}

fn ca_next(st: &CaState) -> String {
    use stager::ca::Stage;
    match st.stage {
        Stage::One => "nothing under way; `stager ca rotate` starts replacing the CA".into(),
        Stage::Rotated if st.lacking.is_empty() => {
            "every agent, relay and operator trusts both CAs: `stager ca switch`".into()
        }
        Stage::Rotated => format!(
            "wait for {} name(s) to trust both CAs (agents at their next poll, relays within the hour; operators: `stager operator NAME` anew; machines that are gone: `stager revoke NAME`), then `stager ca switch`",
            st.lacking.len()
        ),
        Stage::Switched if st.old_issued.is_empty() => {
            "every certificate in use is the new CA's: `stager ca retire`".into()
        }
        Stage::Switched => format!(
            "wait for {} name(s) to renew onto the new CA (agents at their next poll, relays within the hour; operators: `stager operator NAME` anew), then `stager ca retire`",
            st.old_issued.len()
        ),
    }
}

fn names(l: &[stager::certs::Listed]) -> String {
    l.iter()
        .map(|l| {
            format!(
                "{} ({}, last used {})",
                l.cert.name,
                l.cert.role,
                l.cert.last_used.as_deref().unwrap_or("never")
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_ca_state(st: &CaState, json: bool, done: Option<&str>) -> Result<()> {
    let next = ca_next(st);
    if json {
        let who = |l: &[stager::certs::Listed]| -> Vec<serde_json::Value> {
            l.iter()
                .map(|l| {
                    serde_json::json!({
                        "name": l.cert.name, "role": l.cert.role,
                        "fingerprint": l.cert.fingerprint, "last_used": l.cert.last_used,
                    })
                })
                .collect()
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "done": done,
                "stage": st.stage,
                "cas": st.cas,
                "bundle_sha256": st.bundle_sha256,
                "lacking_bundle": who(&st.lacking),
                "old_ca_certificates": who(&st.old_issued),
                "next": next,
            }))?
        );
        return Ok(());
    }
    if let Some(d) = done {
        println!("{d}");
    }
    println!("{:<48} {:<8} {:<22} SHA256", "CA", "STATE", "NOT AFTER");
    for c in &st.cas {
        println!(
            "{:<48} {:<8} {:<22} {}",
            c.name, c.state, c.not_after, c.fingerprint
        );
    }
    println!("trust bundle (ca.pem): sha256 {}", st.bundle_sha256);
    if !st.lacking.is_empty() {
        println!("not yet trusting both CAs: {}", names(&st.lacking));
    }
    if !st.old_issued.is_empty() {
        println!(
            "current certificate issued by a CA that no longer issues: {}",
            names(&st.old_issued)
        );
    }
    println!("next: {next}");
    Ok(())
}

pub fn ca(c: CaCommand) -> Result<()> {
    use stager::ca;
    let (home, force, json) = match &c {
        CaCommand::Status(o) | CaCommand::Rotate(o) => (&o.home, false, o.json),
        CaCommand::Switch(o) | CaCommand::Retire(o) => (&o.home, o.force, o.json),
    };
    let dir = &home.dir;
    Store::open(dir)?;
    let config = Config::load(dir)?;
    let db = Db::open(&dir.join(stager::db::FILE))?;
    let done = match c {
        CaCommand::Status(_) => None,
        CaCommand::Rotate(_) => {
            let new = ca::rotate(dir, &config.name, &db)?;
            Some(format!(
                "made a new CA {:?} (sha256 {}), trusted beside the current one; agents and relays are given both at their next poll",
                new.name, new.fingerprint
            ))
        }
        CaCommand::Switch(_) => {
            let st = ca_state(dir, &db)?;
            if st.stage == ca::Stage::Rotated && !st.lacking.is_empty() && !force {
                anyhow::bail!(
                    "not switching: these would not trust the new CA's server certificate: {} (`stager ca status`; --force cuts them off)",
                    names(&st.lacking)
                );
            }
            let (new, server) = ca::switch(dir, &config.name, &db)?;
            Some(format!(
                "the CA {:?} (sha256 {}) issues from now on; server certificate reissued (sha256 {}); every certificate of the old CA is due for renewal",
                new.name, new.fingerprint, server.fingerprint
            ))
        }
        CaCommand::Retire(_) => {
            let st = ca_state(dir, &db)?;
            if st.stage == ca::Stage::Switched && !st.old_issued.is_empty() && !force {
                anyhow::bail!(
                    "not retiring: the current certificate of these is the old CA's: {} (`stager ca status`; --force cuts them off)",
                    names(&st.old_issued)
                );
            }
            let old = ca::retire(dir)?.map_or("the old CA".into(), |o| {
                format!("the CA {:?} (sha256 {})", o.name, o.fingerprint)
            });
            Some(format!(
                "{old} is no longer trusted; ca.old.key removed; agents and relays are given the new bundle at their next poll"
            ))
        }
    };
    print_ca_state(&ca_state(dir, &db)?, json, done.as_deref())
}

pub fn backup(o: BackupOpts) -> Result<()> {
    let mut recipients = Vec::new();
    for r in &o.recipients {
        recipients.push(stager::backup::parse_recipient("--recipient", r)?);
    }
    for f in &o.recipients_files {
        recipients.extend(stager::backup::recipients_file(f)?);
    }
    anyhow::ensure!(
        !recipients.is_empty(),
        "name who can open the backup: --recipient age1… or --recipients-file FILE"
    );
    let mut progress = Terminal::stderr();
    let m = stager::backup::backup(
        &o.home.dir,
        &o.out,
        &recipients,
        !o.no_blobs,
        progress.as_mut(),
    )?;
    if o.json {
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        println!(
            "{}: {} ({} entries, {} unpacked, {} bundle(s){}), sha256 {}; database snapshot of {}, for {} recipient(s)",
            m.path.display(),
            progress::bytes(m.size),
            m.entries,
            progress::bytes(m.unpacked_size),
            m.bundles,
            if m.about.blobs { "" } else { ", without blobs" },
            m.sha256,
            m.about.created,
            recipients.len()
        );
    }
    Ok(())
}

pub fn restore(o: RestoreOpts) -> Result<()> {
    let identity = bundle::payload::load_identity(&o.identity)?;
    let mut progress = Terminal::stderr();
    let scratch = match &o.dir {
        Some(_) => None,
        None => {
            let base = std::env::var_os("TMPDIR").map_or("/var/tmp".into(), PathBuf::from);
            Some(
                tempfile::Builder::new()
                    .prefix("stager-restore-check-")
                    .tempdir_in(&base)
                    .with_context(|| format!("making a directory in {}", base.display()))?,
            )
        }
    };
    let dir = match (&o.dir, &scratch) {
        (Some(d), _) => d.clone(),
        (None, Some(t)) => t.path().join("home"),
        (None, None) => unreachable!("clap requires --dir or --check"),
    };
    let mut r = stager::backup::restore(&o.file, &identity, &dir, progress.as_mut())?;
    if o.check {
        drop(scratch); // removes the restored copy, keys and all
        r.dir = None;
    }
    if o.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let what = format!(
        "stager {:?} as backed up at {} ({} entries, {}; {} certificate(s), {} bundle(s){})",
        r.about.stager,
        r.about.created,
        r.entries,
        progress::bytes(r.unpacked_size),
        r.certificates,
        r.bundles,
        if r.about.blobs { "" } else { ", without blobs" },
    );
    const CHECKED: &str = "database, CA, server and release keys, blobs";
    if o.check {
        println!(
            "{}: a whole backup of {what}; restored into a temporary directory, checked ({CHECKED}) and removed",
            o.file.display()
        );
    } else {
        println!("{}: {what} restored; checked: {CHECKED}", dir.display());
        if !r.missing_blobs.is_empty() {
            println!(
                "without their blobs (a --no-blobs backup): {}; build them again before a job names them",
                r.missing_blobs.join(", ")
            );
        }
        println!("{}", stager::backup::after_restore_note(&r.about));
        println!(
            "serve it with `stager serve --dir {}` where the stager's URL (stager.toml) reaches",
            dir.display()
        );
    }
    Ok(())
}

pub fn serve(o: ServeOpts) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(stager::server::serve(&o.home.dir, o.listen))
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
        image: o.image,
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
