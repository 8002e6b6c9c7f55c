// Flash-decoding, part 1. Positions are cut into fixed splits of 128; workgroup
// (split, head, t) scores query (t, head) against the positions of its split that are causal
// for it (<= step[0] + t) and writes the split's max score, sum of exponentials and
// unnormalized output. Splits past the query's position write nothing.
//
// Invocation i scores position first + i; the workgroup takes the max and the sum of
// exponentials in fixed trees; then each output dimension sums weight * value over the
// split's positions in position order, dealt to 128 / head_dim invocations whose partial
// sums are added in a fixed order. head_dim <= 128 and divides 128.
// Grid (n_split, n_head, 8), workgroup 128.

struct Params {
    n_head: u32,
    n_head_kv: u32,
    head_dim: u32,
    n_split: u32,
    scale: f32,
    cache_off: u32,
}

@group(0) @binding(0) var<storage, read> qkv: array<f32>;
@group(0) @binding(1) var<storage, read> k_cache: array<f32>;
@group(0) @binding(2) var<storage, read> v_cache: array<f32>;
@group(0) @binding(3) var<storage, read_write> part_o: array<f32>;
@group(0) @binding(4) var<storage, read_write> part_ml: array<f32>;
@group(0) @binding(5) var<storage, read> step: array<u32>;
@group(0) @binding(6) var<uniform> p: Params;

const SPLIT: u32 = 128u;

var<workgroup> s_q: array<f32, 128>;
var<workgroup> s_w: array<f32, 128>;
var<workgroup> s_red: array<f32, 128>;

// Max over the workgroup, in a fixed tree. Every invocation must call it.
fn wg_max(v: f32, tid: u32) -> f32 {
    s_red[tid] = v;
    workgroupBarrier();
    for (var k = 64u; k > 0u; k >>= 1u) {
        if tid < k {
            s_red[tid] = max(s_red[tid], s_red[tid + k]);
        }
        workgroupBarrier();
    }
    let m = s_red[0];
    workgroupBarrier();
    return m;
}

// Sum over the workgroup, in a fixed tree. Every invocation must call it.
fn wg_sum(v: f32, tid: u32) -> f32 {
    s_red[tid] = v;
    workgroupBarrier();
    for (var k = 64u; k > 0u; k >>= 1u) {
        if tid < k {
            s_red[tid] += s_red[tid + k];
        }
        workgroupBarrier();
    }
    let s = s_red[0];
    workgroupBarrier();
    return s;
}

@compute @workgroup_size(128)
fn attn_split(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let split = wg.x;
    let head = wg.y;
    let t = wg.z;
    let last = step[0] + t;
    let first = split * SPLIT;
    if t >= step[1] || first > last {
        return;
    }
    let count = min(last + 1u - first, SPLIT);
    let kv_dim = p.n_head_kv * p.head_dim;
    let q_dim = p.n_head * p.head_dim;
    let kv_off = (head / (p.n_head / p.n_head_kv)) * p.head_dim;
    let q = t * (q_dim + 2u * kv_dim) + head * p.head_dim;
    if tid < p.head_dim {
        s_q[tid] = qkv[q + tid];
    }
    workgroupBarrier();

    var score = -3.4028235e38;
    if tid < count {
        let k = p.cache_off + (first + tid) * kv_dim + kv_off;
        var dot = 0.0;
        for (var j = 0u; j < p.head_dim; j++) {
            dot += k_cache[k + j] * s_q[j];
        }
        score = dot * p.scale;
    }
    let m = wg_max(score, tid);
    var e = 0.0;
    if tid < count {
        e = exp(score - m);
    }
    s_w[tid] = e;
    let l = wg_sum(e, tid);

    let lanes = SPLIT / p.head_dim;
    let d = tid % p.head_dim;
    let part = tid / p.head_dim;
    var acc = 0.0;
    let v = p.cache_off + first * kv_dim + kv_off + d;
    for (var i = part; i < count; i += lanes) {
        acc += s_w[i] * v_cache[v + i * kv_dim];
    }
    s_red[tid] = acc;
    workgroupBarrier();
    let slot = (t * p.n_head + head) * p.n_split + split;
    if tid < p.head_dim {
        var o = 0.0;
        for (var i = 0u; i < lanes; i++) {
            o += s_red[i * p.head_dim + tid];
        }
        part_o[slot * p.head_dim + tid] = o;
    }
    if tid == 0u {
        part_ml[slot * 2u] = m;
        part_ml[slot * 2u + 1u] = l;
    }
}
