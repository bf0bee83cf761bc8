//! `pixiu-ctl replay` against real processes: a user's stored messages in a window, oldest
//! first, across two Xiu partitions, after the device acknowledged them all; the window's
//! ends; `--out`; `--redeliver` to the online device with the original ids (and a user with
//! none online: exit 1); bad usage; and a partition without a replica, which is an error, not
//! an empty answer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pixiu_protocol::client::ServerFrame;
use pixiu_tests::Cluster;
use std::collections::BTreeSet;
use std::time::Duration;

/// `pixiu-ctl replay ARGS` with the cluster's TLS folder: (exit code, stdout lines, stderr).
fn replay(c: &Cluster, args: &[&str]) -> (Option<i32>, Vec<serde_json::Value>, String) {
    let tls = c.tls_dir.to_string_lossy().to_string();
    let mut all = vec!["replay", "--tls-dir", tls.as_str()];
    all.extend_from_slice(args);
    let out = c.ctl(&all);
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (
        out.status.code(),
        lines,
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn ids(lines: &[serde_json::Value]) -> Vec<u64> {
    lines
        .iter()
        .map(|l| l["id"].as_str().unwrap().parse().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_exports_a_users_window_oldest_first_whatever_was_acknowledged() {
    let mut c = Cluster::start_layout("replay", 1, 1, 2, 1).await;
    c.spawn_store("xiu0", "xiu", 0, &["--min-insync", "0"]);
    c.spawn_store("xiu1", "xiu", 1, &["--min-insync", "0"]);
    c.spawn_store("pi0", "pi", 0, &["--min-insync", "0"]);
    c.spawn_router("router", 0);
    c.spawn_broker("broker", 0);
    c.spawn_gateway("gw", &[]);
    c.spawn_proxy("proxy", &[]);
    c.wait_all_healthy().await;
    let mut dev = c.device("gw", 7, "phone").await;
    let p = c.publisher("proxy");

    // four to user 7 (partition 1), one to user 8 (partition 0), one to both
    let mut early = Vec::new();
    for i in 0..4 {
        early.push(p.send_user(7, &format!("early{i}"), 1, None).await.unwrap());
    }
    p.send_user(8, "other", 1, None).await.unwrap();
    let both = p.send_users(&[7, 8], "both", 1, None).await.unwrap();
    early.push(both[&7]);
    let mid = pixiu_protocol::now_ms();
    while pixiu_protocol::now_ms() <= mid {
        tokio::task::yield_now().await;
    }
    let mut late = Vec::new();
    for i in 0..3 {
        late.push(p.send_user(7, &format!("late{i}"), 1, None).await.unwrap());
    }

    // the device receives and acknowledges every one (Pi may then drop them)
    let want: BTreeSet<u64> = early.iter().chain(&late).copied().collect();
    let mut got = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while got != want && tokio::time::Instant::now() < deadline {
        if let Ok(Some(ServerFrame::Inbox { id, .. })) =
            tokio::time::timeout(Duration::from_secs(2), dev.next_event()).await
        {
            dev.ack(id.0).await.unwrap();
            got.insert(id.0);
        }
    }
    assert_eq!(got, want, "{}", c.logs());

    let since = (mid + 1).to_string();
    let (code, all, err) = replay(&c, &["--uid", "7"]);
    assert_eq!(code, Some(0), "{err}");
    let everything: Vec<u64> = early.iter().chain(&late).copied().collect();
    assert_eq!(ids(&all), everything, "oldest first");
    assert_eq!(all[0]["body"], "early0");
    assert_eq!(all[0]["type"], "inbox");
    assert!(err.contains("from 2 xiu partitions"), "{err}");
    let (_, window, _) = replay(&c, &["--uid", "7", "--since", &since]);
    assert_eq!(ids(&window), late);
    let (_, window, _) = replay(&c, &["--uid", "7", "--until", &since]);
    assert_eq!(ids(&window), early);
    let (_, other, _) = replay(&c, &["--uid", "8"]);
    assert_eq!(other.len(), 2, "user 8's own and the shared one");
    let file = c.dir.path().join("export.jsonl");
    let file_arg = file.to_string_lossy().to_string();
    let (code, stdout, _) = replay(&c, &["--uid", "7", "--since", &since, "--out", &file_arg]);
    assert_eq!((code, stdout.len()), (Some(0), 0));
    assert_eq!(std::fs::read_to_string(&file).unwrap().lines().count(), 3);

    // redelivery: the window's messages reach the online device again, with their ids
    let (code, stdout, err) = replay(
        &c,
        &[
            "--uid",
            "7",
            "--since",
            &since,
            "--redeliver",
            "--rate",
            "50",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(stdout.is_empty(), "no export lines without --out");
    assert!(
        err.contains("redelivered 3 messages to 1 online devices"),
        "{err}"
    );
    let mut again = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while again.len() < late.len() && tokio::time::Instant::now() < deadline {
        if let Ok(Some(ServerFrame::Inbox { id, .. })) =
            tokio::time::timeout(Duration::from_secs(2), dev.next_event()).await
        {
            dev.ack(id.0).await.unwrap();
            again.push(id.0);
        }
    }
    assert_eq!(again, late, "the same ids, in order");
    // user 8 has messages and no device online: nothing went out, exit 1
    let (code, _, err) = replay(&c, &["--uid", "8", "--redeliver"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no device of user 8 is online"), "{err}");

    // bad usage: exit 2, one line
    let (code, _, err) = replay(&c, &["--uid", "7", "--since", &since, "--until", "5"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not before"), "{err}");
    let (code, _, err) = replay(&c, &["--uid", "7", "--since", "last tuesday"]);
    assert_eq!(code, Some(2), "{err}");

    // a partition with no replica cannot be read: exit 1 naming it
    c.node("xiu1").proc.sigterm();
    let _ = c.node("xiu1").proc.wait_exit(Duration::from_secs(10));
    let (code, out, err) = replay(&c, &["--uid", "7"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(out.is_empty());
    assert!(err.contains("xiu partition 1 has no leader"), "{err}");
}

/// Every replica of Pi partition 1 loses its data: `replay --rebuild-pi` plans from Xiu
/// without changing anything, then with `--execute` writes and verifies the lists, and every
/// acknowledged message of that partition's users is delivered again (lost = 0); the other
/// partition is untouched. A partition that does not exist is bad usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_pi_partition_is_rebuilt_from_xiu() {
    let mut c = Cluster::start_layout("rebuild-pi", 1, 1, 2, 2).await;
    for p in 0..2 {
        c.spawn_store(&format!("xiu{p}"), "xiu", p, &["--min-insync", "0"]);
        c.spawn_store(&format!("pi{p}"), "pi", p, &["--min-insync", "0"]);
    }
    c.spawn_router("router", 0);
    c.spawn_broker("broker", 0);
    c.spawn_gateway("gw", &[]);
    c.spawn_proxy("proxy", &[]);
    c.wait_all_healthy().await;
    let p = c.publisher("proxy");
    let mut acked: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    for i in 0..3 {
        for uid in 1..=4u64 {
            let id = p.send_user(uid, &format!("m{i}"), 9, None).await.unwrap();
            acked.entry(uid).or_default().push(id);
        }
    }
    let both = p.send_users(&[1, 3], "both", 9, None).await.unwrap();
    for (uid, id) in both {
        acked.entry(uid).or_default().push(id);
    }

    // every replica of pi partition 1 (users 1 and 3) loses its data
    c.node("pi1").proc.sigterm();
    let _ = c.node("pi1").proc.wait_exit(Duration::from_secs(10));
    std::fs::remove_dir_all(c.data_dir("pi1")).unwrap();
    std::fs::create_dir_all(c.data_dir("pi1")).unwrap();
    c.node("pi1").proc.respawn().unwrap();
    c.wait_healthy("pi1").await;

    let tls = c.tls_dir.to_string_lossy().to_string();
    let run = |args: &[&str]| {
        let mut all = vec!["replay", "--tls-dir", tls.as_str(), "--rebuild-pi"];
        all.extend_from_slice(args);
        let out = c.ctl(&all);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, out, err) = run(&["--partition", "1"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("2 users, 8 ids"), "{out}");
    assert!(out.contains("nothing changed"), "{out}");
    let (code, out, err) = run(&["--partition", "1", "--execute"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("verified"), "{out}");
    // bad usage
    let (code, _, err) = run(&["--partition", "2"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no partition 2"), "{err}");
    assert_eq!(run(&[]).0, Some(2), "--partition is required");

    // every device now gets every acknowledged message of its user, in order
    for uid in 1..=4u64 {
        let mut dev = c.device("gw", uid, "phone").await;
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while got.len() < acked[&uid].len() && tokio::time::Instant::now() < deadline {
            if let Ok(Some(ServerFrame::Inbox { id, .. })) =
                tokio::time::timeout(Duration::from_secs(2), dev.next_event()).await
            {
                dev.ack(id.0).await.unwrap();
                got.push(id.0);
            }
        }
        assert_eq!(got, acked[&uid], "uid {uid}\n{}", c.logs());
    }
}
