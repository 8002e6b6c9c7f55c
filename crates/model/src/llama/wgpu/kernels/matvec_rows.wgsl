// What matvec.wgsl and matvec_wide.wgsl share (they declare the weights and x): the
// parameters, the bindings after x, which rows a workgroup takes and how it stores their sums.
//
// Plainly, rows 8 wg .. 8 wg + 7, one per 32 lanes, each written (or added, with
// `residual`) to y. With `parts` > 1 (a short matrix, whose rows alone leave too few lanes
// reading), each row is split between `parts` consecutive groups of 32 lanes: rows
// (8 / parts) wg + .., each group an equal run of the row's 32-unit steps (the last one the
// rest), and the row's sum is its parts' sums added in part order, so the result depends only
// on the row's length, never on timing. With `glu` = n_ff (and one part), the matrix is the MLP's gate rows (0 .. n_ff) stacked
// on its up rows (n_ff .. 2 n_ff): the first four row groups take gate rows 4 wg .. 4 wg + 3
// and the last four the matching up rows, and the workgroup writes silu(gate) * up for its
// four outputs (the swiglu kernel's arithmetic): one launch and one pass over memory fewer.

struct Params {
    rows: u32,
    cols: u32,
    row_bytes: u32,
    x_off: u32,
    x_stride: u32,
    y_off: u32,
    y_stride: u32,
    residual: u32,
    glu: u32,
    parts: u32,
}

@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> step: array<u32>;
@group(0) @binding(4) var<uniform> p: Params;

const ROWS: u32 = 8u;
const LANES: u32 = 32u;
// MAX_TOK, the most tokens one call takes (at most MAX_CHUNK), is set by the host before these parts:
// 1 for a decode step, whose single accumulator leaves the registers to loads in flight.

// The call's token count: the step's, up to MAX_TOK.
fn token_count() -> u32 {
    return min(step[1], MAX_TOK);
}

var<workgroup> group_sums: array<array<f32, MAX_TOK>, 8>;  // [group of 32 lanes][token]

fn parts() -> u32 {
    return max(p.parts, 1u);
}

// The row of the 32 lanes `tid` belongs to (p.rows: none).
fn matvec_row(tid: u32, wg: u32) -> u32 {
    let k = tid / LANES;
    if p.glu == 0u {
        return wg * (ROWS / parts()) + k / parts();
    }
    let j = wg * 4u + k % 4u;
    if j >= p.glu {
        return p.rows;
    }
    return select(j, p.glu + j, k >= 4u);
}

// The units (of a row's `units`, taken 32 at a time by the lanes) that the 32 lanes `tid`
// belongs to read: [x, y).
fn part_range(tid: u32, units: u32) -> vec2<u32> {
    let part = (tid / LANES) % parts();
    let steps = (units + LANES - 1u) / LANES;
    let per = (steps + parts() - 1u) / parts() * LANES;
    let first = min(part * per, units);
    return vec2<u32>(first, min(first + per, units));
}

// Writes (or adds, with `residual`) token t's sum of row r.
fn store(r: u32, t: u32, total: f32) {
    let at = p.y_off + t * p.y_stride + r;
    var base = 0.0;
    if p.residual != 0u {
        base = y[at];
    }
    y[at] = base + total;
}

// Sums each token's 32 lane sums of each row (a fixed tree, reduce_*.wgsl), gathers the
// workgroup's results in workgroup memory, and stores them from adjacent invocations, so
// that each token's results leave in one run of adjacent words: the output head's often
// go straight to host memory (an actor's buffer), where scattered 4-byte stores would each
// cross the bus on their own. Every invocation must call it.
fn store_rows(acc: ptr<function, array<f32, MAX_TOK>>, n: u32, tid: u32, wg: u32) {
    let lane = tid % LANES;
    let k = tid / LANES;
    for (var t = 0u; t < MAX_TOK; t++) {
        if t >= n {
            break;
        }
        let total = row_sum((*acc)[t], tid);
        if lane == 0u {
            group_sums[k][t] = total;
        }
    }
    workgroupBarrier();
    if p.glu != 0u {
        // Invocation 4t + i: output 4 wg + i of token t, from gate group i and up group 4 + i.
        let t = tid / 4u;
        let i = tid % 4u;
        let j = wg * 4u + i;
        if t < n && j < p.glu {
            let g = group_sums[i][t];
            let u = group_sums[i + 4u][t];
            y[p.y_off + t * p.y_stride + j] = g / (1.0 + exp(-g)) * u;
        }
    } else {
        // Invocation `per` t + i: row i of the workgroup's `per` rows for token t, its parts'
        // sums added in part order.
        let per = ROWS / parts();
        let t = tid / per;
        let i = tid % per;
        let row = wg * per + i;
        if t < n && row < p.rows {
            var total = 0.0;
            for (var q = 0u; q < parts(); q++) {
                total += group_sums[i * parts() + q][t];
            }
            store(row, t, total);
        }
    }
}
