//! The `pixiu-pi` service: one replica of one Pi partition.
//!
//! - **Leader**: the member with the smallest sequence number (seed 8.3.3). It serves
//!   `PiAppend` (from Xiu leaders; answered `Done` once the entries are in its RocksDB WAL,
//!   fsynced unless `fsync = false`, and `min_insync` followers hold their log entries),
//!   the same in two halves for a Xiu leader that pipelines its batches (`PiWrite`, answered
//!   `PiWritten` once in the WAL; `PiAwait`, answered `Done` once followers hold it, by the
//!   same leader node only), `PiRead` (ids after a position or after the device's cursor; a new device is registered
//!   so that expiry waits for it) and `PiCursor` (a device's acknowledgement; ids every known
//!   device acknowledged are expired in the same write). Every `retention_ms` old entries are
//!   expired whoever acknowledged them; the log keeps its last `log_keep` entries.
//! - **Followers** copy a snapshot of the leader whenever the leader they follow changes
//!   (and at start), then long-poll its log by LogId (seed 8.3.3); a follower whose position
//!   the leader's log no longer holds copies a snapshot again.
//! - **Takeover**: a new leader first pulls whatever log another live replica holds beyond
//!   its own (every follower's log is a prefix of the old leader's), then serves.

mod doubling;

use crate::{Durability, LogEntry, LogId, PiError, PiIndex, PiOptions, Snapshot, SnapshotChunk};
use pixiu_protocol::inbox::MsgId;
use pixiu_protocol::routing::{owns_user, user_partition};
use pixiu_protocol::wire::Message;
use pixiu_registry::{NodeState, Registry, Role, RoleView};
use pixiu_runtime::replication::{
    mark_running, peers, place, rest, serve_replica, Followers, Head, Place,
};
use pixiu_runtime::{
    ask, AskError, CommonConfig, NodeEnv, Registering, RoleMetrics, Service, Shutdown,
};
use pixiu_transport::Transport;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::watch;

/// Pi settings (TOML keys and flags of the same names).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PiConfig {
    pub partition: u32,
    pub data_dir: Option<PathBuf>,
    /// Followers that must hold an append before it is acknowledged.
    pub min_insync: usize,
    /// fsync the WAL before acknowledging.
    pub fsync: bool,
    /// How long an append may wait for `min_insync`.
    pub append_timeout_ms: u64,
    /// Entries older than this are expired even if a device never acknowledged them.
    pub retention_ms: u64,
    /// Log entries kept for followers (older ones are trimmed; a follower behind them copies a
    /// snapshot).
    pub log_keep: u64,
    /// How often retention and log trimming run.
    pub maintenance_interval_ms: u64,
    /// Log entries per replication batch.
    pub pull_batch: u32,
}

