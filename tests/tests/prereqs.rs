//! `scripts/prereqs.sh`, which both README commands run first, must see exactly what the
//! build and the tests use. Its checks run here against fake roots: a machine image that has
//! `libclang-cpp.so.14` but no `libclang.so` (what once let the test command pass its check
//! and then fail the build) must be told to install `libclang-dev`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pixiu_testkit::TestDir;
use std::path::{Path, PathBuf};
use std::process::Command;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/prereqs.sh")
}

/// `prereqs.sh --check --root ROOT WHAT`: the exit code and the missing packages it names.
fn check(root: &Path, what: &str) -> (i32, Vec<String>) {
    let out = Command::new("bash")
        .arg(script())
        .args(["--check", "--root"])
        .arg(root)
        .arg(what)
        .env_remove("LIBCLANG_PATH")
        .output()
        .unwrap();
    let missing = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    (out.status.code().unwrap_or(-1), missing)
}

fn touch(root: &Path, rel: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, b"").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

#[test]
fn an_empty_machine_needs_the_compilers_and_libclang() {
    let dir = TestDir::new("prereqs-empty");
    let (code, missing) = check(dir.path(), "build");
    assert_eq!(code, 1);
    assert_eq!(missing, ["g++", "clang", "libclang-dev"]);
}

#[test]
fn libclang_cpp_alone_is_not_libclang() {
    let dir = TestDir::new("prereqs-cpp");
    let root = dir.path();
    touch(root, "usr/bin/c++");
    touch(root, "usr/bin/clang");
    // what the machine image ships: clang's C++ library, and only versioned names
    touch(root, "usr/lib/x86_64-linux-gnu/libclang-cpp.so.14");
    touch(root, "usr/lib/x86_64-linux-gnu/libclang-14.so.1");
    let (code, missing) = check(root, "build");
    assert_eq!((code, missing), (1, vec!["libclang-dev".to_string()]));

    // what libclang-dev adds: the unversioned name the linker and clang-sys use
    touch(root, "usr/lib/llvm-14/lib/libclang.so");
    let (code, missing) = check(root, "build");
    assert_eq!((code, missing), (0, Vec::<String>::new()));
}

#[test]
fn a_versioned_libclang_name_counts_but_libclang_cpp_so_does_not() {
    let dir = TestDir::new("prereqs-versioned");
    let root = dir.path();
    touch(root, "usr/bin/c++");
    touch(root, "usr/bin/clang");
    touch(root, "usr/lib/x86_64-linux-gnu/libclang-cpp.so");
    assert_eq!(check(root, "build").1, ["libclang-dev"]);
    touch(root, "usr/lib/x86_64-linux-gnu/libclang-14.so");
    assert_eq!(check(root, "build"), (0, vec![]));
}

/// What a build needs, as files under a fake root.
const BUILD_FILES: [&str; 3] = [
    "usr/bin/c++",
    "usr/bin/clang",
    "usr/lib/llvm-14/lib/libclang.so",
];
/// What the tests need beyond a build.
const TEST_FILES: [&str; 5] = [
    "usr/bin/java",
    "usr/share/java/zookeeper.jar",
    "usr/bin/chromium",
    "usr/bin/systemd-analyze",
    "usr/bin/python3",
];

#[test]
fn the_tests_also_need_java_zookeeper_chromium_and_systemd_analyze() {
    let dir = TestDir::new("prereqs-test");
    let root = dir.path();
    for f in BUILD_FILES {
        touch(root, f);
    }
    let (code, missing) = check(root, "test");
    assert_eq!(code, 1);
    assert_eq!(
        missing,
        [
            "default-jre-headless",
            "zookeeper",
            "chromium",
            "systemd",
            "python3",
            "python3-pip"
        ]
    );
    for f in TEST_FILES {
        touch(root, f);
    }
    assert_eq!(check(root, "test"), (0, vec![]));
}

#[test]
fn the_benchmarks_also_need_nats_server_and_perf() {
    let dir = TestDir::new("prereqs-bench");
    let root = dir.path();
    for f in BUILD_FILES.into_iter().chain(TEST_FILES) {
        touch(root, f);
    }
    assert_eq!(check(root, "test"), (0, vec![]));
    let (code, missing) = check(root, "bench");
    assert_eq!(code, 1);
    assert_eq!(missing, ["nats-server", "linux-perf"]);
    touch(root, "usr/sbin/nats-server");
    touch(root, "usr/bin/perf");
    assert_eq!(check(root, "bench"), (0, vec![]));
}

#[test]
fn bad_usage_exits_2_with_a_reason() {
    for args in [
        vec!["--check"],
        vec!["--check", "deploy"],
        vec!["--frobnicate", "build"],
    ] {
        let out = Command::new("bash")
            .arg(script())
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "one line for {args:?}: {err}");
        assert!(err.starts_with("prereqs.sh: "), "{err}");
    }
}
