//! AMX kernels: products of several tokens on the tile unit (`tdpbusd`, `tdpbssd`: u8 or i8
//! × i8, 32-bit sums), for `Q8_0`, `Q4_0` and `Q4_1` weights.
//!
//! Tokens go 16 at a time and rows 16 at a time. Per block (32 columns) one tile product
//! gives the 16 × 16 exact block sums: the A tile is the 16 rows' block (4-bit weights
//! unpacked to a byte each), the B tile the 16 tokens' activations of that block in the
//! tile unit's layout (four consecutive columns of a token in each 32-bit element). The
//! float terms of the module docs then follow, one vector of 16 tokens per row, each
//! token's block `b` added to its lane `b % 16`, and each row's 16 lanes summed in the
//! module's tree, so every token gets the bits every other path gives it. A group of at
//! most 8 (or 4) tokens takes tiles of 8 (or 4) token columns, and one float vector then
//! holds 2 (or 4) rows' terms, so a small batch does not pay for 16 tokens' float work.
//! Each row group's weights are unpacked row by row before its products (the order the
//! prefetchers follow), and the next group's are asked of the cache a few lines per block.
//!
//! The tile unit needs the kernel's permission (Linux's `arch_prctl(ARCH_REQ_XCOMP_PERM)`),
//! asked for once by [`Amx::detect`], and a tile configuration per thread, loaded at the
//! start of each call and released at its end.

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;

use super::x86_avx512::Avx512Vnni;
use super::{LANES, QK, QuantizedActs, QuantizedTokens};
use crate::quant::DType;

/// Proof that the running CPU has AMX-TILE and AMX-INT8, that this process may use them, and
/// everything [`Avx512Vnni`] needs: only [`detect`] makes one.
///
/// [`detect`]: Amx::detect
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Amx(Avx512Vnni);

impl Amx {
    pub(super) fn detect() -> Option<Amx> {
        let wide = Avx512Vnni::detect()?;
        // CPUID leaf 7: EDX bit 24 is AMX-TILE, bit 25 AMX-INT8.
        let leaf = __cpuid_count(7, 0);
        let tiles = (leaf.edx >> 24) & 3 == 3;
        (tiles && tiles_allowed()).then_some(Amx(wide))
    }

    /// The AVX-512 kernels, for what the tiles do not take.
    pub(super) fn wide(self) -> Avx512Vnni {
        self.0
    }

    /// `out[t * n + r]` = row `r` against `xs[t]`, as [`Avx512Vnni::dot_rows_tokens`] gives
    /// it. Precondition (checked in `mod.rs`): as `dot_rows` for every token, and
    /// `out.len() == xs.len() * n` for the `n` rows.
    pub(super) fn dot_rows_tokens(
        self,
        dtype: DType,
        rows: &[u8],
        row_bytes: usize,
        xs: &QuantizedTokens,
        out: &mut [f32],
    ) {
        let tokens = xs.acts.len();
        if tokens < 2 || !matches!(dtype, DType::Q8_0 | DType::Q4_0 | DType::Q4_1) {
            self.0
                .dot_rows_tokens(dtype, rows, row_bytes, &xs.acts, out);
            return;
        }
        let tiles = xs.tiles.get_or_init(|| TokenTiles::new(&xs.acts));
        // SAFETY: an `Amx` exists only if `detect` saw AVX-512 and the tile unit, and the
        // kernel allowed this process its state.
        unsafe {
            match dtype {
                DType::Q8_0 => run::<Q8_0>(rows, row_bytes, tiles, tokens, out),
                DType::Q4_0 => run::<Q4_0>(rows, row_bytes, tiles, tokens, out),
                _ => run::<Q4_1>(rows, row_bytes, tiles, tokens, out),
            }
        }
    }
}

/// Asks Linux for the tile unit's state (`ARCH_REQ_XCOMP_PERM` for `XFEATURE_XTILEDATA`);
/// whether it was granted.
#[cfg(target_os = "linux")]
fn tiles_allowed() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: this request touches no memory of the process; it only enables a register
    // state for its threads, or fails.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn tiles_allowed() -> bool {
    false
}

/// Format tags, and per format the bytes of a block and where its integers start.
const Q8_0: usize = 0;
const Q4_0: usize = 1;
const Q4_1: usize = 2;
const BLOCK_BYTES: [usize; 3] = [34, 18, 20];
const INTS_AT: [usize; 3] = [2, 2, 4];

