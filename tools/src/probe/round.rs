//! One probe round's IO: read the registry, ping every node, keep one WebSocket per
//! pseudo-user, join the round's pseudo-rooms, publish traced messages through every proxy,
//! collect what arrives until everything expected did or the round's timeout, acknowledge
//! personal messages, leave the rooms. The verdicts come from the pure functions of
//! [`super`].

use super::{
    blame, choose_rooms, shares, Kind, NodeKey, NodeRef, Outcome, Path, PseudoUser, Report, Target,
    Topology, DEVICE,
};
use futures::future::{join_all, select_all, FutureExt};
use pixiu_client::{Auth, Client, ClientError, Publisher};
use pixiu_protocol::client::ServerFrame;
use pixiu_protocol::trace::{now_us, HopJson};
use pixiu_protocol::wire::{self, Message};
use pixiu_registry::{Registry, RegistryError, Role};
use pixiu_transport::Transport;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use tokio::time::timeout_at;

/// Why a round could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("reading the registry: {0}")]
    Registry(#[from] RegistryError),
}

/// How the probe runs.
#[derive(Clone, Debug)]
pub struct ProbeConfig {
    pub uid_base: u64,
    /// A round's deadline: a message not delivered by then failed.
    pub timeout: Duration,
    /// How long a node has to answer the probe's ping.
    pub ping_timeout: Duration,
    /// The cluster's auth secret: the probe signs its pseudo-users' and its publisher tokens.
    pub secret: String,
}

struct Conn {
    gateway: u64,
    client: Client,
}

/// A probe between rounds: its transport, and its pseudo-users' connections.
pub struct Prober {
    registry: Registry,
    transport: Transport,
    cfg: ProbeConfig,
    conns: BTreeMap<u64, Conn>,
    round: u64,
}

/// A message the probe sent, as its body names it: `pixiu-probe/<round>/<proxy>/<target>/<µs>`.
fn body(round: u64, proxy: u64, target: u64) -> String {
    format!("pixiu-probe/{round}/{proxy}/{target}/{}", now_us())
}

/// `(round, proxy, target, sent µs)` of a probe message's body.
pub fn parse_body(body: &str) -> Option<(u64, u64, u64, u64)> {
    let mut it = body.strip_prefix("pixiu-probe/")?.split('/');
    let mut next = || it.next()?.parse::<u64>().ok();
    Some((next()?, next()?, next()?, next()?))
}

/// Whether the gateway answered, and what went wrong.
type Failure = (bool, String);

/// Per (uid, room) of a round's joins: `joined`, or why not.
type Joins = BTreeMap<(u64, u64), Result<f64, Failure>>;

/// What the round's publishes and deliveries came to, per target.
#[derive(Default)]
struct Seen {
    /// Answer of each publish: the proxy's status line on failure.
    published: BTreeMap<Target, Result<(), (bool, String)>>,
    /// Delivered: sent µs, received µs, stamps.
    delivered: BTreeMap<Target, (u64, u64, Vec<HopJson>)>,
}

impl Prober {
    pub fn new(registry: Registry, transport: Transport, cfg: ProbeConfig) -> Prober {
        Prober {
            registry,
            transport,
            cfg,
            conns: BTreeMap::new(),
            round: 0,
        }
    }

    /// Close every pseudo-user's connection.
    pub async fn close(self) {
        join_all(self.conns.into_values().map(|c| c.client.close())).await;
    }

    async fn topology(&self) -> Result<Topology, ProbeError> {
        let mut views = BTreeMap::new();
        for role in Role::ALL {
            views.insert(role.as_str(), self.registry.read(role).await?);
        }
        Ok(Topology::from_views(&views))
    }

