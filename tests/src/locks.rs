//! Harness for the lock scenarios: the `lock-workload` protocol, control of its processes,
//! `stalltrace record` runs over several processes with their live stdout lines, the
//! lock fields of `report.json`, and shared memory files for the cross-process deadlock.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    fs,
    io::{BufRead, BufReader, Read, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        mpsc::{self, Receiver, RecvTimeoutError},
        Arc, Condvar, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::Report;

/// Size of the shared memory file of `lock-workload shm-cycle`.
pub const SHM_FILE_SIZE: u64 = 4096;
/// File offsets of the two process-shared `pthread_mutex_t`s in that file. A mutex's
/// futex word is its first field, so these are also the futex words' offsets.
pub const SHM_MUTEX_OFFSETS: [u64; 2] = [0, 64];
/// File offset of the `AtomicU32` that counts the processes holding their first mutex.
pub const SHM_ARRIVED_OFFSET: u64 = 128;

/// `SYS_futex` on x86_64, as the first field of `/proc/PID/task/TID/syscall`.
pub const SYS_FUTEX: i64 = 202;
/// `SYS_epoll_wait` on x86_64.
pub const SYS_EPOLL_WAIT: i64 = 232;

/// Maximum wait for the workload's start line.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Maximum wait for `stalltrace record` to print `attached`.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed past `--duration` for detaching and writing the report.
const EXIT_GRACE: Duration = Duration::from_secs(30);
/// Time that drop allows after SIGTERM for stalltrace to detach before it is killed.
const TERMINATE_GRACE: Duration = Duration::from_secs(5);

/// First stdout line of `lock-workload`, printed once its threads run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockStart {
    pub pid: u32,
    /// Thread ID of each named thread that the scenario looks at.
    pub threads: BTreeMap<String, u32>,
}

/// A step that a `lock-workload` thread reached, such as `holding` its first lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockEvent {
    /// Name of the thread that printed the line.
    pub thread: String,
    pub event: String,
    /// CLOCK_MONOTONIC nanoseconds when the step was reached.
    pub ns: u64,
    /// A count that belongs to the step, such as contended lock attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

/// Line printed when a command is invalid or failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockFailed {
    pub error: String,
}

/// Any stdout line of `lock-workload`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum LockMessage {
    Start(LockStart),
    Event(LockEvent),
    Failed(LockFailed),
}

/// Running `lock-workload`. Drop kills it with SIGKILL, which also ends a deadlocked process.
pub struct LockWorkload {
    child: Child,
    stdin: Option<ChildStdin>,
    messages: Receiver<Result<LockMessage, String>>,
    /// Events received but not yet returned by `wait_event`.
    backlog: Vec<LockEvent>,
    start: LockStart,
}

impl LockWorkload {
    /// Starts `binary ARGS...` and waits for its start line.
    pub fn start(binary: impl AsRef<Path>, args: &[&str]) -> Self {
        let binary = binary.as_ref();
        eprintln!("running {} {}", binary.display(), args.join(" "));
        let mut child = Command::new(binary)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|error| panic!("failed to start {}: {error}", binary.display()));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout is piped");

