// Q6_K super-blocks (210 bytes, 256 weights): {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}.
// Chunk c is quarter k = c % 4 of half h = (c / 4) % 2 of block c / 8: element l (0..32) is
// 4 bits of ql[64h + 32(k % 2) + l] (low nibble for k < 2, high for k >= 2) and 2 bits of
// qh[32h + l] (bits 2k..2k+2); w = (d * scales[8h + l / 16 + 2k]) * (q - 32).
fn dequant_chunk(row_byte: u32, c: u32) {
    let b = row_byte + (c / 8u) * 210u;
    let h = (c / 4u) % 2u;
    let k = c % 4u;
    let d = f16_at(b + 208u);
    let ql = b + 64u * h + 32u * (k % 2u);
    let qh = b + 128u + 32u * h;
    let ql_shift = 4u * (k / 2u);
    let qh_shift = 2u * k;
    let scales = load_u32(b + 192u + 8u * h + 2u * k);
    let dl0 = d * f32(sbyte_of(scales, 0u));
    let dl1 = d * f32(sbyte_of(scales, 1u));
    for (var i = 0u; i < 8u; i++) {
        let lo = load_u32(ql + 4u * i);
        let hi = load_u32(qh + 4u * i);
        let dl = select(dl1, dl0, i < 4u);
        for (var e = 0u; e < 4u; e++) {
            let q = ((byte_of(lo, e) >> ql_shift) & 15u) | (((byte_of(hi, e) >> qh_shift) & 3u) << 4u);
            wv[4u * i + e] = dl * f32(i32(q) - 32);
        }
    }
}
