//! `scripts/ddp-finetune` on CPU with gloo: a compressed model fine-tuned on two processes loads in
//! `tucker-nb evaluate` with the script's own final top-1 and has learned; the two ranks' shards
//! are disjoint; 2 processes × batch B give 1 process × batch 2B's weights; bad files are refused
//! before any process starts.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use common::*;
use tch::{Device, Kind, Tensor};
use tucker_nb::synthetic::{self, SyntheticFormat, SyntheticSpec};
use tucker_nb::train::METRICS_COLUMNS;

const TRAIN_IMAGES: usize = 256;

/// 4 learnable classes, 64 training and 8 validation images each, 32 px.
fn dataset(dir: &Path) -> PathBuf {
    let root = dir.join("data");
    let spec = SyntheticSpec {
        classes: 4,
        train_per_class: TRAIN_IMAGES / 4,
        val_per_class: 8,
        size: 32,
        seed: 1,
    };
    synthetic::generate(&root, spec, SyntheticFormat::ImageFolder).unwrap();
    root
}

/// Random 4-class torchvision weights (seeded, so the run is the same every time) compressed with
/// the seed's rule (ratio 0.5).
fn compressed_model(dir: &Path) -> PathBuf {
    let weights = dir.join("resnet18-4-classes.pth");
    oracle(&[
        "make-weights",
        path_str(&weights),
        "--num-classes",
        "4",
        "--seed",
        "21",
    ]);
    let out = dir.join("compressed.safetensors");
    tucker_nb_ok(&[
        "compress",
        "--weights",
        path_str(&weights),
        "--num-classes",
        "4",
        "--ratio",
        "0.5",
        "--out",
        path_str(&out),
        "--device",
        "cpu",
    ]);
    out
}

/// One thread per process: the intra-op thread count changes libtorch's CPU reduction order (a
/// 1-process run on 2 threads differs from one on 1 thread by ~5e-5 after 8 steps), which would
/// hide what the batch-equivalence test measures, the split over processes alone.
fn ddp_finetune(args: &[&str]) -> Output {
    let script = workspace_root().join("scripts/ddp-finetune");
    Command::new(script)
        .args(args)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap()
}

/// The flags of one epoch of fine-tuning into `out` on `nproc` processes of `batch` images each.
fn ddp_args(weights: &Path, data: &Path, out: &Path, nproc: usize, batch: usize) -> Vec<String> {
    let flags = [
        ("--weights", path_str(weights).to_string()),
        ("--data", path_str(data).to_string()),
        ("--num-classes", "4".into()),
        ("--image-size", "32".into()),
        ("--epochs", "1".into()),
        ("--batch-size", batch.to_string()),
        ("--nproc", nproc.to_string()),
        ("--out", path_str(out).to_string()),
    ];
    flags
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_string(), value])
        .collect()
}

fn ddp_run(weights: &Path, data: &Path, out: &Path, nproc: usize, batch: usize, extra: &[&str]) {
    let mut args = ddp_args(weights, data, out, nproc, batch);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = ddp_finetune(&args);
    assert!(
        run.status.success(),
        "ddp-finetune {args:?} failed:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

/// `tucker-nb evaluate` on the validation split: (images right, mean loss).
fn evaluate(model: &Path, data: &Path) -> (i64, f64) {
    let run = tucker_nb_ok(&[
        "evaluate",
        "--model",
        path_str(model),
        "--num-classes",
        "4",
        "--data",
        path_str(data),
        "--image-size",
        "32",
        "--device",
        "cpu",
    ]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    // "32 images: top-1 0.7188, ..."
    let images: f64 = stdout
        .split(" images")
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let figure = |label: &str| -> f64 {
        stdout
            .split(label)
            .nth(1)
            .and_then(|s| s.split(',').next())
            .unwrap_or_else(|| panic!("no `{label}` in {stdout}"))
            .parse()
            .unwrap()
    };
    ((figure("top-1 ") * images).round() as i64, figure("loss "))
}

fn evaluate_correct(model: &Path, data: &Path) -> i64 {
    evaluate(model, data).0
}

/// The generated data and the compressed model, made once for every test here.
fn fixture() -> &'static (PathBuf, PathBuf) {
    static FIXTURE: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("scaling-out");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        (dataset(&dir), compressed_model(&dir))
    })
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    read(path)
}

