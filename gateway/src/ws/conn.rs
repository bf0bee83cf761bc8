//! One client connection: a writer task drains its outgoing queue into the socket, and the
//! connection's task reads frames, answers each before it reads the next, asks the core
//! (joins, leaves, the inbox) and the cluster (publishes to a proxy, sends through the
//! courier), and sends the answers of what it spawned as they come back. The bookkeeping
//! that decides what a request gets is `session.rs`.

use super::session::{self, JoinStart, Refusal, Session};
use super::WsState;
use crate::core::{Cmd, ConnTx, Frames};
use crate::rooms::JoinError;
use axum::extract::ws::{Message as WsMessage, Utf8Bytes, WebSocket};
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use pixiu_courier::{Courier, CourierError};
use pixiu_protocol::auth::Identity;
use pixiu_protocol::client::{codes, parse_client_frame, ClientRequest, Id, ServerFrame};
use pixiu_protocol::ids::RouteKey;
use pixiu_protocol::routing::user_proxy;
use pixiu_protocol::wire::{self, Message, RoomMessage};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// The answer of work a connection spawned.
enum Event {
    Joined {
        room: u64,
        cid: Option<String>,
        result: Result<(), JoinError>,
    },
    Sent {
        cid: Option<String>,
        result: Result<u64, CourierError>,
    },
}

/// The connection ends: the client closed or went away, it idled out, the gateway stops, or
/// its writer or the core is gone.
struct Stop;

type Flow = Result<(), Stop>;

struct Conn {
    state: Arc<WsState>,
    session: Session,
    /// the outgoing queue, drained by the writer task
    tx: ConnTx,
    /// where spawned work (joins, sends) reports back
    events: mpsc::Sender<Box<Event>>,
    /// closed for idling when no frame comes before this
    deadline: tokio::time::Instant,
}

/// Serve one authenticated client until it leaves, idles out or the gateway stops.
pub(super) async fn connection(state: Arc<WsState>, who: Identity, socket: WebSocket) {
    let (sink, mut stream) = socket.split();
    let (tx, rx) = mpsc::channel(state.s.client_queue);
    let writer = tokio::spawn(write(sink, rx));
    // boxed: a channel allocates its first block of 32 slots at once, for every connection
    let (events_tx, mut events) = mpsc::channel::<Box<Event>>(64);
    let mut c = Conn::new(state, who, tx, events_tx);
    let mut flow = c.online().await;
    // rustfmt leaves macro bodies alone: keep every arm one short call
    while flow.is_ok() {
        flow = tokio::select! {
            _ = c.state.shutdown.cancelled() => Err(Stop),
            _ = tokio::time::sleep_until(c.deadline) => Err(c.idle_timeout()),
            Some(ev) = events.recv() => c.on_event(*ev).await,
            frame = stream.next() => c.on_frame(frame).await,
        };
    }
    c.close(writer).await;
}

/// Frames written to a socket before one flush, when more are queued.
const WRITE_BATCH: usize = 64;

/// The writer task: the queue's frames in order, then a close. A batch, and the batches
/// queued behind it up to [`WRITE_BATCH`] frames, go into the socket's buffer before one
/// flush: few write syscalls for many frames when a member is behind or messages come fast.
async fn write(mut sink: SplitSink<WebSocket, WsMessage>, mut rx: mpsc::Receiver<Frames>) {
    'conn: while let Some(first) = rx.recv().await {
        let mut fed = 0;
        let mut next = Some(first);
        while let Some(frames) = next.take() {
            for text in frames.iter() {
                if sink.feed(WsMessage::Text(text.clone())).await.is_err() {
                    break 'conn;
                }
            }
            fed += frames.len();
            if fed < WRITE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if sink.flush().await.is_err() {
            break;
        }
    }
    let _ = sink.close().await;
}

impl Conn {
    fn new(
        state: Arc<WsState>,
        who: Identity,
        tx: ConnTx,
        events: mpsc::Sender<Box<Event>>,
    ) -> Conn {
        let conn = state.next_conn.fetch_add(1, Ordering::Relaxed);
        state.metrics.connections.inc();
        state.metrics.inc_in("connect");
        let (rate, burst) = (state.s.publish_rate, state.s.publish_burst);
        let session = Session::new(conn, who, rate, burst, Instant::now());
        let deadline = tokio::time::Instant::now() + state.s.idle_timeout;
        Conn {
            state,
            session,
            tx,
            events,
            deadline,
        }
    }

