//! Fine-tuning settings (the seed's defaults) and the per-epoch metrics table.

use polars::prelude::DataFrame;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use crate::frame::frame_of;
use crate::loader::Augmentation;

/// Which parameters `fine_tune` updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Trainable {
    /// `fc` only: the seed's fine-tune of the original model.
    Classifier,
    /// The factorised convs' layers (Tucker-2's first, core, last and last's bias; an SVD's two)
    /// and `fc`: the seed's fine-tune of the compressed model.
    TuckerAndClassifier,
    /// Every conv, BN and fc parameter.
    All,
}

/// What batch normalisation does while training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum BnMode {
    /// Running statistics used and left alone (eval-mode BN).
    Frozen,
    /// Batch statistics, running statistics updated, affine parameters fixed: what the seed's
    /// `model.train()` does with frozen BN parameters.
    #[value(name = "stats", alias = "statistics")]
    Statistics,
    /// As `Statistics`, and the affine parameters are trained too.
    Train,
}

/// How a compressed model is fine-tuned: after compression, between compression stages and at
/// each point of a sweep (the original model's fine-tune is always the seed's: fc only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Recipe {
    /// The seed's: cross-entropy, the run's lr on every trainable tensor, BN as the run says
    /// (batch statistics by default), the last epoch's model.
    Seed,
    /// The seed's training (cross-entropy, learning rates and BN as the run says), guarded: the
    /// epoch with the lowest held-out loss is returned (the starting model counts), and a
    /// diverging fine-tune stops early, as `Distill` does.
    Guarded,
    /// Distilled from the model before compression (the run's `distill`, else T = 4, α = 0.5),
    /// learning rates and BN as the run says (the seed's by default); the epoch with the lowest
    /// held-out loss is returned (the starting model counts), and a diverging
    /// fine-tune stops early. Chosen by measurement (README, "The fine-tune recipe"): a tenth of
    /// the lr for the factors, or every layer at lr 0.001, lost 1.7 points on the seed's
    /// `ratio:0.2` model; BN frozen at its recalibrated statistics diverged in the first epoch
    /// under the seed's augmentation; BN statistics re-estimated after every epoch
    /// ([`FineTuneConfig::epoch_recalibration`]) ended `budget-macs:0.33` 0.55 points lower.
    #[default]
    Distill,
}

impl Recipe {
    /// `base`, a compressed model's fine-tune settings, as this recipe trains.
    pub fn apply(self, base: FineTuneConfig) -> FineTuneConfig {
        match self {
            Recipe::Seed | Recipe::Guarded => base,
            Recipe::Distill => FineTuneConfig {
                distill: Some(base.distill.unwrap_or_default()),
                ..base
            },
        }
    }

    /// Whether the recipe chooses its epoch on held-out images (and so holds some out).
    pub fn selects_on_held_out(self) -> bool {
        self != Recipe::Seed
    }
}

/// Fine-tuning settings; the defaults are the seed's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FineTuneConfig {
    pub epochs: usize,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// StepLR: the learning rate is multiplied by `gamma` every `step_size` epochs.
    pub step_size: usize,
    pub gamma: f64,
    /// The factorised convs' learning rate as a share of `lr` (`fc` and BN parameters train at
    /// `lr`); 1 in the seed.
    #[serde(default = "one")]
    pub factor_lr_scale: f64,
    /// Linear learning-rate warm-up: the lr rises from 1/`batches` of its value to all of it over
    /// the first `warmup_epochs` epochs' steps (fractions allowed); 0 in the seed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub warmup_epochs: f64,
    /// The training crops and flips; `None`: the training loader's own (the seed's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub augmentation: Option<Augmentation>,
    pub trainable: Trainable,
    pub bn: BnMode,
    /// Name of this fine-tune in the metrics (`original`, `compressed`, …).
    pub phase: String,
    /// bfloat16 autocast of the forward pass (CUDA only; ignored on CPU).
    pub bf16: bool,
    /// Lay the conv weights out channels-last (NHWC) before training, so every layer runs NHWC
    /// ([`crate::ResNet18::set_channels_last`]; the default, faster); `false` lays them out
    /// contiguous (NCHW, as the seed). Checkpoints from before this setting read as `false`.
    #[serde(default)]
    pub channels_last: bool,
    /// Knowledge distillation from a teacher (the model before compression); `None`: plain
    /// cross-entropy, as the seed.
    #[serde(default)]
    pub distill: Option<Distillation>,
    /// Train on at most this many batches per epoch (the first of its shuffled order, so they
    /// are spread over the whole dataset): quick runs and benchmarks. `None`: every batch.
    #[serde(default)]
    pub max_batches: Option<usize>,
    /// Re-estimate the BN running statistics after every epoch, before the epoch is validated and
    /// scored, on this many training images (the run's calibration set: the first after a shuffle
    /// seeded with the training loader's seed, eval transform, in the validation loader's
    /// batches). Training in batch-statistics mode leaves running statistics of augmented
    /// batches, which undo the recalibration after compression (a digits `budget-macs:0.106`
    /// model's first epoch validated at 86 % with them, 97 % re-estimated), but measured over
    /// three seeds it did not end higher, so no recipe sets it; `None`: as the seed.
    #[serde(default)]
    pub epoch_recalibration: Option<usize>,
    /// Checkpoints go here after every epoch; `None` writes none.
    #[serde(skip)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Continue from `checkpoint_dir`'s checkpoint when there is one.
    #[serde(skip)]
    pub resume: bool,
}

