//! Lock waits: who waits on which futex, who holds it, and wait-for cycles.
//!
//! The BPF programs keep every thread in scope that sits in a futex wait,
//! with the user stack it blocked at, and recent acquirers and wakers of
//! futexes used as locks. [`LockScanner`] turns that into [`LockWait`]s with
//! a holder, read from the waiter's memory where the lock records its owner.
//! [`find_cycles`] finds circular waits among them.

use std::{
    collections::{HashMap, HashSet},
    fs,
    os::unix::fs::FileExt,
};

use serde::{Deserialize, Serialize};
use tracer_common::{futex_op, FutexTraffic, FutexWait};

use crate::{
    kernel::syscall_name,
    stacks::{FrameRef, Normalizer, Symbolizer},
};

/// The futex word value of glibc's and Rust's mutexes when locked with waiters.
const LOCKED_CONTENDED: u32 = 2;
/// `FUTEX_TID_MASK` in `include/uapi/linux/futex.h`: the owner TID bits of a PI futex word.
const FUTEX_TID_MASK: u32 = 0x3fff_ffff;
/// Offset of `__owner` in glibc's `pthread_mutex_t` (`struct __pthread_mutex_s`,
/// `sysdeps/nptl/bits/struct_mutex.h`, glibc 2.36, x86_64), after `__lock` and `__count`.
const GLIBC_MUTEX_OWNER_OFFSET: u64 = 8;
/// Offset of `__kind` in the same struct; its low bits are the mutex type (0 to 3).
const GLIBC_MUTEX_KIND_OFFSET: u64 = 16;
/// glibc functions that wait on a `pthread_mutex_t`'s futex word, in
/// `nptl/lowlevellock.c` and `nptl/pthread_mutex_lock.c` (glibc 2.36).
const GLIBC_MUTEX_WAIT_FUNCTIONS: &[&str] = &[
    "__lll_lock_wait",
    "pthread_mutex_lock",
    "__pthread_mutex_lock",
    "___pthread_mutex_lock",
    "pthread_mutex_timedlock",
    "__pthread_mutex_clocklock_common",
    "__pthread_mutex_lock_full",
];
/// How many innermost frames are searched for a glibc mutex wait function.
const GLIBC_FRAMES_SEARCHED: usize = 4;
/// Lock waits younger than this are ordinary contention and are not reported.
pub const MIN_LOCK_WAIT_NS: u64 = 50_000_000;
/// Other futex waits (condition variables, idle workers parking) are reported
/// only after this long, so a busy thread pool does not flood the capture.
pub const MIN_OTHER_WAIT_NS: u64 = 1_000_000_000;

/// The kind of evidence behind a holder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HolderSource {
    /// Read from the lock itself: a PI futex word, or glibc's owner field.
    Exact,
    /// Guessed from futex traffic, for locks that keep no owner.
    Inferred,
    /// Neither applies.
    Unknown,
}

/// The activity of a lock holder, which points to the fix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum HolderState {
    /// Waiting in its own event loop: the lock is held across a yield point.
    IdleInLoop,
    /// Blocked in a syscall while holding the lock.
    BlockedInSyscall { syscall: String },
    /// Waiting on another futex (see the wait-for graph).
    WaitingOnFutex,
    /// On a CPU or runnable: a long critical section.
    Running,
    /// The thread is gone: an abandoned lock.
    Exited,
}

/// One thread blocked in a futex wait, with its stack as `F`: normalized
/// [`FrameRef`]s in records, symbolized frames in reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockWait<F = FrameRef> {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    /// The futex's identity across processes: `PID:ADDRESS` for private
    /// memory, `shared:DEVICE:INODE:OFFSET` for a shared mapping.
    pub futex: String,
    /// Futex word address in the waiter's address space.
    pub uaddr: u64,
    /// CLOCK_MONOTONIC time the wait began.
    pub since_ns: u64,
    /// The futex operation, as `FUTEX_WAIT_PRIVATE` or `futex_wait`.
    pub op: String,
    /// True if the wait looks like a lock acquisition (PI, or a contended mutex word).
    pub lock: bool,
    pub holder: Option<u32>,
    pub holder_pid: Option<u32>,
    pub holder_source: HolderSource,
    /// The evidence for the holder, in words.
    pub holder_evidence: Option<String>,
    pub holder_state: Option<HolderState>,
    /// User stack at the wait, innermost first.
    pub stack: Vec<F>,
}

