//! ZooKeeper backend.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{sleep, timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use zookeeper_client::{
    Acls, AddWatchMode, Client, CreateMode, CreateOptions, Error as ZkError, EventType,
    PersistentWatcher, SessionState, WatchedEvent,
};

use crate::{
    check_layout, check_power_of_two, lock, parse_node_name, parse_partition_name, publish,
    Doubling, Layout, Member, NodeInfo, RegInner, RegistryError, Role, RoleView, ZkConfig,
};

mod layout;

/// Upper bound for establishing the first session.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Delay between a watch event and the re-read it triggers (bursts are coalesced).
const DEBOUNCE: Duration = Duration::from_millis(50);
/// Bound of the best-effort cleanup in `close`.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

const PERSISTENT: CreateOptions<'static> = CreateMode::Persistent.with_acls(Acls::anyone_all());
const EPHEMERAL_SEQUENTIAL: CreateOptions<'static> =
    CreateMode::EphemeralSequential.with_acls(Acls::anyone_all());

fn zk_err(e: ZkError) -> RegistryError {
    RegistryError::Zk(e)
}

/// The session currently in use.
#[derive(Clone)]
struct Slot {
    /// 1 for the first session, +1 per re-created session.
    generation: u64,
    /// `None` once closed.
    client: Option<Client>,
}

pub(crate) struct ZkShared {
    pub(crate) cluster: String,
    cfg: ZkConfig,
    /// `/pixiu/<cluster>`.
    base: String,
    slot: watch::Sender<Slot>,
    regs: Mutex<Vec<Weak<RegInner>>>,
    views: tokio::sync::Mutex<HashMap<Role, watch::Sender<Arc<RoleView>>>>,
    cancel: CancellationToken,
    closed: AtomicBool,
}

async fn connect(cfg: &ZkConfig) -> Result<Client, RegistryError> {
    let fut = Client::connector()
        .with_session_timeout(cfg.session_timeout)
        .connect(&cfg.hosts);
    match timeout(CONNECT_TIMEOUT, fut).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(RegistryError::Connect {
            hosts: cfg.hosts.clone(),
            reason: e.to_string(),
        }),
        Err(_) => Err(RegistryError::Connect {
            hosts: cfg.hosts.clone(),
            reason: format!(
                "no session established within {}s",
                CONNECT_TIMEOUT.as_secs()
            ),
        }),
    }
}

fn parse_count(data: &[u8]) -> Option<u32> {
    std::str::from_utf8(data).ok()?.trim().parse().ok()
}

/// Reads the `node-` children of a folder. `Err(NoNode)` if the folder does not exist.
async fn read_members(client: &Client, folder: &str) -> Result<Vec<Member>, ZkError> {
    let children = client.list_children(folder).await?;
    let mut named: Vec<(u64, String)> = Vec::with_capacity(children.len());
    for name in children {
        match parse_node_name(&name) {
            Some(id) => named.push((id, name)),
            None => debug!(folder, name, "ignoring unexpected child"),
        }
    }
    let reads = named
        .iter()
        .map(|(_, name)| client.get_data(&format!("{folder}/{name}")))
        .collect::<Vec<_>>();
    let results = futures::future::join_all(reads).await;
    let mut members = Vec::with_capacity(named.len());
    for ((id, name), result) in named.into_iter().zip(results) {
        match result {
            Ok((data, _)) => match serde_json::from_slice::<NodeInfo>(&data) {
                Ok(info) => members.push(Member { id, name, info }),
                Err(e) => warn!(folder, name, error = %e, "skipping registry node with bad data"),
            },
            // Deleted between listing and reading.
            Err(ZkError::NoNode) => {}
            Err(e) => return Err(e),
        }
    }
    members.sort_by_key(|m| m.id);
    Ok(members)
}

impl ZkShared {
    pub(crate) async fn connect(cfg: ZkConfig) -> Result<Arc<ZkShared>, RegistryError> {
        if cfg.cluster.is_empty() || cfg.cluster.contains('/') || cfg.cluster.starts_with('.') {
            return Err(RegistryError::InvalidCluster(cfg.cluster.clone()));
        }
        let client = connect(&cfg).await?;
        info!(hosts = %cfg.hosts, cluster = %cfg.cluster, session = ?client.session_id(), "connected to zookeeper");
        let shared = Arc::new(ZkShared {
            cluster: cfg.cluster.clone(),
            base: format!("/pixiu/{}", cfg.cluster),
            cfg,
            slot: watch::Sender::new(Slot {
                generation: 1,
                client: Some(client),
            }),
            regs: Mutex::new(Vec::new()),
            views: tokio::sync::Mutex::new(HashMap::new()),
            cancel: CancellationToken::new(),
            closed: AtomicBool::new(false),
        });
        tokio::spawn(shared.clone().supervise());
        Ok(shared)
    }

