//! `GET /metrics`: what the server has done and holds, in Prometheus' text format.
//!
//! Counted as requests pass ([`track`], after routing, so each is counted under its route's
//! pattern, `/v1/actors/{id}`, never under an id): requests by route, method and status, and
//! the time to each response's head (for a streamed reply, the time until its stream began).
//! Counted as work is done: prompt, cached and generated tokens, time to first token and
//! per output token (OpenAI-compatible requests), snapshots saved and restored with their
//! latency, requests refused because the host was full. Read at each scrape: actors by
//! state, resident actors and their cap, queued jobs, the runtime's reserved KV-cache bytes
//! and its cap.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::actors::{State as ActorState, lock};
use crate::routes::AppState;

/// Upper bounds of the histograms' buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A histogram of durations in seconds.
#[derive(Default, Clone)]
pub struct Histogram {
    count: u64,
    seconds: f64,
    /// Observations at or under each of [`BUCKETS`].
    buckets: [u64; BUCKETS.len()],
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        self.count += 1;
        self.seconds += seconds;
        for (bucket, &le) in self.buckets.iter_mut().zip(&BUCKETS) {
            if seconds <= le {
                *bucket += 1;
            }
        }
    }

    fn add(&mut self, other: &Histogram) {
        self.count += other.count;
        self.seconds += other.seconds;
        for (t, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *t += b;
        }
    }

    /// Writes the series `name` with `labels` (`k="v",...`, or empty).
    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (le, n) in BUCKETS.iter().zip(&self.buckets) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.seconds);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// What the server counts as it works.
#[derive(Default)]
pub struct Metrics {
    /// By route pattern, method and status.
    requests: Mutex<BTreeMap<(String, String, u16), Histogram>>,
    /// Prompt tokens of OpenAI-compatible requests, and how many of them were cached.
    pub prompt_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    /// Time from a request's arrival to its first generated text.
    pub first_token: Mutex<Histogram>,
    /// Time per generated token after the first.
    pub per_token: Mutex<Histogram>,
    /// Snapshots written to the store, and restored from it.
    pub snapshots_saved: Mutex<Histogram>,
    pub snapshots_restored: Mutex<Histogram>,
    /// Requests refused because the host was full.
    pub refused: AtomicU64,
    /// Restores whose snapshots came from host memory rather than the store.
    pub hot_restores: AtomicU64,
}

impl Metrics {
    fn record(&self, route: String, method: String, status: u16, seconds: f64) {
        lock(&self.requests)
            .entry((route, method, status))
            .or_default()
            .observe(seconds);
    }

    /// Adds one observation to `histogram`.
    pub fn observe(histogram: &Mutex<Histogram>, seconds: f64) {
        lock(histogram).observe(seconds);
    }
}

/// Middleware: counts each routed request under its route's pattern.
pub async fn track(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let method = req.method().as_str().to_string();
    let started = Instant::now();
    let response = next.run(req).await;
    let seconds = started.elapsed().as_secs_f64();
    state
        .metrics
        .record(route, method, response.status().as_u16(), seconds);
    response
}

