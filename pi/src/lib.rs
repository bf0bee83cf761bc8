//! Pi, the MsgID index of personal inboxes (seed 8.3), as a library: one [`PiIndex`] keeps,
//! for every user of one Pi partition, an ordered, duplicate-free list of [`MsgId`]s (each with
//! its append time) in RocksDB, the ack cursor of each of the user's devices, and an operation
//! log of every change for followers to replay.
//!
//! - [`PiIndex::append`] adds an id to a user's list with its append time (nothing, and no log
//!   entry, when it is already there); [`PiIndex::append_many`] does several at once, e.g. one
//!   multicast message indexed in many inboxes; [`PiIndex::read`] lists ids after a position;
//!   [`PiIndex::expire`] drops ids up to a position.
//! - [`PiIndex::set_cursor`] records what one device of a user acknowledged, and drops what
//!   every known device of the user acknowledged; [`PiIndex::forget_device`] removes a device
//!   (see "Devices and cursors" below).
//! - [`PiIndex::expire_older_than`] is the retention sweep (see "Retention" below).
//! - Every change is one [`LogEntry`] with a [`LogId`], written in the same `WriteBatch` as the
//!   index change. LogIds strictly increase across restarts by construction: the last one is
//!   recorded in each batch, and [`PiIndex::open`] resumes from the larger of that record and
//!   the highest log key. [`PiIndex::log_after`] and [`PiIndex::apply_log`] carry the log from
//!   a leader to a follower, which ends up with the same index, cursors and LogIds.
//! - Durability is explicit, see [`Durability`].
//! - A follower too far behind ([`PiError::LogTrimmed`]) takes a full copy instead:
//!   [`PiIndex::snapshot`] on the leader, [`PiIndex::restore_begin`],
//!   [`PiIndex::restore_chunk`] and [`PiIndex::restore_finish`] on the follower, then
//!   [`PiIndex::apply_log`] from the snapshot's LogId on (see "Snapshots" below).
//!
//! On disk:
//! - `i | uid (8 bytes BE) | MsgId (8 bytes BE)` -> append time, unix milliseconds (8 bytes
//!   BE); a prefix scan reads one user's ids in order;
//! - `c | uid (8 bytes BE) | device (8 bytes BE)` -> the device's ack cursor, a MsgId (8 bytes
//!   BE); a prefix scan reads one user's devices;
//! - `l | LogId (8 bytes BE)` -> postcard([`LogEntry`]);
//! - `!last` -> last LogId (8 bytes BE);
//! - `!restoring` -> LogId of the snapshot being restored (8 bytes BE), present only while a
//!   restore is under way.
//!
//! # Operations
//!
//! Every change is one [`Op`] in the log:
//! - [`Op::Append`] `{ uid, id, ts }`: `id` joins `uid`'s list, `ts` being the value of its
//!   index entry;
//! - [`Op::Expire`] `{ uid, upto }`: every id of `uid` up to `upto` (inclusive) is dropped;
//! - [`Op::Cursor`] `{ uid, device, id }`: the device's cursor becomes the larger of its cursor
//!   and `id` (the device is created when unknown), then every id of `uid` up to the smallest
//!   cursor of `uid`'s devices is dropped;
//! - [`Op::ForgetDevice`] `{ uid, device }`: the device's cursor is removed, then, if devices
//!   remain, every id of `uid` up to the smallest of their cursors is dropped.
//!
//! The effects of an entry are computed from the state just before it, by the same code on
//! the leader and on a follower replaying it, so both end with the same state.
//!
//! # Devices and cursors
//!
//! A user may read its inbox from several devices, each named by a `u64` key the caller
//! computes (a hash). With [`PiIndex::set_cursor`] a device acknowledges every id up to and
//! including a position; its cursor never goes back. Once every *known* device of a user has
//! acknowledged an id nobody needs it any more: the ids up to the smallest cursor are dropped
//! in the same batch as the cursor change. A device is known from its first `set_cursor` on,
//! even one at `MsgId(0)`, which registers it and holds expiry back until it acknowledges;
//! [`PiIndex::forget_device`] removes a device that is gone, which may let expiry proceed. A
//! user without known devices loses ids only by [`PiIndex::expire`] and retention. Expiry
//! runs when a cursor changes: an id appended at or below the smallest cursor afterwards stays
//! until the user's next cursor change (or another expiry).
//!
//! # Retention
//!
//! [`PiIndex::expire_older_than`] drops, for each user having ids appended at or before a
//! cutoff time, every id up to the largest such id (one [`Op::Expire`] per user, at most a
//! given number per call; call again until it answers 0). It scans the index from the start
//! and reads every entry's value: a call costs up to one read per entry of the partition
//! (less when it stops early at its `max_ops`), so it is meant for an infrequent background
//! sweep, not for a request path.
//!
//! # Snapshots
//!
//! [`PiIndex::snapshot`] reads every index entry and every cursor through one RocksDB
//! snapshot, so the copy is one consistent view, together with the LogId it corresponds to
//! ([`Snapshot::upto`], the last LogId at that moment); writes made after the call are not in
//! it. The view is copied into memory (24 bytes per entry and per cursor) so that the leader
//! can keep writing while it is sent: a RocksDB snapshot borrows the database and would block
//! every `&mut self` write for as long as the transfer lasts. [`Snapshot::chunk`] cuts it into
//! [`SnapshotChunk`]s in key order (`uid`, then `MsgId`) with a cursor, the last entry
//! received, so a follower can fetch chunk by chunk over the network and retry one;
//! [`Snapshot::chunks`] yields them all. Every cursor of the snapshot travels in the chunk
//! marked `last` (the other chunks have none): there are far fewer cursors than entries.
//!
//! On the follower, [`PiIndex::restore_begin`] writes the `!restoring` marker and wipes the
//! index, the cursors, the log and `!last` in one synced batch; [`PiIndex::restore_chunk`]
//! writes the entries (and cursors) of a chunk (idempotent: a retried chunk is harmless);
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

pub mod service;

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

/// How [`PiIndex::open`] sets up an index.
#[derive(Clone, Debug)]
pub struct PiOptions {
    /// This index's Pi partition.
    pub partition: u32,
    /// How writes reach the disk.
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

/// One change of the index (see the crate's "Operations").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// `id` joined `uid`'s list at `ts` (unix milliseconds, the caller's clock).
    Append { uid: u64, id: MsgId, ts: u64 },
    /// Every id of `uid` up to `upto` (inclusive) was dropped.
    Expire { uid: u64, upto: MsgId },
    /// `device` of `uid` acknowledged every id up to and including `id`: its cursor became the
    /// larger of its cursor and `id` (the leader logs the resulting cursor), created when the
    /// device was unknown; then every id of `uid` up to the smallest cursor of `uid`'s devices
    /// was dropped.
    Cursor { uid: u64, device: u64, id: MsgId },
    /// `device` of `uid` was forgotten: its cursor was removed, then every id of `uid` up to
    /// the smallest cursor of the remaining devices (if any) was dropped.
    ForgetDevice { uid: u64, device: u64 },
}

