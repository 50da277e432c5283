//! Real-kernel scenarios: a workload stalls on purpose while `stalltrace record` runs, and
//! the report must show one stall of the loop thread with the expected verdict.
//!
//! They need root and `STALLTRACE_BIN`, so run them with `cargo xtask test`, which runs
//! them one at a time. Timing bounds allow for hypervisor steal and preemption on a
//! small virtual machine.

use std::{fs, ops::RangeInclusive, path::PathBuf, thread, time::Duration};

use stalltrace_tests::{
    analyze, monotonic_ns, protocol::Done, require_root, stalltrace_bin, Recording, RedisServer,
    Report, Stall, TestDir, Workload,
};

const WORKLOAD: &str = env!("CARGO_BIN_EXE_loop-workload");
const THRESHOLD: &str = "50ms";
const THRESHOLD_NS: u64 = 50_000_000;
/// `--duration` of each recording.
const CAPTURE: Duration = Duration::from_secs(3);
/// Wait between `attached` and the trigger, so the loop has entered `epoll_wait` at least
/// once since the BPF programs were attached (it re-enters every 10 ms when idle).
const SETTLE: Duration = Duration::from_millis(500);
const HANDLER_TIMEOUT: Duration = Duration::from_secs(10);
/// Maximum time from a stall's start (the loop's return from `epoll_wait`) to the start of
/// the handler that caused it. Only a `read` of stdin and parsing come in between, which
/// take microseconds unless the vCPU is preempted or stolen.
const START_SLACK_NS: u64 = 5_000_000;
const MS: u64 = 1_000_000;

/// One recording of `loop-workload` during which it ran one command.
struct WorkloadRun {
    report: Report,
    done: Done,
    pid: u32,
    loop_tid: u32,
    record_dir: PathBuf,
    dir: TestDir,
}

/// Records the workload while it runs `command`, SETTLE after stalltrace attached.
fn record_command(test: &str, command: &str, threshold: Option<&str>) -> WorkloadRun {
    let stalltrace = stalltrace_bin();
    let dir = TestDir::new(test);
    let record_dir = dir.join("record");
    fs::create_dir_all(&record_dir).expect("failed to create the record folder");

    let mut workload = Workload::start(WORKLOAD);
    let recording = Recording::start(&stalltrace, workload.pid(), CAPTURE, threshold, &record_dir);
    thread::sleep(SETTLE);
    let done = workload.run(command, HANDLER_TIMEOUT);
    let report = recording.finish();
    eprintln!(
        "`{command}` ran from {} to {} ns; report:\n{report}",
        done.start_ns, done.end_ns
    );

    WorkloadRun {
        report,
        done,
        pid: workload.pid(),
        loop_tid: workload.loop_tid(),
        record_dir,
        dir,
    }
}

/// Asserts that the report has exactly one stall of the loop thread and returns it.
fn single_loop_stall(run: &WorkloadRun) -> &Stall {
    let stalls = run.report.stalls_of_thread(run.pid, run.loop_tid);
    assert_eq!(
        stalls.len(),
        1,
        "expected exactly one stall of loop thread {} for `{}` (handler {}..{} ns); report:\n{}",
        run.loop_tid,
        run.done.done,
        run.done.start_ns,
        run.done.end_ns,
        run.report
    );
    stalls[0]
}

/// Asserts that `stall` starts a few ms before the handler and lasts past its end.
fn assert_stall_covers_handler(stall: &Stall, done: &Done, report: &Report) {
    assert!(
        stall.start_ns <= done.start_ns,
        "the stall starts at {} ns, after the handler start {} ns; report:\n{report}",
        stall.start_ns,
        done.start_ns
    );
    assert!(
        done.start_ns - stall.start_ns <= START_SLACK_NS,
        "the stall starts {} ns before the handler start {} ns, more than {START_SLACK_NS} ns; report:\n{report}",
        done.start_ns - stall.start_ns,
        done.start_ns
    );
    assert!(
        stall.end_ns() >= done.end_ns,
        "the stall ends at {} ns, before the handler end {} ns; report:\n{report}",
        stall.end_ns(),
        done.end_ns
    );
}

