// Flash-decoding, part 1, with RoPE and the cache append. Positions are cut into fixed splits
// of SPLIT; workgroup (split, head, t) scores query (t, head) against the positions of its split
// that are causal for it (<= step[0] + t) and writes the split's max score, sum of
// exponentials and unnormalized output. Splits past the query's position write nothing.
//
// The call's tokens (positions step[0] + t') are not in the cache yet: token t's row of `qkv`
// is q | k | v, unrotated. Each workgroup rotates its query, and the keys (with the values) of
// the call's positions in its split, into workgroup memory, and reads those from there; the
// workgroup of the first query head of a key head, in the split of token t's position,
// writes token t's rotated key and its value to the cache, where no workgroup of this launch
// reads them. Rotation factors come from `rope`, a table of (cos, sin) per (position, pair)
// computed on the host exactly as the CPU reference computes them; `halves` selects Hugging
// Face's pairing (i, i + n_rot / 2) over adjacent pairs.
//
// The cache's bindings (1 and 2) and its accessors come from kv_f32.wgsl or kv_f16.wgsl, which
// the host puts before this file: k_at/v_at read four values, k_put/v_put store four, and
// kv_round rounds a value as the cache stores it, which the call's own keys and values get too
// where they are read from workgroup memory (so a position reads the same bits whichever call
// appended it).
//
// Two invocations score each cached position, each dotting half of the key with the query
// (16-byte loads, four in flight), and their halves are added in a fixed order. The workgroup
// takes the max and the sum of exponentials in fixed trees. Then each invocation sums
// weight * value for four dimensions over every (512 / head_dim)-th position of the split,
// again with four loads in flight, and the parts are added in a fixed order. head_dim is a
// multiple of 4 that divides 128. Grid (n_split, n_head, MAX_TOK), workgroup 128. (The host
// puts SPLIT and MAX_TOK first, from its ATTN_SPLIT and MAX_CHUNK, then wg_reduce.wgsl; SPLIT
// is at most 64, two invocations per position.)

struct Params {
    n_head: u32,
    n_head_kv: u32,
    head_dim: u32,
    n_split: u32,
    scale: f32,
    cache_off: u32,
    n_rot: u32,
    halves: u32,
}

@group(0) @binding(0) var<storage, read> qkv: array<f32>;
@group(0) @binding(3) var<storage, read> rope: array<vec2<f32>>;
@group(0) @binding(4) var<storage, read_write> part_o: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> part_ml: array<f32>;
@group(0) @binding(6) var<storage, read> step: array<u32>;
@group(0) @binding(7) var<uniform> p: Params;

const MAX_DIM: u32 = 128u;

var<workgroup> s_q: array<f32, 128>;
var<workgroup> s_k: array<f32, MAX_TOK * MAX_DIM>;  // the call's keys in this split, rotated [new][dim]
var<workgroup> s_v: array<f32, MAX_TOK * MAX_DIM>;  // and their values
var<workgroup> s_w: array<f32, SPLIT>;
var<workgroup> s_o: array<vec4<f32>, 128>;

// The dimensions of rotation pair i: (a, b).
fn pair(i: u32) -> vec2<u32> {
    let half_rot = p.n_rot / 2u;
    return select(vec2<u32>(2u * i, 2u * i + 1u), vec2<u32>(i, i + half_rot), p.halves != 0u);
}

// Vector j of the query, or of the call's key `i` in workgroup memory.
fn q4(j: u32) -> vec4<f32> {
    return vec4<f32>(s_q[4u * j], s_q[4u * j + 1u], s_q[4u * j + 2u], s_q[4u * j + 3u]);
}

fn new_k4(i: u32, j: u32) -> vec4<f32> {
    let at = i * MAX_DIM + 4u * j;
    return vec4<f32>(s_k[at], s_k[at + 1u], s_k[at + 2u], s_k[at + 3u]);
}

fn new_v4(i: u32, j: u32) -> vec4<f32> {
    let at = i * MAX_DIM + 4u * j;
    return vec4<f32>(s_v[at], s_v[at + 1u], s_v[at + 2u], s_v[at + 3u]);
}