impl Default for PiConfig {
    fn default() -> Self {
        PiConfig {
            partition: 0,
            data_dir: None,
            min_insync: 1,
            fsync: true,
            append_timeout_ms: 3000,
            retention_ms: 7 * 24 * 3600 * 1000,
            log_keep: 1_000_000,
            maintenance_interval_ms: 60_000,
            pull_batch: 1024,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub common: CommonConfig,
    pub pi: PiConfig,
}

pixiu_runtime::service_error! {
    #[error("index: {0}")]
    Index(#[from] PiError),
}

/// Run a Pi replica against ZooKeeper until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), Error> {
    pixiu_runtime::in_own_process(&config.common.clone(), config, shutdown, run_with).await
}

struct Node {
    cfg: PiConfig,
    index: Mutex<PiIndex>,
    transport: Transport,
    metrics: RoleMetrics,
    my_id: watch::Receiver<u64>,
    pis: watch::Receiver<Arc<RoleView>>,
    followers: Followers,
    head: Head,
    leading: AtomicBool,
    /// Leading and serving requests: settled, or a new partition its parent handed over to.
    open: AtomicBool,
    /// The count this replica serves (published as `NodeInfo::serving`).
    serving: watch::Sender<Option<u32>>,
    registry: Registry,
    /// The snapshot being sent to followers (taken on the first chunk request).
    snapshot: Mutex<Option<Arc<Snapshot>>>,
    /// This node as a hop of traced messages (`PiWrite` marked traced, `PiAppendTraced`).
    hop: pixiu_runtime::Hop,
}

const PULL_WAIT: Duration = Duration::from_millis(1000);
const SNAPSHOT_CHUNK: usize = 4096;

impl Node {
    fn index(&self) -> MutexGuard<'_, PiIndex> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn me(&self) -> u64 {
        *self.my_id.borrow()
    }

    fn leading(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
    }

    fn flush(&self, idx: &PiIndex) -> Result<(), PiError> {
        if self.cfg.fsync {
            idx.flush_wal()?;
        }
        Ok(())
    }
}

/// Run `work` on the index on tokio's blocking pool: writes fsync, and the index lock may be
/// held by another fsyncing write, so no async worker ever waits on the disk.
async fn with_index<T, F>(node: &Arc<Node>, work: F) -> Result<T, PiError>
where
    F: FnOnce(&Node, &mut PiIndex) -> Result<T, PiError> + Send + 'static,
    T: Send + 'static,
{
    let node = node.clone();
    pixiu_storage::blocking(move || work(&node, &mut node.index())).await?
}

/// A read of the index: here when the index is free (a read is quick), on the blocking pool
/// when a write holds it (it may be waiting for an fsync), so no async worker waits on one.
async fn read_index<T, F>(node: &Arc<Node>, read: F) -> Result<T, PiError>
where
    F: FnOnce(&PiIndex) -> Result<T, PiError> + Send + 'static,
    T: Send + 'static,
{
    {
        let free = match node.index.try_lock() {
            Ok(idx) => Some(idx),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        if let Some(idx) = free {
            return read(&idx);
        }
    }
    with_index(node, |_, idx| read(idx)).await
}

/// What a Pi replica refuses in its own settings before it starts (`--check-config` too).
/// Returns the data dir.
pub fn check(config: &Config) -> Result<std::path::PathBuf, Error> {
    pixiu_runtime::config::at_least(&[(
        "maintenance_interval_ms",
        config.pi.maintenance_interval_ms,
        100,
    )])
    .map_err(Error::Config)?;
    config
        .pi
        .data_dir
        .clone()
        .ok_or_else(|| Error::Config("--data-dir is required".into()))
}

/// Run a Pi replica in a given environment.
pub async fn run_with(config: Config, env: NodeEnv, shutdown: Shutdown) -> Result<(), Error> {
    let dir = check(&config)?;
    let pc = config.pi.clone();
    let index = PiIndex::open(
        &dir,
        PiOptions {
            partition: pc.partition,
            sync: Durability::GroupCommit,
        },
    )?;
    let me = Registering::partition(Role::Pi, pc.partition);
    let (service, inbound) = Service::start(env, &config.common, me, shutdown).await?;
    tracing::info!(partition = pc.partition, last_log = %index.last_log_id(), "pi opened its index");
    let node = Arc::new(Node {
        cfg: pc.clone(),
        head: Head::new(index.last_log_id().0),
        index: Mutex::new(index),
        transport: service.transport.clone(),
        metrics: service.metrics.clone(),
        my_id: service.id_watch(),
        pis: service.peers.clone(),
        followers: Followers::new(Duration::from_secs(3)),
        leading: AtomicBool::new(false),
        open: AtomicBool::new(false),
        serving: watch::channel(None).0,
        registry: service.env.registry.clone(),
        snapshot: Mutex::new(None),
        hop: service.hop(),
    });
    let serving = node.serving.subscribe();
    let shutdown = service.shutdown.clone();
    let (state_tx, state_rx) = watch::channel(NodeState::Init);
    tokio::spawn(roles(node.clone(), state_tx, shutdown.clone()));
    tokio::spawn(maintenance(node.clone(), shutdown.clone()));
    let handler = node.clone();
    let handle = move |msg| {
        let node = handler.clone();
        async move { handle(node, msg).await }
    };
    let drain = || {
        node.leading.store(false, Ordering::SeqCst);
        if let Err(e) = node.index().flush_wal() {
            tracing::error!("flushing the WAL at shutdown: {e}");
        }
    };
    serve_replica(service, inbound, state_rx, serving, handle, drain).await?;
    Ok(())
}

async fn roles(node: Arc<Node>, state: watch::Sender<NodeState>, shutdown: Shutdown) {
    let mut pis = node.pis.clone();
    // the leader whose snapshot this copy was restored from (None: restore before pulling)
    let mut synced_with: Option<u64> = None;
    // the count whose moved users this leader has dropped
    let mut dropped_for = 0;
    while !shutdown.is_cancelled() {
        let here = place(&node.pis.borrow(), node.cfg.partition, node.me());
        match here {
            Place::Leader => {
                if !node.leading() {
                    take_over(&node).await;
                    node.followers.clear();
                    node.leading.store(true, Ordering::SeqCst);
                    synced_with = None;
                    dropped_for = 0;
                    tracing::info!(
                        partition = node.cfg.partition,
                        last_log = node.head.get(),
                        "pi leading"
                    );
                }
                if !node.open.load(Ordering::SeqCst) && !open(&node, &state, &shutdown).await {
                    continue;
                }
                mark_running(&state);
                publish_serving(&node);
                doubling::drop_moved(&node, &mut dropped_for).await;
                if !rest(&shutdown, Some(&mut pis), Duration::from_secs(1)).await {
                    return;
                }
            }
            Place::Follower { leader, addr } => {
                node.open.store(false, Ordering::SeqCst);
                if node.leading.swap(false, Ordering::SeqCst) {
                    tracing::warn!(partition = node.cfg.partition, "pi no longer leads");
                }
                publish_serving(&node);
                let step = if synced_with != Some(leader) {
                    restore_from(&node, addr).await.map(|()| {
                        synced_with = Some(leader);
                        false
                    })
                } else {
                    // a killed leader never answers: stop waiting once the registry names
                    // another
                    tokio::select! {
                        r = pull_once(&node, addr, PULL_WAIT) => r,
                        () = pixiu_registry::leader_changes(node.pis.clone(), node.cfg.partition, addr) => continue,
                    }
                };
                match step {
                    Ok(caught_up) => {
                        if caught_up {
                            mark_running(&state);
                        }
                    }
                    Err(PullError::Resync(why)) => {
                        tracing::warn!(%addr, "copying a snapshot again: {why}");
                        synced_with = None;
                    }
                    Err(PullError::Other(e)) => {
                        tracing::debug!(%addr, "pulling from the leader: {e}");
                        if !rest(&shutdown, None, Duration::from_millis(100)).await {
                            return;
                        }
                    }
                }
            }
            Place::Unknown => {
                node.leading.store(false, Ordering::SeqCst);
                node.open.store(false, Ordering::SeqCst);
                if !rest(&shutdown, Some(&mut pis), Duration::from_millis(200)).await {
                    return;
                }
            }
        }
    }
}

/// A new leader opens for requests: at once when its partition is settled, after taking its
/// users over from its parent when it is new (see `doubling`). False when it did not open
/// (no longer leading, shutdown, or the registry cannot be read now).
async fn open(node: &Arc<Node>, state: &watch::Sender<NodeState>, shutdown: &Shutdown) -> bool {
    let lineage = match doubling::lineage_now(node).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("{e}");
            // waited out (or shut down): the caller's loop tries again
            let _ = rest(shutdown, None, Duration::from_millis(500)).await;
            return false;
        }
    };
    if let pixiu_runtime::replication::Lineage::Child { parent, to, .. } = lineage {
        if let doubling::Adopted::Stopped = doubling::adopt(node, parent, to, state, shutdown).await
        {
            return false;
        }
    }
    node.open.store(true, Ordering::SeqCst);
    true
}

