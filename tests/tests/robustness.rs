//! Robustness of `stalltrace record` on the real kernel. Floods of short-lived loop
//! threads and of futex calls must leave no state behind in the BPF maps. A full thread
//! map and a full ring buffer must be counted in the report. SIGINT or SIGTERM in the
//! middle of a flood must detach every BPF program and still write `report.json`.
//!
//! The tests read stalltrace's maps by ID while it runs. The IDs come from
//! `/proc/PID/fdinfo` of the stalltrace process, so other tracers on the machine do not
//! get in the way. They need root and `STALLTRACE_BIN`, so run them with `cargo xtask
//! test`, one at a time.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File},
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData, MapInfo, PerCpuArray};
use serde_json::Value;
use stalltrace_tests::{require_root, stalltrace_bin, Report, TestDir};
use tracer_common::{counter, FutexWait, LoopThread};

const THREAD_CHURN: &str = env!("CARGO_BIN_EXE_thread-churn");
const FUTEX_FLOOD: &str = env!("CARGO_BIN_EXE_futex-flood");

/// Maximum wait for `stalltrace record` to print `attached`.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// Maximum wait for stalltrace to detach and write its report after a signal.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Maximum wait for a workload line.
const LINE_TIMEOUT: Duration = Duration::from_secs(60);
/// Time for the kernel to run the exit of the last threads before the maps are read.
const SETTLE: Duration = Duration::from_millis(300);
/// Size of the `THREADS` map, as docs/report.md states for `untracked_threads`.
const THREAD_MAP_ENTRIES: u32 = 16384;
/// Program names that the kernel keeps: BPF object names are cut to 15 bytes.
const BPF_NAME_LEN: usize = 15;
/// Every BPF program stalltrace loads on this machine. `sys_enter` and `sys_exit` are
/// left out: they load only where syscall numbers cannot be read from saved registers.
const PROGRAM_NAMES: &[&str] = &[
    "loop_wait_enter",
    "loop_wait_exit",
    "sched_switch",
    "sched_wakeup",
    "sched_wakeup_new",
    "sched_process_exit",
    "futex_enter",
    "futex_wait_enter",
    "futex_waitv_enter",
    "futex_wake_enter",
    "futex_exit",
    "on_cpu_sample",
];

// ---------------------------------------------------------------------------------------
// stalltrace record

/// Running `stalltrace record` with stdout and stderr in files. Drop stops it.
struct Tracer {
    child: Child,
    out_dir: PathBuf,
    stderr_path: PathBuf,
}

impl Tracer {
    /// Starts `stalltrace record -o DIR/record ARGS` and waits until it has attached.
    fn record(dir: &TestDir, args: &[&str]) -> Self {
        let out_dir = dir.join("record");
        let stdout_path = dir.join("stalltrace.stdout");
        let stderr_path = dir.join("stalltrace.stderr");
        let stdout = File::create(&stdout_path).expect("failed to create the stdout file");
        let stderr = File::create(&stderr_path).expect("failed to create the stderr file");

        let binary = stalltrace_bin();
        eprintln!("running {} record -o {} {}", binary.display(), out_dir.display(), args.join(" "));
        let child = Command::new(&binary)
            .arg("record")
            .arg("-o")
            .arg(&out_dir)
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|error| panic!("failed to start {}: {error}", binary.display()));
        let mut tracer = Self {
            child,
            out_dir,
            stderr_path,
        };

