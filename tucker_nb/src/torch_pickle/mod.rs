//! Reads the state_dicts that `torch.save` writes (a zip holding `NAME/data.pkl` and raw storages
//! `NAME/data/KEY`), such as torchvision's `resnet18-f37072fd.pth`.
//!
//! libtorch's own C++ unpickler (tch's `loadz_multi`) rejects them: a state_dict is a
//! `collections.OrderedDict`, which it turns into None. This is a small pickle machine that knows
//! exactly the opcodes and globals `torch.save` emits for a dict of tensors, and nothing more: any
//! other object is an error naming it, never arbitrary code.
//!
//! A hostile file costs bounded work: memo entries are shared, not copied (a pickle that doubles
//! an entry 40 times holds 40 objects, not 2^40); containers nest at most [`MAX_DEPTH`] deep; the
//! objects made or copied are at most [`MAX_OBJECTS`]; every size, stride and offset is checked
//! arithmetic, each tensor must lie inside its storage and hold no more elements than
//! [`max_view_elements`] allows; zip entries are size-checked before they are read.

use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::Path;

use tch::Tensor;

use crate::error::{Error, Result};

mod machine;

use machine::{TensorRef, Unpickler, Value};

/// Deepest container nesting accepted (a state_dict nests about 5 deep).
pub const MAX_DEPTH: usize = 64;
/// Objects the machine may make or copy for one pickle.
pub const MAX_OBJECTS: usize = 10_000_000;
/// Largest `data.pkl` read (torchvision's ResNet18 has 30 kB; the pickle holds no tensor data).
pub const MAX_PICKLE_BYTES: u64 = 64 << 20;
/// Largest storage entry read.
pub const MAX_STORAGE_BYTES: u64 = 16 << 30;
/// Most dimensions of a tensor.
const MAX_DIMS: usize = 16;

/// The largest element count a tensor may have: what its storage holds, or 2^20 for small views
/// that repeat elements (a state_dict never holds large broadcast views; one with stride 0 over
/// a few bytes would otherwise be materialised at any size).
pub fn max_view_elements(storage_numel: u64) -> u64 {
    storage_numel.max(1 << 20)
}

/// Reads every tensor of a `torch.save`d dict, in file order.
pub fn read_torch_zip(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let file = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
    read_torch_archive(file).map_err(|m| Error::file(path, m))
}

/// [`read_torch_zip`] on any seekable reader; errors are messages without the file name.
pub fn read_torch_archive(reader: impl Read + Seek) -> Result<Vec<(String, Tensor)>, String> {
    let mut archive = zip::ZipArchive::new(reader).map_err(|e| {
        format!(
            "not a readable torch.save zip archive ({e}): a truncated or corrupt file, \
             or torch < 1.6's legacy format (re-save it with a current torch)"
        )
    })?;
    // Exactly one `PREFIX/data.pkl`, PREFIX a single folder name, as torch.save writes.
    let pickles: Vec<String> = archive
        .file_names()
        .filter(|n| {
            n.strip_suffix("/data.pkl")
                .is_some_and(|prefix| !prefix.is_empty() && !prefix.contains('/'))
        })
        .map(str::to_string)
        .collect();
    let pickle_name = match &pickles[..] {
        [one] => one.clone(),
        [] => return Err("no NAME/data.pkl in the archive".into()),
        _ => return Err("more than one NAME/data.pkl in the archive".into()),
    };
    let prefix = pickle_name.trim_end_matches("data.pkl").to_string();
    let pickle = read_entry(&mut archive, &pickle_name, MAX_PICKLE_BYTES, None)?;
    read_tensors(&pickle, |key, bytes| {
        read_entry(
            &mut archive,
            &format!("{prefix}data/{key}"),
            MAX_STORAGE_BYTES,
            Some(bytes),
        )
    })
}

