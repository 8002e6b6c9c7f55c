//! A server on loopback and a minimal HTTP/1.1 client over `std::net::TcpStream`.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tern_actor::{Limits, Runtime};
use tern_compute::cpu::CpuDevice;
use tern_server::{ApiKey, Config, Server};

/// Echoes each message and then `!`; a message starting with `#` traps. Returns how many
/// messages it has handled, itself included: a counter kept in a global.
pub const ECHO: &str = r#"(module
  (import "tern" "emit" (func $emit (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $count (mut i32) (i32.const 0))
  (data (i32.const 16) "!")
  (func (export "tern_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tern_on_message") (param $ptr i32) (param $len i32) (result i32)
    (if (i32.and (i32.gt_u (local.get $len) (i32.const 0))
                 (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 35)))
      (then unreachable))
    (global.set $count (i32.add (global.get $count) (i32.const 1)))
    (drop (call $emit (local.get $ptr) (local.get $len)))
    (drop (call $emit (i32.const 16) (i32.const 1)))
    (global.get $count)))"#;

/// Keeps a log of every message in its memory and emits the whole log; returns how many
/// messages it has handled (a global). A continuation after a restore is exact only if
/// both memory and globals came back.
pub const COUNTER: &str = include_str!("../data/counter.wat");

/// Sleeps 1.5 s inside a host call (the runtime's testing probe) for each message, so
/// that it stays busy meanwhile.
pub const SLEEPER: &str = r#"(module
  (import "tern" "testing_sleep" (func $sleep (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "tern_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tern_on_message") (param i32 i32) (result i32)
    (call $sleep (i32.const 1500))))"#;

/// The largest message body the test servers take.
pub const MESSAGE_BYTES: usize = 4096;
/// The largest module the test servers take.
pub const MODULE_BYTES: usize = 64 << 10;

/// A server on 127.0.0.1, serving on a Tokio runtime of its own until dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    _tokio: tokio::runtime::Runtime,
}

impl TestServer {
    /// A server on a CPU runtime without models; `echo` is offered as a bundled guest.
    pub fn start(api_key: Option<&str>) -> TestServer {
        TestServer::start_with(|config| {
            config.api_keys = api_key
                .map(|key| ApiKey {
                    client: "default".into(),
                    key: key.into(),
                })
                .into_iter()
                .collect()
        })
    }

    /// As [`TestServer::start`] without a key, with `configure` applied to the
    /// configuration.
    pub fn start_with(configure: impl FnOnce(&mut Config)) -> TestServer {
        let runtime = Runtime::builder(Arc::new(CpuDevice::new()))
            .limits(Limits {
                memory_bytes: 16 << 20,
                call_time: Duration::from_secs(10),
                ..Limits::default()
            })
            .testing_probes()
            .build()
            .expect("a CPU runtime");
        let mut config = Config::new("127.0.0.1:0".parse().unwrap());
        config.message_bytes = MESSAGE_BYTES;
        config.module_bytes = MODULE_BYTES;
        config.bundled = vec![("echo".into(), guest_file("echo", ECHO))];
        configure(&mut config);
        let server = Server::bind(Arc::new(runtime), config).expect("binds a free port");
        let addr = server.local_addr();
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        tokio.spawn(server.run(std::future::pending()));
        TestServer {
            addr,
            _tokio: tokio,
        }
    }

    pub fn get(&self, path: &str) -> HttpResponse {
        request(self.addr, "GET", path, &[], b"")
    }

    pub fn post(&self, path: &str, body: &[u8]) -> HttpResponse {
        request(self.addr, "POST", path, &[], body)
    }

    pub fn delete(&self, path: &str) -> HttpResponse {
        request(self.addr, "DELETE", path, &[], b"")
    }

    /// Uploads [`ECHO`] and returns its digest.
    pub fn upload_echo(&self) -> String {
        let r = self.post("/v1/modules", ECHO.as_bytes());
        assert!(r.status == 201 || r.status == 200, "upload: {r:?}");
        r.json()["digest"].as_str().unwrap().to_string()
    }

    /// Starts an actor of `module` and returns its id.
    pub fn start_actor(&self, module: &str) -> String {
        let body = serde_json::json!({ "module": module }).to_string();
        let r = self.post("/v1/actors", body.as_bytes());
        assert_eq!(r.status, 201, "start: {r:?}");
        r.json()["id"].as_str().unwrap().to_string()
    }
}

/// A guest's text in a file, as a bundled guest would be.
pub fn guest_file(name: &str, wat: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = std::env::temp_dir();
    let path = dir.join(format!("tern-server-{name}-{}.wat", std::process::id()));
    // Written aside and renamed: a server of another test may be reading it right now.
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!("tern-server-{name}-{}-{n}.tmp", std::process::id()));
    std::fs::write(&tmp, wat).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The error body's `type`, checking it also has a message.
    pub fn error_type(&self) -> String {
        let body = self.json();
        assert!(body["error"]["message"].is_string(), "{body}");
        body["error"]["type"].as_str().unwrap().to_string()
    }

    /// Server-sent events as (event, data) pairs.
    pub fn events(&self) -> Vec<(String, Value)> {
        let text = String::from_utf8(self.body.clone()).unwrap();
        let mut events = Vec::new();
        for block in text.split("\n\n") {
            let mut event = String::from("message");
            let mut data = None;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = Some(serde_json::from_str(v.trim()).unwrap());
                }
            }
            if let Some(data) = data {
                events.push((event, data));
            }
        }
        events
    }
}

/// One request on a fresh connection (`Connection: close`), read to its end.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    // The server may answer (413, 401) before reading the whole body and close.
    let _ = stream.write_all(body);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    parse(&raw)
}

fn parse(raw: &[u8]) -> HttpResponse {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(raw)));
    let head = std::str::from_utf8(&raw[..end]).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let rest = &raw[end + 4..];
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    HttpResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size");
        let size = std::str::from_utf8(&rest[..line_end]).unwrap();
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
        rest = &rest[line_end + 2..];
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}
