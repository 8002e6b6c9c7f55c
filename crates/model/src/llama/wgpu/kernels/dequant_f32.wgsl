// F32 rows: 32 floats of 4 bytes per chunk.
fn dequant_chunk(row_byte: u32, c: u32) {
    let b = row_byte + c * 128u;
    for (var i = 0u; i < 32u; i++) {
        wv[i] = bitcast<f32>(load_u32(b + 4u * i));
    }
}
