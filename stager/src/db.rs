//! The state database: SQLite in WAL mode with `synchronous=FULL`, so that an acknowledged
//! job or event (the HTTP response went out after the commit) survives a SIGKILL or a power
//! cut of the stager.
//!
//! Schema changes are numbered migrations applied in [`MIGRATIONS`] order; `user_version`
//! records how far a database has come.

use proto::v1::{
    AgentJob, BundleRef, CreateJob, Event, EventKind, EventRecord, Host, HostJob, HostState, Job,
    JobState, RescueRequest,
};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;
use std::sync::Mutex;

pub const FILE: &str = "state.db";

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE certs (
    fingerprint TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('agent', 'operator')),
    issued TEXT NOT NULL,
    not_after TEXT NOT NULL,
    revoked TEXT
);
CREATE INDEX certs_name ON certs (name);
CREATE TABLE hosts (
    name TEXT PRIMARY KEY,
    enrolled TEXT NOT NULL,
    last_seen TEXT,
    address TEXT,
    phase TEXT,
    network TEXT,
    rescue_requested INTEGER NOT NULL DEFAULT 0,
    rescue_permanent INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created TEXT NOT NULL,
    created_by TEXT NOT NULL,
    target TEXT NOT NULL,
    rescue TEXT NOT NULL,
    hold_in_rescue INTEGER NOT NULL,
    cancelled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE job_hosts (
    job INTEGER NOT NULL REFERENCES jobs (id),
    host TEXT NOT NULL REFERENCES hosts (name),
    state TEXT NOT NULL,
    phase TEXT,
    bytes_done INTEGER NOT NULL DEFAULT 0,
    bytes_total INTEGER,
    rate REAL,
    updated_ms INTEGER,
    updated TEXT,
    last_event INTEGER,
    PRIMARY KEY (job, host)
);
CREATE INDEX job_hosts_host ON job_hosts (host, state);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job INTEGER NOT NULL,
    host TEXT NOT NULL,
    time TEXT NOT NULL,
    address TEXT,
    body TEXT NOT NULL
);
"#,
    r#"
ALTER TABLE jobs ADD COLUMN max_in_flight INTEGER;
ALTER TABLE jobs ADD COLUMN halt_after_failures INTEGER;
ALTER TABLE jobs ADD COLUMN halted TEXT;
"#,
    r#"
ALTER TABLE hosts ADD COLUMN site TEXT;
ALTER TABLE jobs ADD COLUMN max_in_flight_per_site INTEGER;
"#,
    r#"
ALTER TABLE jobs ADD COLUMN canary INTEGER;
"#,
    // Site relays hold certificates too. SQLite cannot change a CHECK: the table is rebuilt
    // (nothing references it).
    r#"
CREATE TABLE certs_new (
    fingerprint TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('agent', 'operator', 'relay')),
    issued TEXT NOT NULL,
    not_after TEXT NOT NULL,
    revoked TEXT
);
INSERT INTO certs_new SELECT fingerprint, name, role, issued, not_after, revoked FROM certs;
DROP TABLE certs;
ALTER TABLE certs_new RENAME TO certs;
CREATE INDEX certs_name ON certs (name);
"#,
    r#"
ALTER TABLE jobs ADD COLUMN halt_at_failure_percent INTEGER;
"#,
    // The sites a relay serves, comma-separated (site names hold no comma): it may act for
    // those sites' hosts only.
    r#"
ALTER TABLE certs ADD COLUMN site TEXT;
"#,
    r#"
ALTER TABLE certs ADD COLUMN sans TEXT;
ALTER TABLE certs ADD COLUMN last_used TEXT;
"#,
    // `stager restore`: when the backup's snapshot was taken and when it was restored, so
    // that certificates this stager issued in between (renewals it has no record of) can
    // be recognized.
    r#"
CREATE TABLE restores (
    backup_created TEXT NOT NULL,
    restored TEXT NOT NULL
);
"#,
    // Replacing the CA (`stager ca`): which CA issued each certificate (its SHA-256; NULL
    // before the first `ca rotate`, which fills it in), which trust bundle the holder of
    // each certificate last said it holds, and the issuing CA.
    r#"
ALTER TABLE certs ADD COLUMN ca TEXT;
ALTER TABLE certs ADD COLUMN trust TEXT;
CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"#,
    // Which agent build each host runs (its User-Agent on the last work poll), and whether
    // a reinstall would go ahead on it (its last `POST /v1/agent/ready`, JSON).
    r#"
ALTER TABLE hosts ADD COLUMN agent TEXT;
ALTER TABLE hosts ADD COLUMN ready TEXT;
"#,
];

pub struct Db {
    conn: Mutex<Connection>,
    /// A running host with no event for this long is shown as silent (`silent_s`).
    pub silent_after_ms: i64,
    /// The stager's own caps (`stager.toml`), across every job: hosts running a job at
    /// once, in all and per site.
    pub max_in_flight: Option<i64>,
    pub max_in_flight_per_site: Option<i64>,
}

/// Who a verified client certificate belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: String,
    pub revoked: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
}