        let deadline = Instant::now() + ATTACH_TIMEOUT;
        while !tracer.stderr().contains("attached") {
            if let Ok(Some(status)) = tracer.child.try_wait() {
                panic!("stalltrace exited with {status} before attaching; stderr:\n{}", tracer.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "stalltrace printed no `attached` line within {ATTACH_TIMEOUT:?}; stderr:\n{}",
                tracer.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
        tracer
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill has no memory preconditions. The pid is our own child, which stays
        // a zombie until reaped, so it cannot name another process.
        unsafe { libc::kill(self.pid() as libc::pid_t, signal) };
    }

    /// Sends `signal` and waits for the exit, failing after EXIT_TIMEOUT.
    fn stop_with(&mut self, signal: libc::c_int) -> ExitStatus {
        self.signal(signal);
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("failed to poll stalltrace") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "stalltrace did not exit within {EXIT_TIMEOUT:?} of signal {signal}; stderr:\n{}",
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops stalltrace with SIGINT, checks that it succeeded and returns its report.
    fn finish(mut self) -> Report {
        let status = self.stop_with(libc::SIGINT);
        assert!(status.success(), "stalltrace exited with {status}; stderr:\n{}", self.stderr());
        Report::load(&self.out_dir.join("report.json"))
    }

    /// Returns the IDs of the BPF objects of `kind` (`bpf-map`, `bpf-prog`) that stalltrace holds.
    fn object_ids(&self, kind: &str, id_field: &str) -> BTreeSet<u32> {
        let pid = self.pid();
        let mut ids = BTreeSet::new();
        for entry in fs::read_dir(format!("/proc/{pid}/fd")).expect("failed to list stalltrace's fds") {
            let entry = entry.expect("failed to read an fd entry");
            let Ok(target) = fs::read_link(entry.path()) else { continue };
            if target.to_string_lossy() != format!("anon_inode:{kind}") {
                continue;
            }
            let fdinfo = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
            let Ok(info) = fs::read_to_string(&fdinfo) else { continue };
            if let Some(id) = info
                .lines()
                .find_map(|line| line.strip_prefix(id_field))
                .and_then(|value| value.trim().parse().ok())
            {
                ids.insert(id);
            }
        }
        ids
    }

    /// Returns stalltrace's maps by name.
    fn maps(&self) -> BTreeMap<String, u32> {
        self.object_ids("bpf-map", "map_id:")
            .into_iter()
            .filter_map(|id| {
                let info = MapInfo::from_id(id).ok()?;
                Some((info.name_as_str()?.to_owned(), id))
            })
            .collect()
    }

    /// Returns the ID of a map by its name in the BPF object, which the kernel cuts to 15 bytes.
    fn map_id(&self, name: &str) -> u32 {
        let maps = self.maps();
        *maps
            .get(&kernel_name(name))
            .unwrap_or_else(|| panic!("stalltrace holds no map named {name}; its maps: {maps:?}"))
    }

    /// Returns stalltrace's programs: ID and name.
    fn programs(&self) -> BTreeMap<u32, String> {
        self.object_ids("bpf-prog", "prog_id:")
            .into_iter()
            .map(|id| (id, program_name(id).unwrap_or_default()))
            .collect()
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGTERM);
            let deadline = Instant::now() + EXIT_TIMEOUT;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            eprintln!("stalltrace stderr:\n{}", self.stderr());
        }
    }
}

fn program_name(id: u32) -> Option<String> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|program| program.id() == id)
        .and_then(|program| program.name_as_str().map(str::to_owned))
}

// ---------------------------------------------------------------------------------------
// Maps

fn open_map(id: u32) -> Map {
    let data = MapData::from_id(id).unwrap_or_else(|error| panic!("failed to open map {id}: {error}"));
    Map::from_map_data(data).unwrap_or_else(|error| panic!("failed to read map {id}: {error}"))
}

/// Returns the entries of the `THREADS` map that belong to process `pid`, by TID.
fn loop_threads_of(map_id: u32, pid: u32) -> BTreeMap<u32, LoopThread> {
    let threads: HashMap<MapData, u32, LoopThread> =
        HashMap::try_from(open_map(map_id)).expect("THREADS is not a hash map of LoopThread");
    let mut found = BTreeMap::new();
    for entry in threads.iter() {
        match entry {
            Ok((tid, thread)) => {
                assert_eq!(tid, thread.tid, "THREADS entry {tid} holds the state of thread {}", thread.tid);
                if thread.pid == pid {
                    found.insert(tid, thread);
                }
            }
            // The entry went away between two steps of the walk: its thread exited.
            Err(aya::maps::MapError::KeyNotFound) => {}
            Err(error) => panic!("failed to read map THREADS: {error}"),
        }
    }
    found
}

/// Returns the entries of the `FUTEX_WAITS` map that belong to process `pid`, by TID.
fn futex_waits_of(map_id: u32, pid: u32) -> BTreeMap<u32, FutexWait> {
    let waits: HashMap<MapData, u32, FutexWait> =
        HashMap::try_from(open_map(map_id)).expect("FUTEX_WAITS is not a hash map of FutexWait");
    let mut found = BTreeMap::new();
    for entry in waits.iter() {
        match entry {
            Ok((tid, wait)) if wait.pid == pid => {
                found.insert(tid, wait);
            }
            Ok(_) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(error) => panic!("failed to read map FUTEX_WAITS: {error}"),
        }
    }
    found
}

