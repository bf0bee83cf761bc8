//! `pixiu-xiu`: parse flags, start tracing, run one Xiu replica.

use anyhow::Context;
use clap::Parser;
use pixiu_runtime::{config::load_toml, CommonArgs};
use std::path::PathBuf;
use std::time::Duration;

/// PiXiu Xiu: the replicated message store of personal inboxes.
#[derive(Parser, Debug)]
#[command(name = "pixiu-xiu", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Which partition this replica serves (0..=255).
    #[arg(long)]
    partition: Option<u32>,
    /// Where RocksDB lives.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Followers that must hold a message before it is acknowledged (default 1).
    #[arg(long)]
    min_insync: Option<usize>,
    /// fsync the WAL before acknowledging (default true).
    #[arg(long)]
    fsync: Option<bool>,
}

fn main() {
    let args = Args::parse();
    pixiu_runtime::exit_with("pixiu-xiu", real_main(args));
}

fn real_main(args: Args) -> anyhow::Result<()> {
    pixiu_runtime::init_tracing();
    let (mut common, mut x): (_, pixiu_xiu::service::XiuConfig) =
        load_toml(args.common.config.as_deref()).context("loading the config file")?;
    args.common.apply(&mut common);
    if let Some(v) = args.partition {
        x.partition = v;
    }
    if let Some(v) = args.data_dir {
        x.data_dir = Some(v);
    }
    if let Some(v) = args.min_insync {
        x.min_insync = v;
    }
    if let Some(v) = args.fsync {
        x.fsync = v;
    }
    let drain = Duration::from_millis(common.drain_ms);
    let cfg = pixiu_xiu::service::Config { common, xiu: x };
    pixiu_runtime::serve_until_signalled("xiu", drain, |shutdown| {
        pixiu_xiu::service::run(cfg, shutdown)
    })
}
