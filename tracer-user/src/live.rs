//! Live tracing: attach, feed the aggregator from the ring buffer and map
//! scans, print stalls, and stop on a signal, a deadline or an error.

use std::{
    io::Write as _,
    path::PathBuf,
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
    time::{interval, sleep, MissedTickBehavior},
};
use tracer_common::{LoopThread, StallRecord};

use crate::{
    aggregator::{Aggregator, Event, Record},
    aggregator::{StallStacks, WeightedStack},
    capture::{CaptureHeader, CaptureWriter, HostInfo},
    locks::{KernelView, LockScanner},
    stacks::{FrameRef, Normalizer, Symbolizer},
    duration::Nanos,
    kernel,
    probe::{Probe, ProbeConfig},
    report::{cycle_line, stall_line, CycleJsonLine, JsonLine, Report, StallReport},
};

/// Set to 1 to name blocked syscalls from raw syscall tracepoints instead of
/// saved registers: slower, for kernels where the registers cannot be found.
pub const RAW_SYSCALLS_VARIABLE: &str = "STALLTRACE_RAW_SYSCALLS";

/// Ring-buffer records handled before the loop looks at scans and signals again.
/// Each record walks the sample map, so a flood of stalls could otherwise hold off scans for seconds.
const DRAIN_BATCH: usize = 256;

/// How often the thread map is scanned for ongoing stalls.
pub const SCAN_INTERVAL: Duration = Duration::from_millis(50);

/// Options shared by `watch` and `record`.
pub struct LiveOptions {
    pub pids: Vec<u32>,
    /// `None` for one scheduler slice.
    pub threshold_ns: Option<u64>,
    /// `None` to run until a signal.
    pub duration: Option<Duration>,
    /// Print JSON lines instead of text lines.
    pub json: bool,
    /// Folder for `capture` and `report.json`, for `record`.
    pub output_dir: Option<PathBuf>,
}

/// Returns the current CLOCK_MONOTONIC time, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid timespec and CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Consumers of each record: the aggregator, the capture file and the terminal.
struct Sink {
    aggregator: Aggregator,
    capture: Option<CaptureWriter>,
    json: bool,
    reported_drops: u64,
    cpus: usize,
    normalizer: Normalizer,
    locks: LockScanner,
    /// The lock waits last fed, so unchanged scans are not fed again.
    last_lock_waits: Option<Vec<crate::locks::LockWait>>,
}

impl Sink {
    fn feed(&mut self, record: Record) -> Result<()> {
        if let Some(capture) = &mut self.capture {
            capture.write(&record).context("failed to write the capture")?;
        }
        for event in self.aggregator.push(&record) {
            let mut out = std::io::stdout().lock();
            let (name, index) = match event {
                Event::Detected(index) => ("detected", index),
                Event::Ended(index) => ("ended", index),
                Event::CycleDetected(index) => {
                    let cycle = &self.aggregator.cycles()[index];
                    if self.json {
                        let line = serde_json::to_string(&CycleJsonLine { event: "cycle", cycle })?;
                        writeln!(out, "{line}")?;
                    } else {
                        writeln!(out, "{}", cycle_line(cycle))?;
                    }
                    out.flush()?;
                    continue;
                }
            };
            let stall = StallReport::from(&self.aggregator.stalls()[index]);
            if self.json {
                let line = serde_json::to_string(&JsonLine { event: name, stall: &stall })?;
                writeln!(out, "{line}")?;
            } else {
                writeln!(out, "{}", stall_line(&stall))?;
            }
            out.flush()?;
        }
        let drops = self.aggregator.drops();
        if drops > self.reported_drops {
            tracing::warn!(
                new = drops - self.reported_drops,
                total = drops,
                "stall records dropped because the ring buffer was full"
            );
            self.reported_drops = drops;
        }
        Ok(())
    }
}

