//! Whatever `encode` accepts, `parse` accepts and gives back unchanged, for random actors:
//! any strings, any global bit patterns, any float bits (NaNs included), empty models,
//! sessions and memories.

mod common;

use common::{Page, Rng, memory};
use proptest::prelude::*;
use tern_snapshot::{
    Global, HostInfo, KvLayers, KvType, KvWrite, Manifest, ModelRef, ModuleRef, Numerics,
    PAGE_BYTES, SessionInfo, SnapshotWrite, ValType, parse, to_bytes,
};

fn val_type() -> impl Strategy<Value = ValType> {
    prop_oneof![
        Just(ValType::I32),
        Just(ValType::I64),
        Just(ValType::F32),
        Just(ValType::F64),
        Just(ValType::V128),
    ]
}

fn global() -> impl Strategy<Value = Global> {
    ("\\PC{0,12}", val_type(), any::<bool>(), any::<u128>()).prop_map(
        |(name, ty, mutable, bits)| {
            let width = ty.bits();
            let bits = if width == 128 {
                bits
            } else {
                bits & ((1u128 << width) - 1)
            };
            Global {
                name,
                ty,
                mutable,
                bits,
            }
        },
    )
}

fn model() -> impl Strategy<Value = ModelRef> {
    (
        "\\PC{0,12}",
        any::<u64>(),
        0u32..3,
        0u32..3,
        0u32..5,
        1u32..100,
    )
        .prop_map(
            |(name, legacy_digest, n_layer, n_head_kv, head_dim, n_vocab)| ModelRef {
                sha256: Some(format!("{legacy_digest:064x}")),
                numerics: Some(Numerics {
                    backend: "cpu".into(),
                    precision: name.chars().rev().collect(),
                    kernels: format!("{n_vocab}"),
                    architecture: String::new(),
                }),
                name,
                legacy_digest,
                arch: "llama".into(),
                n_layer,
                n_head_kv,
                head_dim,
                n_vocab,
            },
        )
}

/// A random actor: manifest, page kinds and a seed for memory and KV contents.
fn actor() -> impl Strategy<Value = (Manifest, Vec<u8>, u64)> {
    let models = prop::collection::vec(model(), 1..3);
    let sessions = prop::collection::vec((0u32..8, any::<u32>(), 0usize..6, 0u32..4), 0..4);
    let pages = prop::collection::vec(0u8..4, 0..4);
    (
        models,
        sessions,
        prop::collection::vec(global(), 0..4),
        pages,
        any::<u64>(),
        prop::option::of("\\PC{0,20}"),
    )
        .prop_map(|(models, raw_sessions, globals, pages, seed, last_error)| {
            let mut used = 0u8;
            let mut sessions = Vec::new();
            let mut token = seed;
            for (slot, model, n_tokens, spare) in raw_sessions {
                if used & (1 << slot) != 0 {
                    continue;
                }
                used |= 1 << slot;
                let model = model % models.len() as u32;
                let n_vocab = u64::from(models[model as usize].n_vocab);
                let tokens = (0..n_tokens)
                    .map(|_| {
                        token = token.wrapping_mul(6364136223846793005).wrapping_add(1);
                        ((token >> 33) % n_vocab) as u32
                    })
                    .collect::<Vec<_>>();
                let n_ctx = tokens.len() as u32 + spare;
                sessions.push(SessionInfo {
                    slot,
                    model,
                    n_ctx,
                    tokens,
                    kv_from: 0,
                    kv_type: KvType::F32,
                });
            }
            let manifest = Manifest {
                abi_version: seed as u32,
                module: ModuleRef {
                    name: "m".into(),
                    digest: format!("{seed:x}"),
                },
                memory_bytes: (pages.len() * PAGE_BYTES) as u64,
                globals,
                models,
                sessions,
                host: HostInfo {
                    device: "cpu".into(),
                    last_error,
                    session_slots: 8,
                    clock_unix_ms: Some(seed as i64),
                },
                link: None,
            };
            (manifest, pages, seed)
        })
}

/// One session's KV cache: `k[layer]` and `v[layer]` hold `n_tokens × kv_dim` floats.
struct Cache {
    kv_dim: usize,
    n_tokens: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn what_encodes_parses_back_unchanged((manifest, pages, seed) in actor()) {
        let mut rng = Rng(seed | 1);
        let kinds = [Page::Zero, Page::Text, Page::Random, Page::Sparse];
        let pages: Vec<Page> = pages.iter().map(|&p| kinds[p as usize]).collect();
        let memory = memory(&pages, &mut rng);
        let caches: Vec<Cache> = manifest
            .sessions
            .iter()
            .map(|s| {
                let model = &manifest.models[s.model as usize];
                let kv_dim = model.kv_dim() as usize;
                let n = s.tokens.len();
                let mut layers = || -> Vec<Vec<f32>> {
                    (0..model.n_layer)
                        .map(|_| (0..n * kv_dim).map(|_| f32::from_bits(rng.next() as u32)).collect())
                        .collect()
                };
                Cache { kv_dim, n_tokens: n, k: layers(), v: layers() }
            })
            .collect();
        let write = SnapshotWrite {
            manifest: &manifest,
            memory: &memory,
            kv: caches
                .iter()
                .map(|c| KvWrite {
                    kv_dim: c.kv_dim,
                    n_tokens: c.n_tokens,
                    k: KvLayers::F32(c.k.iter().map(Vec::as_slice).collect()),
                    v: KvLayers::F32(c.v.iter().map(Vec::as_slice).collect()),
                })
                .collect(),
            changed_pages: None,
        };
        let bytes = to_bytes(&write).unwrap();
        prop_assert!(bytes == to_bytes(&write).unwrap(), "deterministic");

        let view = parse(&bytes).unwrap();
        prop_assert_eq!(&view.manifest, &manifest);
        let mut restored = vec![0x5au8; memory.len()];
        view.restore_memory(&mut restored).unwrap();
        prop_assert!(restored == memory);
        for (i, Cache { k, v, .. }) in caches.iter().enumerate() {
            let kv = view.kv(i).unwrap();
            let mut layer = vec![0f32; kv.n_tokens * kv.kv_dim];
            for l in 0..kv.n_layer {
                kv.k_layer(l, &mut layer).unwrap();
                prop_assert!(layer.iter().zip(&k[l]).all(|(a, b)| a.to_bits() == b.to_bits()));
                kv.v_layer(l, &mut layer).unwrap();
                prop_assert!(layer.iter().zip(&v[l]).all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
    }
}
