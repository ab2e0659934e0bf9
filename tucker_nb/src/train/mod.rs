//! `fine_tune` and `evaluate`: the seed's loop (SGD with momentum and weight decay, StepLR,
//! cross-entropy), with per-epoch metrics as a polars DataFrame, atomic checkpoints after every
//! epoch that a killed run resumes from, and a clear stop on a non-finite loss.

mod checkpoint;
mod config;
mod evaluate;
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
    metrics_frame, BnMode, Distillation, EpochMetrics, FineTuneConfig, Trainable, METRICS_COLUMNS,
};
pub use evaluate::{evaluate, evaluate_with, recalibrate_bn, EvalOptions, EvalResult};
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

/// A fine-tune's settings and, to distil, its teacher: what [`fine_tune`] is given. A plain
/// `&FineTuneConfig` converts into one without a teacher.
#[derive(Debug, Clone, Copy)]
pub struct FineTune<'a> {
    pub config: &'a FineTuneConfig,
    /// The model to distil from (the model before compression), `config.distill` saying how
    /// (the default [`Distillation`] when it is `None`); `None`: plain cross-entropy, as the
    /// seed, and `config.distill` must be `None` too.
    pub teacher: Option<&'a ResNet18>,
}

impl<'a> FineTune<'a> {
    /// `config`, distilled from `teacher`.
    pub fn distilled(config: &'a FineTuneConfig, teacher: &'a ResNet18) -> Self {
        Self {
            config,
            teacher: Some(teacher),
        }
    }
}

impl<'a> From<&'a FineTuneConfig> for FineTune<'a> {
    fn from(config: &'a FineTuneConfig) -> Self {
        Self {
            config,
            teacher: None,
        }
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
/// the epochs' metrics. With `config.checkpoint_dir`, a checkpoint is written atomically after
/// every epoch, and `config.resume` continues from it.
pub fn fine_tune<'a>(
    model: &mut ResNet18,
    train: &Loader,
    val: &Loader,
    run: impl Into<FineTune<'a>>,
) -> Result<History> {
    let FineTune { config, teacher } = run.into();
    let distilled;
    let config = match (teacher, config.distill) {
        (None, Some(_)) => {
            let why = "distillation needs a teacher (the model before compression)";
            return Err(Error::value("distillation", why));
        }
        (Some(_), None) => {
            distilled = FineTuneConfig {
                distill: Some(Distillation::default()),
                ..config.clone()
            };
            &distilled
        }
        _ => config,
    };
    fine_tune_epochs(model, teacher, train, val, config).map(History)
}

