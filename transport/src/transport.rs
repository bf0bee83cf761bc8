//! The QUIC endpoint, per-peer outbound queues and inbound reader tasks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::{Connection, ConnectionError, Endpoint, EndpointConfig, SendStream, VarInt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::stats::{inc, Counters, TransportStats};
use crate::tls::SERVER_NAME;
use crate::{TlsMaterial, TransportError};

/// Socket and QUIC datagram buffer sizes.
const BUFFER_SIZE: usize = 8 * 1024 * 1024;
/// Deadline of one outgoing connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Deadline of an incoming handshake.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);
/// First and largest delay before retrying a peer whose connection attempt failed.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long `close` waits for connections to drain.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// Application error codes.
const CODE_SHUTDOWN: u32 = 0;
const CODE_NO_REPLY: u32 = 1;
const CODE_TOO_LARGE: u32 = 2;
const CODE_ABANDONED: u32 = 3;

/// Settings of a [`Transport`].
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// UDP address to bind; port 0 picks a free port (see [`Transport::local_addr`]).
    pub listen: SocketAddr,
    /// Cluster CA and this node's certificate.
    pub tls: TlsMaterial,
    /// Bound of the inbound channel (default 65536).
    pub inbound_capacity: usize,
    /// Bound of each per-peer outbound queue (default 16384).
    pub peer_queue: usize,
    /// Largest message accepted or sent (default 1 MiB).
    pub max_message: usize,
}

impl TransportConfig {
    /// A configuration with default capacities.
    pub fn new(listen: SocketAddr, tls: TlsMaterial) -> Self {
        TransportConfig {
            listen,
            tls,
            inbound_capacity: 65536,
            peer_queue: 16384,
            max_message: 1024 * 1024,
        }
    }
}

/// Something received from a peer.
#[derive(Debug)]
pub enum Inbound {
    /// A one-way message from a peer. `from` is the peer's endpoint (listen) address.
    Message { from: SocketAddr, bytes: Bytes },
    /// A request (bi stream); answer with `reply.send(bytes)`; dropping `reply` resets the
    /// stream without answer (the requester gets [`TransportError::Stream`]).
    Request {
        from: SocketAddr,
        bytes: Bytes,
        reply: Responder,
    },
}

/// Answers one [`Inbound::Request`].
#[derive(Debug)]
pub struct Responder {
    tx: oneshot::Sender<Bytes>,
}

impl Responder {
    /// A responder and the receiver of its answer, for handling a request without a peer
    /// (unit tests of a role's request handling).
    pub fn channel() -> (Responder, oneshot::Receiver<Bytes>) {
        let (tx, rx) = oneshot::channel();
        (Responder { tx }, rx)
    }

    /// Send the reply. Ignored if the requester has gone away.
    pub fn send(self, bytes: Bytes) {
        let _ = self.tx.send(bytes);
    }
}

/// Outgoing connection state of one peer, shared by its send task and requests.
#[derive(Default)]
struct SlotState {
    conn: Option<Connection>,
    backoff: Duration,
    not_before: Option<Instant>,
}

struct Peer {
    tx: mpsc::Sender<Bytes>,
    slot: Arc<tokio::sync::Mutex<SlotState>>,
}

struct Inner {
    endpoint: Endpoint,
    client_config: quinn::ClientConfig,
    local_addr: SocketAddr,
    peers: RwLock<HashMap<SocketAddr, Peer>>,
    /// Taken at shutdown so the inbound receiver ends once all reader tasks are gone.
    inbound: RwLock<Option<mpsc::Sender<Inbound>>>,
    counters: Counters,
    max_message: usize,
    peer_queue: usize,
    closed: AtomicBool,
    shutdown: CancellationToken,
    runtime: tokio::runtime::Handle,
}

/// Closes the endpoint when the last [`Transport`] clone is dropped.
struct Handle {
    inner: Arc<Inner>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.inner.shutdown();
    }
}

/// A node's QUIC endpoint. Cheap to clone; dropping the last clone closes it.
#[derive(Clone)]
pub struct Transport {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("local_addr", &self.handle.inner.local_addr)
            .finish()
    }
}

