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

    // ---- personal inboxes (seed section 8) ----
    /// Request to the leader of Xiu partition `uid % N` of every receiver in `to`: store one
    /// copy and index it in every receiver's Pi list. Answered with `XiuStored` once the
    /// promise holds (stored, replicated to `min_insync` followers, indexed), else
    /// `Unavailable` or `Refused`.
    XiuStore(StoreRequest),
    XiuStored {
        id: u64,
        /// false when the `sid` was stored before (the first id is returned)
        fresh: bool,
    },
    /// Request to a Xiu leader: messages by id, for the inbox of `uid`. A message that is
    /// not addressed to `uid` is answered `Missing`, never given out (an index entry that
    /// names another user's message must not leak it).
    XiuRead {
        uid: u64,
        ids: Vec<u64>,
    },
    /// Response to `XiuRead`: one entry per id asked, in order.
    XiuMessages {
        items: Vec<ReadResult>,
    },
    /// Follower to leader (Xiu or Pi): "I hold everything up to `after`; send what follows".
    /// The leader holds the request for up to `wait_ms` when it has nothing new.
    /// Xiu answers `XiuEntries`; Pi answers `PiLog` or `PiTrimmed`.
    ReplicaPull {
        node: u64,
        after: u64,
        /// Xiu: the `sid` of the follower's record at `after` (0 when none), so that the
        /// leader can tell whether their copies agree up to there. Pi: 0.
        check: u64,
        /// Xiu: the epoch of that record (0 when none). Pi: 0.
        check_epoch: u64,
        /// Xiu: a new leader asking a peer at takeover (any replica answers). Otherwise the
        /// puller is a follower, and only a leader that has finished taking over answers;
        /// so no follower copies a tail its new leader may still drop. Pi: false.
        takeover: bool,
        max: u32,
        wait_ms: u32,
    },
    /// Xiu leader to follower: your copy disagrees with mine at or before `after` (or runs
    /// past my last counter `leader_last`); drop your tail and ask again. `last_epoch` is the
    /// epoch of my last record: a new leader pulling from a peer at takeover compares
    /// `(last_epoch, leader_last)` with its own to tell whether the peer's copy is the more
    /// recent one (then it drops its own tail) or not (then it keeps its copy).
    Diverged {
        after: u64,
        leader_last: u64,
        last_epoch: u64,
    },
    /// Xiu leader to follower: raw records after the position asked, plus the leader's
    /// indexed watermark (every id up to it is in Pi).
    XiuEntries {
        entries: Vec<(u64, Vec<u8>)>,
        indexed: u64,
    },
    /// Xiu leader to a Pi leader: index these `(uid, MsgId)` pairs. Answered with `Done`.
    PiAppend {
        items: Vec<(u64, u64)>,
        ts: u64,
    },
    /// To a Pi leader: up to `max` ids of `uid` after `after`, or after the device's cursor
    /// when `after` is `None` (the device is registered when new). Answered with `PiIds`.
    PiRead {
        uid: u64,
        device: u64,
        after: Option<u64>,
        max: u32,
    },
    PiIds {
        ids: Vec<u64>,
        /// the device's cursor (everything up to it was acknowledged)
        cursor: u64,
    },
    /// To a Pi leader: the device acknowledged every id of `uid` up to `id`. Answered `Done`.
    PiCursor {
        uid: u64,
        device: u64,
        id: u64,
    },
    /// Pi leader to follower: postcard-encoded log entries after the position asked.
    PiLog {
        entries: Vec<u8>,
    },
    /// Pi leader to follower: the entries you need were trimmed; fetch a snapshot.
    PiTrimmed,
    /// Pi follower to leader: the next chunk of a snapshot (`after` is the chunk cursor,
    /// `None` for the first; `upto` the snapshot's LogId once known).
    PiSnapshotRequest {
        upto: Option<u64>,
        after: Option<(u64, u64)>,
    },
    /// postcard-encoded snapshot chunk.
    PiSnapshotChunk {
        chunk: Vec<u8>,
    },
    /// Success of a request with nothing else to say.
    Done,
    /// The node cannot serve this now (not the leader, catching up, `min_insync` not met);
    /// the caller may retry elsewhere or later.
    Unavailable {
        reason: String,
    },
    /// Proxy to every running broker replica serving `uid`: its inbox has news.
    Notify {
        uid: u64,
        latest: u64,
    },
    /// Gateway to broker: these devices are connected here (a login, and then the periodic
    /// heartbeat; seed 8.5).
    DeviceOnline {
        gateway: SocketAddr,
        devices: Vec<DeviceRef>,
    },
    /// Gateway to broker: the device's connection closed.
    DeviceOffline(DeviceRef),
    /// Gateway to broker: the device acknowledged every inbox id up to `id`.
    DeviceAck {
        dev: DeviceRef,
        id: u64,
    },
    /// Gateway to broker: the device asks for its inbox after `after`.
    DeviceSync {
        gateway: SocketAddr,
        dev: DeviceRef,
        after: u64,
    },
    /// Broker to gateway: inbox messages for one connection, oldest first.
    InboxPush {
        dev: DeviceRef,
        items: Vec<InboxItem>,
    },

    // ---- doubling of Xiu and Pi (seed 8.2.4, 8.3.4) ----
    /// A Xiu or Pi replica to the sender of a request for a user it no longer owns: its role
    /// has `partition_num` partitions now (the sender's view is older); regroup and ask the
    /// owner. Never an answer to a request that would have been wrong under any count.
    Moved {
        partition_num: u32,
        reason: String,
    },
    /// The leader of new partition `partition` (of `partition_num`) to its parent's leader,
    /// once `partition_num` is in force: "where do you stop for my users?" The parent answers
    /// `HandoffMark` once it refuses every later write for them, else `Unavailable`.
    Handoff {
        partition: u32,
        partition_num: u32,
    },
    /// The parent's mark: Xiu, the counter up to which its ids are indexed in Pi (the child
    /// may index its own from then on); Pi, the LogId of its last entry for the child's users.
    HandoffMark {
        last: u64,
    },
    /// A new Pi partition's leader to its parent's leader: log entries after `after`, as
    /// `ReplicaPull` gives a follower, but the puller is not a follower (it counts for no
    /// `min_insync`). Answered `PiLog` or `PiTrimmed`.
    PiAdopt {
        after: u64,
        max: u32,
        wait_ms: u32,
    },

    // ---- operator tools ----
    /// To a Xiu leader: up to `max` stored messages of `uid` with `since <= ts < until`,
    /// oldest first (by `ts`, then id), after the `(ts, id)` position `after` when given.
    /// Answered `XiuHistoryPage`.
    XiuHistory {
        uid: u64,
        since: u64,
        until: u64,
        after: Option<(u64, u64)>,
        max: u32,
    },
    /// One page of `XiuHistory`: the messages (an unreadable record as `Corrupt` or
    /// `Missing`), and the `(ts, id)` to ask after for the next page (`None`: no more).
    XiuHistoryPage {
        items: Vec<ReadResult>,
        next: Option<(u64, u64)>,
        /// Messages appended before this time (unix ms) have expired here (0: none has).
        expired_before: u64,
    },
    /// To every running replica of the broker partition serving `uid`: push these stored
    /// messages again, with their ids, to every online device of `uid` that this replica
    /// tracks (cursors are not touched: an acknowledgement of an old id changes nothing).
    /// Answered `Redelivered`.
    Redeliver {
        uid: u64,
        items: Vec<InboxItem>,
    },
    /// How many devices a `Redeliver` was pushed to.
    Redelivered {
        devices: u32,
    },
    /// To a Xiu leader: the receivers with messages stored there that belong to Pi partition
    /// `pi_partition` of `pi_partitions`, among the next `max` receivers after `after`.
    /// Answered `XiuUserList`.
    XiuUsers {
        pi_partition: u32,
        pi_partitions: u32,
        after: Option<u64>,
        max: u32,
    },
    /// The receivers found, and where to continue (`None`: no more).
    XiuUserList {
        uids: Vec<u64>,
        next: Option<u64>,
    },
    /// To a Pi leader: up to `max` ids of `uid` after `after`, read only (no device is
    /// registered, unlike `PiRead`). Answered `PiIds` with cursor 0.
    PiList {
        uid: u64,
        after: u64,
        max: u32,
    },

    /// Xiu leader to a follower (or a new leader at takeover) whose position is at or below
    /// its retention floor: every record up to `floor` (the last appended at `ts`) expired;
    /// move up to it, then pull after it.
    XiuExpired {
        floor: u64,
        ts: u64,
    },

    // ---- traced room messages (their own kinds: untraced ones pay nothing) ----
    /// `Room` with the stamps of the hops so far (proxy to broker, broker to gateway).
    TracedRoom {
        msg: RoomMessage,
        trace: Vec<crate::trace::Stamp>,
    },
    /// `Publish` with the publishing gateway's stamp (gateway to proxy).
    TracedPublish {
        msg: RoomMessage,
        trace: Vec<crate::trace::Stamp>,
    },

    // ---- traced personal messages ----
    /// `XiuStore` with the stamps so far (the proxy's, or the sending client's gateway's).
    /// The Xiu leader keeps the message's stamps in memory (its own, then Pi's) and hands them
    /// out with the message to the broker's `XiuRead`.
    XiuStoreTraced {
        req: StoreRequest,
        trace: Vec<crate::trace::Stamp>,
    },
    /// `PiAppend` of a batch holding a traced id: answered `PiAppendedTraced` with the Pi
    /// leader's stamp instead of `Done`.
    PiAppendTraced {
        items: Vec<(u64, u64)>,
        ts: u64,
    },
    PiAppendedTraced {
        stamp: crate::trace::Stamp,
    },

    // ---- batched stores ----
    /// Many stores for one Xiu leader in one request: the stores a courier had waiting for
    /// that leader at once (at most [`MAX_STORE_BATCH`]). Each is handled exactly as an
    /// `XiuStore` (or `XiuStoreTraced`) on its own; the answer is `XiuStoredBatch`.
    XiuStoreBatch(Vec<BatchedStore>),
    /// One answer per store of a `XiuStoreBatch`, in its order: what that store alone would
    /// have been answered.
    XiuStoredBatch(Vec<StoreAnswer>),

    // ---- pipelined indexing ----
    /// The first half of a `PiAppend`: the Pi leader indexes the ids and makes them durable,
    /// then answers `PiWritten` at once, before its followers hold them, so that a Xiu leader
    /// can send its next batch while this one replicates. `node` is the registry id of the Pi
    /// leader that wrote the caller's earlier batches still replicating (0: any); any other
    /// node refuses it (`Unavailable`), so no batch lands in a log without those before it.
    /// `traced`: the batch holds a traced id, and the answer carries the leader's stamp.
    PiWrite {
        items: Vec<(u64, u64)>,
        ts: u64,
        node: u64,
        traced: bool,
    },
    /// Pi leader `node` wrote a `PiWrite` up to its log position `last`.
    PiWritten {
        node: u64,
        last: u64,
        stamp: Option<crate::trace::Stamp>,
    },
    /// The second half: answered `Done` once `min_insync` followers of Pi leader `node` hold
    /// its log up to `upto`; `Unavailable` when this is not `node` leading, or after the
    /// append timeout.
    PiAwait {
        node: u64,
        upto: u64,
    },
}

