//! Benchmark (not a test): personal inboxes on a replicated cluster.
//!
//! Starts ZooKeeper and real processes from the release build: 2 Xiu and 2 Pi replicas of
//! one partition each, a router, a broker, a gateway and a proxy, all on this machine. Reports,
//! for `min_insync` 0 and 1 (fsync on):
//! - throughput: messages stored and acknowledged (HTTP 201) per second with 32 concurrent
//!   publishers (or each count of `PIXIU_BENCH_PUBLISHERS`, e.g. `32,256,1024`), and the
//!   send-to-201 latency, to 200 users who are offline (their messages are kept);
//! - batch throughput: `PIXIU_BENCH_BATCH_PUBLISHERS` (32) publishers each sending
//!   `POST /v1/users/messages/batch` requests of `PIXIU_BENCH_BATCH` (64; 0 skips the step)
//!   messages, one after another: acknowledged messages per second and send-to-201 latency
//!   of a request;
//! - offered load: `PIXIU_BENCH_OFFERED` msg/s (10,000) for `PIXIU_BENCH_OFFERED_SECS` (5) to
//!   those offline users, each send on its own (open loop, not waiting for the one before):
//!   how many were acknowledged per second and the send-to-201 latency, also per half second
//!   of sending (a stall shows as a run of high ones);
//! - latency: 200 receivers online (one device each, acking every message); at a steady rate,
//!   send-to-delivery time p50/p99 (the publish instant is in the body; the receiving device
//!   records when the `inbox` frame arrives); every 10th of those messages is sent with
//!   `"trace": true`, and the median time spent in and between the hops of those is printed
//!   (where a message's time goes at that rate).
//!
//! The throughput and offered-load steps publish over lean keep-alive connections
//! ([`pixiu_tests::http_load`], one per publisher), so the load generator, on the same cores,
//! takes little of them; the latency step uses the client library's `Publisher`.
//!
//! Run: `cargo build --release --workspace --bins && cargo bench -p pixiu-tests --bench inbox`
//! Knobs (env): PIXIU_BENCH_MESSAGES (5000), PIXIU_BENCH_RATE (500/s), PIXIU_BENCH_STEADY_SECS (10),
//! PIXIU_BENCH_PUBLISHERS (32), PIXIU_BENCH_BATCH (64), PIXIU_BENCH_BATCH_PUBLISHERS (32),
//! PIXIU_BENCH_MIN_INSYNC (`0,1`), PIXIU_BENCH_OFFERED (10000; 0 skips that step),
//! PIXIU_BENCH_OFFERED_SECS (5), PIXIU_BENCH_GENERATOR (`reqwest`: the throughput step
//! publishes with the client library instead of lean connections).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pixiu_protocol::client::ServerFrame;
use pixiu_protocol::trace::HopJson;
use pixiu_tests::Cluster;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

