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
    fn verdict_keys_match_serde() {
        for verdict in Verdict::ALL {
            let json = serde_json::to_string(&verdict).unwrap();
            assert_eq!(json, format!("\"{}\"", verdict.key()));
        }
    }
}
