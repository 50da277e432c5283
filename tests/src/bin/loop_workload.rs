//! Epoll event loop that stalls on command, as a target for the stalltrace scenario tests.
//!
//! The main thread is the loop thread. It calls `epoll_wait` with a 10 ms timeout on an
//! epoll set that contains stdin, so it re-enters `epoll_wait` often even when idle. Each
//! line on stdin is one command, run by the loop thread between two `epoll_wait` calls:
//!
//! - `spin MS`: busy-loop for MS ms of wall time in `spin_handler`.
//! - `sleep MS`: `std::thread::sleep` for MS ms (the `clock_nanosleep` syscall in glibc).
//! - `mutex MS`: a helper thread keeps a `std::sync::Mutex` locked for MS ms while the loop
//!   thread waits for it in a futex wait.
//! - `contend MS N`: N spinner threads and the loop thread share one CPU until the loop
//!   thread has used MS ms of its own CPU time, so most of the wall time is run-queue wait.
//! - `compute MS`: compute in the loop thread until it has used MS ms of its own CPU time
//!   (CLOCK_THREAD_CPUTIME_ID), on whatever CPU the scheduler gives it. Under a cgroup CPU
//!   quota the wall time includes the periods the group spends throttled.
//! - `noop`: nothing.
//! - `exit`: leave the loop and exit. End of file on stdin does the same.
//!
//! Stdout gets one JSON line at start, `{"pid":P,"loop_tid":T}`, and one line after each
//! command, `{"done":"CMD","start_ns":S,"end_ns":E}` with the handler's start and end as
//! CLOCK_MONOTONIC nanoseconds. An invalid or failed command prints `{"error":"..."}`.

use std::{
    hint::black_box,
    io,
    mem,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc, Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use stalltrace_tests::{
    protocol::{Done, Failed, Started},
    stdin_loop::{print_line, read_stdin, Epoll, NonBlockingStdin},
};

/// Maximum bytes read from stdin in one loop iteration. A bounded read keeps each
/// iteration short under a flood of `noop` lines, as in servers that read a fixed
/// buffer per client per iteration, and level-triggered epoll reports the rest next time.
const READ_CHUNK_BYTES: usize = 4096;
/// Time that `contend` lets its spinner threads run before the loop thread starts to compute.
const CONTEND_WARMUP: Duration = Duration::from_millis(20);

fn main() -> io::Result<()> {
    let _stdin_mode = NonBlockingStdin::set()?;
    let epoll = Epoll::with_stdin()?;
    let lock_holder = LockHolder::start();

    // SAFETY: gettid has no preconditions and cannot fail.
    let loop_tid = unsafe { libc::gettid() } as u32;
    print_line(&Started {
        pid: std::process::id(),
        loop_tid,
    })?;

    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    loop {
        if !epoll.wait()? {
            continue;
        }

        let at_eof = match read_stdin(&mut chunk)? {
            Some(0) => true,
            Some(count) => {
                pending.extend_from_slice(&chunk[..count]);
                false
            }
            None => false,
        };

        let mut consumed = 0;
        while let Some(offset) = pending[consumed..].iter().position(|&byte| byte == b'\n') {
            let line = String::from_utf8_lossy(&pending[consumed..consumed + offset]).into_owned();
            consumed += offset + 1;
            if run_line(&line, &lock_holder)? == Flow::Exit {
                return Ok(());
            }
        }
        pending.drain(..consumed);

        if at_eof {
            // A last command without a newline still runs.
            let line = String::from_utf8_lossy(&pending).into_owned();
            run_line(&line, &lock_holder)?;
            return Ok(());
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Exit,
}

#[derive(Debug, PartialEq, Eq)]
enum Command {
    Spin(Duration),
    Sleep(Duration),
    Mutex(Duration),
    Contend { cpu_time: Duration, spinners: usize },
    Compute(Duration),
    Noop,
    Exit,
}

/// Parses and runs one command line, then prints its `done` or `error` line.
fn run_line(line: &str, lock_holder: &LockHolder) -> io::Result<Flow> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(Flow::Continue);
    }
    let command = match parse_command(line) {
        Ok(command) => command,
        Err(error) => {
            print_line(&Failed { error })?;
            return Ok(Flow::Continue);
        }
    };

    let start_ns = monotonic_ns();
    let outcome = run_command(&command, lock_holder);
    let end_ns = monotonic_ns();

    match outcome {
        Ok(()) => print_line(&Done {
            done: line.to_string(),
            start_ns,
            end_ns,
        })?,
        Err(error) => print_line(&Failed {
            error: format!("`{line}` failed: {error}"),
        })?,
    }
    if command == Command::Exit {
        Ok(Flow::Exit)
    } else {
        Ok(Flow::Continue)
    }
}

fn parse_command(line: &str) -> Result<Command, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let millis = |word: &str| {
        word.parse::<u64>().map(Duration::from_millis).map_err(|_| {
            format!("invalid duration `{word}` in `{line}`: expected whole milliseconds")
        })
    };
    match words.as_slice() {
        ["spin", ms] => Ok(Command::Spin(millis(ms)?)),
        ["sleep", ms] => Ok(Command::Sleep(millis(ms)?)),
        ["mutex", ms] => Ok(Command::Mutex(millis(ms)?)),
        ["contend", ms, count] => {
            let spinners = count.parse::<usize>().map_err(|_| {
                format!("invalid spinner count `{count}` in `{line}`: expected a whole number")
            })?;
            Ok(Command::Contend { cpu_time: millis(ms)?, spinners })
        }
        ["compute", ms] => Ok(Command::Compute(millis(ms)?)),
        ["noop"] => Ok(Command::Noop),
        ["exit"] => Ok(Command::Exit),
        _ => Err(format!(
            "unknown command `{line}`: expected spin MS, sleep MS, mutex MS, contend MS N, compute MS, noop or exit"
        )),
    }
}

