//! Bad input at every door, while bystanders keep chatting: malformed and refused WebSocket
//! frames, bad tokens, bad publisher HTTP requests, random UDP datagrams at every node's QUIC
//! port and random bytes through an authenticated QUIC connection. Each is refused or dropped
//! and counted; no process dies; the bystanders receive every message published meanwhile,
//! exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use pixiu_client::{Auth, Client, ClientError, Publisher};
use pixiu_protocol::client::ServerFrame;
use pixiu_protocol::ids::{GatewayMsgId, RouteKey};
use pixiu_protocol::wire::{self, GatewayRef, GatewayUpdate, Message, RoomMessage, RouteRow};
use pixiu_tests::{assert_eventually, drain_events, metric, Cluster, SECRET};
use pixiu_transport::{TlsMaterial, Transport, TransportConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The bystanders' room.
const ROOM: u64 = 7;
/// The prober's own room (for the 64 KiB boundary checks).
const PROBE_ROOM: u64 = 9;
const BYSTANDERS: u64 = 4;
const MAX_BODY: usize = 64 * 1024;

fn dropped(stage: &str, reason: &str) -> String {
    format!("pixiu_messages_dropped_total{{stage=\"{stage}\",reason=\"{reason}\"}}")
}

async fn read_metric(admin: &str, q: &str) -> f64 {
    metric(admin, q)
        .await
        .unwrap_or_else(|e| panic!("metric {q} of {admin}: {e}"))
}

/// Waits until `q` on `admin` is at least `want`.
async fn metric_reaches(admin: &str, q: &str, want: f64) {
    let what = format!("{q} on {admin} reaches {want}");
    assert_eventually(&what, Duration::from_secs(10), || {
        let (admin, q) = (admin.to_string(), q.to_string());
        async move {
            let v = metric(&admin, &q).await.map_err(|e| e.to_string())?;
            if v >= want {
                Ok(())
            } else {
                Err(format!("{v}"))
            }
        }
    })
    .await;
}

/// The next event of `c` (bounded wait).
async fn next(c: &mut Client, what: &str) -> ServerFrame {
    tokio::time::timeout(Duration::from_secs(10), c.next_event())
        .await
        .unwrap_or_else(|_| panic!("{what}: no event in 10 s"))
        .unwrap_or_else(|| panic!("{what}: connection closed"))
}

fn assert_error(f: &ServerFrame, want_code: &str, want_cid: Option<&str>, what: &str) {
    match f {
        ServerFrame::Error { code, cid, .. } => {
            assert_eq!(code, want_code, "{what}: {f:?}");
            assert_eq!(cid.as_deref(), want_cid, "{what}: cid not echoed: {f:?}");
        }
        other => panic!("{what}: expected an error frame, got {other:?}"),
    }
}

fn assert_refused<T: std::fmt::Debug>(r: Result<T, ClientError>, want_code: &str, what: &str) {
    match r {
        Err(ClientError::Refused { code, .. }) if code == want_code => {}
        other => panic!("{what}: expected refusal {want_code}, got {other:?}"),
    }
}

fn assert_http(r: (u16, String), status: u16, code: &str, what: &str) {
    let (s, body) = r;
    assert_eq!(s, status, "{what}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("{what}: body {body:?} is not JSON: {e}"));
    assert_eq!(v["error"], code, "{what}: {body}");
    assert!(v["reason"].is_string(), "{what}: no reason: {body}");
}

fn random_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let n = rng.gen_range(0..=max);
    let mut b = vec![0u8; n];
    rng.fill(&mut b[..]);
    b
}

/// Valid frames of every shape, to be truncated.
fn sample_frames() -> Vec<Bytes> {
    let gw = GatewayRef {
        instance: 77,
        addr: "127.0.0.1:9".parse().unwrap(),
    };
    [
        Message::Ping { seq: 123_456 },
        Message::Subscribe {
            seq: 9,
            broker_partition: 0,
            broker_partition_num: 1,
        },
        Message::Gateway(GatewayUpdate {
            id: GatewayMsgId::new(77, 5),
            gateway: gw,
            key: RouteKey::room(ROOM),
            present: true,
            forwarded: false,
        }),
        Message::Room(RoomMessage {
            id: 987_654_321,
            key: RouteKey::room(ROOM),
            from: 1,
            body: "a truncated room message must never be delivered".into(),
            ts: 1_700_000_000_000,
        }),
        Message::Publish(RoomMessage {
            id: 987_654_322,
            key: RouteKey::room(ROOM),
            from: 1,
            body: "a truncated publish must never be delivered".into(),
            ts: 1_700_000_000_000,
        }),
        Message::Snapshot {
            rows: vec![RouteRow {
                key: RouteKey::room(ROOM),
                gateway: gw,
                version: GatewayMsgId::new(77, 6),
                present: true,
            }],
        },
    ]
    .iter()
    .map(wire::encode)
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_refused_counted_and_harmless() {
    let mut c = Cluster::start("bad-input", 1, 1).await;
    c.spawn_router("router", 0);
    c.spawn_broker("broker", 0);
    c.spawn_gateway("gw-a", &[]);
    c.spawn_gateway("gw-b", &[]);
    c.spawn_proxy("proxy", &[]);
    c.wait_all_healthy().await;
    let (gw_a, gw_b, proxy) = (c.admin("gw-a"), c.admin("gw-b"), c.admin("proxy"));

    // A token that expires now: accepted at first (within the 5 s leeway), refused at the end.
    let expiring = pixiu_protocol::auth::issue(SECRET.as_bytes(), 500, Some("test"), false, 0);
    Client::connect(&c.url("gw-b"), &Auth::Token(expiring.clone()))
        .await
        .expect("a fresh token is accepted")
        .close()
        .await;

    // Bystanders in ROOM on both gateways, and a publisher that keeps publishing to them.
    let mut bystanders = Vec::new();
    for uid in 1..=BYSTANDERS {
        let gw = if uid % 2 == 0 { "gw-a" } else { "gw-b" };
        let b = c.client(gw, uid).await;
        b.join(ROOM)
            .await
            .unwrap_or_else(|e| panic!("bystander {uid} join: {e}\n{}", c.logs()));
        bystanders.push((uid, b));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let background = {
        let p = c.publisher("proxy");
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut k = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let id = p
                    .publish_room(ROOM, &format!("bg:{k}"), 4242, None)
                    .await
                    .unwrap_or_else(|e| panic!("background publish {k}: {e}"));
                ids.push(id);
                k += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            ids
        })
    };

    let mut prober = websocket_frames(&c, &gw_a).await;
    bad_tokens(&c, &gw_b).await;
    publisher_http(&c, &proxy, &mut prober).await;
    junk_at_node_ports(&c).await;
    expired_token_is_refused(&c, &expiring).await;

    // ---- nothing crashed; the bystanders got everything exactly once -----------------------
    stop.store(true, Ordering::Relaxed);
    let ids = background.await.expect("background publisher");
    assert!(ids.len() >= 50, "only {} background messages", ids.len());
    eprintln!(
        "{} background messages, each to {BYSTANDERS} bystanders",
        ids.len()
    );
    let want: HashSet<u64> = ids.iter().copied().collect();
    assert_eq!(want.len(), ids.len(), "ids are unique");
    for (uid, b) in bystanders.iter_mut() {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while got.len() < want.len() && tokio::time::Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(5), b.next_event()).await {
                Ok(Some(ev)) => got.push(ev),
                _ => break,
            }
        }
        got.extend(drain_events(b, Duration::from_millis(300)).await);
        let mut seen = HashSet::new();
        for ev in &got {
            let ServerFrame::Room { room, id, body, .. } = ev else {
                panic!("bystander {uid}: unexpected frame {ev:?}");
            };
            assert_eq!(room.0, ROOM, "bystander {uid}: {ev:?}");
            assert!(
                body.starts_with("bg:"),
                "bystander {uid}: foreign message {ev:?}"
            );
            assert!(seen.insert(id.0), "bystander {uid}: id {} twice", id.0);
            assert!(want.contains(&id.0), "bystander {uid}: unknown id {}", id.0);
        }
        assert_eq!(
            seen.len(),
            want.len(),
            "bystander {uid}: got {} of {} messages\n{}",
            seen.len(),
            want.len(),
            c.logs()
        );
    }
    assert!(drain_events(&mut prober, Duration::from_millis(200))
        .await
        .is_empty());
    prober
        .ping()
        .await
        .expect("the prober's connection still works");

    for name in ["router", "broker", "gw-a", "gw-b", "proxy"] {
        assert!(
            c.node(name).proc.is_running(),
            "{name} died\n--- log ---\n{}",
            c.node(name).proc.log()
        );
        c.wait_healthy(name).await;
    }
}

