//! Hostile guests: every bad argument to every host function, runaway loops, grow bombs and
//! traps end in an error for that guest alone; the host stays up and other actors in the
//! same process keep working.

use std::sync::Arc;
use std::time::Duration;

use tern_actor::{Actor, ActorError, Limits, Runtime};
use tern_compute::cpu::CpuDevice;

const IMPORTS: &str = r#"
  (import "tern" "matmul_f32" (func $matmul (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "tern" "emit" (func $emit (param i32 i32) (result i32)))
  (import "tern" "last_error" (func $last_error (param i32 i32) (result i32)))
"#;

/// A guest whose `tern_on_message` runs `body` (which leaves an i32) with one page of memory.
fn guest(body: &str) -> String {
    format!(
        r#"(module {IMPORTS}
          (memory (export "memory") 1)
          ;; A = [[1,2],[3,4]] at 0, B = [[5,6],[7,8]] at 16.
          (data (i32.const 0) "\00\00\80\3f\00\00\00\40\00\00\40\40\00\00\80\40")
          (data (i32.const 16) "\00\00\a0\40\00\00\c0\40\00\00\e0\40\00\00\00\41")
          (func (export "tern_alloc") (param i32) (result i32) (i32.const 60000))
          (func (export "tern_on_message") (param $ptr i32) (param $len i32) (result i32)
            {body}))"#
    )
}

/// A well-behaved guest: C = A·B at offset 32, emitted as 16 bytes.
fn healthy() -> String {
    guest(
        "(drop (call $matmul (i32.const 0) (i32.const 16) (i32.const 32) (i32.const 2) (i32.const 2) (i32.const 2)))
         (call $emit (i32.const 32) (i32.const 16))",
    )
}

fn runtime(limits: Limits) -> Runtime {
    Runtime::builder(Arc::new(CpuDevice::new()))
        .limits(limits)
        .build()
        .expect("runtime")
}

fn quick_limits() -> Limits {
    Limits {
        memory_bytes: 4 << 20,
        call_time: Duration::from_millis(300),
        ..Limits::default()
    }
}

/// Asserts that a healthy actor in `rt` still computes the right product.
fn assert_healthy(rt: &Runtime) {
    let mut actor = Actor::load(rt, healthy().as_bytes()).expect("healthy actor loads");
    let reply = actor.send(b"go").expect("healthy actor replies");
    assert_eq!(reply.code, 0);
    let c: Vec<f32> = reply
        .output
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(c, [19.0, 22.0, 43.0, 50.0]);
}

/// Sends one message to a guest running `body` and returns its code and last error.
fn call(rt: &Runtime, body: &str) -> (i32, String) {
    let mut actor = Actor::load(rt, guest(body).as_bytes()).expect("guest loads");
    let reply = actor.send(b"").expect("guest replies");
    (
        reply.code,
        actor.last_error().unwrap_or_default().to_string(),
    )
}

fn matmul(a: u32, b: u32, c: u32, m: u32, n: u32, k: u32) -> String {
    format!(
        "(call $matmul (i32.const {a}) (i32.const {b}) (i32.const {c}) (i32.const {m}) (i32.const {n}) (i32.const {k}))",
        a = a as i32,
        b = b as i32,
        c = c as i32,
        m = m as i32,
        n = n as i32,
        k = k as i32
    )
}

#[test]
fn the_healthy_guest_computes_on_its_own_memory() {
    assert_healthy(&runtime(quick_limits()));
}

#[test]
fn bad_matmul_arguments_are_error_codes() {
    let rt = runtime(quick_limits());
    let cases = [
        // (body, code, words in the message)
        (
            matmul(65536 - 8, 16, 32, 2, 2, 2),
            -1,
            "outside guest memory",
        ), // a crosses the end
        (
            matmul(0, 16, 65536 - 4, 2, 2, 2),
            -1,
            "outside guest memory",
        ), // c crosses the end
        (
            matmul(0, 0xFFFF_FFF0, 32, 2, 2, 2),
            -1,
            "outside guest memory",
        ), // b far out of range
        (matmul(0, 16, 32, 65536, 65536, 1), -3, "overflows"), // m*n wraps u32
        (matmul(0, 16, 32, 1 << 16, 1, 1 << 16), -3, "overflows"), // m*k wraps to 0
        (
            matmul(0, 16, 32, u32::MAX, u32::MAX, u32::MAX),
            -3,
            "overflows",
        ),
        (matmul(2, 16, 32, 2, 2, 2), -2, "not a multiple of 4"), // misaligned a
        (matmul(0, 17, 32, 2, 2, 2), -2, "not a multiple of 4"), // misaligned b
        (matmul(0, 16, 33, 2, 2, 2), -2, "not a multiple of 4"), // misaligned c
        (matmul(0, 16, 8, 2, 2, 2), -4, "overlaps"),             // c aliases a
        (matmul(0, 16, 16, 2, 2, 2), -4, "overlaps"),            // c aliases b
        (matmul(0, 16, 32, 200, 200, 200), -1, "outside guest memory"), // too big for memory
    ];
    for (body, code, words) in cases {
        let (got, message) = call(&rt, &body);
        assert_eq!(got, code, "{body}: {message}");
        assert!(
            message.contains(words),
            "{body}: `{message}` lacks `{words}`"
        );
    }
    assert_healthy(&rt);
}

#[test]
fn empty_matmuls_are_valid() {
    let rt = runtime(quick_limits());
    assert_eq!(call(&rt, &matmul(65536, 65536, 65536, 0, 0, 0)).0, 0);
    assert_eq!(call(&rt, &matmul(0, 16, 32, 2, 2, 0)).0, 0);
}

#[test]
fn bad_emit_and_last_error_arguments_are_error_codes() {
    let rt = runtime(quick_limits());
    for (body, code) in [
        ("(call $emit (i32.const 65530) (i32.const 100))", -1),
        ("(call $emit (i32.const -1) (i32.const 2))", -1),
        ("(call $emit (i32.const 0) (i32.const -1))", -1),
        ("(call $emit (i32.const 65536) (i32.const 0))", 0),
        // Make an error first, so last_error has something to write out of bounds.
        (
            &format!(
                "(drop {}) (call $last_error (i32.const 65530) (i32.const 100))",
                matmul(2, 0, 0, 1, 1, 1)
            ),
            -1,
        ),
        (
            &format!(
                "(drop {}) (call $last_error (i32.const -4) (i32.const -1))",
                matmul(2, 0, 0, 1, 1, 1)
            ),
            -1,
        ),
    ] {
        let (got, message) = call(&rt, body);
        assert_eq!(got, code, "{body}: {message}");
    }
    // A good last_error call returns the message's full length and copies the prefix.
    let body = format!(
        "(drop {}) (drop (call $last_error (i32.const 1000) (i32.const 5))) (call $emit (i32.const 1000) (i32.const 5))",
        matmul(2, 0, 0, 1, 1, 1)
    );
    let mut actor = Actor::load(&rt, guest(&body).as_bytes()).unwrap();
    assert_eq!(actor.send(b"").unwrap().output, b"a: of");
    assert_healthy(&rt);
}

#[test]
fn an_infinite_loop_is_interrupted_and_others_keep_working() {
    let rt = runtime(quick_limits());
    let mut spinner =
        Actor::load(&rt, guest("(loop $l (br $l)) (i32.const 0)").as_bytes()).unwrap();
    let worker = std::thread::scope(|s| {
        let worker = s.spawn(|| {
            for _ in 0..20 {
                assert_healthy(&rt);
            }
        });
        let err = spinner.send(b"").unwrap_err();
        assert!(
            matches!(err, ActorError::TimeLimit { limit_ms: 300, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("time limit"), "{err}");
        worker.join()
    });
    worker.expect("the other actor kept working");
    let err = spinner.send(b"").unwrap_err();
    assert!(matches!(err, ActorError::Poisoned(_)), "{err}");
}

#[test]
fn stopping_an_actor_ends_its_loop_long_before_the_time_limit() {
    let rt = runtime(Limits {
        call_time: Duration::from_secs(600),
        ..quick_limits()
    });
    let mut spinner =
        Actor::load(&rt, guest("(loop $l (br $l)) (i32.const 0)").as_bytes()).unwrap();
    let stopper = spinner.canceller();
    let started = std::time::Instant::now();
    let err = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(200));
            stopper.stop();
        });
        spinner.send(b"").unwrap_err()
    });
    assert!(matches!(err, ActorError::Stopped { .. }), "{err}");
    // Well inside the ten-minute limit: the stop is seen at the next epoch check.
    assert!(started.elapsed() < Duration::from_secs(60), "{err}");
    let err = spinner.send(b"").unwrap_err();
    assert!(matches!(err, ActorError::Poisoned(_)), "{err}");
    assert_healthy(&rt);
}

