// BF16 rows: 32 bfloat16 values (the high halves of f32s), two per word.
fn dequant_chunk(row_byte: u32, c: u32) {
    let b = row_byte + c * 64u;
    for (var i = 0u; i < 16u; i++) {
        let word = load_u32(b + 4u * i);
        wv[2u * i] = bitcast<f32>(word << 16u);
        wv[2u * i + 1u] = bitcast<f32>(word & 0xffff0000u);
    }
}
