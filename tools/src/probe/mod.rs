//! `pixiu-ctl probe`: the seed's synthetic latency probe (seed 5), which also names the hop
//! that failed.
//!
//! Every round the probe reads the registry and builds the paths the routing rules prescribe
//! for it ([`Topology::paths`]): joins of pseudo-rooms chosen so that every broker partition and
//! replica and every router partition carries one ([`choose_rooms`]), traced room messages
//! from every running proxy to a pseudo-user on every running gateway, traced personal
//! messages to pseudo-users covering every Xiu and Pi partition, and a direct ping of every
//! running node. What arrived is judged here without IO: latency and each hop's share from the
//! `trace` stamps ([`shares`]), and for a path that failed the node to blame ([`blame`]): the
//! first node of its route that did not answer the probe's ping and was not seen passing the
//! message on, else the first one not seen. `round.rs` does the IO, `serve.rs` the metrics.

pub mod round;
pub mod serve;

use pixiu_protocol::routing::{broker_partition, pick_replica, user_partition};
use pixiu_protocol::trace::HopJson;
use pixiu_registry::{Role, RoleView};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// The first pseudo-user id (and pseudo-room id): far above any id an application hands out.
pub const DEFAULT_UID_BASE: u64 = 18_446_744_073_709_000_000;
/// Distance between the pseudo-room ranges of consecutive rounds (a multiple of 64, so room
/// ids keep their residues modulo every partition count up to 64).
pub const ROOM_STRIDE: u64 = 1_000_000;
/// Room generations cycled through, so the routers' tables hold a bounded set of probe rows.
pub const GENERATIONS: u64 = 4;
/// The device name of every pseudo-user.
pub const DEVICE: &str = "probe";

/// One node as the probe names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct NodeRef {
    pub role: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    /// Registry id (the replica id of a partitioned role).
    pub id: u64,
    pub addr: String,
}

impl std::fmt::Display for NodeRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.partition {
            Some(p) => write!(
                f,
                "{} partition {p} replica {} at {}",
                self.role, self.id, self.addr
            ),
            None => write!(f, "{} {} at {}", self.role, self.id, self.addr),
        }
    }
}

/// What identifies a node: registry ids are numbered per role and partition folder, so the
/// id alone does not.
pub type NodeKey = (String, Option<u32>, u64);

impl NodeRef {
    pub fn key(&self) -> NodeKey {
        (self.role.to_string(), self.partition, self.id)
    }

    fn short(&self) -> String {
        match self.partition {
            Some(p) => format!("{} {p}/{}", self.role, self.id),
            None => format!("{} {}", self.role, self.id),
        }
    }
}

/// The running nodes of every role, as one round sees them.
#[derive(Clone, Debug, Default)]
pub struct Topology {
    /// Running gateways, by id, with their WebSocket URL.
    pub gateways: Vec<(NodeRef, String)>,
    /// Running proxies, by id, with their publisher HTTP address.
    pub proxies: Vec<(NodeRef, String)>,
    /// Per partitioned role: `partition_num` and the running replicas of each counted
    /// partition, by id (a Xiu or Pi partition's leader first, whatever its state).
    pub partitioned: BTreeMap<&'static str, (u32, BTreeMap<u32, Vec<NodeRef>>)>,
}

fn node(role: Role, partition: Option<u32>, m: &pixiu_registry::Member) -> NodeRef {
    NodeRef {
        role: role.as_str(),
        partition,
        id: m.id,
        addr: m.info.addr.clone(),
    }
}

impl Topology {
    /// The topology of the registry views of every role (`views[role]`).
    pub fn from_views(views: &BTreeMap<&'static str, RoleView>) -> Topology {
        let mut t = Topology::default();
        let empty = RoleView::default();
        let view = |r: Role| views.get(r.as_str()).unwrap_or(&empty);
        for m in view(Role::Gateway).running(0) {
            if let Some(url) = &m.info.client_url {
                t.gateways.push((node(Role::Gateway, None, m), url.clone()));
            }
        }
        for m in view(Role::Proxy).running(0) {
            if let Some(http) = &m.info.http {
                t.proxies.push((node(Role::Proxy, None, m), http.clone()));
            }
        }
        for role in [Role::Broker, Role::Router, Role::Xiu, Role::Pi] {
            let v = view(role);
            let n = v.partition_num.max(1);
            let mut parts = BTreeMap::new();
            for p in 0..n {
                let leader_based = matches!(role, Role::Xiu | Role::Pi);
                let nodes: Vec<NodeRef> = v
                    .members(p)
                    .iter()
                    .enumerate()
                    // a Xiu or Pi leader is on every write's path whatever its state
                    .filter(|(i, m)| m.is_running() || (leader_based && *i == 0))
                    .map(|(_, m)| node(role, Some(p), m))
                    .collect();
                parts.insert(p, nodes);
            }
            t.partitioned.insert(role.as_str(), (n, parts));
        }
        t
    }

