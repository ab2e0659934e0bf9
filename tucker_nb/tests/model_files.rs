//! Model files say each conv's form (the safetensors metadata `tucker_nb.forms`): every form
//! round-trips; a file written before the metadata (the same tensors, libtorch's writer, no
//! metadata) loads, evaluates and exports as before; metadata that disagrees with the tensors is
//! refused, naming the file and layer.

mod common;

use std::path::Path;

use common::*;
use tch::{Device, Kind, Tensor};
use tucker_nb::conv::Form;
use tucker_nb::{compress, runtime, Method, ResNet18};

/// A model with each form in some slot: dense stem, Tucker-2, both Tucker-1s, an SVD shortcut.
fn model_of_every_form() -> ResNet18 {
    runtime::init();
    tch::manual_seed(3);
    let mut model = ResNet18::new(10, Device::Cpu);
    let forms = [
        (
            "layer1.0.conv1",
            Form::Tucker2 {
                r_out: 16,
                r_in: 24,
            },
        ),
        (
            "layer1.0.conv2",
            Form::Tucker1Out {
                r_out: 20,
                c_in: 64,
            },
        ),
        (
            "layer2.0.conv2",
            Form::Tucker1In {
                c_out: 128,
                r_in: 40,
            },
        ),
        ("layer2.0.downsample.0", Form::Svd { rank: 12 }),
    ];
    compress::factorise_layers(&mut model, &forms, Method::Hosvd).unwrap();
    model
}

/// The file as the release before the metadata wrote it: the same tensors, libtorch's writer.
fn write_old_format(model: &ResNet18, path: &Path) {
    let tensors: Vec<(String, Tensor)> = model
        .named_tensors()
        .into_iter()
        .map(|(n, t)| (n, t.contiguous()))
        .collect();
    Tensor::write_safetensors(&tensors, path).unwrap();
}

fn header(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[8..8 + len]).unwrap()
}

/// `bytes` with the first `from` replaced by `to`, of the same length.
fn replaced(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = bytes
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .unwrap_or_else(|| panic!("{from} is not in the file"));
    let mut out = bytes.to_vec();
    out[at..at + to.len()].copy_from_slice(to.as_bytes());
    out
}

/// The loaded model holds bit-for-bit the tensors saved, and computes the same logits: to
/// rounding, because a factor that was a strided view when saved loads contiguous, and libtorch
/// may pick another kernel for it.
fn assert_same_model(loaded: &ResNet18, model: &ResNet18) {
    let saved: std::collections::BTreeMap<_, _> = model.named_tensors().into_iter().collect();
    let read: std::collections::BTreeMap<_, _> = loaded.named_tensors().into_iter().collect();
    assert_eq!(
        read.keys().collect::<Vec<_>>(),
        saved.keys().collect::<Vec<_>>()
    );
    for (name, t) in &saved {
        assert!(read[name].equal(t), "{name} differs after the round trip");
    }
    let diff = rel_err(&logits(loaded), &logits(model));
    assert!(diff < 1e-6, "logits differ by {diff:e}");
}

/// A fixed input, not drawn from the generator: the tests of this file run in parallel threads,
/// and libtorch's generator is global, so a seed set in one can be consumed by another.
fn fixed_input() -> Tensor {
    let n = 2 * 3 * 32 * 32;
    (Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.37)
        .sin()
        .reshape([2, 3, 32, 32])
}

fn logits(model: &ResNet18) -> Tensor {
    let x = fixed_input();
    tch::no_grad(|| model.forward(&x, false))
}

