//! The broker: partitioned by room (`BrokerPartitionID = RoomID % N`), replicas without a
//! leader. It registers `init`, subscribes by heartbeat to the router replicas that carry its
//! rooms (seed 7.4), loads its partition's table from a router while buffering the updates that
//! arrive meanwhile, replays them, and only then turns `running`. A room message from a proxy
//! goes once to each gateway that has members in the room.
//!
//! Personal inboxes (seed 8.5): users are served by broker partition `uid % N`, replica
//! `(uid / N) % running replicas` (the same rule as rooms). Gateways report their devices
//! (login, heartbeat, logout), acks and syncs; proxies send a Notify when a user's inbox grew.
//! The broker pulls ids from Pi and messages from Xiu and pushes them to every online device
//! through its gateway, with per-device acknowledgement and redelivery ([`delivery`]).
//!
//! Doubling: a replica of a partition beyond `partition_num` serves its parent's share until
//! the count grows; then every broker, after a grace for messages routed by the old count,
//! keeps only its rooms and users and reports `serving` (ARCHITECTURE (m)).
//!
//! Operators: a traced room message (`"trace": true`) gets this broker's stamp; `Redeliver`
//! (`pixiu-ctl replay --redeliver`) pushes stored messages again to a user's online devices.

pub mod delivery;
mod inbox;

use pixiu_protocol::routing::{partition_matches, router_partitions_for_broker};
use pixiu_protocol::table::{row_of, GatewaySweeper, RouteTable};
use pixiu_protocol::wire::{self, GatewayUpdate, Message, RouteRow};
use pixiu_registry::{Member, NodeState, Role, RoleView};
use pixiu_runtime::inbound::{self, Received};
use pixiu_runtime::{CommonConfig, Liveness, NodeEnv, Registering, RoleMetrics, Service, Shutdown};
use pixiu_transport::{Inbound, Transport};
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Broker settings (TOML keys and flags of the same names).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    pub partition: u32,
    /// Heartbeat (subscription) interval to the chosen router replicas.
    pub heartbeat_interval_ms: u64,
    /// A router replica that has not answered for this long is replaced by another one.
    pub heartbeat_timeout_ms: u64,
    pub sweep_interval_ms: u64,
    /// Inbox messages per pushed batch.
    pub inbox_batch: usize,
    /// An unacknowledged inbox batch is pushed again after this long (seed 002: 18 s).
    pub redeliver_ms: u64,
    /// Pushes of one batch before the device is treated as gone (seed 002: 3).
    pub redeliver_tries: u32,
    /// A device whose gateway stopped reporting it for this long is offline.
    pub device_timeout_ms: u64,
    /// An idle online device's inbox is re-read this often (repairs a lost Notify).
    pub inbox_poll_ms: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            partition: 0,
            heartbeat_interval_ms: 500,
            heartbeat_timeout_ms: 1500,
            sweep_interval_ms: 5000,
            inbox_batch: 64,
            redeliver_ms: 18_000,
            redeliver_tries: 3,
            device_timeout_ms: 30_000,
            inbox_poll_ms: 10_000,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub common: CommonConfig,
    pub broker: BrokerConfig,
}

pixiu_runtime::service_error! {}

/// What the broker refuses in its own settings before it starts (`--check-config` too).
pub fn check(config: &Config) -> Result<(), Error> {
    let bc = &config.broker;
    pixiu_runtime::config::at_least(&[
        ("heartbeat_interval_ms", bc.heartbeat_interval_ms, 10),
        ("sweep_interval_ms", bc.sweep_interval_ms, 100),
        ("inbox_batch", bc.inbox_batch as u64, 1),
        ("redeliver_ms", bc.redeliver_ms, 10),
        ("redeliver_tries", u64::from(bc.redeliver_tries), 1),
        ("device_timeout_ms", bc.device_timeout_ms, 100),
        ("inbox_poll_ms", bc.inbox_poll_ms, 100),
    ])
    .map_err(Error::Config)
}

