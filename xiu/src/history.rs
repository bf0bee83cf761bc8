//! A user's stored messages by time, for `pixiu-ctl replay` (seed 8.2 keeps every message in
//! Xiu; Pi's lists only point at them). Every record is indexed per receiver under
//! `u | uid (8 bytes BE) | ts (8 bytes BE) | counter (8 bytes BE)` (empty value), written in
//! the same batch as the record (on the leader and on followers) and deleted with it; so a
//! window `[since, until)` of one user is one range scan of the index, then one read per
//! message, whatever the partition's size. A store written before the index existed is
//! indexed once when it is opened (`!uindex` marks it done).

use crate::{check_record, msg_key, XiuError, XiuStore};
use pixiu_protocol::inbox::{MsgId, StoredMessage, KIND_NONE, MAX_COUNTER};
use pixiu_storage::{Db, WriteBatch};

const USER_PREFIX: u8 = b'u';
pub(crate) const META_USER_INDEX: &[u8] = b"!uindex";

fn user_key(uid: u64, ts: u64, counter: u64) -> [u8; 25] {
    let mut k = [0u8; 25];
    k[0] = USER_PREFIX;
    k[1..9].copy_from_slice(&uid.to_be_bytes());
    k[9..17].copy_from_slice(&ts.to_be_bytes());
    k[17..].copy_from_slice(&counter.to_be_bytes());
    k
}

/// `(ts, counter)` of an index key of `uid`, `None` for any other key.
fn entry_of_user_key(uid: u64, key: &[u8]) -> Option<(u64, u64)> {
    let (head, rest) = key.split_first()?;
    if *head != USER_PREFIX || rest.len() != 24 || rest[..8] != uid.to_be_bytes() {
        return None;
    }
    let ts = u64::from_be_bytes(rest[8..16].try_into().ok()?);
    let counter = u64::from_be_bytes(rest[16..].try_into().ok()?);
    Some((ts, counter))
}

/// Puts the index entries of `msg` (one per receiver) into `batch`.
pub(crate) fn index_message(batch: &mut WriteBatch, msg: &StoredMessage) {
    for k in index_keys(msg) {
        batch.put(k, []);
    }
}

/// The index keys of `msg`, one per receiver.
pub(crate) fn index_keys(msg: &StoredMessage) -> impl Iterator<Item = [u8; 25]> + '_ {
    msg.to
        .iter()
        .map(|uid| user_key(*uid, msg.ts, msg.id.counter()))
}

/// Puts the deletion of `msg`'s index entries into `batch`.
pub(crate) fn unindex_message(batch: &mut WriteBatch, msg: &StoredMessage) {
    for uid in &msg.to {
        batch.delete(user_key(*uid, msg.ts, msg.id.counter()));
    }
}

/// Indexes every readable record of a store opened without the index; returns how many.
pub(crate) fn build_index(db: &Db, partition: u8) -> Result<usize, XiuError> {
    let mut batch = WriteBatch::default();
    let mut n = 0;
    for item in db.scan_prefix(&[crate::MSG_PREFIX]) {
        let (k, v) = item?;
        let Some(counter) = crate::counter_of_key(&k) else {
            continue;
        };
        match check_record(counter, MsgId::new(partition, KIND_NONE, counter), &v) {
            Ok(msg) => {
                index_message(&mut batch, &msg);
                n += 1;
            }
            Err(e) => tracing::error!(counter, "not indexing an unreadable record: {e}"),
        }
    }
    batch.put(META_USER_INDEX, [1u8]);
    db.write_synced(batch)?;
    Ok(n)
}

/// One message of [`XiuStore::history`]: its position and what reading it gave.
#[derive(Debug)]
pub struct History {
    pub ts: u64,
    pub id: MsgId,
    pub read: Result<StoredMessage, XiuError>,
}

impl XiuStore {
    /// Up to `max` messages of `uid` with `since <= ts < until`, oldest first (by `ts`, then
    /// id), after the `(ts, id)` position `after` when given, each with its `(ts, id)`
    /// position. An index entry whose record is unreadable is returned as its error (never as
    /// data), with its position all the same, so a caller pages past it.
    pub fn history(
        &mut self,
        uid: u64,
        since: u64,
        until: u64,
        after: Option<(u64, MsgId)>,
        max: usize,
    ) -> Result<Vec<History>, XiuError> {
        let mut found: Vec<(u64, MsgId)> = Vec::new();
        let start = match after {
            Some((ts, id)) if ts >= since => {
                user_key(uid, ts, id.counter().saturating_add(1).min(MAX_COUNTER))
            }
            _ => user_key(uid, since, 0),
        };
        let prefix = user_key(uid, 0, 0);
        for item in self.db.scan_from(&start, &prefix[..9]) {
            let (k, _) = item?;
            let Some((ts, counter)) = entry_of_user_key(uid, &k) else {
                break;
            };
            if ts >= until || found.len() >= max {
                break;
            }
            found.push((ts, MsgId::new(self.partition(), KIND_NONE, counter)));
        }
        Ok(found
            .into_iter()
            .map(|(ts, id)| {
                let read = self.read_counter(id.counter());
                let id = read.as_ref().map(|m| m.id).unwrap_or(id);
                History { ts, id, read }
            })
            .collect())
    }