#[test]
fn a_compressed_model_fine_tuned_on_two_processes_has_learned_and_evaluates_the_same_in_tucker_nb()
{
    tucker_nb::runtime::init();
    let dir = tempfile::tempdir().unwrap();
    let (data, input) = fixture();
    let out = dir.path().join("ddp");
    // BN frozen: the input's running statistics are random weights' and would need recalibrating
    // (`tucker-nb run` does) before batch-statistic training evaluates well.
    ddp_run(input, data, &out, 2, 8, &["--bn", "frozen"]);

    let report = read_json(&out.join("ddp.json"));
    assert_eq!(report["world_size"], 2);
    assert_eq!(report["backend"], "gloo");
    assert_eq!(report["trainable"], "tucker");
    let script_correct = report["after"]["correct"].as_i64().unwrap();
    let ours = evaluate_correct(&out.join("finetuned.safetensors"), data);
    assert!(
        (ours - script_correct).abs() <= 1,
        "tucker-nb evaluate: {ours}/32 right, the script's final evaluation {script_correct}/32"
    );
    let before = evaluate_correct(input, data);
    assert_eq!(report["before"]["correct"].as_i64().unwrap(), before);
    assert!(
        ours > before,
        "top-1 did not rise: {before}/32 before, {ours}/32 after one epoch"
    );

    let (trained, given) = (tensors(&out.join("finetuned.safetensors")), tensors(input));
    let keys = |m: &HashMap<String, Tensor>| m.keys().cloned().collect::<BTreeSet<_>>();
    assert_eq!(keys(&trained), keys(&given));
    for (k, t) in &given {
        assert_eq!(trained[k].kind(), t.kind(), "{k}");
        assert_eq!(trained[k].size(), t.size(), "{k}");
    }
    let metrics = Csv::read(&out.join("metrics.csv"));
    assert_eq!(metrics.header, METRICS_COLUMNS);
    assert_eq!(metrics.column("phase"), ["compressed"]);
    let logged: f64 = metrics.column("val_top1")[0].parse().unwrap();
    assert!((logged * 32.0 - script_correct as f64).abs() < 1e-6);
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn two_processes_see_disjoint_shards_and_evaluate_rank_zeros_statistics() {
    tucker_nb::runtime::init();
    let dir = tempfile::tempdir().unwrap();
    let (data, input) = fixture();
    let out = dir.path().join("ddp");
    // 126 images: 63 each, the 2 images the shuffle leaves over are dropped, never shared.
    let extra = ["--record-shards", "--train-limit", "126"];
    ddp_run(input, data, &out, 2, 8, &extra);
    let shards = read_json(&out.join("shards.json"));
    let epoch = shards[0].as_array().unwrap();
    assert_eq!(epoch.len(), 2, "one list per rank");
    let rank = |r: usize| -> Vec<i64> {
        epoch[r]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect()
    };
    let (a, b) = (rank(0), rank(1));
    assert_eq!((a.len(), b.len()), (63, 63));
    let (sa, sb): (BTreeSet<i64>, BTreeSet<i64>) =
        (a.iter().copied().collect(), b.iter().copied().collect());
    assert_eq!(sa.len(), 63, "rank 0 saw an image twice");
    assert!(sa.is_disjoint(&sb), "shared: {:?}", sa.intersection(&sb));
    assert!(sa.union(&sb).all(|&i| (0..126).contains(&i)));

    // With batch-statistic BN (the default), each rank's running statistics drift from rank 0's
    // after its last batch: the script must still evaluate the model it saves.
    let report = read_json(&out.join("ddp.json"));
    assert_eq!(report["bn"], "stats");
    let script_correct = report["after"]["correct"].as_i64().unwrap();
    let script_loss = report["after"]["loss"].as_f64().unwrap();
    let (ours, loss) = evaluate(&out.join("finetuned.safetensors"), data);
    assert!(
        (ours - script_correct).abs() <= 1,
        "{ours} vs {script_correct}"
    );
    // evaluate prints 4 decimals.
    assert!(
        (loss - script_loss).abs() <= 1e-4 + 1e-4 * loss.abs(),
        "tucker-nb evaluate's loss {loss}, the script's {script_loss}"
    );
}

/// Two ranks of batch B sum to one step over the same 2B images as one rank of batch 2B (the
/// sampler's permutation is the world's, each image's crop its own): the weights agree up to
/// floating-point summation order. On 128 images (8 steps), one thread per process: tolerance
/// |Δ| ≤ 1e-5·(1 + max|w|) per tensor (measured 4e-7; 2e-6 after 16 steps, as rounding differences
/// compound), while fine-tuning moves weights by > 1e-3. BN is frozen, as batch statistics over
/// B images differ from those over 2B by design (--sync-bn).
#[test]
fn two_processes_of_batch_b_match_one_process_of_batch_2b() {
    tucker_nb::runtime::init();
    let dir = tempfile::tempdir().unwrap();
    let (data, input) = fixture();
    let (two, one) = (dir.path().join("two"), dir.path().join("one"));
    let extra = ["--bn", "frozen", "--train-limit", "128"];
    ddp_run(input, data, &two, 2, 8, &extra);
    ddp_run(input, data, &one, 1, 16, &extra);
    let (two, one, given) = (
        tensors(&two.join("finetuned.safetensors")),
        tensors(&one.join("finetuned.safetensors")),
        tensors(input),
    );
    let (mut moved, mut worst): (f64, f64) = (0.0, 0.0);
    for (k, w) in &one {
        if !w.is_floating_point() {
            assert!(w.equal(&two[k]), "{k}");
            continue;
        }
        let scale = 1.0 + w.abs().max().double_value(&[]);
        let diff = (&two[k] - w).abs().max().double_value(&[]);
        assert!(diff <= 1e-5 * scale, "{k}: 2×8 and 1×16 differ by {diff}");
        worst = worst.max(diff / scale);
        moved = moved.max((w - &given[k]).abs().max().double_value(&[]));
    }
    assert!(moved > 1e-3, "fine-tuning moved no weight: {moved}");
    eprintln!("2×8 vs 1×16: worst |Δ|/(1 + max|w|) {worst:.2e}, largest move {moved:.2e}");
}

#[test]
fn a_bad_file_is_refused_before_any_process_starts() {
    tucker_nb::runtime::init();
    let dir = tempfile::tempdir().unwrap();
    let (data, input) = fixture();
    let mut state: Vec<(String, Tensor)> = Tensor::read_safetensors(input).unwrap();
    let without = |key: &str| -> Vec<(String, Tensor)> {
        state
            .iter()
            .filter(|(k, _)| k != key)
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect()
    };
    let missing = dir.path().join("missing.safetensors");
    Tensor::write_safetensors(&without("layer2.1.bn2.running_var"), &missing).unwrap();
    // The core of layer1.0.conv1 given 8 input channels more than its first factor makes.
    for (k, t) in state.iter_mut() {
        if k == "layer1.0.conv1.1.weight" {
            let s = t.size();
            *t = Tensor::zeros([s[0], s[1] + 8, s[2], s[3]], (Kind::Float, Device::Cpu));
        }
    }
    let misfit = dir.path().join("misfit.safetensors");
    Tensor::write_safetensors(&state, &misfit).unwrap();
    let not_a_model = dir.path().join("notes.safetensors");
    std::fs::write(&not_a_model, b"not a safetensors file").unwrap();

    for (file, says) in [
        (&missing, "layer2.1.bn2.running_var"),
        (&misfit, "layer1.0.conv1.1.weight"),
        (&not_a_model, "not a readable model file"),
    ] {
        let out = dir.path().join("never");
        let args = ddp_args(file, data, &out, 2, 8);
        let run = ddp_finetune(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{stderr}");
        let line = stderr.trim();
        assert!(
            line.starts_with("ddp-finetune: error: ")
                && line.contains(path_str(file))
                && line.contains(says)
                && !line.contains('\n'),
            "{line}"
        );
        // The folder is made only once the checks pass, just before torchrun starts.
        assert!(!out.exists(), "{}", file.display());
        assert!(!stderr.contains("torch.distributed"), "{stderr}");
    }
}
