//! Flame-style outputs of stalled time: folded stacks, an SVG flame graph and culprits.
//!
//! Folded stacks are the input format of Brendan Gregg's `flamegraph.pl` and
//! of inferno: one line per stack, frames outermost first separated by `;`,
//! then a space and the stack's weight.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs,
    io::{BufWriter, Write as _},
    path::Path,
};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::stacks::{Frame, KERNEL_MODULE, UNKNOWN_NAME};

/// Default title of [`write_svg`] graphs.
pub const SVG_TITLE: &str = "stalltrace: stalled time by stack";

/// One stack of one stall, with the stalled time spent in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlameStall {
    /// Identifies the stall. The stacks of one stall share it, so that
    /// [`culprits`] counts each stall once.
    pub stall_id: u64,
    /// Verdict key (`on_cpu`, `futex`, ...) under which the time is shown.
    pub verdict: String,
    /// Symbolized frames, innermost first.
    pub frames: Vec<Frame>,
    /// Time blocked in this stack, or on-CPU samples times the sample period.
    pub weight_ns: u64,
}

/// Builds folded-stack lines: the verdict as the root frame, then the frames
/// outermost first, then the summed weight in nanoseconds.
///
/// Stalls with the same verdict and frame names merge into one line. Frame
/// text is the function name with `;` replaced by `:` and whitespace by `_`,
/// so each line is `frames SPACE integer`. Lines are sorted.
pub fn folded_lines(stalls: &[FlameStall]) -> Vec<String> {
    let mut weights: BTreeMap<String, u64> = BTreeMap::new();
    for stall in stalls {
        let mut stack = folded_name(&stall.verdict);
        for frame in stall.frames.iter().rev() {
            stack.push(';');
            stack.push_str(&folded_name(&frame.name));
        }
        *weights.entry(stack).or_insert(0) += stall.weight_ns;
    }
    weights
        .into_iter()
        .map(|(stack, weight_ns)| format!("{stack} {weight_ns}"))
        .collect()
}

/// Returns a frame name that contains no `;` and no whitespace, or [`UNKNOWN_NAME`] for an empty one.
fn folded_name(name: &str) -> String {
    if name.trim().is_empty() {
        return UNKNOWN_NAME.to_owned();
    }
    name.chars()
        .map(|c| match c {
            ';' => ':',
            c if c.is_whitespace() => '_',
            c => c,
        })
        .collect()
}

/// Writes folded-stack lines to `path`, one per line.
pub fn write_folded(path: &Path, lines: &[String]) -> Result<()> {
    let mut text = lines.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    fs::write(path, text).with_context(|| format!("failed to write {}", path.display()))
}

/// Writes a flame graph of folded-stack lines to `path` as SVG, with inferno.
///
/// Fails without creating the file when the lines hold no weight, because
/// inferno draws nothing then.
pub fn write_svg(path: &Path, lines: &[String], title: &str) -> Result<()> {
    if !lines.iter().any(|line| line_weight(line) > 0) {
        bail!("no stacks with stalled time to draw in {}", path.display());
    }
    let mut options = inferno::flamegraph::Options::default();
    options.title = title.to_owned();
    options.count_name = "ns".to_owned();
    // Colors come from a hash of the function name, so a function keeps its
    // color across graphs.
    options.deterministic = true;

    let file =
        fs::File::create(path).with_context(|| format!("failed to create {}", path.display()))?;
    let mut writer = BufWriter::new(file);
    inferno::flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), &mut writer)
        .with_context(|| format!("failed to draw the flame graph {}", path.display()))?;
    writer
        .flush()
        .with_context(|| format!("failed to write {}", path.display()))
}

/// Returns the trailing integer of a folded line, or 0 if it has none.
fn line_weight(line: &str) -> u64 {
    line.rsplit(' ')
        .next()
        .and_then(|weight| weight.parse().ok())
        .unwrap_or(0)
}

/// A frame that owns a large share of one verdict's stalled time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Culprit {
    pub verdict: String,
    /// Function name of the owning frame.
    pub frame: String,
    /// Stalled time owned by the frame, in nanoseconds.
    pub stalled_ns: u64,
    /// Number of distinct stalls with a stack owned by the frame.
    pub stalls: u32,
    /// `stalled_ns` divided by the verdict's total stalled time, from 0 to 1.
    pub share: f64,
}

