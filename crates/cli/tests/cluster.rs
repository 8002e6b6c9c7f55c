//! A cluster of real `tern serve` processes on a real nats-server (the pinned one
//! `scripts/nats-server` installs), all on loopback: conversations continue through any node
//! byte for byte; a killed node's actors continue elsewhere from their last durable state,
//! each claimed exactly once more; random kills and restarts lose no acknowledged reply and
//! run no message twice; NATS itself restarting fails the messages in flight clearly and
//! loses nothing durable; draining a node under load fails no request.

mod live;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use live::Serve;
use serde_json::Value;

/// Keeps a log of every message in memory and emits it whole; returns its message count.
const COUNTER: &str = include_str!("../../server/tests/data/counter.wat");

/// The pinned nats-server: `$TERN_NATS_SERVER`, else the one `scripts/nats-server`
/// installs.
fn nats_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TERN_NATS_SERVER") {
        return path.into();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/nats-server");
    let out = Command::new(script)
        .output()
        .expect("scripts/nats-server runs");
    assert!(
        out.status.success(),
        "installing nats-server failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A nats-server with JetStream on a free loopback port and a temporary store.
struct Nats {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Nats {
    fn start(test: &str) -> Nats {
        let dir = std::env::temp_dir().join(format!("tern-nats-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conf = format!(
            "listen: 127.0.0.1:{port}\nmax_payload: 8MB\njetstream {{ store_dir: \"{}\" }}\n",
            dir.join("js").display()
        );
        std::fs::write(dir.join("nats.conf"), conf).unwrap();
        let mut nats = Nats {
            child: None,
            port,
            dir,
        };
        nats.run();
        nats
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn run(&mut self) {
        let child = Command::new(nats_binary())
            .arg("-c")
            .arg(self.dir.join("nats.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server runs");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn upload(node: &Serve) -> String {
    let (status, upload) = node.request("POST", "/v1/modules", COUNTER.as_bytes());
    assert!(status == 201 || status == 200, "{upload}");
    upload["digest"].as_str().unwrap().to_string()
}

/// Every actor in the directory, by id, as a node lists them.
fn directory(node: &Serve) -> Vec<Value> {
    let (status, list) = node.request("GET", "/v1/actors", b"");
    assert_eq!(status, 200, "{list}");
    list["actors"].as_array().unwrap().clone()
}

fn entry<'a>(directory: &'a [Value], id: &str) -> &'a Value {
    directory
        .iter()
        .find(|a| a["id"] == id)
        .unwrap_or_else(|| panic!("actor {id} not in the directory"))
}

/// `tern cluster ARGS...` against the cluster at `url`.
fn cluster_command(url: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tern"));
    command.args(["cluster", "--cluster", url]).args(args);
    command
}

/// `tern cluster ARGS...` against the cluster at `url`; its standard output.
fn tern_cluster(url: &str, args: &[&str]) -> String {
    let out = cluster_command(url, args).output().expect("tern runs");
    assert!(
        out.status.success(),
        "tern cluster {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn conversations_continue_through_any_node_byte_for_byte() {
    let nats = Nats::start("route");
    let url = nats.url();
    // a and c share host objects, as two nodes of one machine would; b reads the store.
    let shared = nats.dir.join("host-objects");
    let shared_arg = shared.to_str().unwrap();
    let nodes = ["a", "b", "c"].map(|n| match n {
        "b" => Serve::node(&url, n, &[]),
        _ => Serve::node(&url, n, &["--host-objects", shared_arg]),
    });
    let digest = upload(&nodes[0]);
    let actors: Vec<String> = (0..3).map(|_| nodes[0].start_actor(&digest)).collect();
    let mut logs = vec![String::new(); actors.len()];
    for round in 0..4 {
        for (i, actor) in actors.iter().enumerate() {
            let message = format!("r{round}a{i} ");
            logs[i].push_str(&message);
            let reply = nodes[(round + i) % 3].send(actor, &message);
            assert_eq!(reply["output"], logs[i], "{reply}");
            assert_eq!(reply["code"], round + 1);
            assert_eq!(reply["durable"], true);
        }
    }
    // A reply streamed through a node that does not own the actor.
    let path = format!("/v1/actors/{}/messages", actors[0]);
    let streamed = nodes[2].call("POST", &path, &["Accept: text/event-stream"], b"sse ");
    assert_eq!(streamed.status, 200);
    let events = streamed.json.as_str().unwrap().to_string();
    assert!(events.contains(&format!("{}sse ", logs[0])), "{events}");
    assert!(events.contains(r#""durable":true"#), "{events}");

    // The chat actor on the model, moved to another node before each turn, gives the bytes
    // of one that stays on one node.
    let turns = [
        r#"{"config": {"max_tokens": 12, "context": 512}}"#,
        "What is the capital of France?",
        "And of Italy?",
        "Thanks!",
    ];
    let moving = nodes[0].start_actor("chat");
    let staying = nodes[0].start_actor("chat");
    // A move's target reads the chain ahead (the bytes it read, and the chain's).
    let move_to = |to: &str| -> (u64, u64) {
        let answer: Value = serde_json::from_str(&tern_cluster(&url, &["move", &moving, to]))
            .expect("a move's answer is JSON");
        let prefetched = &answer["prefetched"];
        let read = prefetched["read_bytes"].as_u64().expect("bytes read");
        let chain = prefetched["chain_bytes"]
            .as_u64()
            .expect("the chain's bytes");
        assert!(chain > 0, "{answer}");
        (read, chain)
    };
    // A move to a node that is not there is refused before the owner lets the actor go.
    let text = live::refused(&mut cluster_command(&url, &["move", &moving, "nowhere"]));
    assert!(text.contains("no live node `nowhere`"), "{text}");
    assert_eq!(entry(&directory(&nodes[1]), &moving)["node"], "a");
    for (i, turn) in turns.iter().enumerate() {
        let to = ["b", "c", "a", "b"][i];
        let (read, chain) = move_to(to);
        if i == 0 {
            assert_eq!(
                read, chain,
                "a node that never held the actor reads it whole"
            );
        }
        if i == 1 {
            // c takes the whole snapshot a wrote from the host objects, and reads from
            // the store only the link b appended.
            assert!(0 < read && read < chain, "read {read} of {chain} bytes");
        }
        let moved = nodes[(i + 1) % 3].send(&moving, turn);
        let stayed = nodes[0].send(&staying, turn);
        assert_eq!(moved["output"], stayed["output"], "turn {i}");
        assert_eq!(entry(&directory(&nodes[1]), &moving)["node"], to);
    }
    // Each node continued the moving actor's chain: a whole snapshot, then links.
    let admin = tern_server::cluster::admin::ClusterClient::connect(&url).unwrap();
    let chain = admin.chain(&moving).unwrap();
    assert!(chain.len() >= 3, "{chain:?}");

    // Moved away and straight back, it comes back from what b kept: b reads at most the
    // links written since it left.
    move_to("c");
    let (read, chain) = move_to("b");
    assert!(read < chain, "read {read} of {chain} bytes");
    let moved = nodes[1].send(&moving, "Bye!");
    let stayed = nodes[0].send(&staying, "Bye!");
    assert_eq!(moved["output"], stayed["output"]);

    // An OpenAI-compatible session made through a continues through b and c in the same
    // actor, with the replies of a session that stays on a.
    let ask = |node: &Serve, session: &str, messages: &[Value]| -> (String, String) {
        let body = serde_json::json!({"messages": messages, "max_tokens": 8, "temperature": 0});
        let header = format!("X-Tern-Session: {session}");
        let answer = node.call(
            "POST",
            "/v1/chat/completions",
            &[&header],
            body.to_string().as_bytes(),
        );
        assert_eq!(answer.status, 200, "{}", answer.json);
        let text = answer.json["choices"][0]["message"]["content"].as_str();
        let actor = answer.header("x-tern-actor").unwrap().to_string();
        (text.unwrap().to_string(), actor)
    };
    let (mut roaming, mut home) = (Vec::new(), Vec::new());
    let mut roaming_actor = None;
    for (i, question) in ["Hello!", "What is 2+2?", "Thanks."].iter().enumerate() {
        let user = serde_json::json!({"role": "user", "content": question});
        roaming.push(user.clone());
        home.push(user);
        let (roamed, actor) = ask(&nodes[i % 3], "roaming", &roaming);
        let (stayed, _) = ask(&nodes[0], "home", &home);
        assert_eq!(roamed, stayed, "turn {i}");
        assert_eq!(roaming_actor.get_or_insert(actor.clone()), &actor);
        roaming.push(serde_json::json!({"role": "assistant", "content": roamed}));
        home.push(serde_json::json!({"role": "assistant", "content": stayed}));
    }

    // Every node lists every actor; an unknown one is unknown everywhere.
    for node in &nodes {
        assert_eq!(directory(node).len(), actors.len() + 4);
        let (status, _) = node.request("POST", "/v1/actors/a0123/messages", b"x");
        assert_eq!(status, 404);
    }
    let status = tern_cluster(&url, &["status"]);
    for name in ["a", "b", "c"] {
        assert!(status.contains(name), "{status}");
    }
}

#[test]
fn a_killed_node_s_actors_continue_elsewhere_from_their_last_durable_state() {
    let nats = Nats::start("kill");
    let url = nats.url();
    let a = Serve::node(&url, "a", &[]);
    let (b, c) = (Serve::node(&url, "b", &[]), Serve::node(&url, "c", &[]));
    let digest = upload(&a);
    let counters: Vec<String> = (0..19).map(|_| a.start_actor(&digest)).collect();
    let expected = |i: usize, n: usize| (1..=n).map(|m| format!("{i}.{m} ")).collect::<String>();
    for (i, actor) in counters.iter().enumerate() {
        for m in 1..=2 {
            assert_eq!(
                a.send(actor, &format!("{i}.{m} "))["output"],
                expected(i, m)
            );
        }
    }
    // The twentieth conversation is the chat actor; its reference runs on `b` throughout.
    let turns = [
        r#"{"config": {"max_tokens": 12, "context": 512}}"#,
        "Name a color.",
        "Name another one.",
    ];
    let chat = a.start_actor("chat");
    let reference = b.start_actor("chat");
    let mut reference_replies = Vec::new();
    for turn in &turns {
        reference_replies.push(b.send(&reference, turn)["output"].clone());
    }
    for turn in &turns[..2] {
        a.send(&chat, turn);
    }

    // One more, marked eager: restored elsewhere as soon as `a` is found lost, unasked.
    let body = serde_json::json!({"module": digest, "eager": true}).to_string();
    let (status, eager) = a.request("POST", "/v1/actors", body.as_bytes());
    assert_eq!(status, 201, "{eager}");
    let eager = eager["id"].as_str().unwrap().to_string();
    assert_eq!(a.send(&eager, "e ")["output"], "e ");
    // And one that `tern cluster move` takes off the lost node.
    let stranded = a.start_actor(&digest);
    assert_eq!(a.send(&stranded, "s.1 ")["output"], "s.1 ");

    a.kill();
    let killed = Instant::now();
    loop {
        let node = entry(&directory(&b), &eager)["node"].clone();
        if node == "b" || node == "c" {
            eprintln!("eager actor restored {:?} after the kill", killed.elapsed());
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "not restored: {node}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let moved: Value = serde_json::from_str(&tern_cluster(&url, &["move", &stranded, "c"]))
        .expect("a move's answer is JSON");
    assert_eq!(moved["released"], Value::Null, "{moved}");
    assert_eq!(entry(&directory(&b), &stranded)["node"], "c");
    assert_eq!(b.send(&stranded, "s.2 ")["output"], "s.1 s.2 ");
    for (i, actor) in counters.iter().enumerate() {
        let via = if i % 2 == 0 { &b } else { &c };
        let reply = via.send(actor, &format!("{i}.3 "));
        assert_eq!(reply["output"], expected(i, 3), "{reply}");
        assert_eq!(reply["durable"], true);
        if i == 0 {
            eprintln!("first reply after the kill: {:?}", killed.elapsed());
        }
    }
    assert_eq!(c.send(&chat, turns[2])["output"], reference_replies[2]);

    // Each was claimed exactly once more, by one of the living nodes.
    let listed = directory(&b);
    for actor in counters.iter().chain([&chat]) {
        let entry = entry(&listed, actor);
        assert_eq!(entry["epoch"], 2, "{entry}");
        assert!(entry["node"] == "b" || entry["node"] == "c", "{entry}");
    }
    // Back under its name, `a` sends their requests to their new owners.
    let a = Serve::node(&url, "a", &[]);
    assert_eq!(a.send(&counters[0], "0.4 ")["output"], expected(0, 4));
    assert_eq!(entry(&directory(&a), &counters[0])["epoch"], 2);
}

/// A node slot of the chaos test: the process (absent while killed) and its name.
struct Slot {
    name: &'static str,
    serve: Mutex<Option<Serve>>,
}

impl Slot {
    fn addr(&self) -> Option<String> {
        self.serve.lock().unwrap().as_ref().map(|s| s.addr.clone())
    }
}

/// One message to `actor` through the node at `addr`: the status and body, or `None`
/// when the connection failed (the node died).
fn post(addr: &str, actor: &str, message: &str) -> Option<(u16, Value)> {
    let path = format!("/v1/actors/{actor}/messages");
    live::try_request(addr, "POST", &path, message.as_bytes())
}

/// What one message came to.
#[derive(Debug)]
enum Outcome {
    Acked(String),
    Failed(String),
}

#[test]
fn random_kills_and_restarts_lose_no_acknowledged_reply() {
    let nats = Nats::start("chaos");
    let url = nats.url();
    let slots: Arc<Vec<Slot>> = Arc::new(
        ["a", "b", "c"]
            .into_iter()
            .map(|name| Slot {
                name,
                serve: Mutex::new(Some(Serve::node(&url, name, &[]))),
            })
            .collect(),
    );
    let (digest, actors) = {
        let first = slots[0].serve.lock().unwrap();
        let first = first.as_ref().unwrap();
        let digest = upload(first);
        let actors: Vec<String> = (0..6).map(|_| first.start_actor(&digest)).collect();
        (digest, actors)
    };
    let _ = digest;
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..3)
        .map(|t| {
            let (slots, stop) = (slots.clone(), stop.clone());
            let mine = actors[2 * t..2 * t + 2].to_vec();
            std::thread::spawn(move || {
                let mut outcomes = vec![Vec::new(), Vec::new()];
                let mut seed = 0x9e37_79b9u64 + t as u64;
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    seed = seed
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    let k = (seed >> 33) as usize % 2;
                    let Some(addr) = slots[(seed >> 40) as usize % 3].addr() else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    n += 1;
                    let message = format!("t{t}k{k}n{n} ");
                    let outcome = match post(&addr, &mine[k], &message) {
                        Some((200, reply)) if reply["durable"] == true => {
                            let output = reply["output"].as_str().unwrap();
                            assert!(output.ends_with(&message), "{reply}");
                            Outcome::Acked(message)
                        }
                        Some((status, reply)) => {
                            assert!(status >= 400, "{status} {reply}");
                            assert!(reply["error"]["message"].is_string(), "{reply}");
                            Outcome::Failed(message)
                        }
                        None => Outcome::Failed(message),
                    };
                    outcomes[k].push(outcome);
                }
                (mine, outcomes)
            })
        })
        .collect();
    let started = Instant::now();
    let mut k = 0;
    while started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(1500));
        let slot = &slots[k % 3];
        k += 1;
        let killed = slot.serve.lock().unwrap().take();
        drop(killed); // SIGKILL
        std::thread::sleep(Duration::from_millis(300));
        let restarted = Serve::node(&url, slot.name, &[]);
        *slot.serve.lock().unwrap() = Some(restarted);
    }
    stop.store(true, Ordering::Relaxed);
    let mut acked_total = 0;
    let mut failed_total = 0;
    for client in clients {
        let (mine, outcomes) = client.join().unwrap();
        for (actor, outcomes) in mine.iter().zip(outcomes) {
            // The final log, read through any node once the cluster settled.
            let deadline = Instant::now() + Duration::from_secs(60);
            let log = loop {
                let addr = slots[1].addr().unwrap();
                if let Some((200, reply)) = post(&addr, actor, "") {
                    break reply["output"].as_str().unwrap().to_string();
                }
                assert!(Instant::now() < deadline, "actor {actor} never answered");
                std::thread::sleep(Duration::from_millis(100));
            };
            let entries: Vec<&str> = log.split_whitespace().collect();
            let mut seen = std::collections::HashSet::new();
            for e in &entries {
                assert!(seen.insert(*e), "message {e} ran twice: {log}");
            }
            let mut position = 0;
            for outcome in &outcomes {
                match outcome {
                    Outcome::Acked(m) => {
                        acked_total += 1;
                        let found = entries[position..]
                            .iter()
                            .position(|e| *e == m.trim())
                            .unwrap_or_else(|| panic!("acknowledged {m} lost: {log}"));
                        position += found + 1;
                    }
                    Outcome::Failed(m) => {
                        failed_total += 1;
                        let _ = m;
                    }
                }
            }
            let sent: std::collections::HashSet<String> = outcomes
                .iter()
                .map(|o| match o {
                    Outcome::Acked(m) | Outcome::Failed(m) => m.trim().to_string(),
                })
                .collect();
            for e in &entries {
                assert!(sent.contains(*e), "{e} was never sent: {log}");
            }
        }
    }
    eprintln!("{acked_total} acknowledged, {failed_total} failed clearly");
    assert!(acked_total > 0);
}

#[test]
fn nats_restarting_fails_in_flight_messages_clearly_and_loses_nothing_durable() {
    let mut nats = Nats::start("nats-restart");
    let url = nats.url();
    let (a, b) = (Serve::node(&url, "a", &[]), Serve::node(&url, "b", &[]));
    let digest = upload(&a);
    let actors = [a.start_actor(&digest), b.start_actor(&digest)];
    let mut logs = vec![String::new(); 2];
    for (i, actor) in actors.iter().enumerate() {
        for m in 0..2 {
            let message = format!("{i}.{m} ");
            logs[i].push_str(&message);
            assert_eq!(a.send(actor, &message)["output"], logs[i]);
        }
    }
    nats.kill();
    // Its owner runs it and cannot save it; the other node cannot find it: both fail clearly.
    for (node, actor) in [(&a, &actors[0]), (&a, &actors[1])] {
        let (status, reply) =
            node.request("POST", &format!("/v1/actors/{actor}/messages"), b"lost ");
        assert_eq!(status, 503, "{reply}");
        assert!(reply["error"]["message"].is_string(), "{reply}");
    }
    nats.run();
    for (i, actor) in actors.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(60);
        logs[i].push_str("after ");
        loop {
            let (status, reply) =
                b.request("POST", &format!("/v1/actors/{actor}/messages"), b"after ");
            if status == 200 {
                // Nothing durable lost, and the failed message is not there.
                assert_eq!(reply["output"], logs[i], "{reply}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no reply after NATS came back: {reply}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[test]
fn draining_a_node_under_load_fails_no_request() {
    let nats = Nats::start("drain");
    let url = nats.url();
    let nodes = Arc::new(["a", "b", "c"].map(|n| Serve::node(&url, n, &[])));
    let digest = upload(&nodes[0]);
    let actors: Vec<String> = (0..8).map(|_| nodes[0].start_actor(&digest)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..2)
        .map(|t| {
            let (nodes, stop) = (nodes.clone(), stop.clone());
            let mine = actors[4 * t..4 * t + 4].to_vec();
            std::thread::spawn(move || {
                let mut logs = vec![String::new(); mine.len()];
                let mut sent = 0;
                while !stop.load(Ordering::Relaxed) {
                    sent += 1;
                    let k = sent % mine.len();
                    let message = format!("{t}.{sent} ");
                    logs[k].push_str(&message);
                    let node = &nodes[(sent / mine.len() + t) % 3];
                    let reply = node.send(&mine[k], &message);
                    assert_eq!(reply["output"], logs[k], "{reply}");
                    assert_eq!(reply["durable"], true);
                }
                sent
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let drained = tern_cluster(&url, &["drain", "a"]);
    let drained: Value = serde_json::from_str(drained.trim()).unwrap();
    assert_eq!(drained["left"], 0, "{drained}");
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let sent: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    eprintln!("{sent} requests, none failed; drain: {drained}");
    for actor in &actors {
        assert_ne!(entry(&directory(&nodes[1]), actor)["node"], "a");
    }
    // Idle actors are handed over, not only passivated: draining the busier of b and c (a
    // drains still) leaves each of its actors running on the other, and their conversations
    // continue there.
    let owned_by = |node: &str| -> Vec<String> {
        let listed = directory(&nodes[0]);
        (actors.iter())
            .filter(|a| entry(&listed, a)["node"] == node)
            .cloned()
            .collect()
    };
    let (from, to) = if owned_by("b").len() >= owned_by("c").len() {
        ("b", "c")
    } else {
        ("c", "b")
    };
    let held = owned_by(from);
    assert!(!held.is_empty());
    let drained: Value = serde_json::from_str(tern_cluster(&url, &["drain", from]).trim()).unwrap();
    assert_eq!(drained["moved"], held.len(), "{drained}");
    assert_eq!(drained["left"], 0, "{drained}");
    for actor in &held {
        assert_eq!(entry(&directory(&nodes[0]), actor)["node"], to);
        let reply = nodes[0].send(actor, "after ");
        assert!(
            reply["output"].as_str().unwrap().ends_with("after "),
            "{reply}"
        );
        assert_eq!(reply["durable"], true);
    }
}

#[test]
fn a_bad_cluster_flag_is_a_clear_error() {
    let nats = Nats::start("flags");
    let url = nats.url();
    let unused = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cases: [(&[&str], &str); 4] = [
        (
            &["--cluster", &format!("nats://127.0.0.1:{unused}")],
            "cannot reach NATS",
        ),
        (&["--cluster", &url, "--node", "a b"], "invalid node name"),
        (
            &["--cluster", &url, "--state", "/tmp/x"],
            "--state is for a server alone",
        ),
        (&["--node", "a"], "--cluster"),
    ];
    for (args, expected) in cases {
        let text = live::refused(
            Command::new(env!("CARGO_BIN_EXE_tern"))
                .args(["serve", "--device", "cpu", "--listen", "127.0.0.1:0"])
                .args(args),
        );
        assert!(text.contains(expected), "{args:?}: {text}");
    }
    // A node named with NATS wildcards would address other subjects: refused.
    for args in [&["drain", "a.>"][..], &["move", "a0", "*"]] {
        let text = live::refused(&mut cluster_command(&url, args));
        assert!(text.contains("invalid node name"), "{args:?}: {text}");
    }
}
