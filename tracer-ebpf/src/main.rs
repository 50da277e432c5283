//! BPF programs that follow event-loop threads and report stalled iterations.
//!
//! A thread becomes a loop thread when it enters `epoll_wait`, `epoll_pwait` or
//! `epoll_pwait2`. From the return of that wait to the next entry, the
//! scheduler and syscall tracepoints split the thread's wall time into shares
//! (see `LoopThread::accrue`). An iteration that reaches `THRESHOLD_NS` is sent
//! to userspace when it ends, one record per stall. Ongoing stalls are read by
//! userspace straight from the `THREADS` map.
#![no_std]
#![no_main]
// The BPF target's `core` has no `fetch_add`, but LLVM lowers the intrinsic to
// the BPF atomic add instruction.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    macros::{map, perf_event, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, StackTrace},
    programs::{tracing::StackIdContext, PerfEventContext, TracePointContext},
    Global,
};
use tracer_common::{
    counter, futex_op, record_kind, run_state, FutexKey, FutexTraffic, FutexWait, KernelOffsets,
    LoopThread, SampleKey, StallRecord, TracepointLayout, MAX_CPUS, NO_STACK, STACK_SLOTS,
    SYSCALL_NONE,
};

/// Process ID of stalltrace itself, never traced (its own runtime waits in epoll).
#[no_mangle]
static SELF_PID: Global<u32> = Global::new(0);
/// 1 when only the processes in `TARGET_PIDS` are in scope.
#[no_mangle]
static FILTER_PIDS: Global<u8> = Global::new(0);
/// Tracepoint field offsets read from tracefs by the loader.
#[no_mangle]
static LAYOUT: Global<TracepointLayout> = Global::new(TracepointLayout {
    switch_prev_pid: 0,
    switch_prev_state: 0,
    switch_next_pid: 0,
    wakeup_pid: 0,
    wakeup_target_cpu: 0,
    wakeup_new_pid: 0,
    sys_enter_id: 0,
    futex_uaddr: 0,
    futex_wait_uaddr: 0,
    futex_op: 0,
    futex_val: 0,
    futex_wait_val: 0,
    futex_wake_uaddr: 0,
    sys_exit_ret: 0,
});

/// Kernel struct member offsets from vmlinux BTF; 0 where unknown.
#[no_mangle]
static OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets {
    task_slice: 0,
    task_cfs_rq: 0,
    cfs_rq_rq: 0,
    cfs_rq_throttle_count: 0,
    rq_prev_steal_time: 0,
    task_stack: 0,
});

/// Loop threads by TID. Entries go away when the thread exits.
#[map]
static THREADS: HashMap<u32, LoopThread> = HashMap::with_max_entries(16384, 0);

/// Number of loop threads per process, by PID.
#[map]
static PROC_LOOP_THREADS: HashMap<u32, u64> = HashMap::with_max_entries(16384, 0);

/// Loop threads already counted in `THREAD_MAP_FULL`, so each counts once.
#[map]
static UNTRACKED: LruHashMap<u32, u8> = LruHashMap::with_max_entries(16384, 0);

/// Processes in scope when `FILTER_PIDS` is set, by PID.
#[map]
static TARGET_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Iterations at least this long are stalls. A map, not a global, because the
/// default threshold is the slice that these programs read once loaded. 0 reports nothing.
#[map]
static THRESHOLD_NS: Array<u64> = Array::with_max_entries(1, 0);

/// Offset from a task's kernel stack base to `orig_ax` of its saved user
/// registers (the syscall number), 0 while unknown. A map, because userspace
/// checks it against this program's own syscalls after loading.
#[map]
static SYSCALL_NR_OFFSET: Array<u32> = Array::with_max_entries(1, 0);

/// The syscall number read for stalltrace's own thread in epoll, tagged with
/// bit 63, for userspace to check `SYSCALL_NR_OFFSET`.
#[map]
static SELF_SYSCALL: Array<u64> = Array::with_max_entries(1, 0);

/// The scheduler slice of stalltrace's own thread, read the first time it waits in epoll.
#[map]
static SELF_SLICE: Array<u64> = Array::with_max_entries(1, 0);

