//! Control of a running `loop-workload` process.

use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    thread,
    time::Duration,
};

use crate::protocol::{Done, Message, Started};

/// Maximum wait for the workload's start line.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Running `loop-workload`. A thread reads its stdout into a channel, so the workload
/// never blocks on a full stdout pipe. Drop kills the process.
pub struct Workload {
    child: Child,
    stdin: Option<ChildStdin>,
    messages: Receiver<Result<Message, String>>,
    started: Started,
}

impl Workload {
    /// Starts the workload binary and waits for its start line.
    pub fn start(binary: impl AsRef<Path>) -> Self {
        let binary = binary.as_ref();
        let mut child = Command::new(binary)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|error| panic!("failed to start {}: {error}", binary.display()));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout is piped");

        let (sender, messages) = mpsc::channel();
        thread::Builder::new()
            .name("workload-stdout".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { return };
                    let message = serde_json::from_str::<Message>(&line)
                        .map_err(|error| format!("invalid workload line `{line}`: {error}"));
                    if sender.send(message).is_err() {
                        return;
                    }
                }
            })
            .expect("failed to start the workload stdout reader");

        let mut workload = Self {
            child,
            stdin,
            messages,
            started: Started {
                pid: 0,
                loop_tid: 0,
            },
        };
        match workload.next_message(START_TIMEOUT) {
            Message::Started(started) => workload.started = started,
            other => panic!("expected the workload's start line, got {other:?}"),
        }
        workload
    }

    /// Returns the pid that the workload printed in its start line.
    pub fn pid(&self) -> u32 {
        self.started.pid
    }

    pub fn loop_tid(&self) -> u32 {
        self.started.loop_tid
    }

    /// Returns the pid of the started child process, to check the start line against.
    pub fn child_pid(&self) -> u32 {
        self.child.id()
    }

    /// Closes the workload's stdin and waits up to `timeout` for it to exit.
    pub fn close_stdin_and_wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.stdin = None;
        crate::wait_with_timeout(&mut self.child, timeout)
    }

    /// Writes command lines to the workload's stdin without waiting for them to run.
    pub fn send(&mut self, lines: &str) {
        let pid = self.child.id();
        let stdin = self.stdin.as_mut().expect("stdin is open until drop");
        stdin
            .write_all(lines.as_bytes())
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|error| panic!("failed to write to the workload (pid {pid}): {error}"));
    }

    /// Sends one command and returns its `done` line, failing after `timeout`.
    pub fn run(&mut self, command: &str, timeout: Duration) -> Done {
        self.send(&format!("{command}\n"));
        self.expect_done(command, timeout)
    }

    /// Waits for the `done` line of `command`, failing on any other line or after `timeout`.
    pub fn expect_done(&mut self, command: &str, timeout: Duration) -> Done {
        match self.next_message(timeout) {
            Message::Done(done) if done.done == command => done,
            other => panic!("expected the done line of `{command}`, got {other:?}"),
        }
    }

    /// Returns the next line of the workload's stdout, failing after `timeout`.
    pub fn next_message(&mut self, timeout: Duration) -> Message {
        match self.messages.recv_timeout(timeout) {
            Ok(Ok(message)) => message,
            Ok(Err(error)) => panic!("{error}"),
            Err(RecvTimeoutError::Timeout) => {
                panic!(
                    "the workload (pid {}) printed nothing within {timeout:?}",
                    self.child.id()
                )
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.wait();
                panic!("the workload closed its stdout and exited with {status:?}")
            }
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stdin = None;
        crate::kill_and_reap(&mut self.child);
    }
}
