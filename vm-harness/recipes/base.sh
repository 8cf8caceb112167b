#!/usr/bin/env bash
# Recipe: the Debian tree every VM image starts from (minbase + kernel + what the agent and the
# checks need). The harness caches its output keyed by a hash of this directory's files, so
# editing a recipe rebuilds what depends on it.
#   base.sh OUT
# The mirror is read from this machine's apt sources at run time, never written here.
set -euo pipefail
out=$1
suite=bookworm
mirror=$(
    { cat /etc/apt/sources.list.d/*.sources 2>/dev/null || true; } | awk -v s="$suite" '
        BEGIN { RS = ""; FS = "\n" }
        { u = ""; ok = 0; deb = 0
          for (i = 1; i <= NF; i++) {
              if ($i ~ /^URIs:/) { split($i, a, " "); u = a[2] }
              if ($i ~ /^Types:.*deb( |$)/) deb = 1
              if ($i ~ /^Suites:/) { n = split($i, a, " "); for (k = 2; k <= n; k++) if (a[k] == s) ok = 1 }
          }
          if (u != "" && ok && deb) { print u; exit } }'
)
if [ -z "$mirror" ]; then
    mirror=$(awk -v s="$suite" '$1 == "deb" && $3 == s { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
fi
[ -n "$mirror" ] || { echo "base.sh: no deb source for $suite in /etc/apt/sources.list(.d)" >&2; exit 1; }
# Packages: the kernel and init; the agent's tools (ip, partx/blkid, mkfs.ext4, grub-mkimage
# with the x86_64-efi and i386-pc modules); sshd for the reachability checks; efibootmgr for
# the checks inside the guest; wimtools and ntfs-3g for Windows targets (the rescue OS applies
# the image); less is the "other package" the target alone keeps.
pkgs=linux-image-amd64,systemd-sysv,udev,kmod,iproute2,openssh-server,e2fsprogs,util-linux,grub-common,grub-efi-amd64-bin,grub-pc-bin,efibootmgr,wimtools,ntfs-3g,less
rm -rf "$out.tmp"
debootstrap --variant=minbase --include="$pkgs" "$suite" "$out.tmp" "$mirror" >"$out.log" 2>&1 \
    || { tail -20 "$out.log" >&2; exit 1; }
t=$out.tmp
rm -rf "$t"/var/cache/apt/archives/*.deb "$t"/var/lib/apt/lists/* "$t"/usr/share/doc/* \
    "$t"/usr/share/man/* "$t"/usr/share/info/*
# Serial console and a quiet, fast boot.
ln -sf /lib/systemd/system/serial-getty@.service "$t/etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service" 2>/dev/null || true
echo 'root:reinstall' | chroot "$t" chpasswd
: >"$t/etc/machine-id"
rm -f "$t"/etc/ssh/ssh_host_*
mv "$t" "$out"
