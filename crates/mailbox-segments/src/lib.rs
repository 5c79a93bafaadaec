//! Segment store: where the payloads larger than the inline threshold live.
//!
//! A data center has one segment store shared by its nodes (a local directory
//! on one machine, NFS/GPFS in production, later S3). Payloads are cut into
//! segments; each is written under a temporary name, fsynced, renamed into
//! place and its directory fsynced, so a segment is either absent or whole.
//! Segments are immutable once written.
//!
//! Segments are written *before* their message is committed to the DC log, so
//! an aborted or crashed upload leaves orphans; [`SegmentStore::list_messages`]
//! lets the node's garbage collector find and remove them after a grace period.

mod fs;

use std::io;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use mailbox_types::{Digest, MessageId, SegmentMeta};

pub use fs::FsSegmentStore;

/// Errors from a segment store.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// I/O failed on `path` during `op`.
    #[error("segment store {op} on {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The segment does not exist.
    #[error("segment {index} of message {id} not found")]
    NotFound {
        /// Message id.
        id: MessageId,
        /// Segment index.
        index: u32,
    },
    /// The bytes written do not hash to the SHA-256 they were copied for;
    /// nothing was stored under the segment's name.
    #[error("segment {index} of message {id} does not match its SHA-256; not stored")]
    Mismatch {
        /// Message id.
        id: MessageId,
        /// Segment index.
        index: u32,
    },
    /// The requested range is outside the segment.
    #[error("range {offset}+{len} outside segment {index} of {id} ({size} bytes)")]
    OutOfRange {
        /// Message id.
        id: MessageId,
        /// Segment index.
        index: u32,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Actual size.
        size: u64,
    },
}

/// Writes one segment. Drop without [`SegmentWriter::finish`] leaves only a
/// temporary file, which garbage collection removes.
#[async_trait]
pub trait SegmentWriter: Send {
    /// Appends bytes.
    async fn write(&mut self, data: &[u8]) -> Result<(), SegmentError>;
    /// Appends a buffer the caller gives up, which a writer may keep
    /// instead of copying (an upload's received chunks).
    async fn write_bytes(&mut self, data: Bytes) -> Result<(), SegmentError> {
        self.write(&data).await
    }
    /// Makes the segment durable under its final name and returns its metadata.
    async fn finish(self: Box<Self>) -> Result<SegmentMeta, SegmentError>;
    /// Like [`SegmentWriter::finish`], but only if the bytes written hash to
    /// `expected`; otherwise nothing appears under the final name and the
    /// result is [`SegmentError::Mismatch`]. Copies from another DC are
    /// verified this way, with the hash the writer computes anyway, instead
    /// of a second pass over every byte.
    async fn finish_expecting(
        self: Box<Self>,
        expected: Digest,
    ) -> Result<SegmentMeta, SegmentError>;
}

/// A DC's store of payload segments.
#[async_trait]
pub trait SegmentStore: Send + Sync + 'static {
    /// Starts writing segment `index` of message `id`.
    async fn create(
        &self,
        id: MessageId,
        index: u32,
    ) -> Result<Box<dyn SegmentWriter>, SegmentError>;
    /// Reads `len` bytes at `offset` of a segment.
    async fn read(
        &self,
        id: MessageId,
        index: u32,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, SegmentError>;
    /// Size of a stored segment ([`SegmentError::NotFound`] when absent).
    async fn len(&self, id: MessageId, index: u32) -> Result<u64, SegmentError>;
    /// Makes the names of a message's stored segments durable (fsyncs its
    /// directory): a copy found already in place after a crash may have
    /// been renamed without the directory fsync that makes it stay.
    async fn sync_message(&self, id: MessageId) -> Result<(), SegmentError>;
    /// Removes every segment (and temporary file) of a message.
    async fn delete_message(&self, id: MessageId) -> Result<(), SegmentError>;
    /// Every message id that has anything stored, whole or partial, with the
    /// time anything of it was last written (an upload in progress keeps
    /// this fresh, so the collector leaves it alone).
    async fn list_messages(&self) -> Result<Vec<(MessageId, SystemTime)>, SegmentError>;
}
