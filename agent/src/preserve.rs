//! The machine's security identity, carried into the next OS byte for byte: SSH host keys
//! (every type), root's `authorized_keys` and those of users, the agent's own identity file,
//! the hostname and (Linux to Linux) the machine-id.
//!
//! Captured into a directory (`carry/` beside the journal) with modes and ownership kept, and
//! injected into a tree from there: root-owned files exactly as they were; a user's
//! `authorized_keys` only if that user exists in the new tree, owned by the new tree's uid
//! and gid of that name (the same name may have another number there).

use anyhow::{Context, Result};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Paths (relative to a root) of the security identity of the tree at `root`.
pub fn identity_files(root: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(root.join("etc/ssh")) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("ssh_host_") && e.path().is_file() {
                v.push(PathBuf::from("etc/ssh").join(n));
            }
        }
    }
    for f in [
        "root/.ssh/authorized_keys",
        crate::setup::AGENT_IDENTITY,
        "etc/hostname",
        "etc/machine-id",
    ] {
        if root.join(f).is_file() {
            v.push(PathBuf::from(f));
        }
    }
    if let Ok(rd) = std::fs::read_dir(root.join("home")) {
        for e in rd.flatten() {
            let rel = PathBuf::from("home")
                .join(e.file_name())
                .join(".ssh/authorized_keys");
            if root.join(&rel).is_file() {
                v.push(rel);
            }
        }
    }
    v.sort();
    v
}

fn copy_exact(from: &Path, to: &Path, uid: u32, gid: u32, mode: u32) -> Result<()> {
    if let Some(p) = to.parent() {
        std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    }
    let tmp = to.with_extension("reinstall-tmp");
    std::fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode & 0o7777))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, to).with_context(|| format!("writing {}", to.display()))?;
    Ok(())
}

/// Copies the identity files of `root` into `carry` (bytes, mode, owner kept).
pub fn capture(root: &Path, carry: &Path) -> Result<Vec<PathBuf>> {
    let files = identity_files(root);
    for rel in &files {
        let src = root.join(rel);
        let md = std::fs::metadata(&src).with_context(|| format!("reading {}", src.display()))?;
        copy_exact(&src, &carry.join(rel), md.uid(), md.gid(), md.mode())?;
    }
    Ok(files)
}

/// uid and gid of `user` in the tree's /etc/passwd.
fn user_in(tree: &Path, user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string(tree.join("etc/passwd")).ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&user))
            .then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
    })
}

/// Writes the carried files into `tree`. Returns what was written and what was skipped
/// (with why).
pub fn inject(carry: &Path, tree: &Path) -> Result<(Vec<PathBuf>, Vec<String>)> {
    let mut written = Vec::new();
    let mut skipped = Vec::new();
    for rel in identity_files(carry) {
        let src = carry.join(&rel);
        let md = std::fs::metadata(&src)?;
        let (uid, gid) = match rel.strip_prefix("home") {
            Ok(rest) => {
                let user = rest.iter().next().and_then(|u| u.to_str()).unwrap_or("");
                match user_in(tree, user) {
                    Some(ids) => {
                        let ssh = tree.join("home").join(user).join(".ssh");
                        std::fs::create_dir_all(&ssh)?;
                        std::os::unix::fs::chown(&ssh, Some(ids.0), Some(ids.1))?;
                        std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o700))?;
                        ids
                    }
                    None => {
                        skipped.push(format!(
                            "{}: user {user:?} does not exist in the new OS",
                            rel.display()
                        ));
                        continue;
                    }
                }
            }
            Err(_) => (md.uid(), md.gid()),
        };
        if rel.starts_with("root/.ssh") {
            std::fs::create_dir_all(tree.join("root/.ssh"))?;
            std::fs::set_permissions(
                tree.join("root/.ssh"),
                std::fs::Permissions::from_mode(0o700),
            )?;
        }
        copy_exact(&src, &tree.join(&rel), uid, gid, md.mode())?;
        written.push(rel);
    }
    Ok((written, skipped))
}

