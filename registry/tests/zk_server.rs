//! Throwaway ZooKeeper server for tests (self-contained: only `std` and `tempfile`).
//!
//! Starts Debian's ZooKeeper (`/usr/share/java/zookeeper.jar`) as a standalone server on a free
//! port with a temporary data dir, waits until it answers `ruok`, and kills it on drop. A watchdog
//! shell process also kills it if the test process dies without running `Drop`.
//!
//! [`TcpProxy`] sits between clients and the server and can cut the network ("the network
//! dropped"), which is how tests make a ZooKeeper session expire for real.
//!
//! Overrides: `PIXIU_ZK_CLASSPATH` (full Java classpath), `PIXIU_JAVA` (java binary).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const JAVA_DIR: &str = "/usr/share/java";
/// Jars the standalone server needs (Debian names, unversioned symlinks).
const JARS: &[&str] = &[
    "zookeeper.jar",
    "zookeeper-jute.jar",
    "slf4j-api.jar",
    "slf4j-nop.jar",
    "netty-handler.jar",
    "netty-common.jar",
    "netty-buffer.jar",
    "netty-transport.jar",
    "netty-codec.jar",
    "netty-resolver.jar",
    "netty-transport-native-epoll.jar",
    "netty-transport-native-unix-common.jar",
    "metrics-core.jar",
    "commons-cli.jar",
    "snappy-java.jar",
];
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct ZkServer {
    child: Child,
    watchdog: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

/// The Java classpath used to start the server.
pub fn classpath() -> String {
    if let Ok(cp) = std::env::var("PIXIU_ZK_CLASSPATH") {
        return cp;
    }
    JARS.iter()
        .map(|j| format!("{JAVA_DIR}/{j}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// Sends a four-letter word; returns the answer.
pub fn four_letter(port: u16, word: &str) -> Option<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(word.as_bytes()).ok()?;
    let mut out = String::new();
    stream.read_to_string(&mut out).ok()?;
    Some(out)
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(4000);
    text.get(start..).unwrap_or(&text).to_owned()
}

impl ZkServer {
    /// Starts a server and waits until it serves (panics with the server log otherwise).
    pub fn start() -> ZkServer {
        let dir = tempfile::Builder::new()
            .prefix("pixiu-zk-")
            .tempdir()
            .expect("create temp dir");
        let data_dir = dir.path().join("data");
        std::fs::create_dir_all(&data_dir).expect("create data dir");
        let log_path = dir.path().join("zookeeper.log");
        let mut last_err = String::new();
        // The free port can be taken between probing and binding: retry a few times.
        for _ in 0..3 {
            let port = free_port();
            let cfg_path = dir.path().join("zoo.cfg");
            let cfg = format!(
                "tickTime=500\ninitLimit=10\nsyncLimit=5\ndataDir={}\nclientPort={port}\nclientPortAddress=127.0.0.1\n\
                 admin.enableServer=false\n4lw.commands.whitelist=*\nmaxClientCnxns=0\n",
                data_dir.display()
            );
            std::fs::write(&cfg_path, cfg).expect("write zoo.cfg");
            let log = std::fs::File::create(&log_path).expect("create log file");
            let java = std::env::var("PIXIU_JAVA").unwrap_or_else(|_| "java".to_owned());
            let mut child = Command::new(&java)
                .args([
                    "-Xmx256m",
                    "-XX:+UseSerialGC",
                    "-XX:TieredStopAtLevel=1",
                    "-Dzookeeper.admin.enableServer=false",
                ])
                .arg("-cp")
                .arg(classpath())
                .arg("org.apache.zookeeper.server.ZooKeeperServerMain")
                .arg(&cfg_path)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone log handle"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {java}: {e}"));
            let deadline = Instant::now() + START_TIMEOUT;
            let mut ok = false;
            while Instant::now() < deadline {
                if let Ok(Some(status)) = child.try_wait() {
                    last_err = format!("zookeeper exited with {status}:\n{}", log_tail(&log_path));
                    break;
                }
                if four_letter(port, "ruok").as_deref() == Some("imok")
                    && four_letter(port, "srvr").is_some_and(|s| s.contains("Mode: standalone"))
                {
                    ok = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if ok {
                let watchdog = spawn_watchdog(child.id());
                return ZkServer {
                    child,
                    watchdog,
                    port,
                    dir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            if last_err.is_empty() {
                last_err = format!(
                    "zookeeper did not serve within {START_TIMEOUT:?}:\n{}",
                    log_tail(&log_path)
                );
            }
        }
        panic!("{last_err}");
    }

    /// `127.0.0.1:<port>`.
    pub fn connect_string(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("zookeeper.log")).unwrap_or_default()
    }
}

/// Kills `pid` once this test process is gone (covers aborts where `Drop` does not run).
fn spawn_watchdog(pid: u32) -> Option<Child> {
    let me = std::process::id();
    Command::new("sh")
        .arg("-c")
        .arg("while kill -0 \"$0\" 2>/dev/null; do sleep 1; done; kill -9 \"$1\" 2>/dev/null")
        .arg(me.to_string())
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}

impl Drop for ZkServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

/// A TCP forwarder (std threads only) whose traffic can be cut and restored.
///
/// While cut, every open connection is shut down and new connections are closed right after
/// being accepted, so the peer sees a dead network. ZooKeeper sessions of clients behind the proxy
/// expire once the cut lasts longer than their session timeout.
pub struct TcpProxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl TcpProxy {
    /// Forwards a fresh local port to `target` (`host:port`).
    pub fn start(target: &str) -> TcpProxy {
        let target: SocketAddr = target.parse().expect("proxy target must be ip:port");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy port");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("proxy addr");
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let (c, s, k) = (cut.clone(), stop.clone(), conns.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        if c.load(Ordering::SeqCst) {
                            drop(client);
                            continue;
                        }
                        let _ = client.set_nonblocking(false);
                        let Ok(server) =
                            TcpStream::connect_timeout(&target, Duration::from_secs(2))
                        else {
                            continue;
                        };
                        let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                            continue;
                        };
                        {
                            let mut conns = k.lock().unwrap_or_else(|e| e.into_inner());
                            conns.push(c2);
                            conns.push(s2);
                        }
                        pipe(client, server);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        TcpProxy {
            addr,
            cut,
            stop,
            conns,
        }
    }

    /// `127.0.0.1:<port>` of the proxy.
    pub fn connect_string(&self) -> String {
        self.addr.to_string()
    }

    /// Cuts the network: kills open connections and refuses new ones until [`Self::restore`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.kill_connections();
    }

    /// Lets traffic through again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    fn kill_connections(&self) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        for c in conns.drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

fn pipe(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    std::thread::spawn(move || copy(a, b2));
    std::thread::spawn(move || copy(b, a2));
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.kill_connections();
    }
}
