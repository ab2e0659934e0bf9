//! `tucker-nb`: the command-line face of the tucker_nb crate.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tucker_nb::compressor::Method;
use tucker_nb::experiment::{self, RunConfig};
use tucker_nb::synthetic::{self, SyntheticFormat, SyntheticSpec};
use tucker_nb::{
    bench, compress_model, data, runtime, train, CompressionPolicy, RankPolicy, ResNet18,
};
use tucker_nb::{DataSource, Loader, Split, StorageOptions, Transform};

#[derive(Parser)]
#[command(
    name = "tucker-nb",
    version,
    about = "Tucker-2 compression of ResNet18 convolutions"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How ranks are chosen.
#[derive(Args)]
#[group(required = true, multiple = false)]
struct RankArgs {
    /// The seed's rule: ranks max(1, int(C·ratio)) per mode, every conv compressed.
    #[arg(long)]
    ratio: Option<f64>,
    /// JSON file {"layer1.0.conv1": [r_out, r_in], ...}; other layers stay dense.
    #[arg(long)]
    ranks: Option<PathBuf>,
    /// ratio:R | energy:E | vbmf | budget-macs:F | budget-params:F
    #[arg(long)]
    policy: Option<String>,
}

/// How factors are fitted, and rank rounding.
#[derive(Args)]
struct FitArgs {
    /// hosvd or hooi (default: hosvd for --ratio/--ranks/ratio:, hooi for the others).
    #[arg(long)]
    method: Option<String>,
    /// Round automatically chosen ranks up to a multiple of N (8 suits tensor cores).
    #[arg(long)]
    round_to: Option<i64>,
}

impl RankArgs {
    fn policy(&self, fit: &FitArgs, image_size: i64) -> tucker_nb::Result<CompressionPolicy> {
        let ranks = match (self.ratio, &self.ranks, &self.policy) {
            (Some(r), _, _) => RankPolicy::ratio(r)?,
            (_, Some(file), _) => RankPolicy::from_ranks_file(file)?,
            (_, _, Some(spec)) => RankPolicy::parse(spec)?,
            _ => unreachable!("clap requires one of --ratio, --ranks, --policy"),
        };
        Ok(CompressionPolicy {
            ranks,
            input_size: [image_size, image_size],
            method: fit.method.as_deref().map(Method::parse).transpose()?,
            round_to: fit.round_to,
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Compress a ResNet18's convolutions and save the result as safetensors.
    Compress {
        /// Weights to compress: torchvision's .pth or a .safetensors file.
        #[arg(long)]
        weights: PathBuf,
        /// Classes of the classifier; a fresh fc is made when the file has another count.
        #[arg(long)]
        num_classes: Option<i64>,
        #[command(flatten)]
        ranks: RankArgs,
        #[command(flatten)]
        fit: FitArgs,
        /// Output .safetensors (the seed's compressed state_dict keys).
        #[arg(long)]
        out: PathBuf,
        /// Per-layer report as CSV.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Image size at which the report counts MACs.
        #[arg(long, default_value_t = 224)]
        image_size: i64,
        /// Fold each BN after a factorised conv into its last 1×1 (inference; same eval outputs).
        #[arg(long)]
        fold_bn: bool,
        /// cpu, cuda, cuda:N or auto.
        #[arg(long)]
        device: Option<String>,
    },
    /// The seed's experiment: fine-tune → evaluate → compress → evaluate → fine-tune → evaluate.
    Run(RunArgs),
    /// Accuracy, conv MACs and parameters over compression budgets: sweep.csv and pareto.png.
    Sweep(SweepArgs),
    /// Evaluate a model on a dataset split.
    Evaluate {
        /// Model weights (.pth or .safetensors, dense or compressed).
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        num_classes: i64,
        /// ImageFolder root or CIFAR-100 binary folder.
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value = "val")]
        split: String,
        #[arg(long, default_value_t = 224)]
        image_size: i64,
        #[arg(long, default_value_t = 256)]
        batch_size: usize,
        /// Write `path,true,predicted` per image.
        #[arg(long)]
        predictions: Option<PathBuf>,
        #[arg(long)]
        device: Option<String>,
    },
    /// Generate a learnable CIFAR-shaped dataset (tests, smoke runs, benchmarks).
    GenData {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 10)]
        classes: usize,
        #[arg(long, default_value_t = 20)]
        train_per_class: usize,
        #[arg(long, default_value_t = 10)]
        val_per_class: usize,
        #[arg(long, default_value_t = 32)]
        size: u32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// image-folder (PNG tree, the seed's layout) or cifar100 (binary release format).
        #[arg(long, default_value = "image-folder")]
        format: String,
    },
    /// Convert the CIFAR-100 binary release to the seed's layout OUT/{train,val}/<class>/*.png.
    ConvertCifar {
        /// Folder with train.bin, test.bin, fine_label_names.txt.
        #[arg(long)]
        cifar: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Throughput figures: data path, training and evaluation, original vs compressed.
    Bench(bench::BenchArgs),
}