/// Traces until the deadline, a signal or an error, and returns the report.
pub async fn run(options: LiveOptions) -> Result<Report> {
    let (mut probe, host, threshold_ns) = attach(&options).await?;

    let capture = match &options.output_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("failed to create output folder {}", dir.display()))?;
            let header = CaptureHeader::new(threshold_ns, kernel::kernel_release(), options.pids.clone(), host.clone());
            Some(CaptureWriter::create(&dir.join("capture"), &header)?)
        }
        None => None,
    };
    let mut sink = Sink {
        aggregator: Aggregator::new(threshold_ns),
        capture,
        json: options.json,
        reported_drops: 0,
        cpus: kernel::possible_cpus(),
        normalizer: Normalizer::new(),
        locks: LockScanner::new(),
        last_lock_waits: None,
    };

    let scope = if options.pids.is_empty() {
        "all processes".to_owned()
    } else {
        format!("PIDs {:?}", options.pids)
    };
    eprintln!(
        "stalltrace: attached {} tracepoints, watching loop threads of {scope}; Ctrl-C to stop",
        probe.attached()
    );

    // SAFETY: the AsyncFd owns the ring buffer, so its descriptor stays open while registered.
    let mut events = unsafe { AsyncFd::register(probe.take_events()?) }
        .map_err(|error| anyhow!("failed to poll the ring buffer: {}", error))?;
    let result = trace(&mut probe, &mut events, &mut sink, &options).await;
    // Whatever stopped the loop, take a last look so ongoing stalls are reported
    // with their current length and stacks.
    let last_scan = drain_all(&mut probe, events.get_mut(), &mut sink)
        .and_then(|()| scan(&mut probe, &mut sink))
        .and_then(|()| capture_open_stacks(&mut probe, &mut sink));
    drop(events);
    drop(probe);
    tracing::info!("BPF programs detached");
    if let Some(capture) = &mut sink.capture {
        capture.flush().context("failed to write the capture")?;
    }
    let (report, flame) = Report::build(&sink.aggregator, &host, false, &mut Symbolizer::new());
    if let Some(dir) = &options.output_dir {
        report.write_outputs(&flame, dir)?;
        eprintln!("stalltrace: wrote {}", dir.join("report.json").display());
    }
    eprintln!("stalltrace: {}", report.summary_line());
    for line in report.summary.lines() {
        eprintln!("stalltrace: {line}");
    }
    result.and(last_scan)?;
    Ok(report)
}

/// Checks the target processes, loads and attaches the BPF programs, finds
/// the kernel facts that need them loaded, and sets the threshold.
async fn attach(options: &LiveOptions) -> Result<(Probe, HostInfo, u64)> {
    kernel::check_root()?;
    for &pid in &options.pids {
        if !kernel::process_exists(pid) {
            bail!("process {pid} not found (or already exited): check the PID with `ps -p {pid}`");
        }
    }
    let tracefs = kernel::ensure_tracefs()?;
    let layout = kernel::tracepoint_layout(&tracefs)?;
    let config = ProbeConfig {
        pids: options.pids.clone(),
        layout,
        offsets: kernel::kernel_offsets(),
    };
    let mut probe = Probe::attach(&config)?;

    // The variable exercises the fallback on kernels where the registers can be read.
    let offsets = if std::env::var_os(RAW_SYSCALLS_VARIABLE).is_some_and(|value| value == "1") {
        Vec::new()
    } else {
        kernel::syscall_nr_offsets()
    };
    probe
        .locate_syscall_numbers(&offsets, &kernel::epoll_wait_syscalls())
        .await?;
    let virtualization = kernel::virtualization();
    let host = HostInfo {
        steal_source: steal_source(&config, &virtualization),
        virtualization,
    };

    let threshold_ns = match options.threshold_ns {
        Some(threshold_ns) => {
            eprintln!("stalltrace: threshold {} (--threshold)", Nanos(threshold_ns));
            threshold_ns
        }
        None => default_threshold(&probe).await,
    };
    probe.set_threshold(threshold_ns)?;
    Ok((probe, host, threshold_ns))
}

