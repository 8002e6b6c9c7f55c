//! The `tern` binary end to end: the main job, and clear errors for bad input.

use std::process::Command;

fn tern(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .output()
        .expect("tern runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("panicked"), "tern panicked: {text}");
    (out.status.success(), text)
}

#[test]
fn the_matmul_actor_reports_zero_errors_and_pointer_identity() {
    let (ok, text) = tern(&["run", "matmul", "--device", "cpu"]);
    assert!(ok, "{text}");
    assert!(text.contains("matmul 128x128: 0 errors of 16384"), "{text}");
    assert!(text.contains("device: cpu"), "{text}");
    assert!(text.contains("== host pointer (zero-copy)"), "{text}");
}

#[test]
fn auto_picks_a_device_that_works() {
    let (ok, text) = tern(&["run", "matmul"]);
    assert!(ok, "{text}");
    assert!(text.contains("0 errors of 16384"), "{text}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let cases: &[(&[&str], &str)] = &[
        (&["run", "no-such-guest"], "no bundled guest"),
        (
            &["run", "matmul", "--device", "tpu"],
            "unknown device `tpu`",
        ),
        (&["run", "Cargo.toml"], "invalid module"),
        (&["run", "matmul", "--memory-mib", "0"], "cap"),
        (&["bench", "zero-copy", "--device", "gpu"], "unknown device"),
    ];
    for (args, words) in cases {
        let (ok, text) = tern(args);
        assert!(!ok, "{args:?} succeeded: {text}");
        assert!(text.contains(words), "{args:?}: `{text}` lacks `{words}`");
    }
}

#[test]
fn cuda_without_a_gpu_says_so() {
    let (ok, text) = tern(&["run", "matmul", "--device", "cuda"]);
    if ok {
        assert!(text.contains("device: cuda"), "{text}");
    } else {
        assert!(
            text.contains("no CUDA device") || text.contains("no CUDA support"),
            "{text}"
        );
    }
}

/// Opens the model the message names (or `default`) and emits its `model_info` JSON.
const MODEL_INFO_GUEST: &str = r#"(module
  (import "tern" "model_open" (func $model_open (param i32 i32) (result i32)))
  (import "tern" "model_info" (func $model_info (param i32 i32 i32) (result i32)))
  (import "tern" "emit" (func $emit (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "default")
  (func (export "tern_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tern_on_message") (param $ptr i32) (param $len i32) (result i32)
    (local $m i32) (local $n i32)
    (if (i32.eqz (local.get $len))
      (then (local.set $ptr (i32.const 0)) (local.set $len (i32.const 7))))
    (local.set $m (call $model_open (local.get $ptr) (local.get $len)))
    (if (i32.lt_s (local.get $m) (i32.const 0)) (then (return (local.get $m))))
    (local.set $n (call $model_info (local.get $m) (i32.const 4096) (i32.const 4096)))
    (drop (call $emit (i32.const 4096) (local.get $n)))
    (i32.const 0)))"#;

/// A user's own module, and a generated model, in a fresh temporary folder.
fn own_module_and_model(test: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    use tern_model::generate::{Types, shape, write_random_llama};
    use tern_model::quant::DType;
    let dir = std::env::temp_dir().join(format!("tern-cli-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let module = dir.join("mine.wat");
    std::fs::write(&module, MODEL_INFO_GUEST).unwrap();
    let model = dir.join("little.gguf");
    let types = Types {
        linear: DType::Q8_0,
        embd: DType::Q8_0,
    };
    write_random_llama(&model, shape("tiny").unwrap(), types, 5).unwrap();
    (module, model)
}

#[test]
fn a_users_own_module_gets_every_configured_model() {
    let (module, model) = own_module_and_model("own");
    let (module, model) = (module.to_str().unwrap(), model.to_str().unwrap());
    let named = format!("other={model}");
    let args = [
        "run", module, "--device", "cpu", "--model", model, "--model", &named,
    ];
    let (ok, text) = tern(&args);
    assert!(ok, "{text}");
    assert!(text.contains(r#""name":"little""#), "{text}");
    let (ok, text) = tern(&[&args[..], &["--message", "other"]].concat());
    assert!(ok, "{text}");
    assert!(text.contains(r#""name":"other""#), "{text}");
    let (ok, text) = tern(&[&args[..], &["--message", "nothing"]].concat());
    assert!(!ok, "{text}");
    assert!(
        text.contains("unknown model `nothing` (this host offers little, other)"),
        "{text}"
    );

    let out = std::env::temp_dir().join(format!("tern-cli-own-{}.tern", std::process::id()));
    let out = out.to_str().unwrap();
    let snap = [
        "snapshot", module, "--device", "cpu", "--model", model, "--out", out,
    ];
    let (ok, text) = tern(&[&snap[..], &["--message", ""]].concat());
    assert!(ok, "{text}");
    let (ok, text) = tern(&["restore", out, "--device", "cpu", "--model", model]);
    assert!(ok, "{text}");
    let _ = std::fs::remove_file(out);
}

#[test]
fn without_a_model_flag_any_module_gets_the_default_model() {
    let (module, _) = own_module_and_model("default");
    let (ok, text) = tern(&["run", module.to_str().unwrap(), "--device", "cpu"]);
    assert!(ok, "{text}");
    assert!(text.contains(r#""name":"smollm2-135m-instruct""#), "{text}");
}

/// A state folder for a `tern serve` test, so that it neither needs nor touches the
/// default one in the home folder: one of its own for each server a test starts (tests run
/// side by side, and a folder takes one server at a time).
fn scratch_state() -> String {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("tern-cli-serve-state-{}-{n}", std::process::id()));
    dir.to_str().unwrap().to_string()
}

#[test]
fn serve_prints_its_address_and_answers_health() {
    use std::io::{BufRead, Read, Write};
    let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["serve", "--device", "cpu", "--listen", "127.0.0.1:0"])
        .args(["--state", &scratch_state()])
        .env_remove("TERN_API_KEY")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tern runs");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().strip_prefix("listening on http://");
    let answer = addr.map(|addr| {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    });
    let _ = child.kill();
    let _ = child.wait();
    let answer = answer.unwrap_or_else(|| panic!("no address in {line:?}"));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#"{"status":"ok"}"#), "{answer}");
}

#[test]
fn serve_refuses_a_port_in_use_and_an_empty_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (ok, text) = tern(&[
        "serve",
        "--device",
        "cpu",
        "--listen",
        &addr,
        "--state",
        &scratch_state(),
    ]);
    assert!(
        !ok && text.contains(&format!("cannot listen on {addr}")),
        "{text}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["serve", "--device", "cpu", "--listen", "127.0.0.1:0"])
        .args(["--state", &scratch_state()])
        .env("TERN_API_KEY", " \n")
        .output()
        .expect("tern runs");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("the API key is empty"),
        "{text}"
    );
}

#[test]
fn the_host_wide_kv_cap_is_a_flag() {
    let (module, model) = own_module_and_model("hostkv");
    let sessions = module.with_file_name("sessions.wat");
    std::fs::write(
        &sessions,
        r#"(module
  (import "tern" "model_open" (func $model_open (param i32 i32) (result i32)))
  (import "tern" "session_open" (func $session_open (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "default")
  (func (export "tern_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tern_on_message") (param i32 i32) (result i32)
    (call $session_open (call $model_open (i32.const 0) (i32.const 7)) (i32.const 256))))"#,
    )
    .unwrap();
    let (sessions, model) = (sessions.to_str().unwrap(), model.to_str().unwrap());
    let run = ["run", sessions, "--device", "cpu", "--model", model];
    let (ok, text) = tern(&run);
    assert!(ok, "{text}");
    let (ok, text) = tern(&[&run[..], &["--host-kv-mib", "0"]].concat());
    assert!(!ok, "{text}");
    assert!(
        text.contains("the host's KV-cache memory is exhausted"),
        "{text}"
    );
}