#[derive(Args)]
struct RunArgs {
    /// ImageFolder root (train/, val/) or CIFAR-100 binary folder.
    #[arg(long)]
    data: PathBuf,
    /// torchvision .pth or .safetensors weights, or `none` for random initialisation.
    #[arg(long)]
    weights: String,
    #[arg(long, default_value_t = 100)]
    num_classes: i64,
    #[arg(long, default_value_t = 224)]
    image_size: i64,
    /// Epochs of each fine-tune (original, then compressed).
    #[arg(long, default_value_t = 5)]
    epochs: usize,
    /// Epochs of the compressed model's fine-tune, when different.
    #[arg(long)]
    compressed_epochs: Option<usize>,
    #[command(flatten)]
    ranks: RankArgs,
    #[command(flatten)]
    fit: FitArgs,
    /// Multi-stage compression: after the first policy, fine-tune --stage-epochs epochs and
    /// compress further with this policy (repeatable, e.g. --stage budget-macs:0.2).
    #[arg(long = "stage", value_name = "POLICY")]
    stages: Vec<String>,
    /// Epochs of fine-tuning before each further stage.
    #[arg(long, default_value_t = 1)]
    stage_epochs: usize,
    #[arg(long)]
    device: Option<String>,
    #[arg(long)]
    out: PathBuf,
    /// Continue each phase from its checkpoint in OUT.
    #[arg(long)]
    resume: bool,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[arg(long, default_value_t = 256)]
    eval_batch_size: usize,
    #[arg(long, default_value_t = 0.01)]
    lr: f64,
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    #[arg(long, default_value_t = 5e-4)]
    weight_decay: f64,
    #[arg(long, default_value_t = 2)]
    step_size: usize,
    #[arg(long, default_value_t = 0.1)]
    gamma: f64,
    /// BN while training: frozen, stats (the seed: batch statistics, affine fixed) or train.
    #[arg(long, default_value = "stats")]
    bn: String,
    /// bfloat16 autocast (CUDA).
    #[arg(long)]
    bf16: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Use only the first N training images.
    #[arg(long)]
    train_limit: Option<usize>,
    /// Use only the first N validation images.
    #[arg(long)]
    val_limit: Option<usize>,
    /// Square size decoded images are stored at when their sizes differ.
    #[arg(long)]
    storage_size: Option<u32>,
}

