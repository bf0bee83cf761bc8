//! The one way a role runs as a service. Every role does the same around its own work: bind the
//! node-to-node transport and export its counters, register in the registry (`init`, or with a
//! snowflake instance unique among live nodes when it mints ids), watch its own role so that a
//! changed `partition_num` reaches it, say `running` (registry and `/healthz`), and at the end
//! drain: not ready, deregister, let the role finish its last work, close the transport.
//! [`Service`] holds that sequence; a role's `run_with` keeps only what is its own.
//!
//! [`in_own_process`] is the part of `run` that differs from `run_with`: a service started as
//! its own process connects to ZooKeeper, serves its admin port, and closes the registry
//! session when the role ends.

use crate::{CommonConfig, NodeEnv, RoleMetrics, RuntimeError, Shutdown};
use pixiu_protocol::ids::{IdSource, SnowflakeGen};
use pixiu_registry::{NodeInfo, NodeState, Registration, Role, RoleView};
use pixiu_transport::{Inbound, Transport, TransportConfig};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

/// What a node says about itself when it registers.
#[derive(Clone, Debug)]
pub struct Registering {
    pub role: Role,
    /// The partition of a partitioned role (broker, router, Xiu, Pi).
    pub partition: Option<u32>,
    /// Where clients connect (gateways).
    pub client_url: Option<String>,
    /// Where publishers post (proxies).
    pub http: Option<String>,
    /// Mint message ids: register with a snowflake instance no live node of the role uses.
    pub ids: Option<IdSource>,
}

impl Registering {
    /// A partitioned role's replica of `partition`.
    pub fn partition(role: Role, partition: u32) -> Registering {
        Registering {
            partition: Some(partition),
            ..Registering::role(role)
        }
    }

    /// A node of an unpartitioned role.
    pub fn role(role: Role) -> Registering {
        Registering {
            role,
            partition: None,
            client_url: None,
            http: None,
            ids: None,
        }
    }
}

/// A registered node with its transport: what every role's loop works with.
pub struct Service {
    pub env: NodeEnv,
    pub transport: Transport,
    pub metrics: RoleMetrics,
    pub registration: Registration,
    /// The node's own role in the registry: its `partition_num` and its peer replicas. The
    /// place to react to a doubling of the role.
    pub peers: watch::Receiver<Arc<RoleView>>,
    pub shutdown: Shutdown,
    /// The snowflake generator of a node registered with [`Registering::ids`].
    ids: Option<SnowflakeGen>,
    pub(crate) role: Role,
}

impl Service {
    /// Bind the transport on `common.listen`, export its counters, watch the role and register
    /// the node in state `init`. Inbound datagrams and requests arrive on the receiver.
    pub async fn start(
        env: NodeEnv,
        common: &CommonConfig,
        me: Registering,
        shutdown: Shutdown,
    ) -> Result<(Service, mpsc::Receiver<Inbound>), RuntimeError> {
        let metrics = RoleMetrics::new(&env.metrics, me.role.as_str());
        let (transport, inbound) =
            Transport::bind(TransportConfig::new(common.listen, (*env.tls).clone())).await?;
        let addr = transport.local_addr();
        crate::export_transport_stats(transport.clone(), metrics.clone(), shutdown.clone());
        let peers = env.registry.watch(me.role).await?;
        let info = NodeInfo {
            admin: common.admin.map(|a| a.to_string()),
            client_url: me.client_url.clone(),
            http: me.http.clone(),
            ..NodeInfo::new(addr.to_string())
        };
        let (registration, ids) = match me.ids {
            Some(source) => {
                let (reg, ids) =
                    crate::register_with_unique_instance(&env.registry, me.role, info, source)
                        .await?;
                (reg, Some(ids))
            }
            None => (
                env.registry.register(me.role, me.partition, info).await?,
                None,
            ),
        };
        tracing::info!(
            role = me.role.as_str(),
            id = registration.id(),
            partition = me.partition,
            %addr,
            "registered (init)"
        );
        let service = Service {
            env,
            transport,
            metrics,
            registration,
            peers,
            shutdown,
            ids,
            role: me.role,
        };
        Ok((service, inbound))
    }

