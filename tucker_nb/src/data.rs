//! Datasets: ImageFolder trees (torchvision's semantics) and the CIFAR-100 binary release, decoded
//! once, in parallel, into a uint8 N×3×H×W tensor, with an on-disk cache next to the data so a
//! second load (a re-run notebook cell) does not decode again.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use image::imageops::FilterType;
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use tch::Tensor;

use crate::error::{Error, Result};
use crate::io;

/// torchvision's `IMG_EXTENSIONS`, matched case-insensitively.
pub const IMG_EXTENSIONS: [&str; 9] = [
    "jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp",
];

/// Bumped whenever the decoded bytes for the same files would change.
const CACHE_FORMAT: &str = "tucker_nb-cache-v1";
/// CIFAR records: coarse label, fine label, 3×32×32 pixel bytes (R, G, B planes).
const CIFAR_RECORD: usize = 2 + 3 * 32 * 32;
pub const CIFAR100_CLASSES: usize = 100;

/// Which half of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    Train,
    /// `val/` of an ImageFolder root, `test.bin` of CIFAR-100.
    #[value(alias = "test")]
    Val,
}

impl Split {
    pub fn folder(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

/// An ImageFolder listing with torchvision's semantics: classes are the sorted sub-folder names,
/// labels their index, files walked in sorted order with torchvision's image extensions. Unlike
/// torchvision, hidden entries (names starting with `.`, such as `.ipynb_checkpoints`) are
/// skipped.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageFolder {
    pub root: PathBuf,
    pub classes: Vec<String>,
    /// (path, label), in torchvision's order.
    pub samples: Vec<(PathBuf, i64)>,
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMG_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Sorted entries of a folder, hidden ones skipped.
fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| Error::file(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| Error::file(dir, e)))
        .collect::<Result<_>>()?;
    entries.retain(|p| !is_hidden(p));
    entries.sort();
    Ok(entries)
}

/// Files under `dir` in the order of Python's `sorted(os.walk(dir, followlinks=True))`, then
/// sorted file names: by folder path, then name.
fn walk_files(dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
    for entry in sorted_entries(dir)? {
        if entry.is_dir() {
            walk_files(&entry, out)?;
        } else {
            out.push((dir.to_string_lossy().into_owned(), entry));
        }
    }
    Ok(())
}

impl ImageFolder {
    pub fn scan(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::file(root, "no such folder"));
        }
        let classes: Vec<String> = sorted_entries(root)?
            .into_iter()
            .filter(|p| p.is_dir())
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        if classes.is_empty() {
            return Err(Error::file(root, "no class folders"));
        }
        let mut samples = Vec::new();
        for (label, class) in classes.iter().enumerate() {
            let dir = root.join(class);
            let mut files = Vec::new();
            walk_files(&dir, &mut files)?;
            files.sort_by(|a, b| {
                a.0.cmp(&b.0)
                    .then_with(|| a.1.file_name().cmp(&b.1.file_name()))
            });
            let before = samples.len();
            samples.extend(
                files
                    .into_iter()
                    .map(|(_, p)| p)
                    .filter(|p| has_image_extension(p))
                    .map(|p| (p, label as i64)),
            );
            if samples.len() == before {
                return Err(Error::file(&dir, "class folder holds no image files"));
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
            classes,
            samples,
        })
    }
}

/// Decoded images and labels, ready for a loader (`loader::Loader`).
#[derive(Debug)]
pub struct Dataset {
    /// uint8 N × 3 × H × W on the CPU.
    pub images: Tensor,
    /// int64 N.
    pub labels: Tensor,
    pub classes: Vec<String>,
    /// One name per image, relative to the dataset root (`train/cat/1.png`, `test.bin#17`).
    pub names: Vec<String>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// (H, W) of the stored images.
    pub fn image_size(&self) -> (i64, i64) {
        let s = self.images.size();
        (s[2], s[3])
    }