/// Asserts the report-wide rules that hold for every finished stall.
fn assert_finished_stall(stall: &Stall, report: &Report) {
    assert!(
        !stall.ongoing,
        "the stall is marked ongoing; report:\n{report}"
    );
    assert_eq!(
        stall.ended_by.as_deref(),
        Some("wait"),
        "the stall should end when the loop is back in its wait call; report:\n{report}"
    );
    assert_eq!(
        stall.breakdown_ns.total(),
        stall.duration_ns,
        "the breakdown does not add up to the stall duration; report:\n{report}"
    );
    assert_eq!(
        stall.verdict,
        stall.breakdown_ns.largest(),
        "the verdict is not the largest breakdown field; report:\n{report}"
    );
}

fn assert_duration_ms(stall: &Stall, range: RangeInclusive<u64>, report: &Report) {
    let nanos = stall.duration_ns;
    assert!(
        (range.start() * MS..=range.end() * MS).contains(&nanos),
        "the stall lasted {:.1} ms, outside {}..={} ms; report:\n{report}",
        nanos as f64 / MS as f64,
        range.start(),
        range.end()
    );
}

fn assert_threshold(report: &Report, expected_ns: u64) {
    assert_eq!(
        report.threshold_ns, expected_ns,
        "the report's threshold differs from --threshold; report:\n{report}"
    );
}

#[test]
fn spin_handler_is_on_cpu() {
    let test = "spin_handler_is_on_cpu";
    if !require_root(test) {
        return;
    }
    let run = record_command(test, "spin 200", Some(THRESHOLD));
    let report = &run.report;
    assert_threshold(report, THRESHOLD_NS);

    let stall = single_loop_stall(&run);
    assert_eq!(
        stall.comm, "loop-workload",
        "the stall names another command; report:\n{report}"
    );
    assert_stall_covers_handler(stall, &run.done, report);
    assert_finished_stall(stall, report);
    assert_duration_ms(stall, 200..=300, report);
    assert_eq!(stall.verdict, "on_cpu", "verdict; report:\n{report}");

    let on_cpu_share = stall.share(stall.breakdown_ns.on_cpu);
    assert!(
        on_cpu_share >= 0.60,
        "on_cpu is {:.0}% of the stall, below 60%; report:\n{report}",
        on_cpu_share * 100.0
    );
}

#[test]
fn sleep_handler_is_syscall() {
    let test = "sleep_handler_is_syscall";
    if !require_root(test) {
        return;
    }
    let run = record_command(test, "sleep 200", Some(THRESHOLD));
    let report = &run.report;
    assert_threshold(report, THRESHOLD_NS);

    let stall = single_loop_stall(&run);
    assert_stall_covers_handler(stall, &run.done, report);
    assert_finished_stall(stall, report);
    assert_duration_ms(stall, 200..=300, report);
    assert_eq!(stall.verdict, "syscall", "verdict; report:\n{report}");

    let nanosleep_ns = stall.syscalls.get("clock_nanosleep").copied();
    assert!(
        nanosleep_ns.is_some(),
        "the stall's syscalls do not name clock_nanosleep; report:\n{report}"
    );
    let syscall_ns = stall.breakdown_ns.syscall;
    assert!(
        nanosleep_ns.unwrap_or(0) as f64 >= 0.90 * syscall_ns as f64,
        "clock_nanosleep has {} of {syscall_ns} syscall ns, below 90%; report:\n{report}",
        nanosleep_ns.unwrap_or(0)
    );
}

/// The same sleep, with the syscall named by the raw syscall tracepoints that
/// stalltrace falls back to when it cannot read a blocked thread's registers.
#[test]
fn sleep_handler_named_by_fallback() {
    let test = "sleep_handler_named_by_fallback";
    if !require_root(test) {
        return;
    }
    // Tests run one at a time, and only the stalltrace child reads the variable.
    std::env::set_var("STALLTRACE_RAW_SYSCALLS", "1");
    let run = record_command(test, "sleep 200", Some(THRESHOLD));
    std::env::remove_var("STALLTRACE_RAW_SYSCALLS");
    let report = &run.report;

    let stall = single_loop_stall(&run);
    assert_duration_ms(stall, 200..=300, report);
    assert_eq!(stall.verdict, "syscall", "verdict; report:\n{report}");
    let nanosleep_ns = stall.syscalls.get("clock_nanosleep").copied().unwrap_or(0);
    assert!(
        nanosleep_ns as f64 >= 0.90 * stall.breakdown_ns.syscall as f64,
        "clock_nanosleep has {nanosleep_ns} of {} syscall ns, below 90%; report:\n{report}",
        stall.breakdown_ns.syscall
    );
}

