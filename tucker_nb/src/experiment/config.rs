//! A run's settings ([`RunConfig`]), its fingerprint ([`RunFingerprint`]: what `--resume` checks)
//! and its output folder's preparation.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;
use tch::Device;

use crate::compress::latency::TimingSettings;
use crate::compress::policy::CompressionPolicy;
use crate::data::{Dataset, StorageOptions};
use crate::error::{check, check_count, check_image_side, Error, Result};
use crate::io;
use crate::lock::OutputLock;
use crate::train::{FineTuneConfig, Recipe, Trainable};

/// Settings of a run; defaults mirror the seed (224 px, 5 + 5 epochs, batch 64, ratio 0.2).
///
/// Serialised, it is what determines the run's results (the [`RunFingerprint`]): the fields that
/// do not (where the data and weights lie, the device, the output folder and how it is used)
/// are skipped; the data and weights enter the fingerprint by their content.
#[derive(Debug, Clone, Serialize)]
pub struct RunConfig {
    /// ImageFolder root (`train/`, `val/`) or CIFAR-100 binary folder.
    #[serde(skip)]
    pub data: PathBuf,
    /// torchvision `.pth` or safetensors; `None` starts from random weights.
    #[serde(skip)]
    pub weights: Option<PathBuf>,
    pub num_classes: i64,
    pub image_size: i64,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    /// Fine-tune settings (the original model's epochs; `phase`, `trainable` are set per phase).
    #[serde(flatten)]
    pub fine_tune: FineTuneConfig,
    /// Epochs of the compressed model's fine-tune.
    pub compressed_epochs: usize,
    pub policy: CompressionPolicy,
    /// Multi-stage (MUSCO-style) compression: after `policy`, fine-tune `stage_epochs` epochs,
    /// then compress further with each of these in turn (data-driven policies refactorise the
    /// already factorised layers; budgets are fractions of the dense model's cost).
    pub stages: Vec<CompressionPolicy>,
    pub stage_epochs: usize,
    #[serde(skip)]
    pub device: Device,
    #[serde(skip)]
    pub out: PathBuf,
    /// Continue the run in `out` (its fingerprint must match, [`RunFingerprint`]).
    #[serde(skip)]
    pub resume: bool,
    /// Start afresh in a non-empty `out` (its checkpoints are ignored, its outputs replaced).
    #[serde(skip)]
    pub force: bool,
    pub seed: u64,
    /// Use only the first N training / validation images (quick runs).
    pub train_limit: Option<usize>,
    pub val_limit: Option<usize>,
    pub storage: StorageOptions,
    /// Keep the uint8 images on the device (no host→device copies per batch).
    #[serde(skip)]
    pub resident_data: bool,
    /// Recalibrate the BN statistics right after each compression ([`crate::train::recalibrate_bn`]).
    pub recalibrate_bn: bool,
    /// Training images (after a seeded shuffle, eval transform) the BN recalibration sees.
    pub calib_images: usize,
    /// How the compressed model is fine-tuned (after compression, between stages, in a sweep).
    pub recipe: Recipe,
    /// Training images held out (a seeded draw) for a recipe that chooses its epoch on them; no
    /// fine-tune of the run trains on them. `None`: [`Self::held_out_count`]'s default.
    pub held_out_images: Option<usize>,
    /// An ImageFolder of class folders (the training set's classes) the recipe chooses its epoch
    /// on instead of held-out training images, for weights that were trained on every training
    /// image (their score on a slice of them says little); every training image is then trained
    /// on. Enters the fingerprint by its content.
    #[serde(skip)]
    pub held_out_data: Option<PathBuf>,
}

/// The default share of the training images held out for epoch selection.
pub const HELD_OUT_SHARE: f64 = 0.05;

impl RunConfig {
    pub fn new(data: impl Into<PathBuf>, out: impl Into<PathBuf>, device: Device) -> Self {
        Self {
            data: data.into(),
            weights: None,
            num_classes: 100,
            image_size: 224,
            batch_size: 64,
            eval_batch_size: 256,
            fine_tune: FineTuneConfig::default(),
            compressed_epochs: 5,
            policy: CompressionPolicy::default(),
            stages: Vec::new(),
            stage_epochs: 1,
            device,
            out: out.into(),
            resume: false,
            force: false,
            seed: 0,
            train_limit: None,
            val_limit: None,
            storage: StorageOptions::default(),
            resident_data: true,
            recalibrate_bn: true,
            calib_images: 1024,
            recipe: Recipe::default(),
            held_out_images: None,
            held_out_data: None,
        }
    }

