//! Identifiers, domain structs and input validation shared by every crate of
//! the mailbox cluster.
//!
//! Everything here is pure data: no I/O, no async. Validation lives here so
//! that every entry point (gRPC, CLI, later SFTP/FTP/HTTP) rejects the same bad
//! input with the same message before anything is written.

pub mod account;
pub mod event;
pub mod hlc;
pub mod human;
pub mod message;
pub mod path;
pub mod pattern;

pub use event::{
    validate_event_name, Attempt, AttemptOutcome, Event, EventId, EventMessage, EventOrdering,
    EventRule, EventStatus, Lease, RetryPolicy, WebhookSink,
};
pub use hlc::{Hlc, Stamp};
pub use human::{ByteSize, HumanDuration};
pub use message::{
    Digest, MailboxRecord, MessageId, MessageMeta, Payload, SegmentMeta, DIGEST_LEN,
};
pub use path::{validate_message_name, MailboxPath, MAX_NAME_LEN, MAX_PATH_LEN};
pub use pattern::{NameGlob, PathPattern};

/// Identifier of a node inside one data center's Raft group.
pub type NodeId = u64;

/// Errors from parsing or validating user-supplied values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TypesError {
    /// A value failed validation; `field` names what was wrong, `reason` why.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field or kind of value, e.g. `mailbox path`.
        field: &'static str,
        /// Human-readable reason.
        reason: String,
    },
}

impl TypesError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        TypesError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