    pub(crate) fn generation(&self) -> u64 {
        self.slot.borrow().generation
    }

    fn client(&self) -> Result<(u64, Client), RegistryError> {
        let slot = self.slot.borrow();
        match &slot.client {
            Some(c) => Ok((slot.generation, c.clone())),
            None => Err(RegistryError::Closed),
        }
    }

    fn role_path(&self, role: Role) -> String {
        format!("{}/{}", self.base, role.as_str())
    }

    fn partition_num_path(&self, role: Role) -> String {
        format!("{}/{}/partition_num", self.base, role.as_str())
    }

    fn folder(&self, role: Role, partition: u32) -> String {
        if role.is_partitioned() {
            format!("{}/{}/partition{partition}", self.base, role.as_str())
        } else {
            self.role_path(role)
        }
    }

    async fn get_partition_num(
        &self,
        client: &Client,
        role: Role,
    ) -> Result<Option<u32>, RegistryError> {
        match client.get_data(&self.partition_num_path(role)).await {
            Ok((data, _)) => parse_count(&data).map(Some).ok_or_else(|| {
                RegistryError::BadData(format!(
                    "{}: {:?}",
                    self.partition_num_path(role),
                    String::from_utf8_lossy(&data)
                ))
            }),
            Err(ZkError::NoNode) => Ok(None),
            Err(e) => Err(zk_err(e)),
        }
    }

    // ---- views ----

    async fn read_view(&self, client: &Client, role: Role) -> Result<RoleView, RegistryError> {
        let role_path = self.role_path(role);
        // the count before the folders: a doubling creates the new folders before it sets the
        // count, so a view that shows the new count shows all of them (read the other way
        // round, a view once showed 8 partitions counted and 7 folders)
        let partition_num = if role.is_partitioned() {
            match self.get_partition_num(client, role).await {
                Ok(n) => n.unwrap_or(0),
                Err(RegistryError::BadData(e)) => {
                    warn!(error = %e, "bad partition_num");
                    0
                }
                Err(e) => return Err(e),
            }
        } else {
            1
        };
        let children = match client.list_children(&role_path).await {
            Ok(c) => c,
            Err(ZkError::NoNode) => return Ok(RoleView::default()),
            Err(e) => return Err(zk_err(e)),
        };
        if !role.is_partitioned() {
            let members = match read_members(client, &role_path).await {
                Ok(m) => m,
                Err(ZkError::NoNode) => return Ok(RoleView::default()),
                Err(e) => return Err(zk_err(e)),
            };
            return Ok(RoleView {
                partition_num,
                partitions: BTreeMap::from([(0, members)]),
            });
        }
        let mut partitions = BTreeMap::new();
        for name in children {
            let Some(p) = parse_partition_name(&name) else {
                continue;
            };
            match read_members(client, &format!("{role_path}/{name}")).await {
                Ok(members) => {
                    partitions.insert(p, members);
                }
                Err(ZkError::NoNode) => {}
                Err(e) => return Err(zk_err(e)),
            }
        }
        Ok(RoleView {
            partition_num,
            partitions,
        })
    }

    /// A bounded full read of a role (ZooKeeper requests wait while disconnected).
    async fn read_bounded(&self, client: &Client, role: Role) -> Result<RoleView, RegistryError> {
        timeout(self.cfg.session_timeout * 2, self.read_view(client, role))
            .await
            .map_err(|_| RegistryError::Timeout)?
    }

    pub(crate) async fn read(&self, role: Role) -> Result<RoleView, RegistryError> {
        let (_, client) = self.client()?;
        self.read_bounded(&client, role).await
    }

    pub(crate) async fn watch(
        self: &Arc<Self>,
        role: Role,
    ) -> Result<watch::Receiver<Arc<RoleView>>, RegistryError> {
        let mut views = self.views.lock().await;
        if let Some(tx) = views.get(&role) {
            return Ok(tx.subscribe());
        }
        let (_, client) = self.client()?;
        let view = self.read_bounded(&client, role).await?;
        let (tx, rx) = watch::channel(Arc::new(view));
        views.insert(role, tx.clone());
        tokio::spawn(self.clone().view_task(role, tx));
        Ok(rx)
    }

