//! Durable actors over real HTTP on loopback: state saved per message, a restarted server
//! on the same state folder continuing each actor byte for byte, passivation of idle
//! actors, and deleted actors leaving the store.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{COUNTER, SLEEPER, TestServer, guest_file, request};
use serde_json::Value;
use tern_server::{Config, Durability, LocalStore};

/// A fresh state folder for one test.
fn state_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tern-durable-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// `counter` bundled; with `state`, actors kept there.
fn configure(
    state: Option<&Path>,
    durability: Durability,
    idle: Option<Duration>,
) -> impl FnOnce(&mut Config) {
    let state = state.map(Path::to_path_buf);
    move |config: &mut Config| {
        config
            .bundled
            .push(("counter".into(), guest_file("counter", COUNTER)));
        if let Some(dir) = state {
            config.store = Some(Arc::new(open_store(&dir)));
        }
        config.durability = durability;
        config.idle = idle;
    }
}

/// The store in `dir`, waiting (up to 5 s) for the threads of a server just dropped on the
/// same folder to let go of it.
fn open_store(dir: &Path) -> LocalStore {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match LocalStore::open(dir) {
            Ok(store) => return store,
            Err(tern_server::StoreError::InUse(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("a state folder: {e}"),
        }
    }
}

fn send(server: &TestServer, actor: &str, message: &str) -> Value {
    let r = server.post(&format!("/v1/actors/{actor}/messages"), message.as_bytes());
    assert_eq!(r.status, 200, "{r:?}");
    r.json()
}

/// The replies an uninterrupted actor of `module` gives to `messages`, from a server that
/// keeps nothing.
fn uninterrupted(module: &str, messages: &[&str]) -> Vec<Value> {
    let server = TestServer::start_with(configure(None, Durability::Message, None));
    let module = if module == "upload" {
        server.upload_echo()
    } else {
        module.to_string()
    };
    let actor = server.start_actor(&module);
    messages
        .iter()
        .map(|m| {
            let mut reply = send(&server, &actor, m);
            assert_eq!(reply["durable"], false);
            reply.as_object_mut().unwrap().remove("durable");
            reply
        })
        .collect()
}

fn without_durable(mut reply: Value) -> Value {
    reply.as_object_mut().unwrap().remove("durable");
    reply
}

fn actor_ids(server: &TestServer) -> Vec<(String, String, String)> {
    let list = server.get("/v1/actors").json()["actors"].clone();
    list.as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let s = |k: &str| a[k].as_str().unwrap().to_string();
            (s("id"), s("module"), s("state"))
        })
        .collect()
}

