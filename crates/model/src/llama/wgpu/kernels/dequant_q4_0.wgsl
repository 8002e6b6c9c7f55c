// Q4_0 blocks (18 bytes): {f16 d; u8 qs[16]}, w = (q - 8) * d; low nibbles are elements
// 0..16, high nibbles 16..32. One block per chunk.
fn dequant_chunk(row_byte: u32, c: u32) {
    let b = row_byte + c * 18u;
    let d = f16_at(b);
    for (var i = 0u; i < 4u; i++) {
        let word = load_u32(b + 2u + 4u * i);
        for (var k = 0u; k < 4u; k++) {
            let q = byte_of(word, k);
            wv[4u * i + k] = f32(i32(q & 15u) - 8) * d;
            wv[16u + 4u * i + k] = f32(i32(q >> 4u) - 8) * d;
        }
    }
}
