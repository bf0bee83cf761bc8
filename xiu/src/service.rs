//! The `pixiu-xiu` service: one replica of one Xiu partition. A doubling's handoff is in
//! `handoff.rs`, retention in `write.rs` (`retention`, on every replica) and
//! `crate::retention`, the replay requests (`XiuHistory`, `XiuUsers`) below.
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

mod handoff;
mod replica;
mod traces;
mod write;

use crate::{Durability, NewMessage, XiuError, XiuOptions, XiuStore};
use pixiu_protocol::inbox::{MsgId, KIND_NONE, KIND_PERSONAL};
use pixiu_protocol::routing::{group_users, owns_user, user_partition};
use pixiu_protocol::wire::{
    BatchedStore, InboxItem, Message, ReadResult, StoreAnswer, StoreRequest, MAX_STORE_BATCH,
};
use pixiu_protocol::MAX_BODY;
use pixiu_registry::{NodeState, Registry, Role, RoleView};
use pixiu_runtime::replication::{
    mark_running, peers, place, rest, serve_replica, Followers, Head, Place, Watermark,
};
use pixiu_runtime::{
    ask, AskError, CommonConfig, NodeEnv, Registering, RoleMetrics, Service, Shutdown,
};
use pixiu_transport::Transport;
use replica::{roles, serve_pull};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use write::{indexer, store, writer};

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
    /// Records appended longer ago than this are deleted (on every replica), like Pi's.
    pub retention_ms: u64,
    /// How often retention runs.
    pub maintenance_interval_ms: u64,
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
            retention_ms: 7 * 24 * 3600 * 1000,
            maintenance_interval_ms: 60_000,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub common: CommonConfig,
    pub xiu: XiuConfig,
}

pixiu_runtime::service_error! {
    #[error("store: {0}")]
    Store(#[from] XiuError),
}

/// Run a Xiu replica against ZooKeeper until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), Error> {
    pixiu_runtime::in_own_process(&config.common.clone(), config, shutdown, run_with).await
}

type StoreReply = oneshot::Sender<Result<(MsgId, bool), WriteError>>;

/// Why the writer did not store a request.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    /// The count the writer saw moved a receiver to another partition (a doubling).
    #[error("receiver {uid} belongs to xiu partition {owner} of {partition_num}")]
    Moved {
        uid: u64,
        owner: u32,
        partition_num: u32,
    },
    #[error(transparent)]
    Store(#[from] XiuError),
}

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
    /// Ids up to this counter are in Pi; each store waits here for its own.
    indexed: Watermark,
    /// Leader and done taking over: stores and reads are served.
    leading: AtomicBool,
    /// This leader may index its ids (its partition is settled, or its parent handed over).
    may_index: AtomicBool,
    /// Parent in a doubling: `(count, counter)`, the count the first `Handoff` asked for and
    /// the last counter then.
    handoff_mark: Mutex<Option<(u32, u64)>>,
    /// The count this replica serves (published as `NodeInfo::serving`).
    serving: watch::Sender<Option<u32>>,
    registry: Registry,
    writes: mpsc::Sender<(StoreRequest, Option<Traced>, StoreReply)>,
    /// Stamps of traced messages (in memory, leader only).
    traces: traces::Traces,
    /// This node as a hop of traced messages.
    hop: pixiu_runtime::Hop,
}

/// A traced store: the stamps so far and when it arrived here (unix µs).
type Traced = (Vec<pixiu_protocol::trace::Stamp>, u64);

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

/// Run `work` on the store on tokio's blocking pool: it writes and fsyncs, and the store's lock
/// may be held by another fsyncing write, so no async worker waits on the disk.
async fn with_store<T, F>(node: &Arc<Node>, work: F) -> Result<T, XiuError>
where
    F: FnOnce(&Node, &mut XiuStore) -> Result<T, XiuError> + Send + 'static,
    T: Send + 'static,
{
    let node = node.clone();
    pixiu_storage::blocking(move || work(&node, &mut node.store())).await?
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
    let indexed = Watermark::new(store.indexed()?);
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
        may_index: AtomicBool::new(false),
        handoff_mark: Mutex::new(None),
        serving: watch::channel(None).0,
        registry: service.env.registry.clone(),
        writes,
        traces: traces::Traces::new(),
        hop: service.hop(),
    });
    let shutdown = service.shutdown.clone();
    tokio::spawn(writer(node.clone(), write_rx));
    tokio::spawn(indexer(node.clone(), shutdown.clone()));
    tokio::spawn(handoff::handoff(node.clone(), shutdown.clone()));
    tokio::spawn(write::retention(node.clone(), shutdown.clone()));
    let serving = node.serving.subscribe();

    let (state_tx, state_rx) = watch::channel(NodeState::Init);
    tokio::spawn(roles(node.clone(), state_tx, shutdown.clone()));
    let handler = node.clone();
    let handle = move |msg| {
        let node = handler.clone();
        async move { handle(&node, msg).await }
    };
    let drain = || {
        node.leading.store(false, Ordering::SeqCst);
        if let Err(e) = node.store().flush_wal() {
            tracing::error!("flushing the WAL at shutdown: {e}");
        }
    };
    serve_replica(service, inbound, state_rx, serving, handle, drain).await?;
    Ok(())
}

