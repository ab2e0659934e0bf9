//! `tucker-nb`: the command-line face of the tucker_nb crate. Each subcommand's arguments convert
//! to the library's configuration, which validates them; each subcommand is one function.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;

use clap::{Args, Parser, Subcommand};
use tch::Device;
use tucker_nb::bench::{self, BenchConfig};
use tucker_nb::data::{self, Split};
use tucker_nb::experiment::{self, RunConfig};
use tucker_nb::synthetic::{self, SyntheticFormat, SyntheticSpec};
use tucker_nb::train::{self, BnMode, Distillation};
use tucker_nb::{
    compress_model, runtime, CompressionPolicy, DataSource, Loader, Method, RankPolicy, ResNet18,
    StorageOptions, Transform,
};

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

#[derive(Subcommand)]
enum Command {
    /// Compress a ResNet18's convolutions and save the result as safetensors.
    Compress(CompressArgs),
    /// The seed's experiment: fine-tune → evaluate → compress → evaluate → fine-tune → evaluate.
    Run(RunArgs),
    /// Accuracy, conv MACs and parameters over compression budgets: sweep.csv and pareto.png.
    Sweep(SweepArgs),
    /// Evaluate a model on a dataset split.
    Evaluate(EvaluateArgs),
    /// Generate a learnable CIFAR-shaped dataset (tests, smoke runs, benchmarks).
    GenData(GenDataArgs),
    /// Convert the CIFAR-100 binary release to the seed's layout OUT/{train,val}/<class>/*.png.
    ConvertCifar {
        /// Folder with train.bin, test.bin, fine_label_names.txt.
        #[arg(long)]
        cifar: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Throughput figures: data path, training and evaluation, original vs compressed.
    Bench(BenchArgs),
}

/// Where to run.
#[derive(Args)]
struct DeviceArg {
    /// cpu, cuda, cuda:N or auto (default: TUCKER_NB_DEVICE, else CUDA when available).
    #[arg(long)]
    device: Option<String>,
}

/// Starting weights: a file, or `none` for random initialisation.
#[derive(Clone)]
struct Weights(Option<PathBuf>);

impl FromStr for Weights {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Weights((s != "none").then(|| PathBuf::from(s))))
    }
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
    policy: Option<RankPolicy>,
}

/// How factors are fitted, and rank rounding.
#[derive(Args)]
struct FitArgs {
    /// Default: hosvd for --ratio/--ranks/ratio:, hooi for the others.
    #[arg(long, value_enum)]
    method: Option<Method>,
    /// Round automatically chosen ranks up to a multiple of N (8 suits tensor cores).
    #[arg(long)]
    round_to: Option<i64>,
}

/// The data and model a run starts from.
#[derive(Args)]
struct DataArgs {
    /// ImageFolder root (train/, val/) or CIFAR-100 binary folder.
    #[arg(long)]
    data: PathBuf,
    /// torchvision .pth or .safetensors weights, or `none` for random initialisation.
    #[arg(long)]
    weights: Weights,
    #[arg(long, default_value_t = 100)]
    num_classes: i64,
    #[arg(long, default_value_t = 224)]
    image_size: i64,
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

/// The fine-tune recipe (the seed's by default).
#[derive(Args)]
struct TrainArgs {
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
    /// BN while training: frozen, statistics (the seed: batch statistics, affine fixed) or train.
    #[arg(long, value_enum, default_value = "stats")]
    bn: BnMode,
    /// bfloat16 autocast (CUDA).
    #[arg(long)]
    bf16: bool,
    /// Distil the compressed model's fine-tune from the model before compression: T,ALPHA (loss
    /// α·CE + (1−α)·T²·KL), e.g. 4,0.5.
    #[arg(long, value_name = "T,ALPHA")]
    distill: Option<Distillation>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct CompressArgs {
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
    #[command(flatten)]
    device: DeviceArg,
}

/// What `run` and `sweep` share: the data, the recipe, where to run and where to write.
#[derive(Args)]
struct ExperimentArgs {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    train: TrainArgs,
    #[command(flatten)]
    device: DeviceArg,
    #[arg(long)]
    out: PathBuf,
    /// Training images (seeded shuffle, eval transform) the BN recalibration after compression sees.
    #[arg(long, default_value_t = 1024)]
    calib_images: usize,
    /// Skip the BN recalibration after compression (the seed's flow).
    #[arg(long)]
    no_bn_recalibration: bool,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    experiment: ExperimentArgs,
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
    stages: Vec<RankPolicy>,
    /// Epochs of fine-tuning before each further stage.
    #[arg(long, default_value_t = 1)]
    stage_epochs: usize,
    /// Continue each phase from its checkpoint in OUT.
    #[arg(long)]
    resume: bool,
}

#[derive(Args)]
struct SweepArgs {
    #[command(flatten)]
    experiment: ExperimentArgs,
    /// Policies to compare, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "budget-macs:0.5,budget-macs:0.33,budget-macs:0.2,budget-macs:0.1"
    )]
    policies: Vec<RankPolicy>,
    #[command(flatten)]
    fit: FitArgs,
    /// Fine-tune epochs of each compressed model.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
}

