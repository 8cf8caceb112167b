//! The release signing key: minisign (Ed25519) format, so that the stock `minisign` tool
//! verifies every manifest we sign (`minisign -Vm manifest.json -p release.pub`).
//!
//! The release key is deliberately separate from the TLS CA: a stolen TLS key lets an attacker
//! impersonate a stager, not publish a bundle agents will install.
//!
//! The secret key file is stored unencrypted (mode 0600) because the stager signs without a
//! human at hand; protect the stager home accordingly.

use crate::error::io_err;
use crate::{Error, Result};
use minisign::{PublicKey, PublicKeyBox, SecretKey, SecretKeyBox, SignatureBox};
use std::io::{Cursor, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

pub struct ReleaseKey {
    sk: SecretKey,
    pk: PublicKey,
}

pub struct ReleasePublicKey(PublicKey);

impl ReleaseKey {
    /// Creates a new key pair and writes `key_path` (0600, refusing to overwrite) and `pub_path`.
    pub fn generate(key_path: &Path, pub_path: &Path) -> Result<ReleaseKey> {
        let kp = minisign::KeyPair::generate_encrypted_keypair(Some(String::new()))
            .map_err(|e| key_err(key_path, e))?;
        let sk_box = kp
            .sk
            .to_box(Some("reinstall release signing key (unencrypted)"))
            .map_err(|e| key_err(key_path, e))?;
        let pk_box = kp.pk.to_box().map_err(|e| key_err(pub_path, e))?;
        write_new(key_path, sk_box.to_string().as_bytes(), 0o600)?;
        write_new(pub_path, pk_box.to_string().as_bytes(), 0o644)?;
        Ok(ReleaseKey {
            sk: kp.sk,
            pk: kp.pk,
        })
    }

    pub fn load(key_path: &Path) -> Result<ReleaseKey> {
        let text = std::fs::read_to_string(key_path).map_err(io_err("reading", key_path))?;
        let sk_box = SecretKeyBox::from_string(&text).map_err(|e| key_err(key_path, e))?;
        let sk = sk_box
            .into_secret_key(Some(String::new()))
            .map_err(|e| key_err(key_path, e))?;
        let pk = PublicKey::from_secret_key(&sk).map_err(|e| key_err(key_path, e))?;
        Ok(ReleaseKey { sk, pk })
    }

    /// Signs `data`; returns the text of a `.minisig` file. The trusted comment (covered by the
    /// signature, shown by `minisign -V`) names what was signed.
    pub fn sign(&self, data: &[u8], trusted_comment: &str) -> Result<String> {
        let sig = minisign::sign(
            Some(&self.pk),
            &self.sk,
            Cursor::new(data),
            Some(trusted_comment),
            Some("signature from reinstall release key"),
        )
        .map_err(|e| Error::Invalid(format!("signing: {e}")))?;
        Ok(sig.to_string())
    }
}

impl ReleasePublicKey {
    pub fn load(path: &Path) -> Result<ReleasePublicKey> {
        let text = std::fs::read_to_string(path).map_err(io_err("reading", path))?;
        Self::from_text(&text, path)
    }

    /// Parses the text of a `.pub` file; `what` names where it came from in errors.
    pub fn from_text(text: &str, path: &Path) -> Result<ReleasePublicKey> {
        let pk = PublicKeyBox::from_string(text)
            .and_then(|b| b.into_public_key())
            .map_err(|e| key_err(path, e))?;
        Ok(ReleasePublicKey(pk))
    }

    /// Verifies a `.minisig` over `data`. Legacy (non-prehashed) signatures are refused.
    /// `what` names the signed file in the error.
    pub fn verify(&self, data: &[u8], signature_text: &str, what: &Path) -> Result<()> {
        let fail = |reason: String| Error::Signature {
            path: what.to_path_buf(),
            reason,
        };
        let sig = SignatureBox::from_string(signature_text)
            .map_err(|e| fail(format!("signature file is malformed: {e}")))?;
        minisign::verify(&self.0, &sig, Cursor::new(data), true, false, false)
            .map_err(|e| fail(e.to_string()))
    }
}

/// The PEM certificates of a text (a trust bundle: the stager's `ca.pem`, a relay's, an
/// identity file's `ca`), each as its own PEM block.
pub fn pem_certificates(text: &str) -> Vec<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(b) = rest.find(BEGIN) {
        let Some(e) = rest[b..].find(END) else { break };
        out.push(format!("{}\n", &rest[b..b + e + END.len()]));
        rest = &rest[b + e + END.len()..];
    }
    out
}

