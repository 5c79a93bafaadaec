//! `mailbox`: command-line client for the mailbox cluster.
//!
//! Every command exits non-zero on any error; `--json` prints a machine-
//! readable result on stdout instead of the human-readable one.

mod events_cli;
mod user_cli;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use mailbox_client::{Client, ClientConfig, ClientError, PutOptions};
use mailbox_proto::v1::MessageInfo;
use mailbox_types::ByteSize;
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "mailbox",
    version,
    about = "Client for the multi-DC mailbox cluster"
)]
struct Cli {
    /// Client config file (default: .mailbox/client.toml here or in a parent, then ~/.config/mailbox/client.toml).
    #[arg(long, global = true, env = "MAILBOX_CONFIG")]
    config: Option<PathBuf>,
    /// Node to talk to (host:port); repeat for fallbacks. Overrides the config.
    #[arg(long, global = true)]
    endpoint: Vec<String>,
    /// Data center to talk to (a name from the client config).
    #[arg(long, global = true)]
    dc: Option<String>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Upload a file (or `-` for stdin) into a mailbox.
    Put {
        /// File to upload, or `-` for stdin.
        file: String,
        /// Target mailbox, e.g. /inbox.
        mailbox: String,
        /// Message name (default: the file's name).
        #[arg(long)]
        name: Option<String>,
        /// Expected SHA-256 (hex); the upload fails with DATA_LOSS on mismatch.
        #[arg(long)]
        sha256: Option<String>,
        /// Idempotency key: repeating an upload with it returns the original.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Attribute KEY=VALUE (repeatable).
        #[arg(long = "attr", value_parser = parse_attr)]
        attrs: Vec<(String, String)>,
        /// Acknowledge after the local DC (`delayed`) or after other DCs hold it too (`immediate`).
        #[arg(long, value_parser = ["delayed", "immediate"])]
        ack: Option<String>,
    },
    /// Download a message by id (verifies its SHA-256).
    Get {
        /// Message id.
        id: String,
        /// Output file (default: the message name in the current directory; `-` for stdout).
        #[arg(long, short)]
        output: Option<String>,
        /// Start at this byte.
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Read at most this many bytes (0 = to the end).
        #[arg(long, default_value_t = 0)]
        length: u64,
    },
    /// List the messages in a mailbox, or the mailboxes when none is given.
    Ls {
        /// Mailbox to list.
        mailbox: Option<String>,
        /// Maximum messages to show (0 = all).
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// Show a message's metadata.
    Stat {
        /// Message id.
        id: String,
    },
    /// Set or remove attributes of a message (last writer wins across DCs).
    Attr {
        /// Message id.
        id: String,
        /// Attribute to set, KEY=VALUE (repeatable).
        #[arg(long = "set", value_parser = parse_attr)]
        set: Vec<(String, String)>,
        /// Attribute to remove (repeatable).
        #[arg(long = "rm")]
        remove: Vec<String>,
    },
    /// Delete a message.
    Rm {
        /// Message id.
        id: String,
    },
    /// Create a mailbox.
    Mkdir {
        /// Mailbox path.
        path: String,
        /// Create missing parents; no error if it exists.
        #[arg(short, long)]
        parents: bool,
    },
    /// Cluster commands.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// Replication commands.
    Replication {
        #[command(subcommand)]
        cmd: ReplicationCmd,
    },
    /// Event rules: which messages raise a replication-complete event, into which queue.
    Rules {
        // Boxed: `rules add` has many options, the other commands few.
        #[command(subcommand)]
        cmd: Box<events_cli::RulesCmd>,
    },
    /// Events: list them, lease and answer them, follow a queue.
    Events {
        #[command(subcommand)]
        cmd: events_cli::EventsCmd,
    },
    /// The dead-letter queue: list, show, replay, discard.
    Dlq {
        #[command(subcommand)]
        cmd: events_cli::DlqCmd,
    },
    /// DCs: suspend one that is down for long from completion, resume it.
    Dc {
        #[command(subcommand)]
        cmd: events_cli::DcCmd,
    },
    /// Users (partners, admins): passwords, SSH keys, tokens, grants.
    User {
        #[command(subcommand)]
        cmd: user_cli::UserCmd,
    },
}

#[derive(Subcommand)]
enum ReplicationCmd {
    /// Per remote DC: connection, cursor, lag; pending payloads, retries, corrupt copies.
    Status,
    /// After remote DC `DC` was rebuilt from empty (pulls from it stop with
    /// "feed identity changed"): read its feed again from the start.
    ResetFeed {
        /// The rebuilt remote DC.
        dc: String,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Members, leader, term and applied index per node.
    Status,
    /// Build a snapshot on the DC leader now (it then purges its log
    /// behind the snapshot, keeping `keep-logs` entries).
    Snapshot,
}

pub(crate) fn parse_attr(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

pub(crate) fn human_time(ms: i64) -> String {
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn human_size(n: u64) -> String {
    ByteSize(n).to_string()
}

fn message_json(m: &MessageInfo) -> serde_json::Value {
    json!({
        "id": m.id,
        "mailbox": m.mailbox,
        "name": m.name,
        "size": m.size,
        "sha256": m.sha256,
        "created_ms": m.created_ms,
        "origin_dc": m.origin_dc,
        "attributes": m.attributes,
        "inline": m.inline,
        "segments": m.segments.iter().map(|s| json!({"index": s.index, "size": s.size, "sha256": s.sha256})).collect::<Vec<_>>(),
        "replicas": m.replicas.iter().map(|r| json!({"dc": r.dc, "held_since_ms": r.held_since_ms})).collect::<Vec<_>>(),
        "complete_ms": (m.complete_ms != 0).then_some(m.complete_ms),
        "payload_pending": m.payload_pending,
        "copies": m.copies.iter().map(|c| json!({
            "dc": c.dc, "metadata_held": c.metadata_held, "metadata_since_ms": c.metadata_since_ms,
            "payload_held": c.payload_held, "payload_since_ms": c.payload_since_ms,
            "error": (!c.error.is_empty()).then_some(&c.error),
        })).collect::<Vec<_>>(),
    })
}

fn bar(len: Option<u64>) -> ProgressBar {
    let pb = match len {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    pb
}

async fn connect(cli: &Cli) -> anyhow::Result<Client> {
    let endpoints = if !cli.endpoint.is_empty() {
        cli.endpoint.clone()
    } else {
        match ClientConfig::discover(cli.config.as_deref())? {
            Some((_, cfg)) => cfg.endpoints(cli.dc.as_deref())?,
            None => bail!(
                "no client config found: run `make run` from the repo root, pass --endpoint HOST:PORT, \
                 or write .mailbox/client.toml"
            ),
        }
    };
    Ok(Client::connect(&endpoints).await?)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = connect(&cli).await?;
    match &cli.cmd {
        Cmd::Put {
            file,
            mailbox,
            name,
            sha256,
            idempotency_key,
            attrs,
            ack,
        } => {
            let (reader, len, default_name): (Box<dyn tokio::io::AsyncRead + Unpin + Send>, _, _) =
                if file == "-" {
                    (Box::new(tokio::io::stdin()), None, None)
                } else {
                    let f = tokio::fs::File::open(file)
                        .await
                        .with_context(|| format!("cannot open {file}"))?;
                    let len = f.metadata().await?.len();
                    let n = PathBuf::from(file)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned());
                    (Box::new(f), Some(len), n)
                };
            let name = match name.clone().or(default_name) {
                Some(n) => n,
                None => bail!("--name is required when uploading from stdin"),
            };
            let pb = if cli.json {
                ProgressBar::hidden()
            } else {
                bar(len)
            };
            let pb2 = pb.clone();
            let opts = PutOptions {
                mailbox: mailbox.clone(),
                name,
                sha256: sha256.clone(),
                idempotency_key: idempotency_key.clone(),
                attributes: attrs.iter().cloned().collect::<BTreeMap<_, _>>(),
                ack: ack.clone(),
            };
            let resp = client.put(opts, reader, move |n| pb2.set_position(n)).await;
            pb.finish_and_clear();
            let resp = resp?;
            let m = resp.message.context("server returned no message")?;
            if cli.json {
                let mut v = message_json(&m);
                v["deduplicated"] = json!(resp.deduplicated);
                println!("{v}");
            } else {
                let dedup = if resp.deduplicated {
                    " (already uploaded with this idempotency key)"
                } else {
                    ""
                };
                println!(
                    "{}  {}  {}  sha256:{}{dedup}",
                    m.id,
                    human_size(m.size),
                    m.name,
                    m.sha256
                );
            }
        }
        Cmd::Get {
            id,
            output,
            offset,
            length,
        } => {
            let meta = client.stat(id).await?;
            let target = output.clone().unwrap_or_else(|| meta.name.clone());
            let pb = if cli.json || target == "-" {
                ProgressBar::hidden()
            } else {
                bar(Some(meta.size))
            };
            let d = if target == "-" {
                let mut out = tokio::io::stdout();
                client
                    .get_to(id, *offset, *length, &mut out, |n, _| pb.set_position(n))
                    .await?
            } else {
                // Write beside the target and rename only after the digest
                // checked out: a failed download never leaves a bad file.
                let part = format!("{target}.part");
                let mut f = tokio::fs::File::create(&part)
                    .await
                    .with_context(|| format!("cannot create {part}"))?;
                let res = client
                    .get_to(id, *offset, *length, &mut f, |n, _| pb.set_position(n))
                    .await;
                let d = match res {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = tokio::fs::remove_file(&part).await;
                        return Err(e.into());
                    }
                };
                f.sync_all().await?;
                tokio::fs::rename(&part, &target).await?;
                d
            };
            pb.finish_and_clear();
            if cli.json {
                println!(
                    "{}",
                    json!({"id": d.message.id, "bytes": d.bytes, "sha256": d.sha256.to_hex(), "output": target, "verified": *offset == 0 && *length == 0})
                );
            } else if target != "-" {
                eprintln!(
                    "{} -> {target} ({}, sha256 verified)",
                    d.message.id,
                    human_size(d.bytes)
                );
            }
        }
        Cmd::Ls { mailbox: None, .. } => {
            let list = client.list_mailboxes("").await?;
            if cli.json {
                let v: Vec<_> = list
                    .iter()
                    .map(|m| json!({"path": m.path, "created_ms": m.created_ms}))
                    .collect();
                println!("{}", json!(v));
            } else {
                for m in list {
                    println!("{}  {}", human_time(m.created_ms), m.path);
                }
            }
        }
        Cmd::Ls {
            mailbox: Some(mb),
            limit,
        } => {
            let list = if *limit == 0 {
                client.list_all(mb).await?
            } else {
                client.list(mb, "", *limit).await?.messages
            };
            if cli.json {
                println!(
                    "{}",
                    json!(list.iter().map(message_json).collect::<Vec<_>>())
                );
            } else {
                for m in &list {
                    println!(
                        "{}  {:>9}  {}  {}",
                        m.id,
                        human_size(m.size),
                        human_time(m.created_ms),
                        m.name
                    );
                }
            }
        }
        Cmd::Stat { id } => {
            let m = client.stat(id).await?;
            if !cli.json {
                println!("id:        {}", m.id);
                println!("mailbox:   {}", m.mailbox);
                println!("name:      {}", m.name);
                println!("size:      {} ({} bytes)", human_size(m.size), m.size);
                println!("sha256:    {}", m.sha256);
                println!("created:   {}", human_time(m.created_ms));
                println!("origin DC: {}", m.origin_dc);
                if m.inline {
                    println!("payload:   inline in the DC log");
                } else {
                    println!("payload:   {} segment(s)", m.segments.len());
                    for s in &m.segments {
                        println!("  #{:<4} {:>9}  {}", s.index, human_size(s.size), s.sha256);
                    }
                }
                for (k, v) in &m.attributes {
                    println!("attr:      {k}={v}");
                }
                println!("{:<10} {:<30} {:<30} NOTE", "DC", "METADATA", "PAYLOAD");
                let since = |held: bool, t: i64| match (held, t) {
                    (false, _) => "-".to_string(),
                    (true, 0) => "yes".to_string(),
                    (true, t) => format!("since {}", human_time(t)),
                };
                for c in &m.copies {
                    println!(
                        "{:<10} {:<30} {:<30} {}",
                        c.dc,
                        if c.error.is_empty() {
                            since(c.metadata_held, c.metadata_since_ms)
                        } else {
                            "?".to_string()
                        },
                        since(c.payload_held, c.payload_since_ms),
                        if c.error.is_empty() {
                            String::new()
                        } else {
                            format!("not reachable ({}); payload as last acknowledged", c.error)
                        }
                    );
                }
                if m.payload_pending {
                    println!("here:      metadata only, payload still replicating (downloads are proxied)");
                }
                if m.complete_ms != 0 {
                    println!("complete:  in all DCs since {}", human_time(m.complete_ms));
                }
            }
            // Each rule's event for the message (or that it waits for
            // replication); an older server without the events API has none.
            let ev = client
                .events()
                .list_events(mailbox_proto::v1::ListEventsRequest {
                    message_id: m.id.clone(),
                    ..Default::default()
                })
                .await;
            if let Ok(ev) = ev {
                let ev = ev.into_inner();
                if cli.json {
                    let mut v = message_json(&m);
                    v["events"] = serde_json::Value::Array(
                        ev.events.iter().map(events_cli::event_json).collect(),
                    );
                    v["pending_replication_rules"] = json!(ev.pending_replication_rules);
                    println!("{v}");
                } else {
                    for e in &ev.events {
                        println!(
                            "event:     {} rule {} queue {}: {} (attempt {})",
                            e.id, e.rule, e.queue, e.status, e.attempt
                        );
                    }
                    for r in &ev.pending_replication_rules {
                        println!("event:     rule {r}: pending_replication (not in every DC yet)");
                    }
                }
            } else if cli.json {
                println!("{}", message_json(&m));
            }
        }
        Cmd::Attr { id, set, remove } => {
            let m = client
                .set_attributes(id, set.iter().cloned().collect(), remove.clone())
                .await?;
            if cli.json {
                println!("{}", message_json(&m));
            } else {
                for (k, v) in &m.attributes {
                    println!("{k}={v}");
                }
            }
        }
        Cmd::Rm { id } => {
            client.delete(id).await?;
            if cli.json {
                println!("{}", json!({"deleted": id}));
            }
        }
        Cmd::Mkdir { path, parents } => {
            let r = client.mkdir(path, *parents).await?;
            if cli.json {
                println!("{}", json!({"path": r.path, "created": r.created}));
            }
        }
        Cmd::Replication {
            cmd: ReplicationCmd::ResetFeed { dc },
        } => {
            let old = client.reset_feed(dc).await?;
            if cli.json {
                println!("{}", json!({"dc": dc, "old_cursor": old}));
            } else {
                println!("cursor on DC {dc}'s feed reset (was {old}); its feed is read again from the start");
            }
        }
        Cmd::Rules { cmd } => events_cli::rules(&client, cli.json, cmd).await?,
        Cmd::Events { cmd } => events_cli::events(&client, cli.json, cmd).await?,
        Cmd::Dlq { cmd } => events_cli::dlq(&client, cli.json, cmd).await?,
        Cmd::Dc { cmd } => events_cli::dc(&client, cli.json, cmd).await?,
        Cmd::User { cmd } => user_cli::user(&client, cli.json, cmd).await?,
        Cmd::Replication {
            cmd: ReplicationCmd::Status,
        } => {
            let s = client.replication_status().await?;
            if cli.json {
                let remotes: Vec<_> = s.remotes.iter().map(|r| json!({
                    "dc": r.dc, "state": r.state, "cursor": r.cursor, "remote_head": r.remote_head,
                    "lag_records": r.lag_records, "lag_seconds": r.lag_seconds, "retries": r.retries, "last_error": r.last_error,
                })).collect();
                println!(
                    "{}",
                    json!({
                        "dc": s.dc, "feed_head": s.feed_head, "feed_floor": s.feed_floor, "feed_records": s.feed_records, "remotes": remotes,
                        "pending_messages": s.pending_messages, "pending_bytes": s.pending_bytes,
                        "oldest_pending_seconds": s.oldest_pending_seconds, "fetch_retries": s.fetch_retries,
                        "corrupt_copies": s.corrupt_copies, "tombstones": s.tombstones,
                    })
                );
            } else {
                println!(
                    "DC {}: own feed head {}, {} records kept (trimmed up to {}, which every other DC has applied)",
                    s.dc, s.feed_head, s.feed_records, s.feed_floor
                );
                println!(
                    "{:<10} {:<13} {:>8} {:>8} {:>8} {:>8} {:>7}  LAST ERROR",
                    "REMOTE", "STATE", "CURSOR", "HEAD", "LAG", "LAG(s)", "RETRIES"
                );
                for r in &s.remotes {
                    println!(
                        "{:<10} {:<13} {:>8} {:>8} {:>8} {:>8.1} {:>7}  {}",
                        r.dc,
                        r.state,
                        r.cursor,
                        r.remote_head,
                        r.lag_records,
                        r.lag_seconds,
                        r.retries,
                        r.last_error
                    );
                }
                println!(
                    "payloads pending here: {} ({}), oldest {:.1}s; fetch retries {}, corrupt copies {}",
                    s.pending_messages, human_size(s.pending_bytes), s.oldest_pending_seconds, s.fetch_retries, s.corrupt_copies
                );
                println!(
                    "tombstones awaiting acknowledgement by every DC: {}",
                    s.tombstones
                );
                if s.remotes.iter().any(|r| r.state == "idle") {
                    println!(
                        "(pulls run on the DC leader; ask the leader for live connection state)"
                    );
                }
            }
        }
        Cmd::Cluster {
            cmd: ClusterCmd::Snapshot,
        } => {
            let s = client.snapshot().await?;
            if cli.json {
                println!(
                    "{}",
                    json!({"node_id": s.node_id, "index": s.index, "bytes": s.bytes, "millis": s.millis})
                );
            } else {
                println!(
                    "node {}: snapshot at index {} written ({}, {:.1}s)",
                    s.node_id,
                    s.index,
                    human_size(s.bytes),
                    s.millis as f64 / 1000.0
                );
            }
        }
        Cmd::Cluster {
            cmd: ClusterCmd::Status,
        } => {
            let s = client.cluster_status().await?;
            if cli.json {
                let nodes: Vec<_> = s
                    .nodes
                    .iter()
                    .map(|n| {
                        json!({"node_id": n.node_id, "addr": n.addr, "reachable": n.reachable, "state": n.state,
                               "term": n.term, "last_log_index": n.last_log_index, "applied_index": n.applied_index, "error": n.error})
                    })
                    .collect();
                println!(
                    "{}",
                    json!({"dc": s.dc, "leader_id": s.has_leader.then_some(s.leader_id), "term": s.term, "nodes": nodes})
                );
            } else {
                let leader = if s.has_leader {
                    format!("node {}", s.leader_id)
                } else {
                    "none (election in progress?)".into()
                };
                println!("DC {}: leader {leader}, term {}", s.dc, s.term);
                println!(
                    "{:<6} {:<22} {:<10} {:>6} {:>10} {:>10}",
                    "NODE", "ADDRESS", "STATE", "TERM", "LAST LOG", "APPLIED"
                );
                for n in &s.nodes {
                    if n.reachable {
                        println!(
                            "{:<6} {:<22} {:<10} {:>6} {:>10} {:>10}",
                            n.node_id, n.addr, n.state, n.term, n.last_log_index, n.applied_index
                        );
                    } else {
                        println!("{:<6} {:<22} unreachable: {}", n.node_id, n.addr, n.error);
                    }
                }
            }
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let (code, msg) = match e.downcast_ref::<ClientError>() {
                Some(ClientError::Status {
                    code,
                    message,
                    error_code,
                }) => (
                    error_code.clone().unwrap_or_else(|| format!("{code:?}")),
                    format!("{code:?}: {message}"),
                ),
                _ => ("error".to_string(), format!("{e:#}")),
            };
            if json {
                println!("{}", json!({"error": code, "message": msg}));
            }
            eprintln!("mailbox: {msg}");
            ExitCode::from(1)
        }
    }
}
