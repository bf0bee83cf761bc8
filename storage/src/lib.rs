//! The one way PiXiu's stateful roles (router, Xiu, Pi) keep data on disk: a RocksDB database
//! opened with the project's options, writes whose durability is explicit ([`Durability`]),
//! ordered scans by key prefix or from a key (also through a consistent snapshot), and one
//! error type. Each role keeps its own key layout and record format; this crate knows bytes.
//!
//! Writes block on the disk (an fsync takes milliseconds), so async code calls them through
//! [`blocking`], which runs them on tokio's blocking pool instead of an async worker.

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use rocksdb::WriteBatch;

/// How writes reach the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Every write is fsynced before it returns: what it wrote survives a machine crash.
    Fsync,
    /// Writes go to the write-ahead log without an fsync each (they survive a process crash,
    /// not a machine crash); the owner calls [`Db::flush_wal`] periodically, or before
    /// acknowledging a group of writes, to make them durable together.
    GroupCommit,
}

/// How [`Db::open`] sets a database up.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub durability: Durability,
    /// Compress blocks with LZ4 (the stores of message bodies and ids).
    pub lz4: bool,
}

impl Options {
    /// LZ4-compressed blocks with `durability`: the stores of message bodies and ids.
    pub fn compressed(durability: Durability) -> Options {
        Options {
            durability,
            lz4: true,
        }
    }
}

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The database could not be opened (missing permissions, another process holds it, a
    /// corrupt manifest).
    #[error("rocksdb at {path}: {source}")]
    Open {
        path: String,
        source: rocksdb::Error,
    },
    /// A read or write failed.
    #[error("rocksdb: {0}")]
    Db(#[from] rocksdb::Error),
    /// The blocking task running a write panicked or was cancelled.
    #[error("storage task: {0}")]
    Task(String),
}

/// Bits per key of the table files' Bloom filters (see [`Db::open`]).
const BLOOM_BITS_PER_KEY: f64 = 10.0;

/// One key and value, as stored.
pub type Entry = (Box<[u8]>, Box<[u8]>);

/// An open database.
pub struct Db {
    db: Arc<rocksdb::DB>,
    durability: Durability,
    path: PathBuf,
}

impl Db {
    /// Open (or create) the database at `path`.
    pub fn open(path: &Path, options: Options) -> Result<Db, StorageError> {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        // Whole-key Bloom filters, 10 bits a key (about 1 % false positives): a point lookup of
        // a key that is not there (a Pi append checking it is new, a Xiu sid checked for a
        // repeat) skips the table files without reading their blocks. Scans do not use them.
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_bloom_filter(BLOOM_BITS_PER_KEY, false);
        opts.set_block_based_table_factory(&table);
        if options.lz4 {
            opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        }
        let db = rocksdb::DB::open(&opts, path).map_err(|source| StorageError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Db {
            db: Arc::new(db),
            durability: options.durability,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn durability(&self) -> Durability {
        self.durability
    }

    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.db.get(key)?)
    }

    /// Is `key` stored? (Reads without copying the value.)
    pub fn contains(&self, key: impl AsRef<[u8]>) -> Result<bool, StorageError> {
        Ok(self.db.get_pinned(key)?.is_some())
    }

    /// Store one key with the database's [`Durability`].
    pub fn put(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.put(key, value);
        self.write(batch)
    }

    /// Write `batch` atomically with the database's [`Durability`].
    pub fn write(&self, batch: WriteBatch) -> Result<(), StorageError> {
        self.write_with(batch, self.durability == Durability::Fsync)
    }

    /// Write `batch` atomically and fsync it, whatever the [`Durability`]: for the writes a
    /// recovery depends on (markers, counters moved past a failed leader's ids).
    pub fn write_synced(&self, batch: WriteBatch) -> Result<(), StorageError> {
        self.write_with(batch, true)
    }

    /// Write `batch` atomically to the write-ahead log without an fsync, whatever the
    /// [`Durability`]: for what can be rebuilt after a machine crash (watermarks, caches).
    pub fn write_unsynced(&self, batch: WriteBatch) -> Result<(), StorageError> {
        self.write_with(batch, false)
    }

    fn write_with(&self, batch: WriteBatch, sync: bool) -> Result<(), StorageError> {
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Make every write so far durable (fsync the write-ahead log): the commit point of
    /// [`Durability::GroupCommit`]. Harmless with [`Durability::Fsync`].
    pub fn flush_wal(&self) -> Result<(), StorageError> {
        self.db.flush_wal(true)?;
        Ok(())
    }

    /// The entries whose key starts with `prefix`, in key order.
    pub fn scan_prefix<'a>(
        &'a self,
        prefix: &[u8],
    ) -> impl Iterator<Item = Result<Entry, StorageError>> + 'a {
        self.scan_from(prefix, prefix)
    }

    /// The entries from `start` (inclusive) on whose key starts with `prefix`, in key order.
    pub fn scan_from<'a>(
        &'a self,
        start: &[u8],
        prefix: &[u8],
    ) -> impl Iterator<Item = Result<Entry, StorageError>> + 'a {
        let it = self.db.iterator_opt(
            rocksdb::IteratorMode::From(start, rocksdb::Direction::Forward),
            bounded(prefix),
        );
        within(it, prefix.to_vec())
    }

    /// The last entry whose key is at or below `key`, if any.
    pub fn last_at_or_below(&self, key: &[u8]) -> Result<Option<Entry>, StorageError> {
        let mut it = self.db.iterator(rocksdb::IteratorMode::From(
            key,
            rocksdb::Direction::Reverse,
        ));
        Ok(it.next().transpose()?)
    }

    /// A consistent view: scans through it see the database as it was when it was taken.
    pub fn snapshot(&self) -> Snapshot<'_> {
        Snapshot {
            snap: self.db.snapshot(),
        }
    }

    /// A handle that takes snapshots of this database without borrowing the `Db`, so that
    /// whoever guards the `Db` (a lock) need only hold it while a view is taken, not while
    /// it is read. Keep it briefly: the database stays open while a handle lives.
    pub fn reader(&self) -> Reader {
        Reader {
            db: self.db.clone(),
        }
    }
}

