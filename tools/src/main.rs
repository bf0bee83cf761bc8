//! `pixiu-ctl`: the operator tool. `init`, `status`, `token`, `scale-out`, `probe`, `replay`,
//! `standalone`.

use anyhow::Context;
use clap::{Parser, Subcommand};
use pixiu_registry::{Layout, Registry, ZkConfig};
use pixiu_runtime::Shutdown;
use pixiu_tools::standalone::{self, StandaloneConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "pixiu-ctl", version, about = "Operate a PiXiu cluster")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Debug, Clone)]
struct ZkArgs {
    /// ZooKeeper connect string.
    #[arg(long, env = "PIXIU_ZK")]
    zk: String,
    /// Cluster name.
    #[arg(long, env = "PIXIU_CLUSTER", default_value = "default")]
    cluster: String,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create the cluster's layout (partition counts are powers of two); with --tls-dir also a
    /// development CA and node certificate when the folder has none.
    Init {
        #[command(flatten)]
        zk: ZkArgs,
        #[arg(long)]
        broker_partitions: u32,
        #[arg(long)]
        router_partitions: u32,
        #[arg(long, default_value_t = 1)]
        xiu_partitions: u32,
        #[arg(long, default_value_t = 1)]
        pi_partitions: u32,
        #[arg(long)]
        tls_dir: Option<PathBuf>,
    },
    /// Every node: role, partition, replica id, state, address.
    Status {
        #[command(flatten)]
        zk: ZkArgs,
        #[arg(long)]
        json: bool,
    },
    /// Print a client (or publisher) token.
    Token {
        #[arg(long)]
        uid: u64,
        #[arg(long)]
        dev: Option<String>,
        #[arg(long)]
        publisher: bool,
        #[arg(long)]
        auth_secret_file: PathBuf,
        #[arg(long, default_value_t = 86_400)]
        ttl: u64,
    },
    /// Double the partitions of ROLE from N to 2N once replicas of partitions N..2N-1 run:
    /// wait for them, flip partition_num, wait until every replica serves the new count.
    ScaleOut {
        /// broker, router, xiu or pi.
        role: String,
        #[command(flatten)]
        zk: ZkArgs,
        /// Give up a wait after this many seconds (partition_num is left as it was when the
        /// new partitions do not all run in time).
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// One JSON object on stdout instead of the human summary.
        #[arg(long)]
        json: bool,
    },
    /// Every stored inbox message of a user received in [--since, --until), oldest first,
    /// whatever the devices acknowledged, as JSON lines in the `inbox` frame format.
    Replay {
        #[command(flatten)]
        zk: ZkArgs,
        #[arg(long, required_unless_present = "rebuild_pi")]
        uid: Option<u64>,
        /// Unix milliseconds or RFC 3339; default: the beginning.
        #[arg(long)]
        since: Option<String>,
        /// Unix milliseconds or RFC 3339 (excluded); default: no end.
        #[arg(long)]
        until: Option<String>,
        /// Write the lines here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The cluster's TLS folder (ca.pem, node.pem, node.key): Xiu speaks mutual TLS.
        #[arg(long, env = "PIXIU_TLS_DIR")]
        tls_dir: PathBuf,
        /// Push the messages again, with their ids, to the user's online devices.
        #[arg(long)]
        redeliver: bool,
        /// Messages a second when redelivering.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
        rate: u32,
        /// Rebuild Pi partition --partition from Xiu's records (plan only without --execute).
        #[arg(long, requires = "partition", conflicts_with_all = ["uid", "redeliver", "since", "until", "out"])]
        rebuild_pi: bool,
        #[arg(long, requires = "rebuild_pi")]
        partition: Option<u32>,
        /// Write the rebuilt lists (and verify them).
        #[arg(long, requires = "rebuild_pi")]
        execute: bool,
    },
    /// The synthetic latency probe: pseudo-users on every gateway, traced room and personal
    /// messages through every proxy, broker, router, Xiu and Pi partition; per path the latency
    /// and each hop's share, and the node to blame for every path that failed.
    Probe(ProbeArgs),
    /// One of every role (proxy, broker, router, gateway, xiu, pi) in one process, no
    /// ZooKeeper; inbox messages and the auth secret are kept in --data-dir across restarts.
    Standalone {
        #[arg(long, default_value = "127.0.0.1:8700")]
        client_listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:8701")]
        http: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:8702")]
        admin: SocketAddr,
        #[arg(long, default_value = "./.pixiu")]
        data_dir: PathBuf,
        #[arg(long)]
        insecure_dev_auth: bool,
        /// Room ids START..END split into 64 virtual rooms.
        #[arg(long, default_value = "")]
        big_rooms: String,
        /// Serve the demo page at GET / on the client port.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        demo: bool,
    },
}

