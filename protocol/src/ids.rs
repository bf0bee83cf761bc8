//! Identifier layouts: snowflake ids for room messages, `GatewayMsgID` for gateway messages,
//! and [`RouteKey`], the unit of routing (a room, or one virtual room of a big room).

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};

/// Which kind of node generates snowflake ids; keeps the 10-bit instance of gateways and
/// proxies apart so that two nodes never share an instance while their ZooKeeper sequence
/// numbers differ modulo 512.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdSource {
    Proxy,
    Gateway,
}

/// Snowflake id generator (42-bit ms timestamp, 10-bit instance, 12-bit sequence), a thin
/// wrapper over the `snowflaked` crate that derives the instance from a registry id.
#[derive(Debug)]
pub struct SnowflakeGen {
    inner: snowflaked::sync::Generator,
}

impl SnowflakeGen {
    /// `node_id` is the node's registry (ZooKeeper sequence) id.
    pub fn new(source: IdSource, node_id: u64) -> Self {
        Self::with_instance(Self::instance_for(source, node_id))
    }

    /// The 10-bit instance a node of `source` with registry id `node_id` uses: proxies
    /// `0..512`, gateways `512..1024`. Two live nodes must not share one (see
    /// `pixiu_runtime::register_with_unique_instance`).
    pub fn instance_for(source: IdSource, node_id: u64) -> u16 {
        let base: u16 = match source {
            IdSource::Proxy => 0,
            IdSource::Gateway => 512,
        };
        base | (node_id % 512) as u16
    }

    /// A generator for a given instance (its low 10 bits).
    pub fn with_instance(instance: u16) -> Self {
        let inner = snowflaked::sync::Generator::new_checked(instance & 0x3FF)
            .expect("instance is below 1024 by construction");
        SnowflakeGen { inner }
    }

    pub fn instance(&self) -> u16 {
        self.inner.instance()
    }

    /// A new id, unique for this instance and increasing over time.
    pub fn next(&self) -> u64 {
        self.inner.generate()
    }
}

/// Bits of the `GatewayMsgID` counter.
pub const GATEWAY_COUNTER_BITS: u32 = 38;
/// Bits reserved between instance and counter.
pub const GATEWAY_RESERVED_BITS: u32 = 10;
const COUNTER_MASK: u64 = (1 << GATEWAY_COUNTER_BITS) - 1;

/// A gateway message id: `16-bit gateway instance | 10-bit reserved | 38-bit counter`
/// (seed 7.2). Within one gateway instance ids only grow, so a receiver that keeps the largest
/// id seen can drop anything older.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GatewayMsgId(pub u64);

impl GatewayMsgId {
    pub fn new(instance: u16, counter: u64) -> Self {
        GatewayMsgId(
            ((instance as u64) << (GATEWAY_COUNTER_BITS + GATEWAY_RESERVED_BITS))
                | (counter & COUNTER_MASK),
        )
    }
    pub fn instance(self) -> u16 {
        (self.0 >> (GATEWAY_COUNTER_BITS + GATEWAY_RESERVED_BITS)) as u16
    }
    pub fn counter(self) -> u64 {
        self.0 & COUNTER_MASK
    }
}

/// Hands out increasing [`GatewayMsgId`]s for one gateway instance. Lock-free.
#[derive(Debug)]
pub struct GatewayMsgIdGen {
    instance: u16,
    counter: AtomicU64,
}

impl GatewayMsgIdGen {
    /// `registry_id` is the gateway's ZooKeeper sequence number; its low 16 bits are the
    /// instance (the seed assumes at most 65,535 gateway registrations).
    pub fn new(registry_id: u64) -> Self {
        GatewayMsgIdGen {
            instance: (registry_id & 0xFFFF) as u16,
            counter: AtomicU64::new(0),
        }
    }
    pub fn instance(&self) -> u16 {
        self.instance
    }
    /// The next id. The 38-bit counter lasts 2^38 messages (years at 1,000/s); past that the
    /// gateway must re-register to get a new instance, which [`Self::exhausted`] tells.
    pub fn next(&self) -> GatewayMsgId {
        let c = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
        GatewayMsgId::new(self.instance, c)
    }
    pub fn exhausted(&self) -> bool {
        self.counter.load(Ordering::Relaxed) >= COUNTER_MASK
    }
}

/// The unit of routing: a room, or one of the 64 virtual rooms of a big room (seed 4.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RouteKey {
    pub room: u64,
    /// `Some(k)` with `k < 64` for virtual room `k` of a big room.
    pub vroom: Option<u8>,
}

impl RouteKey {
    pub fn room(room: u64) -> Self {
        RouteKey { room, vroom: None }
    }
    pub fn virtual_room(room: u64, k: u8) -> Self {
        RouteKey {
            room,
            vroom: Some(k % crate::routing::VROOMS as u8),
        }
    }
    /// The number every partition rule is applied to (the seed's "RoomID"). A virtual room
    /// hashes as `room * 64 + k`, so the 64 virtual rooms of one big room spread over all
    /// partitions (for any power-of-two partition count up to 64).
    pub fn hash(&self) -> u64 {
        match self.vroom {
            None => self.room,
            Some(k) => self
                .room
                .wrapping_mul(crate::routing::VROOMS)
                .wrapping_add(k as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_msg_id_layout() {
        let id = GatewayMsgId::new(0xABCD, 5);
        assert_eq!(id.instance(), 0xABCD);
        assert_eq!(id.counter(), 5);
        assert_eq!(id.0 >> 48, 0xABCD);
        // reserved bits stay zero
        assert_eq!((id.0 >> 38) & 0x3FF, 0);
        let gen = GatewayMsgIdGen::new(0x1_0007);
        assert_eq!(gen.instance(), 7);
        let a = gen.next();
        let b = gen.next();
        assert!(b > a);
        assert_eq!(a.counter(), 1);
    }

    #[test]
    fn snowflake_instances_differ_by_source() {
        let p = SnowflakeGen::new(IdSource::Proxy, 3);
        let g = SnowflakeGen::new(IdSource::Gateway, 3);
        let a = p.next();
        let b = g.next();
        assert_ne!(a, b);
        assert_ne!((a >> 12) & 0x3FF, (b >> 12) & 0x3FF);
        let c = p.next();
        assert!(c > a);
    }

    #[test]
    fn vroom_hash_spreads() {
        let mut seen = std::collections::HashSet::new();
        for k in 0..64u8 {
            seen.insert(RouteKey::virtual_room(1_000_000, k).hash() % 8);
        }
        assert_eq!(seen.len(), 8);
        assert_eq!(RouteKey::room(42).hash(), 42);
    }
}
