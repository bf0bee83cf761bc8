//! The gateway: where clients connect (WebSocket, `/v1/ws`). It keeps which local connections
//! are in which room, tells the routers when the first local member of a room arrives and when
//! the last one leaves (Gateway Messages with increasing `GatewayMsgID`s, seed 7.2 and 7.3),
//! de-duplicates room messages from brokers by id and fans them out to the local members, and
//! answers a room message for a room it no longer has members in with negative feedback so the
//! brokers stop sending it. Client `publish` goes to a proxy. A traced room message
//! (`"trace": true`) gets this gateway's stamp, and its frame shows every hop. On the same
//! port, `GET /` serves the demo page (`demo.rs`, off with `--demo false`).

mod core;
mod demo;
mod inbox;
mod pacing;
mod rate;
mod rooms;
mod ws;

use pixiu_protocol::routing::BigRooms;
use pixiu_registry::{NodeState, Role};
use pixiu_runtime::{CommonConfig, NodeEnv, Registering, Service, Shutdown};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Gateway settings (TOML keys and flags of the same names).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// WebSocket listen address.
    pub client_listen: SocketAddr,
    /// The URL clients are told to use (`GET /v1/gateways`); default `ws://<client_listen>/v1/ws`.
    pub client_url: Option<String>,
    pub auth_secret_file: Option<PathBuf>,
    /// The HS256 secret itself (from `PIXIU_AUTH_SECRET` or the file).
    #[serde(skip)]
    pub auth_secret: Option<String>,
    pub insecure_dev_auth: bool,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout_ms: u64,
    /// Room ids `START..END` split into 64 virtual rooms.
    pub big_rooms: String,
    /// How long a `join` waits for every running broker replica of the room to confirm the route.
    pub join_timeout_ms: u64,
    /// Every this often the gateway re-announces its rooms (repairs lost Gateway Messages).
    pub refresh_interval_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub heartbeat_timeout_ms: u64,
    /// Room message ids remembered for de-duplication.
    pub dedup_capacity: usize,
    /// Entries (one reply, or one batch of room messages) queued per client before room
    /// messages to it are dropped.
    pub client_queue: usize,
    /// At most one fan-out of room messages per this long: a message that comes sooner after
    /// the last fan-out waits for the next one, with the others that came meanwhile (0: every
    /// round of datagrams at once).
    pub fanout_interval_ms: u64,
    /// `publish` frames a connection may send per second (0: unlimited); beyond it the client
    /// gets `rate_limited`.
    pub publish_rate: u32,
    /// How many publishes a quiet connection may save up.
    pub publish_burst: u32,
    /// Every this often each connected device is reported to its broker.
    pub inbox_heartbeat_ms: u64,
    /// How long a client `send` may take to be acknowledged before `unavailable`.
    pub inbox_timeout_ms: u64,
    /// Serve the demo page at `GET /` on the client port.
    pub demo: bool,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            client_listen: "127.0.0.1:8700".parse().expect("literal address"),
            client_url: None,
            auth_secret_file: None,
            auth_secret: None,
            insecure_dev_auth: false,
            idle_timeout_ms: 60_000,
            big_rooms: String::new(),
            join_timeout_ms: 3000,
            refresh_interval_ms: 15_000,
            heartbeat_interval_ms: 300,
            heartbeat_timeout_ms: 1500,
            dedup_capacity: 65_536,
            client_queue: 1024,
            fanout_interval_ms: 20,
            publish_rate: 100,
            publish_burst: 200,
            inbox_heartbeat_ms: 10_000,
            inbox_timeout_ms: 5000,
            demo: true,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub common: CommonConfig,
    pub gateway: GatewayConfig,
}

pixiu_runtime::service_error! {}

/// The longest `fanout_interval_ms` accepted.
const MAX_FANOUT_INTERVAL_MS: u64 = 100;

/// What the gateway refuses in its own settings before it starts (`--check-config` too).
pub fn check(config: &Config) -> Result<(), Error> {
    let g = &config.gateway;
    pixiu_runtime::config::check_auth(
        "gateway",
        g.auth_secret.as_deref(),
        g.auth_secret_file.as_deref(),
        g.insecure_dev_auth,
    )
    .map_err(Error::Config)?;
    BigRooms::parse(&g.big_rooms).map_err(Error::Config)?;
    if g.fanout_interval_ms > MAX_FANOUT_INTERVAL_MS {
        return Err(Error::Config(format!(
            "fanout_interval_ms = {} is above its greatest value, {MAX_FANOUT_INTERVAL_MS} (it is added to room message latency)",
            g.fanout_interval_ms
        )));
    }
    pixiu_runtime::config::at_least(&[
        ("inbox_timeout_ms", g.inbox_timeout_ms, 100),
        ("refresh_interval_ms", g.refresh_interval_ms, 100),
        ("heartbeat_interval_ms", g.heartbeat_interval_ms, 10),
        ("heartbeat_timeout_ms", g.heartbeat_timeout_ms, 10),
        ("dedup_capacity", g.dedup_capacity as u64, 16),
        ("inbox_heartbeat_ms", g.inbox_heartbeat_ms, 50),
        ("idle_timeout_ms", g.idle_timeout_ms, 100),
        ("client_queue", g.client_queue as u64, 8),
        // a burst matters only when the rate limits (publish_rate 0 is unlimited)
        (
            "publish_burst",
            u64::from(g.publish_burst),
            u64::from(g.publish_rate > 0),
        ),
    ])
    .map_err(Error::Config)
}

