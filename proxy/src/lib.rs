//! The proxy: the cluster's front door for publishers. Room messages come in from the HTTP API
//! and from gateways (client `publish`); each goes to broker partition `RoomID % N` and to the
//! running replica `(RoomID / N) % replicas` of it (seed 4.3, with the partition bits divided
//! out so that every replica gets a share; see `pixiu_protocol::routing::pick_replica`).
//! Replicas that stop answering heartbeats are skipped within a bounded time, even while
//! ZooKeeper still lists them (the seed's "fake death"). Receive, convert and send run as the
//! seed's pipeline (seed 4.4): the receivers (HTTP handlers and the QUIC inbound task) feed
//! N convert queues (N: the machine's cores unless set), which feed 3N send queues, over
//! lock-free queues, with the queue picked by room so one room's messages keep their order;
//! after a route change (a broker doubling) a room whose replica changed is held 50 ms so its
//! order holds across the switch. A publish with `"trace": true` gets this proxy's stamp.

mod http;
mod pipeline;
mod tokens;

use arc_swap::ArcSwap;
use pipeline::{Job, Pipeline, RouteTable, Routes};
use pixiu_protocol::ids::IdSource;
use pixiu_protocol::routing::BigRooms;
use pixiu_protocol::wire::{self, Message};
use pixiu_registry::{NodeState, Role};
use pixiu_runtime::{
    inbound, CommonConfig, Liveness, NodeEnv, Registering, RoleMetrics, Service, Shutdown,
};
use pixiu_transport::{Inbound, Transport};
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
    /// Convert queues (N); default: the machine's cores.
    pub convert_queues: Option<usize>,
    /// Capacity of each pipeline queue.
    pub queue_capacity: usize,
    /// Publisher `sid`s remembered for idempotent retries.
    pub sid_cache: usize,
    /// How long an inbox message may take to be acknowledged before the answer is 503.
    pub inbox_timeout_ms: u64,
    /// Inbox sends (`/v1/users/...`) waiting for their acknowledgement at once; one more is
    /// answered 503 at once with `Retry-After`, so load beyond what the stores take is
    /// refused instead of queued until every send times out.
    pub inbox_max_pending: usize,
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
            inbox_max_pending: 4096,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub common: CommonConfig,
    pub proxy: ProxyConfig,
}

pixiu_runtime::service_error! {}

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
        ("inbox_max_pending", pc.inbox_max_pending as u64, 1),
        ("heartbeat_interval_ms", pc.heartbeat_interval_ms, 10),
    ])
    .map_err(Error::Config)
}

/// Run a proxy against ZooKeeper until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), Error> {
    pixiu_runtime::in_own_process(&config.common.clone(), config, shutdown, run_with).await
}

/// Run a proxy in a given environment.
pub async fn run_with(config: Config, env: NodeEnv, shutdown: Shutdown) -> Result<(), Error> {
    check(&config)?;
    let pc = config.proxy.clone();
    pixiu_runtime::config::auth_loaded("proxy", pc.auth_secret.as_deref(), pc.insecure_dev_auth)
        .map_err(Error::Config)?;
    let big_rooms = BigRooms::parse(&pc.big_rooms).map_err(Error::Config)?;
    let (listener, http_addr) = pixiu_runtime::service::listen_tcp("publishers", pc.http).await?;
    let me = Registering {
        http: Some(http_addr.to_string()),
        ids: Some(IdSource::Proxy),
        ..Registering::role(Role::Proxy)
    };
    let (mut service, mut inbound) = Service::start(env, &config.common, me, shutdown).await?;
    let (transport, metrics) = (service.transport.clone(), service.metrics.clone());
    let mut brokers_rx = service.watch(Role::Broker).await?;
    let courier = pixiu_courier::Courier::new(
        transport.clone(),
        service.watch(Role::Xiu).await?,
        brokers_rx.clone(),
        Duration::from_millis(pc.inbox_timeout_ms),
    );
    let routes = Arc::new(ArcSwap::from_pointee(RouteTable::default()));
    let n = pc.convert_queues.unwrap_or_else(|| {
        // the seed has one queue per broker partition; the queues only spread the work over
        // threads (each message's broker is read from the current routes), so the count no
        // longer follows the brokers, whose count a doubling changes
        std::thread::available_parallelism()
            .map_or(2, usize::from)
            .clamp(1, 64)
    });
    let conv = pipeline::Converter {
        routes: routes.clone(),
        big_rooms,
        metrics: metrics.clone(),
        hop: service.hop(),
    };
    let pipeline = Pipeline::start(
        n,
        pc.queue_capacity,
        conv,
        transport.clone(),
        tokio::runtime::Handle::current(),
    );
    let app = http::router(Arc::new(http::HttpState {
        hop: service.hop(),
        tokens: pc
            .auth_secret
            .clone()
            .map(|s| tokens::PublisherTokens::new(s.into_bytes())),
        insecure_dev_auth: pc.insecure_dev_auth,
        pipeline: pipeline.clone(),
        routes: routes.clone(),
        ids: Arc::new(
            service
                .take_ids()
                .expect("registered with Registering::ids"),
        ),
        sids: std::sync::Mutex::new(lru::LruCache::new(
            std::num::NonZeroUsize::new(pc.sid_cache).expect("check: sid_cache >= 1"),
        )),
        gateways: service.watch(Role::Gateway).await?,
        metrics: metrics.clone(),
        big_rooms,
        courier,
        inbox_slots: Arc::new(tokio::sync::Semaphore::new(pc.inbox_max_pending)),
        inbox_max_pending: pc.inbox_max_pending,
        unacked_log: pixiu_runtime::Throttle::new(std::time::Duration::from_secs(1)),
    }));
    let server = pixiu_runtime::service::serve_http(listener, app, service.shutdown.clone());

    // The proxy turns running once it has the broker view: only then can it forward (seed 4.3).
    let mut p = Proxy {
        live: Liveness::new(Duration::from_millis(pc.heartbeat_timeout_ms)),
        brokers: brokers_rx.borrow_and_update().clone(),
        routes,
        pipeline,
        transport,
        metrics,
    };
    p.set_routes(Routes::build(&p.brokers, &p.live, Instant::now()));
    service.set_state(NodeState::Running).await?;
    tracing::info!(%http_addr, convert_queues = n, "proxy running");

    let mut heartbeat = tokio::time::interval(Duration::from_millis(pc.heartbeat_interval_ms));
    let shutdown = service.shutdown.clone();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(msg) = inbound.recv() => p.on_inbound(msg),
            Ok(()) = brokers_rx.changed() => {
                p.brokers = brokers_rx.borrow_and_update().clone();
                p.set_routes(Routes::build(&p.brokers, &p.live, Instant::now()));
            }
            _ = heartbeat.tick() => p.heartbeat(),
        }
    }
    let pipeline = p.pipeline.clone();
    service
        .drain(async move {
            let _ = server.await;
            pipeline.close();
        })
        .await;
    Ok(())
}