    /// The first `n` images (or all), for quick runs.
    pub fn take(&self, n: usize) -> Dataset {
        let n = n.min(self.len()) as i64;
        Dataset {
            images: self.images.narrow(0, 0, n),
            labels: self.labels.narrow(0, 0, n),
            classes: self.classes.clone(),
            names: self.names[..n as usize].to_vec(),
        }
    }
}

#[cfg(test)]
impl Dataset {
    /// `n` random `size`-px images of one class (tests that need pixels, not content).
    pub(crate) fn random(n: i64, size: i64) -> Dataset {
        Dataset {
            images: Tensor::randint(
                256,
                [n, 3, size, size],
                (tch::Kind::Uint8, tch::Device::Cpu),
            ),
            labels: Tensor::zeros([n], (tch::Kind::Int64, tch::Device::Cpu)),
            classes: vec!["a".into()],
            names: (0..n).map(|i| i.to_string()).collect(),
        }
    }
}

/// How decoded images are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StorageOptions {
    /// Side of the square storage size. `None`: the images' own size when they all share one,
    /// else 256. Images of another size are resized (shorter side, bilinear) and centre-cropped
    /// to it.
    pub size: Option<u32>,
    /// Skip the on-disk cache (neither read nor written).
    pub no_cache: bool,
}

const DEFAULT_MIXED_STORAGE: u32 = 256;

/// What kind of dataset a root holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    /// `root/train/<class>/*` and `root/val/<class>/*`.
    ImageFolder(PathBuf),
    /// A folder with `train.bin`, `test.bin` (and `fine_label_names.txt`), as in
    /// `cifar-100-binary.tar.gz`.
    Cifar100(PathBuf),
}

impl DataSource {
    /// Recognises an ImageFolder root or a CIFAR-100 binary folder (also one level down, as the
    /// tarball unpacks into `cifar-100-binary/`).
    pub fn detect(root: &Path) -> Result<Self> {
        if root.join("train").is_dir() && root.join("val").is_dir() {
            return Ok(DataSource::ImageFolder(root.to_path_buf()));
        }
        for dir in [root.to_path_buf(), root.join("cifar-100-binary")] {
            if dir.join("train.bin").is_file() && dir.join("test.bin").is_file() {
                return Ok(DataSource::Cifar100(dir));
            }
        }
        Err(Error::file(
            root,
            "neither an ImageFolder root (train/ and val/) nor a CIFAR-100 binary folder (train.bin, test.bin)",
        ))
    }

    /// Loads one split.
    pub fn load(&self, split: Split, storage: StorageOptions) -> Result<Dataset> {
        match self {
            DataSource::ImageFolder(root) => {
                let folder = ImageFolder::scan(&root.join(split.folder()))?;
                decode_cached(&folder, root, storage)
            }
            DataSource::Cifar100(dir) => {
                let file = match split {
                    Split::Train => "train.bin",
                    Split::Val => "test.bin",
                };
                read_cifar100(&dir.join(file))
            }
        }
    }

    /// Loads train and val, checking that they have the same classes.
    pub fn load_both(&self, storage: StorageOptions) -> Result<(Dataset, Dataset)> {
        let train = self.load(Split::Train, storage)?;
        let val = self.load(Split::Val, storage)?;
        if train.classes != val.classes {
            let root = match self {
                DataSource::ImageFolder(r) | DataSource::Cifar100(r) => r,
            };
            let differ = train
                .classes
                .iter()
                .zip(&val.classes)
                .find(|(a, b)| a != b)
                .map(|(a, b)| format!("`{a}` in train/ vs `{b}` in val/"))
                .unwrap_or_else(|| {
                    format!(
                        "{} classes in train/, {} in val/",
                        train.classes.len(),
                        val.classes.len()
                    )
                });
            return Err(Error::file(
                root,
                format!("train and val class lists differ: {differ}"),
            ));
        }
        Ok((train, val))
    }
}

