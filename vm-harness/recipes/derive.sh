#!/usr/bin/env bash
# Recipe: a VM tree derived from the base tree (see base.sh).
#   derive.sh source|rescue|target|bad-target BASE OUT
# source      the OS the VM starts in (the harness adds hostname, keys, network, the agent)
# rescue      pruned to stay small (<= 300 MB): no locales, no "less"
# target      differs visibly from the source: /etc/reinstall-vm-target (the marker) and the
#             package "less", which the source does not have
# bad-target  a target whose init exits at once: its kernel panics (and reboots, panic=10)
# All: only the kernel modules a server needs, and a small initramfs (below).
set -euo pipefail
kind=$1 base=$2 out=$3
rm -rf "$out.tmp"
cp -a "$base" "$out.tmp"
t=$out.tmp
case $kind in
source | rescue)
    chroot "$t" dpkg --purge less >/dev/null
    ;;
target)
    echo "target tree built by vm-harness/recipes/derive.sh" >"$t/etc/reinstall-vm-target"
    ;;
bad-target)
    echo "bad target: its init exits" >"$t/etc/reinstall-vm-target"
    rm -f "$t/sbin/init"
    printf '#!/bin/sh\necho REINSTALL-BAD-TARGET-INIT >/dev/kmsg\nexit 1\n' >"$t/sbin/init"
    chmod 755 "$t/sbin/init"
    ;;
*)
    echo "derive.sh: unknown kind $kind" >&2
    exit 2
    ;;
esac
# Every tree keeps only the modules a server (and this q35 VM) needs: disks (block, nvme,
# scsi, ata, md, virtio), NICs (ethernet, virtio, bonding), its filesystems (ext4, FAT, NTFS
# via FUSE/ntfs3), IP and VLANs (8021q with garp/mrp/stp/llc), the watchdog, and tls, which
# bonding needs (without it: "bonding: Unknown symbol tls_validate_xmit_skb"). Graphics,
# media, sound, radios and remote filesystems go: the full set is 400 MB of a 700 MB tree,
# and every bundle made of it is downloaded, stashed and unpacked under emulation.
m=$(echo "$t"/usr/lib/modules/*/kernel)
kver=$(basename "$(dirname "$m")")
rm -rf "$m"/sound "$m"/drivers/{gpu,media,net/wireless,net/usb,net/can,infiniband,staging,iio,hwmon,isdn,bluetooth,input/touchscreen,mtd,misc,thunderbolt,video,comedi,usb/serial,usb/gadget,nfc,fpga}
for d in "$m"/fs/*; do
    case ${d##*/} in ext4 | jbd2 | mbcache.ko | fat | nls | fuse | efivarfs | ntfs3 | overlayfs | autofs) ;; *) rm -rf "$d" ;; esac
done
for d in "$m"/net/*; do
    case ${d##*/} in ipv4 | ipv6 | packet | core | unix | 8021q | llc | 802 | bridge | tls) ;; *) rm -rf "$d" ;; esac
done
# Compressed modules: kmod (+ZSTD) decompresses them in userspace.
find "$m" -name '*.ko' -print0 | xargs -0 -r zstd -q --rm
chroot "$t" depmod -a "$kver"
# The initramfs only has to find and mount the root: the q35 VM's disk drivers and ext4
# (MODULES=most made it 37 MB, 130 MB unpacked, with every NIC and SCSI driver, and the
# firmware loaded and the kernel unpacked it at every boot under emulation). A server's
# rescue image would keep MODULES=most.
printf '%s\n' virtio_pci virtio_blk virtio_scsi nvme ahci sd_mod ext4 crc32c_generic >"$t/etc/initramfs-tools/modules"
sed -i 's/^MODULES=.*/MODULES=list/' "$t/etc/initramfs-tools/initramfs.conf"
chroot "$t" update-initramfs -u -k "$kver" >/dev/null 2>&1 \
    || { echo "derive.sh: update-initramfs failed in $t" >&2; chroot "$t" update-initramfs -u -k "$kver" >&2; exit 1; }
if [ "$kind" = rescue ]; then
    rm -rf "$t"/usr/share/locale/* "$t"/usr/share/i18n "$t"/usr/share/zoneinfo/[a-z]* \
        "$t"/usr/lib/udev/hwdb.bin "$t"/usr/lib/grub/i386-pc/*.image
fi
mv "$t" "$out"