/// One entry of the operation log: a change and its position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// The position of the change in the log.
    pub id: LogId,
    /// The change.
    pub op: Op,
}

/// Errors of a [`PiIndex`].
#[derive(Debug, thiserror::Error)]
pub enum PiError {
    /// The database could not be opened.
    #[error("rocksdb at {path}: {source}")]
    Open {
        path: String,
        source: rocksdb::Error,
    },
    /// A read or write of the database failed.
    #[error("rocksdb: {0}")]
    Db(#[from] rocksdb::Error),
    /// Bytes on disk that do not decode.
    #[error("corrupt {what}: {reason}")]
    Corrupt { what: String, reason: String },
    /// [`PiIndex::apply_log`] got entries that do not continue the log.
    #[error("log gap: expected log id {expected}, got {got}")]
    Gap { expected: u64, got: u64 },
    /// [`PiIndex::log_after`]: the entries a follower needs were trimmed.
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
const CURSOR_PREFIX: u8 = b'c';
const INDEX_PREFIX: u8 = b'i';
const LOG_PREFIX: u8 = b'l';

/// `prefix | a (8 bytes BE) | b (8 bytes BE)`.
fn key17(prefix: u8, a: u64, b: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = prefix;
    k[1..9].copy_from_slice(&a.to_be_bytes());
    k[9..].copy_from_slice(&b.to_be_bytes());
    k
}

/// `(a, b)` of a key made by [`key17`] with `prefix`, `None` for any other key.
fn split_key17(prefix: u8, key: &[u8]) -> Option<(u64, u64)> {
    if key.len() != 17 || key[0] != prefix {
        return None;
    }
    let a = u64::from_be_bytes(key[1..9].try_into().ok()?);
    Some((a, u64::from_be_bytes(key[9..].try_into().ok()?)))
}

fn index_key(uid: u64, id: MsgId) -> [u8; 17] {
    key17(INDEX_PREFIX, uid, id.0)
}

/// `(uid, MsgId)` of any index key, `None` for a key that is not one.
fn entry_of_index_key(key: &[u8]) -> Option<(u64, MsgId)> {
    split_key17(INDEX_PREFIX, key).map(|(uid, id)| (uid, MsgId(id)))
}

/// The MsgId of an index key of `uid`, `None` for any other key.
fn id_of_index_key(uid: u64, key: &[u8]) -> Option<MsgId> {
    match entry_of_index_key(key)? {
        (u, id) if u == uid => Some(id),
        _ => None,
    }
}

fn cursor_key(uid: u64, device: u64) -> [u8; 17] {
    key17(CURSOR_PREFIX, uid, device)
}

/// `(uid, device)` of any cursor key, `None` for a key that is not one.
fn device_of_cursor_key(key: &[u8]) -> Option<(u64, u64)> {
    split_key17(CURSOR_PREFIX, key)
}

/// The 8 bytes of a value expected to hold 8 bytes; [`PiError::Corrupt`] naming `what()`
/// otherwise.
fn be8(v: &[u8], what: impl FnOnce() -> String) -> Result<[u8; 8], PiError> {
    v.try_into().map_err(|_| PiError::Corrupt {
        what: what(),
        reason: format!("{} bytes where 8 are expected", v.len()),
    })
}

fn decode_log_id(what: &str, v: &[u8]) -> Result<LogId, PiError> {
    Ok(LogId(u64::from_be_bytes(be8(v, || what.into())?)))
}

/// The append time stored as the value of the index entry of `(uid, id)`.
fn decode_ts(uid: u64, id: MsgId, v: &[u8]) -> Result<u64, PiError> {
    Ok(u64::from_be_bytes(be8(v, || {
        format!("append time of {id} in uid {uid}")
    })?))
}

/// The cursor stored as the value of the cursor key of `(uid, device)`.
fn decode_cursor(uid: u64, device: u64, v: &[u8]) -> Result<MsgId, PiError> {
    Ok(MsgId::from_be_bytes(be8(v, || {
        format!("cursor of device {device} of uid {uid}")
    })?))
}

fn corrupt_key(what: &str, key: &[u8]) -> PiError {
    PiError::Corrupt {
        what: what.into(),
        reason: format!("{} bytes where 17 are expected", key.len()),
    }
}

fn log_key(id: LogId) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = LOG_PREFIX;
    k[1..].copy_from_slice(&id.0.to_be_bytes());
    k
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

/// Puts the log entry `entry` into `batch` (its effects are [`PiIndex::stage`]'s).
fn put_log(batch: &mut rocksdb::WriteBatch, entry: LogEntry) {
    let v = postcard::to_allocvec(&entry).expect("serializing a log entry into a Vec cannot fail");
    batch.put(log_key(entry.id), v);
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

    /// This index's Pi partition.
    pub fn partition(&self) -> u32 {
        self.partition
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

    /// The LogId the next change gets.
    fn next_log_id(&self) -> LogId {
        LogId(self.last_log.0 + 1)
    }

    /// Writes `batch` with `last` recorded as the last LogId (fsynced when `sync`), and makes
    /// `last` the last LogId.
    fn commit(
        &mut self,
        mut batch: rocksdb::WriteBatch,
        last: LogId,
        sync: bool,
    ) -> Result<(), PiError> {
        batch.put(META_LAST, last.0.to_be_bytes());
        self.db.write_opt(batch, &self.write_options(sync))?;
        self.last_log = last;
        Ok(())
    }

    /// Puts the effects of `entry` (see the crate's "Operations"), computed from the database
    /// as it is before `batch` is written, and the log entry itself into `batch`. New changes
    /// and replayed ones both go through here, so a follower ends with the leader's state.
    /// Entries staged into one batch must not depend on each other: appends, or ops of
    /// different users.
    fn stage(&self, batch: &mut rocksdb::WriteBatch, entry: LogEntry) -> Result<(), PiError> {
        match entry.op {
            Op::Append { uid, id, ts } => batch.put(index_key(uid, id), ts.to_be_bytes()),
            Op::Expire { uid, upto } => {
                self.stage_expire(batch, uid, upto)?;
            }
            Op::Cursor { uid, device, id } => {
                let cursor = self.load_cursor(uid, device)?.map_or(id, |old| old.max(id));
                batch.put(cursor_key(uid, device), cursor.to_be_bytes());
                if let Some(min) = self.min_cursor_with(uid, device, Some(cursor))? {
                    self.stage_expire(batch, uid, min)?;
                }
            }
            Op::ForgetDevice { uid, device } => {
                batch.delete(cursor_key(uid, device));
                if let Some(min) = self.min_cursor_with(uid, device, None)? {
                    self.stage_expire(batch, uid, min)?;
                }
            }
        }
        put_log(batch, entry);
        Ok(())
    }

    /// Puts the deletion of every id of `uid` up to `upto` (inclusive) into `batch`; returns
    /// how many there are.
    fn stage_expire(
        &self,
        batch: &mut rocksdb::WriteBatch,
        uid: u64,
        upto: MsgId,
    ) -> Result<usize, PiError> {
        let keys = self.keys_upto(uid, upto)?;
        for k in &keys {
            batch.delete(k);
        }
        Ok(keys.len())
    }

    fn contains(&self, uid: u64, id: MsgId) -> Result<bool, PiError> {
        Ok(self.db.get_pinned(index_key(uid, id))?.is_some())
    }

    /// Adds `id` to `uid`'s list, appended at `ts` (unix milliseconds); `None` (and no log
    /// entry) when it is already there (its append time is then left as it was).
    pub fn append(&mut self, uid: u64, id: MsgId, ts: u64) -> Result<Option<LogId>, PiError> {
        let mut r = self.append_many(&[(uid, id)], ts)?;
        Ok(r.pop().flatten())
    }

    /// Adds several `(uid, id)` pairs, all appended at `ts` (unix milliseconds), in one write
    /// (one log entry each), e.g. one multicast message indexed in many inboxes. One result per
    /// pair, `None` for a pair already present (or repeated earlier in `items`).
    pub fn append_many(
        &mut self,
        items: &[(u64, MsgId)],
        ts: u64,
    ) -> Result<Vec<Option<LogId>>, PiError> {
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
            self.stage(
                &mut batch,
                LogEntry {
                    id: next,
                    op: Op::Append { uid, id, ts },
                },
            )?;
            out.push(Some(next));
        }
        if next != self.last_log {
            self.commit(batch, next, self.sync == Durability::Fsync)?;
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
        let mut batch = rocksdb::WriteBatch::default();
        if self.stage_expire(&mut batch, uid, upto)? == 0 {
            return Ok(None);
        }
        let id = self.next_log_id();
        put_log(
            &mut batch,
            LogEntry {
                id,
                op: Op::Expire { uid, upto },
            },
        );
        self.commit(batch, id, self.sync == Durability::Fsync)?;
        Ok(Some(id))
    }

    /// Retention (see the crate's "Retention"): for each user, in uid order, having ids
    /// appended at or before `cutoff_ts` (unix milliseconds), drops every id up to the largest
    /// such id with one [`Op::Expire`] — ids above it stay even when older. At most `max_ops`
    /// users per call, written in one batch; returns how many ops were written (0 once no id
    /// is that old). Scans the index from its start reading every value: up to one read per
    /// entry of the partition per call.
    pub fn expire_older_than(&mut self, cutoff_ts: u64, max_ops: usize) -> Result<usize, PiError> {
        self.check_usable()?;
        if max_ops == 0 {
            return Ok(0);
        }
        // (uid, largest id of uid appended at or before the cutoff)
        let mut found: Vec<(u64, MsgId)> = Vec::new();
        let mut uid_now = None;
        let mut upto_now = None;
        for item in self.db.iterator(rocksdb::IteratorMode::From(
            &[INDEX_PREFIX],
            rocksdb::Direction::Forward,
        )) {
            let (k, v) = item?;
            if k.first() != Some(&INDEX_PREFIX) {
                break;
            }
            let (uid, id) = entry_of_index_key(&k).ok_or_else(|| corrupt_key("index key", &k))?;
            let ts = decode_ts(uid, id, &v)?;
            if uid_now != Some(uid) {
                if let (Some(prev), Some(upto)) = (uid_now, upto_now.take()) {
                    found.push((prev, upto));
                    if found.len() >= max_ops {
                        break;
                    }
                }
                uid_now = Some(uid);
            }
            if ts <= cutoff_ts {
                // Ids come in increasing order: the last one seen is the largest.
                upto_now = Some(id);
            }
        }
        if let (Some(uid), Some(upto)) = (uid_now, upto_now) {
            found.push((uid, upto));
        }
        if found.is_empty() {
            return Ok(0);
        }
        // One batch: each op touches only its own user's ids.
        let mut batch = rocksdb::WriteBatch::default();
        let mut last = self.last_log;
        for &(uid, upto) in &found {
            last = LogId(last.0 + 1);
            self.stage(
                &mut batch,
                LogEntry {
                    id: last,
                    op: Op::Expire { uid, upto },
                },
            )?;
        }
        self.commit(batch, last, self.sync == Durability::Fsync)?;
        Ok(found.len())
    }

    fn load_cursor(&self, uid: u64, device: u64) -> Result<Option<MsgId>, PiError> {
        match self.db.get_pinned(cursor_key(uid, device))? {
            Some(v) => Ok(Some(decode_cursor(uid, device, &v)?)),
            None => Ok(None),
        }
    }

    fn load_devices(&self, uid: u64) -> Result<Vec<(u64, MsgId)>, PiError> {
        let start = cursor_key(uid, 0);
        let mut out = Vec::new();
        for item in self.db.iterator(rocksdb::IteratorMode::From(
            &start,
            rocksdb::Direction::Forward,
        )) {
            let (k, v) = item?;
            match device_of_cursor_key(&k) {
                Some((u, device)) if u == uid => {
                    out.push((device, decode_cursor(uid, device, &v)?));
                }
                _ => break,
            }
        }
        Ok(out)
    }

    /// The smallest cursor of `uid`'s devices once `device`'s cursor is `cursor` (`None`:
    /// once `device` is forgotten); `None` when no device would remain.
    fn min_cursor_with(
        &self,
        uid: u64,
        device: u64,
        cursor: Option<MsgId>,
    ) -> Result<Option<MsgId>, PiError> {
        let others = self
            .load_devices(uid)?
            .into_iter()
            .filter(|&(d, _)| d != device)
            .map(|(_, c)| c);
        Ok(others.chain(cursor).min())
    }

    /// The ack cursor of `device` of `uid`: every id up to it (inclusive) was acknowledged by
    /// the device. `None` for a device not known.
    pub fn cursor(&self, uid: u64, device: u64) -> Result<Option<MsgId>, PiError> {
        self.check_usable()?;
        self.load_cursor(uid, device)
    }

    /// Every known device of `uid` with its cursor, `(device key, cursor)` in device key order.
    pub fn devices(&self, uid: u64) -> Result<Vec<(u64, MsgId)>, PiError> {
        self.check_usable()?;
        self.load_devices(uid)
    }

    /// `device` of `uid` acknowledged every id up to and including `id` (see the crate's
    /// "Devices and cursors"). Its cursor becomes the larger of its cursor and `id`; an
    /// unknown device is created, even at `MsgId(0)`, from then on holding expiry back until
    /// it acknowledges. When the cursor changed, every id of `uid` up to the smallest cursor
    /// of its devices is dropped in the same batch ([`Op::Cursor`], one log entry). Returns
    /// the device's cursor, and `None` (no write, no log entry) when it did not change.
    pub fn set_cursor(
        &mut self,
        uid: u64,
        device: u64,
        id: MsgId,
    ) -> Result<(MsgId, Option<LogId>), PiError> {
        self.check_usable()?;
        let old = self.load_cursor(uid, device)?;
        let cursor = old.map_or(id, |old| old.max(id));
        if old == Some(cursor) {
            return Ok((cursor, None));
        }
        let log = self.next_log_id();
        let mut batch = rocksdb::WriteBatch::default();
        self.stage(
            &mut batch,
            LogEntry {
                id: log,
                op: Op::Cursor {
                    uid,
                    device,
                    id: cursor,
                },
            },
        )?;
        self.commit(batch, log, self.sync == Durability::Fsync)?;
        Ok((cursor, Some(log)))
    }

    /// Forgets `device` of `uid` (e.g. it logged out): removes its cursor, then, if devices
    /// remain, drops every id of `uid` up to the smallest of their cursors, in one batch
    /// ([`Op::ForgetDevice`], one log entry). `None` (no write, no log entry) for a device not
    /// known.
    pub fn forget_device(&mut self, uid: u64, device: u64) -> Result<Option<LogId>, PiError> {
        self.check_usable()?;
        if self.load_cursor(uid, device)?.is_none() {
            return Ok(None);
        }
        let log = self.next_log_id();
        let mut batch = rocksdb::WriteBatch::default();
        self.stage(
            &mut batch,
            LogEntry {
                id: log,
                op: Op::ForgetDevice { uid, device },
            },
        )?;
        self.commit(batch, log, self.sync == Durability::Fsync)?;
        Ok(Some(log))
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
    /// continue the log without a gap. Each entry is applied with its own LogId and the same
    /// effects as on the leader (the same append times, cursors and expiries), so the
    /// follower ends up with the leader's index, cursors and log. Returns how many were
    /// applied.
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
            // One batch per entry so that each sees the entries before it; only the last
            // write of a group needs the fsync, which covers the earlier ones in the WAL.
            let mut batch = rocksdb::WriteBatch::default();
            self.stage(&mut batch, *e)?;
            let sync = self.sync == Durability::Fsync && i + 1 == n;
            self.commit(batch, e.id, sync)?;
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

    /// A consistent copy of every index entry (with its append time) and every cursor, and
    /// the LogId it corresponds to, read through one RocksDB snapshot (see the crate's
    /// "Snapshots"). Writes made after this call are not in it; a follower restored from it
    /// continues with [`PiIndex::log_after`]`(upto)`.
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
            let (k, v) = item?;
            if k.first() != Some(&INDEX_PREFIX) {
                break;
            }
            let (uid, id) = entry_of_index_key(&k).ok_or_else(|| corrupt_key("index key", &k))?;
            entries.push((uid, id, decode_ts(uid, id, &v)?));
        }
        let mut cursors = Vec::new();
        for item in snap.iterator(rocksdb::IteratorMode::From(
            &[CURSOR_PREFIX],
            rocksdb::Direction::Forward,
        )) {
            let (k, v) = item?;
            if k.first() != Some(&CURSOR_PREFIX) {
                break;
            }
            let (uid, device) =
                device_of_cursor_key(&k).ok_or_else(|| corrupt_key("cursor key", &k))?;
            cursors.push((uid, device, decode_cursor(uid, device, &v)?));
        }
        Ok(Snapshot {
            upto,
            entries,
            cursors,
        })
    }

    /// Starts replacing this index with a leader's snapshot at `upto`: writes the
    /// `!restoring` marker and deletes every index entry, every cursor, the log and the last
    /// LogId, in one synced batch. Until [`PiIndex::restore_finish`] every other call answers
    /// [`PiError::RestoreIncomplete`], across a reopen too. May be called again to start over.
    pub fn restore_begin(&mut self, upto: LogId) -> Result<(), PiError> {
        let mut batch = rocksdb::WriteBatch::default();
        batch.put(META_RESTORING, upto.0.to_be_bytes());
        batch.delete_range([INDEX_PREFIX], [INDEX_PREFIX + 1]);
        batch.delete_range([CURSOR_PREFIX], [CURSOR_PREFIX + 1]);
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

    /// Writes the entries and cursors of one chunk of the snapshot given to
    /// [`PiIndex::restore_begin`]. Chunks may come in any order and be repeated;
    /// [`PiIndex::restore_finish`] needs the chunk marked `last` (the one with the cursors) to
    /// have been written (the caller sends them in cursor order).
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
        for &(uid, id, ts) in &chunk.entries {
            batch.put(index_key(uid, id), ts.to_be_bytes());
        }
        for &(uid, device, cursor) in &chunk.cursors {
            batch.put(cursor_key(uid, device), cursor.to_be_bytes());
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

/// A consistent copy of an index ([`PiIndex::snapshot`]): every `(uid, MsgId, append time)`
/// in key order, every `(uid, device, cursor)`, and the LogId the copy corresponds to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    upto: LogId,
    entries: Vec<(u64, MsgId, u64)>,
    cursors: Vec<(u64, u64, MsgId)>,
}

/// One piece of a [`Snapshot`], as sent to a follower.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotChunk {
    /// The LogId of the whole snapshot (the same in every chunk).
    pub upto: LogId,
    /// `(uid, MsgId, append time)` in key order, all after the cursor the chunk was asked
    /// with.
    pub entries: Vec<(u64, MsgId, u64)>,
    /// Every `(uid, device, cursor)` of the snapshot in the chunk marked `last`; empty in the
    /// other chunks.
    pub cursors: Vec<(u64, u64, MsgId)>,
    /// No entry of the snapshot follows this chunk.
    pub last: bool,
}

impl Snapshot {
    /// The last LogId when the snapshot was taken.
    pub fn upto(&self) -> LogId {
        self.upto
    }

    /// How many index entries the snapshot holds (cursors not counted).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The snapshot holds no index entry (it may hold cursors).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every `(uid, device, cursor)` of the snapshot, in key order.
    pub fn cursors(&self) -> &[(u64, u64, MsgId)] {
        &self.cursors
    }

    /// Up to `max` (at least 1) entries after the cursor `after` (exclusive; `None` from the
    /// start), the cursor of the next chunk being the `(uid, MsgId)` of the last entry of this
    /// one. The cursor need not be an entry of the snapshot. The chunk marked `last` carries
    /// every cursor of the snapshot.
    pub fn chunk(&self, after: Option<(u64, MsgId)>, max: usize) -> SnapshotChunk {
        let start = match after {
            None => 0,
            Some(a) => self.entries.partition_point(|&(uid, id, _)| (uid, id) <= a),
        };
        self.chunk_from(start, max)
    }

    fn chunk_from(&self, start: usize, max: usize) -> SnapshotChunk {
        let end = start.saturating_add(max.max(1)).min(self.entries.len());
        let last = end == self.entries.len();
        SnapshotChunk {
            upto: self.upto,
            entries: self.entries[start..end].to_vec(),
            cursors: if last {
                self.cursors.clone()
            } else {
                Vec::new()
            },
            last,
        }
    }

    /// Every chunk in order, up to `max` (at least 1) entries each, the cursors in the last
    /// one; an empty snapshot is one chunk without entries, marked `last`.
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
    /// An append time (unix ms).
    const TS: u64 = 1_700_000_000_000;

    #[test]
    fn append_keeps_order_and_no_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let mut pi = PiIndex::open(dir.path(), opts()).unwrap();
        assert_eq!(pi.append(7, p(5), TS).unwrap(), Some(LogId(1)));
        assert_eq!(pi.append(7, p(2), TS).unwrap(), Some(LogId(2)));
        assert_eq!(pi.append(7, p(9), TS).unwrap(), Some(LogId(3)));
        assert_eq!(pi.append(7, p(5), TS).unwrap(), None, "duplicate");
        assert_eq!(
            pi.append(8, p(5), TS).unwrap(),
            Some(LogId(4)),
            "another user"
        );
        assert_eq!(pi.last_log_id(), LogId(4));
        assert_eq!(pi.read(7, START, 100).unwrap(), vec![p(2), p(5), p(9)]);
        assert_eq!(pi.read(8, START, 100).unwrap(), vec![p(5)]);
        assert_eq!(pi.read(9, START, 100).unwrap(), vec![]);
        // Neighbouring uids do not bleed into each other.
        pi.append(u64::MAX, p(1), TS).unwrap();
        pi.append(0, p(1), TS).unwrap();
        assert_eq!(pi.read(8, START, 100).unwrap(), vec![p(5)]);
        assert_eq!(pi.read(u64::MAX, START, 100).unwrap(), vec![p(1)]);
        pi.flush_wal().unwrap();
    }

    #[test]
    fn append_many_indexes_one_message_in_many_inboxes() {
        let dir = tempfile::tempdir().unwrap();
        let mut pi = PiIndex::open(dir.path(), opts()).unwrap();
        pi.append(2, MsgId::new(0, KIND_MULTICAST, 1), TS).unwrap();
        let m = MsgId::new(0, KIND_MULTICAST, 1);
        let got = pi
            .append_many(&[(1, m), (2, m), (3, m), (1, m)], TS)
            .unwrap();
        assert_eq!(got, vec![Some(LogId(2)), None, Some(LogId(3)), None]);
        for uid in 1..=3 {
            assert_eq!(pi.read(uid, START, 10).unwrap(), vec![m]);
        }
        assert_eq!(pi.append_many(&[], TS).unwrap(), vec![]);
        assert_eq!(pi.last_log_id(), LogId(3));
    }

    #[test]
    fn read_windows() {
        let dir = tempfile::tempdir().unwrap();
        let mut pi = PiIndex::open(dir.path(), opts()).unwrap();
        for c in 1..=10 {
            pi.append(1, p(c * 10), TS).unwrap();
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
            pi.append(1, p(c), TS).unwrap();
            pi.append(2, p(c), TS).unwrap();
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
        assert_eq!(pi.append(1, p(2), TS).unwrap(), Some(LogId(12)));
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
                pi.append(1, p(c), TS).unwrap();
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
        assert_eq!(pi.append(1, p(9), TS).unwrap(), Some(LogId(6)));
        // Trimming the whole log does not reset LogIds, across a reopen either.
        pi.trim_log(LogId(6)).unwrap();
        drop(pi);
        let mut pi = PiIndex::open(dir.path(), opts()).unwrap();
        assert_eq!(pi.last_log_id(), LogId(6));
        assert_eq!(pi.append(1, p(10), TS).unwrap(), Some(LogId(7)));
    }

    #[test]
    fn resumes_from_highest_log_key_when_meta_is_behind() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut pi = PiIndex::open(dir.path(), opts()).unwrap();
            for c in 1..=3 {
                pi.append(1, p(c), TS).unwrap();
            }
            pi.db.put(META_LAST, 1u64.to_be_bytes()).unwrap();
        }
        let mut pi = PiIndex::open(dir.path(), opts()).unwrap();
        assert_eq!(pi.last_log_id(), LogId(3));
        assert_eq!(pi.append(1, p(4), TS).unwrap(), Some(LogId(4)));
    }

    #[test]
    fn follower_apply_log_gives_identical_reads() {
        let ldir = tempfile::tempdir().unwrap();
        let fdir = tempfile::tempdir().unwrap();
        let mut leader = PiIndex::open(ldir.path(), opts()).unwrap();
        let mut follower = PiIndex::open(fdir.path(), opts()).unwrap();
        for c in 1..=20u64 {
            leader.append(c % 3, p(c), TS).unwrap();
            if c % 7 == 0 {
                leader.expire(c % 3, p(c - 2)).unwrap();
            }
        }
        leader
            .append_many(&[(0, p(100)), (1, p(100)), (2, p(100))], TS)
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
            op: Op::Append {
                uid: 1,
                id: p(1),
                ts: TS,
            },
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
            pi.append(1, p(c), TS).unwrap();
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
            leader.append(c % 23, p(c), TS + c).unwrap();
            if c % 11 == 0 {
                leader.expire(c % 23, p(c.saturating_sub(40))).unwrap();
            }
        }
        let m = MsgId::new(0, KIND_MULTICAST, 1);
        let all: Vec<(u64, MsgId)> = (0..30).map(|uid| (uid, m)).collect();
        leader.append_many(&all, TS).unwrap();
        leader.append(u64::MAX, p(1), TS).unwrap();
        for uid in 0..6 {
            leader.set_cursor(uid, 10, p(150)).unwrap();
            leader.set_cursor(uid, 11, p(100 + uid * 10)).unwrap();
        }
        leader.set_cursor(6, 10, MsgId(0)).unwrap();
        leader.set_cursor(u64::MAX, u64::MAX, p(0)).unwrap();
        leader.trim_log(LogId(leader.last_log_id().0 - 5)).unwrap();
        leader
    }

