// Flash-decoding, part 2: merges the splits of query (t, head) in split order into `att`
// ((t, n_head * head_dim)). Grid (n_head, 8), workgroup 128 (one invocation per dimension).

struct Params {
    n_head: u32,
    head_dim: u32,
    n_split: u32,
}

@group(0) @binding(0) var<storage, read> part_o: array<f32>;
@group(0) @binding(1) var<storage, read> part_ml: array<f32>;
@group(0) @binding(2) var<storage, read_write> att: array<f32>;
@group(0) @binding(3) var<storage, read> step: array<u32>;
@group(0) @binding(4) var<uniform> p: Params;

const SPLIT: u32 = 64u;  // attn_split.wgsl's

@compute @workgroup_size(128)
fn attn_merge(@builtin(local_invocation_index) d: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let head = wg.x;
    let t = wg.y;
    if t >= step[1] || d >= p.head_dim {
        return;
    }
    let last = step[0] + t;
    let used = min(last / SPLIT + 1u, p.n_split);
    let base = (t * p.n_head + head) * p.n_split;
    var m_all = -3.4028235e38;
    for (var s = 0u; s < used; s++) {
        m_all = max(m_all, part_ml[(base + s) * 2u]);
    }
    var l_all = 0.0;
    var o = 0.0;
    for (var s = 0u; s < used; s++) {
        let f = exp(part_ml[(base + s) * 2u] - m_all);
        l_all += part_ml[(base + s) * 2u + 1u] * f;
        o += part_o[(base + s) * p.head_dim + d] * f;
    }
    att[(t * p.n_head + head) * p.head_dim + d] = o / l_all;
}
