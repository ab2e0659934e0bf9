//! Batches with seeded shuffling, and torchvision's transforms run batched on the model's device:
//!
//! - train: RandomResizedCrop(size, scale = (0.08, 1), ratio = (3/4, 4/3)) + horizontal flip (p = ½),
//!   as one bilinear `grid_sample` per batch with a per-image affine crop (the seed's
//!   [`Augmentation`]; a milder one keeps more of each image and may leave out the flip);
//! - eval: Resize(⌊size·256/224⌋, shorter side, bilinear, antialiased when shrinking) + CenterCrop(size);
//!
//! both followed by ImageNet normalisation. The uint8 images can stay resident on the device, so a
//! GPU never waits on decoding.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::cache::MappedImages;
use crate::data::Dataset;

pub const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

/// What a batch goes through before the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    /// RandomResizedCrop(size) + RandomHorizontalFlip + normalisation.
    Train { size: i64 },
    /// Resize(size·256/224) + CenterCrop(size) + normalisation.
    Eval { size: i64 },
}

/// One batch on the model's device.
#[derive(Debug)]
pub struct Batch {
    /// float32 N × 3 × size × size, normalised.
    pub images: Tensor,
    /// int64 N.
    pub labels: Tensor,
    /// Indices of the images in the dataset.
    pub indices: Vec<i64>,
}

/// Iterates a [`Dataset`] in batches.
#[derive(Debug)]
pub struct Loader {
    images: Tensor,
    labels: Tensor,
    /// The memory-mapped cache `images` views on the host, whose pages each batch hands back
    /// once gathered (so a dataset larger than RAM streams through a few batches of it).
    mapped: Option<&'static MappedImages>,
    /// ImageNet mean and std as 1×3×1×1 float tensors on `device`, built once.
    mean: Tensor,
    std: Tensor,
    /// The images this loader iterates, as indices into `images` (ascending); `None`: all of
    /// them. A training loader that lends some images to a held-out set ([`Self::hold_out`])
    /// keeps the rest here, so no image is copied.
    subset: Option<Vec<i64>>,
    pub batch_size: usize,
    pub shuffle: bool,
    pub seed: u64,
    pub transform: Transform,
    /// What the train transform's crop and flip draw from.
    pub augmentation: Augmentation,
    pub device: Device,
}

/// The train transform's random crop and flip.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Augmentation {
    /// RandomResizedCrop's smallest share of the image's area, in (0, 1].
    pub min_crop: f64,
    /// Flip half the images horizontally.
    pub flip: bool,
}

impl Augmentation {
    /// The seed's: crops down to 8 % of the image, half of them flipped.
    pub const SEED: Augmentation = Augmentation {
        min_crop: 0.08,
        flip: true,
    };

    /// Fails unless `min_crop` is in (0, 1].
    pub fn validate(&self) -> crate::error::Result<()> {
        let m = self.min_crop;
        crate::error::check(m > 0.0 && m <= 1.0, "smallest crop", m, "in (0, 1]")
    }
}

impl Default for Augmentation {
    fn default() -> Self {
        Self::SEED
    }
}

/// The largest decoded dataset kept resident on a GPU: above it, batches stream from the host
/// (through the memory-mapped cache) instead. CIFAR-100's train set is 150 MB at 32 px and
/// 9.8 GB at 256 px storage; ImageNet's is 250 GB.
pub const RESIDENT_LIMIT_BYTES: i64 = 16 << 30;

/// Mixed into the run's seed for the held-out draw, so that it and the calibration set's draw
/// (seeded with the run's seed itself) are different shuffles.
const HOLD_OUT_STREAM: u64 = 0x5EED_0F4E_1D00;

/// Images copied to a GPU per step of the upload, each chunk's host pages handed back after.
const UPLOAD_CHUNK: i64 = 1024;

