//! The stdin-driven epoll loop shared by the workload programs: an epoll set
//! that contains stdin, non-blocking reads of it, and JSON lines on stdout.

use std::io::{self, Write as _};

/// The file descriptor of standard input.
pub const STDIN: libc::c_int = 0;
/// Timeout of each `epoll_wait`, so an idle loop still completes about 100 iterations a second.
pub const EPOLL_TIMEOUT_MS: i32 = 10;

/// Epoll instance whose only member is stdin.
pub struct Epoll {
    fd: libc::c_int,
}

impl Epoll {
    pub fn with_stdin() -> io::Result<Self> {
        // SAFETY: epoll_create1 has no memory preconditions.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let epoll = Self { fd };
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: STDIN as u64,
        };
        // SAFETY: both fds are open, and `event` is a valid epoll_event.
        if unsafe { libc::epoll_ctl(fd, libc::EPOLL_CTL_ADD, STDIN, &mut event) } != 0 {
            let error = io::Error::last_os_error();
            return Err(io::Error::new(
                error.kind(),
                format!("failed to add stdin to epoll ({error}): stdin must be a pipe, socket or terminal, not a regular file"),
            ));
        }
        Ok(epoll)
    }

    /// Waits up to EPOLL_TIMEOUT_MS and returns whether stdin is readable or closed.
    pub fn wait(&self) -> io::Result<bool> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 4];
        // SAFETY: `events` is valid for writes of the number of entries passed.
        let ready = unsafe {
            libc::epoll_wait(
                self.fd,
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                EPOLL_TIMEOUT_MS,
            )
        };
        if ready < 0 {
            let error = io::Error::last_os_error();
            return if error.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(error)
            };
        }
        Ok(ready > 0)
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: `fd` is an epoll fd that this value owns.
        unsafe { libc::close(self.fd) };
    }
}

/// Puts stdin into non-blocking mode and restores its old flags on drop, which matters
/// when stdin is a terminal shared with the shell.
pub struct NonBlockingStdin {
    original_flags: libc::c_int,
}

impl NonBlockingStdin {
    pub fn set() -> io::Result<Self> {
        // SAFETY: fcntl F_GETFL on fd 0 has no memory preconditions.
        let original_flags = unsafe { libc::fcntl(STDIN, libc::F_GETFL) };
        if original_flags < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fcntl F_SETFL on fd 0 has no memory preconditions.
        if unsafe { libc::fcntl(STDIN, libc::F_SETFL, original_flags | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { original_flags })
    }
}

impl Drop for NonBlockingStdin {
    fn drop(&mut self) {
        // SAFETY: fcntl F_SETFL on fd 0 has no memory preconditions.
        unsafe { libc::fcntl(STDIN, libc::F_SETFL, self.original_flags) };
    }
}

/// Reads once from non-blocking stdin. Returns `Some(0)` at end of file and `None` when
/// no data is ready.
pub fn read_stdin(buffer: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: `buffer` is valid for writes of its length.
    let count = unsafe { libc::read(STDIN, buffer.as_mut_ptr().cast(), buffer.len()) };
    if count >= 0 {
        return Ok(Some(count as usize));
    }
    let error = io::Error::last_os_error();
    match error.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
        _ => Err(error),
    }
}

/// Writes one JSON line to stdout and flushes it, so the reader sees it at once.
pub fn print_line<T: serde::Serialize>(message: &T) -> io::Result<()> {
    let mut line = serde_json::to_string(message).map_err(io::Error::other)?;
    line.push('\n');
    let mut stdout = io::stdout().lock();
    stdout.write_all(line.as_bytes())?;
    stdout.flush()
}
