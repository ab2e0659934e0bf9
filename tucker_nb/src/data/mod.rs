//! Datasets: ImageFolder trees (torchvision's semantics) and the CIFAR-100 binary release, decoded
//! once, in parallel, into a uint8 N×3×H×W tensor, with an on-disk cache next to the data so a
//! second load (a re-run notebook cell) does not decode again.

use std::fs;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use sha2::{Digest, Sha256};
use tch::Tensor;

mod decode;

use decode::decode_into_cache;
pub use decode::{decode_images, MAX_DECODE_BYTES, MAX_DECODE_SIDE, MAX_RESIZE_PIXELS};

use crate::cache::{self, MappedImages};
use crate::error::{Error, Result};
use crate::io;

/// torchvision's `IMG_EXTENSIONS`, matched case-insensitively.
pub const IMG_EXTENSIONS: [&str; 9] = [
    "jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp",
];

/// Bumped whenever the decoded bytes for the same files would change.
const CACHE_FORMAT: &str = "tucker_nb-cache-v2";
/// The `image` crate's version (from Cargo.lock, by build.rs): a new decoder may decode the same
/// file to other bytes.
const IMAGE_DECODER: &str = env!("TUCKER_NB_IMAGE_DECODER");
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
    /// A digest of what the images and labels were made from (file contents, decoder, storage
    /// size, selection): equal keys, equal data. Run folders record it ([`crate::experiment`]).
    pub key: String,
    /// The cache file `images` views, when it is memory-mapped ([`crate::cache`]).
    pub mapped: Option<&'static MappedImages>,
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
        let key = match n as usize == self.len() {
            true => self.key.clone(),
            false => format!("{}:first{n}", self.key),
        };
        Dataset {
            images: self.images.narrow(0, 0, n),
            labels: self.labels.narrow(0, 0, n),
            classes: self.classes.clone(),
            names: self.names[..n as usize].to_vec(),
            key,
            mapped: self.mapped,
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
            key: format!("random-{n}-{size}"),
            mapped: None,
        }
    }
}

/// How decoded images are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct StorageOptions {
    /// Side of the square storage size. `None`: the images' own size when they all share one,
    /// else 256. Images of another size are resized (shorter side, bilinear) and centre-cropped
    /// to it.
    pub size: Option<u32>,
    /// Skip the on-disk cache (neither read nor written; the images are the same).
    #[serde(skip)]
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
    let key = hex(&Sha256::digest(&bytes)[..12]);
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
        check_class_names(&names).map_err(|m| Error::file(&names_file, m))?;
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
        key: format!("cifar100-{key}"),
        mapped: None,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Class names become folder names (`convert-cifar`): each must be a plain, visible file name
/// (no path separator, not `.` or `..`, no leading dot, no control character), and unique.
pub fn check_class_names(names: &[String]) -> Result<(), String> {
    let mut seen = std::collections::HashMap::new();
    for (i, name) in names.iter().enumerate() {
        let plain = !name.is_empty()
            && !name.starts_with('.')
            && !name.contains(['/', '\\'])
            && !name.chars().any(char::is_control);
        if !plain {
            return Err(format!(
                "class name {name:?} (number {}) is not a plain folder name",
                i + 1
            ));
        }
        if let Some(first) = seen.insert(name.as_str(), i) {
            return Err(format!(
                "class name {name:?} appears twice (numbers {} and {})",
                first + 1,
                i + 1
            ));
        }
    }
    Ok(())
}

/// The cache key: cache format, decoder version, storage size, and every file's path, label
/// and contents (SHA-256 of its bytes, files hashed in parallel: every load reads each file
/// once, about a second for CIFAR-100's 50 000 PNGs on 2 cores).
fn cache_key(folder: &ImageFolder, storage: Option<u32>) -> Result<String> {
    let digests: Vec<[u8; 32]> = folder
        .samples
        .par_iter()
        .map(|(path, _)| {
            let bytes = fs::read(path).map_err(|e| Error::file(path, e))?;
            Ok(Sha256::digest(&bytes).into())
        })
        .collect::<Result<_>>()?;
    let mut h = Sha256::new();
    h.update(CACHE_FORMAT);
    h.update(IMAGE_DECODER);
    h.update(format!("{storage:?}"));
    for ((path, label), digest) in folder.samples.iter().zip(&digests) {
        h.update(format!("{}\0{label}\0", path.display()));
        h.update(digest);
    }
    Ok(hex(&h.finalize()[..12]))
}

/// Decodes an ImageFolder listing into its cache file (`<root>/.tucker_nb_cache/SPLIT-KEY.safetensors`),
/// unless a cache with the same key is there, and maps it ([`crate::cache`]); other caches of
/// the split are removed. With `storage.no_cache`, decodes into memory instead.
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
    let key = cache_key(folder, storage.size)?;
    let dataset = |images, mapped| Dataset {
        images,
        labels,
        classes: folder.classes.clone(),
        names,
        key: format!("{split}-{key}"),
        mapped,
    };
    if storage.no_cache {
        return Ok(dataset(decode_images(folder, storage.size)?, None));
    }
    let cache_dir = root.join(".tucker_nb_cache");
    let cache = cache_dir.join(format!("{split}-{key}.safetensors"));
    let cached = cache::map_images(&cache)
        .ok()
        .filter(|(images, _)| images.size().first() == Some(&(folder.samples.len() as i64)));
    if let Some((images, mapped)) = cached {
        return Ok(dataset(images, Some(mapped)));
    }
    let locked = fs::create_dir_all(&cache_dir)
        .map_err(|e| Error::file(&cache_dir, e))
        .and_then(|()| crate::lock::OutputLock::try_acquire(&cache));
    // One writer per cache file: while another process writes it, decode into memory.
    let written = match locked {
        Ok(None) => return Ok(dataset(decode_images(folder, storage.size)?, None)),
        Ok(Some(_lock)) => {
            io::write_atomic_with(&cache, |tmp| decode_into_cache(folder, storage.size, tmp))
        }
        Err(e) => Err(e),
    };
    match written.and_then(|()| cache::map_images(&cache)) {
        Ok((images, mapped)) => {
            remove_other_caches(&cache_dir, &split, &cache);
            Ok(dataset(images, Some(mapped)))
        }
        Err(e @ Error::File { .. }) if !cache.exists() && cache_dir_unwritable(&cache_dir) => {
            // Read-only data: decode into memory each time.
            eprintln!("warning: decoded-image cache not written ({e}): decoding into memory");
            Ok(dataset(decode_images(folder, storage.size)?, None))
        }
        Err(e) => Err(e),
    }
}

fn cache_dir_unwritable(dir: &Path) -> bool {
    let probe = dir.join(format!(".probe-{}", std::process::id()));
    let writable = fs::write(&probe, b"").is_ok();
    let _ = fs::remove_file(&probe);
    !writable
}

/// Earlier caches of `split` (other keys: the files, decoder or storage size changed).
fn remove_other_caches(dir: &Path, split: &str, keep: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = name.starts_with(&format!("{split}-")) && name.ends_with(".safetensors");
        if ours && path != keep {
            let _ = fs::remove_file(&path);
        }
    }
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
