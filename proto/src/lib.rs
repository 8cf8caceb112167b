//! What agent, operator CLI and stager must agree on: the JSON bodies of the `/v1/` API and
//! the identity file an agent or operator is issued.
//!
//! Compatibility rules (agents in the field run old versions for years):
//! - Requests are parsed strictly by the stager (`deny_unknown_fields`): a field the server
//!   does not know is an error, never silently ignored.
//! - Responses are parsed leniently by clients: the stager may add fields within `/v1/`.
//! - Removing or changing the meaning of a field means `/v2/`.
//!
//! Every type is pinned by a fixture under `proto/tests/fixtures/`.

pub mod identity;
pub mod v1;