        let (sender, messages) = mpsc::channel();
        thread::Builder::new()
            .name("lock-workload-stdout".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { return };
                    eprintln!("lock-workload: {line}");
                    let message = serde_json::from_str::<LockMessage>(&line)
                        .map_err(|error| format!("invalid lock-workload line `{line}`: {error}"));
                    if sender.send(message).is_err() {
                        return;
                    }
                }
            })
            .expect("failed to start the lock-workload stdout reader");

        let mut workload = Self {
            child,
            stdin,
            messages,
            backlog: Vec::new(),
            start: LockStart {
                pid: 0,
                threads: BTreeMap::new(),
            },
        };
        match workload.next_message(START_TIMEOUT) {
            LockMessage::Start(start) => workload.start = start,
            other => panic!("expected the lock-workload start line, got {other:?}"),
        }
        assert_eq!(
            workload.start.pid,
            workload.child.id(),
            "the start line names another process than the one started"
        );
        workload
    }

    pub fn pid(&self) -> u32 {
        self.start.pid
    }

    /// Returns the thread ID of the thread named `name` in the start line.
    pub fn tid(&self, name: &str) -> u32 {
        match self.start.threads.get(name) {
            Some(&tid) => tid,
            None => panic!(
                "the start line names no thread `{name}`; it has {:?}",
                self.start.threads
            ),
        }
    }

    /// Writes one command line to the workload's stdin.
    pub fn send(&mut self, command: &str) {
        let pid = self.child.id();
        let stdin = self.stdin.as_mut().expect("stdin is open until drop");
        stdin
            .write_all(format!("{command}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|error| {
                panic!("failed to write to lock-workload (pid {pid}): {error}")
            });
    }

    /// Returns the first event `event` of thread `thread`, failing after `timeout`. Events
    /// of other threads or kinds stay queued for later calls.
    pub fn wait_event(&mut self, thread: &str, event: &str, timeout: Duration) -> LockEvent {
        let matches =
            |candidate: &LockEvent| candidate.thread == thread && candidate.event == event;
        if let Some(index) = self.backlog.iter().position(matches) {
            return self.backlog.remove(index);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "lock-workload (pid {}) printed no `{event}` event of thread `{thread}` within {timeout:?}; other events: {:?}",
                    self.child.id(),
                    self.backlog
                );
            }
            match self.next_message(left) {
                LockMessage::Event(received) if matches(&received) => return received,
                LockMessage::Event(received) => self.backlog.push(received),
                other => panic!("expected an event line, got {other:?}"),
            }
        }
    }

    /// Returns true while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Returns the number of the syscall that thread `name` is blocked in now, from
    /// `/proc/PID/task/TID/syscall`, or `None` while it runs. This reads the kernel's
    /// view directly, independently of stalltrace.
    pub fn current_syscall(&self, name: &str) -> Option<i64> {
        let tid = self.tid(name);
        let path = format!("/proc/{}/task/{tid}/syscall", self.pid());
        let text = fs::read_to_string(&path)
            .unwrap_or_else(|error| panic!("failed to read {path}: {error}"));
        text.split_whitespace()
            .next()
            .and_then(|field| field.parse::<i64>().ok())
    }

    /// Reads `current_syscall` of thread `name` `count` times, `interval` apart.
    pub fn sample_syscalls(
        &self,
        name: &str,
        count: usize,
        interval: Duration,
    ) -> Vec<Option<i64>> {
        let mut samples = Vec::with_capacity(count);
        for index in 0..count {
            if index > 0 {
                thread::sleep(interval);
            }
            samples.push(self.current_syscall(name));
        }
        samples
    }

    /// Asserts that thread `name` is blocked in the futex syscall now (see `current_syscall`).
    pub fn assert_blocked_in_futex(&self, name: &str) {
        let syscall = self.current_syscall(name);
        assert_eq!(
            syscall,
            Some(SYS_FUTEX),
            "thread `{name}` (tid {}) is not blocked in futex ({SYS_FUTEX}) but in {syscall:?} (None: running)",
            self.tid(name)
        );
    }

    fn next_message(&mut self, timeout: Duration) -> LockMessage {
        match self.messages.recv_timeout(timeout) {
            Ok(Ok(LockMessage::Failed(failed))) => {
                panic!(
                    "lock-workload (pid {}) failed: {}",
                    self.child.id(),
                    failed.error
                )
            }
            Ok(Ok(message)) => message,
            Ok(Err(error)) => panic!("{error}"),
            Err(RecvTimeoutError::Timeout) => panic!(
                "lock-workload (pid {}) printed nothing within {timeout:?}",
                self.child.id()
            ),
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.wait();
                panic!("lock-workload closed its stdout and exited with {status:?}")
            }
        }
    }
}

