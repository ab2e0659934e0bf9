//! Helpers shared by the integration tests: the PyTorch oracle (the project venv's python) and
//! the `tucker-nb` binary.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tch::{Kind, Tensor};

pub mod craft;

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

/// Runs the `tucker-nb` binary and asserts it succeeded, showing its stderr if not.
pub fn tucker_nb_ok(args: &[&str]) -> Output {
    let run = tucker_nb(args);
    assert!(
        run.status.success(),
        "tucker-nb {args:?} failed:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    run
}

/// Runs the `tucker-nb` binary, asserts it failed, and returns its stderr.
pub fn tucker_nb_err(args: &[&str]) -> String {
    let run = tucker_nb(args);
    assert!(!run.status.success(), "tucker-nb {args:?} succeeded");
    String::from_utf8_lossy(&run.stderr).into_owned()
}

/// A CSV file our commands write (no quoted commas in the columns read here): header and rows.
pub struct Csv {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Csv {
    pub fn read(path: &Path) -> Self {
        let text =
            std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut lines = text
            .lines()
            .map(|l| l.split(',').map(String::from).collect());
        let header = lines.next().unwrap_or_default();
        Csv {
            header,
            rows: lines.collect(),
        }
    }

    /// The cells of column `name`, in row order.
    pub fn column(&self, name: &str) -> Vec<&str> {
        let i = self
            .header
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("no column {name} in {:?}", self.header));
        self.rows.iter().map(|r| r[i].as_str()).collect()
    }

    /// The sum of an integer column.
    pub fn total(&self, name: &str) -> i64 {
        self.column(name)
            .iter()
            .map(|v| v.parse::<i64>().unwrap())
            .sum()
    }
}

/// A JSON file our commands write.
pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
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
