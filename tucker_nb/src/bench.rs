//! `tucker-nb bench`: throughput figures, printed as medians over repeats with ratios measured side
//! by side in the same run: the data path (decode, cache load, loader + transforms) against the
//! seed's torchvision pipeline on the same files and cores, and training / evaluation images/s of
//! the original and the compressed model.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::compress::compress_model;
use crate::compress::policy::CompressionPolicy;
use crate::data::{decode_cached, Dataset, ImageFolder, StorageOptions};
use crate::error::{Error, Result};
use crate::experiment::{loader_pair, RunConfig};
use crate::loader::Loader;
use crate::model::ResNet18;
use crate::train::{trainable_parameters, BnMode, Trainable};

/// What to measure; the defaults are `tucker-nb bench`'s.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The data (an ImageFolder root with train/, e.g. from `tucker-nb gen-data`), image size,
    /// batch size, device, and the compressed model's policy (the seed's ratio 0.2).
    pub run: RunConfig,
    pub repeats: usize,
    /// Batches per model throughput measurement.
    pub model_batches: usize,
    /// Also run the seed's torchvision pipeline with this python (e.g. .venv/bin/python).
    pub seed_python: Option<PathBuf>,
    /// DataLoader workers for the seed's pipeline (the seed uses 4; `None`: this machine's cores).
    pub workers: Option<usize>,
}

impl BenchConfig {
    /// 32 px, batch 64, 3 repeats of 5 batches.
    pub fn new(data: impl Into<PathBuf>, device: Device) -> Self {
        let mut run = RunConfig::new(data, "", device);
        run.image_size = 32;
        run.eval_batch_size = run.batch_size;
        Self {
            run,
            repeats: 3,
            model_batches: 5,
            seed_python: None,
            workers: None,
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median images/s of `f`, which processes `n` images per call.
fn rate(repeats: usize, n: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut rates = Vec::new();
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        f()?;
        rates.push(n as f64 / t.elapsed().as_secs_f64());
    }
    Ok(median(rates))
}

fn sync(t: &Tensor) {
    let _ = t.sum(Kind::Double).double_value(&[]);
}

/// Runs the seed's data pipeline (scripts/bench_seed.py) and returns its JSON figures.
fn seed_pipeline(python: &Path, config: &BenchConfig, workers: usize) -> Result<serde_json::Value> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench_seed.py");
    let args = [
        ("--data", config.run.data.to_string_lossy().into_owned()),
        ("--size", config.run.image_size.to_string()),
        ("--batch", config.run.batch_size.to_string()),
        ("--workers", workers.to_string()),
        ("--repeats", config.repeats.to_string()),
    ];
    let out = Command::new(python)
        .arg(&script)
        .args(
            args.iter()
                .flat_map(|(flag, value)| [*flag, value.as_str()]),
        )
        .output()
        .map_err(|e| Error::file(python, e))?;
    if !out.status.success() {
        return Err(Error::file(
            &script,
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last)
        .map_err(|e| Error::file(&script, format!("unexpected output {last:?}: {e}")))
}

/// The data path's rates: decode without cache, cached load, and both loaders with transforms.
fn data_path(config: &BenchConfig, folder: &ImageFolder) -> Result<([f64; 4], Dataset)> {
    let n = folder.samples.len();
    let uncached = StorageOptions {
        no_cache: true,
        ..Default::default()
    };
    let decode = rate(config.repeats, n, || {
        decode_cached(folder, &config.run.data, uncached).map(drop)
    })?;
    let cached_load = || decode_cached(folder, &config.run.data, StorageOptions::default());
    let _ = cached_load()?;
    let cached = rate(config.repeats, n, || cached_load().map(drop))?;
    let dataset = cached_load()?;
    // Both loaders read the training images, as the seed's pipeline benchmark does.
    let (train, eval) = loader_pair(&config.run, &dataset, &dataset);
    let mut epoch = 0;
    let mut loader_rate = |loader: &Loader| {
        rate(config.repeats, n, || {
            epoch += 1;
            loader.epoch(epoch).for_each(|b| sync(&b.images));
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

/// Training-step and evaluation images/s of the original and the compressed model, on one
/// resident batch.
fn model_rates(config: &BenchConfig, classes: i64) -> Result<Vec<(&'static str, f64, f64)>> {
    let run = &config.run;
    let (device, batch, size) = (run.device, run.batch_size as i64, run.image_size);
    let original = ResNet18::new(classes, device);
    let mut compressed = original.deep_copy();
    let policy = CompressionPolicy {
        input_size: [size, size],
        ..run.policy.clone()
    };
    compress_model(&mut compressed, &policy)?;
    let x = Tensor::randn([batch, 3, size, size], (Kind::Float, device));
    let y = Tensor::randint(classes, [batch], (Kind::Int64, device));
    let images = run.batch_size * config.model_batches;
    let train_step = |model: &ResNet18, trainable: Trainable| {
        let params = trainable_parameters(model, trainable, BnMode::Statistics);
        params
            .iter()
            .for_each(|(_, p)| drop(p.set_requires_grad(true)));
        let r = rate(config.repeats, images, || {
            for _ in 0..config.model_batches {
                model
                    .forward(&x, true)
                    .cross_entropy_for_logits(&y)
                    .backward();
            }
            sync(&params[0].1.grad());
            Ok(())
        });
        params
            .iter()
            .for_each(|(_, p)| drop(p.set_requires_grad(false)));
        r
    };
    let eval_step = |model: &ResNet18| {
        rate(config.repeats, images, || {
            tch::no_grad(|| {
                (0..config.model_batches).for_each(|_| sync(&model.forward(&x, false)))
            });
            Ok(())
        })
    };
    Ok(vec![
        (
            "train, seed's trainable (img/s)",
            train_step(&original, Trainable::Classifier)?,
            train_step(&compressed, Trainable::TuckerAndClassifier)?,
        ),
        (
            "train, all parameters (img/s)",
            train_step(&original, Trainable::All)?,
            train_step(&compressed, Trainable::All)?,
        ),
        (
            "eval (img/s)",
            eval_step(&original)?,
            eval_step(&compressed)?,
        ),
    ])
}

/// Measures and prints everything.
pub fn run(config: &BenchConfig) -> Result<()> {
    let workers = config
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    println!(
        "device {:?}, image size {}, batch {}, {} repeats (medians)",
        config.run.device, config.run.image_size, config.run.batch_size, config.repeats
    );
    let folder = ImageFolder::scan(&config.run.data.join("train"))?;
    let (ours, dataset) = data_path(config, &folder)?;
    let seed = match &config.seed_python {
        Some(python) => Some(seed_pipeline(python, config, workers)?),
        None => None,
    };
    print_data_path(ours, seed.as_ref(), folder.samples.len(), workers);

    println!(
        "\n== model ({} batches of {}) ==",
        config.model_batches, config.run.batch_size
    );
    println!(
        "{:<34} {:>14} {:>14} {:>8}",
        "", "original", "compressed", "ratio"
    );
    for (label, a, b) in model_rates(config, dataset.classes.len() as i64)? {
        println!("{label:<34} {a:>14.1} {b:>14.1} {:>7.2}×", b / a);
    }
    Ok(())
}
