use super::serve::ProbeMetrics;
use super::*;
use pixiu_protocol::client::Id;
use pixiu_registry::{Member, NodeInfo, NodeState};

fn member(id: u64, port: u16, state: NodeState) -> Member {
    let mut info = NodeInfo::new(format!("127.0.0.1:{port}"));
    info.state = state;
    info.client_url = Some(format!("ws://127.0.0.1:{port}/v1/ws"));
    info.http = Some(format!("127.0.0.1:{port}"));
    Member {
        id,
        name: format!("node-{id:010}"),
        info,
    }
}

fn view(partition_num: u32, parts: &[&[(u64, NodeState)]]) -> RoleView {
    let mut v = RoleView {
        partition_num,
        partitions: BTreeMap::new(),
    };
    for (p, members) in parts.iter().enumerate() {
        v.partitions.insert(
            p as u32,
            members
                .iter()
                .map(|(id, st)| member(*id, 7000 + *id as u16, *st))
                .collect(),
        );
    }
    v
}

use NodeState::{Init, Running};

/// The cluster: 2 broker partitions (the first with 2 replicas), 2 router partitions,
/// 2 gateways, 2 proxies, Xiu and Pi of 2 partitions of 2 replicas.
fn topology() -> Topology {
    let mut views = BTreeMap::new();
    views.insert(
        "broker",
        view(2, &[&[(10, Running), (11, Running)], &[(12, Running)]]),
    );
    views.insert("router", view(2, &[&[(20, Running)], &[(21, Running)]]));
    views.insert(
        "gateway",
        view(1, &[&[(30, Running), (31, Running), (32, Init)]]),
    );
    views.insert("proxy", view(1, &[&[(40, Running), (41, Running)]]));
    views.insert(
        "xiu",
        view(
            2,
            &[
                &[(50, Running), (51, Running)],
                &[(52, Init), (53, Running)],
            ],
        ),
    );
    views.insert(
        "pi",
        view(
            2,
            &[
                &[(60, Running), (61, Running)],
                &[(62, Running), (63, Init)],
            ],
        ),
    );
    Topology::from_views(&views)
}

#[test]
fn rooms_cover_every_broker_replica_and_router_partition() {
    let t = topology();
    for round in 0..8 {
        let rooms = choose_rooms(&t, DEFAULT_UID_BASE, round);
        let mut brokers = BTreeSet::new();
        let mut routers = BTreeSet::new();
        for &r in &rooms {
            brokers.insert(t.pick(Role::Broker, r).unwrap().id);
            routers.insert(t.pick(Role::Router, r).unwrap().id);
        }
        assert_eq!(brokers, BTreeSet::from([10, 11, 12]), "round {round}");
        assert_eq!(routers, BTreeSet::from([20, 21]), "round {round}");
        assert!(rooms.len() <= 3, "{rooms:?}");
    }
    // rounds cycle through a bounded set of room ranges
    assert_eq!(
        choose_rooms(&t, DEFAULT_UID_BASE, 1),
        choose_rooms(&t, DEFAULT_UID_BASE, 1 + GENERATIONS)
    );
    assert_ne!(
        choose_rooms(&t, DEFAULT_UID_BASE, 1),
        choose_rooms(&t, DEFAULT_UID_BASE, 2)
    );
}

#[test]
fn pseudo_users_cover_every_gateway_and_every_xiu_and_pi_partition() {
    let t = topology();
    let users = t.pseudo_users(DEFAULT_UID_BASE);
    let gateways: BTreeSet<u64> = users
        .iter()
        .filter(|u| u.member)
        .map(|u| u.gateway)
        .collect();
    assert_eq!(gateways, BTreeSet::from([30, 31]), "running gateways only");
    let xiu: BTreeSet<u32> = users
        .iter()
        .filter(|u| u.receiver)
        .map(|u| user_partition(u.uid, 2))
        .collect();
    assert_eq!(xiu, BTreeSet::from([0, 1]));
    assert!(Topology::default().pseudo_users(1).is_empty());
}

