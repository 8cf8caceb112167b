//! The certificates this stager issued, as an operator needs to see them: which one each
//! name uses now, which a renewal replaced, which expired or were revoked, and which names
//! run out soon (`stager certs`, `stager_identities_expiring` in `/metrics`). An agent
//! renews its own certificate ([`crate::api`]'s `POST /v1/agent/identity`); the server
//! certificate is renewed by `stager server-cert --renew`; operators' and relays' are
//! reissued by hand.

use serde::Serialize;
use std::collections::HashMap;
use std::time::SystemTime;

/// Every certificate of this stager that can run out: those `state.db` records, the
/// stager's own server certificate (role `server`, named after the stager), read from
/// `server.pem`, whose end cuts every agent off, and the CAs of `ca.pem` (role `ca`, named
/// by their CN), whose end cuts off everyone.
pub fn all(
    dir: &std::path::Path,
    stager_name: &str,
    db: &crate::db::Db,
) -> anyhow::Result<Vec<Cert>> {
    let mut certs = db.certs()?;
    let server = crate::pki::cert_info(&dir.join(crate::pki::SERVER_CERT))?;
    certs.push(Cert {
        name: stager_name.to_string(),
        role: "server".into(),
        sites: None,
        fingerprint: server.fingerprint,
        issued: String::new(),
        not_after: crate::pki::rfc3339(server.not_after),
        revoked: None,
        last_used: None,
        ca: None,
        trust: None,
    });
    for c in crate::ca::list(dir)? {
        certs.push(Cert {
            name: c.name,
            role: "ca".into(),
            sites: None,
            fingerprint: c.fingerprint,
            issued: String::new(),
            not_after: c.not_after,
            revoked: None,
            last_used: None,
            ca: None,
            trust: None,
        });
    }
    Ok(certs)
}

/// A certificate as `state.db` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cert {
    pub name: String,
    pub role: String,
    /// A relay's sites, comma-separated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sites: Option<String>,
    pub fingerprint: String,
    /// When `state.db` recorded it (empty for the server certificate, which it does not).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub issued: String,
    pub not_after: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked: Option<String>,
    /// When it was last presented asking for work (a host) or whether it is due (a relay).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_used: Option<String>,
    /// The SHA-256 of the CA that issued it (recorded from the first `stager ca rotate` on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// The SHA-256 of the trust bundle its holder last said it holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Standing {
    /// The certificate its name uses: not revoked, not expired, the latest to end.
    Current,
    /// Still valid, but a later certificate of the same name (a renewal) ends later.
    Replaced,
    Expired,
    Revoked,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listed {
    #[serde(flatten)]
    pub cert: Cert,
    pub standing: Standing,
    /// Whole days until `not_after` (negative once expired).
    pub days_left: i64,
}

fn secs(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn parsed(rfc3339: &str) -> SystemTime {
    humantime::parse_rfc3339(rfc3339).unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Whole days from `now` until `end` (negative, rounded down, once it has passed).
pub fn days_left(end: SystemTime, now: SystemTime) -> i64 {
    (secs(end) - secs(now)).div_euclid(86_400)
}

/// Each certificate with its standing at `now`, in the order given (each name's in the
/// order they were issued).
pub fn standings(certs: Vec<Cert>, now: SystemTime) -> Vec<Listed> {
    let now_s = secs(now);
    // Per name, the certificate neither revoked nor expired that ends last (of two ending
    // the same second, the one issued later: later in `certs`).
    let mut latest: HashMap<&str, (i64, usize)> = HashMap::new();
    for (i, c) in certs
        .iter()
        .enumerate()
        .filter(|(_, c)| c.revoked.is_none())
    {
        let end = secs(parsed(&c.not_after));
        if end > now_s {
            let e = latest.entry(c.name.as_str()).or_insert((end, i));
            *e = (*e).max((end, i));
        }
    }
    let current: Vec<usize> = latest.values().map(|&(_, i)| i).collect();
    certs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let end = parsed(&c.not_after);
            let standing = if c.revoked.is_some() {
                Standing::Revoked
            } else if secs(end) <= now_s {
                Standing::Expired
            } else if current.contains(&i) {
                Standing::Current
            } else {
                Standing::Replaced
            };
            Listed {
                cert: c.clone(),
                standing,
                days_left: days_left(end, now),
            }
        })
        .collect()
}

