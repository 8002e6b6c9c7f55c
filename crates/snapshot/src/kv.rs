//! KV blobs: one session's key and value caches as a standard safetensors file.
//!
//! Writing never goes through serde per element: the header is formatted once and the `f32`
//! (or half-precision) slices are written as little-endian bytes directly. Reading checks the
//! header strictly (exactly the tensors `k` and `v`, the dtype of the session's cache type,
//! equal 3-D shapes, contiguous offsets that cover the data exactly, the `tern-kv` metadata)
//! and then copies a layer at a time.

use serde::Deserialize;

use crate::layout::{SECTION_ALIGN, u64_at};
use crate::{KvType, MAX_KV_HEADER_BYTES, SnapshotError, check_limit, corrupt};

/// Bytes of the safetensors header-length prefix.
const LEN_PREFIX_BYTES: u64 = 8;

/// One tensor's layers, of the cache's type.
#[derive(Clone, Debug)]
pub enum KvLayers<'a> {
    F32(Vec<&'a [f32]>),
    /// Half-precision bit patterns.
    F16(Vec<&'a [u16]>),
}

impl KvLayers<'_> {
    /// The cache type the layers are of.
    pub fn kv_type(&self) -> KvType {
        match self {
            KvLayers::F32(_) => KvType::F32,
            KvLayers::F16(_) => KvType::F16,
        }
    }

    /// Number of layers.
    pub fn len(&self) -> usize {
        match self {
            KvLayers::F32(l) => l.len(),
            KvLayers::F16(l) => l.len(),
        }
    }

    /// Whether there are no layers.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values in each layer.
    fn lens(&self) -> Vec<usize> {
        match self {
            KvLayers::F32(l) => l.iter().map(|s| s.len()).collect(),
            KvLayers::F16(l) => l.iter().map(|s| s.len()).collect(),
        }
    }
}

/// One session's KV cache to write: per layer, `n_tokens` positions of `kv_dim` values each.
#[derive(Clone, Debug)]
pub struct KvWrite<'a> {
    /// Values per token per layer: `n_head_kv × head_dim`.
    pub kv_dim: usize,
    pub n_tokens: usize,
    /// Keys per layer, each `n_tokens × kv_dim` values (`[n_tokens, kv_dim]`, row-major).
    pub k: KvLayers<'a>,
    /// Values per layer, shaped and typed like `k`.
    pub v: KvLayers<'a>,
}

impl KvWrite<'_> {
    /// Checks that every layer slice holds `n_tokens × kv_dim` floats and that K and V have
    /// the same number of layers; returns the bytes of one tensor (`n_layer × n_tokens ×
    /// kv_dim × 4`).
    pub(crate) fn tensor_bytes(&self, session: usize) -> Result<u64, SnapshotError> {
        if self.k.len() != self.v.len() {
            return Err(corrupt(format!(
                "session {session} KV cache has {} K layers but {} V layers",
                self.k.len(),
                self.v.len()
            )));
        }
        if self.k.kv_type() != self.v.kv_type() {
            return Err(corrupt(format!(
                "session {session} KV cache has keys and values of different types"
            )));
        }
        let layer_floats = (self.n_tokens as u64).checked_mul(self.kv_dim as u64);
        let layer_floats = layer_floats.ok_or_else(|| overflow(session))?;
        for (name, layers) in [("K", &self.k), ("V", &self.v)] {
            let lens = layers.lens();
            if let Some(l) = lens.iter().position(|&n| n as u64 != layer_floats) {
                return Err(corrupt(format!(
                    "session {session} {name} layer {l} holds {} values, expected n_tokens {} × kv_dim {} = {layer_floats}",
                    lens[l], self.n_tokens, self.kv_dim
                )));
            }
        }
        tensor_bytes(
            self.k.len() as u64,
            self.n_tokens as u64,
            self.kv_dim as u64,
            self.k.kv_type(),
        )
        .ok_or_else(|| overflow(session))
    }
}

fn overflow(session: usize) -> SnapshotError {
    corrupt(format!("session {session} KV cache size overflows u64"))
}

/// Bytes of one `[n_layer, n_tokens, kv_dim]` f32 tensor; `None` on overflow.
fn tensor_bytes(n_layer: u64, n_tokens: u64, kv_dim: u64, kv_type: KvType) -> Option<u64> {
    n_layer
        .checked_mul(n_tokens)?
        .checked_mul(kv_dim)?
        .checked_mul(kv_type.bytes())
}