    /// How many of `train_images` the recipe holds out: `held_out_images`, else
    /// [`HELD_OUT_SHARE`] of them, at least one training batch and at most a quarter of them;
    /// `None` when the recipe selects nothing or on [`Self::held_out_data`]. Fails unless
    /// 1 ≤ the count < `train_images`.
    pub fn held_out_count(&self, train_images: usize) -> Result<Option<usize>> {
        if !self.recipe.selects_on_held_out() || self.held_out_data.is_some() {
            return Ok(None);
        }
        let n = self.held_out_images.unwrap_or_else(|| {
            let share = (train_images as f64 * HELD_OUT_SHARE).round() as usize;
            share.max(self.batch_size).min(train_images / 4).max(1)
        });
        if n == 0 || n >= train_images {
            return Err(Error::value(
                "held-out images",
                format!(
                    "{n} (must be ≥ 1 and fewer than the {train_images} training images of {})",
                    self.data.display()
                ),
            ));
        }
        Ok(Some(n))
    }

    /// Checks what can be checked before any work: the policies (a later stage must be able to
    /// compress an already compressed model), sizes and classes.
    pub fn validate(&self) -> Result<()> {
        check_image_side("image size", self.image_size)?;
        self.policy.validate()?;
        for stage in &self.stages {
            stage.validate_as_stage()?;
        }
        if let Some(side) = self.storage.size {
            check_image_side("storage size", side as i64)?;
        }
        check(
            self.num_classes >= 1,
            "num_classes",
            self.num_classes,
            "≥ 1",
        )?;
        for (what, value) in [
            ("batch size", self.batch_size),
            ("eval batch size", self.eval_batch_size),
            ("calibration images", self.calib_images),
        ] {
            check_count(what, value)?;
        }
        for (what, limit) in [
            ("train limit", self.train_limit),
            ("val limit", self.val_limit),
        ] {
            if let Some(n) = limit {
                check_count(what, n)?;
            }
        }
        if let Some(n) = self.held_out_images {
            check_count("held-out images", n)?;
        }
        if let Some(dir) = &self.held_out_data {
            if let Some(n) = self.held_out_images {
                return Err(Error::value(
                    "held-out images",
                    format!(
                        "{n} given with held-out data {}: the held-out images are that folder's",
                        dir.display()
                    ),
                ));
            }
            if !self.recipe.selects_on_held_out() {
                return Err(Error::value(
                    "held-out data",
                    format!(
                        "{} given with the seed's recipe, which chooses no epoch on held-out images",
                        dir.display()
                    ),
                ));
            }
        }
        self.fine_tune.validate()
    }

    /// The fine-tune of one phase: `epochs` of `trainable`, checkpointed in `out/PHASE`.
    pub fn phase(&self, phase: &str, epochs: usize, trainable: Trainable) -> FineTuneConfig {
        FineTuneConfig {
            epochs,
            phase: phase.into(),
            trainable,
            checkpoint_dir: Some(self.out.join(phase)),
            resume: self.resume,
            ..self.fine_tune.clone()
        }
    }

    /// The seed's fine-tune of the original model: fc only (never distilled: there is no
    /// teacher yet).
    pub fn original_phase(&self) -> FineTuneConfig {
        FineTuneConfig {
            distill: None,
            epoch_recalibration: None,
            ..self.phase("original", self.fine_tune.epochs, Trainable::Classifier)
        }
    }

    /// The fine-tune of the compressed model: the factorised convs and fc, as the recipe trains
    /// them (the seed's: distilled from the model before compression only when
    /// `fine_tune.distill` says so).
    pub fn compressed_phase(&self) -> FineTuneConfig {
        self.recipe.apply(self.phase(
            "compressed",
            self.compressed_epochs,
            Trainable::TuckerAndClassifier,
        ))
    }

    /// The short fine-tunes between compression stages, as the recipe trains (phase `stage`,
    /// checkpointed in `out`).
    pub fn stage_phase(&self) -> FineTuneConfig {
        let seed = FineTuneConfig {
            checkpoint_dir: Some(self.out.clone()),
            // The seed's flow distils only the final fine-tune.
            distill: None,
            ..self.phase("stage", self.stage_epochs, Trainable::TuckerAndClassifier)
        };
        match self.recipe {
            Recipe::Seed => seed,
            recipe => recipe.apply(FineTuneConfig {
                distill: self.fine_tune.distill,
                ..seed
            }),
        }
    }

    /// The first policy and the further stages, in order, timed as this run evaluates
    /// ([`Self::timed`]).
    pub fn all_stages(&self) -> Vec<CompressionPolicy> {
        std::iter::once(&self.policy)
            .chain(&self.stages)
            .map(|p| self.timed(p))
            .collect()
    }

