//! The `stalltrace` command line.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};
use stalltrace::{
    aggregator::Aggregator,
    capture::read_capture,
    compare::compare,
    duration::CliDuration,
    live::{self, LiveOptions},
    report::{stall_line, Report},
    stacks::Symbolizer,
};

#[derive(Parser)]
#[command(
    name = "stalltrace",
    version,
    about = "Find event-loop threads whose loop stopped turning, and say where the time went"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Scope {
    /// Trace only this process (repeat for more). Default: every process.
    #[arg(long = "pid", value_name = "PID")]
    pids: Vec<u32>,
    /// Report loop iterations longer than this (`30ms`, `1.5ms`, `2s`).
    /// Default: one scheduler time slice, read from the kernel.
    #[arg(long, value_name = "DUR")]
    threshold: Option<CliDuration>,
}

#[derive(Subcommand)]
enum Command {
    /// Print one line per stall as it is detected and as it ends.
    Watch {
        #[command(flatten)]
        scope: Scope,
        /// Stop after this long (`10s`, `5m`). Default: run until Ctrl-C or SIGTERM.
        #[arg(long, value_name = "DUR")]
        duration: Option<CliDuration>,
        /// Print JSON lines (`{"event": ..., "stall": ...}`) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Trace for a while and write DIR/report.json and DIR/capture.
    Record {
        #[command(flatten)]
        scope: Scope,
        /// How long to trace (`10s`, `5m`). Ctrl-C or SIGTERM stops early and still writes the report.
        #[arg(long, value_name = "DUR")]
        duration: CliDuration,
        /// Output folder, created if missing.
        #[arg(short, long, value_name = "DIR")]
        output: PathBuf,
    },
    /// Show what changed between two reports, per verdict and per culprit, to check a fix.
    Compare {
        /// The report before the change: a report.json, or the folder that contains it.
        before: PathBuf,
        /// The report after the change.
        after: PathBuf,
        /// Print the comparison as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Replay a capture through the aggregator and write its report.json.
    Analyze {
        /// A capture file written by `record`.
        capture: PathBuf,
        /// Output folder for report.json. Default: the capture's folder.
        #[arg(short, long, value_name = "DIR")]
        output: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STALLTRACE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();

    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("stalltrace: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Watch {
            scope,
            duration,
            json,
        } => {
            let options = LiveOptions {
                pids: scope.pids,
                threshold_ns: scope.threshold.map(nanos),
                duration: duration.map(|d| d.0),
                json,
                output_dir: None,
            };
            runtime()?.block_on(live::run(options))?;
            Ok(())
        }
        Command::Record {
            scope,
            duration,
            output,
        } => {
            let options = LiveOptions {
                pids: scope.pids,
                threshold_ns: scope.threshold.map(nanos),
                duration: Some(duration.0),
                json: false,
                output_dir: Some(output),
            };
            runtime()?.block_on(live::run(options))?;
            Ok(())
        }
        Command::Analyze { capture, output } => analyze(capture, output),
        Command::Compare { before, after, json } => {
            let before = load_report(&before)?;
            let after = load_report(&after)?;
            let comparison = compare(&before, &before.culprits, &after, &after.culprits);
            if json {
                println!("{}", serde_json::to_string_pretty(&comparison)?);
            } else {
                print!("{}", comparison.render_text());
            }
            Ok(())
        }
    }
}

/// Reads a report.json, given its path or its folder.
fn load_report(path: &Path) -> Result<Report> {
    let file = if path.is_dir() { path.join("report.json") } else { path.to_path_buf() };
    let text = std::fs::read_to_string(&file).with_context(|| format!("failed to read report {}", file.display()))?;
    serde_json::from_str(&text).with_context(|| format!("invalid report {}: not a stalltrace report.json", file.display()))
}

fn nanos(duration: CliDuration) -> u64 {
    u64::try_from(duration.0.as_nanos()).unwrap_or(u64::MAX)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")
}

fn analyze(path: PathBuf, output: Option<PathBuf>) -> Result<()> {
    let capture = read_capture(&path)?;
    if let Some(stop) = &capture.stopped {
        eprintln!(
            "stalltrace: warning: capture {} stops at byte {}: {}. The report covers the {} records before it.",
            path.display(),
            stop.offset,
            stop.reason,
            capture.records.len()
        );
    }
    let mut aggregator = Aggregator::new(capture.header.threshold_ns);
    for record in &capture.records {
        aggregator.push(record);
    }
    let (report, flame) = Report::build(
        &aggregator,
        &capture.header.host,
        capture.stopped.is_some(),
        &mut Symbolizer::new(),
    );
    for stall in &report.stalls {
        println!("{}", stall_line(stall));
    }
    let dir = match output {
        Some(dir) => dir,
        None => path
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(".")),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("failed to create output folder {}", dir.display()))?;
    report.write_outputs(&flame, &dir)?;
    eprintln!("stalltrace: wrote {}", dir.join("report.json").display());
    eprintln!("stalltrace: {}", report.summary_line());
    for line in report.summary.lines() {
        eprintln!("stalltrace: {line}");
    }
    Ok(())
}
