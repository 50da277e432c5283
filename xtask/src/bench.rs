//! `cargo xtask bench`: stalltrace's overhead next to offcputime and a bpftrace script
//! on the same workloads, the kernel's run-time statistics of each BPF program, the
//! userspace cost of stalltrace, and how fast it reports stalls and lock cycles.
//! The results go to `BENCHMARKS.md` at the project root.
//!
//! Every process this starts (tracers, workloads, a `redis-server` on 127.0.0.1) is
//! stopped before it returns, also on error, and `kernel.bpf_stats_enabled` is set back
//! to its old value.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs::{self, File},
    io::{BufRead, BufReader, Read},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc::{self, Receiver},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{output, run_checked, step};

/// Debian packages the benchmarks run: the peer tools, bpftool for program names and
/// statistics, and redis for a real event-loop workload.
pub const PACKAGES: &[&str] = &["redis-server", "redis-tools", "libbpf-tools", "bpftrace", "bpftool"];

/// Length of one ping-pong run.
const PINGPONG_MS: u64 = 5_000;
/// `redis-benchmark -n`: requests per test (SET, then GET) in one run.
const REDIS_REQUESTS: u64 = 200_000;
/// Wall time of each stall the latency benchmark causes (`spin MS`, `sleep MS`).
const STALL_MS: u64 = 2_000;
/// Stalls of each kind, and deadlocks, that the latency benchmark times.
const LATENCY_REPEATS: usize = 10;
/// Life of each `bench-deadlock` process. Cycles are due within 1 s, so 3 s leaves margin.
const DEADLOCK_LIFETIME_MS: u64 = 3_000;
/// How long after a tracer's attach the workloads start, so its start-up work is done.
const TRACER_SETTLE: Duration = Duration::from_millis(1_000);
/// Maximum wait for a tracer to attach. bpftrace compiles its script first.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
/// Maximum wait for a tracer to exit after SIGINT. offcputime prints its stacks first.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// File and constant that set how often stalltrace scans its thread map for ongoing stalls.
const SCAN_INTERVAL_SOURCE: &str = "tracer-user/src/live.rs";
const SCAN_INTERVAL_PREFIX: &str = "pub const SCAN_INTERVAL: Duration = Duration::from_millis(";

/// The targets that BENCHMARKS.md checks.
const TARGET_PINGPONG_LOSS: f64 = 0.02;
/// An ongoing stall is due within the threshold plus this.
const TARGET_STALL_SLACK_NS: u64 = 100_000_000;
const TARGET_NS_PER_RUN: f64 = 150.0;
const TARGET_CYCLE_NS: u64 = 1_000_000_000;

const SIGINT: i32 = 2;
const SIGKILL: i32 = 9;
const CLOCK_MONOTONIC: i32 = 1;
const SC_CLK_TCK: i32 = 2;

#[repr(C)]
struct Timespec {
    tv_sec: i64,
    tv_nsec: i64,
}

extern "C" {
    fn kill(pid: i32, signal: i32) -> i32;
    fn clock_gettime(clock: i32, time: *mut Timespec) -> i32;
    fn sysconf(name: i32) -> i64;
}

/// A bpftrace script that sums off-CPU time by kernel stack, user stack and command, as
/// offcputime does. At each `sched_switch` it keeps the time and stacks of the task that
/// leaves the CPU. When that task is switched back in, it adds the time it was away.
const BPFTRACE_OFFCPU: &str = r#"tracepoint:sched:sched_switch
{
  @start[args->prev_pid] = nsecs;
  @kstk[args->prev_pid] = kstack;
  @ustk[args->prev_pid] = ustack;
  $last = @start[args->next_pid];
  if ($last != 0) {
    @off[@kstk[args->next_pid], @ustk[args->next_pid], args->next_comm] = sum(nsecs - $last);
    delete(@start[args->next_pid]);
    delete(@kstk[args->next_pid]);
    delete(@ustk[args->next_pid]);
  }
}

END
{
  clear(@start);
  clear(@kstk);
  clear(@ustk);
}
"#;

/// A bpftrace script whose two programs, `sched_switch` and `sys_enter`, run once per
/// context switch and once per syscall. Their kernel run counts are the raw event counts.
/// stalltrace's own programs cannot give them, because it attaches `sys_enter` only as a
/// fallback.
const BPFTRACE_COUNTER: &str = r#"tracepoint:sched:sched_switch { @switches = count(); }
tracepoint:raw_syscalls:sys_enter { @syscalls = count(); }
"#;

/// Runs every benchmark and writes `BENCHMARKS.md` under `root`.
pub fn run(root: &Path, stalltrace: &Path, runs: usize) -> Result<()> {
    if !crate::is_root() {
        bail!("the benchmarks load BPF programs and need root: run `sudo -E cargo xtask bench`");
    }
    if runs < 2 {
        bail!("--runs {runs} is too few for a spread: use 2 or more");
    }
    let started = Instant::now();
    step("building the benchmark workloads");
    run_checked(Command::new("cargo").current_dir(root).args([
        "build",
        "--release",
        "--package",
        "stalltrace-tests",
        "--bin",
        "futex-pingpong",
        "--bin",
        "bench-deadlock",
        "--bin",
        "loop-workload",
    ]))?;
    let release = root.join("target/release");
    let work_dir = root.join("target/bench");
    let _ = fs::remove_dir_all(&work_dir);
    fs::create_dir_all(&work_dir).with_context(|| format!("failed to create {}", work_dir.display()))?;

    // Other builds in the same tree may replace target/release while the benchmarks run,
    // so every run uses copies taken now.
    let copy = |source: &Path| -> Result<PathBuf> {
        let name = source.file_name().context("a binary path has a file name")?;
        let target = work_dir.join(name);
        fs::copy(source, &target)
            .with_context(|| format!("failed to copy {} to {}", source.display(), target.display()))?;
        Ok(target)
    };
    let setup = Setup {
        stalltrace: copy(stalltrace)?,
        pingpong: copy(&release.join("futex-pingpong"))?,
        deadlock: copy(&release.join("bench-deadlock"))?,
        loop_workload: copy(&release.join("loop-workload"))?,
        bpftrace_script: work_dir.join("offcpu.bt"),
        counter_script: work_dir.join("count.bt"),
        work_dir: work_dir.clone(),
        scan_interval_ns: scan_interval_ns(root)?,
    };
    for (path, script) in [(&setup.bpftrace_script, BPFTRACE_OFFCPU), (&setup.counter_script, BPFTRACE_COUNTER)] {
        fs::write(path, script).with_context(|| format!("failed to write {}", path.display()))?;
    }

    let machine_before = MachineState::read()?;
    let machine = Machine::describe(root)?;
    let redis = RedisServer::start(&work_dir)?;

    let overhead = measure_overhead(&setup, &redis, runs)?;
    let costs = measure_costs(&setup, &redis)?;
    let stall_latency = measure_stall_latency(&setup)?;
    let cycle_latency = measure_cycle_latency(&setup)?;
    drop(redis);

    let machine_after = MachineState::read()?;
    let results = Results {
        machine,
        before: machine_before,
        after: machine_after,
        runs,
        overhead,
        costs,
        stall_latency,
        cycle_latency,
        elapsed: started.elapsed(),
    };
    let path = root.join("BENCHMARKS.md");
    fs::write(&path, render(&results)).with_context(|| format!("failed to write {}", path.display()))?;
    step(&format!("wrote {} in {:.0} s", path.display(), started.elapsed().as_secs_f64()));
    for line in target_rows(&results) {
        step(&format!("target: {} -> {} ({})", line.target, line.result, if line.met { "met" } else { "not met" }));
    }
    Ok(())
}

/// Paths the benchmarks use.
struct Setup {
    stalltrace: PathBuf,
    pingpong: PathBuf,
    deadlock: PathBuf,
    loop_workload: PathBuf,
    bpftrace_script: PathBuf,
    counter_script: PathBuf,
    work_dir: PathBuf,
    /// stalltrace's scan interval, read from its source.
    scan_interval_ns: u64,
}

// ---------------------------------------------------------------------------------------
// Tracers

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Tracer {
    None,
    Stalltrace,
    Offcputime,
    Bpftrace,
    /// Not a compared tracer: bpftrace counting the raw events of the statistics pass.
    EventCounter,
}

const TRACERS: [Tracer; 4] = [Tracer::None, Tracer::Stalltrace, Tracer::Offcputime, Tracer::Bpftrace];

