//! Service registry of a PiXiu cluster.
//!
//! Every PiXiu node (proxy, broker, router, gateway, xiu, pi) registers itself here and discovers
//! its peers here. Two backends share one API:
//!
//! * [`Registry::zookeeper`]: the production backend. The layout in ZooKeeper is an external
//!   contract: under `/pixiu/<cluster>/` one folder per role; partitioned roles (broker, router,
//!   xiu, pi) keep a `partition_num` node (decimal power of two) and one `partition<N>` folder per
//!   partition holding one ephemeral sequential `node-<10 digits>` per replica, whose data is the
//!   JSON form of [`NodeInfo`]. Non-partitioned roles (proxy, gateway) keep their `node-` children
//!   directly in the role folder. A replica's id is the sequence number ZooKeeper gave it.
//!   Session expiry is recovered from: a new session is created, every live [`Registration`] is
//!   re-created (getting a new id, published through [`Registration::id_watch`]) and all views are
//!   re-read.
//! * [`Registry::embedded`]: an in-process registry with the same semantics, for the
//!   single-process standalone mode and for unit tests.
//!
//! Views ([`Registry::watch`]) are kept up to date by a persistent recursive watch plus a periodic
//! re-read, and are only published when they change.

mod embedded;
mod zk;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The role of a node in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Proxy,
    Broker,
    Router,
    Gateway,
    Xiu,
    Pi,
}

impl Role {
    /// Every role, in a fixed order.
    pub const ALL: [Role; 6] = [
        Role::Proxy,
        Role::Broker,
        Role::Router,
        Role::Gateway,
        Role::Xiu,
        Role::Pi,
    ];

    /// Name of the role, also the name of its ZooKeeper folder.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Proxy => "proxy",
            Role::Broker => "broker",
            Role::Router => "router",
            Role::Gateway => "gateway",
            Role::Xiu => "xiu",
            Role::Pi => "pi",
        }
    }

    /// Whether the role is split into partitions (broker, router, xiu, pi).
    pub fn is_partitioned(&self) -> bool {
        matches!(self, Role::Broker | Role::Router | Role::Xiu | Role::Pi)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| RegistryError::BadData(format!("unknown role {s:?}")))
    }
}

/// Lifecycle state of a replica, as published in its node data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Init,
    Running,
}

/// The data of a registered node (stored as JSON in its znode).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node-to-node QUIC address, `ip:port`.
    pub addr: String,
    pub state: NodeState,
    /// Admin / metrics HTTP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
    /// Gateway: URL clients connect to, e.g. `ws://host:port/v1/ws`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_url: Option<String>,
    /// Proxy: publisher HTTP API address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// Load figure, e.g. a gateway's connection count.
    #[serde(default)]
    pub load: u64,
    /// The 10-bit snowflake instance this node mints message ids with (gateways and proxies),
    /// so that a new node can pick one no live node uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<u16>,
    /// The role's `partition_num` this replica works under: it routes by it and has dropped
    /// what that count no longer gives its partition. `pixiu-ctl scale-out` waits for every
    /// replica to report the doubled count. `None` for roles that do not report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<u32>,
}

impl NodeInfo {
    /// A node in state [`NodeState::Init`] with only its address set.
    pub fn new(addr: impl Into<String>) -> NodeInfo {
        NodeInfo {
            addr: addr.into(),
            state: NodeState::Init,
            admin: None,
            client_url: None,
            http: None,
            load: 0,
            instance: None,
            serving: None,
        }
    }
}

/// One registered replica as seen in a view.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    /// Sequence number ZooKeeper (or the embedded registry) gave the node.
    pub id: u64,
    /// Znode name, `node-<10 digits>`.
    pub name: String,
    pub info: NodeInfo,
}

impl Member {
    /// The node-to-node address; `None` when the registered text is not `ip:port` (such a
    /// node cannot be reached, so callers skip it).
    pub fn addr(&self) -> Option<std::net::SocketAddr> {
        self.info.addr.parse().ok()
    }

    /// Is the node in state [`NodeState::Running`]?
    pub fn is_running(&self) -> bool {
        self.info.state == NodeState::Running
    }
}

/// Snapshot of one role.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoleView {
    /// Number of partitions; 1 for non-partitioned roles; 0 if not initialised.
    pub partition_num: u32,
    /// Members per partition, each sorted by id. Non-partitioned roles use key 0. Partitions that
    /// exist as folders appear even if empty.
    pub partitions: BTreeMap<u32, Vec<Member>>,
}