const RECEIVERS: u64 = 200;
/// The users of the throughput steps, never online: uids `OFFLINE..OFFLINE + RECEIVERS`.
const OFFLINE: u64 = 1_000_000;
/// Connections of the offered-load step: a send waits for a free one (counted in its time).
const OFFERED_CONNS: usize = 1024;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `PIXIU_BENCH_PUBLISHERS`: concurrent publishers of the throughput phase, a comma-separated
/// sweep (default 32).
fn publisher_sweep() -> Vec<u64> {
    std::env::var("PIXIU_BENCH_PUBLISHERS")
        .unwrap_or_else(|_| "32".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .filter(|n| *n > 0)
        .collect()
}

/// `PIXIU_BENCH_GENERATOR=reqwest`: the throughput step publishes with the client library's
/// `Publisher` (reqwest) instead of lean connections, to see what the generator itself costs.
fn reqwest_generator() -> bool {
    std::env::var("PIXIU_BENCH_GENERATOR").is_ok_and(|g| g == "reqwest")
}

/// A throughput publisher's client.
enum Generator {
    Lean(pixiu_tests::http_load::HttpConn),
    Reqwest(pixiu_client::Publisher),
}

impl Generator {
    /// One personal message to `uid`: whether it was acknowledged.
    async fn send_user(&mut self, uid: u64, body: &str) -> bool {
        match self {
            Generator::Lean(conn) => matches!(conn.send_user(uid, body).await, Ok(true)),
            Generator::Reqwest(p) => p.send_user(uid, body, 1, None).await.is_ok(),
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn bench(min_insync: &str, messages: u64, rate: u64, secs: u64, offered: u64) {
    let mut c = Cluster::start(&format!("bench-inbox-{min_insync}"), 1, 1).await;
    for i in 0..2 {
        c.spawn_store(&format!("xiu{i}"), "xiu", 0, &["--min-insync", min_insync]);
        c.spawn_store(&format!("pi{i}"), "pi", 0, &["--min-insync", min_insync]);
    }
    c.spawn_router("router0", 0);
    c.spawn_broker("broker0", 0);
    let g = c.config_file("gateway", "inbox_heartbeat_ms = 1000\n");
    let g: Vec<&str> = g.iter().map(String::as_str).collect();
    c.spawn_gateway("gw0", &g);
    c.spawn_proxy("proxy0", &[]);
    c.wait_all_healthy().await;

    // throughput: N publishers as fast as they can, for each N of the sweep
    for publishers in publisher_sweep() {
        let mut tasks = Vec::new();
        let mut conns = Vec::new();
        for _ in 0..publishers {
            conns.push(if reqwest_generator() {
                Generator::Reqwest(c.publisher("proxy0"))
            } else {
                Generator::Lean(c.http_conn("proxy0").await)
            });
        }
        let t0 = Instant::now();
        for (p, mut conn) in (0..publishers).zip(conns) {
            tasks.push(tokio::spawn(async move {
                let mut acks = Vec::new();
                for i in 0..(messages / publishers).max(1) {
                    let uid = OFFLINE + (p * 7 + i) % RECEIVERS;
                    let sent = Instant::now();
                    if conn.send_user(uid, "b").await {
                        acks.push(sent.elapsed());
                    }
                }
                acks
            }));
        }
        let mut acks = Vec::new();
        for t in tasks {
            acks.extend(t.await.unwrap());
        }
        let took = t0.elapsed();
        acks.sort();
        println!(
            "min_insync={min_insync}: {} messages stored and acknowledged in {:.2} s = {:.0} msg/s ({publishers} concurrent publishers); send-to-201 p50 {:.1} ms, p99 {:.1} ms",
            acks.len(),
            took.as_secs_f64(),
            acks.len() as f64 / took.as_secs_f64(),
            percentile(&acks, 0.5).as_secs_f64() * 1000.0,
            percentile(&acks, 0.99).as_secs_f64() * 1000.0,
        );
    }
    let batch = env_or("PIXIU_BENCH_BATCH", 64);
    if batch > 0 {
        batch_throughput(&c, min_insync, messages, batch).await;
    }
    let offered_secs = env_or("PIXIU_BENCH_OFFERED_SECS", 5).max(1);
    if offered > 0 {
        offered_load(&c, min_insync, offered, offered_secs).await;
    }

    let start = Instant::now();
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let traces = Arc::new(Mutex::new(Vec::new()));
    let mut receivers = Vec::new();
    for uid in 1..=RECEIVERS {
        let mut client = c.device("gw0", uid, "bench").await;
        let latencies = latencies.clone();
        let traces = traces.clone();
        receivers.push(tokio::spawn(async move {
            while let Ok(Some(ev)) =
                tokio::time::timeout(Duration::from_secs(5), client.next_event()).await
            {
                if let ServerFrame::Inbox {
                    id, body, trace, ..
                } = ev
                {
                    let _ = client.ack(id.0).await;
                    if let Some(hops) = trace {
                        traces.lock().await.push(hops);
                    }
                    if let Some(us) = body.strip_prefix("s:").and_then(|v| v.parse::<u64>().ok()) {
                        let now = start.elapsed();
                        latencies
                            .lock()
                            .await
                            .push(now.saturating_sub(Duration::from_micros(us)));
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    // latency at a steady rate
    let publisher = Arc::new(c.publisher("proxy0"));
    let total = rate * secs;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    let mut sends = Vec::new();
    for i in 0..total {
        tick.tick().await;
        let publisher = publisher.clone();
        let body = format!("s:{}", start.elapsed().as_micros());
        sends.push(tokio::spawn(async move {
            let uid = 1 + i % RECEIVERS;
            if i % 10 == 0 {
                publisher.send_user_traced(uid, &body).await.is_ok()
            } else {
                publisher.send_user(uid, &body, 1, None).await.is_ok()
            }
        }));
    }
    let mut acked = 0;
    for s in sends {
        if s.await.unwrap() {
            acked += 1;
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut l = latencies.lock().await.clone();
    l.sort();
    println!(
        "min_insync={min_insync}: steady {rate} msg/s for {secs} s: {acked} acknowledged, {} delivered; send-to-delivery p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        l.len(),
        percentile(&l, 0.5).as_secs_f64() * 1000.0,
        percentile(&l, 0.99).as_secs_f64() * 1000.0,
        l.last().copied().unwrap_or_default().as_secs_f64() * 1000.0,
    );
    println!(
        "min_insync={min_insync}: traced, median µs: {}",
        hop_medians(&traces.lock().await)
    );
    for r in receivers {
        r.abort();
    }
}

/// The median time in each hop (`xiu 1234`: arrival to leaving) and between hops (`->`),
/// over the traces whose hops are the same roles in the same order as the first one's.
fn hop_medians(traces: &[Vec<HopJson>]) -> String {
    let Some(first) = traces.first() else {
        return "no traced message delivered".into();
    };
    let roles: Vec<&str> = first.iter().map(|h| h.role.as_str()).collect();
    let same: Vec<&Vec<HopJson>> = traces
        .iter()
        .filter(|t| t.iter().map(|h| h.role.as_str()).eq(roles.iter().copied()))
        .collect();
    let median = |mut v: Vec<u64>| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    let mut parts = Vec::new();
    for (i, role) in roles.iter().enumerate() {
        if i > 0 {
            let gap = same
                .iter()
                .map(|t| t[i].in_us.saturating_sub(t[i - 1].out_us));
            parts.push(format!("-> {}", median(gap.collect())));
        }
        let inside = same.iter().map(|t| t[i].out_us.saturating_sub(t[i].in_us));
        parts.push(format!("{role} {}", median(inside.collect())));
    }
    format!("{} ({} traces)", parts.join(" "), same.len())
}

/// `rate` sends a second for `secs` seconds to the offline users, each on its own task: how
/// many were acknowledged a second, and how long each took to its 201.
/// `publishers` publishers each sending batches of `batch` messages to the offline users, a
/// batch at a time, until `messages` are sent in all.
async fn batch_throughput(c: &Cluster, min_insync: &str, messages: u64, batch: u64) {
    let publishers = env_or("PIXIU_BENCH_BATCH_PUBLISHERS", 32);
    let rounds = (messages / publishers / batch).max(1);
    let mut conns = Vec::new();
    for _ in 0..publishers {
        conns.push(c.http_conn("proxy0").await);
    }
    let t0 = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .zip(0u64..)
        .map(|(mut conn, p)| {
            tokio::spawn(async move {
                let mut acked = 0;
                let mut took = Vec::new();
                for r in 0..rounds {
                    let to: Vec<u64> = (0..batch)
                        .map(|i| OFFLINE + (p * 7 + r * batch + i) % RECEIVERS)
                        .collect();
                    let sent = Instant::now();
                    let n = conn.send_batch(&to, "b").await.unwrap_or(0);
                    took.push(sent.elapsed());
                    acked += n;
                }
                (acked, took)
            })
        })
        .collect();
    let mut acked = 0;
    let mut took = Vec::new();
    for t in tasks {
        let (n, t) = t.await.unwrap();
        acked += n;
        took.extend(t);
    }
    let all = t0.elapsed();
    took.sort();
    println!(
        "min_insync={min_insync}: {acked} of {} messages acknowledged in {:.2} s = {:.0} msg/s ({publishers} publishers, {batch} messages per batch request); request send-to-201 p50 {:.1} ms, p99 {:.1} ms",
        publishers * rounds * batch,
        all.as_secs_f64(),
        acked as f64 / all.as_secs_f64(),
        percentile(&took, 0.5).as_secs_f64() * 1000.0,
        percentile(&took, 0.99).as_secs_f64() * 1000.0,
    );
}

async fn offered_load(c: &Cluster, min_insync: &str, rate: u64, secs: u64) {
    // connections to take a send each: as many as may be waiting for a 201 at once
    let mut conns = Vec::new();
    for _ in 0..OFFERED_CONNS {
        conns.push(c.http_conn("proxy0").await);
    }
    let conns = Arc::new(std::sync::Mutex::new(conns));
    let free = Arc::new(tokio::sync::Semaphore::new(OFFERED_CONNS));
    let total = rate * secs;
    let started_unix_ms = pixiu_protocol::now_ms();
    let t0 = tokio::time::Instant::now();
    let mut sends = Vec::with_capacity(total as usize);
    for i in 0..total {
        tokio::time::sleep_until(t0 + Duration::from_nanos(i * 1_000_000_000 / rate)).await;
        let (conns, free) = (conns.clone(), free.clone());
        sends.push(tokio::spawn(async move {
            let sent = Instant::now();
            let _permit = free.acquire().await.unwrap();
            let mut conn = conns.lock().unwrap().pop().unwrap();
            let ok = conn.send_user(OFFLINE + i % RECEIVERS, "o").await;
            conns.lock().unwrap().push(conn);
            matches!(ok, Ok(true)).then(|| sent.elapsed())
        }));
    }
    let offered_for = t0.elapsed();
    let mut acks = Vec::new();
    // send-to-201 times by the half second in which they were sent, to tell a steady tail
    // from a stall
    let mut windows = vec![Vec::new(); (secs * 2) as usize];
    for (i, s) in sends.into_iter().enumerate() {
        if let Some(took) = s.await.unwrap() {
            acks.push(took);
            if let Some(w) = windows.get_mut(i * 2 / rate as usize) {
                w.push(took);
            }
        }
    }
    let all_done = t0.elapsed();
    acks.sort();
    println!(
        "min_insync={min_insync}: offered {rate} msg/s for {secs} s (sent in {:.2} s): {} of {total} acknowledged, all answered after {:.2} s = {:.0} msg/s; send-to-201 p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        offered_for.as_secs_f64(),
        acks.len(),
        all_done.as_secs_f64(),
        acks.len() as f64 / all_done.as_secs_f64(),
        percentile(&acks, 0.5).as_secs_f64() * 1000.0,
        percentile(&acks, 0.99).as_secs_f64() * 1000.0,
        acks.last().copied().unwrap_or_default().as_secs_f64() * 1000.0,
    );
    let by_window: Vec<String> = windows
        .iter_mut()
        .map(|w| {
            w.sort();
            format!("{:.0}", percentile(w, 0.99).as_secs_f64() * 1000.0)
        })
        .collect();
    println!(
        "min_insync={min_insync}: offered step began at unix {:.3} s; p99 ms per half second sent: {}",
        started_unix_ms as f64 / 1000.0,
        by_window.join(" "),
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let messages = env_or("PIXIU_BENCH_MESSAGES", 5000);
    let rate = env_or("PIXIU_BENCH_RATE", 500);
    let secs = env_or("PIXIU_BENCH_STEADY_SECS", 10);
    let offered = env_or("PIXIU_BENCH_OFFERED", 10_000);
    let insync = std::env::var("PIXIU_BENCH_MIN_INSYNC").unwrap_or_else(|_| "0,1".into());
    for min_insync in insync.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        bench(min_insync, messages, rate, secs, offered).await;
    }
}