/// The length prefix and JSON header of a blob holding two `[n_layer, n_tokens, kv_dim]`
/// tensors of `tensor_bytes` each, padded with spaces to a multiple of 64 bytes so the data
/// that follows is 64-byte aligned in the file.
pub(crate) fn header(
    n_layer: usize,
    n_tokens: usize,
    kv_dim: usize,
    kv_type: KvType,
    tensor_bytes: u64,
) -> Vec<u8> {
    let dtype = kv_type.dtype();
    let shape = format!("[{n_layer},{n_tokens},{kv_dim}]");
    let n = tensor_bytes;
    let both = 2 * n; // the caller's section fits in u64, so this does not overflow
    let mut json = format!(
        r#"{{"__metadata__":{{"format":"tern-kv","version":"1"}},"k":{{"dtype":"{dtype}","shape":{shape},"data_offsets":[0,{n}]}},"v":{{"dtype":"{dtype}","shape":{shape},"data_offsets":[{n},{both}]}}}}"#
    )
    .into_bytes();
    let align = SECTION_ALIGN as usize;
    let padded = (LEN_PREFIX_BYTES as usize + json.len()).next_multiple_of(align);
    json.resize(padded - LEN_PREFIX_BYTES as usize, b' ');
    let mut out = Vec::with_capacity(padded);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

/// `values` as little-endian bytes, without copying.
#[cfg(target_endian = "little")]
pub(crate) fn f32_bytes(values: &[f32]) -> &[u8] {
    // SAFETY: `f32` has no padding and every bit pattern of its bytes is an initialized `u8`;
    // `u8` has alignment 1; the new slice covers exactly the `size_of_val(values)` bytes of
    // `values` and borrows them for the same lifetime, immutably. On a little-endian host
    // these bytes are the little-endian encoding the format stores.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), size_of_val(values)) }
}

/// The safetensors header this crate writes, read strictly.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    #[serde(rename = "__metadata__")]
    metadata: Metadata,
    k: TensorInfo,
    v: TensorInfo,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    format: String,
    version: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TensorInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// One session's KV cache in a snapshot: two `[n_layer, n_tokens, kv_dim]` f32 tensors.
#[derive(Clone, Copy)]
pub struct KvView<'a> {
    pub n_layer: usize,
    pub n_tokens: usize,
    pub kv_dim: usize,
    /// The type of its values.
    pub kv_type: KvType,
    blob: &'a [u8],
    k: &'a [u8],
    v: &'a [u8],
}

impl<'a> KvView<'a> {
    /// Checks a blob's header and sizes; the caller checks the shape against the manifest.
    pub(crate) fn parse(
        session: usize,
        blob: &'a [u8],
        kv_type: KvType,
    ) -> Result<Self, SnapshotError> {
        let bad = |what: String| corrupt(format!("session {session} KV blob {what}"));
        let header_len = u64_at(blob, 0).ok_or_else(|| bad("is shorter than 8 bytes".into()))?;
        check_limit("KV header length", header_len, MAX_KV_HEADER_BYTES)?;
        let data_start = LEN_PREFIX_BYTES + header_len;
        if data_start > blob.len() as u64 {
            return Err(bad(format!(
                "header of {header_len} bytes runs past the blob's {} bytes",
                blob.len()
            )));
        }
        // data_start <= blob.len().
        let (json, data) = blob.split_at(data_start as usize);
        let json = &json[LEN_PREFIX_BYTES as usize..];
        if json.first() != Some(&b'{') {
            return Err(bad("header does not start with '{'".into()));
        }
        let header: Header = serde_json::from_slice(json)
            .map_err(|e| bad(format!("header is not a tern-kv safetensors header: {e}")))?;
        let Metadata { format, version } = &header.metadata;
        if format != "tern-kv" || version != "1" {
            return Err(bad(format!(
                "metadata says format {format:?} version {version:?}, expected \"tern-kv\" version \"1\""
            )));
        }
        for (name, info) in [("k", &header.k), ("v", &header.v)] {
            if info.dtype != kv_type.dtype() {
                return Err(bad(format!(
                    "tensor {name} has dtype {}, expected {} (the session's cache is {})",
                    info.dtype,
                    kv_type.dtype(),
                    kv_type.name()
                )));
            }
        }
        let &[n_layer, n_tokens, kv_dim] = header.k.shape.as_slice() else {
            return Err(bad(format!(
                "tensor k has shape {:?}, expected 3 dimensions",
                header.k.shape
            )));
        };
        if header.v.shape != header.k.shape {
            return Err(bad(format!(
                "tensor v has shape {:?} but k has {:?}",
                header.v.shape, header.k.shape
            )));
        }
        let n = tensor_bytes(n_layer, n_tokens, kv_dim, kv_type)
            .filter(|n| n.checked_mul(2) == Some(data.len() as u64));
        let Some(n) = n else {
            return Err(bad(format!(
                "data of {} bytes does not hold two {} tensors of shape {:?}",
                data.len(),
                kv_type.name(),
                header.k.shape
            )));
        };
        if header.k.data_offsets != [0, n] || header.v.data_offsets != [n, 2 * n] {
            return Err(bad(format!(
                "data offsets k {:?} v {:?} are not [0, {n}] and [{n}, {}]",
                header.k.data_offsets,
                header.v.data_offsets,
                2 * n
            )));
        }
        let dim = |d: u64| {
            usize::try_from(d).map_err(|_| bad(format!("dimension {d} does not fit in memory")))
        };
        // n * 2 == data.len(), so n fits in usize.
        let (k, v) = data.split_at(n as usize);
        Ok(KvView {
            n_layer: dim(n_layer)?,
            n_tokens: dim(n_tokens)?,
            kv_dim: dim(kv_dim)?,
            kv_type,
            blob,
            k,
            v,
        })
    }

