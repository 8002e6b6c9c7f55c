;; Emits 64 KiB at a time until refused (its output limit): a hostile tenant.
(module
  (import "tern" "emit" (func $emit (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "tern_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tern_on_message") (param i32 i32) (result i32)
    (local $r i32)
    (loop $l
      (local.set $r (call $emit (i32.const 0) (i32.const 65536)))
      (br_if $l (i32.ge_s (local.get $r) (i32.const 0))))
    (local.get $r)))
