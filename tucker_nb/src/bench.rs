//! `tucker-nb bench`: throughput figures, printed as medians over repeats with ratios measured side
//! by side in the same run: the data path (decode, cache load, loader + transforms) against the
//! seed's torchvision pipeline on the same files and cores, and training / evaluation images/s of
//! the original and the compressed model.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use clap::Args;
use tch::{Kind, Tensor};

use crate::compressor::{compress_model, CompressionPolicy, RankPolicy};
use crate::data::{decode_cached, ImageFolder, StorageOptions};
use crate::error::{Error, Result};
use crate::loader::{Loader, Transform};
use crate::model::ResNet18;
use crate::runtime;
use crate::train::{trainable_parameters, BnMode, Trainable};

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// ImageFolder root with train/ (e.g. from `tucker-nb gen-data`).
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value_t = 32)]
    pub image_size: i64,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Batches per model throughput measurement.
    #[arg(long, default_value_t = 5)]
    pub model_batches: usize,
    #[arg(long)]
    pub device: Option<String>,
    /// Also run the seed's torchvision pipeline with this python (e.g. .venv/bin/python).
    #[arg(long)]
    pub seed_python: Option<PathBuf>,
    /// DataLoader workers for the seed's pipeline (the seed uses 4; default: this machine's cores).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Compression ratio for the compressed model.
    #[arg(long, default_value_t = 0.2)]
    pub ratio: f64,
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
fn seed_pipeline(python: &PathBuf, args: &BenchArgs, workers: usize) -> Result<serde_json::Value> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench_seed.py");
    let out = Command::new(python)
        .arg(&script)
        .args([
            "--data",
            &args.data.to_string_lossy(),
            "--size",
            &args.image_size.to_string(),
        ])
        .args([
            "--batch",
            &args.batch_size.to_string(),
            "--workers",
            &workers.to_string(),
        ])
        .args(["--repeats", &args.repeats.to_string()])
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

pub fn run(args: &BenchArgs) -> Result<()> {
    let device = runtime::select_device(args.device.as_deref())?;
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    println!(
        "device {device:?}, image size {}, batch {}, {} repeats (medians)",
        args.image_size, args.batch_size, args.repeats
    );
    let folder = ImageFolder::scan(&args.data.join("train"))?;
    let n = folder.samples.len();

    // Data path: decode without cache, then load from the cache.
    let decode = rate(args.repeats, n, || {
        decode_cached(
            &folder,
            &args.data,
            StorageOptions {
                no_cache: true,
                ..Default::default()
            },
        )
        .map(drop)
    })?;
    let _ = decode_cached(&folder, &args.data, StorageOptions::default())?;
    let cached = rate(args.repeats, n, || {
        decode_cached(&folder, &args.data, StorageOptions::default()).map(drop)
    })?;
    let dataset = decode_cached(&folder, &args.data, StorageOptions::default())?;
    let size = args.image_size;
    let train_loader = Loader::new(
        &dataset,
        args.batch_size,
        Transform::Train { size },
        device,
        true,
    );
    let eval_loader = Loader::new(
        &dataset,
        args.batch_size,
        Transform::Eval { size },
        device,
        true,
    );
    let mut epoch = 0;
    let mut loader_rate = |loader: &Loader| {
        rate(args.repeats, n, || {
            epoch += 1;
            loader.epoch(epoch).for_each(|b| sync(&b.images));
            Ok(())
        })
    };
    let train_rate = loader_rate(&train_loader)?;
    let eval_rate = loader_rate(&eval_loader)?;
    println!("\n== data path ({n} images, {workers} DataLoader workers for torchvision) ==");
    println!(
        "{:<34} {:>14} {:>14} {:>8}",
        "stage", "tucker_nb img/s", "torchvision", "ratio"
    );
    let seed = match &args.seed_python {
        Some(python) => Some(seed_pipeline(python, args, workers)?),
        None => None,
    };
    let theirs = |key: &str| seed.as_ref().and_then(|s| s[key].as_f64());
    for (label, ours, key) in [
        ("decode (no cache) / PIL open", decode, "decode"),
        ("cached load", cached, ""),
        ("train loader + transforms", train_rate, "train_loader"),
        ("eval loader + transforms", eval_rate, "eval_loader"),
    ] {
        match theirs(key) {
            Some(t) => println!("{label:<34} {ours:>14.0} {t:>14.0} {:>7.1}×", ours / t),
            None => println!("{label:<34} {ours:>14.0} {:>14} {:>8}", "-", "-"),
        }
    }

    // Models: training step and evaluation throughput on resident data.
    println!(
        "\n== model ({} batches of {}) ==",
        args.model_batches, args.batch_size
    );
    println!(
        "{:<34} {:>14} {:>14} {:>8}",
        "", "original", "compressed", "ratio"
    );
    let original = ResNet18::new(dataset.classes.len() as i64, device);
    let mut compressed = ResNet18::new(dataset.classes.len() as i64, device);
    tch::no_grad(|| {
        for ((_, a), (_, b)) in compressed
            .named_tensors_mut()
            .into_iter()
            .zip(original.named_tensors())
        {
            a.copy_(b);
        }
    });
    compress_model(
        &mut compressed,
        &CompressionPolicy::new(RankPolicy::ratio(args.ratio)?),
    )?;
    let x = Tensor::randn(
        [args.batch_size as i64, 3, size, size],
        (Kind::Float, device),
    );
    let y = Tensor::randint(
        dataset.classes.len() as i64,
        [args.batch_size as i64],
        (Kind::Int64, device),
    );
    let images = args.batch_size * args.model_batches;
    let train_step = |model: &ResNet18, trainable: Trainable| {
        let params = trainable_parameters(model, trainable, BnMode::Statistics);
        for (_, p) in &params {
            let _ = p.set_requires_grad(true);
        }
        let r = rate(args.repeats, images, || {
            for _ in 0..args.model_batches {
                let loss = model.forward(&x, true).cross_entropy_for_logits(&y);
                loss.backward();
            }
            sync(&params[0].1.grad());
            Ok(())
        });
        for (_, p) in &params {
            let _ = p.set_requires_grad(false);
        }
        r
    };
    let eval_step = |model: &ResNet18| {
        rate(args.repeats, images, || {
            tch::no_grad(|| (0..args.model_batches).for_each(|_| sync(&model.forward(&x, false))));
            Ok(())
        })
    };
    let rows = [
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
    ];
    for (label, a, b) in rows {
        println!("{label:<34} {a:>14.1} {b:>14.1} {:>7.2}×", b / a);
    }
    Ok(())
}
