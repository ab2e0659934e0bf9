//! Decoding image files into uint8 N×3×H×W, in parallel, under bounded sizes: the decoder's
//! limits, and a resize (shorter side, bilinear) and centre crop to the storage size.

use std::fs;
use std::path::Path;

use image::imageops::FilterType;
use rayon::prelude::*;
use tch::Tensor;

use super::{ImageFolder, DEFAULT_MIXED_STORAGE};
use crate::cache;
use crate::error::{Error, Result};

/// Largest side of an image file decoded, and largest intermediate a resize may make.
pub const MAX_DECODE_SIDE: u32 = 16_384;
pub const MAX_DECODE_BYTES: u64 = 512 << 20;
pub const MAX_RESIZE_PIXELS: u64 = 64 << 20;

/// The decoder's limits: an image whose header states more is refused before decoding.
fn decode_limits() -> image::Limits {
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_DECODE_SIDE);
    limits.max_image_height = Some(MAX_DECODE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    limits
}

fn reader(path: &Path) -> Result<image::ImageReader<std::io::BufReader<fs::File>>> {
    let mut reader = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| Error::file(path, format!("cannot read image: {e}")))?;
    reader.limits(decode_limits());
    Ok(reader)
}

/// The (width, height) images are stored at: `storage`, else the images' common size, else 256.
fn storage_dims(folder: &ImageFolder, storage: Option<u32>) -> Result<(u32, u32)> {
    let dims: Vec<(u32, u32)> = folder
        .samples
        .par_iter()
        .map(|(p, _)| {
            reader(p)?
                .into_dimensions()
                .map_err(|e| Error::file(p, format!("cannot read image: {e}")))
        })
        .collect::<Result<_>>()?;
    Ok(match storage {
        Some(s) => (s, s),
        None if dims.iter().all(|d| *d == dims[0]) => dims[0],
        None => (DEFAULT_MIXED_STORAGE, DEFAULT_MIXED_STORAGE),
    })
}

/// Decodes one image into `out` (3 planes of h × w bytes).
fn decode_one(path: &Path, (w, h): (u32, u32), out: &mut [u8]) -> Result<()> {
    let img = reader(path)?
        .decode()
        .map_err(|e| Error::file(path, format!("cannot decode image: {e}")))?;
    let mut rgb = img.to_rgb8();
    if rgb.dimensions() != (w, h) {
        rgb = resize_and_crop(&rgb, w, h).map_err(|m| Error::file(path, m))?;
    }
    let plane = (w * h) as usize;
    for (i, px) in rgb.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = px[c];
        }
    }
    Ok(())
}

/// Images decoded per chunk on the way to the cache file (peak memory: a chunk, not the dataset).
const DECODE_CHUNK: usize = 256;

/// Decodes every image of the listing into the cache file `path`, a chunk at a time.
pub(super) fn decode_into_cache(
    folder: &ImageFolder,
    storage: Option<u32>,
    path: &Path,
) -> Result<()> {
    let (w, h) = storage_dims(folder, storage)?;
    let image_bytes = 3 * (w * h) as usize;
    let n = folder.samples.len() as i64;
    let mut writer = cache::CacheWriter::create(path, [n, 3, h as i64, w as i64])?;
    let mut chunk = vec![0u8; DECODE_CHUNK * image_bytes];
    for samples in folder.samples.chunks(DECODE_CHUNK) {
        let bytes = &mut chunk[..samples.len() * image_bytes];
        bytes
            .par_chunks_mut(image_bytes)
            .zip(samples.par_iter())
            .try_for_each(|(out, (path, _))| decode_one(path, (w, h), out))?;
        writer.write(bytes)?;
    }
    writer.finish()
}

/// Decodes every image of the listing in parallel into uint8 N×3×S×S in memory.
pub fn decode_images(folder: &ImageFolder, storage: Option<u32>) -> Result<Tensor> {
    let (w, h) = storage_dims(folder, storage)?;
    let image_bytes = 3 * (w * h) as usize;
    let images = Tensor::zeros(
        [folder.samples.len() as i64, 3, h as i64, w as i64],
        (tch::Kind::Uint8, tch::Device::Cpu),
    );
    // SAFETY: `images` is a fresh, contiguous uint8 tensor of exactly this many bytes, owned
    // here and not otherwise accessed until the slice is gone.
    let pixels = unsafe {
        std::slice::from_raw_parts_mut(
            images.data_ptr() as *mut u8,
            folder.samples.len() * image_bytes,
        )
    };
    pixels
        .par_chunks_mut(image_bytes)
        .zip(folder.samples.par_iter())
        .try_for_each(|(out, (path, _))| decode_one(path, (w, h), out))?;
    Ok(images)
}

/// Shorter side to fit, bilinear, then the centre w×h. Refused when the resized image would
/// exceed [`MAX_RESIZE_PIXELS`] (a 1 × 60 000 strip at 256 px storage would make 15 G pixels).
fn resize_and_crop(img: &image::RgbImage, w: u32, h: u32) -> Result<image::RgbImage, String> {
    let (iw, ih) = img.dimensions();
    let scale = (w as f64 / iw as f64).max(h as f64 / ih as f64);
    let (rw, rh) = (
        (iw as f64 * scale).round().max(w as f64),
        (ih as f64 * scale).round().max(h as f64),
    );
    if rw * rh > MAX_RESIZE_PIXELS as f64 {
        return Err(format!(
            "a {iw}×{ih} image resized to {w}×{h} storage would make {rw}×{rh} pixels \
             (at most {MAX_RESIZE_PIXELS}): its aspect ratio is too extreme"
        ));
    }
    let (rw, rh) = (rw as u32, rh as u32);
    let resized = image::imageops::resize(img, rw, rh, FilterType::Triangle);
    Ok(image::imageops::crop_imm(&resized, (rw - w) / 2, (rh - h) / 2, w, h).to_image())
}
