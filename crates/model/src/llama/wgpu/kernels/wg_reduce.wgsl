// Reductions over a workgroup of 128 invocations in fixed trees, for the attention kernels
// (prepended to attn_split.wgsl and attn_merge.wgsl).

var<workgroup> s_red: array<f32, 128>;

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
