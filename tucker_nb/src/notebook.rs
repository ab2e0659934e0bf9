//! What `notebooks/resnet18_tucker.ipynb` calls: one configuration struct with the seed's defaults
//! (CIFAR-100 and torchvision's weights under `data/`, 224 px, 5 + 5 epochs, ratio 0.2, CUDA when
//! present), the smoke profile (`TUCKER_NB_PROFILE=smoke`: a few CPU minutes on generated data),
//! and the closing summary of original vs compressed. `TUCKER_NB_OUT` moves the output folder.

use std::path::{Path, PathBuf};
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::compressor::{CompressionPolicy, Method, RankPolicy};
use crate::data::{DataSource, StorageOptions};
use crate::display::{grid, Html};
use crate::error::{Error, Result};
use crate::loader::{Loader, Transform};
use crate::model::ResNet18;
use crate::runtime;
use crate::synthetic::{self, SyntheticFormat, SyntheticSpec};
use crate::train::{EvalResult, FineTuneConfig, Trainable};

/// Which experiment the notebook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// The seed's experiment on CIFAR-100 with ImageNet weights.
    Full,
    /// A CPU run of a few minutes on a generated dataset, random initial weights.
    Smoke,
}

/// The notebook's configuration; every field can be changed in the config cell.
#[derive(Debug, Clone)]
pub struct NotebookConfig {
    pub profile: Profile,
    pub data: PathBuf,
    /// `None`: random initial weights.
    pub weights: Option<PathBuf>,
    pub num_classes: i64,
    pub image_size: i64,
    pub epochs: usize,
    pub compressed_epochs: usize,
    pub ratio: f64,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    pub device: Device,
    /// Charts, tables and models are written here.
    pub out: PathBuf,
    pub seed: u64,
    /// Budget sweep: fractions of the dense model's conv MACs, one compressed copy each.
    pub sweep_budgets: Vec<f64>,
    /// Multi-stage compression: the conv-MACs budget of each stage, in order.
    pub stage_budgets: Vec<f64>,
    /// Fine-tune epochs of each sweep point and between stages.
    pub short_epochs: usize,
    /// How the budget policies fit the factors; `None`: HOOI (their default).
    pub method: Option<Method>,
}

/// The project's root folder (where `data/` and `runs/` live), known from where the crate was built.
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crate folder has a parent")
        .to_path_buf()
}

fn cifar_location(data: &Path) -> Option<PathBuf> {
    [data.join("cifar-100-binary"), data.join("cifar100")]
        .into_iter()
        .find(|p| DataSource::detect(p).is_ok())
}

