//! Stores bound for one Xiu leader travel together: every store waiting for that leader when
//! a request can go is sent in one `XiuStoreBatch` (one QUIC stream, one decode, one task on
//! the leader, which hands them to its writer together), and each caller gets what its store
//! alone would have been answered. Nothing waits on a timer: with nothing in flight a store
//! goes at once, alone; while [`IN_FLIGHT`] batches are out, stores queue and go together
//! when one comes back. So batches grow with the load and a quiet store pays nothing. A
//! leader too old to decode a batch (it refuses it as a bad frame) gets its stores one by one.

use pixiu_protocol::wire::{BatchedStore, Message, MAX_STORE_BATCH};
use pixiu_runtime::{ask, AskError};
use pixiu_transport::{Transport, TransportError};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Batches in flight to one leader at once. A batch holds its slot until its slowest store
/// is indexed in Pi (10-20 ms under load), so too few slots make stores wait here while the
/// leader idles: with 8, 10,000 personal messages a second offered waited p50 27-34 ms, p99
/// 77-87 ms for their 201; with 32, p50 12-36 ms, p99 24-77 ms, under 50 ms in three runs of
/// five (README "Benchmarks"). 64 collapsed once (p99 645 ms).
const IN_FLIGHT: usize = 32;
/// Bytes of bodies and receivers in one batch (the transport carries at most 1 MiB); a store
/// larger than this goes alone.
const MAX_BATCH_BYTES: usize = 512 * 1024;
/// A leader's queue that had nothing to send for this long is closed (leaders change).
const IDLE: Duration = Duration::from_secs(30);

type Answer = Result<Message, AskError>;

/// One store waiting for its batch.
struct Pending {
    store: BatchedStore,
    until: Instant,
    reply: oneshot::Sender<Answer>,
}

/// A queue per Xiu leader, each drained by its own task.
#[derive(Clone)]
pub(crate) struct Batcher {
    transport: Transport,
    queues: Arc<Mutex<HashMap<SocketAddr, mpsc::UnboundedSender<Pending>>>>,
}

impl Batcher {
    pub(crate) fn new(transport: Transport) -> Batcher {
        Batcher {
            transport,
            queues: Arc::default(),
        }
    }

    /// Asks `to` to store `store` (in a batch with whatever else is waiting for `to`), until
    /// `until`: answered as [`ask`] answers a lone `XiuStore`.
    pub(crate) async fn store(
        &self,
        to: SocketAddr,
        store: BatchedStore,
        until: Instant,
    ) -> Answer {
        let (reply, answer) = oneshot::channel();
        let mut pending = Pending {
            store,
            until,
            reply,
        };
        loop {
            let queue = self.queue(to);
            match queue.send(pending) {
                Ok(()) => break,
                // that queue closed itself after idling: forget it and start another
                Err(mpsc::error::SendError(p)) => {
                    pending = p;
                    let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
                    if queues.get(&to).is_some_and(|q| q.same_channel(&queue)) {
                        queues.remove(&to);
                    }
                }
            }
        }
        match tokio::time::timeout_at(until, answer).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(AskError::Transport {
                to,
                source: TransportError::Closed,
            }),
            Err(_) => Err(AskError::Transport {
                to,
                source: TransportError::Timeout,
            }),
        }
    }

    fn queue(&self, to: SocketAddr) -> mpsc::UnboundedSender<Pending> {
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        queues
            .entry(to)
            .or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(drain(
                    self.transport.clone(),
                    to,
                    self.queues.clone(),
                    tx.clone(),
                    rx,
                ));
                tx
            })
            .clone()
    }
}

/// What a store adds to its batch's size, near enough.
fn size(store: &BatchedStore) -> usize {
    let stamps = store.trace.as_ref().map_or(0, Vec::len);
    64 + store.req.body.len() + 10 * store.req.to.len() + 128 * stamps
}

