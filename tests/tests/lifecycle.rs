//! Real-kernel checks of stalltrace's lifecycle and of how it rejects bad input: stops by
//! signal, by the traced process's exit and by errors, the report each stop leaves, the
//! BPF programs it must not leave behind, and the errors for invalid arguments and files.
//!
//! Tests that load BPF programs need root and `STALLTRACE_BIN`; they print `skipped: ...`
//! without root. Run them one at a time (`--test-threads=1`), because they measure time
//! and count the host's loaded BPF programs.

use std::{
    collections::BTreeSet,
    fs,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use stalltrace_tests::{
    analyze,
    cli::{
        self, kernel_program_name, loaded_stalltrace_programs, program_ids_held_by,
        wait_for_programs_unloaded, Output, Running, PROGRAM_NAMES,
    },
    monotonic_ns, require_root, stalltrace_bin, Recording, Report, Stall, TestDir, Workload,
};

const WORKLOAD: &str = env!("CARGO_BIN_EXE_loop-workload");
const MS: u64 = 1_000_000;
const SECOND_NS: u64 = 1_000_000_000;
/// Maximum wait for stalltrace to print `attached`. Loading and verifying the BPF
/// programs is the slow part.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed past `--duration` for detaching and writing the report.
const EXIT_GRACE: Duration = Duration::from_secs(30);
/// Wait between `attached` and a command, so the loop has entered `epoll_wait` at least
/// once since the BPF programs were attached (it re-enters every 10 ms when idle).
const SETTLE: Duration = Duration::from_millis(500);
const HANDLER_TIMEOUT: Duration = Duration::from_secs(10);
/// Maximum run time of a command that should fail at once on bad input.
const BAD_INPUT_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed for the kernel to free a program after the last file descriptor that
/// refers to it closes.
const UNLOAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Maximum time from a stall's start (the loop's return from `epoll_wait`) to the start
/// of the handler that caused it: a `read` of stdin and parsing, unless the vCPU is
/// preempted or stolen.
const START_SLACK_NS: u64 = 5_000_000;

// ---------------------------------------------------------------------------------------
// Helpers.

/// Starts `stalltrace ARGS` and waits until it prints `attached`.
fn start_attached(args: &[String]) -> Running {
    let mut stalltrace = Running::start(&stalltrace_bin(), args);
    assert!(
        stalltrace.wait_for_stderr("attached", ATTACH_TIMEOUT),
        "stalltrace printed no `attached` line within {ATTACH_TIMEOUT:?}; output:\n{}",
        stalltrace.output_text()
    );
    stalltrace
}

/// Arguments of `stalltrace record` for one process with a 50 ms threshold.
fn record_args(out_dir: &Path, duration: &str, pid: u32) -> Vec<String> {
    vec![
        "record".into(),
        "--duration".into(),
        duration.into(),
        "-o".into(),
        out_dir.display().to_string(),
        "--pid".into(),
        pid.to_string(),
        "--threshold".into(),
        "50ms".into(),
    ]
}

/// Asserts that the programs that process `pid` has open include every stalltrace program
/// name, so that a later check for leftovers has something to find, and returns their IDs.
fn assert_holds_every_program(pid: u32) -> BTreeSet<u32> {
    let open_ids = program_ids_held_by(pid);
    let loaded = loaded_stalltrace_programs();
    let held_names: BTreeSet<&str> = loaded
        .iter()
        .filter(|(id, _)| open_ids.contains(id))
        .map(|(_, name)| name.as_str())
        .collect();
    for name in PROGRAM_NAMES {
        let kernel_name = kernel_program_name(name);
        assert!(
            held_names.contains(kernel_name),
            "stalltrace (pid {pid}) holds no BPF program named `{kernel_name}`; it has program IDs {open_ids:?} open, and the stalltrace programs loaded are {loaded:?}"
        );
    }
    open_ids
}

/// Asserts that none of the programs `ids`, which a stalltrace process held, is still
/// loaded after it exited. Programs of the same names that another process loaded, such
/// as a second stalltrace, do not count.
fn assert_programs_unloaded(ids: &BTreeSet<u32>, context: &str) {
    let remaining = wait_for_programs_unloaded(ids, UNLOAD_TIMEOUT);
    assert!(
        remaining.is_empty(),
        "{context}: BPF programs that stalltrace held are still loaded {UNLOAD_TIMEOUT:?} after it exited (ID and name): {remaining:?}"
    );
}

