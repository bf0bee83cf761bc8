//! Appends to a partition that holds millions of entries: each append first looks its
//! `(uid, id)` up (a key that is not there: the table files' Bloom filters answer without
//! reading their blocks), then writes (no fsync). Prints the time of the fill (200 users, ids
//! appended 200 at a time), how many table files it left and the time per single append.
//! Run: `cargo run --release -p pixiu-pi --example append_lookups [ids per user]`
#![allow(clippy::unwrap_used, clippy::expect_used)]
use pixiu_pi::{PiIndex, PiOptions};
use pixiu_protocol::inbox::{MsgId, KIND_PERSONAL};
use pixiu_storage::Durability;
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<u64>().unwrap());
    let per_user = args.next().unwrap_or(10_000);
    let users = 200;
    let dir = tempfile::tempdir().unwrap();
    let opts = || PiOptions {
        partition: 0,
        sync: Durability::GroupCommit,
    };
    let mut pi = PiIndex::open(dir.path(), opts()).unwrap();
    let t = Instant::now();
    for n in 0..per_user {
        let items: Vec<(u64, MsgId)> = (0..users)
            .map(|u| (u, MsgId::new(0, KIND_PERSONAL, n * users + u + 1)))
            .collect();
        pi.append_many(&items, 1 + n).unwrap();
    }
    let fill = t.elapsed();
    drop(pi);
    let ssts = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "sst")
        })
        .count();
    let mut pi = PiIndex::open(dir.path(), opts()).unwrap();
    let base = per_user * users + 1;
    let n = 50_000u64;
    let t = Instant::now();
    for i in 0..n {
        pi.append_many(
            &[((i * 7) % users, MsgId::new(0, KIND_PERSONAL, base + i))],
            9,
        )
        .unwrap();
    }
    let took = t.elapsed();
    println!(
        "filled {} entries in {:.1} s, {ssts} SST files; {n} appends of one id: {:.2} us each",
        per_user * users,
        fill.as_secs_f64(),
        took.as_secs_f64() * 1e6 / n as f64
    );
}
