//! `tucker-nb bench`: throughput figures, printed as medians over repeats with ratios measured side
//! by side in the same run: the data path (decode, cache load, loader + transforms) against the
//! seed's torchvision pipeline on the same files and cores (when there is data), and training /
//! evaluation images/s of the original (dense) model against a compressed one: compressed here with
//! any policy, or any model file `tucker-nb` wrote (folded or not); and the two models' eval
//! forward times timed in alternating turns, the speedup a user gets; and the seconds to
//! compress the dense model, ours against the seed's compressor (`compress.rs`).

mod compress;
mod python;

use std::collections::BTreeMap;
use std::path::PathBuf;

use tch::{Device, Kind, Tensor};

use crate::compress::compress_model;
use crate::compress::latency::{measure_side_by_side, MeasuredSpeed, TimingSettings};
use crate::compress::policy::CompressionPolicy;
use crate::data::{decode_cached, Dataset, ImageFolder, StorageOptions};
use crate::error::{Error, Result};
use crate::experiment::{loader_pair, RunConfig};
use crate::loader::Loader;
use crate::model::ResNet18;
use crate::runtime::{autocast_bf16, synchronize};
use crate::timing::{median, timed};
use crate::train::sgd::Sgd;
use crate::train::{trainable_parameters, BnMode, Trainable};
use python::{seed_pipeline, PyTorchModel};

/// What to measure; the defaults are `tucker-nb bench`'s.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The data (an ImageFolder root with train/, e.g. from `tucker-nb gen-data`; empty: no
    /// data-path figures), image size, batch size, device, classes, and the compressed model's
    /// policy (the seed's ratio 0.2).
    pub run: RunConfig,
    /// A model file to bench against the dense model instead of one compressed with the policy.
    pub model: Option<PathBuf>,
    /// The dense model's weights (random without: timings do not depend on them, a budget's
    /// plan does).
    pub weights: Option<PathBuf>,
    pub repeats: usize,
    /// Batches per model throughput measurement.
    pub model_batches: usize,
    /// Timed rounds of the compression figures (after one untimed round); 0 skips them.
    pub compress_repeats: usize,
    /// A python with torch (e.g. .venv/bin/python): also run the seed's torchvision data pipeline
    /// and PyTorch's model-only figures with it.
    pub seed_python: Option<PathBuf>,
    /// DataLoader workers for the seed's pipeline (the seed uses 4; `None`: this machine's cores).
    pub workers: Option<usize>,
    /// Whether cuDNN's autotuner is on (it is set when the device is chosen; recorded here and
    /// passed to PyTorch's side so both run alike).
    pub cudnn_benchmark: bool,
    /// Also write the figures to this JSON file.
    pub json: Option<PathBuf>,
}

impl BenchConfig {
    /// 32 px, batch 64, 3 repeats of 5 batches, 3 rounds of compression.
    pub fn new(data: impl Into<PathBuf>, device: Device) -> Self {
        let mut run = RunConfig::new(data, "", device);
        run.image_size = 32;
        run.eval_batch_size = run.batch_size;
        Self {
            run,
            model: None,
            weights: None,
            repeats: 3,
            model_batches: 5,
            compress_repeats: 3,
            seed_python: None,
            workers: None,
            cudnn_benchmark: true,
            json: None,
        }
    }
}

/// Median images/s of `f`, which processes `n` images per call: one untimed warm-up call (cuDNN
/// autotuning, allocator, caches), then `repeats` timed calls, each ended by one device sync.
fn rate(repeats: usize, n: usize, device: Device, f: impl FnMut() -> Result<()>) -> Result<f64> {
    Ok(rates_in_turns(repeats, n, device, f, None)?.ours)
}

/// Our median images/s and, with PyTorch's side, its median and the median of the turns' ratios.
struct Turns {
    ours: f64,
    theirs: Option<(f64, f64)>,
}