/// What one store of a `XiuStoreBatch` was answered: the answers an `XiuStore` alone gets
/// (`XiuStored`, `Unavailable`, `Refused`, `Moved`), as their own type so that a batch answer
/// cannot nest messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoreAnswer {
    Stored { id: u64, fresh: bool },
    Unavailable { reason: String },
    Refused { reason: String },
    Moved { partition_num: u32, reason: String },
}

impl StoreAnswer {
    /// The batch answer for what a lone store was answered (`answer` of another kind than
    /// those four is a bug of the leader's, answered `Unavailable` naming it).
    pub fn from_answer(answer: Message) -> StoreAnswer {
        match answer {
            Message::XiuStored { id, fresh } => StoreAnswer::Stored { id, fresh },
            Message::Unavailable { reason } => StoreAnswer::Unavailable { reason },
            Message::Refused { reason } => StoreAnswer::Refused { reason },
            Message::Moved {
                partition_num,
                reason,
            } => StoreAnswer::Moved {
                partition_num,
                reason,
            },
            other => StoreAnswer::Unavailable {
                reason: format!("the store was answered {}", other.kind()),
            },
        }
    }

    /// The message a lone store would have been answered.
    pub fn into_answer(self) -> Message {
        match self {
            StoreAnswer::Stored { id, fresh } => Message::XiuStored { id, fresh },
            StoreAnswer::Unavailable { reason } => Message::Unavailable { reason },
            StoreAnswer::Refused { reason } => Message::Refused { reason },
            StoreAnswer::Moved {
                partition_num,
                reason,
            } => Message::Moved {
                partition_num,
                reason,
            },
        }
    }
}

