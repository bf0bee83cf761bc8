//! The seed's routing rules, as pure functions.
//!
//! Every rule is applied to [`RouteKey::hash`](crate::ids::RouteKey::hash) (the seed's RoomID).
//! Partition counts are powers of two and grow by doubling; a partition `p` serves a key when
//! `hash % N == p % N`, where `N` is the published `partition_num`. While a doubling is under way
//! the new partitions (`p >= N`) already match, so they receive their share before `N` changes
//! (seed 7.2).

use crate::ids::RouteKey;

/// Virtual rooms per big room (seed 4.5).
pub const VROOMS: u64 = 64;

/// Does partition `partition` of a role whose published count is `partition_num` serve `hash`?
pub fn partition_matches(hash: u64, partition: u32, partition_num: u32) -> bool {
    let n = partition_num.max(1) as u64;
    hash % n == partition as u64 % n
}

/// The registered partitions that must receive a message for `hash` (more than one only while
/// a doubling is under way).
pub fn target_partitions(
    hash: u64,
    partition_num: u32,
    registered: impl IntoIterator<Item = u32>,
) -> Vec<u32> {
    registered
        .into_iter()
        .filter(|p| partition_matches(hash, *p, partition_num))
        .collect()
}

/// Which replica (index into the partition's replicas sorted by registry id) serves `hash`.
///
/// The seed says `RoomID % replicas`, but every key of partition `p` already has
/// `hash % N == p`; with `N` and the replica count both even that is one fixed replica per
/// partition and the others idle. Dividing the partition bits out first, `(hash / N) % replicas`,
/// spreads the keys of a partition over all its replicas.
pub fn pick_replica(hash: u64, partition_num: u32, replicas: usize) -> Option<usize> {
    if replicas == 0 {
        None
    } else {
        Some(((hash / partition_num.max(1) as u64) % replicas as u64) as usize)
    }
}

/// The broker partition the proxy sends a room message to: `hash % N` (seed 4.3).
pub fn broker_partition(hash: u64, partition_num: u32) -> u32 {
    (hash % partition_num.max(1) as u64) as u32
}

/// The partition of a user-keyed role (Xiu, Pi, and the broker for a user's devices) that
/// serves user `uid`: `uid % N` (seed 8.2.1 step 2, 8.3.1 step 1, 8.4).
pub fn user_partition(uid: u64, partition_num: u32) -> u32 {
    (uid % u64::from(partition_num.max(1))) as u32
}

/// Does partition `partition` of a user-keyed role, with `partition_num` published, serve user
/// `uid`? The seed's `UIN % N == PartitionID % N`, so during a doubling the parent and its
/// child both do.
pub fn owns_user(uid: u64, partition: u32, partition_num: u32) -> bool {
    partition_matches(uid, partition, partition_num)
}

/// Users grouped by [`user_partition`], each user once, in the order first seen.
pub fn group_users<T>(
    items: impl IntoIterator<Item = T>,
    partition_num: u32,
    uid_of: impl Fn(&T) -> u64,
) -> std::collections::BTreeMap<u32, Vec<T>> {
    let mut groups: std::collections::BTreeMap<u32, Vec<T>> = std::collections::BTreeMap::new();
    for item in items {
        groups
            .entry(user_partition(uid_of(&item), partition_num))
            .or_default()
            .push(item);
    }
    groups
}

/// Which of the `replicas` running replicas of user `uid`'s broker partition serves that
/// user's devices: the room rule with the user id as the hash, `(uid / N) % replicas`.
pub fn user_replica(uid: u64, partition_num: u32, replicas: usize) -> Option<usize> {
    pick_replica(uid, partition_num, replicas)
}

/// Which of `proxies` running proxies a gateway sends user `uid`'s publishes to (seed 8.4:
/// `ProxyID = UIN % ProxyNum`).
pub fn user_proxy(uid: u64, proxies: usize) -> Option<usize> {
    (proxies > 0).then(|| (uid % proxies as u64) as usize)
}

/// The router partitions a broker partition must subscribe to so that it sees every gateway
/// message of its rooms: those with `rp % m == bp % m`, `m = min(router N, broker N)`
/// (seed 7.4: with 4 brokers and 2 routers broker 3 listens to router 1; with 4 brokers and
/// 8 routers it listens to routers 3 and 7).
pub fn router_partitions_for_broker(
    broker_partition: u32,
    broker_partition_num: u32,
    router_partition_num: u32,
    registered_router_partitions: impl IntoIterator<Item = u32>,
) -> Vec<u32> {
    let m = broker_partition_num.max(1).min(router_partition_num.max(1));
    registered_router_partitions
        .into_iter()
        .filter(|rp| rp % m == broker_partition % m)
        .collect()
}

/// Is `n` a usable partition count?
pub fn is_power_of_two(n: u32) -> bool {
    n != 0 && n.is_power_of_two()
}

/// Room ids reserved for big rooms, `start..end` (half-open). Empty by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct BigRooms {
    pub start: u64,
    pub end: u64,
}