impl LockWait {
    /// Returns the same wait with another representation of its stack.
    pub fn with_stack<G>(&self, stack: Vec<G>) -> LockWait<G> {
        LockWait {
            pid: self.pid,
            tid: self.tid,
            comm: self.comm.clone(),
            futex: self.futex.clone(),
            uaddr: self.uaddr,
            since_ns: self.since_ns,
            op: self.op.clone(),
            lock: self.lock,
            holder: self.holder,
            holder_pid: self.holder_pid,
            holder_source: self.holder_source,
            holder_evidence: self.holder_evidence.clone(),
            holder_state: self.holder_state.clone(),
            stack,
        }
    }
}

/// Returns the name of a futex op for reports.
pub fn op_name(op: u32) -> String {
    match op {
        futex_op::FUTEX2_WAIT => return "futex_wait".to_owned(),
        futex_op::FUTEX2_WAITV => return "futex_waitv".to_owned(),
        _ => {}
    }
    let command = match op & futex_op::CMD_MASK {
        futex_op::WAIT => "FUTEX_WAIT",
        futex_op::LOCK_PI => "FUTEX_LOCK_PI",
        futex_op::WAIT_BITSET => "FUTEX_WAIT_BITSET",
        futex_op::WAIT_REQUEUE_PI => "FUTEX_WAIT_REQUEUE_PI",
        futex_op::LOCK_PI2 => "FUTEX_LOCK_PI2",
        _ => "FUTEX_OP",
    };
    // FUTEX_PRIVATE_FLAG is 128.
    if op & 128 != 0 {
        format!("{command}_PRIVATE")
    } else {
        command.to_owned()
    }
}

/// Reads a `u32` from a process's memory.
fn read_u32(pid: u32, address: u64) -> Option<u32> {
    let file = fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    let mut bytes = [0u8; 4];
    file.read_exact_at(&mut bytes, address).ok()?;
    Some(u32::from_ne_bytes(bytes))
}

/// Returns the process a live thread belongs to.
fn thread_group(tid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Tgid:"))
        .and_then(|value| value.trim().parse().ok())
}

/// Returns a thread's name from `/proc`.
fn thread_comm(pid: u32, tid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
        .map(|comm| comm.trim_end().to_owned())
        .unwrap_or_default()
}

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Mapping {
    start: u64,
    end: u64,
    shared: bool,
    offset: u64,
    device: String,
    inode: u64,
}

fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (start, end) = fields.next()?.split_once('-')?;
            let permissions = fields.next()?;
            let offset = fields.next()?;
            let device = fields.next()?;
            let inode = fields.next()?;
            Some(Mapping {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                shared: permissions.as_bytes().get(3) == Some(&b's'),
                offset: u64::from_str_radix(offset, 16).ok()?,
                device: device.to_owned(),
                inode: inode.parse().ok()?,
            })
        })
        .collect()
}

/// Returns the identity of the futex at `uaddr` of `pid`, the same in every
/// process that maps the same shared memory.
fn futex_identity(maps: &[Mapping], pid: u32, uaddr: u64) -> (String, bool) {
    let shared = maps
        .iter()
        .find(|mapping| mapping.start <= uaddr && uaddr < mapping.end && mapping.shared && mapping.inode != 0);
    match shared {
        Some(mapping) => (
            format!(
                "shared:{}:{}:{:#x}",
                mapping.device,
                mapping.inode,
                mapping.offset + (uaddr - mapping.start)
            ),
            true,
        ),
        None => (format!("{pid}:{uaddr:#x}"), false),
    }
}

