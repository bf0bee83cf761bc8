//! The publisher HTTP API: `POST /v1/rooms/{room}/messages`, `GET /v1/gateways`, and the inbox
//! endpoints `POST /v1/users/{uid}/messages`, `POST /v1/users/messages` (multicast) and `POST
//! /v1/users/messages/batch` (many messages), which answer 201 only once every message is
//! acknowledged (see `pixiu_courier`).
#![allow(clippy::result_large_err)] // axum responses are the handlers' error type

use crate::pipeline::{Job, Pipeline, RouteTable};
use arc_swap::ArcSwap;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lru::LruCache;
use pixiu_courier::{Courier, CourierError};

use pixiu_protocol::client::{
    BatchBody, BatchItem, BatchReply, BatchResult, ErrorReply, GatewaysReply, Id, IdReply,
    MulticastBody, PublishBody, MAX_BATCH,
};
use pixiu_protocol::ids::SnowflakeGen;
use pixiu_protocol::routing::BigRooms;
use pixiu_protocol::MAX_BODY;
use pixiu_registry::RoleView;
use pixiu_runtime::RoleMetrics;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

pub(crate) struct HttpState {
    /// This proxy as a hop of traced personal messages.
    pub hop: pixiu_runtime::Hop,
    /// Publisher tokens are checked against the auth secret (none: `insecure_dev_auth`).
    pub tokens: Option<crate::tokens::PublisherTokens>,
    pub insecure_dev_auth: bool,
    pub pipeline: Pipeline,
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub ids: Arc<SnowflakeGen>,
    pub sids: Mutex<LruCache<u64, u64>>,
    pub gateways: watch::Receiver<Arc<RoleView>>,
    pub metrics: RoleMetrics,
    pub big_rooms: BigRooms,
    pub courier: Courier,
    /// One permit per inbox send waiting for its acknowledgement (`inbox_max_pending`).
    pub inbox_slots: Arc<tokio::sync::Semaphore>,
    pub inbox_max_pending: usize,
    /// At most one warning a second for personal messages not acknowledged.
    pub unacked_log: pixiu_runtime::Throttle,
}

/// Largest request body read: a 64 KiB message body plus its JSON envelope.
const MAX_REQUEST: usize = MAX_BODY + 4096;

/// Largest body of a batch request: room for `MAX_BATCH` short messages or 64 of the longest.
const MAX_BATCH_REQUEST: usize = 64 * MAX_REQUEST;

pub(crate) fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/v1/rooms/{room}/messages", post(publish_room))
        .route("/v1/users/{uid}/messages", post(send_user))
        .route("/v1/users/messages", post(send_multicast))
        .route("/v1/users/messages/batch", post(send_batch))
        .route("/v1/gateways", get(gateways))
        .fallback(not_found)
        .with_state(state)
}

pub(crate) fn error(status: StatusCode, code: &str, reason: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorReply {
            error: code.into(),
            reason: reason.into(),
        }),
    )
        .into_response()
}

/// A refused request: counted as dropped at the `http` stage with its code as the reason.
fn refuse(s: &HttpState, status: StatusCode, code: &'static str, reason: String) -> Response {
    s.metrics.drop("http", code);
    error(status, code, reason)
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

fn authorize(s: &HttpState, headers: &HeaderMap) -> Result<(), Response> {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let res = match (token, &s.tokens) {
        (Some(t), Some(tokens)) => tokens
            .check(t, pixiu_protocol::now_ms() / 1000)
            .map_err(|e| e.to_string()),
        (None, _) if s.insecure_dev_auth => Ok(()),
        (Some(_), None) if s.insecure_dev_auth => Ok(()),
        _ => Err("missing publisher token (Authorization: Bearer ...)".to_string()),
    };
    res.map_err(|reason| {
        s.metrics.drop("http", "unauthorized");
        error(StatusCode::UNAUTHORIZED, "unauthorized", reason)
    })
}

/// Read and parse a JSON body with the size limits of the contract.
async fn read_json<T: serde::de::DeserializeOwned>(
    s: &HttpState,
    req: Request<Body>,
) -> Result<T, Response> {
    read_json_upto(s, req, MAX_REQUEST).await
}

/// Read and parse a JSON body of at most `limit` bytes.
async fn read_json_upto<T: serde::de::DeserializeOwned>(
    s: &HttpState,
    req: Request<Body>,
    limit: usize,
) -> Result<T, Response> {
    let bytes = axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|_| {
            s.metrics.drop("http", "too_large");
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("request body over {limit} bytes"),
            )
        })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        s.metrics.drop("http", "bad_request");
        error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("bad JSON body: {e}"),
        )
    })
}

