//! A Pi partition's part in a doubling (seed 8.3.4).
//!
//! - **Before the flip** the leader of new partition `p` (of `2N`) copies its users (`uid %
//!   2N == p`) from its parent `p % N`: the parent leader's snapshot, then its log by long
//!   poll (`PiAdopt`, which counts for no `min_insync`), each change re-done as its own. It
//!   turns `running` once it has caught up, and keeps following: every append and cursor
//!   write the parent makes for those users reaches the child too.
//! - **At the flip** the parent checks ownership under its index lock with the count it sees,
//!   so once it sees `2N` it answers `Moved` for the child's users; asked `Handoff`, it
//!   answers its last LogId (the **mark**), taken under that lock: no later entry of its log
//!   is a request's change for those users. The child follows the log up to the mark,
//!   ignores what lies beyond, and only then serves (before: `Unavailable`, which callers
//!   retry) and reports that it serves `2N`.
//! - **After the doubling** (recorded done, so no child will copy again) the parent's leader
//!   drops the users it no longer owns, as logged changes its followers replay.

use super::*;
use crate::SnapshotChunk;
use pixiu_registry::Doubling;
use pixiu_runtime::replication::{lineage, Lineage};

/// What [`adopt`] ended with.
pub(super) enum Adopted {
    /// The parent handed over: serve.
    Done,
    /// This node no longer leads, or shutdown.
    Stopped,
}

/// The last recorded doubling of Pi (`None` also when it cannot be read now).
async fn last_doubling(node: &Node) -> Result<Option<Doubling>, String> {
    node.registry
        .last_doubling(Role::Pi)
        .await
        .map_err(|e| format!("reading the last doubling: {e}"))
}

/// This leader's lineage now: settled, or the parent it must take its users over from.
pub(super) async fn lineage_now(node: &Node) -> Result<Lineage, String> {
    let num = node.pis.borrow().partition_num;
    Ok(lineage(node.cfg.partition, num, last_doubling(node).await?))
}

/// A new partition's leader takes its users over from `parent` (see the module doc), marking
/// itself `running` once it has caught up; returns when the parent has handed over.
pub(super) async fn adopt(
    node: &Arc<Node>,
    parent: u32,
    to: u32,
    state: &watch::Sender<NodeState>,
    shutdown: &Shutdown,
) -> Adopted {
    let me = node.cfg.partition;
    let owns = move |uid: u64| owns_user(uid, me, to);
    // the parent's LogId this copy holds its users up to (None: copy the snapshot first),
    // and the parent leader (registry id) whose log that LogId is a position in
    let mut at: Option<u64> = None;
    let mut copied_from: Option<u64> = None;
    loop {
        if shutdown.is_cancelled() || place(&node.pis.borrow(), me, node.me()) != Place::Leader {
            return Adopted::Stopped;
        }
        let parent_leader = node
            .pis
            .borrow()
            .leader(parent)
            .and_then(|m| Some((m.id, m.addr()?)));
        let Some((leader_id, leader)) = parent_leader else {
            tracing::debug!(parent, "the parent partition has no leader");
            if !rest(shutdown, None, Duration::from_millis(200)).await {
                return Adopted::Stopped;
            }
            continue;
        };
        if at.is_some() && copied_from != Some(leader_id) {
            // A new parent leader's log agrees with the old one's only up to what it had
            // replicated; past that the same LogIds name other changes (the old leader's
            // unreplicated tail is gone, the new one writes its own). Following it from a
            // position in the old log could skip its changes for these users: copy its
            // snapshot again and merge, as a follower does when its leader changes.
            tracing::warn!(
                parent,
                leader = leader_id,
                "the parent's leader changed: copying its snapshot again"
            );
            at = None;
        }
        copied_from = Some(leader_id);
        let step = match at {
            None => copy_snapshot(node, leader, owns).await.map(|upto| {
                at = Some(upto);
                false
            }),
            Some(after) => follow(node, leader, after, to, owns).await.map(|f| {
                at = Some(f.held);
                if f.caught_up {
                    mark_running(state);
                }
                f.handed_over
            }),
        };
        match step {
            Ok(true) => {
                tracing::info!(parent, upto = ?at, "pi took its users over from its parent");
                return Adopted::Done;
            }
            Ok(false) => {}
            Err(AdoptError::Resync(why)) => {
                tracing::warn!(%leader, "copying the parent's snapshot again: {why}");
                at = None;
            }
            Err(AdoptError::Other(why)) => {
                tracing::debug!(%leader, "taking users over from the parent: {why}");
                if !rest(shutdown, None, Duration::from_millis(100)).await {
                    return Adopted::Stopped;
                }
            }
        }
    }
}

