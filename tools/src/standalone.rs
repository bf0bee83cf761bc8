//! One of every role in one process, with an embedded registry instead of ZooKeeper and TLS
//! material made in memory. The roles still talk to each other over QUIC on loopback, exactly as
//! separate processes do.

use anyhow::Context;
use pixiu_registry::{Layout, Registry};
use pixiu_runtime::{admin, CommonConfig, Health, NodeEnv, Shutdown};
use pixiu_transport::TlsMaterial;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct StandaloneConfig {
    pub client_listen: SocketAddr,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub data_dir: PathBuf,
    pub insecure_dev_auth: bool,
    pub big_rooms: String,
    /// Serve the demo page at `GET /` on the client port.
    pub demo: bool,
}

/// Where a started standalone cluster listens, and its secret when it made one.
#[derive(Clone, Debug)]
pub struct Started {
    pub ws_url: String,
    /// The demo page, when it is served.
    pub demo_url: Option<String>,
    pub http_url: String,
    pub admin: SocketAddr,
    pub secret: Option<String>,
}

fn local_common() -> CommonConfig {
    CommonConfig {
        listen: "127.0.0.1:0".parse().expect("literal address"),
        ..CommonConfig::default()
    }
}

/// Start every role; returns once all are running (or an error), leaving them running until
/// `shutdown`. The returned handle ends when they all stopped.
pub async fn start(
    cfg: StandaloneConfig,
    shutdown: Shutdown,
) -> anyhow::Result<(Started, tokio::task::JoinHandle<()>)> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating the data dir {}", cfg.data_dir.display()))?;
    // The embedded registry starts afresh each run, so gateway ids (and their GatewayMsgIDs)
    // start over too: a routing table kept from an earlier run would hold newer versions for
    // them and refuse their updates. Start the router from an empty table.
    let router_dir = cfg.data_dir.join("router");
    if router_dir.exists() {
        std::fs::remove_dir_all(&router_dir)
            .with_context(|| format!("clearing {}", router_dir.display()))?;
    }
    let registry = Registry::embedded("standalone");
    registry
        .init_layout(&Layout {
            broker_partitions: 1,
            router_partitions: 1,
            xiu_partitions: 1,
            pi_partitions: 1,
        })
        .await
        .context("creating the embedded layout")?;
    let tls = Arc::new(TlsMaterial::generate_in_memory().context("making TLS material")?);
    let metrics = prometheus::Registry::new();
    let envs: Vec<NodeEnv> = (0..6)
        .map(|_| NodeEnv {
            registry: registry.clone(),
            metrics: metrics.clone(),
            tls: tls.clone(),
            health: Health::default(),
        })
        .collect();
    let healths: Vec<Health> = envs.iter().map(|e| e.health.clone()).collect();
    let secret = standalone_secret(&cfg)?;
    let admin_addr = admin::serve(cfg.admin, healths.clone(), metrics, shutdown.clone())
        .await
        .with_context(|| format!("serving admin on {}", cfg.admin))?;
    let mut tasks = spawn_roles(&cfg, secret.clone(), envs, &shutdown);
    wait_running(&healths, &mut tasks, &shutdown).await?;
    let handle = tokio::spawn(async move {
        while let Some(res) = tasks.join_next().await {
            match res {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!("{e:#}"),
                Err(e) => tracing::error!("a role task failed: {e}"),
            }
        }
    });
    Ok((
        Started {
            ws_url: format!("ws://{}/v1/ws", cfg.client_listen),
            demo_url: cfg.demo.then(|| format!("http://{}/", cfg.client_listen)),
            http_url: format!("http://{}", cfg.http),
            admin: admin_addr,
            secret,
        },
        handle,
    ))
}

/// The auth secret kept in the data dir (made on the first run), `None` in insecure dev mode.
fn standalone_secret(cfg: &StandaloneConfig) -> anyhow::Result<Option<String>> {
    if cfg.insecure_dev_auth {
        return Ok(None);
    }
    let path = cfg.data_dir.join("auth-secret");
    if let Ok(s) = std::fs::read_to_string(&path) {
        if !s.trim().is_empty() {
            return Ok(Some(s.trim().to_string()));
        }
    }
    use rand::Rng;
    let s: String = rand::thread_rng()
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(40)
        .map(char::from)
        .collect();
    std::fs::write(&path, &s).with_context(|| format!("writing {}", path.display()))?;
    Ok(Some(s))
}

