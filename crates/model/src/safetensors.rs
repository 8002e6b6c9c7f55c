//! safetensors reader: an 8-byte little-endian header length, a JSON header naming each
//! tensor's dtype, shape and byte range, then the data. The file is memory-mapped; every
//! length and range is checked, and anything malformed is a [`ModelError`].

use std::collections::BTreeMap;
use std::path::Path;

use memmap2::Mmap;
use serde_json::Value;

use crate::ModelError;
use crate::quant::DType;

const MAX_HEADER: u64 = 100 << 20;

/// One tensor of a safetensors file: row-major `shape`, bytes `start..start + bytes`.
#[derive(Clone, Debug)]
pub struct StTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub start: usize,
    pub bytes: usize,
}

/// An open safetensors file.
pub struct SafetensorsFile {
    map: Mmap,
    pub tensors: BTreeMap<String, StTensor>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<SafetensorsFile, ModelError> {
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: a read-only private mapping of a model file Tern never writes.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let tensors = parse(&map).map_err(|e| e.in_file(path))?;
        Ok(SafetensorsFile { map, tensors })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}

fn parse(map: &[u8]) -> Result<BTreeMap<String, StTensor>, ModelError> {
    let bad = |why: String| ModelError::Format(format!("safetensors: {why}"));
    let len = map
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .ok_or_else(|| bad("truncated header".into()))?;
    if len > MAX_HEADER || 8 + len > map.len() as u64 {
        return Err(bad(format!("header of {len} bytes does not fit the file")));
    }
    let data_start = 8 + len as usize;
    let header: BTreeMap<String, Value> = serde_json::from_slice(&map[8..data_start])
        .map_err(|e| bad(format!("header JSON: {e}")))?;
    let mut tensors = BTreeMap::new();
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = match info["dtype"].as_str() {
            Some("F32") => DType::F32,
            Some("F16") => DType::F16,
            Some("BF16") => DType::BF16,
            other => {
                return Err(ModelError::Unsupported(format!(
                    "tensor `{name}` has dtype {other:?}"
                )));
            }
        };
        let shape: Vec<usize> = info["shape"]
            .as_array()
            .ok_or_else(|| bad(format!("`{name}` has no shape")))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| bad(format!("`{name}` has a bad shape")))?;
        let offsets = info["data_offsets"]
            .as_array()
            .filter(|a| a.len() == 2)
            .ok_or_else(|| bad(format!("`{name}` has no data_offsets")))?;
        let (a, b) = (
            offsets[0].as_u64().unwrap_or(u64::MAX),
            offsets[1].as_u64().unwrap_or(0),
        );
        let elems = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let want = elems.and_then(|n| dtype.row_bytes(n));
        if a > b || Some((b - a) as usize) != want || data_start as u64 + b > map.len() as u64 {
            return Err(bad(format!(
                "`{name}`: bytes {a}..{b} do not hold shape {shape:?} of {dtype:?} inside the file"
            )));
        }
        tensors.insert(
            name,
            StTensor {
                dtype,
                shape,
                start: data_start + a as usize,
                bytes: (b - a) as usize,
            },
        );
    }
    Ok(tensors)
}

/// Writes a safetensors file (for tests and generated models).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(&str, DType, Vec<usize>, &[u8])],
) -> std::io::Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, dtype, shape, data) in tensors {
        let dt = match dtype {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            other => {
                return Err(std::io::Error::other(format!(
                    "{other:?} cannot be stored in safetensors"
                )));
            }
        };
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dt, "shape": shape, "data_offsets": [offset, offset + data.len()]}),
        );
        offset += data.len();
    }
    let mut json = serde_json::to_vec(&header)?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for (_, _, _, data) in tensors {
        out.extend_from_slice(data);
    }
    std::fs::write(path, out)
}
