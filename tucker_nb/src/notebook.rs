//! What `notebooks/resnet18_tucker.ipynb` calls: one configuration (the library's [`RunConfig`]
//! with the seed's defaults — CIFAR-100 and torchvision's weights under `data/`, 224 px, 5 + 5
//! epochs, ratio 0.2, CUDA when present — plus the notebook's own fields), the smoke profile
//! (`TUCKER_NB_PROFILE=smoke`: a few CPU minutes on generated data), and the closing summary of
//! original vs compressed. `TUCKER_NB_OUT` moves the output folder.

use std::path::{Path, PathBuf};

use tch::Device;

use crate::compress::cost::Cost;
use crate::compress::policy::{CompressionPolicy, RankPolicy};
use crate::data::DataSource;
use crate::decompose::Method;
use crate::display::{grid, Html};
use crate::error::{Error, Result};
use crate::experiment::{self, RunConfig};
use crate::figures::ModelFigures;
use crate::loader::Loader;
use crate::model::ResNet18;
use crate::runtime;
use crate::synthetic::{self, SyntheticFormat, SyntheticSpec};
use crate::train::{EvalResult, FineTune, FineTuneConfig, Recipe, Trainable};

/// The smoke profile's starting weights, relative to the project root.
pub const SMOKE_WEIGHTS: &str = "data/smoke-resnet18.safetensors";

/// Epochs of the smoke profile's training from random weights.
const SMOKE_TRAINING_EPOCHS: usize = 6;

/// The batch of the smoke profile's training from random weights (its fine-tunes use the seed's
/// 64, `RunConfig`'s default).
const SMOKE_TRAINING_BATCH: usize = 16;

/// The smoke profile's starting weights at `path`: when missing, a ResNet18 trained from random
/// weights on `run`'s (generated) training images in `run`'s batches, every layer,
/// [`SMOKE_TRAINING_EPOCHS`] epochs at lr 0.05 (StepLR: a tenth after 4), written atomically.
/// Says so in one line.
fn smoke_weights(run: &RunConfig, path: &Path) -> Result<PathBuf> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    let (train, val) = experiment::loaders(run)?;
    tch::manual_seed(run.seed as i64);
    let mut model = ResNet18::new(run.num_classes, run.device);
    let config = FineTuneConfig {
        epochs: SMOKE_TRAINING_EPOCHS,
        lr: 0.05,
        step_size: 4,
        trainable: Trainable::All,
        phase: "smoke model".into(),
        ..FineTuneConfig::default()
    };
    let rows = crate::train::fine_tune(&mut model, &train, &val, &config)?.0;
    crate::io::write_atomic_with(path, |tmp| model.save(tmp))?;
    let top1 = rows.last().map_or(0.0, |r| r.val_top1);
    eprintln!(
        "smoke profile: trained a ResNet18 on {} ({} epochs from random weights, val top-1 {top1:.3}) \
         into {}",
        run.data.display(),
        config.epochs,
        path.display()
    );
    Ok(path.to_path_buf())
}

/// Which experiment the notebook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// The seed's experiment on CIFAR-100 with ImageNet weights.
    Full,
    /// A CPU run of a few minutes on a generated dataset, from a ResNet18 trained on it briefly.
    Smoke,
}

/// The notebook's configuration; every field can be changed in the config cell
/// (`config.run.fine_tune.epochs = 3;`).
#[derive(Debug, Clone)]
pub struct NotebookConfig {
    pub profile: Profile,
    /// The run's data, weights, sizes, fine-tune settings, policy and output folder.
    pub run: RunConfig,
    /// The budget sweep's policies, one compressed copy each: `budget-macs` points and
    /// `budget-latency` points (timed on this notebook's device at its eval batch size) to set
    /// beside them at equal measured speed.
    pub sweep: Vec<RankPolicy>,
    /// Multi-stage compression: the conv-MACs budget of each stage, in order.
    pub stage_budgets: Vec<f64>,
    /// Fine-tune epochs of each sweep point and between stages.
    pub short_epochs: usize,
}

