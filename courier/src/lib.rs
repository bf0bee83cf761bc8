//! The write path of personal inbox messages (seed 8.4), shared by the proxy (publisher
//! `POST /v1/users/...`) and the gateway (client `send`): store in Xiu (which indexes in Pi
//! before it answers), then Notify the brokers that serve the receivers.
//!
//! Receivers are grouped by Xiu partition (`uid % N`): one stored copy per partition, indexed
//! in each of its receivers' inboxes. A store answered `Unavailable` (leader changing,
//! `min_insync` not met, Pi not indexing) is retried with the same `sid` until the deadline;
//! Xiu returns the first id for a sid it has, so a retry never stores twice. A store answered
//! `Moved` (Xiu doubled and this view is older) is regrouped under the new count once the
//! view shows it, and asked again of the new owners, within the same deadline; a `sid` whose
//! first answer was lost and that is retried across the flip may then be stored twice.
//!
//! Stores waiting for the same leader at once go to it in one request (`batch.rs`); each is
//! still answered, retried and acknowledged on its own.

mod batch;

use batch::Batcher;
use pixiu_protocol::routing::{group_users, user_partition, user_replica};
use pixiu_protocol::trace::Stamp;
use pixiu_protocol::wire::{self, BatchedStore, Message, StoreRequest};
use pixiu_registry::RoleView;
use pixiu_runtime::AskError;
use pixiu_transport::Transport;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CourierError {
    /// The request itself is wrong (HTTP 400).
    #[error("{0}")]
    BadRequest(String),
    /// No acknowledgement within the deadline (HTTP 503): the message may still be stored
    /// and delivered later, but it is not acknowledged.
    #[error("{0}")]
    Unavailable(String),
}

#[derive(Clone)]
pub struct Courier {
    transport: Transport,
    batcher: Batcher,
    xius: watch::Receiver<Arc<RoleView>>,
    brokers: watch::Receiver<Arc<RoleView>>,
    deadline: Duration,
}

/// What one store of a group came to.
enum Stored {
    /// Stored: the receivers and their id.
    Ids(Vec<u64>, u64),
    /// These receivers moved to another partition under this count.
    Moved(Vec<u64>, u32),
}

/// Regroupings of one send (each needs a doubling: more than two in one send's deadline
/// means the registry is flapping).
const MAX_REGROUPS: usize = 3;

/// Largest receiver list of one multicast message.
pub const MAX_RECEIVERS: usize = 10_000;

impl Courier {
    pub fn new(
        transport: Transport,
        xius: watch::Receiver<Arc<RoleView>>,
        brokers: watch::Receiver<Arc<RoleView>>,
        deadline: Duration,
    ) -> Courier {
        Courier {
            batcher: Batcher::new(transport.clone()),
            transport,
            xius,
            brokers,
            deadline,
        }
    }

    /// Stores one message for every receiver in `to` and notifies their brokers. Answers
    /// each receiver's id once every copy is acknowledged (stored, replicated to `min_insync`
    /// followers, indexed in Pi).
    pub async fn send(
        &self,
        sid: u64,
        from: u64,
        to: &[u64],
        body: String,
        ts: u64,
    ) -> Result<BTreeMap<u64, u64>, CourierError> {
        self.send_traced(sid, from, to, body, ts, None).await
    }

    /// [`Courier::send`] of a traced message (`"trace": true`): `trace` holds the stamps so far
    /// (the sender's node's), and every store goes as `XiuStoreTraced`.
    #[tracing::instrument(level = "debug", skip_all, fields(sid, from, receivers = to.len()))]
    pub async fn send_traced(
        &self,
        sid: u64,
        from: u64,
        to: &[u64],
        body: String,
        ts: u64,
        trace: Option<Vec<Stamp>>,
    ) -> Result<BTreeMap<u64, u64>, CourierError> {
        if to.is_empty() {
            return Err(CourierError::BadRequest("no receivers".into()));
        }
        if to.len() > MAX_RECEIVERS {
            return Err(CourierError::BadRequest(format!(
                "{} receivers; at most {MAX_RECEIVERS}",
                to.len()
            )));
        }
        let mut num = self.xius.borrow().partition_num;
        if num == 0 {
            return Err(CourierError::Unavailable(
                "the cluster has no xiu partitions".into(),
            ));
        }
        let deadline = tokio::time::Instant::now() + self.deadline;
        let mut pending = to.to_vec();
        pending.sort_unstable();
        pending.dedup();
        let mut ids = BTreeMap::new();
        // each round regroups what a doubling moved; counts only grow, so rounds are few
        for _ in 0..MAX_REGROUPS {
            let groups = group_users(std::mem::take(&mut pending), num, |uid| *uid);
            let stores = groups.into_iter().map(|(p, to)| {
                let store = BatchedStore {
                    req: StoreRequest {
                        sid,
                        from,
                        to,
                        body: body.clone(),
                        ts,
                    },
                    trace: trace.clone(),
                };
                async move { self.store(p, store, deadline).await }
            });
            let mut moved_to = num;
            for r in futures::future::join_all(stores).await {
                match r? {
                    Stored::Ids(to, id) => ids.extend(to.into_iter().map(|uid| (uid, id))),
                    Stored::Moved(to, n) => {
                        pending.extend(to);
                        moved_to = moved_to.max(n);
                    }
                }
            }
            if pending.is_empty() {
                break;
            }
            num = self.await_count(moved_to, deadline).await?;
        }
        if !pending.is_empty() {
            return Err(CourierError::Unavailable(format!(
                "receivers {pending:?} kept moving between xiu partitions"
            )));
        }
        for (uid, id) in &ids {
            self.notify(*uid, *id);
        }
        Ok(ids)
    }