/// Junk WebSocket frames, bad ids, oversized bodies, unjoined publishes and bad inbox ops on
/// one connection of `gw-a`: each refused with its code, counted, and the connection still
/// usable. Returns that connection (the prober), which is in `PROBE_ROOM`.
async fn websocket_frames(c: &Cluster, gw_a: &str) -> Client {
    let mut prober = c.client("gw-a", 100).await;
    prober.join(PROBE_ROOM).await.expect("prober join");
    let bad_request = dropped("frame", "bad_request");
    let base_bad = read_metric(gw_a, &bad_request).await;
    let base_large = read_metric(gw_a, &dropped("frame", "too_large")).await;
    let base_nj = read_metric(gw_a, &dropped("publish", "not_joined")).await;

    for (i, junk) in ["{not json", "", "[1,2,3]", "\"op\"", "{\"op\":42}", "null"]
        .iter()
        .enumerate()
    {
        prober.send_raw(junk).await.unwrap();
        let f = next(&mut prober, &format!("junk frame {junk:?}")).await;
        assert_error(&f, "bad_request", None, &format!("junk frame {junk:?}"));
        // the connection stays usable
        prober
            .ping()
            .await
            .unwrap_or_else(|e| panic!("ping after junk {i}: {e}"));
    }
    prober
        .send_raw(r#"{"op":"frobnicate","room":"7","cid":"u1"}"#)
        .await
        .unwrap();
    assert_error(
        &next(&mut prober, "unknown op").await,
        "bad_request",
        Some("u1"),
        "unknown op",
    );
    prober
        .send_raw(r#"{"op":"join","room":"seven","cid":"u2"}"#)
        .await
        .unwrap();
    assert_error(
        &next(&mut prober, "bad room id").await,
        "bad_request",
        Some("u2"),
        "bad room id",
    );
    prober.ping().await.expect("ping after unknown op");

    // bodies: 64 KiB is fine, one byte more is too large
    let big = "x".repeat(MAX_BODY + 1);
    assert_refused(
        prober.publish(PROBE_ROOM, &big).await,
        "too_large",
        "65537-byte publish",
    );
    prober
        .publish(PROBE_ROOM, &big[..MAX_BODY])
        .await
        .expect("a 65536-byte body is accepted");
    // ... and comes back to its publisher, who is in that room
    match next(&mut prober, "own 64 KiB message").await {
        ServerFrame::Room { room, body, .. } => {
            assert_eq!(room.0, PROBE_ROOM);
            assert_eq!(body.len(), MAX_BODY);
        }
        other => panic!("expected the 64 KiB room message, got {other:?}"),
    }
    prober.ping().await.expect("ping after too_large");

    assert_refused(
        prober.publish(ROOM + 1000, "hi").await,
        "not_joined",
        "publish to an unjoined room",
    );
    // inbox ops with bad arguments (the inbox path itself: tests/tests/inbox.rs)
    for (i, junk) in [
        r#"{"op":"send","to":"x","body":"hi","cid":"s1"}"#,
        r#"{"op":"send","body":"hi","cid":"s1"}"#,
        r#"{"op":"sync","after":"-1","cid":"s1"}"#,
        r#"{"op":"ack","id":"abc"}"#,
    ]
    .iter()
    .enumerate()
    {
        prober.send_raw(junk).await.unwrap();
        let f = next(&mut prober, &format!("inbox junk {i}")).await;
        assert!(
            matches!(&f, ServerFrame::Error { code, .. } if code == "bad_request"),
            "inbox junk {junk:?}: {f:?}"
        );
    }
    prober.ping().await.expect("ping after inbox ops");
    // The SDK sends text frames only: binary frames are not tested here.

    assert!(
        read_metric(gw_a, &bad_request).await >= base_bad + 8.0,
        "bad_request counted"
    );
    assert!(
        read_metric(gw_a, &dropped("frame", "too_large")).await > base_large,
        "too_large counted"
    );
    assert!(
        read_metric(gw_a, &dropped("publish", "not_joined")).await > base_nj,
        "not_joined counted"
    );
    prober
}

/// Bad tokens at connect: 401, counted.
async fn bad_tokens(c: &Cluster, gw_b: &str) {
    let unauthorized = dropped("connect", "unauthorized");
    let base_unauth = read_metric(gw_b, &unauthorized).await;
    let other_secret =
        pixiu_protocol::auth::issue(b"some-other-secret-0123456789", 1, Some("x"), false, 3600);
    let bad_tokens = [
        ("garbage", "not.a.jwt".to_string()),
        ("empty", String::new()),
        ("other secret", other_secret),
        (
            "bad device",
            pixiu_protocol::auth::issue(SECRET.as_bytes(), 1, Some("bad device!"), false, 3600),
        ),
    ];
    for (what, token) in &bad_tokens {
        match Client::connect(&c.url("gw-b"), &Auth::Token(token.clone())).await {
            Err(ClientError::Unauthorized) => {}
            Err(e) => panic!("{what} token: expected 401, got {e}"),
            Ok(_) => panic!("{what} token: accepted"),
        }
    }
    // no token at all (and no --insecure-dev-auth)
    match Client::connect(
        &c.url("gw-b"),
        &Auth::InsecureDev {
            uid: 1,
            device: "d".into(),
        },
    )
    .await
    {
        Err(ClientError::Unauthorized) => {}
        other => panic!("no token: expected 401, got {:?}", other.map(|_| ())),
    }
    assert!(
        read_metric(gw_b, &unauthorized).await >= base_unauth + bad_tokens.len() as f64 + 1.0,
        "unauthorized connects counted"
    );
}

/// Bad publisher HTTP requests: 400, 413 or 401 with a code, counted; only the accepted 64 KiB
/// message reaches the prober.
async fn publisher_http(c: &Cluster, proxy: &str, prober: &mut Client) {
    let purl = c.url("proxy");
    let p = c.publisher("proxy");
    let path = format!("/v1/rooms/{ROOM}/messages");
    let json = "application/json";
    let base_http_bad = read_metric(proxy, &dropped("http", "bad_request")).await;
    let base_http_large = read_metric(proxy, &dropped("http", "too_large")).await;
    let base_http_unauth = read_metric(proxy, &dropped("http", "unauthorized")).await;

    assert_http(
        p.raw_post(&path, b"{\"body\": oops".to_vec(), json)
            .await
            .unwrap(),
        400,
        "bad_request",
        "malformed JSON",
    );
    assert_http(
        p.raw_post(&path, b"[1,2]".to_vec(), json).await.unwrap(),
        400,
        "bad_request",
        "JSON not an object",
    );
    assert_http(
        p.raw_post(&path, br#"{"from":"1"}"#.to_vec(), json)
            .await
            .unwrap(),
        400,
        "bad_request",
        "no body field",
    );
    let valid = br#"{"body":"never delivered","from":"1"}"#.to_vec();
    assert_http(
        p.raw_post("/v1/rooms/seven/messages", valid.clone(), json)
            .await
            .unwrap(),
        400,
        "bad_request",
        "room id not a number",
    );
    assert_http(
        p.raw_post("/v1/rooms/-1/messages", valid.clone(), json)
            .await
            .unwrap(),
        400,
        "bad_request",
        "negative room id",
    );
    let over = serde_json::json!({"body": "y".repeat(MAX_BODY + 1), "from": "1"}).to_string();
    assert_http(
        p.raw_post(&path, over.into_bytes(), json).await.unwrap(),
        413,
        "too_large",
        "65537-byte body",
    );
    let huge = serde_json::json!({"body": "y".repeat(4 * MAX_BODY), "from": "1"}).to_string();
    assert_http(
        p.raw_post(&path, huge.into_bytes(), json).await.unwrap(),
        413,
        "too_large",
        "256 KiB request",
    );
    let (s, body) = p
        .raw_post(
            &format!("/v1/rooms/{PROBE_ROOM}/messages"),
            serde_json::json!({"body": "z".repeat(MAX_BODY), "from": "1"})
                .to_string()
                .into_bytes(),
            json,
        )
        .await
        .unwrap();
    assert_eq!(s, 202, "a 65536-byte body is accepted: {body}");
    let none = Publisher::new(&purl, None);
    assert_http(
        none.raw_post(&path, valid.clone(), json).await.unwrap(),
        401,
        "unauthorized",
        "no token",
    );
    let as_client = Publisher::new(&purl, Some(c.client_token(1, "test")));
    assert_http(
        as_client
            .raw_post(&path, valid.clone(), json)
            .await
            .unwrap(),
        401,
        "unauthorized",
        "client token",
    );
    let garbage = Publisher::new(&purl, Some("garbage".into()));
    assert_http(
        garbage.raw_post(&path, valid.clone(), json).await.unwrap(),
        401,
        "unauthorized",
        "garbage token",
    );
    let foreign = Publisher::new(
        &purl,
        Some(pixiu_protocol::auth::issue(
            b"some-other-secret-0123456789",
            0,
            None,
            true,
            3600,
        )),
    );
    assert_http(
        foreign.raw_post(&path, valid.clone(), json).await.unwrap(),
        401,
        "unauthorized",
        "other secret",
    );
    assert!(matches!(
        none.publish_room(ROOM, "x", 1, None).await,
        Err(ClientError::Unauthorized)
    ));
    // the proxy remembers good publisher tokens; one it accepted is refused once it expires
    let empty_room = "/v1/rooms/12345/messages";
    let expiring = Publisher::new(
        &purl,
        Some(pixiu_protocol::auth::issue(
            SECRET.as_bytes(),
            0,
            None,
            true,
            1,
        )),
    );
    let (s, body) = expiring
        .raw_post(empty_room, valid.clone(), json)
        .await
        .unwrap();
    assert_eq!(s, 202, "a publisher token before it expires: {body}");
    assert_eventually(
        "a remembered publisher token is refused after it expired",
        Duration::from_secs(20),
        || {
            let (expiring, valid) = (&expiring, valid.clone());
            async move {
                match expiring.raw_post(empty_room, valid, json).await {
                    Ok((401, body)) if body.contains("unauthorized") => Ok(()),
                    Ok((s, body)) => Err(format!("expected 401, got {s} {body}")),
                    Err(e) => Err(format!("{e}")),
                }
            }
        },
    )
    .await;

    assert!(read_metric(proxy, &dropped("http", "bad_request")).await >= base_http_bad + 5.0);
    assert!(read_metric(proxy, &dropped("http", "too_large")).await >= base_http_large + 2.0);
    assert!(read_metric(proxy, &dropped("http", "unauthorized")).await >= base_http_unauth + 5.0);
    // the prober got the accepted 64 KiB HTTP message, nothing else
    match next(prober, "64 KiB HTTP message").await {
        ServerFrame::Room { room, body, .. } => {
            assert_eq!(room.0, PROBE_ROOM);
            assert_eq!(body.len(), MAX_BODY);
        }
        other => panic!("expected the 64 KiB HTTP message, got {other:?}"),
    }
}

/// Random UDP datagrams, then random and truncated frames over an authenticated QUIC
/// connection, at every node's node-to-node port: dropped and counted.
async fn junk_at_node_ports(c: &Cluster) {
    let seed: u64 = rand::random();
    eprintln!("random seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let status = c.status();
    let mut targets: Vec<(String, String, SocketAddr)> = Vec::new(); // (name, admin, addr)
    for n in status["nodes"].as_array().expect("status nodes") {
        let admin = n["admin"].as_str().unwrap_or_default();
        let name = c
            .nodes
            .iter()
            .find(|(_, node)| node.admin == admin)
            .map(|(name, _)| name.clone())
            .unwrap_or_else(|| panic!("status row {n} is none of our nodes"));
        let addr: SocketAddr = n["addr"]
            .as_str()
            .expect("addr")
            .parse()
            .expect("addr parses");
        targets.push((name, admin.to_string(), addr));
    }
    assert_eq!(targets.len(), 5, "every node is registered: {status}");

    // (a) plain UDP datagrams, no QUIC at all
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for (_, _, addr) in &targets {
        for i in 0..300 {
            let mut d = random_bytes(&mut rng, 1400);
            if i % 3 == 0 && !d.is_empty() {
                // look like a QUIC long-header (Initial) packet to get further into the parser
                d[0] = 0xC0 | (d[0] & 0x0F);
                if d.len() > 5 {
                    d[1..5].copy_from_slice(&1u32.to_be_bytes());
                }
            }
            udp.send_to(&d, addr).unwrap();
        }
    }

    // (b) random bytes and truncated frames through an authenticated QUIC connection
    let bad_frame = dropped("decode", "bad_frame");
    let mut base_bad_frame = HashMap::new();
    for (name, admin, _) in &targets {
        base_bad_frame.insert(name.clone(), read_metric(admin, &bad_frame).await);
    }
    let tls = TlsMaterial::load(&c.tls_dir).expect("loading the cluster TLS material");
    let (transport, _inbound) =
        Transport::bind(TransportConfig::new("127.0.0.1:0".parse().unwrap(), tls))
            .await
            .expect("binding a test transport");
    let samples = sample_frames();
    let mut sent: HashMap<String, u32> = HashMap::new();
    for (name, _, addr) in &targets {
        for i in 0..200 {
            let mut b = random_bytes(&mut rng, if i % 10 == 0 { 4000 } else { 300 });
            if i % 4 == 1 && b.len() >= 2 {
                // past the header check, into the postcard decoder
                b[0] = wire::MAGIC;
                b[1] = wire::VERSION;
            }
            if i % 4 == 2 {
                let s = &samples[rng.gen_range(0..samples.len())];
                b = s[..rng.gen_range(0..s.len())].to_vec();
            }
            // only frames the codec refuses: a lucky random valid message is not bad input
            if wire::decode(&b).is_ok() {
                continue;
            }
            if transport.send(*addr, Bytes::from(b)) {
                *sent.entry(name.clone()).or_default() += 1;
            }
            if i % 50 == 49 {
                // let the per-peer queue drain
                tokio::task::yield_now().await;
            }
        }
    }
    eprintln!("bad frames sent: {sent:?}");
    for (name, admin, _) in &targets {
        // datagrams are best effort: most, not necessarily all, arrive
        let want =
            base_bad_frame[name] + (f64::from(sent.get(name).copied().unwrap_or(0)) / 2.0).max(1.0);
        metric_reaches(admin, &bad_frame, want).await;
        let got = read_metric(admin, &bad_frame).await - base_bad_frame[name];
        eprintln!(
            "{name}: {got} of {} bad frames counted",
            sent.get(name).copied().unwrap_or(0)
        );
    }
    transport.close().await;
}

/// A token that expired is refused once the leeway has passed.
async fn expired_token_is_refused(c: &Cluster, expiring: &str) {
    assert_eventually(
        "the expired token is refused",
        Duration::from_secs(15),
        || {
            let (url, token) = (c.url("gw-b"), expiring.to_string());
            async move {
                match Client::connect(&url, &Auth::Token(token)).await {
                    Err(ClientError::Unauthorized) => Ok(()),
                    Err(e) => Err(format!("expected 401, got {e}")),
                    Ok(client) => {
                        drop(client);
                        Err("still accepted".into())
                    }
                }
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_too_fast_is_rate_limited_per_connection() {
    let mut c = Cluster::start("ratelimit", 1, 1).await;
    c.spawn_router("router", 0);
    c.spawn_broker("broker", 0);
    c.spawn_gateway("gw", &["--publish-rate", "5"]);
    c.spawn_proxy("proxy", &[]);
    c.wait_all_healthy().await;
    let spammer = c.client("gw", 1).await;
    let mut other = c.client("gw", 2).await;
    spammer.join(3).await.unwrap();
    other.join(3).await.unwrap();
    // healthy is not yet seen: wait until the gateway knows a running proxy (a publish of
    // a third connection, to a room of its own, goes through)
    let warm = c.client("gw", 4).await;
    warm.join(9).await.unwrap();
    assert_eventually(
        "the gateway sees the proxy",
        Duration::from_secs(10),
        || {
            let warm = &warm;
            async move {
                warm.publish(9, "warm")
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
        },
    )
    .await;
    // burst of 10 (twice the rate), then refused
    let mut accepted = 0;
    let mut limited = 0;
    for i in 0..30 {
        match spammer.publish(3, &format!("spam {i}")).await {
            Ok(_) => accepted += 1,
            Err(ClientError::Refused { code, .. }) if code == "rate_limited" => limited += 1,
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert!((10..=12).contains(&accepted), "accepted {accepted}");
    assert_eq!(accepted + limited, 30);
    metric_reaches(
        &c.admin("gw"),
        "pixiu_messages_dropped_total{stage=\"publish\",reason=\"rate_limited\"}",
        limited as f64,
    )
    .await;
    // only the accepted ones reached the room; the other connection is not limited
    let got = drain_events(&mut other, Duration::from_millis(800)).await;
    assert_eq!(got.len(), accepted, "{got:?}");
    other.publish(3, "not limited").await.unwrap();
    // and the spammer gets tokens back over time
    assert_eventually(
        "the spammer may publish again",
        Duration::from_secs(5),
        || {
            let s = &spammer;
            async move {
                s.publish(3, "later")
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        },
    )
    .await;
}
