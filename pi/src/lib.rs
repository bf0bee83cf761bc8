//! Pi, the MsgID index of personal inboxes (seed 8.3), as a library: one [`PiIndex`] keeps,
//! for every user of one Pi partition, an ordered, duplicate-free list of [`MsgId`]s in
//! RocksDB, and an operation log of every change for followers to replay.
//!
//! - [`PiIndex::append`] adds an id to a user's list (nothing, and no log entry, when it is
//!   already there); [`PiIndex::append_many`] does several at once, e.g. one multicast message
//!   indexed in many inboxes; [`PiIndex::read`] lists ids after a position;
//!   [`PiIndex::expire`] drops ids up to a position.
//! - Every change is one [`LogEntry`] with a [`LogId`], written in the same `WriteBatch` as the
//!   index change. LogIds strictly increase across restarts by construction: the last one is
//!   recorded in each batch, and [`PiIndex::open`] resumes from the larger of that record and
//!   the highest log key. [`PiIndex::log_after`] and [`PiIndex::apply_log`] carry the log from
//!   a leader to a follower, which ends up with the same index and the same LogIds.
//! - Durability is explicit, see [`Durability`].
//! - A follower too far behind ([`PiError::LogTrimmed`]) takes a full copy instead:
//!   [`PiIndex::snapshot`] on the leader, [`PiIndex::restore_begin`],
//!   [`PiIndex::restore_chunk`] and [`PiIndex::restore_finish`] on the follower, then
//!   [`PiIndex::apply_log`] from the snapshot's LogId on (see "Snapshots" below).
//!
//! On disk: `i | uid (8 bytes BE) | MsgId (8 bytes BE)` -> empty (a prefix scan reads one
//! user's ids in order), `l | LogId (8 bytes BE)` -> postcard([`LogEntry`]), `!last` -> last
//! LogId (8 bytes BE), `!restoring` -> LogId of the snapshot being restored (8 bytes BE),
//! present only while a restore is under way.
//!
//! # Snapshots
//!
//! [`PiIndex::snapshot`] reads every index entry through a RocksDB snapshot, so the copy is
//! one consistent view, together with the LogId it corresponds to ([`Snapshot::upto`], the
//! last LogId at that moment); writes made after the call are not in it. The view is copied
//! into memory (16 bytes per entry) so that the leader can keep writing while it is sent:
//! a RocksDB snapshot borrows the database and would block every `&mut self` write for as
//! long as the transfer lasts. [`Snapshot::chunk`] cuts it into [`SnapshotChunk`]s in key
//! order (`uid`, then `MsgId`) with a cursor, the last entry received, so a follower can
//! fetch chunk by chunk over the network and retry one; [`Snapshot::chunks`] yields them
//! all.
//!
//! On the follower, [`PiIndex::restore_begin`] writes the `!restoring` marker and wipes the
//! index, the log and `!last` in one synced batch; [`PiIndex::restore_chunk`] writes the
//! entries of a chunk (idempotent: a retried chunk is harmless);
//! [`PiIndex::restore_finish`], once the `last` chunk was written, fsyncs, then records
//! `upto` as the last LogId and removes the marker in one synced batch, so
//! [`PiIndex::apply_log`] continues with the leader's entry `upto + 1`. A crash in between
//! leaves the marker: [`PiIndex::open`] then opens the index in the "restore incomplete"
//! state ([`PiIndex::restore_incomplete`]), in which every read and write answers
//! [`PiError::RestoreIncomplete`] until a new restore is begun and finished. The same state
//! holds in-process between `restore_begin` and `restore_finish`.
//!
//! Whether a uid belongs to this partition is the caller's check ([`PiIndex::owns`]): the
//! partition count changes while a doubling is under way.

use pixiu_protocol::inbox::MsgId;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::Path;

/// How writes reach the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Every write is fsynced before it returns (`WriteOptions::set_sync(true)`).
    Fsync,
    /// Writes go to the write-ahead log without an fsync each (they survive a process crash,
    /// not a machine crash); the owner calls [`PiIndex::flush_wal`] periodically, or before
    /// acknowledging a group of writes, to make them durable together.
    GroupCommit,
}

#[derive(Clone, Debug)]
pub struct PiOptions {
    /// This index's Pi partition.
    pub partition: u32,
    pub sync: Durability,
}

/// The position of one change in a partition's operation log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LogId(pub u64);

impl std::fmt::Display for LogId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// One change of the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// `id` joined `uid`'s list.
    Append { uid: u64, id: MsgId },
    /// Every id of `uid` up to `upto` (inclusive) was dropped.
    Expire { uid: u64, upto: MsgId },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub id: LogId,
    pub op: Op,
}

#[derive(Debug, thiserror::Error)]
pub enum PiError {
    #[error("rocksdb at {path}: {source}")]
    Open {
        path: String,
        source: rocksdb::Error,
    },
    #[error("rocksdb: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("corrupt {what}: {reason}")]
    Corrupt { what: String, reason: String },
    #[error("log gap: expected log id {expected}, got {got}")]
    Gap { expected: u64, got: u64 },
    #[error("log entries after {after} are trimmed (first kept: {first:?}); a snapshot is needed")]
    LogTrimmed { after: LogId, first: Option<LogId> },
    /// A restore of the snapshot at `upto` was begun and not finished (in this process, or
    /// before a crash): the index is partial until a restore is finished.
    #[error("restore of the snapshot at log id {upto} is incomplete; restore again")]
    RestoreIncomplete { upto: LogId },
    /// A restore call out of sequence, or a chunk of another snapshot.
    #[error("restore: {0}")]
    Restore(String),
}