    /// Wait until the Xiu view shows at least `num` partitions (a `Moved` answer is ahead of
    /// this node's registry watch by a moment); the count then in force.
    async fn await_count(
        &self,
        num: u32,
        deadline: tokio::time::Instant,
    ) -> Result<u32, CourierError> {
        let mut view = self.xius.clone();
        let shown = tokio::time::timeout_at(deadline, view.wait_for(|v| v.partition_num >= num))
            .await
            .map(|r| r.map(|v| v.partition_num));
        match shown {
            Ok(Ok(n)) => Ok(n),
            _ => Err(CourierError::Unavailable(format!(
                "xiu moved to {num} partitions, which this node's registry view does not show yet"
            ))),
        }
    }

    /// Stores `store` in Xiu partition `partition`, asking whoever leads it, until `deadline`.
    async fn store(
        &self,
        partition: u32,
        store: BatchedStore,
        deadline: tokio::time::Instant,
    ) -> Result<Stored, CourierError> {
        let used = self.xius.borrow().partition_num;
        let to = store.req.to.clone();
        let mut last_error = String::from("no attempt");
        // what the store itself said beats a transport timeout of a later attempt
        let mut store_said: Option<String> = None;
        while tokio::time::Instant::now() < deadline {
            let leader = self.xius.borrow().leader_addr(partition);
            let Some(leader) = leader else {
                last_error = format!("xiu partition {partition} has no replica");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let answer = tokio::select! {
                r = self.batcher.store(leader, store.clone(), deadline) => r,
                () = pixiu_registry::leader_changes(self.xius.clone(), partition, leader) => {
                    // a killed leader never answers: go to its successor (same sid, so a
                    // store the old leader did make is not made twice)
                    last_error = format!("xiu {leader} stopped leading partition {partition}");
                    continue;
                }
            };
            match answer {
                Ok(Message::XiuStored { id, .. }) => return Ok(Stored::Ids(to, id)),
                // a doubling this view has not caught up with: regroup under the new count
                Err(AskError::Moved { partition_num, .. }) if partition_num > used => {
                    return Ok(Stored::Moved(to, partition_num))
                }
                Err(AskError::Moved { reason, .. }) => {
                    return Err(CourierError::BadRequest(reason))
                }
                Ok(other) => {
                    last_error = AskError::unexpected(leader, &other, "xiu_stored").to_string()
                }
                Err(AskError::Refused { reason, .. }) => {
                    return Err(CourierError::BadRequest(reason))
                }
                Err(AskError::Unavailable { reason, .. }) => store_said = Some(reason),
                Err(e) => last_error = format!("xiu: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(CourierError::Unavailable(format!(
            "not acknowledged within {} ms: {}",
            self.deadline.as_millis(),
            store_said.unwrap_or(last_error)
        )))
    }

    /// Tells the brokers serving `uid` that its inbox grew: every running replica of its
    /// partition, so a gateway that picked another replica than ours still hears of it.
    pub fn notify(&self, uid: u64, latest: u64) {
        let frame = wire::encode(&Message::Notify { uid, latest });
        for addr in broker_replicas(&self.brokers.borrow(), uid) {
            self.transport.send(addr, frame.clone());
        }
    }
}

/// Running replicas of the broker partition serving user `uid`.
pub fn broker_replicas(view: &RoleView, uid: u64) -> Vec<SocketAddr> {
    if view.partition_num == 0 {
        return Vec::new();
    }
    view.running_addrs(user_partition(uid, view.partition_num))
}

/// The broker replica a gateway reports user `uid`'s devices to: partition `uid % N`,
/// replica `(uid / N) % running replicas` (the room rule, with the user id as the hash).
pub fn user_broker(view: &RoleView, uid: u64) -> Option<SocketAddr> {
    let replicas = broker_replicas(view, uid);
    user_replica(uid, view.partition_num, replicas.len()).map(|i| replicas[i])
}
