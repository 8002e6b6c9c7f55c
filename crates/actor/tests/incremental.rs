//! Incremental snapshots of actors: every link of a chain restores to exactly the state it
//! was taken of (the whole snapshots of the original and the restored actor are equal byte
//! for byte, and both continue alike); a link holds only what changed; a save that fails
//! loses nothing; a chain file cut short restores to its last complete link.

use std::path::PathBuf;
use std::sync::Arc;

use tern_actor::{Actor, ActorModule, COMPACT_AFTER_LINKS, Runtime};
use tern_compute::cpu::CpuDevice;
use tern_model::Model;

/// Opens model `m` and a session of 256 positions on the first message. A message is
/// little-endian u32s: a length to rewind the session to (`u32::MAX`: none), an address the
/// guest writes a byte at, then tokens; the guest runs `forward_top` for 4 candidates into
/// page 2 and emits them. Pages 5 to 7 hold data that does not compress (`@DATA@`), so that
/// the whole state outweighs a few links.
const GUEST: &str = r#"(module
  (import "tern" "model_open" (func $model_open (param i32 i32) (result i32)))
  (import "tern" "session_open" (func $session_open (param i32 i32) (result i32)))
  (import "tern" "session_rewind" (func $rewind (param i32 i32) (result i32)))
  (import "tern" "forward_top" (func $forward_top (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "tern" "emit" (func $emit (param i32 i32) (result i32)))
  (memory (export "memory") 8)
  (global $session (mut i32) (i32.const -1))
  (global $count (mut i32) (i32.const 0))
  (data (i32.const 0) "m")
  (data (i32.const 327680) "@DATA@")
  (func (export "tern_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tern_on_message") (param $ptr i32) (param $len i32) (result i32)
    (local $rc i32)
    (if (i32.lt_s (global.get $session) (i32.const 0))
      (then (global.set $session
        (call $session_open (call $model_open (i32.const 0) (i32.const 1)) (i32.const 256)))))
    (if (i32.ne (i32.load (local.get $ptr)) (i32.const -1))
      (then (drop (call $rewind (global.get $session) (i32.load (local.get $ptr))))))
    (global.set $count (i32.add (global.get $count) (i32.const 1)))
    (i32.store8 (i32.load offset=4 (local.get $ptr)) (global.get $count))
    (local.set $rc (call $forward_top (global.get $session)
      (i32.add (local.get $ptr) (i32.const 8))
      (i32.shr_u (i32.sub (local.get $len) (i32.const 8)) (i32.const 2))
      (i32.const 0) (i32.const 131072) (i32.const 4)))
    (if (i32.lt_s (local.get $rc) (i32.const 0)) (then (return (local.get $rc))))
    (drop (call $emit (i32.const 131072) (i32.const 32)))
    (local.get $rc)))"#;

fn message(rewind: u32, write_at: u32, tokens: &[u32]) -> Vec<u8> {
    [rewind, write_at]
        .iter()
        .chain(tokens)
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

/// A runtime offering a tiny model as `m`, written to `model` (a file of the test's own),
/// and the guest.
fn setup(model: &str) -> (Runtime, Arc<ActorModule>) {
    setup_with(model, tern_model::KvType::F32)
}

/// [`setup`] with KV caches of `kv_type`.
fn setup_with(model: &str, kv_type: tern_model::KvType) -> (Runtime, Arc<ActorModule>) {
    use tern_model::generate::{Types, shape, write_random_llama};
    use tern_model::quant::DType;
    let path = scratch(model);
    let types = Types {
        linear: DType::Q8_0,
        embd: DType::Q8_0,
    };
    write_random_llama(&path, shape("tiny").unwrap(), types, 5).unwrap();
    let model = Arc::new(Model::open("m", &path, 1).unwrap().with_kv_type(kv_type));
    let rt = Runtime::builder(Arc::new(CpuDevice::new()))
        .model(model)
        .build()
        .unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let data: String = (0..3 * 65536)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            format!("\\{:02x}", state as u8)
        })
        .collect();
    let wat = GUEST.replace("@DATA@", &data);
    let module = Arc::new(ActorModule::new(&rt, "incremental", wat.as_bytes()).unwrap());
    (rt, module)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tern-incremental-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// The actor the chain file at `path` holds, its checksums compared beside the restore (as
/// `tern restore` and `tern serve` do).
fn restore_file(rt: &Runtime, module: &Arc<ActorModule>, path: &PathBuf) -> Actor {
    let bytes = std::fs::read(path).unwrap();
    let links = tern_snapshot::split_links(&bytes).unwrap();
    let chain = tern_snapshot::parse_chain_unverified(&links.links).unwrap();
    Actor::restore_chain(rt, module, &chain).unwrap()
}

/// [`restore_file`] with the chain checked whole before the restore.
fn restore_file_checked(rt: &Runtime, module: &Arc<ActorModule>, path: &PathBuf) -> Actor {
    let bytes = std::fs::read(path).unwrap();
    let links = tern_snapshot::split_links(&bytes).unwrap();
    let chain = tern_snapshot::parse_chain(&links.links).unwrap();
    Actor::restore_chain(rt, module, &chain).unwrap()
}

/// The turns of a conversation: new tokens, rewinds, writes on fresh and old pages.
fn turns() -> Vec<Vec<u8>> {
    let mut turns = vec![message(u32::MAX, 3 * 65536 + 5, &[5, 6, 7, 300, 11])];
    for i in 0..12u32 {
        let rewind = if i % 5 == 4 { 3 + i } else { u32::MAX };
        let page = [4, 3][i as usize % 2];
        turns.push(message(rewind, page * 65536 + i, &[40 + i, 41, 42 + i]));
    }
    turns
}

#[test]
fn every_link_restores_to_exactly_the_state_it_was_taken_of() {
    let (rt, module) = setup("conversation.gguf");
    let path = scratch("conversation.tern");
    let mut original = Actor::start(&rt, &module).unwrap();
    let mut sizes = Vec::new();
    for (i, turn) in turns().iter().enumerate() {
        let reply = original.send(turn).unwrap();
        assert_eq!(reply.code, 4, "turn {i}: {:?}", original.last_error());
        let written = original.save_to(&path, i == 0).unwrap();
        sizes.push(written.bytes);
        let mut restored = restore_file(&rt, &module, &path);
        assert_eq!(
            restored.snapshot().unwrap(),
            original.snapshot().unwrap(),
            "turn {i}: the restored actor's state differs"
        );
        let next = message(u32::MAX, 7 * 65536, &[9]);
        let mut twin = restore_file_checked(&rt, &module, &path);
        assert_eq!(restored.send(&next).unwrap(), twin.send(&next).unwrap());
    }
    assert_eq!(original.chain_len() as usize, sizes.len());
    // A link holds a few pages and a few positions, not the whole state.
    assert!(sizes[1..].iter().all(|&s| s * 4 < sizes[0]), "{sizes:?}");
}

#[test]
fn a_failed_save_loses_nothing_and_a_restored_chain_continues() {
    let (rt, module) = setup("failed.gguf");
    let path = scratch("failed.tern");
    let mut original = Actor::start(&rt, &module).unwrap();
    let turns = turns();
    original.send(&turns[0]).unwrap();
    original.save_to(&path, true).unwrap();
    original.send(&turns[1]).unwrap();
    // A capture whose store failed is not committed...
    let failed = original.capture_link(false, |_| {
        Err(tern_snapshot::SnapshotError::Corrupt(
            "the store is down".into(),
        ))
    });
    assert!(failed.is_err());
    original.send(&turns[2]).unwrap();
    // ...so the next link still holds what changed in both turns.
    original.save_to(&path, false).unwrap();
    let mut restored = restore_file(&rt, &module, &path);
    assert_eq!(restored.snapshot().unwrap(), original.snapshot().unwrap());
    // The restored actor continues the same chain file.
    for turn in &turns[3..6] {
        assert_eq!(restored.send(turn).unwrap(), original.send(turn).unwrap());
        restored.save_to(&path, false).unwrap();
    }
    assert_eq!(restored.chain_len(), 5);
    let mut again = restore_file(&rt, &module, &path);
    assert_eq!(again.snapshot().unwrap(), original.snapshot().unwrap());
}

/// A byte of a chain's contents damaged (which only the checksum notices): the restore that
/// ran beside the comparison is discarded and the mismatch is the error; the file is left
/// as it was and the actor it held is restored from the intact bytes as before.
#[test]
fn a_damaged_chain_is_refused_by_its_checksum_though_it_restored() {
    let (rt, module) = setup("damaged.gguf");
    let path = scratch("damaged.tern");
    let mut original = Actor::start(&rt, &module).unwrap();
    let turns = turns();
    for (i, turn) in turns[..3].iter().enumerate() {
        original.send(turn).unwrap();
        original.save_to(&path, i == 0).unwrap();
    }
    let bytes = std::fs::read(&path).unwrap();
    let links = tern_snapshot::split_links(&bytes).unwrap();
    for (at, link) in links.links.iter().enumerate() {
        // The last byte of the link's first KV blob.
        let kv = tern_snapshot::parse(link).unwrap().kv(0).unwrap();
        let blob = kv.bytes();
        let offset = blob.as_ptr() as usize - bytes.as_ptr() as usize + blob.len() - 1;
        let mut damaged = bytes.clone();
        damaged[offset] ^= 0x10;
        let links = tern_snapshot::split_links(&damaged).unwrap();
        let chain = tern_snapshot::parse_chain_unverified(&links.links).unwrap();
        let err = Actor::restore_chain(&rt, &module, &chain)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("checksum"), "link {at}: {err}");
    }
    let mut restored = restore_file(&rt, &module, &path);
    assert_eq!(restored.snapshot().unwrap(), original.snapshot().unwrap());
}

