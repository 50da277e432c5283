//! Event-loop threads that deadlock or contend on locks on command, as targets for the
//! lock scenarios of stalltrace (`tests/tests/locks.rs`).
//!
//! `lock-workload MODE [ARGS]` starts the threads of one mode. Each named loop thread
//! waits in `epoll_wait` with a 10 ms timeout on its own eventfd, and runs the commands
//! that the main thread forwards to it inside one loop iteration. The main thread reads
//! one command a line from stdin and exits the whole process at end of file, deadlocked
//! threads included.
//!
//! Modes and their commands:
//!
//! - `pthread-cycle N`: N loop threads `lock-a`, `lock-b`, ... and N default-type
//!   `pthread_mutex_t`s. `deadlock`: thread i takes mutex i, waits until all N threads
//!   hold their first mutex, sleeps 100 ms and takes mutex (i + 1) mod N, so the
//!   threads block in a cycle.
//! - `std-cycle`: the same with two `std::sync::Mutex`es and threads `lock-a`, `lock-b`.
//!   `hammer MS`: for MS ms both threads lock and unlock both mutexes in the same order,
//!   holding each for 20 us, in 2 ms loop iterations. Each thread then prints `hammered`
//!   with the number of lock attempts that found the mutex taken. `deadlock` as above.
//! - `shm-cycle PATH a|b`: one loop thread `shm-a` or `shm-b` in each of two processes,
//!   which share two process-shared `pthread_mutex_t`s in the file PATH (see
//!   `stalltrace_tests::locks` for the layout). Role `a` initializes them, so start it
//!   first. `deadlock`: `a` takes mutex 0 then 1, `b` takes mutex 1 then 0.
//! - `holder-idle`: loop threads `lock-worker` and `lock-waiter` and one `pthread_mutex_t`.
//!   `hold`: the worker takes the mutex and goes back to `epoll_wait` holding it. `take`:
//!   the waiter takes the mutex, so it blocks until the worker lets go, which it never does.
//! - `tokio-guard`: a tokio current-thread runtime on thread `tokio-loop`, with a task that
//!   wakes it every 10 ms. `guard`: one task holds a `std::sync::Mutex` guard across a
//!   sleep while a second task on the same thread locks it, so the thread blocks on itself.
//! - `tokio-guard-idle`: the same without the 10 ms task, so the idle runtime waits in a
//!   single `epoll_wait` with no timeout until `guard` comes.
//! - `tokio-busy`: a tokio multi-thread runtime with two workers, `tokio-worker-0` and
//!   `tokio-worker-1`, idle until `busy MS`, which spawns batches of 1,000 small tasks
//!   that yield and use `tokio::sync` primitives for MS ms, then prints `busy-done` with
//!   the number of tasks.
//!
//! Stdout gets one JSON line at start, `{"pid":P,"threads":{"NAME":TID,...}}`, and one line
//! per step, `{"thread":"NAME","event":"holding","ns":N}` with CLOCK_MONOTONIC nanoseconds
//! (the events are `holding`, `waiting`, `acquired`, `hammered` and `busy-done`). An invalid or
//! failed command prints `{"error":"..."}`.

use std::{
    cell::{Cell, UnsafeCell},
    collections::BTreeMap,
    fs,
    hint::black_box,
    io::{self, BufRead, Write},
    mem,
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc, Arc, Mutex, MutexGuard, PoisonError, TryLockError,
    },
    thread,
    time::{Duration, Instant},
};

use stalltrace_tests::locks::{
    LockEvent, LockFailed, LockStart, SHM_ARRIVED_OFFSET, SHM_FILE_SIZE, SHM_MUTEX_OFFSETS,
};

