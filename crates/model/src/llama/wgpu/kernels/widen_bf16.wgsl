// Two bfloat16 weights in one word (the high halves of f32s), widened (low half first).
fn widen(word: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(word << 16u), bitcast<f32>(word & 0xffff0000u));
}
