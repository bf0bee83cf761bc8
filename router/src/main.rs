//! `pixiu-router`: parse flags, start tracing, run the router library.

use clap::Parser;
use pixiu_runtime::CommonArgs;
use std::path::PathBuf;

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
    pixiu_runtime::service::service_main(
        "pixiu-router",
        &args.common,
        |r: &mut pixiu_router::RouterConfig, _| {
            if let Some(v) = args.partition {
                r.partition = v;
            }
            if let Some(v) = args.data_dir {
                r.data_dir = v;
            }
            Ok(())
        },
        |common, router| pixiu_router::Config { common, router },
        pixiu_router::check,
        pixiu_router::run,
    );
}
