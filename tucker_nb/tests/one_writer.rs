//! One writer per output: two commands on one folder or file never mix their results (the
//! second is refused at once, naming the output and the holder's PID); a killed writer leaves
//! no lock; a write that fails for want of space or on a read-only file system says so in one
//! line naming the output, and leaves the earlier file as it was; a negative count names its flag.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn binary() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tucker-nb"));
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

fn data(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    tucker_nb_ok(&[
        "gen-data",
        "--out",
        path_str(&data),
        "--classes",
        "4",
        "--train-per-class",
        "16",
        "--val-per-class",
        "4",
    ]);
    data
}

fn run_args<'a>(data: &'a Path, out: &'a Path, seed: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--data",
        path_str(data),
        "--weights",
        "none",
        "--num-classes",
        "4",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--ratio",
        "0.5",
        "--device",
        "cpu",
        "--seed",
        seed,
        "--out",
        path_str(out),
    ]
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn spawn(args: &[&str]) -> Child {
    binary().args(args).spawn().unwrap()
}

/// Starts two commands together; returns (first's output, second's output).
fn together(a: &[&str], b: &[&str]) -> (Output, Output) {
    let (first, second) = (spawn(a), spawn(b));
    (
        first.wait_with_output().unwrap(),
        second.wait_with_output().unwrap(),
    )
}

/// Exactly one of two outputs succeeded and the other was refused in one line naming `target`
/// and a PID; returns the index of the one that succeeded.
fn one_wins(outputs: [&Output; 2], target: &Path) -> usize {
    let ok: Vec<usize> = (0..2).filter(|&i| outputs[i].status.success()).collect();
    assert_eq!(ok.len(), 1, "exactly one succeeds: {outputs:?}");
    let loser = outputs[1 - ok[0]];
    assert_eq!(loser.status.code(), Some(1));
    let err = String::from_utf8_lossy(&loser.stderr);
    let line = err.trim();
    assert_eq!(line.lines().count(), 1, "{err}");
    assert!(
        line.contains("is being written by another tucker-nb (pid "),
        "{err}"
    );
    assert!(line.contains(&target.display().to_string()), "{err}");
    ok[0]
}

#[test]
fn two_runs_on_one_folder_leave_one_consistent_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let out = dir.path().join("out");
    let (a, b) = together(&run_args(&data, &out, "1"), &run_args(&data, &out, "2"));
    let winner = one_wins([&a, &b], &out);
    let seed = ["1", "2"][winner];
    let fingerprint = read_json(&out.join("run.json"));
    assert_eq!(fingerprint["seed"], seed, "run.json is the winner's");
    let summary = read_json(&out.join("summary.json"));
    let stdout = String::from_utf8_lossy(&[&a, &b][winner].stdout).into_owned();
    let last = stdout
        .lines()
        .find(|l| l.starts_with("top-1:"))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap()
        .to_string();
    let fine_tuned = summary["fine_tuned"]["top1"].as_f64().unwrap();
    assert_eq!(
        format!("{fine_tuned:.4}"),
        last,
        "summary.json is the winner's"
    );
    // The models are the winner's: evaluating its compressed model gives its summary's figure.
    let eval = tucker_nb_ok(&[
        "evaluate",
        "--model",
        path_str(&out.join("compressed.safetensors")),
        "--num-classes",
        "4",
        "--data",
        path_str(&data),
        "--image-size",
        "32",
        "--device",
        "cpu",
    ]);
    let eval = String::from_utf8_lossy(&eval.stdout).into_owned();
    assert!(
        eval.contains(&format!("top-1 {fine_tuned:.4}")),
        "{eval} vs {summary}"
    );
}

