//! `pixiu-xiu`: parse flags, start tracing, run one Xiu replica.

use anyhow::Context;
use clap::Parser;
use pixiu_runtime::config::{load_toml, report_check, StoreArgs};
use pixiu_runtime::CommonArgs;
use std::time::Duration;

/// PiXiu Xiu: the replicated message store of personal inboxes.
#[derive(Parser, Debug)]
#[command(name = "pixiu-xiu", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    store: StoreArgs,
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
    args.store.apply(
        &mut x.partition,
        &mut x.data_dir,
        &mut x.min_insync,
        &mut x.fsync,
    );
    let drain = Duration::from_millis(common.drain_ms);
    let cfg = pixiu_xiu::service::Config { common, xiu: x };
    if args.common.check_config {
        return report_check("pixiu-xiu", &cfg.common, || {
            pixiu_xiu::service::check(&cfg).map(drop)
        });
    }
    pixiu_runtime::serve_until_signalled("xiu", drain, |shutdown| {
        pixiu_xiu::service::run(cfg, shutdown)
    })
}
