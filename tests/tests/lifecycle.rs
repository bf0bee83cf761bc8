//! Process lifecycle promises of every service binary: a bad configuration exits non-zero
//! with a one-line reason, and SIGTERM drains, deregisters from ZooKeeper and exits 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pixiu_tests::{assert_eventually, Cluster};
use std::process::Command;
use std::time::Duration;

fn bin(name: &str) -> std::path::PathBuf {
    pixiu_testkit::bin_path(name)
}

#[test]
fn bad_configuration_exits_with_a_one_line_reason() {
    let dir = pixiu_tests::TestDir::new("badcfg");
    let bad_toml = dir.path().join("bad.toml");
    std::fs::write(&bad_toml, "partition = \"three\"\n").unwrap();
    let unknown_toml = dir.path().join("unknown.toml");
    std::fs::write(&unknown_toml, "no_such_setting = 1\n").unwrap();
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("pixiu-router", vec![], "--zk"),
        ("pixiu-broker", vec!["--zk", "127.0.0.1:1"], "--tls-dir"),
        (
            "pixiu-broker",
            vec!["--zk", "127.0.0.1:1", "--listen", "0.0.0.0:7000"],
            "wildcard",
        ),
        (
            "pixiu-router",
            vec!["--config", bad_toml.to_str().unwrap()],
            "partition",
        ),
        (
            "pixiu-broker",
            vec!["--config", unknown_toml.to_str().unwrap()],
            "no_such_setting",
        ),
        (
            "pixiu-xiu",
            vec!["--config", unknown_toml.to_str().unwrap()],
            "no_such_setting",
        ),
        (
            "pixiu-pi",
            vec!["--config", bad_toml.to_str().unwrap()],
            "partition",
        ),
        (
            "pixiu-gateway",
            vec!["--config", "/nonexistent/pixiu.toml"],
            "/nonexistent/pixiu.toml",
        ),
        (
            "pixiu-proxy",
            vec!["--auth-secret-file", "/nonexistent/secret"],
            "/nonexistent/secret",
        ),
        (
            "pixiu-ctl",
            vec![
                "token",
                "--uid",
                "1",
                "--auth-secret-file",
                "/nonexistent/secret",
            ],
            "/nonexistent/secret",
        ),
    ];
    for (name, args, mention) in cases {
        let out = Command::new(bin(name))
            .args(&args)
            .env("RUST_LOG", "off")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name} {args:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(
            lines.len(),
            1,
            "{name} {args:?}: one line expected, got {stderr:?}"
        );
        assert!(
            lines[0].starts_with(&format!("{name}: ")),
            "{name}: {stderr}"
        );
        assert!(
            lines[0].contains(mention),
            "{name} {args:?}: {stderr} should mention {mention}"
        );
    }
    // a flag clap does not know is refused by clap itself, non-zero
    let out = Command::new(bin("pixiu-gateway"))
        .arg("--no-such-flag")
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// `--check-config` says "configuration ok" for settings the role would start with, connects
/// nowhere (the ZooKeeper address here has nothing behind it) and reads no named file, and
/// refuses what the role would refuse, with the same one-line reason and exit 2.
#[test]
fn check_config_accepts_what_would_start_and_refuses_what_would_not() {
    let dir = pixiu_tests::TestDir::new("checkcfg");
    let common = ["--zk", "127.0.0.1:1", "--tls-dir", "/nonexistent/tls"];
    let store = dir.path().join("store");
    let store = store.to_str().unwrap();
    let good: Vec<(&str, Vec<&str>)> = vec![
        ("pixiu-broker", vec!["--partition", "1"]),
        ("pixiu-router", vec!["--partition", "0"]),
        ("pixiu-xiu", vec!["--partition", "255", "--data-dir", store]),
        ("pixiu-pi", vec!["--data-dir", store]),
        (
            "pixiu-gateway",
            vec![
                "--auth-secret-file",
                "/nonexistent/secret",
                "--demo",
                "false",
            ],
        ),
        (
            "pixiu-proxy",
            vec!["--insecure-dev-auth", "--big-rooms", "1000..2000"],
        ),
    ];
    for (name, extra) in good {
        let out = Command::new(bin(name))
            .args(common)
            .args(&extra)
            .arg("--check-config")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name} {extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout.trim(), format!("{name}: configuration ok"));
    }
    assert!(!store_exists(&dir), "--check-config created the data dir");

    let bad: Vec<(&str, Vec<&str>, &str)> = vec![
        ("pixiu-broker", vec!["--tls-dir", "/t"], "--zk"),
        ("pixiu-router", vec!["--zk", "127.0.0.1:1"], "--tls-dir"),
        (
            "pixiu-broker",
            vec!["--zk", "z:1", "--tls-dir", "/t", "--listen", "0.0.0.0:7000"],
            "wildcard",
        ),
        (
            "pixiu-xiu",
            vec![
                "--zk",
                "z:1",
                "--tls-dir",
                "/t",
                "--partition",
                "256",
                "--data-dir",
                "/d",
            ],
            "256",
        ),
        (
            "pixiu-pi",
            vec!["--zk", "z:1", "--tls-dir", "/t"],
            "--data-dir",
        ),
        (
            "pixiu-gateway",
            vec!["--zk", "z:1", "--tls-dir", "/t"],
            "--auth-secret-file",
        ),
        (
            "pixiu-proxy",
            vec![
                "--zk",
                "z:1",
                "--tls-dir",
                "/t",
                "--insecure-dev-auth",
                "--big-rooms",
                "9..3",
            ],
            "9..3",
        ),
    ];
    // settings out of range are refused, not clamped
    let range = |file: &str, toml: &str| {
        let p = dir.path().join(file);
        std::fs::write(&p, toml).unwrap();
        p.to_str().unwrap().to_string()
    };
    let broker_poll = range("broker-poll.toml", "inbox_poll_ms = 5\n");
    let router_sweep = range("router-sweep.toml", "sweep_interval_ms = 0\n");
    let gateway_queue = range(
        "gateway-queue.toml",
        "insecure_dev_auth = true\nclient_queue = 1\n",
    );
    let gateway_fanout = range(
        "gateway-fanout.toml",
        "insecure_dev_auth = true\nfanout_interval_ms = 101\n",
    );
    let proxy_queues = range(
        "proxy-queues.toml",
        "insecure_dev_auth = true\nconvert_queues = 100\n",
    );
    let proxy_pending = range(
        "proxy-pending.toml",
        "insecure_dev_auth = true\ninbox_max_pending = 0\n",
    );
    let pi_maintenance = range(
        "pi-maintenance.toml",
        "data_dir = \"/d\"\nmaintenance_interval_ms = 1\n",
    );
    fn with(file: &str) -> Vec<&str> {
        vec!["--zk", "z:1", "--tls-dir", "/t", "--config", file]
    }
    let mut bad = bad;
    bad.extend([
        ("pixiu-broker", with(&broker_poll), "inbox_poll_ms = 5"),
        ("pixiu-router", with(&router_sweep), "sweep_interval_ms = 0"),
        ("pixiu-gateway", with(&gateway_queue), "client_queue = 1"),
        (
            "pixiu-gateway",
            with(&gateway_fanout),
            "fanout_interval_ms = 101",
        ),
        ("pixiu-proxy", with(&proxy_queues), "convert_queues = 100"),
        ("pixiu-proxy", with(&proxy_pending), "inbox_max_pending = 0"),
        (
            "pixiu-pi",
            with(&pi_maintenance),
            "maintenance_interval_ms = 1",
        ),
    ]);
    for (name, args, mention) in bad {
        let out = Command::new(bin(name))
            .args(&args)
            .arg("--check-config")
            .env_remove("PIXIU_ZK")
            .env_remove("PIXIU_AUTH_SECRET")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name} {args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{name}: {stderr}");
        assert!(
            stderr.contains(mention),
            "{name} {args:?}: {stderr} should mention {mention}"
        );
        assert!(
            out.stdout.is_empty(),
            "{name}: nothing on stdout when refused"
        );
    }
}

