//! Real-kernel lock scenarios: `lock-workload` threads deadlock or wait on locks on
//! purpose while `stalltrace record` runs, and the report must name the waits, their
//! holders and the circular waits.
//!
//! They need root and `STALLTRACE_BIN`. Run them one at a time:
//! `STALLTRACE_BIN=$PWD/target/release/stalltrace cargo test --release -p stalltrace-tests --test locks -- --test-threads=1`.
//! Every workload is killed with SIGKILL when its test ends, pass or fail.

use std::{collections::BTreeSet, fs, thread, time::Duration};

use stalltrace_tests::{
    locks::{
        format_stack, stack_has_function, LockEvent, LockRecording, LockRun, LockWorkload,
        OutputLine, ShmFile, SHM_MUTEX_OFFSETS, SYS_EPOLL_WAIT,
    },
    require_root, stalltrace_bin, TestDir,
};

const WORKLOAD: &str = env!("CARGO_BIN_EXE_lock-workload");
const THRESHOLD: &str = "50ms";
/// `--duration` of the deadlock recordings. The deadlock forms 0.6 s in (1.7 s after the
/// `hammer` phase), and the rest shows that stalltrace keeps reporting it as ongoing.
const DEADLOCK_CAPTURE: Duration = Duration::from_secs(4);
/// Wait between `attached` and the first command, so each loop thread has entered
/// `epoll_wait` since the BPF programs were attached (it re-enters every 10 ms when idle).
const SETTLE: Duration = Duration::from_millis(500);
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Maximum time from the last thread starting its wait to the live `lock cycle:` line:
/// 10 of stalltrace's 100 ms scans, for a loaded 2-CPU virtual machine.
const CYCLE_LINE_TIMEOUT: Duration = Duration::from_secs(1);
/// Maximum time from a stall's start (the loop's return from `epoll_wait`) to the first
/// event of the command it ran. Only an eventfd read, a channel receive and an uncontended
/// lock come between.
const START_SLACK_NS: u64 = 10_000_000;
/// How much earlier than the end of `--duration` the last scan that saw a deadlock may be.
const LAST_SCAN_SLACK_NS: u64 = 500_000_000;
/// Maximum time from a thread's `waiting` line to its futex wait. Normally microseconds;
/// the bound allows for preemption and hypervisor steal.
const WAIT_ENTRY_SLACK_NS: u64 = 100_000_000;
/// Tolerance between a cycle's `last_seen_ns` and the time its `waited_ns` was measured,
/// which belong to the same scan.
const SCAN_CLOCK_SLACK_NS: u64 = 20_000_000;

/// The `lock-workload` function that takes the second lock of a deadlock, where each
/// thread of a cycle blocks.
const SECOND_LOCK_SITE: &str = "take_second_lock";

/// How the `futex` identity of a wait must look.
#[derive(Debug, Clone)]
enum ExpectedFutex {
    /// `PID:0xADDR` with the waiter's pid and the wait's `uaddr`.
    Private,
    /// `shared:DEV:INODE:0xOFFSET` for this inode and file offset.
    Shared { inode: u64, offset: u64 },
}

/// One thread of an expected cycle and the lock it waits for.
#[derive(Debug, Clone)]
struct CycleMember {
    name: String,
    pid: u32,
    tid: u32,
    holder_pid: u32,
    holder_tid: u32,
    futex: ExpectedFutex,
    /// When the thread held its first lock, inside the stalled loop iteration.
    holding: LockEvent,
    /// When the thread was about to take its second lock.
    waiting: LockEvent,
}

/// A finished recording of a deadlock.
struct DeadlockRun {
    run: LockRun,
    members: Vec<CycleMember>,
    /// The first live `lock cycle:` line, if one came within CYCLE_LINE_TIMEOUT.
    cycle_line: Option<OutputLine>,
    /// Expected end of tracing: `attached` plus `--duration`.
    capture_end_ns: u64,
    _dir: TestDir,
}

