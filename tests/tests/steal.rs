//! Real-kernel checks of the time that the loop thread lost to others: hypervisor steal,
//! run-queue waits inside the guest, and cgroup CPU throttling.
//!
//! They need root and `STALLTRACE_BIN`, and run one at a time (`--test-threads=1`)
//! because they measure time on a shared machine. Steal comes from the host, so a test
//! that needs some prints `could not check: ...` when the host took none.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use stalltrace_tests::{
    cli::{ReportExtras, Running},
    protocol::Done,
    require_root, stalltrace_bin, Report, Stall, TestDir, Workload,
};

const WORKLOAD: &str = env!("CARGO_BIN_EXE_loop-workload");
const MS: u64 = 1_000_000;
/// Maximum wait for `stalltrace record` to print `attached`. Loading and verifying the
/// BPF programs is the slow part.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed past `--duration` for detaching and writing the report.
const EXIT_GRACE: Duration = Duration::from_secs(30);
/// `--duration` of the recordings of one workload command.
const CAPTURE: Duration = Duration::from_secs(3);
/// Wait between `attached` and the command, so the loop has entered `epoll_wait` at
/// least once since the BPF programs were attached (it re-enters every 10 ms when idle).
const SETTLE: Duration = Duration::from_millis(500);
const HANDLER_TIMEOUT: Duration = Duration::from_secs(10);
/// `/proc/stat` counts in clock ticks of USER_HZ, 100 on x86 Linux, so one tick is 10 ms.
const PROC_STAT_TICK_NS: u64 = 10 * MS;

// ---------------------------------------------------------------------------------------
// Host facts, read independently of stalltrace.

/// Returns whether `/proc/cpuinfo` lists the `hypervisor` CPU flag (CPUID leaf 1, ECX
/// bit 31), which hypervisors set and real hardware leaves clear.
fn cpuinfo_has_hypervisor_flag() -> bool {
    let text = fs::read_to_string("/proc/cpuinfo").expect("failed to read /proc/cpuinfo");
    text.lines()
        .filter(|line| line.starts_with("flags"))
        .any(|line| line.split_whitespace().any(|flag| flag == "hypervisor"))
}

/// Returns whether the kernel registered the `kvm-clock` clocksource, which it does only
/// when it runs under KVM.
fn has_kvm_clock() -> bool {
    let path = "/sys/devices/system/clocksource/clocksource0/available_clocksource";
    fs::read_to_string(path)
        .map(|text| text.split_whitespace().any(|name| name == "kvm-clock"))
        .unwrap_or(false)
}

fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(cpus).unwrap_or(1).max(1)
}

/// Returns the `steal` column of each `cpuN` line of `/proc/stat`, in clock ticks.
fn proc_stat_steal_ticks() -> Vec<u64> {
    let text = fs::read_to_string("/proc/stat").expect("failed to read /proc/stat");
    let mut ticks = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(cpu) = fields
            .next()
            .and_then(|name| name.strip_prefix("cpu"))
            .and_then(|number| number.parse::<usize>().ok())
        else {
            continue;
        };
        // Columns after the name: user nice system idle iowait irq softirq steal.
        let steal = fields
            .nth(7)
            .and_then(|value| value.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("/proc/stat line without a steal column: `{line}`"));
        if ticks.len() <= cpu {
            ticks.resize(cpu + 1, 0);
        }
        ticks[cpu] = steal;
    }
    ticks
}

/// Threads that spin on the CPUs given, one each, until dropped.
struct BusyThreads {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl BusyThreads {
    fn start(cpus: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..cpus)
            .map(|cpu| {
                let stop = Arc::clone(&stop);
                thread::Builder::new()
                    .name(format!("busy-cpu{cpu}"))
                    .spawn(move || {
                        pin_current_thread(cpu);
                        while !stop.load(Ordering::Relaxed) {
                            std::hint::spin_loop();
                        }
                    })
                    .expect("failed to start a busy thread")
            })
            .collect();
        Self { stop, handles }
    }
}

impl Drop for BusyThreads {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

fn pin_current_thread(cpu: usize) {
    // SAFETY: cpu_set_t is plain data, and all zeros is the empty set.
    let mut mask: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below the number of online CPUs, far below CPU_SETSIZE here.
    unsafe { libc::CPU_SET(cpu, &mut mask) };
    // SAFETY: `mask` is a valid cpu_set_t of the size passed, and pid 0 is this thread.
    let result =
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mask) };
    assert_eq!(
        result,
        0,
        "failed to pin a busy thread to CPU {cpu}: {}",
        std::io::Error::last_os_error()
    );
}

