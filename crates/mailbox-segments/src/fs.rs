//! Filesystem backend: `<root>/<last two hex digits of id>/<id>/<index>.seg`.
//!
//! The fan-out directory uses the *last* digits of the id because UUID v7
//! ids start with a timestamp and would all land in one directory otherwise.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use mailbox_types::{Digest, MessageId, SegmentMeta};
use sha2::{Digest as _, Sha256};
use tokio::fs;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::{SegmentError, SegmentStore, SegmentWriter};

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> SegmentError + 'a {
    move |source| SegmentError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

/// A blocking-pool task that did not finish (panicked or cancelled).
fn join_err(path: &Path) -> impl FnOnce(tokio::task::JoinError) -> SegmentError + '_ {
    move |e| SegmentError::Io {
        op: "join",
        path: path.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// Segment store in a local or shared directory.
#[derive(Debug, Clone)]
pub struct FsSegmentStore {
    root: PathBuf,
}

impl FsSegmentStore {
    /// Opens (creating) the store rooted at `root`.
    pub async fn open(root: impl Into<PathBuf>) -> Result<Self, SegmentError> {
        let root = root.into();
        fs::create_dir_all(&root)
            .await
            .map_err(io_err("create_dir", &root))?;
        // The 256 fan-out directories exist from the start, so a new
        // message costs one directory fsync (its fan-out directory), not two.
        let mut created = false;
        for i in 0..=255u8 {
            let fan = root.join(format!("{i:02x}"));
            if fs::metadata(&fan).await.is_err() {
                fs::create_dir_all(&fan)
                    .await
                    .map_err(io_err("create_dir", &fan))?;
                created = true;
            }
        }
        if created {
            fsync_dir(&root).await?;
        }
        Ok(Self { root })
    }

    fn message_dir(&self, id: &MessageId) -> PathBuf {
        let s = id.0.simple().to_string();
        self.root.join(&s[s.len() - 2..]).join(id.to_string())
    }

    fn segment_path(&self, id: &MessageId, index: u32) -> PathBuf {
        self.message_dir(id).join(format!("{index:08}.seg"))
    }
}

async fn fsync_dir(dir: &Path) -> Result<(), SegmentError> {
    let d = fs::File::open(dir).await.map_err(io_err("open_dir", dir))?;
    d.sync_all().await.map_err(io_err("fsync_dir", dir))
}

/// Latest modification time of a directory or any file in it.
async fn newest_mtime(dir: &Path) -> SystemTime {
    let mtime = |m: std::io::Result<std::fs::Metadata>| {
        m.and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH)
    };
    let mut newest = mtime(fs::metadata(dir).await);
    if let Ok(mut rd) = fs::read_dir(dir).await {
        while let Ok(Some(e)) = rd.next_entry().await {
            newest = newest.max(mtime(e.metadata().await));
        }
    }
    newest
}

/// Bytes gathered before they go to the writer thread: large enough that
/// the per-job overhead vanishes, small enough to bound memory per upload.
const WRITE_BUF: usize = 1 << 20;

/// The file and running hash, owned by whichever side holds them: the
/// writer between jobs, a blocking-pool job while it hashes and writes.
struct Sink {
    file: std::fs::File,
    hasher: Sha256,
}

/// Writes a segment on the blocking pool, one job in flight: while a job
/// hashes and writes the previous megabyte, the caller (an upload hashing
/// the whole payload as it receives it) fills the next. The segment hash is
/// computed on the writer thread, so the two SHA-256 passes run in parallel.
struct FsWriter {
    tmp: PathBuf,
    dest: PathBuf,
    buf: Vec<u8>,
    sink: Option<Sink>,
    job: Option<tokio::task::JoinHandle<std::io::Result<Sink>>>,
    /// fsync of the fan-out directory after creating the message's
    /// directory, running while the data is written; awaited in `finish`.
    dir_sync: Option<tokio::task::JoinHandle<Result<(), SegmentError>>>,
    size: u64,
    id: MessageId,
    index: u32,
}

