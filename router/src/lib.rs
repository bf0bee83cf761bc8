//! The router: partitioned by room (`RoomID % N == PartitionID % N`), replicas without a
//! leader. A Gateway Message from a gateway is applied to the partition's routing table (kept
//! in RocksDB so a restarted router, and a starting broker, can load it), passed to the peer
//! replicas of the partition and to every broker that subscribed by heartbeat (seed 7.3).
//! Updates older than what the table holds for that gateway are dropped.
//!
//! Doubling (seed 7.2, 7.3): a replica of a partition beyond `partition_num` is a child; it
//! subscribes to its parent like a broker and loads the parent's rows of its share. When the
//! count grows every router keeps only its share and reports `serving` (ARCHITECTURE (m)).

mod store;

use pixiu_protocol::routing::partition_matches;
use pixiu_protocol::table::{row_of, GatewaySweeper, RouteTable};
use pixiu_protocol::wire::{self, GatewayUpdate, Message, RouteRow};
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
use tokio::sync::{mpsc, watch};

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

/// What a starting replica still waits for before it runs: the table of a running peer
/// replica, and, for a child of a doubling, its parent's share of rows.
#[derive(Default)]
struct Loading {
    peers_done: bool,
    /// `None`: not a child; `Some(false)`: a child that has not merged its parent's rows yet.
    parent_done: Option<bool>,
    parent_fetching: bool,
}

/// A child's subscription to a replica of its parent partition (seed 7.3: the parent forwards
/// every update of the child's share while the doubling is under way).
struct ParentLink {
    replica: SocketAddr,
    seq: u64,
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
    parent: Option<ParentLink>,
    loading: Option<Loading>,
    sync_tx: mpsc::Sender<Synced>,
}

/// Rows fetched for a starting replica: from a peer replica, or from the parent partition.
struct Synced {
    rows: Vec<RouteRow>,
    from_parent: bool,
}

/// Run a router in a given environment: load the table from RocksDB, register `init`, merge a
/// running peer replica's table (what this replica missed while it was down) and, for a child
/// of a doubling, its parent's rows of its share, then `running`.
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
    let (sync_tx, mut sync_rx) = mpsc::channel(4);
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
        parent: None,
        loading: Some(Loading::default()),
        sync_tx,
    };
    r.drop_rows_not_owned(r.routers.partition_num);
    r.start_loading();
    let mut sweeper = GatewaySweeper::default();
    let mut sweep = tokio::time::interval(Duration::from_millis(rc.sweep_interval_ms));
    let mut heartbeat = tokio::time::interval(PARENT_HEARTBEAT);
    let shutdown = service.shutdown.clone();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(msg) = inbound.recv() => r.on_inbound(msg),
            Some(synced) = sync_rx.recv() => {
                if r.on_synced(synced) {
                    service.set_state(NodeState::Running).await?;
                    service.set_serving(r.routers.partition_num).await?;
                }
            }
            Ok(()) = service.peers.changed() => {
                let view = service.peers.borrow_and_update().clone();
                if r.on_routers_changed(view) && r.loading.is_none() {
                    service.set_serving(r.routers.partition_num).await?;
                }
            }
            _ = heartbeat.tick() => r.heartbeat_parent(),
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

/// How often a child of a doubling renews its subscription to its parent (well inside the
/// parent's `subscriber_ttl_ms`).
const PARENT_HEARTBEAT: Duration = Duration::from_millis(500);