#[derive(Args)]
struct SweepArgs {
    /// ImageFolder root (train/, val/) or CIFAR-100 binary folder.
    #[arg(long)]
    data: PathBuf,
    /// The model to compress (e.g. a run's original.safetensors), or `none` for random weights.
    #[arg(long)]
    weights: String,
    #[arg(long, default_value_t = 100)]
    num_classes: i64,
    #[arg(long, default_value_t = 224)]
    image_size: i64,
    /// Policies to compare, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "budget-macs:0.5,budget-macs:0.33,budget-macs:0.2,budget-macs:0.1"
    )]
    policies: Vec<String>,
    #[command(flatten)]
    fit: FitArgs,
    /// Fine-tune epochs of each compressed model.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[arg(long, default_value_t = 256)]
    eval_batch_size: usize,
    #[arg(long, default_value_t = 0.01)]
    lr: f64,
    #[arg(long)]
    device: Option<String>,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    train_limit: Option<usize>,
    #[arg(long)]
    val_limit: Option<usize>,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Fails early, before any work, when `path`'s folder does not exist.
fn check_output(path: &Path) -> anyhow::Result<()> {
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

fn run(cli: Cli) -> anyhow::Result<()> {
    runtime::init();
    match cli.command {
        Command::Compress {
            weights,
            num_classes,
            ranks,
            fit,
            out,
            report,
            image_size,
            fold_bn,
            device,
        } => {
            let device = runtime::select_device(device.as_deref())?;
            let policy = ranks.policy(&fit, image_size)?;
            if out.extension().and_then(|e| e.to_str()) != Some("safetensors") {
                anyhow::bail!("{}: the output must be a .safetensors file", out.display());
            }
            check_output(&out)?;
            if let Some(r) = &report {
                check_output(r)?;
            }
            let mut model = ResNet18::load(&weights, num_classes, device)?;
            let layer_report = compress_model(&mut model, &policy)?;
            if fold_bn {
                let folded = model.fold_batch_norms();
                println!("folded {} BNs into their factorised convs", folded.len());
            }
            model.save(&out)?;
            if let Some(path) = report {
                if let Err(e) = layer_report.write_csv(&path) {
                    // The report is part of the command's result: do not leave the model alone.
                    let _ = std::fs::remove_file(&out);
                    return Err(e.into());
                }
            }
            println!("{}", layer_report.summary());
            println!("wrote {}", out.display());
        }
        Command::Run(args) => {
            let device = runtime::select_device(args.device.as_deref())?;
            let mut config = RunConfig::new(&args.data, &args.out, device);
            config.weights = (args.weights != "none").then(|| PathBuf::from(&args.weights));
            config.num_classes = args.num_classes;
            config.image_size = args.image_size;
            config.batch_size = args.batch_size;
            config.eval_batch_size = args.eval_batch_size;
            config.fine_tune.epochs = args.epochs;
            config.fine_tune.lr = args.lr;
            config.fine_tune.momentum = args.momentum;
            config.fine_tune.weight_decay = args.weight_decay;
            config.fine_tune.step_size = args.step_size;
            config.fine_tune.gamma = args.gamma;
            config.fine_tune.bn = experiment::parse_bn_mode(&args.bn)?;
            config.fine_tune.bf16 = args.bf16;
            config.compressed_epochs = args.compressed_epochs.unwrap_or(args.epochs);
            config.policy = args.ranks.policy(&args.fit, args.image_size)?;
            for spec in &args.stages {
                let ranks = RankPolicy::parse(spec)?;
                if matches!(ranks, RankPolicy::Ratio(_)) {
                    anyhow::bail!(
                        "invalid stage policy: `{spec}` (a further stage needs energy:, vbmf or \
                         a budget: the ratio rule only compresses dense convs)"
                    );
                }
                config.stages.push(CompressionPolicy {
                    ranks,
                    ..config.policy.clone()
                });
            }
            config.stage_epochs = args.stage_epochs;
            config.resume = args.resume;
            config.seed = args.seed;
            config.train_limit = args.train_limit;
            config.val_limit = args.val_limit;
            config.storage.size = args.storage_size;
            let result = experiment::run(&config)?;
            let s = &result.summary;
            println!("{}", result.metrics);
            println!("{}", result.report.summary());
            for (i, report) in result.stage_reports.iter().enumerate() {
                println!("stage {}: {}", i + 2, report.summary());
            }
            let stages: String = s
                .stages
                .iter()
                .enumerate()
                .map(|(i, c)| format!(" | stage {} {:.4}", i + 2, c.top1))
                .collect();
            println!(
                "top-1: original {:.4} | compressed {:.4}{stages} | compressed + fine-tuned {:.4}",
                s.original.top1, s.compressed.top1, s.fine_tuned.top1
            );
            println!("wrote {}/{{metrics.csv,layers.csv,summary.json,original.safetensors,compressed.safetensors}}", args.out.display());
        }
        Command::Sweep(args) => {
            let device = runtime::select_device(args.device.as_deref())?;
            let mut config = RunConfig::new(&args.data, &args.out, device);
            config.weights = (args.weights != "none").then(|| PathBuf::from(&args.weights));
            config.num_classes = args.num_classes;
            config.image_size = args.image_size;
            config.batch_size = args.batch_size;
            config.eval_batch_size = args.eval_batch_size;
            config.fine_tune.lr = args.lr;
            config.compressed_epochs = args.epochs;
            config.seed = args.seed;
            config.train_limit = args.train_limit;
            config.val_limit = args.val_limit;
            let policies = args
                .policies
                .iter()
                .map(|spec| {
                    let ranks = RankArgs {
                        ratio: None,
                        ranks: None,
                        policy: Some(spec.clone()),
                    };
                    ranks.policy(&args.fit, args.image_size)
                })
                .collect::<tucker_nb::Result<Vec<_>>>()?;
            let frame = experiment::run_sweep(&config, &policies)?;
            println!("{frame}");
            println!("wrote {}/{{sweep.csv,pareto.png}}", args.out.display());
        }
        Command::Evaluate {
            model,
            num_classes,
            data: root,
            split,
            image_size,
            batch_size,
            predictions,
            device,
        } => {
            let device = runtime::select_device(device.as_deref())?;
            let split = Split::parse(&split)?;
            if let Some(p) = &predictions {
                check_output(p)?;
            }
            let dataset = DataSource::detect(&root)?.load(split, StorageOptions::default())?;
            let net = ResNet18::load(&model, Some(num_classes), device)?;
            let loader = Loader::new(
                &dataset,
                batch_size,
                Transform::Eval { size: image_size },
                device,
                true,
            );
            let result = train::evaluate_with(&net, &loader, predictions.is_some(), false)?;
            if let (Some(path), Some(pred)) = (&predictions, &result.predictions) {
                let labels = Vec::<i64>::try_from(&dataset.labels)?;
                experiment::write_predictions(path, &dataset.names, &labels, pred)?;
            }
            println!(
                "{} images: top-1 {:.4}, top-5 {:.4}, loss {:.4}, {:.1} images/s",
                result.images, result.top1, result.top5, result.loss, result.images_per_s
            );
        }
        Command::GenData {
            out,
            classes,
            train_per_class,
            val_per_class,
            size,
            seed,
            format,
        } => {
            let format = match format.as_str() {
                "image-folder" => SyntheticFormat::ImageFolder,
                "cifar100" => SyntheticFormat::Cifar100Binary,
                other => {
                    anyhow::bail!("invalid format: `{other}` (expected image-folder or cifar100)")
                }
            };
            let spec = SyntheticSpec {
                classes,
                train_per_class,
                val_per_class,
                size,
                seed,
            };
            let n = synthetic::generate(&out, spec, format)?;
            println!("wrote {n} images to {}", out.display());
        }
        Command::ConvertCifar { cifar, out } => {
            let n = data::convert_cifar100_to_image_folder(&cifar, &out)?;
            println!("wrote {n} PNGs to {}", out.display());
        }
        Command::Bench(args) => bench::run(&args)?,
    }
    Ok(())
}
