//! fine_tune and evaluate on generated data: learning, the metrics table, non-finite losses, and a
//! run killed mid-epoch resuming to the same result as an uninterrupted one.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use tch::{Device, Kind, Tensor};
use tucker_nb::synthetic::{self, SyntheticFormat, SyntheticSpec};
use tucker_nb::train::HeldOutScore;
use tucker_nb::train::METRICS_COLUMNS;
use tucker_nb::{
    evaluate, fine_tune, BnMode, FineTune, FineTuneConfig, Loader, ResNet18, RunConfig, Trainable,
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
    let mut config = RunConfig::new(root, "", Device::Cpu);
    config.num_classes = 10;
    config.image_size = 32;
    config.batch_size = batch;
    config.eval_batch_size = 64;
    config.seed = 3;
    tucker_nb::experiment::loaders(&config).unwrap()
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
    let frame = fine_tune(&mut model, &train, &val, &config)
        .unwrap()
        .frame();
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
    // 6 full batches an epoch: the steady state is batches 2 to 6, the first is the warm-up.
    let (rate, warmup, seconds) = (col("images_per_s"), col("warmup_seconds"), col("seconds"));
    for e in 0..4 {
        assert!(
            rate[e] > 0.0 && col("val_images_per_s")[e] > 0.0,
            "epoch {e}"
        );
        assert!(
            warmup[e] > 0.0 && warmup[e] < seconds[e],
            "epoch {e}: warm-up {warmup:?}"
        );
    }
    let after = evaluate(&model, &val).unwrap();
    assert!((after.top1 - top1[3]).abs() < 1e-9 && after.top5 == 1.0 && after.images == 32);
    // Parameters are left without gradients, so later steps (compression) see plain tensors.
    assert!(model
        .named_tensors()
        .iter()
        .all(|(_, t)| !t.requires_grad()));
}

