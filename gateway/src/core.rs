//! The gateway's core: one task that owns the room state machine (`rooms.rs`: membership,
//! de-duplication, routing announcements, join confirmation) and the inbox connections
//! (`inbox.rs`). Connections talk to it by message, the network feeds it by message, so the
//! fan-out path takes no lock. This file is the IO shell: it feeds commands, datagrams, clock
//! ticks and registry changes to those modules and performs what they decide (transport
//! sends, frames to connections, join answers, metrics), and pings the routers.

use crate::inbox::{self, Inbox, ToBroker};
use crate::rooms::{
    Action, Cluster, JoinError, JoinId, Rooms, RoomsSettings, Seat, Verdict, Why, TWICE_AFTER,
};
use axum::extract::ws::Utf8Bytes;
use pixiu_protocol::client::{Id, ServerFrame};
use pixiu_protocol::routing::BigRooms;
use pixiu_protocol::trace::{HopJson, Stamp};
use pixiu_protocol::wire::{self, DeviceRef, GatewayUpdate, InboxItem, Message, RoomMessage};
use pixiu_registry::RoleView;
use pixiu_runtime::inbound::{self, Received};
use pixiu_runtime::{Liveness, RoleMetrics, Shutdown};
use pixiu_transport::{Inbound, Transport};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

pub(crate) use crate::rooms::ConnId;
pub(crate) type ConnTx = mpsc::Sender<Utf8Bytes>;
pub(crate) type JoinReply = oneshot::Sender<Result<(), JoinError>>;

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
    /// This gateway, for the stamps of traced messages.
    pub hop: pixiu_runtime::Hop,
}

pub(crate) struct Core {
    hop: pixiu_runtime::Hop,
    refresh_interval: Duration,
    heartbeat_interval: Duration,
    inbox_heartbeat: Duration,
    transport: Transport,
    metrics: RoleMetrics,
    id_watch: watch::Receiver<u64>,
    routers_rx: watch::Receiver<Arc<RoleView>>,
    brokers_rx: watch::Receiver<Arc<RoleView>>,
    /// the current views and router liveness the state machines decide with
    cluster: Cluster,
    rooms: Rooms<ConnTx>,
    inbox: Inbox<ConnTx>,
    /// joins waiting for their answer from `rooms`
    joins: HashMap<JoinId, JoinReply>,
    next_join: JoinId,
    /// what `rooms` decided and is not done yet
    actions: Vec<Action>,
}

impl Core {
    pub(crate) fn new(
        s: CoreSettings,
        transport: Transport,
        metrics: RoleMetrics,
        id_watch: watch::Receiver<u64>,
        routers_rx: watch::Receiver<Arc<RoleView>>,
        brokers_rx: watch::Receiver<Arc<RoleView>>,
    ) -> Core {
        let id = *id_watch.borrow();
        let cluster = Cluster {
            routers: routers_rx.borrow().clone(),
            brokers: brokers_rx.borrow().clone(),
            router_live: Liveness::new(s.heartbeat_timeout),
        };
        let rooms = RoomsSettings {
            big_rooms: s.big_rooms,
            join_timeout: s.join_timeout,
            dedup_capacity: s.dedup_capacity,
        };
        Core {
            hop: s.hop,
            refresh_interval: s.refresh_interval,
            heartbeat_interval: s.heartbeat_interval,
            inbox_heartbeat: s.inbox_heartbeat,
            transport,
            metrics,
            id_watch,
            routers_rx,
            brokers_rx,
            cluster,
            rooms: Rooms::new(rooms, id, s.node_addr),
            inbox: Inbox::new(s.node_addr),
            joins: HashMap::new(),
            next_join: 0,
            actions: Vec::new(),
        }
    }

