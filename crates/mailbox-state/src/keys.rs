//! Key layout of the state column family.
//!
//! One leading tag byte per record kind; mailbox paths never contain NUL, so
//! NUL separates a path from what follows. Message ids are 16 big-endian bytes
//! (UUID v7), so a mailbox's listing keys sort oldest first.
//!
//! | tag | key                         | value                   |
//! |-----|-----------------------------|-------------------------|
//! | `M` | path                        | `MailboxRecord`         |
//! | `m` | id                          | `MessageMeta`           |
//! | `p` | id                          | inline payload bytes    |
//! | `l` | path NUL id                 | empty (listing index)   |
//! | `k` | path NUL idempotency-key    | id                      |
//! | `K` | id                          | idempotency key         |
//! | `f` | seq (u64 BE)                | `FeedRecord` (own feed) |
//! | `F` |                             | last own feed seq       |
//! | `c` | origin DC                   | last applied remote seq |
//! | `h` | id dc                       | held-since ms           |
//! | `x` | id                          | empty: payload missing  |
//! | `q` | id                          | all-DCs-complete ms     |
//! | `t` | id                          | `Tombstone`             |
//! | `a` | id                          | attribute LWW registers |
//! | `H` |                             | largest HLC seen        |
//! | `s` | id                          | metadata arrived (ms)   |
//! | `C` |                             | cluster DC names        |
//! | `g` | id                          | `Gone`: deleted message |
//! | `e` | ms (i64 BE) tag id          | empty: expiry index     |
//! | `o` | id                          | `Orphan`: condemned     |
//! | `I` |                             | this DC's feed identity |
//! | `u` | id (kept duplicate)         | id of its newer twin    |
//! | `i` | origin DC                   | its feed identity seen  |
//! | `r` | remote DC                   | its cursor on own feed  |
//! | `T` |                             | own feed trimmed up to  |
//! | `G` | id                          | settled delete re-acked |
//! | `R` | rule name                   | `RuleRecord` (LWW)      |
//! | `E` | event id                    | `Event`                 |
//! | `v` | message id, rule name       | event id                |
//! | `w` | queue NUL lane NUL ms id    | empty: due index        |
//! | `O` | queue NUL lane NUL path NUL seq id | event id: mailbox order |
//! | `y` | status, queue NUL event id  | empty: status index     |
//! | `S` | queue                       | `QueueCounts`           |
//! | `L` | queue NUL lane NUL ms id    | empty: lease ends then  |
//! | `P` | id                          | empty: origin, incomplete |
//! | `U` | rule name                   | `Stamp` of its delete   |
//! | `Y` | queue NUL consumer          | its last lease request  |
//! | `X` | DC name                     | `Suspension` (LWW)      |
//! | `V` |                             | completion re-check cursor |
//! | `Q` | queue                       | `QueueOwner` (LWW)      |
//! | `Z` | ms (BE) event id            | empty: finished events  |
//! | `N` | ms (BE) event id            | empty: dead-letter to notify |
//! | `W` | queue NUL lane NUL path NUL | u32: chain events running |
//! | `A` | queue                       | re-announce cursor      |
//!
//! An event's *lane* is the DC that raised it (its message's origin). The
//! due, lease-end and order indexes are split by lane, so a DC reads only
//! the lanes it handles: its own, or every lane of a queue it took over.

use mailbox_types::{MailboxPath, MessageId};

use crate::StateError;

/// Prefix of mailbox records.
pub const MAILBOX: u8 = b'M';
/// Prefix of message metadata.
pub const MESSAGE: u8 = b'm';
/// Prefix of inline payloads.
pub const INLINE: u8 = b'p';
/// Prefix of per-mailbox listing entries.
pub const LISTING: u8 = b'l';

fn tagged(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + parts.iter().map(|p| p.len()).sum::<usize>());
    k.push(tag);
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

/// Key of a mailbox record.
pub fn mailbox(p: &MailboxPath) -> Vec<u8> {
    tagged(MAILBOX, &[p.as_str().as_bytes()])
}

/// Key of a message's metadata.
pub fn message(id: &MessageId) -> Vec<u8> {
    tagged(MESSAGE, &[id.as_bytes()])
}

