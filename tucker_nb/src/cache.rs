//! The decoded-image cache file: a safetensors file holding one uint8 tensor `images`
//! (N × 3 × H × W), written chunk by chunk as images are decoded ([`CacheWriter`]) and read back
//! through a memory map ([`map_images`]). Neither decoding nor loading holds the dataset in RAM:
//! the kernel pages images in as batches are gathered, and [`MappedImages::release`] hands those
//! pages back, so a dataset larger than RAM trains with a resident set of a few batches.
//!
//! Mappings live as long as the process (a tensor viewing one may be anywhere, so none is ever
//! unmapped); loading the same cache file again reuses its mapping. The mapping is private
//! (copy-on-write): nothing written to the tensor reaches the file. The file is replaced only by
//! renaming a new one into place, never rewritten in place, so a mapped file never shrinks.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;

use memmap2::{MmapMut, MmapOptions, UncheckedAdvice};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

const TENSOR_NAME: &str = "images";

/// The safetensors header of one U8 tensor `images` of `shape`, padded to 8 bytes, with its
/// 8-byte length prefix.
fn header(shape: [i64; 4]) -> Vec<u8> {
    let bytes: i64 = shape.iter().product();
    let mut json = format!(
        r#"{{"{TENSOR_NAME}":{{"dtype":"U8","shape":[{},{},{},{}],"data_offsets":[0,{bytes}]}}}}"#,
        shape[0], shape[1], shape[2], shape[3]
    )
    .into_bytes();
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    out
}

/// Writes a cache file image by image; [`CacheWriter::finish`] checks every byte was written.
pub struct CacheWriter {
    file: BufWriter<File>,
    remaining: u64,
    path: std::path::PathBuf,
}

impl CacheWriter {
    pub fn create(path: &Path, shape: [i64; 4]) -> Result<Self> {
        let file = File::create(path).map_err(|e| Error::file(path, e))?;
        let mut file = BufWriter::with_capacity(1 << 20, file);
        file.write_all(&header(shape))
            .map_err(|e| Error::file(path, e))?;
        Ok(Self {
            file,
            remaining: shape.iter().product::<i64>() as u64,
            path: path.to_path_buf(),
        })
    }

    /// Appends decoded images (C × H × W bytes each, in order).
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let n = bytes.len() as u64;
        if n > self.remaining {
            return Err(Error::file(
                &self.path,
                "more image bytes than the header says",
            ));
        }
        self.remaining -= n;
        self.file
            .write_all(bytes)
            .map_err(|e| Error::file(&self.path, e))
    }

    pub fn finish(self) -> Result<()> {
        if self.remaining != 0 {
            return Err(Error::file(
                &self.path,
                format!("{} image bytes missing", self.remaining),
            ));
        }
        self.file
            .into_inner()
            .map_err(|e| Error::file(&self.path, e.error()))?
            .flush()
            .map_err(|e| Error::file(&self.path, e))
    }
}

/// A cache file mapped into memory.
#[derive(Debug)]
pub struct MappedImages {
    map: MmapMut,
    /// Where the pixel bytes start in the file.
    data_start: usize,
    /// N × 3 × H × W.
    shape: [i64; 4],
    identity: (u64, u64, u64),
}

// Mappings outlive every tensor that views them (they are never unmapped).
static MAPPINGS: Mutex<Vec<&'static MappedImages>> = Mutex::new(Vec::new());

impl MappedImages {
    /// Drops every page of the mapping from this process's resident set: they stay in the
    /// page cache and are read again from the file when next touched. Called once a batch has
    /// been gathered. The whole mapping, not the batch's images: the kernel maps neighbouring
    /// pages on each fault too, and an unpopulated range costs the call next to nothing.
    pub fn release(&self) {
        // SAFETY: a private file mapping; MADV_DONTNEED drops private copies of its pages
        // (nothing writes to them) and the next read faults the file's bytes back in.
        unsafe {
            let _ = self.map.unchecked_advise(UncheckedAdvice::DontNeed);
        }
    }
}