/// Tokens a tile product takes (its B tile's columns), and rows (its A tile's).
const GROUP: usize = 16;
/// Bytes of a block's B tile: 8 rows of 16 tokens × 4 columns.
const B_TILE: usize = 8 * 64;

/// A tile configuration (palette 1): tiles 0 and 1 hold block sums (16 rows of `width`
/// i32), tiles 2 and 3 weights (16 rows × 32 bytes), tiles 4 and 5 activations (8 rows of
/// `width` tokens × 4 bytes). Blocks alternate between tiles 0, 2, 4 and 1, 3, 5, so that
/// one block's product runs while the sums of the one before are read.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const fn config(width: u16) -> TileConfig {
    let w = 4 * width;
    TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [w, w, 32, 32, w, w, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 8, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    }
}

/// Tiles for 16 tokens, for 8 (a group of at most 8: half the B tile's columns, sums 8 to
/// a row, so that a vector of 16 floats holds two rows) and for 4 (four rows a vector).
static WIDE: TileConfig = config(16);
static NARROW: TileConfig = config(8);
static QUARTER: TileConfig = config(4);

/// One block's tile product: `c` (16 rows of `width` i32, `4 * width` bytes apart) = `a`
/// (16 rows of 32 bytes, u8 or, for `SIGNED`, i8) times `b` (a [`B_TILE`] of i8), on the
/// tiles of parity `ODD`.
///
/// # Safety
///
/// The configuration of `width` tokens is loaded on this thread; `a` holds 512 bytes, `b`
/// [`B_TILE`], `c` `64 * width`.
#[inline(always)]
unsafe fn tile_product<const SIGNED: bool, const ODD: bool>(
    a: *const u8,
    b: *const u8,
    c: *mut i32,
    width: usize,
) {
    macro_rules! product {
        ($c:literal, $a:literal, $b:literal, $op:literal) => {
            // SAFETY: as the function's contract; the tiles are this thread's.
            unsafe {
                asm!(
                    concat!("tilezero ", $c),
                    concat!("tileloadd ", $a, ", [{a} + {sa}*1]"),
                    concat!("tileloadd ", $b, ", [{b} + {sb}*1]"),
                    concat!($op, " ", $c, ", ", $a, ", ", $b),
                    concat!("tilestored [{c} + {sc}*1], ", $c),
                    a = in(reg) a,
                    sa = in(reg) 32usize,
                    b = in(reg) b,
                    sb = in(reg) 64usize,
                    c = in(reg) c,
                    sc = in(reg) 4 * width,
                    options(nostack),
                )
            }
        };
    }
    match (SIGNED, ODD) {
        (false, false) => product!("tmm0", "tmm2", "tmm4", "tdpbusd"),
        (false, true) => product!("tmm1", "tmm3", "tmm5", "tdpbusd"),
        (true, false) => product!("tmm0", "tmm2", "tmm4", "tdpbssd"),
        (true, true) => product!("tmm1", "tmm3", "tmm5", "tdpbssd"),
    }
}

/// Several tokens' activations as the tile products read them, [`GROUP`] tokens to a
/// group: per group and block its B tile, and per group, block and token `d_x`, `s_x` and
/// `Σq_x`. Token slots past the last token hold zeros, which only results nobody reads
/// depend on.
#[derive(Debug, Clone)]
pub(super) struct TokenTiles {
    blocks: usize,
    tiles: Vec<u32>,
    d: Vec<f32>,
    s: Vec<f32>,
    qsum: Vec<i32>,
}

