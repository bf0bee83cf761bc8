//! `pixiu-proxy`: parse flags, start tracing, run the proxy library.

use anyhow::Context;
use clap::Parser;
use pixiu_runtime::CommonArgs;
use std::net::SocketAddr;
use std::path::PathBuf;

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
    pixiu_runtime::service::service_main(
        "pixiu-proxy",
        &args.common,
        |p: &mut pixiu_proxy::ProxyConfig, check_only| {
            if let Some(v) = args.http {
                p.http = v;
            }
            if let Some(v) = args.auth_secret_file {
                p.auth_secret_file = Some(v);
            }
            if args.insecure_dev_auth {
                p.insecure_dev_auth = true;
            }
            if let Some(v) = args.big_rooms {
                p.big_rooms = v;
            }
            p.auth_secret = pixiu_runtime::auth_secret(p.auth_secret_file.as_deref(), check_only)
                .context("reading the auth secret")?;
            Ok(())
        },
        |common, proxy| pixiu_proxy::Config { common, proxy },
        pixiu_proxy::check,
        pixiu_proxy::run,
    );
}
