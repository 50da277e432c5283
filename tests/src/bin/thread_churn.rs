//! Short-lived epoll loop threads in bulk, as a target for the stalltrace robustness
//! tests (`tests/tests/robustness.rs`).
//!
//! `thread-churn churn [--duration-ms MS] [--batch N] [--waits K] [--stall-every M] [--stall-ms S]`
//!
//! Until MS ms (default 3000) have passed, starts N threads at a time (default 32) and
//! joins them. Each thread creates its own epoll instance, calls `epoll_wait` K times
//! with a zero timeout (default 3), so stalltrace starts tracking it as a loop thread,
//! and exits. Every M-th thread (default 0: none) busy-loops for S ms (default 10)
//! after its last `epoll_wait` returns, so it exits in the middle of a stalled iteration.
//!
//! `thread-churn hold --threads N [--timeout-ms MS]`
//!
//! Starts N threads that each enter `epoll_wait` once on one shared epoll instance and
//! stay there until the main thread releases them through an eventfd, or until MS ms
//! (default 60000) pass. This fills stalltrace's loop-thread map when N is larger than it.
//!
//! Stdout gets `{"pid":P}` at start. Both modes then wait for one line (or end of file)
//! on stdin before they start, so a tracer can attach first. `churn` then prints
//! `{"threads":T,"stalled_threads":X,"elapsed_ns":E,"threads_per_sec":R}` when it has
//! joined every thread. `hold` prints `{"holding":N}` once all N threads have called
//! `epoll_wait` and 300 ms have passed, waits for a line or end of file on stdin,
//! releases and joins the threads, and prints `{"released":N}`. Both modes then wait
//! for end of file on stdin before they exit, so a test can inspect the process while
//! its main thread, which never waits in epoll, is its only thread.

use std::{
    hint::black_box,
    io::{self, BufRead, Write},
    process::ExitCode,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

/// Stack size of each worker thread. They call a few syscalls and nothing deep, and a
/// small stack lets `hold` start tens of thousands of them.
const WORKER_STACK_BYTES: usize = 64 * 1024;
/// Time that `hold` waits after the last thread announced its `epoll_wait`, so that
/// every thread is inside the call before `holding` is printed.
const HOLD_SETTLE: Duration = Duration::from_millis(300);

enum Mode {
    Churn {
        duration: Duration,
        batch: usize,
        waits: usize,
        stall_every: usize,
        stall: Duration,
    },
    Hold {
        threads: usize,
        timeout: Duration,
    },
}

fn main() -> ExitCode {
    let mode = match parse_mode(std::env::args().skip(1).collect()) {
        Ok(mode) => mode,
        Err(error) => {
            eprintln!("thread-churn: {error}");
            eprintln!(
                "usage: thread-churn churn [--duration-ms MS] [--batch N] [--waits K] [--stall-every M] [--stall-ms S]\n       thread-churn hold --threads N [--timeout-ms MS]"
            );
            return ExitCode::from(2);
        }
    };
    let result = print_json(&serde_json::json!({ "pid": std::process::id() }))
        .and_then(|()| read_start_line())
        .and_then(|()| match mode {
            Mode::Churn {
                duration,
                batch,
                waits,
                stall_every,
                stall,
            } => churn(duration, batch, waits, stall_every, stall),
            Mode::Hold { threads, timeout } => hold(threads, timeout),
        })
        .and_then(|()| wait_for_stdin_eof());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("thread-churn: {error}");
            ExitCode::FAILURE
        }
    }
}

