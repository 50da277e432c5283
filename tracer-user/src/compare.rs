//! Comparison of two reports: stalled time per verdict and per culprit, before and after.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use crate::{duration::Nanos, flame::Culprit, report::Report};

/// The change between two reports.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Comparison {
    pub threshold_ns_before: u64,
    pub threshold_ns_after: u64,
    /// Time covered by each report.
    pub duration_ns_before: u64,
    pub duration_ns_after: u64,
    /// Records lost in each run. Non-zero means that run may miss stalls.
    pub drops_before: u64,
    pub drops_after: u64,
    /// One row per verdict with stalls in either report, largest absolute change first.
    pub verdicts: Vec<VerdictChange>,
    /// One row per (verdict, frame) culprit in either list, largest absolute change first.
    pub culprits: Vec<CulpritChange>,
}

/// Stalls and stalled time of one verdict, before and after.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerdictChange {
    pub verdict: String,
    pub stalls_before: u64,
    pub stalls_after: u64,
    /// Summed `duration_ns` of the verdict's stalls.
    pub stalled_ns_before: u64,
    pub stalled_ns_after: u64,
    /// `stalled_ns_after - stalled_ns_before`, saturated to the range of `i64`.
    pub delta_ns: i64,
}

/// Stalled time owned by one culprit frame, before and after.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CulpritChange {
    pub frame: String,
    pub verdict: String,
    pub stalled_ns_before: u64,
    pub stalled_ns_after: u64,
    /// `stalled_ns_after - stalled_ns_before`, saturated to the range of `i64`.
    pub delta_ns: i64,
}

/// Compares two reports and their culprit lists (from [`crate::flame::culprits`]).
///
/// Verdict rows come from `report.stalls`: the count and the summed
/// `duration_ns` of the stalls with that verdict. A culprit missing from one
/// list counts as 0 ns there. Culprit lists are cut at a top count, so a
/// frame below the cut in one report shows as 0 ns, not as its real time.
pub fn compare(
    before: &Report,
    before_culprits: &[Culprit],
    after: &Report,
    after_culprits: &[Culprit],
) -> Comparison {
    let mut verdicts: BTreeMap<String, VerdictChange> = BTreeMap::new();
    for (report, is_before) in [(before, true), (after, false)] {
        for stall in &report.stalls {
            let key = stall.verdict.key();
            let row = verdicts
                .entry(key.to_owned())
                .or_insert_with(|| VerdictChange {
                    verdict: key.to_owned(),
                    stalls_before: 0,
                    stalls_after: 0,
                    stalled_ns_before: 0,
                    stalled_ns_after: 0,
                    delta_ns: 0,
                });
            if is_before {
                row.stalls_before += 1;
                row.stalled_ns_before += stall.duration_ns;
            } else {
                row.stalls_after += 1;
                row.stalled_ns_after += stall.duration_ns;
            }
        }
    }
    let mut verdicts: Vec<VerdictChange> = verdicts.into_values().collect();
    for row in &mut verdicts {
        row.delta_ns = delta(row.stalled_ns_before, row.stalled_ns_after);
    }
    verdicts.sort_by(|a, b| {
        b.delta_ns
            .unsigned_abs()
            .cmp(&a.delta_ns.unsigned_abs())
            .then_with(|| a.verdict.cmp(&b.verdict))
    });

    let mut culprits: BTreeMap<(String, String), CulpritChange> = BTreeMap::new();
    for (list, is_before) in [(before_culprits, true), (after_culprits, false)] {
        for culprit in list {
            let key = (culprit.verdict.clone(), culprit.frame.clone());
            let row = culprits.entry(key).or_insert_with(|| CulpritChange {
                frame: culprit.frame.clone(),
                verdict: culprit.verdict.clone(),
                stalled_ns_before: 0,
                stalled_ns_after: 0,
                delta_ns: 0,
            });
            if is_before {
                row.stalled_ns_before += culprit.stalled_ns;
            } else {
                row.stalled_ns_after += culprit.stalled_ns;
            }
        }
    }
    let mut culprits: Vec<CulpritChange> = culprits.into_values().collect();
    for row in &mut culprits {
        row.delta_ns = delta(row.stalled_ns_before, row.stalled_ns_after);
    }
    culprits.sort_by(|a, b| {
        b.delta_ns
            .unsigned_abs()
            .cmp(&a.delta_ns.unsigned_abs())
            .then_with(|| a.verdict.cmp(&b.verdict))
            .then_with(|| a.frame.cmp(&b.frame))
    });

    Comparison {
        threshold_ns_before: before.threshold_ns,
        threshold_ns_after: after.threshold_ns,
        duration_ns_before: before.duration_ns,
        duration_ns_after: after.duration_ns,
        drops_before: before.drops,
        drops_after: after.drops,
        verdicts,
        culprits,
    }
}

