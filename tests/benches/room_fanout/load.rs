//! The load generator, the same for both systems: members that read their socket and time
//! every delivery, and a publisher paced to an offered rate. Only the wire differs: NATS's
//! text protocol (`MSG` lines) or WebSocket frames carrying PiXiu's JSON. Both readers parse
//! just enough to find the body (`r<run>:<ns since start>`), so the harness costs the same
//! per delivery whichever system it measures.

use pixiu_tests::raw_ws::{client_frame, connect_and_join, find, read_until};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;

/// Which protocol a member speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// NATS core: `SUB <subject>`, deliveries as `MSG` lines.
    Nats,
    /// PiXiu's client WebSocket: `join`, deliveries as `room` frames.
    Ws,
}

/// The room the publisher publishes into (NATS subject `room.42`).
pub const ROOM: u64 = 42;

/// What the members share with the driver: the clock the bodies are stamped against, and
/// which run is being measured.
pub struct Shared {
    pub start: Instant,
    run: AtomicU64,
    window_end_ns: AtomicU64,
    received: AtomicU64,
}

/// One member's measurements of the current run.
#[derive(Default)]
pub struct Stats {
    /// publish-to-delivery delays, µs
    pub delays_us: Vec<u32>,
    /// deliveries that arrived before the run's publishing ended
    pub in_window: u64,
}

impl Shared {
    pub fn new() -> Arc<Shared> {
        Arc::new(Shared {
            start: Instant::now(),
            run: AtomicU64::new(0),
            window_end_ns: AtomicU64::new(0),
            received: AtomicU64::new(0),
        })
    }

    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Measure run `run` from now on; its publishing ends `secs` from now.
    pub fn begin(&self, run: u64, secs: u64) {
        self.received.store(0, Ordering::SeqCst);
        self.window_end_ns
            .store(self.now_ns() + secs * 1_000_000_000, Ordering::SeqCst);
        self.run.store(run, Ordering::SeqCst);
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// A connected member, before its reader starts: the socket and what was read past the
/// subscription's confirmation.
pub struct Member {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// Connect member `uid` and subscribe it to `room` (NATS subject `room.<room>`); returns once
/// the server confirmed.
pub async fn connect(wire: Wire, addr: &str, uid: u64, room: u64) -> anyhow::Result<Member> {
    let (stream, buf) = match wire {
        Wire::Nats => {
            let mut stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let mut buf = Vec::new();
            let end = read_until(&mut stream, &mut buf, b"\r\n").await?;
            buf.drain(..end);
            let hello = format!(
                "CONNECT {{\"verbose\":false,\"pedantic\":false,\"echo\":false,\"name\":\"m{uid}\"}}\r\nSUB room.{room} 1\r\nPING\r\n"
            );
            stream.write_all(hello.as_bytes()).await?;
            let end = read_until(&mut stream, &mut buf, b"PONG\r\n").await?;
            buf.drain(..end);
            (stream, buf)
        }
        Wire::Ws => connect_and_join(addr, &format!("/v1/ws?uid={uid}&dev=bench"), room).await?,
    };
    Ok(Member { stream, buf })
}

/// `r<run>:<ns>` -> (run, ns).
fn parse_body(body: &[u8]) -> Option<(u64, u64)> {
    let body = std::str::from_utf8(body.strip_prefix(b"r")?).ok()?;
    let (run, ns) = body.split_once(':')?;
    Some((run.parse().ok()?, ns.parse().ok()?))
}

/// One parsed delivery or control item from a member's buffer.
enum Item<'a> {
    Body(&'a [u8]),
    /// the server pinged: answer with these bytes
    Answer(Vec<u8>),
    Other,
}

/// The next complete item in `buf` and its length, or `None` when more bytes are needed.
fn next_item(wire: Wire, buf: &[u8]) -> anyhow::Result<Option<(Item<'_>, usize)>> {
    match wire {
        Wire::Nats => {
            let Some(eol) = find(buf, b"\r\n") else {
                return Ok(None);
            };
            let line = &buf[..eol];
            if line.starts_with(b"MSG ") {
                let len: usize = std::str::from_utf8(line)?
                    .rsplit(' ')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| anyhow::anyhow!("bad MSG line"))?;
                let total = eol + 2 + len + 2;
                if buf.len() < total {
                    return Ok(None);
                }
                return Ok(Some((Item::Body(&buf[eol + 2..eol + 2 + len]), total)));
            }
            if line == b"PING" {
                return Ok(Some((Item::Answer(b"PONG\r\n".to_vec()), eol + 2)));
            }
            anyhow::ensure!(
                !line.starts_with(b"-ERR"),
                "nats: {}",
                String::from_utf8_lossy(line)
            );
            Ok(Some((Item::Other, eol + 2)))
        }
        Wire::Ws => {
            if buf.len() < 2 {
                return Ok(None);
            }
            let opcode = buf[0] & 0x0f;
            let (len, head) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 10 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&buf[2..10]);
                    (u64::from_be_bytes(b) as usize, 10)
                }
                126 | 127 => return Ok(None),
                n => (n as usize, 2),
            };
            if buf.len() < head + len {
                return Ok(None);
            }
            let payload = &buf[head..head + len];
            let item = match opcode {
                1 => {
                    let key = b"\"body\":\"";
                    match find(payload, key) {
                        Some(i) if payload.starts_with(b"{\"op\":\"room\"") => {
                            let rest = &payload[i + key.len()..];
                            let end = rest.iter().position(|&b| b == b'"').unwrap_or(0);
                            Item::Body(&rest[..end])
                        }
                        _ => Item::Other,
                    }
                }
                8 => anyhow::bail!("the gateway closed the connection"),
                9 => Item::Answer(client_frame(10, payload)),
                _ => Item::Other,
            };
            Ok(Some((item, head + len)))
        }
    }
}

