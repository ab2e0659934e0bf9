//! The seed's whole experiment and its steps: [`loaders`], [`initial_model`], compression (in one
//! or more stages, [`compress_in_stages`]), fine-tuning and evaluation, and [`run`], which chains
//! them as the seed does (fine-tune the original → evaluate → compress → evaluate → fine-tune the
//! compressed model → evaluate), writing `metrics.csv`, `layers.csv`, `summary.json`, the models
//! and per-phase checkpoints into one output folder. The notebook calls the same steps cell by cell.

use std::path::{Path, PathBuf};

use polars::prelude::DataFrame;
use serde::Serialize;
use tch::Device;

use crate::compress::calibrate::activation_moments;
use crate::compress::compress_model_fitted;
use crate::compress::policy::{CompressionPolicy, Fit};
use crate::data::{DataSource, Dataset, StorageOptions};
use crate::error::{Error, Result};
use crate::frame::write_frame_csv;
use crate::io;
use crate::loader::{Loader, Transform};
use crate::model::ResNet18;
use crate::report::CompressionReport;
use crate::train::{
    evaluate, fine_tune_rows, fine_tune_rows_with, metrics_frame, recalibrate_bn, EpochMetrics,
    EvalResult, FineTuneConfig, Trainable,
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
    /// Fine-tune settings (the original model's epochs; `phase`, `trainable` are set per phase).
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
    /// Recalibrate the BN statistics right after each compression ([`crate::train::recalibrate_bn`]).
    pub recalibrate_bn: bool,
    /// Training images (after a seeded shuffle, eval transform) the BN recalibration sees.
    pub calib_images: usize,
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
            recalibrate_bn: true,
            calib_images: 1024,
        }
    }

    /// Checks what can be checked before any work: the policies (a later stage must be able to
    /// compress an already compressed model), sizes and classes.
    pub fn validate(&self) -> Result<()> {
        self.policy.validate()?;
        for stage in &self.stages {
            stage.validate_as_stage()?;
        }
        for (what, value) in [
            ("image size", self.image_size),
            ("num_classes", self.num_classes),
            ("batch size", self.batch_size as i64),
            ("eval batch size", self.eval_batch_size as i64),
            ("calibration images", self.calib_images as i64),
        ] {
            if value < 1 {
                return Err(Error::value(what, format!("{value} (must be ≥ 1)")));
            }
        }
        Ok(())
    }

    /// The fine-tune of one phase: `epochs` of `trainable`, checkpointed in `out/PHASE`.
    pub fn phase(&self, phase: &str, epochs: usize, trainable: Trainable) -> FineTuneConfig {
        FineTuneConfig {
            epochs,
            phase: phase.into(),
            trainable,
            checkpoint_dir: Some(self.out.join(phase)),
            resume: self.resume,
            ..self.fine_tune.clone()
        }
    }

    /// The seed's fine-tune of the original model: fc only (never distilled: there is no
    /// teacher yet).
    pub fn original_phase(&self) -> FineTuneConfig {
        FineTuneConfig {
            distill: None,
            ..self.phase("original", self.fine_tune.epochs, Trainable::Classifier)
        }
    }

    /// The seed's fine-tune of the compressed model: the factorised convs and fc (distilled from
    /// the model before compression when `fine_tune.distill` says so).
    pub fn compressed_phase(&self) -> FineTuneConfig {
        self.phase(
            "compressed",
            self.compressed_epochs,
            Trainable::TuckerAndClassifier,
        )
    }

    /// The first policy and the further stages, in order.
    pub fn all_stages(&self) -> Vec<CompressionPolicy> {
        std::iter::once(self.policy.clone())
            .chain(self.stages.iter().cloned())
            .collect()
    }
}

/// The run's training and validation loaders (train: the seed's augmentation, shuffled with the
/// run's seed; val: the eval transform). Fails when the data has more classes than the model.
pub fn loaders(config: &RunConfig) -> Result<(Loader, Loader)> {
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
    Ok(loader_pair(config, &train, &val))
}

