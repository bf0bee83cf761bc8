//! Personal inboxes end to end: real ZooKeeper, real processes of every role (Xiu and Pi
//! replicated), real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pixiu_client::{Client, ClientError};
use pixiu_protocol::client::ServerFrame;
use pixiu_protocol::inbox::{MsgId, KIND_PERSONAL};
use pixiu_protocol::wire::{self, BatchedStore, Message, ReadResult, StoreAnswer, StoreRequest};
use pixiu_registry::{NodeInfo, NodeState, Registry, Role, ZkConfig};
use pixiu_tests::{assert_eventually, metric, Cluster};
use pixiu_transport::{TlsMaterial, Transport, TransportConfig};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const BROKER_TOML: &str =
    "redeliver_ms = 700\nredeliver_tries = 3\ndevice_timeout_ms = 4000\ninbox_poll_ms = 1000\n";
const GATEWAY_TOML: &str = "inbox_heartbeat_ms = 500\n";

/// ZooKeeper, one router, one broker, `xius` Xiu and `pis` Pi replicas of partition 0, one
/// gateway and one proxy; every store argument appended to each Xiu and Pi. Replicas are
/// started one after the other, each once the previous one is healthy, so their registry ids
/// follow their names: `xiu0` leads, `xiu1` is next in line.
async fn inbox_cluster(name: &str, xius: usize, pis: usize, store_args: &[&str]) -> Cluster {
    let mut c = Cluster::start(name, 1, 1).await;
    for i in 0..xius {
        c.spawn_store(&format!("xiu{i}"), "xiu", 0, store_args);
        c.wait_healthy(&format!("xiu{i}")).await;
    }
    for i in 0..pis {
        c.spawn_store(&format!("pi{i}"), "pi", 0, store_args);
        c.wait_healthy(&format!("pi{i}")).await;
    }
    spawn_front(&mut c).await;
    c
}

/// The roles in front of the stores: one router, broker, gateway and proxy; then waits until
/// every node is healthy.
async fn spawn_front(c: &mut Cluster) {
    c.spawn_router("router0", 0);
    let broker_cfg = c.config_file("broker", BROKER_TOML);
    let b: Vec<&str> = broker_cfg.iter().map(String::as_str).collect();
    c.spawn_broker_with("broker0", 0, &b);
    let gw_cfg = c.config_file("gateway", GATEWAY_TOML);
    let g: Vec<&str> = gw_cfg.iter().map(String::as_str).collect();
    c.spawn_gateway("gw0", &g);
    c.spawn_proxy("proxy0", &[]);
    c.wait_all_healthy().await;
}

