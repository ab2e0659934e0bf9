//! Bounded, seeded random-mutation tests of every reader of untrusted bytes: the torch.save
//! pickle and zip reader, the safetensors loader, the CIFAR-100 reader and the image decoder.
//! Each case must give an `Err` or a valid result: never a panic (an abort would end the test
//! binary, which fails it too).

mod common;

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use common::craft::{state_dict_pickle, torch_zip_bytes, Entry};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::{Device, Kind, Tensor};

/// One random mutation of `bytes`: flipped, overwritten, inserted, deleted, duplicated or cut.
fn mutate(bytes: &[u8], rng: &mut StdRng) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let len = out.len().max(1);
        let at = rng.random_range(0..len);
        let byte = at.min(out.len().saturating_sub(1));
        match rng.random_range(0..7) {
            0 if !out.is_empty() => out[byte] ^= 1 << rng.random_range(0..8),
            1 if !out.is_empty() => out[byte] = rng.random(),
            2 => {
                let n = rng.random_range(1..=8);
                let junk: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                out.splice(at.min(out.len())..at.min(out.len()), junk);
            }
            3 if !out.is_empty() => {
                let end = (at + rng.random_range(1..=16)).min(out.len());
                out.drain(at.min(out.len())..end);
            }
            4 if !out.is_empty() => {
                let start = at.min(out.len() - 1);
                let end = (start + rng.random_range(1..=32)).min(out.len());
                let copy = out[start..end].to_vec();
                let to = rng.random_range(0..=out.len());
                out.splice(to..to, copy);
            }
            5 => out.truncate(at),
            // Interesting integers where a size or count may sit.
            _ if out.len() >= 4 => {
                let v: u32 = [0, 1, 0x7fff_ffff, 0xffff_ffff, 1 << 20][rng.random_range(0..5)];
                let at = at.min(out.len() - 4);
                out[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            _ => {}
        }
    }
    out
}

/// Runs `case` on `cases` mutations of `seed_bytes`; fails on the first panic, naming the case.
/// `case` says whether the reader accepted the bytes; both outcomes must occur, so the
/// mutations reach past the first check and the readers refuse some of them.
fn fuzz(name: &str, seed_bytes: &[u8], cases: usize, mut case: impl FnMut(&[u8]) -> bool) {
    let mut rng = StdRng::seed_from_u64(0x5eed ^ name.len() as u64);
    let mut accepted = 0;
    for i in 0..cases {
        let bytes = mutate(seed_bytes, &mut rng);
        match catch_unwind(AssertUnwindSafe(|| case(&bytes))) {
            Ok(ok) => accepted += ok as usize,
            Err(_) => panic!("{name}: case {i} panicked on {} bytes", bytes.len()),
        }
    }
    eprintln!("{name}: {accepted} of {cases} mutations accepted");
    assert!(
        0 < accepted && accepted < cases,
        "{name}: {accepted} of {cases} accepted"
    );
}

/// A state_dict of three tensors over two storages, as torch.save lays it out.
fn small_state_dict() -> (Vec<u8>, HashMap<String, Vec<u8>>) {
    let pickle = state_dict_pickle(&[
        Entry {
            name: "a.weight",
            storage: "0",
            kind: "FloatStorage",
            numel: 12,
            offset: 0,
            size: &[3, 4],
            stride: &[4, 1],
        },
        Entry {
            name: "a.bias",
            storage: "0",
            kind: "FloatStorage",
            numel: 12,
            offset: 8,
            size: &[4],
            stride: &[1],
        },
        Entry {
            name: "bn.num_batches_tracked",
            storage: "1",
            kind: "LongStorage",
            numel: 1,
            offset: 0,
            size: &[],
            stride: &[],
        },
    ]);
    let floats: Vec<u8> = (0..12).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let storages = HashMap::from([
        ("0".to_string(), floats),
        ("1".to_string(), 7i64.to_le_bytes().to_vec()),
    ]);
    (pickle, storages)
}

