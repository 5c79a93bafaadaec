//! Node configuration: one TOML file, validated at startup.
//!
//! Every field has a default so a minimal file names only what differs per
//! node (`node-id`, `listen`, `data-dir`, `members`). Sizes and durations are
//! human-readable ("8MiB", "30s").

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use mailbox_raft::RaftTuning;
use mailbox_types::{ByteSize, HumanDuration, PathPattern};
use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// Largest inline payload we allow: it travels inside one Raft entry.
pub const MAX_INLINE_THRESHOLD: u64 = 4 << 20;

/// The default inline threshold. Every inline byte is written to each
/// node's log and state (and compacted there), a segment once to the DC's
/// segment store: measured with `BENCH_ONLY=sweep benches/run.sh`, inline
/// takes more uploads than segments up to 8 KiB and fewer from 16 KiB on.
pub const DEFAULT_INLINE_THRESHOLD: u64 = 8 << 10;

/// Configuration of one `mailboxd` node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id inside its data center; must appear in `members`.
    pub node_id: u64,
    /// Name of the data center this node belongs to.
    pub dc: String,
    /// Address the gRPC server (public API and node-to-node) listens on.
    pub listen: String,
    /// Address other nodes use to reach this one (defaults to `listen`).
    pub advertise: Option<String>,
    /// Address of the HTTP server for `/metrics` (Prometheus) and
    /// `/healthz`, e.g. "127.0.0.1:7180"; none when unset.
    pub http_listen: Option<String>,
    /// Directory for this node's RocksDB and snapshots.
    pub data_dir: PathBuf,
    /// The DC's shared segment store directory (the same for every node of the DC).
    pub segment_dir: PathBuf,
    /// Initial voting members of the DC log; the lowest id forms the group.
    pub members: Vec<Member>,
    /// Payloads up to this size are stored inline in the DC log (default
    /// 8 KiB: where segments start taking as many uploads as inline, see
    /// docs/benchmarks.md, "sizes around the inline threshold").
    pub inline_threshold: ByteSize,
    /// Larger payloads are cut into segments of this size.
    pub segment_size: ByteSize,
    /// Segments without a committed message are deleted after this long.
    pub orphan_grace: HumanDuration,
    /// How often the leader looks for orphaned segments.
    pub gc_interval: HumanDuration,
    /// How long a deleted message's idempotency key keeps answering (and a
    /// replayed upload of it is recognised) after the delete.
    pub idempotency_retention: HumanDuration,
    /// How long finished events (complete, discarded) stay listed after
    /// their last change before they are purged; dead-lettered events stay
    /// until replayed or discarded.
    pub event_retention: HumanDuration,
    /// Raft timing and log compaction.
    pub raft: RaftConfig,
    /// The other data centers and the acknowledgement policy.
    pub cluster: ClusterConfig,
}

/// Multi-DC settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct ClusterConfig {
    /// Every other DC of the cluster and how to reach its nodes.
    pub remotes: Vec<RemoteDcConfig>,
    /// When uploads are acknowledged: `delayed` (after the local DC
    /// committed) or `immediate` (after other DCs hold the payload too).
    pub ack: AckMode,
    /// For `immediate`: `one` other DC, a `majority` of all DCs (origin
    /// included), or `all` DCs.
    pub immediate_quorum: Quorum,
    /// For `immediate`: give up waiting (retryable error) after this long.
    pub immediate_timeout: HumanDuration,
    /// Per-mailbox overrides of the three settings above; the first rule
    /// whose pattern matches the upload's mailbox applies.
    pub ack_rules: Vec<AckRuleConfig>,
}

/// Acknowledgement policy for mailboxes matching a pattern, e.g.
/// `{ mailbox = "/partners/*/urgent/**", ack = "immediate" }`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AckRuleConfig {
    /// Mailbox path pattern: `*` and `?` within a segment, `**` for any
    /// number of segments.
    pub mailbox: String,
    /// Mode for matching mailboxes (default: the cluster's).
    pub ack: Option<AckMode>,
    /// Quorum for matching mailboxes (default: the cluster's).
    pub immediate_quorum: Option<Quorum>,
    /// Timeout for matching mailboxes (default: the cluster's).
    pub immediate_timeout: Option<HumanDuration>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            remotes: Vec::new(),
            ack: AckMode::Delayed,
            immediate_quorum: Quorum::Majority,
            immediate_timeout: ms(30_000),
            ack_rules: Vec::new(),
        }
    }
}