const META_LAST: &[u8] = b"!last";
const META_RESTORING: &[u8] = b"!restoring";
const INDEX_PREFIX: u8 = b'i';
const LOG_PREFIX: u8 = b'l';

fn index_key(uid: u64, id: MsgId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = INDEX_PREFIX;
    k[1..9].copy_from_slice(&uid.to_be_bytes());
    k[9..].copy_from_slice(&id.to_be_bytes());
    k
}

/// `(uid, MsgId)` of any index key, `None` for a key that is not one.
fn entry_of_index_key(key: &[u8]) -> Option<(u64, MsgId)> {
    if key.len() != 17 || key[0] != INDEX_PREFIX {
        return None;
    }
    let uid = u64::from_be_bytes(key[1..9].try_into().ok()?);
    Some((uid, MsgId::from_be_bytes(key[9..].try_into().ok()?)))
}

fn decode_log_id(what: &str, v: &[u8]) -> Result<LogId, PiError> {
    let bytes: [u8; 8] = v.try_into().map_err(|_| PiError::Corrupt {
        what: what.into(),
        reason: format!("{} bytes where 8 are expected", v.len()),
    })?;
    Ok(LogId(u64::from_be_bytes(bytes)))
}

fn log_key(id: LogId) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = LOG_PREFIX;
    k[1..].copy_from_slice(&id.0.to_be_bytes());
    k
}

/// The MsgId of an index key of `uid`, `None` for any other key.
fn id_of_index_key(uid: u64, key: &[u8]) -> Option<MsgId> {
    if key.len() != 17 || key[0] != INDEX_PREFIX || key[1..9] != uid.to_be_bytes() {
        return None;
    }
    Some(MsgId::from_be_bytes(key[9..].try_into().ok()?))
}

fn log_id_of_key(key: &[u8]) -> Option<LogId> {
    match key {
        [LOG_PREFIX, rest @ ..] => Some(LogId(u64::from_be_bytes(rest.try_into().ok()?))),
        _ => None,
    }
}

fn decode_entry(key: LogId, v: &[u8]) -> Result<LogEntry, PiError> {
    let corrupt = |reason: String| PiError::Corrupt {
        what: format!("log entry {key}"),
        reason,
    };
    let e: LogEntry = postcard::from_bytes(v).map_err(|e| corrupt(e.to_string()))?;
    if e.id != key {
        return Err(corrupt(format!("holds log id {}", e.id)));
    }
    Ok(e)
}

/// The MsgId index and operation log of one Pi partition.
pub struct PiIndex {
    db: rocksdb::DB,
    partition: u32,
    sync: Durability,
    last_log: LogId,
    /// Set while a restore is under way (or was left unfinished on disk).
    restoring: Option<Restoring>,
}

#[derive(Clone, Copy, Debug)]
struct Restoring {
    upto: LogId,
    /// Begun in this process (after a reopen, a restore must begin again).
    active: bool,
    /// The chunk marked `last` was written in this process.
    got_last: bool,
}

