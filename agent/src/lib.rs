//! The agent's library: the stager client, disks, the journal and the network identity.
//! The `reinstall` binary (`src/main.rs`) is the command line over it; integration tests
//! use it directly for what no command exposes yet (partitioning a loop-device disk).

pub mod bootsel;
pub mod client;
pub mod disk;
pub mod engine;
pub mod journal;
pub mod mount;
pub mod netid;
pub mod netstack;
pub mod preserve;
pub mod setup;
pub mod transfer;
pub mod windows;
