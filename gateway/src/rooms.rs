//! The gateway's room state machine, without IO: which local connections are in which room,
//! when to tell the routers (and through them the brokers) that this gateway has or no longer
//! has members of a route key, and when a `join` is answered.
//!
//! Inputs are joins and leaves per (connection, user, room), broker acks (`RouteApplied`),
//! room messages from brokers, changes of the broker view or of this gateway's registry id,
//! and clock ticks; each takes `now` and the current [`Cluster`] view. Outputs are
//! [`Action`]s pushed into a Vec the caller drains and performs.
//!
//! The rules (seed 7.2, 7.3):
//! - A room is routed under its [`RouteKey`]; a big room under a virtual room per member
//!   ([`BigRooms::member_key`]).
//! - The first local member of a key announces `present`, the last one leaving announces
//!   absent; both are sent twice (the second [`TWICE_AFTER`] later) while the key has fewer
//!   than 3 local members. Refreshes, re-announcements and feedback are sent once.
//! - The first member's join waits until every running broker replica serving the key has
//!   acked (`RouteApplied`) the announcement or a later one of the same instance; members
//!   joining meanwhile wait with it. Not confirmed within `join_timeout`: every waiter gets
//!   an error and is removed (which withdraws the key if nobody else is left). A waiter that
//!   leaves first gets an error too. While pending, the key is re-announced every
//!   [`RESEND_AFTER`].
//! - A room message is de-duplicated by id. One for a key with no local member is answered
//!   with an absent announcement (negative feedback), at most about once a second per key.
//! - Each announcement goes to one router replica per router partition serving the key (the
//!   seed's replica rule), preferring replicas that answer pings.

use lru::LruCache;
use pixiu_protocol::ids::{GatewayMsgId, GatewayMsgIdGen, RouteKey};
use pixiu_protocol::routing::{pick_replica, target_partitions, BigRooms};
use pixiu_protocol::wire::{GatewayRef, GatewayUpdate};
use pixiu_registry::RoleView;
use pixiu_runtime::Liveness;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[cfg(test)]
mod tests;

/// A client connection of this gateway.
pub(crate) type ConnId = u64;
/// A join request waiting for its answer; chosen by the caller, handed back in
/// [`Action::AnswerJoin`].
pub(crate) type JoinId = u64;

/// A key whose join is still unconfirmed is announced again this long after the last time.
pub(crate) const RESEND_AFTER: Duration = Duration::from_millis(500);
/// Negative feedback for a key is sent again only after this long (checked on [`Rooms::tick`]).
pub(crate) const FEEDBACK_EVERY: Duration = Duration::from_secs(1);
/// The second copy of a doubled announcement goes this long after the first.
pub(crate) const TWICE_AFTER: Duration = Duration::from_millis(10);
/// First-join and last-leave announcements are doubled while the key has fewer local members.
const DOUBLE_BELOW: usize = 3;

pub(crate) struct RoomsSettings {
    pub big_rooms: BigRooms,
    pub join_timeout: Duration,
    /// Room message ids remembered for de-duplication (at least 1).
    pub dedup_capacity: usize,
}

/// What the gateway knows of the cluster when it decides: the registry's views of the routers
/// and brokers, and which routers answer pings.
pub(crate) struct Cluster {
    pub routers: Arc<RoleView>,
    pub brokers: Arc<RoleView>,
    pub router_live: Liveness,
}

/// Why an announcement is sent (for tests and the feedback metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Why {
    /// The first local member of the key joined.
    Join,
    /// The last local member of the key left (or its join timed out).
    Leave,
    /// The periodic refresh (or a new registry id).
    Refresh,
    /// A join still unconfirmed (or re-announced under a new registry id).
    Resend,
    /// A room message came for a key with no local member.
    Feedback,
    /// The gateway stops.
    Shutdown,
}

impl Why {
    /// Does it say the gateway has members of the key?
    fn present(self) -> bool {
        matches!(self, Why::Join | Why::Refresh | Why::Resend)
    }

    /// Is it sent twice while the key has few local members (seed 7.3)?
    fn may_double(self) -> bool {
        matches!(self, Why::Join | Why::Leave)
    }
}

