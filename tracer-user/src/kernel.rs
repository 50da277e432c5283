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
use tracer_common::{KernelOffsets, TracepointLayout, SYSCALL_NONE, SYSCALL_OTHER};

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
        wakeup_target_cpu: field_offset(tracefs, "sched", "sched_wakeup", "target_cpu")?,
        wakeup_new_pid: field_offset(tracefs, "sched", "sched_wakeup_new", "pid")?,
        sys_enter_id: field_offset(tracefs, "raw_syscalls", "sys_enter", "id")?,
        futex_uaddr: field_offset(tracefs, "syscalls", "sys_enter_futex", "uaddr")?,
        futex_wait_uaddr: field_offset(tracefs, "syscalls", "sys_enter_futex_wait", "uaddr")?,
        futex_op: field_offset(tracefs, "syscalls", "sys_enter_futex", "op")?,
        futex_val: field_offset(tracefs, "syscalls", "sys_enter_futex", "val")?,
        futex_wait_val: field_offset(tracefs, "syscalls", "sys_enter_futex_wait", "val")?,
        futex_wake_uaddr: field_offset(tracefs, "syscalls", "sys_enter_futex_wake", "uaddr")?,
        sys_exit_ret: field_offset(tracefs, "syscalls", "sys_exit_futex", "ret")?,
    })
}

/// Reads the kernel struct offsets the BPF programs use from vmlinux BTF.
///
/// Without BTF every offset is 0: the threshold then falls back to the
/// documented slice, and steal and throttling are not measured.
pub fn kernel_offsets() -> KernelOffsets {
    let btf = match btf_rs::Btf::from_file(VMLINUX_BTF) {
        Ok(btf) => btf,
        Err(error) => {
            tracing::warn!(
                path = VMLINUX_BTF,
                %error,
                "kernel BTF unavailable: steal and throttling are not measured, and the threshold is the documented default slice"
            );
            return KernelOffsets::default();
        }
    };
    let member = |structure: &str, name: &str| member_offset(&btf, structure, name);
    let se = member("task_struct", "se");
    let nested = |outer: Option<u32>, inner: Option<u32>| outer.zip(inner).map(|(a, b)| a + b).unwrap_or(0);
    let offsets = KernelOffsets {
        task_slice: nested(se, member("sched_entity", "slice")),
        task_cfs_rq: nested(se, member("sched_entity", "cfs_rq")),
        cfs_rq_rq: member("cfs_rq", "rq").unwrap_or(0),
        cfs_rq_throttle_count: member("cfs_rq", "throttle_count").unwrap_or(0),
        rq_prev_steal_time: member("rq", "prev_steal_time").unwrap_or(0),
        task_stack: member("task_struct", "stack").unwrap_or(0),
    };
    if !offsets.steal_known() {
        tracing::warn!(?offsets, "this kernel's BTF lacks rq.prev_steal_time or cfs_rq.rq: steal is not measured");
    }
    offsets
}

/// Kernel stack sizes (`THREAD_SIZE`) to try: 16 KiB on x86_64, 32 KiB with KASAN.
const THREAD_SIZES: [u32; 2] = [16 * 1024, 32 * 1024];

/// Returns candidate offsets from a task's kernel stack base to `orig_ax` in
/// its saved user registers, which sit at the top of the stack
/// (`task_pt_regs()` in `arch/x86/include/asm/processor.h`). The loader checks
/// each against a syscall of its own. Empty without BTF or on other architectures.
pub fn syscall_nr_offsets() -> Vec<u32> {
    if !cfg!(target_arch = "x86_64") {
        return Vec::new();
    }
    let Ok(btf) = btf_rs::Btf::from_file(VMLINUX_BTF) else {
        return Vec::new();
    };
    let Some(orig_ax) = member_offset(&btf, "pt_regs", "orig_ax") else {
        return Vec::new();
    };
    let size = btf.resolve_types_by_name("pt_regs").ok().and_then(|types| {
        types.iter().find_map(|ty| match ty {
            btf_rs::Type::Struct(s) => u32::try_from(s.size()).ok(),
            _ => None,
        })
    });
    let Some(size) = size else { return Vec::new() };
    THREAD_SIZES.iter().map(|thread_size| thread_size - size + orig_ax).collect()
}