/// Publish the count this replica serves: a follower serves what the registry says, a leader
/// once it is open; a new partition before the flip serves nothing yet.
fn publish_serving(node: &Node) {
    let num = node.pis.borrow().partition_num;
    let serves = node.cfg.partition < num && (!node.leading() || node.open.load(Ordering::SeqCst));
    if serves {
        node.serving
            .send_if_modified(|s| s.replace(num) != Some(num));
    }
}

enum PullError {
    /// The position is not in the peer's log (trimmed, or this copy ran past it).
    Resync(String),
    Other(String),
}

impl From<String> for PullError {
    fn from(s: String) -> Self {
        PullError::Other(s)
    }
}

impl From<AskError> for PullError {
    fn from(e: AskError) -> Self {
        PullError::Other(e.to_string())
    }
}

async fn take_over(node: &Arc<Node>) {
    let me = node.me();
    let peers = peers(&node.pis.borrow(), node.cfg.partition, me);
    for peer in peers {
        for _ in 0..100_000 {
            match pull_once(node, peer, Duration::ZERO).await {
                Ok(true) => break,
                Ok(false) => continue,
                Err(PullError::Resync(e)) | Err(PullError::Other(e)) => {
                    tracing::info!(%peer, "not catching up from this replica: {e}");
                    break;
                }
            }
        }
    }
}

