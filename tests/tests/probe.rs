//! `pixiu-ctl probe` against real processes: on a healthy cluster (2 broker partitions, one with
//! 2 replicas; 2 router partitions; 2 gateways; Xiu and Pi of 2 partitions of 2 replicas) it
//! exits 0 and covers every node; freezing (SIGSTOP) in turn a broker replica, a router, a
//! gateway, a Xiu leader and a Pi leader makes it exit 1 within 10 s naming that node and no
//! other; after SIGCONT it is healthy again. `--serve` exposes the metrics and counts a path as
//! failed only after consecutive failed rounds. Bad usage exits 2 with one line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pixiu_tests::Cluster;
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// `(role, partition, id)` of a node, as `pixiu-ctl status --json` and the probe name it.
type NodeKey = (String, Option<u64>, u64);

fn key_of(v: &Value) -> NodeKey {
    (
        v["role"].as_str().unwrap().to_string(),
        v["partition"].as_u64(),
        v["id"].as_u64().unwrap(),
    )
}

/// The registry key of the node started as `name` (matched by its admin address).
fn node_key(c: &Cluster, name: &str) -> NodeKey {
    let admin = c.admin(name);
    let status = c.status();
    let node = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["admin"].as_str() == Some(admin.as_str()))
        .unwrap_or_else(|| panic!("{name} not in {status}"));
    key_of(node)
}

struct ProbeRun {
    code: i32,
    json: Value,
    stderr: String,
}