#[test]
fn channels_last_training_follows_the_nchw_one() {
    tucker_nb::runtime::init();
    let dir = tempfile::tempdir().unwrap();
    let (train, val) = loaders(&dataset(dir.path(), 4, 8), 8);
    let start = ResNet18::new(4, Device::Cpu);
    let train_in = |channels_last: bool| {
        let mut model = start.deep_copy();
        // Frozen BN: with batch statistics of 8 images a random network is so ill-conditioned
        // that PyTorch's own fp32 gradients stray from float64's by up to 9 % on some draws.
        let config = FineTuneConfig {
            epochs: 1,
            trainable: Trainable::All,
            max_batches: Some(3),
            bn: BnMode::Frozen,
            channels_last,
            ..Default::default()
        };
        let rows = fine_tune(&mut model, &train, &val, &config).unwrap().0;
        assert_eq!(model.is_channels_last(), channels_last);
        (model, rows[0].train_loss)
    };
    let (nchw, loss_nchw) = train_in(false);
    let (nhwc, loss_nhwc) = train_in(true);
    assert!(
        (loss_nchw - loss_nhwc).abs() < 1e-4 * loss_nchw,
        "{loss_nchw} vs {loss_nhwc}"
    );
    // How far the layouts' weights part, against how far the three steps moved them: about 3e-6
    // from rounding (8 runs); a misplaced gradient would be of order 1.
    let (mut apart, mut moved) = (0.0, 0.0);
    let tensors = nchw.named_tensors().into_iter().zip(nhwc.named_tensors());
    for (((_, a), (_, b)), (_, s)) in tensors.zip(start.named_tensors()) {
        let sq = |t: Tensor| {
            t.to_kind(Kind::Double)
                .square()
                .sum(Kind::Double)
                .double_value(&[])
        };
        apart += sq(&a - &b);
        moved += sq(&a - &s);
    }
    let ratio = (apart / moved).sqrt();
    assert!(
        ratio < 1e-2,
        "the layouts' weights part by {ratio} of their movement"
    );
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
    fine_tune(&mut model, &train, &val, &good).unwrap();
    let index = std::fs::read_to_string(ckpt.join("checkpoint.json")).unwrap();
    let weights = std::fs::read(ckpt.join("checkpoint-e1.safetensors")).unwrap();

    // One NaN weight in the classifier makes every logit, and so the loss, NaN.
    tch::no_grad(|| {
        let _ = model.fc.weight.get(0).get(0).fill_(f64::NAN);
    });
    let e = fine_tune(&mut model, &train, &val, &good)
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

/// Copies of every tensor of `model`.
fn tensors(model: &ResNet18) -> Vec<(String, Tensor)> {
    model
        .named_tensors()
        .into_iter()
        .map(|(n, t)| (n, t.copy()))
        .collect()
}

fn assert_bit_for_bit(model: &ResNet18, before: &[(String, Tensor)]) {
    for ((name, t), (_, b)) in model.named_tensors().iter().zip(before) {
        assert!(t.equal(b), "{name} is not the starting model's");
    }
}

/// `n` random 32-px images, all of class `label` (of two).
fn one_class(n: i64, label: i64, seed: i64) -> Loader {
    tch::manual_seed(seed);
    let data = tucker_nb::Dataset {
        images: Tensor::randint(256, [n, 3, 32, 32], (Kind::Uint8, Device::Cpu)),
        labels: Tensor::full([n], label, (Kind::Int64, Device::Cpu)),
        classes: vec!["a".into(), "b".into()],
        names: (0..n).map(|i| format!("{label}/{i}.png")).collect(),
        key: format!("one-class-{label}-{seed}"),
        mapped: None,
    };
    let transform = tucker_nb::loader::Transform::Eval { size: 32 };
    Loader::new(&data, 8, transform, Device::Cpu, false)
}

/// A two-class model whose fc says class `class` for every image, with logits ±10.
fn always_says(class: usize) -> ResNet18 {
    let mut model = ResNet18::new(2, Device::Cpu);
    let mut bias = [-10.0f32; 2];
    bias[class] = 10.0;
    tch::no_grad(|| {
        let _ = model.fc.weight.zero_();
        model.fc.bias.copy_(&Tensor::from_slice(&bias));
    });
    model
}

#[test]
fn a_fine_tune_whose_every_epoch_is_worse_returns_the_starting_weights_bit_for_bit() {
    tucker_nb::runtime::init();
    // The model says class b for everything: held-out top-1 1 on images of class b. It is
    // trained on images of class a only, at a rate that flips fc within the first step, so
    // every epoch's held-out top-1 is lower and its held-out loss higher than the start's (far
    // enough, perhaps, for the guard to end the phase early: the start is returned either way).
    let train = one_class(16, 0, 1);
    let held_out = one_class(8, 1, 2);
    let mut model = always_says(1);
    let start = HeldOutScore::of(&model, &held_out, false).unwrap();
    assert_eq!(start.top1, 1.0);
    let before = tensors(&model);
    let config = FineTuneConfig {
        epochs: 3,
        lr: 10.0,
        momentum: 0.0,
        trainable: Trainable::Classifier,
        ..Default::default()
    };
    let run = FineTune::from(&config).selecting_on(Some(&held_out));
    let rows = fine_tune(&mut model, &train, &held_out, run).unwrap().0;
    assert!(!rows.is_empty());
    for row in &rows {
        let (top1, loss) = (row.held_out_top1.unwrap(), row.held_out_loss.unwrap());
        assert!(top1 < start.top1, "epoch {} scored {top1}", row.epoch);
        assert!(loss > start.loss, "epoch {}: loss {loss}", row.epoch);
        assert_eq!(row.chosen_epoch, 0, "epoch {}", row.epoch);
    }
    // The BN statistics moved in training (batch-statistics mode): restored too.
    assert_bit_for_bit(&model, &before);
}

#[test]
fn the_epoch_with_the_lowest_held_out_loss_is_chosen_whatever_its_top1() {
    tucker_nb::runtime::init();
    // One class, a model that is always right: every epoch ties at held-out top-1 1, so the
    // held-out loss alone decides. Under a heavy weight decay the logits shrink and the loss
    // grows every epoch: the start is returned, bit for bit. Without it, training on the class
    // lowers the loss every epoch: the last epoch is returned.
    let train = one_class(16, 0, 3);
    let held_out = one_class(8, 0, 4);
    let decayed = FineTuneConfig {
        epochs: 2,
        lr: 1.0,
        momentum: 0.0,
        weight_decay: 0.5,
        trainable: Trainable::Classifier,
        ..Default::default()
    };
    let trained = FineTuneConfig {
        weight_decay: 0.0,
        ..decayed.clone()
    };
    for (config, chosen) in [(decayed, 0), (trained, 2)] {
        let mut model = always_says(0);
        let before = tensors(&model);
        let start = HeldOutScore::of(&model, &held_out, false).unwrap();
        let run = FineTune::from(&config).selecting_on(Some(&held_out));
        let rows = fine_tune(&mut model, &train, &held_out, run).unwrap().0;
        let mut previous = start.loss;
        for row in &rows {
            assert_eq!(row.held_out_top1, Some(1.0), "epoch {}", row.epoch);
            let loss = row.held_out_loss.unwrap();
            let rising = chosen == 0;
            assert_eq!(
                loss > previous,
                rising,
                "epoch {}: {previous} → {loss}",
                row.epoch
            );
            previous = loss;
            assert_eq!(row.chosen_epoch, chosen, "epoch {}", row.epoch);
        }
        let returned = HeldOutScore::of(&model, &held_out, false).unwrap();
        if chosen == 0 {
            assert_bit_for_bit(&model, &before);
        } else {
            assert_eq!(
                Some(returned.loss),
                rows[1].held_out_loss,
                "the last epoch's model"
            );
        }
    }
}

#[test]
fn epoch_recalibration_ends_each_epoch_with_the_calibration_sets_statistics() {
    tucker_nb::runtime::init();
    let dir = tempfile::tempdir().unwrap();
    let (train, val) = loaders(&dataset(dir.path(), 2, 16), 8);
    let running = |m: &ResNet18| -> Vec<(String, Tensor)> {
        tensors(m)
            .into_iter()
            .filter(|(n, _)| n.ends_with("running_mean") || n.ends_with("running_var"))
            .collect()
    };
    let config = FineTuneConfig {
        epochs: 1,
        lr: 0.01,
        trainable: Trainable::Classifier,
        bn: BnMode::Statistics,
        epoch_recalibration: Some(12),
        ..Default::default()
    };
    tch::manual_seed(0);
    let start = ResNet18::new(2, Device::Cpu);
    let calibration = train
        .calibration_set(12, train.seed, val.batch_size)
        .unwrap();
    let mut recalibrated = start.deep_copy();
    fine_tune(&mut recalibrated, &train, &val, &config).unwrap();
    let mut expected = recalibrated.deep_copy();
    tucker_nb::train::recalibrate_bn(&mut expected, &calibration).unwrap();
    for ((name, got), (_, want)) in running(&recalibrated).iter().zip(&running(&expected)) {
        assert!(
            got.equal(want),
            "{name}: not the calibration set's statistics"
        );
    }
    // Without it, the epoch leaves the training batches' statistics: the check above can fail.
    let mut plain = start.deep_copy();
    let seed_config = FineTuneConfig {
        epoch_recalibration: None,
        ..config
    };
    fine_tune(&mut plain, &train, &val, &seed_config).unwrap();
    let differs = running(&plain)
        .iter()
        .zip(&running(&expected))
        .any(|((_, a), (_, b))| !a.allclose(b, 1e-4, 1e-4, false));
    assert!(
        differs,
        "the training batches left the calibration set's statistics"
    );
}

#[test]
fn the_guard_stops_a_diverging_fine_tune_and_returns_the_best_model() {
    tucker_nb::runtime::init();
    let dir = tempfile::tempdir().unwrap();
    let (train, val) = loaders(&dataset(dir.path(), 2, 16), 8);
    let (train, held_out) = train.hold_out(8, 1, 8).unwrap();
    let mut model = ResNet18::new(2, Device::Cpu);
    let before = tensors(&model);
    // A learning rate of 1e30 overflows the weights at the first step: the loss is NaN.
    let config = FineTuneConfig {
        epochs: 3,
        lr: 1e30,
        trainable: Trainable::All,
        ..Default::default()
    };
    let plain = fine_tune(&mut model.deep_copy(), &train, &val, &config).unwrap_err();
    assert!(plain.to_string().contains("training stopped"), "{plain}");
    let run = FineTune::from(&config).selecting_on(Some(&held_out));
    let rows = fine_tune(&mut model, &train, &val, run).unwrap().0;
    assert!(rows.iter().all(|r| r.chosen_epoch == 0), "{rows:?}");
    assert_bit_for_bit(&model, &before);
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
    // The default recipe's compressed fine-tune (distilled, choosing its epoch on held-out
    // images) over three epochs, killed in its second: the selection's best model so far and its
    // score, and whether the last epoch was past the guard's limit, come back from the checkpoint.
    // (At lr 0.01 this random-weight model diverges, and the guard would end the phase early.)
    let args = |out| {
        let mut args = run_args(data, out);
        let epochs = args
            .iter()
            .position(|a| *a == "--compressed-epochs")
            .unwrap();
        args[epochs + 1] = "3";
        args.extend(["--lr", "0.001"]);
        args
    };

    tucker_nb_ok(&args(path_str(&full)));

    // Kill the second run as soon as epoch 1's checkpoint is written, i.e. inside epoch 2.
    let mut child = Command::new(env!("CARGO_BIN_EXE_tucker-nb"))
        .args(args(path_str(&resumed)))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let index = resumed.join("compressed/checkpoint.json");
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

    let mut resume = args(path_str(&resumed));
    resume.push("--resume");
    let finished = tucker_nb_ok(&resume);
    let stderr = String::from_utf8_lossy(&finished.stderr);
    assert!(stderr.contains("resuming compressed"), "{stderr}");
    let index = read_json(&index);
    assert!(index["selection"]["best_epoch"].is_u64(), "{index}");

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
    // Text columns equal; figures to 1e-9 (a validation loss summed in two processes can differ
    // in its last digit).
    let (a, b) = (metrics(&full), metrics(&resumed));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        match (x.parse::<f64>(), y.parse::<f64>()) {
            (Ok(u), Ok(v)) => assert!((u - v).abs() <= 1e-9 * u.abs().max(1.0), "{x} vs {y}"),
            _ => assert_eq!(x, y),
        }
    }
    assert_eq!(a.len(), 1 + 3 + 3);
    let chosen = |p: &Path| {
        Csv::read(&p.join("metrics.csv")).column("chosen_epoch")[3..]
            .to_vec()
            .join(",")
    };
    assert_eq!(chosen(&full), chosen(&resumed));
    let held_out = |p: &Path| -> Vec<f64> {
        Csv::read(&p.join("metrics.csv")).column("held_out_loss")[3..]
            .iter()
            .map(|v| v.parse().unwrap())
            .collect()
    };
    for (u, v) in held_out(&full).iter().zip(held_out(&resumed)) {
        assert!(
            (u - v).abs() <= 1e-9 * u.abs().max(1.0),
            "held-out loss {u} vs {v}"
        );
    }

    // The summary's original and fine-tuned figures are the chosen epoch's validation of each
    // phase, not a second evaluation (whose speed would differ); a fine-tune that kept the
    // model it started from reports the recalibrated model's figures.
    let summary = read_json(&full.join("summary.json"));
    let rows = Csv::read(&full.join("metrics.csv"));
    let chosen: usize = rows.column("chosen_epoch")[3].parse().unwrap();
    assert_eq!(summary["chosen_epoch"].as_u64(), Some(chosen as u64));
    assert_eq!(summary["recipe"], "distill");
    if chosen == 0 {
        assert_eq!(summary["fine_tuned"], summary["recalibrated"]);
    }
    let fine_tuned_row = 2 + chosen.max(1);
    for (key, row) in [("original", 2), ("fine_tuned", fine_tuned_row)] {
        if key == "fine_tuned" && chosen == 0 {
            continue;
        }
        let recorded = |column: &str| rows.column(column)[row].parse::<f64>().unwrap();
        let figure = |field: &str| summary[key][field].as_f64().unwrap();
        let same = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(1.0);
        assert!(same(figure("top1"), recorded("val_top1")), "{key}");
        assert!(same(figure("loss"), recorded("val_loss")), "{key}");
        assert!(
            same(figure("eval_images_per_s"), recorded("val_images_per_s")),
            "{key}: evaluated again"
        );
    }
}

