//! `tern serve`: the actor API over HTTP ([`tern_server`]) on the host the shared flags
//! describe.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tern_server::cluster::{Cluster, ClusterOptions};
use tern_server::{ApiKey, Config, Durability, LocalStore, Server};

use crate::host::{HostArgs, bundled_guests};

/// The environment variable that may hold the API key (never a flag: flags show in `ps`).
const KEY_ENV: &str = "TERN_API_KEY";

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Where to listen, as ADDRESS:PORT.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// A file holding the API keys every route but `/health` requires as
    /// `Authorization: Bearer KEY`: one per line, `KEY` or `CLIENT KEY` (blank lines and
    /// lines starting with `#` are skipped). Each client reaches only the actors and
    /// sessions it made. Without the file, one key is read from TERN_API_KEY; with neither,
    /// the API is open.
    #[arg(long, value_name = "FILE")]
    api_key_file: Option<PathBuf>,
    /// The largest message body, in KiB.
    #[arg(long, default_value_t = 16 << 10)]
    max_message_kib: usize,
    /// The largest module upload, in MiB.
    #[arg(long, default_value_t = 64)]
    max_module_mib: usize,
    /// The folder that keeps actors and uploaded modules across restarts (created if
    /// needed). Default: $XDG_DATA_HOME/tern/serve, else ~/.local/share/tern/serve.
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// When an actor's state is saved: after every `message`; at most every
    /// --save-interval-secs (`interval`: after a message when the last save is that old, and
    /// when unsaved state reaches that age); or only when it `passivate`s.
    #[arg(long, default_value = "message", value_parser = ["message", "interval", "passivate"])]
    durability: String,
    /// With `--durability interval`, the most seconds of work a crash may lose.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    save_interval_secs: u64,
    /// Seconds an actor may stay idle before it is saved and its thread and memory freed
    /// (0: never).
    #[arg(long, default_value_t = 300)]
    idle_secs: u64,
    /// The largest snapshot upload (to restore an actor from), in MiB.
    #[arg(long, default_value_t = 1024)]
    max_snapshot_mib: usize,
    /// Whether a stateless OpenAI-compatible request continues in a fork of a cached actor
    /// whose conversation it extends, instead of prefilling it again. `auto`: where a prefill
    /// gives the same bits as decoding token by token (the CPU, and CUDA at `--precision
    /// tensor`); elsewhere on a GPU the two round differently, so reuse would change the
    /// bytes of a reply.
    #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
    prefix_reuse: String,
    /// How many actors the prefix cache keeps.
    #[arg(long, default_value_t = 4)]
    prefix_cache: usize,
    /// MiB of actors' snapshots kept in host memory beside --state, so that an actor
    /// passivated a little while ago comes back without reading the folder; in a cluster,
    /// of the snapshot objects this node wrote or read, so that an actor moved here (or
    /// back) is restored without reading them from NATS again (0: none).
    #[arg(long, default_value_t = 1024)]
    hot_snapshot_mib: u64,
    /// The most actors resident (with a thread and memory) at once. Past it, the least
    /// recently used idle actor is passivated to make room; when all are busy, requests get
    /// 429 with Retry-After.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    max_resident: u64,
    /// The most requests that may wait for one actor (429 past it).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    max_queued: u64,
    /// Join the Tern cluster on this NATS server (`nats://HOST:PORT`, JetStream on, 2.11 or
    /// later): actors, their snapshots and uploads live in its JetStream and any node
    /// answers for any actor. Without it the server runs alone on --state.
    #[arg(long, value_name = "URL")]
    cluster: Option<String>,
    /// This node's name in the cluster, unique among its nodes (default: the host name and
    /// the port).
    #[arg(long, requires = "cluster")]
    node: Option<String>,
    /// How many copies JetStream keeps of the cluster's buckets (3 on a NATS cluster of
    /// three; the buckets are made by the first node that joins).
    #[arg(long, default_value_t = 1, requires = "cluster", value_parser = clap::value_parser!(u64).range(1..=5))]
    replicas: u64,
    /// A folder that this machine's nodes of the cluster share (give each the same one):
    /// snapshot objects they put or read are kept there as files too, so that a move
    /// between them reads the snapshot from memory rather than through NATS. The object
    /// store stays the source of truth; the folder may be emptied at any time.
    #[arg(long, value_name = "DIR", requires = "cluster")]
    host_objects: Option<PathBuf>,
    #[command(flatten)]
    host: HostArgs,
}