/// The loader pair for `train` and `val` with the run's sizes, device and seed: train with the
/// seed's augmentation, shuffled; val with the eval transform.
pub fn loader_pair(config: &RunConfig, train: &Dataset, val: &Dataset) -> (Loader, Loader) {
    let size = config.image_size;
    let loader = |data, batch_size, transform| {
        Loader::new(
            data,
            batch_size,
            transform,
            config.device,
            config.resident_data,
        )
    };
    (
        loader(train, config.batch_size, Transform::Train { size }).with_seed(config.seed),
        loader(val, config.eval_batch_size, Transform::Eval { size }),
    )
}

/// The calibration set ([`Loader::calibration_set`]): `calib_images` training images after a
/// shuffle seeded with the run's seed, eval transform; says so when the data has fewer.
pub fn calibration(config: &RunConfig, train: &Loader) -> Result<Loader> {
    let calibration =
        train.calibration_set(config.calib_images, config.seed, config.eval_batch_size)?;
    if calibration.len() < config.calib_images {
        eprintln!(
            "calibration: {} asks for {} images, the training set has {}: using them all",
            config.data.display(),
            config.calib_images,
            calibration.len()
        );
    }
    Ok(calibration)
}

/// The starting model: the weights with a fresh `fc` for `num_classes` (as the seed), or random
/// weights; seeded with the run's seed.
pub fn initial_model(config: &RunConfig) -> Result<ResNet18> {
    tch::manual_seed(config.seed as i64);
    match &config.weights {
        Some(w) => ResNet18::load(w, Some(config.num_classes), config.device),
        None => Ok(ResNet18::new(config.num_classes, config.device)),
    }
}

/// The epochs' metrics of several fine-tunes as one table, in order.
pub fn concat_metrics(frames: &[&DataFrame]) -> Result<DataFrame> {
    let mut all = metrics_frame(&[]);
    for frame in frames {
        all.vstack_mut(frame)
            .map_err(|e| Error::value("metrics", e))?;
    }
    Ok(all)
}

/// The calibration set a compression uses (for fitting to data), and whether the BN statistics
/// are recalibrated on it after each stage.
#[derive(Debug, Clone, Copy)]
pub struct Calibration<'a> {
    pub images: &'a Loader,
    pub recalibrate_bn: bool,
}

impl<'a> Calibration<'a> {
    /// Fit to data and recalibrate BNs on `images`.
    pub fn with_bn(images: &'a Loader) -> Self {
        Self {
            images,
            recalibrate_bn: true,
        }
    }
}

/// What [`compress_in_stages`] did: per stage, its report and the evaluation right after it (with
/// the model's cost then, at the policy's input size), and the metrics of the fine-tunes in
/// between.
#[derive(Debug)]
pub struct Stages {
    pub reports: Vec<CompressionReport>,
    pub evals: Vec<EvalResult>,
    pub checkpoints: Vec<Checkpoint>,
    /// After each stage's BN recalibration (when a calibration set was given).
    pub recalibrated: Vec<Checkpoint>,
    pub metrics: Vec<EpochMetrics>,
}

impl Stages {
    /// The last stage's report (there is at least one stage).
    pub fn final_report(&self) -> &CompressionReport {
        self.reports.last().expect("at least one stage")
    }

    /// The evaluation after the last stage.
    pub fn final_eval(&self) -> &EvalResult {
        self.evals.last().expect("at least one stage")
    }

    /// The fine-tunes in between as a metrics table.
    pub fn metrics_frame(&self) -> DataFrame {
        metrics_frame(&self.metrics)
    }
}