#[test]
fn a_multi_stage_run_compresses_further_after_a_short_fine_tune() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), 4, 8);
    let out = dir.path().join("stages");
    let mut args = run_args(path_str(&data), path_str(&out));
    let ratio = args.iter().position(|a| *a == "--ratio").unwrap();
    args.splice(ratio..ratio + 2, ["--policy", "budget-macs:0.5"]);
    let epochs = args.iter().position(|a| *a == "--epochs").unwrap();
    args[epochs + 1] = "1";
    args.extend([
        "--stage",
        "budget-macs:0.25",
        "--stage-epochs",
        "1",
        "--method",
        "hosvd",
    ]);
    tucker_nb_ok(&args);
    let summary = read_json(&out.join("summary.json"));
    let macs = |v: &serde_json::Value| v["conv_macs"].as_f64().unwrap();
    let dense = macs(&summary["original"]);
    let first = macs(&summary["compressed"]) / dense;
    let second = macs(&summary["stages"][0]) / dense;
    assert!((first / 0.5 - 1.0).abs() <= 0.02, "stage 1 at {first}");
    assert!((second / 0.25 - 1.0).abs() <= 0.02, "stage 2 at {second}");
    assert_eq!(macs(&summary["fine_tuned"]), macs(&summary["stages"][0]));
    assert!(out.join("layers-stage2.csv").is_file());
    let metrics = Csv::read(&out.join("metrics.csv"));
    assert_eq!(
        metrics.column("phase"),
        ["original", "stage1", "compressed"]
    );

    let bad = tucker_nb(&[
        "run",
        "--data",
        path_str(&data),
        "--weights",
        "none",
        "--ratio",
        "0.5",
        "--stage",
        "ratio:0.2",
        "--out",
        path_str(&dir.path().join("bad")),
    ]);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && stderr.contains("ratio:0.2"),
        "{stderr}"
    );
}

