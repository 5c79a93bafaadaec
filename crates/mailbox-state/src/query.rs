//! Read-only queries over the committed state.

use mailbox_types::{MailboxPath, MailboxRecord, MessageId, MessageMeta};

use crate::{decode, keys, KvRead, StateError};

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