/// Address of each CPU's run queue (`struct rq`), learned at context switches.
#[map]
static RQ_BY_CPU: Array<u64> = Array::with_max_entries(MAX_CPUS, 0);

/// Each CPU's steal clock (`rq->prev_steal_time`), copied at context switches.
#[map]
static CPU_STEAL: Array<u64> = Array::with_max_entries(MAX_CPUS, 0);

/// When each CPU last copied its steal clock into `CPU_STEAL` without a tracked thread involved.
#[map]
static CPU_STEAL_AT: Array<u64> = Array::with_max_entries(MAX_CPUS, 0);

/// How often a CPU copies its steal clock when no tracked thread switches on it:
/// about one scheduler tick at 250 Hz, finer than `/proc/stat`'s 10 ms.
const STEAL_REFRESH_NS: u64 = 4_000_000;

/// User and kernel stacks, by ID.
// NOTE: entries are never freed, so after many distinct stacks new ones that
// hash into a taken slot come back as NO_STACK and a long run loses stacks.
#[map]
static STACKS: StackTrace = StackTrace::with_max_entries(16384, 0);

/// Threads in scope inside a futex wait, by TID: lock waits, and with a PID
/// filter every futex wait.
#[map]
static FUTEX_WAITS: HashMap<u32, FutexWait> = HashMap::with_max_entries(16384, 0);

/// Acquirers and wakers of futexes that were waited on as locks.
#[map]
static FUTEX_TRAFFIC: LruHashMap<FutexKey, FutexTraffic> = LruHashMap::with_max_entries(16384, 0);

/// On-CPU samples of loop threads in a stalled iteration, counted by stack.
#[map]
static SAMPLES: LruHashMap<SampleKey, u64> = LruHashMap::with_max_entries(16384, 0);

/// Per-CPU counters, indexed by `tracer_common::counter`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// `prev_state` bits of a task that went to sleep. A preempted task reports
/// 0 or `TASK_REPORT_MAX` (0x100), see `__trace_sched_switch_state` in
/// `include/trace/events/sched.h`.
const SLEEPING_STATE_MASK: i64 = 0xff;

#[inline(always)]
fn in_scope(pid: u32) -> bool {
    if pid == SELF_PID.load() {
        return false;
    }
    FILTER_PIDS.load() == 0 || unsafe { TARGET_PIDS.get(&pid) }.is_some()
}

#[inline(always)]
fn count(index: u32) {
    if let Some(value) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, and BPF programs do not nest on one CPU for these tracepoints.
        unsafe { *value += 1 };
    }
}

#[inline(always)]
fn thread(tid: u32) -> Option<&'static mut LoopThread> {
    // SAFETY: map values stay valid for the program's run.
    THREADS.get_ptr_mut(&tid).map(|ptr| unsafe { &mut *ptr })
}

#[inline(always)]
fn current_ids() -> (u32, u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    ((pid_tgid >> 32) as u32, pid_tgid as u32)
}

#[inline(always)]
unsafe fn read_field<T>(ctx: &TracePointContext, offset: u32) -> Option<T> {
    unsafe { ctx.read_at::<T>(offset as usize) }.ok()
}

/// Sends the thread's iteration to userspace if it reached the threshold.
/// Call it from the thread itself, whose current name goes into the record.
#[inline(always)]
fn report_if_stalled(state: &mut LoopThread, kind: u32, now_ns: u64) {
    let threshold_ns = THRESHOLD_NS.get(0).copied().unwrap_or(0);
    if threshold_ns == 0
        || !state.in_iteration()
        || now_ns.saturating_sub(state.iteration_start_ns) < threshold_ns
    {
        return;
    }
    if let Ok(comm) = bpf_get_current_comm() {
        state.comm = comm;
    }
    let Some(mut entry) = EVENTS.reserve::<StallRecord>(0) else {
        count(counter::RINGBUF_DROPS);
        return;
    };
    let record = entry.as_mut_ptr();
    // SAFETY: the entry is reserved for a whole StallRecord.
    unsafe {
        (*record).kind = kind;
        (*record)._pad = 0;
        (*record).end_ns = now_ns;
        (*record).thread = *state;
    }
    entry.submit(0);
}

