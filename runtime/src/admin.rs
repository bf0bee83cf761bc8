//! The admin HTTP server of every service: `GET /healthz` (200 once every role of the process
//! is running, 503 before and while draining) and `GET /metrics` (Prometheus text).

use crate::{metrics::render, Health, Shutdown};
use axum::{extract::State, http::StatusCode, routing::get, Router};
use std::net::SocketAddr;

#[derive(Clone)]
struct AdminState {
    health: Vec<Health>,
    metrics: prometheus::Registry,
}

/// Bind the admin server and serve it until shutdown. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    health: Vec<Health>,
    metrics: prometheus::Registry,
    shutdown: Shutdown,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_handler))
        .with_state(AdminState { health, metrics });
    tokio::spawn(async move {
        let res = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = res {
            tracing::error!("admin server: {e}");
        }
    });
    Ok(local)
}

async fn healthz(State(s): State<AdminState>) -> (StatusCode, &'static str) {
    if !s.health.is_empty() && s.health.iter().all(Health::is_ready) {
        (StatusCode::OK, "running\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not running\n")
    }
}

async fn metrics_handler(State(s): State<AdminState>) -> String {
    render(&s.metrics)
}