/// As [`rate`], and with `theirs` (PyTorch's server and the precision and mode to ask it for) one
/// timed call of PyTorch's after each of ours, warm-ups included: both sides' figures come from
/// the same moments of a noisy machine, and each turn gives a ratio.
fn rates_in_turns(
    repeats: usize,
    n: usize,
    device: Device,
    mut f: impl FnMut() -> Result<()>,
    mut theirs: Option<(&mut PyTorchModel, &str, &str)>,
) -> Result<Turns> {
    let mut their_turn = || -> Result<Option<f64>> {
        match &mut theirs {
            Some((model, precision, mode)) => model.timed(precision, mode).map(Some),
            None => Ok(None),
        }
    };
    f()?;
    synchronize(device);
    their_turn()?;
    let (mut ours, mut pytorch, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..repeats.max(1) {
        let (done, seconds) = timed(device, &mut f);
        done?;
        let mine = n as f64 / seconds;
        ours.push(mine);
        if let Some(rate) = their_turn()? {
            pytorch.push(rate);
            ratios.push(mine / rate);
        }
    }
    let theirs = (!pytorch.is_empty()).then(|| (median(pytorch), median(ratios)));
    Ok(Turns {
        ours: median(ours),
        theirs,
    })
}

/// The data path's rates: decode without cache, cached load, and both loaders with transforms.
fn data_path(config: &BenchConfig, folder: &ImageFolder) -> Result<([f64; 4], Dataset)> {
    let n = folder.samples.len();
    let uncached = StorageOptions {
        no_cache: true,
        ..Default::default()
    };
    let decode = rate(config.repeats, n, Device::Cpu, || {
        decode_cached(folder, &config.run.data, uncached).map(drop)
    })?;
    let cached_load = || decode_cached(folder, &config.run.data, StorageOptions::default());
    let _ = cached_load()?;
    let cached = rate(config.repeats, n, Device::Cpu, || cached_load().map(drop))?;
    let dataset = cached_load()?;
    // Both loaders read the training images, as the seed's pipeline benchmark does.
    let (train, eval) = loader_pair(&config.run, &dataset, &dataset);
    let mut epoch = 0;
    let mut loader_rate = |loader: &Loader| {
        rate(config.repeats, n, config.run.device, || {
            epoch += 1;
            loader.epoch(epoch).for_each(drop);
            Ok(())
        })
    };
    let rates = [decode, cached, loader_rate(&train)?, loader_rate(&eval)?];
    Ok((rates, dataset))
}

/// Prints our data-path rates beside the seed pipeline's (when it ran), with ratios.
fn print_data_path(ours: [f64; 4], seed: Option<&serde_json::Value>, n: usize, workers: usize) {
    println!("\n== data path ({n} images, {workers} DataLoader workers for torchvision) ==");
    println!(
        "{:<34} {:>14} {:>14} {:>8}",
        "stage", "tucker_nb img/s", "torchvision", "ratio"
    );
    let stages = [
        ("decode (no cache) / PIL open", "decode"),
        ("cached load", ""),
        ("train loader + transforms", "train_loader"),
        ("eval loader + transforms", "eval_loader"),
    ];
    for ((label, key), ours) in stages.into_iter().zip(ours) {
        match seed.and_then(|s| s[key].as_f64()) {
            Some(t) => println!("{label:<34} {ours:>14.0} {t:>14.0} {:>7.1}×", ours / t),
            None => println!("{label:<34} {ours:>14.0} {:>14} {:>8}", "-", "-"),
        }
    }
}

/// One model-only figure: images/s of a model in one precision and mode, ours and PyTorch's (the
/// same model rebuilt from our file by scripts/bench_model.py, on the same libtorch, device, batch,
/// size and thread count).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelRate {
    /// `original`, `compressed`, or `compressed-folded` (the compressed model with the BN after
    /// each factorised conv folded into its last 1×1, as `compress --fold-bn` writes it for
    /// inference; measured in `eval` only).
    pub model: &'static str,
    /// `fp32` or `bf16` (autocast; CUDA only).
    pub precision: &'static str,
    /// `eval`; `train_all` (forward, loss, backward, SGD step over every parameter); `train_seed`
    /// (the same over the seed's trainable set: fc, plus the factorised convs when compressed).
    pub mode: &'static str,
    pub ours: f64,
    pub pytorch: Option<f64>,
    /// The median over the repeats of ours / PyTorch's, each pair timed in turn (robust to the
    /// machine's drift during the run, which the ratio of the two medians is not).
    pub ratio: Option<f64>,
}