    async fn refresh(&self, client: &Client, role: Role, tx: &watch::Sender<Arc<RoleView>>) {
        match timeout(self.cfg.session_timeout, self.read_view(client, role)).await {
            Ok(Ok(view)) => {
                if publish(tx, view) {
                    debug!(%role, "view changed");
                }
            }
            // Keep the last view while ZooKeeper is unreachable.
            Ok(Err(e)) => debug!(%role, error = %e, "view refresh failed"),
            Err(_) => debug!(%role, "view refresh timed out"),
        }
    }

    /// Keeps one role's view: persistent recursive watch (re-established per session), debounced
    /// re-reads on events, plus a periodic re-read because watches can miss events.
    async fn view_task(self: Arc<Self>, role: Role, tx: watch::Sender<Arc<RoleView>>) {
        let path = self.role_path(role);
        let mut slot_rx = self.slot.subscribe();
        'session: loop {
            let client = match slot_rx.borrow_and_update().client.clone() {
                Some(c) => c,
                None => return,
            };
            let mut watcher = self.add_watch(&client, &path).await;
            self.refresh(&client, role, &tx).await;
            let mut tick = tokio::time::interval(self.cfg.refresh_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.reset();
            let mut pending: Option<Instant> = None;
            loop {
                let deadline =
                    pending.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
                tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    changed = slot_rx.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        continue 'session;
                    },
                    event = next_event(&mut watcher) => match event.event_type {
                        EventType::Session => {
                            if event.session_state.is_terminated() {
                                // The watcher must not be polled after a terminal state.
                                watcher = None;
                            } else if event.session_state == SessionState::SyncConnected {
                                // Events during the disconnection may be lost.
                                pending.get_or_insert_with(|| Instant::now() + DEBOUNCE);
                            }
                        },
                        _ => {
                            pending.get_or_insert_with(|| Instant::now() + DEBOUNCE);
                        },
                    },
                    _ = tokio::time::sleep_until(deadline), if pending.is_some() => {
                        pending = None;
                        self.refresh(&client, role, &tx).await;
                    },
                    _ = tick.tick() => {
                        if watcher.is_none() && !client.state().is_terminated() {
                            watcher = self.add_watch(&client, &path).await;
                        }
                        self.refresh(&client, role, &tx).await;
                    },
                }
            }
        }
    }

    async fn add_watch(&self, client: &Client, path: &str) -> Option<PersistentWatcher> {
        tokio::select! {
            _ = self.cancel.cancelled() => None,
            r = timeout(self.cfg.session_timeout, client.watch(path, AddWatchMode::PersistentRecursive)) => match r {
                Ok(Ok(w)) => Some(w),
                Ok(Err(e)) => {
                    debug!(path, error = %e, "cannot add watch, relying on periodic re-read");
                    None
                },
                Err(_) => {
                    debug!(path, "adding watch timed out, relying on periodic re-read");
                    None
                },
            },
        }
    }

    // ---- registrations ----

    pub(crate) async fn register(
        &self,
        role: Role,
        partition: u32,
        info: NodeInfo,
    ) -> Result<Arc<RegInner>, RegistryError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(RegistryError::Closed);
        }
        let (_, client) = self.client()?;
        if role.is_partitioned() && self.get_partition_num(&client, role).await?.is_none() {
            return Err(RegistryError::NotInitialized);
        }
        client
            .mkdir(&self.folder(role, partition), &PERSISTENT)
            .await
            .map_err(zk_err)?;
        let reg = Arc::new(RegInner::new(role, partition, info));
        let guard = reg.op.lock().await;
        {
            let mut regs = lock(&self.regs);
            regs.retain(|w| w.strong_count() > 0);
            regs.push(Arc::downgrade(&reg));
        }
        let result = self.create_node(&reg, true).await;
        if result.is_err() {
            reg.dead.store(true, Ordering::SeqCst);
        }
        drop(guard);
        result.map(|()| reg)
    }

    /// Creates the ephemeral sequential node of `reg` with its current info on the current
    /// session. The caller holds `reg.op`. With `wait_new_session`, an expired session is waited
    /// out (the supervisor creates a new one) instead of failing.
    async fn create_node(
        &self,
        reg: &RegInner,
        wait_new_session: bool,
    ) -> Result<(), RegistryError> {
        let deadline = Instant::now() + self.cfg.session_timeout * 2 + CONNECT_TIMEOUT;
        let mut folder_retries = 0;
        loop {
            let (generation, client) = self.client()?;
            let folder = self.folder(reg.role, reg.partition);
            let data = serde_json::to_vec(&reg.info())
                .map_err(|e| RegistryError::BadData(e.to_string()))?;
            match client
                .create(&format!("{folder}/node-"), &data, &EPHEMERAL_SEQUENTIAL)
                .await
            {
                Ok((_, seq)) => {
                    let id = u64::try_from(seq.into_i64())
                        .map_err(|_| RegistryError::BadData(format!("negative sequence {seq}")))?;
                    reg.generation.store(generation, Ordering::SeqCst);
                    reg.set_node(format!("node-{seq}"), id);
                    return Ok(());
                }
                Err(ZkError::NoNode) if folder_retries < 3 => {
                    // The partition folder vanished (e.g. cleaned up by an operator): re-create it.
                    folder_retries += 1;
                    client.mkdir(&folder, &PERSISTENT).await.map_err(zk_err)?;
                }
                Err(ZkError::SessionExpired | ZkError::SessionMoved | ZkError::ClientClosed)
                    if wait_new_session =>
                {
                    let mut slot_rx = self.slot.subscribe();
                    let newer = timeout_at(
                        deadline,
                        slot_rx.wait_for(|s| s.generation > generation || s.client.is_none()),
                    );
                    if newer.await.is_none() {
                        return Err(RegistryError::Timeout);
                    }
                }
                Err(e) => return Err(zk_err(e)),
            }
        }
    }

    pub(crate) async fn update(
        &self,
        reg: &RegInner,
        f: impl FnOnce(&mut NodeInfo),
    ) -> Result<(), RegistryError> {
        let _guard = reg.op.lock().await;
        if reg.is_dead() {
            return Err(RegistryError::Closed);
        }
        let data = {
            let mut info = lock(&reg.info);
            f(&mut info);
            serde_json::to_vec(&*info).map_err(|e| RegistryError::BadData(e.to_string()))?
        };
        let (generation, client) = self.client()?;
        if reg.generation.load(Ordering::SeqCst) != generation {
            // The node belongs to a dead session; the supervisor re-creates it with this info.
            return Ok(());
        }
        let path = format!("{}/{}", self.folder(reg.role, reg.partition), reg.name());
        match client.set_data(&path, &data, None).await {
            Ok(_) => Ok(()),
            // Session gone: the re-registration publishes the current info.
            Err(ZkError::SessionExpired | ZkError::SessionMoved) => Ok(()),
            Err(ZkError::NoNode) => {
                warn!(role = %reg.role, partition = reg.partition, path, "registry node vanished, re-creating it");
                self.create_node(reg, true).await
            }
            Err(e) => Err(zk_err(e)),
        }
    }

    pub(crate) async fn deregister(&self, reg: &RegInner) -> Result<(), RegistryError> {
        let _guard = reg.op.lock().await;
        if reg.dead.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let Ok((generation, client)) = self.client() else {
            return Ok(());
        };
        if reg.generation.load(Ordering::SeqCst) != generation {
            return Ok(());
        }
        let path = format!("{}/{}", self.folder(reg.role, reg.partition), reg.name());
        match client.delete(&path, None).await {
            Ok(()) | Err(ZkError::NoNode | ZkError::SessionExpired | ZkError::SessionMoved) => {
                Ok(())
            }
            Err(e) => Err(zk_err(e)),
        }
    }

    /// `Drop` of a [`crate::Registration`]: delete the node in the background.
    pub(crate) fn drop_registration(&self, reg: &Arc<RegInner>) {
        if reg.is_dead() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            // No runtime: the node goes away with the session.
            reg.dead.store(true, Ordering::SeqCst);
            return;
        };
        let Ok((_, client)) = self.client() else {
            return;
        };
        let reg = reg.clone();
        let folder = self.folder(reg.role, reg.partition);
        let current_generation = self.generation();
        handle.spawn(async move {
            let _guard = reg.op.lock().await;
            if reg.dead.swap(true, Ordering::SeqCst)
                || reg.generation.load(Ordering::SeqCst) != current_generation
            {
                return;
            }
            let path = format!("{folder}/{}", reg.name());
            if let Err(e) = client.delete(&path, None).await {
                debug!(path, error = %e, "deleting dropped registration failed");
            }
        });
    }

    fn live_registrations(&self) -> Vec<Arc<RegInner>> {
        let mut regs = lock(&self.regs);
        regs.retain(|w| w.strong_count() > 0);
        regs.iter().filter_map(Weak::upgrade).collect()
    }

    // ---- session lifecycle ----

    /// Waits for the session to end, then creates a new one, re-creates the registrations and
    /// lets the view tasks re-read (they follow `slot`).
    async fn supervise(self: Arc<Self>) {
        loop {
            let Ok((generation, client)) = self.client() else {
                return;
            };
            let mut state_watcher = client.state_watcher();
            let mut state = client.state();
            while !state.is_terminated() {
                state = tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    s = state_watcher.changed() => s,
                };
                match state {
                    SessionState::Disconnected => {
                        warn!(cluster = %self.cluster, "zookeeper connection lost")
                    }
                    SessionState::SyncConnected => {
                        info!(cluster = %self.cluster, "zookeeper connection restored")
                    }
                    _ => {}
                }
            }
            drop(client);
            if self.cancel.is_cancelled() {
                return;
            }
            warn!(cluster = %self.cluster, ?state, "zookeeper session ended, creating a new one");
            let mut backoff = Duration::from_millis(100);
            let client = loop {
                match connect(&self.cfg).await {
                    Ok(c) => break c,
                    Err(e) => warn!(error = %e, "zookeeper reconnect failed"),
                }
                tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    _ = sleep(backoff) => {},
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            };
            if self.cancel.is_cancelled() {
                return;
            }
            let new_generation = generation + 1;
            info!(cluster = %self.cluster, session = ?client.session_id(), generation = new_generation, "new zookeeper session");
            self.slot.send_modify(|s| {
                if s.client.is_some() {
                    *s = Slot {
                        generation: new_generation,
                        client: Some(client.clone()),
                    };
                }
            });
            self.reregister_all(&client, new_generation).await;
        }
    }

    async fn reregister_all(&self, client: &Client, generation: u64) {
        for reg in self.live_registrations() {
            let _guard = reg.op.lock().await;
            loop {
                if reg.is_dead() || reg.generation.load(Ordering::SeqCst) >= generation {
                    break;
                }
                if self.cancel.is_cancelled() || client.state().is_terminated() {
                    return;
                }
                let old_id = *reg.id_tx.borrow();
                match self.create_node(&reg, false).await {
                    Ok(()) => {
                        info!(role = %reg.role, partition = reg.partition, old_id, new_id = *reg.id_tx.borrow(), "re-registered");
                        break;
                    }
                    Err(e) => {
                        warn!(role = %reg.role, partition = reg.partition, error = %e, "re-registration failed, retrying");
                        tokio::select! {
                            _ = self.cancel.cancelled() => return,
                            _ = sleep(Duration::from_millis(500)) => {},
                        }
                    }
                }
            }
        }
    }

    pub(crate) async fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        let cleanup = async {
            if let Ok((generation, client)) = self.client() {
                for reg in self.live_registrations() {
                    let _guard = reg.op.lock().await;
                    if reg.dead.swap(true, Ordering::SeqCst)
                        || reg.generation.load(Ordering::SeqCst) != generation
                    {
                        continue;
                    }
                    let path = format!("{}/{}", self.folder(reg.role, reg.partition), reg.name());
                    if let Err(e) = client.delete(&path, None).await {
                        debug!(path, error = %e, "delete on close failed");
                    }
                }
            }
        };
        if timeout(CLOSE_TIMEOUT, cleanup).await.is_err() {
            warn!("deleting registry nodes on close timed out; they vanish with the session");
        }
        for reg in self.live_registrations() {
            reg.dead.store(true, Ordering::SeqCst);
        }
        self.cancel.cancel();
        let old = self.slot.send_modify_return(|s| s.client.take());
        if let Some(client) = old {
            // Dropping the last clone sends CloseSession; wait (bounded) for it to complete.
            let mut state_watcher = client.state_watcher();
            let state = client.state();
            drop(client);
            if !state.is_terminated() {
                let closed = async { while !state_watcher.changed().await.is_terminated() {} };
                if timeout(CLOSE_TIMEOUT, closed).await.is_err() {
                    debug!("session close not confirmed in time");
                }
            }
        }
    }

    /// Synchronous shutdown when the last [`crate::Registry`] handle is dropped.
    pub(crate) fn shutdown_now(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        self.cancel.cancel();
        self.slot.send_modify(|s| s.client = None);
    }
}

async fn next_event(watcher: &mut Option<PersistentWatcher>) -> WatchedEvent {
    match watcher {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

async fn timeout_at<F: std::future::Future>(deadline: Instant, f: F) -> Option<F::Output> {
    tokio::time::timeout_at(deadline, f).await.ok()
}

trait SendModifyReturn<T> {
    fn send_modify_return<R>(&self, f: impl FnOnce(&mut T) -> R) -> R;
}

impl<T> SendModifyReturn<T> for watch::Sender<T> {
    fn send_modify_return<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let mut out = None;
        self.send_modify(|v| out = Some(f(v)));
        out.expect("send_modify runs its closure exactly once")
    }
}
