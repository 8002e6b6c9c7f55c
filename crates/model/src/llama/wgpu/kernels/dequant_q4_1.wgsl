// Q4_1 blocks (20 bytes): {f16 d; f16 m; u8 qs[16]}, w = q * d + m; nibbles as in Q4_0.
// One block per chunk.
fn dequant_chunk(row_byte: u32, c: u32) {
    let b = row_byte + c * 20u;
    let dm = unpack2x16float(load_u32(b));
    for (var i = 0u; i < 4u; i++) {
        let word = load_u32(b + 4u + 4u * i);
        for (var k = 0u; k < 4u; k++) {
            let q = byte_of(word, k);
            wv[4u * i + k] = f32(q & 15u) * dm.x + dm.y;
            wv[16u + 4u * i + k] = f32(q >> 4u) * dm.x + dm.y;
        }
    }
}