/// Writes the network identity into `tree` for the network stack the tree uses (see
/// [`crate::netstack`]), enabling what needs enabling. Refuses a tree without a known stack.
pub fn inject_network(id: &crate::netid::NetIdentity, tree: &Path) -> Result<Vec<PathBuf>> {
    use crate::netstack::{self, Stack};
    let stack = netstack::detect(tree)?;
    netstack::check_drivers(id, tree)?;
    let mut out = Vec::new();
    for f in netstack::render(stack, id) {
        let p = tree.join(&f.path);
        std::fs::create_dir_all(p.parent().expect("files are under a directory"))?;
        // A symlinked resolv.conf (systemd-resolved) is replaced, not written through.
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
            std::fs::remove_file(&p)?;
        }
        std::fs::write(&p, &f.contents).with_context(|| format!("writing {}", p.display()))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(f.mode))?;
        out.push(p);
    }
    match stack {
        Stack::Networkd => {
            let unit = [
                "lib/systemd/system/systemd-networkd.service",
                "usr/lib/systemd/system/systemd-networkd.service",
            ]
            .iter()
            .find(|u| tree.join(u).exists())
            .expect("detected by its unit");
            let wants = tree.join("etc/systemd/system/multi-user.target.wants");
            std::fs::create_dir_all(&wants)?;
            let link = wants.join("systemd-networkd.service");
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(Path::new("/").join(unit), &link)?;
            }
        }
        Stack::Ifupdown => {
            let main = tree.join("etc/network/interfaces");
            let text = std::fs::read_to_string(&main).unwrap_or_default();
            if !text
                .lines()
                .any(|l| l.trim_start().starts_with("source") && l.contains("interfaces.d"))
            {
                std::fs::write(
                    &main,
                    format!("{text}\nsource /etc/network/interfaces.d/*\n"),
                )?;
            }
        }
        Stack::Netplan | Stack::NetworkManager => {}
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_carried_byte_for_byte_and_users_are_matched_by_name() {
        let base = std::env::temp_dir().join(format!("preserve-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (src, carry, dst) = (base.join("src"), base.join("carry"), base.join("dst"));
        for d in [
            "etc/ssh",
            "root/.ssh",
            "home/alice/.ssh",
            "home/bob/.ssh",
            "etc/reinstall",
        ] {
            std::fs::create_dir_all(src.join(d)).unwrap();
        }
        std::fs::write(src.join("etc/ssh/ssh_host_ed25519_key"), b"PRIVATE\x00\xff").unwrap();
        std::fs::set_permissions(
            src.join("etc/ssh/ssh_host_ed25519_key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::write(
            src.join("etc/ssh/ssh_host_ed25519_key.pub"),
            b"ssh-ed25519 AAAA",
        )
        .unwrap();
        std::fs::write(src.join("etc/ssh/sshd_config"), b"not identity").unwrap();
        std::fs::write(src.join("root/.ssh/authorized_keys"), b"ssh-ed25519 root").unwrap();
        std::fs::write(
            src.join("home/alice/.ssh/authorized_keys"),
            b"ssh-ed25519 alice",
        )
        .unwrap();
        std::fs::write(
            src.join("home/bob/.ssh/authorized_keys"),
            b"ssh-ed25519 bob",
        )
        .unwrap();
        std::fs::write(src.join("etc/hostname"), b"web1\n").unwrap();
        let files = capture(&src, &carry).unwrap();
        assert_eq!(files.len(), 6, "{files:?}");
        std::fs::create_dir_all(dst.join("etc")).unwrap();
        std::fs::write(
            dst.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nalice:x:2001:2002::/home/alice:/bin/sh\n",
        )
        .unwrap();
        let (written, skipped) = inject(&carry, &dst).unwrap();
        assert_eq!(written.len(), 5);
        assert!(skipped[0].contains("bob"), "{skipped:?}");
        let key = dst.join("etc/ssh/ssh_host_ed25519_key");
        assert_eq!(std::fs::read(&key).unwrap(), b"PRIVATE\x00\xff");
        assert_eq!(std::fs::metadata(&key).unwrap().mode() & 0o777, 0o600);
        let a = std::fs::metadata(dst.join("home/alice/.ssh/authorized_keys")).unwrap();
        assert_eq!((a.uid(), a.gid()), (2001, 2002));
        assert!(!dst.join("etc/ssh/sshd_config").exists());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