#[test]
fn mutex_wait_is_futex() {
    let test = "mutex_wait_is_futex";
    if !require_root(test) {
        return;
    }
    let run = record_command(test, "mutex 200", Some(THRESHOLD));
    let report = &run.report;
    assert_threshold(report, THRESHOLD_NS);

    let stall = single_loop_stall(&run);
    assert_stall_covers_handler(stall, &run.done, report);
    assert_finished_stall(stall, report);
    assert_duration_ms(stall, 200..=320, report);
    assert_eq!(stall.verdict, "futex", "verdict; report:\n{report}");

    let futex_share = stall.share(stall.breakdown_ns.futex);
    assert!(
        futex_share >= 0.70,
        "futex is {:.0}% of the stall, below 70%; report:\n{report}",
        futex_share * 100.0
    );
}

#[test]
fn contended_cpu_is_runqueue() {
    let test = "contended_cpu_is_runqueue";
    if !require_root(test) {
        return;
    }
    // The loop thread needs 100 ms of CPU time on a CPU shared with 3 spinners, so the
    // handler takes about 400 ms of wall time, most of it waiting on the run queue.
    let run = record_command(test, "contend 100 3", Some(THRESHOLD));
    let report = &run.report;
    assert_threshold(report, THRESHOLD_NS);

    let stall = single_loop_stall(&run);
    assert_stall_covers_handler(stall, &run.done, report);
    assert_finished_stall(stall, report);
    assert_eq!(stall.verdict, "runqueue", "verdict; report:\n{report}");

    let runqueue_share = stall.share(stall.breakdown_ns.runqueue);
    assert!(
        runqueue_share >= 0.40,
        "runqueue is {:.0}% of the stall, below 40%; report:\n{report}",
        runqueue_share * 100.0
    );
    let on_cpu = stall.breakdown_ns.on_cpu;
    assert!(
        (80 * MS..=200 * MS).contains(&on_cpu),
        "on_cpu is {:.1} ms, outside 80..=200 ms for 100 ms of CPU time; report:\n{report}",
        on_cpu as f64 / MS as f64
    );
}

#[test]
fn redis_debug_sleep_is_syscall() {
    let test = "redis_debug_sleep_is_syscall";
    if !require_root(test) {
        return;
    }
    let stalltrace = stalltrace_bin();
    let dir = TestDir::new(test);
    let record_dir = dir.join("record");
    fs::create_dir_all(&record_dir).expect("failed to create the record folder");
    let redis = RedisServer::start(dir.path());
    let pid = redis.pid();

    let recording = Recording::start(&stalltrace, pid, CAPTURE, Some(THRESHOLD), &record_dir);
    thread::sleep(SETTLE);
    let before_ns = monotonic_ns();
    let reply = redis.cli(&["DEBUG", "SLEEP", "0.3"]);
    let after_ns = monotonic_ns();
    let report = recording.finish();
    eprintln!("redis-cli ran from {before_ns} to {after_ns} ns; report:\n{report}");
    assert_eq!(reply, "OK", "DEBUG SLEEP reply");
    assert_threshold(&report, THRESHOLD_NS);

    // Redis runs its event loop on the main thread, whose tid is the pid.
    let stalls = report.stalls_of_thread(pid, pid);
    assert_eq!(
        stalls.len(),
        1,
        "expected exactly one stall of the redis main thread {pid}; report:\n{report}"
    );
    let stall = stalls[0];
    assert!(
        stall.start_ns >= before_ns,
        "the stall starts at {} ns, before redis-cli started at {before_ns} ns; report:\n{report}",
        stall.start_ns
    );
    // The iteration ends when redis enters epoll_wait again, after it has sent the
    // reply, so it may end just after redis-cli has read the reply and returned.
    assert!(
        stall.end_ns() <= after_ns + 50 * MS,
        "the stall ends at {} ns, over 50 ms after redis-cli returned at {after_ns} ns; report:\n{report}",
        stall.end_ns()
    );
    assert_finished_stall(stall, &report);
    assert_duration_ms(stall, 300..=400, &report);
    assert_eq!(stall.verdict, "syscall", "verdict; report:\n{report}");

    // DEBUG SLEEP calls nanosleep(3), which glibc implements with clock_nanosleep.
    // Other libcs or kernels may show the nanosleep syscall instead.
    let sleep_ns = ["clock_nanosleep", "nanosleep"]
        .iter()
        .filter_map(|name| stall.syscalls.get(*name).copied())
        .max()
        .unwrap_or(0);
    let syscall_ns = stall.breakdown_ns.syscall;
    assert!(
        sleep_ns as f64 >= 0.90 * syscall_ns as f64,
        "no sleep syscall has 90% of the {syscall_ns} syscall ns (largest: {sleep_ns}); report:\n{report}"
    );
}