async fn publish_room(
    State(s): State<Arc<HttpState>>,
    Path(room): Path<String>,
    req: Request<Body>,
) -> Response {
    let arrived = pixiu_protocol::trace::now_us();
    s.metrics.inc_in("http");
    if let Err(r) = authorize(&s, req.headers()) {
        return r;
    }
    let Ok(room) = room.parse::<u64>() else {
        s.metrics.drop("http", "bad_request");
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("room {room:?} is not a decimal u64"),
        );
    };
    let body: PublishBody = match read_json(&s, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if body.body.len() > MAX_BODY {
        s.metrics.drop("http", "too_large");
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("body is {} bytes, the limit is {MAX_BODY}", body.body.len()),
        );
    }
    let routes = s.routes.load();
    if !s
        .big_rooms
        .publish_keys(room)
        .iter()
        .any(|k| routes.now.pick(k).is_some())
    {
        s.metrics.drop("http", "no_broker");
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "no running broker replica serves this room",
        );
    }
    let sid = body.sid.map(|Id(sid)| sid);
    if let Some(sid) = sid {
        let mut sids = s.sids.lock().unwrap_or_else(|p| p.into_inner());
        if sids.get(&sid).is_some() {
            s.metrics.drop("http", "duplicate_sid");
            return (StatusCode::ACCEPTED, Json(IdReply { id: Id(sid) })).into_response();
        }
    }
    // a publisher's snowflake id is the message id, so gateways de-duplicate retries sent
    // through different proxies too
    let id = sid.unwrap_or_else(|| s.ids.next());
    let job = Job {
        id,
        room,
        from: body.from.map(|f| f.0).unwrap_or(0),
        trace: body.trace.then(|| crate::pipeline::Trace {
            stamps: Vec::new(),
            in_us: arrived,
        }),
        body: body.body,
        ts: pixiu_protocol::now_ms(),
    };
    if !s.pipeline.submit(job) {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the proxy is overloaded; retry",
        );
    }
    if let Some(sid) = sid {
        // remembered only once accepted: a refused request may be retried with the same sid
        s.sids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(sid, id);
    }
    (StatusCode::ACCEPTED, Json(IdReply { id: Id(id) })).into_response()
}

fn too_large(s: &HttpState, len: usize) -> Response {
    refuse(
        s,
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("body is {len} bytes, the limit is {MAX_BODY}"),
    )
}

/// Why a personal message was not acknowledged.
struct Refusal {
    status: StatusCode,
    code: &'static str,
    reason: String,
}

/// Takes `n` of the `inbox_max_pending` slots, or answers 503 with `Retry-After: 1` (nothing
/// was stored: the request may be sent again as it is).
fn take_slots(s: &HttpState, n: usize) -> Result<tokio::sync::OwnedSemaphorePermit, Response> {
    let permits = u32::try_from(n).unwrap_or(u32::MAX);
    let Ok(slots) = s.inbox_slots.clone().try_acquire_many_owned(permits) else {
        s.metrics.drop("http", "inbox_overloaded");
        let mut r = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!(
                "the proxy has {} personal messages waiting for acknowledgement (inbox_max_pending); retry",
                s.inbox_max_pending
            ),
        );
        r.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("1"),
        );
        return Err(r);
    };
    pending(s);
    Ok(slots)
}

/// Publishes how many personal messages wait for their acknowledgement.
fn pending(s: &HttpState) {
    let n = s.inbox_max_pending - s.inbox_slots.available_permits();
    s.metrics.set_queue("inbox_pending", n as i64);
}

