//! Messages: identity, metadata and where the payload lives.
//!
//! Payloads are immutable once committed: a message's size, digest and
//! segment list never change, which is what lets any node (and later any DC)
//! serve or copy them without coordination.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

use crate::{MailboxPath, TypesError};

/// Length of a SHA-256 digest in bytes.
pub const DIGEST_LEN: usize = 32;

/// Message identifier: a UUID v7, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MessageId(pub Uuid);

impl MessageId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        MessageId(Uuid::now_v7())
    }

    /// The 16 big-endian bytes, which sort like the id.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// Rebuilds an id from [`MessageId::as_bytes`].
    pub fn from_bytes(b: [u8; 16]) -> Self {
        MessageId(Uuid::from_bytes(b))
    }

    /// Milliseconds since the epoch embedded in a v7 id (0 for other versions).
    pub fn timestamp_ms(&self) -> i64 {
        self.0
            .get_timestamp()
            .map(|t| {
                let (s, n) = t.to_unix();
                s as i64 * 1000 + n as i64 / 1_000_000
            })
            .unwrap_or(0)
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl FromStr for MessageId {
    type Err = TypesError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(MessageId)
            .map_err(|e| TypesError::invalid("message id", format!("{s:?}: {e}")))
    }
}

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Digest(pub [u8; DIGEST_LEN]);

impl Digest {
    /// Digest of a byte slice.
    pub fn of(data: &[u8]) -> Self {
        Digest(Sha256::digest(data).into())
    }

    /// Lower-case hex form.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Result<Self, TypesError> {
        let mut out = [0u8; DIGEST_LEN];
        hex::decode_to_slice(s.trim(), &mut out).map_err(|e| {
            TypesError::invalid("sha256", format!("{s:?} is not 64 hex characters: {e}"))
        })?;
        Ok(Digest(out))
    }
}

impl From<Sha256> for Digest {
    fn from(h: Sha256) -> Self {
        Digest(h.finalize().into())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// One stored segment of a large payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentMeta {
    /// Position in the payload, from 0.
    pub index: u32,
    /// Bytes in this segment.
    pub size: u64,
    /// SHA-256 of this segment's bytes.
    pub sha256: Digest,
}

/// Where a message's bytes live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    /// In the DC log, next to the metadata.
    Inline,
    /// In the DC's segment store; every segment but the last is `segment_size` long.
    Segments {
        /// Nominal segment length used when the payload was cut.
        segment_size: u64,
        /// Segments in order.
        segments: Vec<SegmentMeta>,
    },
}

/// Committed metadata of one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageMeta {
    /// Unique, time-ordered id.
    pub id: MessageId,
    /// Mailbox the message is in.
    pub mailbox: MailboxPath,
    /// File name given by the uploader.
    pub name: String,
    /// Payload length in bytes.
    pub size: u64,
    /// SHA-256 of the whole payload.
    pub sha256: Digest,
    /// Creation time, ms since the epoch, chosen by the accepting node.
    pub created_ms: i64,
    /// Data center that accepted the upload.
    pub origin_dc: String,
    /// User attributes.
    pub attributes: BTreeMap<String, String>,
    /// Where the bytes are.
    pub payload: Payload,
}

impl MessageMeta {
    /// Segments of the payload (empty for inline payloads).
    pub fn segments(&self) -> &[SegmentMeta] {
        match &self.payload {
            Payload::Inline => &[],
            Payload::Segments { segments, .. } => segments,
        }
    }
}

/// A mailbox as stored in the state machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxRecord {
    /// Its path.
    pub path: MailboxPath,
    /// Creation time, ms since the epoch.
    pub created_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_roundtrip_and_order() {
        let a = MessageId::new();
        let b = MessageId::new();
        assert!(a < b);
        assert!(a.as_bytes() < b.as_bytes());
        assert_eq!(a, a.to_string().parse().unwrap());
        assert_eq!(a, MessageId::from_bytes(*a.as_bytes()));
        assert!((a.timestamp_ms() - crate::now_ms()).abs() < 5_000);
        assert!("nope".parse::<MessageId>().is_err());
    }

    #[test]
    fn digest_hex() {
        let d = Digest::of(b"abc");
        assert_eq!(
            d.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(Digest::from_hex(&d.to_hex()).unwrap(), d);
        assert!(Digest::from_hex("abc").is_err());
    }
}