impl Tracer {
    fn label(self) -> &'static str {
        match self {
            Tracer::None => "no tracer",
            Tracer::Stalltrace => "stalltrace watch",
            Tracer::Offcputime => "offcputime",
            Tracer::Bpftrace => "bpftrace off-CPU script",
            Tracer::EventCounter => "bpftrace event counter",
        }
    }

    /// Returns the command line, or `None` for no tracer.
    fn command(self, setup: &Setup, json: bool) -> Option<Command> {
        match self {
            Tracer::None => None,
            Tracer::Stalltrace => {
                let mut command = Command::new(&setup.stalltrace);
                command.arg("watch");
                if json {
                    command.arg("--json");
                }
                Some(command)
            }
            Tracer::Offcputime => {
                // The argument is the duration in seconds. SIGINT ends it sooner.
                let mut command = Command::new("offcputime");
                command.arg("86400");
                Some(command)
            }
            Tracer::Bpftrace => {
                let mut command = Command::new("bpftrace");
                command.arg(&setup.bpftrace_script);
                Some(command)
            }
            Tracer::EventCounter => {
                let mut command = Command::new("bpftrace");
                command.arg(&setup.counter_script);
                Some(command)
            }
        }
    }
}

/// A running tracer. Drop stops it with SIGINT, then SIGKILL, so no BPF program stays
/// attached after an error.
struct TracerProcess {
    tracer: Tracer,
    child: Child,
    stderr_path: PathBuf,
}

impl TracerProcess {
    /// Starts the tracer with stdout to `stdout_path` (or /dev/null) and waits until it has attached.
    fn start(tracer: Tracer, setup: &Setup, stdout_path: Option<&Path>) -> Result<Option<Self>> {
        let Some(mut command) = tracer.command(setup, stdout_path.is_some()) else {
            thread::sleep(TRACER_SETTLE);
            return Ok(None);
        };

        let name = format!("{tracer:?}").to_lowercase();
        let stderr_path = setup.work_dir.join(format!("{name}.stderr"));
        let stderr = File::create(&stderr_path).with_context(|| format!("failed to create {}", stderr_path.display()))?;

        // bpftrace prints `Attaching N probes...` on stdout, so its stdout goes to a file too.
        let stdout_file = match (stdout_path, tracer) {
            (Some(path), _) => Some(path.to_path_buf()),
            (None, Tracer::Bpftrace | Tracer::EventCounter) => Some(setup.work_dir.join(format!("{name}.stdout"))),
            (None, _) => None,
        };
        let stdout = match &stdout_file {
            Some(path) => Stdio::from(File::create(path).with_context(|| format!("failed to create {}", path.display()))?),
            None => Stdio::null(),
        };

        let child = command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("failed to start {}", tracer.label()))?;

