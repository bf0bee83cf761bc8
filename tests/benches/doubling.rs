//! Benchmark (not a test): what a doubling costs while the cluster is under load.
//!
//! Starts ZooKeeper and real processes from the release build: one partition of router and
//! broker, one partition of Xiu and of Pi with 2 replicas each (`min_insync` 1, fsync on),
//! 2 gateways, a proxy. Steady load: room publishes at 200 msg/s to 16 rooms whose two
//! members sit on different gateways, and personal sends at 100 msg/s to 64 online devices
//! that acknowledge everything. Then, one role after the other (router, broker, Xiu, Pi), it
//! starts the new partition's replicas and runs `pixiu-ctl scale-out ROLE` (1 -> 2), and
//! reports per role: the time from `scale-out` to done, and the publish-to-delivery latency
//! (p50 / p99 / max) of room and inbox messages sent during the doubling (from the start of
//! `scale-out` to 2 s after it finished) against those sent in the 5 s before the new
//! partition was started, with the sends that failed. Then, with no flip, one more replica of
//! each role (and one more gateway and proxy): the time from its start until it serves.
//!
//! Run: `cargo build --release --workspace --bins && cargo bench -p pixiu-tests --bench doubling`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pixiu_protocol::client::ServerFrame;
use pixiu_tests::Cluster;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ROOMS: u64 = 16;
const RECEIVERS: u64 = 64;
const ROOM_RATE: u64 = 200;
const INBOX_RATE: u64 = 100;
const BEFORE: Duration = Duration::from_secs(5);
const AFTER: Duration = Duration::from_secs(2);
const SETTLE: Duration = Duration::from_secs(5);

/// (sent at, µs since start; delivery latency)
type Samples = Arc<Mutex<Vec<(u64, Duration)>>>;

struct Load {
    room: Samples,
    inbox: Samples,
    /// send times (µs since start) of sends that failed
    failed: Arc<Mutex<Vec<(&'static str, u64)>>>,
    stop: Arc<AtomicBool>,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn stamp(start: Instant) -> u64 {
    start.elapsed().as_micros() as u64
}

/// One receiving client: records the latency of every stamped frame, acks inbox frames.
fn receive(mut client: pixiu_client::Client, start: Instant, load: &Load) {
    let (room, inbox, stop) = (load.room.clone(), load.inbox.clone(), load.stop.clone());
    tokio::spawn(async move {
        while !stop.load(Ordering::SeqCst) {
            let ev = match tokio::time::timeout(Duration::from_secs(1), client.next_event()).await {
                Ok(Some(ev)) => ev,
                Ok(None) => return,
                Err(_) => continue,
            };
            let (samples, body) = match &ev {
                ServerFrame::Room { body, .. } => (&room, body),
                ServerFrame::Inbox { id, body, .. } => {
                    let _ = client.ack(id.0).await;
                    (&inbox, body)
                }
                _ => continue,
            };
            if let Some(sent) = body.strip_prefix("t:").and_then(|v| v.parse::<u64>().ok()) {
                let latency = Duration::from_micros(stamp(start).saturating_sub(sent));
                samples.lock().unwrap().push((sent, latency));
            }
        }
    });
}

/// Room publishes and personal sends at their steady rates until `stop`.
fn generate(c: &Cluster, start: Instant, load: &Load) {
    let sids = Arc::new(AtomicU64::new(1));
    for (kind, rate) in [("room", ROOM_RATE), ("inbox", INBOX_RATE)] {
        let publisher = Arc::new(c.publisher("proxy0"));
        let (failed, stop, sids) = (load.failed.clone(), load.stop.clone(), sids.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                i += 1;
                let (publisher, failed) = (publisher.clone(), failed.clone());
                let sid = sids.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let sent = stamp(start);
                    let body = format!("t:{sent}");
                    let ok = match kind {
                        "room" => publisher
                            .publish_room(1 + i % ROOMS, &body, 1, None)
                            .await
                            .is_ok(),
                        _ => publisher
                            .send_user(1 + i % RECEIVERS, &body, 1, Some(sid))
                            .await
                            .is_ok(),
                    };
                    if !ok {
                        failed.lock().unwrap().push((kind, sent));
                    }
                });
            }
        });
    }
}

fn spawn_partition(c: &mut Cluster, role: &str, partition: u32) -> Vec<String> {
    match role {
        "router" => {
            c.spawn_router("router1", partition);
            vec!["router1".into()]
        }
        "broker" => {
            c.spawn_broker("broker1", partition);
            vec!["broker1".into()]
        }
        store => {
            let store: &'static str = if store == "xiu" { "xiu" } else { "pi" };
            (0..2)
                .map(|r| {
                    let name = format!("{store}-p{partition}-{r}");
                    c.spawn_store(&name, store, partition, &["--min-insync", "1"]);
                    name
                })
                .collect()
        }
    }
}