impl TokenTiles {
    /// The layout of `xs`, tokens of one length.
    pub(super) fn new(xs: &[QuantizedActs]) -> TokenTiles {
        let blocks = xs.first().map_or(0, |x| x.len().div_ceil(QK));
        let groups = xs.len().div_ceil(GROUP);
        let mut t = TokenTiles {
            blocks,
            tiles: vec![0; groups * blocks * B_TILE / 4],
            d: vec![0.0; groups * blocks * GROUP],
            s: vec![0.0; groups * blocks * GROUP],
            qsum: vec![0; groups * blocks * GROUP],
        };
        for (j, x) in xs.iter().enumerate() {
            let (g, i) = (j / GROUP, j % GROUP);
            // Token `i`'s four columns `4k .. 4k + 4` of block `b` go to element `i` of row
            // `k` of block `b`'s tile.
            let (words, _) = x.q[..QK * blocks].as_chunks::<4>();
            for (b, block) in words.chunks_exact(QK / 4).enumerate() {
                let tile = &mut t.tiles[(g * blocks + b) * B_TILE / 4..][..B_TILE / 4];
                for (k, w) in block.iter().enumerate() {
                    tile[k * GROUP + i] = u32::from_ne_bytes(w.map(|v| v as u8));
                }
            }
            for b in 0..blocks {
                let at = (g * blocks + b) * GROUP + i;
                t.d[at] = x.d[b];
                t.s[at] = x.s[b];
                t.qsum[at] = x.qsum[b];
            }
        }
        t
    }
}

/// A call's own working memory, kept per thread and grown as needed, so that nothing is
/// allocated or cleared per call: 16 rows' weights unpacked (per block an A tile, and per
/// block and row the f16 `d` and `m` widened), the tile products' block sums, the float
/// lanes and the row group's results. Rows past a row group's count hold stale values
/// that only results nobody reads depend on.
#[derive(Default)]
struct Scratch {
    weights: Vec<u8>,
    d: Vec<f32>,
    m: Vec<f32>,
    /// Two blocks' sums (by parity), 16 rows of up to 16 tokens each.
    c: Vec<i32>,
    /// Per row (or pair of rows), 16 float lanes.
    acc: Vec<__m512>,
    /// Per row, its value for each of the group's 16 token slots.
    sums: Vec<f32>,
}

/// A row group's weights as [`unpack`] left them.
struct Unpacked<'a> {
    weights: &'a [u8],
    d: &'a [f32],
    m: &'a [f32],
}