/// [`fine_tune`]'s loop; `config.distill` and `teacher` go together.
fn fine_tune_epochs(
    model: &mut ResNet18,
    teacher: Option<&ResNet18>,
    train: &Loader,
    val: &Loader,
    config: &FineTuneConfig,
) -> Result<Vec<EpochMetrics>> {
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
    let mut sgd = Sgd::new(params, config.momentum, config.weight_decay)?;
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
    for p in sgd.parameters() {
        let _ = p.set_requires_grad(true);
    }
    let one_epoch = Epoch {
        train,
        val,
        teacher,
        config,
    };
    let result = (start_epoch..config.epochs).try_for_each(|epoch| -> Result<()> {
        let row = train_epoch(model, &one_epoch, &mut sgd, epoch)?;
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
    for p in sgd.parameters() {
        let _ = p.set_requires_grad(false);
    }
    result.map(|()| rows)
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

/// A clear stop on a non-finite mean loss, saying where and which checkpoint is kept.
fn stop_unless_finite(
    mean: f64,
    config: &FineTuneConfig,
    epoch: usize,
    batch: usize,
) -> Result<()> {
    if mean.is_finite() {
        return Ok(());
    }
    let kept = config
        .checkpoint_dir
        .as_ref()
        .map(|d| format!("; the last good checkpoint is kept in {}", d.display()))
        .unwrap_or_default();
    Err(Error::value(
        "loss",
        format!(
            "{mean} in {} epoch {} by batch {}: training stopped{kept}",
            config.phase,
            epoch + 1,
            batch + 1
        ),
    ))
}

/// One epoch: what [`fine_tune`] repeats.
struct Epoch<'a> {
    train: &'a Loader,
    val: &'a Loader,
    teacher: Option<&'a ResNet18>,
    config: &'a FineTuneConfig,
}

fn train_epoch(
    model: &mut ResNet18,
    Epoch {
        train,
        val,
        teacher,
        config,
    }: &Epoch,
    sgd: &mut Sgd,
    epoch: usize,
) -> Result<EpochMetrics> {
    let start = Instant::now();
    let lr = config.lr_at(epoch);
    let device = train.device;
    let batches = config.batches_per_epoch(train.num_batches());
    let progress = Progress::new(
        batches,
        &format!("{} epoch {}/{}", config.phase, epoch + 1, config.epochs),
    );
    let mut loss_sum = Tensor::zeros([], (Kind::Double, device));
    let mut correct = Tensor::zeros([], (Kind::Int64, device));
    let mut seen = 0usize;
    let check_every = 10;
    let last = batches.saturating_sub(1);
    let mut steady = SteadyState::default();
    for (b, batch) in train.epoch(epoch).take(batches).enumerate() {
        let n = batch.labels.size()[0] as usize;
        if b == last && n < train.batch_size {
            steady.end(device, seen);
        }
        let (logits, loss) = batch_loss(model, *teacher, &batch, config);
        sgd.backward_step(&loss, lr)?;
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
            stop_unless_finite(mean, config, epoch, b)?;
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
    let options = EvalOptions {
        bf16: config.bf16,
        ..EvalOptions::default()
    };
    let eval = evaluate_with(model, val, options)?;
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
        images_per_s: steady.images_per_s().unwrap_or(seen as f64 / train_seconds),
        warmup_seconds: steady.warmup_seconds(train_seconds),
        val_images_per_s: eval.images_per_s,
    })
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
mod tests {
    use super::*;
    use crate::data::Dataset;
    use crate::loader::Transform;
    use tch::Device;

    /// 12 random 32 px images as a calibration loader (batches of 4, no shuffle).
    fn calibration() -> Loader {
        tch::manual_seed(5);
        let eval = Transform::Eval { size: 32 };
        Loader::new(&Dataset::random(12, 32), 4, eval, Device::Cpu, true)
    }

    #[test]
    fn recalibration_estimates_the_statistics_of_the_calibration_batches() {
        let mut model = ResNet18::new(3, Device::Cpu);
        let calibration = calibration();
        assert_eq!(recalibrate_bn(&mut model, &calibration).unwrap(), 12);
        // The stem BN sees conv1's output: its mean over all images and pixels (equal batches),
        // and the mean of the per-batch unbiased variances.
        let (mut mean, mut var) = (Vec::new(), Vec::new());
        tch::no_grad(|| {
            for batch in calibration.epoch(0) {
                let y = model.conv1.forward(&batch.images).to_kind(Kind::Double);
                mean.push(y.mean_dim([0i64, 2, 3].as_slice(), false, Kind::Double));
                var.push(y.var_dim([0i64, 2, 3].as_slice(), true, false));
            }
        });
        let expected_mean = Tensor::stack(&mean, 0).mean_dim(0, false, Kind::Double);
        let expected_var = Tensor::stack(&var, 0).mean_dim(0, false, Kind::Double);
        let close = |a: &Tensor, b: &Tensor| {
            let diff = (a.to_kind(Kind::Double) - b).abs().max().double_value(&[]);
            assert!(diff < 1e-4, "differs by {diff}");
        };
        close(&model.bn1.running_mean, &expected_mean);
        close(&model.bn1.running_var, &expected_var);
        assert_eq!(model.bn1.momentum, 0.1, "momentum restored");
    }

    #[test]
    fn recalibration_restores_eval_outputs_after_scrambled_statistics() {
        let mut model = ResNet18::new(3, Device::Cpu);
        let calibration = calibration();
        recalibrate_bn(&mut model, &calibration).unwrap();
        let x = calibration.epoch(0).next().unwrap().images;
        let reference = tch::no_grad(|| model.forward(&x, false));
        tch::no_grad(|| {
            for (name, mut t) in model.named_tensors() {
                if name.ends_with("running_mean") || name.ends_with("running_var") {
                    let _ = t.uniform_(0.5, 3.0);
                }
            }
        });
        let scrambled = tch::no_grad(|| model.forward(&x, false));
        assert!(crate::decompose::relative_error(&reference, &scrambled) > 0.1);
        recalibrate_bn(&mut model, &calibration).unwrap();
        let restored = tch::no_grad(|| model.forward(&x, false));
        let err = crate::decompose::relative_error(&reference, &restored);
        assert!(err < 1e-5, "rel. error {err}");
        model.fold_batch_norms(); // nothing factorised: nothing folded, still recalibratable
        assert!(recalibrate_bn(&mut model, &calibration).is_ok());
    }

    #[test]
    fn distillation_loss_is_cross_entropy_plus_the_scaled_kl_to_the_teacher() {
        tch::manual_seed(2);
        let opts = (Kind::Float, Device::Cpu);
        let student = Tensor::randn([6, 5], opts) * 2.0;
        let teacher = Tensor::randn([6, 5], opts) * 2.0;
        let labels = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 0]);
        let value = |t: &Tensor| t.double_value(&[]);
        let loss = |s: &Tensor, t: &Tensor, temp, alpha| {
            value(&distillation_loss(
                s,
                t,
                &labels,
                Distillation::new(temp, alpha).unwrap(),
            ))
        };
        let ce = value(&student.cross_entropy_for_logits(&labels));
        // α = 1 is plain cross-entropy, whatever the teacher says.
        assert!((loss(&student, &teacher, 4.0, 1.0) - ce).abs() < 1e-6);
        // A teacher that agrees with the student adds nothing.
        assert!((loss(&student, &student, 3.0, 0.25) - 0.25 * ce).abs() < 1e-6);
        // At T = 1, α = 0: KL(p_t ‖ p_s) = H(p_t, p_s) − H(p_t), via soft-target cross-entropy.
        let p_t = teacher.softmax(-1, Kind::Float);
        let soft_ce = |logits: &Tensor| {
            let ce =
                logits.cross_entropy_loss::<Tensor>(&p_t, None, tch::Reduction::Mean, -100, 0.0);
            value(&ce)
        };
        let kl = soft_ce(&student) - soft_ce(&teacher);
        assert!((loss(&student, &teacher, 1.0, 0.0) - kl).abs() < 1e-5);
        // T² keeps the soft term's gradient scale: at T = 2 the KL of the softened
        // distributions, times 4.
        let kl2 = {
            let (s2, t2) = (&student / 2.0, &teacher / 2.0);
            let p = t2.softmax(-1, Kind::Float);
            let ce = |l: &Tensor| {
                value(&l.cross_entropy_loss::<Tensor>(&p, None, tch::Reduction::Mean, -100, 0.0))
            };
            ce(&s2) - ce(&t2)
        };
        assert!((loss(&student, &teacher, 2.0, 0.0) - 4.0 * kl2).abs() < 1e-5);
        for bad in ["4", "0,0.5", "4,1.5", "x,y"] {
            assert!(bad.parse::<Distillation>().is_err(), "{bad}");
        }
        assert_eq!(
            "4, 0.5".parse::<Distillation>().unwrap(),
            Distillation::default()
        );
    }

    #[test]
    fn folded_models_and_empty_calibration_sets_are_refused() {
        let mut model = ResNet18::new(3, Device::Cpu);
        let stem = [("conv1".to_string(), (8, 3))].into_iter().collect();
        let policy = crate::CompressionPolicy::new(crate::RankPolicy::Explicit(stem));
        crate::compress_model(&mut model, &policy).unwrap();
        model.fold_batch_norms();
        let err = recalibrate_bn(&mut model, &calibration()).unwrap_err();
        assert!(
            err.to_string().contains("bn1") && err.to_string().contains("folded"),
            "{err}"
        );
        let err = calibration()
            .calibration_set(0, 1, 4)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("calibration images") && err.contains('0'),
            "{err}"
        );
        // More than there are: all of them, each once.
        let all = calibration().calibration_set(100, 1, 5).unwrap();
        assert_eq!((all.len(), all.num_batches()), (12, 3));
    }
}
