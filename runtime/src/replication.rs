//! What the leader-based roles (Xiu, Pi) share about replication: who leads a partition
//! ([`place`], [`peers`]), where each follower is, waiting until `min_insync` followers hold a
//! position, many tasks waiting for one position to pass theirs ([`Watermark`]), and the
//! request/drain loop of a replica ([`serve_replica`], [`mark_running`]).
//!
//! A position is the store's own order: a Xiu counter or a Pi LogId. Followers pull: each
//! pull says "I durably hold everything up to `after`", which is what the leader records.
//!
//! During a doubling a partition's [`Lineage`] says whether it still has to take its users
//! over from a parent (no IO: it is decided from the registry view and the recorded doubling).

use pixiu_registry::{Member, RoleView};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

/// Where a partition stands in the doubling of its role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lineage {
    /// Serves its users on its own: an original partition, or a new one whose doubling is
    /// complete (every replica served the new count, so its handoff happened).
    Settled,
    /// A new partition of the doubling to `to`, whose users `uid % to == partition` its
    /// `parent` served before. `flipped`: `partition_num` is `to` already (the parent stops
    /// writing for those users at a mark it tells); before, the parent serves them alone.
    Child { parent: u32, to: u32, flipped: bool },
}

/// The [`Lineage`] of `partition` when the role's `partition_num` is as published and `last`
/// is the last recorded doubling. A partition beyond `partition_num` is a child of
/// `partition % partition_num` in the coming doubling; one inside it is a child only while
/// the doubling that made it is recorded as under way.
pub fn lineage(
    partition: u32,
    partition_num: u32,
    last: Option<pixiu_registry::Doubling>,
) -> Lineage {
    if partition_num == 0 {
        return Lineage::Settled;
    }
    if partition >= partition_num {
        return Lineage::Child {
            parent: partition % partition_num,
            to: partition_num.saturating_mul(2),
            flipped: false,
        };
    }
    match last {
        Some(d)
            if d.done_ms.is_none()
                && d.to == partition_num
                && (d.from..d.to).contains(&partition)
                && d.from > 0 =>
        {
            Lineage::Child {
                parent: partition - d.from,
                to: d.to,
                flipped: true,
            }
        }
        _ => Lineage::Settled,
    }
}

/// This node's place in its partition (seed 8.2.3: the smallest sequence number leads).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    Leader,
    Follower {
        leader: u64,
        addr: SocketAddr,
    },
    /// Not (yet) in the view, or the leader's address is unreadable.
    Unknown,
}

/// Where node `me` stands in `partition` of `view`.
pub fn place(view: &RoleView, partition: u32, me: u64) -> Place {
    let members = view.members(partition);
    if !members.iter().any(|m| m.id == me) {
        return Place::Unknown;
    }
    match view.leader(partition) {
        Some(l) if l.id == me => Place::Leader,
        Some(l) => match l.addr() {
            Some(addr) => Place::Follower { leader: l.id, addr },
            None => Place::Unknown,
        },
        None => Place::Unknown,
    }
}

/// The leader's record of its followers' positions.
#[derive(Debug)]
pub struct Followers {
    seen: Mutex<HashMap<u64, (u64, Instant)>>,
    changed: watch::Sender<u64>,
    /// A follower not heard from for this long does not count as in sync.
    stale_after: Duration,
}