#[test]
fn paths_follow_the_rules_and_name_the_nodes_on_the_way() {
    let t = topology();
    let users = t.pseudo_users(DEFAULT_UID_BASE);
    let rooms = choose_rooms(&t, DEFAULT_UID_BASE, 0);
    let paths = t.paths(&rooms, &users);
    let count = |k: Kind| paths.iter().filter(|p| p.kind == k).count();
    // every running node, plus Xiu partition 1's leader though it is not running
    // gateways 2, proxies 2, brokers 3, routers 2, xiu 4, pi 3
    assert_eq!(count(Kind::Reach), 2 + 2 + 3 + 2 + 4 + 3);
    assert!(paths
        .iter()
        .any(|p| p.kind == Kind::Reach && p.name == "xiu 1/52"));
    assert_eq!(count(Kind::Join), 2 * rooms.len());
    assert_eq!(count(Kind::Room), 2 * 2 * rooms.len());
    assert_eq!(count(Kind::Inbox), 2 * 2, "2 proxies x 2 receivers");
    for p in &paths {
        match &p.target {
            Target::Room { room, .. } => {
                let roles: Vec<_> = p.route.iter().map(|n| n.role).collect();
                assert_eq!(roles, ["proxy", "broker", "gateway"], "{}", p.name);
                assert_eq!(p.route[1].partition, Some((room % 2) as u32));
            }
            Target::Join { room, .. } => {
                assert_eq!(p.route[0].role, "gateway");
                assert_eq!(p.route[1].role, "router");
                let brokers: Vec<u64> = p
                    .route
                    .iter()
                    .filter(|n| n.role == "broker")
                    .map(|n| n.id)
                    .collect();
                let want = if room % 2 == 0 {
                    vec![10, 11]
                } else {
                    vec![12]
                };
                assert_eq!(brokers, want, "a join needs every replica's ack");
            }
            Target::Inbox { uid, .. } => {
                let ids: Vec<u64> = p.route.iter().map(|n| n.id).collect();
                if uid % 2 == 1 {
                    // leader first whatever its state; the follower that is not running is left out
                    assert_eq!(&ids[1..5], [52, 53, 62, 12]);
                } else {
                    assert_eq!(&ids[1..5], [50, 51, 60, 61]);
                }
            }
            Target::Node => assert_eq!(p.route.len(), 1),
            Target::Missing => panic!("nothing is missing: {}", p.name),
        }
    }
}

fn n(role: &'static str, id: u64) -> NodeRef {
    NodeRef {
        role,
        partition: Some(0),
        id,
        addr: format!("127.0.0.1:{id}"),
    }
}

#[test]
fn blame_goes_to_the_first_silent_node_not_seen_else_the_first_not_seen() {
    let route = [
        n("proxy", 1),
        n("xiu", 2),
        n("pi", 3),
        n("broker", 4),
        n("gateway", 5),
    ];
    let set = |ids: &[u64]| {
        ids.iter()
            .map(|id| route.iter().find(|n| n.id == *id).unwrap().key())
            .collect::<BTreeSet<NodeKey>>()
    };
    // the Pi leader does not answer pings: it, though the broker does not either
    assert_eq!(blame(&route, &set(&[1]), &set(&[3, 4])).unwrap().id, 3);
    // everyone answers; the proxy and Xiu were seen: the next one
    assert_eq!(blame(&route, &set(&[1, 2]), &set(&[])).unwrap().id, 3);
    // a node that did its part is not blamed even if it is silent now
    assert_eq!(blame(&route, &set(&[1, 2, 3]), &set(&[3])).unwrap().id, 4);
    // all seen: the last
    assert_eq!(
        blame(&route, &set(&[1, 2, 3, 4, 5]), &set(&[])).unwrap().id,
        5
    );
    assert!(blame(&[], &set(&[]), &set(&[])).is_none());
}

fn hop(role: &str, node: u64, in_us: u64, out_us: u64) -> HopJson {
    HopJson {
        role: role.into(),
        node: Id(node),
        partition: None,
        addr: String::new(),
        in_us,
        out_us,
    }
}

#[test]
fn shares_add_up_to_the_end_to_end_latency() {
    let trace = [
        hop("proxy", 1, 1_100, 1_300),
        hop("broker", 2, 1_500, 1_600),
        hop("gateway", 3, 2_000, 2_100),
    ];
    let s = shares(1_000, 3_000, &trace);
    let got: Vec<(&str, f64)> = s.iter().map(|h| (h.hop.as_str(), h.ms)).collect();
    assert_eq!(
        got,
        [
            ("proxy", 0.3),
            ("broker", 0.3),
            ("gateway", 0.5),
            ("client", 0.9)
        ]
    );
    let total: f64 = s.iter().map(|h| h.ms).sum();
    assert!((total - 2.0).abs() < 1e-9);
    // a stamp before the send (another machine's clock) counts as zero, never negative
    let skewed = shares(1_000, 1_500, &[hop("proxy", 1, 800, 900)]);
    assert_eq!(skewed[0].ms, 0.0);
    assert_eq!(skewed[1].ms, 0.5);
}

