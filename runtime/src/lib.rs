//! What every PiXiu service shares and nothing protocol-specific: the common flags and TOML
//! config with the setting checks behind `--check-config`, asking a peer ([`ask()`]), the node
//! environment (registry, TLS, metrics, health), the admin HTTP server
//! (`/healthz`, `/metrics`), per-role metrics, peer liveness by heartbeat, tracing setup,
//! signal-driven shutdown, one-line fatal errors, and the registration that keeps snowflake
//! instances unique among live gateways and proxies. [`Service`] is the one way a role runs
//! (bind, register, its own registry view, state, drain); [`inbound`] decodes what arrives;
//! a [`Throttle`] keeps a warning an outage repeats to one line a second.

pub mod admin;
pub mod ask;
pub mod config;
pub mod inbound;
pub mod liveness;
pub mod metrics;
pub mod replication;
pub mod service;
pub mod throttle;

pub use ask::{ask, AskError};
pub use config::{CommonArgs, CommonConfig};
pub use inbound::Received;
pub use liveness::Liveness;
pub use metrics::RoleMetrics;
pub use service::{in_own_process, Hop, Registering, Service};
pub use throttle::Throttle;
pub use tokio_util::sync::CancellationToken as Shutdown;

use pixiu_registry::{Registry, ZkConfig};
use pixiu_transport::TlsMaterial;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("bad configuration: {0}")]
    Config(String),
    #[error("registry: {0}")]
    Registry(#[from] pixiu_registry::RegistryError),
    #[error("transport: {0}")]
    Transport(#[from] pixiu_transport::TransportError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot listen for {what} on {addr}: {source}")]
    Listen {
        what: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Readiness of one role: `/healthz` answers 200 only while every role of the process is ready.
#[derive(Clone, Default, Debug)]
pub struct Health(Arc<AtomicBool>);

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What a role needs from its surroundings. `run` builds it from flags; the standalone mode
/// builds one shared embedded registry and metrics registry for all roles in one process.
#[derive(Clone)]
pub struct NodeEnv {
    pub registry: Registry,
    pub metrics: prometheus::Registry,
    pub tls: Arc<TlsMaterial>,
    pub health: Health,
}

impl NodeEnv {
    /// Connect to ZooKeeper and load the TLS material named by the common config.
    pub async fn from_common(common: &CommonConfig) -> Result<NodeEnv, RuntimeError> {
        config::check_common(common)?;
        let hosts = common.zk.clone().expect("check_common requires --zk");
        let tls_dir = common
            .tls_dir
            .clone()
            .expect("check_common requires --tls-dir");
        let tls = TlsMaterial::load(&tls_dir)?;
        let registry = Registry::zookeeper(ZkConfig {
            hosts,
            cluster: common.cluster.clone(),
            session_timeout: Duration::from_millis(common.zk_session_timeout_ms),
            refresh_interval: Duration::from_millis(common.zk_refresh_ms),
        })
        .await?;
        Ok(NodeEnv {
            registry,
            metrics: prometheus::Registry::new(),
            tls: Arc::new(tls),
            health: Health::default(),
        })
    }
}

/// Start tracing with `RUST_LOG` filtering (default `info`).
pub fn init_tracing() {
    init_tracing_at("info");
}

/// Start tracing with `RUST_LOG` filtering, `default` when it is not set (operator commands
/// use `warn`, so that stderr holds the one-line reason of a failure and little else).
pub fn init_tracing_at(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Cancel `shutdown` on SIGINT or SIGTERM.
pub fn shutdown_on_signals(shutdown: Shutdown) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                tracing::error!("cannot install signal handlers");
                return;
            };
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: draining"),
                _ = int.recv() => tracing::info!("SIGINT: draining"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        shutdown.cancel();
    });
}

/// Run a role's future until it ends; once `shutdown` fires it gets `drain` to finish.
pub async fn run_until_drained<F>(fut: F, shutdown: Shutdown, drain: Duration) -> Option<F::Output>
where
    F: std::future::Future,
{
    tokio::pin!(fut);
    tokio::select! {
        out = &mut fut => return Some(out),
        _ = shutdown.cancelled() => {}
    }
    match tokio::time::timeout(drain, fut).await {
        Ok(out) => Some(out),
        Err(_) => {
            tracing::warn!(?drain, "drain time limit reached; stopping anyway");
            None
        }
    }
}

/// Read a secret file (trailing whitespace trimmed); a clear error names the file.
pub fn read_secret_file(path: &std::path::Path) -> Result<String, RuntimeError> {
    let s = std::fs::read_to_string(path).map_err(|e| {
        RuntimeError::Config(format!(
            "cannot read auth secret file {}: {e}",
            path.display()
        ))
    })?;
    let s = s.trim_end().to_string();
    if s.is_empty() {
        return Err(RuntimeError::Config(format!(
            "auth secret file {} is empty",
            path.display()
        )));
    }
    Ok(s)
}

/// Copy the transport's counters into gauges every second until shutdown.
pub fn export_transport_stats(
    transport: pixiu_transport::Transport,
    metrics: RoleMetrics,
    shutdown: Shutdown,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => metrics.set_transport(&transport.stats()),
            }
        }
    });
}