    fn role(&self, role: Role) -> (u32, &BTreeMap<u32, Vec<NodeRef>>) {
        static EMPTY: BTreeMap<u32, Vec<NodeRef>> = BTreeMap::new();
        match self.partitioned.get(role.as_str()) {
            Some((n, parts)) => (*n, parts),
            None => (1, &EMPTY),
        }
    }

    fn replicas(&self, role: Role, partition: u32) -> &[NodeRef] {
        self.role(role)
            .1
            .get(&partition)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// The replica of a room-keyed role (broker, router) that the rules pick for `hash`.
    fn pick(&self, role: Role, hash: u64) -> Option<&NodeRef> {
        let (n, _) = self.role(role);
        let replicas = self.replicas(role, broker_partition(hash, n));
        pick_replica(hash, n, replicas.len()).and_then(|i| replicas.get(i))
    }

    /// Every node the probe pings: the running ones, and each Xiu and Pi leader.
    pub fn nodes(&self) -> Vec<NodeRef> {
        let mut all: Vec<NodeRef> = self.gateways.iter().map(|(n, _)| n.clone()).collect();
        all.extend(self.proxies.iter().map(|(n, _)| n.clone()));
        for (_, parts) in self.partitioned.values() {
            all.extend(parts.values().flatten().cloned());
        }
        all
    }

    /// Partitions a user-keyed role (Xiu, Pi) counts.
    fn count(&self, role: Role) -> u32 {
        self.role(role).0
    }

    /// How many pseudo-users carry personal messages: enough that their ids cover every Xiu
    /// and every Pi partition (`uid % N`).
    pub fn receivers(&self) -> u64 {
        u64::from(self.count(Role::Xiu).max(self.count(Role::Pi)))
    }

    /// The paths of one round.
    pub fn paths(&self, rooms: &[u64], users: &[PseudoUser]) -> Vec<Path> {
        let mut paths = Vec::new();
        for (missing, none) in [
            ("no running gateway", self.gateways.is_empty()),
            ("no running proxy", self.proxies.is_empty()),
        ] {
            if none {
                paths.push(Path {
                    kind: Kind::Reach,
                    name: missing.into(),
                    route: Vec::new(),
                    target: Target::Missing,
                });
            }
        }
        for n in self.nodes() {
            paths.push(Path {
                kind: Kind::Reach,
                name: n.short(),
                route: vec![n],
                target: Target::Node,
            });
        }
        for member in users.iter().filter(|u| u.member) {
            if let Some(gw) = self.gateway(member.gateway) {
                self.member_paths(member.uid, gw, rooms, &mut paths);
            }
        }
        for receiver in users.iter().filter(|u| u.receiver) {
            if let Some(gw) = self.gateway(receiver.gateway) {
                self.inbox_paths(receiver.uid, gw, &mut paths);
            }
        }
        paths
    }

    /// The joins of room member `uid` on gateway `gw`, and the room messages from every proxy
    /// to it.
    fn member_paths(&self, uid: u64, gw: &NodeRef, rooms: &[u64], paths: &mut Vec<Path>) {
        let (rn, _) = self.role(Role::Router);
        let (bn, _) = self.role(Role::Broker);
        for &room in rooms {
            let mut route = vec![gw.clone()];
            // every replica of the router partition: updates pass between them and reach
            // the brokers through whichever one a broker subscribed to
            let rp = broker_partition(room, rn);
            let picked = self.pick(Role::Router, room);
            route.extend(picked.cloned());
            route.extend(
                self.replicas(Role::Router, rp)
                    .iter()
                    .filter(|r| Some(*r) != picked)
                    .cloned(),
            );
            let bp = broker_partition(room, bn);
            route.extend(self.replicas(Role::Broker, bp).iter().cloned());
            paths.push(Path {
                kind: Kind::Join,
                name: format!("gateway {} -> router {rp} -> broker {bp}", gw.id),
                route,
                target: Target::Join { uid, room },
            });
            for (proxy, _) in &self.proxies {
                let broker = self.pick(Role::Broker, room);
                let mut route = vec![proxy.clone()];
                route.extend(broker.cloned());
                route.push(gw.clone());
                paths.push(Path {
                    kind: Kind::Room,
                    name: format!(
                        "proxy {} -> {} -> gateway {}",
                        proxy.id,
                        broker.map_or_else(|| format!("broker {bp}/none"), NodeRef::short),
                        gw.id
                    ),
                    route,
                    target: Target::Room {
                        proxy: proxy.id,
                        room,
                        uid,
                    },
                });
            }
        }
    }

    /// A personal message from every proxy to receiver `uid` on gateway `gw`.
    fn inbox_paths(&self, uid: u64, gw: &NodeRef, paths: &mut Vec<Path>) {
        let (bn, _) = self.role(Role::Broker);
        let xp = user_partition(uid, self.count(Role::Xiu));
        let pp = user_partition(uid, self.count(Role::Pi));
        let bp = user_partition(uid, bn);
        let brokers = self.replicas(Role::Broker, bp);
        let broker = pick_replica(uid, bn, brokers.len()).and_then(|i| brokers.get(i));
        for (proxy, _) in &self.proxies {
            let mut route = vec![proxy.clone()];
            route.extend(self.replicas(Role::Xiu, xp).iter().cloned());
            route.extend(self.replicas(Role::Pi, pp).iter().cloned());
            route.extend(broker.cloned());
            route.push(gw.clone());
            paths.push(Path {
                kind: Kind::Inbox,
                name: format!(
                    "proxy {} -> xiu {xp} -> pi {pp} -> {} -> gateway {}",
                    proxy.id,
                    broker.map_or_else(|| format!("broker {bp}/none"), NodeRef::short),
                    gw.id
                ),
                route,
                target: Target::Inbox {
                    proxy: proxy.id,
                    uid,
                },
            });
        }
    }

    fn gateway(&self, id: u64) -> Option<&NodeRef> {
        self.gateways.iter().map(|(n, _)| n).find(|n| n.id == id)
    }

    /// The pseudo-users of a round: one room member per gateway, and enough receivers to cover
    /// every Xiu and Pi partition, spread over the gateways.
    pub fn pseudo_users(&self, uid_base: u64) -> Vec<PseudoUser> {
        let gateways = self.gateways.len() as u64;
        if gateways == 0 {
            return Vec::new();
        }
        let receivers = self.receivers();
        (0..gateways.max(receivers))
            .map(|j| PseudoUser {
                uid: uid_base.wrapping_add(j),
                gateway: self.gateways[(j % gateways) as usize].0.id,
                member: j < gateways,
                receiver: j < receivers,
            })
            .collect()
    }
}

/// One pseudo-user: which gateway it connects to, and what it takes part in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PseudoUser {
    pub uid: u64,
    pub gateway: u64,
    /// Joins the round's rooms.
    pub member: bool,
    /// Receives personal messages.
    pub receiver: bool,
}

