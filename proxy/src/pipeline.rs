//! The seed's proxy pipeline (4.4): receivers push jobs into N convert queues by `room % N`;
//! N convert threads turn a job into wire messages for the chosen broker replicas and push them
//! into send queue `room % 3N`; 3N send threads hand them to the transport. Every send queue has
//! exactly one producer (the convert thread `room % N`) and one consumer, and a room always takes
//! the same path, so one room's messages keep their order. The queues are crossbeam's bounded
//! lock-free array channels; a full queue drops the message and counts it.
//!
//! **Order across a route change.** When the routes change (a broker doubling, a replica
//! joining or leaving), a key whose broker replica changed would race: its last message to the
//! old replica against its first to the new one. So for [`ROUTE_CHANGE_HOLD`] after a change
//! the convert thread holds the messages of keys whose replica changed, in arrival order, and
//! sends them when the hold ends: the old replica has had that long to forward what it got
//! (the old broker keeps the rows for 3 s after a flip). Other keys are not delayed.

use arc_swap::ArcSwap;
use bytes::Bytes;
use crossbeam::channel::{bounded, Receiver, Sender, TrySendError};
use pixiu_protocol::ids::RouteKey;
use pixiu_protocol::routing::{broker_partition, pick_replica, BigRooms};
use pixiu_protocol::trace::Stamp;
use pixiu_protocol::wire::{self, Message, RoomMessage};
use pixiu_registry::RoleView;
use pixiu_runtime::{Hop, Liveness, RoleMetrics};
use pixiu_transport::Transport;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long messages whose broker replica changed with the routes are held (see the module
/// doc): well above the time a healthy broker takes to forward a message.
pub(crate) const ROUTE_CHANGE_HOLD: Duration = Duration::from_millis(50);

/// A room message accepted by a receiver.
pub(crate) struct Job {
    pub id: u64,
    pub room: u64,
    pub from: u64,
    pub body: String,
    pub ts: u64,
    /// A traced message (`"trace": true`): the hops so far and when it reached this proxy.
    pub trace: Option<Trace>,
}

/// The tracing of a job: earlier hops' stamps and this proxy's arrival time, unix µs.
pub(crate) struct Trace {
    pub stamps: Vec<Stamp>,
    pub in_us: u64,
}

/// What every convert thread works with.
#[derive(Clone)]
pub(crate) struct Converter {
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub big_rooms: BigRooms,
    pub metrics: RoleMetrics,
    /// This proxy, for the stamps of traced messages.
    pub hop: Hop,
}

/// Where room messages go: per broker partition, the running replicas that answer heartbeats,
/// in registry-id order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Routes {
    pub partition_num: u32,
    pub partitions: Vec<Vec<SocketAddr>>,
}

impl Routes {
    pub(crate) fn build(view: &RoleView, live: &Liveness, now: Instant) -> Routes {
        let n = view.partition_num;
        let partitions = (0..n)
            .map(|p| {
                view.running_addrs(p)
                    .into_iter()
                    .filter(|a| live.is_alive(a, now))
                    .collect()
            })
            .collect();
        Routes {
            partition_num: n,
            partitions,
        }
    }

    /// The broker replica for a key: partition `hash % N`, replica `(hash / N) % replicas`.
    pub(crate) fn pick(&self, key: &RouteKey) -> Option<SocketAddr> {
        let hash = key.hash();
        let p = broker_partition(hash, self.partition_num) as usize;
        let replicas = self.partitions.get(p)?;
        pick_replica(hash, self.partition_num, replicas.len()).map(|i| replicas[i])
    }
}

/// What the convert threads read: the routes, and the ones they replaced with when.
#[derive(Debug, Default)]
pub(crate) struct RouteTable {
    pub now: Routes,
    pub before: Option<(Routes, Instant)>,
}

impl RouteTable {
    /// The routes `now`, replacing `old`'s at `at`.
    pub(crate) fn changed(old: &RouteTable, now: Routes, at: Instant) -> RouteTable {
        RouteTable {
            before: Some((old.now.clone(), at)),
            now,
        }
    }

    /// Where a message for `key` goes, and until when it must be held: while the routes
    /// changed less than [`ROUTE_CHANGE_HOLD`] ago and gave the key another replica.
    pub(crate) fn pick(
        &self,
        key: &RouteKey,
        now: Instant,
    ) -> Option<(SocketAddr, Option<Instant>)> {
        let to = self.now.pick(key)?;
        let hold = self.before.as_ref().and_then(|(before, at)| {
            let until = *at + ROUTE_CHANGE_HOLD;
            let moved = before.pick(key).is_some_and(|old| old != to);
            (moved && now < until).then_some(until)
        });
        Some((to, hold))
    }
}

#[derive(Clone)]
pub(crate) struct Pipeline {
    convert: Arc<Vec<Sender<Job>>>,
    send: Arc<Vec<Sender<(SocketAddr, Bytes)>>>,
    metrics: RoleMetrics,
}