/// Reads a kernel value at `base + offset`, or `None` if either is 0 or the read fails.
#[inline(always)]
fn read_kernel<T>(base: u64, offset: u32) -> Option<T> {
    if base == 0 || offset == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the address and fails on a bad one.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) }.ok()
}

#[inline(always)]
fn current_task() -> u64 {
    unsafe { bpf_get_current_task() }
}

/// Returns the CFS run queue the current task is queued on.
#[inline(always)]
fn current_cfs_rq() -> u64 {
    read_kernel::<u64>(current_task(), OFFSETS.load().task_cfs_rq).unwrap_or(0)
}

/// Returns the address of this CPU's run queue and its steal clock, or zeros when unknown.
#[inline(always)]
fn this_cpu_steal(prev_is_idle: bool) -> (u64, u64) {
    let offsets = OFFSETS.load();
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let Some(slot) = RQ_BY_CPU.get_ptr_mut(cpu) else {
        return (0, 0);
    };
    // A CPU's run queue never moves, so it is learned once. The idle task is
    // not on a CFS run queue, so it is learned from a real task.
    let mut rq = unsafe { *slot };
    if rq == 0 && !prev_is_idle {
        rq = read_kernel::<u64>(current_cfs_rq(), offsets.cfs_rq_rq).unwrap_or(0);
        unsafe { *slot = rq };
    }
    let steal = read_kernel::<u64>(rq, offsets.rq_prev_steal_time).unwrap_or(0);
    if let Some(clock) = CPU_STEAL.get_ptr_mut(cpu) {
        unsafe { *clock = steal };
    }
    (rq, steal)
}

/// Returns true if this CPU's steal clock was last copied to `CPU_STEAL` more
/// than `STEAL_REFRESH_NS` ago, and marks it copied now.
#[inline(always)]
fn steal_refresh_due(now_ns: u64) -> bool {
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let Some(last) = CPU_STEAL_AT.get_ptr_mut(cpu) else {
        return false;
    };
    // SAFETY: the slot is a valid map value, written only from this CPU.
    unsafe {
        if now_ns.saturating_sub(*last) < STEAL_REFRESH_NS {
            return false;
        }
        *last = now_ns;
    }
    true
}

/// Returns the run queue of `cpu` and its steal clock, or zeros when unknown.
#[inline(always)]
fn cpu_steal(cpu: u32) -> (u64, u64) {
    let rq = RQ_BY_CPU.get(cpu).copied().unwrap_or(0);
    (rq, read_kernel::<u64>(rq, OFFSETS.load().rq_prev_steal_time).unwrap_or(0))
}

/// Returns true if the current task's CFS group, or a parent group, is throttled.
#[inline(always)]
fn current_throttled() -> bool {
    read_kernel::<i32>(current_cfs_rq(), OFFSETS.load().cfs_rq_throttle_count).unwrap_or(0) > 0
}

/// Returns the number of the syscall the current task is in, -1 outside a
/// syscall, or `None` when the register offset is unknown.
#[inline(always)]
fn current_syscall_nr() -> Option<i32> {
    let offset = SYSCALL_NR_OFFSET.get(0).copied().unwrap_or(0);
    let stack = read_kernel::<u64>(current_task(), OFFSETS.load().task_stack)?;
    read_kernel::<i64>(stack, offset).map(|nr| nr as i32)
}

/// Stores `current->se.slice` in `SELF_SLICE`, the slice this kernel gives a normal task.
#[inline(always)]
fn record_own_slice() {
    let Some(slot) = SELF_SLICE.get_ptr_mut(0) else { return };
    // SAFETY: the slot is a valid map value.
    if unsafe { *slot } != 0 {
        return;
    }
    if let Some(slice) = read_kernel::<u64>(current_task(), OFFSETS.load().task_slice) {
        unsafe { *slot = slice };
    }
}