/// Where a row group's work goes: the block sums, the float lanes, the results.
struct Work<'a> {
    c: &'a mut [i32],
    acc: &'a mut [__m512],
    sums: &'a mut [f32],
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// `v`, lengthened with `zero`s to at least `n` elements.
fn grow<T: Clone>(v: &mut Vec<T>, n: usize, zero: T) {
    if v.len() < n {
        v.resize(n, zero);
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx2,f16c")]
fn run<const F: usize>(
    rows: &[u8],
    row_bytes: usize,
    xs: &TokenTiles,
    tokens: usize,
    out: &mut [f32],
) {
    let n = rows.len() / row_bytes;
    let blocks = xs.blocks;
    SCRATCH.with_borrow_mut(|scratch| {
        grow(&mut scratch.weights, blocks * 512, 0);
        grow(&mut scratch.d, blocks * GROUP, 0.0);
        grow(&mut scratch.m, blocks * GROUP, 0.0);
        grow(&mut scratch.c, 2 * GROUP * GROUP, 0);
        grow(&mut scratch.acc, GROUP * LANES, _mm512_setzero_ps());
        grow(&mut scratch.sums, GROUP * GROUP, 0.0);
        let Scratch {
            weights,
            d,
            m,
            c,
            acc,
            sums,
        } = scratch;
        let mut loaded: Option<*const TileConfig> = None;
        for g in 0..tokens.div_ceil(GROUP) {
            let in_group = (tokens - g * GROUP).min(GROUP);
            let width = match in_group {
                9.. => GROUP,
                5..=8 => GROUP / 2,
                _ => GROUP / 4,
            };
            let config: *const TileConfig = match width {
                GROUP => &WIDE,
                8 => &NARROW,
                _ => &QUARTER,
            };
            if loaded != Some(config) {
                // SAFETY: `detect` saw the tile unit and got the kernel's permission; the
                // configuration is 64 bytes.
                unsafe { asm!("ldtilecfg [{}]", in(reg) config, options(nostack, readonly)) };
                loaded = Some(config);
            }
            for r0 in (0..n).step_by(GROUP) {
                let count = (n - r0).min(GROUP);
                let group_rows = &rows[r0 * row_bytes..(r0 + count) * row_bytes];
                unpack::<F>(group_rows, row_bytes, weights, d, m);
                // The next row group's weights, asked of the cache a few lines per block
                // while these are summed.
                let next = &rows[(r0 + count) * row_bytes..];
                let ahead = Ahead::new(&next[..next.len().min(GROUP * row_bytes)], blocks);
                let unpacked = Unpacked { weights, d, m };
                let work = Work { c, acc, sums };
                match width {
                    GROUP => row_group::<F, 16>(count, xs, g, &unpacked, work, &ahead),
                    8 => row_group::<F, 8>(count, xs, g, &unpacked, work, &ahead),
                    _ => row_group::<F, 4>(count, xs, g, &unpacked, work, &ahead),
                }
                for (row, lanes) in sums.chunks_exact(GROUP).enumerate().take(count) {
                    for (i, &v) in lanes.iter().enumerate().take(in_group) {
                        out[(g * GROUP + i) * n + r0 + row] = v;
                    }
                }
            }
        }
        // SAFETY: as above; the tiles are left in their initial state.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    });
}

/// Unpacks up to 16 rows (`rows`, each `row_bytes`) into `scratch`, each read from start to
/// end (the order the hardware's prefetchers follow): block `b` of row `m` to bytes `32m`
/// of A tile `b`, its `d` and `m` to element `16b + m`.
#[target_feature(enable = "avx512f,avx512bw,avx2,f16c")]
#[inline]
fn unpack<const F: usize>(
    rows: &[u8],
    row_bytes: usize,
    weights: &mut [u8],
    d_out: &mut [f32],
    m_out: &mut [f32],
) {
    let (bb, at) = (BLOCK_BYTES[F], INTS_AT[F]);
    for (m, row) in rows.chunks_exact(row_bytes).enumerate() {
        for (b, w) in row.chunks_exact(bb).enumerate() {
            let ints = &w[at..];
            let dst = &mut weights[512 * b + 32 * m..][..32];
            if F == Q8_0 {
                dst.copy_from_slice(&ints[..32]);
            } else {
                // SAFETY: `ints` holds at least 16 bytes and `dst` 32.
                unsafe {
                    let t = _mm_loadu_si128(ints.as_ptr().cast());
                    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(t), t);
                    let v = _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
                    _mm256_storeu_si256(dst.as_mut_ptr().cast(), v);
                }
            }
        }
    }
    // Each block's f16 `d` (and `m`) of the 16 rows at once.
    let count = rows.len() / row_bytes;
    let live = ((1u32 << count) - 1) as u16;
    let idx = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(row_bytes as i32),
    );
    assert!(count <= GROUP && row_bytes <= i32::MAX as usize / GROUP);
    for b in 0..row_bytes / bb {
        // SAFETY: live lane `m < count` reads the 4 bytes at `row_bytes * m + bb * b`, the
        // start of block `b` of row `m` (at least 18 bytes), inside `rows`; the others read
        // nothing.
        let head = unsafe {
            let base = rows.as_ptr().add(bb * b);
            _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), live, idx, base.cast())
        };
        let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(head));
        let m = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(head)));
        // SAFETY: 16 floats each.
        unsafe {
            _mm512_storeu_ps(d_out[b * GROUP..][..GROUP].as_mut_ptr(), d);
            _mm512_storeu_ps(m_out[b * GROUP..][..GROUP].as_mut_ptr(), m);
        }
    }
}

/// Runs block `b`'s tile product for group `g` of `xs` into `c` (of `width` tokens).
///
/// # Safety
///
/// The configuration of `width` tokens is loaded on this thread and `c` holds `16 * width`
/// i32.
#[inline(always)]
unsafe fn product<const F: usize>(
    unpacked: &Unpacked<'_>,
    xs: &TokenTiles,
    g: usize,
    b: usize,
    c: &mut [i32],
    width: usize,
) {
    assert!(c.len() >= 16 * width);
    let a = unpacked.weights[512 * b..][..512].as_ptr();
    let t = xs.tiles[(g * xs.blocks + b) * B_TILE / 4..][..B_TILE / 4]
        .as_ptr()
        .cast();
    let c = c.as_mut_ptr();
    // SAFETY: the caller's contract, and the buffers' sizes (sliced or asserted above).
    unsafe {
        match (F == Q8_0, b % 2 == 1) {
            (false, false) => tile_product::<false, false>(a, t, c, width),
            (false, true) => tile_product::<false, true>(a, t, c, width),
            (true, false) => tile_product::<true, false>(a, t, c, width),
            (true, true) => tile_product::<true, true>(a, t, c, width),
        }
    }
}

