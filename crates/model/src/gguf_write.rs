//! A GGUF v3 writer, for generated models and for tests that need small or broken files.

use std::io::{self, Write};

use crate::gguf::Value;
use crate::quant::DType;

/// One tensor to write: its name, ggml-order dims, type and already-encoded bytes.
pub struct TensorOut<'a> {
    pub name: &'a str,
    pub dims: &'a [u64],
    pub dtype: DType,
    pub data: &'a [u8],
}

const ALIGNMENT: usize = 32;

/// Writes a complete GGUF v3 file with `metadata` and `tensors` to `out`.
pub fn write_gguf(
    out: &mut impl Write,
    metadata: &[(&str, Value)],
    tensors: &[TensorOut<'_>],
) -> io::Result<()> {
    let mut header = Vec::new();
    header.extend_from_slice(b"GGUF");
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut header, key);
        header.extend_from_slice(&type_id(value).to_le_bytes());
        put_value(&mut header, value);
    }
    let mut offset = 0usize;
    for t in tensors {
        put_string(&mut header, t.name);
        header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in t.dims {
            header.extend_from_slice(&d.to_le_bytes());
        }
        header.extend_from_slice(&t.dtype.ggml_id().to_le_bytes());
        header.extend_from_slice(&(offset as u64).to_le_bytes());
        offset = (offset + t.data.len()).next_multiple_of(ALIGNMENT);
    }
    header.resize(header.len().next_multiple_of(ALIGNMENT), 0);
    out.write_all(&header)?;
    for t in tensors {
        out.write_all(t.data)?;
        let pad = t.data.len().next_multiple_of(ALIGNMENT) - t.data.len();
        out.write_all(&[0u8; ALIGNMENT][..pad])?;
    }
    Ok(())
}

fn put_string(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(buf: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => buf.push(*x),
        Value::I8(x) => buf.push(*x as u8),
        Value::U16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => buf.push(u8::from(*x)),
        Value::String(s) => put_string(buf, s),
        Value::Array(items) => {
            let elem = items.first().map_or(4, type_id);
            buf.extend_from_slice(&elem.to_le_bytes());
            buf.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(buf, item);
            }
        }
        Value::U64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => buf.extend_from_slice(&x.to_le_bytes()),
    }
}
