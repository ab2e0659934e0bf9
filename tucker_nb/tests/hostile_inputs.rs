//! Hostile inputs to the CLI, one test per case: each gives one line naming the file, key, layer
//! or value at fault, exits with status 1 or 2 (never a panic or an abort), and loses no output.
//! Also: a non-empty run folder is refused, `--resume` of another run names the field that
//! differs, and temporaries that killed runs left are removed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::craft::{state_dict_pickle, torch_zip, Entry};
use common::*;
use tch::{Device, Kind, Tensor};
use tucker_nb::synthetic::{self, SyntheticFormat, SyntheticSpec};
use tucker_nb::ResNet18;

/// Asserts a clean failure: status 1 or 2, one line of stderr holding every `expected` piece,
/// and no panic or abort.
fn refused(run: &Output, expected: &[&str]) {
    let stderr = String::from_utf8_lossy(&run.stderr);
    let code = run.status.code();
    assert!(
        matches!(code, Some(1 | 2)),
        "status {:?} (signal?) for: {stderr}",
        run.status
    );
    assert!(!stderr.contains("panicked"), "a panic: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    for piece in expected {
        assert!(stderr.contains(piece), "`{piece}` not in: {stderr}");
    }
}

/// `compress --ratio 0.2 --device cpu` of `weights` into `out`, with `extra` flags.
fn compress(weights: &Path, out: &Path, extra: &[&str]) -> Output {
    let args = [
        "compress",
        "--weights",
        path_str(weights),
        "--ratio",
        "0.2",
        "--out",
        path_str(out),
        "--device",
        "cpu",
    ];
    tucker_nb(&[&args[..], extra].concat())
}

/// `compress` of `weights` into a folder holding an earlier result, which must survive the
/// failure.
fn compress_refused(weights: &Path, expected: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    std::fs::write(&out, "earlier result").unwrap();
    let run = compress(weights, &out, &[]);
    refused(&run, expected);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "earlier result");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

fn pth(dir: &Path, name: &str, pickle: &[u8], storages: &[(&str, &[u8])]) -> PathBuf {
    let path = dir.join(name);
    torch_zip(&path, pickle, storages);
    path
}

#[test]
fn a_pickle_that_doubles_a_memo_entry_forty_times_is_refused_quickly() {
    let dir = tempfile::tempdir().unwrap();
    // A dict whose one value is a tuple doubled 40 times through the memo (2^40 leaves if
    // copied): PROTO, EMPTY_DICT, 'k', EMPTY_TUPLE, PUT 0, 40 × (POP, GET 0, GET 0, TUPLE2, PUT 0),
    // SETITEM, STOP.
    let mut pickle = b"\x80\x02}X\x01\x00\x00\x00k)q\x00".to_vec();
    for _ in 0..40 {
        pickle.extend_from_slice(b"0h\x00h\x00\x86q\x00");
    }
    pickle.extend_from_slice(b"s.");
    let path = pth(dir.path(), "memo-bomb.pth", &pickle, &[]);
    compress_refused(&path, &["memo-bomb.pth", "missing tensor `conv1.weight`"]);
}

#[test]
fn a_pickle_nesting_a_tuple_two_million_deep_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut pickle = b"\x80\x02N".to_vec();
    pickle.extend(std::iter::repeat_n(0x85u8, 2_000_000));
    pickle.push(b'.');
    let path = pth(dir.path(), "deep.pth", &pickle, &[]);
    compress_refused(&path, &["deep.pth", "data.pkl", "nested deeper than 64"]);
}

#[test]
fn a_four_byte_storage_viewed_as_two_to_the_forty_elements_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pickle = state_dict_pickle(&[Entry {
        name: "conv1.weight",
        storage: "0",
        kind: "FloatStorage",
        numel: 1,
        offset: 0,
        size: &[1 << 20, 1 << 20],
        stride: &[0, 0],
    }]);
    let path = pth(dir.path(), "broadcast.pth", &pickle, &[("0", &[0; 4])]);
    compress_refused(
        &path,
        &[
            "broadcast.pth",
            "`conv1.weight`",
            "1099511627776 elements",
            "refused",
        ],
    );
    // The same view reaching past its storage: the extent is checked too.
    let pickle = state_dict_pickle(&[Entry {
        name: "conv1.weight",
        storage: "0",
        kind: "FloatStorage",
        numel: 1,
        offset: 0,
        size: &[4],
        stride: &[1],
    }]);
    let path = pth(dir.path(), "past-end.pth", &pickle, &[("0", &[0; 4])]);
    compress_refused(
        &path,
        &["past-end.pth", "`conv1.weight`", "do not fit its storage"],
    );
    // A storage entry shorter than the pickle declares.
    let pickle = state_dict_pickle(&[Entry {
        name: "conv1.weight",
        storage: "0",
        kind: "FloatStorage",
        numel: 4,
        offset: 0,
        size: &[4],
        stride: &[1],
    }]);
    let path = pth(dir.path(), "short.pth", &pickle, &[("0", &[0; 8])]);
    compress_refused(&path, &["short.pth", "archive/data/0", "declares 16"]);
}

