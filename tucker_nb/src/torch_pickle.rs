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
use std::rc::Rc;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};

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

#[derive(Debug, Clone)]
enum Value {
    None,
    Bool,
    Int(i64),
    Float,
    Str(Rc<str>),
    Tuple(Rc<Node>),
    List(Rc<Node>),
    Dict(Rc<DictNode>),
    Global(Rc<(String, String)>),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
    Mark,
}

#[derive(Debug, Clone, Default)]
struct Node {
    items: Vec<Value>,
    depth: usize,
}

#[derive(Debug, Clone, Default)]
struct DictNode {
    items: Vec<(Value, Value)>,
    depth: usize,
}

#[derive(Debug)]
struct StorageRef {
    kind: Kind,
    key: String,
    /// Elements, as the pickle declares them.
    numel: u64,
}

#[derive(Debug)]
struct TensorRef {
    storage: Rc<StorageRef>,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

impl Value {
    /// Nesting depth: 0 for scalars, 1 + the deepest item for containers.
    fn depth(&self) -> usize {
        match self {
            Value::Tuple(n) | Value::List(n) => n.depth,
            Value::Dict(d) => d.depth,
            _ => 0,
        }
    }

    /// What it is, in a few words: error messages never print a (possibly huge) value.
    fn describe(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool => "a bool".into(),
            Value::Int(i) => format!("the int {i}"),
            Value::Float => "a float".into(),
            Value::Str(s) => format!("the string {:?}", truncate(s)),
            Value::Tuple(n) => format!("a tuple of {}", n.items.len()),
            Value::List(n) => format!("a list of {}", n.items.len()),
            Value::Dict(d) => format!("a dict of {}", d.items.len()),
            Value::Global(g) => format!("{}.{}", truncate(&g.0), truncate(&g.1)),
            Value::Storage(s) => format!("storage {}", truncate(&s.key)),
            Value::Tensor(_) => "a tensor".into(),
            Value::Mark => "a MARK".into(),
        }
    }
}

