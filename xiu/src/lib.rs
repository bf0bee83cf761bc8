//! Xiu, the message store of personal inboxes (seed 8.2), as a library: one [`XiuStore`] holds
//! the messages of one Xiu partition in RocksDB, assigns their [`MsgId`]s, and keeps a bounded
//! LRU cache of decoded messages in front of the disk.
//!
//! - Idempotent on the publisher's snowflake id (`sid`): a sid index on disk maps it to the
//!   first [`MsgId`], so a retried store returns the same id, also after a restart.
//! - Ids strictly increase across restarts by construction: the last assigned id is written
//!   in the same `WriteBatch` as the message, and [`XiuStore::open`] resumes from the larger of
//!   that record and the highest stored message key.
//! - Each record on disk is `crc32 (4 bytes, big-endian) | epoch (8 bytes BE) |
//!   postcard(StoredMessage)`; the CRC covers epoch and message and is checked on every read
//!   from disk, and a record that fails is reported as [`XiuError::Corrupt`], never returned as
//!   data. The epoch is the leadership term in which a leader assigned the record's id
//!   ([`XiuStore::set_epoch`]); replicas copy records with their epoch.
//! - Durability is explicit, see [`Durability`].
//! - [`XiuStore::entries_after`] and [`XiuStore::apply_replicated`] carry raw records from a
//!   leader to a follower; [`XiuStore::mark_at`] (epoch and sid of a record) and
//!   [`XiuStore::truncate_after`] let a follower find and drop a tail its leader never had,
//!   and let a new leader tell which of two copies is the more recent (Raft's rule: the
//!   larger epoch of the last record, then the longer copy). The `pixiu-xiu` service
//!   ([`service`]) carries them over QUIC.
//!
//! On disk: `m | counter (8 bytes BE)` -> record, `s | sid (8 bytes BE)` -> MsgId (8 bytes BE),
//! `u | uid | ts | counter` -> nothing (a user's messages by time, [`XiuStore::history`]),
//! `!last` -> last assigned MsgId (8 bytes BE). Messages are keyed by counter alone (one counter
//! per partition, shared by all kinds), so a range scan yields them in assignment order.

mod history;
mod retention;
pub mod service;

pub use history::History;
pub use retention::Floor;

use lru::LruCache;
use pixiu_protocol::inbox::{MsgId, StoredMessage, KIND_NONE, MAX_COUNTER};
use pixiu_protocol::MAX_BODY;
use pixiu_storage::{Db, WriteBatch};
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::Path;

pub use pixiu_storage::Durability;

/// One message for [`XiuStore::store_many`] (the arguments of [`XiuStore::store`]).
#[derive(Clone, Copy, Debug)]
pub struct NewMessage<'a> {
    /// The sender's id for the message: storing a known `sid` again stores nothing.
    pub sid: u64,
    pub kind: u8,
    pub from: u64,
    pub to: &'a [u64],
    pub body: &'a str,
    pub ts: u64,
}

#[derive(Clone, Debug)]
pub struct XiuOptions {
    /// This store's Xiu partition, the first byte of every id it assigns.
    pub partition: u8,
    /// Decoded messages kept in memory; 0 disables the cache.
    pub cache_entries: usize,
    pub sync: Durability,
}

