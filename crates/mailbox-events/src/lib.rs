//! Event delivery: the `mailbox.v1.Events` gRPC service (rules, listings,
//! leases, answers, the dead-letter queue), consumer subscriptions, and the
//! leader's sweep of leases that ran out.
//!
//! Event *state* and its transitions live in `mailbox_state::events`,
//! deterministic and in the DC log; this crate only proposes commands
//! (with the time and randomness they need) and reads the applied state.
//! Nothing here keeps work only in memory: a subscription that dies, or a
//! node that crashes, leaves leases that run out and are delivered again.

mod convert;
mod error;
pub mod http;
pub mod notify;
mod service;
pub mod webhook;

pub use convert::{event_info, rule_from, rule_info};
pub use error::EventsError;
pub use service::{expire_leases, EventsService, DEFAULT_IN_FLIGHT, MAX_IN_FLIGHT};
