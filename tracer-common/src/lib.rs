//! Record and map value types shared by the BPF programs and userspace.
//!
//! Every type is `#[repr(C)]` with explicit padding, because the BPF side
//! writes it into maps and the ring buffer and userspace reads the same bytes.
//! [`LoopThread::accrue`] is shared too, so the kernel's accounting of an
//! ended iteration and userspace's view of an ongoing one are the same code.
#![no_std]

/// Length of a task name, `TASK_COMM_LEN` in `include/linux/sched.h`.
pub const TASK_COMM_LEN: usize = 16;

/// Number of per-syscall slots kept for the blocked time of one iteration.
pub const SYSCALL_SLOTS: usize = 8;

/// Number of off-CPU stack slots kept per iteration.
pub const STACK_SLOTS: usize = 4;

/// Stack ID for a stack that was not captured.
pub const NO_STACK: i32 = -1;

/// Syscall number for time blocked outside any syscall (a page fault, for one).
pub const SYSCALL_NONE: i32 = -1;
/// Syscall number for time in syscalls that found no free slot.
pub const SYSCALL_OTHER: i32 = -2;

/// Scheduler state of a tracked thread, as the scheduler events show it.
pub mod run_state {
    /// On a CPU.
    pub const RUNNING: u8 = 0;
    /// Preempted or woken, waiting on a run queue.
    pub const RUNNABLE: u8 = 1;
    /// Sleeping until something wakes it.
    pub const BLOCKED: u8 = 2;
    /// Runnable, but its cgroup has used its CPU bandwidth quota for this period.
    pub const THROTTLED: u8 = 3;
}

/// Kinds of ring-buffer record.
pub mod record_kind {
    /// A loop iteration ended past the threshold when the thread entered its wait again.
    pub const STALL_END: u32 = 1;
    /// A thread exited in the middle of an iteration that was past the threshold.
    pub const THREAD_EXIT: u32 = 2;
}

/// Upper bound on CPU numbers in the arrays indexed by CPU.
pub const MAX_CPUS: u32 = 1024;

/// Indexes of the per-CPU counters in the `COUNTERS` map.
pub mod counter {
    /// Records lost because the ring buffer had no room.
    pub const RINGBUF_DROPS: u32 = 0;
    /// Loop threads not tracked because the thread map was full.
    pub const THREAD_MAP_FULL: u32 = 1;
    /// Number of counters.
    pub const COUNT: u32 = 2;
}

/// Wall time of one iteration, split by what the thread was doing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Breakdown {
    pub on_cpu_ns: u64,
    pub runqueue_ns: u64,
    pub steal_ns: u64,
    pub throttled_ns: u64,
    pub futex_ns: u64,
    pub syscall_ns: u64,
}

impl Breakdown {
    /// Returns the sum of all shares.
    pub fn total_ns(&self) -> u64 {
        let Self {
            on_cpu_ns,
            runqueue_ns,
            steal_ns,
            throttled_ns,
            futex_ns,
            syscall_ns,
        } = *self;
        on_cpu_ns + runqueue_ns + steal_ns + throttled_ns + futex_ns + syscall_ns
    }
}

/// Off-CPU time spent after switching out at one pair of stacks.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackTime {
    /// ID in the `STACKS` map, or [`NO_STACK`].
    pub user_stack: i32,
    pub kernel_stack: i32,
    /// Off-CPU nanoseconds. A slot with `ns == 0` and no stacks is free.
    pub ns: u64,
}

impl StackTime {
    pub const EMPTY: StackTime = StackTime {
        user_stack: NO_STACK,
        kernel_stack: NO_STACK,
        ns: 0,
    };
}

/// Blocked time inside one syscall number.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallTime {
    /// Syscall number, or [`SYSCALL_NONE`] / [`SYSCALL_OTHER`]. A slot with `ns == 0` is free.
    pub nr: i32,
    pub _pad: u32,
    pub ns: u64,
}