/// Compresses `model` with `policies[0]`, then, for each further policy, fine-tunes it with
/// `between` (the factorised convs and fc; phase `PHASE1`, `PHASE2`, … after `between.phase`;
/// with a checkpoint folder, each stage's checkpoints go in `DIR/PHASEn`) and
/// compresses it further (MUSCO-style). With a `calibration` set, policies that fit to data
/// ([`CompressionPolicy::fit`]) fit each layer's factors to its activations on it. Evaluates on
/// `val` after each compression and, with a `calibration` set, recalibrates the BN statistics on
/// it and evaluates again. Later policies
/// must be data-driven ([`CompressionPolicy::validate_as_stage`]); that is checked first.
pub fn compress_in_stages(
    model: &mut ResNet18,
    policies: &[CompressionPolicy],
    (train, val): (&Loader, &Loader),
    calibration: Option<Calibration>,
    between: &FineTuneConfig,
) -> Result<Stages> {
    if policies.is_empty() {
        return Err(Error::value("stages", "no compression policy given"));
    }
    for later in &policies[1..] {
        later.validate_as_stage()?;
    }
    let mut stages = Stages {
        reports: Vec::new(),
        evals: Vec::new(),
        checkpoints: Vec::new(),
        recalibrated: Vec::new(),
        metrics: Vec::new(),
    };
    for (i, policy) in policies.iter().enumerate() {
        if i > 0 {
            let phase = format!("{}{i}", between.phase);
            let config = FineTuneConfig {
                checkpoint_dir: between.checkpoint_dir.as_ref().map(|d| d.join(&phase)),
                phase,
                trainable: Trainable::TuckerAndClassifier,
                ..between.clone()
            };
            stages
                .metrics
                .extend(fine_tune_rows(model, train, val, &config)?);
        }
        let moments = match (policy.fit(), calibration) {
            (Fit::Data, Some(c)) => Some(activation_moments(model, c.images)?),
            _ => None,
        };
        stages
            .reports
            .push(compress_model_fitted(model, policy, moments.as_ref())?);
        let eval = evaluate(model, val)?;
        let size = policy.input_size[0];
        stages.checkpoints.push(Checkpoint::new(model, &eval, size));
        stages.evals.push(eval);
        if let Some(c) = calibration.filter(|c| c.recalibrate_bn) {
            recalibrate_bn(model, c.images)?;
            let eval = evaluate(model, val)?;
            stages
                .recalibrated
                .push(Checkpoint::new(model, &eval, size));
        }
    }
    Ok(stages)
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

impl Checkpoint {
    pub fn new(model: &ResNet18, eval: &EvalResult, image_size: i64) -> Self {
        Checkpoint {
            top1: eval.top1,
            top5: eval.top5,
            loss: eval.loss,
            params: model.num_params(),
            conv_macs: model.conv_macs([image_size, image_size]),
            eval_images_per_s: eval.images_per_s,
        }
    }
}

/// `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub original: Checkpoint,
    /// Right after the (first) compression: the seed's "compressed, before fine-tuning".
    pub compressed: Checkpoint,
    /// After that, with the BN statistics recalibrated (when the run recalibrates).
    pub recalibrated: Option<Checkpoint>,
    /// Right after each further stage's compression (multi-stage runs), and recalibrated.
    pub stages: Vec<Checkpoint>,
    pub stages_recalibrated: Vec<Checkpoint>,
    pub fine_tuned: Checkpoint,
    pub image_size: i64,
    pub device: String,
    pub train_images: usize,
    pub val_images: usize,
}

/// What a run returns.
#[derive(Debug)]
pub struct RunResult {
    /// All fine-tunes' epochs, in order ([`crate::train::METRICS_COLUMNS`]).
    pub metrics: DataFrame,
    /// The first compression's report.
    pub report: CompressionReport,
    /// Each further stage's report (its "before" is the previous stage's model).
    pub stage_reports: Vec<CompressionReport>,
    pub summary: Summary,
}

/// The run's compression: every stage with short fine-tunes between (checkpointed in `out`, not
/// distilled), fitted to data and followed by BN recalibration as the config says; writes
/// `layers.csv` (and `layers-stageN.csv`).
fn compress_for_run(
    config: &RunConfig,
    model: &mut ResNet18,
    train: &Loader,
    val: &Loader,
) -> Result<Stages> {
    let between = FineTuneConfig {
        checkpoint_dir: Some(config.out.clone()),
        distill: None,
        ..config.phase("stage", config.stage_epochs, Trainable::TuckerAndClassifier)
    };
    let policies = config.all_stages();
    let fits_data = policies.iter().any(|p| p.fit() == Fit::Data);
    let calibration_set = match config.recalibrate_bn || fits_data {
        true => Some(calibration(config, train)?),
        false => None,
    };
    let calibration = calibration_set.as_ref().map(|images| Calibration {
        images,
        recalibrate_bn: config.recalibrate_bn,
    });
    let stages = compress_in_stages(model, &policies, (train, val), calibration, &between)?;
    for (i, report) in stages.reports.iter().enumerate() {
        let name = match i {
            0 => "layers.csv".to_string(),
            _ => format!("layers-stage{}.csv", i + 1),
        };
        report.write_csv(&config.out.join(name))?;
    }
    Ok(stages)
}