/// Why a join failed; the text is what the client is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum JoinError {
    #[error("left before the join completed")]
    Left,
    #[error("the cluster did not confirm the room's route in time")]
    Timeout,
    /// The core stopped before it answered (never decided here).
    #[error("gateway is shutting down")]
    ShuttingDown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Send `update` (a Gateway Message) to each router in `to`; when `twice`, send it to
    /// each again [`TWICE_AFTER`] later. `to` is empty when no router serves the key.
    Announce {
        update: GatewayUpdate,
        to: Vec<SocketAddr>,
        twice: bool,
        why: Why,
    },
    /// Answer the join `join`.
    AnswerJoin {
        join: JoinId,
        result: Result<(), JoinError>,
    },
}

/// What to do with a room message from a broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Seen before: drop it.
    Duplicate,
    /// No local member of its room: drop it.
    NoMembers,
    /// Deliver it to [`Rooms::members`] of its room.
    Deliver,
}

/// One connection of a user in one room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Seat {
    pub conn: ConnId,
    pub uid: u64,
    pub room: u64,
}

struct Waiter {
    conn: ConnId,
    room: u64,
    join: JoinId,
}

struct Pending {
    /// the first announcement; acks for it or any later re-announcement count
    id: GatewayMsgId,
    last_sent: Instant,
    /// broker replicas that confirmed; done when they include every running replica that
    /// serves the key (re-checked as the broker view changes)
    acked: HashSet<(u32, u64)>,
    deadline: Instant,
    waiters: Vec<Waiter>,
}

#[derive(Default)]
struct KeyState {
    members: usize,
    confirmed: bool,
    pending: Option<Pending>,
}

/// The room state machine; `T` is what a member is delivered through (a connection's queue).
pub(crate) struct Rooms<T> {
    s: RoomsSettings,
    ids: GatewayMsgIdGen,
    me: GatewayRef,
    /// room -> local connections (delivery)
    rooms: HashMap<u64, HashMap<ConnId, (u64, T)>>,
    /// route key -> announcement state
    keys: HashMap<RouteKey, KeyState>,
    dedup: LruCache<u64, ()>,
    feedback_sent: HashMap<RouteKey, Instant>,
}

impl<T> Rooms<T> {
    /// `instance` is this gateway's registry id, `addr` its node-to-node address.
    pub(crate) fn new(s: RoomsSettings, instance: u64, addr: SocketAddr) -> Rooms<T> {
        let cap = NonZeroUsize::new(s.dedup_capacity).expect("capacity is checked at startup");
        Rooms {
            ids: GatewayMsgIdGen::new(instance),
            me: GatewayRef { instance, addr },
            s,
            rooms: HashMap::new(),
            keys: HashMap::new(),
            dedup: LruCache::new(cap),
            feedback_sent: HashMap::new(),
        }
    }

    /// The local members of `room`, to deliver its messages to.
    pub(crate) fn members(&self, room: u64) -> impl Iterator<Item = &T> {
        self.rooms
            .get(&room)
            .into_iter()
            .flat_map(|m| m.values().map(|(_, t)| t))
    }

    /// `seat.conn` of user `seat.uid` joins `seat.room`, delivered through `tx`. The answer
    /// to `join` comes now or later as [`Action::AnswerJoin`].
    pub(crate) fn join(
        &mut self,
        now: Instant,
        c: &Cluster,
        seat: Seat,
        tx: T,
        join: JoinId,
        out: &mut Vec<Action>,
    ) {
        let Seat { conn, uid, room } = seat;
        let members = self.rooms.entry(room).or_default();
        if members.contains_key(&conn) {
            out.push(answer(join, Ok(())));
            return;
        }
        members.insert(conn, (uid, tx));
        let key = self.s.big_rooms.member_key(room, uid);
        let state = self.keys.entry(key).or_default();
        state.members += 1;
        if state.members > 1 {
            match state.pending.as_mut() {
                Some(p) if !state.confirmed => p.waiters.push(Waiter { conn, room, join }),
                _ => out.push(answer(join, Ok(()))),
            }
            return;
        }
        // first local member of this key: announce and wait for the brokers to confirm
        let id = self.announce(now, c, key, Why::Join, out);
        let state = self.keys.entry(key).or_default();
        state.confirmed = false;
        state.pending = Some(Pending {
            id,
            last_sent: now,
            acked: HashSet::new(),
            deadline: now + self.s.join_timeout,
            waiters: vec![Waiter { conn, room, join }],
        });
    }

