//! The client side of the gateway: `GET /v1/ws`, authentication before the upgrade, then one
//! task per connection (`ws/conn.rs`) that parses frames, talks to the core and writes
//! replies, deciding what each request gets with its bookkeeping in `ws/session.rs`.

use crate::core::Cmd;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use pixiu_courier::Courier;
use pixiu_protocol::auth::{self, Identity};
use pixiu_protocol::client::ErrorReply;
use pixiu_protocol::ids::SnowflakeGen;
use pixiu_registry::RoleView;
use pixiu_runtime::{RoleMetrics, Shutdown};
use pixiu_transport::Transport;
use std::collections::HashMap;
use std::num::ParseIntError;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

mod conn;
mod session;
#[cfg(test)]
mod tests;

pub(crate) struct WsSettings {
    pub secret: Option<Vec<u8>>,
    pub insecure_dev_auth: bool,
    pub idle_timeout: Duration,
    pub client_queue: usize,
    pub publish_rate: u32,
    pub publish_burst: u32,
    /// This gateway, for the stamps of traced publishes.
    pub hop: pixiu_runtime::Hop,
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

fn unauthorized(e: &AuthError) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(ErrorReply {
            error: "unauthorized".into(),
            reason: e.to_string(),
        }),
    )
        .into_response()
}

/// Why a client may not connect; the text is the `reason` of the 401 reply.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AuthError {
    #[error("this gateway has no auth secret; tokens cannot be checked")]
    NoSecret,
    #[error(transparent)]
    BadToken(#[from] auth::AuthError),
    #[error("missing token (or ?uid= in insecure dev mode)")]
    MissingUid,
    #[error("uid must be a decimal u64")]
    BadUid(#[source] ParseIntError),
    #[error("device {0:?} must be 1..=64 bytes of [A-Za-z0-9_.-]")]
    BadDevice(String),
    #[error("missing token")]
    MissingToken,
}

/// Who connects: the token (`Authorization: Bearer ..`, else `?token=`), or without one and
/// only in insecure dev mode, `?uid=..&dev=..`.
fn authenticate(
    s: &WsSettings,
    headers: &HeaderMap,
    q: &HashMap<String, String>,
) -> Result<Identity, AuthError> {
    let bearer = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match bearer.or_else(|| q.get("token").map(String::as_str)) {
        Some(token) => {
            let secret = s.secret.as_deref().ok_or(AuthError::NoSecret)?;
            Ok(auth::verify_client(secret, token)?)
        }
        None if s.insecure_dev_auth => dev_identity(q),
        None => Err(AuthError::MissingToken),
    }
}

/// `?uid=..&dev=..` taken on trust (insecure dev mode); `dev` defaults to the default device.
fn dev_identity(q: &HashMap<String, String>) -> Result<Identity, AuthError> {
    let uid = q
        .get("uid")
        .ok_or(AuthError::MissingUid)?
        .parse::<u64>()
        .map_err(AuthError::BadUid)?;
    let device = q
        .get("dev")
        .cloned()
        .unwrap_or_else(|| auth::DEFAULT_DEVICE.into());
    if !auth::valid_device(&device) {
        return Err(AuthError::BadDevice(device));
    }
    Ok(Identity { uid, device })
}

async fn upgrade(
    State(state): State<Arc<WsState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Response {
    let who = match authenticate(&state.s, &headers, &q) {
        Ok(who) => who,
        Err(e) => {
            state.metrics.drop("connect", "unauthorized");
            return unauthorized(&e);
        }
    };
    // small per-connection buffers: most frames are small, and memory per connection is what
    // limits how many clients one gateway holds (the buffers grow on demand up to MAX_FRAME)
    ws.max_message_size(MAX_FRAME)
        .max_frame_size(MAX_FRAME)
        .read_buffer_size(4096)
        .write_buffer_size(4096)
        .on_upgrade(move |socket| conn::connection(state, who, socket))
}
