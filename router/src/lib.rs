//! The router: partitioned by room (`RoomID % N == PartitionID % N`), replicas without a
//! leader. A Gateway Message from a gateway is applied to the partition's routing table (kept
//! in RocksDB so a restarted router, and a starting broker, can load it), passed to the peer
//! replicas of the partition and to every broker that subscribed by heartbeat (seed 7.3).
//! Updates older than what the table holds for that gateway are dropped.

mod store;

use pixiu_protocol::routing::partition_matches;
use pixiu_protocol::table::{row_of, GatewaySweeper, RouteTable};
use pixiu_protocol::wire::{self, GatewayUpdate, Message};
use pixiu_registry::{Member, NodeState, Role, RoleView};
use pixiu_runtime::inbound;
use pixiu_runtime::{CommonConfig, NodeEnv, Registering, RoleMetrics, Service, Shutdown};
use pixiu_transport::{Inbound, Transport};
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub use store::Store;

/// Router settings (TOML keys and flags of the same names).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterConfig {
    pub partition: u32,
    pub data_dir: PathBuf,
    /// A broker that has not sent a heartbeat for this long is no longer forwarded to.
    pub subscriber_ttl_ms: u64,
    /// How often rows of gateways gone from the registry are looked for.
    pub sweep_interval_ms: u64,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            partition: 0,
            data_dir: PathBuf::from("./data/router"),
            subscriber_ttl_ms: 3000,
            sweep_interval_ms: 5000,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub common: CommonConfig,
    pub router: RouterConfig,
}

pixiu_runtime::service_error! {
    #[error("storage: {0}")]
    Store(#[from] store::StoreError),
}

/// What the router refuses in its own settings before it starts (`--check-config` too).
pub fn check(config: &Config) -> Result<(), Error> {
    pixiu_runtime::config::at_least(&[
        ("sweep_interval_ms", config.router.sweep_interval_ms, 100),
        ("subscriber_ttl_ms", config.router.subscriber_ttl_ms, 100),
    ])
    .map_err(Error::Config)
}

/// Run a router against ZooKeeper until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), Error> {
    pixiu_runtime::in_own_process(&config.common.clone(), config, shutdown, run_with).await
}

struct Subscriber {
    partition: u32,
    partition_num: u32,
    last_seen: Instant,
}

struct Router {
    partition: u32,
    my_id: watch::Receiver<u64>,
    transport: Transport,
    metrics: RoleMetrics,
    store: Store,
    table: RouteTable,
    subscribers: HashMap<SocketAddr, Subscriber>,
    routers: Arc<RoleView>,
    subscriber_ttl: Duration,
}

/// Run a router in a given environment: load the table from RocksDB, register `init`, merge a
/// running peer replica's table (what this replica missed while it was down), then `running`.
pub async fn run_with(config: Config, env: NodeEnv, shutdown: Shutdown) -> Result<(), Error> {
    check(&config)?;
    let rc = config.router.clone();
    let store = Store::open(&rc.data_dir.join(format!("routes-p{}", rc.partition)))?;
    let mut table = RouteTable::new();
    for row in store.load()? {
        table.apply(row);
    }
    tracing::info!(rows = table.len(), "loaded the routing table from RocksDB");
    let me = Registering::partition(Role::Router, rc.partition);
    let (mut service, mut inbound) = Service::start(env, &config.common, me, shutdown).await?;
    let mut gateways_rx = service.watch(Role::Gateway).await?;
    let mut r = Router {
        partition: rc.partition,
        my_id: service.id_watch(),
        transport: service.transport.clone(),
        metrics: service.metrics.clone(),
        store,
        table,
        subscribers: HashMap::new(),
        routers: service.peers.borrow_and_update().clone(),
        subscriber_ttl: Duration::from_millis(rc.subscriber_ttl_ms),
    };
    let (sync_tx, mut sync_rx) = tokio::sync::mpsc::channel(1);
    {
        let peers = r.peers(true);
        let transport = r.transport.clone();
        let (partition, num) = (r.partition, r.routers.partition_num);
        tokio::spawn(async move {
            let rows = sync_from_peers(&transport, &peers, partition, num).await;
            let _ = sync_tx.send(rows).await;
        });
    }
    let mut sweeper = GatewaySweeper::default();
    let mut sweep = tokio::time::interval(Duration::from_millis(rc.sweep_interval_ms));
    let mut running = false;
    let shutdown = service.shutdown.clone();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(msg) = inbound.recv() => r.on_inbound(msg),
            Some(rows) = sync_rx.recv(), if !running => {
                let n = rows.len();
                for row in rows {
                    r.apply_row(row);
                }
                service.set_state(NodeState::Running).await?;
                running = true;
                tracing::info!(synced_rows = n, rows = r.table.len(), "router running");
            }
            Ok(()) = service.peers.changed() => {
                r.routers = service.peers.borrow_and_update().clone();
            }
            _ = sweep.tick() => {
                let live: HashSet<u64> = gateways_rx.borrow_and_update().all().map(|(_, m)| m.id).collect();
                r.sweep(&mut sweeper, &live);
            }
        }
    }
    service
        .drain(async {
            if let Err(e) = r.store.flush() {
                tracing::error!("flushing RocksDB: {e}");
            }
        })
        .await;
    Ok(())
}