/// State of one loop thread, the value of the `THREADS` map keyed by TID.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LoopThread {
    /// Thread group ID, the process ID that users see.
    pub pid: u32,
    /// Thread ID.
    pub tid: u32,
    /// When the current iteration began (the return of the wait), or 0 inside the wait.
    pub iteration_start_ns: u64,
    /// When `breakdown` was last brought up to date.
    pub accounted_until_ns: u64,
    /// Number of iterations started since tracking began.
    pub iteration: u64,
    /// Current syscall number, or [`SYSCALL_NONE`].
    pub syscall_nr: i32,
    /// One of the [`run_state`] values.
    pub run_state: u8,
    /// 1 between the enter and exit of a futex wait syscall.
    pub in_futex: u8,
    /// 1 while the thread is parked idle on a futex instead of its event loop's wait.
    pub parked: u8,
    pub _pad: u8,
    /// Futex word address of the current or last futex syscall.
    pub futex_uaddr: u64,
    /// The run queue's steal clock (`rq->prev_steal_time`) when the current
    /// running or runnable period began.
    pub steal_mark_ns: u64,
    /// Address of the run queue `steal_mark_ns` was read from, 0 if none.
    pub steal_mark_rq: u64,
    pub breakdown: Breakdown,
    pub syscalls: [SyscallTime; SYSCALL_SLOTS],
    /// Blocked time, and the run-queue wait after the wake-up, by the stacks the thread blocked at.
    pub stacks: [StackTime; STACK_SLOTS],
    /// Slot in `stacks` of the current off-CPU period, or `STACK_SLOTS` for none.
    pub off_cpu_slot: u32,
    pub _pad2: u32,
    pub comm: [u8; TASK_COMM_LEN],
}

impl LoopThread {
    /// Returns the state of a thread first seen entering its wait at `now_ns`.
    pub const fn new(pid: u32, tid: u32, now_ns: u64) -> Self {
        Self {
            pid,
            tid,
            iteration_start_ns: 0,
            accounted_until_ns: now_ns,
            iteration: 0,
            syscall_nr: SYSCALL_NONE,
            run_state: run_state::RUNNING,
            in_futex: 0,
            parked: 0,
            _pad: 0,
            futex_uaddr: 0,
            steal_mark_ns: 0,
            steal_mark_rq: 0,
            breakdown: Breakdown {
                on_cpu_ns: 0,
                runqueue_ns: 0,
                steal_ns: 0,
                throttled_ns: 0,
                futex_ns: 0,
                syscall_ns: 0,
            },
            syscalls: [SyscallTime { nr: 0, _pad: 0, ns: 0 }; SYSCALL_SLOTS],
            stacks: [StackTime::EMPTY; STACK_SLOTS],
            off_cpu_slot: STACK_SLOTS as u32,
            _pad2: 0,
            comm: [0; TASK_COMM_LEN],
        }
    }

    /// Returns true between the return of the wait and the next entry.
    pub fn in_iteration(&self) -> bool {
        self.iteration_start_ns != 0
    }

    /// Adds the time since `accounted_until_ns` to the share of the current run state.
    ///
    /// Outside an iteration only the clock moves. A `now_ns` older than the last
    /// update (two CPUs racing on one thread) adds nothing.
    #[inline(always)]
    pub fn accrue(&mut self, now_ns: u64) {
        let elapsed = now_ns.saturating_sub(self.accounted_until_ns);
        if now_ns > self.accounted_until_ns {
            self.accounted_until_ns = now_ns;
        }
        if !self.in_iteration() || elapsed == 0 {
            return;
        }
        if self.run_state != run_state::RUNNING {
            let slot = self.off_cpu_slot as usize;
            if slot < STACK_SLOTS {
                self.stacks[slot].ns += elapsed;
            }
        }
        match self.run_state {
            run_state::RUNNING => self.breakdown.on_cpu_ns += elapsed,
            run_state::RUNNABLE => self.breakdown.runqueue_ns += elapsed,
            run_state::THROTTLED => self.breakdown.throttled_ns += elapsed,
            _ if self.in_futex != 0 => self.breakdown.futex_ns += elapsed,
            _ => {
                self.breakdown.syscall_ns += elapsed;
                self.add_syscall_time(self.syscall_nr, elapsed);
            }
        }
    }