impl Pipeline {
    pub(crate) fn start(
        n: usize,
        capacity: usize,
        conv: Converter,
        transport: Transport,
        rt: tokio::runtime::Handle,
    ) -> Pipeline {
        let metrics = conv.metrics.clone();
        let mut send_tx = Vec::with_capacity(3 * n);
        for j in 0..3 * n {
            let (tx, rx) = bounded::<(SocketAddr, Bytes)>(capacity);
            send_tx.push(tx);
            let transport = transport.clone();
            let metrics = metrics.clone();
            let rt = rt.clone();
            std::thread::Builder::new()
                .name(format!("proxy-send-{j}"))
                .spawn(move || send_loop(rx, transport, metrics, rt))
                .expect("spawning a pipeline thread");
        }
        let send_tx = Arc::new(send_tx);
        let mut convert_tx = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = bounded::<Job>(capacity);
            convert_tx.push(tx);
            let send = send_tx.clone();
            let conv = conv.clone();
            std::thread::Builder::new()
                .name(format!("proxy-convert-{i}"))
                .spawn(move || convert_loop(rx, send, conv))
                .expect("spawning a pipeline thread");
        }
        Pipeline {
            convert: Arc::new(convert_tx),
            send: send_tx,
            metrics,
        }
    }

    /// Receiver stage: queue a job by `room % N`. False (and counted) when the queue is full.
    pub(crate) fn submit(&self, job: Job) -> bool {
        let q = (job.room % self.convert.len() as u64) as usize;
        match self.convert[q].try_send(job) {
            Ok(()) => {
                self.metrics.inc_in("room");
                true
            }
            Err(TrySendError::Full(_)) => {
                self.metrics.drop("convert", "queue_full");
                false
            }
            Err(TrySendError::Disconnected(_)) => {
                self.metrics.drop("convert", "closed");
                false
            }
        }
    }

    pub(crate) fn report_depths(&self) {
        let c: usize = self.convert.iter().map(Sender::len).sum();
        let s: usize = self.send.iter().map(Sender::len).sum();
        self.metrics.set_queue("convert", c as i64);
        self.metrics.set_queue("send", s as i64);
    }

    /// Stop the threads once the queues are drained (they end when every sender is gone).
    pub(crate) fn close(self) {
        drop(self);
    }
}

/// Messages held after a route change: (until, send queue, to, frame), in arrival order.
type Held = VecDeque<(Instant, usize, SocketAddr, Bytes)>;

fn convert_loop(rx: Receiver<Job>, send: Arc<Vec<Sender<(SocketAddr, Bytes)>>>, conv: Converter) {
    let metrics = &conv.metrics;
    let mut held: Held = VecDeque::new();
    loop {
        let next = match held.front() {
            None => match rx.recv() {
                Ok(job) => Some(job),
                Err(_) => return,
            },
            Some((until, ..)) => {
                match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                    Ok(job) => Some(job),
                    Err(crossbeam::channel::RecvTimeoutError::Timeout) => None,
                    Err(crossbeam::channel::RecvTimeoutError::Disconnected) => {
                        release(&mut held, None, &send, metrics);
                        return;
                    }
                }
            }
        };
        // one instant for both: what is released now goes before what is converted now
        let now = Instant::now();
        release(&mut held, Some(now), &send, metrics);
        if let Some(job) = next {
            convert(job, now, &send, &conv, &mut held);
        }
    }
}

/// Send the held messages whose hold ended by `now` (all of them when `None`), in order.
fn release(
    held: &mut Held,
    now: Option<Instant>,
    send: &[Sender<(SocketAddr, Bytes)>],
    metrics: &RoleMetrics,
) {
    while let Some((until, ..)) = held.front() {
        if now.is_some_and(|now| *until > now) {
            break;
        }
        let Some((_, q, to, bytes)) = held.pop_front() else {
            break;
        };
        match send[q].try_send((to, bytes)) {
            Ok(()) => metrics.inc_out("convert"),
            Err(_) => metrics.drop("send", "queue_full"),
        }
    }
}

fn convert(
    job: Job,
    now: Instant,
    send: &[Sender<(SocketAddr, Bytes)>],
    conv: &Converter,
    held: &mut Held,
) {
    let (metrics, big_rooms) = (&conv.metrics, &conv.big_rooms);
    let q = (job.room % send.len() as u64) as usize;
    let routes = conv.routes.load();
    let out = &send[q];
    let keys = big_rooms.publish_keys(job.room);
    let last = keys.len().saturating_sub(1);
    // one key for an ordinary room: the body moves into the message, no copy
    let mut body = Some(job.body);
    for (i, key) in keys.into_iter().enumerate() {
        let Some((to, hold)) = routes.pick(&key, now) else {
            metrics.drop("convert", "no_broker");
            continue;
        };
        let body = if i == last {
            body.take().unwrap_or_default()
        } else {
            body.clone().unwrap_or_default()
        };
        let msg = RoomMessage {
            id: job.id,
            key,
            from: job.from,
            body,
            ts: job.ts,
        };
        let bytes = match &job.trace {
            None => wire::encode(&Message::Room(msg)),
            Some(t) => {
                let mut trace = t.stamps.clone();
                trace.push(conv.hop.stamp(t.in_us));
                wire::encode(&Message::TracedRoom { msg, trace })
            }
        };
        if let Some(until) = hold {
            held.push_back((until, q, to, bytes));
            continue;
        }
        match out.try_send((to, bytes)) {
            Ok(()) => metrics.inc_out("convert"),
            Err(_) => metrics.drop("send", "queue_full"),
        }
    }
}

