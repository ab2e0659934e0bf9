//! A sweep over compression budgets: for each policy, compress a copy of the model, evaluate it,
//! recalibrate its BN statistics and evaluate, fine-tune it briefly and evaluate again; one DataFrame row per policy (plus the uncompressed
//! model), with conv MACs, parameters, reconstruction errors and accuracy, and which rows lie on
//! the accuracy-vs-MACs Pareto front (`plots::pareto_chart` draws it).

use polars::prelude::DataFrame;

use crate::compress::calibrate::{activation_moments, Moments};
use crate::compress::compress_model_fitted;
use crate::compress::latency::check_forecast;
use crate::compress::policy::{CompressionPolicy, Fit};
use crate::error::Result;
use crate::frame::{column, frame_of};
use crate::loader::Loader;
use crate::model::ResNet18;
use crate::train::{evaluate, recalibrate_bn, FineTune, FineTuneConfig, Trainable};

/// The policies `tucker-nb sweep` compares unless told others.
pub const DEFAULT_POLICIES: &str =
    "budget-macs:0.5,budget-macs:0.33,budget-macs:0.2,budget-macs:0.1";

/// Fine-tune epochs of each compressed model in `tucker-nb sweep`, unless told otherwise.
pub const DEFAULT_EPOCHS: usize = 1;

/// The sweep's columns, in order.
pub const SWEEP_COLUMNS: [&str; 12] = [
    "policy",
    "conv_macs",
    "macs_ratio",
    "params",
    "params_ratio",
    "mean_rel_error",
    "worst_rel_error",
    "top1_compressed",
    "top1_recalibrated",
    "top1",
    "top5",
    "pareto",
];

/// One point of the sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepPoint {
    /// The policy's spec (`budget-macs:0.33`), or `dense` for the uncompressed model.
    pub policy: String,
    /// Conv MACs for one image at the policies' input size.
    pub conv_macs: i64,
    /// Of the uncompressed model's conv MACs.
    pub macs_ratio: f64,
    /// All parameters of the model.
    pub params: i64,
    pub params_ratio: f64,
    /// Mean and worst relative reconstruction error over the factorised convs.
    pub mean_rel_error: f64,
    pub worst_rel_error: f64,
    /// Validation top-1 right after compression, after BN recalibration, and after the short
    /// fine-tune.
    pub top1_compressed: f64,
    pub top1_recalibrated: f64,
    pub top1: f64,
    pub top5: f64,
}

/// Compresses a copy of `model` with each policy (fitted to its activations on `calibration` when
/// the policy fits to data), evaluates it, recalibrates its BN statistics on
/// `calibration` and evaluates again, fine-tunes it with `fine_tune` (its `trainable` is set to
/// the factorised convs and fc, its phase to the policy; with `distill`, `model` is the teacher)
/// and evaluates it on `val`. `model` is left as it was.
pub fn sweep(
    model: &ResNet18,
    policies: &[CompressionPolicy],
    loaders: (&Loader, &Loader, &Loader),
    fine_tune: &FineTuneConfig,
) -> Result<DataFrame> {
    let input = policies.first().map_or([224, 224], |p| p.input_size);
    let dense = (model.conv_macs(input), model.num_params());
    let moments = match policies.iter().any(|p| p.fit() == Fit::Data) {
        true => Some(activation_moments(model, loaders.2)?),
        false => None,
    };
    let base = evaluate(model, loaders.1)?;
    let mut points = vec![SweepPoint {
        policy: "dense".into(),
        conv_macs: dense.0,
        macs_ratio: 1.0,
        params: dense.1,
        params_ratio: 1.0,
        mean_rel_error: 0.0,
        worst_rel_error: 0.0,
        top1_compressed: base.top1,
        top1_recalibrated: base.top1,
        top1: base.top1,
        top5: base.top5,
    }];
    for policy in policies {
        let data = moments.as_ref().filter(|_| policy.fit() == Fit::Data);
        points.push(sweep_point(
            (model, data),
            policy,
            loaders,
            fine_tune,
            dense,
        )?);
    }
    Ok(sweep_frame(&points))
}

/// One policy's point: compress a copy, evaluate, recalibrate, evaluate, fine-tune, evaluate.
fn sweep_point(
    (model, moments): (&ResNet18, Option<&Moments>),
    policy: &CompressionPolicy,
    (train, val, calibration): (&Loader, &Loader, &Loader),
    fine_tune: &FineTuneConfig,
    (dense_macs, dense_params): (i64, i64),
) -> Result<SweepPoint> {
    let spec = policy.ranks.to_string();
    let mut compressed = model.deep_copy();
    let mut report = compress_model_fitted(&mut compressed, policy, moments)?;
    check_forecast(&mut report, model, &compressed, policy);
    let top1_compressed = evaluate(&compressed, val)?.top1;
    recalibrate_bn(&mut compressed, calibration)?;
    let top1_recalibrated = evaluate(&compressed, val)?.top1;
    let config = FineTuneConfig {
        phase: spec.clone(),
        trainable: Trainable::TuckerAndClassifier,
        checkpoint_dir: None,
        ..fine_tune.clone()
    };
    let teacher = config.distill.map(|_| model);
    let run = FineTune {
        config: &config,
        teacher,
    };
    crate::train::fine_tune(&mut compressed, train, val, run)?;
    let after = evaluate(&compressed, val)?;
    let errors: Vec<f64> = report
        .layers
        .iter()
        .filter(|l| l.ranks.is_some())
        .map(|l| l.rel_error)
        .collect();
    let conv_macs = compressed.conv_macs(policy.input_size);
    let params = compressed.num_params();
    Ok(SweepPoint {
        policy: spec,
        conv_macs,
        macs_ratio: conv_macs as f64 / dense_macs as f64,
        params,
        params_ratio: params as f64 / dense_params as f64,
        mean_rel_error: errors.iter().sum::<f64>() / errors.len().max(1) as f64,
        worst_rel_error: errors.iter().copied().fold(0.0, f64::max),
        top1_compressed,
        top1_recalibrated,
        top1: after.top1,
        top5: after.top5,
    })
}

/// Whether each point is on the Pareto front of (fewer conv MACs, higher top-1): no other point
/// is at least as good on both and better on one.
pub fn pareto_front(points: &[(i64, f64)]) -> Vec<bool> {
    points
        .iter()
        .map(|&(macs, top1)| {
            !points
                .iter()
                .any(|&(m, t)| m <= macs && t >= top1 && (m < macs || t > top1))
        })
        .collect()
}

/// The points as a DataFrame with [`SWEEP_COLUMNS`].
pub fn sweep_frame(points: &[SweepPoint]) -> DataFrame {
    let front = pareto_front(
        &points
            .iter()
            .map(|p| (p.conv_macs, p.top1))
            .collect::<Vec<_>>(),
    );
    let frame = frame_of!(points; policy, conv_macs, macs_ratio, params, params_ratio,
        mean_rel_error, worst_rel_error, top1_compressed, top1_recalibrated, top1, top5);
    let pareto = column("pareto", &front, |&on| on);
    frame
        .hstack(&[pareto])
        .expect("a column of the frame's height")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_front_keeps_only_undominated_points() {
        let points = [
            (100, 0.7),
            (50, 0.6),
            (50, 0.5),
            (30, 0.65),
            (20, 0.1),
            (30, 0.65),
        ];
        assert_eq!(
            pareto_front(&points),
            [true, false, false, true, true, true]
        );
    }
}
