// y[t] = (residual ? y[t] : 0) + W x[t] for the n tokens of this call (n <= MAX_TOK), for 16-bit
// float weights (F16, BF16: `widen` comes from widen_*.wgsl). Each lane reads 16 bytes (8
// weights) at a time and consecutive lanes read consecutive 16-byte words, so a row group's
// loads are coalesced and wide; the activations are read as vec4. Workgroup 256 = 8 rows of
// 32 lanes; each lane's sums run in column order, then the 32 lanes are summed in a fixed
// tree (reduce_*.wgsl), so results are reproducible. Rows are 16-byte aligned (cols is a
// multiple of 32) and the activations' offset and stride are multiples of 4.
// Grid (ceil(rows * parts / 8)), or (ceil(glu / 4)) with `glu` (matvec_rows.wgsl).
//
// `step` is [first position, token count, token ids]; a call takes at most MAX_TOK of them
// (matvec_rows.wgsl declares the parameters and the bindings after x).

@group(0) @binding(0) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;

// acc[t] += the dot of weight word `v` (8 weights) with token t's matching activations.
fn add_word(acc: ptr<function, array<f32, MAX_TOK>>, q: vec4<u32>, v: u32, n: u32) {
    let w0 = vec4<f32>(widen(q.x), widen(q.y));
    let w1 = vec4<f32>(widen(q.z), widen(q.w));
    // A fixed trip count, so the accumulators stay in registers.
    for (var t = 0u; t < MAX_TOK; t++) {
        if t < n {
            let xv = (p.x_off + t * p.x_stride) / 4u + 2u * v;
            (*acc)[t] += dot(w0, x[xv]) + dot(w1, x[xv + 1u]);
        }
    }
}

@compute @workgroup_size(256)
fn matvec(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let r = matvec_row(tid, wg.x);
    let lane = tid % LANES;
    let n = token_count();
    var acc: array<f32, MAX_TOK>;
    if r < p.rows {
        let row = r * (p.row_bytes / 16u);
        let range = part_range(tid, p.cols / 8u);
        let words = range.y;
        var v = range.x + lane;
        // Four 16-byte loads in flight per lane before any is used: one at a time leaves
        // the memory's latency exposed. The sums still run in column order.
        for (; v + 3u * LANES < words; v += 4u * LANES) {
            let q0 = w[row + v];
            let q1 = w[row + v + LANES];
            let q2 = w[row + v + 2u * LANES];
            let q3 = w[row + v + 3u * LANES];
            add_word(&acc, q0, v, n);
            add_word(&acc, q1, v + LANES, n);
            add_word(&acc, q2, v + 2u * LANES, n);
            add_word(&acc, q3, v + 3u * LANES, n);
        }
        for (; v < words; v += LANES) {
            add_word(&acc, w[row + v], v, n);
        }
    }
    store_rows(&acc, n, tid, wg.x);
}