/// `pixiu-ctl probe`'s flags.
#[derive(clap::Args, Debug)]
struct ProbeArgs {
    #[command(flatten)]
    zk: ZkArgs,
    /// Pause between rounds.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Run this many rounds, then exit 0 if every path worked, 1 if any failed.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    /// A message not delivered within this many ms of its round's start failed.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..))]
    timeout_ms: u64,
    /// A node that does not answer the probe's ping within this many ms is unresponsive
    /// (default: a fifth of --timeout-ms, at most 1000).
    #[arg(long)]
    ping_timeout_ms: Option<u64>,
    /// Run until stopped, serving Prometheus metrics at http://ADDR/metrics.
    #[arg(long, conflicts_with = "count")]
    serve: Option<SocketAddr>,
    /// With --serve: consecutive failed rounds before a path counts as failed.
    #[arg(long, default_value_t = pixiu_tools::probe::serve::DEFAULT_FAIL_AFTER, value_parser = clap::value_parser!(u32).range(1..))]
    fail_after: u32,
    /// The first pseudo-user (and pseudo-room) id.
    #[arg(long, default_value_t = pixiu_tools::probe::DEFAULT_UID_BASE)]
    uid_base: u64,
    /// The cluster's auth secret (the probe signs its pseudo-users' tokens).
    #[arg(long, env = "PIXIU_AUTH_SECRET_FILE")]
    auth_secret_file: PathBuf,
    /// The cluster's TLS folder (ca.pem, node.pem, node.key): nodes are pinged over QUIC.
    #[arg(long, env = "PIXIU_TLS_DIR")]
    tls_dir: PathBuf,
    /// One JSON object on stdout instead of the tables.
    #[arg(long)]
    json: bool,
    /// Check the flags, print "configuration ok" and exit (like a service's
    /// --check-config: no file is read, ZooKeeper is not contacted).
    #[arg(long)]
    check_config: bool,
}

fn main() {
    let cli = Cli::parse();
    pixiu_runtime::exit_with("pixiu-ctl", real_main(cli));
}

async fn connect(zk: &ZkArgs) -> anyhow::Result<Registry> {
    Registry::zookeeper(ZkConfig {
        hosts: zk.zk.clone(),
        cluster: zk.cluster.clone(),
        session_timeout: Duration::from_secs(6),
        refresh_interval: Duration::from_secs(2),
    })
    .await
    .with_context(|| format!("connecting to ZooKeeper at {}", zk.zk))
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    // the standalone cluster logs like a service; the operator commands only warn
    match cli.cmd {
        Cmd::Standalone { .. } => pixiu_runtime::init_tracing(),
        _ => pixiu_runtime::init_tracing_at("warn"),
    }
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Init {
                zk,
                broker_partitions,
                router_partitions,
                xiu_partitions,
                pi_partitions,
                tls_dir,
            } => {
                let layout = Layout {
                    broker_partitions,
                    router_partitions,
                    xiu_partitions,
                    pi_partitions,
                };
                init(&zk, layout, tls_dir.as_deref()).await
            }
            Cmd::Status { zk, json } => status(&zk, json).await,
            Cmd::Token {
                uid,
                dev,
                publisher,
                auth_secret_file,
                ttl,
            } => token(uid, dev.as_deref(), publisher, &auth_secret_file, ttl),
            Cmd::ScaleOut {
                role,
                zk,
                timeout,
                dry_run,
                json,
            } => scale_out(&role, &zk, Duration::from_secs(timeout), dry_run, json).await,
            Cmd::Replay {
                zk,
                uid,
                since,
                until,
                out,
                tls_dir,
                redeliver,
                rate,
                rebuild_pi,
                partition,
                execute,
            } => match (rebuild_pi, partition, uid) {
                (true, Some(partition), _) => rebuild(&zk, partition, execute, &tls_dir).await,
                (_, _, Some(uid)) => {
                    let window = pixiu_tools::replay::window(since.as_deref(), until.as_deref())
                        .map_err(anyhow::Error::msg)?;
                    let redeliver = redeliver.then_some(rate);
                    replay(&zk, uid, window, out.as_deref(), &tls_dir, redeliver).await
                }
                _ => anyhow::bail!("replay needs --uid, or --rebuild-pi with --partition"),
            },
            Cmd::Probe(args) => probe_cmd(args).await,
            Cmd::Standalone {
                client_listen,
                http,
                admin,
                data_dir,
                insecure_dev_auth,
                big_rooms,
                demo,
            } => {
                run_standalone(StandaloneConfig {
                    client_listen,
                    http,
                    admin,
                    data_dir,
                    insecure_dev_auth,
                    big_rooms,
                    demo,
                })
                .await
            }
        }
    })
}

