//! Bad bundles get a one-line reason, a non-zero exit, and nothing written outside the target;
//! `verify` refuses every one of them without unpacking; an unpack that fails part-way leaves
//! the target marked unusable.

use integration_tests::*;
use std::path::{Path, PathBuf};
use tar::EntryType;

const MARKER: &str = ".reinstall-incomplete";

struct Case {
    _work: tempfile::TempDir,
    root: PathBuf,
    home: PathBuf,
}

impl Case {
    fn new() -> Case {
        let work = scratch();
        let root = work.path().to_path_buf();
        let home = root.join("home");
        ok(stager().arg("init").arg("--dir").arg(&home));
        // A canary beside the target: nothing may appear in or next to it.
        std::fs::create_dir(root.join("outside")).unwrap();
        Case {
            _work: work,
            root,
            home,
        }
    }

    fn good_bundle(&self) -> PathBuf {
        let src = self.root.join("src");
        make_special_tree(&src);
        build_and_export(&self.root, &src, &[]).1
    }

    fn verify(&self, dir: &Path) -> String {
        let err = fails(
            reinstall()
                .args(["bundle", "verify", "--pubkey"])
                .arg(self.home.join("release.pub"))
                .arg(dir),
        );
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "reason is not one line: {err}"
        );
        err
    }

    /// Runs unpack, which must fail; returns (stderr, target).
    fn unpack(&self, dir: &Path) -> (String, PathBuf) {
        let target = self.root.join("target");
        let before = listing(&self.root, &target);
        let err = fails(&mut unpack_cmd(&self.home, dir, &target));
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "reason is not one line: {err}"
        );
        assert_eq!(
            before,
            listing(&self.root, &target),
            "something was written outside the target"
        );
        assert_eq!(
            std::fs::read_dir(self.root.join("outside"))
                .unwrap()
                .count(),
            0
        );
        (err, target)
    }
}

/// Every path under `root` except those under `skip`.
fn listing(root: &Path, skip: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.starts_with(skip) {
                continue;
            }
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p.clone());
            }
            v.push(p);
        }
    }
    v.sort();
    v
}

fn assert_has(err: &str, want: &str) {
    assert!(err.contains(want), "expected {want:?} in: {err}");
}

fn copy_bundle(from: &Path, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for f in [
        "manifest.json",
        "manifest.json.minisig",
        "payload.age",
        "identity.txt",
    ] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
    to.to_path_buf()
}

#[test]
fn a_flipped_byte_anywhere_in_the_blob_is_refused() {
    let c = Case::new();
    let good = c.good_bundle();
    let len = std::fs::metadata(good.join("payload.age")).unwrap().len() as usize;
    for (i, at) in [0, 40, 200, len / 2, len - 1].into_iter().enumerate() {
        let d = copy_bundle(&good, &c.root.join(format!("flip{i}")));
        let mut bytes = std::fs::read(d.join("payload.age")).unwrap();
        bytes[at] ^= 0x01;
        std::fs::write(d.join("payload.age"), bytes).unwrap();
        assert_has(&c.verify(&d), "SHA-256 is");
        let (err, target) = c.unpack(&d);
        assert!(
            err.contains("SHA-256") || err.contains("cannot decrypt"),
            "byte {at}: {err}"
        );
        assert!(
            target.join(MARKER).exists(),
            "byte {at}: target not marked unusable"
        );
        std::fs::remove_dir_all(&target).unwrap();
    }
}

#[test]
fn a_truncated_or_extended_blob_is_refused_before_decrypting() {
    let c = Case::new();
    let good = c.good_bundle();
    let d = copy_bundle(&good, &c.root.join("short"));
    let bytes = std::fs::read(d.join("payload.age")).unwrap();
    std::fs::write(d.join("payload.age"), &bytes[..bytes.len() - 100]).unwrap();
    assert_has(&c.verify(&d), "the manifest says");
    let (err, target) = c.unpack(&d);
    assert_has(&err, "size is");
    assert!(
        !target.exists(),
        "nothing is created when the size is wrong"
    );

    let d = copy_bundle(&good, &c.root.join("long"));
    let mut bytes = std::fs::read(d.join("payload.age")).unwrap();
    bytes.extend_from_slice(b"trailing junk");
    std::fs::write(d.join("payload.age"), &bytes).unwrap();
    assert_has(&c.verify(&d), "size is");
    c.unpack(&d);
}

#[test]
fn an_edited_manifest_or_another_keys_signature_is_refused() {
    let c = Case::new();
    let good = c.good_bundle();
    let d = copy_bundle(&good, &c.root.join("edited"));
    let m = std::fs::read_to_string(d.join("manifest.json")).unwrap();
    std::fs::write(
        d.join("manifest.json"),
        m.replace("\"target\"", "\"rescue\""),
    )
    .unwrap();
    assert_has(&c.verify(&d), "does not verify with the release key");
    c.unpack(&d);

    // Same bytes, signed by a key the agent does not pin.
    let other = c.root.join("other-home");
    ok(stager().arg("init").arg("--dir").arg(&other));
    let d = copy_bundle(&good, &c.root.join("otherkey"));
    let key = bundle::release::ReleaseKey::load(&other.join("release.key")).unwrap();
    let sig = key
        .sign(&std::fs::read(d.join("manifest.json")).unwrap(), "x")
        .unwrap();
    std::fs::write(d.join("manifest.json.minisig"), sig).unwrap();
    assert_has(&c.verify(&d), "key id");
    c.unpack(&d);
}

/// Appends entries to a tar under construction.
type TarBuild = dyn FnOnce(&mut tar::Builder<Vec<u8>>);

