//! The aggregator: a pure state machine from records to stalls.
//!
//! Records come from the live ring buffer and map scans, or from a capture
//! file. The aggregator cannot tell which, so a capture replays to the same
//! stalls. It keeps one [`Stall`] per loop iteration that passed the
//! threshold, open while the iteration lasts and closed when it ends.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use tracer_common::{record_kind, Breakdown, LoopThread, StallRecord, SYSCALL_SLOTS};

use crate::{
    locks::{find_cycles, HolderSource, LockWait},
    stacks::FrameRef,
};

/// One input of the aggregator.
#[derive(Clone, Debug)]
pub enum Record {
    /// An iteration ended past the threshold (sent by the BPF programs).
    Stall(StallRecord),
    /// A loop thread in the middle of an iteration, read from the thread map at `now_ns`.
    Snapshot { now_ns: u64, thread: LoopThread },
    /// The end of one map scan, with the kernel's loss counters at `now_ns`.
    Tick {
        now_ns: u64,
        drops: u64,
        untracked_threads: u64,
    },
    /// Each CPU's steal so far by two clocks: the run queues' steal clock
    /// (`rq->prev_steal_time`, 0 before a CPU's first switch) and `/proc/stat`.
    HostSteal {
        now_ns: u64,
        kernel_ns: Vec<u64>,
        proc_stat_ns: Vec<u64>,
    },
    /// The stacks of one stall's iteration, normalized while the process was alive.
    StallStacks(StallStacks),
    /// Every thread in scope blocked in a futex wait at one scan, with holders.
    LockWaits { now_ns: u64, waits: Vec<LockWait> },
}

/// A stack with a weight: off-CPU nanoseconds, or a count of on-CPU samples.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightedStack {
    pub weight: u64,
    /// Kernel frames, innermost first.
    pub kernel: Vec<FrameRef>,
    /// User frames, innermost first.
    pub user: Vec<FrameRef>,
}

/// The stacks of one loop iteration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StallStacks {
    pub tid: u32,
    pub iteration: u64,
    /// Stacks the thread blocked at, weighted by the off-CPU time that followed.
    pub off_cpu: Vec<WeightedStack>,
    /// On-CPU samples taken after the iteration passed the threshold, weighted by count.
    pub samples: Vec<WeightedStack>,
}

/// One edge of a wait-for cycle: a thread waiting on a lock another thread holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CycleEdge {
    pub waiter: u32,
    pub waiter_pid: u32,
    pub waiter_comm: String,
    pub futex: String,
    pub holder: u32,
    pub holder_source: HolderSource,
    /// How long the waiter had waited at the last scan that saw the cycle.
    pub waited_ns: u64,
}

/// Threads that wait on each other's locks: a deadlock while it lasts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cycle {
    pub tids: Vec<u32>,
    pub futexes: Vec<String>,
    pub edges: Vec<CycleEdge>,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// True while the latest scan still finds the cycle.
    pub ongoing: bool,
}

/// The event that ended a stall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndedBy {
    /// The loop thread entered its wait again.
    Wait,
    /// The thread exited during the stall.
    Exit,
    /// The thread left the iteration but its end record was lost (see `drops`).
    Lost,
}

/// One loop iteration that ran past the threshold.
#[derive(Clone, Debug, PartialEq)]
pub struct Stall {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    /// Iteration number of the thread, unique per thread.
    pub iteration: u64,
    /// CLOCK_MONOTONIC time when the iteration began.
    pub start_ns: u64,
    pub duration_ns: u64,
    /// `None` while the stall lasts.
    pub ended_by: Option<EndedBy>,
    pub breakdown: Breakdown,
    /// Blocked time by syscall number, largest first.
    pub syscalls: Vec<(i32, u64)>,
    /// True once the thread was seen in a wait-for cycle during this stall.
    pub in_cycle: bool,
    pub stacks: Option<StallStacks>,
    /// Time of the newest record about this stall.
    updated_ns: u64,
}