    /// The inbox: this connection is one of the user's devices.
    async fn online(&self) -> Flow {
        let who = &self.session.who;
        let online = Cmd::InboxOnline {
            conn: self.session.conn,
            uid: who.uid,
            device: who.device.clone(),
            tx: self.tx.clone(),
        };
        self.core(online).await
    }

    fn idle_timeout(&self) -> Stop {
        self.state.metrics.drop("connect", "idle_timeout");
        tracing::debug!(uid = self.session.who.uid, "idle timeout");
        Stop
    }

    /// What the socket gave: nothing or an error ends the connection; any frame, a ping too,
    /// counts as activity.
    async fn on_frame(&mut self, frame: Option<Result<WsMessage, axum::Error>>) -> Flow {
        let Some(Ok(frame)) = frame else {
            return Err(Stop);
        };
        self.deadline = tokio::time::Instant::now() + self.state.s.idle_timeout;
        match frame {
            WsMessage::Text(text) => self.on_text(text.as_str()).await,
            WsMessage::Binary(_) => {
                self.state.metrics.drop("frame", "binary");
                let reason = "frames must be JSON text".into();
                self.reply(session::error(codes::BAD_REQUEST, reason, None))
                    .await
            }
            WsMessage::Close(_) => Err(Stop),
            // pings are answered by the WebSocket layer; they count as activity
            WsMessage::Ping(_) | WsMessage::Pong(_) => Ok(()),
        }
    }

    async fn on_text(&mut self, text: &str) -> Flow {
        self.state.metrics.inc_in("frame");
        match parse_client_frame(text) {
            Ok(req) => self.on_request(req).await,
            Err(e) => {
                let too_large = e.code == codes::TOO_LARGE;
                let reason = if too_large {
                    "too_large"
                } else {
                    "bad_request"
                };
                self.state.metrics.drop("frame", reason);
                self.reply(e.to_frame()).await
            }
        }
    }

    /// Do what the client asked; the answer, when there is one now, goes out before the
    /// next frame is read.
    async fn on_request(&mut self, req: ClientRequest) -> Flow {
        let conn = self.session.conn;
        let answer = match req {
            ClientRequest::Ping { cid } => Some(ServerFrame::Pong { cid }),
            ClientRequest::Join { room, cid } => self.join(room, cid).await?,
            ClientRequest::Leave { room, cid } => Some(self.leave(room, cid).await?),
            ClientRequest::Publish {
                room,
                body,
                cid,
                trace,
            } => Some(self.publish(room, body, cid, trace)),
            ClientRequest::Send {
                to,
                body,
                sid,
                cid,
                trace,
            } => {
                let arrived = trace.then(pixiu_protocol::trace::now_us);
                self.send(to, body, sid, cid, arrived)
            }
            ClientRequest::Sync { after, .. } => {
                self.core(Cmd::InboxSync { conn, after }).await?;
                None
            }
            ClientRequest::Ack { id } => {
                self.core(Cmd::InboxAck { conn, id }).await?;
                None
            }
        };
        match answer {
            Some(frame) => self.reply(frame).await,
            None => Ok(()),
        }
    }

    /// Answered now, or by the core later (an [`Event::Joined`]).
    async fn join(&mut self, room: u64, cid: Option<String>) -> Result<Option<ServerFrame>, Stop> {
        let cid = match self.session.join(room, cid) {
            JoinStart::Answer(frame) => return Ok(Some(frame)),
            JoinStart::Ask(cid) => cid,
        };
        let (reply, answer) = oneshot::channel();
        let (conn, uid, tx) = (self.session.conn, self.session.who.uid, self.tx.clone());
        self.core(Cmd::Join {
            conn,
            uid,
            room,
            tx,
            reply,
        })
        .await?;
        let events = self.events.clone();
        tokio::spawn(async move {
            let result = answer.await.unwrap_or(Err(JoinError::ShuttingDown));
            let _ = events
                .send(Box::new(Event::Joined { room, cid, result }))
                .await;
        });
        Ok(None)
    }

    async fn leave(&mut self, room: u64, cid: Option<String>) -> Result<ServerFrame, Stop> {
        self.session.leave(room);
        let (conn, uid) = (self.session.conn, self.session.who.uid);
        self.core(Cmd::Leave { conn, uid, room }).await?;
        Ok(ServerFrame::Left {
            room: Id(room),
            cid,
        })
    }

    fn publish(
        &mut self,
        room: u64,
        body: String,
        cid: Option<String>,
        trace: bool,
    ) -> ServerFrame {
        let arrived = trace.then(pixiu_protocol::trace::now_us);
        match self.session.admit_publish(room, &cid, Instant::now()) {
            Ok(()) => self.to_proxy(room, body, cid, arrived),
            Err(refusal) => self.refuse(refusal),
        }
    }