impl BigRooms {
    pub fn contains(&self, room: u64) -> bool {
        room >= self.start && room < self.end
    }

    /// The key under which a member `uid` of `room` is routed: a virtual room `uid % 64` for a
    /// big room, the room itself otherwise.
    pub fn member_key(&self, room: u64, uid: u64) -> RouteKey {
        if self.contains(room) {
            RouteKey::virtual_room(room, (uid % VROOMS) as u8)
        } else {
            RouteKey::room(room)
        }
    }

    /// Every key a message published to `room` must be sent to.
    pub fn publish_keys(&self, room: u64) -> Vec<RouteKey> {
        if self.contains(room) {
            (0..VROOMS as u8)
                .map(|k| RouteKey::virtual_room(room, k))
                .collect()
        } else {
            vec![RouteKey::room(room)]
        }
    }

    /// Parse `START..END` (or an empty string for none).
    pub fn parse(s: &str) -> Result<BigRooms, String> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(BigRooms::default());
        }
        let (a, b) = s
            .split_once("..")
            .ok_or_else(|| format!("big room range {s:?} is not START..END"))?;
        let start: u64 = a
            .trim()
            .parse()
            .map_err(|e| format!("big room range start {a:?}: {e}"))?;
        let end: u64 = b
            .trim()
            .parse()
            .map_err(|e| format!("big room range end {b:?}: {e}"))?;
        if end < start {
            return Err(format!("big room range {s:?} ends before it starts"));
        }
        Ok(BigRooms { start, end })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_partition_rule() {
        // N = 2: partitions 0 and 1 split even and odd rooms
        assert!(partition_matches(42, 0, 2));
        assert!(!partition_matches(42, 1, 2));
        // doubling 2 -> 4 under way: registered 0..4, published N still 2
        assert_eq!(target_partitions(5, 2, 0..4), vec![1, 3]);
        // after N = 4 only one partition
        assert_eq!(target_partitions(5, 4, 0..4), vec![1]);
        assert_eq!(broker_partition(5, 4), 1);
    }

    #[test]
    fn user_rules() {
        assert_eq!(user_partition(10, 4), 2);
        assert_eq!(
            user_partition(10, 0),
            0,
            "no partitions published counts as one"
        );
        assert!(owns_user(10, 2, 4) && !owns_user(10, 1, 4));
        // doubling 2 -> 4 under way: the parent 0 and its child 2 both own user 6
        assert!(owns_user(6, 0, 2) && owns_user(6, 2, 2));
        let groups = group_users([(4u64, 'a'), (5, 'b'), (6, 'c')], 2, |(u, _)| *u);
        assert_eq!(groups[&0], vec![(4, 'a'), (6, 'c')]);
        assert_eq!(groups[&1], vec![(5, 'b')]);
        assert_eq!(user_replica(9, 2, 0), None);
        assert_eq!(user_replica(9, 2, 3), Some(1));
        assert_eq!(user_proxy(7, 0), None);
        assert_eq!(user_proxy(7, 3), Some(1));
    }

    #[test]
    fn replica_pick() {
        assert_eq!(pick_replica(7, 1, 0), None);
        assert_eq!(pick_replica(7, 1, 2), Some(1));
        assert_eq!(pick_replica(8, 1, 2), Some(0));
        // 2 partitions, 2 replicas: the even rooms of partition 0 use both replicas
        let used: std::collections::HashSet<usize> = (0..100u64)
            .step_by(2)
            .filter_map(|h| pick_replica(h, 2, 2))
            .collect();
        assert_eq!(used.len(), 2);
    }

    #[test]
    fn broker_router_subscription_seed_examples() {
        // 4 brokers, 2 routers: broker 3 listens to router 1
        assert_eq!(router_partitions_for_broker(3, 4, 2, 0..2), vec![1]);
        // 4 brokers, 8 routers: broker 3 listens to routers 3 and 7
        assert_eq!(router_partitions_for_broker(3, 4, 8, 0..8), vec![3, 7]);
        // every room of broker 3 is covered by the router partitions it listens to
        for hash in 0..1000u64 {
            if partition_matches(hash, 3, 4) {
                let rp = (hash % 8) as u32;
                assert!([3, 7].contains(&rp));
            }
        }
    }

    #[test]
    fn big_rooms() {
        let big = BigRooms::parse("1000..2000").unwrap();
        assert!(big.contains(1000) && big.contains(1999) && !big.contains(2000));
        assert_eq!(big.member_key(1500, 130).vroom, Some(2));
        assert_eq!(big.member_key(5, 130), RouteKey::room(5));
        assert_eq!(big.publish_keys(1500).len(), 64);
        assert_eq!(big.publish_keys(7).len(), 1);
        assert!(BigRooms::parse("5..1").is_err());
        assert!(BigRooms::parse("x").is_err());
        assert_eq!(BigRooms::parse("").unwrap(), BigRooms::default());
        assert!(is_power_of_two(4) && !is_power_of_two(6) && !is_power_of_two(0));
    }
}
