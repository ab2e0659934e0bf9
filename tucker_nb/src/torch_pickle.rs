//! Reads the state_dicts that `torch.save` writes (a zip holding `data.pkl` and raw storages), such
//! as torchvision's `resnet18-f37072fd.pth`.
//!
//! libtorch's own C++ unpickler (tch's `loadz_multi`) rejects them: a state_dict is a
//! `collections.OrderedDict`, which it turns into None. This is a small pickle machine that knows
//! exactly the opcodes and globals `torch.save` emits for a dict of tensors, and nothing more: any
//! other object is an error naming it, never arbitrary code.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
enum Value {
    None,
    Bool,
    Int(i64),
    Float,
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    Storage { kind: Kind, key: String },
    Tensor(TensorRef),
    Mark,
}

#[derive(Debug, Clone)]
struct TensorRef {
    kind: Kind,
    key: String,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

/// Reads every tensor of a `torch.save`d dict, in file order.
pub fn read_torch_zip(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let err = |m: String| Error::file(path, m);
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| {
        err(format!(
            "not a readable torch.save zip archive ({e}): a truncated or corrupt file, \
             or torch < 1.6's legacy format (re-save it with a current torch)"
        ))
    })?;
    let pickle_name = archive
        .file_names()
        .find(|n| n.ends_with("data.pkl"))
        .map(str::to_string)
        .ok_or_else(|| err("no data.pkl in the archive".into()))?;
    let prefix = pickle_name.trim_end_matches("data.pkl").to_string();
    let mut pickle = Vec::new();
    archive
        .by_name(&pickle_name)
        .and_then(|mut f| f.read_to_end(&mut pickle).map_err(Into::into))
        .map_err(|e| err(e.to_string()))?;
    let root = Unpickler::new(&pickle)
        .run()
        .map_err(|m| err(format!("data.pkl: {m}")))?;
    let Value::Dict(items) = root else {
        return Err(err("the file holds no dict of tensors".into()));
    };
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut out = Vec::with_capacity(items.len());
    for (name, value) in items {
        let (Value::Str(name), Value::Tensor(t)) = (name, value) else {
            continue; // non-tensor entries (e.g. metadata) are not part of the weights
        };
        if !storages.contains_key(&t.key) {
            let mut bytes = Vec::new();
            archive
                .by_name(&format!("{prefix}data/{}", t.key))
                .and_then(|mut f| f.read_to_end(&mut bytes).map_err(Into::into))
                .map_err(|e| err(format!("storage {} of `{name}`: {e}", t.key)))?;
            storages.insert(t.key.clone(), bytes);
        }
        let bytes = &storages[&t.key];
        let element = t.kind.elt_size_in_bytes();
        let numel = (bytes.len() / element) as i64;
        let needed = t.offset
            + t.size
                .iter()
                .zip(&t.stride)
                .map(|(s, st)| (s - 1).max(0) * st)
                .sum::<i64>()
            + 1;
        if t.size.iter().all(|&s| s > 0) && needed > numel {
            return Err(err(format!(
                "tensor `{name}` reaches past its storage (truncated file?)"
            )));
        }
        let storage = Tensor::f_from_data_size(bytes, &[numel], t.kind)?;
        let tensor = storage
            .f_as_strided(t.size.as_slice(), t.stride.as_slice(), t.offset)?
            .contiguous();
        out.push((name, tensor));
    }
    Ok(out)
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            pos: 0,
            stack: Vec::new(),
            memo: HashMap::new(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos + n;
        let bytes = self
            .data
            .get(self.pos..end)
            .ok_or("unexpected end of pickle")?;
        self.pos = end;
        Ok(bytes)
    }

