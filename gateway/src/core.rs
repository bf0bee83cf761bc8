//! The gateway's core: one task that owns the room membership, the de-duplication LRU and the
//! routing announcements. Connections talk to it by message, the network feeds it by message,
//! so the fan-out path takes no lock.

use axum::extract::ws::Utf8Bytes;
use lru::LruCache;
use pixiu_protocol::client::{Id, ServerFrame};
use pixiu_protocol::ids::{GatewayMsgId, GatewayMsgIdGen, RouteKey};
use pixiu_protocol::routing::{pick_replica, target_partitions, BigRooms};
use pixiu_protocol::wire::{
    self, DeviceRef, GatewayRef, GatewayUpdate, InboxItem, Message, RoomMessage,
};
use pixiu_registry::RoleView;
use pixiu_runtime::{Liveness, RoleMetrics, Shutdown};
use pixiu_transport::{Inbound, Transport};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

pub(crate) type ConnId = u64;
pub(crate) type ConnTx = mpsc::Sender<Utf8Bytes>;
pub(crate) type JoinReply = oneshot::Sender<Result<(), String>>;

pub(crate) enum Cmd {
    Join {
        conn: ConnId,
        uid: u64,
        room: u64,
        tx: ConnTx,
        reply: JoinReply,
    },
    Leave {
        conn: ConnId,
        uid: u64,
        room: u64,
    },
    /// A connection of `uid`'s `device` opened: report it to the user's broker, deliver its
    /// inbox to `tx`.
    InboxOnline {
        conn: ConnId,
        uid: u64,
        device: String,
        tx: ConnTx,
    },
    InboxOffline {
        conn: ConnId,
    },
    InboxAck {
        conn: ConnId,
        id: u64,
    },
    InboxSync {
        conn: ConnId,
        after: u64,
    },
}

struct InboxConn {
    uid: u64,
    device: String,
    tx: ConnTx,
}

pub(crate) struct CoreSettings {
    pub big_rooms: BigRooms,
    pub join_timeout: Duration,
    pub refresh_interval: Duration,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub dedup_capacity: usize,
    pub node_addr: SocketAddr,
    /// Every this often each connected device is reported to its broker (seed 8.5 heartbeat).
    pub inbox_heartbeat: Duration,
}

struct Pending {
    /// the first announcement; acks for it or any later re-announcement count
    id: GatewayMsgId,
    last_sent: Instant,
    /// broker replicas that confirmed; done when they include every running replica that
    /// serves the key (re-checked as the broker view changes)
    acked: HashSet<(u32, u64)>,
    deadline: Instant,
    waiters: Vec<(ConnId, u64, JoinReply)>,
}

#[derive(Default)]
struct KeyState {
    members: usize,
    confirmed: bool,
    pending: Option<Pending>,
}

pub(crate) struct Core {
    s: CoreSettings,
    transport: Transport,
    metrics: RoleMetrics,
    ids: GatewayMsgIdGen,
    me: GatewayRef,
    id_watch: watch::Receiver<u64>,
    routers_rx: watch::Receiver<Arc<RoleView>>,
    brokers_rx: watch::Receiver<Arc<RoleView>>,
    routers: Arc<RoleView>,
    brokers: Arc<RoleView>,
    router_live: Liveness,
    /// room -> local connections (delivery)
    rooms: HashMap<u64, HashMap<ConnId, (u64, ConnTx)>>,
    /// route key -> announcement state
    keys: HashMap<RouteKey, KeyState>,
    dedup: LruCache<u64, ()>,
    feedback_sent: HashMap<RouteKey, Instant>,
    /// connections whose inbox is delivered here
    inbox: HashMap<ConnId, InboxConn>,
}

impl Core {
    fn dev_ref(&self, conn: ConnId) -> Option<(DeviceRef, u64)> {
        self.inbox.get(&conn).map(|c| {
            (
                DeviceRef {
                    uid: c.uid,
                    device: c.device.clone(),
                    conn,
                },
                c.uid,
            )
        })
    }

    fn to_user_broker(&self, uid: u64, msg: &Message) {
        match pixiu_courier::user_broker(&self.brokers, uid) {
            Some(b) => {
                self.transport.send(b, wire::encode(msg));
            }
            None => self.metrics.drop("inbox", "no_broker"),
        }
    }

