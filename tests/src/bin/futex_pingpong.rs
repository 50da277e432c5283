//! Two threads hand a token back and forth through futex wait and wake as fast as they
//! can, for the overhead benchmarks of `cargo xtask bench`.
//!
//! `futex-pingpong [--duration-ms MS] [--pin CPU]`
//!
//! Thread `ping` owns the token when the futex word is 0 and thread `pong` when it is 1.
//! The owner flips the word and wakes the other thread, then waits in `FUTEX_WAIT_PRIVATE`
//! until the token comes back, so every hand-off is a futex wake, usually a futex wait
//! and a context switch. After `--duration-ms` (default 5000) the main thread stops the
//! exchange and prints one JSON line:
//! `{"round_trips":N,"elapsed_ns":E,"round_trips_per_sec":R}`.
//!
//! `--pin CPU` pins both threads to that CPU, so each hand-off is a switch on one CPU
//! and no wake-up crosses CPUs.

use std::{
    io::{self, Write},
    mem,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

/// Futex word value while `ping` has the token.
const PING_TURN: u32 = 0;
/// Futex word value while `pong` has the token.
const PONG_TURN: u32 = 1;
/// Futex word value after the exchange stopped; both threads return.
const STOPPED: u32 = 2;

struct Options {
    duration: Duration,
    pin: Option<usize>,
}

fn main() -> ExitCode {
    let options = match parse_options(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(error) => {
            eprintln!("futex-pingpong: {error}");
            eprintln!("usage: futex-pingpong [--duration-ms MS] [--pin CPU]");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("futex-pingpong: {error}");
            ExitCode::FAILURE
        }
    }
}

fn parse_options(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut options = Options {
        duration: Duration::from_millis(5000),
        pin: None,
    };
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| format!("{name} needs a value"))?
                .parse::<u64>()
                .map_err(|_| format!("invalid value for {name}: expected a whole number"))
        };
        match arg.as_str() {
            "--duration-ms" => options.duration = Duration::from_millis(value("--duration-ms")?),
            "--pin" => options.pin = Some(value("--pin")? as usize),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(options)
}

fn run(options: &Options) -> io::Result<()> {
    let word = Arc::new(AtomicU32::new(PING_TURN));
    let stop = Arc::new(AtomicBool::new(false));

    let pong = {
        let word = Arc::clone(&word);
        let pin = options.pin;
        thread::Builder::new().name("pong".into()).spawn(move || {
            if let Some(cpu) = pin {
                pin_current_thread(cpu)?;
            }
            loop {
                match wait_for_turn(&word, PONG_TURN) {
                    STOPPED => return Ok::<(), io::Error>(()),
                    _ => hand_over(&word, PING_TURN),
                }
            }
        })?
    };

    let ping = {
        let word = Arc::clone(&word);
        let stop = Arc::clone(&stop);
        let pin = options.pin;
        thread::Builder::new().name("ping".into()).spawn(move || {
            if let Some(cpu) = pin {
                pin_current_thread(cpu)?;
            }
            let mut round_trips = 0u64;
            loop {
                wait_for_turn(&word, PING_TURN);
                if stop.load(Ordering::Relaxed) {
                    hand_over(&word, STOPPED);
                    return Ok::<u64, io::Error>(round_trips);
                }
                hand_over(&word, PONG_TURN);
                round_trips += 1;
            }
        })?
    };

    let start = Instant::now();
    thread::sleep(options.duration);
    stop.store(true, Ordering::Relaxed);
    let round_trips = ping
        .join()
        .map_err(|_| io::Error::other("thread ping panicked"))??;
    let elapsed = start.elapsed();
    pong.join()
        .map_err(|_| io::Error::other("thread pong panicked"))??;

    let per_sec = round_trips as f64 / elapsed.as_secs_f64();
    let line = serde_json::json!({
        "round_trips": round_trips,
        "elapsed_ns": elapsed.as_nanos() as u64,
        "round_trips_per_sec": per_sec,
    });
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()
}

/// Waits until the word is `turn` or [`STOPPED`], and returns the value seen.
fn wait_for_turn(word: &AtomicU32, turn: u32) -> u32 {
    loop {
        let value = word.load(Ordering::Acquire);
        if value == turn || value == STOPPED {
            return value;
        }
        futex_wait(word, value);
    }
}

/// Stores `value` and wakes the other thread.
fn hand_over(word: &AtomicU32, value: u32) {
    word.store(value, Ordering::Release);
    futex_wake(word);
}

/// Sleeps while the word still contains `expected`. Returns at once if it changed, and
/// on a spurious wake-up, so callers check the word again.
fn futex_wait(word: &AtomicU32, expected: u32) {
    // SAFETY: the word is a live, aligned u32 for the whole call, and a null timeout
    // waits without a deadline.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            std::ptr::null::<libc::timespec>(),
        )
    };
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: the word is a live, aligned u32 for the whole call.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            1,
        )
    };
}

fn pin_current_thread(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::other(format!("CPU {cpu} is past CPU_SETSIZE")));
    }
    // SAFETY: cpu_set_t is plain data, and all zeros is the empty set.
    let mut mask: libc::cpu_set_t = unsafe { mem::zeroed() };
    // SAFETY: cpu is below CPU_SETSIZE, checked above.
    unsafe { libc::CPU_SET(cpu, &mut mask) };
    // SAFETY: `mask` is a valid cpu_set_t of the size passed, and pid 0 is the calling thread.
    if unsafe { libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &mask) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