/// The modes a model trains in: all but `eval` ([`ModelRate::mode`]).
const TRAIN_MODES: [&str; 2] = ["train_all", "train_seed"];

/// Our images/s of `model` by mode, with PyTorch's taken in turns when `theirs` is given: `eval`,
/// and with the seed's trainable set also [`TRAIN_MODES`]. Resident random data, one warm-up
/// call, then `repeats` timed calls of `model_batches` batches with one device sync each.
fn our_model_rates(
    config: &BenchConfig,
    model: &ResNet18,
    trainable_seed: Option<Trainable>,
    precision: &'static str,
    mut theirs: Option<&mut PyTorchModel>,
) -> Result<Vec<(&'static str, Turns)>> {
    let run = &config.run;
    let (device, batch, size) = (run.device, run.batch_size as i64, run.image_size);
    let bf16 = precision == "bf16";
    tch::manual_seed(0);
    let x = Tensor::randn([batch, 3, size, size], (Kind::Float, device));
    let y = Tensor::randint(model.num_classes(), [batch], (Kind::Int64, device));
    let images = run.batch_size * config.model_batches;
    let mut turns = |mode, f: &mut dyn FnMut() -> Result<()>| {
        let theirs = theirs.as_deref_mut().map(|t| (t, precision, mode));
        rates_in_turns(config.repeats, images, device, f, theirs)
    };
    let eval = turns("eval", &mut || {
        tch::no_grad(|| {
            for _ in 0..config.model_batches {
                let _ = autocast_bf16(bf16, || model.forward(&x, false));
            }
        });
        Ok(())
    })?;
    let mut rates = vec![("eval", eval)];
    if let Some(seed) = trainable_seed {
        for (mode, trainable) in TRAIN_MODES.into_iter().zip([Trainable::All, seed]) {
            let copy = model.deep_copy();
            let params = trainable_parameters(&copy, trainable, BnMode::Statistics);
            let mut sgd = Sgd::new(params, 0.9, 5e-4)?;
            sgd.parameters()
                .iter()
                .for_each(|p| drop(p.set_requires_grad(true)));
            let rate = turns(mode, &mut || {
                for _ in 0..config.model_batches {
                    let logits =
                        autocast_bf16(bf16, || copy.forward(&x, true)).to_kind(Kind::Float);
                    sgd.backward_step(&logits.cross_entropy_for_logits(&y), 0.01)?;
                }
                Ok(())
            })?;
            rates.push((mode, rate));
        }
    }
    Ok(rates)
}

/// The models a bench compares, in the run's layout: the dense original, and the compressed
/// model unfolded (absent when it came folded from a file) and folded.
struct Contenders {
    original: ResNet18,
    compressed: Option<ResNet18>,
    folded: ResNet18,
    /// What the compressed model is: its policy, or its file.
    what: String,
}

impl Contenders {
    /// The original from `config.weights` (random without), and the compressed model from
    /// `config.model`, or the original compressed with the policy (a latency budget timed at the
    /// bench's batch size and layout).
    fn new(config: &BenchConfig, classes: i64) -> Result<Self> {
        let run = &config.run;
        let size = run.image_size;
        let layout = |mut m: ResNet18| {
            m.set_channels_last(run.fine_tune.channels_last);
            m
        };
        let loaded = match &config.model {
            Some(file) => Some(ResNet18::load(file, None, run.device)?),
            None => None,
        };
        let classes = loaded.as_ref().map_or(classes, ResNet18::num_classes);
        let original = layout(match &config.weights {
            Some(file) => ResNet18::load(file, Some(classes), run.device)?,
            None => ResNet18::new(classes, run.device),
        });
        let (compressed, what) = match (loaded, &config.model) {
            (Some(model), Some(file)) => (layout(model), file.display().to_string()),
            _ => {
                let mut model = original.deep_copy();
                let policy = run.timed(&CompressionPolicy {
                    input_size: [size, size],
                    ..run.policy.clone()
                });
                compress_model(&mut model, &policy)?;
                (layout(model), run.policy.ranks.to_string())
            }
        };
        Ok(if compressed.has_folded_bn() {
            Self {
                original,
                compressed: None,
                folded: compressed,
                what,
            }
        } else {
            let mut folded = compressed.deep_copy();
            folded.fold_batch_norms();
            Self {
                original,
                compressed: Some(compressed),
                folded,
                what,
            }
        })
    }

