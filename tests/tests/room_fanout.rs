//! The real-time room path end to end: real ZooKeeper, real processes of every role, real
//! QUIC and WebSocket sockets. 2 gateways, 2 broker partitions, 1 router partition with 2
//! replicas, 1 proxy; 30 clients in 3 rooms; 2,000 messages from HTTP and from clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pixiu_protocol::client::ServerFrame;
use pixiu_tests::{assert_eventually, drain_events, Cluster};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

const ROOMS: [u64; 3] = [101, 102, 103];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_member_gets_every_message_once_in_order() {
    let mut c = Cluster::start("fanout", 2, 1).await;
    c.spawn_router("router-a", 0);
    c.spawn_router("router-b", 0);
    c.spawn_broker("broker-0", 0);
    c.spawn_broker("broker-1", 1);
    c.spawn_gateway("gw-a", &[]);
    c.spawn_gateway("gw-b", &[]);
    c.spawn_proxy("proxy", &[]);
    c.wait_all_healthy().await;

    // 30 clients, alternating gateways, 10 per room
    let mut clients = Vec::new();
    for uid in 1..=30u64 {
        let gw = if uid % 2 == 0 { "gw-a" } else { "gw-b" };
        let room = ROOMS[(uid % 3) as usize];
        let client = c.client(gw, uid).await;
        client
            .join(room)
            .await
            .unwrap_or_else(|e| panic!("uid {uid} join {room}: {e}\n{}", c.logs()));
        clients.push((uid, room, client));
    }

    // 1,500 messages over HTTP: one sequential publisher per room (its order must hold)
    let mut expected: HashMap<u64, HashSet<u64>> = HashMap::new();
    let mut http_tasks = Vec::new();
    for room in ROOMS {
        let p = c.publisher("proxy");
        http_tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for k in 0..500u32 {
                let id = p
                    .publish_room(room, &format!("h:{room}:{k}"), 9000 + room, None)
                    .await
                    .unwrap_or_else(|e| panic!("publish {k} to {room}: {e}"));
                ids.push(id);
            }
            (room, ids)
        }));
    }
    // 500 messages from clients: 5 publishers, 100 each, through their gateways
    let mut client_ids: Vec<(u64, u64)> = Vec::new();
    for (uid, room, client) in clients.iter().take(5) {
        for k in 0..100u32 {
            let id = client
                .publish(*room, &format!("c:{uid}:{k}"))
                .await
                .unwrap_or_else(|e| panic!("client {uid} publish {k}: {e}"));
            client_ids.push((*room, id));
        }
    }
    for t in http_tasks {
        let (room, ids) = t.await.unwrap();
        expected.entry(room).or_default().extend(ids);
    }
    for (room, id) in client_ids {
        expected.entry(room).or_default().insert(id);
    }
    let total: usize = expected.values().map(HashSet::len).sum();
    assert_eq!(total, 2000, "ids are unique");

    // every member gets every message of its room
    let mut received: HashMap<u64, Vec<ServerFrame>> = HashMap::new();
    for (uid, room, client) in clients.iter_mut() {
        let want = expected[room].len();
        let got = received.entry(*uid).or_default();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while got.len() < want && tokio::time::Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(5), client.next_event()).await {
                Ok(Some(ev)) => got.push(ev),
                _ => break,
            }
        }
        // and nothing more arrives
        got.extend(drain_events(client, Duration::from_millis(300)).await);
        assert_eq!(
            got.len(),
            want,
            "uid {uid} in room {room}: got {} of {want}\n{}",
            got.len(),
            c.logs()
        );
    }

    for (uid, room, _) in &clients {
        let got = &received[uid];
        let mut ids = HashSet::new();
        let mut last_http: Option<u32> = None;
        let mut last_client: HashMap<u64, u32> = HashMap::new();
        for ev in got {
            let ServerFrame::Room {
                room: r, id, body, ..
            } = ev
            else {
                panic!("uid {uid}: unexpected frame {ev:?}");
            };
            assert_eq!(r.0, *room, "uid {uid} got a message of another room");
            assert!(ids.insert(id.0), "uid {uid} got id {} twice", id.0);
            assert!(expected[room].contains(&id.0), "uid {uid}: unknown id");
            let parts: Vec<&str> = body.split(':').collect();
            let k: u32 = parts[2].parse().unwrap();
            match parts[0] {
                "h" => {
                    assert!(
                        last_http.is_none_or(|l| k > l),
                        "uid {uid}: HTTP message {k} after {last_http:?}"
                    );
                    last_http = Some(k);
                }
                "c" => {
                    let from: u64 = parts[1].parse().unwrap();
                    let prev = last_client.insert(from, k);
                    assert!(
                        prev.is_none_or(|l| k > l),
                        "uid {uid}: client {from} message {k} after {prev:?}"
                    );
                }
                other => panic!("unexpected body kind {other}"),
            }
        }
    }

    // the metrics saw it: every gateway fanned out, nothing was dropped as undecodable
    for gw in ["gw-a", "gw-b"] {
        let out = pixiu_tests::metric(&c.admin(gw), "pixiu_messages_out_total{stage=\"deliver\"}")
            .await
            .unwrap();
        assert!(out >= 10_000.0, "{gw} delivered {out}");
    }
    assert_eventually(
        "status lists every node running",
        Duration::from_secs(10),
        || {
            let s = c.status();
            async move {
                let nodes = s["nodes"].as_array().cloned().unwrap_or_default();
                let running = nodes.iter().filter(|n| n["state"] == "running").count();
                if running == 7 {
                    Ok(())
                } else {
                    Err(format!("{running} running: {s}"))
                }
            }
        },
    )
    .await;
}
