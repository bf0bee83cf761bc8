//! A Jepsen-style checker of personal inboxes: 20 senders, 50 receivers with 2 devices each
//! that drop and reconnect at random, 10,000 messages, with faults injected while it runs
//! (kill -9 of the Xiu leader, of the Pi leader, of a broker, of a gateway; a restart of every
//! role; all of them; Xiu, and Pi, doubled 1 -> 2 -> 4 with `pixiu-ctl scale-out`). Then every
//! device stays online until it has everything, and the checker counts:
//! - **lost**: acknowledged (201) and never delivered to a device of its receiver (every
//!   device is known to the cluster before the first send, and online at the end);
//! - **reordered**: a device saw a smaller id after a larger one, after dropping duplicates;
//! - **reused**: one id acknowledged or delivered for two different messages;
//! - **duplicates**: deliveries of an id the device had already seen (allowed, counted).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pixiu_client::{Auth, Client};
use pixiu_protocol::client::ServerFrame;
use pixiu_tests::{Cluster, SECRET};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SENDERS: u64 = 20;
const RECEIVERS: u64 = 50;
const DEVICES: [&str; 2] = ["phone", "laptop"];
const MESSAGES: usize = 10_000;
const FIRST_UID: u64 = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    XiuLeader,
    PiLeader,
    Broker,
    Gateway,
    RestartEveryRole,
    /// Start two replicas of each new partition of `xiu` or `pi`, run `pixiu-ctl scale-out`,
    /// and check that the new partitions carry traffic (and that Pi's parents drop the users
    /// they no longer own).
    Double(&'static str),
    /// The same, with a kill -9 of the leader of partition 0 just after the flip.
    DoubleKillingParent(&'static str),
    /// The same, with a kill -9 of the leader of partition 0 before the flip, while its child
    /// copies its users (Pi: the child must copy the new leader's snapshot again, whose log
    /// positions past what it replicated name other changes than the dead leader's).
    DoubleKillingParentBeforeFlip(&'static str),
}

/// When [`double`] kills the leader of partition 0.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kill {
    Never,
    BeforeFlip,
    AfterFlip,
}

#[derive(Default, Debug)]
struct DeviceLog {
    /// every inbox frame in arrival order: (id, body)
    frames: Vec<(u64, String)>,
}

#[derive(Debug)]
struct Report {
    acked: usize,
    refused: usize,
    lost: usize,
    reordered: usize,
    reused: usize,
    duplicates: usize,
    deliveries: usize,
}

const BROKER_TOML: &str =
    "redeliver_ms = 1000\nredeliver_tries = 3\ndevice_timeout_ms = 4000\ninbox_poll_ms = 1000\n";
const GATEWAY_TOML: &str = "inbox_heartbeat_ms = 500\npublish_rate = 0\n";

async fn cluster(name: &str) -> Cluster {
    let mut c = Cluster::start(name, 1, 1).await;
    c.zk_session_timeout_ms = 3000;
    for i in 0..2 {
        c.spawn_store(&format!("xiu{i}"), "xiu", 0, &[]);
        c.spawn_store(&format!("pi{i}"), "pi", 0, &[]);
    }
    c.spawn_router("router0", 0);
    let b = c.config_file("broker", BROKER_TOML);
    let b: Vec<&str> = b.iter().map(String::as_str).collect();
    c.spawn_broker_with("broker0", 0, &b);
    c.spawn_broker_with("broker1", 0, &b);
    let g = c.config_file("gateway", GATEWAY_TOML);
    let g: Vec<&str> = g.iter().map(String::as_str).collect();
    c.spawn_gateway("gw0", &g);
    c.spawn_gateway("gw1", &g);
    c.spawn_proxy("proxy0", &[]);
    c.wait_all_healthy().await;
    c
}

/// The harness name of the leader of `role` partition 0 (smallest registry id).
fn leader(c: &Cluster, role: &str) -> String {
    let status = c.status();
    let admin = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["role"] == role && n["partition"] == 0)
        .min_by_key(|n| n["id"].as_u64().unwrap())
        .and_then(|n| n["admin"].as_str().map(str::to_string))
        .expect("a leader");
    c.nodes
        .iter()
        .find(|(_, n)| n.admin == admin)
        .map(|(name, _)| name.clone())
        .expect("the leader is one of ours")
}

