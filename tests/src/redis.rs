//! A `redis-server` on 127.0.0.1 for the scenarios that need a real event loop.

use std::{
    fs::File,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

/// Maximum wait for a new server to reply to PING.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Running `redis-server` that listens on 127.0.0.1 only, on a free port, with its working
/// folder and log in the folder given to `start`. Drop kills the server.
pub struct RedisServer {
    child: Child,
    port: u16,
    log_path: PathBuf,
}

impl RedisServer {
    /// Starts `redis-server` with `DEBUG` enabled and persistence off, and waits until
    /// `redis-cli PING` replies PONG.
    pub fn start(dir: &Path) -> Self {
        let port = free_loopback_port();
        let log_path = dir.join("redis.log");
        let log = File::create(&log_path)
            .unwrap_or_else(|error| panic!("failed to create {}: {error}", log_path.display()));
        let log_copy = log
            .try_clone()
            .expect("failed to duplicate the log file handle");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--enable-debug-command", "yes"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_copy)
            .spawn()
            .unwrap_or_else(|error| {
                panic!("failed to start redis-server: {error}; install it with `cargo xtask setup`")
            });
        let mut server = Self {
            child,
            port,
            log_path,
        };
        server.wait_until_ready();
        server
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs `redis-cli -p PORT ARGS...` and returns its output, failing when it fails.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = self.run_cli(args);
        assert!(
            output.status.success(),
            "redis-cli {args:?} exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    fn run_cli(&self, args: &[&str]) -> Output {
        Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|error| {
                panic!("failed to run redis-cli: {error}; install it with `cargo xtask setup`")
            })
    }

    fn wait_until_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "redis-server exited with {status} before replying to PING; log:\n{}",
                    self.log()
                );
            }
            let output = self.run_cli(&["ping"]);
            if output.status.success() && String::from_utf8_lossy(&output.stdout).trim() == "PONG" {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "redis-server on port {} did not reply to PING within {READY_TIMEOUT:?}; log:\n{}",
                    self.port,
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        crate::kill_and_reap(&mut self.child);
    }
}

/// Returns a TCP port on 127.0.0.1 that was free a moment ago. Another process could take
/// it before the caller binds it, which `RedisServer::start` then reports as a failed start.
fn free_loopback_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("failed to bind a port on 127.0.0.1");
    listener
        .local_addr()
        .expect("a bound listener has an address")
        .port()
}
