//! The Python side of `bench`: the seed's data pipeline (`scripts/bench_seed.py`) and PyTorch's
//! model-only figures (`scripts/bench_model.py --serve`), run with the venv's interpreter.

use std::path::{Path, PathBuf};
use std::process::Command;

use tch::Device;

use super::BenchConfig;
use crate::error::{Error, Result};

/// The project's `scripts/` folder.
fn scripts_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts")
}

/// `--flag value` pairs as arguments; a flag with an empty value is a switch.
fn command_line<'a>(args: &'a [(&str, String)]) -> impl Iterator<Item = &'a str> {
    args.iter()
        .flat_map(|(flag, value)| [*flag, value.as_str()])
        .filter(|arg| !arg.is_empty())
}

/// Runs `scripts/SCRIPT` with `python` and `args` and parses the last line it prints as JSON.
pub(super) fn python_json(
    python: &Path,
    script: &str,
    args: &[(&str, String)],
) -> Result<serde_json::Value> {
    let script = scripts_dir().join(script);
    let out = Command::new(python)
        .arg(&script)
        .args(command_line(args))
        .output()
        .map_err(|e| Error::file(python, e))?;
    if !out.status.success() {
        return Err(Error::file(
            &script,
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last)
        .map_err(|e| Error::file(&script, format!("unexpected output {last:?}: {e}")))
}

/// Runs the seed's data pipeline (scripts/bench_seed.py) and returns its JSON figures.
pub(super) fn seed_pipeline(
    python: &Path,
    config: &BenchConfig,
    workers: usize,
) -> Result<serde_json::Value> {
    let args = [
        ("--data", config.run.data.to_string_lossy().into_owned()),
        ("--size", config.run.image_size.to_string()),
        ("--batch", config.run.batch_size.to_string()),
        ("--workers", workers.to_string()),
        ("--repeats", config.repeats.to_string()),
    ];
    python_json(python, "bench_seed.py", &args)
}

/// A `scripts/` program serving timed measurements: it prints one JSON line when ready, then one
/// JSON reply per request line; an empty request ends it.
struct Server {
    child: std::process::Child,
    requests: std::process::ChildStdin,
    replies: std::io::BufReader<std::process::ChildStdout>,
    script: PathBuf,
}

impl Server {
    fn spawn(python: &Path, script: &str, args: &[(&str, String)]) -> Result<Self> {
        let script = scripts_dir().join(script);
        let mut child = Command::new(python)
            .arg(&script)
            .args(command_line(args))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| Error::file(python, e))?;
        let requests = child.stdin.take().expect("piped");
        let replies = std::io::BufReader::new(child.stdout.take().expect("piped"));
        let mut server = Self {
            child,
            requests,
            replies,
            script,
        };
        server.reply()?; // its ready line
        Ok(server)
    }

    /// The figure `key` of its reply to `request`.
    fn ask(&mut self, request: &str, key: &str) -> Result<f64> {
        use std::io::Write;
        writeln!(self.requests, "{request}")
            .and_then(|()| self.requests.flush())
            .map_err(|e| self.failed(e.to_string()))?;
        let reply = self.reply()?;
        reply[key]
            .as_f64()
            .ok_or_else(|| Error::file(&self.script, format!("unexpected reply {reply}")))
    }

    /// The next JSON line it prints; its stderr in the error when it has ended.
    fn reply(&mut self) -> Result<serde_json::Value> {
        use std::io::BufRead;
        let mut line = String::new();
        match self.replies.read_line(&mut line) {
            Ok(0) => Err(self.failed("ended without a reply".into())),
            Ok(_) => serde_json::from_str(&line)
                .map_err(|e| Error::file(&self.script, format!("unexpected output {line:?}: {e}"))),
            Err(e) => Err(self.failed(e.to_string())),
        }
    }

    fn failed(&mut self, what: String) -> Error {
        use std::io::Read;
        let _ = self.child.kill();
        let mut stderr = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            let _ = err.read_to_string(&mut stderr);
        }
        Error::file(&self.script, format!("{what}: {}", stderr.trim()))
    }
}

impl Drop for Server {
    /// An empty request ends it.
    fn drop(&mut self) {
        use std::io::Write;
        let _ = writeln!(self.requests).and_then(|()| self.requests.flush());
        let _ = self.child.wait();
    }
}

/// PyTorch's side of the model-only figures: `scripts/bench_model.py --serve` on one model file
/// (the same model rebuilt from its keys, on the same libtorch, device, batch, size, thread count
/// and layout), timing one call per request.
pub(super) struct PyTorchModel(Server);

impl PyTorchModel {
    pub(super) fn spawn(python: &Path, config: &BenchConfig, file: &Path) -> Result<Self> {
        let run = &config.run;
        let device = match run.device {
            Device::Cuda(i) => format!("cuda:{i}"),
            _ => "cpu".into(),
        };
        let args = [
            ("--serve", String::new()),
            ("--model", file.to_string_lossy().into_owned()),
            ("--size", run.image_size.to_string()),
            ("--batch", run.batch_size.to_string()),
            ("--batches", config.model_batches.to_string()),
            ("--device", device),
            ("--threads", tch::get_num_threads().to_string()),
            (
                "--cudnn-benchmark",
                u8::from(config.cudnn_benchmark).to_string(),
            ),
            (
                "--channels-last",
                u8::from(run.fine_tune.channels_last).to_string(),
            ),
        ];
        Server::spawn(python, "bench_model.py", &args).map(Self)
    }

    /// Images/s of one timed call of `precision` and `mode` (the first of a workload warms it up).
    pub(super) fn timed(&mut self, precision: &str, mode: &str) -> Result<f64> {
        self.0.ask(&format!("{precision} {mode}"), "img_s")
    }
}

/// The seed's compressor (`scripts/bench_compress.py`): its `TuckerCompressor` over every conv of
/// the dense model in `file` with the seed's ratio rule, on the same thread count.
pub(super) struct SeedCompressor(Server);

impl SeedCompressor {
    pub(super) fn spawn(python: &Path, file: &Path, ratio: f64) -> Result<Self> {
        let args = [
            ("--model", file.to_string_lossy().into_owned()),
            ("--ratio", ratio.to_string()),
            ("--threads", tch::get_num_threads().to_string()),
        ];
        Server::spawn(python, "bench_compress.py", &args).map(Self)
    }

    /// Seconds of one compression of a fresh copy.
    pub(super) fn timed(&mut self) -> Result<f64> {
        self.0.ask("compress", "seconds")
    }
}
