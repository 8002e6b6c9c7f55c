// Two binary16 weights in one word, widened (low half first).
fn widen(word: u32) -> vec2<f32> {
    return unpack2x16float(word);
}