/// Replace this copy with the leader's snapshot.
async fn restore_from(node: &Arc<Node>, leader: SocketAddr) -> Result<(), PullError> {
    let mut upto: Option<u64> = None;
    let mut after: Option<(u64, u64)> = None;
    let mut begun = false;
    let mut entries = 0usize;
    loop {
        let answer = ask(
            &node.transport,
            leader,
            &Message::PiSnapshotRequest { upto, after },
            Duration::from_secs(10),
        )
        .await?;
        let chunk: SnapshotChunk = match answer {
            Message::PiSnapshotChunk { chunk } => postcard::from_bytes(&chunk)
                .map_err(|e| PullError::Other(format!("undecodable snapshot chunk: {e}")))?,
            other => return Err(AskError::unexpected(leader, &other, "pi_snapshot_chunk").into()),
        };
        if upto.is_some_and(|u| u != chunk.upto.0) {
            // the leader took a new snapshot meanwhile: start over
            return Err(PullError::Other("the leader's snapshot changed".into()));
        }
        let first = !begun;
        begun = true;
        upto = Some(chunk.upto.0);
        entries += chunk.entries.len();
        after = chunk.entries.last().map(|(uid, id, _)| (*uid, id.0));
        let restored = with_index(node, move |_, idx| {
            if first {
                idx.restore_begin(chunk.upto)?;
            }
            idx.restore_chunk(&chunk)?;
            match chunk.last {
                true => idx.restore_finish().map(Some),
                false => Ok(None),
            }
        })
        .await
        .map_err(|e| PullError::Other(e.to_string()))?;
        if let Some(at) = restored {
            node.head.set(at.0);
            tracing::info!(%leader, entries, upto = %at, "pi copied the leader's snapshot");
            return Ok(());
        }
    }
}

/// One pull of the log from `from`. `Ok(true)` when nothing more is to be had.
async fn pull_once(node: &Arc<Node>, from: SocketAddr, wait: Duration) -> Result<bool, PullError> {
    // only this loop writes a follower's index, and it moves the head after each write:
    // the head is the index's last LogId (a smaller one would only re-fetch entries that
    // apply_log skips), so no trip to the blocking pool is needed
    let after = node.head.get();
    let req = Message::ReplicaPull {
        node: node.me(),
        after,
        check: 0,
        check_epoch: 0,
        takeover: false,
        max: node.cfg.pull_batch,
        wait_ms: wait.as_millis() as u32,
    };
    match ask(&node.transport, from, &req, wait + Duration::from_secs(3)).await? {
        Message::PiLog { entries } => {
            let entries: Vec<LogEntry> = postcard::from_bytes(&entries)
                .map_err(|e| PullError::Other(format!("undecodable log entries: {e}")))?;
            let n = entries.len();
            let done = with_index(node, move |node, idx| {
                let applied = idx.apply_log(&entries)?;
                if applied > 0 {
                    node.flush(idx)?;
                }
                Ok((applied, idx.last_log_id().0))
            })
            .await;
            let (applied, last) = match done {
                Ok(done) => done,
                Err(PiError::Gap { expected, got }) => {
                    return Err(PullError::Resync(format!(
                        "log gap: expected {expected}, got {got}"
                    )))
                }
                Err(e) => return Err(PullError::Other(e.to_string())),
            };
            node.head.set(last);
            node.metrics.add_out("replicated", applied as u64);
            Ok(n < node.cfg.pull_batch as usize)
        }
        Message::PiTrimmed => Err(PullError::Resync("log trimmed past this copy".into())),
        Message::Diverged { .. } => Err(PullError::Resync(
            "this copy ran past the leader's log".into(),
        )),
        other => Err(AskError::unexpected(from, &other, "pi_log").into()),
    }
}

/// Users one retention step visits while it holds the index: a sweep of the partition is
/// many such steps, so an append or a read waits for one step at most, never for the sweep.
const SWEEP_USERS: usize = 1_000;