#[derive(Debug, thiserror::Error)]
pub enum XiuError {
    #[error(transparent)]
    Storage(#[from] pixiu_storage::StorageError),
    #[error("message {0} not found")]
    NotFound(MsgId),
    #[error("message {id} is corrupt: {reason}")]
    Corrupt { id: MsgId, reason: String },
    #[error("message {id} belongs to xiu partition {}, this store is partition {partition}", id.partition())]
    WrongPartition { id: MsgId, partition: u8 },
    #[error("store metadata {what} is corrupt: {reason}")]
    CorruptMeta { what: String, reason: String },
    #[error("the store holds partition {stored} but was opened as partition {configured}")]
    PartitionMismatch { stored: u8, configured: u8 },
    #[error("message kind {0} is reserved")]
    InvalidKind(u8),
    #[error("body of {len} bytes exceeds the limit of {max}")]
    BodyTooLarge { len: usize, max: usize },
    #[error("the 48-bit message counter is exhausted")]
    CounterExhausted,
    #[error("writing the group of messages failed, none of it is stored: {0}")]
    WriteFailed(String),
    #[error("replication gap: expected counter {expected}, got {got}")]
    Gap { expected: u64, got: u64 },
    #[error("message {id} expired (retention): every message up to {floor} is deleted")]
    Expired { id: MsgId, floor: u64 },
}

const META_LAST: &[u8] = b"!last";
const META_INDEXED: &[u8] = b"!indexed";
const MSG_PREFIX: u8 = b'm';
const SID_PREFIX: u8 = b's';

fn msg_key(counter: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = MSG_PREFIX;
    k[1..].copy_from_slice(&counter.to_be_bytes());
    k
}

/// Puts the sid key and the per-user index keys of every message of `msgs` into `batch`,
/// each kind sorted. They arrive in random order (sids from many publishers, receivers
/// across users); sorted inserts let RocksDB's memtable reuse its skip-list position from
/// one key to the next. Unsorted, a follower applying what it pulled spent 39 % of its
/// samples in the memtable's skip list (`RecomputeSpliceLevels` alone 28 %).
fn put_keys_sorted(batch: &mut WriteBatch, msgs: &[StoredMessage]) {
    let mut sids: Vec<([u8; 9], [u8; 8])> = msgs
        .iter()
        .map(|msg| (sid_key(msg.sid), msg.id.to_be_bytes()))
        .collect();
    // stable: were a sid ever twice, its later record would still win, as unsorted
    sids.sort_by_key(|(k, _)| *k);
    let mut users: Vec<[u8; 25]> = msgs.iter().flat_map(history::index_keys).collect();
    users.sort_unstable();
    for (k, v) in &sids {
        batch.put(k, v);
    }
    for k in &users {
        batch.put(k, []);
    }
}

fn sid_key(sid: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = SID_PREFIX;
    k[1..].copy_from_slice(&sid.to_be_bytes());
    k
}

/// The counter of a message key, `None` for any other key.
fn counter_of_key(key: &[u8]) -> Option<u64> {
    match key {
        [MSG_PREFIX, rest @ ..] => Some(u64::from_be_bytes(rest.try_into().ok()?)),
        _ => None,
    }
}

fn id_from_value(what: &str, v: &[u8]) -> Result<MsgId, XiuError> {
    let bytes: [u8; 8] = v.try_into().map_err(|_| XiuError::CorruptMeta {
        what: what.to_string(),
        reason: format!("{} bytes where a MsgId takes 8", v.len()),
    })?;
    Ok(MsgId::from_be_bytes(bytes))
}

/// `crc32 (BE) | epoch (BE) | postcard(msg)`, the CRC over epoch and message.
pub fn encode_record(msg: &StoredMessage, epoch: u64) -> Vec<u8> {
    let payload = postcard::to_allocvec(msg).expect("serializing a message into a Vec cannot fail");
    let mut out = Vec::with_capacity(12 + payload.len());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(&payload);
    let crc = crc32fast::hash(&out[4..]);
    out[..4].copy_from_slice(&crc.to_be_bytes());
    out
}

/// Checks the CRC of a record and decodes it; `id` only names the record in errors.
pub fn decode_record(id: MsgId, record: &[u8]) -> Result<StoredMessage, XiuError> {
    decode_record_with_epoch(id, record).map(|(_, m)| m)
}

/// [`decode_record`], with the epoch in which the record's id was assigned.
pub fn decode_record_with_epoch(
    id: MsgId,
    record: &[u8],
) -> Result<(u64, StoredMessage), XiuError> {
    let corrupt = |reason: String| XiuError::Corrupt { id, reason };
    if record.len() < 12 {
        return Err(corrupt(format!("record of {} bytes", record.len())));
    }
    let (crc, rest) = record.split_at(4);
    let stored = u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let actual = crc32fast::hash(rest);
    if stored != actual {
        return Err(corrupt(format!(
            "crc32 mismatch: stored {stored:08x}, computed {actual:08x}"
        )));
    }
    let (epoch, payload) = rest.split_at(8);
    let epoch = u64::from_be_bytes(epoch.try_into().expect("split_at(8) gives 8 bytes"));
    let msg = postcard::from_bytes(payload).map_err(|e| corrupt(format!("undecodable: {e}")))?;
    Ok((epoch, msg))
}

/// Where a copy stands at one counter: the epoch and the sid of its record there. Two copies
/// with the same mark at a counter agree up to it (a leader assigns each counter once per
/// epoch, and a follower appends only after its mark at `after` matched its leader's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mark {
    pub epoch: u64,
    pub sid: u64,
}

/// The message store of one Xiu partition.
pub struct XiuStore {
    db: Db,
    partition: u8,
    cache: Option<LruCache<MsgId, StoredMessage>>,
    /// The last assigned (or replicated) id; the next counter is `last.counter() + 1`.
    last: MsgId,
    /// Written into every record [`XiuStore::store`] creates.
    epoch: u64,
    /// Every counter up to here expired (see `retention`).
    floor: retention::Floor,
}

impl XiuStore {
    /// Opens (or creates) the store at `path` and resumes its counter from the larger of the
    /// recorded last id and the highest stored message.
    pub fn open(path: &Path, options: XiuOptions) -> Result<XiuStore, XiuError> {
        let db = Db::open(path, pixiu_storage::Options::compressed(options.sync))?;
        let partition = options.partition;

        let mut last = MsgId::new(partition, KIND_NONE, 0);
        if let Some(v) = db.get(META_LAST)? {
            let meta = id_from_value("last id", &v)?;
            if meta.partition() != partition {
                return Err(XiuError::PartitionMismatch {
                    stored: meta.partition(),
                    configured: partition,
                });
            }
            last = meta;
        }
        if let Some((k, v)) = db.last_at_or_below(&msg_key(u64::MAX))? {
            if let Some(counter) = counter_of_key(&k) {
                if counter > last.counter() {
                    // The record's kind if it is readable; the counter is what matters.
                    let kind = decode_record(MsgId::new(partition, KIND_NONE, counter), &v)
                        .map(|m| m.id.kind())
                        .unwrap_or(KIND_NONE);
                    last = MsgId::new(partition, kind, counter);
                }
            }
        }

        if db.get(history::META_USER_INDEX)?.is_none() {
            let n = history::build_index(&db, partition)?;
            tracing::info!(
                partition,
                records = n,
                "xiu indexed its records by user and time"
            );
        }
        let floor = match db.get(retention::META_FLOOR)? {
            Some(v) => retention::Floor::decode(&v)?,
            None => retention::Floor::default(),
        };
        let cache = NonZeroUsize::new(options.cache_entries).map(LruCache::new);
        tracing::info!(partition, last = %last, "xiu store opened");
        Ok(XiuStore {
            db,
            partition,
            cache,
            last,
            epoch: 0,
            floor,
        })
    }

    /// The epoch written into the records [`XiuStore::store`] creates from now on: a new
    /// leader sets one above every epoch in its copy, see [`XiuStore::mark_at`].
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn partition(&self) -> u8 {
        self.partition
    }

    /// The last assigned or replicated id (counter 0 and kind [`KIND_NONE`] when empty).
    /// Only its counter orders positions: pass it to [`XiuStore::entries_after`].
    pub fn last_id(&self) -> MsgId {
        self.last
    }

