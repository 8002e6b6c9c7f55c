//! `tern serve`'s OpenAI-compatible routes as a real process on the default model (which
//! scripts/test fetches first): the official `openai` Python client against it, and the
//! determinism guarantee (the same request gives the same bytes alone or among many, with
//! its prefix reused or prefilled fresh, with its actor passivated, and after a crash).

mod live;

use std::path::PathBuf;
use std::process::Command;

use live::{Serve, state_dir};
use serde_json::{Value, json};

/// The interpreter of the Python environment scripts/python-env makes (with `openai`).
fn python() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(root.join("scripts/python-env"))
        .output()
        .expect("scripts/python-env runs");
    assert!(
        out.status.success(),
        "scripts/python-env: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

#[test]
fn the_official_openai_client_works_against_tern_serve() {
    let dir = state_dir("openai-client");
    let key = "test-key-0123456789";
    let server = Serve::start_with(&dir, &[], Some(key));
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = Command::new(python())
        .arg(script)
        .arg(format!("http://{}/v1", server.addr))
        .arg(key)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok: a wrong key is a 401"), "{stdout}");
    server.kill();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A sampled (not greedy) chat request: the seed decides the bytes.
fn chat(messages: &Value) -> Vec<u8> {
    json!({"messages": messages, "temperature": 0.8, "seed": 11, "max_tokens": 12})
        .to_string()
        .into_bytes()
}

/// Posts a chat request (in `session`, if given); returns the reply's text and how many
/// prompt tokens were already cached.
fn ask(server: &Serve, session: Option<&str>, body: &[u8]) -> (String, u64, Option<String>) {
    let header = session.map(|s| format!("X-Tern-Session: {s}"));
    let headers: Vec<&str> = header.iter().map(String::as_str).collect();
    let answer = server.call("POST", "/v1/chat/completions", &headers, body);
    assert_eq!(answer.status, 200, "{}", answer.json);
    let text = answer.json["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let cached = answer.json["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    (
        text,
        cached,
        answer.header("x-tern-durable").map(String::from),
    )
}

#[test]
fn a_reply_is_the_same_bytes_reused_fresh_passivated_and_after_a_crash() {
    let dir = state_dir("openai-determinism");
    let args = ["--idle-secs", "1"];
    let server = Serve::start_with(&dir, &args, None);
    let mut messages = json!([{"role": "user", "content": "Write a short poem about rain."}]);
    let (first, cached, _) = ask(&server, None, &chat(&messages));
    assert_eq!(cached, 0);
    messages.as_array_mut().unwrap().extend([
        json!({"role": "assistant", "content": first}),
        json!({"role": "user", "content": "Now one about snow."}),
    ]);
    let turn2 = chat(&messages);

    // Stateless: continues in a fork of the actor that answered turn 1.
    let (reused, cached, _) = ask(&server, None, &turn2);
    assert!(cached > 0, "the prefix was not reused");
    // A new session: the whole conversation prefilled fresh, alone and beside others.
    let (fresh, cached, durable) = ask(&server, Some("det"), &turn2);
    let (beside, _, _) = under_load(&server, || ask(&server, Some("det-load"), &turn2));
    assert_eq!(
        beside, fresh,
        "other conversations in the same steps changed the reply"
    );
    assert_eq!(cached, 0);
    assert_eq!(durable.as_deref(), Some("true"));
    assert_eq!(reused, fresh, "prefix reuse changed the reply");

    // The session's actor passivates when idle, and is restored by the next request.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let (_, list) = server.request("GET", "/v1/actors", b"");
    let session_actor = list["actors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["session"] == "det")
        .unwrap()
        .clone();
    assert_eq!(session_actor["state"], "passivated", "{session_actor}");
    let (restored, cached, _) = under_load(&server, || ask(&server, Some("det"), &turn2));
    assert!(cached > 0, "the restored session lost its KV cache");
    assert_eq!(restored, fresh, "passivation changed the reply");
    server.kill();

    // After SIGKILL, the session comes back from its last durable state.
    let server = Serve::start_with(&dir, &args, None);
    let (after_crash, cached, _) = under_load(&server, || ask(&server, Some("det"), &turn2));
    assert!(cached > 0, "the session did not survive the restart");
    assert_eq!(after_crash, fresh, "the restart changed the reply");
    server.kill();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `f` while four other conversations generate on the same server (and so share its
/// batched steps).
fn under_load<T>(server: &Serve, f: impl FnOnce() -> T) -> T {
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        for i in 0..4 {
            let done = &done;
            s.spawn(move || {
                let mut round = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    conversation(server, 100 + i, &format!("load-{i}-{round}"));
                    round += 1;
                }
            });
        }
        let out = f();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        out
    })
}

/// Conversation `i`'s turns, each a sampled request of a few tokens in session `session`;
/// returns the replies.
fn conversation(server: &Serve, i: usize, session: &str) -> Vec<String> {
    let mut messages = Vec::new();
    let mut replies = Vec::new();
    for turn in 0..3 {
        messages.push(json!({"role": "user", "content": format!("Say something about the number {}.", i * 3 + turn)}));
        let body = json!({
            "messages": messages, "temperature": 0.9, "seed": i, "max_tokens": 5,
        });
        let (reply, _, _) = ask(server, Some(session), body.to_string().as_bytes());
        messages.push(json!({"role": "assistant", "content": reply}));
        replies.push(reply);
    }
    replies
}

#[test]
fn sixty_four_concurrent_conversations_each_get_the_replies_they_get_alone() {
    const N: usize = 64;
    let dir = state_dir("openai-concurrency");
    let server = std::sync::Arc::new(Serve::start_with(&dir, &[], None));
    let started = std::time::Instant::now();
    let together: Vec<Vec<String>> = (0..N)
        .map(|i| {
            let server = server.clone();
            std::thread::spawn(move || conversation(&server, i, &format!("many-{i}")))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let concurrent = started.elapsed();
    // The model's step scheduler put several conversations' forward passes in one step.
    let metrics = server.call("GET", "/metrics", &[], b"").json;
    let counter = |name: &str| -> u64 {
        let text = metrics.as_str().unwrap();
        let line = text.lines().find(|l| l.starts_with(name)).unwrap();
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let (steps, chunks) = (
        counter("tern_model_steps_total{"),
        counter("tern_model_step_chunks_total{"),
    );
    assert!(
        steps > 0 && chunks > steps,
        "{steps} steps for {chunks} chunks"
    );
    let started = std::time::Instant::now();
    for (i, replies) in together.iter().enumerate() {
        assert_eq!(replies.len(), 3);
        let alone = conversation(&server, i, &format!("alone-{i}"));
        assert_eq!(
            replies, &alone,
            "conversation {i} differs when run among {N}"
        );
    }
    eprintln!(
        "{N} conversations: {:.1} s together ({:.1} forward passes a step), {:.1} s one by one",
        concurrent.as_secs_f64(),
        chunks as f64 / steps as f64,
        started.elapsed().as_secs_f64()
    );
    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn kill_9_during_generation_then_the_session_continues_exactly() {
    let dir = state_dir("openai-kill");
    let server = std::sync::Arc::new(Serve::start_with(&dir, &[], None));
    let turn1 = json!([{"role": "user", "content": "Name three rivers."}]);
    let long = |first: &str| {
        json!({
            "messages": [
                turn1[0],
                {"role": "assistant", "content": first},
                {"role": "user", "content": "Tell me a long story about one of them."},
            ],
            "temperature": 0.8, "seed": 3, "max_tokens": 160,
        })
        .to_string()
    };
    // Uninterrupted, in one session.
    let (first, _, _) = ask(&server, Some("ref"), &chat(&turn1));
    let (reference, _, _) = ask(&server, Some("ref"), long(&first).as_bytes());
    // The same conversation in another session, killed while turn 2 generates.
    let (first_again, _, _) = ask(&server, Some("crash"), &chat(&turn1));
    assert_eq!(first_again, first);
    let body = long(&first);
    let pending = {
        let (server, body) = (server.clone(), body.clone());
        std::thread::spawn(move || {
            let headers = ["X-Tern-Session: crash"];
            server
                .call("POST", "/v1/chat/completions", &headers, body.as_bytes())
                .status
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(500));
    server.kill_now();
    let _ = pending.join();
    drop(server);

    let server = Serve::start_with(&dir, &[], None);
    let (after, cached, _) = ask(&server, Some("crash"), body.as_bytes());
    assert!(cached > 0, "turn 1's durable state was lost");
    assert_eq!(
        after, reference,
        "the continued session differs from the uninterrupted one"
    );
    server.kill();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn clients_with_the_same_session_name_get_separate_sessions() {
    let dir = state_dir("openai-clients");
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys");
    std::fs::write(&keys, "# two clients\nalice key-a\nbob key-b\n").unwrap();
    let state = dir.join("state");
    let server = Serve::start_with(&state, &["--api-key-file", keys.to_str().unwrap()], None);
    let ask_as = |key: &str, content: &str| {
        let body = json!({"messages": [{"role": "user", "content": content}],
                          "temperature": 0, "max_tokens": 4});
        let auth = format!("Authorization: Bearer {key}");
        let answer = server.call(
            "POST",
            "/v1/chat/completions",
            &[&auth, "X-Tern-Session: shared-name"],
            body.to_string().as_bytes(),
        );
        assert_eq!(answer.status, 200, "{}", answer.json);
        answer.header("x-tern-actor").unwrap().to_string()
    };
    let alice = ask_as("key-a", "Hello from Alice.");
    let bob = ask_as("key-b", "Hello from Bob.");
    assert_ne!(alice, bob, "two clients shared one session");
    assert_eq!(ask_as("key-a", "Hello from Alice."), alice);
    let listed = server.call("GET", "/v1/actors", &["Authorization: Bearer key-b"], b"");
    let ids: Vec<&str> = listed.json["actors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["id"].as_str())
        .collect();
    assert!(
        ids.contains(&bob.as_str()) && !ids.contains(&alice.as_str()),
        "{ids:?}"
    );
    server.kill();
    std::fs::remove_dir_all(&dir).unwrap();
}