/// Returns what a thread is doing, from the loop-thread and futex-wait tables and `/proc`.
fn holder_state(pid: u32, tid: u32, idle_loop_threads: &HashSet<u32>, futex_waiters: &HashSet<u32>) -> HolderState {
    if futex_waiters.contains(&tid) {
        return HolderState::WaitingOnFutex;
    }
    if idle_loop_threads.contains(&tid) {
        return HolderState::IdleInLoop;
    }
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")) else {
        return HolderState::Exited;
    };
    // The state letter follows the parenthesized name, which may itself contain spaces.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
    match state {
        Some('R') | None => HolderState::Running,
        Some('Z') | Some('X') => HolderState::Exited,
        Some(_) => {
            let syscall = fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).unwrap_or_default();
            match syscall.split_whitespace().next().and_then(|nr| nr.parse::<i32>().ok()) {
                Some(nr) => HolderState::BlockedInSyscall { syscall: syscall_name(nr) },
                None => HolderState::Running,
            }
        }
    }
}

/// Turns the kernel's futex wait table into [`LockWait`]s with holders.
pub struct LockScanner {
    normalizer: Normalizer,
    symbolizer: Symbolizer,
    /// Whether a user frame lies in a glibc mutex wait function, by frame.
    glibc_wait_frames: HashMap<FrameRef, bool>,
}

impl Default for LockScanner {
    fn default() -> Self {
        Self::new()
    }
}

/// The BPF maps' view of the threads one scan looks at.
pub struct KernelView<'a> {
    pub waits: &'a [FutexWait],
    /// Loop threads waiting in their event loop.
    pub idle_loop_threads: &'a HashSet<u32>,
    /// Returns the recent traffic of a futex of a process.
    pub traffic: &'a dyn Fn(u32, u64) -> Option<FutexTraffic>,
    /// Returns a stack's addresses by ID.
    pub stack: &'a dyn Fn(i32) -> Vec<u64>,
}

impl LockScanner {
    pub fn new() -> Self {
        Self {
            normalizer: Normalizer::new(),
            symbolizer: Symbolizer::new(),
            glibc_wait_frames: HashMap::new(),
        }
    }

    /// Builds the futex waits of one scan at `now_ns`: lock waits that have
    /// lasted [`MIN_LOCK_WAIT_NS`] and other waits that have lasted
    /// [`MIN_OTHER_WAIT_NS`]. The BPF side keeps other waits only when tracing
    /// selected processes, because they are far more frequent than lock waits.
    pub fn scan(&mut self, view: &KernelView<'_>, now_ns: u64) -> Vec<LockWait> {
        let waiters: HashSet<u32> = view.waits.iter().map(|wait| wait.tid).collect();
        let mut maps_by_pid: HashMap<u32, Vec<Mapping>> = HashMap::new();
        let mut found = Vec::new();
        for wait in view.waits {
            // A wait that has not switched out yet returned at once or is about to block.
            if wait.blocked == 0 {
                continue;
            }
            let lock = wait.uaddr != 0 && (futex_op::is_pi(wait.op) || wait.val == LOCKED_CONTENDED);
            let minimum = if lock { MIN_LOCK_WAIT_NS } else { MIN_OTHER_WAIT_NS };
            if now_ns.saturating_sub(wait.since_ns) < minimum {
                continue;
            }
            let maps = maps_by_pid.entry(wait.pid).or_insert_with(|| {
                fs::read_to_string(format!("/proc/{}/maps", wait.pid))
                    .map(|text| parse_maps(&text))
                    .unwrap_or_default()
            });
            let (futex, shared) = futex_identity(maps, wait.pid, wait.uaddr);
            let addresses = (view.stack)(wait.user_stack);
            let stack = self.normalizer.normalize_user(wait.pid, &addresses);
            let mut lock_wait = LockWait {
                pid: wait.pid,
                tid: wait.tid,
                comm: thread_comm(wait.pid, wait.tid),
                futex,
                uaddr: wait.uaddr,
                since_ns: wait.since_ns,
                op: op_name(wait.op),
                lock,
                holder: None,
                holder_pid: None,
                holder_source: HolderSource::Unknown,
                holder_evidence: None,
                holder_state: None,
                stack,
            };
            if lock {
                self.find_holder(&mut lock_wait, wait, shared, view);
            }
            if let (Some(holder), Some(holder_pid)) = (lock_wait.holder, lock_wait.holder_pid) {
                lock_wait.holder_state = Some(holder_state(holder_pid, holder, view.idle_loop_threads, &waiters));
            }
            found.push(lock_wait);
        }
        found
    }