    fn u32_le(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
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

    fn top_dict(&mut self) -> Result<&mut Vec<(Value, Value)>, String> {
        match self.stack.last_mut() {
            Some(Value::Dict(d)) => Ok(d),
            other => Err(format!("SETITEM on {other:?}")),
        }
    }

    fn run(mut self) -> Result<Value, String> {
        loop {
            let op = self.take(1)?[0];
            match op {
                0x80 => {
                    self.take(1)?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Value::Mark),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool),
                0x89 => self.stack.push(Value::Bool),
                b'K' => {
                    let v = self.take(1)?[0] as i64;
                    self.stack.push(Value::Int(v));
                }
                b'M' => {
                    let b = self.take(2)?;
                    self.stack
                        .push(Value::Int(u16::from_le_bytes([b[0], b[1]]) as i64));
                }
                b'J' => {
                    let v = self.u32_le()? as i32 as i64;
                    self.stack.push(Value::Int(v));
                }
                0x8a => {
                    let n = self.take(1)?[0] as usize;
                    let bytes = self.take(n)?;
                    if n > 8 {
                        return Err("integer wider than 64 bits".into());
                    }
                    let mut buf = if bytes.last().is_some_and(|b| b & 0x80 != 0) {
                        [0xff; 8]
                    } else {
                        [0; 8]
                    };
                    buf[..n].copy_from_slice(bytes);
                    self.stack.push(Value::Int(i64::from_le_bytes(buf)));
                }
                b'G' => {
                    self.take(8)?; // the value itself is never needed for weights
                    self.stack.push(Value::Float);
                }
                b'X' | 0x8c => {
                    let n = if op == b'X' {
                        self.u32_le()? as usize
                    } else {
                        self.take(1)?[0] as usize
                    };
                    let s = String::from_utf8_lossy(self.take(n)?).into_owned();
                    self.stack.push(Value::Str(s));
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global(module, name));
                }
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let at = self.stack.len().checked_sub(n).ok_or("stack underflow")?;
                    let items = self.stack.split_off(at);
                    self.stack.push(Value::Tuple(items));
                }
                b'q' => {
                    let k = self.take(1)?[0] as u32;
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
                        self.take(1)?[0] as u32
                    } else {
                        self.u32_le()?
                    };
                    let v = self
                        .memo
                        .get(&k)
                        .cloned()
                        .ok_or(format!("memo {k} missing"))?;
                    self.stack.push(v);
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.top_dict()?.push((key, value));
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let mut pairs = items.into_iter();
                    let dict = self.top_dict()?;
                    while let (Some(k), Some(v)) = (pairs.next(), pairs.next()) {
                        dict.push((k, v));
                    }
                }
                b'a' | b'e' => {
                    let items = if op == b'a' {
                        vec![self.pop()?]
                    } else {
                        self.pop_mark()?
                    };
                    match self.stack.last_mut() {
                        Some(Value::List(l)) => l.extend(items),
                        other => return Err(format!("APPEND on {other:?}")),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.stack.push(persistent_load(pid)?);
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.stack.push(reduce(callable, args)?);
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

/// `('storage', torch.FloatStorage, key, location, numel)` → a storage reference.
fn persistent_load(pid: Value) -> Result<Value, String> {
    if let Value::Tuple(items) = &pid {
        if let [Value::Str(tag), Value::Global(module, name), Value::Str(key), ..] = &items[..] {
            if tag == "storage" && module == "torch" {
                let kind =
                    storage_kind(name).ok_or(format!("unsupported storage type torch.{name}"))?;
                return Ok(Value::Storage {
                    kind,
                    key: key.clone(),
                });
            }
        }
    }
    Err(format!("unsupported persistent id {pid:?}"))
}

fn ints(v: &Value) -> Result<Vec<i64>, String> {
    match v {
        Value::Tuple(items) | Value::List(items) => items
            .iter()
            .map(|x| match x {
                Value::Int(i) => Ok(*i),
                other => Err(format!("expected an int, found {other:?}")),
            })
            .collect(),
        other => Err(format!("expected a tuple of ints, found {other:?}")),
    }
}

/// The callables torch.save uses for a state_dict, and nothing else.
fn reduce(callable: Value, args: Value) -> Result<Value, String> {
    let Value::Global(module, name) = &callable else {
        return Err(format!("cannot call {callable:?}"));
    };
    let Value::Tuple(args) = args else {
        return Err(format!("{module}.{name}: arguments are not a tuple"));
    };
    match (module.as_str(), name.as_str()) {
        ("collections", "OrderedDict") => Ok(Value::Dict(Vec::new())),
        ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
            match &args[..] {
                [Value::Storage { kind, key }, Value::Int(offset), size, stride, ..] => {
                    Ok(Value::Tensor(TensorRef {
                        kind: *kind,
                        key: key.clone(),
                        offset: *offset,
                        size: ints(size)?,
                        stride: ints(stride)?,
                    }))
                }
                _ => Err(format!("{module}.{name}: unexpected arguments")),
            }
        }
        // nn.Parameter(data, requires_grad, hooks): the data is what we keep.
        ("torch._utils", "_rebuild_parameter")
        | ("torch._utils", "_rebuild_parameter_with_state") => args
            .into_iter()
            .next()
            .ok_or(format!("{module}.{name}: no data")),
        _ => Err(format!(
            "unsupported object {module}.{name} (only dicts of tensors are read)"
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
}