#[cfg(target_os = "linux")]
#[test]
fn a_spinning_guest_drops_its_thread_to_the_idle_class_and_a_healthy_one_does_not() {
    // The scheduling policy of the thread that ran `wat` once.
    let policy_after = |wat: String| {
        std::thread::spawn(move || {
            let rt = runtime(quick_limits());
            let mut actor = Actor::load(&rt, wat.as_bytes()).unwrap();
            let _ = actor.send(b"");
            // SAFETY: sched_getscheduler(0) reads the calling thread's policy; no memory.
            unsafe { libc::sched_getscheduler(0) }
        })
        .join()
        .unwrap()
    };
    assert_eq!(policy_after(healthy()), libc::SCHED_OTHER);
    assert_eq!(
        policy_after(guest("(loop $l (br $l)) (i32.const 0)")),
        libc::SCHED_IDLE
    );
}

#[test]
fn a_grow_bomb_hits_the_cap_with_a_clear_error() {
    let rt = runtime(quick_limits());
    let bomb = guest(
        "(loop $l (br_if $l (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
         (unreachable)",
    );
    let mut actor = Actor::load(&rt, bomb.as_bytes()).unwrap();
    let err = actor.send(b"").unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ActorError::Trap { .. }), "{text}");
    assert!(
        text.contains("refused") && text.contains("cap is 4194304 bytes"),
        "{text}"
    );
    assert_eq!(actor.memory_bytes(), 4 << 20);
    assert_healthy(&rt);
}

