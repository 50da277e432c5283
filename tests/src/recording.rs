//! Runs of `stalltrace record` and `stalltrace analyze`.

use std::{
    ffi::OsString,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        mpsc::{self, RecvTimeoutError},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use crate::Report;

/// Maximum wait for `stalltrace record` to print `attached`. Loading and verifying the
/// BPF programs is the slow part.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed past `--duration` for detaching and writing the report.
const EXIT_GRACE: Duration = Duration::from_secs(30);
/// Maximum run time of `stalltrace analyze`.
const ANALYZE_TIMEOUT: Duration = Duration::from_secs(60);
/// Time that drop allows after SIGTERM for stalltrace to detach before it is killed.
const TERMINATE_GRACE: Duration = Duration::from_secs(5);

/// Running `stalltrace record`. Two threads forward its stdout and stderr to the test
/// output and keep a copy, so the pipes never fill. Drop stops a process that is still running.
pub struct Recording {
    child: Child,
    out_dir: PathBuf,
    duration: Duration,
    attached_ns: u64,
    /// Lines of stdout and stderr so far, each with a prefix that names the stream.
    output: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Recording {
    /// Starts `stalltrace record --duration DURATION -o OUT_DIR --pid PID [--threshold THRESHOLD]`
    /// and returns once it prints a stderr line that contains `attached`.
    ///
    /// `threshold` is passed as given, for example `"50ms"`. `None` leaves stalltrace's default.
    pub fn start(
        binary: &Path,
        pid: u32,
        duration: Duration,
        threshold: Option<&str>,
        out_dir: &Path,
    ) -> Self {
        let mut args: Vec<OsString> = vec![
            "record".into(),
            "--duration".into(),
            format!("{}ms", duration.as_millis()).into(),
            "-o".into(),
            out_dir.into(),
            "--pid".into(),
            pid.to_string().into(),
        ];
        if let Some(threshold) = threshold {
            args.push("--threshold".into());
            args.push(threshold.into());
        }

        eprintln!("running {} {}", binary.display(), display_args(&args));
        let mut child = Command::new(binary)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("failed to start {}: {error}", binary.display()));

        let output = Arc::new(Mutex::new(String::new()));
        let (attached_sender, attached) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let readers = vec![
            forward_lines(stdout, "stalltrace stdout", Arc::clone(&output), None),
            forward_lines(
                stderr,
                "stalltrace",
                Arc::clone(&output),
                Some(attached_sender),
            ),
        ];

        let mut recording = Self {
            child,
            out_dir: out_dir.to_path_buf(),
            duration,
            attached_ns: 0,
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
                let status = match recording.child.wait() {
                    Ok(status) => status.to_string(),
                    Err(error) => format!("an unknown status ({error})"),
                };
                recording.join_readers();
                panic!(
                    "stalltrace record exited with {status} before printing `attached`; output:\n{}",
                    recording.output_text()
                );
            }
        }
    }

    /// Returns CLOCK_MONOTONIC nanoseconds shortly after stalltrace printed `attached`.
    pub fn attached_ns(&self) -> u64 {
        self.attached_ns
    }

    /// Waits until stalltrace exits by itself after `--duration`, checks that it succeeded
    /// and returns the parsed `report.json`.
    pub fn finish(mut self) -> Report {
        let timeout = self.duration + EXIT_GRACE;
        let Some(status) = crate::wait_with_timeout(&mut self.child, timeout) else {
            crate::kill_and_reap(&mut self.child);
            panic!(
                "stalltrace record did not exit within {timeout:?} (--duration plus {EXIT_GRACE:?}); output:\n{}",
                self.output_text()
            );
        };
        self.join_readers();
        assert!(
            status.success(),
            "stalltrace record exited with {status}; output:\n{}",
            self.output_text()
        );
        Report::load(&self.out_dir.join("report.json"))
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

impl Drop for Recording {
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

/// Runs `stalltrace analyze CAPTURE -o OUT_DIR`, checks that it succeeded and returns the
/// parsed `OUT_DIR/report.json`.
pub fn analyze(binary: &Path, capture: &Path, out_dir: &Path) -> Report {
    let args: Vec<OsString> = vec![
        "analyze".into(),
        capture.into(),
        "-o".into(),
        out_dir.into(),
    ];
    eprintln!("running {} {}", binary.display(), display_args(&args));

    // Output goes to files, so a chatty run cannot fill a pipe while we poll for its exit.
    let log_path = out_dir.with_extension("analyze.log");
    let log = std::fs::File::create(&log_path)
        .unwrap_or_else(|error| panic!("failed to create {}: {error}", log_path.display()));
    let log_copy = log
        .try_clone()
        .expect("failed to duplicate the log file handle");
    let mut child = Command::new(binary)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(log_copy)
        .stderr(log)
        .spawn()
        .unwrap_or_else(|error| panic!("failed to start {}: {error}", binary.display()));

    let status = crate::wait_with_timeout(&mut child, ANALYZE_TIMEOUT);
    crate::kill_and_reap(&mut child);
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    eprintln!("stalltrace analyze output:\n{output}");
    let Some(status) = status else {
        panic!("stalltrace analyze did not exit within {ANALYZE_TIMEOUT:?}; output:\n{output}");
    };
    assert!(
        status.success(),
        "stalltrace analyze exited with {status}; output:\n{output}"
    );
    Report::load(&out_dir.join("report.json"))
}

/// Starts a thread that copies each line of `pipe` to the test output and to `copy`, with
/// `prefix`. The first line that contains `attached` is signalled on `attached`.
fn forward_lines(
    pipe: impl Read + Send + 'static,
    prefix: &'static str,
    copy: Arc<Mutex<String>>,
    mut attached: Option<mpsc::Sender<()>>,
) -> JoinHandle<()> {
    thread::Builder::new()
        .name(format!("{prefix} reader"))
        .spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { return };
                eprintln!("{prefix}: {line}");
                {
                    let mut copy = copy.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    copy.push_str(prefix);
                    copy.push_str(": ");
                    copy.push_str(&line);
                    copy.push('\n');
                }
                if line.contains("attached") {
                    if let Some(sender) = attached.take() {
                        let _ = sender.send(());
                    }
                }
            }
        })
        .expect("failed to start a stalltrace output reader")
}

fn display_args(args: &[OsString]) -> String {
    args.iter()
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}