/// Asserts that `output` is a failure with exactly one `stalltrace: error:` line, and
/// returns that line.
fn single_error_line<'a>(output: &'a Output, context: &str) -> &'a str {
    assert!(
        !output.status.success(),
        "{context}: stalltrace succeeded; {}",
        output.describe()
    );
    let errors = output.error_lines();
    assert_eq!(
        errors.len(),
        1,
        "{context}: expected one `stalltrace: error:` line; {}",
        output.describe()
    );
    errors[0]
}

/// Returns a PID that no process has: the PID of a child that has exited and been reaped.
fn unused_pid() -> u32 {
    let mut child = Command::new("true")
        .spawn()
        .expect("failed to start `true`");
    let pid = child.id();
    child.wait().expect("failed to wait for `true`");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "PID {pid} was reused at once"
    );
    pid
}

/// Returns the stall of `tid` in a `watch --json` line, if the line has the event `event`.
fn json_line_stall(line: &serde_json::Value, event: &str, tid: u32) -> Option<Stall> {
    if line.get("event")?.as_str()? != event {
        return None;
    }
    let stall: Stall = serde_json::from_value(line.get("stall")?.clone()).ok()?;
    (stall.tid == tid).then_some(stall)
}

// ---------------------------------------------------------------------------------------
// Stops by signal and by the traced process's exit.

/// Records a workload whose loop spins for 5 s, stops stalltrace with `signal` 1.5 s into
/// the spin, and checks the report and that no BPF program is left.
fn check_signal_stop(test: &str, signal: libc::c_int, signal_name: &str) {
    if !require_root(test) {
        return;
    }
    let dir = TestDir::new(test);
    let record_dir = dir.join("record");
    let mut workload = Workload::start(WORKLOAD);

    let mut stalltrace = start_attached(&record_args(&record_dir, "60s", workload.pid()));
    let mut own_program_ids = assert_holds_every_program(stalltrace.pid());
    thread::sleep(SETTLE);
    workload.send("spin 5000\n");
    thread::sleep(Duration::from_millis(1500));
    stalltrace.signal(signal);
    let signalled = Instant::now();
    let signalled_ns = monotonic_ns();

    let (status, held_until_exit) = stalltrace.wait_collecting_program_ids(Duration::from_secs(10));
    own_program_ids.extend(held_until_exit);
    let Some(status) = status else {
        panic!(
            "stalltrace did not exit within 10 s of {signal_name}; output:\n{}",
            stalltrace.output_text()
        );
    };
    eprintln!(
        "stalltrace exited {:?} after {signal_name} with {status}",
        signalled.elapsed()
    );
    assert!(
        status.success(),
        "stalltrace exited with {status} after {signal_name}; output:\n{}",
        stalltrace.output_text()
    );
    assert_programs_unloaded(&own_program_ids, &format!("after {signal_name}"));

    let report = Report::load(&record_dir.join("report.json"));
    eprintln!("report:\n{report}");
    let stalls = report.stalls_of_thread(workload.pid(), workload.loop_tid());
    assert_eq!(
        stalls.len(),
        1,
        "expected one stall of loop thread {}; report:\n{report}",
        workload.loop_tid()
    );
    let stall = stalls[0];
    assert!(
        stall.ongoing,
        "the stall of the 5 s spin, stopped 1.5 s in, is not marked ongoing; report:\n{report}"
    );
    assert_eq!(
        stall.ended_by, None,
        "an ongoing stall has no end; report:\n{report}"
    );
    assert!(
        stall.duration_ns >= SECOND_NS,
        "the ongoing stall lasted {:.1} ms, below 1 s; report:\n{report}",
        stall.duration_ns as f64 / MS as f64
    );
    assert!(
        stall.end_ns() <= monotonic_ns(),
        "the ongoing stall ends at {} ns, in the future; report:\n{report}",
        stall.end_ns()
    );
    assert_eq!(
        stall.breakdown_ns.total(),
        stall.duration_ns,
        "the breakdown does not add up to the stall duration; report:\n{report}"
    );

    // The spin goes on after stalltrace stopped, so its handler started before the
    // stall's last scan and ends after it.
    let done = workload.expect_done("spin 5000", HANDLER_TIMEOUT);
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
        stall.end_ns() < done.end_ns,
        "the ongoing stall ends at {} ns, after the spin ended at {} ns; report:\n{report}",
        stall.end_ns(),
        done.end_ns
    );
    assert!(
        signalled_ns < done.end_ns,
        "the spin ended before {signal_name} was sent, so the stall was not ongoing"
    );
}

