//! Bundle names and versions: parsed once into a validated type, so that no later code can
//! build a store path out of `../../etc`.

use crate::{Error, Result};
use std::fmt;

/// `NAME` or `NAME@VERSION`, each `[A-Za-z0-9._+-]`, 1–64 bytes, not starting with `.` or `-`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BundleName(String);

impl BundleName {
    pub fn parse(field: &str, s: &str) -> Result<Self> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && !s.starts_with(['.', '-'])
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'));
        if ok {
            Ok(BundleName(s.to_string()))
        } else {
            Err(Error::Invalid(format!(
                "{field} {s:?} is not valid: use 1-64 of A-Z a-z 0-9 . _ + -, not starting with . or -"
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BundleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Splits `NAME[@VERSION]` as typed on a command line.
pub fn parse_ref(s: &str) -> Result<(BundleName, Option<BundleName>)> {
    match s.split_once('@') {
        Some((n, v)) => Ok((
            BundleName::parse("bundle name", n)?,
            Some(BundleName::parse("bundle version", v)?),
        )),
        None => Ok((BundleName::parse("bundle name", s)?, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_a_directory_are_refused() {
        for bad in [
            "",
            "..",
            ".hidden",
            "-x",
            "a/b",
            "a\\b",
            "a b",
            "é",
            &"x".repeat(65),
        ] {
            assert!(BundleName::parse("name", bad).is_err(), "{bad:?}");
        }
        for good in ["debian-12", "win2022", "1.2.3+build.4", "a_b"] {
            assert!(BundleName::parse("name", good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn ref_splits_at_the_at_sign() {
        let (n, v) = parse_ref("rescue@1.0").unwrap();
        assert_eq!((n.as_str(), v.unwrap().as_str()), ("rescue", "1.0"));
        assert!(parse_ref("rescue").unwrap().1.is_none());
        assert!(parse_ref("rescue@../x").is_err());
    }
}
