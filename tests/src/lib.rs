//! The end-to-end test harness: a [`Cluster`] starts a real ZooKeeper, initialises the layout
//! with `pixiu-ctl init` (which also writes the development CA and node certificate), and starts
//! real processes of the role binaries, each with its own data dir, log file and admin port.
//! Readiness is polled on `/healthz`; children are killed when the cluster is dropped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod http_load;
pub mod raw_ws;

use pixiu_client::{Auth, Client, Publisher};
pub use pixiu_testkit::{assert_eventually, metric, wait_healthy, Proc, TestDir, ZkServer};
use pixiu_testkit::{bin_path, free_tcp_port};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

pub const SECRET: &str = "pixiu-test-secret-0123456789";

/// A started role process.
pub struct Node {
    pub role: &'static str,
    pub proc: Proc,
    pub admin: String,
    /// gateway: ws://127.0.0.1:port/v1/ws; proxy: http://127.0.0.1:port
    pub url: Option<String>,
}

pub struct Cluster {
    pub zk: ZkServer,
    pub dir: TestDir,
    pub tls_dir: PathBuf,
    pub secret_file: PathBuf,
    pub nodes: BTreeMap<String, Node>,
    /// extra arguments given to every gateway and proxy (e.g. --big-rooms)
    pub extra_edge_args: Vec<String>,
    pub zk_session_timeout_ms: u64,
}

impl Cluster {
    /// ZooKeeper plus `pixiu-ctl init` of the layout.
    pub async fn start(name: &str, broker_partitions: u32, router_partitions: u32) -> Cluster {
        Cluster::start_layout(name, broker_partitions, router_partitions, 1, 1).await
    }

    /// ZooKeeper plus `pixiu-ctl init` with every partition count given.
    pub async fn start_layout(
        name: &str,
        broker_partitions: u32,
        router_partitions: u32,
        xiu_partitions: u32,
        pi_partitions: u32,
    ) -> Cluster {
        let dir = TestDir::new(name);
        let zk = ZkServer::start().expect("starting ZooKeeper");
        let tls_dir = dir.sub("tls");
        let secret_file = dir.path().join("auth-secret");
        std::fs::write(&secret_file, SECRET).unwrap();
        let c = Cluster {
            zk,
            dir,
            tls_dir,
            secret_file,
            nodes: BTreeMap::new(),
            extra_edge_args: Vec::new(),
            zk_session_timeout_ms: 4000,
        };
        let out = std::process::Command::new(bin_path("pixiu-ctl"))
            .args([
                "init",
                "--zk",
                &c.zk.connect_string(),
                "--cluster",
                "test",
                "--broker-partitions",
                &broker_partitions.to_string(),
                "--router-partitions",
                &router_partitions.to_string(),
                "--xiu-partitions",
                &xiu_partitions.to_string(),
                "--pi-partitions",
                &pi_partitions.to_string(),
                "--tls-dir",
                c.tls_dir.to_str().unwrap(),
            ])
            .output()
            .expect("running pixiu-ctl init");
        assert!(
            out.status.success(),
            "pixiu-ctl init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        c
    }

    fn common_args(&self, admin: &str) -> Vec<String> {
        vec![
            "--zk".into(),
            self.zk.connect_string(),
            "--cluster".into(),
            "test".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--admin".into(),
            admin.into(),
            "--tls-dir".into(),
            self.tls_dir.to_str().unwrap().into(),
            "--zk-session-timeout-ms".into(),
            self.zk_session_timeout_ms.to_string(),
        ]
    }

    fn spawn(
        &mut self,
        name: &str,
        role: &'static str,
        mut extra: Vec<String>,
        url: Option<String>,
    ) {
        let admin = format!("127.0.0.1:{}", free_tcp_port());
        let mut args = self.common_args(&admin);
        args.append(&mut extra);
        let proc = Proc::spawn(
            name,
            &bin_path(&format!("pixiu-{role}")),
            &args,
            &[],
            self.dir.path(),
        )
        .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        self.nodes.insert(
            name.to_string(),
            Node {
                role,
                proc,
                admin,
                url,
            },
        );
    }

    pub fn spawn_router(&mut self, name: &str, partition: u32) {
        let data = self.dir.sub(&format!("{name}-data"));
        self.spawn(
            name,
            "router",
            vec![
                "--partition".into(),
                partition.to_string(),
                "--data-dir".into(),
                data.to_str().unwrap().into(),
            ],
            None,
        );
    }

    pub fn spawn_broker(&mut self, name: &str, partition: u32) {
        self.spawn_broker_with(name, partition, &[]);
    }

    pub fn spawn_broker_with(&mut self, name: &str, partition: u32, extra: &[&str]) {
        let mut args = vec!["--partition".into(), partition.to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn(name, "broker", args, None);
    }

    /// A Xiu (`role` "xiu") or Pi (`role` "pi") replica. Its data dir is `<name>-data`, kept
    /// across restarts of the same name.
    pub fn spawn_store(&mut self, name: &str, role: &'static str, partition: u32, extra: &[&str]) {
        let data = self.dir.sub(&format!("{name}-data"));
        let mut args = vec![
            "--partition".into(),
            partition.to_string(),
            "--data-dir".into(),
            data.to_str().unwrap().into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn(name, role, args, None);
    }

    pub fn data_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}-data"))
    }

    /// Writes a TOML config file and returns `["--config", path]`.
    pub fn config_file(&self, name: &str, toml: &str) -> Vec<String> {
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, toml).unwrap();
        vec!["--config".into(), path.to_str().unwrap().into()]
    }