fn parse_mode(args: Vec<String>) -> Result<Mode, String> {
    let Some((mode, options)) = args.split_first() else {
        return Err("missing mode: expected `churn` or `hold`".to_owned());
    };
    let mut values = std::collections::HashMap::new();
    let mut iter = options.iter();
    while let Some(name) = iter.next() {
        let value = iter
            .next()
            .ok_or_else(|| format!("{name} needs a value"))?
            .parse::<u64>()
            .map_err(|_| format!("invalid value for {name}: expected a whole number"))?;
        values.insert(name.as_str(), value);
    }
    let mut take = |name: &str, default: Option<u64>| {
        values
            .remove(name)
            .or(default)
            .ok_or_else(|| format!("{name} is required"))
    };
    let parsed = match mode.as_str() {
        "churn" => Mode::Churn {
            duration: Duration::from_millis(take("--duration-ms", Some(3000))?),
            batch: take("--batch", Some(32))?.max(1) as usize,
            waits: take("--waits", Some(3))?.max(1) as usize,
            stall_every: take("--stall-every", Some(0))? as usize,
            stall: Duration::from_millis(take("--stall-ms", Some(10))?),
        },
        "hold" => Mode::Hold {
            threads: take("--threads", None)? as usize,
            timeout: Duration::from_millis(take("--timeout-ms", Some(60_000))?),
        },
        other => return Err(format!("unknown mode `{other}`: expected `churn` or `hold`")),
    };
    if let Some(name) = values.keys().next() {
        return Err(format!("unknown option `{name}` for mode `{mode}`"));
    }
    Ok(parsed)
}

fn churn(duration: Duration, batch: usize, waits: usize, stall_every: usize, stall: Duration) -> io::Result<()> {
    let start = Instant::now();
    let mut started = 0usize;
    let mut stalled = 0usize;
    while start.elapsed() < duration {
        let mut handles = Vec::with_capacity(batch);
        for _ in 0..batch {
            started += 1;
            let stall_for = (stall_every > 0 && started % stall_every == 0).then_some(stall);
            if stall_for.is_some() {
                stalled += 1;
            }
            let handle = thread::Builder::new()
                .name("churn".into())
                .stack_size(WORKER_STACK_BYTES)
                .spawn(move || short_loop(waits, stall_for))?;
            handles.push(handle);
        }
        for handle in handles {
            handle
                .join()
                .map_err(|_| io::Error::other("a churn thread panicked"))??;
        }
    }
    let elapsed = start.elapsed();
    print_json(&serde_json::json!({
        "threads": started,
        "stalled_threads": stalled,
        "elapsed_ns": elapsed.as_nanos() as u64,
        "threads_per_sec": started as f64 / elapsed.as_secs_f64(),
    }))
}

/// Runs `waits` zero-timeout loop iterations on a fresh epoll instance, then busy-loops
/// for `stall` if given, and returns without waiting again.
fn short_loop(waits: usize, stall: Option<Duration>) -> io::Result<()> {
    let epoll = Epoll::new()?;
    for _ in 0..waits {
        epoll.wait(0)?;
    }
    if let Some(stall) = stall {
        let deadline = Instant::now() + stall;
        let mut accumulator = 0u64;
        while Instant::now() < deadline {
            accumulator = black_box(accumulator.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
        }
    }
    Ok(())
}

/// State shared by the threads of `hold`.
struct HoldShared {
    epoll: Epoll,
    entered: AtomicUsize,
    timeout_ms: i32,
    failures: AtomicUsize,
}

fn hold(threads: usize, timeout: Duration) -> io::Result<()> {
    let shared = Arc::new(HoldShared {
        epoll: Epoll::new()?,
        entered: AtomicUsize::new(0),
        timeout_ms: i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX),
        failures: AtomicUsize::new(0),
    });
    let release = EventFd::new()?;
    shared.epoll.add(release.fd)?;

    // std threads each map a signal stack with a guard page besides their own stack,
    // which runs into vm.max_map_count (65530 by default) before 17,000 threads, so
    // these are plain pthreads with a small stack.
    let mut handles = Vec::with_capacity(threads);
    let mut spawn_error = None;
    for _ in 0..threads {
        match spawn_held_thread(&shared) {
            Ok(handle) => handles.push(handle),
            Err(error) => {
                spawn_error = Some(error);
                break;
            }
        }
    }
    if spawn_error.is_none() {
        while shared.entered.load(Ordering::Acquire) < threads {
            thread::sleep(Duration::from_millis(5));
        }
        thread::sleep(HOLD_SETTLE);
        print_json(&serde_json::json!({ "holding": threads }))?;
        // Any line or end of file releases the threads.
        let mut line = String::new();
        io::stdin().lock().read_line(&mut line)?;
    }

    // Level-triggered readiness stays set, so epoll_wait returns it to every waiter.
    release.signal()?;
    for handle in handles {
        // SAFETY: each handle is a joinable thread started by spawn_held_thread and joined once.
        let result = unsafe { libc::pthread_join(handle, std::ptr::null_mut()) };
        if result != 0 {
            return Err(io::Error::from_raw_os_error(result));
        }
    }
    if let Some(error) = spawn_error {
        return Err(io::Error::new(
            error.kind(),
            format!("failed to start thread {} of {threads}: {error}", shared.entered.load(Ordering::Acquire) + 1),
        ));
    }
    let failures = shared.failures.load(Ordering::Acquire);
    if failures > 0 {
        return Err(io::Error::other(format!("{failures} held threads failed in epoll_wait")));
    }
    print_json(&serde_json::json!({ "released": threads }))
}

