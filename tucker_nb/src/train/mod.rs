//! `fine_tune` and `evaluate`: the seed's loop (SGD with momentum and weight decay, StepLR,
//! cross-entropy), with per-epoch metrics as a polars DataFrame, atomic checkpoints after every
//! epoch that a killed run resumes from, and a clear stop on a non-finite loss.

mod checkpoint;
mod config;
mod sgd;

use std::collections::BTreeMap;
use std::time::Instant;

use polars::prelude::DataFrame;
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::loader::Loader;
use crate::model::{is_buffer, ResNet18};
use crate::progress::Progress;
use checkpoint::{load_checkpoint, save_checkpoint, CheckpointIndex};
pub use config::{metrics_frame, BnMode, EpochMetrics, FineTuneConfig, Trainable, METRICS_COLUMNS};
use sgd::Sgd;

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

/// Top-1/top-5 accuracy, mean loss and throughput of `model` (eval mode) over `loader`.
pub fn evaluate(model: &ResNet18, loader: &Loader) -> Result<EvalResult> {
    evaluate_with(model, loader, false, false)
}

/// [`evaluate`], optionally keeping every prediction and running the forward pass in bf16.
pub fn evaluate_with(
    model: &ResNet18,
    loader: &Loader,
    keep_predictions: bool,
    bf16: bool,
) -> Result<EvalResult> {
    let start = Instant::now();
    let device = loader.device;
    let k = model.num_classes().min(5);
    let (mut loss_sum, mut top1, mut top5) = (
        Tensor::zeros([], (Kind::Double, device)),
        Tensor::zeros([], (Kind::Int64, device)),
        Tensor::zeros([], (Kind::Int64, device)),
    );
    let mut predictions = Vec::new();
    let progress = Progress::new(loader.num_batches(), "evaluate");
    tch::no_grad(|| {
        for batch in loader.epoch(0) {
            let logits =
                autocast(bf16, || model.forward(&batch.images, false)).to_kind(Kind::Float);
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

fn autocast<T>(bf16: bool, f: impl FnOnce() -> T) -> T {
    if bf16 && crate::runtime::use_bf16_autocast() {
        tch::autocast(true, f)
    } else {
        f()
    }
}

/// The tensors `trainable` selects, by state_dict name (shallow clones: updating them updates
/// the model).
pub fn trainable_parameters(
    model: &ResNet18,
    trainable: Trainable,
    bn: BnMode,
) -> Vec<(String, Tensor)> {
    let tucker: Vec<String> = model
        .conv_slots()
        .into_iter()
        .filter(|(_, s)| !s.is_dense())
        .map(|(n, _)| format!("{n}."))
        .collect();
    model
        .named_tensors()
        .into_iter()
        .filter(|(n, _)| !is_buffer(n))
        .filter(|(n, _)| {
            let is_fc = n.starts_with("fc.");
            let is_bn = n.starts_with("bn") || n.contains(".bn") || n.contains("downsample.1.");
            let selected = match trainable {
                Trainable::Classifier => is_fc,
                Trainable::TuckerAndClassifier => {
                    is_fc || tucker.iter().any(|p| n.starts_with(p.as_str()))
                }
                Trainable::All => true,
            };
            selected || (bn == BnMode::Train && is_bn)
        })
        .collect()
}

/// Fine-tunes `model` in place, evaluating on `val` after every epoch; returns the metrics
/// (one row per epoch, [`METRICS_COLUMNS`]). With `config.checkpoint_dir`, a checkpoint is
/// written atomically after every epoch, and `config.resume` continues from it.
pub fn fine_tune(
    model: &mut ResNet18,
    train: &Loader,
    val: &Loader,
    config: &FineTuneConfig,
) -> Result<DataFrame> {
    let rows = fine_tune_rows(model, train, val, config)?;
    Ok(metrics_frame(&rows))
}

/// [`fine_tune`], returning the rows themselves.
pub fn fine_tune_rows(
    model: &mut ResNet18,
    train: &Loader,
    val: &Loader,
    config: &FineTuneConfig,
) -> Result<Vec<EpochMetrics>> {
    if config.epochs == 0 {
        return Ok(Vec::new());
    }
    let params = trainable_parameters(model, config.trainable, config.bn);
    if params.is_empty() {
        return Err(Error::value(
            "trainable",
            format!("{:?} selects no parameter of this model", config.trainable),
        ));
    }
    let mut sgd = Sgd {
        params,
        momentum: BTreeMap::new(),
        mu: config.momentum,
        weight_decay: config.weight_decay,
    };
    let mut rows = Vec::new();
    let mut start_epoch = 0;
    if let (Some(dir), true) = (&config.checkpoint_dir, config.resume) {
        if let Some(index) = load_checkpoint(dir, model, &mut sgd, config)? {
            start_epoch = index.epochs_done;
            rows = index.metrics;
            eprintln!(
                "resuming {} from {} after epoch {start_epoch}",
                config.phase,
                dir.display()
            );
        }
    }
    for (_, p) in &sgd.params {
        let _ = p.set_requires_grad(true);
    }
    let result = (start_epoch..config.epochs).try_for_each(|epoch| -> Result<()> {
        let row = train_epoch(model, train, val, config, &mut sgd, epoch)?;
        rows.push(row);
        if let Some(dir) = &config.checkpoint_dir {
            let index = CheckpointIndex {
                phase: config.phase.clone(),
                epochs_done: epoch + 1,
                weights: format!("checkpoint-e{}.safetensors", epoch + 1),
                config: config.clone(),
                metrics: rows.clone(),
            };
            save_checkpoint(dir, model, &sgd, &index)?;
        }
        Ok(())
    });
    for (_, p) in &sgd.params {
        let _ = p.set_requires_grad(false);
    }
    result.map(|()| rows)
}

fn train_epoch(
    model: &mut ResNet18,
    train: &Loader,
    val: &Loader,
    config: &FineTuneConfig,
    sgd: &mut Sgd,
    epoch: usize,
) -> Result<EpochMetrics> {
    let start = Instant::now();
    let lr = config.lr_at(epoch);
    let device = train.device;
    let bn_batch_stats = config.bn != BnMode::Frozen;
    let progress = Progress::new(
        train.num_batches(),
        &format!("{} epoch {}/{}", config.phase, epoch + 1, config.epochs),
    );
    let mut loss_sum = Tensor::zeros([], (Kind::Double, device));
    let mut correct = Tensor::zeros([], (Kind::Int64, device));
    let mut seen = 0usize;
    let check_every = 10;
    let last = train.num_batches().saturating_sub(1);
    for (b, batch) in train.epoch(epoch).enumerate() {
        let n = batch.labels.size()[0] as usize;
        let logits = autocast(config.bf16, || model.forward(&batch.images, bn_batch_stats))
            .to_kind(Kind::Float);
        let loss = logits.cross_entropy_for_logits(&batch.labels);
        sgd.zero_grad();
        loss.backward();
        sgd.step(lr);
        tch::no_grad(|| {
            loss_sum += loss.detach().to_kind(Kind::Double) * n as f64;
            correct += logits
                .argmax(1, false)
                .eq_tensor(&batch.labels)
                .sum(Kind::Int64);
        });
        seen += n;
        if b % check_every == check_every - 1 || b == last {
            let mean = loss_sum.double_value(&[]) / seen as f64;
            if !mean.is_finite() {
                let kept = config
                    .checkpoint_dir
                    .as_ref()
                    .map(|d| format!("; the last good checkpoint is kept in {}", d.display()))
                    .unwrap_or_default();
                return Err(Error::value(
                    "loss",
                    format!(
                        "{mean} in {} epoch {} by batch {}: training stopped{kept}",
                        config.phase,
                        epoch + 1,
                        b + 1
                    ),
                ));
            }
            progress.set_message(format!("loss {mean:.4}"));
        }
        progress.inc(1);
    }
    let train_seconds = start.elapsed().as_secs_f64();
    let train_loss = loss_sum.double_value(&[]) / seen.max(1) as f64;
    let train_acc = correct.int64_value(&[]) as f64 / seen.max(1) as f64;
    progress.finish(format!(
        "loss {train_loss:.4}  acc {train_acc:.4}  lr {lr:.0e}"
    ));
    let eval = evaluate_with(model, val, false, config.bf16)?;
    Ok(EpochMetrics {
        phase: config.phase.clone(),
        epoch: epoch as u32 + 1,
        lr,
        train_loss,
        train_acc,
        val_top1: eval.top1,
        val_top5: eval.top5,
        val_loss: eval.loss,
        seconds: start.elapsed().as_secs_f64(),
        images_per_s: seen as f64 / train_seconds,
    })
}
