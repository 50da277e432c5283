//! Bounded fuzzing of the capture reader. A capture written by `CaptureWriter` is damaged
//! in thousands of ways (bit flips, cuts, bad tags and lengths, garbled JSON, inserted and
//! removed bytes) with a fixed-seed generator, and each version goes through
//! `read_capture`. The reader must never panic. While the header is intact it must
//! accept the file and return every record that lies wholly before the first damaged
//! byte, and a file cut at a frame boundary must read back to that boundary exactly.
//!
//! The cargo-fuzz target in `fuzz/` runs the same reader on unbounded input.

use std::{
    fmt::Write as _,
    panic::{self, AssertUnwindSafe},
    path::{Path, PathBuf},
};

use stalltrace::{
    aggregator::{Record, StallStacks, WeightedStack},
    capture::{read_capture, Capture, CaptureHeader, CaptureWriter, HostInfo},
    locks::{HolderSource, HolderState, LockWait},
    stacks::{FrameRef, UserFrameRef},
};
use tracer_common::{record_kind, LoopThread, StallRecord};

/// Mutated captures per run. Each is a small file, so the whole test takes seconds.
const CASES: usize = 12_000;
/// Fixed seed, so a failure repeats on every run.
const SEED: u64 = 0x5EED_CAFE_F00D_0001;
/// Bytes before the first frame that the reader needs: magic, version and header length.
const PREAMBLE: usize = 16;

/// xorshift64* (Vigna, "An experimental exploration of Marsaglia's xorshift generators").
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Returns a number in `0..bound`, or 0 when `bound` is 0.
    fn below(&mut self, bound: usize) -> usize {
        if bound == 0 {
            0
        } else {
            (self.next_u64() % bound as u64) as usize
        }
    }

    fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }

    /// Returns `min_len + below(extra_len)` random bytes.
    fn bytes(&mut self, min_len: usize, extra_len: usize) -> Vec<u8> {
        let count = min_len + self.below(extra_len);
        (0..count).map(|_| self.byte()).collect()
    }
}

fn thread_state(tid: u32, start_ns: u64) -> LoopThread {
    let mut thread = LoopThread::new(100, tid, start_ns);
    thread.begin_iteration(start_ns);
    thread.accrue(start_ns + 5_000_000);
    thread
}

fn user_frame(offset: u64) -> FrameRef {
    FrameRef::User(UserFrameRef {
        path: "/usr/lib/x86_64-linux-gnu/libc.so.6".to_owned(),
        file_offset: offset,
    })
}

fn lock_wait(tid: u32, holder: u32) -> LockWait {
    LockWait {
        pid: 100,
        tid,
        comm: format!("worker-{tid}"),
        futex: "100:0x7f00001000".to_owned(),
        uaddr: 0x7f00_0000_1000,
        since_ns: 1_000,
        op: "FUTEX_WAIT_PRIVATE".to_owned(),
        lock: true,
        holder: Some(holder),
        holder_pid: Some(100),
        holder_source: HolderSource::Exact,
        holder_evidence: Some("owner field of glibc's pthread_mutex_t".to_owned()),
        holder_state: Some(HolderState::BlockedInSyscall {
            syscall: "clock_nanosleep".to_owned(),
        }),
        stack: vec![user_frame(0x9_1234), FrameRef::Unknown(0x7fff_0000_0010)],
    }
}

/// Returns records of every kind that a capture can hold, several of each.
fn sample_records() -> Vec<Record> {
    let mut records = Vec::new();
    for round in 0..4u32 {
        let start_ns = 1_000_000 * u64::from(round + 1);
        let thread = thread_state(200 + round, start_ns);
        records.push(Record::Snapshot {
            now_ns: start_ns + 1_000,
            thread,
        });
        records.push(Record::Stall(StallRecord {
            kind: if round % 2 == 0 {
                record_kind::STALL_END
            } else {
                record_kind::THREAD_EXIT
            },
            _pad: 0,
            end_ns: start_ns + 5_000_000,
            thread,
        }));
        records.push(Record::StallStacks(StallStacks {
            tid: 200 + round,
            iteration: thread.iteration,
            off_cpu: vec![WeightedStack {
                weight: 4_000_000,
                kernel: vec![FrameRef::Kernel(0xffff_ffff_8100_0000 + u64::from(round))],
                user: vec![user_frame(0x1000), user_frame(0x2000)],
            }],
            samples: vec![WeightedStack {
                weight: 3,
                kernel: Vec::new(),
                user: vec![FrameRef::Unknown(0x5555_0000_0000)],
            }],
        }));
        records.push(Record::LockWaits {
            now_ns: start_ns + 2_000,
            waits: vec![lock_wait(300, 301), lock_wait(301, 300)],
        });
        records.push(Record::HostSteal {
            now_ns: start_ns + 3_000,
            kernel_ns: vec![10; round as usize + 1],
            proc_stat_ns: vec![20; round as usize + 1],
        });
        records.push(Record::Tick {
            now_ns: start_ns + 4_000,
            drops: u64::from(round),
            untracked_threads: 0,
        });
    }
    records
}

