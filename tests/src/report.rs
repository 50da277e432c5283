//! The `report.json` that `stalltrace record` and `stalltrace analyze` write.

use std::{collections::BTreeMap, fmt, path::Path};

use serde::Deserialize;

/// Parsed `report.json`. `Display` prints the whole file as pretty JSON, for assert messages.
#[derive(Debug, Clone, Deserialize)]
pub struct Report {
    pub version: u32,
    pub threshold_ns: u64,
    pub duration_ns: u64,
    pub drops: u64,
    pub untracked_threads: u64,
    /// Set by `analyze` when the capture ended in a partial record. `record` may omit it.
    #[serde(default)]
    pub capture_truncated: bool,
    pub stalls: Vec<Stall>,
    #[serde(skip)]
    raw: serde_json::Value,
}

/// One loop iteration that ran past the threshold.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Stall {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    /// CLOCK_MONOTONIC nanoseconds at which the iteration started.
    pub start_ns: u64,
    pub duration_ns: u64,
    pub ongoing: bool,
    /// `"wait"` when the loop came back to its wait call, `"exit"` when the thread exited,
    /// `"lost"` when the end record was dropped, `None` while the stall is ongoing.
    pub ended_by: Option<String>,
    /// Name of the largest field of `breakdown_ns`.
    pub verdict: String,
    pub breakdown_ns: Breakdown,
    /// Nanoseconds spent in each syscall during the stall, by syscall name.
    pub syscalls: BTreeMap<String, u64>,
}

/// Where a stall's time went, in nanoseconds. The fields add up to the stall's duration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Breakdown {
    pub on_cpu: u64,
    pub runqueue: u64,
    pub steal: u64,
    pub throttled: u64,
    pub futex: u64,
    pub syscall: u64,
}

impl Report {
    /// Reads and parses a report file.
    ///
    /// # Panics
    ///
    /// Panics when the file is missing or does not match the report format.
    pub fn load(path: &Path) -> Self {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|error| panic!("failed to read {}: {error}", path.display()));
        Self::parse(&text).unwrap_or_else(|error| {
            panic!(
                "{} does not match the report format: {error}\n{text}",
                path.display()
            )
        })
    }

    pub fn parse(text: &str) -> Result<Self, serde_json::Error> {
        let raw: serde_json::Value = serde_json::from_str(text)?;
        let mut report = Self::deserialize(&raw)?;
        report.raw = raw;
        Ok(report)
    }

    /// Returns the stalls of thread `tid` in process `pid`.
    pub fn stalls_of_thread(&self, pid: u32, tid: u32) -> Vec<&Stall> {
        self.stalls
            .iter()
            .filter(|stall| stall.pid == pid && stall.tid == tid)
            .collect()
    }

    /// Returns the stalls of any thread of process `pid`.
    pub fn stalls_of_process(&self, pid: u32) -> Vec<&Stall> {
        self.stalls
            .iter()
            .filter(|stall| stall.pid == pid)
            .collect()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match serde_json::to_string_pretty(&self.raw) {
            Ok(text) => formatter.write_str(&text),
            Err(_) => write!(formatter, "{self:?}"),
        }
    }
}

impl Stall {
    pub fn end_ns(&self) -> u64 {
        self.start_ns + self.duration_ns
    }

    /// Returns `part` as a fraction of the stall's duration, 0.0 for an empty stall.
    pub fn share(&self, part: u64) -> f64 {
        if self.duration_ns == 0 {
            0.0
        } else {
            part as f64 / self.duration_ns as f64
        }
    }
}

impl Breakdown {
    /// Returns the fields as (name, nanoseconds) pairs, named as in the JSON.
    pub fn fields(&self) -> [(&'static str, u64); 6] {
        [
            ("on_cpu", self.on_cpu),
            ("runqueue", self.runqueue),
            ("steal", self.steal),
            ("throttled", self.throttled),
            ("futex", self.futex),
            ("syscall", self.syscall),
        ]
    }

    pub fn total(&self) -> u64 {
        self.fields().iter().map(|(_, nanos)| nanos).sum()
    }

    /// Returns the name of the largest field. Ties go to the field listed first.
    pub fn largest(&self) -> &'static str {
        let mut largest = ("on_cpu", self.on_cpu);
        for field in self.fields() {
            if field.1 > largest.1 {
                largest = field;
            }
        }
        largest.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{
      "version": 1,
      "threshold_ns": 1500000,
      "duration_ns": 3000000000,
      "drops": 0,
      "untracked_threads": 0,
      "stalls": [
        {
          "pid": 1234, "tid": 1234, "comm": "loop-workload",
          "start_ns": 123, "duration_ns": 200100000,
          "ongoing": false, "ended_by": "wait",
          "verdict": "syscall",
          "breakdown_ns": {"on_cpu": 1100000, "runqueue": 0, "steal": 0, "throttled": 0, "futex": 0, "syscall": 199000000},
          "syscalls": {"clock_nanosleep": 199000000}
        },
        {
          "pid": 1234, "tid": 1235, "comm": "loop-workload",
          "start_ns": 500, "duration_ns": 60000000,
          "ongoing": true, "ended_by": null,
          "verdict": "on_cpu",
          "breakdown_ns": {"on_cpu": 60000000, "runqueue": 0, "steal": 0, "throttled": 0, "futex": 0, "syscall": 0},
          "syscalls": {}
        }
      ]
    }"#;

    #[test]
    fn report_parses_sample() {
        let report = Report::parse(SAMPLE).unwrap();
        assert_eq!(report.threshold_ns, 1_500_000);
        assert_eq!(report.stalls.len(), 2);

        let sleep = &report.stalls[0];
        assert_eq!(sleep.ended_by.as_deref(), Some("wait"));
        assert_eq!(sleep.syscalls.get("clock_nanosleep"), Some(&199_000_000));
        assert_eq!(sleep.breakdown_ns.total(), sleep.duration_ns);
        assert_eq!(sleep.breakdown_ns.largest(), "syscall");
        assert_eq!(sleep.end_ns(), 123 + 200_100_000);

        let ongoing = &report.stalls[1];
        assert_eq!(ongoing.ended_by, None);
        assert!(ongoing.ongoing);
    }

    #[test]
    fn report_filters_stalls_by_thread() {
        let report = Report::parse(SAMPLE).unwrap();
        assert_eq!(report.stalls_of_thread(1234, 1235).len(), 1);
        assert_eq!(report.stalls_of_thread(1235, 1235).len(), 0);
        assert_eq!(report.stalls_of_process(1234).len(), 2);
    }

    #[test]
    fn report_rejects_missing_breakdown() {
        let text = SAMPLE.replace(r#""breakdown_ns""#, r#""breakdown""#);
        assert!(Report::parse(&text).is_err());
    }

    #[test]
    fn report_display_shows_json() {
        let report = Report::parse(SAMPLE).unwrap();
        assert!(report
            .to_string()
            .contains("\"clock_nanosleep\": 199000000"));
    }
}