/// Returns the syscall numbers of the epoll waits on this architecture.
pub fn epoll_wait_syscalls() -> Vec<i32> {
    #[cfg(target_arch = "x86_64")]
    let waits = [
        syscalls::Sysno::epoll_wait,
        syscalls::Sysno::epoll_pwait,
        syscalls::Sysno::epoll_pwait2,
    ];
    #[cfg(not(target_arch = "x86_64"))]
    let waits = [syscalls::Sysno::epoll_pwait, syscalls::Sysno::epoll_pwait2];
    waits.into_iter().map(|sysno| sysno.id()).collect()
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

/// Returns the hypervisor this kernel runs under: `kvm`, another vendor's
/// name, or `none` on bare metal, from the CPUID hypervisor leaves.
pub fn virtualization() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid;
        // CPUID leaf 1, ECX bit 31: "hypervisor present", reserved as 0 on real hardware.
        let features = __cpuid(1);
        if features.ecx & (1 << 31) == 0 {
            return "none".to_owned();
        }
        // Leaf 0x4000_0000 is the hypervisor's vendor signature.
        let leaf = __cpuid(0x4000_0000);
        let mut signature = Vec::with_capacity(12);
        for register in [leaf.ebx, leaf.ecx, leaf.edx] {
            signature.extend_from_slice(&register.to_le_bytes());
        }
        let signature = String::from_utf8_lossy(&signature).trim_end_matches('\0').to_owned();
        match signature.as_str() {
            "KVMKVMKVM" => "kvm".to_owned(),
            "Microsoft Hv" => "hyper-v".to_owned(),
            "VMwareVMware" => "vmware".to_owned(),
            "XenVMMXenVMM" => "xen".to_owned(),
            "TCGTCGTCGTCG" => "qemu-tcg".to_owned(),
            other => format!("other ({other})"),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        if Path::new("/sys/hypervisor/type").exists() {
            fs::read_to_string("/sys/hypervisor/type").map(|kind| kind.trim().to_owned()).unwrap_or_else(|_| "other".to_owned())
        } else {
            "unknown".to_owned()
        }
    }
}

/// Returns the `steal` column of each `cpuN` line of `/proc/stat`, in nanoseconds.
pub fn proc_stat_steal_ns() -> Result<Vec<u64>> {
    let text = fs::read_to_string("/proc/stat").context("failed to read /proc/stat")?;
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(parse_proc_stat_steal(&text, 1_000_000_000 / ticks_per_second))
}

fn parse_proc_stat_steal(text: &str, ns_per_tick: u64) -> Vec<u64> {
    let mut steal = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(name) = fields.next() else { continue };
        let Some(cpu) = name.strip_prefix("cpu").and_then(|n| n.parse::<usize>().ok()) else {
            continue;
        };
        // Columns: user nice system idle iowait irq softirq steal.
        let ticks: u64 = fields.nth(7).and_then(|value| value.parse().ok()).unwrap_or(0);
        if steal.len() <= cpu {
            steal.resize(cpu + 1, 0);
        }
        steal[cpu] = ticks * ns_per_tick;
    }
    steal
}

/// Returns the number of possible CPUs, the size of the per-CPU arrays.
pub fn possible_cpus() -> usize {
    aya::util::nr_cpus().unwrap_or(1)
}

/// Returns true while a process with this PID runs: it exists and is not a
/// zombie waiting for its parent to reap it.
pub fn process_exists(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")) else {
        return false;
    };
    // The state letter follows the parenthesized name, which may itself contain ')'.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z') | Some('X') | None)
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
    fn proc_stat_steal_parsed() {
        let text = "cpu  42943 0 7412 136676 821 0 52 34 0 0
cpu0 21272 0 3250 69366 82 0 11 12 0 0
cpu1 21670 0 4161 67309 738 0 40 22 0 0
intr 1 2 3
";
        assert_eq!(parse_proc_stat_steal(text, 10_000_000), vec![120_000_000, 220_000_000]);
    }

    #[test]
    fn zombie_process_not_running() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Until it is reaped the exited child stays a zombie in /proc.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while process_exists(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }

        assert!(Path::new("/proc").join(pid.to_string()).exists(), "still unreaped");
        assert!(!process_exists(pid));
        child.wait().unwrap();
        assert!(process_exists(std::process::id()));
    }

    #[test]
    fn documented_slice_in_range() {
        let slice = documented_base_slice_ns();
        assert!((700_000..=2_800_000).contains(&slice), "{slice}");
    }
}