    /// The node's transport address, as registered.
    pub fn addr(&self) -> SocketAddr {
        self.transport.local_addr()
    }

    /// The node's registry id (it changes when the ZooKeeper session is renewed).
    pub fn id_watch(&self) -> watch::Receiver<u64> {
        self.registration.id_watch()
    }

    /// This node as a hop of traced messages (`"trace": true`).
    pub fn hop(&self) -> Hop {
        Hop {
            role: self.role.as_str(),
            node: self.id_watch(),
            partition: self
                .role
                .is_partitioned()
                .then(|| self.registration.partition()),
            addr: self.registration.info().addr,
        }
    }

    /// Watch another role in the registry.
    pub async fn watch(&self, role: Role) -> Result<watch::Receiver<Arc<RoleView>>, RuntimeError> {
        Ok(self.env.registry.watch(role).await?)
    }

    /// The id generator of a node registered with [`Registering::ids`] (taken once).
    pub fn take_ids(&mut self) -> Option<SnowflakeGen> {
        self.ids.take()
    }

    /// Publish `state` in the registry; `/healthz` is ready exactly while it is `running`.
    pub async fn set_state(&self, state: NodeState) -> Result<(), RuntimeError> {
        self.registration.set_state(state).await?;
        self.env.health.set_ready(state == NodeState::Running);
        tracing::info!(role = self.role.as_str(), ?state, "state");
        Ok(())
    }

    /// Publish the role's `partition_num` this replica now works under (see
    /// `NodeInfo::serving`): what `pixiu-ctl scale-out` waits for after a doubling.
    pub async fn set_serving(&self, partition_num: u32) -> Result<(), RuntimeError> {
        self.registration
            .update(|i| i.serving = Some(partition_num))
            .await?;
        tracing::info!(role = self.role.as_str(), partition_num, "serving");
        Ok(())
    }

    /// The drain every role ends with: not ready, deregistered (peers stop sending), then the
    /// role's own `last_work` (answers in flight, queues emptied), then the transport closes.
    pub async fn drain(self, last_work: impl Future<Output = ()>) {
        self.env.health.set_ready(false);
        tracing::info!(role = self.role.as_str(), "draining");
        if let Err(e) = self.registration.deregister().await {
            tracing::warn!("deregistering: {e}");
        }
        last_work.await;
        self.transport.close().await;
    }
}

/// Run a role as its own process: connect to ZooKeeper, serve the admin port when one is set,
/// run the role's `run_with` in that environment, then close the registry session whatever
/// the outcome. A role's `run(config, shutdown)` is this with its own `run_with`.
pub async fn in_own_process<C, E, Fut>(
    common: &CommonConfig,
    config: C,
    shutdown: Shutdown,
    run_with: impl FnOnce(C, NodeEnv, Shutdown) -> Fut,
) -> Result<(), E>
where
    Fut: Future<Output = Result<(), E>>,
    E: From<RuntimeError>,
{
    let env = NodeEnv::for_service(common, &shutdown).await?;
    let registry = env.registry.clone();
    let res = run_with(config, env, shutdown).await;
    registry.close().await;
    res
}

/// Bind a TCP listener for a role's clients or publishers (`what` names them in the error).
pub async fn listen_tcp(
    what: &'static str,
    addr: SocketAddr,
) -> Result<(tokio::net::TcpListener, SocketAddr), RuntimeError> {
    let listen = |source| RuntimeError::Listen { what, addr, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(listen)?;
    let bound = listener.local_addr().map_err(listen)?;
    Ok((listener, bound))
}

/// Serve `app` on `listener` until `shutdown` (then finish the requests in flight). The
/// handle ends when the server has stopped.
///
/// Every accepted socket gets `TCP_NODELAY`: frames and answers are small and already
/// batched by the writers, and with Nagle's algorithm on, a write behind an unacknowledged
/// one waits for the peer's delayed ACK (up to 40 ms on Linux): a room with one member fed
/// 1,000 messages a second showed p50 12 ms, p99 28 ms, max 40 ms that way.
pub fn serve_http(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: Shutdown,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(no_delay);
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    })
}

