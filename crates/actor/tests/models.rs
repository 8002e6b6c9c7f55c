//! Which model a guest gets by name: the host's own names, and `default` for the host's only
//! model (what the chat guest asks for before a config names one).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tern_actor::{Actor, Runtime};
use tern_compute::cpu::CpuDevice;
use tern_model::Model;

/// Opens the model the message names and emits its `model_info` JSON.
const GUEST: &str = r#"(module
  (import "tern" "model_open" (func $model_open (param i32 i32) (result i32)))
  (import "tern" "model_info" (func $model_info (param i32 i32 i32) (result i32)))
  (import "tern" "emit" (func $emit (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "tern_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tern_on_message") (param $ptr i32) (param $len i32) (result i32)
    (local $m i32) (local $n i32)
    (local.set $m (call $model_open (local.get $ptr) (local.get $len)))
    (if (i32.lt_s (local.get $m) (i32.const 0)) (then (return (local.get $m))))
    (local.set $n (call $model_info (local.get $m) (i32.const 4096) (i32.const 4096)))
    (if (i32.lt_s (local.get $n) (i32.const 0)) (then (return (local.get $n))))
    (drop (call $emit (i32.const 4096) (local.get $n)))
    (i32.const 0)))"#;

/// A tiny random-weight model named `name`.
fn model(name: &str) -> Arc<Model> {
    use tern_model::generate::{Types, shape, write_random_llama};
    use tern_model::quant::DType;
    // Tests run in parallel threads: every file gets a name of its own.
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "tern-actor-models-{}-{}.gguf",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let types = Types {
        linear: DType::Q8_0,
        embd: DType::Q8_0,
    };
    write_random_llama(&path, shape("tiny").unwrap(), types, 3).unwrap();
    let model = Model::open(name, &path, 1).unwrap();
    let _ = std::fs::remove_file(&path);
    Arc::new(model)
}

/// What opening `name` gives a guest in a runtime offering `models`: its reply code and
/// output, and the last error it saw.
fn open(models: &[&str], name: &str) -> (i32, String, String) {
    let mut builder = Runtime::builder(Arc::new(CpuDevice::new()));
    for m in models {
        builder = builder.model(model(m));
    }
    let runtime = builder.build().unwrap();
    let mut actor = Actor::load(&runtime, GUEST.as_bytes()).unwrap();
    let reply = actor.send(name.as_bytes()).unwrap();
    (
        reply.code,
        String::from_utf8_lossy(&reply.output).into_owned(),
        actor.last_error().unwrap_or_default().to_string(),
    )
}

#[test]
fn a_model_is_opened_by_its_name() {
    let (code, info, _) = open(&["a", "b"], "b");
    assert_eq!(code, 0);
    assert!(info.contains("\"name\":\"b\""), "{info}");
}

#[test]
fn default_names_the_first_model() {
    let (code, info, _) = open(&["smollm"], "default");
    assert_eq!(code, 0);
    assert!(info.contains("\"name\":\"smollm\""), "{info}");
    let (code, info, _) = open(&["b", "a"], "default");
    assert_eq!(code, 0);
    assert!(info.contains("\"name\":\"b\""), "{info}");
    let (code, info, _) = open(&["b", "default"], "default");
    assert_eq!(code, 0);
    assert!(info.contains("\"name\":\"default\""), "{info}");
}

#[test]
fn an_unknown_name_is_its_own_error() {
    let (code, _, error) = open(&["a", "b"], "c");
    assert_eq!(code, -8);
    assert!(
        error.contains("unknown model `c` (this host offers a, b)"),
        "{error}"
    );
    let (code, _, error) = open(&[], "default");
    assert_eq!(code, -8);
    assert!(error.contains("this host offers none"), "{error}");
}

#[test]
fn two_models_of_one_name_are_refused() {
    let err = Runtime::builder(Arc::new(CpuDevice::new()))
        .model(model("a"))
        .model(model("a"))
        .build()
        .err()
        .expect("refused");
    assert!(
        err.to_string().contains("two models are named `a`"),
        "{err}"
    );
}

#[test]
fn a_model_file_loads_when_first_opened_and_is_shared() {
    use tern_model::generate::{Types, shape, write_random_llama};
    use tern_model::quant::DType;
    let path = std::env::temp_dir().join(format!("tern-actor-lazy-{}.gguf", std::process::id()));
    let types = Types {
        linear: DType::Q8_0,
        embd: DType::Q8_0,
    };
    write_random_llama(&path, shape("tiny").unwrap(), types, 3).unwrap();
    let runtime = Runtime::builder(Arc::new(CpuDevice::new()))
        .model_file("lazy", &path)
        .model_file("missing", "/no/such/model.gguf")
        .build()
        .unwrap();
    assert!(runtime.models().loaded().is_empty());
    let mut a = Actor::load(&runtime, GUEST.as_bytes()).unwrap();
    let mut b = Actor::load(&runtime, GUEST.as_bytes()).unwrap();
    assert_eq!(a.send(b"lazy").unwrap().code, 0);
    assert_eq!(b.send(b"default").unwrap().code, 0);
    let loaded = runtime.models().loaded();
    assert_eq!(loaded.len(), 1);
    assert!(Arc::ptr_eq(&loaded[0], &runtime.model("lazy").unwrap()));
    // A configured model whose file is gone is an error for the guest, not for the host.
    assert_eq!(a.send(b"missing").unwrap().code, -5);
    assert!(
        a.last_error()
            .unwrap()
            .contains("cannot load model `missing`")
    );
    assert!(a.fault().is_none());
    let _ = std::fs::remove_file(&path);
}
