// out[t][i] = silu(gate[t][i]) * up[t][i] for i < n_ff, where token t's row of `gate_up` is
// gate | up (2 * n_ff floats). Grid (ceil(n_ff / 256), 8).

struct Params {
    n_ff: u32,
}

@group(0) @binding(0) var<storage, read> gate_up: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> step: array<u32>;
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(256)
fn swiglu(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    let t = gid.y;
    if t >= step[1] || i >= p.n_ff {
        return;
    }
    let g = gate_up[t * 2u * p.n_ff + i];
    let u = gate_up[t * 2u * p.n_ff + p.n_ff + i];
    out[t * p.n_ff + i] = g / (1.0 + exp(-g)) * u;
}
