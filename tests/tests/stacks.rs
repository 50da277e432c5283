//! Real-kernel scenarios for stacks. `stack-workload` stalls in a named function while
//! `stalltrace record` runs, and the report's `stack`, `culprits`, `stalls.folded` and
//! `stalls.svg` must name that function. Also covers `stalltrace compare` and the
//! stacks that `stalltrace analyze` replays.
//!
//! They need root and `STALLTRACE_BIN`, so run them with `cargo xtask test`, which runs
//! them one at a time. The on-CPU checks expect a machine that is otherwise idle: with
//! other processes competing for the CPUs, a busy handler's verdict turns to `runqueue`.

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    fs,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use quick_xml::{events::Event, Reader};
use stalltrace_tests::{
    analyze,
    cli::run,
    protocol::Done,
    require_root,
    stacks::{
        compare_section, parse_folded, Comparison, FoldedLine, StackReport, StackStall,
        KERNEL_MODULE, VERDICT_KEYS,
    },
    stalltrace_bin, Recording, TestDir, Workload,
};

const WORKLOAD: &str = env!("CARGO_BIN_EXE_stack-workload");
const THRESHOLD: &str = "50ms";
/// `--duration` of each recording.
const CAPTURE: Duration = Duration::from_secs(3);
/// Wait between `attached` and the first command, so the loop has entered `epoll_wait`
/// at least once since the BPF programs were attached (it re-enters every 10 ms when idle).
const SETTLE: Duration = Duration::from_millis(500);
const HANDLER_TIMEOUT: Duration = Duration::from_secs(10);
/// Maximum run time of `stalltrace compare`.
const COMPARE_TIMEOUT: Duration = Duration::from_secs(30);
/// Function names in `stack-workload`, without their module path.
const BUSY_FUNCTION: &str = "busy_work_handler";
const NAP_FUNCTION: &str = "napping_handler";
/// Minimum share of a verdict's stalled time that the handler behind the stall must own
/// as its top culprit. Each handler is the only code that runs for long in its stall, so
/// it should own nearly all of it. In `busy_work_handler` the clock reads between rounds
/// run in the vDSO, whose missing frame pointers would hide the handler, but they take
/// well under 1% of the time.
const MIN_TOP_SHARE: f64 = 0.5;

/// One recording of `stack-workload` during which it ran some commands, one loop
/// iteration each.
struct StackRun {
    report: StackReport,
    dones: Vec<Done>,
    pid: u32,
    loop_tid: u32,
    record_dir: PathBuf,
    dir: TestDir,
}

impl StackRun {
    /// Returns the loop thread's stall that covers the handler of `command`.
    fn stall_of(&self, command: &str) -> &StackStall {
        let done = self
            .dones
            .iter()
            .find(|done| done.done == command)
            .unwrap_or_else(|| panic!("the run has no `{command}` command"));
        let stalls: Vec<&StackStall> = self
            .report
            .stalls_of_thread(self.pid, self.loop_tid)
            .into_iter()
            .filter(|stall| stall.start_ns <= done.start_ns && stall.end_ns() >= done.end_ns)
            .collect();
        assert_eq!(
            stalls.len(),
            1,
            "expected one stall of loop thread {} over `{command}` (handler {}..{} ns); report:\n{}",
            self.loop_tid,
            done.start_ns,
            done.end_ns,
            self.report
        );
        stalls[0]
    }

    /// Asserts that the loop thread has exactly `expected` stalls.
    fn assert_stall_count(&self, expected: usize) {
        let stalls = self.report.stalls_of_thread(self.pid, self.loop_tid);
        assert_eq!(
            stalls.len(),
            expected,
            "expected {expected} stalls of loop thread {}; report:\n{}",
            self.loop_tid,
            self.report
        );
    }

    fn folded_text(&self) -> String {
        read_text(&self.record_dir.join("stalls.folded"))
    }
}

/// Records the workload while it runs `commands` one after another, SETTLE after
/// stalltrace attached. Each command waits for the previous one's `done` line, so each
/// runs in its own loop iteration.
fn record_commands(test: &str, folder: &str, commands: &[&str]) -> StackRun {
    let stalltrace = stalltrace_bin();
    let dir = TestDir::new(test);
    let record_dir = dir.join(folder);
    fs::create_dir_all(&record_dir).expect("failed to create the record folder");

    let mut workload = Workload::start(WORKLOAD);
    let recording = Recording::start(
        &stalltrace,
        workload.pid(),
        CAPTURE,
        Some(THRESHOLD),
        &record_dir,
    );
    thread::sleep(SETTLE);
    let dones: Vec<Done> = commands
        .iter()
        .map(|command| workload.run(command, HANDLER_TIMEOUT))
        .collect();
    recording.finish();
    let report = StackReport::load(&record_dir.join("report.json"));
    for done in &dones {
        eprintln!(
            "`{}` ran from {} to {} ns",
            done.done, done.start_ns, done.end_ns
        );
    }
    eprintln!("report:\n{report}");

    StackRun {
        report,
        dones,
        pid: workload.pid(),
        loop_tid: workload.loop_tid(),
        record_dir,
        dir,
    }
}