fn run_command(command: &Command, lock_holder: &LockHolder) -> io::Result<()> {
    match *command {
        Command::Spin(wall) => {
            black_box(spin_handler(wall));
        }
        Command::Sleep(duration) => thread::sleep(duration),
        Command::Mutex(hold) => lock_holder.wait_for_lock(hold)?,
        Command::Contend { cpu_time, spinners } => contend(cpu_time, spinners)?,
        Command::Compute(cpu_time) => burn_thread_cpu_time(cpu_time)?,
        Command::Noop | Command::Exit => {}
    }
    Ok(())
}

/// Busy-loops on the CPU for `wall` of wall time and returns a value derived from the work.
/// `Instant::now` reads the vDSO clock, so the loop makes no syscalls on clock sources
/// that the vDSO supports (TSC and kvm-clock among them).
#[inline(never)]
fn spin_handler(wall: Duration) -> u64 {
    let deadline = Instant::now() + wall;
    let mut accumulator = 0u64;
    while Instant::now() < deadline {
        accumulator = burn(accumulator, 1_000);
    }
    accumulator
}

/// Runs `rounds` dependent multiply-adds that the optimizer cannot remove.
#[inline(never)]
fn burn(mut accumulator: u64, rounds: u64) -> u64 {
    for round in 0..rounds {
        accumulator = black_box(
            accumulator
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(round),
        );
    }
    accumulator
}