    #[inline(always)]
    fn add_syscall_time(&mut self, nr: i32, elapsed: u64) {
        let mut free = SYSCALL_SLOTS;
        for i in 0..SYSCALL_SLOTS {
            let slot = &mut self.syscalls[i];
            if slot.ns != 0 && slot.nr == nr {
                slot.ns += elapsed;
                return;
            }
            if slot.ns == 0 && free == SYSCALL_SLOTS {
                free = i;
            }
        }
        // The last slot is kept for SYSCALL_OTHER, so a full table still adds up.
        if free < SYSCALL_SLOTS - 1 {
            self.syscalls[free] = SyscallTime { nr, _pad: 0, ns: elapsed };
            return;
        }
        let last = &mut self.syscalls[SYSCALL_SLOTS - 1];
        last.nr = SYSCALL_OTHER;
        last.ns += elapsed;
    }

    /// Picks the stack slot for an off-CPU period that starts now at these stacks.
    /// When every slot is taken by other stacks, the period's time goes to no stack.
    #[inline(always)]
    pub fn begin_off_cpu(&mut self, user_stack: i32, kernel_stack: i32) {
        let mut chosen = STACK_SLOTS;
        for i in 0..STACK_SLOTS {
            let slot = &self.stacks[i];
            let same = slot.user_stack == user_stack && slot.kernel_stack == kernel_stack;
            let free = slot.ns == 0 && slot.user_stack == NO_STACK && slot.kernel_stack == NO_STACK;
            if chosen == STACK_SLOTS && (same || free) {
                chosen = i;
            }
        }
        if chosen < STACK_SLOTS {
            self.stacks[chosen].user_stack = user_stack;
            self.stacks[chosen].kernel_stack = kernel_stack;
        }
        self.off_cpu_slot = chosen as u32;
    }

    /// Moves the steal of the period that ends now out of its share, then
    /// starts a new period at `steal_ns` of run queue `rq`.
    ///
    /// Call after [`LoopThread::accrue`]. Steal is the growth of the run queue's
    /// steal clock since the mark, and counts only if the thread stayed on that
    /// run queue and was running or runnable. It is capped at the share it
    /// comes out of, so the breakdown still adds up to the wall time.
    #[inline(always)]
    pub fn settle_steal(&mut self, rq: u64, steal_ns: u64) {
        if self.in_iteration() && rq != 0 && rq == self.steal_mark_rq {
            let stolen = steal_ns.saturating_sub(self.steal_mark_ns);
            let breakdown = &mut self.breakdown;
            match self.run_state {
                run_state::RUNNING => {
                    let moved = min(stolen, breakdown.on_cpu_ns);
                    breakdown.on_cpu_ns -= moved;
                    breakdown.steal_ns += moved;
                }
                run_state::RUNNABLE => {
                    let moved = min(stolen, breakdown.runqueue_ns);
                    breakdown.runqueue_ns -= moved;
                    breakdown.steal_ns += moved;
                }
                _ => {}
            }
        }
        self.steal_mark_ns = steal_ns;
        self.steal_mark_rq = rq;
    }

    /// Starts a new iteration at `now_ns`: the thread has just returned from its wait.
    #[inline(always)]
    pub fn begin_iteration(&mut self, now_ns: u64) {
        self.iteration_start_ns = now_ns;
        self.accounted_until_ns = now_ns;
        self.iteration += 1;
        self.run_state = run_state::RUNNING;
        self.breakdown = Breakdown::default();
        self.syscalls = [SyscallTime::default(); SYSCALL_SLOTS];
        self.stacks = [StackTime::EMPTY; STACK_SLOTS];
        self.off_cpu_slot = STACK_SLOTS as u32;
    }
}

