//! Project tasks: toolchain set-up, builds, tests and benchmarks.
//!
//! Every task installs what it needs first, so a fresh machine needs only
//! `cargo xtask run -- ...` or `cargo xtask test`. Set-up steps are
//! idempotent and print one line each.

use std::{
    env,
    ffi::OsString,
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    io::{BufRead as _, BufReader},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

mod bench;

/// bpf-linker release that builds against LLVM 22, the LLVM of the nightly toolchain.
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_FEATURE: &str = "llvm-22";
/// Toolchain that builds the BPF programs (`-Z build-std=core` needs nightly).
const BPF_TOOLCHAIN: &str = "nightly";
/// Debian packages the integration tests use: `redis-server` is a real epoll
/// loop and `redis-tools` has `redis-cli`, which stalls it with `DEBUG SLEEP`.
const TEST_PACKAGES: &[&str] = &["redis-server", "redis-tools"];

#[derive(Parser)]
#[command(about = "stalltrace project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain pieces and Debian packages that builds and tests need.
    Setup,
    /// Build the BPF programs and the `stalltrace` binary (release).
    Build,
    /// Build, then run `stalltrace` with the arguments after `--`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run the unit tests, then the root integration scenarios one at a time.
    Test {
        /// Only run scenario tests whose name contains this string.
        filter: Option<String>,
    },
    /// Measure stalltrace's overhead against offcputime and bpftrace, its BPF program
    /// costs and detection latency, and write BENCHMARKS.md (about 10 minutes, as root).
    Bench {
        /// Runs of each workload under each tracer.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let project = Project::locate()?;
    match cli.task {
        Task::Setup => {
            project.setup_toolchain()?;
            project.setup_packages(TEST_PACKAGES)?;
            Ok(ExitCode::SUCCESS)
        }
        Task::Build => {
            project.setup_toolchain()?;
            project.build()?;
            Ok(ExitCode::SUCCESS)
        }
        Task::Run { args } => {
            project.setup_toolchain()?;
            let binary = project.build()?;
            let status = Command::new(&binary)
                .args(args)
                .status()
                .with_context(|| format!("failed to start {}", binary.display()))?;
            Ok(exit_code(status.code()))
        }
        Task::Test { filter } => {
            project.setup_toolchain()?;
            project.setup_packages(TEST_PACKAGES)?;
            project.test(filter.as_deref())
        }
        Task::Bench { runs } => {
            project.setup_toolchain()?;
            project.setup_packages(bench::PACKAGES)?;
            let binary = project.build()?;
            bench::run(&project.root, &binary, runs)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn exit_code(code: Option<i32>) -> ExitCode {
    // A signal death has no code. 128 + signal would need the raw status, and 1 is enough.
    ExitCode::from(code.map_or(1, |code| u8::try_from(code).unwrap_or(1)))
}

struct Project {
    root: PathBuf,
}

impl Project {
    fn locate() -> Result<Self> {
        let manifest = env::var_os("CARGO_MANIFEST_DIR")
            .context("CARGO_MANIFEST_DIR is not set: run this through `cargo xtask`")?;
        let root = Path::new(&manifest)
            .parent()
            .context("xtask manifest folder has no parent")?
            .to_path_buf();
        Ok(Self { root })
    }

    fn tools_dir(&self) -> PathBuf {
        self.root.join(".tools")
    }

    fn bpf_linker_dir(&self) -> PathBuf {
        self.tools_dir().join(format!("bpf-linker-{BPF_LINKER_VERSION}"))
    }

    /// Installs rust-src for the BPF toolchain and a project-local bpf-linker.
    fn setup_toolchain(&self) -> Result<()> {
        let components = output(Command::new("rustup").args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            BPF_TOOLCHAIN,
        ]))
        .with_context(|| {
            format!("the {BPF_TOOLCHAIN} toolchain is missing: run `rustup toolchain install {BPF_TOOLCHAIN}`")
        })?;
        if components.lines().any(|line| line.starts_with("rust-src")) {
            step("rust-src for nightly: present");
        } else {
            step("rust-src for nightly: installing");
            run_checked(Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                BPF_TOOLCHAIN,
            ]))?;
        }

        let linker = self.bpf_linker_dir().join("bin").join("bpf-linker");
        let llvm_lib = self.llvm_prefix()?.join("lib");
        if linker.exists() {
            let mut version = Command::new(&linker);
            version.arg("--version").env("LD_LIBRARY_PATH", &llvm_lib);
            match output(&mut version) {
                Ok(text) if text.contains(BPF_LINKER_VERSION) => {
                    step(&format!("bpf-linker {BPF_LINKER_VERSION}: present"));
                    return Ok(());
                }
                Ok(text) => step(&format!(
                    "bpf-linker: found `{}`, rebuilding {BPF_LINKER_VERSION}",
                    text.trim()
                )),
                Err(error) => step(&format!("bpf-linker does not run ({error:#}), rebuilding")),
            }
        }

        step(&format!(
            "bpf-linker {BPF_LINKER_VERSION}: building against the {BPF_TOOLCHAIN} toolchain's LLVM (about 2 minutes, once)"
        ));
        run_checked(
            Command::new("cargo")
                .args([
                    &format!("+{BPF_TOOLCHAIN}"),
                    "install",
                    "--locked",
                    "--force",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--no-default-features",
                    "--features",
                    BPF_LINKER_FEATURE,
                    "--root",
                ])
                .arg(self.bpf_linker_dir())
                .env("LLVM_PREFIX", self.llvm_prefix()?)
                .env("LD_LIBRARY_PATH", &llvm_lib),
        )
        .context("building bpf-linker failed")?;
        Ok(())
    }

    /// Returns a folder whose `lib/` links the nightly toolchain's libLLVM under
    /// the names llvm-sys looks for, so bpf-linker needs no system LLVM.
    fn llvm_prefix(&self) -> Result<PathBuf> {
        let sysroot = output(Command::new("rustc").args([
            &format!("+{BPF_TOOLCHAIN}"),
            "--print",
            "sysroot",
        ]))?;
        let toolchain_lib = Path::new(sysroot.trim()).join("lib");
        let versioned = fs::read_dir(&toolchain_lib)
            .with_context(|| format!("failed to list {}", toolchain_lib.display()))?
            .filter_map(|entry| entry.ok())
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .find(|name| name.starts_with("libLLVM.so."))
            .with_context(|| {
                format!("no libLLVM.so.* in {}: reinstall the {BPF_TOOLCHAIN} toolchain", toolchain_lib.display())
            })?;

        let prefix = self.tools_dir().join("llvm");
        let lib = prefix.join("lib");
        fs::create_dir_all(&lib).with_context(|| format!("failed to create {}", lib.display()))?;
        for name in ["libLLVM.so", versioned.as_str()] {
            let link = lib.join(name);
            let target = toolchain_lib.join(&versioned);
            if fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
                let _ = fs::remove_file(&link);
                symlink(&target, &link)
                    .with_context(|| format!("failed to link {}", link.display()))?;
            }
        }
        Ok(prefix)
    }

    /// Installs missing Debian packages with apt-get.
    fn setup_packages(&self, packages: &[&str]) -> Result<()> {
        let missing: Vec<&str> = packages
            .iter()
            .copied()
            .filter(|package| !debian_package_installed(package))
            .collect();
        if missing.is_empty() {
            step(&format!("Debian packages: present ({})", packages.join(", ")));
            return Ok(());
        }
        if !is_root() {
            bail!(
                "Debian packages {} are missing and installing them needs root: run `sudo apt-get install {}`",
                missing.join(", "),
                missing.join(" ")
            );
        }
        step(&format!("Debian packages: installing {}", missing.join(", ")));
        run_checked(Command::new("apt-get").args(["update", "-q"]))?;
        run_checked(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        Ok(())
    }

    /// Adds bpf-linker and its libLLVM to the environment of a cargo command.
    fn with_bpf_env(&self, command: &mut Command) -> Result<()> {
        let mut path = OsString::from(self.bpf_linker_dir().join("bin"));
        if let Some(old) = env::var_os("PATH") {
            path.push(":");
            path.push(old);
        }
        command
            .env("PATH", path)
            .env("LD_LIBRARY_PATH", self.llvm_prefix()?.join("lib"));
        Ok(())
    }

    /// Builds the BPF object and the `stalltrace` binary, and returns the binary's path.
    fn build(&self) -> Result<PathBuf> {
        step("building stalltrace (release)");
        let mut command = Command::new("cargo");
        command
            .current_dir(&self.root)
            .args(["build", "--release", "--package", "tracer-user", "--bin", "stalltrace"]);
        self.with_bpf_env(&mut command)?;
        run_checked(&mut command)?;
        Ok(self.root.join("target/release/stalltrace"))
    }

    fn test(&self, filter: Option<&str>) -> Result<ExitCode> {
        let binary = self.build()?;

        step("unit tests");
        let mut unit = Command::new("cargo");
        unit.current_dir(&self.root)
            .args(["test", "--release", "--workspace", "--exclude", "stalltrace-tests", "--exclude", "tracer-ebpf"]);
        self.with_bpf_env(&mut unit)?;
        let mut totals = TestTotals::default();
        run_counted(&mut unit, &mut totals)?;

        step("scenario tests (real kernel, one at a time)");
        if !is_root() {
            bail!("scenario tests load BPF programs and need root: run `sudo -E cargo xtask test`");
        }
        let mut scenarios = Command::new("cargo");
        scenarios
            .current_dir(&self.root)
            .args(["test", "--release", "--package", "stalltrace-tests", "--"])
            .arg("--test-threads=1")
            .env("STALLTRACE_BIN", &binary);
        if let Some(filter) = filter {
            scenarios.arg(filter);
        }
        self.with_bpf_env(&mut scenarios)?;
        run_counted(&mut scenarios, &mut totals)?;
        // cargo's last summary is often a doc-test run with 0 tests; this line sums them all.
        println!(
            "xtask: {} passed, {} failed, {} skipped",
            totals.passed, totals.failed, totals.ignored
        );
        Ok(ExitCode::SUCCESS)
    }
}

