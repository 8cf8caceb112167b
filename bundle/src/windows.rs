//! The tree inside a Windows target bundle: what the stager makes from installation media
//! (`stager bundle build --os windows`) and the agent installs from the rescue OS.
//!
//! ```text
//! windows.json          Meta: which image, from which media
//! install.wim           the chosen image alone, exported as a pipable WIM (applied from the
//!                       bundle stream, with no copy on any disk)
//! esp/...               copied verbatim onto disk 1's ESP: the media's EFI boot manager and
//!                       BCD, boot/boot.sdi, sources/boot.wim (WinPE, with the stage script)
//! ```

use serde::{Deserialize, Serialize};

pub const META: &str = "windows.json";
pub const IMAGE: &str = "install.wim";
pub const ESP_DIR: &str = "esp";
/// The directory on the Windows volume for what the agent leaves there (the stage's marker,
/// the first-boot script, the logs), as the WinPE stage and Windows see it: `X:\reinstall`.
pub const VOLUME_DIR: &str = "reinstall";
/// Written by the WinPE stage into [`VOLUME_DIR`] once Windows's `bcdboot` has built the boot
/// store; holds the stage's log.
pub const STAGE_DONE: &str = "stage-done.log";
/// Written by the WinPE stage instead of [`STAGE_DONE`] when a step failed.
pub const STAGE_FAILED: &str = "stage-failed.log";

/// `windows.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    pub format: u32,
    /// The image's name in the media's WIM ("Windows Server 2022 SERVERSTANDARD").
    pub image_name: String,
    /// Its index there (it is image 1 of the bundle's `install.wim`).
    pub source_index: u32,
    #[serde(default)]
    pub edition: Option<String>,
    #[serde(default)]
    pub arch: Option<String>,
    /// Bytes of files the image applies (wimlib's "Total Bytes").
    pub image_bytes: u64,
    /// The boot index of `esp/sources/boot.wim`, where the stage script was added.
    pub winpe_index: u32,
}

pub const META_FORMAT: u32 = 1;

/// Disk 1's ESP for Windows: room for the media's WinPE (boot.wim is 0.3-0.8 GB) beside the
/// boot manager that bcdboot writes. The stager refuses media whose ESP files do not fit.
pub const ESP_BYTES: u64 = 1 << 30;
/// Kept free on that ESP for bcdboot's files.
pub const ESP_SPARE: u64 = 64 << 20;
