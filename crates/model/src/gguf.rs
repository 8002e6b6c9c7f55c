//! GGUF v3 reader: the file is memory-mapped, its header parsed with every count and length
//! bounded, and tensors handed out as byte slices of the mapping.
//!
//! Layout (little-endian): magic `GGUF`, version u32 (3; 2 is read too), tensor count u64,
//! metadata count u64, metadata entries (key string, type u32, value), tensor infos (name
//! string, n_dims u32, dims u64 each, type u32, offset u64), padding to `general.alignment`
//! (default 32), then tensor data at the given offsets. Strings are a u64 length then bytes.
//! Anything truncated, oversized, misaligned or of an unknown type is a [`ModelError`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use memmap2::Mmap;

use crate::ModelError;
use crate::quant::DType;

const MAGIC: &[u8; 4] = b"GGUF";
const MAX_TENSORS: u64 = 1 << 16;
const MAX_METADATA: u64 = 1 << 16;
const MAX_STRING: u64 = 1 << 24;
const MAX_ARRAY: u64 = 1 << 24;
const MAX_DIMS: u32 = 4;
const MAX_NESTING: u32 = 2;

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as an f32, if it is a number.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(v) => Some(v),
            Value::F64(v) => Some(v as f32),
            _ => self.as_u64().map(|v| v as f32),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file, and its shape: `dims[0]` is the row length
/// (contiguous), `dims[1]` the number of rows, and so on (ggml order).
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub dtype: DType,
    /// Byte offset of the data from the start of the file.
    pub start: usize,
    /// Size of the data in bytes.
    pub bytes: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elems(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// An open GGUF file.
pub struct GgufFile {
    map: Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps and parses `path`.
    pub fn open(path: &Path) -> Result<GgufFile, ModelError> {
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the mapping is read-only and private; Tern never writes model files, and a
        // file truncated underneath us is the same hazard every mmap-based loader accepts.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        Self::parse(map).map_err(|e| e.in_file(path))
    }

    fn parse(map: Mmap) -> Result<GgufFile, ModelError> {
        let mut r = Reader {
            bytes: &map,
            pos: 0,
        };
        let magic = r.take(4)?;
        if magic != MAGIC {
            return Err(ModelError::Format(format!(
                "not a GGUF file (magic {magic:02x?})"
            )));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(ModelError::Unsupported(format!(
                "GGUF version {version} (this reader knows 2 and 3)"
            )));
        }
        let n_tensors = r.count(MAX_TENSORS, "tensors")?;
        let n_metadata = r.count(MAX_METADATA, "metadata entries")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_metadata {
            let key = r.string()?;
            let kind = r.u32()?;
            let value = r.value(kind, 0)?;
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two() && *a <= 1 << 16)
                .ok_or_else(|| ModelError::Format(format!("bad general.alignment {v:?}")))?,
        } as usize;
        let mut infos = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            infos.push(r.tensor_info()?);
        }
        let data_start = r.pos.next_multiple_of(alignment);
        let mut tensors = Vec::with_capacity(infos.len());
        for (name, dims, type_id, offset) in infos {
            tensors.push(locate(
                &map, data_start, alignment, name, dims, type_id, offset,
            )?);
        }
        Ok(GgufFile {
            map,
            version,
            metadata,
            tensors,
        })
    }

    /// The bytes of a tensor.
    pub fn data(&self, info: &TensorInfo) -> &[u8] {
        &self.map[info.start..info.start + info.bytes]
    }

    /// The tensor named `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A required unsigned integer.
    pub fn u64(&self, key: &str) -> Result<u64, ModelError> {
        self.get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| missing(key, "an unsigned integer"))
    }

    /// A required number.
    pub fn f32(&self, key: &str) -> Result<f32, ModelError> {
        self.get(key)
            .and_then(Value::as_f32)
            .ok_or_else(|| missing(key, "a number"))
    }

    /// A required string.
    pub fn str(&self, key: &str) -> Result<&str, ModelError> {
        self.get(key)
            .and_then(Value::as_str)
            .ok_or_else(|| missing(key, "a string"))
    }

    /// The whole mapped file (for digests).
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}