/// Finds, for each verdict, the `top` frames that own the most stalled time.
///
/// The owner of a stack is its innermost frame in the application's code.
/// These frames are skipped:
/// - frames named [`UNKNOWN_NAME`],
/// - frames whose module is the kernel, the C library, the dynamic loader,
///   the vDSO, or the C++ and unwinding runtimes (`SYSTEM_MODULES`),
/// - Rust and C++ standard library functions: names under `std::`, `core::`
///   or `alloc::`, impls on their types, and `__rust*` or `__libc*` symbols.
///
/// When every frame is skipped, the innermost frame owns the stack. An empty
/// stack is owned by [`UNKNOWN_NAME`].
///
/// Verdicts come out largest total first, and their culprits largest first.
/// Ties are broken by name.
pub fn culprits(stalls: &[FlameStall], top: usize) -> Vec<Culprit> {
    #[derive(Default)]
    struct Owned<'a> {
        stalled_ns: u64,
        stalls: HashSet<u64>,
        frame: &'a str,
    }

    let mut totals: HashMap<&str, u64> = HashMap::new();
    let mut owned: HashMap<(&str, &str), Owned> = HashMap::new();
    for stall in stalls {
        let owner = owner_name(&stall.frames);
        *totals.entry(stall.verdict.as_str()).or_insert(0) += stall.weight_ns;
        let entry = owned.entry((stall.verdict.as_str(), owner)).or_default();
        entry.frame = owner;
        entry.stalled_ns += stall.weight_ns;
        entry.stalls.insert(stall.stall_id);
    }

    let mut verdicts: Vec<(&str, u64)> = totals.into_iter().collect();
    verdicts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));

    let mut result = Vec::new();
    for (verdict, total_ns) in verdicts {
        let mut rows: Vec<&Owned> = owned
            .iter()
            .filter(|((owned_verdict, _), _)| *owned_verdict == verdict)
            .map(|(_, row)| row)
            .collect();
        rows.sort_by(|a, b| b.stalled_ns.cmp(&a.stalled_ns).then(a.frame.cmp(b.frame)));
        for row in rows.into_iter().take(top) {
            let share = if total_ns == 0 {
                0.0
            } else {
                row.stalled_ns as f64 / total_ns as f64
            };
            result.push(Culprit {
                verdict: verdict.to_owned(),
                frame: row.frame.to_owned(),
                stalled_ns: row.stalled_ns,
                stalls: u32::try_from(row.stalls.len()).unwrap_or(u32::MAX),
                share,
            });
        }
    }
    result
}

/// Returns the name of the frame that owns a stack, by the rule of [`culprits`].
fn owner_name(frames: &[Frame]) -> &str {
    frames
        .iter()
        .find(|frame| is_application_frame(frame))
        .or_else(|| frames.first())
        .map_or(UNKNOWN_NAME, |frame| frame.name.as_str())
}

/// Module name prefixes of system libraries and runtimes.
const SYSTEM_MODULES: &[&str] = &[
    "libc.so",
    "libc-",
    "libc.musl",
    "ld-musl",
    "libpthread",
    "ld-linux",
    "linux-vdso",
    "linux-gate",
    "[vdso]",
    "libstdc++",
    "libgcc_s",
    "libunwind",
];

/// Name prefixes of Rust and C++ standard library functions.
const RUNTIME_PREFIXES: &[&str] = &[
    "std::",
    "core::",
    "alloc::",
    "__rust",
    "__libc",
    "__gnu_cxx::",
];

fn is_application_frame(frame: &Frame) -> bool {
    if frame.name == UNKNOWN_NAME || frame.module == KERNEL_MODULE {
        return false;
    }
    if SYSTEM_MODULES
        .iter()
        .any(|prefix| frame.module.starts_with(prefix))
    {
        return false;
    }
    // The Rust toolchain's own sources (core, alloc, std) sit under
    // `/rustc/COMMIT/library/` in its DWARF, whatever the function's name.
    if frame.file.as_deref().is_some_and(|file| file.starts_with("/rustc/")) {
        return false;
    }
    // `<alloc::vec::Vec<T> as core::ops::Drop>::drop` is library code, but
    // `<app::Server as core::fmt::Debug>::fmt` is the application's: an impl
    // belongs to the type before `as`.
    let name = frame.name.strip_prefix('<').unwrap_or(&frame.name);
    let self_type = name.split([' ', '>', ':']).next().unwrap_or(name);
    if PRIMITIVE_TYPES.contains(&self_type) || self_type.starts_with('[') || self_type.starts_with('&') {
        return false;
    }
    !RUNTIME_PREFIXES
        .iter()
        .any(|prefix| name.starts_with(prefix))
}

