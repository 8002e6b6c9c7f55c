// out[t] = x[t] / rms(x[t]) * weight for the call's tokens; with `last_only`, only the last
// token's row, written as row 0 (the output head's input). Rows are read as vectors of four
// (the width is a multiple of 4); each invocation keeps up to four of its vectors in
// registers between the sum and the scaling, so that rows of up to 4,096 are read once. The
// sum of squares runs in a fixed order: strided per invocation, then a fixed tree.
// Grid (8), workgroup 256; workgroups past the token count return at once.

struct Params {
    width: u32,
    last_only: u32,
    eps: f32,
}

@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> weight: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> step: array<u32>;
@group(0) @binding(4) var<uniform> p: Params;

const KEPT: u32 = 4u;

var<workgroup> sums: array<f32, 256>;

@compute @workgroup_size(256)
fn rmsnorm(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let n = select(step[1], 1u, p.last_only != 0u);
    let t = wg.x;
    if t >= n {
        return;
    }
    let w4 = p.width / 4u;
    let xr = select(t, step[1] - 1u, p.last_only != 0u) * w4;
    var kept: array<vec4<f32>, 4>;
    var s = 0.0;
    for (var k = 0u; k < KEPT; k++) {
        let i = tid + 256u * k;
        if i < w4 {
            kept[k] = x[xr + i];
            s += dot(kept[k], kept[k]);
        }
    }
    for (var i = tid + 256u * KEPT; i < w4; i += 256u) {
        let v = x[xr + i];
        s += dot(v, v);
    }
    sums[tid] = s;
    workgroupBarrier();
    for (var k = 128u; k > 0u; k >>= 1u) {
        if tid < k {
            sums[tid] += sums[tid + k];
        }
        workgroupBarrier();
    }
    let scale = 1.0 / sqrt(sums[0] / f32(p.width) + p.eps);
    for (var k = 0u; k < KEPT; k++) {
        let i = tid + 256u * k;
        if i < w4 {
            out[t * w4 + i] = kept[k] * scale * weight[i];
        }
    }
    for (var i = tid + 256u * KEPT; i < w4; i += 256u) {
        out[t * w4 + i] = x[xr + i] * scale * weight[i];
    }
}
