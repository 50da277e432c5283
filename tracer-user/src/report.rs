//! The stall report: `report.json`, JSON lines and the live text lines.
//!
//! The JSON schema is documented in `docs/report.md`; change both together.

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    path::Path,
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use tracer_common::Breakdown;

use crate::{
    aggregator::{Aggregator, Cycle, EndedBy, Stall, WeightedStack},
    flame::{culprits, folded_lines, write_folded, write_svg, Culprit, FlameStall, SVG_TITLE},
    locks::{HolderSource, LockWait},
    stacks::{stack_truncated, Frame, Symbolizer},
    capture::HostInfo,
    diagnosis::{ranked_shares, Owner, Verdict},
    duration::Nanos,
    kernel::syscall_name,
};

/// Version of the `report.json` schema.
pub const REPORT_VERSION: u32 = 1;

/// The flame graph of a run without stalls.
const EMPTY_SVG: &str = concat!(
    r#"<?xml version="1.0" standalone="no"?>"#,
    "\n",
    r#"<svg version="1.1" width="600" height="60" xmlns="http://www.w3.org/2000/svg">"#,
    r#"<title>stalltrace: no stalls</title>"#,
    r#"<text x="20" y="35" font-family="Verdana" font-size="14">No stalls were recorded.</text>"#,
    "</svg>\n"
);

/// Culprit frames listed per verdict.
const CULPRITS_PER_VERDICT: usize = 5;

/// Contents of `report.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub version: u32,
    pub threshold_ns: u64,
    /// Time covered by the records, from the first to the last.
    pub duration_ns: u64,
    /// Records the BPF programs could not send because the ring buffer was full.
    pub drops: u64,
    /// Loop threads not followed because the thread map was full.
    pub untracked_threads: u64,
    /// True when the capture this report was made from ended in a partial record.
    #[serde(default)]
    pub capture_truncated: bool,
    #[serde(default)]
    pub host: HostReport,
    #[serde(default)]
    pub summary: Summary,
    pub stalls: Vec<StallReport>,
    /// Wait-for cycles found while tracing.
    #[serde(default)]
    pub cycles: Vec<Cycle>,
    /// Threads blocked in a futex wait at the last scan.
    #[serde(default)]
    pub futex_waits: Vec<LockWait<Frame>>,
    /// Per verdict, the frames that own the most stalled time.
    #[serde(default)]
    pub culprits: Vec<Culprit>,
}

/// Facts about the traced host and its steal over the run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostReport {
    /// `kvm`, another hypervisor, or `none` on bare metal.
    pub virtualization: String,
    /// Source of the steal figures, or the reason there are none.
    pub steal_source: String,
    /// Steal per CPU over the run by the run queues' steal clock; empty without a steal source.
    pub steal_ns_per_cpu: Vec<u64>,
    pub steal_ns_total: u64,
    /// The same from `/proc/stat`, for comparison (resolution: one clock tick per CPU, 10 ms at USER_HZ 100).
    pub proc_stat_steal_ns_per_cpu: Vec<u64>,
    pub proc_stat_steal_ns_total: u64,
}

/// Stalled time by owner, and what to do about each verdict that appears.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Sum of all stalls' durations.
    pub stalled_ns: u64,
    /// Stalled time the hypervisor took (steal).
    pub host_ns: u64,
    /// Stalled time lost to the guest's own scheduling (run-queue waits, cgroup throttling).
    pub guest_ns: u64,
    /// Stalled time of the application itself (its CPU time, lock waits, syscalls).
    pub application_ns: u64,
    /// One entry per verdict that appears, most stalled time first.
    pub verdicts: Vec<VerdictSummary>,
}

/// Stalls with one verdict, and the suggested fix.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VerdictSummary {
    pub verdict: Verdict,
    pub stalls: u32,
    pub stalled_ns: u64,
    pub suggestion: String,
}

impl Summary {
    /// Sums the stalls' shares by owner and groups the stalls by verdict.
    pub fn of(stalls: &[StallReport]) -> Self {
        let mut summary = Summary::default();
        let mut by_verdict: BTreeMap<Verdict, (u32, u64)> = BTreeMap::new();
        for stall in stalls {
            summary.stalled_ns += stall.duration_ns;
            let breakdown = breakdown_of(&stall.breakdown_ns);
            for verdict in Verdict::ALL {
                let share = verdict.share_ns(&breakdown);
                match verdict.owner() {
                    Owner::Host => summary.host_ns += share,
                    Owner::Guest => summary.guest_ns += share,
                    Owner::Application => summary.application_ns += share,
                }
            }
            let entry = by_verdict.entry(stall.verdict).or_default();
            entry.0 += 1;
            entry.1 += stall.duration_ns;
        }
        summary.verdicts = by_verdict
            .into_iter()
            .map(|(verdict, (count, stalled_ns))| VerdictSummary {
                verdict,
                stalls: count,
                stalled_ns,
                suggestion: verdict.suggestion().to_owned(),
            })
            .collect();
        summary.verdicts.sort_by(|a, b| b.stalled_ns.cmp(&a.stalled_ns));
        summary
    }