/// The exposition: every counter, then the gauges read now.
pub fn render(state: &AppState) -> String {
    let mut out = String::new();
    let m = &state.metrics;
    let requests = lock(&m.requests);
    help(
        &mut out,
        "tern_http_requests_total",
        "counter",
        "HTTP requests by route, method and status.",
    );
    for ((route, method, status), s) in requests.iter() {
        let _ = writeln!(
            out,
            "tern_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {}",
            s.count
        );
    }
    help(
        &mut out,
        "tern_http_request_duration_seconds",
        "histogram",
        "Time to each response's head, by route.",
    );
    let mut by_route: BTreeMap<(&str, &str), Histogram> = BTreeMap::new();
    for ((route, method, _), s) in requests.iter() {
        by_route.entry((route, method)).or_default().add(s);
    }
    for ((route, method), s) in &by_route {
        let labels = format!("route=\"{route}\",method=\"{method}\"");
        s.write(&mut out, "tern_http_request_duration_seconds", &labels);
    }
    drop(requests);
    for (name, what, counter) in [
        (
            "tern_prompt_tokens_total",
            "Prompt tokens of OpenAI-compatible requests.",
            &m.prompt_tokens,
        ),
        (
            "tern_prompt_tokens_cached_total",
            "Prompt tokens a session or a reused prefix already held.",
            &m.cached_tokens,
        ),
        (
            "tern_generated_tokens_total",
            "Tokens generated for OpenAI-compatible requests.",
            &m.completion_tokens,
        ),
        (
            "tern_requests_refused_total",
            "Requests refused because the host was full (429).",
            &m.refused,
        ),
        (
            "tern_snapshot_hot_restores_total",
            "Actors restored from snapshots kept in host memory, without reading the store.",
            &m.hot_restores,
        ),
    ] {
        help(&mut out, name, "counter", what);
        let _ = writeln!(out, "{name} {}", counter.load(Ordering::Relaxed));
    }
    for (name, what, histogram) in [
        (
            "tern_time_to_first_token_seconds",
            "From a request's arrival to its first generated text.",
            &m.first_token,
        ),
        (
            "tern_time_per_output_token_seconds",
            "Time per generated token after the first.",
            &m.per_token,
        ),
        (
            "tern_snapshot_save_seconds",
            "Snapshots written to the store, and how long each took.",
            &m.snapshots_saved,
        ),
        (
            "tern_snapshot_restore_seconds",
            "Actors restored from the store, and how long each took.",
            &m.snapshots_restored,
        ),
    ] {
        help(&mut out, name, "histogram", what);
        lock(histogram).write(&mut out, name, "");
    }
    let mut states: BTreeMap<&str, u64> = ["idle", "busy", "passivated", "failed"]
        .into_iter()
        .map(|s| (s, 0))
        .collect();
    let mut queued = 0;
    for actor in state.actor_list() {
        let name = match actor.status().state {
            ActorState::Idle => "idle",
            ActorState::Busy => "busy",
            ActorState::Passivated => "passivated",
            ActorState::Failed(_) => "failed",
        };
        *states.entry(name).or_default() += 1;
        queued += actor.queued();
    }
    help(&mut out, "tern_actors", "gauge", "Actors by state.");
    for (name, n) in states {
        let _ = writeln!(out, "tern_actors{{state=\"{name}\"}} {n}");
    }
    let gauges = [
        (
            "tern_actors_resident",
            "Actors with a thread and memory (not passivated).",
            state.actors.resident() as u64,
        ),
        (
            "tern_actors_resident_cap",
            "The most actors that may be resident at once.",
            state.config.max_resident as u64,
        ),
        (
            "tern_queued_jobs",
            "Messages and snapshots waiting for or running on their actor.",
            queued as u64,
        ),
        (
            "tern_kv_reserved_bytes",
            "KV-cache bytes the runtime's sessions reserve.",
            state.runtime.kv_ledger().reserved(),
        ),
        (
            "tern_kv_cap_bytes",
            "The most KV-cache bytes all sessions may reserve.",
            state.runtime.kv_ledger().cap(),
        ),
    ];
    for (name, what, value) in gauges {
        help(&mut out, name, "gauge", what);
        let _ = writeln!(out, "{name} {value}");
    }
    // Each model's step scheduler: how many forward passes' chunks share a step.
    let stats: Vec<(String, u64, u64)> = (state.runtime.models().loaded().iter())
        .map(|m| (m.name.clone(), m.step_stats().steps, m.step_stats().chunks))
        .collect();
    help(
        &mut out,
        "tern_model_steps_total",
        "counter",
        "Batched steps each model's scheduler ran.",
    );
    for (model, steps, _) in &stats {
        let _ = writeln!(out, "tern_model_steps_total{{model=\"{model}\"}} {steps}");
    }
    help(
        &mut out,
        "tern_model_step_chunks_total",
        "counter",
        "Forward passes' chunks run in those steps (chunks per step: the batch size).",
    );
    for (model, _, chunks) in &stats {
        let _ = writeln!(
            out,
            "tern_model_step_chunks_total{{model=\"{model}\"}} {chunks}"
        );
    }
    out
}

fn help(out: &mut String, name: &str, kind: &str, what: &str) {
    let _ = writeln!(out, "# HELP {name} {what}\n# TYPE {name} {kind}");
}