/// Timeout of each `epoll_wait`, so an idle loop thread still turns about 100 times a second.
const EPOLL_TIMEOUT_MS: i32 = 10;
/// Sleep between a thread's two locks in `deadlock`, after every thread holds its first one.
const SECOND_LOCK_DELAY: Duration = Duration::from_millis(100);
/// Poll interval while a `deadlock` thread waits for the others to take their first lock.
const ARRIVAL_POLL: Duration = Duration::from_millis(1);
/// Wall time of one `hammer` loop iteration.
const HAMMER_SLICE: Duration = Duration::from_millis(2);
/// Time each `hammer` round holds a mutex. It is much longer than the spinning that
/// `std::sync::Mutex` does before it blocks, so a thread that finds the mutex taken
/// usually waits in the futex syscall.
const HAMMER_HOLD: Duration = Duration::from_micros(20);
/// Time that the first `guard` task holds its guard across `.await`.
const GUARD_HOLD: Duration = Duration::from_millis(200);
/// Tasks spawned at once by `busy`, awaited before the next batch.
const BUSY_BATCH: u64 = 1_000;
/// Permits of the semaphore that the `busy` tasks share.
const BUSY_PERMITS: usize = 16;
/// Worker threads of the `tokio-busy` runtime.
const BUSY_WORKERS: usize = 2;
/// Maximum wait for the tokio workers to start.
const WORKER_START_TIMEOUT: Duration = Duration::from_secs(5);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match words.as_slice() {
        ["pthread-cycle", count] => match count.parse::<usize>() {
            Ok(count) if (2..=26).contains(&count) => pthread_cycle(count),
            _ => Err(format!(
                "invalid thread count `{count}`: expected a whole number from 2 to 26"
            )),
        },
        ["std-cycle"] => std_cycle(),
        ["shm-cycle", path, role] => shm_cycle(path, role),
        ["holder-idle"] => holder_idle(),
        ["tokio-guard"] => tokio_guard(true),
        ["tokio-guard-idle"] => tokio_guard(false),
        ["tokio-busy"] => tokio_busy(),
        _ => Err(format!(
            "invalid arguments {args:?}: expected pthread-cycle N, std-cycle, shm-cycle PATH a|b, holder-idle, tokio-guard, tokio-guard-idle or tokio-busy"
        )),
    };
    if let Err(error) = result {
        print_line(&LockFailed { error });
        std::process::exit(2);
    }
}

/// Command that the main thread forwards to a loop thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Deadlock,
    Hammer { until: Instant },
    Hold,
    Take,
}

fn pthread_cycle(count: usize) -> Result<(), String> {
    let mutexes: Vec<RawMutex> = (0..count).map(|_| RawMutex::new_private()).collect();
    let arrived: &'static AtomicU32 = Box::leak(Box::new(AtomicU32::new(0)));
    let mut threads = Vec::with_capacity(count);
    for index in 0..count {
        let name = format!("lock-{}", (b'a' + index as u8) as char);
        let first = mutexes[index];
        let second = mutexes[(index + 1) % count];
        let thread_name = name.clone();
        let thread = LoopThread::spawn(&name, move |command, _| {
            if command == Command::Deadlock {
                report_error(run_deadlock(
                    &thread_name,
                    &first,
                    &second,
                    arrived,
                    count as u32,
                ));
            }
        })?;
        threads.push((name, thread));
    }
    print_start(&threads);
    serve_commands(|command| match command {
        "deadlock" => post_all(&threads, Command::Deadlock),
        _ => Err(format!("unknown command `{command}`: expected deadlock")),
    })
}