// ---------------------------------------------------------------------------------------
// Cgroups with a CPU quota.

/// Cgroup hierarchy whose `cpu` controller can limit a new child group.
#[derive(Debug, Clone)]
enum CpuHierarchy {
    /// cgroup v2: the controller is enabled in the root's `cgroup.subtree_control`.
    V2 { root: PathBuf },
    /// cgroup v1: a hierarchy mounted with the `cpu` controller.
    V1 { root: PathBuf },
}

impl CpuHierarchy {
    /// Finds a mounted hierarchy for a CPU quota, preferring cgroup v2. Returns `None`
    /// when no mount has the `cpu` controller available for child groups.
    fn find() -> Option<Self> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .expect("failed to read /proc/self/mountinfo");
        let mut v1 = None;
        for line in mountinfo.lines() {
            // Fields: ID parent major:minor root mount-point options ... - type source super-options.
            let Some((before, after)) = line.split_once(" - ") else {
                continue;
            };
            let Some(mount_point) = before.split_whitespace().nth(4) else {
                continue;
            };
            let mut after = after.split_whitespace();
            let fs_type = after.next().unwrap_or("");
            let super_options = after.nth(1).unwrap_or("");
            let root = PathBuf::from(mount_point);
            if fs_type == "cgroup2" {
                let lists_cpu = |file: &str| {
                    fs::read_to_string(root.join(file))
                        .map(|text| text.split_whitespace().any(|name| name == "cpu"))
                        .unwrap_or(false)
                };
                if lists_cpu("cgroup.controllers") && lists_cpu("cgroup.subtree_control") {
                    return Some(Self::V2 { root });
                }
            } else if fs_type == "cgroup"
                && super_options.split(',').any(|option| option == "cpu")
                && v1.is_none()
            {
                v1 = Some(Self::V1 { root });
            }
        }
        v1
    }

    fn root(&self) -> &Path {
        match self {
            Self::V2 { root } | Self::V1 { root } => root,
        }
    }
}

/// Counters of a cgroup's `cpu.stat`: how often and how long the group was throttled.
#[derive(Debug, Clone, Copy)]
struct ThrottleStat {
    periods_throttled: u64,
    throttled_ns: u64,
}

/// A cgroup created for one test, with a CPU quota. Drop moves any process still in it
/// to the hierarchy's root and removes it.
struct QuotaCgroup {
    hierarchy: CpuHierarchy,
    path: PathBuf,
}

impl QuotaCgroup {
    /// Creates a child of the hierarchy's root that may use `quota_us` of CPU time in
    /// every `period_us`.
    fn create(hierarchy: CpuHierarchy, test: &str, quota_us: u64, period_us: u64) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos())
            .unwrap_or(0);
        let path = hierarchy
            .root()
            .join(format!("stalltrace-{test}-{}-{nanos}", std::process::id()));
        fs::create_dir(&path)
            .unwrap_or_else(|error| panic!("failed to create cgroup {}: {error}", path.display()));
        let cgroup = Self { hierarchy, path };
        match &cgroup.hierarchy {
            CpuHierarchy::V2 { .. } => cgroup.write("cpu.max", &format!("{quota_us} {period_us}")),
            CpuHierarchy::V1 { .. } => {
                cgroup.write("cpu.cfs_period_us", &period_us.to_string());
                cgroup.write("cpu.cfs_quota_us", &quota_us.to_string());
            }
        }
        cgroup
    }

    /// Moves every thread of process `pid` into this cgroup.
    fn add_process(&self, pid: u32) {
        self.write("cgroup.procs", &pid.to_string());
    }

    fn throttle_stat(&self) -> ThrottleStat {
        let path = self.path.join("cpu.stat");
        let text = fs::read_to_string(&path)
            .unwrap_or_else(|error| panic!("failed to read {}: {error}", path.display()));
        let value = |key: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(key)?.strip_prefix(' '))
                .and_then(|value| value.trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{} has no `{key}` line:\n{text}", path.display()))
        };
        match self.hierarchy {
            CpuHierarchy::V2 { .. } => ThrottleStat {
                periods_throttled: value("nr_throttled"),
                throttled_ns: value("throttled_usec") * 1_000,
            },
            CpuHierarchy::V1 { .. } => ThrottleStat {
                periods_throttled: value("nr_throttled"),
                throttled_ns: value("throttled_time"),
            },
        }
    }

    fn write(&self, file: &str, value: &str) {
        let path = self.path.join(file);
        fs::write(&path, value).unwrap_or_else(|error| {
            panic!("failed to write `{value}` to {}: {error}", path.display())
        });
    }
}

