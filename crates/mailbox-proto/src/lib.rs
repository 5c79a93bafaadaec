//! Generated protobuf and gRPC code for the mailbox cluster.
//!
//! This is the only crate that holds prost output; everything else imports the
//! types from here. `v1` is the public API, `raft` the node-to-node service.

/// Public mailbox API (`proto/mailbox.proto`).
pub mod v1 {
    tonic::include_proto!("mailbox.v1");
}

/// Node-to-node Raft transport (`proto/raft.proto`).
pub mod raft {
    tonic::include_proto!("mailbox.raft.v1");
}

/// DC-to-DC replication feed (`proto/replication.proto`).
pub mod replication {
    tonic::include_proto!("mailbox.replication.v1");
}

/// Minimal etcd v3 KV client, used only by the load generator to measure
/// etcd as a baseline in the same run (`proto/etcd/kv.proto`).
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

/// HTTP/2 stream window for bulk transfers (uploads, downloads, segment
/// copies): the default 64 KiB makes throughput latency-bound.
pub const STREAM_WINDOW: u32 = 8 << 20;
/// HTTP/2 connection window (several streams share a connection).
pub const CONNECTION_WINDOW: u32 = 32 << 20;

/// Largest gRPC message either side accepts; upload chunks are far below it,
/// Raft append batches and snapshot chunks may approach it.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

mod convert {
    use mailbox_types::{MailboxRecord, MessageMeta, Payload};

    use crate::v1::{MailboxInfo, MessageInfo, SegmentInfo};

    impl From<&MessageMeta> for MessageInfo {
        fn from(m: &MessageMeta) -> Self {
            MessageInfo {
                id: m.id.to_string(),
                mailbox: m.mailbox.to_string(),
                name: m.name.clone(),
                size: m.size,
                sha256: m.sha256.to_hex(),
                created_ms: m.created_ms,
                origin_dc: m.origin_dc.clone(),
                attributes: m.attributes.clone().into_iter().collect(),
                segments: m
                    .segments()
                    .iter()
                    .map(|s| SegmentInfo {
                        index: s.index,
                        size: s.size,
                        sha256: s.sha256.to_hex(),
                    })
                    .collect(),
                inline: matches!(m.payload, Payload::Inline),
                ..Default::default()
            }
        }
    }

    impl From<&MailboxRecord> for MailboxInfo {
        fn from(r: &MailboxRecord) -> Self {
            MailboxInfo {
                path: r.path.to_string(),
                created_ms: r.created_ms,
            }
        }
    }
}
