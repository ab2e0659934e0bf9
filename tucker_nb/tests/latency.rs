//! `budget-latency:F` end to end on the CPU at tiny sizes: the table is measured once and then
//! read from its cache, every layer's predicted time is reported and none is slower than dense,
//! the forecast is checked against a measurement; `bench --model` and `bench --policy` on folded
//! and unfolded files; `bench`'s compression figures beside the seed's compressor; a cache that
//! cannot be written is refused before any work.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// A tiny compress with a latency budget into `dir`; returns the model file and its log.
fn compress(dir: &Path, cache: &Path, weights: &Path, fold: bool) -> (PathBuf, String) {
    let out = dir.join(if fold {
        "folded.safetensors"
    } else {
        "model.safetensors"
    });
    let report = dir.join(if fold { "folded.csv" } else { "model.csv" });
    let mut args = vec![
        "compress",
        "--weights",
        path_str(weights),
        "--num-classes",
        "10",
        "--policy",
        "budget-latency:0.6",
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--latency-cache",
        path_str(cache),
        "--out",
        path_str(&out),
        "--report",
        path_str(&report),
    ];
    if fold {
        args.push("--fold-bn");
    }
    let run = tucker_nb_ok(&args);
    let csv = Csv::read(&report);
    let (before, after) = (csv.column("ms_before"), csv.column("ms_after"));
    for ((layer, b), a) in csv.column("layer").iter().zip(&before).zip(&after) {
        let (b, a): (f64, f64) = (b.parse().unwrap(), a.parse().unwrap());
        assert!(
            b > 0.0 && a > 0.0 && a <= b,
            "{layer}: {a} ms after, {b} ms before"
        );
    }
    let log = [&run.stderr, &run.stdout].map(|b| String::from_utf8_lossy(b).into_owned());
    (out, log.concat())
}

/// `compress` with a fresh table, again while its log says another process disturbed the
/// measurement (then nothing is cached, by design), at most three times: the table it cached.
fn compress_measured(dir: &Path, cache: &Path, weights: &Path, fold: bool) -> String {
    for _ in 0..3 {
        let (_, log) = compress(dir, cache, weights, fold);
        assert!(log.contains("0 entries from the cache"), "{log}");
        if !log.contains("(not cached)") {
            return log;
        }
        eprintln!("a disturbed measurement, not cached; measuring again:\n{log}");
    }
    panic!("three latency tables in a row were disturbed and not cached");
}

#[test]
fn a_latency_budget_measures_once_reports_each_layer_and_checks_its_forecast() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let weights = torchvision_weights(dir.path(), 3);
    let first = compress_measured(dir.path(), &cache, &weights, false);
    assert!(first.contains("measured side by side"), "{first}");
    let (_, second) = compress(dir.path(), &cache, &weights, false);
    assert!(
        second.contains("everything from the cache (0 measured now)"),
        "the second plan measured again:\n{second}"
    );
    // Folding is part of the key: its own table, then its own cache.
    compress_measured(dir.path(), &cache, &weights, true);
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 2);
}

/// `bench` at tiny sizes with `args` (no compression figures unless asked): its side-by-side
/// rows and the JSON's.
fn bench(dir: &Path, args: &[&str]) -> (String, serde_json::Value) {
    let json = dir.join("bench.json");
    let mut full = vec![
        "bench",
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--repeats",
        "1",
        "--model-batches",
        "2",
        "--device",
        "cpu",
        "--json",
        path_str(&json),
    ];
    full.extend_from_slice(args);
    if !args.contains(&"--compress-repeats") {
        full.extend_from_slice(&["--compress-repeats", "0"]);
    }
    let run = tucker_nb_ok(&full);
    (
        String::from_utf8_lossy(&run.stdout).into_owned(),
        read_json(&json),
    )
}

#[test]
fn bench_takes_any_model_file_and_any_policy() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let weights = torchvision_weights(dir.path(), 4);
    let (unfolded, _) = compress(dir.path(), &cache, &weights, false);
    let (folded, _) = compress(dir.path(), &cache, &weights, true);
    let models = |json: &serde_json::Value| -> Vec<String> {
        json["side_by_side"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                assert!(
                    r["before_ms"].as_f64().unwrap() > 0.0 && r["speedup"].as_f64().unwrap() > 0.0
                );
                r["model"].as_str().unwrap().to_string()
            })
            .collect()
    };
    let (out, json) = bench(dir.path(), &["--model", path_str(&unfolded)]);
    assert!(out.contains("side by side"), "{out}");
    assert_eq!(models(&json), ["compressed", "compressed-folded"]);
    let modes: Vec<&str> = json["model"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["model"] == "compressed")
        .map(|r| r["mode"].as_str().unwrap())
        .collect();
    assert_eq!(
        modes,
        ["eval", "train_all", "train_seed"],
        "an unfolded model trains"
    );
    // A folded file is for inference: it is benched folded, in eval only.
    let (_, json) = bench(dir.path(), &["--model", path_str(&folded)]);
    assert_eq!(models(&json), ["compressed-folded"]);
    assert_eq!(json["compressed"], path_str(&folded));
    for policy in ["ratio:0.3", "budget-latency:0.6"] {
        let args = [
            "--policy",
            policy,
            "--weights",
            path_str(&weights),
            "--num-classes",
            "10",
        ];
        let mut args = args.to_vec();
        args.extend_from_slice(&["--latency-cache", path_str(&cache)]);
        let (_, json) = bench(dir.path(), &args);
        assert_eq!(json["policy"], policy);
        assert_eq!(models(&json), ["compressed", "compressed-folded"]);
    }
}

#[test]
fn bench_times_compression_beside_the_seeds_compressor() {
    let dir = tempfile::tempdir().unwrap();
    let weights = torchvision_weights(dir.path(), 4);
    let python = python();
    let args = [
        "--weights",
        path_str(&weights),
        "--num-classes",
        "10",
        "--compress-repeats",
        "1",
        "--seed-python",
        path_str(&python),
    ];
    let (out, json) = bench(dir.path(), &args);
    assert!(out.contains("== compress the dense model"), "{out}");
    let rows = json["compress_seconds"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["what"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "ratio:0.2",
            "budget-macs:0.2",
            "seed TuckerCompressor ratio:0.2"
        ]
    );
    for r in rows {
        assert!(r["seconds"].as_f64().unwrap() > 0.0, "{r}");
    }
}

#[test]
fn a_latency_cache_that_cannot_be_written_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let weights = torchvision_weights(dir.path(), 5);
    let not_a_folder = dir.path().join("a-file");
    std::fs::write(&not_a_folder, "").unwrap();
    let cache = not_a_folder.join("cache");
    let out = dir.path().join("out.safetensors");
    std::fs::write(&out, "previous result").unwrap();
    let err = tucker_nb_err(&[
        "compress",
        "--weights",
        path_str(&weights),
        "--policy",
        "budget-latency:0.5",
        "--image-size",
        "32",
        "--device",
        "cpu",
        "--latency-cache",
        path_str(&cache),
        "--out",
        path_str(&out),
    ]);
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(
        err.contains(path_str(&cache)) && !err.contains("latency table "),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "previous result");
}