/// `budget-macs` at each of `macs` and `budget-latency` at each of `latency`.
fn sweep_of(macs: &[f64], latency: &[f64]) -> Result<Vec<RankPolicy>> {
    let by = |cost: Cost, fractions: &[f64]| -> Vec<Result<RankPolicy>> {
        fractions
            .iter()
            .map(|&f| RankPolicy::budget(cost.clone(), f))
            .collect()
    };
    by(Cost::Macs, macs)
        .into_iter()
        .chain(by(Cost::Latency, latency))
        .collect()
}

/// The project's root folder (where `data/` and `runs/` live), known from where the crate was built.
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crate folder has a parent")
        .to_path_buf()
}

fn cifar_location(data: &Path) -> Option<PathBuf> {
    [data.join("cifar-100-binary"), data.join("cifar100")]
        .into_iter()
        .find(|p| DataSource::detect(p).is_ok())
}

/// The torchvision weights `scripts/fetch` downloads.
const WEIGHTS_FILE: &str = "resnet18-f37072fd.pth";

/// Where the full profile's CIFAR-100 is, or the notes saying why the smoke profile runs instead.
fn full_profile_data(data: &Path) -> std::result::Result<PathBuf, Vec<String>> {
    if std::env::var("TUCKER_NB_PROFILE").as_deref() == Ok("smoke") {
        return Err(vec![
            "TUCKER_NB_PROFILE=smoke: running the smoke profile.".into()
        ]);
    }
    let cifar = cifar_location(data);
    let weights = data.join(WEIGHTS_FILE);
    let mut notes = Vec::new();
    if cifar.is_none() {
        notes.push(format!(
            "CIFAR-100 is not in {} (expected cifar-100-binary/ or cifar100/{{train,val}}/).",
            data.display()
        ));
    }
    if !weights.is_file() {
        notes.push(format!(
            "torchvision's ResNet18 weights are not at {}.",
            weights.display()
        ));
    }
    match cifar {
        Some(cifar) if notes.is_empty() => Ok(cifar),
        _ => {
            notes.push(
                "Fetch both with `scripts/fetch` (about 210 MB, checksum-verified), then restart the \
                 kernel. Running the smoke profile meanwhile."
                    .into(),
            );
            Err(notes)
        }
    }
}

impl NotebookConfig {
    /// The seed's experiment when its data and weights are in `data/`, else (or when
    /// `TUCKER_NB_PROFILE=smoke`) the smoke profile; the HTML says which and why.
    pub fn from_env() -> Result<(Self, Html)> {
        runtime::init();
        let root = project_root();
        let data = root.join("data");
        let (mut config, mut notes) = match full_profile_data(&data) {
            Ok(cifar) => (
                Self::full(&root, cifar, data.join(WEIGHTS_FILE))?,
                Vec::new(),
            ),
            Err(notes) => (Self::smoke(&root)?, notes),
        };
        if let Some(out) = std::env::var_os("TUCKER_NB_OUT") {
            config.run.out = PathBuf::from(out);
        }
        notes.push(config.describe());
        let html = notes
            .iter()
            .map(|n| format!("<p>{}</p>", n.replace('<', "&lt;")))
            .collect();
        Ok((config, Html(html)))
    }

    /// One line saying what will run where.
    fn describe(&self) -> String {
        let run = &self.run;
        format!(
            "{:?} profile on {}: {} ({}), {} px, {} + {} epochs, policy {}, output in {}",
            self.profile,
            device_words(run.device),
            run.data.display(),
            run.weights
                .as_ref()
                .map_or("random initial weights".into(), |w| w.display().to_string()),
            run.image_size,
            run.fine_tune.epochs,
            run.compressed_epochs,
            run.policy.ranks,
            run.out.display()
        )
    }

