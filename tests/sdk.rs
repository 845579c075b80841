//! The official Python SDK, `ensync-sdk-ws` 0.4.3 from PyPI and unchanged,
//! against a real server over WebSocket with access control on:
//! tests/sdk/roundtrip.py connects with access keys, publishes end-to-end encrypted events from one SDK
//! client to another's public key, and checks decryption, order, the
//! auto-ack (from the server's side) and `replay(idem)`.
//!
//! The SDK runs in a virtualenv this test creates when missing, under
//! Cargo's per-target tmp dir, from tests/sdk/requirements.txt; or in the
//! interpreter `ENSYNC_SDK_PYTHON` names. Creating it needs `python3` with
//! `venv` and PyPI access. Without them the test fails saying what to
//! install: it never skips.

mod common;

use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ensync_server::config::{ClientEntry, Config};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::task::JoinHandle;

/// Names an interpreter that already has the SDK; no virtualenv is made.
const PYTHON_ENV: &str = "ENSYNC_SDK_PYTHON";
/// The interpreter a virtualenv is made with.
const BASE_PYTHON: &str = "python3";
/// What to install when `BASE_PYTHON` cannot make a virtualenv.
const INSTALL_HINT: &str = "install Python 3 with venv and pip (Debian/Ubuntu: \
     `apt-get install python3 python3-venv`), or set ENSYNC_SDK_PYTHON to an \
     interpreter that has ensync-sdk-ws 0.4.3";
const REQUIREMENTS: &str = include_str!("sdk/requirements.txt");
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/roundtrip.py");

/// `python3 -m venv` and `pip install` (which downloads from PyPI).
const VENV_TIMEOUT: Duration = Duration::from_secs(300);
/// Checking that an interpreter imports the SDK, and `keygen`.
const QUICK_TIMEOUT: Duration = Duration::from_secs(30);
/// The whole SDK run; the script bounds itself at 45 s.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long output is still read after the process ended.
const PIPE_GRACE: Duration = Duration::from_secs(5);

const SUBSCRIBER: &str = "sdk-subscriber";
const PUBLISHER: &str = "sdk-publisher";
/// Their access keys: not their ids, so the server must map one to the other.
const SUBSCRIBER_KEY: &str = "sk-7c41d09be2";
const PUBLISHER_KEY: &str = "pk-58aa3f61c0";

/// Fresh keys for both clients, their access keys, public keys and rights
/// in the server's config, then the script's checks (it prints each one) against that server.
#[tokio::test(flavor = "multi_thread")]
async fn official_python_sdk_connects_receives_acks_and_replays() {
    let python = sdk_python().await;
    let keys = keygen(&python).await;
    let (sub_public, sub_secret) = key_pair(&keys, "subscriber");
    let (pub_public, _) = key_pair(&keys, "publisher");

    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        clients: vec![
            ClientEntry {
                id: SUBSCRIBER.to_string(),
                access_key: Some(SUBSCRIBER_KEY.to_string()),
                public_key: Some(sub_public.clone()),
                subscribe: vec!["sdk/*".to_string()],
                replay: vec!["sdk/*".to_string()],
                ..ClientEntry::default()
            },
            ClientEntry {
                id: PUBLISHER.to_string(),
                access_key: Some(PUBLISHER_KEY.to_string()),
                public_key: Some(pub_public.clone()),
                publish: vec!["sdk/*".to_string()],
                ..ClientEntry::default()
            },
        ],
        ..Config::default()
    };
    let srv = common::start_server_with(config).await;

    let mut cmd = Command::new(&python);
    cmd.arg("-u")
        .arg(SCRIPT)
        .arg("run")
        .arg("--ws-url")
        .arg(format!("ws://{}", srv.http_addr))
        .arg("--tcp")
        .arg(srv.addr.to_string())
        .args(["--subscriber-id", SUBSCRIBER])
        .args(["--subscriber-key", SUBSCRIBER_KEY])
        .args(["--publisher-key", PUBLISHER_KEY])
        .args(["--subscriber-public", &sub_public])
        .args(["--subscriber-secret", &sub_secret])
        .args(["--publisher-id", PUBLISHER])
        .args(["--publisher-public", &pub_public]);
    let ran = run(&mut cmd, SCRIPT_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", python.display()));
    srv.stop().await;

    // Shown by the harness only when the test fails (or with --nocapture).
    println!("{}", ran.report());
    assert!(
        ran.succeeded(),
        "the SDK round trip failed; see its output:\n{}",
        ran.report()
    );
}

