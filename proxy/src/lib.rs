//! The proxy: the cluster's front door for publishers. Room messages come in from the HTTP API
//! and from gateways (client `publish`); each goes to broker partition `RoomID % N` and to the
//! running replica `(RoomID / N) % replicas` of it (seed 4.3, with the partition bits divided
//! out so that every replica gets a share; see `pixiu_protocol::routing::pick_replica`).
//! Replicas that stop answering heartbeats are skipped within a bounded time, even while
//! ZooKeeper still lists them (the seed's "fake death"). Receive, convert and send run as the
//! seed's pipeline (seed 4.4): the receivers (HTTP handlers and the QUIC inbound task) feed
//! N convert queues, which feed 3N send queues, over lock-free queues, with the queue picked by
//! room so one room's messages keep their order.

mod http;
mod pipeline;

use arc_swap::ArcSwap;
use pipeline::{Job, Pipeline, Routes};
use pixiu_protocol::ids::IdSource;
use pixiu_protocol::routing::BigRooms;
use pixiu_protocol::wire::{self, Message};
use pixiu_registry::{NodeInfo, NodeState, Role};
use pixiu_runtime::{CommonConfig, Liveness, NodeEnv, RoleMetrics, Shutdown};
use pixiu_transport::{Inbound, Transport, TransportConfig};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Proxy settings (TOML keys and flags of the same names).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Publisher HTTP API address.
    pub http: SocketAddr,
    pub auth_secret_file: Option<PathBuf>,
    #[serde(skip)]
    pub auth_secret: Option<String>,
    pub insecure_dev_auth: bool,
    /// Room ids `START..END` split into 64 virtual rooms.
    pub big_rooms: String,
    pub heartbeat_interval_ms: u64,
    /// A broker replica that has not answered heartbeats for this long gets no messages.
    pub heartbeat_timeout_ms: u64,
    /// Convert queues (N); default: the broker partition count at start.
    pub convert_queues: Option<usize>,
    /// Capacity of each pipeline queue.
    pub queue_capacity: usize,
    /// Publisher `sid`s remembered for idempotent retries.
    pub sid_cache: usize,
    /// How long an inbox message may take to be acknowledged before the answer is 503.
    pub inbox_timeout_ms: u64,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            http: "127.0.0.1:8701".parse().expect("literal address"),
            auth_secret_file: None,
            auth_secret: None,
            insecure_dev_auth: false,
            big_rooms: String::new(),
            heartbeat_interval_ms: 200,
            heartbeat_timeout_ms: 1000,
            convert_queues: None,
            queue_capacity: 65_536,
            sid_cache: 100_000,
            inbox_timeout_ms: 5000,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub common: CommonConfig,
    pub proxy: ProxyConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Runtime(#[from] pixiu_runtime::RuntimeError),
    #[error("registry: {0}")]
    Registry(#[from] pixiu_registry::RegistryError),
    #[error("transport: {0}")]
    Transport(#[from] pixiu_transport::TransportError),
    #[error("cannot listen for publishers on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What the proxy refuses in its own settings before it starts (`--check-config` too).
pub fn check(config: &Config) -> Result<(), Error> {
    let pc = &config.proxy;
    pixiu_runtime::config::check_auth(
        "proxy",
        pc.auth_secret.as_deref(),
        pc.auth_secret_file.as_deref(),
        pc.insecure_dev_auth,
    )
    .map_err(Error::Config)?;
    BigRooms::parse(&pc.big_rooms).map_err(Error::Config)?;
    if let Some(q) = pc.convert_queues {
        if !(1..=64).contains(&q) {
            return Err(Error::Config(format!(
                "convert_queues = {q} is outside 1..=64"
            )));
        }
    }
    pixiu_runtime::config::at_least(&[
        ("inbox_timeout_ms", pc.inbox_timeout_ms, 100),
        ("queue_capacity", pc.queue_capacity as u64, 16),
        ("sid_cache", pc.sid_cache as u64, 1),
        ("heartbeat_interval_ms", pc.heartbeat_interval_ms, 10),
    ])
    .map_err(Error::Config)
}

/// Run a proxy against ZooKeeper until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), Error> {
    let env = NodeEnv::for_service(&config.common, &shutdown).await?;
    let registry = env.registry.clone();
    let res = run_with(config, env, shutdown).await;
    registry.close().await;
    res
}

/// Run a proxy in a given environment.
pub async fn run_with(config: Config, env: NodeEnv, shutdown: Shutdown) -> Result<(), Error> {
    check(&config)?;
    let pc = config.proxy.clone();
    if pc.auth_secret.is_none() && !pc.insecure_dev_auth {
        return Err(Error::Config(
            "the proxy's auth secret was not loaded (--auth-secret-file or PIXIU_AUTH_SECRET)"
                .into(),
        ));
    }
    if pc.insecure_dev_auth {
        tracing::warn!("--insecure-dev-auth: publishers need no token; development only");
    }
    let big_rooms = BigRooms::parse(&pc.big_rooms).map_err(Error::Config)?;
    let metrics = RoleMetrics::new(&env.metrics, "proxy");
    let (transport, mut inbound) = Transport::bind(TransportConfig::new(
        config.common.listen,
        (*env.tls).clone(),
    ))
    .await?;
    let node_addr = transport.local_addr();
    pixiu_runtime::export_transport_stats(transport.clone(), metrics.clone(), shutdown.clone());

    let mut brokers_rx = env.registry.watch(Role::Broker).await?;
    let gateways_rx = env.registry.watch(Role::Gateway).await?;
    let courier = pixiu_courier::Courier::new(
        transport.clone(),
        env.registry.watch(Role::Xiu).await?,
        brokers_rx.clone(),
        Duration::from_millis(pc.inbox_timeout_ms),
    );
    let routes = Arc::new(ArcSwap::from_pointee(Routes::default()));
    let n = pc
        .convert_queues
        // one queue per broker partition unless set, as the seed's pipeline has
        .unwrap_or_else(|| (brokers_rx.borrow().partition_num as usize).clamp(1, 64));
    let pipeline = Pipeline::start(
        n,
        pc.queue_capacity,
        big_rooms,
        routes.clone(),
        transport.clone(),
        metrics.clone(),
        tokio::runtime::Handle::current(),
    );

    let listener = tokio::net::TcpListener::bind(pc.http)
        .await
        .map_err(|source| Error::Listen {
            addr: pc.http,
            source,
        })?;
    let http_addr = listener.local_addr().map_err(|source| Error::Listen {
        addr: pc.http,
        source,
    })?;
    let (registration, ids) = pixiu_runtime::register_with_unique_instance(
        &env.registry,
        Role::Proxy,
        NodeInfo {
            addr: node_addr.to_string(),
            state: NodeState::Init,
            admin: config.common.admin.map(|a| a.to_string()),
            client_url: None,
            http: Some(http_addr.to_string()),
            load: 0,
            instance: None,
        },
        IdSource::Proxy,
    )
    .await?;
    let ids = Arc::new(ids);
    let app = http::router(Arc::new(http::HttpState {
        secret: pc.auth_secret.clone().map(String::into_bytes),
        insecure_dev_auth: pc.insecure_dev_auth,
        pipeline: pipeline.clone(),
        routes: routes.clone(),
        ids,
        sids: std::sync::Mutex::new(lru::LruCache::new(
            std::num::NonZeroUsize::new(pc.sid_cache).expect("at least 1"),
        )),
        gateways: gateways_rx,
        metrics: metrics.clone(),
        big_rooms,
        courier,
    }));
    let server_shutdown = shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { server_shutdown.cancelled().await })
            .await
    });

    // The proxy registers after it has the broker view: only then can it forward (seed 4.3).
    let mut live = Liveness::new(Duration::from_millis(pc.heartbeat_timeout_ms));
    let mut brokers = brokers_rx.borrow_and_update().clone();
    routes.store(Arc::new(Routes::build(&brokers, &live, Instant::now())));
    registration.set_state(NodeState::Running).await?;
    env.health.set_ready(true);
    tracing::info!(id = registration.id(), %node_addr, %http_addr, convert_queues = n, "proxy running");

    let mut heartbeat = tokio::time::interval(Duration::from_millis(pc.heartbeat_interval_ms));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(msg) = inbound.recv() => match msg {
                Inbound::Message { from, bytes } => match wire::decode(&bytes) {
                    Ok(Message::Pong { seq }) => live.pong(from, seq, Instant::now()),
                    Ok(Message::Publish(m)) => {
                        metrics.inc_in("gateway_publish");
                        pipeline.submit(Job { id: m.id, room: m.key.room, from: m.from, body: m.body, ts: m.ts });
                    }
                    Ok(Message::Ping { seq }) => {
                        transport.send(from, wire::encode(&Message::Pong { seq }));
                    }
                    Ok(other) => {
                        metrics.drop("decode", "unexpected_kind");
                        tracing::debug!(%from, kind = other.kind(), "unexpected message");
                    }
                    Err(e) => {
                        metrics.drop("decode", "bad_frame");
                        tracing::debug!(%from, "bad frame: {e}");
                    }
                },
                Inbound::Request { reply, .. } => {
                    metrics.drop("request", "unexpected");
                    reply.send(wire::encode(&Message::Refused { reason: "a proxy serves no requests".into() }));
                }
            },
            Ok(()) = brokers_rx.changed() => {
                brokers = brokers_rx.borrow_and_update().clone();
                routes.store(Arc::new(Routes::build(&brokers, &live, Instant::now())));
            }
            _ = heartbeat.tick() => {
                let now = Instant::now();
                let addrs = brokers.all_addrs();
                live.retain(|a| addrs.contains(a));
                for a in addrs {
                    let seq = live.ping_sent(a, now);
                    transport.send(a, wire::encode(&Message::Ping { seq }));
                }
                let new = Routes::build(&brokers, &live, now);
                metrics
                    .peers
                    .with_label_values(&["broker_routable"])
                    .set(new.partitions.iter().map(Vec::len).sum::<usize>() as i64);
                if **routes.load() != new {
                    tracing::info!(routes = ?new, "broker routes changed");
                    routes.store(Arc::new(new));
                }
                pipeline.report_depths();
            }
        }
    }
    env.health.set_ready(false);
    tracing::info!("proxy draining");
    if let Err(e) = registration.deregister().await {
        tracing::warn!("deregistering: {e}");
    }
    let _ = server.await;
    pipeline.close();
    transport.close().await;
    Ok(())
}
