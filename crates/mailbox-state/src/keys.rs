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
