//! Snapshot files: the state column family as a stream of frames on disk.
//!
//! A snapshot is never held in memory: it is written frame by frame from
//! one RocksDB point-in-time view, sent to a follower in chunks read from
//! the file, received into a file, and installed by streaming the file back
//! into RocksDB. A node's memory therefore does not grow with its state.
//!
//! Layout: `frame*`, an end marker, the bincode-encoded [`SnapshotMeta`]
//! and its length as a big-endian u64. A frame is a key and a value, each
//! a big-endian u32 length and the bytes. The end marker (a key length of
//! `u32::MAX`) and the trailer make a file cut short anywhere detectable,
//! even at a frame boundary. The bytes a follower receives are the
//! leader's file as it is, so a received file is a snapshot file too.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use openraft::SnapshotMeta;
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

use crate::{BasicNode, NodeId};

/// Snapshot metadata as openraft defines it for our types.
pub type Meta = SnapshotMeta<NodeId, BasicNode>;

const END: u32 = u32::MAX;
/// Read and write buffer of snapshot files.
const BUF: usize = 1 << 20;

/// Snapshot data handed to openraft: an open snapshot file and its path.
///
/// openraft reads it in chunks to send it and writes received chunks into
/// it at their offsets; [`crate::StateMachineStore`] installs from the path.
#[derive(Debug)]
pub struct SnapshotFile {
    file: tokio::fs::File,
    path: PathBuf,
}

impl SnapshotFile {
    /// Opens `path` for reading.
    pub async fn open(path: &Path) -> io::Result<Self> {
        Ok(Self {
            file: tokio::fs::File::open(path).await?,
            path: path.to_path_buf(),
        })
    }

    /// Wraps an open snapshot file.
    pub fn from_std(file: std::fs::File, path: PathBuf) -> Self {
        Self {
            file: tokio::fs::File::from_std(file),
            path,
        }
    }

    /// Creates `path` (which must not exist) for writing and reading.
    pub async fn create(path: &Path) -> io::Result<Self> {
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .await?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Where the bytes are.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes what openraft wrote and fsyncs it.
    pub async fn sync(&mut self) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.file.flush().await?;
        self.file.sync_all().await
    }
}

impl AsyncRead for SnapshotFile {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_read(cx, buf)
    }
}

impl AsyncWrite for SnapshotFile {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.file).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_shutdown(cx)
    }
}

impl AsyncSeek for SnapshotFile {
    fn start_seek(mut self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        Pin::new(&mut self.file).start_seek(position)
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Pin::new(&mut self.file).poll_complete(cx)
    }
}

/// Writes a snapshot file frame by frame; [`Writer::finish`] adds the end
/// marker and the metadata and fsyncs.
pub struct Writer {
    out: BufWriter<File>,
    bytes: u64,
}

impl Writer {
    /// Creates `path` (which must not exist).
    pub fn create(path: &Path) -> io::Result<Self> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Self {
            out: BufWriter::with_capacity(BUF, f),
            bytes: 0,
        })
    }

    /// Appends one key/value frame.
    pub fn frame(&mut self, k: &[u8], v: &[u8]) -> io::Result<()> {
        for part in [k, v] {
            let n = u32::try_from(part.len())
                .ok()
                .filter(|&n| n != END)
                .ok_or_else(|| io::Error::other("snapshot frame over 4 GiB"))?;
            self.out.write_all(&n.to_be_bytes())?;
            self.out.write_all(part)?;
            self.bytes += 4 + part.len() as u64;
        }
        Ok(())
    }

    /// Ends the file with `meta`, fsyncs it, and returns its size.
    pub fn finish(mut self, meta: &Meta) -> io::Result<u64> {
        let m = bincode::serialize(meta).map_err(io::Error::other)?;
        self.out.write_all(&END.to_be_bytes())?;
        self.out.write_all(&m)?;
        self.out.write_all(&(m.len() as u64).to_be_bytes())?;
        let f = self.out.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        Ok(self.bytes + 4 + m.len() as u64 + 8)
    }
}

/// Reads the metadata from the trailer of the snapshot file at `path`.
pub fn read_meta(path: &Path) -> io::Result<Meta> {
    let mut f = File::open(path)?;
    read_meta_from(&mut f).map(|(meta, _)| meta)
}