impl PiIndex {
    /// Opens (or creates) the index at `path`, resuming LogIds from the larger of the recorded
    /// last LogId and the highest log key.
    pub fn open(path: &Path, options: PiOptions) -> Result<PiIndex, PiError> {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let db = rocksdb::DB::open(&opts, path).map_err(|source| PiError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let mut last = LogId(0);
        if let Some(v) = db.get(META_LAST)? {
            last = decode_log_id("last log id", &v)?;
        }
        let restoring = match db.get(META_RESTORING)? {
            Some(v) => Some(Restoring {
                upto: decode_log_id("restore marker", &v)?,
                active: false,
                got_last: false,
            }),
            None => None,
        };
        if let Some(r) = restoring {
            tracing::warn!(
                partition = options.partition,
                upto = %r.upto,
                "pi index has an unfinished restore; it must be restored again"
            );
        }
        let top = log_key(LogId(u64::MAX));
        let mut it = db.iterator(rocksdb::IteratorMode::From(
            &top,
            rocksdb::Direction::Reverse,
        ));
        if let Some(item) = it.next() {
            let (k, _) = item?;
            if let Some(id) = log_id_of_key(&k) {
                last = last.max(id);
            }
        }
        drop(it);
        tracing::info!(partition = options.partition, last_log = %last, "pi index opened");
        Ok(PiIndex {
            db,
            partition: options.partition,
            sync: options.sync,
            last_log: last,
            restoring,
        })
    }

    /// The LogId of the snapshot whose restore was begun and not finished, if any (see the
    /// crate's "Snapshots"); while it is `Some`, reads and writes answer
    /// [`PiError::RestoreIncomplete`].
    pub fn restore_incomplete(&self) -> Option<LogId> {
        self.restoring.map(|r| r.upto)
    }

    fn check_usable(&self) -> Result<(), PiError> {
        match self.restoring {
            Some(r) => Err(PiError::RestoreIncomplete { upto: r.upto }),
            None => Ok(()),
        }
    }

    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// Does this partition own `uid` while `partition_num` partitions are published?
    pub fn owns(&self, uid: u64, partition_num: u32) -> bool {
        pixiu_protocol::inbox::owns_uid(uid, self.partition, partition_num)
    }

    /// The last LogId written (0 when the log is empty).
    pub fn last_log_id(&self) -> LogId {
        self.last_log
    }

    fn write_options(&self, sync: bool) -> rocksdb::WriteOptions {
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(sync);
        wo
    }

    /// Makes every write so far durable (fsyncs the write-ahead log): the commit point of
    /// [`Durability::GroupCommit`]. Harmless with [`Durability::Fsync`].
    pub fn flush_wal(&self) -> Result<(), PiError> {
        self.db.flush_wal(true)?;
        Ok(())
    }

    fn contains(&self, uid: u64, id: MsgId) -> Result<bool, PiError> {
        Ok(self.db.get_pinned(index_key(uid, id))?.is_some())
    }

    /// Adds `id` to `uid`'s list; `None` (and no log entry) when it is already there.
    pub fn append(&mut self, uid: u64, id: MsgId) -> Result<Option<LogId>, PiError> {
        let mut r = self.append_many(&[(uid, id)])?;
        Ok(r.pop().flatten())
    }

    /// Adds several `(uid, id)` pairs in one write (one log entry each), e.g. one multicast
    /// message indexed in many inboxes. One result per pair, `None` for a pair already present
    /// (or repeated earlier in `items`).
    pub fn append_many(&mut self, items: &[(u64, MsgId)]) -> Result<Vec<Option<LogId>>, PiError> {
        self.check_usable()?;
        let mut batch = rocksdb::WriteBatch::default();
        let mut next = self.last_log;
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(items.len());
        for &(uid, id) in items {
            if !seen.insert((uid, id)) || self.contains(uid, id)? {
                out.push(None);
                continue;
            }
            next = LogId(next.0 + 1);
            put_op(
                &mut batch,
                LogEntry {
                    id: next,
                    op: Op::Append { uid, id },
                },
            );
            out.push(Some(next));
        }
        if next != self.last_log {
            batch.put(META_LAST, next.0.to_be_bytes());
            self.db
                .write_opt(batch, &self.write_options(self.sync == Durability::Fsync))?;
            self.last_log = next;
        }
        Ok(out)
    }

    /// Up to `count` ids of `uid` above `after` (exclusive), in increasing order.
    pub fn read(&self, uid: u64, after: MsgId, count: usize) -> Result<Vec<MsgId>, PiError> {
        self.check_usable()?;
        let mut out = Vec::new();
        if count == 0 || after.0 == u64::MAX {
            return Ok(out);
        }
        let start = index_key(uid, MsgId(after.0 + 1));
        for item in self.db.iterator(rocksdb::IteratorMode::From(
            &start,
            rocksdb::Direction::Forward,
        )) {
            let (k, _) = item?;
            let Some(id) = id_of_index_key(uid, &k) else {
                break;
            };
            out.push(id);
            if out.len() >= count {
                break;
            }
        }
        Ok(out)
    }

    /// The ids of `uid` up to `upto` (inclusive), as index keys.
    fn keys_upto(&self, uid: u64, upto: MsgId) -> Result<Vec<[u8; 17]>, PiError> {
        let start = index_key(uid, MsgId(0));
        let mut keys = Vec::new();
        for item in self.db.iterator(rocksdb::IteratorMode::From(
            &start,
            rocksdb::Direction::Forward,
        )) {
            let (k, _) = item?;
            match id_of_index_key(uid, &k) {
                Some(id) if id <= upto => keys.push(index_key(uid, id)),
                _ => break,
            }
        }
        Ok(keys)
    }

    /// Drops every id of `uid` up to `upto` (inclusive). `None` (and no log entry) when there
    /// was nothing to drop, so that reading with the seed's ExpireFlag does not grow the log.
    pub fn expire(&mut self, uid: u64, upto: MsgId) -> Result<Option<LogId>, PiError> {
        self.check_usable()?;
        let keys = self.keys_upto(uid, upto)?;
        if keys.is_empty() {
            return Ok(None);
        }
        let id = LogId(self.last_log.0 + 1);
        let mut batch = rocksdb::WriteBatch::default();
        for k in keys {
            batch.delete(k);
        }
        put_op(
            &mut batch,
            LogEntry {
                id,
                op: Op::Expire { uid, upto },
            },
        );
        batch.put(META_LAST, id.0.to_be_bytes());
        self.db
            .write_opt(batch, &self.write_options(self.sync == Durability::Fsync))?;
        self.last_log = id;
        Ok(Some(id))
    }

    /// Up to `max` log entries after `after`, in order, for a follower whose last LogId is
    /// `after`. [`PiError::LogTrimmed`] when entries it needs were trimmed.
    pub fn log_after(&self, after: LogId, max: usize) -> Result<Vec<LogEntry>, PiError> {
        self.check_usable()?;
        let mut out = Vec::new();
        if after >= self.last_log || max == 0 {
            return Ok(out);
        }
        let start = log_key(LogId(after.0 + 1));
        for item in self.db.iterator(rocksdb::IteratorMode::From(
            &start,
            rocksdb::Direction::Forward,
        )) {
            let (k, v) = item?;
            let Some(key) = log_id_of_key(&k) else {
                break;
            };
            if out.is_empty() && key.0 != after.0 + 1 {
                return Err(PiError::LogTrimmed {
                    after,
                    first: Some(key),
                });
            }
            out.push(decode_entry(key, &v)?);
            if out.len() >= max {
                break;
            }
        }
        if out.is_empty() {
            return Err(PiError::LogTrimmed { after, first: None });
        }
        Ok(out)
    }

    /// Replays entries from the leader's [`PiIndex::log_after`]: entries at or below
    /// [`PiIndex::last_log_id`] are skipped (a retried batch is harmless); the others must
    /// continue the log without a gap. Each entry is applied with its own LogId, so the
    /// follower ends up with the leader's index and log. Returns how many were applied.
    pub fn apply_log(&mut self, entries: &[LogEntry]) -> Result<usize, PiError> {
        self.check_usable()?;
        let fresh: Vec<&LogEntry> = entries.iter().filter(|e| e.id > self.last_log).collect();
        for (expected, e) in (self.last_log.0 + 1..).zip(fresh.iter()) {
            if e.id.0 != expected {
                return Err(PiError::Gap {
                    expected,
                    got: e.id.0,
                });
            }
        }
        let n = fresh.len();
        for (i, e) in fresh.into_iter().enumerate() {
            // One batch per entry so that an expire sees the appends before it; only the
            // last write of a group needs the fsync, which covers the earlier ones in the WAL.
            let mut batch = rocksdb::WriteBatch::default();
            if let Op::Expire { uid, upto } = e.op {
                for k in self.keys_upto(uid, upto)? {
                    batch.delete(k);
                }
            }
            put_op(&mut batch, *e);
            batch.put(META_LAST, e.id.0.to_be_bytes());
            let sync = self.sync == Durability::Fsync && i + 1 == n;
            self.db.write_opt(batch, &self.write_options(sync))?;
            self.last_log = e.id;
        }
        Ok(n)
    }

    /// Deletes log entries up to `upto` (inclusive), the seed's bounded log. LogIds keep
    /// increasing from [`PiIndex::last_log_id`]; a follower behind the trimmed part gets
    /// [`PiError::LogTrimmed`] from [`PiIndex::log_after`].
    pub fn trim_log(&mut self, upto: LogId) -> Result<(), PiError> {
        self.check_usable()?;
        let mut batch = rocksdb::WriteBatch::default();
        batch.delete_range(log_key(LogId(0)), log_key(LogId(upto.0.saturating_add(1))));
        if upto.0 == u64::MAX {
            batch.delete(log_key(upto));
        }
        self.db
            .write_opt(batch, &self.write_options(self.sync == Durability::Fsync))?;
        Ok(())
    }

    /// A consistent copy of every index entry and the LogId it corresponds to, read through a
    /// RocksDB snapshot (see the crate's "Snapshots"). Writes made after this call are not in
    /// it; a follower restored from it continues with [`PiIndex::log_after`]`(upto)`.
    pub fn snapshot(&self) -> Result<Snapshot, PiError> {
        self.check_usable()?;
        // Writes take `&mut self`, so `last_log` is the LogId of the view read below.
        let upto = self.last_log;
        let snap = self.db.snapshot();
        let mut entries = Vec::new();
        for item in snap.iterator(rocksdb::IteratorMode::From(
            &[INDEX_PREFIX],
            rocksdb::Direction::Forward,
        )) {
            let (k, _) = item?;
            if k.first() != Some(&INDEX_PREFIX) {
                break;
            }
            let entry = entry_of_index_key(&k).ok_or_else(|| PiError::Corrupt {
                what: "index key".into(),
                reason: format!("{} bytes where 17 are expected", k.len()),
            })?;
            entries.push(entry);
        }
        Ok(Snapshot { upto, entries })
    }

    /// Starts replacing this index with a leader's snapshot at `upto`: writes the
    /// `!restoring` marker and deletes every index entry, the log and the last LogId, in one
    /// synced batch. Until [`PiIndex::restore_finish`] every other call answers
    /// [`PiError::RestoreIncomplete`], across a reopen too. May be called again to start over.
    pub fn restore_begin(&mut self, upto: LogId) -> Result<(), PiError> {
        let mut batch = rocksdb::WriteBatch::default();
        batch.put(META_RESTORING, upto.0.to_be_bytes());
        batch.delete_range([INDEX_PREFIX], [INDEX_PREFIX + 1]);
        batch.delete_range([LOG_PREFIX], [LOG_PREFIX + 1]);
        batch.delete(META_LAST);
        self.db.write_opt(batch, &self.write_options(true))?;
        self.restoring = Some(Restoring {
            upto,
            active: true,
            got_last: false,
        });
        tracing::info!(partition = self.partition, %upto, "pi restore begun");
        Ok(())
    }

    /// Writes the entries of one chunk of the snapshot given to [`PiIndex::restore_begin`].
    /// Chunks may come in any order and be repeated; [`PiIndex::restore_finish`] needs the
    /// chunk marked `last` to have been written (the caller sends them in cursor order).
    pub fn restore_chunk(&mut self, chunk: &SnapshotChunk) -> Result<(), PiError> {
        let r = match self.restoring {
            Some(r) if r.active => r,
            _ => {
                return Err(PiError::Restore(
                    "restore_chunk without restore_begin".into(),
                ))
            }
        };
        if chunk.upto != r.upto {
            return Err(PiError::Restore(format!(
                "chunk of the snapshot at log id {} while restoring the one at {}",
                chunk.upto, r.upto
            )));
        }
        let mut batch = rocksdb::WriteBatch::default();
        for &(uid, id) in &chunk.entries {
            batch.put(index_key(uid, id), []);
        }
        // Not synced: restore_finish fsyncs everything before removing the marker.
        self.db.write_opt(batch, &self.write_options(false))?;
        self.restoring = Some(Restoring {
            got_last: r.got_last || chunk.last,
            ..r
        });
        Ok(())
    }

    /// Completes the restore: fsyncs the chunks, then records the snapshot's LogId as the
    /// last one and removes the `!restoring` marker in one synced batch. The next entry
    /// [`PiIndex::apply_log`] takes is the leader's `upto + 1`.
    pub fn restore_finish(&mut self) -> Result<LogId, PiError> {
        let upto = match self.restoring {
            Some(r) if r.active && r.got_last => r.upto,
            Some(r) if r.active => {
                return Err(PiError::Restore(
                    "restore_finish before the last chunk was written".into(),
                ))
            }
            _ => {
                return Err(PiError::Restore(
                    "restore_finish without restore_begin".into(),
                ))
            }
        };
        self.db.flush_wal(true)?;
        let mut batch = rocksdb::WriteBatch::default();
        batch.put(META_LAST, upto.0.to_be_bytes());
        batch.delete(META_RESTORING);
        self.db.write_opt(batch, &self.write_options(true))?;
        self.last_log = upto;
        self.restoring = None;
        tracing::info!(partition = self.partition, %upto, "pi restore finished");
        Ok(upto)
    }
}

/// A consistent copy of an index ([`PiIndex::snapshot`]): every `(uid, MsgId)` in key order,
/// and the LogId the copy corresponds to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    upto: LogId,
    entries: Vec<(u64, MsgId)>,
}