impl Stall {
    fn from_thread(thread: &LoopThread, end_ns: u64, ended_by: Option<EndedBy>) -> Self {
        let mut syscalls: Vec<(i32, u64)> = thread
            .syscalls
            .iter()
            .take(SYSCALL_SLOTS)
            .filter(|slot| slot.ns != 0)
            .map(|slot| (slot.nr, slot.ns))
            .collect();
        syscalls.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        Self {
            pid: thread.pid,
            tid: thread.tid,
            comm: comm_to_string(&thread.comm),
            iteration: thread.iteration,
            start_ns: thread.iteration_start_ns,
            duration_ns: end_ns.saturating_sub(thread.iteration_start_ns),
            ended_by,
            breakdown: thread.breakdown,
            syscalls,
            in_cycle: false,
            stacks: None,
            updated_ns: end_ns,
        }
    }

    /// Replaces the measured fields with a newer view of the same iteration.
    fn update_from(&mut self, newer: Stall) {
        let in_cycle = self.in_cycle;
        let stacks = self.stacks.take();
        *self = newer;
        self.in_cycle = in_cycle;
        self.stacks = stacks;
    }

    /// Returns true while the stall lasts.
    pub fn ongoing(&self) -> bool {
        self.ended_by.is_none()
    }
}

/// Converts a NUL-padded task name to a string.
pub fn comm_to_string(comm: &[u8]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// A change made by one record, with the stall's index into [`Aggregator::stalls`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A stall was seen for the first time while it lasts.
    Detected(usize),
    /// A stall ended. It may not have been detected before.
    Ended(usize),
    /// A wait-for cycle was found, by index into [`Aggregator::cycles`].
    CycleDetected(usize),
}

/// Steal per CPU over the traced time, by the two clocks of [`Record::HostSteal`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostSteal {
    pub kernel_ns: Vec<u64>,
    pub proc_stat_ns: Vec<u64>,
}

/// First and latest reading of one steal clock per CPU.
#[derive(Debug, Default)]
struct StealSpan {
    first: Vec<Option<u64>>,
    last: Vec<u64>,
}

impl StealSpan {
    /// Takes one reading per CPU. A 0 is a CPU whose clock has not been read
    /// yet, so it does not start that CPU's span.
    fn observe(&mut self, readings: &[u64]) {
        if self.first.len() < readings.len() {
            self.first.resize(readings.len(), None);
            self.last.resize(readings.len(), 0);
        }
        for (cpu, &value) in readings.iter().enumerate() {
            if value != 0 && self.first[cpu].is_none() {
                self.first[cpu] = Some(value);
            }
            self.last[cpu] = self.last[cpu].max(value);
        }
    }

    fn deltas(&self) -> Vec<u64> {
        self.first
            .iter()
            .zip(&self.last)
            .map(|(first, &last)| first.map_or(0, |first| last.saturating_sub(first)))
            .collect()
    }
}

/// Stalls found so far, and the loss counters.
// NOTE: every stall is kept until the end for the report, so a long `watch`
// on a host with thousands of stalls a second grows without bound.
#[derive(Debug)]
pub struct Aggregator {
    threshold_ns: u64,
    stalls: Vec<Stall>,
    /// Open stalls by (TID, iteration).
    open: HashMap<(u32, u64), usize>,
    first_ns: Option<u64>,
    last_ns: u64,
    previous_tick_ns: u64,
    drops: u64,
    untracked_threads: u64,
    kernel_steal: StealSpan,
    proc_stat_steal: StealSpan,
    cycles: Vec<Cycle>,
    /// Cycles seen at the latest scan, by their sorted TIDs.
    active_cycles: HashMap<Vec<u32>, usize>,
    /// Lock waits of the latest scan.
    lock_waits: Vec<LockWait>,
}

impl Aggregator {
    pub fn new(threshold_ns: u64) -> Self {
        Self {
            threshold_ns,
            stalls: Vec::new(),
            open: HashMap::new(),
            first_ns: None,
            last_ns: 0,
            previous_tick_ns: 0,
            drops: 0,
            untracked_threads: 0,
            kernel_steal: StealSpan::default(),
            proc_stat_steal: StealSpan::default(),
            cycles: Vec::new(),
            active_cycles: HashMap::new(),
            lock_waits: Vec::new(),
        }
    }

    /// Wait-for cycles in the order they were found.
    pub fn cycles(&self) -> &[Cycle] {
        &self.cycles
    }

    /// Lock waits seen by the latest scan.
    pub fn lock_waits(&self) -> &[LockWait] {
        &self.lock_waits
    }

