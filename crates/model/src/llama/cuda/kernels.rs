//! The forward pass's kernels: compiled from `kernels/*.cu` for the GPU's architecture (or
//! loaded from the on-disk cache of earlier compilations), and launched with typed wrappers
//! that state each kernel's geometry in one place.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tern_compute::cuda::compile_cubin;
use tern_compute::cuda::cudarc::driver::sys;
use tern_compute::cuda::cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig,
};
use tern_compute::cuda::cudarc::nvrtc::Ptx;

use super::driver;
use crate::ModelError;
use crate::llama::cpu::KvType;
use crate::quant::DType;

const MATVEC: &str = include_str!("kernels/matvec.cu");
/// `matvec.cu`'s programs, one per type of `DType::ALL`, in its order.
const MATVEC_UNITS: [&str; 8] = [
    "matvec.cu-f32",
    "matvec.cu-f16",
    "matvec.cu-bf16",
    "matvec.cu-q8_0",
    "matvec.cu-q4_0",
    "matvec.cu-q4_1",
    "matvec.cu-q4_k",
    "matvec.cu-q6_k",
];
const LLAMA: &str = include_str!("kernels/llama.cu");
const DECODE: &str = include_str!("kernels/decode.cu");
const MMA: &str = include_str!("kernels/mma.cu");
/// The headers the programs above include, by the names they include them by.
const HEADERS: [(&str, &str); 4] = [
    ("common.cuh", include_str!("kernels/common.cuh")),
    ("matvec.cuh", include_str!("kernels/matvec.cuh")),
    ("attention.cuh", include_str!("kernels/attention.cuh")),
    ("mma.cuh", include_str!("kernels/mma.cuh")),
];

/// [`HEADERS`] and `constants.cuh` (the numbers shared with the host, written from its
/// constants by [`super::constants`]): every header the programs are compiled with.
fn headers() -> [(&'static str, &'static str); 5] {
    let [common, matvec_h, attention, mma_h] = HEADERS;
    [
        super::constants::header(),
        common,
        matvec_h,
        attention,
        mma_h,
    ]
}

/// Every source file the kernels are compiled from, by name: what the kernel version of
/// [`super::CudaLlama::numerics`] hashes.
pub(super) fn sources() -> [(&'static str, &'static str); 9] {
    let [constants, common, matvec_h, attention, mma_h] = headers();
    [
        ("matvec.cu", MATVEC),
        ("llama.cu", LLAMA),
        ("decode.cu", DECODE),
        ("mma.cu", MMA),
        constants,
        common,
        matvec_h,
        attention,
        mma_h,
    ]
}

/// Warps of one `matvec` block (one row each, or one part of a split row).
const MATVEC_WARPS: usize = 8;

/// Warps `matvec` gives each row of a `rows` x `cols` matrix: split rows (1, 2, 4 or 8
/// parts of at least four 256-column steps each) while the matrix has too few rows to keep
/// 8,192 warps reading, which short matrices (the attention output, Q/K/V, the MLP's down
/// projection) otherwise leave the GPU well short of.
fn matvec_parts(rows: usize, cols: usize) -> usize {
    let steps = cols.div_ceil(256);
    let mut parts = 1;
    while parts < MATVEC_WARPS && rows * parts < 8192 && steps >= 8 * parts {
        parts *= 2;
    }
    parts
}

/// Rows a warp of `matvec` or `matvec_out` takes together for one token of `w` at `x`, in
/// `parts` parts (`matvec.cuh`'s `matvec_together`; the same bits as one row a warp): 4, or 2,
/// while the launch keeps at least [`TOGETHER_WARPS`] warps reading; 1 for several tokens,
/// for formats whose loads would not fit the kernel's registers (`together_fits`), for float
/// rows read by elements and for an x that is not 16-byte aligned.
fn rows_together(w: &DevMatrix, parts: usize, n: u32, x: u64) -> u32 {
    let fits = matches!(
        w.dtype,
        DType::F16 | DType::BF16 | DType::Q8_0 | DType::Q4_1
    );
    if n != 1 || !fits || !w.cols.is_multiple_of(32) || !x.is_multiple_of(16) {
        return 1;
    }
    let warps = w.rows as usize * parts;
    [4, 2]
        .into_iter()
        .find(|r| warps / r >= TOGETHER_WARPS)
        .unwrap_or(1) as u32
}

/// The fewest warps a one-token product keeps reading when its rows go together: about two
/// thirds of an H100's resident warps at three blocks an SM.
const TOGETHER_WARPS: usize = 2048;

/// Most tokens one `mma_many` or `mma_ring` launch takes; more go in turns.
pub const MMA_MAX_TOKENS: u32 = 64;
/// Chunks (32 columns) a stage of `mma_ring`, and the stages in its ring.
pub const MMA_RING_CHUNKS: u32 = 2;
pub const MMA_RING_STAGES: u32 = 3;
const _: () = assert!(MMA_MAX_TOKENS.is_multiple_of(4));
/// How `mma_split` lays out the split activations (`mma.cuh`): rows for `mma_many`, chunk by
/// chunk for `mma_ring_bf16`'s fragment reads, as warpgroup mmas' operands for `mma_wg_bf16`
/// (`MMA_OPERANDS + k`: operands of `MMA_MAX_TOKENS >> k` tokens, for `mma_wg_bf16_32` and
/// `mma_wg_bf16_16`).
pub const MMA_ROWS: u32 = 0;
pub const MMA_CHUNKS: u32 = 1;
pub const MMA_OPERANDS: u32 = 2;
/// Columns of one block of `mma_split` (8 a thread).
pub const MMA_SPLIT_COLS: u32 = 2048;
/// Words of the flags of the norm's scales that a product takes itself (`mma.cuh`'s
/// `mma_scale_take`): one a token, and a count.
const MMA_FLAGS: usize = MMA_MAX_TOKENS as usize + 1;

/// Parts of the columns the tensor-core kernels give a `rows` x `cols` matrix: fixed by its
/// shape alone, never by the tokens (see `mma.cuh`). The fewest (a power of two, at most 16,
/// parts of 256 columns or more) giving at least 2,048 warps of one row tile.
pub fn mma_parts(rows: usize, cols: usize) -> usize {
    let mut p = 1;
    while p < 16 && (rows / 16) * p < 2048 && cols / (2 * p) >= 256 && cols.is_multiple_of(512 * p)
    {
        p *= 2;
    }
    p
}

/// Whether the model's BF16 matrices go to the tensor-core kernels: at
/// [`Precision::Tensor`](crate::Precision::Tensor), on sm_80 and later (`mma.sync` with bf16
/// operands).
pub fn mma_wanted(arch: u32, precision: crate::Precision) -> bool {
    arch >= 80 && precision == crate::Precision::Tensor
}

/// Whether the tensor-core kernels take a matrix: BF16, rows in whole groups of 8 tiles of
/// 16, columns in whole 256-column steps.
pub fn mma_fits(m: &DevMatrix) -> bool {
    m.dtype == DType::BF16 && m.rows.is_multiple_of(128) && m.cols.is_multiple_of(256)
}

/// Dynamic shared memory of `mma_ring_bf16` and `mma_wg_bf16`.
const MMA_RING_SMEM: u32 = mma_ring_smem(MMA_MAX_TOKENS, MMA_RING_STAGES);
/// Dynamic shared memory of `mma_wg_bf16_16` and `mma_wg_bf16_32`.
const MMA_WG16_SMEM: u32 = mma_ring_smem(16, MMA_WG16_STAGES);
const MMA_WG32_SMEM: u32 = mma_ring_smem(32, MMA_WG32_STAGES);

/// Stages of the rings of `mma_wg_bf16_16` and `mma_wg_bf16_32`: as many as two blocks an SM
/// hold.
pub const MMA_WG16_STAGES: u32 = 5;
pub const MMA_WG32_STAGES: u32 = 4;

/// Dynamic shared memory of a ring of `stages` stages for `tokens` tokens (`mma.cuh`'s
/// `mma_ring`: each stage 8 KiB of weights and 128 bytes of activations a token a chunk, then an
/// mbarrier a stage).
const fn mma_ring_smem(tokens: u32, stages: u32) -> u32 {
    stages * (MMA_RING_CHUNKS * (8192 + tokens * 128) + 8)
}

/// Dynamic shared memory of `mma_many_bf16_<nt>` (`mma.cuh`'s `mma_many_smem`).
fn mma_many_smem(nt: u32) -> u32 {
    let chunks = if nt >= 4 { 2 } else { 4 };
    2 * 8 * nt * (chunks * 128 + 64)
}

