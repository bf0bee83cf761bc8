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
//! - [`PiIndex::expire_older_than`] is one bounded step of the retention sweep (see
//!   "Retention" below).
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
//! - [`Op::Moved`] `{ uid }`: the user moved to another partition; its ids and devices go;
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
//! runs when a cursor changes, over the ids above the smallest cursor before the change (those
//! up to it went with that change), so its cost does not grow with what the user acknowledged
//! before: an id appended at or below the smallest cursor afterwards (none is, while ids only
//! grow) stays until an explicit expiry, a forgotten device, the user moving, or retention.
//!
//! # Retention
//!
//! [`PiIndex::expire_older_than`] drops, for each user whose list starts with ids appended at
//! or before a cutoff time, that run of ids, up to the first one appended after the cutoff
//! (one [`Op::Expire`] per user). No id appended after the cutoff is dropped; an old id behind
//! a younger one (ids from different Xiu partitions can arrive out of time order) stays until
//! the younger one is old too. A call visits a bounded number of users from a given uid and
//! says where to go on ([`Sweep::next`]), so a sweep of a whole partition is many short calls
//! and whoever holds the index between them (the service's lock) is free again after each: it
//! reads each user's old run and the id after it, never the whole index at once.
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
//! Whether a uid belongs to this partition is the caller's check
//! (`pixiu_protocol::routing::owns_user`): the
//! partition count changes while a doubling is under way.
//!
//! # Doubling
//!
//! A new partition takes its users over from its parent: [`PiIndex::adopt_chunk`] merges
//! their part of the parent's snapshot, [`PiIndex::adopt_log`] re-does their part of the
//! parent's log after it, each as this index's own changes (own LogIds). Once the doubling is
//! complete the parent removes them with [`PiIndex::drop_users`].

pub mod service;

use pixiu_protocol::inbox::MsgId;
use pixiu_storage::{Db, WriteBatch};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::Path;

pub use pixiu_storage::Durability;

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
    /// `uid` moved to another partition (a doubling): every id and device of it was dropped.
    /// A new partition copying its parent's log never re-does this one.
    Moved { uid: u64 },
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
    /// The database could not be opened, or a read or write of it failed.
    #[error(transparent)]
    Storage(#[from] pixiu_storage::StorageError),
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

mod adopt;
mod keys;
mod snapshot;

use keys::*;
pub use snapshot::{Snapshot, SnapshotChunk};

/// What one call of [`PiIndex::expire_older_than`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sweep {
    /// Users with ids visited.
    pub visited: usize,
    /// Of them, users whose old ids were dropped (one [`Op::Expire`] each).
    pub expired: usize,
    /// The uid to go on from, `None` once the last user was visited.
    pub next: Option<u64>,
}