/// Byte offsets of the tracepoint fields the BPF programs read.
///
/// Userspace fills this from the `format` files under tracefs at start-up,
/// because field offsets may move between kernel versions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TracepointLayout {
    /// `sched:sched_switch` `prev_pid` (pid_t).
    pub switch_prev_pid: u32,
    /// `sched:sched_switch` `prev_state` (long).
    pub switch_prev_state: u32,
    /// `sched:sched_switch` `next_pid` (pid_t).
    pub switch_next_pid: u32,
    /// `sched:sched_wakeup` `pid` (pid_t).
    pub wakeup_pid: u32,
    /// `sched:sched_wakeup` `target_cpu` (int).
    pub wakeup_target_cpu: u32,
    /// `sched:sched_wakeup_new` `pid` (pid_t).
    pub wakeup_new_pid: u32,
    /// `raw_syscalls:sys_enter` `id` (long).
    pub sys_enter_id: u32,
    /// `syscalls:sys_enter_futex` `uaddr` (pointer).
    pub futex_uaddr: u32,
    /// `syscalls:sys_enter_futex_wait` `uaddr` (pointer).
    pub futex_wait_uaddr: u32,
    /// `syscalls:sys_enter_futex` `op` (int).
    pub futex_op: u32,
    /// `syscalls:sys_enter_futex` `val` (u32): the value a wait expects.
    pub futex_val: u32,
    /// `syscalls:sys_enter_futex_wait` `val` (unsigned long).
    pub futex_wait_val: u32,
    /// `syscalls:sys_enter_futex_wake` `uaddr` (pointer).
    pub futex_wake_uaddr: u32,
    /// `syscalls:sys_exit_futex` `ret` (long), the same in every `sys_exit_*`.
    pub sys_exit_ret: u32,
}

/// Byte offsets of kernel struct members, read from vmlinux BTF by the
/// loader. A 0 means the member was not found and the feature that needs
/// it is off.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `task_struct.se.slice`: the task's scheduler slice (EEVDF, 6.6 and later).
    pub task_slice: u32,
    /// `task_struct.se.cfs_rq`: the CFS run queue the task is queued on.
    pub task_cfs_rq: u32,
    /// `cfs_rq.rq`: the CPU's run queue (needs CONFIG_FAIR_GROUP_SCHED).
    pub cfs_rq_rq: u32,
    /// `cfs_rq.throttle_count`: non-zero while this group or a parent is throttled.
    pub cfs_rq_throttle_count: u32,
    /// `rq.prev_steal_time`: steal the scheduler has taken out of this CPU's task clock.
    pub rq_prev_steal_time: u32,
    /// `task_struct.stack`: the base of the task's kernel stack, whose top contains its saved user registers.
    pub task_stack: u32,
}

impl KernelOffsets {
    /// Returns true when every offset that steal accounting needs is known.
    pub fn steal_known(&self) -> bool {
        self.task_cfs_rq != 0 && self.cfs_rq_rq != 0 && self.rq_prev_steal_time != 0
    }
}

#[inline(always)]
fn min(a: u64, b: u64) -> u64 {
    if a < b {
        a
    } else {
        b
    }
}

