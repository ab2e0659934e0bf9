//! Helpers shared by the integration tests: the PyTorch oracle (the project venv's python) and
//! the `tucker-nb` binary.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tch::{Kind, Tensor};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The venv's python, which has torch and torchvision. Missing venv is a set-up error, never a
/// skipped test.
pub fn python() -> PathBuf {
    let python = workspace_root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup",
        python.display()
    );
    python
}

/// Runs `tests/oracle/oracle.py` with `args`, panicking with its stderr on failure.
pub fn oracle(args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oracle/oracle.py");
    let out = Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "oracle {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs the `tucker-nb` binary.
pub fn tucker_nb(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tucker-nb"))
        .args(args)
        .output()
        .unwrap()
}

pub fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}

/// ‖a − b‖ / ‖b‖ in f64.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    (&a - &b).norm().double_value(&[]) / b.norm().double_value(&[])
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Random torchvision ResNet18 weights (1000 classes, non-trivial BN statistics) saved as
/// torchvision saves its .pth files.
pub fn torchvision_weights(dir: &Path, seed: u32) -> PathBuf {
    let path = dir.join(format!("resnet18-seed{seed}.pth"));
    oracle(&["make-weights", path_str(&path), "--seed", &seed.to_string()]);
    path
}