/// Reads a cache file's header: its shape, and where the pixels start. Anything but one U8
/// tensor `images` of 4 dimensions whose bytes fill the rest of the file is refused.
fn read_header(map: &[u8], path: &Path) -> Result<([i64; 4], usize)> {
    let bad = |m: &str| Error::file(path, format!("not a decoded-image cache: {m}"));
    let len = map
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .ok_or_else(|| bad("too short"))?;
    let end = usize::try_from(len)
        .ok()
        .and_then(|l| l.checked_add(8))
        .filter(|&end| end <= map.len() && len <= 1 << 20)
        .ok_or_else(|| bad("header length"))?;
    let json: serde_json::Value =
        serde_json::from_slice(&map[8..end]).map_err(|e| bad(&e.to_string()))?;
    let entries = json
        .as_object()
        .ok_or_else(|| bad("header is not an object"))?;
    let tensor = entries
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .map(|(k, v)| (k == TENSOR_NAME).then_some(v))
        .collect::<Vec<_>>();
    let [Some(tensor)] = tensor[..] else {
        return Err(bad("expected one tensor `images`"));
    };
    if tensor["dtype"] != "U8" {
        return Err(bad("images are not U8"));
    }
    let shape: Vec<i64> = tensor["shape"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_i64()).collect())
        .unwrap_or_default();
    let shape: [i64; 4] = shape.try_into().map_err(|_| bad("shape is not N×C×H×W"))?;
    let bytes = shape
        .iter()
        .try_fold(1i64, |n, &s| if s < 0 { None } else { n.checked_mul(s) })
        .ok_or_else(|| bad("shape"))?;
    let offsets: Vec<i64> = tensor["data_offsets"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_i64()).collect())
        .unwrap_or_default();
    if offsets != [0, bytes] || (map.len() - end) as i64 != bytes {
        return Err(bad("pixel bytes do not match the shape (truncated?)"));
    }
    Ok((shape, end))
}

/// Maps the cache file at `path` (or reuses its mapping) and returns its images as a uint8
/// N × 3 × H × W CPU tensor viewing the mapping, with the mapping itself.
pub fn map_images(path: &Path) -> Result<(Tensor, &'static MappedImages)> {
    let file = File::open(path).map_err(|e| Error::file(path, e))?;
    let meta = file.metadata().map_err(|e| Error::file(path, e))?;
    let identity = {
        use std::os::unix::fs::MetadataExt;
        (meta.dev(), meta.ino(), meta.len())
    };
    let mut mappings = MAPPINGS.lock().unwrap_or_else(|p| p.into_inner());
    let mapped = match mappings.iter().find(|m| m.identity == identity) {
        Some(m) => *m,
        None => {
            // SAFETY: a private mapping of a file that tucker_nb only ever replaces by rename.
            let map = unsafe { MmapOptions::new().map_copy(&file) }
                .map_err(|e| Error::file(path, format!("cannot map: {e}")))?;
            let (shape, data_start) = read_header(&map, path)?;
            if shape[1] != 3 {
                return Err(Error::file(
                    path,
                    "not a decoded-image cache: images are not RGB",
                ));
            }
            let mapped: &'static MappedImages = Box::leak(Box::new(MappedImages {
                map,
                data_start,
                shape,
                identity,
            }));
            mappings.push(mapped);
            mapped
        }
    };
    let shape = mapped.shape;
    let strides = [
        shape[1] * shape[2] * shape[3],
        shape[2] * shape[3],
        shape[3],
        1,
    ];
    // SAFETY: the bytes lie inside a mapping that is never unmapped, and the shape was checked
    // against the file's length.
    let images = unsafe {
        Tensor::f_from_blob(
            mapped.map.as_ptr().add(mapped.data_start),
            &shape,
            &strides,
            Kind::Uint8,
            Device::Cpu,
        )
    }?;
    Ok((images, mapped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_in_chunks_then_mapped_gives_the_same_images() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        let images = Tensor::randint(256, [5, 3, 4, 6], (Kind::Uint8, Device::Cpu));
        let bytes = Vec::<u8>::try_from(images.flatten(0, -1)).unwrap();
        let mut w = CacheWriter::create(&path, [5, 3, 4, 6]).unwrap();
        for chunk in bytes.chunks(72 * 2) {
            w.write(chunk).unwrap();
        }
        w.finish().unwrap();
        // tch reads it as an ordinary safetensors file
        let read = Tensor::read_safetensors(&path).unwrap();
        assert!(read[0].1.equal(&images));
        let (mapped, store) = map_images(&path).unwrap();
        assert!(mapped.equal(&images));
        store.release();
        assert!(
            mapped.equal(&images),
            "released pages read back from the file"
        );
        // A second map of the same file reuses the mapping.
        let (_, again) = map_images(&path).unwrap();
        assert!(std::ptr::eq(store, again));
    }

    #[test]
    fn short_or_foreign_files_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        let mut w = CacheWriter::create(&path, [2, 3, 2, 2]).unwrap();
        w.write(&[0; 12]).unwrap();
        assert!(w
            .finish()
            .unwrap_err()
            .to_string()
            .contains("12 image bytes missing"));
        let mut bytes = header([2, 3, 2, 2]);
        bytes.extend([0; 23]);
        std::fs::write(&path, &bytes).unwrap();
        let e = map_images(&path).unwrap_err().to_string();
        assert!(
            e.contains("bad.safetensors") && e.contains("truncated"),
            "{e}"
        );
        let other = Tensor::zeros([2, 2], (Kind::Float, Device::Cpu));
        Tensor::write_safetensors(&[("w", &other)], &path).unwrap();
        let e = map_images(&path).unwrap_err().to_string();
        assert!(e.contains("expected one tensor `images`"), "{e}");
    }
}