/// Run a broker against ZooKeeper until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), Error> {
    pixiu_runtime::in_own_process(&config.common.clone(), config, shutdown, run_with).await
}

struct Broker {
    partition: u32,
    /// This broker, for the stamps of traced messages.
    hop: pixiu_runtime::Hop,
    my_id: watch::Receiver<u64>,
    transport: Transport,
    metrics: RoleMetrics,
    table: RouteTable,
    /// Gateway updates that arrived while the table was loading (seed 4.6).
    buffered: Option<Vec<GatewayUpdate>>,
    brokers: Arc<RoleView>,
    routers: Arc<RoleView>,
    router_live: Liveness,
    /// router partition -> the replica currently subscribed to
    subscribed: HashMap<u32, SocketAddr>,
    /// router partition -> the replica whose snapshot was merged after it acknowledged our
    /// subscription (anything it applies later reaches us by forwarding)
    synced: HashMap<u32, SocketAddr>,
    syncing: HashSet<u32>,
    /// router partitions that carry this broker's rooms
    targets: Vec<u32>,
    sync_tx: mpsc::Sender<SyncResult>,
    inbox: mpsc::Sender<inbox::Event>,
    /// When, and for which grown count, to drop what is no longer ours.
    retain_at: Option<(Instant, u32)>,
}

/// After the broker count grew, the rows and inbox users it gave to other partitions are
/// dropped this much later: room messages that proxies routed by the old count meanwhile are
/// still forwarded (a proxy sees the new count within a registry watch's delay).
const RETAIN_GRACE: Duration = Duration::from_secs(3);

/// A snapshot fetched from a router replica after it acknowledged the subscription.
struct SyncResult {
    router_partition: u32,
    replica: SocketAddr,
    rows: Option<Vec<RouteRow>>,
}

/// Run a broker in a given environment.
///
/// Start-up (seed 4.6 and 7.4): register `init`; heartbeat-subscribe to a replica of every router
/// partition that carries our rooms; once a replica acknowledges, merge its snapshot (updates
/// forwarded meanwhile are buffered, then replayed); `running` once every such partition is
/// merged. The same merge happens whenever the broker moves to another router replica, so the
/// updates applied while it was switching are not lost.
pub async fn run_with(config: Config, env: NodeEnv, shutdown: Shutdown) -> Result<(), Error> {
    check(&config)?;
    let bc = config.broker.clone();
    let me = Registering::partition(Role::Broker, bc.partition);
    let (mut service, mut inbound) = Service::start(env, &config.common, me, shutdown).await?;
    let mut routers_rx = service.watch(Role::Router).await?;
    let mut gateways_rx = service.watch(Role::Gateway).await?;
    let (sync_tx, mut sync_rx) = mpsc::channel::<SyncResult>(16);
    let inbox = inbox::spawn(
        delivery_config(&bc),
        service.transport.clone(),
        service.metrics.clone(),
        service.watch(Role::Pi).await?,
        service.watch(Role::Xiu).await?,
        service.shutdown.clone(),
        service.hop(),
    );
    let mut b = Broker {
        partition: bc.partition,
        hop: service.hop(),
        my_id: service.id_watch(),
        transport: service.transport.clone(),
        metrics: service.metrics.clone(),
        table: RouteTable::new(),
        buffered: Some(Vec::new()),
        brokers: service.peers.borrow_and_update().clone(),
        routers: routers_rx.borrow_and_update().clone(),
        router_live: Liveness::new(Duration::from_millis(bc.heartbeat_timeout_ms)),
        subscribed: HashMap::new(),
        synced: HashMap::new(),
        syncing: HashSet::new(),
        targets: Vec::new(),
        sync_tx,
        inbox,
        retain_at: None,
    };
    b.subscribe();

    let mut heartbeat = tokio::time::interval(Duration::from_millis(bc.heartbeat_interval_ms));
    let mut sweep = tokio::time::interval(Duration::from_millis(bc.sweep_interval_ms));
    let mut sweeper = GatewaySweeper::default();
    let shutdown = service.shutdown.clone();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(msg) = inbound.recv() => b.on_inbound(msg),
            Some(r) = sync_rx.recv() => {
                if b.on_synced(r) {
                    service.set_state(NodeState::Running).await?;
                    service.set_serving(b.brokers.partition_num).await?;
                }
            }
            _ = heartbeat.tick() => {
                b.subscribe();
                if let Some(n) = b.retain_if_due(Instant::now()) {
                    service.set_serving(n).await?;
                }
            }
            Ok(()) = routers_rx.changed() => {
                b.routers = routers_rx.borrow_and_update().clone();
            }
            Ok(()) = service.peers.changed() => {
                let view = service.peers.borrow_and_update().clone();
                b.on_brokers_changed(view);
            }
            _ = sweep.tick() => {
                let live: HashSet<u64> = gateways_rx.borrow_and_update().all().map(|(_, m)| m.id).collect();
                let gone = sweeper.sweep(&mut b.table, &live);
                if !gone.is_empty() {
                    tracing::info!(rows = gone.len(), "forgot rows of gateways that left the registry");
                }
                b.metrics.set_queue("table_rows", b.table.len() as i64);
            }
        }
    }
    service.drain(async {}).await;
    Ok(())
}