    /// Returns the closing lines of `watch` and `record`: time by owner, then one suggestion per verdict.
    pub fn lines(&self) -> Vec<String> {
        if self.stalled_ns == 0 {
            return Vec::new();
        }
        let percent = |ns: u64| ns * 100 / self.stalled_ns.max(1);
        let mut lines = vec![format!(
            "stalled {}: host (steal) {}%, guest (run queue, throttling) {}%, application (CPU, locks, syscalls) {}%",
            Nanos(self.stalled_ns),
            percent(self.host_ns),
            percent(self.guest_ns),
            percent(self.application_ns)
        )];
        for entry in &self.verdicts {
            lines.push(format!(
                "  {} ({} stalls, {}): {}",
                entry.verdict.key(),
                entry.stalls,
                Nanos(entry.stalled_ns),
                entry.suggestion
            ));
        }
        lines
    }
}

/// One stall in `report.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StallReport {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    /// CLOCK_MONOTONIC nanoseconds when the iteration began.
    pub start_ns: u64,
    pub duration_ns: u64,
    pub ongoing: bool,
    /// `wait`, `exit` or `lost`, or null while ongoing.
    pub ended_by: Option<String>,
    pub verdict: Verdict,
    pub breakdown_ns: BreakdownNs,
    /// Blocked time by syscall name.
    pub syscalls: BTreeMap<String, u64>,
    /// The stack that owns the most of the stall's time, innermost first;
    /// empty when no stack was captured.
    #[serde(default)]
    pub stack: Vec<Frame>,
    /// True when the user part of `stack` stops before the thread's entry
    /// point, as it does in code built without frame pointers.
    #[serde(default)]
    pub stack_truncated: bool,
}

/// The breakdown of a stall, keyed as in verdicts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakdownNs {
    pub on_cpu: u64,
    pub runqueue: u64,
    pub steal: u64,
    pub throttled: u64,
    pub futex: u64,
    pub syscall: u64,
}

impl From<&Breakdown> for BreakdownNs {
    fn from(breakdown: &Breakdown) -> Self {
        let Breakdown {
            on_cpu_ns,
            runqueue_ns,
            steal_ns,
            throttled_ns,
            futex_ns,
            syscall_ns,
        } = *breakdown;
        Self {
            on_cpu: on_cpu_ns,
            runqueue: runqueue_ns,
            steal: steal_ns,
            throttled: throttled_ns,
            futex: futex_ns,
            syscall: syscall_ns,
        }
    }
}

fn ended_by_key(ended_by: Option<EndedBy>) -> Option<String> {
    ended_by.map(|ended_by| {
        match ended_by {
            EndedBy::Wait => "wait",
            EndedBy::Exit => "exit",
            EndedBy::Lost => "lost",
        }
        .to_owned()
    })
}

impl From<&Stall> for StallReport {
    /// Converts without stacks; [`Report::build`] fills them in.
    fn from(stall: &Stall) -> Self {
        let mut syscalls = BTreeMap::new();
        for &(nr, ns) in &stall.syscalls {
            *syscalls.entry(syscall_name(nr)).or_insert(0) += ns;
        }
        Self {
            pid: stall.pid,
            tid: stall.tid,
            comm: stall.comm.clone(),
            start_ns: stall.start_ns,
            duration_ns: stall.duration_ns,
            ongoing: stall.ongoing(),
            ended_by: ended_by_key(stall.ended_by),
            verdict: if stall.in_cycle {
                Verdict::LockCycle
            } else {
                Verdict::of(&stall.breakdown)
            },
            breakdown_ns: BreakdownNs::from(&stall.breakdown),
            syscalls,
            stack: Vec::new(),
            stack_truncated: false,
        }
    }
}

/// Frame name for stalled time that no captured stack covers.
pub const UNATTRIBUTED: &str = "[unattributed]";

fn placeholder_frame(name: &str) -> Frame {
    Frame {
        name: name.to_owned(),
        module: String::new(),
        file: None,
        line: None,
        inlined: false,
    }
}