    pub fn spawn_gateway(&mut self, name: &str, extra: &[&str]) {
        let port = free_tcp_port();
        let mut args = vec![
            "--client-listen".into(),
            format!("127.0.0.1:{port}"),
            "--auth-secret-file".into(),
            self.secret_file.to_str().unwrap().into(),
        ];
        args.extend(self.extra_edge_args.iter().cloned());
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn(
            name,
            "gateway",
            args,
            Some(format!("ws://127.0.0.1:{port}/v1/ws")),
        );
    }

    pub fn spawn_proxy(&mut self, name: &str, extra: &[&str]) {
        let port = free_tcp_port();
        let mut args = vec![
            "--http".into(),
            format!("127.0.0.1:{port}"),
            "--auth-secret-file".into(),
            self.secret_file.to_str().unwrap().into(),
        ];
        args.extend(self.extra_edge_args.iter().cloned());
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn(
            name,
            "proxy",
            args,
            Some(format!("http://127.0.0.1:{port}")),
        );
    }

    /// One of every role, each store single (`--min-insync 0`), named `xiu`, `pi`, `router`,
    /// `broker`, `gw` and `proxy`, all waited for.
    pub async fn spawn_one_of_each(&mut self) {
        self.spawn_store("xiu", "xiu", 0, &["--min-insync", "0"]);
        self.spawn_store("pi", "pi", 0, &["--min-insync", "0"]);
        self.spawn_router("router", 0);
        self.spawn_broker("broker", 0);
        self.spawn_gateway("gw", &[]);
        self.spawn_proxy("proxy", &[]);
        self.wait_all_healthy().await;
    }

