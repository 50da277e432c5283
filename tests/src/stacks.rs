//! The stack parts of stalltrace's outputs, for the stack scenarios: each stall's `stack`
//! and the `culprits` of `report.json`, the lines of `stalls.folded`, and the output of
//! `stalltrace compare`. [`crate::Report`] leaves these out.

use std::{fmt, fs, path::Path};

use serde::Deserialize;

/// Keys that a stall's `verdict` can take, and so the root frames of `stalls.folded`.
pub const VERDICT_KEYS: [&str; 7] = [
    "on_cpu",
    "runqueue",
    "steal",
    "throttled",
    "futex",
    "syscall",
    "lock_cycle",
];

/// Module name of kernel frames in a stall's `stack`.
pub const KERNEL_MODULE: &str = "kernel";

/// The stalls and culprits of a `report.json`. `Display` prints the whole file as pretty
/// JSON, for assert messages.
#[derive(Debug, Clone, Deserialize)]
pub struct StackReport {
    pub stalls: Vec<StackStall>,
    pub culprits: Vec<Culprit>,
    #[serde(skip)]
    raw: serde_json::Value,
}

/// A stall with the stack that owns most of its time.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StackStall {
    pub pid: u32,
    pub tid: u32,
    /// CLOCK_MONOTONIC nanoseconds at which the iteration started.
    pub start_ns: u64,
    pub duration_ns: u64,
    pub verdict: String,
    /// Kernel frames, then user frames, innermost first.
    pub stack: Vec<Frame>,
    pub stack_truncated: bool,
}

/// One symbolized frame of a stack.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Frame {
    pub name: String,
    /// `kernel`, the file name of a binary, or an address in hex.
    pub module: String,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub inlined: bool,
}

/// A frame that owns a share of one verdict's stalled time.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Culprit {
    pub verdict: String,
    pub frame: String,
    pub stalled_ns: u64,
    pub stalls: u32,
    /// `stalled_ns` over the verdict's stalled time that a stack covers, from 0 to 1.
    pub share: f64,
}

