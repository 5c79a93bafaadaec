//! The server's error enum and its one conversion to `tonic::Status`.
//!
//! Every variant has a stable machine-readable code, sent in the
//! `x-mailbox-error` metadata next to the gRPC status, so clients can act on
//! it without parsing messages. The conversion also counts every failed
//! request by that code (`mailbox_requests_failed_total`).

use mailbox_raft::RaftError;
use mailbox_segments::SegmentError;
use mailbox_state::StateError;
use mailbox_types::TypesError;
use tonic::{Code, Status};

/// Configuration problems found at startup.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {reason}")]
    Read {
        /// File path.
        path: String,
        /// OS error.
        reason: String,
    },
    /// The file is not valid TOML for a node config.
    #[error("cannot parse config {path}: {reason}")]
    Parse {
        /// File path.
        path: String,
        /// Parser message with line and column.
        reason: String,
    },
    /// A field has a value the node cannot run with.
    #[error("invalid config field `{field}`: {reason}")]
    Invalid {
        /// Kebab-case field name.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

/// Errors returned by the node's services.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request is malformed.
    #[error("{reason}")]
    InvalidArgument {
        /// What is wrong.
        reason: String,
    },
    /// A mailbox or message does not exist.
    #[error("{what} not found")]
    NotFound {
        /// What was looked for.
        what: String,
    },
    /// The mailbox or message exists already.
    #[error("{what} already exists")]
    AlreadyExists {
        /// What exists.
        what: String,
    },
    /// The payload did not match the SHA-256 the client declared.
    #[error("checksum mismatch: declared sha256 {declared}, received data has {actual}")]
    ChecksumMismatch {
        /// Declared digest (hex).
        declared: String,
        /// Digest of the bytes received (hex).
        actual: String,
    },
    /// The upload stream ended before its trailer, or sizes disagree.
    #[error("upload truncated: {reason}; nothing was stored")]
    Truncated {
        /// Details.
        reason: String,
    },
    /// Stored payload bytes are missing or damaged.
    #[error("payload damaged: {reason}")]
    PayloadDamaged {
        /// Details.
        reason: String,
    },
    /// The system is not in the state the operation requires (an admin
    /// recovery asked for where it does not apply).
    #[error("{reason}")]
    FailedPrecondition {
        /// Details.
        reason: String,
    },
    /// No leader right now; retry.
    #[error("temporarily unavailable: {reason}")]
    Unavailable {
        /// Details.
        reason: String,
    },
    /// Not the leader; ask `leader_addr`.
    #[error("not the leader (leader: {leader_addr:?})")]
    NotLeader {
        /// Leader id if known.
        leader: Option<u64>,
        /// Leader address if known.
        leader_addr: Option<String>,
    },
    /// A bug or a local storage failure.
    #[error("internal error: {reason}")]
    Internal {
        /// Details.
        reason: String,
    },
}

impl ServiceError {
    /// Stable code for clients.
    pub fn code(&self) -> &'static str {
        match self {
            ServiceError::InvalidArgument { .. } => "invalid_argument",
            ServiceError::NotFound { .. } => "not_found",
            ServiceError::AlreadyExists { .. } => "already_exists",
            ServiceError::ChecksumMismatch { .. } => "checksum_mismatch",
            ServiceError::Truncated { .. } => "truncated",
            ServiceError::PayloadDamaged { .. } => "payload_damaged",
            ServiceError::FailedPrecondition { .. } => "failed_precondition",
            ServiceError::Unavailable { .. } => "unavailable",
            ServiceError::NotLeader { .. } => "not_leader",
            ServiceError::Internal { .. } => "internal",
        }
    }

    /// Shorthand for an invalid-argument error.
    pub fn invalid(reason: impl Into<String>) -> Self {
        ServiceError::InvalidArgument {
            reason: reason.into(),
        }
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        let code = match &e {
            ServiceError::InvalidArgument { .. } | ServiceError::Truncated { .. } => {
                Code::InvalidArgument
            }
            ServiceError::NotFound { .. } => Code::NotFound,
            ServiceError::AlreadyExists { .. } => Code::AlreadyExists,
            ServiceError::ChecksumMismatch { .. } | ServiceError::PayloadDamaged { .. } => {
                Code::DataLoss
            }
            ServiceError::Unavailable { .. } | ServiceError::NotLeader { .. } => Code::Unavailable,
            ServiceError::FailedPrecondition { .. } => Code::FailedPrecondition,
            ServiceError::Internal { .. } => Code::Internal,
        };
        crate::metrics::COUNTERS.request_failed(e.code());
        let mut s = Status::new(code, e.to_string());
        let md = s.metadata_mut();
        md.insert("x-mailbox-error", e.code().parse().expect("ascii code"));
        if let ServiceError::NotLeader {
            leader_addr: Some(addr),
            ..
        } = &e
        {
            if let Ok(v) = addr.parse() {
                md.insert("x-mailbox-leader", v);
            }
        }
        s
    }
}

impl From<TypesError> for ServiceError {
    fn from(e: TypesError) -> Self {
        ServiceError::invalid(e.to_string())
    }
}

impl From<StateError> for ServiceError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::MailboxNotFound { path } | StateError::ParentNotFound { path } => {
                ServiceError::NotFound {
                    what: format!("mailbox {path}"),
                }
            }
            StateError::MessageNotFound { id } => ServiceError::NotFound {
                what: format!("message {id}"),
            },
            StateError::MailboxExists { path } => ServiceError::AlreadyExists {
                what: format!("mailbox {path}"),
            },
            StateError::MessageExists { id } => ServiceError::AlreadyExists {
                what: format!("message {id}"),
            },
            // Retrying the upload (a new id) is what helps.
            e @ (StateError::SegmentsCollected { .. } | StateError::Installing) => {
                ServiceError::Unavailable {
                    reason: e.to_string(),
                }
            }
            StateError::Invalid { reason } => ServiceError::InvalidArgument { reason },
            StateError::RuleNotFound { name } => ServiceError::NotFound {
                what: format!("rule {name}"),
            },
            StateError::EventNotFound { id } => ServiceError::NotFound {
                what: format!("event {id}"),
            },
            StateError::AccountNotFound { what } => ServiceError::NotFound { what },
            e @ (StateError::LeaseLost { .. }
            | StateError::HandledElsewhere { .. }
            | StateError::HandlerHeard { .. }) => ServiceError::FailedPrecondition {
                reason: e.to_string(),
            },
            e @ (StateError::Corrupt { .. }
            | StateError::Read { .. }
            | StateError::FeedGap { .. }
            | StateError::OwnFeed { .. }
            | StateError::FeedIdentityChanged { .. }) => ServiceError::Internal {
                reason: e.to_string(),
            },
        }
    }
}

impl From<RaftError> for ServiceError {
    fn from(e: RaftError) -> Self {
        match e {
            RaftError::Unavailable { reason } => ServiceError::Unavailable { reason },
            RaftError::NotLeader {
                leader,
                leader_addr,
            } => ServiceError::NotLeader {
                leader,
                leader_addr,
            },
            e => ServiceError::Internal {
                reason: e.to_string(),
            },
        }
    }
}

impl From<SegmentError> for ServiceError {
    fn from(e: SegmentError) -> Self {
        match e {
            e @ (SegmentError::NotFound { .. } | SegmentError::OutOfRange { .. }) => {
                ServiceError::PayloadDamaged {
                    reason: e.to_string(),
                }
            }
            e => ServiceError::Internal {
                reason: e.to_string(),
            },
        }
    }
}
