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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_deregisters() {
    let mut c = Cluster::start("sigterm", 1, 1).await;
    c.spawn_store("xiu", "xiu", 0, &["--min-insync", "0"]);
    c.spawn_store("pi", "pi", 0, &["--min-insync", "0"]);
    c.spawn_router("router", 0);
    c.spawn_broker("broker", 0);
    c.spawn_gateway("gw", &[]);
    c.spawn_proxy("proxy", &[]);
    c.wait_all_healthy().await;
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
