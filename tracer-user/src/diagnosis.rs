//! Verdicts: what a stall's time was mostly spent on, and what to do about it.

use serde::{Deserialize, Serialize};
use tracer_common::Breakdown;

/// The largest share of a stall's wall time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The thread ran its own code.
    OnCpu,
    /// Runnable, waiting for a CPU inside the guest.
    Runqueue,
    /// The hypervisor ran something else on the vCPU.
    Steal,
    /// Runnable, but the cgroup had used its CPU quota.
    Throttled,
    /// Blocked in a futex wait.
    Futex,
    /// Blocked in another syscall.
    Syscall,
    /// Waiting in a circle of threads that each hold a lock the next one wants.
    LockCycle,
}

impl Verdict {
    /// Every verdict, in the order shares are listed.
    pub const ALL: [Verdict; 6] = [
        Verdict::OnCpu,
        Verdict::Runqueue,
        Verdict::Steal,
        Verdict::Throttled,
        Verdict::Futex,
        Verdict::Syscall,
    ];

    /// Returns the key used in JSON and in messages.
    pub fn key(self) -> &'static str {
        match self {
            Verdict::OnCpu => "on_cpu",
            Verdict::Runqueue => "runqueue",
            Verdict::Steal => "steal",
            Verdict::Throttled => "throttled",
            Verdict::Futex => "futex",
            Verdict::Syscall => "syscall",
            Verdict::LockCycle => "lock_cycle",
        }
    }

    /// Returns this verdict's share of a breakdown, in nanoseconds.
    pub fn share_ns(self, breakdown: &Breakdown) -> u64 {
        match self {
            Verdict::OnCpu => breakdown.on_cpu_ns,
            Verdict::Runqueue => breakdown.runqueue_ns,
            Verdict::Steal => breakdown.steal_ns,
            Verdict::Throttled => breakdown.throttled_ns,
            Verdict::Futex => breakdown.futex_ns,
            Verdict::Syscall => breakdown.syscall_ns,
            // A cycle is a state of the threads, not a share of time: its time is in `futex`.
            Verdict::LockCycle => 0,
        }
    }

    /// Returns the verdict with the largest share. Ties go to the verdict listed first in [`Verdict::ALL`].
    pub fn of(breakdown: &Breakdown) -> Verdict {
        let mut best = Verdict::OnCpu;
        for verdict in Verdict::ALL {
            if verdict.share_ns(breakdown) > best.share_ns(breakdown) {
                best = verdict;
            }
        }
        best
    }
}

impl Verdict {
    /// Returns who owns this kind of stalled time: the host, the guest's own scheduling, or the application.
    pub fn owner(self) -> Owner {
        match self {
            Verdict::Steal => Owner::Host,
            Verdict::Runqueue | Verdict::Throttled => Owner::Guest,
            Verdict::OnCpu | Verdict::Futex | Verdict::Syscall | Verdict::LockCycle => Owner::Application,
        }
    }

    /// Returns a one-line suggestion for stalls with this verdict.
    pub fn suggestion(self) -> &'static str {
        match self {
            Verdict::OnCpu => {
                "The handler computed for most of the stall: profile that code path or move the work off the loop thread."
            }
            Verdict::Runqueue => {
                "The thread was runnable while other threads in this machine held the CPUs: reduce the machine's own load, or give the loop thread a CPU or a higher priority."
            }
            Verdict::Steal => {
                "The hypervisor ran something else on this vCPU (a noisy neighbour): move or resize the instance, the code is not at fault."
            }
            Verdict::Throttled => {
                "The cgroup used up its CPU quota (cpu.max or cpu.cfs_quota_us): raise the quota or lower the cgroup's load."
            }
            Verdict::Futex => {
                "The loop thread waited for a lock: find the holder and shorten its critical section, or keep blocking locks off the loop thread."
            }
            Verdict::Syscall => {
                "The loop thread blocked in a syscall: make the call non-blocking or move it to a worker thread."
            }
            Verdict::LockCycle => {
                "Threads wait on each other's locks (a deadlock): take the locks in one global order; only a restart frees these threads."
            }
        }
    }
}

/// The party whose fix a stalled share needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Owner {
    /// The hypervisor (steal).
    Host,
    /// The guest's own scheduling: other threads on its CPUs, or its cgroup's quota.
    Guest,
    /// The traced application: its code, its locks, its syscalls.
    Application,
}

/// Returns the shares of a breakdown, largest first, without the empty ones.
pub fn ranked_shares(breakdown: &Breakdown) -> Vec<(Verdict, u64)> {
    let mut shares: Vec<(Verdict, u64)> = Verdict::ALL
        .iter()
        .map(|&verdict| (verdict, verdict.share_ns(breakdown)))
        .filter(|&(_, ns)| ns > 0)
        .collect();
    shares.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    shares
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_is_largest_share() {
        let breakdown = Breakdown {
            on_cpu_ns: 10,
            runqueue_ns: 30,
            futex_ns: 20,
            ..Breakdown::default()
        };
        assert_eq!(Verdict::of(&breakdown), Verdict::Runqueue);
    }

    #[test]
    fn verdict_of_syscall_block() {
        let breakdown = Breakdown {
            on_cpu_ns: 1,
            syscall_ns: 200,
            ..Breakdown::default()
        };
        assert_eq!(Verdict::of(&breakdown), Verdict::Syscall);
    }

    #[test]
    fn verdict_tie_prefers_first() {
        let breakdown = Breakdown {
            on_cpu_ns: 5,
            steal_ns: 5,
            ..Breakdown::default()
        };
        assert_eq!(Verdict::of(&breakdown), Verdict::OnCpu);
    }

    #[test]
    fn ranked_shares_skip_empty() {
        let breakdown = Breakdown {
            on_cpu_ns: 1,
            futex_ns: 9,
            ..Breakdown::default()
        };
        assert_eq!(
            ranked_shares(&breakdown),
            vec![(Verdict::Futex, 9), (Verdict::OnCpu, 1)]
        );
    }

    #[test]
    fn owners_split_host_guest_application() {
        assert_eq!(Verdict::Steal.owner(), Owner::Host);
        assert_eq!(Verdict::Runqueue.owner(), Owner::Guest);
        assert_eq!(Verdict::Throttled.owner(), Owner::Guest);
        assert_eq!(Verdict::OnCpu.owner(), Owner::Application);
        assert_eq!(Verdict::Futex.owner(), Owner::Application);
        assert_eq!(Verdict::Syscall.owner(), Owner::Application);
    }

    #[test]
    fn verdict_keys_match_serde() {
        for verdict in Verdict::ALL.into_iter().chain([Verdict::LockCycle]) {
            let json = serde_json::to_string(&verdict).unwrap();
            assert_eq!(json, format!("\"{}\"", verdict.key()));
        }
    }
}