    /// Each model by its [`ModelRate::model`] name, with the trainable set of the seed's
    /// training where it trains.
    fn each(&self) -> Vec<(&'static str, &ResNet18, Option<Trainable>)> {
        let mut models = vec![("original", &self.original, Some(Trainable::Classifier))];
        if let Some(compressed) = &self.compressed {
            models.push((
                "compressed",
                compressed,
                Some(Trainable::TuckerAndClassifier),
            ));
        }
        models.push(("compressed-folded", &self.folded, None));
        models
    }

    /// Conv multiply-accumulates per image of the original and the compressed model.
    fn macs(&self, size: i64) -> [i64; 2] {
        [&self.original, &self.folded].map(|m| m.conv_macs([size, size]))
    }
}

/// The precisions timed on `device`: fp32, and bf16 autocast on CUDA.
fn precisions(device: Device) -> &'static [&'static str] {
    if device.is_cuda() {
        &["fp32", "bf16"]
    } else {
        &["fp32"]
    }
}

/// Model-only images/s of the [`Contenders`] ([`ModelRate::model`]), ours and (with a python)
/// PyTorch's, in each of [`precisions`].
fn model_rates(config: &BenchConfig, models: &Contenders) -> Result<Vec<ModelRate>> {
    let files = tempfile::tempdir().map_err(|e| Error::file(std::env::temp_dir(), e))?;
    let mut rows = Vec::new();
    for (name, model, seed_trainable) in models.each() {
        let mut theirs = match &config.seed_python {
            Some(python) => {
                let file = files.path().join(format!("{name}.safetensors"));
                model.save(&file)?;
                Some(PyTorchModel::spawn(python, config, &file)?)
            }
            None => None,
        };
        for &precision in precisions(config.run.device) {
            let rates = our_model_rates(config, model, seed_trainable, precision, theirs.as_mut())?;
            for (mode, turns) in rates {
                rows.push(ModelRate {
                    model: name,
                    precision,
                    mode,
                    ours: turns.ours,
                    pytorch: turns.theirs.map(|(rate, _)| rate),
                    ratio: turns.theirs.map(|(_, ratio)| ratio),
                });
            }
        }
    }
    Ok(rows)
}

/// One compressed model's eval forward time against the original's, timed in alternating turns.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SideBySide {
    pub model: &'static str,
    pub precision: &'static str,
    #[serde(flatten)]
    pub speed: MeasuredSpeed,
    pub speedup: f64,
}

/// The eval forward time of each compressed model against the original, one batch per call,
/// `repeats × model_batches` turns each.
fn side_by_side(config: &BenchConfig, models: &Contenders) -> Vec<SideBySide> {
    let run = &config.run;
    let size = run.image_size;
    let turns = config.repeats * config.model_batches;
    let mut rows = Vec::new();
    for (model, contender, _) in models.each().into_iter().skip(1) {
        for &precision in precisions(run.device) {
            let settings = TimingSettings {
                batch_size: run.batch_size as i64,
                bf16: precision == "bf16",
                ..TimingSettings::default()
            };
            let speed =
                measure_side_by_side(&models.original, contender, [size, size], &settings, turns);
            rows.push(SideBySide {
                model,
                precision,
                speed,
                speedup: speed.speedup(),
            });
        }
    }
    rows
}

fn print_side_by_side(rows: &[SideBySide], batch: usize, turns: usize) {
    println!(
        "\n== eval forward, side by side (batch {batch}, {turns} alternating turns, medians) =="
    );
    println!(
        "{:<17} {:<5} {:>12} {:>12} {:>9}",
        "model", "prec", "original ms", "model ms", "speedup"
    );
    for r in rows {
        println!(
            "{:<17} {:<5} {:>12.2} {:>12.2} {:>8.2}×",
            r.model, r.precision, r.speed.before_ms, r.speed.after_ms, r.speedup
        );
    }
}

