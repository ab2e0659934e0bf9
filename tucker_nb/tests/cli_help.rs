//! Every default `--help` shows is the library's: the CLI declares none of its own (its flags
//! override the library's configs), so the two cannot drift apart.

mod common;

use common::*;
use tch::Device;
use tucker_nb::bench::BenchConfig;
use tucker_nb::experiment::RunConfig;
use tucker_nb::export::{ExportConfig, ExportFormat};
use tucker_nb::synthetic::SyntheticSpec;
use tucker_nb::{sweep, CompressionPolicy, FineTuneConfig};

/// The `[default: …]` `--help` of `command` shows for `--flag`.
fn shown_default(command: &str, flag: &str) -> String {
    let run = tucker_nb_ok(&[command, "--help"]);
    let help = String::from_utf8_lossy(&run.stdout);
    let start = help
        .find(&format!("--{flag} <"))
        .unwrap_or_else(|| panic!("{command} --help has no --{flag}:\n{help}"));
    let entry = &help[start..];
    let end = entry[2..].find("\n      --").map_or(entry.len(), |e| e + 2);
    let entry = &entry[..end];
    let default = entry
        .split("[default: ")
        .nth(1)
        .and_then(|d| d.split(']').next())
        .unwrap_or_else(|| panic!("{command} --{flag} shows no default:\n{entry}"));
    default.to_string()
}

fn assert_defaults(command: &str, expected: &[(&str, String)]) {
    for (flag, value) in expected {
        assert_eq!(
            &shown_default(command, flag),
            value,
            "{command} --{flag}: the help's default is not the library's"
        );
    }
}

#[test]
fn run_and_sweep_show_the_library_run_and_fine_tune_defaults() {
    let run = RunConfig::new("", "", Device::Cpu);
    let ft = FineTuneConfig::default();
    let shared = vec![
        ("num-classes", run.num_classes.to_string()),
        ("image-size", run.image_size.to_string()),
        ("batch-size", run.batch_size.to_string()),
        ("eval-batch-size", run.eval_batch_size.to_string()),
        ("lr", ft.lr.to_string()),
        ("momentum", ft.momentum.to_string()),
        ("weight-decay", ft.weight_decay.to_string()),
        ("step-size", ft.step_size.to_string()),
        ("gamma", ft.gamma.to_string()),
        ("bn", "stats".to_string()),
        ("seed", run.seed.to_string()),
        ("calib-images", run.calib_images.to_string()),
    ];
    assert_eq!(
        format!("{:?}", ft.bn),
        "Statistics",
        "--bn's spelling of it"
    );
    assert_defaults("sweep", &shared);
    let mut run_flags = shared;
    run_flags.push(("epochs", ft.epochs.to_string()));
    run_flags.push(("stage-epochs", run.stage_epochs.to_string()));
    assert_defaults("run", &run_flags);
    assert_defaults(
        "sweep",
        &[
            ("epochs", sweep::DEFAULT_EPOCHS.to_string()),
            ("policies", sweep::DEFAULT_POLICIES.to_string()),
        ],
    );
}

#[test]
fn the_other_commands_show_their_library_configs_defaults() {
    let run = RunConfig::new("", "", Device::Cpu);
    let policy = CompressionPolicy::default();
    assert_defaults(
        "compress",
        &[
            ("image-size", policy.input_size[0].to_string()),
            ("calib-images", run.calib_images.to_string()),
        ],
    );
    assert_defaults(
        "evaluate",
        &[
            ("image-size", run.image_size.to_string()),
            ("batch-size", run.eval_batch_size.to_string()),
        ],
    );
    let export = ExportConfig::new("", ExportFormat::Onnx, "");
    assert_defaults(
        "export",
        &[
            ("image-size", export.image_size.to_string()),
            ("tolerance", export.tolerance.to_string()),
        ],
    );
    let spec = SyntheticSpec::default();
    assert_defaults(
        "gen-data",
        &[
            ("classes", spec.classes.to_string()),
            ("train-per-class", spec.train_per_class.to_string()),
            ("val-per-class", spec.val_per_class.to_string()),
            ("size", spec.size.to_string()),
            ("seed", spec.seed.to_string()),
        ],
    );
    let bench = BenchConfig::new("", Device::Cpu);
    assert_defaults(
        "bench",
        &[
            ("image-size", bench.run.image_size.to_string()),
            ("batch-size", bench.run.batch_size.to_string()),
            ("repeats", bench.repeats.to_string()),
            ("model-batches", bench.model_batches.to_string()),
            ("ratio", bench.run.policy.ranks.to_string()),
        ],
    );
}
