//! `tern bench serve`: `tern serve` under load from clients over HTTP on loopback, beside
//! llama.cpp's own `llama-server` (built by scripts/llama-server) under the same load, in the
//! same run.
//!
//! Measured, per server: for 1, 4, 16 and 64 concurrent multi-turn conversations (each turn
//! streamed, greedy, the whole history resent as OpenAI clients do), the aggregate generated
//! tokens per second, time to first token and time per output token (p50, p99); turn 2's
//! time to first token after a long first turn, with the conversation's cache kept (Tern: a
//! durable session; llama-server: `cache_prompt`) against a fresh prefill. For Tern alone:
//! one conversation's decode speed over HTTP against the same request sent to the chat actor
//! in process, and a chat turn's time beside hostile actors (one spinning in a loop, one
//! flooding output) against the idle server's.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tern_actor::{Actor, ActorModule, Runtime};
use tern_compute::DeviceChoice;

use super::zero_copy::percentile;

#[derive(clap::Args)]
pub struct ServeBenchArgs {
    /// Where the models run.
    #[arg(long, default_value = "cpu", value_parser = crate::parse_device)]
    device: DeviceChoice,
    #[command(flatten)]
    model: super::BenchModel,
    /// Concurrent conversations, one run each.
    #[arg(long, default_value = "1,4,16,64", value_delimiter = ',')]
    clients: Vec<usize>,
    /// Turns per conversation.
    #[arg(long, default_value_t = 3, value_parser = crate::parse_count)]
    turns: usize,
    /// Tokens generated per turn (at most: a reply may end sooner).
    #[arg(long, default_value_t = 32, value_parser = crate::parse_count)]
    tokens: usize,
    /// Tokens of history before turn 2 in the session measurement.
    #[arg(long, default_value_t = 2000, value_parser = crate::parse_count)]
    history: usize,
    /// CPU threads for each server (default: all cores).
    #[arg(long, value_parser = crate::parse_count)]
    threads: Option<usize>,
    /// The llama-server binary (default: built by scripts/llama-server).
    #[arg(long)]
    llama_server: Option<PathBuf>,
    /// Measure Tern alone.
    #[arg(long)]
    no_baseline: bool,
}

