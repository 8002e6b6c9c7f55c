//! Snapshots of WAT actors: memory, internal globals and host state come back bit for bit,
//! forks are independent, and what cannot be captured or does not fit is refused clearly.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tern_actor::{Actor, ActorError, ActorModule, Limits, Runtime, SnapshotFile};
use tern_compute::cpu::CpuDevice;

/// Counts messages in an internal global and in memory; a message starting with `g` grows
/// memory by two pages and marks the new last page. Replies with the counter, the memory
/// size in pages and the byte at the last page.
const COUNTER: &str = r#"(module
  (import "tern" "emit" (func $emit (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $count (mut i32) (i32.const 0))
  (global $wide (mut i64) (i64.const 0x1234567890))
  (global $seed i32 (i32.const 99))
  (data (i32.const 100) "state")
  (func (export "tern_alloc") (param i32) (result i32) (i32.const 4096))
  (func (export "tern_on_message") (param $ptr i32) (param $len i32) (result i32)
    (global.set $count (i32.add (global.get $count) (i32.const 1)))
    (global.set $wide (i64.mul (global.get $wide) (i64.const 3)))
    (i32.store (i32.const 200) (i32.add (i32.load (i32.const 200)) (global.get $count)))
    (if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 103))
      (then
        (drop (memory.grow (i32.const 2)))
        (i32.store8 (i32.sub (i32.mul (memory.size) (i32.const 65536)) (i32.const 1))
                    (global.get $count))))
    (i32.store (i32.const 0) (global.get $count))
    (i64.store (i32.const 4) (global.get $wide))
    (i32.store (i32.const 12) (memory.size))
    (i32.store (i32.const 16) (i32.load (i32.const 200)))
    (i32.store8 (i32.const 20)
      (i32.load8_u (i32.sub (i32.mul (memory.size) (i32.const 65536)) (i32.const 1))))
    (drop (call $emit (i32.const 0) (i32.const 21)))
    (i32.const 0)))"#;

fn runtime() -> Runtime {
    Runtime::builder(Arc::new(CpuDevice::new()))
        .limits(Limits {
            memory_bytes: 16 << 20,
            call_time: Duration::from_secs(10),
            ..Limits::default()
        })
        .build()
        .unwrap()
}

fn module(rt: &Runtime, wat: &str) -> Arc<ActorModule> {
    Arc::new(ActorModule::new(rt, "counter", wat.as_bytes()).unwrap())
}

fn restore(rt: &Runtime, module: &Arc<ActorModule>, bytes: &[u8]) -> Actor {
    let view = tern_snapshot::parse(bytes).expect("the snapshot parses");
    Actor::restore(rt, module, &view).expect("the snapshot restores")
}

#[test]
fn a_restored_actor_continues_exactly_like_the_original() {
    let rt = runtime();
    let module = module(&rt, COUNTER);
    let mut original = Actor::start(&rt, &module).unwrap();
    for m in ["a", "grow", "b"] {
        assert_eq!(original.send(m.as_bytes()).unwrap().code, 0);
    }
    let snapshot = original.snapshot().unwrap();
    let mut restored = restore(&rt, &module, &snapshot);
    assert_eq!(restored.memory_bytes(), 3 * 65536);
    assert_eq!(
        restored.snapshot().unwrap(),
        snapshot,
        "restore then snapshot changed bytes"
    );
    for m in ["c", "grow", "d"] {
        let a = original.send(m.as_bytes()).unwrap();
        let b = restored.send(m.as_bytes()).unwrap();
        assert_eq!(a, b, "after message {m:?}");
    }
    let last = original.send(b"e").unwrap().output;
    assert_eq!(u32::from_le_bytes(last[0..4].try_into().unwrap()), 7);
    assert_eq!(u32::from_le_bytes(last[12..16].try_into().unwrap()), 5);
    assert_eq!(original.snapshot().unwrap(), {
        restored.send(b"e").unwrap();
        restored.snapshot().unwrap()
    });
}

#[test]
fn forks_of_one_snapshot_are_independent() {
    let rt = runtime();
    let module = module(&rt, COUNTER);
    let mut actor = Actor::start(&rt, &module).unwrap();
    actor.send(b"a").unwrap();
    let snapshot = actor.snapshot().unwrap();
    let mut left = restore(&rt, &module, &snapshot);
    let mut right = restore(&rt, &module, &snapshot);
    assert_ne!(left.memory_base(), right.memory_base());
    left.send(b"grow").unwrap();
    left.send(b"x").unwrap();
    let r = right.send(b"x").unwrap().output;
    assert_eq!(
        u32::from_le_bytes(r[0..4].try_into().unwrap()),
        2,
        "right saw left's messages"
    );
    assert_eq!(
        u32::from_le_bytes(r[12..16].try_into().unwrap()),
        1,
        "right saw left's growth"
    );
    assert_eq!(left.memory_bytes(), 3 * 65536);
}