    /// The shape of each of K and V: `[n_layer, n_tokens, kv_dim]`.
    pub fn shape(&self) -> [usize; 3] {
        [self.n_layer, self.n_tokens, self.kv_dim]
    }

    /// The whole blob: a standard safetensors file.
    pub fn bytes(&self) -> &'a [u8] {
        self.blob
    }

    /// Layer `layer` of K as little-endian bytes, `n_tokens × kv_dim × 4` of them.
    pub fn k_layer_bytes(&self, layer: usize) -> Result<&'a [u8], SnapshotError> {
        self.layer_bytes(self.k, layer)
    }

    /// Layer `layer` of V as little-endian bytes, `n_tokens × kv_dim × 4` of them.
    pub fn v_layer_bytes(&self, layer: usize) -> Result<&'a [u8], SnapshotError> {
        self.layer_bytes(self.v, layer)
    }

    /// Copies layer `layer` of K into `dst`, which must hold `n_tokens × kv_dim` floats.
    pub fn k_layer(&self, layer: usize, dst: &mut [f32]) -> Result<(), SnapshotError> {
        copy_f32(self.k_layer_bytes(layer)?, dst)
    }

    /// Copies layer `layer` of V into `dst`, which must hold `n_tokens × kv_dim` floats.
    pub fn v_layer(&self, layer: usize, dst: &mut [f32]) -> Result<(), SnapshotError> {
        copy_f32(self.v_layer_bytes(layer)?, dst)
    }

    fn layer_bytes(&self, tensor: &'a [u8], layer: usize) -> Result<&'a [u8], SnapshotError> {
        if layer >= self.n_layer {
            return Err(SnapshotError::OutOfRange {
                what: "KV layer",
                index: layer as u64,
                len: self.n_layer as u64,
            });
        }
        // parse checked n_layer × layer_bytes == tensor.len(), so this range lies in tensor;
        // the checked arithmetic only keeps that from being a panic if it ever did not.
        let layer_bytes = self
            .n_tokens
            .checked_mul(self.kv_dim)
            .and_then(|n| n.checked_mul(self.kv_type.bytes() as usize));
        let range =
            layer_bytes.and_then(|n| Some(layer.checked_mul(n)?..(layer + 1).checked_mul(n)?));
        range
            .and_then(|range| tensor.get(range))
            .ok_or_else(|| corrupt(format!("KV layer {layer} lies outside its tensor")))
    }
}

impl std::fmt::Debug for KvView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvView")
            .field("shape", &self.shape())
            .field("bytes", &self.blob.len())
            .finish()
    }
}