        let mut process = Self {
            tracer,
            child,
            stderr_path,
        };
        process.wait_attached(stdout_file.as_deref())?;
        thread::sleep(TRACER_SETTLE);
        Ok(Some(process))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_attached(&mut self, stdout_path: Option<&Path>) -> Result<()> {
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited with {status} before it attached; stderr:\n{}",
                    self.tracer.label(),
                    read_lossy(&self.stderr_path)
                );
            }
            let attached = match self.tracer {
                Tracer::Stalltrace => read_lossy(&self.stderr_path).contains("attached"),
                // bpftrace attaches right after it prints this line, and then has a
                // perf event per attached tracepoint and CPU buffer.
                Tracer::Bpftrace | Tracer::EventCounter => {
                    stdout_path.is_some_and(|path| read_lossy(path).contains("Attaching"))
                        && fd_kinds(self.pid()).contains_key("anon_inode:[perf_event]")
                }
                // libbpf skeletons attach through BPF links.
                Tracer::Offcputime => fd_kinds(self.pid()).contains_key("anon_inode:bpf_link"),
                Tracer::None => true,
            };
            if attached {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not attach within {ATTACH_TIMEOUT:?}; stderr:\n{}",
                    self.tracer.label(),
                    read_lossy(&self.stderr_path)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the tracer with SIGINT, checks that it exited cleanly and returns its stderr.
    fn stop(mut self) -> Result<String> {
        let status = self.interrupt_and_wait()?;
        let stderr = read_lossy(&self.stderr_path);
        if !status.success() {
            bail!("{} exited with {status} after SIGINT; stderr:\n{stderr}", self.tracer.label());
        }
        Ok(stderr)
    }

    fn interrupt_and_wait(&mut self) -> Result<std::process::ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        send_signal(self.pid(), SIGINT);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                send_signal(self.pid(), SIGKILL);
                let _ = self.child.wait();
                bail!("{} did not exit within {STOP_TIMEOUT:?} of SIGINT and was killed", self.tracer.label());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TracerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Err(error) = self.interrupt_and_wait() {
                step(&format!("warning: {error:#}"));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Throughput

/// Throughput samples of one workload metric, by tracer.
#[derive(Default)]
struct Series {
    samples: BTreeMap<Tracer, Vec<f64>>,
}

struct Overhead {
    /// Both ping-pong threads on one CPU: every hand-off is a context switch on that CPU.
    pingpong: Series,
    /// Ping-pong threads free to run on any CPU, so hand-offs also cross CPUs.
    pingpong_unpinned: Series,
    redis_set: Series,
    redis_get: Series,
    /// Samples during which processes other than the tracer had tracing BPF programs
    /// loaded, out of `samples`.
    disturbed_samples: usize,
    samples: usize,
}

fn measure_overhead(setup: &Setup, redis: &RedisServer, runs: usize) -> Result<Overhead> {
    let mut overhead = Overhead {
        pingpong: Series::default(),
        pingpong_unpinned: Series::default(),
        redis_set: Series::default(),
        redis_get: Series::default(),
        disturbed_samples: 0,
        samples: 0,
    };
    let mut quiet_wait = QuietWait::new();
    for run in 0..runs {
        // Each run rotates the tracer order, so slow drift on a shared host spreads
        // over every tracer instead of landing on one.
        for offset in 0..TRACERS.len() {
            let tracer = TRACERS[(run + offset) % TRACERS.len()];
            step(&format!("throughput run {}/{runs}: {}", run + 1, tracer.label()));
            let foreign_before = quiet_wait.wait();
            let process = TracerProcess::start(tracer, setup, None)?;
            let pingpong = run_pingpong(setup, Pinning::OneCpu)?;
            let unpinned = run_pingpong(setup, Pinning::None)?;
            let (set, get) = redis.benchmark()?;
            let foreign_after = foreign_tracing_programs(process.as_ref().map(TracerProcess::pid));
            if let Some(process) = process {
                process.stop()?;
            }
            overhead.samples += 1;
            if foreign_before + foreign_after > 0 {
                overhead.disturbed_samples += 1;
                step(&format!("  other processes had {foreign_before} tracing programs loaded before and {foreign_after} after this sample"));
            }
            step(&format!(
                "  ping-pong {pingpong:.0} round trips/s pinned, {unpinned:.0} unpinned; SET {set:.0}/s, GET {get:.0}/s"
            ));
            overhead.pingpong.samples.entry(tracer).or_default().push(pingpong);
            overhead.pingpong_unpinned.samples.entry(tracer).or_default().push(unpinned);
            overhead.redis_set.samples.entry(tracer).or_default().push(set);
            overhead.redis_get.samples.entry(tracer).or_default().push(get);
        }
    }
    Ok(overhead)
}

/// Waits for other processes' tracing BPF programs to go away before a sample, within a
/// budget for the whole benchmark, because they slow every run, the untraced ones too.
struct QuietWait {
    budget: Duration,
}

/// Maximum wait for other tracers to unload, before one sample and over the whole benchmark.
const QUIET_WAIT_PER_SAMPLE: Duration = Duration::from_secs(60);
const QUIET_WAIT_TOTAL: Duration = Duration::from_secs(300);

impl QuietWait {
    fn new() -> Self {
        Self { budget: QUIET_WAIT_TOTAL }
    }

    /// Waits until no other tracing program is loaded or the budget runs out, and returns
    /// how many are still loaded.
    fn wait(&mut self) -> usize {
        let started = Instant::now();
        let limit = QUIET_WAIT_PER_SAMPLE.min(self.budget);
        let mut foreign = foreign_tracing_programs(None);
        if foreign > 0 {
            step(&format!("  waiting up to {:.0} s for {foreign} tracing programs of other processes to go", limit.as_secs_f64()));
        }
        while foreign > 0 && started.elapsed() < limit {
            thread::sleep(Duration::from_millis(500));
            foreign = foreign_tracing_programs(None);
        }
        self.budget = self.budget.saturating_sub(started.elapsed());
        foreign
    }
}

#[derive(Clone, Copy)]
enum Pinning {
    /// Both threads on the last CPU.
    OneCpu,
    None,
}

/// Runs `futex-pingpong` for PINGPONG_MS and returns its round trips per second.
fn run_pingpong(setup: &Setup, pinning: Pinning) -> Result<f64> {
    let mut command = Command::new(&setup.pingpong);
    command.args(["--duration-ms", &PINGPONG_MS.to_string()]);
    if let Pinning::OneCpu = pinning {
        let last_cpu = thread::available_parallelism().map_or(1, |count| count.get()) - 1;
        command.args(["--pin", &last_cpu.to_string()]);
    }
    let text = output(&mut command)?;
    json_number(&text, "round_trips_per_sec").with_context(|| format!("futex-pingpong printed no rate: `{}`", text.trim()))
}

/// Running `redis-server` on 127.0.0.1 with persistence off. Drop kills it.
struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    fn start(dir: &Path) -> Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .context("failed to find a free port on 127.0.0.1")?
            .port();
        let log_path = dir.join("redis.log");
        let log = File::create(&log_path).with_context(|| format!("failed to create {}", log_path.display()))?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("failed to start redis-server")?;
        let mut server = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!("redis-server exited with {status}; log:\n{}", read_lossy(&log_path));
            }
            let ping = Command::new("redis-cli")
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "ping"])
                .stdin(Stdio::null())
                .output();
            if ping.is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "PONG") {
                return Ok(server);
            }
            if Instant::now() >= deadline {
                bail!("redis-server on port {port} did not reply to PING within 10 s; log:\n{}", read_lossy(&log_path));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `redis-benchmark -n REDIS_REQUESTS -t set,get --csv` and returns the SET and GET rates.
    fn benchmark(&self) -> Result<(f64, f64)> {
        let text = output(
            Command::new("redis-benchmark")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-n", &REDIS_REQUESTS.to_string(), "-t", "set,get", "--csv"])
                .stdin(Stdio::null()),
        )?;
        let rate = |test: &str| -> Result<f64> {
            text.lines()
                .find_map(|line| {
                    let fields: Vec<&str> = line.split(',').map(|field| field.trim_matches('"')).collect();
                    (fields.first() == Some(&test)).then(|| fields.get(1)?.parse::<f64>().ok()).flatten()
                })
                .with_context(|| format!("redis-benchmark printed no {test} rate:\n{text}"))
        };
        Ok((rate("SET")?, rate("GET")?))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// BPF program costs, records and userspace cost

/// Run-time statistics of one BPF program, as the kernel counts them while
/// `kernel.bpf_stats_enabled` is 1.
#[derive(Clone, Copy, Default)]
struct ProgramStats {
    run_time_ns: u64,
    run_count: u64,
}

/// One look at a tracer process.
struct Snapshot {
    at: Instant,
    programs: BTreeMap<String, ProgramStats>,
    cpu_ticks: u64,
    rss_kib: u64,
    peak_rss_kib: u64,
    /// `ended` lines of `watch --json` that stand for a record from the ring buffer.
    records: u64,
    /// Statistics of the event counter's programs, which count the raw events.
    raw_events: BTreeMap<String, ProgramStats>,
}

impl Snapshot {
    fn take(pid: u32, json_lines: Option<&Path>, counter_pid: Option<u32>, names: &mut ProgramNames) -> Result<Self> {
        let records = match json_lines {
            Some(path) => read_lossy(path)
                .lines()
                .filter(|line| line.contains(r#""event":"ended""#) && !line.contains(r#""ended_by":"lost""#))
                .count() as u64,
            None => 0,
        };
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        Ok(Self {
            at: Instant::now(),
            programs: program_stats(pid, names)?,
            cpu_ticks: cpu_ticks(pid)?,
            rss_kib: status_kib(&status, "VmRSS:")?,
            peak_rss_kib: status_kib(&status, "VmHWM:")?,
            records,
            raw_events: match counter_pid {
                Some(counter_pid) => program_stats(counter_pid, names)?,
                None => BTreeMap::new(),
            },
        })
    }
}

/// The difference between two snapshots, as rates and averages.
struct Window {
    seconds: f64,
    /// Average nanoseconds per run and runs per second, by program.
    programs: BTreeMap<String, (f64, f64)>,
    raw_events_per_sec: f64,
    records_per_sec: f64,
    cpu_percent: f64,
    rss_kib: u64,
    peak_rss_kib: u64,
}

impl Window {
    fn between(first: &Snapshot, second: &Snapshot) -> Self {
        let seconds = second.at.duration_since(first.at).as_secs_f64();
        let mut programs = BTreeMap::new();
        for (name, after) in &second.programs {
            let before = first.programs.get(name).copied().unwrap_or_default();
            let runs = after.run_count.saturating_sub(before.run_count);
            let time = after.run_time_ns.saturating_sub(before.run_time_ns);
            let average = if runs == 0 { 0.0 } else { time as f64 / runs as f64 };
            programs.insert(name.clone(), (average, runs as f64 / seconds));
        }
        let raw_runs = |name: &str| {
            let after = second.raw_events.get(name).map_or(0, |stats| stats.run_count);
            let before = first.raw_events.get(name).map_or(0, |stats| stats.run_count);
            after.saturating_sub(before) as f64
        };
        // SAFETY: sysconf has no memory preconditions.
        let ticks_per_sec = unsafe { sysconf(SC_CLK_TCK) }.max(1) as f64;
        Self {
            seconds,
            raw_events_per_sec: (raw_runs("sched_switch") + raw_runs("sys_enter")) / seconds,
            records_per_sec: second.records.saturating_sub(first.records) as f64 / seconds,
            cpu_percent: second.cpu_ticks.saturating_sub(first.cpu_ticks) as f64 / ticks_per_sec / seconds * 100.0,
            rss_kib: second.rss_kib,
            peak_rss_kib: second.peak_rss_kib,
            programs,
        }
    }
}

struct Costs {
    /// stalltrace during the ping-pong, then during redis-benchmark.
    stalltrace_pingpong: Window,
    stalltrace_redis: Window,
    stalltrace_drops: Option<u64>,
    offcputime_pingpong: Window,
    bpftrace_pingpong: Window,
}

/// Sets `kernel.bpf_stats_enabled` to 1 and back to its old value on drop.
struct BpfStats {
    old: String,
}

const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> Result<Self> {
        let old = fs::read_to_string(BPF_STATS_SYSCTL).with_context(|| format!("failed to read {BPF_STATS_SYSCTL}"))?;
        fs::write(BPF_STATS_SYSCTL, "1").with_context(|| format!("failed to write 1 to {BPF_STATS_SYSCTL}"))?;
        Ok(Self { old: old.trim().to_owned() })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(error) = fs::write(BPF_STATS_SYSCTL, &self.old) {
            step(&format!("warning: failed to restore {BPF_STATS_SYSCTL} to {}: {error}", self.old));
        }
    }
}

fn measure_costs(setup: &Setup, redis: &RedisServer) -> Result<Costs> {
    let mut names = ProgramNames::default();

    step("BPF statistics: stalltrace watch --json during the ping-pong and redis-benchmark");
    let json_path = setup.work_dir.join("stalltrace-watch.jsonl");
    let process = TracerProcess::start(Tracer::Stalltrace, setup, Some(&json_path))?
        .context("stalltrace has a command")?;
    let pid = process.pid();
    let counter = TracerProcess::start(Tracer::EventCounter, setup, None)?.context("the event counter has a command")?;
    let counter_pid = Some(counter.pid());
    let (pingpong, redis_window) = {
        let _stats = BpfStats::enable()?;
        let start = Snapshot::take(pid, Some(&json_path), counter_pid, &mut names)?;
        run_pingpong(setup, Pinning::OneCpu)?;
        let middle = Snapshot::take(pid, Some(&json_path), counter_pid, &mut names)?;
        redis.benchmark()?;
        let end = Snapshot::take(pid, Some(&json_path), counter_pid, &mut names)?;
        (Window::between(&start, &middle), Window::between(&middle, &end))
    };
    counter.stop()?;
    let stderr = process.stop()?;
    let drops = parse_drops(&stderr);

    let mut peers = Vec::new();
    for tracer in [Tracer::Offcputime, Tracer::Bpftrace] {
        step(&format!("BPF statistics: {} during the ping-pong", tracer.label()));
        let process = TracerProcess::start(tracer, setup, None)?.context("peer tools have a command")?;
        let window = {
            let _stats = BpfStats::enable()?;
            let start = Snapshot::take(process.pid(), None, None, &mut names)?;
            run_pingpong(setup, Pinning::OneCpu)?;
            let end = Snapshot::take(process.pid(), None, None, &mut names)?;
            Window::between(&start, &end)
        };
        process.stop()?;
        peers.push(window);
    }
    let bpftrace_pingpong = peers.pop().context("bpftrace window")?;
    let offcputime_pingpong = peers.pop().context("offcputime window")?;
    Ok(Costs {
        stalltrace_pingpong: pingpong,
        stalltrace_redis: redis_window,
        stalltrace_drops: drops,
        offcputime_pingpong,
        bpftrace_pingpong,
    })
}

/// Reads the total of dropped records from stalltrace's summary line
/// (`... over 5.00s, threshold 1.40ms, 0 records dropped, 0 threads untracked`).
fn parse_drops(stderr: &str) -> Option<u64> {
    stderr.lines().rev().find_map(|line| {
        let before = line.split(" records dropped").next().filter(|_| line.contains(" records dropped"))?;
        before.rsplit(' ').next()?.parse().ok()
    })
}

/// BPF program names by ID, from `bpftool prog show id ID`.
#[derive(Default)]
struct ProgramNames {
    by_id: BTreeMap<u32, String>,
}

impl ProgramNames {
    fn name(&mut self, id: u32) -> Result<String> {
        if let Some(name) = self.by_id.get(&id) {
            return Ok(name.clone());
        }
        let text = output(Command::new("bpftool").args(["prog", "show", "id", &id.to_string()]))?;
        // First line: `ID: TYPE  name NAME  tag ...`. An unnamed program has no `name` field.
        let name = text
            .split_whitespace()
            .skip_while(|word| *word != "name")
            .nth(1)
            .map_or_else(|| format!("id {id}"), str::to_owned);
        self.by_id.insert(id, name.clone());
        Ok(name)
    }
}

/// Returns the run-time statistics of every BPF program that process `pid` has open,
/// read from `/proc/PID/fdinfo`.
fn program_stats(pid: u32, names: &mut ProgramNames) -> Result<BTreeMap<String, ProgramStats>> {
    let mut programs = BTreeMap::new();
    let fd_dir = format!("/proc/{pid}/fd");
    for entry in fs::read_dir(&fd_dir).with_context(|| format!("failed to list {fd_dir}"))? {
        let entry = entry?;
        let Ok(target) = fs::read_link(entry.path()) else { continue };
        if target.as_os_str() != "anon_inode:bpf-prog" {
            continue;
        }
        let fd = entry.file_name();
        let Ok(info) = fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.to_string_lossy())) else {
            continue;
        };
        let field = |key: &str| -> Option<u64> {
            info.lines()
                .find_map(|line| line.strip_prefix(key))
                .and_then(|value| value.trim().parse().ok())
        };
        let (Some(id), Some(run_time_ns), Some(run_count)) = (field("prog_id:"), field("run_time_ns:"), field("run_cnt:")) else {
            continue;
        };
        let name = names.name(id as u32)?;
        let stats = programs.entry(name).or_insert_with(ProgramStats::default);
        stats.run_time_ns += run_time_ns;
        stats.run_count += run_count;
    }
    if programs.is_empty() {
        bail!("no BPF program found among the open files of process {pid}: did the tracer exit?");
    }
    Ok(programs)
}

/// Returns utime + stime of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesized command start at field 3 (state); utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').context("malformed /proc/PID/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |index: usize| -> Result<u64> {
        fields
            .get(index)
            .and_then(|value| value.parse().ok())
            .with_context(|| format!("malformed /proc/{pid}/stat"))
    };
    Ok(ticks(11)? + ticks(12)?)
}