fn delivery_config(bc: &BrokerConfig) -> delivery::DeliveryConfig {
    delivery::DeliveryConfig {
        batch: bc.inbox_batch,
        redeliver_after: Duration::from_millis(bc.redeliver_ms),
        max_tries: bc.redeliver_tries,
        device_timeout: Duration::from_millis(bc.device_timeout_ms),
        poll_interval: Duration::from_millis(bc.inbox_poll_ms),
        retry_after: Duration::from_millis(300),
    }
}

impl Broker {
    /// Merge a router replica's snapshot. True when this completed the start-up load: every
    /// router partition carrying our rooms is merged and the buffered updates were replayed.
    fn on_synced(&mut self, r: SyncResult) -> bool {
        self.syncing.remove(&r.router_partition);
        let Some(rows) = r.rows else { return false };
        let n = rows.len();
        for row in rows {
            self.apply_row(row);
        }
        self.synced.insert(r.router_partition, r.replica);
        tracing::info!(router_partition = r.router_partition, replica = %r.replica, rows = n, "merged the routing table of a router replica");
        let complete =
            !self.targets.is_empty() && self.targets.iter().all(|p| self.synced.contains_key(p));
        let Some(buffered) = self.buffered.take_if(|_| complete) else {
            return false;
        };
        let replayed = buffered.len();
        for u in buffered {
            self.on_update(u);
        }
        tracing::info!(
            replayed,
            live_keys = self.table.live_keys(),
            "broker running"
        );
        true
    }

    /// The broker role's registry view changed; when its partition count grew, rows of rooms
    /// that are no longer this partition's are dropped.
    fn on_brokers_changed(&mut self, new: Arc<RoleView>) {
        if new.partition_num > self.brokers.partition_num && self.brokers.partition_num > 0 {
            self.retain_at = Some((Instant::now() + RETAIN_GRACE, new.partition_num));
            tracing::info!(
                partition_num = new.partition_num,
                grace = ?RETAIN_GRACE,
                "partition count grew; what is no longer ours is dropped after the grace"
            );
        }
        self.brokers = new;
    }

    /// Once the grace after a doubling passed, drop the rows of rooms and the inbox users the
    /// grown count gave to another partition. The count now in use when that happened.
    fn retain_if_due(&mut self, now: Instant) -> Option<u32> {
        let (at, partition_num) = self.retain_at?;
        if now < at {
            return None;
        }
        self.retain_at = None;
        let dropped = self.table.retain_partition(self.partition, partition_num);
        tracing::info!(
            partition_num,
            rows = dropped.len(),
            "dropped the rows of rooms no longer ours"
        );
        self.to_inbox(inbox::Event::Retain {
            partition: self.partition,
            partition_num,
        });
        Some(partition_num)
    }