    /// Returns (TID, iteration) of every stall that has not ended.
    pub fn open_iterations(&self) -> Vec<(u32, u64)> {
        self.open.keys().copied().collect()
    }

    /// Returns the steal per CPU between the first and the latest [`Record::HostSteal`].
    pub fn host_steal(&self) -> HostSteal {
        HostSteal {
            kernel_ns: self.kernel_steal.deltas(),
            proc_stat_ns: self.proc_stat_steal.deltas(),
        }
    }

    pub fn threshold_ns(&self) -> u64 {
        self.threshold_ns
    }

    /// Stalls in the order they were first seen.
    pub fn stalls(&self) -> &[Stall] {
        &self.stalls
    }

    /// Records lost because the ring buffer was full.
    pub fn drops(&self) -> u64 {
        self.drops
    }

    /// Loop threads that could not be tracked because the thread map was full.
    pub fn untracked_threads(&self) -> u64 {
        self.untracked_threads
    }

    /// Returns the time from the first to the last record.
    pub fn duration_ns(&self) -> u64 {
        self.first_ns.map_or(0, |first| self.last_ns.saturating_sub(first))
    }

    /// Applies one record and returns what changed.
    pub fn push(&mut self, record: &Record) -> Vec<Event> {
        match record {
            Record::Stall(stall) => {
                self.observe_time(stall.end_ns);
                let ended_by = if stall.kind == record_kind::THREAD_EXIT {
                    EndedBy::Exit
                } else {
                    EndedBy::Wait
                };
                self.end(&stall.thread, stall.end_ns, ended_by)
            }
            Record::Snapshot { now_ns, thread } => {
                self.observe_time(*now_ns);
                self.snapshot(thread, *now_ns)
            }
            Record::Tick {
                now_ns,
                drops,
                untracked_threads,
            } => {
                self.observe_time(*now_ns);
                self.drops = *drops;
                self.untracked_threads = *untracked_threads;
                self.refresh_cycles(*now_ns);
                let events = self.close_stale();
                self.previous_tick_ns = *now_ns;
                events
            }
            Record::HostSteal {
                now_ns,
                kernel_ns,
                proc_stat_ns,
            } => {
                self.observe_time(*now_ns);
                self.kernel_steal.observe(kernel_ns);
                self.proc_stat_steal.observe(proc_stat_ns);
                Vec::new()
            }
            Record::StallStacks(stacks) => {
                let stall = self
                    .stalls
                    .iter_mut()
                    .rev()
                    .find(|stall| stall.tid == stacks.tid && stall.iteration == stacks.iteration);
                if let Some(stall) = stall {
                    stall.stacks = Some(stacks.clone());
                }
                Vec::new()
            }
            Record::LockWaits { now_ns, waits } => {
                self.observe_time(*now_ns);
                self.lock_waits = waits.clone();
                self.update_cycles(*now_ns)
            }
        }
    }

    fn observe_time(&mut self, now_ns: u64) {
        self.first_ns.get_or_insert(now_ns);
        self.last_ns = self.last_ns.max(now_ns);
    }

    fn snapshot(&mut self, thread: &LoopThread, now_ns: u64) -> Vec<Event> {
        if !thread.in_iteration() {
            return Vec::new();
        }
        let mut thread = *thread;
        thread.accrue(now_ns);
        // The BPF side may have accounted past `now_ns` since the clock was read.
        let end_ns = thread.accounted_until_ns;
        if end_ns.saturating_sub(thread.iteration_start_ns) < self.threshold_ns {
            return Vec::new();
        }
        let stall = Stall::from_thread(&thread, end_ns, None);
        match self.open.get(&(thread.tid, thread.iteration)) {
            Some(&index) => {
                self.stalls[index].update_from(stall);
                Vec::new()
            }
            None => {
                let index = self.stalls.len();
                self.stalls.push(stall);
                self.open.insert((thread.tid, thread.iteration), index);
                vec![Event::Detected(index)]
            }
        }
    }

    fn end(&mut self, thread: &LoopThread, end_ns: u64, ended_by: EndedBy) -> Vec<Event> {
        let stall = Stall::from_thread(thread, end_ns, Some(ended_by));
        let index = match self.open.remove(&(thread.tid, thread.iteration)) {
            Some(index) => {
                self.stalls[index].update_from(stall);
                index
            }
            None => {
                self.stalls.push(stall);
                self.stalls.len() - 1
            }
        };
        vec![Event::Ended(index)]
    }

