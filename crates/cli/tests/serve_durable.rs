//! `tern serve` as a real process on a state folder: killed with SIGKILL between messages
//! and started again on the same folder, its actors and uploads come back and continue
//! byte for byte; a state folder that cannot be made is a clear error.

mod live;

use live::{Serve, serve_command, state_dir};

/// Keeps a log of every message in memory and emits it whole; returns its message count (a
/// global).
const COUNTER: &str = include_str!("../../server/tests/data/counter.wat");

#[test]
fn a_killed_server_restarts_on_its_state_folder_and_continues_exactly() {
    let dir = state_dir("kill");
    let messages = ["one ", "two ", "three ", "four"];
    let expected = |n: usize| messages[..n].concat();

    let first = Serve::start(&dir);
    let (status, upload) = first.request("POST", "/v1/modules", COUNTER.as_bytes());
    assert_eq!(status, 201, "{upload}");
    let digest = upload["digest"].as_str().unwrap().to_string();
    let (a, b) = (first.start_actor(&digest), first.start_actor(&digest));
    for (i, m) in messages[..2].iter().enumerate() {
        let reply = first.send(&a, m);
        assert_eq!(reply["durable"], true, "{reply}");
        assert_eq!(reply["code"], i + 1);
        assert_eq!(reply["output"], expected(i + 1));
    }
    first.send(&b, "b");
    first.kill();

    let second = Serve::start(&dir);
    let (_, list) = second.request("GET", "/v1/actors", b"");
    let ids: Vec<&str> = list["actors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [a.as_str(), b.as_str()]);
    let (_, info) = second.request("GET", &format!("/v1/actors/{a}"), b"");
    assert_eq!(
        (&info["state"], &info["module"]),
        (&"passivated".into(), &digest.clone().into())
    );
    let reply = second.send(&a, messages[2]);
    assert_eq!(
        (&reply["code"], &reply["output"]),
        (&3.into(), &expected(3).into())
    );
    // The upload survived: a new actor starts from it.
    let c = second.start_actor(&digest);
    assert_eq!(second.send(&c, "c")["output"], "c");
    second.kill();

    // Killed again, right after a durable reply: that reply's state came back.
    let third = Serve::start(&dir);
    let reply = third.send(&a, messages[3]);
    assert_eq!(
        (&reply["code"], &reply["output"]),
        (&4.into(), &expected(4).into())
    );
    assert_eq!(third.send(&b, "b")["output"], "bb");
    third.kill();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_state_folder_that_cannot_be_made_is_a_clear_error() {
    let file = state_dir("file");
    std::fs::write(&file, b"a file, not a folder").unwrap();
    let text = live::refused(&mut serve_command(&file.join("state")));
    assert!(text.contains("cannot create the state folder"), "{text}");
    std::fs::remove_file(&file).unwrap();
}

#[test]
fn kill_9_at_random_moments_loses_no_acknowledged_message() {
    let dir = state_dir("kill-random");
    let mut acked: Vec<String> = Vec::new();
    let mut next = 0;
    let mut actor = None;
    for round in 0..5u64 {
        let server = std::sync::Arc::new(Serve::start(&dir));
        let id = match &actor {
            Some(id) => id,
            None => {
                let (status, upload) = server.request("POST", "/v1/modules", COUNTER.as_bytes());
                assert_eq!(status, 201, "{upload}");
                actor.insert(server.start_actor(upload["digest"].as_str().unwrap()))
            }
        }
        .clone();
        // After the restart: the state holds every acknowledged message, plus at most the
        // one in flight when the server was killed.
        if round > 0 {
            let output = server.send(&id, "")["output"].as_str().unwrap().to_string();
            let base = acked.concat();
            let extra = output
                .strip_prefix(&base)
                .unwrap_or_else(|| panic!("acknowledged messages lost: {output:?} lacks {base:?}"));
            if !extra.is_empty() {
                assert_eq!(
                    extra,
                    format!("m{} ", next - 1),
                    "only the message in flight"
                );
                acked.push(extra.to_string());
            }
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sender = {
            let (server, id, stop) = (server.clone(), id.clone(), stop.clone());
            let start = next;
            std::thread::spawn(move || {
                let mut done = Vec::new();
                let mut k = start;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let message = format!("m{k} ");
                    k += 1;
                    let path = format!("/v1/actors/{id}/messages");
                    let Some((200, reply)) = server.try_request("POST", &path, message.as_bytes())
                    else {
                        break;
                    };
                    assert_eq!(reply["durable"], true);
                    done.push(message);
                }
                (done, k)
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(40 + 37 * round));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        server.kill_now();
        let (done, k) = sender.join().unwrap();
        drop(server);
        acked.extend(done);
        next = k;
    }
    assert!(
        acked.len() >= 10,
        "too few messages went through: {acked:?}"
    );
    eprintln!(
        "{} messages acknowledged across 5 kills, {next} sent",
        acked.len()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ctrl_c_saves_what_passivate_durability_had_not_saved() {
    let dir = state_dir("ctrl-c");
    let args = ["--durability", "passivate"];
    let server = Serve::start_with(&dir, &args, None);
    let (status, upload) = server.request("POST", "/v1/modules", COUNTER.as_bytes());
    assert_eq!(status, 201, "{upload}");
    let actor = server.start_actor(upload["digest"].as_str().unwrap());
    assert_eq!(server.send(&actor, "one ")["durable"], false);
    assert_eq!(server.send(&actor, "two ")["durable"], false);
    server.interrupt();

    let server = Serve::start_with(&dir, &args, None);
    assert_eq!(server.send(&actor, "three")["output"], "one two three");
    server.kill();
    std::fs::remove_dir_all(&dir).unwrap();
}
