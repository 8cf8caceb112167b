//! The GRUB environment block (`grubenv`): exactly 1024 bytes, a header line, `key=value`
//! lines, padded with `#`. GRUB's `save_env`/`load_env` read and write it in place, which is
//! what makes a one-shot boot possible on BIOS machines: `next_entry` is consumed by the
//! grub.cfg snippet in [`crate::grubcfg`] on the next boot, `saved_entry` stays.
//! (GRUB manual, "Environment block".)

use std::collections::BTreeMap;

pub const SIZE: usize = 1024;
const HEADER: &str = "# GRUB Environment Block\n";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("{0}: not a GRUB environment block (wrong size or header)")]
    NotAnEnvBlock(String),
    #[error("the GRUB environment block would exceed {SIZE} bytes")]
    TooLarge,
    #[error("GRUB environment variable {0:?}: names and values may not contain '=' or newlines")]
    BadVariable(String),
}

/// Parses a block; `what` names it (a path) in errors.
pub fn parse(what: &str, block: &[u8]) -> Result<BTreeMap<String, String>, Error> {
    if block.len() != SIZE || !block.starts_with(HEADER.as_bytes()) {
        return Err(Error::NotAnEnvBlock(what.to_string()));
    }
    let text = String::from_utf8_lossy(&block[HEADER.len()..]);
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

pub fn render(vars: &BTreeMap<String, String>) -> Result<Vec<u8>, Error> {
    let mut out = HEADER.as_bytes().to_vec();
    for (k, v) in vars {
        if k.is_empty() || k.contains(['=', '\n']) || v.contains('\n') {
            return Err(Error::BadVariable(k.clone()));
        }
        out.extend_from_slice(format!("{k}={v}\n").as_bytes());
    }
    if out.len() > SIZE {
        return Err(Error::TooLarge);
    }
    out.resize(SIZE, b'#');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_pads_to_1024_bytes_like_grub_editenv() {
        let mut v = BTreeMap::new();
        v.insert("saved_entry".to_string(), "rescue".to_string());
        v.insert("next_entry".to_string(), "target".to_string());
        let b = render(&v).unwrap();
        assert_eq!(b.len(), 1024);
        assert!(
            b.starts_with(b"# GRUB Environment Block\nnext_entry=target\nsaved_entry=rescue\n#")
        );
        assert_eq!(parse("grubenv", &b).unwrap(), v);
        assert!(parse("x", &b[..1000]).is_err());
        v.insert("big".into(), "x".repeat(1100));
        assert_eq!(render(&v), Err(Error::TooLarge));
        let mut bad = BTreeMap::new();
        bad.insert("a=b".to_string(), "c".to_string());
        assert!(render(&bad).is_err());
    }
}