#[test]
fn sigterm_writes_report_and_detaches() {
    check_signal_stop(
        "sigterm_writes_report_and_detaches",
        libc::SIGTERM,
        "SIGTERM",
    );
}

#[test]
fn sigint_writes_report_and_detaches() {
    check_signal_stop("sigint_writes_report_and_detaches", libc::SIGINT, "SIGINT");
}

#[test]
fn thread_exit_ends_stall() {
    let test = "thread_exit_ends_stall";
    if !require_root(test) {
        return;
    }
    let dir = TestDir::new(test);
    let record_dir = dir.join("record");
    fs::create_dir_all(&record_dir).expect("failed to create the record folder");
    let mut workload = Workload::start(WORKLOAD);
    let (pid, loop_tid) = (workload.pid(), workload.loop_tid());

    let recording = Recording::start(
        &stalltrace_bin(),
        pid,
        Duration::from_secs(5),
        Some("50ms"),
        &record_dir,
    );
    thread::sleep(SETTLE);
    workload.send("spin 3000\n");
    thread::sleep(Duration::from_secs(1));
    // Drop sends SIGKILL and reaps the workload, 1 s into its 3 s spin.
    drop(workload);
    let report = recording.finish();
    eprintln!("report:\n{report}");

    let stalls = report.stalls_of_thread(pid, loop_tid);
    assert_eq!(
        stalls.len(),
        1,
        "expected one stall of loop thread {loop_tid}; report:\n{report}"
    );
    let stall = stalls[0];
    assert_eq!(
        stall.ended_by.as_deref(),
        Some("exit"),
        "a stall cut by SIGKILL ends by the thread's exit; report:\n{report}"
    );
    assert!(
        !stall.ongoing,
        "the stall is marked ongoing; report:\n{report}"
    );
    assert!(
        (500 * MS..=2_500 * MS).contains(&stall.duration_ns),
        "the stall lasted {:.1} ms, outside 500..=2500 ms for a kill 1 s into the spin; report:\n{report}",
        stall.duration_ns as f64 / MS as f64
    );
    assert_eq!(
        stall.breakdown_ns.total(),
        stall.duration_ns,
        "the breakdown does not add up to the stall duration; report:\n{report}"
    );
}

#[test]
fn target_exit_stops_recording() {
    let test = "target_exit_stops_recording";
    if !require_root(test) {
        return;
    }
    let dir = TestDir::new(test);
    let record_dir = dir.join("record");
    let mut workload = Workload::start(WORKLOAD);

    let mut stalltrace = start_attached(&record_args(&record_dir, "60s", workload.pid()));
    let mut own_program_ids = assert_holds_every_program(stalltrace.pid());
    thread::sleep(Duration::from_secs(1));
    workload.run("exit", HANDLER_TIMEOUT);
    // Reaping the workload matters: a zombie still has a /proc entry.
    let exit = workload.close_stdin_and_wait(Duration::from_secs(10));
    assert!(exit.is_some(), "the workload did not exit after `exit`");
    let exited = Instant::now();

    let (status, held_until_exit) = stalltrace.wait_collecting_program_ids(Duration::from_secs(5));
    own_program_ids.extend(held_until_exit);
    let Some(status) = status else {
        panic!(
            "stalltrace still runs 5 s after the only traced process exited; output:\n{}",
            stalltrace.output_text()
        );
    };
    eprintln!(
        "stalltrace exited {:?} after the workload with {status}",
        exited.elapsed()
    );
    assert_programs_unloaded(&own_program_ids, "after the traced process exited");
    assert!(
        status.success(),
        "stalltrace exited with {status}; output:\n{}",
        stalltrace.output_text()
    );
    assert!(
        stalltrace
            .stderr_lines()
            .iter()
            .any(|line| line.contains("every traced process has exited")),
        "stalltrace did not say why it stopped; output:\n{}",
        stalltrace.output_text()
    );
    let report = Report::load(&record_dir.join("report.json"));
    assert!(
        report.duration_ns < 10 * SECOND_NS,
        "the report covers {:.1} s, though the recording stopped about 1 s after it attached; report:\n{report}",
        report.duration_ns as f64 / SECOND_NS as f64
    );
}

// ---------------------------------------------------------------------------------------
// Bad input.