fn outcome(path: &str, ok: bool, blamed: Option<NodeRef>) -> Outcome {
    Outcome {
        kind: Kind::Room,
        path: path.into(),
        ok,
        ms: ok.then_some(2.0),
        hops: if ok {
            vec![Share {
                hop: "broker".into(),
                node: Some(2),
                ms: 1.0,
            }]
        } else {
            Vec::new()
        },
        reason: (!ok).then(|| "accepted, not delivered".into()),
        blame: blamed,
    }
}

#[test]
fn a_report_names_each_blamed_node_once() {
    let r = Report {
        round: 3,
        ms: 12.0,
        outcomes: vec![
            outcome("a", true, None),
            outcome("b", false, Some(n("broker", 4))),
            outcome("c", false, Some(n("broker", 4))),
        ],
    };
    let faults = r.faults();
    assert_eq!(faults.len(), 1);
    assert_eq!(faults[0].paths, ["room b", "room c"]);
    let text = r.render();
    assert!(text.contains("round 3: 3 paths, 1 ok, 2 failed"), "{text}");
    assert!(
        text.contains(
            "broker partition 0 replica 4 at 127.0.0.1:4 (2 failed paths: room b; room c)"
        ),
        "{text}"
    );
    assert!(text.contains("broker 1.00"), "{text}");
    let healthy = Report {
        round: 1,
        ms: 1.0,
        outcomes: vec![outcome("a", true, None)],
    };
    assert!(healthy.render().contains("healthy"));
}

#[test]
fn a_path_counts_as_failed_only_after_consecutive_failed_rounds() {
    let mut m = ProbeMetrics::new(3);
    let round = |ok: bool| Report {
        round: 0,
        ms: 1.0,
        outcomes: vec![outcome("p", ok, (!ok).then(|| n("broker", 4)))],
    };
    assert!(m.observe(&round(false)).is_empty());
    assert!(m.observe(&round(false)).is_empty());
    assert!(
        m.observe(&round(true)).is_empty(),
        "a round that worked resets"
    );
    assert!(m.observe(&round(false)).is_empty());
    assert!(m.observe(&round(false)).is_empty());
    assert_eq!(m.observe(&round(false)), ["p"]);
    assert_eq!(m.failed_now(), 1);
    let text = pixiu_runtime::metrics::render(&m.registry);
    assert!(
        text.contains("pixiu_probe_path_failed{kind=\"room\",path=\"p\"} 1"),
        "{text}"
    );
    assert!(text.contains("pixiu_probe_node_failed{addr=\"127.0.0.1:4\",node=\"4\",partition=\"0\",role=\"broker\"} 1"), "{text}");
    m.observe(&round(true));
    assert_eq!(m.failed_now(), 0);
    let text = pixiu_runtime::metrics::render(&m.registry);
    assert!(
        text.contains("pixiu_probe_path_failed{kind=\"room\",path=\"p\"} 0"),
        "{text}"
    );
    assert!(!text.contains("pixiu_probe_node_failed{"), "{text}");
    assert!(
        text.contains("pixiu_probe_latency_seconds_bucket{hop=\"broker\",kind=\"room\",path=\"p\""),
        "{text}"
    );
    // a path the registry no longer gives is forgotten
    m.observe(&Report {
        round: 0,
        ms: 1.0,
        outcomes: Vec::new(),
    });
    let text = pixiu_runtime::metrics::render(&m.registry);
    assert!(!text.contains("pixiu_probe_path_failed{"), "{text}");
}

#[test]
fn probe_bodies_round_trip() {
    assert_eq!(
        round::parse_body("pixiu-probe/3/40/77/123"),
        Some((3, 40, 77, 123))
    );
    assert_eq!(round::parse_body("hello"), None);
    assert_eq!(round::parse_body("pixiu-probe/3/x/77/123"), None);
}
