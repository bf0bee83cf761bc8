//! Personal inboxes (seed section 8): the Xiu `MsgID` layout, its type byte, the record Xiu
//! stores for each message, and the partition rule of Xiu and Pi.
//!
//! A [`MsgId`] is `1 byte Xiu partition | 1 byte message type | 6 bytes counter` (seed 8.2.1),
//! most significant byte first. One Xiu partition has a single counter, so within one
//! partition and one type, counter order is id order. Pi orders a user's list by the whole
//! `u64`, in which the partition and type bytes rank above the counter.
//!
//! **The type byte.** The services give every stored message type [`KIND_PERSONAL`] (1), the
//! chat message type, whatever its number of receivers. [`KIND_NONE`] (0) only builds
//! positions such as "everything after counter n". [`KIND_MULTICAST`] (2) is assigned by no
//! service; only tests use it.
//!
//! **Multicast.** A message to several users (`POST /v1/users/messages`) is not a type of its
//! own. The courier groups its receivers by Xiu partition (`uid % N`) and stores one copy per
//! partition, with type 1 and that partition's next counter. Each copy's
//! `StoredMessage::to` lists the receivers of that partition, and Pi indexes the copy's id
//! in each of their inboxes. So the receivers of one multicast message may get different ids.
//!
//! **Why one user's ids only grow.** Every message for `uid` is stored in Xiu partition
//! `uid % N` with type 1, so every id of one inbox comes from one counter, and assignment
//! order is id order. (Mixing types or partitions in one inbox would not keep that: the
//! partition and type bytes rank above the counter.)

use serde::{Deserialize, Serialize};

/// Bits of the per-partition counter of a [`MsgId`].
pub const COUNTER_BITS: u32 = 48;
/// Largest counter a [`MsgId`] can hold (`2^48 - 1`).
pub const MAX_COUNTER: u64 = (1 << COUNTER_BITS) - 1;

/// No type: used by positions such as "everything after counter n", never by a stored message.
pub const KIND_NONE: u8 = 0;
/// The type of every stored message, for one receiver or several (a multicast message is
/// stored as one copy of this type per Xiu partition of its receivers).
pub const KIND_PERSONAL: u8 = 1;
/// A type no service assigns: multicast messages are stored with [`KIND_PERSONAL`] (see the
/// module doc). Only tests use it, to check the layout with a second type value.
pub const KIND_MULTICAST: u8 = 2;

/// A Xiu message id: `partition (8 bits) | type (8 bits) | counter (48 bits)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MsgId(pub u64);

impl MsgId {
    /// Builds an id. A counter above [`MAX_COUNTER`] is masked to its low 48 bits (it would
    /// otherwise spill into the type byte); callers that allocate counters must refuse to go
    /// past [`MAX_COUNTER`] themselves, or use [`MsgId::try_new`].
    pub const fn new(partition: u8, kind: u8, counter: u64) -> MsgId {
        MsgId(((partition as u64) << 56) | ((kind as u64) << 48) | (counter & MAX_COUNTER))
    }

    /// Like [`MsgId::new`] but `None` when `counter` exceeds [`MAX_COUNTER`].
    pub const fn try_new(partition: u8, kind: u8, counter: u64) -> Option<MsgId> {
        if counter > MAX_COUNTER {
            None
        } else {
            Some(MsgId::new(partition, kind, counter))
        }
    }

    /// The Xiu partition that assigned (and stores) this id.
    pub const fn partition(self) -> u8 {
        (self.0 >> 56) as u8
    }

    /// The type byte: [`KIND_PERSONAL`] for every stored message, [`KIND_NONE`] in positions.
    pub const fn kind(self) -> u8 {
        (self.0 >> 48) as u8
    }

    /// The partition's counter value at assignment.
    pub const fn counter(self) -> u64 {
        self.0 & MAX_COUNTER
    }

    /// Big-endian bytes: byte 0 is the partition, byte 1 the type, bytes 2..8 the counter.
    /// Sorting these bytes sorts ids numerically, which is what keys of RocksDB need.
    pub const fn to_be_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }

    pub const fn from_be_bytes(bytes: [u8; 8]) -> MsgId {
        MsgId(u64::from_be_bytes(bytes))
    }
}