/// Inbox frames until `n` distinct ids arrived (acking each), or the deadline.
async fn collect_inbox(c: &mut Client, n: usize, within: Duration) -> Vec<(u64, String)> {
    let mut seen = Vec::new();
    let mut ids = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + within;
    while ids.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, c.next_event()).await {
            Ok(Some(ServerFrame::Inbox { id, body, .. })) => {
                if ids.insert(id.0) {
                    seen.push((id.0, body));
                }
                c.ack(id.0).await.unwrap();
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    seen
}

/// Each user in `uids` connects a device and gets exactly its acknowledged `(uid, id, body)`
/// messages, in id order.
async fn assert_every_inbox(
    c: &Cluster,
    acked: &[(u64, u64, String)],
    uids: std::ops::RangeInclusive<u64>,
    within: Duration,
) {
    for uid in uids {
        let mut want: Vec<(u64, String)> = acked
            .iter()
            .filter(|(u, _, _)| *u == uid)
            .map(|(_, id, b)| (*id, b.clone()))
            .collect();
        want.sort();
        let mut dev = c.device("gw0", uid, "phone").await;
        let got = collect_inbox(&mut dev, want.len(), within).await;
        assert_eq!(got, want, "uid {uid}\n{}", c.logs());
    }
}

fn assert_increasing(got: &[(u64, String)]) {
    for w in got.windows(2) {
        assert!(w[0].0 < w[1].0, "ids out of order: {got:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_user_gets_everything_in_order_then_live_messages() {
    let c = inbox_cluster("inbox-offline", 2, 2, &[]).await;
    let publisher = c.publisher("proxy0");
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(
            publisher
                .send_user(7, &format!("m{i}"), 1, None)
                .await
                .unwrap(),
        );
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids grow: {ids:?}");
    let mut dev = c.device("gw0", 7, "phone").await;
    let got = collect_inbox(&mut dev, 20, Duration::from_secs(15)).await;
    let bodies: Vec<&str> = got.iter().map(|(_, b)| b.as_str()).collect();
    let want: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, want, "{}", c.logs());
    assert_increasing(&got);
    // then live: a message sent while online arrives without a reconnect
    let live = publisher.send_user(7, "live", 1, None).await.unwrap();
    let got = collect_inbox(&mut dev, 1, Duration::from_secs(10)).await;
    assert_eq!(got, vec![(live, "live".to_string())]);
    // and a client `send` from another user lands in the same inbox
    let sender = c.device("gw0", 8, "web").await;
    let id = sender.send(7, "from 8").await.unwrap();
    let got = collect_inbox(&mut dev, 1, Duration::from_secs(10)).await;
    assert_eq!(got, vec![(id, "from 8".to_string())]);
    assert!(id > live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_sid_twice_is_stored_and_delivered_once() {
    let c = inbox_cluster("inbox-sid", 2, 2, &[]).await;
    let publisher = c.publisher("proxy0");
    let a = publisher.send_user(9, "once", 1, Some(4242)).await.unwrap();
    let b = publisher
        .send_user(9, "twice", 1, Some(4242))
        .await
        .unwrap();
    assert_eq!(a, b, "a retry with the same sid returns the first id");
    let after = publisher.send_user(9, "next", 1, Some(4243)).await.unwrap();
    let mut dev = c.device("gw0", 9, "phone").await;
    let got = collect_inbox(&mut dev, 3, Duration::from_secs(5)).await;
    assert_eq!(
        got,
        vec![(a, "once".to_string()), (after, "next".to_string())],
        "stored once, delivered once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_device_gets_its_copy_and_unacked_ones_are_redelivered() {
    let c = inbox_cluster("inbox-devices", 2, 2, &[]).await;
    let publisher = c.publisher("proxy0");
    let mut phone = c.device("gw0", 11, "phone").await;
    let mut laptop = c.device("gw0", 11, "laptop").await;
    // both devices are known before the message: expiry waits for both
    assert_eventually("both devices online", Duration::from_secs(10), || {
        let admin = c.admin("broker0");
        async move {
            let n = metric(&admin, "pixiu_queue_depth{queue=\"inbox_devices\"}")
                .await
                .map_err(|e| e.to_string())?;
            if n >= 2.0 {
                Ok(())
            } else {
                Err(format!("{n} devices"))
            }
        }
    })
    .await;
    let id = publisher.send_user(11, "hello", 1, None).await.unwrap();
    let got = collect_inbox(&mut phone, 1, Duration::from_secs(10)).await;
    assert_eq!(got, vec![(id, "hello".to_string())]);
    // the laptop does not ack: it is pushed again after redeliver_ms
    let mut pushes = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while pushes < 2 && tokio::time::Instant::now() < deadline {
        if let Ok(Some(ServerFrame::Inbox { id: got, .. })) =
            tokio::time::timeout(Duration::from_secs(3), laptop.next_event()).await
        {
            assert_eq!(got.0, id);
            pushes += 1;
        }
    }
    assert_eq!(pushes, 2, "an unacknowledged message is redelivered");
    // reconnecting gets it again (its cursor never moved); acking ends it
    laptop.close().await;
    let mut laptop = c.device("gw0", 11, "laptop").await;
    let got = collect_inbox(&mut laptop, 1, Duration::from_secs(10)).await;
    assert_eq!(got, vec![(id, "hello".to_string())]);
    let quiet = tokio::time::timeout(Duration::from_millis(1500), laptop.next_event()).await;
    assert!(
        !matches!(quiet, Ok(Some(ServerFrame::Inbox { .. }))),
        "acknowledged: not pushed again ({quiet:?})"
    );
    // sync replays from a position
    laptop.sync(0).await.unwrap();
    let got = collect_inbox(&mut laptop, 1, Duration::from_secs(5)).await;
    assert!(got.is_empty() || got == vec![(id, "hello".to_string())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_cannot_reach_min_insync_is_refused_with_503() {
    let mut c = inbox_cluster("inbox-insync", 2, 2, &["--min-insync", "1"]).await;
    let publisher = c.publisher("proxy0");
    let ok = publisher.send_user(5, "in sync", 1, None).await.unwrap();
    // kill the xiu follower (the larger id): the leader cannot reach min_insync = 1
    c.node("xiu1").proc.kill9();
    let refused = publisher.send_user(5, "alone", 1, Some(777)).await;
    match refused {
        Err(ClientError::Http { status: 503, body }) => {
            assert!(body.contains("min_insync"), "{body}")
        }
        other => panic!("expected 503, got {other:?}"),
    }
    // the follower comes back, catches up, and the retry with the same sid is acknowledged
    c.node("xiu1").proc.respawn().unwrap();
    c.wait_healthy("xiu1").await;
    let mut retried = Err(ClientError::Closed);
    for _ in 0..20 {
        retried = publisher.send_user(5, "alone", 1, Some(777)).await;
        if retried.is_ok() {
            break;
        }
    }
    let retried = retried.unwrap_or_else(|e| panic!("retry: {e}\n{}", c.logs()));
    assert!(retried > ok);
    let mut dev = c.device("gw0", 5, "phone").await;
    let got = collect_inbox(&mut dev, 2, Duration::from_secs(10)).await;
    assert_eq!(
        got,
        vec![(ok, "in sync".to_string()), (retried, "alone".to_string())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_down_during_5000_writes_catches_up_and_serves_them_as_leader() {
    let mut c = inbox_cluster("inbox-catchup", 3, 2, &[]).await;
    // xiu2 (the largest id) misses every write
    c.node("xiu2").proc.kill9();
    const USERS: u64 = 10;
    const PER_USER: usize = 500;
    let mut tasks = Vec::new();
    for t in 0..10u64 {
        let p = c.publisher("proxy0");
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..(USERS as usize * PER_USER / 10) {
                let uid = 1 + (i as u64 + t) % USERS;
                let sid = 1_000_000 + t * 100_000 + i as u64;
                let body = format!("{t}-{i}");
                let id = p.send_user(uid, &body, 1, Some(sid)).await.unwrap();
                acked.push((uid, id, body));
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert_eq!(acked.len(), 5000);
    // it comes back, catches up (running = a pull found nothing more), then both others die
    c.node("xiu2").proc.respawn().unwrap();
    c.wait_healthy("xiu2").await;
    assert_eventually(
        "xiu2 replicated every message",
        Duration::from_secs(30),
        || {
            let admin = c.admin("xiu2");
            async move {
                let n = metric(&admin, "pixiu_messages_out_total{stage=\"replicated\"}")
                    .await
                    .map_err(|e| e.to_string())?;
                if n >= 5000.0 {
                    Ok(())
                } else {
                    Err(format!("{n} replicated"))
                }
            }
        },
    )
    .await;
    c.node("xiu0").proc.kill9();
    c.node("xiu1").proc.kill9();
    // once ZooKeeper expires their sessions xiu2 leads and every message is read from it
    assert_every_inbox(&c, &acked, 1..=USERS, Duration::from_secs(40)).await;
}

/// Three Xiu replicas; `xiu2` is paused (SIGSTOP, still registered) while writes are
/// acknowledged by `xiu0` and `xiu1`; `xiu0` is killed. `xiu1` takes over while `xiu2`, live
/// again, lags behind it: the new leader must take what a peer has beyond its own copy and
/// never cut its own copy down to a lagging peer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_never_cuts_its_copy_down_to_a_lagging_peer() {
    let mut c = inbox_cluster("inbox-lagging", 3, 2, &[]).await;
    let publisher = c.publisher("proxy0");
    let first = publisher.send_user(1, "before", 1, None).await.unwrap();
    let mut acked = vec![(1u64, first, "before".to_string())];
    c.node("xiu2").proc.sigstop();
    // short enough for xiu2's ZooKeeper session (3 s) to outlive the pause
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let p = c.publisher("proxy0");
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..25u64 {
                let uid = 1 + (t + i) % 4;
                let body = format!("{t}-{i}");
                let id = p.send_user(uid, &body, 1, None).await.unwrap();
                out.push((uid, id, body));
            }
            out
        }));
    }
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    c.node("xiu0").proc.kill9();
    c.node("xiu2").proc.sigcont();
    assert_every_inbox(&c, &acked, 1..=4, Duration::from_secs(30)).await;
    // and the new leader kept going: a new message is acknowledged with a larger id
    let next = publisher.send_user(1, "after", 1, None).await.unwrap();
    assert!(acked.iter().all(|(_, id, _)| *id < next));
    // the scenario happened: xiu1 met xiu2 behind it at takeover and kept its own copy
    let log = c.nodes["xiu1"].proc.log();
    assert!(
        log.contains("keeping my copy over a less recent peer's"),
        "xiu2 was not a lagging peer at takeover:\n{log}"
    );
}

/// Three Xiu replicas; the leader is killed and a message is sent at once. The proxy's store
/// goes to the successor as soon as the registry names it, instead of waiting out its
/// deadline (15 s here) on a leader that will never answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_sent_while_the_leader_dies_is_acknowledged_by_its_successor() {
    let mut c = inbox_cluster("inbox-failover-store", 3, 2, &[]).await;
    let cfg = c.config_file("proxy-slow", "inbox_timeout_ms = 15000\n");
    let cfg: Vec<&str> = cfg.iter().map(String::as_str).collect();
    c.spawn_proxy("proxy1", &cfg);
    c.wait_all_healthy().await;
    let publisher = c.publisher("proxy1");
    let before = publisher.send_user(9, "before", 1, None).await.unwrap();
    c.node("xiu0").proc.kill9();
    let started = std::time::Instant::now();
    let during = publisher
        .send_user(9, "during", 1, None)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let took = started.elapsed();
    eprintln!("acknowledged {took:?} after the leader was killed (session timeout 4 s)");
    assert!(during > before);
    assert!(
        took < Duration::from_secs(14),
        "the store waited out its deadline on the dead leader: {took:?}"
    );
    let mut dev = c.device("gw0", 9, "phone").await;
    let got = collect_inbox(&mut dev, 2, Duration::from_secs(10)).await;
    assert_eq!(
        got,
        vec![
            (before, "before".to_string()),
            (during, "during".to_string())
        ]
    );
}

/// A proxy allowed 2 personal messages waiting for acknowledgement (`inbox_max_pending`):
/// with the Xiu follower frozen (so `min_insync` 1 holds every store), two sends wait, and a
/// third is answered 503 with `Retry-After` at once rather than after the 5 s deadline. Once
/// the follower runs again the two waiting are acknowledged, the refused one is acknowledged
/// when retried with its sid, and the receiver gets all of them once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_with_its_pending_sends_full_refuses_more_at_once() {
    let mut c = inbox_cluster("inbox-admission", 2, 2, &["--min-insync", "1"]).await;
    let cfg = c.config_file("proxy-narrow", "inbox_max_pending = 2\n");
    let cfg: Vec<&str> = cfg.iter().map(String::as_str).collect();
    c.spawn_proxy("proxy1", &cfg);
    c.wait_all_healthy().await;
    let publisher = c.publisher("proxy1");
    let first = publisher.send_user(7, "first", 1, Some(900)).await.unwrap();
    c.node("xiu1").proc.sigstop();
    let waiting: Vec<_> = (901..=902)
        .map(|sid| {
            let p = c.publisher("proxy1");
            tokio::spawn(async move { p.send_user(7, &format!("m{sid}"), 1, Some(sid)).await })
        })
        .collect();
    // both are waiting once the proxy's gauge says so
    let admin = c.admin("proxy1");
    assert_eventually("2 sends waiting", Duration::from_secs(4), || {
        let admin = admin.clone();
        async move {
            let n = metric(&admin, "pixiu_queue_depth{queue=\"inbox_pending\"}")
                .await
                .map_err(|e| e.to_string())?;
            if n == 2.0 {
                Ok(())
            } else {
                Err(format!("{n} waiting"))
            }
        }
    })
    .await;
    let token = pixiu_protocol::auth::issue(pixiu_tests::SECRET.as_bytes(), 0, None, true, 3600);
    let asked = std::time::Instant::now();
    let r = reqwest::Client::new()
        .post(format!("{}/v1/users/7/messages", c.url("proxy1")))
        .bearer_auth(&token)
        .body(r#"{"body":"m903","from":"1","sid":"903"}"#)
        .send()
        .await
        .unwrap();
    let took = asked.elapsed();
    let status = r.status();
    let retry_after = r.headers().get("retry-after").cloned();
    let body = r.text().await.unwrap();
    // a batch needs a slot per message: one message is refused like a lone send, and a batch
    // larger than the limit is refused as a bad request
    let full = publisher.send_batch(&[item(7, "b904", Some(904))]).await;
    let too_big = publisher
        .send_batch(&[
            item(7, "b905", Some(905)),
            item(8, "b906", Some(906)),
            item(9, "b907", Some(907)),
        ])
        .await;
    c.node("xiu1").proc.sigcont();
    match full {
        Err(ClientError::Http { status: 503, body }) => {
            assert!(body.contains("inbox_max_pending"), "{body}")
        }
        other => panic!("a batch with no free slot: expected 503, got {other:?}"),
    }
    match too_big {
        Err(ClientError::Http { status: 400, body }) => {
            assert!(body.contains("inbox_max_pending 2"), "{body}")
        }
        other => panic!("a batch over inbox_max_pending: expected 400, got {other:?}"),
    }
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("inbox_max_pending"), "{body}");
    assert_eq!(retry_after.as_ref().map(|v| v.as_bytes()), Some(&b"1"[..]));
    assert!(body.contains("\"error\":\"unavailable\""), "{body}");
    assert!(
        took < Duration::from_secs(2),
        "refused after {took:?}: it waited instead of refusing"
    );
    let mut acked = vec![(first, "first".to_string())];
    for (w, sid) in waiting.into_iter().zip(901..) {
        let id = match w.await.unwrap() {
            Ok(id) => id,
            // the follower's return may come after this send's deadline: retried, as a
            // publisher would
            Err(_) => send_until_acked(&publisher, 7, &format!("m{sid}"), sid).await,
        };
        acked.push((id, format!("m{sid}")));
    }
    let retried = send_until_acked(&publisher, 7, "m903", 903).await;
    acked.push((retried, "m903".to_string()));
    acked.sort();
    let overloaded = metric(
        &c.admin("proxy1"),
        "pixiu_messages_dropped_total{stage=\"http\",reason=\"inbox_overloaded\"}",
    )
    .await
    .unwrap();
    assert!(overloaded >= 1.0, "{overloaded}");
    let mut dev = c.device("gw0", 7, "phone").await;
    let got = collect_inbox(&mut dev, 4, Duration::from_secs(10)).await;
    assert_eq!(got, acked);
}

/// Sends until acknowledged (bounded: 40 tries of up to 5 s each).
async fn send_until_acked(p: &pixiu_client::Publisher, uid: u64, body: &str, sid: u64) -> u64 {
    let mut last = None;
    for _ in 0..40 {
        match p.send_user(uid, body, 1, Some(sid)).await {
            Ok(id) => return id,
            Err(e) => last = Some(e),
        }
    }
    panic!("{body} never acknowledged: {last:?}");
}

/// Two Xiu replicas, `min_insync` 1. A store the leader (`xiu0`) cannot replicate is refused
/// with 503 but stays in its WAL; `xiu0` dies; `xiu1` leads and assigns the same counter to
/// another message; `xiu0` returns as a follower, finds that its record there differs
/// (`Diverged`), drops it, and copies the leader's. After `xiu1` dies, `xiu0` serves exactly
/// the acknowledged messages, and the refused one, retried with its sid, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejoining_replica_drops_its_unacknowledged_tail() {
    let mut c = inbox_cluster("inbox-diverge", 2, 2, &[]).await;
    let publisher = c.publisher("proxy0");
    let first = publisher.send_user(5, "first", 1, Some(776)).await.unwrap();
    c.node("xiu1").proc.kill9();
    let refused = publisher.send_user(5, "refused", 1, Some(777)).await;
    assert!(
        matches!(refused, Err(ClientError::Http { status: 503, .. })),
        "{refused:?}"
    );
    // xiu0 dies with the refused message in its WAL; xiu1 returns and leads alone
    c.node("xiu0").proc.kill9();
    c.node("xiu1").proc.respawn().unwrap();
    c.wait_healthy("xiu1").await;
    // xiu1 stores another message under the same counter (refused too: no follower yet)
    let alone = publisher.send_user(5, "second", 1, Some(778)).await;
    assert!(
        matches!(alone, Err(ClientError::Http { status: 503, .. })),
        "{alone:?}"
    );
    // xiu0 returns as a follower: its record at that counter differs, it drops it
    c.node("xiu0").proc.respawn().unwrap();
    c.wait_healthy("xiu0").await;
    let second = send_until_acked(&publisher, 5, "second", 778).await;
    // the counter xiu0 had used for the refused message, now another message's
    assert_eq!(second & 0xFFFF_FFFF_FFFF, (first & 0xFFFF_FFFF_FFFF) + 1);
    let dropped = metric(
        &c.admin("xiu0"),
        "pixiu_messages_out_total{stage=\"diverged_dropped\"}",
    )
    .await
    .unwrap();
    assert_eq!(dropped, 1.0, "xiu0 dropped its unacknowledged record");
    // the refused message is not lost for a publisher that retries it with its sid
    let third = send_until_acked(&publisher, 5, "refused", 777).await;
    assert!(third > second);
    // xiu1 dies; xiu0 leads and serves exactly what was acknowledged
    c.node("xiu1").proc.kill9();
    let mut dev = c.device("gw0", 5, "phone").await;
    let got = collect_inbox(&mut dev, 3, Duration::from_secs(30)).await;
    assert_eq!(
        got,
        vec![
            (first, "first".to_string()),
            (second, "second".to_string()),
            (third, "refused".to_string())
        ],
        "{}",
        c.logs()
    );
}

/// A transport of the cluster's own (its TLS material) to ask node `name` directly, and that
/// node's registered address.
async fn ask_node(
    c: &Cluster,
    name: &str,
) -> (
    Transport,
    std::net::SocketAddr,
    tokio::sync::mpsc::Receiver<pixiu_transport::Inbound>,
) {
    let status = c.status();
    let node = status["nodes"]
        .as_array()
        .expect("status nodes")
        .iter()
        .find(|n| n["admin"].as_str() == Some(c.admin(name).as_str()))
        .unwrap_or_else(|| panic!("{name} is not registered"));
    let addr = node["addr"].as_str().unwrap().parse().unwrap();
    let tls = TlsMaterial::load(&c.tls_dir).unwrap();
    let (transport, inbound) =
        Transport::bind(TransportConfig::new("127.0.0.1:0".parse().unwrap(), tls))
            .await
            .unwrap();
    (transport, addr, inbound)
}

/// A Xiu leader answers each store of a batch on its own: a bad one (no receivers, a body
/// over 64 KiB) is refused without holding up the good ones beside it, which are stored and
/// delivered; a batch over 256 stores is refused whole, and nothing of it is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_batch_is_answered_store_by_store() {
    let c = inbox_cluster("inbox-batch", 1, 1, &["--min-insync", "0"]).await;
    let (transport, addr, _inbound) = ask_node(&c, "xiu0").await;
    let store = |sid: u64, to: Vec<u64>, body: String| BatchedStore {
        req: StoreRequest {
            sid,
            from: 1,
            to,
            body,
            ts: pixiu_protocol::now_ms(),
        },
        trace: None,
    };
    let ask = |msg: Message| {
        let transport = transport.clone();
        async move {
            let answer = transport
                .request(addr, wire::encode(&msg), Duration::from_secs(5))
                .await
                .unwrap();
            wire::decode(&answer).unwrap()
        }
    };
    let batch = vec![
        store(5001, vec![11], "good one".into()),
        store(5002, vec![], "nobody".into()),
        store(5003, vec![11], "x".repeat(64 * 1024 + 1)),
        store(5004, vec![11], "good two".into()),
    ];
    let Message::XiuStoredBatch(answers) = ask(Message::XiuStoreBatch(batch)).await else {
        panic!("expected a batch answer");
    };
    let [StoreAnswer::Stored { id: one, .. }, StoreAnswer::Refused { reason: nobody }, StoreAnswer::Refused { reason: big }, StoreAnswer::Stored { id: two, .. }] =
        &answers[..]
    else {
        panic!("answers: {answers:?}");
    };
    assert!(nobody.contains("no receivers"), "{nobody}");
    assert!(big.contains("exceeds"), "{big}");
    let too_many = (0..257)
        .map(|i| store(6000 + i, vec![12], format!("m{i}")))
        .collect();
    match ask(Message::XiuStoreBatch(too_many)).await {
        Message::Refused { reason } => assert!(reason.contains("at most 256"), "{reason}"),
        other => panic!("a batch of 257 was answered {other:?}"),
    }
    // the good ones of the first batch are in user 11's inbox (in id order, as every inbox);
    // user 12 got nothing
    let mut dev = c.device("gw0", 11, "phone").await;
    let got = collect_inbox(&mut dev, 2, Duration::from_secs(10)).await;
    let mut want = vec![
        (*one, "good one".to_string()),
        (*two, "good two".to_string()),
    ];
    want.sort();
    assert_eq!(got, want);
    let mut other = c.device("gw0", 12, "phone").await;
    assert!(collect_inbox(&mut other, 1, Duration::from_secs(2))
        .await
        .is_empty());
}

/// Xiu gives a message only to a read for one of its receivers: an index entry naming
/// another user's message (a bug, or a stale replica) must not leak it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xiu_refuses_to_read_a_message_for_a_user_it_is_not_addressed_to() {
    let c = inbox_cluster("inbox-misaddressed", 1, 1, &["--min-insync", "0"]).await;
    let id = c
        .publisher("proxy0")
        .send_user(3, "for three", 1, None)
        .await
        .unwrap();
    let (transport, addr, _inbound) = ask_node(&c, "xiu0").await;
    let read = |uid: u64| {
        let transport = transport.clone();
        async move {
            let req = wire::encode(&Message::XiuRead { uid, ids: vec![id] });
            let answer = transport
                .request(addr, req, Duration::from_secs(5))
                .await
                .unwrap();
            match wire::decode(&answer).unwrap() {
                Message::XiuMessages { mut items } => items.pop().unwrap(),
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    match read(4).await {
        ReadResult::Missing { reason, .. } => assert!(reason.contains("not addressed"), "{reason}"),
        other => panic!("another user's message was given out: {other:?}"),
    }
    match read(3).await {
        ReadResult::Found(m) => assert_eq!(m.body, "for three"),
        other => panic!("{other:?}"),
    }
    let refused = metric(
        &c.admin("xiu0"),
        "pixiu_messages_dropped_total{stage=\"read\",reason=\"misaddressed\"}",
    )
    .await
    .unwrap();
    assert_eq!(refused, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_record_is_detected_by_its_crc_and_never_delivered() {
    let mut c = inbox_cluster("inbox-crc", 1, 1, &["--min-insync", "0"]).await;
    let publisher = c.publisher("proxy0");
    let a = publisher.send_user(3, "first", 1, None).await.unwrap();
    let b = publisher.send_user(3, "second", 1, None).await.unwrap();
    let d = publisher.send_user(3, "third", 1, None).await.unwrap();
    c.node("xiu0").proc.kill9();
    {
        // flip one byte of the second message's payload (after its 4-byte CRC)
        let db = rocksdb::DB::open_default(c.data_dir("xiu0")).unwrap();
        let mut key = vec![b'm'];
        key.extend_from_slice(&(b & 0xFFFF_FFFF_FFFF).to_be_bytes());
        let mut v = db.get(&key).unwrap().expect("the record is on disk");
        let last = v.len() - 1;
        v[last] ^= 0x5A;
        db.put(&key, &v).unwrap();
        db.flush().unwrap();
    }
    c.node("xiu0").proc.respawn().unwrap();
    c.wait_healthy("xiu0").await;
    let mut dev = c.device("gw0", 3, "phone").await;
    let got = collect_inbox(&mut dev, 3, Duration::from_secs(5)).await;
    assert_eq!(
        got,
        vec![(a, "first".to_string()), (d, "third".to_string())],
        "the corrupt message is skipped, never delivered as garbage"
    );
    let corrupt = metric(
        &c.admin("xiu0"),
        "pixiu_messages_dropped_total{stage=\"read\",reason=\"corrupt\"}",
    )
    .await
    .unwrap();
    assert!(corrupt >= 1.0, "xiu reports the corrupt read");
    let skipped = metric(
        &c.admin("broker0"),
        "pixiu_messages_dropped_total{stage=\"inbox_read\",reason=\"unreadable\"}",
    )
    .await
    .unwrap();
    assert!(skipped >= 1.0, "the broker reports the skipped message");
    assert!(c.nodes["xiu0"].proc.log().contains("crc32 mismatch"));
}

/// `POST /v1/users/messages` (multicast): one stored copy per Xiu partition, indexed in every
/// listed inbox, delivered to each receiver once; a retried `sid` answers the same ids; a bad
/// list is refused with 400 and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multicast_reaches_every_listed_inbox_across_partitions() {
    let mut c = Cluster::start_layout("inbox-multicast", 1, 1, 2, 2).await;
    for p in 0..2 {
        c.spawn_store(&format!("xiu{p}"), "xiu", p, &["--min-insync", "0"]);
        c.spawn_store(&format!("pi{p}"), "pi", p, &["--min-insync", "0"]);
    }
    spawn_front(&mut c).await;
    let publisher = c.publisher("proxy0");

    // users 10 and 12 live in partition 0, 11 and 13 in partition 1; 10 is listed twice
    let to = [10, 11, 12, 13, 10];
    let ids = publisher
        .send_users(&to, "to all four", 1, Some(77))
        .await
        .unwrap();
    assert_eq!(
        ids.keys().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([10, 11, 12, 13])
    );
    // one stored message per partition: its id carries that partition
    assert_eq!(ids[&10], ids[&12]);
    assert_eq!(ids[&11], ids[&13]);
    assert_eq!(pixiu_protocol::inbox::MsgId(ids[&10]).partition(), 0);
    assert_eq!(pixiu_protocol::inbox::MsgId(ids[&11]).partition(), 1);

    // a retry of the same sid stores nothing new and answers the same ids
    let again = publisher
        .send_users(&to, "to all four", 1, Some(77))
        .await
        .unwrap();
    assert_eq!(again, ids);

    for uid in 10..=13 {
        let mut dev = c.device("gw0", uid, "phone").await;
        // waits for a second message too, so a duplicate would show
        let got = collect_inbox(&mut dev, 2, Duration::from_secs(2)).await;
        assert_eq!(
            got,
            vec![(ids[&uid], "to all four".to_string())],
            "uid {uid} gets the message once\n{}",
            c.logs()
        );
    }

    // refused with a reason: no receivers, too many receivers
    for (to, why) in [
        (vec![], "no receivers"),
        (
            (0..=pixiu_courier::MAX_RECEIVERS as u64).collect(),
            "too many receivers",
        ),
    ] {
        match publisher.send_users(&to, "refused", 1, None).await {
            Err(ClientError::Http { status: 400, body }) => {
                assert!(body.contains("bad_request"), "{why}: {body}")
            }
            other => panic!("{why}: expected 400, got {other:?}"),
        }
    }
    // and nothing of the refused sends reached an inbox: the next thing user 10's phone (which
    // acknowledged everything above) gets is the next accepted message
    let after = publisher.send_users(&[10], "after", 1, None).await.unwrap()[&10];
    assert!(after > ids[&10], "ids of one inbox only grow");
    let mut dev = c.device("gw0", 10, "phone").await;
    let got = collect_inbox(&mut dev, 2, Duration::from_secs(3)).await;
    assert_eq!(got, vec![(after, "after".to_string())], "{}", c.logs());
}

fn item(to: u64, body: &str, sid: Option<u64>) -> pixiu_client::BatchItem {
    pixiu_client::BatchItem {
        to: pixiu_client::Id(to),
        body: body.to_string(),
        from: Some(pixiu_client::Id(1)),
        sid: sid.map(pixiu_client::Id),
        trace: false,
    }
}

/// The stored ids of a batch's results, or the first failure.
fn stored_ids(results: &[pixiu_client::BatchResult]) -> Vec<u64> {
    results
        .iter()
        .map(|r| match r {
            pixiu_client::BatchResult::Stored { id } => id.0,
            other => panic!("not stored: {other:?} in {results:?}"),
        })
        .collect()
}

/// `POST /v1/users/messages/batch`: every message stored and acknowledged on its own, one
/// user's messages in the batch's order; a retried batch (same sids) answers the same ids; bad
/// batches are refused whole, storing nothing; when the leader cannot reach `min_insync`, the
/// answer is 503 with a result per message, a user's later messages are not sent after an
/// earlier one failed, and sending the failed ones again with their sids keeps every inbox in
/// batch order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_acknowledged_message_by_message_in_order_per_user() {
    let mut c = inbox_cluster("inbox-batch", 2, 2, &["--min-insync", "1"]).await;
    let publisher = c.publisher("proxy0");
    let mut acked: Vec<(u64, u64, String)> = Vec::new();

    // 30 messages to three users, interleaved
    let batch: Vec<_> = (0..30)
        .map(|i| item(20 + i % 3, &format!("b{i}"), Some(5000 + i)))
        .collect();
    let results = publisher.send_batch(&batch).await.unwrap();
    let ids = stored_ids(&results);
    for uid in 20..=22 {
        let mine: Vec<u64> = (0..30)
            .filter(|i| 20 + i % 3 == uid)
            .map(|i| ids[i as usize])
            .collect();
        assert!(
            mine.windows(2).all(|w| w[0] < w[1]),
            "uid {uid}: ids follow the batch's order: {mine:?}"
        );
    }
    for (m, id) in batch.iter().zip(&ids) {
        acked.push((m.to.0, *id, m.body.clone()));
    }
    // the same batch again: the same ids, nothing stored twice
    let again = publisher.send_batch(&batch).await.unwrap();
    assert_eq!(stored_ids(&again), ids);

    // refused whole, with a reason
    let long = "x".repeat(pixiu_protocol::MAX_BODY + 1);
    let too_many: Vec<_> = (0..=pixiu_protocol::client::MAX_BATCH as u64)
        .map(|i| item(20, "n", Some(9000 + i)))
        .collect();
    for (messages, status, code, why) in [
        (vec![], 400, "bad_request", "1 to 1000 messages"),
        (too_many, 400, "bad_request", "1 to 1000 messages"),
        (
            vec![item(20, "ok", Some(8000)), item(21, &long, Some(8001))],
            413,
            "too_large",
            "message 1",
        ),
    ] {
        match publisher.send_batch(&messages).await {
            Err(ClientError::Http { status: s, body }) => {
                assert_eq!(s, status, "{why}: {body}");
                assert!(body.contains(code) && body.contains(why), "{body}");
            }
            other => panic!("{why}: expected {status}, got {other:?}"),
        }
    }
    let (status, body) = publisher
        .raw_post(
            "/v1/users/messages/batch",
            br#"{"messages":[{"to":["20"],"body":"a list"}]}"#.to_vec(),
            "application/json",
        )
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");

    // the follower dies: nothing can be acknowledged
    c.node("xiu1").proc.kill9();
    let failing = vec![
        item(20, "f0", Some(7000)),
        item(21, "f1", None),
        item(20, "f2", Some(7002)),
    ];
    let results = publisher.send_batch(&failing).await.unwrap();
    let sids: Vec<u64> = results
        .iter()
        .map(|r| match r {
            pixiu_client::BatchResult::Failed { error, sid, .. } => {
                assert_eq!(error, "unavailable", "{results:?}");
                sid.0
            }
            other => panic!("acknowledged without min_insync: {other:?}"),
        })
        .collect();
    assert_eq!(sids[0], 7000);
    assert_eq!(sids[2], 7002);
    match &results[2] {
        pixiu_client::BatchResult::Failed { reason, .. } => {
            assert!(reason.contains("not sent"), "{reason}")
        }
        other => panic!("{other:?}"),
    }

    // an outage is a warning a second in the proxy's log, not one per message
    let many: Vec<_> = (0..40).map(|i| item(100 + i, "down", None)).collect();
    let results = publisher.send_batch(&many).await.unwrap();
    assert!(results
        .iter()
        .all(|r| matches!(r, pixiu_client::BatchResult::Failed { .. })));
    let warned = c
        .node("proxy0")
        .proc
        .log()
        .matches("inbox message not acknowledged")
        .count();
    assert!(
        (1..10).contains(&warned),
        "{warned} warnings for 42 messages not acknowledged"
    );

    // back, and the failed ones sent again with their sids: acknowledged, in order
    c.node("xiu1").proc.respawn().unwrap();
    c.wait_healthy("xiu1").await;
    let retry: Vec<_> = failing
        .iter()
        .zip(&sids)
        .map(|(m, sid)| item(m.to.0, &m.body, Some(*sid)))
        .collect();
    let mut ids = None;
    for _ in 0..20 {
        if let Ok(r) = publisher.send_batch(&retry).await {
            if r.iter()
                .all(|r| matches!(r, pixiu_client::BatchResult::Stored { .. }))
            {
                ids = Some(stored_ids(&r));
                break;
            }
        }
    }
    let ids = ids.unwrap_or_else(|| panic!("retry never acknowledged\n{}", c.logs()));
    assert!(ids[0] < ids[2]);
    for (m, id) in retry.iter().zip(&ids) {
        acked.push((m.to.0, *id, m.body.clone()));
    }
    assert_every_inbox(&c, &acked, 20..=22, Duration::from_secs(15)).await;
}

/// A Pi leader takes an append in two halves (the Xiu indexer pipelines its batches this
/// way): `PiWrite` is answered once the leader wrote it, `PiAwait` once a follower holds it.
/// Either half names the leader node that wrote the batches before it; any other node
/// refuses, so no batch lands in a log without those. With the follower dead, the write is
/// answered and the wait is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pi_append_in_two_halves_is_answered_only_by_the_node_that_wrote() {
    let mut c = inbox_cluster("inbox-pi-halves", 1, 2, &["--min-insync", "1"]).await;
    let (transport, addr, _inbound) = ask_node(&c, "pi0").await;
    let ask = |msg: Message| {
        let transport = transport.clone();
        async move {
            let answer = transport
                .request(addr, wire::encode(&msg), Duration::from_secs(8))
                .await
                .unwrap();
            wire::decode(&answer).unwrap()
        }
    };
    let uid = 77;
    let id = |n: u64| MsgId::new(0, KIND_PERSONAL, n).0;
    let write = |n: u64, node: u64| Message::PiWrite {
        items: vec![(uid, id(n))],
        ts: pixiu_protocol::now_ms(),
        node,
        traced: false,
    };
    let Message::PiWritten {
        node: me,
        last,
        stamp: None,
    } = ask(write(1, 0)).await
    else {
        panic!("the first write was not answered PiWritten");
    };
    assert_eq!(
        ask(Message::PiAwait {
            node: me,
            upto: last
        })
        .await,
        Message::Done
    );
    // pinned to a node that is not this one: refused, nothing written
    match ask(write(2, me + 1)).await {
        Message::Unavailable { reason } => assert!(reason.contains("did not write"), "{reason}"),
        other => panic!("a write pinned to another node was answered {other:?}"),
    }
    match ask(Message::PiAwait {
        node: me + 1,
        upto: last,
    })
    .await
    {
        Message::Unavailable { reason } => assert!(reason.contains("which wrote it"), "{reason}"),
        other => panic!("a wait for another node was answered {other:?}"),
    }
    let list = Message::PiList {
        uid,
        after: 0,
        max: 10,
    };
    assert_eq!(
        ask(list.clone()).await,
        Message::PiIds {
            ids: vec![id(1)],
            cursor: 0
        }
    );
    // the follower dies: the leader still writes, but the wait for min_insync fails
    c.node("pi1").proc.kill9();
    let Message::PiWritten { node, last, .. } = ask(write(3, me)).await else {
        panic!("the leader did not write with its follower dead");
    };
    assert_eq!(node, me);
    match ask(Message::PiAwait {
        node: me,
        upto: last,
    })
    .await
    {
        Message::Unavailable { reason } => assert!(reason.contains("min_insync"), "{reason}"),
        other => panic!("a wait with no follower was answered {other:?}"),
    }
    // back, it catches up, and the same wait is answered
    c.node("pi1").proc.respawn().unwrap();
    c.wait_healthy("pi1").await;
    assert_eventually(
        "the follower holds the write",
        Duration::from_secs(20),
        || async move {
            match ask(Message::PiAwait {
                node: me,
                upto: last,
            })
            .await
            {
                Message::Done => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert_eq!(
        ask(list).await,
        Message::PiIds {
            ids: vec![id(1), id(3)],
            cursor: 0
        }
    );
}

/// A Xiu of this version indexes through a Pi leader of an earlier one (a rolling upgrade
/// that reached Xiu first): that Pi refuses `PiWrite` as a bad frame, and the indexer falls
/// back on one `PiAppend` at a time, so stores are still acknowledged, and only once the
/// old Pi took their ids. The old Pi here is the test's own node, registered in ZooKeeper as
/// the leader of Pi partition 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_xiu_indexes_through_a_pi_that_does_not_know_pi_write() {
    let mut c = Cluster::start("inbox-old-pi", 1, 1).await;
    c.spawn_store("xiu0", "xiu", 0, &["--min-insync", "0"]);
    c.wait_healthy("xiu0").await;
    let registry = Registry::zookeeper(ZkConfig {
        hosts: c.zk.connect_string(),
        cluster: "test".into(),
        session_timeout: Duration::from_secs(6),
        refresh_interval: Duration::from_secs(1),
    })
    .await
    .unwrap();
    let tls = TlsMaterial::load(&c.tls_dir).unwrap();
    let (transport, mut inbound) =
        Transport::bind(TransportConfig::new("127.0.0.1:0".parse().unwrap(), tls))
            .await
            .unwrap();
    let mut info = NodeInfo::new(transport.local_addr().to_string());
    info.state = NodeState::Running;
    let _old_pi = registry.register(Role::Pi, Some(0), info).await.unwrap();
    // what the old Pi was asked: refused writes, and the ids it appended
    let refused = Arc::new(AtomicUsize::new(0));
    let appended = Arc::new(Mutex::new(Vec::<(u64, u64)>::new()));
    let (r, a) = (refused.clone(), appended.clone());
    tokio::spawn(async move {
        while let Some(got) = inbound.recv().await {
            let pixiu_transport::Inbound::Request { bytes, reply, .. } = got else {
                continue;
            };
            let answer = match wire::decode(&bytes) {
                Ok(Message::PiAppend { items, .. }) => {
                    a.lock().unwrap().extend(items);
                    Message::Done
                }
                Ok(Message::PiWrite { .. }) => {
                    r.fetch_add(1, Ordering::SeqCst);
                    Message::Refused {
                        reason: "bad frame: unknown message kind".into(),
                    }
                }
                other => Message::Refused {
                    reason: format!("not served here: {other:?}"),
                },
            };
            reply.send(wire::encode(&answer));
        }
    });
    spawn_front(&mut c).await;
    let publisher = c.publisher("proxy0");
    let mut ids = Vec::new();
    for (uid, body, sid) in [(5, "one", 9001), (6, "two", 9002), (5, "three", 9003)] {
        let id = send_until_acked(&publisher, uid, body, sid).await;
        // acknowledged only once the old Pi took it
        assert!(
            appended.lock().unwrap().contains(&(uid, id)),
            "{id} for {uid} acknowledged before the old pi appended it"
        );
        ids.push(id);
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert!(
        refused.load(Ordering::SeqCst) >= 1,
        "PiWrite was never tried"
    );
}

/// Pi retention over real processes: with `retention_ms` 3 s on the leader, the ids of 1,100
/// offline users are expired by a sweep in two steps (one step visits 1,000 users, holding the
/// index for that long only); the follower, which
/// never sweeps (and is configured to keep ids for 7 days), drops them too, through the log,
/// and once it leads, a user who comes online gets only a message sent after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pi_retention_expires_old_ids_in_steps_and_the_follower_follows() {
    const USERS: u64 = 1_100;
    const FIRST: u64 = 5_000;
    let mut c = Cluster::start("inbox-pi-retention", 1, 1).await;
    c.spawn_store("xiu0", "xiu", 0, &["--min-insync", "0"]);
    c.wait_healthy("xiu0").await;
    let short = c.config_file(
        "pi-short",
        "retention_ms = 3000\nmaintenance_interval_ms = 200\n",
    );
    let mut leader_args: Vec<&str> = short.iter().map(String::as_str).collect();
    leader_args.extend(["--min-insync", "0"]);
    c.spawn_store("pi0", "pi", 0, &leader_args);
    c.wait_healthy("pi0").await;
    c.spawn_store("pi1", "pi", 0, &["--min-insync", "0"]);
    c.wait_healthy("pi1").await;
    spawn_front(&mut c).await;

    let publisher = c.publisher("proxy0");
    let users: Vec<u64> = (FIRST..FIRST + USERS).collect();
    for chunk in users.chunks(550) {
        let items: Vec<_> = chunk.iter().map(|u| item(*u, "old", None)).collect();
        let results = publisher.send_batch(&items).await.unwrap();
        assert_eq!(stored_ids(&results).len(), chunk.len());
    }
    let metric = |stage: &str| format!("pixiu_messages_out_total{{role=\"pi\",stage=\"{stage}\"}}");
    pixiu_tests::wait_metric_sum(
        "the leader expired every user's id",
        &[c.admin("pi0")],
        &metric("retention_expired"),
        USERS as f64,
        Duration::from_secs(30),
    )
    .await;
    // the first sweep that found old ids saw all 1,100 users holding ids: two steps
    let log = c.node("pi0").proc.plain_log();
    assert!(
        log.lines()
            .any(|l| l.contains("expired entries past retention") && l.contains("steps=2")),
        "no sweep in two steps:\n{log}"
    );
    // the follower applied every append and every expiry, then takes over
    pixiu_tests::wait_metric_sum(
        "the follower replicated the appends and the expiries",
        &[c.admin("pi1")],
        &metric("replicated"),
        (2 * USERS) as f64,
        Duration::from_secs(30),
    )
    .await;
    c.node("pi0").proc.kill9();

    let (transport, pi1, _inbound) = ask_node(&c, "pi1").await;
    let ids_on_pi1 = |uid: u64| {
        let transport = transport.clone();
        async move {
            let list = Message::PiList {
                uid,
                after: 0,
                max: 10,
            };
            let answer = transport
                .request(pi1, wire::encode(&list), Duration::from_secs(8))
                .await
                .map_err(|e| e.to_string())?;
            match wire::decode(&answer) {
                Ok(Message::PiIds { ids, .. }) => Ok(ids),
                other => Err(format!("{other:?}")),
            }
        }
    };
    assert_eventually("pi1 leads", Duration::from_secs(40), || async {
        ids_on_pi1(FIRST).await.map(|_| ())
    })
    .await;
    for &uid in &users {
        match ids_on_pi1(uid).await {
            Ok(ids) => assert!(ids.is_empty(), "uid {uid} still has {ids:?}"),
            Err(e) => panic!("reading uid {uid} on pi1: {e}"),
        }
    }
    let swept = pixiu_tests::metric(&c.admin("pi1"), &metric("retention_expired"))
        .await
        .unwrap_or(0.0);
    assert_eq!(
        swept, 0.0,
        "pi1 keeps ids for 7 days: the expiries came through the log"
    );

    // online afterwards: only what was sent after the expiry arrives
    let uid = FIRST + 7;
    let mut dev = c.device("gw0", uid, "phone").await;
    let fresh = publisher.send_user(uid, "fresh", 1, None).await.unwrap();
    let got = collect_inbox(&mut dev, 1, Duration::from_secs(10)).await;
    assert_eq!(got, vec![(fresh, "fresh".to_string())], "{}", c.logs());
}

/// A Pi doubling while one device of a user is ahead of the other (it acknowledged messages
/// that the other, offline, has not had): the new partition copies the user's ids and both
/// cursors from its parent's snapshot and must keep every id the device behind has not
/// acknowledged. It once adopted the cursors device by device, so the cursor of the device
/// that sorts first dropped the ids up to it while the other was still unknown there; the
/// device behind then never got them (the checker saw it as an acknowledged message lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_behind_the_others_gets_its_messages_from_the_new_pi_partition() {
    use pixiu_protocol::inbox::device_key;
    let mut c = inbox_cluster("inbox-pi-behind", 1, 1, &["--min-insync", "0"]).await;
    // the device ahead is the one that sorts first in Pi (cursor keys are by device key)
    let (ahead, behind) = match device_key("phone") < device_key("laptop") {
        true => ("phone", "laptop"),
        false => ("laptop", "phone"),
    };
    let uid = 5; // odd: moves to pi partition 1 of 2
    let publisher = c.publisher("proxy0");
    let mut first = c.device("gw0", uid, ahead).await;
    let mut second = c.device("gw0", uid, behind).await;
    // both devices known to Pi: both get m0
    publisher.send_user(uid, "m0", 1, None).await.unwrap();
    assert_eq!(
        collect_inbox(&mut first, 1, Duration::from_secs(10))
            .await
            .len(),
        1
    );
    assert_eq!(
        collect_inbox(&mut second, 1, Duration::from_secs(10))
            .await
            .len(),
        1
    );
    second.close().await;
    let mut sent = Vec::new();
    for k in 1..=5 {
        let body = format!("m{k}");
        sent.push((
            publisher.send_user(uid, &body, 1, None).await.unwrap(),
            body,
        ));
    }
    assert_eq!(
        collect_inbox(&mut first, 5, Duration::from_secs(10)).await,
        sent
    );
    // the parent holds the cursor of the device ahead at the last id (the one behind is at m0)
    let last = sent.last().map(|(id, _)| *id).unwrap();
    let (transport, addr, _inbound) = ask_node(&c, "pi0").await;
    assert_eventually(
        "the device ahead's cursor in pi",
        Duration::from_secs(10),
        || {
            let transport = transport.clone();
            let read = Message::PiRead {
                uid,
                device: device_key(ahead),
                after: Some(u64::MAX),
                max: 1,
            };
            async move {
                let answer = transport
                    .request(addr, wire::encode(&read), Duration::from_secs(5))
                    .await
                    .map_err(|e| e.to_string())?;
                match wire::decode(&answer) {
                    Ok(Message::PiIds { cursor, .. }) if cursor == last => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await;

    // the new partition copies its users from the parent; the flip
    c.spawn_store("pi-p1", "pi", 1, &["--min-insync", "0"]);
    c.wait_healthy("pi-p1").await;
    c.ctl_ok(&["scale-out", "pi", "--timeout", "60"]);
    // the device behind comes back: the new partition serves it everything after m0
    let mut second = c.device("gw0", uid, behind).await;
    let got = collect_inbox(&mut second, 5, Duration::from_secs(15)).await;
    assert_eq!(
        got,
        sent,
        "the device behind, after the doubling\n{}",
        c.logs()
    );
    let reads = metric(
        &c.admin("pi-p1"),
        r#"pixiu_messages_in_total{role="pi",stage="read"}"#,
    )
    .await
    .unwrap_or(0.0);
    assert!(reads > 0.0, "the new partition served the reads");
}