/// Another DC.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RemoteDcConfig {
    /// Its name.
    pub name: String,
    /// `host:port` of its nodes (any node serves the feed and payloads).
    pub endpoints: Vec<String>,
}

/// Acknowledgement policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AckMode {
    /// After the local DC committed.
    Delayed,
    /// After the required number of other DCs hold the whole payload.
    Immediate,
}

/// How many DCs `immediate` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Quorum {
    /// One other DC.
    One,
    /// A majority of all DCs, the origin included.
    Majority,
    /// Every DC.
    All,
}

impl Quorum {
    /// Other DCs that must hold a message, given `total` DCs in the cluster.
    pub fn others_required(self, total: usize) -> usize {
        let others = total.saturating_sub(1);
        match self {
            Quorum::One => others.min(1),
            Quorum::Majority => (total / 2 + 1).saturating_sub(1),
            Quorum::All => others,
        }
    }
}

/// One member of the DC log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Member {
    /// Node id.
    pub id: u64,
    /// `host:port` of its gRPC server.
    pub addr: String,
}

/// Raft tuning.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct RaftConfig {
    /// Leader heartbeat interval.
    pub heartbeat: HumanDuration,
    /// Minimum election timeout.
    pub election_timeout_min: HumanDuration,
    /// Maximum election timeout.
    pub election_timeout_max: HumanDuration,
    /// Build a snapshot every this many log entries.
    pub snapshot_every: u64,
    /// Build a snapshot, too, once this many bytes were appended to the log
    /// since the last one (bounds the log on disk when entries are large).
    pub snapshot_log_size: ByteSize,
    /// Log entries kept behind the latest snapshot for lagging followers.
    pub keep_logs: u64,
    /// How long a write waits for a leader before failing with UNAVAILABLE.
    pub propose_timeout: HumanDuration,
}

fn ms(n: u64) -> HumanDuration {
    HumanDuration(std::time::Duration::from_millis(n))
}

impl Default for RaftConfig {
    fn default() -> Self {
        let t = RaftTuning::default();
        Self {
            heartbeat: HumanDuration(t.heartbeat),
            election_timeout_min: HumanDuration(t.election_min),
            election_timeout_max: HumanDuration(t.election_max),
            snapshot_every: t.snapshot_every,
            snapshot_log_size: ByteSize(t.snapshot_log_bytes),
            keep_logs: t.keep_logs,
            propose_timeout: HumanDuration(t.propose_timeout),
        }
    }
}

impl RaftConfig {
    /// As the raft crate's tuning struct.
    pub fn tuning(&self) -> RaftTuning {
        RaftTuning {
            heartbeat: self.heartbeat.0,
            election_min: self.election_timeout_min.0,
            election_max: self.election_timeout_max.0,
            snapshot_every: self.snapshot_every,
            snapshot_log_bytes: self.snapshot_log_size.0,
            keep_logs: self.keep_logs,
            propose_timeout: self.propose_timeout.0,
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            node_id: 1,
            dc: "east".into(),
            listen: "127.0.0.1:7101".into(),
            advertise: None,
            http_listen: None,
            data_dir: PathBuf::from("data/node1"),
            segment_dir: PathBuf::from("data/segments"),
            members: Vec::new(),
            inline_threshold: ByteSize(DEFAULT_INLINE_THRESHOLD),
            segment_size: ByteSize(8 << 20),
            orphan_grace: ms(3_600_000),
            gc_interval: ms(60_000),
            idempotency_retention: ms(7 * 24 * 3_600_000),
            event_retention: ms(7 * 24 * 3_600_000),
            raft: RaftConfig::default(),
            cluster: ClusterConfig::default(),
        }
    }
}

