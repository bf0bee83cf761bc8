//! `pixiu-proxy`: parse flags, start tracing, run the proxy library.

use anyhow::Context;
use clap::Parser;
use pixiu_runtime::config::{load_toml, report_check};
use pixiu_runtime::CommonArgs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// PiXiu proxy: publisher HTTP API in, room messages to brokers out.
#[derive(Parser, Debug)]
#[command(name = "pixiu-proxy", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Publisher HTTP API address.
    #[arg(long)]
    http: Option<SocketAddr>,
    /// File holding the HS256 secret for publisher tokens.
    #[arg(long)]
    auth_secret_file: Option<PathBuf>,
    /// Accept publishers with no token (development only).
    #[arg(long)]
    insecure_dev_auth: bool,
    /// Room ids START..END split into 64 virtual rooms (must match the gateways').
    #[arg(long)]
    big_rooms: Option<String>,
}

fn main() {
    let args = Args::parse();
    pixiu_runtime::exit_with("pixiu-proxy", real_main(args));
}

fn real_main(args: Args) -> anyhow::Result<()> {
    pixiu_runtime::init_tracing();
    let (mut common, mut r): (_, pixiu_proxy::ProxyConfig) =
        load_toml(args.common.config.as_deref()).context("loading the config file")?;
    args.common.apply(&mut common);
    if let Some(v) = args.http {
        r.http = v;
    }
    if let Some(v) = args.auth_secret_file {
        r.auth_secret_file = Some(v);
    }
    if args.insecure_dev_auth {
        r.insecure_dev_auth = true;
    }
    if let Some(v) = args.big_rooms {
        r.big_rooms = v;
    }
    let check_only = args.common.check_config;
    r.auth_secret = pixiu_runtime::auth_secret(r.auth_secret_file.as_deref(), check_only)
        .context("reading the auth secret")?;
    let drain = Duration::from_millis(common.drain_ms);
    let cfg = pixiu_proxy::Config { common, proxy: r };
    if check_only {
        return report_check("pixiu-proxy", &cfg.common, || pixiu_proxy::check(&cfg));
    }
    pixiu_runtime::serve_until_signalled("proxy", drain, |shutdown| pixiu_proxy::run(cfg, shutdown))
}