fn std_cycle() -> Result<(), String> {
    let locks: &'static [Mutex<()>; 2] = Box::leak(Box::new([Mutex::new(()), Mutex::new(())]));
    let arrived: &'static AtomicU32 = Box::leak(Box::new(AtomicU32::new(0)));
    let mut threads = Vec::with_capacity(2);
    for (index, name) in ["lock-a", "lock-b"].into_iter().enumerate() {
        let first = &locks[index];
        let second = &locks[1 - index];
        let mut contended = 0u64;
        let thread = LoopThread::spawn(name, move |command, mailbox| match command {
            Command::Hammer { until } => {
                let slice_end = Instant::now() + HAMMER_SLICE;
                while Instant::now() < slice_end {
                    // Both threads take the mutexes in the same order here, so they cannot deadlock.
                    for lock in locks {
                        hammer_once(lock, &mut contended);
                    }
                }
                if Instant::now() < until {
                    report_error(mailbox.post(command));
                } else {
                    emit(name, "hammered", Some(contended));
                    contended = 0;
                }
            }
            Command::Deadlock => report_error(run_deadlock(name, first, second, arrived, 2)),
            Command::Hold | Command::Take => {}
        })?;
        threads.push((name.to_owned(), thread));
    }
    print_start(&threads);
    serve_commands(|command| {
        let words: Vec<&str> = command.split_whitespace().collect();
        match words.as_slice() {
            ["hammer", ms] => {
                let millis = ms
                    .parse::<u64>()
                    .map_err(|_| format!("invalid duration `{ms}`: expected whole milliseconds"))?;
                let until = Instant::now() + Duration::from_millis(millis);
                post_all(&threads, Command::Hammer { until })
            }
            ["deadlock"] => post_all(&threads, Command::Deadlock),
            _ => Err(format!(
                "unknown command `{command}`: expected hammer MS or deadlock"
            )),
        }
    })
}

fn shm_cycle(path: &str, role: &str) -> Result<(), String> {
    let (name, first, second, initialize) = match role {
        "a" => ("shm-a", 0, 1, true),
        "b" => ("shm-b", 1, 0, false),
        _ => return Err(format!("invalid role `{role}`: expected a or b")),
    };
    let base = map_shared_file(path)?;
    // SAFETY: the mapping is SHM_FILE_SIZE bytes long and never unmapped, and each offset
    // leaves room for a pthread_mutex_t (40 bytes) or an AtomicU32, suitably aligned.
    let (mutexes, arrived) = unsafe {
        let mutexes = SHM_MUTEX_OFFSETS
            .map(|offset| RawMutex::at(base.add(offset as usize).cast::<libc::pthread_mutex_t>()));
        let arrived = &*base.add(SHM_ARRIVED_OFFSET as usize).cast::<AtomicU32>();
        (mutexes, arrived)
    };
    if initialize {
        for mutex in &mutexes {
            mutex.init_process_shared()?;
        }
        arrived.store(0, Ordering::SeqCst);
    }

    let (first, second) = (mutexes[first], mutexes[second]);
    let thread = LoopThread::spawn(name, move |command, _| {
        if command == Command::Deadlock {
            report_error(run_deadlock(name, &first, &second, arrived, 2));
        }
    })?;
    let threads = vec![(name.to_owned(), thread)];
    print_start(&threads);
    serve_commands(|command| match command {
        "deadlock" => post_all(&threads, Command::Deadlock),
        _ => Err(format!("unknown command `{command}`: expected deadlock")),
    })
}

fn holder_idle() -> Result<(), String> {
    let mutex = RawMutex::new_private();
    let worker = LoopThread::spawn("lock-worker", move |command, _| {
        if command == Command::Hold {
            // The worker never unlocks the mutex, so it stays locked after this iteration.
            report_error(mutex.lock());
            emit("lock-worker", "holding", None);
        }
    })?;
    let waiter = LoopThread::spawn("lock-waiter", move |command, _| {
        if command == Command::Take {
            emit("lock-waiter", "waiting", None);
            report_error(take_held_lock(&mutex));
            emit("lock-waiter", "acquired", None);
        }
    })?;
    let threads = vec![
        ("lock-worker".to_owned(), worker),
        ("lock-waiter".to_owned(), waiter),
    ];
    print_start(&threads);
    serve_commands(|command| match command {
        "hold" => threads[0].1.mailbox.post(Command::Hold),
        "take" => threads[1].1.mailbox.post(Command::Take),
        _ => Err(format!(
            "unknown command `{command}`: expected hold or take"
        )),
    })
}