#[derive(Args)]
struct EvaluateArgs {
    /// Model weights (.pth or .safetensors, dense or compressed).
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    num_classes: i64,
    /// ImageFolder root or CIFAR-100 binary folder.
    #[arg(long)]
    data: PathBuf,
    #[arg(long, value_enum, default_value = "val")]
    split: Split,
    #[arg(long, default_value_t = 224)]
    image_size: i64,
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Write `path,true,predicted` per image.
    #[arg(long)]
    predictions: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArg,
}

#[derive(Args)]
struct GenDataArgs {
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
    /// The seed's PNG tree, or the CIFAR-100 binary release format.
    #[arg(long, value_enum, default_value = "image-folder")]
    format: SyntheticFormat,
}

#[derive(Args)]
struct BenchArgs {
    /// ImageFolder root with train/ (e.g. from `tucker-nb gen-data`).
    #[arg(long)]
    data: PathBuf,
    #[arg(long, default_value_t = 32)]
    image_size: i64,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Batches per model throughput measurement.
    #[arg(long, default_value_t = 5)]
    model_batches: usize,
    #[command(flatten)]
    device: DeviceArg,
    /// Also run the seed's torchvision pipeline with this python (e.g. .venv/bin/python).
    #[arg(long)]
    seed_python: Option<PathBuf>,
    /// DataLoader workers for the seed's pipeline (the seed uses 4; default: this machine's cores).
    #[arg(long)]
    workers: Option<usize>,
    /// Compression ratio for the compressed model.
    #[arg(long, default_value_t = 0.2)]
    ratio: f64,
}

// Each argument group converts to the library's types, which validate.

impl DeviceArg {
    fn device(&self) -> tucker_nb::Result<Device> {
        runtime::select_device(self.device.as_deref())
    }
}

impl RankArgs {
    fn ranks(&self) -> tucker_nb::Result<RankPolicy> {
        match (self.ratio, &self.ranks, &self.policy) {
            (Some(r), _, _) => RankPolicy::ratio(r),
            (_, Some(file), _) => RankPolicy::from_ranks_file(file),
            (_, _, Some(policy)) => Ok(policy.clone()),
            _ => unreachable!("clap requires one of --ratio, --ranks, --policy"),
        }
    }
}

impl FitArgs {
    fn policy(&self, ranks: RankPolicy, image_size: i64) -> CompressionPolicy {
        CompressionPolicy {
            ranks,
            input_size: [image_size, image_size],
            method: self.method,
            round_to: self.round_to,
        }
    }
}

impl ExperimentArgs {
    /// The run configuration these groups describe (epochs and policy are the caller's).
    fn config(&self) -> tucker_nb::Result<RunConfig> {
        let (data, train) = (&self.data, &self.train);
        let mut config = RunConfig::new(&data.data, &self.out, self.device.device()?);
        config.weights = data.weights.0.clone();
        config.num_classes = data.num_classes;
        config.image_size = data.image_size;
        config.train_limit = data.train_limit;
        config.val_limit = data.val_limit;
        config.storage.size = data.storage_size;
        config.batch_size = train.batch_size;
        config.eval_batch_size = train.eval_batch_size;
        config.seed = train.seed;
        config.calib_images = self.calib_images;
        config.recalibrate_bn = !self.no_bn_recalibration;
        let ft = &mut config.fine_tune;
        ft.lr = train.lr;
        ft.momentum = train.momentum;
        ft.weight_decay = train.weight_decay;
        ft.step_size = train.step_size;
        ft.gamma = train.gamma;
        ft.bn = train.bn;
        ft.bf16 = train.bf16;
        ft.distill = train.distill;
        Ok(config)
    }
}

