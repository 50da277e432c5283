//! Capture files: the aggregator's input records, saved for `analyze`.
//!
//! Layout (little-endian, as the BPF records are):
//!
//! | bytes | content |
//! |---|---|
//! | 8 | magic `STALLCAP` |
//! | 4 | format version, [`CAPTURE_VERSION`] |
//! | 4 | length N of the header |
//! | N | header, JSON ([`CaptureHeader`]) |
//! | ... | frames: 1-byte tag, 4-byte payload length, payload |
//!
//! Payloads are the `#[repr(C)]` bytes of `tracer_common` types. The header
//! stores their sizes, so a capture from a build with another layout is
//! rejected instead of misread. A capture cut short (the machine lost power,
//! stalltrace was killed) reads up to its last whole frame.

use std::{
    fs::File,
    io::{self, BufWriter, Read, Write},
    mem::size_of,
    path::Path,
};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use tracer_common::{LoopThread, StallRecord, MAX_CPUS};

use crate::aggregator::Record;

const MAGIC: &[u8; 8] = b"STALLCAP";
/// Version of the capture format written by this build.
pub const CAPTURE_VERSION: u32 = 1;
/// Upper bound on the header length, so a corrupted length cannot ask for gigabytes.
const MAX_HEADER_LEN: u32 = 1 << 20;

const TAG_STALL: u8 = 1;
const TAG_SNAPSHOT: u8 = 2;
const TAG_TICK: u8 = 3;
const TAG_HOST_STEAL: u8 = 4;
/// JSON payload: [`crate::aggregator::StallStacks`].
const TAG_STALL_STACKS: u8 = 5;
/// JSON payload: [`LockWaitsFrame`].
const TAG_LOCK_WAITS: u8 = 6;

/// Payload of a lock-waits frame.
#[derive(Serialize, Deserialize)]
struct LockWaitsFrame {
    now_ns: u64,
    waits: Vec<crate::locks::LockWait>,
}

/// Metadata at the start of a capture.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaptureHeader {
    pub threshold_ns: u64,
    /// Kernel release of the traced host.
    pub kernel_release: String,
    /// Processes in scope, empty for all.
    pub pids: Vec<u32>,
    pub stall_record_size: usize,
    pub loop_thread_size: usize,
    /// Facts about the traced host, for the report.
    #[serde(default)]
    pub host: HostInfo,
}

/// Facts about the traced host that the records do not carry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    /// `kvm`, another hypervisor, `none` for bare metal.
    pub virtualization: String,
    /// Source of the steal figures, or the reason there are none.
    pub steal_source: String,
}

impl CaptureHeader {
    pub fn new(threshold_ns: u64, kernel_release: String, pids: Vec<u32>, host: HostInfo) -> Self {
        Self {
            threshold_ns,
            kernel_release,
            pids,
            stall_record_size: size_of::<StallRecord>(),
            loop_thread_size: size_of::<LoopThread>(),
            host,
        }
    }
}

/// Appends records to a capture file.
pub struct CaptureWriter {
    out: BufWriter<File>,
}

impl CaptureWriter {
    /// Creates the file and writes the header.
    pub fn create(path: &Path, header: &CaptureHeader) -> Result<Self> {
        let file = File::create(path).with_context(|| format!("failed to create {}", path.display()))?;
        let mut out = BufWriter::new(file);
        let json = serde_json::to_vec(header).context("failed to serialize the capture header")?;
        let len = u32::try_from(json.len()).context("capture header too long")?;
        out.write_all(MAGIC)
            .and_then(|()| out.write_all(&CAPTURE_VERSION.to_le_bytes()))
            .and_then(|()| out.write_all(&len.to_le_bytes()))
            .and_then(|()| out.write_all(&json))
            .with_context(|| format!("failed to write {}", path.display()))?;
        Ok(Self { out })
    }

