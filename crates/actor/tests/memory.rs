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