#[test]
fn a_budget_sweep_gives_one_row_per_policy_and_leaves_the_model_alone() {
    use tucker_nb::sweep::{sweep, SWEEP_COLUMNS};
    use tucker_nb::{CompressionPolicy, Cost, RankPolicy};
    tucker_nb::runtime::init();
    tch::manual_seed(1);
    let dir = tempfile::tempdir().unwrap();
    let (train, val) = loaders(&dataset(dir.path(), 4, 8), 16);
    let model = ResNet18::new(4, Device::Cpu);
    let before: Vec<tch::Tensor> = model
        .named_tensors()
        .iter()
        .map(|(_, t)| t.copy())
        .collect();
    let policies: Vec<CompressionPolicy> = [0.5, 0.25]
        .iter()
        .map(|b| CompressionPolicy {
            ranks: RankPolicy::budget(Cost::Macs, *b).unwrap(),
            input_size: [32, 32],
            method: Some(tucker_nb::Method::Hosvd),
            ..Default::default()
        })
        .collect();
    let config = FineTuneConfig {
        epochs: 1,
        ..Default::default()
    };
    let calibration = train.calibration_set(16, 0, 8).unwrap();
    let frame = sweep(&model, &policies, (&train, &val, &calibration), &config).unwrap();
    let names: Vec<&str> = frame
        .get_column_names()
        .iter()
        .map(|c| c.as_str())
        .collect();
    assert_eq!(names, SWEEP_COLUMNS);
    assert_eq!(frame.height(), 3);
    let policy: Vec<&str> = frame
        .column("policy")
        .unwrap()
        .str()
        .unwrap()
        .iter()
        .map(|p| p.unwrap())
        .collect();
    assert_eq!(policy, ["dense", "budget-macs:0.5", "budget-macs:0.25"]);
    let ratios: Vec<f64> = frame
        .column("macs_ratio")
        .unwrap()
        .f64()
        .unwrap()
        .into_no_null_iter()
        .collect();
    for (got, want) in ratios.iter().zip([1.0, 0.5, 0.25]) {
        assert!((got / want - 1.0).abs() <= 0.02, "{got} for {want}");
    }
    let top1 = |column: &str| -> Vec<f64> {
        let values = frame.column(column).unwrap().f64().unwrap();
        values.into_no_null_iter().collect()
    };
    assert!(top1("top1_recalibrated")
        .iter()
        .all(|t| (0.0..=1.0).contains(t)));
    assert_eq!(top1("top1_recalibrated")[0], top1("top1_compressed")[0]);
    let front = frame.column("pareto").unwrap().bool().unwrap();
    assert!(front.iter().any(|b| b == Some(true)));
    let front = frame.column("pareto_speed").unwrap().bool().unwrap();
    assert!(front.iter().any(|b| b == Some(true)));
    // Every row's throughput was measured, the compressed ones beside the dense model.
    assert!(top1("images_per_s")
        .iter()
        .all(|r| r.is_finite() && *r > 0.0));
    assert!(top1("speedup").iter().all(|r| r.is_finite() && *r > 0.0));
    let at = frame
        .column("speed_at")
        .unwrap()
        .str()
        .unwrap()
        .get(1)
        .unwrap()
        .to_string();
    assert!(at.contains("fp32") && at.contains("batch 64"), "{at}");
    for ((name, t), b) in model.named_tensors().iter().zip(&before) {
        assert!(t.equal(b), "{name} changed");
    }
    let chart = tucker_nb::plots::pareto_chart(&frame).unwrap();
    assert!(image::load_from_memory(&chart.png).is_ok());
    let chart = tucker_nb::plots::pareto_speed_chart(&frame).unwrap();
    assert!(image::load_from_memory(&chart.png).is_ok());
}

