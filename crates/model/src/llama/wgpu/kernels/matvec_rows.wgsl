// What matvec.wgsl and matvec_wide.wgsl share (they declare the weights and x): the
// parameters, the bindings after x, which rows a workgroup takes and how it stores their sums.
//
// Plainly, rows 8 wg .. 8 wg + 7, one per 32 lanes, each written (or added, with
// `residual`) to y. With `glu` = n_ff, the matrix is the MLP's gate rows (0 .. n_ff) stacked
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
    n_fixed: u32,
    glu: u32,
}

@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> step: array<u32>;
@group(0) @binding(4) var<uniform> p: Params;

const ROWS: u32 = 8u;
const LANES: u32 = 32u;
const MAX_TOK: u32 = 8u;

// The call's token count: the step's, or `n_fixed`.
fn token_count() -> u32 {
    return min(select(step[1], p.n_fixed, p.n_fixed != 0u), MAX_TOK);
}

var<workgroup> glu_part: array<array<f32, 8>, 8>;  // [row group][token]

// The row of the 32 lanes `tid` belongs to (p.rows: none).
fn matvec_row(tid: u32, wg: u32) -> u32 {
    let k = tid / LANES;
    if p.glu == 0u {
        return wg * ROWS + k;
    }
    let j = wg * 4u + k % 4u;
    if j >= p.glu {
        return p.rows;
    }
    return select(j, p.glu + j, k >= 4u);
}

// Sums each token's 32 lane sums of row `r` (a fixed tree, reduce_*.wgsl) and stores them.
// Every invocation must call it.
fn store_rows(acc: ptr<function, array<f32, 8>>, r: u32, n: u32, tid: u32, wg: u32) {
    let lane = tid % LANES;
    let k = tid / LANES;
    for (var t = 0u; t < MAX_TOK; t++) {
        if t >= n {
            break;
        }
        let total = row_sum((*acc)[t], tid);
        if r < p.rows && lane == 0u {
            if p.glu != 0u {
                glu_part[k][t] = total;
            } else {
                let at = p.y_off + t * p.y_stride + r;
                var base = 0.0;
                if p.residual != 0u {
                    base = y[at];
                }
                y[at] = base + total;
            }
        }
    }
    if p.glu != 0u {
        workgroupBarrier();
        let j = wg * 4u + k;
        if k < 4u && lane < n && j < p.glu {
            let g = glu_part[k][lane];
            let u = glu_part[k + 4u][lane];
            y[p.y_off + lane * p.y_stride + j] = g / (1.0 + exp(-g)) * u;
        }
    }
}
