//! The command line's arguments: shared groups (`#[command(flatten)]`), one struct per
//! subcommand, each converting to the library's configuration, which validates.

use std::path::PathBuf;
use std::str::FromStr;

use std::fmt::Display;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tch::Device;
use tucker_nb::bench::BenchConfig;
use tucker_nb::compress::latency::TimingSettings;
use tucker_nb::data::Split;
use tucker_nb::experiment::RunConfig;
use tucker_nb::export::{ExportConfig, ExportFormat};
use tucker_nb::loader::Augmentation;
use tucker_nb::synthetic::{SyntheticFormat, SyntheticSpec};
use tucker_nb::train::{BnMode, Distillation, Recipe};
use tucker_nb::{runtime, sweep, CompressionPolicy, FineTuneConfig, Fit, Method, RankPolicy};

// Defaults live in the library's configs; a flag left out keeps the library's value, and the
// help shows it from there.

/// The library's run settings, as `RunConfig::new` makes them.
fn run_defaults() -> RunConfig {
    RunConfig::new("", "", Device::Cpu)
}

/// The library's benchmark settings.
fn bench_defaults() -> BenchConfig {
    BenchConfig::new("", Device::Cpu)
}

/// The library's fine-tune settings.
fn fine_tune_defaults() -> FineTuneConfig {
    FineTuneConfig::default()
}

/// How a flag spells `value`.
fn value_name(value: impl ValueEnum) -> String {
    let value = value.to_possible_value().expect("no variant is skipped");
    value.get_name().to_string()
}

/// `about`, then the default as clap shows one.
fn with_default(about: &str, default: impl Display) -> String {
    match about {
        "" => format!("[default: {default}]"),
        _ => format!("{about} [default: {default}]"),
    }
}

/// A count or size: parsed as a whole number, so a negative one is refused with the flag's name
/// and range (clap prefixes `invalid value '-1' for '--epochs <EPOCHS>'`).
fn non_negative<T: TryFrom<i64>>(text: &str) -> Result<T, String> {
    let n: i64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a whole number"))?;
    if n < 0 {
        return Err(format!("{n} is negative (must be ≥ 0)"));
    }
    T::try_from(n).map_err(|_| format!("{n} is too large"))
}

/// A whole number ≥ 1, for counts where 0 means nothing.
fn positive<T: TryFrom<i64>>(text: &str) -> Result<T, String> {
    let n: i64 = non_negative(text)?;
    if n == 0 {
        return Err("0 (must be ≥ 1)".into());
    }
    T::try_from(n).map_err(|_| format!("{n} is too large"))
}

/// The command line's parser, with negative numbers taken as values (so `--epochs -1` reaches
/// the flag's own check instead of reading as an unknown flag).
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    Cli::command().mut_subcommands(|sub| {
        sub.mut_args(|arg| match arg.get_action().takes_values() {
            true => arg.allow_negative_numbers(true),
            false => arg,
        })
    })
}

/// Sets `field` to `value` when the flag was given.
pub fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *field = value;
    }
}

#[derive(Parser)]
#[command(
    name = "tucker-nb",
    version,
    about = "Tucker-2 compression of ResNet18 convolutions"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
    /// Decode an ImageFolder dataset into its cache (DATA/.tucker_nb_cache/), which later loads
    /// map at once.
    Decode(DecodeArgs),
    /// Export a model file to ONNX or TorchScript (through the venv's PyTorch), checked against
    /// tucker-nb's own logits before it is written.
    Export(ExportArgs),
}

#[derive(Args)]
pub struct ExportArgs {
    /// Model weights (.pth or .safetensors, dense, compressed or folded).
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// The exported file (.onnx, or .pt for TorchScript).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, help = with_default(
        "Side of the images the export is checked at (it accepts any size the model does).",
        ExportConfig::new("", ExportFormat::Onnx, "").image_size,
    ))]
    pub image_size: Option<i64>,
    #[arg(long, help = with_default(
        "Largest |difference| allowed between the export's logits and tucker-nb's.",
        ExportConfig::new("", ExportFormat::Onnx, "").tolerance,
    ))]
    pub tolerance: Option<f64>,
    /// The Python that exports (default: TUCKER_NB_PYTHON, else the project's .venv).
    #[arg(long)]
    pub python: Option<PathBuf>,
}