    fn find_holder(&mut self, lock_wait: &mut LockWait, wait: &FutexWait, shared: bool, view: &KernelView<'_>) {
        // A live thread, of the waiter's process unless the futex is in shared memory.
        let valid_owner = |owner: u32| -> Option<u32> {
            if owner == 0 || owner == wait.tid {
                return None;
            }
            let group = thread_group(owner)?;
            (group == wait.pid || shared).then_some(group)
        };
        let mut set = |holder: u32, pid: u32, source: HolderSource, evidence: &str| {
            lock_wait.holder = Some(holder);
            lock_wait.holder_pid = Some(pid);
            lock_wait.holder_source = source;
            lock_wait.holder_evidence = Some(evidence.to_owned());
        };

        if futex_op::is_pi(wait.op) {
            let owner = read_u32(wait.pid, wait.uaddr).map(|word| word & FUTEX_TID_MASK);
            if let Some((owner, pid)) = owner.and_then(|owner| Some((owner, valid_owner(owner)?))) {
                set(owner, pid, HolderSource::Exact, "owner TID in the PI futex word");
            }
            return;
        }

        if self.waits_in_glibc_mutex(&lock_wait.stack) {
            let kind = read_u32(wait.pid, wait.uaddr + GLIBC_MUTEX_KIND_OFFSET).map(|kind| kind & 0x7f);
            let owner = read_u32(wait.pid, wait.uaddr + GLIBC_MUTEX_OWNER_OFFSET);
            if let (Some(0..=3), Some(owner)) = (kind, owner) {
                if let Some(pid) = valid_owner(owner) {
                    set(owner, pid, HolderSource::Exact, "owner field of glibc's pthread_mutex_t");
                    return;
                }
            }
        }

        // NOTE: inference uses only contended acquisitions and wakes. A lock taken
        // without contention since its last wake leaves no trace, and a wrong guess is possible.
        let Some(traffic) = (view.traffic)(wait.pid, wait.uaddr) else {
            return;
        };
        if let Some(pid) = valid_owner(traffic.acquirer) {
            set(
                traffic.acquirer,
                pid,
                HolderSource::Inferred,
                "last thread to get it after a contended wait, and it has not woken it since",
            );
            return;
        }
        let waiters_here: HashSet<u32> = view
            .waits
            .iter()
            .filter(|other| other.pid == wait.pid && other.uaddr == wait.uaddr)
            .map(|other| other.tid)
            .collect();
        for waker in traffic.wakers {
            if waiters_here.contains(&waker) {
                continue;
            }
            if let Some(pid) = valid_owner(waker) {
                set(waker, pid, HolderSource::Inferred, "recent waker that is not waiting on it");
                return;
            }
        }
    }

    /// Returns true if one of the innermost frames is a glibc mutex wait function.
    fn waits_in_glibc_mutex(&mut self, stack: &[FrameRef]) -> bool {
        for frame in stack.iter().take(GLIBC_FRAMES_SEARCHED) {
            let known = self.glibc_wait_frames.get(frame).copied();
            let in_glibc_wait = match known {
                Some(value) => value,
                None => {
                    let names = self.symbolizer.symbolize(std::slice::from_ref(frame));
                    let value = names.iter().any(|symbol| {
                        let name = symbol.name.trim_start_matches("__GI_");
                        GLIBC_MUTEX_WAIT_FUNCTIONS.contains(&name)
                    });
                    self.glibc_wait_frames.insert(frame.clone(), value);
                    value
                }
            };
            if in_glibc_wait {
                return true;
            }
        }
        false
    }
}

