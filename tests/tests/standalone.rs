//! The README's run command, `pixiu-ctl standalone`, as a user runs it: a real process with its
//! own data dir. What it acknowledged survives a stop and a restart with the same `--data-dir`:
//! inbox messages, the id counter, and the auth secret (so tokens made before still work). A
//! start with another data dir has none of it, which is what shows the first part can fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pixiu_client::{Auth, Client, Publisher};
use pixiu_protocol::client::ServerFrame;
use pixiu_testkit::{bin_path, free_tcp_port, wait_healthy, Proc, TestDir};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

struct Standalone {
    proc: Proc,
    ws: String,
    http: String,
    admin: String,
}

fn spawn(dir: &TestDir, name: &str, data_dir: &Path) -> Standalone {
    let (ws, http, admin) = (free_tcp_port(), free_tcp_port(), free_tcp_port());
    let args: Vec<String> = [
        "standalone".to_string(),
        "--client-listen".into(),
        format!("127.0.0.1:{ws}"),
        "--http".into(),
        format!("127.0.0.1:{http}"),
        "--admin".into(),
        format!("127.0.0.1:{admin}"),
        "--data-dir".into(),
        data_dir.display().to_string(),
    ]
    .to_vec();
    let proc = Proc::spawn(name, &bin_path("pixiu-ctl"), &args, &[], dir.path()).unwrap();
    Standalone {
        proc,
        ws: format!("ws://127.0.0.1:{ws}/v1/ws"),
        http: format!("http://127.0.0.1:{http}"),
        admin: format!("127.0.0.1:{admin}"),
    }
}

impl Standalone {
    async fn ready(&self) {
        if let Err(e) = wait_healthy(&self.admin, Duration::from_secs(60)).await {
            panic!(
                "standalone not healthy: {e}\n--- log ---\n{}",
                self.proc.log()
            );
        }
    }

    fn stop(&mut self) {
        self.proc.sigterm();
        let status = self.proc.wait_exit(Duration::from_secs(20));
        assert!(
            status.is_some_and(|s| s.success()),
            "standalone did not stop cleanly on SIGTERM ({status:?})\n{}",
            self.proc.log()
        );
    }
}

/// Inbox frames on `client` until every id of `want` arrived (each acknowledged), or panics at
/// the deadline naming the missing ones.
async fn receive_all(client: &mut Client, want: &BTreeSet<u64>, within: Duration) {
    let deadline = Instant::now() + within;
    let mut got = BTreeSet::new();
    while !want.is_subset(&got) {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = tokio::time::timeout(left, client.next_event()).await;
        match frame {
            Ok(Some(ServerFrame::Inbox { id, .. })) => {
                got.insert(id.0);
                client.ack(id.0).await.unwrap();
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("the connection closed; got {got:?}"),
            Err(_) => panic!(
                "missing after {within:?}: {:?}",
                want.difference(&got).collect::<Vec<_>>()
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_keeps_what_it_acknowledged_across_a_restart() {
    let dir = TestDir::new("standalone-restart");
    let data = dir.sub("data");
    let mut first = spawn(&dir, "standalone-1", &data);
    first.ready().await;

    // tokens made from the secret the first run generated
    let secret = std::fs::read_to_string(data.join("auth-secret")).unwrap();
    let secret = secret.trim().as_bytes().to_vec();
    let publisher_token = pixiu_protocol::auth::issue(&secret, 0, None, true, 3600);
    let device_token = pixiu_protocol::auth::issue(&secret, 7, Some("phone"), false, 3600);

    // user 7 has been seen on "phone" once, then goes offline
    let device = Client::connect(&first.ws, &Auth::Token(device_token.clone()))
        .await
        .unwrap();
    device.ping().await.unwrap();
    device.close().await;

    let publisher = Publisher::new(&first.http, Some(publisher_token.clone()));
    let mut acked = BTreeSet::new();
    for i in 0..20u64 {
        let id = publisher
            .send_user(7, &format!("kept {i}"), 1, Some(1_000 + i))
            .await
            .unwrap();
        acked.insert(id);
    }
    assert_eq!(acked.len(), 20, "every acknowledged message has its own id");
    first.stop();

    // same data dir: the secret, the stored messages and the counter are all still there
    let mut second = spawn(&dir, "standalone-2", &data);
    second.ready().await;
    let mut device = Client::connect(&second.ws, &Auth::Token(device_token.clone()))
        .await
        .unwrap_or_else(|e| panic!("a token from before the restart was refused: {e}"));
    receive_all(&mut device, &acked, Duration::from_secs(30)).await;

    let publisher = Publisher::new(&second.http, Some(publisher_token.clone()));
    // a retry of an acknowledged sid answers the first id and stores nothing new
    let again = publisher
        .send_user(7, "kept 0", 1, Some(1_000))
        .await
        .unwrap();
    assert_eq!(Some(&again), acked.first(), "sid 1000 kept its id");
    let next = publisher.send_user(7, "after", 1, None).await.unwrap();
    let last = *acked.last().unwrap();
    assert!(
        next > last,
        "ids of one inbox only grow across a restart: {next} after {last}"
    );
    receive_all(
        &mut device,
        &BTreeSet::from([next]),
        Duration::from_secs(10),
    )
    .await;
    device.close().await;
    second.stop();

    // another data dir is another cluster: a new secret, so the old token is refused
    let mut other = spawn(&dir, "standalone-other", &dir.sub("other-data"));
    other.ready().await;
    let refused = Client::connect(&other.ws, &Auth::Token(device_token)).await;
    assert!(
        refused.is_err(),
        "a fresh data dir must not accept the old cluster's tokens"
    );
    other.stop();
}