/// Takes stores off `to`'s queue into batches, at most [`IN_FLIGHT`] out at once, until the
/// queue idles for [`IDLE`] (it then removes itself from `queues`, answers what is still
/// queued and ends).
async fn drain(
    transport: Transport,
    to: SocketAddr,
    queues: Arc<Mutex<HashMap<SocketAddr, mpsc::UnboundedSender<Pending>>>>,
    me: mpsc::UnboundedSender<Pending>,
    mut rx: mpsc::UnboundedReceiver<Pending>,
) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut carried: Option<Pending> = None;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let first = match carried.take() {
            Some(p) => p,
            None => match tokio::time::timeout(IDLE, rx.recv()).await {
                Ok(Some(p)) => p,
                Ok(None) => return,
                Err(_) => {
                    // closed: a sender that still holds this queue gets its store back and
                    // makes a new one; what is already queued is still sent below
                    let mut q = queues.lock().unwrap_or_else(PoisonError::into_inner);
                    if q.get(&to).is_some_and(|q| q.same_channel(&me)) {
                        q.remove(&to);
                    }
                    drop(q);
                    rx.close();
                    continue;
                }
            },
        };
        let mut bytes = size(&first.store);
        let mut batch = vec![first];
        while batch.len() < MAX_STORE_BATCH {
            let Ok(p) = rx.try_recv() else { break };
            bytes += size(&p.store);
            if bytes > MAX_BATCH_BYTES {
                carried = Some(p);
                break;
            }
            batch.push(p);
        }
        tokio::spawn(send(transport.clone(), to, batch, slot));
    }
}