/// Key of an inline payload.
pub fn inline(id: &MessageId) -> Vec<u8> {
    tagged(INLINE, &[id.as_bytes()])
}

/// Prefix of all listing entries of one mailbox.
pub fn listing_prefix(p: &MailboxPath) -> Vec<u8> {
    tagged(LISTING, &[p.as_str().as_bytes(), b"\0"])
}

/// Listing entry of one message.
pub fn listing(p: &MailboxPath, id: &MessageId) -> Vec<u8> {
    tagged(LISTING, &[p.as_str().as_bytes(), b"\0", id.as_bytes()])
}

/// Idempotency key → message id.
pub fn idempotency(p: &MailboxPath, key: &str) -> Vec<u8> {
    tagged(b'k', &[p.as_str().as_bytes(), b"\0", key.as_bytes()])
}

/// Message id → its idempotency key.
pub fn message_idempotency(id: &MessageId) -> Vec<u8> {
    tagged(b'K', &[id.as_bytes()])
}

/// Decodes a 16-byte id value stored under `key`.
pub fn decode_id(key: &[u8], v: &[u8]) -> Result<MessageId, StateError> {
    let b: [u8; 16] = v.try_into().map_err(|_| StateError::Corrupt {
        key: hex(key),
        reason: format!("expected 16-byte id, got {} bytes", v.len()),
    })?;
    Ok(MessageId::from_bytes(b))
}

/// Hex dump of a key, for error messages.
pub fn hex(k: &[u8]) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}

/// Own feed record `seq`.
pub fn feed(seq: u64) -> Vec<u8> {
    tagged(b'f', &[&seq.to_be_bytes()])
}

/// Prefix of the own feed.
pub const FEED_PREFIX: &[u8] = b"f";

/// Last assigned own feed sequence number.
pub const FEED_SEQ: &[u8] = b"F";

/// Cluster DC list.
pub const CLUSTER_DCS: &[u8] = b"C";

/// What this DC last heard from `origin`'s feed and when
/// (`replication::PeerHeard`).
pub fn heard(origin: &str) -> Vec<u8> {
    tagged(b'j', &[origin.as_bytes()])
}

/// Cursor of a remote DC's feed.
pub fn cursor(origin: &str) -> Vec<u8> {
    tagged(b'c', &[origin.as_bytes()])
}

/// Prefix of the holders of a message.
pub fn holders_prefix(id: &MessageId) -> Vec<u8> {
    tagged(b'h', &[id.as_bytes()])
}

/// "DC `dc` holds message `id`".
pub fn holder(id: &MessageId, dc: &str) -> Vec<u8> {
    tagged(b'h', &[id.as_bytes(), dc.as_bytes()])
}

/// Prefix of the missing-payload index.
pub const MISSING_PREFIX: &[u8] = b"x";

/// Missing-payload index entry.
pub fn missing(id: &MessageId) -> Vec<u8> {
    tagged(b'x', &[id.as_bytes()])
}

/// All-DCs-complete time of a message.
pub fn complete(id: &MessageId) -> Vec<u8> {
    tagged(b'q', &[id.as_bytes()])
}

/// Tombstone of a deleted message.
pub fn tombstone(id: &MessageId) -> Vec<u8> {
    tagged(b't', &[id.as_bytes()])
}

/// Prefix of all tombstones.
pub const TOMBSTONE_PREFIX: &[u8] = b"t";

/// Last-writer-wins registers of a message's attributes.
pub fn attributes(id: &MessageId) -> Vec<u8> {
    tagged(b'a', &[id.as_bytes()])
}

/// Largest hybrid logical clock reading this DC has seen.
pub const MAX_HLC: &[u8] = b"H";

/// When a replicated message's metadata arrived here.
pub fn metadata_since(id: &MessageId) -> Vec<u8> {
    tagged(b's', &[id.as_bytes()])
}

/// What remains of a deleted message for the idempotency retention: a
/// replayed proposal of it is recognised, and its key still answers.
pub fn gone(id: &MessageId) -> Vec<u8> {
    tagged(b'g', &[id.as_bytes()])
}

/// Prefix of the expiry index.
pub const EXPIRY_PREFIX: &[u8] = b"e";

