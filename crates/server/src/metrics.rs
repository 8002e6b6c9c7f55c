//! `GET /metrics`: what the server has done and holds, in Prometheus' text format.
//!
//! Counted as requests pass ([`track`], after routing, so each is counted under its route's
//! pattern, `/v1/actors/{id}`, never under an id): requests by route, method and status, and
//! the time to each response's head (for a streamed reply, the time until its stream began).
//! Read at each scrape: actors by state, the runtime's reserved KV-cache bytes and its cap.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::actors::State as ActorState;
use crate::routes::AppState;

/// Upper bounds of the request-duration histogram's buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// One route's, method's and status's requests.
#[derive(Default)]
struct Series {
    count: u64,
    seconds: f64,
    /// Requests at or under each of [`BUCKETS`].
    buckets: [u64; BUCKETS.len()],
}

/// The counters `track` keeps.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), Series>>,
}

impl Metrics {
    fn record(&self, route: String, method: String, status: u16, seconds: f64) {
        let mut requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        let series = requests.entry((route, method, status)).or_default();
        series.count += 1;
        series.seconds += seconds;
        for (bucket, &le) in series.buckets.iter_mut().zip(&BUCKETS) {
            if seconds <= le {
                *bucket += 1;
            }
        }
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
    let requests = state
        .metrics
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    out.push_str("# HELP tern_http_requests_total HTTP requests by route, method and status.\n");
    out.push_str("# TYPE tern_http_requests_total counter\n");
    for ((route, method, status), s) in requests.iter() {
        let _ = writeln!(
            out,
            "tern_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {}",
            s.count
        );
    }
    out.push_str(
        "# HELP tern_http_request_duration_seconds Time to each response's head, by route.\n",
    );
    out.push_str("# TYPE tern_http_request_duration_seconds histogram\n");
    let mut by_route: BTreeMap<(&str, &str), Series> = BTreeMap::new();
    for ((route, method, _), s) in requests.iter() {
        let total = by_route.entry((route, method)).or_default();
        total.count += s.count;
        total.seconds += s.seconds;
        for (t, b) in total.buckets.iter_mut().zip(&s.buckets) {
            *t += b;
        }
    }
    for ((route, method), s) in &by_route {
        let labels = format!("route=\"{route}\",method=\"{method}\"");
        for (le, n) in BUCKETS.iter().zip(&s.buckets) {
            let _ = writeln!(
                out,
                "tern_http_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "tern_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
            s.count
        );
        let _ = writeln!(
            out,
            "tern_http_request_duration_seconds_sum{{{labels}}} {}",
            s.seconds
        );
        let _ = writeln!(
            out,
            "tern_http_request_duration_seconds_count{{{labels}}} {}",
            s.count
        );
    }
    drop(requests);
    let mut states: BTreeMap<&str, u64> = ["idle", "busy", "passivated", "failed"]
        .into_iter()
        .map(|s| (s, 0))
        .collect();
    for actor in state.actor_list() {
        let name = match actor.status().state {
            ActorState::Idle => "idle",
            ActorState::Busy => "busy",
            ActorState::Passivated => "passivated",
            ActorState::Failed(_) => "failed",
        };
        *states.entry(name).or_default() += 1;
    }
    out.push_str("# HELP tern_actors Actors by state.\n# TYPE tern_actors gauge\n");
    for (name, n) in states {
        let _ = writeln!(out, "tern_actors{{state=\"{name}\"}} {n}");
    }
    let kv = state.runtime.kv_ledger();
    out.push_str("# HELP tern_kv_reserved_bytes KV-cache bytes the runtime's sessions reserve.\n");
    out.push_str("# TYPE tern_kv_reserved_bytes gauge\n");
    let _ = writeln!(out, "tern_kv_reserved_bytes {}", kv.reserved());
    out.push_str("# HELP tern_kv_cap_bytes The most KV-cache bytes all sessions may reserve.\n");
    out.push_str("# TYPE tern_kv_cap_bytes gauge\n");
    let _ = writeln!(out, "tern_kv_cap_bytes {}", kv.cap());
    out
}