/// End a binary: on error print one line naming the reason (the whole cause chain) and exit 2.
pub fn exit_with(name: &str, res: anyhow::Result<()>) {
    if let Err(e) = res {
        // one line, whatever the causes print (TOML errors span several)
        let msg = format!("{e:#}")
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        eprintln!("{name}: {msg}");
        std::process::exit(2);
    }
}

impl NodeEnv {
    /// The environment of a service running as its own process: connect to ZooKeeper, load
    /// the TLS material and, when `admin` is set, serve `/healthz` and `/metrics` on it.
    pub async fn for_service(
        common: &CommonConfig,
        shutdown: &Shutdown,
    ) -> Result<NodeEnv, RuntimeError> {
        let env = NodeEnv::from_common(common).await?;
        if let Some(addr) = common.admin {
            admin::serve(
                addr,
                vec![env.health.clone()],
                env.metrics.clone(),
                shutdown.clone(),
            )
            .await
            .map_err(|e| RuntimeError::Config(format!("cannot serve admin on {addr}: {e}")))?;
        }
        Ok(env)
    }
}

/// The body of every service binary's `main` after flag parsing: a tokio runtime, SIGINT and
/// SIGTERM start a drain, the role runs until it ends or the drain time limit passes.
pub fn serve_until_signalled<F, Fut, E>(what: &str, drain: Duration, role: F) -> anyhow::Result<()>
where
    F: FnOnce(Shutdown) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    use anyhow::Context;
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    rt.block_on(async move {
        let shutdown = Shutdown::new();
        shutdown_on_signals(shutdown.clone());
        match run_until_drained(role(shutdown.clone()), shutdown, drain).await {
            Some(res) => res.with_context(|| format!("running the {what}")),
            None => Ok(()),
        }
    })
}

/// The auth secret: from the file when one is named, else `PIXIU_AUTH_SECRET`.
///
/// With `check_only` (`--check-config`) a named file is not read: the secret counts as given.
pub fn auth_secret(
    file: Option<&std::path::Path>,
    check_only: bool,
) -> Result<Option<String>, RuntimeError> {
    match file {
        Some(_) if check_only => Ok(None),
        Some(f) => read_secret_file(f).map(Some),
        None => Ok(std::env::var("PIXIU_AUTH_SECRET")
            .ok()
            .filter(|s| !s.is_empty())),
    }
}

