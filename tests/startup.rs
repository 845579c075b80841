//! Start-up of the real binary: a config it cannot use stops it with a
//! message naming the file, the line and the key, and open mode on an
//! address others can reach is warned about.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BINARY: &str = env!("CARGO_BIN_EXE_ensync-server");
/// How long the binary gets to say what it has to say.
const WAIT: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn server(config: &Path, listen: &str) -> Command {
    let mut cmd = Command::new(BINARY);
    cmd.arg("--config")
        .arg(config)
        .args(["--listen", listen])
        .args(["--http-listen", &format!("127.0.0.1:{}", free_port())])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Runs `cmd` until it exits; its status and what it logged.
fn run_to_exit(mut cmd: Command) -> (bool, String) {
    let mut child = cmd.spawn().expect("start ensync-server");
    let (tx, rx) = mpsc::channel();
    let mut stderr = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        let _ = tx.send(text);
    });
    let log = rx.recv_timeout(WAIT).unwrap_or_else(|_| {
        let _ = child.kill();
        panic!("ensync-server did not exit within {WAIT:?}")
    });
    let status = child.wait().expect("wait");
    (status.success(), log)
}

/// Reads `child`'s log until a line contains `until`; returns every line
/// read. Panics if it does not come.
fn log_until(child: &mut Child, until: &str) -> Vec<String> {
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut lines = Vec::new();
    while let Ok(line) = rx.recv_timeout(WAIT) {
        let done = line.contains(until);
        lines.push(line);
        if done {
            return lines;
        }
    }
    let _ = child.kill();
    panic!("no log line with {until:?} within {WAIT:?}: {lines:#?}");
}

#[test]
fn a_config_it_cannot_use_stops_it_naming_the_file_line_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ensync.toml");
    let data = dir.path().join("data");
    let cases = [
        (
            "[limits]\nmax_conections = 5\n",
            &["ensync.toml", "line 2", "max_conections"][..],
        ),
        (
            "[[clients]]\nid = \"a\"\naccess_key = \"k\"\n\n[[clients]]\nid = \"b\"\npublish = [\"x/*\"]\n",
            &["ensync.toml", "line 6", "clients[1].id", "has no access_key"][..],
        ),
        (
            "[heartbeat]\ninterval = \"soon\"\n",
            &["ensync.toml", "line 2", "interval"][..],
        ),
    ];
    for (text, expected) in cases {
        std::fs::write(&path, format!("data_dir = {data:?}\n{text}")).expect("write config");
        let (ok, log) = run_to_exit(server(&path, &format!("127.0.0.1:{}", free_port())));
        assert!(!ok, "started with {text:?}");
        for part in expected {
            // The file's first line is data_dir, so lines are one later.
            let part = match part.strip_prefix("line ") {
                Some(n) => format!("line {}", n.parse::<usize>().expect("number") + 1),
                None => (*part).to_string(),
            };
            assert!(log.contains(&part), "{part:?} missing for {text:?}:\n{log}");
        }
    }
}

#[test]
fn open_mode_on_a_reachable_address_is_warned_about_and_so_are_keys_without_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ensync.toml");
    let data = dir.path().join("data");
    let warning = "open mode on a non-loopback address";
    for keyed in [false, true] {
        let clients = if keyed {
            "[[clients]]\nid = \"a\"\naccess_key = \"k\"\n"
        } else {
            ""
        };
        std::fs::write(&path, format!("data_dir = {data:?}\n{clients}")).expect("write config");
        let mut child = server(&path, &format!("0.0.0.0:{}", free_port()))
            .spawn()
            .expect("start ensync-server");
        let lines = log_until(&mut child, "event log open");
        child.kill().expect("kill");
        child.wait().expect("wait");
        let warned = lines.iter().any(|l| l.contains(warning));
        assert_eq!(warned, !keyed, "keyed: {keyed}, log: {lines:#?}");
        // With keys but without TLS, the keys would cross the network in
        // clear: that is warned about instead.
        let clear = lines
            .iter()
            .any(|l| l.contains("no [tls] on a non-loopback address"));
        assert_eq!(clear, keyed, "keyed: {keyed}, log: {lines:#?}");
    }
}
