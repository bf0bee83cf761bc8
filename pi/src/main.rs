//! `pixiu-pi`: parse flags, start tracing, run one Pi replica.

use anyhow::Context;
use clap::Parser;
use pixiu_runtime::config::{load_toml, report_check, StoreArgs};
use pixiu_runtime::CommonArgs;
use std::time::Duration;

/// PiXiu Pi: the replicated per-user MsgID index of personal inboxes.
#[derive(Parser, Debug)]
#[command(name = "pixiu-pi", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    store: StoreArgs,
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
    args.store.apply(
        &mut x.partition,
        &mut x.data_dir,
        &mut x.min_insync,
        &mut x.fsync,
    );
    let drain = Duration::from_millis(common.drain_ms);
    let cfg = pixiu_pi::service::Config { common, pi: x };
    if args.common.check_config {
        return report_check("pixiu-pi", &cfg.common, || {
            pixiu_pi::service::check(&cfg).map(drop)
        });
    }
    pixiu_runtime::serve_until_signalled("pi", drain, |shutdown| {
        pixiu_pi::service::run(cfg, shutdown)
    })
}
