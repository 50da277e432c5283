//! Loading and attaching the BPF programs, and reading their maps.
//!
//! Dropping a [`Probe`] detaches every program: aya closes the links and
//! program file descriptors, and the kernel frees what nothing else holds.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf, StackTraceMap},
    programs::{
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
        PerfEvent, TracePoint,
    },
    util::online_cpus,
    Ebpf, EbpfLoader,
};
use tracer_common::{
    counter, FutexKey, FutexTraffic, FutexWait, KernelOffsets, LoopThread, SampleKey, TracepointLayout,
};

/// The BPF object built by `build.rs` from `tracer-ebpf`.
static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/stalltrace"));

/// Programs and the tracepoints each one is attached to.
const ATTACHMENTS: &[(&str, &str, &[&str])] = &[
    (
        "loop_wait_enter",
        "syscalls",
        &["sys_enter_epoll_wait", "sys_enter_epoll_pwait", "sys_enter_epoll_pwait2"],
    ),
    (
        "loop_wait_exit",
        "syscalls",
        &["sys_exit_epoll_wait", "sys_exit_epoll_pwait", "sys_exit_epoll_pwait2"],
    ),
    ("sched_switch", "sched", &["sched_switch"]),
    ("sched_wakeup", "sched", &["sched_wakeup"]),
    ("sched_wakeup_new", "sched", &["sched_wakeup_new"]),
    ("sched_process_exit", "sched", &["sched_process_exit"]),
    ("futex_enter", "syscalls", &["sys_enter_futex"]),
    ("futex_wait_enter", "syscalls", &["sys_enter_futex_wait"]),
    ("futex_waitv_enter", "syscalls", &["sys_enter_futex_waitv"]),
    ("futex_wake_enter", "syscalls", &["sys_enter_futex_wake"]),
    (
        "futex_exit",
        "syscalls",
        &["sys_exit_futex", "sys_exit_futex_wait", "sys_exit_futex_waitv"],
    ),
];

/// Programs that name a blocked thread's syscall from every syscall entry and
/// exit, attached only when the syscall number cannot be read from the
/// blocked thread's saved registers.
const SYSCALL_FALLBACK: &[(&str, &str, &[&str])] = &[
    ("sys_enter", "raw_syscalls", &["sys_enter"]),
    ("sys_exit", "raw_syscalls", &["sys_exit"]),
];

/// On-CPU sampling rate of stalled loop threads, per CPU. 99 rather than 100
/// so samples do not march in step with timers that fire at round rates.
pub const SAMPLE_HZ: u64 = 99;

/// Loads and attaches tracepoint programs, and returns the number of attachments.
fn attach_tracepoints(ebpf: &mut Ebpf, attachments: &[(&str, &str, &[&str])]) -> Result<usize> {
    let mut attached = 0;
    for &(name, category, tracepoints) in attachments {
        let program: &mut TracePoint = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the BPF object"))?
            .try_into()?;
        program
            .load()
            .with_context(|| format!("the kernel rejected BPF program {name}"))?;
        for tracepoint in tracepoints {
            program
                .attach(category, tracepoint)
                .with_context(|| format!("failed to attach {name} to tracepoint {category}:{tracepoint}"))?;
            attached += 1;
        }
    }
    Ok(attached)
}

/// Load-time configuration of the BPF programs.
pub struct ProbeConfig {
    /// Processes in scope; empty for every process.
    pub pids: Vec<u32>,
    pub layout: TracepointLayout,
    /// Kernel struct offsets from BTF, 0 where unknown.
    pub offsets: KernelOffsets,
}

/// The loaded and attached BPF programs.
pub struct Probe {
    ebpf: Ebpf,
    attached: usize,
}

