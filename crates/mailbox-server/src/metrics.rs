//! Prometheus metrics of a node: what `/metrics` serves.
//!
//! Most values are read from live state at scrape time (Raft metrics, the
//! replicator's status, the missing-payload index), so they cannot drift
//! from what `ReplicationStatus`/`ClusterStatus` report. Events that leave
//! no state behind (acknowledged uploads, failed requests) are counted in
//! [`COUNTERS`]. The text exposition format 0.0.4 is written by the small
//! [`Exposition`] writer here rather than by a metrics crate: a few dozen
//! lines instead of another dependency tree to compile.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use mailbox_raft::RaftNode;
use mailbox_replication::{RemoteDc, StatusHandle};

use crate::config::AckMode;
use crate::error::ServiceError;

/// Content type of the text exposition format this module writes.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Event counters of this process.
///
/// Process-wide (see [`COUNTERS`]) because the one place every failed
/// request passes, `From<ServiceError> for tonic::Status`, has no context
/// to reach a per-node object through; a process runs exactly one node.
#[derive(Debug)]
pub struct Counters {
    uploads_delayed: AtomicU64,
    uploads_immediate: AtomicU64,
    upload_bytes: AtomicU64,
    /// By stable error code (`x-mailbox-error`); the error path is not hot.
    failed: Mutex<BTreeMap<&'static str, u64>>,
}

/// The counters of this process's node.
pub static COUNTERS: Counters = Counters::new();

impl Counters {
    /// All zero.
    pub const fn new() -> Self {
        Self {
            uploads_delayed: AtomicU64::new(0),
            uploads_immediate: AtomicU64::new(0),
            upload_bytes: AtomicU64::new(0),
            failed: Mutex::new(BTreeMap::new()),
        }
    }

    /// An upload of `bytes` was acknowledged to its client under `ack`.
    pub fn upload_acked(&self, ack: AckMode, bytes: u64) {
        match ack {
            AckMode::Delayed => &self.uploads_delayed,
            AckMode::Immediate => &self.uploads_immediate,
        }
        .fetch_add(1, Ordering::Relaxed);
        self.upload_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A request was answered with the error whose stable code is `code`.
    pub fn request_failed(&self, code: &'static str) {
        *self
            .failed
            .lock()
            .expect("counter lock")
            .entry(code)
            .or_default() += 1;
    }

    /// Writes the counter families.
    pub fn write(&self, e: &mut Exposition) {
        e.family(
            "mailbox_uploads_total",
            Kind::Counter,
            "Uploads acknowledged to their client, by acknowledgement mode.",
        );
        e.sample(
            &[("ack", "delayed")],
            self.uploads_delayed.load(Ordering::Relaxed),
        );
        e.sample(
            &[("ack", "immediate")],
            self.uploads_immediate.load(Ordering::Relaxed),
        );
        e.family(
            "mailbox_upload_bytes_total",
            Kind::Counter,
            "Payload bytes of acknowledged uploads.",
        );
        e.sample(&[], self.upload_bytes.load(Ordering::Relaxed));
        e.family(
            "mailbox_requests_failed_total",
            Kind::Counter,
            "Requests answered with an error, by stable error code (x-mailbox-error).",
        );
        for (code, n) in self.failed.lock().expect("counter lock").iter() {
            e.sample(&[("code", *code)], *n);
        }
    }
}

impl Default for Counters {
    fn default() -> Self {
        Self::new()
    }
}

/// Metric type, as in the `# TYPE` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Goes up and down.
    Gauge,
    /// Only goes up (resets when the process restarts).
    Counter,
}

/// A sample value: integers are written exactly (an f64 would round
/// counters above 2^53).
#[derive(Debug, Clone, Copy)]
pub enum Value {
    /// An integer.
    Int(u64),
    /// A float.
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(v)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Int(v as u64)
    }
}

/// Writer of the Prometheus text exposition format 0.0.4: one `# HELP` and
/// `# TYPE` line per family, then its samples, each carrying the constant
/// labels first.
#[derive(Debug)]
pub struct Exposition {
    out: String,
    family: String,
    constant: String,
}

