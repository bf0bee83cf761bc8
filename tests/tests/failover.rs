//! Failures on the room path, with real processes killed for real: a broker replica killed
//! with SIGKILL while messages flow (the lost window is bounded), brokers and routers killed and
//! restarted (routing is whole again without any client rejoining), members leaving (the
//! gateway stops receiving the room, through negative feedback when the leave itself was lost),
//! ZooKeeper sessions that expire (the node registers again and serves), and a gateway with no
//! proxy to publish through (refused with the reason, counted, healed by a proxy coming back).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pixiu_client::Client;
use pixiu_protocol::client::ServerFrame;
use pixiu_tests::{assert_eventually, drain_events, metric, Cluster};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// The proxy's heartbeat settings (its defaults): a broker replica that stops answering gets no
/// more messages after at most `timeout + interval`.
const HB_INTERVAL: Duration = Duration::from_millis(200);
const HB_TIMEOUT: Duration = Duration::from_millis(1000);

/// Publish one message to each room and check every client gets its room's message.
async fn publish_round(c: &Cluster, clients: &mut [(u64, Client)], tag: &str) {
    let p = c.publisher("proxy");
    let mut want = HashMap::new();
    for (room, _) in clients.iter() {
        let id = p
            .publish_room(*room, &format!("{tag}:{room}"), 1, None)
            .await
            .unwrap_or_else(|e| panic!("{tag}: publish to {room}: {e}\n{}", c.logs()));
        want.insert(*room, id);
    }
    for (room, client) in clients.iter_mut() {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, client.next_event()).await {
                Ok(Some(ServerFrame::Room { id, .. })) if id.0 == want[room] => break,
                Ok(Some(_)) => continue,
                _ => panic!("{tag}: room {room} did not get its message\n{}", c.logs()),
            }
        }
    }
}

