//! Hybrid logical clock stamps for last-writer-wins fields.
//!
//! Payloads are immutable; the few mutable fields of a message (attributes
//! today, later extraction count and event status) are registers where the
//! write with the greatest [`Stamp`] wins in every DC. A stamp is a hybrid
//! logical clock reading (wall-clock milliseconds plus a logical counter that
//! breaks ties and survives clocks running backwards) and the writing DC's
//! name as the final tie-break, so any two stamps from different writes
//! compare unequal and all DCs pick the same winner whatever order the
//! writes arrive in.

use serde::{Deserialize, Serialize};

/// A hybrid logical clock reading. Orders by wall time, then counter.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Hlc {
    /// Milliseconds since the epoch (the largest wall time seen).
    pub wall_ms: i64,
    /// Events at the same `wall_ms`.
    pub logical: u32,
}

impl Hlc {
    /// A reading at wall time `wall_ms` with no logical component.
    pub fn at(wall_ms: i64) -> Self {
        Hlc {
            wall_ms,
            logical: 0,
        }
    }

    /// The stamp for a local event at physical time `now_ms` after having
    /// seen `self`: strictly greater than `self`, and equal to `now_ms` when
    /// the physical clock is ahead.
    pub fn tick(self, now_ms: i64) -> Hlc {
        if now_ms > self.wall_ms {
            Hlc::at(now_ms)
        } else {
            Hlc {
                wall_ms: self.wall_ms,
                logical: self.logical.saturating_add(1),
            }
        }
    }
}

/// Who wrote a last-writer-wins value, and when: the order decides the winner.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    /// Clock reading of the write.
    pub hlc: Hlc,
    /// DC that accepted the write (tie-break).
    pub dc: String,
}

impl Stamp {
    /// A stamp for a write at `hlc` in `dc`.
    pub fn new(hlc: Hlc, dc: impl Into<String>) -> Self {
        Stamp { hlc, dc: dc.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_is_monotonic_even_when_the_clock_goes_back() {
        let a = Hlc::at(100);
        assert_eq!(a.tick(150), Hlc::at(150));
        let b = a.tick(90);
        assert!(b > a);
        assert_eq!(
            b,
            Hlc {
                wall_ms: 100,
                logical: 1
            }
        );
        assert!(b.tick(100) > b);
    }

    #[test]
    fn stamps_order_by_clock_then_dc() {
        let e = Stamp::new(Hlc::at(5), "east");
        let w = Stamp::new(Hlc::at(5), "west");
        assert!(w > e, "same clock: DC name breaks the tie");
        let later = Stamp::new(
            Hlc {
                wall_ms: 5,
                logical: 1,
            },
            "east",
        );
        assert!(later > w, "clock first");
    }
}