/// Starts following a loop thread, or counts it as untracked when the map is full.
#[inline(always)]
fn track(pid: u32, tid: u32, now_ns: u64) -> Option<&'static mut LoopThread> {
    let mut state = LoopThread::new(pid, tid, now_ns);
    if let Ok(comm) = bpf_get_current_comm() {
        state.comm = comm;
    }
    if THREADS.insert(&tid, &state, BPF_NOEXIST as u64).is_err() {
        // An untracked thread tries again at every wait, so count it only the first time.
        if UNTRACKED.insert(&tid, &1, BPF_NOEXIST as u64).is_ok() {
            count(counter::THREAD_MAP_FULL);
        }
        return None;
    }
    // Threads of one process start on several CPUs at once, so the count is atomic.
    match PROC_LOOP_THREADS.get_ptr_mut(&pid) {
        Some(loops) => add_to_count(loops, 1),
        None => {
            if PROC_LOOP_THREADS.insert(&pid, &1, BPF_NOEXIST as u64).is_err() {
                if let Some(loops) = PROC_LOOP_THREADS.get_ptr_mut(&pid) {
                    // Another CPU inserted the count first.
                    add_to_count(loops, 1);
                }
            }
        }
    }
    thread(tid)
}

/// Adds `delta` (wrapping, so `u64::MAX` subtracts 1) to a shared count.
/// The result is not returned because BPF CPU v1, which these programs target,
/// has an atomic add that cannot fetch.
#[inline(always)]
fn add_to_count(count: *mut u64, delta: u64) {
    // SAFETY: `count` points to a map value, valid and 8-byte aligned for the program's run.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(count, delta) };
}

/// Stops following a loop thread.
#[inline(always)]
fn untrack(pid: u32, tid: u32) {
    if THREADS.remove(&tid).is_err() {
        return;
    }
    if let Some(loops) = PROC_LOOP_THREADS.get_ptr_mut(&pid) {
        add_to_count(loops, u64::MAX);
        // SAFETY: map values stay valid for the program's run.
        if unsafe { *loops } == 0 {
            // NOTE: a thread of the same process tracked between the decrement and
            // this removal loses its count, so the process may count one loop too few.
            let _ = PROC_LOOP_THREADS.remove(&pid);
        }
    }
}

#[tracepoint]
pub fn loop_wait_enter(_ctx: TracePointContext) -> u32 {
    let (pid, tid) = current_ids();
    let now_ns = unsafe { bpf_ktime_get_ns() };
    match thread(tid) {
        Some(state) => {
            state.accrue(now_ns);
            let (rq, steal) = cpu_steal(unsafe { bpf_get_smp_processor_id() });
            state.settle_steal(rq, steal);
            report_if_stalled(state, record_kind::STALL_END, now_ns);
            state.iteration_start_ns = 0;
        }
        None => {
            if pid == SELF_PID.load() {
                record_own_slice();
                if let (Some(slot), Some(nr)) = (SELF_SYSCALL.get_ptr_mut(0), current_syscall_nr()) {
                    // SAFETY: the slot is a valid map value.
                    unsafe { *slot = (1 << 63) | (nr as u32 as u64) };
                }
                return 0;
            }
            if in_scope(pid) {
                let _ = track(pid, tid, now_ns);
            }
        }
    }
    0
}

#[tracepoint]
pub fn loop_wait_exit(_ctx: TracePointContext) -> u32 {
    let (pid, tid) = current_ids();
    let now_ns = unsafe { bpf_ktime_get_ns() };
    // A thread that was already waiting when tracing began is first seen here.
    let state = match thread(tid) {
        Some(state) => Some(state),
        None if pid != SELF_PID.load() && in_scope(pid) => track(pid, tid, now_ns),
        None => None,
    };
    if let Some(state) = state {
        state.begin_iteration(unsafe { bpf_ktime_get_ns() });
        let (rq, steal) = cpu_steal(unsafe { bpf_get_smp_processor_id() });
        state.settle_steal(rq, steal);
    }
    0
}

