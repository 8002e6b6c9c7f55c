// The sum of `v` over each group of 32 consecutive invocations of a 256-invocation workgroup,
// in a fixed tree through workgroup memory. Every invocation must call it.

var<workgroup> partial: array<f32, 256>;

fn row_sum(v: f32, tid: u32) -> f32 {
    partial[tid] = v;
    workgroupBarrier();
    let lane = tid % 32u;
    for (var s = 16u; s > 0u; s >>= 1u) {
        if lane < s {
            partial[tid] += partial[tid + s];
        }
        workgroupBarrier();
    }
    let total = partial[tid - lane];
    workgroupBarrier();
    return total;
}
