//! The demo page: one HTML file with its JavaScript inline, served at `GET /` on the client
//! port (off with `--demo false`). It speaks only the documented WebSocket protocol
//! (`/v1/ws`), so it shows what any client sees: join a room, publish into it, send a personal
//! message, acknowledge the inbox.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

const PAGE: &str = include_str!("demo.html");

pub(crate) fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route("/", get(page))
}

async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            // the page loads nothing from elsewhere and talks only to its own gateway
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self' ws: wss:",
            ),
        ],
        PAGE,
    )
}