    /// Runs one round.
    pub async fn round(&mut self) -> Result<Report, ProbeError> {
        self.round += 1;
        let started = Instant::now();
        // each stage has its share of the round, so one frozen node cannot use it all up and
        // leave healthy paths no time: connecting a fifth, joining the next, delivering the rest
        let timeout = self.cfg.timeout;
        let at = move |fifths: u32| tokio::time::Instant::from_std(started + timeout * fifths / 5);
        let topo = self.topology().await?;
        let users = topo.pseudo_users(self.cfg.uid_base);
        let rooms = choose_rooms(&topo, self.cfg.uid_base, self.round);
        let paths = topo.paths(&rooms, &users);
        let nodes = topo.nodes();
        let transport = self.transport.clone();
        let pinging = ping_all(&transport, &nodes, self.cfg.ping_timeout);
        let (pings, (connected, joins)) = tokio::join!(pinging, async {
            let connected = self.connect(&topo, &users, at(1)).await;
            let joins = self.join(&users, &rooms, &connected, at(2)).await;
            (connected, joins)
        });
        let unresponsive: BTreeSet<NodeKey> = pings
            .iter()
            .filter(|(_, r)| r.is_err())
            .map(|(k, _)| k.clone())
            .collect();
        let seen = self
            .exchange(&topo, &paths, &joins, &connected, at(5))
            .await;
        self.leave(&joins).await;
        let evidence = Evidence {
            paths: &paths,
            pings: &pings,
            unresponsive: &unresponsive,
            connected: &connected,
            joins: &joins,
            seen: &seen,
            timeout: self.cfg.timeout,
        };
        let outcomes = paths.iter().map(|p| judge(p, &evidence)).collect();
        Ok(Report {
            round: self.round,
            ms: started.elapsed().as_secs_f64() * 1000.0,
            outcomes,
        })
    }
}

/// Pings every node at once; per node id its round trip in ms, or why it did not answer.
async fn ping_all(
    transport: &Transport,
    nodes: &[NodeRef],
    wait: Duration,
) -> BTreeMap<NodeKey, Result<f64, String>> {
    let asks = nodes.iter().map(|n| async move {
        let res = match n.addr.parse() {
            Err(e) => Err(format!("registered address {:?}: {e}", n.addr)),
            Ok(addr) => {
                let t = Instant::now();
                let ping = wire::encode(&Message::Ping { seq: 0 });
                match transport.request(addr, ping, wait).await {
                    Ok(_) => Ok(t.elapsed().as_secs_f64() * 1000.0),
                    Err(e) => Err(format!("no answer to a ping within {wait:?}: {e}")),
                }
            }
        };
        (n.key(), res)
    });
    join_all(asks).await.into_iter().collect()
}

impl Prober {
    /// Every pseudo-user connected to its gateway (a connection that no longer answers a
    /// ping, or to another gateway, is opened again); per uid why it is not.
    async fn connect(
        &mut self,
        topo: &Topology,
        users: &[PseudoUser],
        deadline: tokio::time::Instant,
    ) -> BTreeMap<u64, Result<(), String>> {
        let wait = self.cfg.ping_timeout;
        let mut keep = BTreeMap::new();
        let checks = users.iter().filter_map(|u| {
            let conn = self.conns.remove(&u.uid)?;
            Some(async move {
                let alive = conn.gateway == u.gateway
                    && matches!(
                        tokio::time::timeout(wait, conn.client.ping()).await,
                        Ok(Ok(()))
                    );
                (u.uid, conn, alive)
            })
        });
        let mut stale = Vec::new();
        for (uid, conn, alive) in join_all(checks).await {
            if alive {
                keep.insert(uid, conn);
            } else {
                stale.push(conn);
            }
        }
        // a stale connection is dropped (aborted), not closed politely: its gateway may be frozen
        drop(stale);
        let secret = self.cfg.secret.clone();
        let opens = users
            .iter()
            .filter(|u| !keep.contains_key(&u.uid))
            .filter_map(|u| {
                let url = topo
                    .gateways
                    .iter()
                    .find(|(g, _)| g.id == u.gateway)?
                    .1
                    .clone();
                let token = pixiu_protocol::auth::issue(
                    secret.as_bytes(),
                    u.uid,
                    Some(DEVICE),
                    false,
                    3600,
                );
                Some(async move {
                    let res =
                        timeout_at(deadline, Client::connect(&url, &Auth::Token(token))).await;
                    (u, res)
                })
            });
        let mut result = BTreeMap::new();
        for (u, res) in join_all(opens).await {
            match res {
                Ok(Ok(client)) => {
                    keep.insert(
                        u.uid,
                        Conn {
                            gateway: u.gateway,
                            client,
                        },
                    );
                }
                Ok(Err(e)) => {
                    result.insert(u.uid, Err(format!("connecting to its gateway: {e}")));
                }
                Err(_) => {
                    result.insert(u.uid, Err("connecting to its gateway: timed out".into()));
                }
            }
        }
        for uid in keep.keys() {
            result.insert(*uid, Ok(()));
        }
        self.conns = keep;
        result
    }

