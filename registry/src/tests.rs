//! Unit tests of the embedded backend and the shared types.

use super::*;

fn layout(n: u32) -> Layout {
    Layout {
        broker_partitions: n,
        router_partitions: 1,
        xiu_partitions: 1,
        pi_partitions: 2,
    }
}

#[test]
fn role_names() {
    let names: Vec<&str> = Role::ALL.iter().map(Role::as_str).collect();
    assert_eq!(names, ["proxy", "broker", "router", "gateway", "xiu", "pi"]);
    let partitioned: Vec<Role> = Role::ALL.into_iter().filter(Role::is_partitioned).collect();
    assert_eq!(
        partitioned,
        [Role::Broker, Role::Router, Role::Xiu, Role::Pi]
    );
    assert_eq!("Gateway".parse::<Role>().unwrap(), Role::Gateway);
    assert!("nope".parse::<Role>().is_err());
}

#[test]
fn node_info_json() {
    let info = NodeInfo::new("10.0.0.1:7000");
    let json = serde_json::to_string(&info).unwrap();
    assert_eq!(json, r#"{"addr":"10.0.0.1:7000","state":"init","load":0}"#);
    let parsed: NodeInfo = serde_json::from_str(
        r#"{"addr":"a:1","state":"running","client_url":"ws://h:1/v1/ws","extra":1}"#,
    )
    .unwrap();
    assert_eq!(parsed.state, NodeState::Running);
    assert_eq!(parsed.client_url.as_deref(), Some("ws://h:1/v1/ws"));
    assert_eq!(parsed.load, 0);
}

#[test]
fn name_parsing() {
    assert_eq!(parse_node_name("node-0000000042"), Some(42));
    assert_eq!(parse_node_name("node-"), None);
    assert_eq!(parse_node_name("lock-0000000001"), None);
    assert_eq!(parse_partition_name("partition12"), Some(12));
    assert_eq!(parse_partition_name("partition_num"), None);
    assert_eq!(parse_partition_name("partition"), None);
}

#[tokio::test]
async fn power_of_two_checked() {
    let reg = Registry::embedded("t");
    for bad in [0, 3, 6] {
        assert!(
            matches!(reg.init_layout(&layout(bad)).await, Err(RegistryError::NotPowerOfTwo(n)) if n == bad)
        );
    }
    assert!(!reg.is_initialized().await.unwrap());
    reg.init_layout(&layout(4)).await.unwrap();
    assert!(matches!(
        reg.set_partition_num(Role::Broker, 5).await,
        Err(RegistryError::NotPowerOfTwo(5))
    ));
    assert!(matches!(
        reg.set_partition_num(Role::Proxy, 2).await,
        Err(RegistryError::NotPartitioned(Role::Proxy))
    ));
}

#[tokio::test]
async fn init_layout_idempotent_and_mismatch() {
    let reg = Registry::embedded("t");
    assert!(matches!(
        reg.register(Role::Broker, Some(0), NodeInfo::new("a:1"))
            .await,
        Err(RegistryError::NotInitialized)
    ));
    reg.init_layout(&layout(2)).await.unwrap();
    reg.init_layout(&layout(2)).await.unwrap();
    assert!(reg.is_initialized().await.unwrap());
    match reg.init_layout(&layout(4)).await {
        Err(RegistryError::AlreadyInitialized {
            role,
            existing,
            wanted,
        }) => {
            assert_eq!((role, existing, wanted), (Role::Broker, 2, 4));
        }
        other => panic!("unexpected {other:?}"),
    }
    let view = reg.read(Role::Broker).await.unwrap();
    assert_eq!(view.partition_num, 2);
    assert_eq!(view.partitions.keys().copied().collect::<Vec<_>>(), [0, 1]);
    assert!(view.members(0).is_empty());
    let pi = reg.read(Role::Pi).await.unwrap();
    assert_eq!(pi.partition_num, 2);
    let gw = reg.read(Role::Gateway).await.unwrap();
    assert_eq!(gw.partition_num, 1);
    assert_eq!(gw.partitions.keys().copied().collect::<Vec<_>>(), [0]);
}

#[tokio::test]
async fn ids_increase_and_running_filter() {
    let reg = Registry::embedded("t");
    reg.init_layout(&layout(2)).await.unwrap();
    let a = reg
        .register(Role::Broker, Some(1), NodeInfo::new("a:1"))
        .await
        .unwrap();
    let b = reg
        .register(Role::Broker, Some(1), NodeInfo::new("b:1"))
        .await
        .unwrap();
    let c = reg
        .register(Role::Broker, Some(0), NodeInfo::new("c:1"))
        .await
        .unwrap();
    assert!(a.id() < b.id());
    assert_eq!(a.partition(), 1);
    assert!(matches!(
        reg.register(Role::Broker, None, NodeInfo::new("x:1")).await,
        Err(RegistryError::PartitionRequired(Role::Broker))
    ));
    assert!(matches!(
        reg.register(Role::Gateway, Some(3), NodeInfo::new("x:1"))
            .await,
        Err(RegistryError::NotPartitioned(Role::Gateway))
    ));

    b.set_state(NodeState::Running).await.unwrap();
    let view = reg.read(Role::Broker).await.unwrap();
    assert_eq!(
        view.members(1).iter().map(|m| m.id).collect::<Vec<_>>(),
        [a.id(), b.id()]
    );
    assert_eq!(view.members(1)[0].name, format!("node-{:010}", a.id()));
    assert_eq!(
        view.running(1).iter().map(|m| m.id).collect::<Vec<_>>(),
        [b.id()]
    );
    assert_eq!(view.all().count(), 3);
    assert_eq!(
        view.get(0, c.id()).map(|m| m.info.addr.as_str()),
        Some("c:1")
    );

    // Re-registering after a deregistration gets a larger id.
    let old = a.id();
    a.deregister().await.unwrap();
    let a2 = reg
        .register(Role::Broker, Some(1), NodeInfo::new("a:1"))
        .await
        .unwrap();
    assert!(a2.id() > b.id() && a2.id() > old);
}

#[tokio::test]
async fn views_update() {
    let reg = Registry::embedded("t");
    reg.init_layout(&layout(1)).await.unwrap();
    let mut rx = reg.watch(Role::Gateway).await.unwrap();
    assert!(rx.borrow_and_update().members(0).is_empty());

    let g = reg
        .register(Role::Gateway, None, NodeInfo::new("g:1"))
        .await
        .unwrap();
    assert!(rx.has_changed().unwrap());
    assert_eq!(rx.borrow_and_update().members(0).len(), 1);

    g.update(|i| {
        i.state = NodeState::Running;
        i.load = 7;
        i.client_url = Some("ws://g:2/v1/ws".into());
    })
    .await
    .unwrap();
    assert_eq!(g.info().load, 7);
    {
        let view = rx.borrow_and_update();
        assert_eq!(view.running(0).len(), 1);
        assert_eq!(view.members(0)[0].info.load, 7);
    }

    // Unchanged data is not re-published.
    g.update(|i| i.load = 7).await.unwrap();
    assert!(!rx.has_changed().unwrap());

    // A second watcher shares the same view; dropping a registration removes the node.
    let rx2 = reg.watch(Role::Gateway).await.unwrap();
    assert_eq!(rx2.borrow().members(0).len(), 1);
    drop(g);
    assert!(rx.borrow_and_update().members(0).is_empty());

    // Scale-out: new partition folders appear, and registering in a not-yet-counted partition works.
    let mut brokers = reg.watch(Role::Broker).await.unwrap();
    let r = reg
        .register(Role::Broker, Some(1), NodeInfo::new("b:1"))
        .await
        .unwrap();
    assert_eq!(brokers.borrow_and_update().members(1).len(), 1);
    assert_eq!(brokers.borrow().partition_num, 1);
    reg.set_partition_num(Role::Broker, 2).await.unwrap();
    assert_eq!(brokers.borrow_and_update().partition_num, 2);
    assert_eq!(r.id_watch().borrow().to_owned(), r.id());
}