#[tracepoint]
pub fn sched_switch(ctx: TracePointContext) -> u32 {
    let layout = LAYOUT.load();
    let now_ns = unsafe { bpf_ktime_get_ns() };
    let prev = unsafe { read_field::<i32>(&ctx, layout.switch_prev_pid) }.unwrap_or(0);
    let next = unsafe { read_field::<i32>(&ctx, layout.switch_next_pid) }.unwrap_or(0);
    // Reading the steal clock costs a few kernel reads, so it is done for tracked
    // threads and otherwise only often enough to keep the per-CPU totals current.
    // The tracepoint fires before the switch, so `current` is still `prev`.
    let mut clock: Option<(u64, u64)> = None;
    let prev_state = unsafe { read_field::<i64>(&ctx, layout.switch_prev_state) }.unwrap_or(0);
    let blocking = prev_state & SLEEPING_STATE_MASK != 0;
    let mut stacks = None;
    if let Some(state) = thread(prev as u32) {
        let (rq, steal) = *clock.get_or_insert_with(|| this_cpu_steal(prev == 0));
        state.accrue(now_ns);
        state.settle_steal(rq, steal);
        if blocking {
            if let Some(nr) = current_syscall_nr() {
                state.syscall_nr = nr;
            }
        }
        state.run_state = if blocking {
            run_state::BLOCKED
        } else if current_throttled() {
            run_state::THROTTLED
        } else {
            run_state::RUNNABLE
        };
        // Where a thread blocks names the culprit. Where it is preempted is
        // just where its code happened to be, which the on-CPU samples cover.
        if blocking && state.in_iteration() {
            let (user, kernel) = *stacks.get_or_insert_with(|| current_stacks(&ctx));
            state.begin_off_cpu(user, kernel);
        } else {
            state.off_cpu_slot = STACK_SLOTS as u32;
        }
    }
    if blocking {
        if let Some(wait) = FUTEX_WAITS.get_ptr_mut(&(prev as u32)) {
            // SAFETY: map values stay valid for the program's run.
            let wait = unsafe { &mut *wait };
            wait.blocked = 1;
            if wait.user_stack == NO_STACK && wait.kernel_stack == NO_STACK {
                let (user, kernel) = *stacks.get_or_insert_with(|| current_stacks(&ctx));
                wait.user_stack = user;
                wait.kernel_stack = kernel;
            }
        }
    }
    if let Some(state) = thread(next as u32) {
        let (rq, steal) = *clock.get_or_insert_with(|| this_cpu_steal(prev == 0));
        state.accrue(now_ns);
        state.settle_steal(rq, steal);
        state.run_state = run_state::RUNNING;
    }
    if clock.is_none() && steal_refresh_due(now_ns) {
        this_cpu_steal(prev == 0);
    }
    0
}

/// Returns the current task's user and kernel stack IDs, [`NO_STACK`] where unavailable.
#[inline(always)]
fn current_stacks<C: StackIdContext>(ctx: &C) -> (i32, i32) {
    let user = ctx.get_stackid(&STACKS, BPF_F_USER_STACK as u64).map_or(NO_STACK, |id| id as i32);
    let kernel = ctx.get_stackid(&STACKS, 0).map_or(NO_STACK, |id| id as i32);
    (user, kernel)
}

#[tracepoint]
pub fn sched_wakeup(ctx: TracePointContext) -> u32 {
    let layout = LAYOUT.load();
    let Some(tid) = (unsafe { read_field::<i32>(&ctx, layout.wakeup_pid) }) else {
        return 0;
    };
    if let Some(state) = thread(tid as u32) {
        if state.run_state == run_state::BLOCKED {
            state.accrue(unsafe { bpf_ktime_get_ns() });
            state.run_state = run_state::RUNNABLE;
            let cpu = unsafe { read_field::<i32>(&ctx, layout.wakeup_target_cpu) }.unwrap_or(-1);
            let (rq, steal) = cpu_steal(cpu as u32);
            // Blocked time holds no steal, so only the mark moves.
            state.steal_mark_ns = steal;
            state.steal_mark_rq = rq;
        }
    }
    0
}

/// Drops state left by an earlier thread with the same TID whose exit was missed.
#[tracepoint]
pub fn sched_wakeup_new(ctx: TracePointContext) -> u32 {
    if let Some(tid) = unsafe { read_field::<i32>(&ctx, LAYOUT.load().wakeup_new_pid) } {
        if let Some(state) = thread(tid as u32) {
            let pid = state.pid;
            untrack(pid, tid as u32);
        }
    }
    0
}

