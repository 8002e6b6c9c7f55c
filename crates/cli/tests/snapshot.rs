//! Snapshots of the chat actor on the default model. The bit-equality protocol: a
//! conversation runs to a checkpoint; branch A goes on uninterrupted for one more turn;
//! branch B's process saves at the checkpoint and is killed with SIGKILL, and a fresh process
//! restores it and runs the same turn. Memory, globals, tokens and KV caches must match byte
//! for byte. Needs the default model (scripts/test fetches it first).
//!
//! The GPU suite runs the same protocol on CUDA with `TERN_BIN` (the packed `tern`) and
//! `TERN_TEST_ARGS` (`--device cuda --model <generated model>`) set.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;

use tern_actor::{Actor, ActorError, ActorModule, Runtime};
use tern_compute::cpu::CpuDevice;
use tern_model::Model;

const TURNS: [&str; 3] = [
    "Name a colour.",
    "Now name a fruit of that colour.",
    "Write one sentence about it.",
];

/// Sampling that depends on the PRNG state the guest keeps in its memory.
const SAMPLING: [&str; 8] = [
    "--temperature",
    "0.8",
    "--seed",
    "7",
    "--max-tokens",
    "12",
    "--threads",
    "2",
];

fn tern() -> Command {
    Command::new(std::env::var_os("TERN_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_tern").into()))
}