/// Runs the `tokio-guard` mode. With `tick`, a task wakes the runtime every
/// EPOLL_TIMEOUT_MS, so the thread re-enters `epoll_wait` often, as the other loop
/// threads do. Without it the idle runtime blocks in one `epoll_wait` until a command comes.
fn tokio_guard(tick: bool) -> Result<(), String> {
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (tid_sender, tid_receiver) = mpsc::channel();
    thread::Builder::new()
        .name("tokio-loop".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let runtime = match runtime {
                Ok(runtime) => runtime,
                Err(error) => {
                    let _ = tid_sender.send(Err(format!("failed to build the runtime: {error}")));
                    return;
                }
            };
            let _ = tid_sender.send(Ok(gettid()));
            runtime.block_on(async move {
                if tick {
                    tokio::spawn(async {
                        let mut interval =
                            tokio::time::interval(Duration::from_millis(EPOLL_TIMEOUT_MS as u64));
                        loop {
                            interval.tick().await;
                        }
                    });
                }
                while receiver.recv().await.is_some() {
                    guard_across_await().await;
                }
            });
        })
        .map_err(|error| format!("failed to start thread tokio-loop: {error}"))?;
    let tid = tid_receiver
        .recv()
        .map_err(|_| "thread tokio-loop exited before it started".to_owned())??;

    print_line(&LockStart {
        pid: std::process::id(),
        threads: BTreeMap::from([("tokio-loop".to_owned(), tid)]),
    });
    serve_commands(|command| match command {
        "guard" => sender
            .send(())
            .map_err(|_| "thread tokio-loop has exited".to_owned()),
        _ => Err(format!("unknown command `{command}`: expected guard")),
    })
}

/// Runs two tasks on the current thread: the first holds a `std::sync::Mutex` guard
/// across a sleep, and the second locks the same mutex meanwhile, which blocks the
/// thread, so the sleep never ends.
#[allow(
    clippy::await_holding_lock,
    reason = "the deadlock that this mode exists to cause"
)]
async fn guard_across_await() {
    let lock = Mutex::new(());
    let first_holds_lock = Cell::new(false);
    let first = async {
        let guard = lock_site_first_task(&lock);
        first_holds_lock.set(true);
        emit("tokio-loop", "holding", None);
        tokio::time::sleep(GUARD_HOLD).await;
        drop(guard);
    };
    let second = async {
        while !first_holds_lock.get() {
            tokio::task::yield_now().await;
        }
        emit("tokio-loop", "waiting", None);
        let guard = lock_site_second_task(&lock);
        emit("tokio-loop", "acquired", None);
        drop(guard);
    };
    tokio::join!(first, second);
}

// The lock sites below pass a distinct constant through `black_box`, so the linker
// cannot fold functions of identical code into one address, which would give the
// stack frames of one the name of another.

#[inline(never)]
fn lock_site_first_task(lock: &Mutex<()>) -> MutexGuard<'_, ()> {
    black_box(1u32);
    lock.lock().unwrap_or_else(PoisonError::into_inner)
}

#[inline(never)]
fn lock_site_second_task(lock: &Mutex<()>) -> MutexGuard<'_, ()> {
    black_box(2u32);
    lock.lock().unwrap_or_else(PoisonError::into_inner)
}

fn tokio_busy() -> Result<(), String> {
    let workers: Arc<Mutex<BTreeMap<String, u32>>> = Arc::default();
    let started = Arc::clone(&workers);
    let next_index = AtomicU32::new(0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(BUSY_WORKERS)
        .thread_name_fn(move || {
            format!(
                "tokio-worker-{}",
                next_index.fetch_add(1, Ordering::Relaxed)
            )
        })
        .on_thread_start(move || {
            let name = thread::current().name().unwrap_or("unnamed").to_owned();
            started
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(name, gettid());
        })
        .enable_all()
        .build()
        .map_err(|error| format!("failed to build the runtime: {error}"))?;

    let deadline = Instant::now() + WORKER_START_TIMEOUT;
    let threads = loop {
        let threads = workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if threads.len() >= BUSY_WORKERS {
            break threads;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "only {} of {BUSY_WORKERS} tokio workers started within {WORKER_START_TIMEOUT:?}",
                threads.len()
            ));
        }
        thread::sleep(Duration::from_millis(5));
    };
    print_line(&LockStart {
        pid: std::process::id(),
        threads,
    });

    serve_commands(|command| {
        let words: Vec<&str> = command.split_whitespace().collect();
        match words.as_slice() {
            ["busy", ms] => {
                let millis = ms
                    .parse::<u64>()
                    .map_err(|_| format!("invalid duration `{ms}`: expected whole milliseconds"))?;
                let tasks = runtime.block_on(busy(Duration::from_millis(millis)))?;
                emit("main", "busy-done", Some(tasks));
                Ok(())
            }
            _ => Err(format!("unknown command `{command}`: expected busy MS")),
        }
    })
}

