//! Bad input to `tucker-nb compress`: each gives one readable line naming the file, layer or value
//! at fault, exits non-zero, and leaves no output behind (and an existing output untouched).

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::*;
use tch::Tensor;

/// One set of torchvision-format weights for all cases (making them costs a python start).
fn weights() -> &'static Path {
    static WEIGHTS: OnceLock<PathBuf> = OnceLock::new();
    WEIGHTS.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli_errors");
        std::fs::create_dir_all(&dir).unwrap();
        torchvision_weights(&dir, 11)
    })
}

/// Runs `compress` with `args` into a fresh folder; asserts failure, a one-line message holding
/// every `expected` piece, and that the folder holds nothing but `keep` afterwards.
fn fails(args: &[&str], expected: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let report = dir.path().join("layers.csv");
    std::fs::write(&out, "previous result").unwrap();
    let mut full = vec![
        "compress",
        "--out",
        path_str(&out),
        "--report",
        path_str(&report),
    ];
    if !args.contains(&"--device") {
        full.extend_from_slice(&["--device", "cpu"]);
    }
    full.extend_from_slice(args);
    let run = tucker_nb(&full);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{args:?} succeeded");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    for piece in expected {
        assert!(
            stderr.contains(piece),
            "{args:?}: `{piece}` not in: {stderr}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "previous result",
        "{args:?} touched the output"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "{args:?} left {left:?}");
}

fn ranks_file(dir: &Path, json: &str) -> PathBuf {
    let p = dir.join("ranks.json");
    std::fs::write(&p, json).unwrap();
    p
}

#[test]
fn bad_ranks_name_the_layer() {
    let w = path_str(weights());
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            r#"{"layer1.0.conv1": [0, 8]}"#,
            vec!["layer layer1.0.conv1", "r_out = 0", "1..=64"],
        ),
        (
            r#"{"layer3.1.conv2": [16, 257]}"#,
            vec!["layer layer3.1.conv2", "r_in = 257", "1..=256"],
        ),
        (
            r#"{"layer5.0.conv1": [4, 4]}"#,
            vec!["layer layer5.0.conv1", "no such conv layer"],
        ),
        (
            r#"{"layer1.0.conv1": [4]}"#,
            vec!["ranks.json", "[r_out, r_in]"],
        ),
    ];
    for (json, expected) in cases {
        let ranks = ranks_file(dir.path(), json);
        fails(&["--weights", w, "--ranks", path_str(&ranks)], &expected);
    }
}

#[test]
fn bad_values_name_the_value() {
    let w = path_str(weights());
    fails(
        &["--weights", w, "--ratio", "0"],
        &["invalid ratio", "0 (must be in (0, 1])"],
    );
    fails(
        &["--weights", w, "--ratio", "1.5"],
        &["invalid ratio", "1.5"],
    );
    fails(
        &["--weights", w, "--ratio", "0.2", "--num-classes", "0"],
        &["num_classes", "0"],
    );
    fails(
        &["--weights", w, "--ratio", "0.2", "--device", "tpu"],
        &["device", "`tpu`"],
    );
    fails(
        &["--weights", w, "--policy", "magic:3"],
        &["invalid policy", "`magic:3`"],
    );
    fails(
        &["--weights", w, "--policy", "energy:1.5"],
        &["invalid energy", "1.5"],
    );
    fails(
        &["--weights", w, "--policy", "budget-macs:x"],
        &["invalid policy", "needs a number"],
    );
    fails(
        &["--weights", w, "--policy", "budget-latency:0"],
        &["invalid budget-latency", "0 (must be in (0, 1])"],
    );
    fails(
        &["--weights", w, "--policy", "budget-latency:1.5"],
        &["invalid budget-latency", "1.5"],
    );
    fails(
        &["--weights", w, "--policy", "vbmf", "--method", "als"],
        &["--method", "'als'", "possible values: hosvd, hooi"],
    );
}

