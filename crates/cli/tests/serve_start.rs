//! `tern serve` as a real process: what stops it at start (a model that cannot be loaded, a
//! state folder another server holds), and what its logs hold (request ids, never the key).

mod live;

use std::process::Stdio;

use live::{Serve, serve_command, state_dir};

#[test]
fn a_model_that_cannot_be_loaded_stops_the_start() {
    let dir = state_dir("bad-model");
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("bad.gguf");
    std::fs::write(&model, b"not a model").unwrap();
    let out = serve_command(&dir.join("state"))
        .arg("--model")
        .arg(&model)
        .output()
        .expect("tern runs");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("cannot load model `bad`"), "{text}");
    assert!(text.contains("not a GGUF file"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_state_folder_in_use_stops_a_second_server() {
    let dir = state_dir("in-use");
    let first = Serve::start(&dir);
    let out = serve_command(&dir).output().expect("tern runs");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("in use by another process"), "{text}");
    first.kill();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn logs_carry_request_ids_and_never_the_key() {
    let dir = state_dir("logs");
    let key = "very-secret-key-4242";
    let (mut child, addr) = live::spawn(
        serve_command(&dir)
            .env("TERN_API_KEY", key)
            .stderr(Stdio::piped()),
    );
    let call = |auth: Option<&str>, extra: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        let auth = auth.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
        write!(
            s,
            "GET /v1/actors HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}{extra}\r\n"
        )
        .unwrap();
        let mut raw = String::new();
        let _ = s.read_to_string(&mut raw);
        raw
    };
    assert!(call(None, "").starts_with("HTTP/1.1 401"));
    assert!(call(Some("wrong-key"), "").starts_with("HTTP/1.1 401"));
    let ok = call(Some(key), "X-Request-Id: trace-77\r\n");
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(
        ok.to_ascii_lowercase().contains("x-request-id: trace-77"),
        "{ok}"
    );
    child.kill().unwrap();
    let mut logs = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    child.wait().unwrap();
    assert!(logs.contains("trace-77"), "{logs}");
    assert!(logs.contains("status=401"), "{logs}");
    assert!(!logs.contains(key), "the key reached the logs: {logs}");
    assert!(
        !logs.contains("wrong-key"),
        "a presented key reached the logs: {logs}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