impl Followers {
    pub fn new(stale_after: Duration) -> Followers {
        Followers {
            seen: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
            stale_after,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (u64, Instant)>> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Follower `node` durably holds every position up to `pos`.
    pub fn report(&self, node: u64, pos: u64) {
        self.lock().insert(node, (pos, Instant::now()));
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Wakes on every report.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Forget every follower (a new term of leadership starts from what followers report).
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// The highest position that at least `min` live followers hold (`u64::MAX` when `min` is 0,
    /// 0 when fewer than `min` followers are live).
    pub fn insync(&self, min: usize) -> u64 {
        if min == 0 {
            return u64::MAX;
        }
        let now = Instant::now();
        let mut pos: Vec<u64> = self
            .lock()
            .values()
            .filter(|(_, at)| now.duration_since(*at) <= self.stale_after)
            .map(|(p, _)| *p)
            .collect();
        if pos.len() < min {
            return 0;
        }
        pos.sort_unstable_by(|a, b| b.cmp(a));
        pos[min - 1]
    }

    /// Live followers and their positions, for metrics and logs.
    pub fn live(&self) -> Vec<(u64, u64)> {
        let now = Instant::now();
        self.lock()
            .iter()
            .filter(|(_, (_, at))| now.duration_since(*at) <= self.stale_after)
            .map(|(n, (p, _))| (*n, *p))
            .collect()
    }

    /// Waits until at least `min` followers hold `pos`; false when `timeout` passes first.
    pub async fn wait_for(&self, pos: u64, min: usize, timeout: Duration) -> bool {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.insync(min) >= pos {
                return true;
            }
            // re-check at least every 100 ms: a follower may go stale without a report
            let wake = (tokio::time::Instant::now() + Duration::from_millis(100)).min(deadline);
            tokio::select! {
                _ = rx.changed() => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return self.insync(min) >= pos;
            }
        }
    }
}

/// The leader's latest position, for followers' long polls.
#[derive(Debug)]
pub struct Head(watch::Sender<u64>);

impl Head {
    pub fn new(pos: u64) -> Head {
        Head(watch::channel(pos).0)
    }

    pub fn set(&self, pos: u64) {
        self.0.send_if_modified(|p| {
            if pos > *p {
                *p = pos;
                true
            } else {
                false
            }
        });
    }

    pub fn get(&self) -> u64 {
        *self.0.borrow()
    }

    /// Wakes whenever the head moves.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }

    /// Waits until the head is above `after`, at most `wait`.
    pub async fn wait_above(&self, after: u64, wait: Duration) {
        let mut rx = self.0.subscribe();
        let _ = tokio::time::timeout(wait, rx.wait_for(|p| *p > after)).await;
    }
}

/// A position that many tasks wait to reach, like a `watch` channel of a `u64` read with
/// `wait_for(|p| *p >= pos)`, except that a move wakes only the waiters it satisfies. A watch
/// channel wakes every waiter on every move, and a Xiu leader has one waiter per store not yet
/// acknowledged: thousands under load, woken on every Pi batch. The position may also move
/// back (a new term starts from a smaller mark); waiters then keep waiting.
#[derive(Debug)]
pub struct Watermark(Mutex<MarkState>);

#[derive(Debug)]
struct MarkState {
    pos: u64,
    /// Waiters by the position they wait for.
    waiters: BTreeMap<u64, Vec<oneshot::Sender<()>>>,
    count: usize,
    /// Waiters whose task gave up (timed out) are dropped once `count` passes this.
    prune_at: usize,
}

/// Waiters kept before the first sweep of those that gave up.
const MIN_PRUNE_AT: usize = 4096;

impl Watermark {
    pub fn new(pos: u64) -> Watermark {
        Watermark(Mutex::new(MarkState {
            pos,
            waiters: BTreeMap::new(),
            count: 0,
            prune_at: MIN_PRUNE_AT,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MarkState> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn get(&self) -> u64 {
        self.lock().pos
    }

    /// Moves the position (either way) and wakes the waiters it reached.
    pub fn set(&self, pos: u64) {
        let reached = {
            let mut s = self.lock();
            s.pos = pos;
            let reached = match pos.checked_add(1) {
                Some(above) => {
                    let rest = s.waiters.split_off(&above);
                    std::mem::replace(&mut s.waiters, rest)
                }
                None => std::mem::take(&mut s.waiters),
            };
            s.count -= reached.values().map(Vec::len).sum::<usize>();
            reached
        };
        for tx in reached.into_values().flatten() {
            let _ = tx.send(());
        }
    }

    /// Waits until the position is at least `pos`; false when `timeout` passes first.
    pub async fn wait_until(&self, pos: u64, timeout: Duration) -> bool {
        let rx = {
            let mut s = self.lock();
            if s.pos >= pos {
                return true;
            }
            if s.count >= s.prune_at {
                s.waiters.retain(|_, txs| {
                    txs.retain(|tx| !tx.is_closed());
                    !txs.is_empty()
                });
                s.count = s.waiters.values().map(Vec::len).sum();
                s.prune_at = (2 * s.count).max(MIN_PRUNE_AT);
            }
            let (tx, rx) = oneshot::channel();
            s.waiters.entry(pos).or_default().push(tx);
            s.count += 1;
            rx
        };
        matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(())))
    }

    /// Waiters registered and not yet reached (including any that gave up since the last sweep).
    pub fn waiting(&self) -> usize {
        self.lock().count
    }
}

/// The other members of `partition` in `view` (not `me`), as addresses: the peers a new
/// leader asks for what they hold beyond its own copy.
pub fn peers(view: &RoleView, partition: u32, me: u64) -> Vec<SocketAddr> {
    view.members(partition)
        .iter()
        .filter(|m| m.id != me)
        .filter_map(Member::addr)
        .collect()
}

/// The request loop of a replicated store (Xiu, Pi), until shutdown: each inbound request
/// is decoded ([`crate::inbound::decode`]) and answered with what `handle` returns, on its own
/// task; a one-way message is counted as unexpected. Each change of `state` (from the role
/// loop) is published in the registry and on `/healthz` (ready when running), and each
/// `serving` count as `NodeInfo::serving` (what `scale-out` waits for). Then the drain:
/// not ready, `drain()` (the service's last writes), deregister, close the transport.
pub async fn serve_replica<H, Fut>(
    service: crate::Service,
    mut inbound: tokio::sync::mpsc::Receiver<pixiu_transport::Inbound>,
    mut state: watch::Receiver<pixiu_registry::NodeState>,
    mut serving: watch::Receiver<Option<u32>>,
    handle: H,
    drain: impl FnOnce(),
) -> Result<(), crate::RuntimeError>
where
    H: Fn(pixiu_protocol::wire::Message) -> Fut,
    Fut: std::future::Future<Output = pixiu_protocol::wire::Message> + Send + 'static,
{
    use crate::inbound::{self, Received};
    let shutdown = service.shutdown.clone();
    let role = service.role.as_str();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(msg) = inbound.recv() => match inbound::decode(msg, &service.metrics) {
                Some(Received::Request { msg, reply, .. }) => {
                    let answer = handle(msg);
                    tokio::spawn(async move {
                        reply.send(pixiu_protocol::wire::encode(&answer.await));
                    });
                }
                Some(Received::Message { from, msg, .. }) => {
                    inbound::unexpected(&service.metrics, role, from, &msg, None);
                }
                None => {}
            },
            Ok(()) = state.changed() => {
                let now = *state.borrow_and_update();
                service.set_state(now).await?;
            }
            Ok(()) = serving.changed() => {
                let now = *serving.borrow_and_update();
                if let Some(n) = now {
                    service.set_serving(n).await?;
                }
            }
        }
    }
    drain();
    service.drain(async {}).await;
    Ok(())
}

/// A role loop's wait: `pause`, cut short when `view` (if given) changes. False when shutdown
/// came first (the loop then ends).
pub async fn rest(
    shutdown: &crate::Shutdown,
    view: Option<&mut watch::Receiver<std::sync::Arc<RoleView>>>,
    pause: Duration,
) -> bool {
    let changed = async {
        match view {
            Some(v) => {
                let _ = v.changed().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = changed => true,
        _ = tokio::time::sleep(pause) => true,
    }
}

/// Marks a replica running; a no-op when it already is, so that a role loop may say it on
/// every turn without a registry write each time.
pub fn mark_running(state: &watch::Sender<pixiu_registry::NodeState>) {
    use pixiu_registry::NodeState;
    state.send_if_modified(|s| std::mem::replace(s, NodeState::Running) != NodeState::Running);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    #[tokio::test]
    async fn a_watermark_wakes_exactly_the_waiters_it_reached() {
        let mark = std::sync::Arc::new(Watermark::new(5));
        assert!(mark.wait_until(5, Duration::from_millis(1)).await);
        let waiter = |pos: u64| {
            let mark = mark.clone();
            tokio::spawn(async move { mark.wait_until(pos, Duration::from_secs(10)).await })
        };
        let (w7, w9) = (waiter(7), waiter(9));
        while mark.waiting() < 2 {
            tokio::task::yield_now().await;
        }
        mark.set(8);
        assert!(w7.await.unwrap());
        assert_eq!(mark.waiting(), 1, "the waiter for 9 is still waiting");
        // moving back wakes nobody; moving past wakes the rest
        mark.set(3);
        assert_eq!(mark.waiting(), 1);
        assert!(!w9.is_finished());
        mark.set(u64::MAX);
        assert!(w9.await.unwrap());
        assert_eq!(mark.waiting(), 0);
    }

    #[tokio::test]
    async fn a_watermark_waiter_times_out_and_given_up_waiters_are_swept() {
        let mark = Watermark::new(0);
        assert!(!mark.wait_until(1, Duration::from_millis(5)).await);
        // waiters that register and give up (polled once, then dropped): without sweeps they
        // would pile up to 8,192
        let waker = std::task::Waker::noop();
        for pos in 0..2 * MIN_PRUNE_AT as u64 {
            let mut wait = std::pin::pin!(mark.wait_until(pos + 1, Duration::from_secs(10)));
            let polled = wait
                .as_mut()
                .poll(&mut std::task::Context::from_waker(waker));
            assert!(polled.is_pending());
            assert!(mark.waiting() <= MIN_PRUNE_AT, "{}", mark.waiting());
        }
        assert!(mark.waiting() > 0);
    }

    #[test]
    fn lineage_follows_the_doubling_from_start_to_done() {
        use pixiu_registry::Doubling;
        let under_way = Some(Doubling {
            from: 2,
            to: 4,
            done_ms: None,
        });
        let done = Some(Doubling {
            from: 2,
            to: 4,
            done_ms: Some(1),
        });
        // an original partition is settled whatever is recorded
        assert_eq!(lineage(1, 2, under_way), Lineage::Settled);
        assert_eq!(lineage(1, 4, under_way), Lineage::Settled);
        // a new partition before the flip: its parent serves its users alone
        let before = Lineage::Child {
            parent: 1,
            to: 4,
            flipped: false,
        };
        assert_eq!(lineage(3, 2, None), before);
        assert_eq!(lineage(3, 2, under_way), before);
        // after the flip, until the doubling is recorded done
        let after = Lineage::Child {
            parent: 1,
            to: 4,
            flipped: true,
        };
        assert_eq!(lineage(3, 4, under_way), after);
        assert_eq!(
            lineage(2, 4, under_way),
            Lineage::Child {
                parent: 0,
                to: 4,
                flipped: true
            }
        );
        assert_eq!(lineage(3, 4, done), Lineage::Settled);
        // a child of an older doubling is settled; so is everything with no partitions
        assert_eq!(
            lineage(
                1,
                4,
                Some(Doubling {
                    from: 1,
                    to: 2,
                    done_ms: None
                })
            ),
            Lineage::Settled
        );
        assert_eq!(lineage(0, 0, None), Lineage::Settled);
        // counts that are not powers of two: 3 -> 6
        assert_eq!(
            lineage(5, 3, None),
            Lineage::Child {
                parent: 2,
                to: 6,
                flipped: false
            }
        );
    }
    use pixiu_registry::{Member, NodeInfo};

    #[test]
    fn marking_running_again_notifies_nobody() {
        let (tx, mut rx) = watch::channel(pixiu_registry::NodeState::Init);
        mark_running(&tx);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), pixiu_registry::NodeState::Running);
        mark_running(&tx);
        assert!(!rx.has_changed().unwrap(), "no second registry write");
    }

    #[test]
    fn smallest_id_leads() {
        let mut view = RoleView::default();
        let m = |id: u64, addr: &str| Member {
            id,
            name: format!("node-{id:010}"),
            info: NodeInfo::new(addr),
        };
        view.partitions
            .insert(0, vec![m(3, "127.0.0.1:1"), m(7, "127.0.0.1:2")]);
        assert_eq!(place(&view, 0, 3), Place::Leader);
        assert_eq!(
            place(&view, 0, 7),
            Place::Follower {
                leader: 3,
                addr: "127.0.0.1:1".parse().unwrap()
            }
        );
        assert_eq!(place(&view, 0, 9), Place::Unknown);
        assert_eq!(place(&view, 1, 3), Place::Unknown);
    }

    #[tokio::test]
    async fn insync_is_the_min_th_highest_live_position() {
        let f = Followers::new(Duration::from_secs(60));
        assert_eq!(f.insync(0), u64::MAX);
        assert_eq!(f.insync(1), 0);
        f.report(1, 10);
        f.report(2, 5);
        assert_eq!(f.insync(1), 10);
        assert_eq!(f.insync(2), 5);
        assert_eq!(f.insync(3), 0);
        assert!(f.wait_for(5, 2, Duration::from_millis(10)).await);
        assert!(!f.wait_for(11, 1, Duration::from_millis(50)).await);
        let f = std::sync::Arc::new(f);
        let g = f.clone();
        let waiter = tokio::spawn(async move { g.wait_for(12, 1, Duration::from_secs(5)).await });
        f.report(2, 12);
        assert!(waiter.await.unwrap());
    }

    #[tokio::test]
    async fn stale_followers_do_not_count() {
        let f = Followers::new(Duration::from_millis(20));
        f.report(1, 10);
        assert_eq!(f.insync(1), 10);
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(f.insync(1), 0);
        assert!(f.live().is_empty());
    }

    #[tokio::test]
    async fn head_wakes_long_polls() {
        let h = std::sync::Arc::new(Head::new(3));
        h.set(2);
        assert_eq!(h.get(), 3);
        let g = h.clone();
        let t = tokio::spawn(async move {
            let start = Instant::now();
            g.wait_above(3, Duration::from_secs(5)).await;
            start.elapsed()
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        h.set(4);
        assert!(t.await.unwrap() < Duration::from_secs(4));
    }
}