/// Prints the model-only table: ours and PyTorch's per model, precision and mode, the median of
/// the turns' ratios, and each compressed model against the original.
fn print_model_rates(rows: &[ModelRate]) {
    println!(
        "{:<17} {:<5} {:<11} {:>12} {:>12} {:>8} {:>14}",
        "model", "prec", "mode", "tucker_nb", "pytorch", "ratio", "vs original"
    );
    for r in rows {
        let theirs = r.pytorch.map_or("-".into(), |t| format!("{t:.1}"));
        let ratio = r.ratio.map_or("-".into(), |q| format!("{q:.2}×"));
        let versus = rows
            .iter()
            .find(|o| o.model == "original" && o.precision == r.precision && o.mode == r.mode)
            .filter(|_| r.model != "original")
            .map_or("".into(), |o| format!("{:.2}×", r.ours / o.ours));
        println!(
            "{:<17} {:<5} {:<11} {:>12.1} {:>12} {:>8} {:>14}",
            r.model, r.precision, r.mode, r.ours, theirs, ratio, versus
        );
    }
}

/// Measures and prints everything; with `config.json`, also writes the figures there as JSON.
pub fn run(config: &BenchConfig) -> Result<()> {
    config.run.validate()?;
    crate::error::check_count("repeats", config.repeats)?;
    crate::error::check_count("model batches", config.model_batches)?;
    let workers = config
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let run = &config.run;
    let on_off = |b: bool| if b { "on" } else { "off" };
    println!(
        "device {:?}, image size {}, batch {}, {} repeats (medians), {} threads, cuDNN benchmark {}, \
         channels-last {}",
        run.device,
        run.image_size,
        run.batch_size,
        config.repeats,
        tch::get_num_threads(),
        on_off(config.cudnn_benchmark),
        on_off(run.fine_tune.channels_last),
    );
    let has_data = !run.data.as_os_str().is_empty();
    let (data_path, classes) = if has_data {
        let folder = ImageFolder::scan(&run.data.join("train"))?;
        let (ours, dataset) = data_path(config, &folder)?;
        let seed = match &config.seed_python {
            Some(python) => Some(seed_pipeline(python, config, workers)?),
            None => None,
        };
        print_data_path(ours, seed.as_ref(), folder.samples.len(), workers);
        let ours: BTreeMap<&str, f64> = ["decode", "cached_load", "train_loader", "eval_loader"]
            .into_iter()
            .zip(ours)
            .collect();
        let doc = serde_json::json!({ "tucker_nb": ours, "torchvision": seed, "workers": workers });
        (Some(doc), dataset.classes.len() as i64)
    } else {
        (None, run.num_classes)
    };

    let models = Contenders::new(config, classes)?;
    println!(
        "\n== model alone ({} batches of {}, {}) ==",
        config.model_batches, run.batch_size, models.what
    );
    let rates = model_rates(config, &models)?;
    let [original_macs, compressed_macs] = models.macs(run.image_size);
    println!(
        "conv MACs per image: original {:.3} G, compressed {:.3} G ({:.2}× fewer)",
        original_macs as f64 / 1e9,
        compressed_macs as f64 / 1e9,
        original_macs as f64 / compressed_macs as f64
    );
    print_model_rates(&rates);
    let speeds = side_by_side(config, &models);
    print_side_by_side(
        &speeds,
        run.batch_size,
        config.repeats * config.model_batches,
    );
    let compress_times = if config.compress_repeats > 0 {
        let times = compress::compress_times(config, &models.original)?;
        compress::print_compress_times(&times, config.compress_repeats);
        times
    } else {
        Vec::new()
    };
    if let Some(path) = &config.json {
        let doc = serde_json::json!({
            "device": format!("{:?}", run.device),
            "image_size": run.image_size,
            "batch_size": run.batch_size,
            "model_batches": config.model_batches,
            "repeats": config.repeats,
            "threads": tch::get_num_threads(),
            "cudnn_benchmark": config.cudnn_benchmark,
            "channels_last": run.fine_tune.channels_last,
            "compressed": models.what,
            "policy": config.model.is_none().then(|| run.policy.ranks.to_string()),
            "round_to": run.policy.round_to,
            "conv_macs": { "original": original_macs, "compressed": compressed_macs },
            "data_path": data_path,
            "model": rates,
            "side_by_side": speeds,
            "compress_seconds": compress_times,
        });
        let text = serde_json::to_vec_pretty(&doc).expect("serialisable");
        crate::io::write_atomic(path, &text)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
