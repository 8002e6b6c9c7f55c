//! Snapshot throughput and small-actor latency, each next to a `memcpy` of the same bytes
//! measured in the same run. Run with `cargo bench -p tern-snapshot`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use tern_snapshot::{
    HostInfo, KvLayers, KvType, KvWrite, Manifest, ModelRef, ModuleRef, Numerics, PAGE_BYTES,
    SessionInfo, SnapshotWrite, encode, parse, to_bytes,
};

/// Median wall time of `runs` calls of `f`.
fn median(runs: usize, mut f: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    times[runs / 2]
}

/// An actor with `memory_pages` pages (every `stride`-th one holding text) and one session of
/// `n_tokens` tokens on a model of `n_layer` layers and `kv_dim` floats per token.
struct Actor {
    manifest: Manifest,
    memory: Vec<u8>,
    kv: Vec<f32>,
}

impl Actor {
    fn new(memory_pages: usize, stride: usize, n_layer: u32, kv_dim: u32, n_tokens: usize) -> Self {
        let mut memory = vec![0u8; memory_pages * PAGE_BYTES];
        for (i, page) in memory
            .chunks_exact_mut(PAGE_BYTES)
            .enumerate()
            .step_by(stride)
        {
            for (j, b) in page.iter_mut().enumerate() {
                *b = (i * 31 + j / 7) as u8;
            }
        }
        let floats = n_layer as usize * n_tokens * kv_dim as usize;
        let kv = (0..floats).map(|i| (i as f32).sin()).collect();
        let manifest = Manifest {
            abi_version: 1,
            module: ModuleRef {
                name: "bench".into(),
                digest: "00".into(),
            },
            memory_bytes: memory.len() as u64,
            globals: Vec::new(),
            models: vec![ModelRef {
                name: "m".into(),
                sha256: Some("00".repeat(32)),
                legacy_digest: 1,
                numerics: Some(Numerics {
                    backend: "cpu".into(),
                    precision: "fast".into(),
                    kernels: "1".into(),
                    architecture: "x86_64-linux-gnu".into(),
                }),
                arch: "llama".into(),
                n_layer,
                n_head_kv: 1,
                head_dim: kv_dim,
                n_vocab: 50_000,
            }],
            sessions: vec![SessionInfo {
                slot: 0,
                model: 0,
                n_ctx: n_tokens.max(1) as u32,
                tokens: (0..n_tokens as u32).collect(),
                kv_from: 0,
                kv_type: KvType::F32,
            }],
            host: HostInfo {
                device: "cpu".into(),
                last_error: None,
                session_slots: 1,
                clock_unix_ms: None,
            },
            link: None,
        };
        Actor {
            manifest,
            memory,
            kv,
        }
    }

    fn write(&self) -> SnapshotWrite<'_> {
        let n_layer = self.manifest.models[0].n_layer as usize;
        let layer = self.kv.len() / n_layer.max(1);
        let layers: Vec<&[f32]> = self.kv.chunks(layer.max(1)).collect();
        SnapshotWrite {
            manifest: &self.manifest,
            memory: &self.memory,
            kv: vec![KvWrite {
                kv_dim: self.manifest.models[0].head_dim as usize,
                n_tokens: self.manifest.sessions[0].tokens.len(),
                k: KvLayers::F32(layers.clone()),
                v: KvLayers::F32(layers),
            }],
            changed_pages: None,
        }
    }
}

fn gbps(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e9
}

fn main() {
    // 4,096 tokens on a 30-layer model with 3 KV heads of 64: about 190 MB of KV cache.
    let big = Actor::new(256, 4, 30, 192, 4096);
    let bytes = to_bytes(&big.write()).unwrap();
    let n = bytes.len();
    let mut copy = vec![0u8; n];
    let memcpy = median(5, || copy.copy_from_slice(black_box(&bytes)));
    let fresh = median(5, || drop(black_box(to_bytes(&big.write()).unwrap())));
    let mut out = Vec::with_capacity(n);
    let encode_reused = median(5, || {
        out.clear();
        encode(&big.write(), &mut out).unwrap();
    });
    let check = median(5, || drop(black_box(parse(&bytes).unwrap())));
    let view = parse(&bytes).unwrap();
    let kv = view.kv(0).unwrap();
    let mut layer = vec![0f32; kv.n_tokens * kv.kv_dim];
    let mut memory = vec![0u8; big.memory.len()];
    let restore = median(5, || {
        view.restore_memory(&mut memory).unwrap();
        for l in 0..kv.n_layer {
            kv.k_layer(l, &mut layer).unwrap();
            kv.v_layer(l, &mut layer).unwrap();
        }
    });
    println!(
        "large actor: {:.1} MB file, 16 MiB memory, 4096 tokens of KV",
        n as f64 / 1e6
    );
    for (name, t) in [
        ("memcpy (baseline)", memcpy),
        ("to_bytes", fresh),
        ("encode (reused)", encode_reused),
        ("parse", check),
        ("restore", restore),
    ] {
        println!(
            "  {name:<18} {:>8.2} ms  {:>6.2} GB/s  {:>5.2}x memcpy",
            t.as_secs_f64() * 1e3,
            gbps(n, t),
            t.as_secs_f64() / memcpy.as_secs_f64()
        );
    }

    // A small actor: 1 MiB of memory with 4 pages in use, 16 tokens of KV.
    let small = Actor::new(16, 4, 30, 192, 16);
    let bytes = to_bytes(&small.write()).unwrap();
    let mut memory = vec![0u8; small.memory.len()];
    let mut layer = vec![0f32; 16 * 192];
    let memcpy = median(101, || memory.copy_from_slice(black_box(&small.memory)));
    let restore = median(101, || {
        let view = parse(black_box(&bytes)).unwrap();
        view.restore_memory(&mut memory).unwrap();
        let kv = view.kv(0).unwrap();
        for l in 0..kv.n_layer {
            kv.k_layer(l, &mut layer).unwrap();
            kv.v_layer(l, &mut layer).unwrap();
        }
    });
    println!(
        "small actor: {} KB file, 1 MiB memory, 16 tokens of KV",
        bytes.len() / 1000
    );
    println!(
        "  memcpy of memory   {:>8.1} us",
        memcpy.as_secs_f64() * 1e6
    );
    println!(
        "  parse + restore    {:>8.1} us  {:>5.2}x memcpy",
        restore.as_secs_f64() * 1e6,
        restore.as_secs_f64() / memcpy.as_secs_f64()
    );
}