/// Pseudo-rooms for a round, chosen from `base + generation * ROOM_STRIDE` upwards so that every
/// (broker partition, replica) and every (router partition, replica) the rules can pick carries
/// one. Bounded: looks at most at 65,536 candidates.
pub fn choose_rooms(t: &Topology, base: u64, round: u64) -> Vec<u64> {
    let start = base.wrapping_add((round % GENERATIONS) * ROOM_STRIDE);
    let mut wanted: BTreeSet<(&'static str, u32, u64)> = BTreeSet::new();
    for role in [Role::Broker, Role::Router] {
        for (p, replicas) in t.role(role).1 {
            wanted.extend(replicas.iter().map(|r| (role.as_str(), *p, r.id)));
        }
    }
    let mut rooms = Vec::new();
    for k in 0..65_536u64 {
        if wanted.is_empty() {
            break;
        }
        let room = start.wrapping_add(k);
        let covers: Vec<_> = [Role::Broker, Role::Router]
            .into_iter()
            .filter_map(|role| t.pick(role, room))
            .map(|n| (n.role, n.partition.unwrap_or(0), n.id))
            .filter(|c| wanted.contains(c))
            .collect();
        if !covers.is_empty() {
            for c in covers {
                wanted.remove(&c);
            }
            rooms.push(room);
        }
    }
    rooms
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A ping of one node, straight from the probe.
    Reach,
    /// A pseudo-user joins a pseudo-room: gateway → router → every broker replica → joined.
    Join,
    /// A traced room message: proxy → broker → gateway → pseudo-user.
    Room,
    /// A traced personal message: proxy → Xiu → Pi → broker → gateway → pseudo-user.
    Inbox,
}

impl Kind {
    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::Reach => "reach",
            Kind::Join => "join",
            Kind::Room => "room",
            Kind::Inbox => "inbox",
        }
    }
}

/// What a path's message is, so that what arrives can be matched to it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Node,
    /// A role the probe needs has no running node: nothing of it can be probed.
    Missing,
    Join {
        uid: u64,
        room: u64,
    },
    Room {
        proxy: u64,
        room: u64,
        uid: u64,
    },
    Inbox {
        proxy: u64,
        uid: u64,
    },
}