impl StackReport {
    /// Reads and parses a report file.
    ///
    /// # Panics
    ///
    /// Panics when the file is missing or lacks the stack fields.
    pub fn load(path: &Path) -> Self {
        let text = fs::read_to_string(path)
            .unwrap_or_else(|error| panic!("failed to read {}: {error}", path.display()));
        Self::parse(&text).unwrap_or_else(|error| {
            panic!(
                "{} has no valid `stalls` with stacks or `culprits`: {error}\n{text}",
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
    pub fn stalls_of_thread(&self, pid: u32, tid: u32) -> Vec<&StackStall> {
        self.stalls
            .iter()
            .filter(|stall| stall.pid == pid && stall.tid == tid)
            .collect()
    }

    /// Returns the culprits of `verdict` in report order, which is largest first.
    pub fn culprits_of(&self, verdict: &str) -> Vec<&Culprit> {
        self.culprits
            .iter()
            .filter(|culprit| culprit.verdict == verdict)
            .collect()
    }
}

impl fmt::Display for StackReport {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match serde_json::to_string_pretty(&self.raw) {
            Ok(text) => formatter.write_str(&text),
            Err(_) => write!(formatter, "{self:?}"),
        }
    }
}

impl StackStall {
    pub fn end_ns(&self) -> u64 {
        self.start_ns + self.duration_ns
    }

    /// Returns the index of the first frame whose name contains `needle`.
    pub fn frame_index(&self, needle: &str) -> Option<usize> {
        self.stack
            .iter()
            .position(|frame| frame.name.contains(needle))
    }

    /// Returns the frames as `name [module]`, one per line, for assert messages.
    pub fn stack_text(&self) -> String {
        self.stack
            .iter()
            .map(|frame| format!("  {} [{}]", frame.name, frame.module))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// One line of `stalls.folded`: frames outermost first (the verdict is the root), and the
/// stalled nanoseconds spent in that stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoldedLine {
    pub frames: Vec<String>,
    pub weight_ns: u64,
}

impl FoldedLine {
    /// Parses `FRAME;FRAME;... WEIGHT`. The stack is split from the weight at the last
    /// space, must contain no other space and no empty frame, and the weight must be a
    /// whole number.
    pub fn parse(line: &str) -> Result<Self, String> {
        let Some((stack, weight)) = line.rsplit_once(' ') else {
            return Err(format!("folded line `{line}` has no space before a weight"));
        };
        if stack.contains(char::is_whitespace) {
            return Err(format!(
                "the stack of folded line `{line}` contains whitespace"
            ));
        }
        let weight_ns = weight.parse::<u64>().map_err(|error| {
            format!("the weight `{weight}` of folded line `{line}` is not a u64: {error}")
        })?;
        let frames: Vec<String> = stack.split(';').map(str::to_owned).collect();
        if frames.iter().any(String::is_empty) {
            return Err(format!("folded line `{line}` has an empty frame"));
        }
        Ok(Self { frames, weight_ns })
    }

    /// Returns the root frame, which stalltrace sets to the stall's verdict.
    pub fn root(&self) -> &str {
        &self.frames[0]
    }

    /// Returns whether a frame name contains `needle`.
    pub fn has_frame(&self, needle: &str) -> bool {
        self.frames.iter().any(|frame| frame.contains(needle))
    }
}

/// Parses every line of a `stalls.folded` file.
pub fn parse_folded(text: &str) -> Result<Vec<FoldedLine>, String> {
    text.lines().map(FoldedLine::parse).collect()
}

/// Output of `stalltrace compare --json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Comparison {
    pub verdicts: Vec<VerdictChange>,
    pub culprits: Vec<CulpritChange>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VerdictChange {
    pub verdict: String,
    pub stalls_before: u64,
    pub stalls_after: u64,
    pub stalled_ns_before: u64,
    pub stalled_ns_after: u64,
    pub delta_ns: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CulpritChange {
    pub frame: String,
    pub verdict: String,
    pub stalled_ns_before: u64,
    pub stalled_ns_after: u64,
    pub delta_ns: i64,
}

/// Returns the indented rows under the section header `header` (`verdicts:` or
/// `culprits:`) of `stalltrace compare` text output, with runs of spaces collapsed to one.
pub fn compare_section(text: &str, header: &str) -> Vec<String> {
    text.lines()
        .skip_while(|line| line.trim_end() != header)
        .skip(1)
        .take_while(|line| line.starts_with("  "))
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folded_line_parses_frames_and_weight() {
        let line = FoldedLine::parse("on_cpu;main;app::handler 300").unwrap();
        assert_eq!(line.frames, ["on_cpu", "main", "app::handler"]);
        assert_eq!(line.weight_ns, 300);
        assert_eq!(line.root(), "on_cpu");
        assert!(line.has_frame("handler"));
        assert!(!line.has_frame("napping"));
    }

    #[test]
    fn folded_line_rejects_malformed_lines() {
        let cases = [
            "on_cpu;main",
            "on_cpu;main -5",
            "on_cpu;main 1.5",
            "on_cpu;main x",
            "on_cpu;a b 10",
            "on_cpu;;main 10",
            " 10",
        ];
        for line in cases {
            assert!(FoldedLine::parse(line).is_err(), "accepted `{line}`");
        }
    }

    #[test]
    fn report_parses_stacks_and_culprits() {
        let text = r#"{
          "version": 1,
          "stalls": [{
            "pid": 7, "tid": 7, "start_ns": 100, "duration_ns": 50, "verdict": "syscall",
            "stack": [
              {"name": "schedule", "module": "kernel", "file": null, "line": null, "inlined": false},
              {"name": "app::nap", "module": "app", "file": "src/main.rs", "line": 12, "inlined": false}
            ],
            "stack_truncated": true
          }],
          "culprits": [
            {"verdict": "syscall", "frame": "app::nap", "stalled_ns": 50, "stalls": 1, "share": 1.0}
          ]
        }"#;
        let report = StackReport::parse(text).unwrap();
        let stall = &report.stalls[0];
        assert_eq!(stall.frame_index("nap"), Some(1));
        assert_eq!(stall.stack[1].line, Some(12));
        assert_eq!(stall.end_ns(), 150);
        assert_eq!(report.culprits_of("syscall").len(), 1);
        assert!(report.culprits_of("on_cpu").is_empty());
        assert_eq!(report.stalls_of_thread(7, 7).len(), 1);
    }

    #[test]
    fn compare_section_collapses_rows() {
        let text = "before -> after: threshold 50.0ms -> 50.0ms\n\nverdicts:\n  on_cpu:  1 stall,  301ms -> 0 stalls, 0ns (-301ms)\n\nculprits:\n  app::busy: (on_cpu) 301ms -> 0ns (-301ms)\n";
        assert_eq!(
            compare_section(text, "verdicts:"),
            ["on_cpu: 1 stall, 301ms -> 0 stalls, 0ns (-301ms)"]
        );
        assert_eq!(
            compare_section(text, "culprits:"),
            ["app::busy: (on_cpu) 301ms -> 0ns (-301ms)"]
        );
        assert!(compare_section(text, "missing:").is_empty());
    }
}