/// Rust's primitive types: their methods (`<u64>::wrapping_mul`) and trait
/// impls (`<u64 as core::cmp::PartialOrd>::lt`) are library code.
const PRIMITIVE_TYPES: &[&str] = &[
    "u8", "u16", "u32", "u64", "u128", "usize", "i8", "i16", "i32", "i64", "i128", "isize", "f32", "f64",
    "bool", "char", "str",
];

#[cfg(test)]
mod tests {
    use quick_xml::{events::Event, Reader};

    use super::*;

    fn frame(name: &str, module: &str) -> Frame {
        Frame {
            name: name.to_owned(),
            module: module.to_owned(),
            file: None,
            line: None,
            inlined: false,
        }
    }

    /// Builds a stack, innermost frame first, from `name@module` entries.
    fn stack(spec: &[&str]) -> Vec<Frame> {
        spec.iter()
            .map(|entry| {
                let (name, module) = entry.rsplit_once('@').unwrap();
                frame(name, module)
            })
            .collect()
    }

    fn stall(stall_id: u64, verdict: &str, frames: Vec<Frame>, weight_ns: u64) -> FlameStall {
        FlameStall {
            stall_id,
            verdict: verdict.to_owned(),
            frames,
            weight_ns,
        }
    }

    /// Two on-CPU stalls in one stack, and a futex stall waiting in libc.
    fn sample_stalls() -> Vec<FlameStall> {
        let busy = stack(&[
            "app::parse_request@server",
            "app::serve@server",
            "main@server",
            "_start@server",
        ]);
        let locked = stack(&[
            "__futex_abstimed_wait_common@libc.so.6",
            "pthread_mutex_lock@libc.so.6",
            "app::Cache::get@server",
            "app::serve@server",
            "main@server",
        ]);
        vec![
            stall(1, "on_cpu", busy.clone(), 120_000_000),
            stall(2, "on_cpu", busy, 80_000_000),
            stall(3, "futex", locked, 50_000_000),
        ]
    }

    #[test]
    fn folded_merges_same_stack() {
        let lines = folded_lines(&sample_stalls());

        assert_eq!(
            lines,
            vec![
                "futex;main;app::serve;app::Cache::get;pthread_mutex_lock;__futex_abstimed_wait_common 50000000",
                "on_cpu;_start;main;app::serve;app::parse_request 200000000",
            ]
        );
    }

    #[test]
    fn folded_lines_parse_as_stack_and_count() {
        let frames = stack(&[
            "<app::Server as core::fmt::Debug>::fmt@server",
            "drop_in_place<[u8; 8]>@server",
            "\t @server",
            "main@server",
        ]);
        let stalls = vec![
            stall(1, "on cpu", frames, 7),
            stall(2, "futex", Vec::new(), 5),
        ];

        let lines = folded_lines(&stalls);

        assert_eq!(lines.len(), 2, "{lines:?}");
        for line in &lines {
            let (stack, weight) = line.rsplit_once(' ').unwrap();
            assert!(!stack.is_empty(), "{line}");
            assert!(!stack.contains(char::is_whitespace), "{line}");
            assert!(weight.parse::<u64>().is_ok(), "{line}");
        }
        assert!(
            lines.contains(&"on_cpu;main;[unknown];drop_in_place<[u8:_8]>;<app::Server_as_core::fmt::Debug>::fmt 7".to_owned()),
            "{lines:?}"
        );
        assert!(lines.contains(&"futex 5".to_owned()), "{lines:?}");
    }

    #[test]
    fn folded_total_equals_input() {
        let stalls = sample_stalls();
        let input_ns: u64 = stalls.iter().map(|stall| stall.weight_ns).sum();

        let lines = folded_lines(&stalls);

        let folded_ns: u64 = lines.iter().map(|line| line_weight(line)).sum();
        assert_eq!(folded_ns, input_ns);
    }

    #[test]
    fn folded_file_has_one_line_per_stack() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stacks.folded");
        let lines = folded_lines(&sample_stalls());

