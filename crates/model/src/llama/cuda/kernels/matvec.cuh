// Weight-matrix products over GGML block formats, as device code for matvec.cu's kernels (and
// decode.cu's fused step), which NVRTC compiles with this folder's headers:
//
//   matvec_<t>        y[t][r] = (residual ? residual[t][r] : 0) + sum_c W[r][c] * x[t][c]
//                     (optionally with the RMSNorm before it and the next one's weights after
//                     it fused in: see matvec below)
//   matvec_out_<t>    y[r] = sum_c W[r][c] * x[c], one token, stored 8 rows at a time
//   matvec_rows_<t>, matvec_out_rows_<t>
//                     matvec and matvec_out of one token with 2 or 4 rows a warp (f16, bf16,
//                     q8_0, q4_1): the same bits (see matvec_together)
//   get_rows_<t>      out[i][c] = W[ids[i]][c]              (the token embedding lookup)
//   dequant_bf16_<t>  out[r][c] = bf16(W[r][c])             (operands for prefill GEMMs)
//
// for <t> in f32, f16, bf16, q8_0, q4_0, q4_1, q4_k, q6_k. Activations stay f32: each weight
// is widened to f32 with the CPU reference's own arithmetic (crates/model/src/quant/blocks.rs
// and kquants.rs), so get_rows and dequant_bf16 give the CPU's values bit for bit. matvec
// sums in another fixed order than the CPU's dot_row, and for q8_0/q4_0/q6_k multiplies each
// 4-column partial sum of integer * x by its scale instead of scaling every weight.
//
// Block layouts (ggml-common.h; every multi-byte field little-endian). "Row align" is the
// alignment of each row's start that the wide loads below rely on; it holds when w is
// 16-byte aligned (device allocations are) and row_bytes is the packed size of a row. Float
// rows that are not so aligned, or not whole 32-column slices, are read element by element
// instead; quantized rows must be aligned. x is read as float4 when x and x_stride allow it,
// else float by float.
//
// | type | elems | bytes | block                                         | weight               | row align |
// |------|-------|-------|-----------------------------------------------|----------------------|-----------|
// | f32  | 1     | 4     | f32                                           | as is                | 16        |
// | f16  | 1     | 2     | IEEE binary16                                 | exact widening       | 8         |
// | bf16 | 1     | 2     | high half of an f32                           | exact widening       | 8         |
// | q8_0 | 32    | 34    | {f16 d; i8 qs[32]}, dealt by lane (below)     | qs[i] * d            | 8         |
// | q4_0 | 32    | 18    | {f16 d; u8 qs[16]}                            | (q[i] - 8) * d       | 2         |
// | q4_1 | 32    | 20    | {f16 d; f16 m; u8 qs[16]}                     | q[i] * d + m         | 4         |
// | q4_k | 256   | 144   | {f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}  | (d*sc) * q - dmin*m  | 16        |
// | q6_k | 256   | 210   | {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d} | (d*sc) * (q - 32)    | 2         |
//
// - q8_0 rows are not the file's: the model deals each 256-column step's 8 blocks (272
//   bytes) by lane when it uploads them (weights.rs, `q8_0_lanes`). Lane l = 8b + p's quants
//   of its quad A (block b) then of its quad B (block 4 + b) are the 8 bytes at 8l, and the
//   8 scales follow at 256 in the order d0 d4 d1 d5 d2 d6 d3 d7, so the lane's two are the 4
//   bytes at 256 + 4b. Rows are padded with zeros to whole steps (row_bytes says so).
// - q4_0, q4_1: q[i] for i < 16 is the low nibble of qs[i], q[i + 16] its high nibble.
// - q4_k: eight sub-blocks of 32, each with a 6-bit scale sc and min m packed in `scales`
//   (get_scale_min_k4: bytes 0-3 hold sc 0-3 in bits 0-5, bytes 4-7 m 0-3; for j >= 4 the low
//   4 bits of sc j and m j are the low and high nibble of byte j + 4, their top 2 bits bits
//   6-7 of bytes j - 4 and j). Sub-blocks 2g and 2g + 1 are the low and high nibbles of
//   qs[32g .. 32g + 32].
// - q6_k: sixteen sub-blocks of 16 with signed 8-bit scales. Each half h of 128 weights reads
//   ql[64h ..], qh[32h ..], scales[8h ..]; for l < 32 its elements l, l + 32, l + 64, l + 96
//   are the low nibble of ql[l], low of ql[l + 32], high of ql[l], high of ql[l + 32], topped
//   with bits 0-1, 2-3, 4-5, 6-7 of qh[l] as bits 4-5; element e of the half uses
//   scales[8h + (e % 32) / 16 + 2 * (e / 32)].
//
// Work split. A row is cut into 32-column slices (a q8_0/q4_0/q4_1 block, a K-quant
// sub-block, or 32 plain elements) and walked in steps of eight slices: 256 columns, one
// K-quant super-block. In every step, lane l of a warp takes quad A = columns 4l..4l+3 and
// quad B = columns 128+4l..128+4l+3. So
//   - each warp-wide read of x (a float4 per lane and token) covers 512 contiguous bytes:
//     four whole 128-byte lines, the fewest L1 wavefronts for the bytes. x, not the weights,
//     is most of what a row moves through L1 (4 bytes per column and token, against 0.56 to
//     2 bytes of weights), and L1 throughput is what bounds the quantized kernels;
//   - a warp's weight loads of a step fall in one contiguous run of the row. Each lane reads
//     its fields as wide as their alignment allows: 16 bytes for f32 and the q4_k header, 8
//     for f16/bf16 and q8_0's quants, 4 for q4_1, q4_k nibbles and q8_0's scales, 2 for the
//     2-byte-aligned q4_0/q6_k.
//     Lanes 8b+p and 8b+p+4 of a 4-bit block read the same bytes, low and high nibbles;
//   - a lane issues the loads of several steps before it uses the first.
// A byte becomes an f32 with one permute and one add (2^23 + byte, minus 2^23: exact), not a
// slow integer conversion. Where a weight is a scale times an integer (q8_0, q4_0, q6_k),
// matvec multiplies the integers by x and scales each quad's partial sum once.
//
// Determinism: each lane accumulates its quads in increasing column order, element by
// element in a fixed order, then the warp sums its lanes with a fixed __shfl_xor_sync
// butterfly. No atomics, no dependence on timing or on the grid; a token's result does not
// depend on how many tokens share the call.
//
// Geometry (all kernels): blockDim (256, 1, 1), no dynamic shared memory.
//   matvec:       gridDim (ceil(rows * parts / 8)), parts in 1, 2, 4, 8; warp w of block b
//                 takes part w % parts of row (8 / parts) b + w / parts.
//   matvec_rows:  (one token) gridDim (ceil(rows * parts / (8 rpw))), rpw (rows a warp takes
//                 together) 2 or 4; warp w of block b takes part w % parts of rows
//                 ((8 / parts) b + w / parts) rpw .. + rpw - 1.
//   matvec_out:   gridDim (ceil(rows / 8)); matvec_out_rows: (ceil(rows / (8 rpw))), warp w of
//                 block b rows (8 b + w) rpw .. + rpw - 1.
//   get_rows:     gridDim (n); block i writes out row i.
//   dequant_bf16: gridDim (rows); block r writes out row r.

#ifndef TERN_MATVEC_CUH
#define TERN_MATVEC_CUH

#include "common.cuh"