/// Runs the `pthread-cycle` or `std-cycle` deadlock of the threads `names` under
/// `stalltrace record`. `before_deadlock` runs SETTLE after stalltrace attached and
/// before the `deadlock` command. Thread i waits for the lock of thread i + 1 (mod N).
fn record_in_process_deadlock(
    test: &str,
    args: &[&str],
    names: &[&str],
    before_deadlock: impl FnOnce(&mut LockWorkload),
) -> (DeadlockRun, LockWorkload) {
    let stalltrace = stalltrace_bin();
    let dir = TestDir::new(test);
    let record_dir = dir.join("record");
    fs::create_dir_all(&record_dir).expect("failed to create the record folder");

    let mut workload = LockWorkload::start(WORKLOAD, args);
    let pid = workload.pid();
    let recording = LockRecording::start(
        &stalltrace,
        &[pid],
        DEADLOCK_CAPTURE,
        Some(THRESHOLD),
        &record_dir,
    );
    let capture_end_ns = recording.attached_ns() + DEADLOCK_CAPTURE.as_nanos() as u64;
    thread::sleep(SETTLE);
    before_deadlock(&mut workload);

    workload.send("deadlock");
    let holding: Vec<LockEvent> = names
        .iter()
        .map(|name| workload.wait_event(name, "holding", EVENT_TIMEOUT))
        .collect();
    let waiting: Vec<LockEvent> = names
        .iter()
        .map(|name| workload.wait_event(name, "waiting", EVENT_TIMEOUT))
        .collect();
    let members: Vec<CycleMember> = names
        .iter()
        .zip(holding.into_iter().zip(waiting))
        .enumerate()
        .map(|(index, (name, (holding, waiting)))| CycleMember {
            name: name.to_string(),
            pid,
            tid: workload.tid(name),
            holder_pid: pid,
            holder_tid: workload.tid(names[(index + 1) % names.len()]),
            futex: ExpectedFutex::Private,
            holding,
            waiting,
        })
        .collect();

    let cycle_line = recording.wait_for_stdout("lock cycle:", CYCLE_LINE_TIMEOUT);
    for name in names {
        workload.assert_blocked_in_futex(name);
    }
    let run = recording.finish();
    eprintln!("report:\n{}", run.report);

    // The deadlock outlived tracing, so every report field describes a live deadlock.
    assert!(
        workload.is_running(),
        "the workload exited before stalltrace finished; report:\n{}",
        run.report
    );
    for name in names {
        workload.assert_blocked_in_futex(name);
    }
    let deadlock = DeadlockRun {
        run,
        members,
        cycle_line,
        capture_end_ns,
        _dir: dir,
    };
    (deadlock, workload)
}

