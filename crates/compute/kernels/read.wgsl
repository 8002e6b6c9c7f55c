// Reads `words` 16-byte words of `src` once each and keeps nothing: the memory-read roofline
// that a batch-1 decode step, which reads every weight once, is measured against. Each
// invocation loads four words (one grid's width apart, so that every load of the grid is
// coalesced) before it combines any, as the matrix-vector kernels keep loads in flight. The
// store behind a test no real data passes keeps the loads from being removed.

struct Params {
    words: u32,
}

@group(0) @binding(0) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> sink: array<u32>;
@group(0) @binding(2) var<uniform> p: Params;

@compute @workgroup_size(256)
fn read_words(@builtin(global_invocation_id) gid: vec3<u32>,
              @builtin(num_workgroups) groups: vec3<u32>) {
    let stride = groups.x * 256u;
    var acc = vec4<u32>(0u);
    var i = gid.x;
    for (; i + 3u * stride < p.words; i += 4u * stride) {
        let a = src[i];
        let b = src[i + stride];
        let c = src[i + 2u * stride];
        let d = src[i + 3u * stride];
        acc ^= a ^ b ^ c ^ d;
    }
    for (; i < p.words; i += stride) {
        acc ^= src[i];
    }
    if (acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x9e3779b9u {
        sink[0] = gid.x;
    }
}
