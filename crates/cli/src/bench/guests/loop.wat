;; Spins until stopped (deleted) or out of time: a hostile tenant.
(module
  (memory (export "memory") 1)
  (func (export "tern_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tern_on_message") (param i32 i32) (result i32)
    (loop $l (br $l))
    (i32.const 0)))