/// One piece of a [`Snapshot`], as sent to a follower.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotChunk {
    /// The LogId of the whole snapshot (the same in every chunk).
    pub upto: LogId,
    /// Entries in key order, all after the cursor the chunk was asked with.
    pub entries: Vec<(u64, MsgId)>,
    /// No entry of the snapshot follows this chunk.
    pub last: bool,
}

impl Snapshot {
    /// The last LogId when the snapshot was taken.
    pub fn upto(&self) -> LogId {
        self.upto
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Up to `max` (at least 1) entries after the cursor `after` (exclusive; `None` from the
    /// start), the cursor of the next chunk being the last entry of this one. The cursor need
    /// not be an entry of the snapshot.
    pub fn chunk(&self, after: Option<(u64, MsgId)>, max: usize) -> SnapshotChunk {
        let start = match after {
            None => 0,
            Some(a) => self.entries.partition_point(|e| *e <= a),
        };
        self.chunk_from(start, max)
    }

    fn chunk_from(&self, start: usize, max: usize) -> SnapshotChunk {
        let end = start.saturating_add(max.max(1)).min(self.entries.len());
        SnapshotChunk {
            upto: self.upto,
            entries: self.entries[start..end].to_vec(),
            last: end == self.entries.len(),
        }
    }

    /// Every chunk in order, up to `max` (at least 1) entries each; an empty snapshot is one
    /// empty chunk marked `last`.
    pub fn chunks(&self, max: usize) -> impl Iterator<Item = SnapshotChunk> + '_ {
        let mut start = Some(0);
        std::iter::from_fn(move || {
            let s = start?;
            let c = self.chunk_from(s, max);
            start = if c.last {
                None
            } else {
                Some(s + c.entries.len())
            };
            Some(c)
        })
    }
}

/// Puts the log entry of `entry` and, for an append, its index key into `batch` (an expire's
/// deletions are the caller's).
fn put_op(batch: &mut rocksdb::WriteBatch, entry: LogEntry) {
    if let Op::Append { uid, id } = entry.op {
        batch.put(index_key(uid, id), []);
    }
    let v = postcard::to_allocvec(&entry).expect("serializing a log entry into a Vec cannot fail");
    batch.put(log_key(entry.id), v);
}

#[cfg(test)]
mod tests {
    use super::*;
    use pixiu_protocol::inbox::{KIND_MULTICAST, KIND_PERSONAL};