/// Asserts that the report contains exactly one cycle, made of `members`, with holders of
/// `source`, still ongoing, and the futex waits, stalls and live line that go with it.
fn assert_single_cycle(deadlock: &DeadlockRun, source: &str) {
    let DeadlockRun {
        run,
        members,
        cycle_line,
        capture_end_ns,
        ..
    } = deadlock;
    let report = &run.report;
    let locks = &run.locks;
    let last_waiting_ns = members
        .iter()
        .map(|member| member.waiting.ns)
        .max()
        .expect("a cycle has members");

    // The live line.
    let Some(cycle_line) = cycle_line else {
        panic!(
            "stalltrace printed no `lock cycle:` line within {CYCLE_LINE_TIMEOUT:?} of the last thread starting its wait; report:\n{report}"
        );
    };
    for member in members {
        assert!(
            cycle_line.text.contains(&format!("tid {}", member.tid)),
            "the `lock cycle:` line does not name tid {} ({}): `{}`",
            member.tid,
            member.name,
            cycle_line.text
        );
    }
    let cycle_lines = run
        .stdout
        .iter()
        .filter(|line| line.text.starts_with("lock cycle:"))
        .count();
    assert_eq!(
        cycle_lines, 1,
        "one deadlock that lasts should print one `lock cycle:` line; stdout: {:?}",
        run.stdout
    );

    // The cycle.
    assert_eq!(
        locks.cycles.len(),
        1,
        "expected exactly one cycle; report:\n{report}"
    );
    let cycle = &locks.cycles[0];
    let expected_tids: BTreeSet<u32> = members.iter().map(|member| member.tid).collect();
    let cycle_tids: BTreeSet<u32> = cycle.tids.iter().copied().collect();
    assert_eq!(
        cycle_tids, expected_tids,
        "the cycle has other threads; report:\n{report}"
    );
    assert_eq!(
        cycle.tids.len(),
        members.len(),
        "the cycle lists a thread twice; report:\n{report}"
    );
    assert!(cycle.ongoing, "the cycle is not ongoing; report:\n{report}");
    assert!(
        cycle.first_seen_ns >= last_waiting_ns,
        "the cycle was first seen at {} ns, before the last thread started waiting at {last_waiting_ns} ns; report:\n{report}",
        cycle.first_seen_ns
    );
    assert!(
        cycle.first_seen_ns <= cycle_line.read_ns,
        "the cycle was first seen at {} ns, after its live line was read at {} ns; report:\n{report}",
        cycle.first_seen_ns,
        cycle_line.read_ns
    );
    assert!(
        cycle.last_seen_ns + LAST_SCAN_SLACK_NS >= *capture_end_ns,
        "the cycle was last seen at {} ns, more than {LAST_SCAN_SLACK_NS} ns before tracing ended at about {capture_end_ns} ns; report:\n{report}",
        cycle.last_seen_ns
    );
    let distinct_futexes: BTreeSet<&String> = cycle.futexes.iter().collect();
    assert_eq!(
        distinct_futexes.len(),
        members.len(),
        "the cycle should go through one futex per thread; report:\n{report}"
    );
    assert_eq!(
        cycle.edges.len(),
        members.len(),
        "the cycle should have one edge per thread; report:\n{report}"
    );

    for member in members {
        let name = &member.name;
        let edges: Vec<_> = cycle
            .edges
            .iter()
            .filter(|edge| edge.waiter == member.tid)
            .collect();
        assert_eq!(
            edges.len(),
            1,
            "expected one edge out of {name} (tid {}); report:\n{report}",
            member.tid
        );
        let edge = edges[0];
        assert_eq!(
            edge.holder, member.holder_tid,
            "wrong holder of the lock that {name} waits for; report:\n{report}"
        );
        assert_eq!(
            edge.waiter_pid, member.pid,
            "wrong waiter_pid of {name}; report:\n{report}"
        );
        assert_eq!(
            edge.holder_source, source,
            "holder_source of the edge out of {name}; report:\n{report}"
        );
        assert!(
            cycle.futexes.contains(&edge.futex),
            "the edge's futex {} is not among the cycle's futexes; report:\n{report}",
            edge.futex
        );
        // waited_ns is measured at the scan of last_seen_ns, and the wait began just after
        // the `waiting` line.
        let waited_at_most = cycle.last_seen_ns.saturating_sub(member.waiting.ns);
        assert!(
            edge.waited_ns <= waited_at_most + SCAN_CLOCK_SLACK_NS,
            "{name} waited {} ns by the report, longer than the {waited_at_most} ns since its `waiting` line; report:\n{report}",
            edge.waited_ns
        );
        assert!(
            edge.waited_ns + WAIT_ENTRY_SLACK_NS + SCAN_CLOCK_SLACK_NS >= waited_at_most,
            "{name} waited {} ns by the report, much shorter than the {waited_at_most} ns since its `waiting` line; report:\n{report}",
            edge.waited_ns
        );

        assert_futex_wait(run, member, &edge.futex, source);
        assert_cycle_stall(run, member);
    }
}