/// Expiry index tag of a [`gone`] record.
pub const EXPIRE_GONE: u8 = b'g';
/// Expiry index tag of an [`orphan`] record.
pub const EXPIRE_ORPHAN: u8 = b'o';

/// Expiry index entry: `what`'s record of `id` may be forgotten after `ms`.
pub fn expiry(ms: i64, what: u8, id: &MessageId) -> Vec<u8> {
    tagged(
        b'e',
        &[&(ms.max(0) as u64).to_be_bytes(), &[what], id.as_bytes()],
    )
}

/// Decodes an [`expiry`] key into `(ms, tag, id)`.
pub fn decode_expiry(k: &[u8]) -> Result<(i64, u8, MessageId), StateError> {
    if k.len() != 1 + 8 + 1 + 16 {
        return Err(StateError::Corrupt {
            key: hex(k),
            reason: "bad expiry key".into(),
        });
    }
    let ms = u64::from_be_bytes(k[1..9].try_into().expect("8 bytes")) as i64;
    let id = decode_id(k, &k[10..])?;
    Ok((ms, k[9], id))
}

/// Segments of message `id` condemned (or collected) by the orphan collector.
pub fn orphan(id: &MessageId) -> Vec<u8> {
    tagged(b'o', &[id.as_bytes()])
}

/// Prefix of orphan records.
pub const ORPHAN_PREFIX: &[u8] = b"o";

/// This DC's feed identity.
pub const FEED_IDENTITY: &[u8] = b"I";

/// The feed identity of `origin` this DC's cursor on it belongs to.
pub fn feed_identity(origin: &str) -> Vec<u8> {
    tagged(b'i', &[origin.as_bytes()])
}

/// A duplicate removed once the message `kept` it duplicates is held here.
pub fn merge(kept: &MessageId) -> Vec<u8> {
    tagged(b'u', &[kept.as_bytes()])
}

/// How far remote DC `dc` has applied this DC's feed, as it reported.
pub fn feed_ack(dc: &str) -> Vec<u8> {
    tagged(b'r', &[dc.as_bytes()])
}

/// Prefix of [`feed_ack`] records.
pub const FEED_ACK_PREFIX: &[u8] = b"r";

/// Own feed records up to this sequence number are trimmed.
pub const FEED_FLOOR: &[u8] = b"T";

/// This DC acknowledged again the settled delete of `id` (once).
pub fn reacked(id: &MessageId) -> Vec<u8> {
    tagged(b'G', &[id.as_bytes()])
}

/// Event rule `name` (a last-writer-wins register; deleted rules stay as
/// stamped tombstones so an older write arriving late loses).
pub fn rule(name: &str) -> Vec<u8> {
    tagged(b'R', &[name.as_bytes()])
}

/// Prefix of event rules.
pub const RULE_PREFIX: &[u8] = b"R";

/// An event.
pub fn event(id: &mailbox_types::EventId) -> Vec<u8> {
    tagged(b'E', &[id.as_bytes()])
}

/// Prefix of events.
pub const EVENT_PREFIX: &[u8] = b"E";

/// Message `id`'s event for rule `rule`.
pub fn message_event(id: &MessageId, rule: &str) -> Vec<u8> {
    tagged(b'v', &[id.as_bytes(), rule.as_bytes()])
}

/// Prefix of message `id`'s events.
pub fn message_events_prefix(id: &MessageId) -> Vec<u8> {
    tagged(b'v', &[id.as_bytes()])
}

/// Prefix of lane `lane` of queue `q`'s due index.
pub fn due_prefix(q: &str, lane: &str) -> Vec<u8> {
    tagged(b'w', &[q.as_bytes(), b"\0", lane.as_bytes(), b"\0"])
}