/// `pixiu-ctl init`: write development TLS material when asked, then the cluster layout.
async fn init(
    zk: &ZkArgs,
    layout: Layout,
    tls_dir: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    if let Some(dir) = tls_dir {
        let wrote = pixiu_transport::generate_dev_tls(dir)
            .with_context(|| format!("writing TLS material into {}", dir.display()))?;
        let what = if wrote {
            "wrote a new CA and node certificate in"
        } else {
            "kept the TLS material already in"
        };
        println!("{what} {}", dir.display());
    }
    let registry = connect(zk).await?;
    pixiu_tools::init(&registry, &layout).await?;
    registry.close().await;
    println!("cluster {:?} initialised: {layout:?}", zk.cluster);
    Ok(())
}

/// `pixiu-ctl status`: every role's partitions and nodes, as a table or JSON.
async fn status(zk: &ZkArgs, json: bool) -> anyhow::Result<()> {
    let registry = connect(zk).await?;
    let s = pixiu_tools::status(&registry).await?;
    registry.close().await;
    if json {
        let text = serde_json::to_string_pretty(&s).context("rendering JSON")?;
        println!("{text}");
    } else {
        print!("{}", pixiu_tools::render_status(&s));
    }
    Ok(())
}

/// `pixiu-ctl token`: a client or publisher token signed with the secret in the file.
fn token(
    uid: u64,
    dev: Option<&str>,
    publisher: bool,
    auth_secret_file: &std::path::Path,
    ttl: u64,
) -> anyhow::Result<()> {
    if let Some(d) = dev {
        anyhow::ensure!(
            pixiu_protocol::auth::valid_device(d),
            "device {d:?} must be 1..=64 bytes of [A-Za-z0-9_.-]"
        );
    }
    let secret = pixiu_runtime::read_secret_file(auth_secret_file)?;
    let token = pixiu_protocol::auth::issue(secret.as_bytes(), uid, dev, publisher, ttl);
    println!("{token}");
    Ok(())
}