impl Exposition {
    /// A writer whose every sample carries `constant` labels.
    pub fn new(constant: &[(&str, &str)]) -> Self {
        let mut c = String::new();
        for (k, v) in constant {
            debug_assert!(valid_label_name(k), "bad label name {k:?}");
            push_label(&mut c, k, v);
        }
        Self {
            out: String::new(),
            family: String::new(),
            constant: c,
        }
    }

    /// Starts a metric family; following samples belong to it.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        debug_assert!(valid_metric_name(name), "bad metric name {name:?}");
        let kind = match kind {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
        };
        let _ = writeln!(self.out, "# HELP {name} {}", escape(help, false));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        self.family = name.to_string();
    }

    /// One sample of the current family.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: impl Into<Value>) {
        debug_assert!(!self.family.is_empty(), "sample before family");
        self.out.push_str(&self.family);
        let mut l = self.constant.clone();
        for (k, v) in labels {
            debug_assert!(valid_label_name(k), "bad label name {k:?}");
            push_label(&mut l, k, v);
        }
        if !l.is_empty() {
            let _ = write!(self.out, "{{{l}}}");
        }
        match value.into() {
            Value::Int(v) => {
                let _ = writeln!(self.out, " {v}");
            }
            Value::Float(v) if v.is_nan() => self.out.push_str(" NaN\n"),
            Value::Float(v) if v.is_infinite() => {
                self.out
                    .push_str(if v > 0.0 { " +Inf\n" } else { " -Inf\n" })
            }
            Value::Float(v) => {
                let _ = writeln!(self.out, " {v}");
            }
        }
    }

    /// A family with a single sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: impl Into<Value>) {
        self.family(name, kind, help);
        self.sample(&[], value);
    }

    /// The finished text.
    pub fn finish(self) -> String {
        self.out
    }
}

fn push_label(out: &mut String, k: &str, v: &str) {
    if !out.is_empty() {
        out.push(',');
    }
    let _ = write!(out, "{k}=\"{}\"", escape(v, true));
}

/// Escapes `\` and newline (HELP text), and `"` too in label values.
fn escape(s: &str, quote: bool) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '"' if quote => o.push_str("\\\""),
            c => o.push(c),
        }
    }
    o
}

