//! Epoll event loop whose stalls happen in named functions, as a target for the stack,
//! culprit and flame-graph scenario tests.
//!
//! The main thread is the loop thread. It calls `epoll_wait` with a 10 ms timeout on an
//! epoll set that contains stdin. Each line on stdin is one command, run by the loop
//! thread between two `epoll_wait` calls:
//!
//! - `busy MS`: compute for MS ms of wall time in `busy_work_handler`.
//! - `nap MS`: `std::thread::sleep` for MS ms, called from `napping_handler`.
//! - `noop`: nothing.
//! - `exit`: leave the loop and exit. End of file on stdin does the same.
//!
//! Both handlers are `#[inline(never)]`, and the workspace builds with frame pointers, so
//! a stack walked with frame pointers names them. Stdout gets the same lines as
//! `loop-workload`: `{"pid":P,"loop_tid":T}` at start, then
//! `{"done":"CMD","start_ns":S,"end_ns":E}` after each command (CLOCK_MONOTONIC
//! nanoseconds), or `{"error":"..."}` for an invalid command.

use std::{
    hint::black_box,
    io,
    thread,
    time::{Duration, Instant},
};

use stalltrace_tests::{
    protocol::{Done, Failed, Started},
    stdin_loop::{print_line, read_stdin, Epoll, NonBlockingStdin},
};

/// Maximum bytes read from stdin in one loop iteration.
const READ_CHUNK_BYTES: usize = 4096;
/// Hash rounds of `busy_work_handler` between two clock reads. The clock is read in the
/// vDSO and in glibc, which have no frame pointers, so an on-CPU sample taken there
/// loses the caller. At an estimated 1 to 3 ns per round, 100,000 rounds take 0.1 to
/// 0.3 ms, so clock reads of tens of nanoseconds get well below 1% of the samples.
const ROUNDS_PER_CLOCK_READ: u64 = 100_000;
/// FNV-1a 64-bit offset basis and prime.
const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn main() -> io::Result<()> {
    let _stdin_mode = NonBlockingStdin::set()?;
    let epoll = Epoll::with_stdin()?;

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
            if run_line(&line)? == Flow::Exit {
                return Ok(());
            }
        }
        pending.drain(..consumed);

        if at_eof {
            // A last command without a newline still runs.
            let line = String::from_utf8_lossy(&pending).into_owned();
            run_line(&line)?;
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
    Busy(Duration),
    Nap(Duration),
    Noop,
    Exit,
}

/// Parses and runs one command line, then prints its `done` or `error` line.
fn run_line(line: &str) -> io::Result<Flow> {
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
    match command {
        Command::Busy(wall) => {
            black_box(busy_work_handler(wall));
        }
        Command::Nap(duration) => napping_handler(duration),
        Command::Noop | Command::Exit => {}
    }
    let end_ns = monotonic_ns();

    print_line(&Done {
        done: line.to_string(),
        start_ns,
        end_ns,
    })?;
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
        ["busy", ms] => Ok(Command::Busy(millis(ms)?)),
        ["nap", ms] => Ok(Command::Nap(millis(ms)?)),
        ["noop"] => Ok(Command::Noop),
        ["exit"] => Ok(Command::Exit),
        _ => Err(format!(
            "unknown command `{line}`: expected busy MS, nap MS, noop or exit"
        )),
    }
}

/// Hashes a counter with FNV-1a for `wall` of wall time and returns the hash.
///
/// The hash loop runs in this function's own frame, so on-CPU samples land here and
/// not in a callee.
#[inline(never)]
fn busy_work_handler(wall: Duration) -> u64 {
    let deadline = Instant::now() + wall;
    let mut hash = FNV_OFFSET_BASIS;
    let mut counter = 0u64;
    loop {
        for _ in 0..ROUNDS_PER_CLOCK_READ {
            hash = (hash ^ black_box(counter)).wrapping_mul(FNV_PRIME);
            counter = counter.wrapping_add(1);
        }
        if Instant::now() >= deadline {
            return hash;
        }
    }
}

/// Sleeps for `duration` in `clock_nanosleep`, through `std::thread::sleep`.
#[inline(never)]
fn napping_handler(duration: Duration) {
    thread::sleep(duration);
    // Work after the call keeps the compiler from turning it into a tail call, which
    // would drop this function's frame from the blocked stack.
    black_box(duration);
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
