//! PiXiu's client SDK, for apps and for the project's own tests.
//!
//! - [`Client`]: one WebSocket connection to a gateway (`ws://host:port/v1/ws`), speaking the
//!   client protocol of the external contract: requests that expect a reply (`join`, `leave`,
//!   `publish`, `send`, `ping`) carry a generated `cid` and wait for the reply with that `cid`;
//!   everything else the gateway sends (room and inbox messages, errors not tied to a waited
//!   request) comes out of [`Client::next_event`] in arrival order.
//! - [`Publisher`]: a client of the publisher HTTP API on a proxy.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use pixiu_protocol::client::{
    BatchBody, BatchReply, GatewaysReply, IdReply, MulticastBody, PublishBody, ServerFrame,
};
/// The types of a batch of personal messages ([`Publisher::send_batch`]).
pub use pixiu_protocol::client::{BatchItem, BatchResult, Id};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::{HeaderValue, AUTHORIZATION};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};

/// How long a request waits for its reply, and how long `connect` waits for the upgrade.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of [`Client`] and [`Publisher`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// HTTP 401: the token is missing, malformed, expired or wrongly signed.
    #[error("unauthorized (HTTP 401)")]
    Unauthorized,
    /// The gateway answered a request with an `error` frame.
    #[error("refused: {code}: {reason}")]
    Refused { code: String, reason: String },
    /// An HTTP answer other than the expected one.
    #[error("HTTP {status}: {body}")]
    Http { status: u16, body: String },
    /// No reply in time.
    #[error("timed out")]
    Timeout,
    /// The connection is closed.
    #[error("connection closed")]
    Closed,
    /// A network error.
    #[error("io: {0}")]
    Io(String),
    /// The other side answered something the protocol does not allow.
    #[error("protocol: {0}")]
    Protocol(String),
}

/// How a [`Client`] authenticates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Auth {
    /// A JWT, sent as `Authorization: Bearer <token>`.
    Token(String),
    /// `?uid=..&dev=..`, accepted only by gateways started with `--insecure-dev-auth`.
    InsecureDev { uid: u64, device: String },
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn encode_query_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The URL to open for `auth`: the dev identity goes into the query string.
pub fn build_url(url: &str, auth: &Auth) -> String {
    match auth {
        Auth::Token(_) => url.to_string(),
        Auth::InsecureDev { uid, device } => {
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}uid={uid}&dev={}", encode_query_value(device))
        }
    }
}

/// Requests waiting for their reply, by `cid`. `None` once the connection is closed, so that
/// a request made afterwards fails at once instead of waiting for its timeout.
struct Pending {
    waiting: Mutex<Option<HashMap<String, oneshot::Sender<ServerFrame>>>>,
}

