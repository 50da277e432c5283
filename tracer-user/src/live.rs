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
use tracer_common::StallRecord;

use crate::{
    aggregator::{Aggregator, Event, Record},
    capture::{CaptureHeader, CaptureWriter, HostInfo},
    duration::Nanos,
    kernel,
    probe::{Probe, ProbeConfig},
    report::{stall_line, JsonLine, Report, StallReport},
};

/// How often the thread map is scanned for ongoing stalls.
pub const SCAN_INTERVAL: Duration = Duration::from_millis(100);

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
}

impl Sink {
    fn feed(&mut self, record: Record) -> Result<()> {
        if let Some(capture) = &mut self.capture {
            capture.write(&record).context("failed to write the capture")?;
        }
        for event in self.aggregator.push(&record) {
            let (name, index) = match event {
                Event::Detected(index) => ("detected", index),
                Event::Ended(index) => ("ended", index),
            };
            let stall = StallReport::from(&self.aggregator.stalls()[index]);
            let mut out = std::io::stdout().lock();
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
    kernel::check_root()?;
    for &pid in &options.pids {
        if !kernel::process_exists(pid) {
            bail!("process {pid} not found: check the PID with `ps -p {pid}`");
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
    let host = HostInfo {
        virtualization: kernel::virtualization(),
        steal_source: steal_source(&config, &kernel::virtualization()),
    };

    let threshold_ns = match options.threshold_ns {
        Some(threshold_ns) => {
            eprintln!("stalltrace: threshold {} (--threshold)", Nanos(threshold_ns));
            threshold_ns
        }
        None => default_threshold(&probe).await,
    };
    probe.set_threshold(threshold_ns)?;

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
    let result = trace(&probe, &mut events, &mut sink, &options).await;
    // Whatever stopped the loop, take a last look so ongoing stalls are reported with their current length.
    let last_scan = drain(events.get_mut(), &mut sink).and_then(|()| scan(&probe, &mut sink));
    drop(events);
    drop(probe);
    tracing::info!("BPF programs detached");
    if let Some(capture) = &mut sink.capture {
        capture.flush().context("failed to write the capture")?;
    }
    let report = Report::from_aggregator(&sink.aggregator, &host, false);
    if let Some(dir) = &options.output_dir {
        report.write_to_dir(dir)?;
        eprintln!("stalltrace: wrote {}", dir.join("report.json").display());
    }
    eprintln!("stalltrace: {}", report.summary_line());
    for line in report.summary.lines() {
        eprintln!("stalltrace: {line}");
    }
    result.and(last_scan)?;
    Ok(report)
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
    probe: &Probe,
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
                drain(guard.get_inner_mut(), sink)?;
                guard.clear_ready();
            }
            _ = ticks.tick() => {
                drain(events.get_mut(), sink)?;
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

fn drain(events: &mut RingBuf<MapData>, sink: &mut Sink) -> Result<()> {
    while let Some(item) = events.next() {
        if item.len() < std::mem::size_of::<StallRecord>() {
            tracing::warn!(len = item.len(), "ignoring a short ring-buffer record");
            continue;
        }
        // SAFETY: the BPF side writes a whole StallRecord, any bit pattern is valid, and the read is unaligned.
        let record = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<StallRecord>()) };
        drop(item);
        sink.feed(Record::Stall(record))?;
    }
    Ok(())
}

/// Feeds a snapshot of every thread in an iteration, then a tick with the loss counters.
fn scan(probe: &Probe, sink: &mut Sink) -> Result<()> {
    let threads = probe.threads_in_iteration()?;
    let now_ns = monotonic_ns();
    for thread in threads {
        sink.feed(Record::Snapshot { now_ns, thread })?;
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
