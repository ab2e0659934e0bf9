//! Progress that reads well wherever it shows: indicatif's in-place bar on a terminal; where
//! stderr is piped (a notebook cell, whose kernel forwards output line by line, or a log file), at
//! most [`LINES`] plain lines per run of the bar, each naming what runs and saying how far it is,
//! its images/s and its message (the running loss), then one summary line. A run shorter than
//! [`MIN_GAP`] prints its summary line alone.

use std::io::{self, IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Plain lines per bar before its summary line.
pub const LINES: usize = 10;

/// The least time between plain lines (the summary line excepted).
pub const MIN_GAP: Duration = Duration::from_secs(1);

/// Batches between the running figures a terminal bar shows.
const BAR_REFRESH: usize = 10;

/// A progress report over `len` steps (batches), labelled with what runs.
#[derive(Debug)]
pub struct Progress {
    out: Output,
    /// Images per step, for the lines' images/s (0: not shown).
    images_per_step: usize,
}

#[derive(Debug)]
enum Output {
    Bar(ProgressBar),
    Lines(Mutex<Lines>),
}

/// The state of the plain lines.
#[derive(Debug)]
struct Lines {
    label: String,
    len: usize,
    pos: usize,
    message: String,
    start: Instant,
    /// When the last line was printed (the start before any).
    last: Instant,
}

impl Lines {
    /// Steps between lines: [`LINES`] lines over the run, the last one left to the summary.
    fn every(&self) -> usize {
        self.len.div_ceil(LINES).max(1)
    }

    /// Moves `n` steps on; the line to print, if one is due: each time the position crosses a
    /// multiple of [`Self::every`], except at the end (the summary line reports it) and within
    /// `min_gap` of the last line.
    fn advance(&mut self, n: usize, images_per_step: usize, min_gap: Duration) -> Option<String> {
        let before = self.pos;
        self.pos += n;
        let every = self.every();
        let crossed = self.pos / every > before / every && self.pos < self.len;
        if !crossed || self.last.elapsed() < min_gap {
            return None;
        }
        self.last = Instant::now();
        Some(self.line(images_per_step, false))
    }

    /// "label: pos/len, N images/s, message" (without the parts that are empty).
    fn line(&self, images_per_step: usize, summary: bool) -> String {
        let seconds = self.start.elapsed().as_secs_f64();
        let mut parts = vec![format!("{}: {}/{}", self.label, self.pos, self.len)];
        if summary {
            parts.push(format!("done in {seconds:.1} s"));
        }
        if images_per_step > 0 && seconds > 0.0 {
            let rate = (self.pos * images_per_step) as f64 / seconds;
            parts.push(format!("{rate:.0} images/s"));
        }
        if !self.message.is_empty() {
            parts.push(self.message.clone());
        }
        parts.join(", ")
    }
}

impl Progress {
    pub fn new(len: usize, label: &str) -> Self {
        let out = if io::stderr().is_terminal() {
            let style = ProgressStyle::with_template(
                "{prefix} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("valid template")
            .progress_chars("█▉▊▋▌▍▎▏ ");
            let bar = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stderr())
                .with_style(style)
                .with_prefix(label.to_string());
            Output::Bar(bar)
        } else {
            Output::Lines(Mutex::new(Lines {
                label: label.to_string(),
                len,
                pos: 0,
                message: String::new(),
                start: Instant::now(),
                last: Instant::now(),
            }))
        };
        Self {
            out,
            images_per_step: 0,
        }
    }

    /// Also report images/s, each step being `n` images (the last batch may be smaller: the
    /// rate is then a slight overestimate until the summary).
    pub fn counting_images(self, n: usize) -> Self {
        Self {
            images_per_step: n,
            ..self
        }
    }

    /// How often (in steps) the caller need refresh its message: before each plain line, or at
    /// the bar's refresh.
    pub fn message_every(&self) -> usize {
        match &self.out {
            Output::Bar(_) => BAR_REFRESH,
            Output::Lines(lines) => lines.lock().expect("not poisoned").every(),
        }
    }

    pub fn inc(&self, n: u64) {
        match &self.out {
            Output::Bar(bar) => bar.inc(n),
            Output::Lines(lines) => {
                let mut lines = lines.lock().expect("not poisoned");
                if let Some(line) = lines.advance(n as usize, self.images_per_step, MIN_GAP) {
                    let _ = writeln!(io::stderr(), "{line}");
                }
            }
        }
    }

    pub fn set_message(&self, msg: impl Into<String>) {
        match &self.out {
            Output::Bar(bar) => bar.set_message(msg.into()),
            Output::Lines(lines) => lines.lock().expect("not poisoned").message = msg.into(),
        }
    }

    /// Leaves the bar at its final state with `msg`; as plain lines, one summary line.
    pub fn finish(&self, msg: impl Into<String>) {
        match &self.out {
            Output::Bar(bar) => bar.finish_with_message(msg.into()),
            Output::Lines(lines) => {
                let mut lines = lines.lock().expect("not poisoned");
                lines.message = msg.into();
                let _ = writeln!(io::stderr(), "{}", lines.line(self.images_per_step, true));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(len: usize) -> Lines {
        Lines {
            label: "compressed epoch 1/3".into(),
            len,
            pos: 0,
            message: String::new(),
            start: Instant::now(),
            last: Instant::now(),
        }
    }

    /// Which positions print a line, stepping one at a time to the end, with no least gap.
    fn printed_at(len: usize) -> Vec<usize> {
        let mut l = lines(len);
        (0..len)
            .filter_map(|_| l.advance(1, 8, Duration::ZERO).map(|_| l.pos))
            .collect()
    }

    #[test]
    fn at_most_ten_lines_per_run_and_none_at_the_start() {
        for len in [1, 7, 10, 15, 99, 100, 391, 10_000] {
            let at = printed_at(len);
            assert!(at.len() < LINES, "{len}: {at:?}");
            assert!(!at.contains(&0) && !at.contains(&len), "{len}: {at:?}");
        }
        assert_eq!(printed_at(15), [2, 4, 6, 8, 10, 12, 14]);
        assert_eq!(printed_at(100).len(), 9);
        // A run quicker than the least gap prints none before its summary.
        let mut quick = lines(15);
        assert!((0..15).all(|_| quick.advance(1, 8, MIN_GAP).is_none()));
    }

    #[test]
    fn a_line_names_what_runs_and_its_figures() {
        let mut l = lines(20);
        l.pos = 4;
        l.message = "loss 1.2345".into();
        let line = l.line(32, false);
        assert!(
            line.starts_with("compressed epoch 1/3: 4/20, ")
                && line.ends_with(" images/s, loss 1.2345"),
            "{line}"
        );
        let summary = l.line(0, true);
        assert!(
            summary.contains("done in") && !summary.contains("images/s"),
            "{summary}"
        );
    }
}