impl Drop for LockWorkload {
    fn drop(&mut self) {
        self.stdin = None;
        crate::kill_and_reap(&mut self.child);
    }
}

/// One stdout line of stalltrace with the CLOCK_MONOTONIC time at which the test read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLine {
    pub read_ns: u64,
    pub text: String,
}

/// Stdout lines so far, and a condition variable signalled on each new line.
type SharedLines = Arc<(Mutex<Vec<OutputLine>>, Condvar)>;

/// Running `stalltrace record` over one or more processes. Unlike [`crate::Recording`],
/// it keeps stalltrace's stdout lines for the test to wait on while tracing goes on.
/// Drop stops a process that is still running.
pub struct LockRecording {
    child: Child,
    out_dir: PathBuf,
    duration: Duration,
    attached_ns: u64,
    stdout: SharedLines,
    /// Lines of stdout and stderr so far, each with a prefix that names the stream.
    output: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

/// What a finished `stalltrace record` left behind.
pub struct LockRun {
    pub report: Report,
    pub locks: LockReport,
    pub stdout: Vec<OutputLine>,
    /// CLOCK_MONOTONIC nanoseconds when the test saw stalltrace exit.
    pub exited_ns: u64,
}

impl LockRecording {
    /// Starts `stalltrace record --duration DURATION -o OUT_DIR --pid PID... [--threshold THRESHOLD]`
    /// and returns once it prints a stderr line that contains `attached`.
    pub fn start(
        binary: &Path,
        pids: &[u32],
        duration: Duration,
        threshold: Option<&str>,
        out_dir: &Path,
    ) -> Self {
        assert!(!pids.is_empty(), "record needs at least one --pid");
        let mut args: Vec<OsString> = vec![
            "record".into(),
            "--duration".into(),
            format!("{}ms", duration.as_millis()).into(),
            "-o".into(),
            out_dir.into(),
        ];
        for pid in pids {
            args.push("--pid".into());
            args.push(pid.to_string().into());
        }
        if let Some(threshold) = threshold {
            args.push("--threshold".into());
            args.push(threshold.into());
        }

        let command_line: Vec<String> = args
            .iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();
        eprintln!("running {} {}", binary.display(), command_line.join(" "));
        let mut child = Command::new(binary)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("failed to start {}: {error}", binary.display()));

        let output = Arc::new(Mutex::new(String::new()));
        let stdout_lines: SharedLines = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let (attached_sender, attached) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let readers = vec![
            read_lines(
                stdout,
                "stalltrace stdout",
                Arc::clone(&output),
                LineSink::Stdout(Arc::clone(&stdout_lines)),
            ),
            read_lines(
                stderr,
                "stalltrace",
                Arc::clone(&output),
                LineSink::Attached(Some(attached_sender)),
            ),
        ];

        let mut recording = Self {
            child,
            out_dir: out_dir.to_path_buf(),
            duration,
            attached_ns: 0,
            stdout: stdout_lines,
            output,
            readers,
        };
        match attached.recv_timeout(ATTACH_TIMEOUT) {
            Ok(()) => {
                recording.attached_ns = crate::monotonic_ns();
                recording
            }
            Err(RecvTimeoutError::Timeout) => {
                crate::kill_and_reap(&mut recording.child);
                panic!(
                    "stalltrace record printed no `attached` line within {ATTACH_TIMEOUT:?}; output:\n{}",
                    recording.output_text()
                );
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = recording.child.wait();
                recording.join_readers();
                panic!(
                    "stalltrace record exited with {status:?} before printing `attached`; output:\n{}",
                    recording.output_text()
                );
            }
        }
    }

    /// Returns CLOCK_MONOTONIC nanoseconds shortly after stalltrace printed `attached`.
    pub fn attached_ns(&self) -> u64 {
        self.attached_ns
    }