#[test]
fn a_chain_file_cut_short_restores_to_its_last_complete_link_and_compacts() {
    let (rt, module) = setup("torn.gguf");
    let path = scratch("torn.tern");
    let mut actor = Actor::start(&rt, &module).unwrap();
    let turns = turns();
    for (i, turn) in turns[..4].iter().enumerate() {
        actor.send(turn).unwrap();
        actor.save_to(&path, i == 0).unwrap();
    }
    let before = actor.snapshot().unwrap();
    let end = std::fs::metadata(&path).unwrap().len();
    actor.send(&turns[4]).unwrap();
    actor.save_to(&path, false).unwrap();
    let whole = std::fs::read(&path).unwrap();
    for cut in [
        end + 1,
        end + 64,
        (end + whole.len() as u64) / 2,
        whole.len() as u64 - 1,
    ] {
        std::fs::write(&path, &whole[..cut as usize]).unwrap();
        let mut restored = restore_file(&rt, &module, &path);
        assert_eq!(restored.snapshot().unwrap(), before, "cut at {cut}");
    }
    // A link alone is not a snapshot to restore.
    let links = tern_snapshot::split_links(&whole).unwrap();
    let link = tern_snapshot::parse(links.links[2]).unwrap();
    let err = Actor::restore(&rt, &module, &link).err().expect("refused");
    assert!(err.to_string().contains("link of a chain"), "{err}");

    // The chain starts over with a whole snapshot once it is long enough.
    std::fs::write(&path, &whole).unwrap();
    let mut actor = restore_file(&rt, &module, &path);
    let mut restarted = false;
    for i in 0..COMPACT_AFTER_LINKS + 2 {
        actor
            .send(&message(u32::MAX, 65536 * 4, &[i % 500]))
            .unwrap();
        actor.save_to(&path, false).unwrap();
        restarted |= actor.chain_len() == 1;
        assert!(actor.chain_len() <= COMPACT_AFTER_LINKS);
    }
    assert!(restarted, "the chain never started over");
    let mut restored = restore_file(&rt, &module, &path);
    assert_eq!(restored.snapshot().unwrap(), actor.snapshot().unwrap());
}

