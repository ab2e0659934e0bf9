//! `tucker-nb`: the command-line face of the tucker_nb crate. Each subcommand's arguments convert
//! to the library's configuration, which validates them; each subcommand is one function.

mod args;

use std::path::Path;
use std::process::ExitCode;

use args::*;
use tch::Device;
use tucker_nb::bench::{self, BenchConfig};
use tucker_nb::compress::calibrate::{activation_moments, Moments};
use tucker_nb::compress::compress_model_fitted;
use tucker_nb::compress::latency::check_forecast;
use tucker_nb::data::{self, Split};
use tucker_nb::experiment::{self, RunConfig};
use tucker_nb::export::{self, ExportConfig};
use tucker_nb::lock::OutputLock;
use tucker_nb::synthetic::{self, SyntheticSpec};
use tucker_nb::train;
use tucker_nb::{
    runtime, CompressionPolicy, DataSource, Fit, Loader, Outputs, RankPolicy, ResNet18,
    StorageOptions, Transform,
};

fn main() -> ExitCode {
    let parsed = args::command()
        .try_get_matches()
        .and_then(|m| <Cli as clap::FromArgMatches>::from_arg_matches(&m));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // One readable line, as for the library's errors.
            let text = e.to_string();
            let line: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.is_empty())
                .collect();
            eprintln!("{}", line.join(" "));
            return ExitCode::from(2);
        }
    };
    runtime::init();
    let result = match cli.command {
        Command::Compress(args) => compress(args),
        Command::Run(args) => run(args),
        Command::Sweep(args) => sweep(args),
        Command::Evaluate(args) => evaluate(args),
        Command::GenData(args) => gen_data(args),
        Command::ConvertCifar { cifar, out } => convert_cifar(&cifar, &out),
        Command::Bench(args) => bench_command(args),
        Command::Decode(args) => decode(args),
        Command::Export(args) => export(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Fails early, before any work, when `path` is a folder or its folder does not exist.
fn check_output(path: &Path) -> anyhow::Result<()> {
    if path.is_dir() {
        anyhow::bail!("{}: is a folder, not a file to write", path.display());
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        anyhow::bail!(
            "{}: folder {} does not exist",
            path.display(),
            dir.display()
        );
    }
    Ok(())
}

fn compress(args: CompressArgs) -> anyhow::Result<()> {
    let device = args.device.device()?;
    let image_size = args
        .image_size
        .unwrap_or(CompressionPolicy::default().input_size[0]);
    let mut policy = args.fit.policy(args.ranks.ranks()?, image_size);
    set(&mut policy.timing.batch_size, args.batch_size);
    policy.timing.bf16 = args.bf16;
    policy.timing.fold_bn = args.fold_bn;
    policy.validate()?;
    if args.out.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        anyhow::bail!(
            "{}: the output must be a .safetensors file",
            args.out.display()
        );
    }
    check_output(&args.out)?;
    let _lock = OutputLock::acquire(&args.out)?;
    let _report_lock = match &args.report {
        Some(r) => {
            check_output(r)?;
            Some(OutputLock::acquire(r)?)
        }
        None => None,
    };
    let mut model = ResNet18::load(&args.weights, args.num_classes, device)?;
    model.set_channels_last(!args.no_channels_last);
    let moments = match (&args.calib_data, policy.fit()) {
        (Some(dir), Fit::Data) => Some(calibration_moments(&model, dir, &args)?),
        _ => None,
    };
    let before = policy.is_timed().then(|| model.deep_copy());
    let mut report = compress_model_fitted(&mut model, &policy, moments.as_ref())?;
    if args.fold_bn {
        let folded = model.fold_batch_norms();
        println!("folded {} BNs into their factorised convs", folded.len());
    }
    if let Some(mut before) = before {
        if args.fold_bn {
            before.fold_batch_norms(); // as the plan priced it (only factorised slots fold)
        }
        check_forecast(&mut report, &before, &model, &policy);
    }
    // The model and its report are committed together, or neither.
    let mut outputs = Outputs::new();
    outputs.write_with(&args.out, |tmp| model.save(tmp))?;
    if let Some(path) = &args.report {
        outputs.write_with(path, |tmp| report.write_csv(tmp))?;
    }
    outputs.commit()?;
    println!("{}", report.summary());
    println!("wrote {}", args.out.display());
    Ok(())
}

/// The activation moments of `model` on `--calib-images` training images of `dir`.
fn calibration_moments(
    model: &ResNet18,
    dir: &Path,
    args: &CompressArgs,
) -> anyhow::Result<Moments> {
    let mut config = RunConfig::new(dir, "", model.device());
    set(&mut config.image_size, args.image_size);
    set(&mut config.calib_images, args.calib_images);
    config.validate()?;
    let train = DataSource::detect(dir)?.load(Split::Train, StorageOptions::default())?;
    let (train, _) = experiment::loader_pair(&config, &train, &train);
    let calibration = experiment::calibration(&config, &train)?;
    Ok(activation_moments(model, &calibration)?)
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let result = experiment::run(&args.config()?)?;
    let s = &result.summary;
    println!("{}", result.metrics);
    for (i, stage) in result.stages.0.iter().enumerate() {
        match i {
            0 => println!("{}", stage.report.summary()),
            _ => println!("stage {}: {}", i + 1, stage.report.summary()),
        }
    }
    let recalibrated = |stage: &experiment::StageFigures| {
        stage.recalibrated.as_ref().map_or(String::new(), |c| {
            format!(", BN recalibrated {:.4}", c.top1)
        })
    };
    let stages: String = s
        .stages
        .iter()
        .enumerate()
        .map(|(i, stage)| match i {
            0 => format!(
                " | compressed {:.4}{}",
                stage.compressed.top1,
                recalibrated(stage)
            ),
            _ => format!(
                " | stage {} {:.4}{}",
                i + 1,
                stage.compressed.top1,
                recalibrated(stage)
            ),
        })
        .collect();
    let chosen = match s.chosen_epoch {
        Some(0) => " (epoch 0: no epoch beat the starting model on held-out images)".to_string(),
        Some(e) => format!(" (epoch {e})"),
        None => String::new(),
    };
    println!(
        "top-1: original {:.4}{stages} | compressed + fine-tuned{chosen} {:.4}",
        s.original.top1, s.fine_tuned.top1
    );
    println!(
        "wrote {}/{{metrics.csv,layers.csv,summary.json,original.safetensors,compressed.safetensors}}",
        args.experiment.out.display()
    );
    Ok(())
}

fn sweep(args: SweepArgs) -> anyhow::Result<()> {
    let mut config = args.experiment.config()?;
    config.compressed_epochs = args.epochs;
    let policies: Vec<CompressionPolicy> = args
        .policies
        .iter()
        .map(|ranks| args.fit.policy(ranks.clone(), config.image_size))
        .collect();
    let frame = experiment::run_sweep(&config, &policies)?;
    println!("{frame}");
    println!(
        "wrote {}/{{sweep.csv,sweep-metrics.csv,pareto.png,pareto-speed.png}}",
        config.out.display()
    );
    Ok(())
}

fn evaluate(args: EvaluateArgs) -> anyhow::Result<()> {
    let defaults = RunConfig::new("", "", Device::Cpu);
    let image_size = args.image_size.unwrap_or(defaults.image_size);
    let batch_size = args.batch_size.unwrap_or(defaults.eval_batch_size);
    tucker_nb::error::check_image_side("image size", image_size)?;
    tucker_nb::error::check_count("batch size", batch_size)?;
    let device = args.device.device()?;
    if let Some(p) = &args.predictions {
        check_output(p)?;
    }
    let dataset = DataSource::detect(&args.data)?.load(args.split, StorageOptions::default())?;
    let mut net = experiment::load_for_evaluation(&args.model, args.num_classes, &dataset, device)?;
    net.set_channels_last(!args.no_channels_last);
    let transform = Transform::Eval { size: image_size };
    let loader = Loader::new(&dataset, batch_size, transform, device, true);
    let options = train::EvalOptions {
        keep_predictions: args.predictions.is_some(),
        bf16: args.bf16,
        label: Some(format!(
            "evaluate {} on {} {:?} images",
            args.model.display(),
            loader.len(),
            args.split
        )),
    };
    let result = train::evaluate_with(&net, &loader, options)?;
    if let (Some(path), Some(pred)) = (&args.predictions, &result.predictions) {
        let labels = Vec::<i64>::try_from(&dataset.labels)?;
        experiment::write_predictions(path, &dataset.names, &labels, pred)?;
    }
    println!(
        "{} images: top-1 {:.4}, top-5 {:.4}, loss {:.4}, {:.1} images/s",
        result.images, result.top1, result.top5, result.loss, result.images_per_s
    );
    Ok(())
}

fn export(args: ExportArgs) -> anyhow::Result<()> {
    check_output(&args.out)?;
    let _lock = OutputLock::acquire(&args.out)?;
    let mut config = ExportConfig::new(&args.model, args.format, &args.out);
    set(&mut config.image_size, args.image_size);
    set(&mut config.tolerance, args.tolerance);
    if let Some(python) = args.python {
        config.python = python;
    }
    let check = export::export(&config)?;
    println!(
        "wrote {}: logits within {:.2e} of tucker-nb's at batch sizes {:?}",
        args.out.display(),
        check.max_abs_diff,
        check.batch_sizes
    );
    Ok(())
}

fn gen_data(args: GenDataArgs) -> anyhow::Result<()> {
    let mut spec = SyntheticSpec::default();
    set(&mut spec.classes, args.classes);
    set(&mut spec.train_per_class, args.train_per_class);
    set(&mut spec.val_per_class, args.val_per_class);
    set(&mut spec.size, args.size);
    set(&mut spec.seed, args.seed);
    let n = synthetic::generate(&args.out, spec, args.format)?;
    println!("wrote {n} images to {}", args.out.display());
    Ok(())
}

fn convert_cifar(cifar: &Path, out: &Path) -> anyhow::Result<()> {
    let n = data::convert_cifar100_to_image_folder(cifar, out)?;
    println!("wrote {n} PNGs to {}", out.display());
    Ok(())
}

fn bench_command(args: BenchArgs) -> anyhow::Result<()> {
    let data = args.data.unwrap_or_default();
    let mut config = BenchConfig::new(data, args.device.device()?);
    set(&mut config.run.image_size, args.image_size);
    set(&mut config.run.batch_size, args.batch_size);
    set(&mut config.run.num_classes, args.num_classes);
    config.run.eval_batch_size = config.run.batch_size;
    if let Some(ratio) = args.ratio {
        config.run.policy.ranks = RankPolicy::ratio(ratio)?;
    }
    if let Some(policy) = args.policy {
        config.run.policy.ranks = policy;
    }
    config.run.policy.timing.cache = args.latency_cache;
    config.model = args.model;
    config.weights = args.weights;
    set(&mut config.repeats, args.repeats);
    set(&mut config.model_batches, args.model_batches);
    set(&mut config.compress_repeats, args.compress_repeats);
    config.run.policy.round_to = args.round_to;
    config.run.fine_tune.channels_last = !args.no_channels_last;
    config.seed_python = args.seed_python;
    config.workers = args.workers;
    config.cudnn_benchmark = !args.device.no_cudnn_benchmark;
    config.json = args.json;
    bench::run(&config)?;
    Ok(())
}

fn decode(args: DecodeArgs) -> anyhow::Result<()> {
    if let Some(side) = args.storage_size {
        tucker_nb::error::check_image_side("storage size", side as i64)?;
    }
    let source = DataSource::detect(&args.data)?;
    let storage = StorageOptions {
        size: args.storage_size,
        no_cache: false,
    };
    let splits = match args.split {
        Some(split) => vec![split],
        None => vec![Split::Train, Split::Val],
    };
    for split in splits {
        let data = source.load(split, storage)?;
        let (h, w) = data.image_size();
        println!(
            "{}: {} images stored at {w}×{h} ({:.1} MB{}), key {}",
            split.folder(),
            data.len(),
            data.images.numel() as f64 / 1e6,
            if data.mapped.is_some() {
                ", memory-mapped"
            } else {
                ""
            },
            data.key
        );
    }
    Ok(())
}
