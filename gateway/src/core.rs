//! The gateway's core: one task that owns the room state machine (`rooms.rs`: membership,
//! de-duplication, routing announcements, join confirmation) and the inbox connections
//! (`inbox.rs`). Connections talk to it by message, the network feeds it by message, so the
//! fan-out path takes no lock. This file is the IO shell: it feeds commands, datagrams, clock
//! ticks and registry changes to those modules and performs what they decide (transport
//! sends, frames to connections, join answers, metrics), and pings the routers.
//!
//! Room fan-out is batched: the core takes every datagram already waiting (up to
//! [`INBOUND_BATCH`]), encodes each room message's frame once, and hands each member of a room
//! one shared [`Frames`] batch of that room's messages: one queue entry, one wake-up and one
//! socket write per member per batch instead of per message. Fan-outs are paced
//! (`pacing.rs`): one starts at once when the last one was at least `fanout_interval` ago,
//! else when that much time has passed, with everything that came meanwhile. Under light load
//! a message goes out as soon as it comes; under heavy load it waits at most `fanout_interval`
//! and the number of writes per member per second is bounded, whatever the message rate.

use crate::inbox::{self, Inbox, ToBroker};
use crate::pacing::Pacer;
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
/// Frames for one connection, in order: a batch of room messages shared by every member of
/// the room (cloning it clones a pointer), or one reply.
pub(crate) type Frames = Arc<[Utf8Bytes]>;
/// A connection's bounded outgoing queue of [`Frames`].
pub(crate) type ConnTx = mpsc::Sender<Frames>;

/// Datagrams taken from the inbound queue in one go; their room messages go out as batches.
const INBOUND_BATCH: usize = 64;
/// Room messages staged before a fan-out starts without waiting for its time.
const MAX_STAGED: usize = 4096;
/// A batch for one connection holds frames of at most this many bytes in all (a larger frame
/// goes alone), so a full queue of batches holds no more than a queue of single large frames.
const BATCH_BYTES: usize = 64 * 1024;
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
    /// At most one fan-out of room messages per this long (zero: each round of datagrams at
    /// once).
    pub fanout_interval: Duration,
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
    /// room messages not yet fanned out, (room, frame), in arrival order
    staged: Vec<(u64, Utf8Bytes)>,
    /// when `staged` goes (`pacing.rs`)
    pacer: Pacer,
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
            staged: Vec::new(),
            pacer: Pacer::new(s.fanout_interval, MAX_STAGED),
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
                Some(msg) = inbound.recv() => {
                    self.on_inbound(msg);
                    for _ in 1..INBOUND_BATCH {
                        let Ok(msg) = inbound.try_recv() else { break };
                        self.on_inbound(msg);
                    }
                    self.fan_out_when_due();
                }
                _ = tokio::time::sleep_until(self.pacer.deadline(tokio::time::Instant::now())),
                    if !self.staged.is_empty() => self.fan_out(),
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
        self.fan_out();
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
        let n = items.len() as u64;
        let frames: Frames = items.into_iter().map(inbox::frame).collect();
        match tx.try_send(frames) {
            Ok(()) => self.metrics.add_out("inbox", n),
            // redelivered by the broker when not acknowledged
            Err(_) => self.metrics.drop("inbox", "slow_client"),
        }
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

    /// A room message for its local members: its frame, encoded once, is staged for
    /// [`Core::fan_out`]; a traced one carries the hops so far and this gateway's (it arrived
    /// at `.1`, unix µs).
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
        self.staged
            .push((m.key.room, Utf8Bytes::from(frame.to_json())));
    }

    /// Fan out now if the [`Pacer`] says so; otherwise the timer in [`Core::run`] does it at
    /// the pacer's deadline.
    fn fan_out_when_due(&mut self) {
        if self
            .pacer
            .due(tokio::time::Instant::now(), self.staged.len())
        {
            self.fan_out();
        }
    }

    /// Hand the staged room messages to the members: per room one batch, in arrival order,
    /// shared by all its members. A member whose queue is full loses the batch (counted per
    /// message as a slow-client drop); the others are not held up.
    fn fan_out(&mut self) {
        if self.staged.is_empty() {
            return;
        }
        self.pacer.fanned_out(tokio::time::Instant::now());
        let mut staged = std::mem::take(&mut self.staged);
        // stable: each room's messages keep their order
        staged.sort_by_key(|(room, _)| *room);
        for run in staged.chunk_by(|a, b| a.0 == b.0) {
            let room = run[0].0;
            for batch in batches(run) {
                self.to_members(room, batch);
            }
        }
        staged.clear();
        // keep the allocation for the next round
        self.staged = staged;
    }

    /// One batch of `room`'s frames to each of its members.
    fn to_members(&self, room: u64, frames: Frames) {
        let n = frames.len() as u64;
        let (mut out, mut slow) = (0, 0);
        for tx in self.rooms.members(room) {
            match tx.try_send(frames.clone()) {
                Ok(()) => out += n,
                Err(mpsc::error::TrySendError::Full(_)) => slow += n,
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        self.metrics.add_out("deliver", out);
        if slow > 0 {
            self.metrics.drop_n("deliver", "slow_client", slow);
        }
    }
}

/// One room's staged frames cut into batches of at most [`INBOUND_BATCH`] frames and
/// [`BATCH_BYTES`] bytes (a frame larger than that is a batch of its own).
fn batches(run: &[(u64, Utf8Bytes)]) -> impl Iterator<Item = Frames> + '_ {
    let mut rest = run;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let take = rest
            .iter()
            .take(INBOUND_BATCH)
            .take_while(|(_, text)| {
                bytes += text.len();
                bytes <= BATCH_BYTES
            })
            .count()
            .max(1);
        let (batch, tail) = rest.split_at(take);
        rest = tail;
        Some(batch.iter().map(|(_, text)| text.clone()).collect())
    })
}

#[cfg(test)]
mod batch_tests {
    use super::*;

    fn staged(sizes: &[usize]) -> Vec<(u64, Utf8Bytes)> {
        sizes
            .iter()
            .map(|n| (1, Utf8Bytes::from("x".repeat(*n))))
            .collect()
    }

    fn lens(run: &[(u64, Utf8Bytes)]) -> Vec<Vec<usize>> {
        batches(run)
            .map(|b| b.iter().map(|t| t.len()).collect())
            .collect()
    }

    #[test]
    fn small_frames_go_64_to_a_batch_in_order() {
        let run = staged(&[10; 130]);
        let out: Vec<Frames> = batches(&run).collect();
        assert_eq!(out.iter().map(|b| b.len()).collect::<Vec<_>>(), [64, 64, 2]);
        let flat: Vec<&Utf8Bytes> = out.iter().flat_map(|b| b.iter()).collect();
        assert!(flat.iter().zip(&run).all(|(a, (_, b))| *a == b));
    }

    #[test]
    fn a_batch_stops_at_64_kib_and_a_big_frame_goes_alone() {
        assert_eq!(
            lens(&staged(&[40_000, 30_000, 20_000, 100_000, 5])),
            [vec![40_000], vec![30_000, 20_000], vec![100_000], vec![5]]
        );
        assert_eq!(lens(&staged(&[])), Vec::<Vec<usize>>::new());
    }
}
