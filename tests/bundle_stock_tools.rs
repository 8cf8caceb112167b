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

/// A Windows target bundle from (synthetic) installation media: the stock tools read every
/// layer down to the WIM inside (wimlib's own `wimlib-imagex`), which holds the chosen image
/// alone, pipable; WinPE carries the stage script and is bootable. Media lacking a piece, or
/// holding several images when none is chosen, are refused naming the file or the choice.
#[test]
fn a_windows_bundle_from_media_is_readable_by_stock_tools_down_to_the_wim() {
    let w = scratch();
    let media = w.path().join("media");
    ok(Command::new(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-windows-media"),
    )
    .arg(&media));
    let home = w.path().join("home");
    ok(stager().arg("init").arg("--dir").arg(&home));
    let build = |name: &str, extra: &[&str], src: &std::path::Path| {
        let mut c = stager();
        c.args(["bundle", "build", "--dir"]).arg(&home).args([
            "--name",
            name,
            "--version",
            "1",
            "--kind",
            "target",
        ]);
        c.args(extra).arg(src);
        c
    };
    let e = fails(&mut build("w0", &["--os", "windows"], &media));
    assert!(
        e.contains("holds 2 images") && e.contains("--image") && e.contains("2: Test Server"),
        "{e}"
    );
    let e = fails(&mut build(
        "w0",
        &["--os", "windows", "--image", "Nope"],
        &media,
    ));
    assert!(e.contains("no image \"Nope\""), "{e}");
    let e = fails(&mut build("w0", &["--os", "linux", "--image", "2"], &media));
    assert!(e.contains("--image"), "{e}");
    ok(&mut build(
        "w1",
        &["--os", "windows", "--image", "2"],
        &media,
    ));
    let ex = w.path().join("ex");
    ok(stager()
        .args(["bundle", "export", "--dir"])
        .arg(&home)
        .arg("w1@1")
        .arg("--out")
        .arg(&ex));
    let tree = w.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    sh(&format!(
        "age -d -i {ex}/identity.txt {ex}/payload.age | zstd -d | tar -x -C {t}",
        ex = ex.display(),
        t = tree.display()
    ));
    let info = ok(Command::new("wimlib-imagex")
        .arg("info")
        .arg(tree.join("install.wim")));
    assert!(
        info.contains("Image Count:    1") && info.contains("Pipable"),
        "{info}"
    );
    assert!(
        info.contains("Name:                   Test Server\n"),
        "{info}"
    );
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tree.join("windows.json")).unwrap()).unwrap();
    assert_eq!(meta["source_index"], 2);
    assert_eq!(meta["arch"], "x86_64");
    let pe = ok(Command::new("wimlib-imagex")
        .arg("dir")
        .arg(tree.join("esp/sources/boot.wim"))
        .arg(meta["winpe_index"].to_string()));
    assert!(pe.contains("/reinstall/stage.cmd"), "{pe}");
    let pe_info = ok(Command::new("wimlib-imagex")
        .arg("info")
        .arg(tree.join("esp/sources/boot.wim")));
    assert!(
        pe_info.contains(&format!("Boot Index:     {}", meta["winpe_index"])),
        "{pe_info}"
    );
    for f in [
        "EFI/boot/bootx64.efi",
        "EFI/microsoft/boot/bcd",
        "boot/boot.sdi",
    ] {
        assert!(tree.join("esp").join(f).is_file(), "esp/{f}");
    }
    // Media with install.esd (solid LZMS, as Microsoft's download tool makes): the image is
    // recompressed into a pipable LZX WIM.
    ok(Command::new("wimlib-imagex")
        .arg("export")
        .arg(media.join("sources/install.wim"))
        .arg("all")
        .arg(media.join("sources/install.esd"))
        .arg("--solid"));
    std::fs::remove_file(media.join("sources/install.wim")).unwrap();
    ok(&mut build(
        "w3",
        &["--os", "windows", "--image", "Test Server"],
        &media,
    ));
    // Media without WinPE: refused, naming what is missing.
    std::fs::remove_file(media.join("sources/boot.wim")).unwrap();
    let e = fails(&mut build(
        "w2",
        &["--os", "windows", "--image", "2"],
        &media,
    ));
    assert!(e.contains("no sources/boot.wim"), "{e}");
}
