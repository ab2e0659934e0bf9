//! `fine_tune` and `evaluate`: the seed's loop (SGD with momentum and weight decay, StepLR,
//! cross-entropy), with per-epoch metrics as a polars DataFrame, atomic checkpoints after every
//! epoch that a killed run resumes from, and a clear stop on a non-finite loss.

mod checkpoint;
mod config;
mod evaluate;
mod select;
pub(crate) mod sgd;

use std::time::Instant;

use polars::prelude::DataFrame;
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::loader::Loader;
use crate::model::{is_buffer, ResNet18};
use crate::progress::Progress;
use crate::runtime::{autocast_bf16, synchronize};
use checkpoint::{load_checkpoint, save_checkpoint, CheckpointIndex};
pub use config::{
    metrics_frame, BnMode, Distillation, EpochMetrics, FineTuneConfig, Recipe, Trainable,
    METRICS_COLUMNS,
};
pub use evaluate::{evaluate, evaluate_as, evaluate_with, recalibrate_bn, EvalOptions, EvalResult};
use select::Selection;
pub use select::{HeldOutScore, SelectionState, DIVERGED_FACTOR, DIVERGED_MARGIN};
use sgd::Sgd;

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
    let bns: Vec<String> = model
        .units()
        .into_iter()
        .map(|u| format!("{}.", u.bn_name))
        .collect();
    model
        .named_tensors()
        .into_iter()
        .filter(|(n, _)| !is_buffer(n))
        .filter(|(n, _)| {
            let is_fc = n.starts_with("fc.");
            let is_bn = bns.iter().any(|p| n.starts_with(p.as_str()));
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

/// A fine-tune's settings, and what it may be given besides the data: a teacher to distil from,
/// held-out images to choose its epoch on. What [`fine_tune`] is given; a plain
/// `&FineTuneConfig` converts into one with neither.
#[derive(Debug, Clone)]
pub struct FineTune<'a> {
    pub config: FineTuneConfig,
    /// The model to distil from (the model before compression), `config.distill` saying how
    /// (the default [`Distillation`] when it is `None`); `None`: plain cross-entropy, as the
    /// seed, and `config.distill` must be `None` too.
    pub teacher: Option<&'a ResNet18>,
    /// Training images the fine-tune never trains on: the model is scored on them before the
    /// first epoch and after each, the best-scoring one is returned, and a divergence stops the
    /// phase early (see [`HeldOutScore`]); `None`: the last epoch's model, as the seed.
    pub held_out: Option<&'a Loader>,
}

impl<'a> FineTune<'a> {
    /// `config`, distilled from `teacher`.
    pub fn distilled(config: &FineTuneConfig, teacher: &'a ResNet18) -> Self {
        Self {
            teacher: Some(teacher),
            ..Self::from(config)
        }
    }

    /// This fine-tune, choosing its epoch on `held_out` (when given).
    pub fn selecting_on(self, held_out: Option<&'a Loader>) -> Self {
        Self { held_out, ..self }
    }
}

impl From<FineTuneConfig> for FineTune<'_> {
    fn from(config: FineTuneConfig) -> Self {
        Self {
            config,
            teacher: None,
            held_out: None,
        }
    }
}

impl From<&FineTuneConfig> for FineTune<'_> {
    fn from(config: &FineTuneConfig) -> Self {
        Self::from(config.clone())
    }
}

/// The epochs a fine-tune ran, one row each.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History(pub Vec<EpochMetrics>);

impl History {
    /// The epochs as a table ([`METRICS_COLUMNS`]).
    pub fn frame(&self) -> DataFrame {
        metrics_frame(&self.0)
    }

    pub fn rows(&self) -> &[EpochMetrics] {
        &self.0
    }
}

/// Fine-tunes `model` in place as `run` says, evaluating on `val` after every epoch; returns
/// the epochs' metrics. With held-out images, `model` ends as the epoch that scored best on them
/// (each row's `chosen_epoch`). With `config.checkpoint_dir`, a checkpoint is written atomically
/// after every epoch, and `config.resume` continues from it.
pub fn fine_tune<'a>(
    model: &mut ResNet18,
    train: &Loader,
    val: &Loader,
    run: impl Into<FineTune<'a>>,
) -> Result<History> {
    let mut run = run.into();
    match (run.teacher, run.config.distill) {
        (None, Some(_)) => {
            let why = "distillation needs a teacher (the model before compression)";
            return Err(Error::value("distillation", why));
        }
        (Some(_), None) => run.config.distill = Some(Distillation::default()),
        _ => {}
    }
    match run.config.augmentation {
        Some(augmentation) => {
            fine_tune_epochs(model, &train.augmented(augmentation), val, &run).map(History)
        }
        None => fine_tune_epochs(model, train, val, &run).map(History),
    }
}