/// Returns the frames of a weighted stack, kernel frames first, innermost first.
fn symbolize_stack(stack: &WeightedStack, symbolizer: &mut Symbolizer) -> (Vec<Frame>, bool) {
    let user = symbolizer.symbolize(&stack.user);
    let truncated = !user.is_empty() && stack_truncated(&user);
    let mut frames = symbolizer.symbolize(&stack.kernel);
    frames.extend(user);
    (frames, truncated)
}

/// Splits a stall's duration over its stacks: blocked time to the stack the
/// thread blocked at, and the rest (on-CPU time, preemption, steal, throttling)
/// over the on-CPU samples by count. Time that no stack covers (a stall with no
/// sample) goes to [`UNATTRIBUTED`]. The weights add up to the stall's duration.
fn stall_flame(
    stall: &Stall,
    report: &StallReport,
    stall_id: u64,
    symbolizer: &mut Symbolizer,
) -> (Vec<FlameStall>, Vec<Frame>, bool) {
    let verdict = report.verdict.key().to_owned();
    let mut parts: Vec<(Vec<Frame>, bool, u64)> = Vec::new();
    let mut assigned = 0u64;
    if let Some(stacks) = &stall.stacks {
        let blocked: u64 = stacks.off_cpu.iter().map(|stack| stack.weight).sum();
        let running = stall.duration_ns.saturating_sub(blocked);
        let samples: u64 = stacks.samples.iter().map(|stack| stack.weight).sum();
        for stack in &stacks.off_cpu {
            let (frames, truncated) = symbolize_stack(stack, symbolizer);
            parts.push((frames, truncated, stack.weight));
        }
        for stack in &stacks.samples {
            let weight = (u128::from(running) * u128::from(stack.weight) / u128::from(samples.max(1))) as u64;
            let (frames, truncated) = symbolize_stack(stack, symbolizer);
            parts.push((frames, truncated, weight));
        }
    }
    for part in &mut parts {
        part.2 = part.2.min(stall.duration_ns.saturating_sub(assigned));
        assigned += part.2;
    }
    let remainder = stall.duration_ns - assigned;
    if remainder > 0 {
        parts.push((vec![placeholder_frame(UNATTRIBUTED)], false, remainder));
    }
    let (stack, truncated) = parts
        .iter()
        .filter(|part| part.0.first().is_some_and(|frame| frame.name != UNATTRIBUTED))
        .max_by_key(|part| part.2)
        .map(|part| (part.0.clone(), part.1))
        .unwrap_or_default();
    let flame = parts
        .into_iter()
        .filter(|part| part.2 > 0)
        .map(|(frames, _, weight_ns)| FlameStall {
            stall_id,
            verdict: verdict.clone(),
            frames,
            weight_ns,
        })
        .collect();
    (flame, stack, truncated)
}

impl Report {
    /// Builds the report of everything the aggregator has seen, with
    /// symbolized stacks, and returns the flame-graph stacks beside it.
    pub fn build(
        aggregator: &Aggregator,
        host: &HostInfo,
        capture_truncated: bool,
        symbolizer: &mut Symbolizer,
    ) -> (Self, Vec<FlameStall>) {
        let mut report = Self::from_aggregator(aggregator, host, capture_truncated);
        let mut flame = Vec::new();
        for (index, (stall, stall_report)) in aggregator.stalls().iter().zip(&mut report.stalls).enumerate() {
            let (stacks, stack, truncated) = stall_flame(stall, stall_report, index as u64, symbolizer);
            stall_report.stack = stack;
            stall_report.stack_truncated = truncated;
            flame.extend(stacks);
        }
        report.futex_waits = aggregator
            .lock_waits()
            .iter()
            .map(|wait| wait.with_stack(symbolizer.symbolize(&wait.stack)))
            .collect();
        // Unattributed time has no frame to blame, so it stays out of the culprits.
        let attributed: Vec<FlameStall> = flame
            .iter()
            .filter(|stack| stack.frames.first().is_none_or(|frame| frame.name != UNATTRIBUTED))
            .cloned()
            .collect();
        report.culprits = culprits(&attributed, CULPRITS_PER_VERDICT);
        (report, flame)
    }