/// The certificates of `name` that a renewal replaced (what `stager revoke --replaced`
/// revokes), and of those the ones still in use: presented later than `name`'s current
/// certificate was last (or, if it never was, issued). Its holder may not have stored the
/// renewal (or a clone of the machine holds the old one): revoking would cut it off. Times
/// are whole seconds: the same second does not count.
pub fn replaced<'a>(listed: &'a [Listed], name: &str) -> (Vec<&'a Listed>, Vec<&'a Listed>) {
    let of = |s: Standing| {
        listed
            .iter()
            .filter(move |l| l.cert.name == name && l.standing == s)
    };
    let replaced: Vec<&Listed> = of(Standing::Replaced).collect();
    let since = of(Standing::Current)
        .next()
        .map(|c| parsed(c.cert.last_used.as_deref().unwrap_or(&c.cert.issued)));
    let in_use = replaced
        .iter()
        .copied()
        .filter(|l| match (&l.cert.last_used, since) {
            (Some(used), Some(since)) => parsed(used) > since,
            _ => false,
        })
        .collect();
    (replaced, in_use)
}

/// The names that run out of certificates within `days`: their current certificate ends
/// by then, or every certificate of theirs that is not revoked has expired already. One
/// entry per name: its current certificate, or the last of its expired ones.
pub fn expiring(listed: &[Listed], days: i64) -> Vec<&Listed> {
    let mut best: HashMap<&str, &Listed> = HashMap::new();
    for l in listed.iter().filter(|l| l.standing != Standing::Revoked) {
        let e = best.entry(l.cert.name.as_str()).or_insert(l);
        // The name's current certificate if it has one, else the last to have expired.
        if l.standing == Standing::Current
            || (e.standing != Standing::Current && l.days_left > e.days_left)
        {
            *e = l;
        }
    }
    let mut out: Vec<&Listed> = best
        .into_values()
        .filter(|l| {
            matches!(l.standing, Standing::Current | Standing::Expired) && l.days_left < days
        })
        .collect();
    out.sort_by(|a, b| (a.days_left, &a.cert.name).cmp(&(b.days_left, &b.cert.name)));
    out
}