#[derive(Args)]
pub struct DecodeArgs {
    /// ImageFolder root (train/, val/) or CIFAR-100 binary folder.
    #[arg(long)]
    pub data: PathBuf,
    /// Square size images are stored at (default: their own size when they share one, else 256).
    #[arg(long, value_parser = non_negative::<u32>)]
    pub storage_size: Option<u32>,
    /// One split only (default: both).
    #[arg(long, value_enum)]
    pub split: Option<Split>,
}

/// Where to run.
#[derive(Args)]
pub struct DeviceArg {
    /// cpu, cuda, cuda:N or auto (default: TUCKER_NB_DEVICE, else CUDA when available).
    #[arg(long)]
    pub device: Option<String>,
    /// Leave cuDNN's autotuner off (it is on for CUDA: each conv shape's fastest algorithm is
    /// timed once, then reused).
    #[arg(long)]
    pub no_cudnn_benchmark: bool,
}

/// Starting weights: a file, or `none` for random initialisation.
#[derive(Clone)]
pub struct Weights(Option<PathBuf>);

impl FromStr for Weights {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Weights((s != "none").then(|| PathBuf::from(s))))
    }
}

/// How ranks are chosen.
#[derive(Args)]
#[group(required = true, multiple = false)]
pub struct RankArgs {
    /// The seed's rule: ranks max(1, int(C·ratio)) per mode, every conv compressed.
    #[arg(long)]
    pub ratio: Option<f64>,
    /// JSON file {"layer1.0.conv1": [r_out, r_in], ...}; other layers stay dense.
    #[arg(long)]
    pub ranks: Option<PathBuf>,
    /// ratio:R | energy:E | vbmf | cp:R (CP of every k×k conv at rank R·min(C_in, C_out); +stem
    /// includes the RGB stem) | budget-macs:F | budget-params:F | budget-latency:F (eval forward
    /// time ≤ F × the dense model's, measured on the device in use); a budget with +cp may also
    /// choose CP (budget-macs:0.1+cp)
    #[arg(long)]
    pub policy: Option<RankPolicy>,
}

/// How factors are fitted, and rank rounding.
#[derive(Args)]
pub struct FitArgs {
    /// Default: hosvd for --ratio/--ranks/ratio:, hooi for the others.
    #[arg(long, value_enum)]
    pub method: Option<Method>,
    /// Round the ranks the policy chooses (ratio, energy, vbmf, budgets; not --ranks files) up to
    /// a multiple of N: 8 suits tensor cores. Off by default (the seed's ranks).
    #[arg(long)]
    pub round_to: Option<i64>,
    /// Fit factors to the weights or to each layer's outputs on calibration data (default: data
    /// for energy/vbmf/budgets when calibration data is at hand, weights for the ratio rule).
    #[arg(long, value_enum)]
    pub fit: Option<Fit>,
    /// Where budget-latency's measured tables are cached (default: $TUCKER_NB_LATENCY_CACHE, else
    /// $XDG_CACHE_HOME/tucker_nb/latency, else ~/.cache/tucker_nb/latency).
    #[arg(long, value_name = "DIR")]
    pub latency_cache: Option<PathBuf>,
}

/// The data and model a run starts from.
#[derive(Args)]
pub struct DataArgs {
    /// ImageFolder root (train/, val/) or CIFAR-100 binary folder.
    #[arg(long)]
    pub data: PathBuf,
    /// torchvision .pth or .safetensors weights, or `none` for random initialisation.
    #[arg(long)]
    pub weights: Weights,
    #[arg(long, help = with_default("", run_defaults().num_classes))]
    pub num_classes: Option<i64>,
    #[arg(long, help = with_default("", run_defaults().image_size))]
    pub image_size: Option<i64>,
    /// Use only the first N training images.
    #[arg(long, value_parser = non_negative::<usize>)]
    pub train_limit: Option<usize>,
    /// Use only the first N validation images.
    #[arg(long, value_parser = non_negative::<usize>)]
    pub val_limit: Option<usize>,
    /// Square size decoded images are stored at when their sizes differ.
    #[arg(long, value_parser = non_negative::<u32>)]
    pub storage_size: Option<u32>,
}