    /// Appends one record.
    pub fn write(&mut self, record: &Record) -> io::Result<()> {
        match record {
            Record::Stall(stall) => self.frame(TAG_STALL, &[pod_bytes(stall)]),
            Record::Snapshot { now_ns, thread } => {
                self.frame(TAG_SNAPSHOT, &[&now_ns.to_le_bytes(), pod_bytes(thread)])
            }
            Record::Tick {
                now_ns,
                drops,
                untracked_threads,
            } => self.frame(
                TAG_TICK,
                &[
                    &now_ns.to_le_bytes(),
                    &drops.to_le_bytes(),
                    &untracked_threads.to_le_bytes(),
                ],
            ),
            Record::HostSteal {
                now_ns,
                kernel_ns,
                proc_stat_ns,
            } => {
                let cpus = kernel_ns.len().max(proc_stat_ns.len());
                let mut payload = Vec::with_capacity(16 + 16 * cpus);
                payload.extend_from_slice(&now_ns.to_le_bytes());
                payload.extend_from_slice(&(cpus as u64).to_le_bytes());
                for values in [kernel_ns, proc_stat_ns] {
                    for cpu in 0..cpus {
                        payload.extend_from_slice(&values.get(cpu).copied().unwrap_or(0).to_le_bytes());
                    }
                }
                self.frame(TAG_HOST_STEAL, &[&payload])
            }
            Record::StallStacks(stacks) => {
                let payload = serde_json::to_vec(stacks).map_err(io::Error::other)?;
                self.frame(TAG_STALL_STACKS, &[&payload])
            }
            Record::LockWaits { now_ns, waits } => {
                let frame = LockWaitsFrame {
                    now_ns: *now_ns,
                    waits: waits.clone(),
                };
                let payload = serde_json::to_vec(&frame).map_err(io::Error::other)?;
                self.frame(TAG_LOCK_WAITS, &[&payload])
            }
        }
    }

    fn frame(&mut self, tag: u8, parts: &[&[u8]]) -> io::Result<()> {
        let len: usize = parts.iter().map(|part| part.len()).sum();
        self.out.write_all(&[tag])?;
        self.out.write_all(&(len as u32).to_le_bytes())?;
        for part in parts {
            self.out.write_all(part)?;
        }
        Ok(())
    }

    /// Pushes buffered records to the file.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// The frame at which reading a capture stopped early.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadStop {
    /// Byte offset of the frame that could not be read.
    pub offset: u64,
    pub reason: String,
}

/// A capture read into memory.
#[derive(Debug)]
pub struct Capture {
    pub header: CaptureHeader,
    pub records: Vec<Record>,
    /// Set when the file ended in a partial or corrupted frame. `records` contains every whole frame before it.
    pub stopped: Option<ReadStop>,
}

/// Reads a capture file. A foreign file or an unsupported version is an error.
/// A cut or corrupted tail is not: the records before it are returned with `stopped` set.
pub fn read_capture(path: &Path) -> Result<Capture> {
    let mut file = File::open(path).with_context(|| format!("failed to open capture {}", path.display()))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .with_context(|| format!("failed to read capture {}", path.display()))?;
    parse_capture(&bytes).with_context(|| format!("invalid capture {}", path.display()))
}