/// The tensor-core kernels (`mma.cu`) and their scratch: the split activations, the norm's
/// scales, the parts' sums and the tiles' tickets. One model's launches run in stream order,
/// so one set serves every launch.
pub struct Mma {
    tile: CudaFunction,
    split: CudaFunction,
    one: CudaFunction,
    /// `mma_many_bf16_<nt>` for nt = 1, 2, 4 (up to 32 tokens).
    many: [CudaFunction; 3],
    /// 33 to 64 tokens: `mma_wg_bf16` on Hopper (sm_90, compiled as sm_90a), else
    /// `mma_ring_bf16`; and the split's layout for it.
    ring: (CudaFunction, u32),
    /// 9 to 16 and 17 to 32 tokens on Hopper: `mma_wg_bf16_16` and `mma_wg_bf16_32` (elsewhere
    /// `mma_many_bf16_2` and `_4`).
    few: Option<[CudaFunction; 2]>,
    /// Two sets of split activations (hi, then lo): a product reads one while its outputs
    /// go split into the other for the product after it.
    sets: [(u64, u64); 2],
    scale: u64,
    part_sums: u64,
    tickets: u64,
    flags: u64,
    /// The split that the last product wrote for the next (see [`Pending`]).
    pending: Mutex<Option<Pending>>,
    _buffers: (CudaSlice<u32>, CudaSlice<f32>),
}

/// Activations that a product's outputs also went split into: `n` rows of `cols` at `x`
/// (`stride` floats apart) in split set `set`, laid out for a product of `n` tokens. Good for
/// a product that reads exactly those as the very next launch (`at`, the launch count then),
/// so that nothing can have written them since.
#[derive(Clone, Copy, Debug)]
struct Pending {
    x: u64,
    n: u32,
    cols: u32,
    stride: u32,
    set: usize,
    at: u64,
}

impl Pending {
    /// Whether these are the activations a product of `n` tokens over `cols` columns reads
    /// at `x`, `stride` floats apart, with `launches` kernels launched so far.
    fn serves(&self, x: u64, n: u32, cols: u32, stride: u32, launches: u64) -> bool {
        (self.x, self.n, self.cols, self.stride, self.at) == (x, n, cols, stride, launches)
    }
}

impl Mma {
    /// The product kernel for `m` tokens (2 to `MMA_MAX_TOKENS`), its dynamic shared memory,
    /// and the layout of its split activations. (On an H100, the warpgroup mmas of 16 and 32
    /// tokens made steps of 16 sessions 1-4% faster than `mma_many` and of 32 sessions 13%,
    /// but of 4 and 8 sessions 6-8% slower: docs/perf.md.)
    fn kernel(&self, m: u32) -> (&CudaFunction, u32, u32) {
        match (m, &self.few) {
            (..=8, _) => (&self.many[0], mma_many_smem(1), MMA_ROWS),
            (9..=16, Some(few)) => (&few[0], MMA_WG16_SMEM, MMA_OPERANDS + 2),
            (9..=16, None) => (&self.many[1], mma_many_smem(2), MMA_ROWS),
            (17..=32, Some(few)) => (&few[1], MMA_WG32_SMEM, MMA_OPERANDS + 1),
            (17..=32, None) => (&self.many[2], mma_many_smem(4), MMA_ROWS),
            _ => (&self.ring.0, MMA_RING_SMEM, self.ring.1),
        }
    }

    /// Compiles (or loads) `mma.cu` for `sm_{arch}` and allocates scratch for products of
    /// up to `MMA_MAX_TOKENS` tokens by any of `matrices`; none when `matrices` is empty.
    pub fn new(
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        arch: u32,
        matrices: &[DevMatrix],
    ) -> Result<Option<Mma>, ModelError> {
        let tokens = MMA_MAX_TOKENS as usize;
        let dims = || matrices.iter().map(|m| (m.rows as usize, m.cols as usize));
        let (Some(max_cols), Some(max_rows)) =
            (dims().map(|(_, c)| c).max(), dims().map(|(r, _)| r).max())
        else {
            return Ok(None);
        };
        let max_tiles = max_rows / 16;
        let max_part_sums = dims()
            .map(|(rows, cols)| mma_parts(rows, cols) * tokens * rows)
            .max()
            .unwrap_or(0);
        let (bytes, _) = cubin("mma.cu", MMA, arch)?;
        let module = ctx
            .load_module(Ptx::from_binary(bytes))
            .map_err(driver("loading kernels"))?;
        let get = |name: &str| {
            module.load_function(name).map_err(|e| {
                ModelError::device("cuda", format!("loading kernel `{name}`"), format!("{e:?}"))
            })
        };
        // Two sets of hi and lo (a word a pair of columns each), the tickets and the flags,
        // then the scales and sums.
        let words = 4 * tokens * max_cols.div_ceil(2) + max_tiles + MMA_FLAGS;
        let words_buf = stream
            .alloc_zeros::<u32>(words)
            .map_err(driver("allocating the tensor-core kernels' scratch"))?;
        let floats_buf = stream
            .alloc_zeros::<f32>(tokens + max_part_sums)
            .map_err(driver("allocating the tensor-core kernels' scratch"))?;
        let (w, _) = words_buf.device_ptr(stream);
        let (f, _) = floats_buf.device_ptr(stream);
        let half = (tokens * max_cols.div_ceil(2) * 4) as u64;
        // Past the 48 KiB a kernel gets without asking.
        let ring_kernel = |name: &str, smem: u32| {
            let f = get(name)?;
            f.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(driver("giving the tensor-core kernels their shared memory"))?;
            Ok::<_, ModelError>(f)
        };
        let (ring, few) = if arch == 90 {
            (
                (ring_kernel("mma_wg_bf16", MMA_RING_SMEM)?, MMA_OPERANDS),
                Some([
                    ring_kernel("mma_wg_bf16_16", MMA_WG16_SMEM)?,
                    ring_kernel("mma_wg_bf16_32", MMA_WG32_SMEM)?,
                ]),
            )
        } else {
            (
                (ring_kernel("mma_ring_bf16", MMA_RING_SMEM)?, MMA_CHUNKS),
                None,
            )
        };
        Ok(Some(Mma {
            tile: get("mma_tile_bf16")?,
            split: get("mma_split_f32")?,
            one: get("mma_one_bf16")?,
            many: [
                get("mma_many_bf16_1")?,
                get("mma_many_bf16_2")?,
                get("mma_many_bf16_4")?,
            ],
            ring,
            few,
            sets: [(w, w + half), (w + 2 * half, w + 3 * half)],
            tickets: w + 4 * half,
            flags: w + 4 * half + 4 * max_tiles as u64,
            pending: Mutex::new(None),
            scale: f,
            // 16-byte aligned (MMA_MAX_TOKENS is a multiple of 4): mma_store reads it by float4s.
            part_sums: f + 4 * tokens as u64,
            _buffers: (words_buf, floats_buf),
        }))
    }
}

/// Every kernel of the forward pass.
pub struct Kernels {
    matvec: Vec<(DType, CudaFunction)>,
    matvec_out: Vec<(DType, CudaFunction)>,
    /// `matvec` and `matvec_out` of one token with several rows a warp ([`rows_together`]).
    matvec_rows: Vec<(DType, CudaFunction)>,
    matvec_out_rows: Vec<(DType, CudaFunction)>,
    get_rows: Vec<(DType, CudaFunction)>,
    dequant_bf16: Vec<(DType, CudaFunction)>,
    rmsnorm: CudaFunction,
    rmsnorm_rows: CudaFunction,
    rmsnorm_bf16: CudaFunction,
    scatter_rows: CudaFunction,
    rope_append: CudaFunction,
    /// A batched step's keys and values stored before its attention (`append_kv`).
    append_kv: CudaFunction,
    swiglu: CudaFunction,
    swiglu_bf16: CudaFunction,
    /// By head size: `attention_<head_dim>` and `attention_one_<head_dim>` (one new
    /// position: less shared memory and a KV group's query heads a block, the same bits).
    attention: Vec<(usize, [CudaFunction; 2])>,
    /// By head size: `attention_batch_<head_dim>` and `attention_batch_one_<head_dim>`, a
    /// batched step's decode attention (any new positions a session, or one).
    attention_batch: Vec<(usize, [CudaFunction; 2])>,
    /// By head size: the prefill attention and its queries per block,
    /// `attention_prefill_mma_<head_dim>` where the GPU and head size have it, else
    /// `attention_prefill_<head_dim>`.
    attention_prefill: Vec<(usize, (CudaFunction, u32))>,
    top_k_blocks: CudaFunction,
    top_k_merge: CudaFunction,
    top_k_blocks_many: CudaFunction,
    top_k_merge_many: CudaFunction,
    next_step: CudaFunction,
    next_ids: CudaFunction,
    read_all: CudaFunction,
    /// `decode.cu`'s persistent decode kernel, for the model's weight type and head size,
    /// when it was asked for and built; else why not.
    pub decode_layers: Result<CudaFunction, String>,
    /// The tensor-core kernels, when the model's BF16 matrices are tiled for them.
    pub mma: Option<Mma>,
    /// Whether one-token products take several rows a warp where they can (on by default;
    /// see `set_rows_together`).
    rows_together: AtomicBool,
    /// Whether one-token attention asks for its first split's cached rows before it waits
    /// for the kernel before it (on by default; see `set_early_attention`).
    early_attention: AtomicBool,
    /// Kernels launched so far (by every [`Launcher`] of the model).
    launches: AtomicU64,
    /// The weights the next product or attention launch asks into L2 (see [`Ahead`]).
    ahead: Mutex<Ahead>,
}

