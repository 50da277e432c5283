//! Facts read from the running kernel: tracefs, tracepoint field offsets,
//! struct offsets from BTF, the scheduler's base slice and syscall names.
//!
//! Each fact is read here and nowhere else, so a kernel that moves a field
//! needs one change.

use std::{
    ffi::CString,
    fs,
    io,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use tracer_common::{TracepointLayout, SYSCALL_NONE, SYSCALL_OTHER};

const TRACEFS: &str = "/sys/kernel/tracing";
/// Older kernels expose tracefs only inside debugfs.
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Fails with a clear message unless the process runs as root.
pub fn check_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("stalltrace must run as root: loading BPF programs needs CAP_BPF and CAP_PERFMON (try `sudo stalltrace ...`)");
    }
    Ok(())
}

/// Returns the tracefs mount point, mounting tracefs at `/sys/kernel/tracing` if absent.
pub fn ensure_tracefs() -> Result<PathBuf> {
    for dir in [TRACEFS, DEBUGFS_TRACING] {
        if Path::new(dir).join("events").is_dir() {
            return Ok(PathBuf::from(dir));
        }
    }
    tracing::info!(path = TRACEFS, "tracefs is not mounted, mounting it");
    let target = CString::new(TRACEFS).expect("path has no NUL");
    let fstype = CString::new("tracefs").expect("name has no NUL");
    // SAFETY: all pointers are valid NUL-terminated strings and data may be null.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let error = io::Error::last_os_error();
        bail!("tracefs is not mounted and mounting it at {TRACEFS} failed: {error} (try `mount -t tracefs nodev {TRACEFS}`)");
    }
    Ok(PathBuf::from(TRACEFS))
}

/// Returns the byte offset of `field` in the `format` file of tracepoint `category:name`.
fn field_offset(tracefs: &Path, category: &str, name: &str, field: &str) -> Result<u32> {
    let path = tracefs.join("events").join(category).join(name).join("format");
    let format = fs::read_to_string(&path)
        .with_context(|| format!("failed to read tracepoint format {}", path.display()))?;
    parse_field_offset(&format, field).with_context(|| {
        format!("tracepoint {category}:{name} has no field `{field}` in {}", path.display())
    })
}

/// Finds `offset:N` on the `field:` line whose declaration ends in `field` (or `field[..]`).
fn parse_field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let line = line.trim();
        let declaration = line.strip_prefix("field:")?.split(';').next()?;
        let declared = declaration.rsplit([' ', '*']).next()?;
        let declared = declared.split('[').next()?;
        if declared != field {
            return None;
        }
        let offset = line.split(';').find_map(|part| part.trim().strip_prefix("offset:"))?;
        offset.trim().parse().ok()
    })
}

/// Reads the offsets of every tracepoint field the BPF programs use.
pub fn tracepoint_layout(tracefs: &Path) -> Result<TracepointLayout> {
    Ok(TracepointLayout {
        switch_prev_pid: field_offset(tracefs, "sched", "sched_switch", "prev_pid")?,
        switch_prev_state: field_offset(tracefs, "sched", "sched_switch", "prev_state")?,
        switch_next_pid: field_offset(tracefs, "sched", "sched_switch", "next_pid")?,
        wakeup_pid: field_offset(tracefs, "sched", "sched_wakeup", "pid")?,
        wakeup_new_pid: field_offset(tracefs, "sched", "sched_wakeup_new", "pid")?,
        sys_enter_id: field_offset(tracefs, "raw_syscalls", "sys_enter", "id")?,
        futex_uaddr: field_offset(tracefs, "syscalls", "sys_enter_futex", "uaddr")?,
        futex_wait_uaddr: field_offset(tracefs, "syscalls", "sys_enter_futex_wait", "uaddr")?,
    })
}