async fn kill_and_restart(c: &Arc<tokio::sync::Mutex<Cluster>>, name: &str, graceful: bool) {
    let mut g = c.lock().await;
    eprintln!(
        "fault: {} {name}",
        if graceful { "restart" } else { "kill -9" }
    );
    if graceful {
        g.node(name).proc.sigterm();
        let _ = g.node(name).proc.wait_exit(Duration::from_secs(10));
    } else {
        g.node(name).proc.kill9();
    }
    drop(g);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut g = c.lock().await;
    g.node(name).proc.respawn().unwrap();
    g.wait_healthy(name).await;
}

async fn inject(c: &Arc<tokio::sync::Mutex<Cluster>>, fault: Fault) {
    match fault {
        Fault::XiuLeader => {
            let name = leader(&*c.lock().await, "xiu");
            kill_and_restart(c, &name, false).await;
        }
        Fault::PiLeader => {
            let name = leader(&*c.lock().await, "pi");
            kill_and_restart(c, &name, false).await;
        }
        Fault::Broker => kill_and_restart(c, "broker0", false).await,
        Fault::Gateway => kill_and_restart(c, "gw0", false).await,
        Fault::Double(role) => double(c, role, Kill::Never).await,
        Fault::DoubleKillingParent(role) => double(c, role, Kill::AfterFlip).await,
        Fault::DoubleKillingParentBeforeFlip(role) => double(c, role, Kill::BeforeFlip).await,
        Fault::RestartEveryRole => {
            for name in [
                "xiu0", "pi0", "router0", "broker1", "gw1", "proxy0", "xiu1", "pi1",
            ] {
                kill_and_restart(c, name, true).await;
            }
        }
    }
}

/// Double `role` (xiu or pi) under the load of the run.
async fn double(c: &Arc<tokio::sync::Mutex<Cluster>>, role: &'static str, kill: Kill) {
    let mut g = c.lock().await;
    let n = g.status()["partition_num"][role].as_u64().unwrap() as u32;
    let dropped = r#"pixiu_messages_out_total{role="pi",stage="users_dropped"}"#;
    let pi_admins = |g: &Cluster| -> Vec<String> {
        g.nodes
            .iter()
            .filter(|(name, _)| name.starts_with("pi"))
            .map(|(_, node)| node.admin.clone())
            .collect()
    };
    let dropped_before = pixiu_tests::metric_sum(&pi_admins(&g), dropped).await;
    let mut names = Vec::new();
    for p in n..2 * n {
        for r in 0..2 {
            let name = format!("{role}-p{p}-{r}");
            g.spawn_store(&name, role, p, &[]);
            names.push((p, name));
        }
    }
    for (_, name) in &names {
        g.wait_healthy(name).await;
    }
    if kill == Kill::BeforeFlip {
        let parent = leader(&g, role);
        let children: Vec<String> = names
            .iter()
            .filter(|(p, _)| *p == n)
            .map(|(_, name)| name.clone())
            .collect();
        drop(g);
        kill_and_restart(c, &parent, false).await;
        g = c.lock().await;
        if role == "pi" {
            // the child of partition 0 notices its parent's new leader and copies it again
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            let recopied = "the parent's leader changed: copying its snapshot again";
            while !children
                .iter()
                .any(|name| g.node(name).proc.plain_log().contains(recopied))
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no child of pi partition 0 copied the new parent leader's snapshot\n{}",
                    g.logs()
                );
                drop(g);
                tokio::time::sleep(Duration::from_millis(100)).await;
                g = c.lock().await;
            }
        }
    }
    eprintln!("fault: scale-out {role} from {n} to {}", 2 * n);
    let tool = g.ctl_spawn(&["scale-out", role, "--timeout", "60"]);
    if kill == Kill::AfterFlip {
        let flipped = async {
            while g.status()["partition_num"][role].as_u64() != Some(u64::from(2 * n)) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), flipped)
            .await
            .expect("the flip");
        let parent = leader(&g, role);
        drop(g);
        kill_and_restart(c, &parent, false).await;
        g = c.lock().await;
    }
    let out = tokio::task::spawn_blocking(move || tool.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        g.logs()
    );
    // the new partitions carry traffic: stores in Xiu, appends in Pi
    let stage = if role == "xiu" { "stored" } else { "appended" };
    let query = format!("pixiu_messages_out_total{{role=\"{role}\",stage=\"{stage}\"}}");
    for p in n..2 * n {
        let admins: Vec<String> = names
            .iter()
            .filter(|(q, _)| *q == p)
            .map(|(_, name)| g.admin(name))
            .collect();
        let what = format!("{role} partition {p} {stage} messages");
        pixiu_tests::wait_metric_sum(&what, &admins, &query, 1.0, Duration::from_secs(30)).await;
    }
    if role == "pi" && kill == Kill::Never {
        // the parents drop the users they no longer own once the doubling is recorded done
        // (not checked after a kill: the killed leader may have dropped them, and its
        // counter died with it)
        let moved = (FIRST_UID..FIRST_UID + RECEIVERS)
            .filter(|uid| uid % u64::from(2 * n) >= u64::from(n))
            .count() as f64;
        let what = format!("pi parents drop their moved users ({n} -> {})", 2 * n);
        let want = dropped_before + moved;
        let admins = pi_admins(&g);
        pixiu_tests::wait_metric_sum(&what, &admins, dropped, want, Duration::from_secs(30)).await;
    }
}

