//! The client side of the gateway: `GET /v1/ws`, authentication before the upgrade, then one
//! task per connection that parses frames, talks to the core and writes replies.

use crate::core::{Cmd, ConnId};
use axum::extract::ws::{Message as WsMessage, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::{SinkExt, StreamExt};
use pixiu_courier::{Courier, CourierError};
use pixiu_protocol::auth::{self, Identity};
use pixiu_protocol::client::{
    codes, parse_client_frame, ClientRequest, ErrorReply, FrameError, Id, ServerFrame,
};
use pixiu_protocol::ids::{RouteKey, SnowflakeGen};
use pixiu_protocol::routing::user_proxy;
use pixiu_protocol::wire::{self, Message, RoomMessage};
use pixiu_registry::RoleView;
use pixiu_runtime::{RoleMetrics, Shutdown};
use pixiu_transport::Transport;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

pub(crate) struct WsSettings {
    pub secret: Option<Vec<u8>>,
    pub insecure_dev_auth: bool,
    pub idle_timeout: Duration,
    pub client_queue: usize,
    pub publish_rate: u32,
    pub publish_burst: u32,
}

pub(crate) struct WsState {
    s: WsSettings,
    cmds: mpsc::Sender<Cmd>,
    transport: Transport,
    proxies: watch::Receiver<Arc<RoleView>>,
    metrics: RoleMetrics,
    ids: SnowflakeGen,
    next_conn: AtomicU64,
    shutdown: Shutdown,
    courier: Courier,
}

impl WsState {
    #[allow(clippy::too_many_arguments)] // one call site, every part named there
    pub(crate) fn new(
        s: WsSettings,
        cmds: mpsc::Sender<Cmd>,
        transport: Transport,
        proxies: watch::Receiver<Arc<RoleView>>,
        metrics: RoleMetrics,
        ids: SnowflakeGen,
        shutdown: Shutdown,
        courier: Courier,
    ) -> WsState {
        WsState {
            s,
            cmds,
            transport,
            proxies,
            metrics,
            ids,
            next_conn: AtomicU64::new(1),
            shutdown,
            courier,
        }
    }
}

/// Frames a client may send, at most this large; a `publish` body over 64 KiB inside it is
/// refused with `too_large` and the connection stays open, a frame over this closes it.
const MAX_FRAME: usize = 256 * 1024;

pub(crate) fn router(state: Arc<WsState>) -> Router {
    Router::new()
        .route("/v1/ws", get(upgrade))
        .with_state(state)
}

fn unauthorized(reason: String) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(ErrorReply {
            error: "unauthorized".into(),
            reason,
        }),
    )
        .into_response()
}

fn authenticate(
    s: &WsSettings,
    headers: &HeaderMap,
    q: &HashMap<String, String>,
) -> Result<Identity, String> {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .map(str::to_string);
    let token = bearer.or_else(|| q.get("token").cloned());
    if let Some(token) = token {
        let Some(secret) = &s.secret else {
            return Err("this gateway has no auth secret; tokens cannot be checked".into());
        };
        return auth::verify_client(secret, &token).map_err(|e| e.to_string());
    }
    if s.insecure_dev_auth {
        let uid = q
            .get("uid")
            .ok_or("missing token (or ?uid= in insecure dev mode)")?
            .parse::<u64>()
            .map_err(|_| "uid must be a decimal u64".to_string())?;
        let device = q
            .get("dev")
            .cloned()
            .unwrap_or_else(|| auth::DEFAULT_DEVICE.into());
        if !auth::valid_device(&device) {
            return Err(format!(
                "device {device:?} must be 1..=64 bytes of [A-Za-z0-9_.-]"
            ));
        }
        return Ok(Identity { uid, device });
    }
    Err("missing token".into())
}

