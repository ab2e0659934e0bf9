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
use crate::error::{check, check_count, check_image_side, Error, Result};
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
    /// Continue the run in `out` (its fingerprint must match, [`RunFingerprint`]).
    pub resume: bool,
    /// Start afresh in a non-empty `out` (its checkpoints are ignored, its outputs replaced).
    pub force: bool,
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
            force: false,
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
        check_image_side("image size", self.image_size)?;
        self.policy.validate()?;
        for stage in &self.stages {
            stage.validate_as_stage()?;
        }
        if let Some(side) = self.storage.size {
            check_image_side("storage size", side as i64)?;
        }
        check(
            self.num_classes >= 1,
            "num_classes",
            self.num_classes,
            "≥ 1",
        )?;
        for (what, value) in [
            ("batch size", self.batch_size),
            ("eval batch size", self.eval_batch_size),
            ("calibration images", self.calib_images),
        ] {
            check_count(what, value)?;
        }
        for (what, limit) in [
            ("train limit", self.train_limit),
            ("val limit", self.val_limit),
        ] {
            if let Some(n) = limit {
                check_count(what, n)?;
            }
        }
        self.fine_tune.validate()
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
    let (train, val) = datasets(config)?;
    Ok(loader_pair(config, &train, &val))
}

/// The run's training and validation sets, limited as the config says. Fails when the data has
/// more classes than the model.
pub fn datasets(config: &RunConfig) -> Result<(Dataset, Dataset)> {
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
    Ok((train, val))
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
/// weights; seeded with the run's seed, and laid out as the fine-tunes will train it.
pub fn initial_model(config: &RunConfig) -> Result<ResNet18> {
    tch::manual_seed(config.seed as i64);
    let mut model = match &config.weights {
        Some(w) => ResNet18::load(w, Some(config.num_classes), config.device)?,
        None => ResNet18::new(config.num_classes, config.device),
    };
    model.set_channels_last(config.fine_tune.channels_last);
    Ok(model)
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
    outputs: &mut io::Outputs,
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
        outputs.write_with(&config.out.join(name), |tmp| report.write_csv(tmp))?;
    }
    Ok(stages)
}

/// `model`'s evaluation on `val` just after a fine-tune: the one its last epoch recorded (of this
/// very model, on the same loader) when it evaluated in fp32, else a fresh fp32 evaluation (no
/// epochs run, or bf16 epochs).
fn evaluated(
    rows: &[EpochMetrics],
    phase: &FineTuneConfig,
    model: &ResNet18,
    val: &Loader,
) -> Result<EvalResult> {
    match rows.last() {
        Some(row) if !phase.bf16 => Ok(EvalResult::of_epoch(row, val.len())),
        _ => evaluate(model, val),
    }
}

/// The file in a run folder that records its [`RunFingerprint`].
pub const FINGERPRINT_FILE: &str = "run.json";

/// Everything that determines a run's results, field by field (values as text): the data's
/// content key and classes, the weights' SHA-256, the policies, seed, sizes, batches, schedule
/// and recipe. `run` writes it into its folder; `--resume` continues only a run whose
/// fingerprint is the same, and names the first field that differs.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct RunFingerprint(pub std::collections::BTreeMap<String, String>);

impl RunFingerprint {
    pub fn new(config: &RunConfig, train: &Dataset, val: &Dataset) -> Result<Self> {
        let weights = match &config.weights {
            Some(path) => {
                let bytes = std::fs::read(path).map_err(|e| Error::file(path, e))?;
                use sha2::Digest;
                sha2::Sha256::digest(&bytes)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect()
            }
            None => "none (random initialisation)".to_string(),
        };
        let ft = &config.fine_tune;
        let fields: Vec<(&str, String)> = vec![
            ("data", format!("train {}, val {}", train.key, val.key)),
            ("classes", train.classes.join(",")),
            ("weights", weights),
            ("num_classes", config.num_classes.to_string()),
            ("image_size", config.image_size.to_string()),
            ("storage_size", format!("{:?}", config.storage.size)),
            ("train_limit", format!("{:?}", config.train_limit)),
            ("val_limit", format!("{:?}", config.val_limit)),
            ("batch_size", config.batch_size.to_string()),
            ("eval_batch_size", config.eval_batch_size.to_string()),
            ("seed", config.seed.to_string()),
            ("policy", format!("{:?}", config.policy)),
            ("stages", format!("{:?}", config.stages)),
            ("stage_epochs", config.stage_epochs.to_string()),
            ("epochs", ft.epochs.to_string()),
            ("compressed_epochs", config.compressed_epochs.to_string()),
            ("lr", ft.lr.to_string()),
            ("momentum", ft.momentum.to_string()),
            ("weight_decay", ft.weight_decay.to_string()),
            ("step_size", ft.step_size.to_string()),
            ("gamma", ft.gamma.to_string()),
            ("bn", format!("{:?}", ft.bn)),
            ("bf16", ft.bf16.to_string()),
            ("channels_last", ft.channels_last.to_string()),
            ("distill", format!("{:?}", ft.distill)),
            ("max_batches", format!("{:?}", ft.max_batches)),
            ("recalibrate_bn", config.recalibrate_bn.to_string()),
            ("calib_images", config.calib_images.to_string()),
        ];
        Ok(Self(
            fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        ))
    }

