//! How long Pi's retention holds the index: fills a partition (`USERS` users, `PER_USER` ids
//! each, none old), then times a whole sweep step by step and its longest step, against the
//! full read of every index entry that the sweep did in one go before (one lock hold).
//! Run: `cargo run --release -p pixiu-pi --example retention_sweep [users] [per_user]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pixiu_pi::{PiIndex, PiOptions};
use pixiu_protocol::inbox::{MsgId, KIND_PERSONAL};
use pixiu_storage::Durability;
use std::time::{Duration, Instant};

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<u64>().unwrap());
    let users = args.next().unwrap_or(200);
    let per_user = args.next().unwrap_or(5_000);
    let dir = tempfile::tempdir().unwrap();
    let opts = || PiOptions {
        partition: 0,
        sync: Durability::GroupCommit,
    };
    let mut pi = PiIndex::open(dir.path(), opts()).unwrap();
    let now = 1_000_000;
    for n in 0..per_user {
        let items: Vec<(u64, MsgId)> = (0..users)
            .map(|u| (u, MsgId::new(0, KIND_PERSONAL, n * users + u + 1)))
            .collect();
        pi.append_many(&items, now + n).unwrap();
    }
    drop(pi);

    // the read of every entry (what one call did under the lock before)
    let db = pixiu_storage::Db::open(
        dir.path(),
        pixiu_storage::Options::compressed(Durability::GroupCommit),
    )
    .unwrap();
    let t = Instant::now();
    let mut entries = 0u64;
    for item in db.scan_prefix(b"i") {
        let (_, v) = item.unwrap();
        entries += u64::from(v.len() == 8);
    }
    let full = t.elapsed();
    drop(db);

    let mut pi = PiIndex::open(dir.path(), opts()).unwrap();
    let (mut from, mut steps, mut longest, mut visited) = (Some(0), 0, Duration::ZERO, 0);
    let t = Instant::now();
    while let Some(uid) = from {
        let s = Instant::now();
        let sweep = pi.expire_older_than(now - 1, uid, 1_000).unwrap();
        longest = longest.max(s.elapsed());
        visited += sweep.visited;
        from = sweep.next;
        steps += 1;
    }
    println!(
        "{users} users x {per_user} ids ({entries} entries): reading every entry {:.1} ms; \
         the sweep {:.1} ms in {steps} steps ({visited} users), longest step {:.2} ms",
        full.as_secs_f64() * 1e3,
        t.elapsed().as_secs_f64() * 1e3,
        longest.as_secs_f64() * 1e3,
    );
}