// ---------------------------------------------------------------------------------------
// Loads and conversions
// ---------------------------------------------------------------------------------------

// Weight loads: read-only, streamed (each byte once per call), so first in line for eviction
// from L1, which then keeps x.
#define LD_WEIGHT "ld.global.nc.L1::evict_first"

__device__ __forceinline__ unsigned ld_u8(const unsigned char* p)
{
    unsigned short v;
    asm(LD_WEIGHT ".u8 %0, [%1];" : "=h"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ unsigned ld_u16(const unsigned char* p)
{
    unsigned short v;
    asm(LD_WEIGHT ".u16 %0, [%1];" : "=h"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ unsigned ld_u32(const unsigned char* p)
{
    unsigned v;
    asm(LD_WEIGHT ".u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ uint2 ld_u32x2(const unsigned char* p)
{
    uint2 v;
    asm(LD_WEIGHT ".v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}

__device__ __forceinline__ uint4 ld_u32x4(const unsigned char* p)
{
    uint4 v;
    asm(LD_WEIGHT ".v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

__device__ __forceinline__ float f16_to_f32(unsigned bits)
{
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((unsigned short)bits));
    return f;
}

__device__ __forceinline__ float bf16_to_f32(unsigned bits)
{
    return __uint_as_float((bits & 0xffffu) << 16);
}

// The bits of 2^23 as an f32 (0x4b000000), computed from a value the compilers cannot
// fold (blockDim.x <= 1024, so the shift gives 0), so that it stays in a register and each
// byte_f32 is one permute with an immediate selector and one add, not also a move of its
// selector into a register.
__device__ __forceinline__ unsigned magic_2p23()
{
    return 0x4b000000u | (blockDim.x >> 11);
}

// Byte i of v, minus `bias`, as an f32 (exact): the byte becomes the low mantissa bits of
// 2^23 (`magic` is magic_2p23()), which an add takes away again.
__device__ __forceinline__ float byte_f32(unsigned v, int i, float bias, unsigned magic)
{
    return __int_as_float(__byte_perm(v, magic, 0x7650u | i)) - (8388608.0f + bias);
}

// A small unsigned integer (< 2^23) as an f32, exactly, the same way.
__device__ __forceinline__ float small_f32(unsigned v, unsigned magic)
{
    return __uint_as_float(magic | v) - 8388608.0f;
}

// f32 to bf16 bits, nearest with ties to even; NaNs stay NaN, made quiet (as the CPU's
// f32_to_bf16, ggml_compute_fp32_to_bf16).
__device__ __forceinline__ unsigned f32_to_bf16(float f)
{
    const unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (u >> 16) | 64u;
    }
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// ---------------------------------------------------------------------------------------
// Formats: lane l's two quads of a 256-column step
// ---------------------------------------------------------------------------------------
//
// Lane l = 8b + p of a warp takes, in every step of 256 columns, quad A = columns 4l..4l+3
// (part p of slice b) and quad B = columns 128+4l..128+4l+3 (part p of slice 4 + b). Each
// format is a struct with
//   BLOCK, STEP             columns per block, and bytes of a row per step;
//   Lane lane(row, l, magic) the lane's pointers into step 0 and its other constants;
//   Raw load(l, o, b_ok)    the lane's loads for the step at byte offset o of the row, quad
//                           B's only if b_ok (its slice exists);
//   widen(raw, l, u, s)     the weights of quad A in u[0..4], of quad B in u[4..8]: they are
//                           u[i] * s[i / 4] when SCALED, else u[i];
//   FLOAT                   f32/f16/bf16, which also have one(row, c) = column c.
// load and widen are apart so that a lane can have several steps' loads in flight.

struct F32 {
    static constexpr unsigned BLOCK = 32, STEP = 1024, ALIGN = 16;
    static constexpr bool FLOAT = true, SCALED = false;
    struct Lane {
        const unsigned char* p;
    };
    struct Raw {
        uint4 a, b;
    };
    static __device__ __forceinline__ Lane lane(const unsigned char* row, unsigned l, unsigned)
    {
        return {row + 16 * l};
    }
    static __device__ __forceinline__ Raw load(const Lane& l, unsigned long long o, bool b_ok)
    {
        return {ld_u32x4(l.p + o), b_ok ? ld_u32x4(l.p + o + 512) : make_uint4(0, 0, 0, 0)};
    }
    static __device__ __forceinline__ void widen(const Raw& r, const Lane&, float (&u)[8],
                                                 float (&)[2])
    {
        const unsigned v[8] = {r.a.x, r.a.y, r.a.z, r.a.w, r.b.x, r.b.y, r.b.z, r.b.w};
        for (int i = 0; i < 8; ++i) {
            u[i] = __uint_as_float(v[i]);
        }
    }
    static __device__ __forceinline__ float one(const unsigned char* row, unsigned c)
    {
        return __uint_as_float(ld_u32(row + 4 * c));
    }
};

template <bool BRAIN>  // false: f16, true: bf16
struct Half16 {
    static constexpr unsigned BLOCK = 32, STEP = 512, ALIGN = 8;
    static constexpr bool FLOAT = true, SCALED = false;
    struct Lane {
        const unsigned char* p;
    };
    struct Raw {
        uint2 a, b;
    };
    static __device__ __forceinline__ float widen1(unsigned bits)
    {
        return BRAIN ? bf16_to_f32(bits) : f16_to_f32(bits);
    }
    static __device__ __forceinline__ Lane lane(const unsigned char* row, unsigned l, unsigned)
    {
        return {row + 8 * l};
    }
    static __device__ __forceinline__ Raw load(const Lane& l, unsigned long long o, bool b_ok)
    {
        return {ld_u32x2(l.p + o), b_ok ? ld_u32x2(l.p + o + 256) : make_uint2(0, 0)};
    }
    static __device__ __forceinline__ void widen(const Raw& r, const Lane&, float (&u)[8],
                                                 float (&)[2])
    {
        const unsigned v[4] = {r.a.x, r.a.y, r.b.x, r.b.y};
        for (int i = 0; i < 4; ++i) {
            u[2 * i] = widen1(v[i] & 0xffffu);
            u[2 * i + 1] = widen1(v[i] >> 16);
        }
    }
    static __device__ __forceinline__ float one(const unsigned char* row, unsigned c)
    {
        return widen1(ld_u16(row + 2 * c));
    }
};

// q8_0 as the model uploads it (weights.rs, `q8_0_lanes`; the table above): a lane's step is
// one 8-byte and one 4-byte load, where GGML's 2-byte-aligned blocks took six 2-byte ones.
struct Q8_0 {
    static constexpr unsigned BLOCK = 32, STEP = 8 * 34;
    static constexpr bool FLOAT = false, SCALED = true;
    struct Lane {
        const unsigned char *q, *d;
        unsigned magic;
    };
    struct Raw {
        unsigned a, b, d;
    };
    static __device__ __forceinline__ Lane lane(const unsigned char* row, unsigned l, unsigned magic)
    {
        return {row + 8 * l, row + 256 + 4 * (l >> 3), magic};
    }
    static __device__ __forceinline__ Raw load(const Lane& l, unsigned long long o, bool b_ok)
    {
        if (b_ok) {
            const uint2 q = ld_u32x2(l.q + o);
            return {q.x, q.y, ld_u32(l.d + o)};
        }
        return {ld_u32(l.q + o), 0, ld_u32(l.d + o)};
    }
    static __device__ __forceinline__ void widen(const Raw& r, const Lane& l, float (&u)[8],
                                                 float (&s)[2])
    {
        // Flipping the sign bits turns each i8 q into the byte q + 128.
        const unsigned a = r.a ^ 0x80808080u, b = r.b ^ 0x80808080u;
        for (int i = 0; i < 4; ++i) {
            u[i] = byte_f32(a, i, 128.0f, l.magic);
            u[4 + i] = byte_f32(b, i, 128.0f, l.magic);
        }
        s[0] = f16_to_f32(r.d & 0xffffu);
        s[1] = f16_to_f32(r.d >> 16);
    }
};

struct Q4_0 {
    static constexpr unsigned BLOCK = 32, STEP = 8 * 18;
    static constexpr bool FLOAT = false, SCALED = true;
    struct Lane {
        const unsigned char *d, *q;  // quad A's; quad B's are 4 blocks on
        unsigned magic, shift;       // parts 4..7 are the high nibbles of parts 0..3's bytes
    };
    struct Raw {
        unsigned da, a0, a1, db, b0, b1;
    };
    static __device__ __forceinline__ Lane lane(const unsigned char* row, unsigned l, unsigned magic)
    {
        const unsigned b = l >> 3, p = l & 7;
        return {row + 18 * b, row + 18 * b + 2 + 4 * (p & 3), magic, 4 * (p >> 2)};
    }
    static __device__ __forceinline__ Raw load(const Lane& l, unsigned long long o, bool b_ok)
    {
        const unsigned char *d = l.d + o, *q = l.q + o;
        Raw r = {ld_u16(d), ld_u16(q), ld_u16(q + 2), 0, 0, 0};
        if (b_ok) {
            r.db = ld_u16(d + 72), r.b0 = ld_u16(q + 72), r.b1 = ld_u16(q + 74);
        }
        return r;
    }
    static __device__ __forceinline__ void widen(const Raw& r, const Lane& l, float (&u)[8],
                                                 float (&s)[2])
    {
        const unsigned a = (__byte_perm(r.a0, r.a1, 0x5410) >> l.shift) & 0x0f0f0f0fu;
        const unsigned b = (__byte_perm(r.b0, r.b1, 0x5410) >> l.shift) & 0x0f0f0f0fu;
        for (int i = 0; i < 4; ++i) {
            u[i] = byte_f32(a, i, 8.0f, l.magic);
            u[4 + i] = byte_f32(b, i, 8.0f, l.magic);
        }
        s[0] = f16_to_f32(r.da);
        s[1] = f16_to_f32(r.db);
    }
};

struct Q4_1 {
    static constexpr unsigned BLOCK = 32, STEP = 8 * 20;
    static constexpr bool FLOAT = false, SCALED = false;
    struct Lane {
        const unsigned char *dm, *q;  // quad A's; quad B's are 4 blocks on
        unsigned magic, shift;
    };
    struct Raw {
        unsigned dma, a, dmb, b;
    };
    static __device__ __forceinline__ Lane lane(const unsigned char* row, unsigned l, unsigned magic)
    {
        const unsigned b = l >> 3, p = l & 7;
        return {row + 20 * b, row + 20 * b + 4 + 4 * (p & 3), magic, 4 * (p >> 2)};
    }
    static __device__ __forceinline__ Raw load(const Lane& l, unsigned long long o, bool b_ok)
    {
        const unsigned char *dm = l.dm + o, *q = l.q + o;
        Raw r = {ld_u32(dm), ld_u32(q), 0, 0};
        if (b_ok) {
            r.dmb = ld_u32(dm + 80), r.b = ld_u32(q + 80);
        }
        return r;
    }
    static __device__ __forceinline__ void widen(const Raw& r, const Lane& l, float (&u)[8],
                                                 float (&)[2])
    {
        const float da = f16_to_f32(r.dma & 0xffffu), ma = f16_to_f32(r.dma >> 16);
        const float db = f16_to_f32(r.dmb & 0xffffu), mb = f16_to_f32(r.dmb >> 16);
        const unsigned a = (r.a >> l.shift) & 0x0f0f0f0fu, b = (r.b >> l.shift) & 0x0f0f0f0fu;
        // q * d is exact (4 by 11 significant bits), so the fused form rounds as the CPU's
        // multiply-then-add does.
        for (int i = 0; i < 4; ++i) {
            u[i] = fmaf(byte_f32(a, i, 0.0f, l.magic), da, ma);
            u[4 + i] = fmaf(byte_f32(b, i, 0.0f, l.magic), db, mb);
        }
    }
};

struct Q4_K {
    static constexpr unsigned BLOCK = 256, STEP = 144;  // a step is one super-block
    static constexpr bool FLOAT = false, SCALED = false;
    // Quad A is in sub-block b < 4, quad B in sub-block 4 + b. get_scale_min_k4 with b0, b1,
    // b2 byte b of the words scales[0..4], scales[4..8], scales[8..12]: sub-block b has
    // sc = b0 & 63, m = b1 & 63; sub-block 4 + b has sc = (b2 & 15) | (b0 >> 6) << 4 and
    // m = b2 >> 4 | (b1 >> 6) << 4.
    struct Lane {
        const unsigned char *head, *q;  // q: quad A's nibbles; quad B's are 64 bytes on
        unsigned magic, k8, shift;
    };
    struct Raw {
        uint4 head;  // d | dmin << 16, then scales[0..12]
        unsigned a, b;
    };
    static __device__ __forceinline__ Lane lane(const unsigned char* row, unsigned l, unsigned magic)
    {
        const unsigned b = l >> 3, p = l & 7;
        return {row, row + 16 + 32 * (b >> 1) + 4 * p, magic, 8 * b, 4 * (b & 1)};
    }
    static __device__ __forceinline__ Raw load(const Lane& l, unsigned long long o, bool)
    {
        return {ld_u32x4(l.head + o), ld_u32(l.q + o), ld_u32(l.q + o + 64)};
    }
    static __device__ __forceinline__ void widen(const Raw& r, const Lane& l, float (&u)[8],
                                                 float (&)[2])
    {
        const unsigned b0 = r.head.y >> l.k8, b1 = r.head.z >> l.k8, b2 = r.head.w >> l.k8;
        const float d = f16_to_f32(r.head.x & 0xffffu), dmin = f16_to_f32(r.head.x >> 16);
        // d * sc and dmin * m are exact, and so is d1 * q (at most 21 significant bits): the
        // fused form rounds as the CPU's d1 * q - min1.
        const float da = d * small_f32(b0 & 63, l.magic);
        const float ma = dmin * small_f32(b1 & 63, l.magic);
        const float db = d * small_f32((b2 & 15) | ((b0 >> 2) & 48), l.magic);
        const float mb = dmin * small_f32(((b2 >> 4) & 15) | ((b1 >> 2) & 48), l.magic);
        const unsigned a = (r.a >> l.shift) & 0x0f0f0f0fu, b = (r.b >> l.shift) & 0x0f0f0f0fu;
        for (int i = 0; i < 4; ++i) {
            u[i] = fmaf(da, byte_f32(a, i, 0.0f, l.magic), -ma);
            u[4 + i] = fmaf(db, byte_f32(b, i, 0.0f, l.magic), -mb);
        }
    }
};

struct Q6_K {
    static constexpr unsigned BLOCK = 256, STEP = 210;  // a step is one super-block
    static constexpr bool FLOAT = false, SCALED = true;
    // Quad A is part p of quarter b of half 0, quad B the same in half 1: 4 low bits from
    // ql[64h + 32 (b % 2) + 4p ..] (low nibbles for quarters 0, 1, high for 2, 3), 2 high
    // bits from bits 2b.. of qh[32h + 4p ..], scale scales[8h + 2b + p / 4].
    struct Lane {
        const unsigned char *ql, *qh, *sc, *d;  // quad A's; quad B's are 64, 32, 8 bytes on
        unsigned magic, lshift, hshift;
    };
    struct Raw {
        unsigned la0, la1, ha0, ha1, sa, lb0, lb1, hb0, hb1, sb, d;
    };
    static __device__ __forceinline__ Lane lane(const unsigned char* row, unsigned l, unsigned magic)
    {
        const unsigned b = l >> 3, p = l & 7;
        return {row + 32 * (b & 1) + 4 * p,
                row + 128 + 4 * p,
                row + 192 + 2 * b + (p >> 2),
                row + 208,
                magic,
                4 * (b >> 1),
                2 * b};
    }
    static __device__ __forceinline__ Raw load(const Lane& l, unsigned long long o, bool)
    {
        const unsigned char *ql = l.ql + o, *qh = l.qh + o, *sc = l.sc + o;
        return {ld_u16(ql),      ld_u16(ql + 2),  ld_u16(qh),      ld_u16(qh + 2),
                ld_u8(sc),       ld_u16(ql + 64), ld_u16(ql + 66), ld_u16(qh + 32),
                ld_u16(qh + 34), ld_u8(sc + 8),   ld_u16(l.d + o)};
    }
    static __device__ __forceinline__ unsigned six_bits(unsigned l0, unsigned l1, unsigned h0,
                                                        unsigned h1, const Lane& l)
    {
        const unsigned lo = __byte_perm(l0, l1, 0x5410), hi = __byte_perm(h0, h1, 0x5410);
        return ((lo >> l.lshift) & 0x0f0f0f0fu) | (((hi >> l.hshift) & 0x03030303u) << 4);
    }
    static __device__ __forceinline__ void widen(const Raw& r, const Lane& l, float (&u)[8],
                                                 float (&s)[2])
    {
        const unsigned a = six_bits(r.la0, r.la1, r.ha0, r.ha1, l);
        const unsigned b = six_bits(r.lb0, r.lb1, r.hb0, r.hb1, l);
        for (int i = 0; i < 4; ++i) {
            u[i] = byte_f32(a, i, 32.0f, l.magic);
            u[4 + i] = byte_f32(b, i, 32.0f, l.magic);
        }
        // The i8 scales, as bytes + 128.
        const float d = f16_to_f32(r.d);
        s[0] = d * byte_f32(r.sa ^ 0x80u, 0, 128.0f, l.magic);
        s[1] = d * byte_f32(r.sb ^ 0x80u, 0, 128.0f, l.magic);
    }
};

// The block format of weight type n, in the host's order (DType::ALL): the numbers that
// MATVEC_TYPE (matvec.cu) and DECODE_TYPE (decode.cu) name.
template <int N> struct WeightType;
template <> struct WeightType<0> { typedef F32 T; };
template <> struct WeightType<1> { typedef Half16<false> T; };
template <> struct WeightType<2> { typedef Half16<true> T; };
template <> struct WeightType<3> { typedef Q8_0 T; };
template <> struct WeightType<4> { typedef Q4_0 T; };
template <> struct WeightType<5> { typedef Q4_1 T; };
template <> struct WeightType<6> { typedef Q4_K T; };
template <> struct WeightType<7> { typedef Q6_K T; };

// ---------------------------------------------------------------------------------------
// matvec
// ---------------------------------------------------------------------------------------

// Asks L2 for the first bytes (up to `limit`) of a warp's run of weights, one 128-byte line
// per lane and step, so that they stream in while the kernel before this one finishes. For
// matvec, more than 2 KiB (16 KiB) helped the small SmolLM2 matrices as much but cost the 1B
// shape's large ones 1-2%: lines fetched too early are evicted before their warp reads them.
__device__ __forceinline__ void prefetch_weights(const unsigned char* p, unsigned long long bytes,
                                                 unsigned lane, unsigned long long limit = 2048)
{
    const unsigned long long end = bytes < limit ? bytes : limit;
    for (unsigned long long o = 128ull * lane; o < end; o += 32 * 128) {
        asm volatile("prefetch.global.L2 [%0];" ::"l"(p + o));
    }
}

// Steps whose loads a lane issues before using the first: more for fewer tokens, where
// memory latency rather than arithmetic bounds a warp.
template <int NT>
__device__ constexpr int matvec_batch()
{
    return NT <= 2 ? 4 : 2;
}

// Reduces each lane's partial sums and writes y[t][r] for t < n from lane t, which also
// reads the residual (which may be y itself); or, given `part`, only part[t] = the sum.
template <int NT>
__device__ __forceinline__ void finish_row(float (&acc)[NT], float* y, const float* residual,
                                           unsigned r, unsigned n, unsigned y_stride,
                                           unsigned lane, float* part)
{
    float mine = 0.0f;
    for (int t = 0; t < NT; ++t) {
        const float total = warp_sum(acc[t]);
        if (lane == (unsigned)t) {
            mine = total;
        }
    }
    if (lane < n) {
        if (part) {
            part[lane] = mine;
            return;
        }
        const unsigned long long i = (unsigned long long)lane * y_stride + r;
        y[i] = (residual ? residual[i] : 0.0f) + mine;
    }
}

// x (activations) through the read-only path when NC, which only a kernel that never writes x
// may use; else through ordinary (coherent) loads, for a kernel whose other blocks write x.
template <bool NC>
__device__ __forceinline__ float4 ld_x4(const float* p)
{
    return NC ? __ldg((const float4*)p) : *(const float4*)p;
}

template <bool NC>
__device__ __forceinline__ float ld_x(const float* p)
{
    return NC ? __ldg(p) : *p;
}

// The activations at a lane's two quads of one step (xs: quad A's first), by two float4
// loads: quad A's in v[0..4], quad B's in v[4..8] (zeros where !b_ok). NC: see ld_x4.
template <bool NC>
__device__ __forceinline__ void step_x(const float* xs, bool b_ok, float (&v)[8])
{
    const float4 p = ld_x4<NC>(xs);
    const float4 q = b_ok ? ld_x4<NC>(xs + 128) : make_float4(0, 0, 0, 0);
    v[0] = p.x, v[1] = p.y, v[2] = p.z, v[3] = p.w;
    v[4] = q.x, v[5] = q.y, v[6] = q.z, v[7] = q.w;
}

// acc += the lane's widened weights of one step (u, with scales s: see the formats) times
// the same columns' activations v, in the matrix-vector order: quad A then, if b_ok, quad B;
// a scaled quad's integer products summed first and scaled once.
template <class T>
__device__ __forceinline__ void dot_values(const float (&u)[8], const float (&s)[2],
                                           const float (&v)[8], bool b_ok, float& acc)
{
    if (T::SCALED) {
        float a = u[0] * v[0], b = u[4] * v[4];
        for (int i = 1; i < 4; ++i) {
            a = fmaf(u[i], v[i], a);
            b = fmaf(u[4 + i], v[4 + i], b);
        }
        acc = fmaf(s[0], a, acc);
        if (b_ok) {
            acc = fmaf(s[1], b, acc);
        }
    } else {
        for (int i = 0; i < 4; ++i) {
            acc = fmaf(u[i], v[i], acc);
        }
        if (b_ok) {
            for (int i = 4; i < 8; ++i) {
                acc = fmaf(u[i], v[i], acc);
            }
        }
    }
}

// acc[t] += the lane's weights of one step times x[t] at the same columns (xs: quad A's
// columns for token 0). VX: x and x_stride allow float4 loads; without it only the first n
// tokens are summed. b_ok: quad B exists (false only in the last step of some rows). NC: see
// ld_x4.
template <class T, int NT, bool VX, bool NC = true>
__device__ __forceinline__ void dot_step(const typename T::Raw& raw, const typename T::Lane& l,
                                         const float* xs, unsigned x_stride, unsigned n,
                                         bool b_ok, float (&acc)[NT])
{
    float u[8], s[2];
    T::widen(raw, l, u, s);
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        if (!VX && (unsigned)t >= n) {
            break;
        }
        const float* xt = xs + t * x_stride;
        float v[8];
        if (VX) {
            step_x<NC>(xt, b_ok, v);
        } else {
            for (int i = 0; i < 4; ++i) {
                v[i] = ld_x<NC>(xt + i);
                v[4 + i] = b_ok ? ld_x<NC>(xt + 128 + i) : 0.0f;
            }
        }
        dot_values<T>(u, s, v, b_ok, acc[t]);
    }
}

// Slices (32 columns) in a row of whole blocks.
template <class T>
__device__ __forceinline__ unsigned slices_of(unsigned cols)
{
    return cols / T::BLOCK * (T::BLOCK / 32);
}

// Row r for NT tokens (with VX false: the first n <= NT of them). NC: see ld_x4. BATCH: steps
// whose loads a lane issues before it uses the first. TAIL: the steps after the last whole
// BATCH too (a short row then waits for memory once, not once per step), which costs
// matvec.cu's kernels, held to 80 registers, spills. `mid` runs once, while the row's first
// loads are on their way.
template <class T, int NT, bool VX, bool NC = true, int BATCH = matvec_batch<NT>(), bool TAIL = false,
          class Mid = NoMid>
__device__ __forceinline__ void matvec_row(const unsigned char* row, const float* x,
                                           float* y, unsigned r, unsigned cols, unsigned n,
                                           unsigned x_stride, unsigned y_stride,
                                           const float* residual, unsigned lane, unsigned magic,
                                           float* part, const Mid& mid = Mid())
{
    const unsigned n_slices = slices_of<T>(cols), b = lane >> 3;
    const typename T::Lane l = T::lane(row, lane, magic);
    float acc[NT];
    for (int t = 0; t < NT; ++t) {
        acc[t] = 0.0f;
    }
    // Whole steps, BATCH at a time, then the rest one by one. o: the step's first byte in
    // the row; xk: the lane's first column of it in x.
    unsigned k = 0;
    unsigned long long o = 0;
    const float* xk = x + 4 * lane;
    for (; 8 * (k + BATCH) <= n_slices; k += BATCH, o += BATCH * T::STEP, xk += 256 * BATCH) {
        typename T::Raw raw[BATCH];
#pragma unroll
        for (int i = 0; i < BATCH; ++i) {
            raw[i] = T::load(l, o + i * T::STEP, true);
        }
        if (k == 0) {
            mid();
        }
#pragma unroll
        for (int i = 0; i < BATCH; ++i) {
            dot_step<T, NT, VX, NC>(raw[i], l, xk + 256 * i, x_stride, n, true, acc);
        }
    }
    // The rest: fewer than BATCH whole steps and perhaps a partial one.
    if constexpr (TAIL) {
        typename T::Raw raw[BATCH];
#pragma unroll
        for (int i = 0; i < BATCH; ++i) {
            if (8 * (k + i) + b < n_slices) {
                raw[i] = T::load(l, o + i * T::STEP, 8 * (k + i) + 4 + b < n_slices);
            }
        }
        if (k == 0) {
            mid();
        }
#pragma unroll
        for (int i = 0; i < BATCH; ++i) {
            if (8 * (k + i) + b < n_slices) {
                dot_step<T, NT, VX, NC>(raw[i], l, xk + 256 * i, x_stride, n,
                                        8 * (k + i) + 4 + b < n_slices, acc);
            }
        }
    } else {
        if (k == 0) {
            mid();
        }
        for (; 8 * k + b < n_slices; ++k, o += T::STEP, xk += 256) {
            const bool b_ok = 8 * k + 4 + b < n_slices;
            dot_step<T, NT, VX, NC>(T::load(l, o, b_ok), l, xk, x_stride, n, b_ok, acc);
        }
    }
    finish_row<NT>(acc, y, residual, r, n, y_stride, lane, part);
}

// Float rows that are not whole, aligned slices: lane l takes columns l, l + 32, ...
template <class T>
__device__ __forceinline__ void matvec_elems(const unsigned char* row, const float* __restrict__ x,
                                             float* y, unsigned r, unsigned cols, unsigned n,
                                             unsigned x_stride, unsigned y_stride,
                                             const float* residual, unsigned lane, float* part)
{
    float acc[8];
    for (int t = 0; t < 8; ++t) {
        acc[t] = 0.0f;
    }
    for (unsigned c = lane; c < cols; c += 32) {
        const float w = T::one(row, c);
        for (int t = 0; t < 8; ++t) {
            if ((unsigned)t < n) {
                acc[t] = fmaf(w, __ldg(x + t * x_stride + c), acc[t]);
            }
        }
    }
    finish_row<8>(acc, y, residual, r, n, y_stride, lane, part);
}

// RMSNorm's scale of one row of `cols` floats, 1 / sqrt(mean(x^2) + eps), summed by one warp
// in a fixed order: lane l's squares of columns 4l .. 4l + 3, 4l + 128 .. 4l + 131, ... in
// column order, then warp_sum; every lane gets it. The lane's loads go U at a time, all issued
// before the first is summed (U leaves the order as it is; 4 costs the matrix-vector kernels
// no registers). NC: see ld_x4.
template <bool NC, int U = 4>
__device__ __forceinline__ float rms_scale(const float* xr, unsigned cols, float eps, unsigned lane)
{
    float sum = 0.0f;
    if (cols % 4 == 0 && (unsigned long long)xr % 16 == 0) {
        for (unsigned c0 = 4 * lane; c0 < cols; c0 += 128 * U) {
            float4 v[U];
#pragma unroll
            for (int i = 0; i < U; ++i) {
                const unsigned c = c0 + 128 * i;
                v[i] = c < cols ? ld_x4<NC>(xr + c) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            }
#pragma unroll
            for (int i = 0; i < U; ++i) {
                if (c0 + 128 * i < cols) {
                    sum = fmaf(v[i].x, v[i].x, sum);
                    sum = fmaf(v[i].y, v[i].y, sum);
                    sum = fmaf(v[i].z, v[i].z, sum);
                    sum = fmaf(v[i].w, v[i].w, sum);
                }
            }
        }
    } else {
        for (unsigned c = lane; c < cols; c += 32) {
            const float v = ld_x<NC>(xr + c);
            sum = fmaf(v, v, sum);
        }
    }
    sum = warp_sum(sum);
    return 1.0f / sqrtf(sum / (float)cols + eps);
}

// Whether a float row must be read element by element.
template <class T>
__device__ __forceinline__ bool by_elements(const unsigned char* row, unsigned cols)
{
    if constexpr (T::FLOAT) {
        return cols % 32 != 0 || (unsigned long long)row % T::ALIGN != 0;
    }
    return false;
}

// Bytes of a row's first `cols` columns (whole blocks).
template <class T>
__device__ __forceinline__ unsigned long long bytes_of(unsigned cols)
{
    return (unsigned long long)cols / T::BLOCK * (T::STEP / (256 / T::BLOCK));
}

// The columns c0 .. c1 of a row that part `part` of `parts` takes: each part an equal run of
// whole 256-column steps, the last one the rest.
template <class T>
__device__ __forceinline__ void row_part(unsigned cols, unsigned parts, unsigned part,
                                         unsigned& c0, unsigned& c1)
{
    const unsigned steps = (cols + 255) / 256, per_part = (steps + parts - 1) / parts;
    c0 = part * per_part * 256 < cols ? part * per_part * 256 : cols;
    c1 = c0 + per_part * 256 < cols ? c0 + per_part * 256 : cols;
}

// Rows a warp of `matvec` and `matvec_out` takes together for one token (the host's choice
// by the matrix's shape, see kernels.rs's `rows_together`), and the steps whose loads a lane
// of it issues before it uses the first (as many loads in flight as matvec_row's 4 at R = 2).
template <int R>
__device__ constexpr int together_batch()
{
    return R >= 4 ? 2 : 4;
}

// Whether a format's rows may go R > 1 a warp: where a step's loads take at most 16 bytes a
// lane (f16, bf16, q8_0, q4_1), so that the rows' loads in flight fit matvec's 80 registers
// (q6_k's 44 bytes spilled). kernels.rs's `rows_together` asks the same.
template <class T>
__device__ constexpr bool together_fits()
{
    return sizeof(typename T::Raw) <= 16;
}

// R consecutive rows (`row`, then every `row_bytes` on) of one token (x 16-byte aligned),
// summed together: each step's loads of all R rows in flight at once, and each x value loaded
// once for the R rows (x is most of what a row moves through L1). Each row is summed as
// matvec_row<T, 1, true> sums it (its steps in column order, dot_values each, then warp_sum),
// so the same bits; returns row i's sum in lane i < R.
template <class T, int R>
__device__ __forceinline__ float matvec_rows(const unsigned char* row, unsigned long long row_bytes,
                                             const float* x, unsigned cols, unsigned lane,
                                             unsigned magic)
{
    constexpr int BATCH = together_batch<R>();
    const unsigned n_slices = slices_of<T>(cols), b = lane >> 3;
    typename T::Lane l[R];
    float acc[R];
#pragma unroll
    for (int i = 0; i < R; ++i) {
        l[i] = T::lane(row + i * row_bytes, lane, magic);
        acc[i] = 0.0f;
    }
    unsigned k = 0;
    unsigned long long o = 0;
    const float* xk = x + 4 * lane;
    for (; 8 * (k + BATCH) <= n_slices; k += BATCH, o += BATCH * T::STEP, xk += 256 * BATCH) {
        typename T::Raw raw[BATCH][R];
#pragma unroll
        for (int j = 0; j < BATCH; ++j) {
#pragma unroll
            for (int i = 0; i < R; ++i) {
                raw[j][i] = T::load(l[i], o + j * T::STEP, true);
            }
        }
#pragma unroll
        for (int j = 0; j < BATCH; ++j) {
            float v[8];
            step_x<true>(xk + 256 * j, true, v);
#pragma unroll
            for (int i = 0; i < R; ++i) {
                float u[8], sc[2];
                T::widen(raw[j][i], l[i], u, sc);
                dot_values<T>(u, sc, v, true, acc[i]);
            }
        }
    }
    for (; 8 * k + b < n_slices; ++k, o += T::STEP, xk += 256) {
        const bool b_ok = 8 * k + 4 + b < n_slices;
        typename T::Raw raw[R];
#pragma unroll
        for (int i = 0; i < R; ++i) {
            raw[i] = T::load(l[i], o, b_ok);
        }
        float v[8];
        step_x<true>(xk, b_ok, v);
#pragma unroll
        for (int i = 0; i < R; ++i) {
            float u[8], sc[2];
            T::widen(raw[i], l[i], u, sc);
            dot_values<T>(u, sc, v, b_ok, acc[i]);
        }
    }
    float mine = 0.0f;
#pragma unroll
    for (int i = 0; i < R; ++i) {
        const float total = warp_sum(acc[i]);
        if (lane == (unsigned)i) {
            mine = total;
        }
    }
    return mine;
}

// The sums of the warp's R rows first .. first + R - 1 (those below `rows`) over columns c0 ..
// c1 into out[0 .. R) (0 where the run is empty): together where all R exist, else one after
// another (the matrix's last rows).
template <class T, int R>
__device__ __forceinline__ void warp_rows(const unsigned char* w, const float* x, unsigned first,
                                          unsigned rows, unsigned c0, unsigned c1,
                                          unsigned row_bytes, unsigned lane, float* out)
{
    const unsigned char* row = w + (unsigned long long)first * row_bytes + bytes_of<T>(c0);
    const unsigned magic = magic_2p23();
    if (c1 <= c0 || first >= rows) {
        if (lane < (unsigned)R) {
            out[lane] = 0.0f;
        }
    } else if (first + R <= rows) {
        const float mine = matvec_rows<T, R>(row, row_bytes, x + c0, c1 - c0, lane, magic);
        if (lane < (unsigned)R) {
            out[lane] = mine;
        }
    } else {
        for (unsigned i = 0; i < (unsigned)R; ++i) {
            if (first + i < rows) {
                matvec_row<T, 1, true>(row + (unsigned long long)i * row_bytes, x + c0, nullptr, 0, c1 - c0, 1,
                                       0, 0, nullptr, lane, magic, out + i);
            }
        }
    }
}

// matvec of one token with R rows a warp (rows per block 8 R / parts): warp w of block b
// takes part w % parts of rows (8 / parts * b + w / parts) R .. + R - 1, summed together
// (warp_rows); the parts, the norm, the residual, the next norm's input and SwiGLU finish each
// row as matvec does, so the same bits. x 16-byte aligned, rows read by steps (the host's
// choice, see kernels.rs's `rows_together`). With glu, block b holds R groups of matvec's
// 8 interleaved rows and writes y[4 (R b + g) + j].
template <class T, int R>
__device__ __forceinline__ void matvec_together(const unsigned char* __restrict__ w,
                                                const float* __restrict__ x, float* y, unsigned rows,
                                                unsigned cols, unsigned row_bytes, const float* residual,
                                                unsigned parts, const float* __restrict__ norm_x, float eps,
                                                const float* __restrict__ g, float* __restrict__ yg,
                                                unsigned glu)
{
    __shared__ float s_part[8][R];  // [warp][row of the warp]
    __shared__ float s_scale;
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, part = warp % parts;
    const unsigned first = (blockIdx.x * (8 / parts) + warp / parts) * R;
    unsigned c0, c1;
    row_part<T>(cols, parts, part, c0, c1);
    // Only the first row's run asked ahead, as for one row a warp: more lines asked early
    // are evicted before the warp reads them.
    if (first < rows && c1 > c0) {
        prefetch_weights(w + (unsigned long long)first * row_bytes + bytes_of<T>(c0), bytes_of<T>(c1 - c0), lane);
    }
    pdl_wait();
    pdl_launch_dependents();
    if (norm_x && warp == 0) {
        const float scale = rms_scale<true>(norm_x, cols, eps, lane);
        if (lane == 0) {
            s_scale = scale;
        }
    }
    warp_rows<T, R>(w, x, first, rows, c0, c1, row_bytes, lane, s_part[warp]);
    __syncthreads();
    const unsigned r = first + lane;
    if (part == 0 && lane < (unsigned)R && r < rows) {
        float total = 0.0f;
        for (unsigned k = 0; k < parts; ++k) {
            total += s_part[warp + k][lane];
        }
        if (norm_x) {
            total *= s_scale;
        }
        if (glu) {
            s_part[warp][lane] = total;  // parts == 1: the warp's own slot
        } else {
            const float v = (residual ? residual[r] : 0.0f) + total;
            y[r] = v;
            if (g) {
                yg[r] = v * g[r];
            }
        }
    }
    if (glu) {
        __syncthreads();
        // Thread t < 4 R: group t / 4's gate and up rows t % 4 (block rows 8 (t / 4) + t % 4
        // and 4 on), in s_part's order of block rows.
        const unsigned t = threadIdx.x, base = blockIdx.x * 8 * R;
        if (t < 4 * (unsigned)R && base + 8 * (t / 4) + 4 + t % 4 < rows) {
            const float* rows_of_block = &s_part[0][0];
            const float gate = rows_of_block[8 * (t / 4) + t % 4], up = rows_of_block[8 * (t / 4) + 4 + t % 4];
            y[4 * blockIdx.x * R + t] = gate / (1.0f + expf(-gate)) * up;
        }
    }
}

// Split rows: with `parts` > 1, the `parts` warps of a row each take an equal run of its
// 256-column steps (the last one the rest), and the row's sum is their partial sums added
// in part order, so the result still depends only on the row's length, never on timing.
// Short matrices use this to keep enough warps reading.
//
// Fused RMSNorm: with `norm_x` given, x holds x_raw * g (the norm's input times its
// weights, written by the kernel before: see `g`) and norm_x holds x_raw; then
// y = (1 / rms(x_raw)) * (W (x_raw * g)), the norm's scale computed per token by warp t of
// every block from norm_x in a fixed order. With `g` given, the kernel also writes
// yg[t][r] = y[t][r] * g[r]: the next norm's input for a later fused kernel.
//
// Fused SwiGLU: with `glu`, the matrix is the MLP's gate and up projections interleaved four
// rows at a time (gate rows 4b..4b+3, then up rows 4b..4b+3, in block b; parts must be 1),
// and block b writes y[t][4b + j] = silu(gate_j) * up_j, as the swiglu kernel would.
template <class T>
__device__ __forceinline__ void matvec(const unsigned char* __restrict__ w, const float* __restrict__ x,
                                       float* y, unsigned rows, unsigned cols, unsigned row_bytes,
                                       unsigned n_tok, unsigned x_stride, unsigned y_stride,
                                       const float* residual, unsigned parts,
                                       const float* __restrict__ norm_x, float eps,
                                       const float* __restrict__ g, float* __restrict__ yg,
                                       unsigned glu)
{
    __shared__ float s_part[8][8];  // [warp][token]
    __shared__ float s_scale[8];    // [token]
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const unsigned r = blockIdx.x * (8 / parts) + warp / parts, part = warp % parts;
    const bool live = r < rows;
    const unsigned char* row = w + (unsigned long long)(live ? r : 0) * row_bytes;
    const unsigned magic = magic_2p23();
    const bool elems = by_elements<T>(row, cols);
    const bool vx = (unsigned long long)x % 16 == 0 && x_stride % 4 == 0;
    // This warp's columns: whole steps, except in the last part.
    unsigned c0, c1;
    row_part<T>(cols, parts, part, c0, c1);
    const unsigned long long b0 = bytes_of<T>(c0);
    float* my_part = s_part[warp];
    if (live) {
        prefetch_weights(row + b0, bytes_of<T>(c1 - c0), lane);
    }
    pdl_wait();
    pdl_launch_dependents();
    // Tokens in groups of at most 8, one pass over the row each.
    for (unsigned t0 = 0; t0 < n_tok; t0 += 8) {
        const unsigned n = n_tok - t0 < 8 ? n_tok - t0 : 8;
        const float* xt = x + (unsigned long long)t0 * x_stride;
        float* yt = y + (unsigned long long)t0 * y_stride;
        const float* rt = residual ? residual + (unsigned long long)t0 * y_stride : residual;
        if (norm_x && warp < n) {
            const float scale = rms_scale<true>(norm_x + (unsigned long long)(t0 + warp) * x_stride, cols, eps, lane);
            if (lane == 0) {
                s_scale[warp] = scale;
            }
        }
        if (lane < 8) {
            my_part[lane] = 0.0f;
        }
        bool done = !live;
        if constexpr (T::FLOAT) {
            if (live && elems) {
                if (part == 0) {
                    matvec_elems<T>(row, xt, yt, r, cols, n, x_stride, y_stride, rt, lane, my_part);
                }
                done = true;
            }
        }
        if (!done && c1 > c0) {
            const unsigned char* rp = row + b0;
            const float* xp = xt + c0;
#define MATVEC_ROW(NT, VX) matvec_row<T, NT, VX>(rp, xp, yt, r, c1 - c0, n, x_stride, y_stride, rt, lane, magic, my_part)
            if (!vx) {
                MATVEC_ROW(8, false);
            } else {
                switch (n) {
                case 1: MATVEC_ROW(1, true); break;
                case 2: MATVEC_ROW(2, true); break;
                case 3: MATVEC_ROW(3, true); break;
                case 4: MATVEC_ROW(4, true); break;
                case 5: MATVEC_ROW(5, true); break;
                case 6: MATVEC_ROW(6, true); break;
                case 7: MATVEC_ROW(7, true); break;
                default: MATVEC_ROW(8, true); break;
                }
            }
#undef MATVEC_ROW
        }
        __syncthreads();
        if (live && part == 0 && lane < n) {
            float total = 0.0f;
            for (unsigned k = 0; k < parts; ++k) {
                total += s_part[warp + k][lane];
            }
            if (norm_x) {
                total *= s_scale[lane];
            }
            if (glu) {
                s_part[warp][lane] = total;  // parts == 1: the warp's own slot
            } else {
                const unsigned long long i = (unsigned long long)lane * y_stride + r;
                const float v = (rt ? rt[i] : 0.0f) + total;
                yt[i] = v;
                if (g) {
                    yg[(unsigned long long)t0 * y_stride + i] = v * g[r];
                }
            }
        }
        if (glu) {
            __syncthreads();
            if (warp < 4 && live && lane < n) {
                const float gate = s_part[warp][lane], up = s_part[warp + 4][lane];
                yt[(unsigned long long)lane * y_stride + 4 * blockIdx.x + warp] =
                    gate / (1.0f + expf(-gate)) * up;
            }
        }
        __syncthreads();
    }
}

// ---------------------------------------------------------------------------------------
// get_rows and dequant_bf16: one block of 256 threads per row
// ---------------------------------------------------------------------------------------

// Widens row `row` (cols columns) into f32s, bit for bit as the CPU does: calls
// emit(c, w, b_ok) with w the weights at columns c + (0..4) and, if b_ok, c + 128 + (0..4);
// for float rows that are not whole aligned slices, emit1(c, w) per column instead.
// Thread t is lane t % 32 in steps t / 32, t / 32 + 8, ...
template <class T, class Emit, class Emit1>
__device__ __forceinline__ void widen_row(const unsigned char* row, unsigned cols, Emit emit,
                                          Emit1 emit1)
{
    if constexpr (T::FLOAT) {
        if (by_elements<T>(row, cols)) {
            for (unsigned c = threadIdx.x; c < cols; c += 256) {
                emit1(c, T::one(row, c));
            }
            return;
        }
    }
    const unsigned lane = threadIdx.x & 31, b = lane >> 3, n_slices = slices_of<T>(cols);
    const typename T::Lane l = T::lane(row, lane, magic_2p23());
    for (unsigned k = threadIdx.x >> 5; 8 * k + b < n_slices; k += 8) {
        const bool b_ok = 8 * k + 4 + b < n_slices;
        float u[8], s[2], w[8];
        T::widen(T::load(l, (unsigned long long)k * T::STEP, b_ok), l, u, s);
        for (int i = 0; i < 8; ++i) {
            w[i] = T::SCALED ? u[i] * s[i / 4] : u[i];
        }
        emit(256 * k + 4 * lane, w, b_ok);
    }
}

template <class T>
__device__ __forceinline__ void get_rows(const unsigned char* __restrict__ w, const int* __restrict__ ids,
                                         float* __restrict__ out, unsigned cols, unsigned row_bytes,
                                         unsigned n, unsigned out_stride)
{
    pdl_wait();
    pdl_launch_dependents();
    const unsigned i = blockIdx.x;
    if (i >= n) {
        return;
    }
    const unsigned char* row = w + (unsigned long long)(unsigned)ids[i] * row_bytes;
    float* o = out + (unsigned long long)i * out_stride;
    const bool v4 = (unsigned long long)o % 16 == 0;
    widen_row<T>(
        row, cols,
        [&](unsigned c, const float* v, bool b_ok) {
            for (int h = 0; h < (b_ok ? 2 : 1); ++h) {
                float* p = o + c + 128 * h;
                if (v4) {
                    *(float4*)p = make_float4(v[4 * h], v[4 * h + 1], v[4 * h + 2], v[4 * h + 3]);
                } else {
                    for (int k = 0; k < 4; ++k) {
                        p[k] = v[4 * h + k];
                    }
                }
            }
        },
        [&](unsigned c, float v) { o[c] = v; });
}

template <class T>
__device__ __forceinline__ void dequant_bf16(const unsigned char* __restrict__ w,
                                             unsigned short* __restrict__ out, unsigned rows,
                                             unsigned cols, unsigned row_bytes)
{
    pdl_wait();
    pdl_launch_dependents();
    const unsigned r = blockIdx.x;
    if (r >= rows) {
        return;
    }
    const unsigned char* row = w + (unsigned long long)r * row_bytes;
    unsigned short* o = out + (unsigned long long)r * cols;
    const bool v2 = (unsigned long long)o % 8 == 0;
    widen_row<T>(
        row, cols,
        [&](unsigned c, const float* v, bool b_ok) {
            for (int h = 0; h < (b_ok ? 2 : 1); ++h) {
                unsigned short* p = o + c + 128 * h;
                unsigned q[4];
                for (int k = 0; k < 4; ++k) {
                    q[k] = f32_to_bf16(v[4 * h + k]);
                }
                if (v2) {
                    *(uint2*)p = make_uint2(q[0] | q[1] << 16, q[2] | q[3] << 16);
                } else {
                    for (int k = 0; k < 4; ++k) {
                        p[k] = (unsigned short)q[k];
                    }
                }
            }
        },
        [&](unsigned c, float v) { o[c] = (unsigned short)f32_to_bf16(v); });
}

// The output head for one token: as matvec, but the block's 8 R results are gathered in
// shared memory and stored by 8 R adjacent threads at once. The logits often go straight into
// host memory registered with the GPU (an actor's buffer), where one 4-byte store per warp
// would each cross the bus on its own. A warp takes R rows together (warp_rows) where R > 1
// (x 16-byte aligned, rows read by steps: the host's choice). Same arithmetic as matvec, so
// the same bits.
template <class T, int R>
__device__ __forceinline__ void matvec_out_rows(const unsigned char* __restrict__ w,
                                                const float* __restrict__ x, float* y, unsigned rows,
                                                unsigned cols, unsigned row_bytes)
{
    __shared__ float s_y[8 * R];
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, first = (blockIdx.x * 8 + warp) * R;
    if (first < rows) {
        prefetch_weights(w + (unsigned long long)first * row_bytes, row_bytes, lane);  // (see matvec_together)
    }
    pdl_wait();
    pdl_launch_dependents();
    if constexpr (R > 1) {
        warp_rows<T, R>(w, x, first, rows, 0, cols, row_bytes, lane, s_y + warp * R);
    } else if (first < rows) {
        // Row r's result lands in s_y[warp]: the kernels index their output by the row
        // number they are given, and only the output.
        const unsigned char* row = w + (unsigned long long)first * row_bytes;
        bool done = false;
        if constexpr (T::FLOAT) {
            if (by_elements<T>(row, cols)) {
                matvec_elems<T>(row, x, s_y, warp, cols, 1, cols, 1, nullptr, lane, nullptr);
                done = true;
            }
        }
        if (!done) {
            if ((unsigned long long)x % 16 == 0) {
                matvec_row<T, 1, true>(row, x, s_y, warp, cols, 1, cols, 1, nullptr, lane, magic_2p23(), nullptr);
            } else {
                matvec_row<T, 8, false>(row, x, s_y, warp, cols, 1, cols, 1, nullptr, lane, magic_2p23(), nullptr);
            }
        }
    }
    __syncthreads();
    const unsigned i = blockIdx.x * 8 * R + threadIdx.x;
    if (threadIdx.x < 8 * (unsigned)R && i < rows) {
        y[i] = s_y[threadIdx.x];
    }
}

// matvec_together of `rpw` (2 or 4) rows a warp, and matvec_out_rows likewise: kernels of
// their own (matvec.cu's matvec_rows_<t> and matvec_out_rows_<t>), so that matvec's and
// matvec_out's one row a warp keep their own registers. Nothing for the formats whose rows
// do not go together (never launched).
template <class T>
__device__ __forceinline__ void matvec_rows_of(const unsigned char* __restrict__ w, const float* __restrict__ x,
                                               float* y, unsigned rows, unsigned cols, unsigned row_bytes,
                                               const float* residual, unsigned parts,
                                               const float* __restrict__ norm_x, float eps,
                                               const float* __restrict__ g, float* __restrict__ yg, unsigned glu,
                                               unsigned rpw)
{
    if constexpr (together_fits<T>()) {
        if (rpw == 4) {
            matvec_together<T, 4>(w, x, y, rows, cols, row_bytes, residual, parts, norm_x, eps, g, yg, glu);
        } else {
            matvec_together<T, 2>(w, x, y, rows, cols, row_bytes, residual, parts, norm_x, eps, g, yg, glu);
        }
    }
}

template <class T>
__device__ __forceinline__ void matvec_out_rows_of(const unsigned char* __restrict__ w,
                                                   const float* __restrict__ x, float* y, unsigned rows,
                                                   unsigned cols, unsigned row_bytes, unsigned rpw)
{
    if constexpr (together_fits<T>()) {
        if (rpw == 4) {
            matvec_out_rows<T, 4>(w, x, y, rows, cols, row_bytes);
        } else {
            matvec_out_rows<T, 2>(w, x, y, rows, cols, row_bytes);
        }
    }
}

#endif  // TERN_MATVEC_CUH
