//! Shared fixtures for the integration tests: actors to snapshot, and a re-implementation of
//! the documented frame layout to rebuild files with replaced sections.

#![allow(dead_code)] // each test binary uses a different part

use tern_snapshot::{
    Global, HostInfo, KvLayers, KvType, KvWrite, Manifest, ModelRef, ModuleRef, Numerics,
    PAGE_BYTES, SessionInfo, SnapshotWrite, VERSION, ValType, reseal,
};

/// An actor's state, owned, ready to be borrowed as a [`SnapshotWrite`].
pub struct Fixture {
    pub manifest: Manifest,
    pub memory: Vec<u8>,
    /// `k[session][layer]`: `n_tokens × kv_dim` floats.
    pub k: Vec<Vec<Vec<f32>>>,
    pub v: Vec<Vec<Vec<f32>>>,
}

/// Deterministic xorshift64 generator.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn fill(&mut self, bytes: &mut [u8]) {
        for b in bytes {
            *b = self.next() as u8;
        }
    }
}

/// Page contents by kind.
#[derive(Clone, Copy)]
pub enum Page {
    Zero,
    /// Repeating text: compresses well.
    Text,
    /// Random bytes: does not compress, stored raw.
    Random,
    /// Zero except one byte.
    Sparse,
}

pub fn memory(pages: &[Page], rng: &mut Rng) -> Vec<u8> {
    let mut memory = vec![0u8; pages.len() * PAGE_BYTES];
    for (page, bytes) in pages.iter().zip(memory.chunks_exact_mut(PAGE_BYTES)) {
        match page {
            Page::Zero => {}
            Page::Text => {
                let text = b"the quick brown actor snapshots its state ";
                for (i, b) in bytes.iter_mut().enumerate() {
                    *b = text[i % text.len()];
                }
            }
            Page::Random => rng.fill(bytes),
            Page::Sparse => bytes[PAGE_BYTES / 2] = 7,
        }
    }
    memory
}

fn model(name: &str, n_layer: u32, n_head_kv: u32, head_dim: u32) -> ModelRef {
    ModelRef {
        name: name.into(),
        sha256: Some("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into()),
        legacy_digest: 0x0123_4567_89ab_cdef,
        numerics: Some(Numerics {
            backend: "cpu".into(),
            precision: "fast".into(),
            kernels: "1".into(),
            architecture: "x86_64-linux-gnu".into(),
        }),
        arch: "llama".into(),
        n_layer,
        n_head_kv,
        head_dim,
        n_vocab: 1000,
    }
}

impl Fixture {
    /// An actor with `pages` of memory and one session per `(slot, model, n_tokens)`, using
    /// two models: 0 is `[n_layer 2, kv_dim 2×4]`, 1 is `[n_layer 3, kv_dim 1×8]`.
    pub fn new(pages: &[Page], sessions: &[(u32, u32, usize)], seed: u64) -> Fixture {
        let mut rng = Rng(seed | 1);
        let memory = memory(pages, &mut rng);
        let models = vec![model("tiny-a", 2, 2, 4), model("tiny-b", 3, 1, 8)];
        let mut infos = Vec::new();
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for &(slot, m, n_tokens) in sessions {
            let model = &models[m as usize];
            let floats = n_tokens * model.kv_dim() as usize;
            let mut layers = || -> Vec<Vec<f32>> {
                (0..model.n_layer)
                    .map(|_| {
                        (0..floats)
                            .map(|_| f32::from_bits(rng.next() as u32))
                            .collect()
                    })
                    .collect()
            };
            k.push(layers());
            v.push(layers());
            infos.push(SessionInfo {
                slot,
                model: m,
                n_ctx: 64,
                tokens: (0..n_tokens as u32)
                    .map(|t| (t * 7 + slot) % 1000)
                    .collect(),
                kv_from: 0,
                kv_type: KvType::F32,
            });
        }
        let globals = vec![
            global("__stack_pointer", ValType::I32, 0x0001_0000),
            global("counter", ValType::I64, u128::from(u64::MAX - 5)),
            global("nan", ValType::F32, 0x7fc0_1234),
            global(
                "pi",
                ValType::F64,
                u128::from(std::f64::consts::PI.to_bits()),
            ),
            global("lanes", ValType::V128, u128::MAX / 3),
        ];
        let manifest = Manifest {
            abi_version: 1,
            module: ModuleRef {
                name: "chat-actor".into(),
                digest: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
            },
            memory_bytes: memory.len() as u64,
            globals,
            models,
            sessions: infos,
            host: HostInfo {
                device: "cpu".into(),
                last_error: Some("model \"x\" not found".into()),
                session_slots: 8,
                clock_unix_ms: Some(1_733_246_567_123),
            },
            link: None,
        };
        Fixture {
            manifest,
            memory,
            k,
            v,
        }
    }

    /// Six pages (zero, text, random, zero, sparse, zero) and three sessions, one with no
    /// tokens.
    pub fn standard() -> Fixture {
        use Page::*;
        Fixture::new(
            &[Zero, Text, Random, Zero, Sparse, Zero],
            &[(0, 0, 5), (3, 1, 0), (7, 1, 3)],
            42,
        )
    }

    /// A small file for fuzzing: three pages, two short sessions.
    pub fn small() -> Fixture {
        use Page::*;
        Fixture::new(&[Zero, Sparse, Text], &[(1, 0, 2), (2, 1, 1)], 7)
    }

    pub fn write(&self) -> SnapshotWrite<'_> {
        self.write_link(None)
    }

    /// Borrows the state as a snapshot: a whole one when `changed` is `None`, else a link
    /// storing those pages and each session's positions from its `kv_from` (`k` and `v` hold
    /// every position).
    pub fn write_link<'a>(&'a self, changed: Option<&'a [u32]>) -> SnapshotWrite<'a> {
        let kv = self
            .manifest
            .sessions
            .iter()
            .enumerate()
            .map(|(i, session)| {
                let kv_dim = self.manifest.models[session.model as usize].kv_dim() as usize;
                let from = session.kv_from as usize * kv_dim;
                KvWrite {
                    kv_dim,
                    n_tokens: session.tokens.len() - session.kv_from as usize,
                    k: KvLayers::F32(self.k[i].iter().map(|l| &l[from..]).collect()),
                    v: KvLayers::F32(self.v[i].iter().map(|l| &l[from..]).collect()),
                }
            })
            .collect();
        SnapshotWrite {
            manifest: &self.manifest,
            memory: &self.memory,
            kv,
            changed_pages: changed,
        }
    }
}