/// Most stores in one `XiuStoreBatch`; a leader refuses a larger batch whole.
pub const MAX_STORE_BATCH: usize = 256;

/// One store of a `XiuStoreBatch`: the request and, for a traced message, its stamps so far.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchedStore {
    pub req: StoreRequest,
    pub trace: Option<Vec<crate::trace::Stamp>>,
}

/// A request to store one personal (or multicast) message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreRequest {
    /// The publisher's snowflake id: storing it again returns the first id.
    pub sid: u64,
    pub from: u64,
    /// Receivers, all owned by the Xiu partition asked.
    pub to: Vec<u64>,
    pub body: String,
    pub ts: u64,
}

/// One inbox message as it travels from Xiu to a device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxItem {
    pub id: u64,
    pub from: u64,
    pub body: String,
    pub ts: u64,
    /// The hops of a message sent with `"trace": true` (Xiu adds them when it reads it out;
    /// the broker and the gateway add theirs); `None` otherwise.
    pub trace: Option<Vec<crate::trace::Stamp>>,
}

/// One id of a `XiuRead`: the message, or why it cannot be given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadResult {
    Found(InboxItem),
    Missing {
        id: u64,
        reason: String,
    },
    Corrupt {
        id: u64,
        reason: String,
    },
    /// Deleted by retention (every id of its partition up to `floor` is).
    Expired {
        id: u64,
        floor: u64,
    },
}