/// One zip entry, refused before reading when larger than `limit` or (with `expected`) of
/// another size; reads at most its stated size.
fn read_entry<R: Read + Seek>(
    archive: &mut zip::ZipArchive<R>,
    name: &str,
    limit: u64,
    expected: Option<u64>,
) -> Result<Vec<u8>, String> {
    let entry = archive.by_name(name).map_err(|e| format!("{name}: {e}"))?;
    let size = entry.size();
    if size > limit {
        return Err(format!("{name}: {size} bytes, more than the {limit} read"));
    }
    if let Some(expected) = expected.filter(|&e| e != size) {
        return Err(format!(
            "{name}: {size} bytes, but the pickle declares {expected} (truncated file?)"
        ));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    entry
        .take(size)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{name}: {e}"))?;
    if bytes.len() as u64 != size {
        return Err(format!(
            "{name}: ends after {} of {size} bytes",
            bytes.len()
        ));
    }
    Ok(bytes)
}

/// The tensors of a state_dict pickle; `storage(key, bytes)` returns storage `key`'s bytes (which
/// must be `bytes` long). Entries that are not (string, tensor) pairs, such as metadata, are
/// skipped.
pub fn read_tensors(
    pickle: &[u8],
    mut storage: impl FnMut(&str, u64) -> Result<Vec<u8>, String>,
) -> Result<Vec<(String, Tensor)>, String> {
    let root = Unpickler::new(pickle)
        .run()
        .map_err(|m| format!("data.pkl: {m}"))?;
    let Value::Dict(dict) = root else {
        return Err(format!(
            "the file holds {}, not a dict of tensors",
            root.describe()
        ));
    };
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut out = Vec::with_capacity(dict.items.len());
    for (name, value) in &dict.items {
        let (Value::Str(name), Value::Tensor(t)) = (name, value) else {
            continue;
        };
        let s = &t.storage;
        let bytes = s
            .numel
            .checked_mul(s.kind.elt_size_in_bytes() as u64)
            .ok_or_else(|| format!("`{name}`: storage {} of {} elements", s.key, s.numel))?;
        if !storages.contains_key(&s.key) {
            let data = storage(&s.key, bytes).map_err(|m| format!("`{name}`: {m}"))?;
            storages.insert(s.key.clone(), data);
        }
        let data = &storages[&s.key];
        if data.len() as u64 != bytes {
            return Err(format!(
                "`{name}`: storage {} has {} bytes, declared {bytes}",
                s.key,
                data.len()
            ));
        }
        check_view(t).map_err(|m| format!("`{name}`: {m}"))?;
        let numel = i64::try_from(s.numel).map_err(|_| format!("`{name}`: storage too large"))?;
        let build = || -> Result<Tensor, tch::TchError> {
            Tensor::f_from_data_size(data, &[numel], s.kind)?
                .f_as_strided(t.size.as_slice(), t.stride.as_slice(), t.offset)?
                .f_contiguous()
        };
        let tensor = build()
            .map_err(|e| format!("`{name}`: {}", crate::error::first_line(&e.to_string())))?;
        out.push((name.to_string(), tensor));
    }
    Ok(out)
}

/// The view (offset, size, stride) lies inside its storage and is not a large broadcast.
fn check_view(t: &TensorRef) -> Result<(), String> {
    let bad = || {
        format!(
            "size {:?}, stride {:?} and offset {} do not fit its storage of {} elements",
            t.size, t.stride, t.offset, t.storage.numel
        )
    };
    if t.size.len() != t.stride.len() || t.size.len() > MAX_DIMS {
        return Err(bad());
    }
    if t.offset < 0 || t.size.iter().chain(&t.stride).any(|&v| v < 0) {
        return Err(bad());
    }
    let numel = t
        .size
        .iter()
        .try_fold(1u64, |n, &s| n.checked_mul(s as u64))
        .ok_or_else(bad)?;
    if numel == 0 {
        return Ok(());
    }
    // The last element reached: offset + Σ (size − 1)·stride, which must be inside the storage.
    let last = t
        .size
        .iter()
        .zip(&t.stride)
        .try_fold(t.offset as u64, |acc, (&s, &st)| {
            (s as u64 - 1)
                .checked_mul(st as u64)
                .and_then(|reach| acc.checked_add(reach))
        })
        .ok_or_else(bad)?;
    if last >= t.storage.numel {
        return Err(format!("{} (truncated file?)", bad()));
    }
    if numel > max_view_elements(t.storage.numel) {
        return Err(format!(
            "a view of {numel} elements over a storage of {}: refused (at most {})",
            t.storage.numel,
            max_view_elements(t.storage.numel)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_non_zip_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("legacy.pth");
        std::fs::write(&p, b"\x80\x02legacy").unwrap();
        let e = read_torch_zip(&p).unwrap_err().to_string();
        assert!(
            e.contains("legacy.pth") && e.contains("not a readable torch.save zip"),
            "{e}"
        );
    }

    #[test]
    fn refuses_objects_it_does_not_know() {
        // GLOBAL os.system, a string argument, REDUCE, STOP.
        let pickle = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.";
        let e = Unpickler::new(pickle).run().unwrap_err();
        assert!(e.contains("os.system"), "{e}");
    }

    #[test]
    fn a_memo_doubled_forty_times_stays_small() {
        // EMPTY_TUPLE, memo 0; then 40 × (POP, GET 0, GET 0, TUPLE2, PUT 0); STOP.
        let mut pickle = b"\x80\x02)q\x00".to_vec();
        for _ in 0..40 {
            pickle.extend_from_slice(b"0h\x00h\x00\x86q\x00");
        }
        pickle.push(b'.');
        let root = Unpickler::new(&pickle).run().unwrap();
        assert_eq!(root.depth(), 40);
        assert_eq!(root.describe(), "a tuple of 2");
    }

    #[test]
    fn deep_nesting_is_refused_without_recursion() {
        let mut pickle = b"\x80\x02N".to_vec();
        pickle.extend(std::iter::repeat_n(0x85u8, 2_000_000)); // TUPLE1, 2 M times
        pickle.push(b'.');
        let e = Unpickler::new(&pickle).run().unwrap_err();
        assert!(e.contains("nested deeper than 64"), "{e}");
    }
}