fn global(name: &str, ty: ValType, bits: u128) -> Global {
    Global {
        name: name.into(),
        ty,
        mutable: true,
        bits,
    }
}

pub fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

pub fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// One section table entry of a well-formed file, read by the documented layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: u32,
    pub index: u32,
    pub offset: usize,
    pub len: usize,
}

/// The section table of a well-formed file.
pub fn table(file: &[u8]) -> Vec<Entry> {
    let count = u32_at(file, 24) as usize;
    (0..count)
        .map(|i| {
            let at = 32 + 24 * i;
            Entry {
                kind: u32_at(file, at),
                index: u32_at(file, at + 4),
                offset: u64_at(file, at + 8) as usize,
                len: u64_at(file, at + 16) as usize,
            }
        })
        .collect()
}

/// The bytes of the first section of `kind` with `index`.
pub fn section(file: &[u8], kind: u32, index: u32) -> &[u8] {
    let e = table(file)
        .into_iter()
        .find(|e| e.kind == kind && e.index == index)
        .expect("section present");
    &file[e.offset..e.offset + e.len]
}

/// Builds a file of the current version from `(kind, index, bytes)` sections by the
/// documented layout: header, table, each section at the next multiple of 64, trailer.
pub fn assemble(sections: &[(u32, u32, Vec<u8>)]) -> Vec<u8> {
    assemble_as(VERSION, sections)
}

/// [`assemble`] with `version` in the header.
pub fn assemble_as(version: u32, sections: &[(u32, u32, Vec<u8>)]) -> Vec<u8> {
    let mut file = vec![0u8; 32 + 24 * sections.len()];
    let mut entries = Vec::new();
    for (kind, index, bytes) in sections {
        file.resize(file.len().next_multiple_of(64), 0);
        entries.push((*kind, *index, file.len() as u64, bytes.len() as u64));
        file.extend_from_slice(bytes);
    }
    file.extend_from_slice(&[0u8; 8]);
    let file_len = file.len() as u64;
    file[..8].copy_from_slice(b"TERNSNAP");
    file[8..12].copy_from_slice(&version.to_le_bytes());
    file[16..24].copy_from_slice(&file_len.to_le_bytes());
    file[24..28].copy_from_slice(&(sections.len() as u32).to_le_bytes());
    for (i, (kind, index, offset, len)) in entries.into_iter().enumerate() {
        let at = 32 + 24 * i;
        file[at..at + 4].copy_from_slice(&kind.to_le_bytes());
        file[at + 4..at + 8].copy_from_slice(&index.to_le_bytes());
        file[at + 8..at + 16].copy_from_slice(&offset.to_le_bytes());
        file[at + 16..at + 24].copy_from_slice(&len.to_le_bytes());
    }
    reseal(&mut file);
    file
}

/// The sections of a well-formed file, in table order, as owned bytes.
pub fn sections(file: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    table(file)
        .into_iter()
        .map(|e| (e.kind, e.index, file[e.offset..e.offset + e.len].to_vec()))
        .collect()
}

/// `file` with its manifest section replaced by `manifest` (any bytes).
pub fn with_manifest(file: &[u8], manifest: &[u8]) -> Vec<u8> {
    let mut parts = sections(file);
    for part in &mut parts {
        if part.0 == 1 {
            part.2 = manifest.to_vec();
        }
    }
    assemble(&parts)
}

/// The manifest section of a well-formed file as JSON.
pub fn manifest_json(file: &[u8]) -> serde_json::Value {
    serde_json::from_slice(section(file, 1, 0)).unwrap()
}