fn quic_transport_config() -> quinn::TransportConfig {
    let mut tc = quinn::TransportConfig::default();
    tc.datagram_receive_buffer_size(Some(BUFFER_SIZE));
    tc.datagram_send_buffer_size(BUFFER_SIZE);
    tc.keep_alive_interval(Some(Duration::from_secs(2)));
    tc.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(10))
            .expect("10 s is a valid QUIC idle timeout"),
    ));
    tc.max_concurrent_uni_streams(VarInt::from_u32(1024));
    // every request is a bidi stream: this caps one peer's requests in flight (a proxy's
    // stores in a Xiu leader, say); 256 capped acknowledged inbox writes at 256 / latency
    tc.max_concurrent_bidi_streams(VarInt::from_u32(4096));
    tc
}

fn bind_socket(addr: SocketAddr) -> Result<std::net::UdpSocket, TransportError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let Err(e) = socket.set_recv_buffer_size(BUFFER_SIZE) {
        debug!("SO_RCVBUF not set: {e}");
    }
    if let Err(e) = socket.set_send_buffer_size(BUFFER_SIZE) {
        debug!("SO_SNDBUF not set: {e}");
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// True if the QUIC error code is a TLS (crypto) error.
fn is_crypto_code(code: u64) -> bool {
    (0x100..0x200).contains(&code)
}

fn is_handshake_error(e: &ConnectionError) -> bool {
    match e {
        ConnectionError::TransportError(t) => is_crypto_code(u64::from(t.code)),
        ConnectionError::ConnectionClosed(c) => is_crypto_code(u64::from(c.error_code)),
        ConnectionError::VersionMismatch => true,
        _ => false,
    }
}

/// Resets a send stream dropped before it was finished, so a half-written message is never
/// delivered as if it were complete (quinn finishes streams implicitly on drop).
struct ResetOnDrop(Option<SendStream>);

impl ResetOnDrop {
    fn stream(&mut self) -> Result<&mut SendStream, TransportError> {
        self.0
            .as_mut()
            .ok_or_else(|| TransportError::Stream("stream already finished".into()))
    }

    fn finish(&mut self) -> Result<(), TransportError> {
        if let Some(mut s) = self.0.take() {
            s.finish()
                .map_err(|e| TransportError::Stream(e.to_string()))?;
        }
        Ok(())
    }
}

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if let Some(s) = self.0.as_mut() {
            let _ = s.reset(VarInt::from_u32(CODE_ABANDONED));
        }
    }
}