/// Weights asked into L2 ahead of the kernel that reads them, as `common.cuh`'s `Ahead`:
/// `bytes` at `p` (none where `p` is 0), shared by the launch's blocks.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Ahead {
    p: u64,
    bytes: u64,
}

/// Logits one `top_k_blocks` block sorts, and the most lists `top_k_merge` merges
/// (`llama.cu`'s `TOP_CHUNK`, `TOP_MAX_LISTS`, written into `constants.cuh` from here).
pub const TOP_CHUNK: usize = 1024;
pub const TOP_MAX_LISTS: usize = 1024;

/// One selection of [`Launcher::top_k_many`], laid out as `llama.cu`'s `TopJob`: the `k`
/// largest of the `n` logits at `logits` into `out` ((token, logit bits) pairs; nothing where
/// `k` is 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TopJob {
    pub logits: u64,
    pub out: u64,
    pub k: u32,
    pub pad: u32,
}

impl TopJob {
    /// The jobs' bytes as `llama.cu` reads them.
    pub fn bytes(jobs: &[TopJob]) -> &[u8] {
        // SAFETY: `TopJob` is `repr(C)` plain integers with no padding (two u64, two u32: 24
        // bytes), so all of its bytes are initialized.
        unsafe { std::slice::from_raw_parts(jobs.as_ptr().cast(), size_of_val(jobs)) }
    }
}

/// Keys of scratch [`Launcher::top_k_many`] needs for `jobs` selections from `n` logits.
pub fn top_k_many_scratch(n: usize, jobs: usize) -> usize {
    n.div_ceil(TOP_CHUNK) * crate::top::MAX_TOP * jobs
}

/// The head sizes `llama.cu`'s attention is instantiated for.
pub const HEAD_DIMS: [usize; 4] = [32, 64, 128, 256];

/// Warps `matvec` gives each row of a `rows` x `cols` matrix (see [`matvec_parts`]); the
/// persistent decode kernel splits rows the same way, so that its rows have the same bits.
pub fn parts_of(m: &DevMatrix) -> u32 {
    matvec_parts(m.rows as usize, m.cols as usize) as u32
}

/// Where compiled kernels are kept: `$TERN_MODELS/../kernels` or `~/.cache/tern/kernels`.
fn cache_dir() -> Option<PathBuf> {
    if let Some(models) = std::env::var_os("TERN_MODELS") {
        return Some(PathBuf::from(models).join("../kernels"));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("tern/kernels"))
}