/// The interpreter to run the SDK with: `ENSYNC_SDK_PYTHON`, else the
/// test's own virtualenv, made first if needed.
async fn sdk_python() -> PathBuf {
    if let Some(python) = std::env::var_os(PYTHON_ENV).filter(|p| !p.is_empty()) {
        let python = PathBuf::from(python);
        if let Err(why) = imports_sdk(&python).await {
            panic!(
                "{PYTHON_ENV}={} cannot import the SDK ({why}); install it there with \
                 `pip install -r tests/sdk/requirements.txt` or unset {PYTHON_ENV}",
                python.display()
            );
        }
        return python;
    }
    venv_python().await
}

/// The virtualenv's interpreter. Its directory is named after a hash of
/// requirements.txt, so a changed pin makes a new one. It is built in a
/// fresh directory and renamed into place only once complete, so
/// concurrent test processes never see (or share the building of) a
/// half-made one: the first rename wins, the others use its result.
async fn venv_python() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(tmp).expect("create Cargo's target tmp dir");
    let venv = tmp.join(format!("sdk-venv-{:016x}", fnv1a(REQUIREMENTS)));
    if imports_sdk(&in_venv(&venv)).await.is_ok() {
        return in_venv(&venv);
    }

    let building = tempfile::Builder::new()
        .prefix("sdk-venv-building-")
        .tempdir_in(tmp)
        .expect("temp dir for the virtualenv");
    let ran = run(
        Command::new(BASE_PYTHON)
            .args(["-m", "venv"])
            .arg(building.path()),
        VENV_TIMEOUT,
    )
    .await
    .unwrap_or_else(|e| panic!("cannot run `{BASE_PYTHON} -m venv` ({e}): {INSTALL_HINT}"));
    assert!(
        ran.succeeded(),
        "`{BASE_PYTHON} -m venv` failed: {INSTALL_HINT}\n{}",
        ran.report()
    );
    let requirements = building.path().join("requirements.txt");
    std::fs::write(&requirements, REQUIREMENTS).expect("write requirements.txt");
    let ran = run(
        Command::new(in_venv(building.path()))
            .args([
                "-m",
                "pip",
                "install",
                "--no-input",
                "--disable-pip-version-check",
            ])
            .arg("-r")
            .arg(&requirements),
        VENV_TIMEOUT,
    )
    .await
    .expect("run pip in the new virtualenv");
    assert!(
        ran.succeeded(),
        "pip could not install the SDK from PyPI (network?): {}",
        ran.report()
    );

    // NOTE: a venv may be moved as long as it is run by its bin/python
    // path (that is how Python finds its pyvenv.cfg); its pip scripts'
    // shebangs go stale, but this test only ever runs `python -m pip`.
    if std::fs::rename(building.path(), &venv).is_err() {
        // Another test process won the race, or a stale venv is in the way
        // (say, its base Python was upgraded away): move that aside.
        if imports_sdk(&in_venv(&venv)).await.is_err() {
            let stale = tmp.join(format!("sdk-venv-stale-{}", unique()));
            if std::fs::rename(&venv, &stale).is_ok() {
                let _ = std::fs::remove_dir_all(&stale);
            }
            let _ = std::fs::rename(building.path(), &venv);
        }
    }
    let python = in_venv(&venv);
    if let Err(why) = imports_sdk(&python).await {
        panic!(
            "the virtualenv at {} cannot import the SDK: {why}",
            venv.display()
        );
    }
    python
}

/// A virtualenv's interpreter.
fn in_venv(venv: &Path) -> PathBuf {
    if cfg!(windows) {
        venv.join("Scripts").join("python.exe")
    } else {
        venv.join("bin").join("python")
    }
}