fn spawn_held_thread(shared: &Arc<HoldShared>) -> io::Result<libc::pthread_t> {
    // SAFETY: pthread_attr_t is plain data that pthread_attr_init initializes.
    let mut attr: libc::pthread_attr_t = unsafe { std::mem::zeroed() };
    // SAFETY: `attr` is valid for writes, and is destroyed below.
    unsafe {
        libc::pthread_attr_init(&mut attr);
        libc::pthread_attr_setstacksize(&mut attr, WORKER_STACK_BYTES);
    }
    let argument = Arc::into_raw(Arc::clone(shared)) as *mut libc::c_void;
    let mut handle: libc::pthread_t = 0;
    // SAFETY: `held_thread` takes ownership of the Arc passed as its argument.
    let result = unsafe { libc::pthread_create(&mut handle, &attr, held_thread, argument) };
    // SAFETY: `attr` was initialized above and is not used again.
    unsafe { libc::pthread_attr_destroy(&mut attr) };
    if result != 0 {
        // SAFETY: the thread did not start, so the Arc reference is still ours to release.
        drop(unsafe { Arc::from_raw(argument as *const HoldShared) });
        return Err(io::Error::from_raw_os_error(result));
    }
    Ok(handle)
}

extern "C" fn held_thread(argument: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: spawn_held_thread passes an Arc<HoldShared> turned into a raw pointer.
    let shared = unsafe { Arc::from_raw(argument as *const HoldShared) };
    shared.entered.fetch_add(1, Ordering::AcqRel);
    if shared.epoll.wait(shared.timeout_ms).is_err() {
        shared.failures.fetch_add(1, Ordering::AcqRel);
    }
    std::ptr::null_mut()
}

fn read_start_line() -> io::Result<()> {
    let mut line = String::new();
    io::stdin().lock().read_line(&mut line)?;
    Ok(())
}

fn wait_for_stdin_eof() -> io::Result<()> {
    let mut sink = Vec::new();
    let mut stdin = io::stdin().lock();
    loop {
        sink.clear();
        if stdin.read_until(b'\n', &mut sink)? == 0 {
            return Ok(());
        }
    }
}

fn print_json(value: &serde_json::Value) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{value}")?;
    stdout.flush()
}

struct Epoll {
    fd: libc::c_int,
}

impl Epoll {
    fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1 has no memory preconditions.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    fn add(&self, fd: libc::c_int) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: fd as u64,
        };
        // SAFETY: both fds are open, and `event` is a valid epoll_event.
        if unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_ADD, fd, &mut event) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Calls `epoll_wait` once, retrying only on EINTR.
    fn wait(&self, timeout_ms: i32) -> io::Result<()> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 1];
        loop {
            // SAFETY: `events` is valid for writes of the number of entries passed.
            let ready = unsafe { libc::epoll_wait(self.fd, events.as_mut_ptr(), 1, timeout_ms) };
            if ready >= 0 {
                return Ok(());
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: `fd` is an epoll fd that this value owns.
        unsafe { libc::close(self.fd) };
    }
}

struct EventFd {
    fd: libc::c_int,
}

impl EventFd {
    fn new() -> io::Result<Self> {
        // SAFETY: eventfd has no memory preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    fn signal(&self) -> io::Result<()> {
        let one = 1u64.to_ne_bytes();
        // SAFETY: `one` is valid for reads of its 8 bytes.
        if unsafe { libc::write(self.fd, one.as_ptr().cast(), one.len()) } != one.len() as isize {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for EventFd {
    fn drop(&mut self) {
        // SAFETY: `fd` is an eventfd that this value owns.
        unsafe { libc::close(self.fd) };
    }
}