#[test]
fn the_crafted_state_dict_reads_back_exactly() {
    let (pickle, storages) = small_state_dict();
    let tensors =
        tucker_nb::torch_pickle::read_tensors(&pickle, |key, _| Ok(storages[key].clone())).unwrap();
    let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a.weight", "a.bias", "bn.num_batches_tracked"]);
    let expected = Tensor::arange(12, (Kind::Float, Device::Cpu)).view([3, 4]);
    assert!(tensors[0].1.equal(&expected));
    assert!(tensors[1]
        .1
        .equal(&Tensor::from_slice(&[8f32, 9., 10., 11.])));
    assert_eq!(tensors[2].1.int64_value(&[]), 7);
}

#[test]
fn mutated_pickles_give_errors_or_tensors_never_a_panic() {
    let (pickle, storages) = small_state_dict();
    fuzz("pickle", &pickle, 4000, |bytes| {
        let read = tucker_nb::torch_pickle::read_tensors(bytes, |key, declared| {
            let data = storages.get(key).cloned().unwrap_or_default();
            // Serve what the pickle asks for when it is small: the view checks must hold then too.
            match declared <= 4096 {
                true => Ok(data.into_iter().cycle().take(declared as usize).collect()),
                false => Err(format!("{declared} bytes")),
            }
        });
        read.is_ok()
    });
}

#[test]
fn mutated_torch_zips_give_errors_or_tensors_never_a_panic() {
    let (pickle, storages) = small_state_dict();
    let zip = torch_zip_bytes(&pickle, &[("0", &storages["0"]), ("1", &storages["1"])]);
    fuzz("torch zip", &zip, 3000, |bytes| {
        tucker_nb::torch_pickle::read_torch_archive(std::io::Cursor::new(bytes)).is_ok()
    });
}

fn with_file(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn mutated_safetensors_files_give_errors_or_tensors_never_a_panic() {
    tucker_nb::runtime::init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seed.safetensors");
    let a = Tensor::arange(12, (Kind::Float, Device::Cpu)).view([3, 4]);
    let b = Tensor::from_slice(&[1i64, 2, 3]);
    Tensor::write_safetensors(&[("a", &a), ("b", &b)], &path).unwrap();
    let seed = std::fs::read(&path).unwrap();
    fuzz("safetensors", &seed, 2000, |bytes| {
        let p = with_file(dir.path(), "case.safetensors", bytes);
        tucker_nb::read_state_dict(&p).is_ok()
    });
}

#[test]
fn mutated_cifar_files_give_errors_or_datasets_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut record = vec![3u8, 17];
    record.extend((0..3072).map(|i| (i % 251) as u8));
    let seed: Vec<u8> = record
        .iter()
        .cycle()
        .take(record.len() * 3)
        .copied()
        .collect();
    fuzz("cifar", &seed, 2000, |bytes| {
        let p = with_file(dir.path(), "test.bin", bytes);
        let read = tucker_nb::data::read_cifar100(&p);
        if let Ok(data) = &read {
            assert_eq!(data.images.size()[1..], [3, 32, 32]);
            assert_eq!(data.len() * 3074, bytes.len());
        }
        read.is_ok()
    });
}

#[test]
fn mutated_images_decode_or_fail_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let class = dir.path().join("train/a");
    std::fs::create_dir_all(&class).unwrap();
    let img = image::RgbImage::from_fn(12, 9, |x, y| image::Rgb([x as u8 * 20, y as u8 * 25, 90]));
    for (format, ext, cases) in [
        (image::ImageFormat::Png, "png", 1200),
        (image::ImageFormat::Jpeg, "jpg", 1200),
        (image::ImageFormat::Bmp, "bmp", 600),
    ] {
        let mut seed = std::io::Cursor::new(Vec::new());
        img.write_to(&mut seed, format).unwrap();
        let case_path = class.join(format!("case.{ext}"));
        fuzz(ext, seed.get_ref(), cases, |bytes| {
            std::fs::write(&case_path, bytes).unwrap();
            let folder = tucker_nb::data::ImageFolder::scan(&dir.path().join("train")).unwrap();
            let decoded = tucker_nb::data::decode_images(&folder, Some(16));
            if let Ok(images) = &decoded {
                assert_eq!(images.size(), [1, 3, 16, 16]);
            }
            decoded.is_ok()
        });
        std::fs::remove_file(&case_path).unwrap();
    }
}