/// Publish to every room, retrying rounds until one fully arrives (routing is being repaired).
async fn eventually_whole(c: &Cluster, clients: &mut [(u64, Client)], tag: &str) {
    let p = c.publisher("proxy");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut round = 0;
    loop {
        round += 1;
        let mut want = HashMap::new();
        for (room, _) in clients.iter() {
            if let Ok(id) = p
                .publish_room(*room, &format!("{tag}:{round}"), 1, None)
                .await
            {
                want.insert(*room, id);
            }
        }
        let mut all = want.len() == clients.len();
        for (room, client) in clients.iter_mut() {
            let got = drain_events(client, Duration::from_millis(400)).await;
            let ok = got.iter().any(
                |f| matches!(f, ServerFrame::Room { id, .. } if Some(&id.0) == want.get(room)),
            );
            all &= ok;
        }
        if all {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{tag}: routing not whole after 30 s\n{}",
            c.logs()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_kill_loses_a_bounded_window_and_restarts_heal() {
    let mut c = Cluster::start("broker-kill", 1, 1).await;
    c.spawn_router("router-a", 0);
    c.spawn_router("router-b", 0);
    c.spawn_broker("broker-a", 0);
    c.spawn_broker("broker-b", 0);
    c.spawn_gateway("gw", &[]);
    c.spawn_proxy("proxy", &[]);
    c.wait_all_healthy().await;

    // 8 rooms: with 2 replicas, (room / 1) % 2 sends half of them to each replica
    let mut clients = Vec::new();
    for room in 1..=8u64 {
        let client = c.client("gw", 100 + room).await;
        client
            .join(room)
            .await
            .unwrap_or_else(|e| panic!("join {room}: {e}\n{}", c.logs()));
        clients.push((room, client));
    }
    publish_round(&c, &mut clients, "warmup").await;

    // steady traffic for 5 s, broker-a killed after 1.5 s
    let p = c.publisher("proxy");
    let start = Instant::now();
    let mut sent: Vec<(u64, u64, Duration)> = Vec::new(); // room, id, when
    let mut killed_at = None;
    let mut k = 0u64;
    while start.elapsed() < Duration::from_secs(5) {
        if killed_at.is_none() && start.elapsed() >= Duration::from_millis(1500) {
            c.node("broker-a").proc.kill9();
            killed_at = Some(start.elapsed());
        }
        let room = 1 + k % 8;
        let at = start.elapsed();
        if let Ok(id) = p.publish_room(room, &format!("steady:{k}"), 1, None).await {
            sent.push((room, id, at));
        }
        k += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let killed_at = killed_at.unwrap();
    let mut got: HashMap<u64, HashSet<u64>> = HashMap::new();
    for (room, client) in clients.iter_mut() {
        for f in drain_events(client, Duration::from_secs(1)).await {
            if let ServerFrame::Room { id, .. } = f {
                assert!(
                    got.entry(*room).or_default().insert(id.0),
                    "duplicate delivery"
                );
            }
        }
    }
    let window = HB_TIMEOUT + HB_INTERVAL + Duration::from_millis(500);
    let mut lost = Vec::new();
    for (room, id, at) in &sent {
        if !got.get(room).is_some_and(|s| s.contains(id)) {
            lost.push(*at);
        }
    }
    eprintln!(
        "sent {} messages, broker-a killed at {:?}, lost {} (between {:?} and {:?})",
        sent.len(),
        killed_at,
        lost.len(),
        lost.first(),
        lost.last()
    );
    for at in &lost {
        assert!(
            *at + Duration::from_millis(100) >= killed_at && *at <= killed_at + window,
            "a message published at {at:?} was lost, outside the window {killed_at:?}..{:?}\n{}",
            killed_at + window,
            c.logs()
        );
    }
    assert!(
        sent.len() > 200,
        "publishing continued: {} sent",
        sent.len()
    );

    // restart the killed broker: it loads the table from a router and serves again
    c.node("broker-a").proc.respawn().unwrap();
    c.wait_healthy("broker-a").await;
    eventually_whole(&c, &mut clients, "after-broker-restart").await;
    publish_round(&c, &mut clients, "broker-restarted").await;

    // kill -9 and restart a router replica: its table comes back from RocksDB and its peer
    c.node("router-a").proc.kill9();
    c.node("router-a").proc.respawn().unwrap();
    c.wait_healthy("router-a").await;
    let (a, b) = (c.admin("router-a"), c.admin("router-b"));
    assert_eventually(
        "the restarted router has the whole table",
        Duration::from_secs(20),
        || {
            let (a, b) = (a.clone(), b.clone());
            async move {
                let ra = metric(&a, "pixiu_queue_depth{queue=\"table_rows\"}")
                    .await
                    .map_err(|e| e.to_string())?;
                let rb = metric(&b, "pixiu_queue_depth{queue=\"table_rows\"}")
                    .await
                    .map_err(|e| e.to_string())?;
                if ra == rb && ra >= 8.0 {
                    Ok(())
                } else {
                    Err(format!("router-a {ra} rows, router-b {rb}"))
                }
            }
        },
    )
    .await;
    eventually_whole(&c, &mut clients, "after-router-restart").await;
    // and a new member can join through the restarted routers
    let newcomer = c.client("gw", 999).await;
    newcomer
        .join(50)
        .await
        .unwrap_or_else(|e| panic!("join after router restart: {e}\n{}", c.logs()));
    clients.push((50, newcomer));
    publish_round(&c, &mut clients, "router-restarted").await;

    // and a broker restart once more, this time the other one
    c.node("broker-b").proc.kill9();
    c.node("broker-b").proc.respawn().unwrap();
    c.wait_healthy("broker-b").await;
    eventually_whole(&c, &mut clients, "after-second-broker-restart").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leaving_stops_delivery_and_lost_leaves_are_repaired_by_feedback() {
    let mut c = Cluster::start("leave", 1, 1).await;
    c.spawn_router("router", 0);
    c.spawn_broker("broker", 0);
    c.spawn_gateway("gw-a", &[]);
    c.spawn_gateway("gw-b", &[]);
    c.spawn_proxy("proxy", &[]);
    c.wait_all_healthy().await;
    let p = c.publisher("proxy");

    let mut a = c.client("gw-a", 1).await;
    let mut b = c.client("gw-b", 2).await;
    a.join(7).await.unwrap();
    b.join(7).await.unwrap();
    p.publish_room(7, "both", 0, None).await.unwrap();
    for cl in [&mut a, &mut b] {
        let got = tokio::time::timeout(Duration::from_secs(10), cl.next_event()).await;
        assert!(matches!(got, Ok(Some(ServerFrame::Room { .. }))), "{got:?}");
    }

    // B leaves: B gets nothing more, and gw-b (no member left) stops receiving room 7
    b.leave(7).await.unwrap();
    let gw_b = c.admin("gw-b");
    let room_in = "pixiu_messages_in_total{stage=\"room\"}";
    assert_eventually(
        "gw-b stops receiving room 7",
        Duration::from_secs(15),
        || {
            let (p, gw_b) = (&p, gw_b.clone());
            async move {
                let before = metric(&gw_b, room_in).await.map_err(|e| e.to_string())?;
                p.publish_room(7, "after-leave", 0, None)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::time::sleep(Duration::from_millis(300)).await;
                let after = metric(&gw_b, room_in).await.map_err(|e| e.to_string())?;
                if after == before {
                    Ok(())
                } else {
                    Err(format!("gw-b still receives room 7 ({before} -> {after})"))
                }
            }
        },
    )
    .await;
    let on_a = drain_events(&mut a, Duration::from_millis(500)).await;
    assert!(!on_a.is_empty(), "A keeps receiving");
    let on_b = drain_events(&mut b, Duration::from_millis(300)).await;
    assert!(on_b.is_empty(), "B left but got {on_b:?}");

    // A lost leave: C on gw-b joins room 8, the router dies, C disconnects (the leave goes to
    // a dead router), the router comes back with the stale row from RocksDB. A room message then
    // reaches gw-b, which has no member: its negative feedback removes the route.
    let c8 = c.client("gw-b", 3).await;
    c8.join(8).await.unwrap();
    let mut watcher = c.client("gw-a", 4).await;
    watcher.join(8).await.unwrap();
    // gw-b's updates to a router: sent, or dropped when it knows of no router
    let updates = |gw: String| async move {
        let sent = metric(&gw, "pixiu_messages_out_total{stage=\"gateway_update\"}").await?;
        let dropped = metric(
            &gw,
            "pixiu_messages_dropped_total{stage=\"gateway_update\"}",
        )
        .await?;
        anyhow::Ok(sent + dropped)
    };
    let updates_before = updates(gw_b.clone()).await.unwrap();
    c.node("router").proc.kill9();
    c8.close().await;
    let feedback = "pixiu_messages_out_total{stage=\"feedback\"}";
    let fb_before = metric(&gw_b, feedback).await.unwrap();
    assert_eventually(
        "gw-b sends its leave (lost: the router is down)",
        Duration::from_secs(10),
        || {
            let (gw_b, updates) = (gw_b.clone(), &updates);
            async move {
                let n = updates(gw_b).await.map_err(|e| e.to_string())?;
                if n > updates_before {
                    Ok(())
                } else {
                    Err(format!("gateway updates still {n}"))
                }
            }
        },
    )
    .await;
    c.node("router").proc.respawn().unwrap();
    c.wait_healthy("router").await;
    assert_eventually(
        "gw-b sends negative feedback and stops receiving room 8",
        Duration::from_secs(30),
        || {
            let (p, gw_b) = (&p, gw_b.clone());
            async move {
                let before = metric(&gw_b, room_in).await.map_err(|e| e.to_string())?;
                p.publish_room(8, "probe", 0, None)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::time::sleep(Duration::from_millis(300)).await;
                let after = metric(&gw_b, room_in).await.map_err(|e| e.to_string())?;
                let fb = metric(&gw_b, feedback).await.map_err(|e| e.to_string())?;
                if fb > fb_before && after == before {
                    Ok(())
                } else {
                    Err(format!(
                        "feedback {fb_before} -> {fb}, gw-b room messages {before} -> {after}"
                    ))
                }
            }
        },
    )
    .await;
    // the member on gw-a still gets room 8
    let got = drain_events(&mut watcher, Duration::from_millis(500)).await;
    assert!(!got.is_empty(), "gw-a's member of room 8 keeps receiving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_sessions_register_again_and_serve() {
    let mut c = Cluster::start("expiry", 1, 1).await;
    c.zk_session_timeout_ms = 2000;
    c.spawn_router("router", 0);
    c.spawn_broker("broker", 0);
    c.spawn_gateway("gw", &[]);
    c.spawn_proxy("proxy", &[]);
    c.wait_all_healthy().await;
    let mut clients = Vec::new();
    for room in [1u64, 2] {
        let cl = c.client("gw", room).await;
        cl.join(room).await.unwrap();
        clients.push((room, cl));
    }
    publish_round(&c, &mut clients, "before").await;

    let id_of = |c: &Cluster, role: &str| -> Vec<u64> {
        let s = c.status();
        s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["role"] == role && n["state"] == "running")
            .map(|n| n["id"].as_u64().unwrap())
            .collect()
    };
    for (name, role) in [("gw", "gateway"), ("broker", "broker")] {
        let before = id_of(&c, role);
        assert_eq!(before.len(), 1, "{role}: {before:?}");
        // pause the process well past the session timeout: ZooKeeper expires its session
        c.node(name).proc.sigstop();
        assert_eventually(
            &format!("{role}'s node expires"),
            Duration::from_secs(20),
            || {
                let ids = id_of(&c, role);
                async move {
                    if ids.is_empty() {
                        Ok(())
                    } else {
                        Err(format!("still {ids:?}"))
                    }
                }
            },
        )
        .await;
        c.node(name).proc.sigcont();
        assert_eventually(
            &format!("{role} registers again"),
            Duration::from_secs(20),
            || {
                let ids = id_of(&c, role);
                let before = before.clone();
                async move {
                    match ids.as_slice() {
                        [id] if *id > before[0] => Ok(()),
                        other => Err(format!("{role} ids now {other:?}, before {before:?}")),
                    }
                }
            },
        )
        .await;
        eventually_whole(&c, &mut clients, &format!("after-{role}-expiry")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn join_is_refused_while_no_broker_can_confirm_it() {
    let mut c = Cluster::start("no-broker", 1, 1).await;
    c.spawn_router("router", 0);
    c.spawn_broker("broker", 0);
    c.spawn_gateway("gw", &[]);
    c.spawn_proxy("proxy", &[]);
    c.wait_all_healthy().await;
    // the only broker leaves (SIGTERM deregisters at once): nobody can confirm a route
    c.node("broker").proc.sigterm();
    c.node("broker")
        .proc
        .wait_exit(Duration::from_secs(10))
        .expect("broker exits on SIGTERM");
    let client = c.client("gw", 1).await;
    let started = Instant::now();
    match client.join(5).await {
        Err(pixiu_client::ClientError::Refused { code, .. }) => assert_eq!(code, "unavailable"),
        other => panic!("join without a broker: {other:?}"),
    }
    // the join timeout (3 s by default) bounds the wait
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    let refused = metric(
        &c.admin("gw"),
        "pixiu_messages_dropped_total{stage=\"join\",reason=\"timeout\"}",
    )
    .await
    .unwrap();
    assert!(refused >= 1.0, "counted: {refused}");
    // a broker comes back: the same connection joins and receives
    c.node("broker").proc.respawn().unwrap();
    c.wait_all_healthy().await;
    let mut clients = vec![(5u64, client)];
    assert_eventually(
        "the join succeeds once a broker runs",
        Duration::from_secs(15),
        || {
            let cl = &clients[0].1;
            async move { cl.join(5).await.map_err(|e| e.to_string()) }
        },
    )
    .await;
    publish_round(&c, &mut clients, "after-broker-back").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publish_is_refused_while_no_proxy_runs_and_works_when_one_is_back() {
    let mut c = Cluster::start("no-proxy", 1, 1).await;
    c.spawn_router("router", 0);
    c.spawn_broker("broker", 0);
    c.spawn_gateway("gw", &[]);
    c.spawn_proxy("proxy", &[]);
    c.wait_all_healthy().await;
    let gw = c.admin("gw");
    let mut member = c.client("gw", 1).await;
    member.join(5).await.unwrap();
    // the only proxy leaves (SIGTERM deregisters at once); the gateway's gauge says so
    c.node("proxy").proc.sigterm();
    c.node("proxy")
        .proc
        .wait_exit(Duration::from_secs(10))
        .expect("proxy exits on SIGTERM");
    let running = "pixiu_peers{kind=\"proxy_running\"}";
    assert_eventually("the gateway sees no proxy", Duration::from_secs(10), || {
        let gw = gw.clone();
        async move {
            match metric(&gw, running).await.map_err(|e| e.to_string())? {
                0.0 => Ok(()),
                n => Err(format!("{n} proxies running")),
            }
        }
    })
    .await;
    // a publish is refused at once, with the reason, and counted; the connection stays usable
    match member.publish(5, "nowhere to go").await {
        Err(pixiu_client::ClientError::Refused { code, reason }) => {
            assert_eq!(code, "unavailable");
            assert!(reason.contains("no running proxy"), "{reason}");
        }
        other => panic!("publish without a proxy: {other:?}"),
    }
    let dropped = metric(
        &gw,
        "pixiu_messages_dropped_total{stage=\"publish\",reason=\"no_proxy\"}",
    )
    .await
    .unwrap();
    assert_eq!(dropped, 1.0);
    member.ping().await.expect("the connection still answers");
    // a proxy comes back: the same connection publishes and its member receives
    c.node("proxy").proc.respawn().unwrap();
    c.wait_all_healthy().await;
    let id = member.publish(5, "back").await.unwrap();
    let got = drain_events(&mut member, Duration::from_secs(2)).await;
    assert!(
        got.iter().any(
            |f| matches!(f, ServerFrame::Room { id: i, body, .. } if i.0 == id && body == "back")
        ),
        "the member got {got:?}"
    );
    assert_eq!(metric(&gw, running).await.unwrap(), 1.0);
}
