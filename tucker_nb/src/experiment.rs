//! The seed's whole experiment as one call: fine-tune the original → evaluate → compress →
//! evaluate → fine-tune the compressed model → evaluate, writing `metrics.csv`, `layers.csv`,
//! `summary.json`, the models and per-phase checkpoints into one output folder. With further
//! stages, each fine-tunes the compressed model briefly and compresses it further
//! (`layers-stage2.csv`, …) before the final fine-tune.

use std::path::{Path, PathBuf};

use polars::prelude::DataFrame;
use serde::Serialize;
use tch::Device;

use crate::compressor::{compress_model, CompressionPolicy};
use crate::data::{DataSource, StorageOptions};
use crate::error::{Error, Result};
use crate::io;
use crate::loader::{Loader, Transform};
use crate::model::ResNet18;
use crate::report::CompressionReport;
use crate::train::{
    evaluate, fine_tune_rows, metrics_frame, write_frame_csv, BnMode, EvalResult, FineTuneConfig,
    Trainable,
};

/// Settings of a run; defaults mirror the seed (224 px, 5 + 5 epochs, batch 64, ratio 0.2).
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// ImageFolder root (`train/`, `val/`) or CIFAR-100 binary folder.
    pub data: PathBuf,
    /// torchvision `.pth` or safetensors; `None` starts from random weights.
    pub weights: Option<PathBuf>,
    pub num_classes: i64,
    pub image_size: i64,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    /// Fine-tune settings of the original model (`phase`, `trainable` are set by the run).
    pub fine_tune: FineTuneConfig,
    /// Epochs of the compressed model's fine-tune.
    pub compressed_epochs: usize,
    pub policy: CompressionPolicy,
    /// Multi-stage (MUSCO-style) compression: after `policy`, fine-tune `stage_epochs` epochs,
    /// then compress further with each of these in turn (data-driven policies refactorise the
    /// already factorised layers; budgets are fractions of the dense model's cost).
    pub stages: Vec<CompressionPolicy>,
    pub stage_epochs: usize,
    pub device: Device,
    pub out: PathBuf,
    pub resume: bool,
    pub seed: u64,
    /// Use only the first N training / validation images (quick runs).
    pub train_limit: Option<usize>,
    pub val_limit: Option<usize>,
    pub storage: StorageOptions,
    /// Keep the uint8 images on the device (no host→device copies per batch).
    pub resident_data: bool,
}

impl RunConfig {
    pub fn new(data: impl Into<PathBuf>, out: impl Into<PathBuf>, device: Device) -> Self {
        Self {
            data: data.into(),
            weights: None,
            num_classes: 100,
            image_size: 224,
            batch_size: 64,
            eval_batch_size: 256,
            fine_tune: FineTuneConfig::default(),
            compressed_epochs: 5,
            policy: CompressionPolicy::default(),
            stages: Vec::new(),
            stage_epochs: 1,
            device,
            out: out.into(),
            resume: false,
            seed: 0,
            train_limit: None,
            val_limit: None,
            storage: StorageOptions::default(),
            resident_data: true,
        }
    }
}

/// Accuracy and cost of one model at one point of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Checkpoint {
    pub top1: f64,
    pub top5: f64,
    pub loss: f64,
    pub params: i64,
    pub conv_macs: i64,
    pub eval_images_per_s: f64,
}

/// `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub original: Checkpoint,
    /// Right after the (first) compression.
    pub compressed: Checkpoint,
    /// Right after each further stage's compression (multi-stage runs).
    pub stages: Vec<Checkpoint>,
    pub fine_tuned: Checkpoint,
    pub image_size: i64,
    pub device: String,
    pub train_images: usize,
    pub val_images: usize,
}

/// What a run returns.
#[derive(Debug)]
pub struct RunResult {
    /// Both fine-tunes' epochs, in order ([`crate::train::METRICS_COLUMNS`]).
    pub metrics: DataFrame,
    /// The first compression's report.
    pub report: CompressionReport,
    /// Each further stage's report (its "before" is the previous stage's model).
    pub stage_reports: Vec<CompressionReport>,
    pub summary: Summary,
}

fn checkpoint(model: &ResNet18, eval: &EvalResult, image_size: i64) -> Checkpoint {
    let conv_macs = model.conv_macs([image_size, image_size]);
    Checkpoint {
        top1: eval.top1,
        top5: eval.top5,
        loss: eval.loss,
        params: model.num_params(),
        conv_macs,
        eval_images_per_s: eval.images_per_s,
    }
}

/// The run's training and validation loaders, and their image counts.
fn data_loaders(config: &RunConfig) -> Result<(Loader, Loader, usize, usize)> {
    let source = DataSource::detect(&config.data)?;
    let (mut train, mut val) = source.load_both(config.storage)?;
    if let Some(n) = config.train_limit {
        train = train.take(n);
    }
    if let Some(n) = config.val_limit {
        val = val.take(n);
    }
    if (train.classes.len() as i64) > config.num_classes {
        return Err(Error::value(
            "num_classes",
            format!(
                "{} but {} has {} classes",
                config.num_classes,
                config.data.display(),
                train.classes.len()
            ),
        ));
    }
    let size = config.image_size;
    let train_loader = Loader::new(
        &train,
        config.batch_size,
        Transform::Train { size },
        config.device,
        config.resident_data,
    )
    .with_seed(config.seed);
    let val_loader = Loader::new(
        &val,
        config.eval_batch_size,
        Transform::Eval { size },
        config.device,
        config.resident_data,
    );
    Ok((train_loader, val_loader, train.len(), val.len()))
}

