//! Harness for the stalltrace scenario tests: starts the `loop-workload` event loop or a
//! `redis-server`, records it with `stalltrace record`, triggers a stall and parses the
//! report.
//!
//! The scenarios load BPF programs, so they need root and the `stalltrace` binary named
//! by `STALLTRACE_BIN`. `cargo xtask test` builds the binary, sets the variable and runs
//! the scenarios one at a time.

pub mod locks;
pub mod cli;
pub mod protocol;
pub mod stacks;
pub mod stdin_loop;
mod recording;
mod redis;
mod report;
mod workload;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Child,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

pub use recording::{analyze, Recording};
pub use redis::RedisServer;
pub use report::{Breakdown, Report, Stall};
pub use workload::Workload;

/// Returns whether the tests run as root. Otherwise prints that `test` is skipped.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    eprintln!("skipped: {test} needs root (BPF programs load only as root)");
    false
}

/// Returns the `stalltrace` binary named by `STALLTRACE_BIN`.
///
/// # Panics
///
/// Panics when the variable is not set or names no file.
pub fn stalltrace_bin() -> PathBuf {
    let Some(path) = std::env::var_os("STALLTRACE_BIN") else {
        panic!(
            "STALLTRACE_BIN is not set: run the scenarios with `cargo xtask test`, which builds stalltrace and sets it"
        );
    };
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "STALLTRACE_BIN={} is not a file: run `cargo xtask build` or `cargo xtask test`",
        path.display()
    );
    path
}

/// Returns CLOCK_MONOTONIC in nanoseconds, the clock of stalltrace's `start_ns`.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec, and CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Folder under the system temp folder for one test's output. It is removed on drop
/// unless the test is panicking, so a failed test leaves its capture to inspect.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn new(test: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos())
            .unwrap_or(0);
        let path =
            std::env::temp_dir().join(format!("stalltrace-{test}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&path)
            .unwrap_or_else(|error| panic!("failed to create {}: {error}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("kept the test output in {}", self.path.display());
        } else if let Err(error) = fs::remove_dir_all(&self.path) {
            eprintln!("failed to remove {}: {error}", self.path.display());
        }
    }
}

/// Polls `child` until it exits or `timeout` passes, and returns its exit status if it exited.
fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() >= deadline => return None,
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Err(error) => panic!("failed to poll child process {}: {error}", child.id()),
        }
    }
}

/// Sends `signal` to `child` unless it has already been reaped.
fn signal_child(child: &Child, signal: libc::c_int) {
    // SAFETY: kill has no memory preconditions. The pid belongs to our own child, which
    // stays a zombie until reaped, so the pid cannot name another process.
    unsafe { libc::kill(child.id() as libc::pid_t, signal) };
}

/// Kills `child` with SIGKILL and reaps it, ignoring a child that already exited.
fn kill_and_reap(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
        let _ = child.wait();
    }
}
