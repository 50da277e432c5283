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

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{map, tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
    Global,
};
use tracer_common::{
    counter, record_kind, run_state, KernelOffsets, LoopThread, StallRecord, TracepointLayout,
    MAX_CPUS, SYSCALL_NONE,
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
});

/// Kernel struct member offsets from vmlinux BTF; 0 where unknown.
#[no_mangle]
static OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets {
    task_slice: 0,
    task_cfs_rq: 0,
    cfs_rq_rq: 0,
    cfs_rq_throttle_count: 0,
    rq_prev_steal_time: 0,
    _pad: 0,
});

/// Loop threads by TID. Entries go away when the thread exits.
#[map]
static THREADS: HashMap<u32, LoopThread> = HashMap::with_max_entries(16384, 0);

/// Processes in scope when `FILTER_PIDS` is set, by PID.
#[map]
static TARGET_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Iterations at least this long are stalls. A map, not a global, because the
/// default threshold is the slice that these programs read once loaded. 0 reports nothing.
#[map]
static THRESHOLD_NS: Array<u64> = Array::with_max_entries(1, 0);

/// The scheduler slice of stalltrace's own thread, read the first time it waits in epoll.
#[map]
static SELF_SLICE: Array<u64> = Array::with_max_entries(1, 0);

/// Address of each CPU's run queue (`struct rq`), learned at context switches.
#[map]
static RQ_BY_CPU: Array<u64> = Array::with_max_entries(MAX_CPUS, 0);

/// Each CPU's steal clock (`rq->prev_steal_time`) at its latest context switch.
#[map]
static CPU_STEAL: Array<u64> = Array::with_max_entries(MAX_CPUS, 0);

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
#[inline(always)]
fn report_if_stalled(state: &LoopThread, kind: u32, now_ns: u64) {
    let threshold_ns = THRESHOLD_NS.get(0).copied().unwrap_or(0);
    if threshold_ns == 0
        || !state.in_iteration()
        || now_ns.saturating_sub(state.iteration_start_ns) < threshold_ns
    {
        return;
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
    // The idle task is not on a CFS run queue, so learn the rq from real tasks only.
    let mut rq = unsafe { *slot };
    if !prev_is_idle {
        rq = read_kernel::<u64>(current_cfs_rq(), offsets.cfs_rq_rq).unwrap_or(rq);
        unsafe { *slot = rq };
    }
    let steal = read_kernel::<u64>(rq, offsets.rq_prev_steal_time).unwrap_or(0);
    if let Some(clock) = CPU_STEAL.get_ptr_mut(cpu) {
        unsafe { *clock = steal };
    }
    (rq, steal)
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

#[tracepoint]
pub fn loop_wait_enter(_ctx: TracePointContext) -> u32 {
    let (pid, tid) = current_ids();
    let now_ns = unsafe { bpf_ktime_get_ns() };
    match thread(tid) {
        Some(state) => {
            state.accrue(now_ns);
            let (rq, steal) = cpu_steal(unsafe { bpf_get_smp_processor_id() });
            state.settle_steal(rq, steal);
            if let Ok(comm) = bpf_get_current_comm() {
                state.comm = comm;
            }
            report_if_stalled(state, record_kind::STALL_END, now_ns);
            state.iteration_start_ns = 0;
        }
        None => {
            if pid == SELF_PID.load() {
                record_own_slice();
                return 0;
            }
            if !in_scope(pid) {
                return 0;
            }
            let mut state = LoopThread::new(pid, tid, now_ns);
            if let Ok(comm) = bpf_get_current_comm() {
                state.comm = comm;
            }
            if THREADS.insert(&tid, &state, 0).is_err() {
                count(counter::THREAD_MAP_FULL);
            }
        }
    }
    0
}

#[tracepoint]
pub fn loop_wait_exit(_ctx: TracePointContext) -> u32 {
    let (_, tid) = current_ids();
    if let Some(state) = thread(tid) {
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
    // The tracepoint fires before the switch, so `current` is still `prev`.
    let (rq, steal) = this_cpu_steal(prev == 0);
    if let Some(state) = thread(prev as u32) {
        state.accrue(now_ns);
        state.settle_steal(rq, steal);
        let prev_state = unsafe { read_field::<i64>(&ctx, layout.switch_prev_state) }.unwrap_or(0);
        state.run_state = if prev_state & SLEEPING_STATE_MASK != 0 {
            run_state::BLOCKED
        } else if current_throttled() {
            run_state::THROTTLED
        } else {
            run_state::RUNNABLE
        };
    }
    if let Some(state) = thread(next as u32) {
        state.accrue(now_ns);
        state.settle_steal(rq, steal);
        state.run_state = run_state::RUNNING;
    }
    0
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
        let _ = THREADS.remove(&(tid as u32));
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
        let _ = THREADS.remove(&tid);
    }
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

#[inline(always)]
fn enter_futex(uaddr: u64) {
    let (_, tid) = current_ids();
    if let Some(state) = thread(tid) {
        state.in_futex = 1;
        state.futex_uaddr = uaddr;
    }
}

#[tracepoint]
pub fn futex_enter(ctx: TracePointContext) -> u32 {
    enter_futex(unsafe { read_field::<u64>(&ctx, LAYOUT.load().futex_uaddr) }.unwrap_or(0));
    0
}

#[tracepoint]
pub fn futex_wait_enter(ctx: TracePointContext) -> u32 {
    enter_futex(unsafe { read_field::<u64>(&ctx, LAYOUT.load().futex_wait_uaddr) }.unwrap_or(0));
    0
}

/// `futex_waitv` waits on a vector of futexes, so no single address is kept.
#[tracepoint]
pub fn futex_waitv_enter(_ctx: TracePointContext) -> u32 {
    enter_futex(0);
    0
}

#[tracepoint]
pub fn futex_exit(_ctx: TracePointContext) -> u32 {
    let (_, tid) = current_ids();
    if let Some(state) = thread(tid) {
        state.in_futex = 0;
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
