// Flash-decoding, part 1. Positions are cut into fixed splits of 64; workgroup
// (split, head, t) scores query (t, head) against the positions of its split that are causal
// for it (<= step[0] + t) and writes the split's max score, sum of exponentials and
// unnormalized output. Splits past the query's position write nothing.
//
// Two invocations score each position, each dotting half of the key with the query (16-byte
// loads, four in flight), and their halves are added in a fixed order. The workgroup takes the
// max and the sum of exponentials in fixed trees. Then each invocation sums weight * value
// for four dimensions over every (512 / head_dim)-th position of the split, again with four
// loads in flight, and the parts are added in a fixed order. head_dim is a multiple of 4 that
// divides 128. Grid (n_split, n_head, 8), workgroup 128.

struct Params {
    n_head: u32,
    n_head_kv: u32,
    head_dim: u32,
    n_split: u32,
    scale: f32,
    cache_off: u32,
}

@group(0) @binding(0) var<storage, read> qkv: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> k_cache: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> v_cache: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> part_o: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> part_ml: array<f32>;
@group(0) @binding(5) var<storage, read> step: array<u32>;
@group(0) @binding(6) var<uniform> p: Params;

const SPLIT: u32 = 64u;

var<workgroup> s_q: array<vec4<f32>, 32>;
var<workgroup> s_w: array<f32, 64>;
var<workgroup> s_red: array<f32, 128>;
var<workgroup> s_o: array<vec4<f32>, 128>;

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
    // Vectors of four: the head's, and a cache row's.
    let hv = p.head_dim / 4u;
    let kv_row = p.n_head_kv * hv;
    let q_row = p.n_head * hv + 2u * kv_row;
    let kv_off = p.cache_off / 4u + (head / (p.n_head / p.n_head_kv)) * hv;
    if tid < hv {
        s_q[tid] = qkv[t * q_row + head * hv + tid];
    }
    workgroupBarrier();

    // Scores: invocations 2i and 2i + 1 take the two halves of position first + i's key.
    let i = tid / 2u;
    let half = hv / 2u;
    let j0 = (tid % 2u) * half;
    var sum = 0.0;
    if i < count {
        let k = kv_off + (first + i) * kv_row + j0;
        var j = 0u;
        for (; j + 4u <= half; j += 4u) {
            let a = k_cache[k + j];
            let b = k_cache[k + j + 1u];
            let c = k_cache[k + j + 2u];
            let d = k_cache[k + j + 3u];
            sum += dot(a, s_q[j0 + j]) + dot(b, s_q[j0 + j + 1u]) + dot(c, s_q[j0 + j + 2u]) + dot(d, s_q[j0 + j + 3u]);
        }
        for (; j < half; j++) {
            sum += dot(k_cache[k + j], s_q[j0 + j]);
        }
        // An odd vector count: the second half takes the last one.
        if hv % 2u == 1u && tid % 2u == 1u {
            sum += dot(k_cache[k + hv - 1u], s_q[hv - 1u]);
        }
    }
    s_red[tid] = sum;
    workgroupBarrier();
    var score = -3.4028235e38;
    if tid < count {
        score = (s_red[2u * tid] + s_red[2u * tid + 1u]) * p.scale;
    }
    workgroupBarrier();
    let m = wg_max(score, tid);
    var e = 0.0;
    if tid < count {
        e = exp(score - m);
    }
    if tid < SPLIT {
        s_w[tid] = e;
    }
    let l = wg_sum(e, tid);

    // Values: invocation tid sums dimensions 4g .. 4g + 3 over positions part, part + parts, ...
    let parts = 128u / hv;
    let g = tid % hv;
    let part = tid / hv;
    var acc = vec4<f32>(0.0);
    let v = kv_off + first * kv_row + g;
    var pos = part;
    for (; pos + 3u * parts < count; pos += 4u * parts) {
        let a = v_cache[v + pos * kv_row];
        let b = v_cache[v + (pos + parts) * kv_row];
        let c = v_cache[v + (pos + 2u * parts) * kv_row];
        let d = v_cache[v + (pos + 3u * parts) * kv_row];
        acc += s_w[pos] * a + s_w[pos + parts] * b + s_w[pos + 2u * parts] * c + s_w[pos + 3u * parts] * d;
    }
    for (; pos < count; pos += parts) {
        acc += s_w[pos] * v_cache[v + pos * kv_row];
    }
    s_o[tid] = acc;
    workgroupBarrier();
    let slot = (t * p.n_head + head) * p.n_split + split;
    if tid < hv {
        var o = vec4<f32>(0.0);
        for (var k = 0u; k < parts; k++) {
            o += s_o[k * hv + tid];
        }
        part_o[slot * hv + tid] = o;
    }
    if tid == 0u {
        part_ml[slot * 2u] = m;
        part_ml[slot * 2u + 1u] = l;
    }
}
