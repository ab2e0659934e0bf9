//! A sweep over compression budgets: for each policy, compress a copy of the model, evaluate it,
//! recalibrate its BN statistics and evaluate, fine-tune it briefly and evaluate again; one DataFrame row per policy (plus the uncompressed
//! model), with conv MACs, parameters, reconstruction errors, accuracy, the measured eval
//! throughput (timed side by side with the dense model), and which rows lie on the
//! accuracy-vs-MACs and accuracy-vs-throughput Pareto fronts (`plots::pareto_chart` and
//! `plots::pareto_speed_chart` draw them).

use polars::prelude::DataFrame;

use crate::compress::calibrate::{activation_moments, Moments};
use crate::compress::compress_model_fitted;
use crate::compress::latency::{check_forecast, measure_side_by_side, MeasuredSpeed, TimingKey};
use crate::compress::policy::{CompressionPolicy, Fit};
use crate::error::Result;
use crate::frame::{column, frame_of};
use crate::loader::Loader;
use crate::model::ResNet18;
use crate::train::{evaluate_as, recalibrate_bn, FineTune, FineTuneConfig, History, Trainable};

/// The policies `tucker-nb sweep` compares unless told others.
pub const DEFAULT_POLICIES: &str =
    "budget-macs:0.5,budget-macs:0.33,budget-macs:0.2,budget-macs:0.1";

/// Fine-tune epochs of each compressed model in `tucker-nb sweep`, unless told otherwise.
pub const DEFAULT_EPOCHS: usize = 1;

/// The sweep's columns, in order.
pub const SWEEP_COLUMNS: [&str; 18] = [
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
    "chosen_epoch",
    "images_per_s",
    "speedup",
    "predicted_speedup",
    "speed_at",
    "pareto",
    "pareto_speed",
];

/// Timed eval calls of each model when a sweep point's speed is measured beside the dense one.
const SPEED_TURNS: usize = 15;

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
    /// The fine-tune's epoch whose model `top1` is of (0: the recalibrated model it started from).
    pub chosen_epoch: u32,
    /// Measured eval images/s (batch / median forward time, timed in turns with the dense
    /// model), and the dense model's time over this one's.
    pub images_per_s: f64,
    pub speedup: f64,
    /// Under a latency budget, the speedup its table predicted (null otherwise).
    pub predicted_speedup: Option<f64>,
    /// What the speed was measured at: device, dtype, layout, batch, threads.
    pub speed_at: String,
}

/// Compresses a copy of `model` with each policy (fitted to its activations on `calibration` when
/// the policy fits to data), evaluates it, recalibrates its BN statistics on
/// `calibration` and evaluates again, fine-tunes it with `fine_tune` (its `trainable` is set to
/// the factorised convs and fc, its phase to the policy; with `distill`, `model` is the teacher;
/// with held-out images, each point is the epoch that scored best on them) and evaluates the
/// model it returns on `val`. `model` is left as it was.
pub fn sweep<'a>(
    model: &ResNet18,
    policies: &[CompressionPolicy],
    loaders: (&Loader, &Loader, &Loader),
    fine_tune: impl Into<FineTune<'a>>,
) -> Result<DataFrame> {
    sweep_with_history(model, policies, loaders, fine_tune).map(|(points, _)| points)
}

/// [`sweep`], and every point's fine-tune epochs (each row's phase is the point's policy), to see
/// what each point's validation and held-out figures did epoch by epoch.
pub fn sweep_with_history<'a>(
    model: &ResNet18,
    policies: &[CompressionPolicy],
    loaders: (&Loader, &Loader, &Loader),
    fine_tune: impl Into<FineTune<'a>>,
) -> Result<(DataFrame, History)> {
    let fine_tune = fine_tune.into();
    let mut epochs = Vec::new();
    let input = policies.first().map_or([224, 224], |p| p.input_size);
    let dense = (model.conv_macs(input), model.num_params());
    let moments = match policies.iter().any(|p| p.fit() == Fit::Data) {
        true => Some(activation_moments(model, loaders.2)?),
        false => None,
    };
    let base = evaluate_as(model, loaders.1, "the dense model")?;
    let timing = policies
        .first()
        .map(|p| p.timing.clone())
        .unwrap_or_default();
    let key = TimingKey::current(&timing, model.device(), model.is_channels_last());
    let mut dense_ms = Vec::new();
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
        chosen_epoch: 0,
        images_per_s: 0.0,
        speedup: 1.0,
        predicted_speedup: None,
        speed_at: key.describe(),
    }];
    for policy in policies {
        let data = moments.as_ref().filter(|_| policy.fit() == Fit::Data);
        let (mut point, speed, history) =
            sweep_point((model, data), policy, loaders, &fine_tune, dense)?;
        epochs.extend(history.0);
        let policy_key =
            TimingKey::current(&policy.timing, model.device(), model.is_channels_last());
        point.images_per_s = policy_key.batch as f64 / (speed.after_ms / 1e3);
        point.speedup = speed.speedup();
        point.speed_at = policy_key.describe();
        dense_ms.push(speed.before_ms);
        points.push(point);
    }
    // The dense model's time is taken beside every point; its row has their median.
    points[0].images_per_s = match dense_ms.is_empty() {
        true => key.batch as f64 / (crate::compress::latency::model_ms(model, input, &key) / 1e3),
        false => key.batch as f64 / (crate::timing::median(dense_ms) / 1e3),
    };
    Ok((sweep_frame(&points), History(epochs)))
}

