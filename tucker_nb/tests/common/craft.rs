//! Crafted `torch.save` files: a pickle writer for the opcodes torch.save emits for a state_dict,
//! and the zip layout around it (`archive/data.pkl`, `archive/data/KEY`), so tests can build
//! valid files and hostile ones byte by byte.

use std::io::Write;
use std::path::Path;

/// One tensor entry of a state_dict pickle.
pub struct Entry<'a> {
    pub name: &'a str,
    pub storage: &'a str,
    /// torch's storage class, e.g. `FloatStorage`.
    pub kind: &'a str,
    pub numel: u32,
    pub offset: u32,
    pub size: &'a [u64],
    pub stride: &'a [u64],
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.push(b'X');
    out.extend((s.len() as u32).to_le_bytes());
    out.extend(s.as_bytes());
}

/// An int as torch's pickler writes it: BININT1, BININT, or LONG1 past 32 bits.
fn int(out: &mut Vec<u8>, v: u64) {
    if v < 256 {
        out.extend([b'K', v as u8]);
    } else if v < (1 << 31) {
        out.push(b'J');
        out.extend((v as u32).to_le_bytes());
    } else {
        out.extend([0x8a, 8]);
        out.extend(v.to_le_bytes());
    }
}

fn int_tuple(out: &mut Vec<u8>, values: &[u64]) {
    out.push(b'(');
    for &v in values {
        int(out, v);
    }
    out.push(b't');
}

/// The pickle torch.save writes for an OrderedDict of these tensors (protocol 2).
pub fn state_dict_pickle(entries: &[Entry]) -> Vec<u8> {
    let mut p = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01(".to_vec();
    for e in entries {
        string(&mut p, e.name);
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n((");
        string(&mut p, "storage");
        p.extend(format!("ctorch\n{}\n", e.kind).as_bytes());
        string(&mut p, e.storage);
        string(&mut p, "cpu");
        int(&mut p, e.numel as u64);
        p.extend(b"tQ");
        int(&mut p, e.offset as u64);
        int_tuple(&mut p, e.size);
        int_tuple(&mut p, e.stride);
        p.extend(b"\x89ccollections\nOrderedDict\n)RtR");
    }
    p.extend(b"u.");
    p
}

/// A torch.save zip: `archive/data.pkl` and `archive/data/KEY` for each storage, stored.
pub fn torch_zip(path: &Path, pickle: &[u8], storages: &[(&str, &[u8])]) {
    std::fs::write(path, torch_zip_bytes(pickle, storages)).unwrap();
}

pub fn torch_zip_bytes(pickle: &[u8], storages: &[(&str, &[u8])]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options =
        zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", options).unwrap();
    zip.write_all(pickle).unwrap();
    for (key, bytes) in storages {
        zip.start_file(format!("archive/data/{key}"), options)
            .unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap().into_inner()
}
