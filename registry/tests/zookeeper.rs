//! Integration tests against a real ZooKeeper server.

use std::sync::Arc;
use std::time::Duration;

use pixiu_registry::{
    Layout, NodeInfo, NodeState, Registry, RegistryError, Role, RoleView, ZkConfig,
};
use pixiu_testkit::{TcpProxy, ZkServer};
use tokio::sync::watch;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(20);

fn config(server: &ZkServer, cluster: &str) -> ZkConfig {
    let mut cfg = ZkConfig::new(server.connect_string(), cluster);
    cfg.session_timeout = Duration::from_secs(2);
    cfg.refresh_interval = Duration::from_millis(500);
    cfg
}

/// Connects; a first session that times out is asked again, up to 4 tries in all (right
/// after it starts, a throwaway ZooKeeper on this 2-core machine sometimes takes longer than
/// these tests' 2 s session timeout to open the first sessions).
async fn connect(cfg: ZkConfig) -> Registry {
    let mut last = None;
    for _ in 0..4 {
        match Registry::zookeeper(cfg.clone()).await {
            Ok(r) => return r,
            Err(e @ RegistryError::Connect { .. }) => last = Some(e),
            Err(e) => panic!("connecting: {e}"),
        }
    }
    panic!("connecting: {last:?}");
}

/// Waits (bounded) until the view satisfies `f`.
async fn wait_view(
    rx: &mut watch::Receiver<Arc<RoleView>>,
    what: &str,
    f: impl Fn(&RoleView) -> bool,
) -> Arc<RoleView> {
    let res = timeout(WAIT, rx.wait_for(|v| f(v)))
        .await
        .map(|r| r.map(|v| v.clone()));
    match res {
        Ok(Ok(v)) => v,
        Ok(Err(_)) => panic!("view channel closed while waiting for {what}"),
        Err(_) => panic!("timed out waiting for {what}; last view: {:?}", rx.borrow()),
    }
}