/// `pixiu-ctl replay`: the lines on stdout (or `--out`; with `--redeliver` only there), the
/// summaries on stderr; a partition that cannot be read, or a record that cannot, exits 1, and
/// so does a redelivery that reached no device; bad usage, ZooKeeper or TLS exits 2.
async fn replay(
    zk: &ZkArgs,
    uid: u64,
    window: pixiu_tools::replay::Window,
    out: Option<&std::path::Path>,
    tls_dir: &std::path::Path,
    redeliver: Option<u32>,
) -> anyhow::Result<()> {
    use pixiu_tools::replay;
    use std::io::Write;
    let transport = tool_transport(tls_dir).await?;
    let mut sink: Box<dyn Write> = match out {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None if redeliver.is_some() => Box::new(std::io::sink()),
        None => Box::new(std::io::BufWriter::new(std::io::stdout())),
    };
    let registry = connect(zk).await?;
    let res = async {
        let export = replay::export(&registry, &transport, uid, window).await?;
        let pushed = match redeliver {
            Some(rate) => {
                let r = replay::redeliver(&registry, &transport, uid, &export.messages, rate);
                Some(r.await?)
            }
            None => None,
        };
        Ok::<_, replay::ReplayError>((export, pushed))
    }
    .await;
    registry.close().await;
    transport.close().await;
    let (export, pushed) = match res {
        Ok(done) => done,
        Err(e) => {
            eprintln!("pixiu-ctl: {e}");
            std::process::exit(1);
        }
    };
    for m in &export.messages {
        writeln!(sink, "{}", replay::json_line(m)).context("writing the export")?;
    }
    sink.flush().context("writing the export")?;
    eprintln!(
        "pixiu-ctl: {} messages of user {uid} from {} xiu partitions",
        export.messages.len(),
        export.partitions
    );
    for (partition, before) in &export.expired {
        eprintln!(
            "pixiu-ctl: xiu partition {partition}: messages appended before {before} (unix ms) have expired (retention)"
        );
    }
    if let Some(r) = &pushed {
        eprintln!(
            "pixiu-ctl: redelivered {} messages to {} online devices of user {uid}",
            r.messages, r.devices
        );
    }
    if !export.unreadable.is_empty() {
        for (id, reason) in &export.unreadable {
            eprintln!("pixiu-ctl: message {id} unreadable: {reason}");
        }
        std::process::exit(1);
    }
    if pushed.is_some_and(|r| r.devices == 0 && r.messages > 0) {
        eprintln!("pixiu-ctl: no device of user {uid} is online; nothing was redelivered");
        std::process::exit(1);
    }
    Ok(())
}

/// `pixiu-ctl probe`: `--check-config` (reads no file, like the services'), or the rounds.
async fn probe_cmd(a: ProbeArgs) -> anyhow::Result<()> {
    if a.check_config {
        println!("pixiu-ctl: configuration ok");
        return Ok(());
    }
    let secret = pixiu_runtime::read_secret_file(&a.auth_secret_file)?;
    let timeout = Duration::from_millis(a.timeout_ms);
    let cfg = pixiu_tools::probe::round::ProbeConfig {
        uid_base: a.uid_base,
        timeout,
        ping_timeout: a
            .ping_timeout_ms
            .map(Duration::from_millis)
            .unwrap_or_else(|| (timeout / 5).min(Duration::from_secs(1))),
        secret,
    };
    let interval = Duration::from_millis(a.interval_ms);
    let how = match a.serve {
        Some(addr) => ProbeRun::Serve {
            addr,
            fail_after: a.fail_after,
        },
        None => ProbeRun::Count(a.count.unwrap_or(1)),
    };
    probe(&a.zk, &a.tls_dir, cfg, interval, how, a.json).await
}

enum ProbeRun {
    Count(u64),
    Serve { addr: SocketAddr, fail_after: u32 },
}