    /// Rebuilds the wait-for cycles from the latest lock waits, and marks the
    /// open stalls of threads in a cycle.
    fn update_cycles(&mut self, now_ns: u64) -> Vec<Event> {
        let mut events = Vec::new();
        let mut seen = HashSet::new();
        let mut threads_in_cycles = HashSet::new();
        for members in find_cycles(&self.lock_waits) {
            let edges: Vec<CycleEdge> = members
                .iter()
                .map(|&index| {
                    let wait = &self.lock_waits[index];
                    CycleEdge {
                        waiter: wait.tid,
                        waiter_pid: wait.pid,
                        waiter_comm: wait.comm.clone(),
                        futex: wait.futex.clone(),
                        holder: wait.holder.unwrap_or(0),
                        holder_source: wait.holder_source,
                        waited_ns: now_ns.saturating_sub(wait.since_ns),
                    }
                })
                .collect();
            let mut key: Vec<u32> = edges.iter().map(|edge| edge.waiter).collect();
            key.sort_unstable();
            threads_in_cycles.extend(key.iter().copied());
            seen.insert(key.clone());
            match self.active_cycles.get(&key) {
                Some(&index) => {
                    let cycle = &mut self.cycles[index];
                    cycle.edges = edges;
                    cycle.last_seen_ns = now_ns;
                }
                None => {
                    let index = self.cycles.len();
                    self.cycles.push(Cycle {
                        tids: edges.iter().map(|edge| edge.waiter).collect(),
                        futexes: edges.iter().map(|edge| edge.futex.clone()).collect(),
                        edges,
                        first_seen_ns: now_ns,
                        last_seen_ns: now_ns,
                        ongoing: true,
                    });
                    self.active_cycles.insert(key, index);
                    events.push(Event::CycleDetected(index));
                }
            }
        }
        self.active_cycles.retain(|key, index| {
            let still = seen.contains(key);
            if !still {
                self.cycles[*index].ongoing = false;
            }
            still
        });
        for &index in self.open.values() {
            if threads_in_cycles.contains(&self.stalls[index].tid) {
                self.stalls[index].in_cycle = true;
            }
        }
        events
    }

    /// Brings the cycles still present up to `now_ns`: a scan whose lock waits
    /// did not change sends no new lock-wait record, only a tick.
    fn refresh_cycles(&mut self, now_ns: u64) {
        let since: HashMap<u32, u64> = self.lock_waits.iter().map(|wait| (wait.tid, wait.since_ns)).collect();
        for &index in self.active_cycles.values() {
            let cycle = &mut self.cycles[index];
            cycle.last_seen_ns = now_ns;
            for edge in &mut cycle.edges {
                if let Some(&since_ns) = since.get(&edge.waiter) {
                    edge.waited_ns = now_ns.saturating_sub(since_ns);
                }
            }
        }
        // A stall detected after its cycle was found is in the cycle too.
        let in_cycles: HashSet<u32> = self
            .active_cycles
            .keys()
            .flat_map(|tids| tids.iter().copied())
            .collect();
        for &index in self.open.values() {
            if in_cycles.contains(&self.stalls[index].tid) {
                self.stalls[index].in_cycle = true;
            }
        }
    }