/// Spawns batches of small tasks until `duration` has passed and returns how many ran.
async fn busy(duration: Duration) -> Result<u64, String> {
    let deadline = tokio::time::Instant::now() + duration;
    let total = Arc::new(tokio::sync::Mutex::new(0u64));
    let permits = Arc::new(tokio::sync::Semaphore::new(BUSY_PERMITS));
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<u64>(256);
    let consumer = tokio::spawn(async move {
        let mut received = 0u64;
        while let Some(count) = receiver.recv().await {
            received += count;
        }
        received
    });

    let mut spawned = 0u64;
    while tokio::time::Instant::now() < deadline {
        let mut batch = tokio::task::JoinSet::new();
        for index in 0..BUSY_BATCH {
            batch.spawn(small_task(
                index,
                Arc::clone(&total),
                Arc::clone(&permits),
                sender.clone(),
            ));
        }
        while let Some(joined) = batch.join_next().await {
            joined
                .map_err(|error| format!("a busy task failed: {error}"))?
                .map_err(|error| format!("a busy task failed: {error}"))?;
        }
        spawned += BUSY_BATCH;
    }
    drop(sender);

    let received = consumer
        .await
        .map_err(|error| format!("the busy consumer task failed: {error}"))?;
    let counted = *total.lock().await;
    if received != spawned || counted != spawned {
        return Err(format!(
            "busy spawned {spawned} tasks, but the channel carried {received} and the counter reached {counted}"
        ));
    }
    Ok(spawned)
}