/// Asserts that the futex waits at the last scan show `member` waiting on `futex`,
/// held by its holder, who waits on a futex itself.
fn assert_futex_wait(run: &LockRun, member: &CycleMember, futex: &str, source: &str) {
    let report = &run.report;
    let name = &member.name;
    let waits = run.locks.waits_of(member.tid);
    assert_eq!(
        waits.len(),
        1,
        "expected one futex wait of {name} (tid {}); report:\n{report}",
        member.tid
    );
    let wait = waits[0];

    // The waiter and its futex.
    assert_eq!(
        wait.pid, member.pid,
        "pid of {name}'s wait; report:\n{report}"
    );
    assert_eq!(wait.comm, *name, "comm of {name}'s wait; report:\n{report}");
    assert!(
        wait.lock,
        "{name}'s wait is not marked as a lock wait; report:\n{report}"
    );
    assert_eq!(
        wait.futex, futex,
        "{name}'s futex wait and cycle edge name different futexes; report:\n{report}"
    );
    match &member.futex {
        ExpectedFutex::Private => assert_eq!(
            wait.futex,
            format!("{}:{:#x}", member.pid, wait.uaddr),
            "{name}'s futex identity does not match PID:0xADDR; report:\n{report}"
        ),
        ExpectedFutex::Shared { inode, offset } => {
            assert!(
                wait.futex.starts_with("shared:"),
                "{name}'s futex in shared memory is not named shared:...; report:\n{report}"
            );
            assert!(
                wait.futex.ends_with(&format!(":{inode}:{offset:#x}")),
                "{name}'s futex identity does not end with the file's inode {inode} and offset {offset:#x}; report:\n{report}"
            );
        }
    }
    assert!(
        wait.since_ns >= member.waiting.ns,
        "{name}'s wait started at {} ns, before its `waiting` line at {} ns; report:\n{report}",
        wait.since_ns,
        member.waiting.ns
    );

    // The holder.
    assert_eq!(
        wait.holder,
        Some(member.holder_tid),
        "holder of {name}'s lock; report:\n{report}"
    );
    assert_eq!(
        wait.holder_pid,
        Some(member.holder_pid),
        "holder_pid of {name}'s lock; report:\n{report}"
    );
    assert_eq!(
        wait.holder_source, source,
        "holder_source of {name}'s lock; report:\n{report}"
    );
    let holder_state = wait.holder_state.as_ref().map(|state| state.state.as_str());
    assert_eq!(
        holder_state,
        Some("waiting_on_futex"),
        "the holder of {name}'s lock waits on another lock; report:\n{report}"
    );

    assert!(
        stack_has_function(&wait.stack, SECOND_LOCK_SITE),
        "{name}'s wait stack does not show {SECOND_LOCK_SITE}:\n{}\nreport:\n{report}",
        format_stack(&wait.stack)
    );
}

/// Asserts that `member`'s deadlocked loop iteration is one ongoing stall with verdict
/// `lock_cycle` that began just before it took its first lock. Stalls of earlier commands,
/// such as `hammer` iterations that waited long for a CPU, must have ended before it.
fn assert_cycle_stall(run: &LockRun, member: &CycleMember) {
    let report = &run.report;
    let name = &member.name;
    let stalls = report.stalls_of_thread(member.pid, member.tid);
    let (ongoing, finished): (Vec<_>, Vec<_>) = stalls.into_iter().partition(|stall| stall.ongoing);
    assert_eq!(
        ongoing.len(),
        1,
        "expected one ongoing stall of {name} (tid {}); report:\n{report}",
        member.tid
    );
    for earlier in finished {
        assert!(
            earlier.end_ns() <= member.holding.ns,
            "{name} has a finished stall that ends at {} ns, after the deadlock began at {} ns; report:\n{report}",
            earlier.end_ns(),
            member.holding.ns
        );
    }
    let stall = ongoing[0];
    assert_eq!(
        stall.ended_by, None,
        "{name}'s ongoing stall has ended_by set; report:\n{report}"
    );
    assert_eq!(
        stall.verdict, "lock_cycle",
        "verdict of {name}'s stall; report:\n{report}"
    );
    assert!(
        stall.start_ns <= member.holding.ns
            && member.holding.ns - stall.start_ns <= START_SLACK_NS,
        "{name}'s stall starts at {} ns, not within {START_SLACK_NS} ns before its `holding` line at {} ns; report:\n{report}",
        stall.start_ns,
        member.holding.ns
    );
    assert!(
        stall.end_ns() > member.waiting.ns,
        "{name}'s stall ends at {} ns, before its `waiting` line at {} ns; report:\n{report}",
        stall.end_ns(),
        member.waiting.ns
    );

    // Nearly all of the stall is the wait for the second lock.
    let stacks = run.locks.ongoing_stalls_of(member.tid);
    let stack = stacks
        .first()
        .and_then(|stall| stall.stack.as_deref())
        .unwrap_or_default();
    assert!(
        stack_has_function(stack, SECOND_LOCK_SITE),
        "{name}'s stall stack does not show {SECOND_LOCK_SITE}:\n{}\nreport:\n{report}",
        format_stack(stack)
    );
}