enum AdoptError {
    /// The parent's log no longer holds the position: copy its snapshot again.
    Resync(String),
    Other(String),
}

impl From<AskError> for AdoptError {
    fn from(e: AskError) -> Self {
        AdoptError::Other(e.to_string())
    }
}

impl From<PiError> for AdoptError {
    fn from(e: PiError) -> Self {
        AdoptError::Other(e.to_string())
    }
}

/// Merge the child's share of the parent leader's snapshot; the snapshot's LogId.
async fn copy_snapshot(
    node: &Arc<Node>,
    leader: SocketAddr,
    owns: impl Fn(u64) -> bool + Copy + Send + 'static,
) -> Result<u64, AdoptError> {
    let mut upto: Option<u64> = None;
    let mut after: Option<(u64, u64)> = None;
    loop {
        let req = Message::PiSnapshotRequest { upto, after };
        let chunk: SnapshotChunk = match ask(&node.transport, leader, &req, Duration::from_secs(10))
            .await?
        {
            Message::PiSnapshotChunk { chunk } => postcard::from_bytes(&chunk)
                .map_err(|e| AdoptError::Other(format!("undecodable snapshot chunk: {e}")))?,
            other => return Err(AskError::unexpected(leader, &other, "pi_snapshot_chunk").into()),
        };
        if upto.is_some_and(|u| u != chunk.upto.0) {
            return Err(AdoptError::Other("the parent's snapshot changed".into()));
        }
        upto = Some(chunk.upto.0);
        after = chunk.entries.last().map(|(uid, id, _)| (*uid, id.0));
        let last = chunk.last;
        let at = chunk.upto.0;
        with_index(node, move |node, idx| {
            if idx.adopt_chunk(&chunk, owns)? > 0 {
                node.flush(idx)?;
            }
            Ok(idx.last_log_id().0)
        })
        .await
        .map(|head| node.head.set(head))?;
        if last {
            tracing::info!(%leader, upto = at, "pi copied its users from the parent's snapshot");
            return Ok(at);
        }
    }
}

/// Where [`follow`] left the copy.
struct Followed {
    /// The parent's LogId this copy holds its users up to.
    held: u64,
    /// Everything the parent had (before the flip): ready for it.
    caught_up: bool,
    /// Everything up to the parent's mark (after the flip): serve.
    handed_over: bool,
}

