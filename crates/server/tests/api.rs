//! The actor API over real HTTP on loopback: modules, actors, messages (JSON and streamed),
//! failures, auth and snapshots.

mod common;

use std::io::Write;
use std::net::TcpStream;

use common::{ECHO, MESSAGE_BYTES, MODULE_BYTES, TestServer, request};

#[test]
fn uploads_a_module_and_lists_it_beside_the_bundled_guests() {
    let server = TestServer::start(None);
    let first = server.post("/v1/modules", ECHO.as_bytes());
    assert_eq!(first.status, 201, "{first:?}");
    let digest = first.json()["digest"].as_str().unwrap().to_string();
    assert_eq!(digest.len(), 64);
    assert!(digest.bytes().all(|b| b.is_ascii_hexdigit()));
    let again = server.post("/v1/modules", ECHO.as_bytes());
    assert_eq!(
        (again.status, again.json()["digest"].as_str()),
        (200, Some(&*digest))
    );

    let modules = server.get("/v1/modules").json()["modules"].clone();
    let modules = modules.as_array().unwrap();
    assert_eq!(modules[0]["name"], "echo");
    assert_eq!(modules[0]["source"], "bundled");
    assert_eq!(modules[1]["digest"], digest.as_str());
    assert_eq!(modules[1]["source"], "uploaded");
    // By digest, with or without its prefix, and by bundled name.
    for name in [digest.clone(), format!("sha256:{digest}"), "echo".into()] {
        server.start_actor(&name);
    }
    assert_eq!(
        server.get("/v1/actors").json()["actors"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

#[test]
fn concurrent_clients_get_their_own_replies_in_order() {
    let server = TestServer::start(None);
    let digest = server.upload_echo();
    let actors = [server.start_actor(&digest), server.start_actor(&digest)];
    assert_ne!(actors[0], actors[1]);
    const CLIENTS_PER_ACTOR: usize = 3;
    const MESSAGES: usize = 8;
    // Each client sends its messages one after another; the counter each reply carries must
    // grow for every client, and one actor's counters are 1..=N with none repeated.
    let codes: Vec<(usize, Vec<i64>)> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..2 * CLIENTS_PER_ACTOR)
            .map(|client| {
                let (server, actor) = (&server, &actors[client % 2]);
                scope.spawn(move || {
                    let mut codes = Vec::new();
                    for i in 0..MESSAGES {
                        let message = format!("client {client} message {i}");
                        let path = format!("/v1/actors/{actor}/messages");
                        let r = server.post(&path, message.as_bytes());
                        assert_eq!(r.status, 200, "{r:?}");
                        let body = r.json();
                        assert_eq!(body["output"], format!("{message}!"));
                        codes.push(body["code"].as_i64().unwrap());
                    }
                    (client % 2, codes)
                })
            })
            .collect();
        clients.into_iter().map(|c| c.join().unwrap()).collect()
    });
    for actor in 0..2 {
        let mut all = Vec::new();
        for (_, client_codes) in codes.iter().filter(|(a, _)| *a == actor) {
            assert!(
                client_codes.windows(2).all(|w| w[0] < w[1]),
                "{client_codes:?}"
            );
            all.extend_from_slice(client_codes);
        }
        all.sort();
        let expected: Vec<i64> = (1..=(CLIENTS_PER_ACTOR * MESSAGES) as i64).collect();
        assert_eq!(all, expected);
    }
    let info = server.get(&format!("/v1/actors/{}", actors[0])).json();
    assert_eq!(info["state"], "idle");
    assert_eq!(info["memory_bytes"], 65536);
    assert_eq!(info["module"], digest.as_str());
    assert!(info["last_activity_ms"].as_u64().unwrap() > 0);
}

#[test]
fn streams_each_emit_then_the_code() {
    let server = TestServer::start(None);
    let actor = server.start_actor("echo");
    let path = format!("/v1/actors/{actor}/messages");
    let accept = [("Accept", "text/event-stream")];
    let r = request(
        server.addr,
        "POST",
        &path,
        &accept,
        "héllo\nworld".as_bytes(),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = r.events();
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(names, ["output", "output", "done"], "{events:?}");
    assert_eq!(events[0].1["text"], "héllo\nworld");
    assert_eq!(events[1].1["text"], "!");
    assert_eq!(events[2].1["code"], 1);

    // A client that leaves before its reply disturbs neither the actor nor the server.
    let mut gone = TcpStream::connect(server.addr).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nContent-Length: 3\r\n\r\nbye"
    );
    gone.write_all(head.as_bytes()).unwrap();
    drop(gone);
    let r = server.post(&path, b"still here");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["output"], "still here!");
    // Either the abandoned message ran (code 3 here) or it had not arrived (code 2).
    assert!(matches!(r.json()["code"].as_i64(), Some(2 | 3)));
}