fn read_text(path: &Path) -> String {
    fs::read_to_string(path)
        .unwrap_or_else(|error| panic!("failed to read {}: {error}", path.display()))
}

/// Asserts that `stall` has the on_cpu verdict, for checks of the on_cpu culprits.
fn assert_on_cpu(stall: &StackStall, report: &StackReport) {
    assert_eq!(
        stall.verdict, "on_cpu",
        "the busy handler's stall is not on_cpu (a runqueue verdict means other processes competed for the CPUs); report:\n{report}"
    );
}

/// Asserts that `stall`'s stack names `function`.
fn assert_stack_names(stall: &StackStall, function: &str, report: &StackReport) {
    assert!(
        stall.frame_index(function).is_some(),
        "the stall's stack has no frame named like `{function}`; stack:\n{}\nreport:\n{report}",
        stall.stack_text()
    );
}

/// Asserts that the largest culprit of `verdict` is `function` with at least `min_share`.
fn assert_top_culprit(report: &StackReport, verdict: &str, function: &str, min_share: f64) {
    let culprits = report.culprits_of(verdict);
    let Some(top) = culprits.first() else {
        panic!("the report has no {verdict} culprits; report:\n{report}");
    };
    assert!(
        top.frame.contains(function),
        "the top {verdict} culprit is `{}`, not `{function}`; culprits: {culprits:#?}\nreport:\n{report}",
        top.frame
    );
    assert!(
        top.share >= min_share,
        "`{}` owns {:.0}% of the {verdict} stalled time, below {:.0}%; report:\n{report}",
        top.frame,
        top.share * 100.0,
        min_share * 100.0
    );
}

