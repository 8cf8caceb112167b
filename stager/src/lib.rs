//! The stager: keys and PKI, the bundle store, the state database, and the mutual-TLS API
//! server. The binary (`src/main.rs`) is a thin command line over these modules; tests use
//! them directly where a test needs what no command offers (an already expired certificate).

pub mod api;
pub mod backup;
pub mod ca;
pub mod certfiles;
pub mod certs;
pub mod config;
pub mod db;
pub mod http;
pub mod metrics;
pub mod pki;
pub mod relay;
pub mod server;
pub mod store;
pub mod trust;
pub mod windows;
