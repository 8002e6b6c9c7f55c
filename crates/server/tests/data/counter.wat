(module
  (import "tern" "emit" (func $emit (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $count (mut i32) (i32.const 0))
  ;; A message is written right after the log (which starts at 64, its length at 0), the
  ;; memory grown to hold it: the log never overlaps the message.
  (func (export "tern_alloc") (param $len i32) (result i32)
    (local $at i32)
    (local $short i32)
    (local.set $at (i32.add (i32.const 64) (i32.load (i32.const 0))))
    (local.set $short
      (i32.sub (i32.add (local.get $at) (local.get $len))
               (i32.shl (memory.size) (i32.const 16))))
    (if (i32.gt_s (local.get $short) (i32.const 0))
      (then
        (if (i32.lt_s
              (memory.grow (i32.add (i32.shr_u (local.get $short) (i32.const 16)) (i32.const 1)))
              (i32.const 0))
          (then (unreachable)))))
    (local.get $at))
  (func (export "tern_on_message") (param $ptr i32) (param $len i32) (result i32)
    (local $log i32)
    (local.set $log (i32.load (i32.const 0)))
    (memory.copy (i32.add (i32.const 64) (local.get $log)) (local.get $ptr) (local.get $len))
    (local.set $log (i32.add (local.get $log) (local.get $len)))
    (i32.store (i32.const 0) (local.get $log))
    (global.set $count (i32.add (global.get $count) (i32.const 1)))
    (drop (call $emit (i32.const 64) (local.get $log)))
    (global.get $count)))
