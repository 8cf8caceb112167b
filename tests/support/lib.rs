//! Helpers for the workspace integration tests: locating the built binaries, running them,
//! making stager homes and bundles, and describing a directory tree entry by entry.

pub mod stager;
pub mod treediff;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A binary of this workspace, built by `cargo build --workspace` (which `scripts/test` runs
/// before the tests) next to the test executable's directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` before the tests (scripts/test does)",
        p.display()
    );
    p
}

/// Runs a command; returns its output. Panics only if it cannot be started.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"))
}

/// Runs a command that must succeed; returns stdout.
pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must fail; returns stderr.
pub fn fails(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        !out.status.success(),
        "{cmd:?} succeeded but should have failed\nstdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Unmounts `at`, retrying while it is busy: a file this process had open there can stay
/// open a moment longer in a child another test thread has just forked (the copy lives until
/// that child's exec). A mount left behind would make the next rw mount of the same partition
/// silently read-only. Says so on stderr if it never succeeds.
pub fn umount(at: &Path) {
    let mut last = String::new();
    for _ in 0..50 {
        let out = run(Command::new("umount").arg(at));
        if out.status.success() {
            return;
        }
        last = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if last.contains("not mounted") || last.contains("no mount point") {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    eprintln!("umount {} kept failing: {last}", at.display());
}

/// A tmpfs mounted at a directory (made if missing) for as long as this lives.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    pub fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        ok(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at));
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        umount(&self.0);
    }
}

pub fn sh(script: &str) -> String {
    ok(Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(script))
}

/// A scratch directory on a disk filesystem (not tmpfs: xattrs and ACLs must be supported),
/// removed on drop.
pub fn scratch() -> tempfile::TempDir {
    let exe = std::env::current_exe().expect("current_exe");
    let base = exe.ancestors().nth(3).expect("target dir").join("it-tmp");
    std::fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new()
        .prefix("it-")
        .tempdir_in(&base)
        .unwrap()
}

pub fn stager() -> Command {
    Command::new(bin("stager"))
}

pub fn reinstall() -> Command {
    Command::new(bin("reinstall"))
}

/// `stager init` + `bundle build` + `bundle export`; returns (home, exported dir).
pub fn build_and_export(work: &Path, src: &Path, extra: &[&str]) -> (PathBuf, PathBuf) {
    let home = work.join("home");
    if !home.join("release.key").exists() {
        ok(stager().arg("init").arg("--dir").arg(&home));
    }
    let name = format!("b{}", std::process::id());
    let version = format!(
        "{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    ok(stager()
        .args(["bundle", "build", "--dir"])
        .arg(&home)
        .args([
            "--name",
            &name,
            "--version",
            &version,
            "--kind",
            "target",
            "--os",
            "linux",
        ])
        .args(extra)
        .arg(src));
    let out = work.join(format!("export-{version}"));
    ok(stager()
        .args(["bundle", "export", "--dir"])
        .arg(&home)
        .arg(format!("{name}@{version}"))
        .arg("--out")
        .arg(&out));
    (home, out)
}

/// Fills `dir` with every kind of entry an OS tree may hold and a tar may get wrong:
/// setuid/setgid/sticky, odd owners (one beyond the ustar octal range), absolute, dangling
/// and long symlinks, hard links (one across directories), character/block devices (one with
/// a large minor), a FIFO, user/trusted xattrs with binary values, `security.capability`,
/// access and default POSIX ACLs, names and paths past 100 bytes, non-UTF-8 names, empty
/// files and directories; then gives every directory an old, distinct mtime.
pub fn make_special_tree(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let script = r#"
        cd "$1"
        mkdir sticky && chmod 1777 sticky
        echo s > suid && chmod 4711 suid
        echo g > sgid && chmod 2755 sgid
        echo o > owned && chown 1234:5678 owned
        echo b > bigid && chown 3000000:3000001 bigid
        ln -s /etc/passwd abs_link
        ln -s ../nowhere dangling
        ln -s "$(printf 'x%.0s' $(seq 150))" long_link_target
        mkdir sub && echo data > h1 && ln h1 h2 && ln h1 sub/h3
        mknod chr c 1 3 && mknod blk b 7 0 && mknod bigdev c 259 1048575
        mkfifo fifo && chmod 0640 fifo
        echo x > xfile
        setfattr -n user.note -v hello xfile
        setfattr -n trusted.bin -v 0x00ff10 xfile
        cp /bin/true capfile && setcap cap_net_raw,cap_net_admin+ep capfile
        echo a > aclfile && setfacl -m u:1234:r-x,g:5678:rw- aclfile
        mkdir acldir && setfacl -d -m u:1234:rwx acldir && setfacl -m u:4321:r-x acldir
        echo in-acl > acldir/inherits
        long1="$(printf 'd%.0s' $(seq 60))"; long2="$(printf 'e%.0s' $(seq 70))"
        mkdir -p "$long1/$long2" && echo deep > "$long1/$long2/$(printf 'f%.0s' $(seq 250))"
        ln "$long1/$long2/$(printf 'f%.0s' $(seq 250))" hardlink_to_long
        touch $'caf\xe9' && mkdir $'\xff\xfe' && echo n > $'\xff\xfe/n\x80'
        : > empty && mkdir emptydir
        head -c 3000000 /dev/urandom > random.bin
        touch -h -d '2002-03-04 05:06:07' abs_link
        find . -mindepth 1 -type d | sort -r | while read -r d; do
            touch -d "2003-04-05 06:07:$(( ${#d} % 60 ))" "$d"
        done
        touch -d '2004-05-06 07:08:09' .
    "#;
    ok(Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(script)
        .arg("bash")
        .arg(dir));
}

/// Builds a bundle around arbitrary tar bytes, signed with the release key in `home`: what a
/// compromised or buggy build could publish. `tweak` may edit the manifest before signing.
/// Returns the exported bundle directory.
pub fn forge_bundle(
    home: &Path,
    out: &Path,
    tar_bytes: &[u8],
    tweak: impl FnOnce(&mut bundle::Manifest),
) -> PathBuf {
    use bundle::manifest::*;
    use std::io::Write;
    let id = bundle::payload::AgeIdentity::generate();
    let mut pw = bundle::payload::PayloadWriter::new(
        Vec::new(),
        &[id.to_public()],
        bundle::Compression::Zstd,
        None,
    )
    .unwrap();
    pw.write_all(tar_bytes).unwrap();
    let w = pw.finish().unwrap();
    // Count as the tar crate sees the stream (it does not judge paths).
    let (mut entries, mut unpacked) = (0, 0);
    for e in tar::Archive::new(tar_bytes).entries().unwrap() {
        let e = e.unwrap();
        entries += 1;
        unpacked += e.size();
    }
    let mut m = bundle::Manifest {
        manifest_version: MANIFEST_VERSION,
        name: "forged".into(),
        version: "1".into(),
        kind: bundle::Kind::Target,
        os: bundle::Os::Linux,
        arch: "x86_64".into(),
        created: "2026-11-21T00:00:00Z".into(),
        payload: Payload {
            sha256: w.sha256,
            size: w.size,
            compression: bundle::Compression::Zstd,
            encryption: ENCRYPTION_AGE_X25519.into(),
        },
        contents: Contents {
            tar_size: w.tar_size,
            unpacked_size: unpacked,
            entries,
        },
    };
    tweak(&mut m);
    let key = bundle::release::ReleaseKey::load(&home.join("release.key")).unwrap();
    let bytes = m.to_bytes();
    std::fs::create_dir_all(out).unwrap();
    std::fs::write(out.join("manifest.json"), &bytes).unwrap();
    std::fs::write(
        out.join("manifest.json.minisig"),
        key.sign(&bytes, "forged").unwrap(),
    )
    .unwrap();
    std::fs::write(out.join("payload.age"), &w.out).unwrap();
    std::fs::write(
        out.join("identity.txt"),
        bundle::payload::identity_file_text(&id),
    )
    .unwrap();
    out.to_path_buf()
}

/// A tar entry with raw header fields, bypassing the `tar` crate's path checks, as an
/// attacker would write it.
pub fn raw_entry(
    b: &mut tar::Builder<Vec<u8>>,
    kind: tar::EntryType,
    name: &[u8],
    link: &[u8],
    data: &[u8],
) {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(data.len() as u64);
    h.set_cksum();
    b.append(&h, data).unwrap();
}

/// `reinstall bundle unpack` of the exported bundle `ex`, with the release key of `home` and
/// the bundle's own identity, into `target`.
pub fn unpack_cmd(home: &Path, ex: &Path, target: &Path) -> Command {
    let mut c = reinstall();
    c.args(["bundle", "unpack", "--pubkey"])
        .arg(home.join("release.pub"))
        .arg("--identity")
        .arg(ex.join("identity.txt"))
        .arg(ex)
        .arg("--into")
        .arg(target);
    c
}

/// A loop device (with its partitions: `partx -a` as MACHINE-NOTES says), detached on drop.
pub struct LoopDev(pub String);

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("partx").args(["-d", &self.0]).output();
        let _ = Command::new("losetup").args(["-d", &self.0]).output();
    }
}

/// Attaches the image `img` as a loop device of `sector`-byte sectors.
pub fn attach(img: &Path, sector: u32) -> LoopDev {
    LoopDev(
        sh(&format!(
            "losetup --find --show --sector-size {sector} {}",
            img.display()
        ))
        .trim()
        .to_string(),
    )
}
