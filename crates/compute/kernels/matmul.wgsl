// C[m x n] = A[m x k] . B[k x n], all row-major f32, each operand at an element offset in one
// buffer: guest memory (one binding, since a buffer bound writable once may not be bound
// again in the same dispatch) or a device buffer holding all three. 16x16 output tiles, the k dimension
// through workgroup memory 16 at a time; each output is one dot product in k order.
// Grid (ceil(n / 16), ceil(m / 16)), workgroup 16x16.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    a_off: u32,
    b_off: u32,
    c_off: u32,
}

@group(0) @binding(0) var<storage, read_write> mem: array<f32>;
@group(0) @binding(1) var<uniform> p: Params;

const TILE: u32 = 16u;

var<workgroup> a_tile: array<array<f32, 16>, 16>;
var<workgroup> b_tile: array<array<f32, 16>, 16>;

@compute @workgroup_size(16, 16)
fn matmul_f32(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>) {
    let row = wg.y * TILE + lid.y;
    let col = wg.x * TILE + lid.x;
    var sum = 0.0;
    for (var k0 = 0u; k0 < p.k; k0 += TILE) {
        let ka = k0 + lid.x;
        let kb = k0 + lid.y;
        a_tile[lid.y][lid.x] = select(0.0, mem[p.a_off + row * p.k + ka], row < p.m && ka < p.k);
        b_tile[lid.y][lid.x] = select(0.0, mem[p.b_off + kb * p.n + col], kb < p.k && col < p.n);
        workgroupBarrier();
        for (var i = 0u; i < TILE; i++) {
            sum += a_tile[lid.y][i] * b_tile[i][lid.x];
        }
        workgroupBarrier();
    }
    if row < p.m && col < p.n {
        mem[p.c_off + row * p.n + col] = sum;
    }
}