/// The CUBIN of `src` (with [`headers`]) for `sm_{arch}`, from the cache when identical
/// sources were compiled before; returns whether it was cached.
fn cubin(file: &'static str, src: &str, arch: u32) -> Result<(Vec<u8>, bool), ModelError> {
    // FNV-1a over the whole source and every header: a changed kernel never loads a stale
    // binary.
    let key = std::iter::once(src)
        .chain(headers().iter().map(|(_, h)| *h))
        .flat_map(str::bytes)
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    let path = cache_dir().map(|d| d.join(format!("{file}-sm{arch}-{key:016x}.cubin")));
    if let Some(bytes) = path.as_ref().and_then(|p| std::fs::read(p).ok()) {
        return Ok((bytes, true));
    }
    let bytes = compile_cubin(file, src, &headers(), arch)
        .map_err(|e| ModelError::device("cuda", format!("compiling {file}"), e))?;
    if let Some(path) = path {
        // A cache that cannot be written only costs the next start a compilation.
        // Threads of one process may write the same entry at once: each writes its own file.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("tmp-{}-{n}", std::process::id()));
        let _ = std::fs::create_dir_all(path.parent().unwrap_or(&path))
            .and_then(|()| std::fs::write(&tmp, &bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
    }
    Ok((bytes, false))
}

impl Kernels {
    /// Whether one-token products take several rows a warp where they can.
    pub fn rows_together(&self) -> bool {
        self.rows_together.load(Ordering::Relaxed)
    }

    /// Turns that on or off (the same bits either way).
    pub fn set_rows_together(&self, on: bool) {
        self.rows_together.store(on, Ordering::Relaxed);
    }

    /// Whether one-token attention asks for its cached rows before its wait.
    pub fn early_attention(&self) -> bool {
        self.early_attention.load(Ordering::Relaxed)
    }

    /// Turns that on or off.
    pub fn set_early_attention(&self, on: bool) {
        self.early_attention.store(on, Ordering::Relaxed);
    }

    /// Every kernel, and with `decode` (the layers' weight type and the head size) also
    /// `decode.cu`'s persistent decode kernel for them.
    ///
    /// The programs that touch the KV cache (`llama.cu`, `decode.cu`) are built for
    /// `kv_type`'s element (`TERN_KV_F16` for half precision: see `common.cuh`).
    pub fn load(
        ctx: &Arc<CudaContext>,
        arch: u32,
        decode: Option<(DType, usize)>,
        kv_type: KvType,
    ) -> Result<(Kernels, bool), ModelError> {
        let kv = match kv_type {
            KvType::F32 => "",
            KvType::F16 => "#define TERN_KV_F16\n",
        };
        // Compiled (when not cached) as programs side by side, NVRTC taking seconds for
        // each: `llama.cu`, `matvec.cu` once per type (`MATVEC_TYPE`, in the order of
        // `DType::ALL`), and `decode.cu` for one type and head size.
        let decode_unit = decode.map(|(t, d)| {
            let i = DType::ALL.iter().position(|&a| a == t).unwrap_or(0);
            (
                "decode.cu",
                format!("{kv}#define DECODE_TYPE {i}\n#define DECODE_HEAD_DIM {d}\n{DECODE}"),
            )
        });
        let units: Vec<(&'static str, String)> =
            std::iter::once(("llama.cu", format!("{kv}{LLAMA}")))
                .chain(
                    MATVEC_UNITS
                        .iter()
                        .enumerate()
                        .map(|(i, &unit)| (unit, format!("#define MATVEC_TYPE {i}\n{MATVEC}"))),
                )
                .chain(decode_unit)
                .collect();
        let mut binaries: Vec<Result<(Vec<u8>, bool), ModelError>> = std::thread::scope(|scope| {
            let jobs: Vec<_> = units
                .iter()
                .map(|&(file, ref src)| scope.spawn(move || cubin(file, src, arch)))
                .collect();
            jobs.into_iter()
                .map(|job| {
                    job.join().unwrap_or_else(|_| {
                        Err(ModelError::device(
                            "cuda",
                            "compiling kernels",
                            "the compiler crashed",
                        ))
                    })
                })
                .collect()
        });
        // The persistent kernel is optional: its failure to build only leaves it out.
        let mut all_cached = true;
        let decode_layers = match decode.and_then(|_| binaries.pop()) {
            None => Err("not built".to_string()),
            Some(binary) => binary
                .map_err(|e| e.to_string())
                .and_then(|(bytes, cached)| {
                    all_cached &= cached;
                    ctx.load_module(Ptx::from_binary(bytes))
                        .and_then(|module| module.load_function("decode_layers"))
                        .map_err(|e| format!("loading decode.cu: {e:?}"))
                }),
        };
        let mut modules = Vec::new();
        for binary in binaries {
            let (bytes, cached) = binary?;
            all_cached &= cached;
            let module = ctx
                .load_module(Ptx::from_binary(bytes))
                .map_err(driver("loading kernels"))?;
            modules.push(module);
        }
        let get = |m: usize, name: &str| {
            modules[m].load_function(name).map_err(|e| {
                ModelError::device("cuda", format!("loading kernel `{name}`"), format!("{e:?}"))
            })
        };
        let per_type = |prefix: &str| {
            DType::ALL
                .iter()
                .enumerate()
                .map(|(i, &t)| {
                    let name = format!("{prefix}_{}", t.name().to_lowercase());
                    Ok((t, get(1 + i, &name)?))
                })
                .collect::<Result<Vec<_>, ModelError>>()
        };
        Ok((
            Kernels {
                launches: AtomicU64::new(0),
                ahead: Mutex::new(Ahead::default()),
                matvec: per_type("matvec")?,
                matvec_out: per_type("matvec_out")?,
                matvec_rows: per_type("matvec_rows")?,
                matvec_out_rows: per_type("matvec_out_rows")?,
                get_rows: per_type("get_rows")?,
                dequant_bf16: per_type("dequant_bf16")?,
                rmsnorm: get(0, "rmsnorm")?,
                rmsnorm_rows: get(0, "rmsnorm_rows")?,
                rmsnorm_bf16: get(0, "rmsnorm_bf16")?,
                scatter_rows: get(0, "scatter_rows")?,
                rope_append: get(0, "rope_append")?,
                append_kv: get(0, "append_kv")?,
                swiglu: get(0, "swiglu")?,
                swiglu_bf16: get(0, "swiglu_bf16")?,
                attention: by_head_dims(|name| get(0, name), "attention")?,
                attention_batch: by_head_dims(|name| get(0, name), "attention_batch")?,
                top_k_blocks: get(0, "top_k_blocks")?,
                top_k_merge: get(0, "top_k_merge")?,
                top_k_blocks_many: get(0, "top_k_blocks_many")?,
                top_k_merge_many: get(0, "top_k_merge_many")?,
                next_step: get(0, "next_step")?,
                next_ids: get(0, "next_ids")?,
                read_all: get(0, "read_all")?,
                decode_layers,
                rows_together: AtomicBool::new(true),
                early_attention: AtomicBool::new(true),
                mma: None,
                attention_prefill: HEAD_DIMS
                    .iter()
                    .map(|&d| {
                        let (name, tile) = match d {
                            // Tensor cores (TF32 mma.sync): sm_80 and later.
                            64 | 128 if arch >= 80 => (format!("attention_prefill_mma_{d}"), 64),
                            256 => (format!("attention_prefill_{d}"), 16),
                            _ => (format!("attention_prefill_{d}"), 32),
                        };
                        Ok((d, (get(0, &name)?, tile)))
                    })
                    .collect::<Result<_, ModelError>>()?,
            },
            all_cached,
        ))
    }
}

/// What a `matvec` launch fuses in (see `matvec.cu`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Fuse {
    /// The RMSNorm before the product: the norm's raw input and epsilon (the launch's `x`
    /// then holds that input times the norm's weights).
    pub norm: Option<(u64, f32)>,
    /// The next RMSNorm's weights `g` and where `y * g` goes.
    pub next: Option<(u64, u64)>,
    /// The matrix is gate and up interleaved four rows at a time ([`DevLayer::glu`]): write
    /// `silu(gate) * up`, one output per pair of rows.
    ///
    /// [`DevLayer::glu`]: super::weights::DevLayer::glu
    pub glu: bool,
    /// Every row by one warp (no split rows), as `matvec_out` takes them: a batched step's
    /// output head, whose bits must be those of one session's.
    pub whole_rows: bool,
}

impl Fuse {
    /// The fusions as the matrix kernels take them: the norm's input and epsilon, the next
    /// norm's weights and output (0 where that fusion is off), and glu as 0 or 1.
    fn args(&self) -> (u64, f32, u64, u64, u32) {
        let (norm_x, eps) = self.norm.unwrap_or((0, 0.0));
        let (g, yg) = self.next.unwrap_or((0, 0));
        (norm_x, eps, g, yg, u32::from(self.glu))
    }
}

/// A weight matrix in device memory: `rows` rows of `row_bytes` bytes in `dtype` blocks.
#[derive(Clone, Copy, Debug)]
pub struct DevMatrix {
    pub ptr: u64,
    pub dtype: DType,
    pub rows: u32,
    pub cols: u32,
    pub row_bytes: u32,
    /// The same matrix stored again as the tensor-core kernels' tiles (`mma.cuh`), whose
    /// products then take it for every token count; 0 where it is not.
    pub tiles: u64,
}

fn config(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// [`config`] with `shared` bytes of dynamic shared memory.
fn config_shared(grid: u32, block: u32, shared: u32) -> LaunchConfig {
    LaunchConfig {
        shared_mem_bytes: shared,
        ..config((grid, 1, 1), block)
    }
}

/// Floats from one token's fused `q|k|v` row to the next.
fn qkv_stride(c: &crate::llama::LlamaConfig) -> u32 {
    (c.n_head * c.head_dim + 2 * c.kv_dim()) as u32
}

/// What the kernels that rotate keys take of `c`: heads, KV heads, head size, rotated
/// dimensions, the pairing (`halves`) and [`qkv_stride`].
fn rope_shape(c: &crate::llama::LlamaConfig) -> (u32, u32, u32, u32, i32, u32) {
    let (n_head, n_head_kv) = (c.n_head as u32, c.n_head_kv as u32);
    let (head_dim, n_rot) = (c.head_dim as u32, c.n_rot as u32);
    (
        n_head,
        n_head_kv,
        head_dim,
        n_rot,
        super::halves(c),
        qkv_stride(c),
    )
}

/// `<prefix>_<d>` and `<prefix>_one_<d>` for every head size d of [`HEAD_DIMS`].
fn by_head_dims(
    mut get: impl FnMut(&str) -> Result<CudaFunction, ModelError>,
    prefix: &str,
) -> Result<Vec<(usize, [CudaFunction; 2])>, ModelError> {
    HEAD_DIMS
        .iter()
        .map(|&d| {
            let any = get(&format!("{prefix}_{d}"))?;
            Ok((d, [any, get(&format!("{prefix}_one_{d}"))?]))
        })
        .collect()
}

/// Of `list`'s kernels for `c`'s head size ([`by_head_dims`]), the one for one new position a
/// query (`one`: a block takes a KV group's query heads, where the group has at most
/// `ATTN_GROUP_MAX`) or for any; its blocks a query and split (the grid's y), and whether
/// it is the former.
fn attention_kernel<'k>(
    list: &'k [(usize, [CudaFunction; 2])],
    c: &crate::llama::LlamaConfig,
    one: bool,
) -> Result<(&'k CudaFunction, u32, bool), ModelError> {
    let [any, one_new] = by_head_dim(list, c.head_dim)?;
    Ok(
        match one && c.n_head / c.n_head_kv <= super::ATTN_GROUP_MAX {
            true => (one_new, c.n_head_kv as u32, true),
            false => (any, c.n_head as u32, false),
        },
    )
}

/// Splits that one block of a batched step's one-new-position attention takes in turn, for
/// `items` (query group, split) items: one each below 1,024 items (a block an item), up to
/// four from 2,048 on, so that a block's next split is read while it uses this one and a
/// query's splits are merged by fewer blocks. (Measured on an H200, 64 sessions of 1,056
/// positions, 8,704 items: 2, 4 and 8 splits a block took attention from 2,098 us to 1,955,
/// 1,946 and 2,223; on an H100 with a KV group's heads taken together, four splits a block
/// against one made the steps 2.2% faster at 64 sessions of 128-256 positions, 2,048-2,560
/// items, and 3.3% at 16 of 1,024-1,056, 2,176 items.) Which block takes a split changes no
/// result. A single session's attention, captured in its decode graph for every length,
/// takes one split a block.
fn splits_per_block(items: u32) -> u32 {
    (items / 512).clamp(1, 4)
}

/// Blocks of a tensor-core product over `w` at 2 to `MMA_MAX_TOKENS` tokens: 8 tiles of one
/// part each.
fn mma_blocks(w: &DevMatrix) -> u32 {
    w.rows / 16 / 8 * mma_parts(w.rows as usize, w.cols as usize) as u32
}

/// Whether a tensor-core product over `w` of `n` tokens can read its input already split by
/// the launch before it (see `Pending`): one turn of at least two tokens, with a block for
/// each token's norm scale.
fn reads_split(w: &DevMatrix, n: u32) -> bool {
    (2..=MMA_MAX_TOKENS).contains(&n) && mma_blocks(w) >= n
}

fn by_head_dim<T>(list: &[(usize, T)], d: usize) -> Result<&T, ModelError> {
    list.iter()
        .find(|(h, _)| *h == d)
        .map(|(_, f)| f)
        .ok_or_else(|| ModelError::Unsupported(format!("head size {d} on the GPU")))
}

fn find(list: &[(DType, CudaFunction)], t: DType) -> &CudaFunction {
    &list
        .iter()
        .find(|(d, _)| *d == t)
        .expect("one kernel per type")
        .1
}

/// Typed launches on one stream. Every pointer argument is a device address (device memory,
/// or host memory registered with the GPU) of at least the extent each kernel's comment in
/// `kernels/*.cu` states; the callers size their buffers from the same config.
pub struct Launcher<'a> {
    pub kernels: &'a Kernels,
    pub stream: &'a Arc<CudaStream>,
}

macro_rules! launch {
    ($self:ident, $f:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let mut args: Vec<*mut std::ffi::c_void> = Vec::new();
        $(args.push(std::ptr::from_ref($arg).cast_mut().cast());)+
        // SAFETY: the argument list matches the kernel's signature in kernels/*.cu (each
        // pointer points at a live local of the parameter's type), and every device address
        // among them addresses a live buffer of the extent the kernel reads or writes (see
        // `Launcher`); the stream is synchronized before those buffers are freed.
        unsafe { $self.launch_raw($f, $cfg, &mut args) }
    }};
}