#[test]
fn pthread_deadlock_two_threads() {
    let test = "pthread_deadlock_two_threads";
    if !require_root(test) {
        return;
    }
    let names = ["lock-a", "lock-b"];
    let (deadlock, _workload) =
        record_in_process_deadlock(test, &["pthread-cycle", "2"], &names, |_| {});
    assert_single_cycle(&deadlock, "exact");
}

#[test]
fn pthread_deadlock_three_threads() {
    let test = "pthread_deadlock_three_threads";
    if !require_root(test) {
        return;
    }
    let names = ["lock-a", "lock-b", "lock-c"];
    let (deadlock, _workload) =
        record_in_process_deadlock(test, &["pthread-cycle", "3"], &names, |_| {});
    assert_single_cycle(&deadlock, "exact");
}

#[test]
fn std_mutex_deadlock_inferred() {
    const HAMMER_MS: u64 = 1_000;

    let test = "std_mutex_deadlock_inferred";
    if !require_root(test) {
        return;
    }
    let names = ["lock-a", "lock-b"];
    let (deadlock, _workload) =
        record_in_process_deadlock(test, &["std-cycle"], &names, |workload| {
            // Both threads lock and unlock both mutexes with contention, so stalltrace
            // records futex traffic on both before the deadlock.
            workload.send(&format!("hammer {HAMMER_MS}"));
            for name in names {
                let hammered = workload.wait_event(
                    name,
                    "hammered",
                    EVENT_TIMEOUT + Duration::from_millis(HAMMER_MS),
                );
                let contended = hammered.count.unwrap_or(0);
                assert!(
                    contended > 0,
                    "{name} never found a mutex taken while hammering, so there was no contention"
                );
            }
        });
    assert_single_cycle(&deadlock, "inferred");
}

#[test]
fn shm_deadlock_two_processes() {
    let test = "shm_deadlock_two_processes";
    if !require_root(test) {
        return;
    }
    let stalltrace = stalltrace_bin();
    let dir = TestDir::new(test);
    let record_dir = dir.join("record");
    fs::create_dir_all(&record_dir).expect("failed to create the record folder");
    let shm = ShmFile::create(test);
    let path = shm.path().to_str().expect("the shm path is UTF-8");

    // Role a initializes the mutexes before its start line, so b starts after it.
    let mut first = LockWorkload::start(WORKLOAD, &["shm-cycle", path, "a"]);
    let mut second = LockWorkload::start(WORKLOAD, &["shm-cycle", path, "b"]);
    let recording = LockRecording::start(
        &stalltrace,
        &[first.pid(), second.pid()],
        DEADLOCK_CAPTURE,
        Some(THRESHOLD),
        &record_dir,
    );
    let capture_end_ns = recording.attached_ns() + DEADLOCK_CAPTURE.as_nanos() as u64;
    thread::sleep(SETTLE);

    first.send("deadlock");
    second.send("deadlock");
    let first_holding = first.wait_event("shm-a", "holding", EVENT_TIMEOUT);
    let second_holding = second.wait_event("shm-b", "holding", EVENT_TIMEOUT);
    let first_waiting = first.wait_event("shm-a", "waiting", EVENT_TIMEOUT);
    let second_waiting = second.wait_event("shm-b", "waiting", EVENT_TIMEOUT);

    let cycle_line = recording.wait_for_stdout("lock cycle:", CYCLE_LINE_TIMEOUT);
    first.assert_blocked_in_futex("shm-a");
    second.assert_blocked_in_futex("shm-b");
    let run = recording.finish();
    eprintln!("report:\n{}", run.report);
    assert!(
        first.is_running() && second.is_running(),
        "a workload exited before stalltrace finished; report:\n{}",
        run.report
    );
    first.assert_blocked_in_futex("shm-a");
    second.assert_blocked_in_futex("shm-b");

    // a holds mutex 0 and waits for mutex 1. b holds mutex 1 and waits for mutex 0.
    let inode = shm.inode();
    let members = vec![
        CycleMember {
            name: "shm-a".into(),
            pid: first.pid(),
            tid: first.tid("shm-a"),
            holder_pid: second.pid(),
            holder_tid: second.tid("shm-b"),
            futex: ExpectedFutex::Shared {
                inode,
                offset: SHM_MUTEX_OFFSETS[1],
            },
            holding: first_holding,
            waiting: first_waiting,
        },
        CycleMember {
            name: "shm-b".into(),
            pid: second.pid(),
            tid: second.tid("shm-b"),
            holder_pid: first.pid(),
            holder_tid: first.tid("shm-a"),
            futex: ExpectedFutex::Shared {
                inode,
                offset: SHM_MUTEX_OFFSETS[0],
            },
            holding: second_holding,
            waiting: second_waiting,
        },
    ];
    let deadlock = DeadlockRun {
        run,
        members,
        cycle_line,
        capture_end_ns,
        _dir: dir,
    };
    assert_single_cycle(&deadlock, "exact");
    let futexes = &deadlock.run.locks.cycles[0].futexes;
    assert!(
        futexes.iter().all(|futex| futex.starts_with("shared:")),
        "the cycle's futexes are not all in shared memory: {futexes:?}"
    );
}