    /// Waits up to `timeout` for a stdout line that starts with `prefix`, and returns the
    /// first one, including lines printed before the call.
    pub fn wait_for_stdout(&self, prefix: &str, timeout: Duration) -> Option<OutputLine> {
        let deadline = Instant::now() + timeout;
        let (lines, signal) = &*self.stdout;
        let mut lines = lines
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        loop {
            if let Some(line) = lines.iter().find(|line| line.text.starts_with(prefix)) {
                return Some(line.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            lines = signal
                .wait_timeout(lines, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    /// Waits until stalltrace exits by itself after `--duration`, checks that it succeeded
    /// and returns the parsed `report.json` with its stdout lines.
    pub fn finish(mut self) -> LockRun {
        let timeout = self.duration + EXIT_GRACE;
        let Some(status) = crate::wait_with_timeout(&mut self.child, timeout) else {
            crate::kill_and_reap(&mut self.child);
            panic!(
                "stalltrace record did not exit within {timeout:?} (--duration plus {EXIT_GRACE:?}); output:\n{}",
                self.output_text()
            );
        };
        let exited_ns = crate::monotonic_ns();
        self.join_readers();
        assert!(
            status.success(),
            "stalltrace record exited with {status}; output:\n{}",
            self.output_text()
        );
        let path = self.out_dir.join("report.json");
        let report = Report::load(&path);
        let locks = LockReport::load(&path);
        let stdout = self
            .stdout
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        LockRun {
            report,
            locks,
            stdout,
            exited_ns,
        }
    }

    fn join_readers(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }

    fn output_text(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

impl Drop for LockRecording {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            crate::signal_child(&self.child, libc::SIGTERM);
            if crate::wait_with_timeout(&mut self.child, TERMINATE_GRACE).is_none() {
                crate::kill_and_reap(&mut self.child);
            }
        }
        self.join_readers();
    }
}

/// Where a reader thread sends the lines it reads, besides the shared copy.
enum LineSink {
    /// Keep every line with its read time and wake the waiters.
    Stdout(SharedLines),
    /// Signal the first line that contains `attached`.
    Attached(Option<mpsc::Sender<()>>),
}

/// Starts a thread that copies each line of `pipe` to the test output and to `copy`,
/// with `prefix`, and passes it to `sink`.
fn read_lines(
    pipe: impl Read + Send + 'static,
    prefix: &'static str,
    copy: Arc<Mutex<String>>,
    mut sink: LineSink,
) -> JoinHandle<()> {
    thread::Builder::new()
        .name(format!("{prefix} reader"))
        .spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { return };
                let read_ns = crate::monotonic_ns();
                eprintln!("{prefix}: {line}");
                {
                    let mut copy = copy.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    copy.push_str(prefix);
                    copy.push_str(": ");
                    copy.push_str(&line);
                    copy.push('\n');
                }
                match &mut sink {
                    LineSink::Stdout(shared) => {
                        let (lines, signal) = &**shared;
                        lines
                            .lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                            .push(OutputLine {
                                read_ns,
                                text: line,
                            });
                        signal.notify_all();
                    }
                    LineSink::Attached(sender) => {
                        if line.contains("attached") {
                            if let Some(sender) = sender.take() {
                                let _ = sender.send(());
                            }
                        }
                    }
                }
            }
        })
        .expect("failed to start a stalltrace output reader")
}

/// The lock fields of `report.json`: futex waits at the last scan, wait-for cycles, and
/// the stacks of stalls. Print [`Report`] for the whole file in assert messages.
#[derive(Debug, Clone, Deserialize)]
pub struct LockReport {
    pub futex_waits: Vec<FutexWait>,
    pub cycles: Vec<Cycle>,
    pub stalls: Vec<StallStack>,
}

/// A thread blocked in a futex wait at the last scan.
#[derive(Debug, Clone, Deserialize)]
pub struct FutexWait {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    /// `PID:0xADDR` for private memory, `shared:DEV:INODE:0xOFFSET` for a shared mapping.
    pub futex: String,
    pub uaddr: u64,
    pub since_ns: u64,
    pub op: String,
    /// True when the wait looks like a lock acquisition.
    pub lock: bool,
    pub holder: Option<u32>,
    pub holder_pid: Option<u32>,
    /// `exact`, `inferred` or `unknown`.
    pub holder_source: String,
    pub holder_evidence: Option<String>,
    pub holder_state: Option<HolderState>,
    pub stack: Vec<Frame>,
}

/// What a lock holder was doing at the last scan.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct HolderState {
    /// `idle_in_loop`, `blocked_in_syscall`, `waiting_on_futex`, `running` or `exited`.
    pub state: String,
    /// The syscall name when `state` is `blocked_in_syscall`.
    #[serde(default)]
    pub syscall: Option<String>,
}

/// One symbolized user stack frame.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Frame {
    pub name: Option<String>,
    pub module: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    #[serde(default)]
    pub inlined: bool,
}