pub fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    // Requests, actors started and deleted, and failures, on standard error.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let api_keys = api_keys(&args)?;
    let runtime = args.host.runtime()?;
    // Every model now, so that a file that cannot be loaded stops the start, not a request,
    // and so that each model's threads start here at normal priority, never from an actor's
    // thread (which a spinning guest moves to the idle class: tern_actor's `sys`).
    for name in runtime.models().names() {
        runtime.model(&name)?;
    }
    let mut config = Config::new(args.listen);
    config.message_bytes = args
        .max_message_kib
        .checked_mul(1 << 10)
        .context("--max-message-kib is too large")?;
    config.module_bytes = args
        .max_module_mib
        .checked_mul(1 << 20)
        .context("--max-module-mib is too large")?;
    config.snapshot_bytes = args
        .max_snapshot_mib
        .checked_mul(1 << 20)
        .context("--max-snapshot-mib is too large")?;
    config.bundled = bundled_guests();
    config.prefix_reuse = match args.prefix_reuse.as_str() {
        "on" => true,
        "off" => false,
        _ => tern_model::llama::prefill_is_exact(&**runtime.device(), args.host.precision.value),
    };
    config.prefix_cache = args.prefix_cache;
    config.hot_snapshot_bytes = args.hot_snapshot_mib.saturating_mul(1 << 20);
    config.max_resident = usize::try_from(args.max_resident).context("--max-resident")?;
    config.max_queued = usize::try_from(args.max_queued).context("--max-queued")?;
    let state = match &args.cluster {
        Some(url) => {
            if args.state.is_some() {
                bail!(
                    "--state is for a server alone: a cluster's nodes keep state in NATS JetStream"
                );
            }
            let node = match &args.node {
                Some(node) => node.clone(),
                None => default_node_name(args.listen),
            };
            let cluster = Cluster::join(&ClusterOptions {
                url: url.clone(),
                node: node.clone(),
                replicas: args.replicas as usize,
                cache_bytes: config.hot_snapshot_bytes,
                host_objects: args.host_objects.clone(),
            })?;
            config.cluster = Some(cluster);
            format!("the cluster at {url}, as node `{node}`")
        }
        None => {
            let state_dir = match &args.state {
                Some(dir) => dir.clone(),
                None => default_state_dir()?,
            };
            let store = LocalStore::open(&state_dir)
                .with_context(|| format!("the state folder {}", state_dir.display()))?;
            config.store = Some(Arc::new(store));
            state_dir.display().to_string()
        }
    };
    config.durability = match args.durability.as_str() {
        "passivate" => Durability::Passivate,
        "interval" => Durability::Interval(Duration::from_secs(args.save_interval_secs)),
        _ => Durability::Message,
    };
    config.idle = (args.idle_secs > 0).then(|| Duration::from_secs(args.idle_secs));
    let open = api_keys.is_empty();
    config.api_keys = api_keys;
    let device = runtime.device().describe();
    let wgpu = runtime.device().kind() == tern_compute::DeviceChoice::Wgpu;
    let server = Server::bind(Arc::new(runtime), config)?;
    let addr = server.local_addr();
    eprintln!("device: {device}");
    if wgpu {
        // Its kernels take one session at a time (`Model::batches_steps`).
        eprintln!("batched steps: none on wgpu; a step's sessions run one after another");
    }
    eprintln!("state: {state}");
    if open && !addr.ip().is_loopback() {
        eprintln!(
            "warning: no API key (--api-key-file or {KEY_ENV}): anyone who reaches {addr} can run actors"
        );
    }
    println!("listening on http://{addr}");
    server.run_until_ctrl_c()?;
    Ok(ExitCode::SUCCESS)
}

/// The keys from `--api-key-file`, else the one from the environment; a file without a
/// key, an empty key, a key given twice or a client named twice is an error (that never
/// shows a key).
fn api_keys(args: &ServeArgs) -> anyhow::Result<Vec<ApiKey>> {
    let Some(path) = &args.api_key_file else {
        return match std::env::var(KEY_ENV) {
            Err(_) => Ok(Vec::new()),
            Ok(key) if key.trim().is_empty() => bail!("the API key is empty"),
            Ok(key) => Ok(vec![ApiKey {
                client: "default".into(),
                key: key.trim().to_string(),
            }]),
        };
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the API keys from {}", path.display()))?;
    let mut keys: Vec<ApiKey> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (client, key) = match fields[..] {
            [key] => (format!("client-{}", n + 1), key),
            [client, key] => (client.to_string(), key),
            _ => bail!(
                "{} line {}: expected KEY or CLIENT KEY",
                path.display(),
                n + 1
            ),
        };
        if keys.iter().any(|k| k.client == client || k.key == key) {
            bail!(
                "{} line {}: a client or key given twice",
                path.display(),
                n + 1
            );
        }
        keys.push(ApiKey {
            client,
            key: key.to_string(),
        });
    }
    if keys.is_empty() {
        bail!("the API key is empty: {} holds no key", path.display());
    }
    // One key alone is the single client of earlier versions.
    if let [only] = &mut keys[..]
        && only.client.starts_with("client-")
    {
        only.client = "default".into();
    }
    Ok(keys)
}

/// The host's name and the port (the process id too when the port is chosen at bind),
/// reduced to the characters a node name may hold.
fn default_node_name(listen: SocketAddr) -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "tern".into());
    let mut name: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    if name.is_empty() {
        name = "tern".into();
    }
    match listen.port() {
        0 => format!("{name}-{}", std::process::id()),
        port => format!("{name}-{port}"),
    }
}

/// `$XDG_DATA_HOME/tern/serve`, else `$HOME/.local/share/tern/serve`.
fn default_state_dir() -> anyhow::Result<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(data) = var("XDG_DATA_HOME") {
        return Ok(PathBuf::from(data).join("tern/serve"));
    }
    match var("HOME") {
        Some(home) => Ok(PathBuf::from(home).join(".local/share/tern/serve")),
        None => bail!("no --state folder given, and neither XDG_DATA_HOME nor HOME is set"),
    }
}