#[test]
fn tokio_guard_across_await() {
    let test = "tokio_guard_across_await";
    if !require_root(test) {
        return;
    }
    check_guard_across_await(test, "tokio-guard");
}

/// Checks the same deadlock in a runtime that was idle in one `epoll_wait` without
/// timeout since before stalltrace attached, as an idle tokio server is.
#[test]
fn tokio_idle_runtime_guard_across_await() {
    let test = "tokio_idle_runtime_guard_across_await";
    if !require_root(test) {
        return;
    }
    check_guard_across_await(test, "tokio-guard-idle");
}

/// Records `lock-workload MODE` while its `guard` command deadlocks the runtime thread on
/// itself, and checks the stall, its stack and the futex wait.
fn check_guard_across_await(test: &str, mode: &str) {
    const CAPTURE: Duration = Duration::from_secs(3);
    /// Tracing time left after the thread blocked, so several scans see the wait.
    const OBSERVE: Duration = Duration::from_millis(1_000);

    let stalltrace = stalltrace_bin();
    let dir = TestDir::new(test);
    let record_dir = dir.join("record");
    fs::create_dir_all(&record_dir).expect("failed to create the record folder");

    let mut workload = LockWorkload::start(WORKLOAD, &[mode]);
    let pid = workload.pid();
    let tid = workload.tid("tokio-loop");
    let recording =
        LockRecording::start(&stalltrace, &[pid], CAPTURE, Some(THRESHOLD), &record_dir);
    thread::sleep(SETTLE);
    workload.send("guard");
    let holding = workload.wait_event("tokio-loop", "holding", EVENT_TIMEOUT);
    workload.wait_event("tokio-loop", "waiting", EVENT_TIMEOUT);
    thread::sleep(OBSERVE);
    workload.assert_blocked_in_futex("tokio-loop");
    let run = recording.finish();
    let report = &run.report;
    eprintln!("report:\n{report}");
    assert!(
        workload.is_running(),
        "the workload exited before stalltrace finished; report:\n{report}"
    );
    workload.assert_blocked_in_futex("tokio-loop");

    let stalls = run.locks.ongoing_stalls_of(tid);
    assert_eq!(
        stalls.len(),
        1,
        "expected one ongoing stall of tokio-loop (tid {tid}); report:\n{report}"
    );
    let stall = stalls[0];
    assert_eq!(stall.pid, pid, "pid of the stall; report:\n{report}");
    assert!(
        ["futex", "lock_cycle"].contains(&stall.verdict.as_str()),
        "verdict {} is neither futex nor lock_cycle; report:\n{report}",
        stall.verdict
    );
    assert!(
        stall.start_ns <= holding.ns && holding.ns - stall.start_ns <= START_SLACK_NS,
        "the stall starts at {} ns, not within {START_SLACK_NS} ns before the `holding` line at {} ns; report:\n{report}",
        stall.start_ns,
        holding.ns
    );
    let stack = stall.stack.as_deref().unwrap_or_default();
    assert!(
        stack_has_function(stack, "lock_site_second_task"),
        "the stall's stack does not show the lock site lock_site_second_task:\n{}\nreport:\n{report}",
        format_stack(stack)
    );

    let waits = run.locks.waits_of(tid);
    assert_eq!(
        waits.len(),
        1,
        "expected one futex wait of tokio-loop; report:\n{report}"
    );
    let wait = waits[0];
    assert!(
        wait.lock,
        "the wait on a locked std::sync::Mutex is not marked as a lock wait; report:\n{report}"
    );
    assert!(
        stack_has_function(&wait.stack, "lock_site_second_task"),
        "the futex wait's stack does not show lock_site_second_task:\n{}\nreport:\n{report}",
        format_stack(&wait.stack)
    );
    // The thread holds the lock itself, so no other thread may be named as the holder.
    assert!(
        wait.holder.is_none() || wait.holder == Some(tid),
        "another thread is named as holder of the lock that tokio-loop holds; report:\n{report}"
    );
    for cycle in &run.locks.cycles {
        assert_eq!(
            cycle.tids,
            vec![tid],
            "a cycle names other threads than tokio-loop; report:\n{report}"
        );
    }
}