/// Describes where steal figures come from, or why there are none.
fn steal_source(config: &ProbeConfig, virtualization: &str) -> String {
    if virtualization == "none" {
        "none: not running under a hypervisor".to_owned()
    } else if !config.offsets.steal_known() {
        "none: kernel BTF lacks the run queue's steal clock".to_owned()
    } else {
        "rq->prev_steal_time (the paravirt steal clock the scheduler takes out of task time)".to_owned()
    }
}

/// Returns the slice this kernel gives stalltrace's own thread, or the documented default.
async fn default_threshold(probe: &Probe) -> u64 {
    match probe.wait_for_own_slice(Duration::from_millis(500)).await {
        Some(slice) => {
            eprintln!("stalltrace: threshold {} (this kernel's scheduler slice)", Nanos(slice));
            slice
        }
        None => {
            let slice = kernel::documented_base_slice_ns();
            tracing::warn!(
                threshold_ns = slice,
                "could not read the scheduler slice from the kernel, using the EEVDF default for this CPU count"
            );
            eprintln!("stalltrace: threshold {} (EEVDF default slice, not read from the kernel)", Nanos(slice));
            slice
        }
    }
}

async fn trace(
    probe: &mut Probe,
    events: &mut AsyncFd<RingBuf<MapData>>,
    sink: &mut Sink,
    options: &LiveOptions,
) -> Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("failed to install the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("failed to install the SIGINT handler")?;
    let mut ticks = interval(SCAN_INTERVAL);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let deadline = sleep(options.duration.unwrap_or(Duration::from_secs(u64::MAX / 4)));
    tokio::pin!(deadline);

    loop {
        tokio::select! {
            guard = events.readable_mut() => {
                let mut guard = guard.context("failed to poll the ring buffer")?;
                // Readiness stays set while records remain, so the loop comes back for them.
                if drain(probe, guard.get_inner_mut(), sink)? {
                    guard.clear_ready();
                }
            }
            _ = ticks.tick() => {
                drain(probe, events.get_mut(), sink)?;
                scan(probe, sink)?;
                if !options.pids.is_empty() && options.pids.iter().all(|&pid| !kernel::process_exists(pid)) {
                    eprintln!("stalltrace: every traced process has exited, stopping");
                    return Ok(());
                }
            }
            _ = &mut deadline => return Ok(()),
            _ = sigint.recv() => {
                tracing::info!("SIGINT received, stopping");
                return Ok(());
            }
            _ = sigterm.recv() => {
                tracing::info!("SIGTERM received, stopping");
                return Ok(());
            }
        }
    }
}

/// Feeds every ended stall in the ring buffer, each followed by its stacks.
/// Returns true when the ring buffer is empty, false when it stopped after
/// [`DRAIN_BATCH`] records so that scans and signals get their turn.
fn drain(probe: &mut Probe, events: &mut RingBuf<MapData>, sink: &mut Sink) -> Result<bool> {
    for _ in 0..DRAIN_BATCH {
        let Some(item) = events.next() else {
            return Ok(true);
        };
        if item.len() < std::mem::size_of::<StallRecord>() {
            tracing::warn!(len = item.len(), "ignoring a short ring-buffer record");
            continue;
        }
        // SAFETY: the BPF side writes a whole StallRecord, any bit pattern is valid, and the read is unaligned.
        let record = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<StallRecord>()) };
        drop(item);
        sink.feed(Record::Stall(record))?;
        let stacks = stall_stacks(probe, &mut sink.normalizer, &record.thread)?;
        sink.feed(Record::StallStacks(stacks))?;
    }
    Ok(false)
}

/// Drains the ring buffer completely, for the last look before detaching.
fn drain_all(probe: &mut Probe, events: &mut RingBuf<MapData>, sink: &mut Sink) -> Result<()> {
    while !drain(probe, events, sink)? {}
    Ok(())
}

