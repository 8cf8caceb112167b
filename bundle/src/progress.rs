//! Progress reporting: a narrow trait that the long operations call, with a terminal renderer
//! (one self-rewriting line on stderr, only when stderr is a terminal) and a silent one.
//! The agent will add a reporter that forwards the same numbers to the stager.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub trait Progress: Send {
    /// `done` bytes of `total` (if known) in phase `phase`; `entries` processed so far.
    fn update(&mut self, phase: &str, done: u64, total: Option<u64>, entries: u64);
    fn finish(&mut self) {}
}

pub struct Silent;
impl Progress for Silent {
    fn update(&mut self, _: &str, _: u64, _: Option<u64>, _: u64) {}
}

/// Redraws at most 5 times a second.
pub struct Terminal {
    start: Instant,
    last: Option<Instant>,
    drawn: bool,
}

impl Terminal {
    /// A terminal renderer if stderr is a terminal, else silence.
    pub fn stderr() -> Box<dyn Progress> {
        if std::io::stderr().is_terminal() {
            Box::new(Terminal {
                start: Instant::now(),
                last: None,
                drawn: false,
            })
        } else {
            Box::new(Silent)
        }
    }
}

impl Progress for Terminal {
    fn update(&mut self, phase: &str, done: u64, total: Option<u64>, entries: u64) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|l| now.duration_since(l) < Duration::from_millis(200))
        {
            return;
        }
        self.last = Some(now);
        self.drawn = true;
        let line = render(phase, done, total, entries, now.duration_since(self.start));
        let mut e = std::io::stderr().lock();
        let _ = write!(e, "\r\x1b[K{line}");
        let _ = e.flush();
    }

    fn finish(&mut self) {
        if self.drawn {
            let _ = writeln!(std::io::stderr());
        }
    }
}

/// Pure so that it can be tested: `unpack  412.0 MiB / 1.2 GiB  33%  205.9 MiB/s  10233 entries`.
pub fn render(
    phase: &str,
    done: u64,
    total: Option<u64>,
    entries: u64,
    elapsed: Duration,
) -> String {
    let secs = elapsed.as_secs_f64().max(0.001);
    let rate = done as f64 / secs;
    let mut s = format!("{phase:<10} {}", bytes(done));
    if let Some(t) = total.filter(|t| *t > 0) {
        s += &format!(" / {}  {:>3}%", bytes(t), (done.min(t) * 100) / t);
    }
    s += &format!("  {}/s  {entries} entries", bytes(rate as u64));
    s
}

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_bytes_percent_rate_and_entries() {
        let s = render(
            "unpack",
            512 << 20,
            Some(1 << 30),
            42,
            Duration::from_secs(2),
        );
        assert_eq!(
            s,
            "unpack     512.0 MiB / 1.0 GiB   50%  256.0 MiB/s  42 entries"
        );
        assert_eq!(bytes(1023), "1023 B");
    }
}
