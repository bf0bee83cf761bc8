//! `pixiu-ctl replay --rebuild-pi --partition P [--execute]`: rebuild Pi partition `P`'s
//! per-user id lists from the messages Xiu holds, after every replica of that partition lost
//! its data (seed 8.3: Pi only points at Xiu's records, so it can be derived again).
//!
//! 1. **Plan** ([`plan`]): every Xiu partition's leader lists its receivers that belong to `P`
//!    (`XiuUsers`, from Xiu's index by user), then each such user's stored ids
//!    (`XiuHistory`); unreadable records are left out and counted.
//! 2. **Execute** ([`execute`], only with `--execute`): `PiAppend` to `P`'s leader, each
//!    user's ids in id order, in batches (Pi ignores ids it already has, so a rerun is
//!    harmless). Append times are the time of the rebuild, so retention counts from it.
//! 3. **Verify** ([`verify`]): every planned id is read back from `P`'s leader (`PiList`, which
//!    registers no device); a missing one fails the run.
//!
//! Device cursors are not in Xiu: they start over at 0, so each device receives again what it
//! may already have had (clients drop ids they have seen).

use crate::replay::{history, xiu_leaders, ReplayError, Window};
use pixiu_protocol::wire::{Message, ReadResult};
use pixiu_registry::{Registry, Role};
use pixiu_runtime::{ask, AskError};
use pixiu_transport::Transport;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

/// Ids appended to Pi per request.
const APPEND_BATCH: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// Bad usage (exit 2).
    #[error("pi has {partitions} partitions; there is no partition {partition}")]
    NoSuchPartition { partition: u32, partitions: u32 },
    #[error("pi partition {0} has no replica registered; start its (empty) replicas first")]
    NoPiLeader(u32),
    #[error("pi partition {partition}: {source}")]
    Pi { partition: u32, source: AskError },
    #[error(transparent)]
    Xiu(#[from] ReplayError),
    #[error("registry: {0}")]
    Registry(#[from] pixiu_registry::RegistryError),
}

/// What the rebuild will write.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub partition: u32,
    /// Each user's ids, ascending.
    pub users: BTreeMap<u64, Vec<u64>>,
    /// Ids Xiu indexes for these users whose records could not be read (left out).
    pub unreadable: usize,
}

impl Plan {
    pub fn ids(&self) -> usize {
        self.users.values().map(Vec::len).sum()
    }
}

/// The leader of Pi partition `partition`, checking it exists.
async fn pi_leader(registry: &Registry, partition: u32) -> Result<SocketAddr, RebuildError> {
    let view = registry.read(Role::Pi).await?;
    if partition >= view.partition_num {
        return Err(RebuildError::NoSuchPartition {
            partition,
            partitions: view.partition_num,
        });
    }
    view.leader_addr(partition)
        .ok_or(RebuildError::NoPiLeader(partition))
}

/// Step 1: the users of Pi partition `partition` and their ids, from Xiu.
pub async fn plan(
    registry: &Registry,
    transport: &Transport,
    partition: u32,
) -> Result<Plan, RebuildError> {
    pi_leader(registry, partition).await?;
    let partitions = registry.read(Role::Pi).await?.partition_num;
    let mut out = Plan {
        partition,
        ..Plan::default()
    };
    let all = Window {
        since: 0,
        until: u64::MAX,
    };
    for (xiu, leader) in xiu_leaders(registry).await? {
        for uid in receivers(transport, (xiu, leader), partition, partitions).await? {
            let ids = out.users.entry(uid).or_default();
            for item in history(transport, (xiu, leader), uid, all).await?.0 {
                match item {
                    ReadResult::Found(m) => ids.push(m.id),
                    ReadResult::Corrupt { .. } | ReadResult::Missing { .. } => out.unreadable += 1,
                    // retention: gone from Xiu, so not listed again
                    ReadResult::Expired { .. } => {}
                }
            }
        }
    }
    for ids in out.users.values_mut() {
        ids.sort_unstable();
        ids.dedup();
    }
    Ok(out)
}

/// The receivers on one Xiu partition that belong to Pi partition `partition`.
async fn receivers(
    transport: &Transport,
    (xiu, leader): (u32, SocketAddr),
    partition: u32,
    partitions: u32,
) -> Result<Vec<u64>, RebuildError> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let req = Message::XiuUsers {
            pi_partition: partition,
            pi_partitions: partitions,
            after,
            max: 10_000,
        };
        let answer = ask(transport, leader, &req, Duration::from_secs(10)).await;
        let (uids, next) = match answer {
            Ok(Message::XiuUserList { uids, next }) => (uids, next),
            Ok(other) => {
                let source = AskError::unexpected(leader, &other, "xiu_user_list");
                return Err(ReplayError::Ask {
                    partition: xiu,
                    source,
                }
                .into());
            }
            Err(source) => {
                return Err(ReplayError::Ask {
                    partition: xiu,
                    source,
                }
                .into())
            }
        };
        out.extend(uids);
        match next {
            Some(n) => after = Some(n),
            None => return Ok(out),
        }
    }
}

/// Step 2: append every planned id to the partition's leader; how many were sent.
pub async fn execute(
    registry: &Registry,
    transport: &Transport,
    plan: &Plan,
) -> Result<usize, RebuildError> {
    let leader = pi_leader(registry, plan.partition).await?;
    let ts = pixiu_protocol::now_ms();
    let mut sent = 0;
    for (uid, ids) in &plan.users {
        for chunk in ids.chunks(APPEND_BATCH) {
            let items: Vec<(u64, u64)> = chunk.iter().map(|id| (*uid, *id)).collect();
            let req = Message::PiAppend { items, ts };
            let mut tries = 0;
            loop {
                tries += 1;
                match ask(transport, leader, &req, Duration::from_secs(5)).await {
                    Ok(Message::Done) => break,
                    Ok(other) => {
                        let source = AskError::unexpected(leader, &other, "done");
                        return Err(pi_error(plan, source));
                    }
                    Err(e) if e.is_retryable() && tries < 5 => {
                        tracing::warn!("appending to pi, retrying: {e}");
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    Err(source) => return Err(pi_error(plan, source)),
                }
            }
            sent += chunk.len();
        }
    }
    Ok(sent)
}

fn pi_error(plan: &Plan, source: AskError) -> RebuildError {
    RebuildError::Pi {
        partition: plan.partition,
        source,
    }
}

/// Step 3: the planned ids Pi's leader does not list, `(uid, id)`.
pub async fn verify(
    registry: &Registry,
    transport: &Transport,
    plan: &Plan,
) -> Result<Vec<(u64, u64)>, RebuildError> {
    let leader = pi_leader(registry, plan.partition).await?;
    let mut missing = Vec::new();
    for (uid, want) in &plan.users {
        let mut listed = BTreeSet::new();
        let mut after = 0;
        loop {
            let req = Message::PiList {
                uid: *uid,
                after,
                max: 1024,
            };
            let ids = match ask(transport, leader, &req, Duration::from_secs(5)).await {
                Ok(Message::PiIds { ids, .. }) => ids,
                Ok(other) => {
                    return Err(pi_error(
                        plan,
                        AskError::unexpected(leader, &other, "pi_ids"),
                    ))
                }
                Err(source) => return Err(pi_error(plan, source)),
            };
            let Some(last) = ids.last().copied() else {
                break;
            };
            listed.extend(ids);
            after = last;
        }
        missing.extend(
            want.iter()
                .filter(|id| !listed.contains(id))
                .map(|id| (*uid, *id)),
        );
    }
    Ok(missing)
}