    /// The receivers that have messages here and satisfy `wanted`, in uid order, among the
    /// next `max` receivers after `after` (one index seek each); and the last receiver looked
    /// at when more may follow (`None`: the index is exhausted).
    pub fn users(
        &self,
        wanted: impl Fn(u64) -> bool,
        after: Option<u64>,
        max: usize,
    ) -> Result<(Vec<u64>, Option<u64>), XiuError> {
        let mut out = Vec::new();
        let mut next = match after {
            Some(u64::MAX) => return Ok((out, None)),
            Some(u) => u + 1,
            None => 0,
        };
        for _ in 0..max {
            let start = user_key(next, 0, 0);
            let Some(item) = self.db.scan_from(&start, &[USER_PREFIX]).next() else {
                return Ok((out, None));
            };
            let (k, _) = item?;
            let Some(uid) = k
                .get(1..9)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
            else {
                return Ok((out, None));
            };
            if wanted(uid) {
                out.push(uid);
            }
            if uid == u64::MAX {
                return Ok((out, None));
            }
            next = uid + 1;
        }
        Ok((out, next.checked_sub(1)))
    }

    /// The record with counter `counter`, whatever its kind, CRC checked.
    fn read_counter(&mut self, counter: u64) -> Result<StoredMessage, XiuError> {
        let named = MsgId::new(self.partition(), KIND_NONE, counter);
        let Some(raw) = self.db.get(msg_key(counter))? else {
            return Err(XiuError::NotFound(named));
        };
        check_record(counter, named, &raw)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{Durability, XiuOptions};
    use pixiu_protocol::inbox::KIND_PERSONAL;

    fn open(dir: &std::path::Path) -> XiuStore {
        let o = XiuOptions {
            partition: 3,
            cache_entries: 0,
            sync: Durability::GroupCommit,
        };
        XiuStore::open(dir, o).unwrap()
    }

    fn bodies(h: Vec<History>) -> Vec<String> {
        h.into_iter().map(|h| h.read.unwrap().body).collect()
    }

    #[test]
    fn a_users_window_pages_oldest_first_on_leader_and_follower() {
        let (ldir, fdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut s = open(ldir.path());
        for (sid, to, ts) in [(1, vec![7], 300), (2, vec![7, 8], 100), (3, vec![8], 200)] {
            let body = format!("m{sid}");
            s.store(sid, KIND_PERSONAL, 1, &to, &body, ts).unwrap();
        }
        s.store(4, KIND_PERSONAL, 1, &[7], "m4", 200).unwrap();
        assert_eq!(
            bodies(s.history(7, 0, u64::MAX, None, 10).unwrap()),
            ["m2", "m4", "m1"]
        );
        assert_eq!(
            bodies(s.history(7, 150, 300, None, 10).unwrap()),
            ["m4"],
            "until is open"
        );
        assert_eq!(
            bodies(s.history(8, 0, u64::MAX, None, 10).unwrap()),
            ["m2", "m3"]
        );
        assert!(s.history(9, 0, u64::MAX, None, 10).unwrap().is_empty());
        // pages of one, each after the last one seen
        let mut after = None;
        let mut seen = Vec::new();
        while let Some(h) = s.history(7, 0, u64::MAX, after, 1).unwrap().pop() {
            after = Some((h.ts, h.id));
            seen.push(h.read.unwrap().body);
        }
        assert_eq!(seen, ["m2", "m4", "m1"]);
        // a follower indexes what it copies, and a dropped tail leaves the index
        let mut f = open(fdir.path());
        f.apply_replicated(&s.entries_after(MsgId::new(3, KIND_NONE, 0), 10).unwrap())
            .unwrap();
        assert_eq!(
            bodies(f.history(7, 0, u64::MAX, None, 10).unwrap()),
            ["m2", "m4", "m1"]
        );
        f.truncate_after(2).unwrap(); // m4 (counter 4) goes
        assert_eq!(
            bodies(f.history(7, 0, u64::MAX, None, 10).unwrap()),
            ["m2", "m1"]
        );
    }

    #[test]
    fn receivers_are_listed_once_in_uid_order_and_filtered() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path());
        for (sid, to) in [
            (1, vec![9, 4]),
            (2, vec![4]),
            (3, vec![u64::MAX]),
            (4, vec![6]),
        ] {
            s.store(sid, KIND_PERSONAL, 1, &to, "x", sid).unwrap();
        }
        assert_eq!(
            s.users(|_| true, None, 10).unwrap(),
            (vec![4, 6, 9, u64::MAX], None)
        );
        assert_eq!(
            s.users(|u| u % 2 == 0, None, 10).unwrap(),
            (vec![4, 6], None)
        );
        // a page looks at `max` receivers, matching or not, and says where to go on
        assert_eq!(s.users(|u| u % 2 == 1, None, 2).unwrap(), (vec![], Some(6)));
        assert_eq!(
            s.users(|_| true, Some(4), 2).unwrap(),
            (vec![6, 9], Some(9))
        );
        assert_eq!(
            s.users(|_| true, Some(u64::MAX), 2).unwrap(),
            (vec![], None)
        );
    }

    #[test]
    fn a_store_without_the_index_is_indexed_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = open(dir.path());
            s.store(1, KIND_PERSONAL, 1, &[7], "old", 5).unwrap();
            // as a store written before the index existed
            let mut batch = WriteBatch::default();
            batch.delete(user_key(7, 5, 1));
            batch.delete(META_USER_INDEX);
            s.db.write_synced(batch).unwrap();
            assert!(s.history(7, 0, u64::MAX, None, 10).unwrap().is_empty());
        }
        let mut s = open(dir.path());
        assert_eq!(
            bodies(s.history(7, 0, u64::MAX, None, 10).unwrap()),
            ["old"]
        );
    }
}
