//! scripts/fetch against a local HTTP server on 127.0.0.1 serving files the test makes: verified
//! downloads land, corrupt or truncated ones are deleted and reported, re-runs are no-ops, and the
//! CIFAR tarball unpacks into the layout `DataSource::detect` expects.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use common::*;
use sha2::{Digest, Sha256};

struct Server(Child, u16);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(dir: &Path) -> Server {
    let mut child = Command::new(python())
        .args([
            "-u",
            "-m",
            "http.server",
            "0",
            "--bind",
            "127.0.0.1",
            "--directory",
            path_str(dir),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // "Serving HTTP on 127.0.0.1 port 40123 (http://127.0.0.1:40123/) ..."
    let port = line
        .split("port ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|p| p.parse().ok());
    Server(child, port.unwrap_or_else(|| panic!("no port in {line:?}")))
}

fn fetch(args: &[&str]) -> Output {
    let script = workspace_root().join("scripts/fetch");
    Command::new(script).args(args).output().unwrap()
}

fn md5_hex(bytes: &[u8]) -> String {
    let out = Command::new(python())
        .args([
            "-c",
            "import hashlib,sys; print(hashlib.md5(sys.stdin.buffer.read()).hexdigest())",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(bytes)?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn downloads_are_verified_deleted_when_bad_and_unpacked() {
    let served = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    let weights = b"pretend these are ResNet18 weights".repeat(1000);
    std::fs::write(served.path().join("weights.pth"), &weights).unwrap();
    std::fs::write(served.path().join("corrupt.pth"), b"flipped bits").unwrap();
    // A CIFAR-shaped tarball: cifar-100-binary/{train,test}.bin.
    let gen = tempfile::tempdir().unwrap();
    let spec = tucker_nb::synthetic::SyntheticSpec {
        classes: 3,
        train_per_class: 2,
        val_per_class: 1,
        size: 32,
        seed: 0,
    };
    tucker_nb::synthetic::generate(
        &gen.path().join("cifar-100-binary"),
        spec,
        tucker_nb::synthetic::SyntheticFormat::Cifar100Binary,
    )
    .unwrap();
    let tar = served.path().join("cifar-100-binary.tar.gz");
    let ok = Command::new("tar")
        .args([
            "czf",
            path_str(&tar),
            "-C",
            path_str(gen.path()),
            "cifar-100-binary",
        ])
        .status()
        .unwrap();
    assert!(ok.success());
    let tar_md5 = md5_hex(&std::fs::read(&tar).unwrap());
    let sha: String = Sha256::digest(&weights)
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();

    let manifest = dest.path().join("manifest.tsv");
    std::fs::write(
        &manifest,
        format!(
            "# test manifest\nweights\thttp://unused/weights.pth\tweights.pth\tsha256-prefix\t{sha}\n\
             corrupt\thttp://unused/corrupt.pth\tcorrupt.pth\tmd5\t{}\n\
             missing\thttp://unused/missing.pth\tmissing.pth\tmd5\t{}\n\
             cifar100\thttp://unused/cifar-100-binary.tar.gz\tcifar-100-binary.tar.gz\tmd5\t{tar_md5}\n",
            "0".repeat(32),
            "0".repeat(32)
        ),
    )
    .unwrap();
    let server = serve(served.path());
    let base = format!("http://127.0.0.1:{}", server.1);
    let common = [
        "--manifest",
        path_str(&manifest),
        "--dest",
        path_str(dest.path()),
        "--base-url",
        &base,
    ];
    let run = |names: &[&str]| {
        let mut args: Vec<&str> = names.to_vec();
        args.extend_from_slice(&common);
        fetch(&args)
    };

    let out = run(&["weights", "cifar100"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(dest.path().join("weights.pth")).unwrap(),
        weights
    );
    let cifar = dest.path().join("cifar-100-binary");
    assert!(
        matches!(tucker_nb::DataSource::detect(dest.path()).unwrap(), tucker_nb::DataSource::Cifar100(d) if d == cifar)
    );

    let again = run(&["weights"]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("present, sha256-prefix verified"));

    for (name, expect) in [("corrupt", "does not match"), ("missing", "404")] {
        let out = run(&[name]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} succeeded");
        assert!(
            stderr.contains(&format!("{name}.pth")) && stderr.contains(expect),
            "{name}: {stderr}"
        );
        assert!(!dest.path().join(format!("{name}.pth")).exists());
        assert!(!dest.path().join(format!("{name}.pth.part")).exists());
    }

    // A present file that no longer verifies is fetched again.
    std::fs::write(dest.path().join("weights.pth"), b"truncated").unwrap();
    let out = run(&["weights"]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("downloading again")
    );
    assert_eq!(
        std::fs::read(dest.path().join("weights.pth")).unwrap(),
        weights
    );

    let unknown = run(&["imagenet"]);
    assert!(
        !unknown.status.success()
            && String::from_utf8_lossy(&unknown.stderr).contains("unknown download 'imagenet'")
    );
}

#[test]
fn an_empty_or_short_digest_is_refused_before_any_download() {
    let dest = tempfile::tempdir().unwrap();
    let manifest = dest.path().join("manifest.tsv");
    for (check, digest, expected) in [
        ("md5", "", "md5 digest '' must be 32 hex digits"),
        (
            "sha256-prefix",
            "f370",
            "sha256-prefix digest 'f370' must be 8-64 hex digits",
        ),
        ("md5", &"z".repeat(32), "must be 32 hex digits"),
    ] {
        std::fs::write(
            &manifest,
            format!("w\thttp://127.0.0.1:9/w.pth\tw.pth\t{check}\t{digest}\n"),
        )
        .unwrap();
        let out = fetch(&[
            "w",
            "--manifest",
            path_str(&manifest),
            "--dest",
            path_str(dest.path()),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{check} {digest:?} accepted");
        assert!(
            stderr.contains("manifest.tsv:1") && stderr.contains(expected),
            "{stderr}"
        );
        assert!(!dest.path().join("w.pth").exists());
    }
}