    /// `policy` with a latency budget measured as this run evaluates: its eval batch size, its
    /// dtype (bf16 or not), BNs unfolded (a run's models train on); the cache as `policy` says.
    pub fn timed(&self, policy: &CompressionPolicy) -> CompressionPolicy {
        CompressionPolicy {
            timing: TimingSettings {
                batch_size: self.eval_batch_size as i64,
                bf16: self.fine_tune.bf16,
                fold_bn: false,
                cache: policy.timing.cache.clone(),
            },
            ..policy.clone()
        }
    }
}

/// The file in a run folder that records its [`RunFingerprint`].
pub const FINGERPRINT_FILE: &str = "run.json";

/// Everything that determines a run's results, field by field (values as text): the data's
/// content key and classes, the weights' SHA-256, and every serialised field of the
/// [`RunConfig`] (its fine-tune settings among them, unprefixed; nested settings as
/// `policy.ranks`, `storage.size`, …), so a field added to a config enters it with no other edit.
/// `run` writes it into its folder; `--resume` continues only a run whose fingerprint is the
/// same, and names the first field that differs.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct RunFingerprint(pub BTreeMap<String, String>);

/// The fingerprint field that says how it was made; fingerprints before it had none.
const FINGERPRINT_FORMAT: (&str, &str) = ("fingerprint_format", "2");

impl RunFingerprint {
    /// `held_out`: the [`RunConfig::held_out_data`] images, when there are.
    pub fn new(
        config: &RunConfig,
        train: &Dataset,
        val: &Dataset,
        held_out: Option<&Dataset>,
    ) -> Result<Self> {
        let weights = match &config.weights {
            Some(path) => {
                let bytes = std::fs::read(path).map_err(|e| Error::file(path, e))?;
                use sha2::Digest;
                sha2::Sha256::digest(&bytes)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect()
            }
            None => "none (random initialisation)".to_string(),
        };
        let mut data = format!("train {}, val {}", train.key, val.key);
        if let Some(held_out) = held_out {
            data += &format!(", held out {}", held_out.key);
        }
        Ok(Self::of(config, data, train.classes.join(","), weights))
    }

    /// The fingerprint of `config` over data with content key `data` and `classes`, and weights
    /// with digest `weights`.
    pub fn of(config: &RunConfig, data: String, classes: String, weights: String) -> Self {
        let mut fields = BTreeMap::new();
        let value = serde_json::to_value(config).expect("a run config serialises");
        flatten("", &value, &mut fields);
        let (format_key, format) = FINGERPRINT_FORMAT;
        for (key, value) in [
            ("data", data),
            ("classes", classes),
            ("weights", weights),
            (format_key, format.to_string()),
        ] {
            fields.insert(key.to_string(), value);
        }
        Self(fields)
    }

    /// Whether this fingerprint was made as [`Self::of`] makes them now.
    fn is_current_format(&self) -> bool {
        let (key, format) = FINGERPRINT_FORMAT;
        self.0.get(key).map(String::as_str) == Some(format)
    }

    /// The first field whose value differs from `other`'s: (field, ours, theirs).
    pub fn first_difference<'a>(&'a self, other: &'a Self) -> Option<(&'a str, &'a str, &'a str)> {
        let missing = "(absent)";
        self.0
            .keys()
            .chain(other.0.keys())
            .map(|k| {
                let get = |f: &'a Self| f.0.get(k).map_or(missing, String::as_str);
                (k.as_str(), get(self), get(other))
            })
            .find(|(_, a, b)| a != b)
    }
}

