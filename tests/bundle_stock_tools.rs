//! Every layer of a bundle is readable with the tools an operator already has
//! (DESIGN.md §4): minisign for the signature, age, zstd/gzip and tar for the payload.

use integration_tests::*;
use std::process::Command;

fn listing_has_the_tree(listing: &str) {
    for needle in ["./", "fifo", "sub/h3", "abs_link -> /etc/passwd", "capfile"] {
        assert!(
            listing.contains(needle),
            "{needle:?} missing from:\n{listing}"
        );
    }
    // Device nodes are listed as such, with their numbers.
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with('c') && l.contains("1,3") && l.ends_with("chr")),
        "char device missing from:\n{listing}"
    );
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with('h') && l.contains("link to")),
        "hard link missing from:\n{listing}"
    );
}

#[test]
fn minisign_verifies_the_manifest_signature() {
    let w = scratch();
    let src = w.path().join("src");
    make_special_tree(&src);
    let (home, ex) = build_and_export(w.path(), &src, &[]);
    let out = ok(Command::new("minisign")
        .arg("-Vm")
        .arg(ex.join("manifest.json"))
        .arg("-p")
        .arg(home.join("release.pub")));
    assert!(
        out.contains("Signature and comment signature verified"),
        "{out}"
    );
    // And a stock verifier notices an edit.
    let m = ex.join("manifest.json");
    let text = std::fs::read_to_string(&m)
        .unwrap()
        .replace("\"target\"", "\"rescue\"");
    std::fs::write(&m, text).unwrap();
    fails(
        Command::new("minisign")
            .arg("-Vm")
            .arg(&m)
            .arg("-p")
            .arg(home.join("release.pub")),
    );
}

#[test]
fn age_zstd_tar_list_the_payload() {
    let w = scratch();
    let src = w.path().join("src");
    make_special_tree(&src);
    let (_, ex) = build_and_export(w.path(), &src, &[]);
    let listing = sh(&format!(
        "cd {} && age -d -i identity.txt payload.age | zstd -d | tar -tv",
        ex.display()
    ));
    listing_has_the_tree(&listing);
}

#[test]
fn age_gzip_tar_list_a_gzip_payload() {
    let w = scratch();
    let src = w.path().join("src");
    make_special_tree(&src);
    let (home, ex) = build_and_export(w.path(), &src, &["--compression", "gzip"]);
    let listing = sh(&format!(
        "cd {} && age -d -i identity.txt payload.age | gzip -d | tar -tv",
        ex.display()
    ));
    listing_has_the_tree(&listing);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ex.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["payload"]["compression"], "gzip");
    // Our own verify and unpack read it too.
    ok(reinstall()
        .args(["bundle", "verify", "--pubkey"])
        .arg(home.join("release.pub"))
        .arg(&ex));
}
