//! Boot selection as a library (DESIGN.md §7). It knows nothing of HTTP.
//!
//! Today this crate holds the pure encoders and decoders for the UEFI variables the agent
//! will write (`Boot####`, `BootOrder`, `BootNext`) and the efivarfs file format. The side
//! effects (efivarfs I/O, GRUB, the narrow boot-selector trait) arrive with issue 5.

pub mod efi;
