//! Integration and fault-injection suites for the mailbox cluster. The
//! suites live in `tests/`; each starts real `mailboxd` processes through
//! `mailbox-testkit` and tries to break one of the invariants in DESIGN.md.
