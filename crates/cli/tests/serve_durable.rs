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
    let out = serve_command(&file.join("state"))
        .output()
        .expect("tern runs");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("cannot create the state folder"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    std::fs::remove_file(&file).unwrap();
}