    /// The seed's experiment: CIFAR-100 at 224 px from ImageNet weights, on CUDA when present.
    pub fn full(root: &Path, cifar: PathBuf, weights: PathBuf) -> Result<Self> {
        let device = runtime::prepare_device(None, true)?;
        let mut run = RunConfig::new(cifar, root.join("runs/notebook"), device);
        run.weights = Some(weights);
        Ok(Self {
            profile: Profile::Full,
            run,
            sweep: sweep_of(&[0.5, 0.33, 0.2, 0.1], &[0.5, 0.33])?,
            stage_budgets: vec![0.5, 0.2],
            short_epochs: 1,
        })
    }

    /// A few CPU minutes on generated data and a ResNet18 trained on it (both made once, under
    /// `data/smoke` and [`SMOKE_WEIGHTS`]).
    pub fn smoke(root: &Path) -> Result<Self> {
        let data = root.join("data/smoke");
        if !data.exists() {
            let spec = SyntheticSpec {
                classes: 10,
                train_per_class: 24,
                val_per_class: 10,
                size: 32,
                seed: 0,
            };
            synthetic::generate(&data, spec, SyntheticFormat::ImageFolder)?;
        }
        let mut run = RunConfig::new(data, root.join("runs/notebook-smoke"), Device::Cpu);
        run.num_classes = 10;
        run.image_size = 32;
        run.fine_tune.epochs = 2;
        run.compressed_epochs = 2;
        // The fine-tunes train on the seed's batches of 64 (`run.batch_size`'s default). On
        // batches of 16, the compressed model's batch statistics (BN in training mode, as the seed)
        // were far from its recalibrated ones: at lr 1e-7 its training loss was 5.6 against 0.73
        // on batches of 64, and its first epoch diverged at every lr from 3e-4 to 1e-2 (validation
        // loss up to 38 897; the guard returned the starting model).
        run.eval_batch_size = 64;
        // A model that has learned something, as the full profile's ImageNet weights have:
        // compressing random weights leaves nothing a fine-tune could recover.
        let trainer = RunConfig {
            batch_size: SMOKE_TRAINING_BATCH,
            ..run.clone()
        };
        run.weights = Some(smoke_weights(&trainer, &root.join(SMOKE_WEIGHTS))?);
        run.policy.method = Some(Method::Hosvd);
        Ok(Self {
            profile: Profile::Smoke,
            run,
            sweep: sweep_of(&[0.5, 0.25], &[0.5])?,
            stage_budgets: vec![0.5, 0.25],
            short_epochs: 1,
        })
    }

    /// Train and validation loaders (decoded once; later calls read the cache), and the
    /// held-out training images the recipe chooses its epochs on (`None` for the seed's recipe;
    /// the training loader then has them all); makes the output folder and locks it for this
    /// kernel (another writer is refused).
    pub fn loaders(&self) -> Result<(Loader, Loader, Option<Loader>)> {
        let out = &self.run.out;
        std::fs::create_dir_all(out).map_err(|e| Error::file(out, e))?;
        // The kernel writes into it from later cells: it keeps the lock while it lives.
        crate::lock::hold_for_process(out)?;
        let (train_data, val_data) = experiment::datasets(&self.run)?;
        let held_out_data = experiment::held_out_folder(&self.run, &train_data.classes)?;
        let (train, val) = experiment::loader_pair(&self.run, &train_data, &val_data);
        let (train, held_out) = experiment::hold_out(&self.run, train, held_out_data.as_ref())?;
        Ok((train, val, held_out))
    }

    /// The starting model: the weights with a fresh `fc` for `num_classes`, as the seed.
    pub fn model(&self) -> Result<ResNet18> {
        experiment::initial_model(&self.run)
    }

    /// A fine-tune of the notebook: no checkpoints (cells are re-run instead of resumed).
    fn without_checkpoints(config: FineTuneConfig) -> FineTuneConfig {
        FineTuneConfig {
            checkpoint_dir: None,
            resume: false,
            ..config
        }
    }