impl Loader {
    /// `resident`: copy the uint8 images to `device` once (about 150 MB for CIFAR-100's train set)
    /// when they are at most [`RESIDENT_LIMIT_BYTES`]; else (and on the CPU) batches are gathered
    /// from the host copy, which may be a memory map.
    pub fn new(
        data: &Dataset,
        batch_size: usize,
        transform: Transform,
        device: Device,
        resident: bool,
    ) -> Self {
        let bytes = data.images.numel() as i64;
        let home = match resident && bytes <= RESIDENT_LIMIT_BYTES {
            true => device,
            false => Device::Cpu,
        };
        let (mean, std) = normalization(device);
        Self {
            images: upload(data, home),
            labels: data.labels.to_device(home),
            mapped: data.mapped.filter(|_| home == Device::Cpu),
            mean,
            std,
            subset: None,
            batch_size: batch_size.max(1),
            shuffle: matches!(transform, Transform::Train { .. }),
            seed: 0,
            transform,
            augmentation: Augmentation::SEED,
            device,
        }
    }

    /// The calibration set of a training loader: its first `images` images after a shuffle seeded
    /// with `seed` (all of them when it has fewer), with the eval transform at the same size, in
    /// batches of `batch_size`, not shuffled. Fails on `images = 0`.
    pub fn calibration_set(
        &self,
        images: usize,
        seed: u64,
        batch_size: usize,
    ) -> crate::error::Result<Loader> {
        if images == 0 {
            return Err(crate::error::Error::value(
                "calibration images",
                "0 (must be ≥ 1)",
            ));
        }
        let mut order = self.indices();
        order.shuffle(&mut StdRng::seed_from_u64(seed));
        order.truncate(images);
        Ok(self.eval_set(&order, seed, batch_size))
    }

    /// Splits a training loader in two: `images` of its images, drawn by a shuffle seeded with
    /// `seed` (a stream of its own, not the calibration set's), become a held-out set with the eval
    /// transform in batches of `batch_size`; the training loader keeps the others, shuffled and
    /// augmented as before. The two never share an image. Fails unless 1 ≤ `images` < its size.
    pub fn hold_out(
        self,
        images: usize,
        seed: u64,
        batch_size: usize,
    ) -> crate::error::Result<(Loader, Loader)> {
        let has = self.len();
        if images == 0 || images >= has {
            return Err(crate::error::Error::value(
                "held-out images",
                format!("{images} (must be ≥ 1 and fewer than the {has} training images)"),
            ));
        }
        let mut order = self.indices();
        order.shuffle(&mut StdRng::seed_from_u64(seed ^ HOLD_OUT_STREAM));
        let mut rest = order.split_off(images);
        order.sort_unstable();
        rest.sort_unstable();
        let held_out = self.eval_set(&order, seed, batch_size);
        let train = Loader {
            subset: Some(rest),
            ..self
        };
        Ok((train, held_out))
    }

    /// The dataset indices this loader iterates, ascending.
    pub fn indices(&self) -> Vec<i64> {
        match &self.subset {
            Some(subset) => subset.clone(),
            None => (0..self.images.size()[0]).collect(),
        }
    }

    /// The images at `indices`, copied out, as an unshuffled eval-transform loader at this
    /// loader's size.
    fn eval_set(&self, indices: &[i64], seed: u64, batch_size: usize) -> Loader {
        let index = Tensor::from_slice(indices).to_device(self.images.device());
        let size = match self.transform {
            Transform::Train { size } | Transform::Eval { size } => size,
        };
        let images = self.images.index_select(0, &index);
        if let Some(mapped) = self.mapped {
            mapped.release();
        }
        Loader {
            images,
            labels: self.labels.index_select(0, &index),
            mapped: None,
            mean: self.mean.shallow_clone(),
            std: self.std.shallow_clone(),
            subset: None,
            batch_size: batch_size.max(1),
            shuffle: false,
            seed,
            transform: Transform::Eval { size },
            augmentation: self.augmentation,
            device: self.device,
        }
    }