impl FsWriter {
    /// Waits for the job in flight and takes the sink back.
    async fn settle(&mut self) -> Result<(), SegmentError> {
        if let Some(job) = self.job.take() {
            let sink = job
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))
                .and_then(|r| r)
                .map_err(io_err("write", &self.tmp))?;
            self.sink = Some(sink);
        }
        Ok(())
    }

    /// Hands the gathered bytes to a writer job.
    async fn ship(&mut self) -> Result<(), SegmentError> {
        let buf = std::mem::replace(&mut self.buf, Vec::with_capacity(WRITE_BUF));
        self.ship_bytes(Bytes::from(buf)).await
    }

    /// Hands `buf` to a writer job once the previous one is done.
    async fn ship_bytes(&mut self, buf: Bytes) -> Result<(), SegmentError> {
        self.settle().await?;
        let mut sink = self.sink.take().expect("sink is back after settle");
        self.job = Some(tokio::task::spawn_blocking(move || {
            use std::io::Write;
            sink.hasher.update(&buf);
            sink.file.write_all(&buf)?;
            Ok(sink)
        }));
        Ok(())
    }
}

#[async_trait]
impl SegmentWriter for FsWriter {
    async fn write(&mut self, mut data: &[u8]) -> Result<(), SegmentError> {
        self.size += data.len() as u64;
        while !data.is_empty() {
            let n = (WRITE_BUF - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() == WRITE_BUF {
                self.ship().await?;
            }
        }
        Ok(())
    }

    async fn write_bytes(&mut self, data: Bytes) -> Result<(), SegmentError> {
        // A buffer as large as a gathered one goes to the writer as it is,
        // without being copied; smaller ones are gathered.
        if self.buf.is_empty() && data.len() >= WRITE_BUF {
            self.size += data.len() as u64;
            return self.ship_bytes(data).await;
        }
        self.write(&data).await
    }

    async fn finish(self: Box<Self>) -> Result<SegmentMeta, SegmentError> {
        self.complete(None).await
    }

    async fn finish_expecting(
        self: Box<Self>,
        expected: Digest,
    ) -> Result<SegmentMeta, SegmentError> {
        self.complete(Some(expected)).await
    }
}

impl FsWriter {
    /// Finishes the segment, refusing it if `expected` is given and differs
    /// from what was written.
    async fn complete(
        mut self: Box<Self>,
        expected: Option<Digest>,
    ) -> Result<SegmentMeta, SegmentError> {
        if !self.buf.is_empty() {
            self.ship().await?;
        }
        self.settle().await?;
        if let Some(job) = self.dir_sync.take() {
            job.await.map_err(join_err(&self.dest))??;
        }
        let Sink { file, hasher } = self.sink.take().expect("sink is back after settle");
        let sha256 = Digest::from(hasher);
        let (tmp, dest) = (self.tmp.clone(), self.dest.clone());
        if expected.is_some_and(|e| e != sha256) {
            drop(file);
            // Best effort: a leftover temporary file is an orphan for GC.
            let _ = fs::remove_file(&tmp).await;
            return Err(SegmentError::Mismatch {
                id: self.id,
                index: self.index,
            });
        }
        // fsync the data, rename into place, fsync the directory: a segment
        // under its final name is always whole and durable.
        tokio::task::spawn_blocking(move || -> Result<(), SegmentError> {
            file.sync_all().map_err(io_err("fsync", &tmp))?;
            drop(file);
            std::fs::rename(&tmp, &dest).map_err(io_err("rename", &dest))?;
            let dir = dest.parent().expect("segment has a directory");
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("fsync_dir", dir))
        })
        .await
        .map_err(join_err(&self.dest))??;
        Ok(SegmentMeta {
            index: self.index,
            size: self.size,
            sha256,
        })
    }
}

