//! The routing table of routers and brokers (the seed's RoomGatewayList): for each route key,
//! which gateways have members. Each (key, gateway) row is a last-writer-wins register versioned
//! by the gateway's own increasing `GatewayMsgID`, so replicas that see the same updates in any
//! order, duplicated or interleaved with snapshots, end up with the same table. A leave is kept
//! as a tombstone so that a late, older join cannot resurrect the row.
//!
//! The seed keeps one "largest GatewayMsgID" per gateway; keeping it per (gateway, key) is the
//! same rule where it matters (join and leave of one room stay ordered) without dropping a
//! retransmitted update for room A just because a newer one for room B got there first.

use crate::ids::{GatewayMsgId, RouteKey};
use crate::routing::partition_matches;
use crate::wire::{GatewayRef, GatewayUpdate, RouteRow};
use std::collections::{HashMap, HashSet};

#[derive(Debug, Default, Clone)]
pub struct RouteTable {
    rows: HashMap<RouteKey, HashMap<u64, RouteRow>>,
}

impl RouteTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Apply a row; true if it was newer than what the table had (the table changed).
    pub fn apply(&mut self, row: RouteRow) -> bool {
        let slot = self.rows.entry(row.key).or_default();
        match slot.get(&row.gateway.instance) {
            Some(old) if old.version >= row.version => false,
            _ => {
                slot.insert(row.gateway.instance, row);
                true
            }
        }
    }

    /// Does the table reflect this update or a newer one from the same gateway instance?
    pub fn covers(&self, key: &RouteKey, instance: u64, version: GatewayMsgId) -> bool {
        self.rows
            .get(key)
            .and_then(|s| s.get(&instance))
            .is_some_and(|r| r.version >= version)
    }

    /// Gateways that have members of `key`.
    pub fn gateways(&self, key: &RouteKey) -> impl Iterator<Item = &GatewayRef> {
        self.rows
            .get(key)
            .into_iter()
            .flat_map(|s| s.values())
            .filter(|r| r.present)
            .map(|r| &r.gateway)
    }

    /// Every row (tombstones included) whose key a partition serves.
    pub fn rows_for(&self, partition: u32, partition_num: u32) -> Vec<RouteRow> {
        self.rows
            .iter()
            .filter(|(k, _)| partition_matches(k.hash(), partition, partition_num))
            .flat_map(|(_, s)| s.values().cloned())
            .collect()
    }

    pub fn all_rows(&self) -> impl Iterator<Item = &RouteRow> {
        self.rows.values().flat_map(|s| s.values())
    }

    /// Drop rows of keys this partition no longer serves (after a doubling); returns them.
    pub fn retain_partition(&mut self, partition: u32, partition_num: u32) -> Vec<RouteRow> {
        let mut removed = Vec::new();
        self.rows.retain(|k, s| {
            let keep = partition_matches(k.hash(), partition, partition_num);
            if !keep {
                removed.extend(s.values().cloned());
            }
            keep
        });
        removed
    }

    /// Gateway instances the table mentions.
    pub fn instances(&self) -> HashSet<u64> {
        self.all_rows().map(|r| r.gateway.instance).collect()
    }

    /// Forget a gateway instance that is gone; returns its rows.
    pub fn purge_instance(&mut self, instance: u64) -> Vec<RouteRow> {
        let mut removed = Vec::new();
        self.rows.retain(|_, s| {
            if let Some(r) = s.remove(&instance) {
                removed.push(r);
            }
            !s.is_empty()
        });
        removed
    }

    /// Number of (key, gateway) rows, tombstones included.
    pub fn len(&self) -> usize {
        self.rows.values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Number of keys with at least one gateway present.
    pub fn live_keys(&self) -> usize {
        self.rows
            .values()
            .filter(|s| s.values().any(|r| r.present))
            .count()
    }
}

/// Forgets gateways that left the registry: rows of an instance absent from the live set in two
/// consecutive sweeps are purged (one sweep of grace covers a gateway whose registration the
/// local view has not seen yet).
#[derive(Debug, Default)]
pub struct GatewaySweeper {
    suspects: HashSet<u64>,
}