@compute @workgroup_size(128)
fn attn_split(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let split = wg.x;
    let head = wg.y;
    let t = wg.z;
    let pos0 = step[0];
    let last = pos0 + t;
    let first = split * SPLIT;
    if t >= step[1] || first > last {
        return;
    }
    let count = min(last + 1u - first, SPLIT);
    let hd = p.head_dim;
    let half_rot = p.n_rot / 2u;
    let group = p.n_head / p.n_head_kv;
    let kv_head = head / group;
    let q_dim = p.n_head * hd;
    let kv_dim = p.n_head_kv * hd;
    let row = q_dim + 2u * kv_dim;
    // Positions [first, first + cached) come from the cache, the rest of the split's from
    // the call's rows (the call's tokens first .. first + count - cached - 1 of this split).
    let cached = min(count, select(pos0 - first, 0u, pos0 < first));
    let n_new = count - cached;
    let new0 = first + cached - pos0;  // the first new position's token

    // The query, rotated.
    let q = t * row + head * hd;
    for (var i = tid; i < hd; i += 128u) {
        s_q[i] = qkv[q + i];
    }
    workgroupBarrier();
    if tid < half_rot {
        let ab = pair(tid);
        let cs = rope[last * half_rot + tid];
        let x0 = qkv[q + ab.x];
        let x1 = qkv[q + ab.y];
        s_q[ab.x] = x0 * cs.x - x1 * cs.y;
        s_q[ab.y] = x0 * cs.y + x1 * cs.x;
    }
    // The call's keys (rotated) and values in this split.
    for (var e = tid; e < n_new * hd; e += 128u) {
        let i = e / hd;
        let d = e % hd;
        let src = (new0 + i) * row + q_dim + kv_head * hd;
        s_v[i * MAX_DIM + d] = kv_round(qkv[src + kv_dim + d]);
        if d >= p.n_rot {
            s_k[i * MAX_DIM + d] = kv_round(qkv[src + d]);
        }
    }
    for (var e = tid; e < n_new * half_rot; e += 128u) {
        let i = e / half_rot;
        let j = e % half_rot;
        let ab = pair(j);
        let src = (new0 + i) * row + q_dim + kv_head * hd;
        let cs = rope[(pos0 + new0 + i) * half_rot + j];
        let x0 = qkv[src + ab.x];
        let x1 = qkv[src + ab.y];
        s_k[i * MAX_DIM + ab.x] = kv_round(x0 * cs.x - x1 * cs.y);
        s_k[i * MAX_DIM + ab.y] = kv_round(x0 * cs.y + x1 * cs.x);
    }
    workgroupBarrier();
    // Vectors of four: the head's, and a cache row's.
    let hv = hd / 4u;
    let kv_row = p.n_head_kv * hv;
    let kv_off = p.cache_off / 4u + kv_head * hv;
    // The append: token t's key and value, by one workgroup.
    if head % group == 0u && last / SPLIT == split && tid < hv {
        let i = last - first - cached;
        let dst = kv_off + last * kv_row + tid;
        k_put(dst, new_k4(i, tid));
        v_put(dst, new_v4(i, tid));
    }

    // Scores: invocations 2i and 2i + 1 take the two halves of position first + i's key.
    let i = tid / 2u;
    let half = hv / 2u;
    let j0 = (tid % 2u) * half;
    // An odd vector count: the second half takes the last one.
    let j1 = select(j0 + half, hv, hv % 2u == 1u && tid % 2u == 1u);
    var sum = 0.0;
    if i < cached {
        let k = kv_off + (first + i) * kv_row;
        var j = j0;
        for (; j + 4u <= j1; j += 4u) {
            let a = k_at(k + j);
            let b = k_at(k + j + 1u);
            let c = k_at(k + j + 2u);
            let d = k_at(k + j + 3u);
            sum += dot(a, q4(j)) + dot(b, q4(j + 1u)) + dot(c, q4(j + 2u)) + dot(d, q4(j + 3u));
        }
        for (; j < j1; j++) {
            sum += dot(k_at(k + j), q4(j));
        }
    } else if i < count {
        for (var j = j0; j < j1; j++) {
            sum += dot(new_k4(i - cached, j), q4(j));
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
    for (; pos + 3u * parts < cached; pos += 4u * parts) {
        let a = v_at(v + pos * kv_row);
        let b = v_at(v + (pos + parts) * kv_row);
        let c = v_at(v + (pos + 2u * parts) * kv_row);
        let d = v_at(v + (pos + 3u * parts) * kv_row);
        acc += s_w[pos] * a + s_w[pos + parts] * b + s_w[pos + 2u * parts] * c + s_w[pos + 3u * parts] * d;
    }
    for (; pos < cached; pos += parts) {
        acc += s_w[pos] * v_at(v + pos * kv_row);
    }
    for (; pos < count; pos += parts) {
        acc += s_w[pos] * new_v4(pos - cached, g);
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
