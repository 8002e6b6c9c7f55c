//! `tern cluster`: the nodes of a cluster, where its actors live, draining a node and moving
//! an actor, through the cluster's NATS server.

use std::process::ExitCode;

use tern_server::cluster::admin::ClusterClient;

#[derive(clap::Args)]
pub struct ClusterArgs {
    /// The cluster's NATS server.
    #[arg(
        long,
        value_name = "URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    cluster: String,
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(clap::Subcommand)]
enum ClusterCommand {
    /// The live nodes, their load, and where each actor lives.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Move every actor off NODE (each is saved, released and woken on another node by its
    /// next message); NODE then takes no new actors until it restarts.
    Drain { node: String },
    /// Move ACTOR to NODE now: its owner saves and releases it, NODE restores it.
    Move { actor: String, node: String },
}

pub fn cluster(args: ClusterArgs) -> anyhow::Result<ExitCode> {
    let client = ClusterClient::connect(&args.cluster)?;
    match args.command {
        ClusterCommand::Status { json } => {
            let status = client.status()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<24} {:<22} {:<6} {:>8} {:>12} {:>14} {:<8}",
                "node", "http", "device", "resident", "kv bytes", "device bytes", "state"
            );
            for node in &status.nodes {
                let state = if node.draining { "draining" } else { "up" };
                println!(
                    "{:<24} {:<22} {:<6} {:>8} {:>12} {:>14} {:<8}",
                    node.name,
                    node.http,
                    node.device,
                    node.resident,
                    node.kv_bytes,
                    node.device_bytes,
                    state
                );
            }
            println!();
            println!("{:<34} {:<24} {:>6}", "actor", "node", "epoch");
            for (actor, node, epoch) in &status.actors {
                let node = node.as_deref().unwrap_or("(passivated)");
                println!("{actor:<34} {node:<24} {epoch:>6}");
            }
        }
        ClusterCommand::Drain { node } => {
            let answer = client.drain(&node)?;
            println!("{answer}");
        }
        ClusterCommand::Move { actor, node } => {
            let (took, answer) = client.move_actor(&actor, &node)?;
            println!("{answer}");
            eprintln!(
                "moved in {:.1} ms: {:.1} ms copying ahead while the actor ran, then {:.1} ms \
                 with no node answering for it",
                took.total().as_secs_f64() * 1e3,
                took.ahead.as_secs_f64() * 1e3,
                took.pause.as_secs_f64() * 1e3
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