impl GatewaySweeper {
    pub fn sweep(&mut self, table: &mut RouteTable, live: &HashSet<u64>) -> Vec<RouteRow> {
        let absent: HashSet<u64> = table
            .instances()
            .into_iter()
            .filter(|i| !live.contains(i))
            .collect();
        let mut removed = Vec::new();
        for i in absent.intersection(&self.suspects) {
            removed.extend(table.purge_instance(*i));
        }
        self.suspects = absent;
        for r in &removed {
            self.suspects.remove(&r.gateway.instance);
        }
        removed
    }
}

/// The table row a gateway update stands for.
pub fn row_of(u: &GatewayUpdate) -> RouteRow {
    RouteRow {
        key: u.key,
        gateway: u.gateway,
        version: u.id,
        present: u.present,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw(i: u64) -> GatewayRef {
        GatewayRef {
            instance: i,
            addr: format!("127.0.0.1:{}", 1000 + i).parse().unwrap(),
        }
    }

    fn row(key: u64, g: u64, v: u64, present: bool) -> RouteRow {
        RouteRow {
            key: RouteKey::room(key),
            gateway: gw(g),
            version: GatewayMsgId::new(g as u16, v),
            present,
        }
    }

    #[test]
    fn lww_per_gateway_and_key() {
        let mut t = RouteTable::new();
        assert!(t.apply(row(1, 1, 1, true)));
        assert!(!t.apply(row(1, 1, 1, true)), "duplicate");
        assert!(t.apply(row(1, 1, 3, false)));
        assert!(
            !t.apply(row(1, 1, 2, true)),
            "late older join cannot resurrect"
        );
        assert_eq!(t.gateways(&RouteKey::room(1)).count(), 0);
        // a retransmitted update for room 2 older than room 1's still applies
        assert!(t.apply(row(2, 1, 2, true)));
        assert_eq!(t.gateways(&RouteKey::room(2)).count(), 1);
        assert!(t.covers(&RouteKey::room(2), 1, GatewayMsgId::new(1, 2)));
        assert!(!t.covers(&RouteKey::room(2), 1, GatewayMsgId::new(1, 3)));
    }

    #[test]
    fn order_does_not_matter() {
        let updates = vec![
            row(1, 1, 1, true),
            row(1, 2, 1, true),
            row(1, 1, 2, false),
            row(3, 2, 2, true),
            row(1, 1, 4, true),
            row(3, 2, 5, false),
        ];
        let mut a = RouteTable::new();
        for u in &updates {
            a.apply(u.clone());
        }
        let mut b = RouteTable::new();
        for u in updates.iter().rev() {
            b.apply(u.clone());
        }
        let mut ra = a.rows_for(0, 1);
        let mut rb = b.rows_for(0, 1);
        ra.sort_by_key(|r| (r.key, r.gateway.instance));
        rb.sort_by_key(|r| (r.key, r.gateway.instance));
        assert_eq!(ra, rb);
        assert_eq!(a.live_keys(), 1);
    }

    #[test]
    fn partitions_and_purge() {
        let mut t = RouteTable::new();
        for k in 0..8 {
            t.apply(row(k, 1, k + 1, true));
            t.apply(row(k, 2, k + 1, true));
        }
        assert_eq!(t.rows_for(1, 2).len(), 8);
        let removed = t.retain_partition(1, 2);
        assert_eq!(removed.len(), 8);
        assert_eq!(t.len(), 8);
        assert_eq!(t.instances().len(), 2);
        assert_eq!(t.purge_instance(2).len(), 4);
        assert_eq!(t.instances().len(), 1);
        assert_eq!(t.purge_instance(1).len(), 4);
        assert!(t.is_empty());
    }

    #[test]
    fn sweeper_gives_one_sweep_of_grace() {
        let mut t = RouteTable::new();
        t.apply(row(1, 1, 1, true));
        t.apply(row(1, 2, 1, true));
        let mut s = GatewaySweeper::default();
        let live: HashSet<u64> = [1].into();
        assert!(s.sweep(&mut t, &live).is_empty());
        assert_eq!(s.sweep(&mut t, &live).len(), 1);
        assert_eq!(t.instances(), live);
        // an instance that shows up again in time is kept
        t.apply(row(2, 3, 1, true));
        assert!(s.sweep(&mut t, &live).is_empty());
        let live: HashSet<u64> = [1, 3].into();
        assert!(s.sweep(&mut t, &live).is_empty());
        assert_eq!(t.instances().len(), 2);
    }
}