    /// Every member joins every room; per (uid, room) whether the gateway said `joined`, and
    /// if not whether the gateway answered at all.
    async fn join(
        &self,
        users: &[PseudoUser],
        rooms: &[u64],
        connected: &BTreeMap<u64, Result<(), String>>,
        deadline: tokio::time::Instant,
    ) -> Joins {
        let mut asks = Vec::new();
        for u in users.iter().filter(|u| u.member) {
            let Some(conn) = self.conns.get(&u.uid) else {
                continue;
            };
            if !matches!(connected.get(&u.uid), Some(Ok(()))) {
                continue;
            }
            for &room in rooms {
                asks.push(async move {
                    let t = Instant::now();
                    let res = match timeout_at(deadline, conn.client.join(room)).await {
                        Ok(Ok(())) => Ok(t.elapsed().as_secs_f64() * 1000.0),
                        Ok(Err(ClientError::Refused { code, reason })) => {
                            Err((true, format!("join refused: {code}: {reason}")))
                        }
                        Ok(Err(e)) => Err((false, format!("join: {e}"))),
                        Err(_) => Err((false, "join not confirmed in time".to_string())),
                    };
                    ((u.uid, room), res)
                });
            }
        }
        join_all(asks).await.into_iter().collect()
    }

    /// Publishes every traced message and collects the deliveries until each expected one
    /// arrived or the deadline; acknowledges every personal message received.
    async fn exchange(
        &mut self,
        topo: &Topology,
        paths: &[Path],
        joins: &Joins,
        connected: &BTreeMap<u64, Result<(), String>>,
        deadline: tokio::time::Instant,
    ) -> Seen {
        let token = pixiu_protocol::auth::issue(self.cfg.secret.as_bytes(), 0, None, true, 3600);
        let mut expected: BTreeSet<Target> = BTreeSet::new();
        let mut sends = BTreeSet::new();
        for p in paths {
            match &p.target {
                Target::Room { proxy, room, uid } => {
                    if matches!(joins.get(&(*uid, *room)), Some(Ok(_))) {
                        expected.insert(p.target.clone());
                        sends.insert((Kind::Room, *proxy, *room));
                    }
                }
                Target::Inbox { proxy, uid } => {
                    sends.insert((Kind::Inbox, *proxy, *uid));
                    if matches!(connected.get(uid), Some(Ok(()))) {
                        expected.insert(p.target.clone());
                    }
                }
                Target::Node | Target::Missing | Target::Join { .. } => {}
            }
        }
        let (tx, mut results) = tokio::sync::mpsc::unbounded_channel();
        let round = self.round;
        for (kind, proxy, target) in sends {
            let Some((_, http)) = topo.proxies.iter().find(|(n, _)| n.id == proxy) else {
                continue;
            };
            let publisher = Publisher::new(&format!("http://{http}"), Some(token.clone()));
            let tx = tx.clone();
            tokio::spawn(async move {
                let text = body(round, proxy, target);
                let res = match kind {
                    Kind::Room => publisher.publish_room_traced(target, &text).await,
                    _ => publisher.send_user_traced(target, &text).await,
                };
                let res = res.map(|_| ()).map_err(|e| match e {
                    ClientError::Http { status, body } => (true, format!("HTTP {status}: {body}")),
                    other => (false, format!("publish: {other}")),
                });
                let _ = tx.send((kind, proxy, target, res));
            });
        }
        drop(tx);
        let mut seen = Seen::default();
        let mut publishing = true;
        while publishing || !expected.iter().all(|t| seen.delivered.contains_key(t)) {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                r = results.recv(), if publishing => match r {
                    None => publishing = false,
                    Some((kind, proxy, target, res)) => {
                        for p in paths.iter().filter(|p| sent_by(&p.target, kind, proxy, target)) {
                            seen.published.insert(p.target.clone(), res.clone());
                        }
                    }
                },
                (uid, frame) = next_event(&mut self.conns) => {
                    self.arrived(uid, frame, &mut seen).await;
                }
            }
        }
        seen
    }

    /// One frame from pseudo-user `uid` (`None`: its connection closed).
    async fn arrived(&mut self, uid: u64, frame: Option<ServerFrame>, seen: &mut Seen) {
        let received = now_us();
        let (target, body, trace) = match frame {
            None => {
                self.conns.remove(&uid);
                return;
            }
            Some(ServerFrame::Room {
                room, body, trace, ..
            }) => (Some(room.0), body, trace),
            Some(ServerFrame::Inbox {
                id, body, trace, ..
            }) => {
                if let Some(c) = self.conns.get(&uid) {
                    // acknowledged whatever round sent it, so nothing piles up
                    let _ = c.client.ack(id.0).await;
                }
                (None, body, trace)
            }
            Some(_) => return,
        };
        let Some((round, proxy, to, sent)) = parse_body(&body) else {
            return;
        };
        if round != self.round {
            return;
        }
        let key = match target {
            Some(room) if room == to => Target::Room { proxy, room, uid },
            None if uid == to => Target::Inbox { proxy, uid },
            _ => return,
        };
        seen.delivered
            .entry(key)
            .or_insert((sent, received, trace.unwrap_or_default()));
    }

    /// Every member leaves the rooms it joined (best effort, briefly).
    async fn leave(&self, joins: &Joins) {
        let wait = self.cfg.ping_timeout;
        let leaves = joins
            .iter()
            .filter(|(_, r)| r.is_ok())
            .filter_map(|((uid, room), _)| {
                let c = self.conns.get(uid)?;
                Some(tokio::time::timeout(wait, c.client.leave(*room)))
            });
        join_all(leaves).await;
    }
}