/// One connected device of a user, as a gateway names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceRef {
    pub uid: u64,
    pub device: String,
    /// The gateway's connection id: a reconnect is a new `conn`.
    pub conn: u64,
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
            Message::XiuStore(_) => "xiu_store",
            Message::XiuStored { .. } => "xiu_stored",
            Message::XiuRead { .. } => "xiu_read",
            Message::XiuMessages { .. } => "xiu_messages",
            Message::ReplicaPull { .. } => "replica_pull",
            Message::XiuEntries { .. } => "xiu_entries",
            Message::Diverged { .. } => "diverged",
            Message::PiAppend { .. } => "pi_append",
            Message::PiRead { .. } => "pi_read",
            Message::PiIds { .. } => "pi_ids",
            Message::PiCursor { .. } => "pi_cursor",
            Message::PiLog { .. } => "pi_log",
            Message::PiTrimmed => "pi_trimmed",
            Message::PiSnapshotRequest { .. } => "pi_snapshot_request",
            Message::PiSnapshotChunk { .. } => "pi_snapshot_chunk",
            Message::Done => "done",
            Message::Unavailable { .. } => "unavailable",
            Message::Notify { .. } => "notify",
            Message::DeviceOnline { .. } => "device_online",
            Message::DeviceOffline(_) => "device_offline",
            Message::DeviceAck { .. } => "device_ack",
            Message::DeviceSync { .. } => "device_sync",
            Message::InboxPush { .. } => "inbox_push",
            Message::Moved { .. } => "moved",
            Message::Handoff { .. } => "handoff",
            Message::HandoffMark { .. } => "handoff_mark",
            Message::PiAdopt { .. } => "pi_adopt",
            Message::XiuHistory { .. } => "xiu_history",
            Message::XiuHistoryPage { .. } => "xiu_history_page",
            Message::Redeliver { .. } => "redeliver",
            Message::Redelivered { .. } => "redelivered",
            Message::XiuUsers { .. } => "xiu_users",
            Message::XiuUserList { .. } => "xiu_user_list",
            Message::PiList { .. } => "pi_list",
            Message::XiuExpired { .. } => "xiu_expired",
            Message::TracedRoom { .. } => "traced_room",
            Message::TracedPublish { .. } => "traced_publish",
            Message::XiuStoreTraced { .. } => "xiu_store_traced",
            Message::XiuStoreBatch(_) => "xiu_store_batch",
            Message::XiuStoredBatch(_) => "xiu_stored_batch",
            Message::PiAppendTraced { .. } => "pi_append_traced",
            Message::PiAppendedTraced { .. } => "pi_appended_traced",
            Message::PiWrite { .. } => "pi_write",
            Message::PiWritten { .. } => "pi_written",
            Message::PiAwait { .. } => "pi_await",
        }
    }
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
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
        let stamp = crate::trace::Stamp {
            role: "pi".into(),
            node: 3,
            partition: Some(1),
            addr: "127.0.0.1:9".into(),
            in_us: 5,
            out_us: 6,
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
            Message::XiuStore(StoreRequest {
                sid: 5,
                from: 1,
                to: vec![2, 3],
                body: "x".into(),
                ts: 9,
            }),
            Message::XiuMessages {
                items: vec![
                    ReadResult::Found(InboxItem {
                        id: 1 << 56,
                        from: 1,
                        body: "b".into(),
                        ts: 2,
                        trace: None,
                    }),
                    ReadResult::Corrupt {
                        id: 7,
                        reason: "crc".into(),
                    },
                ],
            },
            Message::DeviceOnline {
                gateway: gw.addr,
                devices: vec![DeviceRef {
                    uid: 4,
                    device: "phone".into(),
                    conn: 8,
                }],
            },
            Message::PiRead {
                uid: 1,
                device: 2,
                after: None,
                max: 3,
            },
            Message::Moved {
                partition_num: 4,
                reason: "user 3 belongs to pi partition 3 of 4, not 1".into(),
            },
            Message::Handoff {
                partition: 3,
                partition_num: 4,
            },
            Message::HandoffMark { last: 17 },
            Message::PiAdopt {
                after: 9,
                max: 100,
                wait_ms: 1000,
            },
            Message::XiuHistory {
                uid: 7,
                since: 1,
                until: 2,
                after: Some((1, 5)),
                max: 10,
            },
            Message::Redeliver {
                uid: 7,
                items: vec![InboxItem {
                    id: 3,
                    from: 1,
                    body: "again".into(),
                    ts: 4,
                    trace: Some(vec![stamp.clone()]),
                }],
            },
            Message::Redelivered { devices: 2 },
            Message::PiAppendTraced {
                items: vec![(1, 2)],
                ts: 3,
            },
            Message::PiAppendedTraced {
                stamp: stamp.clone(),
            },
            Message::XiuStoreBatch(vec![
                BatchedStore {
                    req: StoreRequest {
                        sid: 6,
                        from: 1,
                        to: vec![4],
                        body: "y".into(),
                        ts: 10,
                    },
                    trace: None,
                },
                BatchedStore {
                    req: StoreRequest {
                        sid: 7,
                        from: 1,
                        to: vec![5, 6],
                        body: "z".into(),
                        ts: 11,
                    },
                    trace: Some(vec![stamp.clone()]),
                },
            ]),
            Message::XiuStoredBatch(vec![
                StoreAnswer::Stored { id: 1, fresh: true },
                StoreAnswer::Unavailable {
                    reason: "min_insync".into(),
                },
                StoreAnswer::Refused {
                    reason: "no receivers".into(),
                },
                StoreAnswer::Moved {
                    partition_num: 2,
                    reason: "user 3".into(),
                },
            ]),
            Message::XiuUsers {
                pi_partition: 1,
                pi_partitions: 2,
                after: Some(9),
                max: 100,
            },
            Message::XiuUserList {
                uids: vec![1, 3],
                next: Some(3),
            },
            Message::PiList {
                uid: 3,
                after: 0,
                max: 10,
            },
            Message::PiWrite {
                items: vec![(1, 2), (3, 4)],
                ts: 5,
                node: 6,
                traced: true,
            },
            Message::PiWritten {
                node: 6,
                last: 9,
                stamp: Some(stamp.clone()),
            },
            Message::PiAwait { node: 6, upto: 9 },
        ]
    }

    #[test]
    fn a_store_answer_is_what_a_lone_store_is_answered() {
        let lone = [
            Message::XiuStored {
                id: 9,
                fresh: false,
            },
            Message::Unavailable { reason: "a".into() },
            Message::Refused { reason: "b".into() },
            Message::Moved {
                partition_num: 4,
                reason: "c".into(),
            },
        ];
        for m in lone {
            assert_eq!(StoreAnswer::from_answer(m.clone()).into_answer(), m);
        }
        assert_eq!(
            StoreAnswer::from_answer(Message::Done),
            StoreAnswer::Unavailable {
                reason: "the store was answered done".into()
            }
        );
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