fn store_exists(dir: &pixiu_tests::TestDir) -> bool {
    dir.path().join("store").exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_deregisters() {
    let mut c = Cluster::start("sigterm", 1, 1).await;
    c.spawn_one_of_each().await;
    let count = |c: &Cluster, role: &str| {
        c.status()["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["role"] == role)
            .count()
    };
    for (name, role) in [
        ("gw", "gateway"),
        ("proxy", "proxy"),
        ("broker", "broker"),
        ("router", "router"),
        ("xiu", "xiu"),
        ("pi", "pi"),
    ] {
        assert_eq!(count(&c, role), 1, "{role} registered");
        c.node(name).proc.sigterm();
        let status = c
            .node(name)
            .proc
            .wait_exit(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{name} did not exit within 10 s of SIGTERM"));
        assert!(
            status.success(),
            "{name} exited with {status:?}\n{}",
            c.nodes[name].proc.log()
        );
        // the node is deleted at once, not after the session timeout
        assert_eventually(
            &format!("{role} deregistered"),
            Duration::from_secs(2),
            || {
                let n = count(&c, role);
                async move {
                    if n == 0 {
                        Ok(())
                    } else {
                        Err(format!("{n} {role} nodes left"))
                    }
                }
            },
        )
        .await;
        assert!(
            c.nodes[name].proc.log().contains("draining"),
            "{name} logged its drain"
        );
    }
}
