// The KV cache of f16 values: four per vec2<u32>, element 2j in the low half of word j, so
// the buffer's bytes are the little-endian f16s the CPU's cache holds. Values are rounded to
// nearest, ties to even, as they are stored, and widened exactly as they are read, both in
// integer arithmetic (WGSL leaves the rounding of its own conversions to the implementation,
// and an adapter may flush f16 subnormals): the same bits as the CPU's conversions.

@group(0) @binding(1) var<storage, read_write> k_cache: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read_write> v_cache: array<vec2<u32>>;

// `x` rounded to the nearest f16 (ties to even), as its 16 bits.
fn f16_bits(x: f32) -> u32 {
    return f16_bits_of(bitcast<u32>(x));
}

// The f32 of bits `b` rounded to the nearest f16 (ties to even), as its 16 bits.
fn f16_bits_of(b: u32) -> u32 {
    let sign = (b >> 16u) & 0x8000u;
    let a = b & 0x7fffffffu;
    if a > 0x7f800000u {
        // NaN: quiet, with the top of its payload.
        return sign | 0x7e00u | ((a >> 13u) & 0x3ffu);
    }
    if a >= 0x477ff000u {
        // 65520 and more (infinity included) round to infinity.
        return sign | 0x7c00u;
    }
    if a >= 0x38800000u {
        // A normal f16: rebias the exponent, round the mantissa's 13 dropped bits.
        let m = a - 0x38000000u;
        return sign | ((m + 0xfffu + ((m >> 13u) & 1u)) >> 13u);
    }
    let e = a >> 23u;
    if e < 102u {
        // Below 2^-25: zero.
        return sign;
    }
    // A subnormal f16: the mantissa (with its implicit bit) shifted down, rounded.
    let mant = (a & 0x7fffffu) | 0x800000u;
    let shift = 126u - e;
    let q = mant >> shift;
    let rest = mant & ((1u << shift) - 1u);
    let half = 1u << (shift - 1u);
    let up = rest > half || (rest == half && (q & 1u) == 1u);
    return sign | (q + select(0u, 1u, up));
}

// The f16 of bits `h` as an f32 (exact).
fn f16_value(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if e == 0u {
        let v = f32(m) * 5.9604644775390625e-8;
        return select(v, -v, sign != 0u);
    }
    if e == 31u {
        // Infinity, or NaN made quiet (as the CPU's conversion does).
        return bitcast<f32>(sign | 0x7f800000u | select(0u, 0x400000u, m != 0u) | (m << 13u));
    }
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (m << 13u));
}

// A key or value as the cache holds it.
fn kv_round(x: f32) -> f32 {
    return f16_value(f16_bits(x));
}

fn unpack4(w: vec2<u32>) -> vec4<f32> {
    return vec4<f32>(
        f16_value(w.x & 0xffffu),
        f16_value(w.x >> 16u),
        f16_value(w.y & 0xffffu),
        f16_value(w.y >> 16u),
    );
}

fn pack4(x: vec4<f32>) -> vec2<u32> {
    return vec2<u32>(
        f16_bits(x.x) | (f16_bits(x.y) << 16u),
        f16_bits(x.z) | (f16_bits(x.w) << 16u),
    );
}

fn k_at(i: u32) -> vec4<f32> {
    return unpack4(k_cache[i]);
}

fn v_at(i: u32) -> vec4<f32> {
    return unpack4(v_cache[i]);
}

fn k_put(i: u32, x: vec4<f32>) {
    k_cache[i] = pack4(x);
}

fn v_put(i: u32, x: vec4<f32>) {
    v_cache[i] = pack4(x);
}
