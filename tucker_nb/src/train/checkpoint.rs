//! Per-epoch checkpoints: the model and the optimiser's momentum as safetensors, and an index that
//! names them, written weights first so the index always points at a whole file.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::config::{EpochMetrics, FineTuneConfig};
use super::select::SelectionState;
use super::sgd::Sgd;
use crate::error::{Error, Result};
use crate::io;
use crate::model::ResNet18;

/// The checkpoint's index file; the tensors live in the `weights` file beside it.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct CheckpointIndex {
    pub phase: String,
    pub epochs_done: usize,
    pub weights: String,
    pub config: FineTuneConfig,
    pub metrics: Vec<EpochMetrics>,
    /// The epoch selection's state, when the fine-tune selects on held-out images (its best
    /// model's tensors are in `weights` under [`BEST_PREFIX`]).
    #[serde(default)]
    pub selection: Option<SelectionState>,
}

const CHECKPOINT_INDEX: &str = "checkpoint.json";
const MOMENTUM_PREFIX: &str = "sgd.momentum.";
const BEST_PREFIX: &str = "best.";

/// Writes the checkpoint: the model, the optimiser's momentum and, when selecting, the best
/// model so far (`best`, by name).
pub(super) fn save_checkpoint(
    dir: &Path,
    model: &ResNet18,
    sgd: &Sgd,
    index: &CheckpointIndex,
    best: Option<&[(String, Tensor)]>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    let mut tensors: Vec<(String, Tensor)> = model
        .named_tensors()
        .into_iter()
        .map(|(n, t)| (n, t.detach().to_device(tch::Device::Cpu).contiguous()))
        .collect();
    for (name, buf) in sgd.momentum_by_name() {
        tensors.push((
            format!("{MOMENTUM_PREFIX}{name}"),
            buf.to_device(tch::Device::Cpu).contiguous(),
        ));
    }
    for (name, t) in best.unwrap_or_default() {
        tensors.push((
            format!("{BEST_PREFIX}{name}"),
            t.to_device(tch::Device::Cpu).contiguous(),
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

/// Loads `dir`'s checkpoint into `model` and the optimiser; returns its index and, when it
/// selects, the best model's tensors (in `model.named_tensors()` order).
pub(super) fn load_checkpoint(
    dir: &Path,
    model: &mut ResNet18,
    sgd: &mut Sgd,
    config: &FineTuneConfig,
) -> Result<Option<(CheckpointIndex, Vec<Tensor>)>> {
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
        for (name, mut t) in model.named_tensors() {
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
    let mut best = Vec::new();
    if index.selection.is_some() {
        for (name, t) in model.named_tensors() {
            let key = format!("{BEST_PREFIX}{name}");
            let src = stored.remove(&key).ok_or_else(|| Error::MissingKey {
                path: weights.clone(),
                key,
            })?;
            best.push(src.to_device(t.device()).to_kind(t.kind()));
        }
    }
    let momentum = stored
        .into_iter()
        .filter_map(|(name, t)| Some((name.strip_prefix(MOMENTUM_PREFIX)?.to_string(), t)))
        .collect();
    sgd.set_momentum(momentum, &weights)?;
    Ok(Some((index, best)))
}