    /// Report every connected device to its broker, in batches.
    fn inbox_heartbeat(&mut self) {
        let mut by_broker: HashMap<SocketAddr, Vec<DeviceRef>> = HashMap::new();
        for (conn, c) in &self.inbox {
            if let Some(b) = pixiu_courier::user_broker(&self.brokers, c.uid) {
                by_broker.entry(b).or_default().push(DeviceRef {
                    uid: c.uid,
                    device: c.device.clone(),
                    conn: *conn,
                });
            }
        }
        for (b, devices) in by_broker {
            for chunk in devices.chunks(256) {
                self.transport.send(
                    b,
                    wire::encode(&Message::DeviceOnline {
                        gateway: self.s.node_addr,
                        devices: chunk.to_vec(),
                    }),
                );
            }
        }
    }

    fn on_inbox_push(&mut self, dev: DeviceRef, items: Vec<InboxItem>) {
        let Some(c) = self.inbox.get(&dev.conn) else {
            self.metrics.drop("inbox", "no_connection");
            return;
        };
        if c.uid != dev.uid || c.device != dev.device {
            self.metrics.drop("inbox", "wrong_connection");
            return;
        }
        let mut out = 0;
        for m in items {
            let frame = ServerFrame::Inbox {
                id: Id(m.id),
                from: Id(m.from),
                body: m.body,
                ts: m.ts,
            };
            match c.tx.try_send(Utf8Bytes::from(frame.to_json())) {
                Ok(()) => out += 1,
                Err(_) => {
                    // redelivered by the broker when not acknowledged
                    self.metrics.drop("inbox", "slow_client");
                    break;
                }
            }
        }
        self.metrics.add_out("inbox", out);
    }

    pub(crate) fn new(
        s: CoreSettings,
        transport: Transport,
        metrics: RoleMetrics,
        id_watch: watch::Receiver<u64>,
        routers_rx: watch::Receiver<Arc<RoleView>>,
        brokers_rx: watch::Receiver<Arc<RoleView>>,
    ) -> Core {
        let id = *id_watch.borrow();
        let routers = routers_rx.borrow().clone();
        let brokers = brokers_rx.borrow().clone();
        let cap = NonZeroUsize::new(s.dedup_capacity).expect("capacity is at least 16");
        Core {
            ids: GatewayMsgIdGen::new(id),
            me: GatewayRef {
                instance: id,
                addr: s.node_addr,
            },
            router_live: Liveness::new(s.heartbeat_timeout),
            s,
            transport,
            metrics,
            id_watch,
            routers_rx,
            brokers_rx,
            routers,
            brokers,
            rooms: HashMap::new(),
            keys: HashMap::new(),
            dedup: LruCache::new(cap),
            feedback_sent: HashMap::new(),
            inbox: HashMap::new(),
        }
    }

