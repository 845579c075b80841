//! Server processes: free ports, CPU pinning, kill-on-drop guards, RSS.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// CPU the servers run on.
pub const SERVER_CPU: usize = 1;
/// CPU the bench client runs on.
pub const CLIENT_CPU: usize = 0;

/// A free loopback port: bind port 0, read it, drop the listener.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Pins the calling thread (and threads it spawns later) to `cpu`.
pub fn pin_current_thread(cpu: usize) -> Result<()> {
    // SAFETY: `set` is a plain bitmask owned by this frame; pid 0 is the
    // calling thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        bail!(
            "sched_setaffinity(cpu {cpu}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// A child server process, pinned to [`SERVER_CPU`], killed when dropped.
pub struct Server {
    pub name: &'static str,
    child: Child,
}

impl Server {
    /// Starts `program args...` under `taskset -c SERVER_CPU`, with output
    /// to `log` (a file in the temp dir), and waits until `port` accepts.
    pub fn spawn(
        name: &'static str,
        program: &Path,
        args: &[String],
        log: &Path,
        port: u16,
    ) -> Result<Self> {
        let out = std::fs::File::create(log)?;
        let child = Command::new("taskset")
            .arg("-c")
            .arg(SERVER_CPU.to_string())
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("spawning {name} ({})", program.display()))?;
        let mut server = Self { name, child };
        server.wait_ready(port, log)?;
        Ok(server)
    }

    /// The server's pid (taskset execs the program, so it is the same).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_ready(&mut self, port: u16, log: &Path) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                let log = std::fs::read_to_string(log).unwrap_or_default();
                bail!("{} exited ({status}) before listening:\n{log}", self.name);
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("{} did not listen on port {port} within 30 s", self.name)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes back what a load left dirty and lets the machine go quiet:
/// latencies measured right after loading millions of events otherwise
/// measure the kernel writing gigabytes back on the server's CPU.
pub fn settle() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::thread::sleep(std::time::Duration::from_secs(1));
}

/// A process's resident memory in KiB: all of it (`VmRSS`), and its
/// anonymous part (`RssAnon`: its heap and stacks, without the pages of
/// files it maps). ensync-server maps segment files for small replays
/// (`store.mapped_reads`) and lets those pages go every 10 s, so its
/// `VmRSS` can rise or fall by hundreds of MiB of page cache while what
/// it holds itself stays put: the anonymous part tells the two apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rss {
    pub all_kib: u64,
    pub anon_kib: u64,
}

impl Rss {
    /// Process `pid`'s, from /proc/PID/status.
    pub fn of(pid: u32) -> Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .with_context(|| format!("no {name} in /proc/{pid}/status"))
        };
        Ok(Self {
            all_kib: field("VmRSS:")?,
            anon_kib: field("RssAnon:")?,
        })
    }

    /// The larger of each part.
    fn max(self, other: Self) -> Self {
        Self {
            all_kib: self.all_kib.max(other.all_kib),
            anon_kib: self.anon_kib.max(other.anon_kib),
        }
    }
}

/// Each CPU's time counters from /proc/stat, in ticks: (stolen, all).
/// Stolen time is what the hypervisor gave to others while this machine
/// had work: on a shared host it slows whatever ran then. Empty where
/// /proc/stat is unreadable.
pub fn cpu_ticks() -> Vec<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let ticks: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .map(|t| t.parse().unwrap_or(0))
                .collect();
            // user nice system idle iowait irq softirq steal (guest time
            // is counted in user and nice already).
            let all = ticks.iter().take(8).sum();
            (ticks.get(7).copied().unwrap_or(0), all)
        })
        .collect()
}

/// The share of each CPU's time stolen between two [`cpu_ticks`]
/// readings, in percent.
pub fn steal_percent(before: &[(u64, u64)], after: &[(u64, u64)]) -> Vec<f64> {
    before
        .iter()
        .zip(after)
        .map(|((stolen_0, all_0), (stolen_1, all_1))| {
            let all = all_1.saturating_sub(*all_0).max(1);
            100.0 * stolen_1.saturating_sub(*stolen_0) as f64 / all as f64
        })
        .collect()
}

/// Bytes process `pid` has had read from storage (`read_bytes` of
/// /proc/PID/io): reads the page cache answered do not count.
pub fn storage_read_bytes(pid: u32) -> Result<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))?;
    io.lines()
        .find_map(|l| l.strip_prefix("read_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no read_bytes in /proc/PID/io")
}

/// Samples a process's RSS every 10 ms on a thread, keeping the peak of
/// each part.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Rss>,
}

impl RssSampler {
    pub fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let sample = || Rss::of(pid).unwrap_or_default();
            let mut peak = Rss::default();
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(sample());
                std::thread::sleep(Duration::from_millis(10));
            }
            peak.max(sample())
        });
        Self { stop, handle }
    }

    /// Stops sampling; returns the peak of each part.
    pub fn finish(self) -> Rss {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

/// First line of `program --version`, or "?".
pub fn version(program: &Path) -> String {
    Command::new(program)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines().next().map(str::to_owned)
        })
        .unwrap_or_else(|| "?".into())
}

/// "CPU model, N cores, kernel X".
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!("{model}, {cores} cores, kernel {kernel}")
}

/// Finds `name` on PATH or in /usr/sbin and /usr/local/sbin.
pub fn find_program(name: &str) -> Result<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .with_context(|| {
            format!("{name} not found on PATH or in /usr/sbin (apt-get install {name})")
        })
}