pub fn now() -> String {
    crate::pki::rfc3339(std::time::SystemTime::now())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Db {
    pub fn open(path: &Path) -> anyhow::Result<Db> {
        let conn = Connection::open(path)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        let v: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if v as usize > MIGRATIONS.len() {
            anyhow::bail!(
                "{} is at schema {v}, newer than this stager knows ({}); upgrade the stager",
                path.display(),
                MIGRATIONS.len()
            );
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(v as usize) {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(m)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(Db {
            conn: Mutex::new(conn),
            silent_after_ms: crate::config::default_silent_after() as i64 * 1000,
            max_in_flight: None,
            max_in_flight_per_site: None,
        })
    }

    fn c(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a certificate issued to `name`; `site` is the sites a relay serves
    /// (comma-separated; `None` for agents, whose site is the host's, and operators), `sans`
    /// the names a relay's certificate serves agents under (a renewal issues the same).
    pub fn add_cert(
        &self,
        fp: &str,
        name: &str,
        role: &str,
        not_after: &str,
        site: Option<&str>,
        sans: &[String],
    ) -> rusqlite::Result<()> {
        let c = self.c();
        let sans = (!sans.is_empty()).then(|| sans.join(","));
        c.execute(
            "INSERT INTO certs (fingerprint, name, role, issued, not_after, site, sans, ca)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7,
                     (SELECT value FROM settings WHERE key = 'issuing_ca'))",
            params![fp, name, role, now(), not_after, site, sans],
        )?;
        if role == "agent" {
            c.execute(
                "INSERT OR IGNORE INTO hosts (name, enrolled) VALUES (?1, ?2)",
                params![name, now()],
            )?;
        }
        Ok(())
    }

    pub fn principal(&self, fp: &str) -> rusqlite::Result<Option<Principal>> {
        self.c()
            .query_row(
                "SELECT name, role, revoked IS NOT NULL FROM certs WHERE fingerprint = ?1",
                [fp],
                |r| {
                    Ok(Principal {
                        name: r.get(0)?,
                        role: r.get(1)?,
                        revoked: r.get(2)?,
                    })
                },
            )
            .optional()
    }

    /// Every certificate issued, by name, then in the order issued.
    pub fn certs(&self) -> rusqlite::Result<Vec<crate::certs::Cert>> {
        let c = self.c();
        let mut st = c.prepare(
            "SELECT name, role, site, fingerprint, issued, not_after, revoked, last_used,
                    ca, trust
             FROM certs ORDER BY name, rowid",
        )?;
        let rows = st.query_map([], |r| {
            Ok(crate::certs::Cert {
                name: r.get(0)?,
                role: r.get(1)?,
                sites: r.get(2)?,
                fingerprint: r.get(3)?,
                issued: r.get(4)?,
                not_after: r.get(5)?,
                revoked: r.get(6)?,
                last_used: r.get(7)?,
                ca: r.get(8)?,
                trust: r.get(9)?,
            })
        })?;
        rows.collect()
    }

    /// Whether the certificate `fp` is due for renewal: it ends before `by`, or a CA other
    /// than the issuing one issued it (after `stager ca switch`). False if not on record.
    pub fn cert_due(&self, fp: &str, by: &str) -> rusqlite::Result<bool> {
        Ok(self
            .c()
            .query_row(
                "SELECT not_after < ?2 OR coalesce(ca IS NOT
                    (SELECT value FROM settings WHERE key = 'issuing_ca'), 0)
                 FROM certs WHERE fingerprint = ?1",
                params![fp, by],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(false))
    }

    /// Records that the holder of certificate `fp` holds the trust bundle `sha256`.
    pub fn cert_trust(&self, fp: &str, sha256: &str) -> rusqlite::Result<()> {
        self.c().execute(
            "UPDATE certs SET trust = ?2 WHERE fingerprint = ?1 AND trust IS NOT ?2",
            params![fp, sha256],
        )?;
        Ok(())
    }

    pub fn setting(&self, key: &str) -> rusqlite::Result<Option<String>> {
        self.c()
            .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()
    }

    pub fn set_setting(&self, key: &str, value: &str) -> rusqlite::Result<()> {
        self.c().execute(
            "INSERT INTO settings (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    /// Records that the certificates issued so far with no CA on record were issued by
    /// `ca` (the only CA there was), and that `ca` issues from now on.
    pub fn first_ca(&self, ca: &str) -> rusqlite::Result<()> {
        let c = self.c();
        let tx = c.unchecked_transaction()?;
        tx.execute("UPDATE certs SET ca = ?1 WHERE ca IS NULL", [ca])?;
        tx.execute(
            "INSERT OR IGNORE INTO settings (key, value) VALUES ('issuing_ca', ?1)",
            [ca],
        )?;
        tx.commit()
    }

    /// The sites the relay with certificate `relay_fp` serves (comma-separated) and those of
    /// the certificate `fp` (a host's site, or the sites of a relay below it), when the relay
    /// does not serve them all (hosts without a site, and a relay without one, are one site).
    pub fn relay_site_mismatch(
        &self,
        relay_fp: &str,
        fp: &str,
    ) -> rusqlite::Result<Option<(Option<String>, Option<String>)>> {
        let row: Option<(Option<String>, Option<String>)> = self
            .c()
            .query_row(
                "SELECT r.site, CASE c.role WHEN 'agent' THEN h.site ELSE c.site END
                 FROM certs r, certs c LEFT JOIN hosts h ON h.name = c.name
                 WHERE r.fingerprint = ?1 AND c.fingerprint = ?2",
                params![relay_fp, fp],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(row.filter(|(serves, of)| match of {
            None => !serves_site(serves.as_deref(), None),
            Some(list) => list
                .split(',')
                .any(|s| !serves_site(serves.as_deref(), Some(s))),
        }))
    }

    /// The sites (comma-separated) and the names (SANs) recorded with a relay's certificate.
    pub fn relay_record(
        &self,
        fp: &str,
    ) -> rusqlite::Result<Option<(Option<String>, Vec<String>)>> {
        let row: Option<(Option<String>, Option<String>)> = self
            .c()
            .query_row(
                "SELECT site, sans FROM certs WHERE fingerprint = ?1",
                [fp],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(row.map(|(site, sans)| {
            let sans = sans.map_or(Vec::new(), |s| s.split(',').map(str::to_string).collect());
            (site, sans)
        }))
    }

    /// Records that this database was restored from a backup taken at `backup_created`.
    pub fn record_restore(&self, backup_created: &str) -> rusqlite::Result<()> {
        self.c().execute(
            "INSERT INTO restores (backup_created, restored) VALUES (?1, ?2)",
            params![backup_created, now()],
        )?;
        Ok(())
    }

    /// The periods no record covers: from each restored backup's snapshot to its restore
    /// (RFC 3339 pairs), newest first.
    pub fn unrecorded(&self) -> rusqlite::Result<Vec<(String, String)>> {
        let c = self.c();
        let mut st =
            c.prepare("SELECT backup_created, restored FROM restores ORDER BY rowid DESC")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect()
    }

    /// Records a certificate this stager issued while no record was kept (between a backup
    /// and its restore), as the renewal it was: same name and role as the newest record of
    /// `name`, same sites and names. `None` if `name` has no certificate of `role` on record.
    pub fn adopt_cert(
        &self,
        fp: &str,
        name: &str,
        role: &str,
        not_after: &str,
    ) -> rusqlite::Result<Option<Principal>> {
        let c = self.c();
        let like: Option<(Option<String>, Option<String>)> = c
            .query_row(
                "SELECT site, sans FROM certs WHERE name = ?1 AND role = ?2
                 ORDER BY rowid DESC LIMIT 1",
                params![name, role],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((site, sans)) = like else {
            return Ok(None);
        };
        c.execute(
            "INSERT OR IGNORE INTO certs (fingerprint, name, role, issued, not_after, site, sans)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![fp, name, role, now(), not_after, site, sans],
        )?;
        Ok(Some(Principal {
            name: name.to_string(),
            role: role.to_string(),
            revoked: false,
        }))
    }

    /// The role of the certificates issued to `name`, if any were.
    pub fn role_of(&self, name: &str) -> rusqlite::Result<Option<String>> {
        self.c()
            .query_row(
                "SELECT role FROM certs WHERE name = ?1 LIMIT 1",
                [name],
                |r| r.get(0),
            )
            .optional()
    }

    /// Revokes every certificate issued to `name`; returns how many.
    pub fn revoke(&self, name: &str) -> rusqlite::Result<usize> {
        self.c().execute(
            "UPDATE certs SET revoked = ?2 WHERE name = ?1 AND revoked IS NULL",
            params![name, now()],
        )
    }

    /// Puts `host` in `site` (`None`: no site).
    pub fn set_site(&self, host: &str, site: Option<&str>) -> rusqlite::Result<()> {
        self.c()
            .execute(
                "UPDATE hosts SET site = ?2 WHERE name = ?1",
                params![host, site],
            )
            .map(|_| ())
    }

    pub fn host_exists(&self, name: &str) -> rusqlite::Result<bool> {
        self.c()
            .query_row("SELECT 1 FROM hosts WHERE name = ?1", [name], |_| Ok(()))
            .optional()
            .map(|o| o.is_some())
    }

    /// `host` asked for work from `address`, presenting the certificate `fp`, running the
    /// agent build `agent` (when it said).
    pub fn seen(
        &self,
        host: &str,
        address: &str,
        fp: &str,
        agent: Option<&str>,
    ) -> rusqlite::Result<()> {
        self.c().execute(
            "UPDATE hosts SET last_seen = ?2, address = ?3, agent = COALESCE(?4, agent)
             WHERE name = ?1",
            params![host, now(), address, agent],
        )?;
        self.cert_used(fp)
    }

    /// The certificate `fp` was presented now (as a host asked for work, or a relay whether
    /// its certificate is due): what `stager revoke --replaced` checks.
    pub fn cert_used(&self, fp: &str) -> rusqlite::Result<()> {
        self.c()
            .execute(
                "UPDATE certs SET last_used = ?2 WHERE fingerprint = ?1",
                params![fp, now()],
            )
            .map(|_| ())
    }

    /// Revokes the certificates `fps`; returns how many were not revoked already.
    pub fn revoke_fingerprints(&self, fps: &[String]) -> rusqlite::Result<usize> {
        let c = self.c();
        let mut n = 0;
        for fp in fps {
            n += c.execute(
                "UPDATE certs SET revoked = ?2 WHERE fingerprint = ?1 AND revoked IS NULL",
                params![fp, now()],
            )?;
        }
        Ok(n)
    }

    pub fn hosts(&self) -> rusqlite::Result<Vec<Host>> {
        let c = self.c();
        let mut st = c.prepare(
            "SELECT h.name, h.enrolled, h.last_seen, h.address, h.phase, h.network,
                    h.rescue_requested, h.rescue_permanent,
                    (SELECT MAX(job) FROM job_hosts WHERE host = h.name), h.site, h.agent,
                    h.ready
             FROM hosts h ORDER BY h.name",
        )?;
        let rows = st.query_map([], |r| {
            let network: Option<String> = r.get(5)?;
            Ok(Host {
                name: r.get(0)?,
                enrolled: r.get(1)?,
                last_seen: r.get(2)?,
                address: r.get(3)?,
                phase: r.get(4)?,
                network: network.and_then(|n| serde_json::from_str(&n).ok()),
                rescue_requested: r.get::<_, bool>(6)?.then(|| RescueRequest {
                    permanent: r.get(7).unwrap_or(false),
                }),
                job: r.get::<_, Option<i64>>(8)?.map(|j| j as u64),
                site: r.get(9)?,
                agent: r.get(10)?,
                ready: r
                    .get::<_, Option<String>>(11)?
                    .and_then(|t| serde_json::from_str(&t).ok()),
            })
        })?;
        rows.collect()
    }

    /// Creates a job for `hosts` (hold in rescue and rollout limits as `req` asks). Refuses
    /// unknown hosts and hosts that already have an unfinished job, naming them.
    pub fn create_job(
        &self,
        creator: &str,
        hosts: &[String],
        target: &BundleRef,
        rescue: &BundleRef,
        req: &CreateJob,
    ) -> Result<u64, Refusal> {
        let mut c = self.c();
        let tx = c.transaction()?;
        // Every host that cannot take the job is named at once: a fleet's hosts file is
        // fixed in one pass, not one error at a time.
        let (mut unknown, mut busy) = (Vec::new(), Vec::new());
        for h in hosts {
            let known = tx
                .query_row("SELECT 1 FROM hosts WHERE name = ?1", [h], |_| Ok(()))
                .optional()?
                .is_some();
            if !known {
                unknown.push(format!("{h:?}"));
                continue;
            }
            let job: Option<i64> = tx
                .query_row(
                    "SELECT jh.job FROM job_hosts jh JOIN jobs j ON j.id = jh.job
                     WHERE jh.host = ?1 AND jh.state IN ('pending', 'running') AND j.cancelled = 0",
                    [h],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(j) = job {
                busy.push(format!("{h:?} (job {j})"));
            }
        }
        if !unknown.is_empty() {
            return Err(Refusal::NotFound(format!(
                "{} not enrolled (stager enroll HOST): {}",
                if unknown.len() == 1 {
                    "host is"
                } else {
                    "hosts are"
                },
                listed(&unknown)
            )));
        }
        if !busy.is_empty() {
            return Err(Refusal::Conflict(format!(
                "{} an unfinished job; cancel it first: {}",
                if busy.len() == 1 {
                    "host already has"
                } else {
                    "hosts already have"
                },
                listed(&busy)
            )));
        }
        tx.execute(
            "INSERT INTO jobs (created, created_by, target, rescue, hold_in_rescue,
                               max_in_flight, halt_after_failures, max_in_flight_per_site,
                               canary, halt_at_failure_percent)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                now(),
                creator,
                serde_json::to_string(target).expect("json"),
                serde_json::to_string(rescue).expect("json"),
                req.hold_in_rescue,
                req.max_in_flight,
                req.halt_after_failures,
                req.max_in_flight_per_site,
                req.canary,
                req.halt_at_failure_percent
            ],
        )?;
        let id = tx.last_insert_rowid();
        for h in hosts {
            tx.execute(
                "INSERT INTO job_hosts (job, host, state) VALUES (?1, ?2, 'pending')",
                params![id, h],
            )?;
        }
        tx.commit()?;
        Ok(id as u64)
    }

    pub fn job(&self, id: u64) -> rusqlite::Result<Option<Job>> {
        let c = self.c();
        job_in(&c, id as i64, self.silent_after_ms)
    }

    pub fn jobs(&self) -> rusqlite::Result<Vec<Job>> {
        let c = self.c();
        let ids: Vec<i64> = c
            .prepare("SELECT id FROM jobs ORDER BY id")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut out = Vec::new();
        for id in ids {
            out.extend(job_in(&c, id, self.silent_after_ms)?);
        }
        Ok(out)
    }

    /// Cancels a job: hosts that had not finished are marked cancelled. Returns the hosts
    /// affected; refuses an unknown job, and a job that is over (every host done, failed
    /// or cancelled: its outcome stays).
    pub fn cancel(&self, id: u64) -> Result<Vec<String>, Refusal> {
        let mut c = self.c();
        let tx = c.transaction()?;
        let known = tx
            .query_row("SELECT 1 FROM jobs WHERE id = ?1", [id as i64], |_| Ok(()))
            .optional()?
            .is_some();
        if !known {
            return Err(Refusal::NotFound(format!("no job {id}")));
        }
        let mut hosts: Vec<String> = tx
            .prepare(
                "SELECT host FROM job_hosts WHERE job = ?1 AND state IN ('pending', 'running')",
            )?
            .query_map([id as i64], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        if hosts.is_empty() {
            return Err(Refusal::Conflict(format!(
                "job {id} is over (every host is done, failed or cancelled); nothing to cancel"
            )));
        }
        tx.execute("UPDATE jobs SET cancelled = 1 WHERE id = ?1", [id as i64])?;
        tx.execute(
            "UPDATE job_hosts SET state = 'cancelled', updated = ?2 WHERE job = ?1 AND state IN ('pending', 'running')",
            params![id as i64, now()],
        )?;
        hosts.extend(self.slot_waiters(&tx, id as i64, None)?);
        tx.commit()?;
        Ok(hosts)
    }

    /// The unfinished job of `host`, as the agent sees it. A host that has not taken its
    /// job yet takes it here when its job's `canary`, `max_in_flight` and
    /// `max_in_flight_per_site`, and the stager's own caps across jobs, leave a slot (it
    /// becomes running, and counts against the limits until it finishes); without a slot it
    /// has no work.
    pub fn work_for(&self, host: &str) -> rusqlite::Result<Option<AgentJob>> {
        let mut c = self.c();
        let tx = c.transaction()?;
        let row = tx
            .query_row(
                "SELECT j.id, j.target, j.rescue, j.hold_in_rescue, j.cancelled, jh.state,
                        j.max_in_flight, j.max_in_flight_per_site, j.canary
                 FROM job_hosts jh JOIN jobs j ON j.id = jh.job
                 WHERE jh.host = ?1 AND jh.state IN ('pending', 'running') AND j.cancelled = 0
                 ORDER BY j.id DESC LIMIT 1",
                [host],
                |r| {
                    let t: String = r.get(1)?;
                    let s: String = r.get(2)?;
                    let job = AgentJob {
                        id: r.get::<_, i64>(0)? as u64,
                        host: host.to_string(),
                        target: serde_json::from_str(&t).expect("stored json"),
                        rescue: serde_json::from_str(&s).expect("stored json"),
                        hold_in_rescue: r.get(3)?,
                        cancelled: r.get(4)?,
                    };
                    let limits: (Option<i64>, Option<i64>, Option<i64>) =
                        (r.get(6)?, r.get(7)?, r.get(8)?);
                    Ok((job, r.get::<_, String>(5)?, limits))
                },
            )
            .optional()?;
        let Some((job, state, (max_in_flight, per_site, canary))) = row else {
            return Ok(None);
        };
        if state == "pending" {
            if let Some(n) = canary {
                // The first n to take the job are its canaries; the rest wait for all n
                // to be done.
                let (taken, done): (i64, i64) = tx.query_row(
                    "SELECT COUNT(*) FILTER (WHERE state IN ('running', 'done', 'failed')),
                            COUNT(*) FILTER (WHERE state = 'done')
                     FROM job_hosts WHERE job = ?1",
                    [job.id as i64],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                if taken >= n && done < n {
                    return Ok(None);
                }
            }
            // The job's own caps, then the stager's across every job.
            let job_id = Some(job.id as i64);
            for (max, of_job, at_site) in [
                (max_in_flight, job_id, false),
                (per_site, job_id, true),
                (self.max_in_flight, None, false),
                (self.max_in_flight_per_site, None, true),
            ] {
                if let Some(max) = max {
                    if in_flight(&tx, of_job, at_site.then_some(host))? >= max {
                        return Ok(None);
                    }
                }
            }
            tx.execute(
                "UPDATE job_hosts SET state = 'running', updated = ?3, updated_ms = ?4
                 WHERE job = ?1 AND host = ?2",
                params![job.id as i64, host, now(), now_ms()],
            )?;
            tx.commit()?;
        }
        Ok(Some(job))
    }

    pub fn rescue_request(&self, host: &str) -> rusqlite::Result<Option<RescueRequest>> {
        self.c().query_row(
            "SELECT rescue_requested, rescue_permanent FROM hosts WHERE name = ?1",
            [host],
            |r| {
                Ok(r.get::<_, bool>(0)?.then(|| RescueRequest {
                    permanent: r.get(1).unwrap_or(false),
                }))
            },
        )
    }

    pub fn request_rescue(&self, host: &str, req: &RescueRequest) -> Result<(), Refusal> {
        let n = self.c().execute(
            "UPDATE hosts SET rescue_requested = 1, rescue_permanent = ?2 WHERE name = ?1",
            params![host, req.permanent],
        )?;
        if n == 0 {
            return Err(Refusal::NotFound(format!("host {host:?} is not enrolled")));
        }
        Ok(())
    }

    /// Records an agent's event against its job, and updates the host's progress. When the
    /// event finishes the host, applies the job's rollout: halts the job (cancelling the
    /// hosts that have not taken it) once `halt_after_failures` hosts failed; returns the
    /// job's hosts still waiting for a slot (`max_in_flight`), to be woken.
    pub fn record_event(
        &self,
        host: &str,
        address: &str,
        ev: &Event,
    ) -> Result<Vec<String>, Refusal> {
        let mut c = self.c();
        let tx = c.transaction()?;
        let row: Option<(String, bool, u64, Option<i64>)> = tx
            .query_row(
                "SELECT jh.state, j.cancelled, jh.bytes_done, jh.updated_ms FROM job_hosts jh
                 JOIN jobs j ON j.id = jh.job WHERE jh.job = ?1 AND jh.host = ?2",
                params![ev.job as i64, host],
                |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64, r.get(3)?)),
            )
            .optional()?;
        let Some((state, cancelled, prev_bytes, prev_ms)) = row else {
            return Err(Refusal::NotFound(format!(
                "job {} does not include host {host:?}",
                ev.job
            )));
        };
        if cancelled {
            return Err(Refusal::Conflict(format!("job {} was cancelled", ev.job)));
        }
        let time = now();
        let ms = now_ms();
        let body = serde_json::to_string(ev).expect("json");
        tx.execute(
            "INSERT INTO events (job, host, time, address, body) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![ev.job as i64, host, time, address, body],
        )?;
        let event_id = tx.last_insert_rowid();
        let new_state = match ev.kind {
            // A job its target finished stays finished: the rescue OS reporting, later, that
            // the target no longer comes up (a disk gone, a bad kernel update) is the host's
            // news, kept as its last event, not a rewrite of the job's outcome.
            EventKind::Failed if state == "done" => "done",
            EventKind::Done => "done",
            EventKind::Failed => "failed",
            _ if state == "pending" => "running",
            _ => state.as_str(),
        };
        let rate = match (ev.bytes_done, prev_ms) {
            (Some(b), Some(p)) if b > prev_bytes && ms > p => {
                Some((b - prev_bytes) as f64 * 1000.0 / (ms - p) as f64)
            }
            _ => None,
        };
        tx.execute(
            "UPDATE job_hosts SET state = ?3, phase = COALESCE(?4, phase),
                bytes_done = COALESCE(?5, bytes_done), bytes_total = COALESCE(?6, bytes_total),
                rate = COALESCE(?7, rate), updated_ms = ?8, updated = ?9, last_event = ?10
             WHERE job = ?1 AND host = ?2",
            params![
                ev.job as i64,
                host,
                new_state,
                ev.phase,
                ev.bytes_done.map(|b| b as i64),
                ev.bytes_total.map(|b| b as i64),
                rate,
                ms,
                time,
                event_id
            ],
        )?;
        tx.execute(
            "UPDATE hosts SET last_seen = ?2, address = ?3, phase = COALESCE(?4, phase),
                network = COALESCE(?5, network) WHERE name = ?1",
            params![
                host,
                time,
                address,
                ev.phase,
                ev.network.as_ref().map(|n| n.to_string())
            ],
        )?;
        // The rescue OS acknowledges a rescue request by reporting that it entered it.
        if ev.kind == EventKind::PhaseEntered && ev.phase.as_deref() == Some("rescue") {
            tx.execute(
                "UPDATE hosts SET rescue_requested = 0 WHERE name = ?1",
                [host],
            )?;
        }
        let mut waiting = Vec::new();
        if new_state != state && matches!(new_state, "done" | "failed") {
            halt_if_due(&tx, ev.job as i64, &time)?;
            waiting = self.slot_waiters(&tx, ev.job as i64, Some(host))?;
        }
        tx.commit()?;
        Ok(waiting)
    }

    /// The pending hosts a slot freed in `job` (by `freed` finishing, or by a cancel when
    /// `None`) may let take their job now: those of `job` if it has rollout limits, and under
    /// the stager's own caps those of every job (all of them, or of `freed`'s site). Woken,
    /// each asks `work_for` again.
    fn slot_waiters(
        &self,
        tx: &Connection,
        job: i64,
        freed: Option<&str>,
    ) -> rusqlite::Result<Vec<String>> {
        let everyone = self.max_in_flight.is_some()
            || (self.max_in_flight_per_site.is_some() && freed.is_none());
        let site_of = freed.filter(|_| self.max_in_flight_per_site.is_some());
        tx.prepare(
            "SELECT DISTINCT jh.host FROM job_hosts jh JOIN jobs j ON j.id = jh.job
               JOIN hosts h ON h.name = jh.host
             WHERE jh.state = 'pending' AND j.cancelled = 0
               AND ((jh.job = ?1 AND (j.max_in_flight IS NOT NULL
                                      OR j.max_in_flight_per_site IS NOT NULL
                                      OR j.canary IS NOT NULL))
                    OR ?2
                    OR (?3 IS NOT NULL AND h.site IS (SELECT site FROM hosts WHERE name = ?3)))",
        )?
        .query_map(params![job, everyone, site_of], |r| r.get(0))?
        .collect()
    }

    /// Hosts running a job now, per site (`""` for hosts without one), for `/metrics`.
    pub fn in_flight_by_site(&self) -> rusqlite::Result<Vec<(String, u64)>> {
        let c = self.c();
        let mut st = c.prepare(
            "SELECT COALESCE(h.site, ''), COUNT(*) FROM job_hosts jh JOIN hosts h ON h.name = jh.host
             WHERE jh.state = 'running' GROUP BY 1 ORDER BY 1",
        )?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
        rows.collect()
    }

    /// Records what `host` said of whether a reinstall would go ahead on it, stamped now.
    pub fn set_ready(&self, host: &str, mut ready: proto::v1::Readiness) -> rusqlite::Result<()> {
        ready.at = Some(now());
        let text = serde_json::to_string(&ready).expect("serializes");
        self.c().execute(
            "UPDATE hosts SET ready = ?2 WHERE name = ?1",
            params![host, text],
        )?;
        Ok(())
    }

    /// How many hosts said a reinstall would not go ahead on them, for `/metrics`.
    pub fn hosts_not_ready(&self) -> rusqlite::Result<u64> {
        self.c().query_row(
            "SELECT COUNT(*) FROM hosts WHERE json_extract(ready, '$.ok') = 0",
            [],
            |r| r.get::<_, i64>(0).map(|n| n as u64),
        )
    }

    /// Hosts by the agent build they last polled with (`""`: never polled, or from an agent
    /// that did not say), for `/metrics`.
    pub fn hosts_by_agent(&self) -> rusqlite::Result<Vec<(String, u64)>> {
        let c = self.c();
        let mut st =
            c.prepare("SELECT COALESCE(agent, ''), COUNT(*) FROM hosts GROUP BY 1 ORDER BY 1")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
        rows.collect()
    }

    /// How many jobs a rollout limit halted, for `/metrics`.
    pub fn halted_jobs(&self) -> rusqlite::Result<u64> {
        self.c().query_row(
            "SELECT COUNT(*) FROM jobs WHERE halted IS NOT NULL",
            [],
            |r| r.get::<_, i64>(0).map(|n| n as u64),
        )
    }

    /// How many hosts run a job without a word for `silent_after_ms`, for `/metrics`.
    pub fn silent_hosts(&self) -> rusqlite::Result<u64> {
        self.c().query_row(
            "SELECT COUNT(*) FROM job_hosts jh JOIN jobs j ON j.id = jh.job
             WHERE jh.state = 'running' AND j.cancelled = 0 AND jh.updated_ms <= ?1",
            [now_ms() - self.silent_after_ms],
            |r| r.get::<_, i64>(0).map(|n| n as u64),
        )
    }

    /// Host-job counts by state and phase, for `/metrics`.
    pub fn phase_counts(&self) -> rusqlite::Result<Vec<(String, String, u64)>> {
        let c = self.c();
        let mut st = c.prepare(
            "SELECT state, COALESCE(phase, ''), COUNT(*) FROM job_hosts GROUP BY 1, 2 ORDER BY 1, 2",
        )?;
        let rows = st.query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
        })?;
        rows.collect()
    }
}

/// The first 20 of `items`, comma-separated, and how many more there are.
/// Hosts running a job now: of one job or of all, and of one host's site (hosts without a
/// site are one site: `IS` matches NULL with NULL) or of every site.
fn in_flight(tx: &Connection, job: Option<i64>, site_of: Option<&str>) -> rusqlite::Result<i64> {
    tx.query_row(
        "SELECT COUNT(*) FROM job_hosts jh JOIN hosts h ON h.name = jh.host
         WHERE jh.state = 'running' AND (?1 IS NULL OR jh.job = ?1)
           AND (?2 IS NULL OR h.site IS (SELECT site FROM hosts WHERE name = ?2))",
        params![job, site_of],
        |r| r.get(0),
    )
}

fn listed(items: &[String]) -> String {
    const SHOWN: usize = 20;
    let mut s = items[..items.len().min(SHOWN)].join(", ");
    if items.len() > SHOWN {
        s += &format!(" and {} more", items.len() - SHOWN);
    }
    s
}

/// Halts job `id` if its `halt_after_failures` is reached and it is not halted yet: the
/// hosts that have not taken it are cancelled, and the reason is kept on the job.
fn halt_if_due(c: &Connection, id: i64, time: &str) -> rusqlite::Result<()> {
    let (limit, canary, halted, pct): (Option<i64>, Option<i64>, Option<String>, Option<i64>) = c
        .query_row(
        "SELECT halt_after_failures, canary, halted, halt_at_failure_percent
             FROM jobs WHERE id = ?1",
        [id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    )?;
    if halted.is_some() {
        return Ok(());
    }
    let (failed, done): (i64, i64) = c.query_row(
        "SELECT COUNT(*) FILTER (WHERE state = 'failed'), COUNT(*) FILTER (WHERE state = 'done')
         FROM job_hosts WHERE job = ?1",
        [id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    // While fewer than `canary` hosts are done only canaries run: any failure is theirs.
    // A rate counts once one failure is at most that share of the finished hosts.
    let finished = failed + done;
    let rate_reached = |p: i64| failed > 0 && finished * p >= 100 && failed * 100 >= p * finished;
    let why = match (canary, limit, pct) {
        (Some(1), _, _) if failed > 0 && done < 1 => "the canary".to_string(),
        (Some(n), _, _) if failed > 0 && done < n => format!("among the {n} canaries"),
        (_, Some(k), _) if failed >= k => format!("halt after {k}"),
        (_, _, Some(p)) if rate_reached(p) => format!(
            "{}% of {finished} finished; halt at {p}%",
            failed * 100 / finished
        ),
        _ => return Ok(()),
    };
    let cancelled = c.execute(
        "UPDATE job_hosts SET state = 'cancelled', updated = ?2 WHERE job = ?1 AND state = 'pending'",
        params![id, time],
    )?;
    let hosts = |n: i64| if n == 1 { "host" } else { "hosts" };
    let reason = format!(
        "halted at {time}: {failed} {} failed ({why}); {cancelled} {} that had not taken the job cancelled",
        hosts(failed),
        hosts(cancelled as i64)
    );
    c.execute(
        "UPDATE jobs SET halted = ?2 WHERE id = ?1",
        params![id, reason],
    )?;
    Ok(())
}

fn job_in(c: &Connection, id: i64, silent_after_ms: i64) -> rusqlite::Result<Option<Job>> {
    let head = c
        .query_row(
            "SELECT created, created_by, target, rescue, hold_in_rescue, cancelled,
                    max_in_flight, halt_after_failures, halted, max_in_flight_per_site, canary,
                    halt_at_failure_percent
             FROM jobs WHERE id = ?1",
            [id],
            |r| {
                Ok((
                    (
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, bool>(4)?,
                        r.get::<_, bool>(5)?,
                    ),
                    (
                        r.get::<_, Option<u32>>(6)?,
                        r.get::<_, Option<u32>>(7)?,
                        r.get::<_, Option<String>>(8)?,
                        r.get::<_, Option<u32>>(9)?,
                        r.get::<_, Option<u32>>(10)?,
                        r.get::<_, Option<u32>>(11)?,
                    ),
                ))
            },
        )
        .optional()?;
    let Some((
        (created, created_by, target, rescue, hold, cancelled),
        (
            max_in_flight,
            halt_after_failures,
            halted,
            max_in_flight_per_site,
            canary,
            halt_at_failure_percent,
        ),
    )) = head
    else {
        return Ok(None);
    };
    let mut st = c.prepare(
        "SELECT jh.host, jh.state, jh.phase, jh.bytes_done, jh.bytes_total, jh.rate, jh.updated,
                e.time, e.address, e.body, jh.updated_ms
         FROM job_hosts jh LEFT JOIN events e ON e.id = jh.last_event
         WHERE jh.job = ?1 ORDER BY jh.host",
    )?;
    let now = now_ms();
    let hosts: Vec<HostJob> = st
        .query_map([id], |r| {
            let state: String = r.get(1)?;
            let body: Option<String> = r.get(9)?;
            let quiet = r
                .get::<_, Option<i64>>(10)?
                .map(|u| now.saturating_sub(u))
                .filter(|&q| state == "running" && q >= silent_after_ms);
            Ok(HostJob {
                host: r.get(0)?,
                state: parse_state(&state),
                phase: r.get(2)?,
                bytes_done: r.get::<_, i64>(3)? as u64,
                bytes_total: r.get::<_, Option<i64>>(4)?.map(|b| b as u64),
                rate: r.get(5)?,
                updated: r.get(6)?,
                last_event: match (r.get::<_, Option<String>>(7)?, body) {
                    (Some(time), Some(body)) => Some(EventRecord {
                        time,
                        address: r.get(8)?,
                        event: serde_json::from_str(&body).expect("stored json"),
                    }),
                    _ => None,
                },
                silent_s: quiet.map(|q| q as u64 / 1000),
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let state = if cancelled {
        JobState::Cancelled
    } else if hosts.iter().any(|h| !h.state.is_final()) {
        JobState::Active
    } else if hosts.iter().any(|h| h.state == HostState::Failed) {
        JobState::Failed
    } else {
        JobState::Done
    };
    Ok(Some(Job {
        id: id as u64,
        created,
        created_by,
        target: serde_json::from_str(&target).expect("stored json"),
        rescue: serde_json::from_str(&rescue).expect("stored json"),
        hold_in_rescue: hold,
        max_in_flight,
        halt_after_failures,
        max_in_flight_per_site,
        canary,
        halt_at_failure_percent,
        halted,
        state,
        hosts,
    }))
}

fn parse_state(s: &str) -> HostState {
    match s {
        "pending" => HostState::Pending,
        "running" => HostState::Running,
        "done" => HostState::Done,
        "failed" => HostState::Failed,
        _ => HostState::Cancelled,
    }
}

/// Whether a relay recorded with `sites` (comma-separated; `None`: hosts without a site)
/// serves a host of `site`.
pub fn serves_site(sites: Option<&str>, site: Option<&str>) -> bool {
    match (sites, site) {
        (None, None) => true,
        (Some(list), Some(s)) => list.split(',').any(|x| x == s),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state database written by a stager from before rollout limits (schema 1, with a
    /// job in it) opens, is brought to the current schema, and its job reads with no limits.
    #[test]
    fn a_database_from_before_rollouts_upgrades_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(MIGRATIONS[0]).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
            let b = r#"{"name":"t","version":"1","sha256":"00","size":1}"#;
            c.execute(
                "INSERT INTO jobs (created, created_by, target, rescue, hold_in_rescue)
                 VALUES ('2026-01-01T00:00:00Z', 'alice', ?1, ?1, 0)",
                [b],
            )
            .unwrap();
            c.execute(
                "INSERT INTO certs (fingerprint, name, role, issued, not_after, revoked)
                 VALUES ('ab', 'web1', 'agent', 't', 't', NULL),
                        ('cd', 'bob', 'operator', 't', 't', 't')",
                [],
            )
            .unwrap();
        }
        let db = Db::open(&path).unwrap();
        // The certificates survive the rebuild of their table (schema 5, relays).
        let p = db.principal("ab").unwrap().unwrap();
        assert_eq!(
            (p.name.as_str(), p.role.as_str(), p.revoked),
            ("web1", "agent", false)
        );
        assert!(db.principal("cd").unwrap().unwrap().revoked);
        db.add_cert("ef", "pop-a", "relay", "t", None, &[]).unwrap();
        let job = db.job(1).unwrap().unwrap();
        assert_eq!(
            (job.max_in_flight, job.halt_after_failures, job.halted),
            (None, None, None)
        );
        let v: i64 = db
            .c()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v as usize, MIGRATIONS.len());
    }

    /// The stager's cap in all (`max_in_flight` in `stager.toml`) across three one-host jobs
    /// with no limits of their own: two run, the third waits; the first finishing names the
    /// third as the one to wake, which then takes its job.
    #[test]
    fn the_stagers_cap_in_all_holds_across_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join(FILE)).unwrap();
        db.max_in_flight = Some(2);
        let b: BundleRef =
            serde_json::from_str(r#"{"name":"t","version":"1","sha256":"00","size":1}"#).unwrap();
        let mut jobs = Vec::new();
        for h in ["h1", "h2", "h3"] {
            db.add_cert(h, h, "agent", "2099-01-01T00:00:00Z", None, &[])
                .unwrap();
            let req: CreateJob =
                serde_json::from_str(&format!(r#"{{"hosts":["{h}"],"target":"t"}}"#)).unwrap();
            jobs.push(
                db.create_job("alice", &[h.to_string()], &b, &b, &req)
                    .unwrap(),
            );
        }
        let id = |h: &str| db.work_for(h).unwrap().map(|j| j.id);
        assert_eq!((id("h1"), id("h2")), (Some(jobs[0]), Some(jobs[1])));
        assert_eq!(id("h3"), None, "two in flight already");
        let done: Event =
            serde_json::from_str(&format!(r#"{{"job":{},"kind":"done"}}"#, jobs[0])).unwrap();
        assert_eq!(db.record_event("h1", "127.0.0.1", &done).unwrap(), ["h3"]);
        assert_eq!(id("h3"), Some(jobs[2]));
    }

    /// A relay serves its sites: the hosts of those sites (or, for a relay without a site,
    /// the hosts without one), and no other.
    #[test]
    fn a_relay_serves_its_own_site_only() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join(FILE)).unwrap();
        for (h, site) in [("a1", Some("a")), ("b1", Some("b")), ("n1", None)] {
            db.add_cert(h, h, "agent", "t", None, &[]).unwrap();
            db.set_site(h, site).unwrap();
        }
        db.add_cert("ra", "relay-a", "relay", "t", Some("a"), &[])
            .unwrap();
        db.add_cert("rn", "relay-n", "relay", "t", None, &[])
            .unwrap();
        let sans = ["hub.example".to_string(), "10.0.0.1".to_string()];
        db.add_cert("rab", "hub", "relay", "t", Some("a,b"), &sans)
            .unwrap();
        let m = |r: &str, h: &str| db.relay_site_mismatch(r, h).unwrap();
        assert_eq!((m("rab", "a1"), m("rab", "b1")), (None, None));
        assert_eq!(m("rab", "n1"), Some((Some("a,b".into()), None)));
        assert_eq!(m("ra", "a1"), None);
        assert_eq!(m("ra", "b1"), Some((Some("a".into()), Some("b".into()))));
        assert_eq!(m("ra", "n1"), Some((Some("a".into()), None)));
        assert_eq!(m("rn", "n1"), None);
        assert_eq!(m("rn", "a1"), Some((None, Some("a".into()))));
        // A relay below another: the one above must serve every site of the one below.
        assert_eq!(m("rab", "ra"), None);
        assert_eq!(m("ra", "rab"), Some((Some("a".into()), Some("a,b".into()))));
        assert_eq!(m("rn", "ra"), Some((None, Some("a".into()))));
        assert_eq!(
            db.relay_record("rab").unwrap(),
            Some((Some("a,b".into()), sans.to_vec()))
        );
        assert_eq!(
            db.relay_record("ra").unwrap(),
            Some((Some("a".into()), vec![]))
        );
    }
}