        write_folded(&path, &lines).unwrap();

        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().collect::<Vec<_>>(), lines);
        assert!(text.ends_with('\n'));
    }

    /// Parses an SVG with quick-xml and returns its text nodes, failing on malformed XML.
    fn svg_texts(svg: &str) -> Vec<String> {
        let mut reader = Reader::from_str(svg);
        let mut texts = Vec::new();
        let mut depth = 0usize;
        let mut saw_svg_root = false;
        loop {
            match reader.read_event() {
                Ok(Event::Start(start)) => {
                    if depth == 0 {
                        assert_eq!(start.name().as_ref(), b"svg", "root element");
                        saw_svg_root = true;
                    }
                    depth += 1;
                }
                Ok(Event::End(_)) => depth -= 1,
                Ok(Event::Text(text)) => texts.push(text.decode().unwrap().into_owned()),
                Ok(Event::Eof) => break,
                Ok(_) => {}
                Err(error) => panic!("invalid XML at byte {}: {error}", reader.buffer_position()),
            }
        }
        assert!(saw_svg_root, "no <svg> root element");
        assert_eq!(depth, 0, "unclosed elements");
        texts
    }

    #[test]
    fn svg_is_xml_with_culprit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stalls.svg");
        let stalls = sample_stalls();
        let lines = folded_lines(&stalls);
        let top = culprits(&stalls, 1);

        write_svg(&path, &lines, SVG_TITLE).unwrap();

        let svg = fs::read_to_string(&path).unwrap();
        let texts = svg_texts(&svg);
        assert!(
            texts.iter().any(|text| text.contains(SVG_TITLE)),
            "{texts:?}"
        );
        assert_eq!(top[0].frame, "app::parse_request");
        assert!(
            texts.iter().any(|text| text.contains(&top[0].frame)),
            "culprit {} missing from {texts:?}",
            top[0].frame
        );
    }

    #[test]
    fn svg_rejects_empty_input() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.svg");

        let error = write_svg(&path, &[], SVG_TITLE).unwrap_err();

        assert!(error.to_string().contains("no stacks"), "{error}");
        assert!(!path.exists());
    }

    #[test]
    fn culprits_skip_libc_frames() {
        let found = culprits(&sample_stalls(), 3);

        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].verdict, "on_cpu");
        assert_eq!(found[0].frame, "app::parse_request");
        assert_eq!(found[0].stalled_ns, 200_000_000);
        assert_eq!(found[0].stalls, 2);
        assert_eq!(found[0].share, 1.0);
        assert_eq!(found[1].verdict, "futex");
        assert_eq!(found[1].frame, "app::Cache::get");
        assert_eq!(found[1].stalls, 1);
    }

    #[test]
    fn culprits_skip_runtime_frames() {
        let runtime = stack(&[
            "core::slice::sort::stable::drift::sort@server",
            "<alloc::vec::Vec<T> as core::ops::Drop>::drop@server",
            "std::thread::sleep@server",
            "<app::Queue as core::ops::Drop>::drop@server",
            "main@server",
        ]);
        let kernel_only = stack(&["schedule@kernel", "do_nanosleep@kernel"]);
        let stalls = vec![
            stall(1, "syscall", runtime, 30),
            stall(1, "syscall", kernel_only, 10),
            stall(2, "syscall", Vec::new(), 5),
        ];

        let found = culprits(&stalls, 5);

        let frames: Vec<&str> = found.iter().map(|culprit| culprit.frame.as_str()).collect();
        assert_eq!(
            frames,
            vec![
                "<app::Queue as core::ops::Drop>::drop",
                "schedule",
                UNKNOWN_NAME
            ]
        );
        let shares: Vec<f64> = found.iter().map(|culprit| culprit.share).collect();
        assert_eq!(shares, vec![30.0 / 45.0, 10.0 / 45.0, 5.0 / 45.0]);
    }

    #[test]
    fn culprits_skip_inlined_primitive_code() {
        let mut from_core = frame("<u64 as core::cmp::PartialOrd>::lt", "server");
        from_core.file = Some("/rustc/0123abcd/library/core/src/cmp.rs".to_owned());
        from_core.inlined = true;
        let frames = vec![
            from_core,
            frame("<u64>::wrapping_mul", "server"),
            frame("<[u8]>::len", "server"),
            frame("app::busy_work_handler", "server"),
            frame("main", "server"),
        ];
        let stalls = vec![stall(1, "on_cpu", frames, 300)];

        let found = culprits(&stalls, 3);

        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].frame, "app::busy_work_handler");
    }

    #[test]
    fn culprits_count_stall_once_and_cut_at_top() {
        let first = stack(&["app::a@server", "main@server"]);
        let second = stack(&["app::b@server", "main@server"]);
        let stalls = vec![
            stall(1, "on_cpu", first.clone(), 10),
            stall(1, "on_cpu", first.clone(), 10),
            stall(2, "on_cpu", first, 10),
            stall(3, "on_cpu", second, 5),
        ];

        let found = culprits(&stalls, 1);

        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].frame, "app::a");
        assert_eq!(found[0].stalled_ns, 30);
        assert_eq!(found[0].stalls, 2);
    }
}
