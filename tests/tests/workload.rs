//! Checks of `loop-workload` on its own, without stalltrace or root. When a scenario
//! fails, they tell whether the workload or stalltrace is at fault.
//!
//! Run time and run-queue wait come from the kernel's `/proc/PID/task/TID/schedstat`.

use std::{fs, time::Duration};

use stalltrace_tests::{protocol::Message, Workload};

const WORKLOAD: &str = env!("CARGO_BIN_EXE_loop-workload");
const TIMEOUT: Duration = Duration::from_secs(10);
const MS: u64 = 1_000_000;
/// Upper bound on the time that a handler may run past its requested duration. Preemption
/// and hypervisor steal add milliseconds, rarely more, on a loaded 2-core virtual machine.
const OVERRUN_NS: u64 = 50 * MS;

/// CPU time and run-queue wait of one thread, in nanoseconds, from `/proc/.../schedstat`.
struct SchedStat {
    on_cpu_ns: u64,
    runqueue_ns: u64,
}

fn sched_stat(pid: u32, tid: u32) -> SchedStat {
    let path = format!("/proc/{pid}/task/{tid}/schedstat");
    let text =
        fs::read_to_string(&path).unwrap_or_else(|error| panic!("failed to read {path}: {error}"));
    let fields: Vec<u64> = text
        .split_whitespace()
        .map(|field| {
            field
                .parse()
                .unwrap_or_else(|_| panic!("invalid field `{field}` in {path}: `{text}`"))
        })
        .collect();
    assert!(
        fields.len() >= 2,
        "{path} has fewer than 2 fields: `{text}`"
    );
    SchedStat {
        on_cpu_ns: fields[0],
        runqueue_ns: fields[1],
    }
}

fn cpus_allowed(pid: u32, tid: u32) -> String {
    let path = format!("/proc/{pid}/task/{tid}/status");
    let text =
        fs::read_to_string(&path).unwrap_or_else(|error| panic!("failed to read {path}: {error}"));
    text.lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or_else(|| panic!("{path} has no Cpus_allowed_list line"))
        .trim()
        .to_string()
}

#[test]
fn start_line_names_main_thread() {
    let workload = Workload::start(WORKLOAD);
    assert_eq!(
        workload.pid(),
        workload.child_pid(),
        "pid in the start line"
    );
    assert_eq!(
        workload.loop_tid(),
        workload.pid(),
        "the loop thread is the main thread"
    );
}

#[test]
fn spin_runs_on_cpu_for_wall_time() {
    let mut workload = Workload::start(WORKLOAD);
    let (pid, tid) = (workload.pid(), workload.loop_tid());
    let before = sched_stat(pid, tid);
    let done = workload.run("spin 100", TIMEOUT);
    let after = sched_stat(pid, tid);

    let handler_ns = done.handler_ns();
    assert!(
        handler_ns >= 100 * MS,
        "spin 100 returned after {handler_ns} ns"
    );
    assert!(
        handler_ns <= 100 * MS + OVERRUN_NS,
        "spin 100 took {handler_ns} ns"
    );
    // A thread that slept would show almost no CPU time. The bound leaves room for other
    // processes that take a share of the CPU.
    let on_cpu_ns = after.on_cpu_ns - before.on_cpu_ns;
    assert!(
        on_cpu_ns >= 30 * MS,
        "the loop thread ran {on_cpu_ns} ns during spin 100, so it did not spin"
    );
}

#[test]
fn sleep_waits_off_cpu() {
    let mut workload = Workload::start(WORKLOAD);
    let (pid, tid) = (workload.pid(), workload.loop_tid());
    let before = sched_stat(pid, tid);
    let done = workload.run("sleep 100", TIMEOUT);
    let after = sched_stat(pid, tid);

    let handler_ns = done.handler_ns();
    assert!(
        handler_ns >= 100 * MS,
        "sleep 100 returned after {handler_ns} ns"
    );
    assert!(
        handler_ns <= 100 * MS + OVERRUN_NS,
        "sleep 100 took {handler_ns} ns"
    );
    // The idle loop around the handler wakes every 10 ms and runs for microseconds.
    let on_cpu_ns = after.on_cpu_ns - before.on_cpu_ns;
    assert!(
        on_cpu_ns < 20 * MS,
        "the loop thread ran {on_cpu_ns} ns during sleep 100"
    );
}