#[test]
fn bad_weight_files_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pth");
    fails(
        &["--weights", path_str(&missing), "--ratio", "0.2"],
        &["missing.pth", "no such file"],
    );

    let bytes = std::fs::read(weights()).unwrap();
    let truncated = dir.path().join("truncated.pth");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    fails(
        &["--weights", path_str(&truncated), "--ratio", "0.2"],
        &["truncated.pth", "truncated or corrupt"],
    );

    let mut tensors = tucker_nb::read_state_dict(weights()).unwrap();
    tensors.retain(|(name, _)| name != "layer3.1.bn2.running_var");
    let no_key = dir.path().join("no-key.safetensors");
    Tensor::write_safetensors(&tensors, &no_key).unwrap();
    fails(
        &["--weights", path_str(&no_key), "--ratio", "0.2"],
        &["no-key.safetensors", "`layer3.1.bn2.running_var`"],
    );

    let mut tensors = tucker_nb::read_state_dict(weights()).unwrap();
    for (name, t) in tensors.iter_mut() {
        if name == "layer2.0.conv1.weight" {
            *t = Tensor::zeros([128, 64, 5, 5], (tch::Kind::Float, tch::Device::Cpu));
        }
    }
    let wrong = dir.path().join("wrong-shape.safetensors");
    Tensor::write_safetensors(&tensors, &wrong).unwrap();
    fails(
        &["--weights", path_str(&wrong), "--ratio", "0.2"],
        &[
            "wrong-shape.safetensors",
            "`layer2.0.conv1.weight`",
            "[128, 64, 5, 5]",
        ],
    );

    tensors.push((
        "layer9.weight".into(),
        Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu)),
    ));
    tensors.retain(|(n, _)| n != "layer2.0.conv1.weight");
    tensors.push((
        "layer2.0.conv1.weight".into(),
        Tensor::zeros([128, 64, 3, 3], (tch::Kind::Float, tch::Device::Cpu)),
    ));
    let extra = dir.path().join("extra.safetensors");
    Tensor::write_safetensors(&tensors, &extra).unwrap();
    fails(
        &["--weights", path_str(&extra), "--ratio", "0.2"],
        &["extra.safetensors", "unexpected tensor `layer9.weight`"],
    );
}

#[test]
fn bad_outputs_are_refused_before_any_work() {
    let w = path_str(weights());
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("out.pth");
    let run = tucker_nb(&[
        "compress",
        "--weights",
        w,
        "--ratio",
        "0.2",
        "--out",
        path_str(&odd),
    ]);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains(".safetensors"));
    let nowhere = dir.path().join("no/such/dir/out.safetensors");
    let run = tucker_nb(&[
        "compress",
        "--weights",
        w,
        "--ratio",
        "0.2",
        "--out",
        path_str(&nowhere),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        !run.status.success() && stderr.contains("no/such/dir"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn bf16_without_cuda_says_it_computes_in_float32() {
    if tucker_nb::runtime::init().cuda_available {
        return; // the message is for machines without CUDA
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    tucker_nb_ok(&[
        "gen-data",
        "--out",
        path_str(&data),
        "--classes",
        "2",
        "--train-per-class",
        "2",
        "--val-per-class",
        "2",
    ]);
    let args = [
        "evaluate",
        "--model",
        path_str(weights()),
        "--num-classes",
        "1000",
        "--data",
        path_str(&data),
        "--image-size",
        "32",
        "--device",
        "cpu",
    ];
    let plain = tucker_nb_ok(&args);
    let bf16 = tucker_nb_ok(&[&args[..], &["--bf16"]].concat());
    let said = String::from_utf8_lossy(&bf16.stderr);
    assert_eq!(
        said.matches(tucker_nb::runtime::BF16_UNAVAILABLE).count(),
        1,
        "{said}"
    );
    // The same float32 figures (all but the last, the speed).
    let figures = |o: &std::process::Output| {
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        text.rsplit_once(", ")
            .map(|(head, _)| head.to_string())
            .unwrap_or(text)
    };
    assert_eq!(figures(&plain), figures(&bf16));
}
