//! safetensors reader: an 8-byte little-endian header length, a JSON header naming each
//! tensor's dtype, shape and byte range, then the data. The file is memory-mapped; the header
//! is parsed and validated by the `safetensors` crate (Hugging Face's own reader), which
//! refuses a header longer than the file or than 100 MB, offsets that overflow, overlap,
//! leave gaps or run past the end of the file, and shapes whose size (checked for overflow)
//! disagrees with their byte range. Anything malformed is a [`ModelError`], never a panic.

use std::collections::BTreeMap;
use std::path::Path;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::ModelError;
use crate::quant::DType;

/// Bytes before the JSON header: its length, a little-endian `u64`.
const LEN_BYTES: usize = 8;

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

/// The tensors of a whole safetensors file, `map`.
fn parse(map: &[u8]) -> Result<BTreeMap<String, StTensor>, ModelError> {
    // Validates everything the module doc lists: afterwards every tensor's `data_offsets`
    // lie, in order and without gaps, inside the data that follows the header, and hold
    // exactly its shape's bytes.
    let (header_bytes, metadata) = SafeTensors::read_metadata(map)
        .map_err(|e| ModelError::Format(format!("safetensors: {e}")))?;
    // Cannot overflow: `read_metadata` found `LEN_BYTES + header_bytes` bytes in `map`.
    let data_start = LEN_BYTES + header_bytes;
    let mut tensors = BTreeMap::new();
    for (name, info) in metadata.tensors() {
        let dtype = match info.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => {
                return Err(ModelError::Unsupported(format!(
                    "tensor `{name}` has dtype {other:?}"
                )));
            }
        };
        let (begin, end) = info.data_offsets;
        let shape = info.shape.clone();
        tensors.insert(
            name,
            StTensor {
                dtype,
                shape,
                start: data_start + begin,
                bytes: end - begin,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A file: the header length (`len`, else the JSON's), the JSON, then `data` bytes.
    fn file(json: &str, len: Option<u64>, data: usize) -> Vec<u8> {
        let mut out = len.unwrap_or(json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(json.as_bytes());
        out.resize(out.len() + data, 0);
        out
    }

    /// A file of one tensor named `w`.
    fn one(dtype: &str, shape: &str, offsets: &str, data: usize) -> Vec<u8> {
        let json =
            format!(r#"{{"w":{{"dtype":"{dtype}","shape":{shape},"data_offsets":{offsets}}}}}"#);
        file(&json, None, data)
    }

    fn refused(bytes: &[u8]) -> String {
        match parse(bytes) {
            Ok(tensors) => panic!("accepted: {tensors:?}"),
            Err(e @ ModelError::Format(_)) => e.to_string(),
            Err(other) => panic!("not a format error: {other}"),
        }
    }

    #[test]
    fn well_formed_files_parse() {
        let json = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"BF16","shape":[2],"data_offsets":[8,12]},"a":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]}}"#;
        let bytes = file(json, None, 12);
        let tensors = parse(&bytes).unwrap();
        let data_start = 8 + json.len();
        let a = &tensors["a"];
        assert_eq!(
            (a.dtype, &a.shape[..], a.start, a.bytes),
            (DType::F32, &[1, 2][..], data_start, 8)
        );
        let b = &tensors["b"];
        assert_eq!(
            (b.dtype, b.start, b.bytes),
            (DType::BF16, data_start + 8, 4)
        );
    }

    #[test]
    fn crafted_offsets_are_refused() {
        for (offsets, data) in [
            ("[18446744073709551615, 1]", 16),
            ("[0, 18446744073709551615]", 16),
            ("[8, 4]", 16),
            ("[4, 8]", 16),
            ("[0, 4096]", 16),
            ("[0, 16]", 8),
            ("[0, 16]", 24),
            ("[0]", 16),
            ("[-1, 16]", 16),
        ] {
            let err = refused(&one("F32", "[4]", offsets, data));
            assert!(err.contains("safetensors"), "{offsets}: {err}");
        }
        // Two tensors over the same bytes.
        let json = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        refused(&file(json, None, 4));
    }

    #[test]
    fn crafted_shapes_are_refused() {
        // The product overflows; it disagrees with the bytes; a dimension is negative.
        refused(&one("F32", "[4294967296, 4294967296, 16]", "[0, 16]", 16));
        refused(&one("F32", "[18446744073709551615, 2]", "[0, 16]", 16));
        refused(&one("F32", "[3]", "[0, 16]", 16));
        refused(&one("F32", "[-4]", "[0, 16]", 16));
    }

    #[test]
    fn crafted_headers_are_refused() {
        let json = r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        // Longer than the file, than any file, shorter than its JSON; no length at all.
        refused(&file(json, Some(json.len() as u64 + 5), 4));
        refused(&file(json, Some(u64::MAX), 4));
        refused(&file(json, Some(1 << 40), 4));
        refused(&file(json, Some(3), 4));
        refused(&[1, 0, 0]);
        refused(&[]);
        // Not JSON, not UTF-8, not an object of tensors.
        refused(&file("not json", None, 0));
        let mut bytes = file("{}", None, 0);
        bytes[9] = 0xff;
        refused(&bytes);
        refused(&file("[1, 2]", None, 0));
        refused(&file(r#"{"w":{"dtype":"F32"}}"#, None, 0));
        refused(&file(
            r#"{"w":{"dtype":"NOPE","shape":[1],"data_offsets":[0,4]}}"#,
            None,
            4,
        ));
    }

    #[test]
    fn other_dtypes_are_unsupported() {
        let err = parse(&one("I64", "[1]", "[0, 8]", 8)).unwrap_err();
        assert!(matches!(err, ModelError::Unsupported(_)), "{err}");
    }

    #[test]
    fn written_files_read_back() {
        let path = std::env::temp_dir().join(format!("tern-st-{}.safetensors", std::process::id()));
        let a: Vec<u8> = (0..8).collect();
        let b: Vec<u8> = (0..6).collect();
        write_safetensors(
            &path,
            &[
                ("a", DType::F32, vec![2], &a),
                ("b", DType::F16, vec![3], &b),
            ],
        )
        .unwrap();
        let file = SafetensorsFile::open(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let t = &file.tensors["b"];
        assert_eq!(&file.bytes()[t.start..t.start + t.bytes], &b[..]);
        let t = &file.tensors["a"];
        assert_eq!(&file.bytes()[t.start..t.start + t.bytes], &a[..]);
    }
}