#[test]
fn holder_idle_in_its_loop() {
    const CAPTURE: Duration = Duration::from_secs(3);
    /// Time for the worker to return to `epoll_wait` after it took the lock.
    const BACK_TO_LOOP: Duration = Duration::from_millis(200);
    /// Tracing time left after the waiter blocked, so several scans see the wait.
    const OBSERVE: Duration = Duration::from_millis(1_000);

    let test = "holder_idle_in_its_loop";
    if !require_root(test) {
        return;
    }
    let stalltrace = stalltrace_bin();
    let dir = TestDir::new(test);
    let record_dir = dir.join("record");
    fs::create_dir_all(&record_dir).expect("failed to create the record folder");

    let mut workload = LockWorkload::start(WORKLOAD, &["holder-idle"]);
    let pid = workload.pid();
    let worker = workload.tid("lock-worker");
    let waiter = workload.tid("lock-waiter");
    let recording =
        LockRecording::start(&stalltrace, &[pid], CAPTURE, Some(THRESHOLD), &record_dir);
    thread::sleep(SETTLE);
    workload.send("hold");
    workload.wait_event("lock-worker", "holding", EVENT_TIMEOUT);
    thread::sleep(BACK_TO_LOOP);
    workload.send("take");
    let waiting = workload.wait_event("lock-waiter", "waiting", EVENT_TIMEOUT);
    thread::sleep(OBSERVE);
    workload.assert_blocked_in_futex("lock-waiter");
    // The worker wakes every 10 ms, so a single read may catch it running.
    let worker_syscalls = workload.sample_syscalls("lock-worker", 20, Duration::from_millis(5));
    assert!(
        worker_syscalls.contains(&Some(SYS_EPOLL_WAIT)),
        "the worker is not back in epoll_wait while it holds the lock: {worker_syscalls:?}"
    );
    let run = recording.finish();
    let report = &run.report;
    eprintln!("report:\n{report}");
    assert!(
        workload.is_running(),
        "the workload exited before stalltrace finished; report:\n{report}"
    );

    let waits = run.locks.waits_of(waiter);
    assert_eq!(
        waits.len(),
        1,
        "expected one futex wait of lock-waiter (tid {waiter}); report:\n{report}"
    );
    let wait = waits[0];
    assert!(
        wait.lock,
        "the wait is not marked as a lock wait; report:\n{report}"
    );
    assert_eq!(wait.holder, Some(worker), "holder; report:\n{report}");
    assert_eq!(wait.holder_pid, Some(pid), "holder_pid; report:\n{report}");
    assert_eq!(
        wait.holder_source, "exact",
        "holder_source; report:\n{report}"
    );
    let holder_state = wait.holder_state.as_ref().map(|state| state.state.as_str());
    assert_eq!(
        holder_state,
        Some("idle_in_loop"),
        "the holder waits in its own epoll loop; report:\n{report}"
    );
    assert!(
        wait.since_ns >= waiting.ns,
        "the wait started at {} ns, before the `waiting` line at {} ns; report:\n{report}",
        wait.since_ns,
        waiting.ns
    );

    let stalls = report.stalls_of_thread(pid, waiter);
    assert_eq!(
        stalls.len(),
        1,
        "expected one stall of lock-waiter; report:\n{report}"
    );
    let stall = stalls[0];
    assert!(
        stall.ongoing,
        "the waiter's stall is not ongoing; report:\n{report}"
    );
    assert_eq!(stall.verdict, "futex", "verdict; report:\n{report}");
    assert!(
        stall.start_ns <= waiting.ns && waiting.ns - stall.start_ns <= START_SLACK_NS,
        "the stall starts at {} ns, not within {START_SLACK_NS} ns before the `waiting` line at {} ns; report:\n{report}",
        stall.start_ns,
        waiting.ns
    );
    assert!(
        report.stalls_of_thread(pid, worker).is_empty(),
        "the worker, whose iterations are short, has stalls; report:\n{report}"
    );
    assert!(
        run.locks.cycles.is_empty(),
        "a wait on an idle holder is no cycle; report:\n{report}"
    );
}