/// A trust bundle's SHA-256 (lower-case hex of its text), as agents and relays report the
/// one they hold and the stager compares it with its `ca.pem`.
pub fn trust_sha256(text: &str) -> String {
    use sha2::Digest;
    crate::pipe::hex(&sha2::Sha256::digest(text.as_bytes()))
}

/// Whether the trust bundle `given` keeps a CA certificate of `held` (compared by their
/// base64 bodies): a client takes a new bundle only so (from one CA to two and back to one,
/// one is always kept), never one that would have it trust none of the CAs it trusts now.
pub fn keeps_a_ca(held: &str, given: &str) -> bool {
    let bodies = |t: &str| -> Vec<String> {
        pem_certificates(t)
            .iter()
            .map(|c| {
                c.lines()
                    .filter(|l| !l.starts_with("-----"))
                    .flat_map(|l| l.split_whitespace())
                    .collect()
            })
            .collect()
    };
    let old = bodies(held);
    bodies(given).iter().any(|b| old.contains(b))
}

fn key_err(path: &Path, e: minisign::PError) -> Error {
    Error::Key {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Creates `path` with `mode`, failing if it exists: keys are never silently replaced.
pub fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err("creating", path))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(io_err("writing", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_verifies_and_rejects_edits_and_other_keys() {
        let d = tempfile::tempdir().unwrap();
        let k = ReleaseKey::generate(&d.path().join("k"), &d.path().join("k.pub")).unwrap();
        let other = ReleaseKey::generate(&d.path().join("o"), &d.path().join("o.pub")).unwrap();
        let pk = ReleasePublicKey::load(&d.path().join("k.pub")).unwrap();
        let sig = k.sign(b"hello\n", "t").unwrap();
        pk.verify(b"hello\n", &sig, Path::new("m")).unwrap();
        assert!(pk.verify(b"hellO\n", &sig, Path::new("m")).is_err());
        let osig = other.sign(b"hello\n", "t").unwrap();
        let e = pk.verify(b"hello\n", &osig, Path::new("m")).unwrap_err();
        assert!(e.to_string().contains("key id"), "{e}");
        // Reloading the secret key gives the same public key.
        let k2 = ReleaseKey::load(&d.path().join("k")).unwrap();
        pk.verify(b"x", &k2.sign(b"x", "t").unwrap(), Path::new("m"))
            .unwrap();
        // Never overwritten.
        assert!(ReleaseKey::generate(&d.path().join("k"), &d.path().join("k2.pub")).is_err());
    }

    /// Trust bundles: split into their certificates whatever the line breaks around them;
    /// a new one is taken only if it keeps a certificate of the one held.
    #[test]
    fn a_trust_bundle_keeps_a_ca_or_is_not_taken() {
        let cert = |body: &str| {
            format!("-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n")
        };
        let (a, b, c) = (cert("QUFB\nQUE="), cert("QkJC"), cert("Q0ND"));
        let both = format!("{a}{b}");
        assert_eq!(pem_certificates(&both), [a.clone(), b.clone()]);
        assert_eq!(pem_certificates("no certificate"), Vec::<String>::new());
        assert!(keeps_a_ca(&a, &both) && keeps_a_ca(&both, &b));
        // The same certificate with its base64 wrapped otherwise is the same certificate.
        assert!(keeps_a_ca(&a, &cert("QUFBQUE=")));
        assert!(!keeps_a_ca(&both, &c) && !keeps_a_ca(&a, "") && !keeps_a_ca("", &a));
        assert_ne!(trust_sha256(&a), trust_sha256(&both));
        assert_eq!(
            trust_sha256(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