fn forged(c: &Case, name: &str, build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> PathBuf {
    let mut b = tar::Builder::new(Vec::new());
    raw_entry(&mut b, EntryType::Directory, b"./", b"", b"");
    raw_entry(&mut b, EntryType::Regular, b"ok.txt", b"", b"fine\n");
    build(&mut b);
    let bytes = b.into_inner().unwrap();
    forge_bundle(&c.home, &c.root.join(name), &bytes, |_| {})
}

#[test]
fn entries_that_would_escape_the_target_are_refused() {
    let c = Case::new();
    let cases: Vec<(&str, Box<TarBuild>, &str)> = vec![
        (
            "dotdot",
            Box::new(|b| raw_entry(b, EntryType::Regular, b"../outside/evil", b"", b"x")),
            "`..`",
        ),
        (
            "absolute",
            Box::new(|b| raw_entry(b, EntryType::Regular, b"/tmp/reinstall-evil", b"", b"x")),
            "absolute path",
        ),
        (
            "through-symlink",
            Box::new(|b| {
                raw_entry(b, EntryType::Symlink, b"sneaky", b"../outside", b"");
                raw_entry(b, EntryType::Regular, b"sneaky/evil", b"", b"x");
            }),
            "through the symlink sneaky",
        ),
        (
            "through-abs-symlink",
            Box::new(|b| {
                raw_entry(b, EntryType::Symlink, b"etc", b"/etc", b"");
                raw_entry(b, EntryType::Regular, b"etc/reinstall-evil", b"", b"x");
            }),
            "through the symlink etc",
        ),
        (
            "hardlink-out",
            Box::new(|b| raw_entry(b, EntryType::Link, b"pw", b"../../../../etc/passwd", b"")),
            "hard link target",
        ),
        (
            "hardlink-abs",
            Box::new(|b| raw_entry(b, EntryType::Link, b"pw", b"/etc/passwd", b"")),
            "absolute path",
        ),
        (
            "fake-marker",
            Box::new(|b| raw_entry(b, EntryType::Regular, MARKER.as_bytes(), b"", b"")),
            "reserved",
        ),
    ];
    for (name, build, reason) in cases {
        let d = forged(&c, name, build);
        assert_has(&c.verify(&d), reason);
        let (err, target) = c.unpack(&d);
        assert_has(&err, reason);
        assert!(
            target.join(MARKER).exists(),
            "{name}: target not marked unusable"
        );
        assert!(!Path::new("/tmp/reinstall-evil").exists());
        assert!(!Path::new("/etc/reinstall-evil").exists());
        std::fs::remove_dir_all(&target).unwrap();
    }
}

#[test]
fn a_payload_holding_more_than_its_manifest_says_is_stopped() {
    let c = Case::new();
    let many = |b: &mut tar::Builder<Vec<u8>>| {
        for i in 0..2000 {
            raw_entry(b, EntryType::Regular, format!("f{i}").as_bytes(), b"", b"");
        }
    };
    // Entry count far over the manifest's.
    let mut b = tar::Builder::new(Vec::new());
    many(&mut b);
    let tar = b.into_inner().unwrap();
    let d = forge_bundle(&c.home, &c.root.join("entries"), &tar, |m| {
        m.contents.entries = 10
    });
    assert_has(&c.verify(&d), "more than 10 entries");
    let (err, target) = c.unpack(&d);
    assert_has(&err, "more than 10 entries");
    assert!(target.join(MARKER).exists());
    let written = std::fs::read_dir(&target).unwrap().count();
    assert!(written <= 11, "{written} entries written past the limit");
    std::fs::remove_dir_all(&target).unwrap();

    // 64 MiB of zeros (compresses to almost nothing) where the manifest promises 1 KiB.
    let zeros = vec![0u8; 64 << 20];
    let mut b = tar::Builder::new(Vec::new());
    raw_entry(&mut b, EntryType::Regular, b"bomb", b"", &zeros);
    let tar = b.into_inner().unwrap();
    let d = forge_bundle(&c.home, &c.root.join("bytes"), &tar, |m| {
        m.contents.tar_size = 4096;
        m.contents.unpacked_size = 1024;
    });
    assert_has(&c.verify(&d), "decompressed stream is over 4096 bytes");
    let (err, target) = c.unpack(&d);
    assert_has(&err, "decompression bomb");
    assert!(target.join(MARKER).exists());
    std::fs::remove_dir_all(&target).unwrap();

    // An honest tar_size but an unpacked size that lies.
    let d = forge_bundle(&c.home, &c.root.join("sizes"), &tar, |m| {
        m.contents.unpacked_size = 1024;
    });
    assert_has(&c.verify(&d), "entries hold more than 1024 bytes");
    let (_, target) = c.unpack(&d);
    let bomb = std::fs::metadata(target.join("bomb"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert_eq!(bomb, 0, "the oversized entry was written");
}

#[test]
fn a_good_bundle_unpacks_and_the_marker_is_gone() {
    // The control for the cases above: the same harness accepts a good bundle.
    let c = Case::new();
    let good = c.good_bundle();
    let out = ok(reinstall()
        .args(["bundle", "verify", "--json", "--pubkey"])
        .arg(c.home.join("release.pub"))
        .arg(&good));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["checked"], "signature,size,sha256,contents");
    let target = c.root.join("target");
    ok(&mut unpack_cmd(&c.home, &good, &target));
    assert!(!target.join(MARKER).exists());
    assert!(target.join("sub/h3").exists());
    // A second unpack into the now non-empty target is refused, and touches nothing.
    let err = fails(&mut unpack_cmd(&c.home, &good, &target));
    assert_has(&err, "is not empty");
}