impl Probe {
    /// Loads the programs with `config` and attaches every one of them.
    pub fn attach(config: &ProbeConfig) -> Result<Self> {
        let self_pid = std::process::id();
        let filter: u8 = u8::from(!config.pids.is_empty());
        let mut ebpf = EbpfLoader::new()
            .override_global("SELF_PID", &self_pid, true)
            .override_global("FILTER_PIDS", &filter, true)
            .override_global("LAYOUT", &config.layout, true)
            .override_global("OFFSETS", &config.offsets, true)
            .load(BPF_OBJECT)
            .context("failed to load the BPF programs (is this kernel built with CONFIG_BPF_SYSCALL and BTF?)")?;

        {
            let mut targets: HashMap<&mut MapData, u32, u8> =
                HashMap::try_from(ebpf.map_mut("TARGET_PIDS").context("map TARGET_PIDS missing")?)?;
            for &pid in &config.pids {
                targets
                    .insert(pid, 1, 0)
                    .with_context(|| format!("failed to add PID {pid} to the scope"))?;
            }
        }

        let mut attached = attach_tracepoints(&mut ebpf, ATTACHMENTS)?;
        let sampler: &mut PerfEvent = ebpf
            .program_mut("on_cpu_sample")
            .ok_or_else(|| anyhow!("program on_cpu_sample missing from the BPF object"))?
            .try_into()?;
        sampler
            .load()
            .context("the kernel rejected BPF program on_cpu_sample")?;
        let cpus = online_cpus().map_err(|(path, error)| anyhow!("failed to read {path}: {error}"))?;
        for cpu in cpus {
            sampler
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Frequency(SAMPLE_HZ),
                    false,
                )
                .with_context(|| format!("failed to attach the CPU clock sampler on CPU {cpu}"))?;
            attached += 1;
        }
        tracing::info!(attached, "BPF programs attached");
        Ok(Self { ebpf, attached })
    }

    /// Finds where a blocked thread's syscall number lies, trying each candidate
    /// offset against this process's own epoll waits. Without a match it
    /// attaches the raw syscall programs instead, which cost a run on every
    /// syscall of every process. Returns true when an offset matched.
    pub async fn locate_syscall_numbers(&mut self, candidates: &[u32], epoll_waits: &[i32]) -> Result<bool> {
        for &offset in candidates {
            self.set_array("SYSCALL_NR_OFFSET", offset)?;
            self.set_array("SELF_SYSCALL", 0u64)?;
            let deadline = Instant::now() + Duration::from_millis(300);
            while Instant::now() < deadline {
                // Each sleep parks the runtime in epoll_wait, which is when the number is read.
                tokio::time::sleep(Duration::from_millis(5)).await;
                let seen: u64 = self.get_array("SELF_SYSCALL")?;
                if seen >> 63 == 1 {
                    if epoll_waits.contains(&(seen as u32 as i32)) {
                        tracing::info!(offset, "syscall numbers read from saved user registers");
                        return Ok(true);
                    }
                    break;
                }
            }
        }
        self.set_array("SYSCALL_NR_OFFSET", 0u32)?;
        tracing::warn!("cannot read syscall numbers from saved registers, tracing every syscall instead (higher overhead)");
        self.attached += attach_tracepoints(&mut self.ebpf, SYSCALL_FALLBACK)?;
        Ok(false)
    }

    fn set_array<T: aya::Pod>(&mut self, name: &str, value: T) -> Result<()> {
        let mut array: Array<&mut MapData, T> =
            Array::try_from(self.ebpf.map_mut(name).with_context(|| format!("map {name} missing"))?)?;
        array.set(0, value, 0).with_context(|| format!("failed to set map {name}"))?;
        Ok(())
    }

    fn get_array<T: aya::Pod>(&self, name: &str) -> Result<T> {
        let array: Array<&MapData, T> =
            Array::try_from(self.ebpf.map(name).with_context(|| format!("map {name} missing"))?)?;
        array.get(&0, 0).with_context(|| format!("failed to read map {name}"))
    }

    /// Sets the threshold. Until it is set, the BPF programs send no stall.
    pub fn set_threshold(&mut self, threshold_ns: u64) -> Result<()> {
        let mut threshold: Array<&mut MapData, u64> =
            Array::try_from(self.ebpf.map_mut("THRESHOLD_NS").context("map THRESHOLD_NS missing")?)?;
        threshold.set(0, threshold_ns, 0).context("failed to set the threshold")?;
        Ok(())
    }

    /// Returns the number of attached tracepoints.
    pub fn attached(&self) -> usize {
        self.attached
    }

    /// Takes the ring buffer that carries ended stalls.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map("EVENTS").context("map EVENTS missing")?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Returns the ring-buffer drops and untracked threads, summed over CPUs.
    pub fn counters(&self) -> Result<(u64, u64)> {
        let counters: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map("COUNTERS").context("map COUNTERS missing")?)?;
        let sum = |index: u32| -> Result<u64> {
            let values = counters
                .get(&index, 0)
                .with_context(|| format!("failed to read counter {index}"))?;
            Ok(values.iter().sum())
        };
        Ok((sum(counter::RINGBUF_DROPS)?, sum(counter::THREAD_MAP_FULL)?))
    }

    /// Returns each CPU's steal clock (`rq->prev_steal_time`) as of its latest
    /// context switch, 0 for a CPU that has not switched since attach.
    pub fn cpu_steal_clocks(&self, cpus: usize) -> Result<Vec<u64>> {
        let clocks: Array<&MapData, u64> =
            Array::try_from(self.ebpf.map("CPU_STEAL").context("map CPU_STEAL missing")?)?;
        (0..cpus.min(tracer_common::MAX_CPUS as usize) as u32)
            .map(|cpu| clocks.get(&cpu, 0).context("failed to read map CPU_STEAL"))
            .collect()
    }

    /// Returns the state of every tracked loop thread.
    pub fn loop_threads(&self) -> Result<Vec<LoopThread>> {
        let threads: HashMap<&MapData, u32, LoopThread> =
            HashMap::try_from(self.ebpf.map("THREADS").context("map THREADS missing")?)?;
        let mut found = Vec::new();
        for entry in threads.iter() {
            match entry {
                Ok((_, thread)) => found.push(thread),
                // An entry removed between two steps of the walk: the thread exited.
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(error) => return Err(error).context("failed to read map THREADS"),
            }
        }
        Ok(found)
    }

    /// Returns every thread in scope that is inside a futex wait syscall.
    pub fn futex_waits(&self) -> Result<Vec<FutexWait>> {
        let waits: HashMap<&MapData, u32, FutexWait> =
            HashMap::try_from(self.ebpf.map("FUTEX_WAITS").context("map FUTEX_WAITS missing")?)?;
        let mut found = Vec::new();
        for entry in waits.iter() {
            match entry {
                Ok((_, wait)) => found.push(wait),
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(error) => return Err(error).context("failed to read map FUTEX_WAITS"),
            }
        }
        Ok(found)
    }

    /// Returns the recent acquirer and wakers of a futex, if it was waited on as a lock.
    pub fn futex_traffic(&self, pid: u32, uaddr: u64) -> Option<FutexTraffic> {
        let traffic: HashMap<&MapData, FutexKey, FutexTraffic> =
            HashMap::try_from(self.ebpf.map("FUTEX_TRAFFIC")?).ok()?;
        traffic.get(&FutexKey { pid, _pad: 0, uaddr }, 0).ok()
    }

    /// Returns the instruction addresses of a captured stack, innermost first, or
    /// nothing for `NO_STACK` or an ID no longer in the map.
    pub fn stack(&self, id: i32) -> Vec<u64> {
        let Ok(id) = u32::try_from(id) else {
            return Vec::new();
        };
        let Some(map) = self.ebpf.map("STACKS") else {
            return Vec::new();
        };
        let Ok(stacks) = StackTraceMap::<&MapData>::try_from(map) else {
            return Vec::new();
        };
        stacks
            .get(&id, 0)
            .map(|trace| trace.frames().iter().map(|frame| frame.ip).collect())
            .unwrap_or_default()
    }

    /// Removes and returns the on-CPU samples of the given iterations, by (TID, iteration).
    pub fn take_samples(&mut self, iterations: &[(u32, u64)]) -> Result<Vec<(SampleKey, u64)>> {
        let mut samples: HashMap<&mut MapData, SampleKey, u64> =
            HashMap::try_from(self.ebpf.map_mut("SAMPLES").context("map SAMPLES missing")?)?;
        let mut taken = Vec::new();
        for entry in samples.iter() {
            match entry {
                Ok((key, count)) if iterations.contains(&(key.tid, key.iteration)) => taken.push((key, count)),
                Ok(_) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(error) => return Err(error).context("failed to read map SAMPLES"),
            }
        }
        for (key, _) in &taken {
            // Already gone means the LRU evicted it after the walk, which loses nothing more.
            let _ = samples.remove(key);
        }
        Ok(taken)
    }

    /// Waits up to `timeout` for the BPF side to read this process's scheduler slice.
    pub async fn wait_for_own_slice(&self, timeout: Duration) -> Option<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let slice = Array::<&MapData, u64>::try_from(self.ebpf.map("SELF_SLICE")?)
                .ok()?
                .get(&0, 0)
                .ok()?;
            if slice != 0 {
                return Some(slice);
            }
            if Instant::now() >= deadline {
                return None;
            }
            // Each sleep parks the runtime in epoll_wait, which is when the slice is read.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