    /// `seat.conn` leaves `seat.room`; its key is withdrawn when it was the key's last local
    /// member. A join of it still waiting is answered with an error.
    pub(crate) fn leave(&mut self, now: Instant, c: &Cluster, seat: Seat, out: &mut Vec<Action>) {
        let Seat { conn, uid, room } = seat;
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
            if let Some(i) = p.waiters.iter().position(|w| w.conn == conn) {
                let w = p.waiters.swap_remove(i);
                out.push(answer(w.join, Err(JoinError::Left)));
            }
        }
        if state.members == 0 {
            self.keys.remove(&key);
            self.announce(now, c, key, Why::Leave, out);
        }
    }

    /// Broker replica `broker_id` of partition `broker_partition` applied update `id` for
    /// `key`. Counts for a pending join when `id` is of the same instance and not older than
    /// its first announcement.
    pub(crate) fn applied(
        &mut self,
        c: &Cluster,
        id: GatewayMsgId,
        key: RouteKey,
        broker_partition: u32,
        broker_id: u64,
        out: &mut Vec<Action>,
    ) {
        let Some(p) = self.keys.get_mut(&key).and_then(|k| k.pending.as_mut()) else {
            return;
        };
        if id.instance() != p.id.instance() || id < p.id {
            return;
        }
        p.acked.insert((broker_partition, broker_id));
        self.confirm_if_done(c, key, out);
    }

    /// The broker view changed: pending joins may now be complete.
    pub(crate) fn brokers_changed(&mut self, c: &Cluster, out: &mut Vec<Action>) {
        for key in self.pending_keys() {
            self.confirm_if_done(c, key, out);
        }
    }

    /// Re-announce every key with local members (repairs lost Gateway Messages).
    pub(crate) fn refresh(&mut self, now: Instant, c: &Cluster, out: &mut Vec<Action>) {
        for key in self.member_keys() {
            self.announce(now, c, key, Why::Refresh, out);
        }
    }

    /// This gateway registered again with a new id (its session expired): re-announce every
    /// key under it; pending joins now wait for acks of the new instance's updates.
    pub(crate) fn new_instance(
        &mut self,
        now: Instant,
        c: &Cluster,
        id: u64,
        out: &mut Vec<Action>,
    ) {
        self.ids = GatewayMsgIdGen::new(id);
        self.me.instance = id;
        self.refresh(now, c, out);
        for key in self.pending_keys() {
            let first = self.announce(now, c, key, Why::Resend, out);
            if let Some(p) = self.keys.get_mut(&key).and_then(|k| k.pending.as_mut()) {
                p.id = first;
                p.acked.clear();
            }
        }
    }

    /// The gateway stops: withdraw every key (best effort).
    pub(crate) fn shutdown(&mut self, now: Instant, c: &Cluster, out: &mut Vec<Action>) {
        for key in self.member_keys() {
            self.announce(now, c, key, Why::Shutdown, out);
        }
    }

    /// The clock: re-announce unconfirmed joins, fail those past their deadline, forget old
    /// feedback.
    pub(crate) fn tick(&mut self, now: Instant, c: &Cluster, out: &mut Vec<Action>) {
        self.resend_pending(now, c, out);
        self.expire_pending(now, c, out);
        self.feedback_sent
            .retain(|_, t| now.saturating_duration_since(*t) < FEEDBACK_EVERY);
    }

    /// A room message `id` for `key` arrived from a broker.
    pub(crate) fn room_message(
        &mut self,
        now: Instant,
        c: &Cluster,
        id: u64,
        key: RouteKey,
        out: &mut Vec<Action>,
    ) -> Verdict {
        if self.dedup.put(id, ()).is_some() {
            return Verdict::Duplicate;
        }
        let has_key = self.keys.get(&key).is_some_and(|k| k.members > 0);
        if !has_key {
            self.negative_feedback(now, c, key, out);
        }
        if self.rooms.contains_key(&key.room) {
            Verdict::Deliver
        } else {
            Verdict::NoMembers
        }
    }

    /// Tell the routers (and so the brokers) to stop sending `key` here, unless told lately.
    fn negative_feedback(
        &mut self,
        now: Instant,
        c: &Cluster,
        key: RouteKey,
        out: &mut Vec<Action>,
    ) {
        if self.feedback_sent.contains_key(&key) {
            return;
        }
        self.feedback_sent.insert(key, now);
        self.announce(now, c, key, Why::Feedback, out);
    }

    /// Re-announce joins not yet confirmed (the update or its forwarding may have been lost).
    fn resend_pending(&mut self, now: Instant, c: &Cluster, out: &mut Vec<Action>) {
        let resend: Vec<RouteKey> = self
            .keys
            .iter()
            .filter(|(_, k)| {
                k.pending
                    .as_ref()
                    .is_some_and(|p| now.saturating_duration_since(p.last_sent) >= RESEND_AFTER)
            })
            .map(|(k, _)| *k)
            .collect();
        for key in resend {
            self.announce(now, c, key, Why::Resend, out);
            if let Some(p) = self.keys.get_mut(&key).and_then(|k| k.pending.as_mut()) {
                p.last_sent = now;
            }
        }
    }

    /// Fail the joins past their deadline and remove their members.
    fn expire_pending(&mut self, now: Instant, c: &Cluster, out: &mut Vec<Action>) {
        let expired: Vec<RouteKey> = self
            .keys
            .iter()
            .filter(|(_, k)| k.pending.as_ref().is_some_and(|p| p.deadline <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            let Some(p) = self.keys.get_mut(&key).and_then(|k| k.pending.take()) else {
                continue;
            };
            let missing: Vec<(u32, u64)> =
                brokers_for(c, &key).difference(&p.acked).copied().collect();
            tracing::warn!(
                ?key,
                ?missing,
                "join not confirmed by every broker replica in time"
            );
            for w in p.waiters {
                out.push(answer(w.join, Err(JoinError::Timeout)));
                let uid = self
                    .rooms
                    .get(&w.room)
                    .and_then(|m| m.get(&w.conn))
                    .map(|(uid, _)| *uid);
                if let Some(uid) = uid {
                    let seat = Seat {
                        conn: w.conn,
                        uid,
                        room: w.room,
                    };
                    self.leave(now, c, seat, out);
                }
            }
        }
    }

    /// A join is confirmed once every running broker replica serving its key applied it.
    fn confirm_if_done(&mut self, c: &Cluster, key: RouteKey, out: &mut Vec<Action>) {
        let required = brokers_for(c, &key);
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
                for w in p.waiters {
                    out.push(answer(w.join, Ok(())));
                }
            }
        }
    }

    /// Announce `key` with a new id to the router replicas the seed's rules pick; a first
    /// join or last leave is doubled while the key has fewer than 3 local members.
    fn announce(
        &mut self,
        now: Instant,
        c: &Cluster,
        key: RouteKey,
        why: Why,
        out: &mut Vec<Action>,
    ) -> GatewayMsgId {
        let id = self.ids.next();
        let members = self.keys.get(&key).map_or(0, |k| k.members);
        out.push(Action::Announce {
            update: GatewayUpdate {
                id,
                gateway: self.me,
                key,
                present: why.present(),
                forwarded: false,
            },
            to: router_targets(now, c, key),
            twice: why.may_double() && members < DOUBLE_BELOW,
            why,
        });
        id
    }

    fn member_keys(&self) -> Vec<RouteKey> {
        self.keys
            .iter()
            .filter(|(_, k)| k.members > 0)
            .map(|(k, _)| *k)
            .collect()
    }

    fn pending_keys(&self) -> Vec<RouteKey> {
        self.keys
            .iter()
            .filter(|(_, k)| k.pending.is_some())
            .map(|(k, _)| *k)
            .collect()
    }
}

