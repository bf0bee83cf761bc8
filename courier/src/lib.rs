//! The write path of personal inbox messages (seed 8.4), shared by the proxy (publisher
//! `POST /v1/users/...`) and the gateway (client `send`): store in Xiu (which indexes in Pi
//! before it answers), then Notify the brokers that serve the receivers.
//!
//! Receivers are grouped by Xiu partition (`uid % N`): one stored copy per partition, indexed
//! in each of its receivers' inboxes. A store answered `Unavailable` (leader changing,
//! `min_insync` not met, Pi not indexing) is retried with the same `sid` until the deadline;
//! Xiu returns the first id for a sid it has, so a retry never stores twice.

use pixiu_protocol::routing::{group_users, user_partition, user_replica};
use pixiu_protocol::wire::{self, Message, StoreRequest};
use pixiu_registry::RoleView;
use pixiu_runtime::{ask, AskError};
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
    xius: watch::Receiver<Arc<RoleView>>,
    brokers: watch::Receiver<Arc<RoleView>>,
    deadline: Duration,
}

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
            transport,
            xius,
            brokers,
            deadline,
        }
    }

    /// Stores one message for every receiver in `to` and notifies their brokers. Answers
    /// each receiver's id once every copy is acknowledged (stored, replicated to `min_insync`
    /// followers, indexed in Pi).
    #[tracing::instrument(level = "debug", skip_all, fields(sid, from, receivers = to.len()))]
    pub async fn send(
        &self,
        sid: u64,
        from: u64,
        to: &[u64],
        body: String,
        ts: u64,
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
        let num = self.xius.borrow().partition_num;
        if num == 0 {
            return Err(CourierError::Unavailable(
                "the cluster has no xiu partitions".into(),
            ));
        }
        let mut receivers = to.to_vec();
        receivers.sort_unstable();
        receivers.dedup();
        let groups = group_users(receivers, num, |uid| *uid);
        let stores = groups.into_iter().map(|(p, to)| {
            let req = StoreRequest {
                sid,
                from,
                to,
                body: body.clone(),
                ts,
            };
            async move { self.store(p, req).await }
        });
        let mut ids = BTreeMap::new();
        for r in futures::future::join_all(stores).await {
            let (to, id) = r?;
            for uid in to {
                ids.insert(uid, id);
            }
        }
        for (uid, id) in &ids {
            self.notify(*uid, *id);
        }
        Ok(ids)
    }

    async fn store(
        &self,
        partition: u32,
        req: StoreRequest,
    ) -> Result<(Vec<u64>, u64), CourierError> {
        let deadline = tokio::time::Instant::now() + self.deadline;
        let msg = Message::XiuStore(req.clone());
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
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let answer = tokio::select! {
                r = ask(&self.transport, leader, &msg, left) => r,
                () = pixiu_registry::leader_changes(self.xius.clone(), partition, leader) => {
                    // a killed leader never answers: go to its successor (same sid, so a
                    // store the old leader did make is not made twice)
                    last_error = format!("xiu {leader} stopped leading partition {partition}");
                    continue;
                }
            };
            match answer {
                Ok(Message::XiuStored { id, .. }) => return Ok((req.to, id)),
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