/// `pixiu-ctl probe`: `--count N` rounds, each printed (or one JSON object at the end), exit 1
/// if any path failed; or `--serve ADDR` until SIGINT/SIGTERM with metrics on ADDR.
async fn probe(
    zk: &ZkArgs,
    tls_dir: &std::path::Path,
    cfg: pixiu_tools::probe::round::ProbeConfig,
    interval: Duration,
    how: ProbeRun,
    json: bool,
) -> anyhow::Result<()> {
    use pixiu_tools::probe::{round::Prober, serve::ProbeMetrics, Report};
    let transport = tool_transport(tls_dir).await?;
    let registry = connect(zk).await?;
    let mut prober = Prober::new(registry.clone(), transport.clone(), cfg);
    let shutdown = Shutdown::new();
    let res: anyhow::Result<bool> = async {
        match how {
            ProbeRun::Count(n) => {
                let mut reports: Vec<Report> = Vec::new();
                for i in 0..n {
                    let r = prober.round().await?;
                    if !json {
                        print!("{}", r.render());
                    }
                    reports.push(r);
                    if i + 1 < n {
                        tokio::time::sleep(interval).await;
                    }
                }
                let healthy = reports.iter().all(|r| r.failed().next().is_none());
                if json {
                    let faults: Vec<_> = reports.iter().flat_map(Report::faults).collect();
                    let out = serde_json::json!({
                        "healthy": healthy,
                        "rounds": reports,
                        "faults": faults,
                    });
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&out).context("rendering JSON")?
                    );
                }
                Ok(healthy)
            }
            ProbeRun::Serve { addr, fail_after } => {
                let mut metrics = ProbeMetrics::new(fail_after);
                let health = pixiu_runtime::Health::default();
                let bound = pixiu_runtime::admin::serve(
                    addr,
                    vec![health.clone()],
                    metrics.registry.clone(),
                    shutdown.clone(),
                )
                .await
                .with_context(|| format!("serving metrics on {addr}"))?;
                eprintln!("pixiu-ctl: probe metrics on http://{bound}/metrics");
                pixiu_runtime::shutdown_on_signals(shutdown.clone());
                while !shutdown.is_cancelled() {
                    // a round that cannot read the registry is said and tried again: a
                    // ZooKeeper hiccup must not stop the monitor
                    let r = match prober.round().await {
                        Ok(r) => r,
                        Err(e) => {
                            eprintln!("pixiu-ctl: probe round: {e}");
                            tokio::select! {
                                _ = shutdown.cancelled() => {}
                                _ = tokio::time::sleep(interval) => {}
                            }
                            continue;
                        }
                    };
                    let failed = metrics.observe(&r);
                    health.set_ready(true);
                    if json {
                        println!("{}", serde_json::to_string(&r).context("rendering JSON")?);
                    } else if !failed.is_empty() {
                        print!("{}", r.render());
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(interval) => {}
                    }
                }
                Ok(true)
            }
        }
    }
    .await;
    shutdown.cancel();
    prober.close().await;
    registry.close().await;
    transport.close().await;
    match res {
        Ok(true) => Ok(()),
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("pixiu-ctl: {e:#}");
            std::process::exit(1);
        }
    }
}

/// The QUIC transport of a tool that talks to the nodes (mutual TLS with the cluster's CA).
async fn tool_transport(tls_dir: &std::path::Path) -> anyhow::Result<pixiu_transport::Transport> {
    let tls = pixiu_transport::TlsMaterial::load(tls_dir)
        .with_context(|| format!("loading TLS material from {}", tls_dir.display()))?;
    let local: SocketAddr = "0.0.0.0:0"
        .parse()
        .context("parsing the wildcard address")?;
    let (transport, _inbound) =
        pixiu_transport::Transport::bind(pixiu_transport::TransportConfig::new(local, tls))
            .await
            .context("binding the QUIC transport")?;
    Ok(transport)
}

/// `pixiu-ctl replay --rebuild-pi`: the plan, then (with `--execute`) the appends and their
/// verification, on stdout; a failure exits 1 (a partition that does not exist: 2).
async fn rebuild(
    zk: &ZkArgs,
    partition: u32,
    execute: bool,
    tls_dir: &std::path::Path,
) -> anyhow::Result<()> {
    use pixiu_tools::rebuild_pi::{self, RebuildError};
    let transport = tool_transport(tls_dir).await?;
    let registry = connect(zk).await?;
    let res = async {
        let plan = rebuild_pi::plan(&registry, &transport, partition).await?;
        println!(
            "pi partition {partition}: {} users, {} ids from xiu ({} unreadable records left out)",
            plan.users.len(),
            plan.ids(),
            plan.unreadable
        );
        if !execute {
            println!("nothing changed; rerun with --execute to write them");
            return Ok(Vec::new());
        }
        let sent = rebuild_pi::execute(&registry, &transport, &plan).await?;
        println!("appended {sent} ids; verifying");
        rebuild_pi::verify(&registry, &transport, &plan).await
    }
    .await;
    registry.close().await;
    transport.close().await;
    match res {
        Ok(missing) if missing.is_empty() => {
            if execute {
                println!("verified: pi partition {partition} lists every id");
            }
            Ok(())
        }
        Ok(missing) => {
            eprintln!(
                "pixiu-ctl: pi partition {partition} does not list {} ids, e.g. (uid, id) {:?}",
                missing.len(),
                &missing[..missing.len().min(5)]
            );
            std::process::exit(1);
        }
        Err(e @ RebuildError::NoSuchPartition { .. }) => Err(e.into()),
        Err(e) => {
            eprintln!("pixiu-ctl: {e}");
            std::process::exit(1);
        }
    }
}

