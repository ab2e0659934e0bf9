//! Progress bars that show everywhere: indicatif's bar on a terminal, and where the output is
//! piped (a notebook cell, a log file) the same bar text as a plain line at most every few
//! seconds, plus the final state, instead of nothing.

use std::io::{self, IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};

/// Seconds between plain lines when stderr is not a terminal.
const PLAIN_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct PlainState {
    last_line: String,
    last_printed: Option<Instant>,
    printed_last: bool,
}

/// A `TermLike` that turns each redraw into a throttled plain line on stderr.
#[derive(Debug, Clone)]
struct PlainLines(Arc<Mutex<PlainState>>);

impl PlainLines {
    fn emit(&self, line: &str, force: bool) {
        let mut s = self.0.lock().unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            return;
        }
        s.last_line = line.to_string();
        let due = s.last_printed.is_none_or(|t| t.elapsed() >= PLAIN_INTERVAL);
        if force || due {
            let _ = writeln!(io::stderr(), "{line}");
            s.last_printed = Some(Instant::now());
            s.printed_last = true;
        } else {
            s.printed_last = false;
        }
    }

    fn flush_last(&self) {
        let s = self.0.lock().unwrap();
        if !s.printed_last && !s.last_line.is_empty() {
            let _ = writeln!(io::stderr(), "{}", s.last_line);
        }
    }
}

impl TermLike for PlainLines {
    fn width(&self) -> u16 {
        100
    }
    fn move_cursor_up(&self, _: usize) -> io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> io::Result<()> {
        self.emit(s, false);
        Ok(())
    }
    fn write_str(&self, s: &str) -> io::Result<()> {
        self.emit(s, false);
        Ok(())
    }
    fn clear_line(&self) -> io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// A progress bar over `len` steps.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
    plain: Option<PlainLines>,
}

impl Progress {
    pub fn new(len: usize, label: &str) -> Self {
        let style = ProgressStyle::with_template(
            "{prefix} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template")
        .progress_chars("█▉▊▋▌▍▎▏ ");
        let (target, plain) = if io::stderr().is_terminal() {
            (ProgressDrawTarget::stderr(), None)
        } else {
            let plain = PlainLines(Arc::default());
            (
                ProgressDrawTarget::term_like_with_hz(Box::new(plain.clone()), 1),
                Some(plain),
            )
        };
        let bar = ProgressBar::with_draw_target(Some(len as u64), target)
            .with_style(style)
            .with_prefix(label.to_string());
        Self { bar, plain }
    }

    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    pub fn set_message(&self, msg: impl Into<String>) {
        self.bar.set_message(msg.into());
    }

    /// Leaves the bar at its final state with `msg`, printed even when piped.
    pub fn finish(&self, msg: impl Into<String>) {
        self.bar.finish_with_message(msg.into());
        if let Some(plain) = &self.plain {
            plain.flush_last();
        }
    }
}
