//! The pickle machine: the opcodes and globals `torch.save` emits for a dict of tensors, under
//! the bounds the module documents; anything else is an error naming it.

use std::collections::HashMap;
use std::rc::Rc;

use tch::Kind;

use super::{MAX_DEPTH, MAX_OBJECTS};

#[derive(Debug, Clone)]
pub(super) enum Value {
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
pub(super) struct Node {
    pub(super) items: Vec<Value>,
    pub(super) depth: usize,
}

#[derive(Debug, Clone, Default)]
pub(super) struct DictNode {
    pub(super) items: Vec<(Value, Value)>,
    pub(super) depth: usize,
}

#[derive(Debug)]
pub(super) struct StorageRef {
    pub(super) kind: Kind,
    pub(super) key: String,
    /// Elements, as the pickle declares them.
    pub(super) numel: u64,
}

#[derive(Debug)]
pub(super) struct TensorRef {
    pub(super) storage: Rc<StorageRef>,
    pub(super) offset: i64,
    pub(super) size: Vec<i64>,
    pub(super) stride: Vec<i64>,
}

impl Value {
    /// Nesting depth: 0 for scalars, 1 + the deepest item for containers.
    pub(super) fn depth(&self) -> usize {
        match self {
            Value::Tuple(n) | Value::List(n) => n.depth,
            Value::Dict(d) => d.depth,
            _ => 0,
        }
    }

    /// What it is, in a few words: error messages never print a (possibly huge) value.
    pub(super) fn describe(&self) -> String {
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

pub(super) struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
    /// Objects made or copied so far, against [`MAX_OBJECTS`].
    objects: usize,
}

impl<'a> Unpickler<'a> {
    pub(super) fn new(data: &'a [u8]) -> Self {
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

    pub(super) fn run(mut self) -> Result<Value, String> {
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