    fn my_index(&self) -> usize {
        let me = *self.my_id.borrow();
        self.brokers
            .members(self.partition)
            .iter()
            .position(|m| m.id == me)
            .unwrap_or(0)
    }

    /// Heartbeat the chosen replica of every router partition that carries our rooms, moving to
    /// another replica when the chosen one stops answering (seed 7.4).
    fn subscribe(&mut self) {
        let now = Instant::now();
        let parts = router_partitions_for_broker(
            self.partition,
            self.brokers.partition_num,
            self.routers.partition_num,
            self.routers.partitions.keys().copied(),
        );
        let idx = self.my_index();
        let mut all = HashSet::new();
        self.targets = parts.clone();
        for rp in parts {
            // prefer running replicas: one still in `init` may not have its whole table yet
            let running = self.routers.running_addrs(rp);
            let replicas: Vec<SocketAddr> = if running.is_empty() {
                self.routers
                    .members(rp)
                    .iter()
                    .filter_map(Member::addr)
                    .collect()
            } else {
                running
            };
            if replicas.is_empty() {
                continue;
            }
            all.extend(replicas.iter().copied());
            let current = self.subscribed.get(&rp).copied();
            let keep =
                current.filter(|a| replicas.contains(a) && self.router_live.is_alive(a, now));
            let chosen = keep.unwrap_or_else(|| {
                // start at our own index (spreads brokers over replicas), skip dead ones
                (0..replicas.len())
                    .map(|i| replicas[(idx + i) % replicas.len()])
                    .find(|a| Some(*a) != current && self.router_live.is_alive(a, now))
                    .unwrap_or(replicas[idx % replicas.len()])
            });
            if current != Some(chosen) {
                tracing::info!(router_partition = rp, replica = %chosen, "subscribing to router replica");
                self.subscribed.insert(rp, chosen);
                self.synced.remove(&rp);
            }
            let seq = self.router_live.ping_sent(chosen, now);
            self.transport.send(
                chosen,
                wire::encode(&Message::Subscribe {
                    seq,
                    broker_partition: self.partition,
                    broker_partition_num: self.brokers.partition_num,
                }),
            );
        }
        self.router_live.retain(|a| all.contains(a));
    }

    /// `from` acknowledged our subscription: if we have not merged its table since subscribing
    /// to it, fetch it now. Updates it applied before our subscription reached it are in the
    /// snapshot; later ones are forwarded to us; the table's versioning makes the overlap harmless.
    fn sync_if_new(&mut self, from: SocketAddr) {
        let Some(rp) = self
            .subscribed
            .iter()
            .find(|(_, a)| **a == from)
            .map(|(p, _)| *p)
        else {
            return;
        };
        if self.synced.get(&rp) == Some(&from) || !self.syncing.insert(rp) {
            return;
        }
        let transport = self.transport.clone();
        let tx = self.sync_tx.clone();
        let req = Message::SnapshotRequest {
            partition: self.partition,
            partition_num: self.brokers.partition_num,
        };
        tokio::spawn(async move {
            let rows =
                match pixiu_runtime::ask(&transport, from, &req, Duration::from_secs(5)).await {
                    Ok(Message::Snapshot { rows }) => Some(rows),
                    Ok(other) => {
                        let e = pixiu_runtime::AskError::unexpected(from, &other, "snapshot");
                        tracing::warn!("loading the routing table from a router: {e}");
                        None
                    }
                    Err(e) => {
                        tracing::warn!("loading the routing table from a router: {e}");
                        None
                    }
                };
            let _ = tx
                .send(SyncResult {
                    router_partition: rp,
                    replica: from,
                    rows,
                })
                .await;
        });
    }

    fn apply_row(&mut self, row: RouteRow) {
        if partition_matches(row.key.hash(), self.partition, self.brokers.partition_num) {
            self.table.apply(row);
        }
    }

