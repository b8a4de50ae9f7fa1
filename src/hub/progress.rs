//! Download progress on stderr: a bar redrawn in place on a terminal, else
//! a few plain lines (each quarter of the bytes, or every 30 s), so a log
//! file gets a handful of lines and never one per chunk.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressMode {
    /// A bar on one line, redrawn at most ten times a second.
    Bar,
    /// A start line, a line per quarter (or 30 s) and a closing line.
    Lines,
    /// Nothing.
    Quiet,
}

impl ProgressMode {
    /// `Bar` when stderr is a terminal, else `Lines`.
    pub fn for_stderr() -> Self {
        if std::io::stderr().is_terminal() {
            ProgressMode::Bar
        } else {
            ProgressMode::Lines
        }
    }
}

/// Bytes as the Hub's pages show them: 1.4 GB, 530 kB.
pub(crate) fn human(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        0..1_000 => format!("{bytes} B"),
        1_000..1_000_000 => format!("{:.0} kB", b / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", b / 1e6),
        _ => format!("{:.2} GB", b / 1e9),
    }
}

pub(crate) struct Progress {
    mode: ProgressMode,
    repo: String,
    total: u64,
    done: u64,
    file: String,
    started: Instant,
    last_draw: Option<Instant>,
    /// The next quarter (1..=3) whose crossing prints a line.
    next_quarter: u64,
}

impl Progress {
    pub fn new(mode: ProgressMode, repo: &str) -> Self {
        Progress {
            mode,
            repo: repo.to_owned(),
            total: 0,
            done: 0,
            file: String::new(),
            started: Instant::now(),
            last_draw: None,
            next_quarter: 1,
        }
    }

    /// `files` files, `total` bytes to fetch, into `dir`.
    pub fn start(&mut self, files: usize, total: u64, dir: &Path) {
        (self.total, self.started, self.last_draw) = (total, Instant::now(), Some(Instant::now()));
        if self.mode != ProgressMode::Quiet {
            eprintln!(
                "kestrel: downloading {} ({files} file{}, {}) into {}",
                self.repo,
                if files == 1 { "" } else { "s" },
                human(total),
                dir.display()
            );
        }
    }

    /// `n` bytes more to fetch than `start` was told (a size learnt late).
    pub fn add_total(&mut self, n: u64) {
        self.total += n;
    }

    /// Now fetching `name`.
    pub fn file(&mut self, name: &str) {
        name.clone_into(&mut self.file);
    }

    /// `n` more bytes are on disk (resumed bytes count too).
    pub fn advance(&mut self, n: u64) {
        self.done += n;
        self.report(false);
    }

    /// A line of its own (a retry), under the bar when one is drawn.
    pub fn note(&mut self, msg: &str) {
        match self.mode {
            ProgressMode::Quiet => {}
            ProgressMode::Bar => eprintln!("\r\x1b[K{msg}"),
            ProgressMode::Lines => eprintln!("{msg}"),
        }
    }

    /// `n` bytes thrown away (a server that ignored the Range request).
    pub fn rewind(&mut self, n: u64) {
        self.done = self.done.saturating_sub(n);
    }

    fn rate(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        format!("{}/s", human((self.done as f64 / secs) as u64))
    }

    fn report(&mut self, force: bool) {
        let now = Instant::now();
        let since = self.last_draw.map_or(Duration::MAX, |t| now - t);
        let pct = if self.total == 0 { 100 } else { (self.done.min(self.total) * 100 / self.total) as usize };
        match self.mode {
            ProgressMode::Quiet => {}
            ProgressMode::Bar if force || since >= Duration::from_millis(100) => {
                let filled = pct * 30 / 100;
                let bar = format!("{}{}", "#".repeat(filled), "-".repeat(30 - filled));
                let (done, total, rate) = (human(self.done), human(self.total), self.rate());
                let line = format!("{} [{bar}] {pct:>3}% {done}/{total} {rate} {}", self.repo, self.file);
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "\r{line}\x1b[K");
                let _ = err.flush();
                self.last_draw = Some(now);
            }
            ProgressMode::Lines => {
                let quarter = self.done.saturating_mul(4) / self.total.max(1);
                let crossed = self.next_quarter <= 3 && quarter >= self.next_quarter;
                if crossed || since >= Duration::from_secs(30) {
                    eprintln!(
                        "kestrel: downloading {}: {pct}% ({} of {}, {})",
                        self.repo,
                        human(self.done),
                        human(self.total),
                        self.rate()
                    );
                    self.next_quarter = quarter + 1;
                    self.last_draw = Some(now);
                }
            }
            ProgressMode::Bar => {}
        }
    }

    /// The closing line (and the bar's last state).
    pub fn finish(&mut self) {
        if self.mode == ProgressMode::Bar {
            self.file.clear();
            self.report(true);
            eprintln!();
        }
        if self.mode != ProgressMode::Quiet {
            let secs = self.started.elapsed().as_secs_f64();
            eprintln!("kestrel: downloaded {} ({}) in {secs:.1} s", self.repo, human(self.done));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_the_hubs() {
        assert_eq!(human(999), "999 B");
        assert_eq!(human(530_400), "530 kB");
        assert_eq!(human(1_398_888), "1.4 MB");
        assert_eq!(human(4_420_000_000), "4.42 GB");
    }
}