async fn connect(
    urls: &[String],
    uid: u64,
    dev: &str,
    rng: &mut rand::rngs::StdRng,
) -> Option<Client> {
    let token = pixiu_protocol::auth::issue(SECRET.as_bytes(), uid, Some(dev), false, 3600);
    for _ in 0..urls.len() * 2 {
        let url = &urls[rng.gen_range(0..urls.len())];
        if let Ok(Ok(client)) = tokio::time::timeout(
            Duration::from_secs(2),
            Client::connect(url, &Auth::Token(token.clone())),
        )
        .await
        {
            return Some(client);
        }
    }
    None
}

async fn run(name: &str, faults: &[Fault]) -> Report {
    let c = cluster(name).await;
    let urls: Vec<String> = vec![c.url("gw0"), c.url("gw1")];
    let proxy = c.url("proxy0");
    let c = Arc::new(tokio::sync::Mutex::new(c));

    // receivers: every device connects once first (so the cluster knows it before any send)
    let logs: Arc<Mutex<HashMap<(u64, &'static str), DeviceLog>>> = Default::default();
    let churn = Arc::new(AtomicBool::new(true));
    let stop = Arc::new(AtomicBool::new(false));
    let known = Arc::new(AtomicUsize::new(0));
    let mut receivers = Vec::new();
    for uid in FIRST_UID..FIRST_UID + RECEIVERS {
        for dev in DEVICES {
            let (urls, logs, churn, stop, known) = (
                urls.clone(),
                logs.clone(),
                churn.clone(),
                stop.clone(),
                known.clone(),
            );
            receivers.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(uid * 7 + dev.len() as u64);
                let mut first = true;
                // bounded: at most one session per 100 ms for the whole run
                for _ in 0..10_000 {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Some(mut client) = connect(&urls, uid, dev, &mut rng).await else {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    };
                    if first {
                        // a ping round trip: the gateway has reported the device
                        let _ = client.ping().await;
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        known.fetch_add(1, Ordering::SeqCst);
                        first = false;
                    }
                    let session = Duration::from_millis(rng.gen_range(500..3000));
                    let end = tokio::time::Instant::now() + session;
                    loop {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let churning = churn.load(Ordering::SeqCst);
                        if churning && tokio::time::Instant::now() >= end {
                            break;
                        }
                        match tokio::time::timeout(Duration::from_millis(200), client.next_event())
                            .await
                        {
                            Ok(Some(ServerFrame::Inbox { id, body, .. })) => {
                                logs.lock()
                                    .unwrap()
                                    .entry((uid, dev))
                                    .or_default()
                                    .frames
                                    .push((id.0, body));
                                let _ = client.ack(id.0).await;
                            }
                            Ok(Some(_)) | Err(_) => {}
                            Ok(None) => break, // the gateway went away
                        }
                    }
                    // drop without a goodbye half of the time
                    if rng.gen_bool(0.5) {
                        client.close().await;
                    } else {
                        drop(client);
                    }
                    tokio::time::sleep(Duration::from_millis(rng.gen_range(0..300))).await;
                }
            }));
        }
    }
    let devices = (RECEIVERS as usize) * DEVICES.len();
    for _ in 0..600 {
        if known.load(Ordering::SeqCst) >= devices {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        known.load(Ordering::SeqCst),
        devices,
        "every device connected once"
    );

    // senders: each message to a random receiver, retried with the same sid until acknowledged
    let acked: Arc<Mutex<Vec<(u64, u64, String)>>> = Default::default();
    let refused = Arc::new(AtomicUsize::new(0));
    let progress = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let (acked, refused, progress, proxy) = (
            acked.clone(),
            refused.clone(),
            progress.clone(),
            proxy.clone(),
        );
        senders.push(tokio::spawn(async move {
            let token = pixiu_protocol::auth::issue(SECRET.as_bytes(), 0, None, true, 3600);
            let publisher = pixiu_client::Publisher::new(&proxy, Some(token));
            let mut rng = rand::rngs::StdRng::seed_from_u64(s);
            for i in 0..MESSAGES / SENDERS as usize {
                let uid = FIRST_UID + rng.gen_range(0..RECEIVERS);
                let sid = (s + 1) * 1_000_000 + i as u64;
                let body = format!("{s}/{i}");
                let mut ok = None;
                for _ in 0..12 {
                    match publisher.send_user(uid, &body, s, Some(sid)).await {
                        Ok(id) => {
                            ok = Some(id);
                            break;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
                    }
                }
                match ok {
                    Some(id) => acked.lock().unwrap().push((uid, id, body)),
                    None => {
                        refused.fetch_add(1, Ordering::SeqCst);
                    }
                }
                progress.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    // faults at even points of the run
    for (k, fault) in faults.iter().enumerate() {
        let at = MESSAGES * (k + 1) / (faults.len() + 1);
        for _ in 0..3000 {
            if progress.load(Ordering::SeqCst) >= at {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        inject(&c, *fault).await;
    }
    for s in senders {
        s.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    eprintln!(
        "{name}: {} acknowledged, {} refused",
        acked.len(),
        refused.load(Ordering::SeqCst)
    );

    // settle: no more churn; every device online until it has all of its inbox (bounded)
    churn.store(false, Ordering::SeqCst);
    let mut want: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for (uid, id, _) in &acked {
        want.entry(*uid).or_default().insert(*id);
    }
    // per receiver and device, the acknowledged ids it has not had
    let missing_ids = |logs: &HashMap<(u64, &'static str), DeviceLog>| {
        let mut gone = Vec::new();
        for uid in FIRST_UID..FIRST_UID + RECEIVERS {
            for dev in DEVICES {
                let got: BTreeSet<u64> = logs
                    .get(&(uid, dev))
                    .map(|l| l.frames.iter().map(|(id, _)| *id).collect())
                    .unwrap_or_default();
                let ids: Vec<u64> = want
                    .get(&uid)
                    .map(|w| w.difference(&got).copied().collect())
                    .unwrap_or_default();
                if !ids.is_empty() {
                    gone.push((uid, dev, ids));
                }
            }
        }
        gone
    };
    let missing = |logs: &HashMap<(u64, &'static str), DeviceLog>| -> usize {
        missing_ids(logs).iter().map(|(_, _, ids)| ids.len()).sum()
    };
    for _ in 0..1200 {
        if missing(&logs.lock().unwrap()) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for r in receivers {
        let _ = r.await;
    }

    // check
    let logs = std::mem::take(&mut *logs.lock().unwrap());
    let lost = missing(&logs);
    // which ones, to look for in the nodes' logs printed below (ids as partition:kind:counter)
    for (uid, dev, ids) in missing_ids(&logs) {
        let ids: Vec<String> = ids
            .iter()
            .map(|id| pixiu_protocol::inbox::MsgId(*id).to_string())
            .collect();
        eprintln!("{name}: lost for uid {uid} ({dev}): {}", ids.join(" "));
    }
    let mut body_of: HashMap<u64, String> = HashMap::new();
    let mut reused = 0;
    for (_, id, body) in &acked {
        if let Some(b) = body_of.insert(*id, body.clone()) {
            if &b != body {
                reused += 1;
            }
        }
    }
    let (mut reordered, mut duplicates, mut deliveries) = (0, 0, 0);
    for log in logs.values() {
        let mut seen = BTreeSet::new();
        let mut max = 0;
        for (id, body) in &log.frames {
            deliveries += 1;
            if let Some(b) = body_of.get(id) {
                if b != body {
                    reused += 1;
                }
            }
            if !seen.insert(*id) {
                duplicates += 1;
                continue;
            }
            if *id < max {
                reordered += 1;
            }
            max = max.max(*id);
        }
    }
    let report = Report {
        acked: acked.len(),
        refused: refused.load(Ordering::SeqCst),
        lost,
        reordered,
        reused,
        duplicates,
        deliveries,
    };
    eprintln!("{name}: {report:?}");
    if report.lost > 0 || report.reordered > 0 || report.reused > 0 {
        eprintln!("{}", c.lock().await.logs());
    }
    report
}

fn check(r: &Report) {
    assert!(
        r.acked > MESSAGES * 9 / 10,
        "most messages acknowledged: {r:?}"
    );
    assert_eq!(r.lost, 0, "acknowledged and never delivered: {r:?}");
    assert_eq!(r.reordered, 0, "{r:?}");
    assert_eq!(r.reused, 0, "{r:?}");
    // every acknowledged message reached both devices of its receiver, plus the repeats
    assert!(
        r.deliveries >= r.acked * DEVICES.len() + r.duplicates,
        "{r:?}"
    );
    assert!(r.refused + r.acked == MESSAGES, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_kill_xiu_leader() {
    check(&run("chk-xiu", &[Fault::XiuLeader]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_kill_pi_leader() {
    check(&run("chk-pi", &[Fault::PiLeader]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_kill_broker() {
    check(&run("chk-broker", &[Fault::Broker]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_kill_gateway() {
    check(&run("chk-gateway", &[Fault::Gateway]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_restart_every_role() {
    check(&run("chk-restart", &[Fault::RestartEveryRole]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_xiu_doubles_twice() {
    check(
        &run(
            "chk-xiu-double",
            &[Fault::Double("xiu"), Fault::Double("xiu")],
        )
        .await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_pi_doubles_twice() {
    check(&run("chk-pi-double", &[Fault::Double("pi"), Fault::Double("pi")]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_doubles_while_the_parent_leader_dies() {
    check(
        &run(
            "chk-double-kill",
            &[
                Fault::DoubleKillingParent("xiu"),
                Fault::DoubleKillingParent("pi"),
                Fault::DoubleKillingParentBeforeFlip("pi"),
            ],
        )
        .await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_all_faults() {
    check(
        &run(
            "chk-all",
            &[
                Fault::XiuLeader,
                Fault::PiLeader,
                Fault::Broker,
                Fault::Gateway,
                Fault::RestartEveryRole,
            ],
        )
        .await,
    );
}
