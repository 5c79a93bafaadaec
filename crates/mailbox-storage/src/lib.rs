//! The only crate that touches RocksDB.
//!
//! One RocksDB instance per node holds three column families:
//! - [`Cf::Log`]: the Raft log, keyed by big-endian log index;
//! - [`Cf::Raft`]: Raft's own small records (vote, committed id, purge point,
//!   state-machine apply point, membership, the current snapshot's metadata);
//! - [`Cf::State`]: the mailbox state machine (see `mailbox_state::keys`).
//!
//! All column families share one WAL. A write with `durable = true` is synced
//! to disk before [`Store::write`] returns; that is how a Raft log append or a
//! vote is made durable before openraft is told so. State-machine writes skip
//! the WAL ([`Store::write_unlogged`]) because the log replays them, so the
//! state must be flushed ([`Store::flush`]) before any log entry that
//! produced it is purged.

use std::path::Path;
use std::sync::Arc;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, Direction, IteratorMode, Options,
    ReadOptions, WriteBatch, WriteOptions, DB,
};

/// Storage format version written at creation and checked at open (2: feed
/// records carry idempotency keys, deleted messages are remembered; 3:
/// events carry stamps and replays, queue counts their lanes' due floors
/// as key positions, notices are kept per rule and sealed; 4: feed pulls
/// carry the origin's head, and what was heard from each DC is a record).
pub const FORMAT_VERSION: u32 = 4;
const FORMAT_KEY: &[u8] = b"format-version";
/// Block cache shared by every column family: data, index and filter
/// blocks (bounded here rather than left to RocksDB's internal default).
const BLOCK_CACHE_BYTES: usize = 64 << 20;

/// A key and its value.
pub type KvPair = (Vec<u8>, Vec<u8>);

/// A column family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cf {
    /// Raft log entries.
    Log,
    /// Raft metadata records.
    Raft,
    /// Mailbox state.
    State,
    /// This node's own background work (retry schedules): never replicated
    /// nor part of snapshots.
    Local,
}

impl Cf {
    const ALL: [Cf; 4] = [Cf::Log, Cf::Raft, Cf::State, Cf::Local];

    fn name(self) -> &'static str {
        match self {
            Cf::Log => "log",
            Cf::Raft => "raft",
            Cf::State => "state",
            Cf::Local => "local",
        }
    }
}

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// RocksDB reported an error during `op`.
    #[error("rocksdb {op} failed: {source}")]
    RocksDb {
        /// The operation, e.g. `open`, `write`.
        op: &'static str,
        /// RocksDB's error.
        #[source]
        source: rocksdb::Error,
    },
    /// The directory holds data in a format this binary does not understand.
    #[error(
        "storage format version {found} in {path} is not supported (expected {FORMAT_VERSION})"
    )]
    Format {
        /// The data directory.
        path: String,
        /// The version found.
        found: u32,
    },
}

fn rerr(op: &'static str) -> impl FnOnce(rocksdb::Error) -> StoreError {
    move |source| StoreError::RocksDb { op, source }
}

/// A node's RocksDB instance. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.db.path())
            .finish()
    }
}

/// Writes applied atomically by [`Store::write`].
#[derive(Default)]
pub struct Batch {
    ops: Vec<(Cf, Op)>,
}