/// A capture file and where its frames lie.
struct Sample {
    bytes: Vec<u8>,
    /// Offset of the first frame: the preamble plus the header JSON.
    header_end: usize,
    /// Start and end offset of each frame, in file order.
    frames: Vec<(usize, usize)>,
    records: Vec<Record>,
}

fn write_sample(path: &Path) -> Sample {
    let host = HostInfo {
        virtualization: "kvm".to_owned(),
        steal_source: "rq->prev_steal_time".to_owned(),
    };
    let header = CaptureHeader::new(1_400_000, "6.18.0".to_owned(), vec![100, 101], host);
    let records = sample_records();
    let mut writer = CaptureWriter::create(path, &header).expect("failed to create the sample capture");
    for record in &records {
        writer.write(record).expect("failed to write a sample record");
    }
    writer.flush().expect("failed to flush the sample capture");
    drop(writer);

    let bytes = std::fs::read(path).expect("failed to read the sample capture back");
    let header_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let header_end = PREAMBLE + header_len;
    let mut frames = Vec::new();
    let mut offset = header_end;
    while offset < bytes.len() {
        let len = u32::from_le_bytes(bytes[offset + 1..offset + 5].try_into().unwrap()) as usize;
        frames.push((offset, offset + 5 + len));
        offset += 5 + len;
    }
    assert_eq!(offset, bytes.len(), "the sample's frames do not cover the file");
    assert_eq!(frames.len(), records.len(), "the sample has one frame per record");
    Sample {
        bytes,
        header_end,
        frames,
        records,
    }
}

/// One way to damage a capture, applied to a copy of the sample.
#[derive(Debug)]
enum Mutation {
    FlipBits { positions: Vec<usize> },
    SetByte { position: usize, value: u8 },
    Truncate { len: usize },
    FrameLength { frame: usize, len: u32 },
    FrameTag { frame: usize, tag: u8 },
    Insert { position: usize, bytes: Vec<u8> },
    Remove { position: usize, count: usize },
    DuplicateFrame { frame: usize, at: usize },
    /// Replaces a frame's payload with other bytes and fixes its length field to match.
    ReplacePayload { frame: usize, payload: Vec<u8> },
    AppendJunk { bytes: Vec<u8> },
    HeaderLength { len: u32 },
}

/// Pieces that garbled JSON payloads are made of, so some mutations parse as JSON
/// with unexpected types and some nest deeply.
const JSON_PIECES: &[&str] = &[
    "{", "}", "[", "]", ",", ":", "\"tid\"", "\"iteration\"", "\"off_cpu\"", "\"samples\"", "\"weight\"",
    "\"kernel\"", "\"user\"", "\"User\"", "\"Kernel\"", "\"Unknown\"", "\"now_ns\"", "\"waits\"", "0", "-1",
    "18446744073709551616", "1e400", "null", "true", "\"\\ud800\"", "\"x\"", "[[[[[[[[", "]]]]]]]]",
];

fn garbled_json(rng: &mut Rng) -> Vec<u8> {
    let mut text = String::new();
    for _ in 0..rng.below(40) {
        text.push_str(JSON_PIECES[rng.below(JSON_PIECES.len())]);
    }
    if rng.below(8) == 0 {
        // Nesting past serde_json's recursion limit must be an error, not a stack overflow.
        text.push_str(&"[".repeat(10_000));
    }
    text.into_bytes()
}

