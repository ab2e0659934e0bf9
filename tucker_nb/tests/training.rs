//! fine_tune and evaluate on generated data: learning, the metrics table, non-finite losses, and a
//! run killed mid-epoch resuming to the same result as an uninterrupted one.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use tch::Device;
use tucker_nb::synthetic::{self, SyntheticFormat, SyntheticSpec};
use tucker_nb::train::{fine_tune_rows, METRICS_COLUMNS};
use tucker_nb::{
    evaluate, fine_tune, DataSource, FineTuneConfig, Loader, ResNet18, StorageOptions, Trainable,
    Transform,
};

fn dataset(dir: &Path, classes: usize, train: usize) -> PathBuf {
    let root = dir.join("data");
    let spec = SyntheticSpec {
        classes,
        train_per_class: train,
        val_per_class: 8,
        size: 32,
        seed: 1,
    };
    synthetic::generate(&root, spec, SyntheticFormat::ImageFolder).unwrap();
    root
}

fn loaders(root: &Path, batch: usize) -> (Loader, Loader) {
    let (train, val) = DataSource::detect(root)
        .unwrap()
        .load_both(StorageOptions::default())
        .unwrap();
    (
        Loader::new(
            &train,
            batch,
            Transform::Train { size: 32 },
            Device::Cpu,
            true,
        )
        .with_seed(3),
        Loader::new(&val, 64, Transform::Eval { size: 32 }, Device::Cpu, true),
    )
}

#[test]
fn fine_tune_learns_a_generated_dataset() {
    tucker_nb::runtime::init();
    tch::manual_seed(0);
    let dir = tempfile::tempdir().unwrap();
    let (train, val) = loaders(&dataset(dir.path(), 4, 24), 16);
    let mut model = ResNet18::new(4, Device::Cpu);
    let before = evaluate(&model, &val).unwrap();
    let config = FineTuneConfig {
        epochs: 4,
        trainable: Trainable::All,
        step_size: 3,
        ..Default::default()
    };
    let frame = fine_tune(&mut model, &train, &val, &config).unwrap();
    assert_eq!(
        frame
            .get_column_names()
            .iter()
            .map(|c| c.as_str())
            .collect::<Vec<_>>(),
        METRICS_COLUMNS
    );
    assert_eq!(frame.height(), 4);
    let col = |name: &str| {
        frame
            .column(name)
            .unwrap()
            .f64()
            .unwrap()
            .into_no_null_iter()
            .collect::<Vec<f64>>()
    };
    let (loss, top1, lr) = (col("train_loss"), col("val_top1"), col("lr"));
    assert!(loss[3] < loss[0] * 0.7, "train loss did not fall: {loss:?}");
    assert!(
        top1[3] >= 0.75,
        "val top-1 {top1:?} (chance is 0.25; before training {})",
        before.top1
    );
    assert_eq!(lr, [0.01, 0.01, 0.01, 0.001]);
    let after = evaluate(&model, &val).unwrap();
    assert!((after.top1 - top1[3]).abs() < 1e-9 && after.top5 == 1.0 && after.images == 32);
    // Parameters are left without gradients, so later steps (compression) see plain tensors.
    assert!(model
        .named_tensors()
        .iter()
        .all(|(_, t)| !t.requires_grad()));
}

#[test]
fn a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint() {
    tucker_nb::runtime::init();
    let dir = tempfile::tempdir().unwrap();
    let (train, val) = loaders(&dataset(dir.path(), 2, 16), 8);
    let ckpt = dir.path().join("ckpt");
    let mut model = ResNet18::new(2, Device::Cpu);
    let good = FineTuneConfig {
        epochs: 1,
        checkpoint_dir: Some(ckpt.clone()),
        ..Default::default()
    };
    fine_tune_rows(&mut model, &train, &val, &good).unwrap();
    let index = std::fs::read_to_string(ckpt.join("checkpoint.json")).unwrap();
    let weights = std::fs::read(ckpt.join("checkpoint-e1.safetensors")).unwrap();

    // One NaN weight in the classifier makes every logit, and so the loss, NaN.
    tch::no_grad(|| {
        let _ = model.fc.weight.get(0).get(0).fill_(f64::NAN);
    });
    let e = fine_tune_rows(&mut model, &train, &val, &good)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("invalid loss")
            && e.contains("original epoch 1")
            && e.contains("last good checkpoint"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_to_string(ckpt.join("checkpoint.json")).unwrap(),
        index
    );
    assert_eq!(
        std::fs::read(ckpt.join("checkpoint-e1.safetensors")).unwrap(),
        weights
    );
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
        "3",
        "--compressed-epochs",
        "1",
        "--ratio",
        "0.5",
        "--device",
        "cpu",
        "--out",
        out,
        "--batch-size",
        "8",
        "--seed",
        "7",
    ]
}

fn epochs_done(index: &Path) -> usize {
    std::fs::read_to_string(index)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["epochs_done"].as_u64())
        .unwrap_or(0) as usize
}

#[test]
fn a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), 4, 40);
    let (data, full, resumed) = (
        path_str(&data),
        dir.path().join("full"),
        dir.path().join("resumed"),
    );

    let uninterrupted = tucker_nb(&run_args(data, path_str(&full)));
    assert!(
        uninterrupted.status.success(),
        "{}",
        String::from_utf8_lossy(&uninterrupted.stderr)
    );

    // Kill the second run as soon as epoch 1's checkpoint is written, i.e. inside epoch 2.
    let mut child = Command::new(env!("CARGO_BIN_EXE_tucker-nb"))
        .args(run_args(data, path_str(&resumed)))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let index = resumed.join("original/checkpoint.json");
    let deadline = Instant::now() + Duration::from_secs(600);
    while epochs_done(&index) < 1 {
        assert!(Instant::now() < deadline, "no checkpoint after epoch 1");
        assert!(
            child.try_wait().unwrap().is_none(),
            "run ended before it could be interrupted"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    assert!(!child.wait().unwrap().success());
    assert_eq!(
        epochs_done(&index),
        1,
        "killed too late: epoch 2 had finished"
    );
    assert!(!resumed.join("metrics.csv").exists());

    let mut args = run_args(data, path_str(&resumed));
    args.push("--resume");
    let finished = tucker_nb(&args);
    assert!(
        finished.status.success(),
        "{}",
        String::from_utf8_lossy(&finished.stderr)
    );
    assert!(String::from_utf8_lossy(&finished.stderr).contains("resuming original"));

    // Same weights, and the same metrics but for the wall-clock columns.
    let (a, b) = (
        read(&full.join("compressed.safetensors")),
        read(&resumed.join("compressed.safetensors")),
    );
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        let diff = (t.to_kind(tch::Kind::Double) - b[name].to_kind(tch::Kind::Double))
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff <= 1e-6, "{name} differs by {diff}");
    }
    let metrics = |p: &Path| -> Vec<Vec<String>> {
        std::fs::read_to_string(p.join("metrics.csv"))
            .unwrap()
            .lines()
            .map(|l| l.split(',').take(8).map(String::from).collect())
            .collect()
    };
    assert_eq!(metrics(&full), metrics(&resumed));
    assert_eq!(metrics(&full).len(), 1 + 3 + 1);
}
