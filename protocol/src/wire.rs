//! Node-to-node messages and their codec.
//!
//! A frame is `[MAGIC, VERSION]` followed by the postcard encoding of [`Message`]. Anything else
//! (random bytes, a frame of another version, a truncated frame) is a [`WireError`]: callers
//! count it and drop it, never panic.

use crate::ids::{GatewayMsgId, RouteKey};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

pub const MAGIC: u8 = 0xB7;
pub const VERSION: u8 = 1;

/// A gateway as the routing tables know it: its registry id (instance) and QUIC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GatewayRef {
    pub instance: u64,
    pub addr: SocketAddr,
}

/// "Some member of `key` is (or no longer is) on this gateway" (the seed's Gateway Message).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayUpdate {
    pub id: GatewayMsgId,
    pub gateway: GatewayRef,
    pub key: RouteKey,
    pub present: bool,
    /// Set by a router replica when it passes the update to its peer replicas, so that they
    /// hand it to their own subscribers but do not pass it on again.
    pub forwarded: bool,
}

/// One row of a routing table: the last known state of `gateway` for `key`, versioned by the
/// gateway's own id so that replicas converge whatever order updates arrive in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRow {
    pub key: RouteKey,
    pub gateway: GatewayRef,
    pub version: GatewayMsgId,
    pub present: bool,
}

/// A room message on its way to gateways.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomMessage {
    /// The publisher's snowflake id; gateways de-duplicate by it.
    pub id: u64,
    pub key: RouteKey,
    pub from: u64,
    pub body: String,
    /// Cluster receive time, unix ms.
    pub ts: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Liveness probe (proxy to broker, gateway to router); answered with `Pong`.
    Ping {
        seq: u64,
    },
    Pong {
        seq: u64,
    },
    /// A broker's heartbeat to one router replica: "forward me the gateway updates of my
    /// partition". Answered with `Pong`.
    Subscribe {
        seq: u64,
        broker_partition: u32,
        broker_partition_num: u32,
    },
    /// Gateway to router, router to peer router and to brokers.
    Gateway(GatewayUpdate),
    /// Broker to gateway: the update with this id is in the broker's table.
    RouteApplied {
        id: GatewayMsgId,
        key: RouteKey,
        broker_partition: u32,
        broker_id: u64,
    },
    /// Proxy to broker, broker to gateway.
    Room(RoomMessage),
    /// Gateway to proxy: a client's `publish`.
    Publish(RoomMessage),
    /// Request: every row whose key hash satisfies `hash % partition_num == partition % partition_num`.
    SnapshotRequest {
        partition: u32,
        partition_num: u32,
    },
    /// Response to `SnapshotRequest`.
    Snapshot {
        rows: Vec<RouteRow>,
    },
    /// Response to a request that could not be served.
    Refused {
        reason: String,
    },
}

impl Message {
    /// A short name for metrics labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Ping { .. } => "ping",
            Message::Pong { .. } => "pong",
            Message::Subscribe { .. } => "subscribe",
            Message::Gateway(_) => "gateway",
            Message::RouteApplied { .. } => "route_applied",
            Message::Room(_) => "room",
            Message::Publish(_) => "publish",
            Message::SnapshotRequest { .. } => "snapshot_request",
            Message::Snapshot { .. } => "snapshot",
            Message::Refused { .. } => "refused",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("empty frame")]
    Empty,
    #[error("bad magic byte {0:#04x}")]
    BadMagic(u8),
    #[error("unsupported wire version {0}")]
    BadVersion(u8),
    #[error("undecodable frame: {0}")]
    Decode(String),
}

/// Encode a message as one frame.
pub fn encode(msg: &Message) -> Bytes {
    let out =
        postcard::to_extend(msg, vec![MAGIC, VERSION]).expect("serializing into a Vec cannot fail");
    Bytes::from(out)
}

/// Decode one frame.
pub fn decode(frame: &[u8]) -> Result<Message, WireError> {
    match frame {
        [] => Err(WireError::Empty),
        [m, ..] if *m != MAGIC => Err(WireError::BadMagic(*m)),
        [_] => Err(WireError::Decode("truncated header".into())),
        [_, v, ..] if *v != VERSION => Err(WireError::BadVersion(*v)),
        [_, _, rest @ ..] => {
            postcard::from_bytes(rest).map_err(|e| WireError::Decode(e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Message> {
        let gw = GatewayRef {
            instance: 9,
            addr: "127.0.0.1:4000".parse().unwrap(),
        };
        vec![
            Message::Ping { seq: 1 },
            Message::Subscribe {
                seq: 2,
                broker_partition: 3,
                broker_partition_num: 4,
            },
            Message::Gateway(GatewayUpdate {
                id: GatewayMsgId::new(9, 1),
                gateway: gw,
                key: RouteKey::virtual_room(77, 3),
                present: true,
                forwarded: false,
            }),
            Message::Room(RoomMessage {
                id: 123,
                key: RouteKey::room(5),
                from: 7,
                body: "héllo".into(),
                ts: 1_700_000_000_000,
            }),
            Message::Snapshot {
                rows: vec![RouteRow {
                    key: RouteKey::room(1),
                    gateway: gw,
                    version: GatewayMsgId::new(9, 2),
                    present: false,
                }],
            },
        ]
    }

    #[test]
    fn roundtrip() {
        for m in sample() {
            let b = encode(&m);
            assert_eq!(decode(&b).unwrap(), m);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert_eq!(decode(&[]), Err(WireError::Empty));
        assert_eq!(decode(&[1, 2, 3]), Err(WireError::BadMagic(1)));
        assert_eq!(
            decode(&[MAGIC]),
            Err(WireError::Decode("truncated header".into()))
        );
        assert_eq!(decode(&[MAGIC, 99, 0]), Err(WireError::BadVersion(99)));
        assert!(matches!(
            decode(&[MAGIC, VERSION, 250, 250, 250]),
            Err(WireError::Decode(_))
        ));
        // every truncation of a valid frame is refused
        for m in sample() {
            let b = encode(&m);
            for cut in 0..b.len() {
                assert!(decode(&b[..cut]).is_err(), "{m:?} cut at {cut}");
            }
        }
        // pseudo-random bytes never panic
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..2000 {
            let mut buf = vec![MAGIC, VERSION];
            for _ in 0..(x % 64) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.push(x as u8);
            }
            let _ = decode(&buf);
        }
    }
}