impl Pending {
    fn new() -> Pending {
        Pending {
            waiting: Mutex::new(Some(HashMap::new())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<HashMap<String, oneshot::Sender<ServerFrame>>>> {
        // A panic while holding this lock leaves the map consistent (single inserts/removes).
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for the reply with `cid`; `None` if the connection is already closed.
    fn register(&self, cid: &str) -> Option<oneshot::Receiver<ServerFrame>> {
        let mut guard = self.lock();
        let map = guard.as_mut()?;
        let (tx, rx) = oneshot::channel();
        map.insert(cid.to_string(), tx);
        Some(rx)
    }

    fn forget(&self, cid: &str) {
        if let Some(map) = self.lock().as_mut() {
            map.remove(cid);
        }
    }

    /// Hands `frame` to the request waiting for its cid, or gives it back if none is.
    fn route(&self, frame: ServerFrame) -> Option<ServerFrame> {
        let Some(cid) = cid_of(&frame) else {
            return Some(frame);
        };
        let sender = self.lock().as_mut().and_then(|map| map.remove(cid));
        match sender {
            // The waiter may have timed out just now; then the frame is simply dropped.
            Some(tx) => {
                let _ = tx.send(frame);
                None
            }
            None => Some(frame),
        }
    }

    /// The connection is gone: every waiter gets `Closed`, and so does every later request.
    fn close(&self) {
        self.lock().take();
    }
}

/// One WebSocket connection to a gateway.
pub struct Client {
    out: mpsc::UnboundedSender<Message>,
    pending: Arc<Pending>,
    events: mpsc::UnboundedReceiver<ServerFrame>,
    next_cid: AtomicU64,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

fn ws_error(e: tungstenite::Error) -> ClientError {
    match e {
        tungstenite::Error::Http(resp) => {
            let status = resp.status().as_u16();
            if status == 401 {
                ClientError::Unauthorized
            } else {
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                ClientError::Http { status, body }
            }
        }
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            ClientError::Closed
        }
        tungstenite::Error::Io(e) => ClientError::Io(e.to_string()),
        other => ClientError::Protocol(other.to_string()),
    }
}

fn cid_of(frame: &ServerFrame) -> Option<&str> {
    match frame {
        ServerFrame::Joined { cid, .. }
        | ServerFrame::Left { cid, .. }
        | ServerFrame::Published { cid, .. }
        | ServerFrame::Sent { cid, .. }
        | ServerFrame::Pong { cid }
        | ServerFrame::Error { cid, .. } => cid.as_deref(),
        ServerFrame::Room { .. } | ServerFrame::Inbox { .. } => None,
    }
}

impl Client {
    /// Opens a connection to `url` (`ws://host:port/v1/ws`). An HTTP 401 on the upgrade is
    /// [`ClientError::Unauthorized`].
    pub async fn connect(url: &str, auth: &Auth) -> Result<Client, ClientError> {
        let mut request = build_url(url, auth)
            .into_client_request()
            .map_err(|e| ClientError::Protocol(format!("bad url {url:?}: {e}")))?;
        if let Auth::Token(token) = auth {
            let value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|e| ClientError::Protocol(format!("token is not a header value: {e}")))?;
            request.headers_mut().insert(AUTHORIZATION, value);
        }
        // Nagle off (`true`): acks and requests are small; with it on, one written behind an
        // unacknowledged one waits for the gateway's delayed ACK (up to 40 ms on Linux)
        let connecting = tokio_tungstenite::connect_async_with_config(request, None, true);
        let (ws, _response) = tokio::time::timeout(REPLY_TIMEOUT, connecting)
            .await
            .map_err(|_| ClientError::Timeout)?
            .map_err(ws_error)?;
        let (mut sink, mut stream) = ws.split();

        let (out, mut out_rx) = mpsc::unbounded_channel::<Message>();
        let writer = tokio::spawn(async move {
            while let Some(msg) = out_rx.recv().await {
                let closing = matches!(msg, Message::Close(_));
                if let Err(e) = sink.send(msg).await {
                    tracing::debug!("websocket write failed: {e}");
                    break;
                }
                if closing {
                    break;
                }
            }
        });

        let pending = Arc::new(Pending::new());
        let (events_tx, events) = mpsc::unbounded_channel();
        let reader_pending = pending.clone();
        let reader = tokio::spawn(async move {
            // Reading also answers WebSocket pings: tungstenite queues the pong and flushes it
            // on the next read.
            while let Some(msg) = stream.next().await {
                let text = match msg {
                    Ok(Message::Text(text)) => text,
                    Ok(Message::Close(frame)) => {
                        tracing::debug!("gateway closed the connection: {frame:?}");
                        break;
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::debug!("websocket read failed: {e}");
                        break;
                    }
                };
                let frame: ServerFrame = match serde_json::from_str(text.as_str()) {
                    Ok(frame) => frame,
                    Err(e) => {
                        let shown: String = text.as_str().chars().take(200).collect();
                        tracing::warn!("skipping unparsable frame {shown:?}: {e}");
                        continue;
                    }
                };
                if let Some(frame) = reader_pending.route(frame) {
                    // The receiver is gone only when the client is dropped.
                    let _ = events_tx.send(frame);
                }
            }
            reader_pending.close();
        });

        Ok(Client {
            out,
            pending,
            events,
            next_cid: AtomicU64::new(1),
            reader,
            writer,
        })
    }

    fn cid(&self) -> String {
        self.next_cid.fetch_add(1, Ordering::Relaxed).to_string()
    }

    fn send_text(&self, text: String) -> Result<(), ClientError> {
        self.out
            .send(Message::Text(text.into()))
            .map_err(|_| ClientError::Closed)
    }

    /// Sends `frame` (an object without `cid`) with a fresh cid and waits for the reply.
    async fn request(&self, mut frame: serde_json::Value) -> Result<ServerFrame, ClientError> {
        let cid = self.cid();
        frame["cid"] = serde_json::Value::String(cid.clone());
        let rx = self.pending.register(&cid).ok_or(ClientError::Closed)?;
        if let Err(e) = self.send_text(frame.to_string()) {
            self.pending.forget(&cid);
            return Err(e);
        }
        match tokio::time::timeout(REPLY_TIMEOUT, rx).await {
            Err(_) => {
                self.pending.forget(&cid);
                Err(ClientError::Timeout)
            }
            Ok(Err(_)) => Err(ClientError::Closed),
            Ok(Ok(ServerFrame::Error { code, reason, .. })) => {
                Err(ClientError::Refused { code, reason })
            }
            Ok(Ok(reply)) => Ok(reply),
        }
    }

    fn unexpected(op: &str, reply: &ServerFrame) -> ClientError {
        ClientError::Protocol(format!(
            "expected {op:?} for cid {:?}, got {}",
            cid_of(reply),
            reply.to_json()
        ))
    }

    /// Joins `room`; returns once the gateway says `joined`.
    pub async fn join(&self, room: u64) -> Result<(), ClientError> {
        match self
            .request(json!({"op": "join", "room": Id(room)}))
            .await?
        {
            ServerFrame::Joined { .. } => Ok(()),
            other => Err(Self::unexpected("joined", &other)),
        }
    }

    /// Leaves `room`; returns once the gateway says `left`.
    pub async fn leave(&self, room: u64) -> Result<(), ClientError> {
        match self
            .request(json!({"op": "leave", "room": Id(room)}))
            .await?
        {
            ServerFrame::Left { .. } => Ok(()),
            other => Err(Self::unexpected("left", &other)),
        }
    }

    /// Publishes `body` into a joined `room`; returns the message id.
    pub async fn publish(&self, room: u64, body: &str) -> Result<u64, ClientError> {
        self.publish_with(room, body, false).await
    }

    /// [`Client::publish`] with `"trace": true`: the delivered frames carry every hop.
    pub async fn publish_traced(&self, room: u64, body: &str) -> Result<u64, ClientError> {
        self.publish_with(room, body, true).await
    }

    async fn publish_with(&self, room: u64, body: &str, trace: bool) -> Result<u64, ClientError> {
        let mut req = json!({"op": "publish", "room": Id(room), "body": body});
        if trace {
            req["trace"] = json!(true);
        }
        match self.request(req).await? {
            ServerFrame::Published { id, .. } => Ok(id.0),
            other => Err(Self::unexpected("published", &other)),
        }
    }

    /// Sends `body` to user `to`'s inbox; returns the message id once it is durably stored.
    pub async fn send(&self, to: u64, body: &str) -> Result<u64, ClientError> {
        match self
            .request(json!({"op": "send", "to": Id(to), "body": body}))
            .await?
        {
            ServerFrame::Sent { id, .. } => Ok(id.0),
            other => Err(Self::unexpected("sent", &other)),
        }
    }

    /// Acknowledges every inbox message up to and including `id`. No reply.
    pub async fn ack(&self, id: u64) -> Result<(), ClientError> {
        self.send_text(json!({"op": "ack", "id": Id(id)}).to_string())
    }

    /// Asks for the inbox messages after `after`; they arrive as `inbox` events.
    pub async fn sync(&self, after: u64) -> Result<(), ClientError> {
        self.send_text(json!({"op": "sync", "after": Id(after)}).to_string())
    }

    /// Sends `{"op":"ping"}` and waits for the `pong`.
    pub async fn ping(&self) -> Result<(), ClientError> {
        match self.request(json!({"op": "ping"})).await? {
            ServerFrame::Pong { .. } => Ok(()),
            other => Err(Self::unexpected("pong", &other)),
        }
    }

    /// Sends `text` as one text frame, unchanged (for tests of bad input).
    pub async fn send_raw(&self, text: &str) -> Result<(), ClientError> {
        self.send_text(text.to_string())
    }

    /// The next room, inbox or unsolicited error frame; `None` once the connection is closed
    /// and every frame received before has been returned.
    pub async fn next_event(&mut self) -> Option<ServerFrame> {
        self.events.recv().await
    }

    /// Like [`Client::next_event`] without waiting: `None` if nothing has arrived yet.
    pub fn try_next_event(&mut self) -> Option<ServerFrame> {
        self.events.try_recv().ok()
    }

    /// Closes the connection politely (a WebSocket close frame), waiting briefly for the
    /// gateway's answer.
    pub async fn close(mut self) {
        let _ = self.out.send(Message::Close(Some(CloseFrame {
            code: tungstenite::protocol::frame::coding::CloseCode::Normal,
            reason: "bye".into(),
        })));
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.writer).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.reader).await;
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

/// A client of the publisher HTTP API on a proxy.
#[derive(Clone, Debug)]
pub struct Publisher {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct IdsReply {
    ids: HashMap<String, Id>,
}

fn http_error(e: reqwest::Error) -> ClientError {
    if e.is_timeout() {
        ClientError::Timeout
    } else {
        ClientError::Io(e.to_string())
    }
}

impl Publisher {
    /// `base_url` is `http://host:port`; `token` is a publisher token, or `None` for a proxy
    /// running `--insecure-dev-auth`.
    pub fn new(base_url: &str, token: Option<String>) -> Publisher {
        Publisher {
            base: base_url.trim_end_matches('/').to_string(),
            token,
            http: reqwest::Client::builder()
                .timeout(REPLY_TIMEOUT)
                .build()
                .unwrap_or_else(|_| reqwest::Client::new()),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn authorize(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => req.bearer_auth(token),
            None => req,
        }
    }

    /// Sends `req` and parses the JSON answer if the status is `expect`.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        expect: u16,
    ) -> Result<T, ClientError> {
        let resp = self.authorize(req).send().await.map_err(http_error)?;
        let status = resp.status().as_u16();
        let body = resp.text().await.map_err(http_error)?;
        if status == 401 {
            return Err(ClientError::Unauthorized);
        }
        if status != expect {
            return Err(ClientError::Http { status, body });
        }
        serde_json::from_str(&body)
            .map_err(|e| ClientError::Protocol(format!("HTTP {status} body {body:?}: {e}")))
    }

    /// `POST /v1/rooms/{room}/messages`: real-time fan-out; returns the message id (202).
    pub async fn publish_room(
        &self,
        room: u64,
        body: &str,
        from: u64,
        sid: Option<u64>,
    ) -> Result<u64, ClientError> {
        self.publish_room_with(room, body, from, sid, false).await
    }

    /// [`Publisher::publish_room`] with `"trace": true`: the delivered frames carry every hop.
    pub async fn publish_room_traced(&self, room: u64, body: &str) -> Result<u64, ClientError> {
        self.publish_room_with(room, body, 0, None, true).await
    }

    async fn publish_room_with(
        &self,
        room: u64,
        body: &str,
        from: u64,
        sid: Option<u64>,
        trace: bool,
    ) -> Result<u64, ClientError> {
        let msg = PublishBody {
            body: body.to_string(),
            from: Some(Id(from)),
            sid: sid.map(Id),
            trace,
        };
        let req = self
            .http
            .post(self.url(&format!("/v1/rooms/{room}/messages")));
        let reply: IdReply = self.call(req.json(&msg), 202).await?;
        Ok(reply.id.0)
    }

    /// `POST /v1/users/{uid}/messages`: returns the message id once durably stored (201).
    pub async fn send_user(
        &self,
        uid: u64,
        body: &str,
        from: u64,
        sid: Option<u64>,
    ) -> Result<u64, ClientError> {
        self.send_user_with(uid, body, from, sid, false).await
    }

    /// [`Publisher::send_user`] with `"trace": true`: the delivered `inbox` frames carry every
    /// hop.
    pub async fn send_user_traced(&self, uid: u64, body: &str) -> Result<u64, ClientError> {
        self.send_user_with(uid, body, 0, None, true).await
    }

    async fn send_user_with(
        &self,
        uid: u64,
        body: &str,
        from: u64,
        sid: Option<u64>,
        trace: bool,
    ) -> Result<u64, ClientError> {
        let msg = PublishBody {
            body: body.to_string(),
            from: Some(Id(from)),
            sid: sid.map(Id),
            trace,
        };
        let req = self
            .http
            .post(self.url(&format!("/v1/users/{uid}/messages")));
        let reply: IdReply = self.call(req.json(&msg), 201).await?;
        Ok(reply.id.0)
    }

    /// `POST /v1/users/messages`: one stored message in every listed inbox; returns each
    /// user's message id (201).
    pub async fn send_users(
        &self,
        to: &[u64],
        body: &str,
        from: u64,
        sid: Option<u64>,
    ) -> Result<HashMap<u64, u64>, ClientError> {
        let msg = MulticastBody {
            to: to.iter().copied().map(Id).collect(),
            body: body.to_string(),
            from: Some(Id(from)),
            sid: sid.map(Id),
            trace: false,
        };
        let req = self.http.post(self.url("/v1/users/messages"));
        let reply: IdsReply = self.call(req.json(&msg), 201).await?;
        reply
            .ids
            .into_iter()
            .map(|(uid, id)| {
                uid.parse::<u64>()
                    .map(|uid| (uid, id.0))
                    .map_err(|_| ClientError::Protocol(format!("{uid:?} is not a user id")))
            })
            .collect()
    }

    /// `POST /v1/users/messages/batch`: one result per message, in order: its id once
    /// acknowledged, else why not and its `sid` for sending it again. Answers `Ok` when every
    /// message was acknowledged (201) and when only some were (503 with results); a request
    /// refused as a whole (bad input, the proxy's pending limit) is an `Err`.
    pub async fn send_batch(
        &self,
        messages: &[BatchItem],
    ) -> Result<Vec<BatchResult>, ClientError> {
        let req = self
            .http
            .post(self.url("/v1/users/messages/batch"))
            .json(&BatchBody {
                messages: messages.to_vec(),
            });
        let resp = self.authorize(req).send().await.map_err(http_error)?;
        let status = resp.status().as_u16();
        let body = resp.text().await.map_err(http_error)?;
        if status == 401 {
            return Err(ClientError::Unauthorized);
        }
        match (status, serde_json::from_str::<BatchReply>(&body)) {
            (201 | 503, Ok(reply)) if reply.results.len() == messages.len() => Ok(reply.results),
            (201, Ok(reply)) => Err(ClientError::Protocol(format!(
                "{} results for {} messages",
                reply.results.len(),
                messages.len()
            ))),
            _ => Err(ClientError::Http { status, body }),
        }
    }

    /// `GET /v1/gateways`: running gateways' WebSocket URLs, least loaded first.
    pub async fn gateways(&self) -> Result<Vec<String>, ClientError> {
        let reply: GatewaysReply = self
            .call(self.http.get(self.url("/v1/gateways")), 200)
            .await?;
        Ok(reply.gateways)
    }

    /// POSTs `body` as is to `path` (for tests of bad input); returns the status and body.
    pub async fn raw_post(
        &self,
        path: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> Result<(u16, String), ClientError> {
        let req = self
            .http
            .post(self.url(path))
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body);
        let resp = self.authorize(req).send().await.map_err(http_error)?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(http_error)?;
        Ok((status, text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_urls() {
        let token = Auth::Token("abc".into());
        assert_eq!(build_url("ws://h:1/v1/ws", &token), "ws://h:1/v1/ws");
        let dev = Auth::InsecureDev {
            uid: u64::MAX,
            device: "phone-1.a_b".into(),
        };
        assert_eq!(
            build_url("ws://h:1/v1/ws", &dev),
            "ws://h:1/v1/ws?uid=18446744073709551615&dev=phone-1.a_b"
        );
        assert_eq!(
            build_url("ws://h:1/v1/ws?x=1", &dev),
            "ws://h:1/v1/ws?x=1&uid=18446744073709551615&dev=phone-1.a_b"
        );
        let odd = Auth::InsecureDev {
            uid: 1,
            device: "a b&c".into(),
        };
        assert_eq!(
            build_url("ws://h/v1/ws", &odd),
            "ws://h/v1/ws?uid=1&dev=a%20b%26c"
        );
    }

    #[test]
    fn routes_replies_by_cid() {
        let pending = Pending::new();
        let mut rx = pending.register("7").expect("open");
        let room = ServerFrame::Room {
            room: Id(1),
            id: Id(2),
            from: Id(3),
            body: "hi".into(),
            ts: 4,
            trace: None,
        };
        assert_eq!(pending.route(room.clone()), Some(room));
        // An error with no waiter, or a waiter's cid that is not waited for, is an event.
        let stray = ServerFrame::Error {
            code: "bad_request".into(),
            reason: "x".into(),
            cid: None,
        };
        assert_eq!(pending.route(stray.clone()), Some(stray));
        let other = ServerFrame::Pong {
            cid: Some("8".into()),
        };
        assert_eq!(pending.route(other.clone()), Some(other));
        assert!(rx.try_recv().is_err());
        let joined = ServerFrame::Joined {
            room: Id(1),
            cid: Some("7".into()),
        };
        assert_eq!(pending.route(joined.clone()), None);
        assert_eq!(rx.try_recv().expect("routed"), joined);
        // Only once: a second reply with the same cid is an event.
        assert_eq!(pending.route(joined.clone()), Some(joined));
    }

    #[test]
    fn close_fails_waiters_and_later_requests() {
        let pending = Pending::new();
        let mut rx = pending.register("1").expect("open");
        pending.close();
        assert!(matches!(
            rx.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert!(pending.register("2").is_none());
        pending.forget("2");
    }

    #[test]
    fn forgotten_waiters_let_late_replies_through() {
        let pending = Pending::new();
        let _rx = pending.register("5").expect("open");
        pending.forget("5");
        let late = ServerFrame::Sent {
            id: Id(9),
            cid: Some("5".into()),
        };
        assert_eq!(pending.route(late.clone()), Some(late));
    }

    #[tokio::test]
    async fn connect_refused_is_io_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let err = Client::connect(
            &format!("ws://127.0.0.1:{port}/v1/ws"),
            &Auth::Token("t".into()),
        )
        .await
        .err()
        .expect("nothing listens");
        assert!(matches!(err, ClientError::Io(_)), "{err:?}");
    }

    /// A tiny fake gateway: accepts `Bearer good`, answers a few ops, pings the client once.
    #[allow(clippy::result_large_err)] // the handshake callback's type is tungstenite's
    async fn fake_gateway() -> String {
        use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let check =
                        |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
                            let auth = req
                                .headers()
                                .get(AUTHORIZATION)
                                .and_then(|v| v.to_str().ok());
                            let dev = req.uri().query().is_some_and(|q| q.contains("uid=5&dev=d"));
                            if auth == Some("Bearer good") || dev {
                                Ok(resp)
                            } else {
                                let mut e = ErrorResponse::new(Some("no".into()));
                                *e.status_mut() = tungstenite::http::StatusCode::UNAUTHORIZED;
                                Err(e)
                            }
                        };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, check).await else {
                        return;
                    };
                    ws.send(Message::Ping(vec![1, 2].into()))
                        .await
                        .expect("ping");
                    let room = |body: &str| json!({"op":"room","room":"1","id":"2","from":"3","body":body,"ts":4});
                    while let Some(Ok(msg)) = ws.next().await {
                        let text = match msg {
                            Message::Text(t) => t.to_string(),
                            Message::Pong(_) => {
                                let r = room("pong-seen").to_string();
                                ws.send(Message::Text(r.into())).await.expect("send");
                                continue;
                            }
                            Message::Close(_) => break,
                            _ => continue,
                        };
                        let v: serde_json::Value = match serde_json::from_str(&text) {
                            Ok(v) => v,
                            Err(_) => json!({"op":"garbage"}),
                        };
                        let cid = v["cid"].clone();
                        let replies = match v["op"].as_str().unwrap_or("") {
                            "join" => vec![
                                json!({"op":"joined","room":v["room"],"cid":cid}),
                                room("hello"),
                            ],
                            "leave" => vec![json!({"op":"left","room":v["room"],"cid":cid})],
                            "publish" => vec![
                                json!({"op":"error","code":"not_joined","reason":"join first","cid":cid}),
                            ],
                            "send" => vec![json!({"op":"sent","id":"77","cid":cid})],
                            "sync" => {
                                vec![json!({"op":"inbox","id":"9","from":"1","body":"b","ts":1})]
                            }
                            "ping" => vec![
                                json!("not a frame"),
                                json!({"op":"error","code":"bad_request","reason":"x"}),
                                json!({"op":"pong","cid":cid}),
                            ],
                            "silence" => vec![],
                            _ => vec![json!({"op":"error","code":"bad_request","reason":"?"})],
                        };
                        for r in replies {
                            ws.send(Message::Text(r.to_string().into()))
                                .await
                                .expect("send");
                        }
                    }
                });
            }
        });
        format!("ws://{addr}/v1/ws")
    }

    #[tokio::test]
    async fn talks_to_a_fake_gateway() {
        let url = fake_gateway().await;
        let err = Client::connect(&url, &Auth::Token("bad".into()))
            .await
            .err()
            .expect("401");
        assert!(matches!(err, ClientError::Unauthorized), "{err:?}");

        let mut c = Client::connect(&url, &Auth::Token("good".into()))
            .await
            .expect("connect");
        // The client answered the gateway's WebSocket ping.
        let first = c.next_event().await.expect("event");
        assert!(
            matches!(&first, ServerFrame::Room { body, .. } if body == "pong-seen"),
            "{first:?}"
        );
        c.join(1).await.expect("join");
        let hello = c.next_event().await.expect("event");
        assert!(
            matches!(&hello, ServerFrame::Room { body, .. } if body == "hello"),
            "{hello:?}"
        );
        let err = c.publish(1, "x").await.expect_err("refused");
        assert!(
            matches!(&err, ClientError::Refused { code, .. } if code == "not_joined"),
            "{err:?}"
        );
        assert_eq!(c.send(2, "x").await.expect("send"), 77);
        c.ping().await.expect("ping");
        // The unparsable frame was skipped; the error without cid is an event.
        let stray = c.next_event().await.expect("event");
        assert!(
            matches!(&stray, ServerFrame::Error { cid: None, .. }),
            "{stray:?}"
        );
        c.sync(0).await.expect("sync");
        let inbox = c.next_event().await.expect("event");
        assert!(
            matches!(inbox, ServerFrame::Inbox { id: Id(9), .. }),
            "{inbox:?}"
        );
        c.leave(1).await.expect("leave");
        assert!(c.try_next_event().is_none());
        c.close().await;

        let c = Client::connect(
            &url,
            &Auth::InsecureDev {
                uid: 5,
                device: "d".into(),
            },
        )
        .await
        .expect("dev auth");
        c.ping().await.expect("ping");
        c.close().await;
    }
}