fn sent_by(t: &Target, kind: Kind, proxy: u64, target: u64) -> bool {
    match (t, kind) {
        (Target::Room { proxy: p, room, .. }, Kind::Room) => *p == proxy && *room == target,
        (Target::Inbox { proxy: p, uid }, Kind::Inbox) => *p == proxy && *uid == target,
        _ => false,
    }
}

/// The next frame of any pseudo-user; pending forever when none is connected.
async fn next_event(conns: &mut BTreeMap<u64, Conn>) -> (u64, Option<ServerFrame>) {
    if conns.is_empty() {
        return std::future::pending().await;
    }
    let waits = conns
        .iter_mut()
        .map(|(uid, c)| c.client.next_event().map(move |f| (*uid, f)).boxed());
    select_all(waits).await.0
}

/// Everything a round saw, for the verdicts.
struct Evidence<'a> {
    paths: &'a [Path],
    pings: &'a BTreeMap<NodeKey, Result<f64, String>>,
    unresponsive: &'a BTreeSet<NodeKey>,
    connected: &'a BTreeMap<u64, Result<(), String>>,
    joins: &'a Joins,
    seen: &'a Seen,
    timeout: Duration,
}

/// A path that worked: its latency and hop shares.
fn passed(p: &Path, ms: f64, hops: Vec<super::Share>) -> Outcome {
    Outcome {
        kind: p.kind,
        path: p.name.clone(),
        ok: true,
        ms: Some(ms),
        hops,
        reason: None,
        blame: None,
    }
}

/// A path that failed: why, and the node its route blames given what was `seen`.
fn failed(p: &Path, v: &Evidence<'_>, reason: String, seen: BTreeSet<NodeKey>) -> Outcome {
    Outcome {
        kind: p.kind,
        path: p.name.clone(),
        ok: false,
        ms: None,
        hops: Vec::new(),
        reason: Some(reason),
        blame: blame(&p.route, &seen, v.unresponsive).cloned(),
    }
}

/// Whether pseudo-user `uid` is connected to its gateway, and if not why.
fn connection(v: &Evidence<'_>, uid: u64) -> Result<(), String> {
    v.connected
        .get(&uid)
        .cloned()
        .unwrap_or_else(|| Err("not connected".into()))
}

