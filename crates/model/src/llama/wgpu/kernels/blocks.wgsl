// Weight access shared by every kernel that reads a matrix in its file's block format
// (`matvec`, `get_rows`). The matrix is one storage buffer of little-endian
// 32-bit words holding the GGUF rows as they are; blocks need not be 4-byte aligned (a Q4_0
// block is 18 bytes), so fields are read by byte offset. The uploader pads every matrix with
// one spare word, so the word after the last one read always exists.
//
// Each `dequant_*.wgsl` file defines `dequant_chunk(row_byte, c)`: the 32 weights of columns
// 32c..32c+32 of the row starting at byte `row_byte`, widened to f32 into `wv` with ggml's
// arithmetic.

@group(0) @binding(0) var<storage, read> w: array<u32>;

var<private> wv: array<f32, 32>;

// The 4 bytes starting at byte `b` (any alignment).
fn load_u32(b: u32) -> u32 {
    let i = b >> 2u;
    let s = (b & 3u) * 8u;
    if s == 0u {
        return w[i];
    }
    return (w[i] >> s) | (w[i + 1u] << (32u - s));
}

// The 2 bytes starting at byte `b` (an even offset), in the low half.
fn load_u16(b: u32) -> u32 {
    return (w[b >> 2u] >> ((b & 2u) * 8u)) & 0xffffu;
}

// The IEEE binary16 at byte `b`, widened.
fn f16_at(b: u32) -> f32 {
    return unpack2x16float(load_u16(b)).x;
}

// Byte `k` (0..4) of `word`, zero-extended.
fn byte_of(word: u32, k: u32) -> u32 {
    return (word >> (8u * k)) & 0xffu;
}

// Byte `k` (0..4) of `word`, sign-extended.
fn sbyte_of(word: u32, k: u32) -> i32 {
    return bitcast<i32>(word << (24u - 8u * k)) >> 24u;
}
