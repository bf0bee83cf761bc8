//! `pixiu-pi`: parse flags, start tracing, run one Pi replica.

use anyhow::Context;
use clap::Parser;
use pixiu_runtime::{config::load_toml, CommonArgs};
use std::path::PathBuf;
use std::time::Duration;

/// PiXiu Pi: the replicated per-user MsgID index of personal inboxes.
#[derive(Parser, Debug)]
#[command(name = "pixiu-pi", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Which partition this replica serves .
    #[arg(long)]
    partition: Option<u32>,
    /// Where RocksDB lives.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Followers that must hold an append before it is acknowledged (default 1).
    #[arg(long)]
    min_insync: Option<usize>,
    /// fsync the WAL before acknowledging (default true).
    #[arg(long)]
    fsync: Option<bool>,
}

fn main() {
    let args = Args::parse();
    pixiu_runtime::exit_with("pixiu-pi", real_main(args));
}

fn real_main(args: Args) -> anyhow::Result<()> {
    pixiu_runtime::init_tracing();
    let (mut common, mut x): (_, pixiu_pi::service::PiConfig) =
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
    let cfg = pixiu_pi::service::Config { common, pi: x };
    pixiu_runtime::serve_until_signalled("pi", drain, |shutdown| {
        pixiu_pi::service::run(cfg, shutdown)
    })
}
