//! `pixiu-broker`: parse flags, start tracing, run the broker library.

use anyhow::Context;
use clap::Parser;
use pixiu_runtime::config::{load_toml, report_check};
use pixiu_runtime::CommonArgs;
use std::time::Duration;

/// PiXiu broker: forwards each room message once to every gateway with members in the room.
#[derive(Parser, Debug)]
#[command(name = "pixiu-broker", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Which partition this replica serves.
    #[arg(long)]
    partition: Option<u32>,
}

fn main() {
    let args = Args::parse();
    pixiu_runtime::exit_with("pixiu-broker", real_main(args));
}

fn real_main(args: Args) -> anyhow::Result<()> {
    pixiu_runtime::init_tracing();
    let (mut common, mut b): (_, pixiu_broker::BrokerConfig) =
        load_toml(args.common.config.as_deref()).context("loading the config file")?;
    args.common.apply(&mut common);
    if let Some(v) = args.partition {
        b.partition = v;
    }
    let drain = Duration::from_millis(common.drain_ms);
    let cfg = pixiu_broker::Config { common, broker: b };
    if args.common.check_config {
        return report_check("pixiu-broker", &cfg.common, || pixiu_broker::check(&cfg));
    }
    pixiu_runtime::serve_until_signalled("broker", drain, |shutdown| {
        pixiu_broker::run(cfg, shutdown)
    })
}
