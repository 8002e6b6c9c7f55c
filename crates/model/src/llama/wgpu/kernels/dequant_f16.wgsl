// F16 rows: 32 binary16 values, two per word.
fn dequant_chunk(row_byte: u32, c: u32) {
    let b = row_byte + c * 64u;
    for (var i = 0u; i < 16u; i++) {
        let pair = unpack2x16float(load_u32(b + 4u * i));
        wv[2u * i] = pair.x;
        wv[2u * i + 1u] = pair.y;
    }
}
