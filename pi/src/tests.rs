//! Unit tests of the Pi index.
#![allow(clippy::unwrap_used, clippy::expect_used)]

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

/// A snapshot read after the index lock is released (`snapshot_released`): appends go on
/// while it is read, and the copy is still exactly the index at its LogId (a follower
/// restored from it and fed the log after it ends equal to the leader).
#[test]
fn a_snapshot_is_read_outside_the_lock_and_is_exact_at_its_log_id() {
    use std::sync::atomic::{AtomicBool, AtomicU64};
    use std::sync::{Arc, Mutex};
    let ldir = tempfile::tempdir().unwrap();
    let leader = PiIndex::open(ldir.path(), opts()).unwrap();
    let leader = Arc::new(Mutex::new(leader));
    {
        let mut l = leader.lock().unwrap();
        for chunk in 0..50u64 {
            let items: Vec<(u64, MsgId)> = (0..1_000)
                .map(|k| (k % 97, p(chunk * 1_000 + k + 1)))
                .collect();
            l.append_many(&items, TS).unwrap();
        }
        l.set_cursor(3, 7, p(0)).unwrap();
    }
    // a writer appends (and moves a cursor) as fast as the lock lets it
    let (appended, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let writer = {
        let (leader, appended, stop) = (leader.clone(), appended.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut c = 1_000_000;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && c < 1_200_000 {
                c += 1;
                let mut l = leader.lock().unwrap();
                l.append(c % 97, p(c), TS + 1).unwrap();
                if c % 10 == 0 {
                    l.set_cursor(3, 7, p(c - 5)).unwrap();
                }
                // counted under the lock: nothing is counted while a reader holds it
                appended.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(l);
            }
        })
    };
    let mut during = Vec::new();
    let mut snaps = Vec::new();
    for _ in 0..3 {
        let guard = leader.lock().unwrap();
        let before = appended.load(std::sync::atomic::Ordering::SeqCst);
        let snap = PiIndex::snapshot_released(guard).unwrap();
        during.push(appended.load(std::sync::atomic::Ordering::SeqCst) - before);
        snaps.push(snap);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.join().unwrap();
    assert!(
        during.iter().any(|n| *n > 0),
        "appends went on while snapshots were read: {during:?}"
    );
    let leader = leader.lock().unwrap();
    for snap in snaps {
        let fdir = tempfile::tempdir().unwrap();
        let mut follower = PiIndex::open(fdir.path(), opts()).unwrap();
        follower.restore_begin(snap.upto()).unwrap();
        for chunk in snap.chunks(10_000) {
            follower.restore_chunk(&chunk).unwrap();
        }
        follower.restore_finish().unwrap();
        let mut at = follower.last_log_id();
        while at < leader.last_log_id() {
            let log = leader.log_after(at, 5_000).unwrap();
            follower.apply_log(&log).unwrap();
            at = follower.last_log_id();
        }
        assert_eq!(state(&follower), state(&leader));
    }
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
    let back: SnapshotChunk = postcard::from_bytes(&postcard::to_allocvec(&c).unwrap()).unwrap();
    assert_eq!(back, c);
}

/// Replays the whole log of `leader` into `follower`, a few entries at a time, each batch
/// twice (a retry is harmless).
fn follow(leader: &PiIndex, follower: &mut PiIndex) {
    follow_by(leader, follower, 3);
}

/// Follows `leader`'s log `chunk` entries a pull.
fn follow_by(leader: &PiIndex, follower: &mut PiIndex, chunk: usize) {
    loop {
        let batch = leader.log_after(follower.last_log_id(), chunk).unwrap();
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
            leader.expire_older_than(TS + 10, 0, 2).unwrap();
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

/// A follower writes a run of appends in one batch; an op that reads (a cursor, a forget, an
/// expiry) must still see the appends before it in the same pull.
#[test]
fn a_pull_of_mixed_ops_gives_the_state_of_one_op_at_a_time() {
    let ldir = tempfile::tempdir().unwrap();
    let mut leader = PiIndex::open(ldir.path(), opts()).unwrap();
    for c in 1..=120u64 {
        leader.append(c % 5, p(c), TS + c).unwrap();
        if c % 9 == 0 {
            // acknowledges ids appended just before, in the same pull
            leader.set_cursor(c % 5, c % 2, p(c)).unwrap();
        }
        if c % 25 == 0 {
            leader.forget_device(c % 5, 1).unwrap();
        }
        if c % 31 == 0 {
            leader.expire(c % 5, p(c - 1)).unwrap();
        }
    }
    let mut states = Vec::new();
    for chunk in [1, 7, 10_000] {
        let fdir = tempfile::tempdir().unwrap();
        let mut follower = PiIndex::open(fdir.path(), opts()).unwrap();
        follow_by(&leader, &mut follower, chunk);
        assert_eq!(state(&follower), state(&leader), "{chunk} entries a pull");
        assert_eq!(all_reads(&follower), all_reads(&leader));
        states.push(state(&follower));
    }
    assert!(!states[0].1.is_empty(), "cursors were replayed");
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
    // uid 1: the run at the start appended by the cutoff is p(1); p(2) is younger, so it and
    // the old p(3) behind it stay.
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
    let sweep = |visited, expired, next| Sweep {
        visited,
        expired,
        next,
    };
    assert_eq!(
        pi.expire_older_than(200, 0, 0).unwrap(),
        sweep(0, 0, Some(0))
    );
    // users 1 and 2; the next step begins after user 2
    assert_eq!(
        pi.expire_older_than(200, 0, 2).unwrap(),
        sweep(2, 1, Some(3))
    );
    assert_eq!(pi.read(1, START, 10).unwrap(), vec![p(2), p(3), p(4)]);
    assert_eq!(pi.read(3, START, 10).unwrap().len(), 2, "not visited yet");
    assert_eq!(
        pi.expire_older_than(200, 3, 2).unwrap(),
        sweep(2, 2, Some(5))
    );
    assert_eq!(pi.read(3, START, 10).unwrap(), vec![p(6)]);
    assert_eq!(pi.read(4, START, 10).unwrap(), vec![]);
    // the last user: there is no uid after u64::MAX
    assert_eq!(pi.expire_older_than(200, 5, 2).unwrap(), sweep(1, 1, None));
    assert_eq!(pi.read(u64::MAX, START, 10).unwrap(), vec![]);
    assert_eq!(pi.read(2, START, 10).unwrap(), vec![p(1)]);
    // a sweep again: nothing old is left at the start of any list
    assert_eq!(pi.expire_older_than(200, 0, 10).unwrap(), sweep(3, 0, None));
    assert_eq!(
        pi.log_after(before, 10)
            .unwrap()
            .into_iter()
            .map(|e| e.op)
            .collect::<Vec<_>>(),
        vec![
            Op::Expire { uid: 1, upto: p(1) },
            Op::Expire { uid: 3, upto: p(5) },
            Op::Expire { uid: 4, upto: p(2) },
            Op::Expire {
                uid: u64::MAX,
                upto: p(1)
            },
        ],
        "one expire per user"
    );
    // once p(2) is old too, uid 1's old ids behind it go (and uid 3's p(6))
    assert_eq!(pi.expire_older_than(300, 0, 10).unwrap(), sweep(3, 2, None));
    assert_eq!(pi.read(1, START, 10).unwrap(), vec![p(4)]);
    assert_eq!(pi.read(3, START, 10).unwrap(), vec![]);
    assert_eq!(
        pi.expire_older_than(u64::MAX, 0, 100).unwrap(),
        sweep(2, 2, None)
    );
    assert_eq!(state(&pi).0, vec![]);
    assert_eq!(
        pi.expire_older_than(u64::MAX, 0, 100).unwrap(),
        sweep(0, 0, None)
    );
}

/// A sweep resumed step by step visits every user once and ends, whatever the step size,
/// and ids appended between two steps are judged by their own append time.
#[test]
fn retention_steps_resume_where_they_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let mut pi = PiIndex::open(dir.path(), opts()).unwrap();
    for uid in 0..25u64 {
        pi.append(uid * 3, p(1), 100).unwrap();
        pi.append(uid * 3, p(2), 1_000).unwrap();
    }
    for step in [1, 4, 7, 25, 100] {
        let (mut from, mut visited, mut expired, mut calls) = (Some(0), 0, 0, 0);
        while let Some(uid) = from {
            let s = pi.expire_older_than(100, uid, step).unwrap();
            assert!(s.visited <= step);
            visited += s.visited;
            expired += s.expired;
            from = s.next;
            calls += 1;
            assert!(calls <= 30, "a sweep ends");
            if calls == 2 && step == 1 {
                // young ids of a user already visited, and of one not yet
                pi.append(0, p(3), 50).unwrap();
                pi.append(74, p(3), 2_000).unwrap();
            }
        }
        assert_eq!(visited, 26, "step {step}");
        assert_eq!(expired, if step == 1 { 25 } else { 0 }, "step {step}");
    }
    for uid in 0..25u64 {
        let want = match uid {
            0 => vec![p(2), p(3)],
            _ => vec![p(2)],
        };
        assert_eq!(
            pi.read(uid * 3, START, 10).unwrap(),
            want,
            "uid {}",
            uid * 3
        );
    }
    assert_eq!(pi.read(74, START, 10).unwrap(), vec![p(3)]);
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
    assert!(corrupt(pi.expire_older_than(u64::MAX, 0, 10).map(|_| ())));
    let e = pi
        .expire_older_than(u64::MAX, 0, 10)
        .unwrap_err()
        .to_string();
    assert!(e.contains("append time"), "{e}");
}

/// A child index adopts the odd users of its parent from a snapshot and the log after it,
/// bounded by the parent's mark; then the parent drops them.
#[test]
fn a_child_adopts_its_users_and_the_parent_drops_them() {
    let (pdir, cdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut parent = PiIndex::open(pdir.path(), opts()).unwrap();
    let mut child = PiIndex::open(cdir.path(), opts()).unwrap();
    let odd = |uid: u64| uid % 2 == 1;
    for uid in 1..=4 {
        parent.append(uid, p(1), TS).unwrap();
        parent.append(uid, p(2), TS + 1).unwrap();
        parent.set_cursor(uid, 77, p(1)).unwrap();
    }
    let snap = parent.snapshot().unwrap();
    for chunk in snap.chunks(3) {
        child.adopt_chunk(&chunk, odd).unwrap();
    }
    // after the snapshot: an append, an ack, and a device forgotten; then the mark
    parent.append(3, p(5), TS + 2).unwrap();
    parent.append(4, p(5), TS + 2).unwrap();
    parent.set_cursor(1, 77, p(2)).unwrap();
    let mark = parent.last_log_id();
    // beyond the mark: never adopted
    parent.append(3, p(9), TS + 3).unwrap();
    let log = parent.log_after(snap.upto(), 100).unwrap();
    let changes = child.adopt_log(&log, Some(mark), odd).unwrap();
    assert_eq!(changes, 2, "append of 3 and cursor of 1");
    assert_eq!(
        child.read(1, START, 10).unwrap(),
        vec![],
        "acked by its one device"
    );
    assert_eq!(child.read(3, START, 10).unwrap(), vec![p(2), p(5)]);
    assert_eq!(child.cursor(3, 77).unwrap(), Some(p(1)));
    assert_eq!(child.read(2, START, 10).unwrap(), vec![], "even users stay");
    assert_eq!(child.cursor(4, 77).unwrap(), None);
    // adopting the same again changes nothing
    assert_eq!(child.adopt_log(&log, Some(mark), odd).unwrap(), 0);
    // the child's followers replay the child's own log
    let fdir = tempfile::tempdir().unwrap();
    let mut follower = PiIndex::open(fdir.path(), opts()).unwrap();
    follower
        .apply_log(&child.log_after(LogId(0), 1000).unwrap())
        .unwrap();
    assert_eq!(follower.read(3, START, 10).unwrap(), vec![p(2), p(5)]);

    // the parent drops the odd users, ids and devices, and keeps the even ones
    let before_drop = parent.last_log_id();
    assert_eq!(parent.drop_users(|uid| !odd(uid)).unwrap(), 2);
    assert_eq!(parent.read(3, START, 10).unwrap(), vec![]);
    assert_eq!(parent.cursor(3, 77).unwrap(), None);
    assert_eq!(parent.read(4, START, 10).unwrap(), vec![p(2), p(5)]);
    assert_eq!(parent.drop_users(|uid| !odd(uid)).unwrap(), 0);
    // the parent's followers replay the drop; a child copying that log never does
    let drops = parent.log_after(before_drop, 100).unwrap();
    assert!(drops.iter().all(|e| matches!(e.op, Op::Moved { .. })));
    assert_eq!(child.adopt_log(&drops, None, odd).unwrap(), 0);
    assert_eq!(child.read(3, START, 10).unwrap(), vec![p(2), p(5)]);
    let pf = tempfile::tempdir().unwrap();
    let mut parent_follower = PiIndex::open(pf.path(), opts()).unwrap();
    parent_follower
        .apply_log(&parent.log_after(LogId(0), 1000).unwrap())
        .unwrap();
    assert_eq!(parent_follower.read(3, START, 10).unwrap(), vec![]);
    assert_eq!(parent_follower.cursor(3, 77).unwrap(), None);
    assert_eq!(
        parent_follower.read(4, START, 10).unwrap(),
        vec![p(2), p(5)]
    );
}

/// A user's devices at different cursors: the child must keep every id above the smallest
/// one, whichever device comes first in the snapshot. (Adopting the cursors in device order
/// once set the first device's cursor while the other was still unknown here, which dropped
/// the ids between the two: the device behind never got them from the child.)
#[test]
fn a_child_keeps_the_ids_a_device_behind_the_others_has_not_acknowledged() {
    let (pdir, cdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut parent = PiIndex::open(pdir.path(), opts()).unwrap();
    let everyone = |_: u64| true;
    for c in 1..=10 {
        parent.append(1, p(c), TS).unwrap();
        parent.append(2, p(c), TS).unwrap();
    }
    // both devices known (a read registers a device at 0), then user 1's device that sorts
    // first moves ahead; user 2's that sorts last
    for (uid, device) in [(1, 100), (1, 200), (2, 100), (2, 200)] {
        parent.set_cursor(uid, device, p(0)).unwrap();
    }
    parent.set_cursor(1, 100, p(8)).unwrap();
    parent.set_cursor(1, 200, p(3)).unwrap();
    parent.set_cursor(2, 100, p(3)).unwrap();
    parent.set_cursor(2, 200, p(8)).unwrap();
    let want: Vec<MsgId> = (4..=10).map(p).collect();
    assert_eq!(parent.read(1, START, 100).unwrap(), want);
    assert_eq!(parent.read(2, START, 100).unwrap(), want);
    for size in [1, 3, 100] {
        let cdir = tempfile::tempdir().unwrap();
        let mut child = PiIndex::open(cdir.path(), opts()).unwrap();
        for chunk in parent.snapshot().unwrap().chunks(size) {
            child.adopt_chunk(&chunk, everyone).unwrap();
        }
        for uid in [1, 2] {
            assert_eq!(
                child.read(uid, START, 100).unwrap(),
                want,
                "user {uid}, chunks of {size}"
            );
            assert_eq!(child.devices(uid).unwrap().len(), 2);
        }
        // its followers replay the same
        let fdir = tempfile::tempdir().unwrap();
        let mut follower = PiIndex::open(fdir.path(), opts()).unwrap();
        follower
            .apply_log(&child.log_after(LogId(0), 1000).unwrap())
            .unwrap();
        assert_eq!(follower.read(1, START, 100).unwrap(), want);
    }
    // merged into a child that already knows one device further back, and one ahead
    let mut child = PiIndex::open(cdir.path(), opts()).unwrap();
    for c in 1..=10 {
        child.append(1, p(c), TS).unwrap();
    }
    child.set_cursor(1, 100, p(1)).unwrap();
    child.set_cursor(1, 300, p(9)).unwrap();
    for chunk in parent.snapshot().unwrap().chunks(4) {
        child.adopt_chunk(&chunk, everyone).unwrap();
    }
    assert_eq!(child.read(1, START, 100).unwrap(), want);
    assert_eq!(child.cursor(1, 100).unwrap(), Some(p(8)));
    assert_eq!(child.cursor(1, 200).unwrap(), Some(p(3)));
}

#[test]
fn a_cursor_change_drops_the_ids_between_the_old_and_new_smallest_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let mut pi = PiIndex::open(dir.path(), opts()).unwrap();
    for c in 1..=10 {
        pi.append(1, p(c), TS).unwrap();
    }
    // two devices: the ids go once both acknowledged them
    pi.set_cursor(1, 200, p(0)).unwrap();
    pi.set_cursor(1, 100, p(4)).unwrap();
    assert_eq!(pi.read(1, p(0), 100).unwrap().len(), 10);
    pi.set_cursor(1, 200, p(6)).unwrap();
    let left: Vec<MsgId> = pi.read(1, p(0), 100).unwrap();
    assert_eq!(left, (5..=10).map(p).collect::<Vec<_>>());
    pi.set_cursor(1, 100, p(9)).unwrap();
    assert_eq!(
        pi.read(1, p(0), 100).unwrap(),
        vec![p(7), p(8), p(9), p(10)]
    );
    // an id appended below the smallest cursor afterwards (ids only grow, so only by hand)
    // stays past the next cursor change, until an explicit expiry
    pi.append(1, p(3), TS).unwrap();
    pi.set_cursor(1, 200, p(8)).unwrap();
    assert_eq!(pi.read(1, p(0), 100).unwrap(), vec![p(3), p(9), p(10)]);
    pi.expire(1, p(8)).unwrap();
    assert_eq!(pi.read(1, p(0), 100).unwrap(), vec![p(9), p(10)]);
}