impl Transport {
    /// Bind the endpoint and start accepting connections. Returns the transport and the
    /// receiver of everything peers send to this node.
    pub async fn bind(
        cfg: TransportConfig,
    ) -> Result<(Transport, mpsc::Receiver<Inbound>), TransportError> {
        let (server_config, client_config) = cfg.tls.configs(quic_transport_config())?;
        let socket = bind_socket(cfg.listen)?;
        let endpoint = Endpoint::new(
            EndpointConfig::default(),
            Some(server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        let local_addr = endpoint.local_addr()?;
        let (tx, rx) = mpsc::channel(cfg.inbound_capacity.max(1));
        let inner = Arc::new(Inner {
            endpoint,
            client_config,
            local_addr,
            peers: RwLock::new(HashMap::new()),
            inbound: RwLock::new(Some(tx)),
            counters: Counters::default(),
            max_message: cfg.max_message,
            peer_queue: cfg.peer_queue.max(1),
            closed: AtomicBool::new(false),
            shutdown: CancellationToken::new(),
            runtime: tokio::runtime::Handle::current(),
        });
        tokio::spawn(accept_loop(inner.clone()));
        debug!(%local_addr, "transport bound");
        Ok((
            Transport {
                handle: Arc::new(Handle { inner }),
            },
            rx,
        ))
    }

    /// The real bound address (after port 0 was resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.handle.inner.local_addr
    }

    /// Enqueue a one-way message on the peer's queue without waiting for the network.
    /// Returns false (and counts it) if the message was dropped: queue full, larger than
    /// `max_message`, or transport closed. Delivery of a `true` message is still best effort.
    pub fn send(&self, to: SocketAddr, bytes: Bytes) -> bool {
        let inner = &self.handle.inner;
        if inner.closed.load(Ordering::Acquire) {
            inc(&inner.counters.dropped_closed);
            return false;
        }
        if bytes.len() > inner.max_message {
            inc(&inner.counters.dropped_too_large);
            return false;
        }
        let bytes = {
            let peers = inner.peers.read().unwrap_or_else(PoisonError::into_inner);
            match peers.get(&to) {
                Some(peer) => match peer.tx.try_send(bytes) {
                    Ok(()) => return true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        inc(&inner.counters.dropped_queue_full);
                        return false;
                    }
                    Err(mpsc::error::TrySendError::Closed(b)) => b,
                },
                None => bytes,
            }
        };
        let tx = match inner.peer(to) {
            Some((tx, _)) => tx,
            None => {
                inc(&inner.counters.dropped_closed);
                return false;
            }
        };
        match tx.try_send(bytes) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                inc(&inner.counters.dropped_queue_full);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                inc(&inner.counters.dropped_closed);
                false
            }
        }
    }

    /// Request/response over a QUIC bidirectional stream on the (shared) outgoing connection to
    /// `to`, establishing it if needed. The whole exchange is bounded by `timeout`.
    pub async fn request(
        &self,
        to: SocketAddr,
        bytes: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, TransportError> {
        let inner = self.handle.inner.clone();
        if inner.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        if bytes.len() > inner.max_message {
            inc(&inner.counters.dropped_too_large);
            return Err(TransportError::TooLarge(bytes.len()));
        }
        let (_, slot) = inner.peer(to).ok_or(TransportError::Closed)?;
        inc(&inner.counters.requests_out);
        let exchange = async {
            let conn = inner.connection(to, &slot).await?;
            let (send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| TransportError::Stream(e.to_string()))?;
            let mut send = ResetOnDrop(Some(send));
            send.stream()?
                .write_chunk(bytes)
                .await
                .map_err(|e| TransportError::Stream(e.to_string()))?;
            send.finish()?;
            match recv.read_to_end(inner.max_message).await {
                Ok(v) => Ok(Bytes::from(v)),
                Err(quinn::ReadToEndError::TooLong) => {
                    inc(&inner.counters.dropped_too_large);
                    let _ = recv.stop(VarInt::from_u32(CODE_TOO_LARGE));
                    Err(TransportError::TooLarge(inner.max_message))
                }
                Err(quinn::ReadToEndError::Read(e)) => Err(TransportError::Stream(e.to_string())),
            }
        };
        let result = tokio::select! {
            r = tokio::time::timeout(timeout, exchange) => r.unwrap_or(Err(TransportError::Timeout)),
            _ = inner.shutdown.cancelled() => Err(TransportError::Closed),
        };
        if result.is_err() {
            inc(&inner.counters.send_errors);
        }
        result
    }

    /// Snapshot of the counters.
    pub fn stats(&self) -> TransportStats {
        let inner = &self.handle.inner;
        let c = &inner.counters;
        let peers = inner
            .peers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len() as u64;
        c.snapshot(peers, inner.endpoint.open_connections() as u64)
    }

    /// Close the endpoint: connections are closed, tasks end, the inbound receiver yields
    /// `None` once the reader tasks are gone. Waits (at most 1 s) for the close to go out.
    pub async fn close(&self) {
        let inner = &self.handle.inner;
        inner.shutdown();
        let _ = tokio::time::timeout(CLOSE_WAIT, inner.endpoint.wait_idle()).await;
    }
}