/// Retention and log trimming, on the leader.
async fn maintenance(node: Arc<Node>, shutdown: Shutdown) {
    let mut tick = tokio::time::interval(Duration::from_millis(node.cfg.maintenance_interval_ms));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !node.leading() {
            continue;
        }
        retention(&node, &shutdown).await;
        let done = with_index(&node, move |node, idx| {
            let last = idx.last_log_id().0;
            if last > node.cfg.log_keep {
                if let Err(e) = idx.trim_log(LogId(last - node.cfg.log_keep)) {
                    tracing::error!("trimming the log: {e}");
                }
            }
            Ok(idx.last_log_id().0)
        })
        .await;
        match done {
            Ok(last) => node.head.set(last),
            Err(e) => tracing::error!("maintenance: {e}"),
        }
    }
}

/// One retention sweep of the partition, [`SWEEP_USERS`] users a step, each step under the
/// index lock and the lock free between them. Ends early on shutdown or leadership lost.
async fn retention(node: &Arc<Node>, shutdown: &Shutdown) {
    let cutoff = pixiu_protocol::now_ms().saturating_sub(node.cfg.retention_ms);
    let began = std::time::Instant::now();
    let (mut from, mut visited, mut expired, mut steps) = (Some(0), 0, 0, 0u64);
    // bounded: every step visits SWEEP_USERS users with ids, or is the last
    while let Some(uid) = from {
        if shutdown.is_cancelled() || !node.leading() {
            return;
        }
        let step = with_index(node, move |_, idx| {
            let sweep = idx.expire_older_than(cutoff, uid, SWEEP_USERS)?;
            Ok((sweep, idx.last_log_id().0))
        })
        .await;
        let (sweep, last) = match step {
            Ok(step) => step,
            Err(e) => {
                tracing::error!("retention: {e}");
                return;
            }
        };
        steps += 1;
        visited += sweep.visited;
        expired += sweep.expired;
        from = sweep.next;
        if sweep.expired > 0 {
            node.metrics
                .add_out("retention_expired", sweep.expired as u64);
            // followers pull the expiry now, not at the next append
            node.head.set(last);
        }
    }
    let took_ms = began.elapsed().as_millis() as u64;
    if expired > 0 {
        tracing::info!(
            users = expired,
            visited,
            steps,
            took_ms,
            "expired entries past retention"
        );
    } else {
        tracing::debug!(
            visited,
            steps,
            took_ms,
            "retention sweep: nothing past retention"
        );
    }
}

fn unavailable(reason: impl Into<String>) -> Message {
    Message::Unavailable {
        reason: reason.into(),
    }
}

/// `Moved` when this partition does not own `uid` under the count it sees. Checked under the
/// index lock, as the handoff mark is taken (see `doubling`).
fn not_ours(node: &Node, uid: u64) -> Option<Message> {
    let num = node.pis.borrow().partition_num;
    (!owns_user(uid, node.cfg.partition, num)).then(|| Message::Moved {
        partition_num: num,
        reason: format!(
            "user {uid} belongs to pi partition {} of {num}, not {}",
            user_partition(uid, num),
            node.cfg.partition
        ),
    })
}

async fn handle(node: Arc<Node>, msg: Message) -> Message {
    match msg {
        Message::ReplicaPull {
            node: follower,
            after,
            max,
            wait_ms,
            ..
        } => return serve_pull(&node, Some(follower), after, max, wait_ms).await,
        Message::PiSnapshotRequest { upto, after } => {
            return serve_snapshot(&node, upto, after).await
        }
        _ => {}
    }
    if !node.leading() {
        return unavailable("not the leader of this pi partition");
    }
    match msg {
        Message::PiAdopt {
            after,
            max,
            wait_ms,
        } => return serve_pull(&node, None, after, max, wait_ms).await,
        Message::Handoff { partition_num, .. } => {
            node.metrics.inc_in("handoff");
            return doubling::answer_handoff(&node, partition_num).await;
        }
        _ => {}
    }
    if !node.open.load(Ordering::SeqCst) {
        return unavailable("this pi partition is taking its users over from its parent");
    }
    match msg {
        Message::PiAppend { items, ts } => append(&node, items, ts).await,
        Message::PiAppendTraced { items, ts } => {
            let arrived = pixiu_protocol::trace::now_us();
            match append(&node, items, ts).await {
                Message::Done => Message::PiAppendedTraced {
                    stamp: node.hop.stamp(arrived),
                },
                refused => refused,
            }
        }
        Message::PiWrite {
            items,
            ts,
            node: expect,
            traced,
        } => write_half(&node, items, ts, expect, traced).await,
        Message::PiAwait { node: writer, upto } => await_half(&node, writer, upto).await,
        Message::PiRead {
            uid,
            device,
            after,
            max,
        } => read(&node, uid, device, after, max).await,
        Message::PiList { uid, after, max } => {
            node.metrics.inc_in("list");
            if let Some(moved) = not_ours(&node, uid) {
                return moved;
            }
            let max = max.clamp(1, 1024) as usize;
            match read_index(&node, move |idx| idx.read(uid, MsgId(after), max)).await {
                Ok(ids) => Message::PiIds {
                    ids: ids.into_iter().map(|i| i.0).collect(),
                    cursor: 0,
                },
                Err(e) => unavailable(format!("reading: {e}")),
            }
        }
        Message::PiCursor { uid, device, id } => {
            node.metrics.inc_in("cursor");
            let done = with_index(&node, move |node, idx| {
                if let Some(moved) = not_ours(node, uid) {
                    return Ok(Err(moved));
                }
                idx.set_cursor(uid, device, MsgId(id))?;
                Ok(Ok(idx.last_log_id().0))
            })
            .await;
            match done {
                Ok(Ok(last)) => {
                    node.head.set(last);
                    Message::Done
                }
                Ok(Err(moved)) => moved,
                Err(e) => unavailable(format!("setting the cursor: {e}")),
            }
        }
        other => Message::Refused {
            reason: format!("a pi serves no {} requests", other.kind()),
        },
    }
}