#[async_trait]
impl SegmentStore for FsSegmentStore {
    #[tracing::instrument(level = "debug", skip(self))]
    async fn create(
        &self,
        id: MessageId,
        index: u32,
    ) -> Result<Box<dyn SegmentWriter>, SegmentError> {
        let dir = self.message_dir(&id);
        let dest = self.segment_path(&id, index);
        // A temporary name of its own: two writers of the same segment (a
        // lingering copy from an earlier leader or feed connection and the
        // current one, possibly on another node sharing this store) never
        // write into the same file; the last rename wins, and each renamed
        // file is whole.
        let tmp = dir.join(format!(
            "{index:08}.seg.{}.tmp",
            MessageId::new().0.simple()
        ));
        let t = tmp.clone();
        let (file, created) = tokio::task::spawn_blocking(move || -> Result<_, SegmentError> {
            let created = std::fs::metadata(&dir).is_err();
            if created {
                std::fs::create_dir_all(&dir).map_err(io_err("create_dir", &dir))?;
            }
            Ok((
                std::fs::File::create(&t).map_err(io_err("create", &t))?,
                created,
            ))
        })
        .await
        .map_err(join_err(&tmp))??;
        // The new directory's entry must be durable before the segment is
        // reported durable; its fsync overlaps the data's.
        let dir_sync = created.then(|| {
            let fan = self
                .message_dir(&id)
                .parent()
                .expect("fan-out dir")
                .to_path_buf();
            tokio::task::spawn_blocking(move || {
                std::fs::File::open(&fan)
                    .and_then(|d| d.sync_all())
                    .map_err(io_err("fsync_dir", &fan))
            })
        });
        Ok(Box::new(FsWriter {
            tmp,
            dest,
            dir_sync,
            buf: Vec::with_capacity(WRITE_BUF),
            sink: Some(Sink {
                file,
                hasher: Sha256::new(),
            }),
            job: None,
            size: 0,
            id,
            index,
        }))
    }