fn initial_model(config: &RunConfig) -> Result<ResNet18> {
    match &config.weights {
        Some(w) => ResNet18::load(w, Some(config.num_classes), config.device),
        None => Ok(ResNet18::new(config.num_classes, config.device)),
    }
}

/// Runs the seed's flow. With `resume`, each phase continues from its checkpoint in `out`.
pub fn run(config: &RunConfig) -> Result<RunResult> {
    let out = &config.out;
    std::fs::create_dir_all(out).map_err(|e| Error::file(out, e))?;
    tch::manual_seed(config.seed as i64);
    let (train_loader, val_loader, train_images, val_images) = data_loaders(config)?;
    let size = config.image_size;
    let mut model = initial_model(config)?;

    // 1) fine-tune the original: the seed trains fc only.
    let phase_config = |phase: &str, epochs, trainable| FineTuneConfig {
        epochs,
        phase: phase.into(),
        trainable,
        checkpoint_dir: Some(out.join(phase)),
        resume: config.resume,
        ..config.fine_tune.clone()
    };
    let original_config = phase_config("original", config.fine_tune.epochs, Trainable::Classifier);
    let mut rows = fine_tune_rows(&mut model, &train_loader, &val_loader, &original_config)?;
    model.save(out.join("original.safetensors"))?;

    // 2) evaluate the original.
    let original = checkpoint(&model, &evaluate(&model, &val_loader)?, size);

    // 3) compress; 4) evaluate before fine-tuning.
    let report = compress_model(&mut model, &config.policy)?;
    report.write_csv(&out.join("layers.csv"))?;
    let compressed = checkpoint(&model, &evaluate(&model, &val_loader)?, size);

    // Multi-stage: fine-tune a little, then compress further toward the next budget.
    let mut stages = Vec::new();
    let mut stage_reports = Vec::new();
    for (i, policy) in config.stages.iter().enumerate() {
        let stage = i + 2;
        let stage_config = phase_config(
            &format!("stage{}", stage - 1),
            config.stage_epochs,
            Trainable::TuckerAndClassifier,
        );
        rows.extend(fine_tune_rows(
            &mut model,
            &train_loader,
            &val_loader,
            &stage_config,
        )?);
        let report = compress_model(&mut model, policy)?;
        report.write_csv(&out.join(format!("layers-stage{stage}.csv")))?;
        stages.push(checkpoint(&model, &evaluate(&model, &val_loader)?, size));
        stage_reports.push(report);
    }

    // 5) fine-tune the compressed model: Tucker factors and fc; 6) evaluate.
    let compressed_config = phase_config(
        "compressed",
        config.compressed_epochs,
        Trainable::TuckerAndClassifier,
    );
    rows.extend(fine_tune_rows(
        &mut model,
        &train_loader,
        &val_loader,
        &compressed_config,
    )?);
    model.save(out.join("compressed.safetensors"))?;
    let fine_tuned = checkpoint(&model, &evaluate(&model, &val_loader)?, size);

    let metrics = metrics_frame(&rows);
    write_frame_csv(&metrics, &out.join("metrics.csv"))?;
    let summary = Summary {
        original,
        compressed,
        stages,
        fine_tuned,
        image_size: size,
        device: format!("{:?}", config.device),
        train_images,
        val_images,
    };
    let json = serde_json::to_vec_pretty(&summary).expect("serialisable");
    io::write_atomic(&out.join("summary.json"), &json)?;
    Ok(RunResult {
        metrics,
        report,
        stage_reports,
        summary,
    })
}

/// The budget sweep on the run's data and weights: each of `policies` compresses a copy of the
/// model, which is fine-tuned for `config.compressed_epochs` (factorised convs and fc) and
/// evaluated. Writes `sweep.csv` and `pareto.png` into `config.out`; returns the sweep's frame
/// ([`crate::sweep::SWEEP_COLUMNS`]).
pub fn run_sweep(config: &RunConfig, policies: &[CompressionPolicy]) -> Result<DataFrame> {
    let out = &config.out;
    std::fs::create_dir_all(out).map_err(|e| Error::file(out, e))?;
    tch::manual_seed(config.seed as i64);
    let (train_loader, val_loader, _, _) = data_loaders(config)?;
    let model = initial_model(config)?;
    let fine_tune = FineTuneConfig {
        epochs: config.compressed_epochs,
        ..config.fine_tune.clone()
    };
    let frame = crate::sweep::sweep(&model, policies, &train_loader, &val_loader, &fine_tune)?;
    write_frame_csv(&frame, &out.join("sweep.csv"))?;
    crate::plots::pareto_chart(&frame)?.save_png(out.join("pareto.png"))?;
    Ok(frame)
}

/// Writes `path,true,predicted` for every image of an evaluation, atomically.
pub fn write_predictions(
    path: &Path,
    names: &[String],
    labels: &[i64],
    predictions: &[i64],
) -> Result<()> {
    let mut csv = String::from("path,true,predicted\n");
    for ((name, truth), pred) in names.iter().zip(labels).zip(predictions) {
        let quoted = if name.contains([',', '"', '\n']) {
            format!("\"{}\"", name.replace('"', "\"\""))
        } else {
            name.clone()
        };
        csv.push_str(&format!("{quoted},{truth},{pred}\n"));
    }
    io::write_atomic(path, csv.as_bytes())
}

/// The BN modes by CLI name.
pub fn parse_bn_mode(s: &str) -> Result<BnMode> {
    match s {
        "frozen" => Ok(BnMode::Frozen),
        "stats" => Ok(BnMode::Statistics),
        "train" => Ok(BnMode::Train),
        other => Err(Error::value(
            "bn mode",
            format!("`{other}` (expected frozen, stats or train)"),
        )),
    }
}
