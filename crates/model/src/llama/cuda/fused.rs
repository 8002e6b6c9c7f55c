//! A decode step's layers as one launch of a persistent kernel (`kernels/decode.cu`): which
//! models it serves, its grid, and each session's share of it (the table of layers it reads
//! and the grid barrier's counter).

use std::sync::Arc;

use tern_compute::cuda::cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use tern_compute::cuda::cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr,
};

use super::kernels::{DevMatrix, parts_of};
use super::weights::DeviceWeights;
use super::{ATTN_THREADS, driver};
use crate::ModelError;
use crate::llama::LlamaConfig;
use crate::quant::DType;

/// Threads of one block of the persistent kernel (`decode.cu`'s `DECODE_THREADS`, written
/// into `constants.cuh` from here).
pub const DECODE_THREADS: u32 = 512;
/// Attention teams of `ATTN_THREADS` in one block.
const DECODE_TEAMS: u32 = DECODE_THREADS / ATTN_THREADS;

/// `decode.cu`'s `DecodeMatrix`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct DecodeMatrix {
    w: u64,
    rows: u32,
    cols: u32,
    row_bytes: u32,
    parts: u32,
}

impl From<&DevMatrix> for DecodeMatrix {
    fn from(m: &DevMatrix) -> DecodeMatrix {
        DecodeMatrix {
            w: m.ptr,
            rows: m.rows,
            cols: m.cols,
            row_bytes: m.row_bytes,
            parts: parts_of(m),
        }
    }
}

/// `decode.cu`'s `DecodeLayer`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct DecodeLayer {
    qkv: DecodeMatrix,
    wo: DecodeMatrix,
    gate_up: DecodeMatrix,
    down: DecodeMatrix,
    attn_norm: u64,
    ffn_norm: u64,
    next_norm: u64,
    k_cache: u64,
    v_cache: u64,
}

/// `decode.cu`'s `DecodeArgs`: every address the step reads and writes, and the sizes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DecodeArgs {
    pub layers: u64,
    pub step: u64,
    pub barrier: u64,
    pub x: u64,
    pub xb: u64,
    pub qkv: u64,
    pub att: u64,
    pub hb: u64,
    pub part_o: u64,
    pub part_ml: u64,
    pub tickets: u64,
    pub inv_freq: u64,
    /// 0, or where block 0 writes the step's timestamps (see [`stage_times`]).
    pub timing: u64,
    pub n_layer: u32,
    pub n_head: u32,
    pub n_head_kv: u32,
    pub n_rot: u32,
    pub n_split: u32,
    pub halves: i32,
    pub eps: f32,
    pub scale: f32,
}

/// The weight type every layer matrix shares, when the persistent kernel can run the
/// model's layers: Q/K/V stacked into one matrix, gate and up interleaved into one, all of
/// one type, and float rows of whole 32-column slices. Otherwise why not.
pub fn layer_type(w: &DeviceWeights) -> Result<DType, String> {
    let first = w.layers.first().ok_or("the model has no layers")?;
    let dtype = first.wo.dtype;
    for (l, layer) in w.layers.iter().enumerate() {
        let ([qkv], [gate_up]) = (&layer.qkv[..], &layer.gate_up[..]) else {
            return Err(format!(
                "layer {l}'s Q/K/V or gate/up weights differ in type"
            ));
        };
        if !layer.glu {
            return Err(format!("layer {l}'s gate and up are not interleaved"));
        }
        for m in [qkv, &layer.wo, gate_up, &layer.w_down] {
            if m.dtype != dtype {
                return Err(format!("layer {l} mixes {} and {} weights", m.dtype, dtype));
            }
            if !m.cols.is_multiple_of(32) {
                return Err(format!("a matrix of {} columns", m.cols));
            }
        }
    }
    Ok(dtype)
}