impl RunArgs {
    fn config(&self) -> tucker_nb::Result<RunConfig> {
        let mut config = self.experiment.config()?;
        config.fine_tune.epochs = self.epochs;
        config.compressed_epochs = self.compressed_epochs.unwrap_or(self.epochs);
        config.policy = self.fit.policy(self.ranks.ranks()?, config.image_size);
        config.stages = self
            .stages
            .iter()
            .map(|ranks| config.policy.with_ranks(ranks.clone()))
            .collect();
        config.stage_epochs = self.stage_epochs;
        config.resume = self.resume;
        Ok(config)
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
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
    };
    match result {
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

fn compress(args: CompressArgs) -> anyhow::Result<()> {
    let device = args.device.device()?;
    let policy = args.fit.policy(args.ranks.ranks()?, args.image_size);
    policy.validate()?;
    if args.out.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        anyhow::bail!(
            "{}: the output must be a .safetensors file",
            args.out.display()
        );
    }
    check_output(&args.out)?;
    if let Some(r) = &args.report {
        check_output(r)?;
    }
    let mut model = ResNet18::load(&args.weights, args.num_classes, device)?;
    let report = compress_model(&mut model, &policy)?;
    if args.fold_bn {
        let folded = model.fold_batch_norms();
        println!("folded {} BNs into their factorised convs", folded.len());
    }
    model.save(&args.out)?;
    if let Some(path) = &args.report {
        if let Err(e) = report.write_csv(path) {
            // The report is part of the command's result: do not leave the model alone.
            let _ = std::fs::remove_file(&args.out);
            return Err(e.into());
        }
    }
    println!("{}", report.summary());
    println!("wrote {}", args.out.display());
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let result = experiment::run(&args.config()?)?;
    let s = &result.summary;
    println!("{}", result.metrics);
    println!("{}", result.report.summary());
    for (i, report) in result.stage_reports.iter().enumerate() {
        println!("stage {}: {}", i + 2, report.summary());
    }
    let recalibrated = |c: Option<&experiment::Checkpoint>| {
        c.map_or(String::new(), |c| {
            format!(", BN recalibrated {:.4}", c.top1)
        })
    };
    let stages: String = s
        .stages
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let after = recalibrated(s.stages_recalibrated.get(i));
            format!(" | stage {} {:.4}{after}", i + 2, c.top1)
        })
        .collect();
    println!(
        "top-1: original {:.4} | compressed {:.4}{}{stages} | compressed + fine-tuned {:.4}",
        s.original.top1,
        s.compressed.top1,
        recalibrated(s.recalibrated.as_ref()),
        s.fine_tuned.top1
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
    println!("wrote {}/{{sweep.csv,pareto.png}}", config.out.display());
    Ok(())
}

fn evaluate(args: EvaluateArgs) -> anyhow::Result<()> {
    let device = args.device.device()?;
    if let Some(p) = &args.predictions {
        check_output(p)?;
    }
    let dataset = DataSource::detect(&args.data)?.load(args.split, StorageOptions::default())?;
    let net = ResNet18::load(&args.model, Some(args.num_classes), device)?;
    let transform = Transform::Eval {
        size: args.image_size,
    };
    let loader = Loader::new(&dataset, args.batch_size, transform, device, true);
    let result = train::evaluate_with(&net, &loader, args.predictions.is_some(), false)?;
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

fn gen_data(args: GenDataArgs) -> anyhow::Result<()> {
    let spec = SyntheticSpec {
        classes: args.classes,
        train_per_class: args.train_per_class,
        val_per_class: args.val_per_class,
        size: args.size,
        seed: args.seed,
    };
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
    let mut config = BenchConfig::new(&args.data, args.device.device()?);
    config.run.image_size = args.image_size;
    config.run.batch_size = args.batch_size;
    config.run.eval_batch_size = args.batch_size;
    config.run.policy.ranks = RankPolicy::ratio(args.ratio)?;
    config.repeats = args.repeats;
    config.model_batches = args.model_batches;
    config.seed_python = args.seed_python;
    config.workers = args.workers;
    bench::run(&config)?;
    Ok(())
}
