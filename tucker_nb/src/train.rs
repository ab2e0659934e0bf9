//! `fine_tune` and `evaluate`: the seed's loop (SGD with momentum and weight decay, StepLR,
//! cross-entropy), with per-epoch metrics as a polars DataFrame, atomic checkpoints after every
//! epoch that a killed run resumes from, and a clear stop on a non-finite loss.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use polars::prelude::*;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::conv::ConvSlot;
use crate::error::{Error, Result};
use crate::io;
use crate::loader::Loader;
use crate::model::ResNet18;
use crate::progress::Progress;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BnMode {
    /// Running statistics used and left alone (eval-mode BN).
    Frozen,
    /// Batch statistics, running statistics updated, affine parameters fixed: what the seed's
    /// `model.train()` does with frozen BN parameters.
    Statistics,
    /// As `Statistics`, and the affine parameters are trained too.
    Train,
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
    pub trainable: Trainable,
    pub bn: BnMode,
    /// Name of this fine-tune in the metrics (`original`, `compressed`, …).
    pub phase: String,
    /// bfloat16 autocast of the forward pass (CUDA only; ignored on CPU).
    pub bf16: bool,
    /// Checkpoints go here after every epoch; `None` writes none.
    #[serde(skip)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Continue from `checkpoint_dir`'s checkpoint when there is one.
    #[serde(skip)]
    pub resume: bool,
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
            trainable: Trainable::Classifier,
            bn: BnMode::Statistics,
            phase: "original".into(),
            bf16: false,
            checkpoint_dir: None,
            resume: false,
        }
    }
}

impl FineTuneConfig {
    /// StepLR's learning rate in (0-based) `epoch`.
    pub fn lr_at(&self, epoch: usize) -> f64 {
        self.lr * self.gamma.powi((epoch / self.step_size.max(1)) as i32)
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
    /// Training images per second.
    pub images_per_s: f64,
}

/// The metrics columns, in order.
pub const METRICS_COLUMNS: [&str; 10] = [
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
];

/// Rows as a DataFrame with [`METRICS_COLUMNS`] (accuracies as fractions).
pub fn metrics_frame(rows: &[EpochMetrics]) -> DataFrame {
    let f = |get: fn(&EpochMetrics) -> f64| rows.iter().map(get).collect::<Vec<f64>>();
    let columns = vec![
        Column::new(
            "phase".into(),
            rows.iter().map(|r| r.phase.clone()).collect::<Vec<_>>(),
        ),
        Column::new(
            "epoch".into(),
            rows.iter().map(|r| r.epoch).collect::<Vec<_>>(),
        ),
        Column::new("lr".into(), f(|r| r.lr)),
        Column::new("train_loss".into(), f(|r| r.train_loss)),
        Column::new("train_acc".into(), f(|r| r.train_acc)),
        Column::new("val_top1".into(), f(|r| r.val_top1)),
        Column::new("val_top5".into(), f(|r| r.val_top5)),
        Column::new("val_loss".into(), f(|r| r.val_loss)),
        Column::new("seconds".into(), f(|r| r.seconds)),
        Column::new("images_per_s".into(), f(|r| r.images_per_s)),
    ];
    DataFrame::new(rows.len(), columns).expect("columns of equal length")
}

/// Writes a DataFrame as CSV, atomically.
pub fn write_frame_csv(frame: &DataFrame, path: &Path) -> Result<()> {
    let mut frame = frame.clone();
    let mut bytes = Vec::new();
    CsvWriter::new(&mut bytes)
        .finish(&mut frame)
        .map_err(|e| Error::file(path, e))?;
    io::write_atomic(path, &bytes)
}

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
    let is_buffer = |n: &str| {
        n.ends_with("running_mean")
            || n.ends_with("running_var")
            || n.ends_with("num_batches_tracked")
    };
    let tucker: Vec<String> = model
        .conv_slots()
        .into_iter()
        .filter(|(_, s)| !matches!(s, ConvSlot::Dense(_)))
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
        .map(|(n, t)| (n, t.shallow_clone()))
        .collect()
}

/// SGD as `torch.optim.SGD(lr, momentum, weight_decay)`: d = g + wd·p; buf = m·buf + d (buf = d at
/// the first step); p -= lr·buf.
struct Sgd {
    params: Vec<(String, Tensor)>,
    momentum: BTreeMap<String, Tensor>,
    mu: f64,
    weight_decay: f64,
}