    /// `config` as a compressed model's fine-tune: distilled from `teacher` when it distils,
    /// choosing its epoch on `held_out` when the recipe does.
    fn compressed_run<'a>(
        &self,
        config: FineTuneConfig,
        teacher: &'a ResNet18,
        held_out: Option<&'a Loader>,
    ) -> FineTune<'a> {
        FineTune {
            teacher: config.distill.map(|_| teacher),
            config: Self::without_checkpoints(config),
            held_out: held_out.filter(|_| self.run.recipe.selects_on_held_out()),
        }
    }

    /// The seed's fine-tune of the original model: fc only.
    pub fn fine_tune_original(&self) -> FineTuneConfig {
        Self::without_checkpoints(self.run.original_phase())
    }

    /// The compressed model's fine-tune (the factorised convs and fc) as the run's recipe trains
    /// it: by default distilled from `teacher` (the model before compression), choosing its epoch
    /// on `held_out`.
    pub fn fine_tune_compressed<'a>(
        &self,
        teacher: &'a ResNet18,
        held_out: Option<&'a Loader>,
    ) -> FineTune<'a> {
        self.compressed_run(self.run.compressed_phase(), teacher, held_out)
    }

    /// The compressed model's fine-tune with the seed's recipe, as phase `seed recipe`: to set
    /// beside the run's.
    pub fn fine_tune_seed_recipe(&self) -> FineTuneConfig {
        let seed = RunConfig {
            recipe: Recipe::Seed,
            ..self.run.clone()
        };
        Self::without_checkpoints(FineTuneConfig {
            phase: "seed recipe".into(),
            ..seed.compressed_phase()
        })
    }

    /// The short fine-tunes between compression stages (`short_epochs`, phases `stage1`, …), as
    /// the recipe trains.
    pub fn fine_tune_stage<'a>(
        &self,
        teacher: &'a ResNet18,
        held_out: Option<&'a Loader>,
    ) -> FineTune<'a> {
        let stage = RunConfig {
            stage_epochs: self.short_epochs,
            ..self.run.clone()
        };
        self.compressed_run(stage.stage_phase(), teacher, held_out)
    }

    /// Each sweep point's short fine-tune (`short_epochs`), as the recipe trains (the sweep
    /// distils from the model it compresses).
    pub fn fine_tune_sweep<'a>(&self, held_out: Option<&'a Loader>) -> FineTune<'a> {
        let config = self.run.recipe.apply(self.run.phase(
            "sweep",
            self.short_epochs,
            Trainable::TuckerAndClassifier,
        ));
        FineTune::from(Self::without_checkpoints(config))
            .selecting_on(held_out.filter(|_| self.run.recipe.selects_on_held_out()))
    }

    /// The final fine-tune of the multi-stage model: as long as the seed's compressed model's,
    /// as the recipe trains.
    pub fn fine_tune_multistage<'a>(
        &self,
        teacher: &'a ResNet18,
        held_out: Option<&'a Loader>,
    ) -> FineTune<'a> {
        let config = FineTuneConfig {
            phase: "multi-stage".into(),
            ..self.run.compressed_phase()
        };
        self.compressed_run(config, teacher, held_out)
    }

    /// The seed's compression (`run.policy`, ratio 0.2 by default), costs counted at the
    /// notebook's image size.
    pub fn policy(&self) -> CompressionPolicy {
        let size = self.run.image_size;
        CompressionPolicy {
            input_size: [size, size],
            ..self.run.policy.clone()
        }
    }

    /// A budget of `fraction` of the dense model's conv MACs at the notebook's image size.
    pub fn budget_policy(&self, fraction: f64) -> Result<CompressionPolicy> {
        let budget = RankPolicy::budget(Cost::Macs, fraction)?;
        Ok(self.policy().with_ranks(budget))
    }

    /// The sweep's policies, one per entry of `sweep`, at the notebook's image size; a latency
    /// budget timed at the eval batch size (and dtype) on the notebook's device.
    pub fn sweep_policies(&self) -> Result<Vec<CompressionPolicy>> {
        let policies = self
            .sweep
            .iter()
            .map(|r| self.run.timed(&self.policy().with_ranks(r.clone())));
        let policies: Vec<CompressionPolicy> = policies.collect();
        for p in &policies {
            p.validate()?;
        }
        Ok(policies)
    }

    /// The multi-stage run's policies, one per entry of `stage_budgets`.
    pub fn stage_policies(&self) -> Result<Vec<CompressionPolicy>> {
        self.stage_budgets
            .iter()
            .map(|&b| self.budget_policy(b))
            .collect()
    }

    /// A path in the output folder.
    pub fn out(&self, file: &str) -> PathBuf {
        self.run.out.join(file)
    }
}