/// Starts block `b + 1`'s tile product into `c[(b + 1) % 2]` (and at `b == 0` block 0's
/// into `c[0]` first), so that the tile unit works on the next block while block `b`'s
/// terms are made.
///
/// # Safety
///
/// As [`product`]'s, for both of `c`.
#[inline(always)]
unsafe fn products_ahead<const F: usize>(
    unpacked: &Unpacked<'_>,
    xs: &TokenTiles,
    g: usize,
    b: usize,
    c: &mut [&mut [i32]; 2],
    width: usize,
) {
    if b == 0 {
        // SAFETY: the caller's contract.
        unsafe { product::<F>(unpacked, xs, g, 0, c[0], width) };
    }
    if b + 1 < xs.blocks {
        // SAFETY: as above.
        unsafe { product::<F>(unpacked, xs, g, b + 1, c[(b + 1) % 2], width) };
    }
}

/// The results of the `count` rows `unpacked` against group `g` of `xs`, a group of at most
/// `W` tokens (16, 8 or 4), into `work.sums`: per row, its value for each of the group's
/// token slots. One float vector holds the terms of `16 / W` rows (tokens 0..W of row
/// `(16 / W) k`, then of the next row, ...), so a small group pays a half or a quarter of a
/// full group's float work.
#[target_feature(enable = "avx512f,avx512bw,avx2,f16c")]
#[inline]
fn row_group<const F: usize, const W: usize>(
    count: usize,
    xs: &TokenTiles,
    g: usize,
    unpacked: &Unpacked<'_>,
    work: Work<'_>,
    ahead: &Ahead<'_>,
) {
    const { assert!(W == 16 || W == 8 || W == 4) };
    let per = GROUP / W;
    let blocks = xs.blocks;
    let vectors = count.div_ceil(per);
    // Block sums, W tokens to a row.
    let (c0, c1) = work.c.split_at_mut(GROUP * GROUP);
    let mut c = [c0, c1];
    let acc = &mut work.acc[..vectors * LANES];
    let mut indices = [_mm512_setzero_si512(); GROUP];
    for (k, idx) in indices.iter_mut().enumerate().take(vectors) {
        *idx = rows_index::<W>(k);
    }
    for b in 0..blocks {
        // SAFETY: `run` loaded the configuration of W tokens; `c` rows hold W i32.
        unsafe { products_ahead::<F>(unpacked, xs, g, b, &mut c, W) };
        ahead.block(b);
        // The group's W tokens' values, repeated across the vector.
        let at = (g * blocks + b) * GROUP;
        let dx = repeat::<W>(&xs.d[at..]);
        let s = repeat::<W>(&xs.s[at..]);
        let qsum = repeat::<W>(cast_ps(&xs.qsum[at..]));
        let qsum8 = _mm512_slli_epi32::<3>(_mm512_castps_si512(qsum));
        let d = load_ps(&unpacked.d[b * GROUP..]);
        let min = load_ps(&unpacked.m[b * GROUP..]);
        for (k, &rows) in indices.iter().enumerate().take(vectors) {
            let mut isum = load_epi32(&c[b % 2][GROUP * k..]);
            if F == Q4_0 {
                isum = _mm512_sub_epi32(isum, qsum8);
            }
            let dd = _mm512_mul_ps(_mm512_permutexvar_ps(rows, d), dx);
            let t = _mm512_mul_ps(dd, _mm512_cvtepi32_ps(isum));
            let t = if F == Q4_1 {
                _mm512_add_ps(t, _mm512_mul_ps(_mm512_permutexvar_ps(rows, min), s))
            } else {
                t
            };
            add_term(&mut acc[k * LANES + b % LANES], t, b);
        }
    }
    for (k, lanes) in acc.chunks_exact_mut(LANES).enumerate() {
        let lanes: &mut [__m512; LANES] = lanes.try_into().expect("16 lanes");
        zero_unused(lanes, blocks);
        let mut rows = [0.0f32; GROUP];
        // SAFETY: 16 floats.
        unsafe { _mm512_storeu_ps(rows.as_mut_ptr(), fold_lanes(lanes)) };
        for (i, row) in rows.chunks_exact(W).enumerate() {
            work.sums[(per * k + i) * GROUP..][..W].copy_from_slice(row);
        }
    }
}