/// Extra arguments for every `tern chat` of the protocol (a device and a model).
fn chat_args() -> Vec<String> {
    std::env::var("TERN_TEST_ARGS")
        .map(|a| a.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tern-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn check(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// An interactive `tern chat` that saves to `save` after every reply.
fn interactive(save: &Path) -> Child {
    tern()
        .arg("chat")
        .args(SAMPLING)
        .args(chat_args())
        .arg("--save")
        .arg(save)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tern chat starts")
}

/// Reads `child`'s stderr until it has prompted `n` times (each prompt follows a save).
fn wait_for_prompts(child: &mut Child, n: usize) {
    let stderr = child.stderr.as_mut().unwrap();
    let (mut seen, mut log) = (0, Vec::new());
    let mut byte = [0u8];
    while seen < n {
        assert_eq!(
            stderr.read(&mut byte).unwrap(),
            1,
            "tern chat ended early: {}",
            String::from_utf8_lossy(&log)
        );
        log.push(byte[0]);
        if log.ends_with(b"> ") {
            seen += 1;
        }
    }
}

#[test]
fn sigkill_then_restore_continues_bit_for_bit() {
    let dir = scratch("bits");
    let (checkpoint, a, b) = (
        dir.join("ckpt.tern"),
        dir.join("a.tern"),
        dir.join("b.tern"),
    );

    // Branch B's first process: two turns, saved after each, then killed outright.
    let mut first = interactive(&checkpoint);
    let stdin = first.stdin.as_mut().unwrap();
    writeln!(stdin, "{}\n{}", TURNS[0], TURNS[1]).unwrap();
    wait_for_prompts(&mut first, 3);
    first.kill().expect("SIGKILL");
    first.wait().unwrap();

    // Branch B's second process: restore and run the third turn.
    let out = tern()
        .arg("chat")
        .args(chat_args())
        .args(["--threads", "2", "--resume"])
        .arg(&checkpoint)
        .args(["--prompt", TURNS[2], "--save"])
        .arg(&b)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let reply_b = check(out, "resume");
    assert!(stderr.contains("continuing bit for bit"), "{stderr}");

    // Branch A: the same three turns in one uninterrupted process.
    let mut whole = interactive(&a);
    writeln!(
        whole.stdin.as_mut().unwrap(),
        "{}\n{}\n{}",
        TURNS[0],
        TURNS[1],
        TURNS[2]
    )
    .unwrap();
    drop(whole.stdin.take());
    let replies_a = check(whole.wait_with_output().unwrap(), "uninterrupted chat");

    assert!(
        !reply_b.trim().is_empty(),
        "the restored actor said nothing"
    );
    assert!(
        replies_a.ends_with(&reply_b),
        "the third reply differs:\nuninterrupted: {replies_a:?}\nrestored: {reply_b:?}"
    );
    let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    compare(&a, &b);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_chain_killed_at_random_points_restores_to_a_complete_link() {
    let dir = scratch("killed-chain");
    let path = dir.join("chain.tern");
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for round in 0..4 {
        let _ = std::fs::remove_file(&path);
        let mut chat = interactive(&path);
        let stdin = chat.stdin.as_mut().unwrap();
        for turn in TURNS.iter().cycle().take(8) {
            writeln!(stdin, "{turn}").unwrap();
        }
        // After two saves, killed anywhere in what follows: while generating, or while
        // appending a link (or starting the chain over).
        wait_for_prompts(&mut chat, 2);
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(std::time::Duration::from_millis(seed % 400));
        chat.kill().expect("SIGKILL");
        chat.wait().unwrap();

        let out = tern()
            .args(["restore", "--inspect"])
            .arg(&path)
            .output()
            .unwrap();
        let shown = check(out, "restore --inspect of a killed chain");
        assert!(
            shown.contains("a valid Tern snapshot"),
            "round {round}: {shown}"
        );
        let bytes = std::fs::read(&path).unwrap();
        let links = tern_snapshot::split_links(&bytes).unwrap();
        tern_snapshot::parse_chain(&links.links).unwrap();
        if links.torn_bytes > 0 {
            assert!(shown.contains("did not finish"), "round {round}: {shown}");
        }

        // It restores and takes another turn.
        let out = tern()
            .arg("restore")
            .args(chat_args())
            .args(["--threads", "2", "--message", TURNS[0]])
            .arg(&path)
            .output()
            .unwrap();
        check(out, "restoring a killed chain");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Compares the states two chain files restore to, part by part: globals, host state,
/// models, sessions, linear memory and every KV value.
fn compare(a: &[u8], b: &[u8]) {
    let (la, lb) = (
        tern_snapshot::split_links(a).unwrap(),
        tern_snapshot::split_links(b).unwrap(),
    );
    let (ca, cb) = (
        tern_snapshot::parse_chain(&la.links).unwrap(),
        tern_snapshot::parse_chain(&lb.links).unwrap(),
    );
    let (ma, mb) = (ca.manifest(), cb.manifest());
    assert_eq!(ma.globals, mb.globals, "globals differ");
    assert_eq!(ma.host, mb.host, "host state differs");
    assert_eq!(ma.models, mb.models, "models differ");
    let sessions = |m: &tern_snapshot::Manifest| -> Vec<(u32, u32, Vec<u32>)> {
        (m.sessions.iter())
            .map(|s| (s.slot, s.n_ctx, s.tokens.clone()))
            .collect()
    };
    assert_eq!(sessions(ma), sessions(mb), "session tokens differ");
    assert!(!ma.sessions.is_empty() && !ma.sessions[0].tokens.is_empty());
    assert_eq!(ma.memory_bytes, mb.memory_bytes, "memory sizes differ");
    let mut mem_a = vec![0u8; ma.memory_bytes as usize];
    let mut mem_b = mem_a.clone();
    ca.restore_memory(&mut mem_a).unwrap();
    cb.restore_memory(&mut mem_b).unwrap();
    assert!(mem_a == mem_b, "linear memory differs");
    let n_layer = ma.models[0].n_layer as usize;
    let kv = |chain: &tern_snapshot::Chain<'_>, i: usize| -> Vec<u8> {
        let mut out = Vec::new();
        for layer in 0..n_layer {
            for piece in chain.kv(i).unwrap() {
                out.extend_from_slice(piece.k_layer_bytes(layer).unwrap());
                out.extend_from_slice(piece.v_layer_bytes(layer).unwrap());
            }
        }
        out
    };
    for i in 0..ma.sessions.len() {
        assert!(kv(&ca, i) == kv(&cb, i), "KV cache of session {i} differs");
    }
}

fn model_path() -> PathBuf {
    let out = tern().arg("fetch").output().unwrap();
    PathBuf::from(check(out, "tern fetch").trim())
}

fn chat_module(rt: &Runtime) -> Arc<ActorModule> {
    let wasm = std::fs::read(PathBuf::from(env!("TERN_GUEST_DIR")).join("chat.wasm")).unwrap();
    Arc::new(ActorModule::new(rt, "chat", &wasm).unwrap())
}

fn runtime_with(model: Option<Arc<Model>>) -> Runtime {
    let mut builder = Runtime::builder(Arc::new(CpuDevice::new()));
    if let Some(model) = model {
        builder = builder.model(model);
    }
    builder.build().unwrap()
}

#[test]
fn a_conversation_forks_into_independent_actors() {
    let model = Arc::new(Model::open("smollm2", &model_path(), 2).unwrap());
    let rt = runtime_with(Some(model.clone()));
    let module = chat_module(&rt);
    let mut actor = Actor::start(&rt, &module).unwrap();
    let config =
        br#"{"config": {"model": "smollm2", "max_tokens": 8, "temperature": 0.9, "seed": 3}}"#;
    assert_eq!(actor.send(config).unwrap().code, 0);
    actor.send(TURNS[0].as_bytes()).unwrap();
    let snapshot = actor.snapshot().unwrap();
    let view = tern_snapshot::parse(&snapshot).unwrap();
    let mut left = Actor::restore(&rt, &module, &view).unwrap();
    let mut right = Actor::restore(&rt, &module, &view).unwrap();
    let original = actor.send(TURNS[1].as_bytes()).unwrap();
    assert_eq!(left.send(TURNS[1].as_bytes()).unwrap(), original);
    let other = right.send(b"Say the word blue.").unwrap();
    assert_eq!(other.code, 0);
    assert_eq!(actor.snapshot().unwrap(), left.snapshot().unwrap());
    let (l, r) = (left.snapshot().unwrap(), right.snapshot().unwrap());
    let (vl, vr) = (
        tern_snapshot::parse(&l).unwrap(),
        tern_snapshot::parse(&r).unwrap(),
    );
    assert_ne!(
        vl.manifest.sessions[0].tokens,
        vr.manifest.sessions[0].tokens
    );
    assert_eq!(
        vl.manifest.sessions[0].tokens[..view.manifest.sessions[0].tokens.len()],
        view.manifest.sessions[0].tokens[..],
        "the fork lost its shared history"
    );
}

/// The bit-equality protocol with the model under load: while three other chat actors
/// converse on the same model (their forward passes batched with this actor's by the step
/// scheduler), a conversation is snapshotted, restored and continued; its reply and its
/// final snapshot are the bytes the same conversation gives alone, uninterrupted.
#[test]
fn a_snapshot_taken_and_restored_under_load_continues_bit_for_bit() {
    let model = Arc::new(Model::open("smollm2", &model_path(), 2).unwrap());
    let rt = runtime_with(Some(model.clone()));
    let module = chat_module(&rt);
    let config =
        br#"{"config": {"model": "smollm2", "max_tokens": 8, "temperature": 0.8, "seed": 11}}"#;
    let start = |config: &[u8]| {
        let mut actor = Actor::start(&rt, &module).unwrap();
        assert_eq!(actor.send(config).unwrap().code, 0);
        actor
    };
    // Alone, uninterrupted.
    let mut alone = start(config);
    alone.send(TURNS[0].as_bytes()).unwrap();
    let want = alone.send(TURNS[1].as_bytes()).unwrap();
    let want_snapshot = alone.snapshot().unwrap();
    drop(alone);

    let stop = std::sync::atomic::AtomicBool::new(false);
    let turns = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for i in 0..3u64 {
            let (start, stop, turns) = (&start, &stop, &turns);
            s.spawn(move || {
                let config = format!(
                    r#"{{"config": {{"model": "smollm2", "max_tokens": 6, "temperature": 0.9, "seed": {i}}}}}"#
                );
                let mut actor = start(config.as_bytes());
                let mut turn = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let reply = actor.send(TURNS[turn % TURNS.len()].as_bytes()).unwrap();
                    assert_eq!(reply.code, 0);
                    turns.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    turn += 1;
                    if turn % 4 == 0 {
                        actor = start(config.as_bytes());
                    }
                }
            });
        }
        let mut actor = start(config);
        actor.send(TURNS[0].as_bytes()).unwrap();
        let snapshot = actor.snapshot().unwrap();
        drop(actor);
        let view = tern_snapshot::parse(&snapshot).unwrap();
        let mut restored = Actor::restore(&rt, &module, &view).unwrap();
        let got = restored.send(TURNS[1].as_bytes()).unwrap();
        let got_snapshot = restored.snapshot().unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(got, want, "the reply under load differs");
        assert!(
            got_snapshot == want_snapshot,
            "the snapshot after the turn under load differs"
        );
    });
    assert!(turns.into_inner() > 0, "the load ran no turn");
    assert!(
        model.step_stats().steps < model.step_stats().chunks,
        "no step was shared"
    );
}

#[test]
fn snapshots_for_missing_or_different_models_are_refused() {
    let model = Arc::new(Model::open("smollm2", &model_path(), 1).unwrap());
    let rt = runtime_with(Some(model));
    let module = chat_module(&rt);
    let mut actor = Actor::start(&rt, &module).unwrap();
    let config = br#"{"config": {"model": "smollm2", "max_tokens": 2}}"#;
    assert_eq!(actor.send(config).unwrap().code, 0);
    actor.send(b"Hi").unwrap();
    let snapshot = actor.snapshot().unwrap();
    let view = tern_snapshot::parse(&snapshot).unwrap();

    let bare = runtime_with(None);
    let err = Actor::restore(&bare, &chat_module(&bare), &view)
        .err()
        .unwrap();
    assert!(matches!(err, ActorError::Incompatible(_)));
    assert!(err.to_string().contains("needs model `smollm2`"), "{err}");

    let dir = scratch("tiny");
    let tiny = dir.join("tiny.gguf");
    let shape = tern_model::generate::shape("tiny").unwrap();
    let types = tern_model::generate::Types {
        linear: tern_model::quant::DType::Q8_0,
        embd: tern_model::quant::DType::Q8_0,
    };
    tern_model::generate::write_random_llama(&tiny, shape, types, 1).unwrap();
    let other = runtime_with(Some(Arc::new(Model::open("smollm2", &tiny, 1).unwrap())));
    let err = Actor::restore(&other, &chat_module(&other), &view)
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("layers 2, the snapshot has 30"),
        "{err}"
    );

    let saved = dir.join("hi.tern");
    std::fs::write(&saved, &snapshot).unwrap();
    let out = tern()
        .args(["restore", "--inspect"])
        .arg(&saved)
        .output()
        .unwrap();
    let shown = check(out, "restore --inspect");
    assert!(shown.contains("a valid Tern snapshot"), "{shown}");
    assert!(shown.contains("module: `chat`"), "{shown}");
    assert!(
        shown.contains("model 0: `smollm2` (llama, 30 layers"),
        "{shown}"
    );

    let matmul = std::fs::read(PathBuf::from(env!("TERN_GUEST_DIR")).join("matmul.wasm")).unwrap();
    let matmul = Arc::new(ActorModule::new(&rt, "matmul", &matmul).unwrap());
    let err = Actor::restore(&rt, &matmul, &view).err().unwrap();
    assert!(err.to_string().contains("module `chat`"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn restore_refuses_a_damaged_file_and_keeps_it() {
    let dir = scratch("damaged");
    let path = dir.join("broken.tern");
    std::fs::write(&path, b"TERNSNAP\x04\0\0\0 and the rest is gone").unwrap();
    let out = tern().arg("restore").arg(&path).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("version 4"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(path.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