fn layout(brokers: u32) -> Layout {
    Layout {
        broker_partitions: brokers,
        router_partitions: 1,
        xiu_partitions: 1,
        pi_partitions: 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layout_registration_and_views() {
    let server = ZkServer::start().expect("ZooKeeper starts");
    let a = connect(config(&server, "c1")).await;
    let b = connect(config(&server, "c1")).await;
    assert_eq!(a.cluster(), "c1");

    assert!(!a.is_initialized().await.unwrap());
    assert!(matches!(
        a.register(Role::Broker, Some(0), NodeInfo::new("x:1"))
            .await,
        Err(RegistryError::NotInitialized)
    ));
    assert!(matches!(
        a.init_layout(&layout(3)).await,
        Err(RegistryError::NotPowerOfTwo(3))
    ));
    a.init_layout(&layout(2)).await.unwrap();
    b.init_layout(&layout(2)).await.unwrap();
    assert!(b.is_initialized().await.unwrap());
    match b.init_layout(&layout(4)).await {
        Err(RegistryError::AlreadyInitialized {
            role,
            existing,
            wanted,
        }) => {
            assert_eq!((role, existing, wanted), (Role::Broker, 2, 4))
        }
        other => panic!("unexpected {other:?}"),
    }

    let mut brokers = b.watch(Role::Broker).await.unwrap();
    {
        let v = brokers.borrow_and_update();
        assert_eq!(v.partition_num, 2);
        assert_eq!(v.partitions.keys().copied().collect::<Vec<_>>(), [0, 1]);
        assert!(v.members(1).is_empty());
    }

    let r1 = a
        .register(Role::Broker, Some(1), NodeInfo::new("10.0.0.1:7000"))
        .await
        .unwrap();
    let r2 = a
        .register(Role::Broker, Some(1), NodeInfo::new("10.0.0.2:7000"))
        .await
        .unwrap();
    assert!(
        r1.id() < r2.id(),
        "ids order replicas: {} < {}",
        r1.id(),
        r2.id()
    );
    assert_eq!(r1.name(), format!("node-{:010}", r1.id()));

    let v = wait_view(&mut brokers, "two brokers", |v| v.members(1).len() == 2).await;
    assert_eq!(
        v.members(1).iter().map(|m| m.id).collect::<Vec<_>>(),
        [r1.id(), r2.id()]
    );
    assert!(v.running(1).is_empty());

    r2.set_state(NodeState::Running).await.unwrap();
    let v = wait_view(&mut brokers, "r2 running", |v| v.running(1).len() == 1).await;
    assert_eq!(v.running(1)[0].id, r2.id());
    assert_eq!(v.running(1)[0].info.addr, "10.0.0.2:7000");

    // Non-partitioned role.
    let mut gateways = b.watch(Role::Gateway).await.unwrap();
    let g = a
        .register(
            Role::Gateway,
            None,
            NodeInfo {
                client_url: Some("ws://h:1/v1/ws".into()),
                ..NodeInfo::new("g:1")
            },
        )
        .await
        .unwrap();
    let v = wait_view(&mut gateways, "gateway", |v| v.members(0).len() == 1).await;
    assert_eq!(v.partition_num, 1);
    assert_eq!(
        v.members(0)[0].info.client_url.as_deref(),
        Some("ws://h:1/v1/ws")
    );
    g.update(|i| i.load = 42).await.unwrap();
    wait_view(&mut gateways, "gateway load", |v| {
        v.members(0).first().is_some_and(|m| m.info.load == 42)
    })
    .await;

    // Deregister and drop delete nodes now.
    r1.deregister().await.unwrap();
    wait_view(&mut brokers, "r1 gone", |v| v.members(1).len() == 1).await;
    drop(g);
    wait_view(&mut gateways, "dropped gateway gone", |v| {
        v.members(0).is_empty()
    })
    .await;

    // One-shot read agrees.
    let read = b.read(Role::Broker).await.unwrap();
    assert_eq!(
        read.members(1).iter().map(|m| m.id).collect::<Vec<_>>(),
        [r2.id()]
    );

    // Scale-out: register in a partition beyond partition_num, then double it.
    let r3 = a
        .register(Role::Broker, Some(3), NodeInfo::new("10.0.0.3:7000"))
        .await
        .unwrap();
    wait_view(&mut brokers, "partition 3", |v| v.members(3).len() == 1).await;
    a.set_partition_num(Role::Broker, 4).await.unwrap();
    let v = wait_view(&mut brokers, "partition_num 4", |v| v.partition_num == 4).await;
    assert_eq!(
        v.partitions.keys().copied().collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    assert_eq!(v.members(3)[0].id, r3.id());

    // Doubling is conditional: of two racing operators exactly one wins, the other is told
    // what it found; a doubling based on a stale count changes nothing.
    let (x, y) = tokio::join!(
        a.double_partitions(Role::Broker, 4),
        b.double_partitions(Role::Broker, 4)
    );
    let (won, lost) = match (x, y) {
        (Ok(n), Err(e)) | (Err(e), Ok(n)) => (n, e),
        other => panic!("exactly one doubling must win: {other:?}"),
    };
    assert_eq!(won, 8);
    assert!(
        matches!(
            lost,
            RegistryError::PartitionNumChanged {
                expected: 4,
                found: 8,
                ..
            }
        ),
        "{lost}"
    );
    // a doubling creates the folders before it sets the count, and a view reads the count
    // first: a view with the new count has every folder
    let v = wait_view(&mut brokers, "partition_num 8", |v| v.partition_num == 8).await;
    assert_eq!(v.partitions.len(), 8, "the new partitions' folders exist");
    assert!(matches!(
        a.double_partitions(Role::Broker, 4).await,
        Err(RegistryError::PartitionNumChanged { found: 8, .. })
    ));
    assert!(matches!(
        a.double_partitions(Role::Proxy, 1).await,
        Err(RegistryError::NotPartitioned(Role::Proxy))
    ));

    // A bad node is skipped, not fatal.
    let raw = zookeeper_client::Client::connect(&server.connect_string())
        .await
        .unwrap();
    let opts =
        zookeeper_client::CreateMode::Persistent.with_acls(zookeeper_client::Acls::anyone_all());
    raw.create(
        "/pixiu/c1/broker/partition0/node-0000000099",
        b"not json",
        &opts,
    )
    .await
    .unwrap();
    raw.create(
        "/pixiu/c1/broker/partition0/node-0000000100",
        br#"{"addr":"ok:1","state":"running"}"#,
        &opts,
    )
    .await
    .unwrap();
    let v = wait_view(&mut brokers, "good raw node", |v| v.members(0).len() == 1).await;
    assert_eq!(v.members(0)[0].id, 100);
    drop(raw);

    // Closing a registry removes its nodes from the other's view.
    a.close().await;
    let v = wait_view(&mut brokers, "a's nodes gone", |v| {
        v.members(1).is_empty() && v.members(3).is_empty()
    })
    .await;
    assert_eq!(v.members(0).len(), 1);
    assert!(matches!(
        a.read(Role::Broker).await,
        Err(RegistryError::Closed)
    ));
    assert!(matches!(
        r2.set_state(NodeState::Init).await,
        Err(RegistryError::Closed)
    ));
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_reregisters() {
    let server = ZkServer::start().expect("ZooKeeper starts");
    let proxy = TcpProxy::start(&server.connect_string()).expect("proxy starts");
    // `a` reaches ZooKeeper through a proxy whose network we cut.
    let mut cfg_a = config(&server, "c2");
    cfg_a.hosts = proxy.connect_string();
    let a = connect(cfg_a).await;
    let b = connect(config(&server, "c2")).await;
    a.init_layout(&layout(1)).await.unwrap();

    let reg = a
        .register(Role::Router, Some(0), NodeInfo::new("10.0.0.9:7000"))
        .await
        .unwrap();
    reg.set_state(NodeState::Running).await.unwrap();
    let gw = a
        .register(Role::Gateway, None, NodeInfo::new("g:1"))
        .await
        .unwrap();
    let old_id = reg.id();
    let old_gw = gw.id();
    let mut ids = reg.id_watch();
    let mut routers = b.watch(Role::Router).await.unwrap();
    let mut own = a.watch(Role::Router).await.unwrap();
    wait_view(&mut routers, "router running", |v| {
        v.running(0).iter().any(|m| m.id == old_id)
    })
    .await;
    assert_eq!(a.session_generation(), 1);

    // Cut the network for longer than the session timeout (2 s): the server expires the session
    // and drops its ephemeral nodes; `a` keeps its last view meanwhile.
    proxy.cut();
    wait_view(&mut routers, "expired router gone", |v| {
        v.members(0).is_empty()
    })
    .await;
    assert_eq!(
        own.borrow().members(0).len(),
        1,
        "last view kept while disconnected"
    );
    assert_eq!(reg.id(), old_id);
    proxy.restore();

    let new_id = timeout(WAIT, ids.wait_for(|id| *id != old_id))
        .await
        .expect("re-registered in time")
        .map(|id| *id)
        .unwrap();
    assert!(new_id > old_id, "new id {new_id} > old id {old_id}");
    assert_eq!(reg.id(), new_id);
    assert_eq!(a.session_generation(), 2);
    let mut gw_ids = gw.id_watch();
    let new_gw = timeout(WAIT, gw_ids.wait_for(|id| *id != old_gw))
        .await
        .expect("gateway re-registered")
        .map(|id| *id)
        .unwrap();
    assert!(new_gw > old_gw);

    // The other registry sees exactly the new node, with the state kept.
    let v = wait_view(&mut routers, "re-registered router", |v| {
        v.members(0).len() == 1 && v.members(0)[0].id == new_id
    })
    .await;
    assert_eq!(v.running(0).len(), 1);
    let g = b.read(Role::Gateway).await.unwrap();
    assert_eq!(
        g.members(0).iter().map(|m| m.id).collect::<Vec<_>>(),
        [gw.id()]
    );

    // The expired registry's own views recover too, and updates keep working on the new session.
    wait_view(&mut own, "own view", |v| {
        v.members(0).first().is_some_and(|m| m.id == new_id)
    })
    .await;
    reg.update(|i| i.load = 5).await.unwrap();
    wait_view(&mut routers, "load after recovery", |v| {
        v.members(0).first().is_some_and(|m| m.info.load == 5)
    })
    .await;

    a.close().await;
    wait_view(&mut routers, "router gone", |v| v.members(0).is_empty()).await;
    b.close().await;
}

#[tokio::test]
async fn unreachable_fails_in_bounded_time() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut cfg = ZkConfig::new(format!("127.0.0.1:{port}"), "c3");
    cfg.session_timeout = Duration::from_secs(2);
    let started = std::time::Instant::now();
    let res = timeout(Duration::from_secs(15), Registry::zookeeper(cfg))
        .await
        .expect("bounded");
    assert!(
        matches!(res, Err(RegistryError::Connect { .. })),
        "{:?}",
        res.err()
    );
    assert!(started.elapsed() < Duration::from_secs(12));
}