    fn opts() -> PiOptions {
        PiOptions {
            partition: 1,
            sync: Durability::GroupCommit,
        }
    }

    fn p(c: u64) -> MsgId {
        MsgId::new(0, KIND_PERSONAL, c)
    }

    const START: MsgId = MsgId(0);

    #[test]
    fn append_keeps_order_and_no_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let mut pi = PiIndex::open(dir.path(), opts()).unwrap();
        assert_eq!(pi.append(7, p(5)).unwrap(), Some(LogId(1)));
        assert_eq!(pi.append(7, p(2)).unwrap(), Some(LogId(2)));
        assert_eq!(pi.append(7, p(9)).unwrap(), Some(LogId(3)));
        assert_eq!(pi.append(7, p(5)).unwrap(), None, "duplicate");
        assert_eq!(pi.append(8, p(5)).unwrap(), Some(LogId(4)), "another user");
        assert_eq!(pi.last_log_id(), LogId(4));
        assert_eq!(pi.read(7, START, 100).unwrap(), vec![p(2), p(5), p(9)]);
        assert_eq!(pi.read(8, START, 100).unwrap(), vec![p(5)]);
        assert_eq!(pi.read(9, START, 100).unwrap(), vec![]);
        // Neighbouring uids do not bleed into each other.
        pi.append(u64::MAX, p(1)).unwrap();
        pi.append(0, p(1)).unwrap();
        assert_eq!(pi.read(8, START, 100).unwrap(), vec![p(5)]);
        assert_eq!(pi.read(u64::MAX, START, 100).unwrap(), vec![p(1)]);
        pi.flush_wal().unwrap();
    }

