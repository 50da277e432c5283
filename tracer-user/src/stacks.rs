//! Stack traces: address normalization at record time and symbolization at report time.
//!
//! The BPF programs capture raw instruction addresses. User addresses are only
//! meaningful inside the process that ran them, so [`Normalizer`] turns them
//! into (ELF path, file offset) pairs while the process is alive. The capture
//! can then be symbolized later by [`Symbolizer`], after the process has
//! exited. Both wrap blazesym.

use std::{
    collections::{hash_map::Entry, HashMap},
    fs,
    path::{Path, PathBuf},
};

use blazesym::{
    normalize::{self, UserMeta},
    symbolize::{
        self,
        source::{Elf, Kernel, Source},
        Input, Sym, Symbolized,
    },
    MaybeDefault, Pid,
};
use serde::{Deserialize, Serialize};

/// Name of a frame that could not be symbolized.
pub const UNKNOWN_NAME: &str = "[unknown]";

/// Module name of kernel frames.
pub const KERNEL_MODULE: &str = "kernel";

/// A user-space instruction address as an offset into an ELF file on disk.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UserFrameRef {
    /// Path of the ELF file as `/proc/PID/maps` shows it.
    pub path: String,
    /// Offset into the file, before relocation.
    pub file_offset: u64,
}

/// One frame of a captured stack, in a form that outlives the traced process.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FrameRef {
    /// A user address inside a file-backed mapping.
    User(UserFrameRef),
    /// A kernel address, as `/proc/kallsyms` lists it.
    Kernel(u64),
    /// A user address outside any file-backed mapping (JIT code, the vDSO,
    /// an unmapped address), or one of a process that has exited.
    Unknown(u64),
}

/// One symbolized frame.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Frame {
    /// Demangled function name, or [`UNKNOWN_NAME`].
    pub name: String,
    /// File name of the binary (`libc.so.6`), [`KERNEL_MODULE`], or the
    /// address in hex for a [`FrameRef::Unknown`] frame.
    pub module: String,
    /// Source file, when DWARF line tables cover the address.
    pub file: Option<String>,
    pub line: Option<u32>,
    /// True for a function that the compiler inlined into the next frame.
    pub inlined: bool,
}

/// Processes whose normalized addresses are kept before a sweep drops the exited ones.
const CACHED_PROCESSES: usize = 256;

/// Converts user addresses of live processes to [`FrameRef`]s.
///
/// Successful results are cached per process, keyed by address, so repeated
/// stacks of one process parse `/proc/PID/maps` once. The cache of a PID is
/// dropped when the process start time in `/proc/PID/stat` changes, so a
/// reused PID never gets another process's results.
pub struct Normalizer {
    inner: normalize::Normalizer,
    processes: HashMap<u32, ProcessCache>,
}

struct ProcessCache {
    /// Field 22 of `/proc/PID/stat`: the process start time in clock ticks since boot.
    start_time: u64,
    frames: HashMap<u64, UserFrameRef>,
}

impl Default for Normalizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Normalizer {
    pub fn new() -> Self {
        // Build IDs are not read because `UserFrameRef` has no place for them.
        let inner = normalize::Normalizer::builder()
            .enable_build_ids(false)
            .build();
        Self {
            inner,
            processes: HashMap::new(),
        }
    }

