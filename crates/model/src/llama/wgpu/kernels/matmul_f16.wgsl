// The prefill product for F16 weights: y[t] = (residual ? y[t] : 0) + W x[t] for the call's
// tokens (n <= 8), W row-major binary16 (blocks.wgsl supplies `w`). Workgroup 64 = 64 rows;
// the tokens' activations pass through workgroup memory 64 columns at a time, and each
// invocation runs its row's dot products for every token in column order (reproducible).
// Grid (ceil(rows / 64)).

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
}

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> step: array<u32>;
@group(0) @binding(4) var<uniform> p: Params;

const TILE: u32 = 64u;
const MAX_TOK: u32 = 8u;

var<workgroup> xs: array<f32, 512>; // (MAX_TOK, TILE)

@compute @workgroup_size(64)
fn matmul_f16(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let r = wg.x * TILE + tid;
    let n = min(select(step[1], p.n_fixed, p.n_fixed != 0u), MAX_TOK);
    var acc: array<f32, 8>;
    for (var k0 = 0u; k0 < p.cols; k0 += TILE) {
        let width = min(TILE, p.cols - k0);
        for (var t = 0u; t < n; t++) {
            if tid < width {
                xs[t * TILE + tid] = x[p.x_off + t * p.x_stride + k0 + tid];
            }
        }
        workgroupBarrier();
        if r < p.rows {
            let row_byte = r * p.row_bytes + 2u * k0;
            for (var j = 0u; j < width; j += 2u) {
                let pair = unpack2x16float(load_u32(row_byte + 2u * j));
                // A fixed trip count, so the accumulators stay in registers.
                for (var t = 0u; t < MAX_TOK; t++) {
                    if t < n {
                        acc[t] += pair.x * xs[t * TILE + j];
                        acc[t] += pair.y * xs[t * TILE + j + 1u];
                    }
                }
            }
        }
        workgroupBarrier();
    }
    if r < p.rows {
        for (var t = 0u; t < MAX_TOK; t++) {
            if t < n {
                let at = p.y_off + t * p.y_stride + r;
                var base = 0.0;
                if p.residual != 0u {
                    base = y[at];
                }
                y[at] = base + acc[t];
            }
        }
    }
}