/// The fine-tune recipe (the seed's by default).
#[derive(Args)]
pub struct TrainArgs {
    #[arg(long, value_parser = non_negative::<usize>, help = with_default("", run_defaults().batch_size))]
    pub batch_size: Option<usize>,
    #[arg(long, value_parser = non_negative::<usize>, help = with_default("", run_defaults().eval_batch_size))]
    pub eval_batch_size: Option<usize>,
    #[arg(long, help = with_default("", fine_tune_defaults().lr))]
    pub lr: Option<f64>,
    #[arg(long, help = with_default("", fine_tune_defaults().momentum))]
    pub momentum: Option<f64>,
    #[arg(long, help = with_default("", fine_tune_defaults().weight_decay))]
    pub weight_decay: Option<f64>,
    #[arg(long, value_parser = non_negative::<usize>, help = with_default(
        "StepLR: the learning rate is multiplied by --gamma every N epochs.",
        fine_tune_defaults().step_size,
    ))]
    pub step_size: Option<usize>,
    #[arg(long, help = with_default("", fine_tune_defaults().gamma))]
    pub gamma: Option<f64>,
    #[arg(long, help = with_default(
        "The factorised convs' learning rate as a share of --lr (fc and BN train at --lr).",
        fine_tune_defaults().factor_lr_scale,
    ))]
    pub factor_lr_scale: Option<f64>,
    #[arg(long, value_name = "EPOCHS", help = with_default(
        "Linear lr warm-up over this many epochs (fractions allowed) of each fine-tune.",
        fine_tune_defaults().warmup_epochs,
    ))]
    pub warmup_epochs: Option<f64>,
    /// The training crops' smallest share of an image (RandomResizedCrop's scale; the seed: 0.08).
    #[arg(long, value_name = "SHARE")]
    pub min_crop: Option<f64>,
    /// Do not flip training images (the seed flips half of them).
    #[arg(long)]
    pub no_flip: bool,
    #[arg(long, value_enum, help = with_default(
        "BN while training: frozen, statistics (the seed: batch statistics, affine fixed) or train.",
        value_name(fine_tune_defaults().bn),
    ))]
    pub bn: Option<BnMode>,
    /// bfloat16 autocast (CUDA).
    #[arg(long)]
    pub bf16: bool,
    /// Train and evaluate in the seed's NCHW layout instead of channels-last (NHWC, faster).
    #[arg(long)]
    pub no_channels_last: bool,
    /// Distil the compressed model's fine-tune from the model before compression: T,ALPHA (loss
    /// α·CE + (1−α)·T²·KL), e.g. 4,0.5.
    #[arg(long, value_name = "T,ALPHA")]
    pub distill: Option<Distillation>,
    #[arg(long, value_parser = non_negative::<u64>, help = with_default("", run_defaults().seed))]
    pub seed: Option<u64>,
    /// Train on at most N batches per epoch (spread over the data by the shuffle).
    #[arg(long, value_parser = non_negative::<usize>, value_name = "N")]
    pub max_batches: Option<usize>,
}

#[derive(Args)]
pub struct CompressArgs {
    /// Weights to compress: torchvision's .pth or a .safetensors file.
    #[arg(long)]
    pub weights: PathBuf,
    /// Classes of the classifier; a fresh fc is made when the file has another count.
    #[arg(long)]
    pub num_classes: Option<i64>,
    #[command(flatten)]
    pub ranks: RankArgs,
    #[command(flatten)]
    pub fit: FitArgs,
    /// Output .safetensors (the seed's compressed state_dict keys).
    #[arg(long)]
    pub out: PathBuf,
    /// Per-layer report as CSV.
    #[arg(long)]
    pub report: Option<PathBuf>,
    #[arg(long, help = with_default(
        "Image size at which the report counts MACs.",
        CompressionPolicy::default().input_size[0],
    ))]
    pub image_size: Option<i64>,
    /// Fold each BN after a factorised conv into its last 1×1 (inference; same eval outputs;
    /// budget-latency plans for it).
    #[arg(long)]
    pub fold_bn: bool,
    #[arg(long, value_parser = positive::<i64>, help = with_default(
        "Images per forward pass at which budget-latency measures time.",
        TimingSettings::default().batch_size,
    ))]
    pub batch_size: Option<i64>,
    /// budget-latency measures under bf16 autocast (CUDA; fp32 elsewhere).
    #[arg(long)]
    pub bf16: bool,
    /// Plan (and time) the model in the seed's NCHW layout instead of channels-last.
    #[arg(long)]
    pub no_channels_last: bool,
    /// Calibration data (an ImageFolder root or CIFAR-100 folder; its training split) to fit the
    /// data-driven policies to each layer's outputs.
    #[arg(long)]
    pub calib_data: Option<PathBuf>,
    #[arg(long, value_parser = non_negative::<usize>, help = with_default(
        "Training images of --calib-data to use (seeded shuffle, eval transform).",
        run_defaults().calib_images,
    ))]
    pub calib_images: Option<usize>,
    #[command(flatten)]
    pub device: DeviceArg,
}