    /// The first field whose value differs from `other`'s: (field, ours, theirs).
    pub fn first_difference<'a>(&'a self, other: &'a Self) -> Option<(&'a str, &'a str, &'a str)> {
        let missing = "(absent)";
        self.0
            .keys()
            .chain(other.0.keys())
            .map(|k| {
                let get = |f: &'a Self| f.0.get(k).map_or(missing, String::as_str);
                (k.as_str(), get(self), get(other))
            })
            .find(|(_, a, b)| a != b)
    }
}

/// Makes `out` ready for a run: created when missing; a non-empty one is refused unless the run
/// resumes (or is forced to start afresh over it).
pub fn prepare_run_folder(config: &RunConfig) -> Result<()> {
    let out = &config.out;
    std::fs::create_dir_all(out).map_err(|e| Error::file(out, e))?;
    let used = std::fs::read_dir(out)
        .map_err(|e| Error::file(out, e))?
        .flatten()
        .any(|e| !e.file_name().to_string_lossy().starts_with('.'));
    if used && !config.resume && !config.force {
        return Err(Error::file(
            out,
            "is not empty: pass --resume to continue the run in it, --force to start afresh \
             over it, or choose another --out",
        ));
    }
    Ok(())
}

/// Records `fingerprint` in `out`; with `resume`, first checks it against the one there.
pub fn check_fingerprint(config: &RunConfig, fingerprint: &RunFingerprint) -> Result<()> {
    let path = config.out.join(FINGERPRINT_FILE);
    if config.resume && path.exists() {
        let text = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, e))?;
        let recorded: RunFingerprint = serde_json::from_str(&text)
            .map_err(|e| Error::file(&path, format!("not a run fingerprint: {e}")))?;
        if let Some((field, now, then)) = fingerprint.first_difference(&recorded) {
            return Err(Error::file(
                &path,
                format!(
                    "--resume with another {field}: the run in this folder has {then}, this one \
                     {now}; resume with the same settings or start afresh in another folder"
                ),
            ));
        }
        return Ok(());
    }
    if config.resume && config.out.join("original").exists() {
        return Err(Error::file(
            &path,
            "missing: the run in this folder cannot be checked to be the same; start afresh",
        ));
    }
    let json = serde_json::to_vec_pretty(fingerprint).expect("serialisable");
    io::write_atomic(&path, &json)
}

/// Runs the seed's flow. With `resume`, each phase continues from its checkpoint in `out`.
/// The run's results (models, metrics, reports, summary) are committed together at the end.
pub fn run(config: &RunConfig) -> Result<RunResult> {
    config.validate()?;
    prepare_run_folder(config)?;
    let out = &config.out;
    let (train_data, val_data) = datasets(config)?;
    check_fingerprint(
        config,
        &RunFingerprint::new(config, &train_data, &val_data)?,
    )?;
    let (train, val) = loader_pair(config, &train_data, &val_data);
    let size = config.image_size;
    let mut model = initial_model(config)?;
    let mut outputs = io::Outputs::new();

    // 1) fine-tune the original: the seed trains fc only; 2) evaluate it.
    let original_phase = config.original_phase();
    let mut rows = fine_tune_rows(&mut model, &train, &val, &original_phase)?;
    outputs.write_with(&out.join("original.safetensors"), |tmp| model.save(tmp))?;
    let original = Checkpoint::new(
        &model,
        &evaluated(&rows, &original_phase, &model, &val)?,
        size,
    );

    // 3) compress (in stages, with short fine-tunes between); 4) evaluate before fine-tuning.
    let teacher = config.fine_tune.distill.map(|_| model.deep_copy());
    let stages = compress_for_run(config, &mut model, &train, &val, &mut outputs)?;
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
    let fine_tuned = evaluated(&taught, &compressed_phase, &model, &val)?;
    let fine_tuned = Checkpoint::new(&model, &fine_tuned, size);
    rows.extend(taught);
    outputs.write_with(&out.join("compressed.safetensors"), |tmp| model.save(tmp))?;

    let metrics = metrics_frame(&rows);
    outputs.write_with(&out.join("metrics.csv"), |tmp| {
        write_frame_csv(&metrics, tmp)
    })?;
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
    outputs.write(&out.join("summary.json"), &json)?;
    outputs.commit()?;
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
    let mut outputs = io::Outputs::new();
    outputs.write_with(&out.join("sweep.csv"), |tmp| write_frame_csv(&frame, tmp))?;
    let chart = crate::plots::pareto_chart(&frame)?;
    outputs.write_with(&out.join("pareto.png"), |tmp| chart.save_png(tmp))?;
    outputs.commit()?;
    Ok(frame)
}

/// Loads the model in `path` to evaluate it on `dataset`: its classifier must have `num_classes`
/// outputs (never a fresh, random one) and at least as many as the data has classes.
pub fn load_for_evaluation(
    path: &Path,
    num_classes: i64,
    dataset: &Dataset,
    device: Device,
) -> Result<ResNet18> {
    let model = ResNet18::load(path, None, device)?;
    let has = model.num_classes();
    if has != num_classes {
        return Err(Error::file(
            path,
            format!("the model has {has} classes, not the {num_classes} asked for (--num-classes)"),
        ));
    }
    let data_classes = dataset.classes.len() as i64;
    if data_classes > has {
        return Err(Error::file(
            path,
            format!("the model has {has} classes, the data {data_classes}"),
        ));
    }
    Ok(model)
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