    #[test]
    fn append_many_indexes_one_message_in_many_inboxes() {
        let dir = tempfile::tempdir().unwrap();
        let mut pi = PiIndex::open(dir.path(), opts()).unwrap();
        pi.append(2, MsgId::new(0, KIND_MULTICAST, 1)).unwrap();
        let m = MsgId::new(0, KIND_MULTICAST, 1);
        let got = pi.append_many(&[(1, m), (2, m), (3, m), (1, m)]).unwrap();
        assert_eq!(got, vec![Some(LogId(2)), None, Some(LogId(3)), None]);
        for uid in 1..=3 {
            assert_eq!(pi.read(uid, START, 10).unwrap(), vec![m]);
        }
        assert_eq!(pi.append_many(&[]).unwrap(), vec![]);
        assert_eq!(pi.last_log_id(), LogId(3));
    }

    #[test]
    fn read_windows() {
        let dir = tempfile::tempdir().unwrap();
        let mut pi = PiIndex::open(dir.path(), opts()).unwrap();
        for c in 1..=10 {
            pi.append(1, p(c * 10)).unwrap();
        }
        assert_eq!(pi.read(1, START, 3).unwrap(), vec![p(10), p(20), p(30)]);
        assert_eq!(
            pi.read(1, p(30), 2).unwrap(),
            vec![p(40), p(50)],
            "after is exclusive"
        );
        assert_eq!(
            pi.read(1, p(35), 2).unwrap(),
            vec![p(40), p(50)],
            "after need not exist"
        );
        assert_eq!(pi.read(1, p(90), 10).unwrap(), vec![p(100)]);
        assert_eq!(pi.read(1, p(100), 10).unwrap(), vec![]);
        assert_eq!(pi.read(1, START, 0).unwrap(), vec![]);
        assert_eq!(pi.read(1, MsgId(u64::MAX), 10).unwrap(), vec![]);
        assert_eq!(pi.read(1, START, 1000).unwrap().len(), 10);
    }

    #[test]
    fn expire_drops_up_to_inclusive() {
        let dir = tempfile::tempdir().unwrap();
        let mut pi = PiIndex::open(dir.path(), opts()).unwrap();
        for c in 1..=5 {
            pi.append(1, p(c)).unwrap();
            pi.append(2, p(c)).unwrap();
        }
        assert_eq!(pi.expire(1, p(3)).unwrap(), Some(LogId(11)));
        assert_eq!(pi.read(1, START, 10).unwrap(), vec![p(4), p(5)]);
        assert_eq!(
            pi.read(2, START, 10).unwrap().len(),
            5,
            "other users untouched"
        );
        assert_eq!(
            pi.expire(1, p(3)).unwrap(),
            None,
            "nothing left to drop: no log entry"
        );
        assert_eq!(pi.last_log_id(), LogId(11));
        // An expired id may come back (a later append is a new change).
        assert_eq!(pi.append(1, p(2)).unwrap(), Some(LogId(12)));
        assert_eq!(pi.expire(1, MsgId(u64::MAX)).unwrap(), Some(LogId(13)));
        assert_eq!(pi.read(1, START, 10).unwrap(), vec![]);
    }

    #[test]
    fn reopen_keeps_everything_and_log_ids_increase() {
        let dir = tempfile::tempdir().unwrap();
        let entries = {
            let mut pi = PiIndex::open(
                dir.path(),
                PiOptions {
                    partition: 3,
                    sync: Durability::Fsync,
                },
            )
            .unwrap();
            for c in 1..=4 {
                pi.append(1, p(c)).unwrap();
            }
            pi.expire(1, p(1)).unwrap();
            pi.log_after(LogId(0), 100).unwrap()
        };
        assert_eq!(entries.len(), 5);
        let mut pi = PiIndex::open(dir.path(), opts()).unwrap();
        assert_eq!(pi.last_log_id(), LogId(5));
        assert_eq!(pi.read(1, START, 10).unwrap(), vec![p(2), p(3), p(4)]);
        assert_eq!(
            pi.log_after(LogId(0), 100).unwrap(),
            entries,
            "log survives reopen"
        );
        assert_eq!(entries[4].op, Op::Expire { uid: 1, upto: p(1) });
        assert_eq!(pi.append(1, p(9)).unwrap(), Some(LogId(6)));
        // Trimming the whole log does not reset LogIds, across a reopen either.
        pi.trim_log(LogId(6)).unwrap();
        drop(pi);
        let mut pi = PiIndex::open(dir.path(), opts()).unwrap();
        assert_eq!(pi.last_log_id(), LogId(6));
        assert_eq!(pi.append(1, p(10)).unwrap(), Some(LogId(7)));
    }