/// Runs one small task of `busy`: a yield, a semaphore permit, a `tokio::sync::Mutex`,
/// a bounded channel send, and for one task in 100 a 1 ms timer.
async fn small_task(
    index: u64,
    total: Arc<tokio::sync::Mutex<u64>>,
    permits: Arc<tokio::sync::Semaphore>,
    sender: tokio::sync::mpsc::Sender<u64>,
) -> Result<(), String> {
    tokio::task::yield_now().await;
    let _permit = permits
        .acquire()
        .await
        .map_err(|_| "the semaphore was closed".to_owned())?;
    *total.lock().await += 1;
    sender
        .send(1)
        .await
        .map_err(|_| "the consumer task has exited".to_owned())?;
    if index.is_multiple_of(100) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// Takes `first`, waits until `parties` threads hold their first lock, sleeps
/// SECOND_LOCK_DELAY and takes `second`. When the threads' locks form a cycle, the
/// second lock never returns.
fn run_deadlock(
    thread: &str,
    first: &dyn KeptLock,
    second: &dyn KeptLock,
    arrived: &AtomicU32,
    parties: u32,
) -> Result<(), String> {
    take_first_lock(first)?;
    emit(thread, "holding", None);
    arrived.fetch_add(1, Ordering::SeqCst);
    while arrived.load(Ordering::SeqCst) < parties {
        thread::sleep(ARRIVAL_POLL);
    }
    thread::sleep(SECOND_LOCK_DELAY);
    emit(thread, "waiting", None);
    take_second_lock(second)?;
    emit(thread, "acquired", None);
    Ok(())
}

#[inline(never)]
fn take_first_lock(lock: &dyn KeptLock) -> Result<(), String> {
    black_box(3u32);
    lock.lock_and_keep()
}

#[inline(never)]
fn take_second_lock(lock: &dyn KeptLock) -> Result<(), String> {
    black_box(4u32);
    lock.lock_and_keep()
}

#[inline(never)]
fn take_held_lock(lock: &RawMutex) -> Result<(), String> {
    black_box(5u32);
    lock.lock()
}

/// Locks `lock` for HAMMER_HOLD, counting in `contended` an attempt that found it taken.
fn hammer_once(lock: &Mutex<()>, contended: &mut u64) {
    let guard = match lock.try_lock() {
        Ok(guard) => guard,
        Err(TryLockError::WouldBlock) => {
            *contended += 1;
            lock.lock().unwrap_or_else(PoisonError::into_inner)
        }
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
    };
    let until = Instant::now() + HAMMER_HOLD;
    while Instant::now() < until {
        std::hint::spin_loop();
    }
    drop(guard);
}

/// A lock that `run_deadlock` takes and never releases.
trait KeptLock {
    fn lock_and_keep(&self) -> Result<(), String>;
}

impl KeptLock for RawMutex {
    fn lock_and_keep(&self) -> Result<(), String> {
        self.lock()
    }
}

impl KeptLock for Mutex<()> {
    fn lock_and_keep(&self) -> Result<(), String> {
        // Forgetting the guard leaves the mutex locked for good.
        mem::forget(self.lock().unwrap_or_else(PoisonError::into_inner));
        Ok(())
    }
}

/// A glibc `pthread_mutex_t` that lives for the rest of the process, in leaked heap
/// memory or in a shared mapping that is never unmapped.
#[derive(Clone, Copy)]
struct RawMutex {
    mutex: *mut libc::pthread_mutex_t,
}

// SAFETY: pthread mutexes are made to be locked from any thread, and the memory behind
// `mutex` is never freed.
unsafe impl Send for RawMutex {}
// SAFETY: as for Send.
unsafe impl Sync for RawMutex {}

impl RawMutex {
    /// Allocates a default-type mutex, initialized with PTHREAD_MUTEX_INITIALIZER.
    fn new_private() -> Self {
        let cell = Box::leak(Box::new(UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER)));
        Self { mutex: cell.get() }
    }

    /// Wraps the mutex at `mutex`.
    ///
    /// # Safety
    ///
    /// `mutex` must be valid and suitably aligned for a `pthread_mutex_t` for the rest of
    /// the process, and initialized before `lock` is called.
    unsafe fn at(mutex: *mut libc::pthread_mutex_t) -> Self {
        Self { mutex }
    }

    /// Initializes the mutex as a default-type, process-shared mutex.
    fn init_process_shared(&self) -> Result<(), String> {
        // SAFETY: pthread_mutexattr_t is plain data that pthread_mutexattr_init fills in.
        let mut attributes: libc::pthread_mutexattr_t = unsafe { mem::zeroed() };
        // SAFETY: `attributes` is valid for writes, and `self.mutex` is valid per `at`.
        let error = unsafe {
            let mut error = libc::pthread_mutexattr_init(&mut attributes);
            if error == 0 {
                error = libc::pthread_mutexattr_setpshared(
                    &mut attributes,
                    libc::PTHREAD_PROCESS_SHARED,
                );
            }
            if error == 0 {
                error = libc::pthread_mutex_init(self.mutex, &attributes);
            }
            libc::pthread_mutexattr_destroy(&mut attributes);
            error
        };
        check_pthread(error, "initialize a process-shared mutex")
    }

    fn lock(&self) -> Result<(), String> {
        // SAFETY: `self.mutex` is a valid, initialized mutex per `new_private` or `at`.
        check_pthread(
            unsafe { libc::pthread_mutex_lock(self.mutex) },
            "lock a mutex",
        )
    }
}

fn check_pthread(error: libc::c_int, action: &str) -> Result<(), String> {
    if error == 0 {
        Ok(())
    } else {
        Err(format!(
            "failed to {action}: {}",
            io::Error::from_raw_os_error(error)
        ))
    }
}

