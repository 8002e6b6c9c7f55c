// Flash-decoding, part 2: merges the splits of query (t, head) into `att`
// ((t, n_head * head_dim)). The workgroup takes the splits' max and their sums of
// exponentials, rescaled, in fixed trees (wg_reduce.wgsl comes first); then invocation tid
// sums four dimensions of the rescaled outputs over every (512 / head_dim)-th split, and the
// parts are added in a fixed order. Grid (n_head, MAX_TOK), workgroup 128. The host puts SPLIT
// (attn_split.wgsl's) and MAX_TOK first.

struct Params {
    n_head: u32,
    head_dim: u32,
    n_split: u32,
}

@group(0) @binding(0) var<storage, read> part_o: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> part_ml: array<f32>;
@group(0) @binding(2) var<storage, read_write> att: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> step: array<u32>;
@group(0) @binding(4) var<uniform> p: Params;

var<workgroup> s_f: array<f32, 128>;
var<workgroup> s_o: array<vec4<f32>, 128>;

@compute @workgroup_size(128)
fn attn_merge(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let head = wg.x;
    let t = wg.y;
    if t >= step[1] {
        return;
    }
    let last = step[0] + t;
    let used = min(last / SPLIT + 1u, p.n_split);
    let base = (t * p.n_head + head) * p.n_split;
    var m = -3.4028235e38;
    for (var s = tid; s < used; s += 128u) {
        m = max(m, part_ml[(base + s) * 2u]);
    }
    let m_all = wg_max(m, tid);
    var l = 0.0;
    for (var s = tid; s < used; s += 128u) {
        l += part_ml[(base + s) * 2u + 1u] * exp(part_ml[(base + s) * 2u] - m_all);
    }
    let l_all = wg_sum(l, tid);

    let hv = p.head_dim / 4u;
    let parts = 128u / hv;
    let g = tid % hv;
    let part = tid / hv;
    var o = vec4<f32>(0.0);
    // The splits 128 at a time: their factors in workgroup memory, then the sums.
    for (var c = 0u; c < used; c += 128u) {
        if c + tid < used {
            s_f[tid] = exp(part_ml[(base + c + tid) * 2u] - m_all);
        }
        workgroupBarrier();
        let n = min(used - c, 128u);
        for (var k = part; k < n; k += parts) {
            o += part_o[(base + c + k) * hv + g] * s_f[k];
        }
        workgroupBarrier();
    }
    s_o[tid] = o;
    workgroupBarrier();
    if tid < hv {
        var sum = vec4<f32>(0.0);
        for (var k = 0u; k < parts; k++) {
            sum += s_o[k * hv + tid];
        }
        att[(t * p.n_head + head) * hv + tid] = sum / l_all;
    }
}
