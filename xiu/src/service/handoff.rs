//! A Xiu partition's part in a doubling (seed 8.2.4). New partitions start empty; after the
//! flip a receiver's messages are stored in partition `uid % 2N`, and each stored message
//! stays readable where its MsgID's partition byte says (the parent keeps what it stored).
//!
//! **One inbox's ids only grow across the flip.** A child's ids (partition byte `p + N`)
//! compare above its parent's, so Pi must never index a parent's id for a user after one of
//! the child's: it would land below a device cursor, and that device would never get it.
//! The rule that prevents it:
//! 1. the parent's writer checks ownership under the store lock, with the count it sees at
//!    that moment (counts only grow): once it sees `2N`, it stores nothing more for the
//!    child's users (answered `Moved`; the courier regroups and asks the child);
//! 2. the first time the child asks (`Handoff`), the parent notes its **mark**, its last
//!    counter, under the same lock, seeing `2N`: every id it ever assigned to a child's user
//!    is at or below the mark;
//! 3. the parent answers `HandoffMark` only once its indexer has put every id up to the mark
//!    into Pi (in id order, as always);
//! 4. the child indexes nothing before that answer (its writer may store meanwhile; those
//!    stores wait, unacknowledged, like any store whose id is not yet indexed).
//!
//! So for every user, all of the parent's ids reach Pi before any of the child's. A `sid`
//! retried across the flip can be stored in both (the parent's answer was lost, the retry
//! went to the child): the user may then receive the message twice, under two ids.

use super::*;
use pixiu_runtime::replication::{lineage, Lineage};

/// Follows the doubling: opens the indexer of a leader whose partition is settled or whose
/// parent has handed over, and publishes the count this replica serves (`NodeInfo::serving`).
pub(super) async fn handoff(node: Arc<Node>, shutdown: Shutdown) {
    let mut xius = node.xius.clone();
    while !shutdown.is_cancelled() {
        let num = xius.borrow_and_update().partition_num;
        let leading = node.leading.load(Ordering::SeqCst);
        if !leading {
            node.may_index.store(false, Ordering::SeqCst);
        } else if !node.may_index.load(Ordering::SeqCst) && may_index(&node, num).await {
            node.may_index.store(true, Ordering::SeqCst);
        }
        let serves =
            node.cfg.partition < num && (!leading || node.may_index.load(Ordering::SeqCst));
        if serves {
            node.serving
                .send_if_modified(|s| s.replace(num) != Some(num));
        }
        let pause = if serves {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(100)
        };
        if !rest(&shutdown, Some(&mut xius), pause).await {
            return;
        }
    }
}

/// May this leader index its ids now? Settled partitions may; a new one only once its
/// parent's leader has indexed everything up to its mark.
async fn may_index(node: &Node, num: u32) -> bool {
    let last = match node.registry.last_doubling(Role::Xiu).await {
        Ok(last) => last,
        Err(e) => {
            tracing::debug!("reading the last doubling: {e}");
            return false;
        }
    };
    let here = lineage(node.cfg.partition, num, last);
    tracing::debug!(?here, num, ?last, "xiu lineage");
    let (parent, to) = match here {
        Lineage::Settled => return true,
        Lineage::Child { flipped: false, .. } => return false,
        Lineage::Child { parent, to, .. } => (parent, to),
    };
    let Some(leader) = node.xius.borrow().leader_addr(parent) else {
        tracing::debug!(parent, "the parent partition has no leader");
        return false;
    };
    let ask_mark = Message::Handoff {
        partition: node.cfg.partition,
        partition_num: to,
    };
    match ask(&node.transport, leader, &ask_mark, Duration::from_secs(3)).await {
        Ok(Message::HandoffMark { last }) => {
            tracing::info!(
                parent,
                mark = last,
                "xiu parent indexed every id up to its mark: indexing here"
            );
            true
        }
        Ok(other) => {
            tracing::warn!(%leader, "asking for the handoff mark: answered {}", other.kind());
            false
        }
        Err(e) => {
            tracing::debug!(%leader, "asking for the handoff mark: {e}");
            false
        }
    }
}

/// The parent's answer to `Handoff` (see the module doc, steps 2 and 3).
pub(super) fn answer_handoff(node: &Node, partition_num: u32) -> Message {
    if !node.leading.load(Ordering::SeqCst) {
        return unavailable("not the leader of this xiu partition");
    }
    let mark = {
        // under the store lock, as the writer checks ownership
        let s = node.store();
        let seen = node.xius.borrow().partition_num;
        if seen < partition_num {
            return unavailable(format!(
                "this xiu still serves {seen} partitions, not {partition_num}"
            ));
        }
        let mut mark = node
            .handoff_mark
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match *mark {
            Some((n, m)) if n >= partition_num => m,
            _ => {
                let m = s.last_id().counter();
                *mark = Some((partition_num, m));
                tracing::info!(partition_num, mark = m, "xiu handoff mark set");
                m
            }
        }
    };
    let indexed = node.indexed.get();
    if indexed < mark {
        return unavailable(format!("indexed up to {indexed}, the mark is {mark}"));
    }
    Message::HandoffMark { last: mark }
}
