//! Benchmark (not a test): one room's fan-out, PiXiu side by side with `nats-server`.
//!
//! One load generator (this process, `load.rs`) measures both systems the same way, one after
//! the other on the same machine:
//! - **memory**: the server's resident memory per idle connection, with
//!   PIXIU_BENCH_IDLE_CONNS (10,000) members connected and subscribed to a quiet room;
//! - **fan-out**: PIXIU_BENCH_MEMBERS (1,000) members in one room, one publisher offering
//!   each rate of PIXIU_BENCH_RATES (1000,300 msg/s) for PIXIU_BENCH_SECS (10) seconds with
//!   a 64-byte-class body. Reported per rate: deliveries per second that arrived while
//!   publishing, and the publish-to-delivery delay p50/p99/max over every delivery that
//!   arrived within PIXIU_BENCH_GRACE_SECS (5) after publishing ended; deliveries that did not
//!   arrive by then are counted as missing; and the cores the server and this load generator
//!   kept busy while publishing (CPU seconds per second).
//!
//! PiXiu runs as `pixiu-ctl standalone` (every role in one process, talking QUIC over
//! loopback), members are WebSocket clients of its gateway, the publisher uses the publisher
//! HTTP API. NATS runs as `nats-server` (core pub/sub), members and the publisher speak its
//! text protocol. PIXIU_BENCH_PEER=none skips NATS.
//!
//! Run: `scripts/prereqs.sh bench && cargo build --release --workspace --bins &&
//! cargo bench -p pixiu-tests --bench room_fanout`
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod load;

use load::{Publisher, Shared, Wire, ROOM};
use pixiu_testkit::{bin_path, free_tcp_port, wait_healthy, Proc, TestDir};
use std::time::{Duration, Instant};

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

/// CPU seconds (user + system) process `pid` has used; /proc counts in USER_HZ, which Linux
/// fixes at 100 for user space.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // the fields after the command name, which is in parentheses and may hold spaces
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum::<u64>() as f64 / 100.0
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

struct Settings {
    members: u64,
    idle: u64,
    rates: Vec<u64>,
    secs: u64,
    grace: Duration,
}

/// One system under test, started: where its members and publisher connect.
struct Server {
    name: &'static str,
    wire: Wire,
    proc: Proc,
    /// host:port the members connect to
    addr: String,
    /// PiXiu's publisher API; NATS publishes on `addr`
    http: Option<String>,
}

impl Server {
    async fn publisher(&self) -> Publisher {
        match &self.http {
            Some(url) => Publisher::http(url),
            None => Publisher::nats(&self.addr).await.expect("nats publisher"),
        }
    }
}

async fn start_nats(dir: &TestDir) -> Option<Server> {
    let bin = [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ]
    .into_iter()
    .map(std::path::PathBuf::from)
    .find(|p| p.is_file());
    let Some(bin) = bin else {
        println!("nats-server not found (scripts/prereqs.sh bench installs it): NATS skipped");
        return None;
    };
    let port = free_tcp_port();
    let args = ["-a", "127.0.0.1", "-p", &port.to_string()].map(String::from);
    let proc = Proc::spawn("nats-server", &bin, &args, &[], dir.path()).expect("nats-server");
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(&addr).await.is_err() {
        assert!(Instant::now() < deadline, "nats-server did not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Some(Server {
        name: "NATS",
        wire: Wire::Nats,
        proc,
        addr,
        http: None,
    })
}

async fn start_pixiu(dir: &TestDir) -> Server {
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
    .map(String::from)
    .to_vec();
    let env = [("RUST_LOG".to_string(), "warn".to_string())];
    let proc = Proc::spawn(
        "standalone",
        &bin_path("pixiu-ctl"),
        &args,
        &env,
        dir.path(),
    )
    .expect("starting pixiu-ctl standalone");
    wait_healthy(&format!("127.0.0.1:{admin}"), Duration::from_secs(30))
        .await
        .expect("standalone healthy");
    Server {
        name: "PiXiu",
        wire: Wire::Ws,
        proc,
        addr: format!("127.0.0.1:{ws}"),
        http: Some(format!("http://127.0.0.1:{http}")),
    }
}

/// Connect members `first..first + n` to `room`, 100 at a time.
async fn connect_all(srv: &Server, first: u64, n: u64, room: u64) -> Vec<load::Member> {
    let mut out = Vec::with_capacity(n as usize);
    let uids: Vec<u64> = (first..first + n).collect();
    for chunk in uids.chunks(100) {
        let joined = futures::future::join_all(
            chunk
                .iter()
                .map(|&uid| load::connect(srv.wire, &srv.addr, uid, room)),
        )
        .await;
        for m in joined {
            out.push(m.unwrap_or_else(|e| panic!("{}: connecting a member: {e:#}", srv.name)));
        }
    }
    out
}

