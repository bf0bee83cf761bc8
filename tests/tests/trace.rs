//! Per-hop tracing (`"trace": true`) of room messages over real processes: a traced HTTP
//! publish reaches members with one stamp per hop (proxy, broker, gateway) in order, a traced
//! client publish with four (the publishing gateway first), and an untraced one with none.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pixiu_protocol::client::ServerFrame;
use pixiu_protocol::trace::HopJson;
use pixiu_tests::Cluster;
use std::time::Duration;

/// The next frame `pick` takes (others are skipped), within 10 s.
async fn next<T>(client: &mut pixiu_client::Client, pick: impl Fn(ServerFrame) -> Option<T>) -> T {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), client.next_event()).await {
            Ok(Some(frame)) => {
                if let Some(t) = pick(frame) {
                    return t;
                }
            }
            other => panic!("no frame of the kind awaited: {other:?}"),
        }
    }
}

async fn next_room(member: &mut pixiu_client::Client) -> (u64, Option<Vec<HopJson>>) {
    next(member, |f| match f {
        ServerFrame::Room { id, trace, .. } => Some((id.0, trace)),
        _ => None,
    })
    .await
}

/// The hops' roles, and that each hop's times are ordered and follow the previous hop's.
///
/// Except a broker after Pi: its hop starts with its fetch, and a fetch already under way (the
/// one a device's coming online starts) finds an id as soon as Pi's leader wrote it, before Pi
/// answered the append. Then only its end is after Pi's start.
fn check_hops(trace: &[HopJson]) -> Vec<&str> {
    let (mut last_in, mut last_out, mut last_role) = (0, 0, "");
    for hop in trace {
        assert!(hop.in_us <= hop.out_us, "{hop:?}");
        if hop.role == "broker" && last_role == "pi" {
            assert!(
                hop.out_us >= last_in,
                "a broker with the message before Pi had it: {trace:?}"
            );
        } else {
            assert!(
                hop.in_us >= last_out,
                "a hop before the one it follows: {trace:?}"
            );
        }
        assert!(!hop.addr.is_empty(), "{hop:?}");
        (last_in, last_out, last_role) = (hop.in_us, hop.out_us, hop.role.as_str());
    }
    trace.iter().map(|h| h.role.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn traced_room_messages_carry_every_hop_untraced_ones_nothing() {
    let mut c = Cluster::start("trace", 1, 1).await;
    c.spawn_router("router", 0);
    c.spawn_broker("broker", 0);
    c.spawn_gateway("gw-a", &[]);
    c.spawn_gateway("gw-b", &[]);
    c.spawn_proxy("proxy", &[]);
    c.wait_all_healthy().await;
    let mut member = c.client("gw-b", 20).await;
    member.join(5).await.unwrap();
    let publisher = c.client("gw-a", 10).await;
    publisher.join(5).await.unwrap(); // a client publishes only to rooms it joined
    let p = c.publisher("proxy");

    let id = p.publish_room_traced(5, "traced").await.unwrap();
    let (got, trace) = next_room(&mut member).await;
    assert_eq!(got, id);
    let trace = trace.expect("a trace");
    assert_eq!(check_hops(&trace), ["proxy", "broker", "gateway"]);
    assert_eq!(
        trace[1].partition,
        Some(0),
        "the broker names its partition"
    );
    assert_eq!(trace[0].partition, None);

    let id = p.publish_room(5, "plain", 1, None).await.unwrap();
    assert_eq!(
        next_room(&mut member).await,
        (id, None),
        "untraced: no trace"
    );

    let id = publisher.publish_traced(5, "from a client").await.unwrap();
    let (got, trace) = next_room(&mut member).await;
    assert_eq!(got, id);
    let trace = trace.expect("a trace");
    assert_eq!(
        check_hops(&trace),
        ["gateway", "proxy", "broker", "gateway"]
    );
    assert_ne!(
        trace[0].addr, trace[3].addr,
        "the publisher's gateway, then the member's"
    );
}

async fn next_inbox(device: &mut pixiu_client::Client) -> (u64, Option<Vec<HopJson>>) {
    next(device, |f| match f {
        ServerFrame::Inbox { id, trace, .. } => Some((id.0, trace)),
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn traced_personal_messages_carry_xiu_and_pi_untraced_ones_nothing() {
    let mut c = Cluster::start_layout("trace-inbox", 1, 1, 2, 2).await;
    for p in 0..2 {
        c.spawn_store(&format!("xiu{p}"), "xiu", p, &["--min-insync", "0"]);
        c.spawn_store(&format!("pi{p}"), "pi", p, &["--min-insync", "0"]);
    }
    c.spawn_router("router", 0);
    c.spawn_broker("broker", 0);
    c.spawn_gateway("gw-a", &[]);
    c.spawn_gateway("gw-b", &[]);
    c.spawn_proxy("proxy", &[]);
    c.wait_all_healthy().await;
    let mut receiver = c.client("gw-b", 21).await;
    let p = c.publisher("proxy");

    // over HTTP: proxy, xiu, pi, broker, gateway, each naming its partition where it has one
    let id = p.send_user_traced(21, "traced").await.unwrap();
    let (got, trace) = next_inbox(&mut receiver).await;
    assert_eq!(got, id);
    let trace = trace.expect("a trace");
    assert_eq!(
        check_hops(&trace),
        ["proxy", "xiu", "pi", "broker", "gateway"]
    );
    let partitions: Vec<Option<u32>> = trace.iter().map(|h| h.partition).collect();
    assert_eq!(partitions, [None, Some(1), Some(1), Some(0), None]);
    receiver.ack(id).await.unwrap();

    let id = p.send_user(21, "plain", 1, None).await.unwrap();
    assert_eq!(
        next_inbox(&mut receiver).await,
        (id, None),
        "untraced: no trace"
    );
    receiver.ack(id).await.unwrap();

    // a client's send: the sender's gateway first
    let sender = c.client("gw-a", 10).await;
    sender
        .send_raw(r#"{"op":"send","to":"21","body":"from a client","trace":true,"cid":"s1"}"#)
        .await
        .unwrap();
    let (_, trace) = next_inbox(&mut receiver).await;
    let trace = trace.expect("a trace");
    assert_eq!(
        check_hops(&trace),
        ["gateway", "xiu", "pi", "broker", "gateway"]
    );
    assert_ne!(
        trace[0].addr, trace[4].addr,
        "the sender's gateway, then the receiver's"
    );
}
