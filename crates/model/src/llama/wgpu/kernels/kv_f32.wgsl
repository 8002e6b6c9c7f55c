// The KV cache of f32 values: vectors of four, read and written as they are.

@group(0) @binding(1) var<storage, read_write> k_cache: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> v_cache: array<vec4<f32>>;

// A key or value as the cache holds it.
fn kv_round(x: f32) -> f32 {
    return x;
}

fn k_at(i: u32) -> vec4<f32> {
    return k_cache[i];
}

fn v_at(i: u32) -> vec4<f32> {
    return v_cache[i];
}

fn k_put(i: u32, x: vec4<f32>) {
    k_cache[i] = x;
}

fn v_put(i: u32, x: vec4<f32>) {
    v_cache[i] = x;
}