/// What `run` and `sweep` share: the data, the recipe, where to run and where to write.
#[derive(Args)]
pub struct ExperimentArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub train: TrainArgs,
    #[command(flatten)]
    pub device: DeviceArg,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_parser = non_negative::<usize>, help = with_default(
        "Training images (seeded shuffle, eval transform) the BN recalibration after compression sees.",
        run_defaults().calib_images,
    ))]
    pub calib_images: Option<usize>,
    /// Skip the BN recalibration after compression (the seed's flow).
    #[arg(long)]
    pub no_bn_recalibration: bool,
    #[arg(long, value_enum, help = with_default(
        "How the compressed model is fine-tuned: distill (from the model before compression, \
         returning the epoch with the lowest loss on held-out training images, stopped early if it \
         diverges), guarded (the seed's cross-entropy, chosen and stopped as distill is) or seed \
         (the seed's recipe: cross-entropy, the last epoch).",
        value_name(run_defaults().recipe),
    ))]
    pub recipe: Option<Recipe>,
    /// Training images held out to choose the fine-tune's epoch (distill recipe; default: 5 % of
    /// them, at least one batch, at most a quarter).
    #[arg(long, value_parser = non_negative::<usize>, value_name = "N")]
    pub held_out_images: Option<usize>,
    /// Choose the fine-tune's epoch on this ImageFolder (class folders, the training set's
    /// classes) instead of held-out training images: for weights trained on every training image.
    #[arg(long, value_name = "DIR", conflicts_with = "held_out_images")]
    pub held_out_data: Option<PathBuf>,
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub experiment: ExperimentArgs,
    #[arg(long, value_parser = non_negative::<usize>, help = with_default(
        "Epochs of each fine-tune (original, then compressed).",
        fine_tune_defaults().epochs,
    ))]
    pub epochs: Option<usize>,
    /// Epochs of the compressed model's fine-tune, when different.
    #[arg(long, value_parser = non_negative::<usize>)]
    pub compressed_epochs: Option<usize>,
    #[command(flatten)]
    pub ranks: RankArgs,
    #[command(flatten)]
    pub fit: FitArgs,
    /// Multi-stage compression: after the first policy, fine-tune --stage-epochs epochs and
    /// compress further with this policy (repeatable, e.g. --stage budget-macs:0.2).
    #[arg(long = "stage", value_name = "POLICY")]
    pub stages: Vec<RankPolicy>,
    #[arg(long, value_parser = non_negative::<usize>, help = with_default(
        "Epochs of fine-tuning before each further stage.",
        run_defaults().stage_epochs,
    ))]
    pub stage_epochs: Option<usize>,
    /// Continue each phase from its checkpoint in OUT (the same run: OUT/run.json must match).
    #[arg(long, conflicts_with = "force")]
    pub resume: bool,
    /// Start afresh in a non-empty OUT, replacing its results.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args)]
pub struct SweepArgs {
    #[command(flatten)]
    pub experiment: ExperimentArgs,
    /// Policies to compare, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = sweep::DEFAULT_POLICIES)]
    pub policies: Vec<RankPolicy>,
    #[command(flatten)]
    pub fit: FitArgs,
    /// Fine-tune epochs of each compressed model.
    #[arg(long, value_parser = non_negative::<usize>, default_value_t = sweep::DEFAULT_EPOCHS)]
    pub epochs: usize,
}

