//! `pixiu-broker`: parse flags, start tracing, run the broker library.

use clap::Parser;
use pixiu_runtime::CommonArgs;

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
    pixiu_runtime::service::service_main(
        "pixiu-broker",
        &args.common,
        |b: &mut pixiu_broker::BrokerConfig, _| {
            if let Some(v) = args.partition {
                b.partition = v;
            }
            Ok(())
        },
        |common, broker| pixiu_broker::Config { common, broker },
        pixiu_broker::check,
        pixiu_broker::run,
    );
}