/// Maps the first SHM_FILE_SIZE bytes of the file at `path` shared and read-write, and
/// returns the start of the mapping. The mapping stays until the process exits.
fn map_shared_file(path: &str) -> Result<*mut u8, String> {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|error| format!("failed to open {path}: {error}"))?;
    let length = file
        .metadata()
        .map_err(|error| format!("failed to stat {path}: {error}"))?
        .len();
    if length < SHM_FILE_SIZE {
        return Err(format!(
            "{path} has {length} bytes, fewer than the {SHM_FILE_SIZE} that shm-cycle needs"
        ));
    }
    // SAFETY: a new mapping of an open file, which aliases no Rust object.
    let address = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SHM_FILE_SIZE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if address == libc::MAP_FAILED {
        return Err(format!(
            "failed to map {path}: {}",
            io::Error::last_os_error()
        ));
    }
    Ok(address.cast())
}

/// Named thread that runs an epoll loop and the commands posted to its mailbox.
struct LoopThread {
    tid: u32,
    mailbox: Mailbox,
}

/// Queue of commands for one loop thread, with the eventfd that wakes its `epoll_wait`.
#[derive(Clone)]
struct Mailbox {
    commands: mpsc::Sender<Command>,
    wake: Arc<EventFd>,
}

impl Mailbox {
    fn post(&self, command: Command) -> Result<(), String> {
        self.commands
            .send(command)
            .map_err(|_| "the loop thread has exited".to_owned())?;
        self.wake.notify()
    }
}

impl LoopThread {
    /// Starts thread `name`, which waits in `epoll_wait` on its eventfd and calls `handler`
    /// with each posted command, inside one loop iteration. The handler may post
    /// follow-up commands to the mailbox that it is given, which run in a later iteration.
    fn spawn(
        name: &str,
        mut handler: impl FnMut(Command, &Mailbox) + Send + 'static,
    ) -> Result<Self, String> {
        let wake = Arc::new(EventFd::new()?);
        let (commands, queue) = mpsc::channel();
        let mailbox = Mailbox { commands, wake };
        let own_mailbox = mailbox.clone();
        let (tid_sender, tid_receiver) = mpsc::channel();
        let thread_name = name.to_owned();
        thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let epoll = match Epoll::watching(own_mailbox.wake.fd) {
                    Ok(epoll) => epoll,
                    Err(error) => {
                        let _ = tid_sender.send(Err(error));
                        return;
                    }
                };
                let _ = tid_sender.send(Ok(gettid()));
                loop {
                    match epoll.wait(EPOLL_TIMEOUT_MS) {
                        Ok(false) => continue,
                        Ok(true) => {}
                        Err(error) => {
                            print_line(&LockFailed {
                                error: format!(
                                    "epoll_wait failed in thread {thread_name}: {error}"
                                ),
                            });
                            return;
                        }
                    }
                    own_mailbox.wake.drain();
                    // Commands that the handler posts now run in the next iteration, so a
                    // command that posts itself again leaves the thread in epoll_wait between runs.
                    let commands: Vec<Command> = queue.try_iter().collect();
                    for command in commands {
                        handler(command, &own_mailbox);
                    }
                }
            })
            .map_err(|error| format!("failed to start thread {name}: {error}"))?;
        let tid = tid_receiver
            .recv()
            .map_err(|_| format!("thread {name} exited before it started"))??;
        Ok(Self { tid, mailbox })
    }
}

fn post_all(threads: &[(String, LoopThread)], command: Command) -> Result<(), String> {
    for (_, thread) in threads {
        thread.mailbox.post(command)?;
    }
    Ok(())
}

fn print_start(threads: &[(String, LoopThread)]) {
    print_line(&LockStart {
        pid: std::process::id(),
        threads: threads
            .iter()
            .map(|(name, thread)| (name.clone(), thread.tid))
            .collect(),
    });
}

