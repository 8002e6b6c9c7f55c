// Q4_K super-blocks (144 bytes, 256 weights): {f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}.
// Chunk c is sub-block j = c % 8 of block c / 8: w = (d * sc) * q - (dmin * m), with the
// 6-bit scale and min of `get_scale_min_k4`; group g = j / 2 reads qs[32g..32g+32], low
// nibbles for even j, high for odd.

// Byte `k` (0..12) of the block's packed scales at byte `s`.
fn scale_byte(s: u32, k: u32) -> u32 {
    return byte_of(load_u32(s + (k & ~3u)), k & 3u);
}

fn dequant_chunk(row_byte: u32, c: u32) {
    let b = row_byte + (c / 8u) * 144u;
    let j = c % 8u;
    let dm = unpack2x16float(load_u32(b));
    let s = b + 4u;
    var sc: u32;
    var m: u32;
    if j < 4u {
        sc = scale_byte(s, j) & 63u;
        m = scale_byte(s, j + 4u) & 63u;
    } else {
        sc = (scale_byte(s, j + 4u) & 15u) | ((scale_byte(s, j - 4u) >> 6u) << 4u);
        m = (scale_byte(s, j + 4u) >> 4u) | ((scale_byte(s, j) >> 6u) << 4u);
    }
    let d1 = dm.x * f32(sc);
    let m1 = dm.y * f32(m);
    let q = b + 16u + 32u * (j / 2u);
    let shift = 4u * (j % 2u);
    for (var i = 0u; i < 8u; i++) {
        let word = load_u32(q + 4u * i);
        for (var k = 0u; k < 4u; k++) {
            wv[4u * i + k] = d1 * f32((byte_of(word, k) >> shift) & 15u) - m1;
        }
    }
}