    /// Builds the report without stacks, which needs no symbolization.
    pub fn from_aggregator(aggregator: &Aggregator, host: &HostInfo, capture_truncated: bool) -> Self {
        let stalls: Vec<StallReport> = aggregator.stalls().iter().map(StallReport::from).collect();
        let steal = aggregator.host_steal();
        let has_steal_source = !host.steal_source.starts_with("none");
        let kernel_ns = if has_steal_source { steal.kernel_ns } else { Vec::new() };
        Self {
            version: REPORT_VERSION,
            threshold_ns: aggregator.threshold_ns(),
            duration_ns: aggregator.duration_ns(),
            drops: aggregator.drops(),
            untracked_threads: aggregator.untracked_threads(),
            capture_truncated,
            host: HostReport {
                virtualization: host.virtualization.clone(),
                steal_source: host.steal_source.clone(),
                steal_ns_total: kernel_ns.iter().sum(),
                steal_ns_per_cpu: kernel_ns,
                proc_stat_steal_ns_total: steal.proc_stat_ns.iter().sum(),
                proc_stat_steal_ns_per_cpu: steal.proc_stat_ns,
            },
            summary: Summary::of(&stalls),
            stalls,
            cycles: aggregator.cycles().to_vec(),
            futex_waits: Vec::new(),
            culprits: Vec::new(),
        }
    }

    /// Writes `report.json`, `stalls.folded` and `stalls.svg` into `dir`.
    pub fn write_outputs(&self, flame: &[FlameStall], dir: &Path) -> Result<()> {
        self.write_to_dir(dir)?;
        let lines = folded_lines(flame);
        write_folded(&dir.join("stalls.folded"), &lines)?;
        let svg = dir.join("stalls.svg");
        if lines.is_empty() {
            // inferno draws nothing useful from no stacks, and a stale graph would mislead.
            fs::write(&svg, EMPTY_SVG).with_context(|| format!("failed to write {}", svg.display()))?;
        } else {
            write_svg(&svg, &lines, SVG_TITLE)?;
        }
        Ok(())
    }

    /// Writes the report as `dir/report.json` through a temporary file and a
    /// rename, so a reader never sees half a report.
    pub fn write_to_dir(&self, dir: &Path) -> Result<()> {
        let path = dir.join("report.json");
        let temporary = dir.join(".report.json.tmp");
        let json = serde_json::to_vec_pretty(self).context("failed to serialize the report")?;
        let mut file = fs::File::create(&temporary)
            .with_context(|| format!("failed to create {}", temporary.display()))?;
        file.write_all(&json)
            .and_then(|()| file.write_all(b"\n"))
            .and_then(|()| file.sync_all())
            .with_context(|| format!("failed to write {}", temporary.display()))?;
        fs::rename(&temporary, &path)
            .with_context(|| format!("failed to rename {} to {}", temporary.display(), path.display()))?;
        Ok(())
    }

    /// Returns the summary line printed at the end of a run.
    pub fn summary_line(&self) -> String {
        let ongoing = self.stalls.iter().filter(|stall| stall.ongoing).count();
        format!(
            "{} stalls ({} ongoing) over {}, threshold {}, {} records dropped, {} threads untracked",
            self.stalls.len(),
            ongoing,
            Nanos(self.duration_ns),
            Nanos(self.threshold_ns),
            self.drops,
            self.untracked_threads
        )
    }
}

/// Formats one live line for a stall: thread, process, duration, verdict and top shares.
pub fn stall_line(stall: &StallReport) -> String {
    let state = if stall.ongoing {
        "stalled".to_owned()
    } else {
        format!("ended ({})", stall.ended_by.as_deref().unwrap_or("?"))
    };
    let breakdown = breakdown_of(&stall.breakdown_ns);
    let total = breakdown.total_ns().max(1);
    let shares: Vec<String> = ranked_shares(&breakdown)
        .into_iter()
        .take(3)
        .map(|(verdict, ns)| {
            let mut share = format!("{} {}%", verdict.key(), ns * 100 / total);
            if verdict == Verdict::Syscall {
                if let Some((name, _)) = stall.syscalls.iter().max_by_key(|(_, &ns)| ns) {
                    share.push_str(&format!(" ({name})"));
                }
            }
            share
        })
        .collect();
    format!(
        "{state:<13} tid {} ({}) pid {}  {}  verdict {}  [{}]",
        stall.tid,
        stall.comm,
        stall.pid,
        Nanos(stall.duration_ns),
        stall.verdict.key(),
        shares.join(", ")
    )
}

fn breakdown_of(shares: &BreakdownNs) -> Breakdown {
    Breakdown {
        on_cpu_ns: shares.on_cpu,
        runqueue_ns: shares.runqueue,
        steal_ns: shares.steal,
        throttled_ns: shares.throttled,
        futex_ns: shares.futex,
        syscall_ns: shares.syscall,
    }
}