/// Checks that `text` is well-formed XML with one root element, and returns the text of
/// its `title` elements, which inferno gives one per flame-graph frame.
fn svg_titles(text: &str) -> Result<Vec<String>, String> {
    let mut reader = Reader::from_str(text);
    reader.config_mut().check_end_names = true;
    let mut open: Vec<String> = Vec::new();
    let mut roots = 0;
    let mut titles = Vec::new();
    let mut title: Option<String> = None;
    loop {
        let position = reader.buffer_position();
        let event = reader
            .read_event()
            .map_err(|error| format!("invalid XML at byte {position}: {error}"))?;
        match event {
            Event::Start(start) | Event::Empty(start) if open.is_empty() && roots > 0 => {
                let name = String::from_utf8_lossy(start.name().as_ref()).into_owned();
                return Err(format!("second root element <{name}> at byte {position}"));
            }
            Event::Start(start) => {
                check_attributes(&start, position)?;
                let name = String::from_utf8_lossy(start.name().as_ref()).into_owned();
                if open.is_empty() {
                    roots += 1;
                }
                if name == "title" {
                    title = Some(String::new());
                }
                open.push(name);
            }
            Event::Empty(start) => {
                check_attributes(&start, position)?;
                if open.is_empty() {
                    roots += 1;
                }
            }
            Event::End(end) => {
                let name = String::from_utf8_lossy(end.name().as_ref()).into_owned();
                if open.pop().as_deref() != Some(name.as_str()) {
                    return Err(format!("unmatched </{name}> at byte {position}"));
                }
                if name == "title" {
                    titles.extend(title.take());
                }
            }
            Event::Text(content) => {
                let content = content
                    .decode()
                    .map_err(|error| format!("invalid text at byte {position}: {error}"))?;
                if open.is_empty() && !content.trim().is_empty() {
                    return Err(format!("text outside the root element at byte {position}"));
                }
                if let Some(title) = title.as_mut() {
                    title.push_str(&content);
                }
            }
            Event::GeneralRef(reference) => {
                if let Some(title) = title.as_mut() {
                    title.push('&');
                    title.push_str(&String::from_utf8_lossy(&reference));
                    title.push(';');
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if let Some(name) = open.last() {
        return Err(format!("<{name}> is not closed at the end of the file"));
    }
    if roots != 1 {
        return Err(format!("expected one root element, found {roots}"));
    }
    Ok(titles)
}

/// Parses every attribute of an element, because quick-xml reads them only on request.
fn check_attributes(
    start: &quick_xml::events::BytesStart<'_>,
    position: u64,
) -> Result<(), String> {
    for attribute in start.attributes() {
        attribute.map_err(|error| format!("invalid attribute at byte {position}: {error}"))?;
    }
    Ok(())
}

/// Asserts that `dir/stalls.svg` is well-formed XML with a frame title naming `function`.
fn assert_svg_names(dir: &Path, function: &str) {
    let path = dir.join("stalls.svg");
    let text = read_text(&path);
    let titles = svg_titles(&text)
        .unwrap_or_else(|error| panic!("{} is not well-formed XML: {error}", path.display()));
    assert!(
        titles.iter().any(|title| title.contains(function)),
        "no frame title in {} names `{function}`; titles: {titles:#?}",
        path.display()
    );
}

#[test]
fn busy_function_tops_culprits() {
    let test = "busy_function_tops_culprits";
    if !require_root(test) {
        return;
    }
    let run = record_commands(test, "record", &["busy 300"]);
    let report = &run.report;
    run.assert_stall_count(1);

    let stall = run.stall_of("busy 300");
    eprintln!("stack of the busy stall:\n{}", stall.stack_text());
    assert_stack_names(stall, BUSY_FUNCTION, report);
    assert_on_cpu(stall, report);
    assert_top_culprit(report, "on_cpu", BUSY_FUNCTION, MIN_TOP_SHARE);

    let top = report.culprits_of("on_cpu")[0];
    assert_eq!(
        top.stalls, 1,
        "`{}` should own time in the one stall; report:\n{report}",
        top.frame
    );
    assert!(
        top.stalled_ns <= stall.duration_ns,
        "`{}` owns {} ns, more than the stall's {} ns; report:\n{report}",
        top.frame,
        top.stalled_ns,
        stall.duration_ns
    );
}

#[test]
fn sleeping_caller_in_blocked_stack() {
    let test = "sleeping_caller_in_blocked_stack";
    if !require_root(test) {
        return;
    }
    let run = record_commands(test, "record", &["nap 200"]);
    let report = &run.report;
    run.assert_stall_count(1);

    let stall = run.stall_of("nap 200");
    eprintln!("stack of the nap stall:\n{}", stall.stack_text());
    assert_eq!(stall.verdict, "syscall", "verdict; report:\n{report}");

    // The blocked stack starts in the kernel's scheduler and continues in user space.
    let first_user = stall
        .stack
        .iter()
        .position(|frame| frame.module != KERNEL_MODULE);
    assert!(
        first_user.is_some_and(|index| index > 0),
        "the blocked stack should start with kernel frames and go on with user frames; stack:\n{}\nreport:\n{report}",
        stall.stack_text()
    );
    let first_user = first_user.unwrap_or(0);
    assert!(
        stall.stack[first_user..]
            .iter()
            .all(|frame| frame.module != KERNEL_MODULE),
        "a kernel frame follows a user frame; stack:\n{}\nreport:\n{report}",
        stall.stack_text()
    );

    assert_stack_names(stall, NAP_FUNCTION, report);
    let nap_index = stall.frame_index(NAP_FUNCTION).unwrap_or(0);
    assert!(
        nap_index > first_user,
        "`{NAP_FUNCTION}` should come after the frame that made the syscall; stack:\n{}\nreport:\n{report}",
        stall.stack_text()
    );
    // The handler is called from the loop in `main`, so `main` is further out.
    let main_index = stall.frame_index("stack_workload::main");
    assert!(
        main_index.is_some_and(|index| index > nap_index),
        "`stack_workload::main` should follow `{NAP_FUNCTION}` (innermost first); stack:\n{}\nreport:\n{report}",
        stall.stack_text()
    );

    // The C library's sleep frames are skipped, so the handler owns the blocked time.
    assert_top_culprit(report, "syscall", NAP_FUNCTION, MIN_TOP_SHARE);
}

#[test]
fn folded_output_parses_and_adds_up() {
    let test = "folded_output_parses_and_adds_up";
    if !require_root(test) {
        return;
    }
    let run = record_commands(test, "record", &["busy 300", "nap 200"]);
    let report = &run.report;
    run.assert_stall_count(2);

    let folded_text = run.folded_text();
    eprintln!("stalls.folded:\n{folded_text}");
    let lines: Vec<FoldedLine> = parse_folded(&folded_text)
        .unwrap_or_else(|error| panic!("stalls.folded is malformed: {error}\n{folded_text}"));
    assert!(
        !lines.is_empty(),
        "stalls.folded is empty; report:\n{report}"
    );

    for line in &lines {
        assert!(
            VERDICT_KEYS.contains(&line.root()),
            "the root frame `{}` is not a verdict key; stalls.folded:\n{folded_text}",
            line.root()
        );
    }

    let folded_total: u64 = lines.iter().map(|line| line.weight_ns).sum();
    let stalled_total: u64 = report.stalls.iter().map(|stall| stall.duration_ns).sum();
    assert_eq!(
        folded_total, stalled_total,
        "the folded weights do not add up to the stalls' durations; stalls.folded:\n{folded_text}\nreport:\n{report}"
    );

    // Each stall's time goes under its own verdict, so the sums match per verdict too.
    let mut folded_by_verdict: BTreeMap<&str, u64> = BTreeMap::new();
    for line in &lines {
        *folded_by_verdict.entry(line.root()).or_default() += line.weight_ns;
    }
    let mut stalled_by_verdict: BTreeMap<&str, u64> = BTreeMap::new();
    for stall in &report.stalls {
        *stalled_by_verdict
            .entry(stall.verdict.as_str())
            .or_default() += stall.duration_ns;
    }
    assert_eq!(
        folded_by_verdict, stalled_by_verdict,
        "folded weights by root frame differ from stalled time by verdict; stalls.folded:\n{folded_text}\nreport:\n{report}"
    );

    for (command, function) in [("busy 300", BUSY_FUNCTION), ("nap 200", NAP_FUNCTION)] {
        let verdict = run.stall_of(command).verdict.as_str();
        assert!(
            lines
                .iter()
                .any(|line| line.root() == verdict && line.has_frame(function)),
            "no folded line under `{verdict}` names `{function}`; stalls.folded:\n{folded_text}"
        );
    }

    assert_svg_names(&run.record_dir, BUSY_FUNCTION);
}

#[test]
fn compare_shows_culprit_gone() {
    let test = "compare_shows_culprit_gone";
    if !require_root(test) {
        return;
    }
    let before = record_commands(test, "before", &["busy 300"]);
    let busy_stall = before.stall_of("busy 300");
    assert_on_cpu(busy_stall, &before.report);
    let before_culprit = before
        .report
        .culprits_of("on_cpu")
        .into_iter()
        .find(|culprit| culprit.frame.contains(BUSY_FUNCTION))
        .unwrap_or_else(|| {
            panic!(
                "the report before has no on_cpu culprit `{BUSY_FUNCTION}`; report:\n{}",
                before.report
            )
        })
        .clone();

    let after = record_commands(test, "after", &["noop", "noop", "noop"]);
    assert!(
        after.report.stalls.is_empty(),
        "the noop run has stalls, so it is no clean baseline; report:\n{}",
        after.report
    );

    let stalltrace = stalltrace_bin();
    let text_output = run(
        &stalltrace,
        &[
            OsStr::new("compare"),
            before.record_dir.as_os_str(),
            after.record_dir.as_os_str(),
        ],
        COMPARE_TIMEOUT,
    );
    assert!(
        text_output.status.success(),
        "stalltrace compare failed; {}",
        text_output.describe()
    );
    let text = &text_output.stdout;

    let verdict_rows = compare_section(text, "verdicts:");
    let on_cpu_row = verdict_rows
        .iter()
        .find(|row| row.starts_with("on_cpu:"))
        .unwrap_or_else(|| panic!("compare prints no on_cpu verdict line:\n{text}"));
    assert!(
        on_cpu_row.contains("-> 0 stalls,"),
        "the on_cpu line does not go to 0 stalls: `{on_cpu_row}`\n{text}"
    );
    assert!(
        on_cpu_row.ends_with(')') && on_cpu_row.contains("(-"),
        "the on_cpu line shows no decrease: `{on_cpu_row}`\n{text}"
    );

    let culprit_rows = compare_section(text, "culprits:");
    let busy_row = culprit_rows
        .iter()
        .find(|row| row.contains(BUSY_FUNCTION))
        .unwrap_or_else(|| panic!("compare prints no culprit line for `{BUSY_FUNCTION}`:\n{text}"));
    assert!(
        busy_row.contains("(on_cpu)"),
        "the `{BUSY_FUNCTION}` line is not under on_cpu: `{busy_row}`\n{text}"
    );
    assert!(
        busy_row.contains("-> 0ns"),
        "the `{BUSY_FUNCTION}` line does not go to 0ns: `{busy_row}`\n{text}"
    );
    let delta = busy_row.rsplit(' ').next().unwrap_or_default();
    assert!(
        delta.starts_with("(-") && delta.ends_with(')'),
        "the `{BUSY_FUNCTION}` line ends in `{delta}`, not a negative change: `{busy_row}`\n{text}"
    );

    let json_output = run(
        &stalltrace,
        &[
            OsStr::new("compare"),
            before.record_dir.as_os_str(),
            after.record_dir.as_os_str(),
            OsStr::new("--json"),
        ],
        COMPARE_TIMEOUT,
    );
    assert!(
        json_output.status.success(),
        "stalltrace compare --json failed; {}",
        json_output.describe()
    );
    let comparison: Comparison =
        serde_json::from_str(&json_output.stdout).unwrap_or_else(|error| {
            panic!(
                "stalltrace compare --json printed no valid comparison: {error}\n{}",
                json_output.stdout
            )
        });

    let on_cpu = comparison
        .verdicts
        .iter()
        .find(|row| row.verdict == "on_cpu")
        .unwrap_or_else(|| panic!("the JSON has no on_cpu verdict row: {comparison:#?}"));
    assert_eq!(
        (
            on_cpu.stalls_before,
            on_cpu.stalls_after,
            on_cpu.stalled_ns_after
        ),
        (1, 0, 0),
        "on_cpu stalls before, after, and stalled ns after: {comparison:#?}"
    );
    assert_eq!(
        on_cpu.stalled_ns_before, busy_stall.duration_ns,
        "on_cpu stalled ns before should be the busy stall's duration: {comparison:#?}"
    );

    let busy = comparison
        .culprits
        .iter()
        .find(|row| row.frame.contains(BUSY_FUNCTION))
        .unwrap_or_else(|| {
            panic!("the JSON has no culprit row for `{BUSY_FUNCTION}`: {comparison:#?}")
        });
    assert!(
        busy.stalled_ns_before > 0,
        "`{}` had no stalled time before: {comparison:#?}",
        busy.frame
    );
    assert_eq!(
        busy.stalled_ns_before, before_culprit.stalled_ns,
        "the culprit's time before differs from the report before: {comparison:#?}"
    );
    assert_eq!(
        busy.stalled_ns_after, 0,
        "`{}` still has stalled time after: {comparison:#?}",
        busy.frame
    );
    assert_eq!(
        busy.delta_ns,
        -(busy.stalled_ns_before as i64),
        "the culprit's delta is not after minus before: {comparison:#?}"
    );
}

#[test]
fn analyze_symbolizes_capture() {
    let test = "analyze_symbolizes_capture";
    if !require_root(test) {
        return;
    }
    let run = record_commands(test, "record", &["busy 300"]);
    let recorded = &run.report;
    run.assert_stall_count(1);
    // Replaying a capture without the handler in its stack would prove little. Which
    // frame owns the stack is `busy_function_tops_culprits`'s check, not this one's.
    let recorded_stall = run.stall_of("busy 300");
    assert_stack_names(recorded_stall, BUSY_FUNCTION, recorded);
    assert!(
        !recorded.culprits.is_empty(),
        "the recorded report has no culprits; report:\n{recorded}"
    );

    // The workload has exited by the time `analyze` runs (`record_commands` drops it), so
    // the stacks come from the capture alone.
    let replay_dir = run.dir.join("replay");
    fs::create_dir_all(&replay_dir).expect("failed to create the replay folder");
    analyze(
        &stalltrace_bin(),
        &run.record_dir.join("capture"),
        &replay_dir,
    );
    let replayed = StackReport::load(&replay_dir.join("report.json"));

    assert_eq!(
        replayed.culprits, recorded.culprits,
        "culprits differ; recorded:\n{recorded}\nreplayed:\n{replayed}"
    );
    assert_eq!(
        sorted_stalls(&replayed),
        sorted_stalls(recorded),
        "stalls or their stacks differ; recorded:\n{recorded}\nreplayed:\n{replayed}"
    );

    let recorded_folded = run.folded_text();
    let replayed_folded = read_text(&replay_dir.join("stalls.folded"));
    assert_eq!(
        replayed_folded, recorded_folded,
        "stalls.folded differs between record and analyze"
    );
    assert_svg_names(&replay_dir, BUSY_FUNCTION);
}

/// Returns the report's stalls ordered by pid, tid and start, because the report format
/// does not fix their order.
fn sorted_stalls(report: &StackReport) -> Vec<StackStall> {
    let mut stalls = report.stalls.clone();
    stalls.sort_by_key(|stall| (stall.pid, stall.tid, stall.start_ns));
    stalls
}
