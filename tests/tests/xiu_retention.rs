//! Xiu retention over real processes: records older than the retention period leave every
//! replica, a follower that was frozen below the leader's floor moves up to it instead of
//! taking it for divergence and replicates on, ids keep growing across a failover, and
//! `pixiu-ctl replay` says the window reaches into expired messages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pixiu_tests::Cluster;
use std::time::Duration;

/// Wait until the counter `query` summed over `nodes` reaches `want`.
async fn wait_metric(c: &Cluster, nodes: &[&str], query: &str, want: f64) {
    let admins: Vec<String> = nodes.iter().map(|n| c.admin(n)).collect();
    let what = format!("{nodes:?}: {query} >= {want}");
    pixiu_tests::wait_metric_sum(&what, &admins, query, want, Duration::from_secs(30)).await;
}

fn metric_of(name: &str) -> String {
    format!("pixiu_messages_out_total{{role=\"xiu\",stage=\"{name}\"}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_records_leave_every_replica_and_replication_goes_on() {
    let mut c = Cluster::start("xiu-retention", 1, 1).await;
    let toml = c.config_file(
        "xiu",
        "retention_ms = 1500\nmaintenance_interval_ms = 100\nmin_insync = 0\n",
    );
    let toml: Vec<&str> = toml.iter().map(String::as_str).collect();
    c.spawn_store("xiu-a", "xiu", 0, &toml);
    c.wait_healthy("xiu-a").await;
    c.spawn_store("xiu-b", "xiu", 0, &toml);
    c.spawn_store("pi0", "pi", 0, &["--min-insync", "0"]);
    c.spawn_router("router", 0);
    c.spawn_broker("broker", 0);
    c.spawn_gateway("gw", &[]);
    c.spawn_proxy("proxy", &[]);
    c.wait_all_healthy().await;
    let p = c.publisher("proxy");

    // the follower is frozen while the leader stores five messages and expires them (all
    // but the last record, which a replica always keeps)
    c.node("xiu-b").proc.sigstop();
    let mut old = Vec::new();
    for i in 0..5 {
        old.push(p.send_user(7, &format!("old{i}"), 1, None).await.unwrap());
    }
    wait_metric(&c, &["xiu-a"], &metric_of("retention_expired"), 4.0).await;

    // thawed, its position is below the leader's floor: it moves up and replicates on
    c.node("xiu-b").proc.sigcont();
    let mut new = Vec::new();
    for i in 0..3 {
        new.push(p.send_user(7, &format!("new{i}"), 1, None).await.unwrap());
    }
    assert!(new[0] > *old.last().unwrap(), "ids keep growing");
    wait_metric(&c, &["xiu-b"], &metric_of("moved_to_floor"), 1.0).await;
    wait_metric(&c, &["xiu-b"], &metric_of("replicated"), 4.0).await;
    let dropped = pixiu_tests::metric(&c.admin("xiu-b"), &metric_of("diverged_dropped"))
        .await
        .unwrap();
    assert_eq!(dropped, 0.0, "expiry was never taken for divergence");
    // the follower's own copies expire too
    wait_metric(&c, &["xiu-b"], &metric_of("retention_expired"), 3.0).await;

    // the follower takes over and its ids go on above every earlier one
    c.node("xiu-a").proc.kill9();
    let id = {
        let p = c.publisher("proxy");
        let mut id = None;
        for _ in 0..40 {
            if let Ok(got) = p.send_user(7, "after the failover", 1, None).await {
                id = Some(got);
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        id.expect("stored on the new leader")
    };
    assert!(id > *new.last().unwrap(), "{id} after {new:?}");

    // replay says what the window lost to retention
    let tls = c.tls_dir.to_string_lossy().to_string();
    let out = c.ctl(&["replay", "--tls-dir", &tls, "--uid", "7"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("have expired (retention)"), "{err}");
}