impl std::fmt::Display for MsgId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.partition(), self.kind(), self.counter())
    }
}

/// One message as Xiu stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// Assigned by Xiu.
    pub id: MsgId,
    /// The publisher's snowflake id; storing the same `sid` twice returns the first `id`.
    pub sid: u64,
    /// The sender.
    pub from: u64,
    /// Every receiver whose inbox indexes this copy: one for a message to one user; for a
    /// multicast message, its receivers that belong to this Xiu partition.
    pub to: Vec<u64>,
    pub body: String,
    /// Milliseconds since the Unix epoch.
    pub ts: u64,
}

/// A stable 64-bit key of a device name (FNV-1a), as Pi stores per-device cursors.
pub fn device_key(device: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in device.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_byte_positions() {
        let id = MsgId::new(0xAB, KIND_MULTICAST, 0x0102_0304_0506);
        assert_eq!(
            id.to_be_bytes(),
            [0xAB, 0x02, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06]
        );
        assert_eq!(id.partition(), 0xAB);
        assert_eq!(id.kind(), KIND_MULTICAST);
        assert_eq!(id.counter(), 0x0102_0304_0506);
        assert_eq!(MsgId::from_be_bytes(id.to_be_bytes()), id);
        assert_eq!(id.to_string(), format!("171:2:{}", 0x0102_0304_0506u64));
    }

    #[test]
    fn device_keys_are_stable_and_distinct() {
        // FNV-1a test vectors
        assert_eq!(device_key(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(device_key("a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(device_key("phone"), device_key("laptop"));
    }

    #[test]
    fn extremes() {
        let id = MsgId::new(0xFF, 0xFF, MAX_COUNTER);
        assert_eq!(id.0, u64::MAX);
        assert_eq!(MsgId::new(0, 0, 0).0, 0);
        assert_eq!(MsgId::new(3, KIND_PERSONAL, 0).counter(), 0);
    }

    #[test]
    fn counter_beyond_48_bits_is_masked_or_refused() {
        let id = MsgId::new(1, KIND_PERSONAL, MAX_COUNTER + 2);
        assert_eq!(id.partition(), 1);
        assert_eq!(id.kind(), KIND_PERSONAL);
        assert_eq!(id.counter(), 1);
        assert_eq!(MsgId::try_new(1, KIND_PERSONAL, MAX_COUNTER + 1), None);
        assert_eq!(
            MsgId::try_new(1, KIND_PERSONAL, MAX_COUNTER),
            Some(MsgId::new(1, KIND_PERSONAL, MAX_COUNTER))
        );
    }

    #[test]
    fn counter_order_is_id_order_within_partition_and_kind() {
        let counters = [
            0u64,
            1,
            2,
            255,
            256,
            65_535,
            1 << 32,
            MAX_COUNTER - 1,
            MAX_COUNTER,
        ];
        for kind in [KIND_PERSONAL, KIND_MULTICAST] {
            for w in counters.windows(2) {
                let a = MsgId::new(7, kind, w[0]);
                let b = MsgId::new(7, kind, w[1]);
                assert!(a < b, "{a} < {b}");
                assert!(a.to_be_bytes() < b.to_be_bytes());
            }
        }
        // The kind byte ranks before the counter, and the partition before both.
        assert!(MsgId::new(7, KIND_PERSONAL, MAX_COUNTER) < MsgId::new(7, KIND_MULTICAST, 0));
        assert!(MsgId::new(6, KIND_MULTICAST, MAX_COUNTER) < MsgId::new(7, KIND_PERSONAL, 0));
    }

    #[test]
    fn stored_message_roundtrips_through_postcard() {
        let m = StoredMessage {
            id: MsgId::new(2, KIND_PERSONAL, 9),
            sid: 123_456_789,
            from: 42,
            to: vec![7, 8],
            body: "hello 貔貅".into(),
            ts: 1_700_000_000_000,
        };
        let bytes = postcard::to_allocvec(&m).expect("serializing into a Vec");
        let back: StoredMessage = postcard::from_bytes(&bytes).expect("decoding what we encoded");
        assert_eq!(back, m);
    }
}
