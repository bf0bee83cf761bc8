//! Snapshots of a Pi index for a follower that is too far behind to replay the log: a
//! consistent copy read through one RocksDB snapshot, sent in chunks, restored with a marker
//! so an interrupted restore is reported on reopen.

use crate::keys::*;
use crate::{LogId, PiError, PiIndex, Restoring};
use pixiu_protocol::inbox::MsgId;
use pixiu_storage::WriteBatch;
use serde::{Deserialize, Serialize};

impl PiIndex {
    /// A consistent copy of every index entry (with its append time) and every cursor, and
    /// the LogId it corresponds to, read through one RocksDB snapshot (see the crate's
    /// "Snapshots"). Writes made after this call are not in it; a follower restored from it
    /// continues with [`PiIndex::log_after`]`(upto)`.
    pub fn snapshot(&self) -> Result<Snapshot, PiError> {
        self.check_usable()?;
        // Writes take `&mut self`, so `last_log` is the LogId of the view read below.
        read_snapshot(self.last_log, &self.db.snapshot())
    }

    /// The same copy as [`PiIndex::snapshot`], holding `index` (the guard of the lock the
    /// index lives under) only while the view is taken, not while every entry is read: at a
    /// million entries the read takes about 0.1 s, which every append and read of the
    /// partition used to wait out whenever a follower or a new partition copied a snapshot.
    pub fn snapshot_released<G>(index: G) -> Result<Snapshot, PiError>
    where
        G: std::ops::Deref<Target = PiIndex>,
    {
        index.check_usable()?;
        // as in `snapshot`: no write can come between these two lines while `index` is held
        let upto = index.last_log;
        let reader = index.db.reader();
        let view = reader.snapshot();
        drop(index);
        read_snapshot(upto, &view)
    }

    /// Starts replacing this index with a leader's snapshot at `upto`: writes the
    /// `!restoring` marker and deletes every index entry, every cursor, the log and the last
    /// LogId, in one synced batch. Until [`PiIndex::restore_finish`] every other call answers
    /// [`PiError::RestoreIncomplete`], across a reopen too. May be called again to start over.
    pub fn restore_begin(&mut self, upto: LogId) -> Result<(), PiError> {
        let mut batch = WriteBatch::default();
        batch.put(META_RESTORING, upto.0.to_be_bytes());
        batch.delete_range([INDEX_PREFIX], [INDEX_PREFIX + 1]);
        batch.delete_range([CURSOR_PREFIX], [CURSOR_PREFIX + 1]);
        batch.delete_range([LOG_PREFIX], [LOG_PREFIX + 1]);
        batch.delete(META_LAST);
        self.db.write_synced(batch)?;
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
        let mut batch = WriteBatch::default();
        for &(uid, id, ts) in &chunk.entries {
            batch.put(index_key(uid, id), ts.to_be_bytes());
        }
        for &(uid, device, cursor) in &chunk.cursors {
            batch.put(cursor_key(uid, device), cursor.to_be_bytes());
        }
        // Not synced: restore_finish fsyncs everything before removing the marker.
        self.db.write_unsynced(batch)?;
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
        self.db.flush_wal()?;
        let mut batch = WriteBatch::default();
        batch.put(META_LAST, upto.0.to_be_bytes());
        batch.delete(META_RESTORING);
        self.db.write_synced(batch)?;
        self.last_log = upto;
        self.restoring = None;
        tracing::info!(partition = self.partition, %upto, "pi restore finished");
        Ok(upto)
    }
}

/// Every index entry and cursor seen through `view`, which shows the index as of `upto`.
fn read_snapshot(upto: LogId, view: &pixiu_storage::Snapshot<'_>) -> Result<Snapshot, PiError> {
    let mut entries = Vec::new();
    for item in view.scan_prefix(&[INDEX_PREFIX]) {
        let (k, v) = item?;
        let (uid, id) = entry_of_index_key(&k).ok_or_else(|| corrupt_key("index key", &k))?;
        entries.push((uid, id, decode_ts(uid, id, &v)?));
    }
    let mut cursors = Vec::new();
    for item in view.scan_prefix(&[CURSOR_PREFIX]) {
        let (k, v) = item?;
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

/// A consistent copy of an index ([`PiIndex::snapshot`]): every `(uid, MsgId, append time)`
/// in key order, every `(uid, device, cursor)`, and the LogId the copy corresponds to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub(crate) upto: LogId,
    pub(crate) entries: Vec<(u64, MsgId, u64)>,
    pub(crate) cursors: Vec<(u64, u64, MsgId)>,
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