fn valid_metric_name(n: &str) -> bool {
    let mut cs = n.chars();
    matches!(cs.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && cs.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(n: &str) -> bool {
    let mut cs = n.chars();
    matches!(cs.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && cs.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// What a scrape reads: the node's Raft handle and its replicator's view.
#[derive(Clone)]
pub struct MetricsSource {
    /// The DC log member.
    pub raft: RaftNode,
    /// This node's DC.
    pub dc: String,
    /// The other DCs, as configured.
    pub remotes: Vec<RemoteDc>,
    /// The replicator's live status.
    pub status: StatusHandle,
}

impl MetricsSource {
    /// Every metric of this node in the text format. Reads the applied
    /// state (the missing-payload index), so call it off the async workers.
    pub fn render(&self, counters: &Counters) -> Result<String, ServiceError> {
        let node = self.raft.id().to_string();
        let mut e = Exposition::new(&[("dc", self.dc.as_str()), ("node", node.as_str())]);

        let r = self.raft.report();
        e.single(
            "mailbox_raft_term",
            Kind::Gauge,
            "Current Raft term of this node.",
            r.term,
        );
        e.single(
            "mailbox_raft_is_leader",
            Kind::Gauge,
            "1 if this node leads its DC log.",
            r.leader == Some(r.id),
        );
        e.single(
            "mailbox_raft_has_leader",
            Kind::Gauge,
            "1 if this node knows a leader of its DC log (what /healthz checks).",
            r.leader.is_some(),
        );
        e.single(
            "mailbox_raft_applied_index",
            Kind::Gauge,
            "Index of the last DC log entry applied to this node's state.",
            r.applied_index.unwrap_or(0),
        );
        e.single(
            "mailbox_raft_last_log_index",
            Kind::Gauge,
            "Index of the last entry in this node's DC log.",
            r.last_log_index.unwrap_or(0),
        );
        e.single(
            "mailbox_raft_snapshot_index",
            Kind::Gauge,
            "Last DC log index covered by this node's latest snapshot.",
            r.snapshot_index.unwrap_or(0),
        );
        e.single(
            "mailbox_raft_purged_index",
            Kind::Gauge,
            "Last DC log index purged from this node's log (entries up to it are only in the snapshot and the state).",
            r.purged_index.unwrap_or(0),
        );

        let b = self.raft.batch_stats();
        e.single(
            "mailbox_raft_proposed_entries_total",
            Kind::Counter,
            "Log entries this node proposed as leader and saw applied (each a group-commit batch of commands).",
            b.entries,
        );
        e.single(
            "mailbox_raft_proposed_commands_total",
            Kind::Counter,
            "Commands in the log entries this node proposed as leader (divided by the entries: the group-commit batch size).",
            b.commands,
        );
        e.single(
            "mailbox_raft_forward_rpcs_total",
            Kind::Counter,
            "Forward RPCs this node sent to its leader and had answered (each a batch of proposals).",
            b.forward_rpcs,
        );
        e.single(
            "mailbox_raft_forwarded_commands_total",
            Kind::Counter,
            "Proposals this node forwarded to its leader (divided by the RPCs: the forward batch size).",
            b.forwarded,
        );

        let queues = mailbox_state::events::queue_counts(self.raft.view())?;
        if !queues.is_empty() {
            e.family(
                "mailbox_event_queue_events",
                Kind::Gauge,
                "Events of a queue by status (pending, processing, complete, failed = in the dead-letter queue, discarded), whichever DC raised them: event state replicates to every DC.",
            );
            for (q, c) in &queues {
                for (status, n) in [
                    ("pending", c.pending),
                    ("processing", c.processing),
                    ("complete", c.complete),
                    ("failed", c.failed),
                    ("discarded", c.discarded),
                ] {
                    e.sample(&[("queue", q.as_str()), ("status", status)], n);
                }
            }
            e.family(
                "mailbox_events_raised_total",
                Kind::Counter,
                "Events this DC raised into a queue (one per matching rule per message it originated, once every DC held it).",
            );
            for (q, c) in &queues {
                e.sample(&[("queue", q.as_str())], c.raised);
            }
            e.family(
                "mailbox_events_dead_lettered_total",
                Kind::Counter,
                "Times an event of a queue was dead-lettered (out of attempts, or failed permanently), whichever DC handled it.",
            );
            for (q, c) in &queues {
                e.sample(&[("queue", q.as_str())], c.dead_lettered);
            }
            e.family(
                "mailbox_events_purged_total",
                Kind::Counter,
                "Finished events (complete, discarded) of a queue removed after the event retention.",
            );
            for (q, c) in &queues {
                e.sample(&[("queue", q.as_str())], c.purged);
            }
        }

        if !r.matched.is_empty() {
            e.family(
                "mailbox_raft_follower_lag_entries",
                Kind::Gauge,
                "On the leader: log entries a follower still lacks (its last replicated index behind the leader's last).",
            );
            for (id, matched) in &r.matched {
                let lag = r
                    .last_log_index
                    .unwrap_or(0)
                    .saturating_sub(matched.unwrap_or(0));
                e.sample(&[("follower", id.to_string().as_str())], lag);
            }
        }

        let rep =
            crate::service::replication_report(&self.raft, &self.dc, &self.remotes, &self.status)?;
        e.single(
            "mailbox_replication_feed_head",
            Kind::Gauge,
            "Sequence number of the last record of this DC's own feed.",
            rep.feed_head,
        );
        e.single(
            "mailbox_replication_feed_records",
            Kind::Gauge,
            "Records of this DC's own feed kept (not yet applied by every other DC, so not trimmed).",
            rep.feed_records,
        );
        e.single(
            "mailbox_replication_tombstones",
            Kind::Gauge,
            "Deleted messages whose tombstone waits for some DC's acknowledgement.",
            rep.tombstones,
        );
        type Field = fn(&mailbox_proto::v1::RemoteDcStatus) -> Value;
        let per_remote: [(&str, Kind, &str, Field); 6] = [
            (
                "mailbox_replication_connected",
                Kind::Gauge,
                "1 while this node pulls the remote DC's feed (only the leader pulls).",
                |s| (s.state == "connected").into(),
            ),
            (
                "mailbox_replication_cursor",
                Kind::Gauge,
                "Last record of the remote DC's feed applied in this DC.",
                |s| s.cursor.into(),
            ),
            (
                "mailbox_replication_remote_head",
                Kind::Gauge,
                "Head of the remote DC's feed when last heard (at least the cursor).",
                |s| s.remote_head.into(),
            ),
            (
                "mailbox_replication_lag_records",
                Kind::Gauge,
                "Records of the remote DC's feed not applied here yet (remote_head - cursor).",
                |s| s.lag_records.into(),
            ),
            (
                "mailbox_replication_lag_seconds",
                Kind::Gauge,
                "How long the oldest unapplied record of the remote DC's feed has been seen behind.",
                |s| s.lag_seconds.into(),
            ),
            (
                "mailbox_replication_pull_retries_total",
                Kind::Counter,
                "Feed pull reconnects to the remote DC by this node.",
                |s| s.retries.into(),
            ),
        ];
        for (name, kind, help, field) in per_remote {
            e.family(name, kind, help);
            for s in &rep.remotes {
                e.sample(&[("remote", s.dc.as_str())], field(s));
            }
        }

        e.single(
            "mailbox_replication_pending_messages",
            Kind::Gauge,
            "Messages whose metadata is here but whose payload is not yet.",
            rep.pending_messages,
        );
        e.single(
            "mailbox_replication_pending_bytes",
            Kind::Gauge,
            "Payload bytes of the pending messages.",
            rep.pending_bytes,
        );
        e.single(
            "mailbox_replication_oldest_pending_seconds",
            Kind::Gauge,
            "Age of the oldest pending message (since its upload), 0 when none.",
            rep.oldest_pending_seconds,
        );
        let fetch = self.status.fetch.lock().expect("status lock").clone();
        e.single(
            "mailbox_fetch_retries_total",
            Kind::Counter,
            "Failed segment fetch attempts by this node (each is retried).",
            fetch.retries,
        );
        e.single(
            "mailbox_fetch_corrupt_copies_total",
            Kind::Counter,
            "Fetched segments discarded for a SHA-256 mismatch.",
            fetch.corrupt,
        );
        e.single(
            "mailbox_fetch_segments_copied_total",
            Kind::Counter,
            "Segments copied from other DCs by this node.",
            fetch.segments_copied,
        );
        e.single(
            "mailbox_replica_segments_early_total",
            Kind::Counter,
            "Segments of other DCs' uploads stored here from payloads sent ahead of their records.",
            fetch.segments_early,
        );

        counters.write(&mut e);
        Ok(e.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_have_help_and_type_and_constant_labels() {
        let mut e = Exposition::new(&[("dc", "east"), ("node", "1")]);
        e.single("mailbox_raft_term", Kind::Gauge, "Current term.", 7u64);
        e.family("mailbox_replication_cursor", Kind::Gauge, "Cursor.");
        e.sample(&[("remote", "west")], 12u64);
        e.sample(&[("remote", "north")], 3u64);
        e.single("mailbox_x_total", Kind::Counter, "Events.", u64::MAX);
        assert_eq!(
            e.finish(),
            "# HELP mailbox_raft_term Current term.\n\
             # TYPE mailbox_raft_term gauge\n\
             mailbox_raft_term{dc=\"east\",node=\"1\"} 7\n\
             # HELP mailbox_replication_cursor Cursor.\n\
             # TYPE mailbox_replication_cursor gauge\n\
             mailbox_replication_cursor{dc=\"east\",node=\"1\",remote=\"west\"} 12\n\
             mailbox_replication_cursor{dc=\"east\",node=\"1\",remote=\"north\"} 3\n\
             # HELP mailbox_x_total Events.\n\
             # TYPE mailbox_x_total counter\n\
             mailbox_x_total{dc=\"east\",node=\"1\"} 18446744073709551615\n"
        );
    }

    #[test]
    fn no_labels_means_no_braces() {
        let mut e = Exposition::new(&[]);
        e.single("up", Kind::Gauge, "h", true);
        assert!(e.finish().ends_with("\nup 1\n"));
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut e = Exposition::new(&[]);
        e.family("m", Kind::Gauge, "back\\slash\nnew \"quoted\"");
        e.sample(&[("v", "a\"b\\c\nd")], 1u64);
        let t = e.finish();
        assert!(
            t.contains("# HELP m back\\\\slash\\nnew \"quoted\"\n"),
            "{t}"
        );
        assert!(t.contains("m{v=\"a\\\"b\\\\c\\nd\"} 1\n"), "{t}");
    }

    #[test]
    fn floats_and_special_values() {
        let mut e = Exposition::new(&[]);
        e.family("f", Kind::Gauge, "h");
        e.sample(&[("k", "a")], 1.5f64);
        e.sample(&[("k", "b")], 0.0f64);
        e.sample(&[("k", "c")], f64::NAN);
        e.sample(&[("k", "d")], f64::INFINITY);
        e.sample(&[("k", "e")], f64::NEG_INFINITY);
        e.sample(&[("k", "f")], 3.0f64);
        let t = e.finish();
        for line in [
            "f{k=\"a\"} 1.5\n",
            "f{k=\"b\"} 0\n",
            "f{k=\"c\"} NaN\n",
            "f{k=\"d\"} +Inf\n",
            "f{k=\"e\"} -Inf\n",
            "f{k=\"f\"} 3\n",
        ] {
            assert!(t.contains(line), "{line:?} missing in {t}");
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_metric_name("mailbox_raft_term"));
        assert!(valid_metric_name("a:b_c9"));
        assert!(!valid_metric_name("9a"));
        assert!(!valid_metric_name("a-b"));
        assert!(!valid_metric_name(""));
        assert!(valid_label_name("remote"));
        assert!(!valid_label_name("a:b"));
        assert!(!valid_label_name("1a"));
    }

    #[test]
    fn counters_count_uploads_and_errors_by_code() {
        let c = Counters::new();
        c.upload_acked(AckMode::Delayed, 10);
        c.upload_acked(AckMode::Delayed, 5);
        c.upload_acked(AckMode::Immediate, 1);
        c.request_failed("not_found");
        c.request_failed("not_found");
        c.request_failed("unavailable");
        let mut e = Exposition::new(&[]);
        c.write(&mut e);
        let t = e.finish();
        for line in [
            "mailbox_uploads_total{ack=\"delayed\"} 2\n",
            "mailbox_uploads_total{ack=\"immediate\"} 1\n",
            "mailbox_upload_bytes_total 16\n",
            "mailbox_requests_failed_total{code=\"not_found\"} 2\n",
            "mailbox_requests_failed_total{code=\"unavailable\"} 1\n",
            "# TYPE mailbox_requests_failed_total counter\n",
        ] {
            assert!(t.contains(line), "{line:?} missing in {t}");
        }
    }

    #[test]
    fn error_conversion_counts_by_code() {
        // The process-wide counters; other tests may convert errors too, so
        // compare before and after.
        let count = |code: &str| {
            COUNTERS
                .failed
                .lock()
                .unwrap()
                .get(code)
                .copied()
                .unwrap_or(0)
        };
        let before = count("checksum_mismatch");
        let s = tonic::Status::from(ServiceError::ChecksumMismatch {
            declared: "a".into(),
            actual: "b".into(),
        });
        assert_eq!(
            s.metadata().get("x-mailbox-error").unwrap(),
            "checksum_mismatch"
        );
        assert_eq!(count("checksum_mismatch"), before + 1);
    }
}