    /// Normalizes one user stack of process `pid`, innermost frame first.
    ///
    /// Every frame after the first is a return address, which can point past
    /// the end of the calling function or into the next inlined call. Those
    /// frames are therefore looked up at `address - 1`, inside the call
    /// instruction. The first frame is looked up as is.
    /// The returned `file_offset` is that of the looked-up byte, and an
    /// [`FrameRef::Unknown`] keeps the original address.
    ///
    /// Addresses outside file-backed mappings become [`FrameRef::Unknown`],
    /// and so do all addresses when the process has exited or `pid` is 0.
    pub fn normalize_user(&mut self, pid: u32, addrs: &[u64]) -> Vec<FrameRef> {
        let unknown = || addrs.iter().map(|&addr| FrameRef::Unknown(addr)).collect();
        if pid == 0 {
            // blazesym reads PID 0 as "this process".
            return unknown();
        }
        let Some(start_time) = process_start_time(pid) else {
            self.processes.remove(&pid);
            return unknown();
        };
        let lookups: Vec<u64> = addrs
            .iter()
            .enumerate()
            .map(|(index, &addr)| {
                if index == 0 {
                    addr
                } else {
                    addr.saturating_sub(1)
                }
            })
            .collect();

        self.sweep_if_full(pid);
        let cache = match self.processes.entry(pid) {
            Entry::Occupied(entry) if entry.get().start_time == start_time => entry.into_mut(),
            entry => {
                let fresh = ProcessCache {
                    start_time,
                    frames: HashMap::new(),
                };
                match entry {
                    Entry::Occupied(mut entry) => {
                        entry.insert(fresh);
                        entry.into_mut()
                    }
                    Entry::Vacant(entry) => entry.insert(fresh),
                }
            }
        };

        let mut missing: Vec<u64> = lookups
            .iter()
            .copied()
            .filter(|lookup| !cache.frames.contains_key(lookup))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if !missing.is_empty() {
            normalize_into(&self.inner, pid, &missing, &mut cache.frames);
        }

        addrs
            .iter()
            .zip(&lookups)
            .map(|(&addr, lookup)| match cache.frames.get(lookup) {
                Some(frame) => FrameRef::User(frame.clone()),
                None => FrameRef::Unknown(addr),
            })
            .collect()
    }

    /// Drops the cached results of one process, for a caller that saw it exit.
    pub fn forget(&mut self, pid: u32) {
        self.processes.remove(&pid);
    }

    /// Drops cached processes that have exited or whose PID was reused,
    /// once the cache contains [`CACHED_PROCESSES`] of them and `pid` is new.
    fn sweep_if_full(&mut self, pid: u32) {
        if self.processes.len() < CACHED_PROCESSES || self.processes.contains_key(&pid) {
            return;
        }
        self.processes
            .retain(|&cached, cache| process_start_time(cached) == Some(cache.start_time));
    }
}

/// Normalizes sorted, distinct `lookups` of process `pid` and stores the ones
/// inside ELF files in `frames`. Failures leave addresses out, so they stay unknown.
fn normalize_into(
    normalizer: &normalize::Normalizer,
    pid: u32,
    lookups: &[u64],
    frames: &mut HashMap<u64, UserFrameRef>,
) {
    let options = normalize::NormalizeOpts {
        sorted_addrs: true,
        ..Default::default()
    };
    // NOTE: the path is the one in `/proc/PID/maps`, which is relative to the
    // process's mount namespace. A process in a container may name a file that
    // does not exist, or is another file, where the report is symbolized.
    let output = match normalizer.normalize_user_addrs_opts(Pid::from(pid), lookups, &options) {
        Ok(output) => output,
        Err(error) => {
            // The process exited between the start-time check and the maps read.
            tracing::debug!(pid, %error, "failed to normalize user addresses");
            return;
        }
    };
    for (&lookup, &(file_offset, meta_index)) in lookups.iter().zip(&output.outputs) {
        // The vDSO is symbolized by blazesym right away (`UserMeta::Sym`) and
        // has no file to look up later, so it stays unknown like JIT code.
        if let Some(UserMeta::Elf(elf)) = output.meta.get(meta_index) {
            let frame = UserFrameRef {
                path: elf.path.to_string_lossy().into_owned(),
                file_offset,
            };
            frames.insert(lookup, frame);
        }
    }
}

/// Reads the start time of process `pid` from `/proc/PID/stat`, or `None` if it has exited.
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces
    // and `)`, so fields are counted from the last `)`, which ends field 2.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Turns [`FrameRef`]s into function names, source lines and inlined frames.
///
/// ELF symbols are used everywhere, and DWARF where a binary (or its debug
/// link) has it. Kernel addresses are looked up in kallsyms. Results are
/// cached per binary and offset, and blazesym keeps each parsed binary open,
/// so each address is symbolized once.
pub struct Symbolizer {
    inner: symbolize::Symbolizer,
    kallsyms: MaybeDefault<PathBuf>,
    cache: HashMap<FrameRef, Vec<Frame>>,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    /// Creates a symbolizer that reads kernel symbols from this host's `/proc/kallsyms`.
    pub fn new() -> Self {
        Self::build(MaybeDefault::Default)
    }

