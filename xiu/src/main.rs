//! `pixiu-xiu`: parse flags, start tracing, run one Xiu replica.

use clap::Parser;
use pixiu_runtime::config::StoreArgs;
use pixiu_runtime::CommonArgs;

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
    pixiu_runtime::service::service_main(
        "pixiu-xiu",
        &args.common,
        |s: &mut pixiu_xiu::service::XiuConfig, _| {
            args.store.apply(
                &mut s.partition,
                &mut s.data_dir,
                &mut s.min_insync,
                &mut s.fsync,
            );
            Ok(())
        },
        |common, xiu| pixiu_xiu::service::Config { common, xiu },
        |c| pixiu_xiu::service::check(c).map(drop),
        pixiu_xiu::service::run,
    );
}