    #[test]
    fn resumes_from_highest_log_key_when_meta_is_behind() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut pi = PiIndex::open(dir.path(), opts()).unwrap();
            for c in 1..=3 {
                pi.append(1, p(c)).unwrap();
            }
            pi.db.put(META_LAST, 1u64.to_be_bytes()).unwrap();
        }
        let mut pi = PiIndex::open(dir.path(), opts()).unwrap();
        assert_eq!(pi.last_log_id(), LogId(3));
        assert_eq!(pi.append(1, p(4)).unwrap(), Some(LogId(4)));
    }

    #[test]
    fn follower_apply_log_gives_identical_reads() {
        let ldir = tempfile::tempdir().unwrap();
        let fdir = tempfile::tempdir().unwrap();
        let mut leader = PiIndex::open(ldir.path(), opts()).unwrap();
        let mut follower = PiIndex::open(fdir.path(), opts()).unwrap();
        for c in 1..=20u64 {
            leader.append(c % 3, p(c)).unwrap();
            if c % 7 == 0 {
                leader.expire(c % 3, p(c - 2)).unwrap();
            }
        }
        leader
            .append_many(&[(0, p(100)), (1, p(100)), (2, p(100))])
            .unwrap();
        loop {
            let batch = leader.log_after(follower.last_log_id(), 4).unwrap();
            if batch.is_empty() {
                break;
            }
            assert_eq!(follower.apply_log(&batch).unwrap(), batch.len());
            assert_eq!(follower.apply_log(&batch).unwrap(), 0, "retry is harmless");
        }
        assert_eq!(follower.last_log_id(), leader.last_log_id());
        for uid in 0..3 {
            assert_eq!(
                follower.read(uid, START, 100).unwrap(),
                leader.read(uid, START, 100).unwrap()
            );
        }
        assert_eq!(
            follower.log_after(LogId(0), 1000).unwrap(),
            leader.log_after(LogId(0), 1000).unwrap()
        );
        // A follower that restarts resumes at the same LogId, and a gap is refused.
        drop(follower);
        let mut follower = PiIndex::open(fdir.path(), opts()).unwrap();
        assert_eq!(follower.last_log_id(), leader.last_log_id());
        let next = LogId(leader.last_log_id().0 + 2);
        let gap = LogEntry {
            id: next,
            op: Op::Append { uid: 1, id: p(1) },
        };
        assert!(matches!(
            follower.apply_log(&[gap]),
            Err(PiError::Gap { .. })
        ));
    }

    #[test]
    fn trimmed_log_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut pi = PiIndex::open(dir.path(), opts()).unwrap();
        for c in 1..=5 {
            pi.append(1, p(c)).unwrap();
        }
        pi.trim_log(LogId(2)).unwrap();
        assert!(matches!(
            pi.log_after(LogId(0), 10),
            Err(PiError::LogTrimmed {
                first: Some(LogId(3)),
                ..
            })
        ));
        assert_eq!(pi.log_after(LogId(2), 10).unwrap().len(), 3);
        assert_eq!(pi.log_after(LogId(5), 10).unwrap(), vec![]);
        pi.trim_log(LogId(5)).unwrap();
        assert!(matches!(
            pi.log_after(LogId(4), 10),
            Err(PiError::LogTrimmed { first: None, .. })
        ));
        assert_eq!(
            pi.read(1, START, 10).unwrap().len(),
            5,
            "the index is untouched"
        );
    }

    /// A leader with many users, expiries and a trimmed log.
    fn busy_leader(dir: &Path) -> PiIndex {
        let mut leader = PiIndex::open(dir, opts()).unwrap();
        for c in 1..=300u64 {
            leader.append(c % 23, p(c)).unwrap();
            if c % 11 == 0 {
                leader.expire(c % 23, p(c.saturating_sub(40))).unwrap();
            }
        }
        let m = MsgId::new(0, KIND_MULTICAST, 1);
        let all: Vec<(u64, MsgId)> = (0..30).map(|uid| (uid, m)).collect();
        leader.append_many(&all).unwrap();
        leader.append(u64::MAX, p(1)).unwrap();
        leader.trim_log(LogId(leader.last_log_id().0 - 5)).unwrap();
        leader
    }

    fn all_reads(pi: &PiIndex) -> Vec<Vec<MsgId>> {
        (0..40)
            .chain([u64::MAX])
            .map(|uid| pi.read(uid, START, 10_000).unwrap())
            .collect()
    }

    #[test]
    fn follower_restores_from_chunks_then_follows_the_log() {
        let ldir = tempfile::tempdir().unwrap();
        let fdir = tempfile::tempdir().unwrap();
        let mut leader = busy_leader(ldir.path());
        let mut follower = PiIndex::open(fdir.path(), opts()).unwrap();
        // The follower had some stale state of its own, wiped by the restore.
        follower.append(5, p(9999)).unwrap();
        follower.append(77, p(1)).unwrap();
        assert!(matches!(
            leader.log_after(follower.last_log_id(), 10),
            Err(PiError::LogTrimmed { .. })
        ));

        let snap = leader.snapshot().unwrap();
        assert_eq!(snap.upto(), leader.last_log_id());
        // The leader keeps writing while the snapshot is sent.
        leader.append(3, p(1000)).unwrap();
        leader.expire(4, p(200)).unwrap();
        leader.append(39, p(1001)).unwrap();

        follower.restore_begin(snap.upto()).unwrap();
        let mut after = None;
        let mut chunks = 0;
        loop {
            let chunk = snap.chunk(after, 7);
            assert!(chunk.entries.len() <= 7);
            // Retrying a chunk is harmless.
            follower.restore_chunk(&chunk).unwrap();
            follower.restore_chunk(&chunk).unwrap();
            chunks += 1;
            if chunk.last {
                break;
            }
            after = chunk.entries.last().copied();
        }
        assert_eq!(chunks, snap.len().div_ceil(7));
        assert_eq!(follower.restore_finish().unwrap(), snap.upto());
        assert_eq!(follower.last_log_id(), snap.upto());
        assert_eq!(follower.restore_incomplete(), None);

        let batch = leader.log_after(follower.last_log_id(), 100).unwrap();
        assert_eq!(batch.len(), 3);
        assert_eq!(follower.apply_log(&batch).unwrap(), 3);
        assert_eq!(follower.last_log_id(), leader.last_log_id());
        let reads = all_reads(&leader);
        assert_eq!(all_reads(&follower), reads);
        assert!(reads.iter().filter(|r| !r.is_empty()).count() > 30);
        assert_eq!(
            follower.read(77, START, 10).unwrap(),
            vec![],
            "stale state wiped"
        );

        drop(follower);
        let mut follower = PiIndex::open(fdir.path(), opts()).unwrap();
        assert_eq!(follower.restore_incomplete(), None);
        assert_eq!(follower.last_log_id(), leader.last_log_id());
        assert_eq!(all_reads(&follower), reads);
        leader.append(1, p(2000)).unwrap();
        let batch = leader.log_after(follower.last_log_id(), 100).unwrap();
        assert_eq!(follower.apply_log(&batch).unwrap(), 1);
        assert_eq!(all_reads(&follower), all_reads(&leader));
    }

    #[test]
    fn interrupted_restore_is_reported_on_reopen() {
        let ldir = tempfile::tempdir().unwrap();
        let fdir = tempfile::tempdir().unwrap();
        let leader = busy_leader(ldir.path());
        let snap = leader.snapshot().unwrap();
        {
            let mut follower = PiIndex::open(fdir.path(), opts()).unwrap();
            follower.restore_begin(snap.upto()).unwrap();
            let first = snap.chunk(None, 7);
            assert!(!first.last);
            follower.restore_chunk(&first).unwrap();
            assert!(matches!(
                follower.read(0, START, 10),
                Err(PiError::RestoreIncomplete { upto }) if upto == snap.upto()
            ));
            assert!(matches!(
                follower.restore_finish(),
                Err(PiError::Restore(_))
            ));
            // Crash: dropped before restore_finish.
        }
        let mut follower = PiIndex::open(fdir.path(), opts()).unwrap();
        assert_eq!(follower.restore_incomplete(), Some(snap.upto()));
        assert!(matches!(
            follower.read(0, START, 10),
            Err(PiError::RestoreIncomplete { upto }) if upto == snap.upto()
        ));
        assert!(matches!(
            follower.append(1, p(1)),
            Err(PiError::RestoreIncomplete { .. })
        ));
        assert!(matches!(
            follower.apply_log(&[]),
            Err(PiError::RestoreIncomplete { .. })
        ));
        assert!(matches!(
            follower.snapshot(),
            Err(PiError::RestoreIncomplete { .. })
        ));
        // After a reopen the restore must begin again, not resume.
        assert!(matches!(
            follower.restore_chunk(&snap.chunk(None, 7)),
            Err(PiError::Restore(_))
        ));
        drop(follower);
        let mut follower = PiIndex::open(fdir.path(), opts()).unwrap();
        assert_eq!(
            follower.restore_incomplete(),
            Some(snap.upto()),
            "still reported"
        );

        follower.restore_begin(snap.upto()).unwrap();
        let other = SnapshotChunk {
            upto: LogId(snap.upto().0 + 1),
            entries: vec![],
            last: true,
        };
        assert!(matches!(
            follower.restore_chunk(&other),
            Err(PiError::Restore(_))
        ));
        for chunk in snap.chunks(7) {
            follower.restore_chunk(&chunk).unwrap();
        }
        follower.restore_finish().unwrap();
        assert_eq!(all_reads(&follower), all_reads(&leader));
        drop(follower);
        let follower = PiIndex::open(fdir.path(), opts()).unwrap();
        assert_eq!(follower.restore_incomplete(), None);
        assert_eq!(follower.last_log_id(), leader.last_log_id());
    }

    #[test]
    fn snapshot_excludes_later_writes_and_chunks_cover_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut pi = PiIndex::open(dir.path(), opts()).unwrap();
        let empty = pi.snapshot().unwrap();
        assert_eq!(
            empty.chunks(7).collect::<Vec<_>>(),
            vec![SnapshotChunk {
                upto: LogId(0),
                entries: vec![],
                last: true
            }]
        );
        for c in 1..=20u64 {
            pi.append(c % 4, p(c)).unwrap();
        }
        pi.expire(1, p(9)).unwrap();
        let snap = pi.snapshot().unwrap();
        let upto = pi.last_log_id();
        pi.append(1, p(50)).unwrap();
        pi.append(9, p(51)).unwrap();
        pi.expire(2, MsgId(u64::MAX)).unwrap();
        assert_eq!(snap.upto(), upto);

        let chunks: Vec<SnapshotChunk> = snap.chunks(7).collect();
        assert!(chunks
            .iter()
            .all(|c| c.upto == upto && c.entries.len() <= 7));
        assert_eq!(
            chunks.iter().map(|c| c.last).collect::<Vec<_>>(),
            [vec![false; chunks.len() - 1], vec![true]].concat()
        );
        let flat: Vec<(u64, MsgId)> = chunks.into_iter().flat_map(|c| c.entries).collect();
        let mut expected: Vec<(u64, MsgId)> = (1..=20u64)
            .map(|c| (c % 4, p(c)))
            .filter(|&(uid, id)| !(uid == 1 && id <= p(9)))
            .collect();
        expected.sort();
        assert_eq!(
            flat, expected,
            "key order, nothing written after the snapshot"
        );
        assert_eq!(snap.len(), expected.len());
        // A cursor that is not an entry, and one past the end.
        let at = expected.iter().position(|e| e.0 == 2).unwrap();
        assert_eq!(
            snap.chunk(Some((2, MsgId(0))), 2).entries,
            expected[at..at + 2]
        );
        let end = snap.chunk(Some((u64::MAX, MsgId(u64::MAX))), 7);
        assert!(end.last && end.entries.is_empty());
        // A chunk goes over the wire as postcard.
        let c = snap.chunk(None, 3);
        let back: SnapshotChunk =
            postcard::from_bytes(&postcard::to_allocvec(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }
}