/// Index the ids, make them durable, then wait until `min_insync` followers hold them.
#[tracing::instrument(level = "debug", skip_all, fields(ids = items.len()))]
async fn append(node: &Arc<Node>, items: Vec<(u64, u64)>, ts: u64) -> Message {
    match write(node, items, ts).await {
        Ok(last) => await_insync(node, last).await,
        Err(refused) => refused,
    }
}

/// Index the ids and make them durable on this leader: its log position after them.
async fn write(node: &Arc<Node>, items: Vec<(u64, u64)>, ts: u64) -> Result<u64, Message> {
    node.metrics.inc_in("append");
    let n = items.len() as u64;
    let pairs: Vec<(u64, MsgId)> = items.iter().map(|(u, i)| (*u, MsgId(*i))).collect();
    let done = with_index(node, move |node, idx| {
        if let Some(moved) = pairs.iter().find_map(|(uid, _)| not_ours(node, *uid)) {
            return Ok(Err(moved));
        }
        idx.append_many(&pairs, ts)?;
        node.flush(idx)?;
        Ok(Ok(idx.last_log_id().0))
    })
    .await;
    match done {
        Ok(Ok(last)) => {
            node.head.set(last);
            node.metrics.add_out("appended", n);
            Ok(last)
        }
        Ok(Err(moved)) => Err(moved),
        Err(e) => {
            tracing::error!("appending: {e}");
            Err(unavailable(format!("append failed: {e}")))
        }
    }
}

/// `Done` once `min_insync` followers hold this leader's log up to `last`.
async fn await_insync(node: &Arc<Node>, last: u64) -> Message {
    let timeout = Duration::from_millis(node.cfg.append_timeout_ms);
    if !node
        .followers
        .wait_for(last, node.cfg.min_insync, timeout)
        .await
    {
        node.metrics.drop("append", "not_insync");
        return unavailable(format!(
            "appended but fewer than min_insync={} followers hold it after {} ms",
            node.cfg.min_insync, node.cfg.append_timeout_ms
        ));
    }
    Message::Done
}

/// `PiWrite`: the first half of an append, answered once written here (see the wire doc).
async fn write_half(
    node: &Arc<Node>,
    items: Vec<(u64, u64)>,
    ts: u64,
    expect: u64,
    traced: bool,
) -> Message {
    let arrived = pixiu_protocol::trace::now_us();
    let me = node.me();
    if expect != 0 && expect != me {
        return unavailable(format!(
            "pi node {me} did not write the batches before this one (node {expect} did)"
        ));
    }
    match write(node, items, ts).await {
        Ok(last) => Message::PiWritten {
            node: me,
            last,
            stamp: traced.then(|| node.hop.stamp(arrived)),
        },
        Err(refused) => refused,
    }
}