impl NotebookConfig {
    /// The seed's experiment when its data and weights are in `data/`, else (or when
    /// `TUCKER_NB_PROFILE=smoke`) the smoke profile; the HTML says which and why.
    pub fn from_env() -> Result<(Self, Html)> {
        runtime::init();
        let root = project_root();
        let data = root.join("data");
        let wanted = std::env::var("TUCKER_NB_PROFILE").unwrap_or_default();
        let weights = data.join("resnet18-f37072fd.pth");
        let mut notes = Vec::new();
        let full = match (wanted.as_str(), cifar_location(&data)) {
            ("smoke", _) => {
                notes.push("TUCKER_NB_PROFILE=smoke: running the smoke profile.".to_string());
                None
            }
            (_, Some(cifar)) if weights.is_file() => Some(cifar),
            (_, cifar) => {
                if cifar.is_none() {
                    notes.push(format!(
                        "CIFAR-100 is not in {} (expected cifar-100-binary/ or cifar100/{{train,val}}/).",
                        data.display()
                    ));
                }
                if !weights.is_file() {
                    notes.push(format!(
                        "torchvision's ResNet18 weights are not at {}.",
                        weights.display()
                    ));
                }
                notes.push(
                    "Fetch both with `scripts/fetch` (about 210 MB, checksum-verified), then restart the kernel. \
                     Running the smoke profile meanwhile."
                        .into(),
                );
                None
            }
        };
        let config = match full {
            Some(cifar) => Self {
                profile: Profile::Full,
                data: cifar,
                weights: Some(weights),
                num_classes: 100,
                image_size: 224,
                epochs: 5,
                compressed_epochs: 5,
                ratio: 0.2,
                batch_size: 64,
                eval_batch_size: 256,
                device: runtime::select_device(None)?,
                out: root.join("runs/notebook"),
                seed: 0,
                sweep_budgets: vec![0.5, 0.33, 0.2, 0.1],
                stage_budgets: vec![0.5, 0.2],
                short_epochs: 1,
                method: None,
            },
            None => Self::smoke(&root)?,
        };
        let mut config = config;
        if let Some(out) = std::env::var_os("TUCKER_NB_OUT") {
            config.out = PathBuf::from(out);
        }
        let plan = format!(
            "{:?} profile on {:?}: {} ({}), {} px, {} + {} epochs, ratio {}, output in {}",
            config.profile,
            config.device,
            config.data.display(),
            config
                .weights
                .as_ref()
                .map_or("random initial weights".into(), |w| w.display().to_string()),
            config.image_size,
            config.epochs,
            config.compressed_epochs,
            config.ratio,
            config.out.display()
        );
        notes.push(plan);
        let html = Html(
            notes
                .iter()
                .map(|n| format!("<p>{}</p>", n.replace('<', "&lt;")))
                .collect(),
        );
        Ok((config, html))
    }

    /// A few CPU minutes on generated data (made once under `data/smoke`).
    pub fn smoke(root: &Path) -> Result<Self> {
        let data = root.join("data/smoke");
        if !data.exists() {
            let spec = SyntheticSpec {
                classes: 10,
                train_per_class: 24,
                val_per_class: 10,
                size: 32,
                seed: 0,
            };
            synthetic::generate(&data, spec, SyntheticFormat::ImageFolder)?;
        }
        Ok(Self {
            profile: Profile::Smoke,
            data,
            weights: None,
            num_classes: 10,
            image_size: 32,
            epochs: 2,
            compressed_epochs: 2,
            ratio: 0.2,
            batch_size: 16,
            eval_batch_size: 64,
            device: Device::Cpu,
            out: root.join("runs/notebook-smoke"),
            seed: 0,
            sweep_budgets: vec![0.5, 0.25],
            stage_budgets: vec![0.5, 0.25],
            short_epochs: 1,
            // Random weights have flat spectra, on which HOOI iterates for minutes.
            method: Some(Method::Hosvd),
        })
    }

    /// Train and validation loaders (decoded once; later calls read the cache).
    pub fn loaders(&self) -> Result<(Loader, Loader)> {
        std::fs::create_dir_all(&self.out).map_err(|e| Error::file(&self.out, e))?;
        let (train, val) = DataSource::detect(&self.data)?.load_both(StorageOptions::default())?;
        let size = self.image_size;
        Ok((
            Loader::new(
                &train,
                self.batch_size,
                Transform::Train { size },
                self.device,
                true,
            )
            .with_seed(self.seed),
            Loader::new(
                &val,
                self.eval_batch_size,
                Transform::Eval { size },
                self.device,
                true,
            ),
        ))
    }

    /// The starting model: the weights with a fresh `fc` for `num_classes`, as the seed.
    pub fn model(&self) -> Result<ResNet18> {
        tch::manual_seed(self.seed as i64);
        match &self.weights {
            Some(w) => ResNet18::load(w, Some(self.num_classes), self.device),
            None => Ok(ResNet18::new(self.num_classes, self.device)),
        }
    }

    /// The seed's fine-tune of the original model: fc only.
    pub fn fine_tune_original(&self) -> FineTuneConfig {
        FineTuneConfig {
            epochs: self.epochs,
            phase: "original".into(),
            trainable: Trainable::Classifier,
            ..Default::default()
        }
    }

