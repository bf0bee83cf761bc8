//! Retention: records older than the retention period are deleted, on every replica, as a
//! prefix of the counter space. The **floor** is the highest expired counter (with the `ts` of
//! that record); everything at or below it is gone (record, sid entry, index by user) and a
//! read of it answers [`XiuError::Expired`]. Each replica expires on its own clock from the
//! same records, and never its last record nor an id not yet indexed in Pi; so a follower's
//! position always names a record it holds, and its leader either holds that record too
//! (compared as always), or has expired it (the position is at or below the leader's floor:
//! then the follower is told the floor and moves up to it, see the service). Expiry never
//! looks like divergence.

use crate::{check_record, history, msg_key, sid_key, XiuError, XiuStore, MSG_PREFIX};
use pixiu_protocol::inbox::{MsgId, KIND_NONE};
use pixiu_storage::WriteBatch;

pub(crate) const META_FLOOR: &[u8] = b"!floor";

/// The expired prefix: every counter up to `counter` is gone; `ts` is that record's time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Floor {
    pub counter: u64,
    pub ts: u64,
}

impl Floor {
    fn encode(&self) -> [u8; 16] {
        let mut v = [0u8; 16];
        v[..8].copy_from_slice(&self.counter.to_be_bytes());
        v[8..].copy_from_slice(&self.ts.to_be_bytes());
        v
    }

    pub(crate) fn decode(v: &[u8]) -> Result<Floor, XiuError> {
        let bad = || XiuError::CorruptMeta {
            what: "retention floor".into(),
            reason: format!("{} bytes where 16 are expected", v.len()),
        };
        let counter = v.get(..8).and_then(|b| b.try_into().ok()).ok_or_else(bad)?;
        let ts = v
            .get(8..16)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(bad)?;
        Ok(Floor {
            counter: u64::from_be_bytes(counter),
            ts: u64::from_be_bytes(ts),
        })
    }
}

impl XiuStore {
    /// The expired prefix (counter 0 when nothing expired).
    pub fn floor(&self) -> Floor {
        self.floor
    }

    /// Deletes the oldest records appended before `cutoff_ts`, in counter order, stopping at
    /// the first younger one, at `upto` (never past it) and after `max` records; never the
    /// last record. Returns how many were deleted.
    pub fn expire_before(
        &mut self,
        cutoff_ts: u64,
        upto: u64,
        max: usize,
    ) -> Result<usize, XiuError> {
        let upto = upto.min(self.last.counter().saturating_sub(1));
        let mut batch = WriteBatch::default();
        let mut floor = self.floor;
        let mut n = 0;
        for item in self
            .db
            .scan_from(&msg_key(floor.counter + 1), &[MSG_PREFIX])
        {
            let (k, v) = item?;
            let Some(counter) = crate::counter_of_key(&k) else {
                break;
            };
            if counter > upto || n >= max {
                break;
            }
            let msg = check_record(counter, MsgId::new(self.partition, KIND_NONE, counter), &v)?;
            if msg.ts >= cutoff_ts {
                break;
            }
            batch.delete(k);
            batch.delete(sid_key(msg.sid));
            history::unindex_message(&mut batch, &msg);
            floor = Floor {
                counter,
                ts: msg.ts,
            };
            n += 1;
        }
        if n > 0 {
            self.set_floor(batch, floor)?;
        }
        Ok(n)
    }

    /// Moves the floor up to `counter` (a leader's, reported to a follower whose position is
    /// below it): deletes whatever this copy holds up to there and moves its counter past it.
    pub fn expire_through(&mut self, counter: u64, ts: u64) -> Result<(), XiuError> {
        if counter <= self.floor.counter {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        for item in self
            .db
            .scan_from(&msg_key(self.floor.counter + 1), &[MSG_PREFIX])
        {
            let (k, v) = item?;
            match crate::counter_of_key(&k) {
                Some(c) if c <= counter => {
                    if let Ok(m) = check_record(c, MsgId::new(self.partition, KIND_NONE, c), &v) {
                        batch.delete(sid_key(m.sid));
                        history::unindex_message(&mut batch, &m);
                    }
                    batch.delete(k);
                }
                _ => break,
            }
        }
        self.set_floor(batch, Floor { counter, ts })?;
        self.advance_counter(counter)?;
        Ok(())
    }

    fn set_floor(&mut self, mut batch: WriteBatch, floor: Floor) -> Result<(), XiuError> {
        batch.put(META_FLOOR, floor.encode());
        self.db.write_synced(batch)?;
        self.floor = floor;
        if let Some(c) = &mut self.cache {
            c.clear();
        }
        Ok(())
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
            partition: 2,
            cache_entries: 8,
            sync: Durability::GroupCommit,
        };
        XiuStore::open(dir, o).unwrap()
    }

    #[test]
    fn old_records_go_as_a_prefix_the_last_stays_and_ids_keep_growing() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path());
        let mut ids = Vec::new();
        for (sid, ts) in [(1, 10), (2, 20), (3, 5), (4, 40), (5, 50)] {
            ids.push(s.store(sid, KIND_PERSONAL, 1, &[7], "x", ts).unwrap().0);
        }
        // before 30: 1 and 2 go, then 3 (older, but behind them) too; 4 is younger: stop
        assert_eq!(s.expire_before(30, u64::MAX, 100).unwrap(), 3);
        assert_eq!(s.floor(), Floor { counter: 3, ts: 5 });
        assert!(matches!(
            s.read(&[ids[0]])[0],
            Err(XiuError::Expired { .. })
        ));
        assert!(s.read(&[ids[3]])[0].is_ok());
        assert_eq!(s.history(7, 0, u64::MAX, None, 10).unwrap().len(), 2);
        // the sid of an expired record is forgotten too
        assert!(s.store(1, KIND_PERSONAL, 1, &[7], "again", 60).unwrap().1);
        // never the last record, never past `upto`
        assert_eq!(s.expire_before(u64::MAX, 4, 100).unwrap(), 1);
        assert_eq!(
            s.expire_before(u64::MAX, u64::MAX, 100).unwrap(),
            1,
            "5 goes, the new one stays"
        );
        // across a reopen: the floor, and ids above every earlier one
        drop(s);
        let mut s = open(dir.path());
        assert_eq!(s.floor().counter, 5);
        let next = s.store(9, KIND_PERSONAL, 1, &[7], "y", 70).unwrap().0;
        assert!(next.counter() > 6, "{next}");
    }

    #[test]
    fn a_follower_below_its_leaders_floor_moves_up_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = open(dir.path());
        f.store(1, KIND_PERSONAL, 1, &[7], "x", 10).unwrap();
        f.expire_through(40, 99).unwrap();
        assert_eq!(
            f.floor(),
            Floor {
                counter: 40,
                ts: 99
            }
        );
        assert_eq!(f.last_id().counter(), 40);
        assert!(f.history(7, 0, u64::MAX, None, 10).unwrap().is_empty());
        // it then applies the leader's records after the floor
        let mut l = open(tempfile::tempdir().unwrap().path());
        l.advance_counter(40).unwrap();
        l.store(2, KIND_PERSONAL, 1, &[7], "y", 100).unwrap();
        let entries = l.entries_after(MsgId::new(2, KIND_NONE, 40), 10).unwrap();
        assert_eq!(f.apply_replicated(&entries).unwrap(), 1);
    }
}