/// `s...` emits "x" until `emit` fails, counting the emits in a global, and returns the
/// failure's code; any other message returns the count so far.
const CHATTY: &str = r#"(module
  (import "tern" "emit" (func $emit (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $n (mut i32) (i32.const 0))
  (data (i32.const 0) "x")
  (func (export "tern_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tern_on_message") (param $ptr i32) (param $len i32) (result i32)
    (local $code i32)
    (if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 115))
      (then
        (loop $again
          (local.set $code (call $emit (i32.const 0) (i32.const 1)))
          (if (i32.ge_s (local.get $code) (i32.const 0))
            (then
              (global.set $n (i32.add (global.get $n) (i32.const 1)))
              (br $again))))
        (return (local.get $code))))
    (global.get $n)))"#;

#[test]
fn a_streaming_client_that_leaves_cancels_its_message() {
    use std::io::Read;
    let server = TestServer::start(None);
    let r = server.post("/v1/modules", CHATTY.as_bytes());
    assert!(r.status == 201 || r.status == 200, "{r:?}");
    let actor = server.start_actor(r.json()["digest"].as_str().unwrap());
    let path = format!("/v1/actors/{actor}/messages");
    let mut client = TcpStream::connect(server.addr).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nContent-Length: 5\r\n\r\nspeak"
    );
    client.write_all(head.as_bytes()).unwrap();
    // Read until the stream has begun, then leave.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("event: output") {
        let n = client.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "the stream ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    drop(client);
    // The next message runs after the abandoned one: had that run on, it would have emitted
    // until the 16 MiB output limit.
    let r = server.post(&path, b"count");
    assert_eq!(r.status, 200, "{r:?}");
    let emitted = r.json()["code"].as_i64().unwrap();
    assert!((1..16 << 20).contains(&emitted), "{emitted} emits");
}

#[test]
fn a_trapping_actor_fails_alone() {
    let server = TestServer::start(None);
    let digest = server.upload_echo();
    let (bad, good) = (server.start_actor(&digest), server.start_actor(&digest));
    let trap = server.post(&format!("/v1/actors/{bad}/messages"), b"#trap");
    assert_eq!(
        (trap.status, trap.error_type()),
        (409, "actor_failed".into())
    );
    for _ in 0..2 {
        let later = server.post(&format!("/v1/actors/{bad}/messages"), b"hello");
        assert_eq!(
            (later.status, later.error_type()),
            (409, "actor_failed".into())
        );
    }
    let info = server.get(&format!("/v1/actors/{bad}")).json();
    assert_eq!(info["state"], "failed");
    assert!(
        info["fault"].as_str().unwrap().contains("unreachable"),
        "{info}"
    );
    let ok = server.post(&format!("/v1/actors/{good}/messages"), b"fine");
    assert_eq!(
        (ok.status, ok.json()["output"].as_str()),
        (200, Some("fine!"))
    );
}

#[test]
fn deleting_a_busy_actor_stops_its_guest_at_once() {
    const LOOP: &str = r#"(module
      (memory (export "memory") 1)
      (func (export "tern_alloc") (param i32) (result i32) (i32.const 1024))
      (func (export "tern_on_message") (param i32 i32) (result i32)
        (loop $l (br $l))
        (i32.const 0)))"#;
    let server = TestServer::start(None);
    let upload = server.post("/v1/modules", LOOP.as_bytes());
    let actor = server.start_actor(upload.json()["digest"].as_str().unwrap());
    let started = std::time::Instant::now();
    let reply = std::thread::scope(|s| {
        let spin = s.spawn(|| server.post(&format!("/v1/actors/{actor}/messages"), b"go"));
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert_eq!(server.delete(&format!("/v1/actors/{actor}")).status, 204);
        spin.join().unwrap()
    });
    assert_eq!(
        (reply.status, reply.error_type()),
        (409, "actor_failed".into())
    );
    assert!(
        reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("stopped")
    );
    // Not at the ten-second time limit: the guest ended when its actor was deleted.
    assert!(started.elapsed() < std::time::Duration::from_secs(8));
}