    /// The room message goes to the sender's proxy; answered once it is queued there.
    /// A traced publish (`arrived`: when it reached this gateway, unix µs) carries this
    /// gateway's stamp.
    fn to_proxy(
        &self,
        room: u64,
        body: String,
        cid: Option<String>,
        arrived: Option<u64>,
    ) -> ServerFrame {
        let (state, uid) = (&self.state, self.session.who.uid);
        let running = state.proxies.borrow().running_addrs(0);
        let Some(to) = user_proxy(uid, running.len()).map(|i| running[i]) else {
            state.metrics.drop("publish", "no_proxy");
            return session::error(codes::UNAVAILABLE, "no running proxy".into(), cid);
        };
        let id = state.ids.next();
        let m = RoomMessage {
            id,
            key: RouteKey::room(room),
            from: uid,
            body,
            ts: pixiu_protocol::now_ms(),
        };
        let msg = match arrived {
            None => Message::Publish(m),
            Some(arrived) => Message::TracedPublish {
                msg: m,
                trace: vec![state.s.hop.stamp(arrived)],
            },
        };
        if !state.transport.send(to, wire::encode(&msg)) {
            state.metrics.drop("publish", "send_failed");
            let reason = "the proxy cannot be reached".into();
            return session::error(codes::UNAVAILABLE, reason, cid);
        }
        state.metrics.inc_out("publish");
        let (room, id) = (Id(room), Id(id));
        ServerFrame::Published { room, id, cid }
    }

    /// Refused now, or answered by the courier later (an [`Event::Sent`]). A traced send
    /// (`arrived`: when it reached this gateway, unix µs) carries this gateway's stamp.
    fn send(
        &mut self,
        to: u64,
        body: String,
        sid: Option<u64>,
        cid: Option<String>,
        arrived: Option<u64>,
    ) -> Option<ServerFrame> {
        if let Err(refusal) = self.session.admit_send(&cid, Instant::now()) {
            return Some(self.refuse(refusal));
        }
        let sid = sid.unwrap_or_else(|| self.state.ids.next());
        let (courier, from) = (self.state.courier.clone(), self.session.who.uid);
        let events = self.events.clone();
        self.state.metrics.inc_in("send");
        let trace = arrived.map(|at| vec![self.state.s.hop.stamp(at)]);
        tokio::spawn(async move {
            let result = courier_send(&courier, sid, from, to, body, trace).await;
            let _ = events.send(Box::new(Event::Sent { cid, result })).await;
        });
        None
    }

    fn refuse(&self, refusal: Refusal) -> ServerFrame {
        self.state.metrics.drop(refusal.stage, refusal.reason);
        refusal.frame
    }

    async fn on_event(&mut self, ev: Event) -> Flow {
        let frame = match ev {
            Event::Joined { room, cid, result } => self.session.join_answered(room, cid, result),
            Event::Sent { cid, result } => session::sent(cid, result),
        };
        self.reply(frame).await
    }

    async fn core(&self, cmd: Cmd) -> Flow {
        self.state.cmds.send(cmd).await.map_err(|_| Stop)
    }

    async fn reply(&self, frame: ServerFrame) -> Flow {
        let text = Utf8Bytes::from(frame.to_json());
        self.tx.send(Arc::from([text])).await.map_err(|_| Stop)
    }

    /// Leave every room joined or joining, go offline, let the writer finish its queue.
    async fn close(self, writer: JoinHandle<()>) {
        let Conn {
            state, session, tx, ..
        } = self;
        let (conn, uid) = (session.conn, session.who.uid);
        for room in session.into_rooms() {
            let _ = state.cmds.send(Cmd::Leave { conn, uid, room }).await;
        }
        let _ = state.cmds.send(Cmd::InboxOffline { conn }).await;
        drop(tx);
        let _ = writer.await;
        state.metrics.connections.dec();
    }
}

/// One message to one user through the courier; its id for the receiver.
async fn courier_send(
    courier: &Courier,
    sid: u64,
    from: u64,
    to: u64,
    body: String,
    trace: Option<Vec<pixiu_protocol::trace::Stamp>>,
) -> Result<u64, CourierError> {
    let ts = pixiu_protocol::now_ms();
    let ids = courier
        .send_traced(sid, from, &[to], body, ts, trace)
        .await?;
    ids.get(&to)
        .copied()
        .ok_or_else(|| CourierError::Unavailable("stored without an id".into()))
}
