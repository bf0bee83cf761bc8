//! `pixiu-pi`: parse flags, start tracing, run one Pi replica.

use clap::Parser;
use pixiu_runtime::config::StoreArgs;
use pixiu_runtime::CommonArgs;

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
    pixiu_runtime::service::service_main(
        "pixiu-pi",
        &args.common,
        |s: &mut pixiu_pi::service::PiConfig, _| {
            args.store.apply(
                &mut s.partition,
                &mut s.data_dir,
                &mut s.min_insync,
                &mut s.fsync,
            );
            Ok(())
        },
        |common, pi| pixiu_pi::service::Config { common, pi },
        |c| pixiu_pi::service::check(c).map(drop),
        pixiu_pi::service::run,
    );
}