/// Parses a CIFAR-100 binary file (fine labels); class names from `fine_label_names.txt` beside it.
pub fn read_cifar100(path: &Path) -> Result<Dataset> {
    let bytes = fs::read(path).map_err(|e| Error::file(path, e))?;
    if bytes.is_empty() || bytes.len() % CIFAR_RECORD != 0 {
        return Err(Error::file(
            path,
            format!(
                "{} bytes is not a whole number of {CIFAR_RECORD}-byte CIFAR records (truncated?)",
                bytes.len()
            ),
        ));
    }
    let n = bytes.len() / CIFAR_RECORD;
    let mut pixels = Vec::with_capacity(n * (CIFAR_RECORD - 2));
    let mut labels = Vec::with_capacity(n);
    for (i, record) in bytes.chunks_exact(CIFAR_RECORD).enumerate() {
        let fine = record[1] as usize;
        if fine >= CIFAR100_CLASSES {
            return Err(Error::file(
                path,
                format!("record {i} has fine label {fine} (CIFAR-100 has 100)"),
            ));
        }
        labels.push(fine as i64);
        pixels.extend_from_slice(&record[2..]);
    }
    let names_file = path.with_file_name("fine_label_names.txt");
    let classes = if names_file.is_file() {
        let text = fs::read_to_string(&names_file).map_err(|e| Error::file(&names_file, e))?;
        let names: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        if names.len() != CIFAR100_CLASSES {
            return Err(Error::file(
                &names_file,
                format!("{} class names, expected 100", names.len()),
            ));
        }
        names
    } else {
        (0..CIFAR100_CLASSES)
            .map(|i| format!("class_{i:03}"))
            .collect()
    };
    let file = path.file_name().unwrap().to_string_lossy();
    Ok(Dataset {
        images: Tensor::from_slice(&pixels).view([n as i64, 3, 32, 32]),
        labels: Tensor::from_slice(&labels),
        classes,
        names: (0..n).map(|i| format!("{file}#{i}")).collect(),
    })
}

