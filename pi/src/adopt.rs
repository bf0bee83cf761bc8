//! A doubling's data moves (seed 8.3.4), without IO: a new partition's index **adopts** its
//! users from its parent's snapshot and log, each change re-done here as a change of its own
//! (own LogIds, so its followers replicate it as usual); after the doubling the parent
//! **drops** the users it no longer owns. Which users belong where is the caller's `owns`.

use crate::{LogEntry, LogId, Op, PiError, PiIndex, SnapshotChunk};
use pixiu_protocol::inbox::MsgId;
use pixiu_storage::WriteBatch;
use std::collections::{BTreeMap, BTreeSet};

impl PiIndex {
    /// Merges the entries and cursors of one chunk of the parent's snapshot whose users
    /// satisfy `owns`: ids are appended with their append times (ids already here are left),
    /// cursors only move forward, each user's lowest first (so no id a device has not
    /// acknowledged is dropped). Returns how many changes were made.
    pub fn adopt_chunk(
        &mut self,
        chunk: &SnapshotChunk,
        owns: impl Fn(u64) -> bool,
    ) -> Result<usize, PiError> {
        let mut by_ts: BTreeMap<u64, Vec<(u64, MsgId)>> = BTreeMap::new();
        for (uid, id, ts) in chunk.entries.iter().filter(|e| owns(e.0)) {
            by_ts.entry(*ts).or_default().push((*uid, *id));
        }
        let mut changes = 0;
        for (ts, items) in by_ts {
            changes += self.append_many(&items, ts)?.iter().flatten().count();
        }
        // Each cursor change drops the user's ids up to the smallest cursor of the devices
        // known here at that moment. In device order, a device ahead of another not yet
        // adopted would drop the ids the one behind still has to get; lowest first, every
        // change keeps what the devices not yet adopted have not acknowledged.
        let mut cursors: Vec<(u64, u64, MsgId)> = chunk
            .cursors
            .iter()
            .filter(|c| owns(c.0))
            .copied()
            .collect();
        cursors.sort_unstable_by_key(|&(uid, device, cursor)| (uid, cursor, device));
        for (uid, device, cursor) in cursors {
            changes += usize::from(self.set_cursor(uid, device, cursor)?.1.is_some());
        }
        Ok(changes)
    }

    /// Re-does the parent's log `entries` up to `upto` (inclusive; `None`: all) whose users
    /// satisfy `owns`, in order. Returns how many changes were made.
    pub fn adopt_log(
        &mut self,
        entries: &[LogEntry],
        upto: Option<LogId>,
        owns: impl Fn(u64) -> bool,
    ) -> Result<usize, PiError> {
        let mut changes = 0;
        for e in entries.iter().filter(|e| upto.is_none_or(|u| e.id <= u)) {
            let changed = match e.op {
                Op::Append { uid, id, ts } if owns(uid) => self.append(uid, id, ts)?.is_some(),
                Op::Expire { uid, upto: till } if owns(uid) => self.expire(uid, till)?.is_some(),
                Op::Cursor { uid, device, id } if owns(uid) => {
                    self.set_cursor(uid, device, id)?.1.is_some()
                }
                Op::ForgetDevice { uid, device } if owns(uid) => {
                    self.forget_device(uid, device)?.is_some()
                }
                // the parent dropping users it no longer owns: never the child's to re-do
                Op::Moved { .. } => false,
                _ => false,
            };
            changes += usize::from(changed);
        }
        Ok(changes)
    }

    /// Drops every user that `keep` refuses: all its ids and devices, one logged
    /// [`Op::Moved`] each (followers drop them too; a child copying this log skips them).
    /// Returns how many users were dropped.
    pub fn drop_users(&mut self, keep: impl Fn(u64) -> bool) -> Result<usize, PiError> {
        let snap = self.snapshot()?;
        let users: BTreeSet<u64> = snap
            .entries
            .iter()
            .map(|(uid, _, _)| *uid)
            .chain(snap.cursors().iter().map(|(uid, _, _)| *uid))
            .filter(|uid| !keep(*uid))
            .collect();
        for uid in &users {
            let mut batch = WriteBatch::default();
            let id = self.next_log_id();
            self.stage(
                &mut batch,
                LogEntry {
                    id,
                    op: Op::Moved { uid: *uid },
                },
            )?;
            self.commit(batch, id, true)?;
        }
        Ok(users.len())
    }
}