    /// Creates a symbolizer that reads kernel symbols from a copy of
    /// `/proc/kallsyms`, for a capture recorded on another boot or host.
    pub fn with_kallsyms(path: impl Into<PathBuf>) -> Self {
        Self::build(MaybeDefault::Some(path.into()))
    }

    fn build(kallsyms: MaybeDefault<PathBuf>) -> Self {
        let inner = symbolize::Symbolizer::builder()
            .enable_code_info(true)
            .enable_inlined_fns(true)
            .enable_demangling(true)
            .build();
        Self {
            inner,
            kallsyms,
            cache: HashMap::new(),
        }
    }

    /// Symbolizes one stack, innermost frame first.
    ///
    /// A frame whose function has inlined calls at that address expands to
    /// several frames: the innermost inlined function first, each marked
    /// `inlined`, then the function they were inlined into. A frame that
    /// cannot be symbolized becomes one frame named [`UNKNOWN_NAME`], so the
    /// stack keeps its length.
    pub fn symbolize(&mut self, frames: &[FrameRef]) -> Vec<Frame> {
        self.fill_cache(frames);
        frames
            .iter()
            .flat_map(|frame| match self.cache.get(frame) {
                Some(symbolized) => symbolized.clone(),
                None => vec![unknown_frame(frame)],
            })
            .collect()
    }

    /// Symbolizes the frames missing from the cache, one batch per binary.
    fn fill_cache(&mut self, frames: &[FrameRef]) {
        let mut user: HashMap<&str, Vec<u64>> = HashMap::new();
        let mut kernel: Vec<u64> = Vec::new();
        for frame in frames {
            if self.cache.contains_key(frame) {
                continue;
            }
            match frame {
                FrameRef::User(user_frame) => user
                    .entry(user_frame.path.as_str())
                    .or_default()
                    .push(user_frame.file_offset),
                FrameRef::Kernel(addr) => kernel.push(*addr),
                FrameRef::Unknown(_) => {}
            }
        }

        let mut found: Vec<(FrameRef, Vec<Frame>)> = Vec::new();
        for (path, mut offsets) in user {
            offsets.sort_unstable();
            offsets.dedup();
            let module = module_name(path);
            let source = Source::from(Elf::new(path));
            let results = self.symbolize_batch(&source, Input::FileOffset(&offsets), path);
            for (offset, result) in offsets.iter().zip(results) {
                let frame = FrameRef::User(UserFrameRef {
                    path: path.to_owned(),
                    file_offset: *offset,
                });
                let symbolized = match result {
                    Some(sym) => frames_of(&sym, &module),
                    None => vec![unknown_frame(&frame)],
                };
                found.push((frame, symbolized));
            }
        }

        if !kernel.is_empty() {
            kernel.sort_unstable();
            kernel.dedup();
            let source = Source::from(Kernel {
                kallsyms: self.kallsyms.clone(),
                // Only kallsyms, which lists every kernel function. Without
                // this, blazesym would also search for a vmlinux and parse it.
                vmlinux: MaybeDefault::None,
                debug_syms: false,
                ..Kernel::default()
            });
            let results = self.symbolize_batch(&source, Input::AbsAddr(&kernel), "kallsyms");
            for (addr, result) in kernel.iter().zip(results) {
                let frame = FrameRef::Kernel(*addr);
                let symbolized = match result {
                    Some(sym) => frames_of(&sym, KERNEL_MODULE),
                    None => vec![unknown_frame(&frame)],
                };
                found.push((frame, symbolized));
            }
        }

        self.cache.extend(found);
    }