/// Start reading a member: every delivery of the current run is timed into the returned
/// stats; ends when the socket closes (or fails to parse).
pub fn start_reader(wire: Wire, m: Member, shared: Arc<Shared>) -> Arc<Mutex<Stats>> {
    let stats = Arc::new(Mutex::new(Stats::default()));
    let out = stats.clone();
    tokio::spawn(async move {
        let (mut rd, mut wr) = m.stream.into_split();
        let mut buf = m.buf;
        let mut delays = Vec::new();
        loop {
            let mut at = 0;
            let now_ns = shared.now_ns();
            let run = shared.run.load(Ordering::Relaxed);
            let window_end = shared.window_end_ns.load(Ordering::Relaxed);
            let mut in_window = 0;
            loop {
                let (item, used) = match next_item(wire, &buf[at..]) {
                    Ok(Some(x)) => x,
                    Ok(None) => break,
                    Err(e) => {
                        eprintln!("member reader stops: {e}");
                        return;
                    }
                };
                match item {
                    Item::Body(body) => {
                        if let Some((r, sent)) = parse_body(body) {
                            if r == run && run != 0 {
                                delays.push((now_ns.saturating_sub(sent) / 1000) as u32);
                                in_window += u64::from(now_ns <= window_end);
                            }
                        }
                    }
                    Item::Answer(bytes) => {
                        if answer(&mut wr, &bytes).await.is_err() {
                            return;
                        }
                    }
                    Item::Other => {}
                }
                at += used;
            }
            buf.drain(..at);
            if !delays.is_empty() {
                shared
                    .received
                    .fetch_add(delays.len() as u64, Ordering::Relaxed);
                let mut s = stats.lock().unwrap();
                s.delays_us.append(&mut delays);
                s.in_window += in_window;
            }
            buf.reserve(16 * 1024);
            if !matches!(rd.read_buf(&mut buf).await, Ok(n) if n > 0) {
                return;
            }
        }
    });
    out
}

async fn answer(wr: &mut OwnedWriteHalf, bytes: &[u8]) -> std::io::Result<()> {
    wr.write_all(bytes).await
}

/// The publisher of one system.
pub enum Publisher {
    /// One NATS connection writing `PUB` commands.
    Nats(tokio::sync::Mutex<OwnedWriteHalf>),
    /// PiXiu's publisher HTTP API, requests pipelined over a kept-alive client.
    Http(Arc<pixiu_client::Publisher>),
}

impl Publisher {
    pub async fn nats(addr: &str) -> anyhow::Result<Publisher> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut buf = Vec::new();
        read_until(&mut stream, &mut buf, b"\r\n").await?;
        let hello =
            "CONNECT {\"verbose\":false,\"pedantic\":false,\"name\":\"publisher\"}\r\nPING\r\n";
        stream.write_all(hello.as_bytes()).await?;
        read_until(&mut stream, &mut buf, b"PONG\r\n").await?;
        let (mut rd, wr) = stream.into_split();
        // nothing is expected back; keep reading so the socket never fills
        tokio::spawn(async move {
            let mut sink = vec![0u8; 4096];
            while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        Ok(Publisher::Nats(tokio::sync::Mutex::new(wr)))
    }

    pub fn http(url: &str) -> Publisher {
        Publisher::Http(Arc::new(pixiu_client::Publisher::new(url, None)))
    }

    /// Publish `n` messages of run `run`, the i-th at `i / rate` after now (late ones go at
    /// once: the schedule is kept, not the gaps). Returns how many were accepted.
    pub async fn run(&self, shared: &Shared, run: u64, rate: u64, n: u64) -> u64 {
        let t0 = tokio::time::Instant::now();
        let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
        let in_flight = Arc::new(tokio::sync::Semaphore::new(256));
        let accepted = Arc::new(AtomicU64::new(0));
        for i in 0..n {
            tokio::time::sleep_until(t0 + interval * i as u32).await;
            let body = format!("r{run}:{}", shared.now_ns());
            match self {
                Publisher::Nats(wr) => {
                    let cmd = format!("PUB room.{ROOM} {}\r\n{body}\r\n", body.len());
                    if wr.lock().await.write_all(cmd.as_bytes()).await.is_ok() {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Publisher::Http(p) => {
                    let permit = in_flight.clone().acquire_owned().await.unwrap();
                    let (p, accepted) = (p.clone(), accepted.clone());
                    tokio::spawn(async move {
                        if p.publish_room(ROOM, &body, 0, None).await.is_ok() {
                            accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        drop(permit);
                    });
                }
            }
        }
        // every request answered (or failed)
        let _ = in_flight.acquire_many(256).await;
        accepted.load(Ordering::Relaxed)
    }
}