/// Sends one batch and hands each store its answer; the slot is free again when it returns.
async fn send(
    transport: Transport,
    to: SocketAddr,
    batch: Vec<Pending>,
    _slot: OwnedSemaphorePermit,
) {
    // a caller that gave up (deadline, leader change) is not stored for
    let batch: Vec<Pending> = batch.into_iter().filter(|p| !p.reply.is_closed()).collect();
    let Some(until) = batch.iter().map(|p| p.until).max() else {
        return;
    };
    let (stores, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.store, p.reply)).unzip();
    let n = stores.len();
    let left = until.saturating_duration_since(Instant::now());
    let batch = Message::XiuStoreBatch(stores);
    let answers = match ask(&transport, to, &batch, left).await {
        Ok(Message::XiuStoredBatch(answers)) if answers.len() == n => answers
            .into_iter()
            .map(|a| pixiu_runtime::ask::answer(to, a.into_answer()))
            .collect(),
        Ok(Message::XiuStoredBatch(answers)) => {
            tracing::warn!(%to, "{} answers to a batch of {n} stores", answers.len());
            vec![
                Err(AskError::Unexpected {
                    to,
                    kind: "xiu_stored_batch of another length",
                    expected: "xiu_stored_batch",
                });
                n
            ]
        }
        Ok(other) => vec![Err(AskError::unexpected(to, &other, "xiu_stored_batch")); n],
        // a Xiu from before batches cannot decode one (during a rolling upgrade): each store
        // goes alone, as such a Xiu expects
        Err(AskError::Refused { reason, .. }) if reason.starts_with("bad frame") => {
            let Message::XiuStoreBatch(stores) = batch else {
                unreachable!("built as a batch above")
            };
            let lone = stores.into_iter().map(|s| {
                let msg = match s.trace {
                    None => Message::XiuStore(s.req),
                    Some(trace) => Message::XiuStoreTraced { req: s.req, trace },
                };
                let transport = transport.clone();
                async move { ask(&transport, to, &msg, left).await }
            });
            futures::future::join_all(lone).await
        }
        Err(e) => vec![Err(e); n],
    };
    for (answer, reply) in answers.into_iter().zip(replies) {
        let _ = reply.send(answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pixiu_protocol::wire::{StoreAnswer, StoreRequest};
    use pixiu_transport::{Inbound, TlsMaterial, TransportConfig};

    fn store(sid: u64) -> BatchedStore {
        BatchedStore {
            req: StoreRequest {
                sid,
                from: 1,
                to: vec![sid],
                body: "b".into(),
                ts: 0,
            },
            trace: None,
        }
    }

    async fn transports() -> (Transport, Transport, mpsc::Receiver<Inbound>) {
        let tls = TlsMaterial::generate_in_memory().expect("in-memory TLS");
        let local: SocketAddr = "127.0.0.1:0".parse().expect("a literal address");
        let (me, _mine) = Transport::bind(TransportConfig::new(local, tls.clone()))
            .await
            .expect("binding");
        let (peer, inbound) = Transport::bind(TransportConfig::new(local, tls))
            .await
            .expect("binding");
        (me, peer, inbound)
    }

    /// A fake leader over real sockets that answers each store by its sid: even stored, odd
    /// refused; it holds its answers until every batch slot is out (or all 200 arrived), so
    /// the later stores queue behind them.
    #[tokio::test]
    async fn waiting_stores_go_together_and_each_gets_its_own_answer() {
        let (me, peer, mut inbound) = transports().await;
        let to = peer.local_addr();
        let leader = tokio::spawn(async move {
            let mut held = Vec::new();
            let mut stores = 0;
            let mut batches = 0;
            while stores < 200 {
                let Some(Inbound::Request { bytes, reply, .. }) = inbound.recv().await else {
                    panic!("expected a request");
                };
                let Ok(Message::XiuStoreBatch(batch)) = pixiu_protocol::wire::decode(&bytes) else {
                    panic!("expected a batch");
                };
                stores += batch.len();
                batches += 1;
                let answers = batch
                    .iter()
                    .map(|s| match s.req.sid % 2 {
                        0 => StoreAnswer::Stored {
                            id: s.req.sid * 10,
                            fresh: true,
                        },
                        _ => StoreAnswer::Refused {
                            reason: format!("odd {}", s.req.sid),
                        },
                    })
                    .collect();
                held.push((reply, Message::XiuStoredBatch(answers)));
                if held.len() == IN_FLIGHT || stores == 200 {
                    for (reply, answer) in held.drain(..) {
                        reply.send(pixiu_protocol::wire::encode(&answer));
                    }
                }
            }
            (batches, peer)
        });
        let batcher = Batcher::new(me);
        let until = Instant::now() + Duration::from_secs(10);
        let asks = (0..200u64).map(|sid| {
            let b = batcher.clone();
            async move { (sid, b.store(to, store(sid), until).await) }
        });
        for (sid, answer) in futures::future::join_all(asks).await {
            match answer {
                Ok(Message::XiuStored { id, fresh: true }) => {
                    assert!(sid % 2 == 0);
                    assert_eq!(id, sid * 10);
                }
                Err(AskError::Refused { reason, .. }) => {
                    assert!(sid % 2 == 1);
                    assert_eq!(reason, format!("odd {sid}"));
                }
                other => panic!("store {sid}: {other:?}"),
            }
        }
        let (batches, _peer) = leader.await.expect("the leader task");
        assert!(batches < 200, "200 stores went in {batches} requests");
    }

    /// A leader from before batches refuses a batch as a bad frame (as `pixiu_runtime::inbound`
    /// does with any frame it cannot decode) and takes lone `XiuStore`s: every store is still
    /// stored, each with its own answer.
    #[tokio::test]
    async fn a_leader_that_cannot_decode_a_batch_gets_the_stores_one_by_one() {
        let (me, peer, mut inbound) = transports().await;
        let to = peer.local_addr();
        let leader = tokio::spawn(async move {
            let (mut batches, mut lone) = (0, 0);
            while lone < 20 {
                let Some(Inbound::Request { bytes, reply, .. }) = inbound.recv().await else {
                    panic!("expected a request");
                };
                let answer = match pixiu_protocol::wire::decode(&bytes) {
                    Ok(Message::XiuStoreBatch(_)) => {
                        batches += 1;
                        Message::Refused {
                            reason: "bad frame: undecodable frame: unknown variant".into(),
                        }
                    }
                    Ok(Message::XiuStore(req)) => {
                        lone += 1;
                        Message::XiuStored {
                            id: req.sid * 10,
                            fresh: true,
                        }
                    }
                    other => panic!("unexpected {other:?}"),
                };
                reply.send(pixiu_protocol::wire::encode(&answer));
            }
            (batches, peer)
        });
        let batcher = Batcher::new(me);
        let until = Instant::now() + Duration::from_secs(10);
        let asks = (0..20u64).map(|sid| {
            let b = batcher.clone();
            async move { (sid, b.store(to, store(sid), until).await) }
        });
        for (sid, answer) in futures::future::join_all(asks).await {
            assert!(
                matches!(answer, Ok(Message::XiuStored { id, .. }) if id == sid * 10),
                "store {sid}: {answer:?}"
            );
        }
        let (batches, _peer) = leader.await.expect("the leader task");
        assert!(batches >= 1);
    }

    /// A leader that never answers: every store gets the timeout by its deadline.
    #[tokio::test]
    async fn a_silent_leader_times_every_store_out() {
        let (me, peer, _inbound) = transports().await;
        let to = peer.local_addr();
        let batcher = Batcher::new(me);
        let until = Instant::now() + Duration::from_millis(300);
        let asks = (0..5u64).map(|sid| {
            let b = batcher.clone();
            async move { b.store(to, store(sid), until).await }
        });
        for answer in futures::future::join_all(asks).await {
            assert!(
                matches!(
                    answer,
                    Err(AskError::Transport {
                        source: TransportError::Timeout,
                        ..
                    })
                ),
                "{answer:?}"
            );
        }
        drop(peer);
    }
}