async fn sync_from_peers(
    transport: &Transport,
    peers: &[SocketAddr],
    partition: u32,
    partition_num: u32,
) -> Vec<RouteRow> {
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
    /// Is this replica's partition beyond the role's count, i.e. a child of a doubling under
    /// way? Its parent is partition `partition % partition_num`.
    fn is_child(&self) -> bool {
        let n = self.routers.partition_num;
        n > 0 && self.partition >= n
    }

    /// Start the start-up loads: a running peer replica's table now; a child's parent rows
    /// once the parent acknowledged its subscription ([`Router::heartbeat_parent`]).
    fn start_loading(&mut self) {
        let child = self.is_child();
        if let Some(l) = self.loading.as_mut() {
            l.parent_done = child.then_some(false);
        }
        let peers = self.peers(true);
        let (transport, tx) = (self.transport.clone(), self.sync_tx.clone());
        let (partition, num) = (self.partition, self.routers.partition_num);
        tokio::spawn(async move {
            let rows = sync_from_peers(&transport, &peers, partition, num).await;
            let _ = tx
                .send(Synced {
                    rows,
                    from_parent: false,
                })
                .await;
        });
        self.heartbeat_parent();
    }

    /// Merge fetched rows. True when this finished the start-up: the replica may run.
    fn on_synced(&mut self, synced: Synced) -> bool {
        let n = synced.rows.len();
        for row in synced.rows {
            self.apply_row(row);
        }
        let Some(l) = self.loading.as_mut() else {
            return false;
        };
        if synced.from_parent {
            l.parent_fetching = false;
            l.parent_done = Some(true);
            tracing::info!(rows = n, "merged the parent partition's rows of this share");
        } else {
            l.peers_done = true;
        }
        if !l.peers_done || l.parent_done == Some(false) {
            return false;
        }
        self.loading = None;
        tracing::info!(synced_rows = n, rows = self.table.len(), "router running");
        true
    }

    /// A child subscribes to a running replica of its parent partition, like a broker does,
    /// for the rows of its share; its parent's Pong starts the parent snapshot fetch.
    fn heartbeat_parent(&mut self) {
        if !self.is_child() {
            self.parent = None;
            return;
        }
        let n = self.routers.partition_num;
        let running = self.routers.running_addrs(self.partition % n);
        let keep = self
            .parent
            .as_ref()
            .map(|l| l.replica)
            .filter(|a| running.contains(a));
        let Some(replica) = keep.or_else(|| running.first().copied()) else {
            self.metrics.drop("parent_subscribe", "no_running_parent");
            return;
        };
        let seq = self.parent.as_ref().map_or(1, |l| l.seq + 1);
        self.parent = Some(ParentLink { replica, seq });
        let subscribe = Message::Subscribe {
            seq,
            broker_partition: self.partition,
            broker_partition_num: n * 2,
        };
        self.transport.send(replica, wire::encode(&subscribe));
    }

    /// The parent acknowledged the subscription: from now on it forwards every update of our
    /// share, so a snapshot taken now misses nothing.
    fn on_parent_pong(&mut self, from: SocketAddr) {
        let Some(link) = self.parent.as_ref().filter(|l| l.replica == from) else {
            return;
        };
        let Some(l) = self.loading.as_mut() else {
            return;
        };
        if l.parent_done != Some(false) || l.parent_fetching {
            return;
        }
        l.parent_fetching = true;
        let (transport, tx, replica) = (self.transport.clone(), self.sync_tx.clone(), link.replica);
        let (partition, num) = (self.partition, self.routers.partition_num * 2);
        tokio::spawn(async move {
            let rows = sync_from_peers(&transport, &[replica], partition, num).await;
            let _ = tx
                .send(Synced {
                    rows,
                    from_parent: true,
                })
                .await;
        });
    }

    /// The router view changed. When `partition_num` grew (a doubling took effect), drop the
    /// rows no longer this partition's and stop following a parent. True when the count
    /// this replica works under changed.
    fn on_routers_changed(&mut self, view: Arc<RoleView>) -> bool {
        let grew = view.partition_num > self.routers.partition_num;
        self.routers = view;
        if grew {
            self.drop_rows_not_owned(self.routers.partition_num);
            self.heartbeat_parent();
        }
        grew
    }

    /// Keep only the rows of this partition under `partition_num` (in memory and on disk).
    fn drop_rows_not_owned(&mut self, partition_num: u32) {
        if partition_num == 0 || self.partition >= partition_num {
            return;
        }
        let dropped = self.table.retain_partition(self.partition, partition_num);
        if dropped.is_empty() {
            return;
        }
        if let Err(e) = self.store.delete_rows(&dropped) {
            tracing::error!("deleting rows no longer this partition's: {e}");
        }
        tracing::info!(
            partition_num,
            rows = dropped.len(),
            "dropped the rows of rooms no longer this partition's"
        );
        self.metrics
            .set_queue("table_rows", self.table.len() as i64);
    }

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

    fn apply_row(&mut self, row: RouteRow) -> bool {
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
            (Message::Pong { .. }, None) => self.on_parent_pong(from),
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