/// Resolves the off-CPU stacks and on-CPU samples of a thread's current
/// iteration, and removes the samples from the kernel's table.
fn stall_stacks(probe: &mut Probe, normalizer: &mut Normalizer, thread: &LoopThread) -> Result<StallStacks> {
    let mut resolve = |user_stack: i32, kernel_stack: i32, weight: u64| WeightedStack {
        weight,
        kernel: probe.stack(kernel_stack).into_iter().map(FrameRef::Kernel).collect(),
        user: normalizer.normalize_user(thread.pid, &probe.stack(user_stack)),
    };
    let off_cpu: Vec<WeightedStack> = thread
        .stacks
        .iter()
        .filter(|slot| slot.ns > 0)
        .map(|slot| resolve(slot.user_stack, slot.kernel_stack, slot.ns))
        .collect();
    let samples = probe.take_samples(&[(thread.tid, thread.iteration)])?;
    let samples = samples
        .into_iter()
        .map(|(key, count)| {
            let user = normalizer.normalize_user(thread.pid, &probe.stack(key.user_stack));
            let kernel = probe.stack(key.kernel_stack).into_iter().map(FrameRef::Kernel).collect();
            WeightedStack { weight: count, kernel, user }
        })
        .collect();
    Ok(StallStacks {
        tid: thread.tid,
        iteration: thread.iteration,
        off_cpu,
        samples,
    })
}

/// Feeds the stacks of every stall that is still open, for the report at the end.
fn capture_open_stacks(probe: &mut Probe, sink: &mut Sink) -> Result<()> {
    let open = sink.aggregator.open_iterations();
    let now_ns = monotonic_ns();
    for mut thread in probe.loop_threads()? {
        if !thread.in_iteration() || !open.contains(&(thread.tid, thread.iteration)) {
            continue;
        }
        // Bring the current off-CPU period into its stack slot, as a snapshot does.
        thread.accrue(now_ns);
        let stacks = stall_stacks(probe, &mut sink.normalizer, &thread)?;
        sink.feed(Record::StallStacks(stacks))?;
    }
    Ok(())
}

/// Feeds a snapshot of every thread in an iteration, the lock waits, the
/// steal clocks, then a tick with the loss counters.
fn scan(probe: &mut Probe, sink: &mut Sink) -> Result<()> {
    let threads = probe.loop_threads()?;
    let now_ns = monotonic_ns();
    let mut idle_loop_threads = std::collections::HashSet::new();
    for thread in threads {
        if thread.in_iteration() {
            sink.feed(Record::Snapshot { now_ns, thread })?;
        } else {
            idle_loop_threads.insert(thread.tid);
        }
    }
    let waits = probe.futex_waits()?;
    let view = KernelView {
        waits: &waits,
        idle_loop_threads: &idle_loop_threads,
        traffic: &|pid, uaddr| probe.futex_traffic(pid, uaddr),
        stack: &|id| probe.stack(id),
    };
    let lock_waits = sink.locks.scan(&view, now_ns);
    // Ticks keep unchanged cycles current, so only a change needs a record.
    if sink.last_lock_waits.as_ref() != Some(&lock_waits) {
        sink.last_lock_waits = Some(lock_waits.clone());
        sink.feed(Record::LockWaits {
            now_ns,
            waits: lock_waits,
        })?;
    }
    let kernel_ns = probe.cpu_steal_clocks(sink.cpus)?;
    let proc_stat_ns = kernel::proc_stat_steal_ns()?;
    sink.feed(Record::HostSteal {
        now_ns,
        kernel_ns,
        proc_stat_ns,
    })?;
    let (drops, untracked_threads) = probe.counters()?;
    sink.feed(Record::Tick {
        now_ns,
        drops,
        untracked_threads,
    })?;
    if let Some(capture) = &mut sink.capture {
        capture.flush().context("failed to write the capture")?;
    }
    Ok(())
}