#[test]
fn mutex_blocks_until_helper_unlocks() {
    let mut workload = Workload::start(WORKLOAD);
    let (pid, tid) = (workload.pid(), workload.loop_tid());
    let before = sched_stat(pid, tid);
    let done = workload.run("mutex 100", TIMEOUT);
    let after = sched_stat(pid, tid);

    let handler_ns = done.handler_ns();
    assert!(
        handler_ns >= 100 * MS,
        "mutex 100 returned after {handler_ns} ns"
    );
    assert!(
        handler_ns <= 100 * MS + OVERRUN_NS,
        "mutex 100 took {handler_ns} ns"
    );
    let on_cpu_ns = after.on_cpu_ns - before.on_cpu_ns;
    assert!(
        on_cpu_ns < 20 * MS,
        "the loop thread ran {on_cpu_ns} ns while it should block"
    );
}

#[test]
fn contend_waits_on_runqueue() {
    let mut workload = Workload::start(WORKLOAD);
    let (pid, tid) = (workload.pid(), workload.loop_tid());
    let before = sched_stat(pid, tid);
    let done = workload.run("contend 100 3", TIMEOUT);
    let after = sched_stat(pid, tid);

    let on_cpu_ns = after.on_cpu_ns - before.on_cpu_ns;
    let runqueue_ns = after.runqueue_ns - before.runqueue_ns;
    assert!(
        on_cpu_ns >= 100 * MS,
        "the loop thread ran only {on_cpu_ns} ns for contend 100 3"
    );
    assert!(
        on_cpu_ns <= 200 * MS,
        "the loop thread ran {on_cpu_ns} ns for contend 100 3"
    );
    // Four threads share one CPU, so the loop thread waits about 3 ns for each ns it runs.
    // Half of that leaves room for scheduler imprecision.
    assert!(
        runqueue_ns >= 150 * MS,
        "the loop thread waited only {runqueue_ns} ns on the run queue during contend 100 3"
    );
    let handler_ns = done.handler_ns();
    assert!(
        handler_ns >= on_cpu_ns + runqueue_ns / 2,
        "contend 100 3 took {handler_ns} ns of wall time, less than its CPU time plus half its run-queue wait"
    );
}

#[test]
fn contend_restores_affinity() {
    let mut workload = Workload::start(WORKLOAD);
    let (pid, tid) = (workload.pid(), workload.loop_tid());
    let before = cpus_allowed(pid, tid);
    workload.run("contend 20 1", TIMEOUT);
    assert_eq!(
        cpus_allowed(pid, tid),
        before,
        "CPU affinity of the loop thread after contend"
    );
}

#[test]
fn invalid_command_prints_error() {
    let mut workload = Workload::start(WORKLOAD);
    workload.send("spin later\n");
    match workload.next_message(TIMEOUT) {
        Message::Failed(failed) => assert!(
            failed.error.contains("spin later"),
            "the error does not name the command: {}",
            failed.error
        ),
        other => panic!("expected an error line, got {other:?}"),
    }
    // The loop goes on after an invalid command.
    workload.run("noop", TIMEOUT);
}

#[test]
fn noop_flood_is_answered_in_order() {
    const NOOPS: usize = 20_000;
    let mut workload = Workload::start(WORKLOAD);
    workload.send(&"noop\n".repeat(NOOPS));
    let mut previous_end_ns = 0;
    for index in 0..NOOPS {
        let done = workload.expect_done("noop", TIMEOUT);
        assert!(
            done.start_ns >= previous_end_ns,
            "noop {index} started at {} ns, before the previous one ended at {previous_end_ns} ns",
            done.start_ns
        );
        previous_end_ns = done.end_ns;
    }
}

#[test]
fn exit_command_ends_process() {
    let mut workload = Workload::start(WORKLOAD);
    workload.run("exit", TIMEOUT);
    let status = workload.close_stdin_and_wait(TIMEOUT);
    assert!(
        status.is_some_and(|status| status.success()),
        "the workload did not exit cleanly after `exit`: {status:?}"
    );
}

#[test]
fn end_of_input_ends_process() {
    let mut workload = Workload::start(WORKLOAD);
    // A last command without a newline still runs before the workload exits.
    workload.send("noop");
    let status = workload.close_stdin_and_wait(TIMEOUT);
    assert!(
        status.is_some_and(|status| status.success()),
        "the workload did not exit cleanly at end of input: {status:?}"
    );
    workload.expect_done("noop", TIMEOUT);
}