#[test]
fn a_sweep_of_real_shaped_data_trains_every_policy_through_its_smaller_last_batch() {
    // The shape of issue 26's crash (the digits at 64 px: a Tucker-2 downsample whose 1×1 core
    // has 12 input channels, trained on an epoch's odd last batch, channels-last): 123 training
    // images less the default recipe's 30 held out make batches of 64 and 29. Default settings
    // otherwise, several epochs, two policies.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let spec = SyntheticSpec {
        classes: 3,
        train_per_class: 41,
        val_per_class: 8,
        size: 64,
        seed: 2,
    };
    synthetic::generate(&data, spec, SyntheticFormat::ImageFolder).unwrap();
    let out = dir.path().join("sweep");
    let run = tucker_nb_ok(&[
        "sweep",
        "--data",
        path_str(&data),
        "--weights",
        "none",
        "--num-classes",
        "3",
        "--image-size",
        "64",
        "--policies",
        "ratio:0.2,budget-macs:0.106",
        "--epochs",
        "3",
        "--device",
        "cpu",
        "--seed",
        "0",
        "--out",
        path_str(&out),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("budget-macs:0.106 epoch 3/3"), "{stderr}");
    let csv = Csv::read(&out.join("sweep.csv"));
    assert_eq!(
        csv.column("policy"),
        ["dense", "ratio:0.2", "budget-macs:0.106"]
    );
    for top1 in csv.column("top1") {
        let top1: f64 = top1.parse().unwrap();
        assert!((0.0..=1.0).contains(&top1), "top-1 {top1}");
    }
}

