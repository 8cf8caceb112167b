//! Boot selection as a library (DESIGN.md §7). It knows nothing of HTTP.
//!
//! Pure renderers and encoders: UEFI variables (`Boot####`, `BootOrder`, `BootNext`) and the
//! efivarfs file format ([`efi`]), `grub.cfg` with one-shot fallback ([`grubcfg`]) and the GRUB
//! environment block ([`grubenv`]). Side effects: the boot selector trait and its UEFI
//! implementation over efivarfs ([`select`]); GRUB EFI images written into an ESP in
//! userspace ([`loader`]). Not built yet (issue 5): GRUB for legacy BIOS (i386-pc into the
//! MBR and BIOS boot partition) and its environment-block boot selector; using the tree's own
//! GRUB; checking against `efibootmgr` on real firmware.

pub mod bios;
pub mod efi;
pub mod grubcfg;
pub mod grubenv;
pub mod loader;
pub mod select;