fn status_kib(status: &str, key: &str) -> Result<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {key} in /proc/PID/status"))
}

// ---------------------------------------------------------------------------------------
// Detection latency

/// A line of a child's stdout with its CLOCK_MONOTONIC arrival time.
struct Line {
    arrival_ns: u64,
    text: String,
}

/// Starts a thread that sends each stdout line of `child` with its arrival time.
fn stamp_lines(stdout: impl Read + Send + 'static) -> Receiver<Line> {
    let (sender, receiver) = mpsc::channel();
    thread::spawn(move || {
        for text in BufReader::new(stdout).lines() {
            let Ok(text) = text else { return };
            if sender.send(Line { arrival_ns: monotonic_ns(), text }).is_err() {
                return;
            }
        }
    });
    receiver
}

/// Returns the next line that `accept` takes, or `None` after `timeout`.
fn next_line(lines: &Receiver<Line>, timeout: Duration, mut accept: impl FnMut(&Line) -> bool) -> Option<Line> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match lines.recv_timeout(left) {
            Ok(line) if accept(&line) => return Some(line),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// A running stalltrace `watch --json` whose stdout lines arrive stamped. Drop stops it.
struct JsonWatch {
    child: Child,
    lines: Receiver<Line>,
    stderr_path: PathBuf,
}

impl JsonWatch {
    fn start(setup: &Setup, pids: &[u32], name: &str) -> Result<Self> {
        let stderr_path = setup.work_dir.join(format!("{name}.stderr"));
        let stderr = File::create(&stderr_path)?;
        let mut command = Command::new(&setup.stalltrace);
        command.args(["watch", "--json"]);
        for pid in pids {
            command.args(["--pid", &pid.to_string()]);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .context("failed to start stalltrace watch --json")?;
        let lines = stamp_lines(child.stdout.take().context("stdout is piped")?);
        let mut watch = Self {
            child,
            lines,
            stderr_path,
        };
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        while !read_lossy(&watch.stderr_path).contains("attached") {
            if let Ok(Some(status)) = watch.child.try_wait() {
                bail!("stalltrace exited with {status} before it attached; stderr:\n{}", read_lossy(&watch.stderr_path));
            }
            if Instant::now() >= deadline {
                bail!("stalltrace did not attach within {ATTACH_TIMEOUT:?}; stderr:\n{}", read_lossy(&watch.stderr_path));
            }
            thread::sleep(Duration::from_millis(20));
        }
        thread::sleep(TRACER_SETTLE);
        Ok(watch)
    }

    /// Returns the threshold from `stalltrace: threshold 1.40ms (...)`, in nanoseconds.
    fn threshold_ns(&self) -> Result<u64> {
        let stderr = read_lossy(&self.stderr_path);
        let word = stderr
            .lines()
            .find_map(|line| line.strip_prefix("stalltrace: threshold "))
            .and_then(|rest| rest.split_whitespace().next())
            .context("stalltrace printed no threshold line")?;
        parse_duration_ns(word).with_context(|| format!("invalid threshold `{word}` in stalltrace's output"))
    }

    fn stop(mut self) -> Result<()> {
        send_signal(self.child.id(), SIGINT);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("stalltrace exited with {status}; stderr:\n{}", read_lossy(&self.stderr_path));
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("stalltrace did not exit within {STOP_TIMEOUT:?} of SIGINT");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for JsonWatch {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            send_signal(self.child.id(), SIGINT);
            let deadline = Instant::now() + STOP_TIMEOUT;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One timed stall: the command, when its handler started and when stalltrace printed
/// `detected` (`None` if it never did).
struct StallTiming {
    command: String,
    latency_ns: Option<u64>,
}

struct StallLatency {
    threshold_ns: u64,
    scan_interval_ns: u64,
    timings: Vec<StallTiming>,
}

fn measure_stall_latency(setup: &Setup) -> Result<StallLatency> {
    step("detection latency: ongoing stalls of loop-workload");
    let mut workload = Command::new(&setup.loop_workload)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("failed to start loop-workload")?;
    let result = time_stalls(setup, &mut workload);
    drop(workload.stdin.take());
    let _ = workload.kill();
    let _ = workload.wait();
    result
}

fn time_stalls(setup: &Setup, workload: &mut Child) -> Result<StallLatency> {
    let workload_lines = stamp_lines(workload.stdout.take().context("stdout is piped")?);
    let mut stdin: ChildStdin = workload.stdin.take().context("stdin is piped")?;
    let start = next_line(&workload_lines, Duration::from_secs(10), |_| true).context("loop-workload printed no start line")?;
    let pid = json_u64(&start.text, "pid").context("no pid in loop-workload's start line")?;
    let loop_tid = json_u64(&start.text, "loop_tid").context("no loop_tid in loop-workload's start line")?;

    let watch = JsonWatch::start(setup, &[pid as u32], "latency-stalls")?;
    let threshold_ns = watch.threshold_ns()?;
    let mut timings = Vec::new();
    for kind in ["spin", "sleep"] {
        for repeat in 0..LATENCY_REPEATS {
            // Without this offset, each command would start at the same point of the scan
            // cycle as the last one, because 2 s plus the fixed pause below is a whole
            // number of scan intervals.
            let offset_ns = setup.scan_interval_ns * repeat as u64 / LATENCY_REPEATS as u64;
            thread::sleep(Duration::from_nanos(offset_ns));
            let command = format!("{kind} {STALL_MS}");
            std::io::Write::write_all(&mut stdin, format!("{command}\n").as_bytes())?;
            let done = next_line(&workload_lines, Duration::from_millis(STALL_MS + 10_000), |line| {
                line.text.contains(r#""done""#)
            })
            .with_context(|| format!("loop-workload did not finish `{command}`"))?;
            let handler_start_ns = json_u64(&done.text, "start_ns").context("no start_ns in the done line")?;
            // The stall starts a few microseconds before the handler, at the return of epoll_wait.
            let detected = next_line(&watch.lines, Duration::from_secs(2), |line| {
                line.text.contains(r#""event":"detected""#)
                    && stall_field(&line.text, "tid") == Some(loop_tid)
                    && stall_field(&line.text, "start_ns")
                        .is_some_and(|start_ns| start_ns <= handler_start_ns && handler_start_ns - start_ns < 50_000_000)
            });
            let latency_ns = detected.map(|line| line.arrival_ns.saturating_sub(handler_start_ns));
            step(&format!(
                "  `{command}`: detected {}",
                latency_ns.map_or("never".to_owned(), |ns| format!("after {:.1} ms", ns as f64 / 1e6))
            ));
            timings.push(StallTiming { command, latency_ns });
            // Let the `ended` line of this stall arrive before the next command.
            thread::sleep(Duration::from_millis(300));
            while watch.lines.try_recv().is_ok() {}
        }
    }
    watch.stop()?;
    Ok(StallLatency {
        threshold_ns,
        scan_interval_ns: setup.scan_interval_ns,
        timings,
    })
}

/// Returns a number field of the `stall` object of a `watch --json` line.
fn stall_field(line: &str, key: &str) -> Option<u64> {
    let stall = &line[line.find(r#""stall":{"#)?..];
    json_u64(stall, key)
}

fn measure_cycle_latency(setup: &Setup) -> Result<Vec<Option<u64>>> {
    step("detection latency: two-thread pthread deadlocks");
    // The deadlock starts as soon as the process does, so stalltrace watches every process.
    let watch = JsonWatch::start(setup, &[], "latency-cycles")?;
    let mut latencies = Vec::new();
    for _ in 0..LATENCY_REPEATS {
        let mut child = Command::new(&setup.deadlock)
            .args(["--exit-after-ms", &DEADLOCK_LIFETIME_MS.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("failed to start bench-deadlock")?;
        let lines = stamp_lines(child.stdout.take().context("stdout is piped")?);
        let mut attempts = Vec::new();
        while attempts.len() < 2 {
            let line = next_line(&lines, Duration::from_secs(5), |line| line.text.contains("attempt_ns"))
                .context("bench-deadlock did not print both lock attempts")?;
            let tid = json_u64(&line.text, "tid").context("no tid in an attempt line")?;
            let ns = json_u64(&line.text, "attempt_ns").context("no attempt_ns in an attempt line")?;
            attempts.push((tid, ns));
        }
        let cycle_start_ns = attempts.iter().map(|&(_, ns)| ns).max().unwrap_or(0);
        let mut tids: Vec<u64> = attempts.iter().map(|&(tid, _)| tid).collect();
        tids.sort_unstable();
        let found = next_line(&watch.lines, Duration::from_millis(DEADLOCK_LIFETIME_MS), |line| {
            line.text.contains(r#""event":"cycle""#) && cycle_tids(&line.text) == tids
        });
        let latency = found.map(|line| line.arrival_ns.saturating_sub(cycle_start_ns));
        step(&format!(
            "  deadlock of tids {tids:?}: cycle {}",
            latency.map_or("never reported".to_owned(), |ns| format!("reported after {:.1} ms", ns as f64 / 1e6))
        ));
        latencies.push(latency);
        let _ = child.wait();
        while watch.lines.try_recv().is_ok() {}
    }
    watch.stop()?;
    Ok(latencies)
}

/// Returns the sorted `tids` of a `{"event":"cycle","cycle":{"tids":[...],...}}` line.
fn cycle_tids(line: &str) -> Vec<u64> {
    let Some(start) = line.find(r#""tids":["#) else {
        return Vec::new();
    };
    let rest = &line[start + r#""tids":["#.len()..];
    let list = rest.split(']').next().unwrap_or("");
    let mut tids: Vec<u64> = list.split(',').filter_map(|tid| tid.trim().parse().ok()).collect();
    tids.sort_unstable();
    tids
}

// ---------------------------------------------------------------------------------------
// Machine

struct Machine {
    date: String,
    cpu: String,
    cpus: usize,
    memory_gib: f64,
    kernel: String,
    virtualization: String,
    commit: String,
    tools: Vec<(String, String)>,
    foreign_tracing_programs: usize,
    cpuidle: String,
}

/// Load and steal counters, read before and after the benchmarks.
struct MachineState {
    load_average: String,
    /// Steal and total jiffies of all CPUs from the `cpu` line of /proc/stat.
    steal_jiffies: u64,
    total_jiffies: u64,
}

impl MachineState {
    fn read() -> Result<Self> {
        let load = fs::read_to_string("/proc/loadavg")?;
        let stat = fs::read_to_string("/proc/stat")?;
        let cpu: Vec<u64> = stat
            .lines()
            .next()
            .context("empty /proc/stat")?
            .split_whitespace()
            .skip(1)
            .filter_map(|value| value.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal guest guest_nice; guest time is already in user.
        Ok(Self {
            load_average: load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
            steal_jiffies: cpu.get(7).copied().unwrap_or(0),
            total_jiffies: cpu.iter().take(8).sum(),
        })
    }
}

impl Machine {
    fn describe(root: &Path) -> Result<Self> {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo")?;
        let cpu = cpuinfo
            .lines()
            .find_map(|line| line.strip_prefix("model name"))
            .map(|rest| rest.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        let cpus = thread::available_parallelism().map_or(0, |count| count.get());
        let meminfo = fs::read_to_string("/proc/meminfo")?;
        let memory_gib = status_kib(&meminfo, "MemTotal:")? as f64 / (1024.0 * 1024.0);
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")?.trim().to_owned();

        let commit = command_text(Command::new("git").current_dir(root).args(["rev-parse", "--short", "HEAD"]));
        let dirty = command_text(Command::new("git").current_dir(root).args(["status", "--porcelain", "--untracked-files=no"]));
        let commit = if dirty.is_empty() { commit } else { format!("{commit} with uncommitted changes") };

        let package = |name: &str| command_text(Command::new("dpkg-query").args(["--show", "--showformat=${Version}", name]));
        let tools = vec![
            ("libbpf-tools (offcputime)".to_owned(), package("libbpf-tools")),
            ("bpftrace".to_owned(), package("bpftrace")),
            ("bpftool".to_owned(), package("bpftool")),
            ("redis-server, redis-benchmark".to_owned(), package("redis-server")),
        ];

        Ok(Self {
            date: command_text(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])),
            cpu,
            cpus,
            memory_gib,
            kernel,
            virtualization: virtualization(),
            commit,
            tools,
            foreign_tracing_programs: foreign_tracing_programs(None),
            cpuidle: cpuidle(),
        })
    }
}

/// Describes the cpuidle driver, and the halt-polling limit of the haltpoll driver. An idle
/// vCPU that halts without polling takes a trip through the hypervisor to wake up again.
fn cpuidle() -> String {
    let read = |path: &str| fs::read_to_string(path).map(|text| text.trim().to_owned()).ok();
    let Some(driver) = read("/sys/devices/system/cpu/cpuidle/current_driver") else {
        return "unknown".to_owned();
    };
    match read("/sys/module/haltpoll/parameters/guest_halt_poll_ns") {
        Some(poll_ns) if driver == "haltpoll" => format!("haltpoll, guest_halt_poll_ns {poll_ns}"),
        _ => driver,
    }
}

/// Returns the hypervisor named by CPUID leaf 0x4000_0000, or `none` without one.
fn virtualization() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid;
        // CPUID leaf 1, ECX bit 31 is set under a hypervisor.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID exists on every x86_64 CPU.
        let features = unsafe { __cpuid(1) };
        if features.ecx & (1 << 31) == 0 {
            return "none".to_owned();
        }
        #[allow(unused_unsafe)]
        // SAFETY: as above.
        let leaf = unsafe { __cpuid(0x4000_0000) };
        let mut signature = Vec::new();
        for register in [leaf.ebx, leaf.ecx, leaf.edx] {
            signature.extend_from_slice(&register.to_le_bytes());
        }
        let signature = String::from_utf8_lossy(&signature).trim_end_matches('\0').to_owned();
        match signature.as_str() {
            "KVMKVMKVM" => "KVM".to_owned(),
            other => format!("hypervisor `{other}`"),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        "unknown".to_owned()
    }
}

/// Counts the tracing BPF programs loaded on the machine that process `own` (the running
/// tracer, if any) does not hold. Other tracers slow every run, the untraced ones included.
fn foreign_tracing_programs(own: Option<u32>) -> usize {
    let own_ids: Vec<u64> = own.map_or_else(Vec::new, |pid| {
        let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|entry| fs::read_to_string(entry.path()).ok())
            .filter_map(|info| info.lines().find_map(|line| line.strip_prefix("prog_id:"))?.trim().parse().ok())
            .collect()
    });
    let text = command_text(Command::new("bpftool").args(["prog", "show"]));
    // The first line of each program is `ID: TYPE  name NAME ...`.
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let id: u64 = words.next()?.strip_suffix(':')?.parse().ok()?;
            let kind = words.next()?;
            ["tracepoint", "raw_tracepoint", "tracing", "kprobe", "perf_event"].contains(&kind).then_some(id)
        })
        .filter(|id| !own_ids.contains(id))
        .count()
}

// ---------------------------------------------------------------------------------------
// Report

struct Results {
    machine: Machine,
    before: MachineState,
    after: MachineState,
    runs: usize,
    overhead: Overhead,
    costs: Costs,
    stall_latency: StallLatency,
    cycle_latency: Vec<Option<u64>>,
    elapsed: Duration,
}

struct Summary {
    mean: f64,
    stddev: f64,
    min: f64,
    max: f64,
}

fn summarize(samples: &[f64]) -> Summary {
    let count = samples.len().max(1) as f64;
    let mean = samples.iter().sum::<f64>() / count;
    let variance = samples.iter().map(|value| (value - mean).powi(2)).sum::<f64>() / (count - 1.0).max(1.0);
    Summary {
        mean,
        stddev: variance.sqrt(),
        min: samples.iter().copied().fold(f64::INFINITY, f64::min),
        max: samples.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    }
}

impl Series {
    fn summary(&self, tracer: Tracer) -> Summary {
        summarize(self.samples.get(&tracer).map_or(&[][..], Vec::as_slice))
    }

    /// Returns the throughput loss of `tracer`'s mean against the untraced mean, as a fraction.
    fn loss(&self, tracer: Tracer) -> f64 {
        1.0 - self.summary(tracer).mean / self.summary(Tracer::None).mean
    }
}

struct TargetRow {
    target: String,
    result: String,
    met: bool,
}

fn target_rows(results: &Results) -> Vec<TargetRow> {
    let pingpong = &results.overhead.pingpong;
    let stalltrace_loss = pingpong.loss(Tracer::Stalltrace);
    let offcputime_loss = pingpong.loss(Tracer::Offcputime);

    let averages = combined_averages(&[&results.costs.stalltrace_pingpong, &results.costs.stalltrace_redis]);
    let (worst_program, worst_ns) = averages
        .iter()
        .map(|(name, &(average, _))| (name.clone(), average))
        .fold(("none".to_owned(), 0.0), |worst, (name, average)| if average > worst.1 { (name, average) } else { worst });
    let (all_time, all_runs) = averages
        .values()
        .fold((0.0, 0.0), |(time, runs), &(average, count)| (time + average * count, runs + count));
    let overall_ns = if all_runs == 0.0 { 0.0 } else { all_time / all_runs };

    let stall_bound = results.stall_latency.threshold_ns + TARGET_STALL_SLACK_NS;
    let stall_worst = results.stall_latency.timings.iter().map(|timing| timing.latency_ns).max_by_key(|ns| ns.unwrap_or(u64::MAX));
    let stall_met = results.stall_latency.timings.iter().all(|timing| timing.latency_ns.is_some_and(|ns| ns <= stall_bound));
    let cycle_worst = results.cycle_latency.iter().copied().max_by_key(|ns| ns.unwrap_or(u64::MAX));
    let cycle_met = results.cycle_latency.iter().all(|ns| ns.is_some_and(|ns| ns <= TARGET_CYCLE_NS));
    let worst_text = |worst: Option<Option<u64>>| match worst {
        Some(Some(ns)) => format!("{:.1} ms at worst", ns as f64 / 1e6),
        Some(None) => "not reported at least once".to_owned(),
        None => "no measurement".to_owned(),
    };

    vec![
        TargetRow {
            target: "ping-pong throughput loss under 2% (pinned to one CPU)".to_owned(),
            result: format!("{:.1}% loss (mean of {} runs)", stalltrace_loss * 100.0, results.runs),
            met: stalltrace_loss < TARGET_PINGPONG_LOSS,
        },
        TargetRow {
            target: "ping-pong loss under half of offcputime's".to_owned(),
            result: format!("{:.1}% against {:.1}% for offcputime", stalltrace_loss * 100.0, offcputime_loss * 100.0),
            met: stalltrace_loss < offcputime_loss / 2.0,
        },
        TargetRow {
            target: "under 150 ns per run, on average, for each BPF program".to_owned(),
            result: format!(
                "highest: `{worst_program}` at {worst_ns:.0} ns; all programs together {overall_ns:.0} ns per run"
            ),
            met: worst_ns < TARGET_NS_PER_RUN,
        },
        TargetRow {
            target: format!(
                "ongoing stall reported within threshold + 100 ms ({:.1} ms)",
                stall_bound as f64 / 1e6
            ),
            result: worst_text(stall_worst),
            met: stall_met,
        },
        TargetRow {
            target: "lock cycle reported within 1 s".to_owned(),
            result: worst_text(cycle_worst),
            met: cycle_met,
        },
    ]
}

fn render(results: &Results) -> String {
    let mut text = String::new();
    let machine = &results.machine;
    let steal_jiffies = results.after.steal_jiffies.saturating_sub(results.before.steal_jiffies);
    let total_jiffies = results.after.total_jiffies.saturating_sub(results.before.total_jiffies).max(1);

    let _ = writeln!(text, "# Benchmarks\n");
    let _ = writeln!(
        text,
        "Written by `cargo xtask bench` (`xtask/src/bench.rs`) on {}; the run took {:.1} minutes. \
         Every number below comes from that run on the machine described here. \
         Run the command again to measure another machine or another version.\n",
        machine.date,
        results.elapsed.as_secs_f64() / 60.0
    );

    let _ = writeln!(text, "## Targets\n");
    let _ = writeln!(text, "| target | result | met |\n|---|---|---|");
    for row in target_rows(results) {
        let _ = writeln!(text, "| {} | {} | {} |", row.target, row.result, if row.met { "yes" } else { "**no**" });
    }

    let _ = writeln!(text, "\n## Machine\n");
    let _ = writeln!(text, "| | |\n|---|---|");
    let _ = writeln!(text, "| CPU | {} x {} |", machine.cpus, machine.cpu);
    let _ = writeln!(text, "| memory | {:.1} GiB |", machine.memory_gib);
    let _ = writeln!(text, "| kernel | {} |", machine.kernel);
    let _ = writeln!(text, "| virtualization | {} |", machine.virtualization);
    let _ = writeln!(
        text,
        "| steal during the run | {:.1}% of all CPU time (`/proc/stat`) |",
        steal_jiffies as f64 / total_jiffies as f64 * 100.0
    );
    let _ = writeln!(
        text,
        "| load average (1, 5, 15 min) | {} before, {} after |",
        results.before.load_average, results.after.load_average
    );
    let _ = writeln!(text, "| cpuidle | {} |", machine.cpuidle);
    let _ = writeln!(
        text,
        "| tracing BPF programs of other processes | {} loaded at the start; {} of {} throughput samples ran with some loaded (the benchmark waits up to {} s before each sample, {} s in all, for them to go) |",
        machine.foreign_tracing_programs,
        results.overhead.disturbed_samples,
        results.overhead.samples,
        QUIET_WAIT_PER_SAMPLE.as_secs(),
        QUIET_WAIT_TOTAL.as_secs()
    );
    let _ = writeln!(text, "| stalltrace | commit {}, release build |", machine.commit);
    for (tool, version) in &machine.tools {
        let _ = writeln!(text, "| {tool} | {version} (Debian package) |");
    }

    let _ = writeln!(text, "\n## Method\n");
    let _ = writeln!(
        text,
        "- Tracers: none; `stalltrace watch` (every process, default threshold, stdout to \
         /dev/null); libbpf-tools `offcputime` (every process, its defaults: user and kernel \
         stacks, off-CPU periods of 1 us or more); and a bpftrace script on \
         `sched_switch` that sums off-CPU time by kernel stack, user stack and command, \
         as offcputime does (the script is `BPFTRACE_OFFCPU` in `xtask/src/bench.rs`). \
         Each tracer is started, the benchmark waits until it has attached and 1 s more, \
         runs both workloads, and stops it with SIGINT."
    );
    let _ = writeln!(
        text,
        "- Workloads: `futex-pingpong` (`tests/src/bin/futex_pingpong.rs`): two threads \
         pass a token through `FUTEX_WAIT_PRIVATE`/`FUTEX_WAKE_PRIVATE` for {} s; the result \
         is round trips per second. It runs twice: with both threads pinned to one CPU, so \
         each hand-off is a context switch on that CPU, and unpinned. The pinned run is the \
         one the targets use, because an unpinned hand-off usually wakes a halted vCPU, which \
         on this VM (no guest halt polling) costs a trip through the hypervisor whose length \
         follows the host's load. Then `redis-benchmark -n {} -t set,get --csv` against a \
         `redis-server` on 127.0.0.1 with persistence off.",
        PINGPONG_MS / 1000,
        REDIS_REQUESTS
    );
    let _ = writeln!(
        text,
        "- {} runs; each run measures every tracer once, in an order rotated by one per run, so \
         drift in the host's load spreads over all tracers. The ratio is the tracer's mean over \
         the untraced mean; the range divides the tracer's slowest and fastest run by the \
         untraced mean.",
        results.runs
    );
    let _ = writeln!(
        text,
        "- BPF costs: a separate pass with `kernel.bpf_stats_enabled=1` (restored afterwards). \
         `run_time_ns` and `run_cnt` of each program come from `/proc/PID/fdinfo` of the \
         tracer's program file descriptors, before and after each workload; names from \
         `bpftool prog show id`. The statistics add two clock reads to every run, so this \
         pass is not part of the throughput numbers."
    );
    let _ = writeln!(
        text,
        "- Records: `ended` lines of `stalltrace watch --json` (each one is a record read from \
         the ring buffer; `lost` stalls are not records). Raw events: context switches and \
         syscalls in the same window, counted by a bpftrace script (`BPFTRACE_COUNTER`) that \
         runs next to stalltrace in this pass only. CPU: utime + stime of the stalltrace \
         process from `/proc/PID/stat`; memory: `VmRSS` and `VmHWM` from `/proc/PID/status`."
    );
    let _ = writeln!(
        text,
        "- Detection latency: `stalltrace watch --json --pid PID` on `loop-workload` with the \
         default threshold. The workload runs `spin {STALL_MS}` and `sleep {STALL_MS}` {} times \
         each, the starts spread evenly over stalltrace's scan cycle; the latency runs from the handler's `start_ns` (CLOCK_MONOTONIC, printed by the \
         workload) to the arrival of the `detected` line, stamped with CLOCK_MONOTONIC by the \
         benchmark as it reads stalltrace's stdout. Cycles: `stalltrace watch --json` on every \
         process, and `bench-deadlock` (`tests/src/bin/bench_deadlock.rs`) {} times; the \
         latency runs from the later of the two threads' second `pthread_mutex_lock` call to \
         the arrival of the `cycle` line.",
        LATENCY_REPEATS,
        LATENCY_REPEATS
    );

    let _ = writeln!(text, "\n## Throughput\n");
    for (title, unit, series) in [
        ("Futex ping-pong, both threads on one CPU", "round trips/s", &results.overhead.pingpong),
        ("Futex ping-pong, unpinned", "round trips/s", &results.overhead.pingpong_unpinned),
        ("redis-benchmark SET", "requests/s", &results.overhead.redis_set),
        ("redis-benchmark GET", "requests/s", &results.overhead.redis_get),
    ] {
        let base = series.summary(Tracer::None).mean;
        let _ = writeln!(text, "{title} ({unit}, {} runs):\n", results.runs);
        let _ = writeln!(text, "| tracer | mean | stddev | min | max | ratio to untraced | range |\n|---|---|---|---|---|---|---|");
        for tracer in TRACERS {
            let summary = series.summary(tracer);
            let _ = writeln!(
                text,
                "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.3} | {:.3} to {:.3} |",
                tracer.label(),
                summary.mean,
                summary.stddev,
                summary.min,
                summary.max,
                summary.mean / base,
                summary.min / base,
                summary.max / base
            );
        }
        let _ = writeln!(text);
    }

    let costs = &results.costs;
    let _ = writeln!(text, "## BPF cost per program\n");
    let _ = writeln!(
        text,
        "Average nanoseconds per run (`run_time_ns / run_cnt`), runs per second, and the \
         product of the two as milliseconds of CPU time per second of wall time, for \
         stalltrace during each workload:\n"
    );
    let _ = writeln!(
        text,
        "| program | ns/run, ping-pong | runs/s, ping-pong | CPU ms/s, ping-pong | ns/run, redis | runs/s, redis | CPU ms/s, redis |\n|---|---|---|---|---|---|---|"
    );
    for (name, &(average, per_sec)) in &costs.stalltrace_pingpong.programs {
        let (redis_average, redis_per_sec) = costs.stalltrace_redis.programs.get(name).copied().unwrap_or((0.0, 0.0));
        let _ = writeln!(
            text,
            "| `{name}` | {} | {per_sec:.0} | {:.1} | {} | {redis_per_sec:.0} | {:.1} |",
            format_average(average, per_sec),
            average * per_sec / 1e6,
            format_average(redis_average, redis_per_sec),
            redis_average * redis_per_sec / 1e6
        );
    }
    let _ = writeln!(text, "\nThe peer tools during the ping-pong:\n");
    let _ = writeln!(text, "| tool | program | ns/run | runs/s | CPU ms/s |\n|---|---|---|---|---|");
    for (tool, window) in [("offcputime", &costs.offcputime_pingpong), ("bpftrace", &costs.bpftrace_pingpong)] {
        for (name, &(average, per_sec)) in &window.programs {
            let _ = writeln!(
                text,
                "| {tool} | `{name}` | {} | {per_sec:.0} | {:.1} |",
                format_average(average, per_sec),
                average * per_sec / 1e6
            );
        }
    }

    let _ = writeln!(text, "\n## Records and userspace cost of stalltrace\n");
    let _ = writeln!(text, "| window | seconds | raw events/s | records/s | CPU | VmRSS at end | VmHWM at end |\n|---|---|---|---|---|---|---|");
    for (label, window) in [("ping-pong", &costs.stalltrace_pingpong), ("redis-benchmark", &costs.stalltrace_redis)] {
        let _ = writeln!(
            text,
            "| {label} | {:.1} | {:.0} | {:.1} | {:.1}% of one CPU | {} KiB | {} KiB |",
            window.seconds,
            window.raw_events_per_sec,
            window.records_per_sec,
            window.cpu_percent,
            window.rss_kib,
            window.peak_rss_kib
        );
    }
    let _ = writeln!(
        text,
        "\nRecords dropped over the whole pass (stalltrace's summary line): {}.",
        costs.stalltrace_drops.map_or("not printed".to_owned(), |drops| drops.to_string())
    );

    let _ = writeln!(text, "\n## Detection latency\n");
    let latency = &results.stall_latency;
    let _ = writeln!(
        text,
        "Ongoing stalls, threshold {:.2} ms (this kernel's slice, read by stalltrace); the target \
         is threshold + 100 ms = {:.1} ms. A scan finds a stall once it has passed the \
         threshold, and stalltrace scans every {} ms, so a stall that passes the threshold just \
         after a scan is reported at the next one: the worst case is threshold + {} ms plus the \
         time one scan takes. The {} starts of each command are spread over the scan cycle in \
         steps of {} ms, so the largest latency below can fall short of that worst case by up \
         to one step.\n",
        latency.threshold_ns as f64 / 1e6,
        (latency.threshold_ns + TARGET_STALL_SLACK_NS) as f64 / 1e6,
        latency.scan_interval_ns / 1_000_000,
        latency.scan_interval_ns / 1_000_000,
        LATENCY_REPEATS,
        latency.scan_interval_ns / 1_000_000 / LATENCY_REPEATS as u64
    );
    let _ = writeln!(text, "| command | latencies (ms) | max (ms) |\n|---|---|---|");
    for kind in ["spin", "sleep"] {
        let timings: Vec<&StallTiming> = latency.timings.iter().filter(|timing| timing.command.starts_with(kind)).collect();
        let Some(first) = timings.first() else { continue };
        let _ = writeln!(
            text,
            "| `{}` | {} | {} |",
            first.command,
            format_latencies(timings.iter().map(|timing| timing.latency_ns)),
            format_max(timings.iter().map(|timing| timing.latency_ns))
        );
    }
    let _ = writeln!(text, "\nLock cycles (target 1000 ms):\n");
    let _ = writeln!(text, "| workload | latencies (ms) | max (ms) |\n|---|---|---|");
    let _ = writeln!(
        text,
        "| `bench-deadlock` | {} | {} |",
        format_latencies(results.cycle_latency.iter().copied()),
        format_max(results.cycle_latency.iter().copied())
    );
    text
}

/// Returns each program's average nanoseconds per run and its number of runs over all
/// `windows` together.
fn combined_averages(windows: &[&Window]) -> BTreeMap<String, (f64, f64)> {
    let mut totals: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for window in windows {
        for (name, &(average, per_sec)) in &window.programs {
            let runs = per_sec * window.seconds;
            let total = totals.entry(name.clone()).or_default();
            total.0 += average * runs;
            total.1 += runs;
        }
    }
    totals
        .into_iter()
        .filter(|(_, (_, runs))| *runs > 0.0)
        .map(|(name, (time, runs))| (name, (time / runs, runs)))
        .collect()
}

fn format_average(average: f64, per_sec: f64) -> String {
    if per_sec == 0.0 {
        "no runs".to_owned()
    } else {
        format!("{average:.0}")
    }
}

fn format_latencies(latencies: impl Iterator<Item = Option<u64>>) -> String {
    latencies
        .map(|ns| ns.map_or("not reported".to_owned(), |ns| format!("{:.1}", ns as f64 / 1e6)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn format_max(latencies: impl Iterator<Item = Option<u64>>) -> String {
    let mut max = 0;
    for ns in latencies {
        match ns {
            Some(ns) => max = max.max(ns),
            None => return "not reported".to_owned(),
        }
    }
    format!("{:.1}", max as f64 / 1e6)
}

// ---------------------------------------------------------------------------------------
// Helpers

fn monotonic_ns() -> u64 {
    let mut now = Timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid timespec, and CLOCK_MONOTONIC always exists on Linux.
    unsafe { clock_gettime(CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

fn send_signal(pid: u32, signal: i32) {
    // SAFETY: kill has no memory preconditions. The pid is our own unreaped child, so it
    // cannot name another process.
    unsafe { kill(pid as i32, signal) };
}

fn read_lossy(path: &Path) -> String {
    fs::read(path).map(|bytes| String::from_utf8_lossy(&bytes).into_owned()).unwrap_or_default()
}

/// Returns the trimmed stdout of a command, or an empty string if it fails.
fn command_text(command: &mut Command) -> String {
    output(command).map(|text| text.trim().to_owned()).unwrap_or_default()
}

/// Counts a process's open file descriptors by what they point to.
fn fd_kinds(pid: u32) -> BTreeMap<String, usize> {
    let mut kinds = BTreeMap::new();
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return kinds;
    };
    for entry in entries.flatten() {
        if let Ok(target) = fs::read_link(entry.path()) {
            *kinds.entry(target.to_string_lossy().into_owned()).or_insert(0) += 1;
        }
    }
    kinds
}

/// Returns the first number after `"key":` in a JSON text, which is enough for the flat
/// lines the workloads and stalltrace print.
fn json_number(text: &str, key: &str) -> Option<f64> {
    let pattern = format!("\"{key}\":");
    let start = text.find(&pattern)? + pattern.len();
    let number: String = text[start..]
        .chars()
        .skip_while(|c| c.is_whitespace())
        .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E'))
        .collect();
    number.parse().ok()
}

fn json_u64(text: &str, key: &str) -> Option<u64> {
    let pattern = format!("\"{key}\":");
    let start = text.find(&pattern)? + pattern.len();
    let digits: String = text[start..].chars().skip_while(|c| c.is_whitespace()).take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Reads stalltrace's scan interval from its source, so the latency runs and their
/// explanation follow the code.
fn scan_interval_ns(root: &Path) -> Result<u64> {
    let path = root.join(SCAN_INTERVAL_SOURCE);
    let source = fs::read_to_string(&path).with_context(|| format!("failed to read {}", path.display()))?;
    let millis: u64 = source
        .lines()
        .find_map(|line| line.trim().strip_prefix(SCAN_INTERVAL_PREFIX)?.strip_suffix(");")?.parse().ok())
        .with_context(|| {
            format!(
                "no `{SCAN_INTERVAL_PREFIX}MS);` line in {}: update SCAN_INTERVAL_PREFIX in xtask/src/bench.rs",
                path.display()
            )
        })?;
    Ok(millis * 1_000_000)
}

/// Parses stalltrace's duration format (`1.40ms`, `250us`, `2.00s`) into nanoseconds.
fn parse_duration_ns(text: &str) -> Option<u64> {
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    let scale = match unit {
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        _ => return None,
    };
    Some((number.parse::<f64>().ok()? * scale).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_fields_parse() {
        let line = r#"{"event":"detected","stall":{"pid":10,"tid":11,"comm":"x","start_ns":123}}"#;
        assert_eq!(stall_field(line, "tid"), Some(11));
        assert_eq!(stall_field(line, "start_ns"), Some(123));
        assert_eq!(json_number(r#"{"round_trips_per_sec":2.5e5}"#, "round_trips_per_sec"), Some(250_000.0));
        assert_eq!(json_u64(r#"{"pid": 42}"#, "pid"), Some(42));
        assert_eq!(json_u64(r#"{"pid":42}"#, "tid"), None);
    }

    #[test]
    fn cycle_tids_sorted() {
        let line = r#"{"event":"cycle","cycle":{"tids":[30,20],"futexes":["1:0x10","1:0x20"]}}"#;
        assert_eq!(cycle_tids(line), vec![20, 30]);
        assert!(cycle_tids(r#"{"event":"cycle"}"#).is_empty());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration_ns("1.40ms"), Some(1_400_000));
        assert_eq!(parse_duration_ns("250us"), Some(250_000));
        assert_eq!(parse_duration_ns("2.00s"), Some(2_000_000_000));
        assert_eq!(parse_duration_ns("12"), None);
        assert_eq!(parse_duration_ns("3h"), None);
    }

    #[test]
    fn drops_parse_from_summary() {
        let stderr = "stalltrace: attached 21 tracepoints\nstalltrace: 3 stalls (0 ongoing) over 5.00s, threshold 1.40ms, 17 records dropped, 0 threads untracked\n";
        assert_eq!(parse_drops(stderr), Some(17));
        assert_eq!(parse_drops("no summary"), None);
    }

    #[test]
    fn scan_interval_found_in_source() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask has a parent folder");
        let interval_ns = scan_interval_ns(root).expect("the scan interval is readable");
        assert!(interval_ns > 0, "a scan interval of 0 ms");
        assert!(interval_ns <= 1_000_000_000, "a scan interval of {interval_ns} ns, over 1 s");
    }

    #[test]
    fn summary_of_samples() {
        let summary = summarize(&[1.0, 2.0, 3.0]);
        assert_eq!(summary.mean, 2.0);
        assert_eq!(summary.stddev, 1.0);
        assert_eq!(summary.min, 1.0);
        assert_eq!(summary.max, 3.0);
    }
}