/// Returns the byte offset of `task_struct.se.slice` from vmlinux BTF, or `None`
/// when the kernel has no BTF or no per-entity slice (before EEVDF, 6.6).
pub fn task_slice_offset() -> Option<u32> {
    let btf = match btf_rs::Btf::from_file(VMLINUX_BTF) {
        Ok(btf) => btf,
        Err(error) => {
            tracing::warn!(path = VMLINUX_BTF, %error, "kernel BTF unavailable, using the documented default slice");
            return None;
        }
    };
    let se = member_offset(&btf, "task_struct", "se")?;
    let slice = member_offset(&btf, "sched_entity", "slice")?;
    Some(se + slice)
}

/// Returns the byte offset of a named, non-bitfield member of a struct.
fn member_offset(btf: &btf_rs::Btf, structure: &str, member: &str) -> Option<u32> {
    let types = btf.resolve_types_by_name(structure).ok()?;
    types.iter().find_map(|ty| {
        let btf_rs::Type::Struct(s) = ty else { return None };
        s.members.iter().find_map(|m| {
            let name = btf.resolve_name(m).ok()?;
            (name == member && m.bitfield_size().unwrap_or(0) == 0).then(|| m.bit_offset() / 8)
        })
    })
}

/// Returns the default base slice of the EEVDF scheduler in `kernel/sched/fair.c`
/// (6.15 and later: 0.7 ms) scaled as `update_sysctl()` does with the default
/// logarithmic tunable scaling: `1 + ilog2(min(online CPUs, 8))`.
pub fn documented_base_slice_ns() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.clamp(1, 8) as u64;
    700_000 * (1 + u64::from(cpus.ilog2()))
}

/// Returns the kernel release, as `uname -r` prints it.
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|release| release.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Returns a syscall's name for this architecture, as `ausyscall` would.
pub fn syscall_name(nr: i32) -> String {
    match nr {
        SYSCALL_NONE => "(no syscall)".to_owned(),
        SYSCALL_OTHER => "(other syscalls)".to_owned(),
        nr => usize::try_from(nr)
            .ok()
            .and_then(syscalls::Sysno::new)
            .map(|sysno| sysno.name().to_owned())
            .unwrap_or_else(|| format!("syscall_{nr}")),
    }
}

/// Returns true while a process with this PID exists.
pub fn process_exists(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHED_SWITCH: &str = "name: sched_switch
ID: 321
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:char prev_comm[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:pid_t prev_pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:long prev_state;\toffset:32;\tsize:8;\tsigned:1;
\tfield:pid_t next_pid;\toffset:56;\tsize:4;\tsigned:1;
\tfield:u32 * uaddr;\toffset:16;\tsize:8;\tsigned:0;
";

    #[test]
    fn format_offsets_found() {
        assert_eq!(parse_field_offset(SCHED_SWITCH, "prev_pid"), Some(24));
        assert_eq!(parse_field_offset(SCHED_SWITCH, "prev_state"), Some(32));
        assert_eq!(parse_field_offset(SCHED_SWITCH, "next_pid"), Some(56));
        assert_eq!(parse_field_offset(SCHED_SWITCH, "prev_comm"), Some(8));
        assert_eq!(parse_field_offset(SCHED_SWITCH, "uaddr"), Some(16));
    }

    #[test]
    fn format_offset_missing_field() {
        assert_eq!(parse_field_offset(SCHED_SWITCH, "pid"), None);
        assert_eq!(parse_field_offset(SCHED_SWITCH, "next_prio"), None);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn syscall_names_x86_64() {
        assert_eq!(syscall_name(230), "clock_nanosleep");
        assert_eq!(syscall_name(SYSCALL_NONE), "(no syscall)");
        assert_eq!(syscall_name(SYSCALL_OTHER), "(other syscalls)");
        assert_eq!(syscall_name(100_000), "syscall_100000");
    }

    #[test]
    fn documented_slice_in_range() {
        let slice = documented_base_slice_ns();
        assert!((700_000..=2_800_000).contains(&slice), "{slice}");
    }
}