/// The cache key: decoder version, storage size, and every file's path, size and mtime.
fn cache_key(folder: &ImageFolder, storage: Option<u32>) -> Result<String> {
    let mut h = Sha256::new();
    h.update(CACHE_FORMAT);
    h.update(format!("{storage:?}"));
    for (path, label) in &folder.samples {
        let meta = fs::metadata(path).map_err(|e| Error::file(path, e))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_nanos());
        h.update(format!(
            "{}\0{}\0{}\0{mtime:?}\n",
            path.display(),
            label,
            meta.len()
        ));
    }
    Ok(h.finalize()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Decodes an ImageFolder listing, or loads its cached decode (`<root>/.tucker_nb_cache/`).
pub fn decode_cached(
    folder: &ImageFolder,
    root: &Path,
    storage: StorageOptions,
) -> Result<Dataset> {
    let names: Vec<String> = folder
        .samples
        .iter()
        .map(|(p, _)| {
            p.strip_prefix(root)
                .unwrap_or(p)
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let labels = Tensor::from_slice(&folder.samples.iter().map(|s| s.1).collect::<Vec<_>>());
    let split = folder
        .root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let cache = root.join(".tucker_nb_cache").join(format!(
        "{split}-{}.safetensors",
        cache_key(folder, storage.size)?
    ));
    if !storage.no_cache {
        if let Ok(cached) = Tensor::read_safetensors(&cache) {
            if let Some((_, images)) = cached.into_iter().find(|(n, _)| n == "images") {
                if images.size().first() == Some(&(names.len() as i64)) {
                    return Ok(Dataset {
                        images,
                        labels,
                        classes: folder.classes.clone(),
                        names,
                    });
                }
            }
        }
    }
    let images = decode_images(folder, storage.size)?;
    if !storage.no_cache {
        // A cache that cannot be written (read-only data) only costs the next load a decode.
        let written = fs::create_dir_all(cache.parent().unwrap())
            .map_err(|e| Error::file(&cache, e))
            .and_then(|()| {
                io::write_safetensors(&cache, &[("images".to_string(), images.shallow_clone())])
            });
        if let Err(e) = written {
            eprintln!("warning: decoded-image cache not written: {e}");
        }
    }
    Ok(Dataset {
        images,
        labels,
        classes: folder.classes.clone(),
        names,
    })
}

/// Decodes every image of the listing in parallel into uint8 N×3×S×S.
pub fn decode_images(folder: &ImageFolder, storage: Option<u32>) -> Result<Tensor> {
    let dims: Vec<(u32, u32)> = folder
        .samples
        .par_iter()
        .map(|(p, _)| {
            image::image_dimensions(p)
                .map_err(|e| Error::file(p, format!("cannot read image: {e}")))
        })
        .collect::<Result<_>>()?;
    let (w, h) = match storage {
        Some(s) => (s, s),
        None if dims.iter().all(|d| *d == dims[0]) => dims[0],
        None => (DEFAULT_MIXED_STORAGE, DEFAULT_MIXED_STORAGE),
    };
    let plane = (w * h) as usize;
    let mut pixels = vec![0u8; folder.samples.len() * 3 * plane];
    pixels
        .par_chunks_mut(3 * plane)
        .zip(folder.samples.par_iter())
        .try_for_each(|(out, (path, _))| -> Result<()> {
            let img = image::open(path)
                .map_err(|e| Error::file(path, format!("cannot decode image: {e}")))?;
            let mut rgb = img.to_rgb8();
            if rgb.dimensions() != (w, h) {
                rgb = resize_and_crop(&rgb, w, h);
            }
            for (i, px) in rgb.pixels().enumerate() {
                for c in 0..3 {
                    out[c * plane + i] = px[c];
                }
            }
            Ok(())
        })?;
    Ok(Tensor::from_slice(&pixels).view([folder.samples.len() as i64, 3, h as i64, w as i64]))
}

/// Shorter side to fit, bilinear, then the centre w×h.
fn resize_and_crop(img: &image::RgbImage, w: u32, h: u32) -> image::RgbImage {
    let (iw, ih) = img.dimensions();
    let scale = (w as f64 / iw as f64).max(h as f64 / ih as f64);
    let (rw, rh) = (
        ((iw as f64 * scale).round() as u32).max(w),
        ((ih as f64 * scale).round() as u32).max(h),
    );
    let resized = image::imageops::resize(img, rw, rh, FilterType::Triangle);
    image::imageops::crop_imm(&resized, (rw - w) / 2, (rh - h) / 2, w, h).to_image()
}

/// Writes CIFAR-100 binary splits as the seed's ImageFolder layout `out/{train,val}/<class>/N.png`.
/// Written into a temporary sibling folder and renamed at the end, so a failure leaves nothing.
pub fn convert_cifar100_to_image_folder(cifar_dir: &Path, out: &Path) -> Result<usize> {
    io::create_dir_atomic(out, |tmp| {
        let mut total = 0;
        for (file, split) in [("train.bin", "train"), ("test.bin", "val")] {
            let data = read_cifar100(&cifar_dir.join(file))?;
            let labels = Vec::<i64>::try_from(&data.labels).map_err(Error::Torch)?;
            // A folder per class that has images (an empty class folder is an ImageFolder error).
            let mut present: Vec<i64> = labels.clone();
            present.sort_unstable();
            present.dedup();
            for &label in &present {
                let dir = tmp.join(split).join(&data.classes[label as usize]);
                fs::create_dir_all(&dir).map_err(|e| Error::file(&dir, e))?;
            }
            let images = Vec::<u8>::try_from(data.images.flatten(0, -1)).map_err(Error::Torch)?;
            (0..data.len())
                .into_par_iter()
                .try_for_each(|i| -> Result<()> {
                    let chw = &images[i * 3072..(i + 1) * 3072];
                    let img = image::RgbImage::from_fn(32, 32, |x, y| {
                        let p = (y * 32 + x) as usize;
                        image::Rgb([chw[p], chw[1024 + p], chw[2048 + p]])
                    });
                    let path = tmp
                        .join(split)
                        .join(&data.classes[labels[i] as usize])
                        .join(format!("{i:05}.png"));
                    img.save(&path).map_err(|e| Error::file(&path, e))
                })?;
            total += data.len();
        }
        Ok(total)
    })
}
