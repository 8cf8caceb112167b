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
}
