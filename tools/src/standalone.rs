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
    let env = || NodeEnv {
        registry: registry.clone(),
        metrics: metrics.clone(),
        tls: tls.clone(),
        health: Health::default(),
    };
    let secret = if cfg.insecure_dev_auth {
        None
    } else {
        let path = cfg.data_dir.join("auth-secret");
        let s = match std::fs::read_to_string(&path) {
            Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
            _ => {
                use rand::Rng;
                let s: String = rand::thread_rng()
                    .sample_iter(&rand::distributions::Alphanumeric)
                    .take(40)
                    .map(char::from)
                    .collect();
                std::fs::write(&path, &s).with_context(|| format!("writing {}", path.display()))?;
                s
            }
        };
        Some(s)
    };

    let (router_env, broker_env, proxy_env, gateway_env) = (env(), env(), env(), env());
    let (xiu_env, pi_env) = (env(), env());
    let healths = vec![
        xiu_env.health.clone(),
        pi_env.health.clone(),
        router_env.health.clone(),
        broker_env.health.clone(),
        proxy_env.health.clone(),
        gateway_env.health.clone(),
    ];
    let admin_addr = admin::serve(
        cfg.admin,
        healths.clone(),
        metrics.clone(),
        shutdown.clone(),
    )
    .await
    .with_context(|| format!("serving admin on {}", cfg.admin))?;

    let mut tasks = tokio::task::JoinSet::new();
    // one replica each, so acknowledgement cannot wait for a follower: min_insync = 0
    let xiu_cfg = pixiu_xiu::service::Config {
        common: local_common(),
        xiu: pixiu_xiu::service::XiuConfig {
            data_dir: Some(cfg.data_dir.join("xiu")),
            min_insync: 0,
            ..Default::default()
        },
    };
    let sd = shutdown.clone();
    tasks.spawn(async move {
        pixiu_xiu::service::run_with(xiu_cfg, xiu_env, sd)
            .await
            .map_err(|e| anyhow::anyhow!("xiu: {e}"))
    });
    let pi_cfg = pixiu_pi::service::Config {
        common: local_common(),
        pi: pixiu_pi::service::PiConfig {
            data_dir: Some(cfg.data_dir.join("pi")),
            min_insync: 0,
            ..Default::default()
        },
    };
    let sd = shutdown.clone();
    tasks.spawn(async move {
        pixiu_pi::service::run_with(pi_cfg, pi_env, sd)
            .await
            .map_err(|e| anyhow::anyhow!("pi: {e}"))
    });
    let router_cfg = pixiu_router::Config {
        common: local_common(),
        router: pixiu_router::RouterConfig {
            partition: 0,
            data_dir: cfg.data_dir.join("router"),
            ..Default::default()
        },
    };
    let sd = shutdown.clone();
    tasks.spawn(async move {
        pixiu_router::run_with(router_cfg, router_env, sd)
            .await
            .map_err(|e| anyhow::anyhow!("router: {e}"))
    });
    let broker_cfg = pixiu_broker::Config {
        common: local_common(),
        broker: pixiu_broker::BrokerConfig::default(),
    };
    let sd = shutdown.clone();
    tasks.spawn(async move {
        pixiu_broker::run_with(broker_cfg, broker_env, sd)
            .await
            .map_err(|e| anyhow::anyhow!("broker: {e}"))
    });
    let proxy_cfg = pixiu_proxy::Config {
        common: local_common(),
        proxy: pixiu_proxy::ProxyConfig {
            http: cfg.http,
            auth_secret: secret.clone(),
            insecure_dev_auth: cfg.insecure_dev_auth,
            big_rooms: cfg.big_rooms.clone(),
            ..Default::default()
        },
    };
    let sd = shutdown.clone();
    tasks.spawn(async move {
        pixiu_proxy::run_with(proxy_cfg, proxy_env, sd)
            .await
            .map_err(|e| anyhow::anyhow!("proxy: {e}"))
    });
    let gateway_cfg = pixiu_gateway::Config {
        common: local_common(),
        gateway: pixiu_gateway::GatewayConfig {
            client_listen: cfg.client_listen,
            auth_secret: secret.clone(),
            insecure_dev_auth: cfg.insecure_dev_auth,
            big_rooms: cfg.big_rooms.clone(),
            demo: cfg.demo,
            ..Default::default()
        },
    };
    let sd = shutdown.clone();
    tasks.spawn(async move {
        pixiu_gateway::run_with(gateway_cfg, gateway_env, sd)
            .await
            .map_err(|e| anyhow::anyhow!("gateway: {e}"))
    });

    // wait until every role runs, or one of them fails
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !healths.iter().all(Health::is_ready) {
        if shutdown.is_cancelled() {
            // asked to stop (a signal) while starting: the roles drain as after a start
            break;
        }
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