/// One server under test.
struct Target {
    name: &'static str,
    addr: String,
    child: Child,
    /// Tern keeps a conversation in a session named by a header; llama-server in a slot,
    /// found by `cache_prompt`.
    tern: bool,
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One streamed turn, timed.
struct Turn {
    text: String,
    /// Seconds from sending to the first generated text.
    first: f64,
    /// Seconds per generated token after the first (`None` below two tokens).
    per_token: Option<f64>,
    tokens: usize,
}

pub fn serve(args: ServeBenchArgs) -> anyhow::Result<ExitCode> {
    let path = args.model.path()?;
    let threads = args.threads.unwrap_or_else(num_cpus);
    let most = args.clients.iter().copied().max().unwrap_or(1);
    let state = std::env::temp_dir().join(format!("tern-bench-serve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let mut targets = vec![start_tern(&args, &path, threads, &state)?];
    if !args.no_baseline {
        targets.push(start_llama(&args, &path, threads, most)?);
    }
    println!(
        "model {}, {threads} threads, {} turns of up to {} tokens per conversation, greedy",
        path.display(),
        args.turns,
        args.tokens
    );
    // One request each first, so that no figure includes a server's warm-up.
    for target in &targets {
        let hello = [json!({"role": "user", "content": "Hello."})];
        chat(
            &target.addr,
            target.tern,
            &format!("warm-{}", random_tag()),
            &hello,
            4,
            false,
        )?;
    }
    println!(
        "\n| server | clients | generated tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | turns | failed |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut failures = Vec::new();
    for &clients in &args.clients {
        for target in &targets {
            let run = load(target, clients, args.turns, args.tokens)?;
            println!(
                "| {} | {clients} | {:.1} | {:.0} / {:.0} | {:.1} / {:.1} | {} | {} |",
                target.name,
                run.tokens as f64 / run.seconds,
                1e3 * run.first[0],
                1e3 * run.first[1],
                1e3 * run.per_token[0],
                1e3 * run.per_token[1],
                run.turns,
                run.failed.len()
            );
            failures.extend(
                run.failed
                    .into_iter()
                    .map(|e| format!("{}: {e}", target.name)),
            );
        }
    }
    if !failures.is_empty() {
        eprintln!("failed turns (first 5 of {}):", failures.len());
        for f in failures.iter().take(5) {
            eprintln!("  {f}");
        }
        eprintln!(
            "tern serve's log: {}",
            state.with_extension("log").display()
        );
    }
    println!(
        "\n| server | turn-2 TTFT, cache kept | turn-2 TTFT, fresh prefill | speed-up | history tokens |"
    );
    println!("|---|---|---|---|---|");
    for target in &targets {
        match session_turn(target, args.history) {
            Ok((kept, fresh, history)) => println!(
                "| {} | {:.1} ms | {:.1} ms | {:.1}x | {history} |",
                target.name,
                1e3 * kept,
                1e3 * fresh,
                fresh / kept
            ),
            Err(e) => println!("| {} | failed: {e:#} | | | |", target.name),
        }
    }
    println!(
        "\n| a chat turn of {} tokens | idle server | beside it | ratio |",
        args.tokens
    );
    println!("|---|---|---|---|");
    for (name, guests) in [
        ("an actor in a loop", &[LOOP_GUEST][..]),
        ("an actor flooding output", &[FLOOD_GUEST]),
        ("both", &[LOOP_GUEST, FLOOD_GUEST]),
    ] {
        match hostile(&targets[0], args.tokens, guests) {
            Ok((idle, busy)) => println!(
                "| beside {name} | {:.0} ms | {:.0} ms | {:.2}x |",
                1e3 * idle,
                1e3 * busy,
                busy / idle
            ),
            Err(e) => println!("| beside {name} | failed: {e:#} | | |"),
        }
    }
    let tokens = args.tokens.max(256);
    match http_cost(&targets[0], args.device, &path, threads, tokens) {
        Ok((http, local)) => println!(
            "\none conversation, decode: {http:.1} tok/s over HTTP, {local:.1} tok/s in process \
             (the HTTP path costs {:.1}%)",
            100.0 * (1.0 - http / local)
        ),
        Err(e) => println!("\nthe HTTP path's cost: failed: {e:#}"),
    }
    drop(targets);
    let _ = std::fs::remove_dir_all(&state);
    Ok(ExitCode::SUCCESS)
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn start_tern(
    args: &ServeBenchArgs,
    model: &Path,
    threads: usize,
    state: &Path,
) -> anyhow::Result<Target> {
    let device = format!("{:?}", args.device).to_lowercase();
    let mut child = Command::new(std::env::current_exe()?)
        .args(["serve", "--listen", "127.0.0.1:0", "--device", &device])
        .arg("--model")
        .arg(model)
        .arg("--state")
        .arg(state)
        .args(["--threads", &threads.to_string()])
        .env_remove("TERN_API_KEY")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(state.with_extension("log"))?)
        .spawn()
        .context("starting tern serve")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("tern serve's output")?).read_line(&mut line)?;
    let Some(addr) = line.trim().strip_prefix("listening on http://") else {
        let _ = child.kill();
        bail!("tern serve did not start: {line:?}");
    };
    Ok(Target {
        name: "tern serve",
        addr: addr.to_string(),
        child,
        tern: true,
    })
}

fn start_llama(
    args: &ServeBenchArgs,
    model: &Path,
    threads: usize,
    slots: usize,
) -> anyhow::Result<Target> {
    let binary = match &args.llama_server {
        Some(path) => path.clone(),
        None => super::batch::build_tool("llama-server")?,
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(&binary)
        .arg("-m")
        .arg(model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["-np", &slots.to_string(), "-c", &(slots * 4096).to_string()])
        .args(["-t", &threads.to_string(), "-tb", &threads.to_string()])
        .args(match args.device {
            DeviceChoice::Cpu => &[][..],
            _ => &["-ngl", "999"][..], // every layer on the GPU
        })
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let target = Target {
        name: "llama-server",
        addr: format!("127.0.0.1:{port}"),
        child,
        tern: false,
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while get_status(&target.addr, "/health") != Some(200) {
        if Instant::now() > deadline {
            bail!("llama-server did not become healthy");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(target)
}

/// The aggregate of one load run.
struct Load {
    tokens: usize,
    seconds: f64,
    turns: usize,
    /// Why turns failed (a conversation stops at its first failure).
    failed: Vec<String>,
    /// p50 and p99, in seconds.
    first: [f64; 2],
    per_token: [f64; 2],
}

/// `clients` concurrent conversations of `turns` turns each.
fn load(target: &Target, clients: usize, turns: usize, tokens: usize) -> anyhow::Result<Load> {
    let results = Arc::new(Mutex::new(Vec::new()));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let run = random_tag();
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let (addr, tern) = (target.addr.clone(), target.tern);
            let (results, failed) = (results.clone(), failed.clone());
            let session = format!("bench-{run}-{clients}-{i}");
            std::thread::spawn(move || {
                let mut messages = Vec::new();
                for turn in 0..turns {
                    messages.push(json!({"role": "user", "content": format!(
                        "Conversation {i}, question {turn}: tell me something about the number {}.",
                        i * 7 + turn
                    )}));
                    match chat(&addr, tern, &session, &messages, tokens, true) {
                        Ok(t) => {
                            messages.push(json!({"role": "assistant", "content": t.text}));
                            results.lock().unwrap_or_else(|e| e.into_inner()).push(t);
                        }
                        Err(e) => {
                            failed
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(format!("{e:#}"));
                            return;
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let results = results.lock().unwrap_or_else(|e| e.into_inner());
    let failed = std::mem::take(&mut *failed.lock().unwrap_or_else(|e| e.into_inner()));
    let mut first: Vec<f64> = results.iter().map(|t| t.first).collect();
    let mut per_token: Vec<f64> = results.iter().filter_map(|t| t.per_token).collect();
    first.sort_by(f64::total_cmp);
    per_token.sort_by(f64::total_cmp);
    let pct = |xs: &[f64], p| {
        if xs.is_empty() {
            f64::NAN
        } else {
            percentile(xs, p)
        }
    };
    Ok(Load {
        tokens: results.iter().map(|t| t.tokens).sum(),
        seconds,
        turns: results.len(),
        failed,
        first: [pct(&first, 0.5), pct(&first, 0.99)],
        per_token: [pct(&per_token, 0.5), pct(&per_token, 0.99)],
    })
}

/// Turn 2's time to first token after a first turn of about `history` tokens: with the
/// conversation's cache kept, and prefilled fresh. Returns both and the history's size.
fn session_turn(target: &Target, history: usize) -> anyhow::Result<(f64, f64, u64)> {
    let sentence = "The river runs past the old mill, where the miller counts his sacks of grain. ";
    // Tokens per sentence on this model, from the server's own count.
    let count = |n: usize| {
        let messages = [json!({"role": "user", "content": sentence.repeat(n)})];
        prompt_tokens(&target.addr, &messages).context("counting prompt tokens")
    };
    let per_sentence = count(2)?.saturating_sub(count(1)?).max(1) as usize;
    let long = sentence.repeat(history / per_sentence + 1);
    let tag = random_tag();
    let mut messages = vec![json!({"role": "user", "content": long})];
    let session = format!("long-{tag}");
    let first = chat(&target.addr, target.tern, &session, &messages, 8, true)?;
    messages.push(json!({"role": "assistant", "content": first.text}));
    messages.push(json!({"role": "user", "content": "Say it in one word."}));
    let kept = chat(&target.addr, target.tern, &session, &messages, 8, true)?;
    let fresh = chat(
        &target.addr,
        target.tern,
        &format!("fresh-{tag}"),
        &messages,
        8,
        false,
    )?;
    let tokens = prompt_tokens(&target.addr, &messages).unwrap_or(0);
    Ok((kept.first, fresh.first, tokens))
}

/// The prompt tokens of `messages`, from a one-token, non-streamed request to Tern or
/// llama-server (both report usage).
fn prompt_tokens(addr: &str, messages: &[Value]) -> Option<u64> {
    let body = json!({"messages": messages, "max_tokens": 1, "temperature": 0});
    let (status, body) = post(addr, "/v1/chat/completions", &[], &body.to_string()).ok()?;
    (status == 200).then_some(())?;
    serde_json::from_slice::<Value>(&body).ok()?["usage"]["prompt_tokens"].as_u64()
}

/// One conversation's decode speed over HTTP and in process, alternated, medians of seven.
fn http_cost(
    tern: &Target,
    device: DeviceChoice,
    model: &Path,
    threads: usize,
    tokens: usize,
) -> anyhow::Result<(f64, f64)> {
    let runtime = Runtime::builder(tern_compute::open(device)?)
        .model_file("default", model)
        .threads(threads)
        .build()?;
    let wasm = crate::host::bundled_guests()
        .into_iter()
        .find(|(name, _)| name == "chat")
        .map(|(_, path)| path)
        .context("the chat guest is not built")?;
    let module = Arc::new(ActorModule::new(&runtime, "chat", &std::fs::read(wasm)?)?);
    let messages =
        vec![json!({"role": "user", "content": "Write a long story about a lighthouse keeper."})];
    let (mut http, mut local) = (Vec::new(), Vec::new());
    for round in 0..7 {
        let t = chat(
            &tern.addr,
            true,
            &format!("cost-{round}-{}", random_tag()),
            &messages,
            tokens,
            false,
        )?;
        http.push(1.0 / t.per_token.context("a reply of under two tokens")?);
        local.push(in_process(&runtime, &module, &messages, tokens)?);
    }
    Ok((super::median(&http), super::median(&local)))
}

/// Spins until stopped (deleted) or out of time.
const LOOP_GUEST: &str = include_str!("guests/loop.wat");

/// Emits 64 KiB at a time until refused (its output limit).
const FLOOD_GUEST: &str = include_str!("guests/flood.wat");

/// The time of one greedy chat turn of `tokens` on Tern: on the idle server and beside
/// actors of `guests`, each sent message after message; medians of five, alternated.
fn hostile(tern: &Target, tokens: usize, guests: &[&str]) -> anyhow::Result<(f64, f64)> {
    let addr = tern.addr.as_str();
    let start = |wat: &str| -> anyhow::Result<String> {
        let (_, upload) = post(addr, "/v1/modules", &[], wat)?;
        let digest = serde_json::from_slice::<Value>(&upload)?["digest"]
            .as_str()
            .context("uploading a module")?
            .to_string();
        let (_, actor) = post(
            addr,
            "/v1/actors",
            &[],
            &json!({"module": digest}).to_string(),
        )?;
        Ok(serde_json::from_slice::<Value>(&actor)?["id"]
            .as_str()
            .context("starting an actor")?
            .to_string())
    };
    let turn = || -> anyhow::Result<f64> {
        let messages = [json!({"role": "user", "content": "What is the capital of France?"})];
        let started = Instant::now();
        chat(
            addr,
            true,
            &format!("victim-{}", random_tag()),
            &messages,
            tokens,
            false,
        )?;
        Ok(started.elapsed().as_secs_f64())
    };
    let (mut idle, mut busy) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        idle.push(turn()?);
        let hostile = guests
            .iter()
            .map(|wat| start(wat))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let attacks: Vec<_> = hostile
            .iter()
            .cloned()
            .map(|id| {
                let (addr, done) = (addr.to_string(), done.clone());
                std::thread::spawn(move || {
                    let path = format!("/v1/actors/{id}/messages");
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        if post(&addr, &path, &[], "go").is_err() {
                            break;
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100)); // the attacks are running
        let measured = turn();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        for id in hostile {
            call(addr, "DELETE", &format!("/v1/actors/{id}"), &[], "")?;
        }
        for attack in attacks {
            let _ = attack.join();
        }
        busy.push(measured?);
    }
    Ok((super::median(&idle), super::median(&busy)))
}

/// Decode tokens per second of the same request, sent to a chat actor in this process.
fn in_process(
    runtime: &Runtime,
    module: &Arc<ActorModule>,
    messages: &[Value],
    tokens: usize,
) -> anyhow::Result<f64> {
    let mut actor = Actor::start(runtime, module)?;
    let times = Arc::new(Mutex::new(Vec::new()));
    let sink = times.clone();
    actor.on_output(move |bytes| {
        if bytes.starts_with(b"{\"text\"") {
            sink.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Instant::now());
        }
    });
    let request = json!({"request": {
        "messages": messages, "temperature": 0, "max_tokens": tokens, "seed": 0,
        "ignore_eos": true,
    }});
    actor.send(request.to_string().as_bytes())?;
    let times = times.lock().unwrap_or_else(|e| e.into_inner());
    if times.len() < 2 {
        bail!("the in-process reply had under two tokens");
    }
    let span = times[times.len() - 1] - times[0];
    Ok((times.len() - 1) as f64 / span.as_secs_f64())
}

/// One streamed, greedy chat turn in `session`; `keep` (llama-server): reuse a slot's cache
/// (`cache_prompt`).
fn chat(
    addr: &str,
    tern: bool,
    session: &str,
    messages: &[Value],
    tokens: usize,
    keep: bool,
) -> anyhow::Result<Turn> {
    // Every turn generates exactly `tokens` (an end-of-turn token does not stop it), so that
    // both servers do the same work whatever the model says (random-weight models included).
    let mut body = json!({
        "messages": messages, "temperature": 0, "max_tokens": tokens, "stream": true,
        "stream_options": {"include_usage": true}, "ignore_eos": true,
    });
    // Tern: every conversation in a session of its own (a fresh prefill is a new session).
    let header = format!("X-Tern-Session: {session}");
    let headers: Vec<&str> = if tern { vec![&header] } else { vec![] };
    if !tern {
        body["cache_prompt"] = json!(keep);
    }
    let sent = Instant::now();
    let mut stream = request(addr, "/v1/chat/completions", &headers, &body.to_string())?;
    let mut reader = BufReader::new(&mut stream);
    let status = read_head(&mut reader)?;
    if status != 200 {
        let mut rest = Vec::new();
        let _ = reader.read_to_end(&mut rest);
        bail!("{status}: {}", String::from_utf8_lossy(&rest));
    }
    let mut events = SseReader::default();
    let (mut text, mut stamps, mut usage) = (String::new(), Vec::new(), None);
    'read: while let Some(chunk) = read_chunk(&mut reader)? {
        for data in events.push(&chunk) {
            if data == "[DONE]" {
                break 'read;
            }
            let v: Value = serde_json::from_str(&data).context("an event's data")?;
            // A chunk per token, its text possibly empty.
            if let Some(piece) = v["choices"][0]["delta"]["content"].as_str() {
                text.push_str(piece);
                stamps.push(Instant::now());
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                usage = Some(n as usize);
            }
        }
    }
    let first = stamps
        .first()
        .map_or(f64::NAN, |t| (*t - sent).as_secs_f64());
    let tokens = usage.unwrap_or(stamps.len());
    let per_token = (stamps.len() >= 2)
        .then(|| (stamps[stamps.len() - 1] - stamps[0]).as_secs_f64() / (stamps.len() - 1) as f64);
    Ok(Turn {
        text,
        first,
        per_token,
        tokens,
    })
}

/// Splits server-sent events' `data:` fields out of a byte stream.
#[derive(Default)]
pub(super) struct SseReader {
    pending: String,
}

impl SseReader {
    pub(super) fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.pending.push_str(&String::from_utf8_lossy(bytes));
        let mut out = Vec::new();
        while let Some(end) = self.pending.find("\n\n") {
            let block: String = self.pending.drain(..end + 2).collect();
            for line in block.lines() {
                if let Some(data) = line.strip_prefix("data:") {
                    out.push(data.trim().to_string());
                }
            }
        }
        out
    }
}

pub(super) fn request(
    addr: &str,
    path: &str,
    headers: &[&str],
    body: &str,
) -> anyhow::Result<TcpStream> {
    request_with(addr, "POST", path, headers, body)
}

fn request_with(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(900)))?;
    stream.set_nodelay(true)?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    Ok(stream)
}

/// A whole, non-streamed answer: status and body.
pub(super) fn post(
    addr: &str,
    path: &str,
    headers: &[&str],
    body: &str,
) -> anyhow::Result<(u16, Vec<u8>)> {
    call(addr, "POST", path, headers, body)
}

/// A whole answer to any method: status and body.
pub(super) fn call(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut stream = request_with(addr, method, path, headers, body)?;
    let mut reader = BufReader::new(&mut stream);
    let status = read_head_chunked(&mut reader)?;
    let mut out = Vec::new();
    match status.1 {
        true => {
            while let Some(chunk) = read_chunk(&mut reader)? {
                out.extend(chunk);
            }
        }
        false => {
            reader.read_to_end(&mut out)?;
        }
    }
    Ok((status.0, out))
}

fn get_status(addr: &str, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).ok()?;
    let head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).ok()?;
    let mut reader = BufReader::new(stream);
    read_head_chunked(&mut reader).ok().map(|(s, _)| s)
}

/// The status; fails unless the body is chunked (as streams are).
pub(super) fn read_head(reader: &mut impl BufRead) -> anyhow::Result<u16> {
    let (status, chunked) = read_head_chunked(reader)?;
    if status == 200 && !chunked {
        bail!("expected a chunked stream");
    }
    Ok(status)
}

/// The status line and headers: the status, and whether the body is chunked.
fn read_head_chunked(reader: &mut impl BufRead) -> anyhow::Result<(u16, bool)> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("a bad status line: {line:?}"))?;
    let mut chunked = false;
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let header = line.trim();
        if header.is_empty() {
            return Ok((status, chunked));
        }
        let lower = header.to_ascii_lowercase();
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
}

/// The next chunk of a chunked body; `None` at its end.
pub(super) fn read_chunk(reader: &mut impl BufRead) -> anyhow::Result<Option<Vec<u8>>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
        .with_context(|| format!("a bad chunk size: {line:?}"))?;
    if size == 0 {
        return Ok(None);
    }
    let mut chunk = vec![0; size + 2];
    reader.read_exact(&mut chunk)?;
    chunk.truncate(size);
    Ok(Some(chunk))
}

/// A short random tag, so that runs do not share sessions.
fn random_tag() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{:08x}{:x}", nanos, std::process::id())
}
