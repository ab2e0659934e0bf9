//! `tucker-nb export`: ONNX and TorchScript files that ONNX Runtime and `torch.jit.load` run to
//! our logits (within 1e-4) for a dense, a Tucker-2 (also as written before files said their
//! forms) and an SVD model with folded BNs, at a batch
//! size the export never saw; and a bad file refused before any Python starts.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::*;
use tch::{Device, Tensor};
use tucker_nb::{runtime, ResNet18};

const SIZE: &str = "32";

/// (name, file): torchvision's dense weights, the seed's Tucker-2 at ratio 0.5, energy-chosen
/// ranks (SVDs on the 1×1 shortcuts) and CP (depthwise layers), each with every factorised conv's BN
/// folded; made once for both formats' tests.
fn models() -> &'static [(&'static str, PathBuf)] {
    static MODELS: OnceLock<Vec<(&'static str, PathBuf)>> = OnceLock::new();
    MODELS.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("export-models");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        make_models(&dir)
    })
}

fn make_models(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let dense = torchvision_weights(dir, 11);
    let compress = |name: &str, how: &[&str]| {
        let out = dir.join(format!("{name}.safetensors"));
        let mut args = vec![
            "compress",
            "--weights",
            path_str(&dense),
            "--num-classes",
            "10",
        ];
        args.extend_from_slice(how);
        args.extend_from_slice(&["--out", path_str(&out), "--device", "cpu"]);
        tucker_nb_ok(&args);
        out
    };
    let tucker = compress("tucker2", &["--ratio", "0.5"]);
    let svd = compress(
        "svd-folded",
        &["--policy", "energy:0.5", "--method", "hosvd", "--fold-bn"],
    );
    let cp = compress("cp-folded", &["--policy", "cp:0.1", "--fold-bn"]);
    // The Tucker-2 file as the release before form metadata wrote it (libtorch's writer).
    let old = dir.join("tucker2-old-format.safetensors");
    let tensors: Vec<(String, Tensor)> = ResNet18::load(&tucker, None, Device::Cpu)
        .unwrap()
        .named_tensors()
        .into_iter()
        .map(|(n, t)| (n, t.contiguous()))
        .collect();
    Tensor::write_safetensors(&tensors, &old).unwrap();
    vec![
        ("dense", dense),
        ("tucker2", tucker),
        ("svd-folded", svd),
        ("cp-folded", cp),
        ("tucker2-old-format", old),
    ]
}

/// Exports each model, runs the export in the oracle on 4 images (the export's example had 2,
/// its own check 3 and 1) and compares with our logits.
fn exports_match_our_logits(format: &str, extension: &str) {
    runtime::init();
    let dir = tempfile::tempdir().unwrap();
    tch::manual_seed(7);
    let images = Tensor::randn([4, 3, 32, 32], (tch::Kind::Float, Device::Cpu));
    let input = dir.path().join("input.safetensors");
    Tensor::write_safetensors(&[("images", &images)], &input).unwrap();
    for (name, model_file) in models() {
        let exported = dir.path().join(format!("{name}.{extension}"));
        let run = tucker_nb_ok(&[
            "export",
            "--model",
            path_str(model_file),
            "--format",
            format,
            "--out",
            path_str(&exported),
            "--image-size",
            SIZE,
        ]);
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert!(stdout.contains("batch sizes [1, 3]"), "{name}: {stdout}");

        let theirs_file = dir
            .path()
            .join(format!("{name}-{format}-logits.safetensors"));
        oracle(&[
            "run-export",
            format,
            path_str(&exported),
            path_str(&input),
            path_str(&theirs_file),
        ]);
        let theirs = &read(&theirs_file)["logits"];
        let model = ResNet18::load(model_file, None, Device::Cpu).unwrap();
        let ours = tch::no_grad(|| model.forward(&images, false));
        assert_eq!(theirs.size(), ours.size(), "{name}");
        let diff = (theirs - &ours).abs().max().double_value(&[]);
        let scale = ours.abs().max().double_value(&[]);
        assert!(
            diff <= 1e-4,
            "{name}: {format} logits differ from ours by {diff} (logits up to {scale})"
        );
    }
}

#[test]
fn onnx_exports_run_in_onnx_runtime_to_our_logits() {
    exports_match_our_logits("onnx", "onnx");
}

#[test]
fn torchscript_exports_load_in_torch_jit_to_our_logits() {
    exports_match_our_logits("torchscript", "pt");
}

#[test]
fn a_bad_model_file_is_refused_before_python_starts_and_nothing_is_written() {
    runtime::init();
    let dir = tempfile::tempdir().unwrap();
    let weights = torchvision_weights(dir.path(), 12);
    let mut tensors: Vec<(String, Tensor)> = tucker_nb::read_state_dict(&weights)
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k != "layer3.1.conv2.weight")
        .collect();
    let missing = dir.path().join("missing.safetensors");
    Tensor::write_safetensors(&tensors, &missing).unwrap();
    // A Tucker-2 slot whose core does not take its first factor's outputs.
    tensors.retain(|(k, _)| !k.starts_with("layer3.1.conv2"));
    let f = |shape: [i64; 4]| Tensor::zeros(shape, (tch::Kind::Float, Device::Cpu));
    tensors.push(("layer3.1.conv2.0.weight".into(), f([32, 256, 1, 1])));
    tensors.push(("layer3.1.conv2.1.weight".into(), f([32, 40, 3, 3])));
    tensors.push(("layer3.1.conv2.2.weight".into(), f([256, 32, 1, 1])));
    let misfit = dir.path().join("misfit.safetensors");
    Tensor::write_safetensors(&tensors, &misfit).unwrap();

    let out = dir.path().join("model.onnx");
    for (file, says) in [
        (&missing, "layer3.1.conv2"),
        (&misfit, "layer3.1.conv2.0.weight"),
    ] {
        // No Python exists at this path: an error about it would mean one was started.
        let err = tucker_nb_err(&[
            "export",
            "--model",
            path_str(file),
            "--format",
            "onnx",
            "--out",
            path_str(&out),
            "--image-size",
            SIZE,
            "--python",
            "/nonexistent/python",
        ]);
        assert!(
            err.contains(path_str(file)) && err.contains(says),
            "{}: {err}",
            file.display()
        );
        assert!(!err.contains("/nonexistent/python"), "{err}");
        assert!(!out.exists());
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().contains("model.onnx"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