#[test]
fn idle_loop_has_no_stalls() {
    let test = "idle_loop_has_no_stalls";
    if !require_root(test) {
        return;
    }
    let stalltrace = stalltrace_bin();
    let dir = TestDir::new(test);
    let record_dir = dir.join("record");
    fs::create_dir_all(&record_dir).expect("failed to create the record folder");
    let mut workload = Workload::start(WORKLOAD);

    let recording = Recording::start(&stalltrace, workload.pid(), CAPTURE, None, &record_dir);
    let report = recording.finish();
    eprintln!("report:\n{report}");
    // The workload still runs a command, so it was alive for the whole capture.
    workload.run("noop", HANDLER_TIMEOUT);

    assert_eq!(
        report.drops, 0,
        "events were dropped, so the result is incomplete; report:\n{report}"
    );
    let stalls = report.stalls_of_process(workload.pid());
    assert!(
        stalls.is_empty(),
        "an idle loop has stalls; report:\n{report}"
    );
}

#[test]
fn fast_load_has_no_stalls() {
    const NOOPS: usize = 20_000;
    const BATCH_LINES: usize = 500;

    let test = "fast_load_has_no_stalls";
    if !require_root(test) {
        return;
    }
    let stalltrace = stalltrace_bin();
    let dir = TestDir::new(test);
    let record_dir = dir.join("record");
    fs::create_dir_all(&record_dir).expect("failed to create the record folder");
    let mut workload = Workload::start(WORKLOAD);

    let recording = Recording::start(
        &stalltrace,
        workload.pid(),
        CAPTURE,
        Some("10ms"),
        &record_dir,
    );
    thread::sleep(SETTLE);
    let batch = "noop\n".repeat(BATCH_LINES);
    for _ in 0..NOOPS / BATCH_LINES {
        workload.send(&batch);
    }
    for _ in 0..NOOPS {
        workload.expect_done("noop", HANDLER_TIMEOUT);
    }
    let load_end_ns = monotonic_ns();
    let capture_end_ns = recording.attached_ns() + CAPTURE.as_nanos() as u64;
    let report = recording.finish();
    eprintln!("report:\n{report}");

    assert!(
        load_end_ns < capture_end_ns,
        "the load ended at {load_end_ns} ns, after the capture ended at about {capture_end_ns} ns"
    );
    assert_threshold(&report, 10 * MS);
    assert_eq!(
        report.drops, 0,
        "events were dropped, so the result is incomplete; report:\n{report}"
    );
    let stalls = report.stalls_of_process(workload.pid());
    assert!(
        stalls.is_empty(),
        "{NOOPS} noop commands caused stalls; report:\n{report}"
    );
}

#[test]
fn analyze_replays_capture() {
    let test = "analyze_replays_capture";
    if !require_root(test) {
        return;
    }
    let run = record_command(test, "spin 200", Some(THRESHOLD));
    // Replaying a capture without the spin stall would prove little.
    let recorded_stall = single_loop_stall(&run);
    assert_stall_covers_handler(recorded_stall, &run.done, &run.report);

    let replay_dir = run.dir.join("replay");
    fs::create_dir_all(&replay_dir).expect("failed to create the replay folder");
    let replay = analyze(
        &stalltrace_bin(),
        &run.record_dir.join("capture"),
        &replay_dir,
    );
    let recorded = &run.report;

    assert!(
        !replay.capture_truncated,
        "analyze read only part of the capture; replayed:\n{replay}"
    );
    assert_eq!(
        replay.threshold_ns, recorded.threshold_ns,
        "threshold differs; recorded:\n{recorded}\nreplayed:\n{replay}"
    );
    assert_eq!(
        replay.drops, recorded.drops,
        "drops differ; recorded:\n{recorded}\nreplayed:\n{replay}"
    );
    assert_eq!(
        sorted_stalls(&replay),
        sorted_stalls(recorded),
        "stalls differ; recorded:\n{recorded}\nreplayed:\n{replay}"
    );
}

/// Returns the report's stalls ordered by pid, tid and start, because the report format
/// does not fix their order.
fn sorted_stalls(report: &Report) -> Vec<Stall> {
    let mut stalls = report.stalls.clone();
    stalls.sort_by_key(|stall| (stall.pid, stall.tid, stall.start_ns));
    stalls
}
