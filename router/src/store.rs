//! The router's RocksDB: one entry per (route key, gateway instance) row. Writes go to the
//! write-ahead log without an fsync each: a router that loses its last writes in a machine
//! crash gets them back from a peer replica when it starts, and gateways re-announce their
//! rooms periodically.

use pixiu_protocol::ids::RouteKey;
use pixiu_protocol::wire::RouteRow;
use pixiu_storage::{Db, Durability, WriteBatch};
use std::path::Path;

pub use pixiu_storage::StorageError as StoreError;

pub struct Store {
    db: Db,
}

fn key_bytes(key: &RouteKey, instance: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[..8].copy_from_slice(&key.room.to_be_bytes());
    k[8] = key.vroom.unwrap_or(0xFF);
    k[9..].copy_from_slice(&instance.to_be_bytes());
    k
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Db::open(
            path,
            pixiu_storage::Options {
                durability: Durability::GroupCommit,
                lz4: false,
            },
        )?;
        Ok(Store { db })
    }

    /// Every stored row; an undecodable entry is skipped with a warning, never fatal.
    pub fn load(&self) -> Result<Vec<RouteRow>, StoreError> {
        let mut rows = Vec::new();
        for item in self.db.scan_prefix(&[]) {
            let (k, v) = item?;
            match postcard::from_bytes::<RouteRow>(&v) {
                Ok(row) => rows.push(row),
                Err(e) => tracing::warn!(key = ?k, "skipping an undecodable route row: {e}"),
            }
        }
        Ok(rows)
    }

    pub fn put(&self, row: &RouteRow) -> Result<(), StoreError> {
        let v = postcard::to_allocvec(row).expect("serializing a row into a Vec cannot fail");
        self.db.put(key_bytes(&row.key, row.gateway.instance), v)?;
        Ok(())
    }

    pub fn delete_rows(&self, rows: &[RouteRow]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for r in rows {
            batch.delete(key_bytes(&r.key, r.gateway.instance));
        }
        self.db.write(batch)?;
        Ok(())
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_wal()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pixiu_protocol::ids::GatewayMsgId;
    use pixiu_protocol::wire::GatewayRef;

    #[test]
    fn rows_survive_reopen_and_garbage_is_skipped() {
        let dir = std::env::temp_dir().join(format!("pixiu-router-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let row = RouteRow {
            key: RouteKey::virtual_room(9, 3),
            gateway: GatewayRef {
                instance: 4,
                addr: "127.0.0.1:9".parse().unwrap(),
            },
            version: GatewayMsgId::new(4, 7),
            present: true,
        };
        {
            let s = Store::open(&dir).unwrap();
            s.put(&row).unwrap();
            s.db.put(b"junk", b"\xff\xff\xff").unwrap();
            s.flush().unwrap();
        }
        let s = Store::open(&dir).unwrap();
        assert_eq!(s.load().unwrap(), vec![row.clone()]);
        s.delete_rows(&[row]).unwrap();
        assert!(s.load().unwrap().is_empty());
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
