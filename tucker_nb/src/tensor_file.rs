//! safetensors files with a `__metadata__` header (string to string), which libtorch's own
//! writer cannot add: how model files say each conv's form. The format: an 8-byte little-endian
//! header length, the JSON header (each tensor's dtype, shape and byte range; the metadata),
//! padded with spaces to a multiple of 8, then the tensors' bytes, contiguous, in order.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

use serde_json::{json, Map, Value};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// The header key of the metadata.
const METADATA: &str = "__metadata__";

/// A header longer than this is not read for metadata (libtorch's reader still judges it).
const MAX_HEADER: u64 = 100 << 20;

fn dtype(kind: Kind) -> Option<&'static str> {
    Some(match kind {
        Kind::Float => "F32",
        Kind::Double => "F64",
        Kind::Half => "F16",
        Kind::BFloat16 => "BF16",
        Kind::Int64 => "I64",
        Kind::Int => "I32",
        Kind::Uint8 => "U8",
        Kind::Bool => "BOOL",
        _ => return None,
    })
}

/// Writes `tensors` (in order) and `metadata` as a safetensors file at `file`; `path` names the
/// destination in errors.
pub fn write(
    path: &Path,
    file: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut header = Map::new();
    let mut data = Vec::new();
    for (name, tensor) in tensors {
        let kind = tensor.kind();
        let dtype = dtype(kind).ok_or_else(|| {
            Error::file(
                path,
                format!("tensor `{name}` is {kind:?}: no safetensors dtype"),
            )
        })?;
        let t = tensor.detach().to_device(Device::Cpu).contiguous();
        let numel = t.numel();
        let start = data.len();
        data.resize(start + numel * kind.elt_size_in_bytes(), 0);
        t.copy_data_u8(&mut data[start..], numel);
        let info = json!({"dtype": dtype, "shape": t.size(), "data_offsets": [start, data.len()]});
        header.insert(name.clone(), info);
    }
    if !metadata.is_empty() {
        header.insert(METADATA.into(), json!(metadata));
    }
    let mut header = serde_json::to_vec(&Value::Object(header)).expect("serialisable");
    header.resize(header.len().next_multiple_of(8), b' ');
    let written = std::fs::File::create(file).and_then(|mut f| {
        f.write_all(&(header.len() as u64).to_le_bytes())?;
        f.write_all(&header)?;
        f.write_all(&data)
    });
    written.map_err(|e| Error::file(path, e))
}

/// The `__metadata__` of the safetensors file at `path`; empty when it has none, or when its
/// header cannot be read (the tensor reader then reports what is wrong with the file).
pub fn read_metadata(path: &Path) -> BTreeMap<String, String> {
    let header = || -> Option<Value> {
        let mut file = std::fs::File::open(path).ok()?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len).ok()?;
        let len = u64::from_le_bytes(len);
        if len > MAX_HEADER {
            return None;
        }
        let mut header = vec![0u8; len as usize];
        file.read_exact(&mut header).ok()?;
        serde_json::from_slice(&header).ok()
    };
    header()
        .and_then(|h| serde_json::from_value(h.get(METADATA)?.clone()).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_and_metadata_round_trip_through_libtorchs_reader() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.safetensors");
        let a = Tensor::randn([3, 4, 1, 2], (Kind::Float, Device::Cpu)).permute([0, 2, 3, 1]);
        let b = Tensor::from_slice(&[7i64]);
        let tensors = vec![("a.weight".to_string(), a.shallow_clone()), ("b".into(), b)];
        let metadata = BTreeMap::from([("k".to_string(), "{\"x\": 1}".to_string())]);
        write(&file, &file, &tensors, &metadata).unwrap();
        let read: BTreeMap<String, Tensor> = Tensor::read_safetensors(&file)
            .unwrap()
            .into_iter()
            .collect();
        assert!(read["a.weight"].equal(&a));
        assert_eq!(read["b"].int64_value(&[0]), 7);
        assert_eq!(read_metadata(&file), metadata);
        let bytes = std::fs::read(&file).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        assert_eq!(header_len % 8, 0);
    }

    #[test]
    fn a_file_without_metadata_or_with_a_broken_header_has_none() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain.safetensors");
        Tensor::write_safetensors(
            &[("w", &Tensor::ones([2], (Kind::Float, Device::Cpu)))],
            &plain,
        )
        .unwrap();
        assert!(read_metadata(&plain).is_empty());
        let broken = dir.path().join("broken.safetensors");
        std::fs::write(&broken, b"\xff\xff\xff\xff\xff\xff\xff\xffjunk").unwrap();
        assert!(read_metadata(&broken).is_empty());
    }
}