    #[tracing::instrument(level = "trace", skip(self))]
    async fn read(
        &self,
        id: MessageId,
        index: u32,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, SegmentError> {
        let path = self.segment_path(&id, index);
        let mut f = match fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SegmentError::NotFound { id, index })
            }
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        let size = f.metadata().await.map_err(io_err("stat", &path))?.len();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(SegmentError::OutOfRange {
                id,
                index,
                offset,
                len,
                size,
            });
        }
        f.seek(SeekFrom::Start(offset))
            .await
            .map_err(io_err("seek", &path))?;
        let mut buf = BytesMut::zeroed(len as usize);
        f.read_exact(&mut buf)
            .await
            .map_err(io_err("read", &path))?;
        Ok(buf.freeze())
    }

    async fn len(&self, id: MessageId, index: u32) -> Result<u64, SegmentError> {
        let path = self.segment_path(&id, index);
        match fs::metadata(&path).await {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(SegmentError::NotFound { id, index })
            }
            Err(e) => Err(io_err("stat", &path)(e)),
        }
    }

    async fn sync_message(&self, id: MessageId) -> Result<(), SegmentError> {
        fsync_dir(&self.message_dir(&id)).await
    }

    async fn delete_message(&self, id: MessageId) -> Result<(), SegmentError> {
        let dir = self.message_dir(&id);
        match fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &dir)(e)),
        }
    }

    async fn list_messages(&self) -> Result<Vec<(MessageId, SystemTime)>, SegmentError> {
        let mut out = Vec::new();
        let mut fan = fs::read_dir(&self.root)
            .await
            .map_err(io_err("read_dir", &self.root))?;
        while let Some(f) = fan
            .next_entry()
            .await
            .map_err(io_err("read_dir", &self.root))?
        {
            let Ok(mut msgs) = fs::read_dir(f.path()).await else {
                continue;
            };
            while let Ok(Some(m)) = msgs.next_entry().await {
                let Some(id) = m.file_name().to_str().and_then(|s| s.parse().ok()) else {
                    continue;
                };
                out.push((id, newest_mtime(&m.path()).await));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn finish_expecting_stores_only_matching_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsSegmentStore::open(dir.path()).await.unwrap();
        let id = MessageId::new();
        // A copy with one byte flipped: refused, nothing under the final name.
        let mut w = store.create(id, 0).await.unwrap();
        w.write(b"hello worle").await.unwrap();
        let err = w
            .finish_expecting(Digest::of(b"hello world"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, SegmentError::Mismatch { index: 0, .. }),
            "{err}"
        );
        assert!(matches!(
            store.read(id, 0, 0, 1).await,
            Err(SegmentError::NotFound { .. })
        ));
        let leftovers = std::fs::read_dir(store.message_dir(&id)).unwrap().count();
        assert_eq!(leftovers, 0, "the refused copy's temporary file is removed");
        // The intact copy is stored.
        let mut w = store.create(id, 0).await.unwrap();
        w.write(b"hello world").await.unwrap();
        let meta = w
            .finish_expecting(Digest::of(b"hello world"))
            .await
            .unwrap();
        assert_eq!(meta.sha256, Digest::of(b"hello world"));
        assert_eq!(&store.read(id, 0, 0, 11).await.unwrap()[..], b"hello world");
    }

    #[tokio::test]
    async fn write_read_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsSegmentStore::open(dir.path()).await.unwrap();
        let id = MessageId::new();
        let mut w = store.create(id, 0).await.unwrap();
        w.write(b"hello ").await.unwrap();
        w.write(b"world").await.unwrap();
        let meta = w.finish().await.unwrap();
        assert_eq!(meta.size, 11);
        assert_eq!(meta.sha256, Digest::of(b"hello world"));
        // Whole buffers handed over, gathered pieces and both mixed end up
        // in order, hashed and counted alike.
        let big: Vec<u8> = (0..3 * WRITE_BUF + 5).map(|i| (i % 253) as u8).collect();
        let mut w = store.create(id, 2).await.unwrap();
        w.write(&big[..7]).await.unwrap();
        w.write_bytes(Bytes::copy_from_slice(&big[7..7 + WRITE_BUF]))
            .await
            .unwrap();
        w.write(&big[7 + WRITE_BUF..WRITE_BUF * 2]).await.unwrap();
        w.write_bytes(Bytes::copy_from_slice(&big[WRITE_BUF * 2..]))
            .await
            .unwrap();
        let meta = w.finish().await.unwrap();
        assert_eq!(meta.size, big.len() as u64);
        assert_eq!(meta.sha256, Digest::of(&big));
        assert_eq!(
            &store.read(id, 2, 0, big.len() as u64).await.unwrap()[..],
            &big[..]
        );
        assert_eq!(&store.read(id, 0, 6, 5).await.unwrap()[..], b"world");
        assert!(matches!(
            store.read(id, 0, 6, 6).await,
            Err(SegmentError::OutOfRange { .. })
        ));
        assert!(matches!(
            store.read(id, 1, 0, 1).await,
            Err(SegmentError::NotFound { .. })
        ));
        // An abandoned writer leaves only a temp file; the id is still listed for GC.
        let id2 = MessageId::new();
        let mut w = store.create(id2, 0).await.unwrap();
        w.write(b"partial").await.unwrap();
        drop(w);
        assert!(matches!(
            store.read(id2, 0, 0, 1).await,
            Err(SegmentError::NotFound { .. })
        ));
        let mut ids: Vec<_> = store
            .list_messages()
            .await
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        ids.sort();
        assert_eq!(ids, vec![id, id2]);
        store.delete_message(id).await.unwrap();
        store.delete_message(id2).await.unwrap();
        store.delete_message(id2).await.unwrap();
        assert!(store.list_messages().await.unwrap().is_empty());
    }
}