    /// Symbolizes a batch from one source. Returns one entry per input,
    /// `None` where the address was not found or the source failed to load.
    fn symbolize_batch(
        &self,
        source: &Source,
        input: Input<&[u64]>,
        source_name: &str,
    ) -> Vec<Option<Sym<'static>>> {
        let count = input.as_inner_ref().len();
        match self.inner.symbolize(source, input) {
            Ok(results) => results
                .into_iter()
                .map(|result| match result {
                    Symbolized::Sym(sym) => Some(sym.into_owned()),
                    Symbolized::Unknown(_) => None,
                })
                .collect(),
            Err(error) => {
                // Logged once per batch; the frames are cached as unknown.
                tracing::warn!(source = source_name, %error, "failed to symbolize addresses");
                vec![None; count]
            }
        }
    }
}

/// Expands a blazesym symbol into frames, innermost inlined function first.
fn frames_of(sym: &Sym<'_>, module: &str) -> Vec<Frame> {
    let mut frames = Vec::with_capacity(sym.inlined.len() + 1);
    // blazesym lists inlined calls outermost first, each with the source
    // location inside that inlined function. `sym.code_info` is the location
    // inside `sym` itself: the call site of the first inlined function.
    for inlined in sym.inlined.iter().rev() {
        let (file, line) = location(inlined.code_info.as_ref());
        frames.push(Frame {
            name: inlined.name.to_string(),
            module: module.to_owned(),
            file,
            line,
            inlined: true,
        });
    }
    let (file, line) = location(sym.code_info.as_deref());
    frames.push(Frame {
        name: sym.name.to_string(),
        module: module.to_owned(),
        file,
        line,
        inlined: false,
    });
    frames
}

fn location(code_info: Option<&symbolize::CodeInfo<'_>>) -> (Option<String>, Option<u32>) {
    match code_info {
        Some(code_info) => (
            Some(code_info.to_path().to_string_lossy().into_owned()),
            code_info.line,
        ),
        None => (None, None),
    }
}

fn unknown_frame(frame: &FrameRef) -> Frame {
    let module = match frame {
        FrameRef::User(user_frame) => module_name(&user_frame.path),
        FrameRef::Kernel(_) => KERNEL_MODULE.to_owned(),
        FrameRef::Unknown(addr) => format!("{addr:#x}"),
    };
    Frame {
        name: UNKNOWN_NAME.to_owned(),
        module,
        file: None,
        line: None,
        inlined: false,
    }
}

/// Returns the file name of a binary's path, or the whole path if it has none.
fn module_name(path: &str) -> String {
    Path::new(path)
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_owned())
}

/// Functions that start a process or a thread, one of which is the outermost
/// frame of a user stack that was unwound completely. Matched against the
/// name up to any `@` symbol version.
const ENTRY_FUNCTIONS: &[&str] = &[
    "_start",
    "__libc_start_main",
    "__libc_start_main_impl",
    "__libc_start_call_main",
    "start_thread",
    "clone",
    "clone3",
    "__clone",
    "__clone3",
    "__GI___clone",
    "__GI___clone3",
];

/// Returns true if a symbolized user stack looks cut short.
///
/// Rule: the stack is truncated unless its outermost (last) frame is a
/// process or thread entry point in [`ENTRY_FUNCTIONS`]: `_start` or
/// `__libc_start_main` for the main thread, `start_thread` or `clone`/`clone3`
/// for other threads. Unwinding with frame pointers stops early in code built
/// without them (such as a glibc built without them), and the kernel cuts
/// stacks deeper than the stack map's depth, so such stacks end elsewhere. An
/// empty stack counts as truncated. Pass only the user part of a stack,
/// because a kernel frame is never an entry point here.
pub fn stack_truncated(frames: &[Frame]) -> bool {
    let Some(outermost) = frames.last() else {
        return true;
    };
    let name = outermost.name.split('@').next().unwrap_or_default();
    !ENTRY_FUNCTIONS.contains(&name)
}

#[cfg(test)]
mod tests {
    use std::{hint::black_box, process::Command};

    use super::*;

    #[inline(never)]
    fn stack_probe_target(value: u64) -> u64 {
        black_box(value)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(7)
    }

    #[inline(always)]
    fn inlined_mixer(value: u64) -> u64 {
        let mut mixed = value;
        for round in 0..black_box(8) {
            mixed = mixed.rotate_left(5) ^ round;
        }
        mixed
    }

