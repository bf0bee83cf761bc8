//! A Xiu leader's write path: stores are queued to one writer that writes a group, fsyncs
//! once and answers them all; the indexer puts in-sync ids into Pi in id order; a store is
//! acknowledged once it is durable, on `min_insync` followers and indexed.

use super::*;

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

/// Puts in-sync ids into Pi, in id order, one batch at a time.
pub(super) async fn indexer(node: Arc<Node>, shutdown: Shutdown) {
    // woken by new writes (head) and by follower reports (insync); the timer only covers a
    // follower going stale and a change of leadership
    let mut reports = node.followers.subscribe();
    let mut writes = node.head.subscribe();
    while !shutdown.is_cancelled() {
        let done = node.indexed.get();
        // a new partition's leader indexes only once its parent handed over (handoff.rs)
        let ready = if node.leading.load(Ordering::SeqCst) && node.may_index.load(Ordering::SeqCst)
        {
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
                node.indexed.set(upto);
            }
            Err(e) => {
                node.metrics.drop("index", "pi_unavailable");
                tracing::debug!("indexing in pi: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
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
}

/// Sends each Pi partition its share of `items`; all must succeed.
/// A group holding a traced id goes as `PiAppendTraced`, and the Pi leader's stamp is kept
/// for those ids.
async fn index_in_pi(node: &Node, items: Vec<(u64, u64)>) -> Result<(), IndexError> {
    if items.is_empty() {
        return Ok(());
    }
    let pis = node.pis.borrow().clone();
    if pis.partition_num == 0 {
        return Err(IndexError::NoPartitions);
    }
    let groups = group_users(items, pis.partition_num, |(uid, _)| *uid);
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
    for r in futures::future::join_all(calls).await {
        r?;
    }
    Ok(())
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