/// Whether a certificate this stager's CA signed but has no record of may be taken as issued
/// while no record was kept: between a restored backup's snapshot and its restore
/// (`windows`: RFC 3339 pairs as [`crate::db::Db::unrecorded`] gives them). It must start
/// within one (client certificates start [`crate::pki::CLIENT_BACKDATE_SECS`] before their
/// issue; five minutes more for the clocks of the old and the new stager machine), and say
/// in its subject which name and role it is for (CN, OU). The name and role, or why not.
pub fn adoptable(
    info: &crate::pki::CertInfo,
    windows: &[(String, String)],
) -> Result<(String, String), String> {
    let (Some(name), Some(role)) = (&info.cn, &info.ou) else {
        return Err("its subject names no client (CN and OU)".into());
    };
    if !matches!(role.as_str(), "agent" | "operator" | "relay") {
        return Err(format!("its OU {role:?} is not a client's role"));
    }
    let back = std::time::Duration::from_secs(crate::pki::CLIENT_BACKDATE_SECS as u64 + 300);
    let slack = std::time::Duration::from_secs(300);
    let within = windows.iter().any(|(from, to)| {
        match (humantime::parse_rfc3339(from), humantime::parse_rfc3339(to)) {
            (Ok(from), Ok(to)) => info.not_before + back >= from && info.not_before <= to + slack,
            _ => false,
        }
    });
    if !within {
        return Err(format!(
            "it starts at {}, outside every period between a backup and its restore",
            crate::pki::rfc3339(info.not_before)
        ));
    }
    Ok((name.clone(), role.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(days: i64) -> String {
        let t =
            SystemTime::UNIX_EPOCH + Duration::from_secs((1_000 * 86_400 + days * 86_400) as u64);
        crate::pki::rfc3339(t)
    }

    fn cert(name: &str, fp: &str, ends_in: i64, revoked: bool) -> Cert {
        Cert {
            name: name.into(),
            role: "agent".into(),
            sites: None,
            fingerprint: fp.into(),
            issued: at(-1),
            not_after: at(ends_in),
            revoked: revoked.then(|| at(-1)),
            last_used: None,
            ca: None,
            trust: None,
        }
    }

    /// What `stager revoke --replaced` takes: the replaced ones, and of those the ones used
    /// after the current one was issued (strictly: the same second does not count).
    #[test]
    fn replaced_certificates_and_those_still_in_use() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000 * 86_400 + 3600);
        let mut old = cert("web1", "a", 20, false);
        let mut older = cert("web1", "o", 10, false);
        let mut new = cert("web1", "b", 800, false);
        new.issued = at(0);
        old.last_used = Some(at(0));
        older.last_used = Some(at(-1));
        let gone = cert("web1", "r", 30, true);
        let other = cert("web2", "c", 20, false);
        let l = standings(vec![older, old, gone, new, other], now);
        let (all, in_use) = replaced(&l, "web1");
        let fps = |v: &[&Listed]| {
            v.iter()
                .map(|l| l.cert.fingerprint.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(fps(&all), ["o", "a"]);
        assert!(in_use.is_empty(), "used in the second of the renewal");
        let mut l = l;
        l[1].cert.last_used = Some(crate::pki::rfc3339(parsed(&at(0)) + Duration::from_secs(1)));
        let (_, in_use) = replaced(&l, "web1");
        assert_eq!(fps(&in_use), ["a"]);
        // Once the current one is presented after it, the old one is no longer in use.
        l[3].cert.last_used = Some(crate::pki::rfc3339(parsed(&at(0)) + Duration::from_secs(2)));
        assert!(replaced(&l, "web1").1.is_empty());
        assert_eq!(replaced(&l, "web2"), (vec![], vec![]));
    }

    #[test]
    fn a_renewal_replaces_and_expiring_names_are_found_once() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000 * 86_400 + 3600);
        let l = standings(
            vec![
                cert("web1", "a", 20, false),  // renewed: replaced by b
                cert("web1", "b", 800, false), // replaced by g, which ends the same second
                cert("web1", "g", 800, false), // current
                cert("web2", "c", 10, false),  // current, ends soon
                cert("web3", "d", -5, false),  // expired, nothing else
                cert("web4", "e", 5, true),    // revoked
                cert("web4", "f", 400, false), // current
            ],
            now,
        );
        let s: Vec<(&str, Standing, i64)> = l
            .iter()
            .map(|l| (l.cert.fingerprint.as_str(), l.standing, l.days_left))
            .collect();
        assert_eq!(
            s,
            [
                ("a", Standing::Replaced, 19),
                ("b", Standing::Replaced, 799),
                ("g", Standing::Current, 799),
                ("c", Standing::Current, 9),
                ("d", Standing::Expired, -6),
                ("e", Standing::Revoked, 4),
                ("f", Standing::Current, 399),
            ]
        );
        let names = |d| -> Vec<String> {
            expiring(&l, d)
                .iter()
                .map(|l| format!("{}:{}", l.cert.name, l.cert.fingerprint))
                .collect()
        };
        assert_eq!(names(30), ["web3:d", "web2:c"]);
        assert_eq!(names(0), ["web3:d"]);
        assert_eq!(names(500), ["web3:d", "web2:c", "web4:f"]);
        assert_eq!(names(900), ["web3:d", "web2:c", "web4:f", "web1:g"]);
    }

    #[test]
    fn a_certificate_missing_from_a_restored_record_is_taken_only_from_its_period() {
        let t = |s: &str| humantime::parse_rfc3339(s).unwrap();
        let info = |start: &str, cn: Option<&str>, ou: Option<&str>| crate::pki::CertInfo {
            fingerprint: "ab".into(),
            not_before: t(start),
            not_after: t("2030-01-01T00:00:00Z"),
            sans: vec![],
            cn: cn.map(str::to_string),
            ou: ou.map(str::to_string),
        };
        // Backed up at 10:00, restored at 18:00: issued from 10:00 on starts from 08:00 on.
        let w = vec![(
            "2026-05-01T10:00:00Z".to_string(),
            "2026-05-01T18:00:00Z".to_string(),
        )];
        for (start, ok) in [
            ("2026-05-01T08:00:00Z", true),
            ("2026-05-01T07:56:00Z", true),
            ("2026-05-01T07:50:00Z", false),
            ("2026-05-01T15:59:00Z", true),
            ("2026-05-01T18:04:00Z", true),
            ("2026-05-01T18:10:00Z", false),
        ] {
            let got = adoptable(&info(start, Some("web1"), Some("agent")), &w);
            assert_eq!(got.is_ok(), ok, "{start}: {got:?}");
        }
        let mid = "2026-05-01T12:00:00Z";
        assert_eq!(
            adoptable(&info(mid, Some("r1"), Some("relay")), &w),
            Ok(("r1".into(), "relay".into()))
        );
        assert!(adoptable(&info(mid, Some("s"), Some("server")), &w).is_err());
        assert!(adoptable(&info(mid, None, Some("agent")), &w).is_err());
        assert!(adoptable(&info(mid, Some("web1"), Some("agent")), &[]).is_err());
    }
}
