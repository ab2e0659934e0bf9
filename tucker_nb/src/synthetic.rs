//! Generated datasets for tests, smoke runs and benchmarks (nothing can be downloaded there):
//! CIFAR-shaped images whose class shows in their colour and stripe pattern, so a network can
//! learn them, written as an ImageFolder tree of PNGs or as CIFAR-100 binary files.

use std::fs;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::data::CIFAR100_CLASSES;
use crate::error::{Error, Result};

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyntheticSpec {
    pub classes: usize,
    pub train_per_class: usize,
    pub val_per_class: usize,
    /// Square image side.
    pub size: u32,
    pub seed: u64,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        Self {
            classes: 10,
            train_per_class: 20,
            val_per_class: 10,
            size: 32,
            seed: 0,
        }
    }
}

/// Output layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SyntheticFormat {
    /// `root/{train,val}/class_NNN/NNNNN.png`, the seed's layout.
    ImageFolder,
    /// `root/{train,test}.bin` + `fine_label_names.txt`, as the CIFAR-100 binary release
    /// (32 px only; labels below 100).
    #[value(name = "cifar100")]
    Cifar100Binary,
}

/// One image of class `class` as interleaved RGB bytes.
fn render(class: usize, classes: usize, size: u32, rng: &mut StdRng) -> Vec<u8> {
    let hue = class as f32 / classes as f32;
    let base = [
        (0.5 + 0.5 * (std::f32::consts::TAU * hue).cos()) * 200.0,
        (0.5 + 0.5 * (std::f32::consts::TAU * (hue + 1.0 / 3.0)).cos()) * 200.0,
        (0.5 + 0.5 * (std::f32::consts::TAU * (hue + 2.0 / 3.0)).cos()) * 200.0,
    ];
    let angle = std::f32::consts::PI * (class % 4) as f32 / 4.0;
    let freq = 2.0 + (class / 4 % 4) as f32;
    let phase: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let brightness: f32 = rng.random_range(-20.0..20.0);
    let mut pixels = Vec::with_capacity((size * size * 3) as usize);
    for y in 0..size {
        for x in 0..size {
            let t = (x as f32 * angle.cos() + y as f32 * angle.sin()) / size as f32;
            let stripe = 30.0 * (std::f32::consts::TAU * freq * t + phase).sin();
            for b in base {
                let noise: f32 = rng.random_range(-25.0..25.0);
                pixels.push((b + stripe + brightness + noise).clamp(0.0, 255.0) as u8);
            }
        }
    }
    pixels
}

/// Writes the dataset under `root` (which must not exist yet: it is built in a temporary sibling
/// and renamed into place). Returns the number of images written.
pub fn generate(root: &Path, spec: SyntheticSpec, format: SyntheticFormat) -> Result<usize> {
    if spec.classes == 0 || spec.train_per_class == 0 || spec.val_per_class == 0 || spec.size == 0 {
        return Err(Error::value(
            "synthetic spec",
            format!("{spec:?} (every count must be ≥ 1)"),
        ));
    }
    if format == SyntheticFormat::Cifar100Binary
        && (spec.size != 32 || spec.classes > CIFAR100_CLASSES)
    {
        return Err(Error::value(
            "synthetic spec",
            "the CIFAR-100 binary format holds 32 px images of ≤ 100 classes",
        ));
    }
    crate::io::create_dir_atomic(root, |tmp| write_splits(tmp, spec, format))
}

fn write_splits(dir: &Path, spec: SyntheticSpec, format: SyntheticFormat) -> Result<usize> {
    let mut total = 0;
    for (split, per_class, salt) in [
        ("train", spec.train_per_class, 1u64),
        ("val", spec.val_per_class, 2u64),
    ] {
        let n = spec.classes * per_class;
        // Class-interleaved order, one RNG per image: output independent of thread scheduling.
        let images: Vec<(usize, Vec<u8>)> = (0..n)
            .into_par_iter()
            .map(|i| {
                let class = i % spec.classes;
                let mut rng = StdRng::seed_from_u64(
                    spec.seed.wrapping_mul(1_000_003) ^ (salt << 40) ^ i as u64,
                );
                (class, render(class, spec.classes, spec.size, &mut rng))
            })
            .collect();
        match format {
            SyntheticFormat::ImageFolder => write_image_folder(&dir.join(split), spec, &images)?,
            SyntheticFormat::Cifar100Binary => {
                let file = if split == "train" {
                    "train.bin"
                } else {
                    "test.bin"
                };
                write_cifar_bin(dir, &dir.join(file), &images)?
            }
        }
        total += n;
    }
    if format == SyntheticFormat::Cifar100Binary {
        let names: String = (0..CIFAR100_CLASSES)
            .map(|i| format!("class_{i:03}\n"))
            .collect();
        fs::write(dir.join("fine_label_names.txt"), names).map_err(|e| Error::file(dir, e))?;
    }
    Ok(total)
}

fn write_image_folder(dir: &Path, spec: SyntheticSpec, images: &[(usize, Vec<u8>)]) -> Result<()> {
    for class in 0..spec.classes {
        let d = dir.join(format!("class_{class:03}"));
        fs::create_dir_all(&d).map_err(|e| Error::file(&d, e))?;
    }
    images
        .par_iter()
        .enumerate()
        .try_for_each(|(i, (class, rgb))| {
            let path = dir
                .join(format!("class_{class:03}"))
                .join(format!("{i:05}.png"));
            image::save_buffer(&path, rgb, spec.size, spec.size, image::ColorType::Rgb8)
                .map_err(|e| Error::file(&path, e))
        })
}

fn write_cifar_bin(dir: &Path, path: &Path, images: &[(usize, Vec<u8>)]) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    let mut bytes = Vec::with_capacity(images.len() * 3074);
    for (class, rgb) in images {
        bytes.push((*class / 5) as u8); // coarse label: CIFAR-100 groups fine labels by five
        bytes.push(*class as u8);
        for c in 0..3 {
            bytes.extend(rgb.iter().skip(c).step_by(3));
        }
    }
    fs::write(path, bytes).map_err(|e| Error::file(path, e))
}