/// Runs `run` on each non-empty stdin line and prints an error line for a failed one.
/// Exits the process at end of file, because deadlocked threads can never be joined.
fn serve_commands(mut run: impl FnMut(&str) -> Result<(), String>) -> ! {
    for line in io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let command = line.trim();
        if command.is_empty() {
            continue;
        }
        if let Err(error) = run(command) {
            print_line(&LockFailed {
                error: format!("`{command}` failed: {error}"),
            });
        }
    }
    std::process::exit(0)
}

/// Non-blocking eventfd that wakes a loop thread.
struct EventFd {
    fd: libc::c_int,
}

impl EventFd {
    fn new() -> Result<Self, String> {
        // SAFETY: eventfd has no memory preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(format!(
                "failed to create an eventfd: {}",
                io::Error::last_os_error()
            ));
        }
        Ok(Self { fd })
    }

    fn notify(&self) -> Result<(), String> {
        let increment: u64 = 1;
        // SAFETY: `increment` is valid for reads of 8 bytes, the size an eventfd write takes.
        let written = unsafe { libc::write(self.fd, (&increment as *const u64).cast(), 8) };
        if written != 8 {
            return Err(format!(
                "failed to write the eventfd: {}",
                io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    /// Resets the counter. A read that finds it zero fails with EAGAIN, which is ignored.
    fn drain(&self) {
        let mut count: u64 = 0;
        // SAFETY: `count` is valid for writes of 8 bytes.
        unsafe { libc::read(self.fd, (&mut count as *mut u64).cast(), 8) };
    }
}

impl Drop for EventFd {
    fn drop(&mut self) {
        // SAFETY: `fd` is an eventfd that this value owns.
        unsafe { libc::close(self.fd) };
    }
}

/// Epoll instance with one member fd, owned by the thread that waits on it.
struct Epoll {
    fd: libc::c_int,
}

impl Epoll {
    fn watching(member: libc::c_int) -> Result<Self, String> {
        // SAFETY: epoll_create1 has no memory preconditions.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(format!(
                "failed to create an epoll instance: {}",
                io::Error::last_os_error()
            ));
        }
        let epoll = Self { fd };
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: member as u64,
        };
        // SAFETY: both fds are open, and `event` is a valid epoll_event.
        if unsafe { libc::epoll_ctl(fd, libc::EPOLL_CTL_ADD, member, &mut event) } != 0 {
            return Err(format!(
                "failed to add fd {member} to epoll: {}",
                io::Error::last_os_error()
            ));
        }
        Ok(epoll)
    }

    /// Waits up to `timeout_ms` and returns whether the member fd is readable.
    fn wait(&self, timeout_ms: i32) -> io::Result<bool> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 1];
        // SAFETY: `events` is valid for writes of the number of entries passed.
        let ready = unsafe { libc::epoll_wait(self.fd, events.as_mut_ptr(), 1, timeout_ms) };
        if ready < 0 {
            let error = io::Error::last_os_error();
            return if error.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(error)
            };
        }
        Ok(ready > 0)
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: `fd` is an epoll fd that this value owns.
        unsafe { libc::close(self.fd) };
    }
}

fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() as u32 }
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

/// Prints the event line of step `event` of thread `thread`, stamped now.
fn emit(thread: &str, event: &str, count: Option<u64>) {
    print_line(&LockEvent {
        thread: thread.to_owned(),
        event: event.to_owned(),
        ns: monotonic_ns(),
        count,
    });
}

/// Prints `result`'s error as an error line.
fn report_error(result: Result<(), String>) {
    if let Err(error) = result {
        print_line(&LockFailed { error });
    }
}

/// Writes one JSON line to stdout and flushes it, so the reader gets it at once. A
/// closed stdout ends the process, because the test that sent its commands has gone.
fn print_line<T: serde::Serialize>(message: &T) {
    let mut line = serde_json::to_string(message).expect("protocol lines serialize to JSON");
    line.push('\n');
    let mut stdout = io::stdout().lock();
    if stdout
        .write_all(line.as_bytes())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        std::process::exit(3);
    }
}