    pub fn node(&mut self, name: &str) -> &mut Node {
        self.nodes
            .get_mut(name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn admin(&self, name: &str) -> String {
        self.nodes[name].admin.clone()
    }

    pub fn url(&self, name: &str) -> String {
        self.nodes[name].url.clone().expect("node has a URL")
    }

    /// Wait until every node answers `/healthz` 200; on timeout print the logs of the
    /// ones that do not.
    pub async fn wait_all_healthy(&mut self) {
        for (name, n) in &self.nodes {
            if let Err(e) = wait_healthy(&n.admin, Duration::from_secs(30)).await {
                panic!("{name} not healthy: {e}\n--- log ---\n{}", n.proc.log());
            }
        }
        // A node that exited at start (e.g. its admin port was taken) must not pass because
        // something else answered on that port.
        for (name, n) in self.nodes.iter_mut() {
            if !n.proc.is_running() {
                panic!("{name} exited at start\n--- log ---\n{}", n.proc.log());
            }
        }
        // and every proxy can route to every broker replica (its registry view and heartbeats
        // lag the brokers' own readiness by a few milliseconds)
        self.wait_peers("proxy", "broker_routable", "broker").await;
        // and every gateway sees every proxy running (else a client `publish` is refused
        // "no running proxy" until its registry view catches up)
        self.wait_peers("gateway", "proxy_running", "proxy").await;
    }

    /// Waits until every node of `role` reports `pixiu_peers{kind}` of at least the number of
    /// `peer_role` nodes in this cluster.
    async fn wait_peers(&self, role: &str, kind: &str, peer_role: &str) {
        let want = self.nodes.values().filter(|n| n.role == peer_role).count() as f64;
        let query = format!("pixiu_peers{{kind=\"{kind}\"}}");
        for (name, n) in self.nodes.iter().filter(|(_, n)| n.role == role) {
            let (admin, query) = (&n.admin, &query);
            assert_eventually(
                &format!("{name} reaches every {peer_role} ({kind})"),
                Duration::from_secs(20),
                || async move {
                    let r = metric(admin, query).await.map_err(|e| e.to_string())?;
                    if r >= want {
                        Ok(())
                    } else {
                        Err(format!("{kind}: {r} of {want} {peer_role} nodes"))
                    }
                },
            )
            .await;
        }
    }

    pub async fn wait_healthy(&self, name: &str) {
        let n = &self.nodes[name];
        if let Err(e) = wait_healthy(&n.admin, Duration::from_secs(30)).await {
            panic!("{name} not healthy: {e}\n--- log ---\n{}", n.proc.log());
        }
    }

    pub fn client_token(&self, uid: u64, dev: &str) -> String {
        pixiu_protocol::auth::issue(SECRET.as_bytes(), uid, Some(dev), false, 3600)
    }

    pub fn publisher(&self, proxy: &str) -> Publisher {
        let token = pixiu_protocol::auth::issue(SECRET.as_bytes(), 0, None, true, 3600);
        Publisher::new(&self.url(proxy), Some(token))
    }

    /// One lean keep-alive HTTP/1.1 connection to `proxy` with a publisher token (load
    /// generators).
    pub async fn http_conn(&self, proxy: &str) -> http_load::HttpConn {
        let token = pixiu_protocol::auth::issue(SECRET.as_bytes(), 0, None, true, 3600);
        http_load::HttpConn::connect(&self.url(proxy), &token)
            .await
            .unwrap_or_else(|e| panic!("connecting to {proxy}: {e:#}"))
    }

    pub async fn client(&self, gateway: &str, uid: u64) -> Client {
        self.device(gateway, uid, "test").await
    }

    pub async fn device(&self, gateway: &str, uid: u64, dev: &str) -> Client {
        let auth = Auth::Token(self.client_token(uid, dev));
        Client::connect(&self.url(gateway), &auth)
            .await
            .unwrap_or_else(|e| panic!("connecting uid {uid} to {gateway}: {e}"))
    }

    /// `pixiu-ctl ARGS --zk .. --cluster test`, waited for.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(bin_path("pixiu-ctl"))
            .args(args)
            .args(["--zk", &self.zk.connect_string(), "--cluster", "test"])
            .output()
            .expect("running pixiu-ctl")
    }

    /// [`Cluster::ctl`], failing the test (with the tool's stderr and the cluster's logs) unless
    /// the tool exited 0.
    pub fn ctl_ok(&self, args: &[&str]) -> std::process::Output {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "pixiu-ctl {}: {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        out
    }

    /// `pixiu-ctl ARGS --zk .. --cluster test` started in the background (stderr piped), for
    /// a test that acts while the tool waits.
    pub fn ctl_spawn(&self, args: &[&str]) -> std::process::Child {
        std::process::Command::new(bin_path("pixiu-ctl"))
            .args(args)
            .args(["--zk", &self.zk.connect_string(), "--cluster", "test"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting pixiu-ctl")
    }

    /// `pixiu-ctl status --json`
    pub fn status(&self) -> serde_json::Value {
        let out = std::process::Command::new(bin_path("pixiu-ctl"))
            .args([
                "status",
                "--json",
                "--zk",
                &self.zk.connect_string(),
                "--cluster",
                "test",
            ])
            .output()
            .expect("running pixiu-ctl status");
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// Logs of every node, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for (name, n) in &self.nodes {
            let log = n.proc.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            s.push_str(&format!("--- {name} (last 40 lines) ---\n"));
            for l in tail.into_iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }
}

/// Collect room events from a client until none arrives for `quiet`.
pub async fn drain_events(
    c: &mut Client,
    quiet: Duration,
) -> Vec<pixiu_protocol::client::ServerFrame> {
    let mut out = Vec::new();
    while let Ok(Some(ev)) = tokio::time::timeout(quiet, c.next_event()).await {
        out.push(ev);
    }
    out
}

/// The sum of the metric `query` (name with labels) over the nodes whose admin addresses are
/// `admins`; a node that does not answer counts 0 (it may be down on purpose).
pub async fn metric_sum(admins: &[String], query: &str) -> f64 {
    let mut sum = 0.0;
    for admin in admins {
        sum += metric(admin, query).await.unwrap_or(0.0);
    }
    sum
}

/// Waits until [`metric_sum`] of `query` over `admins` reaches `want`; panics with `what` and
/// the last sum after `timeout`.
pub async fn wait_metric_sum(
    what: &str,
    admins: &[String],
    query: &str,
    want: f64,
    timeout: Duration,
) {
    assert_eventually(what, timeout, || async move {
        let sum = metric_sum(admins, query).await;
        (sum >= want)
            .then_some(())
            .ok_or(format!("{sum} of {want}"))
    })
    .await;
}
