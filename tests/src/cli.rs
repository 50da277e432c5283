//! Runs of the `stalltrace` command line with any arguments, for the lifecycle, bad-input
//! and steal tests: exit status and output, signals, the `host` and `summary` parts of
//! `report.json`, and the BPF programs that a run loads and leaves behind.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsStr,
    fs,
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use serde::Deserialize;

/// Names of stalltrace's BPF programs, as in its BPF object.
/// `sys_enter` and `sys_exit` are left out: stalltrace loads them only where it
/// cannot read syscall numbers from a blocked thread's saved registers.
pub const PROGRAM_NAMES: [&str; 12] = [
    "loop_wait_enter",
    "loop_wait_exit",
    "sched_switch",
    "sched_wakeup",
    "sched_wakeup_new",
    "sched_process_exit",
    "futex_enter",
    "futex_wait_enter",
    "futex_waitv_enter",
    "futex_wake_enter",
    "futex_exit",
    "on_cpu_sample",
];

/// Maximum length of a BPF program name as the kernel stores it (BPF_OBJ_NAME_LEN is 16
/// bytes with the terminating NUL), so longer names are cut to their first 15 bytes.
const KERNEL_NAME_MAX: usize = 15;

/// Time that drop allows after SIGTERM for stalltrace to detach before it is killed.
const TERMINATE_GRACE: Duration = Duration::from_secs(5);

/// Returns `name` as the kernel shows it in `bpf_prog_info`.
pub fn kernel_program_name(name: &str) -> &str {
    &name[..name.len().min(KERNEL_NAME_MAX)]
}