/// Run a gateway against ZooKeeper until `shutdown`, then drain and deregister.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), Error> {
    pixiu_runtime::in_own_process(&config.common.clone(), config, shutdown, run_with).await
}

/// Run a gateway in a given environment (shared registry and metrics in standalone mode).
pub async fn run_with(config: Config, env: NodeEnv, shutdown: Shutdown) -> Result<(), Error> {
    check(&config)?;
    let g = config.gateway.clone();
    let secret = g.auth_secret.clone();
    pixiu_runtime::config::auth_loaded("gateway", secret.as_deref(), g.insecure_dev_auth)
        .map_err(Error::Config)?;
    let big_rooms = BigRooms::parse(&g.big_rooms).map_err(Error::Config)?;
    let (listener, client_addr) =
        pixiu_runtime::service::listen_tcp("clients", g.client_listen).await?;
    let client_url = g
        .client_url
        .clone()
        .unwrap_or_else(|| format!("ws://{client_addr}/v1/ws"));
    let me = Registering {
        client_url: Some(client_url.clone()),
        ids: Some(pixiu_protocol::ids::IdSource::Gateway),
        ..Registering::role(Role::Gateway)
    };
    let (mut service, inbound) = Service::start(env, &config.common, me, shutdown).await?;
    let (transport, metrics) = (service.transport.clone(), service.metrics.clone());
    let message_ids = service
        .take_ids()
        .expect("registered with Registering::ids");
    let node_addr = service.addr();
    let routers = service.watch(Role::Router).await?;
    let brokers = service.watch(Role::Broker).await?;
    let proxies = service.watch(Role::Proxy).await?;
    let courier = pixiu_courier::Courier::new(
        transport.clone(),
        service.watch(Role::Xiu).await?,
        brokers.clone(),
        Duration::from_millis(g.inbox_timeout_ms),
    );
    let shutdown = service.shutdown.clone();

    let (cmd_tx, cmd_rx) = tokio::sync::mpsc::channel(65_536);
    let core = core::Core::new(
        core::CoreSettings {
            big_rooms,
            join_timeout: Duration::from_millis(g.join_timeout_ms),
            refresh_interval: Duration::from_millis(g.refresh_interval_ms),
            heartbeat_interval: Duration::from_millis(g.heartbeat_interval_ms),
            heartbeat_timeout: Duration::from_millis(g.heartbeat_timeout_ms),
            dedup_capacity: g.dedup_capacity,
            node_addr,
            inbox_heartbeat: Duration::from_millis(g.inbox_heartbeat_ms),
            hop: service.hop(),
            fanout_interval: Duration::from_millis(g.fanout_interval_ms),
        },
        transport.clone(),
        metrics.clone(),
        service.id_watch(),
        routers,
        brokers,
    );
    let core_task = tokio::spawn(core.run(cmd_rx, inbound, shutdown.clone()));
    tokio::spawn(count_running_proxies(
        proxies.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));

    let ws_state = Arc::new(ws::WsState::new(
        ws::WsSettings {
            secret: secret.map(String::into_bytes),
            insecure_dev_auth: g.insecure_dev_auth,
            idle_timeout: Duration::from_millis(g.idle_timeout_ms),
            client_queue: g.client_queue,
            publish_rate: g.publish_rate,
            publish_burst: g.publish_burst,
            hop: service.hop(),
        },
        cmd_tx,
        transport.clone(),
        proxies,
        metrics.clone(),
        message_ids,
        shutdown.clone(),
        courier,
    ));
    let app = if g.demo {
        ws::router(ws_state).merge(demo::router())
    } else {
        ws::router(ws_state)
    };
    let server = pixiu_runtime::service::serve_http(listener, app, shutdown.clone());

    service.set_state(NodeState::Running).await?;
    tracing::info!(%client_url, "gateway running");
    report_load(&service).await;
    service
        .drain(async move {
            let _ = server.await;
            let _ = core_task.await;
        })
        .await;
    Ok(())
}

/// `pixiu_peers{kind="proxy_running"}`: the proxies this gateway can send publishes and
/// stores to, as its registry view shows them (0: every client `publish` is refused
/// `unavailable`).
async fn count_running_proxies(
    mut proxies: tokio::sync::watch::Receiver<Arc<pixiu_registry::RoleView>>,
    metrics: pixiu_runtime::RoleMetrics,
    shutdown: Shutdown,
) {
    let gauge = metrics.peers.with_label_values(&["proxy_running"]);
    loop {
        let running = proxies.borrow_and_update().running_addrs(0).len();
        gauge.set(running as i64);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = proxies.changed() => if changed.is_err() { return },
        }
    }
}

/// Keep the registered load (connection count) roughly current until shutdown: the least
/// loaded gateways come first in `/v1/gateways`.
async fn report_load(service: &Service) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut last_load = u64::MAX;
    loop {
        tokio::select! {
            _ = service.shutdown.cancelled() => return,
            _ = tick.tick() => {
                let load = service.metrics.connections.get().max(0) as u64;
                if load == last_load {
                    continue;
                }
                match service.registration.update(|i| i.load = load).await {
                    Ok(()) => last_load = load,
                    Err(e) => tracing::warn!("cannot update registered load: {e}"),
                }
            }
        }
    }
}