/// Resident memory per idle connection: `n` members subscribed to a room nobody publishes to.
async fn idle_memory(srv: &Server, n: u64) -> f64 {
    let before = rss_kib(srv.proc.pid());
    let t = Instant::now();
    let idle = connect_all(srv, 1_000_000, n, 7).await;
    // let the server settle its per-connection state
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(srv.proc.pid());
    println!(
        "{}: {n} idle connections in {:.1} s, RSS {} -> {} MiB",
        srv.name,
        t.elapsed().as_secs_f64(),
        before / 1024,
        after / 1024
    );
    drop(idle);
    after.saturating_sub(before) as f64 / n as f64
}

struct Row {
    rate: u64,
    published: u64,
    per_sec: f64,
    p50: f64,
    p99: f64,
    max: f64,
    missing: u64,
    /// CPU seconds per second of publishing: the server, and this load generator
    server_cpu: f64,
    load_cpu: f64,
}

/// The fan-out runs of one system, one per offered rate.
async fn fan_out(srv: &Server, s: &Settings) -> Vec<Row> {
    let shared = Shared::new();
    let members = connect_all(srv, 1, s.members, ROOM).await;
    let stats: Vec<_> = members
        .into_iter()
        .map(|m| load::start_reader(srv.wire, m, shared.clone()))
        .collect();
    let publisher = srv.publisher().await;
    let mut rows = Vec::new();
    for (i, &rate) in s.rates.iter().enumerate() {
        let run = i as u64 + 1;
        for st in &stats {
            *st.lock().unwrap() = load::Stats::default();
        }
        shared.begin(run, s.secs);
        let cpu0 = (cpu_secs(srv.proc.pid()), cpu_secs(std::process::id()));
        let published = publisher.run(&shared, run, rate, rate * s.secs).await;
        let cpu1 = (cpu_secs(srv.proc.pid()), cpu_secs(std::process::id()));
        let want = published * s.members;
        let deadline = Instant::now() + s.grace;
        while shared.received() < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (mut delays, mut in_window) = (Vec::new(), 0);
        for st in &stats {
            let mut st = st.lock().unwrap();
            delays.append(&mut st.delays_us);
            in_window += st.in_window;
        }
        delays.sort_unstable();
        rows.push(Row {
            rate,
            published,
            per_sec: in_window as f64 / s.secs as f64,
            p50: percentile(&delays, 0.50),
            p99: percentile(&delays, 0.99),
            max: delays.last().map_or(f64::NAN, |d| f64::from(*d) / 1000.0),
            missing: want.saturating_sub(delays.len() as u64),
            server_cpu: (cpu1.0 - cpu0.0) / s.secs as f64,
            load_cpu: (cpu1.1 - cpu0.1) / s.secs as f64,
        });
        // what is still queued from this run arrives tagged with it and is not counted later
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    rows
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let s = Settings {
        members: env_or("PIXIU_BENCH_MEMBERS", 1000),
        idle: env_or("PIXIU_BENCH_IDLE_CONNS", 10_000),
        rates: std::env::var("PIXIU_BENCH_RATES")
            .unwrap_or_else(|_| "1000,300".into())
            .split(',')
            .filter_map(|r| r.trim().parse().ok())
            .collect(),
        secs: env_or("PIXIU_BENCH_SECS", 10).max(1),
        grace: Duration::from_secs(env_or("PIXIU_BENCH_GRACE_SECS", 5)),
    };
    let with_nats = std::env::var("PIXIU_BENCH_PEER").map_or(true, |p| p != "none");
    let mut results = Vec::new();
    for system in ["NATS", "PiXiu"] {
        let dir = TestDir::new(&format!("bench-{system}"));
        let srv = match system {
            "NATS" if !with_nats => continue,
            "NATS" => match start_nats(&dir).await {
                Some(srv) => srv,
                None => continue,
            },
            _ => start_pixiu(&dir).await,
        };
        let per_conn = if s.idle > 0 {
            idle_memory(&srv, s.idle).await
        } else {
            f64::NAN
        };
        let rows = fan_out(&srv, &s).await;
        results.push((srv.name, per_conn, rows));
        drop(srv);
    }

    println!();
    println!(
        "room fan-out: {} members in one room, one publisher, {} s per rate ({} cores)",
        s.members,
        s.secs,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| system | offered msg/s | published | delivered/s | p50 ms | p99 ms | max ms | missing | server CPU | load generator CPU |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (name, _, rows) in &results {
        for r in rows {
            println!(
                "| {name} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {:.2} | {:.2} |",
                r.rate,
                r.published,
                r.per_sec,
                r.p50,
                r.p99,
                r.max,
                r.missing,
                r.server_cpu,
                r.load_cpu
            );
        }
    }
    if s.idle > 0 {
        println!();
        println!("memory per idle connection ({} connections):", s.idle);
        for (name, per_conn, _) in &results {
            println!("| {name} | {per_conn:.1} KiB |");
        }
    }
}