    #[inline(never)]
    fn inlining_caller(value: u64) -> u64 {
        inlined_mixer(black_box(value)).wrapping_add(1)
    }

    fn probe_address() -> u64 {
        let target: fn(u64) -> u64 = stack_probe_target;
        black_box(stack_probe_target(3));
        target as usize as u64
    }

    fn frame(name: &str, module: &str) -> Frame {
        Frame {
            name: name.to_owned(),
            module: module.to_owned(),
            file: None,
            line: None,
            inlined: false,
        }
    }

    #[test]
    fn own_function_symbolizes_by_name() {
        let addr = probe_address();
        let mut normalizer = Normalizer::new();

        let refs = normalizer.normalize_user(std::process::id(), &[addr]);

        assert_eq!(refs.len(), 1);
        let FrameRef::User(user_frame) = &refs[0] else {
            panic!(
                "address {addr:#x} of this test binary normalized to {:?}",
                refs[0]
            );
        };
        let exe = std::env::current_exe().unwrap();
        assert_eq!(Path::new(&user_frame.path).file_name(), exe.file_name());

        let frames = Symbolizer::new().symbolize(&refs);

        let outer = frames.last().expect("no frames");
        assert!(outer.name.contains("stack_probe_target"), "{frames:?}");
        assert!(!outer.inlined, "{frames:?}");
        assert_eq!(
            Some(outer.module.as_str()),
            exe.file_name().and_then(|name| name.to_str())
        );
        let file = outer.file.as_deref().unwrap_or_default();
        assert!(
            file.ends_with("stacks.rs"),
            "no DWARF source file: {frames:?}"
        );
        assert!(outer.line.is_some(), "no DWARF line: {frames:?}");
    }

    #[test]
    fn inlined_call_expands_before_caller() {
        black_box(inlining_caller(5));
        let target: fn(u64) -> u64 = inlining_caller;
        let start = target as usize as u64;
        let pid = std::process::id();
        let mut normalizer = Normalizer::new();
        let mut symbolizer = Symbolizer::new();

        // Scan the caller's first bytes for an instruction of the inlined loop.
        let expanded = (0..512)
            .map(|offset| symbolizer.symbolize(&normalizer.normalize_user(pid, &[start + offset])))
            .find(|frames| {
                frames
                    .iter()
                    .any(|frame| frame.name.contains("inlined_mixer"))
            })
            .expect("no address of inlining_caller symbolizes to the inlined inlined_mixer");

        let (outer, inner) = expanded.split_last().unwrap();
        assert!(outer.name.contains("inlining_caller"), "{expanded:?}");
        assert!(!outer.inlined, "{expanded:?}");
        for frame in inner {
            assert!(frame.inlined, "{expanded:?}");
        }
        let mixer = inner
            .iter()
            .find(|frame| frame.name.contains("inlined_mixer"))
            .unwrap();
        assert!(
            mixer
                .file
                .as_deref()
                .unwrap_or_default()
                .ends_with("stacks.rs"),
            "{expanded:?}"
        );
        assert!(outer.line.is_some(), "{expanded:?}");
    }

    #[test]
    fn normalize_caches_per_process() {
        let addr = probe_address();
        let pid = std::process::id();
        let mut normalizer = Normalizer::new();

        let first = normalizer.normalize_user(pid, &[addr]);
        let second = normalizer.normalize_user(pid, &[addr]);

        assert_eq!(first, second);
        assert!(matches!(first[0], FrameRef::User(_)), "{first:?}");
        assert_eq!(normalizer.processes[&pid].frames.len(), 1);
    }

    #[test]
    fn return_addresses_looked_up_before() {
        let addr = probe_address();
        let mut normalizer = Normalizer::new();

        let refs = normalizer.normalize_user(std::process::id(), &[addr, addr + 1]);

        let (FrameRef::User(leaf), FrameRef::User(caller)) = (&refs[0], &refs[1]) else {
            panic!("{refs:?}");
        };
        assert_eq!(leaf.file_offset, caller.file_offset, "{refs:?}");
    }