/// Dynamic shared memory of one block: `DECODE_TEAMS` of attention.cuh's `AttnShared<D, 1>`
/// (q, k and v of D floats, G * D partial sums, 64 weights, max and sum, the merge flag; its
/// arrays 16-byte aligned, its size a multiple of 16), then the products' input, an f32 for
/// each of `max_cols` columns.
fn shared_bytes(head_dim: usize, max_cols: usize) -> usize {
    let lanes = (head_dim / 4).min(32);
    let groups = ATTN_THREADS as usize / lanes;
    let team = (4 * (3 * head_dim + groups * head_dim + 64 + 2 + 1)).next_multiple_of(16);
    team * DECODE_TEAMS as usize + 4 * max_cols
}

/// The widest layer matrix's columns (the largest input a product of the layers reads).
pub fn max_cols(w: &DeviceWeights) -> usize {
    w.layers
        .iter()
        .flat_map(|l| l.qkv.iter().chain(&l.gate_up).chain([&l.wo, &l.w_down]))
        .map(|m| m.cols as usize)
        .max()
        .unwrap_or(0)
}

/// The persistent kernel, compiled for the model, with its launch geometry.
pub struct Fused {
    pub f: CudaFunction,
    /// Blocks: as many as the GPU holds at once.
    pub grid: u32,
    pub shared: u32,
}

impl Fused {
    /// The launch geometry of `f` on `ctx`'s GPU for layers of head size `head_dim` whose
    /// widest matrix has `max_cols` columns, or why it cannot run there.
    pub fn new(
        ctx: &Arc<CudaContext>,
        f: CudaFunction,
        head_dim: usize,
        max_cols: usize,
    ) -> Result<Fused, String> {
        let attribute = |a| ctx.attribute(a).map_err(|e| format!("{e:?}"));
        if attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH)? == 0 {
            return Err("the GPU has no cooperative launches".into());
        }
        let sms = attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let shared = shared_bytes(head_dim, max_cols);
        let most =
            attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        if shared > usize::try_from(most).unwrap_or(0) {
            return Err(format!(
                "a block would need {shared} bytes of shared memory; the GPU gives {most}"
            ));
        }
        // Asked for whatever the size (past 48 KiB it must be); at most `most`, so it fits
        // an i32 and a u32.
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            shared as i32,
        )
        .map_err(|e| format!("{e:?}"))?;
        let per_sm = f
            .occupancy_max_active_blocks_per_multiprocessor(DECODE_THREADS, shared, None)
            .map_err(|e| format!("{e:?}"))?;
        let grid = per_sm * u32::try_from(sms).unwrap_or(0);
        if grid == 0 {
            return Err("a block of the persistent kernel does not fit an SM".into());
        }
        Ok(Fused {
            f,
            grid,
            shared: shared as u32,
        })
    }
}

/// A session's share: the layer table (with its KV cache's addresses) and the barrier's
/// counter, which only ever grows.
pub struct FusedSession {
    layers: CudaSlice<DecodeLayer>,
    barrier: CudaSlice<u64>,
}

// SAFETY: `DecodeLayer` is plain old data (`repr(C)`, u32 and u64 fields only, no padding),
// laid out as decode.cu's struct of the same name.
unsafe impl tern_compute::cuda::cudarc::driver::DeviceRepr for DecodeLayer {}

impl FusedSession {
    /// Uploads the layer table for `w`, with each layer's KV caches (keys, values).
    pub fn new(
        stream: &Arc<CudaStream>,
        w: &DeviceWeights,
        caches: Vec<(u64, u64)>,
    ) -> Result<FusedSession, ModelError> {
        let table: Vec<DecodeLayer> = w
            .layers
            .iter()
            .zip(caches)
            .enumerate()
            .map(|(l, (layer, (k_cache, v_cache)))| DecodeLayer {
                qkv: (&layer.qkv[0]).into(),
                wo: (&layer.wo).into(),
                gate_up: (&layer.gate_up[0]).into(),
                down: (&layer.w_down).into(),
                attn_norm: layer.attn_norm,
                ffn_norm: layer.ffn_norm,
                next_norm: w.layers.get(l + 1).map_or(0, |n| n.attn_norm),
                k_cache,
                v_cache,
            })
            .collect();
        let fail = driver("setting up the fused decode step");
        Ok(FusedSession {
            layers: stream.clone_htod(&table).map_err(&fail)?,
            barrier: stream.alloc_zeros::<u64>(1).map_err(&fail)?,
        })
    }