#[test]
fn memory_grow_returns_minus_one_past_the_cap() {
    let rt = runtime(quick_limits());
    // 1 page now; the cap is 64 pages: growing by 63 works, by 1 more fails.
    let body = "(drop (memory.grow (i32.const 63))) (memory.grow (i32.const 1))";
    assert_eq!(call(&rt, body).0, -1);
    assert_eq!(call(&rt, "(memory.grow (i32.const 63))").0, 1);
}

#[test]
fn a_trap_poisons_only_that_actor() {
    let rt = runtime(quick_limits());
    let mut bad = Actor::load(&rt, guest("(unreachable)").as_bytes()).unwrap();
    let mut good = Actor::load(&rt, healthy().as_bytes()).unwrap();
    let err = bad.send(b"").unwrap_err();
    assert!(
        matches!(
            err,
            ActorError::Trap {
                export: "tern_on_message",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("unreachable"), "{err}");
    assert!(matches!(
        bad.send(b"").unwrap_err(),
        ActorError::Poisoned(_)
    ));
    assert!(bad.fault().is_some());
    assert_eq!(good.send(b"").unwrap().code, 0);
}

#[test]
fn an_out_of_bounds_guest_load_traps() {
    let rt = runtime(quick_limits());
    let mut actor = Actor::load(&rt, guest("(i32.load (i32.const -16))").as_bytes()).unwrap();
    let err = actor.send(b"").unwrap_err();
    assert!(err.to_string().contains("out of bounds"), "{err}");
    assert_healthy(&rt);
}

#[test]
fn a_bad_alloc_result_is_refused() {
    let rt = runtime(quick_limits());
    let wat = guest("(i32.const 0)").replace("(i32.const 60000))", "(i32.const 65530))");
    let mut actor = Actor::load(&rt, wat.as_bytes()).unwrap();
    let err = actor.send(&[7u8; 100]).unwrap_err();
    assert!(
        matches!(
            err,
            ActorError::Abi {
                export: "tern_alloc",
                ..
            }
        ),
        "{err}"
    );
    assert_healthy(&rt);
}

#[test]
fn malformed_modules_are_refused_clearly() {
    let rt = runtime(quick_limits());
    let cases = [
        (b"\0asm\x01\0\0\0garbage".to_vec(), "invalid module"),
        (b"not wasm at all".to_vec(), "invalid module"),
        (
            guest("(i32.const 0)")
                .replace("(memory (export \"memory\") 1)", "(memory 1)")
                .into_bytes(),
            "no memory",
        ),
        (
            guest("(i32.const 0)")
                .replace("\"tern_on_message\"", "\"other\"")
                .into_bytes(),
            "tern_on_message",
        ),
        (
            guest("(i32.const 0)")
                .replace("\"emit\"", "\"launch_missiles\"")
                .into_bytes(),
            "launch_missiles",
        ),
        (
            guest("(i32.const 0)")
                .replace(
                    "(memory (export \"memory\") 1)",
                    "(memory (export \"memory\") 100)",
                )
                .into_bytes(),
            "cap",
        ),
    ];
    for (wasm, words) in cases {
        let err = Actor::load(&rt, &wasm).err().expect("refused");
        assert!(err.to_string().contains(words), "`{err}` lacks `{words}`");
    }
    assert_healthy(&rt);
}

#[test]
fn a_trapping_start_or_init_is_an_error() {
    let rt = runtime(quick_limits());
    let init = guest("(i32.const 0)").replace(
        "(func (export \"tern_alloc\")",
        "(func (export \"tern_init\") (unreachable)) (func (export \"tern_alloc\")",
    );
    let err = Actor::load(&rt, init.as_bytes()).err().expect("refused");
    assert!(
        matches!(
            err,
            ActorError::Trap {
                export: "tern_init",
                ..
            }
        ),
        "{err}"
    );
    let start = guest("(i32.const 0)").replace(
        "(func (export \"tern_alloc\")",
        "(start $boom) (func $boom (loop $l (br $l))) (func (export \"tern_alloc\")",
    );
    let err = Actor::load(&rt, start.as_bytes()).err().expect("refused");
    assert!(matches!(err, ActorError::TimeLimit { .. }), "{err}");
    assert_healthy(&rt);
}