impl NodeConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let cfg: NodeConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Address peers and clients use for this node.
    pub fn advertise_addr(&self) -> &str {
        self.advertise.as_deref().unwrap_or(&self.listen)
    }

    /// Checks every rule a running node relies on; the message says which
    /// field is wrong and why.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &'static str, reason: String| Err(ConfigError::Invalid { field, reason });
        if self.dc.is_empty()
            || !self
                .dc
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad(
                "dc",
                format!("{:?} must be non-empty [A-Za-z0-9_-]", self.dc),
            );
        }
        if self.listen.parse::<SocketAddr>().is_err() {
            return bad(
                "listen",
                format!("{:?} is not host:port (an IP address)", self.listen),
            );
        }
        if let Some(http) = &self.http_listen {
            match http.parse::<SocketAddr>() {
                Err(_) => {
                    return bad(
                        "http-listen",
                        format!("{http:?} is not host:port (an IP address)"),
                    )
                }
                // Port 0 on both would be two different ports; equal fixed
                // ports would make the second bind fail at startup.
                Ok(a) if a.port() != 0 && self.listen.parse::<SocketAddr>().ok() == Some(a) => {
                    return bad(
                        "http-listen",
                        format!("{http:?} is the gRPC `listen` address too"),
                    )
                }
                Ok(_) => {}
            }
        }
        if self.members.is_empty() {
            return bad(
                "members",
                "at least one member (this node) is required".into(),
            );
        }
        let mut ids = HashSet::new();
        for m in &self.members {
            if !ids.insert(m.id) {
                return bad("members", format!("node id {} appears twice", m.id));
            }
            if !m.addr.contains(':') {
                return bad(
                    "members",
                    format!("address {:?} of node {} is not host:port", m.addr, m.id),
                );
            }
        }
        if !ids.contains(&self.node_id) {
            return bad(
                "node-id",
                format!("{} is not among members {:?}", self.node_id, ids),
            );
        }
        if !matches!(self.members.len(), 1 | 3 | 5) {
            return bad(
                "members",
                format!("a DC has 1, 3 or 5 nodes, not {}", self.members.len()),
            );
        }
        if self.data_dir.as_os_str().is_empty() {
            return bad("data-dir", "must be set".into());
        }
        if self.segment_dir.as_os_str().is_empty() {
            return bad("segment-dir", "must be set".into());
        }
        if self.inline_threshold.0 > MAX_INLINE_THRESHOLD {
            return bad(
                "inline-threshold",
                format!(
                    "{} exceeds the maximum {}",
                    self.inline_threshold,
                    ByteSize(MAX_INLINE_THRESHOLD)
                ),
            );
        }
        if !(4096..=(1u64 << 30)).contains(&self.segment_size.0) {
            return bad(
                "segment-size",
                format!("{} must be between 4KiB and 1GiB", self.segment_size),
            );
        }
        if self.segment_size.0 < self.inline_threshold.0 {
            return bad(
                "segment-size",
                "must not be smaller than inline-threshold".into(),
            );
        }
        let r = &self.raft;
        if r.heartbeat.0.is_zero() || r.election_timeout_min.0 <= r.heartbeat.0 * 2 {
            return bad(
                "raft.election-timeout-min",
                format!(
                    "{} must exceed twice the heartbeat {}",
                    r.election_timeout_min, r.heartbeat
                ),
            );
        }
        if r.election_timeout_max.0 <= r.election_timeout_min.0 {
            return bad(
                "raft.election-timeout-max",
                "must exceed election-timeout-min".into(),
            );
        }
        if r.snapshot_every == 0 {
            return bad("raft.snapshot-every", "must be positive".into());
        }
        if r.snapshot_log_size.0 < 1 << 20 {
            return bad(
                "raft.snapshot-log-size",
                format!("{} is below the minimum of 1MiB", r.snapshot_log_size),
            );
        }
        if self.orphan_grace.0 < r.propose_timeout.0 * 2 {
            return bad(
                "orphan-grace",
                format!(
                    "{} must be at least twice raft.propose-timeout ({}), or in-flight uploads lose segments",
                    self.orphan_grace, r.propose_timeout
                ),
            );
        }
        if self.event_retention.0 < std::time::Duration::from_secs(1) {
            return bad(
                "event-retention",
                "must be at least 1s (finished events are kept this long)".into(),
            );
        }
        if self.idempotency_retention.0 < self.orphan_grace.0 {
            return bad(
                "idempotency-retention",
                format!(
                    "must be at least orphan-grace ({}): the collector's decisions are kept as long",
                    self.orphan_grace
                ),
            );
        }
        if self.gc_interval.0.is_zero() {
            return bad("gc-interval", "must be positive".into());
        }
        let mut names = HashSet::new();
        for r in &self.cluster.remotes {
            if r.name == self.dc || !names.insert(&r.name) {
                return bad(
                    "cluster.remotes",
                    format!("DC {:?} is this DC or listed twice", r.name),
                );
            }
            if r.endpoints.is_empty() {
                return bad(
                    "cluster.remotes",
                    format!("DC {:?} has no endpoints", r.name),
                );
            }
        }
        for (i, rule) in self.cluster.ack_rules.iter().enumerate() {
            if let Err(e) = PathPattern::parse(&rule.mailbox) {
                return bad("cluster.ack-rules", format!("rule {}: {e}", i + 1));
            }
            if rule.immediate_timeout.is_some_and(|t| t.0.is_zero()) {
                return bad(
                    "cluster.ack-rules",
                    format!("rule {}: immediate-timeout must be positive", i + 1),
                );
            }
        }
        if self.cluster.immediate_timeout.0.is_zero() {
            return bad("cluster.immediate-timeout", "must be positive".into());
        }
        Ok(())
    }

    /// Names of every DC of the cluster, this one included, sorted.
    pub fn cluster_dcs(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .cluster
            .remotes
            .iter()
            .map(|r| r.name.clone())
            .collect();
        v.push(self.dc.clone());
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
node-id = 2
dc = "east"
listen = "127.0.0.1:7102"
data-dir = "/tmp/x"
segment-dir = "/tmp/s"
inline-threshold = "32KiB"
[[members]]
id = 1
addr = "127.0.0.1:7101"
[[members]]
id = 2
addr = "127.0.0.1:7102"
[[members]]
id = 3
addr = "127.0.0.1:7103"
[raft]
snapshot-every = 100
"#;

    #[test]
    fn minimal_config_parses_with_defaults() {
        let c: NodeConfig = toml::from_str(MIN).unwrap();
        c.validate().unwrap();
        assert_eq!(c.inline_threshold.0, 32 << 10);
        assert_eq!(c.segment_size.0, 8 << 20);
        assert_eq!(c.raft.snapshot_every, 100);
        assert_eq!(c.raft.keep_logs, 1000);
        assert_eq!(c.advertise_addr(), "127.0.0.1:7102");
    }

    #[test]
    fn validation_names_the_field() {
        let mut c: NodeConfig = toml::from_str(MIN).unwrap();
        c.node_id = 9;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("node-id"), "{e}");
        let mut c: NodeConfig = toml::from_str(MIN).unwrap();
        c.inline_threshold = ByteSize(16 << 20);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("inline-threshold"));
        let mut c: NodeConfig = toml::from_str(MIN).unwrap();
        c.members.pop();
        assert!(c.validate().unwrap_err().to_string().contains("1, 3 or 5"));
        assert!(toml::from_str::<NodeConfig>("nod-id = 1").is_err());
    }

    #[test]
    fn ack_rules_parse_and_validate() {
        let c: NodeConfig = toml::from_str(&format!(
            "{MIN}\n[cluster]\nack-rules = [{{ mailbox = \"/partners/*/urgent/**\", ack = \"immediate\", immediate-timeout = \"5s\" }}]\n"
        ))
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.cluster.ack_rules[0].ack, Some(AckMode::Immediate));
        let mut bad_rule = c.clone();
        bad_rule.cluster.ack_rules[0].mailbox = "partners".into();
        let e = bad_rule.validate().unwrap_err().to_string();
        assert!(
            e.contains("cluster.ack-rules") && e.contains("rule 1"),
            "{e}"
        );
    }

    #[test]
    fn http_listen_is_optional_and_validated() {
        let c: NodeConfig = toml::from_str(MIN).unwrap();
        assert_eq!(c.http_listen, None);
        let c: NodeConfig =
            toml::from_str(&format!("http-listen = \"127.0.0.1:7180\"\n{MIN}")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.http_listen.as_deref(), Some("127.0.0.1:7180"));
        // It survives `check-config`'s round trip.
        let again: NodeConfig = toml::from_str(&toml::to_string_pretty(&c).unwrap()).unwrap();
        assert_eq!(again.http_listen, c.http_listen);
        let mut bad = c.clone();
        bad.http_listen = Some("localhost:7180".into());
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("http-listen"), "{e}");
        let mut same = c.clone();
        same.http_listen = Some(same.listen.clone());
        let e = same.validate().unwrap_err().to_string();
        assert!(e.contains("http-listen"), "{e}");
    }

    #[test]
    fn quorum_counts_other_dcs() {
        assert_eq!(Quorum::Majority.others_required(2), 1);
        assert_eq!(Quorum::Majority.others_required(3), 1);
        assert_eq!(Quorum::Majority.others_required(5), 2);
        assert_eq!(Quorum::All.others_required(3), 2);
        assert_eq!(Quorum::One.others_required(3), 1);
        assert_eq!(Quorum::One.others_required(1), 0);
    }
}