/// One policy's point: compress a copy, evaluate, recalibrate, evaluate, fine-tune, evaluate,
/// and time it beside `model` (its speed fields are the caller's to fill from that).
fn sweep_point(
    (model, moments): (&ResNet18, Option<&Moments>),
    policy: &CompressionPolicy,
    (train, val, calibration): (&Loader, &Loader, &Loader),
    fine_tune: &FineTune,
    (dense_macs, dense_params): (i64, i64),
) -> Result<(SweepPoint, MeasuredSpeed, History)> {
    let spec = policy.ranks.to_string();
    let mut compressed = model.deep_copy();
    let mut report = compress_model_fitted(&mut compressed, policy, moments)?;
    check_forecast(&mut report, model, &compressed, policy);
    let top1_compressed = evaluate_as(&compressed, val, &format!("{spec}, compressed"))?.top1;
    recalibrate_bn(&mut compressed, calibration)?;
    let top1_recalibrated = evaluate_as(&compressed, val, &format!("{spec}, recalibrated"))?.top1;
    let config = FineTuneConfig {
        phase: spec.clone(),
        trainable: Trainable::TuckerAndClassifier,
        checkpoint_dir: None,
        ..fine_tune.config.clone()
    };
    let run = FineTune {
        teacher: config.distill.map(|_| model),
        config,
        held_out: fine_tune.held_out,
    };
    let history = crate::train::fine_tune(&mut compressed, train, val, run)?;
    let chosen_epoch = history.rows().last().map_or(0, |r| r.chosen_epoch);
    let after = evaluate_as(&compressed, val, &format!("{spec}, fine-tuned"))?;
    let speed = measure_side_by_side(
        model,
        &compressed,
        policy.input_size,
        &policy.timing,
        SPEED_TURNS,
    );
    let errors: Vec<f64> = report
        .layers
        .iter()
        .filter(|l| l.ranks.is_some())
        .map(|l| l.rel_error)
        .collect();
    let conv_macs = compressed.conv_macs(policy.input_size);
    let params = compressed.num_params();
    let point = SweepPoint {
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
        chosen_epoch,
        images_per_s: 0.0,
        speedup: 1.0,
        predicted_speedup: report.latency.as_ref().map(|l| l.predicted_speedup),
        speed_at: String::new(),
    };
    Ok((point, speed, history))
}

/// Whether each point is on the Pareto front of (lower cost, higher top-1): no other point is
/// at least as good on both and better on one.
pub fn pareto_front(points: &[(f64, f64)]) -> Vec<bool> {
    points
        .iter()
        .map(|&(cost, top1)| {
            !points
                .iter()
                .any(|&(c, t)| c <= cost && t >= top1 && (c < cost || t > top1))
        })
        .collect()
}

/// The points as a DataFrame with [`SWEEP_COLUMNS`].
pub fn sweep_frame(points: &[SweepPoint]) -> DataFrame {
    let front = |cost: fn(&SweepPoint) -> f64| {
        pareto_front(&points.iter().map(|p| (cost(p), p.top1)).collect::<Vec<_>>())
    };
    let by_macs = front(|p| p.conv_macs as f64);
    let by_speed = front(|p| -p.images_per_s);
    let frame = frame_of!(points; policy, conv_macs, macs_ratio, params, params_ratio,
        mean_rel_error, worst_rel_error, top1_compressed, top1_recalibrated, top1, top5,
        chosen_epoch, images_per_s, speedup, predicted_speedup, speed_at);
    let fronts = [
        column("pareto", &by_macs, |&on| on),
        column("pareto_speed", &by_speed, |&on| on),
    ];
    frame
        .hstack(&fronts)
        .expect("columns of the frame's height")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_front_keeps_only_undominated_points() {
        let points = [
            (100.0, 0.7),
            (50.0, 0.6),
            (50.0, 0.5),
            (30.0, 0.65),
            (20.0, 0.1),
            (30.0, 0.65),
        ];
        assert_eq!(
            pareto_front(&points),
            [true, false, false, true, true, true]
        );
    }
}