#[test]
fn not_root_is_rejected() {
    let dir = TestDir::new("not_root_is_rejected");
    let out_dir = dir.join("record");
    let stalltrace = stalltrace_bin();
    let args: Vec<String> = vec![
        "record".into(),
        "--duration".into(),
        "5s".into(),
        "-o".into(),
        out_dir.display().to_string(),
    ];
    // SAFETY: geteuid has no preconditions and cannot fail.
    let output = if unsafe { libc::geteuid() } == 0 {
        // Run as `nobody`, without root's groups or capabilities.
        let mut setpriv_args: Vec<String> = vec![
            "--reuid=65534".into(),
            "--regid=65534".into(),
            "--clear-groups".into(),
            stalltrace.display().to_string(),
        ];
        setpriv_args.extend(args);
        cli::run(Path::new("setpriv"), &setpriv_args, BAD_INPUT_TIMEOUT)
    } else {
        cli::run(&stalltrace, &args, BAD_INPUT_TIMEOUT)
    };

    let error = single_error_line(&output, "not root");
    assert!(
        error.contains("root"),
        "the error does not mention root: `{error}`"
    );
    assert!(
        !out_dir.join("report.json").exists(),
        "stalltrace wrote a report without root"
    );
}

#[test]
fn unknown_pid_is_rejected() {
    let test = "unknown_pid_is_rejected";
    if !require_root(test) {
        return;
    }
    let dir = TestDir::new(test);
    let out_dir = dir.join("record");
    let pid = unused_pid();

    let output = cli::run(
        &stalltrace_bin(),
        &record_args(&out_dir, "5s", pid),
        BAD_INPUT_TIMEOUT,
    );

    let error = single_error_line(&output, "unknown PID");
    assert!(
        error.contains(&format!("process {pid} not found")),
        "the error does not say `process {pid} not found`: `{error}`"
    );
    assert!(
        !out_dir.join("report.json").exists(),
        "stalltrace wrote a report for an unknown PID"
    );
}

#[test]
fn invalid_durations_are_rejected() {
    let dir = TestDir::new("invalid_durations_are_rejected");
    let out_dir = dir.join("record").display().to_string();
    // (arguments after `record`, the invalid value)
    let cases: [(&[&str], &str); 3] = [
        (&["--duration", "1s", "--threshold", "5"], "5"),
        (&["--duration", "3h"], "3h"),
        (&["--duration", "1s", "--threshold", "0ms"], "0ms"),
    ];
    for (case_args, value) in cases {
        let mut args: Vec<&str> = vec!["record", "-o", &out_dir];
        args.extend_from_slice(case_args);
        let output = cli::run(&stalltrace_bin(), &args, BAD_INPUT_TIMEOUT);
        assert!(
            !output.status.success(),
            "`{}` was accepted; {}",
            args.join(" "),
            output.describe()
        );
        assert!(
            output.stderr.contains("invalid duration"),
            "`{}`: stderr does not say `invalid duration`; {}",
            args.join(" "),
            output.describe()
        );
        assert!(
            output.stderr.contains(value),
            "`{}`: stderr does not name the value `{value}`; {}",
            args.join(" "),
            output.describe()
        );
    }
}

#[test]
fn unwritable_output_is_rejected() {
    let test = "unwritable_output_is_rejected";
    if !require_root(test) {
        return;
    }
    // procfs has no room for new folders, not even for root.
    let out_dir = "/proc/stalltrace-test";
    let workload = Workload::start(WORKLOAD);

    let mut stalltrace = Running::start(
        &stalltrace_bin(),
        &record_args(Path::new(out_dir), "60s", workload.pid()),
    );
    let (status, own_program_ids) = stalltrace.wait_collecting_program_ids(BAD_INPUT_TIMEOUT);
    let Some(status) = status else {
        panic!(
            "stalltrace with an unwritable output folder still runs after {BAD_INPUT_TIMEOUT:?}; output:\n{}",
            stalltrace.output_text()
        );
    };
    let output = Output {
        status,
        stdout: stalltrace.stdout_lines().join("\n"),
        stderr: stalltrace.stderr_lines().join("\n"),
    };

    let error = single_error_line(&output, "unwritable output folder");
    assert!(
        error.contains(out_dir),
        "the error does not name {out_dir}: `{error}`"
    );
    eprintln!("stalltrace had BPF program IDs {own_program_ids:?} open before it failed");
    assert_programs_unloaded(&own_program_ids, "after an unwritable output folder");
}

