//! `tucker-nb`: the command-line face of the tucker_nb crate.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tucker_nb::{compress_model, runtime, CompressionPolicy, RankPolicy, ResNet18};

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
    Compress {
        /// Weights to compress: torchvision's .pth or a .safetensors file.
        #[arg(long)]
        weights: PathBuf,
        /// Classes of the classifier; a fresh fc is made when the file has another count.
        #[arg(long)]
        num_classes: Option<i64>,
        /// The seed's rule: ranks max(1, int(C·ratio)) per mode, every conv compressed.
        #[arg(long, conflicts_with = "ranks", required_unless_present = "ranks")]
        ratio: Option<f64>,
        /// JSON file {"layer1.0.conv1": [r_out, r_in], ...}; other layers stay dense.
        #[arg(long)]
        ranks: Option<PathBuf>,
        /// Output .safetensors (the seed's compressed state_dict keys).
        #[arg(long)]
        out: PathBuf,
        /// Per-layer report as CSV.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Image size at which the report counts MACs.
        #[arg(long, default_value_t = 224)]
        image_size: i64,
        /// cpu, cuda, cuda:N or auto.
        #[arg(long)]
        device: Option<String>,
    },
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

fn run(cli: Cli) -> anyhow::Result<()> {
    runtime::init();
    match cli.command {
        Command::Compress {
            weights,
            num_classes,
            ratio,
            ranks,
            out,
            report,
            image_size,
            device,
        } => {
            let device = runtime::select_device(device.as_deref())?;
            let ranks = match (ratio, ranks) {
                (Some(r), _) => RankPolicy::ratio(r)?,
                (None, Some(file)) => RankPolicy::from_ranks_file(&file)?,
                (None, None) => unreachable!("clap requires --ratio or --ranks"),
            };
            if out.extension().and_then(|e| e.to_str()) != Some("safetensors") {
                anyhow::bail!("{}: the output must be a .safetensors file", out.display());
            }
            let mut model = ResNet18::load(&weights, num_classes, device)?;
            let policy = CompressionPolicy {
                ranks,
                input_size: [image_size, image_size],
            };
            let layer_report = compress_model(&mut model, &policy)?;
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
            Ok(())
        }
    }
}