    pub(crate) async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Cmd>,
        mut inbound: mpsc::Receiver<Inbound>,
        shutdown: Shutdown,
    ) {
        let mut heartbeat = tokio::time::interval(self.heartbeat_interval);
        let mut refresh = tokio::time::interval(self.refresh_interval);
        refresh.tick().await;
        let mut timeouts = tokio::time::interval(Duration::from_millis(50));
        let mut inbox_heartbeat = tokio::time::interval(self.inbox_heartbeat);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(cmd) = cmds.recv() => self.on_cmd(cmd),
                Some(msg) = inbound.recv() => self.on_inbound(msg),
                _ = heartbeat.tick() => self.heartbeat(),
                _ = refresh.tick() => {
                    self.rooms.refresh(Instant::now(), &self.cluster, &mut self.actions);
                }
                _ = timeouts.tick() => {
                    self.rooms.tick(Instant::now(), &self.cluster, &mut self.actions);
                }
                _ = inbox_heartbeat.tick() => self.inbox_heartbeat(),
                Ok(()) = self.routers_rx.changed() => {
                    self.cluster.routers = self.routers_rx.borrow_and_update().clone();
                }
                Ok(()) = self.brokers_rx.changed() => {
                    self.cluster.brokers = self.brokers_rx.borrow_and_update().clone();
                    // devices whose broker replica changed log in at the new one now
                    self.inbox_heartbeat();
                    self.rooms.brokers_changed(&self.cluster, &mut self.actions);
                }
                Ok(()) = self.id_watch.changed() => {
                    let id = *self.id_watch.borrow_and_update();
                    tracing::warn!(id, "registered again with a new id (session expired); re-announcing every room");
                    self.rooms.new_instance(Instant::now(), &self.cluster, id, &mut self.actions);
                }
            }
            self.perform();
        }
        // best effort: tell the routers this gateway's rooms are gone
        self.rooms
            .shutdown(Instant::now(), &self.cluster, &mut self.actions);
        self.perform();
    }

    /// Carry out what the room state machine decided.
    fn perform(&mut self) {
        let mut actions = std::mem::take(&mut self.actions);
        for a in actions.drain(..) {
            match a {
                Action::Announce {
                    update,
                    to,
                    twice,
                    why,
                } => self.announce(update, &to, twice, why),
                Action::AnswerJoin { join, result } => {
                    if result == Err(JoinError::Timeout) {
                        self.metrics.drop("join", "timeout");
                    }
                    if let Some(reply) = self.joins.remove(&join) {
                        let _ = reply.send(result);
                    }
                }
            }
        }
        // keep the allocation for the next round
        self.actions = actions;
    }

    /// Send a Gateway Message to the routers chosen for it (a second copy 10 ms later when
    /// `twice`).
    fn announce(&self, update: GatewayUpdate, to: &[SocketAddr], twice: bool, why: Why) {
        if why == Why::Feedback {
            self.metrics.inc_out("feedback");
        }
        let key = update.key;
        let bytes = wire::encode(&Message::Gateway(update));
        let mut sent = false;
        for &to in to {
            if self.transport.send(to, bytes.clone()) {
                sent = true;
                self.metrics.inc_out("gateway_update");
            } else {
                self.metrics.drop("gateway_update", "send_failed");
            }
            if twice {
                let t = self.transport.clone();
                let b = bytes.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(TWICE_AFTER).await;
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
    }

    fn on_cmd(&mut self, cmd: Cmd) {
        let brokers = &self.cluster.brokers;
        match cmd {
            Cmd::Join {
                conn,
                uid,
                room,
                tx,
                reply,
            } => {
                let join = self.next_join;
                self.next_join += 1;
                self.joins.insert(join, reply);
                let seat = Seat { conn, uid, room };
                let (c, out) = (&self.cluster, &mut self.actions);
                self.rooms.join(Instant::now(), c, seat, tx, join, out);
            }
            Cmd::Leave { conn, uid, room } => {
                let seat = Seat { conn, uid, room };
                let (c, out) = (&self.cluster, &mut self.actions);
                self.rooms.leave(Instant::now(), c, seat, out);
            }
            Cmd::InboxOnline {
                conn,
                uid,
                device,
                tx,
            } => {
                let m = self.inbox.online(brokers, conn, uid, device, tx);
                self.to_broker(m);
            }
            Cmd::InboxOffline { conn } => {
                if let Some(m) = self.inbox.offline(brokers, conn) {
                    self.to_broker(m);
                }
            }
            Cmd::InboxAck { conn, id } => {
                if let Some(m) = self.inbox.ack(brokers, conn, id) {
                    self.to_broker(m);
                }
            }
            Cmd::InboxSync { conn, after } => {
                if let Some(m) = self.inbox.sync(brokers, conn, after) {
                    self.to_broker(m);
                }
            }
        }
    }

    fn to_broker(&self, m: ToBroker) {
        match m.to {
            Some(b) => {
                self.transport.send(b, wire::encode(&m.msg));
            }
            None => self.metrics.drop("inbox", "no_broker"),
        }
    }

    /// Report every connected device to its broker, in batches.
    fn inbox_heartbeat(&self) {
        for (b, msg) in self.inbox.heartbeat(&self.cluster.brokers) {
            self.transport.send(b, wire::encode(&msg));
        }
    }

    fn on_inbox_push(&mut self, dev: DeviceRef, mut items: Vec<InboxItem>) {
        if items.iter().any(|m| m.trace.is_some()) {
            // traced messages: this gateway's hop, from the push's arrival to the frame
            let arrived = pixiu_protocol::trace::now_us();
            for t in items.iter_mut().filter_map(|m| m.trace.as_mut()) {
                t.push(self.hop.stamp(arrived));
            }
        }
        let tx = match self.inbox.target(&dev) {
            Ok(tx) => tx,
            Err(reason) => {
                self.metrics.drop("inbox", reason);
                return;
            }
        };
        let mut out = 0;
        for m in items {
            match tx.try_send(inbox::frame(m)) {
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

    fn heartbeat(&mut self) {
        let now = Instant::now();
        let addrs = self.cluster.routers.all_addrs();
        let live = &mut self.cluster.router_live;
        live.retain(|a| addrs.contains(a));
        for a in addrs {
            let seq = live.ping_sent(a, now);
            self.transport.send(a, wire::encode(&Message::Ping { seq }));
        }
    }

    fn on_inbound(&mut self, inbound: Inbound) {
        let (from, msg) = match inbound::decode(inbound, &self.metrics) {
            Some(Received::Message { from, msg, .. }) => (from, msg),
            Some(Received::Request { from, msg, reply }) => {
                inbound::unexpected(&self.metrics, "gateway", from, &msg, Some(reply));
                return;
            }
            None => return,
        };
        match msg {
            Message::Room(m) => self.deliver(m, None),
            Message::TracedRoom { msg, trace } => {
                let arrived = pixiu_protocol::trace::now_us();
                self.deliver(msg, Some((trace, arrived)))
            }
            Message::InboxPush { dev, items } => self.on_inbox_push(dev, items),
            Message::Pong { seq } => self.cluster.router_live.pong(from, seq, Instant::now()),
            Message::RouteApplied {
                id,
                key,
                broker_partition,
                broker_id,
            } => {
                let (c, out) = (&self.cluster, &mut self.actions);
                self.rooms
                    .applied(c, id, key, broker_partition, broker_id, out);
            }
            Message::Ping { seq } => {
                self.transport
                    .send(from, wire::encode(&Message::Pong { seq }));
            }
            other => inbound::unexpected(&self.metrics, "gateway", from, &other, None),
        }
    }

    /// A room message to its local members: one frame, encoded once; a traced one carries
    /// the hops so far and this gateway's (it arrived at `.1`, unix µs).
    fn deliver(&mut self, m: RoomMessage, trace: Option<(Vec<Stamp>, u64)>) {
        self.metrics.inc_in("room");
        let (c, out) = (&self.cluster, &mut self.actions);
        match self.rooms.room_message(Instant::now(), c, m.id, m.key, out) {
            Verdict::Duplicate => return self.metrics.drop("room", "duplicate"),
            Verdict::NoMembers => return self.metrics.drop("room", "no_members"),
            Verdict::Deliver => {}
        }
        let trace = trace.map(|(mut stamps, arrived)| {
            stamps.push(self.hop.stamp(arrived));
            stamps.iter().map(HopJson::from).collect()
        });
        let frame = ServerFrame::Room {
            room: Id(m.key.room),
            id: Id(m.id),
            from: Id(m.from),
            body: m.body,
            ts: m.ts,
            trace,
        };
        let text = Utf8Bytes::from(frame.to_json());
        let mut out = 0;
        for tx in self.rooms.members(m.key.room) {
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
}
