//! Runs `ensync-bench --smoke` against every system and checks the JSON.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The workspace's ensync-server next to this test's binaries, built if
/// missing.
fn ensync_server() -> PathBuf {
    let bench = Path::new(env!("CARGO_BIN_EXE_ensync-bench"));
    let bin = bench.with_file_name("ensync-server");
    if !bin.is_file() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let status = Command::new(env!("CARGO"))
            .args(["build", "--bin", "ensync-server"])
            .current_dir(&root)
            .status()
            .expect("running cargo build");
        assert!(status.success(), "cargo build --bin ensync-server failed");
    }
    assert!(bin.is_file(), "{} missing after the build", bin.display());
    bin
}

/// Fails clearly when a server the bench compares against is missing.
fn require(program: &str) {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .any(|dir| dir.join(program).is_file());
    assert!(
        found,
        "{program} is not installed (apt-get install {program}; .ci/run installs it)"
    );
}

fn num(v: &Value, path: &[&str]) -> f64 {
    let mut at = v;
    for key in path {
        at = &at[*key];
    }
    at.as_f64()
        .unwrap_or_else(|| panic!("{} is not a number: {at}", path.join(".")))
}

#[test]
fn smoke_run_measures_every_system() {
    require("redis-server");
    require("nats-server");
    let server = ensync_server();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench.json");
    let run = Command::new(env!("CARGO_BIN_EXE_ensync-bench"))
        .arg("--smoke")
        .arg("--server-bin")
        .arg(&server)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("running ensync-bench");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "ensync-bench --smoke failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("servers on CPU 1, bench client on CPU 0"),
        "{stdout}"
    );

    let json: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let n = num(&json, &["config", "n"]);
    assert_eq!(n, 2000.0);
    assert_eq!(num(&json, &["config", "crowd_clients"]), 50.0);
    assert!(
        stdout.contains("publish 1 conn, 50 idle (ev/s)"),
        "{stdout}"
    );
    let s = &json["systems"];
    for system in ["ensync", "redis", "nats", "ceiling"] {
        let r = &s[system];
        assert_eq!(num(r, &["replay", "events"]), n, "{system} replay count");
        assert!(num(r, &["replay", "events_per_s"]) > 0.0, "{system}");
        assert!(num(r, &["replay", "mb_per_s"]) > 0.0, "{system}");
        assert_eq!(
            num(r, &["mixed", "events"]),
            n / 10.0,
            "{system} mixed count"
        );
        assert!(num(r, &["mixed", "events_per_s"]) > 0.0, "{system}");
        for p in [
            "p50_small_us",
            "p99_small_us",
            "p50_large_us",
            "p99_large_us",
        ] {
            assert!(num(r, &["seek", p]) > 0.0, "{system} seek {p}");
        }
        for l in ["limit_1", "limit_8"] {
            assert!(num(r, &[l, "median"]) > 0.0, "{system} {l}");
        }
        if system == "ensync" {
            assert_eq!(
                num(r, &["trickle", "events"]),
                n / 10.0,
                "trickled replay count"
            );
            let names = num(&json, &["config", "names"]);
            assert_eq!(num(r, &["names", "replay", "events"]), names, "names");
            assert!(num(r, &["names", "limit_1", "median"]) > 0.0, "names");
            assert_eq!(num(r, &["names", "live_samples"]), 50.0, "names");
            assert!(num(r, &["names", "live_p99_us"]) > 0.0, "names");
            // Counted where the kernel keeps per-process I/O accounting.
            if std::path::Path::new("/proc/self/io").exists() {
                for size in ["small", "large"] {
                    let key = format!("storage_read_{size}_kib");
                    assert!(num(r, &["seek", &key]) >= 0.0, "seek {key}");
                }
            }
        }
        if system != "ceiling" {
            for p in ["publish_1", "publish_8", "crowd"] {
                assert!(num(r, &[p, "median"]) > 0.0, "{system} {p}");
            }
            assert!(num(r, &["memory", "fast_before_mib"]) > 0.0, "{system} rss");
            assert!(
                num(r, &["memory", "fast_anon_before_mib"]) > 0.0,
                "{system} anonymous rss"
            );
            for growth in [
                "fast_growth_mib",
                "slow_growth_mib",
                "fast_anon_growth_mib",
                "slow_anon_growth_mib",
            ] {
                assert!(num(r, &["memory", growth]) >= 0.0, "{system} {growth}");
            }
            assert!(
                num(r, &["memory", "slow_bytes_read"]) > 0.0,
                "{system} slow"
            );
        }
    }
    let targets = json["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 8);
    assert!(
        targets.iter().all(|t| t["pass"].is_boolean()),
        "{targets:?}"
    );
}