fn truncate(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_string(),
    }
}

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
        let tensor =
            build().map_err(|e| format!("`{name}`: {}", crate::io::first_line(&e.to_string())))?;
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

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
    /// Objects made or copied so far, against [`MAX_OBJECTS`].
    objects: usize,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            pos: 0,
            stack: Vec::new(),
            memo: HashMap::new(),
            objects: 0,
        }
    }

    fn charge(&mut self, objects: usize) -> Result<(), String> {
        self.objects = self.objects.saturating_add(objects);
        if self.objects > MAX_OBJECTS {
            return Err(format!("more than {MAX_OBJECTS} objects: refused"));
        }
        Ok(())
    }

    fn push(&mut self, v: Value) -> Result<(), String> {
        self.charge(1)?;
        self.stack.push(v);
        Ok(())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.data.len())
            .ok_or("unexpected end of pickle")?;
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32_le(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn line(&mut self) -> Result<String, String> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("unterminated GLOBAL")?;
        self.pos += end + 1;
        Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
    }

    fn pop(&mut self) -> Result<Value, String> {
        self.stack
            .pop()
            .ok_or_else(|| "stack underflow".to_string())
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let mark = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or("MARK not found")?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items)
    }

    /// A container of `items` one level deeper than its deepest item.
    fn node(items: Vec<Value>) -> Result<Node, String> {
        let depth = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
        if depth > MAX_DEPTH {
            return Err(format!(
                "containers nested deeper than {MAX_DEPTH}: refused"
            ));
        }
        Ok(Node { items, depth })
    }

    fn new_depth(current: usize, added: impl Iterator<Item = usize>) -> Result<usize, String> {
        let depth = added.map(|d| d + 1).fold(current, usize::max);
        if depth > MAX_DEPTH {
            return Err(format!(
                "containers nested deeper than {MAX_DEPTH}: refused"
            ));
        }
        Ok(depth)
    }

    /// Copy-on-write access to a shared container, charging the copy when one is made.
    fn unshare<T: Clone>(&mut self, rc: &mut Rc<T>, len: usize) -> Result<(), String> {
        if Rc::strong_count(rc) > 1 {
            self.charge(len)?;
        }
        Rc::make_mut(rc);
        Ok(())
    }

    fn add_to_dict(&mut self, pairs: Vec<(Value, Value)>) -> Result<(), String> {
        let Some(Value::Dict(mut dict)) = self.stack.pop() else {
            return Err("SETITEM(S) on something that is not a dict".into());
        };
        let len = dict.items.len();
        self.unshare(&mut dict, len)?;
        self.charge(pairs.len())?;
        let d = Rc::make_mut(&mut dict);
        d.depth = Self::new_depth(d.depth, pairs.iter().map(|(k, v)| k.depth().max(v.depth())))?;
        d.items.extend(pairs);
        self.stack.push(Value::Dict(dict));
        Ok(())
    }

    fn add_to_list(&mut self, items: Vec<Value>) -> Result<(), String> {
        let Some(Value::List(mut list)) = self.stack.pop() else {
            return Err("APPEND(S) on something that is not a list".into());
        };
        let len = list.items.len();
        self.unshare(&mut list, len)?;
        self.charge(items.len())?;
        let l = Rc::make_mut(&mut list);
        l.depth = Self::new_depth(l.depth, items.iter().map(Value::depth))?;
        l.items.extend(items);
        self.stack.push(Value::List(list));
        Ok(())
    }

    fn run(mut self) -> Result<Value, String> {
        loop {
            let op = self.byte()?;
            match op {
                0x80 => {
                    self.take(1)?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'.' => return self.pop(),
                b'0' => {
                    self.pop()?; // POP
                }
                b'1' => {
                    self.pop_mark()?; // POP_MARK
                }
                b'(' => self.push(Value::Mark)?,
                b'N' => self.push(Value::None)?,
                0x88 | 0x89 => self.push(Value::Bool)?,
                b'K' => {
                    let v = self.byte()? as i64;
                    self.push(Value::Int(v))?;
                }
                b'M' => {
                    let b = self.take(2)?;
                    self.push(Value::Int(u16::from_le_bytes([b[0], b[1]]) as i64))?;
                }
                b'J' => {
                    let v = self.u32_le()? as i32 as i64;
                    self.push(Value::Int(v))?;
                }
                0x8a => {
                    let n = self.byte()? as usize;
                    if n > 8 {
                        return Err("integer wider than 64 bits".into());
                    }
                    let bytes = self.take(n)?;
                    let mut buf = if bytes.last().is_some_and(|b| b & 0x80 != 0) {
                        [0xff; 8]
                    } else {
                        [0; 8]
                    };
                    buf[..n].copy_from_slice(bytes);
                    self.push(Value::Int(i64::from_le_bytes(buf)))?;
                }
                b'G' => {
                    self.take(8)?; // the value itself is never needed for weights
                    self.push(Value::Float)?;
                }
                b'X' | 0x8c => {
                    let n = if op == b'X' {
                        self.u32_le()? as usize
                    } else {
                        self.byte()? as usize
                    };
                    let s = String::from_utf8_lossy(self.take(n)?);
                    self.push(Value::Str(Rc::from(s.as_ref())))?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Value::Global(Rc::new((module, name))))?;
                }
                b'}' => self.push(Value::Dict(Rc::new(DictNode::default())))?,
                b']' => self.push(Value::List(Rc::new(Node::default())))?,
                b')' => self.push(Value::Tuple(Rc::new(Node::default())))?,
                b't' => {
                    let items = self.pop_mark()?;
                    let node = Self::node(items)?;
                    self.push(Value::Tuple(Rc::new(node)))?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let at = self.stack.len().checked_sub(n).ok_or("stack underflow")?;
                    let items = self.stack.split_off(at);
                    let node = Self::node(items)?;
                    self.push(Value::Tuple(Rc::new(node)))?;
                }
                b'q' => {
                    let k = self.byte()? as u32;
                    self.memoize(k)?;
                }
                b'r' => {
                    let k = self.u32_le()?;
                    self.memoize(k)?;
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    self.memoize(k)?;
                }
                b'h' | b'j' => {
                    let k = if op == b'h' {
                        self.byte()? as u32
                    } else {
                        self.u32_le()?
                    };
                    let v = self
                        .memo
                        .get(&k)
                        .cloned()
                        .ok_or(format!("memo {k} missing"))?;
                    self.push(v)?;
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.add_to_dict(vec![(key, value)])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err("SETITEMS with an odd number of items".into());
                    }
                    let mut it = items.into_iter();
                    let mut pairs = Vec::new();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((k, v));
                    }
                    self.add_to_dict(pairs)?;
                }
                b'a' => {
                    let item = self.pop()?;
                    self.add_to_list(vec![item])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.add_to_list(items)?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.push(persistent_load(pid)?)?;
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.push(reduce(callable, args)?)?;
                }
                b'b' => {
                    // BUILD: the only state torch.save attaches is the state_dict's `_metadata`.
                    self.pop()?;
                }
                other => {
                    return Err(format!(
                        "unsupported pickle opcode 0x{other:02x} at byte {}",
                        self.pos - 1
                    ))
                }
            }
        }
    }

    fn memoize(&mut self, key: u32) -> Result<(), String> {
        let top = self.stack.last().ok_or("memo of empty stack")?.clone();
        self.charge(1)?;
        self.memo.insert(key, top);
        Ok(())
    }
}

fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

/// A storage key names a zip entry: plain letters, digits and `_` only (torch uses numbers).
fn valid_storage_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 64
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `('storage', torch.FloatStorage, key, location, numel)` → a storage reference.
fn persistent_load(pid: Value) -> Result<Value, String> {
    if let Value::Tuple(items) = &pid {
        if let [Value::Str(tag), Value::Global(global), Value::Str(key), _, Value::Int(numel)] =
            &items.items[..]
        {
            let (module, name) = global.as_ref();
            if tag.as_ref() == "storage" && module == "torch" {
                let kind = storage_kind(name)
                    .ok_or_else(|| format!("unsupported storage type torch.{}", truncate(name)))?;
                if !valid_storage_key(key) {
                    return Err(format!(
                        "storage key {:?} is not a plain name",
                        truncate(key)
                    ));
                }
                let numel = u64::try_from(*numel)
                    .map_err(|_| format!("storage {key} declares {numel} elements"))?;
                return Ok(Value::Storage(Rc::new(StorageRef {
                    kind,
                    key: key.to_string(),
                    numel,
                })));
            }
        }
    }
    Err(format!("unsupported persistent id: {}", pid.describe()))
}

fn ints(v: &Value) -> Result<Vec<i64>, String> {
    match v {
        Value::Tuple(n) | Value::List(n) => n
            .items
            .iter()
            .map(|x| match x {
                Value::Int(i) => Ok(*i),
                other => Err(format!("expected an int, found {}", other.describe())),
            })
            .collect(),
        other => Err(format!(
            "expected a tuple of ints, found {}",
            other.describe()
        )),
    }
}

/// The callables torch.save uses for a state_dict, and nothing else.
fn reduce(callable: Value, args: Value) -> Result<Value, String> {
    let Value::Global(global) = &callable else {
        return Err(format!("cannot call {}", callable.describe()));
    };
    let (module, name) = global.as_ref();
    let Value::Tuple(args) = args else {
        return Err(format!("{module}.{name}: arguments are not a tuple"));
    };
    match (module.as_str(), name.as_str()) {
        ("collections", "OrderedDict") => Ok(Value::Dict(Rc::new(DictNode::default()))),
        ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
            match &args.items[..] {
                [Value::Storage(storage), Value::Int(offset), size, stride, ..] => {
                    Ok(Value::Tensor(Rc::new(TensorRef {
                        storage: storage.clone(),
                        offset: *offset,
                        size: ints(size)?,
                        stride: ints(stride)?,
                    })))
                }
                _ => Err(format!("{module}.{name}: unexpected arguments")),
            }
        }
        // nn.Parameter(data, requires_grad, hooks): the data is what we keep.
        ("torch._utils", "_rebuild_parameter")
        | ("torch._utils", "_rebuild_parameter_with_state") => args
            .items
            .first()
            .cloned()
            .ok_or(format!("{module}.{name}: no data")),
        _ => Err(format!(
            "unsupported object {}.{} (only dicts of tensors are read)",
            truncate(module),
            truncate(name)
        )),
    }
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