#[test]
fn a_restarted_server_lists_its_actors_and_continues_them_exactly() {
    let dir = state_dir("restart");
    let messages = ["one ", "two ", "three"];
    let counter_ref = uninterrupted("counter", &messages);
    let echo_ref = uninterrupted("upload", &messages);

    let first = TestServer::start_with(configure(Some(&dir), Durability::Message, None));
    let digest = first.upload_echo();
    let counter = first.start_actor("counter");
    let echo = first.start_actor(&digest);
    for (i, m) in messages[..2].iter().enumerate() {
        let reply = send(&first, &counter, m);
        assert_eq!(reply["durable"], true, "{reply}");
        assert_eq!(without_durable(reply), counter_ref[i]);
        assert_eq!(without_durable(send(&first, &echo, m)), echo_ref[i]);
    }
    let before = actor_ids(&first);
    drop(first);
    // The actor's snapshot is a chain file (links appended per message; this actor's state
    // is so small that its chain starts over often).
    let file = std::fs::read(dir.join(format!("actors/{counter}.tern"))).unwrap();
    let links = tern_snapshot::split_links(&file).unwrap();
    assert_eq!(links.torn_bytes, 0);
    tern_snapshot::parse_chain(&links.links).unwrap();

    let second = TestServer::start_with(configure(Some(&dir), Durability::Message, None));
    let after = actor_ids(&second);
    assert_eq!(after.len(), 2);
    for ((id, module, _), (id2, module2, state)) in before.iter().zip(&after) {
        assert_eq!((id, module), (id2, module2));
        assert_eq!(state, "passivated");
    }
    // The upload survived, so new actors can still start from it.
    let modules = second.get("/v1/modules").json()["modules"].to_string();
    assert!(modules.contains(&digest), "{modules}");
    // Streamed: the final event says the state was saved.
    let path = format!("/v1/actors/{counter}/messages");
    let accept = [("Accept", "text/event-stream")];
    let streamed = request(second.addr, "POST", &path, &accept, messages[2].as_bytes());
    let events = streamed.events();
    let (name, done) = events.last().unwrap();
    assert_eq!(name, "done", "{events:?}");
    assert_eq!(done["durable"], true);
    assert_eq!(done["code"], counter_ref[2]["code"]);
    let text: String = events
        .iter()
        .filter(|(e, _)| e == "output")
        .map(|(_, d)| d["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, counter_ref[2]["output"].as_str().unwrap());
    assert_eq!(
        without_durable(send(&second, &echo, messages[2])),
        echo_ref[2]
    );
    assert_eq!(
        second.get(&format!("/v1/actors/{counter}")).json()["state"],
        "idle"
    );
    // New ids do not reuse recovered ones.
    let fresh = second.start_actor(&digest);
    assert!(!before.iter().any(|(id, _, _)| *id == fresh), "{fresh}");
    drop(second);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Actors the server restored from snapshots kept in memory.
fn hot_restores(server: &TestServer) -> u64 {
    let metrics = String::from_utf8(server.get("/metrics").body).unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("tern_snapshot_hot_restores_total "))
        .unwrap_or_else(|| panic!("no hot restores counted: {metrics}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Waits until actor `id` reports `state`.
fn wait_for_state(server: &TestServer, id: &str, state: &str) -> Value {
    let start = Instant::now();
    loop {
        let info = server.get(&format!("/v1/actors/{id}")).json();
        if info["state"] == state {
            return info;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "never {state}: {info}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn idle_actors_passivate_and_continue_exactly() {
    let dir = state_dir("passivate");
    let messages = ["alpha ", "beta ", "gamma ", "delta"];
    let reference = uninterrupted("counter", &messages);
    let idle = Some(Duration::from_millis(500));

    // Saved only on passivation: replies are not durable, and the actor continues after
    // its thread was freed, then after a restart.
    let server = TestServer::start_with(configure(Some(&dir), Durability::Passivate, idle));
    let actor = server.start_actor("counter");
    for (i, m) in messages[..2].iter().enumerate() {
        let reply = send(&server, &actor, m);
        assert_eq!(reply["durable"], false);
        assert_eq!(without_durable(reply), reference[i]);
    }
    let info = wait_for_state(&server, &actor, "passivated");
    assert_eq!(info["memory_bytes"], 0);
    assert_eq!(
        without_durable(send(&server, &actor, messages[2])),
        reference[2]
    );
    assert_eq!(
        server.get(&format!("/v1/actors/{actor}")).json()["memory_bytes"],
        65536
    );
    // Its snapshot was kept in memory: it came back without reading the folder.
    assert_eq!(hot_restores(&server), 1);
    wait_for_state(&server, &actor, "passivated");
    drop(server);

    // A new server has nothing in memory: the actor comes back from the folder.
    let server = TestServer::start_with(configure(Some(&dir), Durability::Passivate, idle));
    assert_eq!(
        without_durable(send(&server, &actor, messages[3])),
        reference[3]
    );
    assert_eq!(hot_restores(&server), 0);
    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn deleted_actors_leave_the_store() {
    let dir = state_dir("delete");
    let server = TestServer::start_with(configure(Some(&dir), Durability::Message, None));
    let (kept, gone) = (server.start_actor("counter"), server.start_actor("counter"));
    send(&server, &gone, "x");
    let r = request(
        server.addr,
        "DELETE",
        &format!("/v1/actors/{gone}"),
        &[],
        b"",
    );
    assert_eq!(r.status, 204);
    drop(server);
    let server = TestServer::start_with(configure(Some(&dir), Durability::Message, None));
    let ids: Vec<String> = actor_ids(&server)
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    assert_eq!(ids, std::slice::from_ref(&kept));
    let mut files: Vec<String> = std::fs::read_dir(dir.join("actors"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files, [format!("{kept}.json"), format!("{kept}.tern")]);
    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The actor's state as `GET /v1/actors/{id}` reports it.
fn state_of(server: &TestServer, actor: &str) -> String {
    server.get(&format!("/v1/actors/{actor}")).json()["state"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Waits (up to 10 s) until `actor` reports `state`.
fn wait_for(server: &TestServer, actor: &str, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while state_of(server, actor) != state {
        assert!(Instant::now() < deadline, "{actor} never became {state}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_full_host_passivates_the_least_recently_used_idle_actor_and_refuses_when_all_are_busy() {
    let dir = state_dir("admission");
    let server = TestServer::start_with(|config| {
        configure(Some(&dir), Durability::Message, None)(config);
        config
            .bundled
            .push(("sleeper".into(), guest_file("sleeper", SLEEPER)));
        config.max_resident = 2;
    });
    let a = server.start_actor("counter");
    send(&server, &a, "a1 ");
    let b = server.start_actor("counter");
    send(&server, &b, "b1 ");
    // A third actor makes room: `a`, used least recently, is passivated, not refused.
    let c = server.start_actor("counter");
    wait_for(&server, &a, "passivated");
    assert_eq!(state_of(&server, &b), "idle");
    // Its next message restores it exactly, passivating `b` (now the least recently used).
    assert_eq!(send(&server, &a, "a2")["output"], "a1 a2");
    wait_for(&server, &b, "passivated");
    assert_eq!(send(&server, &b, "b2")["output"], "b1 b2");
    for id in [&a, &b, &c] {
        assert_eq!(server.delete(&format!("/v1/actors/{id}")).status, 204);
    }

    // Two busy actors fill the host: a third is refused with 429 and `Retry-After`, and
    // neither busy actor is evicted.
    let sleepers = [server.start_actor("sleeper"), server.start_actor("sleeper")];
    let addr = server.addr;
    let busy: Vec<_> = sleepers
        .iter()
        .map(|id| {
            let path = format!("/v1/actors/{id}/messages");
            std::thread::spawn(move || request(addr, "POST", &path, &[], b"zzz").status)
        })
        .collect();
    for id in &sleepers {
        wait_for(&server, id, "busy");
    }
    let refused = server.post("/v1/actors", br#"{"module": "counter"}"#);
    assert_eq!(refused.status, 429, "{refused:?}");
    assert_eq!(refused.error_type(), "server_busy");
    assert_eq!(refused.header("retry-after"), Some("1"));
    for thread in busy {
        assert_eq!(thread.join().unwrap(), 200);
    }
    // Once they are idle, one of them makes room again.
    server.start_actor("counter");
    let metrics = String::from_utf8(server.get("/metrics").body).unwrap();
    assert!(
        metrics.contains("tern_requests_refused_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("tern_actors_resident_cap 2"), "{metrics}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_failed_actor_stays_failed_across_a_restart() {
    let dir = state_dir("failed");
    let server = TestServer::start_with(configure(Some(&dir), Durability::Message, None));
    let actor = server.start_actor("echo");
    send(&server, &actor, "fine");
    let trapped = server.post(&format!("/v1/actors/{actor}/messages"), b"#trap");
    assert_eq!(trapped.status, 409, "{trapped:?}");
    drop(server);

    let server = TestServer::start_with(configure(Some(&dir), Durability::Message, None));
    let info = server.get(&format!("/v1/actors/{actor}")).json();
    assert_eq!(info["state"], "failed", "{info}");
    assert!(
        info["fault"].as_str().unwrap().contains("unreachable"),
        "{info}"
    );
    let refused = server.post(&format!("/v1/actors/{actor}/messages"), b"again");
    assert_eq!(refused.status, 409, "{refused:?}");
    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn interval_durability_saves_unsaved_state_when_its_interval_is_up() {
    let dir = state_dir("interval");
    let every = Duration::from_millis(300);
    let first = TestServer::start_with(configure(Some(&dir), Durability::Interval(every), None));
    let actor = first.start_actor("counter");
    // Too soon after the start's save: not saved with the answer...
    assert_eq!(send(&first, &actor, "one ")["durable"], false);
    // ...but once its interval is up, while the actor waits.
    std::thread::sleep(every * 3);
    assert_eq!(send(&first, &actor, "two ")["durable"], true);
    // Not saved yet: a crash now loses it.
    assert_eq!(send(&first, &actor, "three")["durable"], false);
    drop(first);

    let second = TestServer::start_with(configure(Some(&dir), Durability::Interval(every), None));
    assert_eq!(send(&second, &actor, "four")["output"], "one two four");
    drop(second);
    std::fs::remove_dir_all(&dir).unwrap();
}