async fn upgrade(
    State(state): State<Arc<WsState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Response {
    let who = match authenticate(&state.s, &headers, &q) {
        Ok(who) => who,
        Err(reason) => {
            state.metrics.drop("connect", "unauthorized");
            return unauthorized(reason);
        }
    };
    // small per-connection buffers: most frames are small, and memory per connection is what
    // limits how many clients one gateway holds (the buffers grow on demand up to MAX_FRAME)
    ws.max_message_size(MAX_FRAME)
        .max_frame_size(MAX_FRAME)
        .read_buffer_size(4096)
        .write_buffer_size(4096)
        .on_upgrade(move |socket| connection(state, who, socket))
}

enum Event {
    Joined {
        room: u64,
        cid: Option<String>,
        result: Result<(), String>,
    },
    Sent {
        cid: Option<String>,
        result: Result<u64, CourierError>,
    },
}

async fn connection(state: Arc<WsState>, who: Identity, socket: WebSocket) {
    let conn: ConnId = state.next_conn.fetch_add(1, Ordering::Relaxed);
    state.metrics.connections.inc();
    state.metrics.inc_in("connect");
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::channel::<Utf8Bytes>(state.s.client_queue);
    let writer = tokio::spawn(async move {
        while let Some(text) = rx.recv().await {
            if sink.send(WsMessage::Text(text)).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let (ev_tx, mut ev_rx) = mpsc::channel::<Event>(64);
    // the inbox: this connection is one of the user's devices
    let online = Cmd::InboxOnline {
        conn,
        uid: who.uid,
        device: who.device.clone(),
        tx: tx.clone(),
    };
    if state.cmds.send(online).await.is_err() {
        return;
    }
    let mut joined: HashSet<u64> = HashSet::new();
    let mut joining: HashSet<u64> = HashSet::new();
    let mut bucket = crate::rate::TokenBucket::new(
        state.s.publish_rate,
        state.s.publish_burst,
        std::time::Instant::now(),
    );
    let idle = state.s.idle_timeout;
    let mut deadline = tokio::time::Instant::now() + idle;
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(deadline) => {
                state.metrics.drop("connect", "idle_timeout");
                tracing::debug!(uid = who.uid, "idle timeout");
                break;
            }
            Some(ev) = ev_rx.recv() => match ev {
                Event::Joined { room, cid, result } => {
                    joining.remove(&room);
                    let frame = match result {
                        Ok(()) => {
                            joined.insert(room);
                            ServerFrame::Joined { room: Id(room), cid }
                        }
                        Err(reason) => ServerFrame::Error { code: codes::UNAVAILABLE.into(), reason, cid },
                    };
                    if reply(&tx, frame).await.is_err() { break; }
                }
                Event::Sent { cid, result } => {
                    let frame = match result {
                        Ok(id) => ServerFrame::Sent { id: Id(id), cid },
                        Err(CourierError::BadRequest(reason)) => ServerFrame::Error { code: codes::BAD_REQUEST.into(), reason, cid },
                        Err(CourierError::Unavailable(reason)) => ServerFrame::Error { code: codes::UNAVAILABLE.into(), reason, cid },
                    };
                    if reply(&tx, frame).await.is_err() { break; }
                }
            },
            frame = stream.next() => {
                let Some(Ok(frame)) = frame else { break };
                deadline = tokio::time::Instant::now() + idle;
                let text = match frame {
                    WsMessage::Text(t) => t,
                    WsMessage::Binary(_) => {
                        state.metrics.drop("frame", "binary");
                        let f = FrameError { code: codes::BAD_REQUEST, reason: "frames must be JSON text".into(), cid: None };
                        if reply(&tx, f.to_frame()).await.is_err() { break; }
                        continue;
                    }
                    WsMessage::Close(_) => break,
                    // pings are answered by the WebSocket layer; they count as activity
                    _ => continue,
                };
                state.metrics.inc_in("frame");
                let req = match parse_client_frame(text.as_str()) {
                    Ok(r) => r,
                    Err(e) => {
                        state.metrics.drop("frame", if e.code == codes::TOO_LARGE { "too_large" } else { "bad_request" });
                        if reply(&tx, e.to_frame()).await.is_err() { break; }
                        continue;
                    }
                };
                let out = match req {
                    ClientRequest::Ping { cid } => Some(ServerFrame::Pong { cid }),
                    ClientRequest::Join { room, cid } => {
                        if joined.contains(&room) {
                            Some(ServerFrame::Joined { room: Id(room), cid })
                        } else if !joining.insert(room) {
                            Some(ServerFrame::Error { code: codes::BAD_REQUEST.into(), reason: "a join of this room is already under way".into(), cid })
                        } else {
                            let (rtx, rrx) = oneshot::channel();
                            let cmd = Cmd::Join { conn, uid: who.uid, room, tx: tx.clone(), reply: rtx };
                            if state.cmds.send(cmd).await.is_err() { break; }
                            let ev_tx = ev_tx.clone();
                            tokio::spawn(async move {
                                let result = rrx.await.unwrap_or_else(|_| Err("gateway is shutting down".into()));
                                let _ = ev_tx.send(Event::Joined { room, cid, result }).await;
                            });
                            None
                        }
                    }
                    ClientRequest::Leave { room, cid } => {
                        joined.remove(&room);
                        if state.cmds.send(Cmd::Leave { conn, uid: who.uid, room }).await.is_err() { break; }
                        Some(ServerFrame::Left { room: Id(room), cid })
                    }
                    ClientRequest::Publish { room, body, cid } => {
                        if !bucket.take(std::time::Instant::now()) {
                            state.metrics.drop("publish", "rate_limited");
                            Some(ServerFrame::Error {
                                code: codes::RATE_LIMITED.into(),
                                reason: format!("more than {} publishes a second", state.s.publish_rate),
                                cid,
                            })
                        } else if !joined.contains(&room) {
                            state.metrics.drop("publish", "not_joined");
                            Some(ServerFrame::Error { code: codes::NOT_JOINED.into(), reason: format!("join room {room} before publishing to it"), cid })
                        } else {
                            Some(publish(&state, who.uid, room, body, cid))
                        }
                    }
                    ClientRequest::Send { to, body, sid, cid } => {
                        if !bucket.take(std::time::Instant::now()) {
                            state.metrics.drop("send", "rate_limited");
                            Some(ServerFrame::Error {
                                code: codes::RATE_LIMITED.into(),
                                reason: format!("more than {} sends and publishes a second", state.s.publish_rate),
                                cid,
                            })
                        } else {
                            let sid = sid.unwrap_or_else(|| state.ids.next());
                            let courier = state.courier.clone();
                            let ev_tx = ev_tx.clone();
                            let from = who.uid;
                            state.metrics.inc_in("send");
                            tokio::spawn(async move {
                                let result = courier
                                    .send(sid, from, &[to], body, pixiu_protocol::now_ms())
                                    .await
                                    .and_then(|ids| ids.get(&to).copied().ok_or_else(|| CourierError::Unavailable("stored without an id".into())));
                                let _ = ev_tx.send(Event::Sent { cid, result }).await;
                            });
                            None
                        }
                    }
                    ClientRequest::Sync { after, .. } => {
                        if state.cmds.send(Cmd::InboxSync { conn, after }).await.is_err() { break; }
                        None
                    }
                    ClientRequest::Ack { id } => {
                        if state.cmds.send(Cmd::InboxAck { conn, id }).await.is_err() { break; }
                        None
                    }
                };
                if let Some(f) = out {
                    if reply(&tx, f).await.is_err() { break; }
                }
            }
        }
    }
    for room in joined.into_iter().chain(joining) {
        let _ = state
            .cmds
            .send(Cmd::Leave {
                conn,
                uid: who.uid,
                room,
            })
            .await;
    }
    let _ = state.cmds.send(Cmd::InboxOffline { conn }).await;
    drop(tx);
    let _ = writer.await;
    state.metrics.connections.dec();
}

async fn reply(tx: &mpsc::Sender<Utf8Bytes>, frame: ServerFrame) -> Result<(), ()> {
    tx.send(Utf8Bytes::from(frame.to_json()))
        .await
        .map_err(|_| ())
}

fn publish(state: &WsState, uid: u64, room: u64, body: String, cid: Option<String>) -> ServerFrame {
    let running = state.proxies.borrow().running_addrs(0);
    let Some(to) = user_proxy(uid, running.len()).map(|i| running[i]) else {
        state.metrics.drop("publish", "no_proxy");
        return ServerFrame::Error {
            code: codes::UNAVAILABLE.into(),
            reason: "no running proxy".into(),
            cid,
        };
    };
    let id = state.ids.next();
    let msg = Message::Publish(RoomMessage {
        id,
        key: RouteKey::room(room),
        from: uid,
        body,
        ts: pixiu_protocol::now_ms(),
    });
    if state.transport.send(to, wire::encode(&msg)) {
        state.metrics.inc_out("publish");
        ServerFrame::Published {
            room: Id(room),
            id: Id(id),
            cid,
        }
    } else {
        state.metrics.drop("publish", "send_failed");
        ServerFrame::Error {
            code: codes::UNAVAILABLE.into(),
            reason: "the proxy cannot be reached".into(),
            cid,
        }
    }
}