async fn sync_from_peers(
    transport: &Transport,
    peers: &[SocketAddr],
    partition: u32,
    partition_num: u32,
) -> Vec<pixiu_protocol::wire::RouteRow> {
    let req = Message::SnapshotRequest {
        partition,
        partition_num,
    };
    for peer in peers {
        match pixiu_runtime::ask(transport, *peer, &req, Duration::from_secs(5)).await {
            Ok(Message::Snapshot { rows }) => {
                tracing::info!(%peer, rows = rows.len(), "synced the routing table from a peer replica");
                return rows;
            }
            Ok(other) => tracing::warn!(
                "{}",
                pixiu_runtime::AskError::unexpected(*peer, &other, "snapshot")
            ),
            Err(e) => tracing::warn!("syncing the routing table from a peer: {e}"),
        }
    }
    if !peers.is_empty() {
        tracing::warn!("no peer replica answered; starting from the local table only");
    }
    Vec::new()
}

impl Router {
    /// Peer replicas of this partition (running only when `running_only`).
    fn peers(&self, running_only: bool) -> Vec<SocketAddr> {
        let me = *self.my_id.borrow();
        self.routers
            .members(self.partition)
            .iter()
            .filter(|m| m.id != me)
            .filter(|m| !running_only || m.is_running())
            .filter_map(Member::addr)
            .collect()
    }

    fn apply_row(&mut self, row: pixiu_protocol::wire::RouteRow) -> bool {
        if !self.table.apply(row.clone()) {
            return false;
        }
        if let Err(e) = self.store.put(&row) {
            self.metrics.drop("store", "write_failed");
            tracing::error!("writing a route to RocksDB: {e}");
        }
        true
    }

    /// Forget the rows of gateways gone from the registry; drop silent subscribers.
    fn sweep(&mut self, sweeper: &mut GatewaySweeper, live: &HashSet<u64>) {
        let gone = sweeper.sweep(&mut self.table, live);
        if !gone.is_empty() {
            tracing::info!(
                rows = gone.len(),
                "forgot rows of gateways that left the registry"
            );
            if let Err(e) = self.store.delete_rows(&gone) {
                tracing::error!("deleting rows of departed gateways: {e}");
            }
        }
        let ttl = self.subscriber_ttl;
        self.subscribers.retain(|_, s| s.last_seen.elapsed() <= ttl);
        self.metrics
            .set_queue("subscribers", self.subscribers.len() as i64);
        self.metrics
            .set_queue("table_rows", self.table.len() as i64);
    }

    fn on_inbound(&mut self, inbound: Inbound) {
        let Some(received) = inbound::decode(inbound, &self.metrics) else {
            return;
        };
        let (from, msg, reply) = received.into_parts();
        match (msg, reply) {
            (
                Message::SnapshotRequest {
                    partition,
                    partition_num,
                },
                Some(reply),
            ) => {
                self.metrics.inc_in("snapshot_request");
                let rows = self.table.rows_for(partition, partition_num);
                reply.send(wire::encode(&Message::Snapshot { rows }));
            }
            (msg, reply @ Some(_)) => {
                inbound::unexpected(&self.metrics, "router", from, &msg, reply);
            }
            (Message::Ping { seq }, None) => {
                self.transport
                    .send(from, wire::encode(&Message::Pong { seq }));
            }
            (
                Message::Subscribe {
                    seq,
                    broker_partition,
                    broker_partition_num,
                },
                None,
            ) => {
                self.metrics.inc_in("subscribe");
                self.subscribers.insert(
                    from,
                    Subscriber {
                        partition: broker_partition,
                        partition_num: broker_partition_num,
                        last_seen: Instant::now(),
                    },
                );
                self.transport
                    .send(from, wire::encode(&Message::Pong { seq }));
            }
            (Message::Gateway(u), None) => self.on_gateway_update(u),
            (msg, None) => inbound::unexpected(&self.metrics, "router", from, &msg, None),
        }
    }

    fn on_gateway_update(&mut self, u: GatewayUpdate) {
        let stage = if u.forwarded {
            "peer_update"
        } else {
            "gateway_update"
        };
        self.metrics.inc_in(stage);
        if !partition_matches(u.key.hash(), self.partition, self.routers.partition_num) {
            self.metrics.drop(stage, "wrong_partition");
            return;
        }
        if !self.apply_row(row_of(&u)) {
            self.metrics.drop(stage, "stale");
            return;
        }
        if !u.forwarded {
            let fwd = wire::encode(&Message::Gateway(GatewayUpdate {
                forwarded: true,
                ..u.clone()
            }));
            for peer in self.peers(false) {
                self.transport.send(peer, fwd.clone());
                self.metrics.inc_out("peer_update");
            }
        }
        let hash = u.key.hash();
        let bytes = wire::encode(&Message::Gateway(u));
        let ttl = self.subscriber_ttl;
        for (addr, s) in &self.subscribers {
            if s.last_seen.elapsed() <= ttl && partition_matches(hash, s.partition, s.partition_num)
            {
                self.transport.send(*addr, bytes.clone());
                self.metrics.inc_out("broker_update");
            }
        }
    }
}