/// A path's verdict from what the round saw.
fn judge(p: &Path, v: &Evidence<'_>) -> Outcome {
    let none = BTreeSet::new;
    match &p.target {
        Target::Missing => {
            let reason = format!("{}: nothing can be probed through it", p.name);
            failed(p, v, reason, none())
        }
        Target::Node => {
            let node = p.route.first().map(NodeRef::key);
            match node.and_then(|k| v.pings.get(&k)) {
                Some(Ok(ms)) => passed(p, *ms, Vec::new()),
                Some(Err(e)) => failed(p, v, e.clone(), none()),
                None => failed(p, v, "not pinged".into(), none()),
            }
        }
        Target::Join { uid, room } => match (connection(v, *uid), v.joins.get(&(*uid, *room))) {
            (Err(e), _) => failed(p, v, e, none()),
            (Ok(()), Some(Ok(ms))) => passed(p, *ms, Vec::new()),
            (Ok(()), Some(Err((answered, reason)))) => {
                // a gateway that answered with a refusal did its part
                let ids = answered
                    .then(|| p.route.first().map(NodeRef::key))
                    .flatten()
                    .into_iter()
                    .collect();
                failed(p, v, reason.clone(), ids)
            }
            (Ok(()), None) => failed(p, v, "no join was tried".into(), none()),
        },
        Target::Room { uid, .. } | Target::Inbox { uid, .. } => judge_message(p, *uid, v),
    }
}

/// The verdict of a room or personal message path to pseudo-user `uid`.
fn judge_message(p: &Path, uid: u64, v: &Evidence<'_>) -> Outcome {
    if let Some((sent, received, trace)) = v.seen.delivered.get(&p.target) {
        let ms = received.saturating_sub(*sent) as f64 / 1000.0;
        return passed(p, ms, shares(*sent, *received, trace));
    }
    if let Target::Room { room, .. } = &p.target {
        if let Some(Err((_, reason))) = v.joins.get(&(uid, *room)) {
            // not tried: blamed like its member's join
            let join = Target::Join { uid, room: *room };
            let Some(join) = v.paths.iter().find(|j| j.target == join) else {
                let reason = format!("its member's join failed ({reason})");
                return failed(p, v, reason, BTreeSet::new());
            };
            let mut out = judge(join, v);
            out.kind = p.kind;
            out.path = p.name.clone();
            out.reason = Some(format!("not sent: the member's join failed ({reason})"));
            return out;
        }
    }
    let timeout = v.timeout;
    let mut ids = relayed_by(v.seen, &p.target);
    let reason = match (v.seen.published.get(&p.target), connection(v, uid)) {
        (None, _) => format!("the proxy did not answer within {timeout:?}"),
        (Some(Err((answered, reason))), _) => {
            if *answered {
                ids.extend(p.route.first().map(NodeRef::key));
            }
            reason.clone()
        }
        (Some(Ok(())), Err(e)) => {
            ids.extend(accepted_by(p));
            format!("accepted, but the receiver is not connected: {e}")
        }
        (Some(Ok(())), Ok(())) => {
            ids.extend(accepted_by(p));
            format!("accepted, not delivered within {timeout:?}")
        }
    };
    failed(p, v, reason, ids)
}

/// The nodes an accepted publish proves worked: the proxy; for a personal message (201 means
/// stored and indexed) also the Xiu and Pi leaders (the first of each role on the route).
fn accepted_by(p: &Path) -> Vec<NodeKey> {
    let mut ids: Vec<NodeKey> = p.route.first().map(NodeRef::key).into_iter().collect();
    if p.kind == Kind::Inbox {
        for role in ["xiu", "pi"] {
            ids.extend(p.route.iter().find(|n| n.role == role).map(NodeRef::key));
        }
    }
    ids
}

/// Nodes that stamped the same message on its way to another pseudo-user (a room message
/// fans out to every member).
fn relayed_by(seen: &Seen, t: &Target) -> BTreeSet<NodeKey> {
    let Target::Room { proxy, room, .. } = t else {
        return BTreeSet::new();
    };
    seen.delivered
        .iter()
        .filter(
            |(k, _)| matches!(k, Target::Room { proxy: p, room: r, .. } if p == proxy && r == room),
        )
        .flat_map(|(_, (_, _, trace))| trace.iter().filter(|h| h.role != "gateway"))
        .map(|h| (h.role.clone(), h.partition, h.node.0))
        .collect()
}
