// Rotates the query heads in place and the new key heads, and appends keys and values to the
// layer's cache at positions step[0] + t. Token t's row of `qkv` is q | k | v
// (n_head * head_dim + 2 * kv_dim floats). Rotation factors come from `rope`, a table of
// (cos, sin) per (position, pair) computed on the host exactly as the CPU reference computes
// them. `halves` selects Hugging Face's pairing (i, i + n_rot / 2) over adjacent pairs.
// Grid (8, n_head + n_head_kv), workgroup 64.

struct Params {
    n_head: u32,
    n_head_kv: u32,
    head_dim: u32,
    n_rot: u32,
    halves: u32,
    cache_off: u32,
}

@group(0) @binding(0) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(1) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(2) var<storage, read_write> v_cache: array<f32>;
@group(0) @binding(3) var<storage, read> rope: array<vec2<f32>>;
@group(0) @binding(4) var<storage, read> step: array<u32>;
@group(0) @binding(5) var<uniform> p: Params;

@compute @workgroup_size(64)
fn rope_append(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let t = wg.x;
    let head = wg.y;
    if t >= step[1] {
        return;
    }
    let pos = step[0] + t;
    let q_dim = p.n_head * p.head_dim;
    let kv_dim = p.n_head_kv * p.head_dim;
    let row = t * (q_dim + 2u * kv_dim);
    let half_rot = p.n_rot / 2u;
    if head < p.n_head {
        let q = row + head * p.head_dim;
        for (var i = tid; i < half_rot; i += 64u) {
            let a = select(2u * i, i, p.halves != 0u);
            let b = select(2u * i + 1u, i + half_rot, p.halves != 0u);
            let cs = rope[pos * half_rot + i];
            let x0 = qkv[q + a];
            let x1 = qkv[q + b];
            qkv[q + a] = x0 * cs.x - x1 * cs.y;
            qkv[q + b] = x0 * cs.y + x1 * cs.x;
        }
        return;
    }
    let kv_head = head - p.n_head;
    let k = row + q_dim + kv_head * p.head_dim;
    let v = k + kv_dim;
    let dst = p.cache_off + pos * kv_dim + kv_head * p.head_dim;
    for (var i = tid; i < p.head_dim; i += 64u) {
        v_cache[dst + i] = qkv[v + i];
        if i >= p.n_rot {
            k_cache[dst + i] = qkv[k + i];
        }
    }
    for (var i = tid; i < half_rot; i += 64u) {
        let a = select(2u * i, i, p.halves != 0u);
        let b = select(2u * i + 1u, i + half_rot, p.halves != 0u);
        let cs = rope[pos * half_rot + i];
        let x0 = qkv[k + a];
        let x1 = qkv[k + b];
        k_cache[dst + a] = x0 * cs.x - x1 * cs.y;
        k_cache[dst + b] = x0 * cs.y + x1 * cs.x;
    }
}