#[derive(Args)]
pub struct EvaluateArgs {
    /// Model weights (.pth or .safetensors, dense or compressed).
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub num_classes: i64,
    /// ImageFolder root or CIFAR-100 binary folder.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, value_enum, default_value = "val")]
    pub split: Split,
    #[arg(long, help = with_default("", run_defaults().image_size))]
    pub image_size: Option<i64>,
    #[arg(long, value_parser = non_negative::<usize>, help = with_default("", run_defaults().eval_batch_size))]
    pub batch_size: Option<usize>,
    /// Write `path,true,predicted` per image.
    #[arg(long)]
    pub predictions: Option<PathBuf>,
    /// bfloat16 autocast of the forward pass (CUDA; ignored on CPU).
    #[arg(long)]
    pub bf16: bool,
    /// Evaluate in the seed's NCHW layout instead of channels-last (NHWC, faster).
    #[arg(long)]
    pub no_channels_last: bool,
    #[command(flatten)]
    pub device: DeviceArg,
}

#[derive(Args)]
pub struct GenDataArgs {
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_parser = non_negative::<usize>, help = with_default("", SyntheticSpec::default().classes))]
    pub classes: Option<usize>,
    #[arg(long, value_parser = non_negative::<usize>, help = with_default("", SyntheticSpec::default().train_per_class))]
    pub train_per_class: Option<usize>,
    #[arg(long, value_parser = non_negative::<usize>, help = with_default("", SyntheticSpec::default().val_per_class))]
    pub val_per_class: Option<usize>,
    #[arg(long, value_parser = non_negative::<u32>, help = with_default("Square image side.", SyntheticSpec::default().size))]
    pub size: Option<u32>,
    #[arg(long, value_parser = non_negative::<u64>, help = with_default("", SyntheticSpec::default().seed))]
    pub seed: Option<u64>,
    /// The seed's PNG tree, or the CIFAR-100 binary release format.
    #[arg(long, value_enum, default_value = "image-folder")]
    pub format: SyntheticFormat,
}

#[derive(Args)]
pub struct BenchArgs {
    /// ImageFolder root with train/ (e.g. from `tucker-nb gen-data`): also time the data path.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// A model file tucker-nb wrote (compressed, folded or not) to bench against the dense model,
    /// instead of compressing one with --policy.
    #[arg(long, conflicts_with_all = ["ratio", "policy", "round_to", "weights"])]
    pub model: Option<PathBuf>,
    /// The dense model's weights, which --policy compresses (default: random; times do not
    /// depend on weights, a budget's plan does).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Classes of the models without --data or --model.
    #[arg(long, value_parser = positive::<i64>, help = with_default("", bench_defaults().run.num_classes))]
    pub num_classes: Option<i64>,
    #[arg(long, help = with_default("", bench_defaults().run.image_size))]
    pub image_size: Option<i64>,
    #[arg(long, value_parser = non_negative::<usize>, help = with_default("", bench_defaults().run.batch_size))]
    pub batch_size: Option<usize>,
    #[arg(long, value_parser = non_negative::<usize>, help = with_default("", bench_defaults().repeats))]
    pub repeats: Option<usize>,
    #[arg(long, value_parser = non_negative::<usize>, help = with_default(
        "Batches per model throughput measurement.",
        bench_defaults().model_batches,
    ))]
    pub model_batches: Option<usize>,
    #[arg(long, value_parser = non_negative::<usize>, help = with_default(
        "Timed rounds of compressing the dense model (the seed's rule, budget-macs at its \
         fraction, --policy; with --seed-python, the seed's compressor in turns); 0 skips them.",
        bench_defaults().compress_repeats,
    ))]
    pub compress_repeats: Option<usize>,
    #[command(flatten)]
    pub device: DeviceArg,
    /// A python with torch (e.g. .venv/bin/python): also time the seed's torchvision pipeline and
    /// PyTorch's model-only figures on the same libtorch, and the seed's compressor.
    #[arg(long)]
    pub seed_python: Option<PathBuf>,
    /// Also write every figure to this JSON file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Round the compressed model's ranks up to a multiple of N (8 suits tensor cores).
    #[arg(long)]
    pub round_to: Option<i64>,
    /// Both models (ours and PyTorch's) in the seed's NCHW layout instead of channels-last.
    #[arg(long)]
    pub no_channels_last: bool,
    /// DataLoader workers for the seed's pipeline (the seed uses 4; default: this machine's cores).
    #[arg(long, value_parser = non_negative::<usize>)]
    pub workers: Option<usize>,
    #[arg(long, conflicts_with = "policy", help = with_default(
        "Compression ratio for the compressed model (the seed's rule).",
        bench_defaults().run.policy.ranks,
    ))]
    pub ratio: Option<f64>,
    /// Any policy for the compressed model: ratio:R | energy:E | vbmf | cp:R | budget-macs:F |
    /// budget-params:F | budget-latency:F (timed at --batch-size and --image-size); +cp lets a
    /// budget choose CP.
    #[arg(long)]
    pub policy: Option<RankPolicy>,
    /// Where budget-latency's measured tables are cached.
    #[arg(long, value_name = "DIR")]
    pub latency_cache: Option<PathBuf>,
}

