//! A Xiu replica's place in its partition: following the registry to lead, follow or wait;
//! a new leader's takeover from the most recent live copy; a follower's pulls (with the
//! divergence check that drops a dead leader's unacknowledged tail); the leader's answers
//! to pulls.

use super::*;

/// Follows the registry: leader, follower, or waiting to appear in the view.
pub(super) async fn roles(node: Arc<Node>, state: watch::Sender<NodeState>, shutdown: Shutdown) {
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
                if !rest(&shutdown, Some(&mut xius), Duration::from_secs(1)).await {
                    return;
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
                        if !rest(&shutdown, None, Duration::from_millis(100)).await {
                            return;
                        }
                    }
                }
            }
            Place::Unknown => {
                node.leading.store(false, Ordering::SeqCst);
                if !rest(&shutdown, Some(&mut xius), Duration::from_millis(200)).await {
                    return;
                }
            }
        }
    }
}

/// A new leader first takes whatever another live replica holds beyond its own copy, if that
/// copy is more recent than its own (see the module doc).
pub(super) async fn take_over(node: &Arc<Node>) {
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
pub(super) enum Pull {
    /// A follower from its leader: the leader's copy wins.
    Follow,
    /// A new leader from a peer: the more recent copy wins.
    TakeOver,
}

/// Why a pull from a peer failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum PullError {
    #[error(transparent)]
    Ask(#[from] AskError),
    #[error("applying what the peer sent: {0}")]
    Store(#[from] XiuError),
}

/// One pull from `from`: apply what it sends. `Ok(true)` when nothing more is to be had.
pub(super) async fn pull_once(
    node: &Arc<Node>,
    from: SocketAddr,
    wait: Duration,
    why: Pull,
) -> Result<bool, PullError> {
    // a read of the last record (a follower's store has no other writer than this loop, so
    // the lock is free and nothing waits on a disk write here)
    let (after, check) = {
        let s = node.store();
        let after = s.last_id().counter();
        (after, s.mark_at(after)?.unwrap_or_default())
    };
    let mine = (check.epoch, after);
    let req = Message::ReplicaPull {
        node: node.me(),
        after,
        check: check.sid,
        check_epoch: check.epoch,
        takeover: why == Pull::TakeOver,
        max: node.cfg.pull_batch,
        wait_ms: wait.as_millis() as u32,
    };
    let answer = ask(&node.transport, from, &req, wait + Duration::from_secs(3)).await?;
    match answer {
        Message::XiuEntries { entries, indexed } => {
            let n = entries.len();
            let entries: Vec<(MsgId, Vec<u8>)> = entries
                .into_iter()
                .map(|(id, raw)| (MsgId(id), raw))
                .collect();
            let (applied, last) = with_store(node, move |node, s| {
                let applied = s.apply_replicated(&entries)?;
                if node.cfg.fsync && applied > 0 {
                    s.flush_wal()?;
                }
                let last = s.last_id().counter();
                let mark = indexed.min(last);
                if mark > node.indexed.get() {
                    s.set_indexed(mark)?;
                    node.indexed.set(mark);
                }
                Ok((applied, last))
            })
            .await?;
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
            let n = with_store(node, move |node, s| {
                let n = s.truncate_after(to)?;
                // what replaces the dropped records must be indexed again
                if node.indexed.get() > to {
                    s.set_indexed(to)?;
                    node.indexed.set(to);
                }
                Ok(n)
            })
            .await?;
            node.metrics.add_out("diverged_dropped", n as u64);
            tracing::warn!(%from, after, dropped = n, ?why, "copy disagreed with a more recent one; dropped the tail");
            Ok(false)
        }
        Message::XiuExpired { floor, ts } => {
            // the peer expired past this copy's end: nothing here up to its floor is kept
            // anywhere else, and nothing there is unexpired; move up to it and pull on
            with_store(node, move |node, s| {
                s.expire_through(floor, ts)?;
                if node.indexed.get() < floor {
                    s.set_indexed(floor)?;
                    node.indexed.set(floor);
                }
                Ok(())
            })
            .await?;
            node.head.set(node.store().last_id().counter());
            node.metrics.inc_out("moved_to_floor");
            tracing::info!(%from, floor, "moved up to the peer's retention floor");
            Ok(false)
        }
        other => Err(AskError::unexpected(from, &other, "xiu_entries").into()),
    }
}

pub(super) async fn serve_pull(
    node: &Node,
    follower: u64,
    after: u64,
    check: crate::Mark,
    max: u32,
    wait_ms: u32,
) -> Message {
    let (last, mine, floor) = {
        let s = node.store();
        let last = s.last_id().counter();
        let floor = s.floor();
        // retention: a position this copy expired cannot be compared; at the floor the two
        // copies agree (both hold nothing up to it), below it the puller moves up to it
        if after < floor.counter {
            return Message::XiuExpired {
                floor: floor.counter,
                ts: floor.ts,
            };
        }
        let mine = if after == 0 || after > last {
            None
        } else {
            match s.mark_at(after) {
                Ok(x) => x,
                Err(e) => return unavailable(format!("reading my record {after}: {e}")),
            }
        };
        (last, mine, floor.counter)
    };
    let at_floor = after > 0 && after == floor;
    if after > last || (after > 0 && !at_floor && mine != Some(check)) {
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
            indexed: node.indexed.get(),
        },
        Err(e) => unavailable(format!("reading records after {after}: {e}")),
    }
}