/// One pull of the parent's log after `after`, re-done here up to the parent's mark once
/// `partition_num` is `to`.
async fn follow(
    node: &Arc<Node>,
    leader: SocketAddr,
    after: u64,
    to: u32,
    owns: impl Fn(u64) -> bool + Copy + Send + 'static,
) -> Result<Followed, AdoptError> {
    let flipped = node.pis.borrow().partition_num >= to;
    let mark = match flipped {
        true => Some(ask_mark(node, leader, to).await?),
        false => None,
    };
    if mark.is_some_and(|m| after >= m) {
        return Ok(Followed {
            held: after,
            caught_up: true,
            handed_over: true,
        });
    }
    let req = Message::PiAdopt {
        after,
        max: node.cfg.pull_batch,
        wait_ms: if flipped {
            0
        } else {
            PULL_WAIT.as_millis() as u32
        },
    };
    let entries: Vec<LogEntry> = match ask(
        &node.transport,
        leader,
        &req,
        PULL_WAIT + Duration::from_secs(3),
    )
    .await?
    {
        Message::PiLog { entries } => postcard::from_bytes(&entries)
            .map_err(|e| AdoptError::Other(format!("undecodable log entries: {e}")))?,
        Message::PiTrimmed => return Err(AdoptError::Resync("log trimmed past this copy".into())),
        other => return Err(AskError::unexpected(leader, &other, "pi_log").into()),
    };
    let Some(last) = entries.last().map(|e| e.id.0) else {
        return match flipped {
            true => Err(AdoptError::Other(
                "the parent's log ends before its mark".into(),
            )),
            false => Ok(Followed {
                held: after,
                caught_up: true,
                handed_over: false,
            }),
        };
    };
    let upto = mark.map(LogId);
    let n = entries.len();
    with_index(node, move |node, idx| {
        if idx.adopt_log(&entries, upto, owns)? > 0 {
            node.flush(idx)?;
        }
        Ok(idx.last_log_id().0)
    })
    .await
    .map(|head| node.head.set(head))?;
    let held = mark.map_or(last, |m| last.min(m));
    Ok(Followed {
        held,
        caught_up: n < node.cfg.pull_batch as usize,
        handed_over: mark.is_some_and(|m| held >= m),
    })
}

async fn ask_mark(node: &Node, leader: SocketAddr, to: u32) -> Result<u64, AdoptError> {
    let req = Message::Handoff {
        partition: node.cfg.partition,
        partition_num: to,
    };
    match ask(&node.transport, leader, &req, Duration::from_secs(3)).await? {
        Message::HandoffMark { last } => Ok(last),
        other => Err(AskError::unexpected(leader, &other, "handoff_mark").into()),
    }
}

/// The parent's answer to `Handoff`: its last LogId, taken under the index lock once it sees
/// `partition_num` (every later request's change is for users it still owns).
pub(super) async fn answer_handoff(node: &Arc<Node>, partition_num: u32) -> Message {
    let mark = with_index(node, move |node, idx| {
        let seen = node.pis.borrow().partition_num;
        Ok((seen >= partition_num)
            .then(|| idx.last_log_id().0)
            .ok_or(seen))
    })
    .await;
    match mark {
        Ok(Ok(last)) => Message::HandoffMark { last },
        Ok(Err(seen)) => unavailable(format!(
            "this pi still serves {seen} partitions, not {partition_num}"
        )),
        Err(e) => unavailable(format!("reading the log: {e}")),
    }
}

/// On a settled leader after a doubling recorded done: drop the users this partition no
/// longer owns (once per count).
pub(super) async fn drop_moved(node: &Arc<Node>, dropped_for: &mut u32) {
    let num = node.pis.borrow().partition_num;
    if num <= *dropped_for || !node.leading() || !node.open.load(Ordering::SeqCst) {
        return;
    }
    match last_doubling(node).await {
        // under way: a child may still copy these users
        Ok(Some(d)) if d.to == num && d.done_ms.is_none() => return,
        Ok(Some(d)) if d.to == num => {}
        // no doubling made this count: nothing moved away
        Ok(_) => {
            *dropped_for = num;
            return;
        }
        Err(e) => {
            tracing::debug!("{e}");
            return;
        }
    }
    let me = node.cfg.partition;
    let dropped = with_index(node, move |node, idx| {
        let n = idx.drop_users(|uid| owns_user(uid, me, num))?;
        node.flush(idx)?;
        Ok((n, idx.last_log_id().0))
    })
    .await;
    match dropped {
        Ok((n, head)) => {
            node.head.set(head);
            *dropped_for = num;
            if n > 0 {
                tracing::info!(
                    users = n,
                    partition_num = num,
                    "pi dropped the users it no longer owns"
                );
                node.metrics.add_out("users_dropped", n as u64);
            }
        }
        Err(e) => tracing::error!("dropping the users this partition no longer owns: {e}"),
    }
}
