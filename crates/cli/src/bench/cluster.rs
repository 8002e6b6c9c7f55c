//! `tern bench cluster`: a cluster of three nodes on a nats-server on loopback, two of them
//! (`bench-a` and `bench-c`) sharing a folder of host objects (`--host-objects`). Measures the
//! object store's put and get throughput, moving an actor with a long conversation between
//! nodes against re-prefilling that conversation (to a node sharing the folder, and to one
//! that reads the object store), the time a message routed through the other node adds to
//! the first token, and failover: a node killed with SIGKILL to the first reply from another
//! node, and how long its heartbeat takes to lapse.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tern_compute::DeviceChoice;
use tern_server::cluster::admin::{Admin, ClusterClient, Move};

use super::median;
use super::serve::{SseReader, post, read_chunk, read_head, request};

/// Emits its message back; durable like any actor, so each message is saved once.
const ECHO: &str = r#"(module
  (import "tern" "emit" (func $emit (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "tern_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tern_on_message") (param $ptr i32) (param $len i32) (result i32)
    (drop (call $emit (local.get $ptr) (local.get $len)))
    (i32.const 0)))"#;

#[derive(clap::Args)]
pub struct ClusterBenchArgs {
    /// Tokens of conversation the moved and failed-over actor holds.
    #[arg(long, default_value_t = 4096, value_parser = crate::parse_count)]
    context: usize,
    /// Rounds of the routed-message measurement (each alternates direct and routed).
    #[arg(long, default_value_t = 30, value_parser = crate::parse_count)]
    rounds: usize,
    /// Moves of the long actor between the nodes (the first to a node that never held it).
    #[arg(long, default_value_t = 5, value_parser = crate::parse_count)]
    moves: usize,
    #[arg(long, default_value = "cpu", value_parser = crate::parse_device)]
    device: DeviceChoice,
    /// The nodes' KV cache type (f32 or f16).
    #[arg(long, default_value = "f32", value_parser = crate::parse_kv_type)]
    kv_type: tern_model::KvType,
    #[command(flatten)]
    model: super::BenchModel,
    /// The nats-server binary (default: $TERN_NATS_SERVER, else the one scripts/nats-server
    /// installs).
    #[arg(long)]
    nats_server: Option<PathBuf>,
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nats_binary(args: &ClusterBenchArgs) -> anyhow::Result<PathBuf> {
    if let Some(path) = &args.nats_server {
        return Ok(path.clone());
    }
    if let Some(path) = std::env::var_os("TERN_NATS_SERVER") {
        return Ok(path.into());
    }
    let script = super::project_script("nats-server");
    let out = Command::new(script).output()?;
    if !out.status.success() {
        bail!(
            "installing nats-server failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

fn start_nats(binary: &Path, dir: &Path) -> anyhow::Result<(Proc, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let conf = dir.join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "listen: 127.0.0.1:{port}\nmax_payload: 8MB\njetstream {{ store_dir: \"{}\" }}\n",
            dir.join("js").display()
        ),
    )?;
    let child = Command::new(binary)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("nats.log"))?)
        .spawn()
        .context("starting nats-server")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nats-server did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((Proc(child), format!("nats://127.0.0.1:{port}")))
}

fn start_node(
    url: &str,
    name: &str,
    args: &ClusterBenchArgs,
    model: &Path,
    dir: &Path,
    host_objects: Option<&Path>,
) -> anyhow::Result<(Proc, String)> {
    let device = format!("{:?}", args.device).to_lowercase();
    let mut command = Command::new(std::env::current_exe()?);
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--device", &device])
        .args(["--kv-type", args.kv_type.name()])
        .args(["--cluster", url, "--node", name])
        .arg("--model")
        .arg(model);
    if let Some(folder) = host_objects {
        command.arg("--host-objects").arg(folder);
    }
    let mut child = command
        .env_remove("TERN_API_KEY")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join(format!("{name}.log")))?)
        .spawn()
        .context("starting tern serve")?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut BufReader::new(child.stdout.take().context("tern serve's output")?),
        &mut line,
    )?;
    let Some(addr) = line.trim().strip_prefix("listening on http://") else {
        let _ = child.kill();
        bail!("tern serve did not start: {line:?}");
    };
    Ok((Proc(child), addr.to_string()))
}