#[test]
fn saving_replaces_the_file_whole_and_restores_from_disk() {
    let dir = std::env::temp_dir().join(format!("tern-actor-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("counter.tern");
    let rt = runtime();
    let module = module(&rt, COUNTER);
    let mut actor = Actor::start(&rt, &module).unwrap();
    actor.send(b"a").unwrap();
    actor.save(&path).unwrap();
    actor.send(b"grow").unwrap();
    let written = actor.save(&path).unwrap();
    assert_eq!(written, std::fs::metadata(&path).unwrap().len());
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "a temporary file was left behind");
    let file = SnapshotFile::open(&path).unwrap();
    let mut restored = Actor::restore(&rt, &module, &file.view().unwrap()).unwrap();
    assert_eq!(restored.send(b"z").unwrap(), actor.send(b"z").unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn another_module_is_refused_by_name_and_digest() {
    let rt = runtime();
    let module = module(&rt, COUNTER);
    let mut actor = Actor::start(&rt, &module).unwrap();
    let snapshot = actor.snapshot().unwrap();
    let other = Arc::new(
        ActorModule::new(
            &rt,
            "other",
            COUNTER.replace("0x1234567890", "7").as_bytes(),
        )
        .unwrap(),
    );
    let view = tern_snapshot::parse(&snapshot).unwrap();
    let err = Actor::restore(&rt, &other, &view).err().expect("refused");
    assert!(matches!(err, ActorError::Incompatible(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("`counter`") && text.contains("`other`"),
        "{text}"
    );
    assert!(
        text.contains(module.digest()) && text.contains(other.digest()),
        "{text}"
    );
}

#[test]
fn a_memory_larger_than_the_cap_is_refused() {
    let rt = runtime();
    let module = module(&rt, COUNTER);
    let mut actor = Actor::start(&rt, &module).unwrap();
    for _ in 0..40 {
        actor.send(b"grow").unwrap();
    }
    let snapshot = actor.snapshot().unwrap();
    let small = Runtime::builder(Arc::new(CpuDevice::new()))
        .limits(Limits {
            memory_bytes: 1 << 20,
            ..Limits::default()
        })
        .build()
        .unwrap();
    let module_small = Arc::new(ActorModule::new(&small, "counter", COUNTER.as_bytes()).unwrap());
    let view = tern_snapshot::parse(&snapshot).unwrap();
    let err = Actor::restore(&small, &module_small, &view)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("cannot grow"), "{err}");
}

#[test]
fn mutable_tables_and_poisoned_actors_are_refused() {
    let rt = runtime();
    let tables = r#"(module (memory (export "memory") 1) (table 2 funcref)
      (func (export "tern_alloc") (param i32) (result i32) (i32.const 0))
      (func (export "tern_on_message") (param i32 i32) (result i32)
        (table.set 0 (i32.const 1) (ref.null func)) (i32.const 0)))"#;
    let mut actor = Actor::start(&rt, &module(&rt, tables)).unwrap();
    let err = actor.snapshot().expect_err("refused");
    assert!(err.to_string().contains("table.set"), "{err}");

    let trap = COUNTER.replace("(i32.const 0)))", "(unreachable)))");
    let mut actor = Actor::start(&rt, &module(&rt, &trap)).unwrap();
    assert!(actor.send(b"a").is_err());
    assert!(matches!(actor.snapshot(), Err(ActorError::Poisoned(_))));
}

#[test]
fn a_snapshot_does_not_stop_other_actors() {
    let rt = Arc::new(
        Runtime::builder(Arc::new(CpuDevice::new()))
            .limits(Limits {
                call_time: Duration::from_secs(1),
                ..Limits::default()
            })
            .build()
            .unwrap(),
    );
    let spin = r#"(module (memory (export "memory") 1)
      (func (export "tern_alloc") (param i32) (result i32) (i32.const 0))
      (func (export "tern_on_message") (param i32 i32) (result i32) (loop $l (br $l)) (i32.const 0)))"#;
    let spin_module = module(&rt, spin);
    let done = Arc::new(AtomicBool::new(false));
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let worker = {
        let (rt, done) = (rt.clone(), done.clone());
        std::thread::spawn(move || {
            let mut actor = Actor::start(&rt, &spin_module).unwrap();
            started_tx.send(()).unwrap();
            let result = actor.send(b"");
            done.store(true, Ordering::SeqCst);
            result
        })
    };
    started_rx.recv().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let module = module(&rt, COUNTER);
    let mut actor = Actor::start(&rt, &module).unwrap();
    actor.send(b"grow").unwrap();
    let snapshot = actor.snapshot().unwrap();
    let mut restored = restore(&rt, &module, &snapshot);
    assert_eq!(restored.send(b"x").unwrap(), actor.send(b"x").unwrap());
    assert!(
        !done.load(Ordering::SeqCst),
        "the snapshot waited for the spinning actor"
    );
    let spun = worker.join().unwrap();
    assert!(
        matches!(spun, Err(ActorError::TimeLimit { .. })),
        "{spun:?}"
    );
}

/// Opens the model its message names and keeps it open.
const OPENER: &str = r#"(module
  (import "tern" "model_open" (func $model_open (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "tern_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tern_on_message") (param $ptr i32) (param $len i32) (result i32)
    (call $model_open (local.get $ptr) (local.get $len))))"#;

/// Writes a tiny random-weight model of weights `seed` to a file of its own; returns its path.
fn tiny_model_file(seed: u64) -> std::path::PathBuf {
    use std::sync::atomic::AtomicUsize;
    use tern_model::generate::{Types, shape, write_random_llama};
    use tern_model::quant::DType;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "tern-actor-snapshot-{}-{}.gguf",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let types = Types {
        linear: DType::Q8_0,
        embd: DType::Q8_0,
    };
    write_random_llama(&path, shape("tiny").unwrap(), types, seed).unwrap();
    path
}

/// A runtime offering `model` (under its name), and the opener module.
fn with_model(model: tern_model::Model) -> (Runtime, Arc<ActorModule>) {
    let rt = Runtime::builder(Arc::new(CpuDevice::new()))
        .model(Arc::new(model))
        .build()
        .unwrap();
    let module = Arc::new(ActorModule::new(&rt, "opener", OPENER.as_bytes()).unwrap());
    (rt, module)
}

/// A snapshot of an opener actor that opened `tiny` in `rt`.
fn snapshot_with_tiny(rt: &Runtime, module: &Arc<ActorModule>) -> Vec<u8> {
    let mut actor = Actor::start(rt, module).unwrap();
    assert_eq!(actor.send(b"tiny").unwrap().code, 0);
    actor.snapshot().unwrap()
}

#[test]
fn a_model_of_the_same_name_and_other_contents_is_refused() {
    let (a, b) = (tiny_model_file(1), tiny_model_file(2));
    let (rt, module) = with_model(tern_model::Model::open("tiny", &a, 1).unwrap());
    let snapshot = snapshot_with_tiny(&rt, &module);
    let mut view = tern_snapshot::parse(&snapshot).unwrap();
    let sha256 = view.manifest.models[0].sha256.clone().unwrap();
    let other = tern_model::Model::open("tiny", &b, 1).unwrap();
    assert_ne!(other.digest.to_string(), sha256);
    let (other_rt, other_module) = with_model(other);
    let err = Actor::restore(&other_rt, &other_module, &view)
        .err()
        .expect("refused");
    assert!(matches!(err, ActorError::Incompatible(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("model `tiny` differs")
            && text.contains(&format!("the snapshot has {sha256}")),
        "{text}"
    );
    assert!(text.contains("sha256"), "{text}");

    // A version-1 snapshot (no SHA-256) is held to its sampled digest.
    view.manifest.models[0].sha256 = None;
    view.manifest.models[0].numerics = None;
    let err = Actor::restore(&other_rt, &other_module, &view)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("sampled digest"), "{err}");
    assert!(Actor::restore(&rt, &module, &view).is_ok());
    for path in [a, b] {
        std::fs::remove_file(path).unwrap();
    }
}

#[test]
fn numerics_decide_whether_a_restore_continues_bit_for_bit() {
    use tern_actor::Continuation;
    use tern_model::Precision;
    let path = tiny_model_file(3);
    let (rt, module) = with_model(tern_model::Model::open("tiny", &path, 1).unwrap());
    let snapshot = snapshot_with_tiny(&rt, &module);
    let mut view = tern_snapshot::parse(&snapshot).unwrap();
    let recorded = view.manifest.models[0].numerics.clone().unwrap();
    assert_eq!(
        (recorded.backend.as_str(), recorded.precision.as_str()),
        ("cpu", "reference")
    );

    let same = Actor::restore(&rt, &module, &view).unwrap();
    assert_eq!(same.continuation(&view.manifest), Continuation::Bitwise);

    let fast = tern_model::Model::open("tiny", &path, 1)
        .unwrap()
        .with_precision(Precision::Fast);
    let (fast_rt, fast_module) = with_model(fast);
    let moved = Actor::restore(&fast_rt, &fast_module, &view).unwrap();
    assert_eq!(
        moved.continuation(&view.manifest),
        Continuation::Valid {
            differs: vec!["precision reference → fast".into()]
        }
    );

    // Another architecture or kernel version is named too.
    view.manifest.models[0].numerics = Some(tern_snapshot::Numerics {
        architecture: "sm_90".into(),
        kernels: "0123456789abcdef".into(),
        ..recorded.clone()
    });
    let Continuation::Valid { differs } = same.continuation(&view.manifest) else {
        panic!("the architecture differs");
    };
    assert_eq!(differs.len(), 2, "{differs:?}");
    assert!(
        differs[0].starts_with("kernels 0123456789abcdef → "),
        "{differs:?}"
    );
    assert!(
        differs[1].starts_with("architecture sm_90 → "),
        "{differs:?}"
    );

    // A version-1 snapshot compares device labels.
    view.manifest.models[0].numerics = None;
    view.manifest.host.device = "cpu reference".into();
    assert_eq!(same.continuation(&view.manifest), Continuation::Bitwise);
    assert_eq!(
        moved.continuation(&view.manifest),
        Continuation::Valid {
            differs: vec!["device cpu reference → cpu fast".into()]
        }
    );
    std::fs::remove_file(path).unwrap();
}