/// See [`Db::reader`].
pub struct Reader {
    db: Arc<rocksdb::DB>,
}

impl Reader {
    /// The same as [`Db::snapshot`].
    pub fn snapshot(&self) -> Snapshot<'_> {
        Snapshot {
            snap: self.db.snapshot(),
        }
    }
}

/// A consistent read-only view of a [`Db`] (see [`Db::snapshot`]).
pub struct Snapshot<'a> {
    snap: rocksdb::Snapshot<'a>,
}

impl<'a> Snapshot<'a> {
    /// The entries whose key starts with `prefix`, in key order, as of the snapshot.
    pub fn scan_prefix(
        &self,
        prefix: &[u8],
    ) -> impl Iterator<Item = Result<Entry, StorageError>> + 'a {
        let it = self.snap.iterator_opt(
            rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward),
            bounded(prefix),
        );
        within(it, prefix.to_vec())
    }
}

/// Read options whose iteration ends where keys stop starting with `prefix`. Without the
/// bound, finding that a prefix has no further live key means walking every deleted key that
/// follows it (tombstones stay until a compaction), e.g. the acknowledged ids of the next user
/// in Pi, on every scan of a user's list to its end.
fn bounded(prefix: &[u8]) -> rocksdb::ReadOptions {
    let mut opts = rocksdb::ReadOptions::default();
    if let Some(end) = prefix_end(prefix) {
        opts.set_iterate_upper_bound(end);
    }
    opts
}

/// The smallest key above every key starting with `prefix` (`None`: no such key, the prefix is
/// empty or all `0xff`).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let last = prefix.iter().rposition(|b| *b != 0xff)?;
    let mut end = prefix[..=last].to_vec();
    end[last] += 1;
    Some(end)
}

/// The iterator's entries up to the first key that does not start with `prefix`.
fn within<I>(it: I, prefix: Vec<u8>) -> impl Iterator<Item = Result<Entry, StorageError>>
where
    I: Iterator<Item = Result<Entry, rocksdb::Error>>,
{
    it.map(|item| item.map_err(StorageError::from))
        .take_while(move |item| match item {
            Ok((k, _)) => k.starts_with(&prefix),
            Err(_) => true,
        })
}