    fn on_inbound(&mut self, inbound: Inbound) {
        let (from, msg, bytes) = match inbound::decode(inbound, &self.metrics) {
            Some(Received::Message { from, msg, bytes }) => (from, msg, bytes),
            Some(Received::Request { from, msg, reply }) => {
                match msg {
                    Message::Redeliver { uid, items } => {
                        self.metrics.inc_in("redeliver");
                        let ev = inbox::Event::Redeliver { uid, items, reply };
                        if let Err(e) = self.inbox.try_send(ev) {
                            self.metrics.drop("inbox_event", "queue_full");
                            if let inbox::Event::Redeliver { reply, .. } = e.into_inner() {
                                reply.send(wire::encode(&Message::Unavailable {
                                    reason: "the broker's inbox queue is full".into(),
                                }));
                            }
                        }
                    }
                    other => {
                        inbound::unexpected(&self.metrics, "broker", from, &other, Some(reply))
                    }
                }
                return;
            }
            None => return,
        };
        match msg {
            Message::Room(m) => {
                self.metrics.inc_in("room");
                // the frame received is the frame to send: forward its bytes as they are
                let mut n = 0;
                for g in self.table.gateways(&m.key) {
                    if self.transport.send(g.addr, bytes.clone()) {
                        n += 1;
                    } else {
                        self.metrics.drop("room", "send_failed");
                    }
                }
                if n == 0 {
                    self.metrics.drop("room", "no_gateway");
                }
                self.metrics.add_out("room", n);
            }
            Message::TracedRoom { msg, mut trace } => {
                self.metrics.inc_in("room");
                let arrived = pixiu_protocol::trace::now_us();
                let gateways: Vec<SocketAddr> =
                    self.table.gateways(&msg.key).map(|g| g.addr).collect();
                trace.push(self.hop.stamp(arrived));
                let frame = wire::encode(&Message::TracedRoom { msg, trace });
                let n = gateways
                    .into_iter()
                    .filter(|g| self.transport.send(*g, frame.clone()))
                    .count();
                if n == 0 {
                    self.metrics.drop("room", "no_gateway");
                }
                self.metrics.add_out("room", n as u64);
            }
            Message::Gateway(u) => {
                self.metrics.inc_in("gateway_update");
                match self.buffered.as_mut() {
                    Some(buf) => buf.push(u),
                    None => self.on_update(u),
                }
            }
            Message::Notify { uid, .. } => self.to_inbox(inbox::Event::Notify { uid }),
            Message::DeviceOnline { gateway, devices } => {
                self.to_inbox(inbox::Event::Online { gateway, devices })
            }
            Message::DeviceOffline(dev) => self.to_inbox(inbox::Event::Offline(dev)),
            Message::DeviceAck { dev, id } => self.to_inbox(inbox::Event::Ack { dev, id }),
            Message::DeviceSync {
                gateway,
                dev,
                after,
            } => self.to_inbox(inbox::Event::Sync {
                gateway,
                dev,
                after,
            }),
            Message::Ping { seq } => {
                self.transport
                    .send(from, wire::encode(&Message::Pong { seq }));
            }
            Message::Pong { seq } => {
                self.router_live.pong(from, seq, Instant::now());
                self.sync_if_new(from);
            }
            other => inbound::unexpected(&self.metrics, "broker", from, &other, None),
        }
    }

    fn to_inbox(&self, ev: inbox::Event) {
        self.metrics.inc_in("inbox_event");
        if self.inbox.try_send(ev).is_err() {
            self.metrics.drop("inbox_event", "queue_full");
        }
    }

    fn on_update(&mut self, u: GatewayUpdate) {
        if !partition_matches(u.key.hash(), self.partition, self.brokers.partition_num) {
            self.metrics.drop("gateway_update", "wrong_partition");
            return;
        }
        if !self.table.apply(row_of(&u)) {
            self.metrics.drop("gateway_update", "stale");
        }
        // confirm to the gateway whenever the table reflects this update (or a newer one)
        if self.table.covers(&u.key, u.gateway.instance, u.id) {
            let ack = Message::RouteApplied {
                id: u.id,
                key: u.key,
                broker_partition: self.partition,
                broker_id: *self.my_id.borrow(),
            };
            self.transport.send(u.gateway.addr, wire::encode(&ack));
        }
    }
}
