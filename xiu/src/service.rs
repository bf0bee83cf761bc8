//! The `pixiu-xiu` service: one replica of one Xiu partition.
//!
//! - **Leader**: the member of the partition folder with the smallest sequence number (seed
//!   8.2.3). Only the leader stores and reads. A store is answered `XiuStored` once the
//!   promise holds: the message is in the leader's RocksDB WAL (fsynced, one fsync per group
//!   of concurrent writes, unless `fsync = false`), on at least `min_insync` followers (their
//!   pull reported a position at or past it), and its id is in every receiver's Pi list.
//!   Otherwise, within `store_timeout_ms`, the answer is `Unavailable` (the proxy's 503).
//! - **Indexer**: ids reach Pi in id order, one batch at a time, and only once they are in
//!   sync; so a user's Pi list only ever grows at its end, which is what keeps delivery in
//!   order (see `pixiu_protocol::inbox`). The watermark of indexed ids is replicated with the
//!   data, and a new leader re-indexes from it (Pi ignores ids it already has).
//! - **Epochs**: a leader writes every record it creates with its epoch, larger than every
//!   epoch in its copy (its registry id, or one more than the epoch of its last record).
//! - **Followers** long-poll the leader with their last counter and the mark (epoch and
//!   `sid`) of their record there; a leader that disagrees answers `Diverged`, and the
//!   follower drops its tail (a dead leader's unreplicated, hence unacknowledged, writes)
//!   until the copies agree. A leader answers followers only once it has taken over, so no
//!   follower copies a tail the new leader may still drop.
//! - **Takeover**: when the leader's node leaves the registry, the next smallest takes over.
//!   It first asks every other live replica for what it holds beyond its own copy: a peer
//!   whose copy is more recent (larger epoch of its last record, then longer: Raft's rule)
//!   wins, and the new leader drops its own disagreeing tail and copies the peer's; a peer
//!   that lags or holds a stale tail is left alone (it will follow). So every acknowledged
//!   id survives, whatever the order in which replicas fail and return; then it re-indexes
//!   from its watermark, then serves.

use crate::{Durability, XiuError, XiuOptions, XiuStore};
use pixiu_protocol::inbox::{MsgId, KIND_NONE, KIND_PERSONAL};
use pixiu_protocol::routing::{group_users, owns_user, user_partition};
use pixiu_protocol::wire::{self, InboxItem, Message, ReadResult, StoreRequest};
use pixiu_protocol::MAX_BODY;
use pixiu_registry::{NodeState, Role, RoleView};
use pixiu_runtime::inbound::{self, Received};
use pixiu_runtime::replication::{
    mark_running, peers, place, serve_replica, Followers, Head, Place,
};
use pixiu_runtime::{
    ask, AskError, CommonConfig, NodeEnv, Registering, RoleMetrics, Service, Shutdown,
};
use pixiu_transport::{Inbound, Transport};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// Xiu settings (TOML keys and flags of the same names).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct XiuConfig {
    pub partition: u32,
    pub data_dir: Option<PathBuf>,
    /// Followers that must hold a message before it is acknowledged. 0 acknowledges on the
    /// leader alone (a leader's crash can then lose acknowledged messages and reuse their ids).
    pub min_insync: usize,
    /// fsync the WAL before acknowledging (one fsync per group of concurrent writes).
    pub fsync: bool,
    /// Decoded messages cached in memory.
    pub cache_entries: usize,
    /// How long a store may wait for `min_insync` and for Pi before it is refused.
    pub store_timeout_ms: u64,
    /// Records per replication batch.
    pub pull_batch: u32,
}

