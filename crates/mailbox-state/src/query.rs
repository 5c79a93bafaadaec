//! Read-only queries over the committed state.

use mailbox_types::{MailboxPath, MailboxRecord, MessageId, MessageMeta};

use crate::{decode, keys, Gone, KvRead, Overlay, StateError};

/// A mailbox record, if it exists.
pub fn get_mailbox(kv: &dyn KvRead, p: &MailboxPath) -> Result<Option<MailboxRecord>, StateError> {
    let k = keys::mailbox(p);
    kv.get(&k)?.map(|v| decode(&k, &v)).transpose()
}

/// Mailboxes whose path starts with `prefix` (all when empty), in path order.
pub fn list_mailboxes(kv: &dyn KvRead, prefix: &str) -> Result<Vec<MailboxRecord>, StateError> {
    let mut p = vec![keys::MAILBOX];
    p.extend_from_slice(prefix.as_bytes());
    let mut out = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = kv.scan(&p, after.as_deref(), 1024)?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        for (k, v) in &page {
            out.push(decode(k, v)?);
        }
    }
    Ok(out)
}

/// A message's metadata, if it exists.
pub fn get_message(kv: &dyn KvRead, id: &MessageId) -> Result<Option<MessageMeta>, StateError> {
    let k = keys::message(id);
    kv.get(&k)?.map(|v| decode(&k, &v)).transpose()
}

/// The inline payload of a message, if it has one.
pub fn inline_payload(kv: &dyn KvRead, id: &MessageId) -> Result<Option<Vec<u8>>, StateError> {
    kv.get(&keys::inline(id))
}

/// Up to `limit` messages of `mailbox` with ids after `after`, oldest first.
pub fn list_messages(
    kv: &dyn KvRead,
    mailbox: &MailboxPath,
    after: Option<&MessageId>,
    limit: usize,
) -> Result<Vec<MessageMeta>, StateError> {
    let prefix = keys::listing_prefix(mailbox);
    let after_key = after.map(|id| keys::listing(mailbox, id));
    let entries = kv.scan(&prefix, after_key.as_deref(), limit)?;
    let mut out = Vec::with_capacity(entries.len());
    for (k, _) in entries {
        let id = keys::decode_id(&k, &k[prefix.len()..])?;
        // The listing entry and the message are written and removed in one
        // batch, so a missing message here would be corruption.
        let meta = get_message(kv, &id)?.ok_or_else(|| StateError::Corrupt {
            key: keys::hex(&k),
            reason: "listing entry without message".into(),
        })?;
        out.push(meta);
    }
    Ok(out)
}

/// What remains of a deleted message during the idempotency retention.
pub fn get_gone(kv: &dyn KvRead, id: &MessageId) -> Result<Option<Gone>, StateError> {
    crate::gone(kv, &Overlay::new(), id)
}

/// Whether the orphan collector condemned `id`'s segments and has not
/// confirmed their removal yet (nothing may write them meanwhile).
pub fn orphan_pending(kv: &dyn KvRead, id: &MessageId) -> Result<bool, StateError> {
    Ok(crate::orphan(kv, &Overlay::new(), id)?.is_some_and(|o| !o.collected))
}

/// This DC's feed identity, once the leader recorded it.
pub fn feed_identity(kv: &dyn KvRead) -> Result<Option<String>, StateError> {
    kv.get(keys::FEED_IDENTITY)?
        .map(|v| decode(keys::FEED_IDENTITY, &v))
        .transpose()
}

/// Ids the orphan collector condemned without confirming their removal
/// yet, with when (at most `limit`).
pub fn pending_orphans(kv: &dyn KvRead, limit: usize) -> Result<Vec<(MessageId, i64)>, StateError> {
    let mut out = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let rows = kv.scan(keys::ORPHAN_PREFIX, after.as_deref(), 1024)?;
        let Some((last, _)) = rows.last() else {
            return Ok(out);
        };
        after = Some(last.clone());
        for (k, v) in &rows {
            let o: crate::Orphan = decode(k, v)?;
            if !o.collected {
                out.push((keys::decode_id(k, &k[1..])?, o.at_ms));
                if out.len() >= limit {
                    return Ok(out);
                }
            }
        }
    }
}