/// One path of a round and the nodes the rules send its message through, in order.
#[derive(Clone, Debug)]
pub struct Path {
    pub kind: Kind,
    /// Stable across rounds (names nodes and partitions, not rooms): a metrics label, shown
    /// after the kind.
    pub name: String,
    pub route: Vec<NodeRef>,
    pub target: Target,
}

/// One hop's share of a delivered message's latency.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Share {
    /// A role, or `client` for the last leg (gateway to the pseudo-user).
    pub hop: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
    pub ms: f64,
}

/// Each hop's share: from the previous hop's exit (the send, for the first) to this hop's
/// exit; then the last leg to the receipt. Clock skew between machines shows up here.
pub fn shares(sent_us: u64, received_us: u64, trace: &[HopJson]) -> Vec<Share> {
    let mut out = Vec::with_capacity(trace.len() + 1);
    let mut last = sent_us;
    for hop in trace {
        out.push(Share {
            hop: hop.role.clone(),
            node: Some(hop.node.0),
            ms: hop.out_us.saturating_sub(last) as f64 / 1000.0,
        });
        last = last.max(hop.out_us);
    }
    out.push(Share {
        hop: "client".into(),
        node: None,
        ms: received_us.saturating_sub(last) as f64 / 1000.0,
    });
    out
}

/// What one path did in a round.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub kind: Kind,
    pub path: String,
    pub ok: bool,
    /// End to end, for a path that worked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ms: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hops: Vec<Share>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The node to blame for a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blame: Option<NodeRef>,
}

/// The node of `route` to blame for a failed path: the first that did not answer the probe's
/// ping and was not `seen` passing the message on (a stamp, an answer); else the first not
/// seen; else the last (it was seen, and still the message did not arrive).
pub fn blame<'a>(
    route: &'a [NodeRef],
    seen: &BTreeSet<NodeKey>,
    unresponsive: &BTreeSet<NodeKey>,
) -> Option<&'a NodeRef> {
    route
        .iter()
        .find(|n| unresponsive.contains(&n.key()) && !seen.contains(&n.key()))
        .or_else(|| route.iter().find(|n| !seen.contains(&n.key())))
        .or_else(|| route.last())
}

/// One round's result.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub round: u64,
    pub ms: f64,
    pub outcomes: Vec<Outcome>,
}

/// A blamed node and the paths that blame it.
#[derive(Clone, Debug, Serialize)]
pub struct Fault {
    #[serde(flatten)]
    pub node: NodeRef,
    pub paths: Vec<String>,
}

impl Report {
    pub fn failed(&self) -> impl Iterator<Item = &Outcome> {
        self.outcomes.iter().filter(|o| !o.ok)
    }

    /// Every blamed node once, with the paths blaming it.
    pub fn faults(&self) -> Vec<Fault> {
        let mut by: BTreeMap<&NodeRef, Vec<String>> = BTreeMap::new();
        for o in self.failed() {
            if let Some(n) = &o.blame {
                by.entry(n)
                    .or_default()
                    .push(format!("{} {}", o.kind.as_str(), o.path));
            }
        }
        by.into_iter()
            .map(|(n, paths)| Fault {
                node: n.clone(),
                paths,
            })
            .collect()
    }

    /// A readable table: every path with its latency and hop shares, then the faults.
    pub fn render(&self) -> String {
        let failed = self.failed().count();
        let mut s = format!(
            "round {}: {} paths, {} ok, {} failed ({:.0} ms)\n",
            self.round,
            self.outcomes.len(),
            self.outcomes.len() - failed,
            failed,
            self.ms
        );
        s.push_str(&format!(
            "  {:<6} {:<64} {:<6} {:>8}  {}\n",
            "KIND", "PATH", "RESULT", "MS", "HOPS (ms) / REASON"
        ));
        for o in &self.outcomes {
            let detail = match (&o.reason, o.hops.is_empty()) {
                (Some(r), _) => r.clone(),
                (None, false) => o
                    .hops
                    .iter()
                    .map(|h| format!("{} {:.2}", h.hop, h.ms))
                    .collect::<Vec<_>>()
                    .join(" | "),
                (None, true) => String::new(),
            };
            s.push_str(&format!(
                "  {:<6} {:<64} {:<6} {:>8}  {}\n",
                o.kind.as_str(),
                o.path,
                if o.ok { "ok" } else { "FAILED" },
                o.ms.map_or_else(|| "-".into(), |m| format!("{m:.2}")),
                detail
            ));
        }
        let faults = self.faults();
        if faults.is_empty() {
            s.push_str("  healthy: every path worked\n");
        } else {
            s.push_str("  FAULTS\n");
            for f in faults {
                s.push_str(&format!(
                    "  {} ({} failed paths: {})\n",
                    f.node,
                    f.paths.len(),
                    f.paths.join("; ")
                ));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests;