/// Due-index entry: event `id` of lane `lane` of queue `q` is due at `ms`
/// (deliverable when pending, its lease runs out when processing).
pub fn due(q: &str, lane: &str, ms: i64, id: &mailbox_types::EventId) -> Vec<u8> {
    let mut k = due_prefix(q, lane);
    k.extend_from_slice(&(ms.max(0) as u64).to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// Decodes a [`due`] key of queue prefix length `plen` into `(ms, id)`.
pub fn decode_due(k: &[u8], plen: usize) -> Result<(i64, mailbox_types::EventId), StateError> {
    if k.len() != plen + 8 + 16 {
        return Err(StateError::Corrupt {
            key: hex(k),
            reason: "bad due key".into(),
        });
    }
    let ms = u64::from_be_bytes(k[plen..plen + 8].try_into().expect("8 bytes")) as i64;
    let id: [u8; 16] = k[plen + 8..].try_into().expect("16 bytes");
    Ok((ms, mailbox_types::EventId::from_bytes(id)))
}

/// Prefix of the order chain of mailbox `p`'s events of lane `lane` in
/// queue `q`.
pub fn order_prefix(q: &str, lane: &str, p: &MailboxPath) -> Vec<u8> {
    tagged(
        b'O',
        &[
            q.as_bytes(),
            b"\0",
            lane.as_bytes(),
            b"\0",
            p.as_str().as_bytes(),
            b"\0",
        ],
    )
}

/// Order-chain entry of the event its lane raised `seq`th in queue `q`.
pub fn order(
    q: &str,
    lane: &str,
    p: &MailboxPath,
    seq: u64,
    id: &mailbox_types::EventId,
) -> Vec<u8> {
    let mut k = order_prefix(q, lane, p);
    k.extend_from_slice(&seq.to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// Prefix of the status index for `status` (a one-byte code).
pub fn status_prefix(status: u8) -> Vec<u8> {
    vec![b'y', status]
}

/// Prefix of the status index for `status` in queue `q`.
pub fn status_queue_prefix(status: u8, q: &str) -> Vec<u8> {
    tagged(b'y', &[&[status], q.as_bytes(), b"\0"])
}

/// Status-index entry of event `id` of queue `q`.
pub fn status(status: u8, q: &str, id: &mailbox_types::EventId) -> Vec<u8> {
    tagged(b'y', &[&[status], q.as_bytes(), b"\0", id.as_bytes()])
}

/// Per-queue counts (and the raise sequence) of queue `q`.
pub fn queue(q: &str) -> Vec<u8> {
    tagged(b'S', &[q.as_bytes()])
}

/// Prefix of queue records.
pub const QUEUE_PREFIX: &[u8] = b"S";

/// Prefix of the lease-end index of lane `lane` of queue `q`.
pub fn lease_end_prefix(q: &str, lane: &str) -> Vec<u8> {
    tagged(b'L', &[q.as_bytes(), b"\0", lane.as_bytes(), b"\0"])
}

/// Lease-end index entry: event `id`'s lease runs out at `ms` (per queue
/// and lane, in time order, so the sweep reads only what is due).
pub fn lease_end(q: &str, lane: &str, ms: i64, id: &mailbox_types::EventId) -> Vec<u8> {
    let mut k = lease_end_prefix(q, lane);
    k.extend_from_slice(&(ms.max(0) as u64).to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// Who handles queue `q`'s events (a last-writer-wins register).
pub fn queue_owner(q: &str) -> Vec<u8> {
    tagged(b'Q', &[q.as_bytes()])
}

/// Prefix of [`queue_owner`] registers.
pub const QUEUE_OWNER_PREFIX: &[u8] = b"Q";

/// An origin message not yet held by every DC.
pub fn incomplete(id: &MessageId) -> Vec<u8> {
    tagged(b'P', &[id.as_bytes()])
}

/// Prefix of [`incomplete`] entries.
pub const INCOMPLETE_PREFIX: &[u8] = b"P";

/// The stamp of rule `name`'s delete (deleted rules live apart from the
/// rules in force, so reading those never wades through deletes).
pub fn rule_deleted(name: &str) -> Vec<u8> {
    tagged(b'U', &[name.as_bytes()])
}

/// Prefix of [`rule_deleted`] entries.
pub const RULE_DELETED_PREFIX: &[u8] = b"U";

/// Consumer `c`'s last lease request on queue `q` and what it was given
/// (a retried proposal of it is answered with the same events).
pub fn last_lease(c: &str, q: &str) -> Vec<u8> {
    tagged(b'Y', &[q.as_bytes(), b"\0", c.as_bytes()])
}

/// Whether DC `dc` is suspended from completion (a register).
pub fn suspension(dc: &str) -> Vec<u8> {
    tagged(b'X', &[dc.as_bytes()])
}

/// Prefix of [`suspension`] registers.
pub const SUSPENSION_PREFIX: &[u8] = b"X";

/// Where the re-check of incomplete origin messages stands (present while
/// one is due: after a DC was suspended or left the cluster).
pub const RECHECK: &[u8] = b"V";

/// Retention-index entry: event `id` finished (complete or discarded) with
/// its last change at `ms`; purged once older than the retention.
pub fn finished(ms: i64, id: &mailbox_types::EventId) -> Vec<u8> {
    tagged(b'Z', &[&(ms.max(0) as u64).to_be_bytes(), id.as_bytes()])
}

/// Prefix of [`finished`] entries.
pub const FINISHED_PREFIX: &[u8] = b"Z";

/// Notice outbox entry: event `id` of rule `rule` was dead-lettered at
/// `ms` by this DC and the rule's error webhook has not been told yet.
/// Grouped by rule, so a rule whose webhook is down for long holds back
/// only its own notices. (Rule names never hold a 0 byte.)
pub fn notice(rule: &str, ms: i64, id: &mailbox_types::EventId) -> Vec<u8> {
    tagged(
        b'N',
        &[
            rule.as_bytes(),
            &[0],
            &(ms.max(0) as u64).to_be_bytes(),
            id.as_bytes(),
        ],
    )
}

/// When this DC last applied an event command (lease, answer, expiry)
/// and its last gap without any (see `events::note_activity`).
pub const EVENT_ACTIVITY: &[u8] = b"J";

/// Prefix of one rule's [`notice`] entries.
pub fn notice_prefix(rule: &str) -> Vec<u8> {
    tagged(b'N', &[rule.as_bytes(), &[0]])
}

/// Prefix of every [`notice`] entry.
pub const NOTICE_PREFIX: &[u8] = b"N";

/// A sealed dead-letter notification of `rule`, by its `webhook-id`,
/// waiting to be delivered (see `Command::SealNotices`).
pub fn sealed(rule: &str, id: &str) -> Vec<u8> {
    tagged(b'B', &[rule.as_bytes(), &[0], id.as_bytes()])
}

/// Prefix of one rule's [`sealed`] entries.
pub fn sealed_prefix(rule: &str) -> Vec<u8> {
    tagged(b'B', &[rule.as_bytes(), &[0]])
}

/// Prefix of every [`sealed`] entry.
pub const SEALED_PREFIX: &[u8] = b"B";

/// How many events of the mailbox chain of `p`, lane `lane`, queue `q`
/// are deliverable or running (absent: none).
pub fn chain_runners(q: &str, lane: &str, p: &MailboxPath) -> Vec<u8> {
    tagged(
        b'W',
        &[
            q.as_bytes(),
            b"\0",
            lane.as_bytes(),
            b"\0",
            p.as_str().as_bytes(),
            b"\0",
        ],
    )
}

/// Where the re-announcement of a taken-over queue's events stands
/// (present while one is due).
pub fn announce(q: &str) -> Vec<u8> {
    tagged(b'A', &[q.as_bytes()])
}

/// Prefix of [`announce`] cursors.
pub const ANNOUNCE_PREFIX: &[u8] = b"A";

/// Prefix of the account registers (`accounts`): `D`, then `u` users,
/// `g` grants (user, NUL, mailbox), `t` tokens.
pub const ACCOUNT_PREFIX: &[u8] = b"D";

/// Key of an account register.
pub fn account(k: &mailbox_types::account::AccountKey) -> Vec<u8> {
    use mailbox_types::account::AccountKey;
    match k {
        AccountKey::User(u) => tagged(b'D', &[b"u", u.as_bytes()]),
        AccountKey::Grant(u, m) => {
            tagged(b'D', &[b"g", u.as_bytes(), b"\0", m.as_str().as_bytes()])
        }
        AccountKey::Token(t) => tagged(b'D', &[b"t", t.as_bytes()]),
    }
}

/// Prefix of one kind of account register (`u`, `g`, `t`).
pub fn account_kind_prefix(kind: u8) -> Vec<u8> {
    vec![b'D', kind]
}

/// Prefix of one user's grants.
pub fn account_grants_prefix(user: &str) -> Vec<u8> {
    tagged(b'D', &[b"g", user.as_bytes(), b"\0"])
}
