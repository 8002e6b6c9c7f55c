//! The host core under tenants that misbehave: a panic inside a host call, KV caches past
//! their budget, text too large for host work, a template that loops, a failing device; and
//! the virtual clock, whose reading survives a restore on a later date.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tern_actor::{Actor, ActorError, ActorModule, Limits, Runtime};
use tern_compute::cpu::CpuDevice;
use tern_compute::{ComputeError, Device, DeviceChoice, HostMapper, HostRange, MatmulDims};
use tern_model::Model;
use tern_model::generate::{CHATML_TEMPLATE, Types, shape, write_random_llama_with_template};
use tern_model::quant::DType;

/// A tiny random-weight model named `name` whose chat template is `template`.
fn model(name: &str, template: &str) -> Arc<Model> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "tern-host-core-{}-{}.gguf",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let types = Types {
        linear: DType::Q8_0,
        embd: DType::Q8_0,
    };
    write_random_llama_with_template(&path, shape("tiny").unwrap(), types, 3, template).unwrap();
    let model = Model::open(name, &path, 1).unwrap();
    let _ = std::fs::remove_file(&path);
    Arc::new(model)
}

fn cpu() -> Arc<dyn Device> {
    Arc::new(CpuDevice::new())
}

// ---------------------------------------------------------------- panics inside host calls

/// Emits "ok" for any message, except that a message starting with `p` calls the host
/// function that panics.
const PANICKY: &str = r#"(module
  (import "tern" "testing_panic" (func $panic (result i32)))
  (import "tern" "emit" (func $emit (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "ok")
  (func (export "tern_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tern_on_message") (param $ptr i32) (param $len i32) (result i32)
    (if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 112))
      (then (return (call $panic))))
    (drop (call $emit (i32.const 0) (i32.const 2)))
    (i32.const 0)))"#;

#[test]
fn a_host_panic_poisons_only_the_actor_that_caused_it() {
    let rt = Arc::new(Runtime::builder(cpu()).testing_probes().build().unwrap());
    let module = Arc::new(ActorModule::new(&rt, "panicky", PANICKY.as_bytes()).unwrap());
    // Another actor of the same runtime works on another thread all along.
    let other = {
        let (rt, module) = (rt.clone(), module.clone());
        std::thread::spawn(move || {
            let mut actor = Actor::start(&rt, &module).unwrap();
            for _ in 0..200 {
                let reply = actor.send(b"hello").unwrap();
                assert_eq!((reply.code, reply.output.as_slice()), (0, &b"ok"[..]));
            }
        })
    };
    let mut victim = Actor::start(&rt, &module).unwrap();
    assert_eq!(victim.send(b"hello").unwrap().code, 0);
    let err = victim.send(b"panic").unwrap_err();
    assert!(
        matches!(&err, ActorError::HostFault { message, .. }
            if message.contains("testing_panic was called")),
        "{err}"
    );
    assert!(matches!(
        victim.send(b"hello"),
        Err(ActorError::Poisoned(_))
    ));
    assert!(matches!(victim.snapshot(), Err(ActorError::Poisoned(_))));
    other.join().expect("the other actor carried on");
    let mut fresh = Actor::start(&rt, &module).unwrap();
    assert_eq!(fresh.send(b"hello").unwrap().output, b"ok");
}

#[test]
fn the_testing_probes_are_not_linked_by_default() {
    let rt = Runtime::builder(cpu()).build().unwrap();
    let err = Actor::load(&rt, PANICKY.as_bytes()).err().expect("refused");
    assert!(err.to_string().contains("testing_panic"), "{err}");
}

// ---------------------------------------------------------------- the guest's own time

/// Sleeps in the host for 100 ms five times (`s`), or spins in Wasm for ever (anything else).
const SLOW: &str = r#"(module
  (import "tern" "testing_sleep" (func $sleep (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "tern_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tern_on_message") (param $ptr i32) (param $len i32) (result i32)
    (local $i i32)
    (if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 115))
      (then
        (loop $again
          (drop (call $sleep (i32.const 100)))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br_if $again (i32.lt_u (local.get $i) (i32.const 5))))
        (return (i32.const 0))))
    (loop $spin (br $spin))
    (i32.const 0)))"#;