#[tracepoint]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    let (_, tid) = current_ids();
    if let Some(state) = thread(tid) {
        let now_ns = unsafe { bpf_ktime_get_ns() };
        state.accrue(now_ns);
        report_if_stalled(state, record_kind::THREAD_EXIT, now_ns);
        let pid = state.pid;
        untrack(pid, tid);
    }
    // A thread killed inside a futex wait never reaches the syscall's exit.
    let _ = FUTEX_WAITS.remove(&tid);
    0
}

#[tracepoint]
pub fn sys_enter(ctx: TracePointContext) -> u32 {
    let (_, tid) = current_ids();
    if let Some(state) = thread(tid) {
        let id = unsafe { read_field::<i64>(&ctx, LAYOUT.load().sys_enter_id) }.unwrap_or(-1);
        state.syscall_nr = id as i32;
    }
    0
}

#[tracepoint]
pub fn sys_exit(_ctx: TracePointContext) -> u32 {
    let (_, tid) = current_ids();
    if let Some(state) = thread(tid) {
        state.syscall_nr = SYSCALL_NONE;
    }
    0
}

/// Tracks one futex syscall entry: loop threads' futex share, waits of threads
/// in scope, and the wakes that tell who released a lock.
#[inline(always)]
fn enter_futex(uaddr: u64, op: u32, val: u32) {
    let (pid, tid) = current_ids();
    let lock_like = uaddr != 0 && (val == LOCKED_CONTENDED || futex_op::is_pi(op));
    if let Some(state) = thread(tid) {
        state.in_futex = 1;
        state.futex_uaddr = uaddr;
        if futex_op::is_wait(op) && !lock_like && state.in_iteration() && shares_work(pid) {
            park(state);
        }
    }
    let key = FutexKey { pid, _pad: 0, uaddr };
    if futex_op::is_wait(op) {
        // Condition variables and parkers are waited on far more often than
        // locks and cannot form a deadlock, so tracing every process keeps only
        // lock waits. With --pid the cost stays in the chosen processes.
        if !in_scope(pid) || (!lock_like && FILTER_PIDS.load() == 0) {
            return;
        }
        let wait = FutexWait {
            pid,
            tid,
            uaddr,
            since_ns: unsafe { bpf_ktime_get_ns() },
            op,
            val,
            user_stack: NO_STACK,
            kernel_stack: NO_STACK,
            blocked: 0,
            _pad: 0,
        };
        let _ = FUTEX_WAITS.insert(&tid, &wait, 0);
        if lock_like {
            let _ = FUTEX_TRAFFIC.insert(&key, &FutexTraffic::default(), BPF_NOEXIST as u64);
        }
    } else if futex_op::is_wake(op) {
        note_wake(&key, tid);
    }
}

/// Returns true if the process runs several loop threads, as multi-threaded
/// runtimes do: there an idle worker parks on a futex instead of its loop's wait.
#[inline(always)]
fn shares_work(pid: u32) -> bool {
    unsafe { PROC_LOOP_THREADS.get(&pid) }.is_some_and(|&loops| loops >= 2)
}

/// Ends the iteration of a loop thread that parks idle on a futex, as if it
/// had entered its loop's wait.
// NOTE: a handler in such a process that blocks on a condition variable is
// taken for an idle park and not reported. Lock waits are still reported.
#[inline(always)]
fn park(state: &mut LoopThread) {
    let now_ns = unsafe { bpf_ktime_get_ns() };
    state.accrue(now_ns);
    let (rq, steal) = cpu_steal(unsafe { bpf_get_smp_processor_id() });
    state.settle_steal(rq, steal);
    report_if_stalled(state, record_kind::STALL_END, now_ns);
    state.iteration_start_ns = 0;
    state.parked = 1;
}

/// Records that `tid` woke the futex, if anyone has waited on it as a lock.
#[inline(always)]
fn note_wake(key: &FutexKey, tid: u32) {
    let Some(traffic) = FUTEX_TRAFFIC.get_ptr_mut(key) else { return };
    // SAFETY: map values stay valid for the program's run.
    let traffic = unsafe { &mut *traffic };
    if traffic.acquirer == tid {
        traffic.acquirer = 0;
    }
    if traffic.wakers[0] != tid {
        traffic.wakers[1] = traffic.wakers[0];
        traffic.wakers[0] = tid;
    }
    traffic.woken_ns = unsafe { bpf_ktime_get_ns() };
}

