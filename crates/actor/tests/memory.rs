//! The actor's linear memory is Tern's region: same pointer, never moves, guarded.

use std::sync::Arc;

use tern_actor::{Actor, Runtime};
use tern_compute::cpu::CpuDevice;

const GROWER: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "tern_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tern_on_message") (param i32 i32) (result i32)
    ;; Grow by 3 pages, write the last byte of the new memory, return the old size.
    (local $old i32)
    (local.set $old (memory.grow (i32.const 3)))
    (i32.store8 (i32.const 262143) (i32.const 42))
    (local.get $old)))"#;

#[test]
fn data_ptr_is_the_region_base_and_never_moves() {
    let rt = Runtime::builder(Arc::new(CpuDevice::new()))
        .build()
        .unwrap();
    let mut actor = Actor::load(&rt, GROWER.as_bytes()).unwrap();
    let base = actor.memory_base();
    assert!(rt.is_region_base(base), "memory is not a Tern region");
    assert_eq!(base as usize % tern_memory::host_page_size(), 0);
    assert_eq!(actor.memory_bytes(), 65536);
    assert_eq!(actor.send(b"").unwrap().code, 1);
    assert_eq!(actor.memory_base(), base, "growth moved the memory");
    assert_eq!(actor.memory_bytes(), 4 * 65536);
    assert_eq!(actor.send(b"").unwrap().code, 4);
    assert_eq!(actor.memory_base(), base);
}

#[test]
fn regions_are_released_with_their_actors() {
    let rt = Runtime::builder(Arc::new(CpuDevice::new()))
        .build()
        .unwrap();
    let actor = Actor::load(&rt, GROWER.as_bytes()).unwrap();
    let base = actor.memory_base();
    drop(actor);
    assert!(!rt.is_region_base(base));
}

/// On an empty message: the memory's size in pages times 256 plus the OR of all its bytes,
/// then the memory grown by 3 pages and every byte set to 0xAB. On a longer one: a load
/// from the second page, which traps while the memory has one.
const DIRTIER: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "tern_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tern_on_message") (param $ptr i32) (param $len i32) (result i32)
    (local $at i32) (local $acc i32) (local $pages i32)
    (if (local.get $len) (then (return (i32.load8_u (i32.const 65536)))))
    (local.set $pages (memory.size))
    (block $done
      (loop $each
        (br_if $done (i32.ge_u (local.get $at) (i32.mul (local.get $pages) (i32.const 65536))))
        (local.set $acc (i32.or (local.get $acc) (i32.load8_u (local.get $at))))
        (local.set $at (i32.add (local.get $at) (i32.const 1)))
        (br $each)))
    (drop (memory.grow (i32.const 3)))
    (memory.fill (i32.const 0) (i32.const 0xAB) (i32.const 262144))
    (i32.add (i32.mul (local.get $pages) (i32.const 256)) (local.get $acc))))"#;

#[test]
fn a_reused_region_starts_as_a_fresh_memory() {
    let rt = Runtime::builder(Arc::new(CpuDevice::new()))
        .build()
        .unwrap();
    let mut first = Actor::load(&rt, DIRTIER.as_bytes()).unwrap();
    let base = first.memory_base();
    assert_eq!(
        first.send(b"").unwrap().code,
        256,
        "a fresh memory: 1 page of zeros"
    );
    assert_eq!(first.memory_bytes(), 4 * 65536);
    drop(first);
    let mut second = Actor::load(&rt, DIRTIER.as_bytes()).unwrap();
    assert_eq!(
        second.memory_base(),
        base,
        "the dropped actor's region was not reused"
    );
    assert!(rt.is_region_base(base));
    assert_eq!(second.memory_bytes(), 65536);
    assert_eq!(
        second.send(b"").unwrap().code,
        256,
        "the reused memory is not as fresh"
    );
    drop(second);
    let mut third = Actor::load(&rt, DIRTIER.as_bytes()).unwrap();
    assert_eq!(third.memory_base(), base);
    let beyond = third.send(b"x");
    assert!(
        beyond.is_err(),
        "a load past the memory's size did not trap: {beyond:?}"
    );
}

/// Grows its memory by 400 pages (25 MiB) on each message.
const BIG: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "tern_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tern_on_message") (param i32 i32) (result i32)
    (memory.grow (i32.const 400))))"#;

#[test]
fn a_small_memory_does_not_take_a_large_kept_region() {
    let rt = Runtime::builder(Arc::new(CpuDevice::new()))
        .build()
        .unwrap();
    let mut big = Actor::load(&rt, BIG.as_bytes()).unwrap();
    assert_eq!(big.send(b"").unwrap().code, 1);
    let base = big.memory_base();
    drop(big);
    assert!(rt.kept_memory().1 >= 401 * 65536, "{:?}", rt.kept_memory());
    let small = Actor::load(&rt, BIG.as_bytes()).unwrap();
    assert_ne!(
        small.memory_base(),
        base,
        "a one-page memory took a 25 MiB region"
    );
    drop(small);
    let restored = tern_memory::expecting(401 * 65536, || Actor::load(&rt, BIG.as_bytes()));
    assert_eq!(
        restored.unwrap().memory_base(),
        base,
        "the expected size found no region"
    );
}