/// Adds block `b`'s term `t` to its lane: to zero for the lane's first block (as every
/// path's lanes start at zero), so that the lanes need no clearing between row groups.
#[target_feature(enable = "avx512f")]
#[inline]
fn add_term(lane: &mut __m512, t: __m512, b: usize) {
    let sum = if b < LANES {
        _mm512_setzero_ps()
    } else {
        *lane
    };
    *lane = _mm512_add_ps(sum, t);
}

/// Zeroes the lanes that no block reached (a row of fewer than 16 blocks).
#[target_feature(enable = "avx512f")]
#[inline]
fn zero_unused(lanes: &mut [__m512; LANES], blocks: usize) {
    for lane in lanes.iter_mut().skip(blocks) {
        *lane = _mm512_setzero_ps();
    }
}

/// Bytes to ask of the cache while a row group's blocks are summed, a share per block.
struct Ahead<'a> {
    bytes: &'a [u8],
    per_block: usize,
}

impl Ahead<'_> {
    fn new(bytes: &[u8], blocks: usize) -> Ahead<'_> {
        let lines = bytes.len().div_ceil(64);
        Ahead {
            bytes,
            per_block: 64 * lines.div_ceil(blocks.max(1)),
        }
    }

    /// Asks for block `b`'s share.
    #[inline(always)]
    fn block(&self, b: usize) {
        let from = (b * self.per_block).min(self.bytes.len());
        let to = (from + self.per_block).min(self.bytes.len());
        for line in self.bytes[from..to].chunks(64) {
            // SAFETY: a hint about an address inside `bytes`; SSE is part of x86-64.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast()) };
        }
    }
}

/// `lane[j] += lane[j + h]` for `h` = 8, 4, 2, 1, element by element; returns lane 0.
#[target_feature(enable = "avx512f")]
#[inline]
fn fold_lanes(lanes: &mut [__m512; LANES]) -> __m512 {
    let mut h = LANES / 2;
    while h > 0 {
        for j in 0..h {
            lanes[j] = _mm512_add_ps(lanes[j], lanes[j + h]);
        }
        h /= 2;
    }
    lanes[0]
}

/// Lane `l` from row `(16 / W) k + l / W`: the rows whose sums, `W` to a row, one vector
/// of block sums holds.
#[target_feature(enable = "avx512f")]
#[inline]
fn rows_index<const W: usize>(k: usize) -> __m512i {
    let mut idx = [0i32; 16];
    for (l, v) in idx.iter_mut().enumerate() {
        *v = ((GROUP / W) * k + l / W) as i32;
    }
    // SAFETY: 16 i32.
    unsafe { _mm512_loadu_si512(idx.as_ptr().cast()) }
}

/// The `W` (16, 8 or 4) floats at the start of `v`, repeated across a vector.
#[target_feature(enable = "avx512f")]
#[inline]
fn repeat<const W: usize>(v: &[f32]) -> __m512 {
    assert!(v.len() >= W);
    // SAFETY: `v` holds at least `W` floats (asserted).
    unsafe {
        match W {
            16 => _mm512_loadu_ps(v.as_ptr()),
            8 => _mm512_broadcast_f32x8(_mm256_loadu_ps(v.as_ptr())),
            _ => _mm512_broadcast_f32x4(_mm_loadu_ps(v.as_ptr())),
        }
    }
}

/// `v`'s bits as floats (for [`repeat`]).
fn cast_ps(v: &[i32]) -> &[f32] {
    // SAFETY: i32 and f32 have the same size and alignment, and any bits are an f32 (the
    // values are only moved, never computed with, as floats).
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len()) }
}

/// The 16 floats at the start of `v`.
#[target_feature(enable = "avx512f")]
#[inline]
fn load_ps(v: &[f32]) -> __m512 {
    assert!(v.len() >= 16);
    // SAFETY: `v` holds at least 16 floats (asserted).
    unsafe { _mm512_loadu_ps(v.as_ptr()) }
}

/// The 16 i32s at the start of `v`.
#[target_feature(enable = "avx512f")]
#[inline]
fn load_epi32(v: &[i32]) -> __m512i {
    assert!(v.len() >= 16);
    // SAFETY: `v` holds at least 16 i32s (asserted).
    unsafe { _mm512_loadu_si512(v.as_ptr().cast()) }
}