/// Register a gateway or proxy so that no live node of its role mints message ids with the
/// same snowflake instance. Instances come from the registry id modulo 512, and ZooKeeper ids
/// only grow, so after 512 registrations two live nodes could share one and mint equal ids in
/// the same millisecond (a gateway would then drop one message as a duplicate). A clash means:
/// deregister, register again (a new, larger id), check again. The chosen instance is published
/// in the node's data, so later nodes check against what is really in use even after this
/// node re-registers with another id (the generator keeps its instance for the process's life).
pub async fn register_with_unique_instance(
    registry: &Registry,
    role: pixiu_registry::Role,
    info: pixiu_registry::NodeInfo,
    source: pixiu_protocol::ids::IdSource,
) -> Result<
    (
        pixiu_registry::Registration,
        pixiu_protocol::ids::SnowflakeGen,
    ),
    RuntimeError,
> {
    use pixiu_protocol::ids::SnowflakeGen;
    const ATTEMPTS: usize = 16;
    for _ in 0..ATTEMPTS {
        let reg = registry.register(role, None, info.clone()).await?;
        let mine = SnowflakeGen::instance_for(source, reg.id());
        let view = registry.read(role).await?;
        let clash = view.all().any(|(_, m)| {
            m.id != reg.id()
                && m.info
                    .instance
                    .unwrap_or_else(|| SnowflakeGen::instance_for(source, m.id))
                    == mine
        });
        if !clash {
            reg.update(|i| i.instance = Some(mine)).await?;
            return Ok((reg, SnowflakeGen::with_instance(mine)));
        }
        tracing::warn!(
            id = reg.id(),
            instance = mine,
            "snowflake instance in use by a live node; registering again"
        );
        reg.deregister().await?;
    }
    Err(RuntimeError::Config(format!(
        "no free snowflake instance after {ATTEMPTS} registrations (at most 512 live {}s)",
        role.as_str()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pixiu_protocol::ids::IdSource;
    use pixiu_registry::{Layout, NodeInfo, Role};

    /// Register and drop gateways until the last id had residue `r` mod 512 (the next
    /// registration then gets `r + 1`). At most 1,024 registrations.
    async fn burn_ids_until(registry: &Registry, r: u64) {
        for _ in 0..1024 {
            let reg = registry
                .register(Role::Gateway, None, NodeInfo::new("x:1"))
                .await
                .unwrap();
            if reg.id() % 512 == r {
                return;
            }
        }
        panic!("never reached residue {r}");
    }

    #[tokio::test]
    async fn unique_snowflake_instances() {
        let registry = Registry::embedded("t");
        registry.init_layout(&Layout::default()).await.unwrap();
        let (first, gen0) = register_with_unique_instance(
            &registry,
            Role::Gateway,
            NodeInfo::new("a:1"),
            IdSource::Gateway,
        )
        .await
        .unwrap();
        assert_eq!(gen0.instance(), 512 + (first.id() % 512) as u16);
        assert_eq!(first.info().instance, Some(gen0.instance()));
        // burn ids until the next one has the same instance as `first`
        burn_ids_until(&registry, (first.id() + 511) % 512).await;
        let (second, gen1) = register_with_unique_instance(
            &registry,
            Role::Gateway,
            NodeInfo::new("b:1"),
            IdSource::Gateway,
        )
        .await
        .unwrap();
        assert_ne!(
            gen1.instance(),
            gen0.instance(),
            "ids {} and {}",
            first.id(),
            second.id()
        );
        assert!(second.id() % 512 != first.id() % 512);
        // a node that published its instance is respected even when its id says otherwise
        let odd = registry
            .register(
                Role::Gateway,
                None,
                NodeInfo {
                    instance: Some(gen1.instance() + 1),
                    ..NodeInfo::new("c:1")
                },
            )
            .await
            .unwrap();
        burn_ids_until(&registry, second.id() % 512).await;
        let (_third, gen2) = register_with_unique_instance(
            &registry,
            Role::Gateway,
            NodeInfo::new("d:1"),
            IdSource::Gateway,
        )
        .await
        .unwrap();
        assert_ne!(
            gen2.instance(),
            gen1.instance() + 1,
            "the instance {odd:?} published is avoided"
        );
        assert_ne!(gen2.instance(), gen0.instance());
        assert_ne!(gen2.instance(), gen1.instance());
    }
}