// Each argument group converts to the library's types, which validate.

impl DeviceArg {
    pub fn device(&self) -> tucker_nb::Result<Device> {
        runtime::prepare_device(self.device.as_deref(), !self.no_cudnn_benchmark)
    }
}

impl RankArgs {
    pub fn ranks(&self) -> tucker_nb::Result<RankPolicy> {
        match (self.ratio, &self.ranks, &self.policy) {
            (Some(r), _, _) => RankPolicy::ratio(r),
            (_, Some(file), _) => RankPolicy::from_ranks_file(file),
            (_, _, Some(policy)) => Ok(policy.clone()),
            _ => unreachable!("clap requires one of --ratio, --ranks, --policy"),
        }
    }
}

impl FitArgs {
    pub fn policy(&self, ranks: RankPolicy, image_size: i64) -> CompressionPolicy {
        CompressionPolicy {
            ranks,
            input_size: [image_size, image_size],
            method: self.method,
            round_to: self.round_to,
            fit: self.fit,
            timing: TimingSettings {
                cache: self.latency_cache.clone(),
                ..TimingSettings::default()
            },
        }
    }
}

impl ExperimentArgs {
    /// The run configuration these groups describe (epochs and policy are the caller's).
    pub fn config(&self) -> tucker_nb::Result<RunConfig> {
        let (data, train) = (&self.data, &self.train);
        let mut config = RunConfig::new(&data.data, &self.out, self.device.device()?);
        config.weights = data.weights.0.clone();
        set(&mut config.num_classes, data.num_classes);
        set(&mut config.image_size, data.image_size);
        config.train_limit = data.train_limit;
        config.val_limit = data.val_limit;
        config.storage.size = data.storage_size;
        set(&mut config.batch_size, train.batch_size);
        set(&mut config.eval_batch_size, train.eval_batch_size);
        set(&mut config.seed, train.seed);
        set(&mut config.calib_images, self.calib_images);
        config.recalibrate_bn = !self.no_bn_recalibration;
        set(&mut config.recipe, self.recipe);
        config.held_out_images = self.held_out_images;
        config.held_out_data = self.held_out_data.clone();
        let ft = &mut config.fine_tune;
        set(&mut ft.lr, train.lr);
        set(&mut ft.momentum, train.momentum);
        set(&mut ft.weight_decay, train.weight_decay);
        set(&mut ft.step_size, train.step_size);
        set(&mut ft.gamma, train.gamma);
        set(&mut ft.factor_lr_scale, train.factor_lr_scale);
        set(&mut ft.warmup_epochs, train.warmup_epochs);
        if train.min_crop.is_some() || train.no_flip {
            ft.augmentation = Some(Augmentation {
                min_crop: train.min_crop.unwrap_or(Augmentation::SEED.min_crop),
                flip: !train.no_flip,
            });
        }
        set(&mut ft.bn, train.bn);
        ft.bf16 = train.bf16;
        ft.channels_last = !train.no_channels_last;
        ft.distill = train.distill;
        ft.max_batches = train.max_batches;
        Ok(config)
    }
}

impl RunArgs {
    pub fn config(&self) -> tucker_nb::Result<RunConfig> {
        let mut config = self.experiment.config()?;
        set(&mut config.fine_tune.epochs, self.epochs);
        // The compressed model's epochs follow --epochs unless given apart.
        config.compressed_epochs = self
            .compressed_epochs
            .or(self.epochs)
            .unwrap_or(config.compressed_epochs);
        config.policy = self.fit.policy(self.ranks.ranks()?, config.image_size);
        config.stages = self
            .stages
            .iter()
            .map(|ranks| config.policy.with_ranks(ranks.clone()))
            .collect();
        set(&mut config.stage_epochs, self.stage_epochs);
        config.resume = self.resume;
        config.force = self.force;
        Ok(config)
    }
}