#[test]
fn two_compresses_to_one_file_and_two_sweeps_to_one_folder_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let weights = torchvision_weights(dir.path(), 3);
    let out = dir.path().join("m.safetensors");
    let compress = |ratio: &'static str| {
        vec![
            "compress".to_string(),
            "--weights".into(),
            path_str(&weights).into(),
            "--num-classes".into(),
            "10".into(),
            "--ratio".into(),
            ratio.into(),
            "--out".into(),
            path_str(&out).into(),
            "--device".into(),
            "cpu".into(),
        ]
    };
    let (a, b) = (compress("0.5"), compress("0.25"));
    let (a, b) = (as_strs(&a), as_strs(&b));
    let (a, b) = together(&a, &b);
    one_wins([&a, &b], &out);

    let data = data(dir.path());
    let sweep_out = dir.path().join("sweep");
    let sweep = |policy: &'static str| -> Vec<&str> {
        vec![
            "sweep",
            "--data",
            path_str(&data),
            "--weights",
            "none",
            "--num-classes",
            "4",
            "--image-size",
            "32",
            "--policies",
            policy,
            "--device",
            "cpu",
            "--out",
            path_str(&sweep_out),
        ]
    };
    let (a, b) = together(&sweep("ratio:0.5"), &sweep("ratio:0.25"));
    let winner = one_wins([&a, &b], &sweep_out);
    let csv = std::fs::read_to_string(sweep_out.join("sweep.csv")).unwrap();
    assert!(csv.contains(["ratio:0.5", "ratio:0.25"][winner]), "{csv}");
}

#[test]
fn a_killed_writer_leaves_no_lock_and_its_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let out = dir.path().join("out");
    let mut args = run_args(&data, &out, "0");
    let epochs = args.iter().position(|&a| a == "--epochs").unwrap();
    args[epochs + 1] = "3";
    let mut child = spawn(&args);
    // Kill it once its first epoch is checkpointed.
    let index = out.join("original/checkpoint.json");
    let start = Instant::now();
    while !index.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it was killed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        out.join(tucker_nb::lock::FOLDER_LOCK).exists(),
        "the lock file stays"
    );
    let resume = [&args[..], &["--resume"]].concat();
    let run = tucker_nb_ok(&resume);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("top-1:"), "{stdout}");
    assert!(out.join("summary.json").exists());
    assert!(
        !out.join(tucker_nb::lock::FOLDER_LOCK).exists(),
        "a run that ends unlocks"
    );
}

/// A small tmpfs mounted for a test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                path_str(at),
            ])
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then(|| Self(at.to_path_buf()))
    }

    fn remount_read_only(&self) {
        let out = Command::new("mount")
            .args(["-o", "remount,ro", path_str(&self.0)])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
    }
}

#[test]
fn a_full_or_read_only_file_system_is_named_and_the_earlier_file_kept() {
    let dir = tempfile::tempdir().unwrap();
    let weights = torchvision_weights(dir.path(), 5);
    for (case, read_only, reason) in [
        ("full", false, "no space left on device"),
        ("read-only", true, "read-only file system"),
    ] {
        let Some(fs) = Tmpfs::mount(&dir.path().join(case), "1m") else {
            eprintln!("skipped: mounting a tmpfs is not allowed here ({case} file system case)");
            return;
        };
        let out = fs.0.join("m.safetensors");
        std::fs::write(&out, b"the earlier file").unwrap();
        if read_only {
            fs.remount_read_only();
        }
        let err = tucker_nb_err(&[
            "compress",
            "--weights",
            path_str(&weights),
            "--num-classes",
            "10",
            "--ratio",
            "0.5",
            "--out",
            path_str(&out),
            "--device",
            "cpu",
        ]);
        let line = err.trim();
        assert_eq!(line.lines().count(), 1, "{err}");
        assert!(line.contains(&out.display().to_string()), "{case}: {err}");
        assert!(line.contains(reason), "{case}: {err}");
        assert!(
            line.contains("the earlier file is unchanged"),
            "{case}: {err}"
        );
        assert!(
            !line.contains(".tmp-") && !line.contains("Os {"),
            "{case}: {err}"
        );
        assert_eq!(std::fs::read(&out).unwrap(), b"the earlier file", "{case}");
    }
}

#[test]
fn a_negative_count_names_its_flag() {
    let err = tucker_nb_err(&[
        "run",
        "--data",
        "d",
        "--weights",
        "none",
        "--out",
        "o",
        "--ratio",
        "0.2",
        "--epochs",
        "-1",
    ]);
    assert!(
        err.contains("'--epochs <EPOCHS>'") && err.contains("must be ≥ 0"),
        "{err}"
    );
}