/// Store, index, notify: the receivers' ids once acknowledged. The caller holds a slot. A
/// traced message (`traced`: when the request arrived, unix µs) carries this proxy's stamp to
/// Xiu.
async fn store(
    s: &HttpState,
    to: &[u64],
    body: String,
    (from, sid): (Option<Id>, u64),
    traced: Option<u64>,
) -> Result<BTreeMap<u64, u64>, Refusal> {
    let from = from.map(|Id(f)| f).unwrap_or(0);
    let trace = traced.map(|arrived| vec![s.hop.stamp(arrived)]);
    let ts = pixiu_protocol::now_ms();
    match s.courier.send_traced(sid, from, to, body, ts, trace).await {
        Ok(ids) => {
            s.metrics.add_out("inbox_stored", ids.len() as u64);
            Ok(ids)
        }
        Err(CourierError::BadRequest(reason)) => {
            s.metrics.drop("http", "bad_request");
            Err(Refusal {
                status: StatusCode::BAD_REQUEST,
                code: "bad_request",
                reason,
            })
        }
        Err(CourierError::Unavailable(reason)) => {
            s.metrics.drop("http", "inbox_unavailable");
            if let Some(held_back) = s.unacked_log.allow() {
                tracing::warn!(held_back, "inbox message not acknowledged: {reason}");
            }
            Err(Refusal {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "unavailable",
                reason,
            })
        }
    }
}

/// One personal message (to one receiver or many): the receivers' ids once acknowledged.
async fn deliver(
    s: &HttpState,
    to: &[u64],
    body: String,
    (from, sid): (Option<Id>, Option<Id>),
    traced: Option<u64>,
) -> Result<BTreeMap<u64, u64>, Response> {
    if body.len() > MAX_BODY {
        return Err(too_large(s, body.len()));
    }
    let slot = take_slots(s, 1)?;
    let sid = sid.map(|Id(x)| x).unwrap_or_else(|| s.ids.next());
    let stored = store(s, to, body, (from, sid), traced).await;
    drop(slot);
    pending(s);
    stored.map_err(|r| error(r.status, r.code, r.reason))
}

async fn send_user(
    State(s): State<Arc<HttpState>>,
    Path(uid): Path<String>,
    req: Request<Body>,
) -> Response {
    let arrived = pixiu_protocol::trace::now_us();
    s.metrics.inc_in("http");
    if let Err(r) = authorize(&s, req.headers()) {
        return r;
    }
    let Ok(uid) = uid.parse::<u64>() else {
        s.metrics.drop("http", "bad_request");
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("user {uid:?} is not a decimal u64"),
        );
    };
    let body: PublishBody = match read_json(&s, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let traced = body.trace.then_some(arrived);
    match deliver(&s, &[uid], body.body, (body.from, body.sid), traced).await {
        Ok(ids) => match ids.get(&uid) {
            Some(id) => (StatusCode::CREATED, Json(IdReply { id: Id(*id) })).into_response(),
            None => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "stored without an id for the receiver",
            ),
        },
        Err(r) => r,
    }
}

#[derive(serde::Serialize)]
struct IdsReply {
    ids: BTreeMap<String, Id>,
}