/// Turn Nagle's algorithm off on an accepted socket (see [`serve_http`]); a failure is
/// logged and the socket served as it is.
fn no_delay(tcp: &mut tokio::net::TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!("could not set TCP_NODELAY on an accepted socket: {e}");
    }
}

/// The error enum of a role's library, `Error`: the role's own setting refusals
/// (`Config`), everything [`RuntimeError`] covers (`Runtime`), and the variants given.
#[macro_export]
macro_rules! service_error {
    ($($variants:tt)*) => {
        /// Why the role could not start, or stopped.
        #[derive(Debug, thiserror::Error)]
        pub enum Error {
            /// A setting of the role is out of range or missing.
            #[error("bad configuration: {0}")]
            Config(String),
            #[error(transparent)]
            Runtime(#[from] $crate::RuntimeError),
            $($variants)*
        }
    };
}

/// The whole `main` of a service binary once its flags are parsed: start tracing, load the TOML
/// file named by `--config`, apply the common flags and then the role's own (`role_flags`,
/// told whether this is `--check-config`), assemble the role's config, and either report the
/// check (`--check-config`: nothing is bound or connected) or run the role until SIGINT or
/// SIGTERM and its drain. Any error ends the process with one line and exit code 2.
pub fn service_main<S, C, E, RE, Fut>(
    name: &str,
    args: &crate::CommonArgs,
    role_flags: impl FnOnce(&mut S, bool) -> anyhow::Result<()>,
    assemble: impl FnOnce(CommonConfig, S) -> C,
    check: impl FnOnce(&C) -> Result<(), E>,
    run: impl FnOnce(C, Shutdown) -> Fut,
) where
    S: serde::de::DeserializeOwned + Default,
    E: std::error::Error + Send + Sync + 'static,
    RE: std::error::Error + Send + Sync + 'static,
    Fut: Future<Output = Result<(), RE>>,
{
    use anyhow::Context;
    let res = (|| {
        crate::init_tracing();
        let (mut common, mut settings): (_, S) =
            crate::config::load_toml(args.config.as_deref()).context("loading the config file")?;
        args.apply(&mut common);
        role_flags(&mut settings, args.check_config)?;
        let drain = std::time::Duration::from_millis(common.drain_ms);
        if args.check_config {
            let checked = common.clone();
            let config = assemble(common, settings);
            return crate::config::report_check(name, &checked, || check(&config));
        }
        let config = assemble(common, settings);
        let what = name.strip_prefix("pixiu-").unwrap_or(name);
        crate::serve_until_signalled(what, drain, |shutdown| run(config, shutdown))
    })();
    crate::exit_with(name, res);
}

/// A node as a hop of traced messages: what its stamps say about it.
#[derive(Clone, Debug)]
pub struct Hop {
    role: &'static str,
    node: watch::Receiver<u64>,
    partition: Option<u32>,
    addr: String,
}

impl Hop {
    /// A hop for tests and tools, not registered anywhere.
    pub fn fixed(role: &'static str, node: u64, partition: Option<u32>, addr: &str) -> Hop {
        Hop {
            role,
            node: watch::channel(node).1,
            partition,
            addr: addr.to_string(),
        }
    }

    /// This node's stamp for a message that arrived at `in_us` and leaves now.
    pub fn stamp(&self, in_us: u64) -> pixiu_protocol::trace::Stamp {
        pixiu_protocol::trace::Stamp {
            role: self.role.to_string(),
            node: *self.node.borrow(),
            partition: self.partition,
            addr: self.addr.clone(),
            in_us,
            out_us: pixiu_protocol::trace::now_us(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An accepted socket leaves `no_delay` with Nagle's algorithm off (the kernel's
    /// default is on, which the first assertion checks, so this can fail).
    #[tokio::test]
    async fn accepted_sockets_have_nagle_off() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut accepted, _) = listener.accept().await.unwrap();
        assert!(!accepted.nodelay().unwrap());
        no_delay(&mut accepted);
        assert!(accepted.nodelay().unwrap());
    }
}