fn send_loop(
    rx: Receiver<(SocketAddr, Bytes)>,
    transport: Transport,
    metrics: RoleMetrics,
    rt: tokio::runtime::Handle,
) {
    // the transport may start a connection task: that needs the runtime's context
    let _guard = rt.enter();
    while let Ok((to, bytes)) = rx.recv() {
        if transport.send(to, bytes) {
            metrics.inc_out("room");
        } else {
            metrics.drop("send", "transport");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_pick_seed_rule() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let c: SocketAddr = "127.0.0.1:3".parse().unwrap();
        let r = Routes {
            partition_num: 2,
            partitions: vec![vec![a, b], vec![c]],
        };
        assert_eq!(r.pick(&RouteKey::room(4)), Some(a)); // partition 0, replica (4 / 2) % 2 = 0
        assert_eq!(r.pick(&RouteKey::room(6)), Some(b)); // (6 / 2) % 2 = 1
        assert_eq!(r.pick(&RouteKey::room(2)), Some(b));
        assert_eq!(r.pick(&RouteKey::room(5)), Some(c));
        let r = Routes {
            partition_num: 2,
            partitions: vec![vec![a, b], vec![]],
        };
        assert_eq!(r.pick(&RouteKey::room(5)), None);
        assert_eq!(Routes::default().pick(&RouteKey::room(1)), None);
    }

    fn doubled(at: Instant) -> (RouteTable, SocketAddr, SocketAddr) {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let c: SocketAddr = "127.0.0.1:3".parse().unwrap();
        let old = RouteTable {
            now: Routes {
                partition_num: 1,
                partitions: vec![vec![a]],
            },
            before: None,
        };
        let new = Routes {
            partition_num: 2,
            partitions: vec![vec![a], vec![c]],
        };
        (RouteTable::changed(&old, new, at), a, c)
    }

    #[test]
    fn a_key_whose_replica_changed_is_held_for_a_while_others_are_not() {
        let at = Instant::now();
        let (t, a, c) = doubled(at);
        // room 5 moves to partition 1 of 2, room 4 stays on partition 0
        let until = at + ROUTE_CHANGE_HOLD;
        assert_eq!(t.pick(&RouteKey::room(5), at), Some((c, Some(until))));
        assert_eq!(t.pick(&RouteKey::room(4), at), Some((a, None)));
        assert_eq!(t.pick(&RouteKey::room(5), until), Some((c, None)));
        // no earlier routes: nothing is held
        let first = RouteTable {
            now: t.now.clone(),
            before: None,
        };
        assert_eq!(first.pick(&RouteKey::room(5), at), Some((c, None)));
    }

    /// The convert thread itself: a moved room's messages wait out the hold in order, then go
    /// before anything of that room converted later; an unmoved room's pass at once.
    #[test]
    fn held_messages_keep_their_order_and_go_first() {
        let (t, a, c) = doubled(Instant::now());
        let routes = Arc::new(ArcSwap::from_pointee(t));
        let (job_tx, job_rx) = bounded::<Job>(16);
        let (out_tx, out_rx) = bounded::<(SocketAddr, Bytes)>(16);
        let metrics = RoleMetrics::new(&prometheus::Registry::new(), "proxy");
        let send = Arc::new(vec![out_tx]);
        let thread = std::thread::spawn(move || {
            let conv = Converter {
                routes,
                big_rooms: BigRooms::default(),
                metrics,
                hop: Hop::fixed("proxy", 1, None, "127.0.0.1:5"),
            };
            convert_loop(job_rx, send, conv)
        });
        let job = |id: u64, room: u64| Job {
            id,
            room,
            from: 1,
            body: String::new(),
            ts: 0,
            trace: None,
        };
        let started = Instant::now();
        for (id, room) in [(1, 5), (2, 4), (3, 5)] {
            job_tx.send(job(id, room)).unwrap();
        }
        let next = || {
            let (to, bytes) = out_rx.recv_timeout(Duration::from_secs(5)).unwrap();
            match wire::decode(&bytes).unwrap() {
                Message::Room(m) => (to, m.id),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(next(), (a, 2), "the unmoved room is not held");
        assert_eq!(next(), (c, 1));
        assert!(started.elapsed() >= ROUTE_CHANGE_HOLD / 2, "held");
        assert_eq!(next(), (c, 3));
        job_tx.send(job(4, 5)).unwrap();
        assert_eq!(next(), (c, 4), "after the hold, straight through");
        drop(job_tx);
        thread.join().unwrap();
    }
}