async fn send_multicast(State(s): State<Arc<HttpState>>, req: Request<Body>) -> Response {
    let arrived = pixiu_protocol::trace::now_us();
    s.metrics.inc_in("http");
    if let Err(r) = authorize(&s, req.headers()) {
        return r;
    }
    let body: MulticastBody = match read_json(&s, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let to: Vec<u64> = body.to.iter().map(|Id(u)| *u).collect();
    let traced = body.trace.then_some(arrived);
    match deliver(&s, &to, body.body, (body.from, body.sid), traced).await {
        Ok(ids) => (
            StatusCode::CREATED,
            Json(IdsReply {
                ids: ids
                    .into_iter()
                    .map(|(u, id)| (u.to_string(), Id(id)))
                    .collect(),
            }),
        )
            .into_response(),
        Err(r) => r,
    }
}

/// A message of a batch: its index in the request, its sid, the message.
type Queued = (usize, u64, BatchItem);

/// `POST /v1/users/messages/batch`: many personal messages in one request, each stored and
/// acknowledged on its own. The whole request is refused, nothing stored, when it is malformed,
/// a body is too long or the proxy has no slots for all of it. Messages to one user go one
/// after another in the batch's order, and after one of them is not acknowledged the later
/// ones to that user are not sent (so a retry of the failed ones keeps the order); different
/// users' messages go at once, and the courier sends those waiting for the same Xiu leader in
/// one request.
async fn send_batch(State(s): State<Arc<HttpState>>, req: Request<Body>) -> Response {
    let arrived = pixiu_protocol::trace::now_us();
    s.metrics.inc_in("http");
    if let Err(r) = authorize(&s, req.headers()) {
        return r;
    }
    let batch: BatchBody = match read_json_upto(&s, req, MAX_BATCH_REQUEST).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let n = batch.messages.len();
    if n == 0 || n > MAX_BATCH {
        return refuse(
            &s,
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("a batch holds 1 to {MAX_BATCH} messages, this one {n}"),
        );
    }
    if let Some((i, m)) = batch
        .messages
        .iter()
        .enumerate()
        .find(|(_, m)| m.body.len() > MAX_BODY)
    {
        return refuse(
            &s,
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "message {i}: body is {} bytes, the limit is {MAX_BODY}",
                m.body.len()
            ),
        );
    }
    if n > s.inbox_max_pending {
        return refuse(
            &s,
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!(
                "a batch of {n} messages is more than this proxy lets wait at once (inbox_max_pending {}); send smaller batches",
                s.inbox_max_pending
            ),
        );
    }
    let slots = match take_slots(&s, n) {
        Ok(slots) => slots,
        Err(r) => return r,
    };
    // one chain per receiver, in the order of first appearance
    let mut chains: Vec<(u64, Vec<Queued>)> = Vec::new();
    let mut chain_of: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
    for (i, m) in batch.messages.into_iter().enumerate() {
        let sid = m.sid.map(|Id(x)| x).unwrap_or_else(|| s.ids.next());
        let c = *chain_of.entry(m.to.0).or_insert_with(|| {
            chains.push((m.to.0, Vec::new()));
            chains.len() - 1
        });
        chains[c].1.push((i, sid, m));
    }
    let runs = chains.into_iter().map(|(uid, items)| {
        let s = &s;
        async move {
            let mut out = Vec::with_capacity(items.len());
            let mut earlier_failed = false;
            for (i, sid, m) in items {
                let failed = |error: &str, reason: String| BatchResult::Failed {
                    error: error.into(),
                    reason,
                    sid: Id(sid),
                };
                let r = if earlier_failed {
                    failed(
                        "unavailable",
                        "not sent: an earlier message of this batch to the same user was not acknowledged".into(),
                    )
                } else {
                    let traced = m.trace.then_some(arrived);
                    match store(s, &[uid], m.body, (m.from, sid), traced).await {
                        Ok(ids) => match ids.get(&uid) {
                            Some(id) => BatchResult::Stored { id: Id(*id) },
                            None => failed("internal", "stored without an id for the receiver".into()),
                        },
                        Err(r) => failed(r.code, r.reason),
                    }
                };
                earlier_failed |= matches!(r, BatchResult::Failed { .. });
                out.push((i, r));
            }
            out
        }
    });
    let mut results: Vec<(usize, BatchResult)> = futures::future::join_all(runs)
        .await
        .into_iter()
        .flatten()
        .collect();
    drop(slots);
    pending(&s);
    results.sort_unstable_by_key(|(i, _)| *i);
    let results: Vec<BatchResult> = results.into_iter().map(|(_, r)| r).collect();
    let failed = results
        .iter()
        .filter(|r| matches!(r, BatchResult::Failed { .. }))
        .count();
    if failed == 0 {
        return (
            StatusCode::CREATED,
            Json(BatchReply {
                error: None,
                reason: None,
                results,
            }),
        )
            .into_response();
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(BatchReply {
            error: Some("unavailable".into()),
            reason: Some(format!(
                "{failed} of {n} messages were not acknowledged; send them again with their sid"
            )),
            results,
        }),
    )
        .into_response()
}

async fn gateways(State(s): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&s, &headers) {
        return r;
    }
    let view = s.gateways.borrow().clone();
    let mut running: Vec<_> = view
        .running(0)
        .into_iter()
        .filter(|m| m.info.client_url.is_some())
        .collect();
    running.sort_by_key(|m| (m.info.load, m.id));
    let gateways = running
        .into_iter()
        .filter_map(|m| m.info.client_url.clone())
        .collect();
    (StatusCode::OK, Json(GatewaysReply { gateways })).into_response()
}