/// Returns every circular wait among lock waits, each as indexes into `waits`
/// in wait order: `waits[c[0]]` waits on a lock held by the thread of `waits[c[1]]`, and so on.
pub fn find_cycles(waits: &[LockWait]) -> Vec<Vec<usize>> {
    let by_tid: HashMap<u32, usize> = waits
        .iter()
        .enumerate()
        .filter(|(_, wait)| wait.lock && wait.holder.is_some())
        .map(|(index, wait)| (wait.tid, index))
        .collect();
    let next = |index: usize| waits[index].holder.and_then(|holder| by_tid.get(&holder).copied());

    // Each thread waits on one futex, so the graph has at most one edge out of
    // each node and every walk either ends or enters exactly one cycle.
    let mut state = vec![0u8; waits.len()];
    let mut cycles = Vec::new();
    for start in 0..waits.len() {
        if state[start] != 0 || !by_tid.values().any(|&index| index == start) {
            continue;
        }
        let mut path = Vec::new();
        let mut current = Some(start);
        while let Some(index) = current {
            match state[index] {
                0 => {
                    state[index] = 1;
                    path.push(index);
                    current = next(index);
                }
                1 => {
                    let position = path.iter().position(|&on_path| on_path == index).expect("on the path");
                    cycles.push(path[position..].to_vec());
                    break;
                }
                _ => break,
            }
        }
        for index in path {
            state[index] = 2;
        }
    }
    cycles
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait(tid: u32, futex: &str, holder: Option<u32>) -> LockWait {
        LockWait {
            pid: 1,
            tid,
            comm: format!("t{tid}"),
            futex: futex.to_owned(),
            uaddr: 0x1000,
            since_ns: 1,
            op: "FUTEX_WAIT_PRIVATE".to_owned(),
            lock: true,
            holder,
            holder_pid: holder.map(|_| 1),
            holder_source: HolderSource::Exact,
            holder_evidence: None,
            holder_state: None,
            stack: Vec::new(),
        }
    }

    #[test]
    fn two_thread_cycle_found() {
        let waits = vec![wait(10, "a", Some(11)), wait(11, "b", Some(10))];
        assert_eq!(find_cycles(&waits), vec![vec![0, 1]]);
    }

    #[test]
    fn three_thread_cycle_found() {
        let waits = vec![
            wait(10, "a", Some(11)),
            wait(12, "c", Some(10)),
            wait(11, "b", Some(12)),
        ];
        assert_eq!(find_cycles(&waits), vec![vec![0, 2, 1]]);
    }

    #[test]
    fn chain_without_cycle_ignored() {
        let waits = vec![wait(10, "a", Some(11)), wait(11, "b", Some(12)), wait(13, "c", None)];
        assert!(find_cycles(&waits).is_empty());
    }

    #[test]
    fn tail_into_cycle_reports_cycle_only() {
        let waits = vec![
            wait(20, "x", Some(10)),
            wait(10, "a", Some(11)),
            wait(11, "b", Some(10)),
        ];
        assert_eq!(find_cycles(&waits), vec![vec![1, 2]]);
    }

    #[test]
    fn non_lock_waits_make_no_edges() {
        let mut condvar = wait(11, "b", Some(10));
        condvar.lock = false;
        let waits = vec![wait(10, "a", Some(11)), condvar];
        assert!(find_cycles(&waits).is_empty());
    }

    #[test]
    fn shared_mapping_identity_ignores_address() {
        let maps = parse_maps(
            "7f0000000000-7f0000001000 rw-s 00002000 00:1a 4242 /dev/shm/locks
7f0000100000-7f0000200000 rw-p 00000000 00:00 0 ",
        );
        let (first, shared) = futex_identity(&maps, 5, 0x7f00_0000_0040);
        assert!(shared);
        assert_eq!(first, "shared:00:1a:4242:0x2040");
        let (private, shared) = futex_identity(&maps, 5, 0x7f00_0010_0040);
        assert!(!shared);
        assert_eq!(private, "5:0x7f0000100040");
    }

    #[test]
    fn op_names_readable() {
        assert_eq!(op_name(128), "FUTEX_WAIT_PRIVATE");
        assert_eq!(op_name(futex_op::LOCK_PI), "FUTEX_LOCK_PI");
        assert_eq!(op_name(futex_op::FUTEX2_WAIT), "futex_wait");
        assert_eq!(op_name(9 | 128 | 256), "FUTEX_WAIT_BITSET_PRIVATE");
    }

    #[test]
    fn own_process_memory_read() {
        let word: u32 = 0xdead_beef;
        let value = read_u32(std::process::id(), &word as *const u32 as u64);
        assert_eq!(value, Some(0xdead_beef));
    }
}