/// Futex operations, from `include/uapi/linux/futex.h`.
pub mod futex_op {
    /// Mask of the command bits of a `futex(2)` op (without PRIVATE and CLOCK_REALTIME).
    pub const CMD_MASK: u32 = 0x7f;
    pub const WAIT: u32 = 0;
    pub const WAKE: u32 = 1;
    pub const WAKE_OP: u32 = 5;
    pub const LOCK_PI: u32 = 6;
    pub const UNLOCK_PI: u32 = 7;
    pub const WAIT_BITSET: u32 = 9;
    pub const WAKE_BITSET: u32 = 10;
    pub const WAIT_REQUEUE_PI: u32 = 11;
    pub const LOCK_PI2: u32 = 13;
    /// Not a `futex(2)` op (those use the low 9 bits): a wait through the
    /// `futex_wait(2)` syscall (6.7 and later).
    pub const FUTEX2_WAIT: u32 = 0x1000_0000;
    /// Not a `futex(2)` op: a wait through `futex_waitv(2)`, on several futexes.
    pub const FUTEX2_WAITV: u32 = 0x1000_0001;

    /// Returns true for ops that can block the caller until another thread acts.
    pub fn is_wait(op: u32) -> bool {
        if op >= FUTEX2_WAIT {
            return op == FUTEX2_WAIT || op == FUTEX2_WAITV;
        }
        matches!(op & CMD_MASK, WAIT | LOCK_PI | WAIT_BITSET | WAIT_REQUEUE_PI | LOCK_PI2)
    }

    /// Returns true for priority-inheritance ops, whose futex word contains the owner's TID.
    pub fn is_pi(op: u32) -> bool {
        op < FUTEX2_WAIT && matches!(op & CMD_MASK, LOCK_PI | LOCK_PI2 | WAIT_REQUEUE_PI)
    }

    /// Returns true for ops that wake waiters.
    pub fn is_wake(op: u32) -> bool {
        op < FUTEX2_WAIT && matches!(op & CMD_MASK, WAKE | WAKE_OP | UNLOCK_PI | WAKE_BITSET)
    }
}

/// A thread inside a futex wait, the value of the `FUTEX_WAITS` map keyed by TID.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FutexWait {
    pub pid: u32,
    pub tid: u32,
    /// Futex word address in the waiter's address space (0 for `futex_waitv`).
    pub uaddr: u64,
    /// When the wait syscall was entered.
    pub since_ns: u64,
    /// The `futex(2)` op, or a [`futex_op`] marker for the futex2 syscalls.
    pub op: u32,
    /// The value the waiter expected in the futex word.
    pub val: u32,
    /// User stack when the thread blocked, or [`NO_STACK`] until it blocks.
    pub user_stack: i32,
    pub kernel_stack: i32,
    /// 1 once the thread has switched out inside this wait.
    pub blocked: u32,
    pub _pad: u32,
}

/// Key of the `FUTEX_TRAFFIC` map: one futex word of one process.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FutexKey {
    pub pid: u32,
    pub _pad: u32,
    pub uaddr: u64,
}

/// Recent traffic on a futex that someone waited on as a lock: evidence of
/// its holder when the lock keeps no owner field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FutexTraffic {
    /// The last thread that returned from a contended wait on it with success
    /// and has not woken it since; 0 if none.
    pub acquirer: u32,
    /// The last two distinct threads that woke it, newest first; 0 if none.
    pub wakers: [u32; 2],
    pub _pad: u32,
    pub acquired_ns: u64,
    pub woken_ns: u64,
}

/// Key of the `SAMPLES` map: on-CPU samples of one stalled iteration at one pair of stacks.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SampleKey {
    pub tid: u32,
    pub user_stack: i32,
    pub kernel_stack: i32,
    pub _pad: u32,
    pub iteration: u64,
}

/// One ring-buffer record: a snapshot of a loop thread when its stall ended.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StallRecord {
    /// One of the [`record_kind`] values.
    pub kind: u32,
    pub _pad: u32,
    /// When the stall ended (`bpf_ktime_get_ns`, CLOCK_MONOTONIC).
    pub end_ns: u64,
    /// The thread's state, accounted up to `end_ns`.
    pub thread: LoopThread,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all fields are integers or arrays of them and the padding is explicit.
    unsafe impl aya::Pod for super::LoopThread {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::StallRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TracepointLayout {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KernelOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FutexWait {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FutexKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FutexTraffic {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SampleKey {}
}
