//! Boot selection as a library (DESIGN.md §7). It knows nothing of HTTP.
//!
//! Pure renderers and encoders: UEFI variables (`Boot####`, `BootOrder`, `BootNext`) and the
//! efivarfs file format ([`efi`]), `grub.cfg` with one-shot fallback ([`grubcfg`]) and the GRUB
//! environment block ([`grubenv`]). Not built yet (issue 5): the side effects (efivarfs I/O,
//! installing GRUB into an ESP or an MBR) and their implementations of the agent's boot
//! selector trait.

pub mod efi;
pub mod grubcfg;
pub mod grubenv;
pub mod select;