#[test]
fn foreign_capture_is_rejected() {
    let dir = TestDir::new("foreign_capture_is_rejected");
    let capture = dir.join("report.json");
    fs::write(&capture, "{\"version\": 1, \"stalls\": []}\n").expect("failed to write the file");
    let out_dir = dir.join("analysis");

    let args = vec![
        "analyze".to_string(),
        capture.display().to_string(),
        "-o".into(),
        out_dir.display().to_string(),
    ];
    let output = cli::run(&stalltrace_bin(), &args, BAD_INPUT_TIMEOUT);

    let error = single_error_line(&output, "foreign capture");
    assert!(
        error.contains("not a stalltrace capture"),
        "the error does not say `not a stalltrace capture`: `{error}`"
    );
    assert!(
        !out_dir.join("report.json").exists(),
        "analyze wrote a report for a foreign file"
    );
}

#[test]
fn empty_capture_is_rejected() {
    let dir = TestDir::new("empty_capture_is_rejected");
    let capture = dir.join("capture");
    fs::write(&capture, b"").expect("failed to write the file");
    let out_dir = dir.join("analysis");

    let args = vec![
        "analyze".to_string(),
        capture.display().to_string(),
        "-o".into(),
        out_dir.display().to_string(),
    ];
    let output = cli::run(&stalltrace_bin(), &args, BAD_INPUT_TIMEOUT);

    let error = single_error_line(&output, "empty capture");
    assert!(
        error.contains("not a stalltrace capture"),
        "the error does not say `not a stalltrace capture`: `{error}`"
    );
    assert!(
        error.contains(&capture.display().to_string()),
        "the error does not name the file: `{error}`"
    );
    assert!(
        !out_dir.join("report.json").exists(),
        "analyze wrote a report for an empty file"
    );
}

#[test]
fn truncated_capture_keeps_records() {
    const CUT_BYTES: usize = 10;

    let test = "truncated_capture_keeps_records";
    if !require_root(test) {
        return;
    }
    let stalltrace = stalltrace_bin();
    let dir = TestDir::new(test);
    let record_dir = dir.join("record");
    fs::create_dir_all(&record_dir).expect("failed to create the record folder");
    let mut workload = Workload::start(WORKLOAD);

    // Three stalls that end well before the recording does.
    let recording = Recording::start(
        &stalltrace,
        workload.pid(),
        Duration::from_secs(3),
        Some("50ms"),
        &record_dir,
    );
    thread::sleep(SETTLE);
    for _ in 0..3 {
        workload.run("sleep 100", HANDLER_TIMEOUT);
        thread::sleep(Duration::from_millis(200));
    }
    let recorded = recording.finish();

    let full_dir = dir.join("full");
    fs::create_dir_all(&full_dir).expect("failed to create the folder");
    let full = analyze(&stalltrace, &record_dir.join("capture"), &full_dir);
    assert!(
        full.stalls.len() >= 3,
        "the whole capture has fewer than the 3 stalls the workload made; recorded:\n{recorded}\nreplayed:\n{full}"
    );
    assert!(
        !full.capture_truncated,
        "the whole capture is reported as truncated:\n{full}"
    );

    let bytes = fs::read(record_dir.join("capture")).expect("failed to read the capture");
    let cut_capture = dir.join("cut-capture");
    fs::write(&cut_capture, &bytes[..bytes.len() - CUT_BYTES])
        .expect("failed to write the cut capture");
    let cut_dir = dir.join("cut");
    let args = vec![
        "analyze".to_string(),
        cut_capture.display().to_string(),
        "-o".into(),
        cut_dir.display().to_string(),
    ];
    let output = cli::run(&stalltrace, &args, BAD_INPUT_TIMEOUT);
    assert!(
        output.status.success(),
        "analyze of a capture cut by {CUT_BYTES} bytes failed; {}",
        output.describe()
    );
    assert!(
        output.stderr.contains("warning"),
        "analyze printed no warning for a cut capture; {}",
        output.describe()
    );
    let cut = Report::load(&cut_dir.join("report.json"));
    eprintln!("whole capture:\n{full}\ncut capture:\n{cut}");

    assert!(
        cut.capture_truncated,
        "the report of a cut capture has capture_truncated false:\n{cut}"
    );
    let stalls_before_last = full.stalls.len() - 1;
    assert!(
        cut.stalls.len() == stalls_before_last || cut.stalls.len() == full.stalls.len(),
        "the cut capture has {} stalls, the whole one {}: the cut should lose at most the last; whole:\n{full}\ncut:\n{cut}",
        cut.stalls.len(),
        full.stalls.len()
    );
    assert_eq!(
        cut.stalls[..stalls_before_last],
        full.stalls[..stalls_before_last],
        "the stalls before the cut differ; whole:\n{full}\ncut:\n{cut}"
    );
    assert_eq!(
        cut.threshold_ns, full.threshold_ns,
        "threshold; cut:\n{cut}"
    );
}

