//! `pixiu-gateway`: parse flags, start tracing, run the gateway library.

use anyhow::Context;
use clap::Parser;
use pixiu_runtime::CommonArgs;
use std::net::SocketAddr;
use std::path::PathBuf;

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
    pixiu_runtime::service::service_main(
        "pixiu-gateway",
        &args.common,
        |g: &mut pixiu_gateway::GatewayConfig, check_only| {
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
            g.auth_secret = pixiu_runtime::auth_secret(g.auth_secret_file.as_deref(), check_only)
                .context("reading the auth secret")?;
            Ok(())
        },
        |common, gateway| pixiu_gateway::Config { common, gateway },
        pixiu_gateway::check,
        pixiu_gateway::run,
    );
}