/// Each of `params`' share of the learning rate: `scale` for the factorised convs' tensors, 1
/// for the others (fc, BN).
fn lr_scales(model: &ResNet18, params: &[(String, Tensor)], scale: f64) -> Vec<f64> {
    let factorised: Vec<String> = model
        .conv_slots()
        .into_iter()
        .filter(|(_, s)| !s.is_dense())
        .map(|(n, _)| format!("{n}."))
        .collect();
    params
        .iter()
        .map(
            |(name, _)| match factorised.iter().any(|p| name.starts_with(p)) {
                true => scale,
                false => 1.0,
            },
        )
        .collect()
}

/// [`fine_tune`]'s loop; `config.distill` and `teacher` go together.
fn fine_tune_epochs(
    model: &mut ResNet18,
    train: &Loader,
    val: &Loader,
    run: &FineTune,
) -> Result<Vec<EpochMetrics>> {
    let FineTune {
        config,
        teacher,
        held_out,
    } = run;
    let (teacher, held_out) = (*teacher, *held_out);
    if config.epochs == 0 {
        return Ok(Vec::new());
    }
    model.set_channels_last(config.channels_last);
    let params = trainable_parameters(model, config.trainable, config.bn);
    if params.is_empty() {
        return Err(Error::value(
            "trainable",
            format!("{:?} selects no parameter of this model", config.trainable),
        ));
    }
    let scales = lr_scales(model, &params, config.factor_lr_scale);
    let mut sgd = Sgd::new(params, config.momentum, config.weight_decay)?.with_lr_scales(&scales);
    let mut rows = Vec::new();
    let mut start_epoch = 0;
    let mut selection = None;
    if let (Some(dir), true) = (&config.checkpoint_dir, config.resume) {
        if let Some((index, best)) = load_checkpoint(dir, model, &mut sgd, config)? {
            start_epoch = index.epochs_done;
            rows = index.metrics;
            selection = index.selection.map(|state| Selection::resumed(state, best));
            eprintln!(
                "resuming {} from {} after epoch {start_epoch}",
                config.phase,
                dir.display()
            );
        }
    }
    if let (Some(held_out), None) = (held_out, &selection) {
        let score = HeldOutScore::of(model, held_out, config.bf16)?;
        eprintln!(
            "{}: held-out top-1 {:.4}, loss {:.4} before fine-tuning ({} images)",
            config.phase,
            score.top1,
            score.loss,
            held_out.len()
        );
        selection = Some(Selection::start(model, score));
    }
    for p in sgd.parameters() {
        let _ = p.set_requires_grad(true);
    }
    let calibration = match (config.epoch_recalibration, config.bn) {
        (Some(n), BnMode::Statistics | BnMode::Train) => {
            Some(train.calibration_set(n, train.seed, val.batch_size)?)
        }
        _ => None,
    };
    let one_epoch = Epoch {
        train,
        val,
        teacher,
        config,
        calibration,
    };
    let mut result = Ok(());
    let mut stopped = None;
    let mut epoch = start_epoch;
    while epoch < config.epochs {
        let end = match train_epoch(model, &one_epoch, &mut sgd, epoch) {
            Ok(end) => end,
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        let score = match (&end, &selection, held_out) {
            (EpochEnd::Trained(_), Some(_), Some(held_out)) => {
                match HeldOutScore::of(model, held_out, config.bf16) {
                    Ok(score) => Some(score),
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            _ => None,
        };
        stopped = match (end, &mut selection, score) {
            (EpochEnd::Trained(mut row), Some(selection), Some(score)) => {
                row.held_out_top1 = Some(score.top1);
                row.held_out_loss = Some(score.loss);
                rows.push(row);
                selection.after_epoch(model, epoch as u32 + 1, score)
            }
            (EpochEnd::Trained(row), ..) => {
                rows.push(row);
                None
            }
            (EpochEnd::Diverged(why), Some(_), _) => Some(why),
            (EpochEnd::Diverged(why), None, _) => {
                let kept = config
                    .checkpoint_dir
                    .as_ref()
                    .map(|d| format!("; the last good checkpoint is kept in {}", d.display()))
                    .unwrap_or_default();
                let why = format!("{why}: training stopped{kept}");
                result = Err(Error::value("loss", why));
                break;
            }
        };
        // A stopped phase is done: its checkpoint holds the best model and counts every epoch.
        epoch = match (&stopped, &selection) {
            (Some(_), Some(selection)) => {
                selection.restore(model);
                config.epochs
            }
            _ => epoch + 1,
        };
        if let Some(dir) = &config.checkpoint_dir {
            let index = CheckpointIndex {
                phase: config.phase.clone(),
                epochs_done: epoch,
                weights: format!("checkpoint-e{epoch}.safetensors"),
                config: config.clone(),
                metrics: rows.clone(),
                selection: selection.as_ref().map(|s| s.state),
            };
            let best = selection.as_ref().map(|s| s.named_weights(model));
            if let Err(e) = save_checkpoint(dir, model, &sgd, &index, best.as_deref()) {
                result = Err(e);
                break;
            }
        }
    }
    for p in sgd.parameters() {
        let _ = p.set_requires_grad(false);
    }
    result?;
    let chosen = match &selection {
        Some(selection) => {
            selection.restore(model);
            selection.state.best_epoch
        }
        None => rows.last().map_or(0, |r| r.epoch),
    };
    for row in rows.iter_mut().filter(|r| r.phase == config.phase) {
        row.chosen_epoch = chosen;
    }
    if let Some(selection) = &selection {
        let stop = stopped.map_or(String::new(), |why| format!("{why}: stopped early; "));
        let best = selection.state.best;
        let start = match chosen {
            0 => ", the one it started from",
            _ => "",
        };
        eprintln!(
            "{}: {stop}returning the model of epoch {chosen} of {} (held-out top-1 {:.4}, \
             loss {:.4}){start}",
            config.phase, config.epochs, best.top1, best.loss
        );
    }
    Ok(rows)
}

/// α·CE(z_s, y) + (1 − α)·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)), averaged over the batch.
pub fn distillation_loss(
    student: &Tensor,
    teacher: &Tensor,
    labels: &Tensor,
    distill: Distillation,
) -> Tensor {
    let (t, alpha) = (distill.temperature(), distill.alpha());
    let ce = student.cross_entropy_for_logits(labels);
    let log_student = (student / t).log_softmax(-1, Kind::Float);
    let log_teacher = (teacher / t).log_softmax(-1, Kind::Float);
    let kl = (log_teacher.exp() * (&log_teacher - log_student))
        .sum_dim_intlist(-1, false, Kind::Float)
        .mean(Kind::Float);
    ce * alpha + kl * ((1.0 - alpha) * t * t)
}

/// A training batch's logits and loss: cross-entropy, or distillation from `teacher` (its logits
/// in eval mode, without gradients, on the same augmented batch).
fn batch_loss(
    model: &ResNet18,
    teacher: Option<&ResNet18>,
    batch: &crate::loader::Batch,
    config: &FineTuneConfig,
) -> (Tensor, Tensor) {
    let bn_batch_stats = config.bn != BnMode::Frozen;
    let logits = autocast_bf16(config.bf16, || model.forward(&batch.images, bn_batch_stats))
        .to_kind(Kind::Float);
    let loss = match (config.distill, teacher) {
        (Some(distill), Some(teacher)) => {
            let taught = tch::no_grad(|| {
                autocast_bf16(config.bf16, || teacher.forward(&batch.images, false))
                    .to_kind(Kind::Float)
            });
            distillation_loss(&logits, &taught, &batch.labels, distill)
        }
        _ => logits.cross_entropy_for_logits(&batch.labels),
    };
    (logits, loss)
}

/// How an epoch ended.
enum EpochEnd {
    Trained(EpochMetrics),
    /// The running training loss was not finite: where, in words.
    Diverged(String),
}

/// One epoch: what [`fine_tune`] repeats.
struct Epoch<'a> {
    train: &'a Loader,
    val: &'a Loader,
    teacher: Option<&'a ResNet18>,
    config: &'a FineTuneConfig,
    /// The images the BN statistics are re-estimated on after the epoch
    /// ([`FineTuneConfig::epoch_recalibration`]).
    calibration: Option<Loader>,
}

fn train_epoch(
    model: &mut ResNet18,
    Epoch {
        train,
        val,
        teacher,
        config,
        calibration,
    }: &Epoch,
    sgd: &mut Sgd,
    epoch: usize,
) -> Result<EpochEnd> {
    let start = Instant::now();
    let lr = config.lr_at(epoch);
    let device = train.device;
    let batches = config.batches_per_epoch(train.num_batches());
    let what = format!(
        "fine-tune {} epoch {}/{}",
        config.phase,
        epoch + 1,
        config.epochs
    );
    let progress = Progress::new(batches, &what).counting_images(train.batch_size);
    let mut loss_sum = Tensor::zeros([], (Kind::Double, device));
    let mut correct = Tensor::zeros([], (Kind::Int64, device));
    let mut seen = 0usize;
    let check_every = progress.message_every();
    let last = batches.saturating_sub(1);
    let mut steady = SteadyState::default();
    for (b, batch) in train.epoch(epoch).take(batches).enumerate() {
        let n = batch.labels.size()[0] as usize;
        if b == last && n < train.batch_size {
            steady.end(device, seen);
        }
        let (logits, loss) = batch_loss(model, *teacher, &batch, config);
        sgd.backward_step(&loss, config.lr_at_step(epoch, b, batches))?;
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
                progress.finish(format!("loss {mean}"));
                return Ok(EpochEnd::Diverged(format!(
                    "{mean} in {} epoch {} by batch {}",
                    config.phase,
                    epoch + 1,
                    b + 1
                )));
            }
            progress.set_message(format!("loss {mean:.4}"));
        }
        if b == 0 && last > 0 {
            steady.begin(device, seen);
        }
        progress.inc(1);
    }
    steady.end(device, seen);
    let train_seconds = start.elapsed().as_secs_f64();
    let train_loss = loss_sum.double_value(&[]) / seen.max(1) as f64;
    let train_acc = correct.int64_value(&[]) as f64 / seen.max(1) as f64;
    progress.finish(format!(
        "loss {train_loss:.4}  acc {train_acc:.4}  lr {lr:.0e}"
    ));
    if let Some(calibration) = calibration {
        recalibrate_bn(model, calibration)?;
    }
    let options = EvalOptions {
        bf16: config.bf16,
        label: Some(format!("{what}: validate")),
        ..EvalOptions::default()
    };
    let eval = evaluate_with(model, val, options)?;
    Ok(EpochEnd::Trained(EpochMetrics {
        phase: config.phase.clone(),
        epoch: epoch as u32 + 1,
        lr,
        train_loss,
        train_acc,
        val_top1: eval.top1,
        val_top5: eval.top5,
        val_loss: eval.loss,
        seconds: start.elapsed().as_secs_f64(),
        images_per_s: steady.images_per_s().unwrap_or(seen as f64 / train_seconds),
        warmup_seconds: steady.warmup_seconds(train_seconds),
        val_images_per_s: eval.images_per_s,
        held_out_top1: None,
        held_out_loss: None,
        chosen_epoch: epoch as u32 + 1,
    }))
}

