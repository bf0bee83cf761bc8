//! Benchmark (not a test): fan-out of one room with 1,000 members.
//!
//! Starts `pixiu-ctl standalone` (every role in one process, talking QUIC over loopback) from
//! the release build, connects 1,000 WebSocket clients to its gateway, joins them all to one
//! room and publishes over the HTTP API. Reports:
//! - throughput: messages published as fast as 8 concurrent publishers can, and deliveries per
//!   second to the 1,000 members (deliveries = messages x members);
//! - latency: at a steady publish rate, publish-to-delivery time p50/p99/max over every delivery;
//! - memory: the standalone process's resident memory per connected client.
//!
//! Run: `cargo build --release --workspace --bins && cargo bench -p pixiu-tests --bench room_fanout`
//! Knobs (env): PIXIU_BENCH_MEMBERS (1000), PIXIU_BENCH_BURST (2000), PIXIU_BENCH_RATE (200/s),
//! PIXIU_BENCH_STEADY_SECS (10).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pixiu_client::{Auth, Client, Publisher};
use pixiu_protocol::client::ServerFrame;
use pixiu_testkit::{bin_path, free_tcp_port, wait_healthy, Proc, TestDir};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Every member records, per message, the delay since the publish instant written in its body,
/// separately for the burst (`b:`) and the steady phase (`s:`).
struct Collector {
    start: Instant,
    burst: Mutex<Vec<Duration>>,
    steady: Mutex<Vec<Duration>>,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let members = env_or("PIXIU_BENCH_MEMBERS", 1000);
    let burst = env_or("PIXIU_BENCH_BURST", 2000);
    let rate = env_or("PIXIU_BENCH_RATE", 200);
    let steady_secs = env_or("PIXIU_BENCH_STEADY_SECS", 10);
    let room = 42u64;