#[test]
fn an_f16_cache_saves_half_the_kv_bytes_restores_exactly_and_keeps_to_its_type() {
    let (rt16, module16) = setup_with("half.gguf", tern_model::KvType::F16);
    let (rt32, module32) = setup("full.gguf");
    let turns = turns();
    let (mut half, mut full) = (
        Actor::start(&rt16, &module16).unwrap(),
        Actor::start(&rt32, &module32).unwrap(),
    );
    for turn in &turns[..3] {
        assert_eq!(half.send(turn).unwrap().code, 4);
        assert_eq!(full.send(turn).unwrap().code, 4);
    }
    let (path16, path32) = (scratch("half.tern"), scratch("full.tern"));
    half.save_to(&path16, true).unwrap();
    full.save_to(&path32, true).unwrap();
    let bytes16 = std::fs::read(&path16).unwrap();
    let view = tern_snapshot::parse(&bytes16).unwrap();
    assert_eq!(
        view.manifest.sessions[0].kv_type,
        tern_snapshot::KvType::F16
    );
    let (kv16, kv32) = (
        view.kv(0).unwrap().bytes().len(),
        tern_snapshot::parse(&std::fs::read(&path32).unwrap())
            .unwrap()
            .kv(0)
            .unwrap()
            .bytes()
            .len(),
    );
    assert!(kv16 * 2 < kv32 + 256, "{kv16} vs {kv32} bytes");
    // Links too, and the chain restores bit for bit.
    half.send(&turns[3]).unwrap();
    half.save_to(&path16, false).unwrap();
    let mut restored = restore_file(&rt16, &module16, &path16);
    assert_eq!(restored.snapshot().unwrap(), half.snapshot().unwrap());
    let next = message(u32::MAX, 7 * 65536, &[9]);
    assert_eq!(restored.send(&next).unwrap(), half.send(&next).unwrap());
    // An f16 session does not restore into a model keeping f32 caches, nor the other way.
    let err = Actor::restore(&rt32, &module32, &view)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("keeps an f16 KV cache"), "{err}");
    let whole32 = std::fs::read(&path32).unwrap();
    let err = Actor::restore(&rt16, &module16, &tern_snapshot::parse(&whole32).unwrap())
        .err()
        .expect("refused");
    assert!(err.to_string().contains("keeps an f32 KV cache"), "{err}");
}