// ---------------------------------------------------------------------------------------
// watch --json.

#[test]
fn watch_json_lines() {
    let test = "watch_json_lines";
    if !require_root(test) {
        return;
    }
    let mut workload = Workload::start(WORKLOAD);
    let loop_tid = workload.loop_tid();
    let args: Vec<String> = vec![
        "watch".into(),
        "--json".into(),
        "--duration".into(),
        "3s".into(),
        "--pid".into(),
        workload.pid().to_string(),
        "--threshold".into(),
        "50ms".into(),
    ];
    let mut stalltrace = start_attached(&args);
    thread::sleep(SETTLE);
    let done = workload.run("sleep 200", HANDLER_TIMEOUT);
    let status = stalltrace.wait(Duration::from_secs(3) + EXIT_GRACE);
    assert!(
        status.is_some_and(|status| status.success()),
        "stalltrace watch did not exit with success (status {status:?}); output:\n{}",
        stalltrace.output_text()
    );

    let stdout = stalltrace.stdout_lines();
    let mut lines = Vec::new();
    for line in stdout.iter().filter(|line| !line.trim().is_empty()) {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|error| panic!("stdout line is not JSON ({error}): `{line}`"));
        let event = value.get("event").and_then(|event| event.as_str());
        assert!(
            matches!(event, Some("detected" | "ended")),
            "stdout line has no `event` of `detected` or `ended`: `{line}`"
        );
        assert!(
            value.get("stall").is_some_and(|stall| stall.is_object()),
            "stdout line has no `stall` object: `{line}`"
        );
        lines.push(value);
    }
    let stdout_text = stdout.join("\n");

    let Some(ended_index) = lines
        .iter()
        .position(|line| json_line_stall(line, "ended", loop_tid).is_some())
    else {
        panic!("no `ended` line for loop thread {loop_tid}; stdout:\n{stdout_text}");
    };
    let ended = json_line_stall(&lines[ended_index], "ended", loop_tid).expect("found above");
    assert_eq!(
        ended.verdict, "syscall",
        "verdict of the sleep stall; stdout:\n{stdout_text}"
    );
    assert_eq!(
        ended.ended_by.as_deref(),
        Some("wait"),
        "ended_by; stdout:\n{stdout_text}"
    );
    assert!(
        !ended.ongoing,
        "an `ended` stall is marked ongoing; stdout:\n{stdout_text}"
    );
    assert!(
        ended.start_ns <= done.start_ns && ended.end_ns() >= done.end_ns,
        "the stall {}..{} ns does not cover the handler {}..{} ns; stdout:\n{stdout_text}",
        ended.start_ns,
        ended.end_ns(),
        done.start_ns,
        done.end_ns
    );
    assert!(
        (200 * MS..=300 * MS).contains(&ended.duration_ns),
        "the stall lasted {:.1} ms, outside 200..=300 ms; stdout:\n{stdout_text}",
        ended.duration_ns as f64 / MS as f64
    );
    assert_eq!(
        ended.breakdown_ns.total(),
        ended.duration_ns,
        "the breakdown does not add up to the stall duration; stdout:\n{stdout_text}"
    );

    // The stall is past the threshold for 150 ms, longer than the 100 ms between scans,
    // so at least one scan finds it while it lasts.
    let detected = lines[..ended_index]
        .iter()
        .filter_map(|line| json_line_stall(line, "detected", loop_tid))
        .find(|stall| stall.start_ns == ended.start_ns);
    let Some(detected) = detected else {
        panic!("no `detected` line before the `ended` line of the stall at {} ns; stdout:\n{stdout_text}", ended.start_ns);
    };
    assert!(
        detected.ongoing,
        "a `detected` stall is not marked ongoing; stdout:\n{stdout_text}"
    );
    assert!(
        detected.duration_ns <= ended.duration_ns,
        "the `detected` stall is longer than the `ended` one; stdout:\n{stdout_text}"
    );
}
