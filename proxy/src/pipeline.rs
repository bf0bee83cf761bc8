//! The seed's proxy pipeline (4.4): receivers push jobs into N convert queues by `room % N`;
//! N convert threads turn a job into wire messages for the chosen broker replicas and push them
//! into send queue `room % 3N`; 3N send threads hand them to the transport. Every send queue has
//! exactly one producer (the convert thread `room % N`) and one consumer, and a room always takes
//! the same path, so one room's messages keep their order. The queues are crossbeam's bounded
//! lock-free array channels; a full queue drops the message and counts it.

use arc_swap::ArcSwap;
use bytes::Bytes;
use crossbeam::channel::{bounded, Receiver, Sender, TrySendError};
use pixiu_protocol::ids::RouteKey;
use pixiu_protocol::routing::{broker_partition, pick_replica, BigRooms};
use pixiu_protocol::wire::{self, Message, RoomMessage};
use pixiu_registry::RoleView;
use pixiu_runtime::{Liveness, RoleMetrics};
use pixiu_transport::Transport;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// A room message accepted by a receiver.
pub(crate) struct Job {
    pub id: u64,
    pub room: u64,
    pub from: u64,
    pub body: String,
    pub ts: u64,
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
        big_rooms: BigRooms,
        routes: Arc<ArcSwap<Routes>>,
        transport: Transport,
        metrics: RoleMetrics,
        rt: tokio::runtime::Handle,
    ) -> Pipeline {
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
            let routes = routes.clone();
            let metrics = metrics.clone();
            std::thread::Builder::new()
                .name(format!("proxy-convert-{i}"))
                .spawn(move || convert_loop(rx, send, routes, big_rooms, metrics))
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

fn convert_loop(
    rx: Receiver<Job>,
    send: Arc<Vec<Sender<(SocketAddr, Bytes)>>>,
    routes: Arc<ArcSwap<Routes>>,
    big_rooms: BigRooms,
    metrics: RoleMetrics,
) {
    let q = send.len() as u64;
    while let Ok(job) = rx.recv() {
        let routes = routes.load();
        let out = &send[(job.room % q) as usize];
        let keys = big_rooms.publish_keys(job.room);
        let last = keys.len().saturating_sub(1);
        // one key for an ordinary room: the body moves into the message, no copy
        let mut body = Some(job.body);
        for (i, key) in keys.into_iter().enumerate() {
            let Some(to) = routes.pick(&key) else {
                metrics.drop("convert", "no_broker");
                continue;
            };
            let body = if i == last {
                body.take().unwrap_or_default()
            } else {
                body.clone().unwrap_or_default()
            };
            let bytes = wire::encode(&Message::Room(RoomMessage {
                id: job.id,
                key,
                from: job.from,
                body,
                ts: job.ts,
            }));
            match out.try_send((to, bytes)) {
                Ok(()) => metrics.inc_out("convert"),
                Err(_) => metrics.drop("send", "queue_full"),
            }
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
}
