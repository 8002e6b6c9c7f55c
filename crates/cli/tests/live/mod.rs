//! A real `tern serve` process for the CLI's tests, and a small HTTP/1.1 client for it.

#![allow(dead_code)] // Each test file uses its own part.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;

/// `tern serve` on the CPU, on a free loopback port, with state in `state`, without a key.
pub fn serve_command(state: &Path) -> Command {
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

/// Runs `command` (a `tern` that must refuse its input) and returns its standard error,
/// checking that it failed without a panic.
pub fn refused(command: &mut Command) -> String {
    let out = command.output().expect("tern runs");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{command:?}: {text}");
    assert!(!text.contains("panicked"), "{command:?}: {text}");
    text
}

/// Starts `command` (a `tern serve`) and waits for the address it prints.
pub fn spawn(command: &mut Command) -> (Child, String) {
    let mut child = command.stdout(Stdio::piped()).spawn().expect("tern runs");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let Some(addr) = line.trim().strip_prefix("listening on http://") else {
        let _ = child.kill();
        panic!("no address in {line:?}");
    };
    (child, addr.to_string())
}

/// A fresh scratch folder's path (removed if it exists) for test `test`.
pub fn state_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tern-serve-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A `tern serve` process and the address it printed.
pub struct Serve {
    child: Child,
    pub addr: String,
    key: Option<String>,
}

/// An HTTP answer: status, header block (lowercase names) and JSON body.
pub struct Answer {
    pub status: u16,
    pub headers: String,
    pub json: Value,
}

impl Answer {
    /// The value of header `name` (lowercase), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.eq_ignore_ascii_case(name)).then(|| v.trim())
        })
    }
}

impl Serve {
    pub fn start(state: &Path) -> Serve {
        Self::start_with(state, &[], None)
    }

    /// Starts with `args` added; `key` is passed through the environment.
    pub fn start_with(state: &Path, args: &[&str], key: Option<&str>) -> Serve {
        let mut command = serve_command(state);
        command.args(args);
        if let Some(key) = key {
            command.env("TERN_API_KEY", key);
        }
        let (child, addr) = spawn(command.stderr(Stdio::null()));
        Serve {
            addr,
            child,
            key: key.map(String::from),
        }
    }

    /// `tern serve` on the CPU as node `node` of the cluster on the NATS server at `url`,
    /// on a free loopback port, with `args` added.
    pub fn node(url: &str, node: &str, args: &[&str]) -> Serve {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tern"));
        command
            .args(["serve", "--device", "cpu", "--listen", "127.0.0.1:0"])
            .args(["--cluster", url, "--node", node])
            .args(args)
            .env_remove("TERN_API_KEY");
        // One log per node start, named after the test that started it.
        static STARTS: AtomicUsize = AtomicUsize::new(0);
        let test = std::thread::current()
            .name()
            .unwrap_or("thread")
            .replace("::", "-");
        let name = format!(
            "tern-node-{test}-{node}-{}-{}.log",
            std::process::id(),
            STARTS.fetch_add(1, Ordering::Relaxed)
        );
        let log = std::fs::File::create(std::env::temp_dir().join(name)).unwrap();
        let (child, addr) = spawn(command.stderr(log));
        Serve {
            addr,
            child,
            key: None,
        }
    }

    /// SIGKILL now, from any thread (the process is reaped when this is dropped).
    pub fn kill_now(&self) {
        let status = Command::new("kill")
            .args(["-9", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// SIGINT (Ctrl-C), then waits (up to a minute) for the server to finish and exit.
    pub fn interrupt(mut self) {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(exit) = self.child.try_wait().unwrap() {
                assert!(exit.success(), "tern serve exited with {exit}");
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "tern serve did not stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no chance to save anything more.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// As [`Serve::request`], `None` when the server is gone mid-request.
    pub fn try_request(&self, method: &str, path: &str, body: &[u8]) -> Option<(u16, Value)> {
        try_request(&self.addr, method, path, body)
    }

    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
        let answer = self.call(method, path, &[], body);
        (answer.status, answer.json)
    }

    /// A request with extra header lines (`Name: value`).
    pub fn call(&self, method: &str, path: &str, headers: &[&str], body: &[u8]) -> Answer {
        let mut stream = TcpStream::connect(&self.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(600)))
            .unwrap();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(key) = &self.key {
            head.push_str(&format!("Authorization: Bearer {key}\r\n"));
        }
        for h in headers {
            head.push_str(h);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body).unwrap();
        let mut raw = Vec::new();
        let _ = stream.read_to_end(&mut raw);
        let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let status = std::str::from_utf8(&raw[9..12]).unwrap().parse().unwrap();
        let headers = String::from_utf8_lossy(&raw[..end]).into_owned();
        let body = if headers
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(&raw[end + 4..])
        } else {
            raw[end + 4..].to_vec()
        };
        let body = &body[..];
        // A body that is not JSON (the metrics' text) comes as a JSON string.
        let json = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
        };
        Answer {
            status,
            headers,
            json,
        }
    }

    pub fn send(&self, actor: &str, message: &str) -> Value {
        let path = format!("/v1/actors/{actor}/messages");
        let (status, reply) = self.request("POST", &path, message.as_bytes());
        assert_eq!(status, 200, "{reply}");
        reply
    }

    pub fn start_actor(&self, module: &str) -> String {
        let body = serde_json::json!({ "module": module }).to_string();
        let (status, actor) = self.request("POST", "/v1/actors", body.as_bytes());
        assert_eq!(status, 201, "{actor}");
        actor["id"].as_str().unwrap().to_string()
    }
}

/// One request to the server at `addr` without a key: the status and JSON body, or `None`
/// when the connection failed (the server is gone mid-request) or the body is not JSON.
pub fn try_request(addr: &str, method: &str, path: &str, body: &[u8]) -> Option<(u16, Value)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .ok()?;
    stream.write_all(head.as_bytes()).ok()?;
    stream.write_all(body).ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let status = std::str::from_utf8(raw.get(9..12)?).ok()?.parse().ok()?;
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(&raw[end + 4..])
    } else {
        raw[end + 4..].to_vec()
    };
    Some((status, serde_json::from_slice(&body).ok()?))
}

/// The body of a chunked HTTP/1.1 reply, put together.
pub fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&raw[..line_end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap().trim(), 16).ok())
            .unwrap_or(0);
        raw = &raw[line_end + 2..];
        if size == 0 || raw.len() < size {
            break;
        }
        out.extend_from_slice(&raw[..size]);
        raw = raw.get(size + 2..).unwrap_or(&[]);
    }
    out
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
