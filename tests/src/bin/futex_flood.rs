//! Futex syscalls as fast as possible from epoll loop threads, as a target for the
//! stalltrace robustness tests (`tests/tests/robustness.rs`).
//!
//! `futex-flood [--duration-ms MS] [--threads T] [--epoll-every K]`
//!
//! T threads (default 2) named `flood-0`, `flood-1`, ... alternate, for MS ms (default
//! 3000), between a `FUTEX_WAKE_PRIVATE` of a word no thread waits on and a
//! `FUTEX_WAIT_PRIVATE` with a value the word does not contain, which returns EAGAIN
//! without sleeping. Each wait enters and leaves the futex wait path that stalltrace
//! tracks. Every K futex calls (default 1000) a thread calls `epoll_wait` with a zero
//! timeout, so it is a loop thread whose iterations are K futex calls long.
//!
//! After the flood the threads sleep in `clock_nanosleep`, 10 ms at a time, and never
//! touch a futex again. Stdout gets `{"pid":P}` at start, after which the process waits
//! for one line (or end of file) on stdin, so a tracer can attach first. Then it prints
//! `{"threads":{"flood-0":TID,...}}` once the threads run, and
//! `{"futex_ops":N,"elapsed_ns":E,"ops_per_sec":R}` once every thread has finished its
//! flood. End of file on stdin makes the threads exit, and the process exits once they
//! have.

use std::{
    collections::BTreeMap,
    io::{self, BufRead, Write},
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        mpsc, Arc,
    },
    thread,
    time::{Duration, Instant},
};

/// Value of every flood thread's futex word. Waits expect another value, so they fail at once.
const WORD_VALUE: u32 = 0;
const PARK_SLEEP: Duration = Duration::from_millis(10);

fn main() -> ExitCode {
    let options = match parse_options(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(error) => {
            eprintln!("futex-flood: {error}");
            eprintln!("usage: futex-flood [--duration-ms MS] [--threads T] [--epoll-every K]");
            return ExitCode::from(2);
        }
    };
    match run(options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("futex-flood: {error}");
            ExitCode::FAILURE
        }
    }
}

struct Options {
    duration: Duration,
    threads: usize,
    epoll_every: u64,
}

fn parse_options(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut options = Options {
        duration: Duration::from_millis(3000),
        threads: 2,
        epoll_every: 1000,
    };
    while let Some(arg) = args.next() {
        let value = args
            .next()
            .ok_or_else(|| format!("{arg} needs a value"))?
            .parse::<u64>()
            .map_err(|_| format!("invalid value for {arg}: expected a whole number"))?;
        match arg.as_str() {
            "--duration-ms" => options.duration = Duration::from_millis(value),
            "--threads" => options.threads = value.max(1) as usize,
            "--epoll-every" => options.epoll_every = value.max(1),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(options)
}

/// What a flood thread sends back: its TID first, then its futex call count.
enum Report {
    Tid(String, u32),
    Ops(io::Result<u64>),
}

fn run(options: Options) -> io::Result<()> {
    print_json(&serde_json::json!({ "pid": std::process::id() }))?;
    let mut start_line = String::new();
    io::stdin().lock().read_line(&mut start_line)?;

    let stop = Arc::new(AtomicBool::new(false));
    let (sender, reports) = mpsc::channel();
    let deadline = Instant::now() + options.duration;
    let start = Instant::now();
    let mut handles = Vec::with_capacity(options.threads);
    for index in 0..options.threads {
        let name = format!("flood-{index}");
        let sender = sender.clone();
        let stop = Arc::clone(&stop);
        let epoll_every = options.epoll_every;
        let handle = thread::Builder::new().name(name.clone()).spawn(move || {
            // SAFETY: gettid has no preconditions and cannot fail.
            let tid = unsafe { libc::gettid() } as u32;
            let _ = sender.send(Report::Tid(name, tid));
            let _ = sender.send(Report::Ops(flood(deadline, epoll_every)));
            while !stop.load(Ordering::Relaxed) {
                thread::sleep(PARK_SLEEP);
            }
        })?;
        handles.push(handle);
    }
    drop(sender);

    let mut threads = BTreeMap::new();
    let mut ops = 0u64;
    let mut finished = 0;
    let mut first_error = None;
    for report in reports.iter() {
        match report {
            Report::Tid(name, tid) => {
                threads.insert(name, tid);
                if threads.len() == options.threads {
                    print_json(&serde_json::json!({ "threads": threads }))?;
                }
            }
            Report::Ops(result) => {
                match result {
                    Ok(count) => ops += count,
                    Err(error) => {
                        first_error.get_or_insert(error);
                    }
                }
                finished += 1;
                if finished == options.threads {
                    break;
                }
            }
        }
    }
    let elapsed = start.elapsed();
    let outcome = match first_error {
        Some(error) => Err(error),
        None => print_json(&serde_json::json!({
            "futex_ops": ops,
            "elapsed_ns": elapsed.as_nanos() as u64,
            "ops_per_sec": ops as f64 / elapsed.as_secs_f64(),
        })),
    };

    let mut sink = Vec::new();
    let mut stdin = io::stdin().lock();
    while outcome.is_ok() && stdin.read_until(b'\n', &mut sink)? > 0 {
        sink.clear();
    }
    stop.store(true, Ordering::Relaxed);
    for handle in handles {
        handle
            .join()
            .map_err(|_| io::Error::other("a flood thread panicked"))?;
    }
    outcome
}

/// Calls futex wake and futex wait in turn until `deadline`, with an `epoll_wait` every
/// `epoll_every` calls, and returns the number of futex calls.
fn flood(deadline: Instant, epoll_every: u64) -> io::Result<u64> {
    let word = AtomicU32::new(WORD_VALUE);
    // SAFETY: epoll_create1 has no memory preconditions.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epoll < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 1];
    let mut ops = 0u64;
    while Instant::now() < deadline {
        for _ in 0..epoll_every / 2 {
            // SAFETY: the word is a live, aligned u32 for the whole call.
            unsafe {
                libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG, 1);
                libc::syscall(
                    libc::SYS_futex,
                    word.as_ptr(),
                    libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                    WORD_VALUE + 1,
                    std::ptr::null::<libc::timespec>(),
                );
            }
            ops += 2;
        }
        // SAFETY: `events` is valid for writes of the one entry passed.
        unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), 1, 0) };
    }
    // SAFETY: `epoll` is an fd that this function opened.
    unsafe { libc::close(epoll) };
    Ok(ops)
}

fn print_json(value: &serde_json::Value) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{value}")?;
    stdout.flush()
}