#[test]
fn the_sweep_command_writes_its_table_and_chart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), 4, 8);
    let out = dir.path().join("sweep");
    let common = [
        "sweep",
        "--data",
        path_str(&data),
        "--weights",
        "none",
        "--num-classes",
        "4",
        "--image-size",
        "32",
        "--method",
        "hosvd",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--out",
        path_str(&out),
    ];
    let bad = tucker_nb(
        &[
            &common[..],
            &["--policies", "budget-macs:0.5,budget-macs:2"],
        ]
        .concat(),
    );
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && stderr.contains("budget-macs: 2"),
        "{stderr}"
    );
    assert!(!out.join("sweep.csv").exists());

    // Distilled from the dense model, which exercises the teacher path end to end; a latency
    // budget beside a MACs one, timed at the run's batch.
    let cache = dir.path().join("latency-cache");
    let distilled = [
        "--policies",
        "budget-macs:0.5,budget-latency:0.6",
        "--distill",
        "2,0.5",
        "--latency-cache",
        path_str(&cache),
        "--eval-batch-size",
        "8",
    ];
    tucker_nb_ok(&[&common[..], &distilled].concat());
    let csv = std::fs::read_to_string(out.join("sweep.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], tucker_nb::sweep::SWEEP_COLUMNS.join(","));
    assert_eq!(lines.len(), 4, "{csv}");
    assert!(lines[1].starts_with("dense,") && lines[2].starts_with("budget-macs:0.5,"));
    assert!(
        lines[3].starts_with("budget-latency:0.6,") && lines[3].contains("batch 8,"),
        "{csv}"
    );
    assert_eq!(
        std::fs::read_dir(&cache).unwrap().count(),
        1,
        "one table, in the cache asked for"
    );
    for chart in ["pareto.png", "pareto-speed.png"] {
        assert!(image::open(out.join(chart)).is_ok(), "{chart}");
    }
    // Every point's fine-tune epochs, the phase naming the point's policy.
    let epochs = std::fs::read_to_string(out.join("sweep-metrics.csv")).unwrap();
    let lines: Vec<&str> = epochs.lines().collect();
    assert_eq!(lines[0], tucker_nb::train::METRICS_COLUMNS.join(","));
    let phases: Vec<&str> = lines[1..]
        .iter()
        .map(|l| l.split(',').next().unwrap())
        .collect();
    assert_eq!(
        phases,
        ["budget-macs:0.5", "budget-latency:0.6"],
        "{epochs}"
    );
}

#[test]
fn a_held_out_size_of_zero_or_the_whole_training_set_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), 2, 8); // 16 training images
    let out = dir.path().join("out");
    for (n, expected) in [
        ("0", "0 (must be ≥ 1)"),
        (
            "16",
            "16 (must be ≥ 1 and fewer than the 16 training images",
        ),
    ] {
        let mut args = run_args(path_str(&data), path_str(&out));
        args.extend(["--held-out-images", n]);
        let err = tucker_nb_err(&args);
        assert!(
            err.contains("held-out images") && err.contains(expected),
            "{err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(
            !out.join("run.json").exists(),
            "--held-out-images {n} wrote the fingerprint"
        );
    }
}