/// One JSON line of `watch --json` about a stall.
#[derive(Serialize)]
pub struct JsonLine<'a> {
    /// `detected` or `ended`.
    pub event: &'a str,
    pub stall: &'a StallReport,
}

/// One JSON line of `watch --json` about a wait-for cycle.
#[derive(Serialize)]
pub struct CycleJsonLine<'a> {
    /// Always `cycle`.
    pub event: &'a str,
    pub cycle: &'a Cycle,
}

/// Formats a wait-for cycle as a chain: thread, waits on, held by, and so on.
pub fn cycle_line(cycle: &Cycle) -> String {
    let links: Vec<String> = cycle
        .edges
        .iter()
        .map(|edge| {
            format!(
                "tid {} ({}) waits on {} held by tid {} [{}]",
                edge.waiter,
                edge.waiter_comm,
                edge.futex,
                edge.holder,
                match edge.holder_source {
                    HolderSource::Exact => "exact",
                    HolderSource::Inferred => "inferred",
                    HolderSource::Unknown => "unknown",
                }
            )
        })
        .collect();
    format!("lock cycle: {}", links.join(" -> "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeping_stall() -> StallReport {
        StallReport {
            pid: 10,
            tid: 11,
            comm: "redis-server".to_owned(),
            start_ns: 5,
            duration_ns: 300_000_000,
            ongoing: false,
            ended_by: Some("wait".to_owned()),
            verdict: Verdict::Syscall,
            breakdown_ns: BreakdownNs {
                on_cpu: 3_000_000,
                syscall: 297_000_000,
                ..BreakdownNs::default()
            },
            syscalls: BTreeMap::from([("clock_nanosleep".to_owned(), 297_000_000)]),
            stack: Vec::new(),
            stack_truncated: false,
        }
    }

    #[test]
    fn stall_line_names_syscall() {
        let line = stall_line(&sleeping_stall());
        assert!(line.starts_with("ended (wait)"), "{line}");
        assert!(line.contains("tid 11 (redis-server) pid 10"), "{line}");
        assert!(line.contains("300ms"), "{line}");
        assert!(line.contains("syscall 99% (clock_nanosleep)"), "{line}");
        assert!(line.contains("on_cpu 1%"), "{line}");
    }

    #[test]
    fn summary_splits_owners() {
        let mut stolen = sleeping_stall();
        stolen.breakdown_ns = BreakdownNs {
            steal: 60,
            on_cpu: 30,
            runqueue: 10,
            ..BreakdownNs::default()
        };
        stolen.duration_ns = 100;
        stolen.verdict = Verdict::Steal;

        let summary = Summary::of(&[sleeping_stall(), stolen]);

        assert_eq!(summary.stalled_ns, 300_000_100);
        assert_eq!(summary.host_ns, 60);
        assert_eq!(summary.guest_ns, 10);
        assert_eq!(summary.application_ns, 300_000_030);
        assert_eq!(summary.verdicts.len(), 2);
        assert_eq!(summary.verdicts[0].verdict, Verdict::Syscall);
        assert_eq!(summary.verdicts[1].stalls, 1);
        assert!(summary.lines()[2].contains("noisy neighbour"), "{:?}", summary.lines());
    }

    #[test]
    fn outputs_without_stalls_written() {
        let report = Report::from_aggregator(&Aggregator::new(1), &HostInfo::default(), false);
        let dir = tempfile::tempdir().unwrap();

        report.write_outputs(&[], dir.path()).unwrap();

        assert!(dir.path().join("report.json").exists());
        assert_eq!(fs::read_to_string(dir.path().join("stalls.folded")).unwrap(), "");
        let svg = fs::read_to_string(dir.path().join("stalls.svg")).unwrap();
        assert!(svg.contains("No stalls were recorded."), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"), "{svg}");
    }

    #[test]
    fn report_round_trips_json() {
        let stalls = vec![sleeping_stall()];
        let report = Report {
            version: REPORT_VERSION,
            threshold_ns: 1,
            duration_ns: 2,
            drops: 3,
            untracked_threads: 0,
            capture_truncated: false,
            host: HostReport::default(),
            summary: Summary::of(&stalls),
            stalls,
            cycles: Vec::new(),
            futex_waits: Vec::new(),
            culprits: Vec::new(),
        };
        let dir = tempfile::tempdir().unwrap();

        report.write_to_dir(dir.path()).unwrap();

        let text = fs::read_to_string(dir.path().join("report.json")).unwrap();
        let parsed: Report = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed, report);
        assert!(text.contains("\"verdict\": \"syscall\""), "{text}");
        assert!(!dir.path().join(".report.json.tmp").exists());
    }
}