fn answer(join: JoinId, result: Result<(), JoinError>) -> Action {
    Action::AnswerJoin { join, result }
}

/// One router replica per registered router partition serving `key`: the seed's replica
/// rule over the running replicas that answer pings (over all running ones if none does).
fn router_targets(now: Instant, c: &Cluster, key: RouteKey) -> Vec<SocketAddr> {
    let hash = key.hash();
    let routers = &c.routers;
    let parts = target_partitions(
        hash,
        routers.partition_num,
        routers.partitions.keys().copied(),
    );
    let mut to = Vec::new();
    for p in parts {
        let running = routers.running_addrs(p);
        let alive: Vec<SocketAddr> = running
            .iter()
            .copied()
            .filter(|a| c.router_live.is_alive(a, now))
            .collect();
        let candidates = if alive.is_empty() { running } else { alive };
        if let Some(i) = pick_replica(hash, routers.partition_num, candidates.len()) {
            to.push(candidates[i]);
        }
    }
    to
}

/// Running broker replicas (partition, registry id) that must confirm a route for `key`.
fn brokers_for(c: &Cluster, key: &RouteKey) -> HashSet<(u32, u64)> {
    let brokers = &c.brokers;
    let parts = target_partitions(
        key.hash(),
        brokers.partition_num,
        brokers.partitions.keys().copied(),
    );
    parts
        .into_iter()
        .flat_map(|p| brokers.running(p).into_iter().map(move |m| (p, m.id)))
        .collect()
}