/// Pins `spinners` busy threads and the loop thread to one CPU, then computes in the loop
/// thread until it has used `cpu_time` of its own CPU time.
///
/// The CPU is the lowest one in the loop thread's current affinity mask (CPU 0 unless a
/// cpuset or `taskset` excludes it). The loop thread's mask is restored afterwards.
fn contend(cpu_time: Duration, spinners: usize) -> io::Result<()> {
    let original_mask = current_affinity()?;
    let cpu = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET reads a bit of a valid cpu_set_t, and cpu < CPU_SETSIZE.
        .find(|&cpu| unsafe { libc::CPU_ISSET(cpu, &original_mask) })
        .ok_or_else(|| io::Error::other("the loop thread's affinity mask has no CPU"))?;

    let stop = Arc::new(AtomicBool::new(false));
    let pinned = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::with_capacity(spinners);
    let mut spawned = Ok(());
    for index in 0..spinners {
        let stop = Arc::clone(&stop);
        let pinned = Arc::clone(&pinned);
        let spawn = thread::Builder::new()
            .name(format!("spinner-{index}"))
            .spawn(move || {
                let result = pin_current_thread(cpu);
                pinned.fetch_add(1, Ordering::Release);
                result?;
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
                Ok::<(), io::Error>(())
            });
        match spawn {
            Ok(handle) => handles.push(handle),
            Err(error) => {
                spawned = Err(error);
                break;
            }
        }
    }

    let computed = spawned
        .and_then(|()| pin_current_thread(cpu))
        .and_then(|()| {
            while pinned.load(Ordering::Acquire) < spinners {
                std::hint::spin_loop();
            }
            thread::sleep(CONTEND_WARMUP);
            burn_thread_cpu_time(cpu_time)
        });

    stop.store(true, Ordering::Relaxed);
    let mut result = computed;
    for handle in handles {
        let joined = handle
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("a spinner thread panicked")));
        result = result.and(joined);
    }
    result.and(set_affinity(&original_mask))
}

/// Computes until the calling thread's CPU time (CLOCK_THREAD_CPUTIME_ID) has grown by `budget`.
fn burn_thread_cpu_time(budget: Duration) -> io::Result<()> {
    // Reading the thread CPU clock is a syscall, so check it only every 20,000 rounds
    // (tens of microseconds of work) to keep syscall time a small share of the total.
    let start = thread_cpu_time()?;
    let mut accumulator = 0u64;
    while thread_cpu_time()?.saturating_sub(start) < budget {
        accumulator = burn(accumulator, 20_000);
    }
    black_box(accumulator);
    Ok(())
}

fn thread_cpu_time() -> io::Result<Duration> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for clock_gettime to write.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Duration::new(now.tv_sec as u64, now.tv_nsec as u32))
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

fn current_affinity() -> io::Result<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is plain data, and all zeros is the empty set.
    let mut mask: libc::cpu_set_t = unsafe { mem::zeroed() };
    // SAFETY: `mask` is a valid cpu_set_t of the size passed, and pid 0 is the calling thread.
    if unsafe { libc::sched_getaffinity(0, mem::size_of::<libc::cpu_set_t>(), &mut mask) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(mask)
}

fn set_affinity(mask: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: `mask` is a valid cpu_set_t of the size passed, and pid 0 is the calling thread.
    if unsafe { libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), mask) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data, and all zeros is the empty set.
    let mut mask: libc::cpu_set_t = unsafe { mem::zeroed() };
    // SAFETY: the caller found `cpu` in an affinity mask, so it is below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut mask) };
    set_affinity(&mask)
}

/// Helper thread that holds a shared mutex on request, so that the loop thread blocks on it.
struct LockHolder {
    lock: Arc<Mutex<()>>,
    requests: mpsc::Sender<Duration>,
    holding: mpsc::Receiver<()>,
}

impl LockHolder {
    fn start() -> Self {
        let lock = Arc::new(Mutex::new(()));
        let (requests, request_receiver) = mpsc::channel::<Duration>();
        let (holding_sender, holding) = mpsc::channel();
        let shared = Arc::clone(&lock);
        thread::Builder::new()
            .name("lock-holder".into())
            .spawn(move || {
                for hold in request_receiver {
                    let guard = shared
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    if holding_sender.send(()).is_err() {
                        return;
                    }
                    thread::sleep(hold);
                    drop(guard);
                }
            })
            .expect("failed to start the lock-holder thread");
        Self {
            lock,
            requests,
            holding,
        }
    }

    /// Has the helper take the lock for `hold`, then blocks until the loop thread gets it.
    fn wait_for_lock(&self, hold: Duration) -> io::Result<()> {
        self.requests
            .send(hold)
            .map_err(|_| io::Error::other("the lock-holder thread has exited"))?;
        self.holding
            .recv()
            .map_err(|_| io::Error::other("the lock-holder thread has exited"))?;
        let _guard = self
            .lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok(())
    }
}