/// Decodes little-endian `src` into `dst`, which must hold exactly `src.len() / 4` floats.
fn copy_f32(src: &[u8], dst: &mut [f32]) -> Result<(), SnapshotError> {
    let (words, _) = src.as_chunks::<4>();
    if words.len() != dst.len() {
        return Err(SnapshotError::BufferSize {
            what: "KV layer destination (f32s)",
            expected: words.len() as u64,
            actual: dst.len() as u64,
        });
    }
    for (d, w) in dst.iter_mut().zip(words) {
        *d = f32::from_le_bytes(*w);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(n_layer: usize, n_tokens: usize, kv_dim: usize) -> Vec<u8> {
        let count = n_layer * n_tokens * kv_dim;
        let bytes = (count * 4) as u64;
        let mut out = header(n_layer, n_tokens, kv_dim, KvType::F32, bytes);
        for i in 0..2 * count {
            out.extend_from_slice(&(i as f32).to_le_bytes());
        }
        out
    }

    #[test]
    fn header_is_padded_to_64() {
        for (l, t, d) in [(0, 0, 0), (1, 1, 1), (32, 4096, 1024)] {
            let h = header(l, t, d, KvType::F32, (l * t * d * 4) as u64);
            assert_eq!(h.len() % 64, 0);
            assert_eq!(u64_at(&h, 0).unwrap() as usize, h.len() - 8);
        }
    }

    #[test]
    fn parse_reads_layers() {
        let bytes = blob(2, 3, 4);
        let view = KvView::parse(0, &bytes, KvType::F32).unwrap();
        assert_eq!(view.shape(), [2, 3, 4]);
        let mut layer = [0f32; 12];
        view.k_layer(1, &mut layer).unwrap();
        assert_eq!(layer[0], 12.0);
        view.v_layer(1, &mut layer).unwrap();
        assert_eq!(layer[11], 47.0);
        assert!(matches!(
            view.k_layer(2, &mut layer),
            Err(SnapshotError::OutOfRange { .. })
        ));
        assert!(matches!(
            view.k_layer(0, &mut [0.0; 5]),
            Err(SnapshotError::BufferSize { .. })
        ));
    }

    #[test]
    fn parse_refuses_bad_headers() {
        let good = blob(1, 1, 1);
        let good = String::from_utf8(good[8..good.len() - 8].to_vec()).unwrap();
        let cases = [
            (good.replace("tern-kv", "tern-xx"), "metadata"),
            (good.replacen("F32", "F16", 1), "dtype F16, expected F32"),
            (good.replacen("[1,1,1]", "[1,1,2]", 1), "shape"),
            (good.replacen("[0,4]", "[1,4]", 1), "data offsets"),
            (
                good.replacen(
                    '{',
                    r#"{"x":{"dtype":"F32","shape":[],"data_offsets":[0,0]},"#,
                    1,
                ),
                "unknown field",
            ),
            (good.replacen('{', " {", 1), "start with"),
        ];
        for (json, expected) in cases {
            let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(json.as_bytes());
            bytes.extend_from_slice(&[0u8; 8]);
            let err = KvView::parse(0, &bytes, KvType::F32).unwrap_err();
            assert!(
                err.to_string().contains(expected),
                "{err} lacks {expected:?}"
            );
        }
    }

    #[test]
    fn an_f16_blob_reads_its_half_precision_bytes() {
        let count = 2 * 3 * 4;
        let mut bytes = header(2, 3, 4, KvType::F16, 2 * count as u64);
        for i in 0..2 * count {
            bytes.extend_from_slice(&(i as u16).to_le_bytes());
        }
        let view = KvView::parse(0, &bytes, KvType::F16).unwrap();
        assert_eq!(view.k_layer_bytes(1).unwrap()[..2], 12u16.to_le_bytes());
        assert_eq!(view.v_layer_bytes(1).unwrap().len(), 24);
        let err = KvView::parse(0, &bytes, KvType::F32).unwrap_err();
        assert!(err.to_string().contains("dtype F16, expected F32"), "{err}");
    }

    #[test]
    fn write_checks_layer_lengths() {
        let data = [0f32; 6];
        let kv = KvWrite {
            kv_dim: 3,
            n_tokens: 2,
            k: KvLayers::F32(vec![&data, &data[..5]]),
            v: KvLayers::F32(vec![&data, &data]),
        };
        let err = kv.tensor_bytes(0).unwrap_err();
        assert!(
            err.to_string().contains("K layer 1 holds 5 values"),
            "{err}"
        );
    }
}