/// The steady part of an epoch, between a device sync after its first batch and one before a
/// smaller last batch (or its end): the images trained and the seconds taken.
#[derive(Debug, Default)]
struct SteadyState {
    began: Option<(Instant, usize)>,
    ended: Option<(f64, usize)>,
}

impl SteadyState {
    fn begin(&mut self, device: tch::Device, seen: usize) {
        synchronize(device);
        self.began = Some((Instant::now(), seen));
    }

    /// The first call counts; later ones do nothing.
    fn end(&mut self, device: tch::Device, seen: usize) {
        if let (Some((t, images)), None) = (self.began, self.ended) {
            synchronize(device);
            self.ended = Some((t.elapsed().as_secs_f64(), seen - images));
        }
    }

    /// (seconds, images) of a steady part that trained any images.
    fn measured(&self) -> Option<(f64, usize)> {
        self.ended
            .filter(|&(seconds, images)| images > 0 && seconds > 0.0)
    }

    fn images_per_s(&self) -> Option<f64> {
        self.measured()
            .map(|(seconds, images)| images as f64 / seconds)
    }

    /// The epoch's training seconds outside the steady part.
    fn warmup_seconds(&self, train_seconds: f64) -> f64 {
        let steady = self.measured().map_or(0.0, |(seconds, _)| seconds);
        (train_seconds - steady).max(0.0)
    }
}

#[cfg(test)]
mod tests;