/// The proxy's own loop state: broker liveness and the routes the pipeline reads.
struct Proxy {
    live: Liveness,
    brokers: Arc<pixiu_registry::RoleView>,
    routes: Arc<ArcSwap<RouteTable>>,
    pipeline: Pipeline,
    transport: Transport,
    metrics: RoleMetrics,
}

impl Proxy {
    fn on_inbound(&mut self, inbound: Inbound) {
        let Some(received) = inbound::decode(inbound, &self.metrics) else {
            return;
        };
        match received.into_parts() {
            (from, Message::Pong { seq }, None) => self.live.pong(from, seq, Instant::now()),
            (_, Message::Publish(m), None) => self.relayed(m, None),
            (_, Message::TracedPublish { msg, trace }, None) => {
                let in_us = pixiu_protocol::trace::now_us();
                let trace = pipeline::Trace {
                    stamps: trace,
                    in_us,
                };
                self.relayed(msg, Some(trace))
            }
            (from, Message::Ping { seq }, None) => {
                self.transport
                    .send(from, wire::encode(&Message::Pong { seq }));
            }
            (from, other, reply) => {
                inbound::unexpected(&self.metrics, "proxy", from, &other, reply);
            }
        }
    }

    /// A client's publish, relayed by its gateway, into the pipeline.
    fn relayed(&self, m: pixiu_protocol::wire::RoomMessage, trace: Option<pipeline::Trace>) {
        self.metrics.inc_in("gateway_publish");
        self.pipeline.submit(Job {
            id: m.id,
            room: m.key.room,
            from: m.from,
            body: m.body,
            ts: m.ts,
            trace,
        });
    }

    /// Ping every broker replica; rebuild the routes when liveness changed them.
    fn heartbeat(&mut self) {
        let now = Instant::now();
        let addrs = self.brokers.all_addrs();
        self.live.retain(|a| addrs.contains(a));
        for a in addrs {
            let seq = self.live.ping_sent(a, now);
            self.transport.send(a, wire::encode(&Message::Ping { seq }));
        }
        let new = Routes::build(&self.brokers, &self.live, now);
        self.metrics
            .peers
            .with_label_values(&["broker_routable"])
            .set(new.partitions.iter().map(Vec::len).sum::<usize>() as i64);
        self.set_routes(new);
        self.pipeline.report_depths();
    }

    /// Publish `new` routes to the pipeline when they differ (noting when, so that keys whose
    /// replica changed keep their order: see `pipeline`).
    fn set_routes(&mut self, new: Routes) {
        let old = self.routes.load();
        if old.now != new {
            tracing::info!(routes = ?new, "broker routes changed");
            let table = RouteTable::changed(&old, new, Instant::now());
            self.routes.store(Arc::new(table));
        }
    }
}
