//! Compression in stages: each stage's policy, report, evaluations (right after it and after
//! the BN recalibration) and the fine-tune before it, as one record per stage.

use polars::prelude::DataFrame;

use crate::compress::calibrate::activation_moments;
use crate::compress::compress_model_fitted;
use crate::compress::latency::check_forecast;
use crate::compress::policy::{CompressionPolicy, Fit};
use crate::error::{Error, Result};
use crate::figures::ModelFigures;
use crate::loader::Loader;
use crate::model::ResNet18;
use crate::report::CompressionReport;
use crate::train::{
    evaluate_as, fine_tune, metrics_frame, recalibrate_bn, EpochMetrics, EvalResult, FineTune,
    FineTuneConfig, Trainable,
};

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

/// A model evaluated once: the evaluation, and the model's figures then.
#[derive(Debug, Clone)]
pub struct Evaluated {
    pub eval: EvalResult,
    pub figures: ModelFigures,
}

impl Evaluated {
    /// `model` evaluated on `val` (its progress saying `what`), its MACs counted at
    /// `image_size` px.
    pub fn of(model: &ResNet18, val: &Loader, image_size: i64, what: &str) -> Result<Self> {
        let eval = evaluate_as(model, val, what)?;
        let figures = ModelFigures::new(model, &eval, image_size);
        Ok(Self { eval, figures })
    }
}

/// One stage of a compression.
#[derive(Debug)]
pub struct StageOutcome {
    pub policy: CompressionPolicy,
    /// The epochs of the fine-tune before this stage (none before the first).
    pub fine_tune: Vec<EpochMetrics>,
    pub report: CompressionReport,
    /// Right after the compression (MACs at the policy's input size).
    pub compressed: Evaluated,
    /// After that, with the BN statistics recalibrated on the calibration set (when asked for).
    pub recalibrated: Option<Evaluated>,
}

/// What [`compress_in_stages`] did, stage by stage (at least one).
#[derive(Debug)]
pub struct Stages(pub Vec<StageOutcome>);

impl Stages {
    /// The last stage.
    pub fn last(&self) -> &StageOutcome {
        self.0.last().expect("at least one stage")
    }

    /// The last stage's report.
    pub fn final_report(&self) -> &CompressionReport {
        &self.last().report
    }

    /// The evaluation right after the last stage's compression.
    pub fn final_eval(&self) -> &EvalResult {
        &self.last().compressed.eval
    }

    /// The epochs of the fine-tunes between the stages, in order.
    pub fn metrics(&self) -> Vec<EpochMetrics> {
        self.0
            .iter()
            .flat_map(|s| s.fine_tune.iter().cloned())
            .collect()
    }

    /// The fine-tunes between the stages as a metrics table.
    pub fn metrics_frame(&self) -> DataFrame {
        metrics_frame(&self.metrics())
    }
}

/// Compresses `model` with `policies[0]`, then, for each further policy, fine-tunes it with
/// `between` (the factorised convs and fc; phase `PHASE1`, `PHASE2`, … after `between.phase`;
/// with a checkpoint folder, each stage's checkpoints go in `DIR/PHASEn`; distilled from its
/// teacher and choosing its epoch on its held-out images when it has them) and compresses it
/// further (MUSCO-style). With a `calibration` set, policies that fit to data
/// ([`CompressionPolicy::fit`]) fit each layer's factors to its activations on it. Evaluates on
/// `val` after each compression and, with a `calibration` set, recalibrates the BN statistics on
/// it and evaluates again. Later policies must be data-driven
/// ([`CompressionPolicy::validate_as_stage`]); that is checked first.
pub fn compress_in_stages<'a>(
    model: &mut ResNet18,
    policies: &[CompressionPolicy],
    (train, val): (&Loader, &Loader),
    calibration: Option<Calibration>,
    between: impl Into<FineTune<'a>>,
) -> Result<Stages> {
    let between = between.into();
    if policies.is_empty() {
        return Err(Error::value("stages", "no compression policy given"));
    }
    for later in &policies[1..] {
        later.validate_as_stage()?;
    }
    let mut stages = Vec::with_capacity(policies.len());
    for (i, policy) in policies.iter().enumerate() {
        let fine_tune = match i {
            0 => Vec::new(),
            _ => {
                let settings = &between.config;
                let phase = format!("{}{i}", settings.phase);
                let config = FineTuneConfig {
                    checkpoint_dir: settings.checkpoint_dir.as_ref().map(|d| d.join(&phase)),
                    phase,
                    trainable: Trainable::TuckerAndClassifier,
                    ..settings.clone()
                };
                let run = FineTune {
                    config,
                    ..between.clone()
                };
                fine_tune(model, train, val, run)?.0
            }
        };
        let moments = match (policy.fit(), calibration) {
            (Fit::Data, Some(c)) => Some(activation_moments(model, c.images)?),
            _ => None,
        };
        let before = policy.is_timed().then(|| model.deep_copy());
        let mut report = compress_model_fitted(model, policy, moments.as_ref())?;
        if let Some(before) = &before {
            check_forecast(&mut report, before, model, policy);
        }
        let size = policy.input_size[0];
        let stage = format!("stage {} ({})", i + 1, policy.ranks);
        let compressed = Evaluated::of(model, val, size, &format!("{stage}, compressed"))?;
        let recalibrated = match calibration.filter(|c| c.recalibrate_bn) {
            Some(c) => {
                recalibrate_bn(model, c.images)?;
                let what = format!("{stage}, recalibrated");
                Some(Evaluated::of(model, val, size, &what)?)
            }
            None => None,
        };
        stages.push(StageOutcome {
            policy: policy.clone(),
            fine_tune,
            report,
            compressed,
            recalibrated,
        });
    }
    Ok(Stages(stages))
}