/// Runs the seed's flow. With `resume`, each phase continues from its checkpoint in `out`.
pub fn run(config: &RunConfig) -> Result<RunResult> {
    config.validate()?;
    let out = &config.out;
    std::fs::create_dir_all(out).map_err(|e| Error::file(out, e))?;
    let (train, val) = loaders(config)?;
    let size = config.image_size;
    let mut model = initial_model(config)?;

    // 1) fine-tune the original: the seed trains fc only; 2) evaluate it.
    let mut rows = fine_tune_rows(&mut model, &train, &val, &config.original_phase())?;
    model.save(out.join("original.safetensors"))?;
    let original = Checkpoint::new(&model, &evaluate(&model, &val)?, size);

    // 3) compress (in stages, with short fine-tunes between); 4) evaluate before fine-tuning.
    let teacher = config.fine_tune.distill.map(|_| model.deep_copy());
    let stages = compress_for_run(config, &mut model, &train, &val)?;
    rows.extend(stages.metrics.iter().cloned());
    let mut after_stage = stages.checkpoints.iter().cloned();
    let compressed = after_stage.next().expect("at least one stage");
    let further: Vec<Checkpoint> = after_stage.collect();
    let mut recalibrated = stages.recalibrated.iter().cloned();
    let first_recalibrated = recalibrated.next();

    // 5) fine-tune the compressed model: factorised convs and fc; 6) evaluate.
    let compressed_phase = config.compressed_phase();
    let taught = fine_tune_rows_with(
        &mut model,
        teacher.as_ref(),
        &train,
        &val,
        &compressed_phase,
    )?;
    rows.extend(taught);
    model.save(out.join("compressed.safetensors"))?;
    let fine_tuned = Checkpoint::new(&model, &evaluate(&model, &val)?, size);

    let metrics = metrics_frame(&rows);
    write_frame_csv(&metrics, &out.join("metrics.csv"))?;
    let summary = Summary {
        original,
        compressed,
        recalibrated: first_recalibrated,
        stages: further,
        stages_recalibrated: recalibrated.collect(),
        fine_tuned,
        image_size: size,
        device: format!("{:?}", config.device),
        train_images: train.len(),
        val_images: val.len(),
    };
    let json = serde_json::to_vec_pretty(&summary).expect("serialisable");
    io::write_atomic(&out.join("summary.json"), &json)?;
    let mut reports = stages.reports.into_iter();
    Ok(RunResult {
        metrics,
        report: reports.next().expect("at least one stage"),
        stage_reports: reports.collect(),
        summary,
    })
}

/// The budget sweep on the run's data and weights: each of `policies` compresses a copy of the
/// model, which is fine-tuned for `config.compressed_epochs` (factorised convs and fc) and
/// evaluated. Writes `sweep.csv` and `pareto.png` into `config.out`; returns the sweep's frame
/// ([`crate::sweep::SWEEP_COLUMNS`]).
pub fn run_sweep(config: &RunConfig, policies: &[CompressionPolicy]) -> Result<DataFrame> {
    config.validate()?;
    for policy in policies {
        policy.validate()?;
    }
    let out = &config.out;
    std::fs::create_dir_all(out).map_err(|e| Error::file(out, e))?;
    let (train, val) = loaders(config)?;
    let calibration = calibration(config, &train)?;
    let model = initial_model(config)?;
    let fine_tune = FineTuneConfig {
        epochs: config.compressed_epochs,
        ..config.fine_tune.clone()
    };
    let loaders = (&train, &val, &calibration);
    let frame = crate::sweep::sweep(&model, policies, loaders, &fine_tune)?;
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
        csv.push_str(&format!("{},{truth},{pred}\n", io::csv_field(name)));
    }
    io::write_atomic(path, csv.as_bytes())
}
