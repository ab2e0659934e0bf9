//! Deployable exports of a model file: ONNX (dynamic batch) and TorchScript, written by the
//! project venv's PyTorch and checked against our own logits before they are kept.
//!
//! Why through Python: ONNX export exists only in PyTorch's Python package (`torch.onnx`, built on
//! `torch.export`), and libtorch, hence tch, has none. tch could trace a TorchScript module, but a
//! trace of our forward records each reshape's batch size and our own names; `torch.jit.script`
//! of the seed's `nn.Module` (rebuilt from the file's keys by `scripts/torch_resnet.py`) keeps the
//! batch dynamic and the module's state_dict equal to the file's, so a PyTorch user can reload or
//! fine-tune it. The two Python files are embedded in this crate, so the binary needs only an
//! interpreter with torch (and onnx, onnxscript, onnxruntime for ONNX): the venv's by default.
//!
//! Order of work: the file is loaded here first (a bad file is our usual one-line error, and no
//! Python starts), our eval-mode logits for a fixed input are computed, then Python exports,
//! reloads the export in ONNX Runtime or `torch.jit.load`, and compares at two batch sizes. The
//! output is staged and renamed into place only when that comparison passes.

use std::path::{Path, PathBuf};
use std::process::Command;

use tch::{Device, Kind, Tensor};

use crate::error::{check_image_side, Error, Result};
use crate::io::Outputs;
use crate::model::ResNet18;

const EXPORT_PY: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/export.py"));
const TORCH_RESNET_PY: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../scripts/torch_resnet.py"
));

/// Images in the check batch (the export's own example has 2, so 3 and 1 both test the dynamic
/// batch dimension).
const CHECK_BATCH: i64 = 3;

/// What `export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// ONNX (opset of torch.onnx's exporter), input `images` N×3×S×S, output `logits`.
    Onnx,
    /// A `torch.jit.script` module (`torch.jit.load` in Python, `tch::CModule` in Rust).
    #[value(name = "torchscript")]
    TorchScript,
}

impl ExportFormat {
    fn name(self) -> &'static str {
        match self {
            ExportFormat::Onnx => "onnx",
            ExportFormat::TorchScript => "torchscript",
        }
    }
}

/// An export to make.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// The model file (.pth or .safetensors, dense, compressed or folded).
    pub model: PathBuf,
    pub format: ExportFormat,
    pub out: PathBuf,
    /// Side of the check images (the export itself takes any size the model does).
    pub image_size: i64,
    /// The interpreter that exports ([`default_python`] unless set).
    pub python: PathBuf,
    /// Largest |difference| allowed between the export's logits and ours.
    pub tolerance: f64,
}

impl ExportConfig {
    pub fn new(model: impl Into<PathBuf>, format: ExportFormat, out: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            format,
            out: out.into(),
            image_size: 224,
            python: default_python(),
            tolerance: 1e-4,
        }
    }
}

/// What the check found.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct ExportCheck {
    /// Largest |export − ours| over the check images' logits.
    pub max_abs_diff: f64,
    /// Batch sizes the export ran at.
    pub batch_sizes: Vec<i64>,
}

/// `TUCKER_NB_PYTHON`, else this checkout's `.venv/bin/python` (what `scripts/setup` installs),
/// else `python3`.
pub fn default_python() -> PathBuf {
    if let Some(p) = std::env::var_os("TUCKER_NB_PYTHON") {
        return p.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// Exports `config.model` as `config.format` to `config.out`, checked against our logits;
/// nothing is written unless the check passes.
pub fn export(config: &ExportConfig) -> Result<ExportCheck> {
    check_image_side("image size", config.image_size)?;
    let tol = config.tolerance;
    crate::error::check(
        tol.is_finite() && tol > 0.0,
        "tolerance",
        tol,
        "finite and > 0",
    )?;
    let model = ResNet18::load(&config.model, None, Device::Cpu)?;
    let images = check_images(config.image_size);
    let logits = tch::no_grad(|| model.forward(&images, false));

    let work = tempfile::tempdir().map_err(|e| Error::file(std::env::temp_dir(), e))?;
    let dir = work.path();
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text).map_err(|e| Error::file(dir.join(name), e))
    };
    write("export.py", EXPORT_PY)?;
    write("torch_resnet.py", TORCH_RESNET_PY)?;
    let check_file = dir.join("check.safetensors");
    Tensor::write_safetensors(&[("images", &images), ("logits", &logits)], &check_file)?;

    let mut outputs = Outputs::new();
    let mut found = None;
    outputs.write_with(&config.out, |tmp| {
        found = Some(run_python(
            config,
            &dir.join("export.py"),
            &check_file,
            tmp,
        )?);
        Ok(())
    })?;
    outputs.commit()?;
    Ok(found.expect("written outputs ran the export"))
}

/// A fixed batch: the same images for every export of the same size.
fn check_images(size: i64) -> Tensor {
    let n = CHECK_BATCH * 3 * size * size;
    // A small LCG, so the input is independent of libtorch's generator state.
    let mut state: u64 = 0x2545_F491_4F6C_DD1D;
    let values: Vec<f32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect();
    Tensor::from_slice(&values)
        .view([CHECK_BATCH, 3, size, size])
        .to_kind(Kind::Float)
}

fn run_python(
    config: &ExportConfig,
    script: &Path,
    check: &Path,
    out: &Path,
) -> Result<ExportCheck> {
    let python = &config.python;
    let run = Command::new(python)
        .arg(script)
        .arg("--model")
        .arg(&config.model)
        .args(["--format", config.format.name()])
        .arg("--out")
        .arg(out)
        .arg("--check")
        .arg(check)
        .arg("--tolerance")
        .arg(config.tolerance.to_string())
        .output()
        .map_err(|e| Error::file(python, format!("cannot run the exporting Python: {e}")))?;
    let stdout = String::from_utf8_lossy(&run.stdout);
    if !run.status.success() {
        let stderr = String::from_utf8_lossy(&run.stderr);
        // The script's own message is its last line (sys.exit); a traceback ends with the error.
        let why = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message");
        return Err(Error::file(
            &config.model,
            format!("{} export failed: {}", config.format.name(), why.trim()),
        ));
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("");
    serde_json::from_str(line).map_err(|e| {
        Error::file(
            python,
            format!("the exporter's report `{line}` is not what tucker_nb expects: {e}"),
        )
    })
}
