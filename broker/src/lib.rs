//! The broker: partitioned by room (`BrokerPartitionID = RoomID % N`), replicas without a
//! leader. It registers `init`, subscribes by heartbeat to the router replicas that carry its
//! rooms (seed 7.4), loads its partition's table from a router while buffering the updates that
//! arrive meanwhile, replays them, and only then turns `running`. A room message from a proxy
//! goes once to each gateway that has members in the room.

use pixiu_protocol::routing::{partition_matches, router_partitions_for_broker};
use pixiu_protocol::table::{row_of, GatewaySweeper, RouteTable};
use pixiu_protocol::wire::{self, GatewayUpdate, Message, RouteRow};
use pixiu_registry::{NodeInfo, NodeState, Role, RoleView};
use pixiu_runtime::{admin, CommonConfig, Liveness, NodeEnv, RoleMetrics, Shutdown};
use pixiu_transport::{Inbound, Transport, TransportConfig};
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
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            partition: 0,
            heartbeat_interval_ms: 500,
            heartbeat_timeout_ms: 1500,
            sweep_interval_ms: 5000,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub common: CommonConfig,
    pub broker: BrokerConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Runtime(#[from] pixiu_runtime::RuntimeError),
    #[error("registry: {0}")]
    Registry(#[from] pixiu_registry::RegistryError),
    #[error("transport: {0}")]
    Transport(#[from] pixiu_transport::TransportError),
}

/// Run a broker against ZooKeeper until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), Error> {
    let env = NodeEnv::from_common(&config.common).await?;
    if let Some(addr) = config.common.admin {
        admin::serve(addr, vec![env.health.clone()], env.metrics.clone(), shutdown.clone())
            .await
            .map_err(|e| Error::Config(format!("cannot serve admin on {addr}: {e}")))?;
    }
    let registry = env.registry.clone();
    let res = run_with(config, env, shutdown).await;
    registry.close().await;
    res
}

struct Broker {
    partition: u32,
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
}

/// Run a broker in a given environment.
pub async fn run_with(config: Config, env: NodeEnv, shutdown: Shutdown) -> Result<(), Error> {
    let bc = config.broker.clone();
    let metrics = RoleMetrics::new(&env.metrics, "broker");
    let (transport, mut inbound) =
        Transport::bind(TransportConfig::new(config.common.listen, (*env.tls).clone())).await?;
    let node_addr = transport.local_addr();
    pixiu_runtime::export_transport_stats(transport.clone(), metrics.clone(), shutdown.clone());
    let mut routers_rx = env.registry.watch(Role::Router).await?;
    let mut brokers_rx = env.registry.watch(Role::Broker).await?;
    let mut gateways_rx = env.registry.watch(Role::Gateway).await?;
    let registration = env
        .registry
        .register(
            Role::Broker,
            Some(bc.partition),
            NodeInfo {
                addr: node_addr.to_string(),
                state: NodeState::Init,
                admin: config.common.admin.map(|a| a.to_string()),
                client_url: None,
                http: None,
                load: 0,
            },
        )
        .await?;
    tracing::info!(id = registration.id(), partition = bc.partition, %node_addr, "broker registered (init)");

    let mut b = Broker {
        partition: bc.partition,
        my_id: registration.id_watch(),
        transport: transport.clone(),
        metrics,
        table: RouteTable::new(),
        buffered: Some(Vec::new()),
        brokers: brokers_rx.borrow_and_update().clone(),
        routers: routers_rx.borrow_and_update().clone(),
        router_live: Liveness::new(Duration::from_millis(bc.heartbeat_timeout_ms)),
        subscribed: HashMap::new(),
    };
    b.subscribe();

    let (load_tx, mut load_rx) = mpsc::channel::<Vec<RouteRow>>(1);
    spawn_loader(&b, routers_rx.clone(), load_tx.clone(), shutdown.clone());

    let mut heartbeat = tokio::time::interval(Duration::from_millis(bc.heartbeat_interval_ms.max(10)));
    let mut sweep = tokio::time::interval(Duration::from_millis(bc.sweep_interval_ms.max(100)));
    let mut sweeper = GatewaySweeper::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(msg) = inbound.recv() => b.on_inbound(msg),
            Some(rows) = load_rx.recv() => {
                let n = rows.len();
                for row in rows {
                    b.apply_row(row);
                }
                let buffered = b.buffered.take().unwrap_or_default();
                let replayed = buffered.len();
                for u in buffered {
                    b.on_update(u);
                }
                registration.set_state(NodeState::Running).await?;
                env.health.set_ready(true);
                tracing::info!(loaded = n, replayed, live_keys = b.table.live_keys(), "broker running");
            }
            _ = heartbeat.tick() => b.subscribe(),
            Ok(()) = routers_rx.changed() => {
                b.routers = routers_rx.borrow_and_update().clone();
            }
            Ok(()) = brokers_rx.changed() => {
                let new = brokers_rx.borrow_and_update().clone();
                if new.partition_num > b.brokers.partition_num && b.brokers.partition_num > 0 {
                    let dropped = b.table.retain_partition(b.partition, new.partition_num);
                    tracing::info!(partition_num = new.partition_num, rows = dropped.len(), "partition count grew; dropped rows of rooms no longer ours");
                }
                b.brokers = new;
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
    env.health.set_ready(false);
    tracing::info!("broker draining");
    if let Err(e) = registration.deregister().await {
        tracing::warn!("deregistering: {e}");
    }
    transport.close().await;
    Ok(())
}

/// Load this partition's table from one running replica of each router partition that carries
/// its rooms; retries until every one answered.
fn spawn_loader(
    b: &Broker,
    mut routers_rx: watch::Receiver<Arc<RoleView>>,
    out: mpsc::Sender<Vec<RouteRow>>,
    shutdown: Shutdown,
) {
    let transport = b.transport.clone();
    let partition = b.partition;
    let broker_num = b.brokers.partition_num;
    tokio::spawn(async move {
        let mut attempt = 0u32;
        loop {
            let routers = routers_rx.borrow_and_update().clone();
            let parts = router_partitions_for_broker(
                partition,
                broker_num,
                routers.partition_num,
                routers.partitions.keys().copied(),
            );
            let mut rows = Vec::new();
            let mut complete = !parts.is_empty();
            for rp in parts {
                let mut got = false;
                for m in routers.running(rp) {
                    let Ok(addr) = m.info.addr.parse::<SocketAddr>() else { continue };
                    let req = wire::encode(&Message::SnapshotRequest {
                        partition,
                        partition_num: broker_num,
                    });
                    match transport.request(addr, req, Duration::from_secs(5)).await {
                        Ok(bytes) => match wire::decode(&bytes) {
                            Ok(Message::Snapshot { rows: r }) => {
                                rows.extend(r);
                                got = true;
                                break;
                            }
                            Ok(other) => tracing::warn!(%addr, kind = other.kind(), "router refused the snapshot"),
                            Err(e) => tracing::warn!(%addr, "bad snapshot: {e}"),
                        },
                        Err(e) => tracing::warn!(%addr, "snapshot request failed: {e}"),
                    }
                }
                complete &= got;
            }
            if complete {
                let _ = out.send(rows).await;
                return;
            }
            attempt += 1;
            if attempt % 10 == 1 {
                tracing::warn!("waiting for a running router replica of every partition to load the table from");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                _ = routers_rx.changed() => {}
            }
        }
    });
}

impl Broker {
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
        for rp in parts {
            let replicas: Vec<SocketAddr> = self
                .routers
                .members(rp)
                .iter()
                .filter_map(|m| m.info.addr.parse().ok())
                .collect();
            if replicas.is_empty() {
                continue;
            }
            all.extend(replicas.iter().copied());
            let current = self.subscribed.get(&rp).copied();
            let keep = current.filter(|a| replicas.contains(a) && self.router_live.is_alive(a, now));
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

    fn apply_row(&mut self, row: RouteRow) {
        if partition_matches(row.key.hash(), self.partition, self.brokers.partition_num) {
            self.table.apply(row);
        }
    }

    fn on_inbound(&mut self, inbound: Inbound) {
        let (from, bytes) = match inbound {
            Inbound::Message { from, bytes } => (from, bytes),
            Inbound::Request { reply, .. } => {
                self.metrics.drop("request", "unexpected");
                reply.send(wire::encode(&Message::Refused {
                    reason: "a broker serves no requests".into(),
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
            Message::Room(m) => {
                self.metrics.inc_in("room");
                let bytes = wire::encode(&Message::Room(m.clone()));
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
            Message::Gateway(u) => {
                self.metrics.inc_in("gateway_update");
                match self.buffered.as_mut() {
                    Some(buf) => buf.push(u),
                    None => self.on_update(u),
                }
            }
            Message::Ping { seq } => {
                self.transport.send(from, wire::encode(&Message::Pong { seq }));
            }
            Message::Pong { seq } => self.router_live.pong(from, seq, Instant::now()),
            other => {
                self.metrics.drop("decode", "unexpected_kind");
                tracing::debug!(%from, kind = other.kind(), "unexpected message");
            }
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