/// Returns the `PROC_LOOP_THREADS` count of process `pid`: its threads in `THREADS`,
/// which the BPF programs keep up to date as threads start and stop being tracked.
fn loop_count_of(map_id: u32, pid: u32) -> Option<u64> {
    let counts: HashMap<MapData, u32, u64> =
        HashMap::try_from(open_map(map_id)).expect("PROC_LOOP_THREADS is not a hash map of u64");
    match counts.get(&pid, 0) {
        Ok(count) => Some(count),
        Err(aya::maps::MapError::KeyNotFound) => None,
        Err(error) => panic!("failed to read map PROC_LOOP_THREADS: {error}"),
    }
}

/// Returns one of stalltrace's loss counters, summed over CPUs.
fn counter_value(map_id: u32, index: u32) -> u64 {
    let counters: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(open_map(map_id)).expect("COUNTERS is not a per-CPU array of u64");
    counters
        .get(&index, 0)
        .unwrap_or_else(|error| panic!("failed to read counter {index}: {error}"))
        .iter()
        .sum()
}

// ---------------------------------------------------------------------------------------
// Workloads

/// A running `thread-churn` or `futex-flood`, which prints `{"pid":P}` and then waits
/// for a start line. Its stdout lines arrive through a channel. Drop kills it.
struct Flood {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<Value>,
    pid: u32,
}