/// Exit status and whole output of a finished command.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Returns the stderr lines that start with `stalltrace: error:`.
    pub fn error_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|line| line.starts_with("stalltrace: error:"))
            .collect()
    }

    /// Returns the status and both streams, for assert messages.
    pub fn describe(&self) -> String {
        format!(
            "exit status {}\nstdout:\n{}\nstderr:\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `program ARGS` with stdin from /dev/null and returns its output.
///
/// # Panics
///
/// Panics when the program cannot start or runs longer than `timeout` (it is then killed).
pub fn run<S: AsRef<OsStr>>(program: &Path, args: &[S], timeout: Duration) -> Output {
    let mut running = Running::start(program, args);
    let Some(status) = running.wait(timeout) else {
        panic!(
            "{} did not exit within {timeout:?}; output so far:\n{}",
            program.display(),
            running.output_text()
        );
    };
    Output {
        status,
        stdout: running.stdout_lines().join("\n"),
        stderr: running.stderr_lines().join("\n"),
    }
}

/// Lines that a child process printed so far, by stream.
#[derive(Default)]
struct Lines {
    stdout: Vec<String>,
    stderr: Vec<String>,
}

/// A running child process whose stdout and stderr are read line by line into memory and
/// copied to the test output, so the pipes never fill. Drop stops a process that still
/// runs: SIGTERM first, so stalltrace can detach, then SIGKILL after a grace period.
pub struct Running {
    child: Child,
    label: String,
    lines: Arc<Mutex<Lines>>,
    readers: Vec<JoinHandle<()>>,
}

impl Running {
    /// Starts `program ARGS` with stdin from /dev/null.
    pub fn start<S: AsRef<OsStr>>(program: &Path, args: &[S]) -> Self {
        let label = program
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| program.display().to_string());
        let display_args: Vec<String> = args
            .iter()
            .map(|arg| arg.as_ref().to_string_lossy().into_owned())
            .collect();
        eprintln!("running {} {}", program.display(), display_args.join(" "));
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("failed to start {}: {error}", program.display()));

        let lines = Arc::new(Mutex::new(Lines::default()));
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let readers = vec![
            read_lines(stdout, format!("{label} stdout"), Arc::clone(&lines), false),
            read_lines(stderr, format!("{label} stderr"), Arc::clone(&lines), true),
        ];
        Self {
            child,
            label,
            lines,
            readers,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until a stderr line contains `needle` and returns whether one did within
    /// `timeout`. Returns early with false when the process exits without printing it.
    pub fn wait_for_stderr(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stderr_lines().iter().any(|line| line.contains(needle)) {
                return true;
            }
            let exited = !matches!(self.child.try_wait(), Ok(None));
            if exited {
                // The readers see every line once the pipes close.
                self.join_readers();
                return self.stderr_lines().iter().any(|line| line.contains(needle));
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` to the process unless it has already been reaped.
    pub fn signal(&mut self, signal: libc::c_int) {
        if let Ok(None) = self.child.try_wait() {
            crate::signal_child(&self.child, signal);
        }
    }

    /// Waits up to `timeout` for the process to exit and returns its status. After an
    /// exit, the output lines are complete.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let status = crate::wait_with_timeout(&mut self.child, timeout)?;
        self.join_readers();
        Some(status)
    }

    /// Waits like [`Running::wait`], and meanwhile reads the IDs of the BPF programs that
    /// the process has open every 2 ms. Returns the status and every ID seen, so programs
    /// that a short run loads and should free can be distinguished from other tools' programs.
    pub fn wait_collecting_program_ids(
        &mut self,
        timeout: Duration,
    ) -> (Option<ExitStatus>, BTreeSet<u32>) {
        let deadline = Instant::now() + timeout;
        let mut ids = BTreeSet::new();
        loop {
            ids.extend(program_ids_held_by(self.pid()));
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.join_readers();
                    return (Some(status), ids);
                }
                Ok(None) if Instant::now() >= deadline => return (None, ids),
                Ok(None) => thread::sleep(Duration::from_millis(2)),
                Err(error) => panic!("failed to poll child process {}: {error}", self.pid()),
            }
        }
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        self.locked_lines().stdout.clone()
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.locked_lines().stderr.clone()
    }

    /// Returns both streams so far, for assert messages.
    pub fn output_text(&self) -> String {
        let lines = self.locked_lines();
        format!(
            "{} stdout:\n{}\n{} stderr:\n{}",
            self.label,
            lines.stdout.join("\n"),
            self.label,
            lines.stderr.join("\n")
        )
    }

    fn locked_lines(&self) -> std::sync::MutexGuard<'_, Lines> {
        self.lines
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn join_readers(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

impl Drop for Running {
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

/// Starts a thread that copies each line of `pipe` to the test output and to `lines`.
fn read_lines(
    pipe: impl Read + Send + 'static,
    prefix: String,
    lines: Arc<Mutex<Lines>>,
    is_stderr: bool,
) -> JoinHandle<()> {
    thread::Builder::new()
        .name(format!("{prefix} reader"))
        .spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { return };
                eprintln!("{prefix}: {line}");
                let mut lines = lines
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                if is_stderr {
                    lines.stderr.push(line);
                } else {
                    lines.stdout.push(line);
                }
            }
        })
        .expect("failed to start an output reader thread")
}

/// Returns the BPF programs loaded on this host whose name is one of stalltrace's
/// [`PROGRAM_NAMES`], by program ID. Other tools' programs are left out.
///
/// # Panics
///
/// Panics when the programs cannot be listed, for example without root.
pub fn loaded_stalltrace_programs() -> BTreeMap<u32, String> {
    let names: BTreeSet<&str> = PROGRAM_NAMES
        .iter()
        .map(|name| kernel_program_name(name))
        .collect();
    let mut found = BTreeMap::new();
    for program in aya::programs::loaded_programs() {
        let program = match program {
            Ok(program) => program,
            // A program unloaded between listing its ID and opening it.
            Err(aya::programs::ProgramError::SyscallError(error))
                if error.io_error.kind() == std::io::ErrorKind::NotFound =>
            {
                continue
            }
            Err(error) => panic!("failed to list the loaded BPF programs: {error}"),
        };
        let name = String::from_utf8_lossy(program.name()).into_owned();
        if names.contains(name.as_str()) {
            found.insert(program.id(), name);
        }
    }
    found
}

/// Returns the IDs of the BPF programs that process `pid` has open, from the `prog_id`
/// lines of `/proc/PID/fdinfo/*` (program and link file descriptors have one). Returns
/// none for a process that has exited.
pub fn program_ids_held_by(pid: u32) -> BTreeSet<u32> {
    let mut ids = BTreeSet::new();
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return ids;
    };
    for entry in entries.flatten() {
        // A descriptor closed since the listing has no fdinfo left, which loses nothing.
        let Ok(text) = fs::read_to_string(entry.path()) else {
            continue;
        };
        for line in text.lines() {
            if let Some(id) = line.strip_prefix("prog_id:") {
                if let Ok(id) = id.trim().parse() {
                    ids.insert(id);
                }
            }
        }
    }
    ids
}

/// Waits up to `timeout` until none of the programs `ids` is loaded, and returns those
/// still loaded then. The kernel frees a program when its last file descriptor and link
/// close, which the exit of its loader does.
pub fn wait_for_programs_unloaded(ids: &BTreeSet<u32>, timeout: Duration) -> BTreeMap<u32, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut remaining = loaded_stalltrace_programs();
        remaining.retain(|id, _| ids.contains(id));
        if remaining.is_empty() || Instant::now() >= deadline {
            return remaining;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The `host` and `summary` objects of `report.json`, which [`crate::Report`] leaves out.
#[derive(Debug, Clone, Deserialize)]
pub struct ReportExtras {
    pub host: HostFacts,
    pub summary: Summary,
}

/// Facts about the traced host and its steal over the traced time.
#[derive(Debug, Clone, Deserialize)]
pub struct HostFacts {
    /// `kvm`, another hypervisor, or `none`.
    pub virtualization: String,
    /// Starts with `none` when stalltrace has no steal clock to read.
    pub steal_source: String,
    /// Steal per CPU by the run queues' steal clock, in nanoseconds.
    pub steal_ns_per_cpu: Vec<u64>,
    pub steal_ns_total: u64,
    /// Steal per CPU from `/proc/stat`, in nanoseconds (one tick, 10 ms, resolution).
    pub proc_stat_steal_ns_per_cpu: Vec<u64>,
    pub proc_stat_steal_ns_total: u64,
}

/// Stalled time by owner, and the verdicts that appear.
#[derive(Debug, Clone, Deserialize)]
pub struct Summary {
    pub stalled_ns: u64,
    pub host_ns: u64,
    pub guest_ns: u64,
    pub application_ns: u64,
    pub verdicts: Vec<VerdictSummary>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VerdictSummary {
    pub verdict: String,
    pub stalls: u32,
    pub stalled_ns: u64,
    pub suggestion: String,
}

impl ReportExtras {
    /// Reads the `host` and `summary` objects of a report file.
    ///
    /// # Panics
    ///
    /// Panics when the file is missing or lacks either object.
    pub fn load(path: &Path) -> Self {
        let text = fs::read_to_string(path)
            .unwrap_or_else(|error| panic!("failed to read {}: {error}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|error| {
            panic!(
                "{} has no valid `host` and `summary` objects: {error}\n{text}",
                path.display()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_name_cuts_long_names() {
        assert_eq!(kernel_program_name("sched_process_exit"), "sched_process_e");
        assert_eq!(kernel_program_name("loop_wait_enter"), "loop_wait_enter");
        assert_eq!(kernel_program_name("sys_exit"), "sys_exit");
    }

    #[test]
    fn extras_parse_host_and_summary() {
        let text = r#"{
          "version": 1,
          "host": {
            "virtualization": "kvm",
            "steal_source": "rq->prev_steal_time (paravirt steal clock)",
            "steal_ns_per_cpu": [3000000, 1000000],
            "steal_ns_total": 4000000,
            "proc_stat_steal_ns_per_cpu": [0, 10000000],
            "proc_stat_steal_ns_total": 10000000
          },
          "summary": {
            "stalled_ns": 100, "host_ns": 10, "guest_ns": 60, "application_ns": 30,
            "verdicts": [{"verdict": "runqueue", "stalls": 1, "stalled_ns": 100, "suggestion": "reduce load"}]
          },
          "stalls": []
        }"#;
        let extras: ReportExtras = serde_json::from_str(text).unwrap();
        assert_eq!(extras.host.virtualization, "kvm");
        assert_eq!(extras.host.steal_ns_per_cpu, vec![3_000_000, 1_000_000]);
        assert_eq!(extras.host.proc_stat_steal_ns_total, 10_000_000);
        assert_eq!(extras.summary.guest_ns, 60);
        assert_eq!(extras.summary.verdicts[0].verdict, "runqueue");
    }
}
