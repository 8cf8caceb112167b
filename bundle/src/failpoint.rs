//! Named failpoints: places where a test (or the VM harness) can make the process die on the
//! spot, as a `SIGKILL` or a power cut would, to prove that what is on disk afterwards is
//! something the next run can act on.
//!
//! Switched on by the environment: `REINSTALL_FAILPOINTS=name[@N][,name[@N]...]` aborts the
//! process (no unwinding, no cleanup, no flush) the first time (or the Nth time) `name` is hit.
//! Unset, a failpoint costs one relaxed atomic load.
//!
//! Failpoints of the unpacker:
//! - `unpack-marked`: the target's incomplete-marker has been written, nothing else yet;
//! - `unpack-entry`: after each entry has been written (`unpack-entry@100`: after the 100th);
//! - `unpack-before-complete`: all data is written and verified, the marker is still there.
//!
//! The agent's Windows installer hits `unpack-entry` after each entry too, and
//! `windows-apply` after each piece of the image it hands to wimapply.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

pub const ENV: &str = "REINSTALL_FAILPOINTS";

static STATE: AtomicU8 = AtomicU8::new(0); // 0 unknown, 1 off, 2 on
static ARMED: Mutex<Option<HashMap<String, (u64, u64)>>> = Mutex::new(None);

/// Aborts the process if failpoint `name` is armed and due.
pub fn hit(name: &str) {
    match STATE.load(Ordering::Relaxed) {
        1 => return,
        0 => {
            let parsed = std::env::var(ENV)
                .ok()
                .map(|v| parse(&v))
                .unwrap_or_default();
            let on = !parsed.is_empty();
            *ARMED.lock().unwrap() = Some(parsed);
            STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            if !on {
                return;
            }
        }
        _ => {}
    }
    let mut armed = ARMED.lock().unwrap();
    if let Some((seen, due)) = armed.as_mut().and_then(|m| m.get_mut(name)) {
        *seen += 1;
        if *seen == *due {
            eprintln!("failpoint {name} hit: aborting");
            std::process::abort();
        }
    }
}

/// `a,b@3` → {a: due 1, b: due 3}; malformed counts count as 1.
fn parse(v: &str) -> HashMap<String, (u64, u64)> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| match s.split_once('@') {
            Some((n, c)) => (n.to_string(), (0, c.parse().unwrap_or(1).max(1))),
            None => (s.to_string(), (0, 1)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_names_and_counts() {
        let m = super::parse("a, b@3,,c@x");
        assert_eq!(m["a"], (0, 1));
        assert_eq!(m["b"], (0, 3));
        assert_eq!(m["c"], (0, 1));
    }
}
