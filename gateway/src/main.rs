//! `pixiu-gateway`: parse flags, start tracing, run the gateway library.

use anyhow::Context;
use clap::Parser;
use pixiu_runtime::config::{load_toml, report_check};
use pixiu_runtime::CommonArgs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// PiXiu gateway: WebSocket clients in, room messages out.
#[derive(Parser, Debug)]
#[command(name = "pixiu-gateway", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// WebSocket listen address.
    #[arg(long)]
    client_listen: Option<SocketAddr>,
    /// URL advertised to clients (default ws://<client-listen>/v1/ws).
    #[arg(long)]
    client_url: Option<String>,
    /// File holding the HS256 secret for client tokens.
    #[arg(long)]
    auth_secret_file: Option<PathBuf>,
    /// Accept ?uid=&dev= with no token (development only).
    #[arg(long)]
    insecure_dev_auth: bool,
    /// Close a client that sends nothing for this many milliseconds.
    #[arg(long)]
    idle_timeout_ms: Option<u64>,
    /// Room ids START..END split into 64 virtual rooms.
    #[arg(long)]
    big_rooms: Option<String>,
    /// Re-announce every local room this often (milliseconds).
    #[arg(long)]
    refresh_interval_ms: Option<u64>,
    /// Publishes a connection may send per second (0: unlimited); burst is twice that.
    #[arg(long)]
    publish_rate: Option<u32>,
    /// Serve the demo page at GET / on the client port (default true).
    #[arg(long)]
    demo: Option<bool>,
}

fn main() {
    let args = Args::parse();
    pixiu_runtime::exit_with("pixiu-gateway", real_main(args));
}

fn real_main(args: Args) -> anyhow::Result<()> {
    pixiu_runtime::init_tracing();
    let (mut common, mut g): (_, pixiu_gateway::GatewayConfig) =
        load_toml(args.common.config.as_deref()).context("loading the config file")?;
    args.common.apply(&mut common);
    if let Some(v) = args.client_listen {
        g.client_listen = v;
    }
    if let Some(v) = args.client_url {
        g.client_url = Some(v);
    }
    if let Some(v) = args.auth_secret_file {
        g.auth_secret_file = Some(v);
    }
    if args.insecure_dev_auth {
        g.insecure_dev_auth = true;
    }
    if let Some(v) = args.idle_timeout_ms {
        g.idle_timeout_ms = v;
    }
    if let Some(v) = args.big_rooms {
        g.big_rooms = v;
    }
    if let Some(v) = args.refresh_interval_ms {
        g.refresh_interval_ms = v;
    }
    if let Some(v) = args.publish_rate {
        g.publish_rate = v;
        g.publish_burst = v.saturating_mul(2);
    }
    if let Some(v) = args.demo {
        g.demo = v;
    }
    let check_only = args.common.check_config;
    g.auth_secret = pixiu_runtime::auth_secret(g.auth_secret_file.as_deref(), check_only)
        .context("reading the auth secret")?;
    let drain = Duration::from_millis(common.drain_ms);
    let cfg = pixiu_gateway::Config { common, gateway: g };
    if check_only {
        return report_check("pixiu-gateway", &cfg.common, || pixiu_gateway::check(&cfg));
    }
    pixiu_runtime::serve_until_signalled("gateway", drain, |shutdown| {
        pixiu_gateway::run(cfg, shutdown)
    })
}