    pub(crate) async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Cmd>,
        mut inbound: mpsc::Receiver<Inbound>,
        shutdown: Shutdown,
    ) {
        let mut heartbeat = tokio::time::interval(self.s.heartbeat_interval);
        let mut refresh = tokio::time::interval(self.s.refresh_interval);
        refresh.tick().await;
        let mut timeouts = tokio::time::interval(Duration::from_millis(50));
        let mut inbox_heartbeat = tokio::time::interval(self.s.inbox_heartbeat);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(cmd) = cmds.recv() => self.on_cmd(cmd),
                Some(msg) = inbound.recv() => self.on_inbound(msg),
                _ = heartbeat.tick() => self.heartbeat(),
                _ = refresh.tick() => self.refresh_all(),
                _ = timeouts.tick() => self.expire_pending(),
                _ = inbox_heartbeat.tick() => self.inbox_heartbeat(),
                Ok(()) = self.routers_rx.changed() => {
                    self.routers = self.routers_rx.borrow_and_update().clone();
                }
                Ok(()) = self.brokers_rx.changed() => {
                    self.brokers = self.brokers_rx.borrow_and_update().clone();
                    // devices whose broker replica changed log in at the new one now
                    self.inbox_heartbeat();
                    let pending: Vec<RouteKey> = self.keys.iter().filter(|(_, k)| k.pending.is_some()).map(|(k, _)| *k).collect();
                    for key in pending {
                        self.confirm_if_done(key);
                    }
                }
                Ok(()) = self.id_watch.changed() => {
                    let id = *self.id_watch.borrow_and_update();
                    tracing::warn!(id, "registered again with a new id (session expired); re-announcing every room");
                    self.ids = GatewayMsgIdGen::new(id);
                    self.me.instance = id;
                    self.refresh_all();
                    // joins still waiting now wait for acks of the new instance's updates
                    let pending: Vec<RouteKey> = self
                        .keys
                        .iter()
                        .filter(|(_, k)| k.pending.is_some())
                        .map(|(k, _)| *k)
                        .collect();
                    for key in pending {
                        let first = self.announce(key, true, false);
                        if let Some(p) = self.keys.get_mut(&key).and_then(|k| k.pending.as_mut()) {
                            p.id = first;
                            p.acked.clear();
                        }
                    }
                }
            }
        }
        // best effort: tell the routers this gateway's rooms are gone
        let keys: Vec<RouteKey> = self
            .keys
            .iter()
            .filter(|(_, k)| k.members > 0)
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            self.announce(key, false, false);
        }
    }

    fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Join {
                conn,
                uid,
                room,
                tx,
                reply,
            } => self.join(conn, uid, room, tx, reply),
            Cmd::Leave { conn, uid, room } => self.leave(conn, uid, room),
            Cmd::InboxOnline {
                conn,
                uid,
                device,
                tx,
            } => {
                let dev = DeviceRef {
                    uid,
                    device: device.clone(),
                    conn,
                };
                self.inbox.insert(conn, InboxConn { uid, device, tx });
                self.to_user_broker(
                    uid,
                    &Message::DeviceOnline {
                        gateway: self.s.node_addr,
                        devices: vec![dev],
                    },
                );
            }
            Cmd::InboxOffline { conn } => {
                if let Some((dev, uid)) = self.dev_ref(conn) {
                    self.inbox.remove(&conn);
                    self.to_user_broker(uid, &Message::DeviceOffline(dev));
                }
            }
            Cmd::InboxAck { conn, id } => {
                if let Some((dev, uid)) = self.dev_ref(conn) {
                    self.to_user_broker(uid, &Message::DeviceAck { dev, id });
                }
            }
            Cmd::InboxSync { conn, after } => {
                if let Some((dev, uid)) = self.dev_ref(conn) {
                    let msg = Message::DeviceSync {
                        gateway: self.s.node_addr,
                        dev,
                        after,
                    };
                    self.to_user_broker(uid, &msg);
                }
            }
        }
    }

    fn join(&mut self, conn: ConnId, uid: u64, room: u64, tx: ConnTx, reply: JoinReply) {
        let members = self.rooms.entry(room).or_default();
        if members.contains_key(&conn) {
            let _ = reply.send(Ok(()));
            return;
        }
        members.insert(conn, (uid, tx));
        let key = self.s.big_rooms.member_key(room, uid);
        let state = self.keys.entry(key).or_default();
        state.members += 1;
        if state.members > 1 {
            if state.confirmed {
                let _ = reply.send(Ok(()));
            } else if let Some(p) = state.pending.as_mut() {
                p.waiters.push((conn, room, reply));
            } else {
                let _ = reply.send(Ok(()));
            }
            return;
        }
        // first local member of this key: announce and wait for the brokers to confirm
        let id = self.announce(key, true, true);
        let state = self.keys.entry(key).or_default();
        state.confirmed = false;
        state.pending = Some(Pending {
            id,
            last_sent: Instant::now(),
            acked: HashSet::new(),
            deadline: Instant::now() + self.s.join_timeout,
            waiters: vec![(conn, room, reply)],
        });
    }

    fn leave(&mut self, conn: ConnId, uid: u64, room: u64) {
        self.remove_member(conn, uid, room, true);
    }

    /// Remove a member; announce the key's end when it was the last one.
    fn remove_member(&mut self, conn: ConnId, uid: u64, room: u64, announce: bool) {
        let Some(members) = self.rooms.get_mut(&room) else {
            return;
        };
        if members.remove(&conn).is_none() {
            return;
        }
        if members.is_empty() {
            self.rooms.remove(&room);
        }
        let key = self.s.big_rooms.member_key(room, uid);
        let Some(state) = self.keys.get_mut(&key) else {
            return;
        };
        state.members = state.members.saturating_sub(1);
        if let Some(p) = state.pending.as_mut() {
            if let Some(i) = p.waiters.iter().position(|w| w.0 == conn) {
                let (_, _, reply) = p.waiters.swap_remove(i);
                let _ = reply.send(Err("left before the join completed".into()));
            }
        }
        if state.members == 0 {
            self.keys.remove(&key);
            if announce {
                self.announce(key, false, true);
            }
        }
    }

    /// Running broker replicas that must confirm a route for `key`.
    fn brokers_for(&self, key: &RouteKey) -> HashSet<(u32, u64)> {
        let parts = target_partitions(
            key.hash(),
            self.brokers.partition_num,
            self.brokers.partitions.keys().copied(),
        );
        parts
            .into_iter()
            .flat_map(|p| self.brokers.running(p).into_iter().map(move |m| (p, m.id)))
            .collect()
    }

    /// Send a Gateway Message for `key` to the router replica the seed's rules pick (twice,
    /// 10 ms apart, while the key has fewer than 3 local members).
    fn announce(&mut self, key: RouteKey, present: bool, allow_double: bool) -> GatewayMsgId {
        let id = self.ids.next();
        let msg = Message::Gateway(GatewayUpdate {
            id,
            gateway: self.me,
            key,
            present,
            forwarded: false,
        });
        let bytes = wire::encode(&msg);
        let now = Instant::now();
        let hash = key.hash();
        let parts = target_partitions(
            hash,
            self.routers.partition_num,
            self.routers.partitions.keys().copied(),
        );
        let mut sent = false;
        for p in parts {
            let running = self.routers.running_addrs(p);
            let alive: Vec<SocketAddr> = running
                .iter()
                .copied()
                .filter(|a| self.router_live.is_alive(a, now))
                .collect();
            let candidates = if alive.is_empty() { running } else { alive };
            let Some(i) = pick_replica(hash, self.routers.partition_num, candidates.len()) else {
                continue;
            };
            let to = candidates[i];
            if self.transport.send(to, bytes.clone()) {
                sent = true;
                self.metrics.inc_out("gateway_update");
            } else {
                self.metrics.drop("gateway_update", "send_failed");
            }
            let members = self.keys.get(&key).map(|k| k.members).unwrap_or(0);
            // seed 7.3: while fewer than 3 local members, send it twice (first join, last leave)
            if allow_double && members < 3 {
                let t = self.transport.clone();
                let b = bytes.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    t.send(to, b);
                });
            }
        }
        if !sent {
            self.metrics.drop("gateway_update", "no_router");
            tracing::debug!(
                ?key,
                "no running router for this room; the next refresh retries"
            );
        }
        id
    }

    fn refresh_all(&mut self) {
        let keys: Vec<RouteKey> = self
            .keys
            .iter()
            .filter(|(_, k)| k.members > 0)
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            self.announce(key, true, false);
        }
    }

    fn heartbeat(&mut self) {
        let now = Instant::now();
        let addrs = self.routers.all_addrs();
        self.router_live.retain(|a| addrs.contains(a));
        for a in addrs {
            let seq = self.router_live.ping_sent(a, now);
            self.transport.send(a, wire::encode(&Message::Ping { seq }));
        }
    }

    fn expire_pending(&mut self) {
        let now = Instant::now();
        // re-announce joins not yet confirmed (the update or its forwarding may have been lost)
        let resend: Vec<RouteKey> = self
            .keys
            .iter()
            .filter(|(_, k)| {
                k.pending.as_ref().is_some_and(|p| {
                    now.saturating_duration_since(p.last_sent) >= Duration::from_millis(500)
                })
            })
            .map(|(k, _)| *k)
            .collect();
        for key in resend {
            self.announce(key, true, false);
            if let Some(p) = self.keys.get_mut(&key).and_then(|k| k.pending.as_mut()) {
                p.last_sent = now;
            }
        }
        let expired: Vec<RouteKey> = self
            .keys
            .iter()
            .filter(|(_, k)| k.pending.as_ref().is_some_and(|p| p.deadline <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            let Some(state) = self.keys.get_mut(&key) else {
                continue;
            };
            let Some(p) = state.pending.take() else {
                continue;
            };
            let missing: Vec<(u32, u64)> = self
                .brokers_for(&key)
                .difference(&p.acked)
                .copied()
                .collect();
            tracing::warn!(
                ?key,
                ?missing,
                "join not confirmed by every broker replica in time"
            );
            for (conn, room, reply) in p.waiters {
                self.metrics.drop("join", "timeout");
                let _ = reply.send(Err(
                    "the cluster did not confirm the room's route in time".into()
                ));
                let uid = self
                    .rooms
                    .get(&room)
                    .and_then(|m| m.get(&conn))
                    .map(|(uid, _)| *uid);
                if let Some(uid) = uid {
                    self.remove_member(conn, uid, room, true);
                }
            }
        }
        self.feedback_sent
            .retain(|_, t| now.saturating_duration_since(*t) < Duration::from_secs(1));
    }

    fn on_inbound(&mut self, inbound: Inbound) {
        let (from, bytes) = match inbound {
            Inbound::Message { from, bytes } => (from, bytes),
            Inbound::Request { reply, .. } => {
                self.metrics.drop("request", "unexpected");
                reply.send(wire::encode(&Message::Refused {
                    reason: "a gateway serves no requests".into(),
                }));
                return;
            }
        };
        let msg = match wire::decode(&bytes) {
            Ok(m) => m,
            Err(e) => {
                self.metrics.drop("decode", "bad_frame");
                tracing::debug!(%from, "bad frame: {e}");
                return;
            }
        };
        match msg {
            Message::Room(m) => self.deliver(m),
            Message::InboxPush { dev, items } => self.on_inbox_push(dev, items),
            Message::Pong { seq } => self.router_live.pong(from, seq, Instant::now()),
            Message::RouteApplied {
                id,
                key,
                broker_partition,
                broker_id,
            } => self.applied(id, key, broker_partition, broker_id),
            Message::Ping { seq } => {
                self.transport
                    .send(from, wire::encode(&Message::Pong { seq }));
            }
            other => {
                self.metrics.drop("decode", "unexpected_kind");
                tracing::debug!(%from, kind = other.kind(), "unexpected message");
            }
        }
    }

    fn applied(&mut self, id: GatewayMsgId, key: RouteKey, broker_partition: u32, broker_id: u64) {
        let Some(state) = self.keys.get_mut(&key) else {
            return;
        };
        let Some(p) = state.pending.as_mut() else {
            return;
        };
        if id.instance() != p.id.instance() || id < p.id {
            return;
        }
        p.acked.insert((broker_partition, broker_id));
        self.confirm_if_done(key);
    }

    /// A join is confirmed once every running broker replica serving its key applied it.
    fn confirm_if_done(&mut self, key: RouteKey) {
        let required = self.brokers_for(&key);
        let Some(state) = self.keys.get_mut(&key) else {
            return;
        };
        let done = state
            .pending
            .as_ref()
            .is_some_and(|p| !required.is_empty() && required.is_subset(&p.acked));
        if done {
            if let Some(p) = state.pending.take() {
                state.confirmed = true;
                for (_, _, reply) in p.waiters {
                    let _ = reply.send(Ok(()));
                }
            }
        }
    }

    fn deliver(&mut self, m: RoomMessage) {
        self.metrics.inc_in("room");
        if self.dedup.put(m.id, ()).is_some() {
            self.metrics.drop("room", "duplicate");
            return;
        }
        let has_key = self.keys.get(&m.key).is_some_and(|k| k.members > 0);
        if !has_key {
            self.negative_feedback(m.key);
        }
        let Some(members) = self.rooms.get(&m.key.room) else {
            self.metrics.drop("room", "no_members");
            return;
        };
        let frame = ServerFrame::Room {
            room: Id(m.key.room),
            id: Id(m.id),
            from: Id(m.from),
            body: m.body,
            ts: m.ts,
        };
        let text = Utf8Bytes::from(frame.to_json());
        let mut out = 0;
        for (_, tx) in members.values() {
            match tx.try_send(text.clone()) {
                Ok(()) => out += 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.metrics.drop("deliver", "slow_client")
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        self.metrics.add_out("deliver", out);
    }

    /// A room message arrived for a key with no local member: tell the routers (and so the
    /// brokers) to stop sending it here. At most once a second per key.
    fn negative_feedback(&mut self, key: RouteKey) {
        let now = Instant::now();
        if self.feedback_sent.contains_key(&key) {
            return;
        }
        self.feedback_sent.insert(key, now);
        self.metrics.inc_out("feedback");
        self.announce(key, false, false);
    }
}