/// A valid model file (10 classes) with `edit` applied to its tensors.
fn edited_model(dir: &Path, name: &str, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> PathBuf {
    tucker_nb::runtime::init();
    let path = dir.join(name);
    let model = ResNet18::new(10, Device::Cpu);
    let mut tensors = model.named_tensors();
    edit(&mut tensors);
    Tensor::write_safetensors(&tensors, &path).unwrap();
    path
}

#[test]
fn a_nan_in_one_conv_weight_is_refused_naming_the_layer_before_any_svd() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited_model(dir.path(), "nan.safetensors", |tensors| {
        for (name, t) in tensors.iter_mut() {
            if name == "layer2.1.conv1.weight" {
                *t = t.copy();
                let _ = t.get(3).get(7).get(1).get(1).fill_(f64::NAN);
            }
        }
    });
    compress_refused(
        &path,
        &[
            "nan.safetensors",
            "`layer2.1.conv1.weight`",
            "NaN or infinite",
        ],
    );
}

#[test]
fn a_zero_dimensional_fc_weight_is_a_shape_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited_model(dir.path(), "scalar-fc.safetensors", |tensors| {
        for (name, t) in tensors.iter_mut() {
            if name == "fc.weight" {
                *t = Tensor::from(1.0f32);
            }
        }
    });
    compress_refused(&path, &["scalar-fc.safetensors", "`fc.weight`", "shape []"]);
    let path = edited_model(dir.path(), "bn-count.safetensors", |tensors| {
        for (name, t) in tensors.iter_mut() {
            if name == "layer4.1.bn2.num_batches_tracked" {
                *t = Tensor::zeros([3], (Kind::Int64, Device::Cpu));
            }
        }
    });
    compress_refused(
        &path,
        &[
            "bn-count.safetensors",
            "`layer4.1.bn2.num_batches_tracked`",
            "[3]",
        ],
    );
}

fn small_data(dir: &Path, classes: usize) -> PathBuf {
    let root = dir.join("data");
    let spec = SyntheticSpec {
        classes,
        train_per_class: 4,
        val_per_class: 2,
        size: 32,
        seed: 1,
    };
    synthetic::generate(&root, spec, SyntheticFormat::ImageFolder).unwrap();
    root
}

fn run_args<'a>(data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--data",
        data,
        "--weights",
        "none",
        "--num-classes",
        "4",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--ratio",
        "0.5",
        "--device",
        "cpu",
        "--out",
        out,
        "--batch-size",
        "8",
        "--calib-images",
        "8",
    ]
}

#[test]
fn run_values_out_of_range_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_data(dir.path(), 4);
    let out = dir.path().join("out");
    for (flag, value, expected) in [
        (
            "--storage-size",
            "0",
            "invalid storage size: 0 (must be in 1..=4096)",
        ),
        (
            "--image-size",
            "0",
            "invalid image size: 0 (must be in 1..=4096)",
        ),
        ("--lr", "nan", "invalid lr: NaN (must be finite and > 0)"),
        ("--lr", "0", "invalid lr: 0 (must be finite and > 0)"),
        ("--momentum", "1", "invalid momentum: 1 (must be in [0, 1))"),
        ("--weight-decay", "inf", "invalid weight decay: inf"),
        ("--gamma", "0", "invalid gamma: 0 (must be in (0, 1])"),
        ("--step-size", "0", "invalid step size: 0"),
        ("--batch-size", "0", "invalid batch size: 0"),
        ("--train-limit", "0", "invalid train limit: 0"),
    ] {
        let mut args = run_args(path_str(&data), path_str(&out));
        match args.iter().position(|a| *a == flag) {
            Some(at) => args[at + 1] = value,
            None => args.extend([flag, value]),
        }
        refused(&tucker_nb(&args), &[expected]);
        assert!(!out.exists(), "{flag} {value}: the run folder was made");
    }
}

