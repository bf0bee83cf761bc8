//! Helpers for PiXiu's tests that start real processes: a throwaway ZooKeeper
//! ([`ZkServer`]) and a TCP relay that can cut the network to it ([`TcpProxy`]), our own
//! binaries as child processes that die with the test ([`Proc`], [`bin_path`]), free ports, a test folder kept for post-mortem when the test fails
//! ([`TestDir`]), polling helpers for `/healthz`, `/metrics` and eventual assertions, and a
//! headless Chromium driven over the DevTools protocol ([`browser`]).
//!
//! Every child is killed (SIGKILL) and reaped when its handle is dropped, so a failing test
//! leaves no processes behind, and every child logs to a file whose contents a failure message
//! can include.

use std::fs::OpenOptions;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub mod browser;
mod tcp_proxy;
pub use tcp_proxy::TcpProxy;

/// A TCP port on 127.0.0.1 that was free a moment ago (and free for UDP too).
///
/// Ports come from [`port_range`], below the kernel's ephemeral range, and each is handed
/// out once per test process. Asking the kernel for port 0 instead would race: the port is
/// released before the child binds it, and in between it can go to an outgoing connection
/// (every ZooKeeper session and WebSocket client takes an ephemeral port) or to the next
/// `bind(0)` of a test running alongside. That race once failed CI ("cannot serve admin on
/// 127.0.0.1:39267: Address already in use", while another test's node answered there).
pub fn free_tcp_port() -> u16 {
    free_port()
}

/// A UDP port on 127.0.0.1 that was free a moment ago (and free for TCP too); see
/// [`free_tcp_port`].
pub fn free_udp_port() -> u16 {
    free_port()
}

/// The ports [`free_tcp_port`] hands out: `[low, high)`, outside the kernel's ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`, Linux default 32768-60999).
pub fn port_range() -> (u16, u16) {
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    if ephemeral.0 >= 12_000 {
        (10_000, ephemeral.0)
    } else if ephemeral.1 <= 63_000 {
        (ephemeral.1 + 1, 65_535)
    } else {
        // The ephemeral range covers nearly everything; share it and rely on the bind check.
        (10_000, 65_535)
    }
}

fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;
    // Handed out in order from an offset that differs per process, so a test process that
    // starts while an earlier one's children are still exiting is unlikely to meet them.
    static START: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, high) = port_range();
    let span = u32::from(high - low);
    let start = *START.get_or_init(|| std::process::id().wrapping_mul(7919) % span);
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = low + ((start + n) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 in {low}..{high}");
}

/// The workspace binary `name` (e.g. `pixiu-gateway`), built by cargo next to the test
/// executable: a test runs as `target/<profile>/deps/<test>-<hash>`, binaries live in
/// `target/<profile>/`.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let mut dir = exe
        .parent()
        .expect("the test executable is in a folder")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if !path.is_file() {
        panic!(
            "{} not found: build the binaries first: cargo build --workspace --bins",
            path.display()
        );
    }
    path
}

/// `text` without its terminal escape sequences (`ESC [ ... letter`).
pub fn strip_colours(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

/// A folder for one test's files and logs. Deleted when dropped, unless the test is
/// panicking: then it is kept and its path printed, so the logs can be read.
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    /// A new folder in the system's temp folder, named after `name`.
    pub fn new(name: &str) -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("pixiu-{name}-"))
            .tempdir()
            .expect("creating a temporary folder");
        let path = dir.path().to_path_buf();
        TestDir {
            dir: Some(dir),
            path,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `<dir>/<name>`, created if missing.
    pub fn sub(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::create_dir_all(&p).expect("creating a folder in the test folder");
        p
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                let kept = dir.keep();
                eprintln!("test failed; its files are kept in {}", kept.display());
            }
        }
    }
}