#[test]
fn the_seed_recipe_reproduces_the_training_run_from_before_recipes() {
    // fixtures/seed-recipe-metrics.csv: the first eight columns of metrics.csv as tucker-nb wrote
    // them before recipes existed (commit ce0fbcf, release build), for this very run: `gen-data
    // --classes 4 --train-per-class 16 --val-per-class 8 --size 32 --seed 1` and `run_args` with
    // `--batch-size 32 --lr 0.001`. This random-weight model's compressed fine-tune amplifies the
    // last bits of its factors (with batches of 8, one or two threads moved its loss by 2 %; at the
    // default lr it diverges to a loss in the millions), so it runs where it does not: batches of
    // 32 at lr 0.001, where the factors from the Gram eigenproblem and ce0fbcf's SVD give the same
    // figures to 1e-6. Every figure of every phase is compared.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    tucker_nb_ok(&[
        "gen-data",
        "--out",
        path_str(&data),
        "--classes",
        "4",
        "--train-per-class",
        "16",
        "--val-per-class",
        "8",
        "--size",
        "32",
        "--seed",
        "1",
    ]);
    let out = dir.path().join("out");
    let mut args = run_args(path_str(&data), path_str(&out));
    let batch = args.iter().position(|a| *a == "--batch-size").unwrap() + 1;
    args[batch] = "32";
    args.extend(["--recipe", "seed", "--lr", "0.001"]);
    // MKL's reproducible AVX2 code path and the two threads the fixture was written with: on a
    // CPU with AVX-512 and AMX, MKL's own choice moved the compressed epoch's val_loss by 1.5e-6
    // relative; one thread (scripts/test's) splits the sums otherwise and moves train_loss 5e-5.
    let run = Command::new(env!("CARGO_BIN_EXE_tucker-nb"))
        .args(&args)
        .env("MKL_CBWR", "AVX2")
        .env("OMP_NUM_THREADS", "2")
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/seed-recipe-metrics.csv");
    let then = Csv::read(&fixture);
    let now = Csv::read(&out.join("metrics.csv"));
    assert_eq!(
        then.column("phase"),
        ["original", "original", "original", "compressed"]
    );
    for column in &then.header {
        let (a, b) = (then.column(column), now.column(column));
        assert_eq!(a.len(), b.len(), "{column}");
        for (x, y) in a.iter().zip(&b) {
            match (x.parse::<f64>(), y.parse::<f64>()) {
                (Ok(x), Ok(y)) => {
                    let diff = (x - y).abs();
                    assert!(
                        diff <= 1e-6 * x.abs().max(1.0),
                        "{column}: {x} then, {y} now"
                    );
                }
                _ => assert_eq!(x, y, "{column}"),
            }
        }
    }
    let chosen: Vec<&str> = now.column("chosen_epoch");
    assert_eq!(
        chosen,
        ["3", "3", "3", "1"],
        "the seed's recipe keeps each phase's last epoch"
    );
    assert!(now.column("held_out_loss").iter().all(|v| v.is_empty()));
}