    /// The seed's fine-tune of the compressed model: Tucker factors and fc.
    pub fn fine_tune_compressed(&self) -> FineTuneConfig {
        FineTuneConfig {
            epochs: self.compressed_epochs,
            phase: "compressed".into(),
            trainable: Trainable::TuckerAndClassifier,
            ..Default::default()
        }
    }

    /// A budget of `fraction` of the dense model's conv MACs at the notebook's image size.
    pub fn budget_policy(&self, fraction: f64) -> Result<CompressionPolicy> {
        Ok(CompressionPolicy {
            ranks: RankPolicy::parse(&format!("budget-macs:{fraction}"))?,
            input_size: [self.image_size, self.image_size],
            method: self.method,
            round_to: None,
        })
    }

    /// The sweep's policies, one per entry of `sweep_budgets`.
    pub fn sweep_policies(&self) -> Result<Vec<CompressionPolicy>> {
        self.sweep_budgets
            .iter()
            .map(|&b| self.budget_policy(b))
            .collect()
    }

    /// A short fine-tune (`short_epochs`) of the factorised convs and fc, named `phase`.
    pub fn fine_tune_short(&self, phase: &str) -> FineTuneConfig {
        FineTuneConfig {
            epochs: self.short_epochs,
            phase: phase.into(),
            ..self.fine_tune_compressed()
        }
    }

    pub fn policy(&self) -> Result<CompressionPolicy> {
        Ok(CompressionPolicy {
            ranks: RankPolicy::ratio(self.ratio)?,
            input_size: [self.image_size, self.image_size],
            ..Default::default()
        })
    }
}

/// One model's line in the closing summary.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSummary {
    pub label: String,
    pub top1: f64,
    pub top5: f64,
    pub params: i64,
    pub conv_macs: i64,
    /// Median batch-1 forward time in milliseconds.
    pub latency_ms: f64,
}

/// Median time of a batch-1 forward pass at `size` px, in milliseconds (3 warm-ups, 20 runs).
pub fn latency_ms(model: &ResNet18, size: i64) -> f64 {
    let device = model.device();
    let x = Tensor::randn([1, 3, size, size], (Kind::Float, device));
    let mut times = Vec::new();
    tch::no_grad(|| {
        for i in 0..23 {
            let t = Instant::now();
            let _ = model.forward(&x, false).sum(Kind::Float).double_value(&[]);
            if i >= 3 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    });
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

/// Accuracy, size, cost and latency of `model` as evaluated in `eval`.
pub fn summarize(
    label: &str,
    model: &ResNet18,
    eval: &EvalResult,
    image_size: i64,
) -> ModelSummary {
    ModelSummary {
        label: label.into(),
        top1: eval.top1,
        top5: eval.top5,
        params: model.num_params(),
        conv_macs: model.conv_macs([image_size, image_size]),
        latency_ms: latency_ms(model, image_size),
    }
}

/// The closing table: one row per model, ratios against the first.
pub fn summary_table(rows: &[ModelSummary]) -> Html {
    let base = rows.first();
    let ratio = |a: f64, b: Option<f64>| b.map_or(String::new(), |b| format!(" ({:.2}×)", a / b));
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.label.clone(),
                format!("{:.2} %", r.top1 * 100.0),
                format!("{:.2} %", r.top5 * 100.0),
                format!(
                    "{:.2} M{}",
                    r.params as f64 / 1e6,
                    ratio(r.params as f64, base.map(|b| b.params as f64))
                ),
                format!(
                    "{:.1} M{}",
                    r.conv_macs as f64 / 1e6,
                    ratio(r.conv_macs as f64, base.map(|b| b.conv_macs as f64))
                ),
                format!(
                    "{:.2} ms{}",
                    r.latency_ms,
                    ratio(r.latency_ms, base.map(|b| b.latency_ms))
                ),
            ]
        })
        .collect();
    grid(
        &[
            "model",
            "top-1",
            "top-5",
            "params",
            "conv MACs",
            "latency (batch 1)",
        ],
        &body,
    )
}
