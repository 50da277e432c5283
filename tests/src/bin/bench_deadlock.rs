//! Two threads that deadlock on two `pthread_mutex_t`s, for the cycle detection latency
//! benchmark of `cargo xtask bench`.
//!
//! `bench-deadlock [--exit-after-ms MS]`
//!
//! Thread `deadlock-a` locks mutex 1 and thread `deadlock-b` locks mutex 2. Once both
//! hold their first mutex, `deadlock-a` locks mutex 2 and `deadlock-b` locks mutex 1, so
//! both block for good. Each prints `{"thread":"deadlock-a","tid":T,"attempt_ns":N}`
//! just before its second lock call, with N in CLOCK_MONOTONIC nanoseconds, the clock
//! of stalltrace's timestamps. The cycle is complete at the later of the two times. The
//! first line is `{"pid":P}`. After MS ms (default 10000) the main thread exits the
//! process, which ends the deadlocked threads.

use std::{
    cell::UnsafeCell,
    io::{self, Write},
    process::ExitCode,
    sync::{Arc, Barrier},
    thread,
    time::Duration,
};

/// A default-type glibc mutex, whose owner field stalltrace reads to find the holder.
struct PthreadMutex(UnsafeCell<libc::pthread_mutex_t>);

// SAFETY: pthread mutexes are made to be shared between threads, and the cell is only
// passed to pthread functions.
unsafe impl Sync for PthreadMutex {}

impl PthreadMutex {
    const fn new() -> Self {
        Self(UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER))
    }

    fn lock(&self) -> io::Result<()> {
        // SAFETY: the mutex is initialized and lives in a static, so it never moves.
        let result = unsafe { libc::pthread_mutex_lock(self.0.get()) };
        if result != 0 {
            return Err(io::Error::from_raw_os_error(result));
        }
        Ok(())
    }
}

static FIRST: PthreadMutex = PthreadMutex::new();
static SECOND: PthreadMutex = PthreadMutex::new();

fn main() -> ExitCode {
    let exit_after = match parse_exit_after(std::env::args().skip(1)) {
        Ok(exit_after) => exit_after,
        Err(error) => {
            eprintln!("bench-deadlock: {error}");
            eprintln!("usage: bench-deadlock [--exit-after-ms MS]");
            return ExitCode::from(2);
        }
    };
    if let Err(error) = print_json(&serde_json::json!({ "pid": std::process::id() })) {
        eprintln!("bench-deadlock: {error}");
        return ExitCode::FAILURE;
    }

    let both_hold_first = Arc::new(Barrier::new(2));
    for (name, first, second) in [("deadlock-a", &FIRST, &SECOND), ("deadlock-b", &SECOND, &FIRST)] {
        let both_hold_first = Arc::clone(&both_hold_first);
        let spawned = thread::Builder::new().name(name.into()).spawn(move || {
            let result = first.lock().and_then(|()| {
                both_hold_first.wait();
                // SAFETY: gettid has no preconditions and cannot fail.
                let tid = unsafe { libc::gettid() };
                print_json(&serde_json::json!({
                    "thread": name,
                    "tid": tid,
                    "attempt_ns": monotonic_ns(),
                }))?;
                second.lock()
            });
            if let Err(error) = result {
                eprintln!("bench-deadlock: thread {name} failed: {error}");
            }
        });
        if let Err(error) = spawned {
            eprintln!("bench-deadlock: failed to start thread {name}: {error}");
            return ExitCode::FAILURE;
        }
    }

    thread::sleep(exit_after);
    // Returning from main ends the process, and the deadlocked threads with it.
    ExitCode::SUCCESS
}

fn parse_exit_after(mut args: impl Iterator<Item = String>) -> Result<Duration, String> {
    let mut exit_after = Duration::from_millis(10_000);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--exit-after-ms" => {
                let value = args
                    .next()
                    .ok_or("--exit-after-ms needs a value")?
                    .parse::<u64>()
                    .map_err(|_| "invalid value for --exit-after-ms: expected whole milliseconds")?;
                exit_after = Duration::from_millis(value);
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(exit_after)
}

fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec, and CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

fn print_json(value: &serde_json::Value) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{value}")?;
    stdout.flush()
}