    /// Makes every write so far durable (fsyncs the write-ahead log): the commit point of
    /// [`Durability::GroupCommit`]. Harmless with [`Durability::Fsync`].
    pub fn flush_wal(&self) -> Result<(), XiuError> {
        self.db.flush_wal()?;
        Ok(())
    }

    /// Stores a message and returns its id and whether it is new. Storing a `sid` that is
    /// already stored returns the first id and `false`, whatever the other arguments.
    pub fn store(
        &mut self,
        sid: u64,
        kind: u8,
        from: u64,
        to: &[u64],
        body: &str,
        ts: u64,
    ) -> Result<(MsgId, bool), XiuError> {
        let m = NewMessage {
            sid,
            kind,
            from,
            to,
            body,
            ts,
        };
        self.store_many(&[m])
            .pop()
            .expect("store_many answers every message")
    }

    /// Stores a group of messages in one RocksDB write, one answer per message in the same
    /// order, each as [`XiuStore::store`] would give it (ids in the group's order; a `sid`
    /// that is already stored, or that comes twice in the group, gets its first id and
    /// `false`). A message refused (kind, size) does not stop the others. If the write fails,
    /// none of the group is stored and every message that would have been new fails.
    ///
    /// The batch's keys go in sorted order (records, then sid keys, then per-user index
    /// keys): sid and user keys arrive in random order, and sorted inserts let RocksDB's
    /// memtable reuse its skip-list position from one key to the next.
    pub fn store_many(&mut self, msgs: &[NewMessage<'_>]) -> Vec<Result<(MsgId, bool), XiuError>> {
        self.store_many_with(msgs, Db::write)
    }

    /// [`XiuStore::store_many`] with the group's write done by `write` (tests make it fail).
    fn store_many_with(
        &mut self,
        msgs: &[NewMessage<'_>],
        write: fn(&Db, WriteBatch) -> Result<(), pixiu_storage::StorageError>,
    ) -> Vec<Result<(MsgId, bool), XiuError>> {
        let before = self.last;
        let mut out = Vec::with_capacity(msgs.len());
        let mut in_group: HashMap<u64, MsgId> = HashMap::new();
        let mut fresh: Vec<StoredMessage> = Vec::new();
        for m in msgs {
            out.push(self.assign(m, &mut in_group, &mut fresh));
        }
        if fresh.is_empty() {
            return out;
        }
        let mut batch = WriteBatch::default();
        for msg in &fresh {
            batch.put(msg_key(msg.id.counter()), encode_record(msg, self.epoch));
        }
        put_keys_sorted(&mut batch, &fresh);
        batch.put(META_LAST, self.last.to_be_bytes());
        if let Err(e) = write(&self.db, batch) {
            // nothing of the group is stored: every id above `before` is unassigned again
            self.last = before;
            for r in out.iter_mut() {
                if matches!(r, Ok((id, _)) if id.counter() > before.counter()) {
                    *r = Err(XiuError::WriteFailed(e.to_string()));
                }
            }
            return out;
        }
        if let Some(cache) = &mut self.cache {
            for msg in fresh {
                cache.put(msg.id, msg);
            }
        }
        out
    }

    /// Checks one message of [`XiuStore::store_many`] and gives it the next id (in memory
    /// only: `fresh` collects what the group's write must hold).
    fn assign(
        &mut self,
        m: &NewMessage<'_>,
        in_group: &mut HashMap<u64, MsgId>,
        fresh: &mut Vec<StoredMessage>,
    ) -> Result<(MsgId, bool), XiuError> {
        if let Some(id) = in_group.get(&m.sid) {
            return Ok((*id, false));
        }
        if let Some(v) = self.db.get(sid_key(m.sid))? {
            return Ok((
                id_from_value(&format!("sid index of {}", m.sid), &v)?,
                false,
            ));
        }
        if m.kind == KIND_NONE {
            return Err(XiuError::InvalidKind(m.kind));
        }
        if m.body.len() > MAX_BODY {
            return Err(XiuError::BodyTooLarge {
                len: m.body.len(),
                max: MAX_BODY,
            });
        }
        let counter = self.last.counter() + 1;
        if counter > MAX_COUNTER {
            return Err(XiuError::CounterExhausted);
        }
        let id = MsgId::new(self.partition, m.kind, counter);
        fresh.push(StoredMessage {
            id,
            sid: m.sid,
            from: m.from,
            to: m.to.to_vec(),
            body: m.body.to_string(),
            ts: m.ts,
        });
        in_group.insert(m.sid, id);
        self.last = id;
        Ok((id, true))
    }

    /// Reads messages by id, one result per id in the same order: from the cache when there,
    /// else from disk with its CRC checked.
    pub fn read(&mut self, ids: &[MsgId]) -> Vec<Result<StoredMessage, XiuError>> {
        ids.iter().map(|id| self.read_one(*id)).collect()
    }

    fn read_one(&mut self, id: MsgId) -> Result<StoredMessage, XiuError> {
        if id.partition() != self.partition {
            return Err(XiuError::WrongPartition {
                id,
                partition: self.partition,
            });
        }
        if let Some(m) = self.cache.as_mut().and_then(|c| c.get(&id)) {
            return Ok(m.clone());
        }
        let Some(raw) = self.db.get(msg_key(id.counter()))? else {
            if id.counter() <= self.floor.counter {
                return Err(XiuError::Expired {
                    id,
                    floor: self.floor.counter,
                });
            }
            return Err(XiuError::NotFound(id));
        };
        let msg = match check_record(id.counter(), id, &raw) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(%id, "refusing a stored message: {e}");
                return Err(e);
            }
        };
        if msg.id != id {
            // Same counter, another kind: the id asked for was never assigned.
            return Err(XiuError::NotFound(id));
        }
        if let Some(cache) = &mut self.cache {
            cache.put(id, msg.clone());
        }
        Ok(msg)
    }

