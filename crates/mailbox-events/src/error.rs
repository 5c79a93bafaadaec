//! The events service's error enum and its one conversion to `tonic::Status`.

use mailbox_raft::RaftError;
use mailbox_state::StateError;
use mailbox_types::TypesError;
use tonic::{Code, Status};

/// Errors of the events service. Each has a stable code, sent in the
/// `x-mailbox-error` metadata as the mailbox API's errors are.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    /// The request is malformed (a bad rule, pattern, status, id).
    #[error("{reason}")]
    InvalidArgument {
        /// What is wrong.
        reason: String,
    },
    /// No such rule or event.
    #[error("{what} not found")]
    NotFound {
        /// What was looked for.
        what: String,
    },
    /// An answer to a delivery that is no longer leased.
    #[error("{reason}")]
    LeaseLost {
        /// Where the event is now.
        reason: String,
    },
    /// The queue's events are handled by another DC.
    #[error("{reason}")]
    HandledElsewhere {
        /// Which DC, and what to do.
        reason: String,
    },
    /// A takeover from a DC heard from lately (it may still deliver).
    #[error("{reason}")]
    HandlerHeard {
        /// Which DC, and what to do.
        reason: String,
    },
    /// The logged-in user may not do this.
    #[error("{reason}")]
    PermissionDenied {
        /// What was refused.
        reason: String,
    },
    /// No leader, or the outcome of a write is unknown: retry.
    #[error("temporarily unavailable: {reason}")]
    Unavailable {
        /// Details.
        reason: String,
    },
    /// A bug or a local storage failure.
    #[error("internal error: {reason}")]
    Internal {
        /// Details.
        reason: String,
    },
}

impl EventsError {
    /// Stable code for clients.
    pub fn code(&self) -> &'static str {
        match self {
            EventsError::InvalidArgument { .. } => "invalid_argument",
            EventsError::NotFound { .. } => "not_found",
            EventsError::LeaseLost { .. } => "lease_lost",
            EventsError::HandledElsewhere { .. } => "handled_elsewhere",
            EventsError::HandlerHeard { .. } => "handler_heard",
            EventsError::PermissionDenied { .. } => "permission_denied",
            EventsError::Unavailable { .. } => "unavailable",
            EventsError::Internal { .. } => "internal",
        }
    }

    /// Shorthand for an invalid-argument error.
    pub fn invalid(reason: impl Into<String>) -> Self {
        EventsError::InvalidArgument {
            reason: reason.into(),
        }
    }

    /// The HTTP status of this error (the HTTP API's one conversion).
    pub fn http_status(&self) -> u16 {
        match self {
            EventsError::InvalidArgument { .. } => 400,
            EventsError::NotFound { .. } => 404,
            EventsError::LeaseLost { .. } => 409,
            EventsError::HandledElsewhere { .. } => 421,
            EventsError::HandlerHeard { .. } => 409,
            EventsError::PermissionDenied { .. } => 403,
            EventsError::Unavailable { .. } => 503,
            EventsError::Internal { .. } => 500,
        }
    }
}

impl From<EventsError> for Status {
    fn from(e: EventsError) -> Status {
        let code = match &e {
            EventsError::InvalidArgument { .. } => Code::InvalidArgument,
            EventsError::NotFound { .. } => Code::NotFound,
            EventsError::LeaseLost { .. }
            | EventsError::HandledElsewhere { .. }
            | EventsError::HandlerHeard { .. } => Code::FailedPrecondition,
            EventsError::PermissionDenied { .. } => Code::PermissionDenied,
            EventsError::Unavailable { .. } => Code::Unavailable,
            EventsError::Internal { .. } => Code::Internal,
        };
        let mut s = Status::new(code, e.to_string());
        s.metadata_mut()
            .insert("x-mailbox-error", e.code().parse().expect("ascii code"));
        s
    }
}

impl From<TypesError> for EventsError {
    fn from(e: TypesError) -> Self {
        EventsError::invalid(e.to_string())
    }
}

impl From<StateError> for EventsError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::Invalid { reason } => EventsError::InvalidArgument { reason },
            e @ (StateError::RuleNotFound { .. }
            | StateError::EventNotFound { .. }
            | StateError::MessageNotFound { .. }
            | StateError::MailboxNotFound { .. }) => EventsError::NotFound {
                what: e
                    .to_string()
                    .trim_end_matches(" does not exist")
                    .to_string(),
            },
            e @ StateError::LeaseLost { .. } => EventsError::LeaseLost {
                reason: e.to_string(),
            },
            e @ StateError::HandledElsewhere { .. } => EventsError::HandledElsewhere {
                reason: e.to_string(),
            },
            e @ StateError::HandlerHeard { .. } => EventsError::HandlerHeard {
                reason: e.to_string(),
            },
            e @ StateError::Installing => EventsError::Unavailable {
                reason: e.to_string(),
            },
            e => EventsError::Internal {
                reason: e.to_string(),
            },
        }
    }
}

impl From<RaftError> for EventsError {
    fn from(e: RaftError) -> Self {
        match e {
            RaftError::Unavailable { reason } => EventsError::Unavailable { reason },
            e @ RaftError::NotLeader { .. } => EventsError::Unavailable {
                reason: e.to_string(),
            },
            e => EventsError::Internal {
                reason: e.to_string(),
            },
        }
    }
}