    /// The step's arguments, given the session's buffers (`buffers`: x, xb, qkv, att, hb,
    /// part_o, part_ml, tickets), step and timing buffer (0 for none).
    #[allow(clippy::too_many_arguments)]
    pub fn args(
        &self,
        stream: &Arc<CudaStream>,
        c: &LlamaConfig,
        inv_freq: u64,
        step: u64,
        n_split: u32,
        buffers: [u64; 8],
        timing: u64,
    ) -> DecodeArgs {
        let [x, xb, qkv, att, hb, part_o, part_ml, tickets] = buffers;
        DecodeArgs {
            layers: self.layers.device_ptr(stream).0,
            step,
            barrier: self.barrier.device_ptr(stream).0,
            x,
            xb,
            qkv,
            att,
            hb,
            part_o,
            part_ml,
            tickets,
            inv_freq,
            timing,
            n_layer: c.n_layer as u32,
            n_head: c.n_head as u32,
            n_head_kv: c.n_head_kv as u32,
            n_rot: c.n_rot as u32,
            n_split,
            halves: super::halves(c),
            eps: c.rms_eps,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
        }
    }
}

/// The stages of a layer in the persistent kernel, in order.
const STAGES: [&str; 5] = [
    "layers: qkv",
    "layers: attention",
    "layers: o",
    "layers: gate_up",
    "layers: down",
];

/// Timestamps the persistent kernel writes with `timing` given: its start, then one as
/// block 0 leaves each stage's barrier.
pub fn timestamps(n_layer: usize) -> usize {
    STAGES.len() * n_layer + 1
}

/// Each stage's total over the layers, in microseconds, from the kernel's timestamps (ns):
/// a stage's time runs until block 0 leaves the barrier after it, so it includes the wait
/// for the slowest block and the barrier itself.
pub fn stage_times(stamps: &[u64]) -> Vec<(&'static str, f64)> {
    let mut totals: Vec<(&'static str, f64)> = STAGES.iter().map(|&s| (s, 0.0)).collect();
    for (i, pair) in stamps.windows(2).enumerate() {
        totals[i % STAGES.len()].1 += pair[1].saturating_sub(pair[0]) as f64 / 1e3;
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::{shared_bytes, stage_times};

    #[test]
    fn stage_times_add_up_each_stage_over_the_layers() {
        let stamps = [
            0, 1000, 3000, 3500, 4000, 9000, 10_000, 11_000, 11_500, 12_000, 17_000,
        ];
        let t = stage_times(&stamps);
        assert_eq!(t[0], ("layers: qkv", 2.0));
        assert_eq!(t[1], ("layers: attention", 3.0));
        assert_eq!(t[4], ("layers: down", 10.0));
    }

    #[test]
    fn shared_memory_is_sized_as_decode_cu_lays_it_out() {
        // Head size 64: 16 lanes a row, 8 groups; (3 * 64 + 8 * 64 + 67) floats = 3,084
        // bytes, rounded to 3,088; four teams; then the input of 8,192 columns (the 1B
        // shape's down product).
        assert_eq!(shared_bytes(64, 8192), 4 * 3088 + 4 * 8192);
        // 128: 32 lanes, 4 groups: (384 + 512 + 67) * 4 = 3,852, rounded to 3,856.
        assert_eq!(shared_bytes(128, 0), 4 * 3856);
    }
}
