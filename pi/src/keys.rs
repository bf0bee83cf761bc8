//! The RocksDB key and value layouts of a Pi index: index entries, device cursors, the
//! operation log and its metadata, and their decoding (a bad key or value is `Corrupt`).

use crate::{LogEntry, LogId, PiError};
use pixiu_protocol::inbox::MsgId;
use pixiu_storage::WriteBatch;

pub(crate) const META_LAST: &[u8] = b"!last";
pub(crate) const META_RESTORING: &[u8] = b"!restoring";
pub(crate) const CURSOR_PREFIX: u8 = b'c';
pub(crate) const INDEX_PREFIX: u8 = b'i';
pub(crate) const LOG_PREFIX: u8 = b'l';

/// `prefix | a (8 bytes BE) | b (8 bytes BE)`.
pub(crate) fn key17(prefix: u8, a: u64, b: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = prefix;
    k[1..9].copy_from_slice(&a.to_be_bytes());
    k[9..].copy_from_slice(&b.to_be_bytes());
    k
}

/// `(a, b)` of a key made by [`key17`] with `prefix`, `None` for any other key.
pub(crate) fn split_key17(prefix: u8, key: &[u8]) -> Option<(u64, u64)> {
    if key.len() != 17 || key[0] != prefix {
        return None;
    }
    let a = u64::from_be_bytes(key[1..9].try_into().ok()?);
    Some((a, u64::from_be_bytes(key[9..].try_into().ok()?)))
}

/// `prefix | uid (8 bytes BE)`: the keys of one user's index entries or cursors start so.
pub(crate) fn user_prefix(prefix: u8, uid: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = prefix;
    k[1..].copy_from_slice(&uid.to_be_bytes());
    k
}

pub(crate) fn index_key(uid: u64, id: MsgId) -> [u8; 17] {
    key17(INDEX_PREFIX, uid, id.0)
}

/// `(uid, MsgId)` of any index key, `None` for a key that is not one.
pub(crate) fn entry_of_index_key(key: &[u8]) -> Option<(u64, MsgId)> {
    split_key17(INDEX_PREFIX, key).map(|(uid, id)| (uid, MsgId(id)))
}

/// The MsgId of an index key of `uid`, `None` for any other key.
pub(crate) fn id_of_index_key(uid: u64, key: &[u8]) -> Option<MsgId> {
    match entry_of_index_key(key)? {
        (u, id) if u == uid => Some(id),
        _ => None,
    }
}

pub(crate) fn cursor_key(uid: u64, device: u64) -> [u8; 17] {
    key17(CURSOR_PREFIX, uid, device)
}

/// `(uid, device)` of any cursor key, `None` for a key that is not one.
pub(crate) fn device_of_cursor_key(key: &[u8]) -> Option<(u64, u64)> {
    split_key17(CURSOR_PREFIX, key)
}

/// The 8 bytes of a value expected to hold 8 bytes; [`PiError::Corrupt`] naming `what()`
/// otherwise.
pub(crate) fn be8(v: &[u8], what: impl FnOnce() -> String) -> Result<[u8; 8], PiError> {
    v.try_into().map_err(|_| PiError::Corrupt {
        what: what(),
        reason: format!("{} bytes where 8 are expected", v.len()),
    })
}

pub(crate) fn decode_log_id(what: &str, v: &[u8]) -> Result<LogId, PiError> {
    Ok(LogId(u64::from_be_bytes(be8(v, || what.into())?)))
}

/// The append time stored as the value of the index entry of `(uid, id)`.
pub(crate) fn decode_ts(uid: u64, id: MsgId, v: &[u8]) -> Result<u64, PiError> {
    Ok(u64::from_be_bytes(be8(v, || {
        format!("append time of {id} in uid {uid}")
    })?))
}

/// The cursor stored as the value of the cursor key of `(uid, device)`.
pub(crate) fn decode_cursor(uid: u64, device: u64, v: &[u8]) -> Result<MsgId, PiError> {
    Ok(MsgId::from_be_bytes(be8(v, || {
        format!("cursor of device {device} of uid {uid}")
    })?))
}

pub(crate) fn corrupt_key(what: &str, key: &[u8]) -> PiError {
    PiError::Corrupt {
        what: what.into(),
        reason: format!("{} bytes where 17 are expected", key.len()),
    }
}

pub(crate) fn log_key(id: LogId) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = LOG_PREFIX;
    k[1..].copy_from_slice(&id.0.to_be_bytes());
    k
}

pub(crate) fn log_id_of_key(key: &[u8]) -> Option<LogId> {
    match key {
        [LOG_PREFIX, rest @ ..] => Some(LogId(u64::from_be_bytes(rest.try_into().ok()?))),
        _ => None,
    }
}

pub(crate) fn decode_entry(key: LogId, v: &[u8]) -> Result<LogEntry, PiError> {
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
pub(crate) fn put_log(batch: &mut WriteBatch, entry: LogEntry) {
    let v = postcard::to_allocvec(&entry).expect("serializing a log entry into a Vec cannot fail");
    batch.put(log_key(entry.id), v);
}