impl Inner {
    fn shutdown(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.shutdown.cancel();
        self.endpoint
            .close(VarInt::from_u32(CODE_SHUTDOWN), b"shutdown");
        self.peers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.inbound
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    fn inbound_sender(&self) -> Option<mpsc::Sender<Inbound>> {
        self.inbound
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The queue and connection slot of a peer, creating them (and its send task) if needed.
    /// None if the transport is closed.
    #[allow(clippy::type_complexity)]
    fn peer(
        self: &Arc<Self>,
        to: SocketAddr,
    ) -> Option<(mpsc::Sender<Bytes>, Arc<tokio::sync::Mutex<SlotState>>)> {
        let mut peers = self.peers.write().unwrap_or_else(PoisonError::into_inner);
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        if let Some(peer) = peers.get(&to) {
            if !peer.tx.is_closed() {
                return Some((peer.tx.clone(), peer.slot.clone()));
            }
        }
        let (tx, rx) = mpsc::channel(self.peer_queue);
        let slot = Arc::new(tokio::sync::Mutex::new(SlotState::default()));
        peers.insert(
            to,
            Peer {
                tx: tx.clone(),
                slot: slot.clone(),
            },
        );
        self.runtime
            .spawn(peer_task(self.clone(), to, slot.clone(), rx));
        Some((tx, slot))
    }

    /// The live outgoing connection to `to`, establishing it if needed (one attempt at a time;
    /// after a failure, attempts are refused until the back-off delay has passed).
    async fn connection(
        self: &Arc<Self>,
        to: SocketAddr,
        slot: &tokio::sync::Mutex<SlotState>,
    ) -> Result<Connection, TransportError> {
        let mut state = slot.lock().await;
        if let Some(conn) = &state.conn {
            if conn.close_reason().is_none() {
                return Ok(conn.clone());
            }
            state.conn = None;
        }
        if let Some(at) = state.not_before {
            if Instant::now() < at {
                return Err(TransportError::Connect(format!(
                    "{to} unreachable, retry back-off"
                )));
            }
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        match self.connect(to).await {
            Ok(conn) => {
                state.backoff = Duration::ZERO;
                state.not_before = None;
                state.conn = Some(conn.clone());
                self.spawn_readers(conn.clone());
                Ok(conn)
            }
            Err(e) => {
                state.backoff = (state.backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
                state.not_before = Some(Instant::now() + state.backoff);
                Err(e)
            }
        }
    }

    async fn connect(&self, to: SocketAddr) -> Result<Connection, TransportError> {
        let connecting =
            match self
                .endpoint
                .connect_with(self.client_config.clone(), to, SERVER_NAME)
            {
                Ok(c) => c,
                Err(e) => {
                    inc(&self.counters.connect_failures);
                    return Err(TransportError::Connect(format!("{to}: {e}")));
                }
            };
        match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(conn)) => {
                debug!(peer = %to, "connected");
                Ok(conn)
            }
            Ok(Err(e)) => {
                inc(&self.counters.connect_failures);
                if is_handshake_error(&e) {
                    inc(&self.counters.handshake_failures);
                    warn!(peer = %to, "TLS handshake failed: {e}");
                } else {
                    debug!(peer = %to, "connect failed: {e}");
                }
                Err(TransportError::Connect(format!("{to}: {e}")))
            }
            Err(_) => {
                inc(&self.counters.connect_failures);
                debug!(peer = %to, "connect timed out");
                Err(TransportError::Connect(format!("{to}: connect timed out")))
            }
        }
    }

    /// Send one message on `conn`: a datagram if it fits, a uni stream otherwise.
    async fn transmit(&self, conn: &Connection, bytes: Bytes) {
        if conn
            .max_datagram_size()
            .is_some_and(|max| bytes.len() <= max)
        {
            match conn.send_datagram_wait(bytes.clone()).await {
                Ok(()) => {
                    inc(&self.counters.sent_datagrams);
                    return;
                }
                // The path MTU shrank: fall back to a stream.
                Err(quinn::SendDatagramError::TooLarge) => {}
                Err(e) => {
                    inc(&self.counters.send_errors);
                    debug!(peer = %conn.remote_address(), "datagram send failed: {e}");
                    return;
                }
            }
        }
        let result = async {
            let send = conn
                .open_uni()
                .await
                .map_err(|e| TransportError::Stream(e.to_string()))?;
            let mut send = ResetOnDrop(Some(send));
            send.stream()?
                .write_chunk(bytes)
                .await
                .map_err(|e| TransportError::Stream(e.to_string()))?;
            send.finish()
        }
        .await;
        match result {
            Ok(()) => inc(&self.counters.sent_streams),
            Err(e) => {
                inc(&self.counters.send_errors);
                debug!(peer = %conn.remote_address(), "stream send failed: {e}");
            }
        }
    }

    /// Push into the inbound channel without blocking; counts a drop when full.
    fn deliver(&self, tx: &mpsc::Sender<Inbound>, item: Inbound) -> bool {
        match tx.try_send(item) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                inc(&self.counters.dropped_inbound_full);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Reader tasks for datagrams, uni streams and bi streams (requests) of a connection.
    fn spawn_readers(self: &Arc<Self>, conn: Connection) {
        let Some(tx) = self.inbound_sender() else {
            return;
        };
        let from = conn.remote_address();

        let (inner, c, t) = (self.clone(), conn.clone(), tx.clone());
        tokio::spawn(async move {
            while let Ok(bytes) = c.read_datagram().await {
                if bytes.len() > inner.max_message {
                    inc(&inner.counters.dropped_too_large);
                    continue;
                }
                inc(&inner.counters.received_datagrams);
                inner.deliver(&t, Inbound::Message { from, bytes });
            }
        });

        let (inner, c, t) = (self.clone(), conn.clone(), tx.clone());
        tokio::spawn(async move {
            while let Ok(mut recv) = c.accept_uni().await {
                let (inner, t) = (inner.clone(), t.clone());
                tokio::spawn(async move {
                    match recv.read_to_end(inner.max_message).await {
                        Ok(v) => {
                            inc(&inner.counters.received_streams);
                            let bytes = Bytes::from(v);
                            inner.deliver(&t, Inbound::Message { from, bytes });
                        }
                        Err(quinn::ReadToEndError::TooLong) => {
                            inc(&inner.counters.dropped_too_large);
                            let _ = recv.stop(VarInt::from_u32(CODE_TOO_LARGE));
                        }
                        Err(quinn::ReadToEndError::Read(e)) => {
                            inc(&inner.counters.recv_errors);
                            debug!(peer = %from, "uni stream read failed: {e}");
                        }
                    }
                });
            }
        });

        let inner = self.clone();
        tokio::spawn(async move {
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(handle_request(inner.clone(), tx.clone(), from, send, recv));
            }
        });
    }
}

async fn handle_request(
    inner: Arc<Inner>,
    tx: mpsc::Sender<Inbound>,
    from: SocketAddr,
    send: SendStream,
    mut recv: quinn::RecvStream,
) {
    let mut send = ResetOnDrop(Some(send));
    let bytes = match recv.read_to_end(inner.max_message).await {
        Ok(v) => Bytes::from(v),
        Err(quinn::ReadToEndError::TooLong) => {
            inc(&inner.counters.dropped_too_large);
            let _ = recv.stop(VarInt::from_u32(CODE_TOO_LARGE));
            return;
        }
        Err(quinn::ReadToEndError::Read(e)) => {
            inc(&inner.counters.recv_errors);
            debug!(peer = %from, "request read failed: {e}");
            return;
        }
    };
    let (reply_tx, reply_rx) = oneshot::channel();
    let request = Inbound::Request {
        from,
        bytes,
        reply: Responder { tx: reply_tx },
    };
    if !inner.deliver(&tx, request) {
        return;
    }
    drop(tx);
    inc(&inner.counters.requests_in);
    let Ok(stream) = send.stream() else {
        return;
    };
    let stopped = stream.stopped();
    let reply = tokio::select! {
        r = reply_rx => r.ok(),
        _ = stopped => None,
    };
    let Some(reply) = reply else {
        if let Some(mut s) = send.0.take() {
            let _ = s.reset(VarInt::from_u32(CODE_NO_REPLY));
        }
        return;
    };
    if reply.len() > inner.max_message {
        inc(&inner.counters.dropped_too_large);
        if let Some(mut s) = send.0.take() {
            let _ = s.reset(VarInt::from_u32(CODE_TOO_LARGE));
        }
        return;
    }
    let written = match send.stream() {
        Ok(s) => s.write_chunk(reply).await.is_ok(),
        Err(_) => false,
    };
    if !written || send.finish().is_err() {
        inc(&inner.counters.send_errors);
    }
}

async fn accept_loop(inner: Arc<Inner>) {
    while let Some(incoming) = inner.endpoint.accept().await {
        let inner = inner.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match tokio::time::timeout(ACCEPT_TIMEOUT, incoming).await {
                Ok(Ok(conn)) => {
                    debug!(peer = %remote, "accepted");
                    inner.spawn_readers(conn);
                }
                Ok(Err(e)) => {
                    inc(&inner.counters.handshake_failures);
                    warn!(peer = %remote, "incoming handshake failed: {e}");
                }
                Err(_) => {
                    inc(&inner.counters.handshake_failures);
                    warn!(peer = %remote, "incoming handshake timed out");
                }
            }
        });
    }
}

/// Drains one peer's queue in FIFO order over its outgoing connection.
async fn peer_task(
    inner: Arc<Inner>,
    to: SocketAddr,
    slot: Arc<tokio::sync::Mutex<SlotState>>,
    mut rx: mpsc::Receiver<Bytes>,
) {
    loop {
        let msg = tokio::select! {
            biased;
            _ = inner.shutdown.cancelled() => break,
            m = rx.recv() => match m {
                Some(m) => m,
                None => break,
            },
        };
        let conn = tokio::select! {
            biased;
            _ = inner.shutdown.cancelled() => break,
            c = inner.connection(to, &slot) => c,
        };
        match conn {
            Ok(conn) => {
                tokio::select! {
                    biased;
                    _ = inner.shutdown.cancelled() => break,
                    () = inner.transmit(&conn, msg) => {}
                }
            }
            Err(e) => {
                // Drop this message and everything queued behind it.
                let mut dropped = 1u64;
                while rx.try_recv().is_ok() {
                    dropped += 1;
                }
                inner
                    .counters
                    .dropped_no_connection
                    .fetch_add(dropped, Ordering::Relaxed);
                debug!(peer = %to, dropped, "no connection: {e}");
            }
        }
    }
}