/// The metadata and where the end marker starts.
fn read_meta_from(f: &mut File) -> io::Result<(Meta, u64)> {
    let len = f.seek(SeekFrom::End(0))?;
    if len < 12 {
        return Err(io::Error::other(format!(
            "snapshot file of {len} bytes is too short for its trailer"
        )));
    }
    f.seek(SeekFrom::End(-8))?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n)?;
    let n = u64::from_be_bytes(n);
    let end = len
        .checked_sub(8 + 4)
        .and_then(|e| e.checked_sub(n))
        .ok_or_else(|| io::Error::other("snapshot metadata length runs past the file"))?;
    f.seek(SeekFrom::Start(end + 4))?;
    let mut m = vec![0u8; n as usize];
    f.read_exact(&mut m)?;
    let meta = bincode::deserialize(&m).map_err(io::Error::other)?;
    Ok((meta, end))
}

/// Reads a snapshot file's frames in order, from a bounded buffer.
pub struct Reader {
    input: BufReader<File>,
    pos: u64,
    end: u64,
    key: Vec<u8>,
    value: Vec<u8>,
}

impl Reader {
    /// Opens `path`, checking its trailer first; returns its metadata too.
    pub fn open(path: &Path) -> io::Result<(Self, Meta)> {
        let mut f = File::open(path)?;
        let (meta, end) = read_meta_from(&mut f)?;
        f.seek(SeekFrom::Start(0))?;
        Ok((
            Self {
                input: BufReader::with_capacity(BUF, f),
                pos: 0,
                end,
                key: Vec::new(),
                value: Vec::new(),
            },
            meta,
        ))
    }

    /// Reads the next key (or value) into its buffer; `false` at the end
    /// marker, which must sit exactly where the trailer says.
    fn part(&mut self, into_key: bool) -> io::Result<bool> {
        let mut n = [0u8; 4];
        if self.pos == self.end {
            self.input.read_exact(&mut n)?;
            if u32::from_be_bytes(n) != END || !into_key {
                return Err(io::Error::other("snapshot frames run into the trailer"));
            }
            return Ok(false);
        }
        if self.pos + 4 > self.end {
            return Err(io::Error::other("snapshot frame runs into the trailer"));
        }
        self.input.read_exact(&mut n)?;
        let n = u32::from_be_bytes(n);
        if n == END {
            return Err(io::Error::other("snapshot end marker before the trailer"));
        }
        self.pos += 4;
        if self.pos + n as u64 > self.end {
            return Err(io::Error::other("snapshot frame runs into the trailer"));
        }
        let buf = if into_key {
            &mut self.key
        } else {
            &mut self.value
        };
        buf.resize(n as usize, 0);
        self.input.read_exact(buf)?;
        self.pos += n as u64;
        Ok(true)
    }

    /// The next key and value, `None` at the end marker.
    pub fn next_frame(&mut self) -> io::Result<Option<(&[u8], &[u8])>> {
        if !self.part(true)? {
            return Ok(None);
        }
        if !self.part(false)? {
            return Err(io::Error::other("snapshot frame cut between key and value"));
        }
        Ok(Some((&self.key, &self.value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, LogId, StoredMembership};

    fn meta() -> Meta {
        Meta {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(2, 1), 7)),
            last_membership: StoredMembership::default(),
            snapshot_id: "s-7".into(),
        }
    }

    fn frames(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let (mut r, _) = Reader::open(path)?;
        let mut out = Vec::new();
        while let Some((k, v)) = r.next_frame()? {
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    #[test]
    fn frames_and_meta_roundtrip() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        let mut w = Writer::create(&p).unwrap();
        w.frame(b"k1", b"").unwrap();
        w.frame(b"k2", b"value").unwrap();
        let n = w.finish(&meta()).unwrap();
        assert_eq!(n, std::fs::metadata(&p).unwrap().len());
        assert_eq!(read_meta(&p).unwrap(), meta());
        assert_eq!(
            frames(&p).unwrap(),
            vec![
                (b"k1".to_vec(), vec![]),
                (b"k2".to_vec(), b"value".to_vec())
            ]
        );
    }

    /// A file cut short anywhere is refused, never read as a smaller state.
    #[test]
    fn every_truncation_is_detected() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        let mut w = Writer::create(&p).unwrap();
        w.frame(b"k1", b"v1").unwrap();
        w.frame(b"k2", b"v2").unwrap();
        w.finish(&meta()).unwrap();
        let full = std::fs::read(&p).unwrap();
        for cut in 0..full.len() {
            let q = d.path().join(format!("cut{cut}"));
            std::fs::write(&q, &full[..cut]).unwrap();
            let r = Reader::open(&q).and_then(|_| frames(&q));
            assert!(r.is_err(), "a file cut at {cut} of {} was read", full.len());
        }
    }
}