#[test]
fn tokio_runtimes_no_false_alarms() {
    const IDLE: Duration = Duration::from_secs(3);
    const BUSY_MS: u64 = 3_000;
    /// Fewer tasks than this means the busy phase hardly ran (a 2-CPU machine runs
    /// hundreds of thousands in 3 s).
    const MIN_TASKS: u64 = 10_000;
    const CAPTURE: Duration = Duration::from_millis(7_500);

    let test = "tokio_runtimes_no_false_alarms";
    if !require_root(test) {
        return;
    }
    let stalltrace = stalltrace_bin();
    let dir = TestDir::new(test);
    let record_dir = dir.join("record");
    fs::create_dir_all(&record_dir).expect("failed to create the record folder");

    let mut workload = LockWorkload::start(WORKLOAD, &["tokio-busy"]);
    let pid = workload.pid();
    let workers = ["tokio-worker-0", "tokio-worker-1"];
    let recording =
        LockRecording::start(&stalltrace, &[pid], CAPTURE, Some(THRESHOLD), &record_dir);
    let capture_end_ns = recording.attached_ns() + CAPTURE.as_nanos() as u64;

    // Idle: a worker that parks in epoll_wait is a loop thread for stalltrace.
    thread::sleep(IDLE / 2);
    let in_epoll = workers
        .iter()
        .filter(|name| {
            workload
                .sample_syscalls(name, 10, Duration::from_millis(10))
                .contains(&Some(SYS_EPOLL_WAIT))
        })
        .count();
    thread::sleep(IDLE / 2);

    workload.send(&format!("busy {BUSY_MS}"));
    let done = workload.wait_event(
        "main",
        "busy-done",
        EVENT_TIMEOUT + Duration::from_millis(BUSY_MS),
    );
    let run = recording.finish();
    let report = &run.report;
    eprintln!("report:\n{report}");

    assert!(
        in_epoll >= 1,
        "no idle tokio worker waited in epoll_wait, so none was a loop thread to check"
    );
    let tasks = done.count.unwrap_or(0);
    assert!(
        tasks >= MIN_TASKS,
        "the busy phase ran {tasks} tasks, fewer than {MIN_TASKS}"
    );
    assert!(
        done.ns < capture_end_ns,
        "the busy phase ended at {} ns, after tracing ended at about {capture_end_ns} ns",
        done.ns
    );
    assert_eq!(
        report.drops, 0,
        "events were dropped, so the result is incomplete; report:\n{report}"
    );
    let stalls = report.stalls_of_process(pid);
    assert!(
        stalls.is_empty(),
        "a healthy tokio runtime has stalls at {THRESHOLD}; report:\n{report}"
    );
    assert!(
        run.locks.cycles.is_empty(),
        "a healthy tokio runtime has lock cycles; report:\n{report}"
    );
}