    /// Up to `max` raw records whose counter is above `after.counter()`, in counter order,
    /// for a follower whose last id is `after`. Each record's CRC is checked first: a corrupt
    /// record stops the batch with [`XiuError::Corrupt`] rather than spreading to a follower.
    pub fn entries_after(
        &self,
        after: MsgId,
        max: usize,
    ) -> Result<Vec<(MsgId, Vec<u8>)>, XiuError> {
        if after.partition() != self.partition {
            return Err(XiuError::WrongPartition {
                id: after,
                partition: self.partition,
            });
        }
        let mut out = Vec::new();
        if after.counter() >= MAX_COUNTER || max == 0 {
            return Ok(out);
        }
        let start = msg_key(after.counter() + 1);
        for item in self.db.scan_from(&start, &[MSG_PREFIX]) {
            let (k, v) = item?;
            let Some(counter) = counter_of_key(&k) else {
                break;
            };
            let named = MsgId::new(self.partition, KIND_NONE, counter);
            let msg = check_record(counter, named, &v).inspect_err(|e| {
                tracing::error!(id = %named, "cannot replicate a stored message: {e}");
            })?;
            out.push((msg.id, v.to_vec()));
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    /// Applies records from [`XiuStore::entries_after`] of the partition's leader. Records at
    /// or below [`XiuStore::last_id`] are skipped (a retried batch is harmless); the others
    /// must continue the counter without a gap and pass their CRC, else nothing is applied.
    /// Returns how many records were written.
    pub fn apply_replicated(&mut self, entries: &[(MsgId, Vec<u8>)]) -> Result<usize, XiuError> {
        let mut last = self.last;
        let mut batch = WriteBatch::default();
        let mut fresh = Vec::new();
        for (id, raw) in entries {
            if id.partition() != self.partition {
                return Err(XiuError::WrongPartition {
                    id: *id,
                    partition: self.partition,
                });
            }
            if id.counter() <= last.counter() {
                continue;
            }
            if id.counter() != last.counter() + 1 {
                return Err(XiuError::Gap {
                    expected: last.counter() + 1,
                    got: id.counter(),
                });
            }
            let msg = decode_record(*id, raw)?;
            if msg.id != *id {
                return Err(XiuError::Corrupt {
                    id: *id,
                    reason: format!("the record holds id {}", msg.id),
                });
            }
            batch.put(msg_key(id.counter()), raw);
            last = *id;
            fresh.push(msg);
        }
        if fresh.is_empty() {
            return Ok(0);
        }
        put_keys_sorted(&mut batch, &fresh);
        batch.put(META_LAST, last.to_be_bytes());
        self.db.write(batch)?;
        self.last = last;
        let n = fresh.len();
        if let Some(cache) = &mut self.cache {
            for m in fresh {
                cache.put(m.id, m);
            }
        }
        Ok(n)
    }

    /// Moves the counter forward so that the next id has a counter above `counter` (no-op
    /// when it already is), durably (fsynced whatever the [`Durability`]). For a replication
    /// layer that must skip ids a failed leader may have assigned.
    pub fn advance_counter(&mut self, counter: u64) -> Result<MsgId, XiuError> {
        if counter <= self.last.counter() {
            return Ok(self.last);
        }
        let id =
            MsgId::try_new(self.partition, KIND_NONE, counter).ok_or(XiuError::CounterExhausted)?;
        let mut batch = WriteBatch::default();
        batch.put(META_LAST, id.to_be_bytes());
        self.db.write_synced(batch)?;
        self.last = id;
        Ok(id)
    }

    /// Every id up to this counter is known to be indexed in Pi (0 when nothing is).
    pub fn indexed(&self) -> Result<u64, XiuError> {
        match self.db.get(META_INDEXED)? {
            None => Ok(0),
            Some(v) => {
                let bytes: [u8; 8] =
                    v.as_slice().try_into().map_err(|_| XiuError::CorruptMeta {
                        what: "indexed watermark".into(),
                        reason: format!("{} bytes where 8 are expected", v.len()),
                    })?;
                Ok(u64::from_be_bytes(bytes))
            }
        }
    }

    /// Records that every id up to `counter` is indexed in Pi (not fsynced: after a crash
    /// the owner re-indexes from an older watermark, which Pi's duplicate-free lists absorb).
    pub fn set_indexed(&mut self, counter: u64) -> Result<(), XiuError> {
        let mut batch = WriteBatch::default();
        batch.put(META_INDEXED, counter.to_be_bytes());
        self.db.write_unsynced(batch)?;
        Ok(())
    }

    /// The [`Mark`] of the record stored under `counter`, `None` when there is none (counter
    /// 0 included): what a follower and its leader compare to find out whether their copies
    /// agree up to that counter.
    pub fn mark_at(&self, counter: u64) -> Result<Option<Mark>, XiuError> {
        if counter == 0 {
            return Ok(None);
        }
        let Some(raw) = self.db.get(msg_key(counter))? else {
            return Ok(None);
        };
        let named = MsgId::new(self.partition, KIND_NONE, counter);
        let (epoch, msg) = decode_record_with_epoch(named, &raw)?;
        if msg.id.counter() != counter {
            return Err(XiuError::Corrupt {
                id: named,
                reason: format!("stored under counter {counter} but holds id {}", msg.id),
            });
        }
        Ok(Some(Mark {
            epoch,
            sid: msg.sid,
        }))
    }

    /// How recent this copy is: the epoch of its last record and its last counter, compared
    /// as a pair (Raft's "at least as up to date"). `(0, 0)` when empty.
    pub fn recency(&self) -> Result<(u64, u64), XiuError> {
        let last = self.last.counter();
        let epoch = self.mark_at(last)?.map_or(0, |m| m.epoch);
        Ok((epoch, last))
    }

    /// Deletes every message above `counter` (with its sid index entry) and moves the last id
    /// back to `counter`, fsynced: a follower drops a tail its new leader never had (a failed
    /// leader's writes that were never replicated, hence never acknowledged).
    pub fn truncate_after(&mut self, counter: u64) -> Result<usize, XiuError> {
        let mut batch = WriteBatch::default();
        let mut n = 0;
        let start = msg_key(counter.saturating_add(1));
        for item in self.db.scan_from(&start, &[MSG_PREFIX]) {
            let (k, v) = item?;
            let Some(c) = counter_of_key(&k) else {
                break;
            };
            if let Ok(m) = decode_record(MsgId::new(self.partition, KIND_NONE, c), &v) {
                batch.delete(sid_key(m.sid));
                history::unindex_message(&mut batch, &m);
            }
            batch.delete(k);
            n += 1;
        }
        let last = MsgId::new(self.partition, KIND_NONE, counter.min(self.last.counter()));
        batch.put(META_LAST, last.to_be_bytes());
        self.db.write_synced(batch)?;
        self.last = last;
        if let Some(c) = &mut self.cache {
            c.clear();
        }
        Ok(n)
    }

    /// Drops the in-memory cache (reads then come from disk).
    pub fn clear_cache(&mut self) {
        if let Some(c) = &mut self.cache {
            c.clear();
        }
    }
}

/// Decodes the record stored under `counter` and checks that it holds that counter.
fn check_record(counter: u64, named: MsgId, raw: &[u8]) -> Result<StoredMessage, XiuError> {
    let msg = decode_record(named, raw)?;
    if msg.id.counter() != counter {
        return Err(XiuError::Corrupt {
            id: named,
            reason: format!("stored under counter {counter} but holds id {}", msg.id),
        });
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pixiu_protocol::inbox::{KIND_MULTICAST, KIND_PERSONAL};

    /// `put_keys_sorted` writes the same keys and values as putting each message's keys in
    /// turn: every receiver's index key, and each sid pointing at its record; were a sid in
    /// two records, at the later one, as with unsorted puts.
    #[test]
    fn sorted_keys_are_the_same_keys_as_message_by_message() {
        let msg = |counter: u64, sid: u64, to: Vec<u64>| StoredMessage {
            id: MsgId::new(3, KIND_PERSONAL, counter),
            sid,
            from: 1,
            to,
            body: format!("m{counter}"),
            ts: 1_000 + counter,
        };
        let msgs = vec![
            msg(1, 900, vec![42, 7]),
            msg(2, 5, vec![7]),
            msg(3, 900, vec![3, 42]),
            msg(4, 70, vec![1_000_000]),
        ];
        let write = |sorted: bool| {
            let dir = tempfile::tempdir().unwrap();
            let db = Db::open(
                dir.path(),
                pixiu_storage::Options::compressed(Durability::GroupCommit),
            )
            .unwrap();
            let mut batch = WriteBatch::default();
            if sorted {
                put_keys_sorted(&mut batch, &msgs);
            } else {
                for m in &msgs {
                    batch.put(sid_key(m.sid), m.id.to_be_bytes());
                    history::index_message(&mut batch, m);
                }
            }
            db.write(batch).unwrap();
            let all: Vec<(Vec<u8>, Vec<u8>)> = db
                .scan_prefix(&[])
                .map(|kv| {
                    let (k, v) = kv.unwrap();
                    (k.to_vec(), v.to_vec())
                })
                .collect();
            (all, db.get(sid_key(900)).unwrap())
        };
        let (sorted, sid_900) = write(true);
        let (one_by_one, _) = write(false);
        assert_eq!(sorted, one_by_one);
        assert_eq!(
            sorted.len(),
            3 + 6,
            "3 distinct sids, 6 receiver index keys"
        );
        assert_eq!(
            sid_900,
            Some(MsgId::new(3, KIND_PERSONAL, 3).to_be_bytes().to_vec())
        );
    }

    fn opts(partition: u8, cache_entries: usize) -> XiuOptions {
        XiuOptions {
            partition,
            cache_entries,
            sync: Durability::GroupCommit,
        }
    }

    #[test]
    fn a_group_is_stored_in_one_write_with_its_refusals_and_repeats_answered_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = XiuStore::open(dir.path(), opts(3, 0)).unwrap();
        let (old, _) = s.store(50, KIND_PERSONAL, 1, &[9], "before", 10).unwrap();
        let big = "x".repeat(MAX_BODY + 1);
        let m = |sid, kind, to: &'static [u64], body| NewMessage {
            sid,
            kind,
            from: 2,
            to,
            body,
            ts: 20 + sid,
        };
        let group = [
            m(60, KIND_PERSONAL, &[7, 8], "a"),
            m(50, KIND_PERSONAL, &[7], "stored before"),
            m(61, KIND_PERSONAL, &[8], &big),
            m(62, KIND_NONE, &[8], "reserved kind"),
            m(60, KIND_PERSONAL, &[7], "repeat in the group"),
            m(63, KIND_MULTICAST, &[7, 9], "b"),
        ];
        let out = s.store_many(&group);
        assert_eq!(out.len(), group.len());
        let a = MsgId::new(3, KIND_PERSONAL, 2);
        let b = MsgId::new(3, KIND_MULTICAST, 3);
        assert_eq!(out[0].as_ref().unwrap(), &(a, true));
        assert_eq!(out[1].as_ref().unwrap(), &(old, false));
        assert!(
            matches!(out[2], Err(XiuError::BodyTooLarge { .. })),
            "{:?}",
            out[2]
        );
        assert!(
            matches!(out[3], Err(XiuError::InvalidKind(0))),
            "{:?}",
            out[3]
        );
        assert_eq!(out[4].as_ref().unwrap(), &(a, false));
        assert_eq!(out[5].as_ref().unwrap(), &(b, true));
        assert_eq!(s.last_id(), b);
        // both new ones are readable, indexed per receiver and found by sid after a reopen
        drop(s);
        let mut s = XiuStore::open(dir.path(), opts(3, 0)).unwrap();
        assert_eq!(s.last_id().counter(), 3);
        let read = s.read(&[a, b]);
        assert_eq!(read[0].as_ref().unwrap().to, vec![7, 8]);
        assert_eq!(read[1].as_ref().unwrap().body, "b");
        let mut ids_of = |uid| -> Vec<MsgId> {
            let found = s.history(uid, 0, u64::MAX, None, 10).unwrap();
            found.into_iter().map(|h| h.id).collect()
        };
        assert_eq!(ids_of(7), vec![a, b]);
        assert_eq!(ids_of(9), vec![old, b]);
        assert_eq!(
            s.store(63, KIND_PERSONAL, 1, &[1], "again", 0).unwrap(),
            (b, false)
        );
        assert_eq!(
            s.store(61, KIND_PERSONAL, 1, &[8], "now small", 0)
                .unwrap()
                .0
                .counter(),
            4
        );
    }

    #[test]
    fn a_group_whose_write_fails_stores_none_of_it_and_its_ids_are_given_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = XiuStore::open(dir.path(), opts(3, 16)).unwrap();
        let (old, _) = s.store(50, KIND_PERSONAL, 1, &[9], "before", 10).unwrap();
        let m = |sid, body| NewMessage {
            sid,
            kind: KIND_PERSONAL,
            from: 2,
            to: &[7],
            body,
            ts: 20,
        };
        let group = [
            m(60, "a"),
            m(50, "stored before"),
            m(60, "again"),
            m(61, "b"),
        ];
        let disk_full = |_: &Db, _: WriteBatch| -> Result<(), pixiu_storage::StorageError> {
            Err(pixiu_storage::StorageError::Task("disk full".into()))
        };
        let out = s.store_many_with(&group, disk_full);
        // every answer that names an id this group assigned fails; the earlier message stands
        assert!(matches!(&out[0], Err(XiuError::WriteFailed(e)) if e.contains("disk full")));
        assert_eq!(out[1].as_ref().unwrap(), &(old, false));
        assert!(
            matches!(out[2], Err(XiuError::WriteFailed(_))),
            "{:?}",
            out[2]
        );
        assert!(
            matches!(out[3], Err(XiuError::WriteFailed(_))),
            "{:?}",
            out[3]
        );
        assert_eq!(s.last_id(), old, "the counter is back where it was");
        let would_be = MsgId::new(3, KIND_PERSONAL, 2);
        assert!(matches!(s.read(&[would_be])[0], Err(XiuError::NotFound(_))));
        // a retry with the same sid is an ordinary store, taking the next counter
        assert_eq!(
            s.store(60, KIND_PERSONAL, 2, &[7], "a", 20).unwrap(),
            (would_be, true)
        );
        drop(s);
        let s = XiuStore::open(dir.path(), opts(3, 16)).unwrap();
        assert_eq!(s.last_id().counter(), 2);
    }