fn choose_mutation(rng: &mut Rng, sample: &Sample) -> Mutation {
    let len = sample.bytes.len();
    let frame = rng.below(sample.frames.len());
    match rng.below(11) {
        0 => Mutation::FlipBits {
            positions: (0..1 + rng.below(8)).map(|_| rng.below(len * 8)).collect(),
        },
        1 => Mutation::SetByte {
            position: rng.below(len),
            value: [0, 0xff, 0x7f, 0x80, rng.byte()][rng.below(5)],
        },
        2 => Mutation::Truncate { len: rng.below(len) },
        3 => {
            let (start, end) = sample.frames[frame];
            let real = (end - start - 5) as u32;
            let len = [
                0,
                1,
                real.wrapping_sub(1),
                real + 1,
                real * 2,
                u32::MAX,
                0x7fff_ffff,
                rng.next_u64() as u32,
            ][rng.below(8)];
            Mutation::FrameLength { frame, len }
        }
        4 => Mutation::FrameTag { frame, tag: rng.byte() },
        5 => Mutation::Insert {
            position: rng.below(len + 1),
            bytes: rng.bytes(1, 64),
        },
        6 => Mutation::Remove {
            position: rng.below(len),
            count: 1 + rng.below(64),
        },
        7 => Mutation::DuplicateFrame {
            frame,
            at: sample.frames[rng.below(sample.frames.len())].0,
        },
        8 => {
            let payload = if rng.below(2) == 0 {
                garbled_json(rng)
            } else {
                rng.bytes(0, 200)
            };
            Mutation::ReplacePayload { frame, payload }
        }
        9 => Mutation::AppendJunk {
            bytes: rng.bytes(1, 64),
        },
        _ => Mutation::HeaderLength {
            len: [0, 1, u32::MAX, 1 << 20, (1 << 20) + 1, rng.next_u64() as u32][rng.below(6)],
        },
    }
}

fn apply(mutation: &Mutation, sample: &Sample) -> Vec<u8> {
    let mut bytes = sample.bytes.clone();
    match mutation {
        Mutation::FlipBits { positions } => {
            for &bit in positions {
                bytes[bit / 8] ^= 1 << (bit % 8);
            }
        }
        Mutation::SetByte { position, value } => bytes[*position] = *value,
        Mutation::Truncate { len } => bytes.truncate(*len),
        Mutation::FrameLength { frame, len } => {
            let start = sample.frames[*frame].0;
            bytes[start + 1..start + 5].copy_from_slice(&len.to_le_bytes());
        }
        Mutation::FrameTag { frame, tag } => bytes[sample.frames[*frame].0] = *tag,
        Mutation::Insert { position, bytes: inserted } => {
            bytes.splice(*position..*position, inserted.iter().copied());
        }
        Mutation::Remove { position, count } => {
            let end = (*position + *count).min(bytes.len());
            bytes.drain(*position..end);
        }
        Mutation::DuplicateFrame { frame, at } => {
            let (start, end) = sample.frames[*frame];
            let copy = sample.bytes[start..end].to_vec();
            bytes.splice(*at..*at, copy);
        }
        Mutation::ReplacePayload { frame, payload } => {
            let (start, end) = sample.frames[*frame];
            let mut replacement = vec![sample.bytes[start]];
            replacement.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            replacement.extend_from_slice(payload);
            bytes.splice(start..end, replacement);
        }
        Mutation::AppendJunk { bytes: junk } => bytes.extend_from_slice(junk),
        Mutation::HeaderLength { len } => bytes[12..16].copy_from_slice(&len.to_le_bytes()),
    }
    bytes
}

/// Writes `bytes` to `path` and reads it back, turning a panic into an error message.
fn read_catching_panics(path: &Path, bytes: &[u8]) -> Result<anyhow::Result<Capture>, String> {
    std::fs::write(path, bytes).expect("failed to write a mutated capture");
    panic::catch_unwind(AssertUnwindSafe(|| read_capture(path))).map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|text| (*text).to_owned()))
            .unwrap_or_else(|| "a panic without a message".to_owned())
    })
}

/// Keeps an input that broke the reader where a person can find it after the run.
fn keep_failing_input(bytes: &[u8], case: usize) -> PathBuf {
    let path = std::env::temp_dir().join(format!("stalltrace-capture-fuzz-case-{case}.bin"));
    std::fs::write(&path, bytes).expect("failed to keep the failing input");
    path
}

