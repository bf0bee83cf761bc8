//! A Xiu leader's write path: stores are queued to one writer that writes a group, fsyncs
//! once and answers them all; the indexer puts in-sync ids into Pi in id order, up to
//! [`INDEX_DEPTH`] batches replicating in Pi at once; a store is acknowledged once it is
//! durable, on `min_insync` followers and indexed.

use super::*;
use std::collections::{BTreeMap, HashMap, VecDeque};

/// Group commit: write every queued store as one batch, fsync once, answer them all.
pub(super) async fn writer(
    node: Arc<Node>,
    mut rx: mpsc::Receiver<(StoreRequest, Option<Traced>, StoreReply)>,
) {
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
            // under the store lock: a doubling's handoff mark is taken under it too (handoff.rs)
            let num = n2.xius.borrow().partition_num;
            // receivers moved by a doubling are answered `Moved`; the rest go in one write
            let moves: Vec<Option<WriteError>> = batch
                .iter()
                .map(|(req, _, _)| moved(&req.to, n2.cfg.partition, num))
                .collect();
            let news: Vec<NewMessage<'_>> = batch
                .iter()
                .zip(&moves)
                .filter(|(_, m)| m.is_none())
                .map(|((req, _, _), _)| NewMessage {
                    sid: req.sid,
                    kind: KIND_PERSONAL,
                    from: req.from,
                    to: &req.to,
                    body: &req.body,
                    ts: req.ts,
                })
                .collect();
            let mut stored = s.store_many(&news).into_iter();
            let mut out = Vec::with_capacity(batch.len());
            let mut fresh = false;
            for ((_, traced, reply), moved) in batch.into_iter().zip(moves) {
                let r = match moved {
                    Some(moved) => Err(moved),
                    None => stored
                        .next()
                        .expect("store_many answers every message")
                        .map_err(WriteError::from),
                };
                fresh |= matches!(r, Ok((_, true)));
                if let (Ok((id, true)), Some((stamps, arrived))) = (&r, traced) {
                    // before the head moves: the indexer never sees the id without its trace
                    n2.traces.stored(id.0, stamps, arrived);
                }
                out.push((r, reply));
            }
            if fresh && n2.cfg.fsync {
                if let Err(e) = s.flush_wal() {
                    tracing::error!("fsyncing the WAL: {e}");
                    // nothing written in this group may be acknowledged
                    for (r, _) in out.iter_mut() {
                        *r = Err(WriteError::Store(XiuError::CorruptMeta {
                            what: "wal".into(),
                            reason: format!("fsync failed: {e}"),
                        }));
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

/// The first receiver in `to` that partition `partition` does not own under `num`.
fn moved(to: &[u64], partition: u32, num: u32) -> Option<WriteError> {
    to.iter()
        .find(|uid| !owns_user(**uid, partition, num))
        .map(|uid| WriteError::Moved {
            uid: *uid,
            owner: user_partition(*uid, num),
            partition_num: num,
        })
}

/// Batches written to Pi whose followers do not hold them yet, at most this many at once.
pub(super) const INDEX_DEPTH: usize = 4;

/// How long the indexer appends one batch at a time (`PiAppend`) after a Pi leader refused
/// `PiWrite` (a Pi of an earlier version, during a rolling upgrade) before it tries again.
const OLD_PI_FOR: Duration = Duration::from_secs(60);

/// A batch of ids written to the Pi leaders of its partitions, waiting for their followers.
struct Replicating {
    /// The batch's last Xiu counter.
    upto: u64,
    insync: tokio::task::JoinHandle<Result<(), IndexError>>,
}

/// Puts in-sync ids into Pi, in id order, pipelined: a batch is written to its Pi leaders
/// (`PiWrite`) as soon as the one before it is written there, and counts as indexed once
/// the Pi followers hold it and every batch before it (`PiAwait`). While batches replicate,
/// each Pi partition's batches go to the one leader node that wrote the first of them, so a
/// Pi log never holds a batch without the ones before it; after any failure nothing more
/// is sent until what is in flight has settled, and indexing starts again from the
/// watermark (Pi skips the ids it already holds).
pub(super) async fn indexer(node: Arc<Node>, shutdown: Shutdown) {
    // woken by new writes (head) and by follower reports (insync); the timer only covers a
    // follower going stale and a change of leadership
    let mut reports = node.followers.subscribe();
    let mut writes = node.head.subscribe();
    let mut flight: VecDeque<Replicating> = VecDeque::new();
    // per Pi partition, the leader node (registry id) and address that wrote what is in flight
    let mut writers: HashMap<u32, (u64, SocketAddr)> = HashMap::new();
    let mut sent = node.indexed.get();
    // a failure: send nothing more until what is in flight settled, then start again from
    // the watermark; `tainted`: a batch did not get in sync, so none after it counts
    let mut broken = false;
    let mut tainted = false;
    // since when a Pi leader refused `PiWrite`
    let mut old_pi: Option<tokio::time::Instant> = None;
    while !shutdown.is_cancelled() {
        if flight.is_empty() {
            writers.clear();
            // everything sent has settled; the watermark may also have moved without this
            // loop (a follower's pulls, a dropped tail)
            sent = node.indexed.get();
            if broken {
                broken = false;
                tainted = false;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        }
        // a new partition's leader indexes only once its parent handed over (handoff.rs)
        let ready = if node.leading.load(Ordering::SeqCst) && node.may_index.load(Ordering::SeqCst)
        {
            node.followers
                .insync(node.cfg.min_insync)
                .min(node.head.get())
        } else {
            0
        };
        if broken || flight.len() >= INDEX_DEPTH || ready <= sent {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                settled = async { (&mut flight.front_mut().expect("a batch in flight").insync).await }, if !flight.is_empty() => {
                    let batch = flight.pop_front().expect("a batch in flight");
                    let ok = match settled {
                        Ok(Ok(())) => true,
                        Ok(Err(e)) => {
                            node.metrics.drop("index", "pi_unavailable");
                            tracing::debug!("indexing in pi: {e}");
                            false
                        }
                        Err(e) => {
                            tracing::error!("waiting for pi's followers: {e}");
                            false
                        }
                    };
                    if !ok {
                        broken = true;
                        tainted = true;
                    } else if !tainted && node.leading.load(Ordering::SeqCst) {
                        mark_indexed(&node, batch.upto);
                    }
                }
                _ = reports.changed() => {}
                _ = writes.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            continue;
        }
        let Some((items, upto)) = next_batch(&node, sent, ready).await else {
            continue;
        };
        if old_pi.is_some_and(|since| since.elapsed() < OLD_PI_FOR) {
            // one batch at a time, each append answered once in sync
            if !flight.is_empty() {
                broken = true;
                continue;
            }
            match index_in_pi(&node, items).await {
                Ok(()) => mark_indexed(&node, upto),
                Err(e) => {
                    node.metrics.drop("index", "pi_unavailable");
                    tracing::debug!("indexing in pi: {e}");
                    broken = true;
                }
            }
            continue;
        }
        match write_in_pi(&node, items, &writers).await {
            Ok(parts) => {
                for w in &parts {
                    writers.insert(w.partition, (w.writer, w.addr));
                }
                let insync = tokio::spawn(await_in_pi(node.transport.clone(), parts));
                flight.push_back(Replicating { upto, insync });
                sent = upto;
            }
            Err(IndexError::OldPi(partition)) => {
                tracing::warn!(
                    partition,
                    "a pi leader refused PiWrite (an earlier version?): appending one batch at a time for {} s",
                    OLD_PI_FOR.as_secs()
                );
                old_pi = Some(tokio::time::Instant::now());
                broken = !flight.is_empty();
            }
            Err(e) => {
                node.metrics.drop("index", "pi_unavailable");
                tracing::debug!("writing in pi: {e}");
                broken = true;
            }
        }
    }
    for batch in flight {
        batch.insync.abort();
    }
}

/// How long a `PiAwait` may take: the Pi leader's own wait (its `append_timeout_ms`, 3 s by
/// default) and the trip.
const AWAIT_ASK: Duration = Duration::from_secs(4);

/// Every id up to `upto` is indexed (and in sync): stores up to it are acknowledged.
fn mark_indexed(node: &Node, upto: u64) {
    if upto <= node.indexed.get() {
        return;
    }
    if let Err(e) = node.store().set_indexed(upto) {
        tracing::warn!("recording the indexed watermark: {e}");
    }
    node.indexed.set(upto);
}

/// The `(uid, id)` pairs of the records after `after` up to `ready` (at most 512 records),
/// and the last counter they reach; `None` after a pause when there are none to be read.
async fn next_batch(node: &Node, after: u64, ready: u64) -> Option<(Vec<(u64, u64)>, u64)> {
    let batch = {
        let s = node.store();
        s.entries_after(MsgId::new(node.partition, KIND_NONE, after), 512)
    };
    let batch = match batch {
        Ok(b) => b,
        Err(e) => {
            tracing::error!("reading records to index: {e}");
            tokio::time::sleep(Duration::from_millis(500)).await;
            return None;
        }
    };
    let mut items: Vec<(u64, u64)> = Vec::new();
    let mut upto = after;
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
    if upto == after {
        tokio::time::sleep(Duration::from_millis(5)).await;
        return None;
    }
    Some((items, upto))
}

/// The Pi view, and `items` grouped by the Pi partition of their user.
type Shares = (Arc<RoleView>, BTreeMap<u32, Vec<(u64, u64)>>);

fn shares(node: &Node, items: Vec<(u64, u64)>) -> Result<Shares, IndexError> {
    let pis = node.pis.borrow().clone();
    if pis.partition_num == 0 {
        return Err(IndexError::NoPartitions);
    }
    let groups = group_users(items, pis.partition_num, |(uid, _)| *uid);
    Ok((pis, groups))
}

/// A Pi partition's share of a batch, written by its leader.
struct Written {
    partition: u32,
    /// The leader's registry id.
    writer: u64,
    addr: SocketAddr,
    /// The leader's log position after the share.
    last: u64,
}

/// The first half of indexing a batch: each Pi partition's share written by its leader
/// (the one in `writers` while earlier batches replicate).
async fn write_in_pi(
    node: &Node,
    items: Vec<(u64, u64)>,
    writers: &HashMap<u32, (u64, SocketAddr)>,
) -> Result<Vec<Written>, IndexError> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let (pis, groups) = shares(node, items)?;
    let ts = pixiu_protocol::now_ms();
    let calls = groups.into_iter().map(|(partition, items)| {
        let leader = pis.leader_addr(partition);
        let pinned = writers.get(&partition).copied();
        let transport = node.transport.clone();
        let traced = node
            .traces
            .leaving(items.iter().map(|(_, id)| *id), &node.hop);
        async move {
            let leader = leader.ok_or(IndexError::NoLeader(partition))?;
            let expect = match pinned {
                None => 0,
                Some((writer, addr)) if addr == leader => writer,
                Some(_) => return Err(IndexError::LeaderChanged(partition)),
            };
            let write = Message::PiWrite {
                items,
                ts,
                node: expect,
                traced: !traced.is_empty(),
            };
            match ask(&transport, leader, &write, Duration::from_secs(3)).await {
                Ok(Message::PiWritten {
                    node: writer,
                    last,
                    stamp,
                }) => {
                    if let Some(stamp) = stamp {
                        node.traces.indexed(&traced, &stamp);
                    }
                    Ok(Written {
                        partition,
                        writer,
                        addr: leader,
                        last,
                    })
                }
                Err(AskError::Refused { .. }) => Err(IndexError::OldPi(partition)),
                Ok(other) => Err(IndexError::Append {
                    partition,
                    source: AskError::unexpected(leader, &other, "pi_written"),
                }),
                Err(source) => Err(IndexError::Append { partition, source }),
            }
        }
    });
    futures::future::try_join_all(calls).await
}

/// The second half: each share held by `min_insync` followers of the leader that wrote it.
async fn await_in_pi(transport: Transport, parts: Vec<Written>) -> Result<(), IndexError> {
    let waits = parts.into_iter().map(|w| {
        let transport = &transport;
        async move {
            let wait = Message::PiAwait {
                node: w.writer,
                upto: w.last,
            };
            match ask(transport, w.addr, &wait, AWAIT_ASK).await {
                Ok(Message::Done) => Ok(()),
                Ok(other) => Err(AskError::unexpected(w.addr, &other, "done")),
                Err(e) => Err(e),
            }
            .map_err(|source| IndexError::Append {
                partition: w.partition,
                source,
            })
        }
    });
    futures::future::try_join_all(waits).await.map(drop)
}

/// Why ids could not be put into Pi.
#[derive(Debug, thiserror::Error)]
enum IndexError {
    #[error("no pi partitions")]
    NoPartitions,
    #[error("pi partition {0} has no leader")]
    NoLeader(u32),
    #[error("pi partition {partition}: {source}")]
    Append { partition: u32, source: AskError },
    #[error("pi partition {0} has a new leader while batches written by the old one replicate")]
    LeaderChanged(u32),
    #[error("the leader of pi partition {0} refused PiWrite")]
    OldPi(u32),
}

/// Indexes a batch in one request per Pi partition (`PiAppend`, answered once in sync), for
/// Pi leaders older than `PiWrite`; all must succeed.
/// A group holding a traced id goes as `PiAppendTraced`, and the Pi leader's stamp is kept
/// for those ids.
async fn index_in_pi(node: &Node, items: Vec<(u64, u64)>) -> Result<(), IndexError> {
    if items.is_empty() {
        return Ok(());
    }
    let (pis, groups) = shares(node, items)?;
    let ts = pixiu_protocol::now_ms();
    let calls = groups.into_iter().map(|(partition, items)| {
        let leader = pis.leader_addr(partition);
        let transport = node.transport.clone();
        let traced = node
            .traces
            .leaving(items.iter().map(|(_, id)| *id), &node.hop);
        async move {
            let leader = leader.ok_or(IndexError::NoLeader(partition))?;
            let append = if traced.is_empty() {
                Message::PiAppend { items, ts }
            } else {
                Message::PiAppendTraced { items, ts }
            };
            match ask(&transport, leader, &append, Duration::from_secs(3)).await {
                Ok(Message::Done) => Ok(()),
                Ok(Message::PiAppendedTraced { stamp }) => {
                    node.traces.indexed(&traced, &stamp);
                    Ok(())
                }
                Ok(other) => Err(AskError::unexpected(leader, &other, "done")),
                Err(e) => Err(e),
            }
            .map_err(|source| IndexError::Append { partition, source })
        }
    });
    futures::future::try_join_all(calls).await.map(drop)
}

#[tracing::instrument(level = "debug", skip_all, fields(sid = req.sid, receivers = req.to.len()))]
pub(super) async fn store(node: &Node, req: StoreRequest, traced: Option<Traced>) -> Message {
    if !node.leading.load(Ordering::SeqCst) {
        return unavailable("not the leader of this xiu partition");
    }
    let num = node.xius.borrow().partition_num;
    if req.to.is_empty() {
        return Message::Refused {
            reason: "no receivers".into(),
        };
    }
    if let Some(moved) = moved(&req.to, node.cfg.partition, num) {
        return moved_answer(node, moved);
    }
    if req.body.len() > MAX_BODY {
        return Message::Refused {
            reason: format!("body of {} bytes exceeds {MAX_BODY}", req.body.len()),
        };
    }
    let (tx, rx) = oneshot::channel();
    if node.writes.send((req, traced, tx)).await.is_err() {
        return unavailable("store writer stopped");
    }
    let (id, fresh) = match rx.await {
        Ok(Ok(x)) => x,
        Ok(Err(moved @ WriteError::Moved { .. })) => return moved_answer(node, moved),
        Ok(Err(e)) => {
            tracing::error!("storing: {e}");
            return unavailable(format!("store failed: {e}"));
        }
        Err(_) => return unavailable("store writer stopped"),
    };
    // acknowledged once in sync and indexed (the indexer only indexes in-sync ids)
    let timeout = Duration::from_millis(node.cfg.store_timeout_ms);
    if !node.indexed.wait_until(id.counter(), timeout).await {
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

/// `Moved` for a receiver this partition does not own under the count it sees.
fn moved_answer(node: &Node, moved: WriteError) -> Message {
    node.metrics.drop("store", "moved");
    let partition_num = match &moved {
        WriteError::Moved { partition_num, .. } => *partition_num,
        WriteError::Store(_) => node.xius.borrow().partition_num,
    };
    Message::Moved {
        partition_num,
        reason: format!("{moved}, not {}", node.cfg.partition),
    }
}

/// Retention, on every replica: every `maintenance_interval_ms`, delete the records appended
/// longer than `retention_ms` ago, never past the indexed watermark (see `crate::retention`).
pub(super) async fn retention(node: Arc<Node>, shutdown: Shutdown) {
    let every = Duration::from_millis(node.cfg.maintenance_interval_ms.max(10));
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let cutoff = pixiu_protocol::now_ms().saturating_sub(node.cfg.retention_ms);
        // bounded: at most 100 rounds of 10,000 records a tick
        for _ in 0..100 {
            let indexed = node.indexed.get();
            let expired =
                with_store(&node, move |_, s| s.expire_before(cutoff, indexed, 10_000)).await;
            match expired {
                Ok(0) => break,
                Ok(n) => {
                    node.metrics.add_out("retention_expired", n as u64);
                    let floor = node.store().floor().counter;
                    tracing::info!(expired = n, floor, "xiu records past retention deleted");
                }
                Err(e) => {
                    tracing::error!("retention: {e}");
                    break;
                }
            }
        }
    }
}