/// `PiAwait`: the second half, on the leader that wrote the first.
async fn await_half(node: &Arc<Node>, writer: u64, upto: u64) -> Message {
    let me = node.me();
    if writer != me {
        return unavailable(format!("pi node {me} is not node {writer}, which wrote it"));
    }
    let answer = await_insync(node, upto).await;
    if answer == Message::Done && !node.leading() {
        // a follower's report reached this node after another took over: it holds the
        // entries, but say so only as the leader does
        return unavailable("no longer the leader of this pi partition");
    }
    answer
}

/// Up to `max` ids of `uid` after `after` (default: the device's cursor), registering an
/// unknown device at cursor 0.
async fn read(node: &Arc<Node>, uid: u64, device: u64, after: Option<u64>, max: u32) -> Message {
    node.metrics.inc_in("read");
    let done = with_index(node, move |node, idx| {
        if let Some(moved) = not_ours(node, uid) {
            return Ok(Err(moved));
        }
        let cursor = match idx.cursor(uid, device)? {
            Some(c) => c,
            None => idx.set_cursor(uid, device, MsgId(0))?.0,
        };
        let start = after.map(MsgId).unwrap_or(cursor);
        let ids = idx.read(uid, start, max.clamp(1, 1024) as usize)?;
        Ok(Ok((cursor, ids, idx.last_log_id().0)))
    })
    .await;
    match done {
        Ok(Err(moved)) => moved,
        Ok(Ok((cursor, ids, last))) => {
            node.head.set(last);
            Message::PiIds {
                ids: ids.into_iter().map(|i| i.0).collect(),
                cursor: cursor.0,
            }
        }
        Err(e) => unavailable(format!("reading: {e}")),
    }
}

/// The log after `after`, for a follower (`Some`: its position counts for `min_insync`) or
/// for a new partition taking its users over (`None`).
async fn serve_pull(
    node: &Arc<Node>,
    follower: Option<u64>,
    after: u64,
    max: u32,
    wait_ms: u32,
) -> Message {
    // the head trails the index only between a write and its `head.set`: a follower ahead of
    // the head is checked against the index itself before it is told it diverged
    let mut last = node.head.get();
    if after > last {
        last = match with_index(node, |_, idx| Ok(idx.last_log_id().0)).await {
            Ok(last) => last,
            Err(e) => return unavailable(format!("reading the log: {e}")),
        };
    }
    if after > last {
        return Message::Diverged {
            after,
            leader_last: last,
            last_epoch: 0,
        };
    }
    if node.leading() {
        if let Some(follower) = follower {
            node.followers.report(follower, after);
        }
        if after >= last && wait_ms > 0 {
            node.head
                .wait_above(after, Duration::from_millis(u64::from(wait_ms.min(5000))))
                .await;
        }
    }
    let max = max.clamp(1, 8192) as usize;
    let read = read_index(node, move |idx| {
        if after >= idx.last_log_id().0 {
            return Ok(Vec::new());
        }
        idx.log_after(LogId(after), max)
    })
    .await;
    match read {
        Ok(entries) => Message::PiLog {
            entries: postcard::to_allocvec(&entries).expect("serializing into a Vec cannot fail"),
        },
        Err(PiError::LogTrimmed { .. }) => Message::PiTrimmed,
        Err(e) => unavailable(format!("reading the log: {e}")),
    }
}

/// A snapshot of the index, read with the index lock held only while its view is taken.
async fn take_snapshot(node: &Arc<Node>) -> Result<Snapshot, PiError> {
    let node = node.clone();
    pixiu_storage::blocking(move || PiIndex::snapshot_released(node.index())).await?
}

async fn serve_snapshot(node: &Arc<Node>, upto: Option<u64>, after: Option<(u64, u64)>) -> Message {
    if !node.leading() {
        return unavailable("not the leader of this pi partition");
    }
    let cached = node
        .snapshot
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let snap = match (cached, upto) {
        (Some(s), Some(u)) if s.upto().0 == u => s,
        _ => match take_snapshot(node).await {
            Ok(s) => {
                let s = Arc::new(s);
                *node.snapshot.lock().unwrap_or_else(PoisonError::into_inner) = Some(s.clone());
                s
            }
            Err(e) => return unavailable(format!("taking a snapshot: {e}")),
        },
    };
    let chunk = snap.chunk(after.map(|(u, i)| (u, MsgId(i))), SNAPSHOT_CHUNK);
    Message::PiSnapshotChunk {
        chunk: postcard::to_allocvec(&chunk).expect("serializing into a Vec cannot fail"),
    }
}