/// Sends `message` to `actor` through `addr`; the reply's JSON.
fn send(addr: &str, actor: &str, message: &str) -> anyhow::Result<Value> {
    let (status, body) = post(addr, &format!("/v1/actors/{actor}/messages"), &[], message)?;
    let reply: Value = serde_json::from_slice(&body).context("a reply")?;
    if status != 200 {
        bail!("{status}: {reply}");
    }
    Ok(reply)
}

/// Seconds from sending `message` to `actor` through `addr` to its first emitted output.
fn first_output(addr: &str, actor: &str, message: &str) -> anyhow::Result<f64> {
    let sent = Instant::now();
    let mut stream = request(
        addr,
        &format!("/v1/actors/{actor}/messages"),
        &["Accept: text/event-stream"],
        message,
    )?;
    let mut reader = BufReader::new(&mut stream);
    let status = read_head(&mut reader)?;
    if status != 200 {
        bail!("{status}");
    }
    let mut events = SseReader::default();
    let mut first = None;
    while let Some(chunk) = read_chunk(&mut reader)? {
        if first.is_none() && !events.push(&chunk).is_empty() {
            first = Some(sent.elapsed().as_secs_f64());
        }
    }
    first.context("no output")
}

/// The chat guest's one-shot request over `messages`, generating one token; the prompt's
/// token count.
fn request_turn(addr: &str, actor: &str, messages: &Value) -> anyhow::Result<u64> {
    let body = json!({"request": {"messages": messages, "max_tokens": 1, "temperature": 0}});
    let reply = send(addr, actor, &body.to_string())?;
    let output = reply["output"].as_str().unwrap_or("");
    output
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|l| l["prompt_tokens"].as_u64())
        .with_context(|| format!("no prompt token count in the reply {reply}"))
}

