// y[t] = (residual ? y[t] : 0) + W x[t] for the n tokens of this call (n <= MAX_TOK), W in its
// block format (blocks.wgsl plus one dequant_*.wgsl). Workgroup 256 = 8 rows of 32 lanes;
// lane l of a row dequantizes chunks l, l + 32, ... (32 weights each) once and dots them with
// every token, so each weight is read once per call. Each lane's sums run in column order;
// the 32 lanes are then summed in a fixed tree (reduce_*.wgsl), so results are reproducible.
// Grid (ceil(rows * parts / 8)), or (ceil(glu / 4)) with `glu` (matvec_rows.wgsl).
//
// `step` is [first position, token count, token ids]; a call takes at most MAX_TOK of them
// (the output head is built for one). matvec_rows.wgsl declares the parameters and the
// bindings after x.

@group(0) @binding(1) var<storage, read> x: array<f32>;

@compute @workgroup_size(256)
fn matvec(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let r = matvec_row(tid, wg.x);
    let lane = tid % LANES;
    let n = token_count();
    var acc: array<f32, MAX_TOK>;
    if r < p.rows {
        let row_byte = r * p.row_bytes;
        let range = part_range(tid, p.cols / 32u);
        for (var c = range.x + lane; c < range.y; c += LANES) {
            dequant_chunk(row_byte, c);
            for (var t = 0u; t < n; t++) {
                let xb = p.x_off + t * p.x_stride + 32u * c;
                var s = 0.0;
                for (var i = 0u; i < 32u; i++) {
                    s += wv[i] * x[xb + i];
                }
                acc[t] += s;
            }
        }
    }
    store_rows(&acc, n, tid, wg.x);
}