/// Whether `python` runs and imports the SDK; the error says why not.
async fn imports_sdk(python: &Path) -> Result<(), String> {
    let ran = run(
        Command::new(python).args(["-c", "import ensync_sdk_ws, nacl.signing"]),
        QUICK_TIMEOUT,
    )
    .await
    .map_err(|e| e.to_string())?;
    if ran.succeeded() {
        Ok(())
    } else {
        Err(ran.report())
    }
}

/// Two fresh Ed25519 key pairs from the SDK's own crypto library (NaCl),
/// as `{"subscriber": {"public", "secret"}, "publisher": {...}}`.
async fn keygen(python: &Path) -> Value {
    let ran = run(
        Command::new(python).arg(SCRIPT).arg("keygen"),
        QUICK_TIMEOUT,
    )
    .await
    .expect("run the keygen");
    assert!(ran.succeeded(), "keygen failed: {}", ran.report());
    serde_json::from_str(&ran.stdout)
        .unwrap_or_else(|e| panic!("keygen printed no JSON ({e}): {}", ran.report()))
}

/// The base64 public and secret key of `who` in the keygen output.
fn key_pair(keys: &Value, who: &str) -> (String, String) {
    let field = |name: &str| {
        keys[who][name]
            .as_str()
            .unwrap_or_else(|| panic!("keygen gave no {who}.{name}: {keys}"))
            .to_string()
    };
    (field("public"), field("secret"))
}

/// A finished (or timed-out) child process.
struct Ran {
    what: String,
    /// `None` when it was killed for running past its time.
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl Ran {
    fn succeeded(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// How it ended, with everything it printed.
    fn report(&self) -> String {
        let ended = match self.status {
            Some(status) => status.to_string(),
            None => "killed: it ran past its time limit".to_string(),
        };
        format!(
            "`{}` ({ended}, {:.1} s)\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.what,
            self.elapsed.as_secs_f64(),
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// Runs `cmd` with no stdin, capturing its output, killing it after
/// `limit`.
///
/// # Errors
/// When it cannot be started (for instance, the program does not exist).
async fn run(cmd: &mut Command, limit: Duration) -> io::Result<Ran> {
    let what = format!("{:?}", cmd.as_std());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let started = Instant::now();
    let mut child = cmd.spawn()?;
    let stdout = Captured::start(child.stdout.take());
    let stderr = Captured::start(child.stderr.take());
    let status = match tokio::time::timeout(limit, child.wait()).await {
        Ok(status) => Some(status?),
        Err(_) => {
            child.kill().await?;
            None
        }
    };
    let elapsed = started.elapsed();
    Ok(Ran {
        what,
        status,
        stdout: stdout.finish().await,
        stderr: stderr.finish().await,
        elapsed,
    })
}

/// A child's pipe, read to EOF in the background.
struct Captured {
    buf: Arc<Mutex<Vec<u8>>>,
    reader: JoinHandle<()>,
}

impl Captured {
    fn start(pipe: Option<impl AsyncRead + Unpin + Send + 'static>) -> Captured {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buf);
        let reader = tokio::spawn(async move {
            let Some(mut pipe) = pipe else { return };
            let mut chunk = [0u8; 8192];
            while let Ok(n @ 1..) = pipe.read(&mut chunk).await {
                sink.lock()
                    .expect("not poisoned")
                    .extend_from_slice(&chunk[..n]);
            }
        });
        Captured { buf, reader }
    }

    /// What was read, once the child is gone. NOTE: a grandchild may hold
    /// the pipe open past its parent's exit, so EOF is awaited only
    /// briefly; what came until then is kept.
    async fn finish(mut self) -> String {
        let cut = tokio::time::timeout(PIPE_GRACE, &mut self.reader)
            .await
            .is_err();
        self.reader.abort();
        let mut text =
            String::from_utf8_lossy(&self.buf.lock().expect("not poisoned")).into_owned();
        if cut {
            text.push_str("\n[output cut: the pipe stayed open after the process ended]");
        }
        text
    }
}

/// FNV-1a: a hash that is the same in every build, for naming the venv.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A name no other process uses right now.
fn unique() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{}-{nanos}", std::process::id())
}