/// Returns `after - before`, saturated to the range of `i64`.
fn delta(before: u64, after: u64) -> i64 {
    let delta = i128::from(after) - i128::from(before);
    i64::try_from(delta).unwrap_or(if delta < 0 { i64::MIN } else { i64::MAX })
}

impl Comparison {
    /// Renders the comparison as aligned text, one line per verdict and per
    /// culprit, largest absolute change first, as in
    /// `on_cpu: 1 stall, 201ms -> 0 stalls, 0ns (-201ms)`.
    pub fn render_text(&self) -> String {
        let mut text = String::new();
        let _ = writeln!(
            text,
            "before -> after: threshold {} -> {}, traced {} -> {}",
            Nanos(self.threshold_ns_before),
            Nanos(self.threshold_ns_after),
            Nanos(self.duration_ns_before),
            Nanos(self.duration_ns_after),
        );
        for (side, drops) in [("before", self.drops_before), ("after", self.drops_after)] {
            if drops > 0 {
                let _ = writeln!(
                    text,
                    "warning: {side}: {drops} records dropped, so stalls may be missing"
                );
            }
        }

        text.push_str("\nverdicts:\n");
        if self.verdicts.is_empty() {
            text.push_str("  no stalls in either report\n");
        }
        let rows: Vec<Vec<String>> = self
            .verdicts
            .iter()
            .map(|row| {
                vec![
                    format!("{}:", row.verdict),
                    format!("{},", stall_count(row.stalls_before)),
                    Nanos(row.stalled_ns_before).to_string(),
                    "->".to_owned(),
                    format!("{},", stall_count(row.stalls_after)),
                    Nanos(row.stalled_ns_after).to_string(),
                    delta_text(row.delta_ns),
                ]
            })
            .collect();
        write_aligned(&mut text, &rows);

        if !self.culprits.is_empty() {
            text.push_str("\nculprits:\n");
            let rows: Vec<Vec<String>> = self
                .culprits
                .iter()
                .map(|row| {
                    vec![
                        format!("{}:", row.frame),
                        format!("({})", row.verdict),
                        Nanos(row.stalled_ns_before).to_string(),
                        "->".to_owned(),
                        Nanos(row.stalled_ns_after).to_string(),
                        delta_text(row.delta_ns),
                    ]
                })
                .collect();
            write_aligned(&mut text, &rows);
        }
        text
    }
}