fn probe(c: &Cluster, extra: &[&str]) -> ProbeRun {
    let mut args = vec![
        "probe",
        "--json",
        "--timeout-ms",
        "3000",
        "--auth-secret-file",
        c.secret_file.to_str().unwrap(),
        "--tls-dir",
        c.tls_dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = c.ctl(&args);
    ProbeRun {
        code: out.status.code().unwrap_or(-1),
        json: serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn faults(run: &ProbeRun) -> BTreeSet<NodeKey> {
    run.json["faults"]
        .as_array()
        .map(|a| a.iter().map(key_of).collect())
        .unwrap_or_default()
}

/// Runs `probe --count 1` until `done` says the run is what is awaited, or the deadline.
fn probe_until(
    c: &Cluster,
    within: Duration,
    what: &str,
    done: impl Fn(&ProbeRun) -> bool,
) -> ProbeRun {
    let start = Instant::now();
    loop {
        let run = probe(c, &["--count", "1"]);
        if done(&run) {
            return run;
        }
        if start.elapsed() > within {
            panic!(
                "{what}: not within {within:?}; last run exit {} faults {:?}\n{}\nstderr: {}\n{}",
                run.code,
                faults(&run),
                serde_json::to_string_pretty(&run.json).unwrap(),
                run.stderr,
                c.logs()
            );
        }
    }
}

async fn cluster() -> Cluster {
    let mut c = Cluster::start_layout("probe", 2, 2, 2, 2).await;
    // a frozen node stays registered for the whole test: the probe has to find it itself
    c.zk_session_timeout_ms = 30_000;
    // leaders first (the smallest registry id of each partition leads)
    for p in 0..2 {
        c.spawn_store(&format!("xiu{p}a"), "xiu", p, &[]);
        c.spawn_store(&format!("pi{p}a"), "pi", p, &[]);
    }
    c.wait_all_healthy().await;
    for p in 0..2 {
        c.spawn_store(&format!("xiu{p}b"), "xiu", p, &[]);
        c.spawn_store(&format!("pi{p}b"), "pi", p, &[]);
    }
    c.spawn_router("router0", 0);
    c.spawn_router("router1", 1);
    c.spawn_broker("broker0a", 0);
    c.spawn_broker("broker0b", 0);
    c.spawn_broker("broker1", 1);
    c.spawn_gateway("gw-a", &[]);
    c.spawn_gateway("gw-b", &[]);
    c.spawn_proxy("proxy", &[]);
    c.wait_all_healthy().await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_probe_covers_every_node_and_names_each_frozen_one() {
    let mut c = cluster().await;
    let all: BTreeSet<NodeKey> = c.status()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(key_of)
        .collect();
    assert_eq!(all.len(), 16);

    // healthy: three rounds, every path works, every node is on some path
    let run = probe_until(&c, Duration::from_secs(30), "healthy", |r| r.code == 0);
    let run = if run.json["rounds"].as_array().map(Vec::len) == Some(1) {
        probe(&c, &["--count", "3", "--interval-ms", "200"])
    } else {
        run
    };
    assert_eq!(run.code, 0, "{}\n{}", run.json, run.stderr);
    let rounds = run.json["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3);
    let outcomes = rounds[2]["outcomes"].as_array().unwrap();
    let reached: BTreeSet<String> = outcomes
        .iter()
        .filter(|o| o["kind"] == "reach")
        .map(|o| o["path"].as_str().unwrap().to_string())
        .collect();
    for (role, partition, id) in &all {
        let name = match partition {
            Some(p) => format!("{role} {p}/{id}"),
            None => format!("{role} {id}"),
        };
        assert!(reached.contains(&name), "{name} not probed: {reached:?}");
    }
    let kinds = |k: &str| outcomes.iter().filter(|o| o["kind"] == k).count();
    assert!(kinds("join") >= 6, "3 rooms x 2 gateways at least");
    assert!(kinds("room") >= 6);
    assert_eq!(
        kinds("inbox"),
        2,
        "one proxy x 2 receivers (Xiu and Pi partitions 0, 1)"
    );
    let hops = |o: &Value| -> Vec<String> {
        o["hops"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["hop"].as_str().unwrap().to_string())
            .collect()
    };
    for o in outcomes.iter().filter(|o| o["kind"] == "room") {
        assert_eq!(hops(o), ["proxy", "broker", "gateway", "client"], "{o}");
    }
    for o in outcomes.iter().filter(|o| o["kind"] == "inbox") {
        let want = ["proxy", "xiu", "pi", "broker", "gateway", "client"];
        assert_eq!(hops(o), want, "{o}");
    }

    // the readable table: every path, then the verdict
    let secret = c.secret_file.to_str().unwrap().to_string();
    let tls = c.tls_dir.to_str().unwrap().to_string();
    let out = c.ctl(&[
        "probe",
        "--count",
        "1",
        "--auth-secret-file",
        &secret,
        "--tls-dir",
        &tls,
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("healthy: every path worked"), "{text}");
    assert!(text.contains("inbox  proxy 0 -> xiu 1 -> pi 1"), "{text}");
    println!("{text}");

    // freeze each in turn: the probe names it, and nothing else, within 10 s
    let victims = ["broker0b", "router1", "gw-b", "xiu1a", "pi1a"];
    for victim in victims {
        let key = node_key(&c, victim);
        c.node(victim).proc.sigstop();
        let frozen_at = Instant::now();
        let run = probe_until(&c, Duration::from_secs(10), victim, |r| {
            r.code == 1 && faults(r).contains(&key)
        });
        assert!(frozen_at.elapsed() < Duration::from_secs(10));
        let failed: Vec<&Value> = run.json["rounds"][0]["outcomes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|o| o["ok"] == false)
            .collect();
        assert_eq!(
            faults(&run),
            BTreeSet::from([key.clone()]),
            "{victim} is the only node named: {}",
            serde_json::to_string_pretty(&failed).unwrap()
        );
        c.node(victim).proc.sigcont();
        probe_until(
            &c,
            Duration::from_secs(30),
            &format!("healthy after {victim}"),
            |r| r.code == 0,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn probe_serve_exposes_metrics_and_confirms_a_failure_after_consecutive_rounds() {
    let mut c = Cluster::start("probe-serve", 1, 1).await;
    c.zk_session_timeout_ms = 30_000;
    c.spawn_one_of_each().await;
    let port = pixiu_testkit::free_tcp_port();
    let addr = format!("127.0.0.1:{port}");
    let args: Vec<String> = [
        "probe",
        "--serve",
        &addr,
        "--interval-ms",
        "300",
        "--timeout-ms",
        "2000",
        "--fail-after",
        "2",
        "--auth-secret-file",
        c.secret_file.to_str().unwrap(),
        "--tls-dir",
        c.tls_dir.to_str().unwrap(),
        "--zk",
        &c.zk.connect_string(),
        "--cluster",
        "test",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // killed when dropped; its log is kept with the cluster's
    let bin = pixiu_testkit::bin_path("pixiu-ctl");
    let _probe = pixiu_testkit::Proc::spawn("probe", &bin, &args, &[], c.dir.path()).unwrap();
    // rounds go by, every path works, and the latency histograms have each hop
    let a = addr.clone();
    pixiu_tests::assert_eventually("healthy rounds", Duration::from_secs(30), || {
        let a = a.clone();
        async move {
            let text = scrape(&a).await?;
            let rounds = sum(&text, "pixiu_probe_rounds_total", &[]);
            let failed = sum(&text, "pixiu_probe_paths", &["state=\"failed\""]);
            let hops = sum(
                &text,
                "pixiu_probe_latency_seconds_count",
                &["hop=\"broker\"", "kind=\"room\""],
            );
            if rounds >= 3.0 && failed == 0.0 && hops >= 2.0 {
                Ok(())
            } else {
                Err(format!(
                    "rounds {rounds}, failed paths {failed}, broker hops {hops}"
                ))
            }
        }
    })
    .await;
    let text = scrape(&addr).await.unwrap();
    for (name, labels) in [
        (
            "pixiu_probe_latency_seconds_bucket",
            ["hop=\"total\"", "kind=\"inbox\""],
        ),
        (
            "pixiu_probe_latency_seconds_bucket",
            ["hop=\"gateway\"", "kind=\"room\""],
        ),
        (
            "pixiu_probe_path_failed",
            ["kind=\"join\"", "path=\"gateway"],
        ),
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x))),
            "{name} {labels:?} missing:\n{text}"
        );
    }
    assert_eq!(sum(&text, "pixiu_probe_node_failed", &[]), 0.0, "{text}");

    // a frozen broker: counted against it once two rounds in a row failed, and only it
    let (_, _, id) = node_key(&c, "broker");
    c.node("broker").proc.sigstop();
    let a = addr.clone();
    pixiu_tests::assert_eventually(
        "the broker confirmed failed",
        Duration::from_secs(20),
        || {
            let a = a.clone();
            async move {
                let text = scrape(&a).await?;
                let blamed: Vec<&str> = text
                    .lines()
                    .filter(|l| l.starts_with("pixiu_probe_node_failed{"))
                    .collect();
                match blamed.as_slice() {
                    [one]
                        if one.contains(&format!("node=\"{id}\""))
                            && one.contains("role=\"broker\"") =>
                    {
                        Ok(())
                    }
                    other => Err(format!("blamed: {other:?}")),
                }
            }
        },
    )
    .await;
    let text = scrape(&addr).await.unwrap();
    assert!(
        sum(
            &text,
            "pixiu_probe_failures_total",
            &[&format!("node=\"{id}\"")]
        ) > 0.0,
        "{text}"
    );
    c.node("broker").proc.sigcont();
    let a = addr.clone();
    pixiu_tests::assert_eventually("healthy again", Duration::from_secs(30), || {
        let a = a.clone();
        async move {
            let text = scrape(&a).await?;
            let failed = sum(&text, "pixiu_probe_paths", &["state=\"failed\""]);
            let blamed = sum(&text, "pixiu_probe_node_failed", &[]);
            if failed == 0.0 && blamed == 0.0 {
                Ok(())
            } else {
                Err(format!("failed paths {failed}, blamed {blamed}"))
            }
        }
    })
    .await;
}

async fn scrape(addr: &str) -> Result<String, String> {
    let resp = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .map_err(|e| e.to_string())?;
    resp.text().await.map_err(|e| e.to_string())
}

/// The sum of every series of `name` whose labels include each of `labels`.
fn sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let series = l.split_whitespace().next().unwrap_or("");
            let n = series.split('{').next().unwrap_or("");
            n == name && labels.iter().all(|x| series.contains(x))
        })
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn probe_bad_usage_exits_2_and_an_empty_cluster_is_a_fault() {
    let c = Cluster::start("probe-usage", 1, 1).await;
    let secret = c.secret_file.to_str().unwrap();
    let tls = c.tls_dir.to_str().unwrap();
    let cases: [(&[&str], &str); 3] = [
        (
            &[
                "probe",
                "--count",
                "0",
                "--auth-secret-file",
                secret,
                "--tls-dir",
                tls,
            ],
            "--count",
        ),
        (
            &[
                "probe",
                "--count",
                "1",
                "--auth-secret-file",
                "/nonexistent/secret",
                "--tls-dir",
                tls,
            ],
            "secret",
        ),
        (
            &[
                "probe",
                "--count",
                "1",
                "--serve",
                "127.0.0.1:1",
                "--auth-secret-file",
                secret,
                "--tls-dir",
                tls,
            ],
            "cannot be used with",
        ),
    ];
    for (args, why) in cases {
        let out = c.ctl(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
    }
    // ZooKeeper unreachable: exit 2, one line
    let out = std::process::Command::new(pixiu_testkit::bin_path("pixiu-ctl"))
        .args([
            "probe",
            "--count",
            "1",
            "--auth-secret-file",
            secret,
            "--tls-dir",
            tls,
        ])
        .args(["--zk", "127.0.0.1:1", "--cluster", "test"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // no node runs: nothing can be probed, which is a fault
    let out = c.ctl(&[
        "probe",
        "--count",
        "1",
        "--timeout-ms",
        "500",
        "--auth-secret-file",
        secret,
        "--tls-dir",
        tls,
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("no running gateway"), "{text}");
}
