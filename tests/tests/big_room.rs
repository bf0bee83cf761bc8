//! A big room end to end: gateways and proxy run `--big-rooms 1000000..1000100`, so room
//! 1000042 is split into 64 virtual rooms spread over both broker partitions. 200 members on 2
//! gateways get every message (20 over HTTP, 5 from a member) exactly once, each labelled with
//! the real room id; both broker partitions carry the room's traffic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures::future::join_all;
use pixiu_protocol::client::ServerFrame;
use pixiu_tests::{drain_events, metric, Cluster};
use std::collections::HashSet;
use std::time::Duration;

const ROOM: u64 = 1_000_042;
const MEMBERS: u64 = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn big_room_members_get_every_message_once() {
    let mut c = Cluster::start("big-room", 2, 1).await;
    c.extra_edge_args = vec!["--big-rooms".into(), "1000000..1000100".into()];
    c.spawn_router("router-a", 0);
    c.spawn_router("router-b", 0);
    c.spawn_broker("broker-0", 0);
    c.spawn_broker("broker-1", 1);
    c.spawn_gateway("gw-a", &[]);
    c.spawn_gateway("gw-b", &[]);
    c.spawn_proxy("proxy", &[]);
    c.wait_all_healthy().await;

    // 200 members, alternating gateways, connected and joined 50 at a time
    let started = std::time::Instant::now();
    let uids: Vec<u64> = (1..=MEMBERS).collect();
    let mut members = Vec::new();
    for chunk in uids.chunks(50) {
        let joined = join_all(chunk.iter().map(|&uid| {
            let c = &c;
            async move {
                let gw = if uid % 2 == 0 { "gw-a" } else { "gw-b" };
                let client = c.client(gw, uid).await;
                client
                    .join(ROOM)
                    .await
                    .unwrap_or_else(|e| panic!("uid {uid} join {ROOM}: {e}\n{}", c.logs()));
                (uid, client)
            }
        }))
        .await;
        members.extend(joined);
    }
    eprintln!("200 members joined in {:?}", started.elapsed());

    // 20 messages over HTTP, 5 from a member
    let p = c.publisher("proxy");
    let mut expected = HashSet::new();
    for k in 0..20u32 {
        let id = p
            .publish_room(ROOM, &format!("h:{k}"), 9000, None)
            .await
            .unwrap_or_else(|e| panic!("HTTP publish {k}: {e}"));
        expected.insert(id);
    }
    for k in 0..5u32 {
        let (uid, client) = &members[(k as usize * 37) % members.len()];
        let id = client
            .publish(ROOM, &format!("c:{uid}:{k}"))
            .await
            .unwrap_or_else(|e| panic!("uid {uid} publish {k}: {e}"));
        expected.insert(id);
    }
    assert_eq!(expected.len(), 25, "ids are unique");

    // every member, concurrently: every message, once, under the real room id
    let want = &expected;
    let results = join_all(members.iter_mut().map(|(uid, client)| async move {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while got.len() < want.len() && tokio::time::Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(5), client.next_event()).await {
                Ok(Some(ev)) => got.push(ev),
                _ => break,
            }
        }
        // and nothing more: no second copy through another virtual room
        got.extend(drain_events(client, Duration::from_millis(300)).await);
        (*uid, got)
    }))
    .await;
    for (uid, got) in results {
        let mut ids = HashSet::new();
        for ev in &got {
            let ServerFrame::Room { room, id, .. } = ev else {
                panic!("uid {uid}: unexpected frame {ev:?}");
            };
            assert_eq!(
                room.0, ROOM,
                "uid {uid}: the frame names another room: {ev:?}"
            );
            assert!(ids.insert(id.0), "uid {uid}: id {} twice", id.0);
            assert!(expected.contains(&id.0), "uid {uid}: unknown id {}", id.0);
        }
        assert_eq!(
            ids.len(),
            expected.len(),
            "uid {uid}: got {} of {} messages\n{}",
            ids.len(),
            expected.len(),
            c.logs()
        );
    }

    // the room was split: both broker partitions carried its traffic
    for broker in ["broker-0", "broker-1"] {
        let n = metric(&c.admin(broker), "pixiu_messages_in_total{stage=\"room\"}")
            .await
            .unwrap();
        eprintln!("{broker}: {n} room messages in");
        assert!(n > 0.0, "{broker} carried no traffic of the big room");
    }
    for gw in ["gw-a", "gw-b"] {
        let out = metric(&c.admin(gw), "pixiu_messages_out_total{stage=\"deliver\"}")
            .await
            .unwrap();
        assert!(out >= 25.0 * 100.0, "{gw} delivered {out}");
    }
    for name in [
        "router-a", "router-b", "broker-0", "broker-1", "gw-a", "gw-b", "proxy",
    ] {
        assert!(
            c.node(name).proc.is_running(),
            "{name} died\n{}",
            c.node(name).proc.log()
        );
    }
}
