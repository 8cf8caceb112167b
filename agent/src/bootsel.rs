//! Boot selection, as the phase engine sees it: the narrow trait of `bootcfg::select`
//! (DESIGN.md §7), and the fake firmware that tests and simulated reboots use.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub use bootcfg::select::{BootSelector, EspRef};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FakeEntry {
    pub number: u16,
    pub label: String,
    pub esp: Option<EspRef>,
}

/// Firmware state in a JSON file, with a log of every change, so that a test can replay what
/// the firmware would boot and check each step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct FakeState {
    pub entries: Vec<FakeEntry>,
    pub boot_order: Vec<u16>,
    pub boot_next: Option<u16>,
    pub current: Option<u16>,
    pub log: Vec<String>,
}

pub struct FakeFirmware {
    path: PathBuf,
}

impl FakeFirmware {
    pub fn new(path: &Path) -> FakeFirmware {
        FakeFirmware {
            path: path.to_path_buf(),
        }
    }

    pub fn load(&self) -> Result<FakeState> {
        let b = std::fs::read(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?;
        serde_json::from_slice(&b).with_context(|| format!("parsing {}", self.path.display()))
    }

    /// Written atomically: a power cut between two firmware variable writes is a real case,
    /// a half-written JSON file is not.
    pub fn save(&self, s: &FakeState) -> Result<()> {
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(s)?)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("writing {}", self.path.display()))
    }

    fn change(&mut self, what: String, f: impl FnOnce(&mut FakeState)) -> Result<()> {
        let mut s = self.load()?;
        f(&mut s);
        s.log.push(what);
        self.save(&s)
    }

    /// What a power cycle boots: `BootNext` once (then cleared), else the first of
    /// `BootOrder`. Used by the test harness.
    pub fn power_cycle(&mut self) -> Result<FakeEntry> {
        let mut s = self.load()?;
        let n = s
            .boot_next
            .take()
            .or_else(|| s.boot_order.first().copied())
            .context("nothing to boot")?;
        s.current = Some(n);
        let e = s
            .entries
            .iter()
            .find(|e| e.number == n)
            .cloned()
            .context("BootNext names no entry")?;
        s.log.push(format!("boot {}", e.label));
        self.save(&s)?;
        Ok(e)
    }
}

impl BootSelector for FakeFirmware {
    fn create_entry(&mut self, label: &str, esp: &EspRef) -> Result<u16> {
        let s = self.load()?;
        if let Some(e) = s
            .entries
            .iter()
            .find(|e| e.label == label && e.esp.as_ref() == Some(esp))
        {
            return Ok(e.number);
        }
        let n = s.entries.iter().map(|e| e.number + 1).max().unwrap_or(0);
        self.change(format!("create {label}"), |s| {
            s.entries.retain(|e| e.label != label);
            s.entries.push(FakeEntry {
                number: n,
                label: label.to_string(),
                esp: Some(esp.clone()),
            })
        })?;
        Ok(n)
    }

    fn set_next(&mut self, entry: u16) -> Result<()> {
        let label = self.label(entry)?;
        self.change(format!("next {label}"), |s| s.boot_next = Some(entry))
    }

    fn make_default(&mut self, entry: u16) -> Result<()> {
        let label = self.label(entry)?;
        self.change(format!("default {label}"), |s| {
            s.boot_order.retain(|n| *n != entry);
            s.boot_order.insert(0, entry);
        })
    }

    fn current(&self) -> Result<Option<u16>> {
        Ok(self.load()?.current)
    }

    fn next(&self) -> Result<Option<u16>> {
        Ok(self.load()?.boot_next)
    }
}

impl FakeFirmware {
    fn label(&self, entry: u16) -> Result<String> {
        self.load()?
            .entries
            .iter()
            .find(|e| e.number == entry)
            .map(|e| e.label.clone())
            .with_context(|| format!("no boot entry {entry:04X}"))
    }
}