/// The leaves of `value` under dotted keys (`prefix.key`): text as it is, other scalars and
/// arrays as JSON.
fn flatten(prefix: &str, value: &serde_json::Value, into: &mut BTreeMap<String, String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                let key = match prefix {
                    "" => key.clone(),
                    _ => format!("{prefix}.{key}"),
                };
                flatten(&key, v, into);
            }
        }
        serde_json::Value::String(text) => {
            into.insert(prefix.to_string(), text.clone());
        }
        other => {
            into.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// Makes `out` ready for a run: created when missing and locked for this run (a second writer
/// is refused at once); a non-empty one is refused unless the run resumes (or is forced to start
/// afresh over it). The lock lasts as long as the returned guard.
pub fn prepare_run_folder(config: &RunConfig) -> Result<OutputLock> {
    let out = &config.out;
    std::fs::create_dir_all(out).map_err(|e| Error::file(out, e))?;
    let lock = OutputLock::acquire(out)?;
    let used = std::fs::read_dir(out)
        .map_err(|e| Error::file(out, e))?
        .flatten()
        .any(|e| !e.file_name().to_string_lossy().starts_with('.'));
    if used && !config.resume && !config.force {
        return Err(Error::file(
            out,
            "is not empty: pass --resume to continue the run in it, --force to start afresh \
             over it, or choose another --out",
        ));
    }
    Ok(lock)
}

/// Records `fingerprint` in `out`; with `resume`, first checks it against the one there.
pub fn check_fingerprint(config: &RunConfig, fingerprint: &RunFingerprint) -> Result<()> {
    let path = config.out.join(FINGERPRINT_FILE);
    if config.resume && path.exists() {
        let text = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, e))?;
        let recorded: RunFingerprint = serde_json::from_str(&text)
            .map_err(|e| Error::file(&path, format!("not a run fingerprint: {e}")))?;
        if !recorded.is_current_format() {
            return Err(Error::file(
                &path,
                "was written by an earlier tucker-nb, whose fingerprint cannot be checked against \
                 this one: start afresh (--force, or another --out)",
            ));
        }
        if let Some((field, now, then)) = fingerprint.first_difference(&recorded) {
            return Err(Error::file(
                &path,
                format!(
                    "--resume with another {field}: the run in this folder has {then}, this one \
                     {now}; resume with the same settings or start afresh in another folder"
                ),
            ));
        }
        return Ok(());
    }
    if config.resume && config.out.join("original").exists() {
        return Err(Error::file(
            &path,
            "missing: the run in this folder cannot be checked to be the same; start afresh",
        ));
    }
    let json = serde_json::to_vec_pretty(fingerprint).expect("serialisable");
    io::write_atomic(&path, &json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn fingerprint(config: &RunConfig) -> RunFingerprint {
        RunFingerprint::of(config, "data".into(), "a,b".into(), "weights".into())
    }

    #[test]
    fn every_fine_tune_field_enters_the_fingerprint_without_being_listed() {
        let config = RunConfig::new("data", "out", Device::Cpu);
        let ours = fingerprint(&config);
        let Value::Object(fields) = serde_json::to_value(&config.fine_tune).unwrap() else {
            unreachable!("a struct serialises to an object")
        };
        assert!(fields.len() >= 13, "{fields:?}");
        for (field, value) in &fields {
            assert!(ours.0.contains_key(field.as_str()), "{field} is missing");
            // Change the field in the serialised config, read it back: the fingerprint must
            // name that field as the difference.
            let changed = match value {
                Value::Bool(b) => Value::Bool(!b),
                Value::Number(n) if n.is_u64() => Value::from(n.as_u64().unwrap() + 1),
                Value::Number(n) => Value::from(n.as_f64().unwrap() * 2.0 + 1.0),
                Value::Null if field == "max_batches" => Value::from(3),
                _ => continue,
            };
            let mut json = serde_json::to_value(&config.fine_tune).unwrap();
            json[field] = changed;
            let other = RunConfig {
                fine_tune: serde_json::from_value(json).unwrap(),
                ..config.clone()
            };
            let theirs = fingerprint(&other);
            let difference = ours.first_difference(&theirs).map(|d| d.0);
            assert_eq!(difference, Some(field.as_str()), "{field}");
        }
    }

    #[test]
    fn where_the_data_lies_and_the_device_are_not_part_of_the_run() {
        let config = RunConfig::new("data", "out", Device::Cpu);
        let elsewhere = RunConfig {
            data: "/elsewhere".into(),
            out: "other-out".into(),
            resident_data: false,
            ..config.clone()
        };
        assert_eq!(fingerprint(&config), fingerprint(&elsewhere));
        let policy = RunConfig {
            policy: CompressionPolicy {
                round_to: Some(8),
                ..config.policy.clone()
            },
            ..config.clone()
        };
        let (ours, theirs) = (fingerprint(&config), fingerprint(&policy));
        let difference = ours.first_difference(&theirs).unwrap();
        assert_eq!(difference.0, "policy.round_to");
    }

    #[test]
    fn a_fingerprint_from_before_this_format_is_refused_in_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = RunConfig::new("data", dir.path(), Device::Cpu);
        // What an earlier release wrote: a hand-listed field set, no format field.
        let old = r#"{"batch_size": "64", "lr": "0.01", "seed": "0", "policy": "Ratio(0.2)"}"#;
        std::fs::write(dir.path().join(FINGERPRINT_FILE), old).unwrap();
        config.resume = true;
        let err = check_fingerprint(&config, &fingerprint(&config))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("run.json") && err.contains("earlier tucker-nb"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}