enum Op {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    DeleteRange(Vec<u8>, Vec<u8>),
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key` to `value`.
    pub fn put(&mut self, cf: Cf, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push((cf, Op::Put(key.into(), value.into())));
    }

    /// Removes `key`.
    pub fn delete(&mut self, cf: Cf, key: impl Into<Vec<u8>>) {
        self.ops.push((cf, Op::Delete(key.into())));
    }

    /// Removes every key in `[from, to)`.
    pub fn delete_range(&mut self, cf: Cf, from: impl Into<Vec<u8>>, to: impl Into<Vec<u8>>) {
        self.ops.push((cf, Op::DeleteRange(from.into(), to.into())));
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// The smallest key greater than every key starting with `prefix`
/// (`None` when the prefix is all `0xff`: no upper bound then).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

impl Store {
    /// Opens (creating if needed) the store in `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_max_background_jobs(2);
        // Raft log entries carry inline payloads; a bigger memtable means
        // fewer flushes under upload load.
        opts.set_write_buffer_size(64 << 20);
        // Most point reads on the write path ask for keys that do not
        // exist (an idempotency key, a tombstone, a holder not yet
        // recorded): without bloom filters each of them searched every L0
        // file and level, and a profile of 1 KiB uploads showed RocksDB
        // reads as the leader's largest cost. Index and filter blocks live
        // in one bounded cache (memory bounded by configuration, not by
        // the number of files); L0's stay pinned, as they are read by
        // every lookup.
        //
        // Filters and indexes are partitioned (blocks of 4 KiB under a small
        // top level, pinned): a whole-file filter block grows with the
        // file, and once larger than a cache shard (64 MiB over 64 shards)
        // it never stayed cached, so every point read fetched and
        // checksummed megabytes. A 3-node DC fell from 8,000 to 1,150
        // uploads/s once compaction had made files that large (90% of the
        // leader's CPU in reading filter blocks).
        let mut table = BlockBasedOptions::default();
        table.set_bloom_filter(10.0, false);
        table.set_index_type(rocksdb::BlockBasedIndexType::TwoLevelIndexSearch);
        table.set_partition_filters(true);
        table.set_metadata_block_size(4096);
        table.set_block_cache(&Cache::new_lru_cache(BLOCK_CACHE_BYTES));
        table.set_cache_index_and_filter_blocks(true);
        table.set_cache_index_and_filter_blocks_with_high_priority(true);
        table.set_pin_top_level_index_and_filter(true);
        table.set_pin_l0_filter_and_index_blocks_in_cache(true);
        opts.set_block_based_table_factory(&table);
        // The same for what is still in the memtable (a recent write, or
        // one that never happened): a whole-key bloom filter of 5% of the
        // memtable's size spares the skip-list search for absent keys.
        opts.set_memtable_whole_key_filtering(true);
        opts.set_memtable_prefix_bloom_ratio(0.05);
        let cfs = Cf::ALL.map(|cf| ColumnFamilyDescriptor::new(cf.name(), opts.clone()));
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(rerr("open"))?;
        let store = Store { db: Arc::new(db) };
        match store.get(Cf::Raft, FORMAT_KEY)? {
            None => {
                let mut b = Batch::new();
                b.put(Cf::Raft, FORMAT_KEY, FORMAT_VERSION.to_be_bytes().to_vec());
                store.write(b, true)?;
            }
            Some(v) => {
                let found = v
                    .as_slice()
                    .try_into()
                    .map(u32::from_be_bytes)
                    .unwrap_or(u32::MAX);
                if found != FORMAT_VERSION {
                    return Err(StoreError::Format {
                        path: path.display().to_string(),
                        found,
                    });
                }
            }
        }
        Ok(store)
    }

    fn cf(&self, cf: Cf) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(cf.name())
            .expect("column families are created at open")
    }

    /// Point lookup.
    pub fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db.get_cf(self.cf(cf), key).map_err(rerr("get"))
    }

    fn rocks_batch(&self, batch: Batch) -> WriteBatch {
        let mut wb = WriteBatch::default();
        for (cf, op) in batch.ops {
            let h = self.cf(cf);
            match op {
                Op::Put(k, v) => wb.put_cf(h, k, v),
                Op::Delete(k) => wb.delete_cf(h, k),
                Op::DeleteRange(a, b) => wb.delete_range_cf(h, a, b),
            }
        }
        wb
    }

    /// Applies `batch` atomically; with `durable`, the WAL is fsynced first.
    #[tracing::instrument(level = "trace", skip(self, batch), fields(ops = batch.len()))]
    pub fn write(&self, batch: Batch, durable: bool) -> Result<(), StoreError> {
        let wb = self.rocks_batch(batch);
        let mut wo = WriteOptions::default();
        wo.set_sync(durable);
        self.db.write_opt(wb, &wo).map_err(rerr("write"))
    }

    /// Applies `batch` atomically without writing it to the WAL: it lives
    /// in the memtable until [`Store::flush`] (or RocksDB's own flush)
    /// writes it to a table file, and a crash before that loses it. Only
    /// for data that can be rebuilt from something durable (the state
    /// machine, from the Raft log); a write that must survive a crash on
    /// its own uses [`Store::write`]. Writes of one column family become
    /// durable in order (a flush writes a memtable whole), so a crash loses
    /// a suffix of them, never a write from the middle.
    #[tracing::instrument(level = "trace", skip(self, batch), fields(ops = batch.len()))]
    pub fn write_unlogged(&self, batch: Batch) -> Result<(), StoreError> {
        let wb = self.rocks_batch(batch);
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.db.write_opt(wb, &wo).map_err(rerr("write"))
    }

    /// Writes `cf`'s memtables to table files and waits until they are
    /// durable: every earlier write to `cf`, logged or not, survives a
    /// crash from then on.
    #[tracing::instrument(level = "debug", skip(self))]
    pub fn flush(&self, cf: Cf) -> Result<(), StoreError> {
        let mut fo = rocksdb::FlushOptions::default();
        fo.set_wait(true);
        self.db
            .flush_cf_opt(self.cf(cf), &fo)
            .map_err(rerr("flush"))
    }

    /// Fsyncs the WAL, making every earlier write durable.
    pub fn sync_wal(&self) -> Result<(), StoreError> {
        self.db.flush_wal(true).map_err(rerr("flush_wal"))
    }

    /// Up to `limit` entries with keys starting with `prefix`, strictly after
    /// `after` when given, in key order.
    pub fn scan(
        &self,
        cf: Cf,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KvPair>, StoreError> {
        self.scan_below(cf, prefix, after, None, limit)
    }

    /// [`Store::scan`], and only keys below `before`: the iterator is
    /// bounded there, so it never steps over deleted keys past it (a queue
    /// whose head is read often keeps many of those).
    pub fn scan_below(
        &self,
        cf: Cf,
        prefix: &[u8],
        after: Option<&[u8]>,
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KvPair>, StoreError> {
        // Never before the prefix: a position below it would seek to a key
        // outside the prefix and end the scan before reaching it.
        let start = match after {
            Some(a) if a > prefix => a,
            _ => prefix,
        };
        // Bounded at the prefix's end, so RocksDB skips files that hold
        // nothing of it and stops at its end instead of reading the first
        // key past it (a scan of an empty prefix, as for a new message's
        // holders, was a full seek into every level).
        let mut ro = ReadOptions::default();
        let end = match (prefix_end(prefix), before) {
            (Some(e), Some(b)) => Some(e.min(b.to_vec())),
            (e, b) => e.or(b.map(<[u8]>::to_vec)),
        };
        if let Some(end) = end {
            ro.set_iterate_upper_bound(end);
        }
        let mut it = self.db.raw_iterator_cf_opt(self.cf(cf), ro);
        it.seek(start);
        let mut out = Vec::new();
        while it.valid() && out.len() < limit {
            let k = it.key().expect("valid iterator has a key");
            if !k.starts_with(prefix) {
                break;
            }
            if after.is_none_or(|a| k > a) {
                out.push((k.to_vec(), it.value().unwrap_or_default().to_vec()));
            }
            it.next();
        }
        it.status().map_err(rerr("scan"))?;
        Ok(out)
    }

    /// Entries with keys in `[from, to)`, at most `limit`, in key order.
    pub fn range(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
        limit: usize,
    ) -> Result<Vec<KvPair>, StoreError> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(to.to_vec());
        let it = self.db.iterator_cf_opt(
            self.cf(cf),
            ro,
            IteratorMode::From(from, Direction::Forward),
        );
        let mut out = Vec::new();
        for kv in it.take(limit) {
            let (k, v) = kv.map_err(rerr("range"))?;
            out.push((k.into_vec(), v.into_vec()));
        }
        Ok(out)
    }

    /// The entry with the greatest key, if any.
    pub fn last(&self, cf: Cf) -> Result<Option<KvPair>, StoreError> {
        let mut it = self.db.iterator_cf(self.cf(cf), IteratorMode::End);
        match it.next() {
            None => Ok(None),
            Some(kv) => {
                let (k, v) = kv.map_err(rerr("last"))?;
                Ok(Some((k.into_vec(), v.into_vec())))
            }
        }
    }

    /// Every entry of `cf`, read from one consistent point-in-time view,
    /// handed to `f` in key order.
    pub fn for_each_consistent<E>(
        &self,
        cf: Cf,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<(), E>,
    ) -> Result<Result<(), E>, StoreError> {
        let snap = self.db.snapshot();
        // A walk over everything (a snapshot build) must not evict the
        // blocks point reads need.
        let mut ro = ReadOptions::default();
        ro.fill_cache(false);
        let mut it = snap.raw_iterator_cf_opt(self.cf(cf), ro);
        it.seek_to_first();
        while it.valid() {
            // The caller's error (a full disk while writing a snapshot
            // file, say) ends the walk at once.
            if let Err(e) = f(it.key().unwrap_or_default(), it.value().unwrap_or_default()) {
                return Ok(Err(e));
            }
            it.next();
        }
        it.status().map_err(rerr("iterate"))?;
        Ok(Ok(()))
    }
}

