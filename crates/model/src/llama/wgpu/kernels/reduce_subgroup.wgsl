// The sum of `v` over each group of 32 consecutive invocations: one subgroup reduction, for
// adapters whose subgroups are exactly 32 wide (wgpu's `SUBGROUP` feature; naga takes the
// builtins without an `enable` directive). Every invocation must call it.

fn row_sum(v: f32, tid: u32) -> f32 {
    return subgroupAdd(v);
}
