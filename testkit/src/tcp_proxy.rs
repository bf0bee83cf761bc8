//! [`TcpProxy`]: a TCP relay whose network a test can cut and restore.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;

/// A TCP relay a test can cut and restore to make a ZooKeeper session expire for real.
///
/// It listens on a fresh port of 127.0.0.1 and forwards every connection to a target (std
/// threads only, no runtime needed). [`TcpProxy::cut`] shuts down every open connection and
/// closes new ones right after accepting them, so the peers see a dead network;
/// [`TcpProxy::restore`] lets new connections through again. A ZooKeeper client that reaches
/// its server through the relay loses its session once a cut lasts longer than the session
/// timeout: the server expires it and deletes its ephemeral nodes, as after a real outage.
///
/// Dropping it stops accepting (the port is closed when `drop` returns) and shuts down every
/// open connection.
pub struct TcpProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    cut: AtomicBool,
    stop: AtomicBool,
    /// Both ends of every relayed connection, to shut them down on a cut.
    conns: Mutex<Vec<TcpStream>>,
}

impl Shared {
    fn conns(&self) -> std::sync::MutexGuard<'_, Vec<TcpStream>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn kill_connections(&self) {
        for c in self.conns().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl TcpProxy {
    /// Relays a fresh port of 127.0.0.1 to `target` (`ip:port`, e.g.
    /// [`crate::ZkServer::connect_string`]).
    pub fn start(target: &str) -> anyhow::Result<TcpProxy> {
        let target: SocketAddr = target
            .parse()
            .with_context(|| format!("proxy target {target:?} must be ip:port"))?;
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the proxy port")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            cut: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("tcp-proxy-{}", addr.port()))
                .spawn(move || accept_loop(listener, target, &shared))
                .context("starting the proxy thread")?
        };
        Ok(TcpProxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// `127.0.0.1:<port>` of the relay: what clients connect to instead of the target.
    pub fn connect_string(&self) -> String {
        self.addr.to_string()
    }

    /// Cuts the network: shuts down open connections and closes new ones until
    /// [`TcpProxy::restore`].
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        self.shared.kill_connections();
    }

    /// Lets new connections through again (connections cut stay dead).
    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        self.shared.kill_connections();
    }
}

fn accept_loop(listener: TcpListener, target: SocketAddr, shared: &Shared) {
    while !shared.stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(_) => {
                // WouldBlock (nothing to accept) or a transient error: poll again soon.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if shared.cut.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let _ = client.set_nonblocking(false);
        let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
            continue;
        };
        let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
            client.try_clone(),
            server.try_clone(),
            client.try_clone(),
            server.try_clone(),
        ) else {
            continue;
        };
        {
            let mut conns = shared.conns();
            conns.push(c2);
            conns.push(s2);
            // `cut` sets the flag before taking this lock: checking it again here, with the
            // connection registered, means a cut cannot miss a connection accepted meanwhile.
            if shared.cut.load(Ordering::SeqCst) {
                let _ = client.shutdown(Shutdown::Both);
                let _ = server.shutdown(Shutdown::Both);
                continue;
            }
        }
        std::thread::spawn(move || copy(client, s3));
        std::thread::spawn(move || copy(server, c3));
    }
}

/// Copies `from` to `to` until either side ends, then shuts both down.
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on 127.0.0.1 (runs until the test process ends).
    fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo server");
        let addr = listener.local_addr().expect("echo addr");
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                std::thread::spawn(move || {
                    if let Ok(back) = stream.try_clone() {
                        copy(stream, back);
                    }
                });
            }
        });
        addr
    }

    fn connect(proxy: &TcpProxy) -> std::io::Result<TcpStream> {
        let addr: SocketAddr = proxy.connect_string().parse().expect("proxy addr");
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(s)
    }

    /// Writes `msg` and reads as many bytes back.
    fn round_trip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(msg)?;
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back)?;
        Ok(back)
    }

    /// True if the connection is dead: refused, reset, or closed without an answer.
    fn is_dead(s: std::io::Result<TcpStream>) -> bool {
        let Ok(mut s) = s else { return true };
        // The write may still succeed (the peer closes later); the read must not get an echo.
        let _ = s.write_all(b"anyone?");
        let mut buf = [0u8; 16];
        match s.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }

    #[test]
    fn relays_cuts_and_restores() {
        let proxy = TcpProxy::start(&echo_server().to_string()).expect("proxy starts");
        assert!(proxy.connect_string().starts_with("127.0.0.1:"));

        let mut before = connect(&proxy).expect("connects");
        assert_eq!(round_trip(&mut before, b"hello").expect("echo"), b"hello");

        proxy.cut();
        // The open connection is shut down; new ones are closed at once.
        let mut buf = [0u8; 16];
        assert!(
            matches!(before.read(&mut buf), Ok(0) | Err(_)),
            "open connection survives the cut"
        );
        assert!(is_dead(connect(&proxy)), "new connection works while cut");

        proxy.restore();
        let mut after = connect(&proxy).expect("connects after restore");
        assert_eq!(round_trip(&mut after, b"again").expect("echo"), b"again");

        let addr = proxy.connect_string();
        drop(proxy);
        let mut buf = [0u8; 16];
        assert!(
            matches!(after.read(&mut buf), Ok(0) | Err(_)),
            "connection survives the drop"
        );
        assert!(
            TcpStream::connect(&addr).is_err(),
            "proxy port still open after drop"
        );
    }

    #[test]
    fn rejects_a_bad_target() {
        assert!(TcpProxy::start("not an address").is_err());
    }
}