/// `XiuHistory`: a page of `uid`'s messages in `[since, until)` (for `pixiu-ctl replay`).
fn history(
    node: &Node,
    uid: u64,
    (since, until): (u64, u64),
    after: Option<(u64, u64)>,
    max: u32,
) -> Message {
    node.metrics.inc_in("history");
    if !node.leading.load(Ordering::SeqCst) {
        return unavailable("not the leader of this xiu partition");
    }
    let after = after.map(|(ts, id)| (ts, MsgId(id)));
    let max = max.clamp(1, 1000) as usize;
    let (found, floor) = {
        let mut s = node.store();
        (s.history(uid, since, until, after, max), s.floor())
    };
    let found = match found {
        Ok(found) => found,
        Err(e) => return unavailable(format!("reading the history of {uid}: {e}")),
    };
    let next = (found.len() == max)
        .then(|| found.last().map(|h| (h.ts, h.id.0)))
        .flatten();
    let items = found
        .into_iter()
        .map(|h| read_result(node, uid, h.id, h.read))
        .collect();
    let expired_before = if floor.counter > 0 { floor.ts + 1 } else { 0 };
    Message::XiuHistoryPage {
        items,
        next,
        expired_before,
    }
}

/// `XiuUsers`: the receivers stored here that belong to one Pi partition (for
/// `pixiu-ctl replay --rebuild-pi`).
fn users(
    node: &Node,
    (pi_partition, pi_partitions): (u32, u32),
    after: Option<u64>,
    max: u32,
) -> Message {
    node.metrics.inc_in("users");
    if !node.leading.load(Ordering::SeqCst) {
        return unavailable("not the leader of this xiu partition");
    }
    let wanted = |uid| user_partition(uid, pi_partitions) == pi_partition;
    let listed = node
        .store()
        .users(wanted, after, max.clamp(1, 10_000) as usize);
    match listed {
        Ok((uids, next)) => Message::XiuUserList { uids, next },
        Err(e) => unavailable(format!("listing receivers: {e}")),
    }
}

/// What a read of message `id` for `uid` gives out: never another user's message, never a
/// corrupt record as data.
fn read_result(
    node: &Node,
    uid: u64,
    id: MsgId,
    r: Result<pixiu_protocol::inbox::StoredMessage, XiuError>,
) -> ReadResult {
    match r {
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
            trace: node.traces.of(m.id.0),
        }),
        Err(e @ XiuError::Corrupt { .. }) => {
            node.metrics.drop("read", "corrupt");
            ReadResult::Corrupt {
                id: id.0,
                reason: e.to_string(),
            }
        }
        Err(XiuError::Expired { floor, .. }) => ReadResult::Expired { id: id.0, floor },
        Err(e) => ReadResult::Missing {
            id: id.0,
            reason: e.to_string(),
        },
    }
}

/// Each store of the batch handled as if it came alone, all at once (so they reach the writer
/// together and share its fsync), answered together.
async fn store_batch(node: &Node, stores: Vec<BatchedStore>) -> Message {
    node.metrics.inc_in("store_batch");
    if stores.len() > MAX_STORE_BATCH {
        return Message::Refused {
            reason: format!(
                "a batch of {} stores; at most {MAX_STORE_BATCH}",
                stores.len()
            ),
        };
    }
    let arrived = pixiu_protocol::trace::now_us();
    let each = stores.into_iter().map(|s| {
        node.metrics.inc_in("store");
        store(node, s.req, s.trace.map(|t| (t, arrived)))
    });
    let answers = futures::future::join_all(each).await;
    Message::XiuStoredBatch(answers.into_iter().map(StoreAnswer::from_answer).collect())
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
            store(node, req, None).await
        }
        Message::XiuStoreTraced { req, trace } => {
            node.metrics.inc_in("store");
            store(node, req, Some((trace, pixiu_protocol::trace::now_us()))).await
        }
        Message::XiuStoreBatch(stores) => store_batch(node, stores).await,
        Message::XiuHistory {
            uid,
            since,
            until,
            after,
            max,
        } => history(node, uid, (since, until), after, max),
        Message::XiuUsers {
            pi_partition,
            pi_partitions,
            after,
            max,
        } => users(node, (pi_partition, pi_partitions), after, max),
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
                .map(|(id, r)| read_result(node, uid, *id, r))
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
        Message::Handoff { partition_num, .. } => {
            node.metrics.inc_in("handoff");
            handoff::answer_handoff(node, partition_num)
        }
        other => {
            node.metrics.drop("request", "unexpected_kind");
            Message::Refused {
                reason: format!("a xiu serves no {} requests", other.kind()),
            }
        }
    }
}