/// Run blocking storage work (a write and its fsync, a long scan) on tokio's blocking pool,
/// so that it never stalls an async worker thread.
pub async fn blocking<T, F>(work: F) -> Result<T, StorageError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| StorageError::Task(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Table files are written with a Bloom filter (its policy is named in the file).
    #[test]
    fn table_files_carry_a_bloom_filter() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path(), Durability::GroupCommit);
        for i in 0u32..1000 {
            put(&db, &i.to_be_bytes(), b"v");
        }
        db.db.flush().unwrap();
        let mut tables = 0;
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|x| x == "sst") {
                tables += 1;
                let bytes = std::fs::read(&path).unwrap();
                let name = b"rocksdb.BuiltinBloomFilter";
                assert!(
                    bytes.windows(name.len()).any(|w| w == name),
                    "{} has no Bloom filter",
                    path.display()
                );
            }
        }
        assert_eq!(tables, 1);
        assert!(db.contains(7u32.to_be_bytes()).unwrap());
        assert!(!db.contains(5000u32.to_be_bytes()).unwrap());
    }

    #[test]
    fn a_prefix_ends_at_its_successor() {
        assert_eq!(prefix_end(b"i\x00\x01"), Some(b"i\x00\x02".to_vec()));
        assert_eq!(prefix_end(b"i\x00\xff"), Some(b"i\x01".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }

    fn open(dir: &Path, durability: Durability) -> Db {
        Db::open(
            dir,
            Options {
                durability,
                lz4: true,
            },
        )
        .unwrap()
    }

    fn put(db: &Db, k: &[u8], v: &[u8]) {
        let mut b = WriteBatch::default();
        b.put(k, v);
        db.write(b).unwrap();
    }

    fn keys(it: impl Iterator<Item = Result<Entry, StorageError>>) -> Vec<Vec<u8>> {
        it.map(|e| e.unwrap().0.to_vec()).collect()
    }

    #[test]
    fn prefix_scans_stop_at_the_prefix_end() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path(), Durability::Fsync);
        for k in [&b"a1"[..], b"b1", b"b2", b"b3", b"c1"] {
            put(&db, k, b"v");
        }
        assert_eq!(
            keys(db.scan_prefix(b"b")),
            vec![b"b1".to_vec(), b"b2".to_vec(), b"b3".to_vec()]
        );
        assert_eq!(
            keys(db.scan_from(b"b2", b"b")),
            vec![b"b2".to_vec(), b"b3".to_vec()]
        );
        assert!(keys(db.scan_prefix(b"d")).is_empty());
        assert_eq!(
            db.last_at_or_below(b"b9").unwrap().unwrap().0.as_ref(),
            b"b3"
        );
        assert!(db.last_at_or_below(b"a0").unwrap().is_none());
    }

    #[test]
    fn a_snapshot_does_not_see_later_writes() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path(), Durability::GroupCommit);
        put(&db, b"x1", b"v");
        let snap = db.snapshot();
        put(&db, b"x2", b"v");
        assert_eq!(keys(snap.scan_prefix(b"x")), vec![b"x1".to_vec()]);
        assert_eq!(keys(db.scan_prefix(b"x")).len(), 2);
    }

    #[test]
    fn writes_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = open(dir.path(), Durability::GroupCommit);
            put(&db, b"k", b"v1");
            db.flush_wal().unwrap();
            let mut b = WriteBatch::default();
            b.put(b"m", b"synced");
            db.write_synced(b).unwrap();
        }
        let db = open(dir.path(), Durability::Fsync);
        assert_eq!(db.get(b"k").unwrap().as_deref(), Some(&b"v1"[..]));
        assert!(db.contains(b"m").unwrap());
        assert!(!db.contains(b"n").unwrap());
    }

    #[test]
    fn a_database_held_by_another_is_refused_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let _held = open(dir.path(), Durability::Fsync);
        let err = Db::open(
            dir.path(),
            Options {
                durability: Durability::Fsync,
                lz4: false,
            },
        )
        .err()
        .expect("the lock is held");
        assert!(matches!(err, StorageError::Open { .. }));
        assert!(err.to_string().contains(&dir.path().display().to_string()));
    }

    #[tokio::test]
    async fn blocking_work_runs_off_the_async_workers() {
        let dir = tempfile::tempdir().unwrap();
        let db = std::sync::Arc::new(open(dir.path(), Durability::Fsync));
        let d = db.clone();
        blocking(move || put(&d, b"k", b"v")).await.unwrap();
        assert!(db.contains(b"k").unwrap());
        let err = blocking(|| -> () { panic!("boom") }).await.unwrap_err();
        assert!(matches!(err, StorageError::Task(_)));
    }
}