/// Big-endian encoding of a log index, so keys sort numerically.
pub fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// Decodes [`index_key`].
pub fn parse_index_key(k: &[u8]) -> Option<u64> {
    k.try_into().ok().map(u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scan_is_bounded_at_its_prefix_end_and_sees_every_key_of_it() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut b = Batch::new();
        for k in [
            &b"a\xff"[..],
            b"a\xff\x00",
            b"a\xff\xff",
            b"b",
            b"\xff\xff\x01",
        ] {
            b.put(Cf::State, k, b"v".to_vec());
        }
        store.write(b, true).unwrap();
        let keys = |p: &[u8]| -> Vec<Vec<u8>> {
            store
                .scan(Cf::State, p, None, 100)
                .unwrap()
                .into_iter()
                .map(|(k, _)| k)
                .collect()
        };
        assert_eq!(
            keys(b"a\xff"),
            vec![
                b"a\xff".to_vec(),
                b"a\xff\x00".to_vec(),
                b"a\xff\xff".to_vec()
            ]
        );
        assert_eq!(keys(b"\xff\xff"), vec![b"\xff\xff\x01".to_vec()]);
        assert_eq!(keys(b"c"), Vec::<Vec<u8>>::new());
    }

    #[test]
    fn write_scan_range_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            let mut b = Batch::new();
            for i in 1..=5u64 {
                b.put(Cf::Log, index_key(i), vec![i as u8]);
            }
            b.put(Cf::State, b"la".to_vec(), b"1".to_vec());
            b.put(Cf::State, b"lb".to_vec(), b"2".to_vec());
            b.put(Cf::State, b"m".to_vec(), b"3".to_vec());
            s.write(b, true).unwrap();
            let r = s.range(Cf::Log, &index_key(2), &index_key(4), 10).unwrap();
            assert_eq!(r.len(), 2);
            assert_eq!(
                parse_index_key(&s.last(Cf::Log).unwrap().unwrap().0),
                Some(5)
            );
            let sc = s.scan(Cf::State, b"l", None, 10).unwrap();
            assert_eq!(sc.len(), 2);
            let sc = s.scan(Cf::State, b"l", Some(b"la"), 10).unwrap();
            assert_eq!(sc, vec![(b"lb".to_vec(), b"2".to_vec())]);
            let mut b = Batch::new();
            b.delete_range(Cf::Log, index_key(0), index_key(3));
            s.write(b, true).unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let r = s
            .range(Cf::Log, &index_key(0), &index_key(u64::MAX), 10)
            .unwrap();
        assert_eq!(r.len(), 3);
        let mut n = 0;
        s.for_each_consistent(Cf::State, |_, _| {
            n += 1;
            Ok::<(), ()>(())
        })
        .unwrap()
        .unwrap();
        assert_eq!(n, 3);
    }
}