fn parse_capture(bytes: &[u8]) -> Result<Capture> {
    let mut cursor = Cursor { bytes, offset: 0 };
    let magic = cursor.take(MAGIC.len());
    if magic != Some(MAGIC.as_slice()) {
        bail!("not a stalltrace capture (the file does not start with `STALLCAP`)");
    }
    let version = cursor.u32().context("file ends inside the capture header")?;
    if version != CAPTURE_VERSION {
        bail!("capture format version {version} is not supported; this stalltrace reads version {CAPTURE_VERSION}");
    }
    let header_len = cursor.u32().context("file ends inside the capture header")?;
    if header_len > MAX_HEADER_LEN {
        bail!("capture header length {header_len} is over the {MAX_HEADER_LEN}-byte limit: the file is corrupted");
    }
    let header_json = cursor
        .take(header_len as usize)
        .context("file ends inside the capture header")?;
    let header: CaptureHeader =
        serde_json::from_slice(header_json).context("capture header is not valid JSON")?;
    if header.stall_record_size != size_of::<StallRecord>() || header.loop_thread_size != size_of::<LoopThread>() {
        bail!(
            "capture was written with another record layout (stall record {} bytes, thread {} bytes; this build uses {} and {}): analyze it with the stalltrace version that recorded it",
            header.stall_record_size,
            header.loop_thread_size,
            size_of::<StallRecord>(),
            size_of::<LoopThread>()
        );
    }

    let mut records = Vec::new();
    let mut stopped = None;
    while cursor.remaining() > 0 {
        let frame_offset = cursor.offset as u64;
        match read_frame(&mut cursor) {
            Ok(record) => records.push(record),
            Err(reason) => {
                stopped = Some(ReadStop {
                    offset: frame_offset,
                    reason,
                });
                break;
            }
        }
    }
    Ok(Capture {
        header,
        records,
        stopped,
    })
}

fn read_frame(cursor: &mut Cursor<'_>) -> std::result::Result<Record, String> {
    const CUT: &str = "the file ends inside a record";
    let tag = cursor.take(1).ok_or(CUT)?[0];
    let len = cursor.u32().ok_or(CUT)? as usize;
    let expected = match tag {
        TAG_STALL => size_of::<StallRecord>(),
        TAG_SNAPSHOT => 8 + size_of::<LoopThread>(),
        TAG_TICK => 24,
        // Two arrays of one u64 per CPU, after the time and the CPU count.
        TAG_HOST_STEAL if len >= 16 && (len - 16) % 16 == 0 && (len - 16) / 16 <= MAX_CPUS as usize => len,
        TAG_HOST_STEAL => return Err(format!("steal record of {len} bytes is invalid: the file is corrupted")),
        TAG_STALL_STACKS | TAG_LOCK_WAITS => len,
        other => return Err(format!("unknown record tag {other}: the file is corrupted")),
    };
    if len != expected {
        return Err(format!("record of tag {tag} is {len} bytes, expected {expected}: the file is corrupted"));
    }
    let payload = cursor.take(len).ok_or(CUT)?;
    let u64_at = |at: usize| u64::from_le_bytes(payload[at..at + 8].try_into().expect("8 bytes"));
    if tag == TAG_STALL_STACKS {
        let stacks = serde_json::from_slice(payload)
            .map_err(|error| format!("stack record is not valid JSON ({error}): the file is corrupted"))?;
        return Ok(Record::StallStacks(stacks));
    }
    if tag == TAG_LOCK_WAITS {
        let frame: LockWaitsFrame = serde_json::from_slice(payload)
            .map_err(|error| format!("lock-wait record is not valid JSON ({error}): the file is corrupted"))?;
        return Ok(Record::LockWaits {
            now_ns: frame.now_ns,
            waits: frame.waits,
        });
    }
    if tag == TAG_HOST_STEAL {
        let cpus = (len - 16) / 16;
        if u64_at(8) != cpus as u64 {
            return Err(format!("steal record says {} CPUs in {len} bytes: the file is corrupted", u64_at(8)));
        }
        let column = |first: usize| (0..cpus).map(|cpu| u64_at(first + cpu * 8)).collect();
        return Ok(Record::HostSteal {
            now_ns: u64_at(0),
            kernel_ns: column(16),
            proc_stat_ns: column(16 + cpus * 8),
        });
    }
    Ok(match tag {
        TAG_STALL => Record::Stall(pod_from_bytes(payload)),
        TAG_SNAPSHOT => Record::Snapshot {
            now_ns: u64_at(0),
            thread: pod_from_bytes(&payload[8..]),
        },
        _ => Record::Tick {
            now_ns: u64_at(0),
            drops: u64_at(8),
            untracked_threads: u64_at(16),
        },
    })
}