fn one() -> f64 {
    1.0
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

impl Default for FineTuneConfig {
    fn default() -> Self {
        Self {
            epochs: 5,
            lr: 0.01,
            momentum: 0.9,
            weight_decay: 5e-4,
            step_size: 2,
            gamma: 0.1,
            factor_lr_scale: 1.0,
            warmup_epochs: 0.0,
            augmentation: None,
            trainable: Trainable::Classifier,
            bn: BnMode::Statistics,
            phase: "original".into(),
            bf16: false,
            channels_last: true,
            distill: None,
            max_batches: None,
            epoch_recalibration: None,
            checkpoint_dir: None,
            resume: false,
        }
    }
}

/// Distillation settings: loss = α·CE + (1 − α)·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)), z_t the
/// teacher's logits on the same augmented batch (eval mode, no gradients), z_s the student's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Distillation {
    temperature: f64,
    alpha: f64,
}

impl Distillation {
    /// `temperature` > 0 and finite, `alpha` (the cross-entropy's weight) in [0, 1].
    pub fn new(temperature: f64, alpha: f64) -> crate::error::Result<Self> {
        if !(temperature > 0.0 && temperature.is_finite()) {
            return Err(crate::error::Error::value(
                "distillation temperature",
                format!("{temperature} (must be > 0)"),
            ));
        }
        if !(0.0..=1.0).contains(&alpha) {
            return Err(crate::error::Error::value(
                "distillation alpha",
                format!("{alpha} (must be in [0, 1])"),
            ));
        }
        Ok(Self { temperature, alpha })
    }

    pub fn temperature(&self) -> f64 {
        self.temperature
    }

    pub fn alpha(&self) -> f64 {
        self.alpha
    }
}

/// T = 4, α = 0.5.
impl Default for Distillation {
    fn default() -> Self {
        Self {
            temperature: 4.0,
            alpha: 0.5,
        }
    }
}

/// `T,ALPHA`, as `4,0.5`.
impl std::str::FromStr for Distillation {
    type Err = crate::error::Error;

    fn from_str(spec: &str) -> crate::error::Result<Self> {
        let parsed = spec
            .split_once(',')
            .and_then(|(t, a)| Some((t.trim().parse().ok()?, a.trim().parse().ok()?)));
        match parsed {
            Some((t, a)) => Self::new(t, a),
            None => Err(crate::error::Error::value(
                "distillation",
                format!("`{spec}` (expected T,ALPHA, as 4,0.5)"),
            )),
        }
    }
}