    /// Every index entry with its append time, and every cursor (read through a snapshot).
    fn state(pi: &PiIndex) -> (Vec<Entry>, Vec<Cursor>) {
        let snap = pi.snapshot().unwrap();
        (snap.entries, snap.cursors)
    }

    /// `(uid, MsgId, append time)`.
    type Entry = (u64, MsgId, u64);
    /// `(uid, device, cursor)`.
    type Cursor = (u64, u64, MsgId);

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
        follower.append(5, p(9999), TS).unwrap();
        follower.append(77, p(1), TS).unwrap();
        assert!(matches!(
            leader.log_after(follower.last_log_id(), 10),
            Err(PiError::LogTrimmed { .. })
        ));

        let snap = leader.snapshot().unwrap();
        assert_eq!(snap.upto(), leader.last_log_id());
        // The leader keeps writing while the snapshot is sent.
        leader.append(3, p(1000), TS).unwrap();
        leader.expire(4, p(200)).unwrap();
        leader.append(39, p(1001), TS).unwrap();

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
            after = chunk.entries.last().map(|&(uid, id, _)| (uid, id));
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
        assert_eq!(state(&follower), state(&leader), "append times and cursors");
        assert_eq!(
            follower.devices(3).unwrap(),
            vec![(10, p(150)), (11, p(130))]
        );
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
        leader.append(1, p(2000), TS).unwrap();
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
            follower.append(1, p(1), TS),
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
            cursors: vec![],
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
        assert_eq!(state(&follower), state(&leader));
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
                cursors: vec![],
                last: true
            }]
        );
        for c in 1..=20u64 {
            pi.append(c % 4, p(c), TS + c).unwrap();
        }
        pi.expire(1, p(9)).unwrap();
        let snap = pi.snapshot().unwrap();
        let upto = pi.last_log_id();
        pi.append(1, p(50), TS).unwrap();
        pi.append(9, p(51), TS).unwrap();
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
        let flat: Vec<(u64, MsgId, u64)> = chunks.into_iter().flat_map(|c| c.entries).collect();
        let mut expected: Vec<(u64, MsgId, u64)> = (1..=20u64)
            .map(|c| (c % 4, p(c), TS + c))
            .filter(|&(uid, id, _)| !(uid == 1 && id <= p(9)))
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

    /// Replays the whole log of `leader` into `follower`, a few entries at a time, each batch
    /// twice (a retry is harmless).
    fn follow(leader: &PiIndex, follower: &mut PiIndex) {
        loop {
            let batch = leader.log_after(follower.last_log_id(), 3).unwrap();
            if batch.is_empty() {
                break;
            }
            assert_eq!(follower.apply_log(&batch).unwrap(), batch.len());
            assert_eq!(follower.apply_log(&batch).unwrap(), 0);
        }
        assert_eq!(follower.last_log_id(), leader.last_log_id());
    }

    /// Restores `follower` from a snapshot of `leader`, 4 entries a chunk.
    fn restore(leader: &PiIndex, follower: &mut PiIndex) {
        let snap = leader.snapshot().unwrap();
        follower.restore_begin(snap.upto()).unwrap();
        for chunk in snap.chunks(4) {
            follower.restore_chunk(&chunk).unwrap();
        }
        follower.restore_finish().unwrap();
    }

    #[test]
    fn append_time_survives_replay_and_restore() {
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let mut leader = PiIndex::open(dirs[0].path(), opts()).unwrap();
        leader.append(1, p(1), 100).unwrap();
        leader.append(1, p(2), 200).unwrap();
        leader.append_many(&[(1, p(3)), (2, p(3))], 300).unwrap();
        assert_eq!(leader.append(1, p(1), 999).unwrap(), None, "duplicate");
        leader.append(u64::MAX, p(9), u64::MAX).unwrap();
        let expected = vec![
            (1, p(1), 100),
            (1, p(2), 200),
            (1, p(3), 300),
            (2, p(3), 300),
            (u64::MAX, p(9), u64::MAX),
        ];
        assert_eq!(
            state(&leader).0,
            expected,
            "a duplicate keeps the first time"
        );
        assert_eq!(
            leader.log_after(LogId(2), 1).unwrap()[0].op,
            Op::Append {
                uid: 1,
                id: p(3),
                ts: 300
            }
        );

        let mut replayed = PiIndex::open(dirs[1].path(), opts()).unwrap();
        follow(&leader, &mut replayed);
        assert_eq!(state(&replayed).0, expected);

        let mut restored = PiIndex::open(dirs[2].path(), opts()).unwrap();
        restore(&leader, &mut restored);
        assert_eq!(state(&restored).0, expected);
        drop(restored);
        let restored = PiIndex::open(dirs[2].path(), opts()).unwrap();
        assert_eq!(state(&restored).0, expected, "after a reopen");
    }

    #[test]
    fn cursor_only_moves_forward_and_logs_only_changes() {
        let dir = tempfile::tempdir().unwrap();
        let mut pi = PiIndex::open(dir.path(), opts()).unwrap();
        assert_eq!(pi.cursor(1, 7).unwrap(), None);
        assert_eq!(pi.devices(1).unwrap(), vec![]);
        assert_eq!(pi.set_cursor(1, 7, p(5)).unwrap(), (p(5), Some(LogId(1))));
        assert_eq!(
            pi.set_cursor(1, 7, p(3)).unwrap(),
            (p(5), None),
            "never back"
        );
        assert_eq!(
            pi.set_cursor(1, 7, p(5)).unwrap(),
            (p(5), None),
            "unchanged"
        );
        assert_eq!(pi.last_log_id(), LogId(1), "no log entry when unchanged");
        assert_eq!(pi.set_cursor(1, 7, p(8)).unwrap(), (p(8), Some(LogId(2))));
        assert_eq!(pi.cursor(1, 7).unwrap(), Some(p(8)));
        // Registering a device at 0 is a change; doing it again is not.
        assert_eq!(
            pi.set_cursor(1, 3, MsgId(0)).unwrap(),
            (MsgId(0), Some(LogId(3)))
        );
        assert_eq!(pi.set_cursor(1, 3, MsgId(0)).unwrap(), (MsgId(0), None));
        assert_eq!(pi.devices(1).unwrap(), vec![(3, MsgId(0)), (7, p(8))]);
        assert_eq!(pi.devices(0).unwrap(), vec![]);
        assert_eq!(pi.devices(2).unwrap(), vec![]);
        assert_eq!(
            pi.log_after(LogId(1), 10)
                .unwrap()
                .into_iter()
                .map(|e| e.op)
                .collect::<Vec<_>>(),
            vec![
                Op::Cursor {
                    uid: 1,
                    device: 7,
                    id: p(8)
                },
                Op::Cursor {
                    uid: 1,
                    device: 3,
                    id: MsgId(0)
                },
            ]
        );
        assert_eq!(pi.forget_device(1, 99).unwrap(), None, "unknown device");
        assert_eq!(pi.forget_device(2, 7).unwrap(), None, "another user's");
        assert_eq!(pi.last_log_id(), LogId(3));
        // Neighbouring uids do not bleed into each other.
        pi.set_cursor(0, u64::MAX, p(1)).unwrap();
        pi.set_cursor(2, 0, p(1)).unwrap();
        assert_eq!(pi.devices(1).unwrap(), vec![(3, MsgId(0)), (7, p(8))]);
        assert_eq!(pi.devices(u64::MAX).unwrap(), vec![]);
        drop(pi);
        let pi = PiIndex::open(dir.path(), opts()).unwrap();
        assert_eq!(pi.cursor(1, 7).unwrap(), Some(p(8)), "survives a reopen");
    }

    #[test]
    fn expiry_waits_for_every_known_device() {
        let dir = tempfile::tempdir().unwrap();
        let mut pi = PiIndex::open(dir.path(), opts()).unwrap();
        for c in 1..=10 {
            pi.append(1, p(c), TS).unwrap();
            pi.append(2, p(c), TS).unwrap();
        }
        let all: Vec<MsgId> = (1..=10).map(p).collect();
        pi.set_cursor(1, 100, MsgId(0)).unwrap();
        pi.set_cursor(1, 200, MsgId(0)).unwrap();
        pi.set_cursor(1, 100, p(6)).unwrap();
        assert_eq!(pi.read(1, START, 100).unwrap(), all, "one device acked");
        pi.set_cursor(1, 200, p(4)).unwrap();
        assert_eq!(pi.read(1, START, 100).unwrap(), all[4..], "up to the min");
        pi.set_cursor(1, 100, p(8)).unwrap();
        assert_eq!(pi.read(1, START, 100).unwrap(), all[4..], "min unchanged");
        pi.set_cursor(1, 200, p(9)).unwrap();
        assert_eq!(pi.read(1, START, 100).unwrap(), all[8..]);
        assert_eq!(
            pi.read(2, START, 100).unwrap(),
            all,
            "other users untouched"
        );
        // A single device expires what it acked.
        pi.set_cursor(2, 100, p(3)).unwrap();
        assert_eq!(pi.read(2, START, 100).unwrap(), all[3..]);
        // The cursor change and its expiry are one log entry.
        assert!(matches!(
            pi.log_after(LogId(pi.last_log_id().0 - 1), 10).unwrap()[..],
            [LogEntry {
                op: Op::Cursor { uid: 2, .. },
                ..
            }]
        ));
    }

    #[test]
    fn new_device_at_zero_blocks_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let mut pi = PiIndex::open(dir.path(), opts()).unwrap();
        for c in 1..=10 {
            pi.append(1, p(c), TS).unwrap();
        }
        pi.set_cursor(1, 100, p(3)).unwrap();
        assert_eq!(pi.read(1, START, 1).unwrap(), vec![p(4)]);
        pi.set_cursor(1, 200, MsgId(0)).unwrap();
        pi.set_cursor(1, 100, p(8)).unwrap();
        assert_eq!(
            pi.read(1, START, 1).unwrap(),
            vec![p(4)],
            "the new device has not acked"
        );
        pi.set_cursor(1, 200, p(5)).unwrap();
        assert_eq!(pi.read(1, START, 1).unwrap(), vec![p(6)]);
    }

    #[test]
    fn forget_device_lets_expiry_proceed() {
        let dir = tempfile::tempdir().unwrap();
        let mut pi = PiIndex::open(dir.path(), opts()).unwrap();
        for c in 1..=10 {
            pi.append(1, p(c), TS).unwrap();
        }
        pi.set_cursor(1, 300, MsgId(0)).unwrap();
        pi.set_cursor(1, 100, p(7)).unwrap();
        pi.set_cursor(1, 200, p(2)).unwrap();
        assert_eq!(pi.read(1, START, 1).unwrap(), vec![p(1)]);
        let before = pi.last_log_id();
        assert_eq!(pi.forget_device(1, 300).unwrap(), Some(LogId(before.0 + 1)));
        assert_eq!(pi.read(1, START, 1).unwrap(), vec![p(3)]);
        assert_eq!(pi.forget_device(1, 200).unwrap(), Some(LogId(before.0 + 2)));
        assert_eq!(pi.read(1, START, 1).unwrap(), vec![p(8)]);
        assert_eq!(pi.devices(1).unwrap(), vec![(100, p(7))]);
        assert_eq!(pi.forget_device(1, 200).unwrap(), None, "already forgotten");
        // The last device forgotten: nothing is expired, nobody holds anything back.
        pi.forget_device(1, 100).unwrap();
        assert_eq!(pi.devices(1).unwrap(), vec![]);
        assert_eq!(pi.cursor(1, 100).unwrap(), None);
        assert_eq!(pi.read(1, START, 10).unwrap(), vec![p(8), p(9), p(10)]);
        assert_eq!(
            pi.log_after(before, 10)
                .unwrap()
                .into_iter()
                .map(|e| e.op)
                .collect::<Vec<_>>(),
            vec![
                Op::ForgetDevice {
                    uid: 1,
                    device: 300
                },
                Op::ForgetDevice {
                    uid: 1,
                    device: 200
                },
                Op::ForgetDevice {
                    uid: 1,
                    device: 100
                },
            ]
        );
    }

    #[test]
    fn follower_replay_gives_identical_cursors_and_devices() {
        let ldir = tempfile::tempdir().unwrap();
        let fdir = tempfile::tempdir().unwrap();
        let mut leader = PiIndex::open(ldir.path(), opts()).unwrap();
        let mut follower = PiIndex::open(fdir.path(), opts()).unwrap();
        for c in 1..=60u64 {
            leader.append(c % 4, p(c), TS + c).unwrap();
            if c % 5 == 0 {
                leader.set_cursor(c % 4, c % 3, p(c - 3)).unwrap();
            }
            if c % 13 == 0 {
                leader.set_cursor(c % 4, 9, MsgId(0)).unwrap();
            }
            if c % 17 == 0 {
                leader.forget_device(c % 4, 9).unwrap();
            }
            if c == 40 {
                leader.expire_older_than(TS + 10, 2).unwrap();
                // Appended again below the min cursor: dropped with the next cursor change.
                leader.append(0, p(1), TS + 100).unwrap();
            }
        }
        leader.set_cursor(0, 1, p(100)).unwrap();
        leader.expire(3, p(50)).unwrap();
        follow(&leader, &mut follower);
        assert_eq!(state(&follower), state(&leader));
        assert!(!state(&leader).1.is_empty());
        for uid in 0..5 {
            assert_eq!(
                follower.read(uid, START, 100).unwrap(),
                leader.read(uid, START, 100).unwrap()
            );
            assert_eq!(follower.devices(uid).unwrap(), leader.devices(uid).unwrap());
            for device in [0, 1, 2, 9] {
                assert_eq!(
                    follower.cursor(uid, device).unwrap(),
                    leader.cursor(uid, device).unwrap()
                );
            }
        }
        assert_eq!(
            follower.log_after(LogId(0), 1000).unwrap(),
            leader.log_after(LogId(0), 1000).unwrap()
        );
        // Both keep going in step after a reopen.
        drop(follower);
        let mut follower = PiIndex::open(fdir.path(), opts()).unwrap();
        leader.forget_device(1, 1).unwrap();
        leader.set_cursor(2, 0, p(1000)).unwrap();
        follow(&leader, &mut follower);
        assert_eq!(state(&follower), state(&leader));
    }

    #[test]
    fn snapshot_and_restore_carry_cursors() {
        let ldir = tempfile::tempdir().unwrap();
        let fdir = tempfile::tempdir().unwrap();
        let mut leader = PiIndex::open(ldir.path(), opts()).unwrap();
        for c in 1..=20u64 {
            leader.append(c % 2, p(c), TS + c).unwrap();
        }
        leader.set_cursor(0, 5, p(4)).unwrap();
        leader.set_cursor(0, 6, MsgId(0)).unwrap();
        leader.set_cursor(1, 5, p(3)).unwrap();
        leader.set_cursor(7, 1, p(1)).unwrap();
        let mut follower = PiIndex::open(fdir.path(), opts()).unwrap();
        // Stale cursors of the follower, wiped by the restore.
        follower.set_cursor(0, 99, p(1)).unwrap();
        follower.set_cursor(8, 1, p(1)).unwrap();

        let snap = leader.snapshot().unwrap();
        let cursors = vec![(0, 5, p(4)), (0, 6, MsgId(0)), (1, 5, p(3)), (7, 1, p(1))];
        assert_eq!(snap.cursors(), cursors);
        // Changed after the snapshot: not in it.
        leader.set_cursor(0, 6, p(10)).unwrap();
        leader.set_cursor(9, 9, p(9)).unwrap();
        let chunks: Vec<SnapshotChunk> = snap.chunks(4).collect();
        assert!(chunks.len() > 1);
        for c in &chunks[..chunks.len() - 1] {
            assert!(c.cursors.is_empty(), "cursors only in the last chunk");
        }
        assert_eq!(chunks[chunks.len() - 1].cursors, cursors);
        assert_eq!(
            snap.chunk(Some((u64::MAX, MsgId(u64::MAX))), 4).cursors,
            cursors
        );

        follower.restore_begin(snap.upto()).unwrap();
        for chunk in &chunks {
            follower.restore_chunk(chunk).unwrap();
        }
        follower.restore_finish().unwrap();
        assert_eq!(state(&follower).1, cursors);
        assert_eq!(follower.devices(0).unwrap(), vec![(5, p(4)), (6, MsgId(0))]);
        assert_eq!(follower.devices(8).unwrap(), vec![], "stale cursor wiped");
        let batch = leader.log_after(follower.last_log_id(), 100).unwrap();
        assert_eq!(follower.apply_log(&batch).unwrap(), 2);
        assert_eq!(state(&follower), state(&leader));
        assert_eq!(follower.read(0, START, 1).unwrap(), vec![p(6)]);

        // Cursors alone, without any entry.
        let dir = tempfile::tempdir().unwrap();
        let mut only = PiIndex::open(dir.path(), opts()).unwrap();
        only.set_cursor(3, 3, p(3)).unwrap();
        let snap = only.snapshot().unwrap();
        assert!(snap.is_empty());
        let chunks: Vec<SnapshotChunk> = snap.chunks(4).collect();
        assert_eq!(chunks.len(), 1);
        assert!(chunks[0].last && chunks[0].entries.is_empty());
        assert_eq!(chunks[0].cursors, vec![(3, 3, p(3))]);
    }

    #[test]
    fn expire_older_than_mixed_timestamps() {
        let dir = tempfile::tempdir().unwrap();
        let mut pi = PiIndex::open(dir.path(), opts()).unwrap();
        // uid 1: the largest old id is p(3); p(2), newer, goes with it, p(4) stays.
        pi.append(1, p(1), 100).unwrap();
        pi.append(1, p(2), 300).unwrap();
        pi.append(1, p(3), 150).unwrap();
        pi.append(1, p(4), 500).unwrap();
        // uid 2: nothing old.
        pi.append(2, p(1), 400).unwrap();
        // uid 3: exactly at the cutoff.
        pi.append(3, p(5), 200).unwrap();
        pi.append(3, p(6), 201).unwrap();
        // uid 4 and u64::MAX: everything old.
        pi.append(4, p(1), 50).unwrap();
        pi.append(4, p(2), 60).unwrap();
        pi.append(u64::MAX, p(1), 0).unwrap();
        let before = pi.last_log_id();
        assert_eq!(pi.expire_older_than(200, 0).unwrap(), 0);
        assert_eq!(pi.expire_older_than(200, 2).unwrap(), 2);
        assert_eq!(pi.read(1, START, 10).unwrap(), vec![p(4)]);
        assert_eq!(pi.read(3, START, 10).unwrap(), vec![p(6)]);
        assert_eq!(pi.read(4, START, 10).unwrap().len(), 2, "beyond max_ops");
        assert_eq!(pi.expire_older_than(200, 2).unwrap(), 2);
        assert_eq!(pi.expire_older_than(200, 2).unwrap(), 0, "nothing old left");
        assert_eq!(pi.read(4, START, 10).unwrap(), vec![]);
        assert_eq!(pi.read(u64::MAX, START, 10).unwrap(), vec![]);
        assert_eq!(pi.read(2, START, 10).unwrap(), vec![p(1)]);
        assert_eq!(
            pi.log_after(before, 10)
                .unwrap()
                .into_iter()
                .map(|e| e.op)
                .collect::<Vec<_>>(),
            vec![
                Op::Expire { uid: 1, upto: p(3) },
                Op::Expire { uid: 3, upto: p(5) },
                Op::Expire { uid: 4, upto: p(2) },
                Op::Expire {
                    uid: u64::MAX,
                    upto: p(1)
                },
            ],
            "one expire per user"
        );
        assert_eq!(pi.expire_older_than(u64::MAX, 100).unwrap(), 3);
        assert_eq!(state(&pi).0, vec![]);
    }

    #[test]
    fn corrupt_values_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let mut pi = PiIndex::open(dir.path(), opts()).unwrap();
        pi.append(1, p(1), TS).unwrap();
        pi.db.put(cursor_key(1, 7), [1u8, 2, 3]).unwrap();
        let corrupt = |r: Result<_, PiError>| matches!(r, Err(PiError::Corrupt { .. }));
        assert!(corrupt(pi.cursor(1, 7).map(|_| ())));
        assert!(corrupt(pi.devices(1).map(|_| ())));
        assert!(corrupt(pi.set_cursor(1, 7, p(5)).map(|_| ())));
        assert!(
            corrupt(pi.set_cursor(1, 8, p(5)).map(|_| ())),
            "min of the devices"
        );
        assert!(corrupt(pi.forget_device(1, 7).map(|_| ())));
        assert!(corrupt(pi.snapshot().map(|_| ())));
        assert_eq!(pi.last_log_id(), LogId(1), "nothing written");
        assert_eq!(pi.read(1, START, 10).unwrap(), vec![p(1)]);
        assert_eq!(pi.cursor(2, 7).unwrap(), None, "other users readable");

        pi.db.put(index_key(2, p(1)), [9u8]).unwrap();
        assert!(corrupt(pi.expire_older_than(u64::MAX, 10).map(|_| ())));
        let e = pi.expire_older_than(u64::MAX, 10).unwrap_err().to_string();
        assert!(e.contains("append time"), "{e}");
    }
}