    #[test]
    fn a_divergent_tail_is_found_by_its_mark_and_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = XiuStore::open(dir.path(), opts(0, 16)).unwrap();
        assert_eq!(s.mark_at(0).unwrap(), None);
        assert_eq!(s.recency().unwrap(), (0, 0));
        s.set_epoch(5);
        let ids: Vec<MsgId> = (0..5)
            .map(|i| s.store(100 + i, KIND_PERSONAL, 1, &[7], "m", 0).unwrap().0)
            .collect();
        assert_eq!(s.mark_at(3).unwrap(), Some(Mark { epoch: 5, sid: 102 }));
        assert_eq!(s.mark_at(9).unwrap(), None);
        assert_eq!(s.recency().unwrap(), (5, 5));
        assert_eq!(s.indexed().unwrap(), 0);
        s.set_indexed(2).unwrap();
        assert_eq!(s.indexed().unwrap(), 2);
        // drop counters 4 and 5: their messages, their sids, and the counter goes back
        assert_eq!(s.truncate_after(3).unwrap(), 2);
        assert_eq!(s.last_id().counter(), 3);
        assert!(matches!(one(&mut s, ids[4]), Err(XiuError::NotFound(_))));
        assert_eq!(one(&mut s, ids[2]).unwrap().to, vec![7]);
        // the dropped sid is free again and gets the next counter, also after a reopen
        let (again, fresh) = s.store(104, KIND_PERSONAL, 1, &[7], "other", 0).unwrap();
        assert!(fresh);
        assert_eq!(again.counter(), 4);
        drop(s);
        let mut s = XiuStore::open(dir.path(), opts(0, 16)).unwrap();
        assert_eq!(s.last_id().counter(), 4);
        assert_eq!(s.mark_at(4).unwrap(), Some(Mark { epoch: 5, sid: 104 }));
        // a later epoch's record makes this copy more recent than a longer one of epoch 5
        s.set_epoch(9);
        s.store(105, KIND_PERSONAL, 1, &[7], "later", 0).unwrap();
        assert_eq!(s.recency().unwrap(), (9, 5));
        assert!(s.recency().unwrap() > (5, 6));
    }

    fn one(store: &mut XiuStore, id: MsgId) -> Result<StoredMessage, XiuError> {
        store.read(&[id]).pop().expect("one id, one result")
    }

    #[test]
    fn store_and_read_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = XiuStore::open(dir.path(), opts(3, 16)).unwrap();
        assert_eq!(s.last_id().counter(), 0);
        let (a, new_a) = s.store(100, KIND_PERSONAL, 7, &[], "hello", 1000).unwrap();
        let (b, new_b) = s.store(101, KIND_MULTICAST, 8, &[], "world", 1001).unwrap();
        assert!(new_a && new_b);
        assert_eq!(
            (a.partition(), a.kind(), a.counter()),
            (3, KIND_PERSONAL, 1)
        );
        assert_eq!(
            (b.partition(), b.kind(), b.counter()),
            (3, KIND_MULTICAST, 2)
        );
        assert_eq!(s.last_id(), b);
        let got = s.read(&[b, a]);
        let m = got[0].as_ref().unwrap();
        assert_eq!(
            (m.id, m.sid, m.from, m.body.as_str(), m.ts),
            (b, 101, 8, "world", 1001)
        );
        assert_eq!(got[1].as_ref().unwrap().body, "hello");
        // From disk too.
        s.clear_cache();
        assert_eq!(one(&mut s, a).unwrap().body, "hello");
        // Unknown counter, and a known counter with another kind.
        assert!(matches!(
            one(&mut s, MsgId::new(3, KIND_PERSONAL, 99)),
            Err(XiuError::NotFound(_))
        ));
        assert!(matches!(
            one(&mut s, MsgId::new(3, KIND_MULTICAST, 1)),
            Err(XiuError::NotFound(_))
        ));
        s.flush_wal().unwrap();
    }

    #[test]
    fn invalid_inputs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = XiuStore::open(dir.path(), opts(0, 4)).unwrap();
        assert!(matches!(
            s.store(1, KIND_NONE, 1, &[], "x", 0),
            Err(XiuError::InvalidKind(0))
        ));
        let big = "x".repeat(MAX_BODY + 1);
        assert!(matches!(
            s.store(1, KIND_PERSONAL, 1, &[], &big, 0),
            Err(XiuError::BodyTooLarge { .. })
        ));
        assert_eq!(s.last_id().counter(), 0, "refusals assign nothing");
    }

    #[test]
    fn dedup_by_sid_also_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let mut s = XiuStore::open(dir.path(), opts(1, 16)).unwrap();
            let (id, new) = s.store(555, KIND_PERSONAL, 1, &[], "once", 1).unwrap();
            assert!(new);
            let (again, new) = s.store(555, KIND_PERSONAL, 1, &[], "twice", 2).unwrap();
            assert_eq!((again, new), (id, false));
            assert_eq!(s.last_id(), id, "a duplicate assigns no id");
            id
        };
        let mut s = XiuStore::open(dir.path(), opts(1, 16)).unwrap();
        let (again, new) = s.store(555, KIND_MULTICAST, 9, &[], "thrice", 3).unwrap();
        assert_eq!((again, new), (first, false));
        assert_eq!(one(&mut s, first).unwrap().body, "once");
    }

    #[test]
    fn ids_strictly_increase_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut seen = Vec::new();
        for round in 0..3u64 {
            let mut s = XiuStore::open(
                dir.path(),
                XiuOptions {
                    partition: 9,
                    cache_entries: 0,
                    sync: Durability::Fsync,
                },
            )
            .unwrap();
            if let Some(prev) = seen.last() {
                assert_eq!(s.last_id().counter(), MsgId::counter(*prev));
            }
            for i in 0..5u64 {
                let (id, new) = s
                    .store(round * 100 + i, KIND_PERSONAL, 1, &[], "m", 0)
                    .unwrap();
                assert!(new);
                seen.push(id);
            }
        }
        for w in seen.windows(2) {
            assert!(w[0].counter() < w[1].counter() && w[0] < w[1]);
        }
        assert_eq!(seen.last().unwrap().counter(), 15);
    }

    #[test]
    fn resumes_from_highest_key_when_meta_is_behind() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = XiuStore::open(dir.path(), opts(2, 0)).unwrap();
            for sid in 0..4 {
                s.store(sid, KIND_PERSONAL, 1, &[], "m", 0).unwrap();
            }
            // Make the metadata lag behind the stored messages.
            s.db.put(META_LAST, MsgId::new(2, KIND_PERSONAL, 1).to_be_bytes())
                .unwrap();
        }
        let mut s = XiuStore::open(dir.path(), opts(2, 0)).unwrap();
        assert_eq!(s.last_id(), MsgId::new(2, KIND_PERSONAL, 4));
        let (id, _) = s.store(99, KIND_PERSONAL, 1, &[], "m", 0).unwrap();
        assert_eq!(id.counter(), 5);
        // And a reopen under another partition is refused.
        drop(s);
        assert!(matches!(
            XiuStore::open(dir.path(), opts(3, 0)),
            Err(XiuError::PartitionMismatch {
                stored: 2,
                configured: 3
            })
        ));
    }

    #[test]
    fn cache_eviction_then_disk_read_is_correct() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = XiuStore::open(dir.path(), opts(4, 2)).unwrap();
        let ids: Vec<MsgId> = (0..10u64)
            .map(|i| {
                s.store(i, KIND_PERSONAL, i, &[], &format!("body {i}"), i)
                    .unwrap()
                    .0
            })
            .collect();
        assert_eq!(s.cache.as_ref().unwrap().len(), 2);
        for (i, r) in s.read(&ids).into_iter().enumerate() {
            let m = r.unwrap();
            assert_eq!((m.id, m.body), (ids[i], format!("body {i}")));
        }
        assert_eq!(s.cache.as_ref().unwrap().len(), 2);
    }

    #[test]
    fn corruption_is_detected_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<MsgId> = {
            let mut s = XiuStore::open(dir.path(), opts(5, 64)).unwrap();
            (0..3u64)
                .map(|i| s.store(i, KIND_PERSONAL, 1, &[], "payload", 0).unwrap().0)
                .collect()
        };
        {
            // A second handle on the closed store flips one byte of the middle record and
            // truncates the last one.
            let db = rocksdb::DB::open_default(dir.path()).unwrap();
            let mut raw = db.get(msg_key(ids[1].counter())).unwrap().unwrap();
            let n = raw.len();
            raw[n - 2] ^= 0x40;
            db.put(msg_key(ids[1].counter()), raw).unwrap();
            db.put(msg_key(ids[2].counter()), [1u8, 2]).unwrap();
        }
        let mut s = XiuStore::open(dir.path(), opts(5, 64)).unwrap();
        let got = s.read(&ids);
        assert_eq!(got[0].as_ref().unwrap().body, "payload");
        match &got[1] {
            Err(XiuError::Corrupt { id, reason }) => {
                assert_eq!(*id, ids[1]);
                assert!(reason.contains("crc32"), "{reason}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert!(matches!(&got[2], Err(XiuError::Corrupt { id, .. }) if *id == ids[2]));
        // Never cached as data: a second read reports it again.
        assert!(matches!(one(&mut s, ids[1]), Err(XiuError::Corrupt { .. })));
        // And it is not replicated.
        assert!(matches!(
            s.entries_after(ids[0], 10),
            Err(XiuError::Corrupt { .. })
        ));
        // The counter still resumes past the truncated record.
        let (next, _) = s.store(50, KIND_PERSONAL, 1, &[], "after", 0).unwrap();
        assert_eq!(next.counter(), 4);
    }

    #[test]
    fn wrong_partition_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = XiuStore::open(dir.path(), opts(6, 8)).unwrap();
        let (id, _) = s.store(1, KIND_PERSONAL, 1, &[], "x", 0).unwrap();
        let foreign = MsgId::new(7, KIND_PERSONAL, id.counter());
        let got = s.read(&[foreign, id]);
        assert!(matches!(
            &got[0],
            Err(XiuError::WrongPartition { id, partition: 6 }) if *id == foreign
        ));
        assert!(got[1].is_ok());
        assert!(matches!(
            s.entries_after(MsgId::new(7, KIND_NONE, 0), 10),
            Err(XiuError::WrongPartition { .. })
        ));
    }

    #[test]
    fn replication_roundtrip() {
        let ldir = tempfile::tempdir().unwrap();
        let fdir = tempfile::tempdir().unwrap();
        let mut leader = XiuStore::open(ldir.path(), opts(8, 4)).unwrap();
        let mut follower = XiuStore::open(fdir.path(), opts(8, 4)).unwrap();
        let mut ids = Vec::new();
        for i in 0..25u64 {
            let kind = if i % 3 == 0 {
                KIND_MULTICAST
            } else {
                KIND_PERSONAL
            };
            ids.push(
                leader
                    .store(1000 + i, kind, i, &[], &format!("m{i}"), i)
                    .unwrap()
                    .0,
            );
        }
        // Pull in batches of 10, as a follower's heartbeat loop would.
        loop {
            let batch = leader.entries_after(follower.last_id(), 10).unwrap();
            if batch.is_empty() {
                break;
            }
            assert!(batch.len() <= 10);
            let n = follower.apply_replicated(&batch).unwrap();
            assert_eq!(n, batch.len());
            // A retried batch is harmless.
            assert_eq!(follower.apply_replicated(&batch).unwrap(), 0);
        }
        assert_eq!(follower.last_id(), leader.last_id());
        let a: Vec<_> = leader.read(&ids).into_iter().map(|r| r.unwrap()).collect();
        follower.clear_cache();
        let b: Vec<_> = follower
            .read(&ids)
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(a, b);
        // The follower's sid index came along: a store there deduplicates.
        assert_eq!(
            follower
                .store(1005, KIND_PERSONAL, 0, &[], "dup", 0)
                .unwrap(),
            (ids[5], false)
        );
        // After a restart the follower resumes where it was.
        drop(follower);
        let follower = XiuStore::open(fdir.path(), opts(8, 4)).unwrap();
        assert_eq!(follower.last_id(), leader.last_id());
    }

    #[test]
    fn replication_refuses_gaps_and_bad_records() {
        let ldir = tempfile::tempdir().unwrap();
        let fdir = tempfile::tempdir().unwrap();
        let mut leader = XiuStore::open(ldir.path(), opts(1, 4)).unwrap();
        let mut follower = XiuStore::open(fdir.path(), opts(1, 4)).unwrap();
        for i in 0..3u64 {
            leader.store(i, KIND_PERSONAL, 0, &[], "x", 0).unwrap();
        }
        let all = leader.entries_after(follower.last_id(), 10).unwrap();
        assert!(matches!(
            follower.apply_replicated(&all[1..]),
            Err(XiuError::Gap {
                expected: 1,
                got: 2
            })
        ));
        let mut bad = all.clone();
        bad[1].1[5] ^= 1;
        assert!(matches!(
            follower.apply_replicated(&bad),
            Err(XiuError::Corrupt { .. })
        ));
        assert_eq!(
            follower.last_id().counter(),
            0,
            "a refused batch applies nothing"
        );
        assert_eq!(follower.apply_replicated(&all).unwrap(), 3);
    }

    #[test]
    fn advance_counter_skips_ids_durably() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = XiuStore::open(dir.path(), opts(2, 4)).unwrap();
            s.store(1, KIND_PERSONAL, 0, &[], "x", 0).unwrap();
            assert_eq!(
                s.advance_counter(0).unwrap().counter(),
                1,
                "never backwards"
            );
            s.advance_counter(1000).unwrap();
        }
        let mut s = XiuStore::open(dir.path(), opts(2, 4)).unwrap();
        assert_eq!(
            s.store(2, KIND_PERSONAL, 0, &[], "y", 0)
                .unwrap()
                .0
                .counter(),
            1001
        );
    }
}