    let dir = TestDir::new("bench");
    let (ws, http, admin) = (free_tcp_port(), free_tcp_port(), free_tcp_port());
    let args: Vec<String> = [
        "standalone",
        "--insecure-dev-auth",
        "--client-listen",
        &format!("127.0.0.1:{ws}"),
        "--http",
        &format!("127.0.0.1:{http}"),
        "--admin",
        &format!("127.0.0.1:{admin}"),
        "--data-dir",
        dir.sub("data").to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let server = Proc::spawn(
        "standalone",
        &bin_path("pixiu-ctl"),
        &args,
        &[("RUST_LOG".into(), "warn".into())],
        dir.path(),
    )
    .expect("starting pixiu-ctl standalone");
    wait_healthy(&format!("127.0.0.1:{admin}"), Duration::from_secs(30))
        .await
        .expect("standalone healthy");
    let rss_before = rss_kib(server.pid());

    let url = format!("ws://127.0.0.1:{ws}/v1/ws");
    let t = Instant::now();
    let mut clients = Vec::new();
    for chunk in (1..=members).collect::<Vec<_>>().chunks(100) {
        let joined = futures::future::join_all(chunk.iter().map(|uid| {
            let url = url.clone();
            async move {
                let c = Client::connect(
                    &url,
                    &Auth::InsecureDev {
                        uid: *uid,
                        device: "bench".into(),
                    },
                )
                .await
                .unwrap();
                c.join(room).await.unwrap();
                c
            }
        }))
        .await;
        clients.extend(joined);
    }
    let join_time = t.elapsed();
    let rss_after = rss_kib(server.pid());
    println!(
        "{members} members connected and joined in {:.2} s; standalone RSS {} MiB -> {} MiB ({:.1} KiB per connection, all roles in one process)",
        join_time.as_secs_f64(),
        rss_before / 1024,
        rss_after / 1024,
        (rss_after.saturating_sub(rss_before)) as f64 / members as f64
    );

    let collector = Arc::new(Collector {
        start: Instant::now(),
        burst: Mutex::new(Vec::new()),
        steady: Mutex::new(Vec::new()),
    });
    let mut readers = Vec::new();
    for mut c in clients {
        let col = collector.clone();
        readers.push(tokio::spawn(async move {
            let (mut burst, mut steady) = (Vec::new(), Vec::new());
            while let Ok(Some(ev)) =
                tokio::time::timeout(Duration::from_secs(10), c.next_event()).await
            {
                let ServerFrame::Room { body, .. } = ev else {
                    continue;
                };
                let now = Instant::now();
                let (kind, sent_ns) = body.split_once(':').unwrap_or(("", ""));
                let Ok(sent_ns) = sent_ns.parse::<u64>() else {
                    continue;
                };
                let delay =
                    now.saturating_duration_since(col.start + Duration::from_nanos(sent_ns));
                match kind {
                    "b" => burst.push(delay),
                    "s" => steady.push(delay),
                    _ => break,
                }
            }
            col.burst.lock().await.extend(burst);
            col.steady.lock().await.extend(steady);
            c
        }));
    }
    let publisher = Arc::new(Publisher::new(&format!("http://127.0.0.1:{http}"), None));

    // phase 1: burst, 8 concurrent publishers as fast as they can
    let t0 = Instant::now();
    let per = burst / 8;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let p = publisher.clone();
            let col = collector.clone();
            tokio::spawn(async move {
                for _ in 0..per {
                    let sent = col.start.elapsed().as_nanos() as u64;
                    p.publish_room(room, &format!("b:{sent}"), 0, None)
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let publish_time = t0.elapsed();
    // wait for the burst's deliveries: the gateway counts what it handed to the members
    let want = per * 8 * members;
    let admin_addr = format!("127.0.0.1:{admin}");
    let delivered_now = || async {
        pixiu_testkit::metric(&admin_addr, "pixiu_messages_out_total{stage=\"deliver\"}")
            .await
            .unwrap_or(0.0) as u64
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while delivered_now().await < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let burst_time = t0.elapsed();
    let delivered = delivered_now().await;
    println!(
        "burst: {} messages published in {:.2} s ({:.0} msg/s accepted by the proxy); {delivered} of {want} deliveries done in {:.2} s = {:.0} deliveries/s",
        per * 8,
        publish_time.as_secs_f64(),
        (per * 8) as f64 / publish_time.as_secs_f64(),
        burst_time.as_secs_f64(),
        delivered as f64 / burst_time.as_secs_f64()
    );

    // phase 2: steady rate, latency
    let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let steady_n = rate * steady_secs;
    let mut tick = tokio::time::interval(interval);
    let steady_start_ns = collector.start.elapsed().as_nanos() as u64;
    for _ in 0..steady_n {
        tick.tick().await;
        let sent = collector.start.elapsed().as_nanos() as u64;
        let p = publisher.clone();
        tokio::spawn(async move {
            let _ = p.publish_room(room, &format!("s:{sent}"), 0, None).await;
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    publisher
        .publish_room(
            room,
            &format!("end:{}", collector.start.elapsed().as_nanos()),
            0,
            None,
        )
        .await
        .unwrap();
    for r in readers {
        let _ = r.await;
    }
    let _ = steady_start_ns;
    for (name, v) in [("burst", &collector.burst), ("steady", &collector.steady)] {
        let mut sorted = v.lock().await.clone();
        sorted.sort();
        println!(
            "latency, {name} ({} deliveries): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            sorted.len(),
            percentile(&sorted, 0.50).as_secs_f64() * 1e3,
            percentile(&sorted, 0.99).as_secs_f64() * 1e3,
            sorted.last().copied().unwrap_or_default().as_secs_f64() * 1e3
        );
    }
    println!(
        "(steady phase: {rate} msg/s for {steady_secs} s to {members} members = {} deliveries/s)",
        rate * members
    );
    let dropped = pixiu_testkit::metric(
        &format!("127.0.0.1:{admin}"),
        "pixiu_messages_dropped_total",
    )
    .await
    .unwrap_or(0.0);
    println!("messages dropped anywhere (all stages, all reasons): {dropped}");
    drop(server);
}