    #[test]
    fn unmapped_address_is_unknown() {
        let mut normalizer = Normalizer::new();

        let refs = normalizer.normalize_user(std::process::id(), &[0x10, 0x20]);

        assert_eq!(refs, vec![FrameRef::Unknown(0x10), FrameRef::Unknown(0x20)]);
    }

    #[test]
    fn exited_process_is_unknown() {
        let mut child = Command::new("true").spawn().expect("failed to run `true`");
        let pid = child.id();
        assert!(child.wait().unwrap().success());
        let addr = probe_address();
        let mut normalizer = Normalizer::new();

        let refs = normalizer.normalize_user(pid, &[addr, 0x1000]);

        assert_eq!(
            refs,
            vec![FrameRef::Unknown(addr), FrameRef::Unknown(0x1000)]
        );
    }

    #[test]
    fn pid_zero_is_unknown() {
        let addr = probe_address();

        let refs = Normalizer::new().normalize_user(0, &[addr]);

        assert_eq!(refs, vec![FrameRef::Unknown(addr)]);
    }

    #[test]
    fn kernel_address_symbolizes_from_kallsyms() {
        let kallsyms = fs::read_to_string("/proc/kallsyms").expect("failed to read /proc/kallsyms");
        let addr = kallsyms
            .lines()
            .find_map(|line| {
                let mut fields = line.split_whitespace();
                let addr = fields.next()?;
                let kind = fields.next()?;
                let name = fields.next()?;
                (name == "schedule" && kind.eq_ignore_ascii_case("t"))
                    .then(|| u64::from_str_radix(addr, 16).ok())?
            })
            .expect("`schedule` is missing from /proc/kallsyms");
        if addr == 0 {
            eprintln!(
                "skipped: /proc/kallsyms hides addresses (kernel.kptr_restrict, or not root)"
            );
            return;
        }
        let mut symbolizer = Symbolizer::new();

        let frames = symbolizer.symbolize(&[FrameRef::Kernel(addr), FrameRef::Kernel(addr + 1)]);

        assert_eq!(frames.len(), 2, "{frames:?}");
        assert_eq!(frames[0].name, "schedule");
        assert_eq!(frames[1].name, "schedule");
        assert_eq!(frames[0].module, KERNEL_MODULE);
    }

    #[test]
    fn unsymbolized_frames_keep_stack_length() {
        let refs = [
            FrameRef::Unknown(0x7f00_dead_beef),
            FrameRef::User(UserFrameRef {
                path: "/nonexistent/libmissing.so.1".to_owned(),
                file_offset: 0x1234,
            }),
        ];

        let frames = Symbolizer::new().symbolize(&refs);

        assert_eq!(
            frames,
            vec![
                frame(UNKNOWN_NAME, "0x7f00deadbeef"),
                frame(UNKNOWN_NAME, "libmissing.so.1"),
            ]
        );
    }

    #[test]
    fn frame_ref_round_trips_json() {
        let refs = vec![
            FrameRef::User(UserFrameRef {
                path: "/usr/lib/libc.so.6".to_owned(),
                file_offset: 0x2a1ca,
            }),
            FrameRef::Kernel(0xffff_ffff_8100_0000),
            FrameRef::Unknown(7),
        ];

        let json = serde_json::to_string(&refs).unwrap();
        let parsed: Vec<FrameRef> = serde_json::from_str(&json).unwrap();

        assert_eq!(parsed, refs);
    }

    #[test]
    fn stack_truncated_checks_outermost() {
        let cases: &[(&[&str], bool)] = &[
            (
                &[
                    "handler",
                    "main",
                    "__libc_start_call_main",
                    "__libc_start_main",
                    "_start",
                ],
                false,
            ),
            (&["handler", "worker", "start_thread", "clone3"], false),
            (&["handler", "start_thread", "__clone"], false),
            (&["handler", "main", "__libc_start_main@@GLIBC_2.34"], false),
            (&["handler", "main"], true),
            (&["handler", UNKNOWN_NAME], true),
            (&[], true),
        ];
        for (names, expected) in cases {
            let frames: Vec<Frame> = names.iter().map(|name| frame(name, "app")).collect();
            assert_eq!(stack_truncated(&frames), *expected, "{names:?}");
        }
    }
}