#[test]
fn evaluating_a_model_with_other_classes_than_asked_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_data(dir.path(), 4);
    let model = edited_model(dir.path(), "ten.safetensors", |_| {});
    let evaluate = |classes: &str, data: &Path| {
        tucker_nb(&[
            "evaluate",
            "--model",
            path_str(&model),
            "--num-classes",
            classes,
            "--data",
            path_str(data),
            "--image-size",
            "32",
            "--device",
            "cpu",
        ])
    };
    refused(
        &evaluate("100", &data),
        &[
            "ten.safetensors",
            "the model has 10 classes, not the 100 asked for",
        ],
    );
    assert!(evaluate("10", &data).status.success());
    // A model with fewer classes than the data.
    let run = evaluate("10", &small_data(&dir.path().join("wide"), 12));
    refused(
        &run,
        &["ten.safetensors", "the model has 10 classes, the data 12"],
    );
}

#[test]
fn convert_cifar_refuses_label_names_that_are_not_plain_unique_folder_names() {
    let dir = tempfile::tempdir().unwrap();
    let cifar = dir.path().join("cifar");
    let spec = SyntheticSpec {
        classes: 100,
        train_per_class: 1,
        val_per_class: 1,
        size: 32,
        seed: 1,
    };
    synthetic::generate(&cifar, spec, SyntheticFormat::Cifar100Binary).unwrap();
    let names_file = cifar.join("fine_label_names.txt");
    let names: Vec<String> = (0..100).map(|i| format!("class{i}")).collect();
    for (bad, expected) in [
        (
            "../evil",
            "\"../evil\" (number 4) is not a plain folder name",
        ),
        ("class7", "\"class7\" appears twice (numbers 4 and 8)"),
        (".hidden", "is not a plain folder name"),
    ] {
        let mut names = names.clone();
        names[3] = bad.to_string();
        std::fs::write(&names_file, names.join("\n")).unwrap();
        let out = dir.path().join("tree");
        let run = tucker_nb(&[
            "convert-cifar",
            "--cifar",
            path_str(&cifar),
            "--out",
            path_str(&out),
        ]);
        refused(&run, &["fine_label_names.txt", expected]);
        assert!(!out.exists() && !dir.path().join("evil").exists());
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "left behind: {left:?}");
    }
}

#[test]
fn a_report_path_that_is_a_folder_leaves_the_existing_output_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let weights = edited_model(dir.path(), "model.safetensors", |_| {});
    let out = dir.path().join("out.safetensors");
    std::fs::write(&out, "earlier result").unwrap();
    let report = dir.path().join("a-folder");
    std::fs::create_dir(&report).unwrap();
    let run = compress(&weights, &out, &["--report", path_str(&report)]);
    refused(&run, &["a-folder", "is a folder"]);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "earlier result");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
}

#[test]
fn temporaries_left_by_a_killed_write_are_removed_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let weights = edited_model(dir.path(), "model.safetensors", |_| {});
    let out = dir.path().join("out.safetensors");
    // A process that has exited: its PID names the temporary it would have left.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    let stale = dir.path().join(format!(".out.safetensors.tmp-{pid}"));
    std::fs::write(&stale, "half-written").unwrap();
    let run = compress(&weights, &out, &[]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(out.is_file() && !stale.exists());
}

#[test]
fn a_used_run_folder_is_refused_and_resume_checks_it_is_the_same_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_data(dir.path(), 4);
    let out = dir.path().join("run");
    let args = run_args(path_str(&data), path_str(&out));
    tucker_nb_ok(&args);
    let summary = std::fs::read(out.join("summary.json")).unwrap();

    refused(
        &tucker_nb(&args),
        &["run", "is not empty", "--resume", "--force"],
    );
    let seed = [&args[..], &["--resume", "--seed", "8"]].concat();
    refused(
        &tucker_nb(&seed),
        &[
            "run.json",
            "--resume with another seed",
            "has 0, this one 8",
        ],
    );
    let lr = [&args[..], &["--resume", "--lr", "0.02"]].concat();
    refused(&tucker_nb(&lr), &["run.json", "--resume with another lr"]);
    // Another dataset (one more image) is another run too.
    std::fs::copy(
        data.join("train/class_000/00000.png"),
        data.join("train/class_000/zz.png"),
    )
    .unwrap();
    let resume = [&args[..], &["--resume"]].concat();
    refused(
        &tucker_nb(&resume),
        &["run.json", "--resume with another data"],
    );
    assert_eq!(
        std::fs::read(out.join("summary.json")).unwrap(),
        summary,
        "output lost"
    );
    // --force starts afresh over it.
    tucker_nb_ok(&[&args[..], &["--force"]].concat());
}