/// An ImageFolder in `dir/other` with one class, `zebra`, of one of `data`'s images.
fn zebra_folder(data: &Path, dir: &Path) -> PathBuf {
    let other = dir.join("other");
    std::fs::create_dir_all(other.join("zebra")).unwrap();
    let val = tucker_nb::data::ImageFolder::scan(&data.join("val")).unwrap();
    let (image, _) = &val.samples[0];
    std::fs::copy(image, other.join("zebra/a.png")).unwrap();
    other
}

#[test]
fn held_out_data_replaces_the_slice_of_training_images_and_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), 2, 8); // 16 training, 16 validation images
    let mut config = RunConfig::new(&data, dir.path().join("out"), Device::Cpu);
    config.image_size = 32;
    config.held_out_data = Some(data.join("val"));
    config.validate().unwrap();
    let (train_data, val_data) = tucker_nb::experiment::datasets(&config).unwrap();
    let folder = tucker_nb::experiment::held_out_folder(&config, &train_data.classes)
        .unwrap()
        .expect("the distill recipe selects on the folder");
    assert_eq!(folder.key, val_data.key, "the folder's images, decoded");
    let (train, _) = tucker_nb::experiment::loader_pair(&config, &train_data, &val_data);
    let (train, held_out) = tucker_nb::experiment::hold_out(&config, train, Some(&folder)).unwrap();
    let held_out = held_out.unwrap();
    assert_eq!(train.len(), 16, "every training image is trained on");
    assert_eq!(held_out.len(), 16);
    assert_eq!(held_out.transform, tucker_nb::Transform::Eval { size: 32 });
    // The folder's images enter the fingerprint; without a folder it is as before.
    let with =
        tucker_nb::experiment::RunFingerprint::new(&config, &train_data, &val_data, Some(&folder))
            .unwrap();
    let without =
        tucker_nb::experiment::RunFingerprint::new(&config, &train_data, &val_data, None).unwrap();
    assert_ne!(with, without);
    assert!(!without.0["data"].contains("held out"));

    // Refused: with a held-out count, with the seed's recipe, with other classes.
    let mut both = config.clone();
    both.held_out_images = Some(4);
    let err = both.validate().unwrap_err().to_string();
    assert!(
        err.contains("held-out images") && err.contains("val"),
        "{err}"
    );
    let mut seed = config.clone();
    seed.recipe = tucker_nb::train::Recipe::Seed;
    let err = seed.validate().unwrap_err().to_string();
    assert!(
        err.contains("held-out data") && err.contains("seed's recipe"),
        "{err}"
    );
    let other = zebra_folder(&data, dir.path());
    let mut wrong = config.clone();
    wrong.held_out_data = Some(other.clone());
    let err = tucker_nb::experiment::held_out_folder(&wrong, &train_data.classes)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&other.display().to_string()) && err.contains("zebra"),
        "{err}"
    );
}

#[test]
fn held_out_data_with_other_classes_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), 2, 8);
    let other = zebra_folder(&data, dir.path());
    let out = dir.path().join("out");
    let mut args = run_args(path_str(&data), path_str(&out));
    args.extend(["--held-out-data", path_str(&other)]);
    let err = tucker_nb_err(&args);
    assert!(
        err.contains("held-out data has classes zebra") && err.contains(path_str(&other)),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        !out.join("run.json").exists(),
        "the fingerprint was written"
    );
}
