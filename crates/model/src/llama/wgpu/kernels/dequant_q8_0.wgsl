// Q8_0 blocks (34 bytes): {f16 d; i8 qs[32]}, w = qs * d. One block per chunk.
fn dequant_chunk(row_byte: u32, c: u32) {
    let b = row_byte + c * 34u;
    let d = f16_at(b);
    for (var i = 0u; i < 8u; i++) {
        let word = load_u32(b + 2u + 4u * i);
        for (var k = 0u; k < 4u; k++) {
            wv[4u * i + k] = f32(sbyte_of(word, k)) * d;
        }
    }
}
