//! Hostile tenants on one `tern serve` (a real process on the default model): an actor in
//! an infinite loop, one growing its memory, one opening sessions past its KV quota and one
//! flooding output each get their own error, while a chat request beside them gets the
//! same reply it gets on an idle server.

mod live;

use std::sync::Arc;
use std::time::Instant;

use live::{Serve, state_dir};
use serde_json::json;

/// Spins forever (the bench's hostile guest).
const LOOP: &str = include_str!("../src/bench/guests/loop.wat");

/// Grows its memory a MiB at a time until refused; returns how many MiB it got.
const GROW: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "tern_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tern_on_message") (param i32 i32) (result i32)
    (local $n i32)
    (block $done
      (loop $l
        (br_if $done (i32.eq (memory.grow (i32.const 16)) (i32.const -1)))
        (local.set $n (i32.add (local.get $n) (i32.const 1)))
        (br $l)))
    (local.get $n)))"#;

/// Opens 2,048-position sessions (94 MB of KV cache each on the default model) until
/// refused; returns the code.
const HOARD: &str = r#"(module
  (import "tern" "model_open" (func $open (param i32 i32) (result i32)))
  (import "tern" "session_open" (func $session (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "default")
  (func (export "tern_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tern_on_message") (param i32 i32) (result i32)
    (local $m i32) (local $r i32)
    (local.set $m (call $open (i32.const 16) (i32.const 7)))
    (if (i32.lt_s (local.get $m) (i32.const 0)) (then (return (local.get $m))))
    (loop $l
      (local.set $r (call $session (local.get $m) (i32.const 2048)))
      (br_if $l (i32.ge_s (local.get $r) (i32.const 0))))
    (local.get $r)))"#;

/// Emits 64 KiB at a time until refused; returns the code (the bench's hostile guest).
const FLOOD: &str = include_str!("../src/bench/guests/flood.wat");

/// A greedy chat request; returns its reply and how long it took.
fn victim(server: &Serve) -> (String, f64) {
    let body = json!({
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0, "max_tokens": 16,
    });
    let started = Instant::now();
    let answer = server.call(
        "POST",
        "/v1/chat/completions",
        &[],
        body.to_string().as_bytes(),
    );
    assert_eq!(answer.status, 200, "{}", answer.json);
    let text = answer.json["choices"][0]["message"]["content"]
        .as_str()
        .unwrap();
    (text.to_string(), started.elapsed().as_secs_f64())
}

#[test]
fn hostile_tenants_get_their_own_errors_and_leave_the_others_alone() {
    let dir = state_dir("hostile");
    let args = [
        "--time-limit-ms",
        "400",
        "--memory-mib",
        "16",
        "--kv-mib",
        "256",
        "--prefix-reuse",
        "off",
    ];
    let server = Arc::new(Serve::start_with(&dir, &args, None));
    let (idle_reply, _) = victim(&server); // loads the model
    let (_, idle_time) = victim(&server);

    let actors: Vec<(&str, String)> = [
        ("loop", LOOP),
        ("grow", GROW),
        ("hoard", HOARD),
        ("flood", FLOOD),
    ]
    .into_iter()
    .map(|(name, wat)| {
        let (status, upload) = server.request("POST", "/v1/modules", wat.as_bytes());
        assert_eq!(status, 201, "{upload}");
        (name, server.start_actor(upload["digest"].as_str().unwrap()))
    })
    .collect();
    let attacks: Vec<_> = actors
        .iter()
        .map(|(name, id)| {
            let (server, name, id) = (server.clone(), name.to_string(), id.clone());
            std::thread::spawn(move || {
                let (status, reply) =
                    server.request("POST", &format!("/v1/actors/{id}/messages"), b"go");
                (name, status, reply)
            })
        })
        .collect();
    let (reply, busy_time) = victim(&server);
    assert_eq!(reply, idle_reply, "a hostile neighbour changed the reply");
    for attack in attacks {
        let (name, status, reply) = attack.join().unwrap();
        match name.as_str() {
            "loop" => {
                assert_eq!(status, 409, "{reply}");
                assert!(
                    reply["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("time limit"),
                    "{reply}"
                );
            }
            "grow" => {
                assert_eq!(status, 200, "{reply}");
                let mib = reply["code"].as_i64().unwrap();
                assert!((1..16).contains(&mib), "grew {mib} MiB past a 16 MiB limit");
            }
            "hoard" => {
                assert_eq!(status, 200, "{reply}");
                assert_eq!(reply["code"], -9, "{reply}"); // the KV budget
            }
            "flood" => {
                assert_eq!(status, 200, "{reply}");
                assert!(reply["code"].as_i64().unwrap() < 0, "{reply}");
            }
            _ => unreachable!(),
        }
    }
    // The looping actor is failed and says so; the others still answer.
    let (_, info) = server.request("GET", &format!("/v1/actors/{}", actors[0].1), b"");
    assert_eq!(info["state"], "failed", "{info}");
    for (_, id) in &actors[1..] {
        let (status, reply) =
            server.request("POST", &format!("/v1/actors/{id}/messages"), b"again");
        assert_eq!(status, 200, "{reply}");
    }
    assert_eq!(victim(&server).0, idle_reply);
    eprintln!(
        "chat request: {idle_time:.3} s on an idle server, {busy_time:.3} s beside the hostile actors"
    );
    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
}