fn missing(key: &str, what: &str) -> ModelError {
    ModelError::Format(format!("metadata `{key}` is missing or not {what}"))
}

/// Checks a tensor's type, shape and data range against the file.
fn locate(
    map: &[u8],
    data_start: usize,
    alignment: usize,
    name: String,
    dims: Vec<u64>,
    type_id: u32,
    offset: u64,
) -> Result<TensorInfo, ModelError> {
    let bad = |why: String| ModelError::Format(format!("tensor `{name}`: {why}"));
    let dtype = DType::from_ggml(type_id).ok_or_else(|| {
        ModelError::Unsupported(format!("tensor `{name}` has ggml type {type_id}"))
    })?;
    let row = usize::try_from(dims[0]).map_err(|_| bad("row too long".into()))?;
    let rows = dims[1..]
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad("too many elements".into()))?;
    let row_bytes = dtype.row_bytes(row).ok_or_else(|| {
        bad(format!(
            "row of {row} elements does not fit {} blocks",
            dtype.name()
        ))
    })?;
    let bytes = u64::try_from(row_bytes)
        .ok()
        .and_then(|rb| rb.checked_mul(rows))
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| bad("size overflows".into()))?;
    let start = usize::try_from(offset)
        .ok()
        .and_then(|o| o.checked_add(data_start))
        .ok_or_else(|| bad("offset overflows".into()))?;
    if !offset.is_multiple_of(alignment as u64) {
        return Err(bad(format!(
            "offset {offset} is not aligned to {alignment}"
        )));
    }
    if start.checked_add(bytes).is_none_or(|end| end > map.len()) {
        return Err(bad(format!(
            "data {start}+{bytes} runs past the end of the file ({} bytes)",
            map.len()
        )));
    }
    Ok(TensorInfo {
        name,
        dims,
        dtype,
        start,
        bytes,
    })
}

/// A bounds-checked cursor over the header.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ModelError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                ModelError::Format(format!(
                    "truncated: needs {n} bytes at offset {} of {}",
                    self.pos,
                    self.bytes.len()
                ))
            })?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ModelError> {
        Ok(self.take(N)?.try_into().expect("take returned N bytes"))
    }

    fn u32(&mut self) -> Result<u32, ModelError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, ModelError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn count(&mut self, max: u64, what: &str) -> Result<u64, ModelError> {
        let n = self.u64()?;
        if n > max {
            return Err(ModelError::Format(format!(
                "{n} {what} (at most {max} accepted)"
            )));
        }
        Ok(n)
    }

    fn string(&mut self) -> Result<String, ModelError> {
        let len = self.count(MAX_STRING, "bytes in a string")?;
        let bytes = self.take(len as usize)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| {
            ModelError::Format(format!(
                "string at offset {} is not UTF-8",
                self.pos - bytes.len()
            ))
        })
    }

    fn value(&mut self, kind: u32, depth: u32) -> Result<Value, ModelError> {
        Ok(match kind {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(ModelError::Format(format!("bool value {b}"))),
            },
            8 => Value::String(self.string()?),
            9 => {
                if depth >= MAX_NESTING {
                    return Err(ModelError::Format("arrays nested too deeply".into()));
                }
                let elem = self.u32()?;
                let n = self.count(MAX_ARRAY, "array elements")?;
                // Each element takes at least one byte: refuse counts the file cannot hold.
                if n as usize > self.bytes.len() - self.pos {
                    return Err(ModelError::Format(format!(
                        "array of {n} elements runs past the end"
                    )));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(ModelError::Format(format!("unknown metadata type {other}"))),
        })
    }

    fn tensor_info(&mut self) -> Result<(String, Vec<u64>, u32, u64), ModelError> {
        let name = self.string()?;
        let n_dims = self.u32()?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(ModelError::Format(format!(
                "tensor `{name}` has {n_dims} dimensions"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.u64()?);
        }
        let type_id = self.u32()?;
        let offset = self.u64()?;
        Ok((name, dims, type_id, offset))
    }
}