impl Default for XiuConfig {
    fn default() -> Self {
        XiuConfig {
            partition: 0,
            data_dir: None,
            min_insync: 1,
            fsync: true,
            cache_entries: 100_000,
            store_timeout_ms: 3000,
            pull_batch: 512,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub common: CommonConfig,
    pub xiu: XiuConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Runtime(#[from] pixiu_runtime::RuntimeError),
    #[error("store: {0}")]
    Store(#[from] XiuError),
}

/// Run a Xiu replica against ZooKeeper until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), Error> {
    let common = config.common.clone();
    pixiu_runtime::in_own_process(&common, &shutdown.clone(), |env| {
        run_with(config, env, shutdown)
    })
    .await
}

type StoreReply = oneshot::Sender<Result<(MsgId, bool), XiuError>>;

struct Node {
    cfg: XiuConfig,
    partition: u8,
    store: Mutex<XiuStore>,
    transport: Transport,
    metrics: RoleMetrics,
    my_id: watch::Receiver<u64>,
    xius: watch::Receiver<Arc<RoleView>>,
    pis: watch::Receiver<Arc<RoleView>>,
    followers: Followers,
    head: Head,
    indexed: watch::Sender<u64>,
    /// Leader and done taking over: stores and reads are served.
    leading: AtomicBool,
    writes: mpsc::Sender<(StoreRequest, StoreReply)>,
}

const PULL_WAIT: Duration = Duration::from_millis(1000);

impl Node {
    fn store(&self) -> MutexGuard<'_, XiuStore> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn me(&self) -> u64 {
        *self.my_id.borrow()
    }

    fn place(&self) -> Place {
        place(&self.xius.borrow(), self.cfg.partition, self.me())
    }
}

/// What a Xiu replica refuses in its own settings before it starts (`--check-config` too).
/// Returns the partition byte and the data dir.
pub fn check(config: &Config) -> Result<(u8, std::path::PathBuf), Error> {
    let xc = &config.xiu;
    let partition = u8::try_from(xc.partition).map_err(|_| {
        Error::Config(format!(
            "--partition {} does not fit the MsgID's partition byte (at most 255)",
            xc.partition
        ))
    })?;
    let dir = xc
        .data_dir
        .clone()
        .ok_or_else(|| Error::Config("--data-dir is required".into()))?;
    Ok((partition, dir))
}

/// Run a Xiu replica in a given environment.
pub async fn run_with(config: Config, env: NodeEnv, shutdown: Shutdown) -> Result<(), Error> {
    let (partition, dir) = check(&config)?;
    let xc = config.xiu.clone();
    let store = XiuStore::open(
        &dir,
        XiuOptions {
            partition,
            cache_entries: xc.cache_entries,
            sync: Durability::GroupCommit,
        },
    )?;
    let me = Registering::partition(Role::Xiu, xc.partition);
    let (service, inbound) = Service::start(env, &config.common, me, shutdown).await?;
    tracing::info!(partition, last = %store.last_id(), "xiu opened its store");
    let pis = service.watch(Role::Pi).await?;
    let head = Head::new(store.last_id().counter());
    let indexed = watch::channel(store.indexed()?).0;
    let (writes, write_rx) = mpsc::channel(4096);
    let node = Arc::new(Node {
        cfg: xc.clone(),
        partition,
        store: Mutex::new(store),
        transport: service.transport.clone(),
        metrics: service.metrics.clone(),
        my_id: service.id_watch(),
        xius: service.peers.clone(),
        pis,
        followers: Followers::new(Duration::from_secs(3)),
        head,
        indexed,
        leading: AtomicBool::new(false),
        writes,
    });
    let shutdown = service.shutdown.clone();
    tokio::spawn(writer(node.clone(), write_rx));
    tokio::spawn(indexer(node.clone(), shutdown.clone()));

    let (state_tx, state_rx) = watch::channel(NodeState::Init);
    tokio::spawn(roles(node.clone(), state_tx, shutdown.clone()));
    let handler = node.clone();
    let handle = move |msg| {
        let node = handler.clone();
        async move { on_inbound(&node, msg).await }
    };
    let drain = || {
        node.leading.store(false, Ordering::SeqCst);
        if let Err(e) = node.store().flush_wal() {
            tracing::error!("flushing the WAL at shutdown: {e}");
        }
    };
    serve_replica(service, inbound, state_rx, handle, drain).await?;
    Ok(())
}

/// Follows the registry: leader, follower, or waiting to appear in the view.
async fn roles(node: Arc<Node>, state: watch::Sender<NodeState>, shutdown: Shutdown) {
    let mut xius = node.xius.clone();
    while !shutdown.is_cancelled() {
        match node.place() {
            Place::Leader => {
                if !node.leading.load(Ordering::SeqCst) {
                    take_over(&node).await;
                    {
                        let mut s = node.store();
                        let last_epoch = match s.recency() {
                            Ok((epoch, _)) => epoch,
                            Err(e) => {
                                // the last record is unreadable: fall back on the registry
                                // id, which is larger than every earlier leader's
                                tracing::error!("reading the epoch of my last record: {e}");
                                0
                            }
                        };
                        s.set_epoch(node.me().max(last_epoch + 1));
                    }
                    node.followers.clear();
                    node.leading.store(true, Ordering::SeqCst);
                    tracing::info!(partition = node.partition, last = %node.store().last_id(), "xiu leading");
                }
                mark_running(&state);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = xius.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            Place::Follower { addr, .. } => {
                if node.leading.swap(false, Ordering::SeqCst) {
                    tracing::warn!(partition = node.partition, "xiu no longer leads");
                }
                // a killed leader never answers: stop waiting once the registry names another
                let pulled = tokio::select! {
                    r = pull_once(&node, addr, PULL_WAIT, Pull::Follow) => r,
                    () = pixiu_registry::leader_changes(node.xius.clone(), node.cfg.partition, addr) => continue,
                };
                match pulled {
                    Ok(caught_up) => {
                        if caught_up {
                            mark_running(&state);
                        }
                    }
                    Err(e) => {
                        tracing::debug!(%addr, "pulling from the leader: {e}");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                    }
                }
            }
            Place::Unknown => {
                node.leading.store(false, Ordering::SeqCst);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = xius.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }
    }
}

/// A new leader first takes whatever another live replica holds beyond its own copy, if that
/// copy is more recent than its own (see the module doc).
async fn take_over(node: &Node) {
    let me = node.me();
    let peers = peers(&node.xius.borrow(), node.cfg.partition, me);
    for peer in peers {
        for _ in 0..100_000 {
            match pull_once(node, peer, Duration::ZERO, Pull::TakeOver).await {
                Ok(true) => break,
                Ok(false) => continue,
                Err(e) => {
                    tracing::info!(%peer, "not catching up from this replica: {e}");
                    break;
                }
            }
        }
    }
}

/// Why a replica pulls.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pull {
    /// A follower from its leader: the leader's copy wins.
    Follow,
    /// A new leader from a peer: the more recent copy wins.
    TakeOver,
}

/// One pull from `from`: apply what it sends. `Ok(true)` when nothing more is to be had.
async fn pull_once(
    node: &Node,
    from: SocketAddr,
    wait: Duration,
    why: Pull,
) -> Result<bool, String> {
    let (after, check, mine) = {
        let s = node.store();
        let after = s.last_id().counter();
        let check = s
            .mark_at(after)
            .map_err(|e| e.to_string())?
            .unwrap_or_default();
        (after, check, (check.epoch, after))
    };
    let req = Message::ReplicaPull {
        node: node.me(),
        after,
        check: check.sid,
        check_epoch: check.epoch,
        takeover: why == Pull::TakeOver,
        max: node.cfg.pull_batch,
        wait_ms: wait.as_millis() as u32,
    };
    let answer = ask(&node.transport, from, &req, wait + Duration::from_secs(3))
        .await
        .map_err(|e| e.to_string())?;
    match answer {
        Message::XiuEntries { entries, indexed } => {
            let n = entries.len();
            let entries: Vec<(MsgId, Vec<u8>)> = entries
                .into_iter()
                .map(|(id, raw)| (MsgId(id), raw))
                .collect();
            let mut s = node.store();
            let applied = s.apply_replicated(&entries).map_err(|e| e.to_string())?;
            if node.cfg.fsync && applied > 0 {
                s.flush_wal().map_err(|e| e.to_string())?;
            }
            let last = s.last_id().counter();
            let mark = indexed.min(last);
            if mark > *node.indexed.borrow() {
                s.set_indexed(mark).map_err(|e| e.to_string())?;
                node.indexed.send_replace(mark);
            }
            drop(s);
            node.head.set(last);
            node.metrics.add_out("replicated", applied as u64);
            Ok(n < node.cfg.pull_batch as usize)
        }
        Message::Diverged {
            after,
            leader_last,
            last_epoch,
        } => {
            if why == Pull::TakeOver && (last_epoch, leader_last) <= mine {
                // the peer lags or holds a stale tail: my copy is the more recent one
                tracing::info!(%from, peer_last = leader_last, peer_epoch = last_epoch, "keeping my copy over a less recent peer's");
                return Ok(true);
            }
            // drop the record the leader does not have (or everything past its end)
            let to = after.saturating_sub(1).min(leader_last);
            let n = {
                let mut s = node.store();
                let n = s.truncate_after(to).map_err(|e| e.to_string())?;
                // what replaces the dropped records must be indexed again
                if *node.indexed.borrow() > to {
                    s.set_indexed(to).map_err(|e| e.to_string())?;
                    node.indexed.send_replace(to);
                }
                n
            };
            node.metrics.add_out("diverged_dropped", n as u64);
            tracing::warn!(%from, after, dropped = n, ?why, "copy disagreed with a more recent one; dropped the tail");
            Ok(false)
        }
        other => Err(AskError::unexpected(from, &other, "xiu_entries").to_string()),
    }
}

/// Group commit: write every queued store, fsync once, answer them all.
async fn writer(node: Arc<Node>, mut rx: mpsc::Receiver<(StoreRequest, StoreReply)>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 256 {
            match rx.try_recv() {
                Ok(x) => batch.push(x),
                Err(_) => break,
            }
        }
        let n2 = node.clone();
        let done = tokio::task::spawn_blocking(move || {
            let mut s = n2.store();
            let mut out = Vec::with_capacity(batch.len());
            let mut fresh = false;
            for (req, reply) in batch {
                let r = s.store(req.sid, KIND_PERSONAL, req.from, &req.to, &req.body, req.ts);
                fresh |= matches!(r, Ok((_, true)));
                out.push((r, reply));
            }
            if fresh && n2.cfg.fsync {
                if let Err(e) = s.flush_wal() {
                    tracing::error!("fsyncing the WAL: {e}");
                    // nothing written in this group may be acknowledged
                    for (r, _) in out.iter_mut() {
                        *r = Err(XiuError::CorruptMeta {
                            what: "wal".into(),
                            reason: format!("fsync failed: {e}"),
                        });
                    }
                }
            }
            n2.head.set(s.last_id().counter());
            out
        })
        .await;
        match done {
            Ok(out) => {
                for (r, reply) in out {
                    let _ = reply.send(r);
                }
            }
            Err(e) => tracing::error!("store writer task failed: {e}"),
        }
    }
}

/// Puts in-sync ids into Pi, in id order, one batch at a time.
async fn indexer(node: Arc<Node>, shutdown: Shutdown) {
    // woken by new writes (head) and by follower reports (insync); the timer only covers a
    // follower going stale and a change of leadership
    let mut reports = node.followers.subscribe();
    let mut writes = node.head.subscribe();
    while !shutdown.is_cancelled() {
        let done = *node.indexed.borrow();
        let ready = if node.leading.load(Ordering::SeqCst) {
            node.followers
                .insync(node.cfg.min_insync)
                .min(node.head.get())
        } else {
            0
        };
        if ready <= done {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = reports.changed() => {}
                _ = writes.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            continue;
        }
        let batch = {
            let s = node.store();
            s.entries_after(MsgId::new(node.partition, KIND_NONE, done), 512)
        };
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::error!("reading records to index: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let mut items: Vec<(u64, u64)> = Vec::new();
        let mut upto = done;
        for (id, raw) in &batch {
            if id.counter() > ready {
                break;
            }
            match crate::decode_record(*id, raw) {
                Ok(m) => items.extend(m.to.iter().map(|uid| (*uid, id.0))),
                Err(e) => tracing::error!(%id, "not indexing a corrupt record: {e}"),
            }
            upto = id.counter();
        }
        if upto == done {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        match index_in_pi(&node, items).await {
            Ok(()) => {
                if let Err(e) = node.store().set_indexed(upto) {
                    tracing::warn!("recording the indexed watermark: {e}");
                }
                node.indexed.send_replace(upto);
            }
            Err(e) => {
                node.metrics.drop("index", "pi_unavailable");
                tracing::debug!("indexing in pi: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Sends each Pi partition its share of `items`; all must succeed.
async fn index_in_pi(node: &Node, items: Vec<(u64, u64)>) -> Result<(), String> {
    if items.is_empty() {
        return Ok(());
    }
    let pis = node.pis.borrow().clone();
    if pis.partition_num == 0 {
        return Err("no pi partitions".into());
    }
    let groups = group_users(items, pis.partition_num, |(uid, _)| *uid);
    let ts = pixiu_protocol::now_ms();
    let calls = groups.into_iter().map(|(p, items)| {
        let leader = pis.leader_addr(p);
        let transport = node.transport.clone();
        async move {
            let leader = leader.ok_or_else(|| format!("pi partition {p} has no leader"))?;
            let append = Message::PiAppend { items, ts };
            match ask(&transport, leader, &append, Duration::from_secs(3)).await {
                Ok(Message::Done) => Ok(()),
                Ok(other) => Err(AskError::unexpected(leader, &other, "done")),
                Err(e) => Err(e),
            }
            .map_err(|e| format!("pi partition {p}: {e}"))
        }
    });
    for r in futures::future::join_all(calls).await {
        r?;
    }
    Ok(())
}

async fn on_inbound(node: &Node, inbound: Inbound) {
    match inbound::decode(inbound, &node.metrics) {
        Some(Received::Request { msg, reply, .. }) => {
            reply.send(wire::encode(&handle(node, msg).await));
        }
        Some(Received::Message { from, msg, .. }) => {
            inbound::unexpected(&node.metrics, "xiu", from, &msg, None);
        }
        None => {}
    }
}

fn unavailable(reason: impl Into<String>) -> Message {
    Message::Unavailable {
        reason: reason.into(),
    }
}

async fn handle(node: &Node, msg: Message) -> Message {
    match msg {
        Message::XiuStore(req) => {
            node.metrics.inc_in("store");
            store(node, req).await
        }
        Message::XiuRead { uid, ids } => {
            node.metrics.inc_in("read");
            if !node.leading.load(Ordering::SeqCst) {
                return unavailable("not the leader of this xiu partition");
            }
            let ids: Vec<MsgId> = ids.into_iter().map(MsgId).collect();
            let results = node.store().read(&ids);
            let items = ids
                .iter()
                .zip(results)
                .map(|(id, r)| match r {
                    Ok(m) if !m.to.contains(&uid) => {
                        node.metrics.drop("read", "misaddressed");
                        tracing::error!(%id, uid, "refusing to read another user's message");
                        ReadResult::Missing {
                            id: id.0,
                            reason: format!("message {id} is not addressed to {uid}"),
                        }
                    }
                    Ok(m) => ReadResult::Found(InboxItem {
                        id: m.id.0,
                        from: m.from,
                        body: m.body,
                        ts: m.ts,
                    }),
                    Err(e @ XiuError::Corrupt { .. }) => {
                        node.metrics.drop("read", "corrupt");
                        ReadResult::Corrupt {
                            id: id.0,
                            reason: e.to_string(),
                        }
                    }
                    Err(e) => ReadResult::Missing {
                        id: id.0,
                        reason: e.to_string(),
                    },
                })
                .collect();
            Message::XiuMessages { items }
        }
        Message::ReplicaPull {
            node: follower,
            after,
            check,
            check_epoch,
            takeover,
            max,
            wait_ms,
        } => {
            if !takeover && !node.leading.load(Ordering::SeqCst) {
                return unavailable("not leading this xiu partition (yet)");
            }
            let check = crate::Mark {
                epoch: check_epoch,
                sid: check,
            };
            serve_pull(node, follower, after, check, max, wait_ms).await
        }
        other => {
            node.metrics.drop("request", "unexpected_kind");
            Message::Refused {
                reason: format!("a xiu serves no {} requests", other.kind()),
            }
        }
    }
}

async fn store(node: &Node, req: StoreRequest) -> Message {
    if !node.leading.load(Ordering::SeqCst) {
        return unavailable("not the leader of this xiu partition");
    }
    let num = node.xius.borrow().partition_num;
    if req.to.is_empty() {
        return Message::Refused {
            reason: "no receivers".into(),
        };
    }
    if let Some(uid) = req
        .to
        .iter()
        .find(|uid| !owns_user(**uid, node.cfg.partition, num))
    {
        return Message::Refused {
            reason: format!(
                "receiver {uid} belongs to xiu partition {} of {num}, not {}",
                user_partition(*uid, num),
                node.cfg.partition
            ),
        };
    }
    if req.body.len() > MAX_BODY {
        return Message::Refused {
            reason: format!("body of {} bytes exceeds {MAX_BODY}", req.body.len()),
        };
    }
    let (tx, rx) = oneshot::channel();
    if node.writes.send((req, tx)).await.is_err() {
        return unavailable("store writer stopped");
    }
    let (id, fresh) = match rx.await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            tracing::error!("storing: {e}");
            return unavailable(format!("store failed: {e}"));
        }
        Err(_) => return unavailable("store writer stopped"),
    };
    // acknowledged once in sync and indexed (the indexer only indexes in-sync ids)
    let timeout = Duration::from_millis(node.cfg.store_timeout_ms);
    let mut indexed = node.indexed.subscribe();
    let waited = tokio::time::timeout(timeout, indexed.wait_for(|i| *i >= id.counter())).await;
    if !matches!(waited, Ok(Ok(_))) {
        let insync = node.followers.insync(node.cfg.min_insync);
        node.metrics.drop("store", "not_acknowledged");
        return if insync < id.counter() {
            unavailable(format!(
                "stored but not acknowledged: fewer than min_insync={} followers hold it after {} ms",
                node.cfg.min_insync, node.cfg.store_timeout_ms
            ))
        } else {
            unavailable(format!(
                "stored but not acknowledged: pi did not index it within {} ms",
                node.cfg.store_timeout_ms
            ))
        };
    }
    node.metrics.inc_out("stored");
    Message::XiuStored { id: id.0, fresh }
}

async fn serve_pull(
    node: &Node,
    follower: u64,
    after: u64,
    check: crate::Mark,
    max: u32,
    wait_ms: u32,
) -> Message {
    let (last, mine) = {
        let s = node.store();
        let last = s.last_id().counter();
        let mine = if after == 0 || after > last {
            None
        } else {
            match s.mark_at(after) {
                Ok(x) => x,
                Err(e) => return unavailable(format!("reading my record {after}: {e}")),
            }
        };
        (last, mine)
    };
    if after > last || (after > 0 && mine != Some(check)) {
        let last_epoch = match node.store().recency() {
            Ok((epoch, _)) => epoch,
            Err(e) => return unavailable(format!("reading my last record: {e}")),
        };
        return Message::Diverged {
            after,
            leader_last: last,
            last_epoch,
        };
    }
    let leading = node.leading.load(Ordering::SeqCst);
    if leading {
        node.followers.report(follower, after);
        if after >= last && wait_ms > 0 {
            node.head
                .wait_above(after, Duration::from_millis(u64::from(wait_ms.min(5000))))
                .await;
        }
    }
    let s = node.store();
    match s.entries_after(
        MsgId::new(node.partition, KIND_NONE, after),
        max.clamp(1, 4096) as usize,
    ) {
        Ok(entries) => Message::XiuEntries {
            entries: entries.into_iter().map(|(id, raw)| (id.0, raw)).collect(),
            indexed: *node.indexed.borrow(),
        },
        Err(e) => unavailable(format!("reading records after {after}: {e}")),
    }
}
