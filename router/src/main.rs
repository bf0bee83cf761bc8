//! `pixiu-router`: parse flags, start tracing, run the router library.

use anyhow::Context;
use clap::Parser;
use pixiu_runtime::config::{load_toml, report_check};
use pixiu_runtime::CommonArgs;
use std::path::PathBuf;
use std::time::Duration;

/// PiXiu router: keeps the room-to-gateways table of one partition and feeds it to brokers.
#[derive(Parser, Debug)]
#[command(name = "pixiu-router", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Which partition this replica serves.
    #[arg(long)]
    partition: Option<u32>,
    /// Where RocksDB lives.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

fn main() {
    let args = Args::parse();
    pixiu_runtime::exit_with("pixiu-router", real_main(args));
}

fn real_main(args: Args) -> anyhow::Result<()> {
    pixiu_runtime::init_tracing();
    let (mut common, mut r): (_, pixiu_router::RouterConfig) =
        load_toml(args.common.config.as_deref()).context("loading the config file")?;
    args.common.apply(&mut common);
    if let Some(v) = args.partition {
        r.partition = v;
    }
    if let Some(v) = args.data_dir {
        r.data_dir = v;
    }
    let drain = Duration::from_millis(common.drain_ms);
    let cfg = pixiu_router::Config { common, router: r };
    if args.common.check_config {
        return report_check("pixiu-router", &cfg.common, || pixiu_router::check(&cfg));
    }
    pixiu_runtime::serve_until_signalled("router", drain, |shutdown| {
        pixiu_router::run(cfg, shutdown)
    })
}
