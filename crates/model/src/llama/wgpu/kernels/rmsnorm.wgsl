// out[t] = x[t] / rms(x[t]) * weight for the call's tokens; with `last_only`, only the last
// token's row, written as row 0 (the output head's input). The sum of squares runs in a fixed order: strided per invocation, then a
// fixed tree. Grid (8), workgroup 256; workgroups past the token count return at once.

struct Params {
    width: u32,
    last_only: u32,
    eps: f32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> weight: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> step: array<u32>;
@group(0) @binding(4) var<uniform> p: Params;

var<workgroup> sums: array<f32, 256>;

@compute @workgroup_size(256)
fn rmsnorm(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let n = select(step[1], 1u, p.last_only != 0u);
    let t = wg.x;
    if t >= n {
        return;
    }
    let xr = select(t, step[1] - 1u, p.last_only != 0u) * p.width;
    var s = 0.0;
    for (var i = tid; i < p.width; i += 256u) {
        s += x[xr + i] * x[xr + i];
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
    for (var i = tid; i < p.width; i += 256u) {
        out[t * p.width + i] = x[xr + i] * scale * weight[i];
    }
}
