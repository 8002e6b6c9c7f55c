// out[t] = row ids[t] of W, dequantized, for the n tokens whose ids are in `step`
// ([first position, token count, token ids]). Invocation i of workgroup (g, t) widens chunk
// 64g + i (32 columns). Grid (ceil(cols / 32 / 64), 8).

struct Params {
    cols: u32,
    row_bytes: u32,
}

@group(0) @binding(1) var<storage, read> step: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(64)
fn get_rows(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let t = gid.y;
    if t >= step[1] || c >= p.cols / 32u {
        return;
    }
    dequant_chunk(step[2u + t] * p.row_bytes, c);
    for (var i = 0u; i < 32u; i++) {
        out[t * p.cols + 32u * c + i] = wv[i];
    }
}