impl Sgd {
    fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
    }

    fn step(&mut self, lr: f64) {
        tch::no_grad(|| {
            for (name, p) in &mut self.params {
                let grad = p.grad();
                if !grad.defined() {
                    continue;
                }
                let d = grad + p.multiply_scalar(self.weight_decay);
                let buf = match self.momentum.get_mut(name) {
                    Some(buf) => {
                        let _ = buf.g_mul_scalar_(self.mu).g_add_(&d);
                        buf.shallow_clone()
                    }
                    None => {
                        let buf = d.detach().copy();
                        self.momentum.insert(name.clone(), buf.shallow_clone());
                        buf
                    }
                };
                let _ = p.g_sub_(&buf.multiply_scalar(lr));
            }
        });
    }
}

/// The checkpoint's index file; the tensors live in the `weights` file beside it.
#[derive(Debug, Serialize, Deserialize)]
struct CheckpointIndex {
    phase: String,
    epochs_done: usize,
    weights: String,
    config: FineTuneConfig,
    metrics: Vec<EpochMetrics>,
}

const CHECKPOINT_INDEX: &str = "checkpoint.json";
const MOMENTUM_PREFIX: &str = "sgd.momentum.";

fn save_checkpoint(dir: &Path, model: &ResNet18, sgd: &Sgd, index: &CheckpointIndex) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    let mut tensors: Vec<(String, Tensor)> = model
        .named_tensors()
        .into_iter()
        .map(|(n, t)| (n, t.detach().to_device(tch::Device::Cpu).contiguous()))
        .collect();
    for (name, buf) in &sgd.momentum {
        tensors.push((
            format!("{MOMENTUM_PREFIX}{name}"),
            buf.to_device(tch::Device::Cpu).contiguous(),
        ));
    }
    // Weights first, then the index that points at them: the index always names a whole file.
    io::write_safetensors(&dir.join(&index.weights), &tensors)?;
    let json = serde_json::to_vec_pretty(index).expect("serialisable");
    io::write_atomic(&dir.join(CHECKPOINT_INDEX), &json)?;
    for entry in std::fs::read_dir(dir)
        .map_err(|e| Error::file(dir, e))?
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("checkpoint-e")
            && name.ends_with(".safetensors")
            && name != index.weights
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// Loads `dir`'s checkpoint into `model` and the optimiser; returns its index.
fn load_checkpoint(
    dir: &Path,
    model: &mut ResNet18,
    sgd: &mut Sgd,
    config: &FineTuneConfig,
) -> Result<Option<CheckpointIndex>> {
    let index_path = dir.join(CHECKPOINT_INDEX);
    if !index_path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&index_path).map_err(|e| Error::file(&index_path, e))?;
    let index: CheckpointIndex = serde_json::from_str(&text)
        .map_err(|e| Error::file(&index_path, format!("not a tucker_nb checkpoint: {e}")))?;
    let comparable = FineTuneConfig {
        checkpoint_dir: None,
        resume: false,
        ..config.clone()
    };
    if index.config != comparable {
        return Err(Error::file(
            &index_path,
            "was written with other fine-tune settings; resume with the same ones or start afresh without --resume",
        ));
    }
    let weights = dir.join(&index.weights);
    let mut stored: BTreeMap<String, Tensor> = io::read_state_dict(&weights)?.into_iter().collect();
    tch::no_grad(|| -> Result<()> {
        for (name, t) in model.named_tensors_mut() {
            let src = stored.remove(&name).ok_or_else(|| Error::MissingKey {
                path: weights.clone(),
                key: name.clone(),
            })?;
            if src.size() != t.size() {
                return Err(Error::Shape {
                    path: weights.clone(),
                    key: name,
                    found: src.size(),
                    expected: format!("{:?}", t.size()),
                });
            }
            t.copy_(&src);
        }
        Ok(())
    })?;
    let device = model.device();
    for (name, t) in stored {
        if let Some(param) = name.strip_prefix(MOMENTUM_PREFIX) {
            sgd.momentum.insert(param.to_string(), t.to_device(device));
        }
    }
    Ok(Some(index))
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