/// `pixiu-ctl scale-out`: a refusal, a timeout or a lost race exits 1 with one line; bad
/// usage or an unreachable ZooKeeper exits 2.
async fn scale_out(
    role: &str,
    zk: &ZkArgs,
    timeout: Duration,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<()> {
    use pixiu_tools::scale_out::{self, Options};
    let role = role
        .parse::<pixiu_registry::Role>()
        .ok()
        .filter(|r| r.is_partitioned())
        .ok_or_else(|| anyhow::anyhow!("ROLE must be broker, router, xiu or pi, not {role:?}"))?;
    let registry = connect(zk).await?;
    let o = Options {
        role,
        timeout,
        dry_run,
        zk: zk.zk.clone(),
        cluster: zk.cluster.clone(),
    };
    let started = std::time::Instant::now();
    let res = scale_out::run(&registry, &o, |line| {
        if !json {
            println!("{:>7.1}s {line}", started.elapsed().as_secs_f64());
        }
    })
    .await;
    registry.close().await;
    match res {
        Ok(report) if json => {
            println!(
                "{}",
                serde_json::to_string(&report).context("rendering JSON")?
            );
            Ok(())
        }
        Ok(report) => {
            for s in &report.steps {
                println!("  {:<40} {:>8.2} s", s.step, s.seconds);
            }
            println!("{}", report.outcome);
            Ok(())
        }
        Err(e) => {
            if json {
                let out = serde_json::json!({ "role": role.as_str(), "error": e.to_string() });
                println!("{out}");
            }
            eprintln!("pixiu-ctl: {e}");
            std::process::exit(1);
        }
    }
}

/// `pixiu-ctl standalone`: every role in this process until SIGINT or SIGTERM.
async fn run_standalone(cfg: StandaloneConfig) -> anyhow::Result<()> {
    pixiu_protocol::routing::BigRooms::parse(&cfg.big_rooms).map_err(anyhow::Error::msg)?;
    let shutdown = Shutdown::new();
    pixiu_runtime::shutdown_on_signals(shutdown.clone());
    let (started, handle) = standalone::start(cfg, shutdown.clone()).await?;
    if !shutdown.is_cancelled() {
        print_started(&started);
    }
    shutdown.cancelled().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), handle).await;
    Ok(())
}

fn print_started(s: &standalone::Started) {
    println!(
        "PiXiu standalone: proxy, broker, router, gateway, xiu and pi are running in this process."
    );
    match &s.secret {
        None => {
            if let Some(demo) = &s.demo_url {
                println!("  demo page (uid 1): {demo}?uid=1&dev=web");
            }
            println!(
                "  WebSocket (insecure dev auth): {}?uid=1&dev=web",
                s.ws_url
            );
            println!("  publish into room 42:");
            println!(
                "    curl -s -X POST {}/v1/rooms/42/messages -d '{{\"body\":\"hello\"}}'",
                s.http_url
            );
        }
        Some(secret) => {
            let client =
                pixiu_protocol::auth::issue(secret.as_bytes(), 1, Some("web"), false, 86_400);
            let publisher = pixiu_protocol::auth::issue(secret.as_bytes(), 0, None, true, 86_400);
            if let Some(demo) = &s.demo_url {
                let second =
                    pixiu_protocol::auth::issue(secret.as_bytes(), 2, Some("web"), false, 86_400);
                println!("  demo page as uid 1: {demo}#token={client}");
                println!("  demo page as uid 2: {demo}#token={second}");
            }
            println!(
                "  WebSocket (uid 1, token valid 24 h): {}?token={client}",
                s.ws_url
            );
            println!("  publish into room 42:");
            println!("    curl -s -X POST {}/v1/rooms/42/messages -H 'Authorization: Bearer {publisher}' -d '{{\"body\":\"hello\"}}'", s.http_url);
        }
    }
    println!("  then send {{\"op\":\"join\",\"room\":\"42\"}} on the WebSocket to receive it");
    println!(
        "  admin: http://{}/healthz and /metrics; Ctrl-C stops",
        s.admin
    );
}