impl Launcher<'_> {
    /// Launches `f` with programmatic dependent launch: the kernel may be scheduled while
    /// the one before it on the stream finishes, and waits for it (`griddepcontrol.wait`,
    /// `pdl_wait` in the kernels) before it touches anything but weights. Every kernel of
    /// the forward pass waits so before its first read of activations or its first write.
    ///
    /// # Safety
    /// `args` must point at values of the kernel's parameter types, in order, and every
    /// device address among them must be valid for what the kernel does with it.
    unsafe fn launch_raw(
        &self,
        f: &CudaFunction,
        cfg: LaunchConfig,
        args: &mut [*mut std::ffi::c_void],
    ) -> Result<(), ModelError> {
        let attr = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value: sys::CUlaunchAttributeValue {
                programmaticStreamSerializationAllowed: 1,
            },
        };
        // SAFETY: as this function's.
        unsafe { self.launch_with(f, cfg, attr, args) }
    }

    /// Launches `f` with one launch attribute.
    ///
    /// # Safety
    /// As [`Launcher::launch_raw`].
    unsafe fn launch_with(
        &self,
        f: &CudaFunction,
        cfg: LaunchConfig,
        mut attr: sys::CUlaunchAttribute,
        args: &mut [*mut std::ffi::c_void],
    ) -> Result<(), ModelError> {
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &raw mut attr,
            numAttrs: 1,
        };
        self.kernels.launches.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the config and attribute live across the call; the caller vouches for
        // the arguments.
        unsafe {
            sys::cuLaunchKernelEx(
                &raw const config,
                f.cu_function(),
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(driver("launching a kernel"))
    }

    /// [`Launcher::matvec`]'s product through the tensor-core kernels where `w` is tiled for
    /// them, else through `matvec`: one matrix always takes one of the two, for every `n`.
    #[allow(clippy::too_many_arguments)]
    pub fn product(
        &self,
        w: &DevMatrix,
        x: u64,
        y: u64,
        n: u32,
        x_stride: u32,
        y_stride: u32,
        residual: u64,
        fuse: Fuse,
    ) -> Result<(), ModelError> {
        match self.tensor_cores_for(w) {
            Some(mma) => self.mma(mma, w, x, y, n, x_stride, y_stride, residual, fuse),
            None => self.matvec(w, x, y, n, x_stride, y_stride, residual, fuse),
        }
    }

    /// The tensor-core kernels, where `w` is tiled for them.
    fn tensor_cores_for(&self, w: &DevMatrix) -> Option<&Mma> {
        self.kernels.mma.as_ref().filter(|_| w.tiles != 0)
    }

    /// Asks the next tensor-core product run by `mma_many` (2 to 8 tokens on Hopper, up to 32
    /// elsewhere; the ring kernels ignore it) or attention launch to bring `bytes` of `m`'s
    /// tiles (where `m` is tiled for the tensor-core kernels; nothing otherwise), from byte
    /// `skip` on, into L2 for the product over `m` after it (fewer where `m` has fewer).
    pub fn ahead(&self, m: &DevMatrix, skip: u64, bytes: u64) {
        let size = u64::from(m.rows) * u64::from(m.cols) * 2;
        let bytes = bytes.min(size.saturating_sub(skip)) / 16 * 16;
        let range = match self.tensor_cores_for(m) {
            Some(_) if bytes > 0 => Ahead {
                p: m.tiles + skip / 16 * 16,
                bytes,
            },
            _ => Ahead::default(),
        };
        *self.kernels.ahead.lock().unwrap_or_else(|e| e.into_inner()) = range;
    }

    /// What [`Launcher::ahead`] asked, for the launch about to be made (and nothing for the
    /// one after).
    fn take_ahead(&self) -> Ahead {
        std::mem::take(&mut *self.kernels.ahead.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Where a kernel about to be launched may also write `w`'s input of `n` tokens split,
    /// for the product over `w` launched right after it: (hi, lo, layout, set), the split set
    /// that product reads once [`Launcher::split_written`] says so. None where that product
    /// would not read a split (not on tensor cores, one token, more than one turn, or fewer
    /// blocks than tokens to take the norm's scales).
    fn split_target(&self, w: &DevMatrix, n: u32) -> Option<(u64, u64, u32, usize)> {
        let mma = self.tensor_cores_for(w)?;
        if !reads_split(w, n) {
            return None;
        }
        let set = mma
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map_or(0, |p| 1 - p.set);
        let (hi, lo) = mma.sets[set];
        Some((hi, lo, mma.kernel(n).2, set))
    }

    /// The last launch wrote `n` rows of `cols` at `x` (`stride` floats apart) also split into
    /// split set `set`, where [`Launcher::split_target`] said.
    fn split_written(&self, x: u64, n: u32, cols: u32, stride: u32, set: usize) {
        if let Some(mma) = &self.kernels.mma {
            *mma.pending.lock().unwrap_or_else(|e| e.into_inner()) = Some(Pending {
                x,
                n,
                cols,
                stride,
                set,
                at: self.kernels.launches.load(Ordering::Relaxed),
            });
        }
    }

    /// `w`'s rows stored again as `tiles` (its size), the tensor-core kernels' layout.
    pub fn mma_tile(&self, mma: &Mma, w: &DevMatrix, tiles: u64) -> Result<(), ModelError> {
        launch!(
            self,
            &mma.tile,
            config((1024, 1, 1), 256),
            &w.ptr,
            &tiles,
            &w.rows,
            &w.cols
        )
    }

    /// The product on tensor cores (`mma.cuh`): one token by `mma_one`; more split by
    /// `mma_split`, then `mma_many` (up to 32) or `mma_ring` (33 to 64, by warpgroup mmas on
    /// Hopper), 64 tokens a turn. Where the product before (the very last launch) wrote these
    /// activations split already, no `mma_split` runs.
    #[allow(clippy::too_many_arguments)]
    fn mma(
        &self,
        mma: &Mma,
        w: &DevMatrix,
        x: u64,
        y: u64,
        n: u32,
        x_stride: u32,
        y_stride: u32,
        residual: u64,
        fuse: Fuse,
    ) -> Result<(), ModelError> {
        let (norm_x, eps, g, yg, glu) = fuse.args();
        let parts = mma_parts(w.rows as usize, w.cols as usize) as u32;
        let tiles = w.rows / 16;
        if n == 1 {
            let per_block = if parts >= 8 { 1 } else { 8 / parts };
            return launch!(
                self,
                &mma.one,
                config_shared(tiles.div_ceil(per_block), 256, 4 * w.cols),
                &w.tiles,
                &x,
                &y,
                &w.rows,
                &w.cols,
                &parts,
                &y_stride,
                &residual,
                &norm_x,
                &eps,
                &g,
                &yg,
                &glu
            );
        }
        let norm = u32::from(norm_x != 0);
        let plain = u32::from(parts == 1 && norm_x == 0 && g == 0 && !fuse.glu && residual == 0);
        let at = |base: u64, t0: u32, stride: u32| {
            if base == 0 {
                0
            } else {
                base + 4 * u64::from(t0) * u64::from(stride)
            }
        };
        // A product of one turn whose activations the product just before wrote split (see
        // `Pending`) reads that split and takes its norm's scales itself; and where its own
        // outputs feed the next product (the next norm's input, or gate/up's), it writes them
        // split too, into the other set.
        let one_turn = n <= MMA_MAX_TOKENS;
        let pending = mma.pending.lock().unwrap_or_else(|e| e.into_inner()).take();
        let launches = self.kernels.launches.load(Ordering::Relaxed);
        let blocks = mma_blocks(w);
        let presplit = reads_split(w, n)
            && pending.is_some_and(|p| p.serves(x, n, w.cols, x_stride, launches));
        // The set the split was written to, else either: whatever it holds is stale.
        let set = pending.map_or(0, |p| p.set);
        let next = match (one_turn && plain == 0, fuse.glu, g != 0) {
            (true, true, _) => Some((y, w.rows / 2)),
            (true, false, true) => Some((yg, w.rows)),
            _ => None,
        };
        for t0 in (0..n).step_by(MMA_MAX_TOKENS as usize) {
            let m = (n - t0).min(MMA_MAX_TOKENS);
            let (xs, ns) = (at(x, t0, x_stride), at(norm_x, t0, x_stride));
            let (k, smem, layout) = mma.kernel(m);
            let (hi, lo) = mma.sets[set];
            if !presplit {
                // A block a token and MMA_SPLIT_COLS columns, and one for its norm's scale.
                let slices = w.cols.div_ceil(MMA_SPLIT_COLS) + 1;
                launch!(
                    self,
                    &mma.split,
                    config((m, slices, 1), 256),
                    &xs,
                    &x_stride,
                    &w.cols,
                    &ns,
                    &eps,
                    &hi,
                    &lo,
                    &mma.scale,
                    &layout
                )?;
            }
            let (ys, rs, ygs) = (
                at(y, t0, y_stride),
                at(residual, t0, y_stride),
                at(yg, t0, y_stride),
            );
            let flags = if presplit && norm != 0 { mma.flags } else { 0 };
            let (split_hi, split_lo) = match next {
                Some(_) => mma.sets[1 - set],
                None => (0, 0),
            };
            let split_cols = next.map_or(0, |(_, cols)| cols);
            let ahead = self.take_ahead();
            launch!(
                self,
                k,
                config_shared(blocks, 256, smem),
                &w.tiles,
                &hi,
                &lo,
                &mma.scale,
                &ys,
                &w.rows,
                &w.cols,
                &m,
                &parts,
                &mma.tickets,
                &mma.part_sums,
                &y_stride,
                &rs,
                &norm,
                &g,
                &ygs,
                &glu,
                &plain,
                &ns,
                &x_stride,
                &eps,
                &flags,
                &split_hi,
                &split_lo,
                &layout,
                &split_cols,
                &ahead
            )?;
        }
        if let Some((x, cols)) = next {
            self.split_written(x, n, cols, y_stride, 1 - set);
        }
        Ok(())
    }

    /// The rows a warp of `matvec` takes together ([`rows_together`]), or 1 where the model
    /// turned that off (see `Kernels::set_rows_together`).
    fn together(&self, w: &DevMatrix, parts: usize, n: u32, x: u64) -> u32 {
        if self.kernels.rows_together() {
            rows_together(w, parts, n, x)
        } else {
            1
        }
    }

    /// `y[t] = (residual ? residual[t] : 0) + W x[t]` for `n` tokens, with `fuse`'s norms.
    #[allow(clippy::too_many_arguments)]
    pub fn matvec(
        &self,
        w: &DevMatrix,
        x: u64,
        y: u64,
        n: u32,
        x_stride: u32,
        y_stride: u32,
        residual: u64,
        fuse: Fuse,
    ) -> Result<(), ModelError> {
        let (norm_x, eps, g, yg, glu) = fuse.args();
        let parts = if fuse.glu || fuse.whole_rows {
            1
        } else {
            matvec_parts(w.rows as usize, w.cols as usize)
        };
        let rpw = self.together(w, parts, n, x);
        if rpw > 1 {
            let blocks = (w.rows as usize * parts).div_ceil(MATVEC_WARPS * rpw as usize) as u32;
            let parts = parts as u32;
            return launch!(
                self,
                find(&self.kernels.matvec_rows, w.dtype),
                config((blocks, 1, 1), 256),
                &w.ptr,
                &x,
                &y,
                &w.rows,
                &w.cols,
                &w.row_bytes,
                &residual,
                &parts,
                &norm_x,
                &eps,
                &g,
                &yg,
                &glu,
                &rpw
            );
        }
        let blocks = (w.rows as usize * parts).div_ceil(MATVEC_WARPS) as u32;
        let parts = parts as u32;
        launch!(
            self,
            find(&self.kernels.matvec, w.dtype),
            config((blocks, 1, 1), 256),
            &w.ptr,
            &x,
            &y,
            &w.rows,
            &w.cols,
            &w.row_bytes,
            &n,
            &x_stride,
            &y_stride,
            &residual,
            &parts,
            &norm_x,
            &eps,
            &g,
            &yg,
            &glu
        )
    }

    /// One decode step's layers in one cooperative launch of `decode.cu`'s persistent
    /// kernel (`f`): `grid` blocks, all resident at once, with `shared` bytes of dynamic
    /// shared memory each.
    pub fn decode_layers(
        &self,
        f: &CudaFunction,
        grid: u32,
        shared: u32,
        args: &super::fused::DecodeArgs,
    ) -> Result<(), ModelError> {
        let attr = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_COOPERATIVE,
            pad: [0; 4],
            value: sys::CUlaunchAttributeValue { cooperative: 1 },
        };
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (super::fused::DECODE_THREADS, 1, 1),
            shared_mem_bytes: shared,
        };
        let mut args: [*mut std::ffi::c_void; 1] = [std::ptr::from_ref(args).cast_mut().cast()];
        // SAFETY: the one argument is a `DecodeArgs`, laid out as decode.cu's struct of the
        // same name (`repr(C)`), whose addresses the session made valid for the step (see
        // `fused.rs`); the grid fits the GPU at once (the caller's occupancy check).
        unsafe { self.launch_with(f, cfg, attr, &mut args) }
    }

    /// `y = W x` for one token, stored 8 rows at a time (or 8 times the rows a warp takes
    /// together): the output head, whose `y` is often host memory registered with the GPU.
    pub fn matvec_out(&self, w: &DevMatrix, x: u64, y: u64) -> Result<(), ModelError> {
        if let Some(mma) = self.tensor_cores_for(w) {
            return self.mma(mma, w, x, y, 1, w.cols, w.rows, 0, Fuse::default());
        }
        let rpw = self.together(w, 1, 1, x);
        if rpw > 1 {
            let blocks = (w.rows as usize).div_ceil(MATVEC_WARPS * rpw as usize) as u32;
            return launch!(
                self,
                find(&self.kernels.matvec_out_rows, w.dtype),
                config((blocks, 1, 1), 256),
                &w.ptr,
                &x,
                &y,
                &w.rows,
                &w.cols,
                &w.row_bytes,
                &rpw
            );
        }
        let blocks = (w.rows as usize).div_ceil(MATVEC_WARPS) as u32;
        launch!(
            self,
            find(&self.kernels.matvec_out, w.dtype),
            config((blocks, 1, 1), 256),
            &w.ptr,
            &x,
            &y,
            &w.rows,
            &w.cols,
            &w.row_bytes
        )
    }

    /// `out[i] = W[ids[i]]` dequantized, for `n` ids.
    pub fn get_rows(&self, w: &DevMatrix, ids: u64, out: u64, n: u32) -> Result<(), ModelError> {
        launch!(
            self,
            find(&self.kernels.get_rows, w.dtype),
            config((n, 1, 1), 256),
            &w.ptr,
            &ids,
            &out,
            &w.cols,
            &w.row_bytes,
            &n,
            &w.cols
        )
    }

    /// `out[t] = rmsnorm(x[t]) * w` for `n_tok` rows of `width`, as f32, or rounded to bf16
    /// when `bf16` (an operand for a prefill GEMM).
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm(
        &self,
        x: u64,
        w: u64,
        out: u64,
        n_tok: u32,
        width: u32,
        eps: f32,
        bf16: bool,
    ) -> Result<(), ModelError> {
        let f = if bf16 {
            &self.kernels.rmsnorm_bf16
        } else {
            &self.kernels.rmsnorm
        };
        launch!(
            self,
            f,
            config((n_tok, 1, 1), 256),
            &x,
            &w,
            &out,
            &width,
            &eps
        )
    }

    /// Causal attention of `n_tok` queries over one layer's cache, in one launch: rotates
    /// this call's queries and keys (the unrotated fused `q|k|v` rows of `qkv`), appends
    /// their keys and values to the cache at `step[0]`.., and writes `out` (`n_tok` rows of
    /// `n_head * head_dim`). `part_o`, `part_ml` and `tickets` are the session's scratch.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        c: &crate::llama::LlamaConfig,
        n_tok: u32,
        n_split: u32,
        qkv: u64,
        cache: (u64, u64),
        inv_freq: u64,
        scratch: (u64, u64, u64),
        out: u64,
        step: u64,
    ) -> Result<(), ModelError> {
        let (n_head, n_head_kv) = (c.n_head as u32, c.n_head_kv as u32);
        let (n_rot, halves) = (c.n_rot as u32, super::halves(c));
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let stride = qkv_stride(c);
        let (k_cache, v_cache) = cache;
        let (part_o, part_ml, tickets) = scratch;
        let (f, items, _) = attention_kernel(&self.kernels.attention, c, n_tok == 1)?;
        let spb = 1u32; // a split a block (see splits_per_block)
        let ahead = self.take_ahead();
        let early = u32::from(self.kernels.early_attention());
        launch!(
            self,
            f,
            config((n_split, items, n_tok), super::ATTN_THREADS),
            &qkv,
            &k_cache,
            &v_cache,
            &inv_freq,
            &part_o,
            &part_ml,
            &tickets,
            &out,
            &step,
            &n_head,
            &n_head_kv,
            &n_rot,
            &halves,
            &n_split,
            &scale,
            &stride,
            &spb,
            &ahead,
            &early
        )
    }

    /// `out[i] = rmsnorm(x[rows[i]]) * w` for `n_rows` rows of `width` (`rows`: device
    /// `i32`s), the arithmetic of [`Launcher::rmsnorm`].
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_rows(
        &self,
        x: u64,
        rows: u64,
        n_rows: u32,
        w: u64,
        out: u64,
        width: u32,
        eps: f32,
    ) -> Result<(), ModelError> {
        launch!(
            self,
            &self.kernels.rmsnorm_rows,
            config((n_rows, 1, 1), 256),
            &x,
            &rows,
            &w,
            &out,
            &width,
            &eps
        )
    }

    /// Row `i` of `src` (`n_rows` rows of `width` floats) to the device address `dsts[i]`
    /// (`dsts`: device `u64`s).
    pub fn scatter_rows(
        &self,
        src: u64,
        dsts: u64,
        n_rows: u32,
        width: u32,
    ) -> Result<(), ModelError> {
        launch!(
            self,
            &self.kernels.scatter_rows,
            config((n_rows, width.div_ceil(1024), 1), 256),
            &src,
            &dsts,
            &width
        )
    }

    /// A batched step's decode attention for layer `layer`: query `i` of the `n_tok` in
    /// `jobs` (device [`AttnJob`]s) over its own session's cache, as
    /// [`Launcher::attention`] computes it for that session alone; `n_split` is the most
    /// splits holding positions of any query; `one_each`: every query is its session's one
    /// new position (or reads the positions before its own from the cache, where
    /// [`Launcher::append_kv`] stored them), and then, with `split_next` (the launch takes
    /// all of the step's rows), `out` also goes split for `next`, the product that reads it
    /// right after (see `Pending`), where that product takes a split.
    ///
    /// [`AttnJob`]: super::batch::AttnJob
    #[allow(clippy::too_many_arguments)]
    pub fn attention_batch(
        &self,
        c: &crate::llama::LlamaConfig,
        n_tok: u32,
        n_split: u32,
        qkv: u64,
        jobs: u64,
        layer: u32,
        inv_freq: u64,
        out: u64,
        one_each: bool,
        split_next: bool,
        next: &DevMatrix,
    ) -> Result<(), ModelError> {
        let (n_head, n_head_kv) = (c.n_head as u32, c.n_head_kv as u32);
        let (n_rot, halves) = (c.n_rot as u32, super::halves(c));
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let stride = qkv_stride(c);
        let (f, items, grouped) = attention_kernel(&self.kernels.attention_batch, c, one_each)?;
        let spb = match grouped {
            true => splits_per_block(n_tok * items * n_split),
            false => 1,
        };
        // A step of one new position each writes its outputs split for `next` too, where
        // this launch takes all of the step's rows.
        let split = self
            .split_target(next, n_tok)
            .filter(|_| one_each && split_next);
        let (split_hi, split_lo, layout, _) = split.unwrap_or_default();
        let ahead = self.take_ahead();
        launch!(
            self,
            f,
            config((n_split.div_ceil(spb), items, n_tok), super::ATTN_THREADS),
            &qkv,
            &jobs,
            &layer,
            &inv_freq,
            &out,
            &n_head,
            &n_head_kv,
            &n_rot,
            &halves,
            &scale,
            &stride,
            &spb,
            &split_hi,
            &split_lo,
            &layout,
            &ahead
        )?;
        if let Some((.., set)) = split {
            let q_dim = n_head * c.head_dim as u32;
            self.split_written(out, n_tok, q_dim, q_dim, set);
        }
        Ok(())
    }

    /// Stores the rotated key and the value of each of the `n_tok` queries of `jobs` (device
    /// [`AttnJob`]s) into its session's cache at `layer`, as [`Launcher::attention_batch`]
    /// appends them: so that one `attention_batch` launch with `one_each` may then take
    /// several positions of one session.
    ///
    /// [`AttnJob`]: super::batch::AttnJob
    #[allow(clippy::too_many_arguments)]
    pub fn append_kv(
        &self,
        c: &crate::llama::LlamaConfig,
        n_tok: u32,
        qkv: u64,
        jobs: u64,
        layer: u32,
        inv_freq: u64,
    ) -> Result<(), ModelError> {
        let (n_head, n_head_kv, head_dim, n_rot, halves, stride) = rope_shape(c);
        launch!(
            self,
            &self.kernels.append_kv,
            config((n_tok, n_head_kv, 1), super::ATTN_THREADS),
            &qkv,
            &jobs,
            &layer,
            &inv_freq,
            &n_head,
            &n_head_kv,
            &head_dim,
            &n_rot,
            &halves,
            &stride
        )
    }

    /// Causal attention of a prefill chunk of `n_tok` queries, already rotated in place in
    /// `qkv`, over one layer's cache, to which [`Launcher::rope_append`] appended the
    /// chunk's keys and values. `out` gets `n_tok` rows of `n_head * head_dim` bf16 values
    /// (the output projection's GEMM operand).
    pub fn attention_prefill(
        &self,
        c: &crate::llama::LlamaConfig,
        n_tok: u32,
        qkv: u64,
        cache: (u64, u64),
        out: u64,
        step: u64,
    ) -> Result<(), ModelError> {
        let (n_head, n_head_kv) = (c.n_head as u32, c.n_head_kv as u32);
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let stride = qkv_stride(c);
        let (f, tile) = by_head_dim(&self.kernels.attention_prefill, c.head_dim)?;
        launch!(
            self,
            f,
            config((n_head, n_tok.div_ceil(*tile), 1), 128),
            &qkv,
            &cache.0,
            &cache.1,
            &out,
            &step,
            &n_tok,
            &n_head,
            &n_head_kv,
            &scale,
            &stride
        )
    }

    /// The `k` largest of `n` logits as (token, logit bits) pairs into `out`, through
    /// `cand` (`ceil(n / TOP_CHUNK) * k` keys of scratch).
    pub fn top_k(
        &self,
        logits: u64,
        n: u32,
        k: u32,
        cand: u64,
        out: u64,
    ) -> Result<(), ModelError> {
        let lists = (n as usize).div_ceil(TOP_CHUNK) as u32;
        launch!(
            self,
            &self.kernels.top_k_blocks,
            config((lists, 1, 1), 256),
            &logits,
            &n,
            &k,
            &cand
        )?;
        launch!(
            self,
            &self.kernels.top_k_merge,
            config((1, 1, 1), 32),
            &cand,
            &lists,
            &k,
            &logits,
            &out
        )
    }

    /// Sets a decode step's `step` buffer to position `pos` and the token of the selection at
    /// `pair` (a greedy step run ahead of its call).
    pub fn next_step(&self, pair: u64, step: u64, pos: i32) -> Result<(), ModelError> {
        launch!(
            self,
            &self.kernels.next_step,
            config((1, 1, 1), 32),
            &pair,
            &step,
            &pos
        )
    }

    /// Writes the `n` token ids at `ids` from the (token, logit bits) pairs whose addresses
    /// are the `n` words at `src`: a batched greedy step enqueued ahead of its calls takes the
    /// selections of the step before.
    pub fn next_ids(&self, src: u64, ids: u64, n: u32) -> Result<(), ModelError> {
        launch!(
            self,
            &self.kernels.next_ids,
            config((1, 1, 1), 64),
            &src,
            &ids,
            &n
        )
    }

    /// Reads `words` 16-byte words at `p` once each (`grid` blocks), storing nothing unless
    /// they XOR to one value (then into `out`): the read-only roofline.
    pub fn read_all(&self, p: u64, words: u64, out: u64, grid: u32) -> Result<(), ModelError> {
        launch!(
            self,
            &self.kernels.read_all,
            config((grid, 1, 1), 256),
            &p,
            &words,
            &out
        )
    }

    /// [`Launcher::top_k`] for each of `n_jobs` [`TopJob`]s at `jobs` (device memory) over
    /// rows of `n` logits, in one launch of each kernel, through `cand`
    /// ([`top_k_many_scratch`] keys).
    pub fn top_k_many(&self, jobs: u64, n_jobs: u32, n: u32, cand: u64) -> Result<(), ModelError> {
        let lists = (n as usize).div_ceil(TOP_CHUNK) as u32;
        launch!(
            self,
            &self.kernels.top_k_blocks_many,
            config((lists, n_jobs, 1), 256),
            &jobs,
            &n,
            &cand
        )?;
        launch!(
            self,
            &self.kernels.top_k_merge_many,
            config((n_jobs, 1, 1), 32),
            &jobs,
            &lists,
            &cand
        )
    }

    /// Rotates the queries of `n_tok` fused `q|k|v` rows in place and appends their rotated
    /// keys and values to one layer's cache at `step[0]`.. (before
    /// [`Launcher::attention_prefill`]).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_append(
        &self,
        c: &crate::llama::LlamaConfig,
        n_tok: u32,
        qkv: u64,
        cache: (u64, u64),
        inv_freq: u64,
        step: u64,
    ) -> Result<(), ModelError> {
        let (n_head, n_head_kv, head_dim, n_rot, halves, stride) = rope_shape(c);
        launch!(
            self,
            &self.kernels.rope_append,
            config((n_tok, 1, 1), 256),
            &qkv,
            &cache.0,
            &cache.1,
            &inv_freq,
            &step,
            &n_head,
            &n_head_kv,
            &head_dim,
            &n_rot,
            &halves,
            &stride
        )
    }

    /// `out = bf16(W)`, row-major `rows x cols` (an operand for a prefill GEMM).
    pub fn dequant_bf16(&self, w: &DevMatrix, out: u64) -> Result<(), ModelError> {
        launch!(
            self,
            find(&self.kernels.dequant_bf16, w.dtype),
            config((w.rows, 1, 1), 256),
            &w.ptr,
            &out,
            &w.rows,
            &w.cols,
            &w.row_bytes
        )
    }

    /// `out[t] = bf16(silu(gate[t]) * up[t])` for `n_tok` rows of `2 * n_ff` GEMM outputs:
    /// `[gate | up]`, or interleaved four at a time when `glu` (see [`Fuse::glu`]).
    pub fn swiglu_bf16(
        &self,
        gate_up: u64,
        out: u64,
        n_tok: u32,
        n_ff: u32,
        glu: bool,
    ) -> Result<(), ModelError> {
        let interleaved = i32::from(glu);
        launch!(
            self,
            &self.kernels.swiglu_bf16,
            config((n_ff.div_ceil(1024), n_tok, 1), 256),
            &gate_up,
            &out,
            &n_ff,
            &interleaved
        )
    }

    /// `out[t] = silu(gate[t]) * up[t]` for `n_tok` rows of `n_ff`, whose gate and up rows
    /// start `stride` floats apart per token.
    pub fn swiglu(
        &self,
        gate: u64,
        up: u64,
        out: u64,
        n_tok: u32,
        n_ff: u32,
        stride: u32,
    ) -> Result<(), ModelError> {
        launch!(
            self,
            &self.kernels.swiglu,
            config((n_ff.div_ceil(256), n_tok, 1), 256),
            &gate,
            &up,
            &out,
            &n_ff,
            &stride
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{
        DevMatrix, MATVEC_UNITS, MMA_MAX_TOKENS, MMA_RING_STAGES, MMA_WG16_STAGES, MMA_WG32_STAGES,
        matvec_parts, mma_fits, mma_many_smem, mma_parts, mma_ring_smem, rows_together,
        splits_per_block,
    };
    use crate::quant::DType;

    #[test]
    fn each_type_has_its_matvec_program_in_order() {
        for (unit, t) in MATVEC_UNITS.iter().zip(DType::ALL) {
            assert_eq!(*unit, format!("matvec.cu-{}", t.name().to_lowercase()));
        }
        assert_eq!(MATVEC_UNITS.len(), DType::ALL.len());
    }

    #[test]
    fn short_matrices_split_their_rows_and_long_ones_do_not() {
        // Llama-3.2-1B: attention output, Q/K/V, down, gate/up, the output head.
        assert_eq!(matvec_parts(2048, 2048), 2);
        assert_eq!(matvec_parts(3072, 2048), 2);
        assert_eq!(matvec_parts(2048, 8192), 4);
        assert_eq!(matvec_parts(16384, 2048), 1);
        assert_eq!(matvec_parts(128_256, 2048), 1);
        // SmolLM2-135M rows are too short to split.
        assert_eq!(matvec_parts(576, 1536), 1);
        assert_eq!(matvec_parts(960, 576), 1);
        // Never more parts than warps, never parts of under four steps.
        assert_eq!(matvec_parts(1, 1 << 20), 8);
        assert_eq!(matvec_parts(1, 256 * 7), 1);
    }

    #[test]
    fn only_thousands_of_attention_items_share_blocks() {
        // One session of 4,000 positions on the 1B shape (63 splits, 8 KV groups); 16 of
        // 128-256 positions; 4 of 1,056 on the SmolLM2 shape (3 groups); 64 of 128-256 on
        // the 1B shape; 64 of 1,056; 512 long ones.
        assert_eq!(splits_per_block(63 * 8), 1);
        assert_eq!(splits_per_block(16 * 4 * 8), 1);
        assert_eq!(splits_per_block(4 * 17 * 3), 1);
        assert_eq!(splits_per_block(16 * 17 * 3), 1);
        assert_eq!(splits_per_block(64 * 4 * 8), 4);
        assert_eq!(splits_per_block(64 * 17 * 8), 4);
        assert_eq!(splits_per_block(512 * 64 * 8), 4);
        assert_eq!(splits_per_block(48 * 4 * 8), 3);
        assert_eq!(splits_per_block(32 * 4 * 8), 2);
    }

    #[test]
    fn two_blocks_of_each_ring_fit_an_sm() {
        // An H100's SM: 228 KiB of shared memory, 1 KiB of it reserved a block.
        let per_block = (228 * 1024 - 2 * 1024) / 2;
        for (tokens, stages) in [
            (MMA_MAX_TOKENS, MMA_RING_STAGES),
            (16, MMA_WG16_STAGES),
            (32, MMA_WG32_STAGES),
        ] {
            let smem = mma_ring_smem(tokens, stages);
            assert!(smem <= per_block, "{tokens} tokens: {smem} bytes");
            assert!(
                mma_ring_smem(tokens, stages + 1) > per_block,
                "{tokens} tokens: room for a stage more"
            );
        }
    }

    #[test]
    fn tensor_core_parts_follow_the_shape_alone() {
        // Llama-3.2-1B, as the probe measured them: Q/K/V and O 8 parts of 256 columns,
        // gate/up 2 of 1,024, down 16 of 512, the output head whole rows.
        assert_eq!(mma_parts(3072, 2048), 8);
        assert_eq!(mma_parts(2048, 2048), 8);
        assert_eq!(mma_parts(16384, 2048), 2);
        assert_eq!(mma_parts(2048, 8192), 16);
        assert_eq!(mma_parts(128_256, 2048), 1);
        // At most 16 parts (what mma_one's blocks hold), each of 256 columns or more.
        assert_eq!(mma_parts(128, 1 << 20), 16);
        assert_eq!(mma_parts(128, 512), 2);
        assert_eq!(mma_parts(128, 256), 1);
    }

    #[test]
    fn tensor_cores_take_bf16_matrices_of_whole_tile_groups_and_steps() {
        let m = |dtype, rows, cols| DevMatrix {
            ptr: 0,
            dtype,
            rows,
            cols,
            row_bytes: 2 * cols,
            tiles: 0,
        };
        assert!(mma_fits(&m(DType::BF16, 3072, 2048)));
        assert!(mma_fits(&m(DType::BF16, 128_256, 2048)));
        // SmolLM2's rows and columns are not whole groups of 128 and steps of 256.
        assert!(!mma_fits(&m(DType::BF16, 960, 576)));
        assert!(!mma_fits(&m(DType::BF16, 3072, 576)));
        assert!(!mma_fits(&m(DType::F16, 3072, 2048)));
        assert!(!mma_fits(&m(DType::Q8_0, 3072, 2048)));
    }

    #[test]
    fn rows_go_together_only_where_enough_warps_stay_reading() {
        let m = |dtype: DType, rows, cols| DevMatrix {
            ptr: 0,
            dtype,
            rows,
            cols,
            row_bytes: dtype.row_bytes(cols as usize).unwrap() as u32,
            tiles: 0,
        };
        let r = |w: &DevMatrix, n, x| {
            rows_together(w, matvec_parts(w.rows as usize, w.cols as usize), n, x)
        };
        // Llama-3.2-1B: gate/up (one part), the head and down (4 parts) 4 rows a warp, Q/K/V
        // and O (2 parts) two.
        for t in [DType::BF16, DType::Q8_0] {
            assert_eq!(rows_together(&m(t, 16384, 2048), 1, 1, 0), 4);
            assert_eq!(rows_together(&m(t, 128_256, 2048), 1, 1, 0), 4);
            assert_eq!(r(&m(t, 2048, 8192), 1, 0), 4);
            assert_eq!(r(&m(t, 3072, 2048), 1, 0), 2);
            assert_eq!(r(&m(t, 2048, 2048), 1, 0), 2);
        }
        // SmolLM2-135M Q4_1: only the head.
        assert_eq!(rows_together(&m(DType::Q4_1, 49152, 576), 1, 1, 0), 4);
        assert_eq!(rows_together(&m(DType::Q4_1, 3072, 576), 1, 1, 0), 1);
        // Several tokens, an unaligned x, formats whose loads do not fit, float rows read by
        // elements: one.
        let head = m(DType::BF16, 128_256, 2048);
        assert_eq!(rows_together(&head, 1, 2, 0), 1);
        assert_eq!(rows_together(&head, 1, 1, 4), 1);
        assert_eq!(rows_together(&m(DType::Q6_K, 128_256, 2048), 1, 1, 0), 1);
        assert_eq!(rows_together(&m(DType::F32, 128_256, 2048), 1, 1, 0), 1);
        assert_eq!(rows_together(&m(DType::F16, 128_256, 2050), 1, 1, 0), 1);
    }

    #[test]
    fn mma_many_shared_memory_fits_the_default_48_kib() {
        // mma.cuh's mma_many_smem: two stages of 8 n8 tiles' rows.
        assert_eq!(mma_many_smem(1), 9_216);
        assert_eq!(mma_many_smem(2), 18_432);
        assert_eq!(mma_many_smem(4), 20_480);
        assert_eq!(mma_many_smem(8), 40_960);
        assert!((1..=8).all(|nt| mma_many_smem(nt) <= 48 << 10));
    }
}
