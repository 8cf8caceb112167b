//! Unpacking a bundle reproduces a real OS tree exactly as GNU tar does: every path, byte,
//! mode, owner, link, device node, FIFO, xattr, ACL and directory mtime.

use integration_tests::treediff::{describe, diff, Tree};
use integration_tests::*;
use std::path::Path;

const GNU_TAR: &str = "tar --xattrs --xattrs-include=* --acls --numeric-owner";

/// A real OS tree from this machine's own files (system binaries including setuid/setgid
/// ones, /etc, documentation, a Python library tree: ~200 MB, ~10k entries) plus every
/// special case from `make_special_tree`.
fn make_os_tree(root: &Path) {
    sh(&format!(
        "mkdir -p {r}/usr/bin {r}/usr/lib {r}/usr/share
         cp -a /usr/sbin {r}/usr/sbin
         cp -a /etc {r}/etc
         cp -a /usr/share/doc {r}/usr/share/doc
         cp -a /usr/lib/python3.11 {r}/usr/lib/python3.11
         cp -a /usr/bin/passwd /usr/bin/su /usr/bin/mount /usr/bin/chage /usr/bin/ssh-agent {r}/usr/bin/",
        r = root.display()
    ));
    make_special_tree(&root.join("special"));
}

fn gnu_tar_copy(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    sh(&format!(
        "{GNU_TAR} -C {} -cpf - . | {GNU_TAR} -C {} -xpf -",
        src.display(),
        dst.display()
    ));
}

fn assert_same(what: &str, a: &Tree, b: &Tree) {
    let d = diff(a, b, 20, |_| false);
    assert!(
        d.is_empty(),
        "{what}: {} differences:\n{}",
        d.len(),
        d.join("\n")
    );
}

/// The cases GNU tar and the `tar` crate's default unpack are known to differ on, checked
/// explicitly so that the comparison cannot pass by both sides losing them.
fn assert_special_cases_present(t: &Tree) {
    let get = |p: &[u8]| {
        t.get(p)
            .unwrap_or_else(|| panic!("{:?} missing", String::from_utf8_lossy(p)))
    };
    assert_eq!(get(b"special/suid").mode, 0o4711);
    assert_eq!(get(b"special/sgid").mode, 0o2755);
    assert_eq!(get(b"special/sticky").mode, 0o1777);
    assert_eq!(
        (get(b"special/bigid").uid, get(b"special/bigid").gid),
        (3000000, 3000001)
    );
    assert_eq!(get(b"special/chr").kind, 'c');
    assert_eq!(get(b"special/blk").kind, 'b');
    assert_eq!(get(b"special/fifo").kind, 'p');
    assert_eq!(get(b"special/sub/h3").inode_group, b"special/h1".to_vec());
    assert!(get(b"special/capfile")
        .xattrs
        .iter()
        .any(|(k, _)| k == "security.capability"));
    assert!(get(b"special/aclfile")
        .xattrs
        .iter()
        .any(|(k, _)| k == "system.posix_acl_access"));
    assert!(get(b"special/acldir")
        .xattrs
        .iter()
        .any(|(k, _)| k == "system.posix_acl_default"));
    assert!(get(b"special/xfile")
        .xattrs
        .iter()
        .any(|(k, v)| k == "trusted.bin" && v == &[0, 0xff, 0x10]));
    assert_eq!(get(b"special/caf\xe9").kind, 'f');
    // 2003-04-05 06:07:SS UTC: directories keep the mtime set after their contents.
    let sub = get(b"special/sub");
    assert_eq!(sub.kind, 'd');
    assert!(
        (1049522820..1049522880).contains(&sub.mtime),
        "special/sub mtime {}",
        sub.mtime
    );
    assert_eq!(get(b"usr/bin/passwd").mode & 0o4000, 0o4000);
}

#[test]
fn unpack_of_a_real_os_tree_matches_gnu_tar_entry_by_entry() {
    let w = scratch();
    let src = w.path().join("src");
    make_os_tree(&src);
    let (home, ex) = build_and_export(w.path(), &src, &[]);
    let ours = w.path().join("ours");
    ok(&mut unpack_cmd(&home, &ex, &ours));
    assert!(!ours.join(".reinstall-incomplete").exists());
    let gnu = w.path().join("gnu");
    gnu_tar_copy(&src, &gnu);

    let (t_src, t_ours, t_gnu) = (describe(&src), describe(&ours), describe(&gnu));
    assert!(
        t_src.len() > 5000,
        "the source tree is too small to mean anything: {}",
        t_src.len()
    );
    assert_special_cases_present(&t_ours);
    assert_same("ours vs GNU tar", &t_ours, &t_gnu);
    assert_same("ours vs source", &t_ours, &t_src);
}

#[test]
fn gnu_tarballs_are_imported_with_xattrs_and_acls_in_every_compression() {
    let w = scratch();
    let src = w.path().join("src");
    make_special_tree(&src);
    let reference = describe(&src);
    for (file, compress) in [
        ("v.tar", ""),
        ("v.tar.gz", "| gzip"),
        ("v.tar.zst", "| zstd -q"),
    ] {
        let tarball = w.path().join(file);
        sh(&format!(
            "{GNU_TAR} -C {} -cpf - . {compress} > {}",
            src.display(),
            tarball.display()
        ));
        let (home, ex) = build_and_export(w.path(), &tarball, &[]);
        let out = w.path().join(format!("out-{file}"));
        ok(&mut unpack_cmd(&home, &ex, &out));
        assert_same(file, &describe(&out), &reference);
    }
}