#[test]
fn bad_input_gets_a_clear_error() {
    let server = TestServer::start(None);
    let bad_module = server.post("/v1/modules", b"\0asm\x01\0\0\0garbage");
    assert_eq!(
        (bad_module.status, bad_module.error_type()),
        (400, "invalid_module".into())
    );
    // A valid module without the exports an actor needs is refused at upload.
    let no_exports = server.post("/v1/modules", b"(module)");
    assert_eq!(
        (no_exports.status, no_exports.error_type()),
        (400, "invalid_module".into())
    );
    assert!(
        String::from_utf8_lossy(&no_exports.body).contains("no memory named `memory`"),
        "{no_exports:?}"
    );
    let empty = server.post("/v1/modules", b"");
    assert_eq!(empty.status, 400);
    let huge = server.post("/v1/modules", &vec![0; MODULE_BYTES + 1]);
    assert_eq!(
        (huge.status, huge.error_type()),
        (413, "payload_too_large".into())
    );

    for body in [&b"{"[..], br#"{"modul": "echo"}"#, b"[]"] {
        let r = server.post("/v1/actors", body);
        assert_eq!(
            (r.status, r.error_type()),
            (400, "invalid_request".into()),
            "{body:?}"
        );
    }
    let unknown = server.post("/v1/actors", br#"{"module": "nope"}"#);
    assert_eq!(
        (unknown.status, unknown.error_type()),
        (404, "not_found".into())
    );

    for (method, path) in [
        ("GET", "/v1/actors/a999"),
        ("DELETE", "/v1/actors/a999"),
        ("POST", "/v1/actors/a999/messages"),
        ("POST", "/v1/actors/a999/snapshot"),
        ("GET", "/v1/nothing"),
    ] {
        let r = request(server.addr, method, path, &[], b"hi");
        assert_eq!(
            (r.status, r.error_type()),
            (404, "not_found".into()),
            "{method} {path}"
        );
    }

    // A route that exists, asked with a method it does not take: the same error envelope,
    // and the methods it takes.
    let wrong = request(server.addr, "PUT", "/v1/actors", &[], b"");
    assert_eq!(
        (wrong.status, wrong.error_type()),
        (405, "method_not_allowed".into()),
        "{wrong:?}"
    );
    assert_eq!(wrong.header("allow"), Some("GET,HEAD,POST"), "{wrong:?}");

    let actor = server.start_actor("echo");
    let path = format!("/v1/actors/{actor}/messages");
    let too_long = server.post(&path, &vec![b'x'; MESSAGE_BYTES + 1]);
    assert_eq!(
        (too_long.status, too_long.error_type()),
        (413, "payload_too_large".into())
    );
    let fits = server.post(&path, &vec![b'x'; MESSAGE_BYTES]);
    assert_eq!(fits.status, 200, "{fits:?}");
}

#[test]
fn the_key_guards_every_route_but_health() {
    let server = TestServer::start(Some("k-secret"));
    let routes = [
        ("GET", "/v1/modules"),
        ("GET", "/metrics"),
        ("POST", "/v1/modules"),
        ("GET", "/v1/actors"),
        ("POST", "/v1/actors"),
        ("GET", "/v1/actors/a1"),
        ("DELETE", "/v1/actors/a1"),
        ("POST", "/v1/actors/a1/messages"),
        ("POST", "/v1/actors/a1/snapshot"),
        ("GET", "/v1/unknown"),
    ];
    let wrong: [&[(&str, &str)]; 4] = [
        &[],
        &[("Authorization", "Bearer k-secreT")],
        &[("Authorization", "Bearer k-secret2")],
        &[("Authorization", "k-secret")],
    ];
    for (method, path) in routes {
        for headers in wrong {
            let r = request(server.addr, method, path, headers, b"{}");
            assert_eq!(r.status, 401, "{method} {path} {headers:?}");
            assert_eq!(r.error_type(), "authentication_error");
            assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        }
    }
    let health = server.get("/health");
    assert_eq!(
        (health.status, health.json()["status"].as_str()),
        (200, Some("ok"))
    );
    let key = [("Authorization", "Bearer k-secret")];
    let list = request(server.addr, "GET", "/v1/actors", &key, b"");
    assert_eq!(list.status, 200, "{list:?}");
    let start = request(
        server.addr,
        "POST",
        "/v1/actors",
        &key,
        br#"{"module":"echo"}"#,
    );
    assert_eq!(start.status, 201, "{start:?}");
}

#[test]
fn snapshots_parse_and_deleted_actors_are_gone() {
    let server = TestServer::start(None);
    let actor = server.start_actor("echo");
    assert_eq!(
        server
            .post(&format!("/v1/actors/{actor}/messages"), b"one")
            .status,
        200
    );
    let snap = server.post(&format!("/v1/actors/{actor}/snapshot"), b"");
    assert_eq!(snap.status, 200, "{snap:?}");
    assert_eq!(
        snap.header("content-type"),
        Some("application/octet-stream")
    );
    tern_snapshot::parse(&snap.body).expect("the snapshot parses");

    let deleted = request(
        server.addr,
        "DELETE",
        &format!("/v1/actors/{actor}"),
        &[],
        b"",
    );
    assert_eq!(deleted.status, 204);
    assert_eq!(server.get(&format!("/v1/actors/{actor}")).status, 404);
    assert_eq!(
        server
            .post(&format!("/v1/actors/{actor}/messages"), b"x")
            .status,
        404
    );
    assert!(
        server.get("/v1/actors").json()["actors"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[test]
fn metrics_count_requests_by_route_and_show_actors_and_kv_bytes() {
    let server = TestServer::start(None);
    let actor = server.start_actor("echo");
    for _ in 0..3 {
        let r = server.post(&format!("/v1/actors/{actor}/messages"), b"hi");
        assert_eq!(r.status, 200);
    }
    assert_eq!(server.get("/v1/actors/nobody").status, 404);
    let r = server.get("/metrics");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let text = String::from_utf8(r.body).unwrap();
    for line in [
        r#"tern_http_requests_total{route="/v1/actors/{id}/messages",method="POST",status="200"} 3"#,
        r#"tern_http_requests_total{route="/v1/actors/{id}",method="GET",status="404"} 1"#,
        r#"tern_http_requests_total{route="/v1/actors",method="POST",status="201"} 1"#,
        r#"tern_http_request_duration_seconds_count{route="/v1/actors/{id}/messages",method="POST"} 3"#,
        r#"tern_actors{state="idle"} 1"#,
        "tern_kv_reserved_bytes 0",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
    }
    // Ids never become labels.
    assert!(!text.contains(&actor), "{text}");
}

#[test]
fn the_openapi_document_lists_exactly_the_routes_served() {
    let server = TestServer::start(None);
    let doc = server.get("/openapi.json").json();
    assert_eq!(doc["openapi"], "3.1.0");
    let actor = server.start_actor("echo");
    let paths = doc["paths"].as_object().unwrap();
    let mut documented = Vec::new();
    for (path, item) in paths {
        for method in ["get", "post", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            documented.push(format!("{} {path}", method.to_uppercase()));
            let concrete = path.replace("{id}", &actor);
            // An empty body: each route answers its own error, never "no such route".
            let r = request(server.addr, &method.to_uppercase(), &concrete, &[], b"");
            let unrouted = r.status == 405
                || (r.status == 404 && r.json()["error"]["message"] == "no such route");
            assert!(
                !unrouted,
                "{method} {path} is documented but not served: {r:?}"
            );
            if method == "delete" {
                break; // the actor is gone now
            }
        }
    }
    documented.sort();
    let served = [
        "DELETE /v1/actors/{id}",
        "GET /health",
        "GET /metrics",
        "GET /openapi.json",
        "GET /v1/actors",
        "GET /v1/actors/{id}",
        "GET /v1/models",
        "GET /v1/modules",
        "POST /v1/actors",
        "POST /v1/actors/{id}/fork",
        "POST /v1/actors/{id}/messages",
        "POST /v1/actors/{id}/snapshot",
        "POST /v1/chat/completions",
        "POST /v1/completions",
        "POST /v1/modules",
    ];
    assert_eq!(documented, served);
}

#[test]
fn forks_and_uploaded_snapshots_continue_from_the_state_they_copy() {
    let server = TestServer::start(None);
    let actor = server.start_actor("echo");
    let say = |id: &str, text: &str| {
        let r = server.post(&format!("/v1/actors/{id}/messages"), text.as_bytes());
        assert_eq!(r.status, 200, "{r:?}");
        r.json()["code"].as_i64().unwrap()
    };
    say(&actor, "one");
    say(&actor, "two");
    let fork = server.post(&format!("/v1/actors/{actor}/fork"), b"");
    assert_eq!(fork.status, 201, "{fork:?}");
    let fork = fork.json()["id"].as_str().unwrap().to_string();
    assert_ne!(fork, actor);
    // Each continues from the count of two, independently.
    assert_eq!(say(&fork, "three"), 3);
    assert_eq!(say(&fork, "four"), 4);
    assert_eq!(say(&actor, "three"), 3);

    // A snapshot file uploaded to POST /v1/actors restores a new actor from it.
    let snapshot = server.post(&format!("/v1/actors/{actor}/snapshot"), b"");
    assert_eq!(snapshot.status, 200);
    let octets = [("Content-Type", "application/octet-stream")];
    let restored = request(server.addr, "POST", "/v1/actors", &octets, &snapshot.body);
    assert_eq!(restored.status, 201, "{restored:?}");
    let restored = restored.json()["id"].as_str().unwrap().to_string();
    assert_eq!(say(&restored, "four"), 4);

    // A damaged one is refused with a clear error, and nothing is started.
    let mut damaged = snapshot.body.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0xff;
    let refused = request(server.addr, "POST", "/v1/actors", &octets, &damaged);
    assert_eq!(refused.status, 400, "{refused:?}");
    assert!(
        refused.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("snapshot")
    );
    let refused = request(
        server.addr,
        "POST",
        "/v1/actors",
        &octets,
        b"not a snapshot",
    );
    assert_eq!(refused.status, 400, "{refused:?}");
    let listed = server.get("/v1/actors").json();
    assert_eq!(listed["actors"].as_array().unwrap().len(), 3);
}

#[test]
fn each_key_names_a_client_that_reaches_only_its_own_actors() {
    let server = TestServer::start_with(|config| {
        config.api_keys = ["alice", "bob"]
            .iter()
            .map(|name| tern_server::ApiKey {
                client: name.to_string(),
                key: format!("key-of-{name}"),
            })
            .collect();
    });
    let as_client = |name: &str, method: &str, path: &str, body: &[u8]| {
        let auth = format!("Bearer key-of-{name}");
        request(server.addr, method, path, &[("Authorization", &auth)], body)
    };
    let start = |name: &str| {
        let r = as_client(name, "POST", "/v1/actors", br#"{"module": "echo"}"#);
        assert_eq!(r.status, 201, "{r:?}");
        r.json()["id"].as_str().unwrap().to_string()
    };
    let (a, b) = (start("alice"), start("bob"));
    let listed = |name: &str| -> Vec<String> {
        as_client(name, "GET", "/v1/actors", b"").json()["actors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(listed("alice"), std::slice::from_ref(&a));
    assert_eq!(listed("bob"), std::slice::from_ref(&b));
    // Bob cannot reach Alice's actor by any route: it is as unknown as a missing one.
    for (method, path) in [
        ("GET", format!("/v1/actors/{a}")),
        ("POST", format!("/v1/actors/{a}/messages")),
        ("POST", format!("/v1/actors/{a}/snapshot")),
        ("POST", format!("/v1/actors/{a}/fork")),
        ("DELETE", format!("/v1/actors/{a}")),
    ] {
        let r = as_client("bob", method, &path, b"hi");
        assert_eq!(r.status, 404, "{method} {path}: {r:?}");
        assert_eq!(r.error_type(), "not_found");
    }
    // Alice still can, and her fork is hers.
    assert_eq!(
        as_client("alice", "POST", &format!("/v1/actors/{a}/messages"), b"hi").status,
        200
    );
    let fork = as_client("alice", "POST", &format!("/v1/actors/{a}/fork"), b"");
    assert_eq!(fork.status, 201, "{fork:?}");
    assert_eq!(listed("alice").len(), 2);
    assert_eq!(listed("bob").len(), 1);
    assert_eq!(as_client("carol", "GET", "/v1/actors", b"").status, 401);
}