/// The futex word value of glibc's and Rust's mutexes when locked with waiters.
const LOCKED_CONTENDED: u32 = 2;

#[tracepoint]
pub fn futex_enter(ctx: TracePointContext) -> u32 {
    let layout = LAYOUT.load();
    let uaddr = unsafe { read_field::<u64>(&ctx, layout.futex_uaddr) }.unwrap_or(0);
    let op = unsafe { read_field::<u32>(&ctx, layout.futex_op) }.unwrap_or(0);
    let val = unsafe { read_field::<u32>(&ctx, layout.futex_val) }.unwrap_or(0);
    enter_futex(uaddr, op, val);
    0
}

#[tracepoint]
pub fn futex_wait_enter(ctx: TracePointContext) -> u32 {
    let layout = LAYOUT.load();
    let uaddr = unsafe { read_field::<u64>(&ctx, layout.futex_wait_uaddr) }.unwrap_or(0);
    let val = unsafe { read_field::<u64>(&ctx, layout.futex_wait_val) }.unwrap_or(0);
    enter_futex(uaddr, futex_op::FUTEX2_WAIT, val as u32);
    0
}

/// `futex_waitv` waits on a vector of futexes, so no single address is kept.
#[tracepoint]
pub fn futex_waitv_enter(_ctx: TracePointContext) -> u32 {
    enter_futex(0, futex_op::FUTEX2_WAITV, 0);
    0
}

#[tracepoint]
pub fn futex_wake_enter(ctx: TracePointContext) -> u32 {
    let (pid, tid) = current_ids();
    let uaddr = unsafe { read_field::<u64>(&ctx, LAYOUT.load().futex_wake_uaddr) }.unwrap_or(0);
    note_wake(&FutexKey { pid, _pad: 0, uaddr }, tid);
    0
}

#[tracepoint]
pub fn futex_exit(ctx: TracePointContext) -> u32 {
    let (pid, tid) = current_ids();
    if let Some(state) = thread(tid) {
        state.in_futex = 0;
        if state.parked != 0 {
            state.parked = 0;
            state.begin_iteration(unsafe { bpf_ktime_get_ns() });
            let (rq, steal) = cpu_steal(unsafe { bpf_get_smp_processor_id() });
            state.settle_steal(rq, steal);
        }
    }
    let Some(wait) = (unsafe { FUTEX_WAITS.get(&tid) }).copied() else {
        return 0;
    };
    let _ = FUTEX_WAITS.remove(&tid);
    let ret = unsafe { read_field::<i64>(&ctx, LAYOUT.load().sys_exit_ret) }.unwrap_or(-1);
    // Woken from a lock wait: the thread now most likely holds the lock.
    if ret == 0 {
        let key = FutexKey { pid, _pad: 0, uaddr: wait.uaddr };
        if let Some(traffic) = FUTEX_TRAFFIC.get_ptr_mut(&key) {
            // SAFETY: map values stay valid for the program's run.
            let traffic = unsafe { &mut *traffic };
            traffic.acquirer = tid;
            traffic.acquired_ns = unsafe { bpf_ktime_get_ns() };
        }
    }
    0
}

/// Samples the stacks of loop threads whose current iteration is past the threshold.
#[perf_event]
pub fn on_cpu_sample(ctx: PerfEventContext) -> u32 {
    let (_, tid) = current_ids();
    let Some(state) = thread(tid) else { return 0 };
    let threshold_ns = THRESHOLD_NS.get(0).copied().unwrap_or(0);
    let now_ns = unsafe { bpf_ktime_get_ns() };
    if threshold_ns == 0
        || !state.in_iteration()
        || now_ns.saturating_sub(state.iteration_start_ns) < threshold_ns
    {
        return 0;
    }
    let (user_stack, kernel_stack) = current_stacks(&ctx);
    let key = SampleKey {
        tid,
        user_stack,
        kernel_stack,
        _pad: 0,
        iteration: state.iteration,
    };
    match SAMPLES.get_ptr_mut(&key) {
        // SAFETY: map values stay valid for the program's run.
        Some(count) => unsafe { *count += 1 },
        None => {
            let _ = SAMPLES.insert(&key, &1, 0);
        }
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
