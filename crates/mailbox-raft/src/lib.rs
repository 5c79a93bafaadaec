//! openraft wiring for one data center's log.
//!
//! - [`TypeConfig`]: the log carries [`mailbox_state::Command`]s and answers
//!   with [`mailbox_state::CommandResponse`]s.
//! - [`LogStore`]: the Raft log in RocksDB; an append or a vote is reported
//!   durable to openraft only after the WAL is fsynced.
//! - [`StateMachineStore`]: applies commands through `mailbox_state::apply`,
//!   writing the state and the apply point in one RocksDB batch; builds,
//!   streams and installs snapshots through files ([`snapshot_file`]).
//! - [`network`]: the node-to-node transport over tonic, and [`RaftNode`],
//!   which proposes from any node by forwarding to the leader.

// openraft's trait methods return its `StorageError` (224 bytes); our helpers
// return the same type so `?` works without conversions.
#![allow(clippy::result_large_err)]

pub mod log_store;
pub mod network;
pub mod node;
pub mod sm_store;
pub mod snapshot_file;

use mailbox_state::{Command, CommandResponse};

pub use log_store::LogStore;
pub use node::{BatchStats, RaftNode, RaftTuning};
pub use sm_store::{StateMachineStore, StateView};

pub use openraft::BasicNode;

/// Node id within a DC.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// Type configuration of a DC log.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = NodeId,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = snapshot_file::SnapshotFile,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The running Raft instance of a DC log.
pub type Raft = openraft::Raft<TypeConfig>;
/// openraft's storage error for our node id type.
pub type StorageError = openraft::StorageError<NodeId>;

/// Errors from proposing to or querying the DC log.
#[derive(Debug, thiserror::Error)]
pub enum RaftError {
    /// No leader is known right now (election in progress, or no quorum).
    /// Retryable.
    #[error("no Raft leader available: {reason}")]
    Unavailable {
        /// What was observed.
        reason: String,
    },
    /// This node is not the leader and could not forward; `leader` is the
    /// node to ask instead, when known.
    #[error("not the leader; leader is {leader:?} at {leader_addr:?}")]
    NotLeader {
        /// Leader's node id.
        leader: Option<NodeId>,
        /// Leader's address.
        leader_addr: Option<String>,
    },
    /// The Raft instance stopped (storage failure or shutdown).
    #[error("raft stopped: {reason}")]
    Fatal {
        /// Why.
        reason: String,
    },
    /// Encoding or decoding a Raft message failed.
    #[error("raft codec: {reason}")]
    Codec {
        /// Decoder message.
        reason: String,
    },
    /// Local storage failed.
    #[error(transparent)]
    Store(#[from] mailbox_storage::StoreError),
}

pub(crate) fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    bincode::serialize(v).expect("raft messages always serialize")
}

pub(crate) fn decode<T: for<'de> serde::Deserialize<'de>>(b: &[u8]) -> Result<T, RaftError> {
    bincode::deserialize(b).map_err(|e| RaftError::Codec {
        reason: e.to_string(),
    })
}