/// Test counts summed over the `test result:` lines of several cargo runs.
#[derive(Default)]
struct TestTotals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl TestTotals {
    /// Adds the counts of a line like `test result: ok. 8 passed; 0 failed; 1 ignored; ...`.
    fn add_line(&mut self, line: &str) {
        let Some(counts) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in counts.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(kind), Some(number)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(number) = number.parse::<u64>() else { continue };
            match kind {
                "passed" => self.passed += number,
                "failed" => self.failed += number,
                "ignored" => self.ignored += number,
                _ => {}
            }
        }
    }
}

/// Runs a cargo test command, echoing its output, and adds its counts to `totals`.
fn run_counted(command: &mut Command, totals: &mut TestTotals) -> Result<()> {
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start {command:?}"))?;
    let stdout = child.stdout.take().context("test output is not piped")?;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("failed to read the test output")?;
        println!("{line}");
        totals.add_line(&line);
    }
    let status = child.wait().with_context(|| format!("failed to wait for {command:?}"))?;
    if !status.success() {
        println!(
            "xtask: {} passed, {} failed, {} skipped",
            totals.passed,
            totals.failed.max(1),
            totals.ignored
        );
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

fn step(message: &str) {
    eprintln!("xtask: {message}");
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn debian_package_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["--show", "--showformat=${db:Status-Status}", package])
        .output()
        .map(|out| out.status.success() && out.stdout == b"installed")
        .unwrap_or(false)
}

fn run_checked(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("failed to start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

fn output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("failed to start {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_sum_result_lines() {
        let mut totals = TestTotals::default();
        totals.add_line("test result: ok. 8 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 37.19s");
        totals.add_line("test result: FAILED. 2 passed; 3 failed; 0 ignored; 0 measured; 0 filtered out");
        totals.add_line("test spin_handler_is_on_cpu ... ok");

        assert_eq!(totals.passed, 10);
        assert_eq!(totals.failed, 3);
        assert_eq!(totals.ignored, 1);
    }
}