/// The MsgId index and operation log of one Pi partition.
pub struct PiIndex {
    db: Db,
    partition: u32,
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
        let db = Db::open(path, pixiu_storage::Options::compressed(options.sync))?;
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
        if let Some((k, _)) = db.last_at_or_below(&log_key(LogId(u64::MAX)))? {
            if let Some(id) = log_id_of_key(&k) {
                last = last.max(id);
            }
        }
        tracing::info!(partition = options.partition, last_log = %last, "pi index opened");
        Ok(PiIndex {
            db,
            partition: options.partition,
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

    /// Makes every write so far durable (fsyncs the write-ahead log): the commit point of
    /// [`Durability::GroupCommit`]. Harmless with [`Durability::Fsync`].
    pub fn flush_wal(&self) -> Result<(), PiError> {
        self.db.flush_wal()?;
        Ok(())
    }

    /// The LogId the next change gets.
    fn next_log_id(&self) -> LogId {
        LogId(self.last_log.0 + 1)
    }

    /// Writes `batch` with `last` recorded as the last LogId, and makes `last` the last LogId.
    /// With the index's [`Durability`] when `durable`, else to the WAL only (a later durable
    /// write of the same group covers it).
    fn commit(&mut self, mut batch: WriteBatch, last: LogId, durable: bool) -> Result<(), PiError> {
        batch.put(META_LAST, last.0.to_be_bytes());
        if durable {
            self.db.write(batch)?;
        } else {
            self.db.write_unsynced(batch)?;
        }
        self.last_log = last;
        Ok(())
    }

    /// Puts the effects of `entry` (see the crate's "Operations"), computed from the database
    /// as it is before `batch` is written, and the log entry itself into `batch`. New changes
    /// and replayed ones both go through here, so a follower ends with the leader's state.
    /// Entries staged into one batch must not depend on each other: appends, or ops of
    /// different users.
    fn stage(&self, batch: &mut WriteBatch, entry: LogEntry) -> Result<(), PiError> {
        match entry.op {
            Op::Append { uid, id, ts } => batch.put(index_key(uid, id), ts.to_be_bytes()),
            Op::Expire { uid, upto } => {
                self.stage_expire(batch, uid, None, upto)?;
            }
            Op::Cursor { uid, device, id } => {
                // one read of the user's devices: this one's cursor, and the smallest before
                // and after the change
                let devices = self.load_devices(uid)?;
                let old = devices.iter().find(|(d, _)| *d == device).map(|(_, c)| *c);
                let cursor = old.map_or(id, |old| old.max(id));
                let others = devices
                    .iter()
                    .filter(|(d, _)| *d != device)
                    .map(|(_, c)| *c);
                // the ids up to the smallest cursor before this change went with that change
                let before = others.clone().chain(old).min();
                let min = others.chain(Some(cursor)).min().unwrap_or(cursor);
                batch.put(cursor_key(uid, device), cursor.to_be_bytes());
                self.stage_expire(batch, uid, before, min)?;
            }
            Op::Moved { uid } => {
                self.stage_expire(batch, uid, None, MsgId(u64::MAX))?;
                for (device, _) in self.load_devices(uid)? {
                    batch.delete(cursor_key(uid, device));
                }
            }
            Op::ForgetDevice { uid, device } => {
                batch.delete(cursor_key(uid, device));
                if let Some(min) = self.min_cursor_with(uid, device, None)? {
                    self.stage_expire(batch, uid, None, min)?;
                }
            }
        }
        put_log(batch, entry);
        Ok(())
    }

    /// Puts the deletion of every id of `uid` above `after` (all when `None`) up to `upto`
    /// (inclusive) into `batch`; returns how many there are.
    fn stage_expire(
        &self,
        batch: &mut WriteBatch,
        uid: u64,
        after: Option<MsgId>,
        upto: MsgId,
    ) -> Result<usize, PiError> {
        let keys = self.keys_between(uid, after, upto)?;
        for k in &keys {
            batch.delete(k);
        }
        Ok(keys.len())
    }

    fn contains(&self, uid: u64, id: MsgId) -> Result<bool, PiError> {
        Ok(self.db.contains(index_key(uid, id))?)
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
        let mut batch = WriteBatch::default();
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
            self.commit(batch, next, true)?;
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
        for item in self.db.scan_from(&start, &user_prefix(INDEX_PREFIX, uid)) {
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

    /// The ids of `uid` above `after` (from the first when `None`) up to `upto` (inclusive), as
    /// index keys. The scan starts at `after`: deleted ids leave tombstones that a scan from the
    /// list's start walks over until a compaction removes them, so a scan per acknowledgement
    /// from the start would cost more with every id acknowledged before.
    fn keys_between(
        &self,
        uid: u64,
        after: Option<MsgId>,
        upto: MsgId,
    ) -> Result<Vec<[u8; 17]>, PiError> {
        let mut keys = Vec::new();
        let prefix = user_prefix(INDEX_PREFIX, uid);
        let start = match after {
            Some(MsgId(u64::MAX)) => return Ok(keys),
            Some(a) => index_key(uid, MsgId(a.0 + 1)).to_vec(),
            None => prefix.to_vec(),
        };
        for item in self.db.scan_from(&start, &prefix) {
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
        let mut batch = WriteBatch::default();
        if self.stage_expire(&mut batch, uid, None, upto)? == 0 {
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
        self.commit(batch, id, true)?;
        Ok(Some(id))
    }

    /// Retention (see the crate's "Retention"): visits up to `max_users` users with ids, in uid
    /// order from `from_uid`, and for each whose list starts with ids appended at or before
    /// `cutoff_ts` (unix milliseconds) drops that run, up to the first id appended after the
    /// cutoff, with one [`Op::Expire`]; all of them in one batch. Reads per user only that run
    /// and the id after it, so a call costs about `max_users` short scans plus what it drops.
    pub fn expire_older_than(
        &mut self,
        cutoff_ts: u64,
        from_uid: u64,
        max_users: usize,
    ) -> Result<Sweep, PiError> {
        self.check_usable()?;
        let mut found: Vec<(u64, MsgId)> = Vec::new();
        let mut uid = from_uid;
        let mut visited = 0;
        let next = loop {
            if visited >= max_users {
                break Some(uid);
            }
            let Some((user, old)) = self.old_run(uid, cutoff_ts)? else {
                break None;
            };
            visited += 1;
            if let Some(upto) = old {
                found.push((user, upto));
            }
            match user.checked_add(1) {
                Some(n) => uid = n,
                None => break None,
            }
        };
        if !found.is_empty() {
            // One batch: each op touches only its own user's ids.
            let mut batch = WriteBatch::default();
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
            self.commit(batch, last, true)?;
        }
        Ok(Sweep {
            visited,
            expired: found.len(),
            next,
        })
    }

    /// The first user at or after `from` having ids, and the last id of the run at the start
    /// of its list appended at or before `cutoff_ts` (`None` when its first id is younger).
    fn old_run(&self, from: u64, cutoff_ts: u64) -> Result<Option<(u64, Option<MsgId>)>, PiError> {
        let mut user = None;
        let mut upto = None;
        for item in self
            .db
            .scan_from(&user_prefix(INDEX_PREFIX, from), &[INDEX_PREFIX])
        {
            let (k, v) = item?;
            let (uid, id) = entry_of_index_key(&k).ok_or_else(|| corrupt_key("index key", &k))?;
            match user {
                None => user = Some(uid),
                Some(u) if u != uid => break,
                Some(_) => {}
            }
            if decode_ts(uid, id, &v)? > cutoff_ts {
                break;
            }
            upto = Some(id);
        }
        Ok(user.map(|u| (u, upto)))
    }

    fn load_cursor(&self, uid: u64, device: u64) -> Result<Option<MsgId>, PiError> {
        match self.db.get(cursor_key(uid, device))? {
            Some(v) => Ok(Some(decode_cursor(uid, device, &v)?)),
            None => Ok(None),
        }
    }

    fn load_devices(&self, uid: u64) -> Result<Vec<(u64, MsgId)>, PiError> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix(&user_prefix(CURSOR_PREFIX, uid)) {
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
        let mut batch = WriteBatch::default();
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
        self.commit(batch, log, true)?;
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
        let mut batch = WriteBatch::default();
        self.stage(
            &mut batch,
            LogEntry {
                id: log,
                op: Op::ForgetDevice { uid, device },
            },
        )?;
        self.commit(batch, log, true)?;
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
        for item in self.db.scan_from(&start, &[LOG_PREFIX]) {
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
        // A run of appends reads nothing, so it goes in one write; any other op reads what
        // the entries before it wrote, so what is staged is written before it is staged.
        // Only the last write needs the fsync, which covers the earlier ones in the WAL.
        let mut batch = WriteBatch::default();
        let mut staged: Option<LogId> = None;
        for (i, e) in fresh.into_iter().enumerate() {
            let reads = !matches!(e.op, Op::Append { .. });
            if reads {
                if let Some(last) = staged.take() {
                    self.commit(std::mem::take(&mut batch), last, false)?;
                }
            }
            self.stage(&mut batch, *e)?;
            staged = Some(e.id);
            if reads || i + 1 == n {
                staged = None;
                self.commit(std::mem::take(&mut batch), e.id, i + 1 == n)?;
            }
        }
        Ok(n)
    }

    /// Deletes log entries up to `upto` (inclusive), the seed's bounded log. LogIds keep
    /// increasing from [`PiIndex::last_log_id`]; a follower behind the trimmed part gets
    /// [`PiError::LogTrimmed`] from [`PiIndex::log_after`].
    pub fn trim_log(&mut self, upto: LogId) -> Result<(), PiError> {
        self.check_usable()?;
        let mut batch = WriteBatch::default();
        batch.delete_range(log_key(LogId(0)), log_key(LogId(upto.0.saturating_add(1))));
        if upto.0 == u64::MAX {
            batch.delete(log_key(upto));
        }
        self.db.write(batch)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