    /// This loader (the same images, order and seed, nothing copied) drawing its training crops
    /// and flips from `augmentation`.
    pub fn augmented(&self, augmentation: Augmentation) -> Loader {
        Loader {
            images: self.images.shallow_clone(),
            labels: self.labels.shallow_clone(),
            mapped: self.mapped,
            mean: self.mean.shallow_clone(),
            std: self.std.shallow_clone(),
            subset: self.subset.clone(),
            augmentation,
            ..*self
        }
    }

    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    pub fn len(&self) -> usize {
        match &self.subset {
            Some(subset) => subset.len(),
            None => self.images.size()[0] as usize,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn num_batches(&self) -> usize {
        self.len().div_ceil(self.batch_size)
    }

    /// The batches of epoch `epoch`; order and augmentation depend only on (seed, epoch), so a
    /// resumed run sees exactly the batches an uninterrupted one would.
    ///
    /// Nothing waits on the device per batch: the epoch's order (and, for training, every image's
    /// crop and flip) is drawn on the host and copied to the device once, then sliced per batch.
    /// Images kept on the host travel through pinned memory without blocking.
    pub fn epoch(&self, epoch: usize) -> impl Iterator<Item = Batch> + '_ {
        let mut rng =
            StdRng::seed_from_u64(self.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut order = self.indices();
        if self.shuffle {
            order.shuffle(&mut rng);
        }
        let home = self.images.device();
        let order_on_home = Tensor::from_slice(&order).to_device(home);
        let crops = match self.transform {
            Transform::Train { .. } => {
                let [_, _, height, width] = self.images.size()[..] else {
                    unreachable!("images are N×3×H×W")
                };
                let theta =
                    crop_flip_thetas(order.len(), height, width, self.augmentation, &mut rng);
                Some(theta.to_device(self.device))
            }
            Transform::Eval { .. } => None,
        };
        let batch_size = self.batch_size;
        (0..order.len()).step_by(batch_size).map(move |start| {
            let n = batch_size.min(order.len() - start);
            let index = order_on_home.narrow(0, start as i64, n as i64);
            let theta = crops.as_ref().map(|t| t.narrow(0, start as i64, n as i64));
            self.batch(&index, theta.as_ref(), order[start..start + n].to_vec())
        })
    }

    fn batch(&self, index: &Tensor, theta: Option<&Tensor>, indices: Vec<i64>) -> Batch {
        let gathered = self.images.index_select(0, index);
        if let Some(mapped) = self.mapped {
            mapped.release();
        }
        let raw = to_device_async(&gathered, self.device);
        let labels = to_device_async(&self.labels.index_select(0, index), self.device);
        let images = tch::no_grad(|| match (self.transform, theta) {
            (Transform::Train { size }, Some(theta)) => crop_resize_flip(&raw, theta, size),
            (Transform::Eval { size }, _) => resize_center_crop(&raw, size),
            (Transform::Train { .. }, None) => unreachable!("training epochs draw crops"),
        });
        Batch {
            images: (images / 255.0 - &self.mean) / &self.std,
            labels,
            indices,
        }
    }
}

/// The dataset's images on `home`: a view when already there; copied to a GPU a chunk at a
/// time, each chunk's pages of a memory-mapped cache handed back once copied.
fn upload(data: &Dataset, home: Device) -> Tensor {
    let images = &data.images;
    if images.device() == home {
        return images.shallow_clone();
    }
    let n = images.size()[0];
    let on_device = Tensor::empty(images.size(), (images.kind(), home));
    for start in (0..n).step_by(UPLOAD_CHUNK as usize) {
        let len = UPLOAD_CHUNK.min(n - start);
        on_device
            .narrow(0, start, len)
            .copy_(&images.narrow(0, start, len));
        if let Some(mapped) = data.mapped {
            mapped.release();
        }
    }
    on_device
}

/// `t` on `device`: itself when already there, else copied through pinned host memory without
/// waiting (the copy is ordered on the device's stream before any kernel that reads it).
fn to_device_async(t: &Tensor, device: Device) -> Tensor {
    if t.device() == device {
        t.shallow_clone()
    } else if device.is_cuda() {
        t.pin_memory(device)
            .to_device_(device, t.kind(), true, false)
    } else {
        t.to_device(device)
    }
}

/// ImageNet mean and std, 1×3×1×1 float on `device`.
fn normalization(device: Device) -> (Tensor, Tensor) {
    let on_device = |v: &[f64; 3]| {
        Tensor::from_slice(v)
            .to_kind(Kind::Float)
            .view([1, 3, 1, 1])
            .to_device(device)
    };
    (on_device(&IMAGENET_MEAN), on_device(&IMAGENET_STD))
}

/// Pixel values in [0, 255] (uint8 or float) → [0, 1], then (x − mean) / std per channel.
pub fn normalize(images: &Tensor) -> Tensor {
    let (mean, std) = normalization(images.device());
    (images.to_kind(Kind::Float) / 255.0 - mean) / std
}

/// torchvision's `RandomResizedCrop.get_params`: (top, left, height, width) of the crop.
/// `min_crop`: the smallest share of the area (torchvision's `scale[0]`, 0.08 by default).
pub fn crop_params(
    height: i64,
    width: i64,
    min_crop: f64,
    rng: &mut impl Rng,
) -> (i64, i64, i64, i64) {
    let area = (height * width) as f64;
    let (log_lo, log_hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area * rng.random_range(min_crop..=1.0);
        let aspect = rng.random_range(log_lo..=log_hi).exp();
        let w = (target * aspect).sqrt().round() as i64;
        let h = (target / aspect).sqrt().round() as i64;
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            return (top, left, h, w);
        }
    }
    // Fallback: the whole image, clamped to the ratio range (torchvision's central crop).
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < 3.0 / 4.0 {
        (width, (width as f64 / (3.0 / 4.0)).round() as i64)
    } else if in_ratio > 4.0 / 3.0 {
        ((height as f64 * (4.0 / 3.0)).round() as i64, height)
    } else {
        (width, height)
    };
    ((height - h) / 2, (width - w) / 2, h, w)
}

/// Every image's random crop + horizontal flip for an epoch, in draw order, as the n × 2 × 3 affine
/// matrices `affine_grid` takes (output x in [−1, 1] ↦ input x over the crop, align_corners = false).
/// The flip is drawn even when `augmentation` has none, so the crops stay those of the same seed.
fn crop_flip_thetas(
    n: usize,
    height: i64,
    width: i64,
    augmentation: Augmentation,
    rng: &mut StdRng,
) -> Tensor {
    let mut theta = Vec::with_capacity(n * 6);
    for _ in 0..n {
        let (top, left, h, w) = crop_params(height, width, augmentation.min_crop, rng);
        let flipped = rng.random_bool(0.5) && augmentation.flip;
        let flip = if flipped { -1.0 } else { 1.0 };
        let (sx, sy) = (w as f32 / width as f32, h as f32 / height as f32);
        let tx = (2 * left + w) as f32 / width as f32 - 1.0;
        let ty = (2 * top + h) as f32 / height as f32 - 1.0;
        theta.extend_from_slice(&[sx * flip, 0.0, tx, 0.0, sy, ty]);
    }
    Tensor::from_slice(&theta).view([n as i64, 2, 3])
}

/// Per-image crops (`theta`, from [`crop_flip_thetas`]) resized to size×size, as one bilinear
/// grid sample.
fn crop_resize_flip(images: &Tensor, theta: &Tensor, size: i64) -> Tensor {
    let n = images.size()[0];
    let grid = Tensor::affine_grid_generator(theta, [n, 3, size, size], false);
    // interpolation 0 = bilinear, padding 1 = border (the crop never leaves the image).
    Tensor::grid_sampler(&images.to_kind(Kind::Float), &grid, 0, 1, false)
}

/// torchvision's Resize(⌊size·256/224⌋) on the shorter side + CenterCrop(size).
pub fn resize_center_crop(images: &Tensor, size: i64) -> Tensor {
    let [_, _, height, width] = images.size()[..] else {
        unreachable!("images are N×3×H×W")
    };
    let resize = size * 256 / 224;
    let (h, w) = if height <= width {
        (resize, resize * width / height)
    } else {
        (resize * height / width, resize)
    };
    let x = images.to_kind(Kind::Float);
    let resized = if (h, w) == (height, width) {
        x
    } else if h < height || w < width {
        x.internal_upsample_bilinear2d_aa([h, w], false, None, None)
    } else {
        x.upsample_bilinear2d([h, w], false, None, None)
    };
    // Python's round() (half to even), as torchvision's CenterCrop uses.
    let top = ((h - size) as f64 / 2.0).round_ties_even() as i64;
    let left = ((w - size) as f64 / 2.0).round_ties_even() as i64;
    resized.narrow(2, top, size).narrow(3, left, size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset(n: i64) -> Dataset {
        Dataset {
            images: Tensor::arange(n * 3 * 8 * 8, (Kind::Int64, Device::Cpu))
                .remainder(256)
                .to_kind(Kind::Uint8)
                .view([n, 3, 8, 8]),
            labels: Tensor::arange(n, (Kind::Int64, Device::Cpu)),
            classes: vec!["a".into()],
            names: (0..n).map(|i| i.to_string()).collect(),
            key: String::new(),
            mapped: None,
        }
    }

    #[test]
    fn shuffling_is_seeded_per_epoch_and_covers_every_image() {
        let data = dataset(10);
        let loader =
            Loader::new(&data, 4, Transform::Train { size: 8 }, Device::Cpu, false).with_seed(3);
        let order = |e| loader.epoch(e).flat_map(|b| b.indices).collect::<Vec<_>>();
        assert_eq!(order(0), order(0));
        assert_ne!(order(0), order(1));
        let mut all = order(1);
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_eq!(
            loader
                .epoch(0)
                .map(|b| b.labels.size()[0])
                .collect::<Vec<_>>(),
            [4, 4, 2]
        );
        let eval = Loader::new(&data, 4, Transform::Eval { size: 8 }, Device::Cpu, false);
        assert_eq!(
            eval.epoch(5).flat_map(|b| b.indices).collect::<Vec<_>>(),
            (0..10).collect::<Vec<_>>()
        );
    }

    #[test]
    fn held_out_and_training_images_are_disjoint_seeded_and_never_trained_on() {
        // The dataset's labels are its indices, so a loader's labels say which images it reads.
        let data = dataset(40);
        let loader =
            || Loader::new(&data, 4, Transform::Train { size: 8 }, Device::Cpu, false).with_seed(3);
        let labels = |l: &Loader, epoch| {
            let mut v: Vec<i64> = l
                .epoch(epoch)
                .flat_map(|b| Vec::<i64>::try_from(b.labels).unwrap())
                .collect();
            v.sort();
            v
        };
        let (train, held_out) = loader().hold_out(6, 11, 5).unwrap();
        assert_eq!((train.len(), held_out.len()), (34, 6));
        assert_eq!(held_out.transform, Transform::Eval { size: 8 });
        assert!(!held_out.shuffle);
        assert_eq!(held_out.num_batches(), 2);
        // Every training epoch covers exactly the images not held out, and no held-out one.
        let kept = train.indices();
        for epoch in 0..3 {
            assert_eq!(labels(&train, epoch), kept);
        }
        let missing: Vec<i64> = (0..40).filter(|i| !kept.contains(i)).collect();
        assert_eq!(labels(&held_out, 0), missing);
        // Seeded: the same seed draws the same split, another seed another.
        let (again, held_out_again) = loader().hold_out(6, 11, 5).unwrap();
        assert_eq!(again.indices(), kept);
        assert_eq!(labels(&held_out_again, 0), missing);
        let (_, other_draw) = loader().hold_out(6, 12, 5).unwrap();
        assert_ne!(labels(&other_draw, 0), missing);
        // The calibration set is drawn from the training images only.
        let calibration = train.calibration_set(100, 1, 8).unwrap();
        assert_eq!(labels(&calibration, 0), kept);
        for bad in [0, 40, 41] {
            let err = loader().hold_out(bad, 1, 4).unwrap_err().to_string();
            assert!(
                err.contains("held-out images") && err.contains("40"),
                "{err}"
            );
        }
    }

    #[test]
    fn batches_equal_the_per_batch_pipeline_they_replace() {
        // The loader before the epoch-wide upload: per batch, its indices and crops drawn and
        // copied, then the same transforms and normalisation.
        let data = dataset(10);
        let loader =
            Loader::new(&data, 4, Transform::Train { size: 6 }, Device::Cpu, true).with_seed(9);
        let mut rng = StdRng::seed_from_u64(9 ^ 3u64.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut order: Vec<i64> = (0..10).collect();
        order.shuffle(&mut rng);
        for (batch, indices) in loader.epoch(3).zip(order.chunks(4)) {
            assert_eq!(batch.indices, indices);
            let raw = data.images.index_select(0, &Tensor::from_slice(indices));
            let theta = crop_flip_thetas(indices.len(), 8, 8, Augmentation::SEED, &mut rng);
            let expected = normalize(&crop_resize_flip(&raw, &theta, 6));
            assert!(batch.images.allclose(&expected, 1e-6, 1e-6, false));
            assert_eq!(
                batch.labels,
                data.labels.index_select(0, &Tensor::from_slice(indices))
            );
        }
    }

    #[test]
    fn an_images_augmentation_does_not_depend_on_the_batch_size() {
        // Crops are drawn per epoch, in order, then sliced per batch.
        let data = dataset(10);
        let epoch = |batch| {
            let loader = Loader::new(
                &data,
                batch,
                Transform::Train { size: 6 },
                Device::Cpu,
                false,
            )
            .with_seed(5);
            let batches: Vec<Batch> = loader.epoch(2).collect();
            let images = Tensor::cat(&batches.iter().map(|b| &b.images).collect::<Vec<_>>(), 0);
            let order: Vec<i64> = batches.into_iter().flat_map(|b| b.indices).collect();
            (order, images)
        };
        let (order_1, images_1) = epoch(1);
        let (order_4, images_4) = epoch(4);
        assert_eq!(order_1, order_4);
        assert!(images_1.allclose(&images_4, 1e-6, 1e-6, false));
        assert_eq!(images_4.size(), [10, 3, 6, 6]);
    }

    #[test]
    fn crop_params_stay_inside_the_image_and_within_scale() {
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..1000 {
            let (top, left, h, w) = crop_params(32, 48, 0.08, &mut rng);
            assert!(top >= 0 && left >= 0 && top + h <= 32 && left + w <= 48);
            assert!(h * w >= (0.08 * 32.0 * 48.0) as i64 - 48, "{h}x{w}");
        }
    }

    #[test]
    fn an_augmented_loader_draws_the_same_crops_and_only_changes_what_it_is_told() {
        let data = dataset(6);
        let train = Transform::Train { size: 8 };
        let loader = Loader::new(&data, 4, train, Device::Cpu, false).with_seed(2);
        let images = |l: &Loader| Tensor::cat(&l.epoch(1).map(|b| b.images).collect::<Vec<_>>(), 0);
        let seed = loader.augmented(Augmentation::SEED);
        assert!(
            images(&seed).equal(&images(&loader)),
            "the seed's, bit for bit"
        );
        // Whole-image crops without flips: each image itself, in the epoch's order.
        let whole = Augmentation {
            min_crop: 1.0,
            flip: false,
        };
        let plain = loader.augmented(whole);
        let order: Vec<i64> = plain.epoch(1).flat_map(|b| b.indices).collect();
        assert_eq!(
            order,
            loader.epoch(1).flat_map(|b| b.indices).collect::<Vec<_>>()
        );
        let expected = normalize(&data.images.index_select(0, &Tensor::from_slice(&order)));
        let diff = (images(&plain) - expected).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "differs by {diff}");
        let zero = Augmentation {
            min_crop: 0.0,
            flip: true,
        };
        let err = zero.validate().unwrap_err().to_string();
        assert!(err.contains("smallest crop") && err.contains('0'), "{err}");
    }

    #[test]
    fn full_image_crop_without_flip_is_the_identity() {
        let x = Tensor::rand([1, 3, 8, 8], (Kind::Float, Device::Cpu));
        let theta = Tensor::from_slice(&[1f32, 0., 0., 0., 1., 0.]).view([1, 2, 3]);
        let grid = Tensor::affine_grid_generator(&theta, [1, 3, 8, 8], false);
        let y = Tensor::grid_sampler(&x, &grid, 0, 1, false);
        assert!((y - &x).abs().max().double_value(&[]) < 1e-5);
    }
}