/// `kind` samples sent within `[from, to)` µs: count, p50, p99, max (ms).
fn summary(samples: &Samples, from: u64, to: u64) -> String {
    let mut l: Vec<Duration> = samples
        .lock()
        .unwrap()
        .iter()
        .filter(|(sent, _)| (from..to).contains(sent))
        .map(|(_, l)| *l)
        .collect();
    l.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "{:>5} msgs p50 {:>6.1} p99 {:>7.1} max {:>7.1}",
        l.len(),
        ms(percentile(&l, 0.5)),
        ms(percentile(&l, 0.99)),
        ms(l.last().copied().unwrap_or_default())
    )
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut c = Cluster::start("bench-doubling", 1, 1).await;
    for i in 0..2 {
        c.spawn_store(&format!("xiu{i}"), "xiu", 0, &["--min-insync", "1"]);
        c.spawn_store(&format!("pi{i}"), "pi", 0, &["--min-insync", "1"]);
    }
    c.spawn_router("router0", 0);
    c.spawn_broker("broker0", 0);
    c.spawn_gateway("gw0", &[]);
    c.spawn_gateway("gw1", &[]);
    c.spawn_proxy("proxy0", &[]);
    c.wait_all_healthy().await;

    let start = Instant::now();
    let load = Load {
        room: Default::default(),
        inbox: Default::default(),
        failed: Default::default(),
        stop: Arc::new(AtomicBool::new(false)),
    };
    for room in 1..=ROOMS {
        for (k, gw) in ["gw0", "gw1"].into_iter().enumerate() {
            let client = c.client(gw, 10_000 * (k as u64 + 1) + room).await;
            client.join(room).await.unwrap();
            receive(client, start, &load);
        }
    }
    for uid in 1..=RECEIVERS {
        let gw = if uid % 2 == 0 { "gw0" } else { "gw1" };
        receive(c.device(gw, uid, "bench").await, start, &load);
    }
    generate(&c, start, &load);
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut rows = Vec::new();
    for role in ["router", "broker", "xiu", "pi"] {
        // the previous doubling's aftermath (moved devices, drops) stays out of this one's
        tokio::time::sleep(SETTLE).await;
        let before = stamp(start);
        tokio::time::sleep(BEFORE).await;
        let names = spawn_partition(&mut c, role, 1);
        for name in &names {
            c.wait_healthy(name).await;
        }
        let t0 = Instant::now();
        let from = stamp(start);
        let out = tokio::task::block_in_place(|| c.ctl(&["scale-out", role, "--timeout", "120"]));
        let took = t0.elapsed();
        // the doubling's aftermath counts too (drops, regrouped sends)
        tokio::time::sleep(AFTER).await;
        let to = stamp(start);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let quiet_end = before + BEFORE.as_micros() as u64;
        rows.push((role, took, (before, quiet_end), (from, to)));
    }
    // replica scale-out (no flip): one more replica of partition 0 of each role, and one more
    // gateway and proxy; the time from start to serving (`/healthz` ready: registered, loaded
    // or caught up, running)
    let mut replicas = Vec::new();
    for role in ["router", "broker", "xiu", "pi", "gateway", "proxy"] {
        let name = format!("{role}-extra");
        let t0 = Instant::now();
        match role {
            "router" => c.spawn_router(&name, 0),
            "broker" => c.spawn_broker(&name, 0),
            "xiu" => c.spawn_store(&name, "xiu", 0, &["--min-insync", "1"]),
            "pi" => c.spawn_store(&name, "pi", 0, &["--min-insync", "1"]),
            "gateway" => c.spawn_gateway(&name, &[]),
            _ => c.spawn_proxy(&name, &[]),
        }
        c.wait_healthy(&name).await;
        replicas.push((role, t0.elapsed()));
    }
    load.stop.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;

    println!(
        "doubling 1 -> 2 under {ROOM_RATE} room msg/s (2 members each) and {INBOX_RATE} inbox msg/s; latency in ms, publish to delivery"
    );
    let failed = load.failed.lock().unwrap().clone();
    for (role, took, (b0, b1), (d0, d1)) in rows {
        let fails = |w0: u64, w1: u64| {
            failed
                .iter()
                .filter(|(_, sent)| (w0..w1).contains(sent))
                .count()
        };
        println!("{role}: scale-out took {:.2} s", took.as_secs_f64());
        println!(
            "  room  before {} | during {}",
            summary(&load.room, b0, b1),
            summary(&load.room, d0, d1)
        );
        println!(
            "  inbox before {} | during {}",
            summary(&load.inbox, b0, b1),
            summary(&load.inbox, d0, d1)
        );
        println!(
            "  failed sends before {} | during {}",
            fails(b0, b1),
            fails(d0, d1)
        );
    }
    println!("another replica, under the same load, from start to serving:");
    for (role, took) in replicas {
        println!("  {role}: {:.2} s", took.as_secs_f64());
    }
}