type Roles = tokio::task::JoinSet<anyhow::Result<()>>;

/// Run one role's future as a task whose error names the role.
fn spawn_role<E: std::fmt::Display>(
    tasks: &mut Roles,
    name: &'static str,
    role: impl std::future::Future<Output = Result<(), E>> + Send + 'static,
) {
    tasks.spawn(async move { role.await.map_err(|e| anyhow::anyhow!("{name}: {e}")) });
}

/// Start the six roles, one replica each, each with its environment from `envs` (in the
/// order xiu, pi, router, broker, proxy, gateway).
fn spawn_roles(
    cfg: &StandaloneConfig,
    secret: Option<String>,
    envs: Vec<NodeEnv>,
    shutdown: &Shutdown,
) -> Roles {
    let mut envs = envs.into_iter();
    let mut env = || envs.next().expect("one environment per role");
    let mut tasks = Roles::new();
    // one replica each, so acknowledgement cannot wait for a follower: min_insync = 0
    let xiu = pixiu_xiu::service::XiuConfig {
        data_dir: Some(cfg.data_dir.join("xiu")),
        min_insync: 0,
        ..Default::default()
    };
    let xiu = pixiu_xiu::service::Config {
        common: local_common(),
        xiu,
    };
    spawn_role(
        &mut tasks,
        "xiu",
        pixiu_xiu::service::run_with(xiu, env(), shutdown.clone()),
    );
    let pi = pixiu_pi::service::PiConfig {
        data_dir: Some(cfg.data_dir.join("pi")),
        min_insync: 0,
        ..Default::default()
    };
    let pi = pixiu_pi::service::Config {
        common: local_common(),
        pi,
    };
    spawn_role(
        &mut tasks,
        "pi",
        pixiu_pi::service::run_with(pi, env(), shutdown.clone()),
    );
    let router = pixiu_router::RouterConfig {
        partition: 0,
        data_dir: cfg.data_dir.join("router"),
        ..Default::default()
    };
    let router = pixiu_router::Config {
        common: local_common(),
        router,
    };
    spawn_role(
        &mut tasks,
        "router",
        pixiu_router::run_with(router, env(), shutdown.clone()),
    );
    let broker = pixiu_broker::Config {
        common: local_common(),
        broker: pixiu_broker::BrokerConfig::default(),
    };
    spawn_role(
        &mut tasks,
        "broker",
        pixiu_broker::run_with(broker, env(), shutdown.clone()),
    );
    let proxy = pixiu_proxy::ProxyConfig {
        http: cfg.http,
        auth_secret: secret.clone(),
        insecure_dev_auth: cfg.insecure_dev_auth,
        big_rooms: cfg.big_rooms.clone(),
        ..Default::default()
    };
    let proxy = pixiu_proxy::Config {
        common: local_common(),
        proxy,
    };
    spawn_role(
        &mut tasks,
        "proxy",
        pixiu_proxy::run_with(proxy, env(), shutdown.clone()),
    );
    let gateway = pixiu_gateway::GatewayConfig {
        client_listen: cfg.client_listen,
        auth_secret: secret,
        insecure_dev_auth: cfg.insecure_dev_auth,
        big_rooms: cfg.big_rooms.clone(),
        demo: cfg.demo,
        ..Default::default()
    };
    let gateway = pixiu_gateway::Config {
        common: local_common(),
        gateway,
    };
    let sd = shutdown.clone();
    spawn_role(
        &mut tasks,
        "gateway",
        pixiu_gateway::run_with(gateway, env(), sd),
    );
    tasks
}

/// Wait until every role is ready, one of them fails (then all are stopped), 30 s pass, or a
/// signal asks to stop (the roles then drain as after a start).
async fn wait_running(
    healths: &[Health],
    tasks: &mut Roles,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !healths.iter().all(Health::is_ready) && !shutdown.is_cancelled() {
        if let Some(res) = tasks.try_join_next() {
            shutdown.cancel();
            match res {
                Ok(Err(e)) => return Err(e.context("starting the standalone cluster")),
                Ok(Ok(())) => anyhow::bail!("a role stopped while the standalone cluster started"),
                Err(e) => anyhow::bail!("a role task failed while starting: {e}"),
            }
        }
        if tokio::time::Instant::now() > deadline {
            shutdown.cancel();
            anyhow::bail!("the standalone cluster did not start within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