pub fn cluster(args: ClusterBenchArgs) -> anyhow::Result<ExitCode> {
    let model = args.model.path()?;
    let nats_bin = nats_binary(&args)?;
    let dir = std::env::temp_dir().join(format!("tern-bench-cluster-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (_nats, url) = start_nats(&nats_bin, &dir)?;
    let device = format!("{:?}", args.device).to_lowercase();
    let shared = dir.join("host-objects");
    let (mut node_a, addr_a) = start_node(&url, "bench-a", &args, &model, &dir, Some(&shared))?;
    let (node_b, addr_b) = start_node(&url, "bench-b", &args, &model, &dir, None)?;
    let (_node_c, _) = start_node(&url, "bench-c", &args, &model, &dir, Some(&shared))?;
    let admin = ClusterClient::connect(&url)?;
    let version = Command::new(&nats_bin).arg("--version").output()?;
    println!(
        "cluster of 3 nodes on {} (loopback; bench-a and bench-c share host objects), device \
         {device}, model {}, {} KV cache",
        String::from_utf8_lossy(&version.stdout).trim(),
        model.display(),
        args.kv_type.name()
    );

    // The object store.
    let size = 64 << 20;
    let mut puts = Vec::new();
    let mut gets = Vec::new();
    for _ in 0..3 {
        let (put, get) = admin.store_round_trip(size)?;
        puts.push(size as f64 / put.as_secs_f64() / 1e6);
        gets.push(size as f64 / get.as_secs_f64() / 1e6);
    }
    println!(
        "object store, 64 MiB objects (median of 3): put {:.0} MB/s, get {:.0} MB/s",
        median(&puts),
        median(&gets)
    );

    // The floor under routing: a request and its reply over NATS, answered at once.
    let mut pings = Vec::new();
    for _ in 0..args.rounds * 10 {
        let started = Instant::now();
        admin.request("bench-a", &Admin::Ping)?;
        pings.push(started.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "a NATS request and reply between processes, answered at once (median of {}): {:.2} ms",
        pings.len(),
        median(&pings)
    );

    // Routed messages: a trivial one, then the same short chat turn, each through the owner
    // and through the other node.
    let (status, body) = post(&addr_a, "/v1/modules", &[], ECHO)?;
    let digest = serde_json::from_slice::<Value>(&body)?["digest"]
        .as_str()
        .map(String::from)
        .with_context(|| format!("uploading the echo module: {status}"))?;
    let echo = start_actor(&addr_a, &digest)?;
    let (direct, routed) = alternated(&addr_a, &addr_b, args.rounds * 10, |addr, _| {
        let started = Instant::now();
        send(addr, &echo, "ping")?;
        Ok(started.elapsed().as_secs_f64() * 1e3)
    })?;
    println!(
        "a trivial message, round trip (median of {}, alternated): direct {direct:.2} ms, \
         routed through the other node {routed:.2} ms: +{:.2} ms",
        args.rounds * 10,
        routed - direct
    );

    let short = start_chat(&addr_a, 4096)?;
    let (direct, routed) = alternated(&addr_a, &addr_b, args.rounds, |addr, round| {
        Ok(first_output(addr, &short, &format!("Say {round}."))? * 1e3)
    })?;
    println!(
        "time to first token, short turn (median of {}, alternated): direct {direct:.2} ms, \
         routed through the other node {routed:.2} ms: +{:.2} ms (target <= 2 ms)",
        args.rounds,
        routed - direct
    );

    // The long conversation: its prefill is the re-prefill baseline.
    let long = start_chat(&addr_a, args.context + 512)?;
    let text = |n: usize| -> String {
        (0..n)
            .map(|i| format!("Sentence {i}: the quick brown fox jumps over the lazy dog. "))
            .collect()
    };
    // The model's tokenizer decides how many sentences make the context: a probe counts
    // the tokens of 20 and of 40.
    let probe = start_chat(&addr_a, 8192)?;
    let count = |n: usize| {
        request_turn(
            &addr_a,
            &probe,
            &json!([{"role": "user", "content": text(n)}]),
        )
    };
    let (t20, t40) = (count(20)?, count(40)?);
    let per_sentence = (t40.saturating_sub(t20) as f64 / 20.0).max(1.0);
    let fixed = t20 as f64 - 20.0 * per_sentence;
    let sentences = ((args.context as f64 - fixed) / per_sentence).max(1.0) as usize;
    let _ = super::serve::call(&addr_a, "DELETE", &format!("/v1/actors/{probe}"), &[], "");
    let text = text(sentences);
    let mut messages = json!([{"role": "user", "content": text}]);
    let started = Instant::now();
    let tokens = request_turn(&addr_a, &long, &messages)?;
    let prefill = started.elapsed().as_secs_f64() * 1e3;
    let snapshot = admin.snapshot_bytes(&long)?.unwrap_or(0);
    println!(
        "actor with {tokens} tokens of conversation: snapshot {:.1} MB; prefilling it took \
         {prefill:.0} ms",
        snapshot as f64 / 1e6
    );
    // To a node of this machine sharing the owner's host objects, and back.
    let (took, answer) = admin.move_actor(&long, "bench-c")?;
    first_move(
        "a node sharing the owner's host objects",
        &took,
        &answer,
        prefill,
    );
    admin.move_actor(&long, "bench-a")?;
    // The first move to bench-b reads the whole chain from the object store. Later moves go
    // back to a node that holds it still, and read only what changed.
    let (mut later, mut pauses, mut releases, mut activations) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.moves {
        let to = if i % 2 == 0 { "bench-b" } else { "bench-a" };
        let (took, answer) = admin.move_actor(&long, to)?;
        if i == 0 {
            first_move(
                "a node that reads the object store",
                &took,
                &answer,
                prefill,
            );
        } else {
            later.push(ms(took.total()));
        }
        pauses.push(ms(took.pause));
        releases.push(answer["released"]["ms"].as_f64().unwrap_or(f64::NAN));
        activations.push(answer["activated"]["ms"].as_f64().unwrap_or(f64::NAN));
    }
    let back = if later.is_empty() {
        String::new()
    } else {
        format!(
            "; a move back to a node that kept the chain, median of {}: {:.1} ms in all",
            later.len(),
            median(&later)
        )
    };
    println!(
        "migration between the nodes: the pause (save, release, claim, restore; no node \
         answering for the actor), median of {}: {:.1} ms = {:.0}x faster than re-prefilling\
         {back} (targets <= 100 ms, >= 5x); of the pause, the owner's release took {:.0} ms \
         and the target's claim and restore {:.0} ms (medians, whole milliseconds)",
        pauses.len(),
        median(&pauses),
        prefill / median(&pauses),
        median(&releases),
        median(&activations),
    );

    // Failover: the owner killed, the next message through the other node.
    let owner_is_a = args.moves.is_multiple_of(2);
    let (survivor, victim_name) = if owner_is_a {
        (&addr_b, "bench-a")
    } else {
        (&addr_a, "bench-b")
    };
    if owner_is_a {
        let _ = node_a.0.kill();
        let _ = node_a.0.wait();
    } else {
        drop(node_b);
    }
    let killed = Instant::now();
    let watcher = {
        let (url, victim) = (url.clone(), victim_name.to_string());
        std::thread::spawn(move || -> anyhow::Result<f64> {
            let admin = ClusterClient::connect(&url)?;
            while admin.node_listed(&victim)? {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(killed.elapsed().as_secs_f64() * 1e3)
        })
    };
    messages
        .as_array_mut()
        .context("messages")?
        .push(json!({"role": "user", "content": "And now?"}));
    request_turn(survivor, &long, &messages)?;
    let failover = killed.elapsed().as_secs_f64() * 1e3;
    // The same kind of turn again, on the actor now resident: the message's own share.
    messages
        .as_array_mut()
        .context("messages")?
        .push(json!({"role": "user", "content": "And then?"}));
    let started = Instant::now();
    request_turn(survivor, &long, &messages)?;
    let turn = started.elapsed().as_secs_f64() * 1e3;
    let lapse = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("the heartbeat watcher panicked"))??;
    println!(
        "failover, {tokens} tokens: owner killed (SIGKILL) to the first reply from the other \
         node {failover:.0} ms, of which the turn itself {turn:.0} ms (the node was known gone \
         at once: its subject had no responders); its heartbeat lapsed after {lapse:.0} ms \
         (targets: detection <= 3 s, failover <= 2 s after it)"
    );
    drop(node_a);
    if std::env::var_os("TERN_BENCH_KEEP").is_some() {
        eprintln!("logs in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(ExitCode::SUCCESS)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Prints the first move of the long actor to `target` (which never held it), against
/// re-prefilling it (`prefill_ms`).
fn first_move(target: &str, took: &Move, answer: &Value, prefill_ms: f64) {
    let prefetched = &answer["prefetched"];
    println!(
        "first move to {target} (the target reads {:.1} MB of {:.1} MB of chain from the \
         object store): {:.0} ms in all = {:.1}x faster than re-prefilling (target <= 100 \
         ms); of it {:.0} ms copying ahead while the actor answered on its owner ({} ms \
         reading, the rest making the restore's memory ready), then {:.1} ms with no node \
         answering for it",
        prefetched["read_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        prefetched["chain_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        ms(took.total()),
        prefill_ms / ms(took.total()),
        ms(took.ahead),
        prefetched["read_ms"],
        ms(took.pause),
    );
}

/// The medians of `time` through `direct` and through `routed`, `rounds` times each,
/// alternating which goes first.
fn alternated(
    direct: &str,
    routed: &str,
    rounds: usize,
    mut time: impl FnMut(&str, usize) -> anyhow::Result<f64>,
) -> anyhow::Result<(f64, f64)> {
    let (mut through_direct, mut through_routed) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [direct, routed]
        } else {
            [routed, direct]
        };
        for addr in order {
            let taken = time(addr, round)?;
            if addr == direct {
                through_direct.push(taken);
            } else {
                through_routed.push(taken);
            }
        }
    }
    Ok((median(&through_direct), median(&through_routed)))
}

/// A chat actor through `addr`, set to generate one token a turn in a session of
/// `context` positions.
fn start_chat(addr: &str, context: usize) -> anyhow::Result<String> {
    let actor = start_actor(addr, "chat")?;
    let config = json!({"config": {"max_tokens": 1, "context": context}});
    send(addr, &actor, &config.to_string())?;
    Ok(actor)
}

fn start_actor(addr: &str, module: &str) -> anyhow::Result<String> {
    let (status, body) = post(
        addr,
        "/v1/actors",
        &[],
        &json!({"module": module}).to_string(),
    )?;
    let reply: Value = serde_json::from_slice(&body)?;
    if status != 201 {
        bail!("starting an actor: {status} {reply}");
    }
    Ok(reply["id"].as_str().context("an actor id")?.to_string())
}