impl FineTuneConfig {
    /// Refuses values that would train on nonsense or NaN: lr finite and > 0, momentum in [0, 1),
    /// weight decay finite and ≥ 0, StepLR's step ≥ 1 and γ in (0, 1].
    pub fn validate(&self) -> crate::error::Result<()> {
        use crate::error::check;
        let lr = self.lr;
        check(lr.is_finite() && lr > 0.0, "lr", lr, "finite and > 0")?;
        let m = self.momentum;
        check((0.0..1.0).contains(&m), "momentum", m, "in [0, 1)")?;
        let wd = self.weight_decay;
        check(
            wd.is_finite() && wd >= 0.0,
            "weight decay",
            wd,
            "finite and ≥ 0",
        )?;
        check(self.step_size >= 1, "step size", self.step_size, "≥ 1")?;
        let g = self.gamma;
        check(g > 0.0 && g <= 1.0, "gamma", g, "in (0, 1]")?;
        let scale = self.factor_lr_scale;
        check(
            scale > 0.0 && scale <= 1.0,
            "factor lr scale",
            scale,
            "in (0, 1]",
        )?;
        let warmup = self.warmup_epochs;
        check(
            warmup.is_finite() && warmup >= 0.0,
            "warm-up epochs",
            warmup,
            "finite and ≥ 0",
        )?;
        if let Some(augmentation) = &self.augmentation {
            augmentation.validate()?;
        }
        if let Some(n) = self.max_batches {
            crate::error::check_count("max batches", n)?;
        }
        if let Some(n) = self.epoch_recalibration {
            crate::error::check_count("epoch recalibration images", n)?;
        }
        Ok(())
    }

    /// The batches one epoch trains on, of a loader's `available`.
    pub fn batches_per_epoch(&self, available: usize) -> usize {
        self.max_batches.map_or(available, |n| n.min(available))
    }

    /// StepLR's learning rate in (0-based) `epoch`.
    pub fn lr_at(&self, epoch: usize) -> f64 {
        self.lr * self.gamma.powi((epoch / self.step_size.max(1)) as i32)
    }

    /// The learning rate of (0-based) `batch` of `epoch`, an epoch of `batches` steps: StepLR's,
    /// scaled by the warm-up ([`Self::warmup_epochs`]) while it lasts.
    pub fn lr_at_step(&self, epoch: usize, batch: usize, batches: usize) -> f64 {
        let warmup_steps = self.warmup_epochs * batches as f64;
        let step = (epoch * batches + batch + 1) as f64;
        let warm = match warmup_steps > 0.0 {
            true => (step / warmup_steps).min(1.0),
            false => 1.0,
        };
        self.lr_at(epoch) * warm
    }
}

/// One row of the metrics table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub phase: String,
    /// 1-based.
    pub epoch: u32,
    pub lr: f64,
    pub train_loss: f64,
    pub train_acc: f64,
    pub val_top1: f64,
    pub val_top5: f64,
    pub val_loss: f64,
    /// Wall time of the epoch, training and validation.
    pub seconds: f64,
    /// Training images per second in the steady state: over the epoch's batches after the first,
    /// leaving out a last batch smaller than the others (the batches whose new shapes make
    /// cuDNN's autotuner and the allocator warm up); over all batches when there are no others.
    pub images_per_s: f64,
    /// Seconds the left-out batches took (the first; a smaller last one).
    #[serde(default)]
    pub warmup_seconds: f64,
    /// Validation images per second (the whole pass, as [`crate::EvalResult::images_per_s`]).
    #[serde(default)]
    pub val_images_per_s: f64,
    /// Top-1 and loss on the held-out training images, when the fine-tune selects on them.
    #[serde(default)]
    pub held_out_top1: Option<f64>,
    #[serde(default)]
    pub held_out_loss: Option<f64>,
    /// The epoch whose model the phase returned (0: the model it started from), the same on
    /// each of the phase's rows: the last epoch, unless the fine-tune selects on held-out images.
    #[serde(default)]
    pub chosen_epoch: u32,
}

/// The metrics columns, in order.
pub const METRICS_COLUMNS: [&str; 15] = [
    "phase",
    "epoch",
    "lr",
    "train_loss",
    "train_acc",
    "val_top1",
    "val_top5",
    "val_loss",
    "seconds",
    "images_per_s",
    "warmup_seconds",
    "val_images_per_s",
    "held_out_top1",
    "held_out_loss",
    "chosen_epoch",
];

/// Rows as a DataFrame with [`METRICS_COLUMNS`] (accuracies as fractions).
pub fn metrics_frame(rows: &[EpochMetrics]) -> DataFrame {
    frame_of!(rows; phase, epoch, lr, train_loss, train_acc, val_top1, val_top5, val_loss, seconds,
        images_per_s, warmup_seconds, val_images_per_s, held_out_top1, held_out_loss, chosen_epoch)
}