/// Sends `signal` (as `kill -s` names it: TERM, STOP, CONT..) to `pid`. Uses the `kill`
/// program because the workspace forbids `unsafe` (and so `libc::kill`).
fn signal(pid: u32, signal: &str) {
    match Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .stderr(Stdio::null())
        .status()
    {
        Ok(status) if status.success() => {}
        Ok(status) => eprintln!("kill -s {signal} {pid}: {status}"),
        Err(e) => eprintln!("kill -s {signal} {pid}: {e}"),
    }
}

/// A child process of ours, killed (SIGKILL) and reaped when dropped. Its stdout and stderr
/// are appended to `<log_dir>/<name>.log`.
pub struct Proc {
    name: String,
    bin: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log_path: PathBuf,
    child: Child,
}

fn spawn_child(
    name: &str,
    bin: &Path,
    args: &[String],
    env: &[(String, String)],
    log_path: &Path,
) -> anyhow::Result<Child> {
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    writeln!(log, "=== {name}: {} {}", bin.display(), args.join(" "))?;
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if std::env::var_os("RUST_LOG").is_none() && !env.iter().any(|(k, _)| k == "RUST_LOG") {
        cmd.env("RUST_LOG", "info");
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd.spawn()
        .with_context(|| format!("starting {name} ({})", bin.display()))
}

impl Proc {
    pub fn spawn(
        name: &str,
        bin: &Path,
        args: &[String],
        env: &[(String, String)],
        log_dir: &Path,
    ) -> anyhow::Result<Proc> {
        let log_path = log_dir.join(format!("{name}.log"));
        let child = spawn_child(name, bin, args, env, &log_path)?;
        Ok(Proc {
            name: name.to_string(),
            bin: bin.to_path_buf(),
            args: args.to_vec(),
            env: env.to_vec(),
            log_path,
            child,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// SIGKILL and reap. Nothing happens if it has already exited.
    pub fn kill9(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    pub fn sigterm(&self) {
        signal(self.pid(), "TERM");
    }

    pub fn sigstop(&self) {
        signal(self.pid(), "STOP");
    }

    pub fn sigcont(&self) {
        signal(self.pid(), "CONT");
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => return None,
                Err(e) => {
                    eprintln!("waiting for {}: {e}", self.name);
                    return None;
                }
            }
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Everything in its log file (all runs, for [`Proc::respawn`] appends).
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.log_path.display()))
    }

    /// [`Proc::log`] without terminal colours, for matching what a line says.
    pub fn plain_log(&self) -> String {
        strip_colours(&self.log())
    }

    /// Starts the same command line again, killing the old process first if it still runs.
    pub fn respawn(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.child = spawn_child(&self.name, &self.bin, &self.args, &self.env, &self.log_path)?;
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The classpath for Debian's `zookeeper` package: `zookeeper.jar` names its dependencies in
/// its manifest; `slf4j-jdk14.jar` makes it log (to stderr). `PIXIU_ZK_CLASSPATH` overrides.
fn zk_classpath() -> String {
    std::env::var("PIXIU_ZK_CLASSPATH").unwrap_or_else(|_| {
        "/usr/share/java/zookeeper.jar:/usr/share/java/slf4j-jdk14.jar".to_string()
    })
}

/// Sends a four-letter-word command and returns the answer.
fn four_letter(port: u16, cmd: &str) -> std::io::Result<String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.set_write_timeout(Some(Duration::from_secs(1)))?;
    s.write_all(cmd.as_bytes())?;
    let _ = s.shutdown(Shutdown::Write);
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer)
}

/// A throwaway standalone ZooKeeper on 127.0.0.1 (Debian's `zookeeper` package), killed when
/// dropped. Its data and `zookeeper.log` live in its own [`TestDir`] (kept if the test fails).
pub struct ZkServer {
    dir: TestDir,
    port: u16,
    child: Option<Child>,
}

impl ZkServer {
    /// Starts ZooKeeper on a free port and waits (up to 30 s) until it answers `ruok`.
    pub fn start() -> anyhow::Result<ZkServer> {
        let dir = TestDir::new("zk");
        let port = free_tcp_port();
        let data = dir.sub("data");
        let cfg = format!(
            "tickTime=500\ndataDir={}\nclientPort={port}\nclientPortAddress=127.0.0.1\n\
             admin.enableServer=false\n4lw.commands.whitelist=*\nmaxSessionTimeout=60000\n",
            data.display()
        );
        std::fs::write(dir.path().join("zoo.cfg"), cfg)?;
        let mut zk = ZkServer {
            dir,
            port,
            child: None,
        };
        zk.launch()?;
        Ok(zk)
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let log_path = self.dir.path().join("zookeeper.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let child = Command::new("java")
            // Small and quick to start: tests may run several at once.
            .args(["-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"])
            .arg("-cp")
            .arg(zk_classpath())
            .arg("org.apache.zookeeper.server.ZooKeeperServerMain")
            .arg(self.dir.path().join("zoo.cfg"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting ZooKeeper with `java` (is the zookeeper package installed?)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(answer) = four_letter(self.port, "ruok") {
                if answer.trim() == "imok" {
                    return Ok(());
                }
            }
            let exited = match self.child.as_mut() {
                Some(c) => c.try_wait()?,
                None => None,
            };
            if let Some(status) = exited {
                self.child = None;
                bail!(
                    "ZooKeeper exited ({status}) before answering ruok; log:\n{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                self.stop();
                bail!(
                    "ZooKeeper on 127.0.0.1:{} did not answer ruok in 30 s; log:\n{}",
                    self.port,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `127.0.0.1:<port>`.
    pub fn connect_string(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its data, config and log folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        std::fs::read(self.dir.path().join("zookeeper.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills it (SIGKILL) and reaps it: an outage, as clients see it. Data stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops it if running and starts it again on the same port with the same data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.launch()
    }
}

impl Drop for ZkServer {
    fn drop(&mut self) {
        // A failing test whose ZooKeeper died under it (not stopped by the test itself) says
        // so: every node then reports "connection lost", and the cause is not in their logs.
        if std::thread::panicking() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                eprintln!(
                    "ZooKeeper on 127.0.0.1:{} had exited before the test ended ({status}), \
                     and the test did not stop it",
                    self.port
                );
            }
        }
        self.stop();
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

/// Polls `GET http://<admin_addr>/healthz` every 50 ms until it answers 200.
pub async fn wait_healthy(admin_addr: &str, timeout: Duration) -> anyhow::Result<()> {
    let http = http_client();
    let url = format!("http://{admin_addr}/healthz");
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last;
    loop {
        match http.get(&url).send().await {
            Ok(resp) if resp.status().as_u16() == 200 => return Ok(()),
            Ok(resp) => last = format!("HTTP {}", resp.status()),
            Err(e) => last = e.to_string(),
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("{admin_addr} not healthy after {timeout:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `(name, labels)` of a Prometheus series like `name{a="1",b="x"}`.
fn parse_series(series: &str) -> (&str, Vec<(String, String)>) {
    let Some(open) = series.find('{') else {
        return (series, Vec::new());
    };
    let name = &series[..open];
    let inner = series[open + 1..].trim_end_matches('}');
    let mut labels = Vec::new();
    let mut chars = inner.chars().peekable();
    loop {
        let key: String = chars
            .by_ref()
            .take_while(|c| *c != '=')
            .collect::<String>()
            .trim_matches(|c: char| c == ',' || c.is_whitespace())
            .to_string();
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('"') {
            break;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.push((key, value));
    }
    (name, labels)
}

/// Splits a sample line into its series and value.
fn split_sample(line: &str) -> Option<(&str, f64)> {
    let (series, rest) = match line.rfind('}') {
        Some(close) if line.contains('{') => (&line[..=close], &line[close + 1..]),
        _ => line.split_once(char::is_whitespace)?,
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((series.trim(), value))
}

/// The value of `query` in Prometheus text `text`: with labels (`name{a="1"}`), the first
/// series of that name having those labels (among possibly others); a bare name sums every
/// series of exactly that name. 0.0 if absent.
pub fn metric_value(text: &str, query: &str) -> f64 {
    let (qname, qlabels) = parse_series(query.trim());
    let mut sum = 0.0;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = split_sample(line) else {
            continue;
        };
        let (name, labels) = parse_series(series);
        if name != qname || !qlabels.iter().all(|l| labels.contains(l)) {
            continue;
        }
        if query.contains('{') {
            return value;
        }
        sum += value;
    }
    sum
}

/// `GET http://<admin_addr>/metrics` and [`metric_value`] of `name_with_labels`.
pub async fn metric(admin_addr: &str, name_with_labels: &str) -> anyhow::Result<f64> {
    let url = format!("http://{admin_addr}/metrics");
    let resp = http_client()
        .get(&url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    let text = resp.text().await.with_context(|| format!("GET {url}"))?;
    if !status.is_success() {
        bail!("GET {url}: HTTP {status}: {text}");
    }
    Ok(metric_value(&text, name_with_labels))
}

/// Retries `f` every 50 ms until it returns `Ok`; panics with `what` and the last error
/// once `timeout` has passed (an attempt still running at the deadline is abandoned).
pub async fn assert_eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::from("never tried");
    loop {
        match tokio::time::timeout_at(deadline, f()).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => last = e,
            Err(_) => {
                last = format!("an attempt was still running at the deadline; before: {last}")
            }
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("{what}: not true after {timeout:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn free_ports_are_bindable() {
        let t = free_tcp_port();
        assert_ne!(t, 0);
        TcpListener::bind(("127.0.0.1", t)).expect("free TCP port binds");
        let u = free_udp_port();
        assert_ne!(u, 0);
        UdpSocket::bind(("127.0.0.1", u)).expect("free UDP port binds");
    }

    #[test]
    fn free_ports_are_outside_the_ephemeral_range_and_never_repeat() {
        let (low, high) = port_range();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let p = free_tcp_port();
            assert!((low..high).contains(&p), "{p} outside {low}..{high}");
            assert!(seen.insert(p), "{p} handed out twice");
        }
    }

    #[tokio::test]
    async fn eventually_succeeds() {
        let tries = AtomicU32::new(0);
        assert_eventually("third try", Duration::from_secs(5), || {
            let n = tries.fetch_add(1, Ordering::SeqCst);
            async move {
                if n >= 2 {
                    Ok(())
                } else {
                    Err(format!("try {n}"))
                }
            }
        })
        .await;
        assert_eq!(tries.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    #[should_panic(expected = "never true: not true after")]
    async fn eventually_panics_at_deadline() {
        assert_eventually("never true", Duration::from_millis(200), || async {
            Err("still false".to_string())
        })
        .await;
    }

    #[tokio::test]
    #[should_panic(expected = "still false")]
    async fn eventually_reports_last_error() {
        assert_eventually("never true", Duration::from_millis(200), || async {
            Err("still false".to_string())
        })
        .await;
    }

    #[test]
    fn reads_metrics() {
        let text = "# HELP x_total things\n# TYPE x_total counter\n\
                    x_total{role=\"gw\",kind=\"a\"} 3\nx_total{kind=\"b\",role=\"gw\"} 4\n\
                    x_total_more 100\ny 1.5e3\nz{path=\"a b,c\\\"d\"} 7 1700000000000\n";
        assert_eq!(metric_value(text, "x_total"), 7.0);
        assert_eq!(metric_value(text, "x_total{role=\"gw\"}"), 3.0);
        assert_eq!(metric_value(text, "x_total{kind=\"b\"}"), 4.0);
        assert_eq!(metric_value(text, "x_total{role=\"gw\",kind=\"b\"}"), 4.0);
        assert_eq!(metric_value(text, "x_total{role=\"gw2\"}"), 0.0);
        assert_eq!(metric_value(text, "y"), 1500.0);
        assert_eq!(metric_value(text, "z{path=\"a b,c\\\"d\"}"), 7.0);
        assert_eq!(metric_value(text, "absent"), 0.0);
    }

    #[test]
    fn test_dir_is_removed_when_fine() {
        let dir = TestDir::new("ok");
        let sub = dir.sub("logs");
        assert!(sub.is_dir());
        let path = dir.path().to_path_buf();
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn test_dir_is_kept_on_panic() {
        let path = std::sync::Mutex::new(PathBuf::new());
        let result = std::panic::catch_unwind(|| {
            let dir = TestDir::new("kept");
            *path.lock().expect("lock") = dir.path().to_path_buf();
            panic!("boom");
        });
        assert!(result.is_err());
        let path = path.lock().expect("lock").clone();
        assert!(path.is_dir());
        std::fs::remove_dir_all(&path).expect("clean up");
    }

    #[test]
    fn proc_spawn_kill9_wait() {
        let dir = TestDir::new("proc");
        let mut p = Proc::spawn(
            "sleeper",
            Path::new("/bin/sleep"),
            &["30".to_string()],
            &[],
            dir.path(),
        )
        .expect("spawn");
        assert!(p.pid() > 0);
        assert!(p.is_running());
        assert!(p.wait_exit(Duration::from_millis(100)).is_none());
        p.sigstop();
        p.sigcont();
        assert!(p.is_running());
        p.kill9();
        let status = p.wait_exit(Duration::from_secs(5)).expect("exited");
        assert!(!status.success());
        assert!(!p.is_running());
        assert!(
            p.log().contains("=== sleeper: /bin/sleep 30"),
            "{}",
            p.log()
        );
        p.respawn().expect("respawn");
        assert!(p.is_running());
        p.sigterm();
        let status = p
            .wait_exit(Duration::from_secs(5))
            .expect("exited on SIGTERM");
        assert!(!status.success());
    }

    #[test]
    fn proc_sets_rust_log() {
        let dir = TestDir::new("env");
        let mut p = Proc::spawn(
            "env",
            Path::new("/bin/sh"),
            &[
                "-c".to_string(),
                "echo \"RUST_LOG=$RUST_LOG X=$X\"".to_string(),
            ],
            &[("X".to_string(), "y".to_string())],
            dir.path(),
        )
        .expect("spawn");
        assert!(p
            .wait_exit(Duration::from_secs(5))
            .expect("exits")
            .success());
        let expected = match std::env::var("RUST_LOG") {
            Ok(v) => format!("RUST_LOG={v} X=y"),
            Err(_) => "RUST_LOG=info X=y".to_string(),
        };
        assert!(p.log().contains(&expected), "{}", p.log());
    }

    #[test]
    fn bin_path_looks_next_to_the_test() {
        let exe = std::env::current_exe().expect("exe");
        let name = exe
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        // The test executable itself is in deps/, not next to it: a missing binary panics.
        let missing = std::panic::catch_unwind(|| bin_path("pixiu-no-such-binary"));
        let msg = missing
            .err()
            .and_then(|e| e.downcast_ref::<String>().cloned())
            .expect("panics with a message");
        assert!(msg.contains("cargo build --workspace --bins"), "{msg}");
        assert!(!name.is_empty());
    }

    #[test]
    fn zookeeper_starts_answers_and_restarts() {
        let started = Instant::now();
        let mut zk = ZkServer::start().expect("ZooKeeper starts");
        eprintln!("ZooKeeper ready in {:?}", started.elapsed());
        assert_eq!(zk.connect_string(), format!("127.0.0.1:{}", zk.port()));
        assert_eq!(four_letter(zk.port(), "ruok").expect("ruok"), "imok");
        zk.stop();
        assert!(four_letter(zk.port(), "ruok").is_err());
        zk.restart().expect("restarts");
        assert_eq!(four_letter(zk.port(), "ruok").expect("ruok"), "imok");
        assert!(zk.log().contains("binding to port"), "{}", zk.log());
        let dir = zk.dir().to_path_buf();
        drop(zk);
        assert!(!dir.exists());
    }
}