/// Returns the problems of one reading of a mutated capture, or an empty string.
/// `single` is the mutation when it was the only one, which enables its exact checks.
fn check_case(sample: &Sample, mutated: &[u8], single: Option<&Mutation>, result: anyhow::Result<Capture>) -> String {
    let mut problems = String::new();
    let first_difference = sample
        .bytes
        .iter()
        .zip(mutated)
        .position(|(original, changed)| original != changed)
        .unwrap_or(sample.bytes.len().min(mutated.len()));
    let header_intact = first_difference >= sample.header_end;

    let capture = match result {
        Ok(capture) => capture,
        Err(error) => {
            if header_intact {
                let _ = writeln!(problems, "rejected a file whose header is intact: {error:#}");
            }
            return problems;
        }
    };

    if let Some(stop) = &capture.stopped {
        if stop.offset as usize >= mutated.len() {
            let _ = writeln!(problems, "stopped at byte {}, past the end ({} bytes)", stop.offset, mutated.len());
        }
        if header_intact && (stop.offset as usize) < sample.header_end {
            let _ = writeln!(problems, "stopped at byte {}, inside the header", stop.offset);
        }
    }

    if header_intact {
        // Every frame that ends before the damage must come back unchanged.
        let intact = sample.frames.iter().take_while(|&&(_, end)| end <= first_difference).count();
        if capture.records.len() < intact {
            let _ = writeln!(
                problems,
                "returned {} records, but the first {intact} frames are undamaged",
                capture.records.len()
            );
        }
        for (index, (read, written)) in capture.records.iter().zip(&sample.records).take(intact).enumerate() {
            if format!("{read:?}") != format!("{written:?}") {
                let _ = writeln!(problems, "undamaged record {index} reads back as {read:?}");
            }
        }
    }

    if let Some(Mutation::Truncate { len }) = single {
        if *len >= sample.header_end {
            let whole = sample.frames.iter().filter(|&&(_, end)| end <= *len).count();
            let at_boundary = *len == sample.header_end || sample.frames.iter().any(|&(_, end)| end == *len);
            if capture.records.len() != whole {
                let _ = writeln!(problems, "a cut at byte {len} kept {} records, expected {whole}", capture.records.len());
            }
            match (&capture.stopped, at_boundary) {
                (None, false) => {
                    let _ = writeln!(problems, "a cut inside a frame at byte {len} is not reported in `stopped`");
                }
                (Some(stop), true) => {
                    let _ = writeln!(problems, "a cut at the frame boundary {len} is reported as {stop:?}");
                }
                (Some(stop), false) => {
                    let cut_frame = sample.frames[whole].0 as u64;
                    if stop.offset != cut_frame {
                        let _ = writeln!(problems, "the cut frame starts at {cut_frame}, `stopped` says {}", stop.offset);
                    }
                }
                (None, true) => {}
            }
        }
    }
    problems
}

#[test]
fn mutated_captures_never_panic() {
    let dir = tempfile::tempdir().expect("failed to create a temporary folder");
    let sample = write_sample(&dir.path().join("sample"));
    let path = dir.path().join("mutated");

    // The unmodified sample reads back whole, so the checks below compare against a good baseline.
    let baseline = read_capture(&dir.path().join("sample")).expect("the sample capture is valid");
    assert_eq!(baseline.stopped, None, "the sample capture reads with a stop");
    assert_eq!(format!("{:?}", baseline.records), format!("{:?}", sample.records), "the sample does not round-trip");

    let mut rng = Rng(SEED);
    let mut failures = Vec::new();
    let mut rejected = 0;
    let mut stopped = 0;
    for case in 0..CASES {
        let first = choose_mutation(&mut rng, &sample);
        let mut mutated = apply(&first, &sample);
        let mut mutations = vec![first];
        // One case in three damages the damaged file once more. The frame table of the
        // original still marks valid positions for that, as long as the frames fit.
        if rng.below(3) == 0 {
            let current = Sample {
                frames: sample.frames.iter().copied().filter(|&(_, end)| end <= mutated.len()).collect(),
                bytes: mutated.clone(),
                header_end: sample.header_end,
                records: Vec::new(),
            };
            if !current.frames.is_empty() {
                let second = choose_mutation(&mut rng, &current);
                mutated = apply(&second, &current);
                mutations.push(second);
            }
        }
        // The checks tied to one kind of damage hold only when it is the only damage.
        let single = (mutations.len() == 1).then(|| &mutations[0]);

        match read_catching_panics(&path, &mutated) {
            Err(message) => {
                let kept = keep_failing_input(&mutated, case);
                failures.push(format!("case {case}: read_capture panicked ({message}) on {mutations:?}; input kept in {}", kept.display()));
            }
            Ok(result) => {
                match &result {
                    Err(_) => rejected += 1,
                    Ok(capture) if capture.stopped.is_some() => stopped += 1,
                    Ok(_) => {}
                }
                let problems = check_case(&sample, &mutated, single, result);
                if !problems.is_empty() {
                    let kept = keep_failing_input(&mutated, case);
                    failures.push(format!("case {case}: {mutations:?}: {problems}input kept in {}", kept.display()));
                }
            }
        }
        if failures.len() >= 10 {
            break;
        }
    }
    eprintln!("{CASES} mutated captures: {rejected} rejected, {stopped} read up to a stop");
    assert!(failures.is_empty(), "{} failing cases:\n{}", failures.len(), failures.join("\n"));
    // A run in which no case reached the frame parser, or none was rejected, would test little.
    assert!(stopped > CASES / 10, "only {stopped} of {CASES} cases stopped inside the frames");
    assert!(rejected > 0, "no case was rejected, so the header checks never ran");
}