#[test]
fn a_saved_model_says_every_convs_form_and_loads_in_it() {
    let model = model_of_every_form();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.safetensors");
    model.save(&file).unwrap();
    let forms = header(&file)["__metadata__"]["tucker_nb.forms"]
        .as_str()
        .map(|s| serde_json::from_str::<serde_json::Value>(s).unwrap())
        .expect("the forms are in the metadata");
    assert_eq!(
        forms.as_object().unwrap().len(),
        20,
        "one record per conv slot"
    );
    assert_eq!(forms["conv1"], serde_json::json!({"form": "dense"}));
    assert_eq!(
        forms["layer1.0.conv1"],
        serde_json::json!({"form": "tucker2", "ranks": [16, 24]})
    );
    assert_eq!(
        forms["layer2.0.conv2"],
        serde_json::json!({"form": "tucker1-in", "ranks": [128, 40]})
    );
    let loaded = ResNet18::load(&file, None, Device::Cpu).unwrap();
    assert_eq!(loaded.forms(), model.forms());
    assert_same_model(&loaded, &model);
}

#[test]
fn a_file_from_before_the_metadata_loads_in_the_same_forms() {
    let model = model_of_every_form();
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.safetensors");
    write_old_format(&model, &old);
    assert!(header(&old).get("__metadata__").is_none());
    let loaded = ResNet18::load(&old, None, Device::Cpu).unwrap();
    assert_eq!(loaded.forms(), model.forms());
    assert_same_model(&loaded, &model);
}

#[test]
fn metadata_that_disagrees_with_the_tensors_names_the_file_and_layer() {
    let model = model_of_every_form();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.safetensors");
    model.save(&file).unwrap();
    // Rewrite the header with another rank for one layer (same length, so offsets stay valid).
    let bytes = std::fs::read(&file).unwrap();
    let said = r#"\"layer1.0.conv1\":{\"form\":\"tucker2\",\"ranks\":[16,24]}"#;
    let lied = said.replace("[16,24]", "[16,25]");
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, replaced(&bytes, said, &lied)).unwrap();
    let err = ResNet18::load(&bad, None, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layer1.0.conv1") && err.contains("bad.safetensors") && err.contains("16, 25"),
        "{err}"
    );

    let bad = dir.path().join("unknown.safetensors");
    let unknown = replaced(&bytes, r#"\"conv1\":"#, r#"\"convX\":"#);
    std::fs::write(&bad, unknown).unwrap();
    let err = ResNet18::load(&bad, None, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("convX") && err.contains("unknown.safetensors"),
        "{err}"
    );
}

#[test]
fn an_old_file_evaluates_and_loads_in_pytorch_as_the_new_one_does() {
    let model = model_of_every_form();
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (
        dir.path().join("old.safetensors"),
        dir.path().join("new.safetensors"),
    );
    write_old_format(&model, &old);
    model.save(&new).unwrap();
    let data = dir.path().join("data");
    tucker_nb_ok(&[
        "gen-data",
        "--out",
        path_str(&data),
        "--classes",
        "4",
        "--train-per-class",
        "2",
        "--val-per-class",
        "4",
    ]);
    let evaluate = |file: &Path| {
        let run = tucker_nb_ok(&[
            "evaluate",
            "--model",
            path_str(file),
            "--num-classes",
            "10",
            "--data",
            path_str(&data),
            "--image-size",
            "32",
            "--device",
            "cpu",
        ]);
        // The figures, not the speed.
        let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
        let line = stdout
            .lines()
            .find(|l| l.contains("top-1"))
            .expect("a top-1 line");
        let figures = line.split(" images/s").next().unwrap();
        figures.rsplit_once(',').unwrap().0.to_string()
    };
    assert_eq!(evaluate(&old), evaluate(&new));
    for file in [&old, &new] {
        let theirs = dir.path().join("theirs.safetensors");
        let input = dir.path().join("input.safetensors");
        let x = fixed_input();
        Tensor::write_safetensors(&[("input", &x)], &input).unwrap();
        oracle(&[
            "keys-load",
            path_str(file),
            path_str(&input),
            path_str(&theirs),
        ]);
        let diff = rel_err(&read(&theirs)["logits"], &logits(&model));
        assert!(
            diff < 1e-5,
            "{}: PyTorch's logits differ by {diff}",
            file.display()
        );
    }
}
