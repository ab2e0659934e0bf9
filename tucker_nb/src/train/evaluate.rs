//! `evaluate` (top-1/top-5, loss, throughput, predictions) and the BN recalibration after a
//! compression.

use std::time::Instant;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::loader::Loader;
use crate::model::ResNet18;
use crate::progress::Progress;
use crate::runtime::autocast_bf16;
use crate::train::EpochMetrics;

/// What `evaluate` measures.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalResult {
    pub top1: f64,
    pub top5: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    pub images: usize,
    pub seconds: f64,
    pub images_per_s: f64,
    /// Predicted class per image, in loader order, when asked for.
    pub predictions: Option<Vec<i64>>,
}

impl EvalResult {
    /// The validation an epoch recorded, of `images` images.
    pub fn of_epoch(row: &EpochMetrics, images: usize) -> Self {
        let seconds = match row.val_images_per_s > 0.0 {
            true => images as f64 / row.val_images_per_s,
            false => 0.0,
        };
        Self {
            top1: row.val_top1,
            top5: row.val_top5,
            loss: row.val_loss,
            images,
            seconds,
            images_per_s: row.val_images_per_s,
            predictions: None,
        }
    }
}

/// Top-1/top-5 accuracy, mean loss and throughput of `model` (eval mode) over `loader`.
pub fn evaluate(model: &ResNet18, loader: &Loader) -> Result<EvalResult> {
    evaluate_with(model, loader, EvalOptions::default())
}

/// [`evaluate`], its progress lines saying `what` is evaluated.
pub fn evaluate_as(model: &ResNet18, loader: &Loader, what: &str) -> Result<EvalResult> {
    let options = EvalOptions {
        label: Some(format!("evaluate {what}")),
        ..EvalOptions::default()
    };
    evaluate_with(model, loader, options)
}

/// What an evaluation does besides counting, and what its progress says (defaults: neither, and
/// "evaluate N images").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EvalOptions {
    /// Keep every image's predicted class ([`EvalResult::predictions`]).
    pub keep_predictions: bool,
    /// Run the forward pass under bf16 autocast (CUDA; plain fp32 elsewhere).
    pub bf16: bool,
    /// What the progress lines call this evaluation (default: "evaluate N images").
    pub label: Option<String>,
}

/// [`evaluate`] with `options`.
pub fn evaluate_with(
    model: &ResNet18,
    loader: &Loader,
    options: EvalOptions,
) -> Result<EvalResult> {
    let EvalOptions {
        keep_predictions,
        bf16,
        label,
    } = options;
    let start = Instant::now();
    let device = loader.device;
    let k = model.num_classes().min(5);
    let (mut loss_sum, mut top1, mut top5) = (
        Tensor::zeros([], (Kind::Double, device)),
        Tensor::zeros([], (Kind::Int64, device)),
        Tensor::zeros([], (Kind::Int64, device)),
    );
    let mut predictions = Vec::new();
    let label = label.unwrap_or_else(|| format!("evaluate {} images", loader.len()));
    let progress = Progress::new(loader.num_batches(), &label).counting_images(loader.batch_size);
    tch::no_grad(|| {
        for batch in loader.epoch(0) {
            let logits =
                autocast_bf16(bf16, || model.forward(&batch.images, false)).to_kind(Kind::Float);
            let loss = logits.cross_entropy_loss::<Tensor>(
                &batch.labels,
                None,
                tch::Reduction::Sum,
                -100,
                0.0,
            );
            loss_sum += loss.to_kind(Kind::Double);
            let (_, best) = logits.topk(k, 1, true, true);
            let hits = best.eq_tensor(&batch.labels.unsqueeze(1));
            top1 += hits.narrow(1, 0, 1).sum(Kind::Int64);
            top5 += hits.sum(Kind::Int64);
            if keep_predictions {
                predictions.extend(
                    Vec::<i64>::try_from(best.select(1, 0).to_device(tch::Device::Cpu)).unwrap(),
                );
            }
            progress.inc(1);
        }
    });
    let n = loader.len();
    let loss = loss_sum.double_value(&[]) / n.max(1) as f64;
    let seconds = start.elapsed().as_secs_f64();
    let result = EvalResult {
        top1: top1.int64_value(&[]) as f64 / n.max(1) as f64,
        top5: top5.int64_value(&[]) as f64 / n.max(1) as f64,
        loss,
        images: n,
        seconds,
        images_per_s: n as f64 / seconds,
        predictions: keep_predictions.then_some(predictions),
    };
    progress.finish(format!(
        "top-1 {:.4}  top-5 {:.4}  loss {:.4}",
        result.top1, result.top5, result.loss
    ));
    Ok(result)
}

/// BN recalibration, for a model whose convs have just been replaced: every BN's running
/// statistics are reset and re-estimated from `calibration` in train mode without gradients, as
/// the equal-weight average over its batches (PyTorch's `momentum=None`); affine parameters and
/// weights are untouched. Returns the number of images seen. Refuses a model with folded BNs
/// (fold after recalibrating) and non-finite statistics (naming the BN).
pub fn recalibrate_bn(model: &mut ResNet18, calibration: &Loader) -> Result<usize> {
    if calibration.is_empty() {
        return Err(Error::value("calibration set", "no images"));
    }
    if let Some(unit) = model.units().into_iter().find(|u| u.bn.folded) {
        return Err(Error::layer(
            unit.bn_name,
            "is folded into its conv: recalibrate BNs before folding them",
        ));
    }
    let momentum = model.bn1.momentum;
    model.reset_bn_statistics();
    let mut seen = 0;
    tch::no_grad(|| {
        for (k, batch) in calibration.epoch(0).enumerate() {
            model.set_bn_momentum(1.0 / (k + 1) as f64);
            let _ = model.forward(&batch.images, true);
            seen += batch.labels.size()[0] as usize;
        }
    });
    model.set_bn_momentum(momentum);
    for unit in model.units() {
        let stats = Tensor::cat(&[&unit.bn.running_mean, &unit.bn.running_var], 0);
        if stats.isfinite().logical_not().any().int64_value(&[]) != 0 {
            return Err(Error::layer(
                unit.bn_name,
                "non-finite running statistics after recalibration: the calibration activations \
                 are not finite",
            ));
        }
    }
    Ok(seen)
}