/// Writes rows of cells indented by two spaces, each cell padded to its column's maximum width.
fn write_aligned(text: &mut String, rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        widths.resize(widths.len().max(row.len()), 0);
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in rows {
        let mut line = String::from(" ");
        for (width, cell) in widths.iter().zip(row) {
            let _ = write!(line, " {cell:<width$}");
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
}

fn stall_count(count: u64) -> String {
    if count == 1 {
        "1 stall".to_owned()
    } else {
        format!("{count} stalls")
    }
}

/// Formats a signed change as `(+1.20ms)`, `(-201ms)` or `(no change)`.
fn delta_text(delta_ns: i64) -> String {
    let magnitude = Nanos(delta_ns.unsigned_abs());
    match delta_ns.signum() {
        1 => format!("(+{magnitude})"),
        -1 => format!("(-{magnitude})"),
        _ => "(no change)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::{
        diagnosis::Verdict,
        report::{HostReport, Summary, REPORT_VERSION},
    };

    // Reports are built from JSON with only the keys of docs/report.md, so
    // keys added later with `#[serde(default)]` need no change here.
    fn stall(verdict: Verdict, duration_ns: u64) -> Value {
        json!({
            "pid": 100,
            "tid": 101,
            "comm": "server",
            "start_ns": 1_000,
            "duration_ns": duration_ns,
            "ongoing": false,
            "ended_by": "wait",
            "verdict": verdict,
            "breakdown_ns": {
                "on_cpu": duration_ns,
                "runqueue": 0,
                "steal": 0,
                "throttled": 0,
                "futex": 0,
                "syscall": 0,
            },
            "syscalls": {},
        })
    }

    fn report(stalls: Vec<Value>) -> Report {
        let report = json!({
            "version": REPORT_VERSION,
            "threshold_ns": 1_400_000,
            "duration_ns": 10_000_000_000u64,
            "drops": 0,
            "untracked_threads": 0,
            "host": HostReport::default(),
            "summary": Summary::default(),
            "stalls": stalls,
        });
        serde_json::from_value(report).expect("test report does not match the Report schema")
    }

    fn culprit(verdict: &str, frame: &str, stalled_ns: u64) -> Culprit {
        Culprit {
            verdict: verdict.to_owned(),
            frame: frame.to_owned(),
            stalled_ns,
            stalls: 1,
            share: 1.0,
        }
    }

    /// Collapses runs of spaces, so aligned lines compare as plain text.
    fn collapse_spaces(line: &str) -> String {
        line.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    fn collapsed_lines(text: &str) -> Vec<String> {
        text.lines().map(collapse_spaces).collect()
    }

    #[test]
    fn fixed_stall_goes_to_zero() {
        let before = report(vec![
            stall(Verdict::OnCpu, 201_000_000),
            stall(Verdict::Syscall, 5_000_000),
        ]);
        let after = report(vec![stall(Verdict::Syscall, 5_000_000)]);
        let before_culprits = vec![
            culprit("on_cpu", "app::parse_request", 201_000_000),
            culprit("syscall", "app::flush", 5_000_000),
        ];
        let after_culprits = vec![culprit("syscall", "app::flush", 5_000_000)];

        let comparison = compare(&before, &before_culprits, &after, &after_culprits);

        assert_eq!(
            comparison.verdicts[0],
            VerdictChange {
                verdict: "on_cpu".to_owned(),
                stalls_before: 1,
                stalls_after: 0,
                stalled_ns_before: 201_000_000,
                stalled_ns_after: 0,
                delta_ns: -201_000_000,
            }
        );
        assert_eq!(comparison.verdicts[1].verdict, "syscall");
        assert_eq!(comparison.verdicts[1].delta_ns, 0);
        assert_eq!(
            comparison.culprits[0],
            CulpritChange {
                frame: "app::parse_request".to_owned(),
                verdict: "on_cpu".to_owned(),
                stalled_ns_before: 201_000_000,
                stalled_ns_after: 0,
                delta_ns: -201_000_000,
            }
        );

        let lines = collapsed_lines(&comparison.render_text());
        assert!(
            lines.contains(&"on_cpu: 1 stall, 201ms -> 0 stalls, 0ns (-201ms)".to_owned()),
            "{lines:#?}"
        );
        assert!(
            lines.contains(&"syscall: 1 stall, 5.00ms -> 1 stall, 5.00ms (no change)".to_owned()),
            "{lines:#?}"
        );
        assert!(
            lines.contains(&"app::parse_request: (on_cpu) 201ms -> 0ns (-201ms)".to_owned()),
            "{lines:#?}"
        );
        let on_cpu = lines
            .iter()
            .position(|line| line.starts_with("on_cpu:"))
            .unwrap();
        let syscall = lines
            .iter()
            .position(|line| line.starts_with("syscall:"))
            .unwrap();
        assert!(on_cpu < syscall, "{lines:#?}");
    }

    #[test]
    fn new_stall_shows_increase() {
        let before = report(Vec::new());
        let after = report(vec![
            stall(Verdict::Futex, 3_000_000),
            stall(Verdict::Futex, 2_000_000),
        ]);

        let comparison = compare(
            &before,
            &[],
            &after,
            &[culprit("futex", "app::lock", 5_000_000)],
        );

        let lines = collapsed_lines(&comparison.render_text());
        assert!(
            lines.contains(&"futex: 0 stalls, 0ns -> 2 stalls, 5.00ms (+5.00ms)".to_owned()),
            "{lines:#?}"
        );
        assert!(
            lines.contains(&"app::lock: (futex) 0ns -> 5.00ms (+5.00ms)".to_owned()),
            "{lines:#?}"
        );
    }

    #[test]
    fn identical_reports_show_no_change() {
        let stalls = report(vec![
            stall(Verdict::OnCpu, 201_000_000),
            stall(Verdict::Futex, 9_000_000),
        ]);
        let culprits = vec![
            culprit("on_cpu", "app::parse_request", 201_000_000),
            culprit("futex", "app::lock", 9_000_000),
        ];

        let comparison = compare(&stalls, &culprits, &stalls, &culprits);

        assert_eq!(comparison.verdicts.len(), 2);
        assert_eq!(comparison.culprits.len(), 2);
        assert!(
            comparison.verdicts.iter().all(|row| row.delta_ns == 0),
            "{comparison:?}"
        );
        assert!(
            comparison.culprits.iter().all(|row| row.delta_ns == 0),
            "{comparison:?}"
        );
        let text = comparison.render_text();
        let rows: Vec<&str> = text.lines().filter(|line| line.starts_with("  ")).collect();
        assert_eq!(rows.len(), 4, "{text}");
        for row in rows {
            assert!(row.ends_with("(no change)"), "{text}");
        }
    }

    #[test]
    fn aligned_columns_line_up() {
        let before = report(vec![
            stall(Verdict::OnCpu, 201_000_000),
            stall(Verdict::Runqueue, 2_000_000),
        ]);
        let after = report(vec![
            stall(Verdict::Runqueue, 12_000_000),
            stall(Verdict::Runqueue, 3_000_000),
        ]);

        let text = compare(&before, &[], &after, &[]).render_text();

        let rows: Vec<&str> = text.lines().filter(|line| line.starts_with("  ")).collect();
        assert_eq!(rows.len(), 2, "{text}");
        let arrows: Vec<Option<usize>> = rows.iter().map(|row| row.find("->")).collect();
        assert!(arrows[0].is_some(), "{text}");
        assert_eq!(arrows[0], arrows[1], "{text}");
    }

    #[test]
    fn dropped_records_warn() {
        let before = report(Vec::new());
        let mut after = report(Vec::new());
        after.drops = 3;

        let text = compare(&before, &[], &after, &[]).render_text();

        assert!(text.contains("warning: after: 3 records dropped"), "{text}");
        assert!(!text.contains("warning: before"), "{text}");
        assert!(text.contains("no stalls in either report"), "{text}");
    }

    #[test]
    fn comparison_serializes_rows() {
        let before = report(vec![stall(Verdict::OnCpu, 201_000_000)]);

        let json = serde_json::to_value(compare(&before, &[], &report(Vec::new()), &[])).unwrap();

        assert_eq!(json["verdicts"][0]["verdict"], "on_cpu");
        assert_eq!(json["verdicts"][0]["delta_ns"], -201_000_000);
    }
}