/// A circular wait found while tracing.
#[derive(Debug, Clone, Deserialize)]
pub struct Cycle {
    pub tids: Vec<u32>,
    pub futexes: Vec<String>,
    pub edges: Vec<CycleEdge>,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    pub ongoing: bool,
}

/// One wait of a cycle: `waiter` waits on `futex`, which `holder` holds.
#[derive(Debug, Clone, Deserialize)]
pub struct CycleEdge {
    pub waiter: u32,
    pub waiter_pid: u32,
    pub futex: String,
    pub holder: u32,
    pub holder_source: String,
    pub waited_ns: u64,
}

/// The fields of a stall that the lock scenarios read, with its stack.
#[derive(Debug, Clone, Deserialize)]
pub struct StallStack {
    pub pid: u32,
    pub tid: u32,
    pub start_ns: u64,
    pub ongoing: bool,
    pub verdict: String,
    /// The symbolized stack that owns most of the stall's time, innermost first.
    pub stack: Option<Vec<Frame>>,
}

impl LockReport {
    /// Reads the lock fields of a report file.
    ///
    /// # Panics
    ///
    /// Panics when the file is missing or has no `futex_waits` or `cycles`, as in
    /// versions of stalltrace without lock reporting.
    pub fn load(path: &Path) -> Self {
        let text = fs::read_to_string(path)
            .unwrap_or_else(|error| panic!("failed to read {}: {error}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|error| {
            panic!(
                "{} lacks the lock fields (futex_waits, cycles, stall stacks) or they do not match the format: {error}\n{text}",
                path.display()
            )
        })
    }

    /// Returns the futex waits of thread `tid`.
    pub fn waits_of(&self, tid: u32) -> Vec<&FutexWait> {
        self.futex_waits
            .iter()
            .filter(|wait| wait.tid == tid)
            .collect()
    }

    /// Returns the stalls of thread `tid` that were still going on when tracing stopped.
    pub fn ongoing_stalls_of(&self, tid: u32) -> Vec<&StallStack> {
        self.stalls
            .iter()
            .filter(|stall| stall.tid == tid && stall.ongoing)
            .collect()
    }
}

/// Returns true if a frame of `stack` has a name that contains `function`.
pub fn stack_has_function(stack: &[Frame], function: &str) -> bool {
    stack.iter().any(|frame| {
        frame
            .name
            .as_deref()
            .is_some_and(|name| name.contains(function))
    })
}

/// Formats a stack as one frame name a line, for assert messages.
pub fn format_stack(stack: &[Frame]) -> String {
    let lines: Vec<String> = stack
        .iter()
        .map(|frame| {
            format!(
                "  {} ({})",
                frame.name.as_deref().unwrap_or("?"),
                frame.module.as_deref().unwrap_or("?")
            )
        })
        .collect();
    lines.join("\n")
}

/// File under `/dev/shm` of `SHM_FILE_SIZE` zero bytes for `lock-workload shm-cycle`,
/// removed on drop.
pub struct ShmFile {
    path: PathBuf,
}