#[test]
fn time_in_host_calls_does_not_count_against_the_guest() {
    let limits = Limits {
        call_time: std::time::Duration::from_millis(200),
        ..Limits::default()
    };
    let rt = Runtime::builder(cpu())
        .testing_probes()
        .limits(limits)
        .build()
        .unwrap();
    let module = Arc::new(ActorModule::new(&rt, "slow", SLOW.as_bytes()).unwrap());
    // Half a second in the host, under a 200 ms limit: the guest itself ran for microseconds.
    let mut sleeper = Actor::start(&rt, &module).unwrap();
    assert_eq!(sleeper.send(b"s").unwrap().code, 0);
    assert_eq!(sleeper.send(b"s").unwrap().code, 0);
    // A guest that runs on its own is still stopped.
    let mut spinner = Actor::start(&rt, &module).unwrap();
    let err = spinner.send(b"x").unwrap_err();
    assert!(matches!(err, ActorError::TimeLimit { .. }), "{err}");
}

// ---------------------------------------------------------------- KV-cache budgets

/// A one-byte message closes the session whose handle it holds; a four-byte one opens a
/// session of that many positions on the default model. Returns the host's result.
const SESSIONS: &str = r#"(module
  (import "tern" "model_open" (func $model_open (param i32 i32) (result i32)))
  (import "tern" "session_open" (func $session_open (param i32 i32) (result i32)))
  (import "tern" "session_close" (func $session_close (param i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "default")
  (func (export "tern_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tern_on_message") (param $ptr i32) (param $len i32) (result i32)
    (local $m i32)
    (local.set $m (call $model_open (i32.const 0) (i32.const 7)))
    (if (i32.lt_s (local.get $m) (i32.const 0)) (then (return (local.get $m))))
    (if (i32.eq (local.get $len) (i32.const 1))
      (then (return (call $session_close (i32.load8_u (local.get $ptr))))))
    (call $session_open (local.get $m) (i32.load (local.get $ptr)))))"#;

/// Bytes a session of `n_ctx` positions on `model` reserves: f32 keys and values.
fn session_bytes(model: &Model, n_ctx: usize) -> u64 {
    let c = model.config();
    (2 * 4 * c.n_layer * n_ctx * c.kv_dim()) as u64
}

fn open_session(actor: &mut Actor, n_ctx: u32) -> i32 {
    actor.send(&n_ctx.to_le_bytes()).unwrap().code
}

#[test]
fn sessions_are_counted_at_full_capacity_against_the_actors_budget() {
    let m = model("tiny", CHATML_TEMPLATE);
    let each = session_bytes(&m, 64);
    let limits = Limits {
        kv_bytes: 3 * each,
        ..Limits::default()
    };
    let rt = Runtime::builder(cpu())
        .model(m)
        .limits(limits)
        .build()
        .unwrap();
    let mut actor = Actor::load(&rt, SESSIONS.as_bytes()).unwrap();
    for handle in 0..3 {
        assert_eq!(open_session(&mut actor, 64), handle);
    }
    assert_eq!(rt.kv_ledger().reserved(), 3 * each);
    // Empty as they are, three sessions of 64 positions are the whole budget.
    assert_eq!(open_session(&mut actor, 1), -9);
    let error = actor.last_error().unwrap();
    assert!(error.contains("this actor's KV-cache budget"), "{error}");
    assert_eq!(actor.send(&[1]).unwrap().code, 0);
    assert_eq!(rt.kv_ledger().reserved(), 2 * each);
    assert_eq!(open_session(&mut actor, 64), 1);
    drop(actor);
    assert_eq!(rt.kv_ledger().reserved(), 0);
}

#[test]
fn the_runtime_wide_total_is_capped_and_restores_count_too() {
    let m = model("tiny", CHATML_TEMPLATE);
    let each = session_bytes(&m, 64);
    let limits = Limits {
        kv_bytes: 2 * each,
        runtime_kv_bytes: 3 * each,
        ..Limits::default()
    };
    let rt = Runtime::builder(cpu())
        .model(m.clone())
        .limits(limits)
        .build()
        .unwrap();
    let module = Arc::new(ActorModule::new(&rt, "sessions", SESSIONS.as_bytes()).unwrap());
    let mut a = Actor::start(&rt, &module).unwrap();
    let mut b = Actor::start(&rt, &module).unwrap();
    assert_eq!(open_session(&mut a, 64), 0);
    assert_eq!(open_session(&mut a, 64), 1);
    assert_eq!(open_session(&mut b, 64), 0);
    assert_eq!(open_session(&mut b, 64), -9);
    let error = b.last_error().unwrap();
    assert!(error.contains("the host's KV-cache memory"), "{error}");

    // A restore reserves its sessions as an open would: the snapshot of `a` (two sessions)
    // does not fit beside what `a` and `b` hold.
    let snapshot = a.snapshot().unwrap();
    let view = tern_snapshot::parse(&snapshot).unwrap();
    let err = Actor::restore(&rt, &module, &view).err().expect("refused");
    assert!(err.to_string().contains("KV-cache"), "{err}");
    assert_eq!(rt.kv_ledger().reserved(), 3 * each);
    drop(a);
    let restored = Actor::restore(&rt, &module, &view).unwrap();
    assert_eq!(rt.kv_ledger().reserved(), 3 * each);
    drop((b, restored));
    assert_eq!(rt.kv_ledger().reserved(), 0);
}

// ---------------------------------------------------------------- bounded host work on text

/// Calls `tern.FUNC(model, msg, len, 0, 0)` on the message and returns its result: the
/// count (or length) the host would write, or an error code.
fn text_guest(func: &str) -> String {
    format!(
        r#"(module
  (import "tern" "model_open" (func $model_open (param i32 i32) (result i32)))
  (import "tern" "{func}" (func $f (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 300)
  (data (i32.const 0) "default")
  (func (export "tern_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tern_on_message") (param $ptr i32) (param $len i32) (result i32)
    (local $m i32)
    (local.set $m (call $model_open (i32.const 0) (i32.const 7)))
    (if (i32.lt_s (local.get $m) (i32.const 0)) (then (return (local.get $m))))
    (call $f (local.get $m) (local.get $ptr) (local.get $len) (i32.const 0) (i32.const 0))))"#
    )
}

fn text_actor(rt: &Runtime, func: &str) -> Actor {
    Actor::load(rt, text_guest(func).as_bytes()).unwrap()
}

#[test]
fn sixteen_mib_of_text_is_refused_before_any_host_work() {
    let rt = Runtime::builder(cpu())
        .model(model("tiny", CHATML_TEMPLATE))
        .build()
        .unwrap();
    let huge = vec![b'a'; 16 << 20];
    for func in ["tokenize", "render_chat"] {
        let mut actor = text_actor(&rt, func);
        assert_eq!(actor.send(&huge).unwrap().code, -10, "{func}");
        let error = actor.last_error().unwrap();
        assert!(error.contains("over the host's limit"), "{func}: {error}");
    }
    // The guest passes the message's length as the count of ids: 16 Mi token ids would
    // detokenize to at least 16 MiB of text, so they are refused before being read.
    let mut actor = text_actor(&rt, "detokenize");
    assert_eq!(actor.send(&huge).unwrap().code, -10);
    let error = actor.last_error().unwrap();
    assert!(error.contains("detokenize's ids"), "{error}");

    // Under the limits the same calls work.
    let mut actor = text_actor(&rt, "tokenize");
    assert!(actor.send(b"hello world").unwrap().code > 0);
    let mut actor = text_actor(&rt, "render_chat");
    let messages = br#"[{"role": "user", "content": "hello"}]"#;
    assert!(actor.send(messages).unwrap().code > 0);
}

#[test]
fn a_template_that_loops_is_stopped_with_an_error() {
    // A trillion steps, each loop within `range`'s own bound.
    let looping = concat!(
        "{% for i in range(10000) %}{% for j in range(10000) %}{% for k in range(10000) %}",
        "{% endfor %}{% endfor %}{% endfor %}"
    );
    let rt = Runtime::builder(cpu())
        .model(model("looping", looping))
        .build()
        .unwrap();
    let mut actor = text_actor(&rt, "render_chat");
    let code = actor
        .send(br#"[{"role": "user", "content": "hi"}]"#)
        .unwrap()
        .code;
    assert_eq!(code, -11);
    let error = actor.last_error().unwrap().to_string();
    assert!(error.contains("limit"), "{error}");
    // The actor is not harmed: a bad argument is an error code, not a fault.
    assert!(actor.fault().is_none());
}

// ---------------------------------------------------------------- the virtual clock

/// Renders the message (a JSON conversation) with the model's template and emits the text.
const RENDER: &str = r#"(module
  (import "tern" "model_open" (func $model_open (param i32 i32) (result i32)))
  (import "tern" "render_chat" (func $render (param i32 i32 i32 i32 i32) (result i32)))
  (import "tern" "emit" (func $emit (param i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 0) "default")
  (func (export "tern_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tern_on_message") (param $ptr i32) (param $len i32) (result i32)
    (local $m i32) (local $n i32)
    (local.set $m (call $model_open (i32.const 0) (i32.const 7)))
    (if (i32.lt_s (local.get $m) (i32.const 0)) (then (return (local.get $m))))
    (local.set $n (call $render (local.get $m) (local.get $ptr) (local.get $len)
                               (i32.const 65536) (i32.const 4096)))
    (if (i32.lt_s (local.get $n) (i32.const 0)) (then (return (local.get $n))))
    (drop (call $emit (i32.const 65536) (local.get $n)))
    (i32.const 0)))"#;

/// 2026-12-03T12:00:00Z in milliseconds since the Unix epoch.
const DEC_3: i64 = 1_796_299_200_000;
const DAY_MS: i64 = 86_400_000;

fn dated_runtime(m: &Arc<Model>, now: i64) -> Runtime {
    Runtime::builder(cpu())
        .model(m.clone())
        .clock(Arc::new(move || now))
        .build()
        .unwrap()
}

fn render(actor: &mut Actor) -> String {
    let reply = actor
        .send(br#"[{"role": "user", "content": " hi"}]"#)
        .unwrap();
    assert_eq!(reply.code, 0, "{:?}", actor.last_error());
    String::from_utf8(reply.output).unwrap()
}

#[test]
fn a_restored_actor_reads_the_clock_it_was_saved_with() {
    let template =
        "{{ strftime_now('%Y-%m-%d') }}{% for m in messages %}{{ m['content'] }}{% endfor %}";
    let m = model("dated", template);
    let then = dated_runtime(&m, DEC_3);
    let module = Arc::new(ActorModule::new(&then, "render", RENDER.as_bytes()).unwrap());
    let mut actor = Actor::start(&then, &module).unwrap();
    assert_eq!(render(&mut actor), "2026-12-03 hi");
    let snapshot = actor.snapshot().unwrap();

    // Three days later, on a fresh host: a new actor sees the new date, the restored one
    // the date its conversation started on.
    let later = dated_runtime(&m, DEC_3 + 3 * DAY_MS);
    let module = Arc::new(ActorModule::new(&later, "render", RENDER.as_bytes()).unwrap());
    let mut fresh = Actor::start(&later, &module).unwrap();
    assert_eq!(render(&mut fresh), "2026-12-06 hi");
    let view = tern_snapshot::parse(&snapshot).unwrap();
    let mut restored = Actor::restore(&later, &module, &view).unwrap();
    assert_eq!(render(&mut restored), "2026-12-03 hi");
    assert_eq!(view.manifest.host.clock_unix_ms, Some(DEC_3));
}

// ---------------------------------------------------------------- device errors keep their kind

/// A device whose every operation fails as a lost GPU would.
#[derive(Debug)]
struct FailingDevice;

// SAFETY: the device never touches memory: mapping records nothing and every operation fails
// before reading or writing.
unsafe impl HostMapper for FailingDevice {
    fn mapper_name(&self) -> String {
        "failing".into()
    }
    fn map_range(&self, _: HostRange) -> Result<(), String> {
        Ok(())
    }
    fn unmap_range(&self, _: HostRange) {}
}

impl Device for FailingDevice {
    fn kind(&self) -> DeviceChoice {
        DeviceChoice::Cpu
    }
    fn describe(&self) -> String {
        "a device that fails".into()
    }
    fn matmul_f32(
        &self,
        _: &[f32],
        _: &[f32],
        _: &mut [f32],
        _: MatmulDims,
    ) -> Result<(), ComputeError> {
        Err(ComputeError::Driver {
            device: "failing".into(),
            what: "launching matmul",
            reason: "the device fell off the bus".into(),
        })
    }
    fn staged_matmul(
        &self,
        _: MatmulDims,
    ) -> Result<Box<dyn tern_compute::StagedMatmul + '_>, ComputeError> {
        Err(ComputeError::Driver {
            device: "failing".into(),
            what: "allocating",
            reason: "the device fell off the bus".into(),
        })
    }
}

#[test]
fn a_failing_device_is_a_device_error_not_a_bad_argument() {
    let rt = Runtime::builder(Arc::new(FailingDevice)).build().unwrap();
    let guest = r#"(module
      (import "tern" "matmul_f32" (func $mm (param i32 i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (func (export "tern_alloc") (param i32) (result i32) (i32.const 1024))
      (func (export "tern_on_message") (param i32 i32) (result i32)
        (call $mm (i32.const 0) (i32.const 64) (i32.const 128) (i32.const 4) (i32.const 4)
                  (i32.const 4))))"#;
    let mut actor = Actor::load(&rt, guest.as_bytes()).unwrap();
    assert_eq!(actor.send(b"").unwrap().code, -6);
    let error = actor.last_error().unwrap();
    assert!(error.contains("fell off the bus"), "{error}");
    // A bad argument on the same device is told apart.
    let bad = guest.replace(
        "(i32.const 128) (i32.const 4)",
        "(i32.const 130) (i32.const 4)",
    );
    let mut actor = Actor::load(&rt, bad.as_bytes()).unwrap();
    assert_eq!(actor.send(b"").unwrap().code, -2);
    assert!(actor.fault().is_none());
}

// ---------------------------------------------------------------- modules are checked once

#[test]
fn a_module_without_the_actor_exports_is_refused_when_compiled() {
    let rt = Runtime::builder(cpu()).build().unwrap();
    let cases = [
        ("(module)", "no memory named `memory`"),
        (
            r#"(module (memory (export "memory") 1))"#,
            "exports no `tern_alloc`",
        ),
        (
            r#"(module (memory (export "memory") 1)
                 (func (export "tern_alloc") (param i64) (result i32) (i32.const 0))
                 (func (export "tern_on_message") (param i32 i32) (result i32) (i32.const 0)))"#,
            "export `tern_alloc` must be",
        ),
        (
            r#"(module (memory (export "memory") 1)
                 (func (export "tern_alloc") (param i32) (result i32) (i32.const 0))
                 (func (export "tern_on_message") (param i32 i32) (result i32) (i32.const 0))
                 (func (export "tern_init") (param i32)))"#,
            "export `tern_init` must be",
        ),
    ];
    for (wat, words) in cases {
        let err = ActorModule::new(&rt, "m", wat.as_bytes())
            .err()
            .expect("refused");
        assert!(err.to_string().contains(words), "{wat}: {err}");
    }
}

// ---------------------------------------------------------------- cancelling a message

/// Emits "x" until `emit` fails, then returns its code.
const CHATTY: &str = r#"(module
  (import "tern" "emit" (func $emit (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "x")
  (func (export "tern_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tern_on_message") (param i32 i32) (result i32)
    (local $code i32)
    (loop $again
      (local.set $code (call $emit (i32.const 0) (i32.const 1)))
      (br_if $again (i32.ge_s (local.get $code) (i32.const 0))))
    (local.get $code)))"#;

#[test]
fn a_cancelled_message_stops_at_the_next_emit_and_the_actor_carries_on() {
    let limits = Limits {
        output_bytes: 1 << 20,
        ..Limits::default()
    };
    let rt = Runtime::builder(cpu()).limits(limits).build().unwrap();
    let mut actor = Actor::load(&rt, CHATTY.as_bytes()).unwrap();
    // The reader goes away after ten bytes.
    let canceller = actor.canceller();
    let mut seen = 0;
    actor.on_output(move |bytes| {
        seen += bytes.len();
        if seen == 10 {
            canceller.cancel();
        }
    });
    let reply = actor.send(b"go").unwrap();
    assert_eq!((reply.code, reply.output.len()), (-12, 10));
    assert!(actor.fault().is_none());
    // The next message starts uncancelled: this one runs into the output limit instead.
    let mut actor = Actor::load(&rt, CHATTY.as_bytes()).unwrap();
    actor.canceller().cancel();
    let reply = actor.send(b"go").unwrap();
    assert_eq!((reply.code, reply.output.len()), (-7, 1 << 20));
}