impl Drop for QuotaCgroup {
    fn drop(&mut self) {
        let root_procs = self.hierarchy.root().join("cgroup.procs");
        if let Ok(procs) = fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in procs.split_whitespace() {
                if let Err(error) = fs::write(&root_procs, pid) {
                    eprintln!(
                        "failed to move process {pid} out of cgroup {}: {error}",
                        self.path.display()
                    );
                }
            }
        }
        // A process killed just before may still be leaving the group, so retry briefly.
        for attempt in 0..50 {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(error) if attempt == 49 => {
                    eprintln!("failed to remove cgroup {}: {error}", self.path.display())
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Recording one workload command.

/// One recording of `loop-workload` during which it ran one command.
struct CommandRun {
    report: Report,
    extras: ReportExtras,
    done: Done,
    pid: u32,
    loop_tid: u32,
    stderr: Vec<String>,
    _dir: TestDir,
}

/// Records `workload` with `--threshold 50ms` while it runs `command`, SETTLE after
/// stalltrace attached, and returns both parts of the report.
fn record_command(test: &str, workload: &mut Workload, command: &str) -> CommandRun {
    let dir = TestDir::new(test);
    let record_dir = dir.join("record");
    let args: Vec<String> = vec![
        "record".into(),
        "--duration".into(),
        format!("{}ms", CAPTURE.as_millis()),
        "-o".into(),
        record_dir.display().to_string(),
        "--pid".into(),
        workload.pid().to_string(),
        "--threshold".into(),
        "50ms".into(),
    ];
    let mut stalltrace = Running::start(&stalltrace_bin(), &args);
    assert!(
        stalltrace.wait_for_stderr("attached", ATTACH_TIMEOUT),
        "stalltrace record printed no `attached` line within {ATTACH_TIMEOUT:?}; output:\n{}",
        stalltrace.output_text()
    );
    thread::sleep(SETTLE);
    let done = workload.run(command, HANDLER_TIMEOUT);

    let status = stalltrace.wait(CAPTURE + EXIT_GRACE);
    assert!(
        status.is_some_and(|status| status.success()),
        "stalltrace record did not exit with success within {:?} (status {status:?}); output:\n{}",
        CAPTURE + EXIT_GRACE,
        stalltrace.output_text()
    );
    let report = Report::load(&record_dir.join("report.json"));
    let extras = ReportExtras::load(&record_dir.join("report.json"));
    eprintln!(
        "`{command}` ran from {} to {} ns; report:\n{report}",
        done.start_ns, done.end_ns
    );
    CommandRun {
        report,
        extras,
        done,
        pid: workload.pid(),
        loop_tid: workload.loop_tid(),
        stderr: stalltrace.stderr_lines(),
        _dir: dir,
    }
}

/// Asserts that the report has exactly one stall of the loop thread and returns it.
fn single_loop_stall(run: &CommandRun) -> &Stall {
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

/// Asserts that `stall` ended normally, covers the handler and has a consistent breakdown.
fn assert_finished_stall(stall: &Stall, done: &Done, report: &Report) {
    assert!(
        stall.start_ns <= done.start_ns && stall.end_ns() >= done.end_ns,
        "the stall {}..{} ns does not cover the handler {}..{} ns; report:\n{report}",
        stall.start_ns,
        stall.end_ns(),
        done.start_ns,
        done.end_ns
    );
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

/// Asserts that the summary's owner totals are the sums of the stalls' shares: steal for
/// the host, run queue and throttling for the guest, the rest for the application.
fn assert_summary_sums_shares(run: &CommandRun) {
    let report = &run.report;
    let summary = &run.extras.summary;
    let stalls = &report.stalls;
    let stalled: u64 = stalls.iter().map(|stall| stall.duration_ns).sum();
    let host: u64 = stalls.iter().map(|stall| stall.breakdown_ns.steal).sum();
    let guest: u64 = stalls
        .iter()
        .map(|stall| stall.breakdown_ns.runqueue + stall.breakdown_ns.throttled)
        .sum();
    let application: u64 = stalls
        .iter()
        .map(|stall| {
            let shares = &stall.breakdown_ns;
            shares.on_cpu + shares.futex + shares.syscall
        })
        .sum();
    assert_eq!(
        summary.stalled_ns, stalled,
        "summary.stalled_ns; report:\n{report}"
    );
    assert_eq!(
        summary.host_ns, host,
        "summary.host_ns is not the stalls' steal; report:\n{report}"
    );
    assert_eq!(
        summary.guest_ns, guest,
        "summary.guest_ns is not the stalls' run-queue and throttled time; report:\n{report}"
    );
    assert_eq!(
        summary.application_ns, application,
        "summary.application_ns is not the stalls' on-CPU, futex and syscall time; report:\n{report}"
    );
}

/// Returns the first whole-number percentage after `label` in `line`: 12 for label
/// `host` in `host (steal) 12%`.
fn percent_after(line: &str, label: &str) -> Option<u64> {
    let rest = &line[line.find(label)? + label.len()..];
    let bytes = rest.as_bytes();
    let percent = (0..bytes.len())
        .find(|&index| bytes[index] == b'%' && index > 0 && bytes[index - 1].is_ascii_digit())?;
    let start = rest[..percent]
        .rfind(|c: char| !c.is_ascii_digit())
        .map_or(0, |index| index + 1);
    rest[start..percent].parse().ok()
}

/// Asserts that stalltrace's closing stderr lines show the summary's shares as
/// percentages of the stalled time, and one suggestion per verdict.
fn assert_closing_lines(run: &CommandRun) {
    let summary = &run.extras.summary;
    let stderr = run.stderr.join("\n");
    let Some(line) = run
        .stderr
        .iter()
        .find(|line| line.starts_with("stalltrace: stalled ") && line.contains("host (steal)"))
    else {
        panic!("stalltrace printed no `stalltrace: stalled ...: host (steal) N%` line; stderr:\n{stderr}");
    };
    let stalled = summary.stalled_ns.max(1) as f64;
    for (label, nanos) in [
        ("host (steal)", summary.host_ns),
        ("guest (run queue, throttling)", summary.guest_ns),
        ("application", summary.application_ns),
    ] {
        let Some(printed) = percent_after(line, label) else {
            panic!("the closing line has no percentage after `{label}`: `{line}`");
        };
        let expected = nanos as f64 * 100.0 / stalled;
        assert!(
            (printed as f64 - expected).abs() <= 1.0,
            "the closing line prints `{label}` {printed}%, but the summary gives {expected:.1}%: `{line}`; summary: {summary:?}"
        );
    }
    for verdict in &summary.verdicts {
        assert!(
            run.stderr
                .iter()
                .any(|line| line.contains(&verdict.verdict) && line.contains(&verdict.suggestion)),
            "stderr has no suggestion line for verdict `{}` (`{}`); stderr:\n{stderr}",
            verdict.verdict,
            verdict.suggestion
        );
    }
}

// ---------------------------------------------------------------------------------------
// Tests.

#[test]
fn steal_matches_proc_stat() {
    let test = "steal_matches_proc_stat";
    if !require_root(test) {
        return;
    }
    let cpus = online_cpus();
    let virtual_machine = cpuinfo_has_hypervisor_flag();
    let kvm = virtual_machine && has_kvm_clock();
    let dir = TestDir::new(test);
    let record_dir = dir.join("record");

    // A vCPU that halts in idle has nothing to steal, so keep every CPU busy.
    let busy = BusyThreads::start(cpus);
    let before_ticks = proc_stat_steal_ticks();
    let args: Vec<String> = vec![
        "record".into(),
        "--duration".into(),
        "10s".into(),
        "-o".into(),
        record_dir.display().to_string(),
    ];
    let mut stalltrace = Running::start(&stalltrace_bin(), &args);
    let status = stalltrace.wait(Duration::from_secs(10) + ATTACH_TIMEOUT + EXIT_GRACE);
    let after_ticks = proc_stat_steal_ticks();
    drop(busy);
    assert!(
        status.is_some_and(|status| status.success()),
        "stalltrace record did not exit with success (status {status:?}); output:\n{}",
        stalltrace.output_text()
    );
    let host = ReportExtras::load(&record_dir.join("report.json")).host;
    eprintln!("host: {host:#?}");

    if kvm {
        assert_eq!(
            host.virtualization, "kvm",
            "virtualization on a KVM guest (kvm-clock present); host: {host:#?}"
        );
        assert!(
            !host.steal_source.starts_with("none"),
            "a KVM guest has a steal clock, but steal_source is `{}`",
            host.steal_source
        );
    } else if virtual_machine {
        assert_ne!(
            host.virtualization, "none",
            "the CPU flags show a hypervisor, but virtualization is `none`"
        );
    } else {
        assert_eq!(host.virtualization, "none", "virtualization on bare metal");
        assert!(
            host.steal_source.starts_with("none"),
            "bare metal has no steal, but steal_source is `{}`",
            host.steal_source
        );
    }

    assert_eq!(
        host.proc_stat_steal_ns_per_cpu.len(),
        before_ticks.len(),
        "proc_stat_steal_ns_per_cpu has one entry per cpuN line of /proc/stat; host: {host:#?}"
    );
    assert_eq!(
        host.proc_stat_steal_ns_total,
        host.proc_stat_steal_ns_per_cpu.iter().sum::<u64>(),
        "proc_stat_steal_ns_total is not the sum over CPUs; host: {host:#?}"
    );
    assert_eq!(
        host.steal_ns_total,
        host.steal_ns_per_cpu.iter().sum::<u64>(),
        "steal_ns_total is not the sum over CPUs; host: {host:#?}"
    );
    // The report's window lies inside this test's own readings before and after the run.
    for (cpu, (&before, &after)) in before_ticks.iter().zip(&after_ticks).enumerate() {
        let outer_ns = (after - before) * PROC_STAT_TICK_NS;
        let reported_ns = host.proc_stat_steal_ns_per_cpu[cpu];
        assert!(
            reported_ns <= outer_ns,
            "CPU {cpu}: the report's /proc/stat steal {reported_ns} ns exceeds the {outer_ns} ns that /proc/stat shows around the whole run; host: {host:#?}"
        );
    }

    if host.steal_source.starts_with("none") {
        assert_eq!(
            host.steal_ns_total, 0,
            "steal measured without a steal source; host: {host:#?}"
        );
        return;
    }
    if host.proc_stat_steal_ns_total == 0 {
        eprintln!(
            "could not check: the host took no steal during the test (/proc/stat steal ticks before {before_ticks:?}, after {after_ticks:?})"
        );
        return;
    }
    assert_eq!(
        host.steal_ns_per_cpu.len(),
        host.proc_stat_steal_ns_per_cpu.len(),
        "the two steal figures cover different CPUs; host: {host:#?}"
    );
    // /proc/stat shows whole ticks, so each CPU's figure may be up to one tick off.
    let tolerance =
        |proc_stat_ns: u64, cpus: usize| cpus as u64 * PROC_STAT_TICK_NS + proc_stat_ns * 15 / 100;
    let difference = host.steal_ns_total.abs_diff(host.proc_stat_steal_ns_total);
    assert!(
        difference <= tolerance(host.proc_stat_steal_ns_total, cpus),
        "steal_ns_total {} ns and proc_stat_steal_ns_total {} ns differ by {difference} ns, more than {} ns ({cpus} ticks + 15%); host: {host:#?}",
        host.steal_ns_total,
        host.proc_stat_steal_ns_total,
        tolerance(host.proc_stat_steal_ns_total, cpus)
    );
    for (cpu, (&kernel_ns, &proc_stat_ns)) in host
        .steal_ns_per_cpu
        .iter()
        .zip(&host.proc_stat_steal_ns_per_cpu)
        .enumerate()
    {
        let difference = kernel_ns.abs_diff(proc_stat_ns);
        assert!(
            difference <= tolerance(proc_stat_ns, 1),
            "CPU {cpu}: steal {kernel_ns} ns and /proc/stat steal {proc_stat_ns} ns differ by {difference} ns, more than one tick + 15%; host: {host:#?}"
        );
    }
}

#[test]
fn contention_counts_steal_apart() {
    let test = "contention_counts_steal_apart";
    if !require_root(test) {
        return;
    }
    let mut workload = Workload::start(WORKLOAD);
    // The loop thread needs 100 ms of CPU time on a CPU shared with 3 spinners, so most
    // of the handler's wall time is run-queue wait inside the guest, not steal.
    let run = record_command(test, &mut workload, "contend 100 3");
    let report = &run.report;
    let host = &run.extras.host;

    let stall = single_loop_stall(&run);
    assert_finished_stall(stall, &run.done, report);
    assert_eq!(stall.verdict, "runqueue", "verdict; report:\n{report}");
    let shares = &stall.breakdown_ns;
    assert!(
        stall.share(shares.steal) <= stall.share(shares.runqueue),
        "steal is {:.0}% of the stall, more than runqueue {:.0}%; report:\n{report}",
        stall.share(shares.steal) * 100.0,
        stall.share(shares.runqueue) * 100.0
    );
    // A stall's steal is time the host took from the CPUs during the recording, so it
    // cannot exceed what their steal clocks advanced over the whole recording.
    assert!(
        shares.steal <= host.steal_ns_total,
        "the stall has {} ns of steal, but the CPUs' steal clocks advanced {} ns over the recording; report:\n{report}",
        shares.steal,
        host.steal_ns_total
    );
    assert!(
        run.extras.summary.guest_ns >= shares.runqueue,
        "summary.guest_ns {} is below the stall's runqueue {} ns; report:\n{report}",
        run.extras.summary.guest_ns,
        shares.runqueue
    );
    assert_summary_sums_shares(&run);
    assert_closing_lines(&run);
}

#[test]
fn cgroup_quota_is_throttled() {
    const QUOTA_US: u64 = 20_000;
    const PERIOD_US: u64 = 100_000;

    let test = "cgroup_quota_is_throttled";
    if !require_root(test) {
        return;
    }
    let Some(hierarchy) = CpuHierarchy::find() else {
        eprintln!("skipped: {test} needs a mounted cgroup hierarchy whose cpu controller a new child group can use");
        return;
    };
    eprintln!("using cgroup hierarchy {hierarchy:?}");
    // Declared before the workload, so the workload is killed before the cgroup is removed.
    let cgroup = QuotaCgroup::create(hierarchy, test, QUOTA_US, PERIOD_US);
    let mut workload = Workload::start(WORKLOAD);
    cgroup.add_process(workload.pid());

    // 100 ms of CPU time at 20 ms per 100 ms period takes 5 periods, so the handler lasts
    // at least about 320 ms. Most of it is throttled: 70% to 77% in runs on a quiet
    // 2-CPU KVM guest with kernel 6.18.
    let before = cgroup.throttle_stat();
    let run = record_command(test, &mut workload, "compute 100");
    let after = cgroup.throttle_stat();
    let report = &run.report;
    eprintln!("cgroup cpu.stat before {before:?}, after {after:?}");
    assert!(
        after.periods_throttled > before.periods_throttled && after.throttled_ns > before.throttled_ns,
        "the kernel never throttled the cgroup (cpu.stat before {before:?}, after {after:?}), so the quota was not applied"
    );

    let stall = single_loop_stall(&run);
    assert_finished_stall(stall, &run.done, report);
    assert_eq!(stall.verdict, "throttled", "verdict; report:\n{report}");
    let throttled_share = stall.share(stall.breakdown_ns.throttled);
    assert!(
        throttled_share >= 0.50,
        "throttled is {:.0}% of the stall, below 50%; report:\n{report}",
        throttled_share * 100.0
    );
    assert!(
        stall.duration_ns >= 300 * MS,
        "the stall lasted {:.1} ms, below the 300 ms that 100 ms of CPU time at a 20% quota needs; report:\n{report}",
        stall.duration_ns as f64 / MS as f64
    );
    let on_cpu = stall.breakdown_ns.on_cpu + stall.breakdown_ns.steal;
    assert!(
        (80 * MS..=200 * MS).contains(&on_cpu),
        "on_cpu plus steal is {:.1} ms, outside 80..=200 ms for 100 ms of CPU time; report:\n{report}",
        on_cpu as f64 / MS as f64
    );
    assert_summary_sums_shares(&run);
    assert_closing_lines(&run);
}

#[test]
fn percent_after_reads_closing_line() {
    let line = "stalltrace: stalled 412ms: host (steal) 3%, guest (run queue, throttling) 71%, application (CPU, locks, syscalls) 25%";
    assert_eq!(percent_after(line, "host (steal)"), Some(3));
    assert_eq!(
        percent_after(line, "guest (run queue, throttling)"),
        Some(71)
    );
    assert_eq!(percent_after(line, "application"), Some(25));
    assert_eq!(percent_after(line, "missing"), None);
}