impl RoleView {
    /// Members of a partition sorted by id (empty if the partition does not exist).
    pub fn members(&self, partition: u32) -> &[Member] {
        self.partitions
            .get(&partition)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Members of a partition in state [`NodeState::Running`], sorted by id.
    pub fn running(&self, partition: u32) -> Vec<&Member> {
        self.members(partition)
            .iter()
            .filter(|m| m.is_running())
            .collect()
    }

    /// Addresses of the running members of a partition, by id.
    pub fn running_addrs(&self, partition: u32) -> Vec<std::net::SocketAddr> {
        self.members(partition)
            .iter()
            .filter(|m| m.is_running())
            .filter_map(Member::addr)
            .collect()
    }

    /// Addresses of every member of the role, whatever its partition or state.
    pub fn all_addrs(&self) -> std::collections::HashSet<std::net::SocketAddr> {
        self.all().filter_map(|(_, m)| m.addr()).collect()
    }

    /// The address of a partition's leader (its smallest id), if it has one.
    pub fn leader_addr(&self, partition: u32) -> Option<std::net::SocketAddr> {
        self.leader(partition).and_then(Member::addr)
    }

    /// Every member with its partition, by partition then id.
    pub fn all(&self) -> impl Iterator<Item = (u32, &Member)> {
        self.partitions
            .iter()
            .flat_map(|(p, ms)| ms.iter().map(move |m| (*p, m)))
    }

    /// The leader of a partition of a leader-based role (Xiu, Pi): the member with the
    /// smallest id, whatever its state (seed 8.2.3). A leader still taking over answers
    /// `Unavailable` until it is ready.
    pub fn leader(&self, partition: u32) -> Option<&Member> {
        self.members(partition).first()
    }

    /// Finds a member by partition and id.
    pub fn get(&self, partition: u32, id: u64) -> Option<&Member> {
        self.members(partition).iter().find(|m| m.id == id)
    }
}

/// Resolves once `view` names another leader than the one at `leader` for `partition` (or
/// none); never, if the view stops changing. For racing a request to a leader that may have
/// been killed: it will never answer, and its successor is known as soon as its session
/// expires.
pub async fn leader_changes(
    mut view: watch::Receiver<Arc<RoleView>>,
    partition: u32,
    leader: std::net::SocketAddr,
) {
    loop {
        let now = view.borrow_and_update().leader_addr(partition);
        if now != Some(leader) {
            return;
        }
        if view.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Partition counts of the partitioned roles (each a power of two).
#[derive(Clone, Debug)]
pub struct Layout {
    pub broker_partitions: u32,
    pub router_partitions: u32,
    pub xiu_partitions: u32,
    pub pi_partitions: u32,
}

impl Default for Layout {
    /// One partition per partitioned role.
    fn default() -> Self {
        Layout {
            broker_partitions: 1,
            router_partitions: 1,
            xiu_partitions: 1,
            pi_partitions: 1,
        }
    }
}

impl Layout {
    /// Partition count of a role (`None` for non-partitioned roles).
    pub fn partitions(&self, role: Role) -> Option<u32> {
        match role {
            Role::Broker => Some(self.broker_partitions),
            Role::Router => Some(self.router_partitions),
            Role::Xiu => Some(self.xiu_partitions),
            Role::Pi => Some(self.pi_partitions),
            Role::Proxy | Role::Gateway => None,
        }
    }

    fn validate(&self) -> Result<(), RegistryError> {
        for role in Role::ALL {
            if let Some(n) = self.partitions(role) {
                check_power_of_two(n)?;
            }
        }
        Ok(())
    }
}

/// Settings of the ZooKeeper backend.
#[derive(Clone, Debug)]
pub struct ZkConfig {
    /// Connect string, e.g. `10.0.0.1:2181,10.0.0.2:2181`.
    pub hosts: String,
    /// Cluster name: the registry lives under `/pixiu/<cluster>`.
    pub cluster: String,
    /// Requested session timeout (default 6 s).
    pub session_timeout: Duration,
    /// Period of the safety re-read of watched views (default 2 s).
    pub refresh_interval: Duration,
}

impl ZkConfig {
    /// Config with default timeouts.
    pub fn new(hosts: impl Into<String>, cluster: impl Into<String>) -> ZkConfig {
        ZkConfig {
            hosts: hosts.into(),
            cluster: cluster.into(),
            session_timeout: Duration::from_secs(6),
            refresh_interval: Duration::from_secs(2),
        }
    }
}

/// A doubling of a role by `pixiu-ctl scale-out`, recorded before its flip and again when it
/// completed, so that a rerun after the tool was stopped half-way knows what to finish.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Doubling {
    pub from: u32,
    pub to: u32,
    /// When every replica served `to`, unix milliseconds; `None` while under way.
    #[serde(default)]
    pub done_ms: Option<u64>,
}

/// Errors of the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("zookeeper error: {0}")]
    Zk(#[from] zookeeper_client::Error),
    #[error("cannot connect to zookeeper at {hosts}: {reason}")]
    Connect { hosts: String, reason: String },
    #[error("registry operation timed out")]
    Timeout,
    #[error(
        "cluster layout already initialised with {role} partition_num={existing}, wanted {wanted}"
    )]
    AlreadyInitialized {
        role: Role,
        existing: u32,
        wanted: u32,
    },
    #[error("partition count {0} is not a power of two")]
    NotPowerOfTwo(u32),
    #[error("cluster layout is not initialised")]
    NotInitialized,
    #[error("role {0} is partitioned: a partition is required")]
    PartitionRequired(Role),
    #[error("role {0} is not partitioned")]
    NotPartitioned(Role),
    #[error("bad registry data: {0}")]
    BadData(String),
    /// A conditional change of `partition_num` found another value than the one it was
    /// based on: someone else changed it first.
    #[error("{role} partition_num is {found}, not {expected}: it was changed meanwhile")]
    PartitionNumChanged {
        role: Role,
        expected: u32,
        found: u32,
    },
    #[error("invalid cluster name {0:?}")]
    InvalidCluster(String),
    #[error("registry closed")]
    Closed,
}