impl ShmFile {
    pub fn create(test: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos())
            .unwrap_or(0);
        let path = PathBuf::from(format!(
            "/dev/shm/stalltrace-{test}-{}-{nanos}",
            std::process::id()
        ));
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap_or_else(|error| panic!("failed to create {}: {error}", path.display()));
        file.set_len(SHM_FILE_SIZE)
            .unwrap_or_else(|error| panic!("failed to size {}: {error}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns the file's inode number, as in `/proc/PID/maps` and stalltrace's futex identity.
    pub fn inode(&self) -> u64 {
        fs::metadata(&self.path)
            .unwrap_or_else(|error| panic!("failed to stat {}: {error}", self.path.display()))
            .ino()
    }
}

impl Drop for ShmFile {
    fn drop(&mut self) {
        if let Err(error) = fs::remove_file(&self.path) {
            eprintln!("failed to remove {}: {error}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_message_parses_each_kind() {
        let start: LockMessage =
            serde_json::from_str(r#"{"pid":10,"threads":{"lock-a":11,"lock-b":12}}"#).unwrap();
        let LockMessage::Start(start) = start else {
            panic!("expected a start line, got {start:?}");
        };
        assert_eq!(start.threads.get("lock-b"), Some(&12));

        let event: LockMessage =
            serde_json::from_str(r#"{"thread":"lock-a","event":"holding","ns":5}"#).unwrap();
        assert_eq!(
            event,
            LockMessage::Event(LockEvent {
                thread: "lock-a".into(),
                event: "holding".into(),
                ns: 5,
                count: None,
            })
        );

        let failed: LockMessage = serde_json::from_str(r#"{"error":"unknown command"}"#).unwrap();
        assert_eq!(
            failed,
            LockMessage::Failed(LockFailed {
                error: "unknown command".into()
            })
        );
    }

    #[test]
    fn lock_report_parses_sample() {
        let text = r#"{
          "version": 1, "threshold_ns": 1, "duration_ns": 1, "drops": 0, "untracked_threads": 0,
          "stalls": [{"pid": 1, "tid": 11, "start_ns": 3, "ongoing": true, "verdict": "lock_cycle",
                      "stack": [{"name": "take_second_lock", "module": "/bin/w", "file": null, "line": null, "inlined": false}]}],
          "futex_waits": [{"pid": 1, "tid": 11, "comm": "lock-a", "futex": "1:0x10", "uaddr": 16,
                           "since_ns": 4, "op": "FUTEX_WAIT_PRIVATE", "lock": true, "holder": 12,
                           "holder_pid": 1, "holder_source": "exact", "holder_evidence": "owner field",
                           "holder_state": {"state": "blocked_in_syscall", "syscall": "clock_nanosleep"},
                           "stack": []}],
          "cycles": [{"tids": [11, 12], "futexes": ["1:0x10", "1:0x40"],
                      "edges": [{"waiter": 11, "waiter_pid": 1, "futex": "1:0x10", "holder": 12,
                                 "holder_source": "exact", "waited_ns": 7}],
                      "first_seen_ns": 5, "last_seen_ns": 6, "ongoing": true}]
        }"#;
        let report: LockReport = serde_json::from_str(text).unwrap();
        assert_eq!(report.waits_of(11).len(), 1);
        assert_eq!(
            report.futex_waits[0]
                .holder_state
                .as_ref()
                .unwrap()
                .syscall
                .as_deref(),
            Some("clock_nanosleep")
        );
        assert_eq!(report.cycles[0].edges[0].holder, 12);
        assert_eq!(report.ongoing_stalls_of(11).len(), 1);
        let stack = report.stalls[0].stack.as_deref().unwrap();
        assert!(stack_has_function(stack, "take_second_lock"));
        assert!(!stack_has_function(stack, "take_first_lock"));
    }

    #[test]
    fn lock_report_rejects_missing_cycles() {
        let text = r#"{"stalls": [], "futex_waits": []}"#;
        assert!(serde_json::from_str::<LockReport>(text).is_err());
    }
}
