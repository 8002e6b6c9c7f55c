// The sum of `v` over each group of 32 consecutive invocations of a 256-invocation workgroup,
// with subgroup reductions, for adapters whose subgroups hold at most 32 invocations (wgpu's
// `SUBGROUP` feature; naga takes the builtins without an `enable` directive). Each subgroup
// sums its own invocations; the 32 / S subgroup sums of a row (S the subgroup size, a power
// of two, subgroups laid out in invocation order) are then added in a fixed order. With
// S = 32 (NVIDIA, Apple) that second step adds one term. Every invocation must call it.

var<workgroup> partial: array<f32, 256>;

fn row_sum(v: f32, tid: u32) -> f32 {
    let sum = subgroupAdd(v);
    let size = u32(subgroupAdd(1.0));
    partial[tid] = sum;
    workgroupBarrier();
    let base = tid - tid % 32u;
    var total = 0.0;
    for (var i = 0u; i < 32u; i += size) {
        total += partial[base + i];
    }
    workgroupBarrier();
    return total;
}