struct Cursor<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.offset
    }

    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let slice = self.bytes.get(self.offset..self.offset.checked_add(len)?)?;
        self.offset += len;
        Some(slice)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
}

/// Returns the bytes of a `#[repr(C)]` record type.
fn pod_bytes<T: aya::Pod>(value: &T) -> &[u8] {
    // SAFETY: Pod types are plain integers and arrays with explicit padding, so every byte is initialized.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
}

/// Reads a `#[repr(C)]` record type from bytes of exactly its size.
fn pod_from_bytes<T: aya::Pod>(bytes: &[u8]) -> T {
    assert_eq!(bytes.len(), size_of::<T>(), "caller checks the length");
    // SAFETY: the length matches, any bit pattern is a valid Pod value, and the read is unaligned.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

#[cfg(test)]
mod tests {
    use tracer_common::record_kind;

    use super::*;

    fn sample_records() -> Vec<Record> {
        let mut thread = LoopThread::new(1, 2, 100);
        thread.begin_iteration(100);
        thread.accrue(900);
        vec![
            Record::Snapshot { now_ns: 500, thread },
            Record::Tick {
                now_ns: 600,
                drops: 4,
                untracked_threads: 1,
            },
            Record::Stall(StallRecord {
                kind: record_kind::STALL_END,
                _pad: 0,
                end_ns: 900,
                thread,
            }),
            Record::HostSteal {
                now_ns: 950,
                kernel_ns: vec![5, 0, 7],
                proc_stat_ns: vec![10, 20, 30],
            },
        ]
    }

    fn write_sample(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("capture");
        let host = HostInfo {
            virtualization: "kvm".to_owned(),
            steal_source: "test".to_owned(),
        };
        let header = CaptureHeader::new(50, "6.18".to_owned(), vec![7], host);
        let mut writer = CaptureWriter::create(&path, &header).unwrap();
        for record in sample_records() {
            writer.write(&record).unwrap();
        }
        writer.flush().unwrap();
        path
    }

    fn debug(records: &[Record]) -> String {
        format!("{records:?}")
    }

    #[test]
    fn capture_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_sample(dir.path());

        let capture = read_capture(&path).unwrap();

        assert_eq!(capture.header.threshold_ns, 50);
        assert_eq!(capture.header.pids, vec![7]);
        assert_eq!(capture.header.host.virtualization, "kvm");
        assert_eq!(capture.stopped, None);
        assert_eq!(debug(&capture.records), debug(&sample_records()));
    }

    #[test]
    fn truncated_capture_keeps_whole_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_sample(dir.path());
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();

        let capture = read_capture(&path).unwrap();

        assert_eq!(capture.records.len(), 3);
        let stopped = capture.stopped.expect("the cut is reported");
        assert!(stopped.reason.contains("ends inside a record"), "{stopped:?}");
    }

    #[test]
    fn corrupted_tag_stops_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_sample(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        let first_frame = 16 + u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
        bytes[first_frame] = 99;
        std::fs::write(&path, &bytes).unwrap();

        let capture = read_capture(&path).unwrap();

        assert!(capture.records.is_empty());
        assert_eq!(capture.stopped.unwrap().offset, first_frame as u64);
    }

    #[test]
    fn foreign_file_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("capture");
        std::fs::write(&path, b"\x7fELF not a capture at all").unwrap();

        let error = format!("{:#}", read_capture(&path).unwrap_err());

        assert!(error.contains("not a stalltrace capture"), "{error}");
    }

    #[test]
    fn newer_version_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_sample(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();

        let error = format!("{:#}", read_capture(&path).unwrap_err());

        assert!(error.contains("version 7 is not supported"), "{error}");
    }

    #[test]
    fn empty_file_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("capture");
        std::fs::write(&path, b"").unwrap();

        assert!(read_capture(&path).is_err());
    }
}
