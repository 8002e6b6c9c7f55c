//! `tern serve` as a real process on a state folder: killed with SIGKILL between messages
//! and started again on the same folder, its actors and uploads come back and continue
//! byte for byte; a state folder that cannot be made is a clear error.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// Keeps a log of every message in memory and emits it whole; returns its message count (a
/// global).
const COUNTER: &str = include_str!("../../server/tests/data/counter.wat");

/// `tern serve` on the CPU, on a free loopback port, with state in `state`, without a key.
fn serve_command(state: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tern"));
    command
        .args([
            "serve",
            "--device",
            "cpu",
            "--listen",
            "127.0.0.1:0",
            "--state",
        ])
        .arg(state)
        .env_remove("TERN_API_KEY");
    command
}

/// A `tern serve` process and the address it printed.
struct Serve {
    child: Child,
    addr: String,
}

impl Serve {
    fn start(state: &Path) -> Serve {
        let mut child = serve_command(state)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("tern runs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Some(addr) = line.trim().strip_prefix("listening on http://") else {
            let _ = child.kill();
            panic!("no address in {line:?}");
        };
        Serve {
            addr: addr.to_string(),
            child,
        }
    }

    /// SIGKILL: no chance to save anything more.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn request(&self, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
        let mut stream = TcpStream::connect(&self.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body).unwrap();
        let mut raw = Vec::new();
        let _ = stream.read_to_end(&mut raw);
        let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let status = std::str::from_utf8(&raw[9..12]).unwrap().parse().unwrap();
        let body = &raw[end + 4..];
        let json = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(body).unwrap()
        };
        (status, json)
    }

    fn send(&self, actor: &str, message: &str) -> Value {
        let path = format!("/v1/actors/{actor}/messages");
        let (status, reply) = self.request("POST", &path, message.as_bytes());
        assert_eq!(status, 200, "{reply}");
        reply
    }

    fn start_actor(&self, module: &str) -> String {
        let body = serde_json::json!({ "module": module }).to_string();
        let (status, actor) = self.request("POST", "/v1/actors", body.as_bytes());
        assert_eq!(status, 201, "{actor}");
        actor["id"].as_str().unwrap().to_string()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn state_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tern-serve-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

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