    /// Closes open stalls that no scan has seen since the tick before the last:
    /// their thread left the iteration but the end record never came.
    fn close_stale(&mut self) -> Vec<Event> {
        let cutoff = self.previous_tick_ns;
        let mut stale: Vec<((u32, u64), usize)> = self
            .open
            .iter()
            .filter(|(_, &index)| self.stalls[index].updated_ns < cutoff)
            .map(|(&key, &index)| (key, index))
            .collect();
        stale.sort_by_key(|&(_, index)| index);
        stale
            .into_iter()
            .map(|(key, index)| {
                self.open.remove(&key);
                self.stalls[index].ended_by = Some(EndedBy::Lost);
                Event::Ended(index)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::{run_state, SyscallTime};

    use super::*;

    const MS: u64 = 1_000_000;
    const THRESHOLD: u64 = 50 * MS;

    fn thread(iteration: u64, start_ns: u64) -> LoopThread {
        let mut thread = LoopThread::new(100, 101, start_ns);
        thread.begin_iteration(start_ns);
        thread.iteration = iteration;
        thread.comm[..4].copy_from_slice(b"loop");
        thread
    }

    fn ended(thread: LoopThread, end_ns: u64) -> Record {
        Record::Stall(StallRecord {
            kind: record_kind::STALL_END,
            _pad: 0,
            end_ns,
            thread,
        })
    }

    fn tick(now_ns: u64) -> Record {
        Record::Tick {
            now_ns,
            drops: 0,
            untracked_threads: 0,
        }
    }

    #[test]
    fn end_record_makes_one_stall() {
        let mut aggregator = Aggregator::new(THRESHOLD);
        let mut state = thread(1, 1000 * MS);
        state.accrue(1200 * MS);

        let events = aggregator.push(&ended(state, 1200 * MS));

        assert_eq!(events, vec![Event::Ended(0)]);
        let stall = &aggregator.stalls()[0];
        assert_eq!(stall.duration_ns, 200 * MS);
        assert_eq!(stall.breakdown.on_cpu_ns, 200 * MS);
        assert_eq!(stall.ended_by, Some(EndedBy::Wait));
        assert_eq!(stall.comm, "loop");
    }

    #[test]
    fn snapshot_below_threshold_ignored() {
        let mut aggregator = Aggregator::new(THRESHOLD);
        let state = thread(1, 1000 * MS);

        let events = aggregator.push(&Record::Snapshot { now_ns: 1040 * MS, thread: state });

        assert!(events.is_empty());
        assert!(aggregator.stalls().is_empty());
    }

    #[test]
    fn snapshot_then_end_is_one_stall() {
        let mut aggregator = Aggregator::new(THRESHOLD);
        let mut state = thread(7, 1000 * MS);
        state.run_state = run_state::BLOCKED;
        state.syscall_nr = 230;

        let detected = aggregator.push(&Record::Snapshot { now_ns: 1100 * MS, thread: state });
        assert_eq!(detected, vec![Event::Detected(0)]);
        assert!(aggregator.stalls()[0].ongoing());
        assert_eq!(aggregator.stalls()[0].duration_ns, 100 * MS);
        assert_eq!(aggregator.stalls()[0].breakdown.syscall_ns, 100 * MS);
        assert_eq!(aggregator.stalls()[0].syscalls, vec![(230, 100 * MS)]);

        state.accrue(1300 * MS);
        let ended_events = aggregator.push(&ended(state, 1300 * MS));
        assert_eq!(ended_events, vec![Event::Ended(0)]);
        assert_eq!(aggregator.stalls().len(), 1);
        assert_eq!(aggregator.stalls()[0].duration_ns, 300 * MS);
        assert!(!aggregator.stalls()[0].ongoing());
    }

    #[test]
    fn breakdown_adds_up_across_states() {
        let start = 1000 * MS;
        let mut state = thread(1, start);
        state.accrue(start + 10 * MS);
        state.run_state = run_state::RUNNABLE;
        state.accrue(start + 30 * MS);
        state.run_state = run_state::BLOCKED;
        state.in_futex = 1;
        state.accrue(start + 100 * MS);
        state.in_futex = 0;
        state.syscall_nr = 7;
        state.accrue(start + 160 * MS);
        state.run_state = run_state::RUNNING;
        state.accrue(start + 170 * MS);

        let b = state.breakdown;
        assert_eq!(b.on_cpu_ns, 20 * MS);
        assert_eq!(b.runqueue_ns, 20 * MS);
        assert_eq!(b.futex_ns, 70 * MS);
        assert_eq!(b.syscall_ns, 60 * MS);
        assert_eq!(b.total_ns(), 170 * MS);
        assert_eq!(state.syscalls[0], SyscallTime { nr: 7, _pad: 0, ns: 60 * MS });
    }

    #[test]
    fn syscall_overflow_goes_to_other() {
        let start = 1000 * MS;
        let mut state = thread(1, start);
        state.run_state = run_state::BLOCKED;
        for nr in 0..12 {
            state.syscall_nr = nr;
            state.accrue(start + (nr as u64 + 1) * MS);
        }
        let total: u64 = state.syscalls.iter().map(|slot| slot.ns).sum();
        assert_eq!(total, 12 * MS);
        assert_eq!(state.syscalls[SYSCALL_SLOTS - 1].nr, tracer_common::SYSCALL_OTHER);
        assert_eq!(state.syscalls[SYSCALL_SLOTS - 1].ns, 5 * MS);
    }

    #[test]
    fn waiting_thread_accrues_nothing() {
        let mut state = LoopThread::new(1, 2, 1000 * MS);
        state.accrue(2000 * MS);
        assert_eq!(state.breakdown.total_ns(), 0);
        assert_eq!(state.accounted_until_ns, 2000 * MS);
    }

    #[test]
    fn lost_end_record_closes_stall() {
        let mut aggregator = Aggregator::new(THRESHOLD);
        let state = thread(3, 1000 * MS);
        aggregator.push(&Record::Snapshot { now_ns: 1100 * MS, thread: state });
        assert!(aggregator.push(&tick(1100 * MS)).is_empty());

        // The next two scans do not see the thread in that iteration any more.
        assert!(aggregator.push(&tick(1300 * MS)).is_empty());
        let events = aggregator.push(&tick(1500 * MS));

        assert_eq!(events, vec![Event::Ended(0)]);
        assert_eq!(aggregator.stalls()[0].ended_by, Some(EndedBy::Lost));
    }

    #[test]
    fn ongoing_stall_stays_open_across_ticks() {
        let mut aggregator = Aggregator::new(THRESHOLD);
        let state = thread(3, 1000 * MS);
        for step in 1..10 {
            let now_ns = 1000 * MS + step * 200 * MS;
            aggregator.push(&Record::Snapshot { now_ns, thread: state });
            assert!(aggregator.push(&tick(now_ns)).is_empty());
        }
        assert_eq!(aggregator.stalls().len(), 1);
        assert!(aggregator.stalls()[0].ongoing());
        assert_eq!(aggregator.stalls()[0].duration_ns, 1800 * MS);
        assert_eq!(aggregator.duration_ns(), 1600 * MS);
    }

    #[test]
    fn thread_exit_ends_stall() {
        let mut aggregator = Aggregator::new(THRESHOLD);
        let mut state = thread(2, 1000 * MS);
        state.accrue(1080 * MS);
        let record = Record::Stall(StallRecord {
            kind: record_kind::THREAD_EXIT,
            _pad: 0,
            end_ns: 1080 * MS,
            thread: state,
        });

        aggregator.push(&record);

        assert_eq!(aggregator.stalls()[0].ended_by, Some(EndedBy::Exit));
        assert_eq!(aggregator.stalls()[0].duration_ns, 80 * MS);
    }

    /// Runs one iteration through the steal accounting: `(state, length, steal on the run queue's clock)` per period.
    fn iteration_with_steal(periods: &[(u8, u64, u64)]) -> Stall {
        const RQ: u64 = 0xffff_8880_0000_1000;
        let start = 1000 * MS;
        let mut state = thread(1, start);
        let mut now = start;
        let mut clock = 5 * MS;
        state.settle_steal(RQ, clock);
        for &(run_state, length, stolen) in periods {
            state.run_state = run_state;
            now += length;
            clock += stolen;
            state.accrue(now);
            state.settle_steal(RQ, clock);
        }
        let mut aggregator = Aggregator::new(THRESHOLD);
        aggregator.push(&ended(state, now));
        aggregator.stalls()[0].clone()
    }

    #[test]
    fn steal_dominated_stall_is_steal() {
        // A handler that computes 30 ms while the host takes 120 ms of its vCPU.
        let stall = iteration_with_steal(&[(run_state::RUNNING, 150 * MS, 120 * MS)]);

        assert_eq!(stall.breakdown.steal_ns, 120 * MS);
        assert_eq!(stall.breakdown.on_cpu_ns, 30 * MS);
        assert_eq!(stall.breakdown.total_ns(), stall.duration_ns);
        assert_eq!(crate::diagnosis::Verdict::of(&stall.breakdown), crate::diagnosis::Verdict::Steal);
    }

    #[test]
    fn contention_without_steal_is_runqueue() {
        let stall = iteration_with_steal(&[
            (run_state::RUNNING, 20 * MS, 0),
            (run_state::RUNNABLE, 90 * MS, 0),
            (run_state::RUNNING, 20 * MS, 0),
        ]);

        assert_eq!(stall.breakdown.runqueue_ns, 90 * MS);
        assert_eq!(stall.breakdown.steal_ns, 0);
        assert_eq!(crate::diagnosis::Verdict::of(&stall.breakdown), crate::diagnosis::Verdict::Runqueue);
    }

    #[test]
    fn mixed_stall_splits_shares() {
        let stall = iteration_with_steal(&[
            (run_state::RUNNING, 40 * MS, 10 * MS),
            (run_state::RUNNABLE, 50 * MS, 20 * MS),
            (run_state::BLOCKED, 30 * MS, 7 * MS),
            (run_state::THROTTLED, 25 * MS, 3 * MS),
            (run_state::RUNNING, 10 * MS, 0),
        ]);

        let b = stall.breakdown;
        assert_eq!(b.on_cpu_ns, 40 * MS);
        assert_eq!(b.runqueue_ns, 30 * MS);
        assert_eq!(b.steal_ns, 30 * MS, "steal while running or runnable only");
        assert_eq!(b.syscall_ns, 30 * MS);
        assert_eq!(b.throttled_ns, 25 * MS);
        assert_eq!(b.total_ns(), stall.duration_ns);
    }

    #[test]
    fn steal_capped_at_its_share() {
        // The steal clock can run ahead of a short period; the breakdown must still add up.
        let stall = iteration_with_steal(&[(run_state::RUNNING, 5 * MS, 9 * MS)]);

        assert_eq!(stall.breakdown.steal_ns, 5 * MS);
        assert_eq!(stall.breakdown.on_cpu_ns, 0);
        assert_eq!(stall.breakdown.total_ns(), stall.duration_ns);
    }

    #[test]
    fn steal_on_another_run_queue_ignored() {
        let start = 1000 * MS;
        let mut state = thread(1, start);
        state.settle_steal(0x1000, 5 * MS);
        state.run_state = run_state::RUNNABLE;
        state.accrue(start + 50 * MS);
        // Migrated: the thread was marked on one run queue and switched in on another.
        state.settle_steal(0x2000, 40 * MS);

        assert_eq!(state.breakdown.steal_ns, 0);
        assert_eq!(state.breakdown.runqueue_ns, 50 * MS);
    }

    #[test]
    fn blocked_time_goes_to_its_stack() {
        let start = 1000 * MS;
        let mut state = thread(1, start);
        state.run_state = run_state::BLOCKED;
        state.begin_off_cpu(7, 9);
        state.accrue(start + 30 * MS);
        state.run_state = run_state::RUNNING;
        state.accrue(start + 40 * MS);
        state.run_state = run_state::BLOCKED;
        state.begin_off_cpu(7, 9);
        state.accrue(start + 60 * MS);

        assert_eq!(state.stacks[0].user_stack, 7);
        assert_eq!(state.stacks[0].kernel_stack, 9);
        assert_eq!(state.stacks[0].ns, 50 * MS);
        assert_eq!(state.stacks[1].ns, 0);
    }

    #[test]
    fn host_steal_spans_first_to_last() {
        let mut aggregator = Aggregator::new(THRESHOLD);
        let reading = |now_ns, kernel_ns: Vec<u64>, proc_stat_ns: Vec<u64>| Record::HostSteal {
            now_ns,
            kernel_ns,
            proc_stat_ns,
        };
        // CPU 1 has not switched yet at the first reading, so its span starts later.
        aggregator.push(&reading(10, vec![500, 0], vec![1000, 2000]));
        aggregator.push(&reading(20, vec![800, 4000], vec![1000, 2010]));
        aggregator.push(&reading(30, vec![900, 4600], vec![1100, 2010]));

        let steal = aggregator.host_steal();

        assert_eq!(steal.kernel_ns, vec![400, 600]);
        assert_eq!(steal.proc_stat_ns, vec![100, 10]);
    }

    #[test]
    fn tick_updates_loss_counters() {
        let mut aggregator = Aggregator::new(THRESHOLD);
        aggregator.push(&Record::Tick {
            now_ns: 5,
            drops: 3,
            untracked_threads: 2,
        });
        assert_eq!(aggregator.drops(), 3);
        assert_eq!(aggregator.untracked_threads(), 2);
    }
}