/// A copy of `model` with every BN after a factorised conv folded into it (for inference), and
/// a label saying how many were folded.
pub fn folded_copy(model: &ResNet18) -> (ResNet18, String) {
    let mut folded = model.deep_copy();
    let names = folded.fold_batch_norms();
    (folded, format!("{} BNs folded", names.len()))
}

/// One model's line in the closing summary: a label and the model's figures, latency measured.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSummary {
    pub label: String,
    pub figures: ModelFigures,
}

/// Accuracy, size, cost and latency of `model` as evaluated in `eval`.
pub fn summarize(
    label: &str,
    model: &ResNet18,
    eval: &EvalResult,
    image_size: i64,
) -> ModelSummary {
    ModelSummary {
        label: label.into(),
        figures: ModelFigures::new(model, eval, image_size).with_latency(model, image_size),
    }
}

/// A device as the notebook's plan line says it ("the CPU", "CUDA device 0").
fn device_words(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("CUDA device {i}"),
        Device::Cpu => "the CPU".into(),
        other => format!("{other:?}"),
    }
}

/// How `a` compares with the first row's `b`, in the words of the layer report's totals: "(N×
/// fewer)" below it, "(N× more)" above it (or the words given), nothing when equal.
fn versus(a: f64, b: Option<f64>, [less, more]: [&str; 2]) -> String {
    match b {
        Some(b) if a > 0.0 && b > 0.0 && a < b => format!(" ({:.2}× {less})", b / a),
        Some(b) if a > 0.0 && b > 0.0 && a > b => format!(" ({:.2}× {more})", a / b),
        _ => String::new(),
    }
}

/// The closing table: one row per model, each figure against the first row's.
pub fn summary_table(rows: &[&ModelSummary]) -> Html {
    let base = rows.first().map(|r| &r.figures);
    let ratio = |a: f64, b: Option<f64>| versus(a, b, ["fewer", "more"]);
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let f = &r.figures;
            let latency = match f.latency_ms {
                Some(ms) => {
                    let than = versus(ms, base.and_then(|b| b.latency_ms), ["faster", "slower"]);
                    format!("{ms:.2} ms{than}")
                }
                None => "not measured".into(),
            };
            vec![
                r.label.clone(),
                format!("{:.2} %", f.top1 * 100.0),
                format!("{:.2} %", f.top5 * 100.0),
                format!(
                    "{:.2} M{}",
                    f.params as f64 / 1e6,
                    ratio(f.params as f64, base.map(|b| b.params as f64))
                ),
                format!(
                    "{:.1} M{}",
                    f.conv_macs as f64 / 1e6,
                    ratio(f.conv_macs as f64, base.map(|b| b.conv_macs as f64))
                ),
                latency,
            ]
        })
        .collect();
    grid(
        &[
            "model",
            "top-1",
            "top-5",
            "params",
            "conv MACs",
            "latency (batch 1)",
        ],
        &body,
    )
}