/// Before `init` writes anything: a role whose count is already set must have the one wanted
/// (`existing` gives the count set now, if any).
pub(crate) fn check_layout(
    layout: &Layout,
    existing: impl Fn(Role) -> Option<u32>,
) -> Result<(), RegistryError> {
    for role in Role::ALL {
        if let (Some(wanted), Some(existing)) = (layout.partitions(role), existing(role)) {
            if existing != wanted {
                return Err(RegistryError::AlreadyInitialized {
                    role,
                    existing,
                    wanted,
                });
            }
        }
    }
    Ok(())
}

pub(crate) fn check_power_of_two(n: u32) -> Result<(), RegistryError> {
    if n.is_power_of_two() {
        Ok(())
    } else {
        Err(RegistryError::NotPowerOfTwo(n))
    }
}

/// Sequence number of a `node-<digits>` name.
pub(crate) fn parse_node_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("node-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Partition number of a `partition<N>` folder name.
pub(crate) fn parse_partition_name(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("partition")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked while holding it; the data (plain
    // bookkeeping) is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Publishes `view` if it differs from the current one.
pub(crate) fn publish(tx: &watch::Sender<Arc<RoleView>>, view: RoleView) -> bool {
    tx.send_if_modified(|cur| {
        if **cur == view {
            false
        } else {
            *cur = Arc::new(view);
            true
        }
    })
}

/// Partition key used for a registration: checks the (role, partition) combination.
fn partition_key(role: Role, partition: Option<u32>) -> Result<u32, RegistryError> {
    match (role.is_partitioned(), partition) {
        (true, Some(p)) => Ok(p),
        (true, None) => Err(RegistryError::PartitionRequired(role)),
        (false, None | Some(0)) => Ok(0),
        (false, Some(_)) => Err(RegistryError::NotPartitioned(role)),
    }
}

#[derive(Clone)]
pub(crate) enum Backend {
    Zk(Arc<zk::ZkShared>),
    Embedded(Arc<embedded::EmbShared>),
}

struct RegistryInner {
    backend: Backend,
}

impl Drop for RegistryInner {
    fn drop(&mut self) {
        if let Backend::Zk(zk) = &self.backend {
            zk.shutdown_now();
        }
    }
}

/// Handle to the cluster registry. Cheap to clone; the ZooKeeper session lives while any clone
/// (or any [`Registration`]) lives, or until [`Registry::close`].
#[derive(Clone)]
pub struct Registry {
    inner: Arc<RegistryInner>,
}

impl Registry {
    /// Connects to ZooKeeper. Fails with [`RegistryError::Connect`] after at most 10 s if the
    /// ensemble is unreachable.
    pub async fn zookeeper(cfg: ZkConfig) -> Result<Registry, RegistryError> {
        let shared = zk::ZkShared::connect(cfg).await?;
        Ok(Registry {
            inner: Arc::new(RegistryInner {
                backend: Backend::Zk(shared),
            }),
        })
    }

    /// In-process registry with the same semantics, without ZooKeeper. Clones share the same
    /// tree; separate calls create separate trees.
    pub fn embedded(cluster: &str) -> Registry {
        let shared = Arc::new(embedded::EmbShared::new(cluster));
        Registry {
            inner: Arc::new(RegistryInner {
                backend: Backend::Embedded(shared),
            }),
        }
    }

    fn backend(&self) -> &Backend {
        &self.inner.backend
    }

    /// Cluster name.
    pub fn cluster(&self) -> &str {
        match self.backend() {
            Backend::Zk(z) => &z.cluster,
            Backend::Embedded(e) => &e.cluster,
        }
    }

    /// Creates the layout. Idempotent when the counts match; fails with
    /// [`RegistryError::AlreadyInitialized`] naming the first differing role when a
    /// `partition_num` already exists with another value (nothing is written then). Counts must
    /// be powers of two.
    pub async fn init_layout(&self, layout: &Layout) -> Result<(), RegistryError> {
        layout.validate()?;
        match self.backend() {
            Backend::Zk(z) => z.init_layout(layout).await,
            Backend::Embedded(e) => e.init_layout(layout),
        }
    }

    /// Whether every partitioned role has a `partition_num`.
    pub async fn is_initialized(&self) -> Result<bool, RegistryError> {
        match self.backend() {
            Backend::Zk(z) => z.is_initialized().await,
            Backend::Embedded(e) => Ok(e.is_initialized()),
        }
    }

    /// Registers an ephemeral sequential node. Partitioned roles need `Some(partition)` and an
    /// initialised layout; the partition folder is created if missing (so that a scale-out can
    /// register new partitions before `partition_num` changes). Non-partitioned roles take `None`
    /// (or `Some(0)`).
    ///
    /// The node lives while the returned [`Registration`] lives: dropping it deletes the node (in
    /// the background), [`Registration::deregister`] deletes it now.
    pub async fn register(
        &self,
        role: Role,
        partition: Option<u32>,
        info: NodeInfo,
    ) -> Result<Registration, RegistryError> {
        let partition = partition_key(role, partition)?;
        let reg = match self.backend() {
            Backend::Zk(z) => z.register(role, partition, info).await?,
            Backend::Embedded(e) => e.register(role, partition, info)?,
        };
        Ok(Registration {
            registry: self.clone(),
            inner: reg,
        })
    }

    /// Live view of a role. The first value is loaded when this returns; later values are only
    /// sent when the view changed. While ZooKeeper is unreachable the last view is kept.
    pub async fn watch(&self, role: Role) -> Result<watch::Receiver<Arc<RoleView>>, RegistryError> {
        match self.backend() {
            Backend::Zk(z) => z.watch(role).await,
            Backend::Embedded(e) => Ok(e.watch(role)),
        }
    }

    /// One-shot read of a role.
    pub async fn read(&self, role: Role) -> Result<RoleView, RegistryError> {
        match self.backend() {
            Backend::Zk(z) => z.read(role).await,
            Backend::Embedded(e) => Ok(e.read(role)),
        }
    }

    /// Sets the partition count of a partitioned role (power of two), creating the missing
    /// partition folders first.
    pub async fn set_partition_num(&self, role: Role, n: u32) -> Result<(), RegistryError> {
        if !role.is_partitioned() {
            return Err(RegistryError::NotPartitioned(role));
        }
        check_power_of_two(n)?;
        match self.backend() {
            Backend::Zk(z) => z.set_partition_num(role, n).await,
            Backend::Embedded(e) => {
                e.set_partition_num(role, n);
                Ok(())
            }
        }
    }

    /// Doubles `role`'s `partition_num` from `from` to `2 * from`, only if it is `from` now: one
    /// conditional write (a ZooKeeper version check), so of two operators racing exactly one
    /// wins and the other gets [`RegistryError::PartitionNumChanged`] with the value found.
    pub async fn double_partitions(&self, role: Role, from: u32) -> Result<u32, RegistryError> {
        if !role.is_partitioned() {
            return Err(RegistryError::NotPartitioned(role));
        }
        check_power_of_two(from)?;
        let to = from
            .checked_mul(2)
            .ok_or_else(|| RegistryError::BadData(format!("{from} partitions cannot double")))?;
        match self.backend() {
            Backend::Zk(z) => z.double_partitions(role, from, to).await?,
            Backend::Embedded(e) => e.double_partitions(role, from, to)?,
        }
        Ok(to)
    }

    /// Record a doubling of `role`, under way or completed (what a rerun of `scale-out` reads).
    pub async fn record_doubling(&self, role: Role, d: Doubling) -> Result<(), RegistryError> {
        match self.backend() {
            Backend::Zk(z) => z.record_doubling(role, d).await,
            Backend::Embedded(e) => {
                e.record_doubling(role, d);
                Ok(())
            }
        }
    }

    /// The last doubling of `role` recorded, if any.
    pub async fn last_doubling(&self, role: Role) -> Result<Option<Doubling>, RegistryError> {
        match self.backend() {
            Backend::Zk(z) => z.last_doubling(role).await,
            Backend::Embedded(e) => Ok(e.last_doubling(role)),
        }
    }

    /// Closes the session: this registry's nodes are deleted now, watches stop (receivers keep
    /// their last value) and later operations fail with [`RegistryError::Closed`]. No-op for the
    /// embedded backend.
    pub async fn close(&self) {
        if let Backend::Zk(z) = self.backend() {
            z.close().await;
        }
    }

    /// Number of ZooKeeper sessions created so far (1 after connecting, +1 per recovery); always 0
    /// for the embedded backend.
    pub fn session_generation(&self) -> u64 {
        match self.backend() {
            Backend::Zk(z) => z.generation(),
            Backend::Embedded(_) => 0,
        }
    }
}

/// State of one registered node, shared between the [`Registration`] handle and the backend
/// (which re-creates the node after a session expiry).
pub(crate) struct RegInner {
    pub(crate) role: Role,
    pub(crate) partition: u32,
    pub(crate) info: Mutex<NodeInfo>,
    pub(crate) id_tx: watch::Sender<u64>,
    /// Current znode name (`node-<digits>`).
    pub(crate) name: Mutex<String>,
    /// ZooKeeper session generation the current node belongs to.
    pub(crate) generation: AtomicU64,
    /// Serialises create / set_data / delete of this registration.
    pub(crate) op: tokio::sync::Mutex<()>,
    /// Deregistered (or dropped, or registry closed): never re-create.
    pub(crate) dead: AtomicBool,
}

impl RegInner {
    pub(crate) fn new(role: Role, partition: u32, info: NodeInfo) -> RegInner {
        RegInner {
            role,
            partition,
            info: Mutex::new(info),
            id_tx: watch::Sender::new(0),
            name: Mutex::new(String::new()),
            generation: AtomicU64::new(0),
            op: tokio::sync::Mutex::new(()),
            dead: AtomicBool::new(false),
        }
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    pub(crate) fn info(&self) -> NodeInfo {
        lock(&self.info).clone()
    }

    pub(crate) fn name(&self) -> String {
        lock(&self.name).clone()
    }

    pub(crate) fn set_node(&self, name: String, id: u64) {
        *lock(&self.name) = name;
        self.id_tx.send_replace(id);
    }
}

/// A registered node. Dropping it deletes the node in the background; keep it alive for as long
/// as the node should stay registered.
#[must_use = "dropping a Registration deletes the node"]
pub struct Registration {
    registry: Registry,
    inner: Arc<RegInner>,
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("role", &self.inner.role)
            .field("partition", &self.inner.partition)
            .field("id", &self.id())
            .finish()
    }
}

impl Registration {
    /// Current replica id (sequence number of the current node).
    pub fn id(&self) -> u64 {
        *self.inner.id_tx.borrow()
    }

    /// Changes when the node is re-created after a session expiry.
    pub fn id_watch(&self) -> watch::Receiver<u64> {
        self.inner.id_tx.subscribe()
    }

    pub fn role(&self) -> Role {
        self.inner.role
    }

    /// Partition (0 for non-partitioned roles).
    pub fn partition(&self) -> u32 {
        self.inner.partition
    }

    /// Current znode name.
    pub fn name(&self) -> String {
        self.inner.name()
    }

    /// Current node data.
    pub fn info(&self) -> NodeInfo {
        self.inner.info()
    }

    /// Sets the published state.
    pub async fn set_state(&self, state: NodeState) -> Result<(), RegistryError> {
        self.update(move |i| i.state = state).await
    }

    /// Rewrites the node data. The new data is kept locally even if the write fails, and is what
    /// a re-registration publishes.
    pub async fn update(&self, f: impl FnOnce(&mut NodeInfo) + Send) -> Result<(), RegistryError> {
        match self.registry.backend() {
            Backend::Zk(z) => z.update(&self.inner, f).await,
            Backend::Embedded(e) => e.update(&self.inner, f),
        }
    }

    /// Deletes the node now.
    pub async fn deregister(self) -> Result<(), RegistryError> {
        match self.registry.backend() {
            Backend::Zk(z) => z.deregister(&self.inner).await,
            Backend::Embedded(e) => {
                e.deregister(&self.inner);
                Ok(())
            }
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        match self.registry.backend() {
            Backend::Zk(z) => z.drop_registration(&self.inner),
            Backend::Embedded(e) => e.deregister(&self.inner),
        }
    }
}

#[cfg(test)]
mod tests;