impl Flood {
    fn start(binary: &str, args: &[&str]) -> Self {
        eprintln!("running {binary} {}", args.join(" "));
        let mut child = Command::new(binary)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|error| panic!("failed to start {binary}: {error}"));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout is piped");
        let (sender, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                eprintln!("workload: {line}");
                let value = serde_json::from_str(&line).unwrap_or_else(|error| panic!("invalid workload line `{line}`: {error}"));
                if sender.send(value).is_err() {
                    return;
                }
            }
        });
        let mut flood = Self {
            child,
            stdin,
            lines,
            pid: 0,
        };
        let start = flood.next_line_with("pid");
        flood.pid = start["pid"].as_u64().expect("pid is a number") as u32;
        assert_eq!(flood.pid, flood.child.id(), "the workload printed another pid");
        flood
    }

    /// Returns the next line that has `key`, failing after LINE_TIMEOUT.
    fn next_line_with(&mut self, key: &str) -> Value {
        self.try_line_with(key, LINE_TIMEOUT)
            .unwrap_or_else(|| panic!("the workload printed no `{key}` line within {LINE_TIMEOUT:?}"))
    }

    fn try_line_with(&mut self, key: &str, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.lines.recv_timeout(left) {
                Ok(value) if value.get(key).is_some() => return Some(value),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => return None,
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait();
                    panic!("the workload closed its stdout and exited with {status:?} before a `{key}` line");
                }
            }
        }
    }

    fn send_line(&mut self) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        stdin.write_all(b"go\n").and_then(|()| stdin.flush()).expect("failed to write to the workload");
    }

    /// Closes stdin, which ends the workload, and checks that it exits cleanly.
    fn close_and_wait(&mut self) {
        self.stdin = None;
        let deadline = Instant::now() + LINE_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("failed to poll the workload") {
                assert!(status.success(), "the workload exited with {status}");
                return;
            }
            assert!(Instant::now() < deadline, "the workload did not exit within {LINE_TIMEOUT:?} of end of file");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stdin = None;
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn assert_no_ongoing_stalls(report: &Report, pid: u32) {
    let ongoing: Vec<_> = report.stalls_of_process(pid).into_iter().filter(|stall| stall.ongoing).collect();
    assert!(
        ongoing.is_empty(),
        "process {pid} has exited, yet {} of its stalls are ongoing; report:\n{report}",
        ongoing.len()
    );
}

fn names_of(programs: &BTreeMap<u32, String>) -> BTreeSet<String> {
    programs.values().cloned().collect()
}

fn kernel_name(name: &str) -> String {
    name.chars().take(BPF_NAME_LEN).collect()
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn thread_churn_leaves_no_state() {
    const BATCH: usize = 32;
    let test = "thread_churn_leaves_no_state";
    if !require_root(test) {
        return;
    }
    let dir = TestDir::new(test);
    let batch = BATCH.to_string();
    let mut churn = Flood::start(
        THREAD_CHURN,
        &["churn", "--duration-ms", "3000", "--batch", &batch, "--waits", "3", "--stall-every", "200", "--stall-ms", "10"],
    );
    let pid = churn.pid;
    let pid_arg = pid.to_string();
    let tracer = Tracer::record(&dir, &["--pid", &pid_arg, "--threshold", "2ms", "--duration", "120s"]);
    let threads_map = tracer.map_id("THREADS");
    let waits_map = tracer.map_id("FUTEX_WAITS");
    churn.send_line();

    // While threads come and go, every entry belongs to a thread of the current batch or,
    // during the walk, of the batch before it, so the process never has more than two batches.
    let mut samples = 0;
    let mut most = 0;
    let summary = loop {
        if let Some(summary) = churn.try_line_with("threads", Duration::from_millis(100)) {
            break summary;
        }
        let entries = loop_threads_of(threads_map, pid).len();
        samples += 1;
        most = most.max(entries);
        assert!(
            entries <= 2 * BATCH,
            "THREADS holds {entries} entries of process {pid}, which never has more than {BATCH} threads in epoll"
        );
    };
    let threads = summary["threads"].as_u64().expect("threads is a number");
    let stalled_threads = summary["stalled_threads"].as_u64().expect("stalled_threads is a number");
    eprintln!("{threads} threads; THREADS held at most {most} of their entries over {samples} reads");
    assert!(samples > 0, "the churn ended before the thread map was read once");
    assert!(stalled_threads > 0, "no churn thread stalled, so exit records were not exercised");

    thread::sleep(SETTLE);
    let left = loop_threads_of(threads_map, pid);
    assert!(
        left.is_empty(),
        "every churn thread has exited, yet THREADS keeps {} of their entries (TIDs {:?})",
        left.len(),
        left.keys().take(20).collect::<Vec<_>>()
    );
    let waits = futex_waits_of(waits_map, pid);
    assert!(
        waits.is_empty(),
        "no thread of process {pid} is in a futex wait, yet FUTEX_WAITS keeps TIDs {:?}",
        waits.keys().collect::<Vec<_>>()
    );

    churn.close_and_wait();
    let report = tracer.finish();
    assert_no_ongoing_stalls(&report, pid);
    assert_eq!(
        report.untracked_threads, 0,
        "at most {} churn threads exist at once, yet the thread map filled",
        BATCH
    );
    let stalls = report.stalls_of_process(pid);
    let ended_by_exit = stalls.iter().filter(|stall| stall.ended_by.as_deref() == Some("exit")).count() as u64;
    eprintln!(
        "{} stalls of the churn, {ended_by_exit} ended by exit, {stalled_threads} threads stalled on purpose, {} records dropped",
        stalls.len(),
        report.drops
    );
    if report.drops == 0 {
        assert!(
            ended_by_exit >= stalled_threads,
            "{stalled_threads} threads exited in a stalled iteration, but only {ended_by_exit} stalls ended by exit"
        );
    } else {
        let lost = stalls.iter().filter(|stall| stall.ended_by.as_deref() == Some("lost")).count() as u64;
        assert!(
            ended_by_exit + lost >= stalled_threads,
            "{stalled_threads} threads exited in a stalled iteration, but only {ended_by_exit} stalls ended by exit and {lost} were lost"
        );
    }
}

/// Threads beyond the thread map's size in `full_thread_map_*`.
const EXTRA_THREADS: u32 = 616;

/// What `hold_more_threads_than_the_map` saw.
struct FullMap {
    /// `THREADS` entries of the process while every thread waited in `epoll_wait`.
    tracked_while_held: u32,
    /// `PROC_LOOP_THREADS` of the process while the threads waited, and after they exited.
    loop_count_while_held: Option<u64>,
    loop_count_at_end: Option<u64>,
    /// `THREAD_MAP_FULL` while the threads waited, and after they exited.
    untracked_while_held: u64,
    untracked_at_end: u64,
    /// `THREADS` entries of the process after every thread exited.
    left_at_end: usize,
    report: Report,
}

/// Runs THREAD_MAP_ENTRIES + EXTRA_THREADS threads that each call `epoll_wait` exactly
/// once, and reads the maps while they wait and after they exit.
fn hold_more_threads_than_the_map(dir: &TestDir) -> FullMap {
    let threads = THREAD_MAP_ENTRIES + EXTRA_THREADS;
    let threads_arg = threads.to_string();
    let mut hold = Flood::start(THREAD_CHURN, &["hold", "--threads", &threads_arg, "--timeout-ms", "60000"]);
    let pid = hold.pid;
    let pid_arg = pid.to_string();
    let tracer = Tracer::record(dir, &["--pid", &pid_arg, "--threshold", "10s", "--duration", "300s"]);
    let threads_map = tracer.map_id("THREADS");
    let loops_map = tracer.map_id("PROC_LOOP_THREADS");
    let counters_map = tracer.map_id("COUNTERS");
    let max_entries = MapInfo::from_id(threads_map).expect("failed to read the THREADS map info").max_entries();
    assert_eq!(max_entries, THREAD_MAP_ENTRIES, "THREADS has another size than docs/report.md states");

    hold.send_line();
    hold.next_line_with("holding");
    let tracked_while_held = loop_threads_of(threads_map, pid).len() as u32;
    let loop_count_while_held = loop_count_of(loops_map, pid);
    let untracked_while_held = counter_value(counters_map, counter::THREAD_MAP_FULL);

    hold.send_line();
    hold.next_line_with("released");
    thread::sleep(SETTLE);
    let left_at_end = loop_threads_of(threads_map, pid).len();
    let loop_count_at_end = loop_count_of(loops_map, pid);
    let untracked_at_end = counter_value(counters_map, counter::THREAD_MAP_FULL);

    hold.close_and_wait();
    let report = tracer.finish();
    assert_no_ongoing_stalls(&report, pid);
    FullMap {
        tracked_while_held,
        loop_count_while_held,
        loop_count_at_end,
        untracked_while_held,
        untracked_at_end,
        left_at_end,
        report,
    }
}

#[test]
fn full_thread_map_is_counted() {
    let test = "full_thread_map_is_counted";
    if !require_root(test) {
        return;
    }
    let dir = TestDir::new(test);
    let threads = THREAD_MAP_ENTRIES + EXTRA_THREADS;
    let full = hold_more_threads_than_the_map(&dir);

    assert_eq!(
        full.tracked_while_held, THREAD_MAP_ENTRIES,
        "{threads} threads wait in epoll, so the map should be full of them"
    );
    assert_eq!(
        full.untracked_while_held,
        u64::from(EXTRA_THREADS),
        "{threads} threads entered epoll_wait once each and {THREAD_MAP_ENTRIES} are tracked"
    );
    assert_eq!(
        full.left_at_end, 0,
        "every held thread has exited, yet THREADS keeps some of their entries"
    );
    assert_eq!(
        full.report.untracked_threads, full.untracked_at_end,
        "report.json's untracked_threads differs from the kernel counter"
    );
}

#[test]
fn loop_count_matches_threads() {
    const ATTEMPTS: usize = 3;
    let test = "loop_count_matches_threads";
    if !require_root(test) {
        return;
    }
    // A lost update needs two CPUs to change one count at the same moment, so one clean
    // attempt proves little. Each attempt starts and ends 17,000 loop threads in bursts.
    for attempt in 1..=ATTEMPTS {
        let dir = TestDir::new(test);
        let full = hold_more_threads_than_the_map(&dir);
        assert_eq!(
            full.loop_count_while_held,
            Some(u64::from(full.tracked_while_held)),
            "attempt {attempt}: PROC_LOOP_THREADS disagrees with the THREADS entries of the process"
        );
        assert_eq!(
            full.loop_count_at_end, None,
            "attempt {attempt}: every loop thread has exited, yet PROC_LOOP_THREADS still counts some"
        );
    }
}

#[test]
fn untracked_threads_counts_threads() {
    let test = "untracked_threads_counts_threads";
    if !require_root(test) {
        return;
    }
    let dir = TestDir::new(test);
    let full = hold_more_threads_than_the_map(&dir);

    assert_eq!(
        full.report.untracked_threads,
        u64::from(EXTRA_THREADS),
        "{EXTRA_THREADS} threads were never tracked, each entered and left epoll_wait once"
    );
}

#[test]
fn futex_flood_leaves_no_waits() {
    let test = "futex_flood_leaves_no_waits";
    if !require_root(test) {
        return;
    }
    let dir = TestDir::new(test);
    let mut flood = Flood::start(FUTEX_FLOOD, &["--duration-ms", "3000", "--threads", "2", "--epoll-every", "1000"]);
    let pid = flood.pid;
    let pid_arg = pid.to_string();
    let tracer = Tracer::record(&dir, &["--pid", &pid_arg, "--threshold", "50ms", "--duration", "120s"]);
    let threads_map = tracer.map_id("THREADS");
    let waits_map = tracer.map_id("FUTEX_WAITS");
    flood.send_line();

    let started = flood.next_line_with("threads");
    let tids: BTreeSet<u32> = started["threads"]
        .as_object()
        .expect("threads is an object")
        .values()
        .map(|tid| tid.as_u64().expect("a TID is a number") as u32)
        .collect();
    // The flood threads and the main thread each have at most one wait in the map.
    let mut samples = 0;
    let summary = loop {
        if let Some(summary) = flood.try_line_with("futex_ops", Duration::from_millis(100)) {
            break summary;
        }
        let waits = futex_waits_of(waits_map, pid);
        samples += 1;
        assert!(
            waits.len() <= tids.len() + 1,
            "FUTEX_WAITS holds {} waits of a process with {} threads: {:?}",
            waits.len(),
            tids.len() + 1,
            waits.keys().collect::<Vec<_>>()
        );
    };
    eprintln!(
        "{} futex calls at {:.0} per second; FUTEX_WAITS read {samples} times during the flood",
        summary["futex_ops"],
        summary["ops_per_sec"].as_f64().unwrap_or(0.0)
    );

    // The flood threads now sleep in clock_nanosleep and the main thread reads stdin.
    thread::sleep(SETTLE);
    let waits = futex_waits_of(waits_map, pid);
    assert!(
        waits.is_empty(),
        "no thread of process {pid} is in a futex call, yet FUTEX_WAITS keeps TIDs {:?}",
        waits.keys().collect::<Vec<_>>()
    );
    let threads = loop_threads_of(threads_map, pid);
    assert_eq!(
        threads.keys().copied().collect::<BTreeSet<_>>(),
        tids,
        "THREADS should hold exactly the flood threads, which waited in epoll"
    );
    for (tid, state) in &threads {
        assert_eq!(state.in_futex, 0, "thread {tid} left its last futex call, yet THREADS marks it in one");
    }

    flood.close_and_wait();
    thread::sleep(SETTLE);
    let left = loop_threads_of(threads_map, pid);
    assert!(left.is_empty(), "the flood process has exited, yet THREADS keeps TIDs {:?}", left.keys().collect::<Vec<_>>());
    let waits = futex_waits_of(waits_map, pid);
    assert!(waits.is_empty(), "the flood process has exited, yet FUTEX_WAITS keeps TIDs {:?}", waits.keys().collect::<Vec<_>>());

    let report = tracer.finish();
    assert_no_ongoing_stalls(&report, pid);
    if report.drops == 0 {
        // Each flood thread was in an iteration of at least SETTLE, past the 50 ms
        // threshold, when it exited.
        for tid in &tids {
            let by_exit = report
                .stalls_of_thread(pid, *tid)
                .iter()
                .any(|stall| stall.ended_by.as_deref() == Some("exit"));
            assert!(by_exit, "flood thread {tid} exited mid-stall, but no stall of it ended by exit; report:\n{report}");
        }
    }
}

#[test]
fn full_ring_buffer_counts_drops() {
    let test = "full_ring_buffer_counts_drops";
    if !require_root(test) {
        return;
    }
    let dir = TestDir::new(test);
    // Every loop iteration of 200 futex calls is a stall at a 1 us threshold. That makes
    // thousands of records a second, more than the ring buffer has room for while
    // stalltrace is stopped.
    let mut flood = Flood::start(FUTEX_FLOOD, &["--duration-ms", "2500", "--threads", "1", "--epoll-every", "200"]);
    let pid = flood.pid;
    let pid_arg = pid.to_string();
    let tracer = Tracer::record(&dir, &["--pid", &pid_arg, "--threshold", "1us", "--duration", "120s"]);
    let counters_map = tracer.map_id("COUNTERS");
    flood.send_line();
    flood.next_line_with("threads");

    thread::sleep(Duration::from_millis(500));
    let before_stop = counter_value(counters_map, counter::RINGBUF_DROPS);
    tracer.signal(libc::SIGSTOP);
    thread::sleep(Duration::from_millis(1500));
    let while_stopped = counter_value(counters_map, counter::RINGBUF_DROPS);
    tracer.signal(libc::SIGCONT);
    assert!(
        while_stopped > before_stop,
        "stalltrace was stopped for 1.5 s during the flood, but the kernel counted no drop ({before_stop} before, {while_stopped} after)"
    );

    flood.next_line_with("futex_ops");
    flood.close_and_wait();
    let kernel_drops = counter_value(counters_map, counter::RINGBUF_DROPS);
    let stderr_path = tracer.stderr_path.clone();
    let report = tracer.finish();
    // NOTE: the warning may come only from the last scan at exit. stalltrace drains the
    // ring buffer until it is empty before it scans again, so while records arrive about
    // as fast as it reads them, no scan runs and no warning is printed.
    let stderr = fs::read_to_string(&stderr_path).unwrap_or_default();
    eprintln!(
        "kernel drops: {while_stopped} after the stop, {kernel_drops} at the end; report: {} drops, {} stalls",
        report.drops,
        report.stalls.len()
    );
    assert!(
        report.drops >= kernel_drops,
        "report.json counts {} drops, fewer than the {kernel_drops} the kernel had counted before stalltrace stopped",
        report.drops
    );
    assert!(
        stderr.contains("stall records dropped"),
        "records were dropped, but stalltrace's stderr has no warning about it:\n{stderr}"
    );
    assert_no_ongoing_stalls(&report, pid);
}

/// Sends `signal` to stalltrace in the middle of a thread flood and checks that every
/// program and map is gone afterwards and that the report was written whole.
fn signal_detaches(test: &str, signal: libc::c_int) {
    if !require_root(test) {
        return;
    }
    let dir = TestDir::new(test);
    let mut churn = Flood::start(THREAD_CHURN, &["churn", "--duration-ms", "20000", "--stall-every", "100", "--stall-ms", "5"]);
    let pid_arg = churn.pid.to_string();
    let mut tracer = Tracer::record(&dir, &["--pid", &pid_arg, "--threshold", "2ms", "--duration", "120s"]);
    let programs = tracer.programs();
    let map_ids: BTreeSet<u32> = tracer.maps().into_values().collect();
    let expected: BTreeSet<String> = PROGRAM_NAMES.iter().map(|name| kernel_name(name)).collect();
    let loaded = names_of(&programs);
    let missing: Vec<&String> = expected.difference(&loaded).collect();
    assert!(missing.is_empty(), "stalltrace has not loaded programs {missing:?}; it holds {programs:?}");
    assert!(!map_ids.is_empty(), "stalltrace holds no BPF map");

    churn.send_line();
    thread::sleep(Duration::from_millis(1500));
    let status = tracer.stop_with(signal);
    assert!(status.success(), "stalltrace exited with {status} after signal {signal}; stderr:\n{}", tracer.stderr());

    // The kernel frees programs and maps once the last reference goes, which can lag the
    // process exit by an RCU grace period.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (left_programs, left_maps) = loop {
        let left_programs: BTreeMap<u32, String> = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter(|program| programs.contains_key(&program.id()))
            .map(|program| (program.id(), program.name_as_str().unwrap_or_default().to_owned()))
            .collect();
        let left_maps: BTreeSet<u32> = aya::maps::loaded_maps()
            .filter_map(Result::ok)
            .map(|map| map.id())
            .filter(|id| map_ids.contains(id))
            .collect();
        if (left_programs.is_empty() && left_maps.is_empty()) || Instant::now() >= deadline {
            break (left_programs, left_maps);
        }
        thread::sleep(Duration::from_millis(50));
    };
    assert!(left_programs.is_empty(), "programs still loaded 5 s after stalltrace exited: {left_programs:?}");
    assert!(left_maps.is_empty(), "maps still loaded 5 s after stalltrace exited: {left_maps:?}");

    let record_dir = dir.join("record");
    let report = Report::load(&record_dir.join("report.json"));
    assert!(
        !record_dir.join(".report.json.tmp").exists(),
        "the temporary report file was left behind"
    );
    assert!(report.duration_ns > 0, "the report covers no time; report:\n{report}");
    // Dropping the workload ends its flood.
    drop(churn);
}

#[test]
fn sigint_mid_flood_detaches() {
    signal_detaches("sigint_mid_flood_detaches", libc::SIGINT);
}

#[test]
fn sigterm_mid_flood_detaches() {
    signal_detaches("sigterm_mid_flood_detaches", libc::SIGTERM);
}
